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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};

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
                let n = pread(bfd, &mut buf[done..], (offset + done as u64) as i64)?;
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
                let n = pwrite(bfd, &buf[done..], (offset + done as u64) as i64)?;
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
        IoOp::Zero { offset, len } => {
            match fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, len) {
                Ok(()) => Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    write_zeros(fd, offset, len)
                }
                Err(e) => Err(e),
            }
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

fn write_zeros(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; (len.min(1 << 20)) as usize];
    let bfd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        let w = nix::sys::uio::pwrite(bfd, &zeros[..n], (offset + done) as i64)?;
        done += w as u64;
    }
    Ok(())
}

/// The fallback engine: `threads` workers doing synchronous calls.
pub struct SyncEngine {
    tx: Mutex<Option<SyncSender<IoReq>>>,
    workers: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl SyncEngine {
    pub fn new(file: Arc<File>, threads: usize, queue: usize) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<IoReq>(queue);
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let file = file.clone();
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
}

/// The io_uring engine.
pub struct UringEngine {
    tx: Option<SyncSender<IoReq>>,
    /// Set by the ring thread right before it blocks; a submitter that finds it set wakes the
    /// thread through the eventfd (so a busy ring costs no extra syscall per request).
    sleeping: Arc<AtomicBool>,
    wake: Arc<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const WAKE_TOKEN: u64 = u64::MAX;

impl UringEngine {
    /// Builds the ring, failing (so the caller can fall back) if the kernel refuses io_uring.
    pub fn new(file: Arc<File>, entries: u32, queue: usize) -> io::Result<Self> {
        let ring = io_uring::IoUring::new(entries)?;
        // Probe with a NOP so a seccomp filter that allows setup but not enter is caught here.
        let mut ring = ring;
        let nop = io_uring::opcode::Nop::new().build().user_data(0);
        // SAFETY: NOP has no buffers.
        unsafe { ring.submission().push(&nop) }.map_err(|_| io::Error::other("sq full"))?;
        ring.submit_and_wait(1)?;
        ring.completion().for_each(drop);

        // SAFETY: eventfd returns a fresh descriptor or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a valid, owned descriptor.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        let (tx, rx) = mpsc::sync_channel::<IoReq>(queue);
        let sleeping = Arc::new(AtomicBool::new(false));
        let thread = {
            let sleeping = sleeping.clone();
            let wake = wake.clone();
            std::thread::Builder::new()
                .name("blockrep-uring".into())
                .spawn(move || ring_thread(ring, file, rx, sleeping, wake))?
        };
        Ok(UringEngine {
            tx: Some(tx),
            sleeping,
            wake,
            thread: Some(thread),
        })
    }

    fn kick(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to an eventfd.
        unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.tx.take();
        self.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Engine for UringEngine {
    fn name(&self) -> &'static str {
        "io-uring"
    }

    fn submit(&self, op: IoOp, buf: Buf) -> oneshot::Receiver<IoDone> {
        let (done, rx) = oneshot::channel();
        if let Some(tx) = &self.tx {
            if tx.send(IoReq { op, buf, done }).is_ok()
                && self.sleeping.swap(false, Ordering::SeqCst)
            {
                self.kick();
            }
        }
        rx
    }
}

/// A request in the ring, with how far a short transfer has got.
struct InFlight {
    req: IoReq,
    progress: usize,
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
    e.user_data(slot as u64)
}

fn ring_thread(
    mut ring: io_uring::IoUring,
    file: Arc<File>,
    rx: Receiver<IoReq>,
    sleeping: Arc<AtomicBool>,
    wake: Arc<OwnedFd>,
) {
    use io_uring::{opcode, types};
    let fd = file.as_raw_fd();
    let cap = ring.params().sq_entries() as usize - 1; // one entry for the wake read
    let mut slots: Vec<Option<InFlight>> = (0..cap).map(|_| None).collect();
    let mut free: Vec<usize> = (0..cap).rev().collect();
    let mut wake_buf = [0u8; 8];
    let mut wake_armed = false;
    let mut closing = false;
    let mut resubmit: Vec<usize> = Vec::new();

    loop {
        if !wake_armed && !closing {
            let e = opcode::Read::new(types::Fd(wake.as_raw_fd()), wake_buf.as_mut_ptr(), 8)
                .build()
                .user_data(WAKE_TOKEN);
            // SAFETY: wake_buf outlives the ring thread's loop.
            if unsafe { ring.submission().push(&e) }.is_ok() {
                wake_armed = true;
            }
        }
        for slot in resubmit.drain(..) {
            if let Some(f) = slots[slot].as_mut() {
                let e = build_sqe(fd, slot, f);
                // Capacity is reserved per slot, so this cannot fail.
                let _ = unsafe { ring.submission().push(&e) };
            }
        }
        // Take whatever is queued, up to the free slots.
        while let Some(&slot) = free.last() {
            match rx.try_recv() {
                Ok(req) => {
                    free.pop();
                    let mut f = InFlight { req, progress: 0 };
                    let e = build_sqe(fd, slot, &mut f);
                    slots[slot] = Some(f);
                    let _ = unsafe { ring.submission().push(&e) };
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    closing = true;
                    break;
                }
            }
        }
        let inflight = cap - free.len();
        if closing && inflight == 0 {
            return;
        }
        // About to block: announce it, then look once more so no request is stranded.
        sleeping.store(true, Ordering::SeqCst);
        let mut wait = 1;
        if let Some(&slot) = free.last() {
            match rx.try_recv() {
                Ok(req) => {
                    free.pop();
                    let mut f = InFlight { req, progress: 0 };
                    let e = build_sqe(fd, slot, &mut f);
                    slots[slot] = Some(f);
                    let _ = unsafe { ring.submission().push(&e) };
                    wait = 0;
                }
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => {
                    closing = true;
                    if inflight == 0 {
                        return;
                    }
                }
            }
        }
        if let Err(e) = ring.submit_and_wait(wait) {
            if e.raw_os_error() != Some(libc::EINTR) {
                tracing::error!("io_uring submit failed: {e}");
            }
        }
        sleeping.store(false, Ordering::SeqCst);

        let cq: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (token, res) in cq {
            if token == WAKE_TOKEN {
                wake_armed = false;
                continue;
            }
            let slot = token as usize;
            let Some(mut f) = slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            let is_rw = matches!(f.req.op, IoOp::Read { .. } | IoOp::Write { .. });
            let result = if res < 0 {
                let err = -res;
                match f.req.op {
                    // Filesystems without ZERO_RANGE: do it the slow way, once.
                    IoOp::Zero { offset, len } if err == libc::EOPNOTSUPP => {
                        write_zeros(fd, offset, len)
                    }
                    _ => Err(io::Error::from_raw_os_error(err)),
                }
            } else if is_rw && (res as usize) + f.progress < f.req.buf.len() {
                if res == 0 {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "short transfer at the end of the backing device",
                    ))
                } else {
                    f.progress += res as usize;
                    slots[slot] = Some(f);
                    resubmit.push(slot);
                    continue;
                }
            } else {
                Ok(())
            };
            free.push(slot);
            let _ = f.req.done.send(IoDone {
                result,
                buf: f.req.buf,
            });
        }
    }
}

/// Opens the engine the config asks for; `auto` tries io_uring and falls back to sync.
pub fn open(file: Arc<File>, choice: crate::config::IoEngineChoice) -> io::Result<Arc<dyn Engine>> {
    use crate::config::IoEngineChoice::*;
    const QUEUE: usize = 4096;
    match choice {
        Sync => Ok(Arc::new(SyncEngine::new(file, 4, QUEUE)?)),
        IoUring => Ok(Arc::new(UringEngine::new(file, 512, QUEUE)?)),
        Auto => match UringEngine::new(file.clone(), 512, QUEUE) {
            Ok(e) => Ok(Arc::new(e)),
            Err(e) => {
                tracing::warn!("io_uring unavailable ({e}); using the pread/pwrite engine");
                Ok(Arc::new(SyncEngine::new(file, 4, QUEUE)?))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn exercise(engine: Arc<dyn Engine>, path: &std::path::Path) {
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
        run(
            &*engine,
            IoOp::Zero {
                offset: 4096,
                len: 8192,
            },
            Buf::new(0),
        )
        .await
        .result
        .unwrap();
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
        let _ = std::fs::remove_file(path);
    }

    fn file(name: &str) -> (Arc<File>, std::path::PathBuf) {
        let p = std::env::temp_dir().join(format!("brengine-{name}-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(1 << 20).unwrap();
        (Arc::new(f), p)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sync_engine_round_trip() {
        let (f, p) = file("sync");
        exercise(Arc::new(SyncEngine::new(f, 3, 64).unwrap()), &p).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_engine_round_trip() {
        let (f, p) = file("uring");
        match UringEngine::new(f, 64, 64) {
            Ok(e) => exercise(Arc::new(e), &p).await,
            Err(e) => eprintln!("SKIP: io_uring refused here: {e}"),
        }
    }
}
