//! Test data: real randomness from /dev/urandom, and a seeded generator for content that can
//! be regenerated for checking.

use std::io::{Read, Write};
use std::path::Path;

/// `n` bytes from /dev/urandom.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut v))
        .expect("read /dev/urandom");
    v
}

/// Writes `n` bytes from /dev/urandom to `path` and returns them.
pub fn write_random_file(path: &Path, n: usize) -> Vec<u8> {
    let v = random_bytes(n);
    let mut f =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(&v)
        .and_then(|_| f.sync_all())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    v
}

/// xorshift64*: deterministic, seeded content (never all zeroes for a non-zero seed).
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let b = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}
