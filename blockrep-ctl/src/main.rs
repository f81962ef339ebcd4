//! `blockrep-ctl`: the admin's command line, after drbdadm: `create-md`, `up`, `down`,
//! `primary`, `secondary`, `status`, `dump-md`. Offline commands (create-md, dump-md,
//! wipe-md) work on the backing device directly; the rest talk to the node's daemon over its control socket.

mod events;
mod states;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use blockrep::config::{Config, MetaLocation};
use blockrep::meta::MetaStore;
use clap::{Parser, Subcommand};
use proto::control::{Reply, Request, Status};

#[derive(Parser)]
#[command(
    name = "blockrep-ctl",
    version,
    about = "Control a blockrep resource on this node"
)]
struct Args {
    /// The resource's config file (the same file on both nodes).
    #[arg(
        short = 'c',
        long,
        global = true,
        default_value = "/etc/blockrep/r0.toml"
    )]
    config: PathBuf,
    /// This node's name in the config (default: the host name).
    #[arg(short = 'n', long, global = true)]
    node: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write fresh metadata on this node's backing device (or external metadata file).
    CreateMd {
        /// Overwrite existing metadata.
        #[arg(long)]
        force: bool,
    },
    /// Start the daemon if needed and bring the resource up.
    Up,
    /// Drain, flush and close the resource, and stop the daemon. Refused while NBD clients are
    /// attached (unmount first), unless --force.
    Down {
        /// Disconnect attached NBD clients (their outstanding requests fail) instead of
        /// refusing.
        #[arg(long)]
        force: bool,
    },
    /// Promote this node; --force declares its data good (first promotion, failover).
    Primary {
        /// Promote even though this node's data is not known to be up to date (first
        /// promotion of fresh metadata, failover from a dead primary).
        #[arg(long)]
        force: bool,
    },
    /// Demote this node; --force disconnects attached NBD clients.
    Secondary {
        /// Disconnect attached NBD clients (their outstanding requests fail) instead of
        /// refusing.
        #[arg(long)]
        force: bool,
    },
    /// Connect to the peer (the default after `up`).
    Connect {
        /// Become the sync target of the peer, discarding this node's divergent writes.
        #[arg(long)]
        discard_my_data: bool,
    },
    /// Drop the peer link and stay standalone until `connect`.
    Disconnect,
    /// Declare this node's data bad and fetch all of it from the peer (full resync).
    Invalidate,
    /// Declare the peer's data bad and send it all of this node's (DRBD's
    /// `invalidate-remote`): on the primary, connected to its secondary, a full resync to
    /// it, which is inconsistent until the resync ends.
    InvalidateRemote {
        /// `no` (DRBD 9's `--reset-bitmap=no`): resync only the regions already marked out
        /// of sync (what a `verify` found different), through a planned reconnect that runs
        /// no fence-peer handler (a `disconnect` and `connect` would).
        #[arg(long, value_name = "yes|no", default_value = "yes", action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
        reset_bitmap: bool,
    },
    /// Declare this node's disk outdated (what a primary's fence-peer handler runs here by
    /// another path): `primary` then needs --force until a connect to an up-to-date peer
    /// brings it up to date. Refused on a primary and while connected; works on a node that
    /// is down too (it writes the metadata).
    Outdate,
    /// Resume I/O suspended by fencing (DRBD's `resume-io`): under `fencing =
    /// "resource-and-stonith"` a primary that lost its peer holds every write (and read)
    /// until the fence-peer handler fenced the peer or the link is back. Run it only once the
    /// peer is known not to be promoted: the writes that follow are then acknowledged without
    /// it.
    ResumeIo,
    /// Pause the resync from this node (DRBD's `pause-sync`), e.g. during business hours:
    /// it stops before its next region, or waits from its first if it starts later; writes
    /// still replicate. Run it on the sync source (the node with the good data). Until
    /// `resume-sync` or the daemon's restart.
    PauseSync,
    /// Let a paused resync go on (DRBD's `resume-sync`).
    ResumeSync,
    /// With --clear-bitmap (DRBD's way to skip the initial sync): on a connected pair of
    /// freshly created secondaries whose disks are known to be identical (both new and
    /// zeroed, say), make both up to date with one new generation, without copying anything.
    NewCurrentUuid {
        /// Required: declare both disks identical and clear the bitmap.
        #[arg(long)]
        clear_bitmap: bool,
    },
    /// Online verify (on either node of a connected pair; the primary runs it): compare the
    /// hashes of every region with the peer's while I/O goes on, mark the differing regions
    /// out of sync on the primary and print how many differ. `invalidate-remote
    /// --reset-bitmap=no` on the primary then resyncs them (only them).
    Verify {
        /// Start it and return; follow it with `status`.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds (exit code 1; the verify goes on).
        /// Without it, waits as long as the verify runs (a large device at `resync-rate`
        /// takes hours).
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Wait until the peer is connected and has every write (on the primary), or this node is
    /// connected and up to date (on a secondary).
    WaitSync {
        /// Give up after this many seconds (exit code 1). Without it, waits as long as it
        /// takes (DRBD's `wait-sync`): an initial sync of a large device takes hours.
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Print this node's role and the peer's, `primary/secondary` (DRBD's `drbdadm role`;
    /// the peer is `unknown` while not connected). Exit 3 when the resource is not up.
    Role,
    /// Print the connection state: connected, connecting, standalone, sync-source,
    /// sync-target or split-brain (DRBD's `cstate`). Exit 3 when the resource is not up.
    Cstate,
    /// Print this node's disk state and the peer's, `up-to-date/outdated` (DRBD's `dstate`;
    /// `failed` for a disk whose sync failed). Exit 3 when the resource is not up.
    Dstate,
    /// Show the resource's state.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Print the metadata in readable form.
    DumpMd,
    /// Destroy this node's metadata (DRBD's `wipe-md`): superblock, journal, bitmap and
    /// activity log. The data stays; with internal metadata at the start of the backing
    /// device, where a filesystem made through blockrep can be mounted directly. Refused
    /// while the resource is up. Asks for `yes` on a terminal; elsewhere needs --force.
    WipeMd {
        /// Wipe without asking.
        #[arg(long)]
        force: bool,
    },
    /// Print the node's state as lines (`exists ...`, then `exists -`), then a line for every
    /// change of it (`change`, `create`, `destroy`), until stopped: DRBD's `drbdsetup
    /// events2`, for monitoring scripts. Objects: resource (up, role), device (disk, disk
    /// failed, stalled, clients), connection (state, peer role), peer-device (peer disk, out
    /// of sync, fence outcome, verify). A daemon that stops is followed until it is back.
    Events {
        /// Print the current state and exit.
        #[arg(long)]
        now: bool,
    },
    /// Read the config file again and apply what changed to the running node (DRBD's
    /// `adjust`): protocol (a connected peer is told it), resync rates, ko-count, fencing and
    /// handlers at once; csums from the next resync; encryption, secret, after-sb-0pri and the
    /// peer's addresses from the next connection. Disks, addresses this node binds,
    /// al-extents, I/O engine, direct-io and metadata sizes need `down` and `up` and are only
    /// reported. Brings a resource that is not up up.
    Adjust {
        /// Print what would change and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn main() {
    // Behave like a Unix filter: `blockrep-ctl status | head` ends quietly on a closed pipe.
    // SAFETY: resetting a signal disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            // Not clap's 2, which is `verify`'s "the replicas differ": a usage error is a
            // failure to run, 1, like any other.
            std::process::exit(if e.use_stderr() { 1 } else { 0 });
        }
    };
    if let Err(e) = run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let cfg = Config::load(&args.config, args.node.as_deref())?;
    match args.cmd {
        Cmd::CreateMd { force } => create_md(&cfg, force),
        Cmd::DumpMd => dump_md(&cfg),
        Cmd::WipeMd { force } => wipe_md(&cfg, force),
        Cmd::Up => up(&cfg),
        Cmd::Down { force } => down(&cfg, force),
        Cmd::Primary { force } => simple(&cfg, Request::Primary { force }),
        Cmd::Secondary { force } => simple(&cfg, Request::Secondary { force }),
        Cmd::Connect { discard_my_data } => simple(&cfg, Request::Connect { discard_my_data }),
        Cmd::Disconnect => simple(&cfg, Request::Disconnect),
        Cmd::Invalidate => simple(&cfg, Request::Invalidate),
        Cmd::InvalidateRemote { reset_bitmap } => {
            simple(&cfg, Request::InvalidateRemote { reset_bitmap })
        }
        Cmd::Outdate => outdate(&cfg),
        Cmd::ResumeIo => simple(&cfg, Request::ResumeIo),
        Cmd::PauseSync => simple(&cfg, Request::PauseSync),
        Cmd::ResumeSync => simple(&cfg, Request::ResumeSync),
        Cmd::Adjust { dry_run } => adjust(&cfg, dry_run),
        Cmd::Events { now } => follow_events(&cfg, now),
        Cmd::NewCurrentUuid { clear_bitmap } => {
            if !clear_bitmap {
                bail!(
                    "new-current-uuid is only supported with --clear-bitmap (skip the initial sync of two fresh, identical disks)"
                );
            }
            simple(&cfg, Request::SkipInitialSync)
        }
        Cmd::Verify { no_wait, timeout } => verify(&cfg, no_wait, timeout),
        Cmd::Status { json } => {
            if !status(&cfg, json)? {
                std::process::exit(EXIT_NOT_UP);
            }
            Ok(())
        }
        Cmd::WaitSync { timeout } => wait_sync(&cfg, timeout),
        Cmd::Role => state_query(&cfg, states::Query::Role),
        Cmd::Cstate => state_query(&cfg, states::Query::Cstate),
        Cmd::Dstate => state_query(&cfg, states::Query::Dstate),
    }
}

fn external(cfg: &Config) -> Option<&Path> {
    match &cfg.me.meta {
        MetaLocation::Internal => None,
        MetaLocation::External(p) => Some(p),
    }
}

/// How long a command waits for the daemon's answer: role changes and `down` may wait for
/// the disk and the peer, and a fenced promotion for one or two fence-peer runs (60 s each).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);
/// How long `up` waits for a daemon that hangs up on it to go away before starting a new one.
const DYING_DAEMON_WAIT: Duration = Duration::from_secs(10);
/// How long `status` waits: the daemon answers it off its runtime thread, so only a hung
/// daemon (or a disk stalled under its metadata lock) takes longer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `outdate` waits (its status question and the commit itself).
const OUTDATE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to the daemon's control socket, if one answers.
struct Control {
    stream: BufReader<UnixStream>,
    timeout: Duration,
}

impl Control {
    /// `Ok(None)` when no daemon listens; an error when one may (permissions, say): "not
    /// running" is never said of a daemon that is.
    fn connect(cfg: &Config) -> Result<Option<Control>> {
        Self::connect_within(cfg, COMMAND_TIMEOUT)
    }

    /// [`Self::connect`] with its own bound on the answer.
    fn connect_within(cfg: &Config, timeout: Duration) -> Result<Option<Control>> {
        let Some(s) = connect_control(cfg)? else {
            return Ok(None);
        };
        let mut c = Self::over(s, timeout).context("setting up the control connection")?;
        c.identify(cfg)?;
        Ok(Some(c))
    }

    /// Checks that the daemon serves this config's resource and node: two config files that
    /// name one control socket reach one daemon, and a command meant for one resource must
    /// not act on another. A daemon of a build before `Identify` is not checked.
    fn identify(&mut self, cfg: &Config) -> Result<()> {
        match self.call(&Request::Identify)? {
            Reply::Ok { message } => check_identity(cfg, &message),
            _ => Ok(()),
        }
    }

    /// A control connection over a socket already connected.
    fn over(s: UnixStream, timeout: Duration) -> std::io::Result<Control> {
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(Control {
            stream: BufReader::new(s),
            timeout,
        })
    }

    fn call(&mut self, req: &Request) -> Result<Reply> {
        if let Err(e) = self.stream.get_mut().write_all(req.to_line().as_bytes()) {
            if is_hangup(&e) {
                return Err(anyhow::Error::new(DaemonHungUp));
            }
            return Err(anyhow::Error::new(e).context("sending to the daemon"));
        }
        let mut line = String::new();
        // Bounded: whatever answers at this path (a wrong `control` setting) cannot make
        // this grow without end. A status is a few KiB.
        let read = std::io::Read::take(&mut self.stream, MAX_REPLY).read_line(&mut line);
        if read.is_ok() && !line.is_empty() && !line.ends_with('\n') {
            bail!("the reply on the control socket is longer than {MAX_REPLY} bytes or unterminated: is a blockrep daemon listening there?");
        }
        if let Err(e) = read {
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                bail!(
                    "the daemon did not answer within {} s (hung, or stalled on its disk)",
                    self.timeout.as_secs()
                );
            }
            if is_hangup(&e) {
                return Err(anyhow::Error::new(DaemonHungUp));
            }
            return Err(anyhow::Error::new(e).context("reading the daemon's reply"));
        }
        if line.is_empty() {
            return Err(anyhow::Error::new(DaemonHungUp));
        }
        serde_json::from_str(line.trim_end()).context("decoding the daemon's reply")
    }
}

/// The daemon dropped a control connection without answering: it is going down, or it was
/// killed and its last threads still held the socket when we connected (a kill -9 makes the
/// process a zombie before every thread has closed its files).
#[derive(Debug)]
struct DaemonHungUp;

impl std::fmt::Display for DaemonHungUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the daemon closed the control connection without answering")
    }
}

impl std::error::Error for DaemonHungUp {}

fn is_hangup(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
    )
}

fn daemon_status(cfg: &Config) -> Option<Status> {
    query_status(cfg).ok().flatten()
}

/// For commands that poll the status until something happens (`wait-sync`, `verify`): `None`
/// when a daemon is there but did not answer this time (a disk stalled under its metadata
/// lock, say: noted, and the caller polls again until its own deadline), an error only when
/// no daemon runs.
fn poll_status(cfg: &Config) -> Result<Option<Status>> {
    match query_status(cfg) {
        Ok(Some(s)) => Ok(Some(s)),
        Ok(None) => Err(anyhow!(not_running(cfg))),
        Err(e) => {
            eprintln!("status: {e:#}; asking again");
            Ok(None)
        }
    }
}

/// The daemon's status: `Ok(None)` when no daemon listens (no control socket, or nobody
/// accepts on it), an error when one may be there but did not answer (permissions, a hung
/// daemon, a garbled reply): "not running" must not be said of a daemon that is running.
fn query_status(cfg: &Config) -> Result<Option<Status>> {
    query_status_within(cfg, STATUS_TIMEOUT)
}

/// The node's control socket: `Ok(None)` when no daemon listens (no socket, or nobody
/// accepts on it); an error for anything else (permissions, say), never "not running".
///
/// The connect does not block: a daemon hung long enough for its backlog of connections to
/// fill would otherwise hold this call for ever (a cron `status` must end). A full backlog is
/// tried again for up to [`FULL_BACKLOG_RETRY`]: a daemon that was stopped or busy for a
/// moment accepts what queued up meanwhile within it.
fn connect_control(cfg: &Config) -> Result<Option<UnixStream>> {
    use nix::errno::Errno;
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let path = &cfg.me.control;
    let failed = |e: Errno| anyhow!("connecting to the control socket {}: {e}", path.display());
    let addr = UnixAddr::new(path.as_path()).map_err(failed)?;
    let deadline = Instant::now() + FULL_BACKLOG_RETRY;
    let fd = loop {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(failed)?;
        match connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
            Ok(()) => break fd,
            Err(Errno::ENOENT | Errno::ECONNREFUSED) => return Ok(None),
            Err(Errno::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(Errno::EAGAIN) => bail!(
                "the daemon's control socket {} takes no more connections (the daemon is hung, or stalled on its disk)",
                path.display()
            ),
            Err(e) => return Err(failed(e)),
        }
    };
    let s = UnixStream::from(fd);
    s.set_nonblocking(false)
        .context("setting up the control connection")?;
    Ok(Some(s))
}

/// How long a full backlog of the control socket is tried again (see [`connect_control`]).
const FULL_BACKLOG_RETRY: Duration = Duration::from_secs(2);

/// See [`Control::identify`]: `served` is the daemon's `RESOURCE NODE`.
fn check_identity(cfg: &Config, served: &str) -> Result<()> {
    let mine = format!("{} {}", cfg.resource, cfg.me.name);
    if served.trim() != mine {
        let (resource, node) = served.trim().split_once(' ').unwrap_or((served, "?"));
        bail!(
            "the control socket {} is resource {resource} node {node}'s, not resource {} node {}'s: two config files name the same `control` path (give each resource its own), or the file was changed since `up` (stop that daemon with the file it was started from); nothing done",
            cfg.me.control.display(),
            cfg.resource,
            cfg.me.name
        );
    }
    Ok(())
}

/// [`query_status`] with its own bound.
fn query_status_within(cfg: &Config, timeout: Duration) -> Result<Option<Status>> {
    let Some(s) = connect_control(cfg)? else {
        return Ok(None);
    };
    s.set_read_timeout(Some(timeout))
        .context("setting a timeout on the control socket")?;
    let mut c = Control {
        stream: BufReader::new(s),
        timeout,
    };
    match c.call(&Request::Status)? {
        Reply::Status { status } => {
            check_identity(cfg, &format!("{} {}", status.resource, status.node))?;
            Ok(Some(*status))
        }
        other => Err(anyhow!("unexpected reply to status: {other:?}")),
    }
}

fn expect_ok(reply: Reply) -> Result<String> {
    match reply {
        Reply::Ok { message } => Ok(message),
        Reply::Error { message } => Err(anyhow!(message)),
        Reply::Status { .. } => Err(anyhow!("unexpected status reply")),
    }
}

fn not_running(cfg: &Config) -> String {
    format!(
        "resource {} on node {}: daemon not running (control socket {})",
        cfg.resource,
        cfg.me.name,
        cfg.me.control.display()
    )
}

fn simple(cfg: &Config, req: Request) -> Result<()> {
    let mut c = Control::connect(cfg)?.ok_or_else(|| anyhow!(not_running(cfg)))?;
    println!("{}", expect_ok(c.call(&req)?)?);
    Ok(())
}

/// How often `events` looks for a daemon that is not running (to print it coming back), and
/// asks for the status of one that cannot stream its events (an older build).
const EVENTS_POLL: Duration = Duration::from_millis(200);
/// Longest status line an `events` stream may send.
const EVENTS_MAX_LINE: usize = 1 << 20;

/// What an `events` stream said next.
enum StreamNext {
    Status(Box<Status>),
    /// Nothing for [`STATUS_TIMEOUT`], where the daemon says something every second: hung,
    /// or stalled on its disk.
    Silent,
    /// The daemon closed the stream (it went down, or was killed) or garbled it.
    Closed,
    /// The daemon ended the stream with this error (too many followers, a failed status).
    Failed(String),
    /// The daemon does not stream events (a build before it did): it is asked for its status
    /// every [`EVENTS_POLL`] instead.
    Refused,
}

/// An `events` stream from the daemon (see `Request::Events`).
struct EventStream {
    rd: BufReader<UnixStream>,
    line: Vec<u8>,
}

impl EventStream {
    /// `Ok(None)`: no daemon runs for the node.
    fn open(cfg: &Config) -> Result<Option<EventStream>> {
        let Some(mut s) = connect_control(cfg)? else {
            return Ok(None);
        };
        s.set_read_timeout(Some(STATUS_TIMEOUT))
            .context("setting a timeout on the control socket")?;
        if let Err(e) = s.write_all(Request::Events.to_line().as_bytes()) {
            // A daemon going away as we connected: as if it were gone already.
            return if is_hangup(&e) {
                Ok(None)
            } else {
                Err(anyhow::Error::new(e).context("sending to the daemon"))
            };
        }
        Ok(Some(EventStream {
            rd: BufReader::new(s),
            line: Vec::new(),
        }))
    }

    fn next(&mut self) -> StreamNext {
        // A line cut by the timeout stays in `line` and is completed by the next read.
        let room = EVENTS_MAX_LINE.saturating_sub(self.line.len()) as u64;
        match std::io::Read::take(&mut self.rd, room).read_until(b'\n', &mut self.line) {
            Ok(_) if !self.line.ends_with(b"\n") => {
                if self.line.len() >= EVENTS_MAX_LINE {
                    eprintln!(
                        "events: a status line longer than {EVENTS_MAX_LINE} bytes: reconnecting"
                    );
                }
                // Else the end of the stream, mid-line or not.
                return StreamNext::Closed;
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return StreamNext::Silent
            }
            Err(_) => return StreamNext::Closed,
        }
        let line = std::mem::take(&mut self.line);
        match serde_json::from_slice::<Reply>(&line) {
            Ok(Reply::Status { status }) => StreamNext::Status(status),
            Ok(Reply::Error { message }) if message.starts_with("bad control request") => {
                StreamNext::Refused
            }
            Ok(Reply::Error { message }) => StreamNext::Failed(message),
            Ok(Reply::Ok { .. }) | Err(_) => {
                eprintln!("events: the daemon sent something other than a status: reconnecting");
                StreamNext::Closed
            }
        }
    }
}

/// `events`: the state first, then every change the daemon pushes (see `Request::Events`).
/// A daemon that is not running is looked for every [`EVENTS_POLL`] until it is back.
fn follow_events(cfg: &Config, now: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let mut last: Option<Vec<events::Object>> = None;
    let mut answering = true;
    let mut emit = |out: &mut std::io::StdoutLock, st: Option<&Status>, answering: &mut bool| {
        let next = events::objects(&cfg.resource, &cfg.me.name, st);
        let mut lines = Vec::new();
        if st.is_some() && !*answering {
            *answering = true;
            lines.push(events::answering(&cfg.resource, true));
        }
        lines.extend(match &last {
            None => events::exists(&next),
            Some(before) => events::diff(before, &next),
        });
        last = Some(next);
        for l in lines {
            writeln!(out, "{l}")?;
        }
        out.flush()
    };
    if now {
        emit(&mut out, query_status(cfg)?.as_ref(), &mut answering)?;
        return Ok(());
    }
    let mut polling = false;
    let mut first = true;
    // Streams in a row that ended without a status (refused, or ended by the daemon), and
    // the last error a daemon gave (said once, not at every retry).
    let mut fruitless = 0u32;
    let mut said: Option<String> = None;
    loop {
        let stream = if polling {
            None
        } else {
            match EventStream::open(cfg) {
                Ok(Some(s)) => Some(s),
                Ok(None) => {
                    // Not running (or gone): its objects go, and it is looked for again.
                    emit(&mut out, None, &mut answering)?;
                    first = false;
                    fruitless = 0;
                    std::thread::sleep(EVENTS_POLL);
                    continue;
                }
                // Only the first time: a follower outlives a daemon's restarts and hiccups
                // (one it cannot reach now is not one that is down: said as not answering).
                Err(e) if first => return Err(e),
                Err(_) => None,
            }
        };
        let Some(mut stream) = stream else {
            let answered = if polling {
                // The fallback: the status, every EVENTS_POLL.
                match query_status(cfg) {
                    Ok(st) => {
                        emit(&mut out, st.as_ref(), &mut answering)?;
                        true
                    }
                    Err(e) if first => return Err(e),
                    Err(_) => false,
                }
            } else {
                false
            };
            first = false;
            if !answered && answering {
                answering = false;
                writeln!(out, "{}", events::answering(&cfg.resource, false))?;
                out.flush()?;
            }
            std::thread::sleep(EVENTS_POLL);
            continue;
        };
        let mut heard = false;
        loop {
            match stream.next() {
                StreamNext::Status(st) => {
                    heard = true;
                    first = false;
                    fruitless = 0;
                    said = None;
                    emit(&mut out, Some(&st), &mut answering)?
                }
                // Hung (or stalled on its disk) when `events` starts: an error, as `status`
                // says it, rather than a follower that prints nothing.
                StreamNext::Silent if first => bail!(
                    "the daemon did not answer within {} s (hung, or stalled on its disk)",
                    STATUS_TIMEOUT.as_secs()
                ),
                // A daemon that does not answer is said once; what it shows then is its last
                // state.
                StreamNext::Silent => {
                    if answering {
                        answering = false;
                        writeln!(out, "{}", events::answering(&cfg.resource, false))?;
                        out.flush()?;
                    }
                }
                StreamNext::Closed => break,
                StreamNext::Failed(message) => {
                    if first {
                        bail!("events: {message}");
                    }
                    if said.as_deref() != Some(message.as_str()) {
                        eprintln!("events: the daemon said: {message}");
                        said = Some(message);
                    }
                    break;
                }
                StreamNext::Refused => {
                    polling = true;
                    break;
                }
            }
        }
        if !heard && !polling {
            fruitless += 1;
            // A daemon that keeps ending streams without a status is not answering.
            if fruitless >= 3 && answering {
                answering = false;
                writeln!(out, "{}", events::answering(&cfg.resource, false))?;
                out.flush()?;
            }
        }
        if !polling {
            // Gone (or going): looked for again at once, then every EVENTS_POLL; a daemon
            // that ends streams without a status every EVENTS_POLL.
            std::thread::sleep(if heard {
                Duration::from_millis(20)
            } else {
                EVENTS_POLL
            });
        }
    }
}

fn adjust(cfg: &Config, dry_run: bool) -> Result<()> {
    // The daemon reads the file itself (and the secret file it names), by its full path.
    let config = std::fs::canonicalize(&cfg.file).unwrap_or_else(|_| cfg.file.clone());
    let req = Request::Adjust {
        config: config.to_string_lossy().into_owned(),
        node: cfg.me.name.clone(),
        dry_run,
    };
    match ask_running_daemon(cfg, &req)? {
        Some(reply) => {
            println!("{}", expect_ok(reply)?);
            Ok(())
        }
        None => {
            // No daemon answers on the config's control socket, but one holds this node's
            // disk: it was started from a config whose `control` differs (a second daemon
            // would only fail to claim the disk).
            if blockrep::meta::claimed_by_another(&cfg.me.backing) {
                bail!(
                    "resource {} does not answer on {}, but its disk is in use: another blockrep daemon holds {}. If it is this resource's, it was started from a config whose `control` differs, and adjust cannot move a running daemon's control socket: run `down` with the config it was started with, then `up` with this one",
                    cfg.resource,
                    cfg.me.control.display(),
                    cfg.me.backing.display()
                );
            }
            // No daemon runs for this node: DRBD's adjust brings the resource up.
            if dry_run {
                println!(
                    "resource {} is not up on {}: adjust would bring it up",
                    cfg.resource, cfg.me.name
                );
                return Ok(());
            }
            println!(
                "resource {} is not up on {}: bringing it up",
                cfg.resource, cfg.me.name
            );
            up(cfg)
        }
    }
}

/// Sends `req` to the node's daemon and returns its answer; `Ok(None)` when no daemon
/// listens (no socket, or nobody accepts on it). A daemon that hangs up without answering is
/// on its way out (a `down` in progress, or a kill -9 whose last threads still hold the
/// socket): waited out, then taken as gone. Any other failure to reach it (permissions, say)
/// is an error, never "not running".
fn ask_running_daemon(cfg: &Config, req: &Request) -> Result<Option<Reply>> {
    let dying_since = Instant::now();
    loop {
        let Some(s) = connect_control(cfg)? else {
            return Ok(None);
        };
        let mut c = Control::over(s, COMMAND_TIMEOUT).context("control socket")?;
        match c.identify(cfg).and_then(|()| c.call(req)) {
            Ok(reply) => return Ok(Some(reply)),
            Err(e) if e.is::<DaemonHungUp>() && dying_since.elapsed() < DYING_DAEMON_WAIT => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

/// For the offline metadata commands: refused while the resource is up (or when that cannot
/// be told); then the node's disk (and external metadata) claimed, held by the caller until
/// it is done, so that a daemon started meanwhile (or already running from another config)
/// writes nothing under it. `done`/`doing`: what the command does to the metadata, for the
/// messages ("written", "writing metadata").
fn claim_while_down(cfg: &Config, done: &str, doing: &str) -> Result<blockrep::meta::Claim> {
    let st = query_status(cfg).with_context(|| {
        format!(
            "cannot tell whether the daemon uses this device; metadata is {done} only when it is known to be down"
        )
    })?;
    if st.is_some_and(|s| s.up) {
        bail!(
            "resource {} is up on {}: take it down before {doing}",
            cfg.resource,
            cfg.me.name
        );
    }
    Ok(blockrep::meta::claim(
        &cfg.me.backing,
        external(cfg),
        false,
    )?)
}

fn create_md(cfg: &Config, force: bool) -> Result<()> {
    let _claim = claim_while_down(cfg, "written", "writing metadata")?;
    // What is on the device already, for the report below (create refuses to cut it).
    let found = blockrep::meta::probe_backing(&cfg.me.backing)
        .ok()
        .flatten();
    let sb = MetaStore::create(
        &cfg.me.backing,
        external(cfg),
        &cfg.resource,
        &cfg.me.name,
        cfg.journal_size,
        cfg.bitmap_granularity,
        force,
    )?;
    let l = sb.layout;
    println!(
        "metadata written for resource {} node {} on {}: {} bytes of data exported, {} bytes of metadata (bitmap {} at {} B/bit, activity log {}, journal {})",
        cfg.resource,
        cfg.me.name,
        external(cfg).unwrap_or(&cfg.me.backing).display(),
        l.data_size,
        l.meta_len(),
        l.bitmap_len,
        l.granularity,
        l.al_len,
        l.journal_len
    );
    // `up` refuses a bitmap larger than a node keeps: said here, where it is made, with the
    // granularity that fits (each doubling halves the bitmap).
    let most = proto::bitmap_wire::MAX_BITMAP_BYTES;
    if cfg.peer.is_some() && l.bitmap_len > most {
        let mut fits = l.granularity;
        while l.bitmap_len * l.granularity / fits > most {
            fits *= 2;
        }
        bail!(
            "this device's dirty bitmap is {} MiB at bitmap-granularity {} bytes, more than the {} MiB a node keeps, and `up` would refuse it: set bitmap-granularity to {} or more and run create-md --force",
            l.bitmap_len >> 20,
            l.granularity,
            most >> 20,
            fits
        );
    }
    if let Some(f) = found {
        if external(cfg).is_some() || !f.cut_by(l.data_size) {
            println!(
                "{} holds {}: it fits in the exported range and is kept",
                cfg.me.backing.display(),
                f.describe()
            );
        } else {
            eprintln!(
                "warning: {} held {}; --force wrote the metadata over {} end",
                cfg.me.backing.display(),
                f.describe(),
                if f.bytes.is_some() {
                    "its"
                } else {
                    "what may be its"
                }
            );
        }
    }
    Ok(())
}

/// `outdate`: through the daemon when it runs; otherwise in the metadata itself (a fence-peer
/// handler must be able to outdate a node whose daemon is down, or it would come up later
/// looking up to date).
fn outdate(cfg: &Config) -> Result<()> {
    // Bounded: a fence-peer handler waits for this, and a hung daemon must fail it in
    // seconds (the handler then says it could not fence), not after minutes.
    let st = query_status_within(cfg, OUTDATE_TIMEOUT).context(
        "cannot tell whether the daemon uses this device; the metadata is written only when it is known to be down",
    )?;
    if st.is_some_and(|s| s.up) {
        let mut c = Control::connect_within(cfg, OUTDATE_TIMEOUT)?
            .ok_or_else(|| anyhow!(not_running(cfg)))?;
        println!("{}", expect_ok(c.call(&Request::Outdate)?)?);
        return Ok(());
    }
    if cfg.peer.is_none() {
        bail!("the resource has no peer: there is nothing this disk could be older than");
    }
    // A daemon whose resource is down holds neither device; one that starts meanwhile
    // waits for this claim (or fails its `up`), so nothing is written under it.
    let _claim = blockrep::meta::claim(&cfg.me.backing, external(cfg), false)?;
    let mut m = MetaStore::open(&cfg.me.backing, external(cfg), &cfg.resource, &cfg.me.name)?;
    // Not running, so not primary: a node that went down as one may be outdated too (the
    // peer that asks takes over; this copy is then the older).
    let what = blockrep::state::outdate(false, false, m.sb.disk).map_err(|e| anyhow!(e))?;
    let me = &cfg.me.name;
    match what {
        blockrep::state::Outdate::AlreadyOutdated => {
            println!("{me}'s disk is already outdated (daemon not running)")
        }
        blockrep::state::Outdate::AlreadyInconsistent => println!(
            "{me}'s disk is inconsistent, which is worse than outdated: nothing to do (daemon not running)"
        ),
        blockrep::state::Outdate::Commit => {
            m.sb.disk = blockrep::meta::DiskState::Outdated;
            m.commit()?;
            println!(
                "{me}'s disk is now outdated in its metadata (daemon not running): `primary` needs --force there until a connect to an up-to-date peer brings it up to date"
            );
        }
    }
    Ok(())
}

fn wipe_md(cfg: &Config, force: bool) -> Result<()> {
    use blockrep::meta::DiskState;
    let _claim = claim_while_down(cfg, "wiped", "wiping its metadata")?;
    let m = MetaStore::open(&cfg.me.backing, external(cfg), &cfg.resource, &cfg.me.name)?;
    let sb = &m.sb;
    println!(
        "metadata of resource {} node {} on {}: disk {}, generation {:016X}, {} bytes of data",
        sb.resource,
        sb.node,
        m.path().display(),
        sb.disk.name(),
        sb.gen.current,
        sb.layout.data_size
    );
    if sb.disk != DiskState::UpToDate || sb.lost_writes {
        println!(
            "note: this disk is not up to date: its data is not a complete copy of the resource"
        );
    }
    if sb.was_primary {
        println!(
            "note: this node was primary when it stopped last: its activity log, which names the regions its peer may lack, goes with the metadata"
        );
    }
    if !force {
        if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            bail!(
                "wipe-md destroys this metadata (generations, bitmap, journal): run it with --force to confirm (it asks only on a terminal)"
            );
        }
        print!("Type 'yes' to wipe it: ");
        std::io::Write::flush(&mut std::io::stdout()).context("stdout")?;
        let mut answer = String::new();
        std::io::stdin()
            .read_line(&mut answer)
            .context("reading the answer")?;
        if answer.trim() != "yes" {
            bail!("not wiped");
        }
    }
    let path = m.path().to_owned();
    let sb = m.wipe()?;
    println!(
        "metadata wiped on {}; the {} bytes of data stay at the start of {}{}. `create-md` makes this node anew (its data then comes from the peer in a full sync)",
        path.display(),
        sb.layout.data_size,
        cfg.me.backing.display(),
        if external(cfg).is_none() {
            ", where a filesystem made through blockrep can be mounted directly"
        } else {
            ""
        }
    );
    Ok(())
}

fn dump_md(cfg: &Config) -> Result<()> {
    let m = MetaStore::open(&cfg.me.backing, external(cfg), &cfg.resource, &cfg.me.name)?;
    let sb = &m.sb;
    let l = &sb.layout;
    println!("# blockrep metadata on {}", m.path().display());
    println!("resource        {}", sb.resource);
    println!("node            {}", sb.node);
    println!(
        "format          {}{}",
        m.format,
        if m.format < blockrep::meta::FORMAT_VERSION {
            " (an earlier one: the next metadata commit writes the current one)"
        } else {
            ""
        }
    );
    println!("superblock-seq  {}", sb.seq);
    println!("disk            {}", sb.disk.name());
    if sb.lost_writes {
        println!("lost-writes     yes (a sync of this disk failed: every region out of sync until a resync ends)");
    }
    println!("was-primary     {}", sb.was_primary);
    println!("current-gen     {:016X}", sb.gen.current);
    println!("bitmap-gen      {:016X}", sb.gen.bitmap);
    println!(
        "history-gen     {:016X} {:016X}",
        sb.gen.history[0], sb.gen.history[1]
    );
    println!("peer-up-to-date {}", sb.peer_up_to_date);
    println!("applied-seq     {}", sb.applied_seq);
    println!("applied-term    {:016X}", sb.applied_term);
    println!("issued-seq      {}", sb.issued_seq);
    println!("agreed-size     {}", sb.agreed_size);
    // A clean `down` of either side (see the README's runbook).
    println!("peer-left       {}", sb.peer_left);
    println!("handed-over     {}", sb.handed_over);
    // What the peer last said its disk holds (a restored image of it holds less).
    println!(
        "peer-durable    gen {:016X} seq {}",
        sb.peer_durable.0, sb.peer_durable.1
    );
    // A resync's end the peer may have taken without this node hearing so.
    if sb.sync_done_unacked() != 0 {
        println!(
            "sync-done-unacked {:016X} (the peer may be at this generation: a bitmap resync brings it up to date)",
            sb.sync_done_unacked()
        );
    }
    println!("data-size       {}", l.data_size);
    println!(
        "bitmap          offset {} len {} ({} B/bit)",
        l.bitmap_offset, l.bitmap_len, l.granularity
    );
    println!("activity-log    offset {} len {}", l.al_offset, l.al_len);
    println!(
        "journal         offset {} len {}",
        l.journal_offset, l.journal_len
    );
    println!(
        "journal-ckpt    pos {} seq {} prev-term {:016X}{}",
        sb.journal_pos,
        sb.journal_seq,
        sb.journal_prev_term,
        if sb.journal_overflowed {
            " (overflowed)"
        } else {
            ""
        }
    );
    println!("superblocks     offset {}", l.sb_offset);
    println!("created-unix    {}", sb.created_unix);
    Ok(())
}

/// The daemon binary: next to this one, else on PATH.
fn daemon_binary() -> PathBuf {
    if let Ok(me) = std::env::current_exe() {
        if let Some(dir) = me.parent() {
            let p = dir.join("blockrep");
            if p.is_file() {
                return p;
            }
        }
    }
    PathBuf::from("blockrep")
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

fn up(cfg: &Config) -> Result<()> {
    if let Some(reply) = ask_running_daemon(cfg, &Request::Up)? {
        println!("{}", expect_ok(reply)?);
        return Ok(());
    }
    if let Some(dir) = cfg.me.log_file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&cfg.me.log_file)
        .with_context(|| format!("opening log file {}", cfg.me.log_file.display()))?;
    let config = std::fs::canonicalize(&cfg.file).unwrap_or_else(|_| cfg.file.clone());
    let bin = daemon_binary();
    let mut child = Command::new(&bin)
        .arg("--config")
        .arg(&config)
        .arg("--node")
        .arg(&cfg.me.name)
        .arg("--up")
        // A daemon started here is not the service manager's: it must not speak for the
        // unit `blockrep-ctl` may run inside (sd_notify READY=1).
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C at the admin's terminal does not reach the daemon.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    // Bringing a resource up reads its whole journal (up to 16 GiB), and after a crash as
    // primary writes it back: that may take minutes on a slow disk. The daemon is never
    // killed for being slow (a kill would restart the same recovery): after a while the
    // admin is told it is still at it, and at the end of the wait it is left running.
    let started = Instant::now();
    let mut told = false;
    let deadline = started + Duration::from_secs(UP_WAIT_S);
    loop {
        if !told && started.elapsed() > Duration::from_secs(30) {
            told = true;
            eprintln!(
                "the daemon (pid {}) is still bringing {} up (a large journal, or recovery after a crash); waiting up to {UP_WAIT_S} s. Its log: {}",
                child.id(),
                cfg.resource,
                cfg.me.log_file.display()
            );
        }
        if let Some(st) = daemon_status(cfg) {
            if st.up {
                println!(
                    "resource {} up on {} (daemon pid {}, export {}, log {})",
                    cfg.resource,
                    cfg.me.name,
                    st.pid,
                    st.export,
                    cfg.me.log_file.display()
                );
                for w in &st.warnings {
                    println!("warning: {w}");
                }
                return Ok(());
            }
        }
        if let Some(code) = child.try_wait()? {
            bail!(
                "the daemon exited ({code}) while bringing {} up; its log ({}) ends with:\n{}",
                cfg.resource,
                cfg.me.log_file.display(),
                tail(&cfg.me.log_file, 5)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the daemon (pid {}) has not brought {} up within {UP_WAIT_S} s and is left running (it may still be recovering): see {}; `blockrep-ctl status` says when it is up, `kill {}` stops it",
                child.id(),
                cfg.resource,
                cfg.me.log_file.display(),
                child.id()
            );
        }
        std::thread::sleep(Duration::from_millis(if told { 200 } else { 20 }));
    }
}

/// The longest control reply read.
const MAX_REPLY: u64 = 1 << 20;

/// How long `up` waits for a daemon it started to bring the resource up.
const UP_WAIT_S: u64 = 600;

fn pid_alive(pid: u32) -> bool {
    pid != 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

fn down(cfg: &Config, force: bool) -> Result<()> {
    let Some(mut c) = Control::connect(cfg)? else {
        println!("{}", not_running(cfg));
        return Ok(());
    };
    let pid = match c.call(&Request::Status)? {
        Reply::Status { status } => status.pid,
        _ => 0,
    };
    let msg = expect_ok(c.call(&Request::Down { force })?)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while pid_alive(pid) && !is_zombie(pid) {
        if Instant::now() > deadline {
            bail!("{msg}, but daemon pid {pid} is still running after 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("{msg}");
    Ok(())
}

/// A daemon started by this very process (tests) lingers as a zombie until reaped.
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

fn human_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Exit status of `status` when the resource is not up (the daemon is not running, or runs
/// with the resource down): what LSB init scripts use for "not running", so that
/// `blockrep-ctl status || alert` works. The report is printed all the same.
const EXIT_NOT_UP: i32 = 3;
/// `verify` ran to its end and found regions that differ.
const EXIT_DIFFER: i32 = 2;
/// Exit status of `status` when a daemon may be running but did not answer (LSB: "status
/// unknown"); the error is printed.
const EXIT_UNKNOWN: i32 = 4;

/// `role`, `cstate`, `dstate`: one line on stdout; a resource that is not up exits
/// [`EXIT_NOT_UP`] with the reason on stderr, and a daemon that does not answer
/// [`EXIT_UNKNOWN`], as `status` does.
fn state_query(cfg: &Config, q: states::Query) -> Result<()> {
    match query_status(cfg) {
        Ok(Some(s)) if s.up => {
            println!("{}", states::line(q, &s));
            Ok(())
        }
        Ok(Some(_)) => {
            eprintln!(
                "resource {} is not up on {} (the daemon runs; blockrep-ctl up)",
                cfg.resource, cfg.me.name
            );
            std::process::exit(EXIT_NOT_UP);
        }
        Ok(None) => {
            eprintln!("{}", not_running(cfg));
            std::process::exit(EXIT_NOT_UP);
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(EXIT_UNKNOWN);
        }
    }
}

/// Prints the status; `Ok(false)`: the resource is not up (exit [`EXIT_NOT_UP`]).
fn status(cfg: &Config, json: bool) -> Result<bool> {
    let st = match query_status(cfg) {
        Ok(st) => st,
        Err(e) => {
            if json {
                // Monitoring parses stdout: an object there too, saying the state is unknown.
                let v = serde_json::json!({
                    "resource": cfg.resource, "node": cfg.me.name, "up": null,
                    "role": "unknown", "disk": "unknown", "error": format!("{e:#}"),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            eprintln!("error: {e:#}");
            std::process::exit(EXIT_UNKNOWN);
        }
    };
    let up = st.as_ref().is_some_and(|s| s.up);
    if json {
        let v = match &st {
            Some(s) => serde_json::to_value(s)?,
            None => serde_json::json!({
                "resource": cfg.resource, "node": cfg.me.name, "pid": 0, "up": false,
                "running": false, "role": "unknown", "disk": "unknown",
            }),
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(up);
    }
    let Some(s) = st else {
        println!("{}", not_running(cfg));
        return Ok(false);
    };
    if !s.up {
        println!(
            "{} on {}: down (daemon pid {} running, resource not up)",
            s.resource, s.node, s.pid
        );
        return Ok(false);
    }
    println!(
        "{} role:{} disk:{}{}",
        s.resource,
        s.role,
        s.disk,
        if s.disk_failed {
            " (FAILED: a sync of the backing device failed; fail over, see the runbook)"
        } else if s.disk == "outdated" {
            " (it may lack writes its peer made since: connect to catch up; `primary` needs --force)"
        } else if s.disk == "up-to-date"
            && s.role == "secondary"
            && s.replication.as_ref().is_some_and(|r| {
                !matches!(
                    r.connection.as_str(),
                    "connected" | "sync-source" | "sync-target"
                )
            })
        {
            // What the metadata says, as DRBD's UpToDate does: a primary may have gone on
            // writing since the link was lost.
            " (as of the last contact with the peer: a primary may have written since)"
        } else {
            ""
        }
    );
    if let Some(why) = &s.suspended {
        println!(
            "  I/O SUSPENDED ({why}): the peer was lost and is not fenced yet; writes and reads go on once the fence-peer handler fences it or the link is back (`resume-io` to go on without it)"
        );
    }
    println!(
        "  node {} (pid {})  export {}  size {}  engine {}",
        s.node,
        s.pid,
        s.export,
        human_bytes(s.size),
        s.engine
    );
    for w in &s.warnings {
        println!("  warning: {w}");
    }
    if let Some(k) = &s.kernel_device {
        println!(
            "  kernel device {}: {}",
            k,
            s.kernel_note
                .as_deref()
                .unwrap_or("not attached (secondary)")
        );
    }
    let io = &s.io;
    println!(
        "  clients {}  reads {} ({})  writes {} ({})  flushes {}  trims {}  zeroes {}  errors {} (disk {})",
        s.clients,
        io.reads,
        human_bytes(io.bytes_read),
        io.writes,
        human_bytes(io.bytes_written),
        io.flushes,
        io.trims,
        io.zeroes,
        io.errors,
        io.disk_errors
    );
    if io.stalled_s >= 5 {
        println!(
            "  DISK STALLED: {} request(s) in flight, none completed for {} s",
            io.inflight, io.stalled_s
        );
    }
    if let Some(r) = &s.replication {
        println!(
            "  peer {} connection:{} role:{} disk:{} protocol {} encryption {}",
            r.peer, r.connection, r.peer_role, r.peer_disk, r.protocol, r.encryption
        );
        println!(
            "    seq written {} sent {} received {} applied {} durable {}  lag {} writes ({})  journal {}/{}  out-of-sync {}",
            r.seq_written,
            r.seq_sent,
            r.seq_received,
            r.seq_applied,
            r.seq_durable,
            r.lag_writes,
            human_bytes(r.lag_bytes),
            human_bytes(r.journal_used),
            human_bytes(r.journal_size),
            // An inconsistent disk may lack more than this node's bitmap says (the peer's
            // bitmap names what a cut resync left; a fresh one lacks everything): not shown as
            // 0 (the JSON keeps the bitmap's count; `disk` says it is not the whole story).
            if r.out_of_sync == 0 && s.disk == "inconsistent" && r.connection != "sync-target" {
                "unknown (inconsistent)".to_string()
            } else {
                human_bytes(r.out_of_sync)
            }
        );
        println!(
            "    link sent {} received {}  crc errors {}  authentication failures {}",
            human_bytes(r.bytes_sent),
            human_bytes(r.bytes_received),
            r.crc_errors,
            r.auth_failures
        );
        if r.resync_total > 0 {
            println!(
                "    resync {} of {} ({:.0}%){}",
                human_bytes(r.resync_done),
                human_bytes(r.resync_total),
                100.0 * r.resync_done as f64 / r.resync_total.max(1) as f64,
                if r.resync_paused && r.connection == "sync-source" {
                    ", PAUSED (pause-sync; resume-sync goes on)".to_string()
                } else if r.resync_paused_by_peer {
                    ", PAUSED by the source (pause-sync there; resume-sync there goes on)"
                        .to_string()
                // Nothing measured yet at the start: no rate, no guess.
                } else if r.resync_rate == 0 {
                    ", starting".to_string()
                } else {
                    format!(
                        " at {}/s, about {} s left",
                        human_bytes(r.resync_rate),
                        r.resync_eta_s
                    )
                }
            );
            if let Some(why) = &r.resync_reason {
                println!("    resync reason: {why}");
            }
        } else if r.resync_paused {
            println!("    resync paused (pause-sync): a resync to the peer waits for resume-sync");
        }
        if let Some(v) = &r.verify {
            println!(
                "    verify run {}{} {}: {} of {} compared, {} regions ({}) differ{}",
                v.run,
                v.source
                    .as_deref()
                    .filter(|src| *src != s.node)
                    .map(|src| format!(" (on {src})"))
                    .unwrap_or_default(),
                v.state,
                human_bytes(v.done),
                human_bytes(v.total),
                v.differ_regions,
                human_bytes(v.differ_bytes),
                if v.resynced {
                    " (resynced since)".to_string()
                } else {
                    v.error
                        .as_deref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                }
            );
        }
        if let Some(f) = &r.fence {
            println!("    fence-peer: {f}");
        }
        if let Some(e) = &r.last_error {
            println!("    last error: {e}");
        }
    }
    Ok(true)
}

/// Whether the pair is in sync as this node sees it, with a one-line progress text. On a
/// primary, `target` is the last write issued when the wait began: the peer has to have
/// applied it, not every write since (a busy primary always has some in flight).
fn in_sync(s: &Status, target: u64) -> (bool, String) {
    let Some(r) = &s.replication else {
        return (true, format!("{}: no peer configured", s.resource));
    };
    let text = format!(
        "{} {}: connection {}, peer {} ({}), lag {} writes / {} bytes, out of sync {} bytes{}",
        s.resource,
        s.role,
        r.connection,
        r.peer_role,
        r.peer_disk,
        r.lag_writes,
        r.lag_bytes,
        r.out_of_sync,
        // A wait that cannot end by itself says why.
        if r.resync_paused && r.connection == "sync-source" {
            ", resync PAUSED (pause-sync: resume-sync goes on)"
        } else if r.resync_paused_by_peer {
            ", resync PAUSED by its source (pause-sync there: resume-sync there goes on)"
        } else {
            ""
        }
    );
    let done = r.connection == "connected"
        && if s.role == "primary" {
            r.out_of_sync == 0 && r.seq_applied >= target
        } else {
            // Its own marks too: regions a verify found different (the primary marks both
            // sides) are out of sync until a resync.
            s.disk == "up-to-date" && r.out_of_sync == 0
        };
    (done, text)
}

/// How long a wait with no limit of its own (`wait-sync`, `verify`) goes on while the daemon
/// does not answer at all (hung, or stalled on its disk): a cron job must not hang for ever.
const SILENT_DAEMON_LIMIT: Duration = Duration::from_secs(120);

/// The end of a wait: `timeout` seconds from now, or none.
struct WaitLimit {
    deadline: Option<Instant>,
    silent_since: Option<Instant>,
}

impl WaitLimit {
    fn new(timeout: Option<u64>) -> Self {
        WaitLimit {
            // A timeout past what the clock can count is none.
            deadline: timeout.and_then(|t| Instant::now().checked_add(Duration::from_secs(t))),
            silent_since: None,
        }
    }

    fn passed(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() > d)
    }

    /// After a status poll the daemon answered (`true`) or not: whether it has now been
    /// silent for longer than the wait stands for.
    fn silent_too_long(&mut self, answered: bool) -> bool {
        if answered {
            self.silent_since = None;
            return false;
        }
        let since = *self.silent_since.get_or_insert_with(Instant::now);
        self.passed() || since.elapsed() > SILENT_DAEMON_LIMIT
    }
}

/// "after N s" for a wait's message.
fn after(timeout: Option<u64>) -> String {
    timeout.map_or_else(
        || format!("after {} s of no answer", SILENT_DAEMON_LIMIT.as_secs()),
        |t| format!("after {t} s"),
    )
}

fn wait_sync(cfg: &Config, timeout: Option<u64>) -> Result<()> {
    let mut limit = WaitLimit::new(timeout);
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut target = None;
    loop {
        let Some(st) = poll_status(cfg)? else {
            if limit.silent_too_long(false) {
                bail!("not in sync {}: the daemon did not answer", after(timeout));
            }
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        limit.silent_too_long(true);
        if !st.up {
            bail!("resource {} is not up on {}", cfg.resource, cfg.me.name);
        }
        let written = st.replication.as_ref().map_or(0, |r| r.seq_written);
        let (done, text) = in_sync(&st, *target.get_or_insert(written));
        if done {
            if tty {
                eprintln!();
            }
            println!("in sync: {text}");
            return Ok(());
        }
        // Progress on a terminal only: from cron, a wait that ends in sync says nothing on
        // stderr (the outcome is on stdout, or the error).
        if tty {
            eprint!("\r{text}\x1b[K");
        }
        if limit.passed() {
            if tty {
                eprintln!();
            }
            bail!("not in sync {}: {text}", after(timeout));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The latest verify run in a status, if any.
fn verify_of(s: &Status) -> Option<&proto::control::VerifyStatus> {
    s.replication.as_ref()?.verify.as_ref()
}

fn verify(cfg: &Config, no_wait: bool, timeout: Option<u64>) -> Result<()> {
    let before = daemon_status(cfg).ok_or_else(|| anyhow!(not_running(cfg)))?;
    let r0 = verify_of(&before).map_or(0, |v| v.run);
    let mut c = Control::connect(cfg)?.ok_or_else(|| anyhow!(not_running(cfg)))?;
    let msg = expect_ok(c.call(&Request::Verify)?)?;
    if no_wait {
        println!("{msg}");
        return Ok(());
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if tty {
        eprintln!("{msg}");
    }
    let mut limit = WaitLimit::new(timeout);
    loop {
        // A daemon that stopped lost the run (a restart starts without it): said, not
        // waited for.
        let st = match query_status(cfg) {
            Ok(Some(s)) => Some(s),
            Ok(None) => {
                if tty {
                    eprintln!();
                }
                bail!(
                    "verify interrupted: the daemon stopped ({}); run verify again once it is up",
                    not_running(cfg)
                );
            }
            Err(e) => {
                eprintln!("status: {e:#}; asking again");
                None
            }
        };
        let Some(st) = st else {
            if limit.silent_too_long(false) {
                bail!(
                    "verify not done {}: the daemon did not answer (it goes on; see status)",
                    after(timeout)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        limit.silent_too_long(true);
        // The request made a run numbered past `r0`: a daemon that holds none, or an older
        // one, restarted since (its runs count from 0 again) and lost it.
        if verify_of(&st).is_none_or(|v| v.run < r0) {
            if tty {
                eprintln!();
            }
            bail!("verify interrupted: the daemon restarted since it was asked (it holds no such run); run verify again");
        }
        if let Some(v) = verify_of(&st).filter(|v| v.run > r0) {
            match v.state.as_str() {
                "done" => {
                    if tty {
                        eprintln!();
                    }
                    println!(
                        "verify: {} regions ({} bytes) differ",
                        v.differ_regions, v.differ_bytes
                    );
                    if v.differ_regions > 0 {
                        eprintln!(
                            "they are marked out of sync; `blockrep-ctl invalidate-remote --reset-bitmap=no` on the primary resyncs them (only them)"
                        );
                        // For cron and monitoring: the replicas differ (not a failure to run).
                        std::process::exit(EXIT_DIFFER);
                    }
                    return Ok(());
                }
                "pending" | "running" => {
                    if tty {
                        eprint!(
                            "\rverify {} of {} ({:.0}%), {} regions differ so far\x1b[K",
                            human_bytes(v.done),
                            human_bytes(v.total),
                            100.0 * v.done as f64 / v.total.max(1) as f64,
                            v.differ_regions
                        );
                    }
                }
                other => bail!(
                    "verify {other}: {} ({} of {} bytes compared, {} regions differ so far, marked out of sync)",
                    v.error.as_deref().unwrap_or("no reason given"),
                    v.done,
                    v.total,
                    v.differ_regions
                ),
            }
        }
        if limit.passed() {
            bail!(
                "verify not done {} (it goes on; see status)",
                after(timeout)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream over one end of a socket pair, the test playing the daemon on the other.
    fn stream() -> (EventStream, UnixStream) {
        let (ours, daemon) = UnixStream::pair().expect("socket pair");
        ours.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let s = EventStream {
            rd: BufReader::new(ours),
            line: Vec::new(),
        };
        (s, daemon)
    }

    fn status_line(role: &str) -> String {
        Reply::Status {
            status: Box::new(Status {
                resource: "r0".into(),
                node: "alpha".into(),
                up: true,
                role: role.into(),
                ..Default::default()
            }),
        }
        .to_line()
    }

    #[test]
    fn an_event_stream_reads_statuses_and_a_line_cut_by_its_timeout() {
        let (mut s, mut daemon) = stream();
        daemon
            .write_all(status_line("primary").as_bytes())
            .expect("send");
        assert!(matches!(s.next(), StreamNext::Status(st) if st.role == "primary"));
        // Nothing within the timeout: silent, not closed.
        assert!(matches!(s.next(), StreamNext::Silent));
        // Half a line, the timeout, then the rest: one status.
        let line = status_line("secondary");
        let (head, tail) = line.split_at(line.len() / 2);
        daemon.write_all(head.as_bytes()).expect("send");
        assert!(matches!(s.next(), StreamNext::Silent));
        daemon.write_all(tail.as_bytes()).expect("send");
        assert!(matches!(s.next(), StreamNext::Status(st) if st.role == "secondary"));
        drop(daemon);
        assert!(matches!(s.next(), StreamNext::Closed));
    }

    #[test]
    fn an_older_daemon_that_refuses_the_stream_is_polled_and_garbage_closes_it() {
        // The refusal of a daemon that does not know the request (serve_control's words).
        let (mut s, mut daemon) = stream();
        let refusal = Reply::Error {
            message: "bad control request: unknown variant `events`".into(),
        };
        daemon
            .write_all(refusal.to_line().as_bytes())
            .expect("send");
        assert!(matches!(s.next(), StreamNext::Refused));

        let (mut s, mut daemon) = stream();
        daemon.write_all(b"{not json\n").expect("send");
        assert!(matches!(s.next(), StreamNext::Closed));

        // A line without end is cut at the bound, not buffered for ever.
        let (mut s, daemon) = stream();
        let writer = std::thread::spawn(move || {
            let mut daemon = daemon;
            let chunk = vec![b'x'; 64 << 10];
            for _ in 0..(EVENTS_MAX_LINE / chunk.len() + 2) {
                if daemon.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        let mut turns = 0;
        let end = loop {
            turns += 1;
            match s.next() {
                StreamNext::Silent if turns < 1000 => continue,
                other => break other,
            }
        };
        assert!(matches!(end, StreamNext::Closed));
        assert!(s.line.len() <= EVENTS_MAX_LINE, "{}", s.line.len());
        drop(s);
        let _ = writer.join();
    }
}
