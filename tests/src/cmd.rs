//! Running external commands with a time bound.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What a finished command produced.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// The command line, for messages.
    pub cmdline: String,
    pub status: ExitStatus,
    /// Exit code, `None` if killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Raw stdout bytes (for commands that print binary data).
    pub stdout_bytes: Vec<u8>,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// stdout and stderr together, for "mentions X" checks.
    pub fn all_output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// A multi-line description for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "command: {}\nexit: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline, self.code, self.stdout, self.stderr
        )
    }
}

fn cmdline(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            s.push_str(&format!("{a:?}"));
        } else {
            s.push_str(&a);
        }
    }
    s
}

fn reader(mut r: impl Read + Send + 'static, buf: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.lock().unwrap().extend_from_slice(&chunk[..n]),
            }
        }
    })
}

enum Outcome {
    Done(CmdOutput),
    TimedOut {
        line: String,
        stdout: String,
        stderr: String,
    },
    SpawnFailed {
        line: String,
        error: std::io::Error,
    },
}

fn run_inner(cmd: &mut Command, timeout: Duration) -> Outcome {
    let line = cmdline(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(error) => return Outcome::SpawnFailed { line, error },
    };
    let out = Arc::new(Mutex::new(Vec::new()));
    let err = Arc::new(Mutex::new(Vec::new()));
    let h_out = reader(child.stdout.take().expect("piped"), out.clone());
    let h_err = reader(child.stderr.take().expect("piped"), err.clone());
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => {}
            Err(error) => return Outcome::SpawnFailed { line, error },
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(100));
            return Outcome::TimedOut {
                line,
                stdout: String::from_utf8_lossy(&out.lock().unwrap()).into_owned(),
                stderr: String::from_utf8_lossy(&err.lock().unwrap()).into_owned(),
            };
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let grace = Instant::now() + Duration::from_secs(2);
    while !(h_out.is_finished() && h_err.is_finished()) && Instant::now() < grace {
        std::thread::sleep(Duration::from_millis(5));
    }
    if !(h_out.is_finished() && h_err.is_finished()) {
        eprintln!(
            "warning: `{line}` exited but a descendant still holds its stdout/stderr open \
             (a background process did not redirect its standard streams)"
        );
    }
    let stdout_bytes = out.lock().unwrap().clone();
    let stderr_bytes = err.lock().unwrap().clone();
    Outcome::Done(CmdOutput {
        cmdline: line,
        status,
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout_bytes).into_owned(),
        stderr: String::from_utf8_lossy(&stderr_bytes).into_owned(),
        stdout_bytes,
    })
}

/// Runs `cmd` (stdin from /dev/null) and waits at most `timeout`. On timeout the command is
/// killed and the test panics with what it printed so far. Never panics on a non-zero exit.
///
/// A command that leaves a background process holding its stdout/stderr (a daemon that forgot
/// to redirect its standard streams) does not hang the harness: after the command exits, the
/// output is collected for at most two more seconds.
pub fn run(cmd: &mut Command, timeout: Duration) -> CmdOutput {
    match run_inner(cmd, timeout) {
        Outcome::Done(o) => o,
        Outcome::TimedOut {
            line,
            stdout,
            stderr,
        } => panic!(
            "`{line}` did not finish within {timeout:?}; killed.\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        ),
        Outcome::SpawnFailed { line, error } => panic!("cannot run `{line}`: {error}"),
    }
}

/// [`run`], then panics with the full output unless the command exited 0.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> CmdOutput {
    let out = run(cmd, timeout);
    assert!(out.success(), "command failed:\n{}", out.describe());
    out
}

/// Like [`run`] but never panics (not even on timeout): for cleanup paths, which must not
/// panic while a test is already unwinding. Returns `None` on timeout or spawn failure.
pub fn run_quiet(cmd: &mut Command, timeout: Duration) -> Option<CmdOutput> {
    match run_inner(cmd, timeout) {
        Outcome::Done(o) => Some(o),
        Outcome::TimedOut { line, stderr, .. } => {
            eprintln!("cleanup: `{line}` timed out after {timeout:?}; killed. stderr: {stderr}");
            None
        }
        Outcome::SpawnFailed { line, error } => {
            eprintln!("cleanup: cannot run `{line}`: {error}");
            None
        }
    }
}
