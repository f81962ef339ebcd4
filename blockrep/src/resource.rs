//! A resource that is up on this node: backing device, metadata, engine, export, role.
//! `up` builds it, `down` takes it apart in order (refuse, drain, flush, persist).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::control::Status;
use thiserror::Error;
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;

use proto::control::PeerStatus;
use proto::peer::{GenIds, NodeState};
use tokio::sync::watch;

use crate::bitmap::Bitmap;
use crate::config::{Config, ExportAddr, MetaLocation};
use crate::device::Device;
use crate::journal::Ring;
use crate::meta::{DiskState, MetaError, MetaStore, Superblock};
use crate::nbd_server::{self, Export};
use crate::peer::{LinkCtl, LinkInfo};
use crate::replication::{MetaAreas, Replication};
use crate::state::{self, PeerView, Role};

/// The refusal of a promotion over a connected peer with newer data.
/// A running resync's progress, for `status`: bytes in all and sent so far.
#[derive(Debug, Clone, Copy)]
pub struct ResyncProgress {
    pub total: u64,
    pub done: u64,
    started: std::time::Instant,
    /// When `done` reached `total`: the rate stops there, not falling while the end's
    /// SyncDone round trip goes on.
    finished: Option<std::time::Instant>,
    /// Time spent paused (`pause-sync`), and since when it is paused now: not counted in
    /// the rate, or a resync paused for a night would show a crawl and an ETA of days.
    paused_for: std::time::Duration,
    paused_since: Option<std::time::Instant>,
}

impl ResyncProgress {
    pub fn start(total: u64) -> Self {
        Self {
            total,
            done: 0,
            started: std::time::Instant::now(),
            finished: None,
            paused_for: std::time::Duration::ZERO,
            paused_since: None,
        }
    }

    /// The resync is paused (or goes on again) from now.
    pub fn set_paused(&mut self, paused: bool) {
        match (paused, self.paused_since) {
            (true, None) => self.paused_since = Some(std::time::Instant::now()),
            (false, Some(t)) => {
                self.paused_for += t.elapsed();
                self.paused_since = None;
            }
            _ => {}
        }
    }

    /// `done` of `total` sent (a total that grows with what is sent never shows less).
    pub fn advance(&mut self, total: u64, done: u64) {
        self.total = total.max(done);
        self.done = done;
        // The time of the last send once everything counted went (a later sweep that
        // resends re-dirtied regions moves it on).
        self.finished = (self.done >= self.total).then(std::time::Instant::now);
    }

    /// Bytes per second since the start (until the end).
    pub fn rate(&self) -> u64 {
        let end = self.finished.unwrap_or_else(std::time::Instant::now);
        let paused = self.paused_for
            + self.paused_since.map_or(std::time::Duration::ZERO, |t| {
                end.saturating_duration_since(t)
            });
        let secs = end
            .saturating_duration_since(self.started)
            .saturating_sub(paused)
            .as_secs_f64()
            .max(0.001);
        (self.done as f64 / secs) as u64
    }
}

fn peer_ahead(
    peer: &crate::meta::Generations,
    mine: &crate::meta::Generations,
    disk: DiskState,
) -> NodeError {
    if disk == DiskState::Inconsistent {
        // Said first: --force would promote a partial copy, not just lose the peer's writes.
        return NodeError::Refused(format!(
            "this node's disk is inconsistent: the peer (generation {:016X}) is bringing it up to date; wait until it is (`wait-sync`). --force would promote a partial copy (and the peer's newer writes are then a split brain)",
            peer.current
        ));
    }
    NodeError::Refused(format!(
        "the peer has newer data (its generation {:016X}, this node's {:016X}): wait until it has brought this node up to date, or use --force to promote anyway (the peer's newer writes are then a split brain)",
        peer.current, mine.current
    ))
}

/// A promotion refused because the node is going down (see `Resource::stopping`).
fn going_down() -> NodeError {
    NodeError::Refused("the node is going down (`down` or a service stop is under way)".into())
}

fn resync_expected() -> NodeError {
    NodeError::Refused(
        "the peer is resyncing this node: it holds writes this node lacks (it crashed as primary, or a split brain was settled in its favour); wait until the resync has ended (`wait-sync`), or use --force to promote anyway (the peer's writes are then a split brain)".into(),
    )
}

/// Why `cmd` cannot be run as a handler, if it cannot: not an absolute path (the daemon's
/// working directory and PATH are not the admin's shell's), not there, or not an executable
/// file.
fn not_runnable(cmd: &std::path::Path) -> Option<&'static str> {
    use std::os::unix::fs::PermissionsExt;
    if !cmd.is_absolute() {
        return Some("is not an absolute path");
    }
    match std::fs::metadata(cmd) {
        Err(_) => Some("does not exist"),
        Ok(m) if !m.is_file() || m.permissions().mode() & 0o111 == 0 => {
            Some("is not an executable file")
        }
        Ok(_) => None,
    }
}

#[cfg(test)]
mod not_runnable_tests {
    use super::not_runnable;
    use std::os::unix::fs::PermissionsExt;

    /// A DRBD-style handler line ("script arg"), a relative path, a missing file and a file
    /// that is not executable are reported at `up`; an executable file is not.
    #[test]
    fn handlers_that_cannot_run_are_named() {
        let dir = crate::test_dir::TestDir::new("brres-handler");
        let script = dir.join("notify.sh");
        std::fs::write(&script, "#!/bin/sh\n").expect("script");
        assert_eq!(not_runnable(&script), Some("is not an executable file"));
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(not_runnable(&script), None);
        let with_arg = std::path::PathBuf::from(format!("{} root", script.display()));
        assert_eq!(not_runnable(&with_arg), Some("does not exist"));
        assert_eq!(
            not_runnable(std::path::Path::new("notify.sh")),
            Some("is not an absolute path")
        );
        assert_eq!(not_runnable(&dir), Some("is not an executable file"));
    }
}

/// How long after a lost link a promotion still waits for the peer to come back: a role
/// change on the peer reconnects at once.
const ROLE_CHANGE_RECONNECT: Duration = Duration::from_secs(2);

/// How long a `down` waits on the peer at each step of its goodbye (the message sent, taken
/// in: the peer commits it to its metadata and syncs before it closes; a secondary's last
/// acknowledgement, made durable first). A sync on a busy disk takes seconds, and a goodbye
/// that times out turns a planned switchover into one that needs `--force`; a peer that
/// stops answering is dropped by the ping timeout sooner.
const PEER_GOODBYE_WAIT: Duration = Duration::from_secs(10);

/// How long `secondary` waits for NBD clients that are already disconnecting before it
/// refuses because clients are attached.
const CLIENTS_LEAVING_WAIT: Duration = Duration::from_secs(2);

/// The longest a `fence-peer` handler may run before it is killed and counted as failed.
const FENCE_PEER_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum NodeError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// The cause is in the message, not a `source` (see `MetaError::Io`).
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error("{0}")]
    Refused(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError {
    let what = what.into();
    move |error| NodeError::Io { what, error }
}

/// Where the peer's answer to `new-current-uuid --clear-bitmap` goes: done, or why not.
pub type SkipSyncAnswer = tokio::sync::oneshot::Sender<Result<(), String>>;

/// Where the peer's answer to this node's `PromoteAsk` goes: granted, or why not and whether
/// the peer was busy deciding a promotion of its own.
pub type PromoteAnswer = tokio::sync::oneshot::Sender<Result<(), (String, bool)>>;

/// How long a promotion waits for the peer's answer to its `PromoteAsk`.
const PROMOTE_ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// How many times a promotion the peer refused because it was deciding its own (both asked
/// at once, and each refused the other) is tried again, each after a random pause of up to
/// [`PROMOTE_TIE_PAUSE_MS`]: the node whose pause ends first asks while the other waits, and
/// wins.
const PROMOTE_TIE_RETRIES: u32 = 4;
const PROMOTE_TIE_PAUSE_MS: u64 = 400;

pub struct Resource {
    /// The running configuration: `adjust` replaces it with one whose fields that need a
    /// `down`/`up` are still the running ones (see `config::plan_adjust`).
    cfg: std::sync::RwLock<Arc<Config>>,
    meta: Arc<Mutex<MetaStore>>,
    device: Arc<Device>,
    rep: Option<Arc<Replication>>,
    link_ctl: watch::Sender<LinkCtl>,
    link_info: Mutex<LinkInfo>,
    /// Established connections so far (a role change waits for the next one).
    connections: std::sync::atomic::AtomicU64,
    /// Came up after going down as primary without `down`: only a resync brings it back.
    crashed_primary: std::sync::atomic::AtomicBool,
    /// Counts [`Self::mark_inconsistent`] calls and invalidations: the end of a resync commits
    /// the disk up to date only if none came while it was finishing (see `SyncDone` in
    /// peer/secondary.rs).
    pub disk_failures: std::sync::atomic::AtomicU64,
    /// [`Self::disk_lost_writes`] ran (once per `up`).
    disk_lost_marked: std::sync::atomic::AtomicBool,
    /// `connect --discard-my-data`: become the sync target at the next connect.
    discard_my_data: std::sync::atomic::AtomicBool,
    /// Set while this secondary outdates itself on leaving its primary (until the next
    /// stream starts): a resync end still being applied must not commit up-to-date over it.
    pub leaving_outdated: std::sync::atomic::AtomicBool,
    /// One fence-peer run at a time (a flapping link, a promotion).
    fence_lock: tokio::sync::Mutex<()>,
    /// This connection found this node an outdated crashed primary at the peer's
    /// generation (see `state::effective_disk`): the end of its resync as source drops the mark.
    pub premature_outdate: std::sync::atomic::AtomicBool,
    /// Handshakes that got as far as the peer's state, established or not: a fence-peer
    /// answer given while one happened is stale.
    handshakes: Arc<std::sync::atomic::AtomicU64>,
    /// The kind of split brain last logged with its handler run (0: none; see
    /// `peer::SplitBrainKind`): reconnects that find the same one again only back off, and
    /// the link shows `split-brain` until a connection gets past it.
    pub split_brain_reported: std::sync::atomic::AtomicU8,
    /// A split brain an after-sb-0pri policy resolved ran the split-brain handler: a retry
    /// that resolves it again (its resync refused, say) does not run it again, until a
    /// connect finds no split brain.
    pub sb_policy_reported: std::sync::atomic::AtomicBool,
    /// The last connect's generations line as logged at info: a reconnect that finds the same
    /// logs it at debug (a refused pair retries every few seconds).
    pub last_generations_line: Mutex<String>,
    /// A promotion is under way: the stream from the peer must not write this disk any
    /// more (see [`Resource::stream_held`]).
    stream_hold: std::sync::atomic::AtomicBool,
    /// Resync progress (as the source; as the target, what the source reports).
    pub resync: Mutex<Option<ResyncProgress>>,
    /// Why the latest resync runs (shown while `resync` is set): the source's decision at
    /// connect, or what a target was told.
    pub resync_why: Mutex<String>,
    /// As the target of a resync that was cut: the bytes it had left, shown as out of sync
    /// until a resync completes (or a forced promotion declares the data good); the target's
    /// own bitmap does not name them.
    pub resync_left: std::sync::atomic::AtomicU64,
    /// This node drops its link only to reconnect at once (`invalidate-remote`): the close is
    /// not a lost peer, so the fence-peer handler (which may power the peer off) waits to see
    /// whether the link comes back (see `peer::PLANNED_RECONNECT_GRACE`). Taken by the close.
    pub planned_reconnect: std::sync::atomic::AtomicBool,
    /// DRBD's `pause-sync` (its user's resync-suspended flag): a resync from this node waits
    /// before its next region, and one that starts waits from its first, until `resume-sync`.
    /// In memory: a restart starts unpaused, as DRBD's does.
    pub sync_paused: tokio::sync::watch::Sender<bool>,
    /// On a resync's target: its source said `pause-sync` holds the resync (DRBD's
    /// `resync-suspended:peer`). Shown only while this node is the target; cleared when the
    /// link drops.
    pub sync_paused_by_peer: std::sync::atomic::AtomicBool,
    /// Online verify: the latest run's state; `verify_kick` wakes the connection's verifier.
    pub verify: Mutex<VerifyState>,
    pub verify_kick: tokio::sync::Notify,
    /// `down` of a secondary connected to its primary asks the connection to make everything
    /// it applied durable and say so (see [`Self::final_ack_to_primary`]); answered on
    /// `final_acked`.
    pub final_ack: tokio::sync::Notify,
    pub final_acked: tokio::sync::Notify,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    export: Arc<Export>,
    role: Mutex<Role>,
    listener: JoinHandle<()>,
    unix_path: Option<PathBuf>,
    kernel: tokio::sync::Mutex<Option<crate::kernel::Attachment>>,
    kernel_note: Mutex<Option<String>>,
    /// `new-current-uuid --clear-bitmap` waiting for the idle link to ask the peer: the
    /// generation both are to adopt, and where the peer's answer goes. `skip_sync_kick`
    /// wakes the link's writer.
    pub skip_sync: Mutex<Option<(u64, SkipSyncAnswer)>>,
    pub skip_sync_kick: tokio::sync::Notify,
    /// The key the link authenticates with, stretched from the configured secret once (see
    /// `proto::seal::link_key`); `None` without a peer.
    link_key: std::sync::RwLock<Option<[u8; 32]>>,
    /// The current connection is sealed (it may differ from `encryption` after an
    /// `adjust`, until the next connection).
    pub link_sealed: std::sync::atomic::AtomicBool,
    /// A resync to this node started (its SyncStart ran before-resync-target): its SyncDone
    /// runs after-resync-target.
    pub resync_target_started: std::sync::atomic::AtomicBool,
    /// The running connection made this node a resync's target (from the handshake's
    /// decision, before any SyncStart, to its SyncDone's commit): the peer holds writes this
    /// node lacks, even at one generation (a crashed primary's hot extents, a settled split
    /// brain), so a plain promotion would overwrite them.
    pub sync_expected: Arc<std::sync::atomic::AtomicBool>,
    /// The side channel of the running connection (see `peer::PeerTx`): `down` tells the
    /// peer through it that this node goes down cleanly, `adjust` a new protocol.
    pub peer_tx: Mutex<Option<crate::peer::PeerTx>>,
    /// A primary going down cleanly told its peer so: the link starts no new connection and
    /// losing the peer fences nobody.
    leaving: std::sync::atomic::AtomicBool,
    /// The link's epoch (see `Acks`) when this node was promoted without a connected peer
    /// (`u64::MAX`: connected then): until the next connection, the peer's marks that
    /// `status` would show are an earlier period's.
    promoted_epoch: std::sync::atomic::AtomicU64,
    /// One `adjust` at a time: each plans from the configuration the last one left.
    adjust_lock: tokio::sync::Mutex<()>,
    /// Counts the peer's Hellos (see [`Self::peer_heard`]): a clean leave decided before one
    /// is not recorded after it.
    peer_heard_count: Arc<std::sync::atomic::AtomicU64>,
    /// This node's disks, held exclusively while the resource is up.
    _claim: crate::meta::Claim,
    /// Held by a promotion and by `new-current-uuid --clear-bitmap` from its check to its
    /// commit, on both nodes: a node promoted in between would have its new writes' bitmap
    /// cleared and its generation replaced. A demotion holds it throughout too, so that role
    /// changes run one at a time: a `secondary` during a promotion still being decided
    /// would answer "already secondary" and the promotion then commit (and the other way
    /// round).
    skip_ops: tokio::sync::Mutex<()>,
    /// A `down` is under way: a promotion refuses (at its start and at its commit), and the
    /// `down` waits for one already running before it decides how to go down (as primary or
    /// as secondary), so that it never takes the secondary's way down while a promotion
    /// commits behind it.
    stopping: Arc<std::sync::atomic::AtomicBool>,
    /// A promotion of this node is being decided (from its start until it committed or
    /// refused): the peer's `PromoteAsk` is refused meanwhile, so two secondaries promoted at
    /// once never both win (see [`Self::answer_peer_promotion`]).
    promoting: std::sync::atomic::AtomicBool,
    /// The peer refused this promotion because it was deciding one of its own (a tie, or
    /// one of its own about to be refused): tried again after a random pause.
    promotion_busy: std::sync::atomic::AtomicBool,
    /// This node's `PromoteAsk` waiting for the peer's answer: its id, and where it goes.
    promote_ask: Mutex<Option<(u64, PromoteAnswer)>>,
}

/// The latest online verify of this node (see [`Resource::start_verify`]).
#[derive(Debug, Clone, Default)]
pub struct VerifyState {
    pub run: u64,
    /// "pending", "running", "done", "interrupted", "failed" ("" before the first run).
    pub state: &'static str,
    pub total: u64,
    pub done: u64,
    pub differ_regions: u64,
    pub differ_bytes: u64,
    pub started: Option<std::time::Instant>,
    pub elapsed_ms: u64,
    pub error: Option<String>,
    /// Secondary: the run executes on the primary, which reports its progress over the link.
    pub on_peer: bool,
    /// Primary: the secondary asked for this run; its progress goes to the peer.
    pub for_peer: bool,
    /// A resync to the peer ended after this run found differences: they are repaired.
    pub resynced: bool,
}

impl VerifyState {
    pub fn active(&self) -> bool {
        matches!(self.state, "pending" | "running")
    }
}

fn secondary_reason(cfg: &Config) -> String {
    format!(
        "resource {} is secondary on node {}: only the primary serves I/O (blockrep-ctl primary)",
        cfg.resource, cfg.me.name
    )
}

impl Resource {
    /// Opens the backing device and metadata, starts the engine and the export listener.
    /// The node comes up secondary, as DRBD's does.
    pub async fn up(cfg: &Config) -> Result<Arc<Self>, NodeError> {
        let external = match &cfg.me.meta {
            MetaLocation::Internal => None,
            MetaLocation::External(p) => Some(p.clone()),
        };
        // A tenth of a second of hashing, off the runtime's thread.
        let link_key = match cfg.secret.clone() {
            Some(secret) => {
                let resource = cfg.resource.clone();
                Some(
                    tokio::task::spawn_blocking(move || proto::seal::link_key(&secret, &resource))
                        .await
                        .map_err(|e| {
                            NodeError::Refused(format!("deriving the link key failed: {e}"))
                        })?,
                )
            }
            None => None,
        };
        // Before anything reads or writes the metadata: no other daemon may hold the disk.
        let claim = {
            let (backing, external) = (cfg.me.backing.clone(), external.clone());
            let direct = cfg.direct_io;
            tokio::task::spawn_blocking(move || {
                crate::meta::claim(&backing, external.as_deref(), direct)
            })
            .await
            .map_err(|e| NodeError::Refused(format!("claiming the disk failed: {e}")))??
        };
        let meta = {
            let cfg = cfg.clone();
            tokio::task::spawn_blocking(move || {
                MetaStore::open(
                    &cfg.me.backing,
                    external.as_deref(),
                    &cfg.resource,
                    &cfg.me.name,
                )
            })
            .await
            .map_err(|e| NodeError::Refused(format!("metadata task failed: {e}")))??
        };
        // The journal's size is the metadata's, set by create-md: a changed config is not
        // applied (it would move the areas), but said, not silently ignored.
        let journal_len = meta.sb.layout.journal_len;
        if cfg.peer.is_some() && journal_len != cfg.journal_size.div_ceil(4096) * 4096 {
            tracing::warn!(
                "journal-size is {} bytes in the config, but the metadata on {} was created with a {journal_len}-byte journal, which is used: `create-md` applies a new size (it forgets what the bitmap records: run it on a secondary, which then takes a full sync)",
                cfg.journal_size,
                cfg.me.name
            );
        }
        // The bitmap on disk counts regions of the size create-md chose; read with another
        // size (here, or by the peer, which decodes this node's bitmap with the shared
        // config's) its bits would name the wrong regions.
        if meta.sb.layout.granularity != cfg.bitmap_granularity {
            return Err(NodeError::Refused(format!(
                "bitmap-granularity is {} bytes in the config but the metadata on {} was created with {}: set it back, or run create-md again (which forgets what the bitmap records)",
                cfg.bitmap_granularity,
                cfg.me.name,
                meta.sb.layout.granularity
            )));
        }
        // The bitmap is held in memory, and the peer takes no larger one.
        let bitmap_len = meta.sb.layout.bitmap_len;
        if cfg.peer.is_some() && bitmap_len > proto::bitmap_wire::MAX_BITMAP_BYTES {
            return Err(NodeError::Refused(format!(
                "the dirty bitmap of this device is {} MiB at bitmap-granularity {} bytes, more than the {} MiB a node keeps: run create-md with a larger bitmap-granularity (each doubling halves it)",
                bitmap_len >> 20,
                meta.sb.layout.granularity,
                proto::bitmap_wire::MAX_BITMAP_BYTES >> 20
            )));
        }
        let crashed = meta.sb.was_primary && cfg.peer.is_some();
        if meta.sb.was_primary {
            tracing::warn!(
                "node {} was primary when it stopped last: it did not go down cleanly",
                cfg.me.name
            );
        }
        let size = match meta.sb.agreed_size {
            0 => meta.sb.layout.data_size,
            a => a.min(meta.sb.layout.data_size),
        };
        // A clean leave the peer announced before this node went down (see
        // `Superblock::peer_left`): still true until the peer is heard from.
        let peer_left = (meta.sb.peer_left && cfg.peer.is_some()).then_some(0);
        if peer_left.is_some() {
            tracing::info!(
                "the peer went down cleanly before this node stopped, leaving it every write, and has not been heard from since: a plain `primary` promotes this node"
            );
        }
        let meta = Arc::new(Mutex::new(meta));
        let rep = match &cfg.peer {
            None => None,
            Some(_) => Some(open_replication(cfg, &meta, size).await?),
        };
        // The claim's descriptor: only the holder of a block device's exclusive claim may
        // discard or zero its ranges.
        let engine = crate::engine::open(claim.backing(), cfg.io_engine)
            .map_err(io_err("starting the I/O engine"))?;
        let mut device = Device::new(engine, rep.clone(), size, cfg.direct_io);
        // A replicated node applies its peer's large writes around the page cache while it is
        // secondary (see `Device::apply_write`), where the backing device allows direct I/O.
        // On io_uring only, unless the config asks for the thread engine: where the kernel
        // refuses a second ring, four more threads would cost more than the copy they save.
        if cfg.peer.is_some() && !cfg.direct_io {
            let choice = match cfg.io_engine {
                crate::config::IoEngineChoice::Auto => crate::config::IoEngineChoice::IoUring,
                c => c,
            };
            match claim.reopen_direct() {
                Ok(f) => {
                    let f = Arc::new(f);
                    match crate::engine::open(f.clone(), choice) {
                        Ok(e) => device = device.with_direct_writes(e, f),
                        Err(e) => tracing::info!(
                            "the {} engine for a secondary's direct writes did not start ({e}): its large writes go through the page cache",
                            match choice {
                                crate::config::IoEngineChoice::Sync => "pread/pwrite",
                                _ => "io_uring",
                            }
                        ),
                    }
                }
                Err(e) => tracing::info!(
                    "{} refuses direct I/O ({e}): a secondary's large writes go through the page cache",
                    cfg.me.backing.display()
                ),
            }
        }
        let device = Arc::new(device);
        let export = Export::new(
            cfg.resource.clone(),
            device.clone(),
            Some(secondary_reason(cfg)),
        );
        let (listener, unix_path) = match &cfg.me.export {
            ExportAddr::Tcp(addr) => {
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(io_err(format!("binding the NBD export on {addr}")))?;
                let export = export.clone();
                let task = tokio::spawn(async move {
                    loop {
                        match l.accept().await {
                            Ok((s, peer)) => {
                                let _ = s.set_nodelay(true);
                                tokio::spawn(nbd_server::serve(
                                    s,
                                    export.clone(),
                                    peer.to_string(),
                                ));
                            }
                            Err(e) => {
                                tracing::warn!("nbd accept: {e}");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                });
                (task, None)
            }
            ExportAddr::Unix(path) => {
                remove_stale_socket(path).await?;
                let l = UnixListener::bind(path).map_err(io_err(format!(
                    "binding the NBD export on {}",
                    path.display()
                )))?;
                // Whoever connects reads and writes the device: root and the daemon's own
                // user only, whatever the umask (checked per connection too, which covers
                // the moment before the mode is set), as the control socket.
                {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                        .map_err(io_err(format!(
                            "restricting the NBD export socket {}",
                            path.display()
                        )))?;
                }
                let export = export.clone();
                let task = tokio::spawn(async move {
                    loop {
                        match l.accept().await {
                            Ok((s, _)) if !crate::daemon::local_peer_allowed(&s) => {
                                let uid = s.peer_cred().map(|c| c.uid()).ok();
                                tracing::warn!(
                                    "nbd: refused a connection on the Unix socket from uid {uid:?}: only root and the daemon's user may use the export"
                                );
                            }
                            Ok((s, _)) => {
                                tokio::spawn(nbd_server::serve(s, export.clone(), "unix".into()));
                            }
                            Err(e) => {
                                tracing::warn!("nbd accept: {e}");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                });
                (task, Some(path.clone()))
            }
        };
        let repl_listener = match (&cfg.peer, cfg.me.replication) {
            (Some(_), Some(addr)) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(io_err(format!("binding the replication address {addr}")))?,
            ),
            _ => None,
        };
        tracing::info!(
            "resource {} up on node {}: {} bytes exported on {} ({} engine)",
            cfg.resource,
            cfg.me.name,
            size,
            cfg.me.export,
            device.engine_name()
        );
        let res = Arc::new(Resource {
            cfg: std::sync::RwLock::new(Arc::new(cfg.clone())),
            meta,
            device,
            rep: rep.clone(),
            link_ctl: watch::channel(LinkCtl::default()).0,
            link_info: Mutex::new(LinkInfo {
                state: "standalone",
                peer_left,
                ..Default::default()
            }),
            connections: std::sync::atomic::AtomicU64::new(0),
            crashed_primary: std::sync::atomic::AtomicBool::new(crashed),
            disk_failures: std::sync::atomic::AtomicU64::new(0),
            disk_lost_marked: std::sync::atomic::AtomicBool::new(false),
            discard_my_data: std::sync::atomic::AtomicBool::new(false),
            leaving_outdated: std::sync::atomic::AtomicBool::new(false),
            fence_lock: tokio::sync::Mutex::new(()),
            premature_outdate: std::sync::atomic::AtomicBool::new(false),
            handshakes: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            peer_heard_count: Arc::default(),
            split_brain_reported: std::sync::atomic::AtomicU8::new(0),
            sb_policy_reported: Default::default(),
            last_generations_line: Mutex::new(String::new()),
            stream_hold: std::sync::atomic::AtomicBool::new(false),
            resync: Mutex::new(None),
            resync_why: Mutex::new(String::new()),
            resync_left: std::sync::atomic::AtomicU64::new(0),
            planned_reconnect: std::sync::atomic::AtomicBool::new(false),
            sync_paused: tokio::sync::watch::channel(false).0,
            sync_paused_by_peer: std::sync::atomic::AtomicBool::new(false),
            verify: Mutex::new(VerifyState::default()),
            verify_kick: tokio::sync::Notify::new(),
            final_ack: tokio::sync::Notify::new(),
            final_acked: tokio::sync::Notify::new(),
            tasks: Mutex::new(Vec::new()),
            export,
            role: Mutex::new(Role::Secondary),
            listener,
            unix_path,
            kernel: tokio::sync::Mutex::new(None),
            kernel_note: Mutex::new(None),
            skip_sync: Mutex::new(None),
            skip_sync_kick: tokio::sync::Notify::new(),
            _claim: claim,
            link_key: std::sync::RwLock::new(link_key),
            link_sealed: std::sync::atomic::AtomicBool::new(false),
            adjust_lock: tokio::sync::Mutex::new(()),
            peer_tx: Mutex::new(None),
            leaving: std::sync::atomic::AtomicBool::new(false),
            promoted_epoch: std::sync::atomic::AtomicU64::new(u64::MAX),
            resync_target_started: std::sync::atomic::AtomicBool::new(false),
            sync_expected: Default::default(),
            skip_ops: tokio::sync::Mutex::new(()),
            stopping: Default::default(),
            promoting: Default::default(),
            promotion_busy: Default::default(),
            promote_ask: Mutex::new(None),
        });
        let watcher = tokio::spawn(watch_disk_errors(
            Arc::downgrade(&res),
            res.device.subscribe_disk_errors(),
        ));
        let lost = tokio::spawn(watch_sync_failed(
            Arc::downgrade(&res),
            res.device.subscribe_sync_failed(),
        ));
        let stall = tokio::spawn(watch_stalls(Arc::downgrade(&res)));
        if let Ok(mut t) = res.tasks.lock() {
            t.push(watcher);
            t.push(lost);
            t.push(stall);
        }
        if let (Some(rep), Some(l)) = (rep, repl_listener) {
            let link = tokio::spawn(crate::peer::run(res.clone(), l, res.link_ctl.subscribe()));
            let persister = tokio::spawn(journal_persister(rep, Arc::downgrade(&res)));
            if let Ok(mut t) = res.tasks.lock() {
                t.push(link);
                t.push(persister);
            }
        }
        Ok(res)
    }

    /// The running configuration (a snapshot: `adjust` may replace it).
    pub fn cfg(&self) -> Arc<Config> {
        self.cfg
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// DRBD's `adjust`: applies what differs between the running configuration and `new`
    /// (see `config::plan_adjust` for what takes effect when) and says what it did.
    pub async fn adjust(&self, new: &Config, dry_run: bool) -> Result<String, NodeError> {
        let _one = self.adjust_lock.lock().await;
        let old = self.cfg();
        // Compared with what runs: the journal is the metadata's (a config that differs was
        // said at `up`, and is still the file's in the running config for that warning).
        let mut running = (*old).clone();
        running.journal_size = self
            .with_meta(|m| m.sb.layout.journal_len)
            .unwrap_or(old.journal_size);
        // As create-md would lay it out.
        let mut wanted = new.clone();
        wanted.journal_size = new.journal_size.div_ceil(4096) * 4096;
        let mut plan = crate::config::plan_adjust(&running, &wanted)
            .map_err(|e| NodeError::Refused(format!("{e}: nothing changed")))?;
        plan.running.journal_size = new.journal_size;
        if plan.changes.is_empty() {
            return Ok(format!(
                "resource {} on {}: nothing to change ({} is what runs)",
                old.resource,
                old.me.name,
                new.file.display()
            ));
        }
        let lines: String = plan
            .changes
            .iter()
            .map(|c| format!("\n  {}: {} -> {} ({})", c.key, c.from, c.to, c.when))
            .collect();
        // What the peer needs: the same encryption and secret (from the next connection), and
        // the same protocol, which a connected peer is told over the link.
        let new_protocol = plan.running.protocol;
        let protocol_changed = new_protocol != old.protocol;
        let connected = established(self.link().state);
        let keys_changed = plan
            .changes
            .iter()
            .any(|c| matches!(c.key.as_str(), "resource.encryption" | "resource.secret"));
        let peer_note = |protocol_told: Option<bool>| -> String {
            let Some(p) = &old.peer else {
                return String::new();
            };
            let mut note = String::new();
            if protocol_changed {
                note.push_str(&match protocol_told {
                    Some(true) => format!(
                        "\n{} was sent the new protocol over the link and runs protocol {:?} too; set it in its config file (its next `up` or `adjust` applies the file's)",
                        p.name, new_protocol
                    ),
                    None if connected => format!(
                        "\n{} is connected: it would be told the new protocol over the link",
                        p.name
                    ),
                    _ => format!(
                        "\n{} was not told the new protocol (not connected): adjust it too before it connects (a connection is refused while the protocols differ)",
                        p.name
                    ),
                });
            }
            if keys_changed {
                note.push_str(&format!(
                    "\n{} must have the same encryption and secret: adjust it too if it has not been (a connection is refused while they differ)",
                    p.name
                ));
            }
            note
        };
        if dry_run {
            return Ok(format!(
                "resource {} on {} would change:{lines}{}",
                old.resource,
                old.me.name,
                peer_note(None)
            ));
        }
        if plan.running.secret != old.secret {
            let key = match plan.running.secret.clone() {
                Some(secret) => {
                    let resource = plan.running.resource.clone();
                    Some(
                        tokio::task::spawn_blocking(move || {
                            proto::seal::link_key(&secret, &resource)
                        })
                        .await
                        .map_err(|e| {
                            NodeError::Refused(format!("deriving the link key failed: {e}"))
                        })?,
                    )
                }
                None => None,
            };
            *self
                .link_key
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = key;
        }
        let protocol = plan.running.protocol;
        let freezes = plan.running.fencing.freezes_io();
        *self
            .cfg
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(plan.running);
        if let Some(rep) = &self.rep {
            rep.set_protocol(protocol);
            // A policy that no longer freezes I/O lets writes suspended under the old one go.
            if !freezes && rep.resume_io() {
                tracing::warn!(
                    "writes resumed: fencing is no longer resource-and-stonith (adjust)"
                );
            }
        }
        // The peer takes a new protocol from the running connection, as DRBD's does (its
        // config file is the admin's to change). Bounded: a peer that reads nothing for a
        // while (its own adjust waiting on this node, say) is not waited for.
        let mut protocol_told = Some(false);
        if protocol_changed && established(self.link().state) {
            if let Some(tx) = self.peer_tx.lock().ok().and_then(|t| t.clone()) {
                let told = tokio::time::timeout(
                    Duration::from_secs(2),
                    tx.send(proto::peer::Msg::Protocol {
                        protocol: crate::peer::protocol_letter(protocol),
                    }),
                )
                .await;
                protocol_told = Some(matches!(told, Ok(true)));
            }
        }
        let peer_note = peer_note(protocol_told);
        for c in &plan.changes {
            tracing::info!("adjust: {}: {} -> {} ({})", c.key, c.from, c.to, c.when);
        }
        let warnings: String = self
            .up_warnings()
            .iter()
            .map(|w| format!("\nwarning: {w}"))
            .collect();
        Ok(format!(
            "resource {} adjusted on {}:{lines}{peer_note}{warnings}",
            old.resource, old.me.name
        ))
    }

    /// DRBD's size negotiation, at a connect: a node whose disk holds no data yet (fresh
    /// from create-md: inconsistent, at the just-created generation; not a resync target
    /// half way, nor a disk that failed) and is larger than its peer shrinks its export to
    /// the peer's size at once (a secondary serves no client);
    /// a node with data never shrinks at a connect (as in DRBD: a primary larger than its
    /// peer is refused before this, a secondary keeps what it exports). The size this node
    /// then exports, if no larger than the peer's, is kept in the metadata (`agreed_size`),
    /// so that a later `up` exports it too and the larger node, promoted after a failover,
    /// exports no more than the other can take back. Returns this node's export size, or
    /// `None` when a promotion is under way (the next connect decides).
    pub async fn agree_size(&self, peer_size: u64) -> Result<Option<u64>, NodeError> {
        let mine = self.device.size();
        if peer_size < mine && Self::shrinks_at_connect(&self.node_state(), self.role()) {
            // Not across a promotion (it holds `skip_ops` from its checks to its commit): a
            // node promoted meanwhile serves clients at the size it told them. Not waited
            // for: this connect is refused and the next one decides.
            let Ok(_no_promotion) = self.skip_ops.try_lock() else {
                return Ok(None);
            };
            if !Self::shrinks_at_connect(&self.node_state(), self.role()) {
                return Ok(Some(self.device.size()));
            }
            self.device.shrink_to(peer_size);
            tracing::info!(
                "exporting {peer_size} bytes from now on, the size of the peer's disk (this node's holds {mine}, and no data yet): a pair exports the smaller of its two sizes"
            );
        }
        let now = self.device.size();
        let stored = self.with_meta(|m| m.sb.agreed_size)?;
        if now <= peer_size && stored != now {
            self.update_meta(move |sb| {
                sb.agreed_size = now;
                Ok(())
            })
            .await?;
        }
        Ok(Some(now))
    }

    /// Whether a node in state `st` shrinks its export to a smaller peer's at a connect (see
    /// [`Self::agree_size`]); also how this node predicts its peer's side.
    pub fn shrinks_at_connect(st: &NodeState, role: Role) -> bool {
        role != Role::Primary
            && !st.primary
            && st.disk == 0
            && st.gen.current == crate::meta::UUID_JUST_CREATED
    }

    /// The peer's `adjust` changed its replication protocol (`Msg::Protocol`): this node runs
    /// `p` too, for this connection and the next ones, until its own `adjust` or restart
    /// (which apply its config file, as DRBD's do).
    pub async fn adopt_peer_protocol(&self, p: crate::config::Protocol) {
        let _one = self.adjust_lock.lock().await;
        let old = self.cfg();
        if old.protocol == p {
            return;
        }
        let mut running = (*old).clone();
        running.protocol = p;
        *self
            .cfg
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(running);
        if let Some(rep) = &self.rep {
            rep.set_protocol(p);
        }
        // Only a file that says otherwise needs the admin (a shared file, or one edited on
        // both nodes before either adjust, already says it).
        let file_says = Config::load(&old.file, Some(&old.me.name))
            .ok()
            .map(|c| c.protocol);
        if file_says == Some(p) {
            tracing::info!(
                "protocol {:?} -> {p:?}, as the peer's adjust set it (this node's config file says so too)",
                old.protocol
            );
        } else {
            tracing::warn!(
                "protocol {:?} -> {p:?}, as the peer's adjust set it: set `protocol = \"{p:?}\"` in this node's config file too (its next `up` or `adjust` applies the file's)",
                old.protocol
            );
        }
    }

    /// The key the peer link authenticates with and derives its session keys from: the
    /// configured secret, stretched once at start.
    pub fn link_key(&self) -> Option<[u8; 32]> {
        *self
            .link_key
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    pub fn rep(&self) -> Option<&Arc<Replication>> {
        self.rep.as_ref()
    }

    /// Applies `f` to the superblock and persists it (off the async threads).
    pub async fn commit_meta(
        &self,
        f: impl FnOnce(&mut Superblock) + Send + 'static,
    ) -> Result<(), NodeError> {
        self.update_meta(move |sb| {
            f(sb);
            Ok(())
        })
        .await
    }

    /// Applies `f` to the superblock and persists the result, off the async threads; nothing
    /// is written if `f` refuses.
    pub async fn update_meta<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Superblock) -> Result<T, NodeError> + Send + 'static,
    ) -> Result<T, NodeError> {
        let meta = self.meta.clone();
        tokio::task::spawn_blocking(move || MetaStore::update(&meta, f))
            .await
            .map_err(|e| NodeError::Refused(format!("metadata task failed: {e}")))?
    }

    /// [`Self::update_meta`] that writes nothing when nothing changes (see
    /// `MetaStore::update_if_changed`).
    pub async fn update_meta_if_changed<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Superblock) -> Result<T, NodeError> + Send + 'static,
    ) -> Result<T, NodeError> {
        let meta = self.meta.clone();
        tokio::task::spawn_blocking(move || MetaStore::update_if_changed(&meta, f))
            .await
            .map_err(|e| NodeError::Refused(format!("metadata task failed: {e}")))?
    }

    /// What `up` should tell the admin beyond "up": settings of the config that the metadata
    /// overrides (also logged).
    pub fn up_warnings(&self) -> Vec<String> {
        let journal_len = self
            .meta
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sb
            .layout
            .journal_len;
        let wanted = self.cfg().journal_size.div_ceil(4096) * 4096;
        let mut w = Vec::new();
        if self.cfg().peer.is_some() && journal_len != wanted {
            w.push(format!(
                "journal-size is {} bytes in the config, but the metadata holds a {journal_len}-byte journal, which is used (`create-md` applies a new size; see the log)",
                self.cfg().journal_size
            ));
        }
        if self.cfg().peer.is_some()
            && self.cfg().fencing.enabled()
            && !self.cfg().handlers.contains_key("fence-peer")
        {
            let freeze = if self.cfg().fencing.freezes_io() {
                "; under resource-and-stonith its writes stay suspended after every loss of the peer until the link is back or `resume-io`"
            } else {
                ""
            };
            w.push(format!("fencing is {} but no fence-peer handler is configured: a primary that loses its peer cannot outdate it, and a disconnected secondary is not promoted without --force (only a secondary that is disconnected by the admin outdates itself){freeze}", self.cfg().fencing.name()));
        }
        if self.cfg().fencing == state::Fencing::DontCare
            && self.cfg().handlers.contains_key("fence-peer")
        {
            w.push("a fence-peer handler is configured but fencing is dont-care: it never runs (set fencing = \"resource-only\" or \"resource-and-stonith\")".into());
        }
        // Found out now rather than at the event (a fence that cannot run is a failed one).
        let cfg = self.cfg();
        for (event, cmd) in &cfg.handlers {
            if let Some(why) = not_runnable(cmd) {
                w.push(format!(
                    "handlers.{event} = {:?} {why}: it would fail when the event comes (a handler is one program, run with RESOURCE EVENT PEER as its arguments: no arguments or shell syntax of its own; wrap those in a script)",
                    cmd.display()
                ));
            }
        }
        w
    }

    /// A write or flush of this node's disk failed: the replica is inconsistent. On disk if
    /// the superblock can still be written; in memory in any case, so that the next handshake
    /// says so (and the peer resyncs what it never heard acknowledged) rather than offering
    /// an applied mark that passed the failed write.
    pub async fn mark_inconsistent(&self) {
        self.mark_inconsistent_with(false).await
    }

    /// [`Self::mark_inconsistent`]; `lost_writes`: and every region out of sync, in the same
    /// superblock commit (see `Superblock::lost_writes`).
    async fn mark_inconsistent_with(&self, lost_writes: bool) {
        // Counted before the commit: a resync's end that commits after it sees the count.
        self.disk_failures
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let meta = self.meta.clone();
        let r = tokio::task::spawn_blocking(move || {
            MetaStore::update_or_keep(&meta, |sb| {
                sb.disk = DiskState::Inconsistent;
                sb.lost_writes |= lost_writes;
            })
        })
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("recording the inconsistent disk: {e}; kept in memory"),
            Err(e) => tracing::error!("recording the inconsistent disk: {e}"),
        }
    }

    /// A sync of the backing device failed: the kernel may have dropped written pages, and
    /// nothing says which (DRBD would detach the disk). With a peer, this disk must never be
    /// a sync source again before the peer has given it everything: it is marked
    /// inconsistent and every region out of sync (pinned, on disk as far as the disk still
    /// takes writes), so the next connect makes it the target of a full resync, whatever its
    /// role and the generations. Before, a restart found it up to date and, as a crashed
    /// primary, resynced its damaged extents over the peer's good copy.
    pub async fn disk_lost_writes(&self) {
        let Some(rep) = &self.rep else {
            return;
        };
        if self
            .disk_lost_marked
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        rep.mark_out_of_sync(0, self.device.size());
        // The bitmap written next may not reach the disk before a crash; the superblock says
        // it on its own (a start sets every bit again).
        self.mark_inconsistent_with(true).await;
        if let Err(e) = rep.persist().await {
            tracing::error!("recording the failed disk's bitmap: {e}");
        }
        tracing::error!(
            "{}'s disk lost writes: it is now inconsistent and takes a full resync from the peer at the next connect; {}",
            self.cfg().me.name,
            if self.role() == Role::Primary {
                "fail over: `blockrep-ctl secondary --force` here, then `blockrep-ctl primary` on the peer"
            } else {
                "replace or repair it, then `blockrep-ctl down` and `up` here"
            }
        );
    }

    /// A metadata commit that a role change or `down` needs failed. On a disk that lost
    /// writes (its sync failed) that is expected, and refusing would leave no way out but a
    /// signal: the change goes on in memory (the peer keeps the good copy, see
    /// [`Self::peer_disk_failed`]). Otherwise the error stands.
    fn tolerate_on_failed_disk(&self, e: NodeError, what: &str) -> Result<(), NodeError> {
        if !self.device.sync_failed() {
            return Err(e);
        }
        tracing::error!("recording {what} on the failed disk: {e}; going on without it");
        Ok(())
    }

    /// The peer, primary, reports its disk not up to date at this node's generation while
    /// this node's is: its disk failed (a primary's disk is otherwise always up to date).
    /// Its own metadata may not be able to record that, and if it then restarts as a crashed
    /// primary at this generation it would be the sync source of its damaged extents. So this
    /// node records it in the only way both sides read at every connect: it starts a new
    /// generation of its own with the peer's in its history and no bitmap generation (every
    /// region is marked out of sync too), which makes it the source of a full resync to the
    /// peer whatever the peer's metadata says, in one commit (the bitmap written after it may
    /// not reach the disk before a crash). The stream goes on (the peer's writes still land
    /// here). Returns whether it did.
    pub async fn peer_disk_failed(&self, peer: &NodeState) -> bool {
        let Some(rep) = &self.rep else {
            return false;
        };
        let me = self.node_state();
        if !peer.primary || peer.disk == 2 || me.disk != 2 || peer.gen.current != me.gen.current {
            return false;
        }
        rep.mark_out_of_sync(0, self.device.size());
        let id = random_id();
        if let Err(e) = self
            .commit_meta(move |sb| sb.gen = state::new_generation_full(sb.gen, id))
            .await
        {
            tracing::error!("recording the peer's failed disk: {e}");
            return false;
        }
        if let Err(e) = rep.persist().await {
            tracing::error!("writing the bitmap after the peer's disk failed: {e}");
        }
        let cfg = self.cfg();
        let peer_name = cfg.peer.as_ref().map_or("", |p| p.name.as_str());
        tracing::error!(
            "{peer_name}'s disk failed (it reports it {}): this node keeps the good copy under new data generation {id:016X}, and {peer_name} takes a full resync from here; fail over: `secondary --force` on {peer_name}, then `primary` here",
            if peer.disk == 1 { "outdated" } else { "inconsistent" }
        );
        true
    }

    /// After a stream from the peer ended, however it ended (a link task aborted does not
    /// run its own end): waits until every write it started is finished, then makes them
    /// durable and commits the applied mark, as a checkpoint would.
    ///
    /// Returns false when the flush failed: the writes may be lost, so the disk is marked
    /// inconsistent (a resync will bring them) and the applied mark must not move past them.
    pub async fn settle_applies(&self) -> bool {
        let Some(rep) = &self.rep else {
            return true;
        };
        rep.quiesce_applies().await;
        let mark = rep.applied_mark();
        let applied = mark.0;
        let durable = self
            .meta
            .lock()
            .map(|m| m.sb.applied_seq)
            .unwrap_or(u64::MAX);
        if applied <= durable {
            return true;
        }
        if self.device.sync_failed() {
            // Marked when the sync failed (see `disk_lost_writes`); every flush fails from
            // then on, and saying so at each reconnect is only noise.
            return false;
        }
        if let Err(e) = self.device.local_flush().await {
            tracing::error!(
                "flushing the applied stream failed (NBD error {e}): this replica is inconsistent"
            );
            self.mark_inconsistent().await;
            return false;
        }
        if let Err(e) = self.commit_meta(move |sb| sb.advance_applied(mark)).await {
            tracing::error!("persisting the applied sequence: {e}");
        }
        true
    }

    /// What this node tells its peer.
    pub fn node_state(&self) -> NodeState {
        let (disk, gen, promoted_ms, durable, known, unacked, split_as_primary) = {
            let m = self.meta.lock().unwrap_or_else(|p| p.into_inner());
            (
                m.sb.disk,
                m.sb.gen,
                m.sb.promoted_ms,
                m.sb.applied_seq,
                m.heard,
                m.sb.sync_done_unacked(),
                m.sb.split_as_primary(),
            )
        };
        let (applied, applied_term, issued, first, oos) = match &self.rep {
            Some(r) => {
                let g = r.lock();
                (
                    g.applied,
                    g.applied_term,
                    g.issued,
                    g.ring.first_seq().unwrap_or(0),
                    g.bitmap.dirty_bytes(),
                )
            }
            None => (0, 0, 0, 0, 0),
        };
        NodeState {
            primary: self.role() == Role::Primary,
            disk: disk.wire(),
            size: self.device.size(),
            gen: GenIds {
                current: gen.current,
                bitmap: gen.bitmap,
                history: gen.history,
                sync_done_unacked: unacked,
            },
            applied_seq: applied,
            applied_term,
            durable_seq: durable.min(applied),
            issued_seq: issued,
            journal_first_seq: first,
            out_of_sync: oos,
            crashed_primary: self
                .crashed_primary
                .load(std::sync::atomic::Ordering::SeqCst),
            discard_my_data: self
                .discard_my_data
                .load(std::sync::atomic::Ordering::SeqCst),
            promoted_ms,
            disk_failed: self.device.sync_failed(),
            peer_durable_gen: known.0,
            peer_durable_seq: known.1,
            split_as_primary,
        }
    }

    /// What this node's disk holds: its data generation and the sequence it had issued
    /// through, as its superblock last committed them. A restart after any crash reads at
    /// least this back (`issued` at `up` is never below the superblock's); the records of the
    /// last flush or so are not in it yet (a later mark that counted them from the journal
    /// could name records a restart does not find: a gap at a checkpoint that moved on).
    pub fn durable_issued_mark(&self) -> (u64, u64) {
        let m = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        (m.sb.gen.current, m.sb.issued_seq)
    }

    /// What the peer last said its disk holds, as (data generation, highest sequence): a
    /// source's `Msg::Durable` (what it issued, committed), or a target's acknowledged
    /// durable mark. Told back to it at the next connect, where a peer holding less at that
    /// generation went back in time; kept in the metadata with its next commit (a
    /// secondary's at every flush point of the stream, a primary's at its journal
    /// checkpoints, or by the persister once writes stand still).
    pub fn peer_durable_heard(&self) -> (u64, u64) {
        self.meta.lock().unwrap_or_else(|p| p.into_inner()).heard
    }

    /// The peer says its disk holds sequence `seq` at data generation `gen` (0: this node's
    /// current one, read under the same lock): kept (the highest at one generation) and told
    /// back to it at the next connect.
    pub fn note_peer_durable(&self, gen: u64, seq: u64) {
        let mut m = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        let gen = if gen == 0 { m.sb.gen.current } else { gen };
        m.heard = if m.heard.0 == gen {
            (gen, m.heard.1.max(seq))
        } else {
            (gen, seq)
        };
    }

    /// `resume-io` (DRBD's): writes suspended at the loss of the peer (`resource-and-stonith`,
    /// the fence not done) go on without it. The admin vouches that the peer will not be
    /// promoted over them.
    pub fn resume_io(&self) -> Result<String, NodeError> {
        let name = &self.cfg().me.name;
        match &self.rep {
            Some(rep) if rep.resume_io() => {
                tracing::warn!(
                    "writes resumed by resume-io: from here they are acknowledged without the peer"
                );
                Ok(format!(
                    "{name}: writes resumed; they are acknowledged without the peer until it is back"
                ))
            }
            _ => Ok(format!("{name}: writes were not suspended")),
        }
    }

    /// `pause-sync` (DRBD's): a resync from this node stops sending before its next region
    /// (writes still replicate), and one that starts waits, until `resume-sync`. On the
    /// target of a resync it is refused: the source decides what it sends.
    pub fn pause_sync(&self) -> Result<String, NodeError> {
        let name = self.cfg().me.name.clone();
        if self.cfg().peer.is_none() {
            return Err(NodeError::Refused(format!(
                "{name} has no peer: there is no resync to pause"
            )));
        }
        if self.link_state() == "sync-target" {
            return Err(NodeError::Refused(format!(
                "{name} is the target of the resync: run pause-sync on its source, {}",
                crate::peer::peer_name(self)
            )));
        }
        let was_paused = self.sync_paused.send_replace(true);
        crate::bell::ring();
        if was_paused {
            return Ok(format!(
                "{name}: the resync was already paused (resume-sync goes on)"
            ));
        }
        let running = self.link_state() == "sync-source";
        tracing::info!(
            "pause-sync: {}",
            if running {
                "the resync to the peer pauses after the region it is sending"
            } else {
                "a resync to the peer will wait for resume-sync"
            }
        );
        Ok(format!(
            "{name}: {} until resume-sync (writes still replicate)",
            if running {
                "the resync to the peer is paused"
            } else {
                "a resync to the peer will wait"
            }
        ))
    }

    /// Whether this node is the target of a resync its source holds with `pause-sync`.
    pub fn resync_paused_by_peer(&self) -> bool {
        self.link_state() == "sync-target"
            && self
                .sync_paused_by_peer
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `resume-sync` (DRBD's): ends a `pause-sync`.
    pub fn resume_sync(&self) -> Result<String, NodeError> {
        let name = self.cfg().me.name.clone();
        let was_paused = self.sync_paused.send_replace(false);
        crate::bell::ring();
        if !was_paused {
            if self.resync_paused_by_peer() {
                return Err(NodeError::Refused(format!(
                    "{name} is the target of the resync, which its source paused: run resume-sync on {}",
                    crate::peer::peer_name(self)
                )));
            }
            return Ok(format!("{name}: the resync was not paused"));
        }
        tracing::info!("resume-sync: the resync to the peer goes on");
        Ok(format!("{name}: the resync goes on"))
    }

    /// `outdate` (DRBD's `drbdadm outdate`, what a primary's `fence-peer` handler calls on
    /// this node by another path): this disk is declared older than the peer's, so `primary`
    /// needs `--force` here, and the next connect to an up-to-date peer makes it the target.
    pub async fn outdate(&self) -> Result<String, NodeError> {
        let me = &self.cfg().me.name;
        if self.cfg().peer.is_none() {
            return Err(NodeError::Refused(
                "the resource has no peer: there is nothing this disk could be older than".into(),
            ));
        }
        // Not during a role change: a promotion commits an up-to-date disk some moments
        // before it sets the role, and an outdate between the two would leave a primary with
        // an outdated disk (which fences nobody). Refused rather than waited for: a fence
        // handler that ran `outdate` here while this node's own promotion fences the other
        // would stall both; a refused outdate is a failed fence, which is safe.
        let Ok(_roles) = self.skip_ops.try_lock() else {
            return Err(NodeError::Refused(format!(
                "{me}: a role change is under way: not outdated"
            )));
        };
        let connected = established(self.link().state);
        let (disk, promoted_before) = self.with_meta(|m| (m.sb.disk, m.sb.promoted_ms))?;
        let what = state::outdate(self.role() == Role::Primary, connected, disk)
            .map_err(NodeError::Refused)?;
        match what {
            state::Outdate::AlreadyOutdated => {
                return Ok(format!("{me}'s disk is already outdated"))
            }
            state::Outdate::AlreadyInconsistent => {
                return Ok(format!(
                    "{me}'s disk is inconsistent, which is worse than outdated: nothing to do"
                ))
            }
            state::Outdate::Commit => {}
        }
        // Under the metadata lock, so a concurrent commit (a promotion, a resync's end) is
        // either before it (and then seen here) or after it.
        let changed = self
            .update_meta(move |sb| {
                // A promotion committed since the check above: this node is primary now, and
                // a primary is never outdated (it would then fence nobody, and hand its
                // outdated mark to every resync target).
                if sb.disk == DiskState::UpToDate && sb.promoted_ms == promoted_before {
                    sb.disk = DiskState::Outdated;
                    Ok(true)
                } else {
                    Ok(false)
                }
            })
            .await?;
        if !changed || self.role() == Role::Primary {
            return Err(NodeError::Refused(format!(
                "{me}'s state changed meanwhile (now {}, {}): not outdated",
                self.with_meta(|m| m.sb.disk.name()).unwrap_or("unknown"),
                self.role().name()
            )));
        }
        tracing::warn!("disk outdated by `outdate` (fencing): `primary` needs --force here until a connect to an up-to-date peer brings it up to date");
        // A handshake that began before the commit (it may not be established yet) told the
        // peer "up to date": reconnect, so that the next one carries the outdated disk and
        // the peer brings it up to date.
        if !self.link_ctl.borrow().standalone {
            self.redial(|c| c.bump += 1);
        }
        Ok(format!(
            "{me}'s disk is now outdated: `primary` needs --force here; a connect to an up-to-date peer brings it up to date"
        ))
    }

    /// With resource-level fencing, a secondary that the admin takes away from its primary
    /// (`disconnect`, `down`) says first that it will lack the writes that follow: its disk is
    /// outdated before the link goes, so no moment exists when it is cut off and still looks
    /// promotable (DRBD's graceful disconnect under `fencing resource-only`).
    async fn outdate_before_leaving(&self) -> Result<(), String> {
        let (connected, peer_primary) = {
            let l = self.link();
            (
                established(l.state),
                l.peer.as_ref().is_some_and(|p| p.primary),
            )
        };
        let Ok(disk) = self.with_meta(|m| m.sb.disk) else {
            return Ok(());
        };
        // Whatever the disk is now (a resync into it may be ending): set before the commit,
        // and read under the metadata lock by a resync's end that may still be applying,
        // which then leaves the disk outdated instead of declaring it up to date.
        if state::leaves_a_primary(
            self.cfg().fencing,
            self.role() == Role::Primary,
            peer_primary,
            connected,
        ) {
            self.leaving_outdated
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        if !state::outdates_itself_on_leaving(
            self.cfg().fencing,
            self.role() == Role::Primary,
            peer_primary,
            connected,
            disk,
        ) {
            return Ok(());
        }
        let r = self
            .update_meta(|sb| {
                if sb.disk == DiskState::UpToDate {
                    sb.disk = DiskState::Outdated;
                }
                Ok(())
            })
            .await;
        match r {
            Ok(()) => {
                tracing::info!(
                    "fencing {}: leaving the primary, so this node's disk is outdated (it lacks what the primary writes from now on)",
                    self.cfg().fencing.name()
                );
                Ok(())
            }
            Err(e) => {
                tracing::warn!(
                    "fencing {}: leaving the primary, but the outdated disk state could not be recorded ({e})",
                    self.cfg().fencing.name()
                );
                Err(format!(
                    "fencing {}: this disk must be marked outdated before it leaves the primary, and that failed ({e})",
                    self.cfg().fencing.name()
                ))
            }
        }
    }

    /// `invalidate-remote` (DRBD's): the peer's data is declared bad; this node, primary, up to
    /// date and connected to it, sends it everything (a bitmap resync of the whole device, the
    /// peer inconsistent until it ends) from the reconnect this forces. The marks are on disk
    /// before the link drops: a restart of this node meanwhile still resyncs them all.
    ///
    /// `reset_bitmap: false` (DRBD 9's `--reset-bitmap=no`): nothing more is marked; the
    /// regions already marked (a verify's differences) are resynced through the same planned
    /// reconnect, which no fence-peer handler takes for a lost peer (an admin's `disconnect`
    /// on a primary under fencing is one: the handler runs, and under resource-and-stonith
    /// I/O freezes until it answers).
    pub async fn invalidate_remote(&self, reset_bitmap: bool) -> Result<String, NodeError> {
        let cfg = self.cfg();
        let Some(peer) = cfg.peer.as_ref() else {
            return Err(NodeError::Refused("no peer to invalidate".into()));
        };
        let Some(rep) = self.rep().cloned() else {
            return Err(NodeError::Refused("no replication state".into()));
        };
        // The primary's stream carries the resync: between two secondaries the marks would
        // name regions no resync direction claims (as for verify's).
        if self.role() != Role::Primary {
            return Err(NodeError::Refused(format!(
                "invalidate-remote runs on the primary: between two secondaries run `invalidate` on {} instead (it fetches everything from this node)",
                peer.name
            )));
        }
        if self.node_state().disk != 2 {
            return Err(NodeError::Refused(format!(
                "this node's disk is not up to date: only a good copy can replace {}'s",
                peer.name
            )));
        }
        // As `invalidate` asks: a connected peer, and no resync under way (its end would
        // declare the peer's disk up to date over the invalidation).
        let connected = established(self.link().state);
        if !connected {
            return Err(NodeError::Refused(format!(
                "{} is not connected: invalidate-remote needs the peer connected (its next connect after an outage resyncs what it lacks anyway)",
                peer.name
            )));
        }
        let state = self.link_state();
        if state == "sync-source" || state == "sync-target" {
            return Err(NodeError::Refused(format!(
                "a resync is running ({state}): invalidate-remote once it has ended (`blockrep-ctl wait-sync`)"
            )));
        }
        // As a `disconnect` does: the peer makes what it has durable first, so that the
        // reconnect finds nothing in flight.
        if !rep.settle_peer(Duration::from_secs(5)).await {
            tracing::warn!(
                "invalidate-remote: the peer did not confirm every write durable within 5 s (the resync sends everything anyway)"
            );
        }
        let size = self.device().size();
        if reset_bitmap {
            rep.mark_out_of_sync(0, size);
        }
        let marked = rep.lock().bitmap.dirty_bytes();
        if marked == 0 {
            return Ok(format!(
                "nothing is marked out of sync: {} has every region (a `verify` marks what differs)",
                peer.name
            ));
        }
        rep.persist().await.map_err(|e| {
            NodeError::Refused(format!(
                "writing the marks failed ({e}): the peer is resynced in full at its next connect if they reached the disk"
            ))
        })?;
        if reset_bitmap {
            tracing::warn!(
                "invalidate-remote: all {size} bytes marked out of sync; {} is resynced in full from this node",
                peer.name
            );
        } else {
            tracing::info!(
                "invalidate-remote --reset-bitmap=no: {} resyncs the {marked} bytes marked out of sync",
                peer.name
            );
        }
        self.planned_reconnect
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.redial(|c| {
            c.standalone = false;
            c.bump += 1;
        });
        Ok(if reset_bitmap {
            format!(
                "{} invalidated: it is resynced in full from {} (it reconnects now; `wait-sync` follows it)",
                peer.name, cfg.me.name
            )
        } else {
            format!(
                "{}: the {marked} bytes marked out of sync are resynced from {} (it reconnects now; `wait-sync` follows it)",
                peer.name, cfg.me.name
            )
        })
    }

    /// `invalidate`: this node's data is declared bad; it fetches everything from the peer
    /// (a full resync as the target) at the next connect, which this forces.
    pub async fn invalidate(&self) -> Result<String, NodeError> {
        if self.role() == Role::Primary {
            return Err(NodeError::Refused(
                "a primary cannot invalidate its own data: demote it first".into(),
            ));
        }
        if self.cfg().peer.is_none() {
            return Err(NodeError::Refused("no peer to fetch the data from".into()));
        }
        // As in DRBD: only with a connected peer whose data is good, or neither node would
        // be up to date afterwards.
        let peer_good = {
            let l = self.link();
            established(l.state) && l.peer.as_ref().is_some_and(|p| p.disk == 2)
        };
        if !peer_good {
            return Err(NodeError::Refused(
                "the peer is not connected with up-to-date data: invalidating this node now would leave no good copy".into(),
            ));
        }
        // As in DRBD, not while a resync runs: its end would declare this disk up to date
        // over the invalidation, or (as the source) the target would be left without one.
        let state = self.link_state();
        if state == "sync-source" || state == "sync-target" {
            return Err(NodeError::Refused(format!(
                "a resync is running ({state}): invalidate once it has ended (`blockrep-ctl wait-sync`)"
            )));
        }
        // Counted before the commit, as a failed write is: the end of a journal catch-up
        // that commits after it leaves this disk inconsistent.
        self.disk_failures
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.commit_meta(|sb| {
            sb.disk = DiskState::Inconsistent;
            sb.gen = crate::meta::Generations {
                current: crate::meta::UUID_JUST_CREATED,
                ..Default::default()
            };
        })
        .await?;
        self.reconnect_announced().await;
        Ok(format!(
            "{} invalidated: a full resync from the peer starts when connected",
            self.cfg().me.name
        ))
    }

    /// Reconnects the link so that the next handshake carries this node's new state, telling
    /// the peer first that it is a planned reconnect (`Msg::Reconnect`): a primary that saw a
    /// plain close would take its secondary for lost and run its `fence-peer` handler, which
    /// may power this node off. The peer closes on the message; if it does not within a few
    /// seconds (no connection, or it never answers), this node closes itself.
    async fn reconnect_announced(&self) {
        let tx = self.peer_tx.lock().ok().and_then(|t| t.clone());
        let seen = self.connections_established();
        if let Some(tx) = tx.filter(|_| established(self.link().state)) {
            // The close that follows is this node's own doing, whichever side makes it.
            self.planned_reconnect
                .store(true, std::sync::atomic::Ordering::SeqCst);
            let sent =
                tokio::time::timeout(Duration::from_secs(2), tx.send(proto::peer::Msg::Reconnect))
                    .await
                    .unwrap_or(false);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            while sent
                && self.connections_established() == seen
                && established(self.link().state)
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // The peer closed: the link loop dials again by itself, with this state (a
            // redial here would cut the next connection, and unannounced).
            if sent && !(self.connections_established() == seen && established(self.link().state)) {
                self.link().lost_at = None;
                return;
            }
            if sent {
                tracing::warn!(
                    "the peer did not close the link for the planned reconnect within 3 s: closing it here, which a primary with fencing may take for a lost peer"
                );
            } else {
                // Nothing told the peer: the close below is an ordinary one for it, and a
                // flag left set would cover some later close.
                self.planned_reconnect
                    .store(false, std::sync::atomic::Ordering::SeqCst);
            }
        }
        self.redial(|c| {
            c.standalone = false;
            c.bump += 1;
        });
    }

    /// This node as `new-current-uuid --clear-bitmap` sees it.
    pub fn skip_sync_view(st: &NodeState) -> crate::state::SkipSyncView {
        crate::state::SkipSyncView {
            primary: st.primary,
            disk: st.disk,
            current: st.gen.current,
        }
    }

    /// `new-current-uuid --clear-bitmap` (DRBD's): the admin declares the two freshly created
    /// disks identical (both new and zeroed, say), so the initial full sync is skipped. Both
    /// nodes adopt one new generation and become up to date: the peer first (asked over the
    /// link), then this node. If anything fails between the two, the generations differ and
    /// the next connect runs the full sync after all.
    pub async fn skip_initial_sync(&self) -> Result<String, NodeError> {
        let cfg = self.cfg();
        let Some(peer_cfg) = cfg.peer.as_ref() else {
            return Err(NodeError::Refused(
                "no peer configured: there is no initial sync to skip (`primary --force` makes a lone node up to date)".into(),
            ));
        };
        let peer = {
            let l = self.link();
            if l.state == "connected" {
                l.peer.clone()
            } else {
                None
            }
        };
        let skip = self.skip_ops.lock().await;
        let me = self.node_state();
        crate::state::can_skip_initial_sync(
            Self::skip_sync_view(&me),
            peer.as_ref().map(Self::skip_sync_view),
        )
        .map_err(NodeError::Refused)?;
        let gen = random_id();
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut pending = self.skip_sync.lock().unwrap_or_else(|p| p.into_inner());
            if pending.is_some() {
                return Err(NodeError::Refused(
                    "another new-current-uuid is waiting for the peer".into(),
                ));
            }
            *pending = Some((gen, tx));
        }
        self.skip_sync_kick.notify_one();
        let answer = tokio::time::timeout(Duration::from_secs(10), rx).await;
        {
            // Ours, unless the answer took it already.
            let mut pending = self.skip_sync.lock().unwrap_or_else(|p| p.into_inner());
            if pending.as_ref().is_some_and(|(g, _)| *g == gen) {
                pending.take();
            }
        }
        let result = match answer {
            Ok(Ok(Ok(()))) => self.adopt_skipped_sync(gen).await,
            Ok(Ok(Err(why))) => Err(NodeError::Refused(format!(
                "{} refused to skip the initial sync: {why}",
                peer_cfg.name
            ))),
            _ => Err(NodeError::Refused(format!(
                "{} did not answer within 10 s; nothing changed on this node (if the peer did adopt the new generation, the full sync runs after all)",
                peer_cfg.name
            ))),
        };
        drop(skip);
        // Reconnect whatever happened, so that both sides exchange their new state (and a
        // half-done skip turns into the full sync).
        self.announce_role().await;
        result?;
        Ok(format!(
            "{} and {} are up to date with the new generation {gen:016X}; the initial sync is skipped (both disks are taken to hold the same data)",
            self.cfg().me.name, peer_cfg.name
        ))
    }

    /// The peer asked this node to skip the initial sync with generation `gen`.
    pub async fn skip_sync_for_peer(&self, gen: u64) -> Result<(), String> {
        // Never waits: the link's reader runs this, and a request of this node's own waits
        // for that reader (both nodes asking at once would otherwise cross).
        let Ok(_skip) = self.skip_ops.try_lock() else {
            return Err(
                "it is busy with a promotion or its own new-current-uuid (run it on one node only)"
                    .into(),
            );
        };
        let peer = self.link().peer.clone();
        crate::state::can_skip_initial_sync(
            Self::skip_sync_view(&self.node_state()),
            peer.as_ref().map(Self::skip_sync_view),
        )?;
        if gen & (1 << 63) == 0 {
            return Err(format!("{gen:016X} is not a generation id"));
        }
        self.adopt_skipped_sync(gen)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(
            "initial sync skipped at the peer's request (new-current-uuid --clear-bitmap): up to date with generation {gen:016X}"
        );
        Ok(())
    }

    /// Up to date with generation `gen` and an empty bitmap, on disk. The precondition is
    /// checked again in the same metadata update that commits, so a promotion (which always
    /// leaves the fresh generation) in the meantime makes this fail rather than hide its
    /// writes; the bitmap is cleared only after that commit.
    async fn adopt_skipped_sync(&self, gen: u64) -> Result<(), NodeError> {
        if self.role() == Role::Primary {
            return Err(NodeError::Refused("this node became primary".into()));
        }
        self.update_meta(move |sb| {
            if sb.disk != DiskState::Inconsistent
                || sb.gen.current != crate::meta::UUID_JUST_CREATED
            {
                return Err(NodeError::Refused(format!(
                    "this node is no longer freshly created (disk {}, generation {:016X})",
                    sb.disk.name(),
                    sb.gen.current
                )));
            }
            sb.disk = DiskState::UpToDate;
            sb.gen = crate::state::skipped_sync(gen);
            sb.peer_up_to_date = true;
            Ok(())
        })
        .await?;
        if let Some(rep) = &self.rep {
            {
                let mut g = rep.lock();
                g.bitmap.clear_all();
                g.bitmap_dirty = true;
            }
            rep.persist()
                .await
                .map_err(io_err("writing the cleared bitmap"))?;
        }
        Ok(())
    }

    /// `verify`: starts an online verify; returns at once with the run's number. Progress and
    /// result are in status. The comparison always runs on the primary (its hash requests
    /// travel in the replication stream, in order with the writes); on a secondary this asks
    /// the primary over the link and follows the primary's reports.
    pub fn start_verify(&self) -> Result<String, NodeError> {
        self.begin_verify(false)
    }

    /// The secondary asked for a verify over the link (see [`Resource::start_verify`]).
    pub fn start_verify_for_peer(&self) -> Result<String, NodeError> {
        self.begin_verify(true)
    }

    fn begin_verify(&self, for_peer: bool) -> Result<String, NodeError> {
        let cfg = self.cfg();
        let Some(peer) = cfg.peer.as_ref() else {
            return Err(NodeError::Refused("no peer to verify against".into()));
        };
        let (link, peer_primary) = {
            let l = self.link();
            (l.state, l.peer.as_ref().is_some_and(|p| p.primary))
        };
        if link != "connected" {
            return Err(NodeError::Refused(format!(
                "verify needs a connected, up-to-date peer; the link is {link}"
            )));
        }
        let on_peer = match self.role() {
            Role::Primary => false,
            Role::Secondary if !for_peer && peer_primary => true,
            Role::Secondary => {
                return Err(NodeError::Refused(
                    "verify runs on a connected pair with a primary (the node whose stream \
                     carries the hash requests); neither node is primary"
                        .into(),
                ))
            }
        };
        let mut v = self.verify.lock().unwrap_or_else(|p| p.into_inner());
        if v.active() {
            return Err(NodeError::Refused(format!(
                "verify run {} is already {}",
                v.run, v.state
            )));
        }
        let run = v.run + 1;
        *v = VerifyState {
            run,
            state: "pending",
            total: self.device.size(),
            started: Some(std::time::Instant::now()),
            on_peer,
            for_peer,
            ..Default::default()
        };
        drop(v);
        crate::bell::ring();
        self.verify_kick.notify_one();
        Ok(if on_peer {
            format!(
                "verify run {run} asked of the primary {} ({} bytes); differences are marked out of sync there",
                peer.name,
                self.device.size()
            )
        } else {
            format!(
                "verify run {run} started on {} ({} bytes){}",
                self.cfg().me.name,
                self.device.size(),
                if for_peer { ", asked by the peer" } else { "" }
            )
        })
    }

    /// Secondary: the primary reported on the verify this node asked for.
    pub fn verify_reported(&self, r: &proto::peer::VerifyReport) {
        self.update_verify(|v| {
            if !v.on_peer || !v.active() {
                return;
            }
            v.state = match r.state.as_str() {
                "pending" => "pending",
                "running" => "running",
                "done" => "done",
                "interrupted" => "interrupted",
                _ => "failed",
            };
            v.total = r.total;
            v.done = r.done;
            v.differ_regions = r.differ_regions;
            v.differ_bytes = r.differ_bytes;
            if !r.error.is_empty() {
                v.error = Some(r.error.clone());
            }
        });
    }

    /// Primary: what to tell the secondary about the run it asked for, if anything.
    pub fn verify_report(&self) -> Option<proto::peer::VerifyReport> {
        let v = self.verify.lock().unwrap_or_else(|p| p.into_inner());
        v.for_peer.then(|| {
            proto::peer::VerifyReport {
                run: v.run,
                state: v.state.into(),
                total: v.total,
                done: v.done,
                differ_regions: v.differ_regions,
                differ_bytes: v.differ_bytes,
                error: v.error.clone().unwrap_or_default(),
            }
            .bounded()
        })
    }

    /// Updates the verify state (the connection's verifier reports through this).
    pub fn update_verify(&self, f: impl FnOnce(&mut VerifyState)) {
        {
            let mut v = self.verify.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut v);
            if let Some(s) = v.started {
                v.elapsed_ms = s.elapsed().as_millis() as u64;
            }
        }
        crate::bell::ring();
    }

    /// The configured handler for `event`, if any, as a command: arguments
    /// `RESOURCE EVENT PEER`, and the same in `BLOCKREP_RESOURCE`, `BLOCKREP_EVENT`,
    /// `BLOCKREP_PEER`, `BLOCKREP_NODE`, plus `BLOCKREP_PEER_ADDRESS` (where this node dials
    /// the peer, for a handler that reaches its node another way) and, except for fence-peer,
    /// `BLOCKREP_PEER_LEFT_CLEANLY` (`yes`: the peer went down cleanly, a planned stop, so a
    /// `peer-lost` handler need not page anyone).
    fn handler_command(&self, event: &'static str) -> Option<(tokio::process::Command, PathBuf)> {
        let cmd = self.cfg().handlers.get(event).cloned()?;
        let (peer, peer_addr) = self
            .cfg()
            .peer
            .as_ref()
            .map(|p| {
                (
                    p.name.clone(),
                    p.connect_address
                        .or(p.replication)
                        .map(|a| a.to_string())
                        .unwrap_or_default(),
                )
            })
            .unwrap_or_default();
        let mut c = tokio::process::Command::new(&cmd);
        c.arg(&self.cfg().resource)
            .arg(event)
            .arg(&peer)
            .env("BLOCKREP_RESOURCE", &self.cfg().resource)
            .env("BLOCKREP_EVENT", event)
            .env("BLOCKREP_PEER", &peer)
            .env("BLOCKREP_PEER_ADDRESS", &peer_addr)
            .env("BLOCKREP_NODE", &self.cfg().me.name)
            .stdin(std::process::Stdio::null());
        // Not for fence-peer: a fence decides by what it finds, not by what was said.
        if event != "fence-peer" {
            let clean = {
                let l = self.link();
                l.peer_left.is_some() || l.peer_stopped
            };
            c.env(
                "BLOCKREP_PEER_LEFT_CLEANLY",
                if clean { "yes" } else { "no" },
            );
        }
        Some((c, cmd))
    }

    /// With fencing (`resource-only`, `resource-and-stonith`): this primary lost its peer (a
    /// connection it ran as primary), which could now be promoted over the writes that
    /// follow. The `fence-peer` handler outdates it by another path (`blockrep-ctl outdate` on
    /// its node; exit 4, as in DRBD); writes go on meanwhile under resource-only, and wait for
    /// it under resource-and-stonith (see [`Self::after_fence`]). The outcome is logged and
    /// shown in `status` until the link is back. Not when this node's own disk is not up to
    /// date (it failed): the peer then holds the good copy.
    pub fn fence_peer(self: &Arc<Self>) {
        if !self.cfg().fencing.enabled() {
            return;
        }
        if !self.fences_peer() {
            let disk = self
                .with_meta(|m| m.sb.disk)
                .unwrap_or(DiskState::Inconsistent);
            tracing::warn!(
                "fencing {}: the peer was lost, but this node's disk is {} (failed: {}): the peer holds the good copy and is not fenced",
                self.cfg().fencing.name(),
                disk.name(),
                self.device.sync_failed()
            );
            return;
        }
        let attempt = self.connections.load(std::sync::atomic::Ordering::SeqCst);
        // The suspension this run answers for (taken now: a later loss suspends anew, and
        // this run's answer is not about it).
        let suspension = self.rep.as_ref().and_then(|r| r.io_suspension());
        self.link().fence = Some(("fence-peer handler running".into(), None));
        crate::bell::ring();
        let res = self.clone();
        tokio::spawn(async move {
            let outcome = res.run_fence_peer().await;
            res.after_fence(&outcome, suspension);
            {
                let mut l = res.link();
                // Only for the loss it was run for: a link back since then knows better.
                if !established(l.state)
                    && res.connections.load(std::sync::atomic::Ordering::SeqCst) == attempt
                {
                    l.fence = Some((outcome.describe(), outcome.peer_disk()));
                }
            }
            crate::bell::ring();
        });
    }

    /// Whether a lost peer is fenced (the handler runs, and under resource-and-stonith writes
    /// wait for it): fencing on and this node's disk the good copy (up to date, no failed
    /// sync; otherwise the peer holds the good copy).
    fn fences_peer(&self) -> bool {
        self.cfg().fencing.enabled()
            && !self.device.sync_failed()
            && matches!(self.with_meta(|m| m.sb.disk), Ok(DiskState::UpToDate))
    }

    /// Writes suspended at the loss of the peer go on once it is fenced; otherwise they stay
    /// suspended until the link is back or the admin runs `resume-io` (DRBD keeps I/O frozen
    /// after a failed fence-peer as well).
    fn after_fence(&self, outcome: &state::FenceOutcome, suspension: Option<u64>) {
        let (Some(rep), Some(suspension)) = (&self.rep, suspension) else {
            return;
        };
        if rep.io_suspension() != Some(suspension) {
            // Lifted meanwhile (the link came back, `resume-io`), or a later loss suspended
            // writes again: its own fence run answers for that one.
            return;
        }
        if outcome.fenced() {
            if rep.resume_io_of(suspension) {
                tracing::info!(
                    "writes resumed: the peer is fenced ({})",
                    outcome.describe()
                );
            }
        } else {
            tracing::error!(
                "writes stay suspended: the peer could not be fenced ({}); they go on when the link is back, or run `blockrep-ctl resume-io` once the peer is known not to be promoted (after that, writes it lacks are lost if it is)",
                outcome.describe()
            );
        }
    }

    /// Runs the `fence-peer` handler and waits for it (at most [`FENCE_PEER_TIMEOUT`], then
    /// its whole process group is killed); one run at a time. Logs and returns the outcome.
    async fn run_fence_peer(&self) -> state::FenceOutcome {
        let _one = self.fence_lock.lock().await;
        let Some((mut cmd, path)) = self.handler_command("fence-peer") else {
            let o = state::FenceOutcome::Failed("no fence-peer handler is configured".into());
            tracing::warn!(
                "fencing {}: {}: the peer may be promoted with data older than this node's",
                self.cfg().fencing.name(),
                o.describe()
            );
            return o;
        };
        tracing::info!(
            "fencing {}: running fence-peer ({})",
            self.cfg().fencing.name(),
            path.display()
        );
        // Its own process group, so that a timeout kills what it started (ssh) too.
        cmd.process_group(0).kill_on_drop(true);
        let mut timed_out = false;
        /// Kills the handler's whole process group (ssh and what it started, not only the
        /// shell) if its wait ends early: a timeout, or the daemon going down.
        struct KillGroup(Option<u32>);
        impl Drop for KillGroup {
            fn drop(&mut self) {
                if let Some(pid) = self.0 {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let code = match cmd.spawn() {
            Ok(mut child) => {
                let mut group = KillGroup(child.id());
                let r = match tokio::time::timeout(FENCE_PEER_TIMEOUT, child.wait()).await {
                    Ok(Ok(st)) => {
                        // Exited: its group is not ours to kill any more (the id may be reused).
                        group.0 = None;
                        st.code()
                    }
                    Ok(Err(e)) => {
                        tracing::warn!("fence-peer ({}): {e}", path.display());
                        None
                    }
                    Err(_) => {
                        tracing::warn!(
                            "fence-peer ({}) still running after {} s: killed",
                            path.display(),
                            FENCE_PEER_TIMEOUT.as_secs()
                        );
                        timed_out = true;
                        None
                    }
                };
                drop(group);
                let _ = child.kill().await;
                r
            }
            Err(e) => {
                tracing::warn!("fence-peer: cannot run {}: {e}", path.display());
                None
            }
        };
        let outcome = if timed_out {
            state::FenceOutcome::Failed(format!(
                "timed out after {} s, killed",
                FENCE_PEER_TIMEOUT.as_secs()
            ))
        } else {
            state::FenceOutcome::from_exit(code)
        };
        if outcome.fenced() {
            tracing::info!("fence-peer: {}", outcome.describe());
        } else {
            tracing::warn!(
                "fence-peer: {}: the peer may be promoted with data older than this node's",
                outcome.describe()
            );
        }
        outcome
    }

    /// Runs the configured handler for `event`, if any, without waiting for it (see
    /// [`Self::handler_command`]). Its exit status is logged.
    pub fn run_handler(&self, event: &'static str) {
        let Some((mut c, cmd)) = self.handler_command(event) else {
            return;
        };
        match c.spawn() {
            Ok(mut child) => {
                tokio::spawn(async move {
                    match child.wait().await {
                        Ok(st) if st.success() => {
                            tracing::info!("handler {event} ({}) succeeded", cmd.display())
                        }
                        Ok(st) => tracing::warn!("handler {event} ({}) exited {st}", cmd.display()),
                        Err(e) => tracing::warn!("handler {event} ({}): {e}", cmd.display()),
                    }
                });
            }
            Err(e) => tracing::warn!("handler {event}: cannot run {}: {e}", cmd.display()),
        }
    }

    /// A resync as source completed: a crashed primary's extents have reached the peer.
    pub fn sync_source_done(&self) {
        self.crashed_primary
            .store(false, std::sync::atomic::Ordering::SeqCst);
        // The target took this node's disk state (no better than its source): `status` on a
        // secondary source reads the peer's disk from the handshake, which said inconsistent.
        let mine = self.with_meta(|m| m.sb.disk).map_or(0, DiskState::wire);
        if let Some(p) = self.link().peer.as_mut() {
            p.disk = mine;
        }
        // The differences a finished verify marked went with it: `status` says so rather
        // than showing them next to an empty bitmap.
        self.update_verify(|v| {
            if v.state == "done" && v.differ_regions > 0 && !v.on_peer {
                v.resynced = true;
            }
        });
    }

    /// A resync as target completed: the node is whole again.
    /// `verify_resynced`: no verify marks came during the stream, so the differences the
    /// primary's verify reported went with the resync, as on the source (see
    /// `sync_source_done`).
    pub fn sync_target_done(&self, verify_resynced: bool) {
        if verify_resynced {
            self.update_verify(|v| {
                if v.state == "done" && v.differ_regions > 0 && v.on_peer {
                    v.resynced = true;
                }
            });
        }
        self.crashed_primary
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.discard_my_data
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.sync_expected
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    fn link(&self) -> std::sync::MutexGuard<'_, LinkInfo> {
        self.link_info.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The link's state as `status` shows it ("connected", "sync-source", ...).
    pub fn link_state(&self) -> &'static str {
        self.link().state
    }

    pub fn set_link_state(&self, state: &'static str, err: Option<String>) {
        let mut l = self.link();
        let was = l.state;
        l.state = state;
        if err.is_some() {
            l.last_error = err;
        }
        if established(state) {
            l.last_error = None;
            l.fence = None;
            if !established(was) {
                self.connections
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        drop(l);
        crate::bell::ring();
    }

    /// Connections established so far.
    pub fn connections_established(&self) -> u64 {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The link's last error, as `status` shows it.
    pub fn link_error(&self) -> Option<String> {
        self.link().last_error.clone()
    }

    pub fn set_link_error(&self, err: String) {
        self.link().last_error = Some(err);
    }

    pub fn set_peer(&self, peer: Option<NodeState>) {
        if peer.is_some() {
            self.handshakes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.link().peer = peer;
        crate::bell::ring();
    }

    /// The peer asks before it becomes primary (`Msg::PromoteAsk`): granted unless this node
    /// is primary or a promotion of it is being decided. (Read in that order: a promotion
    /// sets the role before it stops deciding, so one of the two reads sees it.)
    /// The refusal says whether this node was deciding a promotion of its own (`busy`): the
    /// peer then asks again after a pause.
    pub fn answer_peer_promotion(&self) -> Result<(), (String, bool)> {
        let me = &self.cfg().me.name;
        let deciding = self.promoting.load(std::sync::atomic::Ordering::SeqCst);
        let primary = self.role() == Role::Primary;
        let answer = if primary {
            Err((format!("{me} is primary"), false))
        } else if deciding {
            Err((
                format!("{me} is being made primary at this same moment"),
                true,
            ))
        } else {
            Ok(())
        };
        match &answer {
            Ok(()) => tracing::info!("the peer asks to become primary: granted"),
            Err((why, _)) => tracing::warn!("the peer asks to become primary: refused, {why}"),
        }
        answer
    }

    /// The peer's answer to this node's `PromoteAsk` numbered `id` (any other is stale).
    pub fn peer_answered_promotion(&self, id: u64, answer: Result<(), (String, bool)>) {
        let waiting = {
            let mut ask = self.promote_ask.lock().unwrap_or_else(|p| p.into_inner());
            if ask.as_ref().is_some_and(|(i, _)| *i == id) {
                ask.take()
            } else {
                None
            }
        };
        if let Some((_, to)) = waiting {
            let _ = to.send(answer);
        }
    }

    /// Asks the connected peer whether this node may become primary (see
    /// `answer_peer_promotion` there). Refused unless it grants within
    /// [`PROMOTE_ASK_TIMEOUT`] on the connection it was asked on.
    async fn ask_peer_to_promote(&self) -> Result<(), NodeError> {
        let id = random_id();
        let (to, answer) = tokio::sync::oneshot::channel();
        *self.promote_ask.lock().unwrap_or_else(|p| p.into_inner()) = Some((id, to));
        struct Forget<'a>(&'a Mutex<Option<(u64, PromoteAnswer)>>);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
        }
        let _forget = Forget(&self.promote_ask);
        let lost = || {
            NodeError::Refused(
                "the link to the peer went down while asking it whether this node may become primary: run `primary` again to decide without it".into(),
            )
        };
        let connection = self.connections_established();
        let tx = self.peer_tx.lock().ok().and_then(|t| t.clone());
        let Some(tx) = tx else {
            return Err(lost());
        };
        let deadline = tokio::time::Instant::now() + PROMOTE_ASK_TIMEOUT;
        // Bounded too: a link whose writer is stuck holds the queue full until it times out.
        match tokio::time::timeout_at(deadline, tx.send(proto::peer::Msg::PromoteAsk { id })).await
        {
            Ok(true) => {}
            Ok(false) => return Err(lost()),
            Err(_) => {
                return Err(NodeError::Refused(format!(
                    "the link to the peer took no message for {} s: run `primary` again",
                    PROMOTE_ASK_TIMEOUT.as_secs()
                )))
            }
        }
        tokio::pin!(answer);
        loop {
            tokio::select! {
                r = &mut answer => {
                    return match r {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err((why, busy))) => {
                            if busy {
                                self.promotion_busy
                                    .store(true, std::sync::atomic::Ordering::SeqCst);
                            }
                            Err(NodeError::Refused(format!(
                                "the peer refused this promotion: {why}"
                            )))
                        }
                        Err(_) => Err(lost()),
                    };
                }
                _ = tokio::time::sleep(Duration::from_millis(50)) => {
                    // An answer on a later connection would not be to this ask.
                    if !established(self.link().state)
                        || self.connections_established() != connection
                    {
                        return Err(lost());
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(NodeError::Refused(format!(
                            "the peer did not answer within {} s whether this node may become primary: run `primary` again",
                            PROMOTE_ASK_TIMEOUT.as_secs()
                        )));
                    }
                }
            }
        }
    }

    /// The peer was heard from (a Hello naming it, authenticated or not, which comes before
    /// anything else it sends): it is up again, so whatever it said when it left is history.
    /// The metadata's record of it is cleared before the handshake goes on (an error here
    /// ends the handshake): a peer that connects may be promoted afterwards, and a record
    /// that outlived that would let a restart of this node promote it too.
    pub async fn peer_heard(&self) -> Result<(), NodeError> {
        self.peer_heard_count
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        {
            let mut l = self.link();
            l.peer_left = None;
            l.peer_stopped = false;
        }
        crate::bell::ring();
        // Decided in the metadata's write order, not from the store as last installed: a
        // leave being committed right now is seen, and cleared after it.
        self.update_meta_if_changed(|sb| {
            sb.peer_left = false;
            Ok(())
        })
        .await
    }

    /// This node is about to tell its peer it goes down cleanly (see
    /// `Superblock::handed_over`): recorded first, so that no crash leaves the peer told and
    /// this node unaware. `false`: it could not be recorded, and the peer is not told.
    async fn record_handed_over(&self) -> bool {
        match self
            .update_meta(|sb| {
                sb.handed_over = true;
                Ok(())
            })
            .await
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    "recording the hand-over in the metadata: {e}: the peer is not told"
                );
                false
            }
        }
    }

    /// An authenticated peer exchanged states with this node (`peer`): if it is a secondary
    /// with no newer data, it was not promoted after this node handed over, and the record
    /// goes. Otherwise it stays until this node, the resync's target, has the peer's data
    /// (the SyncDone commit clears it): a connection that drops before would leave this node
    /// up to date at the old generation, and a fence answering "unreachable" must not
    /// promote it over the peer's writes.
    pub async fn peer_met_again(&self, peer: &NodeState) -> Result<(), NodeError> {
        let peer_gen = crate::peer::gens(&peer.gen);
        let peer_unacked = peer.gen.sync_done_unacked;
        let peer_primary = peer.primary;
        self.update_meta_if_changed(move |sb| {
            if !peer_primary
                && !state::peer_is_ahead(&sb.gen, sb.sync_done_unacked(), &peer_gen, peer_unacked)
            {
                sb.handed_over = false;
            }
            Ok(())
        })
        .await
    }

    /// The primary went down cleanly, and this node holds its every write through `issued`
    /// durably (see `Msg::Leaving`): recorded, in the metadata too, so that a restart of this
    /// node before its promotion still knows. Not recorded if the peer was heard from since
    /// the leave was decided (`heard`: [`Self::peer_heard_count`] then), in memory or on disk.
    pub async fn peer_left_cleanly(&self, issued: u64, heard: u64) {
        let count = self.peer_heard_count.clone();
        let committed = self
            .update_meta(move |sb| {
                // Under the metadata's write order: a clear that ran first has counted.
                if count.load(std::sync::atomic::Ordering::SeqCst) == heard {
                    sb.peer_left = true;
                }
                Ok(())
            })
            .await;
        if let Err(e) = committed {
            // Not kept in memory either: a promotion checks the metadata's record.
            tracing::warn!(
                "recording the peer's clean leave in the metadata: {e}: promoting this node needs --force"
            );
            return;
        }
        {
            let mut l = self.link();
            if self.peer_heard_count() == heard {
                l.peer_left = Some(issued);
            }
        }
        crate::bell::ring();
    }

    /// The secondary of this primary went down cleanly (see `LinkInfo::peer_stopped`).
    pub fn secondary_stopped(&self) {
        tracing::info!(
            "the secondary went down cleanly (a planned stop): it catches up when it comes back"
        );
        self.link().peer_stopped = true;
        crate::bell::ring();
    }

    /// How many times the peer was heard from (see [`Self::peer_heard`]).
    pub fn peer_heard_count(&self) -> u64 {
        self.peer_heard_count
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// This node, going down, told its peer so (see [`Self::tell_peer_leaving`] and
    /// [`Self::tell_secondary_peer_leaving`]).
    pub fn is_leaving(&self) -> bool {
        self.leaving.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A primary's `down`, once the peer made every write durable: tells the peer this node
    /// goes down cleanly, so that it may be promoted without `--force` (it closes the link
    /// once it has taken this in). From here on the link starts no new connection, which
    /// would show this node to the peer as primary again.
    ///
    /// Returns what the admin should know of the peer after this `down`.
    async fn tell_peer_leaving(&self) -> &'static str {
        const NOT_TOLD: &str =
            "; the peer was not told this node goes down cleanly: promoting it needs --force";
        let Some(rep) = &self.rep else {
            return "";
        };
        let issued = rep.lock().issued;
        let a = rep.acks();
        // Only a connection run as primary, with the peer durable through every write and
        // nothing else it lacks (bitmap regions: an overflow, a resync not finished, verify
        // marks): otherwise the down starts a new generation and a promotion of the peer is
        // a split brain to report, not a clean hand-over.
        if !a.connected {
            return "; the peer is not connected: promoting it needs --force (it may lack what this node wrote since the link was lost)";
        }
        let handed_over = a.durable >= issued && rep.link_ran_as_primary();
        if !handed_over || self.device.sync_failed() || self.leaves_divergence(rep) {
            return "; the peer lacks writes of this node (or regions a resync or verify marked): promoting it needs --force, and a connect with this node afterwards is a split brain";
        }
        let Some(tx) = self.peer_tx.lock().ok().and_then(|t| t.clone()) else {
            return NOT_TOLD;
        };
        if !self.record_handed_over().await {
            return NOT_TOLD;
        }
        self.leaving
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // Bounded: a peer that still pings but takes nothing holds the sender.
        let sent = tokio::time::timeout(
            PEER_GOODBYE_WAIT,
            tx.send(proto::peer::Msg::Leaving {
                issued,
                gen: self.node_state().gen.current,
            }),
        )
        .await;
        if !matches!(sent, Ok(true)) {
            tracing::warn!(
                "could not tell the peer that this node goes down: it will see a lost primary"
            );
            return NOT_TOLD_RECORDED;
        }
        let mut rx = rep.subscribe_acks();
        let _ = tokio::time::timeout(PEER_GOODBYE_WAIT, rx.wait_for(|a| !a.connected)).await;
        if rep.acks().connected {
            tracing::warn!(
                "the peer did not take in that this node goes down: it will see a lost primary"
            );
            NOT_TOLD_RECORDED
        } else {
            tracing::info!("the peer knows this node goes down cleanly, with every write");
            "; the peer holds every write and knows this node went down cleanly: a plain `primary` there promotes it"
        }
    }

    /// A secondary going down while its primary goes on: everything it applied is made
    /// durable and acknowledged first (bounded), so that the primary does not count the tail
    /// of its stream as lacking and resend it at the next connect.
    /// `tell`: and then tells it the stop is planned (not when outdating itself failed under
    /// fencing: the primary must not take the stop for one that left it nothing to fear).
    async fn final_ack_to_primary(&self, tell: bool) {
        let to_primary = {
            let l = self.link();
            established(l.state) && l.peer.as_ref().is_some_and(|p| p.primary)
        };
        if !to_primary || self.role() != Role::Secondary {
            return;
        }
        let done = self.final_acked.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        self.final_ack.notify_one();
        match tokio::time::timeout(PEER_GOODBYE_WAIT, done).await {
            Ok(()) => {
                tracing::info!("everything applied here is durable and acknowledged to the primary")
            }
            Err(_) => {
                tracing::warn!(
                    "the primary was not sent a last acknowledgement: it resends what it cannot count as durable here at the next connect"
                );
                return;
            }
        }
        // And that this is a planned stop, not a fault (its `peer-lost` handler is told so).
        if !tell {
            return;
        }
        let Some(tx) = self.peer_tx.lock().ok().and_then(|t| t.clone()) else {
            return;
        };
        // No new connection from here (the primary closes this one): a redial or an accepted
        // one would start a stream (a resync declaring this outdated disk up to date, say)
        // in the moments before `down` stops the link.
        self.leaving
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let gen = self.node_state().gen.current;
        let _ = tokio::time::timeout(
            PEER_GOODBYE_WAIT,
            tx.send(proto::peer::Msg::Leaving { issued: 0, gen }),
        )
        .await;
        let deadline = tokio::time::Instant::now() + PEER_GOODBYE_WAIT;
        while established(self.link().state) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A secondary's `down` (DRBD's habit: `secondary`, then `down`): when connected to an
    /// idle secondary peer with the same data (one generation, both up to date, nothing out of
    /// sync either way), tells it this node goes down cleanly, so that it may be promoted
    /// without `--force`. Returns what the admin should know of the peer.
    async fn tell_secondary_peer_leaving(&self) -> &'static str {
        // Not while a promotion of this node is under way (it holds this from its checks to
        // its commit): a node that is primary by the time it sends would hand over nothing.
        let _no_promotion = self.skip_ops.lock().await;
        if self.rep.is_none() || self.role() != Role::Secondary {
            return "";
        }
        let (state, peer) = {
            let l = self.link();
            (l.state, l.peer.clone())
        };
        let Some(peer) = peer.filter(|_| established(state)) else {
            return "";
        };
        if peer.primary {
            // Its primary goes on: nothing to hand over.
            return "";
        }
        let me = self.node_state();
        let lacking = self
            .rep
            .as_ref()
            .is_some_and(|r| r.lock().bitmap.dirty_bits() > 0);
        // What the peer said at the handshake may be older than a resync since (its
        // generation, its bitmap): the receiver checks those against its own and refuses the
        // leave otherwise; here, this node's own side and a link that is not resyncing.
        let same = state == "connected"
            && me.disk == 2
            && peer.disk == 2
            && !lacking
            && !self.device.sync_failed();
        if !same {
            return "; the peer does not hold the same data as this node (a resync, or data only one of them has): promoting it needs --force";
        }
        let Some(tx) = self.peer_tx.lock().ok().and_then(|t| t.clone()) else {
            return "";
        };
        if !self.record_handed_over().await {
            return "; the peer was not told this node goes down cleanly: promoting it needs --force";
        }
        self.leaving
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let sent = tokio::time::timeout(
            PEER_GOODBYE_WAIT,
            tx.send(proto::peer::Msg::Leaving {
                issued: 0,
                gen: me.gen.current,
            }),
        )
        .await;
        if !matches!(sent, Ok(true)) {
            return NOT_TOLD_RECORDED;
        }
        // It closes the connection once it has taken it in.
        let deadline = tokio::time::Instant::now() + PEER_GOODBYE_WAIT;
        while established(self.link().state) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if established(self.link().state) {
            return NOT_TOLD_RECORDED;
        }
        tracing::info!("the peer knows this node goes down cleanly, with the same data");
        "; the peer holds the same data and knows this node went down cleanly: a plain `primary` there promotes it"
    }

    /// Promoted without a connected peer, and no connection since (see `promoted_epoch`).
    fn no_link_since_promotion(&self, acks: &crate::replication::Acks) -> bool {
        !acks.connected
            && acks.epoch
                == self
                    .promoted_epoch
                    .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// See the field.
    fn handshakes(&self) -> u64 {
        self.handshakes.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The connection ended: writes stop waiting for the peer and go to the bitmap. A primary
    /// that loses its peer starts a new data generation, so the two can tell later who moved on.
    /// Whether a primary giving up its role (demotion, `down`) leaves records its peer
    /// lacks under a generation the peer has. Connected: regions not yet resynced, or
    /// records the peer has not made durable after the drain. Disconnected: the loss of the
    /// peer (or the first record after it) already started a generation where the two
    /// diverged; only one not persisted yet remains.
    fn leaves_divergence(&self, rep: &Replication) -> bool {
        // A disk that lost writes takes a full resync from the peer, whatever: a new
        // generation here would only turn that into a split brain.
        if self.cfg().peer.is_none() || self.role() != Role::Primary || self.device.sync_failed() {
            return false;
        }
        if rep.link_ran_as_primary() {
            let durable = rep.acks().durable;
            rep.lock().bitmap.dirty_bits() > 0 || rep.issued_after(durable).is_some()
        } else {
            rep.divergence_pending()
        }
    }

    pub async fn link_down(&self) {
        // Armed before the waiting writes are released: one the peer did not have is then
        // acknowledged under a new generation (see `Replication::wait_peer`). Only for a
        // connection this node ran as primary (also one that ended between `set_connected`
        // and being reported established): a new primary ending its old secondary
        // connection starts nothing.
        let mut diverged = false;
        if let Some(r) = &self.rep {
            if r.link_ran_as_primary() && self.role() == Role::Primary && !self.device.sync_failed()
            {
                // Under resource-and-stonith, before any waiting write is released (below):
                // none is acknowledged without the peer until `fence_peer` has fenced it. Not
                // for a secondary that went down cleanly: under fencing it outdated itself
                // before it said so (a planned stop of the secondary does not hold writes).
                let stopped_cleanly = self.link().peer_stopped;
                if self.fences_peer() && self.cfg().fencing.freezes_io() && !stopped_cleanly {
                    r.suspend_io();
                    tracing::warn!(
                        "the peer was lost: writes (and reads) are suspended until the fence-peer handler fences it or the link is back (fencing resource-and-stonith)"
                    );
                }
                diverged = r.peer_lost();
            }
            r.on_disconnect();
            r.set_connected(false, 0, 0);
        }
        {
            let mut l = self.link();
            if established(l.state) {
                l.state = "connecting";
                l.lost_at = Some(std::time::Instant::now());
            }
        }
        crate::bell::ring();
        // Writes the peer has not applied (acknowledged under A, or in flight): the data
        // diverges now, not at the next write, which may never come before a crash and a
        // failover that would then overwrite them silently.
        if diverged {
            if let Some(r) = &self.rep {
                if let Err(e) = r.diverge_generation().await {
                    tracing::warn!("the next write starts the new generation instead ({e})");
                }
            }
        }
    }

    /// Changes the link's control for a reconnect (`connect`, a role change, `invalidate`):
    /// from here a plain `primary` waits for the link again (see `LinkInfo::lost_at`).
    fn redial(&self, f: impl FnOnce(&mut LinkCtl)) {
        self.link_ctl.send_modify(f);
        self.link().lost_at = None;
    }

    fn peer_view(&self) -> PeerView {
        if self.cfg().peer.is_none() {
            return PeerView::None;
        }
        let l = self.link();
        match (&l.peer, established(l.state)) {
            (Some(p), true) => PeerView::Connected(if p.primary {
                Role::Primary
            } else {
                Role::Secondary
            }),
            _ if l.peer_left.is_some() => PeerView::LeftCleanly,
            _ => PeerView::Unknown,
        }
    }

    /// Reconnects the link so the peer learns this node's new role, and waits (bounded) for
    /// the new handshake, so that when a role command returns the peer knows.
    async fn announce_role(&self) {
        let was_connected = established(self.link().state);
        let before = self.connections.load(std::sync::atomic::Ordering::SeqCst);
        self.redial(|c| c.bump += 1);
        if !was_connected {
            return;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            if self.connections.load(std::sync::atomic::Ordering::SeqCst) > before
                && established(self.link().state)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!("peer did not reconnect within 5 s after the role change");
    }

    /// A `connect --discard-my-data` that does not apply (no split brain), or that a
    /// promotion overrides: not kept for a later connect.
    pub fn clear_discard_my_data(&self) {
        self.discard_my_data
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// `connect --discard-my-data`: this node will become the sync target of its peer.
    pub fn set_discard_my_data(&self) {
        self.discard_my_data
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.redial(|c| {
            c.standalone = false;
            c.bump += 1;
        });
    }

    /// `connect` / `disconnect`. A disconnect returns once the link is down, so that what the
    /// admin does next (a forced promotion, say) sees it down on both sides.
    /// Either is a no-op when the link is already so (DRBD's habit: `connect` on a connected
    /// resource must not cut the link under writes).
    pub async fn set_standalone(&self, standalone: bool) -> Result<String, NodeError> {
        // A primary lets the peer make its writes durable first (bounded), as DRBD's graceful
        // disconnect does: the pair parts at one point of the stream that both hold.
        if standalone && self.role() == Role::Primary && !self.link_ctl.borrow().standalone {
            if let Some(rep) = &self.rep {
                if rep.acks().connected && !rep.settle_peer(Duration::from_secs(5)).await {
                    tracing::warn!(
                        "disconnect: the peer did not confirm every write durable within 5 s; it may lack the last ones (the bitmap records them)"
                    );
                }
            }
        }
        if standalone && !self.link_ctl.borrow().standalone {
            // DRBD refuses such a disconnect too: cut off and still up to date is what
            // fencing exists to prevent.
            if let Err(e) = self.outdate_before_leaving().await {
                // The stream goes on: its resync ends count again.
                self.leaving_outdated
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                return Err(NodeError::Refused(format!("disconnect refused: {e}")));
            }
        }
        // A `connect --discard-my-data` is a request for the connections to come: `disconnect`
        // withdraws it (as a new `drbdadm connect` without the option does in DRBD).
        if standalone
            && self
                .discard_my_data
                .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            tracing::info!(
                "the pending `connect --discard-my-data` is withdrawn by the disconnect"
            );
        }
        let changed = self.link_ctl.send_if_modified(|c| {
            let changed = c.standalone != standalone;
            c.standalone = standalone;
            changed
        });
        if !standalone {
            // A reconnect asked for: `primary` waits for it again (see `LinkInfo::lost_at`).
            self.link().lost_at = None;
            return Ok(if changed {
                format!("{} connecting to its peer", self.cfg().me.name)
            } else {
                format!(
                    "{} is already connecting or connected (link {})",
                    self.cfg().me.name,
                    self.link().state
                )
            });
        }
        // Also when asked again: an earlier `disconnect` may have returned before the link
        // was down (its wait is bounded), and the admin's next step counts on it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.link().state != "standalone" && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let outdated = self
            .leaving_outdated
            .load(std::sync::atomic::Ordering::SeqCst)
            && self
                .with_meta(|m| m.sb.disk == DiskState::Outdated)
                .unwrap_or(false);
        Ok(if changed {
            format!(
                "{} disconnected from its peer (standalone){}",
                self.cfg().me.name,
                if outdated {
                    "; fencing: its disk is now outdated (the primary writes on without it)"
                } else {
                    ""
                }
            )
        } else {
            format!(
                "{} is already disconnected (link {})",
                self.cfg().me.name,
                self.link().state
            )
        })
    }

    fn replication_status(&self) -> Option<PeerStatus> {
        let rep = self.rep.as_ref()?;
        let cfg = self.cfg();
        let peer = cfg.peer.as_ref()?;
        let acks = rep.acks();
        let (issued, used, size, mut lag_w, mut lag_b, oos, overflowed) = rep.numbers();
        if self.role() != Role::Primary {
            // The lag is the primary's stream to its peer; on a secondary the journal holds
            // at most an earlier term's records, which nobody is waiting for.
            (lag_w, lag_b) = (0, 0);
        }
        let l = self.link();
        let connected = established(l.state);
        let (peer_role, peer_disk) = match (&l.peer, connected) {
            (Some(p), true) => (
                if p.primary { "primary" } else { "secondary" },
                // A resync target holds a mix of old and new regions until its end (DRBD's
                // SyncSource shows the peer Inconsistent), whatever its disk was before.
                if l.state == "sync-source" {
                    "inconsistent"
                } else if self.role() == Role::Primary {
                    // The writes in flight on a healthy link are not a state worth a
                    // monitor's alarm (under C every write is briefly one): behind is a lag
                    // past what the peer applies at once, or a journal that overflowed.
                    if lag_w <= BEHIND_AFTER_WRITES && !overflowed {
                        "up-to-date"
                    } else {
                        "behind"
                    }
                } else {
                    match p.disk {
                        2 => "up-to-date",
                        1 => "outdated",
                        _ => "inconsistent",
                    }
                },
            ),
            // After a lost link, what the fence-peer handler made of the peer's disk.
            _ => (
                "unknown",
                l.fence.as_ref().and_then(|f| f.1).unwrap_or("unknown"),
            ),
        };
        let (resync_total, resync_done, resync_rate) =
            match self.resync.lock().ok().and_then(|p| *p) {
                Some(p) => (p.total, p.done, p.rate()),
                None => (0, 0, 0),
            };
        let resync_reason = (resync_total > 0)
            .then(|| {
                self.resync_why
                    .lock()
                    .map(|w| w.clone())
                    .unwrap_or_default()
            })
            .filter(|w| !w.is_empty());
        // A resync target lacks what the source has left. Its own bitmap went to the source
        // at the handshake, which resyncs those regions too (a split brain's victim's
        // changes, say), and is cleared only at the end: counted, it would still show them
        // out of sync with the resync done.
        let oos = if l.state == "sync-target" {
            if resync_total > 0 {
                resync_total.saturating_sub(resync_done)
            } else {
                oos
            }
        } else if self
            .with_meta(|m| m.sb.disk == DiskState::Inconsistent)
            .unwrap_or(false)
        {
            oos.max(self.resync_left.load(std::sync::atomic::Ordering::Relaxed))
        } else {
            oos
        };
        // A primary (or a resync source) shows its stream and the peer's marks; a secondary
        // its own: what it
        // received, applied and made durable (its journal's issued mark is an earlier
        // term's, and the acks are what it last told a peer).
        let streaming = self.role() == Role::Primary || l.state == "sync-source";
        let (written, received, applied, synced, durable) = if streaming {
            if self.no_link_since_promotion(&acks) {
                // The peer's marks are an earlier period's (this node was secondary, or
                // primary before): not this primary's stream.
                (issued, 0, 0, 0, 0)
            } else {
                (
                    issued,
                    acks.received,
                    acks.applied,
                    acks.synced,
                    acks.durable,
                )
            }
        } else {
            let st = self.node_state();
            let received = rep
                .stats
                .seq_received
                .load(std::sync::atomic::Ordering::Relaxed)
                .max(st.applied_seq);
            // (Its synced mark is the link's; what its superblock holds is durable.)
            (
                received,
                received,
                st.applied_seq,
                st.durable_seq,
                st.durable_seq,
            )
        };
        Some(PeerStatus {
            peer: peer.name.clone(),
            connection: l.state.into(),
            peer_role: peer_role.into(),
            peer_disk: peer_disk.into(),
            protocol: rep.protocol().to_string(),
            // A connection's own (an `adjust` applies a new value from the next one).
            encryption: {
                let sealed = if matches!(l.state, "connecting" | "standalone" | "split-brain") {
                    cfg.encryption
                } else {
                    self.link_sealed.load(std::sync::atomic::Ordering::Relaxed)
                };
                if sealed { "aes-256-gcm" } else { "none" }.into()
            },
            seq_written: written,
            // A secondary sends no stream: what it sent as an earlier primary is stale.
            seq_sent: if streaming && self.no_link_since_promotion(&acks) {
                0
            } else if streaming {
                rep.stats
                    .seq_sent
                    .load(std::sync::atomic::Ordering::Relaxed)
            } else {
                written
            },
            seq_received: received,
            seq_applied: applied,
            seq_synced: synced,
            seq_durable: durable,
            peer_disk_holds: {
                let st = self.node_state();
                if st.peer_durable_gen == st.gen.current {
                    st.peer_durable_seq
                } else {
                    0
                }
            },
            lag_writes: lag_w,
            lag_bytes: lag_b,
            bytes_sent: rep
                .stats
                .bytes_sent
                .load(std::sync::atomic::Ordering::Relaxed),
            bytes_received: rep
                .stats
                .bytes_received
                .load(std::sync::atomic::Ordering::Relaxed),
            crc_errors: rep
                .stats
                .crc_errors
                .load(std::sync::atomic::Ordering::Relaxed),
            auth_failures: rep
                .stats
                .auth_failures
                .load(std::sync::atomic::Ordering::Relaxed),
            journal_used: used,
            journal_size: size,
            out_of_sync: oos,
            resync_total,
            resync_done,
            resync_rate,
            // Rounded up: "0 s left" only when nothing is.
            resync_eta_s: if resync_rate > 0 {
                oos.div_ceil(resync_rate)
            } else {
                0
            },
            resync_reason,
            resync_paused: *self.sync_paused.borrow(),
            // (`l`, the link's lock, is held here.)
            resync_paused_by_peer: l.state == "sync-target"
                && self
                    .sync_paused_by_peer
                    .load(std::sync::atomic::Ordering::Relaxed),
            // Redials to a peer that is down must not hide what it said when it left.
            last_error: match (l.peer_left, l.peer_stopped) {
                _ if established(l.state) => l.last_error.clone(),
                (Some(_), _) if self.role() == Role::Secondary => Some(
                    "the peer went down cleanly, leaving this node every write (a plain `primary` promotes this node)"
                        .into(),
                ),
                (Some(_), _) | (None, true) => Some(
                    "the peer went down cleanly (a planned stop): it catches up when it comes back"
                        .into(),
                ),
                _ => l.last_error.clone(),
            },
            peer_left: l.peer_left.is_some() && !established(l.state),
            peer_stopped: l.peer_stopped && !established(l.state),
            fence: if connected {
                None
            } else {
                l.fence.as_ref().map(|f| f.0.clone())
            },
            verify: {
                let v = self.verify.lock().unwrap_or_else(|p| p.into_inner());
                (v.run > 0).then(|| proto::control::VerifyStatus {
                    run: v.run,
                    state: v.state.into(),
                    total: v.total,
                    done: v.done,
                    differ_regions: v.differ_regions,
                    differ_bytes: v.differ_bytes,
                    elapsed_ms: match (v.active(), v.started) {
                        (true, Some(s)) => s.elapsed().as_millis() as u64,
                        _ => v.elapsed_ms,
                    },
                    error: v.error.clone(),
                    resynced: v.resynced,
                    source: Some(if v.on_peer {
                        self.cfg()
                            .peer
                            .as_ref()
                            .map(|p| p.name.clone())
                            .unwrap_or_default()
                    } else {
                        self.cfg().me.name.clone()
                    }),
                })
            },
        })
    }

    pub fn role(&self) -> Role {
        self.role.lock().map(|r| *r).unwrap_or(Role::Secondary)
    }

    /// `Superblock::sync_done_sent` as committed.
    pub fn sync_done_sent(&self) -> (u64, u64) {
        self.meta
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sb
            .sync_done_sent
    }

    fn with_meta<T>(&self, f: impl FnOnce(&mut MetaStore) -> T) -> Result<T, NodeError> {
        let mut m = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        Ok(f(&mut m))
    }

    pub fn status(&self, pid: u32) -> Status {
        let (disk, _) = self
            .with_meta(|m| (m.sb.disk.name().to_string(), m.sb.gen))
            .unwrap_or_else(|_| ("unknown".into(), Default::default()));
        Status {
            resource: self.cfg().resource.clone(),
            node: self.cfg().me.name.clone(),
            pid,
            up: true,
            role: self.role().name().into(),
            disk,
            disk_failed: self.device.sync_failed(),
            suspended: self
                .rep
                .as_ref()
                .filter(|r| r.io_suspended())
                .map(|_| "fencing".to_string()),
            warnings: self.up_warnings(),
            export: self.cfg().me.export.to_string(),
            size: self.device.size(),
            engine: self.device.engine_name().into(),
            kernel_device: self
                .cfg()
                .me
                .kernel_device
                .as_ref()
                .map(|p| p.display().to_string()),
            kernel_note: self.kernel_note.lock().ok().and_then(|n| n.clone()),
            clients: self.export.clients(),
            io: self.device.io_counters(),
            replication: self.replication_status(),
        }
    }

    /// `primary [--force]`. A promotion the peer refused because it was deciding its own
    /// (each asked the other at once) is tried again after a random pause, so that one of
    /// the two wins, as after DRBD's concurrent state changes.
    pub async fn primary(self: &Arc<Self>, force: bool) -> Result<String, NodeError> {
        let mut tries = 0;
        loop {
            self.promotion_busy
                .store(false, std::sync::atomic::Ordering::SeqCst);
            match self.primary_once(force).await {
                Err(e)
                    if self
                        .promotion_busy
                        .load(std::sync::atomic::Ordering::SeqCst) =>
                {
                    if tries >= PROMOTE_TIE_RETRIES {
                        return Err(e);
                    }
                    tries += 1;
                    let pause = random_id() % PROMOTE_TIE_PAUSE_MS + 1;
                    tracing::info!(
                        "the peer was being promoted at the same moment: trying again in {pause} ms ({e})"
                    );
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                r => return r,
            }
        }
    }

    async fn primary_once(self: &Arc<Self>, force: bool) -> Result<String, NodeError> {
        // Not while the initial sync is being skipped (see `skip_ops`).
        let _skip = self.skip_ops.lock().await;
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(going_down());
        }
        // From here until this returns (promoted or refused), the peer's own promotion is
        // refused: see `answer_peer_promotion`.
        struct Deciding<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Deciding<'_> {
            fn drop(&mut self) {
                self.0.store(false, std::sync::atomic::Ordering::SeqCst);
            }
        }
        self.promoting
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _deciding = Deciding(&self.promoting);
        if self.role() == Role::Primary {
            return Ok(format!("{} is already primary", self.cfg().me.name));
        }
        // A role change on either side reconnects the link; give a reconnecting peer a moment
        // rather than calling it unknown: one whose link was lost just now (a role change
        // reconnects within milliseconds), or that has not connected since this node
        // started. A peer lost for longer is unknown at once (a failover's plain `primary`
        // used to wait 5 s before its refusal).
        let mut peer = self.peer_view();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let reconnecting = || {
            // (A `connect` just asked for shows standalone until the link task takes it up.)
            let dialing = !self.link_ctl.borrow().standalone;
            let l = self.link();
            (l.state == "connecting" || l.state == "standalone" && dialing)
                && l.lost_at
                    .is_none_or(|t| t.elapsed() < ROLE_CHANGE_RECONNECT)
        };
        // A peer that just died still looks primary until its link times out: give that a
        // moment too before refusing.
        while (peer == PeerView::Unknown && !force && reconnecting()
            || peer == PeerView::Connected(Role::Primary))
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
            peer = self.peer_view();
        }
        // A split brain is not a peer whose state is unknown: said as what it is, with the
        // way to settle it (from a trial: "use --force" steered the admin deeper into it).
        if !force && peer == PeerView::Unknown && self.link_state() == "split-brain" {
            return Err(NodeError::Refused(
                "split brain: this node and the peer both changed the data since they parted (see `status`). Settle it first: `blockrep-ctl connect --discard-my-data` on the node whose changes are to be dropped (a secondary), then `primary` on the other; --force promotes this node anyway and leaves the split brain to settle later".into(),
            ));
        }
        // Handshakes seen with this view (no await between): any later one makes it stale.
        let view_handshakes = self.handshakes();
        // A stream from the old primary may still be finishing writes: they land (and count
        // as applied) before this node decides anything. If they could not be made durable,
        // this node's data is not good: only --force promotes it.
        if !self.settle_applies().await && !force {
            return Err(NodeError::Refused(
                "the writes last received from the peer could not be made durable here: this node's disk is inconsistent (use --force to promote it anyway)".into(),
            ));
        }
        // A connected peer that cannot hold this node's export would be refused right after
        // the promotion (its writes then only in the bitmap): said now, with the numbers, as
        // a structural mismatch that --force does not change (disconnect first to run alone).
        if let (PeerView::Connected(_), Some(p)) = (peer, self.link().peer.as_ref()) {
            let mine = self.device().size();
            if p.size < mine {
                return Err(NodeError::Refused(format!(
                    "the peer's device holds {} bytes, this node exports {mine}: it cannot take this node's writes (promote the peer instead, or `disconnect` first to run without it)",
                    p.size
                )));
            }
        }
        let new_id = random_id();
        let peer_gen = match peer {
            PeerView::Connected(_) => self
                .link()
                .peer
                .as_ref()
                .map(|p| (crate::peer::gens(&p.gen), p.gen.sync_done_unacked)),
            _ => None,
        };
        let gen_before = self.node_state().gen.current;
        // A stream from the peer (a resync between secondaries, say) stops writing this disk
        // before the promotion is committed: its records are refused from here on, and those
        // already applying (a SyncDone's commit among them) finish first, so none lands over
        // a client's write or over the promotion's generation.
        // (A primary peer's stream goes on: the promotion is refused below.) What would refuse
        // the promotion is checked first, so that a refused one does not cut the stream.
        // With resource-level fencing a disconnected node is promoted without --force once
        // the peer is fenced (DRBD's fenced failover): checked as if it were, then fenced.
        let fencing = self.cfg().fencing.enabled();
        let mut fence_note = String::new();
        // Handshakes seen when the peer's view was decided (the fence's answer, or a clean
        // leave): any since makes it stale, checked again under the commit.
        let mut decided_at: Option<u64> = None;
        if !force {
            let (disk, gen, handed_over, unacked) = {
                let m = self.meta.lock().unwrap_or_else(|p| p.into_inner());
                (
                    m.sb.disk,
                    m.sb.gen,
                    m.sb.handed_over,
                    m.sb.sync_done_unacked(),
                )
            };
            if let Some((pg, _)) =
                peer_gen.filter(|(pg, pu)| state::peer_is_ahead(&gen, unacked, pg, *pu))
            {
                return Err(peer_ahead(&pg, &gen, disk));
            }
            // (An inconsistent target is refused below, saying so.)
            if peer_gen.is_some()
                && disk == DiskState::UpToDate
                && self.sync_expected.load(std::sync::atomic::Ordering::SeqCst)
            {
                return Err(resync_expected());
            }
            // This node went down cleanly, telling the peer it could take over: no fence's
            // answer ("unreachable") says whether it did.
            if handed_over && !matches!(peer, PeerView::Connected(_)) {
                let p = self
                    .cfg()
                    .peer
                    .as_ref()
                    .map(|p| p.name.clone())
                    .unwrap_or_default();
                return Err(NodeError::Refused(format!(
                    "this node went down cleanly before and told {p} it held every write, so {p} may have been promoted since; bring {p} up and let the two connect (this node then catches up), or --force if you know {p} was not promoted"
                )));
            }
            // A peer that went down cleanly, handing over every write, needs no fence: it
            // can only come back as a secondary.
            let view = if fencing && peer == PeerView::Unknown {
                PeerView::Fenced
            } else {
                peer
            };
            state::promote(disk, gen, view, false, new_id).map_err(NodeError::Refused)?;
            if view == PeerView::Fenced {
                let links_before = self.handshakes();
                let outcome = self.run_fence_peer().await;
                if !outcome.fenced() {
                    // Shown in `status` (and `events`) as a fence after a lost link is.
                    self.link().fence = Some((outcome.describe(), outcome.peer_disk()));
                    crate::bell::ring();
                    let advice = if outcome == state::FenceOutcome::PeerPrimary {
                        "the peer is still primary: demote it, or this would be a split brain"
                    } else {
                        "its data may be newer than this node's; --force promotes anyway"
                    };
                    return Err(NodeError::Refused(format!(
                        "the peer is not connected and could not be fenced: {}; {advice}",
                        outcome.describe()
                    )));
                }
                // The peer may have come back while the handler ran (a slow one): its
                // answer is then stale, and the peer may be primary. Decided again, with it.
                if self.peer_view() != PeerView::Unknown || self.handshakes() != links_before {
                    return Err(NodeError::Refused(
                        "the peer connected while it was being fenced: run `primary` again to decide with it connected".into(),
                    ));
                }
                decided_at = Some(links_before);
                fence_note = format!("; the peer was fenced first: {}", outcome.describe());
                self.link().fence = Some((outcome.describe(), outcome.peer_disk()));
                crate::bell::ring();
                peer = PeerView::Fenced;
            } else if view == PeerView::LeftCleanly {
                // Checked again under the commit: the peer heard from since is no longer
                // known to be down.
                decided_at = Some(view_handshakes);
                fence_note =
                    "; the peer had gone down cleanly, leaving this node every write".into();
            }
        }
        // A connected secondary peer is asked first, as DRBD's cluster-wide state change does:
        // it may be deciding its own promotion at this very moment, having seen this node as
        // a secondary too. Its grant holds because it refuses while it is primary or being
        // promoted, and this node refuses the same, until this returns.
        if peer == PeerView::Connected(Role::Secondary) {
            self.ask_peer_to_promote().await?;
        }
        struct Release<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.store(false, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let _release = if peer != PeerView::Connected(Role::Primary) {
            self.stream_hold
                .store(true, std::sync::atomic::Ordering::SeqCst);
            if let Some(rep) = &self.rep {
                rep.quiesce_applies().await;
            }
            Some(Release(&self.stream_hold))
        } else {
            None
        };
        let disk_before = self.meta.lock().unwrap_or_else(|p| p.into_inner()).sb.disk;
        let handshakes = self.handshakes.clone();
        let sync_expected = self.sync_expected.clone();
        // A connected peer's view is stale after any handshake since (a reconnect may have
        // made this node a resync's target and ended again before this commit).
        let connected_at = matches!(peer, PeerView::Connected(_)).then_some(view_handshakes);
        let stopping = self.stopping.clone();
        self.update_meta(move |sb| {
            if stopping.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(going_down());
            }
            if connected_at.is_some_and(|n| n != handshakes.load(std::sync::atomic::Ordering::SeqCst)) {
                return Err(NodeError::Refused(
                    "the peer reconnected while this promotion was being decided: run `primary` again".into(),
                ));
            }
            // Checked again here: a connection may have decided meanwhile.
            if !force
                && sb.disk == DiskState::UpToDate
                && sync_expected.load(std::sync::atomic::Ordering::SeqCst)
            {
                return Err(resync_expected());
            }
            // A handshake since the fence answered (while the stream was quiesced, say): the
            // answer is stale, the peer may be primary.
            if decided_at.is_some_and(|n| n != handshakes.load(std::sync::atomic::Ordering::SeqCst)) {
                return Err(NodeError::Refused(
                    "the peer connected while this promotion was being decided: run `primary` again to decide with it connected".into(),
                ));
            }
            // The clean leave it relies on still stands: a Hello from the peer clears it in
            // this same write order (even one whose connection was then refused).
            if peer == PeerView::LeftCleanly && !sb.peer_left {
                return Err(NodeError::Refused(
                    "the peer was heard from while this promotion was being decided: run `primary` again".into(),
                ));
            }
            // Promoted, this node's data is the data: what it handed over is history, and so
            // is the peer's clean leave (relied on above, if at all): kept on disk, it would
            // let a plain `primary` after a restart here skip the fence, whatever the peer did
            // since. (`status` still says how the peer left until it is heard from.)
            sb.handed_over = false;
            sb.peer_left = false;
            // A connected peer with newer data (it is resyncing or catching this node up)
            // would be overwritten by this node's older data once it writes as primary.
            if let Some((pg, _)) = peer_gen.filter(|(pg, pu)| {
                !force && state::peer_is_ahead(&sb.gen, sb.sync_done_unacked(), pg, *pu)
            }) {
                return Err(peer_ahead(&pg, &sb.gen, sb.disk));
            }
            let p =
                state::promote(sb.disk, sb.gen, peer, force, new_id).map_err(NodeError::Refused)?;
            sb.disk = p.disk;
            sb.gen = p.gen;
            sb.was_primary = true;
            sb.promoted_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            Ok(())
        })
        .await?;
        if let Some(rep) = &self.rep {
            // One sequence space per pair: a new primary continues after the highest sequence
            // its disk holds, whoever issued it.
            let mut g = rep.lock();
            let start = g.issued.max(g.applied);
            if start != g.issued {
                if !g.ring.is_empty() {
                    tracing::warn!(
                        "dropping {} journal records of an earlier primary term",
                        g.ring.len()
                    );
                }
                // The stream goes on after the last record applied from the old primary.
                let prev_term = g.applied_term;
                g.ring.clear(start + 1, prev_term);
                g.issued = start;
            }
            drop(g);
            // Its records from here on are this node's, under a term no other node has.
            rep.new_term();
            // Promoted without a new generation (the peer was connected as secondary): until
            // this node runs a connection as primary, its records are ones the peer lacks
            // (the connection that follows a promotion may never come up).
            if self.node_state().gen.current == gen_before {
                rep.arm_until_connected();
            }
        }
        self.crashed_primary
            .store(false, std::sync::atomic::Ordering::SeqCst);
        // Declared good: nothing is left to receive (its peer lacks what differs, as the
        // new generation says).
        self.resync_left
            .store(0, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut r) = self.role.lock() {
            *r = Role::Primary;
        }
        crate::bell::ring();
        if let Some(rep) = &self.rep {
            let a = rep.acks();
            self.promoted_epoch.store(
                if a.connected { u64::MAX } else { a.epoch },
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        // A primary's data is the data: an earlier `connect --discard-my-data` no longer
        // stands (kept, it would discard the writes made from now on at a later connect).
        let dropped_discard = self
            .discard_my_data
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        if dropped_discard {
            tracing::info!("the pending `connect --discard-my-data` is dropped by the promotion");
        }
        // With fencing: a peer that was connected as secondary but does not come back for the
        // new handshake lacks what this node writes from now on, and no connection run as
        // primary will end to fence it: fenced below. A forced promotion of a node whose peer
        // is unknown runs the handler too, as DRBD does; `--force` only overrides its answer.
        let fence_after = fencing
            && (peer == PeerView::Connected(Role::Secondary) || force && peer == PeerView::Unknown);
        if let Some(rep) = &self.rep {
            // Whatever suspended writes before belonged to an earlier loss of a peer.
            rep.resume_io();
            // Under resource-and-stonith the new primary's writes wait too until that
            // handshake or that fence (as after a loss of the peer): none is acknowledged that
            // a promotion of the peer would lose.
            if fence_after && self.cfg().fencing.freezes_io() && self.fences_peer() {
                rep.suspend_io();
                tracing::info!(
                    "writes wait for the peer to connect to this primary, or for its fence (fencing resource-and-stonith)"
                );
            }
            rep.close_writes(false);
        }
        self.export.set_refuse(None);
        // Reconnect so the new handshake sets the stream's direction.
        self.announce_role().await;
        if fence_after && !established(self.link().state) {
            self.fence_peer();
        }
        let kernel_failed = self.attach_kernel().await;
        let gen_now = self.node_state().gen.current;
        let name = &self.cfg().me.name;
        let note = if !force {
            tracing::info!("{name} promoted to primary{fence_note}");
            if fence_note.is_empty() {
                String::new()
            } else {
                format!(" (new data generation {gen_now:016X}{fence_note})")
            }
        } else if disk_before == DiskState::Outdated {
            tracing::warn!(
                "{name} promoted to primary by force with an outdated disk: writes its peer made after it was outdated are not here; new data generation {gen_now:016X}"
            );
            format!(
                " (forced: its disk was outdated, so it may lack writes its peer made after that; if the peer comes back with such writes, that is a split brain; new data generation {gen_now:016X})"
            )
        } else if disk_before != DiskState::UpToDate {
            let disk = disk_before.name();
            // (state::promote warned about the disk already.)
            tracing::info!(
                "{name} promoted to primary by force with its disk {disk}: new data generation {gen_now:016X}"
            );
            format!(
                " (forced: its disk was {disk}, so its data may not be a complete copy of any \
                 node's; new data generation {gen_now:016X})"
            )
        } else {
            tracing::info!(
                "{name} promoted to primary by force: new data generation {gen_now:016X}"
            );
            format!(" (forced: new data generation {gen_now:016X})")
        };
        self.run_handler("became-primary");
        let mut note = if dropped_discard {
            format!("{note}; the pending `connect --discard-my-data` is dropped")
        } else {
            note
        };
        // Said here, not only in `status`: the admin's next step is a mount of that device.
        if let (Some(why), Some(dev)) = (&kernel_failed, &self.cfg().me.kernel_device) {
            note.push_str(&format!(
                "; warning: {} is not attached ({why}): the export serves on its socket only",
                dev.display()
            ));
        }
        // Regions a verify found different and no resync has repaired yet (marked by this
        // node's own verify, or by its primary's): which copy is good is not known, and the
        // peer's goes when it connects, as in DRBD. The admin should know before writing.
        if let Some(rep) = &self.rep {
            if rep.verify_marked.load(std::sync::atomic::Ordering::SeqCst) {
                let bytes = rep.lock().bitmap.dirty_bytes();
                tracing::warn!(
                    "{name} promoted with regions a verify found different from the peer: {bytes} bytes out of sync, resynced from this node when the peer connects"
                );
                note.push_str(&format!(
                    "; warning: a verify found regions of this node different from the peer, not repaired yet ({bytes} bytes out of sync): when the two connect, this node's copy of them goes to the peer (unless the peer moved on too, which is a split brain)"
                ));
            }
        }
        Ok(format!("{name} is now primary{note}"))
    }

    /// Whether the stream from the peer must stop writing this disk: this node is primary, or
    /// is being promoted.
    pub fn stream_held(&self) -> bool {
        self.stream_hold.load(std::sync::atomic::Ordering::SeqCst) || self.role() == Role::Primary
    }

    /// `down` without --force, like `secondary`, leaves attached NBD clients alone (a mounted
    /// filesystem would lose its disk): refused while any is attached (the node's own kernel
    /// device excepted, which `down` detaches), after a moment for those already leaving.
    pub async fn refuse_down_while_clients(&self, force: bool) -> Result<(), NodeError> {
        if force {
            return Ok(());
        }
        self.refuse_while_kernel_device_in_use().await?;
        let kernel_attached = u64::from(self.kernel.lock().await.is_some());
        let open = self
            .export
            .wait_clients(kernel_attached, CLIENTS_LEAVING_WAIT)
            .await;
        state::demote(open.saturating_sub(kernel_attached), false).map_err(NodeError::Refused)
    }

    /// The node's own kernel device (`/dev/nbdX`) is not counted among the clients (a
    /// detach is part of `down` and `secondary`), but pulling it from under a mount or a
    /// stacked device loses that filesystem's writes: refused without --force, as DRBD
    /// refuses with "held open".
    async fn refuse_while_kernel_device_in_use(&self) -> Result<(), NodeError> {
        match self.kernel.lock().await.as_ref().and_then(|k| k.in_use()) {
            Some(why) => Err(NodeError::Refused(format!(
                "{why}: unmount it first, or use --force to detach it anyway"
            ))),
            None => Ok(()),
        }
    }

    pub async fn secondary(&self, force: bool) -> Result<String, NodeError> {
        // One role change at a time (see `skip_ops`): decided on the role the last one left.
        let _roles = self.skip_ops.lock().await;
        if self.role() == Role::Secondary {
            return Ok(format!("{} is already secondary", self.cfg().me.name));
        }
        // A `down` (or a service stop) under way closes the writes and commits: a demotion
        // refused midway would open them again behind its back.
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(NodeError::Refused(format!(
                "{} is going down: the demotion is part of it",
                self.cfg().me.name
            )));
        }
        if !force {
            self.refuse_while_kernel_device_in_use().await?;
        }
        let kernel_attached = u64::from(self.kernel.lock().await.is_some());
        // A client that just sent its disconnect (an unmount, then `secondary` at once) is
        // still finishing: a moment for it to go, so that only clients still attached refuse
        // the demotion.
        let open = if force {
            self.export.clients()
        } else {
            self.export
                .wait_clients(kernel_attached, CLIENTS_LEAVING_WAIT)
                .await
        };
        let clients = open.saturating_sub(kernel_attached);
        state::demote(clients, force).map_err(NodeError::Refused)?;
        self.stop_serving().await?;
        let issued = self.drain_to_peer().await;
        // Writes the peer lacks (it was away, or did not catch up in time) make this node's
        // data newer than the peer's: a new generation says so, so that the next connect
        // brings them to the peer (as a resync between two secondaries, if need be) and the
        // peer cannot be promoted over them without --force.
        let lacks = self.rep.as_ref().is_some_and(|r| self.leaves_divergence(r));
        // Writes the peer has not made durable (it is away, or did not confirm in time) go to
        // the bitmap on disk before this node stops being a crashed primary: past the commit
        // below its activity log no longer counts, and were both nodes to crash the bitmap is
        // all that would name them. The export is closed by now, so the demotion goes on if
        // that write fails, but the node stays marked as a primary that did not go down
        // cleanly, whose activity log names those regions after a crash (as `down` does).
        // Persisted whatever this call covers: a link lost during the drain has already set
        // its bits in memory (left for the next periodic write), and those must be on disk
        // before the commit below as much as these.
        let mut covered = true;
        if let Some(r) = &self.rep {
            r.cover_undurable();
            if let Err(e) = r.persist().await {
                tracing::error!(
                    "writing the bitmap of the writes the peer lacks failed: {e}; the activity log keeps naming them"
                );
                covered = false;
            }
        }
        let new_id = random_id();
        self.commit_meta(move |sb| {
            if covered {
                sb.was_primary = false;
            }
            if let Some((i, mark)) = issued {
                // Its own records count as applied here, under its own term.
                sb.advance_applied(mark);
                sb.issued_seq = sb.issued_seq.max(i);
            }
            if lacks {
                sb.new_generation_as_primary(new_id);
            }
        })
        .await
        .or_else(|e| self.tolerate_on_failed_disk(e, "the demotion"))?;
        // A secondary writes nothing of its own: no generation is left to start (a later
        // `primary --force` starts its own).
        if let Some(r) = &self.rep {
            r.disarm_new_generation();
            // Nothing of a secondary's waits for a fence (its own writes were failed above).
            if r.resume_io() {
                tracing::info!("writes no longer suspended: this node is secondary now");
            }
        }
        if lacks {
            tracing::warn!(
                "the peer lacks writes of this node: new data generation {new_id:016X}, so a connect sends them to it (unless the peer changed its data too: a split brain)"
            );
        }
        if let Ok(mut r) = self.role.lock() {
            *r = Role::Secondary;
        }
        crate::bell::ring();
        self.announce_role().await;
        tracing::info!("{} demoted to secondary", self.cfg().me.name);
        let lacking = self
            .rep
            .as_ref()
            .map_or(0, |r| r.lock().bitmap.dirty_bytes());
        let name = &self.cfg().me.name;
        Ok(if self.device.sync_failed() {
            // Its bitmap names every region because its own disk may have lost them, not
            // because the peer lacks anything acknowledged.
            format!(
                "{name} is now secondary; its disk failed a flush, so the peer holds the good copy (every acknowledged write): promote the peer (a plain `primary` there), then repair or replace this disk (`down`, `create-md` on a new one, `up`)"
            )
        } else if lacks || lacking > 0 {
            let generation = if lacks {
                format!(", new data generation {new_id:016X}")
            } else {
                String::new()
            };
            if self
                .split_brain_reported
                .load(std::sync::atomic::Ordering::SeqCst)
                != 0
            {
                // Both changed the data: a connect moves nothing until one side gives up.
                format!(
                    "{name} is now secondary; it and the peer both changed the data (a split brain: {lacking} bytes of this node's changes{generation}): a connect is refused until one side discards its changes (`connect --discard-my-data` on the node whose changes go)"
                )
            } else {
                format!(
                    "{name} is now secondary; the peer lacks writes of this node ({lacking} bytes out of sync{generation}): a connect sends them to it (unless the peer changed its data too: a split brain), so do not promote the peer with --force before that"
                )
            }
        } else {
            format!("{name} is now secondary")
        })
    }

    /// Refuses new clients, detaches the kernel device, drains and closes every connection,
    /// and makes everything written durable.
    /// Returns how many NBD connections were still draining when it gave up waiting.
    async fn stop_serving(&self) -> Result<u64, NodeError> {
        self.export.set_refuse(Some(secondary_reason(&self.cfg())));
        // No client write takes a sequence from here on: what the demotion commits as applied
        // (and the flush below) then covers every write this node ever makes as primary. A
        // request already running (waiting for journal space, say) fails instead of landing
        // after the flush, or after the peer's newer writes once this node is secondary.
        if let Some(rep) = &self.rep {
            rep.close_writes(true);
        }
        self.detach_kernel().await;
        let left = self.export.disconnect_all(Duration::from_secs(20)).await;
        if left > 0 {
            tracing::warn!("{left} NBD connection(s) still draining after 20 s");
        }
        // A write that took its sequence still writing this disk (a hung disk) would land
        // after the flush: the node stays primary rather than commit a mark past it.
        let writing = match &self.rep {
            Some(rep) => rep.wait_local_writes(Duration::from_secs(10)).await,
            None => 0,
        };
        // A demotion or `down` refused below leaves a primary serving as before.
        let reopen = || {
            if self.role() == Role::Primary {
                if let Some(rep) = &self.rep {
                    rep.close_writes(false);
                }
                self.export.set_refuse(None);
            }
        };
        if writing > 0 {
            reopen();
            return Err(NodeError::Refused(format!(
                "{writing} write(s) still writing this node's disk after 30 s (is it hung?): the node stays primary (its NBD clients were disconnected and may reconnect). Try again, or stop the daemon (it then recovers as a crashed primary)"
            )));
        }
        // A secondary has no writes of its own to order in a stream: a record from it (as
        // the source of a finished sync, say) would only move the peer past the mark this
        // node keeps, and the peer could no longer be caught up from its journal later.
        let flushed = if self.role() == Role::Primary {
            self.device.flush_own().await
        } else {
            self.device.local_flush().await
        };
        match flushed {
            Ok(()) => Ok(left),
            // A disk whose sync failed never syncs again (see `Device::sync_failed`): refusing
            // would leave no way down but a signal. It is marked for a full resync already.
            Err(e) if self.device.sync_failed() => {
                tracing::warn!(
                    "flush failed (NBD error {e}) on a disk that lost writes: going on (it takes a full resync from the peer)"
                );
                // Marked here, not only by the watcher task: `down` aborts the tasks next.
                self.disk_lost_writes().await;
                Ok(left)
            }
            Err(e) => {
                reopen();
                Err(NodeError::Refused(format!("flush failed (NBD error {e})")))
            }
        }
    }

    /// `down`: stop serving, persist, release the sockets.
    /// Returns a note on the peer for the admin ("" when there is none to give).
    pub async fn down(&self) -> Result<&'static str, NodeError> {
        use std::sync::atomic::Ordering::SeqCst;
        self.stopping.store(true, SeqCst);
        // A promotion already running finishes (or refuses at its commit) first: the way
        // down is then decided by the role it leaves.
        drop(self.skip_ops.lock().await);
        let r = self.go_down().await;
        if r.is_err() {
            // Refused: the node serves on as before, and may be promoted again.
            self.stopping.store(false, SeqCst);
        }
        r
    }

    async fn go_down(&self) -> Result<&'static str, NodeError> {
        let mut note = "";
        let mut marks = None;
        let mut persisted = true;
        let mut lacks = false;
        let new_id = random_id();
        let draining = self.stop_serving().await?;
        if self.role() == Role::Primary {
            self.drain_to_peer().await;
            // A client still draining may yet write: no clean hand-over then.
            note = if draining == 0 {
                self.tell_peer_leaving().await
            } else {
                "; NBD connections were still draining: the peer was not told this node goes down cleanly (promoting it needs --force)"
            };
        } else {
            // Outdated first (with fencing), while the link still says whether a primary is
            // left behind; then the primary hears of the stop.
            let outdated = self.outdate_before_leaving().await;
            self.final_ack_to_primary(outdated.is_ok()).await;
            match outdated {
                // Going down anyway (the disk may be failing): said loudly.
                Err(e) => tracing::error!("{e}; going down without it"),
                Ok(()) => note = self.tell_secondary_peer_leaving().await,
            }
        }
        self.listener.abort();
        for t in self
            .tasks
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default()
        {
            t.abort();
        }
        if let Some(rep) = &self.rep {
            // The link task was aborted above, before it could do this itself: what the peer
            // has not made durable goes to the bitmap, which is persisted next.
            // A primary going down with data its peer lacks: the committed generation says
            // so (as a demotion's does), or a failover to the peer would later overwrite it
            // silently instead of a split brain being reported. Decided before the link's
            // end below marks what the peer has not made durable.
            lacks = self.leaves_divergence(rep);
            if self.role() == Role::Primary && rep.link_ran_as_primary() {
                // Writes still waiting for the peer are released below: under a new
                // generation where the peer lacks them, as at any loss of the peer.
                rep.peer_lost();
            }
            // Whatever the connection ran as (a primary promoted while it was the source of
            // a resync between secondaries streams its writes on that connection until the
            // reconnect), as the link's own end does: none of it may be forgotten.
            rep.on_disconnect();
            rep.set_connected(false, 0, 0);
            // As secondary: the aborted stream's writes finish and are synced before the
            // applied mark below is committed (not at all if that failed).
            let settled = self.settle_applies().await;
            if let Err(e) = rep.persist().await {
                // The journal and bitmap on disk may lack records the peer does not have:
                // a primary stays marked as one, so that the next start recovers it as a
                // crashed primary (its hot extents go to the bitmap).
                tracing::error!("journal sync at down: {e}; the next start recovers this node as a crashed primary");
                persisted = false;
            }
            let g = rep.lock();
            marks = Some((g.issued, (g.applied, g.applied_term), settled));
        }
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
        let crashed = self
            .crashed_primary
            .load(std::sync::atomic::Ordering::SeqCst);
        // One commit, so that no concurrent update can undo part of it.
        self.commit_meta(move |sb| {
            if let Some((issued, applied, settled)) = marks {
                sb.issued_seq = sb.issued_seq.max(issued);
                if settled {
                    sb.advance_applied(applied);
                }
            }
            if lacks {
                sb.new_generation_as_primary(new_id);
            }
            // A node that crashed as primary and has not yet brought its peer its hot
            // extents stays marked as one: a clean stop must not turn it into a peer whose
            // bitmap the next connect ignores (both at one generation look in sync).
            if persisted && !crashed {
                sb.was_primary = false;
            }
        })
        .await
        .or_else(|e| self.tolerate_on_failed_disk(e, "the stop"))?;
        if lacks {
            tracing::warn!(
                "the peer lacks writes of this node: new data generation {new_id:016X}, so a connect sends them to it (unless the peer changed its data too: a split brain)"
            );
        }
        if let Ok(mut r) = self.role.lock() {
            *r = Role::Secondary;
        }
        crate::bell::ring();
        tracing::info!(
            "resource {} down on {}",
            self.cfg().resource,
            self.cfg().me.name
        );
        Ok(if self.cfg().peer.is_some() { note } else { "" })
    }

    /// Before giving up the primary role: waits (bounded) until the peer has everything durably,
    /// then counts this node's own writes as applied. Returns the last issued sequence and
    /// the applied mark that follows (sequence, term).
    async fn drain_to_peer(&self) -> Option<(u64, (u64, u64))> {
        let rep = self.rep.as_ref()?;
        let issued = rep.lock().issued;
        let mut rx = rep.subscribe_acks();
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|a| !a.connected || a.durable >= issued),
        )
        .await;
        let a = rep.acks();
        if a.connected && a.durable >= issued {
            tracing::info!("peer has every write up to sequence {issued}");
        } else if !a.connected {
            // Its marks are an earlier connection's: not worth quoting.
            tracing::warn!(
                "the peer is not connected: the journal and bitmap keep what it lacks of this node's writes (up to sequence {issued}) for its next connect"
            );
        } else if r.is_err() {
            tracing::warn!(
                "the peer has not confirmed the writes after sequence {} within 10 s (this node issued up to {issued}): the journal and bitmap keep them for its next connect",
                a.durable
            );
        }
        let mut g = rep.lock();
        // Its own records count as applied here: a peer that follows them later is caught up
        // after them (the term says they are this node's).
        if issued > g.applied {
            g.applied = issued;
            g.applied_term = g.ring.term_at(issued).unwrap_or(0);
        }
        Some((issued, (g.applied, g.applied_term)))
    }

    /// Attaches the configured kernel device to a socketpair served by this export. Where the
    /// kernel has no nbd driver this is noted in status and the socket export keeps serving.
    async fn attach_kernel(&self) -> Option<String> {
        let dev = self.cfg().me.kernel_device.clone()?;
        let note = |s: String| {
            if let Ok(mut n) = self.kernel_note.lock() {
                *n = Some(s);
            }
        };
        let backend = crate::kernel::backend_id(&self.cfg().resource, &self.cfg().me.name);
        let mut probed = crate::kernel::probe(&dev, &backend);
        if matches!(probed, Err(crate::kernel::KernelError::NotLoaded(_)))
            && load_nbd_module().await
        {
            // udev makes the device nodes a moment after the module is in.
            for _ in 0..20 {
                probed = crate::kernel::probe(&dev, &backend);
                if !matches!(probed, Err(crate::kernel::KernelError::NotLoaded(_))) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // A device an earlier daemon of this node left attached is cleared by `attach`.
        if let Err(e) = probed.or_else(|e| match e {
            crate::kernel::KernelError::Stale(_) => Ok(()),
            e => Err(e),
        }) {
            tracing::warn!("{e}");
            note(e.to_string());
            return Some(e.to_string());
        }
        let (ours, theirs) = match std::os::unix::net::UnixStream::pair() {
            Ok(p) => p,
            Err(e) => {
                let why = format!("socketpair for {}: {e}", dev.display());
                note(why.clone());
                return Some(why);
            }
        };
        let ours = match ours
            .set_nonblocking(true)
            .and_then(|_| tokio::net::UnixStream::from_std(ours))
        {
            Ok(s) => s,
            Err(e) => {
                let why = format!("socket for {}: {e}", dev.display());
                note(why.clone());
                return Some(why);
            }
        };
        let (rd, wr) = ours.into_split();
        let export = self.export.clone();
        tokio::spawn(nbd_server::transmission(
            rd,
            wr,
            export,
            nbd_server::Negotiated::default(),
            format!("kernel {}", dev.display()),
        ));
        let size = self.device.size();
        let flags = self.export.transmission_flags();
        let bs = self.device.min_block().max(4096);
        let dev2 = dev.clone();
        let r = tokio::task::spawn_blocking(move || {
            crate::kernel::attach(&dev2, theirs, size, bs, flags, 30, &backend)
        })
        .await;
        match r {
            Ok(Ok(a)) => {
                note(format!("{} attached ({})", dev.display(), a.method()));
                tracing::info!(
                    "kernel device {} attached via {}",
                    dev.display(),
                    a.method()
                );
                let max = self.device.max_request();
                if let Err(e) = a.limit_requests(max) {
                    tracing::warn!(
                        "could not cap {}'s requests at {max} bytes (queue/max_sectors_kb): {e}; larger writes overflow the journal",
                        dev.display()
                    );
                }
                *self.kernel.lock().await = Some(a);
                None
            }
            Ok(Err(e)) => {
                tracing::warn!("kernel attach of {} failed: {e}", dev.display());
                let why = format!("attach failed: {e}");
                note(why.clone());
                Some(why)
            }
            Err(e) => {
                let why = format!("attach task failed: {e}");
                note(why.clone());
                Some(why)
            }
        }
    }

    async fn detach_kernel(&self) {
        if let Some(a) = self.kernel.lock().await.take() {
            let dev = self.cfg().me.kernel_device.clone().unwrap_or_default();
            match tokio::task::spawn_blocking(move || a.detach()).await {
                Ok(Ok(())) => tracing::info!("kernel device {} detached", dev.display()),
                Ok(Err(e)) => tracing::warn!("kernel detach of {}: {e}", dev.display()),
                Err(e) => tracing::warn!("kernel detach task: {e}"),
            }
        }
    }
}

/// `modprobe nbd`, as drbdadm loads its module: whether it ran and succeeded (bounded; a
/// system without modprobe, or without the module, says so in the attach's note).
async fn load_nbd_module() -> bool {
    let run = tokio::process::Command::new("modprobe")
        .arg("nbd")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(10), run).await {
        Ok(Ok(out)) if out.status.success() => {
            tracing::info!("loaded the kernel's nbd module (modprobe nbd)");
            true
        }
        Ok(Ok(out)) => {
            tracing::warn!(
                "modprobe nbd failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            false
        }
        Ok(Err(e)) => {
            tracing::warn!("could not run modprobe nbd: {e}");
            false
        }
        Err(_) => {
            tracing::warn!("modprobe nbd did not finish within 10 s");
            false
        }
    }
}

/// A primary shows its peer `behind` past this many writes not applied there (more than the
/// secondary's apply window takes at once); fewer are the normal flight of a healthy link.
const BEHIND_AFTER_WRITES: u64 = 128;

/// Whether a link state means an authenticated connection is up.
pub fn established(state: &str) -> bool {
    matches!(state, "connected" | "sync-source" | "sync-target")
}

/// Loads the journal (from its checkpoint) and the bitmap from the metadata area.
async fn open_replication(
    cfg: &Config,
    meta: &Arc<Mutex<MetaStore>>,
    size: u64,
) -> Result<Arc<Replication>, NodeError> {
    let meta2 = meta.clone();
    let protocol = cfg.protocol;
    let al_extents = cfg.al_extents;
    let backing = match cfg.me.meta {
        MetaLocation::Internal => None,
        MetaLocation::External(_) => Some(cfg.me.backing.clone()),
    };
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        let m = meta2.lock().unwrap_or_else(|p| p.into_inner());
        let l = m.sb.layout;
        let file = m
            .file()
            .try_clone()
            .map_err(io_err("cloning the metadata handle"))?;
        let mut image = crate::journal::image_buffer(l.journal_len as usize);
        file.read_exact_at(&mut image, l.journal_offset)
            .map_err(io_err("reading the journal"))?;
        let mut ring = Ring::recover(
            image,
            m.sb.journal_pos,
            m.sb.journal_seq,
            m.sb.journal_prev_term,
        );
        // A crash while records were written (as primary, or as a secondary that was a
        // resync's source): behind the recovered records (the first invalid one, a torn
        // write; possibly the very first, leaving none) may lie valid records of the same
        // lap with the next sequence numbers. New records written over the torn one could
        // line up with them, and a later recovery would join them on as if they were new
        // (and a journal catch-up would send them to the peer over newer data). Everything
        // outside the recovered records is zeroed, on disk before anything is appended;
        // a journal that holds nothing else (a secondary's, never written) is left as it is.
        let clean = ring.live_image(m.sb.journal_pos);
        if clean.as_slice() != ring.raw(0, ring.cap()) {
            file.write_all_at(&clean, l.journal_offset)
                .and_then(|()| file.sync_data())
                .map_err(io_err("clearing the journal behind its recovered records"))?;
            ring = Ring::recover(
                clean,
                m.sb.journal_pos,
                m.sb.journal_seq,
                m.sb.journal_prev_term,
            );
        }
        let mut bm = vec![0u8; l.bitmap_len as usize];
        file.read_exact_at(&mut bm, l.bitmap_offset)
            .map_err(io_err("reading the bitmap"))?;
        let bitmap = Bitmap::from_bytes(size, l.granularity, &bm);
        let issued = m
            .sb
            .issued_seq
            .max(ring.last_seq().unwrap_or(0))
            .max(m.sb.journal_seq.saturating_sub(1));
        tracing::info!(
            "journal: {} records recovered{}, issued {issued}, applied {}, bitmap {} bytes out of sync{}",
            ring.len(),
            match (ring.first_seq(), ring.last_seq()) {
                (Some(a), Some(b)) => format!(" (sequences {a}..{b})"),
                _ => String::new(),
            },
            m.sb.applied_seq,
            bitmap.dirty_bytes(),
            if m.sb.journal_overflowed { ", journal overflowed" } else { "" }
        );
        let mut bitmap = bitmap;
        let mut ring = ring;
        let lost = crate::replication::reconcile_recovered(&mut ring, &mut bitmap, issued);
        if lost {
            tracing::warn!(
                "journal ends before the issued sequence {issued}: its newest records were lost in a crash, or written in an earlier format; the peer gets a resync of the bitmap"
            );
        }
        let mut crash_marked = false;
        let mut al = vec![0u8; l.al_len as usize];
        file.read_exact_at(&mut al, l.al_offset)
            .map_err(io_err("reading the activity log"))?;
        // Later log writes follow the last one on disk (the newer slot must win).
        let (on_disk, al_writes) = crate::activity::ActivityLog::decode(&al);
        if m.sb.was_primary {
            // A crashed primary: writes in its hot extents (activity log) and whatever its
            // journal still holds may not have reached the peer. No journal record carries
            // them: recorded like an overflow, so the next connect resyncs the bitmap and
            // never clears it after a journal replay.
            crash_marked = true;
            match on_disk {
                crate::activity::OnDisk::Extents(hot) => {
                    for e in &hot {
                        let start = u64::from(*e) * crate::activity::EXTENT;
                        bitmap.set_range(start, crate::activity::EXTENT);
                    }
                    tracing::warn!(
                        "crashed primary: {} activity-log extents ({} MiB) marked out of sync",
                        hot.len(),
                        hot.len() as u64 * (crate::activity::EXTENT >> 20)
                    );
                }
                crate::activity::OnDisk::All => {
                    bitmap.set_range(0, size);
                    tracing::warn!(
                        "crashed primary: the activity log names every extent (too many were hot, or it is unreadable): the whole device is marked out of sync"
                    );
                }
            }
        }
        // A disk that lost writes before this start: every region, whatever the bitmap on
        // disk got to say before the crash or the disk's failure.
        let disk_lost = m.sb.lost_writes;
        if disk_lost {
            bitmap.set_range(0, size);
            tracing::warn!(
                "this disk lost writes before this start (a sync of it failed): every region is out of sync until a resync from the peer ends"
            );
        }
        if crash_marked || lost || disk_lost {
            // Durable before this node serves or connects: a log written from now on no
            // longer names the old extents.
            let bytes = bitmap.to_bytes();
            let n = bytes.len().min(l.bitmap_len as usize);
            file.write_all_at(&bytes[..n], l.bitmap_offset)
                .and_then(|()| file.sync_data())
                .map_err(io_err("writing the recovered bitmap"))?;
        }
        let overflowed = m.sb.journal_overflowed || lost || crash_marked || disk_lost;
        let applied = (m.sb.applied_seq, m.sb.applied_term);
        drop(m);
        let data = match backing {
            Some(p) => Some(Arc::new(
                std::fs::File::open(&p).map_err(io_err("opening the backing device to sync it"))?,
            )),
            None => None,
        };
        Ok(Replication::new(
            protocol,
            meta2,
            MetaAreas {
                file: Arc::new(file),
                layout: l,
                data,
            },
            ring,
            issued,
            applied,
            bitmap,
            overflowed,
            al_extents,
            al_writes,
        ))
    })
    .await
    .map_err(|e| NodeError::Refused(format!("journal task failed: {e}")))?
}

/// What `down` says when the hand-over was recorded here but the peer did not confirm it
/// took the leave in (it may have all the same).
const NOT_TOLD_RECORDED: &str = "; the peer did not confirm it was told this node goes down cleanly: promoting it needs --force, and so does promoting this node alone (it recorded the hand-over)";

/// Seconds per cooling round of the activity log (see `Replication::cool_activity_log`): an
/// extent idle for a whole round goes cold.
const AL_COOLING_SECS: u64 = 5;

/// Once a second, makes the bitmap durable and, while the peer is away, the journal too, so a
/// client that rarely flushes does not leave them far behind on disk; every
/// [`AL_COOLING_SECS`], cools the activity log; and once this node's writes have stood still
/// for a second, commits what its metadata lags behind: the mark the peer last gave of its
/// disk (see `Resource::peer_durable_heard`; the acknowledgement of a burst's last flush
/// comes after that flush's own commit), and the issued mark of this node's own last writes
/// (a flush commits the one before it): what the peer is told this disk holds, so that an
/// image of either disk from that burst, restored later, is told from a crash. Not while
/// writes go on: a superblock sync syncs the data of internal metadata's device with it,
/// which a client that does not flush has not asked for.
///
/// A disk that keeps failing is logged at the first failure, then once a minute with the count
/// of failed attempts (status shows the disk state meanwhile), and once more when it works again.
async fn journal_persister(rep: Arc<Replication>, res: std::sync::Weak<Resource>) {
    const REPEAT_LOG: Duration = Duration::from_secs(60);
    // The failing stretch: when it was last logged, and the failures since.
    let mut failing: Option<(std::time::Instant, u64)> = None;
    let mut ticks = 0u64;
    let mut heard_before = (0, 0);
    let mut issued_before = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        ticks += 1;
        if let Some(r) = res.upgrade() {
            let (heard, committed) = {
                let m = r.meta.lock().unwrap_or_else(|p| p.into_inner());
                (m.heard, m.sb.peer_durable)
            };
            let issued = rep.lock().issued;
            let idle = issued == issued_before;
            let issued_lags = r.durable_issued_mark().1 < issued;
            if idle && issued_lags && !rep.needs_persist() {
                // Journal written and synced, then (next round, if the records were not on
                // disk yet) the checkpoint commits the issued mark over them.
                if let Err(e) = rep.persist().await {
                    tracing::debug!("committing the issued mark while idle: {e}");
                }
            } else if heard != committed && heard == heard_before && idle {
                if let Err(e) = r.update_meta(|_| Ok(())).await {
                    tracing::debug!("committing the peer's durable mark: {e}");
                }
            }
            heard_before = heard;
            issued_before = issued;
        }
        if ticks % AL_COOLING_SECS == 0 {
            // A failure is the activity log's: the next write that needs the log fails and
            // says so; the next round tries again.
            // Only a primary's stream may carry the flush it asks for.
            let primary = res.upgrade().is_some_and(|r| r.role() == Role::Primary);
            if let Err(e) = rep.cool_activity_log(primary).await {
                tracing::warn!("activity log: writing the cooled log failed: {e}");
            }
        }
        // Flushes make the journal durable; this keeps the bitmap and, while the peer is away,
        // the journal from lagging far behind on disk when clients rarely flush.
        if !rep.needs_persist() {
            continue;
        }
        match (rep.persist().await, &mut failing) {
            (Ok(()), None) => {}
            (Ok(()), Some(_)) => {
                tracing::info!("journal and bitmap written again");
                failing = None;
            }
            (Err(e), None) => {
                tracing::error!("journal write failed: {e} (retried every second)");
                failing = Some((std::time::Instant::now(), 0));
            }
            (Err(e), Some((logged, count))) => {
                *count += 1;
                if logged.elapsed() >= REPEAT_LOG {
                    tracing::error!(
                        "journal write still failing: {e} ({count} more failed attempts)"
                    );
                    *logged = std::time::Instant::now();
                    *count = 0;
                }
            }
        }
    }
}

/// The first failed I/O on the backing device since `up`: logged, and the `local-io-error`
/// handler runs (DRBD's `on-io-error call-local-io-error`), so that an admin's script can
/// alert or fail over. The error itself goes to the client that asked (DRBD's `pass_on`) and
/// the resource stays up; later errors are counted in `status` (`disk_errors`).
async fn watch_disk_errors(res: std::sync::Weak<Resource>, mut errors: watch::Receiver<u64>) {
    if errors.changed().await.is_err() {
        return;
    }
    let Some(res) = res.upgrade() else {
        return;
    };
    tracing::error!(
        "I/O error on the backing device {} (role {}): the request failed; running the local-io-error handler, if any",
        res.cfg().me.backing.display(),
        res.role().name()
    );
    res.run_handler("local-io-error");
}

/// A backing device that completes nothing for this long while requests wait is logged as
/// stalled (DRBD would count the requests as pending; a hung disk otherwise shows only as
/// clients that wait).
const STALL_WARN: Duration = Duration::from_secs(30);

/// Logs a stalled backing device once, and once more when it completes I/O again.
async fn watch_stalls(res: std::sync::Weak<Resource>) {
    let mut warned = false;
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let Some(res) = res.upgrade() else {
            return;
        };
        let (n, ms) = res.device.stalled();
        if !warned && ms >= STALL_WARN.as_millis() as u64 {
            warned = true;
            tracing::warn!(
                "the backing device {} has completed no I/O for {} s with {n} request(s) in flight: a hung disk? (`status` shows it while it lasts)",
                res.cfg().me.backing.display(),
                ms / 1000
            );
        } else if warned && ms < STALL_WARN.as_millis() as u64 {
            warned = false;
            tracing::info!(
                "the backing device {} completes I/O again",
                res.cfg().me.backing.display()
            );
        }
    }
}

/// A sync of the backing device failed (see [`Resource::disk_lost_writes`]).
async fn watch_sync_failed(res: std::sync::Weak<Resource>, mut failed: watch::Receiver<bool>) {
    if failed.wait_for(|f| *f).await.is_err() {
        return;
    }
    if let Some(res) = res.upgrade() {
        res.disk_lost_writes().await;
    }
}

/// Removes a socket file left by a dead process; refuses if something still listens on it,
/// and leaves anything that is not a socket alone (a config that names a disk image or a
/// metadata file as a socket path, by a slip of the pen, must not lose it).
pub async fn remove_stale_socket(path: &std::path::Path) -> Result<(), NodeError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(io_err(format!("creating {}", dir.display())))?;
            }
            return Ok(());
        }
        Err(e) => return Err(io_err(format!("checking {}", path.display()))(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(NodeError::Refused(format!(
            "{} exists and is not a socket: left as it is (is the path in the config right?)",
            path.display()
        )));
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(NodeError::Refused(format!(
            "{} is in use by another process",
            path.display()
        )));
    }
    std::fs::remove_file(path).map_err(io_err(format!("removing stale {}", path.display())))
}

/// A fresh random 64-bit generation id (never one of the reserved small values).
pub fn random_id() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        b = (t ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes();
    }
    u64::from_le_bytes(b) | (1 << 63)
}

#[cfg(test)]
mod tests {
    use super::ResyncProgress;

    #[test]
    fn a_resync_rate_stops_falling_once_everything_is_sent() {
        let mut p = ResyncProgress::start(8 << 20);
        std::thread::sleep(std::time::Duration::from_millis(20));
        p.advance(8 << 20, 8 << 20);
        let at_end = p.rate();
        assert!(at_end > 0);
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert_eq!(p.rate(), at_end, "waiting for the SyncDone sends nothing");
        // A total that grew with what was sent is never shown below it.
        p.advance(1, 9 << 20);
        assert_eq!((p.total, p.done), (9 << 20, 9 << 20));
    }

    /// Time paused does not count in the rate (nor so in the ETA `status` derives from it).
    #[test]
    fn a_resync_rate_leaves_out_the_time_paused() {
        let mut p = ResyncProgress::start(64 << 20);
        std::thread::sleep(std::time::Duration::from_millis(20));
        p.advance(64 << 20, 1 << 20);
        p.set_paused(true);
        let before = p.rate();
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            p.rate() >= before / 2,
            "paused: {} B/s, was {before} B/s",
            p.rate()
        );
        p.set_paused(false);
        p.set_paused(false);
        assert!(p.rate() >= before / 2, "resumed: {} B/s", p.rate());
    }
}
