//! systemd's readiness protocol (`sd_notify`, datagrams to `$NOTIFY_SOCKET`).
//!
//! With `Type=notify` a unit's start succeeds only once the resource is up, so `systemctl
//! start blockrep@r0 && blockrep-ctl primary` cannot race the daemon's start, and a start that
//! fails (bad metadata, a disk in use) never counts as started, with the daemon's reason in the
//! journal. `STATUS=` lines keep the node's state in `systemctl status`. A daemon that systemd
//! did not start (`$NOTIFY_SOCKET` unset) sends nothing.

use std::os::unix::net::{SocketAddr, UnixDatagram};

use proto::control::Status;

/// The variable systemd sets for a `Type=notify` service.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// A STATUS= line longer than this is cut (systemd shows one line; a datagram is bounded).
const MAX_STATUS: usize = 400;

/// Where the service manager listens, and a socket to send it datagrams from.
#[derive(Debug)]
pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// The notifier named by `$NOTIFY_SOCKET` (`None` when unset or empty). The variable is
    /// removed from the environment, as `sd_notify`'s `unset_environment` does, so that the
    /// handlers this daemon runs do not speak for it; call before any thread starts.
    pub fn take_from_env() -> Result<Option<Notifier>, String> {
        let Some(value) = std::env::var_os(NOTIFY_SOCKET) else {
            return Ok(None);
        };
        // SAFETY of the environment change: called from `main` before the runtime or any
        // other thread exists, so nothing reads the environment concurrently.
        std::env::remove_var(NOTIFY_SOCKET);
        let value = value.to_string_lossy().into_owned();
        if value.is_empty() {
            return Ok(None);
        }
        Self::open(&value).map(Some)
    }

    /// A notifier for `target`: a socket path, or `@name` for the abstract namespace.
    pub fn open(target: &str) -> Result<Notifier, String> {
        let addr = if let Some(name) = target.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())
        } else if target.starts_with('/') {
            SocketAddr::from_pathname(target)
        } else {
            return Err(format!(
                "{NOTIFY_SOCKET}={target}: neither a socket path nor an abstract name (@...)"
            ));
        }
        .map_err(|e| format!("{NOTIFY_SOCKET}={target}: {e}"))?;
        let sock = UnixDatagram::unbound().map_err(|e| format!("notify socket: {e}"))?;
        // One datagram to a local socket; a service manager that does not read never stalls
        // the daemon's thread (the state line is sent again at the next change).
        sock.set_nonblocking(true)
            .map_err(|e| format!("notify socket: {e}"))?;
        Ok(Notifier { sock, addr })
    }

    /// Sends `msg` (newline-separated `KEY=value` assignments). A failure is logged, never
    /// fatal: the service manager's view is not the resource's.
    pub fn send(&self, msg: &str) {
        if let Err(e) = self.sock.send_to_addr(msg.as_bytes(), &self.addr) {
            tracing::debug!("notifying the service manager ({msg:?}): {e}");
        }
    }

    /// The resource is up (or the daemon serves its control socket without `--up`). Sent
    /// blocking for up to a second (once, at start): a lost READY=1 would leave the unit's
    /// start waiting until systemd's start timeout killed a working daemon.
    pub fn ready(&self, status: &str) {
        let msg = format!(
            "READY=1\nMAINPID={}\nSTATUS={}",
            std::process::id(),
            one_line(status)
        );
        let blocking = self.sock.set_nonblocking(false).is_ok()
            && self
                .sock
                .set_write_timeout(Some(std::time::Duration::from_secs(1)))
                .is_ok();
        if let Err(e) = self.sock.send_to_addr(msg.as_bytes(), &self.addr) {
            tracing::warn!("telling the service manager the node is ready: {e}");
        }
        if blocking {
            let _ = self.sock.set_nonblocking(true);
        }
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)));
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=taking the resource down");
    }
}

/// `s` as one bounded line (a newline would end the assignment early).
fn one_line(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > MAX_STATUS {
        let mut cut = MAX_STATUS;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

/// The node's state in one line, as `systemctl status` shows it: role and disk, then the
/// link (and a resync's progress, what is out of sync, a suspension).
pub fn summary(st: &Status) -> String {
    if !st.up {
        return "down".to_string();
    }
    let mut s = format!("{}, disk {}", st.role, st.disk);
    if st.disk_failed {
        s.push_str(" (failed a sync)");
    }
    if let Some(why) = &st.suspended {
        s.push_str(&format!(", I/O suspended ({why})"));
    }
    if let Some(r) = &st.replication {
        if r.connection == "connected" {
            s.push_str(&format!(
                "; connected to {} (protocol {}), peer {} disk {}",
                r.peer, r.protocol, r.peer_role, r.peer_disk
            ));
        } else {
            s.push_str(&format!("; {} (peer {})", r.connection, r.peer));
        }
        if r.resync_total > 0 && r.resync_done < r.resync_total {
            let pct = r.resync_done.saturating_mul(100) / r.resync_total;
            s.push_str(&format!(", resync {pct}%"));
        }
        if r.out_of_sync > 0 {
            s.push_str(&format!(", {} bytes out of sync", r.out_of_sync));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_reach_a_path_socket_and_an_abstract_one() {
        let dir = crate::test_dir::TestDir::new("notify");
        let path = dir.join("notify.sock");
        let listener = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier::open(&path.to_string_lossy()).expect("open");
        n.ready("secondary, disk up-to-date\nsecond line");
        let mut buf = [0u8; 1024];
        let got = listener.recv(&mut buf).expect("recv");
        let text = std::str::from_utf8(&buf[..got]).expect("utf8");
        assert!(text.starts_with("READY=1\nMAINPID="), "{text}");
        assert!(
            text.ends_with("STATUS=secondary, disk up-to-date second line"),
            "{text}"
        );

        use std::os::linux::net::SocketAddrExt;
        let name = format!("blockrep-notify-test-{}", std::process::id());
        let abs = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract");
        let listener = UnixDatagram::bind_addr(&abs).expect("bind abstract");
        Notifier::open(&format!("@{name}"))
            .expect("open abstract")
            .stopping();
        let got = listener.recv(&mut buf).expect("recv abstract");
        assert_eq!(&buf[..got], b"STOPPING=1\nSTATUS=taking the resource down");
    }

    #[test]
    fn a_relative_target_is_refused_and_a_missing_listener_is_not_fatal() {
        assert!(Notifier::open("notify.sock").is_err());
        let dir = crate::test_dir::TestDir::new("notify-gone");
        let n = Notifier::open(&dir.join("nobody").to_string_lossy()).expect("open");
        n.status("still running"); // logged at debug, no panic, no error
    }

    #[test]
    fn a_long_status_is_cut_to_one_bounded_line() {
        let long = "é".repeat(MAX_STATUS);
        let line = one_line(&long);
        assert!(line.len() <= MAX_STATUS && line.chars().all(|c| c == 'é'));
    }
}
