//! Process helpers: liveness, SIGKILL by pid, polling.

use std::time::{Duration, Instant};

/// Whether `pid` names a live process: not a zombie, or a zombie thread-group leader whose
/// other threads still run (a killed daemon's leader goes first; a thread of it in the middle
/// of a disk write may hold its sockets and files a moment longer).
pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Format: "pid (comm) S ...": the state follows the last ')'.
    match stat.rfind(')') {
        Some(i) if matches!(stat[i + 1..].trim_start().chars().next(), Some('Z' | 'X')) => {
            std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|d| d.count() > 1)
        }
        Some(_) => true,
        None => false,
    }
}

/// SIGKILLs `pid` if it is alive. Never panics.
pub fn kill9(pid: u32) {
    // Never 0 (our process group) nor ourselves.
    if pid != 0 && pid != std::process::id() && pid_alive(pid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Waits up to `timeout` for `pid` to be gone; returns whether it is.
pub fn wait_pid_gone(pid: u32, timeout: Duration) -> bool {
    wait_for(timeout, || !pid_alive(pid))
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns its last value.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Number of open file descriptors of `pid` (we are root, so /proc/PID/fd is readable).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Pids of live processes whose command line contains `needle` as one argument or part of
/// one. Used only with needles unique to one test (its config path), to find daemons a test
/// started but whose pid it never learnt.
pub fn pids_with_arg(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let mut v = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let hit = cmdline
            .split(|b| *b == 0)
            .any(|arg| String::from_utf8_lossy(arg).contains(needle));
        if hit && pid_alive(pid) {
            v.push(pid);
        }
    }
    v
}
