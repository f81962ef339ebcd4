//! The write journal: a bounded ring of stream records (peer frames) in the metadata area,
//! mirrored in memory.
//!
//! Every replicated write is appended here before it is acknowledged; the sender streams the
//! records to the peer straight from the ring, a reconnect replays them from where the peer
//! stopped, and they are released once the peer has made them durable. On disk the ring is only
//! forced at flush points (like the data), and a checkpoint in the superblock says where the
//! oldest record starts, so a restarted primary finds every record a flush covered.

use std::collections::VecDeque;
use std::ptr::NonNull;
use std::sync::Arc;

use proto::peer::{self, Msg, PREFIX_LEN};

/// One record in the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rec {
    pub seq: u64,
    /// The issuer's term ([`Msg::term`]): with `seq`, the record's identity.
    pub term: u64,
    /// Logical position (monotonic; the physical offset is `pos % cap`).
    pub pos: u64,
    pub len: u32,
    /// Payload bytes (for lag accounting).
    pub data: u32,
    /// The data range the record vouches for on the peer: written, zeroed or (a checksum
    /// resync's `Equal`) found identical there. Until the peer made the record durable, this
    /// range goes to the bitmap if the link drops (`start == end` for a flush).
    pub range: (u64, u64),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    /// Not enough free space now; `need` bytes.
    #[error("the journal is full: the record needs {need} bytes the peer has not released")]
    Full { need: u64 },
    /// The record can never fit.
    #[error("the record is larger than half the journal")]
    TooBig,
    /// The journal dropped records (it overflowed): nothing more is appended to it until the
    /// peer has been brought back by a bitmap resync, or sequences would have a gap.
    #[error("the journal overflowed earlier")]
    Overflowed,
}

/// The ring's bytes, shared between the ring (under the replication lock) and at most one
/// [`Lease`], through which the sender writes a run of records to the socket without copying
/// them and without holding the lock.
///
/// Only raw pointers reach the allocation: a write into one range never borrows another, so
/// an append may fill free space while the lease reads its pinned range. The ring guarantees
/// that pinned bytes are never written (see [`Ring::append`]).
struct RingMem {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: RingMem is a plain heap allocation; the ring's pinning rule (never write a pinned
// range) is what makes concurrent access from the lease holder sound.
unsafe impl Send for RingMem {}
// SAFETY: as above.
unsafe impl Sync for RingMem {}

impl RingMem {
    fn new(image: Vec<u8>) -> Arc<Self> {
        let boxed = image.into_boxed_slice();
        let len = boxed.len();
        let ptr = NonNull::new(Box::into_raw(boxed) as *mut u8).unwrap_or(NonNull::dangling());
        Arc::new(RingMem { ptr, len })
    }

    /// SAFETY: nobody writes `[off, off + len)` while the slice lives.
    unsafe fn slice(&self, off: usize, len: usize) -> &[u8] {
        assert!(
            off <= self.len && len <= self.len - off,
            "ring range out of bounds"
        );
        std::slice::from_raw_parts(self.ptr.as_ptr().add(off), len)
    }

    /// SAFETY: nobody else reads or writes `[off, off + len)` while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(&self, off: usize, len: usize) -> &mut [u8] {
        assert!(
            off <= self.len && len <= self.len - off,
            "ring range out of bounds"
        );
        std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(off), len)
    }
}

impl Drop for RingMem {
    fn drop(&mut self) {
        // SAFETY: ptr/len came from Box::into_raw of a boxed slice of exactly this length
        // (an empty image never allocates: nothing to free).
        if self.len > 0 {
            unsafe {
                drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                    self.ptr.as_ptr(),
                    self.len,
                )))
            };
        }
    }
}

/// A zeroed buffer for a ring image of `len` bytes, with transparent huge pages asked for
/// before any of it is touched: every append and every send walks on to the next page of a
/// ring of tens of MiB, and with 4 KiB pages nearly each record costs a TLB miss. (A large
/// zeroed allocation is fresh anonymous memory, untouched until used; the advice covers its
/// whole 2 MiB units. A kernel that ignores it, THP off, changes nothing but speed.)
pub fn image_buffer(len: usize) -> Vec<u8> {
    const HUGE: usize = 2 << 20;
    let v = vec![0u8; len];
    let start = (v.as_ptr() as usize).next_multiple_of(HUGE);
    let end = (v.as_ptr() as usize + len) / HUGE * HUGE;
    if end > start {
        // SAFETY: [start, end) lies inside the buffer's allocation; MADV_HUGEPAGE changes no
        // contents.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
    v
}

/// A run of consecutive records the sender is writing to the peer, straight from the ring's
/// memory. While it lives the ring does not reuse those bytes; give it back with
/// [`Ring::unpin`].
pub struct Lease {
    mem: Arc<RingMem>,
    off: usize,
    len: usize,
    /// Sequence of the last record in the run.
    pub last_seq: u64,
}

impl Lease {
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the ring never writes a pinned range, and the range was pinned when the
        // lease was made (Ring::lease) until it is unpinned, which the holder does only
        // after it is done with the bytes.
        unsafe { self.mem.slice(self.off, self.len) }
    }
}

/// The ring's memory image and its index. Pure: no I/O.
///
/// Records up to `released` are no longer needed by the peer (it applied them): their space
/// may be reused, but they stay readable until it is, so a reconnect after a short outage can
/// still replay them.
pub struct Ring {
    mem: Arc<RingMem>,
    cap: u64,
    head: u64,
    recs: VecDeque<Rec>,
    released: u64,
    /// Logical position of the first byte a [`Lease`] is reading: no append reaches it.
    pinned: Option<u64>,
    /// `(seq, term)` of the record just before the oldest one kept (of the last one, when
    /// none is kept): a peer that applied up to it can be caught up from here. Term 0: not
    /// known (the ring was cleared after an overflow).
    prev: (u64, u64),
}

impl Ring {
    pub fn new(cap: u64) -> Self {
        assert!(cap >= 64 * 1024, "journal too small");
        Ring {
            mem: RingMem::new(image_buffer(cap as usize)),
            cap,
            head: 0,
            recs: VecDeque::new(),
            released: 0,
            pinned: None,
            prev: (0, 0),
        }
    }

    pub fn cap(&self) -> u64 {
        self.cap
    }
    pub fn head(&self) -> u64 {
        self.head
    }
    /// Oldest record still readable (released or not).
    pub fn first_seq(&self) -> Option<u64> {
        self.recs.front().map(|r| r.seq)
    }
    /// Oldest record the peer still needs.
    pub fn first_live_seq(&self) -> Option<u64> {
        self.live_index().map(|i| self.recs[i].seq)
    }
    fn live_index(&self) -> Option<usize> {
        let first = self.recs.front()?.seq;
        let i = usize::try_from((self.released + 1).saturating_sub(first)).ok()?;
        (i < self.recs.len()).then_some(i)
    }
    pub fn last_seq(&self) -> Option<u64> {
        self.recs.back().map(|r| r.seq)
    }
    /// Logical position of the oldest record the peer still needs (or head when none).
    pub fn tail(&self) -> u64 {
        self.live_index().map_or(self.head, |i| self.recs[i].pos)
    }
    /// Bytes the peer still needs.
    pub fn used(&self) -> u64 {
        self.head - self.tail()
    }
    pub fn len(&self) -> usize {
        self.recs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.recs.is_empty()
    }

    /// The term of this node's record `seq`, if the ring can tell: a kept record, or the one
    /// just before the oldest kept. Sequence 0 is the empty prefix every stream shares.
    pub fn term_at(&self, seq: u64) -> Option<u64> {
        if seq == 0 {
            return Some(0);
        }
        let t = match self.get(seq) {
            Some(r) => r.term,
            None if seq == self.prev.0 => self.prev.1,
            None => return None,
        };
        (t != 0).then_some(t)
    }

    /// `(seq, term)` of the record just before the oldest one kept.
    pub fn prev(&self) -> (u64, u64) {
        self.prev
    }

    /// The record with sequence `seq`, if still in the ring.
    pub fn get(&self, seq: u64) -> Option<Rec> {
        let first = self.recs.front()?.seq;
        let i = usize::try_from(seq.checked_sub(first)?).ok()?;
        self.recs.get(i).copied()
    }

    /// The frame bytes of a record.
    pub fn bytes(&self, r: &Rec) -> &[u8] {
        self.raw(r.pos % self.cap, r.pos % self.cap + u64::from(r.len))
    }

    /// Bytes no append may overwrite: what the peer still needs, and a lease's run.
    fn occupied(&self) -> u64 {
        let from = self.pinned.map_or(self.tail(), |p| p.min(self.tail()));
        self.head - from
    }

    /// Lends the sender the records from `from_seq` on that lie one after the other in memory
    /// (at least one, at most `max` bytes unless the first is larger), and pins them until
    /// [`Self::unpin`]. `None` when `from_seq` is not in the ring. One lease at a time.
    pub fn lease(&mut self, from_seq: u64, max: usize) -> Option<Lease> {
        assert!(self.pinned.is_none(), "one journal lease at a time");
        let first = self.get(from_seq)?;
        let mut end = first.pos + u64::from(first.len);
        let mut last_seq = first.seq;
        while let Some(r) = self.get(last_seq + 1) {
            // The end of the ring breaks the run: after a pad (`pos` jumps), and also when a
            // record ended exactly at the end (the next starts at physical 0, no pad).
            if r.pos != end
                || r.pos % self.cap == 0
                || end + u64::from(r.len) - first.pos > max as u64
            {
                break;
            }
            end += u64::from(r.len);
            last_seq = r.seq;
        }
        self.pinned = Some(first.pos);
        Some(Lease {
            mem: self.mem.clone(),
            off: (first.pos % self.cap) as usize,
            len: (end - first.pos) as usize,
            last_seq,
        })
    }

    /// The lease is over: its bytes may be reused.
    pub fn unpin(&mut self) {
        self.pinned = None;
    }

    /// Records with sequence in `[from, to]`, their lengths summed: (count, payload bytes).
    pub fn lag(&self, after: u64) -> (u64, u64) {
        let mut n = 0;
        let mut b = 0;
        for r in self.recs.iter().rev() {
            if r.seq <= after {
                break;
            }
            n += 1;
            b += u64::from(r.data);
        }
        (n, b)
    }

    /// Appends a record with sequence `seq` (must follow the last one), written by `fill` into
    /// exactly `len` bytes. A record never wraps: the end of the ring is padded instead.
    /// Released records whose space is reused are passed to `evict`.
    #[allow(clippy::too_many_arguments)]
    pub fn append(
        &mut self,
        seq: u64,
        term: u64,
        len: usize,
        data: u32,
        range: (u64, u64),
        fill: impl FnOnce(&mut [u8]),
        mut evict: impl FnMut(&Rec),
    ) -> Result<Rec, AppendError> {
        if let Some(last) = self.last_seq() {
            assert_eq!(seq, last + 1, "journal sequence must be contiguous");
        }
        let len64 = len as u64;
        if len64 > self.cap / 2 {
            return Err(AppendError::TooBig);
        }
        let phys = self.head % self.cap;
        let pad = if phys + len64 > self.cap {
            self.cap - phys
        } else {
            0
        };
        let free = self.cap - self.occupied();
        if pad + len64 > free {
            return Err(AppendError::Full { need: pad + len64 });
        }
        // Forget released records whose bytes this append overwrites.
        let end = self.head + pad + len64;
        while let Some(f) = self.recs.front() {
            if f.pos + self.cap >= end {
                break;
            }
            debug_assert!(
                f.seq <= self.released,
                "overwriting a record the peer needs"
            );
            evict(f);
            self.prev = (f.seq, f.term);
            self.recs.pop_front();
        }
        if pad > 0 {
            self.write_pad(phys as usize, pad as usize);
            self.head += pad;
        }
        let p = (self.head % self.cap) as usize;
        // The pinned run is behind the tail or the head but never in the bytes written now:
        // `free` counted it as occupied.
        if let Some(pin) = self.pinned {
            assert!(
                end <= pin + self.cap,
                "append would overwrite a leased record"
            );
        }
        // SAFETY: `[p, p + len)` is free space: not leased (asserted above), and no shared
        // slice of the ring outlives a call that borrows it mutably.
        fill(unsafe { self.mem.slice_mut(p, len) });
        let rec = Rec {
            seq,
            term,
            pos: self.head,
            len: len as u32,
            data,
            range,
        };
        self.head += len64;
        self.recs.push_back(rec);
        Ok(rec)
    }

    /// Fills the tail end of the ring so a scan knows to wrap: a Pad frame where it fits,
    /// zeros otherwise (a scan wraps when fewer than a frame's bytes remain).
    fn write_pad(&mut self, at: usize, n: usize) {
        let mut f = Vec::with_capacity(32);
        peer::encode_frame(&mut f, &Msg::Pad, &[]);
        // SAFETY: the padded bytes are free space, as in append.
        let dst = unsafe { self.mem.slice_mut(at, n) };
        if n >= f.len() {
            dst[..f.len()].copy_from_slice(&f);
        } else {
            dst.fill(0);
        }
    }

    /// Records up to and including `seq` are no longer needed by the peer: their space may be
    /// reused (they stay readable until it is).
    pub fn release_through(&mut self, seq: u64) {
        self.released = self.released.max(seq);
    }

    /// The peer needs the records from `seq` on again: it reconnected behind what it had
    /// applied (a restart resumes from its committed mark), so their space is not free until
    /// it applies them anew. Without this, appends could overwrite them before the catch-up
    /// sends them, and the link would drop for a bitmap resync the journal could have spared.
    /// Only for a `seq` the ring still holds (or the next one to be appended).
    pub fn keep_from(&mut self, seq: u64) {
        debug_assert!(
            self.get(seq).is_some() || self.last_seq().is_none_or(|l| seq > l),
            "keeping records the ring no longer holds"
        );
        self.released = self.released.min(seq.saturating_sub(1));
    }

    /// Drops every record; the next one appended is `next_seq`, and the one before it had
    /// term `prev_term` (0: not known).
    pub fn clear(&mut self, next_seq: u64, prev_term: u64) {
        self.recs.clear();
        self.released = next_seq.saturating_sub(1);
        self.prev = (next_seq.saturating_sub(1), prev_term);
    }

    /// The ring's memory with every byte outside `[pos, head)` zeroed (`pos`: the
    /// checkpoint recovery started from): what a recovery after a crash writes back, so that
    /// no record behind a torn one can later be joined to new records (see
    /// `resource::open_replication`).
    ///
    /// Only the records themselves and the Pad frames the walk wrapped at are kept: the
    /// rest of a wrap, from the Pad to the ring's end, is zeroed too. A Pad there may be an
    /// earlier lap's, read where a torn write did not land, and the bytes after it records of
    /// this lap that the walk never reached.
    pub fn live_image(&self, pos: u64) -> Vec<u8> {
        let cap = self.cap;
        let mut clean = image_buffer(cap as usize);
        let mut keep = |from: u64, n: u64| {
            let phys = from % cap;
            debug_assert!(phys + n <= cap, "a frame never wraps");
            clean[phys as usize..(phys + n) as usize].copy_from_slice(self.raw(phys, phys + n));
        };
        let mut at = pos;
        let ends = self
            .recs
            .iter()
            .filter(|r| r.pos >= pos)
            .map(|r| (r.pos, u64::from(r.len)))
            .chain(std::iter::once((self.head, 0)));
        for (start, len) in ends {
            if start > at {
                // The walk wrapped here: at a Pad frame (kept), or at zero filler.
                if let Some((Msg::Pad, n)) = self.parse_at((at % cap) as usize) {
                    keep(at, n as u64);
                }
            }
            if len > 0 {
                keep(start, len);
            }
            at = start + len;
        }
        clean
    }

    /// Retained records (released or not), oldest first.
    pub fn records(&self) -> impl Iterator<Item = &Rec> {
        self.recs.iter()
    }

    /// The raw memory at physical range, for the disk writer.
    pub fn raw(&self, from: u64, to: u64) -> &[u8] {
        assert!(from <= to && to <= self.cap, "journal range out of bounds");
        // SAFETY: writes need `&mut self`, which this shared borrow excludes; a lease only
        // reads.
        unsafe { self.mem.slice(from as usize, (to - from) as usize) }
    }

    /// A copy of the whole memory image (what the disk holds once persisted).
    #[cfg(test)]
    fn image(&self) -> Vec<u8> {
        self.raw(0, self.cap).to_vec()
    }

    /// Rebuilds the ring from its on-disk image: walks from the checkpoint `(pos, seq)` while
    /// records are valid and their sequence numbers follow on. Anything after the first
    /// invalid record was never covered by a flush and is dropped. `prev_term` is the term of
    /// the record before the checkpoint (the superblock keeps it with the checkpoint).
    pub fn recover(image: Vec<u8>, pos: u64, first_seq: u64, prev_term: u64) -> Self {
        let cap = image.len() as u64;
        let mut ring = Ring {
            mem: RingMem::new(image),
            cap,
            head: pos,
            recs: VecDeque::new(),
            released: first_seq.saturating_sub(1),
            pinned: None,
            prev: (first_seq.saturating_sub(1), prev_term),
        };
        let mut expect = first_seq;
        let mut at = pos;
        let mut scanned = 0u64;
        // The walk never covers more than the ring holds: a filler or a chain that would run
        // past the checkpoint again is not part of the journal (the bytes behind the head
        // may be the oldest live record, which ends at the end of the ring). Counters at the
        // end of their range end the walk instead of wrapping.
        let within = |scanned: u64, n: u64| scanned.checked_add(n).is_some_and(|e| e <= cap);
        while scanned < cap {
            let phys = at % cap;
            let remain = cap - phys;
            let Some((msg, len)) = ring.parse_at(phys as usize) else {
                if remain < 32 && phys != 0 && within(scanned, remain) {
                    // Zero filler at the end: wrap.
                    let Some(next) = at.checked_add(remain) else {
                        break;
                    };
                    at = next;
                    scanned += remain;
                    continue;
                }
                break;
            };
            match msg {
                Msg::Pad if within(scanned, remain) => {
                    let Some(next) = at.checked_add(remain) else {
                        break;
                    };
                    at = next;
                    scanned += remain;
                }
                m if m.seq() == Some(expect)
                    && within(scanned, len as u64)
                    && expect.checked_add(1).is_some()
                    && at.checked_add(len as u64).is_some() =>
                {
                    let data = match m {
                        Msg::Write { len, .. } => len,
                        _ => 0,
                    };
                    ring.recs.push_back(Rec {
                        seq: expect,
                        term: m.term().unwrap_or(0),
                        pos: at,
                        len: len as u32,
                        data,
                        range: msg_range(&m),
                    });
                    expect += 1;
                    at += len as u64;
                    scanned += len as u64;
                }
                _ => break,
            }
        }
        ring.head = at;
        ring
    }

    /// Parses and fully verifies the frame at a physical offset: (message, frame length).
    fn parse_at(&self, phys: usize) -> Option<(Msg, usize)> {
        let buf = self.raw(0, self.cap);
        let p: &[u8; PREFIX_LEN] = buf.get(phys..phys + PREFIX_LEN)?.try_into().ok()?;
        let pre = peer::parse_prefix(p).ok()?;
        let hs = phys + PREFIX_LEN;
        let header = buf.get(hs..hs + pre.header_len)?;
        let msg = peer::decode_header(p, &pre, header).ok()?;
        let ps = hs + pre.header_len;
        let payload = buf.get(ps..ps + pre.payload_len as usize)?;
        peer::check_payload(&msg, payload).ok()?;
        Some((msg, PREFIX_LEN + pre.header_len + pre.payload_len as usize))
    }
}

/// The data range a stream record vouches for (see [`Rec::range`]). An `Equal` region clears
/// its bits once applied, yet the peer's equal bytes may sit in its page cache only (applied
/// from an earlier stream it never made durable): it is tracked like a write until durable.
pub fn msg_range(m: &Msg) -> (u64, u64) {
    match *m {
        Msg::Write { offset, len, .. } => (offset, offset.saturating_add(u64::from(len))),
        Msg::Zero { offset, len, .. } | Msg::Equal { offset, len, .. } => {
            (offset, offset.saturating_add(len))
        }
        _ => (0, 0),
    }
}

/// Encodes a stream record into the ring: the frame is written in place (one copy of the data).
pub fn append_msg(
    ring: &mut Ring,
    msg: &Msg,
    payload: &[u8],
    evict: impl FnMut(&Rec),
) -> Result<Rec, AppendError> {
    let seq = msg.seq().expect("only stream records are journaled");
    // Prefix and header on the stack (no allocation per write), then placed with the payload
    // directly into the ring. Stream record headers are a few dozen bytes; the bound is only
    // there for a type that would grow past it.
    let mut stack = [0u8; 256];
    let mut heap = Vec::new();
    let n = match peer::encode_head(&mut stack, msg, payload.len()) {
        Some(n) => n,
        None => {
            heap = vec![0u8; PREFIX_LEN + peer::MAX_HEADER_LEN];
            peer::encode_head(&mut heap, msg, payload.len())
                .expect("a stream record's header is within the frame bound")
        }
    };
    let head = if heap.is_empty() {
        &stack[..n]
    } else {
        &heap[..n]
    };
    let total = head.len() + payload.len();
    let data = payload.len() as u32;
    ring.append(
        seq,
        msg.term().unwrap_or(0),
        total,
        data,
        msg_range(msg),
        |dst| {
            dst[..head.len()].copy_from_slice(head);
            dst[head.len()..].copy_from_slice(payload);
        },
        evict,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_msg(seq: u64, data: &[u8]) -> Msg {
        Msg::Write {
            seq,
            term: 0x7E57,
            offset: seq * 4096,
            len: data.len() as u32,
            crc: crc32c::crc32c(data),
            fua: false,
        }
    }

    fn termed(seq: u64, term: u64, data: &[u8]) -> Msg {
        let mut m = write_msg(seq, data);
        if let Msg::Write { term: t, .. } = &mut m {
            *t = term;
        }
        m
    }

    fn flush(seq: u64, term: u64) -> Msg {
        Msg::Flush { seq, term }
    }

    #[test]
    fn a_record_is_named_by_its_sequence_and_term_after_eviction_clear_and_recovery() {
        let mut r = Ring::new(64 * 1024);
        assert_eq!(r.term_at(0), Some(0), "the empty prefix is every stream's");
        assert_eq!(r.term_at(1), None);
        // Terms change within one ring (a restart, a promotion).
        let data = vec![3u8; 20_000];
        for seq in 1..=3 {
            let m = termed(seq, if seq < 3 { 0xA1 } else { 0xB2 }, &data);
            append_msg(&mut r, &m, &data, |_| {}).unwrap();
        }
        assert_eq!(
            (r.term_at(1), r.term_at(2), r.term_at(3), r.term_at(4)),
            (Some(0xA1), Some(0xA1), Some(0xB2), None)
        );
        // Evicted after the peer applied it: the ring still names the record before the
        // oldest kept, and nothing older.
        r.release_through(3);
        append_msg(&mut r, &flush(4, 0xB2), &[], |_| {}).unwrap();
        let term_of = |seq: u64| if seq < 3 { 0xA1 } else { 0xB2 };
        for seq in 5..=6 {
            append_msg(&mut r, &termed(seq, 0xB2, &data), &data, |_| {}).unwrap();
            r.release_through(seq - 1);
            let first = r.first_seq().unwrap();
            assert!(first > 1, "the wrap evicted the oldest records");
            assert_eq!(r.prev(), (first - 1, term_of(first - 1)));
            assert_eq!(r.term_at(first - 1), Some(term_of(first - 1)));
            if first >= 3 {
                assert_eq!(r.term_at(first - 2), None, "older than the ring can tell");
            }
        }
        // Recovered from the image at a checkpoint, with the term the superblock kept.
        let image = r.raw(0, r.cap()).to_vec();
        let pos = r.get(5).unwrap().pos;
        let rec = Ring::recover(image, pos, 5, 0xB2);
        assert_eq!(
            (rec.term_at(4), rec.term_at(5), rec.term_at(6)),
            (Some(0xB2), Some(0xB2), Some(0xB2))
        );
        assert_eq!(rec.term_at(3), None);
        // Cleared (a promotion, a resync): the next stream follows a named record, or one
        // not known here (term 0 never matches a peer's record).
        let mut c = rec;
        c.clear(10, 0xC3);
        assert_eq!((c.term_at(9), c.term_at(5)), (Some(0xC3), None));
        c.clear(20, 0);
        assert_eq!(c.term_at(19), None);
    }

    /// Review finding: after a torn write, records behind the torn one survive with the next
    /// sequence numbers; new records of the same length written over the torn one line up
    /// with them, and a later recovery joined them on. The live image has none.
    #[test]
    fn a_crash_leaves_no_record_that_new_ones_could_be_joined_to() {
        let mut r = Ring::new(64 * 1024);
        let data = vec![1u8; 4000];
        for seq in 1..=6 {
            append_msg(&mut r, &termed(seq, 0xA1, &data), &data, |_| {}).unwrap();
        }
        let torn = r.get(2).unwrap().pos as usize;
        let mut image = r.raw(0, r.cap()).to_vec();
        image[torn + 200] ^= 0xFF;
        let rec = Ring::recover(image.clone(), 0, 1, 0);
        assert_eq!(rec.last_seq(), Some(1));
        // New records 2 and 3 (another term, same length), then a recovery from the start.
        let after_new = |img: Vec<u8>| {
            let mut n = Ring::recover(img, 0, 1, 0);
            for seq in 2..=3 {
                append_msg(&mut n, &termed(seq, 0xB2, &data), &data, |_| {}).unwrap();
            }
            Ring::recover(n.raw(0, n.cap()).to_vec(), 0, 1, 0).last_seq()
        };
        assert_eq!(after_new(image), Some(6), "the hazard this guards against");
        assert_eq!(after_new(rec.live_image(0)), Some(3));
    }

    /// Review finding: a record whose first sector did not land (a crash midway through a
    /// persist) can leave an earlier lap's Pad frame at its position. The walk wraps there
    /// and stops at the ring's start, and the records of this lap behind the torn one, up
    /// to the ring's end, must not survive in the live image (a later chain could be joined
    /// to them, as in the test above); the Pad frames the walk wrapped at, and the records,
    /// must.
    #[test]
    fn a_stale_pad_where_a_record_was_torn_hides_nothing_behind_it() {
        let mut r = Ring::new(64 * 1024);
        let data = vec![3u8; 4000];
        for seq in 1..=8 {
            append_msg(&mut r, &termed(seq, 0xA1, &data), &data, |_| {}).unwrap();
        }
        let torn = r.get(4).unwrap();
        let mut image = r.raw(0, r.cap()).to_vec();
        let mut pad = Vec::new();
        peer::encode_frame(&mut pad, &Msg::Pad, &[]);
        image[torn.pos as usize..torn.pos as usize + pad.len()].copy_from_slice(&pad);
        let rec = Ring::recover(image, 0, 1, 0);
        assert_eq!(rec.last_seq(), Some(3));
        let live = Ring::recover(rec.live_image(0), 0, 1, 0);
        assert_eq!(
            live.last_seq(),
            Some(3),
            "the live image still recovers to 3"
        );
        // Nothing of records 5 to 8 is left anywhere in the live image.
        let clean = rec.live_image(0);
        for seq in 5..=8 {
            let x = r.get(seq).unwrap();
            assert!(
                clean[x.pos as usize..(x.pos + u64::from(x.len)) as usize]
                    .iter()
                    .all(|&b| b == 0),
                "record {seq} survived behind the stale pad"
            );
        }
        // A ring that wrapped (a Pad at its end, records after it at the start) keeps its
        // Pad: the live image recovers to the same records.
        let mut w = Ring::new(64 * 1024);
        let mut seq = 1;
        while append_msg(&mut w, &termed(seq, 0xA1, &data), &data, |_| {}).is_ok() {
            seq += 1;
        }
        w.release_through(seq / 2);
        let first = w.first_live_seq().unwrap();
        let tail = w.tail();
        for _ in 0..3 {
            append_msg(&mut w, &termed(seq, 0xA1, &data), &data, |_| {}).unwrap();
            seq += 1;
        }
        let pos = w.get(first).unwrap().pos;
        assert_eq!(pos, tail);
        assert!(
            w.get(seq - 1).unwrap().pos >= w.cap(),
            "the test's ring did not wrap"
        );
        let before_wrap = w.records().filter(|x| x.pos < w.cap()).last().unwrap();
        let end = before_wrap.pos + u64::from(before_wrap.len);
        assert!(
            matches!(w.parse_at(end as usize), Some((Msg::Pad, _))),
            "no Pad frame where the test's ring wrapped"
        );
        let all = Ring::recover(w.raw(0, w.cap()).to_vec(), pos, first, 0);
        assert_eq!(all.last_seq(), Some(seq - 1), "the walk wraps at the Pad");
        let again = Ring::recover(all.live_image(pos), pos, first, 0);
        assert_eq!(
            again.last_seq(),
            Some(seq - 1),
            "the live image kept the Pad"
        );
    }

    #[test]
    fn equal_records_vouch_for_their_range() {
        let mut r = Ring::new(64 * 1024);
        let eq = Msg::Equal {
            seq: 1,
            term: 0x7E57,
            offset: 8192,
            len: 1 << 20,
        };
        append_msg(&mut r, &eq, &[], |_| {}).expect("append");
        let flush = Msg::Flush {
            seq: 2,
            term: 0x7E57,
        };
        append_msg(&mut r, &flush, &[], |_| {}).expect("append");
        let ranges: Vec<_> = r.records().map(|x| x.range).collect();
        assert_eq!(ranges, vec![(8192, 8192 + (1 << 20)), (0, 0)]);
    }

    #[test]
    fn append_release_wrap() {
        let mut r = Ring::new(64 * 1024);
        let data = vec![5u8; 4000];
        let mut seq = 1;
        // Fill, release, refill many times over so records wrap around the end.
        for round in 0..50 {
            while append_msg(&mut r, &write_msg(seq, &data), &data, |_| {}).is_ok() {
                seq += 1;
            }
            let last = r.last_seq().unwrap();
            assert!(r.used() <= r.cap());
            let rec = r.get(last).unwrap();
            let f = r.bytes(&rec);
            assert_eq!(f.len(), rec.len as usize);
            // Release half.
            let first = r.first_live_seq().unwrap();
            r.release_through(first + (last - first) / 2);
            assert!(r.first_live_seq().unwrap() > first, "round {round}");
            // Released records stay readable until their space is reused.
            assert!(r.get(first).is_some());
        }
        assert!(seq > 300, "{seq}");
    }

    /// A peer that comes back behind what it had applied (its restart kept only its committed
    /// mark) gets the records from there again: they are not overwritten meanwhile.
    #[test]
    fn records_a_reconnecting_peer_needs_again_are_kept() {
        let mut r = Ring::new(64 * 1024);
        let data = vec![2u8; 8000];
        let mut seq = 1;
        while append_msg(&mut r, &write_msg(seq, &data), &data, |_| {}).is_ok() {
            seq += 1;
        }
        let last = seq - 1;
        // Applied through the last, then back at 3 after a restart.
        r.release_through(last);
        r.keep_from(3);
        assert_eq!(r.first_live_seq(), Some(3));
        // Appends take the space of records 1 and 2 only, then the ring is full.
        let err = loop {
            match append_msg(&mut r, &write_msg(seq, &data), &data, |_| {}) {
                Ok(_) => seq += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(err, AppendError::Full { .. }), "{err:?}");
        assert!(seq <= last + 3, "appended over records the peer needs");
        assert!(
            (3..=last).all(|s| r.get(s).is_some()),
            "a record the peer needs was overwritten"
        );
        let last = seq - 1;
        // Once it applied them again, the space is free.
        r.release_through(last);
        append_msg(&mut r, &write_msg(seq, &data), &data, |_| {}).expect("room again");
    }

    #[test]
    fn full_until_reclaimed() {
        let mut r = Ring::new(64 * 1024);
        let data = vec![1u8; 8000];
        let mut seq = 1;
        while append_msg(&mut r, &write_msg(seq, &data), &data, |_| {}).is_ok() {
            seq += 1;
        }
        let e = append_msg(&mut r, &write_msg(seq, &data), &data, |_| {}).unwrap_err();
        assert!(matches!(e, AppendError::Full { .. }));
        // Released: the space is reused and the overwritten records are evicted.
        r.release_through(seq - 1);
        let mut evicted = Vec::new();
        append_msg(&mut r, &write_msg(seq, &data), &data, |e| {
            evicted.push(e.seq)
        })
        .unwrap();
        assert_eq!(evicted, vec![1, 2]);
        assert_eq!(r.first_seq(), Some(3));
        assert_eq!(r.get(1), None);
        let huge = vec![0u8; 40 * 1024];
        assert_eq!(
            append_msg(&mut r, &write_msg(seq + 1, &huge), &huge, |_| {}),
            Err(AppendError::TooBig)
        );
    }

    #[test]
    fn recover_from_image() {
        let mut r = Ring::new(64 * 1024);
        let mut seq = 1;
        // Wrap a few times, then recover from the current checkpoint.
        for _ in 0..40 {
            let data = vec![(seq % 200) as u8; 1000 + (seq as usize * 37) % 3000];
            if append_msg(&mut r, &write_msg(seq, &data), &data, |_| {}).is_err() {
                let first = r.first_live_seq().unwrap();
                r.release_through(first + 3);
                continue;
            }
            append_msg(
                &mut r,
                &Msg::Flush {
                    seq: seq + 1,
                    term: 0x7E57,
                },
                &[],
                |_| {},
            )
            .ok();
            seq += 2;
        }
        let (pos, first) = (r.tail(), r.first_live_seq().unwrap());
        let last = r.last_seq().unwrap();
        let image = r.image();
        let rec = Ring::recover(image.clone(), pos, first, 0);
        assert_eq!(rec.first_seq(), Some(first));
        assert_eq!(rec.last_seq(), Some(last));
        assert_eq!(rec.head(), r.head());
        // A torn record (corrupted byte) ends the recovered chain just before it.
        let mid = r.get(first + 2).unwrap();
        let mut torn = image;
        torn[(mid.pos % r.cap()) as usize + PREFIX_LEN + 2] ^= 0xff;
        let rec = Ring::recover(torn, pos, first, 0);
        assert_eq!(rec.last_seq(), Some(first + 1));
        // An empty image recovers nothing and does not panic.
        let rec = Ring::recover(vec![0u8; 64 * 1024], 0, 1, 0);
        assert!(rec.is_empty());
    }

    #[test]
    fn a_lease_pins_its_records_until_unpinned() {
        let mut r = Ring::new(64 * 1024);
        let data = vec![7u8; 8000];
        for seq in 1..=4 {
            append_msg(&mut r, &write_msg(seq, &data), &data, |_| {}).unwrap();
        }
        // Records 2..=3 fit in 20000 bytes; 4 would not.
        let lease = r.lease(2, 20_000).unwrap();
        assert_eq!(lease.last_seq, 3);
        let expect: Vec<u8> = [r.bytes(&r.get(2).unwrap()), r.bytes(&r.get(3).unwrap())].concat();
        assert_eq!(lease.bytes(), &expect[..]);
        // Even released, the leased bytes are not reused while pinned: appends stop short.
        r.release_through(4);
        let other = vec![9u8; 8000];
        let mut seq = 5;
        while append_msg(&mut r, &write_msg(seq, &other), &other, |_| {}).is_ok() {
            seq += 1;
        }
        assert_eq!(
            lease.bytes(),
            &expect[..],
            "a leased record was overwritten"
        );
        assert!(r.get(2).is_some(), "a leased record was evicted");
        // Unpinned, the space is reused.
        r.unpin();
        append_msg(&mut r, &write_msg(seq, &other), &other, |_| {}).unwrap();
        assert_eq!(
            r.lease(1, 1 << 20).map(|l| l.last_seq),
            None,
            "1 was evicted"
        );
    }

    #[test]
    fn a_lease_stops_at_the_end_of_the_ring() {
        let mut r = Ring::new(64 * 1024);
        let data = vec![3u8; 10_000];
        let mut seq = 1;
        // Fill, release everything, and append until a record wraps past the end (a pad).
        while append_msg(&mut r, &write_msg(seq, &data), &data, |_| {}).is_ok() {
            seq += 1;
        }
        r.release_through(seq - 1);
        let first_new = seq;
        append_msg(&mut r, &write_msg(seq, &data), &data, |_| {}).unwrap();
        seq += 1;
        append_msg(&mut r, &write_msg(seq, &data), &data, |_| {}).unwrap();
        // From the last record before the wrap, the run ends before the pad.
        let lease = r.lease(first_new - 1, 1 << 20).unwrap();
        assert_eq!(lease.last_seq, first_new - 1);
        r.unpin();
        let lease = r.lease(first_new, 1 << 20).unwrap();
        assert_eq!(lease.last_seq, seq);
        r.unpin();
    }

    #[test]
    fn a_lease_stops_where_a_record_ends_exactly_at_the_end_of_the_ring() {
        let mut r = Ring::new(64 * 1024);
        // Payload sizes whose frames are exactly 16 KiB (headers are varint-encoded).
        let frame = |seq: u64, n: usize| {
            let d = vec![1u8; n];
            let mut f = Vec::new();
            proto::peer::encode_frame(&mut f, &write_msg(seq, &d), &d);
            f.len()
        };
        let fit = |seq: u64| {
            let mut n = 16 * 1024 - 64;
            while frame(seq, n) < 16 * 1024 {
                n += 1;
            }
            assert_eq!(frame(seq, n), 16 * 1024);
            vec![1u8; n]
        };
        let mut seq = 1;
        // Four 16 KiB records fill 64 KiB exactly: no pad before the next one.
        for _ in 0..4 {
            let data = fit(seq);
            let rec = append_msg(&mut r, &write_msg(seq, &data), &data, |_| {}).unwrap();
            assert_eq!(rec.len as usize, 16 * 1024);
            seq += 1;
        }
        assert_eq!(r.head(), r.cap());
        r.release_through(2);
        let small = vec![2u8; 1000];
        let wrapped = append_msg(&mut r, &write_msg(seq, &small), &small, |_| {}).unwrap();
        assert_eq!(wrapped.pos, r.cap(), "the next record starts at physical 0");
        // A run from record 3 ends with record 4, at the end of the ring.
        let lease = r.lease(3, 1 << 20).unwrap();
        assert_eq!(lease.last_seq, 4);
        assert_eq!(lease.bytes().len(), 32 * 1024);
        r.unpin();
        let lease = r.lease(seq, 1 << 20).unwrap();
        assert_eq!(lease.last_seq, seq);
        r.unpin();
    }

    #[test]
    fn lag_counts_unacknowledged() {
        let mut r = Ring::new(64 * 1024);
        let d = vec![0u8; 100];
        for s in 1..=5 {
            append_msg(&mut r, &write_msg(s, &d), &d, |_| {}).unwrap();
        }
        assert_eq!(r.lag(2), (3, 300));
        assert_eq!(r.lag(5), (0, 0));
    }
}
