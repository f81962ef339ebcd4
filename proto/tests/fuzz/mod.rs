//! Shared by the garbage-input tests of `proto` and `blockrep` (each includes this file with
//! `#[path]`): a deterministic PRNG, the context a failure prints to be rerun alone, and
//! random mutations of valid encodings.
#![allow(dead_code)]

/// xorshift64 (Marsaglia 2003). The state is never zero.
pub struct Rng(u64);

impl Rng {
    /// The PRNG of iteration `iter` of a test seeded with `seed` (splitmix64 of both, so nearby
    /// iterations diverge at once).
    pub fn new(seed: u64, iter: u64) -> Self {
        let mut z = seed ^ iter.wrapping_mul(0xD129_0E3B_5A8A_F0C7);
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(if z == 0 { 1 } else { z })
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-ish in `0..n` (0 when `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    pub fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    pub fn bool(&mut self) -> bool {
        self.next() & 1 == 1
    }

    pub fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }

    /// Boundary values more often than a uniform draw would give them.
    pub fn u64_edge(&mut self) -> u64 {
        match self.below(10) {
            0 => 0,
            1 => 1,
            2 => u64::MAX,
            3 => u64::MAX - self.below(4097),
            4 => 1u64 << self.below(64),
            5 => u64::from(u32::MAX) + self.below(3) - 1,
            6 => self.below(1 << 20),
            _ => self.next(),
        }
    }

    pub fn u32_edge(&mut self) -> u32 {
        match self.below(8) {
            0 => 0,
            1 => 1,
            2 => u32::MAX,
            3 => u32::MAX - self.below(4097) as u32,
            4 => 1u32 << self.below(32),
            5 => self.below(1 << 16) as u32,
            _ => self.next() as u32,
        }
    }

    /// A garbage length: mostly `0..4096`, sometimes large.
    pub fn garbage_len(&mut self) -> usize {
        if self.one_in(100) {
            [8192, 65_536, 1 << 20][self.index(3)]
        } else {
            self.index(4096)
        }
    }

    /// A short printable (and sometimes multi-byte UTF-8) string.
    pub fn string(&mut self, max: usize) -> String {
        let n = self.index(max + 1);
        (0..n)
            .map(|_| match self.below(8) {
                0 => 'é',
                1 => '\u{1F600}',
                2 => '\0',
                _ => char::from(b'a' + self.below(26) as u8),
            })
            .collect()
    }
}

/// Where a failure happened: enough to rerun exactly that case.
#[derive(Clone, Copy)]
pub struct Ctx {
    pub test: &'static str,
    pub seed: u64,
    pub iter: u64,
}

impl std::fmt::Display for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: seed {:#x} iter {} (Rng::new(seed, iter))",
            self.test, self.seed, self.iter
        )
    }
}

/// Writes `v` (`width` bytes, little- or big-endian) at `at`, clipped to the buffer.
pub fn put_uint(b: &mut [u8], at: usize, width: usize, v: u64, big_endian: bool) {
    let bytes = if big_endian {
        v.to_be_bytes()[8 - width..].to_vec()
    } else {
        v.to_le_bytes()[..width].to_vec()
    };
    for (i, x) in bytes.into_iter().enumerate() {
        if let Some(d) = b.get_mut(at + i) {
            *d = x;
        }
    }
}

/// Length-field extremes.
pub const EXTREMES: [u64; 5] = [0, 1, u32::MAX as u64, u64::MAX, 0x8000_0000];

/// A random mutation of `input`: bit flips, byte overwrites, truncation, extension, extreme
/// integers written over a field, ranges zeroed or copied, bytes inserted or deleted.
pub fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut b = input.to_vec();
    let n = b.len();
    match rng.below(11) {
        0 if n > 0 => {
            let i = rng.index(n);
            b[i] ^= 1 << rng.below(8);
        }
        1 if n > 0 => {
            for _ in 0..1 + rng.below(8) {
                let i = rng.index(n);
                b[i] ^= 1 << rng.below(8);
            }
        }
        2 if n > 0 => {
            let i = rng.index(n);
            b[i] = rng.next() as u8;
        }
        3 => b.truncate(rng.index(n.max(1))),
        4 => {
            let extra = if rng.one_in(8) {
                rng.index(8192)
            } else {
                1 + rng.index(64)
            };
            b.extend(rng.bytes(extra));
        }
        5 | 6 if n > 0 => {
            let width = [1, 2, 4, 8][rng.index(4)];
            let v = EXTREMES[rng.index(EXTREMES.len())];
            let at = rng.index(n);
            put_uint(&mut b, at, width, v, rng.bool());
        }
        7 if n > 0 => {
            let at = rng.index(n);
            let len = rng.index(n - at + 1);
            let v = if rng.bool() { 0 } else { 0xff };
            b[at..at + len].fill(v);
        }
        8 if n > 1 => {
            let from = rng.index(n);
            let to = rng.index(n);
            let len = rng.index(n - from.max(to) + 1);
            b.copy_within(from..from + len, to);
        }
        9 => {
            let at = rng.index(n + 1);
            let k = 1 + rng.index(16);
            let ins = rng.bytes(k);
            b.splice(at..at, ins);
        }
        10 if n > 0 => {
            let at = rng.index(n);
            let len = 1 + rng.index((n - at).min(16));
            b.drain(at..at + len);
        }
        _ => {
            let i = rng.index(n + 1);
            b.insert(i, rng.next() as u8);
        }
    }
    b
}

/// A mutation that keeps the length (for images whose size is their capacity).
pub fn mutate_in_place(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut b = mutate(rng, input);
    if b.len() != input.len() {
        // Keep the shifted or cut bytes, restore the length.
        b.resize(input.len(), 0);
    }
    b
}
