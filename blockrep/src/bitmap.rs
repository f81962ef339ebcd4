//! The dirty bitmap: one bit per `granularity` bytes of data that the peer may lack.
//!
//! Set for writes the peer has not acknowledged when the journal cannot carry them (peer away
//! too long, journal overflowed); cleared when a resync or an acknowledgement proves the peer
//! has the region. Persisted in the metadata's bitmap area.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    granularity: u64,
    size: u64,
    dirty_bits: u64,
}

impl Bitmap {
    pub fn new(size: u64, granularity: u64) -> Self {
        assert!(granularity.is_power_of_two());
        let bits = size.div_ceil(granularity);
        Bitmap {
            words: vec![0; bits.div_ceil(64) as usize],
            granularity,
            size,
            dirty_bits: 0,
        }
    }

    /// Loads from the on-disk area (little-endian words); bits past the device are ignored.
    pub fn from_bytes(size: u64, granularity: u64, bytes: &[u8]) -> Self {
        let mut b = Self::new(size, granularity);
        let nbits = size.div_ceil(granularity);
        for (i, w) in b.words.iter_mut().enumerate() {
            let s = i * 8;
            if let Some(chunk) = bytes.get(s..s + 8) {
                let mut v = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
                let first = i as u64 * 64;
                if first + 64 > nbits {
                    let keep = nbits.saturating_sub(first);
                    v &= if keep == 0 {
                        0
                    } else {
                        u64::MAX >> (64 - keep)
                    };
                }
                *w = v;
            }
        }
        b.dirty_bits = b.words.iter().map(|w| u64::from(w.count_ones())).sum();
        b
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Marks every region touched by `[offset, offset+len)`.
    pub fn set_range(&mut self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = (offset + len).min(self.size);
        let first = offset / self.granularity;
        let last = (end - 1) / self.granularity;
        for bit in first..=last {
            let (w, m) = ((bit / 64) as usize, 1u64 << (bit % 64));
            if self.words[w] & m == 0 {
                self.words[w] |= m;
                self.dirty_bits += 1;
            }
        }
    }

    pub fn clear_bit(&mut self, bit: u64) {
        let (w, m) = ((bit / 64) as usize, 1u64 << (bit % 64));
        if let Some(word) = self.words.get_mut(w) {
            if *word & m != 0 {
                *word &= !m;
                self.dirty_bits -= 1;
            }
        }
    }

    pub fn clear_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
        self.dirty_bits = 0;
    }

    pub fn is_set(&self, bit: u64) -> bool {
        self.words
            .get((bit / 64) as usize)
            .is_some_and(|w| w & (1 << (bit % 64)) != 0)
    }

    /// The next set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        let mut w = (from / 64) as usize;
        let mut mask = u64::MAX << (from % 64);
        while w < self.words.len() {
            let v = self.words[w] & mask;
            if v != 0 {
                return Some(w as u64 * 64 + u64::from(v.trailing_zeros()));
            }
            w += 1;
            mask = u64::MAX;
        }
        None
    }

    pub fn dirty_bits(&self) -> u64 {
        self.dirty_bits
    }

    /// Bytes of data the set bits cover (the last region may be short).
    pub fn dirty_bytes(&self) -> u64 {
        let mut total = self.dirty_bits * self.granularity;
        let Some(last) = self.size.div_ceil(self.granularity).checked_sub(1) else {
            return 0;
        };
        if self.is_set(last) {
            total -= last * self.granularity + self.granularity - self.size;
        }
        total
    }

    /// Merges another bitmap (a peer's, at connect).
    pub fn merge(&mut self, other: &Bitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
        self.dirty_bits = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_counts() {
        let mut b = Bitmap::new(10 * 4096 + 100, 4096);
        b.set_range(4095, 2);
        assert_eq!(b.dirty_bits(), 2);
        assert!(b.is_set(0) && b.is_set(1) && !b.is_set(2));
        b.set_range(10 * 4096, 50);
        assert_eq!(b.dirty_bytes(), 2 * 4096 + 100);
        b.set_range(0, 1 << 40); // clipped at the device end
        assert_eq!(b.dirty_bits(), 11);
        assert_eq!(b.next_set(3), Some(3));
        b.clear_bit(3);
        assert_eq!(b.next_set(3), Some(4));
        b.set_range(0, 0);
        assert_eq!(b.dirty_bits(), 10);
    }

    #[test]
    fn persist_round_trip_ignores_bits_past_end() {
        let mut b = Bitmap::new(100 * 4096, 4096);
        b.set_range(5 * 4096, 3 * 4096);
        b.set_range(99 * 4096, 1);
        let mut bytes = b.to_bytes();
        assert_eq!(Bitmap::from_bytes(100 * 4096, 4096, &bytes), b);
        // Garbage beyond the device's bits is masked off.
        bytes[15] = 0xff;
        let c = Bitmap::from_bytes(100 * 4096, 4096, &bytes);
        assert_eq!(c.dirty_bits(), 4);
        assert_eq!(Bitmap::from_bytes(100 * 4096, 4096, &[]).dirty_bits(), 0);
    }

    #[test]
    fn next_set_scans_words() {
        let mut b = Bitmap::new(1 << 30, 4096);
        assert_eq!(b.next_set(0), None);
        b.set_range(200_000 * 4096, 1);
        assert_eq!(b.next_set(0), Some(200_000));
        assert_eq!(b.next_set(200_001), None);
        let mut c = Bitmap::new(1 << 30, 4096);
        c.set_range(7 * 4096, 1);
        b.merge(&c);
        assert_eq!(b.dirty_bits(), 2);
    }
}
