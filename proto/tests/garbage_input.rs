//! "Never panic on garbage": every decoder in `proto` that reads bytes from the network is fed
//! random bytes and mutations of valid encodings (built with the crate's own encoders), and must
//! answer with an error (or a value that is exactly what was encoded), never a panic.
//!
//! Deterministic: a tiny xorshift64 PRNG, fixed seeds, and one PRNG per iteration derived from
//! (seed, iteration), so the `seed`/`iter` printed by a failing assertion reproduce it alone.

use proto::control;
use proto::nbd::{self, Command, NbdError, Request};
use proto::peer::{
    self, FrameError, GenIds, Msg, NodeState, FRAME_MAGIC, HASH_LEN, MAX_HASH_BLOCK, MAX_HASH_SPAN,
    MAX_HEADER_LEN, MAX_PAYLOAD_LEN, MIN_HASH_BLOCK, PREFIX_LEN,
};
use proto::seal::{self, Opener, SealError, Sealer, MAX_RECORD, TAG};

// ---------------------------------------------------------------------------------------------
// PRNG and mutations: proto/tests/fuzz/mod.rs.
mod fuzz;
use fuzz::*;
// ---------------------------------------------------------------------------------------------
// Peer frames.

/// What a reader does with the front of a stream: parse and bound the prefix, then read the
/// header, decode it, read the payload and check it. `Err(None)`: the stream is too short.
fn decode_frame(buf: &[u8], ctx: Ctx) -> Result<(Msg, &[u8], usize), Option<FrameError>> {
    let p: &[u8; PREFIX_LEN] = buf
        .get(..PREFIX_LEN)
        .and_then(|s| s.try_into().ok())
        .ok_or(None)?;
    let pre = peer::parse_prefix(p).map_err(Some)?;
    // The bounds hold before the reader allocates or reads anything more.
    assert!(
        (1..=MAX_HEADER_LEN).contains(&pre.header_len),
        "{ctx}: header length {} accepted",
        pre.header_len
    );
    assert!(
        pre.payload_len <= MAX_PAYLOAD_LEN,
        "{ctx}: payload length {} accepted",
        pre.payload_len
    );
    let header = buf
        .get(PREFIX_LEN..PREFIX_LEN + pre.header_len)
        .ok_or(None)?;
    let msg = peer::decode_header(p, &pre, header).map_err(Some)?;
    assert_eq!(
        data_len(&msg),
        pre.payload_len,
        "{ctx}: decode_header let a payload length through that the message does not imply"
    );
    let ps = PREFIX_LEN + pre.header_len;
    let payload = buf.get(ps..ps + pre.payload_len as usize).ok_or(None)?;
    peer::check_payload(&msg, payload).map_err(Some)?;
    Ok((msg, payload, ps + pre.payload_len as usize))
}

/// The payload length a message announces (0 for messages without one).
fn data_len(m: &Msg) -> u32 {
    match m {
        Msg::Write { len, .. } | Msg::BitmapPart { len, .. } | Msg::Hashes { len, .. } => *len,
        _ => 0,
    }
}

const VARIANTS: usize = 29;

/// The variant's index; exhaustive, so a new variant must be added to [`random_msg`] too.
fn variant(m: &Msg) -> usize {
    match m {
        Msg::Hello { .. } => 0,
        Msg::Auth { .. } => 1,
        Msg::Refuse { .. } => 2,
        Msg::State(_) => 3,
        Msg::Write { .. } => 4,
        Msg::Zero { .. } => 5,
        Msg::Flush { .. } => 6,
        Msg::Ack { .. } => 7,
        Msg::BitmapPart { .. } => 8,
        Msg::SyncStart { .. } => 9,
        Msg::SyncDone { .. } => 10,
        Msg::Ping { .. } => 11,
        Msg::Pad => 12,
        Msg::HashReq { .. } => 13,
        Msg::Hashes { .. } => 14,
        Msg::Equal { .. } => 15,
        Msg::VerifyRequest => 16,
        Msg::VerifyProgress(_) => 17,
        Msg::SkipSync { .. } => 18,
        Msg::SkipSyncReply { .. } => 19,
        Msg::SyncProgress { .. } => 20,
        Msg::Leaving { .. } => 21,
        Msg::Protocol { .. } => 22,
        Msg::OutOfSync { .. } => 23,
        Msg::Durable { .. } => 24,
        Msg::Checkpoint { .. } => 25,
        Msg::Reconnect => 26,
        Msg::PromoteAsk { .. } => 27,
        Msg::PromoteAnswer { .. } => 28,
    }
}

fn random_gen(rng: &mut Rng) -> GenIds {
    GenIds {
        current: rng.u64_edge(),
        bitmap: rng.u64_edge(),
        history: [rng.u64_edge(), rng.u64_edge()],
        sync_done_unacked: rng.u64_edge(),
    }
}

/// A random message of variant `v` with a payload that matches it.
fn random_msg(rng: &mut Rng, v: usize) -> (Msg, Vec<u8>) {
    let mut nonce = [0u8; 32];
    rng.fill(&mut nonce);
    let data = |rng: &mut Rng, unit: usize| {
        let n = if rng.one_in(10) { 0 } else { rng.index(2048) };
        rng.bytes(n / unit * unit)
    };
    let msg = match v {
        0 => Msg::Hello {
            version: rng.u32_edge(),
            resource: rng.string(60),
            node: rng.string(60),
            nonce,
            encryption: rng.bool(),
            protocol: rng.next() as u8,
            bitmap_granularity: rng.u32_edge(),
            after_sb_0pri: rng.next() as u8,
            direct_io: rng.bool(),
        },
        1 => Msg::Auth { mac: nonce },
        2 => Msg::Refuse {
            reason: rng.string(200),
        },
        3 => Msg::State(NodeState {
            primary: rng.bool(),
            disk: rng.next() as u8,
            size: rng.u64_edge(),
            gen: random_gen(rng),
            applied_seq: rng.u64_edge(),
            applied_term: rng.u64_edge(),
            issued_seq: rng.u64_edge(),
            journal_first_seq: rng.u64_edge(),
            durable_seq: rng.u64_edge(),
            out_of_sync: rng.u64_edge(),
            crashed_primary: rng.bool(),
            discard_my_data: rng.bool(),
            promoted_ms: rng.u64_edge(),
            disk_failed: rng.bool(),
            peer_durable_gen: rng.u64_edge(),
            peer_durable_seq: rng.u64_edge(),
            split_as_primary: rng.bool(),
        }),
        4 => {
            let d = data(rng, 1);
            let msg = Msg::Write {
                seq: rng.u64_edge(),
                term: rng.u64_edge(),
                offset: rng.u64_edge(),
                len: d.len() as u32,
                crc: crc32c::crc32c(&d),
                fua: rng.bool(),
            };
            return (msg, d);
        }
        5 => Msg::Zero {
            seq: rng.u64_edge(),
            term: rng.u64_edge(),
            offset: rng.u64_edge(),
            len: rng.u64_edge(),
            trim: rng.bool(),
        },
        6 => Msg::Flush {
            seq: rng.u64_edge(),
            term: rng.u64_edge(),
        },
        7 => Msg::Ack {
            received: rng.u64_edge(),
            applied: rng.u64_edge(),
            synced: rng.u64_edge(),
            durable: rng.u64_edge(),
        },
        8 => {
            let d = data(rng, 8);
            let msg = Msg::BitmapPart {
                first_word: rng.u64_edge(),
                words: rng.u32_edge(),
                runs: rng.bool(),
                last: rng.bool(),
                len: d.len() as u32,
                crc: crc32c::crc32c(&d),
            };
            return (msg, d);
        }
        9 => Msg::SyncStart {
            seq: rng.u64_edge(),
            full: rng.bool(),
            bytes: rng.u64_edge(),
            from: rng.u64_edge(),
        },
        10 => Msg::SyncDone {
            seq: rng.u64_edge(),
            term: rng.u64_edge(),
            gen: random_gen(rng),
        },
        11 => Msg::Ping { id: rng.u64_edge() },
        12 => Msg::Pad,
        13 => Msg::HashReq {
            seq: rng.u64_edge(),
            term: rng.u64_edge(),
            offset: rng.u64_edge(),
            len: rng.u32_edge(),
            block: rng.u32_edge(),
        },
        14 => {
            let d = data(rng, HASH_LEN);
            let msg = Msg::Hashes {
                seq: rng.u64_edge(),
                len: d.len() as u32,
                crc: crc32c::crc32c(&d),
            };
            return (msg, d);
        }
        15 => Msg::Equal {
            seq: rng.u64_edge(),
            term: rng.u64_edge(),
            offset: rng.u64_edge(),
            len: rng.u64_edge(),
        },
        16 => Msg::VerifyRequest,
        20 => Msg::SyncProgress {
            total: rng.u64_edge(),
            done: rng.u64_edge(),
            paused: rng.bool(),
        },
        21 => Msg::Leaving {
            issued: rng.u64_edge(),
            gen: rng.u64_edge(),
        },
        22 => Msg::Protocol {
            protocol: rng.below(256) as u8,
        },
        23 => Msg::OutOfSync {
            offset: rng.u64_edge(),
            len: rng.u64_edge(),
        },
        24 => Msg::Durable {
            gen: rng.u64_edge(),
            issued: rng.u64_edge(),
        },
        26 => Msg::Reconnect,
        27 => Msg::PromoteAsk { id: rng.u64_edge() },
        28 => Msg::promote_answer(
            rng.u64_edge(),
            if rng.one_in(2) {
                Ok(())
            } else {
                Err((rng.string(300), rng.bool()))
            },
        ),
        25 => Msg::Checkpoint {
            seq: rng.u64_edge(),
            term: rng.u64_edge(),
        },
        18 => Msg::SkipSync {
            gen: rng.u64_edge(),
        },
        19 => Msg::skip_sync_reply(
            rng.u64_edge(),
            if rng.one_in(2) {
                Ok(())
            } else {
                Err(rng.string(300))
            },
        ),
        _ => Msg::VerifyProgress(
            peer::VerifyReport {
                run: rng.u64_edge(),
                state: rng.string(300),
                total: rng.u64_edge(),
                done: rng.u64_edge(),
                differ_regions: rng.u64_edge(),
                differ_bytes: rng.u64_edge(),
                error: rng.string(300),
            }
            .bounded(),
        ),
    };
    assert_eq!(variant(&msg), v);
    (msg, Vec::new())
}

fn encode(msg: &Msg, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    let n = peer::encode_frame(&mut b, msg, payload);
    assert_eq!(n, b.len());
    assert_eq!(n, peer::frame_len(msg, payload.len()));
    b
}

/// A prefix with the right magic and crc for `header`, so decoding reaches postcard.
fn forged_prefix(header: &[u8], payload_len: u32) -> [u8; PREFIX_LEN] {
    let mut p = [0u8; PREFIX_LEN];
    p[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
    p[4..6].copy_from_slice(&(header.len() as u16).to_le_bytes());
    p[6..10].copy_from_slice(&payload_len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&p[..10]), header);
    p[10..14].copy_from_slice(&crc.to_le_bytes());
    p
}

#[test]
fn peer_prefix_bounds_are_exact() {
    let ctx = |iter| Ctx {
        test: "peer_prefix_bounds_are_exact",
        seed: 0x5EED_0001,
        iter,
    };
    let header_lens = [
        0u16,
        1,
        MAX_HEADER_LEN as u16 - 1,
        MAX_HEADER_LEN as u16,
        MAX_HEADER_LEN as u16 + 1,
        u16::MAX,
    ];
    let payload_lens = [0u32, 1, MAX_PAYLOAD_LEN, MAX_PAYLOAD_LEN + 1, u32::MAX];
    for (i, &hl) in header_lens.iter().enumerate() {
        for (j, &pl) in payload_lens.iter().enumerate() {
            let mut p = [0u8; PREFIX_LEN];
            p[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
            p[4..6].copy_from_slice(&hl.to_le_bytes());
            p[6..10].copy_from_slice(&pl.to_le_bytes());
            let got = peer::parse_prefix(&p);
            let want = if hl == 0 || usize::from(hl) > MAX_HEADER_LEN {
                Err(FrameError::HeaderTooLong(usize::from(hl)))
            } else if pl > MAX_PAYLOAD_LEN {
                Err(FrameError::PayloadTooLong(pl))
            } else {
                Ok(peer::Prefix {
                    header_len: usize::from(hl),
                    payload_len: pl,
                    header_crc: 0,
                })
            };
            assert_eq!(got, want, "{}", ctx((i * 10 + j) as u64));
        }
    }
    // Random prefixes (half of them with the right magic) against the same model.
    let seed = 0x5EED_0002;
    for iter in 0..20_000 {
        let ctx = Ctx {
            test: "peer_prefix_bounds_are_exact",
            seed,
            iter,
        };
        let mut rng = Rng::new(seed, iter);
        let mut p = [0u8; PREFIX_LEN];
        rng.fill(&mut p);
        if rng.bool() {
            p[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        }
        if rng.one_in(4) {
            p[4..6].copy_from_slice(&(rng.below(MAX_HEADER_LEN as u64 + 2) as u16).to_le_bytes());
        }
        if rng.one_in(4) {
            let pl = MAX_PAYLOAD_LEN - 1 + rng.below(3) as u32;
            p[6..10].copy_from_slice(&pl.to_le_bytes());
        }
        let magic = u32::from_le_bytes(p[0..4].try_into().unwrap());
        let hl = usize::from(u16::from_le_bytes([p[4], p[5]]));
        let pl = u32::from_le_bytes(p[6..10].try_into().unwrap());
        let crc = u32::from_le_bytes(p[10..14].try_into().unwrap());
        let want = if magic != FRAME_MAGIC {
            Err(FrameError::BadMagic(magic))
        } else if hl == 0 || hl > MAX_HEADER_LEN {
            Err(FrameError::HeaderTooLong(hl))
        } else if pl > MAX_PAYLOAD_LEN {
            Err(FrameError::PayloadTooLong(pl))
        } else {
            Ok(peer::Prefix {
                header_len: hl,
                payload_len: pl,
                header_crc: crc,
            })
        };
        assert_eq!(peer::parse_prefix(&p), want, "{ctx}");
    }
}

#[test]
fn peer_random_bytes_never_decode_or_panic() {
    let seed = 0x5EED_0003;
    for iter in 0..3_000 {
        let ctx = Ctx {
            test: "peer_random_bytes_never_decode_or_panic",
            seed,
            iter,
        };
        let mut rng = Rng::new(seed, iter);
        let n = rng.garbage_len();
        let mut b = rng.bytes(n);
        if rng.bool() && b.len() >= 4 {
            b[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        }
        // Pure garbage passes the header crc with probability 2^-32: with these seeds, never.
        if let Ok((m, _, _)) = decode_frame(&b, ctx) {
            panic!("{ctx}: garbage decoded as {m:?}");
        }
    }
}

/// A bitmap part's payload, random or a mutation of a valid one, decodes to exactly its
/// words or is refused; a valid one round-trips.
#[test]
fn peer_bitmap_parts_decode_exactly_or_are_refused() {
    use proto::bitmap_wire::{decode_part, encode_part};
    let seed = 0x5EED_00B1;
    for iter in 0..3_000 {
        let ctx = Ctx {
            test: "peer_bitmap_parts_decode_exactly_or_are_refused",
            seed,
            iter,
        };
        let mut rng = Rng::new(seed, iter);
        let words = rng.index(300);
        // Sparse or dense words, so that both forms occur.
        let sparse = rng.bool();
        let part: Vec<u64> = (0..words)
            .map(|_| match (sparse, rng.below(4)) {
                (true, 0) => 1u64 << rng.below(64),
                (true, _) => 0,
                (false, 0) => u64::MAX,
                (false, _) => rng.next(),
            })
            .collect();
        let mut payload = Vec::new();
        let runs = encode_part(&part, &mut payload);
        let mut back = vec![0u64; words];
        assert_eq!(decode_part(&payload, runs, &mut back), Ok(()), "{ctx}");
        assert_eq!(back, part, "{ctx}");
        // Garbage and mutations: an error, or some words (never a panic or a write past the
        // part's words).
        let bad = if rng.bool() {
            let n = rng.garbage_len();
            rng.bytes(n)
        } else {
            mutate(&mut rng, &payload)
        };
        let mut out = vec![0u64; words];
        let _ = decode_part(&bad, rng.bool(), &mut out);
        assert_eq!(out.len(), words, "{ctx}");
    }
}

#[test]
fn peer_garbage_headers_with_valid_crc_reach_postcard_safely() {
    // The crc is made to match, so postcard itself sees the garbage: it must fail cleanly or
    // produce a message whose payload rule decode_header enforces.
    let seed = 0x5EED_0004;
    let mut decoded = 0u32;
    for iter in 0..20_000 {
        let ctx = Ctx {
            test: "peer_garbage_headers_with_valid_crc_reach_postcard_safely",
            seed,
            iter,
        };
        let mut rng = Rng::new(seed, iter);
        let max = if rng.bool() { 16 } else { MAX_HEADER_LEN };
        let hl = 1 + rng.index(max);
        let mut header = rng.bytes(hl);
        // Steer the variant tag into range half of the time.
        if rng.bool() {
            header[0] = rng.below(VARIANTS as u64 + 1) as u8;
        }
        let pl = match rng.below(4) {
            0 => 0,
            1 => rng.below(64) as u32,
            2 => rng.u32_edge() % (MAX_PAYLOAD_LEN + 1),
            _ => u32::from_le_bytes(
                header
                    .get(1..5)
                    .map_or([0; 4], |s| s.try_into().unwrap_or([0; 4])),
            ),
        };
        let pl = pl.min(MAX_PAYLOAD_LEN);
        let p = forged_prefix(&header, pl);
        let pre = peer::parse_prefix(&p).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        if let Ok(m) = peer::decode_header(&p, &pre, &header) {
            decoded += 1;
            assert_eq!(data_len(&m), pl, "{ctx}: {m:?}");
            // Checking any payload against it never panics.
            let payload = rng.bytes((pl as usize).min(4096));
            let _ = peer::check_payload(&m, &payload);
            let _ = m.seq();
        }
    }
    assert!(
        decoded > 100,
        "the garbage never reached a message ({decoded})"
    );
}

#[test]
fn peer_valid_frames_round_trip_and_every_mutation_is_caught() {
    // A stream of frames of every variant, mutated: a reader decodes a prefix of the original
    // frames, each exactly as sent, then stops with an error; it never accepts altered bytes.
    let seed = 0x5EED_0005;
    for iter in 0..1_500 {
        let ctx = Ctx {
            test: "peer_valid_frames_round_trip_and_every_mutation_is_caught",
            seed,
            iter,
        };
        let mut rng = Rng::new(seed, iter);
        let frames: Vec<(Msg, Vec<u8>)> = (0..1 + rng.index(6))
            .map(|k| {
                let v = if k == 0 {
                    iter as usize % VARIANTS
                } else {
                    rng.index(VARIANTS)
                };
                random_msg(&mut rng, v)
            })
            .collect();
        let encoded: Vec<Vec<u8>> = frames.iter().map(|(m, p)| encode(m, p)).collect();
        let stream = encoded.concat();
        // Unmutated: everything decodes.
        let mut at = 0;
        for (k, (m, p)) in frames.iter().enumerate() {
            let (gm, gp, n) = decode_frame(&stream[at..], ctx)
                .unwrap_or_else(|e| panic!("{ctx}: frame {k} ({m:?}) does not decode: {e:?}"));
            assert!(
                &gm == m && gp == &p[..] && n == encoded[k].len(),
                "{ctx}: frame {k} ({m:?}) decodes as {gm:?}"
            );
            at += n;
        }
        for mi in 0..12 {
            let bad = mutate(&mut rng, &stream);
            let mut at = 0;
            let mut k = 0;
            while let Ok((gm, gp, n)) = decode_frame(&bad[at..], ctx) {
                // Frames are protected one by one: a mutation may move or copy a whole frame
                // (ordering is the seal's and the sequence numbers' job), but every frame that
                // decodes is byte for byte one that was sent, and decodes as it was sent.
                let sent = encoded.iter().position(|e| e[..] == bad[at..at + n]);
                let Some(j) = sent else {
                    panic!("{ctx} mutation {mi}: frame {k} decoded as {gm:?} from altered bytes");
                };
                assert!(
                    gm == frames[j].0 && gp == &frames[j].1[..],
                    "{ctx} mutation {mi}: frame {k} decoded as {gm:?}, not as sent"
                );
                at += n;
                k += 1;
            }
        }
        // The length fields at their extremes: out of bounds is refused by the prefix, before
        // the header or payload would be read.
        let first = &encoded[0];
        let first_hl = u16::from_le_bytes([first[4], first[5]]);
        for hl in [0u16, 1, MAX_HEADER_LEN as u16 + 1, u16::MAX] {
            let mut bad = first.clone();
            bad[4..6].copy_from_slice(&hl.to_le_bytes());
            let p: [u8; PREFIX_LEN] = bad[..PREFIX_LEN].try_into().unwrap();
            let r = peer::parse_prefix(&p);
            if hl == 0 || usize::from(hl) > MAX_HEADER_LEN {
                assert_eq!(r, Err(FrameError::HeaderTooLong(usize::from(hl))), "{ctx}");
            }
            if hl != first_hl {
                assert!(decode_frame(&bad, ctx).is_err(), "{ctx}: header_len {hl}");
            }
        }
        for pl in [0u32, 1, MAX_PAYLOAD_LEN + 1, u32::MAX] {
            let mut bad = first.clone();
            bad[6..10].copy_from_slice(&pl.to_le_bytes());
            let p: [u8; PREFIX_LEN] = bad[..PREFIX_LEN].try_into().unwrap();
            if pl > MAX_PAYLOAD_LEN {
                assert_eq!(
                    peer::parse_prefix(&p),
                    Err(FrameError::PayloadTooLong(pl)),
                    "{ctx}"
                );
            }
            let r = decode_frame(&bad, ctx);
            if pl != data_len(&frames[0].0) {
                assert!(r.is_err(), "{ctx}: payload_len {pl} accepted");
            }
        }
    }
}

#[test]
fn peer_mutated_headers_with_recomputed_crc_keep_the_payload_rule() {
    // A buggy or hostile sender can produce any header with a valid crc: postcard sees
    // mutations of real headers, and whatever decodes must still imply the announced payload.
    let seed = 0x5EED_0006;
    for iter in 0..6_000 {
        let ctx = Ctx {
            test: "peer_mutated_headers_with_recomputed_crc_keep_the_payload_rule",
            seed,
            iter,
        };
        let mut rng = Rng::new(seed, iter);
        let (m, payload) = random_msg(&mut rng, iter as usize % VARIANTS);
        let f = encode(&m, &payload);
        let hl = usize::from(u16::from_le_bytes([f[4], f[5]]));
        let header = &f[PREFIX_LEN..PREFIX_LEN + hl];
        let mut bad = mutate(&mut rng, header);
        bad.truncate(MAX_HEADER_LEN);
        if bad.is_empty() {
            continue;
        }
        let pl = if rng.bool() {
            payload.len() as u32
        } else {
            rng.u32_edge() % (MAX_PAYLOAD_LEN + 1)
        };
        let p = forged_prefix(&bad, pl);
        let pre = peer::parse_prefix(&p).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        if let Ok(got) = peer::decode_header(&p, &pre, &bad) {
            assert_eq!(data_len(&got), pl, "{ctx}: {got:?}");
            let _ = peer::check_payload(&got, &payload);
        }
    }
}

#[test]
fn peer_payload_mutations_are_always_detected() {
    let seed = 0x5EED_0007;
    for iter in 0..600 {
        let ctx = Ctx {
            test: "peer_payload_mutations_are_always_detected",
            seed,
            iter,
        };
        let mut rng = Rng::new(seed, iter);
        let v = [4, 8, 14][iter as usize % 3];
        let (m, mut payload) = random_msg(&mut rng, v);
        if payload.is_empty() {
            payload = rng.bytes(if v == 14 { HASH_LEN } else { 8 });
        }
        if iter % 3 == 0 {
            // Small payloads: every single-bit flip.
            payload.truncate(if v == 14 { HASH_LEN } else { 40 });
        }
        let m = match m {
            Msg::Write {
                seq,
                term,
                offset,
                fua,
                ..
            } => Msg::Write {
                seq,
                term,
                offset,
                len: payload.len() as u32,
                crc: crc32c::crc32c(&payload),
                fua,
            },
            Msg::BitmapPart {
                first_word,
                words,
                runs,
                last,
                ..
            } => Msg::BitmapPart {
                first_word,
                words,
                runs,
                last,
                len: payload.len() as u32,
                crc: crc32c::crc32c(&payload),
            },
            Msg::Hashes { seq, .. } => Msg::Hashes {
                seq,
                len: payload.len() as u32,
                crc: crc32c::crc32c(&payload),
            },
            other => unreachable!("{other:?}"),
        };
        let want_seq = match m {
            Msg::Write { seq, .. } | Msg::Hashes { seq, .. } => seq,
            _ => 0,
        };
        let f = encode(&m, &payload);
        let ps = f.len() - payload.len();
        assert_eq!(peer::check_payload(&m, &payload), Ok(()), "{ctx}");
        let check = |bad: &[u8], what: &str| {
            if bad == &payload[..] {
                return;
            }
            if bad.len() == payload.len() {
                assert_eq!(
                    peer::check_payload(&m, bad),
                    Err(FrameError::PayloadCrc { seq: want_seq }),
                    "{ctx}: {what} accepted by the payload crc"
                );
            }
            let mut frame = f[..ps].to_vec();
            frame.extend_from_slice(bad);
            if let Ok((gm, gp, _)) = decode_frame(&frame, ctx) {
                assert!(
                    gm == m && gp == &payload[..],
                    "{ctx}: {what}: a frame with an altered payload decoded"
                );
            }
        };
        if payload.len() <= 64 {
            for bit in 0..payload.len() * 8 {
                let mut bad = payload.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                check(&bad, &format!("flip of bit {bit}"));
            }
        }
        for mi in 0..24 {
            // In-place mutations (same length), then any mutation.
            let mut bad = mutate(&mut rng, &payload);
            if mi % 2 == 0 {
                bad.resize(payload.len(), 0);
            }
            check(&bad, &format!("mutation {mi}"));
        }
    }
}

/// The reason the daemon sends when a peer's hello names another resource
/// (blockrep/src/peer.rs, handshake), rebuilt here since that function is private.
fn refuse_reason_for(resource: &str) -> String {
    format!("peer at 192.0.2.1:7789 is for resource {resource:?}, not \"r0\"")
}

#[test]
fn peer_hello_with_a_long_resource_name_decodes() {
    // The longest resource a hello can carry within MAX_HEADER_LEN decodes fine...
    let hello = Msg::Hello {
        version: peer::PROTOCOL_VERSION,
        resource: "\u{1}".repeat(900),
        node: "n".into(),
        nonce: [0; 32],
        encryption: false,
        protocol: b'C',
        bitmap_granularity: 4096,
        after_sb_0pri: 0,
        direct_io: false,
    };
    let f = encode(&hello, &[]);
    let ctx = Ctx {
        test: "peer_hello_with_a_long_resource_name_decodes",
        seed: 0,
        iter: 0,
    };
    let (m, _, _) = decode_frame(&f, ctx).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(m, hello);
    assert!(refuse_reason_for(&"\u{1}".repeat(900)).len() > MAX_HEADER_LEN);
}

#[test]
fn peer_refuse_echoing_a_long_resource_name_is_bounded() {
    // A peer sends a valid Hello whose resource is 900 × U+0001 (a 907-byte header). The
    // handshake answers with a reason quoting it: Debug escapes each U+0001 as `\u{1}`, so
    // the reason is ~4.5 KB. `Msg::refuse` (what the daemon sends) cuts it to the bound, at a
    // character boundary, so the frame encodes and decodes (it used to trip encode_frame's
    // header assert, before authentication).
    for resource in ["\u{1}".repeat(900), "é".repeat(2000), "x".repeat(980)] {
        let reason = refuse_reason_for(&resource);
        let m = Msg::refuse(&reason);
        let Msg::Refuse { reason: sent } = &m else {
            panic!("Msg::refuse built {m:?}");
        };
        assert!(
            sent.len() <= peer::MAX_REFUSE_REASON + 3,
            "{} bytes",
            sent.len()
        );
        assert!(reason.starts_with(sent.trim_end_matches("...")));
        let mut b = Vec::new();
        peer::encode_frame(&mut b, &m, &[]);
        let ctx = Ctx {
            test: "peer_refuse_echoing_a_long_resource_name_is_bounded",
            seed: 0,
            iter: 0,
        };
        let (back, _, _) = decode_frame(&b, ctx).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(back, m);
    }
}

#[test]
fn peer_hash_count_is_total_and_bounded() {
    let seed = 0x5EED_0008;
    for iter in 0..50_000 {
        let ctx = Ctx {
            test: "peer_hash_count_is_total_and_bounded",
            seed,
            iter,
        };
        let mut rng = Rng::new(seed, iter);
        let len = rng.u32_edge();
        let block = if rng.bool() {
            1u32 << rng.below(32)
        } else {
            rng.u32_edge()
        };
        if let Some(n) = peer::hash_count(len, block) {
            let (l, b, n64) = (u64::from(len), u64::from(block), n as u64);
            assert!(
                n >= 1 && n64 * b >= l && (n64 - 1) * b < l,
                "{ctx}: {len} {block} -> {n}"
            );
            assert!(len <= MAX_HASH_SPAN && (MIN_HASH_BLOCK..=MAX_HASH_BLOCK).contains(&block));
            assert!(n * HASH_LEN <= MAX_PAYLOAD_LEN as usize, "{ctx}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// NBD.

#[test]
fn nbd_client_flags_and_option_headers() {
    for flags in (0u32..=1024).chain([u32::MAX, u32::MAX - 1, 1 << 31, (1 << 31) | 1]) {
        let r = nbd::parse_client_flags(flags);
        match flags {
            1 => assert_eq!(r, Ok(false)),
            3 => assert_eq!(r, Ok(true)),
            _ => assert_eq!(r, Err(NbdError::BadClientFlags(flags))),
        }
    }
    let seed = 0x5EED_0101;
    for iter in 0..20_000 {
        let ctx = Ctx {
            test: "nbd_client_flags_and_option_headers",
            seed,
            iter,
        };
        let mut rng = Rng::new(seed, iter);
        let mut h = [0u8; nbd::OPTION_HEADER_LEN];
        rng.fill(&mut h);
        if rng.one_in(4) {
            h[0..8].copy_from_slice(&nbd::IHAVEOPT.to_be_bytes());
        }
        let len = match rng.below(3) {
            0 => EXTREMES[rng.index(EXTREMES.len())] as u32,
            1 => nbd::MAX_OPTION_LEN - 1 + rng.below(3) as u32,
            _ => rng.next() as u32,
        };
        h[12..16].copy_from_slice(&len.to_be_bytes());
        let magic = u64::from_be_bytes(h[0..8].try_into().unwrap());
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let want = if magic != nbd::IHAVEOPT {
            Err(NbdError::BadOptionMagic(magic))
        } else if len > nbd::MAX_OPTION_LEN {
            Err(NbdError::OptionTooLong { option, len })
        } else {
            Ok((option, len))
        };
        assert_eq!(nbd::parse_option_header(&h), want, "{ctx}");
        let _ = nbd::parse_client_flags(rng.next() as u32);
    }
}

fn encode_info_request(name: &[u8], requests: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name);
    d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

#[test]
fn nbd_info_requests_parse_strictly() {
    let seed = 0x5EED_0102;
    for iter in 0..8_000 {
        let ctx = Ctx {
            test: "nbd_info_requests_parse_strictly",
            seed,
            iter,
        };
        let mut rng = Rng::new(seed, iter);
        let option = [nbd::OPT_GO, nbd::OPT_INFO, rng.next() as u32][rng.index(3)];
        let name = rng.string(64);
        let requests: Vec<u16> = (0..rng.index(12)).map(|_| rng.next() as u16).collect();
        let valid = encode_info_request(name.as_bytes(), &requests);
        let ok = nbd::parse_info_request(option, &valid)
            .unwrap_or_else(|e| panic!("{ctx}: valid request refused: {e}"));
        assert_eq!(
            (ok.name.as_str(), &ok.requests[..]),
            (&name[..], &requests[..])
        );
        let input = match rng.below(4) {
            0 => {
                let n = rng.garbage_len();
                rng.bytes(n)
            }
            1 => {
                // The name length at an extreme.
                let mut b = valid.clone();
                let v = [
                    0u64,
                    1,
                    u64::from(u32::MAX),
                    b.len() as u64,
                    b.len() as u64 - 5,
                ][rng.index(5)];
                put_uint(&mut b, 0, 4, v, true);
                b
            }
            2 => {
                // The request count at an extreme.
                let mut b = valid.clone();
                let at = 4 + name.len();
                put_uint(&mut b, at, 2, [0, 1, 0xffff, 0x8000][rng.index(4)], true);
                b
            }
            _ => mutate(&mut rng, &valid),
        };
        match nbd::parse_info_request(option, &input) {
            Ok(r) => assert_eq!(
                encode_info_request(r.name.as_bytes(), &r.requests),
                input,
                "{ctx}: accepted bytes that are not exactly one request"
            ),
            Err(NbdError::MalformedOption { option: o, .. }) => assert_eq!(o, option, "{ctx}"),
            Err(e) => panic!("{ctx}: unexpected error {e}"),
        }
    }
}

fn random_command(rng: &mut Rng) -> Command {
    match rng.below(10) {
        0 => Command::Read,
        1 => Command::Write,
        2 => Command::Disc,
        3 => Command::Flush,
        4 => Command::Trim,
        5 => Command::Cache,
        6 => Command::WriteZeroes,
        7 => Command::BlockStatus,
        _ => Command::Other(8 + rng.below(u64::from(u16::MAX) - 7) as u16),
    }
}

#[test]
fn nbd_request_headers_round_trip_or_fail() {
    let seed = 0x5EED_0103;
    for iter in 0..20_000 {
        let ctx = Ctx {
            test: "nbd_request_headers_round_trip_or_fail",
            seed,
            iter,
        };
        let mut rng = Rng::new(seed, iter);
        let req = Request {
            flags: rng.next() as u16,
            command: random_command(&mut rng),
            cookie: rng.u64_edge(),
            offset: rng.u64_edge(),
            length: rng.u32_edge(),
        };
        let mut valid = Vec::new();
        req.encode(&mut valid);
        assert_eq!(valid.len(), nbd::REQUEST_HEADER_LEN);
        let mut h = [0u8; nbd::REQUEST_HEADER_LEN];
        match rng.below(3) {
            0 => rng.fill(&mut h),
            1 => {
                let mut b = valid.clone();
                put_uint(&mut b, 24, 4, EXTREMES[rng.index(EXTREMES.len())], true);
                h.copy_from_slice(&b);
            }
            _ => {
                let mut b = mutate(&mut rng, &valid);
                b.resize(nbd::REQUEST_HEADER_LEN, 0);
                h.copy_from_slice(&b);
            }
        }
        if rng.one_in(4) {
            h.copy_from_slice(&valid);
        }
        match Request::parse(&h) {
            Ok(r) => {
                let mut again = Vec::new();
                r.encode(&mut again);
                assert_eq!(again, h, "{ctx}: parse does not round-trip");
                assert!(
                    r.command != Command::Write || r.length <= nbd::MAX_REQUEST_LEN,
                    "{ctx}: oversized write accepted"
                );
                let size = rng.u64_edge();
                let end = u128::from(r.offset) + u128::from(r.length);
                assert_eq!(r.in_bounds(size), end <= u128::from(size), "{ctx}");
                let _ = r.out_of_bounds_error();
            }
            Err(NbdError::BadRequestMagic(m)) => {
                assert_ne!(m, nbd::REQUEST_MAGIC, "{ctx}")
            }
            Err(NbdError::RequestTooLong(n)) => {
                assert!(n > nbd::MAX_REQUEST_LEN, "{ctx}");
                assert_eq!(u16::from_be_bytes([h[6], h[7]]), 1, "{ctx}");
            }
            Err(e) => panic!("{ctx}: unexpected error {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sealed records.

#[test]
fn seal_body_length_bounds_are_exact() {
    let edges = [
        0u32,
        1,
        TAG as u32 - 1,
        TAG as u32,
        TAG as u32 + 1,
        (MAX_RECORD + TAG) as u32,
        (MAX_RECORD + TAG) as u32 + 1,
        u32::MAX,
    ];
    let seed = 0x5EED_0201;
    let mut rng = Rng::new(seed, 0);
    for n in edges.into_iter().chain((0..20_000).map(|_| rng.u32_edge())) {
        let want = n as usize;
        let got = Opener::body_len(n.to_le_bytes());
        if (TAG..=MAX_RECORD + TAG).contains(&want) {
            assert_eq!(got, Ok(want), "seed {seed:#x} length {n}");
        } else {
            assert_eq!(
                got,
                Err(SealError::BadLength(want)),
                "seed {seed:#x} length {n}"
            );
        }
    }
}

fn key(rng: &mut Rng) -> [u8; 32] {
    let n = rng.index(100);
    let secret = rng.bytes(n);
    let mut a = [0u8; 32];
    let mut b = [0u8; 32];
    rng.fill(&mut a);
    rng.fill(&mut b);
    seal::derive_key(&secret, &rng.string(20), &rng.string(20), &a, &b)
}

#[test]
fn seal_garbage_bodies_never_open() {
    let seed = 0x5EED_0202;
    for iter in 0..1_000 {
        let ctx = Ctx {
            test: "seal_garbage_bodies_never_open",
            seed,
            iter,
        };
        let mut rng = Rng::new(seed, iter);
        let mut o = Opener::new(&key(&mut rng));
        // Garbage lengths, but no megabytes: AES-GCM runs unoptimised in this build.
        let n = rng.index(4096);
        let mut body = rng.bytes(n);
        let r = o.open_in_place(&mut body);
        if (TAG..=MAX_RECORD + TAG).contains(&n) {
            assert_eq!(r, Err(SealError::Forged(0)), "{ctx}");
        } else {
            assert_eq!(r, Err(SealError::BadLength(n)), "{ctx}");
        }
    }
    // One byte over the largest record is refused on its length, before any crypto. (The
    // largest itself, 4 MiB, is left out: unoptimised GHASH over it takes most of a second;
    // body_len's bounds are checked exactly in seal_body_length_bounds_are_exact.)
    let mut rng = Rng::new(seed, u64::MAX);
    let mut o = Opener::new(&key(&mut rng));
    let mut big = vec![0u8; MAX_RECORD + TAG + 1];
    assert_eq!(
        o.open_in_place(&mut big),
        Err(SealError::BadLength(MAX_RECORD + TAG + 1))
    );
}

/// Opens a sealed stream record by record, as the link's reader does. Returns the plaintext of
/// each record that opened, and the error that ended the stream (`None`: clean end).
fn open_stream(key: &[u8; 32], mut b: &[u8]) -> (Vec<Vec<u8>>, Option<SealError>) {
    let mut o = Opener::new(key);
    let mut out = Vec::new();
    while !b.is_empty() {
        let Some(p) = b.get(..seal::PREFIX) else {
            return (out, Some(SealError::BadLength(b.len())));
        };
        let n = match Opener::body_len(p.try_into().unwrap_or([0; 4])) {
            Ok(n) => n,
            Err(e) => return (out, Some(e)),
        };
        let Some(body) = b.get(seal::PREFIX..seal::PREFIX + n) else {
            return (out, Some(SealError::BadLength(n)));
        };
        let mut body = body.to_vec();
        match o.open_in_place(&mut body) {
            Ok(len) => out.push(body[..len].to_vec()),
            Err(e) => return (out, Some(e)),
        }
        b = &b[seal::PREFIX + n..];
    }
    (out, None)
}

#[test]
fn seal_tampered_records_never_open() {
    let seed = 0x5EED_0203;
    for iter in 0..300 {
        let ctx = Ctx {
            test: "seal_tampered_records_never_open",
            seed,
            iter,
        };
        let mut rng = Rng::new(seed, iter);
        let k = key(&mut rng);
        let mut s = Sealer::new(&k);
        let plain: Vec<Vec<u8>> = (0..1 + rng.index(5))
            .map(|_| {
                // Sealer makes no record of an empty batch.
                // Small: AES-GCM is monomorphised into the debug-built crate (~5 MB/s).
                let n = 1 + rng.index(300);
                rng.bytes(n)
            })
            .collect();
        let mut records = Vec::new();
        for p in &plain {
            let mut r = Vec::new();
            s.seal_into(p, &mut r)
                .unwrap_or_else(|e| panic!("{ctx}: {e}"));
            records.push(r);
        }
        let stream = records.concat();
        let (got, end) = open_stream(&k, &stream);
        assert!(got == plain && end.is_none(), "{ctx}: {end:?}");
        let check = |bad: &[u8], what: &str| {
            let (got, _) = open_stream(&k, bad);
            assert!(
                got.len() <= plain.len(),
                "{ctx}: {what}: extra records opened"
            );
            for (i, g) in got.iter().enumerate() {
                assert!(g == &plain[i], "{ctx}: {what}: record {i} opened altered");
            }
            if bad.len() <= stream.len() && bad != &stream[..bad.len()] {
                // Changed bytes (not just a cut): the record holding the first change fails.
                let first = bad
                    .iter()
                    .zip(&stream)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                let mut end = 0;
                let held = records
                    .iter()
                    .position(|r| {
                        end += r.len();
                        first < end
                    })
                    .unwrap_or(records.len());
                assert!(
                    got.len() <= held,
                    "{ctx}: {what}: the altered record {held} opened"
                );
            }
        };
        for mi in 0..30 {
            let bad = mutate(&mut rng, &stream);
            check(&bad, &format!("mutation {mi}"));
        }
        // Length prefixes at extremes: refused by body_len, before a body is read.
        for v in [
            0u32,
            1,
            TAG as u32 - 1,
            (MAX_RECORD + TAG) as u32 + 1,
            u32::MAX,
        ] {
            let mut bad = stream.clone();
            bad[0..4].copy_from_slice(&v.to_le_bytes());
            let (got, end) = open_stream(&k, &bad);
            assert!(got.is_empty(), "{ctx}");
            assert_eq!(end, Some(SealError::BadLength(v as usize)), "{ctx}");
        }
        if records.len() >= 2 {
            // Reordered, replayed and dropped records.
            let swapped = [&records[1][..], &records[0][..]].concat();
            check(&swapped, "swapped");
            assert!(
                open_stream(&k, &swapped).0.is_empty(),
                "{ctx}: reordered opened"
            );
            let replay = [&records[0][..], &records[0][..]].concat();
            assert_eq!(open_stream(&k, &replay).0.len(), 1, "{ctx}: replay opened");
            let dropped = records[1..].concat();
            assert!(
                open_stream(&k, &dropped).0.is_empty(),
                "{ctx}: drop unnoticed"
            );
        }
        // Another key (the other direction, another connection).
        let other = key(&mut rng);
        assert!(
            open_stream(&other, &stream).0.is_empty(),
            "{ctx}: wrong key"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Control lines.

fn requests() -> Vec<control::Request> {
    use control::Request as R;
    vec![
        R::Up,
        R::Down { force: false },
        R::Down { force: true },
        R::Status,
        R::Primary { force: true },
        R::Secondary { force: false },
        R::Connect {
            discard_my_data: true,
        },
        R::Disconnect,
        R::Invalidate,
        R::InvalidateRemote {
            reset_bitmap: false,
        },
        R::Outdate,
        R::ResumeIo,
        R::PauseSync,
        R::ResumeSync,
        R::Verify,
        R::SkipInitialSync,
    ]
}

fn replies() -> Vec<control::Reply> {
    let status = control::Status {
        resource: "r0".into(),
        node: "alpha".into(),
        kernel_device: Some("/dev/nbd0".into()),
        replication: Some(control::PeerStatus {
            peer: "beta".into(),
            last_error: Some("x".into()),
            verify: Some(control::VerifyStatus {
                run: 3,
                state: "done".into(),
                error: Some("e".into()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    vec![
        control::Reply::Ok {
            message: "fine".into(),
        },
        control::Reply::Error {
            message: "no \"quotes\" \u{1F600}".into(),
        },
        control::Reply::Status {
            status: Box::default(),
        },
        control::Reply::Status {
            status: Box::new(status),
        },
    ]
}

#[test]
fn control_lines_never_panic() {
    let reqs = requests();
    let reps = replies();
    let lines: Vec<String> = reqs
        .iter()
        .map(|r| r.to_line())
        .chain(reps.iter().map(|r| r.to_line()))
        .collect();
    let seed = 0x5EED_0301;
    for iter in 0..4_000 {
        let ctx = Ctx {
            test: "control_lines_never_panic",
            seed,
            iter,
        };
        let mut rng = Rng::new(seed, iter);
        let input = if rng.one_in(4) {
            let n = rng.garbage_len();
            rng.bytes(n)
        } else {
            let line = lines[rng.index(lines.len())].as_bytes();
            let mut b = mutate(&mut rng, line);
            if rng.bool() {
                b = mutate(&mut rng, &b);
            }
            b
        };
        if let Ok(r) = serde_json::from_slice::<control::Request>(&input) {
            let back: control::Request = serde_json::from_str(r.to_line().trim_end())
                .unwrap_or_else(|e| panic!("{ctx}: {e}"));
            assert_eq!(back, r, "{ctx}");
        }
        if let Ok(r) = serde_json::from_slice::<control::Reply>(&input) {
            let back: control::Reply = serde_json::from_str(r.to_line().trim_end())
                .unwrap_or_else(|e| panic!("{ctx}: {e}"));
            assert_eq!(back, r, "{ctx}");
        }
        let _ = serde_json::from_slice::<control::Status>(&input);
        let _ = serde_json::from_slice::<control::PeerStatus>(&input);
    }
    // Deep nesting hits serde_json's recursion limit instead of the stack; a line far over
    // MAX_LINE (the daemon bounds lines before decoding) is still just an error.
    for open in ["[", "{\"cmd\":", "{\"result\":\"status\",\"status\":"] {
        let deep = open.repeat(100_000);
        assert!(serde_json::from_str::<control::Request>(&deep).is_err());
        assert!(serde_json::from_str::<control::Reply>(&deep).is_err());
    }
    let mut rng = Rng::new(seed, u64::MAX);
    let huge = rng.bytes(control::MAX_LINE * 4);
    assert!(serde_json::from_slice::<control::Reply>(&huge).is_err());
}
