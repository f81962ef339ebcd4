//! "Never panic on garbage": every decoder of the daemon that reads bytes from the disk (or, for
//! the bitmap, from the peer) is fed random bytes and mutations of valid encodings built with
//! the crate's own encoders, and must answer with "nothing valid" or exactly what was encoded,
//! never a panic: `Superblock::decode`, `ActivityLog::decode`, `Bitmap::from_bytes` and
//! `Ring::recover` (journal images written by `append_msg`).
//!
//! Deterministic: a tiny xorshift64 PRNG, fixed seeds, and one PRNG per iteration derived from
//! (seed, iteration), so the `seed`/`iter` printed by a failing assertion reproduce it alone.

use blockrep::activity::{ActivityLog, OnDisk, EXTENT};
use blockrep::bitmap::Bitmap;
use blockrep::journal::{append_msg, AppendError, Rec, Ring};
use blockrep::meta::{DiskState, Generations, Layout, Superblock, AL_AREA, MIN_DATA, SLOT_LEN};
use proto::peer::{self, GenIds, Msg, PREFIX_LEN};

// ---------------------------------------------------------------------------------------------
// PRNG and mutations: shared with proto's garbage-input tests.
#[path = "../../proto/tests/fuzz/mod.rs"]
mod fuzz;
use fuzz::*;

// ---------------------------------------------------------------------------------------------
// Superblock.

fn random_superblock(rng: &mut Rng) -> Superblock {
    let granularity = 1u64 << (12 + rng.below(9));
    let backing = 2 * MIN_DATA + rng.below(1 << 42);
    let layout = Layout::compute(backing, rng.bool(), rng.below(1 << 30), granularity)
        .or_else(|_| Layout::compute(1 << 30, true, 1 << 20, 4096))
        .unwrap_or_else(|e| panic!("no layout: {e:?}"));
    Superblock {
        seq: rng.u64_edge() % blockrep::meta::COUNTER_LIMIT,
        resource: rng.string(40),
        node: rng.string(40),
        layout,
        disk: [
            DiskState::Inconsistent,
            DiskState::Outdated,
            DiskState::UpToDate,
        ][rng.index(3)],
        gen: Generations {
            current: rng.u64_edge(),
            bitmap: rng.u64_edge(),
            history: [rng.u64_edge(), rng.u64_edge()],
        },
        was_primary: rng.bool(),
        peer_up_to_date: rng.bool(),
        applied_seq: rng.u64_edge() % blockrep::meta::COUNTER_LIMIT,
        issued_seq: rng.u64_edge() % blockrep::meta::COUNTER_LIMIT,
        agreed_size: rng.u64_edge(),
        journal_pos: rng.u64_edge() % blockrep::meta::COUNTER_LIMIT,
        journal_seq: rng.u64_edge() % blockrep::meta::COUNTER_LIMIT,
        journal_overflowed: rng.bool(),
        created_unix: rng.u64_edge(),
        promoted_ms: rng.u64_edge(),
        applied_term: rng.u64_edge(),
        journal_prev_term: rng.u64_edge(),
        lost_writes: false,
        peer_left: rng.bool(),
        handed_over: rng.bool(),
        peer_durable: (
            rng.u64_edge(),
            rng.u64_edge() % blockrep::meta::COUNTER_LIMIT,
        ),
        sync_done_sent: (rng.u64_edge(), rng.u64_edge()),
        split_primary_gen: rng.u64_edge(),
    }
}

/// A slot with the right magic, version, length and crc around `payload`, so decoding reaches
/// postcard.
fn forged_slot(magic_version: &[u8], payload: &[u8], total: usize) -> Vec<u8> {
    let mut s = magic_version[..12].to_vec();
    s.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    s.extend_from_slice(payload);
    let crc = crc32c::crc32c(&s);
    s.extend_from_slice(&crc.to_le_bytes());
    if s.len() < total {
        s.resize(total, 0);
    }
    s
}

/// Decodes, and re-encodes what decoded: it must come back the same.
fn decode_slot(slot: &[u8], ctx: Ctx) -> Option<Superblock> {
    let sb = Superblock::decode(slot)?;
    if slot.len() <= SLOT_LEN as usize {
        // Decoded from one slot, it fits one slot again.
        let again = sb.encode().unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert!(Superblock::decode(&again) == Some(sb.clone()), "{ctx}");
    }
    Some(sb)
}

#[test]
fn superblock_random_slots_are_rejected() {
    let seed = 0x5EED_1001;
    let valid = random_superblock(&mut Rng::new(seed, u64::MAX))
        .encode()
        .unwrap_or_else(|e| panic!("{e}"));
    for iter in 0..4_000 {
        let ctx = Ctx {
            test: "superblock_random_slots_are_rejected",
            seed,
            iter,
        };
        let mut rng = Rng::new(seed, iter);
        let n = if rng.bool() {
            SLOT_LEN as usize
        } else {
            rng.garbage_len()
        };
        let mut slot = rng.bytes(n);
        if rng.bool() && n >= 16 {
            // Right magic and version, the length at an extreme or random.
            slot[..12].copy_from_slice(&valid[..12]);
            let len = match rng.below(3) {
                0 => EXTREMES[rng.index(EXTREMES.len())] as u32,
                1 => (n as u32).wrapping_sub(20 - rng.below(3) as u32),
                _ => rng.u32_edge(),
            };
            slot[12..16].copy_from_slice(&len.to_le_bytes());
        }
        // Garbage fails the crc (2^-32) and never reaches postcard.
        assert!(decode_slot(&slot, ctx).is_none(), "{ctx}");
    }
}

#[test]
fn superblock_garbage_payloads_with_valid_crc_reach_postcard_safely() {
    let seed = 0x5EED_1002;
    let mut decoded = 0;
    for iter in 0..6_000 {
        let ctx = Ctx {
            test: "superblock_garbage_payloads_with_valid_crc_reach_postcard_safely",
            seed,
            iter,
        };
        let mut rng = Rng::new(seed, iter);
        let sb = random_superblock(&mut rng);
        let slot = sb.encode().unwrap_or_else(|e| panic!("{ctx}: {e}"));
        let len = u32::from_le_bytes(slot[12..16].try_into().unwrap_or([0; 4])) as usize;
        let payload = &slot[16..16 + len];
        let forged = if rng.one_in(4) {
            let n = rng.index(SLOT_LEN as usize - 20);
            rng.bytes(n)
        } else {
            let mut p = mutate(&mut rng, payload);
            if rng.bool() {
                p = mutate(&mut rng, &p);
            }
            p.truncate(SLOT_LEN as usize - 20);
            p
        };
        let bad = forged_slot(&slot, &forged, SLOT_LEN as usize);
        if decode_slot(&bad, ctx).is_some() {
            decoded += 1;
        }
    }
    assert!(
        decoded > 100,
        "postcard never produced a superblock ({decoded})"
    );
}

#[test]
fn superblock_mutations_are_caught() {
    let seed = 0x5EED_1003;
    for iter in 0..300 {
        let ctx = Ctx {
            test: "superblock_mutations_are_caught",
            seed,
            iter,
        };
        let mut rng = Rng::new(seed, iter);
        let sb = random_superblock(&mut rng);
        let slot = sb.encode().unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert!(Superblock::decode(&slot) == Some(sb.clone()), "{ctx}");
        let used = 16 + u32::from_le_bytes(slot[12..16].try_into().unwrap_or([0; 4])) as usize + 4;
        for mi in 0..40 {
            let bad = if mi < 8 {
                // The length field at its extremes.
                let mut b = slot.clone();
                let v = [
                    0,
                    1,
                    u64::from(u32::MAX),
                    0x8000_0000,
                    used as u64 - 19,
                    4093,
                ][rng.index(6)];
                put_uint(&mut b, 12, 4, v, false);
                b
            } else {
                mutate(&mut rng, &slot)
            };
            // Either nothing, or exactly what was written (a change past the used part).
            if let Some(got) = decode_slot(&bad, ctx) {
                assert!(
                    got == sb,
                    "{ctx} mutation {mi}: a changed superblock decoded"
                );
                assert_eq!(&bad[..used], &slot[..used], "{ctx} mutation {mi}");
            }
        }
        // Both slots torn or garbage: pick never panics and prefers a valid one.
        let other = mutate(&mut rng, &slot);
        let got = Superblock::pick(Superblock::decode(&other), Superblock::decode(&slot));
        assert!(got.is_some(), "{ctx}");
    }
}

// ---------------------------------------------------------------------------------------------
// Activity log.

/// The log slot's magic, as its encoder writes it (the constant is private).
fn al_magic() -> [u8; 4] {
    let b = ActivityLog::new(1).encode(64, 1);
    [b[0], b[1], b[2], b[3]]
}

/// A log with random extents, its extents as decoded, and the whole area as on disk (the
/// log in the slot its random write number picks, the other slot zero).
fn random_al(rng: &mut Rng) -> (Vec<u32>, Vec<u8>) {
    let mut al = ActivityLog::new(1 + rng.index(64));
    for _ in 0..rng.index(100) {
        let e = if rng.bool() {
            rng.below(64)
        } else {
            u64::from(rng.u32_edge())
        };
        al.begin(e * EXTENT, 1 + rng.below(2 * EXTENT), rng.next());
        if rng.bool() {
            al.end(e * EXTENT, 1, rng.next());
        }
    }
    let n = 1 + rng.below(1_000);
    let (off, len) = ActivityLog::slot(n, AL_AREA);
    let b = al.encode(len, n);
    let mut area = vec![0u8; AL_AREA as usize];
    area[off as usize..off as usize + b.len()].copy_from_slice(&b);
    let (log, got_n) = ActivityLog::decode(&area);
    assert_eq!(got_n, n);
    let OnDisk::Extents(extents) = log else {
        panic!("{} extents do not fit a slot", al.len());
    };
    assert_eq!(extents.len(), al.len());
    assert!(extents.iter().all(|&e| al.is_hot(e)));
    (extents, area)
}

#[test]
fn activity_log_garbage_and_mutations_never_name_fewer_extents() {
    let seed = 0x5EED_1101;
    let magic = al_magic();
    // A pool of logs (building one is the slow part in a debug build): iteration i mutates
    // log i % 64, made by Rng::new(seed, 1_000_000 + i % 64).
    let logs: Vec<(Vec<u32>, Vec<u8>)> = (0..64)
        .map(|k| random_al(&mut Rng::new(seed, 1_000_000 + k)))
        .collect();
    for iter in 0..6_000 {
        let ctx = Ctx {
            test: "activity_log_garbage_and_mutations_never_name_fewer_extents",
            seed,
            iter,
        };
        let mut rng = Rng::new(seed, iter);
        let (extents, area) = &logs[iter as usize % logs.len()];
        let (input, recomputed) = match rng.below(4) {
            0 => {
                let n = rng.garbage_len();
                let mut b = rng.bytes(n);
                if b.len() >= 16 && rng.bool() {
                    b[..4].copy_from_slice(&magic);
                    let c = EXTREMES[rng.index(EXTREMES.len())] as u32;
                    b[12..16].copy_from_slice(&c.to_le_bytes());
                }
                (b, false)
            }
            1 => {
                // The count of either slot at its extremes.
                let mut b = area.clone();
                let v = [
                    0,
                    1,
                    u64::from(u32::MAX),
                    u64::from(u32::MAX - 1),
                    (b.len() / 8) as u64,
                    8_188,
                    8_189,
                ][rng.index(7)];
                let at = if rng.bool() { 0 } else { b.len() / 2 };
                put_uint(&mut b, at + 12, 4, v, false);
                (b, false)
            }
            2 => {
                // A mutated slot with a recomputed crc: whatever it says is taken as is.
                let mut b = mutate(&mut rng, &area[..area.len() / 2]);
                if b.len() >= 20 {
                    let end = b.len() - 4;
                    let crc = crc32c::crc32c(&b[..end]);
                    b[end..].copy_from_slice(&crc.to_le_bytes());
                }
                (b, true)
            }
            _ => (mutate(&mut rng, area), false),
        };
        let (got, _) = ActivityLog::decode(&input);
        if recomputed {
            continue;
        }
        // A damaged log names at least the extents it held (or all of them); it names none
        // only where nothing was ever written.
        match got {
            OnDisk::All => {}
            OnDisk::Extents(v) if v.is_empty() => assert!(
                input.iter().all(|&b| b == 0) || extents.is_empty(),
                "{ctx}: a damaged log decoded to no extents"
            ),
            OnDisk::Extents(v) => {
                assert!(&v == extents, "{ctx}: a changed log decoded ({v:?})")
            }
        }
    }
}

#[test]
fn activity_log_count_past_a_short_buffer_is_all_extents() {
    // A slot whose count runs past the buffer (a torn write, a short read, garbage): never a
    // panic, and taken as unreadable.
    let mut al = ActivityLog::new(8);
    for e in 0..3 {
        al.begin(e * EXTENT, 1, u64::MAX);
    }
    let b = al.encode(AL_AREA as usize / 2, 1);
    assert_eq!(ActivityLog::decode(&b[..16]).0, OnDisk::All);
    let mut area = vec![0u8; AL_AREA as usize];
    area[..4].copy_from_slice(&al_magic());
    for count in [8_188u32, 8_189, 16_384, u32::MAX - 1] {
        area[12..16].copy_from_slice(&count.to_le_bytes());
        assert_eq!(ActivityLog::decode(&area).0, OnDisk::All);
    }
}

// ---------------------------------------------------------------------------------------------
// Bitmap.

#[test]
fn bitmap_from_bytes_loads_exactly_the_device_bits() {
    let seed = 0x5EED_1201;
    for iter in 0..1_500 {
        let ctx = Ctx {
            test: "bitmap_from_bytes_loads_exactly_the_device_bits",
            seed,
            iter,
        };
        let mut rng = Rng::new(seed, iter);
        let granularity = 1u64 << rng.below(21);
        let size = match rng.below(4) {
            0 => 1 + rng.below(1 << 16),
            1 => (1 + rng.below(4096)) * granularity,
            2 => ((1 + rng.below(4096)) * granularity)
                .saturating_sub(1)
                .max(1),
            _ => 1 + rng.below(1 << 22),
        };
        let nbits = size.div_ceil(granularity);
        let words = nbits.div_ceil(64) as usize;
        let n = match rng.below(3) {
            0 => words * 8,
            1 => (words * 8 + rng.index(17)).saturating_sub(8),
            _ => rng.garbage_len(),
        };
        let bytes = rng.bytes(n);
        let b = Bitmap::from_bytes(size, granularity, &bytes);
        let out = b.to_bytes();
        assert_eq!(out.len(), words * 8, "{ctx}");
        let mut ones = 0u64;
        for (i, w) in out.chunks_exact(8).enumerate() {
            let got = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
            let mut want = bytes
                .get(i * 8..i * 8 + 8)
                .map_or(0, |s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8])));
            let first = i as u64 * 64;
            if first + 64 > nbits {
                let keep = nbits - first;
                want &= if keep == 64 {
                    u64::MAX
                } else {
                    (1u64 << keep) - 1
                };
            }
            assert_eq!(got, want, "{ctx}: word {i}");
            ones += u64::from(got.count_ones());
        }
        assert_eq!(b.dirty_bits(), ones, "{ctx}");
        let bytes_dirty = b.dirty_bytes();
        assert!(bytes_dirty <= size, "{ctx}");
        assert!(bytes_dirty >= ones.saturating_sub(1) * granularity, "{ctx}");
        assert_eq!(
            b.next_set(nbits),
            None,
            "{ctx}: a bit past the device is set"
        );
        let from = rng.below(nbits + 128);
        if let Some(x) = b.next_set(from) {
            assert!(
                x >= from && x < nbits && b.is_set(x),
                "{ctx}: {from} -> {x}"
            );
        }
        assert!(Bitmap::from_bytes(size, granularity, &out) == b, "{ctx}");
        let _ = (b.is_set(u64::MAX), b.next_set(u64::MAX));
        let mut c = b.clone();
        c.clear_bit(u64::MAX);
        c.clear_bit(rng.below(nbits));
        c.merge(&Bitmap::from_bytes(size, granularity, &bytes));
        assert!(c == b, "{ctx}");
    }
}

#[test]
fn bitmap_of_an_empty_device_has_no_dirty_bytes() {
    // blockrep/src/bitmap.rs, dirty_bytes: `self.size.div_ceil(self.granularity) - 1` is
    // 0 - 1 for size 0 (from_bytes and new accept it). Not reachable from garbage bytes, only
    // from a zero size; recorded here because the loaded bitmap's size comes from elsewhere.
    let b = Bitmap::from_bytes(0, 4096, &[0xff; 64]);
    assert_eq!(b.dirty_bits(), 0);
    assert_eq!(b.dirty_bytes(), 0);
}

// ---------------------------------------------------------------------------------------------
// Journal ring.

/// A random stream record with sequence `seq` (offsets kept sane: the tests below cover
/// extreme ones), and its payload.
fn random_record(rng: &mut Rng, seq: u64) -> (Msg, Vec<u8>) {
    let offset = rng.below(1 << 40);
    match rng.below(6) {
        0 | 1 => {
            let n = if rng.one_in(8) { 0 } else { rng.index(6000) };
            let d = rng.bytes(n);
            let msg = Msg::Write {
                seq,
                term: rng.u64_edge(),
                offset,
                len: d.len() as u32,
                crc: crc32c::crc32c(&d),
                fua: rng.bool(),
            };
            (msg, d)
        }
        2 => (
            Msg::Zero {
                seq,
                term: rng.u64_edge(),
                offset,
                len: rng.u64_edge(),
                trim: rng.bool(),
            },
            Vec::new(),
        ),
        3 => (
            Msg::Flush {
                seq,
                term: rng.u64_edge(),
            },
            Vec::new(),
        ),
        4 => (
            Msg::Equal {
                seq,
                term: rng.u64_edge(),
                offset,
                len: rng.u64_edge(),
            },
            Vec::new(),
        ),
        _ => {
            if rng.bool() {
                (
                    Msg::HashReq {
                        seq,
                        term: rng.u64_edge(),
                        offset,
                        len: rng.u32_edge(),
                        block: rng.u32_edge(),
                    },
                    Vec::new(),
                )
            } else {
                let gen = GenIds {
                    current: rng.next(),
                    bitmap: rng.next(),
                    history: [rng.next(), rng.next()],
                    sync_done_unacked: rng.next(),
                };
                (
                    Msg::SyncDone {
                        seq,
                        term: rng.u64_edge(),
                        gen,
                    },
                    Vec::new(),
                )
            }
        }
    }
}

/// A ring that wrapped a few times: (ring, checkpoint position, checkpoint sequence).
fn random_ring(rng: &mut Rng) -> (Ring, u64, u64) {
    let cap = [64 * 1024, 96 * 1024 + 8 * rng.below(100)][rng.index(2)];
    let mut r = Ring::new(cap);
    let mut seq = [1, 1 + rng.below(1 << 40)][rng.index(2)];
    let rounds = 100 + rng.index(300);
    for _ in 0..rounds {
        let (msg, payload) = random_record(rng, seq);
        match append_msg(&mut r, &msg, &payload, |_| {}) {
            Ok(_) => seq += 1,
            Err(AppendError::Full { .. }) => {
                if let (Some(first), Some(last)) = (r.first_live_seq(), r.last_seq()) {
                    r.release_through(first + rng.below(last - first + 1));
                }
            }
            Err(AppendError::TooBig) => {}
            Err(AppendError::Overflowed) => unreachable!("the ring itself never overflows"),
        }
    }
    let pos = r.tail();
    let first = r.first_live_seq().unwrap_or(seq);
    (r, pos, first)
}

fn live(r: &Ring, first: u64) -> Vec<Rec> {
    r.records().filter(|x| x.seq >= first).copied().collect()
}

/// What holds for any recovered ring, whatever the image: a contiguous chain of fully valid
/// frames from the checkpoint, and accessors and appends that work.
fn check_recovered(ring: &mut Ring, pos: u64, first: u64, ctx: Ctx) {
    let cap = ring.cap();
    let recs: Vec<Rec> = ring.records().copied().collect();
    let mut end = pos;
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r.seq, first + i as u64, "{ctx}: record {i}");
        assert!(r.pos >= end, "{ctx}: record {i} overlaps the one before");
        if i == 0 {
            // At the checkpoint, or past end-of-ring filler right after it.
            assert!(
                r.pos == pos || (r.pos - pos < 32 && r.pos % cap == 0),
                "{ctx}: first record at {} for checkpoint {pos}",
                r.pos
            );
        }
        let bytes = ring.bytes(r);
        assert_eq!(bytes.len(), r.len as usize, "{ctx}");
        // The bytes are one whole, valid frame of that sequence.
        let p: [u8; PREFIX_LEN] = bytes[..PREFIX_LEN].try_into().unwrap_or([0; PREFIX_LEN]);
        let pre = peer::parse_prefix(&p).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        let hs = PREFIX_LEN + pre.header_len;
        let msg = peer::decode_header(&p, &pre, &bytes[PREFIX_LEN..hs])
            .unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert_eq!(msg.seq(), Some(r.seq), "{ctx}");
        assert_eq!(hs + pre.payload_len as usize, bytes.len(), "{ctx}");
        peer::check_payload(&msg, &bytes[hs..]).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        end = r.pos + u64::from(r.len);
    }
    assert!(ring.head() >= end, "{ctx}");
    assert!(
        ring.used() <= cap,
        "{ctx}: recovered {} bytes of records in a ring of {cap}",
        ring.used()
    );
    let mut rng = Rng::new(ctx.seed ^ 0xA5A5, ctx.iter);
    let _ = ring.get(rng.u64_edge());
    let _ = ring.lag(rng.u64_edge());
    if let Some(f) = ring.first_seq() {
        let max = rng.index(1 << 17);
        if let Some(l) = ring.lease(f, max) {
            assert!(!l.bytes().is_empty() && l.last_seq >= f, "{ctx}");
        }
        ring.unpin();
    }
    // The daemon appends after recovering: that must work too.
    let next = ring.last_seq().map_or(first, |s| s + 1);
    if cap > 0 && next < u64::MAX {
        let _ = append_msg(
            ring,
            &Msg::Flush {
                seq: next,
                term: 0x7E57,
            },
            &[],
            |_| {},
        );
    }
}

#[test]
fn journal_recover_random_images() {
    let seed = 0x5EED_1301;
    for iter in 0..400 {
        let ctx = Ctx {
            test: "journal_recover_random_images",
            seed,
            iter,
        };
        let mut rng = Rng::new(seed, iter);
        let cap = match rng.below(4) {
            0 => rng.index(64),
            1 => rng.garbage_len(),
            _ => 64 * 1024,
        };
        let mut image = rng.bytes(cap);
        if rng.bool() {
            // Sprinkle frame magics so the prefix parser gets further.
            for _ in 0..rng.index(64) {
                if cap >= 4 {
                    let at = rng.index(cap - 3);
                    image[at..at + 4].copy_from_slice(&peer::FRAME_MAGIC.to_le_bytes());
                }
            }
        }
        // Checkpoints from a superblock that is valid but says anything (kept below the
        // superblock's counter limit, as decode enforces; the top of the range is tested below).
        let pos = [0, rng.below(cap as u64 + 1), rng.below(1 << 62)][rng.index(3)];
        let first = [0, 1, rng.below(1 << 62)][rng.index(3)];
        let mut ring = Ring::recover(image, pos, first, 0);
        check_recovered(&mut ring, pos, first, ctx);
    }
}

#[test]
fn journal_recover_mutated_images_yields_a_prefix_of_the_records() {
    let seed = 0x5EED_1302;
    for iter in 0..30 {
        let mut rng = Rng::new(seed, iter);
        let (ring, pos, first) = random_ring(&mut rng);
        let cap = ring.cap();
        let image = ring.raw(0, cap).to_vec();
        let want = live(&ring, first);
        let ctx = Ctx {
            test: "journal_recover_mutated_images_yields_a_prefix_of_the_records",
            seed,
            iter,
        };
        let mut got = Ring::recover(image.clone(), pos, first, 0);
        let recs: Vec<Rec> = got.records().copied().collect();
        assert!(
            recs == want,
            "{ctx}: the unmutated image recovers other records"
        );
        // The head comes back too, unless it sat in the last 31 bytes (then the scan skips them
        // as filler, as the next append would; never over a live record: see
        // journal_recover_of_a_nearly_full_ring_keeps_it_within_its_capacity).
        if cap - ring.head() % cap >= 32 {
            assert_eq!(got.head(), ring.head(), "{ctx}");
        }
        check_recovered(&mut got, pos, first, ctx);
        for mi in 0..60 {
            let ctx = Ctx {
                iter: iter * 1000 + mi,
                ..ctx
            };
            let mut bad = mutate_in_place(&mut rng, &image);
            if mi % 4 == 0 && !want.is_empty() {
                // A length field of one record at an extreme, the rest intact.
                let r = want[rng.index(want.len())];
                let at = (r.pos % cap) as usize;
                let (off, width) = [(4, 2), (6, 4)][rng.index(2)];
                put_uint(&mut bad, at + off, width, EXTREMES[rng.index(5)], false);
            }
            let mut got = Ring::recover(bad, pos, first, 0);
            let recs: Vec<Rec> = got.records().copied().collect();
            // Any damage ends the chain at the damaged record: never a changed record.
            assert!(
                recs.len() <= want.len() && recs[..] == want[..recs.len()],
                "{ctx}: recovered records differ from the ones written"
            );
            check_recovered(&mut got, pos, first, ctx);
        }
        // A shifted checkpoint, and images of another size.
        for k in 0..20 {
            let ctx = Ctx {
                iter: iter * 1000 + 100 + k,
                ..ctx
            };
            let p = pos.saturating_add(rng.below(2 * cap)).saturating_sub(cap);
            let f = first.saturating_add(rng.below(8)).saturating_sub(4);
            let mut img = image.clone();
            if k % 2 == 1 {
                img = mutate(&mut rng, &img);
            }
            let mut got = Ring::recover(img, p, f, 0);
            check_recovered(&mut got, p, f, ctx);
        }
    }
}

/// A frame at physical 0 of a zeroed 64 KiB image.
fn image_with(msg: &Msg, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    peer::encode_frame(&mut f, msg, payload);
    let mut image = vec![0u8; 64 * 1024];
    image[..f.len()].copy_from_slice(&f);
    image
}

#[test]
fn journal_recover_with_the_last_sequence_stops() {
    // blockrep/src/journal.rs, Ring::recover: `expect += 1` after accepting a record of
    // sequence u64::MAX (checkpoint journal_seq = u64::MAX in a valid superblock).
    let image = image_with(
        &Msg::Flush {
            seq: u64::MAX,
            term: 0x7E57,
        },
        &[],
    );
    let ring = Ring::recover(image, 0, u64::MAX, 0);
    assert!(ring.len() <= 1);
}

#[test]
fn journal_recover_at_the_end_of_the_position_space_stops() {
    // blockrep/src/journal.rs, Ring::recover: pos = u64::MAX - 10 on a 64 KiB zeroed image:
    // phys 65525 has 11 bytes left, treated as filler, and `at += remain` wraps past u64::MAX.
    // (`at += len` does the same with a record there.)
    let ring = Ring::recover(vec![0u8; 64 * 1024], u64::MAX - 10, 1, 0);
    assert!(ring.is_empty());
}

#[test]
fn journal_recover_of_a_write_at_the_end_of_the_address_space() {
    // blockrep/src/journal.rs, msg_range: `(offset, offset + u64::from(len))` for a valid,
    // checksummed Write record with offset u64::MAX - 100 and 4096 bytes (Zero and Equal use
    // saturating_add there; Write does not).
    let d = vec![7u8; 4096];
    let msg = Msg::Write {
        seq: 1,
        term: 0x7E57,
        offset: u64::MAX - 100,
        len: 4096,
        crc: crc32c::crc32c(&d),
        fua: false,
    };
    let ring = Ring::recover(image_with(&msg, &d), 0, 1, 0);
    assert_eq!(ring.len(), 1);
}

#[test]
fn journal_recover_of_an_empty_image_then_append() {
    // A superblock whose layout says journal_len 0: Ring::new asserts >= 64 KiB, recover does
    // not; the append is refused as too big before `head % cap` would divide by zero.
    let mut ring = Ring::recover(Vec::new(), 0, 1, 0);
    assert!(ring.is_empty());
    let r = append_msg(
        &mut ring,
        &Msg::Flush {
            seq: 1,
            term: 0x7E57,
        },
        &[],
        |_| {},
    );
    assert_eq!(r, Err(AppendError::TooBig));
}

/// Payload size for which a Write frame of `seq` is exactly `frame` bytes long.
fn write_of_frame_len(seq: u64, frame: usize) -> (Msg, Vec<u8>) {
    for n in frame.saturating_sub(64)..frame {
        let d = vec![0x55u8; n];
        let msg = Msg::Write {
            seq,
            term: 0x7E57,
            offset: 0,
            len: n as u32,
            crc: crc32c::crc32c(&d),
            fua: false,
        };
        if peer::frame_len(&msg, n) == frame {
            return (msg, d);
        }
    }
    panic!("no write frame of exactly {frame} bytes");
}

#[test]
fn journal_recover_of_a_nearly_full_ring_keeps_it_within_its_capacity() {
    // Built with the public API only, as a primary would leave it: the oldest needed record (a
    // 17-byte Flush) ends exactly at the end of the ring, the newest ends 24 bytes before the
    // end, 7 bytes short of the tail. Recovery (blockrep/src/journal.rs, Ring::recover) took
    // the 24 bytes after the head for end-of-ring filler (`remain < 32 && phys != 0`), jumps
    // over them into the next lap, and sets head = tail + cap + 17. `used()` is then larger
    // than the ring, and Ring::append's `self.cap - self.occupied()` underflows (in a release
    // build it wraps: the append overwrites records the peer still needs).
    let cap = 64 * 1024u64;
    let mut r = Ring::new(cap);
    let flush = Msg::Flush { seq: 4, term: 1 };
    let flush_len = peer::frame_len(&flush, 0) as u64;
    assert_eq!(flush_len, 17);
    // Three writes up to cap - 16, then the flush up to cap.
    let mut at = 0;
    for seq in 1..=3 {
        let want = if seq < 3 {
            20_000
        } else {
            cap - flush_len - at
        };
        let (m, d) = write_of_frame_len(seq, want as usize);
        let rec = append_msg(&mut r, &m, &d, |_| {}).unwrap_or_else(|e| panic!("{e:?}"));
        at = rec.pos + u64::from(rec.len);
    }
    let f = append_msg(&mut r, &flush, &[], |_| {}).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(f.pos + u64::from(f.len), cap);
    // The peer has everything before the flush: the next lap may reuse it, up to cap - 24.
    r.release_through(3);
    let mut at = cap;
    for seq in 5..=7 {
        let want = if seq < 7 { 20_000 } else { 2 * cap - 24 - at };
        let (m, d) = write_of_frame_len(seq, want as usize);
        let rec = append_msg(&mut r, &m, &d, |_| {}).unwrap_or_else(|e| panic!("{e:?}"));
        at = rec.pos + u64::from(rec.len);
    }
    assert_eq!(
        (r.tail(), r.head(), r.used()),
        (f.pos, 2 * cap - 24, cap - 7)
    );
    let mut rec = Ring::recover(r.raw(0, cap).to_vec(), r.tail(), 4, 0);
    assert_eq!(rec.last_seq(), Some(7), "every record comes back");
    assert_eq!(rec.head(), r.head(), "the head comes back where it was");
    // (This used to come back with used = cap + 17: `cap - occupied` underflowed here.)
    let _ = append_msg(
        &mut rec,
        &Msg::Flush {
            seq: 8,
            term: 0x7E57,
        },
        &[],
        |_| {},
    );
    assert!(rec.used() <= cap, "used {} > cap {cap}", rec.used());
}

#[test]
fn journal_recover_stops_before_a_chain_longer_than_the_ring() {
    // Crafted image: records from the checkpoint (phys 100) to the end, a Pad, then at phys 0 a
    // Write of the next sequence whose 300-byte frame covers [0, 300), i.e. also the first
    // record's first bytes (inside its payload, which its crc covers). Ring::recover accepted it
    // (`scanned` is only checked before a record), so the records span cap + 200 bytes; the
    // next append underflows in Ring::append (`self.cap - self.occupied()`).
    let cap = 64 * 1024usize;
    let mut image = vec![0u8; cap];
    let mut at = 100;
    let mut seq = 10;
    while cap - at > 4096 + 64 {
        let (m, d) = write_of_frame_len(seq, 4096);
        let mut f = Vec::new();
        peer::encode_frame(&mut f, &m, &d);
        image[at..at + f.len()].copy_from_slice(&f);
        at += f.len();
        seq += 1;
    }
    let mut pad = Vec::new();
    peer::encode_frame(&mut pad, &Msg::Pad, &[]);
    image[at..at + pad.len()].copy_from_slice(&pad);
    // The wrapping record: its payload is whatever the image holds at [header end, 300).
    let mut hl = 8;
    let mut done = false;
    for _ in 0..16 {
        let d = image[PREFIX_LEN + hl..300].to_vec();
        let m = Msg::Write {
            seq,
            term: 0x7E57,
            offset: 0,
            len: d.len() as u32,
            crc: crc32c::crc32c(&d),
            fua: false,
        };
        let mut f = Vec::new();
        peer::encode_frame(&mut f, &m, &d);
        if f.len() == 300 {
            image[..300].copy_from_slice(&f);
            done = true;
            break;
        }
        hl = hl + f.len() - 300;
    }
    assert!(done, "could not craft the wrapping record");
    let mut ring = Ring::recover(image, 100, 10, 0);
    // The wrapping record would overlap the first: the walk stops before it.
    assert_eq!(ring.last_seq(), Some(seq - 1));
    // (This used to recover cap + 200 bytes of records: `cap - occupied` underflowed here.)
    let _ = append_msg(&mut ring, &Msg::Flush { seq, term: 0x7E57 }, &[], |_| {});
    assert!(
        ring.used() <= cap as u64,
        "used {} > cap {cap}",
        ring.used()
    );
}

#[test]
fn superblock_counters_at_the_top_of_their_range_are_rejected() {
    let mut rng = Rng::new(0x5EED_10FF, 0);
    let base = random_superblock(&mut rng);
    assert!(Superblock::decode(&base.encode().expect("encode")).is_some());
    let setters: [fn(&mut Superblock, u64); 5] = [
        |s, v| s.seq = v,
        |s, v| s.applied_seq = v,
        |s, v| s.issued_seq = v,
        |s, v| s.journal_pos = v,
        |s, v| s.journal_seq = v,
    ];
    for (i, set) in setters.iter().enumerate() {
        for v in [blockrep::meta::COUNTER_LIMIT, u64::MAX - 1, u64::MAX] {
            let mut sb = base.clone();
            set(&mut sb, v);
            let slot = sb.encode().expect("encode");
            assert!(
                Superblock::decode(&slot).is_none(),
                "counter {i} at {v} accepted"
            );
        }
    }
}
