//! Attaching a kernel `/dev/nbdX` to the daemon's NBD transmission socket.
//!
//! The daemon serves the transmission phase (no handshake) on one end of a socketpair; this module
//! hands the other end to the kernel nbd driver. Generic netlink (`NBD_CMD_CONNECT`) is preferred
//! because it needs no thread parked in the kernel; the classic ioctl interface (`NBD_SET_SOCK` …
//! `NBD_DO_IT`) is the fallback for kernels or sandboxes where netlink is refused.
//!
//! The netlink messages are built here rather than with `nbd-netlink` 0.3: that crate cannot pick
//! the device index, pass the negotiated transmission flags (without `NBD_FLAG_SEND_FLUSH` the
//! kernel never sends FLUSH/FUA, so writes acknowledged from our page cache would not be
//! durable), set the dead-connection timeout, or disconnect. Values follow
//! `include/uapi/linux/nbd.h` and `include/uapi/linux/nbd-netlink.h`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::ioctl::ioctl_num_type;
use nix::sys::socket::{self, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType};
use nix::sys::time::{TimeVal, TimeValLike};

/// Why the kernel device cannot be (or could not be) used.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("kernel nbd module not loaded: {0} (modprobe nbd); serving the socket export only")]
    NotLoaded(String),
    #[error("{} is not an NBD device path (expected /dev/nbdN)", .0.display())]
    BadPath(PathBuf),
    #[error("{} is not a block device", .0.display())]
    NotBlockDevice(PathBuf),
    #[error("{} is already connected (disconnect it first, e.g. nbd-client -d)", .0.display())]
    InUse(PathBuf),
    /// Still attached from an earlier daemon of this node (one that ended without detaching
    /// it: the kernel keeps a netlink attachment until told otherwise).
    #[error("{} is still attached from an earlier daemon of this node", .0.display())]
    Stale(PathBuf),
    #[error("{} is still attached from an earlier daemon of this node, and {why}: its I/O failed when that daemon ended; unmount it (or stop what holds it), then promote again", .device.display())]
    StaleInUse { device: PathBuf, why: String },
    #[error("invalid NBD block size {0}: must be a power of two of at least 512")]
    BlockSize(u32),
    #[error("cannot stat {}: {source}", .path.display())]
    Stat { path: PathBuf, source: io::Error },
    #[error("cannot attach {}: netlink: {netlink}; ioctl: {ioctl}", .device.display())]
    Attach {
        device: PathBuf,
        netlink: io::Error,
        ioctl: io::Error,
    },
    #[error("cannot detach {} ({method}): {source}", .device.display())]
    Detach {
        device: PathBuf,
        method: &'static str,
        source: io::Error,
    },
}

/// An NBD ioctl: request code plus its name for error messages.
#[derive(Clone, Copy)]
struct Req(ioctl_num_type, &'static str);

/// `_IO(0xab, nr)`; nix knows the per-architecture `_IOC_NONE` encoding.
const fn nbd_io(nr: u8) -> ioctl_num_type {
    nix::request_code_none!(0xab, nr) as ioctl_num_type
}
const SET_SOCK: Req = Req(nbd_io(0), "NBD_SET_SOCK");
const SET_BLKSIZE: Req = Req(nbd_io(1), "NBD_SET_BLKSIZE");
const DO_IT: Req = Req(nbd_io(3), "NBD_DO_IT");
const CLEAR_SOCK: Req = Req(nbd_io(4), "NBD_CLEAR_SOCK");
const SET_SIZE_BLOCKS: Req = Req(nbd_io(7), "NBD_SET_SIZE_BLOCKS");
const DISCONNECT: Req = Req(nbd_io(8), "NBD_DISCONNECT");
/// The kernel's per-request timeout: a request that takes longer marks a single-connection
/// device dead and fails its I/O for good (the filesystem on it sees EIO). Left unset, older
/// kernels apply blk-mq's 30 s, newer ones keep waiting.
const SET_TIMEOUT: Req = Req(nbd_io(9), "NBD_SET_TIMEOUT");
/// Seconds (see [`SET_TIMEOUT`]), on both interfaces: I/O may wait in the server without a
/// bound (suspended under `resource-and-stonith` until the fence or `resume-io`, as DRBD
/// freezes it), so in effect never; a daemon that dies closes the socket, which fails the
/// I/O at once. About 11.5 days: the kernel keeps it times HZ in 32 bits.
const KERNEL_REQUEST_TIMEOUT_S: u64 = 1_000_000;
const SET_FLAGS: Req = Req(nbd_io(10), "NBD_SET_FLAGS");

// nbd-netlink.h (index and fd are NLA_U32; sizes, flags and timeouts NLA_U64) and genetlink.h.
const NBD_GENL_VERSION: u8 = 1;
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
/// A string the kernel shows in `/sys/block/nbdN/backend` (Linux 5.14 on; older kernels
/// ignore it): how a restarted daemon knows a device still attached is its own.
const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;
const NLA_F_NESTED: u16 = 1 << 15;
const GENL_ID_CTRL: u16 = libc::GENL_ID_CTRL as u16;
const CTRL_CMD_GETFAMILY: u8 = libc::CTRL_CMD_GETFAMILY as u8;
const CTRL_ATTR_FAMILY_ID: u16 = libc::CTRL_ATTR_FAMILY_ID as u16;
const CTRL_ATTR_FAMILY_NAME: u16 = libc::CTRL_ATTR_FAMILY_NAME as u16;

/// A kernel device attached to the daemon's socket; call [`Attachment::detach`] to release it.
/// Dropped instead (or the daemon killed), the socket closes and the device's I/O fails; an
/// ioctl attachment ends with its `NBD_DO_IT`, but the kernel keeps a netlink one (its
/// `pid` in sysfs) until disconnected: the next attach of this node clears it (see
/// [`KernelError::Stale`]).
pub struct Attachment {
    device: PathBuf,
    index: u32,
    /// Our copy of the handed-over socket, kept open until detach (the kernel holds its own ref).
    _sock: UnixStream,
    via: Via,
}

enum Via {
    Netlink,
    /// The device fd (its open holds the ioctl config) and the thread parked in `NBD_DO_IT`.
    Ioctl {
        dev: Arc<File>,
        thread: JoinHandle<io::Result<()>>,
    },
}

/// The `max_sectors_kb` to set for requests of at most `max_bytes`, given the queue's current
/// value: never raised (the kernel bounds it by the hardware limit), at least one page.
fn max_sectors_kb(current: u64, max_bytes: u32) -> u64 {
    (u64::from(max_bytes) / 1024).clamp(4, current.max(4))
}

impl Attachment {
    /// Caps the requests the kernel sends at `max_bytes` (the export's advertised maximum,
    /// which the kernel's nbd driver does not read: a larger write would not fit one journal
    /// record). Through sysfs; where it fails, requests stay at the kernel's limit.
    pub fn limit_requests(&self, max_bytes: u32) -> io::Result<u64> {
        let path = format!("/sys/block/nbd{}/queue/max_sectors_kb", self.index);
        let current: u64 = std::fs::read_to_string(&path)?
            .trim()
            .parse()
            .map_err(|e| io::Error::other(format!("{path}: {e}")))?;
        let want = max_sectors_kb(current, max_bytes);
        if want < current {
            std::fs::write(&path, want.to_string())?;
        }
        Ok(want)
    }

    /// What holds the attached device open, if anything a detach would pull it from under
    /// (see [`device_in_use`]).
    pub fn in_use(&self) -> Option<String> {
        device_in_use(&self.device, self.index)
    }

    /// "netlink" or "ioctl", for status and logs.
    pub fn method(&self) -> &'static str {
        match self.via {
            Via::Netlink => "netlink",
            Via::Ioctl { .. } => "ioctl",
        }
    }

    /// Disconnects the device: the kernel sends `NBD_CMD_DISC` on the socket and shuts it down,
    /// so the daemon's end sees the DISC request, then EOF. Kernel I/O still queued fails.
    pub fn detach(self) -> Result<(), KernelError> {
        let method = self.method();
        let device = self.device;
        let fail = |source| KernelError::Detach {
            device: device.clone(),
            method,
            source,
        };
        let res = match self.via {
            Via::Netlink => {
                let mut nl = Genl::open().map_err(fail)?;
                let family = nl.family("nbd").map_err(fail)?;
                let mut attrs = Vec::new();
                put_attr(&mut attrs, NBD_ATTR_INDEX, &self.index.to_ne_bytes());
                let res = nl.request(family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION, &attrs);
                res.map(drop).map_err(fail)
            }
            Via::Ioctl { dev, thread } => {
                // As `nbd-client -d`: CLEAR_SOCK forces the socket down even if the daemon never
                // answers the DISC, so NBD_DO_IT returns and the join cannot hang.
                let res = ioctl(&dev, DISCONNECT, 0).and(ioctl(&dev, CLEAR_SOCK, 0));
                match thread.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(device = %device.display(), "{e}"),
                    Err(_) => return Err(fail(io::Error::other("NBD_DO_IT thread panicked"))),
                }
                drop(dev); // closing it frees the ioctl config
                res.map_err(fail)
            }
        };
        // The kernel drops its config (and the `pid` file) asynchronously; wait briefly so an
        // immediate re-attach does not find the device busy. A mounted device keeps it longer.
        let pid = PathBuf::from(format!("/sys/block/nbd{}/pid", self.index));
        let deadline = Instant::now() + Duration::from_secs(2);
        while res.is_ok() && pid.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        res
    }
}

/// What holds `/dev/nbdN` or one of its partitions (`nbdNp1`, ...) open, if anything a
/// detach would pull it from under: a mount (`/proc/self/mountinfo`) or a stacked device
/// (`holders` in sysfs: LVM, dm).
fn device_in_use(device: &Path, index: u32) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(device).ok()?.rdev();
    let mut devices = vec![(
        device.display().to_string(),
        format!("{}:{}", libc::major(rdev), libc::minor(rdev)),
    )];
    let disk = format!("nbd{index}");
    if let Ok(dir) = std::fs::read_dir(format!("/sys/block/{disk}")) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !is_partition_of(&name, &disk) {
                continue;
            }
            if let Ok(majmin) = std::fs::read_to_string(e.path().join("dev")) {
                devices.push((format!("/dev/{name}"), majmin.trim().to_string()));
            }
        }
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    devices.iter().find_map(|(name, majmin)| {
        if let Some(at) = mounted_at(&mountinfo, majmin) {
            return Some(format!("{name} is mounted on {at}"));
        }
        let holders: Vec<String> = std::fs::read_dir(format!("/sys/dev/block/{majmin}/holders"))
            .ok()?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        (!holders.is_empty()).then(|| format!("{name} is held by {}", holders.join(", ")))
    })
}

/// Whether the sysfs entry `name` is a partition of the disk `disk` (`nbd0p1` of `nbd0`).
fn is_partition_of(name: &str, disk: &str) -> bool {
    name.strip_prefix(disk)
        .and_then(|r| r.strip_prefix('p'))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Parses the kernel index from `/dev/nbdN` (partitions such as `nbd0p1` are rejected).
fn parse_index(device: &Path) -> Result<u32, KernelError> {
    let name = device.file_name().and_then(|n| n.to_str());
    match name.and_then(|n| n.strip_prefix("nbd")) {
        Some(d) if !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()) => d
            .parse()
            .map_err(|_| KernelError::BadPath(device.to_path_buf())),
        _ => Err(KernelError::BadPath(device.to_path_buf())),
    }
}

/// Why the kernel device can't be used here, or Ok if it looks usable (device node exists, module
/// loaded, not already connected). Cheap, so the daemon can call it before every attach.
/// `backend`: this node's identifier (see [`backend_id`]); a device still attached under it
/// is [`KernelError::Stale`], which [`attach`] clears.
pub fn probe(device: &Path, backend: &str) -> Result<(), KernelError> {
    let index = parse_index(device)?;
    let meta = match std::fs::metadata(device) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // With the driver loaded, the node is one past the devices it made.
            if Path::new("/sys/module/nbd").exists() {
                let why = format!(
                    "{} does not exist although the nbd module is loaded: it makes nbds_max devices (load it with nbds_max={} or more)",
                    device.display(),
                    u64::from(index) + 1
                );
                return Err(KernelError::NotLoaded(why));
            }
            let why = format!("{} does not exist", device.display());
            return Err(KernelError::NotLoaded(why));
        }
        Err(source) => {
            return Err(KernelError::Stat {
                path: device.to_path_buf(),
                source,
            })
        }
    };
    if !meta.file_type().is_block_device() {
        return Err(KernelError::NotBlockDevice(device.to_path_buf()));
    }
    // A static /dev can hold nodes without a driver; built-in nbd still shows (it has params).
    if Path::new("/sys/module").is_dir() && !Path::new("/sys/module/nbd").exists() {
        return Err(KernelError::NotLoaded(
            "/sys/module/nbd does not exist".into(),
        ));
    }
    // The driver creates `pid` while a device is running (either interface).
    if Path::new(&format!("/sys/block/nbd{index}/pid")).exists() {
        let owner = std::fs::read_to_string(format!("/sys/block/nbd{index}/backend"));
        if owner.is_ok_and(|o| o.trim_end_matches(['\n', '\0']) == backend) {
            return Err(KernelError::Stale(device.to_path_buf()));
        }
        return Err(KernelError::InUse(device.to_path_buf()));
    }
    Ok(())
}

/// The identifier this node's daemons give their kernel attachment (`/sys/block/nbdN/backend`).
pub fn backend_id(resource: &str, node: &str) -> String {
    format!("blockrep:{resource}:{node}")
}

/// Detaches a device an earlier daemon of this node left attached (see [`KernelError::Stale`]),
/// unless something still uses it; waits (5 s at most) for the kernel to let it go.
fn clear_stale(device: &Path, index: u32) -> Result<(), KernelError> {
    if let Some(why) = device_in_use(device, index) {
        return Err(KernelError::StaleInUse {
            device: device.to_path_buf(),
            why,
        });
    }
    let fail = |source| KernelError::Detach {
        device: device.to_path_buf(),
        method: "netlink",
        source,
    };
    let mut nl = Genl::open().map_err(fail)?;
    let family = nl.family("nbd").map_err(fail)?;
    let mut attrs = Vec::new();
    put_attr(&mut attrs, NBD_ATTR_INDEX, &index.to_ne_bytes());
    nl.request(family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION, &attrs)
        .map_err(fail)?;
    tracing::warn!(
        "{} was still attached from an earlier daemon of this node: detached",
        device.display()
    );
    let pid = PathBuf::from(format!("/sys/block/nbd{index}/pid"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while pid.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if pid.exists() {
        return Err(KernelError::InUse(device.to_path_buf()));
    }
    Ok(())
}

/// What both attach methods need.
struct Setup<'a> {
    device: &'a Path,
    index: u32,
    sock: &'a UnixStream,
    size: u64,
    block_size: u32,
    flags: u16,
    timeout: u64,
    backend: &'a str,
}

/// Attaches `device` to `sock`, preferring netlink and falling back to ioctls. `flags` are the
/// negotiated NBD transmission flags; `dead_conn_timeout` (seconds, 0 = kernel default) is the
/// netlink dead-connection timeout (the ioctl path has none). Either way the per-request
/// timeout is [`KERNEL_REQUEST_TIMEOUT_S`]. `backend`: this node's [`backend_id`]; a device
/// an earlier daemon of this node left attached is detached first, unless in use.
pub fn attach(
    device: &Path,
    sock: UnixStream,
    size: u64,
    block_size: u32,
    flags: u16,
    dead_conn_timeout: u64,
    backend: &str,
) -> Result<Attachment, KernelError> {
    if block_size < 512 || !block_size.is_power_of_two() {
        return Err(KernelError::BlockSize(block_size));
    }
    let index = parse_index(device)?;
    match probe(device, backend) {
        Err(KernelError::Stale(_)) => clear_stale(device, index)?,
        other => other?,
    }
    let timeout = dead_conn_timeout;
    let s = Setup {
        device,
        index,
        sock: &sock,
        size,
        block_size,
        flags,
        timeout,
        backend,
    };
    let via = match netlink_connect(&s) {
        Ok(()) => Via::Netlink,
        Err(netlink) => {
            tracing::info!(device = %device.display(), "netlink attach failed ({netlink}); trying ioctls");
            match ioctl_attach(&s) {
                Ok((dev, thread)) => Via::Ioctl { dev, thread },
                Err(ioctl) => {
                    let device = device.to_path_buf();
                    return Err(KernelError::Attach {
                        device,
                        netlink,
                        ioctl,
                    });
                }
            }
        }
    };
    Ok(Attachment {
        device: device.to_path_buf(),
        index,
        _sock: sock,
        via,
    })
}

fn netlink_connect(s: &Setup) -> io::Result<()> {
    let mut nl = Genl::open()?;
    let family = nl.family("nbd")?;
    let attrs = connect_attrs(s)?;
    // The reply names the index; with NBD_ATTR_INDEX given the kernel binds exactly that one.
    nl.request(family, NBD_CMD_CONNECT, NBD_GENL_VERSION, &attrs)
        .map(drop)
}

/// NBD_CMD_CONNECT attributes: one socket, explicit index, negotiated flags.
fn connect_attrs(s: &Setup) -> io::Result<Vec<u8>> {
    let ebadf = |_| io::Error::from_raw_os_error(libc::EBADF);
    let fd = u32::try_from(s.sock.as_raw_fd()).map_err(ebadf)?;
    let (mut item, mut socks, mut a) = (Vec::new(), Vec::new(), Vec::new());
    put_attr(&mut item, NBD_SOCK_FD, &fd.to_ne_bytes());
    put_attr(&mut socks, NBD_SOCK_ITEM | NLA_F_NESTED, &item);
    put_attr(&mut a, NBD_ATTR_INDEX, &s.index.to_ne_bytes());
    put_attr(&mut a, NBD_ATTR_SIZE_BYTES, &s.size.to_ne_bytes());
    put_u64(&mut a, NBD_ATTR_BLOCK_SIZE_BYTES, s.block_size.into());
    put_u64(&mut a, NBD_ATTR_SERVER_FLAGS, s.flags.into());
    put_u64(&mut a, NBD_ATTR_TIMEOUT, KERNEL_REQUEST_TIMEOUT_S);
    let mut backend = s.backend.as_bytes().to_vec();
    backend.push(0);
    put_attr(&mut a, NBD_ATTR_BACKEND_IDENTIFIER, &backend);
    if s.timeout > 0 {
        put_u64(&mut a, NBD_ATTR_DEAD_CONN_TIMEOUT, s.timeout);
    }
    put_attr(&mut a, NBD_ATTR_SOCKETS | NLA_F_NESTED, &socks);
    Ok(a)
}

/// The device fd and the thread blocked in `NBD_DO_IT`.
type DoIt = (Arc<File>, JoinHandle<io::Result<()>>);

fn ioctl_attach(s: &Setup) -> io::Result<DoIt> {
    let dev = Arc::new(OpenOptions::new().read(true).write(true).open(s.device)?);
    let bs = u64::from(s.block_size);
    ioctl(&dev, SET_BLKSIZE, bs)?;
    ioctl(&dev, SET_SIZE_BLOCKS, s.size / bs)?;
    ioctl(&dev, SET_FLAGS, s.flags.into())?;
    ioctl(&dev, SET_TIMEOUT, KERNEL_REQUEST_TIMEOUT_S)?;
    let ebadf = |_| io::Error::from_raw_os_error(libc::EBADF);
    let fd = u64::try_from(s.sock.as_raw_fd()).map_err(ebadf)?;
    ioctl(&dev, SET_SOCK, fd)?;
    let d = Arc::clone(&dev);
    let spawned = std::thread::Builder::new().name(format!("nbd{}-do-it", s.index));
    let spawned = spawned.spawn(move || {
        let res = ioctl(&d, DO_IT, 0);
        // Drop the kernel's socket ref even when the daemon's end closed first (no detach), as
        // nbd-client does after NBD_DO_IT returns; repeating it from detach is harmless.
        let _ = ioctl(&d, CLEAR_SOCK, 0);
        res
    });
    let thread = match spawned {
        Ok(t) => t,
        Err(e) => {
            let _ = ioctl(&dev, CLEAR_SOCK, 0); // release the socket SET_SOCK took
            return Err(e);
        }
    };
    // NBD_DO_IT blocks while the device runs, so success returns nothing: the device is up once
    // sysfs shows its `pid`, or when the ioctl is still blocking after a short grace period.
    let pid = PathBuf::from(format!("/sys/block/nbd{}/pid", s.index));
    let deadline = Instant::now() + Duration::from_secs(2);
    while !thread.is_finished() {
        if pid.exists() || Instant::now() >= deadline {
            return Ok((dev, thread));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match thread.join() {
        Ok(Err(e)) => Err(e),
        Ok(Ok(())) => Err(io::Error::other(
            "NBD_DO_IT returned at once (socket closed?)",
        )),
        Err(_) => Err(io::Error::other("NBD_DO_IT thread panicked")),
    }
}

/// Issues an NBD ioctl, naming it in the error.
fn ioctl(dev: &File, req: Req, arg: u64) -> io::Result<()> {
    let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", req.1));
    let overflow = |_| named(io::Error::from_raw_os_error(libc::EOVERFLOW));
    let arg = libc::c_ulong::try_from(arg).map_err(overflow)?;
    // SAFETY: NBD ioctls take an integer argument (never a pointer) and `dev` is an open fd.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), req.0, arg) };
    if rc < 0 {
        return Err(named(io::Error::last_os_error()));
    }
    Ok(())
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn ne_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn ne_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// Appends one netlink attribute (header, payload, padding to 4 bytes).
fn put_attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    buf.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(align4(buf.len()), 0);
}

fn put_u64(buf: &mut Vec<u8>, ty: u16, v: u64) {
    put_attr(buf, ty, &v.to_ne_bytes());
}

/// Splits an attribute stream into (type without flag bits, payload); stops at malformed data.
fn parse_attrs(mut b: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    while let (Some(len), Some(ty)) = (ne_u16(b, 0), ne_u16(b, 2)) {
        let len = usize::from(len);
        let Some(payload) = b.get(4..len) else { break };
        out.push((ty & 0x3fff, payload.to_vec()));
        b = b.get(align4(len)..).unwrap_or_default();
    }
    out
}

/// A generic netlink socket speaking request/ack to the kernel.
struct Genl {
    fd: OwnedFd,
    seq: u32,
}

impl Genl {
    fn open() -> io::Result<Self> {
        let (family, ty) = (AddressFamily::Netlink, SockType::Datagram);
        let proto = SockProtocol::NetlinkGeneric;
        let fd = socket::socket(family, ty, SockFlag::SOCK_CLOEXEC, proto)?;
        // Never hang the daemon's blocking pool if an ack goes missing.
        socket::setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::seconds(30))?;
        Ok(Self { fd, seq: 0 })
    }

    /// Resolves a generic netlink family id by name (ENOENT when it is not registered).
    fn family(&mut self, name: &str) -> io::Result<u16> {
        let mut a = Vec::new();
        put_attr(
            &mut a,
            CTRL_ATTR_FAMILY_NAME,
            format!("{name}\0").as_bytes(),
        );
        let reply = self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, &a);
        let named = |e: io::Error| io::Error::new(e.kind(), format!("genl family {name:?}: {e}"));
        let reply = reply.map_err(named)?;
        let id = reply.iter().find(|(t, _)| *t == CTRL_ATTR_FAMILY_ID);
        let id = id.and_then(|(_, v)| ne_u16(v, 0));
        id.ok_or_else(|| named(io::Error::other("no family id in reply")))
    }

    /// Sends one request with NLM_F_ACK and returns the attributes of the kernel's reply message
    /// (empty if it sent none) once the ack arrives; a negative ack becomes the matching errno.
    fn request(&mut self, family: u16, cmd: u8, ver: u8, attrs: &[u8]) -> io::Result<Attrs> {
        self.seq = self.seq.wrapping_add(1);
        let too_big = |_| io::Error::from_raw_os_error(libc::EMSGSIZE);
        let len = u32::try_from(20 + attrs.len()).map_err(too_big)?;
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
        let mut msg = Vec::with_capacity(20 + attrs.len());
        msg.extend_from_slice(&len.to_ne_bytes());
        msg.extend_from_slice(&family.to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&[0, 0, 0, 0, cmd, ver, 0, 0]); // nlmsg_pid, genlmsghdr
        msg.extend_from_slice(attrs);
        socket::send(self.fd.as_raw_fd(), &msg, MsgFlags::empty())?;
        let mut reply = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = socket::recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            let mut rest = buf.get(..n).unwrap_or_default();
            while let (Some(len), Some(ty)) = (ne_u32(rest, 0), ne_u16(rest, 4)) {
                let len = len as usize;
                let malformed = || io::Error::other("malformed netlink reply");
                let body = rest.get(16..len).ok_or_else(malformed)?;
                if ne_u32(rest, 8) == Some(self.seq) && ty == libc::NLMSG_ERROR as u16 {
                    let err = ne_u32(body, 0).ok_or_else(malformed)? as i32;
                    return match err {
                        0 => Ok(reply),
                        e => Err(io::Error::from_raw_os_error(-e)),
                    };
                }
                if ne_u32(rest, 8) == Some(self.seq) && ty == family {
                    reply = parse_attrs(body.get(4..).unwrap_or_default());
                }
                rest = rest.get(align4(len)..).unwrap_or_default();
            }
        }
    }
}

/// Netlink attributes as (type, payload).
type Attrs = Vec<(u16, Vec<u8>)>;

/// Where the block device `major:minor` is mounted, from the text of a `mountinfo` file
/// (field 3 is the device, field 5 the mount point).
fn mounted_at<'a>(mountinfo: &'a str, majmin: &str) -> Option<&'a str> {
    mountinfo.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&majmin))
            .then(|| f.get(4).copied())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_cap_is_never_raised_and_at_least_a_page() {
        use super::max_sectors_kb;
        // 64 MiB journal: 32 MiB less a frame head; the kernel's 1280 KiB stays.
        assert_eq!(max_sectors_kb(1280, (32 << 20) - 4096), 1280);
        // 1 MiB journal: 508 KiB, below the kernel's 1280.
        assert_eq!(max_sectors_kb(1280, 508 << 10), 508);
        assert_eq!(max_sectors_kb(1280, 1024), 4);
        assert_eq!(max_sectors_kb(0, 1 << 20), 4);
    }

    use super::mounted_at;

    #[test]
    fn a_mounted_device_is_found_by_its_numbers() {
        let mi = "22 1 0:21 / /proc rw - proc proc rw\n\
                  36 29 43:0 / /srv rw,relatime - ext4 /dev/nbd0 rw\n";
        assert_eq!(mounted_at(mi, "43:0"), Some("/srv"));
        assert_eq!(mounted_at(mi, "43:1"), None);
        assert_eq!(mounted_at("garbage\n\n", "43:0"), None);
    }

    use super::*;

    #[test]
    fn probe_and_attach_on_missing_node_say_module_not_loaded() -> io::Result<()> {
        let err = probe(Path::new("/nonexistent-blockrep/nbd0"), "blockrep:r0:alpha").err();
        let msg = err.map(|e| e.to_string()).unwrap_or_default();
        let want = "kernel nbd module not loaded: /nonexistent-blockrep/nbd0 does not exist";
        assert!(
            msg.starts_with(want) && msg.contains("(modprobe nbd)"),
            "{msg}"
        );
        let (a, _b) = UnixStream::pair()?;
        let r = attach(
            Path::new("/nonexistent-blockrep/nbd3"),
            a,
            1 << 20,
            4096,
            1,
            0,
            "blockrep:r0:alpha",
        );
        assert!(matches!(r, Err(KernelError::NotLoaded(_))));
        let (a, _b) = UnixStream::pair()?;
        let r = attach(
            Path::new("/dev/nbd0"),
            a,
            1 << 20,
            1000,
            1,
            0,
            "blockrep:r0:alpha",
        );
        assert!(matches!(r, Err(KernelError::BlockSize(1000))));
        Ok(())
    }

    #[test]
    fn partitions_are_told_from_other_entries() {
        assert!(is_partition_of("nbd0p1", "nbd0"));
        assert!(is_partition_of("nbd12p15", "nbd12"));
        for other in [
            "nbd0", "nbd01", "nbd0p", "nbd1p1", "queue", "holders", "nbd0px",
        ] {
            assert!(!is_partition_of(other, "nbd0"), "{other}");
        }
    }

    #[test]
    fn index_parsing() {
        assert_eq!(parse_index(Path::new("/dev/nbd7")).ok(), Some(7));
        assert_eq!(parse_index(Path::new("/dev/nbd15")).ok(), Some(15));
        for bad in [
            "/dev/nbd",
            "/dev/nbd0p1",
            "/dev/nbd+1",
            "/dev/sda",
            "/dev/nbdx",
            "/",
        ] {
            let r = parse_index(Path::new(bad));
            assert!(matches!(r, Err(KernelError::BadPath(_))), "{bad}");
        }
    }

    #[cfg(any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "riscv64"
    ))]
    #[test]
    fn ioctl_numbers_match_uapi() {
        let got = [
            SET_SOCK,
            SET_BLKSIZE,
            DO_IT,
            CLEAR_SOCK,
            SET_SIZE_BLOCKS,
            DISCONNECT,
        ];
        let want: [ioctl_num_type; 6] = [0xab00, 0xab01, 0xab03, 0xab04, 0xab07, 0xab08];
        for (g, w) in got
            .iter()
            .zip(want)
            .chain([(&SET_TIMEOUT, 0xab09), (&SET_FLAGS, 0xab0a)])
        {
            assert_eq!(g.0, w, "{}", g.1);
        }
    }

    #[test]
    fn attrs_round_trip_with_padding() {
        let mut b = Vec::new();
        put_attr(&mut b, 2, b"nbd\0");
        put_attr(&mut b, NBD_ATTR_SOCKETS | NLA_F_NESTED, &[1, 2, 3]);
        assert_eq!(b.len(), 16);
        let want = vec![(2, b"nbd\0".to_vec()), (NBD_ATTR_SOCKETS, vec![1, 2, 3])];
        assert_eq!(parse_attrs(&b), want);
    }

    #[test]
    fn connect_attrs_layout() -> io::Result<()> {
        let (sock, _b) = UnixStream::pair()?;
        let (device, fd) = (Path::new("/dev/nbd7"), sock.as_raw_fd() as u32);
        let (size, block_size, flags, timeout) = (1 << 30, 4096, 0x16d, 60);
        let s = Setup {
            device,
            index: 7,
            sock: &sock,
            size,
            block_size,
            flags,
            timeout,
            backend: "blockrep:r0:alpha",
        };
        let got = parse_attrs(&connect_attrs(&s)?);
        let u64s = |v: u64| v.to_ne_bytes().to_vec();
        let item = parse_attrs(&got[7].1);
        assert_eq!(item[0].0, NBD_SOCK_ITEM);
        assert_eq!(
            parse_attrs(&item[0].1),
            vec![(NBD_SOCK_FD, fd.to_ne_bytes().to_vec())]
        );
        let want = vec![
            (NBD_ATTR_INDEX, 7u32.to_ne_bytes().to_vec()),
            (NBD_ATTR_SIZE_BYTES, u64s(1 << 30)),
            (NBD_ATTR_BLOCK_SIZE_BYTES, u64s(4096)),
            (NBD_ATTR_SERVER_FLAGS, u64s(0x16d)),
            (NBD_ATTR_TIMEOUT, u64s(KERNEL_REQUEST_TIMEOUT_S)),
            (NBD_ATTR_BACKEND_IDENTIFIER, b"blockrep:r0:alpha\0".to_vec()),
            (NBD_ATTR_DEAD_CONN_TIMEOUT, u64s(60)),
            (NBD_ATTR_SOCKETS, got[7].1.clone()),
        ];
        // The kernel keeps the timeout times HZ (at most 1000) in 32 bits.
        assert!(KERNEL_REQUEST_TIMEOUT_S * 1000 < u64::from(u32::MAX));
        assert_eq!(got, want);
        Ok(())
    }

    /// Exercises the real request/ack path against the always-present genl controller.
    #[test]
    fn genl_resolves_controller_family() {
        let Ok(mut nl) = Genl::open() else { return }; // netlink refused by a sandbox
        assert_eq!(nl.family("nlctrl").ok(), Some(GENL_ID_CTRL));
        if !Path::new("/sys/module/nbd").exists() {
            let e = nl.family("nbd").err().map(|e| e.kind());
            assert_eq!(e, Some(io::ErrorKind::NotFound));
        }
    }
}
