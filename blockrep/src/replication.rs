//! Replication state shared by the write path and the peer link.
//!
//! On the primary, every write gets a sequence number and a journal record under one lock, so
//! sequence order, journal order and send order are the same. Writes that overlap a write still
//! in flight wait for it, so the local disk ends in sequence order too and both replicas agree.
//! Acknowledgement then waits for what the protocol promises: A nothing more, B the peer's
//! receipt, C the peer's write.
//!
//! On the secondary, the same range ordering keeps overlapping writes in stream order while
//! others are applied concurrently.

use std::fs::File;
use std::os::unix::fs::FileExt;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use proto::peer::Msg;
use tokio::sync::{watch, Notify};

use crate::activity::ActivityLog;
use crate::bitmap::Bitmap;
use crate::config::Protocol;
use crate::journal::{self, AppendError, Ring};
use crate::meta::{Layout, MetaStore};

/// What the peer has confirmed, and whether the link is up. `epoch` changes on every
/// connect and disconnect, so a waiter knows its peer went away even if it came back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Acks {
    pub connected: bool,
    pub epoch: u64,
    pub received: u64,
    pub applied: u64,
    /// On the peer's disk (its data synced); its applied mark may not say so yet.
    pub synced: u64,
    /// Synced, and the peer's applied mark committed: a restart of the peer resumes after
    /// it. Everything that lets this node forget a record goes by this mark, not `synced`.
    pub durable: u64,
    /// A resync's first sequence, while the peer has not taken it (0 otherwise). The marks
    /// start at the sequence before it, which the resync brings the peer to, not the peer:
    /// until it has committed the SyncStart (its disk inconsistent, so not promoted without
    /// `--force`) it is up to date without the writes that waited through the reconnect. A
    /// write waits for a mark at or past this (see [`Acks::mark`]).
    pub confirm_from: u64,
}

/// The peer's marks a write can wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    Received,
    Applied,
    Synced,
}

impl Acks {
    /// The mark a waiting write goes by: none below [`Self::confirm_from`] (the peer
    /// passes it only after it committed the resync's start, in stream order).
    fn mark(&self, m: Mark) -> u64 {
        let v = match m {
            Mark::Received => self.received,
            Mark::Applied => self.applied,
            Mark::Synced => self.synced,
        };
        if v < self.confirm_from {
            0
        } else {
            v
        }
    }
}

/// Writes waiting for the peer, one queue per mark, lowest sequence first. An ack wakes only
/// the writes it covers; a watch would wake every waiting write on every ack (at depth 32
/// that was 32 task polls per ack, for typically a handful of replies). A connect or
/// disconnect wakes them all: the journal and the bitmap hold what a lost peer lacks.
#[derive(Default)]
struct PeerWaiters {
    queues: [std::collections::BinaryHeap<PeerWaiter>; 3],
}

struct PeerWaiter {
    seq: u64,
    wake: tokio::sync::oneshot::Sender<()>,
}

impl PartialEq for PeerWaiter {
    fn eq(&self, o: &Self) -> bool {
        self.seq == o.seq
    }
}
impl Eq for PeerWaiter {}
impl PartialOrd for PeerWaiter {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for PeerWaiter {
    /// Reversed: the heap's top is the lowest sequence.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.seq.cmp(&self.seq)
    }
}

impl PeerWaiters {
    const MARKS: [Mark; 3] = [Mark::Received, Mark::Applied, Mark::Synced];

    fn queue(&mut self, m: Mark) -> &mut std::collections::BinaryHeap<PeerWaiter> {
        &mut self.queues[m as usize]
    }

    /// Wakes the waiters the marks in `a` cover.
    fn wake_covered(&mut self, a: &Acks) {
        for m in Self::MARKS {
            let upto = a.mark(m);
            let q = self.queue(m);
            while q.peek().is_some_and(|w| w.seq <= upto) {
                if let Some(w) = q.pop() {
                    // The write may have given up waiting (its client went away): no matter.
                    let _ = w.wake.send(());
                }
            }
        }
    }

    fn wake_all(&mut self) {
        for q in &mut self.queues {
            for w in q.drain() {
                let _ = w.wake.send(());
            }
        }
    }
}

#[derive(Default)]
pub struct Stats {
    pub seq_sent: AtomicU64,
    /// As a secondary: the last stream record received (for `status`).
    pub seq_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub crc_errors: AtomicU64,
    pub auth_failures: AtomicU64,
    pub protocol_errors: AtomicU64,
}

/// A stream record before it is journaled.
#[derive(Debug, Clone, Copy)]
pub enum Record<'a> {
    Write {
        offset: u64,
        data: &'a [u8],
        fua: bool,
        /// The crc32c of `data`, when its reader computed it as the data arrived.
        crc: Option<u32>,
    },
    Zero {
        offset: u64,
        len: u64,
        trim: bool,
    },
    /// A client's flush: a barrier in the stream (see [`Msg::Flush`]).
    Flush,
    /// This node's own request for the peer's durable mark: not a barrier (see
    /// [`Msg::Checkpoint`]).
    Checkpoint,
    /// End of a resync: the target adopts this generation once everything before is applied.
    SyncDone {
        gen: proto::peer::GenIds,
    },
}

impl Record<'_> {
    fn range(&self) -> Option<(u64, u64)> {
        match *self {
            Record::Write { offset, data, .. } => Some((offset, offset + data.len() as u64)),
            Record::Zero { offset, len, .. } => Some((offset, offset + len)),
            Record::Flush | Record::Checkpoint | Record::SyncDone { .. } => None,
        }
    }
}

/// In-flight ranges by sequence number: a new range waits for every earlier overlapping one.
///
/// A deque in sequence order rather than a map: sequences arrive in order (issue order on the
/// primary, stream order on the secondary), so an insert is a push at the back, with no
/// allocation once the deque has grown to the depth in flight. A finished range leaves a hole
/// until every earlier one has finished too.
#[derive(Default)]
pub struct Ranges {
    inflight: std::collections::VecDeque<(u64, Option<(u64, u64)>)>,
    live: usize,
}
impl Ranges {
    pub fn insert(&mut self, seq: u64, range: (u64, u64)) {
        match self.inflight.back() {
            Some(&(last, _)) if last >= seq => {
                // Out of order (not expected): keep the deque sorted all the same.
                let at = self.inflight.partition_point(|&(s, _)| s < seq);
                if self.inflight.get(at).is_some_and(|&(s, _)| s == seq) {
                    if self.inflight[at].1.replace(range).is_none() {
                        self.live += 1;
                    }
                    return;
                }
                self.inflight.insert(at, (seq, Some(range)));
            }
            _ => self.inflight.push_back((seq, Some(range))),
        }
        self.live += 1;
    }
    pub fn remove(&mut self, seq: u64) {
        if let Ok(at) = self.inflight.binary_search_by_key(&seq, |&(s, _)| s) {
            if self.inflight[at].1.take().is_some() {
                self.live -= 1;
            }
        }
        while self.inflight.front().is_some_and(|&(_, r)| r.is_none()) {
            self.inflight.pop_front();
        }
        // Holes behind an old write that is slow to finish: compact, so that the deque (and
        // every `blocked` scan) stays proportional to what is in flight.
        if self.inflight.len() > 2 * self.live + 64 {
            self.inflight.retain(|&(_, r)| r.is_some());
        }
    }
    /// Whether an earlier in-flight range overlaps `range`.
    pub fn blocked(&self, seq: u64, range: (u64, u64)) -> bool {
        self.inflight
            .iter()
            .take_while(|&&(s, _)| s < seq)
            .any(|&(_, r)| r.is_some_and(|(s, e)| s < range.1 && range.0 < e))
    }
    pub fn len(&self) -> usize {
        self.live
    }
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }
}

/// A resync or verify chunk's hold on its range (see `Inner::read_hold`), given back on
/// drop; the writes it held re-check.
struct ReadHold<'a>(&'a Replication);

impl Drop for ReadHold<'_> {
    fn drop(&mut self) {
        self.0.lock().read_hold = None;
        self.0.range_done.notify_waiters();
    }
}

/// A write's place at the head of the line for journal space (`Inner::space_head`), given up
/// when the write leaves the line: issued, failed, or dropped with its client.
struct HeadOfLine<'a> {
    rep: &'a Replication,
    ticket: Option<u64>,
}

impl Drop for HeadOfLine<'_> {
    fn drop(&mut self) {
        let Some(t) = self.ticket else { return };
        let mut g = self.rep.lock();
        if g.space_head.map(|h| h.0) == Some(t) {
            g.space_head = None;
            drop(g);
            self.rep.space.notify_waiters();
        }
    }
}

/// One try of [`Replication::begin`] to issue a record.
enum Attempt {
    /// The sequence (`None`: writes are closed).
    Issued(Option<(u64, bool)>),
    /// The journal is full; the connected peer drains it. With the ticket this attempt took
    /// as the first writer in line for space (see `Inner::space_head`), if it took one.
    Full(Option<u64>),
    /// A resync or verify chunk is reading the record's range (see `Inner::read_hold`).
    Held,
}

pub struct Inner {
    /// Last sequence number issued by this node as primary.
    pub issued: u64,
    /// Resync records sent but not yet durable on the peer: their bits are cleared only when
    /// it made them durable, so a cut or crash mid-resync never loses a region.
    pub resync_inflight: std::collections::VecDeque<(u64, u64, u64)>,
    /// The region a resync or verify chunk is reading from this disk (off the runtime's
    /// thread): no write to it takes a sequence until the chunk's record has one (see
    /// [`Replication::hold_and_read`]), so the record carries (or the peer hashes) the data as
    /// of its place in the stream. At most one: a resync or verify sends one chunk at a time,
    /// and the two never overlap (verify starts on a connected link, after any resync).
    pub read_hold: Option<(u64, u64)>,
    /// Ranges of records whose journal space was reused after the peer applied them but
    /// before it made them durable: if the link drops now they go to the bitmap, because a
    /// crash of the peer could still lose them. Pruned by durable acks; bounded.
    pub undurable: std::collections::VecDeque<(u64, u64, u64)>,
    pub ring: Ring,
    pub ranges: Ranges,
    pub bitmap: Bitmap,
    /// Bitmap changed since it was last written to disk.
    pub bitmap_dirty: bool,
    /// The journal lost records (overflow): only a bitmap resync can bring the peer back.
    pub overflowed: bool,
    /// Journal bytes (logical position) written to the metadata area.
    pub disk_pos: u64,
    /// How many times `disk_pos` was moved back (see [`Inner::keep_journal_from`]): a
    /// persist that read the ring before does not move it forward over the records it did
    /// not write.
    pub disk_rewinds: u64,
    /// Highest sequence this node has applied from the peer (as secondary).
    pub applied: u64,
    /// The term of the record at `applied` (0: none, or not known).
    pub applied_term: u64,
    /// The term this node issues its records under ([`Msg::term`]): drawn at start and at
    /// every promotion, so that no two records of one pair share a sequence and a term.
    pub term: u64,
    /// Journal bytes held back from application writes for a resync chunk that is below its
    /// rate floor (`resync-rate-min`); 0: none.
    pub reserve: u64,
    /// The write first in line for journal space, (ticket, bytes it needs): later writes
    /// leave it that much, so that a large write is not starved by small ones taking each
    /// bit of space the peer frees (it would wait out `SPACE_WAIT` and overflow the journal:
    /// a dropped link and a bitmap resync under nothing worse than steady load).
    pub space_head: Option<(u64, u64)>,
    /// Tickets for `space_head`.
    pub space_tickets: u64,
    /// A checkpoint record in the stream after everything the bitmap records: once the peer is
    /// durable through it, the bitmap can be cleared even while new writes keep coming.
    pub clear_at: Option<u64>,
    /// How many times [`Self::set_pinned`] ran: a checksum resync's hashes asked before a
    /// pin may predate a write that failed here but landed on the peer.
    pub pins: u64,
}

/// Writes pages of the bitmap's on-disk image (see [`Bitmap::take_changed`]) into its area
/// of `len` bytes at `area`; nothing past the area.
fn write_bitmap_pages(
    file: &File,
    pages: &[(u64, Vec<u8>)],
    area: u64,
    len: usize,
) -> std::io::Result<()> {
    for (off, bytes) in pages {
        let Some(room) = len.checked_sub(*off as usize) else {
            continue;
        };
        let n = bytes.len().min(room);
        file.write_all_at(&bytes[..n], area + off)?;
    }
    Ok(())
}

impl Inner {
    /// The peer needs the journal's records from `seq` on again (see [`Ring::keep_from`]):
    /// kept, and written to disk again at the next persist. Released records may never have
    /// been written (no flush came while the peer had them), and a persist since skipped
    /// them; the checkpoint that names them again must not be committed with them missing,
    /// or a crash would leave a journal that breaks at its start.
    /// A persist running meanwhile read the ring before: the rewind count tells it not to
    /// move `disk_pos` past what it wrote, whichever of the two positions moved back.
    pub fn keep_journal_from(&mut self, seq: u64) {
        let tail = self.ring.tail();
        self.ring.keep_from(seq);
        if self.ring.tail() < tail || self.disk_pos > self.ring.tail() {
            self.disk_pos = self.disk_pos.min(self.ring.tail());
            self.disk_rewinds += 1;
        }
    }

    /// Sets the range's bits for a reason a resync chunk in flight does not cover (a local
    /// write that failed, a verify difference, a record spilled from `undurable`): a chunk
    /// over the same bits, read before, must not clear them when the peer makes it durable,
    /// so it stops counting for them (its region is resynced again next time).
    fn set_pinned(&mut self, offset: u64, len: u64) {
        self.bitmap.set_range(offset, len);
        self.bitmap_dirty = true;
        self.pins += 1;
        if self.resync_inflight.is_empty() || len == 0 {
            return;
        }
        let gran = self.bitmap.granularity();
        let (first, end) = (offset / gran, (offset + len).div_ceil(gran));
        self.resync_inflight
            .retain(|&(_, s, e)| e.div_ceil(gran) <= first || s / gran >= end);
    }

    /// Marks in the bitmap every retained record past the peer's `durable` mark, and every
    /// record it applied but had not made durable whose journal space was reused: what the
    /// peer may lack after a crash of its own. Returns how many ranges it marked.
    fn cover_undurable(&mut self, durable: u64) -> usize {
        let ranges: Vec<(u64, u64)> = self
            .ring
            .records()
            .filter(|r| r.seq > durable && r.range.1 > r.range.0)
            .map(|r| r.range)
            .chain(
                self.undurable
                    .iter()
                    .filter(|u| u.0 > durable)
                    .map(|&(_, a, b)| (a, b)),
            )
            .collect();
        // Pinned: a resync chunk in flight over them must not clear them.
        for &(a, b) in &ranges {
            self.set_pinned(a, b - a);
        }
        ranges.len()
    }
}

/// Where the journal and bitmap live on disk.
pub struct MetaAreas {
    pub file: Arc<File>,
    pub layout: Layout,
    /// The backing device, when the metadata lives elsewhere: an activity-log write that
    /// lets an extent go cold must follow the local data's own fdatasync (with internal
    /// metadata, that of `file`, synced before the log is written).
    pub data: Option<Arc<File>>,
}

pub struct Replication {
    /// The acknowledgement rule (a `Protocol` as u8: `adjust` changes it while writes run;
    /// a write reads it once, when it waits for the peer).
    protocol: std::sync::atomic::AtomicU8,
    inner: Mutex<Inner>,
    /// New records in the journal (wakes the sender).
    pub appended: Notify,
    /// Journal space freed (wakes appenders).
    space: Notify,
    /// An in-flight range finished (wakes writes that overlap it).
    range_done: Notify,
    acks: watch::Sender<Acks>,
    /// Writes waiting for an ack (see [`PeerWaiters`]). Changed only after `acks`, and read
    /// together with it under this lock, so a waiter never misses the ack that covers it.
    peer_waiters: Mutex<PeerWaiters>,
    pub stats: Stats,
    /// A resync is sending the bitmap's regions: the bitmap must not be cleared wholesale.
    pub resyncing: std::sync::atomic::AtomicBool,
    /// Regions were marked out of sync that the journal never carried (by `verify`, or a
    /// local write that failed after its record left): the bitmap must not be cleared
    /// wholesale, and the next connect resyncs them.
    pub verify_marked: std::sync::atomic::AtomicBool,
    /// The highest sequence the peer has reported durable since this daemon started: a peer
    /// that comes back reporting less lost writes it had made durable (see `stream_start`).
    pub peer_durable_high: AtomicU64,
    /// The first sequence from which the peer's durable marks count at this node's data
    /// generation: 0 when it connected at it; during a journal catch-up or a resync the peer
    /// is still at its own (or the resync's) generation, until the SyncDone record (its
    /// sequence, set when it is issued) makes it adopt this node's.
    pub peer_at_gen_from: AtomicU64,
    /// A sync of this node's disk failed (see `Device::sync_failed`): a write the peer does
    /// not hold is on no good copy, so a lost link releases waiting writes with an error.
    local_sync_failed: std::sync::atomic::AtomicBool,
    /// Client writes are closed (a demotion or `down` is under way, or the node is
    /// secondary): a write not yet given its sequence fails instead (see [`Self::begin`]), so
    /// that the sequence a demotion commits as applied covers every write that will ever
    /// reach this disk as primary.
    writes_closed: std::sync::atomic::AtomicBool,
    /// Writes suspended by fencing (`resource-and-stonith`; DRBD's `suspended:fencing`): set
    /// when the connection this node ran as primary is lost, before any write waiting for the
    /// peer is released; cleared once the peer is fenced, the link is back, or by
    /// `resume-io`. Meanwhile no write is acknowledged without the peer (see [`Self::io_gate`]).
    /// The value names the suspension (`Some(n)`, counting from 1), so that a fence run for
    /// an earlier loss cannot lift a later one.
    io_suspended: watch::Sender<Option<u64>>,
    /// Whether `io_suspended` is `Some`: the write path's check, one load (the watch's
    /// borrow takes a lock).
    io_suspended_now: std::sync::atomic::AtomicBool,
    /// Suspensions so far (the next one's name is one more).
    suspensions: AtomicU64,
    /// The resync's rate floor (`resync-rate-min`, bytes/s; 0: none): a resync chunk that has
    /// waited for journal space longer than the floor allows gets space ahead of application
    /// writes.
    pub resync_floor: AtomicU64,
    /// The checkpoint record last added because the undurable list filled up (u64::MAX while it
    /// is being added): another is asked for only once the peer is durable through it.
    pressure_flush: AtomicU64,
    /// Hot extents (with a version raised at every change), and the version known durable.
    al: Mutex<ActivityLog>,
    al_durable: watch::Sender<u64>,
    al_io: tokio::sync::Mutex<()>,
    /// This primary lost its peer: the first write after that starts a new data generation
    /// (so a link that flaps with no writes does not churn generations).
    new_gen_pending: std::sync::atomic::AtomicBool,
    /// Held while that new generation is persisted: every write that comes meanwhile waits
    /// for it, not only the one that started it.
    gen_gate: tokio::sync::Mutex<()>,
    /// At the loss of the peer: the first sequence the peer had not applied (`u64::MAX`:
    /// none). A released write or flush below it diverges nothing: it is acknowledged
    /// without a new generation.
    unapplied_from: AtomicU64,
    /// The current (or last) connection ran with this node as primary: only the loss of
    /// such a connection is the loss of this primary's peer.
    link_as_primary: std::sync::atomic::AtomicBool,
    areas: MetaAreas,
    meta: Arc<Mutex<MetaStore>>,
    /// Serialises journal disk writes (one writer at a time, in position order), and every
    /// bitmap write.
    disk_lock: tokio::sync::Mutex<()>,
    /// Activity-log writes so far (on disk too): the next one goes to the other slot.
    al_writes: AtomicU64,
    /// The activity log's eviction count (`ActivityLog::evicted`) as of the last log written
    /// with the bitmap: a log written while this differs from the count it encodes takes the
    /// bitmap along, whichever write's eviction it was (see `al_begin`).
    al_evicted_on_disk: AtomicU64,
    /// As secondary: one permit per stream record being applied. Shared by every connection,
    /// so that the writes of a connection that ended (aborted, replaced) are all finished
    /// before the next connection applies anything, or this node serves writes as primary:
    /// an old write landing late would overwrite a newer one.
    pub apply_window: Arc<tokio::sync::Semaphore>,
}

/// Ranges kept for records the peer applied but has not made durable (about 24 MiB of index).
const MAX_UNDURABLE: usize = 1 << 20;

/// Most activity-log extents kept over its capacity while the peer makes their writes
/// durable (a slot of the on-disk log holds 8187; `al-extents` is at most 7900).
const AL_MAX_OVERSHOOT: usize = 256;

/// Stream records a secondary applies at once (bounds its memory and spawned tasks).
pub const APPLY_WINDOW: usize = 128;

/// How long a connected primary waits for journal space before treating the peer as stuck.
const SPACE_WAIT: Duration = Duration::from_secs(30);

impl Replication {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        protocol: Protocol,
        meta: Arc<Mutex<MetaStore>>,
        areas: MetaAreas,
        ring: Ring,
        issued: u64,
        (applied, applied_term): (u64, u64),
        bitmap: Bitmap,
        overflowed: bool,
        al_extents: usize,
        al_writes: u64,
    ) -> Arc<Self> {
        let disk_pos = ring.head();
        Arc::new(Replication {
            protocol: std::sync::atomic::AtomicU8::new(protocol as u8),
            inner: Mutex::new(Inner {
                issued,
                undurable: std::collections::VecDeque::new(),
                resync_inflight: std::collections::VecDeque::new(),
                read_hold: None,
                ring,
                ranges: Ranges::default(),
                bitmap,
                // Recovery may have marked regions (a crashed primary's hot extents, records a
                // crash lost): written at the first persist, before a clean `down` could
                // record that the crash was handled.
                bitmap_dirty: true,
                overflowed,
                disk_pos,
                disk_rewinds: 0,
                applied,
                applied_term,
                term: crate::resource::random_id(),
                reserve: 0,
                space_head: None,
                space_tickets: 0,
                clear_at: None,
                pins: 0,
            }),
            appended: Notify::new(),
            space: Notify::new(),
            range_done: Notify::new(),
            acks: watch::channel(Acks::default()).0,
            peer_waiters: Mutex::new(PeerWaiters::default()),
            stats: Stats::default(),
            resyncing: std::sync::atomic::AtomicBool::new(false),
            verify_marked: std::sync::atomic::AtomicBool::new(false),
            peer_durable_high: AtomicU64::new(0),
            peer_at_gen_from: AtomicU64::new(u64::MAX),
            local_sync_failed: std::sync::atomic::AtomicBool::new(false),
            writes_closed: std::sync::atomic::AtomicBool::new(false),
            io_suspended: watch::Sender::new(None),
            io_suspended_now: std::sync::atomic::AtomicBool::new(false),
            suspensions: AtomicU64::new(0),
            resync_floor: AtomicU64::new(0),
            pressure_flush: AtomicU64::new(0),
            new_gen_pending: std::sync::atomic::AtomicBool::new(false),
            gen_gate: tokio::sync::Mutex::new(()),
            unapplied_from: AtomicU64::new(u64::MAX),
            link_as_primary: std::sync::atomic::AtomicBool::new(false),
            al: Mutex::new(ActivityLog::new(al_extents)),
            al_durable: watch::channel(0).0,
            al_io: tokio::sync::Mutex::new(()),
            areas,
            meta,
            disk_lock: tokio::sync::Mutex::new(()),
            al_writes: AtomicU64::new(al_writes),
            al_evicted_on_disk: AtomicU64::new(0),
            apply_window: Arc::new(tokio::sync::Semaphore::new(APPLY_WINDOW)),
        })
    }

    /// `(applied, applied_term)`: the last record applied here, as the peer would name it.
    pub fn applied_mark(&self) -> (u64, u64) {
        let g = self.lock();
        (g.applied, g.applied_term)
    }

    /// A new term for the records this node issues from now on (a promotion).
    pub fn new_term(&self) {
        self.lock().term = crate::resource::random_id();
    }

    /// Waits until no stream record is being applied on this node (as secondary).
    pub async fn quiesce_applies(&self) {
        // The semaphore is never closed; the permits go back when this returns.
        let _all = self.apply_window.acquire_many(APPLY_WINDOW as u32).await;
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock would be a bug in this module; keep serving with the
        // state as it is rather than cascading the panic into every writer.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn acks(&self) -> Acks {
        *self.acks.borrow()
    }

    pub fn subscribe_acks(&self) -> watch::Receiver<Acks> {
        self.acks.subscribe()
    }

    /// The link came up (`connected`) or went down. `peer_applied`: where the stream resumes
    /// (the peer has everything before); `peer_durable`: how much of that it has made durable
    /// (the rest may be lost if it crashes, so it counts as not durable until it says so).
    pub fn set_connected(&self, connected: bool, peer_applied: u64, peer_durable: u64) {
        self.acks.send_modify(|a| {
            a.connected = connected;
            a.epoch += 1;
            a.confirm_from = 0;
            if connected {
                a.received = peer_applied;
                a.applied = peer_applied;
                a.durable = peer_durable.min(peer_applied);
                a.synced = a.durable;
            }
        });
        self.waiters().wake_all();
        // Writers waiting for space or acks re-check against the new state.
        self.space.notify_waiters();
    }

    /// The stream of this connection starts with a resync at `start` (see
    /// [`Acks::confirm_from`]): the writes that waited for the peer through the reconnect
    /// are answered once it has taken the resync's start, not on the marks the resync
    /// assumes. Called after [`Self::set_connected`], before the writes resume.
    pub fn confirm_resync_start(&self, start: u64) {
        self.acks.send_modify(|a| {
            debug_assert!(a.connected, "a resync's start on a link that is down");
            a.confirm_from = start;
        });
    }

    /// The peer acknowledged: raise the marks, release what it applied.
    ///
    /// Space is released on *applied*, not durable, so the primary runs at the speed of the
    /// peer's writes, not of its disk flushes. Released records stay readable until their space
    /// is reused; one reused before the peer made it durable has its range put in the bitmap.
    /// `synced` only wakes the writes and flushes that wait for the peer's disk (C).
    pub fn on_ack(&self, received: u64, applied: u64, synced: u64, durable: u64) {
        self.peer_durable_high
            .fetch_max(durable, std::sync::atomic::Ordering::SeqCst);
        let mut moved = false;
        self.acks.send_if_modified(|a| {
            let before = *a;
            a.received = a.received.max(received);
            if applied > a.applied {
                a.applied = applied;
                moved = true;
            }
            // Not past what the peer applied, and never below what it committed.
            a.synced = a.synced.max(synced.min(a.applied)).max(durable);
            if durable > a.durable {
                a.durable = durable;
                moved = true;
            }
            *a != before
        });
        {
            let a = *self.acks.borrow();
            self.waiters().wake_covered(&a);
        }
        if moved {
            let mut g = self.lock();
            g.ring.release_through(applied);
            while g.undurable.front().is_some_and(|u| u.0 <= durable) {
                g.undurable.pop_front();
            }
            // A resync region's bits clear once the target made it durable, not merely
            // applied: the bitmap on this disk must still name it if both nodes lose power
            // before the target's next sync (the target syncs every second during a resync).
            let gran = g.bitmap.granularity();
            while let Some(&(seq, start, end)) = g.resync_inflight.front() {
                if seq > durable {
                    break;
                }
                g.resync_inflight.pop_front();
                for bit in start / gran..end.div_ceil(gran) {
                    g.bitmap.clear_bit(bit);
                }
                g.bitmap_dirty = true;
            }
            // Everything the bitmap records is durable on the peer, and the journal carried
            // all of it: the bitmap is no longer needed.
            if !g.overflowed
                && (durable >= g.issued || g.clear_at.is_some_and(|c| durable >= c))
                && g.bitmap.dirty_bits() > 0
                && !self.resyncing.load(std::sync::atomic::Ordering::SeqCst)
                && !self.verify_marked.load(std::sync::atomic::Ordering::SeqCst)
            {
                g.bitmap.clear_all();
                g.bitmap_dirty = true;
                g.clear_at = None;
            }
            drop(g);
            self.space.notify_waiters();
        }
    }

    /// The link went down: every retained record the peer has not made durable may be missing
    /// on it after a crash of the peer; the bitmap now covers them, so a later reconnect that
    /// cannot replay the journal still knows what to resync.
    pub fn on_disconnect(&self) {
        let durable = self.acks().durable;
        let mut g = self.lock();
        // Down from here for every record issued after this (see `begin`); the epoch moves
        // and the waiters wake in `set_connected`, which follows.
        self.acks
            .send_if_modified(|a| std::mem::replace(&mut a.connected, false));
        let inner = &mut *g;
        // Unapplied resync chunks keep their bits (never cleared); forget the tracking.
        inner.resync_inflight.clear();
        inner.reserve = 0;
        inner.clear_at = None;
        self.resyncing
            .store(false, std::sync::atomic::Ordering::SeqCst);
        inner.cover_undurable(durable);
        inner.undurable.clear();
    }

    /// Marks in the bitmap (in memory) every write the peer has not made durable: see
    /// [`Inner::cover_undurable`]. Returns how many ranges it marked.
    pub fn cover_undurable(&self) -> usize {
        let durable = self.acks().durable;
        self.lock().cover_undurable(durable)
    }

    /// Journals a record and returns its sequence number; for writes, also waits until no
    /// earlier overlapping write is in flight. Call [`Self::done`] after the local I/O.
    ///
    /// Fails only for a write whose new generation or activity-log update could not be made
    /// durable.
    pub async fn begin(&self, rec: Record<'_>) -> std::io::Result<u64> {
        let range = rec.range();
        let closed =
            || range.is_some() && self.writes_closed.load(std::sync::atomic::Ordering::SeqCst);
        if closed() {
            return Err(writes_closed_error());
        }
        // Suspended by fencing: no client write starts until the peer is fenced or back
        // (this node's own records, which answer no client, are not held).
        if range.is_some() {
            self.io_gate().await?;
        }
        // Any record issued while the peer is away, a flush too, takes a sequence number the
        // peer never sees: if the peer is then promoted, its own records reuse those numbers,
        // and only a new generation here stops a later connect from taking this node's
        // applied mark as a point in the peer's stream.
        self.diverge_generation().await?;
        if let Some((a, b)) = range {
            if let Err(e) = self.al_begin(a, b - a).await {
                // No write happens: the extent is not busy on its account.
                self.al_end(a, b - a, 0);
                return Err(e);
            }
        }
        let (msg, payload): (Msg, &[u8]) = match rec {
            Record::Write {
                offset,
                data,
                fua,
                crc,
            } => (
                Msg::Write {
                    seq: 0,
                    term: 0,
                    offset,
                    len: data.len() as u32,
                    crc: crc.unwrap_or_else(|| crc32c::crc32c(data)),
                    fua,
                },
                data,
            ),
            Record::Zero { offset, len, trim } => (
                Msg::Zero {
                    seq: 0,
                    term: 0,
                    offset,
                    len,
                    trim,
                },
                &[],
            ),
            Record::Flush => (Msg::Flush { seq: 0, term: 0 }, &[]),
            Record::Checkpoint => (Msg::Checkpoint { seq: 0, term: 0 }, &[]),
            Record::SyncDone { gen } => (
                Msg::SyncDone {
                    seq: 0,
                    term: 0,
                    gen,
                },
                &[],
            ),
        };
        let deadline = tokio::time::Instant::now() + SPACE_WAIT;
        // One attempt to issue the record; `mine`: the ticket it holds as the first writer in
        // line for space, if it does.
        let attempt = |mine: Option<u64>| -> Attempt {
            // `Full`: the journal is full and the connected peer is draining it; wait.
            // `Held`: a resync or verify chunk is reading the range; wait for its record. With the
            // sequence: whether the list of records the peer has not made durable is half
            // full. `Issued(None)`: writes were closed meanwhile (checked under the lock the
            // sequence is taken under, which `close_writes` takes too).
            let issued: Attempt = {
                let mut g = self.lock();
                if closed() {
                    return Attempt::Issued(None);
                }
                if let (Some(r), Some(h)) = (range, g.read_hold) {
                    if r.0 < h.1 && h.0 < r.1 {
                        return Attempt::Held;
                    }
                }
                // Read under the lock `on_disconnect` marks the undurable records under (and
                // clears `connected` under): a record is either in that list when it runs, or
                // sees the link down and goes to the bitmap itself. Read before, a record
                // appended just after the disconnect would be in neither.
                let (connected, durable) = {
                    let a = self.acks.borrow();
                    (a.connected, a.durable)
                };
                let seq = g.issued + 1;
                let msg = with_seq(&msg, seq, g.term);
                let inner = &mut *g;
                let head_first = match inner.space_head {
                    Some((t, need)) if connected && Some(t) != mine => {
                        inner.ring.cap() - inner.ring.used() < need + payload.len() as u64 + 128
                    }
                    _ => false,
                };
                let r = if inner.overflowed {
                    Err(AppendError::TooBig)
                } else if head_first {
                    // The first writer in line for space gets it first.
                    Err(AppendError::Full {
                        need: payload.len() as u64,
                    })
                } else if connected
                    && inner.reserve > 0
                    && inner.ring.cap() - inner.ring.used()
                        < inner.reserve + payload.len() as u64 + 128
                {
                    // A resync chunk below its rate floor is waiting for this space.
                    Err(AppendError::Full {
                        need: inner.reserve + payload.len() as u64,
                    })
                } else {
                    let undurable = &mut inner.undurable;
                    let r = journal::append_msg(&mut inner.ring, &msg, payload, |e| {
                        if e.seq > durable && e.range.1 > e.range.0 {
                            undurable.push_back((e.seq, e.range.0, e.range.1));
                        }
                    });
                    // Bounded: past the limit the oldest go to the bitmap right away.
                    while inner.undurable.len() > MAX_UNDURABLE {
                        if let Some((_, a, b)) = inner.undurable.pop_front() {
                            inner.set_pinned(a, b - a);
                            // Not behind the pending clear point: keep these bits.
                            inner.clear_at = None;
                        }
                    }
                    r
                };
                let wait = matches!(r, Err(AppendError::Full { .. }))
                    && connected
                    && tokio::time::Instant::now() < deadline;
                if wait {
                    let need = match r {
                        Err(AppendError::Full { need }) => need,
                        _ => 0,
                    };
                    if g.space_head.is_none() && range.is_some() {
                        g.space_tickets += 1;
                        let t = g.space_tickets;
                        g.space_head = Some((t, need));
                        Attempt::Full(Some(t))
                    } else {
                        Attempt::Full(None)
                    }
                } else {
                    if mine.is_some() && g.space_head.map(|h| h.0) == mine {
                        // Next in line, whoever it is, may go.
                        g.space_head = None;
                        self.space.notify_waiters();
                    }
                    if let Err(e) = r {
                        if !g.overflowed {
                            tracing::warn!(
                                "journal cannot take seq {seq} ({e}): the peer will need a resync of the dirty bitmap"
                            );
                            g.overflowed = true;
                            // The records dropped here may not be durable on the peer (not
                            // even sent, when it is stuck): their ranges go to the bitmap.
                            let inner = &mut *g;
                            for r in inner.ring.records().filter(|r| r.seq > durable) {
                                if r.range.1 > r.range.0 {
                                    inner.bitmap.set_range(r.range.0, r.range.1 - r.range.0);
                                }
                            }
                            inner.bitmap_dirty = true;
                            inner.clear_at = None;
                            // A resync chunk in flight no longer clears its bits when the
                            // peer makes it durable: they now also name writes this journal
                            // dropped, which the peer never got (as at a disconnect).
                            inner.resync_inflight.clear();
                            g.ring.clear(seq + 1, 0);
                        }
                    }
                    g.issued = seq;
                    if let Some(r) = range {
                        g.ranges.insert(seq, r);
                        // While the peer is away (or the journal is lost), the bitmap records
                        // what it lacks; the journal, when it still holds the record, is the
                        // faster way back.
                        // (A bit already set changes nothing on disk: no bitmap write for it.)
                        if (!connected || g.overflowed) && g.bitmap.set_range(r.0, r.1 - r.0) {
                            g.bitmap_dirty = true;
                        }
                    }
                    Attempt::Issued(Some((seq, g.undurable.len() >= MAX_UNDURABLE / 2)))
                }
            };
            issued
        };
        // The common case first, with no waiter registered; then, while waiting for space or
        // a resync or verify chunk's read, waiters registered before each re-check so that a release
        // in between is not missed.
        let issued = match attempt(None) {
            Attempt::Issued(issued) => issued,
            first @ (Attempt::Full(_) | Attempt::Held) => {
                // First in line for space: given up however this ends (the client gone
                // meanwhile drops this future).
                let mut head = HeadOfLine {
                    rep: self,
                    ticket: None,
                };
                if let Attempt::Full(Some(t)) = first {
                    head.ticket = Some(t);
                }
                loop {
                    let space = self.space.notified();
                    tokio::pin!(space);
                    space.as_mut().enable();
                    let done = self.range_done.notified();
                    tokio::pin!(done);
                    done.as_mut().enable();
                    match attempt(head.ticket) {
                        Attempt::Issued(issued) => break issued,
                        // Back-pressure: the peer is connected and draining the journal.
                        Attempt::Full(t) => {
                            if t.is_some() {
                                head.ticket = t;
                            }
                            let _ = tokio::time::timeout_at(deadline, space).await;
                        }
                        // One disk read long; `close_writes` wakes it too (through `space`).
                        Attempt::Held => {
                            tokio::select! {
                                _ = done => {}
                                _ = space => {}
                            }
                        }
                    }
                }
            }
        };
        let Some((seq, pressed)) = issued else {
            if let Some((a, b)) = range {
                // No write happens: the extent is not busy on its account.
                self.al_end(a, b - a, 0);
            }
            return Err(writes_closed_error());
        };
        self.appended.notify_one();
        if pressed && range.is_some() {
            // Half full: a checkpoint in the stream moves the peer's durable mark on before the
            // list spills into the bitmap (which `status` would show as out of sync).
            self.ask_durable().await;
        }
        if let Some(r) = range {
            // Registered only when blocked (rare), before each re-check.
            while self.lock().ranges.blocked(seq, r) {
                let n = self.range_done.notified();
                tokio::pin!(n);
                n.as_mut().enable();
                if !self.lock().ranges.blocked(seq, r) {
                    break;
                }
                n.await;
            }
        }
        Ok(seq)
    }

    /// Before an admin's `disconnect` on the primary: a checkpoint in the stream, and a wait (at
    /// most `within`) until the peer has made everything before it durable. Without it the
    /// peer's last writes count as possibly lost (see `peer_lost`), the next write starts a
    /// new generation, and a failover meant as planned becomes a split brain. Returns whether
    /// the peer got there.
    pub async fn settle_peer(&self, within: Duration) -> bool {
        // Issued only while connected, checked under the lock that `on_disconnect` clears
        // `connected` under (through `begin`, a flush issued just after the link dropped
        // would start a new generation for nothing), and never waiting for journal space.
        let seq = {
            let mut g = self.lock();
            if !self.acks.borrow().connected {
                return false;
            }
            let seq = g.issued + 1;
            let msg = Msg::Checkpoint { seq, term: g.term };
            if self.append_locked(&mut g, &msg, &[]).is_err() {
                return false;
            }
            g.issued = seq;
            seq
        };
        self.appended.notify_one();
        let mut rx = self.acks.subscribe();
        let reached = async {
            loop {
                {
                    let a = *rx.borrow_and_update();
                    if a.durable >= seq {
                        return true;
                    }
                    if !a.connected {
                        return false;
                    }
                }
                if rx.changed().await.is_err() {
                    return false;
                }
            }
        };
        tokio::time::timeout(within, reached).await.unwrap_or(false)
    }

    /// Puts a checkpoint in the stream so that the peer's durable mark moves on, unless one
    /// asked for earlier is not durable yet (one at a time). Not a flush: no client ordered
    /// anything at this point, so the peer keeps applying while it syncs (a barrier here held
    /// the whole stream, and under C every client write, for as long as the peer's disk took
    /// to write back everything since its last sync: seen as 0.7 s stalls every few seconds
    /// under sustained writes).
    async fn ask_durable(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        let a = self.acks();
        if !a.connected || a.durable < self.pressure_flush.load(SeqCst) {
            return;
        }
        // Marked first: the checkpoint's own `begin` must not ask again.
        self.pressure_flush.store(u64::MAX, SeqCst);
        // A checkpoint has no range: no activity-log update that could fail.
        let Ok(seq) = Box::pin(self.begin(Record::Checkpoint)).await else {
            // Asked again by the next write under pressure.
            self.pressure_flush.store(0, SeqCst);
            return;
        };
        self.pressure_flush.store(seq, SeqCst);
    }

    /// Through which sequence the peer's copy is durable, for the activity log: everything
    /// when the peer is away (the bitmap then records every write it lacks, and is written
    /// with the log).
    fn al_durable_mark(&self) -> u64 {
        let a = self.acks();
        if a.connected {
            a.durable
        } else {
            u64::MAX
        }
    }

    /// Marks the extents of a write hot; returns once the activity log that says so is durable.
    ///
    /// An idle extent goes cold only once the peer made its last write durable; until then the
    /// log runs over its capacity and a checkpoint in the stream is asked for. Past half the
    /// capacity again, the write waits for the peer (bounded: the log fits its area).
    ///
    /// Fails when the log cannot be made durable: the write must not go ahead, since after a
    /// crash nothing would say its extent may differ from the peer's.
    async fn al_begin(&self, offset: u64, len: u64) -> std::io::Result<()> {
        // The version is taken in the same lock section as the change: a write that finds its
        // extent hot waits for the log that named it even while that log's writer is still
        // waiting below for the peer.
        let (version, held) = {
            let durable = self.al_durable_mark();
            let mut al = self.al.lock().unwrap_or_else(|p| p.into_inner());
            let needed = al.begin(offset, len, durable);
            (needed, al.held_for_peer(durable) > 0)
        };
        if held {
            self.ask_durable().await;
            let mut rx = self.acks.subscribe();
            loop {
                let too_far = {
                    let al = self.al.lock().unwrap_or_else(|p| p.into_inner());
                    let durable = self.al_durable_mark();
                    let limit = (al.capacity() / 2).clamp(8, AL_MAX_OVERSHOOT);
                    al.overshoot() > limit && al.held_for_peer(durable) > 0
                };
                if !too_far {
                    break;
                }
                // A checkpoint is on its way (asked above, or by an earlier write): wait for the
                // peer's durable mark, or for the link to drop (then the bitmap covers it).
                let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
                self.ask_durable().await;
                let durable = self.al_durable_mark();
                let mut al = self.al.lock().unwrap_or_else(|p| p.into_inner());
                // Shorter: written with the next log that some write needs.
                al.trim(durable);
            }
        }
        self.al_write(version).await
    }

    /// One cooling round of the activity log (see `ActivityLog::cool`), every few seconds:
    /// the extents that went cold are written out at once (behind the bitmap when the peer
    /// is away, as any eviction), so that a crash after a quiet spell resyncs only what was
    /// written since, not every extent written since `up`.
    /// `primary`: this node is primary, so it may ask for a checkpoint in its stream.
    pub async fn cool_activity_log(&self, primary: bool) -> std::io::Result<()> {
        let (cooled, waiting) = {
            let durable = self.al_durable_mark();
            let mut al = self.al.lock().unwrap_or_else(|p| p.into_inner());
            let cooled = al.cool(durable).then(|| al.version());
            (cooled, al.idle_not_durable(durable) > 0)
        };
        // Extents kept only for the peer's durable mark, which a quiet client would move
        // only at the peer's next periodic sync: a checkpoint in the stream lets them go next
        // round.
        if waiting && primary {
            self.ask_durable().await;
        }
        match cooled {
            Some(version) => self.al_write(version).await,
            None => Ok(()),
        }
    }

    /// Returns once a log of at least `version` is durable, writing the newest one if no
    /// other write did.
    async fn al_write(&self, version: u64) -> std::io::Result<()> {
        if *self.al_durable.borrow() >= version {
            return Ok(());
        }
        let _io = self.al_io.lock().await;
        if *self.al_durable.borrow() >= version {
            return Ok(());
        }
        // Write the newest log (it includes every change up to now), to the slot the last
        // write did not use.
        let write_no = self.al_writes.load(std::sync::atomic::Ordering::SeqCst) + 1;
        let (slot_off, slot_len) = ActivityLog::slot(write_no, self.areas.layout.al_len);
        let (bytes, version, evictions) = {
            let al = self.al.lock().unwrap_or_else(|p| p.into_inner());
            (al.encode(slot_len, write_no), al.version(), al.evicted)
        };
        // Whether this log drops an extent that no log written with the bitmap dropped: it may
        // be another write's eviction (that write then finds its version durable and returns
        // at once), so this is decided here, from what this log encodes, not per write. An
        // eviction whose log write failed is still pending here too.
        let evicted = evictions
            != self
                .al_evicted_on_disk
                .load(std::sync::atomic::Ordering::SeqCst);
        // An extent that went cold while the peer was away is covered by the bitmap only: it
        // goes to disk with the log, never after it. The journal writer writes the bitmap
        // too: one at a time, each copy taken under the lock it is written under, so an older
        // copy never lands after a newer one.
        let _disk = if evicted {
            Some(self.disk_lock.lock().await)
        } else {
            None
        };
        // Only the pages changed since the last write (none when nothing changed): the pages
        // written before are on disk, each write ordered by the disk lock.
        let bitmap = evicted.then(|| {
            let mut g = self.lock();
            std::mem::replace(&mut g.bitmap_dirty, false).then(|| g.bitmap.take_changed())
        });
        let bitmap = bitmap.flatten();
        let file = self.areas.file.clone();
        // The data of a dropped extent is synced before the log that drops it is written:
        // the backing device's own file, or (internal metadata) the one file, since the log's
        // own sync after its write makes both durable together but not in order (a disk with
        // a volatile cache may keep the new log and lose the data).
        let data = evicted.then(|| self.areas.data.clone().unwrap_or_else(|| file.clone()));
        let off = self.areas.layout.al_offset + slot_off;
        let (bm_off, bm_len) = (
            self.areas.layout.bitmap_offset,
            self.areas.layout.bitmap_len as usize,
        );
        let r = tokio::task::spawn_blocking(move || {
            // A cold extent is one both nodes hold the same: this node's part of that must be
            // on disk before the log stops naming the extent.
            if let Some(d) = &data {
                d.sync_data()?;
            }
            if let Some(pages) = &bitmap {
                write_bitmap_pages(&file, pages, bm_off, bm_len)?;
                // Synced on its own: a disk with a volatile cache may otherwise keep the new
                // log and lose the bitmap, and the dropped extent would be in neither.
                // (With internal metadata the data's sync above already covered what came
                // before; this one covers the pages.)
                file.sync_data()?;
            }
            file.write_all_at(&bytes, off)?;
            file.sync_data()
        })
        .await;
        let e = match r {
            Ok(Ok(())) => {
                self.al_writes
                    .store(write_no, std::sync::atomic::Ordering::SeqCst);
                if evicted {
                    self.al_evicted_on_disk
                        .store(evictions, std::sync::atomic::Ordering::SeqCst);
                }
                self.al_durable.send_if_modified(|v| {
                    let changed = *v < version;
                    *v = (*v).max(version);
                    changed
                });
                return Ok(());
            }
            Ok(Err(e)) => e,
            Err(e) => std::io::Error::other(e),
        };
        tracing::error!("activity log write failed: {e}; the write that needed it fails");
        if evicted {
            let mut g = self.lock();
            g.bitmap.rewrite_all();
            g.bitmap_dirty = true;
        }
        Err(e)
    }

    /// The write `seq` to the range is finished as far as the protocol goes.
    pub fn al_end(&self, offset: u64, len: u64, seq: u64) {
        let mut al = self.al.lock().unwrap_or_else(|p| p.into_inner());
        al.end(offset, len, seq);
    }

    /// Before the first write that makes this primary's data diverge from its lost peer's,
    /// persists a new generation, so that no write is acknowledged under the old one (which
    /// would hide a later split brain). Writes that come while the persist runs wait for it.
    /// Not persisted: the write fails, and (unless the peer came back meanwhile) the next one
    /// tries again.
    pub async fn diverge_generation(&self) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        // The common case, connected or already diverged: one atomic load on the write path.
        if !self.new_gen_pending.load(SeqCst) {
            return Ok(());
        }
        let _gate = self.gen_gate.lock().await;
        // Persisted by another write while this one waited, or the peer is back.
        if !self.new_gen_pending.load(SeqCst) {
            return Ok(());
        }
        // Cleared only once persisted: a failure leaves it for the next write.
        self.start_new_generation().await?;
        self.new_gen_pending.store(false, SeqCst);
        Ok(())
    }

    /// Returns once no new generation is being persisted (one that started earlier is on
    /// disk): a connection compares the generation it announced with this.
    pub async fn generation_settled(&self) {
        drop(self.gen_gate.lock().await);
    }

    /// Persists a new current generation (the bitmap counts from the old one).
    async fn start_new_generation(&self) -> std::io::Result<()> {
        let meta = self.meta.clone();
        let id = crate::resource::random_id();
        let r = tokio::task::spawn_blocking(move || {
            MetaStore::update(&meta, |sb| {
                sb.new_generation_as_primary(id);
                Ok::<(), crate::meta::MetaError>(())
            })
        })
        .await;
        let e = match r {
            Ok(Ok(())) => {
                tracing::info!("peer away: new data generation {id:016X}");
                return Ok(());
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::error!(
            "persisting the new generation failed ({e}): the write fails, the next one tries again"
        );
        Err(std::io::Error::other(e))
    }

    /// The local I/O of `seq` finished.
    pub fn done(&self, seq: u64) {
        self.lock().ranges.remove(seq);
        self.range_done.notify_waiters();
    }

    /// Closes (or reopens) client writes: see `writes_closed`. Under the lock sequences are
    /// taken under, so no write takes one after this returns.
    pub fn close_writes(&self, closed: bool) {
        {
            let _g = self.lock();
            self.writes_closed
                .store(closed, std::sync::atomic::Ordering::SeqCst);
        }
        // A write waiting for journal space fails now rather than at its deadline.
        self.space.notify_waiters();
    }

    /// Suspends writes (see `io_suspended`). Call before the waiting writes are released.
    /// Returns the suspension's name, for [`Self::resume_io_of`]; one already in force is
    /// kept (and named).
    pub fn suspend_io(&self) -> u64 {
        let mut name = 0;
        self.io_suspended.send_if_modified(|s| match *s {
            Some(n) => {
                name = n;
                false
            }
            None => {
                name = self
                    .suspensions
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                    + 1;
                *s = Some(name);
                // Under the watch's lock, as every change of it.
                self.io_suspended_now
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                true
            }
        });
        crate::bell::ring();
        name
    }

    /// Resumes suspended writes, whatever suspended them; returns whether they were.
    pub fn resume_io(&self) -> bool {
        let mut was = false;
        self.io_suspended.send_if_modified(|s| {
            was = s.take().is_some();
            self.io_suspended_now
                .store(false, std::sync::atomic::Ordering::SeqCst);
            was
        });
        crate::bell::ring();
        was
    }

    /// Resumes writes if the suspension in force is `name` (a fence run answers for the loss
    /// it was started for, not for a later one); returns whether it did.
    pub fn resume_io_of(&self, name: u64) -> bool {
        let resumed = self.io_suspended.send_if_modified(|s| {
            if *s == Some(name) {
                *s = None;
                self.io_suspended_now
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                true
            } else {
                false
            }
        });
        crate::bell::ring();
        resumed
    }

    /// The suspension in force, if any.
    pub fn io_suspension(&self) -> Option<u64> {
        *self.io_suspended.borrow()
    }

    pub fn io_suspended(&self) -> bool {
        self.io_suspended.borrow().is_some()
    }

    /// Waits while writes are suspended by fencing; fails once writes are closed (a `down` or
    /// a demotion cuts the wait short: the write was not acknowledged, so failing it loses
    /// nothing).
    pub async fn io_gate(&self) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        if !self.io_suspended_now.load(SeqCst) {
            return Ok(());
        }
        let mut rx = self.io_suspended.subscribe();
        loop {
            let closed = self.space.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.writes_closed.load(SeqCst) {
                return Err(writes_closed_error());
            }
            if rx.borrow_and_update().is_none() {
                return Ok(());
            }
            tokio::select! {
                _ = rx.changed() => {}
                _ = closed => {}
            }
        }
    }

    /// Waits (at most `within`) until no write that took a sequence is still writing this
    /// disk; returns how many still are.
    pub async fn wait_local_writes(&self, within: Duration) -> usize {
        let end = tokio::time::Instant::now() + within;
        loop {
            let n = self.lock().ranges.len();
            if n == 0 || tokio::time::Instant::now() >= end {
                return n;
            }
            let done = self.range_done.notified();
            let _ = tokio::time::timeout(Duration::from_millis(50), done).await;
        }
    }

    /// The acknowledgement rule writes wait by now.
    pub fn protocol(&self) -> Protocol {
        match self.protocol.load(std::sync::atomic::Ordering::Relaxed) {
            x if x == Protocol::A as u8 => Protocol::A,
            x if x == Protocol::B as u8 => Protocol::B,
            _ => Protocol::C,
        }
    }

    /// From the next write that waits for the peer on (`adjust`).
    pub fn set_protocol(&self, p: Protocol) {
        self.protocol
            .store(p as u8, std::sync::atomic::Ordering::Relaxed);
    }

    /// A sync of this node's disk failed (see [`Self::wait_peer`]).
    pub fn set_local_sync_failed(&self) {
        self.local_sync_failed
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Waits until the protocol lets `seq` be acknowledged. `barrier`: a flush (or FUA),
    /// which under C needs everything through it synced on the peer's disk, not only written.
    ///
    /// A peer that goes away before it has the write releases it: the write is in the journal
    /// and the bitmap, and is acknowledged under a new generation (this node's data now
    /// diverges from the peer's). Fails only when that generation cannot be persisted.
    pub async fn wait_peer(&self, seq: u64, barrier: bool) -> std::io::Result<()> {
        let mark = match (self.protocol(), barrier) {
            // Acknowledged without the peer, but not while a lost peer's new generation is
            // still being persisted (a write in flight at the drop).
            (Protocol::A, _) if self.acks.borrow().connected => return Ok(()),
            (Protocol::A, _) => {
                // Suspended by fencing: released without the peer only once it is fenced;
                // a peer that came back meanwhile has the record in its new stream.
                self.io_gate().await?;
                if self.acks.borrow().connected {
                    return Ok(());
                }
                self.may_release_without_peer()?;
                return self.diverge_if_lacking(seq).await;
            }
            (Protocol::B, _) => Mark::Received,
            (Protocol::C, false) => Mark::Applied,
            // On the peer's disk: its applied mark, committed one metadata sync later, is
            // what this node forgets records by (see `on_ack`), not what its client needs.
            (Protocol::C, true) => Mark::Synced,
        };
        loop {
            loop {
                let woken = {
                    let mut w = self.waiters();
                    let a = *self.acks.borrow();
                    if a.mark(mark) >= seq {
                        return Ok(());
                    }
                    if !a.connected {
                        break;
                    }
                    let (wake, woken) = tokio::sync::oneshot::channel();
                    w.queue(mark).push(PeerWaiter { seq, wake });
                    woken
                };
                // Woken by an ack that covers it, or by a disconnect or reconnect (all waiters
                // are): a peer that came back has the write in its new stream; wait again.
                let _ = woken.await;
            }
            // Suspended by fencing: held until the peer is fenced, or is back (then the write
            // is in its new stream and waits for its ack as any other).
            self.io_gate().await?;
            if self.acks.borrow().connected {
                continue;
            }
            self.may_release_without_peer()?;
            self.diverge_if_lacking(seq).await?;
            // Nothing was persisted if the peer came back meanwhile (it cleared the flag):
            // then the write is in its new stream, and waits for it like any other.
            let a = *self.acks.borrow();
            if !a.connected || a.mark(mark) >= seq {
                return Ok(());
            }
        }
    }

    /// Whether a write may be acknowledged without the peer (gone, under any protocol).
    fn may_release_without_peer(&self) -> std::io::Result<()> {
        // Not while a demotion or `down` is under way (it closed the writes): the node is
        // about to stop being primary, the peer may be promoted next without this write, and
        // nothing fences it (a `down` or a demotion runs no fence-peer). The data is in the
        // bitmap and the new generation all the same.
        if self.writes_closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(writes_closed_error());
        }
        // Not on a disk that failed a sync, which cannot stand in for the peer: the data may
        // be lost here, and the peer never got it.
        if self
            .local_sync_failed
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(std::io::Error::other(
                "the peer is gone and this disk failed a sync: the write is on no good copy",
            ));
        }
        Ok(())
    }

    /// With the peer away: the new generation that every record issued so far may need (see
    /// [`Self::diverge_if_lacking`]) is on disk. A flush waits for it.
    pub async fn settle_divergence(&self) -> std::io::Result<()> {
        let issued = self.lock().issued;
        self.diverge_if_lacking(issued).await
    }

    /// A record `seq` released without the peer: under a new generation if the peer had
    /// not applied it or an earlier record when the link was lost (see [`Self::begin`] for
    /// why a flush counts too).
    async fn diverge_if_lacking(&self, seq: u64) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        if seq >= self.unapplied_from.load(SeqCst) {
            self.diverge_generation().await
        } else {
            Ok(())
        }
    }

    /// The first record after `mark` this node issued, if any; the journal having lost
    /// records counts as right after `mark`.
    pub fn issued_after(&self, mark: u64) -> Option<u64> {
        let g = self.lock();
        if g.overflowed {
            return Some(mark.saturating_add(1));
        }
        (g.issued > mark).then(|| mark.saturating_add(1))
    }

    /// The connection this node ran as primary is lost (call before the marks are reset):
    /// every record after the peer's durable mark, issued already or from now on, is one
    /// the peer may lack, and the first one acknowledged (or released from waiting for the
    /// peer) starts a new generation first. Returns whether such records exist already
    /// (then the caller starts the generation at once).
    ///
    /// Durable, not applied: a peer that applied records but lost power before syncing them
    /// comes back without them, at the generation it had. If this node stayed at that
    /// generation too, the two would look in sync with only this node's bitmap knowing
    /// better, and a later promotion of the peer would resync those regions from it,
    /// overwriting writes this node acknowledged and flushed.
    pub fn peer_lost(&self) -> bool {
        let durable = self.acks().durable;
        self.arm_from(durable.saturating_add(1));
        self.issued_after(durable).is_some()
    }

    /// A new primary whose peer is not (or no longer) connected to it as its secondary:
    /// from its next record on, until a connection as primary is established, a new
    /// generation is started before anything is acknowledged.
    pub fn arm_until_connected(&self) {
        let next = self.lock().issued.saturating_add(1);
        self.arm_from(next);
    }

    fn arm_from(&self, from: u64) {
        use std::sync::atomic::Ordering::SeqCst;
        self.unapplied_from.store(from, SeqCst);
        self.new_gen_pending.store(true, SeqCst);
    }

    /// With the peer away: whether this node's data has moved on from it since it was lost
    /// (the new generation that says so is on disk). A record issued now starts no
    /// generation, so a client's flush goes into the journal: the catch-up then carries it
    /// as a barrier, and a target that loses power midway holds a prefix of this node's
    /// flushed history, not later writes without the earlier ones they were flushed after.
    pub fn diverged_while_away(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        !self.acks().connected
            && self.unapplied_from.load(SeqCst) != u64::MAX
            && !self.new_gen_pending.load(SeqCst)
    }

    /// Whether the loss of the peer left a new generation to start that is not on disk yet
    /// (its persist failed, or no record has come since the peer lacks some).
    pub fn divergence_pending(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        let from = self.unapplied_from.load(SeqCst);
        self.new_gen_pending.load(SeqCst)
            && from != u64::MAX
            && self.issued_after(from.saturating_sub(1)).is_some()
    }

    /// A connection starts; `as_primary`: with this node as primary (see
    /// [`Self::link_ran_as_primary`]).
    pub fn set_link_as_primary(&self, as_primary: bool) {
        self.link_as_primary
            .store(as_primary, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the connection being lost ran with this node as primary (a node promoted
    /// while it was the source of a resync between secondaries did not).
    pub fn link_ran_as_primary(&self) -> bool {
        self.link_as_primary
            .load(std::sync::atomic::Ordering::SeqCst)
            && self.acks().connected
    }

    /// A connection was established at the generation this node announced (or this node
    /// is no longer primary): no write has diverged from the peer, so none starts a new
    /// generation.
    pub fn disarm_new_generation(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.new_gen_pending.store(false, SeqCst);
        self.unapplied_from.store(u64::MAX, SeqCst);
    }

    fn waiters(&self) -> MutexGuard<'_, PeerWaiters> {
        self.peer_waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the journal durable: every record the peer has not released is on disk, behind a
    /// checkpoint that a restart walks from. Called at flush points (and by the persister).
    ///
    /// Order matters for crash safety: new records must not overwrite ones the checkpoint on
    /// disk still names, so when they would, the new checkpoint (the oldest unreleased
    /// record) is committed first, then the new records are written and synced; when they
    /// land within one ring of it, both go with one sync. A record's disk position never
    /// changes, so records flushed earlier are already valid behind the new checkpoint, and a
    /// crash at any point leaves a chain that holds every flushed record.
    pub async fn persist(self: &Arc<Self>) -> std::io::Result<()> {
        let _order = self.disk_lock.lock().await;
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.persist_blocking().map(|_| ()))
            .await
            .map_err(std::io::Error::other)?
    }

    /// [`Self::persist`]'s body; tells whether the checkpoint and the records went with one
    /// sync.
    fn persist_blocking(&self) -> std::io::Result<bool> {
        let l = &self.areas.layout;
        let cap = l.journal_len;
        // The checkpoint, the issued mark and the new bytes in one look at the ring: an
        // acknowledgement in between would move the tail past bytes never written, and the
        // committed checkpoint would name records that are not there.
        let (ckpt, issued, overflowed, to, pieces, bitmap, rewinds) = {
            let mut g = self.lock();
            let first = g.ring.first_live_seq().unwrap_or(g.issued + 1);
            // The issued mark committed here must not run ahead of the records on disk before
            // this persist: a restart resumes sequences after it, and a journal that ends
            // before it has lost records.
            let issued = if g.ring.head() <= g.disk_pos.max(g.ring.tail()) {
                g.issued
            } else {
                g.ring
                    .records()
                    .take_while(|r| r.pos + u64::from(r.len) <= g.disk_pos)
                    .last()
                    .map_or(first.saturating_sub(1), |r| r.seq)
            };
            // Regions `verify` marked are in the bitmap but in no journal record: recorded as
            // an overflow, so that after a restart the journal is not trusted to bring the
            // peer up to date and the next connect resyncs the bitmap, marks included.
            let verify = self.verify_marked.load(std::sync::atomic::Ordering::SeqCst);
            // The term of the record before the checkpoint: a restart can still tell whether
            // a peer that applied up to it followed this journal.
            let prev_term = g.ring.term_at(first.saturating_sub(1)).unwrap_or(0);
            let ckpt = (g.ring.tail(), first, prev_term);
            // The unreleased new bytes (two pieces when they wrap), not past one ring from the
            // checkpoint committed below: records appended since (into space released since)
            // would overwrite the oldest ones it names, and a crash before the next commit
            // would find a broken journal. The rest goes next time.
            let from = g.disk_pos.max(g.ring.tail());
            let to = g.ring.head().min(ckpt.0 + cap);
            let mut pieces = Vec::new();
            let mut at = from;
            while at < to {
                let phys = at % cap;
                let n = (to - at).min(cap - phys);
                pieces.push((phys, g.ring.raw(phys, phys + n).to_vec()));
                at += n;
            }
            let bitmap = if g.bitmap_dirty {
                g.bitmap_dirty = false;
                Some(g.bitmap.take_changed()).filter(|p| !p.is_empty())
            } else {
                None
            };
            (
                ckpt,
                issued,
                g.overflowed || verify,
                to,
                pieces,
                bitmap,
                g.disk_rewinds,
            )
        };
        // Also when only the issued mark moves: it is what the peer is told this disk
        // holds (`Msg::Durable`), and an idle primary's last writes count only once in it.
        let (moved, committed_pos, overflow_changes, issued_lags) = {
            let m = self.meta.lock().unwrap_or_else(|p| p.into_inner());
            (
                (m.sb.journal_pos, m.sb.journal_seq, m.sb.journal_prev_term) != ckpt,
                m.sb.journal_pos,
                m.sb.journal_overflowed != overflowed,
                m.sb.issued_seq < issued,
            )
        };
        let commit = moved || overflow_changes || issued_lags;
        // A checkpoint moved back (records kept again for a restarted peer, see
        // `Inner::keep_journal_from`) names records that may not be on disk yet: they are
        // written and synced first. They hold the same bytes the committed chain has there,
        // and lie within one ring of the new checkpoint, so they overwrite nothing it names.
        let rewound = ckpt.0 < committed_pos;
        let write_records = || {
            for (phys, bytes) in &pieces {
                self.areas
                    .file
                    .write_all_at(bytes, l.journal_offset + phys)?;
            }
            Ok::<(), std::io::Error>(())
        };
        let write_pieces = || {
            if !rewound {
                write_records()?;
            }
            if let Some(pages) = &bitmap {
                write_bitmap_pages(
                    &self.areas.file,
                    pages,
                    l.bitmap_offset,
                    l.bitmap_len as usize,
                )?;
            }
            Ok::<(), std::io::Error>(())
        };
        let set_checkpoint = |sb: &mut crate::meta::Superblock| {
            sb.journal_pos = ckpt.0;
            sb.journal_seq = ckpt.1;
            sb.journal_prev_term = ckpt.2;
            sb.issued_seq = sb.issued_seq.max(issued);
            sb.journal_overflowed = overflowed;
            Ok::<(), crate::meta::MetaError>(())
        };
        // One sync for the new checkpoint and the new records together (metadata and
        // journal in one file), when their order cannot matter to a crash: the records land
        // within one ring of the checkpoint already on disk, so they overwrite nothing it
        // names (the new checkpoint only moves past records released, and one that names
        // records not on disk yet is what the two-step order below leaves after a crash
        // between its steps too). Kept to the plain case: no bitmap to write and no change of
        // the overflow mark (the state after an overflow or a resync's start), and not
        // right after the ring was cleared (a checkpoint with no term before it), where the
        // old checkpoint's chain could run on across the cut.
        let together = commit
            && !rewound
            && !pieces.is_empty()
            && to <= committed_pos + cap
            && bitmap.is_none()
            && !overflow_changes
            && !(moved && ckpt.2 == 0);
        let written = if together {
            MetaStore::update_with(&self.meta, set_checkpoint, write_pieces)
                .map_err(std::io::Error::other)
        } else {
            (|| {
                if rewound && !pieces.is_empty() {
                    write_records()?;
                    self.areas.file.sync_data()?;
                }
                if commit {
                    MetaStore::update(&self.meta, set_checkpoint).map_err(std::io::Error::other)?;
                }
                write_pieces()?;
                if !pieces.is_empty() || bitmap.is_some() {
                    self.areas.file.sync_data()?;
                }
                Ok::<(), std::io::Error>(())
            })()
        };
        if let Err(e) = written {
            // Not on disk: the next persist writes the bitmap again, whole.
            if bitmap.is_some() {
                let mut g = self.lock();
                g.bitmap.rewrite_all();
                g.bitmap_dirty = true;
            }
            return Err(e);
        }
        let mut g = self.lock();
        // Unless it was moved back meanwhile, to records this persist did not write.
        if g.disk_rewinds == rewinds {
            g.disk_pos = g.disk_pos.max(to);
        }
        Ok(together)
    }

    /// Whether anything would be written by [`Self::persist`] while the peer is away.
    pub fn needs_persist(&self) -> bool {
        let g = self.lock();
        g.bitmap_dirty || (!self.acks.borrow().connected && g.disk_pos < g.ring.head())
    }

    /// The read of a resync or verify chunk, off the runtime's thread (on a slow disk a 1 MiB
    /// read takes milliseconds, and hashing it as long, which the node's other I/O must not
    /// wait out): `range` is held first, so that writes to it stop taking sequence numbers
    /// (under constant writes to it, waiting for a moment with none in flight could wait for
    /// ever); then the ones that took theirs before finish; then `read` runs on a blocking
    /// thread with the file and `buf`. What it read is the disk as of the next sequence, as
    /// long as the returned hold lives: the caller appends its record under the lock, then
    /// drops the hold. Given back however this ends: an error, or the task dropped mid-read.
    async fn hold_and_read<T: Send + 'static>(
        &self,
        file: &File,
        range: (u64, u64),
        buf: &mut Vec<u8>,
        read: impl FnOnce(&File, &mut Vec<u8>) -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<(ReadHold<'_>, T)> {
        let hold = loop {
            let done = self.range_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            {
                let mut g = self.lock();
                if g.read_hold.is_none() {
                    g.read_hold = Some(range);
                    break ReadHold(self);
                }
            }
            done.await;
        };
        loop {
            let done = self.range_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if !self.lock().ranges.blocked(u64::MAX, range) {
                break;
            }
            done.await;
        }
        let file = file.try_clone()?;
        let mut data = std::mem::take(buf);
        let (data, r) = tokio::task::spawn_blocking(move || {
            let r = read(&file, &mut data);
            (data, r)
        })
        .await
        .map_err(std::io::Error::other)?;
        *buf = data;
        Ok((hold, r?))
    }

    /// Resync: sends the dirty region `[offset, offset+len)` as a stream record carrying the
    /// data as it is on this disk now. The range is held (no write to it takes a sequence),
    /// the writes to it in flight finish, it is read off the runtime's thread (on a slow disk
    /// a 1 MiB read takes milliseconds, which the node's other I/O must not wait out), and the
    /// record takes the next sequence: its data is then what the disk holds at its place in
    /// the stream, a later write to the range is after it, an earlier one is in it. All-zero
    /// regions travel as Zero records. Returns the sequence number issued.
    pub async fn resync_chunk(
        &self,
        file: &File,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> std::io::Result<(u64, bool)> {
        let range = (offset, offset + len);
        let waiting = std::time::Instant::now();
        loop {
            // The scan for zeros and the crc off the thread as well: a MiB each.
            let (hold, (zero, crc)) = self
                .hold_and_read(file, range, buf, move |file, data| {
                    data.resize(len as usize, 0);
                    read_backing(file, data, offset)?;
                    drop_cached(file, offset, len);
                    let zero = is_zero(data);
                    Ok((zero, if zero { 0 } else { crc32c::crc32c(data) }))
                })
                .await?;
            let space = self.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            let appended = {
                let mut g = self.lock();
                debug_assert_eq!(g.read_hold, Some(range), "the chunk's hold moved");
                let (msg, payload) =
                    resync_data_record(g.issued + 1, g.term, offset, buf, zero, crc);
                self.append_resync_locked(&mut g, &msg, payload, (offset, len), waiting)?
            };
            if let Some(seq) = appended {
                drop(hold);
                self.appended.notify_one();
                return Ok((seq, zero));
            }
            // The journal is full: the region is let go while the peer applies some of it
            // (writes to it must not wait on the journal's pace, nor for ever on a stuck
            // peer), and read again once there is room.
            drop(hold);
            if let Err(e) = self.wait_space(space).await {
                self.lock().reserve = 0;
                return Err(e);
            }
        }
    }

    /// Appends a resync record for `(offset, len)` under the caller's lock. Appended: it is
    /// in flight (its bits clear when the peer applies it) and a reservation made for it is
    /// given back; `None`: the journal is full, and a chunk below the rate floor reserves
    /// space ahead of application writes.
    fn append_resync_locked(
        &self,
        g: &mut Inner,
        msg: &Msg,
        payload: &[u8],
        (offset, len): (u64, u64),
        waiting: std::time::Instant,
    ) -> std::io::Result<Option<u64>> {
        let seq = g.issued + 1;
        match self.append_locked(g, msg, payload) {
            Ok(()) => {
                g.issued = seq;
                if std::mem::take(&mut g.reserve) > 0 {
                    // Writes held back for this chunk may go on.
                    self.space.notify_waiters();
                }
                g.resync_inflight.push_back((seq, offset, offset + len));
                Ok(Some(seq))
            }
            Err(AppendError::Full { need }) => {
                if self.below_floor(waiting, len) {
                    // Below the rate floor: hold space back from application writes until
                    // this chunk fits (a record may need padding at the ring's end: twice
                    // its length covers it).
                    g.reserve = need.max(2 * (len + 128));
                }
                Ok(None)
            }
            Err(AppendError::TooBig) => Err(std::io::Error::other(
                "resync chunk larger than the journal",
            )),
            Err(AppendError::Overflowed) => Err(overflowed_error()),
        }
    }

    /// Whether a resync chunk of `len` bytes that has waited for journal space since `since`
    /// is below the rate floor: at the floor rate it would have gone out by now.
    fn below_floor(&self, since: std::time::Instant, len: u64) -> bool {
        let floor = self.resync_floor.load(std::sync::atomic::Ordering::Relaxed);
        floor > 0 && since.elapsed().as_secs_f64() * floor as f64 >= len as f64
    }

    /// Appends a stream record under the lock held by the caller; journal space freed by the
    /// record's own append is accounted as in [`Self::begin`].
    fn append_locked(
        &self,
        inner: &mut Inner,
        msg: &Msg,
        payload: &[u8],
    ) -> Result<(), AppendError> {
        if inner.overflowed {
            // Writes after the overflow issued sequences without records: an append now
            // would leave a gap in the ring.
            return Err(AppendError::Overflowed);
        }
        let durable = self.acks.borrow().durable;
        let undurable = &mut inner.undurable;
        journal::append_msg(&mut inner.ring, msg, payload, |e| {
            if e.seq > durable && e.range.1 > e.range.0 {
                undurable.push_back((e.seq, e.range.0, e.range.1));
            }
        })
        .map(|_| ())
    }

    /// Waits (bounded by the link) for journal space after an append found the ring full.
    async fn wait_space(
        &self,
        space: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
    ) -> std::io::Result<()> {
        if !self.acks.borrow().connected {
            return Err(std::io::Error::other("peer disconnected"));
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), space).await;
        Ok(())
    }

    /// Checksum resync and verify: asks the peer, in stream order, for the hashes of
    /// `[offset, offset+len)` in blocks of `block` bytes. Returns the request's sequence.
    pub async fn hash_request(&self, offset: u64, len: u32, block: u32) -> std::io::Result<u64> {
        loop {
            let space = self.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            let appended = self.append_hash_req(&mut self.lock(), offset, len, block)?;
            if let Some(seq) = appended {
                self.appended.notify_one();
                return Ok(seq);
            }
            self.wait_space(space).await?;
        }
    }

    /// Appends a `HashReq` for `[offset, offset+len)` under the caller's lock: its sequence,
    /// or `None` when the journal has no room for it now.
    fn append_hash_req(
        &self,
        g: &mut Inner,
        offset: u64,
        len: u32,
        block: u32,
    ) -> std::io::Result<Option<u64>> {
        let seq = g.issued + 1;
        let msg = Msg::HashReq {
            seq,
            term: g.term,
            offset,
            len,
            block,
        };
        match self.append_locked(g, &msg, &[]) {
            Ok(()) => {
                g.issued = seq;
                Ok(Some(seq))
            }
            Err(AppendError::Full { .. }) => Ok(None),
            Err(AppendError::TooBig) => Err(std::io::Error::other(
                "hash request larger than the journal",
            )),
            Err(AppendError::Overflowed) => Err(overflowed_error()),
        }
    }

    /// Online verify: reads `[offset, offset+len)` at a point of the stream and hashes it in
    /// blocks of `block` bytes (both off the runtime's thread, see [`Self::hold_and_read`]),
    /// and asks the peer for its hashes at the very same point: a `HashReq` record with the
    /// next sequence. Both sides then hash the same history, whatever writes come after.
    /// Returns the request's sequence and this node's hashes.
    pub async fn verify_chunk(
        &self,
        file: &File,
        offset: u64,
        len: u32,
        block: u32,
        buf: &mut Vec<u8>,
    ) -> std::io::Result<(u64, Vec<[u8; 32]>)> {
        let range = (offset, offset + u64::from(len));
        loop {
            let (hold, hashes) = self
                .hold_and_read(file, range, buf, move |file, data| {
                    data.resize(len as usize, 0);
                    read_from_disk(file, data, offset)?;
                    Ok(block_hashes(data, block as usize))
                })
                .await?;
            let space = self.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            let appended = {
                let mut g = self.lock();
                debug_assert_eq!(g.read_hold, Some(range), "the chunk's hold moved");
                self.append_hash_req(&mut g, offset, len, block)?
            };
            if let Some(seq) = appended {
                drop(hold);
                self.appended.notify_one();
                return Ok((seq, hashes));
            }
            // The journal is full: the region is let go while the peer drains it (writes to
            // it must not wait on a stuck peer), and read again once there is room.
            drop(hold);
            self.wait_space(space).await?;
        }
    }

    /// Checksum resync: the first run of `[offset, offset+len)` whose blocks are all equal to
    /// the peer's hashes, or all different, goes out as one stream record: `Equal` (nothing
    /// to write, the bits clear once the peer applied it) or the data as it is on this disk
    /// now (`Write`, or `Zero` when all zero). The blocks are read and hashed off the
    /// runtime's thread while the range is held (see [`Self::hold_and_read`]), once no
    /// earlier write to the range is in flight, so the decision and the record's place in the
    /// sequence match the data: a later write to the range is after it. Returns the run:
    /// (bytes, equal, zero).
    ///
    /// `pins_asked`: [`Self::pins`] before the hashes were asked. If anything was pinned
    /// since (a local write that failed after the peer applied it, say), the peer's hashes
    /// may predate a write it holds and this disk lacks: nothing counts as equal, the data
    /// goes (rare; the bits would otherwise clear over a difference). Checked again under the
    /// lock the record is appended under: a pin during the read means reading again.
    #[allow(clippy::too_many_arguments)]
    pub async fn resync_csum_chunk(
        &self,
        file: &File,
        offset: u64,
        len: u64,
        block: u64,
        peer: &[[u8; 32]],
        pins_asked: u64,
        buf: &mut Vec<u8>,
    ) -> std::io::Result<(u64, bool, bool)> {
        let range = (offset, offset + len);
        let waiting = std::time::Instant::now();
        let mut stale = self.pins() != pins_asked;
        loop {
            let peer = peer.to_vec();
            let (hold, (run_len, equal, zero, crc)) = self
                .hold_and_read(file, range, buf, move |file, data| {
                    data.resize(len as usize, 0);
                    let (run, equal) = first_run(&peer, |i| {
                        let s = i as u64 * block;
                        let e = (s + block).min(len);
                        let b = &mut data[s as usize..e as usize];
                        read_backing(file, b, offset + s)?;
                        drop_cached(file, offset + s, e - s);
                        let mut h = sha256(b);
                        if stale && h == peer[i] {
                            h[0] ^= 1;
                        }
                        Ok(h)
                    })?;
                    let run_len = (run as u64 * block).min(len);
                    let run_data = &data[..run_len as usize];
                    let zero = !equal && is_zero(run_data);
                    let crc = if equal || zero {
                        0
                    } else {
                        crc32c::crc32c(run_data)
                    };
                    Ok((run_len, equal, zero, crc))
                })
                .await?;
            let space = self.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            let appended = {
                let mut g = self.lock();
                debug_assert_eq!(g.read_hold, Some(range), "the chunk's hold moved");
                if equal && g.pins != pins_asked {
                    // Pinned during the read: these hashes count for nothing.
                    stale = true;
                    drop(g);
                    drop(hold);
                    continue;
                }
                let seq = g.issued + 1;
                let (msg, payload): (Msg, &[u8]) = if equal {
                    (
                        Msg::Equal {
                            seq,
                            term: g.term,
                            offset,
                            len: run_len,
                        },
                        &[],
                    )
                } else {
                    let data = &buf[..run_len as usize];
                    resync_data_record(seq, g.term, offset, data, zero, crc)
                };
                self.append_resync_locked(&mut g, &msg, payload, (offset, run_len), waiting)?
            };
            if appended.is_some() {
                drop(hold);
                self.appended.notify_one();
                return Ok((run_len, equal, zero));
            }
            drop(hold);
            if let Err(e) = self.wait_space(space).await {
                self.lock().reserve = 0;
                return Err(e);
            }
        }
    }

    /// See [`Inner::pins`].
    pub fn pins(&self) -> u64 {
        self.lock().pins
    }

    /// `verify` found `[offset, offset+len)` different on the peer: out of sync until a
    /// resync (the next connect) repairs it.
    pub fn mark_out_of_sync(&self, offset: u64, len: u64) {
        let mut g = self.lock();
        self.verify_marked
            .store(true, std::sync::atomic::Ordering::SeqCst);
        g.set_pinned(offset, len);
    }

    /// Resync chunks sent and not yet durable on the peer.
    pub fn resync_pending(&self) -> usize {
        self.lock().resync_inflight.len()
    }

    /// The next run of dirty regions at or after `from` (bytes), at most `max` bytes long,
    /// clipped to `size`.
    pub fn next_dirty(&self, from: u64, max: u64, size: u64) -> Option<(u64, u64)> {
        let g = self.lock();
        let gran = g.bitmap.granularity();
        let first = g.bitmap.next_set(from / gran)?;
        let mut last = first;
        while (last + 1 - first) * gran < max && g.bitmap.is_set(last + 1) {
            last += 1;
        }
        let start = first * gran;
        let end = ((last + 1) * gran).min(size);
        (start < end).then_some((start, end - start))
    }

    /// A resync starts: marks every region dirty (full sync) or merges the peer's bitmap. The
    /// bitmap now covers everything the journal held for the peer (writes while away were
    /// marked, unapplied ones at disconnect too), so the journal starts afresh and an overflow
    /// is over: from here on every record is journaled and streamed again.
    pub fn start_resync(&self, peer: Option<&Bitmap>, all: bool, size: u64, peer_seen: u64) -> u64 {
        let durable = self.acks().durable;
        let mut g = self.lock();
        if all {
            g.bitmap.set_range(0, size);
        } else if let Some(b) = peer {
            g.bitmap.merge(b);
        }
        let inner = &mut *g;
        for r in inner.ring.records() {
            if r.range.1 > r.range.0 && r.seq > durable {
                inner.bitmap.set_range(r.range.0, r.range.1 - r.range.0);
            }
        }
        for (_, a, b) in inner.undurable.drain(..) {
            inner.bitmap.set_range(a, b - a);
        }
        // The stream restarts above every sequence the peer has seen (a restarted crashed
        // primary may be behind it), so no stale acknowledgement can count for a new record.
        inner.issued = inner.issued.max(peer_seen);
        let next = inner.issued + 1;
        // Under the same lock as the merge: no ack may clear the bitmap from here on.
        self.resyncing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // Regions `verify` marked are in the bitmap: this resync owns them now.
        self.verify_marked
            .store(false, std::sync::atomic::Ordering::SeqCst);
        // The record before the resync's stream names no state the peer can be caught up
        // from: until its SyncStart lands, the peer must be resynced again (the bitmap and
        // `verify`'s marks, cleared above, are what it lacks), and after it the peer's mark
        // is term 0 anyway.
        inner.ring.clear(next, 0);
        inner.resync_inflight.clear();
        inner.overflowed = false;
        inner.bitmap_dirty = true;
        next
    }

    /// Status numbers: (issued, journal used, journal size, lag writes, lag bytes, out of sync).
    pub fn numbers(&self) -> (u64, u64, u64, u64, u64, u64, bool) {
        let applied = self.acks().applied;
        let g = self.lock();
        let (mut lag_w, mut lag_b) = g.ring.lag(applied);
        if g.overflowed {
            // The journal no longer holds what the peer lacks: the writes count from the
            // sequence marks, the bytes are what the bitmap records.
            lag_w = lag_w.max(g.issued.saturating_sub(applied));
            lag_b = lag_b.max(g.bitmap.dirty_bytes());
        }
        (
            g.issued,
            g.ring.used(),
            g.ring.cap(),
            lag_w,
            lag_b,
            g.bitmap.dirty_bytes(),
            g.overflowed,
        )
    }
}

/// Why a resync or verify step stops when the journal overflowed meanwhile: the link drops,
/// and the next connect resyncs the bitmap, which records everything the journal lost.
fn overflowed_error() -> std::io::Error {
    std::io::Error::other("the journal overflowed: the peer is brought back by a bitmap resync")
}

/// A read of this node's own backing device for a resync, a verify or a peer's hash request
/// that failed: a disk error of this node, not a link error (the link layer counts it in
/// `disk_errors` and runs the local-io-error handler).
#[derive(Debug, thiserror::Error)]
#[error("reading this node's backing device at {offset}+{len} failed: {source}")]
pub struct DiskReadError {
    pub offset: u64,
    pub len: u64,
    #[source]
    pub source: std::io::Error,
}

impl DiskReadError {
    /// The disk read error inside `e`, if that is what `e` is.
    pub fn of(e: &std::io::Error) -> Option<&DiskReadError> {
        e.get_ref().and_then(|x| x.downcast_ref::<DiskReadError>())
    }
}

/// Reads `buf.len()` bytes of the backing device at `offset` (a short file is an error),
/// wrapping a failure as a [`DiskReadError`].
pub fn read_backing(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    file.read_exact_at(buf, offset).map_err(|source| {
        std::io::Error::other(DiskReadError {
            offset,
            len: buf.len() as u64,
            source,
        })
    })
}

/// Reads what the disk holds rather than what the page cache does, for hashes (verify
/// vouches for the copy a failover would mount, as DRBD's verify reads the lower device): the
/// range's dirty pages are written back first and its clean ones dropped, so the read goes
/// to the device. A page a concurrent read brings back meanwhile came from the device too;
/// writes to the range are held while a hash is read (`hold_and_read` on the primary, the
/// stream's order on the secondary). Where the page cache is the storage (tmpfs) nothing
/// drops, and the read is the same.
pub fn read_from_disk(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = buf.len() as u64;
    // SAFETY: plain syscall on a valid descriptor, no memory passed.
    let r = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        // Where the file cannot say (a pipe, a filesystem without it), a sync of the whole
        // file writes the range back as well.
        if matches!(
            e.raw_os_error(),
            Some(libc::ESPIPE | libc::EINVAL | libc::EOPNOTSUPP)
        ) {
            file.sync_data()?;
        } else {
            return Err(e);
        }
    }
    drop_cached(file, offset, len);
    read_backing(file, buf, offset)?;
    drop_cached(file, offset, len);
    Ok(())
}

/// Opens the backing device for the resync's reads. A resync reads the whole device, and
/// what it reads must not stay in the page cache: readahead would cache it in large folios,
/// and a later small client write into such a folio costs in proportion to the folio (ext4
/// walks every block of it), which made every 4 KiB write on a freshly synced primary several
/// times dearer. Random access advice turns readahead off for this descriptor, so each chunk is
/// cached in small pages that [`drop_cached`] can drop right after the read.
pub fn open_for_resync(path: &std::path::Path) -> std::io::Result<File> {
    let file = File::open(path)?;
    fadvise(&file, 0, 0, libc::POSIX_FADV_RANDOM);
    Ok(file)
}

/// Drops the clean page cache of a range the resync has read (dirty pages stay until written
/// back, so no data is affected).
pub fn drop_cached(file: &File, offset: u64, len: u64) {
    fadvise(file, offset, len, libc::POSIX_FADV_DONTNEED);
}

/// posix_fadvise, best effort.
pub fn fadvise(file: &File, offset: u64, len: u64, advice: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on a valid descriptor. Advice only: a failure changes nothing
    // but speed, so it is ignored.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            advice,
        );
    }
}

/// After a restart: a journal whose records end before the issued mark lost its newest
/// records (a crash between committing the mark and syncing them, or an older version that
/// committed the mark first). The peer may lack those writes and no record can bring them:
/// the ranges the journal still holds go to the bitmap, the journal starts again after
/// `issued`, and the caller treats it as an overflow (the next connect resyncs the bitmap; a
/// crashed primary's activity log covers the lost writes themselves). Returns whether
/// records were lost.
pub fn reconcile_recovered(ring: &mut Ring, bitmap: &mut Bitmap, issued: u64) -> bool {
    match ring.last_seq() {
        // Not one record from the checkpoint on, though some were issued after it: lost in a
        // crash, or written in an earlier format that is not read.
        None if issued > ring.prev().0 => {
            ring.clear(issued + 1, 0);
            true
        }
        Some(last) if last < issued => {
            for r in ring.records() {
                if r.range.1 > r.range.0 {
                    bitmap.set_range(r.range.0, r.range.1 - r.range.0);
                }
            }
            // Records lost in the crash: the one before the next is not known here.
            ring.clear(issued + 1, 0);
            true
        }
        _ => false,
    }
}

fn with_seq(msg: &Msg, seq: u64, term: u64) -> Msg {
    let mut m = msg.clone();
    match &mut m {
        Msg::Write {
            seq: s, term: t, ..
        }
        | Msg::Zero {
            seq: s, term: t, ..
        }
        | Msg::Flush { seq: s, term: t }
        | Msg::Checkpoint { seq: s, term: t }
        | Msg::SyncDone {
            seq: s, term: t, ..
        }
        | Msg::HashReq {
            seq: s, term: t, ..
        }
        | Msg::Equal {
            seq: s, term: t, ..
        } => {
            *s = seq;
            *t = term;
        }
        _ => {}
    }
    m
}

/// The record that carries a resync's `data` read at `offset`: a `Zero` (a header) when it is
/// all zeros, else a `Write` of it with its `crc`.
fn resync_data_record(
    seq: u64,
    term: u64,
    offset: u64,
    data: &[u8],
    zero: bool,
    crc: u32,
) -> (Msg, &[u8]) {
    let len = data.len() as u64;
    if zero {
        let msg = Msg::Zero {
            seq,
            term,
            offset,
            len,
            trim: false,
        };
        (msg, &[])
    } else {
        let msg = Msg::Write {
            seq,
            term,
            offset,
            len: len as u32,
            crc,
            fua: false,
        };
        (msg, data)
    }
}

/// Whether a region read for resync holds only zeros (it then travels as a header). Compared
/// a page at a time against a zero page: memcmp, fast even in unoptimised builds.
fn is_zero(buf: &[u8]) -> bool {
    const ZERO_PAGE: [u8; 4096] = [0; 4096];
    buf.chunks(ZERO_PAGE.len())
        .all(|c| c == &ZERO_PAGE[..c.len()])
}

/// SHA-256 of one block (checksum resync and verify).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// The block hashes of `data` in blocks of `block` bytes (the last one over what is left).
pub fn block_hashes(data: &[u8], block: usize) -> Vec<[u8; 32]> {
    data.chunks(block.max(1)).map(sha256).collect()
}

/// Checksum resync's decision: the length in blocks of the first run of blocks that are all
/// equal to the peer's (`true`) or all different (`false`). `local(i)` hashes this node's
/// block `i`; it is called only for the blocks of the run and the one after it.
pub fn first_run(
    peer: &[[u8; 32]],
    mut local: impl FnMut(usize) -> std::io::Result<[u8; 32]>,
) -> std::io::Result<(usize, bool)> {
    let Some(first) = peer.first() else {
        return Ok((0, true));
    };
    let equal = local(0)? == *first;
    let mut n = 1;
    while n < peer.len() && (local(n)? == peer[n]) == equal {
        n += 1;
    }
    Ok((n, equal))
}

/// Runs of consecutive indices in an ascending list: `(first, count)` each.
pub fn runs(indices: &[usize]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &i in indices {
        match out.last_mut() {
            Some((first, count)) if *first + *count == i => *count += 1,
            _ => out.push((i, 1)),
        }
    }
    out
}

/// Verify's comparison: the blocks (indices) whose hashes differ; a reply with a different
/// number of hashes counts every block of the range as different.
pub fn differing_blocks(mine: &[[u8; 32]], peer: &[[u8; 32]]) -> Vec<usize> {
    if mine.len() != peer.len() {
        return (0..mine.len().max(peer.len())).collect();
    }
    mine.iter()
        .zip(peer)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect()
}

/// What a client write gets once writes are closed (see `Replication::close_writes`).
fn writes_closed_error() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::ESHUTDOWN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_run_splits_equal_and_different() {
        let h = |b: u8| sha256(&[b; 4096]);
        let peer = [h(1), h(2), h(3), h(4), h(5)];
        let mine = [h(1), h(2), h(9), h(9), h(5)];
        let mut calls = Vec::new();
        let mut local = |i: usize| {
            calls.push(i);
            Ok(mine[i])
        };
        assert_eq!(first_run(&peer, &mut local).unwrap(), (2, true));
        // Hashes only the run and the block after it.
        assert_eq!(calls, vec![0, 1, 2]);
        assert_eq!(
            first_run(&peer[2..], |i| Ok(mine[2 + i])).unwrap(),
            (2, false)
        );
        assert_eq!(
            first_run(&peer[4..], |i| Ok(mine[4 + i])).unwrap(),
            (1, true)
        );
        assert_eq!(first_run(&[], |_| Ok(h(0))).unwrap(), (0, true));
        // A read error stops the decision.
        assert!(first_run(&peer, |_| Err(std::io::Error::other("eio"))).is_err());
    }

    #[test]
    fn hashes_cover_a_short_last_block() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i ^ (i >> 8)) as u8).collect();
        let hs = block_hashes(&data, 4096);
        assert_eq!(hs.len(), 3);
        assert_eq!(hs[2], sha256(&data[8192..]));
        assert_ne!(hs[0], hs[1]);
    }

    #[test]
    fn differing_blocks_compares_per_block() {
        let a = [sha256(b"a"), sha256(b"b"), sha256(b"c")];
        let b = [sha256(b"a"), sha256(b"x"), sha256(b"c")];
        assert_eq!(differing_blocks(&a, &b), vec![1]);
        assert!(differing_blocks(&a, &a).is_empty());
        assert_eq!(differing_blocks(&a, &b[..2]), vec![0, 1, 2]);
    }

    #[test]
    fn runs_group_consecutive_indices() {
        assert_eq!(runs(&[]), vec![]);
        assert_eq!(runs(&[3]), vec![(3, 1)]);
        assert_eq!(runs(&[0, 1, 2, 5, 7, 8]), vec![(0, 3), (5, 1), (7, 2)]);
    }

    #[test]
    fn a_journal_ending_before_the_issued_mark_is_reconciled() {
        let write = |seq: u64, offset: u64| Msg::Write {
            seq,
            term: 0x7E57,
            offset,
            len: 4096,
            crc: crc32c::crc32c(&[7u8; 4096]),
            fua: false,
        };
        let mut ring = Ring::new(1 << 20);
        for seq in 1..=3 {
            journal::append_msg(&mut ring, &write(seq, seq * 65536), &[7u8; 4096], |_| {}).unwrap();
        }
        let mut bm = Bitmap::new(1 << 24, 4096);
        // Records through the mark: nothing lost, nothing changed.
        assert!(!reconcile_recovered(&mut ring, &mut bm, 3));
        assert_eq!(bm.dirty_bytes(), 0);
        assert_eq!(ring.last_seq(), Some(3));
        // The mark says 5 were issued but the journal ends at 3.
        assert!(reconcile_recovered(&mut ring, &mut bm, 5));
        assert_eq!(bm.dirty_bytes(), 3 * 4096);
        assert!(ring.is_empty());
        // The next record follows the mark (appending 4 would break the sequence).
        journal::append_msg(&mut ring, &write(6, 0), &[7u8; 4096], |_| {}).unwrap();
        assert_eq!(ring.last_seq(), Some(6));
    }

    #[test]
    fn a_journal_with_no_record_after_its_checkpoint_is_reconciled_when_some_were_issued() {
        let mut bm = Bitmap::new(1 << 24, 4096);
        // Checkpoint at 11 (record 10 had term 0xA1), nothing readable from there.
        let mut ring = Ring::recover(vec![0u8; 64 * 1024], 0, 11, 0xA1);
        assert!(
            !reconcile_recovered(&mut ring, &mut bm, 10),
            "nothing issued after it"
        );
        assert_eq!(ring.term_at(10), Some(0xA1));
        assert!(
            reconcile_recovered(&mut ring, &mut bm, 14),
            "11..=14 were issued"
        );
        // Lost: the record before the next one is not known here.
        assert_eq!(ring.term_at(14), None);
        assert_eq!(ring.prev(), (14, 0));
    }

    #[test]
    fn ranges_order_overlaps_only() {
        let mut r = Ranges::default();
        r.insert(1, (0, 4096));
        r.insert(2, (8192, 12288));
        assert!(r.blocked(3, (4095, 4097)));
        assert!(!r.blocked(3, (4096, 8192)));
        assert!(r.blocked(3, (12287, 20000)));
        // Only earlier sequences block.
        assert!(!r.blocked(1, (0, 4096)));
        r.remove(1);
        assert!(!r.blocked(3, (0, 4096)));
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn ranges_finish_out_of_order_and_accept_late_inserts() {
        let mut r = Ranges::default();
        for seq in 1..=4 {
            r.insert(seq, (seq * 4096, seq * 4096 + 4096));
        }
        // A later one finishes first: the earlier ones still block.
        r.remove(3);
        assert_eq!(r.len(), 3);
        assert!(!r.blocked(9, (3 * 4096, 4 * 4096)));
        assert!(r.blocked(9, (4096, 4097)));
        r.remove(1);
        r.remove(2);
        assert_eq!(r.len(), 1);
        assert!(r.blocked(9, (4 * 4096, 4 * 4096 + 1)));
        // Removing twice, or what was never there, changes nothing.
        r.remove(2);
        r.remove(77);
        assert_eq!(r.len(), 1);
        // An insert behind the back stays ordered: it blocks only later sequences.
        r.insert(2, (0, 4096));
        assert!(r.blocked(3, (0, 1)));
        assert!(!r.blocked(2, (0, 1)));
        r.remove(4);
        r.remove(2);
        assert!(r.is_empty());
        assert!(!r.blocked(u64::MAX, (0, u64::MAX)));
    }

    #[test]
    fn ranges_stay_bounded_behind_a_stuck_write() {
        let mut r = Ranges::default();
        r.insert(1, (0, 4096));
        for seq in 2..100_000u64 {
            r.insert(seq, (seq * 4096, seq * 4096 + 4096));
            r.remove(seq);
        }
        assert_eq!(r.len(), 1);
        assert!(r.inflight.len() <= 2 * r.live + 65, "{}", r.inflight.len());
        assert!(r.blocked(u64::MAX, (0, 1)));
        r.remove(1);
        assert!(r.is_empty() && r.inflight.is_empty());
    }
}

#[cfg(test)]
mod csum_tests {
    use super::*;
    use crate::test_dir::TestDir;

    /// A replication state over a fresh 8 MiB disk in `dir` (an empty [`TestDir`]), for the
    /// decisions that read it.
    fn fresh(dir: &std::path::Path) -> (Arc<Replication>, File) {
        let backing = dir.join("disk");
        File::create(&backing)
            .and_then(|f| f.set_len(8 << 20))
            .expect("disk");
        MetaStore::create(&backing, None, "r", "a", 256 * 1024, 4096, false).expect("create-md");
        let store = MetaStore::open(&backing, None, "r", "a").expect("open");
        let layout = store.sb.layout;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&backing)
            .expect("open disk");
        let rep = Replication::new(
            Protocol::C,
            Arc::new(Mutex::new(store)),
            MetaAreas {
                file: Arc::new(file.try_clone().expect("clone")),
                layout,
                data: None,
            },
            Ring::new(layout.journal_len),
            0,
            (0, 0),
            Bitmap::new(layout.data_size, 4096),
            false,
            64,
            0,
        );
        (rep, file)
    }

    /// One finished 4 KiB write of 5s at block `block`: its sequence.
    async fn write_block(rep: &Replication, block: u64) -> u64 {
        let data = [5u8; 4096];
        let seq = rep
            .begin(Record::Write {
                offset: block * 4096,
                data: &data,
                fua: false,
                crc: None,
            })
            .await
            .expect("write");
        rep.done(seq);
        rep.al_end(block * 4096, 4096, seq);
        seq
    }

    /// The superblock and the journal's sequences as a restart reads them back from `dir`'s
    /// disk (see [`fresh`]).
    fn read_back_journal(
        dir: &std::path::Path,
        file: &File,
    ) -> (crate::meta::Superblock, Vec<u64>) {
        let m = MetaStore::open(&dir.join("disk"), None, "r", "a").expect("open");
        let l = m.sb.layout;
        let mut image = vec![0u8; l.journal_len as usize];
        file.read_exact_at(&mut image, l.journal_offset)
            .expect("read");
        let ring = Ring::recover(
            image,
            m.sb.journal_pos,
            m.sb.journal_seq,
            m.sb.journal_prev_term,
        );
        (m.sb, ring.records().map(|r| r.seq).collect())
    }

    /// The journal and checkpoint a persist leaves are what a restart reads back, whether
    /// the checkpoint went with the records in one sync (they land within one ring of the
    /// checkpoint on disk) or before them (the ring went round since that checkpoint).
    #[tokio::test]
    async fn persisted_checkpoint_and_records_are_read_back_after_one_sync_or_two() {
        let dir = TestDir::new("brrep-persist");
        let (rep, file) = fresh(&dir);
        rep.set_connected(true, 0, 0);
        let write = |rep: Arc<Replication>, i: u64| async move { write_block(&rep, i % 64).await };
        let read_back = |file: &File| read_back_journal(&dir, file);
        for i in 0..5 {
            write(rep.clone(), i).await;
        }
        rep.persist().await.expect("persist");
        // The peer applied three: the checkpoint moves, and two more records go with it.
        rep.on_ack(3, 3, 0, 0);
        for i in 5..7 {
            write(rep.clone(), i).await;
        }
        assert!(
            rep.persist_blocking().expect("persist"),
            "one sync for both"
        );
        let (sb, seqs) = read_back(&file);
        assert_eq!((sb.journal_seq, sb.issued_seq), (4, 5));
        assert_eq!(seqs, (4..=7).collect::<Vec<_>>());
        // More than a ring's worth released and written since that checkpoint.
        let mut last = 7;
        for i in 7..120 {
            last = write(rep.clone(), i).await;
            rep.on_ack(last - 2, last - 2, 0, 0);
        }
        assert!(
            !rep.persist_blocking().expect("persist"),
            "the checkpoint first: the records would overwrite what the one on disk names"
        );
        let (sb, seqs) = read_back(&file);
        assert_eq!(sb.journal_seq, last - 1);
        assert_eq!(seqs, vec![last - 1, last]);
    }

    /// Records the peer applied (released, never written: no flush came) and a persist then
    /// skipped are written after all when a restarted peer needs them again, before or with
    /// the checkpoint that names them: a crash then still finds the whole journal.
    #[tokio::test]
    async fn records_kept_again_for_a_restarted_peer_are_written_before_the_checkpoint_names_them()
    {
        let dir = TestDir::new("brrep-rewind");
        let (rep, file) = fresh(&dir);
        rep.set_connected(true, 0, 0);
        let write = |i: u64| write_block(&rep, i);
        for i in 0..5 {
            write(i).await;
        }
        // Applied by the peer, not made durable there, and never written here.
        rep.on_ack(5, 5, 0, 0);
        for i in 5..7 {
            write(i).await;
        }
        rep.persist().await.expect("persist");
        // The peer restarted with its committed mark at 2: it needs 3.. again.
        rep.lock().keep_journal_from(3);
        rep.persist().await.expect("persist");
        let (sb, seqs) = read_back_journal(&dir, &file);
        assert_eq!(sb.journal_seq, 3, "the checkpoint names the kept records");
        assert_eq!(
            seqs,
            (3..=7).collect::<Vec<_>>(),
            "every record from the checkpoint on is read back"
        );
    }

    /// Under C a flush is answered once the peer has synced everything through it, before
    /// the peer's applied mark that says so is committed; but nothing is forgotten on that
    /// mark alone: a link that drops then still puts the write in the bitmap, since a
    /// restart of the peer resumes from its committed mark.
    #[tokio::test]
    async fn a_flush_is_answered_on_the_synced_mark_and_nothing_is_forgotten_before_durable() {
        let dir = TestDir::new("brrep-synced");
        let (rep, _file) = fresh(&dir);
        rep.set_connected(true, 0, 0);
        let data = vec![3u8; 4096];
        let write = rep
            .begin(Record::Write {
                offset: 64 * 1024,
                data: &data,
                fua: false,
                crc: None,
            })
            .await
            .expect("write");
        rep.done(write);
        rep.al_end(64 * 1024, 4096, write);
        let flush = rep.begin(Record::Flush).await.expect("flush");
        let mut answered = Box::pin(rep.wait_peer(flush, true));
        // A peer claiming more synced than it applied is held to what it applied; then
        // applied but not synced: the flush waits either way.
        for (applied, synced) in [(write, flush), (flush, write)] {
            rep.on_ack(flush, applied, synced, 0);
            assert_eq!(rep.acks().synced, write, "synced past applied");
            assert!(
                tokio::time::timeout(Duration::from_millis(50), &mut answered)
                    .await
                    .is_err(),
                "a flush answered before the peer synced it"
            );
        }
        rep.on_ack(flush, flush, flush, 0);
        tokio::time::timeout(Duration::from_secs(5), &mut answered)
            .await
            .expect("the flush waits after the peer synced it")
            .expect("flush");
        // Not durable yet: the link drops, and the write goes to the bitmap.
        assert_eq!(rep.lock().bitmap.dirty_bits(), 0);
        rep.on_disconnect();
        assert!(
            rep.lock().bitmap.dirty_bits() > 0,
            "a write the peer synced but did not commit was forgotten at the drop"
        );
    }

    /// Connects `rep` and issues one 4 KiB write at offset 0, written locally: its sequence
    /// (waiting for the peer from here).
    async fn connected_with_one_write(rep: &Replication) -> u64 {
        rep.set_connected(true, 0, 0);
        let data = vec![7u8; 4096];
        let w = rep
            .begin(Record::Write {
                offset: 0,
                data: &data,
                fua: false,
                crc: None,
            })
            .await
            .expect("write");
        rep.done(w);
        rep.al_end(0, 4096, w);
        w
    }

    /// Whether `answered` is still pending after 50 ms.
    async fn still_waiting<F: std::future::Future + Unpin>(answered: &mut F) -> bool {
        tokio::time::timeout(Duration::from_millis(50), answered)
            .await
            .is_err()
    }

    /// A write that waited for the peer through a reconnect that starts a resync is answered
    /// only once the peer has taken the resync's start, not on the marks the resync assumes
    /// (everything before its start): until the peer commits the SyncStart it is up to date
    /// without the write, and a failover to it would lose the write without a word.
    #[tokio::test]
    async fn a_write_held_through_a_reconnect_with_a_resync_waits_for_the_peer_to_take_it() {
        let dir = TestDir::new("brrep-confirm");
        let (rep, _file) = fresh(&dir);
        let w = connected_with_one_write(&rep).await;
        let mut answered = Box::pin(rep.wait_peer(w, false));
        assert!(still_waiting(&mut answered).await);
        // The link drops and comes back at once, with a resync (the journal cannot replay).
        rep.on_disconnect();
        rep.set_connected(false, 0, 0);
        let start = rep.start_resync(None, false, 8 << 20, 0);
        assert!(start > w, "the resync starts past the write");
        rep.set_connected(true, start - 1, start - 1);
        rep.confirm_resync_start(start);
        assert!(
            still_waiting(&mut answered).await,
            "answered on the marks the resync assumes, before the peer took its start"
        );
        let checkpoint = rep.begin(Record::Checkpoint).await.expect("checkpoint");
        assert_eq!(checkpoint, start);
        // A peer still short of the start (its ack of the stream's first mark).
        rep.on_ack(start - 1, start - 1, start - 1, 0);
        assert!(still_waiting(&mut answered).await);
        rep.on_ack(checkpoint, checkpoint, checkpoint, 0);
        tokio::time::timeout(Duration::from_secs(5), &mut answered)
            .await
            .expect("answered once the peer took the resync's start")
            .expect("write");
    }

    /// With the peer away, a client's flush goes into the journal once the data has moved on
    /// from the peer: the catch-up carries it as the barrier it was here (without it, a
    /// target that lost power midway could hold later writes without the earlier ones they
    /// were flushed after, and call itself up to date). Before any write diverged, a flush
    /// takes no sequence (it would start a new generation for nothing).
    #[tokio::test]
    async fn a_flush_with_the_peer_away_is_journaled_once_the_data_moved_on() {
        let dir = TestDir::new("brrep-awayflush");
        let (rep, file) = fresh(&dir);
        let engine = crate::engine::open(Arc::new(file), crate::config::IoEngineChoice::Sync)
            .expect("engine");
        let dev = crate::device::Device::new(engine, Some(rep.clone()), 4 << 20, false);
        rep.set_connected(true, 0, 0);
        let flushes = |rep: &Replication| {
            rep.lock()
                .ring
                .records()
                .filter(|r| r.range.0 == r.range.1 && r.data == 0)
                .count()
        };
        // Lost with nothing it lacks.
        assert!(!rep.peer_lost());
        rep.on_disconnect();
        rep.set_connected(false, 0, 0);
        dev.flush().await.expect("flush");
        assert_eq!(rep.lock().issued, 0, "a flush took a sequence for nothing");
        let mut buf = dev.pool.get(4096);
        buf.fill(9);
        let (r, buf) = dev.write(0, buf, false, None).await;
        r.expect("write");
        dev.pool.put(buf);
        assert!(rep.diverged_while_away());
        dev.flush().await.expect("flush");
        assert_eq!(
            flushes(&rep),
            1,
            "the flush after a diverged write is not in the journal"
        );
    }

    /// A write waiting for the peer when a demotion or `down` closed the writes and then the
    /// link dropped is not acknowledged: the peer may be promoted next without it, and no
    /// fence-peer runs for a planned stop.
    #[tokio::test]
    async fn a_write_released_without_the_peer_after_writes_closed_fails() {
        let dir = TestDir::new("brrep-closed");
        let (rep, _file) = fresh(&dir);
        let w = connected_with_one_write(&rep).await;
        let mut answered = Box::pin(rep.wait_peer(w, false));
        assert!(still_waiting(&mut answered).await);
        rep.close_writes(true);
        rep.peer_lost();
        rep.on_disconnect();
        rep.set_connected(false, 0, 0);
        let r = tokio::time::timeout(Duration::from_secs(5), &mut answered)
            .await
            .expect("released");
        assert!(
            r.is_err(),
            "acknowledged without the peer during a demotion"
        );
    }

    /// Review finding: under A, a write released without the peer was acknowledged on a disk
    /// that had failed a sync (B and C refused it: the data is on no good copy), and during
    /// a demotion that closed the writes. Now every protocol refuses both.
    #[tokio::test]
    async fn under_a_a_write_released_without_the_peer_on_a_failed_disk_or_closed_writes_fails() {
        for case in ["sync failed", "writes closed"] {
            let dir = TestDir::new("brrep-a-release");
            let (rep, _file) = fresh(&dir);
            rep.set_protocol(Protocol::A);
            let w = connected_with_one_write(&rep).await;
            rep.peer_lost();
            rep.on_disconnect();
            rep.set_connected(false, 0, 0);
            match case {
                "sync failed" => rep.set_local_sync_failed(),
                _ => rep.close_writes(true),
            }
            let r = tokio::time::timeout(Duration::from_secs(5), rep.wait_peer(w, false))
                .await
                .expect("answered");
            assert!(r.is_err(), "{case}: acknowledged without the peer under A");
        }
    }

    /// Which chunk [`held_region_orders_writes_after_the_chunk`] runs.
    #[derive(Clone, Copy)]
    enum ChunkKind {
        Resync,
        Verify,
        Checksum,
    }

    /// A resync chunk holds its region from before it waits for the writes in flight there
    /// until its record has a sequence: a write into the region meanwhile takes no sequence
    /// (it would otherwise be applied on the peer before the older data the chunk carries), a
    /// write elsewhere goes on, the write in flight is in the chunk's data (sequenced before
    /// it), and the hold's end lets the held write through, after the chunk's record.
    #[tokio::test]
    async fn a_write_to_a_region_being_read_for_the_resync_is_ordered_after_its_record() {
        held_region_orders_writes_after_the_chunk(ChunkKind::Resync, "resync").await;
    }

    /// The same for a verify chunk, whose hashes are taken off the thread: the peer hashes
    /// its copy at the request's place in the stream, so a write into the region between
    /// this node's read and that place would show as a false difference.
    #[tokio::test]
    async fn a_write_to_a_region_being_read_for_verify_is_ordered_after_its_hash_request() {
        held_region_orders_writes_after_the_chunk(ChunkKind::Verify, "verify").await;
    }

    /// And for a checksum resync's run (here all different from the peer's hashes: its data
    /// goes, as a Zero record over the whole region).
    #[tokio::test]
    async fn a_write_to_a_region_being_read_for_a_checksum_resync_is_ordered_after_its_run() {
        held_region_orders_writes_after_the_chunk(ChunkKind::Checksum, "csum").await;
    }

    async fn held_region_orders_writes_after_the_chunk(kind: ChunkKind, name: &str) {
        let dir = TestDir::new(&format!("brrep-hold-{name}"));
        let (rep, file) = fresh(&dir);
        rep.set_connected(true, 0, 0);
        let hold = (1u64 << 20, 2u64 << 20);
        let begin = |rep: Arc<Replication>, offset: u64| async move {
            let data = vec![9u8; 4096];
            rep.begin(Record::Write {
                offset,
                data: &data,
                fua: false,
                crc: None,
            })
            .await
        };
        let finish = |rep: &Replication, offset: u64, seq: u64| {
            rep.done(seq);
            rep.al_end(offset, 4096, seq);
        };
        // In flight: took its sequence, its local write not done yet.
        let early = begin(rep.clone(), hold.0 + 4096).await.expect("write");
        let r = rep.clone();
        let f = file.try_clone().expect("dup");
        let mut chunk = tokio::spawn(async move {
            let mut buf = Vec::new();
            let len = hold.1 - hold.0;
            match kind {
                ChunkKind::Resync => r
                    .resync_chunk(&f, hold.0, len, &mut buf)
                    .await
                    .map(|(seq, _)| seq),
                ChunkKind::Verify => r
                    .verify_chunk(&f, hold.0, len as u32, 4096, &mut buf)
                    .await
                    .map(|(seq, hashes)| {
                        assert_eq!(hashes.len(), (len / 4096) as usize, "one hash per block");
                        seq
                    }),
                ChunkKind::Checksum => {
                    let peer = vec![[7u8; 32]; (len / 4096) as usize];
                    let asked = r.pins();
                    let (n, equal, zero) = r
                        .resync_csum_chunk(&f, hold.0, len, 4096, &peer, asked, &mut buf)
                        .await?;
                    assert!(n == len && !equal && zero, "{n} {equal} {zero}");
                    let g = r.lock();
                    let rec = g.ring.records().find(|x| x.range == hold).copied();
                    Ok(rec.expect("the run's record").seq)
                }
            }
        });
        for _ in 0..100 {
            if rep.lock().read_hold.is_some() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(
            rep.lock().read_hold,
            Some(hold),
            "the chunk does not hold its region"
        );
        let short = Duration::from_millis(100);
        assert!(
            tokio::time::timeout(short, &mut chunk).await.is_err(),
            "the chunk read its region with a write in flight there"
        );
        let r = rep.clone();
        let mut held = tokio::spawn(async move {
            let seq = begin(r.clone(), hold.0 + 8192).await?;
            finish(&r, hold.0 + 8192, seq);
            Ok::<u64, std::io::Error>(seq)
        });
        let elsewhere = tokio::time::timeout(Duration::from_secs(5), begin(rep.clone(), 0))
            .await
            .expect("a write outside the hold goes on")
            .expect("write");
        finish(&rep, 0, elsewhere);
        assert!(
            tokio::time::timeout(short, &mut held).await.is_err(),
            "a write into the held region took a sequence"
        );
        assert_eq!(rep.lock().issued, elsewhere);
        // The write in flight ends: the chunk reads, takes the next sequence, lets go.
        finish(&rep, hold.0 + 4096, early);
        let chunk = tokio::time::timeout(Duration::from_secs(5), &mut chunk)
            .await
            .expect("the chunk ends")
            .expect("task")
            .expect("chunk");
        assert!(
            chunk > elsewhere && elsewhere > early,
            "{early} {elsewhere} {chunk}"
        );
        let after = tokio::time::timeout(Duration::from_secs(5), held)
            .await
            .expect("the held write goes on once the hold ends")
            .expect("task")
            .expect("write");
        assert!(
            after > chunk,
            "the held write ({after}) is not after the chunk ({chunk})"
        );
        assert!(rep.lock().read_hold.is_none(), "the chunk left its hold");
    }

    /// `resource-and-stonith`: writes suspended at the loss of the peer are not acknowledged
    /// without it (a write in flight at the drop, and a new one that would start), until
    /// the suspension is lifted; a peer back meanwhile gets the write in its stream instead.
    /// Closing writes (a `down`, a demotion) fails them rather than leave them hanging.
    #[tokio::test]
    async fn suspended_writes_wait_for_the_fence_and_fail_when_writes_close() {
        let dir = TestDir::new("brrep-suspend");
        let (rep, _file) = fresh(&dir);
        let data = vec![5u8; 4096];
        let begin = |rep: Arc<Replication>, offset: u64| {
            let data = data.clone();
            async move {
                let seq = rep
                    .begin(Record::Write {
                        offset,
                        data: &data,
                        fua: false,
                        crc: None,
                    })
                    .await?;
                rep.done(seq);
                rep.al_end(offset, 4096, seq);
                Ok::<u64, std::io::Error>(seq)
            }
        };
        let short = Duration::from_millis(100);
        for protocol in [Protocol::A, Protocol::B, Protocol::C] {
            rep.set_protocol(protocol);
            rep.set_connected(true, rep.acks().applied, rep.acks().durable);
            // A write that took its sequence before the loss and waits for the peer (or,
            // under A, would be answered without it once the link is gone).
            let before = begin(rep.clone(), 0).await.expect("write");
            let name = rep.suspend_io();
            assert_eq!(rep.suspend_io(), name, "one suspension at a time");
            rep.peer_lost();
            rep.on_disconnect();
            rep.set_connected(false, 0, 0);
            let r = rep.clone();
            let mut inflight =
                tokio::spawn(async move { r.wait_peer(before, false).await.map(|_| before) });
            // A new write is held before it takes a sequence.
            let r = rep.clone();
            let issued = rep.lock().issued;
            let mut fresh_write = tokio::spawn(begin(r, 1 << 20));
            for (what, w) in [("in flight", &mut inflight), ("new", &mut fresh_write)] {
                assert!(
                    tokio::time::timeout(short, w).await.is_err(),
                    "{protocol:?}: a {what} write was answered while writes are suspended"
                );
            }
            assert_eq!(rep.lock().issued, issued, "a held write took a sequence");
            assert!(
                !rep.resume_io_of(name + 1),
                "another suspension's fence lifted it"
            );
            assert!(rep.io_suspended());
            assert!(rep.resume_io_of(name), "its own fence lifts it");
            tokio::time::timeout(Duration::from_secs(5), &mut inflight)
                .await
                .expect("answered once resumed")
                .expect("task")
                .expect("write");
            tokio::time::timeout(Duration::from_secs(5), &mut fresh_write)
                .await
                .expect("answered once resumed")
                .expect("task")
                .expect("write");
            assert!(!rep.resume_io(), "nothing left to resume");
        }
        // A later suspension is not lifted by an earlier one's fence.
        let first = rep.suspend_io();
        assert!(rep.resume_io());
        let second = rep.suspend_io();
        assert_ne!(first, second);
        assert!(!rep.resume_io_of(first));
        assert!(rep.io_suspended());
        // Closing writes fails a suspended one instead of leaving it hanging.
        let mut held = tokio::spawn(begin(rep.clone(), 2 << 20));
        assert!(tokio::time::timeout(short, &mut held).await.is_err());
        rep.close_writes(true);
        let r = tokio::time::timeout(Duration::from_secs(5), held)
            .await
            .expect("a closed write fails at once")
            .expect("task");
        assert!(
            r.is_err(),
            "a suspended write succeeded after writes closed: {r:?}"
        );
    }

    /// Review finding: with the journal full under steady load, every bit of space the peer
    /// freed went to the small writes that came by, and a large write never found room: after
    /// 30 s it overflowed the journal (a dropped link and a bitmap resync). The first write in
    /// line for space now gets it first: a small write that comes later waits behind it.
    #[tokio::test]
    async fn the_first_write_waiting_for_journal_space_gets_it_before_later_small_ones() {
        let dir = TestDir::new("brrep-headline");
        let (rep, _file) = fresh(&dir);
        rep.set_connected(true, 0, 0);
        let write = |rep: Arc<Replication>, offset: u64, len: usize| async move {
            let data = vec![5u8; len];
            rep.begin(Record::Write {
                offset,
                data: &data,
                fua: false,
                crc: None,
            })
            .await
        };
        // Fill the 256 KiB journal with 4 KiB writes (none acknowledged by the peer) until a
        // 64 KiB one no longer fits, with room left for a 4 KiB one.
        let free = |rep: &Replication| {
            let g = rep.lock();
            g.ring.cap() - g.ring.used()
        };
        let mut issued = 0u64;
        while free(&rep) >= 64 * 1024 {
            let off = (issued % 1024) * 4096;
            let seq = tokio::time::timeout(Duration::from_secs(5), write(rep.clone(), off, 4096))
                .await
                .expect("a write that fits waited")
                .expect("write");
            rep.done(seq);
            rep.al_end(off, 4096, seq);
            issued = seq;
            assert!(issued < 200, "a 256 KiB journal never filled");
        }
        assert!(free(&rep) >= 4096 + 512, "no room left for a small write");
        // A 64 KiB write waits first; then a small one comes, which would fit.
        let large = tokio::spawn(write(rep.clone(), 6 << 20, 64 * 1024));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!large.is_finished(), "the large write fit");
        let small = tokio::spawn(write(rep.clone(), 7 << 20, 4096));
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The peer applies a little at a time.
        for upto in (4..=issued).step_by(4) {
            rep.on_ack(upto, upto, 0, 0);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let large = tokio::time::timeout(Duration::from_secs(10), large)
            .await
            .expect("the large write got no space")
            .expect("task")
            .expect("write");
        let small = tokio::time::timeout(Duration::from_secs(10), small)
            .await
            .expect("the small write got no space")
            .expect("task")
            .expect("write");
        assert!(
            large < small,
            "journal space went out of turn: the large write waiting first got seq {large}, the later small one {small}"
        );
        assert!(!rep.lock().overflowed, "the journal overflowed");
    }

    /// Review finding: a demotion closes writes, then commits every sequence issued as
    /// applied. A write still waiting for journal space then (the peer slow, the journal
    /// full) must fail, not take a sequence after that commit and land on a secondary.
    #[tokio::test]
    async fn a_write_waiting_for_journal_space_fails_once_writes_are_closed() {
        let dir = TestDir::new("brrep-space");
        let (rep, _file) = fresh(&dir);
        rep.set_connected(true, 0, 0);
        let data = vec![7u8; 32 * 1024];
        let write = |rep: Arc<Replication>, data: Vec<u8>| async move {
            rep.begin(Record::Write {
                offset: 0,
                data: &data,
                fua: false,
                crc: None,
            })
            .await
        };
        // Fill the journal (nothing is acknowledged: the peer does not drain it). A write
        // that fits is done well within 2 s (its extent's first write syncs the activity
        // log: on a busy disk that took more than 100 ms); one that does not waits for ever.
        let mut issued = 0;
        let waiting = loop {
            let mut w = tokio::spawn(write(rep.clone(), data.clone()));
            match tokio::time::timeout(Duration::from_secs(2), &mut w).await {
                Ok(r) => {
                    let seq = r.expect("task").expect("write");
                    rep.done(seq);
                    rep.al_end(0, data.len() as u64, seq);
                    issued = seq;
                    assert!(issued < 100, "a 256 KiB journal never filled");
                }
                Err(_) => break w,
            }
        };
        assert!(issued > 0, "no write fit in the journal");
        rep.close_writes(true);
        let r = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the waiting write still waits after writes were closed")
            .expect("task");
        let e = r.expect_err("a write took a sequence after writes were closed");
        assert_eq!(e.raw_os_error(), Some(libc::ESHUTDOWN), "{e}");
        assert_eq!(rep.lock().issued, issued, "no sequence was taken");
        let e = write(rep.clone(), data.clone()).await.expect_err("closed");
        assert_eq!(e.raw_os_error(), Some(libc::ESHUTDOWN), "{e}");
        // Flushes (the demotion's own) still go through.
        rep.close_writes(false);
    }

    /// Review finding: a write that failed here after the peer applied it pins its range;
    /// hashes the peer gave before that may match this disk's old data although the peer
    /// holds the write. Nothing of such a region may count as equal (its bits would clear
    /// over the difference).
    #[tokio::test]
    async fn a_pin_after_the_hashes_were_asked_makes_nothing_equal() {
        let dir = TestDir::new("brrep-pins");
        let (rep, file) = fresh(&dir);
        let block = 4096u64;
        let mut data = vec![0u8; 4 * block as usize];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i % 251) as u8 + 1;
        }
        file.write_all_at(&data, 0).expect("write");
        let peer = block_hashes(&data, block as usize);
        let mut buf = Vec::new();

        let asked = rep.pins();
        let (n, equal, _) = rep
            .resync_csum_chunk(&file, 0, 2 * block, block, &peer[..2], asked, &mut buf)
            .await
            .expect("chunk");
        assert!(equal && n == 2 * block, "same data, no pin: equal");

        let asked = rep.pins();
        rep.lock().set_pinned(2 * block, block);
        let (n, equal, zero) = rep
            .resync_csum_chunk(
                &file,
                2 * block,
                2 * block,
                block,
                &peer[2..],
                asked,
                &mut buf,
            )
            .await
            .expect("chunk");
        assert!(
            !equal && !zero && n == 2 * block,
            "pinned after the hashes were asked: sent as data ({n}, {equal})"
        );
    }
}
