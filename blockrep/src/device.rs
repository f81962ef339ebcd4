//! The exported block device: the one place every client write passes through.
//!
//! The NBD server calls it; it checks bounds and alignment, drives the backing engine and keeps
//! the I/O counters. Replication hooks in here so that the NBD layer never knows whether a write
//! is mirrored.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use proto::control::IoCounters;
use proto::nbd::{EINVAL, EIO, ENOSPC, ESHUTDOWN};

use crate::buf::{Buf, BufPool};
use crate::config::Protocol;
use crate::engine::{self, Engine, IoOp};
use crate::replication::{Record, Replication};

#[derive(Default)]
pub struct Counters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub zeroes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
}

/// An NBD error number (the spec's values).
pub type Errno = u32;

/// The smallest secondary write that goes around the page cache (see
/// [`Device::apply_write`]). Below it a direct write costs more CPU than the copy it saves:
/// each is a request to the disk with its interrupt (4 KiB random writes took about 25 µs of
/// CPU each direct, against about 14 through the page cache, on the 2-core benchmark machine).
const DIRECT_APPLY_MIN: u64 = 64 << 10;

pub struct Device {
    engine: Arc<dyn Engine>,
    /// The same backing device opened with `O_DIRECT`, for the secondary's large writes (see
    /// [`Self::apply_write`]), and that descriptor; none when the device is direct already or
    /// refuses it.
    direct: Option<(Arc<dyn Engine>, Arc<std::fs::File>)>,
    /// The device refused a direct write (EINVAL, EOPNOTSUPP): every later one goes through
    /// the page cache. Said once.
    direct_refused: std::sync::atomic::AtomicBool,
    /// Writes done around the page cache.
    direct_writes: AtomicU64,
    /// The backing device has no in-place zeroing (`FALLOC_FL_ZERO_RANGE`): zeros are
    /// written instead, without asking again.
    zero_range_unsupported: std::sync::atomic::AtomicBool,
    /// Set when the resource has a peer: client writes are journaled and mirrored.
    rep: Option<Arc<Replication>>,
    /// Exported bytes; the metadata beyond is never reachable through this type. Only ever
    /// lowered, on a node that serves no client (see [`Self::shrink_to`]).
    size: AtomicU64,
    /// Required alignment of offsets and lengths (4096 under O_DIRECT, else 1).
    align: u64,
    /// The largest request advertised (see [`Self::max_request`]); fixed, as the journal's
    /// size is.
    max_write: u32,
    pub pool: BufPool,
    pub counters: Counters,
    /// A sync of the backing device failed once. The kernel may have dropped the dirty pages
    /// it could not write, so a later sync that succeeds proves nothing about them: every
    /// flush fails from then on (restart the node, or fail over to the peer).
    sync_failed: std::sync::atomic::AtomicBool,
    /// Set once `sync_failed` is (see [`Self::subscribe_sync_failed`]).
    sync_failed_tx: tokio::sync::watch::Sender<bool>,
    /// Failed backing-device I/O so far; the resource watches it (the `local-io-error`
    /// handler).
    disk_errors: tokio::sync::watch::Sender<u64>,
    /// Backing-device requests in flight, and when the device last made progress (ms after
    /// `epoch`: the last completion, or the start that made it busy): a hung disk shows in
    /// `status` and the log instead of only as clients that wait (see [`Self::stalled`]).
    inflight: AtomicU64,
    progress_ms: AtomicU64,
    epoch: std::time::Instant,
}

/// Counts one backing-device request in flight until dropped (also when its future is).
struct InFlight<'a>(&'a Device);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.progress_ms.store(self.0.now_ms(), Relaxed);
        self.0.inflight.fetch_sub(1, Relaxed);
    }
}

fn errno_of(e: &std::io::Error) -> Errno {
    match e.raw_os_error() {
        // The NBD spec: EDQUOT and EFBIG are reported as ENOSPC too.
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => ENOSPC,
        Some(libc::EINVAL) => EINVAL,
        _ => EIO,
    }
}

/// A record the journal did not take: writes closed by a demotion get ESHUTDOWN (as a request
/// read after it does), anything else EIO.
fn begin_errno(e: &std::io::Error) -> Errno {
    if e.raw_os_error() == Some(libc::ESHUTDOWN) {
        ESHUTDOWN
    } else {
        EIO
    }
}

impl Device {
    pub fn new(
        engine: Arc<dyn Engine>,
        rep: Option<Arc<Replication>>,
        size: u64,
        direct: bool,
    ) -> Self {
        let align: u64 = if direct { 4096 } else { 1 };
        let max_write = Self::max_write(rep.as_deref(), align);
        Device {
            engine,
            direct: None,
            direct_refused: std::sync::atomic::AtomicBool::new(false),
            direct_writes: AtomicU64::new(0),
            zero_range_unsupported: std::sync::atomic::AtomicBool::new(false),
            rep,
            size: AtomicU64::new(size),
            align,
            max_write,
            pool: BufPool::new(512),
            counters: Counters::default(),
            sync_failed: std::sync::atomic::AtomicBool::new(false),
            sync_failed_tx: tokio::sync::watch::channel(false).0,
            disk_errors: tokio::sync::watch::channel(0).0,
            inflight: AtomicU64::new(0),
            progress_ms: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
        }
    }

    /// Gives the secondary's apply path a direct-I/O engine over `file`, the same backing
    /// device opened with `O_DIRECT` (see [`Self::apply_write`]). Only where pages are 4 KiB:
    /// with larger pages a 4 KiB-aligned direct write shares a page with its neighbours.
    pub fn with_direct_writes(mut self, engine: Arc<dyn Engine>, file: Arc<std::fs::File>) -> Self {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if self.align == 1 && page == 4096 {
            self.direct = Some((engine, file));
        } else if self.align == 1 {
            tracing::info!(
                "pages are {page} bytes here: a secondary's large writes go through the page cache"
            );
        }
        self
    }

    /// Whether a secondary's write of `len` bytes at `offset` goes around the page cache, and
    /// if so the span it must hold against other writes: every byte a cached folio it may
    /// share can hold (folios are at most 2 MiB, naturally aligned). A write outside its range
    /// but inside such a folio, applied at the same time, could otherwise dirty the folio with
    /// bytes read before the direct write landed, and write them back over it later.
    pub fn direct_span(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        const FOLIO_MAX: u64 = 2 << 20;
        let usable = self.direct.is_some()
            && !self.direct_refused.load(Relaxed)
            && len >= DIRECT_APPLY_MIN
            && offset % 4096 == 0
            && len % 4096 == 0;
        let end = offset.checked_add(len)?;
        let span = (
            offset / FOLIO_MAX * FOLIO_MAX,
            end.div_ceil(FOLIO_MAX).saturating_mul(FOLIO_MAX),
        );
        // Not where the span reaches past the exported range: internal metadata may follow,
        // written through the page cache at any time and held by no span.
        (usable && span.1 <= self.size()).then_some(span)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// One request to the backing device, counted in flight.
    async fn io(&self, op: IoOp, buf: Buf) -> engine::IoDone {
        self.io_on(&*self.engine, op, buf).await
    }

    /// One request through `engine` (the device's, or its direct one), counted in flight.
    async fn io_on(&self, engine: &dyn Engine, op: IoOp, buf: Buf) -> engine::IoDone {
        if self.inflight.fetch_add(1, Relaxed) == 0 {
            self.progress_ms.store(self.now_ms(), Relaxed);
        }
        let _counted = InFlight(self);
        engine::run(engine, op, buf).await
    }

    /// Requests in flight on the backing device, and for how long (ms) it has completed none
    /// of them (0 when idle).
    pub fn stalled(&self) -> (u64, u64) {
        let n = self.inflight.load(Relaxed);
        if n == 0 {
            return (0, 0);
        }
        (
            n,
            self.now_ms().saturating_sub(self.progress_ms.load(Relaxed)),
        )
    }

    /// The I/O counters, backing-device errors included.
    pub fn io_counters(&self) -> IoCounters {
        let c = &self.counters;
        let stalled = self.stalled();
        IoCounters {
            reads: c.reads.load(Relaxed),
            writes: c.writes.load(Relaxed),
            flushes: c.flushes.load(Relaxed),
            trims: c.trims.load(Relaxed),
            zeroes: c.zeroes.load(Relaxed),
            bytes_read: c.bytes_read.load(Relaxed),
            bytes_written: c.bytes_written.load(Relaxed),
            errors: c.errors.load(Relaxed),
            disk_errors: *self.disk_errors.borrow(),
            inflight: stalled.0,
            stalled_s: stalled.1 / 1000,
        }
    }

    /// Changes on every failed backing-device I/O.
    pub fn subscribe_disk_errors(&self) -> tokio::sync::watch::Receiver<u64> {
        self.disk_errors.subscribe()
    }

    pub fn size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Exports `size` bytes from now on (DRBD's size negotiation: the smaller of a pair's
    /// two disks). Only lowers, and only on a node that serves no NBD client (a secondary),
    /// so no client ever saw the larger size.
    pub fn shrink_to(&self, size: u64) {
        self.size
            .fetch_min(size, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn min_block(&self) -> u32 {
        self.align as u32
    }

    /// The largest request to advertise (NBD_INFO_BLOCK_SIZE's maximum): the protocol's
    /// bound, and below what one journal record can hold (half the ring, less a frame's head),
    /// so that a client that honours it never sends a write the journal can only take by
    /// overflowing (which drops the link and resyncs). A multiple of the minimum block.
    /// A longer write is still taken, not refused: clients that ignore the maximum exist
    /// (nbdfuse sends its 1 MiB writes whatever the server says); it is journaled in parts
    /// (see [`Self::write_in_parts`]).
    pub fn max_request(&self) -> u32 {
        self.max_write
    }

    fn max_write(rep: Option<&Replication>, align: u64) -> u32 {
        let Some(rep) = rep else {
            return proto::nbd::MAX_REQUEST_LEN;
        };
        let head = (proto::peer::PREFIX_LEN + proto::peer::MAX_HEADER_LEN) as u64;
        let fits = (rep.lock().ring.cap() / 2).saturating_sub(head);
        let unit = align.max(4096);
        let max = (fits / unit * unit).clamp(unit, u64::from(proto::nbd::MAX_REQUEST_LEN));
        u32::try_from(max).unwrap_or(proto::nbd::MAX_REQUEST_LEN)
    }

    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    /// Checks a range against the export; the error is the spec's for the command.
    fn check(&self, offset: u64, len: u64, is_write: bool) -> Result<(), Errno> {
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > self.size()) {
            return Err(if is_write { ENOSPC } else { EINVAL });
        }
        if offset % self.align != 0 || len % self.align != 0 {
            return Err(EINVAL);
        }
        Ok(())
    }

    fn fail<T>(&self, e: Errno) -> Result<T, Errno> {
        self.counters.errors.fetch_add(1, Relaxed);
        Err(e)
    }

    /// A failed I/O on the backing device (not a bad request): counted apart as well.
    fn disk_fail<T>(&self, e: Errno) -> Result<T, Errno> {
        self.note_disk_error();
        self.fail(e)
    }

    /// Counts a failed I/O on the backing device outside the client's requests (a resync,
    /// verify or hash read): `disk_errors` and the local-io-error handler see it too.
    pub fn note_disk_error(&self) {
        self.disk_errors.send_modify(|n| *n += 1);
    }

    /// Reads into `buf` (its length is the request length). Returns the buffer either way so it
    /// can go back to the pool.
    ///
    /// Held, as writes are, while I/O is suspended by fencing (DRBD freezes reads too): the
    /// peer may be promoted meanwhile, and a read answered from this disk then could hand a
    /// client data the new primary has already overwritten. Failed if client I/O closes
    /// meanwhile (a demotion or `down`).
    pub async fn read(&self, offset: u64, buf: Buf) -> (Result<(), Errno>, Buf) {
        if let Err(e) = self.check(offset, buf.len() as u64, false) {
            return (self.fail(e), buf);
        }
        if let Some(rep) = &self.rep {
            if let Err(e) = rep.io_gate().await {
                return (self.fail(begin_errno(&e)), buf);
            }
        }
        let len = buf.len() as u64;
        let d = self.io(IoOp::Read { offset }, buf).await;
        match d.result {
            Ok(()) => {
                self.counters.reads.fetch_add(1, Relaxed);
                self.counters.bytes_read.fetch_add(len, Relaxed);
                (Ok(()), d.buf)
            }
            Err(e) => {
                tracing::error!("backing read at {offset}+{len} failed: {e}");
                (self.disk_fail(errno_of(&e)), d.buf)
            }
        }
    }

    /// A client write: journaled and mirrored when the resource has a peer, acknowledged when
    /// the protocol's condition holds.
    /// `crc`: the crc32c of `buf`, when its reader computed it as the data arrived (the
    /// journal record carries it; computed here otherwise).
    pub async fn write(
        &self,
        offset: u64,
        buf: Buf,
        fua: bool,
        crc: Option<u32>,
    ) -> (Result<(), Errno>, Buf) {
        let len = buf.len() as u64;
        if let Err(e) = self.check(offset, len, true) {
            return (self.fail(e), buf);
        }
        // Nothing to write (the NBD spec lets a server answer it either way): no record, no
        // activity-log extent, no round trip to the peer, as a zero-length trim or zeroing.
        if len == 0 {
            return (Ok(()), buf);
        }
        let Some(rep) = &self.rep else {
            return self.local_write(offset, buf, fua).await;
        };
        if len > u64::from(self.max_write) {
            return self.write_in_parts(rep, offset, buf, fua).await;
        }
        let seq = match rep
            .begin(Record::Write {
                offset,
                data: &buf,
                fua,
                crc,
            })
            .await
        {
            Ok(seq) => seq,
            Err(e) => return (self.fail(begin_errno(&e)), buf),
        };
        // The record goes to the peer before this node copies the data into its page cache:
        // one yield lets the sender, woken by the record, ship the batch read so far (it
        // runs before the writes that yielded after it), so the peer applies it while this
        // thread writes it locally. Under B and C the client's answer waits for the peer;
        // measured 10-11 % more 4 KiB writes at depth 32 on 2 cores. Not under A, whose
        // answer waits only for the local write (the yield cost it 10 %), nor with the peer
        // away.
        if rep.protocol() != Protocol::A && rep.acks().connected {
            tokio::task::yield_now().await;
        }
        let (r, buf) = self.local_write(offset, buf, fua).await;
        rep.done(seq);
        let mut r = r;
        if r.is_ok() {
            if rep.wait_peer(seq, fua).await.is_err() {
                r = self.fail(EIO);
            }
        } else {
            // The record is already on its way to the peer, which will hold the new data
            // while this disk may not: recorded, so a resync makes them agree.
            rep.mark_out_of_sync(offset, len);
        }
        rep.al_end(offset, len, seq);
        (r, buf)
    }

    /// A write longer than one journal record holds, from a client that ignores the advertised
    /// maximum (nbdfuse and the kernel send 1 MiB writes whatever it is): written as
    /// consecutive writes of at most the maximum, one after the other, each its own record
    /// and each waited for as the protocol says. Before, the one record overflowed the
    /// journal, the link dropped for a resync, and the write was acknowledged without the
    /// peer even under protocol C. A rare path: each part is copied into a buffer of its own.
    async fn write_in_parts(
        &self,
        rep: &Replication,
        offset: u64,
        buf: Buf,
        fua: bool,
    ) -> (Result<(), Errno>, Buf) {
        let part_len = self.max_write as usize;
        for (i, data) in buf.chunks(part_len).enumerate() {
            let at = offset + (i * part_len) as u64;
            let n = data.len() as u64;
            let seq = match rep
                .begin(Record::Write {
                    offset: at,
                    data,
                    fua,
                    crc: None,
                })
                .await
            {
                Ok(seq) => seq,
                Err(e) => return (self.fail(begin_errno(&e)), buf),
            };
            let mut part = self.pool.get(data.len());
            part.copy_from_slice(data);
            let (r, part) = self.local_write(at, part, fua).await;
            self.pool.put(part);
            rep.done(seq);
            let r = match r {
                Ok(()) if rep.wait_peer(seq, fua).await.is_err() => self.fail(EIO),
                Ok(()) => Ok(()),
                Err(e) => {
                    // As for a whole write: the peer gets the record, this disk may not.
                    rep.mark_out_of_sync(at, n);
                    Err(e)
                }
            };
            rep.al_end(at, n, seq);
            if r.is_err() {
                return (r, buf);
            }
        }
        (Ok(()), buf)
    }

    /// The secondary's write of a stream record. A large, aligned one goes around the page
    /// cache when the device was given a direct engine: a secondary reads nothing back (its
    /// data is read again only by verify and resync), so a copy into the page cache, which
    /// writeback copies out again later, is pure cost. On a 2-core machine shared by both nodes
    /// and the client, that copy made the secondary cost as much CPU per MiB as the primary.
    /// Durability is unchanged: the data is on the device (in its write cache) when the write
    /// completes, and the flushes of the stream sync the device as before (`fdatasync` issues
    /// the cache flush). The caller holds [`Self::direct_span`] against other writes; the
    /// kernel writes back cached pages of the range before a direct write, and the span is
    /// dropped from the cache after it (a block device's page cache is not dropped by the
    /// kernel then: a reader meanwhile, a udev probe say, could leave the old bytes cached for
    /// a later promotion to serve; a folio under a read at that moment can still escape).
    /// A device that refuses direct writes (EINVAL, EOPNOTSUPP) gets this one and every later
    /// one through the page cache (said once). Any other failure is the disk's, as for
    /// [`Self::local_write`].
    pub async fn apply_write(&self, offset: u64, buf: Buf) -> (Result<(), Errno>, Buf) {
        let len = buf.len() as u64;
        let (direct, span) = match (&self.direct, self.direct_span(offset, len)) {
            (Some(d), Some(span)) => (d, span),
            _ => return self.local_write(offset, buf, false).await,
        };
        if let Err(e) = self.check(offset, len, true) {
            return (self.fail(e), buf);
        }
        let d = self
            .io_on(&*direct.0, IoOp::Write { offset, fua: false }, buf)
            .await;
        match d.result {
            Ok(()) => {
                // The whole span: the kernel skips folios only partly in a range.
                crate::replication::drop_cached(&direct.1, span.0, span.1 - span.0);
                self.direct_writes.fetch_add(1, Relaxed);
                self.counters.writes.fetch_add(1, Relaxed);
                self.counters.bytes_written.fetch_add(len, Relaxed);
                (Ok(()), d.buf)
            }
            Err(e)
                if d.buf.len() as u64 == len
                    && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) =>
            {
                if !self.direct_refused.swap(true, Relaxed) {
                    tracing::warn!(
                        "the backing device refused a direct write at {offset}+{len} ({e}): this and later writes go through the page cache"
                    );
                }
                self.local_write(offset, d.buf, false).await
            }
            Err(e) => {
                tracing::error!("backing write at {offset}+{len} (direct) failed: {e}");
                // An engine that stopped hands back an empty buffer: fails all the same.
                (self.disk_fail(errno_of(&e)), d.buf)
            }
        }
    }

    /// A write to the backing device only: the secondary's apply path, and the primary's
    /// local half.
    pub async fn local_write(&self, offset: u64, buf: Buf, fua: bool) -> (Result<(), Errno>, Buf) {
        let len = buf.len() as u64;
        if let Err(e) = self.check(offset, len, true) {
            return (self.fail(e), buf);
        }
        let d = self.io(IoOp::Write { offset, fua }, buf).await;
        match d.result {
            Ok(()) => {
                self.counters.writes.fetch_add(1, Relaxed);
                self.counters.bytes_written.fetch_add(len, Relaxed);
                (Ok(()), d.buf)
            }
            Err(e) => {
                tracing::error!("backing write at {offset}+{len} failed: {e}");
                // A FUA write syncs (fdatasync, or RWF_DSYNC): its error may be an earlier
                // write's lost page, which the kernel reports once per open file, so the
                // next flush would succeed over it. Counted as a failed sync.
                if fua {
                    self.note_sync_failed();
                }
                (self.disk_fail(errno_of(&e)), d.buf)
            }
        }
    }

    /// Zeroes (`trim`: may deallocate) on the backing device only.
    pub async fn local_zero(&self, offset: u64, len: u64, trim: bool) -> Result<(), Errno> {
        self.check(offset, len, true).or_else(|e| self.fail(e))?;
        // A client may zero any byte range (the export's minimum block is 1 without
        // direct-io), but a block device takes `fallocate` only on whole logical blocks
        // (EINVAL otherwise, which is no disk error): the unaligned head and tail are written
        // as zeros, the rest is deallocated or zeroed in place. 4 KiB covers every logical
        // block size the page cache can hold.
        const ALIGN: u64 = 4096;
        let end = offset + len;
        let first = offset.next_multiple_of(ALIGN).min(end);
        let last = (end / ALIGN * ALIGN).max(first);
        self.write_zeros(offset, first - offset).await?;
        // In pieces: where the backing device cannot zero a range at once, zeros are
        // written, and one request (up to the export's size) must not hold it for long.
        const PIECE: u64 = 64 << 20;
        let mut at = first;
        while at < last {
            let (offset, len) = (at, PIECE.min(last - at));
            // A backing device that cannot punch holes still has to read back zeros, so
            // that both replicas hold the same bytes: not an error if zeroing works.
            let punched = trim
                && self
                    .io(IoOp::Discard { offset, len }, Buf::new(0))
                    .await
                    .result
                    .is_ok();
            if !punched {
                self.zero_in_place(offset, len).await?;
            }
            at += len;
        }
        self.write_zeros(last, end - last).await
    }

    /// Zeroes a range in place (`FALLOC_FL_ZERO_RANGE`), or by writing zeros where the
    /// backing device has no such call (tmpfs, some FUSE and network filesystems), which is
    /// then remembered.
    async fn zero_in_place(&self, offset: u64, len: u64) -> Result<(), Errno> {
        if !self.zero_range_unsupported.load(Relaxed) {
            let d = self.io(IoOp::Zero { offset, len }, Buf::new(0)).await;
            match d.result {
                Ok(()) => return Ok(()),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
                    if !self.zero_range_unsupported.swap(true, Relaxed) {
                        tracing::info!(
                            "the backing device cannot zero a range in place ({e}): zeros are written instead"
                        );
                    }
                }
                Err(e) => {
                    tracing::error!("backing zeroing at {offset}+{len} failed: {e}");
                    return self.disk_fail(errno_of(&e));
                }
            }
        }
        self.write_zeros(offset, len).await
    }

    /// Writes zeros over a range through the engine, a MiB at a time (one buffer, handed
    /// back by each write for the next).
    async fn write_zeros(&self, offset: u64, len: u64) -> Result<(), Errno> {
        let mut zeros = Buf::new(len.min(1 << 20) as usize);
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeros.len() as u64);
            if (n as usize) < zeros.len() {
                zeros = Buf::new(n as usize);
            }
            let d = self
                .io(
                    IoOp::Write {
                        offset: at,
                        fua: false,
                    },
                    zeros,
                )
                .await;
            if let Err(e) = d.result {
                tracing::error!("backing write of zeros at {at}+{n} failed: {e}");
                return self.disk_fail(errno_of(&e));
            }
            zeros = d.buf;
            at += n;
        }
        Ok(())
    }

    /// A client TRIM or WRITE_ZEROES, mirrored like a write. Trim deallocates and reads back
    /// zeros on both nodes, so the replicas stay byte-identical.
    async fn zero_range(&self, offset: u64, len: u64, trim: bool, fua: bool) -> Result<(), Errno> {
        self.check(offset, len, true).or_else(|e| self.fail(e))?;
        if len == 0 {
            return Ok(());
        }
        let seq = match &self.rep {
            Some(rep) => match rep.begin(Record::Zero { offset, len, trim }).await {
                Ok(seq) => Some(seq),
                Err(e) => return self.fail(begin_errno(&e)),
            },
            None => None,
        };
        let mut r = self.local_zero(offset, len, trim).await;
        if r.is_ok() && fua {
            r = self.sync_backing().await;
        }
        if let (Some(rep), Some(seq)) = (&self.rep, seq) {
            rep.done(seq);
            if r.is_ok() && fua {
                // A zero record carries no FUA of its own: a flush right behind it makes the
                // peer sync at this point of the stream, and under C the reply waits for
                // that (without it, for the peer's next flush or checkpoint, up to 30 s).
                // Also with the peer away (released without it then, as the zero record
                // would be): a peer back before the release gets the flush in its stream,
                // where a zero record waited for alone would be answered once applied.
                let waited = match rep.begin(Record::Flush).await {
                    Ok(flush) => rep.wait_peer(flush, true).await,
                    Err(e) => Err(e),
                };
                if waited.is_err() {
                    r = self.fail(EIO);
                }
            } else if r.is_ok() {
                if rep.wait_peer(seq, false).await.is_err() {
                    r = self.fail(EIO);
                }
            } else {
                rep.mark_out_of_sync(offset, len);
            }
            rep.al_end(offset, len, seq);
        }
        r
    }

    /// A client's flush: makes every completed write durable, locally, in the journal, and
    /// under protocol C on the peer too. Under A and B the flush travels in the stream, so the
    /// peer flushes at the same point. Held while writes are suspended by fencing (until the
    /// peer is fenced or back), and failed if writes close meanwhile: its answer would say
    /// the writes before it are on the peer's disk under C.
    pub async fn flush(&self) -> Result<(), Errno> {
        if let Some(rep) = &self.rep {
            if rep.io_gate().await.is_err() {
                self.counters.flushes.fetch_add(1, Relaxed);
                return self.fail(EIO);
            }
        }
        self.flush_own().await
    }

    /// [`Self::flush`] for the node itself (a demotion's or `down`'s last flush, with client
    /// writes closed): not held by a suspension, whose held writes were failed unanswered.
    pub async fn flush_own(&self) -> Result<(), Errno> {
        self.counters.flushes.fetch_add(1, Relaxed);
        let Some(rep) = &self.rep else {
            return self.sync_backing().await;
        };
        // With the peer away, a flush is a record only once the data moved on from the peer
        // (see `Replication::diverged_while_away`): a catch-up then carries it as the barrier
        // it was here. Before that, a record would take a sequence number the peer never
        // sees (see `Replication::begin`) and so start a new generation for nothing; nor
        // does the catch-up need it, as the peer has made everything before it durable.
        // Recorded or not, a flush with the peer away waits for no peer: the local and
        // journal syncs are the whole flush (connected, it waits for the peer below).
        let connected = rep.acks().connected;
        let seq = if connected || rep.diverged_while_away() {
            match rep.begin(Record::Flush).await {
                Ok(seq) => Some(seq),
                Err(_) => return self.fail(EIO),
            }
        } else {
            None
        };
        let seq = seq.filter(|_| connected);
        // The data's sync and the journal's at once: with internal metadata they are syncs of
        // one file, which the filesystem serves with one log commit and one cache flush where
        // they meet (one after the other, each paid its own). Both are durable before the
        // flush is answered, so their order does not matter to a crash; the data's own sync
        // still runs at every flush, so a failed writeback of the data is always seen on its
        // descriptor (see `sync_failed`), whoever else synced the file.
        let (data, journal) = tokio::join!(self.sync_backing(), rep.persist());
        data?;
        if let Err(e) = journal {
            tracing::error!("journal sync failed: {e}");
            return self.fail(EIO);
        }
        match seq {
            Some(seq) => {
                if rep.wait_peer(seq, true).await.is_err() {
                    return self.fail(EIO);
                }
            }
            // A peer lost with writes it lacks: the new generation that says so is on disk
            // before this flush says the writes are (it may still be being written, or its
            // write may have failed: then this tries again, and fails the flush if it fails).
            None => {
                if rep.settle_divergence().await.is_err() {
                    return self.fail(EIO);
                }
            }
        }
        Ok(())
    }

    /// Becomes true when a sync of the backing device fails (once per `up`).
    pub fn subscribe_sync_failed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.sync_failed_tx.subscribe()
    }

    /// Whether a sync of the backing device has failed since `up`: writes may be lost on
    /// this disk, and nothing says which. Also a sync whose waiter went away before it
    /// failed (see [`Engine::failed_syncs`]): said here once found.
    pub fn sync_failed(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        if !self.sync_failed.load(SeqCst) {
            let failed = |e: &dyn Engine| e.failed_syncs() > 0;
            if failed(&*self.engine) || self.direct.as_ref().is_some_and(|(e, _)| failed(&**e)) {
                self.note_sync_failed();
            }
        }
        self.sync_failed.load(SeqCst)
    }

    /// fdatasync of the backing device; see `sync_failed`.
    async fn sync_backing(&self) -> Result<(), Errno> {
        if self.sync_failed() {
            return self.fail(EIO);
        }
        let r = self.simple(IoOp::Flush).await;
        if r.is_err() {
            self.note_sync_failed();
            return r;
        }
        // A sync that failed meanwhile for a waiter that went away took the kernel's report
        // of the lost pages: this one passed over them.
        if self.sync_failed() {
            return self.fail(EIO);
        }
        r
    }

    /// A sync of the backing device failed (see `sync_failed`): said once, and every flush
    /// fails from now on.
    fn note_sync_failed(&self) {
        if !self
            .sync_failed
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            tracing::error!(
                "syncing the backing device failed: writes may be lost on this disk; every flush fails from now on (fail over to the peer)"
            );
            if let Some(rep) = &self.rep {
                rep.set_local_sync_failed();
            }
            self.sync_failed_tx.send_replace(true);
            crate::bell::ring();
        }
    }

    /// fdatasync of the backing device alone (the secondary's barrier): counted with the
    /// flushes, as the stream's writes it applies are with the writes.
    pub async fn local_flush(&self) -> Result<(), Errno> {
        self.counters.flushes.fetch_add(1, Relaxed);
        self.sync_backing().await
    }

    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), Errno> {
        self.counters.trims.fetch_add(1, Relaxed);
        // A trim past the end is EINVAL (the spec's rule for reads and trims), not ENOSPC.
        self.check(offset, len, false).or_else(|e| self.fail(e))?;
        self.zero_range(offset, len, true, fua).await
    }

    /// Zeroes a range; `may_trim` (no NO_HOLE flag) lets it deallocate.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), Errno> {
        self.counters.zeroes.fetch_add(1, Relaxed);
        self.zero_range(offset, len, may_trim, fua).await
    }

    async fn simple(&self, op: IoOp) -> Result<(), Errno> {
        let d = self.io(op, Buf::new(0)).await;
        match d.result {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::error!("backing {op:?} failed: {e}");
                self.disk_fail(errno_of(&e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IoEngineChoice;
    use crate::test_dir::TestDir;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};

    fn filled(len: usize, byte: u8) -> Buf {
        let mut b = Buf::new(len);
        b.fill(byte);
        b
    }

    /// The direct path exists only with 4 KiB pages (see [`Device::with_direct_writes`]).
    fn four_k_pages() -> bool {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page != 4096 {
            eprintln!("SKIP: pages are {page} bytes here: no direct path");
        }
        page == 4096
    }

    fn scratch_file(name: &str) -> (TestDir, std::path::PathBuf, std::fs::File) {
        crate::engine::tests::scratch_file(&format!("dev-{name}"), 8 << 20)
    }

    fn read_back(p: &std::path::Path, len: usize) -> Vec<u8> {
        let f = std::fs::File::open(p).expect("open");
        let mut got = vec![0u8; len];
        f.read_exact_at(&mut got, 0).expect("read back");
        got
    }

    /// An engine standing for a direct descriptor that fails every request with `errno`
    /// (handing the buffer back), or drops them (an engine that stopped) when `errno` is 0.
    struct Failing {
        errno: i32,
        calls: AtomicU64,
    }

    impl Engine for Failing {
        fn name(&self) -> &'static str {
            "failing"
        }
        fn submit(&self, _op: IoOp, buf: Buf) -> tokio::sync::oneshot::Receiver<engine::IoDone> {
            self.calls.fetch_add(1, Relaxed);
            let (tx, rx) = tokio::sync::oneshot::channel();
            if self.errno != 0 {
                let _ = tx.send(engine::IoDone {
                    result: Err(std::io::Error::from_raw_os_error(self.errno)),
                    buf,
                });
            }
            rx
        }
        fn failed_syncs(&self) -> u64 {
            0
        }
    }

    /// A device over an 8 MiB scratch file through the page cache, whose direct engine fails
    /// with `errno` (see [`Failing`]).
    fn failing_direct(
        name: &str,
        errno: i32,
    ) -> (TestDir, std::path::PathBuf, Device, Arc<Failing>) {
        let (dir, p, f) = scratch_file(name);
        let f = Arc::new(f);
        let engine = crate::engine::open(f.clone(), IoEngineChoice::Auto).expect("engine");
        let failing = Arc::new(Failing {
            errno,
            calls: AtomicU64::new(0),
        });
        let dev = Device::new(engine, None, (8 << 20) - 4096, false)
            .with_direct_writes(failing.clone(), f);
        (dir, p, dev, failing)
    }

    /// Large aligned writes go direct and hold the 2 MiB spans around them; small and
    /// unaligned ones go through the page cache; a sequence of writes through both paths leaves
    /// the bytes of the last one, read back through the page cache.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn secondary_writes_through_both_paths_read_back_in_order() {
        if !four_k_pages() {
            return;
        }
        let (_dir, p, f) = scratch_file("mixed");
        let direct = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&p)
        {
            Ok(d) => Arc::new(d),
            Err(e) => {
                eprintln!("SKIP: O_DIRECT refused on {}: {e}", p.display());
                return;
            }
        };
        let engine = crate::engine::open(Arc::new(f), IoEngineChoice::Auto).expect("engine");
        let dengine = crate::engine::open(direct.clone(), IoEngineChoice::Auto).expect("direct");
        let dev =
            Device::new(engine, None, (8 << 20) - 4096, false).with_direct_writes(dengine, direct);
        assert_eq!(dev.direct_span(0, 256 << 10), Some((0, 2 << 20)));
        assert_eq!(
            dev.direct_span((2 << 20) - 4096, 64 << 10),
            Some((0, 4 << 20)),
            "a write across a 2 MiB boundary holds both spans"
        );
        assert_eq!(dev.direct_span(0, 60 << 10), None, "small: page cache");
        assert_eq!(
            dev.direct_span(512, 128 << 10),
            None,
            "unaligned: page cache"
        );
        assert_eq!(
            dev.direct_span((7 << 20) + (512 << 10), 256 << 10),
            None,
            "its 2 MiB span reaches past the 8 MiB - 4 KiB export: page cache"
        );
        // Cached first (a small write), then a direct write over it, then a small one again.
        let (r, _) = dev.apply_write(64 << 10, filled(4096, 1)).await;
        r.expect("small write");
        let (r, _) = dev.apply_write(0, filled(256 << 10, 2)).await;
        r.expect("direct write");
        let (r, _) = dev.apply_write(128 << 10, filled(4096, 3)).await;
        r.expect("small write after");
        let (r, _) = dev.apply_write((1 << 20) + 512, filled(128 << 10, 4)).await;
        r.expect("unaligned write");
        assert_eq!(dev.direct_writes.load(Relaxed), 1, "one write went direct");
        assert_eq!(dev.io_counters().writes, 4);
        let mut want = vec![0u8; 2 << 20];
        want[..256 << 10].fill(2);
        want[128 << 10..(128 << 10) + 4096].fill(3);
        want[(1 << 20) + 512..(1 << 20) + 512 + (128 << 10)].fill(4);
        assert!(
            read_back(&p, 2 << 20) == want,
            "the file holds what the writes left, in order"
        );
    }

    /// A device that refuses direct writes gets them through the page cache: the write
    /// succeeds, is no disk error, and later writes no longer try the direct path.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_direct_write_goes_through_the_page_cache_from_then_on() {
        if !four_k_pages() {
            return;
        }
        let (_dir, p, dev, failing) = failing_direct("refused", libc::EINVAL);
        let (r, _) = dev.apply_write(0, filled(128 << 10, 7)).await;
        r.expect("the write succeeds through the page cache");
        let (r, _) = dev.apply_write(1 << 20, filled(128 << 10, 8)).await;
        r.expect("and so does the next");
        assert_eq!(failing.calls.load(Relaxed), 1, "tried direct once only");
        assert_eq!(
            dev.direct_span(0, 128 << 10),
            None,
            "no direct span any more"
        );
        assert_eq!(dev.io_counters().disk_errors, 0, "not a disk error");
        let got = read_back(&p, 2 << 20);
        assert!(got[..128 << 10].iter().all(|&b| b == 7));
        assert!(got[1 << 20..(1 << 20) + (128 << 10)]
            .iter()
            .all(|&b| b == 8));
    }

    /// A direct write that fails otherwise (EIO), or that its engine drops, fails as a disk
    /// error: never done through the page cache, which would hide the error, nor with the
    /// empty buffer a stopped engine hands back (a write reported done that wrote nothing).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_or_dropped_direct_write_is_a_disk_error() {
        if !four_k_pages() {
            return;
        }
        for (name, errno) in [("eio", libc::EIO), ("dropped", 0)] {
            let (_dir, p, dev, failing) = failing_direct(name, errno);
            let (r, _) = dev.apply_write(0, filled(128 << 10, 9)).await;
            assert_eq!(r, Err(EIO), "{name}: the write fails");
            assert_eq!(failing.calls.load(Relaxed), 1);
            assert_eq!(dev.io_counters().disk_errors, 1, "{name}: counted");
            assert!(
                read_back(&p, 128 << 10).iter().all(|&b| b == 0),
                "{name}: nothing written through the page cache"
            );
        }
    }

    /// An engine that refuses to deallocate or zero in place with `errno` (EINVAL: a block
    /// device asked for a range off its logical blocks; EOPNOTSUPP: tmpfs), passing every
    /// other request to `inner`.
    struct NoFallocate {
        inner: Arc<dyn Engine>,
        errno: i32,
    }

    impl Engine for NoFallocate {
        fn name(&self) -> &'static str {
            "no-fallocate"
        }
        fn submit(&self, op: IoOp, buf: Buf) -> tokio::sync::oneshot::Receiver<engine::IoDone> {
            if let IoOp::Discard { .. } | IoOp::Zero { .. } = op {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let _ = tx.send(engine::IoDone {
                    result: Err(std::io::Error::from_raw_os_error(self.errno)),
                    buf,
                });
                return rx;
            }
            self.inner.submit(op, buf)
        }
        fn failed_syncs(&self) -> u64 {
            self.inner.failed_syncs()
        }
    }

    /// A client may zero or trim any byte range, and a block device takes `fallocate` only on
    /// whole logical blocks: the unaligned head and tail are written as zeros and a refused
    /// `fallocate` is no disk error. Before (review finding), an unaligned trim on a loop
    /// device failed as a disk error on the primary and knocked the secondary out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn zeros_and_trims_off_the_devices_blocks_read_back_as_zeros() {
        for errno in [libc::EINVAL, libc::EOPNOTSUPP] {
            let (_dir, p, f) = scratch_file(&format!("zero-{errno}"));
            f.write_all_at(&vec![7u8; 8 << 20], 0).expect("fill");
            let inner = crate::engine::open(Arc::new(f), IoEngineChoice::Auto).expect("engine");
            let engine = Arc::new(NoFallocate { inner, errno });
            let dev = Device::new(engine, None, (8 << 20) - 4096, false);
            let ranges = [
                (100, 3 * 4096 + 50, true),
                ((3 << 20) + 1, 70_000, false),
                ((5 << 20) + 7, 9, true),
                (6 << 20, 4096, false),
            ];
            for (offset, len, trim) in ranges {
                dev.local_zero(offset, len, trim)
                    .await
                    .unwrap_or_else(|e| panic!("{errno}: zero {offset}+{len}: {e:?}"));
            }
            assert_eq!(*dev.subscribe_disk_errors().borrow(), 0, "{errno}");
            let mut want = vec![7u8; 8 << 20];
            for (offset, len, _) in ranges {
                want[offset as usize..(offset + len) as usize].fill(0);
            }
            assert!(read_back(&p, 8 << 20) == want, "{errno}: bytes differ");
        }
    }

    /// Zeros written by hand (no in-place zeroing) come from an aligned buffer, so that a
    /// direct-I/O device takes them: before, every such write failed with EINVAL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn zeros_written_by_hand_go_through_a_direct_io_device() {
        let dir = TestDir::new("brdev-zeros-direct");
        let p = dir.join("file");
        let Some(f) = crate::engine::tests::direct_file(&p, 3 << 20) else {
            return;
        };
        let inner = crate::engine::open(Arc::new(f), IoEngineChoice::Auto).expect("engine");
        let engine = Arc::new(NoFallocate {
            inner,
            errno: libc::EOPNOTSUPP,
        });
        let dev = Device::new(engine, None, 3 << 20, true);
        dev.local_zero(4096, (2 << 20) + 8192, false)
            .await
            .expect("zero through O_DIRECT");
        drop(dev);
        let back = std::fs::read(&p).expect("read back");
        assert!(back[..4096].iter().all(|&x| x == 7));
        assert!(back[4096..4096 + (2 << 20) + 8192].iter().all(|&x| x == 0));
        assert!(back[4096 + (2 << 20) + 8192..].iter().all(|&x| x == 7));
    }

    /// An engine whose first flush is held until [`Self::fail_held`] fails it (counted
    /// where it completes, as a real engine counts it), and whose later ones succeed: the
    /// kernel reports a page it could not write back once per open file.
    struct FirstFlushFails {
        inner: Arc<dyn Engine>,
        flushes: AtomicU64,
        held: std::sync::Mutex<Option<(tokio::sync::oneshot::Sender<engine::IoDone>, Buf)>>,
        failed: AtomicU64,
    }

    impl FirstFlushFails {
        fn fail_held(&self) {
            let held = self.held.lock().expect("lock").take();
            let (tx, buf) = held.expect("a flush is held");
            self.failed.fetch_add(1, Relaxed);
            let _ = tx.send(engine::IoDone {
                result: Err(std::io::Error::from_raw_os_error(libc::EIO)),
                buf,
            });
        }
    }

    impl Engine for FirstFlushFails {
        fn name(&self) -> &'static str {
            "first-flush-fails"
        }
        fn submit(&self, op: IoOp, buf: Buf) -> tokio::sync::oneshot::Receiver<engine::IoDone> {
            if op == IoOp::Flush && self.flushes.fetch_add(1, Relaxed) == 0 {
                let (tx, rx) = tokio::sync::oneshot::channel();
                *self.held.lock().expect("lock") = Some((tx, buf));
                return rx;
            }
            self.inner.submit(op, buf)
        }
        fn failed_syncs(&self) -> u64 {
            self.failed.load(Relaxed)
        }
    }

    /// A flush that failed after its waiter went away (a connection's task aborted while it
    /// synced) still fails every later flush: before (review finding), nobody saw the error
    /// and the next flush, which the kernel no longer told of the lost pages, succeeded, so a
    /// secondary committed and acknowledged as durable writes its disk had lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_flush_nobody_waited_for_fails_the_next_one() {
        let (_dir, _p, f) = scratch_file("lost-flush");
        let inner = crate::engine::open(Arc::new(f), IoEngineChoice::Auto).expect("engine");
        let engine = Arc::new(FirstFlushFails {
            inner,
            flushes: AtomicU64::new(0),
            held: std::sync::Mutex::new(None),
            failed: AtomicU64::new(0),
        });
        let dev = Device::new(engine.clone(), None, (8 << 20) - 4096, false);
        {
            // Submitted (polled once, pending), then dropped.
            let mut flush = Box::pin(dev.local_flush());
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            assert!(std::future::Future::poll(flush.as_mut(), &mut cx).is_pending());
        }
        engine.fail_held();
        assert!(
            dev.local_flush().await.is_err(),
            "a flush after a failed one passed"
        );
        assert!(dev.sync_failed());
        assert_eq!(engine.flushes.load(Relaxed), 1, "refused without a sync");
    }

    /// Both engines count a failed sync where it completes, with nobody waiting for it
    /// (fdatasync of a pipe fails with EINVAL).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn engines_count_failed_syncs_nobody_waited_for() {
        for choice in [IoEngineChoice::Sync, IoEngineChoice::IoUring] {
            let (r, w) = nix::unistd::pipe().expect("pipe");
            drop(r);
            let engine = match crate::engine::open(Arc::new(std::fs::File::from(w)), choice) {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("SKIP: {choice:?} engine: {e}");
                    continue;
                }
            };
            drop(engine.submit(IoOp::Flush, Buf::new(0)));
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while engine.failed_syncs() == 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{choice:?}: the failed flush was not counted"
                );
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            assert_eq!(engine.failed_syncs(), 1, "{choice:?}");
        }
    }
}
