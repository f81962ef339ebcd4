//! Per-test directories and port allocation.

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::cmd::run_quiet;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique directory under /tmp for one test, removed on drop (also when the test panics).
///
/// The path is kept short on purpose: unix socket paths (control sockets, unix exports) must
/// fit in 108 bytes. Set `BLOCKREP_E2E_KEEP=1` to keep the directories for debugging.
pub struct TestDir {
    path: PathBuf,
    tag: String,
}

impl TestDir {
    /// `name` identifies the test; it is sanitised and shortened.
    pub fn new(name: &str) -> Self {
        let tag = unique_tag(name);
        let path = PathBuf::from(format!("/tmp/bre2e-{tag}"));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Self { path, tag }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }

    /// The unique tag of this directory (sanitised test name + pid + sequence number); also a
    /// good unique resource name.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Creates (if needed) and returns a subdirectory.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        p
    }
}

/// `name` sanitised to `[a-z0-9-]`, cut to 20 characters, plus pid and a sequence number.
pub(crate) fn unique_tag(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    s.truncate(20);
    let s = s.trim_matches('-');
    let s = if s.is_empty() { "t" } else { s };
    format!(
        "{s}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Mount points at or below `dir`, deepest first (from /proc/self/mountinfo).
pub(crate) fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// Loop devices whose backing file lies below `dir`.
pub(crate) fn loops_below(dir: &Path) -> Vec<String> {
    let Some(out) = run_quiet(
        std::process::Command::new("losetup").args(["-l", "-n", "-O", "NAME,BACK-FILE"]),
        Duration::from_secs(10),
    ) else {
        return Vec::new();
    };
    out.stdout
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next()?;
            let back = it.collect::<Vec<_>>().join(" ");
            Path::new(back.trim_end_matches(" (deleted)"))
                .starts_with(dir)
                .then(|| name.to_string())
        })
        .collect()
}

impl Drop for TestDir {
    fn drop(&mut self) {
        // Safety net: a test that leaked a mount or loop device must not make us delete files
        // through a mounted filesystem, nor leave a device pointing into a deleted directory.
        // The loop devices are found first: one over a file in a FUSE mount may no longer
        // name its file once that mount is gone.
        let loops = loops_below(&self.path);
        for m in mounts_below(&self.path) {
            eprintln!("cleanup: {} still mounted; lazy unmount", m.display());
            let _ = run_quiet(
                std::process::Command::new("umount").arg("-l").arg(&m),
                Duration::from_secs(10),
            );
        }
        for l in loops {
            eprintln!("cleanup: loop device {l} still attached; detaching");
            let _ = run_quiet(
                std::process::Command::new("losetup").arg("-d").arg(&l),
                Duration::from_secs(10),
            );
        }
        if std::env::var_os("BLOCKREP_E2E_KEEP").is_some() {
            eprintln!("keeping {}", self.path.display());
            return;
        }
        if !mounts_below(&self.path).is_empty() {
            eprintln!(
                "cleanup: mounts remain below {}; not removing it",
                self.path.display()
            );
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("cleanup: cannot remove {}: {e}", self.path.display());
        }
    }
}

static PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
const PORT_LOCK_DIR: &str = "/tmp/bre2e-ports";

/// A free TCP port on 127.0.0.1, below the kernel's ephemeral range where one exists.
///
/// Below it, because a daemon that a test restarts (after a kill -9, say) binds its ports
/// again, and a port from the ephemeral range may meanwhile have become the source port of
/// some other test's outgoing connection: `up` would then fail with "address in use".
///
/// A port is handed out at most once per process, and once across concurrently running test
/// processes (nextest runs each test in its own process): a lock file
/// `/tmp/bre2e-ports/PORT` holding the owner's pid reserves it; the lock of a dead process is
/// reclaimed.
pub fn free_port() -> u16 {
    let _ = std::fs::create_dir_all(PORT_LOCK_DIR);
    let me = std::process::id();
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(sweep_stale_port_locks);
    let (low, high) = port_range();
    let mut seed = u64::from(me) << 32
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
        | 1;
    for _ in 0..1000 {
        let candidate = if low < high {
            // xorshift64: no dependency, distinct enough between processes.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            low + (seed % u64::from(high - low)) as u16
        } else {
            0
        };
        let Ok(l) = TcpListener::bind(("127.0.0.1", candidate)) else {
            continue;
        };
        let port = l.local_addr().expect("local_addr").port();
        drop(l);
        {
            let mut g = PORTS.lock().unwrap();
            if !g.get_or_insert_with(HashSet::new).insert(port) {
                continue;
            }
        }
        let lock = Path::new(PORT_LOCK_DIR).join(port.to_string());
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock)
        {
            Ok(mut f) => {
                use std::io::Write;
                let _ = write!(f, "{me}");
                return port;
            }
            Err(_) => {
                let owner = std::fs::read_to_string(&lock)
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok());
                match owner {
                    Some(pid) if pid != me && crate::proc::pid_alive(pid) => continue,
                    // Being created by another process right now.
                    None => continue,
                    Some(_) => {
                        let _ = std::fs::write(&lock, me.to_string());
                        return port;
                    }
                }
            }
        }
    }
    panic!("no free TCP port found after 1000 attempts");
}

/// Where test ports come from: [20000, start of the ephemeral range), or (0, 0) (any port the
/// kernel picks) when that range is too small.
fn port_range() -> (u16, u16) {
    const LOW: u16 = 20000;
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if start > LOW + 1000 {
        (LOW, start)
    } else {
        (0, 0)
    }
}

/// Removes port locks whose owner process is gone (once per process).
fn sweep_stale_port_locks() {
    let Ok(rd) = std::fs::read_dir(PORT_LOCK_DIR) else {
        return;
    };
    for e in rd.flatten() {
        let owner = std::fs::read_to_string(e.path())
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        let stale = match owner {
            Some(pid) => !crate::proc::pid_alive(pid),
            // Just created, pid not written yet: only an old empty lock is stale.
            None => e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(60)),
        };
        if stale {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
