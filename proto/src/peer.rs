//! The replication link between two nodes, and the journal's record format (the same bytes).
//!
//! A frame is a fixed 14-byte prefix, a postcard-encoded [`Msg`] header and an optional payload:
//!
//! ```text
//! magic u32 | header_len u16 | payload_len u32 | header_crc u32 | header | payload
//! ```
//!
//! `header_crc` is crc32c over the prefix's first 10 bytes and the header; data messages carry
//! the payload's crc32c inside the header. Both lengths are bounded before anything is
//! allocated. Journal records on disk are frames too, so the sender streams them unchanged.

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub const FRAME_MAGIC: u32 = 0x4252_5031; // "BRP1"
/// 20: `PromoteAsk` / `PromoteAnswer`: a secondary asks its connected peer before it becomes
/// primary, so two promoted at the same moment do not both win; `Hello::after_sb_0pri`, the
/// split-brain policy both nodes must share.
/// 19: `Reconnect` (a planned reconnect the peer must not take for a lost node),
/// `SyncProgress::paused` (the target shows a resync its source paused) and
/// `GenIds::sync_done_unacked` (a SyncDone whose acknowledgement was lost).
/// 18: `Ack::synced`: the secondary reports data synced to its disk before the applied mark
/// that says so is committed, so a flush under C is answered one metadata sync sooner.
/// 22: the dirty bitmap crosses in parts (`BitmapPart`), each as words or run lengths
/// (`bitmap_wire`), instead of one frame of words: a mostly clean bitmap is a few bytes, and a
/// device's bitmap is no longer limited to one frame (1 TiB at 4 KiB a bit).
/// 21: the hello names whether the node's export takes direct I/O (`direct_io`, both must
/// agree), and `NodeState::split_as_primary` (which node was primary when the two parted).
/// 17: `Checkpoint`, a durability point that is not a barrier (the primary's own requests
/// for the peer's durable mark no longer hold the stream up while the peer syncs).
/// 16: what each node last heard its peer's disk holds (`Durable`, `NodeState`).
/// 15: every resync names a bitmap generation (`SyncStart::from`) the target takes as its
/// current one, and the target records the stream's start as its durable mark (which the
/// source checks against what the target acknowledged before any resync).
/// 14: a resync's target forgets its own bitmap at the SyncStart, which the source sends
/// only once the merged bitmap is on its disk.
pub const PROTOCOL_VERSION: u32 = 22;
pub const PREFIX_LEN: usize = 14;
pub const MAX_HEADER_LEN: usize = 1024;
/// Largest payload: one NBD request (32 MiB) or one resync chunk.
pub const MAX_PAYLOAD_LEN: u32 = 32 * 1024 * 1024;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad frame magic {0:#x} (not a blockrep peer, or the stream is corrupt)")]
    BadMagic(u32),
    #[error("frame header of {0} bytes exceeds the bound of {MAX_HEADER_LEN}")]
    HeaderTooLong(usize),
    #[error("frame payload of {0} bytes exceeds the bound of {MAX_PAYLOAD_LEN}")]
    PayloadTooLong(u32),
    #[error("frame header crc mismatch")]
    HeaderCrc,
    #[error("frame header does not decode: {0}")]
    Decode(String),
    #[error("payload crc mismatch (seq {seq})")]
    PayloadCrc { seq: u64 },
    #[error("payload length {got} does not match the message's {want}")]
    PayloadLen { got: u32, want: u32 },
}

/// Data generation identifiers as exchanged on connect.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GenIds {
    pub current: u64,
    pub bitmap: u64,
    pub history: [u64; 2],
    /// The generation the peer adopts with this node's last SyncDone, if this node never
    /// heard it acknowledged and its bitmap still counts from where it did then (protocol
    /// 19); 0: none. A peer still at it lacks only what this node's bitmap names.
    pub sync_done_unacked: u64,
}

/// What each side tells the other after authentication, and again when it changes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeState {
    pub primary: bool,
    /// 0 inconsistent, 1 outdated, 2 up-to-date.
    pub disk: u8,
    pub size: u64,
    pub gen: GenIds,
    /// Highest sequence applied from the peer's stream (as a secondary); it may sit in this
    /// node's page cache only. Where the stream resumes.
    pub applied_seq: u64,
    /// The term of the record at `applied_seq` (0: none applied): with it the peer knows
    /// whether that record is the one its journal holds at that sequence.
    pub applied_term: u64,
    /// Highest sequence applied from the peer's stream and made durable (data synced, then
    /// the mark committed): what the primary may count as safe on this node after a crash.
    pub durable_seq: u64,
    /// Highest sequence this node issued (as a primary).
    pub issued_seq: u64,
    /// Oldest sequence still in this node's journal (as a primary; 0: empty).
    pub journal_first_seq: u64,
    /// Bytes this node's bitmap says the peer lacks.
    pub out_of_sync: u64,
    /// This node went down as primary without a clean `down`: its last writes may not have
    /// reached the peer, so it can only be brought back by a resync.
    pub crashed_primary: bool,
    /// The admin asked this node to discard its data and become the sync target.
    pub discard_my_data: bool,
    /// When this node was last promoted (unix milliseconds; split-brain policies).
    pub promoted_ms: u64,
    /// A sync of this node's disk failed since its `up` (protocol 11): it can take no data
    /// until repaired, so two secondaries stay connected without a resync.
    pub disk_failed: bool,
    /// What the peer told this node its disk holds (protocol 16): at data generation
    /// `peer_durable_gen` (0: nothing heard), the highest sequence, as a source's
    /// [`Msg::Durable`] (what it issued, committed) or a target's durable acknowledgement
    /// gave it. A restart after any crash reads at least that back, so a peer that comes back
    /// at that generation holding less went back in time (its disk restored from an image of
    /// itself with its metadata).
    pub peer_durable_gen: u64,
    pub peer_durable_seq: u64,
    /// This node was primary when it and the peer parted: the generation its bitmap counts
    /// from began with it primary (protocol 21). DRBD's `discard-younger-primary` keeps the
    /// data of the node that was primary before the split, as this says.
    pub split_as_primary: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Msg {
    /// First message each way: who I am and a fresh challenge.
    Hello {
        version: u32,
        resource: String,
        node: String,
        nonce: [u8; 32],
        /// Whether this node seals the link after the handshake (`encryption`); both must
        /// agree.
        encryption: bool,
        /// The replication protocol as its letter (`b'A'`, `b'B'`, `b'C'`); both must agree,
        /// as in DRBD: the secondary acknowledges receipt at once only under B.
        protocol: u8,
        /// Bytes per bit of the dirty bitmap; both must agree, since each node reads the
        /// other's bitmap with its own.
        bitmap_granularity: u32,
        /// The automatic split-brain policy (`after-sb-0pri`, as a code: 0 disconnect,
        /// 1 discard-younger-primary, 2 discard-least-changes, 3 discard-zero-changes); both
        /// must agree, as in DRBD, or each could decide the other's data is the one to drop.
        after_sb_0pri: u8,
        /// Whether this node's device takes only 4 KiB-aligned I/O (`direct-io`); both must
        /// agree: a secondary with it cannot apply the smaller writes a primary without it
        /// accepts (each would fail as a disk error, and the resync after it again).
        direct_io: bool,
    },
    /// HMAC-SHA256, under the stretched secret (`seal::link_key`), over [`auth_input`]. The
    /// dialing node sends its proof first; the dialed node answers with its own only after
    /// checking it (protocol 10), so a stranger who connects learns nothing to guess with.
    Auth {
        mac: [u8; 32],
    },
    /// Refusal with a reason; the sender closes after it.
    Refuse {
        reason: String,
    },
    State(NodeState),
    /// A write of `len` payload bytes at `offset`.
    Write {
        seq: u64,
        /// The issuer's term (see [`Msg::term`]).
        term: u64,
        offset: u64,
        len: u32,
        crc: u32,
        fua: bool,
    },
    /// Zero a range (`trim`: the primary discarded it).
    Zero {
        seq: u64,
        /// The issuer's term (see [`Msg::term`]).
        term: u64,
        offset: u64,
        len: u64,
        trim: bool,
    },
    /// A barrier: apply everything before, make it durable, then acknowledge.
    Flush {
        seq: u64,
        /// The issuer's term (see [`Msg::term`]).
        term: u64,
    },
    /// Secondary to primary: highest sequence received, applied, synced and durable.
    /// `synced`: every record through it is on the secondary's disk (its data synced), which
    /// is what a flush under C waits for. `durable`: synced, and the applied mark that says
    /// so committed in the secondary's metadata, so a restart of it resumes after it: only
    /// this mark lets the primary forget a record. `durable <= synced <= applied <= received`.
    Ack {
        received: u64,
        applied: u64,
        synced: u64,
        durable: u64,
    },
    /// Target to source: one part of the target's dirty bitmap (regions it changed that the
    /// source lacks), its words `first_word .. first_word + words` in order, as words or, when
    /// `runs`, as run lengths (see [`crate::bitmap_wire`]); `last` ends the bitmap.
    BitmapPart {
        first_word: u64,
        words: u32,
        runs: bool,
        last: bool,
        len: u32,
        crc: u32,
    },
    /// Source to target: a resync starts; the stream continues at `seq`.
    SyncStart {
        seq: u64,
        full: bool,
        bytes: u64,
        /// The source's bitmap generation, which the target takes as its current one
        /// (committed before it applies anything). The source's bitmap counts from it, so a
        /// sync cut midway (a full one too) resumes as a bitmap resync of what is left, and a
        /// target forced primary midway has moved on from it as the source has (a split
        /// brain). 0 (an older source): the target's generations stay as they are.
        from: u64,
    },
    /// Source to target: every region is sent once `seq` is applied; adopt `gen`.
    SyncDone {
        seq: u64,
        /// The issuer's term (see [`Msg::term`]).
        term: u64,
        gen: GenIds,
    },
    Ping {
        id: u64,
    },
    /// Journal filler at the end of the ring; never sent.
    Pad,
    /// Source to target, a stream record: hash `[offset, offset+len)` as it is once every
    /// earlier record is applied (later overlapping ones wait), one SHA-256 per `block` bytes
    /// (the last one over what is left), and answer with [`Msg::Hashes`]. Checksum resync and
    /// online verify.
    HashReq {
        seq: u64,
        /// The issuer's term (see [`Msg::term`]).
        term: u64,
        offset: u64,
        len: u32,
        block: u32,
    },
    /// Target to source: the answer to the `HashReq` of sequence `seq`; the payload is
    /// [`HASH_LEN`] bytes per block, in order.
    Hashes {
        seq: u64,
        len: u32,
        crc: u32,
    },
    /// Source to target, a stream record (checksum resync): `[offset, offset+len)` was found
    /// equal on both nodes; nothing to write.
    Equal {
        seq: u64,
        /// The issuer's term (see [`Msg::term`]).
        term: u64,
        offset: u64,
        len: u64,
    },
    /// Secondary to primary: the admin ran `verify` on the secondary; the primary runs it (it
    /// owns the stream the hash requests must travel in) and reports with
    /// [`Msg::VerifyProgress`].
    VerifyRequest,
    /// Primary to secondary: the state of the verify the secondary asked for.
    VerifyProgress(VerifyReport),
    /// Between two secondaries, both freshly created and inconsistent (DRBD's
    /// `new-current-uuid --clear-bitmap`): the admin declares both disks identical, so both
    /// adopt generation `gen` as up to date and the initial full sync is skipped.
    SkipSync {
        gen: u64,
    },
    /// The answer to [`Msg::SkipSync`] for generation `gen`: done, or why not (cut to
    /// [`MAX_REFUSE_REASON`] bytes plus "...").
    SkipSyncReply {
        gen: u64,
        ok: bool,
        reason: String,
    },
    /// Source to target, a few times a second during a resync: how far it is, so that the
    /// target's `status` (and `wait-sync` there) shows the progress the source sees.
    SyncProgress {
        total: u64,
        done: u64,
        /// `pause-sync` holds the resync on the source (protocol 19): the target's `status`
        /// says why it stands still (DRBD's `resync-suspended:peer`).
        paused: bool,
    },
    /// At a node's `down` (protocol 12): it goes down cleanly and will not write on. From a
    /// primary once the secondary made every write through `issued` durable; from a
    /// secondary (`issued` 0) connected to an idle secondary with the same data. `gen`: the
    /// sender's current data generation, which the receiver must have too. The receiver
    /// closes the connection (refusing it with a reason if it does not hold that data) and
    /// may then be promoted without `--force`.
    Leaving {
        issued: u64,
        gen: u64,
    },
    /// After an `adjust` that changed the sender's replication protocol (protocol 13): the
    /// letter (`A`, `B` or `C`) it runs from now on. The receiver takes it for this
    /// connection and the next ones until its own `adjust` or restart, as DRBD's protocol
    /// update does, so that a reconnect between the two nodes' adjusts is not refused for
    /// protocols that differ, and the secondary acknowledges as the primary's protocol needs.
    Protocol {
        protocol: u8,
    },
    /// Primary to secondary (protocol 13): its online verify found `[offset, offset+len)`
    /// different on the two nodes (DRBD's P_OUT_OF_SYNC): the secondary marks it out of sync
    /// too, so that its `status` says so and its next connect resyncs it.
    OutOfSync {
        offset: u64,
        len: u64,
    },
    /// Source to target, beside the stream (protocol 16): the sender's metadata holds, on
    /// its disk, that at data generation `gen` it issued through sequence `issued`. A restart
    /// after any crash reads at least that much back, so the receiver remembers it: a node
    /// that comes back at `gen` with less went back in time (an image of its disk restored
    /// with its metadata), and is not the source of its old hot extents.
    Durable {
        gen: u64,
        issued: u64,
    },
    /// A stream record (protocol 17): make everything before it durable, then acknowledge,
    /// like [`Msg::Flush`], but not a barrier: records after it are applied while the sync
    /// runs. The primary sends it for its own needs (journal and activity-log space, the
    /// point after which its bitmap may be cleared, a planned disconnect), where no client
    /// ordered its writes around it; a client's flush stays a [`Msg::Flush`].
    Checkpoint {
        seq: u64,
        /// The issuer's term (see [`Msg::term`]).
        term: u64,
    },
    /// Either way (protocol 19): the sender closes this connection only to reconnect at once
    /// (a secondary's `invalidate`, whose next handshake carries its invalidated disk). The
    /// receiver closes too and takes the gap for a planned one: a primary runs no
    /// `fence-peer` handler (which may power the peer off) unless the link stays down.
    Reconnect,
    /// Either way between two connected secondaries (protocol 20): the sender is about to
    /// become primary (DRBD's cluster-wide state change). The receiver answers with
    /// [`Msg::PromoteAnswer`]: yes unless it is primary itself or being promoted at this
    /// moment, so of two nodes promoted at once at most one commits.
    PromoteAsk {
        id: u64,
    },
    /// The answer to the [`Msg::PromoteAsk`] numbered `id`: granted, or why not (cut to
    /// [`MAX_REFUSE_REASON`] bytes plus "..."), and whether the refusing node was deciding a
    /// promotion of its own at that moment (`busy`: the asker tries again shortly).
    PromoteAnswer {
        id: u64,
        ok: bool,
        busy: bool,
        reason: String,
    },
}

/// Progress of an online verify, as the primary reports it to the secondary that asked.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct VerifyReport {
    /// The primary's run number.
    pub run: u64,
    /// "pending", "running", "done", "interrupted" or "failed" (at most [`MAX_REFUSE_REASON`]
    /// bytes, like `error`).
    pub state: String,
    pub total: u64,
    pub done: u64,
    pub differ_regions: u64,
    pub differ_bytes: u64,
    /// Why it failed or was refused ("" if it did not).
    pub error: String,
}

impl VerifyReport {
    /// Cuts the free-text fields to [`MAX_REFUSE_REASON`] bytes so the report always encodes
    /// within the header bound.
    pub fn bounded(mut self) -> Self {
        for s in [&mut self.state, &mut self.error] {
            let mut cut = s.len().min(MAX_REFUSE_REASON);
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
        }
        self
    }
}

/// Bytes of one block hash (SHA-256).
pub const HASH_LEN: usize = 32;
/// Longest range one `HashReq` may cover.
pub const MAX_HASH_SPAN: u32 = 4 << 20;
/// Smallest and largest hash block.
pub const MIN_HASH_BLOCK: u32 = 512;
pub const MAX_HASH_BLOCK: u32 = 1 << 20;

/// The number of block hashes a `HashReq` of `len` bytes in blocks of `block` asks for, or
/// `None` if the request is out of bounds (empty, too long, or a bad block size).
pub fn hash_count(len: u32, block: u32) -> Option<usize> {
    if len == 0
        || len > MAX_HASH_SPAN
        || !block.is_power_of_two()
        || !(MIN_HASH_BLOCK..=MAX_HASH_BLOCK).contains(&block)
    {
        return None;
    }
    Some(len.div_ceil(block) as usize)
}

/// Longest refusal reason a `Refuse` carries: reasons quote what the peer sent (its resource
/// and node names, escaped), and a frame header is bounded.
pub const MAX_REFUSE_REASON: usize = 256;

/// `reason` cut to [`MAX_REFUSE_REASON`] bytes at a character boundary ("..." marks a cut).
pub fn cut_reason(reason: &str) -> String {
    let mut cut = reason.len().min(MAX_REFUSE_REASON);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut r = reason[..cut].to_string();
    if cut < reason.len() {
        r.push_str("...");
    }
    r
}

impl Msg {
    /// A `Refuse` whose reason is cut to [`MAX_REFUSE_REASON`] bytes (at a character boundary),
    /// so it always encodes within the header bound.
    pub fn refuse(reason: &str) -> Msg {
        Msg::Refuse {
            reason: cut_reason(reason),
        }
    }

    /// A `SkipSyncReply` (its reason cut like a refusal's).
    pub fn skip_sync_reply(gen: u64, result: Result<(), String>) -> Msg {
        match result {
            Ok(()) => Msg::SkipSyncReply {
                gen,
                ok: true,
                reason: String::new(),
            },
            Err(why) => Msg::SkipSyncReply {
                gen,
                ok: false,
                reason: cut_reason(&why),
            },
        }
    }

    /// A `PromoteAnswer`: granted, or refused with why and whether the refusing node is
    /// busy deciding its own promotion (its reason cut like a refusal's).
    pub fn promote_answer(id: u64, result: Result<(), (String, bool)>) -> Msg {
        match result {
            Ok(()) => Msg::PromoteAnswer {
                id,
                ok: true,
                busy: false,
                reason: String::new(),
            },
            Err((why, busy)) => Msg::PromoteAnswer {
                id,
                ok: false,
                busy,
                reason: cut_reason(&why),
            },
        }
    }

    /// The sequence number of a stream record.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Msg::Write { seq, .. }
            | Msg::Zero { seq, .. }
            | Msg::Flush { seq, .. }
            | Msg::Checkpoint { seq, .. }
            | Msg::SyncDone { seq, .. }
            | Msg::HashReq { seq, .. }
            | Msg::Equal { seq, .. } => Some(*seq),
            _ => None,
        }
    }

    /// The term of a stream record: a random id its issuer drew when it started issuing
    /// (daemon start, promotion). Sequence numbers are one space
    /// per pair, so two nodes that issued apart can reuse one; `(seq, term)` is what names a
    /// record, and a journal catch-up resumes only after the record the peer applied last
    /// if this node's record at that sequence is the same one.
    pub fn term(&self) -> Option<u64> {
        match self {
            Msg::Write { term, .. }
            | Msg::Zero { term, .. }
            | Msg::Flush { term, .. }
            | Msg::Checkpoint { term, .. }
            | Msg::SyncDone { term, .. }
            | Msg::HashReq { term, .. }
            | Msg::Equal { term, .. } => Some(*term),
            _ => None,
        }
    }
}

/// The fixed prefix, parsed and bounds-checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub header_len: usize,
    pub payload_len: u32,
    pub header_crc: u32,
}

pub fn parse_prefix(p: &[u8; PREFIX_LEN]) -> Result<Prefix, FrameError> {
    let magic = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
    if magic != FRAME_MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let header_len = u16::from_le_bytes([p[4], p[5]]) as usize;
    if header_len == 0 || header_len > MAX_HEADER_LEN {
        return Err(FrameError::HeaderTooLong(header_len));
    }
    let payload_len = u32::from_le_bytes([p[6], p[7], p[8], p[9]]);
    if payload_len > MAX_PAYLOAD_LEN {
        return Err(FrameError::PayloadTooLong(payload_len));
    }
    let header_crc = u32::from_le_bytes([p[10], p[11], p[12], p[13]]);
    Ok(Prefix {
        header_len,
        payload_len,
        header_crc,
    })
}

/// Checks the header crc and decodes the message; checks the payload length it implies.
pub fn decode_header(
    prefix_bytes: &[u8; PREFIX_LEN],
    pre: &Prefix,
    header: &[u8],
) -> Result<Msg, FrameError> {
    let mut crc = crc32c::crc32c(&prefix_bytes[..10]);
    crc = crc32c::crc32c_append(crc, header);
    if crc != pre.header_crc {
        return Err(FrameError::HeaderCrc);
    }
    let msg: Msg = postcard::from_bytes(header).map_err(|e| FrameError::Decode(e.to_string()))?;
    let want = match &msg {
        Msg::Write { len, .. } | Msg::BitmapPart { len, .. } | Msg::Hashes { len, .. } => *len,
        _ => 0,
    };
    if want != pre.payload_len {
        return Err(FrameError::PayloadLen {
            got: pre.payload_len,
            want,
        });
    }
    Ok(msg)
}

/// Checks a data payload against the crc in its header.
pub fn check_payload(msg: &Msg, payload: &[u8]) -> Result<(), FrameError> {
    check_payload_crc(msg, crc32c::crc32c(payload))
}

/// [`check_payload`] with the payload's crc32c already computed (a receiver that checksums
/// each piece as it arrives, while the piece is still in cache).
pub fn check_payload_crc(msg: &Msg, payload_crc: u32) -> Result<(), FrameError> {
    match msg {
        Msg::Write { seq, crc, .. } | Msg::Hashes { seq, crc, .. } if payload_crc != *crc => {
            Err(FrameError::PayloadCrc { seq: *seq })
        }
        Msg::BitmapPart { crc, .. } if payload_crc != *crc => {
            Err(FrameError::PayloadCrc { seq: 0 })
        }
        _ => Ok(()),
    }
}

/// Appends a frame: prefix, header, payload. Returns the frame's length.
pub fn encode_frame(out: &mut Vec<u8>, msg: &Msg, payload: &[u8]) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0u8; PREFIX_LEN]);
    // Header size is small and bounded by the message types; postcard cannot fail on them.
    let before = out.len();
    let out_taken = std::mem::take(out);
    *out = postcard::to_extend(msg, out_taken).unwrap_or_else(|_| Vec::new());
    let header_len = out.len() - before;
    seal_prefix(&mut out[start..], header_len, payload.len());
    out.extend_from_slice(payload);
    out.len() - start
}

/// Encodes the prefix and header of `msg`'s frame into `dst`, for a payload of `payload_len`
/// bytes that the caller places right behind them: no allocation, for the write path.
/// Returns their length, or `None` when `dst` is too small for the header.
pub fn encode_head(dst: &mut [u8], msg: &Msg, payload_len: usize) -> Option<usize> {
    let header_len = postcard::to_slice(msg, dst.get_mut(PREFIX_LEN..)?)
        .ok()?
        .len();
    seal_prefix(dst, header_len, payload_len);
    Some(PREFIX_LEN + header_len)
}

/// Writes the prefix in front of a header already in `frame[PREFIX_LEN..]`: magic, lengths,
/// and the crc over the prefix's first bytes and the header.
fn seal_prefix(frame: &mut [u8], header_len: usize, payload_len: usize) {
    assert!(
        header_len <= MAX_HEADER_LEN,
        "peer header grew past its bound"
    );
    frame[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
    frame[4..6].copy_from_slice(&(header_len as u16).to_le_bytes());
    frame[6..10].copy_from_slice(&(payload_len as u32).to_le_bytes());
    let mut crc = crc32c::crc32c(&frame[0..10]);
    crc = crc32c::crc32c_append(crc, &frame[PREFIX_LEN..PREFIX_LEN + header_len]);
    frame[10..14].copy_from_slice(&crc.to_le_bytes());
}

/// Length of the frame of `msg` with `payload_len` payload bytes, without encoding the payload.
pub fn frame_len(msg: &Msg, payload_len: usize) -> usize {
    PREFIX_LEN
        + postcard::to_allocvec(msg)
            .map(|v| v.len())
            .unwrap_or(MAX_HEADER_LEN)
        + payload_len
}

/// The authentication input: the verifier's nonce, the prover's nonce, what the prover vouches
/// for (its name, its side of the connection, its settings), the verifier's name and the
/// resource. The verifier recomputes it from its own nonce, so a recorded answer is useless
/// against a fresh challenge, a reflected one fails because the names differ, and one relayed
/// between two nodes that both accept (or both dial) fails because the sides do. A host on
/// the path can still relay a real connection end to end (take a node's own outgoing
/// connection and dial the other node with its nonces): the two nodes then authenticate
/// each other through it. With `encryption` it learns nothing and can only drop bytes; without
/// it, it holds a plaintext session as any on-path attacker would (see the README).
pub fn auth_input(
    verifier_nonce: &[u8; 32],
    prover_nonce: &[u8; 32],
    prover: &AuthParty<'_>,
    verifier: &str,
    resource: &str,
) -> Vec<u8> {
    let mut v = Vec::with_capacity(128 + prover.name.len() + verifier.len() + resource.len());
    v.extend_from_slice(b"blockrep-auth-v2\0");
    v.extend_from_slice(verifier_nonce);
    v.extend_from_slice(prover_nonce);
    // Who dialed: a proof made on one connection as the acceptor never passes as a dialer's
    // on another, so a host relaying between two nodes that both accept gets nowhere.
    v.push(u8::from(prover.dialed));
    v.push(prover.protocol);
    v.push(u8::from(prover.encryption));
    v.extend_from_slice(&prover.bitmap_granularity.to_le_bytes());
    v.push(prover.after_sb_0pri);
    v.push(u8::from(prover.direct_io));
    for s in [prover.name, verifier, resource] {
        v.extend_from_slice(&(s.len() as u32).to_le_bytes());
        v.extend_from_slice(s.as_bytes());
    }
    v
}

/// What a node's proof of the shared secret vouches for, beside the two nonces: its name,
/// whether it dialed this connection, and the settings its hello announced (so that an
/// on-path rewrite of the hello fails authentication).
#[derive(Debug, Clone, Copy)]
pub struct AuthParty<'a> {
    pub name: &'a str,
    pub dialed: bool,
    pub protocol: u8,
    pub encryption: bool,
    pub bitmap_granularity: u32,
    pub after_sb_0pri: u8,
    pub direct_io: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(msg: Msg, payload: &[u8]) {
        let mut b = Vec::new();
        let n = encode_frame(&mut b, &msg, payload);
        assert_eq!(n, b.len());
        assert_eq!(n, frame_len(&msg, payload.len()));
        let p: [u8; PREFIX_LEN] = b[..PREFIX_LEN].try_into().unwrap();
        let pre = parse_prefix(&p).unwrap();
        let h = &b[PREFIX_LEN..PREFIX_LEN + pre.header_len];
        let got = decode_header(&p, &pre, h).unwrap();
        assert_eq!(got, msg);
        let pl = &b[PREFIX_LEN + pre.header_len..];
        assert_eq!(pl.len(), pre.payload_len as usize);
        check_payload(&got, pl).unwrap();
    }

    #[test]
    fn frames_round_trip() {
        let data = vec![7u8; 4096];
        round_trip(
            Msg::Write {
                seq: 9,
                term: 0x7E57,
                offset: 4096,
                len: 4096,
                crc: crc32c::crc32c(&data),
                fua: true,
            },
            &data,
        );
        round_trip(
            Msg::Flush {
                seq: 10,
                term: 0x7E57,
            },
            &[],
        );
        round_trip(
            Msg::Checkpoint {
                seq: 11,
                term: 0x7E57,
            },
            &[],
        );
        round_trip(
            Msg::Hello {
                version: 1,
                resource: "r0".into(),
                node: "alpha".into(),
                nonce: [3; 32],
                encryption: true,
                protocol: b'B',
                bitmap_granularity: 65536,
                after_sb_0pri: 2,
                direct_io: true,
            },
            &[],
        );
        round_trip(
            Msg::Ack {
                received: 4,
                applied: 3,
                synced: 2,
                durable: 1,
            },
            &[],
        );
        round_trip(
            Msg::SyncProgress {
                total: 1 << 30,
                done: 1 << 20,
                paused: true,
            },
            &[],
        );
        round_trip(Msg::Reconnect, &[]);
    }

    #[test]
    fn a_head_encoded_in_place_matches_the_whole_frame() {
        let data = vec![5u8; 8192];
        let msg = Msg::Write {
            seq: u64::MAX,
            term: 0x7E57,
            offset: u64::MAX - 8192,
            len: 8192,
            crc: crc32c::crc32c(&data),
            fua: false,
        };
        let mut whole = Vec::new();
        encode_frame(&mut whole, &msg, &data);
        let mut head = [0u8; 64];
        let n = encode_head(&mut head, &msg, data.len()).expect("fits in 64 bytes");
        assert_eq!(&head[..n], &whole[..n]);
        assert_eq!(n + data.len(), whole.len());
        // Too small for the header, or even the prefix: refused, never a panic.
        assert_eq!(
            encode_head(&mut head[..PREFIX_LEN + 3], &msg, data.len()),
            None
        );
        assert_eq!(encode_head(&mut head[..4], &msg, data.len()), None);
    }

    #[test]
    fn hash_frames_round_trip_and_are_checked() {
        round_trip(
            Msg::HashReq {
                seq: 4,
                term: 0x7E57,
                offset: 1 << 20,
                len: 65536,
                block: 4096,
            },
            &[],
        );
        round_trip(
            Msg::Equal {
                seq: 5,
                term: 0x7E57,
                offset: 8192,
                len: 4096,
            },
            &[],
        );
        let hashes = vec![9u8; 3 * HASH_LEN];
        let msg = Msg::Hashes {
            seq: 4,
            len: hashes.len() as u32,
            crc: crc32c::crc32c(&hashes),
        };
        round_trip(msg.clone(), &hashes);
        let mut bad = hashes.clone();
        bad[40] ^= 1;
        assert_eq!(
            check_payload(&msg, &bad),
            Err(FrameError::PayloadCrc { seq: 4 })
        );
        assert_eq!(
            Msg::HashReq {
                seq: 7,
                term: 0x7E57,
                offset: 0,
                len: 1,
                block: 512
            }
            .seq(),
            Some(7)
        );
        assert_eq!(
            Msg::Equal {
                seq: 8,
                term: 0x7E57,
                offset: 0,
                len: 1
            }
            .seq(),
            Some(8)
        );
        assert_eq!(
            Msg::Hashes {
                seq: 9,
                len: 0,
                crc: 0
            }
            .seq(),
            None
        );
    }

    #[test]
    fn hash_count_bounds() {
        assert_eq!(hash_count(4096, 4096), Some(1));
        assert_eq!(hash_count(4097, 4096), Some(2));
        assert_eq!(hash_count(1 << 20, 4096), Some(256));
        assert_eq!(hash_count(MAX_HASH_SPAN, 4096), Some(1024));
        assert_eq!(hash_count(MAX_HASH_SPAN + 1, 4096), None);
        assert_eq!(hash_count(0, 4096), None);
        assert_eq!(hash_count(4096, 3000), None);
        assert_eq!(hash_count(4096, 256), None);
        assert_eq!(hash_count(4096, 2 << 20), None);
    }

    #[test]
    fn corruption_is_detected() {
        let data = vec![1u8; 512];
        let msg = Msg::Write {
            seq: 1,
            term: 0x7E57,
            offset: 0,
            len: 512,
            crc: crc32c::crc32c(&data),
            fua: false,
        };
        let mut b = Vec::new();
        encode_frame(&mut b, &msg, &data);
        let hl = u16::from_le_bytes([b[4], b[5]]) as usize;
        // Any flipped bit in the header is caught by the header crc.
        for i in PREFIX_LEN..PREFIX_LEN + hl {
            let mut bad = b.clone();
            bad[i] ^= 1;
            let p: [u8; PREFIX_LEN] = bad[..PREFIX_LEN].try_into().unwrap();
            let pre = parse_prefix(&p).unwrap();
            assert!(decode_header(&p, &pre, &bad[PREFIX_LEN..PREFIX_LEN + hl]).is_err());
        }
        // A flipped payload bit is caught by the payload crc.
        let mut bad = b.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x80;
        assert_eq!(
            check_payload(&msg, &bad[PREFIX_LEN + hl..]),
            Err(FrameError::PayloadCrc { seq: 1 })
        );
    }

    #[test]
    fn bounds_checked_before_allocation() {
        let mut p = [0u8; PREFIX_LEN];
        p[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        p[4..6].copy_from_slice(&2000u16.to_le_bytes());
        assert_eq!(parse_prefix(&p), Err(FrameError::HeaderTooLong(2000)));
        p[4..6].copy_from_slice(&10u16.to_le_bytes());
        p[6..10].copy_from_slice(&(MAX_PAYLOAD_LEN + 1).to_le_bytes());
        assert!(matches!(
            parse_prefix(&p),
            Err(FrameError::PayloadTooLong(_))
        ));
        p[0] = b'G';
        assert!(matches!(parse_prefix(&p), Err(FrameError::BadMagic(_))));
    }

    #[test]
    fn payload_length_must_match_message() {
        let msg = Msg::Flush {
            seq: 1,
            term: 0x7E57,
        };
        let mut b = Vec::new();
        encode_frame(&mut b, &msg, &[1, 2, 3]);
        let p: [u8; PREFIX_LEN] = b[..PREFIX_LEN].try_into().unwrap();
        let pre = parse_prefix(&p).unwrap();
        assert!(matches!(
            decode_header(&p, &pre, &b[PREFIX_LEN..PREFIX_LEN + pre.header_len]),
            Err(FrameError::PayloadLen { .. })
        ));
    }

    #[test]
    fn auth_input_binds_names_roles_and_settings() {
        let p = |name, dialed| AuthParty {
            name,
            dialed,
            protocol: b'C',
            encryption: false,
            bitmap_granularity: 4096,
            after_sb_0pri: 0,
            direct_io: false,
        };
        let a = auth_input(&[1; 32], &[2; 32], &p("alpha", true), "beta", "r0");
        let b = auth_input(&[2; 32], &[1; 32], &p("beta", false), "alpha", "r0");
        assert_ne!(a, b);
        assert_ne!(
            a,
            auth_input(&[1; 32], &[2; 32], &p("alpha", true), "beta", "r1")
        );
        // The same node, nonces and names, but as the acceptor: a relay between two
        // accepting nodes cannot pass one's proof off as a dialer's.
        assert_ne!(
            a,
            auth_input(&[1; 32], &[2; 32], &p("alpha", false), "beta", "r0")
        );
        // Settings from the hello are covered too.
        let mut q = p("alpha", true);
        q.protocol = b'A';
        assert_ne!(a, auth_input(&[1; 32], &[2; 32], &q, "beta", "r0"));
        q.protocol = b'C';
        q.encryption = true;
        assert_ne!(a, auth_input(&[1; 32], &[2; 32], &q, "beta", "r0"));
        q.encryption = false;
        q.bitmap_granularity = 65536;
        assert_ne!(a, auth_input(&[1; 32], &[2; 32], &q, "beta", "r0"));
        q.bitmap_granularity = 4096;
        q.after_sb_0pri = 3;
        assert_ne!(a, auth_input(&[1; 32], &[2; 32], &q, "beta", "r0"));
        q.after_sb_0pri = 0;
        q.direct_io = true;
        assert_ne!(a, auth_input(&[1; 32], &[2; 32], &q, "beta", "r0"));
    }
}
