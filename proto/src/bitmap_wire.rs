//! The dirty bitmap on the peer link: sent at every connect, in parts of at most
//! [`PART_WORDS`] words, each part either its words (little-endian) or, when shorter, their
//! bits as run lengths (DRBD's compressed bitmap exchange).
//!
//! A node that was away for hours usually has a few runs of dirty bits in a bitmap of
//! millions of clear ones: sent as words that was the whole bitmap (32 MiB for 1 TiB at 4 KiB
//! a bit) at every connect, and the one-frame limit capped the device size. As runs it is a
//! few bytes, and in parts it has no size limit but the receiver's own bound.
//!
//! Run-length form: unsigned LEB128 lengths of alternating runs of clear and set bits, clear
//! first (so the first run may be empty), lowest bit of the first word first, covering the
//! part's bits exactly. Both forms are strict: a part that does not decode to exactly its
//! words is refused.

/// Words per part at most: 1 MiB as words.
pub const PART_WORDS: usize = 128 * 1024;

/// The largest bitmap a node keeps, sends or takes: 32 TiB of data at 4 KiB a bit (each
/// doubling of the granularity doubles that), and as much memory on each node.
pub const MAX_BITMAP_BYTES: u64 = 1 << 30;

/// Why a part does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapWireError {
    #[error("bitmap part of {words} words is larger than the bound of {PART_WORDS}")]
    TooManyWords { words: usize },
    #[error("bitmap part of {words} words as words has {got} bytes")]
    WordBytes { words: usize, got: usize },
    #[error("bitmap part as runs: a length that is not a LEB128 number of at most 64 bits")]
    BadLength,
    #[error("bitmap part as runs: an empty run after the first")]
    EmptyRun,
    #[error("bitmap part as runs covers {got} bits, the part has {want}")]
    RunBits { got: u64, want: u64 },
}

/// Appends `words` as a part's payload to `out`: as runs when that is shorter than the words
/// themselves, else the words. Returns whether it is runs.
pub fn encode_part(words: &[u64], out: &mut Vec<u8>) -> bool {
    debug_assert!(words.len() <= PART_WORDS);
    let start = out.len();
    let raw_len = words.len() * 8;
    let mut set = false;
    let mut run = 0u64;
    'words: for &w in words {
        // Whole words of the current run's value: the common case, one step.
        if w == if set { u64::MAX } else { 0 } {
            run += 64;
            continue;
        }
        let mut v = w;
        let mut left = 64u32;
        while left > 0 {
            let same = if set {
                (!v).trailing_zeros()
            } else {
                v.trailing_zeros()
            }
            .min(left);
            run += u64::from(same);
            left -= same;
            v = v.checked_shr(same).unwrap_or(0);
            if left > 0 {
                push_leb128(out, run);
                if out.len() - start >= raw_len {
                    break 'words;
                }
                run = 0;
                set = !set;
            }
        }
    }
    if out.len() - start < raw_len {
        push_leb128(out, run);
        if out.len() - start < raw_len {
            return true;
        }
    }
    out.truncate(start);
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
    false
}

/// Decodes a part's payload into `out` (the part's words, overwritten).
pub fn decode_part(payload: &[u8], runs: bool, out: &mut [u64]) -> Result<(), BitmapWireError> {
    let words = out.len();
    if words > PART_WORDS {
        return Err(BitmapWireError::TooManyWords { words });
    }
    if !runs {
        if payload.len() != words * 8 {
            return Err(BitmapWireError::WordBytes {
                words,
                got: payload.len(),
            });
        }
        for (w, b) in out.iter_mut().zip(payload.chunks_exact(8)) {
            let mut le = [0u8; 8];
            le.copy_from_slice(b);
            *w = u64::from_le_bytes(le);
        }
        return Ok(());
    }
    out.iter_mut().for_each(|w| *w = 0);
    let total = words as u64 * 64;
    let (mut at, mut pos, mut set, mut first) = (0usize, 0u64, false, true);
    while at < payload.len() {
        let (run, used) = read_leb128(&payload[at..]).ok_or(BitmapWireError::BadLength)?;
        at += used;
        if run == 0 && !first {
            return Err(BitmapWireError::EmptyRun);
        }
        let end = pos
            .checked_add(run)
            .filter(|&e| e <= total)
            .ok_or(BitmapWireError::RunBits {
                got: pos.saturating_add(run),
                want: total,
            })?;
        if set {
            set_bits(out, pos, end);
        }
        pos = end;
        set = !set;
        first = false;
    }
    if pos != total {
        return Err(BitmapWireError::RunBits {
            got: pos,
            want: total,
        });
    }
    Ok(())
}

/// Sets bits `[from, to)` of `words` (in bounds: checked by the caller).
fn set_bits(words: &mut [u64], from: u64, to: u64) {
    let mut b = from;
    while b < to {
        let (w, lo) = ((b / 64) as usize, b % 64);
        let n = (to - b).min(64 - lo);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << lo
        };
        words[w] |= mask;
        b += n;
    }
}

fn push_leb128(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// A LEB128 number and the bytes it took; `None` when cut off, longer than 10 bytes, or
/// past 64 bits.
fn read_leb128(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        let part = u64::from(byte & 0x7f);
        if i == 9 && part > 1 {
            return None;
        }
        v |= part << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(words: &[u64]) -> (bool, usize) {
        let mut out = vec![0xAA]; // appended after what is there
        let runs = encode_part(words, &mut out);
        assert_eq!(out[0], 0xAA);
        let payload = &out[1..];
        assert!(
            payload.len() <= words.len() * 8,
            "never longer than the words"
        );
        let mut back = vec![u64::MAX; words.len()];
        decode_part(payload, runs, &mut back).expect("decodes");
        assert_eq!(back, words);
        (runs, payload.len())
    }

    #[test]
    fn parts_round_trip_in_the_shorter_form() {
        // Clean: one run.
        assert_eq!(round_trip(&[0; 4096]), (true, 3));
        // All dirty: an empty clear run, then one set run.
        assert_eq!(round_trip(&[u64::MAX; 100]), (true, 3));
        // A few runs inside words and across word boundaries.
        let mut w = vec![0u64; 1000];
        w[3] = 0b1011 << 60;
        w[4] = u64::MAX;
        w[5] = 1;
        w[999] = 1 << 63;
        let (runs, len) = round_trip(&w);
        assert!(runs && len < 32, "{len}");
        // Alternating bits: runs would be longer than the words.
        assert_eq!(round_trip(&[0x5555_5555_5555_5555; 64]), (false, 512));
        // Pseudo-random words, and every single-bit position.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let rnd: Vec<u64> = (0..777)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            })
            .collect();
        round_trip(&rnd);
        for bit in 0..128 {
            let mut w = [0u64; 2];
            w[bit / 64] = 1 << (bit % 64);
            round_trip(&w);
        }
        assert_eq!(round_trip(&[]), (false, 0));
    }

    #[test]
    fn malformed_parts_are_refused() {
        let mut out = [0u64; 2];
        // Words: the byte count must be exact.
        assert!(matches!(
            decode_part(&[0; 15], false, &mut out),
            Err(BitmapWireError::WordBytes { .. })
        ));
        // Runs short of the part, past it, or with an empty run after the first.
        assert!(matches!(
            decode_part(&[100], true, &mut out),
            Err(BitmapWireError::RunBits {
                got: 100,
                want: 128
            })
        ));
        assert!(matches!(
            decode_part(&[100, 29], true, &mut out),
            Err(BitmapWireError::RunBits { .. })
        ));
        assert_eq!(
            decode_part(&[100, 0, 28], true, &mut out),
            Err(BitmapWireError::EmptyRun)
        );
        // A length past 64 bits, a cut-off one, and a huge one that would overflow.
        assert_eq!(
            decode_part(&[0xff; 11], true, &mut out),
            Err(BitmapWireError::BadLength)
        );
        assert_eq!(
            decode_part(&[0x80], true, &mut out),
            Err(BitmapWireError::BadLength)
        );
        let mut huge = Vec::new();
        push_leb128(&mut huge, 64);
        push_leb128(&mut huge, u64::MAX);
        assert!(matches!(
            decode_part(&huge, true, &mut out),
            Err(BitmapWireError::RunBits { .. })
        ));
        // More words than a part holds.
        let mut big = vec![0u64; PART_WORDS + 1];
        assert!(matches!(
            decode_part(&[], true, &mut big),
            Err(BitmapWireError::TooManyWords { .. })
        ));
        // The valid forms of the same part.
        assert_eq!(decode_part(&[64, 64], true, &mut out), Ok(()));
        assert_eq!(out, [0, u64::MAX]);
        assert_eq!(decode_part(&[0, 1, 127], true, &mut out), Ok(()));
        assert_eq!(out, [1, 0]);
    }
}
