//! On-disk metadata: where the areas lie and the superblock that describes them.
//!
//! Internal metadata sits at the tail of the backing device, as DRBD lays it out:
//! `[data][bitmap][activity log][journal][superblock A][superblock B]`. External metadata is the
//! same tail layout in its own file, and the data then spans the whole backing device.
//!
//! The superblock is written alternately to two 4 KiB slots with an increasing sequence number,
//! each slot crc32c-protected, so a torn write of one slot always leaves the other one valid.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub const BLOCK: u64 = 4096;
pub const SLOT_LEN: u64 = 4096;
pub const SUPERBLOCK_AREA: u64 = 2 * SLOT_LEN;
/// Room for the activity log (issue 4): 256 transactions of 256 bytes.
pub const AL_AREA: u64 = 64 * 1024;
/// Smallest data area worth exporting.
pub const MIN_DATA: u64 = 1 << 20;
const MAGIC: u64 = 0x6272_6570_6d64_0001; // "brepmd" v1
pub const FORMAT_VERSION: u32 = 7;
/// Format 1 had no record terms: its superblock is format 2's without the two trailing term
/// fields, read as if they were 0 ("not known": the first connect after the upgrade resyncs
/// the bitmap rather than trusting a journal catch-up it cannot check).
const FORMAT_V1: u32 = 1;
/// Format 2 had no `lost_writes`: read as false (one byte at the end of the payload).
const FORMAT_V2: u32 = 2;
/// Format 3 had no `peer_left` and `handed_over`: read as false (one byte each at the end of
/// the payload).
const FORMAT_V3: u32 = 3;
/// Format 4 had no `peer_durable`: read as (0, 0), nothing heard (two bytes at the end).
const FORMAT_V4: u32 = 4;
/// Format 5 had no `sync_done_sent`: read as (0, 0), none (two bytes at the end).
const FORMAT_V5: u32 = 5;
/// Format 6 had no `split_primary_gen`: read as 0, none (one byte at the end).
const FORMAT_V6: u32 = 6;
/// Every superblock format this build reads, newest first.
const READABLE_FORMATS: [u32; 7] = [
    FORMAT_VERSION,
    FORMAT_V6,
    FORMAT_V5,
    FORMAT_V4,
    FORMAT_V3,
    FORMAT_V2,
    FORMAT_V1,
];

/// DRBD's "just created" current generation: both sides fresh, nothing written yet.
pub const UUID_JUST_CREATED: u64 = 4;

#[derive(Debug, Error)]
pub enum MetaError {
    /// The cause is part of the message (not a `source`), so that a chain printed with
    /// `{:#}` does not say it twice.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{path}: too small: {size} bytes; metadata needs {meta} bytes ({detail}) and the data at \
         least {MIN_DATA} more, {need} bytes in all"
    )]
    TooSmall {
        path: PathBuf,
        size: u64,
        meta: u64,
        need: u64,
        detail: String,
    },
    #[error("{path}: no blockrep metadata found (run `blockrep-ctl create-md` first)")]
    NotFound { path: PathBuf },
    /// Internal metadata not at the device's end: never created, or the device grew (its
    /// metadata then sits at the old end, which nothing records).
    #[error(
        "{path}: no blockrep metadata at the end of the device ({size} bytes). Internal \
         metadata lives at the end: if this device was grown since create-md (lvextend, a \
         larger image), its metadata and data are intact at the old size; blockrep cannot grow \
         a resource, so shrink the device back to that size (the size before the grow), then \
         `up`. On a new device, run `blockrep-ctl create-md` (its data then comes from the \
         peer in a full sync)"
    )]
    NotAtEnd { path: PathBuf, size: u64 },
    #[error(
        "{path}: valid blockrep metadata already exists (resource {resource:?}, node {node:?}); \
         use --force to overwrite it"
    )]
    Exists {
        path: PathBuf,
        resource: String,
        node: String,
    },
    #[error("{path}: metadata is for resource {found:?} node {found_node:?}, not {resource:?} node {node:?}")]
    Mismatch {
        path: PathBuf,
        found: String,
        found_node: String,
        resource: String,
        node: String,
    },
    #[error("{path} is in use: {why}")]
    InUse { path: PathBuf, why: String },
    #[error("{path}: metadata layout does not fit this device ({why})")]
    Layout { path: PathBuf, why: String },
    #[error(
        "{path}: holds {what}; internal metadata would leave {data_size} bytes of data and \
         overwrite the rest. Shrink it to at most {data_size} bytes first, or use external \
         metadata (`meta = \"PATH\"` under the node in the config), or wipe the device; \
         --force writes the metadata anyway and destroys the end of it"
    )]
    WouldCut {
        path: PathBuf,
        what: String,
        data_size: u64,
    },
}

/// The devices of one node, held for as long as a daemon (or `create-md`) uses them: an
/// exclusive `flock` on each, and for a block device the kernel's exclusive claim (`O_EXCL`,
/// which mount, mkfs and device-mapper take too). A second daemon started on the same disk
/// (another config with other sockets, say) stops here, before crash recovery or anything
/// else writes a byte, as DRBD's attach does on a device held open.
///
/// The backing device's descriptor is the one its I/O must go through ([`Claim::backing`]):
/// the kernel lets only the holder of an exclusive claim discard or zero a range of a block
/// device whose page cache is dirty (anyone else gets EBUSY).
#[derive(Debug)]
pub struct Claim {
    backing: Arc<File>,
    _others: Vec<File>,
}

impl Claim {
    /// The claimed backing device, open for reading and writing (with `O_DIRECT` if asked).
    pub fn backing(&self) -> Arc<File> {
        self.backing.clone()
    }

    /// A second descriptor of the claimed backing device, with `O_DIRECT`: the same file or
    /// device (opened through this process's own descriptor, so no other path can slip in,
    /// and without `O_EXCL`, which the claim holds). Fails where the filesystem refuses
    /// direct I/O (some FUSE and older tmpfs).
    pub fn reopen_direct(&self) -> std::io::Result<File> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let path = format!("/proc/self/fd/{}", self.backing.as_raw_fd());
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
    }
}

/// Takes the [`Claim`] on the backing device and the external metadata file, if any.
pub fn claim(backing: &Path, external: Option<&Path>, direct_io: bool) -> Result<Claim, MetaError> {
    let b = claim_one(backing, direct_io)?;
    let mut others = Vec::new();
    // An external metadata file create-md has yet to make holds nothing to protect.
    if let Some(p) = external.filter(|p| p.exists()) {
        others.push(claim_one(p, false)?);
    }
    Ok(Claim {
        backing: Arc::new(b),
        _others: others,
    })
}

/// Whether another process (a blockrep daemon, or create-md) holds `path`'s claim now: a
/// read-only probe of its lock, let go at once, which neither disturbs that process nor
/// makes udev re-probe a block device (as closing a read-write descriptor of one would).
pub fn claimed_by_another(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = File::open(path) else {
        return false;
    };
    // SAFETY: flock on a descriptor this function owns (closed, with its lock, on return).
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
}

fn claim_one(path: &Path, direct_io: bool) -> Result<File, MetaError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
    let in_use = |why: String| MetaError::InUse {
        path: path.to_owned(),
        why,
    };
    let io = |error| MetaError::Io {
        path: path.to_owned(),
        error,
    };
    let md = std::fs::metadata(path).map_err(io)?;
    let block = md.file_type().is_block_device();
    if !block {
        if let Some(dev) = loop_device_over(md.dev(), md.ino()) {
            return Err(in_use(format!(
                "it is the backing file of {dev}: whatever uses that loop device (a daemon \
                 configured with it, a mount) shares these bytes; detach it (losetup -d) or \
                 configure the loop device instead"
            )));
        }
    }
    let mut oo = OpenOptions::new();
    oo.read(true).write(true);
    let mut flags = 0;
    if block {
        flags |= libc::O_EXCL;
    }
    if direct_io {
        flags |= libc::O_DIRECT;
    }
    oo.custom_flags(flags);
    let f = match oo.open(path) {
        Ok(f) => f,
        Err(e) if block && e.raw_os_error() == Some(libc::EBUSY) => {
            return Err(in_use(
                "the kernel reports it busy: mounted, or held by another process, a loop \
                 or device-mapper/LVM stack"
                    .into(),
            ))
        }
        Err(e) => return Err(io(e)),
    };
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if matches!(
            e.raw_os_error(),
            Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS)
        ) {
            // A filesystem without locks (NFS with no lock daemon, say): the disk is still
            // usable, only unguarded against a second daemon.
            tracing::warn!(
                "{}: cannot be locked ({e}): a second daemon started on it would not be stopped",
                path.display()
            );
            return Ok(f);
        }
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            in_use(
                "another blockrep daemon (or create-md) holds it; a second daemon on one disk \
                 would corrupt it (`blockrep-ctl status` with that daemon's config finds it)"
                    .into(),
            )
        } else {
            io(e)
        });
    }
    Ok(f)
}

/// Makes `len` bytes at `offset` read as zeros: a hole punched in a file (no space used), or
/// zeros written where that is not possible (a block device, a filesystem without holes).
fn clear_area(file: &File, offset: u64, len: u64, zeros: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let is_file = file.metadata()?.file_type().is_file();
    if is_file {
        // SAFETY: fallocate on an open descriptor with a range inside the file.
        let r = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
    }
    let mut off = offset;
    while off < offset + len {
        let n = (offset + len - off).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// The loop device (`/dev/loopN`) whose backing file is the file `(dev, ino)`, if any.
fn loop_device_over(dev: u64, ino: u64) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let entries = std::fs::read_dir("/sys/block").ok()?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        let file = text.trim_end_matches('\n');
        if std::fs::metadata(file).is_ok_and(|m| m.dev() == dev && m.ino() == ino) {
            return Some(format!("/dev/{name}"));
        }
    }
    None
}

/// Where each area lies, in bytes from the start of the metadata device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Exported data size, a multiple of 4 KiB.
    pub data_size: u64,
    pub bitmap_offset: u64,
    pub bitmap_len: u64,
    /// Bytes of data per bitmap bit.
    pub granularity: u64,
    pub al_offset: u64,
    pub al_len: u64,
    pub journal_offset: u64,
    pub journal_len: u64,
    pub sb_offset: u64,
}

impl Layout {
    /// Computes the layout. `internal`: metadata shares the backing device of `backing_size`
    /// bytes; otherwise it lives in its own file and the data spans the backing device.
    pub fn compute(
        backing_size: u64,
        internal: bool,
        journal_len: u64,
        granularity: u64,
    ) -> Result<Self, (u64, String)> {
        assert!(granularity.is_power_of_two() && granularity >= BLOCK);
        let journal_len = journal_len.div_ceil(BLOCK) * BLOCK;
        // The bitmap is sized for the whole backing device: a little oversized when internal,
        // which keeps the computation a single pass.
        let bits = backing_size.div_ceil(granularity);
        let bitmap_len = bits.div_ceil(8).div_ceil(BLOCK).max(1) * BLOCK;
        let meta = bitmap_len + AL_AREA + journal_len + SUPERBLOCK_AREA;
        let detail = format!(
            "bitmap {bitmap_len}, activity log {AL_AREA}, journal {journal_len}, superblocks {SUPERBLOCK_AREA}"
        );
        // Internal: the superblock ends at the 4 KiB-aligned end of the device, so it can be
        // found without knowing the sizes it was created with.
        let (data_size, base) = if internal {
            let end = backing_size / BLOCK * BLOCK;
            if end < meta + MIN_DATA {
                return Err((meta, detail));
            }
            (end - meta, end - meta)
        } else {
            let data = backing_size / BLOCK * BLOCK;
            if data < MIN_DATA {
                return Err((meta, detail));
            }
            (data, 0)
        };
        Ok(Layout {
            data_size,
            bitmap_offset: base,
            bitmap_len,
            granularity,
            al_offset: base + bitmap_len,
            al_len: AL_AREA,
            journal_offset: base + bitmap_len + AL_AREA,
            journal_len,
            sb_offset: base + bitmap_len + AL_AREA + journal_len,
        })
    }

    /// What any layout `compute` made holds: areas in order without overlap, a bitmap
    /// with a bit for every region of the data, an activity log of whole blocks, a journal within
    /// the configurable bounds. A superblock whose crc is right but whose layout is not (a
    /// bug, or a foreign tool) is refused here, before a length from it sizes a buffer.
    pub fn check(&self) -> Result<(), String> {
        let g = self.granularity;
        if !(g.is_power_of_two() && (BLOCK..=1 << 20).contains(&g)) {
            return Err(format!("bitmap granularity {g}"));
        }
        let bits_needed = self.data_size.div_ceil(g);
        if self.bitmap_len.saturating_mul(8) < bits_needed {
            return Err(format!(
                "a bitmap of {} bytes for {} bytes of data at {g} bytes a bit",
                self.bitmap_len, self.data_size
            ));
        }
        if self.al_len % BLOCK != 0 || !(BLOCK..=1 << 20).contains(&self.al_len) {
            return Err(format!("an activity log of {} bytes", self.al_len));
        }
        // The ring's least (see `Ring::new`); the config asks for 1 MiB at least. A smaller
        // one would take no write of any size, and every write would overflow it.
        if self.journal_len % BLOCK != 0 || !(64 << 10..=16 << 30).contains(&self.journal_len) {
            return Err(format!("a journal of {} bytes", self.journal_len));
        }
        let ordered = [
            (self.bitmap_offset, self.bitmap_len, self.al_offset),
            (self.al_offset, self.al_len, self.journal_offset),
            (self.journal_offset, self.journal_len, self.sb_offset),
        ]
        .iter()
        .all(|&(at, len, next)| at.checked_add(len).is_some_and(|end| end <= next));
        if !ordered || self.sb_offset.checked_add(SUPERBLOCK_AREA).is_none() {
            return Err(format!(
                "areas out of order: bitmap at {}, activity log at {}, journal at {}, superblocks at {}",
                self.bitmap_offset, self.al_offset, self.journal_offset, self.sb_offset
            ));
        }
        Ok(())
    }

    /// Bytes the metadata occupies.
    pub fn meta_len(&self) -> u64 {
        self.sb_offset + SUPERBLOCK_AREA - self.bitmap_offset
    }
}

/// Disk state as DRBD names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskState {
    Inconsistent,
    Outdated,
    UpToDate,
}

impl DiskState {
    /// As the peer link carries it (`NodeState.disk`): 0 inconsistent, 1 outdated, 2 up to date.
    pub fn wire(self) -> u8 {
        match self {
            DiskState::Inconsistent => 0,
            DiskState::Outdated => 1,
            DiskState::UpToDate => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DiskState::Inconsistent => "inconsistent",
            DiskState::Outdated => "outdated",
            DiskState::UpToDate => "up-to-date",
        }
    }
}

/// Generation identifiers (DRBD's data generation UUIDs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Generations {
    /// Identifies the data as it is now.
    pub current: u64,
    /// The generation the dirty bitmap counts from (0: bitmap not in use).
    pub bitmap: u64,
    /// Earlier current ids, newest first.
    pub history: [u64; 2],
}

/// The persistent state of one node of one resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Superblock {
    /// Incremented on every write; picks the newer of the two slots.
    pub seq: u64,
    pub resource: String,
    pub node: String,
    pub layout: Layout,
    pub disk: DiskState,
    pub gen: Generations,
    /// Whether this node was primary when last written (crash detection).
    pub was_primary: bool,
    /// The peer's data is known to be current up to our current generation.
    pub peer_up_to_date: bool,
    /// Last replication sequence written to this node's disk (as secondary).
    pub applied_seq: u64,
    /// Sequence numbers issued on this node (as primary).
    pub issued_seq: u64,
    /// Exported size both peers agreed on (0: never connected).
    pub agreed_size: u64,
    /// Journal checkpoint: logical position and sequence of the oldest record to keep.
    pub journal_pos: u64,
    pub journal_seq: u64,
    /// The journal overflowed (or was lost): the bitmap, not the journal, says what the peer lacks.
    pub journal_overflowed: bool,
    pub created_unix: u64,
    /// When this node was last promoted (unix milliseconds).
    pub promoted_ms: u64,
    /// The term of the record at `applied_seq` (0: none, or not known). New fields go at the
    /// end: an older format's payload is then a prefix of this one.
    pub applied_term: u64,
    /// The term of the record just before the journal checkpoint (0: not known).
    pub journal_prev_term: u64,
    /// This disk lost writes (a sync of it failed): every region is out of sync until a
    /// resync makes it up to date. Committed with `disk = Inconsistent` in one superblock
    /// write, so no crash can leave the inconsistent mark with only part of the bitmap that
    /// goes with it; a start rebuilds that bitmap from this. Cleared by any commit that
    /// leaves the disk not inconsistent (see [`MetaStore::update`]).
    pub lost_writes: bool,
    /// The peer went down cleanly, leaving this node every write it had (its `Leaving`,
    /// accepted: see `peer::peer_leaving`), and has not been heard from since: a plain
    /// `primary` here needs no fence and no --force, after a restart of this node too (DRBD
    /// keeps its "peer outdated" flag in the metadata for the same reason). Committed before
    /// the peer's next handshake goes on, so that no record outlives the peer's return.
    pub peer_left: bool,
    /// This node went down cleanly and told its peer it held every write (the other side of
    /// `peer_left`): the peer may have been promoted since, so until the two connect again
    /// this node is not promoted without --force (not by a fence either: an unreachable peer
    /// may be the primary now).
    pub handed_over: bool,
    /// What the peer last told this node its disk holds, as (data generation, highest
    /// sequence): a source's committed issued mark (`Msg::Durable`) or a target's durable
    /// acknowledgement; (0, 0): nothing heard. Told back to it at the next connect, where a
    /// peer holding less at that generation went back in time (its disk restored from an
    /// image): kept across this node's restarts for that.
    pub peer_durable: (u64, u64),
    /// A resync's end this node, its source, told the peer about and has not heard
    /// acknowledged: (its bitmap generation then, the generation the peer adopts with the
    /// SyncDone). Committed before the SyncDone is sent, cleared with the `after_sync`
    /// commit that follows its acknowledgement, and meaningful only while the bitmap
    /// generation is still that one (see [`Self::sync_done_unacked`]). (0, 0): none.
    pub sync_done_sent: (u64, u64),
    /// The bitmap generation this node's divergence from the peer began at while it was
    /// primary (a primary that lost its peer, or left it lacking writes); 0: none. Only
    /// meaningful while the bitmap generation is still that one (see
    /// [`Self::split_as_primary`]): DRBD keeps the same fact in its bitmap UUID's lowest bit,
    /// for `discard-younger-primary`.
    pub split_primary_gen: u64,
}

impl Superblock {
    /// Whether this node was primary when it and its peer parted: the generation its bitmap
    /// counts from began with it primary (see `split_primary_gen`).
    pub fn split_as_primary(&self) -> bool {
        crate::state::names_a_generation(self.split_primary_gen)
            && self.split_primary_gen == self.gen.bitmap
    }

    /// A new data generation started by this node as primary (it lost its peer, or leaves
    /// it lacking writes): when it is where this node parts from the peer (its bitmap
    /// generation starts here), that is recorded (see `split_primary_gen`). A generation that
    /// began earlier, at a promotion of this node without its peer say, stays as it was.
    pub fn new_generation_as_primary(&mut self, new_id: u64) {
        let parting = !crate::state::names_a_generation(self.gen.bitmap);
        self.gen = crate::state::new_generation(self.gen, new_id);
        if parting {
            self.split_primary_gen = self.gen.bitmap;
        }
    }

    /// The generation a peer may have adopted from this node's last SyncDone, whose
    /// acknowledgement never came (the link dropped just then), as long as this node's
    /// bitmap still counts from where it did then; 0: none. A peer at it holds this node's
    /// data as of that SyncDone, so this node's bitmap covers what it lacks (see
    /// `state::compare_generations_unacked`), however many generations this node started since.
    pub fn sync_done_unacked(&self) -> u64 {
        let (bitmap, gen) = self.sync_done_sent;
        if crate::state::names_a_generation(bitmap) && bitmap == self.gen.bitmap {
            gen
        } else {
            0
        }
    }

    /// Moves the durable applied mark to `(seq, term)` unless it is already past `seq` (the
    /// newer of two marks at one sequence wins: it is the record this node holds now).
    pub fn advance_applied(&mut self, (seq, term): (u64, u64)) {
        if seq >= self.applied_seq {
            self.applied_seq = seq;
            self.applied_term = term;
        }
    }
}

/// Bound on the superblock's sequence counters and journal position (2^62: centuries of
/// writes at millions per second).
pub const COUNTER_LIMIT: u64 = 1 << 62;

/// Bound on a sequence mark the peer names (in its state, a resync's start, a stream record):
/// half of [`COUNTER_LIMIT`], so that this node's own counters, which go on from the peer's
/// marks, stay far below what a superblock may hold (a mark just under the limit would be
/// committed past it after a few records, and the metadata then no longer reads).
pub const PEER_COUNTER_LIMIT: u64 = COUNTER_LIMIT / 2;

impl Superblock {
    /// Encodes into one slot: magic, version, payload length, postcard payload, crc32c.
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        let payload = postcard::to_allocvec(self)?;
        let mut slot = Vec::with_capacity(SLOT_LEN as usize);
        slot.extend_from_slice(&MAGIC.to_le_bytes());
        slot.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        slot.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        slot.extend_from_slice(&payload);
        let crc = crc32c::crc32c(&slot);
        slot.extend_from_slice(&crc.to_le_bytes());
        // Names are bounded by the config, so only a superblock decoded from an older
        // format with names this build would not write can get here (its new fields no
        // longer fit): an error for the caller, never a panic.
        if slot.len() > SLOT_LEN as usize {
            return Err(postcard::Error::SerializeBufferFull);
        }
        slot.resize(SLOT_LEN as usize, 0);
        Ok(slot)
    }

    /// Decodes one slot; `None` for anything not a valid, checksummed superblock.
    pub fn decode(slot: &[u8]) -> Option<Self> {
        if slot.len() < 20 || u64::from_le_bytes(slot[0..8].try_into().ok()?) != MAGIC {
            return None;
        }
        let version = u32::from_le_bytes(slot[8..12].try_into().ok()?);
        if !READABLE_FORMATS.contains(&version) {
            return None;
        }
        let len = u32::from_le_bytes(slot[12..16].try_into().ok()?) as usize;
        let end = 16usize.checked_add(len)?;
        if end + 4 > slot.len() {
            return None;
        }
        let crc = u32::from_le_bytes(slot[end..end + 4].try_into().ok()?);
        if crc32c::crc32c(&slot[..end]) != crc {
            return None;
        }
        let sb: Self = if version != FORMAT_VERSION {
            // The fields an older format lacks, as postcard encodes 0 and false: one byte
            // each (format 1: the two terms, `lost_writes`, `peer_left`, `handed_over`, the
            // two of `peer_durable`, the two of `sync_done_sent` and `split_primary_gen`;
            // format 2: the last eight; format 3: the last seven; format 4: the last five;
            // format 5: the last three; format 6: the last one).
            let missing: &[u8] = match version {
                FORMAT_V1 => &[0; 10],
                FORMAT_V2 => &[0; 8],
                FORMAT_V3 => &[0; 7],
                FORMAT_V4 => &[0; 5],
                FORMAT_V5 => &[0; 3],
                _ => &[0; 1],
            };
            let mut payload = slot[16..end].to_vec();
            payload.extend_from_slice(missing);
            postcard::from_bytes(&payload).ok()?
        } else {
            postcard::from_bytes(&slot[16..end]).ok()?
        };
        sb.counters()
            .iter()
            .all(|&c| c < COUNTER_LIMIT)
            .then_some(sb)
    }

    /// Counters that only ever count up by one per write, flush or commit: no real history
    /// comes near the top of their range, and one there would overflow the next step.
    fn counters(&self) -> [u64; 6] {
        [
            self.seq,
            self.applied_seq,
            self.issued_seq,
            self.journal_pos,
            self.journal_seq,
            self.peer_durable.1,
        ]
    }

    /// Picks the newer valid slot of the two.
    pub fn pick(a: Option<Self>, b: Option<Self>) -> Option<Self> {
        match (a, b) {
            (Some(a), Some(b)) => Some(if a.seq >= b.seq { a } else { b }),
            (a, b) => a.or(b),
        }
    }
}

/// How [`MetaStore::update_inner`] commits.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Always writes.
    Write,
    /// On a failed write, keeps the change in memory (see [`MetaStore::update_or_keep`]).
    KeepOnFailure,
    /// Writes only a change (see [`MetaStore::update_if_changed`]).
    SkipUnchanged,
}

/// The metadata device of a node, opened: a handle for superblock and area I/O.
/// Metadata writes are rare (role changes, generation changes), so they are plain synchronous
/// writes followed by fdatasync, off the data path.
pub struct MetaStore {
    file: Arc<File>,
    /// Orders superblock writes (see [`MetaStore::update`]); never held with the store's lock
    /// by a reader.
    io: Arc<Mutex<()>>,
    path: PathBuf,
    pub sb: Superblock,
    /// The format of the superblock as read from disk (the next commit writes
    /// [`FORMAT_VERSION`]).
    pub format: u32,
    /// What the peer last said its disk holds (see `Superblock::peer_durable`): every
    /// commit, whatever its path (a checkpoint of the journal too), writes the latest.
    pub heard: (u64, u64),
}

fn size_of(file: &File, path: &Path) -> Result<u64, MetaError> {
    let io = |source| MetaError::Io {
        path: path.to_owned(),
        error: source,
    };
    let md = file.metadata().map_err(io)?;
    if md.file_type().is_file() {
        return Ok(md.len());
    }
    // Block devices report 0 in metadata; seek to the end instead.
    use std::io::Seek;
    let mut f = file;
    f.seek(std::io::SeekFrom::End(0)).map_err(io)
}

/// What [`crate::fsprobe`] finds at the start of a backing device.
///
/// Reads through its own descriptor with readahead off, and drops what it read: a readahead
/// here leaves a marked large folio at offset 0, and when the daemon's first full resync reads
/// from there, the kernel's readahead ramps up from that marker and caches the whole device in
/// large folios that the resync's per-chunk cache drop cannot split. Every small client write
/// into such a folio then costs several times more (measured: 4 KiB writes at a quarter of
/// the rate after a resync).
pub fn probe_backing(path: &Path) -> Result<Option<crate::fsprobe::Found>, MetaError> {
    let io = |source| MetaError::Io {
        path: path.to_owned(),
        error: source,
    };
    let file = File::open(path).map_err(io)?;
    let size = size_of(&file, path)?;
    let n = (crate::fsprobe::PROBE_LEN as u64).min(size) as usize;
    let mut head = vec![0u8; n];
    crate::replication::fadvise(&file, 0, 0, libc::POSIX_FADV_RANDOM);
    let read = file.read_exact_at(&mut head, 0);
    crate::replication::fadvise(&file, 0, n as u64, libc::POSIX_FADV_DONTNEED);
    read.map_err(io)?;
    Ok(crate::fsprobe::probe(&head))
}

/// Where the metadata lives and how big the device holding it is.
fn meta_target(
    backing: &Path,
    external: Option<&Path>,
    create: bool,
) -> Result<(File, PathBuf, u64), MetaError> {
    let io = |p: &Path| {
        let p = p.to_owned();
        move |source| MetaError::Io {
            path: p,
            error: source,
        }
    };
    let bf = OpenOptions::new()
        .read(true)
        .write(true)
        .open(backing)
        .map_err(io(backing))?;
    let backing_size = size_of(&bf, backing)?;
    match external {
        None => Ok((bf, backing.to_owned(), backing_size)),
        Some(p) => {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .truncate(false)
                .open(p)
                .map_err(io(p))?;
            if create {
                // A file create-md made must survive a power cut with what it wrote: its
                // directory entry is synced too (the data is by the writes' own syncs).
                let dir = match p.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io(dir))?;
            }
            Ok((f, p.to_owned(), backing_size))
        }
    }
}

impl MetaStore {
    /// Reads the newest valid superblock; `Ok(None)` when there is none.
    fn read_sb(file: &File, path: &Path, sb_offset: u64) -> Result<Option<Superblock>, MetaError> {
        Ok(Self::read_sb_format(file, path, sb_offset)?.map(|(sb, _)| sb))
    }

    /// The newer valid superblock of the two slots, and its format.
    fn read_sb_format(
        file: &File,
        path: &Path,
        sb_offset: u64,
    ) -> Result<Option<(Superblock, u32)>, MetaError> {
        let mut buf = vec![0u8; SUPERBLOCK_AREA as usize];
        match file.read_exact_at(&mut buf, sb_offset) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(source) => {
                return Err(MetaError::Io {
                    path: path.to_owned(),
                    error: source,
                })
            }
        }
        let (a, b) = buf.split_at(SLOT_LEN as usize);
        // A format this build does not know, written by a newer one: said as such, not as
        // "no metadata" (which would suggest create-md over it).
        let newer = [a, b].into_iter().find_map(|slot| {
            let magic = u64::from_le_bytes(slot[0..8].try_into().ok()?);
            let version = u32::from_le_bytes(slot[8..12].try_into().ok()?);
            (magic == MAGIC && version > FORMAT_VERSION && version < 1 << 16).then_some(version)
        });
        let read = |slot: &[u8]| {
            let sb = Superblock::decode(slot)?;
            Some((sb, u32::from_le_bytes(slot[8..12].try_into().ok()?)))
        };
        if let (None, None, Some(v)) = (read(a), read(b), newer) {
            return Err(MetaError::Layout {
                path: path.to_owned(),
                why: format!(
                    "the metadata is of format {v}, newer than this build's {FORMAT_VERSION}: run the blockrep that wrote it"
                ),
            });
        }
        Ok(match (read(a), read(b)) {
            (Some(x), Some(y)) => Some(if x.0.seq >= y.0.seq { x } else { y }),
            (x, y) => {
                // One slot unreadable but not blank: a write torn by a crash (expected now and
                // then), or damage. The other slot is one update older; worth a line.
                let (bad, good) = if x.is_some() { (b, &x) } else { (a, &y) };
                if good.is_some() && bad.iter().any(|&c| c != 0) {
                    tracing::warn!(
                        "{}: one superblock slot is damaged (a torn write?): using the other, one update older",
                        path.display()
                    );
                }
                x.or(y)
            }
        })
    }

    /// `create-md`: writes fresh metadata. Refuses to overwrite valid metadata without `force`.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        backing: &Path,
        external: Option<&Path>,
        resource: &str,
        node: &str,
        journal_len: u64,
        granularity: u64,
        force: bool,
    ) -> Result<Superblock, MetaError> {
        let (file, path, backing_size) = meta_target(backing, external, true)?;
        let layout = Layout::compute(backing_size, external.is_none(), journal_len, granularity)
            .map_err(|(meta, detail)| MetaError::TooSmall {
                path: backing.to_owned(),
                size: backing_size,
                meta,
                need: meta + MIN_DATA,
                detail,
            })?;
        let old = {
            let meta_size = size_of(&file, &path)? / BLOCK * BLOCK;
            if meta_size < SUPERBLOCK_AREA {
                None
            } else {
                match Self::read_sb(&file, &path, meta_size - SUPERBLOCK_AREA) {
                    Ok(old) => old,
                    // Metadata this build cannot read (a newer format): --force overwrites
                    // both slots all the same.
                    Err(MetaError::Layout { .. }) if force => None,
                    Err(e) => return Err(e),
                }
            }
        };
        // An old superblock at the new one's place (the same layout) is outnumbered by the
        // new ones, so a crash between the two slot writes leaves a new one current.
        let old_seq = old
            .as_ref()
            .filter(|o| o.layout.sb_offset == layout.sb_offset)
            .map_or(0, |o| o.seq);
        if let (Some(old), false) = (old, force) {
            return Err(MetaError::Exists {
                path,
                resource: old.resource,
                node: old.node,
            });
        }
        // Internal metadata takes the end of the device: refuse to cut off a filesystem's
        // tail (DRBD's create-md refuses too).
        if external.is_none() && !force {
            if let Some(found) = probe_backing(backing)? {
                if found.cut_by(layout.data_size) {
                    return Err(MetaError::WouldCut {
                        path,
                        what: found.describe(),
                        data_size: layout.data_size,
                    });
                }
            }
        }
        let io = |source| MetaError::Io {
            path: path.clone(),
            error: source,
        };
        if external.is_some() {
            file.set_len(layout.meta_len()).map_err(io)?;
        }
        let sb = Superblock {
            seq: old_seq + 1,
            resource: resource.to_owned(),
            node: node.to_owned(),
            layout,
            disk: DiskState::Inconsistent,
            gen: Generations {
                current: UUID_JUST_CREATED,
                ..Default::default()
            },
            was_primary: false,
            peer_up_to_date: false,
            applied_seq: 0,
            issued_seq: 0,
            agreed_size: 0,
            journal_pos: 0,
            journal_seq: 1,
            journal_overflowed: false,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            promoted_ms: 0,
            applied_term: 0,
            journal_prev_term: 0,
            lost_writes: false,
            peer_left: false,
            handed_over: false,
            peer_durable: (0, 0),
            sync_done_sent: (0, 0),
            split_primary_gen: 0,
        };
        let mut store = MetaStore {
            file: Arc::new(file),
            io: Arc::default(),
            path,
            sb,
            format: FORMAT_VERSION,
            heard: (0, 0),
        };
        let io = |source| MetaError::Io {
            path: store.path.clone(),
            error: source,
        };
        let zeros = vec![0u8; 1 << 20];
        // The new superblock names a journal that starts at position 0 with sequence 1, and
        // recovery reads records from a checkpoint for as long as they check out: records of
        // the device's earlier life would still read as this one's wherever a position and a
        // sequence number happen to line up (the same mkfs after create-md, say) and go to the
        // peer as new writes. The whole area is cleared first.
        clear_area(
            &store.file,
            layout.journal_offset,
            layout.journal_len,
            &zeros,
        )
        .map_err(io)?;
        store.file.sync_data().map_err(io)?;
        // Both slots, so no stale superblock of an older format survives; the superblocks
        // first: a crash before the areas below are cleared leaves a fresh (inconsistent,
        // just created) node, whose stale bitmap bits only add to its full sync, never an
        // old superblock over a cleared bitmap.
        let first = store.sb.clone();
        store.write_slot(&first, first.seq % 2)?;
        store.sb.seq += 1;
        let second = store.sb.clone();
        store.write_slot(&second, second.seq % 2)?;
        // Clear bitmap and activity log: a fresh device has nothing out of sync.
        clear_area(
            &store.file,
            layout.bitmap_offset,
            layout.journal_offset - layout.bitmap_offset,
            &zeros,
        )
        .map_err(io)?;
        store.file.sync_data().map_err(io)?;
        Ok(store.sb)
    }

    /// Opens existing metadata and checks that it belongs to this resource and node.
    pub fn open(
        backing: &Path,
        external: Option<&Path>,
        resource: &str,
        node: &str,
    ) -> Result<Self, MetaError> {
        let (file, path, backing_size) = meta_target(backing, external, false)?;
        // The superblock area is the last 8 KiB of the 4 KiB-aligned metadata device.
        let meta_size = size_of(&file, &path)? / BLOCK * BLOCK;
        let sb = if meta_size >= SUPERBLOCK_AREA {
            Self::read_sb_format(&file, &path, meta_size - SUPERBLOCK_AREA)?
        } else {
            None
        };
        let (sb, format) = sb.ok_or_else(|| match external {
            None => MetaError::NotAtEnd {
                path: path.clone(),
                size: backing_size,
            },
            Some(_) => MetaError::NotFound { path: path.clone() },
        })?;
        if sb.resource != resource || sb.node != node {
            return Err(MetaError::Mismatch {
                path,
                found: sb.resource,
                found_node: sb.node,
                resource: resource.to_owned(),
                node: node.to_owned(),
            });
        }
        let l = sb.layout;
        if let Err(why) = l.check() {
            return Err(MetaError::Layout {
                path,
                why: format!("the recorded layout is not valid: {why}; restore the metadata or run create-md"),
            });
        }
        let data_end_ok = if external.is_none() {
            l.data_size <= l.bitmap_offset
        } else {
            // External metadata names no device: at least a backing device of another size
            // (a replaced or resized disk) is not taken for the one it describes.
            if l.data_size != backing_size / BLOCK * BLOCK {
                return Err(MetaError::Layout {
                    path,
                    why: format!(
                        "this metadata describes a backing device of {} bytes, but {} has {}: another disk, or a resized one? For a new disk run create-md again",
                        l.data_size,
                        backing.display(),
                        backing_size
                    ),
                });
            }
            true
        };
        // The superblock must sit where its own layout puts it: found elsewhere (a device that
        // grew by a block), the slot read may be a stale one.
        if !data_end_ok || l.sb_offset + SUPERBLOCK_AREA != meta_size {
            return Err(MetaError::Layout {
                path,
                why: format!(
                    "recorded data size {} and superblock at {} on a device of {} bytes",
                    l.data_size, l.sb_offset, backing_size
                ),
            });
        }
        let heard = sb.peer_durable;
        Ok(MetaStore {
            file: Arc::new(file),
            io: Arc::default(),
            path,
            sb,
            format,
            heard,
        })
    }

    /// Destroys this node's metadata (DRBD's `wipe-md`): both superblock slots first, synced,
    /// so that a crash part way leaves no metadata rather than a superblock over half-cleared
    /// areas; then the journal (it holds copies of written data), the bitmap and the
    /// activity log. The data area is not touched: with internal metadata it stays at the
    /// start of the backing device, where a filesystem made through blockrep can be used
    /// directly. Returns the superblock that was there.
    pub fn wipe(self) -> Result<Superblock, MetaError> {
        let io = |source| MetaError::Io {
            path: self.path.clone(),
            error: source,
        };
        let l = self.sb.layout;
        let zeros = vec![0u8; 1 << 20];
        clear_area(&self.file, l.sb_offset, SUPERBLOCK_AREA, &zeros).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        // From here a wipe cannot be run again (no superblock names the areas): say so.
        let rest = |e: std::io::Error| {
            let why = format!(
                "the superblocks are wiped, but clearing the journal, bitmap and activity log \
                 failed ({e}): `create-md` on this device clears them"
            );
            MetaError::Io {
                path: self.path.clone(),
                error: std::io::Error::new(e.kind(), why),
            }
        };
        clear_area(&self.file, l.journal_offset, l.journal_len, &zeros).map_err(rest)?;
        clear_area(
            &self.file,
            l.bitmap_offset,
            l.journal_offset - l.bitmap_offset,
            &zeros,
        )
        .map_err(rest)?;
        self.file.sync_data().map_err(rest)?;
        Ok(self.sb)
    }

    fn write_slot(&self, sb: &Superblock, slot: u64) -> Result<(), MetaError> {
        let io = |source| MetaError::Io {
            path: self.path.clone(),
            error: source,
        };
        let bytes = sb.encode().map_err(|e| MetaError::Layout {
            path: self.path.clone(),
            why: format!("cannot encode superblock: {e}"),
        })?;
        self.file
            .write_all_at(&bytes, sb.layout.sb_offset + slot * SLOT_LEN)
            .map_err(io)?;
        self.file.sync_data().map_err(io)
    }

    /// Persists the superblock (after the caller changed `sb`): the next sequence number, into
    /// the slot not holding the current copy, then fdatasync. Holds the caller's lock across
    /// the disk write: for single-owner use (create-md, tests); shared stores use
    /// [`MetaStore::update`].
    pub fn commit(&mut self) -> Result<(), MetaError> {
        let mut sb = self.sb.clone();
        sb.seq += 1;
        self.write_slot(&sb, sb.seq % 2)?;
        self.sb = sb;
        Ok(())
    }

    /// Changes the superblock of a shared store with `f` and makes the change durable before
    /// returning. If `f` fails, nothing changes, in memory or on disk.
    ///
    /// The store's lock is held only to change and encode the superblock, never across the
    /// fdatasync, so readers (status, the peer handshake, the async threads) are not held up
    /// by a slow disk. The `io` lock, taken first, orders the writes: a superblock is never
    /// overwritten on disk by an older one, and the two slots alternate by sequence number.
    pub fn update<T, E: From<MetaError>>(
        meta: &Mutex<MetaStore>,
        f: impl FnOnce(&mut Superblock) -> Result<T, E>,
    ) -> Result<T, E> {
        Self::update_inner(meta, f, Mode::Write, || Ok(()))
    }

    /// [`Self::update`] that also runs `also` (more writes to the metadata file) between the
    /// superblock's write and its fdatasync, so one sync makes both durable. Only for writes
    /// whose order against the superblock does not matter to a crash: either may land
    /// without the other. If `also` or the sync fails, the superblock in memory stays the one
    /// before, as for a failed write; the slot written may still reach the disk later, which
    /// is why only such writes go here (a restart may then read either).
    pub fn update_with<T, E: From<MetaError>>(
        meta: &Mutex<MetaStore>,
        f: impl FnOnce(&mut Superblock) -> Result<T, E>,
        also: impl FnOnce() -> std::io::Result<()>,
    ) -> Result<T, E> {
        Self::update_inner(meta, f, Mode::Write, also)
    }

    /// [`Self::update`] that writes nothing when `f` changes nothing (a flag cleared that was
    /// not set): decided under the same order as every write, so a change committed just
    /// before is seen.
    pub fn update_if_changed<T, E: From<MetaError>>(
        meta: &Mutex<MetaStore>,
        f: impl FnOnce(&mut Superblock) -> Result<T, E>,
    ) -> Result<T, E> {
        Self::update_inner(meta, f, Mode::SkipUnchanged, || Ok(()))
    }

    /// [`Self::update`] for a mark that must hold for the rest of this run whatever the disk
    /// does (an inconsistent disk): when the write fails, the change is kept in memory anyway,
    /// under the lock that orders the writes, so that every later update builds on it (and
    /// writes it, if the disk takes that one). Set after the lock, a later update that had
    /// copied the superblock before would write over it. The kept superblock keeps the old
    /// sequence number, so the next write still goes to the slot that failed.
    pub fn update_or_keep(
        meta: &Mutex<MetaStore>,
        f: impl FnOnce(&mut Superblock),
    ) -> Result<(), MetaError> {
        Self::update_inner(
            meta,
            |sb| {
                f(sb);
                Ok::<(), MetaError>(())
            },
            Mode::KeepOnFailure,
            || Ok(()),
        )
    }

    fn update_inner<T, E: From<MetaError>>(
        meta: &Mutex<MetaStore>,
        f: impl FnOnce(&mut Superblock) -> Result<T, E>,
        mode: Mode,
        also: impl FnOnce() -> std::io::Result<()>,
    ) -> Result<T, E> {
        let lock = || meta.lock().unwrap_or_else(|p| p.into_inner());
        let io = lock().io.clone();
        let _order = io.lock().unwrap_or_else(|p| p.into_inner());
        let (t, sb, file, path, offset, bytes) = {
            let m = lock();
            // On a copy, so that a refusal leaves the store as it was.
            let mut sb = m.sb.clone();
            // (Not where only a change is written: the mark alone is no reason to write, and
            // on a disk whose writes fail such a write would fail a connect.)
            if mode != Mode::SkipUnchanged {
                sb.peer_durable = m.heard;
            }
            let t = f(&mut sb)?;
            if sb.disk != DiskState::Inconsistent {
                // Made up to date (a resync's end, a forced promotion, a skipped sync) or
                // outdated by a decision: the lost writes no longer stand for anything.
                sb.lost_writes = false;
            }
            if mode == Mode::SkipUnchanged && sb == m.sb {
                return Ok(t);
            }
            sb.seq += 1;
            let bytes = sb.encode().map_err(|e| MetaError::Layout {
                path: m.path.clone(),
                why: format!("cannot encode superblock: {e}"),
            })?;
            let offset = sb.layout.sb_offset + (sb.seq % 2) * SLOT_LEN;
            (t, sb, m.file.clone(), m.path.clone(), offset, bytes)
        };
        let io_err = |source| MetaError::Io {
            path,
            error: source,
        };
        if let Err(e) = file
            .write_all_at(&bytes, offset)
            .and_then(|()| also())
            .and_then(|()| file.sync_data())
        {
            if mode == Mode::KeepOnFailure {
                lock().sb = Superblock {
                    seq: sb.seq - 1,
                    ..sb
                };
                crate::bell::ring();
            }
            return Err(io_err(e).into());
        }
        // Only a durable superblock is the current one: after a failed write the other slot
        // still holds it, and the next update overwrites the failed slot, never that one.
        lock().sb = sb;
        // The disk state, the generations and the peer's record are in the superblock.
        crate::bell::ring();
        Ok(t)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The metadata device's file, for area I/O (bitmap, activity log, journal).
    pub fn file(&self) -> &File {
        &self.file
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb() -> Superblock {
        Superblock {
            seq: 7,
            resource: "r0".into(),
            node: "alpha".into(),
            layout: Layout::compute(1 << 30, true, 64 << 20, 4096).unwrap(),
            disk: DiskState::UpToDate,
            gen: Generations {
                current: 0xabc,
                bitmap: 0,
                history: [1, 2],
            },
            was_primary: true,
            peer_up_to_date: false,
            applied_seq: 5,
            issued_seq: 9,
            agreed_size: 0,
            journal_pos: 0,
            journal_seq: 1,
            journal_overflowed: false,
            created_unix: 1,
            promoted_ms: 0,
            applied_term: 0x8000_0000_0000_1111,
            journal_prev_term: 0x8000_0000_0000_2222,
            lost_writes: true,
            peer_left: true,
            handed_over: true,
            peer_durable: (0xabc, 7),
            sync_done_sent: (3, 0xdef),
            split_primary_gen: 0,
        }
    }

    /// A slot of format 1 (no term fields, no `lost_writes`), built by hand as that format
    /// wrote it.
    fn v1_slot(sb: &Superblock) -> Vec<u8> {
        old_slot(sb, FORMAT_V1, 10)
    }

    /// A slot of an older format: the current payload without its last `missing` bytes
    /// (which must encode zeros and false).
    fn old_slot(sb: &Superblock, format: u32, missing: usize) -> Vec<u8> {
        let v = postcard::to_allocvec(sb).unwrap();
        assert!(v[v.len() - missing..].iter().all(|&b| b == 0));
        let payload = &v[..v.len() - missing];
        let mut slot = Vec::new();
        slot.extend_from_slice(&MAGIC.to_le_bytes());
        slot.extend_from_slice(&format.to_le_bytes());
        slot.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        slot.extend_from_slice(payload);
        let crc = crc32c::crc32c(&slot);
        slot.extend_from_slice(&crc.to_le_bytes());
        slot.resize(SLOT_LEN as usize, 0);
        slot
    }

    #[test]
    fn a_format_1_superblock_is_read_with_unknown_terms() {
        let old = sb_with_zero_terms();
        assert_eq!(Superblock::decode(&v1_slot(&old)), Some(old.clone()));
        // Written back in the current format, terms and all.
        let new = Superblock {
            applied_term: 9,
            ..old
        };
        assert_eq!(Superblock::decode(&new.encode().unwrap()), Some(new));
        // An unknown format is still refused.
        let mut slot = v1_slot(&sb_with_zero_terms());
        slot[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        assert_eq!(Superblock::decode(&slot), None);
    }

    #[test]
    fn metadata_of_a_newer_format_is_named_not_taken_for_none() {
        let dir = crate::test_dir::TestDir::new("brmeta-newer");
        let img = dir.join("d.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        MetaStore::create(&img, None, "r0", "alpha", 1 << 20, 4096, false).unwrap();
        let sb_at = MetaStore::open(&img, None, "r0", "alpha")
            .unwrap()
            .sb
            .layout
            .sb_offset;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        for slot in 0..2 {
            f.write_all_at(
                &(FORMAT_VERSION + 1).to_le_bytes(),
                sb_at + slot * SLOT_LEN + 8,
            )
            .unwrap();
        }
        let e = MetaStore::open(&img, None, "r0", "alpha")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("newer than this build"), "{e}");
        assert!(MetaStore::create(&img, None, "r0", "alpha", 1 << 20, 4096, false).is_err());
        MetaStore::create(&img, None, "r0", "alpha", 1 << 20, 4096, true).unwrap();
        assert!(MetaStore::open(&img, None, "r0", "alpha").is_ok());
    }

    #[test]
    fn a_format_2_superblock_is_read_without_lost_writes() {
        let old = Superblock {
            lost_writes: false,
            peer_left: false,
            handed_over: false,
            peer_durable: (0, 0),
            sync_done_sent: (0, 0),
            split_primary_gen: 0,
            ..sb()
        };
        assert_eq!(
            Superblock::decode(&old_slot(&old, FORMAT_V2, 8)),
            Some(old.clone())
        );
        let new = Superblock {
            lost_writes: true,
            ..old
        };
        assert_eq!(Superblock::decode(&new.encode().unwrap()), Some(new));
    }

    #[test]
    fn a_format_3_superblock_is_read_without_a_clean_leave() {
        let old = Superblock {
            peer_left: false,
            handed_over: false,
            peer_durable: (0, 0),
            sync_done_sent: (0, 0),
            split_primary_gen: 0,
            ..sb()
        };
        assert_eq!(
            Superblock::decode(&old_slot(&old, FORMAT_V3, 7)),
            Some(old.clone())
        );
        let new = Superblock {
            peer_left: true,
            handed_over: true,
            ..old
        };
        assert_eq!(Superblock::decode(&new.encode().unwrap()), Some(new));
    }

    #[test]
    fn a_format_4_superblock_is_read_with_nothing_heard_of_the_peer() {
        let old = Superblock {
            peer_durable: (0, 0),
            sync_done_sent: (0, 0),
            split_primary_gen: 0,
            ..sb()
        };
        assert_eq!(
            Superblock::decode(&old_slot(&old, FORMAT_V4, 5)),
            Some(old.clone())
        );
        let new = Superblock {
            peer_durable: (0x1234_5678_9abc_def0, 1 << 40),
            ..old
        };
        assert_eq!(Superblock::decode(&new.encode().unwrap()), Some(new));
    }

    #[test]
    fn a_format_5_superblock_is_read_with_no_unacknowledged_sync_done() {
        let old = Superblock {
            sync_done_sent: (0, 0),
            split_primary_gen: 0,
            ..sb()
        };
        assert_eq!(
            Superblock::decode(&old_slot(&old, FORMAT_V5, 3)),
            Some(old.clone())
        );
        let new = Superblock {
            gen: Generations {
                bitmap: 0x77,
                ..old.gen
            },
            sync_done_sent: (0x77, 0x1234_5678_9abc_def0),
            ..old
        };
        assert_eq!(
            Superblock::decode(&new.encode().unwrap()),
            Some(new.clone())
        );
        // Meaningful only while the bitmap generation is the one it was recorded with.
        assert_eq!(new.sync_done_unacked(), 0x1234_5678_9abc_def0);
        let moved = Superblock {
            gen: Generations {
                bitmap: 0,
                ..new.gen
            },
            ..new
        };
        assert_eq!(moved.sync_done_unacked(), 0);
    }

    #[test]
    fn a_format_6_superblock_is_read_as_not_parted_as_primary() {
        let old = Superblock {
            split_primary_gen: 0,
            ..sb()
        };
        assert_eq!(
            Superblock::decode(&old_slot(&old, FORMAT_V6, 1)),
            Some(old.clone())
        );
        assert!(!old.split_as_primary());
        // Recorded at the bitmap generation it parted at, and meaningful only while the
        // bitmap generation is still that one.
        let mut new = old.clone();
        new.new_generation_as_primary(0x99);
        assert!(new.split_as_primary());
        assert_eq!(new.gen.bitmap, old.gen.current);
        // A generation started later, still parted, changes nothing of it; one started as a
        // promotion without the peer is not one parted as primary.
        let mut later = new.clone();
        later.new_generation_as_primary(0x9a);
        assert!(later.split_as_primary());
        let mut promoted = old.clone();
        promoted.gen = crate::state::new_generation(promoted.gen, 0x9b);
        promoted.new_generation_as_primary(0x9c);
        assert!(!promoted.split_as_primary());
        assert_eq!(
            Superblock::decode(&new.encode().unwrap()),
            Some(new.clone())
        );
        let resynced = Superblock {
            gen: Generations {
                bitmap: 0,
                ..new.gen
            },
            ..new
        };
        assert!(!resynced.split_as_primary());
    }

    fn sb_with_zero_terms() -> Superblock {
        Superblock {
            applied_term: 0,
            journal_prev_term: 0,
            lost_writes: false,
            peer_left: false,
            handed_over: false,
            peer_durable: (0, 0),
            sync_done_sent: (0, 0),
            split_primary_gen: 0,
            ..sb()
        }
    }

    #[test]
    fn every_computed_layout_passes_its_check_and_a_broken_one_fails() {
        for (size, internal, journal, gran) in [
            (1u64 << 30, true, 64u64 << 20, 4096u64),
            (3 << 20, true, 1 << 20, 4096),
            (10 << 30, false, 16 << 30, 1 << 20),
            ((1 << 30) + 12345, true, 4 << 20, 65536),
        ] {
            let l = Layout::compute(size, internal, journal, gran).unwrap();
            assert_eq!(l.check(), Ok(()), "{l:?}");
        }
        let good = Layout::compute(1 << 30, true, 64 << 20, 4096).unwrap();
        let broken = [
            Layout {
                journal_len: u64::MAX / 2,
                ..good
            },
            Layout { al_len: 0, ..good },
            Layout {
                bitmap_len: 4096,
                ..good
            },
            Layout {
                granularity: 3,
                ..good
            },
            Layout {
                al_offset: good.bitmap_offset,
                ..good
            },
            Layout {
                sb_offset: u64::MAX,
                ..good
            },
        ];
        for l in broken {
            assert!(l.check().is_err(), "{l:?}");
        }
    }

    #[test]
    fn layout_internal_fits_and_is_ordered() {
        let size = 1u64 << 30;
        let l = Layout::compute(size, true, 64 << 20, 4096).unwrap();
        assert_eq!(l.data_size % BLOCK, 0);
        assert!(l.data_size <= l.bitmap_offset);
        assert!(l.bitmap_offset + l.bitmap_len <= l.al_offset);
        assert!(l.al_offset + l.al_len <= l.journal_offset);
        assert!(l.journal_offset + l.journal_len <= l.sb_offset);
        assert!(l.sb_offset + SUPERBLOCK_AREA <= size);
        // One bit per 4 KiB of the device.
        assert!(l.bitmap_len * 8 * 4096 >= size);
        for g in [4096u64, 65536, 1 << 20] {
            let l = Layout::compute(size + 12345, true, 1 << 20, g).unwrap();
            assert!(l.sb_offset + SUPERBLOCK_AREA <= size + 12345);
            assert!(l.bitmap_len * 8 * g >= l.data_size);
        }
    }

    #[test]
    fn layout_too_small_reports_numbers() {
        let (meta, detail) = Layout::compute(8 << 20, true, 64 << 20, 4096).unwrap_err();
        assert!(meta > 64 << 20);
        assert!(detail.contains("journal"));
        let l = Layout::compute(8 << 20, false, 64 << 20, 4096).unwrap();
        assert_eq!(l.data_size, 8 << 20);
        assert_eq!(l.bitmap_offset, 0);
    }

    #[test]
    fn superblock_round_trip_and_corruption() {
        let s = sb();
        let slot = s.encode().unwrap();
        assert_eq!(slot.len(), SLOT_LEN as usize);
        assert_eq!(Superblock::decode(&slot).unwrap(), s);
        // Every single-byte corruption of the used part is rejected.
        let used = 16 + postcard::to_allocvec(&s).unwrap().len() + 4;
        for i in 0..used {
            let mut bad = slot.clone();
            bad[i] ^= 0x40;
            assert!(Superblock::decode(&bad).is_none(), "byte {i}");
        }
        assert!(Superblock::decode(&slot[..10]).is_none());
        // A huge length field does not panic.
        let mut bad = slot.clone();
        bad[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Superblock::decode(&bad).is_none());
    }

    #[test]
    fn pick_prefers_newer_valid_slot() {
        let a = sb();
        let mut b = sb();
        b.seq = 8;
        assert_eq!(
            Superblock::pick(Some(a.clone()), Some(b.clone()))
                .unwrap()
                .seq,
            8
        );
        assert_eq!(Superblock::pick(Some(a.clone()), None).unwrap().seq, 7);
        assert_eq!(Superblock::pick(None, Some(b)).unwrap().seq, 8);
        assert!(Superblock::pick(None, None).is_none());
    }

    #[test]
    fn create_md_force_ends_the_journal_of_the_device_s_earlier_life() {
        use crate::journal::{append_msg, Ring};
        let dir = crate::test_dir::TestDir::new("brmeta-j");
        let img = dir.join("a.img");
        File::create(&img).unwrap().set_len(32 << 20).unwrap();
        let l = MetaStore::create(&img, None, "r0", "alpha", 4 << 20, 4096, false)
            .unwrap()
            .layout;
        // The earlier life's first lap, as persisted: records from sequence 1 at position 0,
        // just what a fresh superblock's checkpoint (position 0, sequence 1) reads.
        let mut ring = Ring::new(l.journal_len);
        for seq in 1..=5u64 {
            let d = vec![seq as u8; 4096];
            let msg = proto::peer::Msg::Write {
                seq,
                term: 7,
                offset: seq * 4096,
                len: 4096,
                crc: crc32c::crc32c(&d),
                fua: false,
            };
            append_msg(&mut ring, &msg, &d, |_| {}).unwrap();
        }
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        f.write_all_at(ring.raw(0, l.journal_len), l.journal_offset)
            .unwrap();
        let journal = |f: &File| {
            let mut v = vec![0u8; l.journal_len as usize];
            f.read_exact_at(&mut v, l.journal_offset).unwrap();
            v
        };
        assert_eq!(Ring::recover(journal(&f), 0, 1, 0).len(), 5);
        // And a lap of it further on, past the first MiB.
        f.write_all_at(ring.raw(0, 1 << 20), l.journal_offset + (2 << 20))
            .unwrap();
        MetaStore::create(&img, None, "r0", "alpha", 4 << 20, 4096, true).unwrap();
        assert!(Ring::recover(journal(&f), 0, 1, 0).is_empty());
        assert!(
            journal(&f).iter().all(|&b| b == 0),
            "create-md left bytes of the earlier journal"
        );
    }

    #[test]
    fn a_grown_device_is_named_and_shrinking_it_back_finds_the_metadata() {
        let (_dir, img, f) = image_of_32_mib("brmeta-grow");
        MetaStore::create(&img, None, "r0", "alpha", 1 << 20, 4096, false).unwrap();
        f.set_len(48 << 20).unwrap();
        let e = MetaStore::open(&img, None, "r0", "alpha").err();
        let msg = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("no blockrep metadata at the end of the device (50331648 bytes)")
                && msg.contains("grown")
                && msg.contains("shrink the device back"),
            "{msg}"
        );
        f.set_len(32 << 20).unwrap();
        let m = MetaStore::open(&img, None, "r0", "alpha").unwrap();
        assert_eq!(m.sb.node, "alpha");
    }

    /// A fresh 32 MiB image file in a directory of its own, removed when the returned guard is
    /// dropped.
    fn image_of_32_mib(tag: &str) -> (crate::test_dir::TestDir, PathBuf, File) {
        let dir = crate::test_dir::TestDir::new(tag);
        let img = dir.join("a.img");
        let f = File::create(&img).unwrap();
        f.set_len(32 << 20).unwrap();
        (dir, img, f)
    }

    #[test]
    fn wiped_metadata_is_gone_and_the_data_stays() {
        let (_dir, img, f) = image_of_32_mib("brmeta-wipe");
        let sb = MetaStore::create(&img, None, "r0", "alpha", 1 << 20, 4096, false).unwrap();
        let l = sb.layout;
        let data = [0x5au8; 4096];
        f.write_all_at(&data, l.data_size - 4096).unwrap();
        f.write_all_at(&[0xa5u8; 4096], l.journal_offset).unwrap();
        f.write_all_at(&[0xffu8; 64], l.bitmap_offset).unwrap();
        let m = MetaStore::open(&img, None, "r0", "alpha").unwrap();
        assert_eq!(m.wipe().unwrap().node, "alpha");
        let Err(e) = MetaStore::open(&img, None, "r0", "alpha") else {
            panic!("metadata still opens after the wipe");
        };
        assert!(matches!(e, MetaError::NotAtEnd { .. }), "{e}");
        let f = File::open(&img).unwrap();
        let mut meta = vec![0xeeu8; l.meta_len() as usize];
        f.read_exact_at(&mut meta, l.bitmap_offset).unwrap();
        assert!(
            meta.iter().all(|&b| b == 0),
            "metadata bytes left after the wipe"
        );
        let mut back = [0u8; 4096];
        f.read_exact_at(&mut back, l.data_size - 4096).unwrap();
        assert_eq!(back, data, "the wipe touched the data area");
        // A device wiped is a device without metadata: create-md needs no --force.
        MetaStore::create(&img, None, "r0", "alpha", 1 << 20, 4096, false).unwrap();
    }

    #[test]
    fn create_open_commit_on_a_file() {
        let (dir, img, _f) = image_of_32_mib("brmeta");
        let sb = MetaStore::create(&img, None, "r0", "alpha", 1 << 20, 4096, false).unwrap();
        assert_eq!(sb.disk, DiskState::Inconsistent);
        let e = MetaStore::create(&img, None, "r0", "alpha", 1 << 20, 4096, false).unwrap_err();
        assert!(matches!(e, MetaError::Exists { .. }), "{e}");
        let mut m = MetaStore::open(&img, None, "r0", "alpha").unwrap();
        m.sb.disk = DiskState::UpToDate;
        m.commit().unwrap();
        m.sb.applied_seq = 42;
        m.commit().unwrap();
        let m = MetaStore::open(&img, None, "r0", "alpha").unwrap();
        assert_eq!(m.sb.applied_seq, 42);
        assert_eq!(m.sb.disk, DiskState::UpToDate);
        // A shared store: a refused update writes nothing; an accepted one is on disk, and
        // successive updates alternate slots without losing the newest.
        let shared = Mutex::new(m);
        let r: Result<(), MetaError> = MetaStore::update(&shared, |sb| {
            sb.applied_seq = 99;
            Err(MetaError::NotFound { path: "x".into() })
        });
        assert!(r.is_err());
        assert_eq!(shared.lock().unwrap().sb.applied_seq, 42);
        assert_eq!(
            MetaStore::open(&img, None, "r0", "alpha")
                .unwrap()
                .sb
                .applied_seq,
            42
        );
        for v in [43, 44, 45] {
            MetaStore::update(&shared, |sb| {
                sb.applied_seq = v;
                Ok::<(), MetaError>(())
            })
            .unwrap();
            let m = MetaStore::open(&img, None, "r0", "alpha").unwrap();
            assert_eq!(m.sb.applied_seq, v);
        }
        // Wrong node is refused.
        assert!(matches!(
            MetaStore::open(&img, None, "r0", "beta"),
            Err(MetaError::Mismatch { .. })
        ));
        // create-md --force numbers its superblocks above the old ones: were it cut between
        // its two slot writes, the old superblock could not win over the new.
        let old_seq = MetaStore::open(&img, None, "r0", "alpha").unwrap().sb.seq;
        let fresh = MetaStore::create(&img, None, "r0", "alpha", 1 << 20, 4096, true).unwrap();
        assert_eq!(fresh.seq, old_seq + 2);
        let reopened = MetaStore::open(&img, None, "r0", "alpha").unwrap();
        assert_eq!(reopened.sb.applied_seq, 0);
        assert_eq!(reopened.sb.disk, DiskState::Inconsistent);
        // A device that grew by a block: its superblock is no longer where its layout says.
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.set_len((32 << 20) + 4096).unwrap();
        let e = MetaStore::open(&img, None, "r0", "alpha")
            .err()
            .map(|e| e.to_string());
        assert!(
            e.is_some(),
            "metadata opened at the wrong place after the device grew"
        );
        f.set_len(32 << 20).unwrap();
        assert!(MetaStore::open(&img, None, "r0", "alpha").is_ok());
        // External metadata on a backing device of another size (a replaced disk) is refused.
        let data = dir.join("x.img");
        let md = dir.join("x.md");
        File::create(&data).unwrap().set_len(16 << 20).unwrap();
        MetaStore::create(&data, Some(&md), "r0", "alpha", 1 << 20, 4096, false).unwrap();
        assert!(MetaStore::open(&data, Some(&md), "r0", "alpha").is_ok());
        File::options()
            .write(true)
            .open(&data)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        let e = MetaStore::open(&data, Some(&md), "r0", "alpha")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("another disk"), "{e}");
        // Too small, with numbers.
        let small = dir.join("s.img");
        File::create(&small).unwrap().set_len(1 << 20).unwrap();
        let e = MetaStore::create(&small, None, "r0", "alpha", 1 << 20, 4096, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("1048576 bytes"), "{e}");
    }

    /// A superblock too big for its slot (names no config allows, as only an older format's
    /// slot could hold with the new fields added) is an encoding error, never a panic.
    #[test]
    fn a_superblock_that_outgrows_its_slot_is_an_error() {
        let sb = Superblock {
            resource: "x".repeat(SLOT_LEN as usize),
            ..sb_with_zero_terms()
        };
        assert!(sb.encode().is_err());
        assert!(sb_with_zero_terms().encode().is_ok());
    }

    /// xorshift64: a small deterministic generator for the garbage and mutation tests below,
    /// with fixed seeds so that a failure reproduces (and no dependency for it).
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Self {
            // Spread small seeds over the state: xorshift's first outputs from 1..=4 are tiny.
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        fn next_u64(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        /// A number in `0..n` (`n > 0`).
        fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next_u64() as u8).collect()
        }

        /// Flips 1 to 8 random bits of `b` (not empty); returns the lowest and highest byte
        /// touched. Two flips of one bit may cancel.
        fn flip_bits(&mut self, b: &mut [u8]) -> (usize, usize) {
            let (mut lo, mut hi) = (usize::MAX, 0);
            for _ in 0..1 + self.below(8) {
                let i = self.below(b.len());
                b[i] ^= 1 << self.below(8);
                (lo, hi) = (lo.min(i), hi.max(i));
            }
            (lo, hi)
        }
    }

    /// `slot` with its crc recomputed where its length field puts it: a slot as a buggy build
    /// or a foreign tool may write it, where only the decoder's own checks stand between its
    /// content and the node.
    fn resealed(mut slot: Vec<u8>) -> Vec<u8> {
        let end = 16 + u32::from_le_bytes(slot[12..16].try_into().unwrap()) as usize;
        if end + 4 <= slot.len() {
            let crc = crc32c::crc32c(&slot[..end]);
            slot[end..end + 4].copy_from_slice(&crc.to_le_bytes());
        }
        slot
    }

    /// Bytes of `slot` its crc covers, crc included.
    fn used(slot: &[u8]) -> usize {
        16 + u32::from_le_bytes(slot[12..16].try_into().unwrap()) as usize + 4
    }

    /// What a decoded superblock promises whatever the slot held: counters below the limit,
    /// and a layout that either passes its check or is refused by it (as `MetaStore::open`
    /// does next) without a panic. Returns whether the layout passed.
    fn check_decoded(sb: &Superblock) -> bool {
        for c in sb.counters() {
            assert!(c < COUNTER_LIMIT, "{sb:?}");
        }
        let _ = sb.sync_done_unacked();
        let ok = sb.layout.check().is_ok();
        if ok {
            assert!(sb.layout.meta_len() >= SUPERBLOCK_AREA, "{sb:?}");
        }
        // Names as `open` accepts them (a config's, at most 64 bytes): written back, it
        // reads back as itself.
        if sb.resource.len() <= 64 && sb.node.len() <= 64 {
            assert_eq!(Superblock::decode(&sb.encode().unwrap()).as_ref(), Some(sb));
        }
        ok
    }

    /// A valid slot of every format this build reads, and the superblock it holds.
    fn sample_slots() -> Vec<(Vec<u8>, Superblock)> {
        let old = sb_with_zero_terms();
        let mut v = vec![(sb().encode().unwrap(), sb())];
        for (format, missing) in [
            (FORMAT_V1, 10),
            (FORMAT_V2, 8),
            (FORMAT_V3, 7),
            (FORMAT_V4, 5),
            (FORMAT_V5, 3),
            (FORMAT_V6, 1),
        ] {
            v.push((old_slot(&old, format, missing), old.clone()));
        }
        for (slot, sb) in &v {
            assert_eq!(Superblock::decode(slot).as_ref(), Some(sb));
        }
        v
    }

    #[test]
    fn random_slots_never_panic_the_superblock_decoder() {
        // Any bytes where a slot is read (a device that never held metadata, a damaged one):
        // no superblock, no panic. Each batch is also fed behind a valid head (magic, a format
        // this build reads, a length that fits, the right crc) so postcard decodes the garbage.
        let formats = READABLE_FORMATS;
        for seed in 1..=4 {
            let mut rng = Rng::new(seed);
            for _ in 0..250 {
                let len = rng.below(SLOT_LEN as usize + 1);
                let mut slot = rng.bytes(len);
                assert_eq!(Superblock::decode(&slot), None);
                if len < 20 {
                    continue;
                }
                slot[0..8].copy_from_slice(&MAGIC.to_le_bytes());
                let format = formats[rng.below(formats.len())];
                slot[8..12].copy_from_slice(&format.to_le_bytes());
                let payload = rng.below(len - 19) as u32;
                slot[12..16].copy_from_slice(&payload.to_le_bytes());
                if let Some(sb) = Superblock::decode(&resealed(slot)) {
                    check_decoded(&sb);
                }
            }
        }
    }

    #[test]
    fn mutated_superblocks_never_panic_the_decoder() {
        // Valid slots of every format, with bits flipped, cut at every length, or extended:
        // what the crc covers is never taken when changed, and what it does not cover (the
        // slot's zero tail) never matters.
        for (good, sb) in sample_slots() {
            let used = used(&good);
            for n in 0..good.len() {
                let got = Superblock::decode(&good[..n]);
                assert_eq!(got.as_ref(), (n >= used).then_some(&sb), "cut at {n}");
            }
            for seed in 1..=4 {
                let mut rng = Rng::new(seed);
                for _ in 0..100 {
                    let mut bad = good.clone();
                    // Half the time in the bytes the crc covers (most of a slot is its tail).
                    let span = if rng.below(2) == 0 { used } else { bad.len() };
                    let (lo, _) = rng.flip_bits(&mut bad[..span]);
                    let got = Superblock::decode(&bad);
                    if bad[..used] != good[..used] {
                        assert_eq!(got, None, "flipped from byte {lo}");
                    } else {
                        assert_eq!(got.as_ref(), Some(&sb), "flipped from byte {lo}");
                    }
                    let mut longer = good.clone();
                    let more = 1 + rng.below(64);
                    longer.extend_from_slice(&rng.bytes(more));
                    assert_eq!(Superblock::decode(&longer).as_ref(), Some(&sb));
                }
            }
        }
    }

    #[test]
    fn resealed_mutated_superblocks_never_panic_the_decoder() {
        // A mutated payload (or length field) under a crc recomputed for it: decoded or not,
        // never a panic, and whatever decodes keeps `decode`'s promises; its layout is left to
        // `Layout::check`, which `MetaStore::open` runs next (counted here, not asserted).
        let (mut decoded, mut layout_refused, mut tried) = (0, 0, 0);
        for (good, _) in sample_slots() {
            let used = used(&good);
            for seed in 1..=4 {
                let mut rng = Rng::new(seed);
                for _ in 0..100 {
                    let mut bad = good.clone();
                    if rng.below(8) == 0 {
                        // The length field: shorter or longer than the payload.
                        let len = rng.below(used - 16) as u32;
                        bad[12..16].copy_from_slice(&len.to_le_bytes());
                    } else {
                        rng.flip_bits(&mut bad[16..used - 4]);
                    }
                    tried += 1;
                    if let Some(sb) = Superblock::decode(&resealed(bad)) {
                        decoded += 1;
                        if !check_decoded(&sb) {
                            layout_refused += 1;
                        }
                    }
                }
            }
        }
        eprintln!(
            "resealed mutations: {tried} tried, {decoded} decoded, {layout_refused} of these \
             refused by Layout::check"
        );
        assert!(decoded > 0, "the mutations never reached past postcard");
    }
}
