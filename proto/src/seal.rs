//! Link encryption: an authenticated, encrypted record layer beneath the peer frames.
//!
//! The handshake proves that both nodes know the shared secret; with `encryption` on, every
//! byte after it travels in sealed records. Each direction has its own AES-256-GCM key,
//! derived from the secret, the resource, the sender's name and both handshake nonces, so keys
//! are fresh per connection and a record cannot be reflected back to its sender. The nonce is
//! a per-direction record counter that both sides track: a record that is replayed, dropped,
//! reordered or altered fails authentication and the connection ends.
//!
//! A record is `[u32 LE body length][ciphertext][16-byte tag]`. The body length is checked
//! against [`MAX_RECORD`] before anything is read or allocated. Frames inside may span
//! records; the record layer only carries bytes.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Key, Nonce, Tag};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

/// Largest plaintext in one record.
pub const MAX_RECORD: usize = 4 << 20;
/// Bytes of the length prefix.
pub const PREFIX: usize = 4;
/// Bytes of the authentication tag at the end of a record.
pub const TAG: usize = 16;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SealError {
    #[error(
        "sealed record of {0} bytes is over the {MAX_RECORD}-byte limit or shorter than its tag"
    )]
    BadLength(usize),
    #[error("sealed record {0} failed authentication (wrong key, altered, replayed or reordered)")]
    Forged(u64),
    #[error("record counter exhausted; the link must reconnect")]
    Exhausted,
}

/// PBKDF2 rounds that turn the configured secret into the link key.
pub const SECRET_ROUNDS: u32 = 200_000;

/// The key both nodes authenticate and derive their session keys with: PBKDF2-HMAC-SHA256 of
/// the configured secret, salted with the resource name. The handshake puts an HMAC under this
/// key on the wire, which whoever receives it can test guesses against offline; the rounds
/// make every guess cost a few hundred thousand HMACs instead of one. Computed once per daemon
/// (about 0.1 s).
pub fn link_key(secret: &[u8], resource: &str) -> [u8; 32] {
    let mut salt = Vec::with_capacity(32 + resource.len());
    salt.extend_from_slice(b"blockrep-link-secret-v1\0");
    salt.extend_from_slice(resource.as_bytes());
    let mut key = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(secret, &salt, SECRET_ROUNDS, &mut key);
    key
}

/// The key one direction of a link is sealed with: HMAC-SHA256 of the shared secret over the
/// context. `sender_nonce` is the nonce the sending node chose in the handshake.
pub fn derive_key(
    secret: &[u8],
    resource: &str,
    sender: &str,
    sender_nonce: &[u8; 32],
    receiver_nonce: &[u8; 32],
) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(b"blockrep-link-key-v1\0");
    mac.update(&(resource.len() as u32).to_le_bytes());
    mac.update(resource.as_bytes());
    mac.update(&(sender.len() as u32).to_le_bytes());
    mac.update(sender.as_bytes());
    mac.update(sender_nonce);
    mac.update(receiver_nonce);
    mac.finalize().into_bytes().into()
}

fn nonce(counter: u64) -> Nonce<aes_gcm::aead::consts::U12> {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    n.into()
}

/// The sending half: seals byte batches into records.
pub struct Sealer {
    cipher: Aes256Gcm,
    counter: u64,
}

impl Sealer {
    pub fn new(key: &[u8; 32]) -> Self {
        Sealer {
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key)),
            counter: 0,
        }
    }

    /// Appends to `out` one record per [`MAX_RECORD`] bytes of `plaintext`.
    pub fn seal_into(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), SealError> {
        for chunk in plaintext.chunks(MAX_RECORD) {
            if self.counter == u64::MAX {
                return Err(SealError::Exhausted);
            }
            let body = chunk.len() + TAG;
            out.reserve(PREFIX + body);
            out.extend_from_slice(&(body as u32).to_le_bytes());
            let start = out.len();
            out.extend_from_slice(chunk);
            let tag = self
                .cipher
                .encrypt_in_place_detached(&nonce(self.counter), &[], &mut out[start..])
                .map_err(|_| SealError::BadLength(body))?;
            out.extend_from_slice(&tag);
            self.counter += 1;
        }
        Ok(())
    }
}

/// The receiving half: checks and opens records in order.
pub struct Opener {
    cipher: Aes256Gcm,
    counter: u64,
}

impl Opener {
    pub fn new(key: &[u8; 32]) -> Self {
        Opener {
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key)),
            counter: 0,
        }
    }

    /// The body length a record prefix announces, bounded before anything is read.
    pub fn body_len(prefix: [u8; PREFIX]) -> Result<usize, SealError> {
        let n = u32::from_le_bytes(prefix) as usize;
        if !(TAG..=MAX_RECORD + TAG).contains(&n) {
            return Err(SealError::BadLength(n));
        }
        Ok(n)
    }

    /// Authenticates and decrypts a record body (ciphertext and tag) in place; returns the
    /// plaintext length (the plaintext is `body[..len]`).
    pub fn open_in_place(&mut self, body: &mut [u8]) -> Result<usize, SealError> {
        if !(TAG..=MAX_RECORD + TAG).contains(&body.len()) {
            return Err(SealError::BadLength(body.len()));
        }
        if self.counter == u64::MAX {
            return Err(SealError::Exhausted);
        }
        let len = body.len() - TAG;
        let (text, tag) = body.split_at_mut(len);
        let tag = Tag::<aes_gcm::aead::consts::U16>::clone_from_slice(tag);
        self.cipher
            .decrypt_in_place_detached(&nonce(self.counter), &[], text, &tag)
            .map_err(|_| SealError::Forged(self.counter))?;
        self.counter += 1;
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(mut b: &[u8]) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        while !b.is_empty() {
            let n = Opener::body_len(b[..PREFIX].try_into().unwrap()).unwrap();
            v.push(b[PREFIX..PREFIX + n].to_vec());
            b = &b[PREFIX + n..];
        }
        v
    }

    fn key(sender: &str) -> [u8; 32] {
        derive_key(b"s3cret", "r0", sender, &[1; 32], &[2; 32])
    }

    #[test]
    fn the_link_key_depends_on_the_secret_and_the_resource_only() {
        let k = link_key(b"s3cret", "r0");
        assert_eq!(k, link_key(b"s3cret", "r0"));
        assert_ne!(k, link_key(b"s3cret!", "r0"));
        assert_ne!(k, link_key(b"s3cret", "r1"));
        assert_ne!(&k[..], &b"s3cret"[..]);
    }

    #[test]
    fn round_trip_in_order() {
        let mut s = Sealer::new(&key("alpha"));
        let mut out = Vec::new();
        s.seal_into(b"hello", &mut out).unwrap();
        s.seal_into(&[], &mut out).unwrap();
        s.seal_into(b"world!", &mut out).unwrap();
        let mut o = Opener::new(&key("alpha"));
        let mut got = Vec::new();
        for mut r in records(&out) {
            let n = o.open_in_place(&mut r).unwrap();
            got.extend_from_slice(&r[..n]);
        }
        assert_eq!(got, b"helloworld!");
        // The ciphertext does not contain the plaintext.
        assert!(!out.windows(5).any(|w| w == b"hello"));
    }

    #[test]
    fn large_batches_split_into_bounded_records() {
        let data = vec![7u8; MAX_RECORD * 2 + 10];
        let mut s = Sealer::new(&key("alpha"));
        let mut out = Vec::new();
        s.seal_into(&data, &mut out).unwrap();
        let rs = records(&out);
        assert_eq!(rs.len(), 3);
        let mut o = Opener::new(&key("alpha"));
        let total: usize = rs
            .into_iter()
            .map(|mut r| o.open_in_place(&mut r).unwrap())
            .sum();
        assert_eq!(total, data.len());
    }

    #[test]
    fn tampered_replayed_reordered_or_wrong_key_fail() {
        let mut s = Sealer::new(&key("alpha"));
        let mut out = Vec::new();
        s.seal_into(b"first", &mut out).unwrap();
        s.seal_into(b"second", &mut out).unwrap();
        let rs = records(&out);
        // Altered byte.
        for i in 0..rs[0].len() {
            let mut r = rs[0].clone();
            r[i] ^= 1;
            assert_eq!(
                Opener::new(&key("alpha")).open_in_place(&mut r),
                Err(SealError::Forged(0)),
                "byte {i}"
            );
        }
        // Reordered: the second record first.
        let mut r = rs[1].clone();
        assert!(Opener::new(&key("alpha")).open_in_place(&mut r).is_err());
        // Replayed: the first record twice.
        let mut o = Opener::new(&key("alpha"));
        o.open_in_place(&mut rs[0].clone()).unwrap();
        assert_eq!(
            o.open_in_place(&mut rs[0].clone()),
            Err(SealError::Forged(1))
        );
        // The other direction's key (a reflected record).
        assert!(Opener::new(&key("beta"))
            .open_in_place(&mut rs[0].clone())
            .is_err());
        // Another connection's nonces.
        let other = derive_key(b"s3cret", "r0", "alpha", &[3; 32], &[2; 32]);
        assert!(Opener::new(&other)
            .open_in_place(&mut rs[0].clone())
            .is_err());
    }

    #[test]
    fn lengths_are_bounded() {
        assert!(Opener::body_len(u32::MAX.to_le_bytes()).is_err());
        assert!(Opener::body_len(((MAX_RECORD + TAG + 1) as u32).to_le_bytes()).is_err());
        assert!(Opener::body_len(3u32.to_le_bytes()).is_err());
        assert_eq!(Opener::body_len((TAG as u32).to_le_bytes()), Ok(TAG));
        assert!(Opener::new(&key("a")).open_in_place(&mut [0u8; 5]).is_err());
    }
}
