//! Backing-store I/O: one engine interface, two implementations.
//!
//! - [`UringEngine`]: one thread owns an io_uring; requests arrive on a bounded channel and are
//!   submitted in batches (one `io_uring_enter` for everything queued since the last one).
//! - [`SyncEngine`]: a small pool of threads doing pread/pwrite/fdatasync, for kernels that refuse
//!   io_uring (seccomp, `kernel.io_uring_disabled`).
//!
//! The device logic sees only [`Engine`]: it submits an [`IoOp`] with a buffer and awaits the
//! buffer back with the result.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::buf::Buf;

/// One backing-store operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// Read `buf.len()` bytes at the offset.
    Read { offset: u64 },
    /// Write `buf` at the offset; `fua`: durable before completion (RWF_DSYNC).
    Write { offset: u64, fua: bool },
    /// fdatasync: everything completed before is durable after.
    Flush,
    /// Deallocate (reads back zeros on files and on devices that support it).
    Discard { offset: u64, len: u64 },
    /// Zero the range, without deallocating it.
    Zero { offset: u64, len: u64 },
}

/// A finished operation: the result and the buffer handed in.
pub struct IoDone {
    pub result: io::Result<()>,
    pub buf: Buf,
}

struct IoReq {
    op: IoOp,
    buf: Buf,
    done: oneshot::Sender<IoDone>,
}

/// The interface every backing engine implements.
pub trait Engine: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Queues an operation; the completion arrives on the returned receiver.
    fn submit(&self, op: IoOp, buf: Buf) -> oneshot::Receiver<IoDone>;
    /// Syncs (flushes, FUA writes) that failed so far, counted where they complete, whoever
    /// waited for them: the kernel reports a page it could not write back once per open
    /// file, so a failed sync whose waiter went away (a connection's task aborted midway)
    /// must still stop the next sync from passing for a good one.
    fn failed_syncs(&self) -> u64;
}

/// Whether `op` makes earlier writes durable (see [`Engine::failed_syncs`]).
fn syncs(op: IoOp) -> bool {
    matches!(op, IoOp::Flush | IoOp::Write { fua: true, .. })
}

/// Runs one operation to completion.
pub async fn run(engine: &dyn Engine, op: IoOp, buf: Buf) -> IoDone {
    match engine.submit(op, buf).await {
        Ok(d) => d,
        Err(_) => IoDone {
            result: Err(io::Error::other("I/O engine stopped")),
            // The engine dropped the request (shutting down): hand back an empty buffer.
            buf: Buf::new(0),
        },
    }
}

const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

/// The synchronous body of one operation, shared by the sync engine and by fallbacks.
fn do_sync(fd: RawFd, op: IoOp, buf: &mut Buf) -> io::Result<()> {
    use nix::sys::uio::{pread, pwrite};
    let bfd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    match op {
        IoOp::Read { offset } => {
            let mut done = 0usize;
            while done < buf.len() {
                let n = match pread(bfd, &mut buf[done..], (offset + done as u64) as i64) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    r => r?,
                };
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "read past the end of the backing device",
                    ));
                }
                done += n;
            }
            Ok(())
        }
        IoOp::Write { offset, fua } => {
            let mut done = 0usize;
            while done < buf.len() {
                let n = match pwrite(bfd, &buf[done..], (offset + done as u64) as i64) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    r => r?,
                };
                if n == 0 {
                    return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
                }
                done += n;
            }
            if fua {
                nix::unistd::fdatasync(fd)?;
            }
            Ok(())
        }
        IoOp::Flush => Ok(nix::unistd::fdatasync(fd)?),
        IoOp::Discard { offset, len } => {
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len)
        }
        // Where the device has no in-place zeroing, the error goes back to the caller, who
        // writes zeros through the engine (`Device::local_zero`).
        IoOp::Zero { offset, len } => {
            fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, len)
        }
    }
}

fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid descriptor.
    let r = unsafe { libc::fallocate(fd, mode, offset as i64, len as i64) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The fallback engine: `threads` workers doing synchronous calls.
pub struct SyncEngine {
    tx: Mutex<Option<SyncSender<IoReq>>>,
    workers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    failed_syncs: Arc<std::sync::atomic::AtomicU64>,
}

impl SyncEngine {
    pub fn new(file: Arc<File>, threads: usize, queue: usize) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<IoReq>(queue);
        let rx = Arc::new(Mutex::new(rx));
        let failed_syncs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let file = file.clone();
            let failed = failed_syncs.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("blockrep-io-{i}"))
                    .spawn(move || loop {
                        let req = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return,
                        };
                        let Ok(mut req) = req else { return };
                        let result = do_sync(file.as_raw_fd(), req.op, &mut req.buf);
                        if result.is_err() && syncs(req.op) {
                            failed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        let _ = req.done.send(IoDone {
                            result,
                            buf: req.buf,
                        });
                    })?,
            );
        }
        Ok(SyncEngine {
            tx: Mutex::new(Some(tx)),
            workers: Mutex::new(workers),
            failed_syncs,
        })
    }
}

impl Drop for SyncEngine {
    fn drop(&mut self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Ok(mut w) = self.workers.lock() {
            for h in w.drain(..) {
                let _ = h.join();
            }
        }
    }
}

impl Engine for SyncEngine {
    fn name(&self) -> &'static str {
        "sync"
    }

    fn submit(&self, op: IoOp, buf: Buf) -> oneshot::Receiver<IoDone> {
        let (done, rx) = oneshot::channel();
        let tx = self.tx.lock().ok().and_then(|t| t.clone());
        if let Some(tx) = tx {
            // A full queue blocks the submitter briefly; callers bound their in-flight requests
            // below the queue size, so this is a backstop, not the flow control.
            let _ = tx.send(IoReq { op, buf, done });
        }
        rx
    }

    fn failed_syncs(&self) -> u64 {
        self.failed_syncs.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The io_uring engine. No thread of its own: the tokio worker that submits pushes the SQE and
/// enters the kernel (which often completes page-cache I/O right there), and completions are
/// reaped by a task woken through an eventfd registered with the ring, so a request costs no
/// thread hand-off on the way in.
pub struct UringEngine {
    state: Arc<Mutex<RingState>>,
    reaper: tokio::task::JoinHandle<()>,
}

struct RingState {
    ring: io_uring::IoUring,
    fd: RawFd,
    /// Buffered (not O_DIRECT) file: plain writes are page-cache copies.
    buffered: bool,
    _file: Arc<File>,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Requests waiting for a free slot (bounded by the callers' in-flight limits).
    backlog: std::collections::VecDeque<IoReq>,
    /// See [`Engine::failed_syncs`].
    failed_syncs: u64,
}

impl UringEngine {
    /// Builds the ring, failing (so the caller can fall back) if the kernel refuses io_uring.
    /// Must be called inside a tokio runtime.
    pub fn new(file: Arc<File>, entries: u32) -> io::Result<Self> {
        let mut ring = io_uring::IoUring::new(entries)?;
        // Probe with a NOP so a seccomp filter that allows setup but not enter is caught here.
        let nop = io_uring::opcode::Nop::new().build().user_data(u64::MAX);
        // SAFETY: NOP has no buffers.
        unsafe { ring.submission().push(&nop) }.map_err(|_| io::Error::other("sq full"))?;
        ring.submit_and_wait(1)?;
        ring.completion().for_each(drop);
        // The operations this engine sends came after io_uring itself (5.6): a kernel that
        // sets up a ring but would fail every read with EINVAL takes the fallback instead.
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        use io_uring::opcode::{Fallocate, Fsync, Read, Write};
        for (name, code) in [
            ("read", Read::CODE),
            ("write", Write::CODE),
            ("fsync", Fsync::CODE),
            ("fallocate", Fallocate::CODE),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("this kernel's io_uring has no {name} operation"),
                ));
            }
        }
        // SAFETY: eventfd returns a fresh descriptor or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a valid descriptor we own.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        // Every completion signals the eventfd. (The async-only variant signals only for
        // completions posted by io-wq workers; O_DIRECT and retried buffered I/O complete
        // through task work instead, and would then wait for unrelated I/O to be reaped.)
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        let cap = ring.params().sq_entries() as usize;
        // SAFETY: F_GETFL on a valid descriptor.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        let buffered = flags >= 0 && flags & libc::O_DIRECT == 0;
        let state = Arc::new(Mutex::new(RingState {
            ring,
            fd: file.as_raw_fd(),
            buffered,
            _file: file,
            slots: (0..cap).map(|_| None).collect(),
            free: (0..cap).rev().collect(),
            backlog: std::collections::VecDeque::new(),
            failed_syncs: 0,
        }));
        // SAFETY: the eventfd is owned by the AsyncFd, which deregisters it before closing.
        let afd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(efd, tokio::io::Interest::READABLE)
        }
        .map_err(|e| io::Error::other(e.to_string()))?;
        let reaper = tokio::spawn(reap(state.clone(), afd));
        Ok(UringEngine { state, reaper })
    }
}

impl RingState {
    /// Pushes as many backlog requests as there are free slots, then enters the kernel once.
    fn pump(&mut self) {
        let mut pushed = false;
        while let Some(&slot) = self.free.last() {
            let Some(req) = self.backlog.pop_front() else {
                break;
            };
            self.free.pop();
            let mut f = InFlight {
                req,
                progress: 0,
                retries: 0,
            };
            let e = build_sqe(self.fd, slot, &mut f);
            self.slots[slot] = Some(f);
            // SAFETY: the buffer lives in `slots` until its completion is reaped.
            if unsafe { self.ring.submission().push(&e) }.is_err() {
                // Cannot happen: one SQ entry per slot. Put it back rather than lose it.
                if let Some(f) = self.slots[slot].take() {
                    self.backlog.push_front(f.req);
                }
                self.free.push(slot);
                break;
            }
            pushed = true;
        }
        // Also entries an earlier submit left (the kernel took only some, or refused for
        // want of memory): they go again here, and the reaper comes back for them.
        if pushed || !self.ring.submission().is_empty() {
            if let Err(e) = self.ring.submit() {
                tracing::error!("io_uring submit failed: {e}");
            }
        }
    }

    /// Completes what the kernel has finished, submits what waits, and repeats until nothing
    /// more completes: a submission often completes inline, and handing it back here saves the
    /// reaper's wake-up.
    fn drive(&mut self) {
        loop {
            self.pump();
            if !self.reap() {
                return;
            }
        }
    }

    /// Completes what the kernel has finished; resubmits short transfers. Returns whether
    /// anything completed.
    fn reap(&mut self) -> bool {
        let cq: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        if cq.is_empty() {
            return false;
        }
        let mut resubmit = false;
        for (token, res) in cq {
            let slot = token as usize;
            let Some(mut f) = self.slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            let is_rw = matches!(f.req.op, IoOp::Read { .. } | IoOp::Write { .. });
            let transient = res == -libc::EAGAIN || res == -libc::EINTR;
            let result = if transient && f.retries < 16 {
                f.retries += 1;
                // Transient (a nowait attempt, a signal): the same request again, not an
                // error for the client.
                let e = build_sqe(self.fd, slot, &mut f);
                self.slots[slot] = Some(f);
                // SAFETY: as in pump.
                let _ = unsafe { self.ring.submission().push(&e) };
                resubmit = true;
                continue;
            } else if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else if is_rw && (res as usize) + f.progress < f.req.buf.len() {
                if res == 0 {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "short transfer at the end of the backing device",
                    ))
                } else {
                    f.progress += res as usize;
                    let e = build_sqe(self.fd, slot, &mut f);
                    self.slots[slot] = Some(f);
                    // SAFETY: as in pump.
                    let _ = unsafe { self.ring.submission().push(&e) };
                    resubmit = true;
                    continue;
                }
            } else {
                Ok(())
            };
            self.free.push(slot);
            if result.is_err() && syncs(f.req.op) {
                self.failed_syncs += 1;
            }
            let _ = f.req.done.send(IoDone {
                result,
                buf: f.req.buf,
            });
        }
        if resubmit {
            let _ = self.ring.submit();
        }
        true
    }
}

async fn reap(state: Arc<Mutex<RingState>>, afd: tokio::io::unix::AsyncFd<OwnedFd>) {
    loop {
        // Entries the kernel did not take yet complete nothing, so no wake-up would come for
        // them: looked at again shortly (see `pump`).
        let unsubmitted = state
            .lock()
            .map(|mut st| !st.ring.submission().is_empty())
            .unwrap_or(false);
        let ready = if unsubmitted {
            match tokio::time::timeout(Duration::from_millis(5), afd.readable()).await {
                Ok(r) => r,
                Err(_) => {
                    if let Ok(mut st) = state.lock() {
                        st.drive();
                    }
                    continue;
                }
            }
        } else {
            afd.readable().await
        };
        let mut guard = match ready {
            Ok(g) => g,
            Err(e) => {
                tracing::error!("io_uring eventfd: {e}");
                return;
            }
        };
        let mut cnt = [0u8; 8];
        // SAFETY: reading 8 bytes from a non-blocking eventfd into a local buffer.
        let n = unsafe {
            libc::read(
                afd.get_ref().as_raw_fd(),
                cnt.as_mut_ptr() as *mut libc::c_void,
                8,
            )
        };
        if n < 0 {
            guard.clear_ready();
        }
        if let Ok(mut st) = state.lock() {
            st.drive();
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.reaper.abort();
        // The kernel may still write into buffers of in-flight reads: wait for all of them,
        // through signals and a poisoned lock; only a ring the kernel refuses to wait on any
        // more ends the wait (then the buffers are leaked, never freed under the kernel).
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        {
            let cap = st.slots.len();
            while st.free.len() < cap {
                match st.ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                        ) => {}
                    Err(e) => {
                        tracing::error!(
                            "io_uring: cannot wait for in-flight I/O at shutdown ({e}): leaking its buffers"
                        );
                        for f in st.slots.iter_mut().filter_map(Option::take) {
                            std::mem::forget(f);
                        }
                        break;
                    }
                }
                st.reap();
            }
        }
    }
}

impl Engine for UringEngine {
    fn name(&self) -> &'static str {
        "io-uring"
    }

    fn submit(&self, op: IoOp, mut buf: Buf) -> oneshot::Receiver<IoDone> {
        let (done, rx) = oneshot::channel();
        if let Ok(mut st) = self.state.lock() {
            // A buffered write that is not FUA is a copy into the page cache. Filesystems
            // without async buffered writes (ext4) make io_uring punt it to a kernel worker
            // thread, a hand-off that costs more than a small copy: do small ones here instead.
            // Large ones go to the worker, so their copy runs beside the (single) runtime
            // thread instead of holding up every other request.
            if st.buffered
                && matches!(op, IoOp::Write { fua: false, .. })
                && buf.len() <= INLINE_WRITE_MAX
            {
                let fd = st.fd;
                drop(st);
                let result = do_sync(fd, op, &mut buf);
                let _ = done.send(IoDone { result, buf });
                return rx;
            }
            st.backlog.push_back(IoReq { op, buf, done });
            // Page-cache I/O often completes inside the submit: hand it back now, with no
            // wake-up of the reaper.
            st.drive();
        }
        rx
    }

    fn failed_syncs(&self) -> u64 {
        // A poisoned lock: the ring is gone, and so is any way to sync through it.
        self.state.lock().map_or(u64::MAX, |st| st.failed_syncs)
    }
}

/// Largest buffered write copied into the page cache on the submitting thread.
const INLINE_WRITE_MAX: usize = 64 * 1024;

/// A request in the ring, with how far a short transfer has got.
struct InFlight {
    req: IoReq,
    progress: usize,
    /// Resubmissions after EAGAIN/EINTR (bounded: a device that keeps refusing fails it).
    retries: u8,
}

fn build_sqe(fd: RawFd, slot: usize, f: &mut InFlight) -> io_uring::squeue::Entry {
    use io_uring::{opcode, types};
    let fd = types::Fd(fd);
    let p = f.progress;
    let e = match f.req.op {
        IoOp::Read { offset } => {
            let len = (f.req.buf.len() - p) as u32;
            // SAFETY (for the ring): the buffer lives in `InFlight` until its completion.
            let ptr = unsafe { f.req.buf.as_mut_ptr().add(p) };
            opcode::Read::new(fd, ptr, len)
                .offset(offset + p as u64)
                .build()
        }
        IoOp::Write { offset, fua } => {
            let len = (f.req.buf.len() - p) as u32;
            // SAFETY: as above.
            let ptr = unsafe { f.req.buf.as_ptr().add(p) };
            opcode::Write::new(fd, ptr, len)
                .offset(offset + p as u64)
                .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                .build()
        }
        IoOp::Flush => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        IoOp::Discard { offset, len } => opcode::Fallocate::new(fd, len)
            .offset(offset)
            .mode(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
            .build(),
        IoOp::Zero { offset, len } => opcode::Fallocate::new(fd, len)
            .offset(offset)
            .mode(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
            .build(),
    };
    let e = e.user_data(slot as u64);
    // A retry after EAGAIN goes to the kernel's workers, which may block: a busy device
    // then waits instead of refusing the same attempt again at once.
    if f.retries > 0 {
        e.flags(io_uring::squeue::Flags::ASYNC)
    } else {
        e
    }
}

/// Opens the engine the config asks for; `auto` tries io_uring and falls back to sync.
pub fn open(file: Arc<File>, choice: crate::config::IoEngineChoice) -> io::Result<Arc<dyn Engine>> {
    use crate::config::IoEngineChoice::*;
    const QUEUE: usize = 4096;
    match choice {
        Sync => Ok(Arc::new(SyncEngine::new(file, 4, QUEUE)?)),
        IoUring => Ok(Arc::new(UringEngine::new(file, 512)?)),
        Auto => match UringEngine::new(file.clone(), 512) {
            Ok(e) => Ok(Arc::new(e)),
            Err(e) => {
                tracing::warn!("io_uring unavailable ({e}); using the pread/pwrite engine");
                Ok(Arc::new(SyncEngine::new(file, 4, QUEUE)?))
            }
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::test_dir::TestDir;

    async fn exercise(engine: Arc<dyn Engine>) {
        // Many writes in flight, then read each back.
        let mut rxs = Vec::new();
        for i in 0..200u64 {
            let mut b = Buf::new(4096);
            b.fill((i % 251) as u8);
            rxs.push(engine.submit(
                IoOp::Write {
                    offset: i * 4096,
                    fua: i % 50 == 0,
                },
                b,
            ));
        }
        for rx in rxs {
            rx.await.unwrap().result.unwrap();
        }
        run(&*engine, IoOp::Flush, Buf::new(0))
            .await
            .result
            .unwrap();
        for i in 0..200u64 {
            let d = run(&*engine, IoOp::Read { offset: i * 4096 }, Buf::new(4096)).await;
            d.result.unwrap();
            assert!(d.buf.iter().all(|&x| x == (i % 251) as u8), "block {i}");
        }
        let zeroed = run(
            &*engine,
            IoOp::Zero {
                offset: 4096,
                len: 8192,
            },
            Buf::new(0),
        )
        .await
        .result;
        match zeroed {
            Ok(()) => {}
            // A filesystem without in-place zeroing (tmpfs): the device writes zeros
            // instead (`Device::local_zero`); here, so that the checks below hold.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                run(
                    &*engine,
                    IoOp::Write {
                        offset: 4096,
                        fua: false,
                    },
                    Buf::new(8192),
                )
                .await
                .result
                .unwrap();
            }
            Err(e) => panic!("zeroing: {e}"),
        }
        run(
            &*engine,
            IoOp::Discard {
                offset: 16384,
                len: 4096,
            },
            Buf::new(0),
        )
        .await
        .result
        .unwrap();
        let d = run(&*engine, IoOp::Read { offset: 0 }, Buf::new(5 * 4096)).await;
        d.result.unwrap();
        assert!(d.buf[..4096].iter().all(|&x| x == 0));
        assert!(d.buf[4096..12288].iter().all(|&x| x == 0));
        assert!(d.buf[12288..16384].iter().all(|&x| x == 3));
        assert!(d.buf[16384..].iter().all(|&x| x == 0));
        // Reading past the end is an error, not a hang or a panic.
        let d = run(&*engine, IoOp::Read { offset: 1 << 30 }, Buf::new(4096)).await;
        assert!(d.result.is_err());
    }

    /// A fresh file of `len` bytes in a [`TestDir`] named for the test, for the unit tests of
    /// this crate that need a real file: the directory (and the file) go when it is dropped.
    pub(crate) fn scratch_file(name: &str, len: u64) -> (TestDir, std::path::PathBuf, File) {
        let dir = TestDir::new(&format!("brtest-{name}"));
        let p = dir.join("file");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .expect("scratch file");
        f.set_len(len).expect("scratch file size");
        (dir, p, f)
    }

    fn file(name: &str) -> (TestDir, Arc<File>) {
        let (dir, _, f) = scratch_file(&format!("engine-{name}"), 1 << 20);
        (dir, Arc::new(f))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sync_engine_round_trip() {
        let (_dir, f) = file("sync");
        exercise(Arc::new(SyncEngine::new(f, 3, 64).unwrap())).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_engine_round_trip() {
        let (_dir, f) = file("uring");
        match UringEngine::new(f, 64) {
            Ok(e) => exercise(Arc::new(e)).await,
            Err(e) => eprintln!("SKIP: io_uring refused here: {e}"),
        }
    }

    /// A file of `len` bytes of 7s at `p`, opened with O_DIRECT; `None` (said) where the
    /// filesystem refuses O_DIRECT.
    pub fn direct_file(p: &std::path::Path, len: usize) -> Option<File> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::write(p, vec![7u8; len]).unwrap();
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(p);
        match opened {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("SKIP: O_DIRECT refused on {}: {e}", p.display());
                None
            }
        }
    }

    /// O_DIRECT completions arrive through task work, not from io-wq: with nothing else in
    /// flight, the reaper alone must complete them (an async-only eventfd never fired here).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_direct_reads_complete_without_other_io() {
        let dir = TestDir::new("brengine-direct");
        let p = dir.join("file");
        let Some(f) = direct_file(&p, 1 << 20) else {
            return;
        };
        let e = match UringEngine::new(Arc::new(f), 64) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("SKIP: io_uring refused here: {e}");
                return;
            }
        };
        for i in 0..16u64 {
            let op = IoOp::Read { offset: i * 65536 };
            let d = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                run(&e, op, Buf::new(65536)),
            )
            .await;
            let d = d.unwrap_or_else(|_| panic!("O_DIRECT read {i} never completed"));
            d.result.unwrap();
            assert!(d.buf.iter().all(|&x| x == 7), "read {i}");
        }
    }
}
