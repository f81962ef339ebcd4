//! The activity log: which 4 MiB extents of the device may have writes in flight.
//!
//! Before a write touches an extent that is not hot, the extent is added and the log is
//! written durably to the metadata area, so after a crash of a primary exactly the hot extents
//! are treated as out of sync, never the whole device. An extent stays hot while any write in
//! it is unfinished (until the peer acknowledged it as the protocol says), and goes cold in
//! least-recently-used order once the log is over its capacity, but only once the peer has
//! made its last write durable: after a crash of both nodes the primary resyncs hot extents
//! only, so a cold extent must hold the same bytes on both disks. Pure logic plus the on-disk
//! encoding; the caller does the I/O.

use std::collections::{HashMap, VecDeque};

/// Bytes per extent (DRBD's AL extent size).
pub const EXTENT: u64 = 4 << 20;
const MAGIC: u32 = 0x414c_4f47; // "ALOG"

pub struct ActivityLog {
    capacity: usize,
    /// Hot extents, least recently touched first.
    lru: VecDeque<u32>,
    /// Hot extent → (unfinished writes in it, sequence of its last finished write).
    hot: HashMap<u32, (u32, u64)>,
    /// Extents that went cold so far (the caller compares before and after a `begin`).
    pub evicted: u64,
}

/// The extents `[offset, offset+len)` touches.
pub fn extents(offset: u64, len: u64) -> std::ops::RangeInclusive<u32> {
    let first = (offset / EXTENT) as u32;
    let last = ((offset + len.max(1) - 1) / EXTENT) as u32;
    first..=last
}

impl ActivityLog {
    pub fn new(capacity: usize) -> Self {
        ActivityLog {
            capacity: capacity.max(1),
            lru: VecDeque::new(),
            hot: HashMap::new(),
            evicted: 0,
        }
    }

    /// Starts a write to the range; the peer is durable through sequence `durable` (u64::MAX
    /// when the bitmap covers everything instead). Returns true when the log changed (it must
    /// be persisted before the write goes ahead).
    pub fn begin(&mut self, offset: u64, len: u64, durable: u64) -> bool {
        let mut changed = false;
        for e in extents(offset, len) {
            match self.hot.get_mut(&e) {
                Some((n, _)) => {
                    *n += 1;
                    // Move to the most recent end (the log is small; a linear scan is fine).
                    if let Some(i) = self.lru.iter().position(|&x| x == e) {
                        self.lru.remove(i);
                    }
                    self.lru.push_back(e);
                }
                None => {
                    self.hot.insert(e, (1, 0));
                    self.lru.push_back(e);
                    changed = true;
                }
            }
        }
        // Also trim back to capacity once a burst (mkfs discarding everything) is over, so
        // the log on disk does not keep extents hot for ever.
        if changed || self.lru.len() > self.capacity {
            changed |= self.trim(durable);
        }
        changed
    }

    /// The write `seq` to the range finished (locally and as far as the protocol waits for the
    /// peer).
    pub fn end(&mut self, offset: u64, len: u64, seq: u64) {
        for e in extents(offset, len) {
            if let Some((n, last)) = self.hot.get_mut(&e) {
                *n = n.saturating_sub(1);
                *last = (*last).max(seq);
            }
        }
    }

    /// Drops idle extents whose last write the peer made durable (through `durable`), oldest
    /// first, while over capacity. Returns whether any went. Busy extents and extents the peer
    /// may still lose are kept, so the log may exceed its capacity for a while.
    pub fn trim(&mut self, durable: u64) -> bool {
        let before = self.lru.len();
        self.evict(durable);
        self.lru.len() != before
    }

    /// Idle extents kept over capacity only because the peer has not made their last write
    /// durable: a flush in the stream would let them go.
    pub fn held_for_peer(&self, durable: u64) -> usize {
        if self.lru.len() <= self.capacity {
            return 0;
        }
        self.hot
            .values()
            .filter(|(n, last)| *n == 0 && *last > durable)
            .count()
    }

    /// Extents over the capacity.
    pub fn overshoot(&self) -> usize {
        self.lru.len().saturating_sub(self.capacity)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn evict(&mut self, durable: u64) {
        let mut i = 0;
        while self.lru.len() > self.capacity && i < self.lru.len() {
            let e = self.lru[i];
            let (n, last) = self.hot.get(&e).copied().unwrap_or((0, 0));
            if n == 0 && last <= durable {
                self.lru.remove(i);
                self.hot.remove(&e);
                self.evicted += 1;
            } else {
                i += 1;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.lru.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lru.is_empty()
    }

    pub fn is_hot(&self, e: u32) -> bool {
        self.hot.contains_key(&e)
    }

    /// The on-disk form: magic, count, extents, crc32c; `None` if it does not fit `area`.
    pub fn encode(&self, area: usize) -> Option<Vec<u8>> {
        let mut b = Vec::with_capacity(12 + 4 * self.lru.len());
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&(self.lru.len() as u32).to_le_bytes());
        for e in &self.lru {
            b.extend_from_slice(&e.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        (b.len() <= area).then_some(b)
    }

    /// Reads the extents back; an empty list for anything invalid (a fresh or torn area).
    pub fn decode(b: &[u8]) -> Vec<u32> {
        let word = |i: usize| -> Option<u32> {
            b.get(i..i + 4)
                .and_then(|s| s.try_into().ok())
                .map(u32::from_le_bytes)
        };
        if word(0) != Some(MAGIC) {
            return Vec::new();
        }
        let Some(n) = word(4).map(|n| n as usize) else {
            return Vec::new();
        };
        let end = 8 + 4 * n;
        let Some(body) = b.get(..end) else {
            return Vec::new();
        };
        if word(end) != Some(crc32c::crc32c(body)) {
            return Vec::new();
        }
        (0..n).filter_map(|i| word(8 + 4 * i)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_extents_change_the_log() {
        let mut al = ActivityLog::new(4);
        assert!(al.begin(0, 4096, u64::MAX));
        assert!(
            !al.begin(4096, 4096, u64::MAX),
            "same extent: no persist needed"
        );
        // A write across an extent boundary touches two.
        assert!(al.begin(EXTENT - 10, 20, u64::MAX));
        assert!(al.is_hot(0) && al.is_hot(1));
        assert_eq!(al.len(), 2);
    }

    #[test]
    fn busy_extents_are_never_evicted() {
        let mut al = ActivityLog::new(2);
        al.begin(0, 1, u64::MAX); // extent 0, busy
        al.begin(EXTENT, 1, u64::MAX); // extent 1, busy
        al.begin(2 * EXTENT, 1, u64::MAX); // extent 2: over capacity, but 0 and 1 are busy
        assert_eq!(al.len(), 3);
        al.end(0, 1, 1);
        al.begin(3 * EXTENT, 1, u64::MAX); // now 0 is idle and oldest: evicted
        assert!(!al.is_hot(0));
        assert!(al.is_hot(1) && al.is_hot(2) && al.is_hot(3));
    }

    #[test]
    fn an_extent_goes_cold_only_once_the_peer_is_durable_past_its_last_write() {
        let mut al = ActivityLog::new(2);
        al.begin(0, 1, 0);
        al.end(0, 1, 10);
        al.begin(EXTENT, 1, 0);
        al.end(EXTENT, 1, 11);
        // Over capacity, extent 0 idle, but the peer is durable only through 9.
        al.begin(2 * EXTENT, 1, 9);
        assert!(al.is_hot(0), "evicted before the peer made seq 10 durable");
        assert_eq!(al.overshoot(), 1);
        assert_eq!(al.held_for_peer(9), 2);
        // Durable through 10: 0 can go, 1 cannot yet.
        assert!(al.trim(10));
        assert!(!al.is_hot(0) && al.is_hot(1) && al.is_hot(2));
        assert_eq!(al.overshoot(), 0);
        assert_eq!(al.held_for_peer(10), 0);
    }

    #[test]
    fn lru_order() {
        let mut al = ActivityLog::new(2);
        for e in 0..2u64 {
            al.begin(e * EXTENT, 1, u64::MAX);
            al.end(e * EXTENT, 1, 1);
        }
        // Touch 0 again, so 1 is the least recent.
        al.begin(0, 1, u64::MAX);
        al.end(0, 1, 1);
        al.begin(2 * EXTENT, 1, u64::MAX);
        assert!(al.is_hot(0) && !al.is_hot(1) && al.is_hot(2));
    }

    #[test]
    fn encode_decode() {
        let mut al = ActivityLog::new(100);
        for e in [5u64, 9, 2] {
            al.begin(e * EXTENT, 1, u64::MAX);
        }
        let b = al.encode(64 * 1024).unwrap();
        assert_eq!(ActivityLog::decode(&b), vec![5, 9, 2]);
        let mut bad = b.clone();
        bad[9] ^= 1;
        assert!(ActivityLog::decode(&bad).is_empty());
        assert!(ActivityLog::decode(&[0u8; 64]).is_empty());
        assert!(ActivityLog::decode(&b[..5]).is_empty());
        // A huge count does not panic or allocate.
        let mut huge = b.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(ActivityLog::decode(&huge).is_empty());
        assert!(al.encode(8).is_none());
    }
}
