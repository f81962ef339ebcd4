//! The write journal: a bounded ring of stream records (peer frames) in the metadata area,
//! mirrored in memory.
//!
//! Every replicated write is appended here before it is acknowledged; the sender streams the
//! records to the peer straight from the ring, a reconnect replays them from where the peer
//! stopped, and they are released once the peer has made them durable. On disk the ring is only
//! forced at flush points (like the data), and a checkpoint in the superblock says where the
//! oldest record starts, so a restarted primary finds every record a flush covered.

use std::collections::VecDeque;

use proto::peer::{self, Msg, PREFIX_LEN};

/// One record in the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rec {
    pub seq: u64,
    /// Logical position (monotonic; the physical offset is `pos % cap`).
    pub pos: u64,
    pub len: u32,
    /// Payload bytes (for lag accounting).
    pub data: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum AppendError {
    /// Not enough free space now; `need` bytes.
    Full { need: u64 },
    /// The record can never fit.
    TooBig,
}

/// The ring's memory image and its index. Pure: no I/O.
pub struct Ring {
    buf: Vec<u8>,
    cap: u64,
    head: u64,
    recs: VecDeque<Rec>,
    /// Space before this logical position may be reused: `min(released, checkpoint)`.
    reclaim: u64,
}

impl Ring {
    pub fn new(cap: u64) -> Self {
        assert!(cap >= 64 * 1024, "journal too small");
        Ring {
            buf: vec![0u8; cap as usize],
            cap,
            head: 0,
            recs: VecDeque::new(),
            reclaim: 0,
        }
    }

    pub fn cap(&self) -> u64 {
        self.cap
    }
    pub fn head(&self) -> u64 {
        self.head
    }
    pub fn first_seq(&self) -> Option<u64> {
        self.recs.front().map(|r| r.seq)
    }
    pub fn last_seq(&self) -> Option<u64> {
        self.recs.back().map(|r| r.seq)
    }
    /// Logical position of the oldest retained record (or head when empty).
    pub fn tail(&self) -> u64 {
        self.recs.front().map_or(self.head, |r| r.pos)
    }
    pub fn used(&self) -> u64 {
        self.head - self.reclaim.min(self.tail())
    }
    pub fn len(&self) -> usize {
        self.recs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.recs.is_empty()
    }

    /// The record with sequence `seq`, if still in the ring.
    pub fn get(&self, seq: u64) -> Option<Rec> {
        let first = self.recs.front()?.seq;
        let i = usize::try_from(seq.checked_sub(first)?).ok()?;
        self.recs.get(i).copied()
    }

    /// The frame bytes of a record.
    pub fn bytes(&self, r: &Rec) -> &[u8] {
        let p = (r.pos % self.cap) as usize;
        &self.buf[p..p + r.len as usize]
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
    pub fn append(
        &mut self,
        seq: u64,
        len: usize,
        data: u32,
        fill: impl FnOnce(&mut [u8]),
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
        let free = self.cap - self.used();
        if pad + len64 > free {
            return Err(AppendError::Full { need: pad + len64 });
        }
        if pad > 0 {
            self.write_pad(phys as usize, pad as usize);
            self.head += pad;
        }
        let p = (self.head % self.cap) as usize;
        fill(&mut self.buf[p..p + len]);
        let rec = Rec {
            seq,
            pos: self.head,
            len: len as u32,
            data,
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
        if n >= f.len() {
            self.buf[at..at + f.len()].copy_from_slice(&f);
        } else {
            self.buf[at..at + n].fill(0);
        }
    }

    /// Forgets records up to and including `seq` (the peer has them durably). Space is
    /// reusable once the checkpoint also moved past it.
    pub fn release_through(&mut self, seq: u64) {
        while self.recs.front().is_some_and(|r| r.seq <= seq) {
            self.recs.pop_front();
        }
    }

    /// Drops every record (the peer will be resynced from the bitmap instead).
    pub fn clear(&mut self) {
        self.recs.clear();
    }

    /// Sets the reclaim point: the persisted checkpoint (space before it may be overwritten).
    pub fn set_reclaim(&mut self, pos: u64) {
        self.reclaim = pos.min(self.head);
    }

    /// The raw memory at physical range, for the disk writer.
    pub fn raw(&self, from: u64, to: u64) -> &[u8] {
        &self.buf[from as usize..to as usize]
    }

    /// Rebuilds the ring from its on-disk image: walks from the checkpoint `(pos, seq)` while
    /// records are valid and their sequence numbers follow on. Anything after the first
    /// invalid record was never covered by a flush and is dropped.
    pub fn recover(image: Vec<u8>, pos: u64, first_seq: u64) -> Self {
        let cap = image.len() as u64;
        let mut ring = Ring {
            buf: image,
            cap,
            head: pos,
            recs: VecDeque::new(),
            reclaim: pos,
        };
        let mut expect = first_seq;
        let mut at = pos;
        let mut scanned = 0u64;
        while scanned < cap {
            let phys = at % cap;
            let remain = cap - phys;
            let Some((msg, len)) = ring.parse_at(phys as usize) else {
                if remain < 32 && phys != 0 {
                    // Zero filler at the end: wrap.
                    at += remain;
                    scanned += remain;
                    continue;
                }
                break;
            };
            match msg {
                Msg::Pad => {
                    at += remain;
                    scanned += remain;
                }
                m if m.seq() == Some(expect) => {
                    let data = match m {
                        Msg::Write { len, .. } => len,
                        _ => 0,
                    };
                    ring.recs.push_back(Rec {
                        seq: expect,
                        pos: at,
                        len: len as u32,
                        data,
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
        let p: &[u8; PREFIX_LEN] = self.buf.get(phys..phys + PREFIX_LEN)?.try_into().ok()?;
        let pre = peer::parse_prefix(p).ok()?;
        let hs = phys + PREFIX_LEN;
        let header = self.buf.get(hs..hs + pre.header_len)?;
        let msg = peer::decode_header(p, &pre, header).ok()?;
        let ps = hs + pre.header_len;
        let payload = self.buf.get(ps..ps + pre.payload_len as usize)?;
        peer::check_payload(&msg, payload).ok()?;
        Some((msg, PREFIX_LEN + pre.header_len + pre.payload_len as usize))
    }
}

/// Encodes a stream record into the ring: the frame is written in place (one copy of the data).
pub fn append_msg(ring: &mut Ring, msg: &Msg, payload: &[u8]) -> Result<Rec, AppendError> {
    let seq = msg.seq().expect("only stream records are journaled");
    // Encode the header once, then place prefix+header+payload directly into the ring.
    let mut head = Vec::with_capacity(64);
    peer::encode_frame(&mut head, msg, &[]);
    // encode_frame wrote payload_len 0 and a crc over that; redo the prefix for the payload.
    let header_len = head.len() - PREFIX_LEN;
    let total = head.len() + payload.len();
    let data = payload.len() as u32;
    ring.append(seq, total, data, |dst| {
        dst[..4].copy_from_slice(&head[..4]);
        dst[4..6].copy_from_slice(&(header_len as u16).to_le_bytes());
        dst[6..10].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut crc = crc32c::crc32c(&dst[..10]);
        crc = crc32c::crc32c_append(crc, &head[PREFIX_LEN..]);
        dst[10..14].copy_from_slice(&crc.to_le_bytes());
        dst[PREFIX_LEN..PREFIX_LEN + header_len].copy_from_slice(&head[PREFIX_LEN..]);
        dst[PREFIX_LEN + header_len..].copy_from_slice(payload);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_msg(seq: u64, data: &[u8]) -> Msg {
        Msg::Write {
            seq,
            offset: seq * 4096,
            len: data.len() as u32,
            crc: crc32c::crc32c(data),
            fua: false,
        }
    }

    #[test]
    fn append_release_wrap() {
        let mut r = Ring::new(64 * 1024);
        let data = vec![5u8; 4000];
        let mut seq = 1;
        // Fill, release, refill many times over so records wrap around the end.
        for round in 0..50 {
            while append_msg(&mut r, &write_msg(seq, &data), &data).is_ok() {
                seq += 1;
            }
            let last = r.last_seq().unwrap();
            assert!(r.used() <= r.cap());
            let rec = r.get(last).unwrap();
            let f = r.bytes(&rec);
            assert_eq!(f.len(), rec.len as usize);
            // Release half.
            let first = r.first_seq().unwrap();
            r.release_through(first + (last - first) / 2);
            r.set_reclaim(r.tail());
            assert!(r.first_seq().unwrap() > first, "round {round}");
        }
        assert!(seq > 300, "{seq}");
    }

    #[test]
    fn full_until_reclaimed() {
        let mut r = Ring::new(64 * 1024);
        let data = vec![1u8; 8000];
        let mut seq = 1;
        while append_msg(&mut r, &write_msg(seq, &data), &data).is_ok() {
            seq += 1;
        }
        let e = append_msg(&mut r, &write_msg(seq, &data), &data).unwrap_err();
        assert!(matches!(e, AppendError::Full { .. }));
        // Released but the checkpoint has not moved: still full.
        r.release_through(seq - 1);
        assert!(append_msg(&mut r, &write_msg(seq, &data), &data).is_err());
        r.set_reclaim(r.tail());
        append_msg(&mut r, &write_msg(seq, &data), &data).unwrap();
        let huge = vec![0u8; 40 * 1024];
        assert_eq!(
            append_msg(&mut r, &write_msg(seq + 1, &huge), &huge),
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
            if append_msg(&mut r, &write_msg(seq, &data), &data).is_err() {
                let first = r.first_seq().unwrap();
                r.release_through(first + 3);
                r.set_reclaim(r.tail());
                continue;
            }
            append_msg(&mut r, &Msg::Flush { seq: seq + 1 }, &[]).ok();
            seq += 2;
        }
        let (pos, first) = (r.tail(), r.first_seq().unwrap());
        let last = r.last_seq().unwrap();
        let image = r.buf.clone();
        let rec = Ring::recover(image.clone(), pos, first);
        assert_eq!(rec.first_seq(), Some(first));
        assert_eq!(rec.last_seq(), Some(last));
        assert_eq!(rec.head(), r.head());
        // A torn record (corrupted byte) ends the recovered chain just before it.
        let mid = r.get(first + 2).unwrap();
        let mut torn = image;
        torn[(mid.pos % r.cap()) as usize + PREFIX_LEN + 2] ^= 0xff;
        let rec = Ring::recover(torn, pos, first);
        assert_eq!(rec.last_seq(), Some(first + 1));
        // An empty image recovers nothing and does not panic.
        let rec = Ring::recover(vec![0u8; 64 * 1024], 0, 1);
        assert!(rec.is_empty());
    }

    #[test]
    fn lag_counts_unacknowledged() {
        let mut r = Ring::new(64 * 1024);
        let d = vec![0u8; 100];
        for s in 1..=5 {
            append_msg(&mut r, &write_msg(s, &d), &d).unwrap();
        }
        assert_eq!(r.lag(2), (3, 300));
        assert_eq!(r.lag(5), (0, 0));
    }
}
