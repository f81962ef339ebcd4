//! The dirty bitmap: one bit per `granularity` bytes of data that the peer may lack.
//!
//! Set for writes the peer has not acknowledged when the journal cannot carry them (peer away
//! too long, journal overflowed); cleared when a resync or an acknowledgement proves the peer
//! has the region. Persisted in the metadata's bitmap area.

#[derive(Debug, Clone)]
pub struct Bitmap {
    words: Vec<u64>,
    granularity: u64,
    size: u64,
    dirty_bits: u64,
    /// One bit per 4 KiB page of the on-disk image whose words changed since the image was
    /// last taken (see [`Self::take_changed`]): a node away for days rewrites the pages its
    /// new writes touched, not a bitmap of up to 32 MiB every second.
    changed: Vec<u64>,
}

/// Words per 4 KiB page of the on-disk image.
const PAGE_WORDS: usize = 512;

/// Equal bits; which pages are still to be written is not part of the value.
impl PartialEq for Bitmap {
    fn eq(&self, o: &Self) -> bool {
        (
            self.words.as_slice(),
            self.granularity,
            self.size,
            self.dirty_bits,
        ) == (o.words.as_slice(), o.granularity, o.size, o.dirty_bits)
    }
}
impl Eq for Bitmap {}

impl Bitmap {
    /// Every page counts as changed at first: the first image taken is the whole bitmap.
    pub fn new(size: u64, granularity: u64) -> Self {
        assert!(granularity.is_power_of_two());
        let bits = size.div_ceil(granularity);
        let words = bits.div_ceil(64) as usize;
        let pages = words.div_ceil(PAGE_WORDS);
        Bitmap {
            words: vec![0; words],
            granularity,
            size,
            dirty_bits: 0,
            changed: vec![u64::MAX; pages.div_ceil(64)],
        }
    }

    fn touch(&mut self, word: usize) {
        let page = word / PAGE_WORDS;
        if let Some(c) = self.changed.get_mut(page / 64) {
            *c |= 1 << (page % 64);
        }
    }

    /// Every page is to be written again (an image taken and then not written).
    pub fn rewrite_all(&mut self) {
        self.changed.iter_mut().for_each(|c| *c = u64::MAX);
    }

    /// The pages changed since the last call, as (byte offset in the on-disk image, bytes),
    /// each at most 4 KiB; they count as written from here (see [`Self::rewrite_all`]).
    pub fn take_changed(&mut self) -> Vec<(u64, Vec<u8>)> {
        let pages = self.words.len().div_ceil(PAGE_WORDS);
        let mut out = Vec::new();
        for page in 0..pages {
            let (i, m) = (page / 64, 1u64 << (page % 64));
            if self.changed[i] & m == 0 {
                continue;
            }
            self.changed[i] &= !m;
            let words =
                &self.words[page * PAGE_WORDS..((page + 1) * PAGE_WORDS).min(self.words.len())];
            let bytes = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            out.push(((page * PAGE_WORDS * 8) as u64, bytes));
        }
        out
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

    /// A bitmap of `size` and `granularity` with these words (as [`Self::words`] gives them,
    /// the peer's over the link); words past the device, and bits past it in the last word,
    /// are dropped, missing words are clear.
    pub fn from_words(size: u64, granularity: u64, mut words: Vec<u64>) -> Self {
        let mut b = Self::new(size, granularity);
        words.resize(b.words.len(), 0);
        let nbits = size.div_ceil(granularity);
        if nbits % 64 != 0 {
            if let Some(last) = words.last_mut() {
                *last &= u64::MAX >> (64 - nbits % 64);
            }
        }
        b.dirty_bits = words.iter().map(|w| u64::from(w.count_ones())).sum();
        b.words = words;
        b
    }

    /// The bits, 64 regions a word, the first region in the lowest bit of the first word.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Marks every region touched by `[offset, offset+len)`, a word at a time. Returns
    /// whether any bit was not set before.
    pub fn set_range(&mut self, offset: u64, len: u64) -> bool {
        if len == 0 || offset >= self.size {
            return false;
        }
        let end = (offset + len).min(self.size);
        let first = offset / self.granularity;
        let last = (end - 1) / self.granularity;
        let mut changed = false;
        for w in (first / 64) as usize..=(last / 64) as usize {
            let lo = (w as u64 * 64).max(first) % 64;
            let hi = (w as u64 * 64 + 63).min(last) % 64;
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            let new = mask & !self.words[w];
            if new != 0 {
                self.words[w] |= new;
                self.dirty_bits += u64::from(new.count_ones());
                self.touch(w);
                changed = true;
            }
        }
        changed
    }

    pub fn clear_bit(&mut self, bit: u64) {
        let w = (bit / 64) as usize;
        let m = 1u64 << (bit % 64);
        if let Some(word) = self.words.get_mut(w) {
            if *word & m != 0 {
                *word &= !m;
                self.dirty_bits -= 1;
                self.touch(w);
            }
        }
    }

    pub fn clear_all(&mut self) {
        for w in 0..self.words.len() {
            if self.words[w] != 0 {
                self.words[w] = 0;
                self.touch(w);
            }
        }
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
        for w in 0..self.words.len().min(other.words.len()) {
            let new = other.words[w] & !self.words[w];
            if new != 0 {
                self.words[w] |= new;
                self.touch(w);
            }
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

    /// Word-at-a-time marking agrees with marking bit by bit, and only the pages whose
    /// words changed are taken for writing, each holding what the whole image holds there.
    #[test]
    fn ranges_marked_by_words_and_only_changed_pages_are_written() {
        let size = 3 * 512 * 64 * 4096 + 5 * 4096; // three full pages and a short one
        let mut b = Bitmap::new(size, 4096);
        let whole = b.take_changed();
        assert_eq!(whole.len(), 4, "at first every page is written");
        assert!(b.take_changed().is_empty());
        for (off, len) in [
            (0, 1),
            (4095, 4098),
            (63 * 4096, 3 * 4096),
            (100 * 4096, 70 * 4096),
        ] {
            let mut by_bit = vec![false; (size / 4096) as usize];
            for (i, bit) in by_bit.iter_mut().enumerate() {
                let (s, e) = (i as u64 * 4096, i as u64 * 4096 + 4096);
                *bit = s < off + len && e > off;
            }
            let mut c = Bitmap::new(size, 4096);
            assert!(c.set_range(off, len));
            assert!(!c.set_range(off, len), "nothing new the second time");
            for (i, &want) in by_bit.iter().enumerate() {
                assert_eq!(c.is_set(i as u64), want, "bit {i} of ({off}, {len})");
            }
            assert_eq!(c.dirty_bits(), by_bit.iter().filter(|&&x| x).count() as u64);
        }
        // A bit in the third page: only that page is written, and it is the image's.
        b.set_range(2 * 512 * 64 * 4096 + 7 * 4096, 1);
        let pages = b.take_changed();
        assert_eq!(pages.len(), 1);
        let (off, bytes) = &pages[0];
        let image = b.to_bytes();
        assert_eq!(*off, 2 * 4096);
        assert_eq!(
            &image[*off as usize..*off as usize + bytes.len()],
            &bytes[..]
        );
        // The short last page is short.
        b.set_range(size - 1, 1);
        let pages = b.take_changed();
        assert_eq!(pages.len(), 1);
        assert_eq!(pages[0].0 + pages[0].1.len() as u64, image.len() as u64);
        b.clear_bit(0);
        assert!(
            b.take_changed().is_empty(),
            "clearing a clear bit changes nothing"
        );
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

    #[test]
    fn from_words_drops_words_and_bits_past_the_device() {
        // 200 regions: four words, 8 bits used in the last.
        let (size, g) = (200 * 4096, 4096);
        let mut words = vec![0u64, 1 << 5, 0, u64::MAX, u64::MAX];
        let b = Bitmap::from_words(size, g, words.clone());
        assert_eq!(b.words(), &[0, 1 << 5, 0, 0xff]);
        assert_eq!(b.dirty_bits(), 9);
        // Missing words are clear.
        words.truncate(2);
        let b = Bitmap::from_words(size, g, words);
        assert_eq!(b.words(), &[0, 1 << 5, 0, 0]);
        assert_eq!(b.dirty_bits(), 1);
    }
}
