//! RAII guards for the client side: background processes, nbdfuse mounts, loop devices and
//! filesystem mounts.
//!
//! Each guard can be released explicitly (`close`, which panics if the release fails: the
//! test wants to know) or implicitly on drop (which never panics and falls back to lazy
//! unmounts and SIGKILL). Structs holding several guards declare them in teardown order,
//! since Rust drops fields in declaration order.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cmd::{run, run_ok, run_quiet};
use crate::proc::{kill9, wait_for};
use crate::{CMD_TIMEOUT, LONG_TIMEOUT};

/// A background process, SIGKILLed (by its pid) and reaped on drop.
pub struct ChildGuard {
    child: Option<Child>,
    what: String,
    log: Option<PathBuf>,
    /// How it exited, once [`Self::wait_exit`] saw it.
    exited: Option<std::process::ExitStatus>,
}

impl ChildGuard {
    /// Spawns `cmd` with stdin from /dev/null and stdout+stderr appended to `log` (or
    /// discarded when `None`), so a chatty process never blocks on a full pipe.
    pub fn spawn(cmd: &mut Command, log: Option<&Path>) -> Self {
        let what = format!("{cmd:?}");
        cmd.stdin(Stdio::null());
        match log {
            Some(p) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
                cmd.stdout(f.try_clone().expect("dup log fd")).stderr(f);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Self {
            child: Some(child),
            what,
            log: log.map(Path::to_path_buf),
            exited: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Whether the process is still running (reaps it if it exited).
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// What the process logged so far (empty without a log file).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits up to `timeout` for the process to exit by itself; returns whether it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let Some(c) = self.child.as_mut() else {
            return true;
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                self.exited = Some(st);
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Its exit code, once [`Self::wait_exit`] saw it exit (`None` before, or if a signal
    /// ended it).
    pub fn exit_code(&self) -> Option<i32> {
        self.exited.and_then(|s| s.code())
    }

    /// SIGKILLs and reaps the process.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn describe(&self) -> &str {
        &self.what
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `nbdfuse MOUNTPOINT URI` running in the background: the export appears as the file
/// `MOUNTPOINT/nbd`. Dropping it runs `fusermount3 -u` and reaps (or kills) nbdfuse.
pub struct NbdFuseMount {
    mountpoint: PathBuf,
    proc: ChildGuard,
    mounted: bool,
}

impl NbdFuseMount {
    /// Starts nbdfuse and waits (up to 10 s) for `MOUNTPOINT/nbd` to appear. Panics with
    /// nbdfuse's output if it exits first.
    pub fn start(mountpoint: &Path, uri: &str) -> Self {
        std::fs::create_dir_all(mountpoint)
            .unwrap_or_else(|e| panic!("mkdir {}: {e}", mountpoint.display()));
        let log = mountpoint.with_extension("nbdfuse.log");
        let _ = std::fs::remove_file(&log);
        let proc = ChildGuard::spawn(Command::new("nbdfuse").arg(mountpoint).arg(uri), Some(&log));
        let mut me = Self {
            mountpoint: mountpoint.to_path_buf(),
            proc,
            mounted: true,
        };
        let file = me.file();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::fs::metadata(&file).is_ok_and(|m| m.len() > 0) {
                return me;
            }
            if !me.proc.running() {
                me.mounted = false;
                panic!(
                    "nbdfuse {} {uri} exited before {} appeared:\n{}",
                    mountpoint.display(),
                    file.display(),
                    me.proc.log()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "nbdfuse {} {uri}: {} did not appear within 10 s:\n{}",
                    mountpoint.display(),
                    file.display(),
                    me.proc.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The file exposing the export.
    pub fn file(&self) -> PathBuf {
        self.mountpoint.join("nbd")
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    fn release(&mut self) -> Result<(), String> {
        if !self.mounted {
            return Ok(());
        }
        // A loop device that was just detached may hold the file for a moment.
        let mut last = String::new();
        let ok = wait_for(Duration::from_secs(10), || {
            match run_quiet(
                Command::new("fusermount3").arg("-u").arg(&self.mountpoint),
                Duration::from_secs(10),
            ) {
                Some(o) if o.success() => true,
                Some(o) => {
                    last = o.stderr;
                    std::thread::sleep(Duration::from_millis(100));
                    false
                }
                None => false,
            }
        });
        self.mounted = false;
        if !ok {
            let _ = run_quiet(
                Command::new("fusermount3")
                    .arg("-u")
                    .arg("-z")
                    .arg(&self.mountpoint),
                Duration::from_secs(10),
            );
            self.proc.kill();
            return Err(format!(
                "fusermount3 -u {} failed: {last}",
                self.mountpoint.display()
            ));
        }
        if !self.proc.wait_exit(Duration::from_secs(10)) {
            let pid = self.proc.pid();
            self.proc.kill();
            return Err(format!(
                "nbdfuse (pid {pid}) did not exit within 10 s of its unmount; killed"
            ));
        }
        Ok(())
    }

    /// Unmounts and waits for nbdfuse to exit; panics if that fails.
    pub fn close(mut self) {
        if let Err(e) = self.release() {
            panic!("{e}\nnbdfuse log:\n{}", self.proc.log());
        }
    }
}

impl Drop for NbdFuseMount {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            eprintln!("cleanup: {e}");
        }
        // Through the child handle, never by pid: an nbdfuse already reaped may have had its
        // pid reused by an unrelated process.
        self.proc.kill();
    }
}

/// A loop device attached with `losetup --find --show --direct-io=off FILE`, detached on drop.
pub struct LoopDev {
    dev: String,
    /// The backing file as the kernel reports it (`/sys/block/loopN/loop/backing_file`).
    backing: String,
    attached: bool,
}

impl LoopDev {
    pub fn attach(file: &Path) -> Self {
        // `losetup --find` can race with a concurrent test taking the same free device.
        let mut last = None;
        for _ in 0..5 {
            let out = run(
                Command::new("losetup")
                    .args(["--find", "--show", "--direct-io=off"])
                    .arg(file),
                CMD_TIMEOUT,
            );
            if out.success() {
                let dev = out.stdout.trim().to_string();
                assert!(
                    dev.starts_with("/dev/loop"),
                    "losetup printed {:?}",
                    out.stdout
                );
                let backing = std::fs::read_to_string(Self::sys_backing(&dev))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default();
                return Self {
                    dev,
                    backing,
                    attached: true,
                };
            }
            last = Some(out);
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("losetup failed:\n{}", last.expect("tried").describe());
    }

    /// The device path, e.g. `/dev/loop3`.
    pub fn dev(&self) -> &str {
        &self.dev
    }

    fn sys_backing(dev: &str) -> PathBuf {
        let name = dev.trim_start_matches("/dev/");
        PathBuf::from(format!("/sys/block/{name}/loop/backing_file"))
    }

    /// Whether the kernel still has this device bound to our backing file (`losetup -d` of
    /// a device that is still open only schedules the detach; and a freed device may be
    /// taken at once by a concurrent test, which is why the backing file is compared).
    pub fn still_bound(&self) -> bool {
        std::fs::read_to_string(Self::sys_backing(&self.dev))
            .is_ok_and(|s| !self.backing.is_empty() && s.trim() == self.backing)
    }

    fn release(&mut self) -> Result<(), String> {
        if !self.attached {
            return Ok(());
        }
        self.attached = false;
        let mut last = String::new();
        let ok = wait_for(Duration::from_secs(10), || {
            // Once our binding is gone (an earlier attempt took effect when the last opener
            // closed), the device may already be another test's: never detach that one.
            if !self.still_bound() {
                return true;
            }
            match run_quiet(
                Command::new("losetup").arg("-d").arg(&self.dev),
                Duration::from_secs(10),
            ) {
                Some(o) if o.success() => true,
                Some(o) => {
                    last = o.stderr;
                    std::thread::sleep(Duration::from_millis(100));
                    false
                }
                None => false,
            }
        });
        if !ok {
            return Err(format!("losetup -d {} failed: {last}", self.dev));
        }
        if !wait_for(Duration::from_secs(10), || !self.still_bound()) {
            return Err(format!(
                "{} still bound to {} 10 s after losetup -d (something holds it open)",
                self.dev, self.backing
            ));
        }
        Ok(())
    }

    /// Detaches; panics if that fails.
    pub fn close(mut self) {
        if let Err(e) = self.release() {
            panic!("{e}");
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            eprintln!("cleanup: {e}");
        }
    }
}

/// A mounted filesystem, unmounted on drop.
pub struct Mount {
    dir: PathBuf,
    mounted: bool,
}

impl Mount {
    /// `mount [-o OPTS] DEV DIR` (DIR is created).
    pub fn new(dev: &str, dir: &Path, opts: Option<&str>) -> Self {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let mut cmd = Command::new("mount");
        if let Some(o) = opts {
            cmd.arg("-o").arg(o);
        }
        run_ok(cmd.arg(dev).arg(dir), LONG_TIMEOUT);
        Self {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    /// `mount -t tmpfs -o size=SIZE tmpfs DIR` (DIR is created): a small filesystem that
    /// fills up, for disk-full faults.
    pub fn tmpfs(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={size}"))
                .arg("tmpfs")
                .arg(dir),
            LONG_TIMEOUT,
        );
        Self {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn release(&mut self) -> Result<(), String> {
        if !self.mounted {
            return Ok(());
        }
        self.mounted = false;
        let mut last = String::new();
        let ok = wait_for(Duration::from_secs(10), || {
            match run_quiet(Command::new("umount").arg(&self.dir), LONG_TIMEOUT) {
                Some(o) if o.success() => true,
                Some(o) => {
                    last = o.stderr;
                    std::thread::sleep(Duration::from_millis(100));
                    false
                }
                None => false,
            }
        });
        if ok {
            return Ok(());
        }
        let _ = run_quiet(
            Command::new("umount").arg("-l").arg(&self.dir),
            Duration::from_secs(10),
        );
        Err(format!(
            "umount {} failed (lazily unmounted): {last}",
            self.dir.display()
        ))
    }

    /// Unmounts; panics if that fails.
    pub fn close(mut self) {
        if let Err(e) = self.release() {
            panic!("{e}");
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            eprintln!("cleanup: {e}");
        }
    }
}

/// The whole client stack on an NBD export: nbdfuse → loop device → (optional) mount.
/// Fields are declared in teardown order: umount, `losetup -d`, `fusermount3 -u`.
pub struct FsStack {
    mount: Option<Mount>,
    loopdev: Option<LoopDev>,
    fuse: Option<NbdFuseMount>,
    mnt_dir: PathBuf,
}

impl FsStack {
    /// nbdfuse on `base/fuse-TAG`, a loop device on its file; nothing mounted yet.
    pub fn attach(base: &Path, tag: &str, uri: &str) -> Self {
        let fuse = NbdFuseMount::start(&base.join(format!("fuse-{tag}")), uri);
        let loopdev = LoopDev::attach(&fuse.file());
        Self {
            mount: None,
            loopdev: Some(loopdev),
            fuse: Some(fuse),
            mnt_dir: base.join(format!("mnt-{tag}")),
        }
    }

    /// The loop device path.
    pub fn dev(&self) -> &str {
        self.loopdev.as_ref().expect("loop device attached").dev()
    }

    /// `mkfs.ext4 -q -F` on the loop device.
    pub fn mkfs_ext4(&self) {
        run_ok(
            Command::new("mkfs.ext4").args(["-q", "-F"]).arg(self.dev()),
            LONG_TIMEOUT,
        );
    }

    /// Mounts the loop device on `base/mnt-TAG`; returns the mount directory.
    pub fn mount(&mut self) -> PathBuf {
        assert!(self.mount.is_none(), "already mounted");
        let dev = self.dev().to_string();
        self.mount = Some(Mount::new(&dev, &self.mnt_dir, None));
        self.mnt_dir.clone()
    }

    /// Unmounts (panics on failure); the loop device and nbdfuse stay.
    pub fn umount(&mut self) {
        if let Some(m) = self.mount.take() {
            m.close();
        }
    }

    /// `fsck.ext4 -f -n` on the (unmounted) loop device; panics unless it reports clean.
    pub fn fsck_clean(&self) {
        assert!(self.mount.is_none(), "fsck needs the filesystem unmounted");
        let out = run(
            Command::new("fsck.ext4").args(["-f", "-n"]).arg(self.dev()),
            LONG_TIMEOUT,
        );
        assert_eq!(
            out.code,
            Some(0),
            "fsck.ext4 -f -n found problems:\n{}",
            out.describe()
        );
    }

    /// Tears everything down in order, panicking on the first failure.
    pub fn close(mut self) {
        self.umount();
        if let Some(l) = self.loopdev.take() {
            l.close();
        }
        if let Some(f) = self.fuse.take() {
            f.close();
        }
    }
}

/// A file whose I/O an nbdkit plugin and filters decide (a disk that hangs or fails on
/// demand): nbdkit serves it on a unix socket in `dir`, nbdfuse exposes it as a file.
/// Dropped: nbdkit is killed first (so nbdfuse's pending requests fail), then the FUSE mount
/// is released. Declare it before anything (daemons) that holds the file.
pub struct NbdkitFile {
    kit: ChildGuard,
    fuse: Option<NbdFuseMount>,
}

impl NbdkitFile {
    /// `nbdkit --foreground --exit-with-parent --unix DIR/NAME.sock ARGS...`, waiting (10 s)
    /// for the socket and for every path in `ready` (a control socket, say), then nbdfuse
    /// on `DIR/NAME-fuse`. Logs go to `DIR/NAME-nbdkit.log`.
    pub fn start(dir: &Path, name: &str, args: &[String], ready: &[&Path]) -> Self {
        let sock = dir.join(format!("{name}.sock"));
        let kit = ChildGuard::spawn(
            Command::new("nbdkit")
                .args(["--foreground", "--exit-with-parent", "--unix"])
                .arg(&sock)
                .args(args),
            Some(&dir.join(format!("{name}-nbdkit.log"))),
        );
        assert!(
            wait_for(Duration::from_secs(10), || {
                sock.exists() && ready.iter().all(|p| p.exists())
            }),
            "nbdkit {args:?} did not start: {}",
            kit.log()
        );
        let fuse = NbdFuseMount::start(
            &dir.join(format!("{name}-fuse")),
            &format!("nbd+unix:///?socket={}", sock.display()),
        );
        Self {
            kit,
            fuse: Some(fuse),
        }
    }

    /// A RAM disk of `size` bytes behind nbdkit's `pause` filter: its I/O hangs while
    /// `DIR/NAME.ctl` is told to pause and goes on when told to resume. Returns the disk and
    /// that control socket.
    pub fn paused_memory(dir: &Path, name: &str, size: u64) -> (Self, PathBuf) {
        let ctl = dir.join(format!("{name}.ctl"));
        let disk = Self::start(
            dir,
            name,
            &[
                "--filter=pause".into(),
                "memory".into(),
                format!("size={size}"),
                format!("pause-control={}", ctl.display()),
            ],
            &[&ctl],
        );
        (disk, ctl)
    }

    /// The file exposing the export.
    pub fn file(&self) -> PathBuf {
        self.fuse
            .as_ref()
            .map(NbdFuseMount::file)
            .unwrap_or_default()
    }

    /// nbdkit's output so far.
    pub fn log(&self) -> String {
        self.kit.log()
    }

    /// Stops nbdkit, then releases the FUSE mount; panics if that fails.
    pub fn close(mut self) {
        self.kit.kill();
        if let Some(f) = self.fuse.take() {
            f.close();
        }
    }
}

impl Drop for NbdkitFile {
    fn drop(&mut self) {
        self.kit.kill();
        drop(self.fuse.take());
    }
}

/// The trigger file of nbdkit's `error` filter (`error-*-file=PATH`): its errors happen
/// while the file exists. Removed when dropped.
pub struct ErrorTrigger(pub PathBuf);

impl ErrorTrigger {
    pub fn arm(&self) {
        std::fs::write(&self.0, b"").expect("create the error trigger");
    }
    pub fn disarm(&self) {
        std::fs::remove_file(&self.0).expect("remove the error trigger");
    }
}

impl Drop for ErrorTrigger {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Tells the control socket of nbdkit's `pause` filter (see [`NbdkitFile::paused_memory`])
/// to pause (`b'p'`) or resume (`b'r'`) its I/O, and checks the answer (for a pause: once
/// the requests already received have completed).
pub fn pause_control(ctl: &Path, cmd: u8) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(ctl).expect("pause control");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    s.write_all(&[cmd]).expect("pause control write");
    let mut r = [0u8; 1];
    s.read_exact(&mut r).expect("pause control answer");
    assert_eq!(r[0], cmd.to_ascii_uppercase(), "pause filter answer");
}

/// SIGKILLs, when dropped, every daemon still running with this cluster's config (never a
/// reused pid): declared after an [`NbdkitFile`] a daemon uses, so that no daemon blocked on
/// a hung file keeps its mount busy, on a panic too.
pub struct StopDaemons<'a>(pub &'a crate::Cluster);

impl Drop for StopDaemons<'_> {
    fn drop(&mut self) {
        for pid in crate::proc::pids_with_arg(&self.0.config_path().to_string_lossy()) {
            kill9(pid);
            crate::proc::wait_pid_gone(pid, Duration::from_secs(5));
        }
    }
}
