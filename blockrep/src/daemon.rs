//! The node daemon: owns the control socket and the resource's lifecycle.
//!
//! One daemon per resource per node (as one config file per resource). It starts with the
//! resource down unless asked; `blockrep-ctl` drives it over the control socket.

use std::sync::Arc;

use proto::control::{Reply, Request, Status, MAX_LINE};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Mutex};

use crate::config::Config;
use crate::resource::{remove_stale_socket, NodeError, Resource};

pub struct Daemon {
    cfg: Config,
    res: Mutex<Option<Arc<Resource>>>,
    stop: watch::Sender<bool>,
    /// One `up` or `down` at a time: a second `down` (or the SIGTERM of a service stop) during
    /// one that is still draining waits for it, rather than finding the resource gone and
    /// stopping the daemon under it; an `up` waits too, rather than racing it for the disks.
    lifecycle: Mutex<()>,
    /// The resource was taken down: a later `down` says so rather than "not up".
    went_down: std::sync::atomic::AtomicBool,
}

impl Daemon {
    pub fn new(cfg: Config) -> Arc<Self> {
        Arc::new(Daemon {
            cfg,
            res: Mutex::new(None),
            stop: watch::channel(false).0,
            lifecycle: Mutex::new(()),
            went_down: Default::default(),
        })
    }

    pub async fn up(&self) -> Result<String, NodeError> {
        let _one = self.lifecycle.lock().await;
        let mut res = self.res.lock().await;
        if res.is_some() {
            return Ok(format!("resource {} is already up", self.cfg.resource));
        }
        let r = Resource::up(&self.cfg).await?;
        let warnings: String = r
            .up_warnings()
            .iter()
            .map(|w| format!("\nwarning: {w}"))
            .collect();
        *res = Some(r);
        crate::bell::ring();
        Ok(format!(
            "resource {} up on {} (export {}){warnings}",
            self.cfg.resource, self.cfg.me.name, self.cfg.me.export
        ))
    }

    /// Takes the resource down and tells the daemon to exit.
    pub async fn down(&self, force: bool) -> Result<String, NodeError> {
        let _one = self.lifecycle.lock().await;
        // Checked before the resource is taken: a refused `down` leaves it serving.
        let up = self.res.lock().await.clone();
        if let Some(r) = up {
            r.refuse_down_while_clients(force).await?;
        }
        let r = self.res.lock().await.take();
        let msg = match r {
            Some(r) => {
                let note = match r.down().await {
                    Ok(note) => note,
                    Err(e) => {
                        // Still there (its tasks, its claim on the disk): shown as up, and a
                        // later `down` tries again.
                        *self.res.lock().await = Some(r);
                        crate::bell::ring();
                        return Err(e);
                    }
                };
                self.went_down
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                format!(
                    "resource {} down on {}{note}",
                    self.cfg.resource, self.cfg.me.name
                )
            }
            None if self.went_down.load(std::sync::atomic::Ordering::SeqCst) => format!(
                "resource {} is down on {} (an earlier `down` took it down)",
                self.cfg.resource, self.cfg.me.name
            ),
            None => format!("resource {} was not up", self.cfg.resource),
        };
        crate::bell::ring();
        self.stop.send_replace(true);
        Ok(msg)
    }

    fn down_status(&self) -> Status {
        Status {
            resource: self.cfg.resource.clone(),
            node: self.cfg.me.name.clone(),
            pid: std::process::id(),
            up: false,
            role: "secondary".into(),
            disk: "diskless".into(),
            export: self.cfg.me.export.to_string(),
            ..Default::default()
        }
    }

    async fn resource(&self) -> Result<Arc<Resource>, NodeError> {
        self.res.lock().await.clone().ok_or_else(|| {
            NodeError::Refused(format!(
                "resource {} is not up on {} (blockrep-ctl up)",
                self.cfg.resource, self.cfg.me.name
            ))
        })
    }

    /// The node's status, or why it could not be had.
    async fn status(&self) -> Result<Status, String> {
        let res = self.res.lock().await.clone();
        match res {
            // Off the runtime thread: status reads the metadata, whose lock a commit holds
            // across its fdatasync (up to a second under writeback), and the single runtime
            // thread must keep serving I/O meanwhile.
            Some(r) => {
                let pid = std::process::id();
                tokio::task::spawn_blocking(move || r.status(pid))
                    .await
                    .map_err(|e| format!("status task failed: {e}"))
            }
            None => Ok(self.down_status()),
        }
    }

    pub async fn handle(&self, req: Request) -> Reply {
        let r: Result<String, NodeError> = match req {
            // No lock: answered whatever the node is doing.
            Request::Identify => {
                return Reply::Ok {
                    message: format!("{} {}", self.cfg.resource, self.cfg.me.name),
                }
            }
            Request::Status => {
                return match self.status().await {
                    Ok(st) => Reply::Status {
                        status: Box::new(st),
                    },
                    Err(message) => Reply::Error { message },
                };
            }
            // Served by `serve_control` on the connection that asked for it.
            Request::Events => Err(NodeError::Refused(
                "events is streamed on a connection of its own".into(),
            )),
            Request::Up => self.up().await,
            Request::Down { force } => self.down(force).await,
            Request::Primary { force } => match self.resource().await {
                Ok(r) => r.primary(force).await,
                Err(e) => Err(e),
            },
            Request::Secondary { force } => match self.resource().await {
                Ok(r) => r.secondary(force).await,
                Err(e) => Err(e),
            },
            Request::Connect { discard_my_data } => match self.resource().await {
                Ok(_) if self.cfg.peer.is_none() => Err(NodeError::Refused(format!(
                    "resource {} has no peer configured",
                    self.cfg.resource
                ))),
                Ok(r) if discard_my_data => {
                    if r.role() == crate::state::Role::Primary {
                        Err(NodeError::Refused(
                            "a primary cannot discard its data: demote it first".into(),
                        ))
                    } else {
                        r.set_discard_my_data();
                        Ok(format!(
                            "{} will discard its changes and resync from its peer if the next connect finds a split brain (otherwise the generations decide, as in DRBD, and the log says so)",
                            self.cfg.me.name
                        ))
                    }
                }
                Ok(r) => r.set_standalone(false).await,
                Err(e) => Err(e),
            },
            Request::Verify => match self.resource().await {
                Ok(r) => r.start_verify(),
                Err(e) => Err(e),
            },
            Request::Invalidate => match self.resource().await {
                Ok(r) => r.invalidate().await,
                Err(e) => Err(e),
            },
            Request::InvalidateRemote { reset_bitmap } => match self.resource().await {
                Ok(r) => r.invalidate_remote(reset_bitmap).await,
                Err(e) => Err(e),
            },
            Request::Outdate => match self.resource().await {
                Ok(r) => r.outdate().await,
                Err(e) => Err(e),
            },
            Request::ResumeIo => match self.resource().await {
                Ok(r) => r.resume_io(),
                Err(e) => Err(e),
            },
            Request::PauseSync => match self.resource().await {
                Ok(r) => r.pause_sync(),
                Err(e) => Err(e),
            },
            Request::ResumeSync => match self.resource().await {
                Ok(r) => r.resume_sync(),
                Err(e) => Err(e),
            },
            Request::Adjust {
                config,
                node,
                dry_run,
            } => match self.resource().await {
                Ok(_) if node != self.cfg.me.name => Err(NodeError::Refused(format!(
                    "this is the daemon of node {}, not {node} (are the control sockets in {config} swapped?): nothing changed",
                    self.cfg.me.name
                ))),
                // Off the runtime's thread: a file on a hung mount must not stop the I/O.
                Ok(r) => match tokio::task::spawn_blocking(move || {
                    Config::load(std::path::Path::new(&config), Some(&node))
                })
                .await
                {
                    Ok(Ok(new)) => r.adjust(&new, dry_run).await,
                    Ok(Err(e)) => Err(NodeError::Refused(format!("{e}: nothing changed"))),
                    Err(e) => Err(NodeError::Refused(format!(
                        "reading the config failed ({e}): nothing changed"
                    ))),
                },
                Err(e) => Err(e),
            },
            Request::SkipInitialSync => match self.resource().await {
                Ok(r) => r.skip_initial_sync().await,
                Err(e) => Err(e),
            },
            Request::Disconnect => match self.resource().await {
                Ok(_) if self.cfg.peer.is_none() => Err(NodeError::Refused(format!(
                    "resource {} has no peer configured",
                    self.cfg.resource
                ))),
                Ok(r) => r.set_standalone(true).await,
                Err(e) => Err(e),
            },
        };
        match r {
            Ok(message) => Reply::Ok { message },
            Err(e) => Reply::Error {
                message: e.to_string(),
            },
        }
    }

    /// Serves the control socket until `down` or a termination signal.
    /// `notify`: the service manager to tell when the node is ready, its state as it changes,
    /// and when it stops (systemd's `Type=notify`; see [`crate::notify`]).
    pub async fn run(
        self: Arc<Self>,
        up_now: bool,
        notify: Option<crate::notify::Notifier>,
    ) -> anyhow::Result<()> {
        let path = self.cfg.me.control.clone();
        remove_stale_socket(&path).await.map_err(|e| {
            anyhow::anyhow!("control socket: {e} (is a daemon for this node already running?)")
        })?;
        let listener = UnixListener::bind(&path)
            .map_err(|e| anyhow::anyhow!("binding control socket {}: {e}", path.display()))?;
        // Whoever can connect can promote, invalidate or take the node down: its owner only,
        // whatever the umask.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(
                |e| anyhow::anyhow!("restricting control socket {}: {e}", path.display()),
            )?;
        }
        tracing::info!(
            "blockrep daemon for resource {} node {} (pid {}), control socket {}",
            self.cfg.resource,
            self.cfg.me.name,
            std::process::id(),
            path.display()
        );
        if let Some(p) = &self.cfg.secret_file {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(m) = std::fs::metadata(p) {
                let mode = m.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    tracing::warn!(
                        "secret-file {} is readable by others (mode {mode:03o}): chmod 600 it",
                        p.display()
                    );
                }
            }
        }
        if up_now {
            if let Err(e) = self.up().await {
                let _ = std::fs::remove_file(&path);
                return Err(anyhow::anyhow!("up: {e}"));
            }
        }
        // Ready once the control socket answers and the resource is up (when asked): a
        // failed `up` above exits before this, so the unit never counts as started.
        let notify = notify.map(Arc::new);
        if let Some(n) = &notify {
            n.ready(&self.summary().await);
            let (me, n) = (self.clone(), n.clone());
            tokio::spawn(async move { me.report_state(&n).await });
        }
        let stopping = || {
            if let Some(n) = &notify {
                n.stopping();
            }
        };
        let mut stop = self.stop.subscribe();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => {
                    stopping();
                    break;
                }
                _ = term.recv() => {
                    tracing::info!("SIGTERM: taking the resource down");
                    stopping();
                    // A signal is the service manager stopping the node: no refusal.
                    let _ = self.down(true).await;
                    break;
                }
                _ = int.recv() => {
                    tracing::info!("SIGINT: taking the resource down");
                    stopping();
                    // A signal is the service manager stopping the node: no refusal.
                    let _ = self.down(true).await;
                    break;
                }
                a = listener.accept() => match a {
                    // The socket's mode is set just after it is bound: one who connected in
                    // between is still checked here, by the credentials the kernel gives.
                    Ok((s, _)) if !local_peer_allowed(&s) => {
                        tracing::warn!(
                            "control connection refused: uid {} is neither root nor this daemon's",
                            s.peer_cred().map_or("unknown".to_string(), |c| c.uid().to_string())
                        );
                    }
                    Ok((s, _)) => {
                        let me = self.clone();
                        tokio::spawn(async move { me.serve_control(s).await });
                    }
                    Err(e) => {
                        // Out of descriptors, say: not a hot loop that floods the log.
                        tracing::warn!("control accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
            }
        }
        // Give the connection that asked for `down` a moment to receive its reply.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let _ = std::fs::remove_file(&path);
        tracing::info!("daemon exits");
        Ok(())
    }

    /// The node's state in one line (`crate::notify::summary`), or why there is none.
    async fn summary(&self) -> String {
        match self.status().await {
            Ok(st) => crate::notify::summary(&st),
            Err(e) => e,
        }
    }

    /// Keeps the service manager's status line current: at each change the state bell rings
    /// for (at most every [`NOTIFY_MIN_GAP`]) and every [`NOTIFY_TICK`] for what changes
    /// without a ring (a resync's progress). Runs until the daemon exits.
    async fn report_state(&self, n: &crate::notify::Notifier) {
        let mut bell = crate::bell::subscribe();
        let mut last = String::new();
        loop {
            bell.borrow_and_update();
            let line = self.summary().await;
            if line != last {
                n.status(&line);
                last = line;
            }
            tokio::time::sleep(NOTIFY_MIN_GAP).await;
            tokio::select! {
                _ = bell.changed() => {}
                _ = tokio::time::sleep(NOTIFY_TICK) => {}
            }
        }
    }

    async fn serve_control(&self, s: UnixStream) {
        let (rd, mut wr) = s.into_split();
        // Each line is bounded (below); a connection is not, so that a monitor may keep one
        // open and ask for `status` for as long as it runs.
        let mut rd = BufReader::new(rd);
        let mut line = Vec::new();
        loop {
            line.clear();
            let mut limited = (&mut rd).take(MAX_LINE as u64);
            match limited.read_until(b'\n', &mut line).await {
                Ok(0) => return,
                Ok(_) if !line.ends_with(b"\n") => {
                    let _ = wr
                        .write_all(
                            Reply::Error {
                                message: "control request too long or unterminated".into(),
                            }
                            .to_line()
                            .as_bytes(),
                        )
                        .await;
                    return;
                }
                Ok(_) => {}
                Err(_) => return,
            }
            let reply = match serde_json::from_slice::<Request>(&line) {
                Ok(Request::Events) => {
                    self.stream_events(rd, wr).await;
                    return;
                }
                Ok(req) => self.handle(req).await,
                Err(e) => Reply::Error {
                    message: format!("bad control request: {e}"),
                },
            };
            if wr.write_all(reply.to_line().as_bytes()).await.is_err() {
                return;
            }
        }
    }
}

/// The service manager's status line is sent at most this often...
const NOTIFY_MIN_GAP: std::time::Duration = std::time::Duration::from_millis(250);
/// ...and looked at this often without a change rung (a resync's percentage).
const NOTIFY_TICK: std::time::Duration = std::time::Duration::from_secs(2);
/// How often an `events` stream looks at the status with no ring of the state bell: what
/// changes without one (`stalled`, `out-of-sync` yes/no) shows within this.
const EVENTS_TICK: std::time::Duration = std::time::Duration::from_millis(200);
/// Statuses an `events` stream builds at most: a burst of [`EVENTS_BURST`] at once (the
/// steps of a disconnect follow each other within milliseconds), then one every
/// [`EVENTS_REFILL`] (a storm of rings, metadata commits under a flush-heavy load, costs at
/// most 100 statuses a second).
const EVENTS_BURST: u32 = 8;
const EVENTS_REFILL: std::time::Duration = std::time::Duration::from_millis(10);
/// Longest silence of an `events` stream: its follower takes a longer one for a hung daemon.
const EVENTS_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);
/// `events` streams served at once (each builds a status at every change).
const MAX_EVENT_STREAMS: usize = 32;
/// How long a follower that stopped reading may hold up its stream's write.
const EVENTS_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

static EVENT_STREAMS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Daemon {
    /// An `events` follower (see [`Request::Events`]): a status line now, then one at each
    /// change the state bell (`crate::bell`) or the tick finds, until the follower hangs up.
    async fn stream_events<R, W>(&self, mut rd: R, mut wr: W)
    where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        use std::sync::atomic::Ordering::SeqCst;
        struct Slot;
        impl Drop for Slot {
            fn drop(&mut self) {
                EVENT_STREAMS.fetch_sub(1, SeqCst);
            }
        }
        if EVENT_STREAMS.fetch_add(1, SeqCst) >= MAX_EVENT_STREAMS {
            EVENT_STREAMS.fetch_sub(1, SeqCst);
            let refusal = Reply::Error {
                message: format!("{MAX_EVENT_STREAMS} events followers already: try again later"),
            };
            let _ = wr.write_all(refusal.to_line().as_bytes()).await;
            return;
        }
        let _slot = Slot;
        let mut bell = crate::bell::subscribe();
        let mut last: Option<Status> = None;
        let mut sent_at = tokio::time::Instant::now();
        let mut scratch = [0u8; 64];
        let mut reading = true;
        let mut budget = EVENTS_BURST;
        let mut refilled = tokio::time::Instant::now();
        loop {
            let earned = (refilled.elapsed().as_nanos() / EVENTS_REFILL.as_nanos()) as u32;
            if earned > 0 {
                budget = (budget + earned).min(EVENTS_BURST);
                refilled = tokio::time::Instant::now();
            }
            if budget == 0 {
                tokio::time::sleep_until(refilled + EVENTS_REFILL).await;
                budget = 1;
                refilled = tokio::time::Instant::now();
            }
            budget -= 1;
            // Seen before the status is built: a ring while it is built wakes the next turn.
            bell.borrow_and_update();
            let reply = match self.status().await {
                Ok(st) if last.as_ref() == Some(&st) && sent_at.elapsed() < EVENTS_HEARTBEAT => {
                    None
                }
                Ok(st) => {
                    last = Some(st.clone());
                    Some(Reply::Status {
                        status: Box::new(st),
                    })
                }
                Err(message) => Some(Reply::Error { message }),
            };
            if let Some(reply) = reply {
                let fatal = matches!(reply, Reply::Error { .. });
                let line = reply.to_line();
                match tokio::time::timeout(EVENTS_WRITE_TIMEOUT, wr.write_all(line.as_bytes()))
                    .await
                {
                    Ok(Ok(())) if !fatal => sent_at = tokio::time::Instant::now(),
                    _ => return,
                }
            }
            tokio::select! {
                _ = bell.changed() => {}
                _ = tokio::time::sleep(EVENTS_TICK) => {}
                // A follower sends nothing more: more data ends the stream; an end of file is
                // a half-close (`socat` with its input done), and the stream goes on until a
                // write fails (within the heartbeat).
                n = rd.read(&mut scratch), if reading => match n {
                    Ok(0) => reading = false,
                    _ => return,
                },
            }
        }
    }
}

/// Whether a local connection (to the control socket, or to a Unix NBD export) comes from
/// root or from the daemon's own user: whoever can talk to the daemon can promote,
/// invalidate or take the node down, and whoever reaches the export reads and writes the
/// device.
pub(crate) fn local_peer_allowed(s: &UnixStream) -> bool {
    let me = nix::unistd::geteuid().as_raw();
    s.peer_cred().is_ok_and(|c| c.uid() == 0 || c.uid() == me)
}
