//! The shipped systemd unit (`scripts/systemd/blockrep@.service`): systemd accepts it, and
//! its ExecStart, run as systemd would (foreground, `$NOTIFY_SOCKET` for `Type=notify`,
//! SIGTERM to stop), brings the resource up secondary, says so (READY=1, a status line),
//! and ends with a clean `down`; a start that fails never says ready.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use blockrep_e2e::*;

/// `name` on the PATH.
fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn unit_text() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/systemd/blockrep@.service");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn the_systemd_unit_verifies_and_its_exec_start_runs_the_node() {
    let c = Cluster::builder("systemd-unit").nodes(1).build();
    let a = c.alpha();
    a.create_md();
    let dir = c.dir().path();
    // The resource's config where the unit looks for it, the binaries where it runs them.
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).expect("etc dir");
    std::fs::copy(a.config_path(), etc.join(format!("{}.toml", c.resource()))).expect("config");
    let bin = a.daemon_path();
    let bin_dir = bin
        .parent()
        .expect("bin dir")
        .to_string_lossy()
        .into_owned();
    let unit = unit_text()
        .replace("/usr/local/sbin", &bin_dir)
        .replace("/etc/blockrep/", &format!("{}/", etc.display()));

    match which("systemd-analyze") {
        None => skip_or_fail("the systemd-analyze part: systemd-analyze is not installed"),
        Some(sa) => {
            let path = dir.join(format!("blockrep@{}.service", c.resource()));
            std::fs::write(&path, &unit).expect("unit file");
            let out = run(Command::new(sa).arg("verify").arg(&path), CMD_TIMEOUT);
            assert!(
                out.success() && out.stderr.trim().is_empty(),
                "systemd-analyze verify:\n{}",
                out.describe()
            );
        }
    }

    assert!(
        unit.lines().any(|l| l == "Type=notify"),
        "the unit must wait for the daemon's READY=1"
    );
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart")
        .replace("%i", c.resource());
    let mut args = exec.split_whitespace();
    let program = args.next().expect("program");
    // This node's name: the unit's default is the host name.
    let mut cmd = Command::new(program);
    cmd.args(args).arg("-n").arg("alpha");
    // systemd's side of Type=notify: a datagram socket named by $NOTIFY_SOCKET.
    let manager = ServiceManager::listen(dir);
    cmd.env("NOTIFY_SOCKET", &manager.path);
    let log = dir.join("unit.log");
    let mut daemon = ChildGuard::spawn(&mut cmd, Some(&log));
    let ready = manager.wait_for("READY=1", Duration::from_secs(30));
    assert!(
        ready.is_some(),
        "the unit's daemon never said READY=1 (got {:?}):\n{}",
        manager.seen(),
        daemon.log()
    );
    let ready = ready.unwrap_or_default();
    assert!(
        ready.contains(&format!("MAINPID={}", daemon.pid())),
        "READY=1 without the daemon's pid: {ready:?}"
    );
    // Ready means up: the control socket answers at once, with the resource up.
    let st = a.status_json();
    assert_eq!(st["up"], true, "ready before up: {st}");
    assert_eq!(st["role"], "secondary", "a unit must not promote: {st}");
    assert!(
        ready.contains("STATUS=secondary, disk "),
        "the ready message carries the state line: {ready:?}"
    );
    // Read what is queued (the socket holds only a few datagrams), then stop.
    let _ = manager.seen();
    let pid = nix::unistd::Pid::from_raw(daemon.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    assert!(
        manager
            .wait_for("STOPPING=1", Duration::from_secs(30))
            .is_some(),
        "no STOPPING=1 after SIGTERM (got {:?}):\n{}",
        manager.seen(),
        daemon.log()
    );
    assert!(
        daemon.wait_exit(Duration::from_secs(30)),
        "SIGTERM did not stop the daemon:\n{}",
        daemon.log()
    );
    assert_eq!(
        daemon.exit_code(),
        Some(0),
        "a service stop must exit 0:\n{}",
        daemon.log()
    );
    assert!(!a.ctl(&["status"]).success(), "still running after SIGTERM");
}

/// A start that fails (no metadata: `create-md` was not run) exits non-zero without READY=1,
/// so `systemctl start` fails with the daemon's reason rather than reporting a running unit.
#[test]
fn a_failed_start_never_says_ready() {
    let c = Cluster::builder("systemd-fail").nodes(1).build();
    let a = c.alpha();
    let dir = c.dir().path();
    let manager = ServiceManager::listen(dir);
    let mut cmd = Command::new(a.daemon_path());
    cmd.arg("-c")
        .arg(a.config_path())
        .args(["-n", "alpha", "--up"])
        .env("NOTIFY_SOCKET", &manager.path);
    let mut daemon = ChildGuard::spawn(&mut cmd, Some(&dir.join("fail.log")));
    assert!(
        daemon.wait_exit(Duration::from_secs(30)),
        "a daemon without metadata kept running:\n{}",
        daemon.log()
    );
    assert_eq!(daemon.exit_code(), Some(1), "{}", daemon.log());
    assert!(
        daemon.log().contains("create-md"),
        "the reason names what to run:\n{}",
        daemon.log()
    );
    assert!(
        manager.seen().iter().all(|m| !m.contains("READY=1")),
        "a failed start said ready: {:?}",
        manager.seen()
    );
}

/// The service manager's end of `$NOTIFY_SOCKET`: every datagram received, in order.
struct ServiceManager {
    path: std::path::PathBuf,
    sock: std::os::unix::net::UnixDatagram,
    got: std::cell::RefCell<Vec<String>>,
}

impl ServiceManager {
    fn listen(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("read timeout");
        ServiceManager {
            path,
            sock,
            got: Default::default(),
        }
    }

    /// The first message (of all received so far) that contains `needle`, waiting up to
    /// `timeout` for it.
    fn wait_for(&self, needle: &str, timeout: Duration) -> Option<String> {
        let end = std::time::Instant::now() + timeout;
        loop {
            if let Some(m) = self.got.borrow().iter().find(|m| m.contains(needle)) {
                return Some(m.clone());
            }
            if std::time::Instant::now() >= end {
                return None;
            }
            let mut buf = [0u8; 4096];
            if let Ok(n) = self.sock.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.got.borrow_mut().push(m);
            }
        }
    }

    /// Everything received so far (after draining what is queued).
    fn seen(&self) -> Vec<String> {
        let mut buf = [0u8; 4096];
        self.sock.set_nonblocking(true).expect("nonblocking");
        while let Ok(n) = self.sock.recv(&mut buf) {
            self.got
                .borrow_mut()
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        self.sock.set_nonblocking(false).expect("blocking");
        self.got.borrow().clone()
    }
}
