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
    /// Hot extent → (unfinished writes in it, sequence of its last finished write, the
    /// version of the log that first named it this time, the cooling round it was last
    /// touched in).
    hot: HashMap<u32, (u32, u64, u64, u64)>,
    /// The cooling round (see [`Self::cool`]).
    round: u64,
    /// Extents that went cold so far (the caller compares before and after a `begin`).
    pub evicted: u64,
    /// Raised at every change: a log written at version `v` names every extent a `begin`
    /// that returned `v` or less needs.
    version: u64,
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
            version: 0,
            round: 0,
        }
    }

    /// The version of the log as it is now (see [`Self::begin`]).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Starts a write to the range; the peer is durable through sequence `durable` (u64::MAX
    /// when the bitmap covers everything instead). Returns the version of the log that must
    /// be durable before the write goes ahead: the one that first named the newest of its
    /// extents. A write to an extent that another write just made hot waits for that log too,
    /// not only a write that changes the log itself.
    pub fn begin(&mut self, offset: u64, len: u64, durable: u64) -> u64 {
        let next = self.version + 1;
        let mut changed = false;
        let mut needed = 0;
        for e in extents(offset, len) {
            match self.hot.get_mut(&e) {
                Some((n, _, since, touched)) => {
                    *n += 1;
                    *touched = self.round;
                    needed = needed.max(*since);
                    // Move to the most recent end (the log is small; a linear scan is fine).
                    if let Some(i) = self.lru.iter().position(|&x| x == e) {
                        self.lru.remove(i);
                    }
                    self.lru.push_back(e);
                }
                None => {
                    self.hot.insert(e, (1, 0, next, self.round));
                    self.lru.push_back(e);
                    changed = true;
                    needed = next;
                }
            }
        }
        // Also trim back to capacity once a burst (mkfs discarding everything) is over, so
        // the log on disk does not keep extents hot for ever.
        if changed || self.lru.len() > self.capacity {
            let before = self.lru.len();
            self.evict(durable);
            changed |= self.lru.len() != before;
        }
        if changed {
            self.version = next;
        }
        needed
    }

    /// The write `seq` to the range finished (locally and as far as the protocol waits for the
    /// peer).
    pub fn end(&mut self, offset: u64, len: u64, seq: u64) {
        for e in extents(offset, len) {
            if let Some((n, last, _, _)) = self.hot.get_mut(&e) {
                *n = n.saturating_sub(1);
                *last = (*last).max(seq);
            }
        }
    }

    /// Drops idle extents whose last write the peer made durable (through `durable`), oldest
    /// first, while over capacity. Returns whether any went. Busy extents and extents the peer
    /// may still lose are kept, so the log may exceed its capacity for a while. No write
    /// waits for the shorter log (a longer one on disk only names more).
    pub fn trim(&mut self, durable: u64) -> bool {
        let before = self.lru.len();
        self.evict(durable);
        let changed = self.lru.len() != before;
        if changed {
            self.version += 1;
        }
        changed
    }

    /// Ends a cooling round: drops the extents no write touched during it that are idle and
    /// whose last write the peer made durable (through `durable`), whatever the capacity.
    /// Returns whether any went. Called every few seconds (see
    /// `Replication::cool_activity_log`): on a device smaller than the log's capacity nothing
    /// else ever lets an extent go cold, and a crash of the primary would then resync every
    /// extent written since `up`, a full copy at worst (DRBD's log behaves so too). A
    /// working set that moves on costs one log write per round.
    pub fn cool(&mut self, durable: u64) -> bool {
        let round = self.round;
        self.round += 1;
        let before = self.lru.len();
        let hot = &mut self.hot;
        self.lru.retain(|e| {
            let (n, last, _, touched) = hot.get(e).copied().unwrap_or((0, 0, 0, 0));
            let cold = n == 0 && last <= durable && touched < round;
            if cold {
                hot.remove(e);
            }
            !cold
        });
        let went = (before - self.lru.len()) as u64;
        self.evicted += went;
        if went > 0 {
            self.version += 1;
        }
        went > 0
    }

    /// After a cooling round: the extents idle for the whole round that it kept only because
    /// the peer has not made their last write durable (through `durable`); the caller asks
    /// for a checkpoint in the stream, so that the next round lets them go. Extents written
    /// during the round do not count: a busy working set asks for nothing.
    pub fn idle_not_durable(&self, durable: u64) -> usize {
        let ended = self.round.saturating_sub(1);
        self.hot
            .values()
            .filter(|(n, last, _, touched)| *n == 0 && *last > durable && *touched < ended)
            .count()
    }

    /// Idle extents kept over capacity only because the peer has not made their last write
    /// durable: a checkpoint in the stream would let them go.
    pub fn held_for_peer(&self, durable: u64) -> usize {
        if self.lru.len() <= self.capacity {
            return 0;
        }
        self.hot
            .values()
            .filter(|(n, last, _, _)| *n == 0 && *last > durable)
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
            let (n, last, _, _) = self.hot.get(&e).copied().unwrap_or((0, 0, 0, 0));
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

    /// The on-disk form of one slot: magic, write number, count, extents, crc32c. The area
    /// holds two slots written alternately (by write number), so a write torn by a crash
    /// leaves the other slot, the previous log, intact: that one names every extent with a
    /// write in flight, since a newly hot extent is written to only once its log is durable.
    /// A log too long for a slot is written as "all extents" (a crash then resyncs the
    /// whole device rather than miss one).
    pub fn encode(&self, slot_len: usize, write_no: u64) -> Vec<u8> {
        let fits = SLOT_HEADER + 4 * self.lru.len() + 4 <= slot_len;
        let mut b = Vec::with_capacity(if fits { slot_len } else { SLOT_HEADER + 4 });
        b.extend_from_slice(&MAGIC_SLOT.to_le_bytes());
        b.extend_from_slice(&write_no.to_le_bytes());
        if fits {
            b.extend_from_slice(&(self.lru.len() as u32).to_le_bytes());
            for e in &self.lru {
                b.extend_from_slice(&e.to_le_bytes());
            }
        } else {
            b.extend_from_slice(&ALL.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Where write number `write_no` goes in an area of `area_len` bytes, and the slot's size.
    pub fn slot(write_no: u64, area_len: u64) -> (u64, usize) {
        let half = area_len / 2;
        ((write_no % 2) * half, half as usize)
    }

    /// Reads the log back from the whole area: the valid slot with the highest write number,
    /// and that number. An area that was never written names no extent; one that holds no
    /// valid slot (both torn, or garbage) names all of them.
    pub fn decode(area: &[u8]) -> (OnDisk, u64) {
        let half = area.len() / 2;
        let slots: Vec<_> = [&area[..half], &area[half..]]
            .into_iter()
            .filter_map(parse_slot)
            .collect();
        // Write numbers go on from the newest slot's: one at the bound (no real history gets
        // there) would wrap, or panic, at the next write. Such a log is not trusted (every
        // extent), and numbering goes on from the other slot's, so that no later write looks
        // older than that stale slot.
        if slots.iter().any(|(n, _)| *n >= crate::meta::COUNTER_LIMIT) {
            let valid = slots
                .iter()
                .map(|(n, _)| *n)
                .filter(|&n| n < crate::meta::COUNTER_LIMIT)
                .max();
            return (OnDisk::All, valid.unwrap_or(0));
        }
        let best = slots.into_iter().max_by_key(|(n, _)| *n);
        match best {
            Some((n, log)) => (log, n),
            None => match parse_v1(area) {
                Some(v) => (OnDisk::Extents(v), 0),
                None if area.iter().all(|&b| b == 0) => (OnDisk::Extents(Vec::new()), 0),
                None => (OnDisk::All, 0),
            },
        }
    }
}

/// What the activity log on disk says was hot at a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnDisk {
    Extents(Vec<u32>),
    /// Every extent: the log was too long for its slot, or unreadable.
    All,
}

const MAGIC_SLOT: u32 = 0x3230_4c41; // "AL02"
const SLOT_HEADER: usize = 16;
/// The count that stands for "every extent".
const ALL: u32 = u32::MAX;

fn word(b: &[u8], i: usize) -> Option<u32> {
    b.get(i..i.checked_add(4)?)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
}

/// One slot: (write number, log), or `None` if it is not a valid slot.
fn parse_slot(b: &[u8]) -> Option<(u64, OnDisk)> {
    if word(b, 0)? != MAGIC_SLOT {
        return None;
    }
    let n = u64::from(word(b, 4)?) | (u64::from(word(b, 8)?) << 32);
    let count = word(b, 12)?;
    let body_len = if count == ALL {
        SLOT_HEADER
    } else {
        SLOT_HEADER.checked_add(4usize.checked_mul(count as usize)?)?
    };
    let body = b.get(..body_len)?;
    if word(b, body_len)? != crc32c::crc32c(body) {
        return None;
    }
    if count == ALL {
        return Some((n, OnDisk::All));
    }
    let v = (0..count as usize)
        .filter_map(|i| word(b, SLOT_HEADER + 4 * i))
        .collect();
    Some((n, OnDisk::Extents(v)))
}

/// The single-slot format of earlier versions (magic, count, extents, crc32c at offset 0).
fn parse_v1(b: &[u8]) -> Option<Vec<u32>> {
    if word(b, 0)? != MAGIC {
        return None;
    }
    let n = word(b, 4)? as usize;
    let end = 8usize.checked_add(n.checked_mul(4)?)?;
    let body = b.get(..end)?;
    if word(b, end)? != crc32c::crc32c(body) {
        return None;
    }
    Some((0..n).filter_map(|i| word(b, 8 + 4 * i)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_extents_change_the_log() {
        let mut al = ActivityLog::new(4);
        assert_eq!(al.begin(0, 4096, u64::MAX), 1);
        assert_eq!(al.version(), 1);
        assert_eq!(
            al.begin(4096, 4096, u64::MAX),
            1,
            "same extent: the log that named it, nothing newer"
        );
        assert_eq!(al.version(), 1, "same extent: the log did not change");
        // A write across an extent boundary touches two.
        assert_eq!(al.begin(EXTENT - 10, 20, u64::MAX), 2);
        assert!(al.is_hot(0) && al.is_hot(1));
        assert_eq!(al.len(), 2);
    }

    /// A second write to an extent the first one just made hot needs the log that names it,
    /// although it changes nothing itself (a review found such a write going ahead while the
    /// first waited, before any log naming the extent was on disk).
    #[test]
    fn a_write_to_a_newly_hot_extent_needs_the_log_that_named_it() {
        let mut al = ActivityLog::new(4);
        al.begin(0, 1, u64::MAX);
        al.end(0, 1, 1);
        // Extent 0's log is version 1; now extent 1 goes hot at version 2.
        assert_eq!(al.begin(EXTENT, 1, u64::MAX), 2);
        assert_eq!(
            al.begin(EXTENT + 8, 1, u64::MAX),
            2,
            "the second write to it"
        );
        assert_eq!(al.begin(0, 1, u64::MAX), 1, "extent 0 was named earlier");
        // Across both: the newer of the two.
        assert_eq!(al.begin(EXTENT - 1, 2, u64::MAX), 2);
        // A trim changes the version, but no write waits for it.
        let mut small = ActivityLog::new(1);
        small.begin(0, 1, 0);
        small.end(0, 1, 5);
        assert_eq!(small.begin(EXTENT, 1, 0), 2, "extent 0 held for the peer");
        assert!(small.trim(5));
        assert_eq!(small.version(), 3);
        assert_eq!(small.begin(EXTENT, 1, 5), 2);
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
    fn cooling_drops_extents_idle_for_a_whole_round_once_the_peer_is_durable() {
        let mut al = ActivityLog::new(100);
        al.begin(0, 4096, 0); // extent 0
        al.end(0, 4096, 1);
        al.begin(EXTENT, 4096, 0); // extent 1, still in flight
                                   // Touched in the round that ends now: kept.
        assert!(!al.cool(10));
        al.begin(2 * EXTENT, 4096, 0); // extent 2, touched in the next round
        al.end(2 * EXTENT, 4096, 2);
        let v = al.version();
        // Extent 0 was idle a whole round and is durable on the peer: it goes; extent 1 is
        // busy, extent 2 was touched this round.
        assert!(al.cool(10));
        assert!(!al.is_hot(0) && al.is_hot(1) && al.is_hot(2));
        assert!(al.version() > v);
        // Extent 2 idle for a round, but the peer is not durable past its write yet.
        assert!(!al.cool(1));
        assert!(al.is_hot(2));
        assert!(al.cool(2));
        assert!(!al.is_hot(2));
        // Kept for the peer: counted as waiting only once idle for a whole round.
        al.begin(3 * EXTENT, 4096, 0);
        al.end(3 * EXTENT, 4096, 20);
        assert!(!al.cool(10));
        assert_eq!(al.idle_not_durable(10), 0, "written during the round");
        assert!(!al.cool(10));
        assert_eq!(al.idle_not_durable(10), 1);
        assert!(al.cool(20));
        // The long write ends: idle and durable, its extent goes at the next round.
        al.end(EXTENT, 4096, 3);
        assert!(al.cool(10));
        assert!(al.is_empty());
        assert_eq!(al.evicted, 4);
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
    fn encode_decode_two_slots() {
        const AREA: usize = 64 * 1024;
        let mut al = ActivityLog::new(100);
        for e in [5u64, 9, 2] {
            al.begin(e * EXTENT, 1, u64::MAX);
        }
        let mut area = vec![0u8; AREA];
        // Never written: nothing hot.
        assert_eq!(ActivityLog::decode(&area), (OnDisk::Extents(vec![]), 0));
        let put = |area: &mut Vec<u8>, al: &ActivityLog, n: u64| {
            let (off, len) = ActivityLog::slot(n, AREA as u64);
            let b = al.encode(len, n);
            area[off as usize..off as usize + b.len()].copy_from_slice(&b);
        };
        put(&mut area, &al, 1);
        assert_eq!(
            ActivityLog::decode(&area),
            (OnDisk::Extents(vec![5, 9, 2]), 1)
        );
        al.begin(7 * EXTENT, 1, u64::MAX);
        put(&mut area, &al, 2);
        assert_eq!(
            ActivityLog::decode(&area),
            (OnDisk::Extents(vec![5, 9, 2, 7]), 2)
        );
        // Write 3 (slot 1 again) torn: write 2 in the other slot is still there.
        al.begin(11 * EXTENT, 1, u64::MAX);
        put(&mut area, &al, 3);
        let (off, _) = ActivityLog::slot(3, AREA as u64);
        area[off as usize + 20] ^= 0xff;
        assert_eq!(
            ActivityLog::decode(&area),
            (OnDisk::Extents(vec![5, 9, 2, 7]), 2)
        );
        // Both slots unreadable: every extent.
        let (off2, _) = ActivityLog::slot(2, AREA as u64);
        area[off2 as usize + 20] ^= 0xff;
        assert_eq!(ActivityLog::decode(&area).0, OnDisk::All);
        // A log too long for its slot is written as "all".
        let mut small = vec![0u8; 64];
        let b = al.encode(32, 4);
        small[..b.len()].copy_from_slice(&b);
        assert_eq!(ActivityLog::decode(&small), (OnDisk::All, 4));
        // A huge count neither panics nor allocates: it is just invalid.
        let mut huge = vec![0u8; AREA];
        let b = al.encode(AREA / 2, 9);
        huge[..b.len()].copy_from_slice(&b);
        huge[12..16].copy_from_slice(&(u32::MAX - 1).to_le_bytes());
        assert_eq!(ActivityLog::decode(&huge).0, OnDisk::All);
        // A write number at the counters' bound (a valid crc) is not trusted either, and the
        // next write number starts over rather than wrapping.
        // Numbering goes on from the other slot's valid write (2, in the even half).
        let mut far = vec![0u8; AREA];
        put(&mut far, &al, 2);
        let (off, len) = ActivityLog::slot(crate::meta::COUNTER_LIMIT + 1, AREA as u64);
        let b = al.encode(len, crate::meta::COUNTER_LIMIT + 1);
        far[off as usize..off as usize + b.len()].copy_from_slice(&b);
        assert_eq!(ActivityLog::decode(&far), (OnDisk::All, 2));
        // Write 3 replaces the bad slot, and is the newest.
        put(&mut far, &al, 3);
        assert_eq!(ActivityLog::decode(&far).1, 3);
    }

    #[test]
    fn the_earlier_single_slot_format_is_still_read() {
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(&8u32.to_le_bytes());
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        let mut area = vec![0u8; 64 * 1024];
        area[..b.len()].copy_from_slice(&b);
        assert_eq!(ActivityLog::decode(&area), (OnDisk::Extents(vec![4, 8]), 0));
    }
}
