//! The peer link: one authenticated TCP connection between the two nodes of a resource.
//!
//! The node whose name sorts first dials, the other accepts, so both may start in any order
//! and never race two connections. Every inbound connection is handshaken on its own task, so a
//! client speaking garbage or holding the socket open cannot delay the real peer.
//!
//! Handshake: both send `Hello` (version, resource, node, fresh nonce); both prove the secret
//! with an HMAC-SHA256 over the other's nonce; both send `State`. Then the primary streams its
//! journal from the record after the peer's last applied one, and the secondary applies the
//! stream in order and acknowledges receipt, application and durability.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use proto::peer::{self, Msg, NodeState, PREFIX_LEN};
use proto::seal;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify, Semaphore};

use crate::bitmap::Bitmap;
use crate::buf::Buf;
use crate::config::Protocol;
use crate::link::{self, LinkKeys, LinkRead, LinkWrite};
use crate::meta::{DiskState, Generations, COUNTER_LIMIT};
use crate::replication::{Ranges, Record, Replication};
use crate::resource::Resource;
use crate::state::{self, Role, SyncDecision};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Incoming connections that may be in their handshake at once (the oldest goes first).
const MAX_HANDSHAKES: usize = 32;
const PING_INTERVAL: Duration = Duration::from_millis(500);
/// No frame for this long: the peer is dead.
const PEER_TIMEOUT: Duration = Duration::from_secs(4);
/// How long the secondary may hold back an acknowledgement that no write on the primary
/// waits for (see [`ack_is_urgent`]): the journal release and `status` can wait this long.
const ACK_DEFER: Duration = Duration::from_millis(1);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// The link's read buffer (see where it is made).
const LINK_READ_BUFFER: usize = 64 * 1024;
/// Most journal bytes the sender writes to the socket in one call.
const SEND_BATCH: usize = 2 << 20;

/// The sender's lease on a run of journal records: unpinned when dropped, also when the
/// connection ends in the middle of a write.
struct SendLease<'a> {
    rep: &'a Replication,
    lease: crate::journal::Lease,
}

impl Drop for SendLease<'_> {
    fn drop(&mut self) {
        self.rep.lock().ring.unpin();
    }
}

/// Writes applied concurrently on the secondary.
/// Between the flushes in the stream (which make everything before them durable at once, as
/// DRBD's barriers do), the secondary checkpoints what it applied this often. Journal space
/// does not wait for it (it is released on *applied*), and what the peer has not made durable
/// stays tracked on the primary (its ranges go to the bitmap if the link drops), so the
/// interval only bounds the resync after a crash of the secondary. A short one would force
/// writeback that a lone node never pays; at the kernel's own expiry (30 s by default) the
/// pages are being written back anyway.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(30);
/// While a resync runs, progress survives a cut only once it is durable: checkpoint often.
const RESYNC_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// How often the primary reports on a verify the secondary asked for.
const VERIFY_REPORT_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(#[from] peer::FrameError),
    #[error("peer refused: {0}")]
    PeerRefused(String),
    #[error("refused peer: {0}")]
    Refused(String),
    #[error("authentication failed: the peer does not know the shared secret")]
    Auth,
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{0}")]
    NeedsResync(String),
    #[error("{0}")]
    SplitBrain(String),
    #[error("link closed: {0}")]
    Closed(&'static str),
    #[error("this node's disk failed: {0}")]
    LocalDisk(String),
    #[error("the peer applied nothing and took no record for {0} s although it answers pings (ko-count): dropped")]
    PeerStuck(u64),
}

/// What `status` shows about the link.
#[derive(Debug, Clone, Default)]
pub struct LinkInfo {
    pub state: &'static str,
    pub peer: Option<NodeState>,
    pub last_error: Option<String>,
}

/// Admin control of the link: `disconnect` makes it standalone; `bump` forces a reconnect
/// (after a role change, so the new handshake sets the stream direction).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCtl {
    pub standalone: bool,
    pub bump: u64,
}

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8], input: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(input);
    m.finalize().into_bytes().into()
}

fn verify(secret: &[u8], input: &[u8], tag: &[u8; 32]) -> bool {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(input);
    m.verify_slice(tag).is_ok()
}

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    if getrandom::getrandom(&mut n).is_err() {
        // Without an RNG a nonce is still unique per process and time; log it.
        tracing::error!("no random source; nonce from time and pid");
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        n[..16].copy_from_slice(&t.to_le_bytes());
        n[16..20].copy_from_slice(&std::process::id().to_le_bytes());
    }
    n
}

/// Reads one frame of the handshake, before the peer proved it knows the secret: nothing it
/// says is worth a buffer, so a frame with a payload is refused before any is read.
async fn read_frame_before_auth<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<(Msg, Option<Buf>, usize), LinkError> {
    let mut p = [0u8; PREFIX_LEN];
    r.read_exact(&mut p).await?;
    let pre = peer::parse_prefix(&p)?;
    if pre.payload_len != 0 {
        return Err(LinkError::Protocol(format!(
            "a {} byte payload before authentication",
            pre.payload_len
        )));
    }
    let mut h = [0u8; peer::MAX_HEADER_LEN];
    r.read_exact(&mut h[..pre.header_len]).await?;
    let msg = peer::decode_header(&p, &pre, &h[..pre.header_len])?;
    Ok((msg, None, PREFIX_LEN + pre.header_len))
}

/// The reason a peer gave for refusing, as it may be logged and shown: printable, bounded
/// (it may come from a peer that never authenticated).
fn peer_refused(reason: String) -> LinkError {
    let clean: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(400)
        .collect();
    LinkError::PeerRefused(clean)
}

/// Reads one frame; the payload (writes only) lands in a pooled, aligned buffer.
async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    res: &Resource,
) -> Result<(Msg, Option<Buf>, usize), LinkError> {
    let mut p = [0u8; PREFIX_LEN];
    r.read_exact(&mut p).await?;
    read_frame_rest(r, res, &p).await
}

/// Slowest link a frame's payload may take, for its timeout: a large record on a slow link
/// is not a dead peer.
const MIN_LINK_RATE: f64 = 256.0 * 1024.0;

/// Reads one frame whose start must arrive within `first` (the liveness timeout: pings keep
/// an idle link busy), and the rest within `first` plus its payload at MIN_LINK_RATE.
async fn read_frame_within<R: AsyncRead + Unpin>(
    r: &mut R,
    res: &Resource,
    first: Duration,
    what: &'static str,
) -> Result<(Msg, Option<Buf>, usize), LinkError> {
    let mut p = [0u8; PREFIX_LEN];
    tokio::time::timeout(first, r.read_exact(&mut p))
        .await
        .map_err(|_| LinkError::Timeout(what))??;
    let payload = peer::parse_prefix(&p).map_or(0, |pre| pre.payload_len);
    let rest = first + Duration::from_secs_f64(f64::from(payload) / MIN_LINK_RATE);
    tokio::time::timeout(rest, read_frame_rest(r, res, &p))
        .await
        .map_err(|_| LinkError::Timeout(what))?
}

/// The rest of a frame whose prefix `p` was read.
async fn read_frame_rest<R: AsyncRead + Unpin>(
    r: &mut R,
    res: &Resource,
    p: &[u8; PREFIX_LEN],
) -> Result<(Msg, Option<Buf>, usize), LinkError> {
    let p = *p;
    let pre = peer::parse_prefix(&p)?;
    let mut h = [0u8; peer::MAX_HEADER_LEN];
    r.read_exact(&mut h[..pre.header_len]).await?;
    let msg = peer::decode_header(&p, &pre, &h[..pre.header_len])?;
    let n = PREFIX_LEN + pre.header_len + pre.payload_len as usize;
    if pre.payload_len == 0 {
        return Ok((msg, None, n));
    }
    let mut buf = res.device().pool.get(pre.payload_len as usize);
    r.read_exact(&mut buf).await?;
    if let Err(e) = peer::check_payload(&msg, &buf) {
        if let Some(rep) = res.rep() {
            rep.stats
                .crc_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        res.device().pool.put(buf);
        return Err(e.into());
    }
    Ok((msg, Some(buf), n))
}

async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, msg: &Msg) -> Result<usize, LinkError> {
    let mut b = Vec::with_capacity(128);
    let n = peer::encode_frame(&mut b, msg, &[]);
    w.write_all(&b).await?;
    Ok(n)
}

async fn timed<T>(
    what: &'static str,
    f: impl std::future::Future<Output = Result<T, LinkError>>,
) -> Result<T, LinkError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, f)
        .await
        .map_err(|_| LinkError::Timeout(what))?
}

/// Refuses the peer with a reason it can log (bounded: it may quote what the peer sent), then
/// fails.
async fn refuse<W: AsyncWrite + Unpin>(w: &mut W, reason: String) -> LinkError {
    let _ = write_msg(w, &Msg::refuse(&reason)).await;
    let _ = w.flush().await;
    LinkError::Refused(reason)
}

/// An authenticated connection and the peer's state at handshake.
pub struct Established {
    rd: BufReader<LinkRead>,
    wr: LinkWrite,
    addr: SocketAddr,
}

/// Hello and mutual authentication (the states follow in [`connection`]).
/// The protocol as it travels in the hello.
fn protocol_letter(p: Protocol) -> u8 {
    match p {
        Protocol::A => b'A',
        Protocol::B => b'B',
        Protocol::C => b'C',
    }
}

/// `dialed`: this node opened the connection (the proofs say which side each made).
async fn handshake(
    res: &Arc<Resource>,
    mut s: TcpStream,
    addr: SocketAddr,
    dialed: bool,
) -> Result<Established, LinkError> {
    let cfg = res.cfg();
    let peer_name = cfg
        .peer
        .as_ref()
        .map(|p| p.name.clone())
        .unwrap_or_default();
    let secret = cfg.secret.clone().unwrap_or_default();
    // At most 1 MiB (the config's bound): fits the hello's field.
    let granularity = u32::try_from(cfg.bitmap_granularity).unwrap_or(u32::MAX);
    let my_nonce = nonce();
    write_msg(
        &mut s,
        &Msg::Hello {
            version: peer::PROTOCOL_VERSION,
            resource: cfg.resource.clone(),
            node: cfg.me.name.clone(),
            nonce: my_nonce,
            encryption: cfg.encryption,
            protocol: protocol_letter(cfg.protocol),
            bitmap_granularity: granularity,
        },
    )
    .await?;
    let (msg, _, _) = timed(
        "waiting for the peer's hello",
        read_frame_before_auth(&mut s),
    )
    .await?;
    let their_nonce = match msg {
        Msg::Hello {
            version,
            resource,
            node,
            nonce,
            encryption,
            protocol,
            bitmap_granularity,
        } => {
            if version != peer::PROTOCOL_VERSION {
                return Err(refuse(
                    &mut s,
                    format!(
                        "protocol version {version} from {addr}; this node speaks {}",
                        peer::PROTOCOL_VERSION
                    ),
                )
                .await);
            }
            if resource != cfg.resource {
                return Err(refuse(
                    &mut s,
                    format!(
                        "peer at {addr} is for resource {resource:?}, not {:?}",
                        cfg.resource
                    ),
                )
                .await);
            }
            if node != peer_name {
                return Err(refuse(
                    &mut s,
                    format!("peer at {addr} calls itself {node:?}; expected {peer_name:?}"),
                )
                .await);
            }
            if encryption != cfg.encryption {
                let name = |on: bool| if on { "aes-256-gcm" } else { "none" };
                return Err(refuse(
                    &mut s,
                    format!(
                        "encryption differs: {node} at {addr} has {:?}, {} has {:?}; set the same `encryption` on both nodes",
                        name(encryption),
                        cfg.me.name,
                        name(cfg.encryption)
                    ),
                )
                .await);
            }
            if protocol != protocol_letter(cfg.protocol) {
                return Err(refuse(
                    &mut s,
                    format!(
                        "replication protocol differs: {node} at {addr} has {}, {} has {}; set the same `protocol` on both nodes",
                        char::from(protocol).escape_default(),
                        cfg.me.name,
                        cfg.protocol
                    ),
                )
                .await);
            }
            if bitmap_granularity != granularity {
                return Err(refuse(
                    &mut s,
                    format!(
                        "bitmap granularity differs: {node} at {addr} has {bitmap_granularity} bytes per bit, {} has {granularity}; set the same `bitmap-granularity` on both nodes",
                        cfg.me.name
                    ),
                )
                .await);
            }
            nonce
        }
        Msg::Refuse { reason } => return Err(peer_refused(reason)),
        other => {
            return Err(LinkError::Protocol(format!(
                "expected hello, got {other:?}"
            )))
        }
    };
    // Both hellos announced the same settings (checked above).
    let party = |name, dialed| peer::AuthParty {
        name,
        dialed,
        protocol: protocol_letter(cfg.protocol),
        encryption: cfg.encryption,
        bitmap_granularity: granularity,
    };
    let proof = mac(
        &secret,
        &peer::auth_input(
            &their_nonce,
            &my_nonce,
            &party(&cfg.me.name, dialed),
            &peer_name,
            &cfg.resource,
        ),
    );
    write_msg(&mut s, &Msg::Auth { mac: proof }).await?;
    let (msg, _, _) = timed(
        "waiting for the peer's proof",
        read_frame_before_auth(&mut s),
    )
    .await?;
    match msg {
        Msg::Auth { mac: tag } => {
            let input = peer::auth_input(
                &my_nonce,
                &their_nonce,
                &party(&peer_name, !dialed),
                &cfg.me.name,
                &cfg.resource,
            );
            if !verify(&secret, &input, &tag) {
                if let Some(rep) = res.rep() {
                    rep.stats
                        .auth_failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let _ = refuse(&mut s, "authentication failed (wrong shared secret)".into()).await;
                return Err(LinkError::Auth);
            }
        }
        Msg::Refuse { reason } => return Err(peer_refused(reason)),
        other => return Err(LinkError::Protocol(format!("expected auth, got {other:?}"))),
    }
    // From here on, with encryption, every byte travels sealed, the state exchange included.
    let _ = s.set_nodelay(true);
    let keys = cfg.encryption.then(|| LinkKeys {
        send: seal::derive_key(
            &secret,
            &cfg.resource,
            &cfg.me.name,
            &my_nonce,
            &their_nonce,
        ),
        recv: seal::derive_key(&secret, &cfg.resource, &peer_name, &their_nonce, &my_nonce),
    });
    let (rd, wr) = link::split(s, keys);
    // Small frames come many to a read; a large payload is read mostly straight into its
    // buffer (a read bigger than the buffer bypasses it), not copied out of this one.
    let rd = BufReader::with_capacity(LINK_READ_BUFFER, rd);
    // The states are exchanged by `connection`, once an earlier connection is gone.
    Ok(Established { rd, wr, addr })
}

/// The state exchange that opens a connection. It runs only once an earlier connection has
/// ended and its writes have landed (`run` settles them first): the primary starts the
/// stream after the applied mark a secondary reports here (after its own crash, it issues
/// new sequences above it), and a mark that moved on after the report would claim records
/// of the new stream. (The primary also clamps acknowledgements to what it sent.)
/// Returns this node's state as sent, and the peer's: both sides decide on the same facts.
async fn exchange_states(
    res: &Resource,
    rd: &mut BufReader<LinkRead>,
    wr: &mut LinkWrite,
) -> Result<(NodeState, NodeState), LinkError> {
    let me = res.node_state();
    write_msg(wr, &Msg::State(me.clone())).await?;
    let (msg, _, _) = timed("waiting for the peer's state", read_frame(rd, res)).await?;
    match msg {
        Msg::State(st) => match marks_in_bounds(&st) {
            Ok(()) => Ok((me, st)),
            Err(why) => Err(refuse(wr, why).await),
        },
        Msg::Refuse { reason } => Err(peer_refused(reason)),
        other => Err(LinkError::Protocol(format!(
            "expected state, got {other:?}"
        ))),
    }
}

/// The peer's state is authenticated, but still input: its sequence marks go into sequence
/// arithmetic, and no real history comes near the bound the superblock keeps them under.
fn marks_in_bounds(st: &NodeState) -> Result<(), String> {
    let marks = [
        st.applied_seq,
        st.durable_seq,
        st.issued_seq,
        st.journal_first_seq,
    ];
    if marks.iter().any(|&m| m >= COUNTER_LIMIT) {
        return Err(format!(
            "the peer's sequence marks (applied, durable, issued, journal) {marks:?} are out of bounds (limit {COUNTER_LIMIT})"
        ));
    }
    Ok(())
}

/// Runs the link for the life of the resource: dials or accepts, handshakes, runs the
/// connection, and starts over after it ends.
pub async fn run(res: Arc<Resource>, listener: TcpListener, mut ctl: watch::Receiver<LinkCtl>) {
    let cfg = res.cfg().clone();
    let Some(peer_cfg) = cfg.peer.clone() else {
        return;
    };
    let dialer = cfg.me.name < peer_cfg.name;
    let dial_addr = peer_cfg.connect_address.or(peer_cfg.replication);
    let (in_tx, mut in_rx) = mpsc::channel::<Established>(1);
    {
        let res = res.clone();
        let ctl = ctl.clone();
        tokio::spawn(accept_loop(res, listener, in_tx, ctl));
    }
    let mut backoff = Duration::from_millis(50);
    let mut pending: Option<Established> = None;
    loop {
        let c = *ctl.borrow_and_update();
        if c.standalone {
            res.set_link_state("standalone", None);
            if ctl.changed().await.is_err() {
                return;
            }
            continue;
        }
        res.set_link_state("connecting", None);
        let est = if let Some(e) = pending.take() {
            Ok(e)
        } else {
            tokio::select! {
                e = in_rx.recv() => match e {
                    Some(e) => Ok(e),
                    None => return,
                },
                r = dial(&res, dial_addr, dialer, backoff) => r,
                _ = ctl.changed() => continue,
            }
        };
        let est = match est {
            Ok(e) => e,
            Err(e) => {
                log_link_error(&res, &e);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let addr = est.addr;
        tracing::info!("peer {} connected from/to {addr}", peer_cfg.name);
        // Its own task: a bug that panics in it ends this connection (reported, and the link
        // torn down as after any other error) instead of leaving writers waiting on a link
        // that nobody runs any more.
        let mut conn = tokio::spawn({
            let res = res.clone();
            async move { connection(&res, est).await }
        });
        // Ended with this loop: `down` aborts the loop, and a connection left running would
        // go on taking acks and issuing resync records after `down` read the marks.
        struct AbortOnDrop(tokio::task::AbortHandle);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _conn_guard = AbortOnDrop(conn.abort_handle());
        let joined = |j: Result<Result<(), LinkError>, tokio::task::JoinError>| match j {
            Ok(r) => r,
            Err(e) if e.is_panic() => {
                tracing::error!(
                    "peer link task panicked (a bug): the link is dropped and restarted"
                );
                Err(LinkError::Closed("the link task panicked"))
            }
            Err(_) => Err(LinkError::Closed("the link task was cancelled")),
        };
        let r = tokio::select! {
            j = &mut conn => joined(j),
            // A fresh authenticated connection replaces this one (the peer restarted).
            e = in_rx.recv() => {
                pending = e;
                Err(LinkError::Closed("replaced by a new connection from the peer"))
            }
            _ = ctl.changed() => Err(LinkError::Closed(ADMIN_CLOSE)),
        };
        if !conn.is_finished() {
            // Wait until it is gone (its state dropped) before the next one may start.
            conn.abort();
            let _ = (&mut conn).await;
        }
        // Writes the stream started here finish (and are made durable) before anything else
        // may write this disk: the next connection's stream, or this node as primary.
        let _ = res.settle_applies().await;
        res.link_down().await;
        match r {
            Ok(()) => tracing::info!("peer {} disconnected", peer_cfg.name),
            Err(e) => {
                log_link_error(&res, &e);
                if matches!(
                    e,
                    LinkError::NeedsResync(_)
                        | LinkError::Refused(_)
                        | LinkError::PeerRefused(_)
                        | LinkError::LocalDisk(_)
                        | LinkError::PeerStuck(_)
                ) {
                    backoff = MAX_BACKOFF;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Why a link closed because this node asked it to (not a fault: logged at info).
const ADMIN_CLOSE: &str = "role change or admin command";

/// The link error for a failed step of a resync or verify: a failed read of this node's disk
/// is a disk error (counted in `disk_errors`, the local-io-error handler runs, and the log
/// names the disk), not a network one.
fn step_error(res: &Resource, e: std::io::Error) -> LinkError {
    match crate::replication::DiskReadError::of(&e) {
        Some(d) => {
            res.device().note_disk_error();
            LinkError::LocalDisk(d.to_string())
        }
        None => LinkError::Io(e),
    }
}

fn log_link_error(res: &Resource, e: &LinkError) {
    match e {
        LinkError::Closed(why) if *why == ADMIN_CLOSE => tracing::info!("peer link: {e}"),
        LinkError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            tracing::debug!("peer link: {e}")
        }
        _ => tracing::warn!("peer link: {e}"),
    }
    res.set_link_state("connecting", Some(e.to_string()));
}

async fn dial(
    res: &Arc<Resource>,
    addr: Option<SocketAddr>,
    dialer: bool,
    backoff: Duration,
) -> Result<Established, LinkError> {
    let Some(addr) = addr.filter(|_| dialer) else {
        // The acceptor side waits for the peer to dial.
        std::future::pending::<()>().await;
        unreachable!();
    };
    tokio::time::sleep(backoff).await;
    let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| LinkError::Timeout("connecting"))??;
    handshake(res, s, addr, true).await
}

async fn accept_loop(
    res: Arc<Resource>,
    listener: TcpListener,
    tx: mpsc::Sender<Established>,
    ctl: watch::Receiver<LinkCtl>,
) {
    // Connections still in their handshake: bounded, so a flood of clients that never speak
    // cannot pile up tasks and sockets. A new one evicts the oldest rather than being turned
    // away: a few idle connections must not keep the real peer out.
    let mut handshakes: std::collections::VecDeque<tokio::task::AbortHandle> = Default::default();
    loop {
        let (s, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("replication accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        handshakes.retain(|h| !h.is_finished());
        if handshakes.len() >= MAX_HANDSHAKES {
            if let Some(oldest) = handshakes.pop_front() {
                oldest.abort();
                tracing::warn!(
                    "{MAX_HANDSHAKES} replication handshakes in progress: the oldest is dropped for one from {addr}"
                );
            }
        }
        let res = res.clone();
        let tx = tx.clone();
        let standalone = ctl.borrow().standalone;
        let task = tokio::spawn(async move {
            if standalone {
                let mut s = s;
                let _ = refuse(
                    &mut s,
                    "node is standalone (blockrep-ctl disconnect)".into(),
                )
                .await;
                return;
            }
            let r = handshake(&res, s, addr, false).await;
            match r {
                Ok(e) => {
                    let _ = tx.send(e).await;
                }
                Err(e) => {
                    tracing::warn!("replication connection from {addr} refused: {e}");
                    res.set_link_error(format!("connection from {addr}: {e}"));
                }
            }
        });
        handshakes.push_back(task.abort_handle());
    }
}

/// Runs one established connection until it fails or ends.
async fn connection(res: &Arc<Resource>, est: Established) -> Result<(), LinkError> {
    let (mut rd, mut wr) = (est.rd, est.wr);
    let (me, peer) = exchange_states(res, &mut rd, &mut wr).await?;
    let my_role = res.role();
    res.set_peer(Some(peer.clone()));
    if me.primary && peer.primary {
        res.run_handler("split-brain");
        return Err(refuse(
            &mut wr,
            "split brain: both nodes are primary; demote one (blockrep-ctl secondary)".into(),
        )
        .await);
    }
    // Size: the primary's export must fit on the secondary (checked again below for whichever
    // side a resync between two secondaries makes the source).
    if me.primary && peer.size < me.size {
        return Err(refuse(&mut wr, too_small_peer(&me, &peer)).await);
    }
    if peer.primary && me.size < peer.size {
        return Err(refuse(&mut wr, too_small_here(&me, &peer)).await);
    }
    let mut decision = state::compare_generations(&gens(&me.gen), &gens(&peer.gen));
    // The journal can bring the peer back only when the generations alone say so; every
    // override below (crashed primary, discard, policy) means regions the journal never saw.
    let journal_ok = matches!(decision, SyncDecision::InSync | SyncDecision::SourceBitmap);
    // `connect --discard-my-data` on one side settles a split brain (or any difference) in
    // favour of the other.
    // Same generation, but one side crashed as primary: its hot extents may hold writes the
    // other never got (DRBD's crashed-primary rule): it is the source for them.
    if decision == SyncDecision::InSync && me.crashed_primary != peer.crashed_primary {
        decision = if me.crashed_primary {
            SyncDecision::SourceBitmap
        } else {
            SyncDecision::TargetBitmap
        };
    }
    // It picks the direction only: a difference no bitmap covers (a fresh or replaced disk)
    // still needs a full sync, and unrelated data is still refused.
    // And only towards good data: never from a disk that is not up to date.
    type Pick = fn(SyncDecision) -> SyncDecision;
    let discard: Option<(u8, Pick, &str)> = if me.discard_my_data && !me.primary {
        Some((
            peer.disk,
            state::discard_mine,
            "discard-my-data: the peer's disk is not up to date, so there is no good data to take; this node keeps its own",
        ))
    } else if peer.discard_my_data && !peer.primary {
        Some((
            me.disk,
            state::discard_peers,
            "discard-my-data on the peer: this node's disk is not up to date, so it cannot be the source",
        ))
    } else {
        None
    };
    if let Some((source_disk, pick, why)) = discard {
        if source_disk != 2 {
            return Err(refuse(&mut wr, why.into()).await);
        }
        decision = pick(decision);
    }
    tracing::info!(
        "generations: this node {:?}, peer {:?}: {decision:?}",
        me.gen,
        peer.gen
    );
    if decision == SyncDecision::SplitBrain && !me.primary && !peer.primary {
        let facts = |s: &NodeState, name: &'static str| state::SbFacts {
            name,
            changes: s.out_of_sync,
            promoted_ms: s.promoted_ms,
        };
        let (mn, pn) = (res.cfg().me.name.clone(), peer_name(res));
        let mine = state::SbFacts {
            name: &mn,
            ..facts(&me, "")
        };
        let theirs = state::SbFacts {
            name: &pn,
            ..facts(&peer, "")
        };
        match state::resolve_split_brain(res.cfg().after_sb_0pri, mine, theirs) {
            Some(true) => {
                tracing::warn!(
                    "split brain resolved by after-sb-0pri {:?}: this node discards its changes",
                    res.cfg().after_sb_0pri
                );
                res.run_handler("split-brain");
                decision = SyncDecision::TargetBitmap;
            }
            Some(false) => {
                tracing::warn!(
                    "split brain resolved by after-sb-0pri {:?}: the peer discards its changes",
                    res.cfg().after_sb_0pri
                );
                res.run_handler("split-brain");
                decision = SyncDecision::SourceBitmap;
            }
            None => {}
        }
    }
    match decision {
        SyncDecision::SplitBrain => {
            res.set_link_state("split-brain", None);
            let why = format!(
                "split brain: both nodes changed the data since generation {:016X}; no data moves. \
                 Resolve with `blockrep-ctl connect --discard-my-data` on the node whose changes are to be dropped",
                me.gen.bitmap
            );
            tracing::error!("{why}");
            res.run_handler("split-brain");
            return Err(LinkError::SplitBrain(
                refuse(&mut wr, why).await.to_string(),
            ));
        }
        SyncDecision::Unrelated => {
            let why = format!(
                "unrelated data: generation {:016X} here, {:016X} on the peer, no common history",
                me.gen.current, peer.gen.current
            );
            return Err(refuse(&mut wr, why).await);
        }
        _ => {}
    }
    let source = matches!(
        decision,
        SyncDecision::InSync | SyncDecision::SourceBitmap | SyncDecision::SourceFull
    );
    // Whatever the roles said at the handshake, data only ever flows from the source to a
    // target that can hold its export.
    let sends = matches!(
        (my_role, peer.primary),
        (Role::Primary, false) | (Role::Secondary, false)
    ) && source
        && (my_role == Role::Primary || decision != SyncDecision::InSync);
    if sends && peer.size < me.size {
        return Err(refuse(&mut wr, too_small_peer(&me, &peer)).await);
    }
    if !source && my_role == Role::Secondary && me.size < peer.size {
        return Err(refuse(&mut wr, too_small_here(&me, &peer)).await);
    }
    match (my_role, peer.primary) {
        (Role::Primary, false) if source => {
            primary_side(res, rd, wr, peer, me, decision, journal_ok).await
        }
        (Role::Primary, false) => Err(refuse(
            &mut wr,
            "the primary has older data than its peer (generations say the peer moved on): demote it and promote the peer".into(),
        )
        .await),
        (Role::Secondary, true) if !matches!(decision, SyncDecision::SourceBitmap | SyncDecision::SourceFull) => {
            secondary_side(res, rd, wr, peer).await
        }
        (Role::Secondary, true) => Err(refuse(
            &mut wr,
            "this secondary has newer data than the primary: demote the primary and promote this node, or discard this node's data".into(),
        )
        .await),
        // Neither is primary: a resync still runs, from the node with the good data.
        (Role::Secondary, false) if source && decision != SyncDecision::InSync => {
            primary_side(res, rd, wr, peer, me, decision, journal_ok).await
        }
        (Role::Secondary, false) if !source => secondary_side(res, rd, wr, peer).await,
        _ => idle_side(res, rd, wr).await,
    }
}

fn too_small_peer(me: &NodeState, peer: &NodeState) -> String {
    format!(
        "peer's device is too small: it has {} bytes of data, this node exports {}",
        peer.size, me.size
    )
}

fn too_small_here(me: &NodeState, peer: &NodeState) -> String {
    format!(
        "this node's device is too small: it has {} bytes of data, the peer exports {}",
        me.size, peer.size
    )
}

fn peer_name(res: &Resource) -> String {
    res.cfg()
        .peer
        .as_ref()
        .map(|p| p.name.clone())
        .unwrap_or_default()
}

pub fn gens(g: &peer::GenIds) -> Generations {
    Generations {
        current: g.current,
        bitmap: g.bitmap,
        history: g.history,
    }
}

/// Decides where the stream starts for a secondary that applied up to `peer.applied_seq`.
fn stream_start(res: &Resource, peer: &NodeState, me: &NodeState) -> Result<u64, LinkError> {
    let rep = res.rep().ok_or(LinkError::Closed("no replication state"))?;
    if rep.verify_marked.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(LinkError::NeedsResync(format!(
            "verify found {} bytes out of sync",
            rep.lock().bitmap.dirty_bytes()
        )));
    }
    if me.crashed_primary {
        return Err(LinkError::NeedsResync(
            "this node crashed as primary: its activity-log extents go to the peer".into(),
        ));
    }
    if peer.crashed_primary || peer.out_of_sync > 0 || peer.discard_my_data {
        return Err(LinkError::NeedsResync(format!(
            "the peer has changes of its own ({} bytes{}): resync",
            peer.out_of_sync,
            if peer.crashed_primary {
                ", crashed as primary"
            } else {
                ""
            }
        )));
    }
    let inner = rep.lock();
    // From the authenticated peer, but still input: no overflow on a nonsense mark.
    let start = peer.applied_seq.checked_add(1).ok_or_else(|| {
        LinkError::Protocol(format!(
            "the peer reports applied sequence {}",
            peer.applied_seq
        ))
    })?;
    if start > inner.issued + 1 {
        return Err(LinkError::NeedsResync(format!(
            "peer has applied sequence {} but this node issued only {}: it has writes this node lacks",
            peer.applied_seq, inner.issued
        )));
    }
    if inner.overflowed {
        return Err(LinkError::NeedsResync(format!(
            "the bitmap holds {} bytes that no journal record carries: the journal overflowed, or verify marked them before a restart",
            inner.bitmap.dirty_bytes()
        )));
    }
    if start <= inner.issued && inner.ring.get(start).is_none() {
        return Err(LinkError::NeedsResync(format!(
            "the journal no longer holds sequence {start} (oldest kept: {:?}): the peer needs a bitmap resync of {} bytes",
            inner.ring.first_seq(),
            inner.bitmap.dirty_bytes()
        )));
    }
    // Sequence numbers are one space per pair: the peer's mark must name this node's record
    // at that sequence, not one another node issued under the same number while the two were
    // apart (a failover). Otherwise the records after it are not what the peer lacks.
    let a = peer.applied_seq;
    match inner.ring.term_at(a) {
        Some(t) if t == peer.applied_term => {}
        mine => {
            return Err(LinkError::NeedsResync(format!(
                "the peer's last applied record (sequence {a}, term {:016X}) is not this node's record there ({}): it followed another stream, so it gets a bitmap resync of {} bytes",
                peer.applied_term,
                mine.map_or_else(|| "not known here".to_string(), |t| format!("term {t:016X}")),
                inner.bitmap.dirty_bytes()
            )))
        }
    }
    Ok(start)
}

async fn primary_side(
    res: &Arc<Resource>,
    mut rd: BufReader<LinkRead>,
    mut wr: LinkWrite,
    peer: NodeState,
    me: NodeState,
    decision: SyncDecision,
    journal_ok: bool,
) -> Result<(), LinkError> {
    let rep = res
        .rep()
        .ok_or(LinkError::Closed("no replication state"))?
        .clone();
    // The secondary sends its dirty bitmap first: regions it changed that this node lacks.
    let (msg, payload, _) = read_frame_within(
        &mut rd,
        res,
        HANDSHAKE_TIMEOUT,
        "waiting for the peer's bitmap",
    )
    .await?;
    let peer_bitmap = match (msg, payload) {
        (Msg::Bitmap { .. }, Some(b)) => {
            let bm = Bitmap::from_bytes(res.device().size(), res.cfg().bitmap_granularity, &b);
            res.device().pool.put(b);
            bm
        }
        (Msg::Refuse { reason }, _) => return Err(peer_refused(reason)),
        (other, _) => {
            return Err(LinkError::Protocol(format!(
                "expected the peer's bitmap, got {other:?}"
            )))
        }
    };
    let journal = match decision {
        _ if peer.disk == 0 => Err(LinkError::NeedsResync(
            "the peer is inconsistent (an interrupted resync)".into(),
        )),
        SyncDecision::InSync | SyncDecision::SourceBitmap if journal_ok => {
            stream_start(res, &peer, &me)
        }
        SyncDecision::SourceFull => Err(LinkError::NeedsResync("full sync".into())),
        _ => Err(LinkError::NeedsResync("generations diverged".into())),
    };
    let (start, resync) = match journal {
        Ok(s) => (s, None),
        Err(e) => {
            let full = decision == SyncDecision::SourceFull;
            let seen = peer.applied_seq.max(peer.issued_seq);
            let start = rep.start_resync(Some(&peer_bitmap), full, res.device().size(), seen);
            let bytes = rep.lock().bitmap.dirty_bytes();
            tracing::info!(
                "resync to the peer ({}): {bytes} bytes{}",
                e,
                if full { ", full" } else { "" }
            );
            write_msg(
                &mut wr,
                &Msg::SyncStart {
                    seq: start,
                    full,
                    bytes,
                },
            )
            .await?;
            (start, Some(bytes))
        }
    };
    tracing::info!(
        "streaming to the peer from sequence {start} (issued {})",
        rep.lock().issued
    );
    // A resync covers everything before its start; a journal catch-up counts only what the
    // peer has synced as durable (what it applied may still be in its page cache).
    let peer_durable = if resync.is_some() {
        start - 1
    } else {
        peer.durable_seq
    };
    rep.set_link_as_primary(res.role() == Role::Primary);
    rep.set_connected(true, start - 1, peer_durable);
    // From here on every record goes to the peer in this stream: none diverges from it, so
    // none starts a new generation (a write that came in between used to start one for
    // nothing, and the check below then dropped the connection once).
    rep.disarm_new_generation();
    // A write while the peer was away may have started a new generation that reached the
    // disk after this node's state went out: the peer would take the pair for in step at the
    // old one. Waited out, then compared; the next connect compares the new one.
    rep.generation_settled().await;
    let now = res.node_state().gen.current;
    if now != me.gen.current {
        tracing::info!(
            "the data generation moved on to {now:016X} while connecting (announced {:016X}): reconnecting",
            me.gen.current
        );
        // Released here, so that the link's end does not arm yet another generation: the
        // data has diverged under this one, and the next connect announces it (re-armed, a
        // write during every handshake would keep moving it and the pair never connect).
        rep.on_disconnect();
        rep.set_connected(false, 0, 0);
        return Err(LinkError::Closed(
            "the data generation changed while connecting",
        ));
    }
    res.set_link_state(
        if resync.is_some() {
            "sync-source"
        } else {
            "connected"
        },
        None,
    );
    // A journal catch-up after the generations diverged (this primary lost the peer and moved
    // on) is a sync too: it ends, in stream order, with the same SyncDone as a bitmap resync.
    let journal_sync = resync.is_none() && decision != SyncDecision::InSync;
    let replies = Arc::new(HashReplies::default());
    // Messages to the secondary beside the stream (verify reports); the sender writes them
    // between journal batches.
    let (side_tx, mut side_rx) = mpsc::channel::<Msg>(4);
    let resync_worker = {
        let rep = rep.clone();
        let res = res.clone();
        let replies = replies.clone();
        async move {
            if let Some(total) = resync {
                res.run_handler("before-resync-source");
                run_resync(&res, &rep, total, &replies).await?;
            } else {
                // The journal replays what the bitmap recorded while the peer was away: once
                // the peer is durable through a flush behind it, the bitmap is cleared, even
                // if writes never pause.
                if rep.lock().bitmap.dirty_bits() > 0 {
                    let seq = rep.begin(Record::Flush).await?;
                    rep.lock().clear_at = Some(seq);
                }
                if journal_sync {
                    finish_sync(&res, &rep, std::time::Instant::now(), 0).await?;
                }
            }
            std::future::pending::<Result<(), LinkError>>().await
        }
    };
    // The last sequence written to this connection: no acknowledgement counts beyond it (a
    // peer's mark from an earlier stream must not cover records it has not been sent).
    let sent_through = std::sync::atomic::AtomicU64::new(start - 1);
    let sent_through = &sent_through;
    let sender = {
        let rep = rep.clone();
        async move {
            let mut next = start;
            loop {
                let n = rep.appended.notified();
                tokio::pin!(n);
                n.as_mut().enable();
                let lease = {
                    let mut g = rep.lock();
                    match g.ring.lease(next, SEND_BATCH) {
                        Some(l) => Some(SendLease {
                            rep: &rep,
                            lease: l,
                        }),
                        None if next <= g.issued => {
                            return Err(LinkError::NeedsResync(format!(
                                "the journal lost sequence {next} while streaming (overflow)"
                            )));
                        }
                        None => None,
                    }
                };
                if let Ok(m) = side_rx.try_recv() {
                    drop(lease);
                    write_msg(&mut wr, &m).await?;
                    continue;
                }
                let Some(lease) = lease else {
                    tokio::select! {
                        _ = &mut n => {}
                        Some(m) = side_rx.recv() => {
                            write_msg(&mut wr, &m).await?;
                        }
                        _ = tokio::time::sleep(PING_INTERVAL) => {
                            write_msg(&mut wr, &Msg::Ping { id: 0 }).await?;
                        }
                    }
                    continue;
                };
                // Straight from the journal's memory: the records stay pinned until written.
                let bytes = lease.lease.bytes();
                wr.write_all(bytes).await?;
                let (last, len) = (lease.lease.last_seq, bytes.len() as u64);
                drop(lease);
                next = last + 1;
                sent_through.store(last, std::sync::atomic::Ordering::Relaxed);
                rep.stats
                    .seq_sent
                    .store(last, std::sync::atomic::Ordering::Relaxed);
                rep.stats
                    .bytes_sent
                    .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
            }
        }
    };
    let verifier = {
        let rep = rep.clone();
        let res = res.clone();
        let replies = replies.clone();
        async move {
            loop {
                let pending = res
                    .verify
                    .lock()
                    .map(|v| v.state == "pending")
                    .unwrap_or(false);
                if !pending {
                    res.verify_kick.notified().await;
                    continue;
                }
                let link = res.link_state();
                if link != "connected" {
                    // A verify asked for on an earlier connection; this one is a resync.
                    res.update_verify(|v| {
                        v.state = "interrupted";
                        v.error = Some(format!(
                            "the link came back as {link}; run verify after the resync"
                        ));
                    });
                    continue;
                }
                if let Err(e) = run_verify(&res, &rep, &replies).await {
                    res.update_verify(|v| {
                        v.state = "failed";
                        v.error = Some(e.to_string());
                    });
                    tracing::error!("verify failed: {e}");
                    return Err(e);
                }
            }
        }
    };
    // A verify the secondary asked for: its progress goes back a few times a second.
    let verify_reporter = {
        let side_tx = side_tx.clone();
        async move {
            // A run that ended before this connection was reported on an earlier one, or its
            // requester saw that link drop: sent again now, it would end a newer request.
            let mut last = res
                .verify_report()
                .filter(|r| !matches!(r.state.as_str(), "pending" | "running"));
            loop {
                tokio::time::sleep(VERIFY_REPORT_INTERVAL).await;
                let r = res.verify_report();
                if r.is_some() && r != last {
                    if let Some(m) = r.clone() {
                        let _ = side_tx.send(Msg::VerifyProgress(m)).await;
                    }
                    last = r;
                }
            }
        }
    };
    let reader = async {
        loop {
            let (msg, payload, n) = read_frame_within(
                &mut rd,
                res,
                PEER_TIMEOUT,
                "no frame from the peer (ping timeout)",
            )
            .await?;
            rep.stats
                .bytes_received
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            if let Some(b) = payload {
                let r = match msg {
                    Msg::Hashes { seq, .. } => replies.deliver(seq, &b),
                    _ => Ok(()),
                };
                res.device().pool.put(b);
                r?;
                if matches!(msg, Msg::Hashes { .. }) {
                    continue;
                }
            }
            match msg {
                Msg::Hashes { seq, .. } => replies.deliver(seq, &[])?,
                Msg::Ack {
                    received,
                    applied,
                    durable,
                } => {
                    let cap = sent_through.load(std::sync::atomic::Ordering::Relaxed);
                    rep.on_ack(received.min(cap), applied.min(cap), durable.min(cap))
                }
                Msg::Ping { .. } => {}
                Msg::State(st) => res.set_peer(Some(st)),
                Msg::VerifyRequest => match res.start_verify_for_peer() {
                    Ok(m) => tracing::info!("{m}"),
                    Err(e) => {
                        tracing::warn!("verify asked by the peer refused: {e}");
                        let _ = side_tx.try_send(Msg::VerifyProgress(
                            peer::VerifyReport {
                                state: "failed".into(),
                                error: format!("refused by the primary: {e}"),
                                ..Default::default()
                            }
                            .bounded(),
                        ));
                    }
                },
                Msg::Refuse { reason } => return Err(peer_refused(reason)),
                other => {
                    return Err(LinkError::Protocol(format!(
                        "unexpected message from the secondary: {other:?}"
                    )))
                }
            }
        }
    };
    // A peer that answers pings but neither takes nor applies a record (its disk hangs, it
    // stopped reading) would hold every writer waiting on it: past ko-count link timeouts
    // without progress while records wait, the link drops and the bitmap takes over (DRBD's
    // ko-count).
    let watchdog = {
        let rep = rep.clone();
        let limit = PEER_TIMEOUT * res.cfg().ko_count;
        async move {
            if limit.is_zero() {
                return std::future::pending::<Result<(), LinkError>>().await;
            }
            // Progress is either mark moving: a long flush on the peer holds its applied
            // mark while it still takes new records, which is not stuck.
            let marks = || {
                let a = rep.acks();
                (a.received, a.applied)
            };
            let mut last = marks();
            let mut since = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = marks();
                let waiting = rep.lock().issued > now.1;
                if now != last || !waiting {
                    last = now;
                    since = tokio::time::Instant::now();
                } else if since.elapsed() >= limit {
                    return Err(LinkError::PeerStuck(limit.as_secs()));
                }
            }
        }
    };
    let r: Result<(), LinkError> = tokio::select! {
        r = sender => r,
        r = reader => r,
        r = resync_worker => r,
        r = verifier => r,
        r = verify_reporter => r,
        r = watchdog => r,
    };
    if let Ok(mut p) = res.resync.lock() {
        *p = None;
    }
    res.update_verify(|v| {
        // A run still waiting to start ends too, or it would refuse every later one.
        if v.state == "running" || v.state == "pending" {
            v.state = "interrupted";
            v.error = Some("the link to the peer dropped during verify".into());
            tracing::warn!(
                "verify run {} interrupted by the link: {} of {} bytes compared, {} regions differ so far",
                v.run,
                v.done,
                v.total,
                v.differ_regions
            );
        }
    });
    r
}

/// Online verify as the stream's source: every region of the device is read here at a point
/// of the stream (see [`Replication::verify_chunk`]) and the peer hashes its copy at the
/// same point (a `HashReq` record it handles in order), so writes that go on meanwhile are on
/// both sides of the comparison or on neither. Differing blocks are marked out of sync here;
/// the next connect resyncs them.
async fn run_verify(
    res: &Arc<Resource>,
    rep: &Arc<Replication>,
    replies: &HashReplies,
) -> Result<(), LinkError> {
    let size = res.device().size();
    let block = res.cfg().bitmap_granularity;
    let span = (1u64 << 20).min(u64::from(peer::MAX_HASH_SPAN)).max(block);
    let rate = res.cfg().resync_rate;
    let file = crate::replication::open_for_resync(&res.cfg().me.backing)?;
    let started = std::time::Instant::now();
    let run = res.verify.lock().map(|v| v.run).unwrap_or(0);
    res.update_verify(|v| {
        v.state = "running";
        v.total = size;
    });
    tracing::info!("verify run {run}: comparing {size} bytes with the peer");
    /// Requests in flight: enough to keep both disks and the link busy.
    const WINDOW: usize = 8;
    let mut pending: std::collections::VecDeque<(u64, u64, u64, Vec<[u8; 32]>)> =
        std::collections::VecDeque::new();
    let mut buf = Vec::new();
    let mut at = 0u64;
    let (mut done, mut regions, mut bytes) = (0u64, 0u64, 0u64);
    loop {
        while pending.len() < WINDOW && at < size {
            let len = span.min(size - at);
            let seq = rep
                .verify_chunk(&file, at, len as u32, block as u32, &mut buf)
                .await
                .map_err(|e| step_error(res, e))?;
            let mine = crate::replication::block_hashes(&buf[..len as usize], block as usize);
            replies.expect(seq, mine.len());
            pending.push_back((seq, at, len, mine));
            at += len;
        }
        let Some((seq, off, len, mine)) = pending.pop_front() else {
            break;
        };
        let theirs = replies.take(seq).await?;
        for i in crate::replication::differing_blocks(&mine, &theirs) {
            let s = off + i as u64 * block;
            let n = block.min(off + len - s);
            rep.mark_out_of_sync(s, n);
            regions += 1;
            bytes += n;
            tracing::warn!("verify: {s}+{n} differs on the peer");
        }
        done += len;
        res.update_verify(|v| {
            v.done = done;
            v.differ_regions = regions;
            v.differ_bytes = bytes;
        });
        if rate > 0 {
            let due = Duration::from_secs_f64(done as f64 / rate as f64);
            let el = started.elapsed();
            if due > el {
                tokio::time::sleep(due - el).await;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        "verify run {run} done: {regions} regions ({bytes} bytes) differ, {size} bytes compared in {secs:.1} s{}",
        if regions > 0 {
            "; they are marked out of sync: disconnect and connect to resync them"
        } else {
            ""
        }
    );
    res.update_verify(|v| {
        v.state = "done";
        v.done = size;
    });
    Ok(())
}

/// The source's resync: every dirty region goes out as a stream record, paced by the
/// configured rate; then a SyncDone record, and once the target applied it, the bitmap
/// generation is forgotten.
async fn run_resync(
    res: &Arc<Resource>,
    rep: &Arc<Replication>,
    total: u64,
    replies: &HashReplies,
) -> Result<(), LinkError> {
    let size = res.device().size();
    let rate = res.cfg().resync_rate;
    let csums = res.cfg().csums;
    let block = res.cfg().bitmap_granularity;
    let file = crate::replication::open_for_resync(&res.cfg().me.backing)?;
    let started = std::time::Instant::now();
    if let Ok(mut p) = res.resync.lock() {
        *p = Some((total, 0, started));
    }
    struct Done<'a>(&'a Replication, &'a std::fs::File);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0
                .resyncing
                .store(false, std::sync::atomic::Ordering::SeqCst);
            self.0
                .resync_floor
                .store(0, std::sync::atomic::Ordering::SeqCst);
            // Whatever readahead cached despite the per-chunk drops (a folio left marked by
            // another reader ramps readahead up on this descriptor too), in large folios that
            // a chunk's drop cannot split: gone now, clean pages only. Off the runtime's one
            // thread: on a large device the walk (and the writeback it starts for dirty
            // pages) takes a while.
            if let (Ok(f), Ok(rt)) = (self.1.try_clone(), tokio::runtime::Handle::try_current()) {
                rt.spawn_blocking(move || crate::replication::drop_cached(&f, 0, 0));
            }
        }
    }
    let _done = Done(rep, &file);
    rep.resync_floor.store(
        res.cfg().resync_rate_min,
        std::sync::atomic::Ordering::SeqCst,
    );
    let mut buf = Vec::new();
    let mut at = 0u64;
    let mut sent = 0u64;
    let mut data_bytes = 0u64;
    let mut equal_bytes = 0u64;
    // A chunk is one journal record: keep it well inside the journal.
    let chunk = (1u64 << 20)
        .min(res.cfg().journal_size / 8)
        .max(block)
        .min(u64::from(peer::MAX_HASH_SPAN));
    // Checksum resync: hash requests in flight ahead of the regions being decided.
    const CSUM_WINDOW: usize = 16;
    let mut asked: std::collections::VecDeque<(u64, u64, u64)> = Default::default();
    if csums {
        tracing::info!("checksum resync (sha256 per {block} bytes): only differing regions move");
    }
    loop {
        // One region (or, with checksums, one answered hash request) per turn.
        let progressed = if csums {
            while asked.len() < CSUM_WINDOW {
                let Some((off, len)) = rep.next_dirty(at, chunk, size) else {
                    break;
                };
                let count = peer::hash_count(len as u32, block as u32).ok_or_else(|| {
                    LinkError::Protocol(format!("resync region {off}+{len} out of hash bounds"))
                })?;
                let seq = rep
                    .hash_request(off, len as u32, block as u32)
                    .await
                    .map_err(|e| step_error(res, e))?;
                replies.expect(seq, count);
                asked.push_back((seq, off, len));
                at = off + len;
            }
            match asked.pop_front() {
                Some((seq, off, len)) => {
                    let hashes = replies.take(seq).await?;
                    let mut pos = 0u64;
                    while pos < len {
                        let first = (pos / block) as usize;
                        let (n, equal, zero) = rep
                            .resync_csum_chunk(
                                &file,
                                off + pos,
                                len - pos,
                                block,
                                &hashes[first..],
                                &mut buf,
                            )
                            .await
                            .map_err(|e| step_error(res, e))?;
                        pos += n;
                        sent += n;
                        if equal {
                            equal_bytes += n;
                        } else if !zero {
                            data_bytes += n;
                        }
                    }
                    true
                }
                None => false,
            }
        } else {
            match rep.next_dirty(at, chunk, size) {
                Some((off, len)) => {
                    let (_, zero) = rep
                        .resync_chunk(&file, off, len, &mut buf)
                        .await
                        .map_err(|e| step_error(res, e))?;
                    at = (off + len).min(size);
                    sent += len;
                    if !zero {
                        data_bytes += len;
                    }
                    true
                }
                None => false,
            }
        };
        if !progressed {
            if at == 0 {
                break;
            }
            // End of a sweep: once what was sent is applied, sweep again for what is left
            // (regions re-dirtied meanwhile).
            let mut rx = rep.subscribe_acks();
            while rep.resync_pending() > 0 {
                if !rep.acks().connected {
                    return Err(LinkError::Closed("peer lost during resync"));
                }
                let _ = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
            }
            at = 0;
            continue;
        }
        if let Ok(mut p) = res.resync.lock() {
            *p = Some((total.max(sent), sent, started));
        }
        // Rate limit on the data that travels (zero and equal regions are a header each).
        if rate > 0 {
            let due = Duration::from_secs_f64(data_bytes as f64 / rate as f64);
            let el = started.elapsed();
            if due > el {
                tokio::time::sleep(due - el).await;
            }
        }
        // The sender and the ack reader share this task: a chunk that needed no waiting (a
        // zero region, journal space free) must not keep them from running, or the peer sees
        // no frame, not even a ping, for the whole sweep.
        tokio::task::yield_now().await;
    }
    if csums {
        tracing::info!(
            "checksum resync: {sent} bytes checked, {equal_bytes} equal (not sent), {data_bytes} sent as data, {} zero",
            sent - equal_bytes - data_bytes
        );
    }
    finish_sync(res, rep, started, sent).await?;
    if let Ok(mut p) = res.resync.lock() {
        *p = None;
    }
    Ok(())
}

/// Ends a sync: a SyncDone record after everything sent; once the target applied it, both
/// sides are on this node's generation and the bitmap generation is forgotten.
async fn finish_sync(
    res: &Arc<Resource>,
    rep: &Arc<Replication>,
    started: std::time::Instant,
    sent: u64,
) -> Result<(), LinkError> {
    let gen = res.node_state().gen;
    let seq = rep.begin(Record::SyncDone { gen }).await?;
    let mut rx = rep.subscribe_acks();
    let _ = rx.wait_for(|a| !a.connected || a.applied >= seq).await;
    if rep.acks().applied >= seq {
        let secs = started.elapsed().as_secs_f64();
        tracing::info!("resync done: {sent} bytes in {secs:.1} s; the peer is up to date");
        res.set_link_state("connected", None);
        // A crashed primary that is secondary now: its crash is handled (its extents reached
        // the peer), so a later crash as secondary is not taken for a primary's.
        let secondary = res.role() != Role::Primary;
        // A promotion while this runs commits was_primary and its time: then nothing below
        // may touch either (a primary marked as not one would not be recovered as a crashed
        // primary).
        let promoted_ms = res.node_state().promoted_ms;
        // A secondary source's data is the stream it just sent (its records were read from
        // it, or are its own earlier writes): it counts as applied here, under its own term,
        // as a demoted primary's own writes do, so that a node promoted over this one later
        // catches it up from the journal instead of resyncing. Synced first: the mark says
        // the data is durable.
        let own =
            if secondary && res.device().local_flush().await.is_ok() && res.role() != Role::Primary
            {
                let mut g = rep.lock();
                if seq > g.applied {
                    g.applied = seq;
                    g.applied_term = g.ring.term_at(seq).unwrap_or(0);
                }
                Some((g.applied, g.applied_term))
            } else {
                None
            };
        res.commit_meta(move |sb| {
            sb.gen = state::after_sync(sb.gen);
            if secondary && sb.promoted_ms == promoted_ms {
                sb.was_primary = false;
                if let Some(mark) = own {
                    sb.advance_applied(mark);
                }
            }
        })
        .await
        .map_err(|e| LinkError::Protocol(e.to_string()))?;
        res.sync_source_done();
        res.run_handler("after-resync-source");
    }
    if let Ok(mut p) = res.resync.lock() {
        *p = None;
    }
    Ok(())
}

/// How long the source waits for the answer to one hash request.
const HASH_ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// Expected hash answers: request sequence → (number of hashes, the answer once arrived).
type ReplyMap = std::collections::HashMap<u64, (usize, Option<Vec<[u8; 32]>>)>;

/// Hash answers (`Msg::Hashes`) the source waits for, by request sequence. Answers nobody
/// waits for (a request replayed from the journal after a reconnect) are dropped, so memory
/// is bounded by what the workers asked for.
#[derive(Default)]
struct HashReplies {
    st: Mutex<ReplyMap>,
    arrived: Notify,
}

impl HashReplies {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReplyMap> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A request of sequence `seq` for `count` block hashes went out.
    fn expect(&self, seq: u64, count: usize) {
        self.lock().insert(seq, (count, None));
    }

    /// An answer arrived (its payload crc already checked). A wrong number of hashes is a
    /// protocol error.
    fn deliver(&self, seq: u64, payload: &[u8]) -> Result<(), LinkError> {
        let mut g = self.lock();
        let Some((count, slot)) = g.get_mut(&seq) else {
            return Ok(());
        };
        if payload.len() != *count * peer::HASH_LEN || slot.is_some() {
            return Err(LinkError::Protocol(format!(
                "hash answer for sequence {seq}: {} bytes, expected {} hashes",
                payload.len(),
                count
            )));
        }
        *slot = Some(
            payload
                .chunks_exact(peer::HASH_LEN)
                .map(|c| {
                    let mut h = [0u8; 32];
                    h.copy_from_slice(c);
                    h
                })
                .collect(),
        );
        drop(g);
        self.arrived.notify_waiters();
        Ok(())
    }

    /// Waits for the answer to `seq` (the connection's end drops the waiting worker); a peer
    /// that stays silent much longer than its stream could take ends the connection.
    async fn take(&self, seq: u64) -> Result<Vec<[u8; 32]>, LinkError> {
        tokio::time::timeout(HASH_ANSWER_TIMEOUT, self.wait(seq))
            .await
            .map_err(|_| {
                self.lock().remove(&seq);
                LinkError::Timeout("no answer to a hash request")
            })
    }

    async fn wait(&self, seq: u64) -> Vec<[u8; 32]> {
        loop {
            let n = self.arrived.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            {
                let mut g = self.lock();
                if let Some((_, Some(_))) = g.get(&seq) {
                    if let Some((_, Some(h))) = g.remove(&seq) {
                        return h;
                    }
                }
            }
            n.await;
        }
    }
}

/// Counts a task among the waiters of an [`ApplyState`] counter while it waits (also when
/// its future is dropped mid-wait).
struct Waiting<'a> {
    ap: &'a Applier,
    counter: fn(&mut ApplyState) -> &mut usize,
}

impl<'a> Waiting<'a> {
    fn new(ap: &'a Applier, counter: fn(&mut ApplyState) -> &mut usize) -> Self {
        *counter(&mut ap.lock()) += 1;
        Waiting { ap, counter }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        *(self.counter)(&mut self.ap.lock()) -= 1;
    }
}

/// Tracks the secondary's progress: which sequences finished, the contiguous mark, durability.
struct ApplyState {
    ranges: Ranges,
    done: BTreeSet<u64>,
    received: u64,
    applied: u64,
    /// The term of the record at `applied`.
    applied_term: u64,
    /// Where the term changes among the records received: `(first sequence, term)`, the
    /// first entry covering `applied`. Terms change only at a restart or promotion of the
    /// issuer, so an honest stream has a few; checked on receipt (the bound drops the link).
    terms: std::collections::VecDeque<(u64, u64)>,
    durable: u64,
    /// Tasks waiting for an earlier overlapping write ([`Applier::wait_turn`]) and for the
    /// applied mark ([`Applier::wait_applied`]): a finished record wakes them only when
    /// there are any (usually none: a wake-up per record would cost more than its apply).
    range_waiters: usize,
    mark_waiters: usize,
}

/// Most term changes among received but unapplied records.
const MAX_TERM_CHANGES: usize = crate::replication::APPLY_WINDOW + 2;

struct Applier {
    res: Arc<Resource>,
    st: Mutex<ApplyState>,
    range_done: Notify,
    /// Wakes the acker when a mark moved (one waiter, so a permit is kept: no change is
    /// missed, and many changes before it runs cost one wake-up).
    progressed: Notify,
    /// Wakes the tasks waiting for the applied mark (flushes, FUA writes, SyncDone).
    mark_moved: Notify,
    window: Arc<Semaphore>,
    persist: tokio::sync::Mutex<()>,
    /// Protocol B: the receiver asks the acker to report a receipt before the write is
    /// applied, because the primary's client is waiting for exactly that.
    ack_receipt_now: std::sync::atomic::AtomicBool,
    /// A write, flush or commit of the stream failed on this disk. From then on nothing is
    /// acknowledged and the link drops: the primary keeps every record this node did not
    /// acknowledge, and puts it in its bitmap.
    failed: watch::Sender<Option<String>>,
}

impl Applier {
    fn lock(&self) -> std::sync::MutexGuard<'_, ApplyState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The marks the acker reports: (received, applied, durable).
    fn marks(&self) -> (u64, u64, u64) {
        let s = self.lock();
        (s.received, s.applied, s.durable)
    }

    /// Tells the acker, and any task waiting for the applied mark, that a mark moved.
    fn publish(&self) {
        let waiters = self.lock().mark_waiters;
        self.progressed.notify_one();
        if waiters > 0 {
            self.mark_moved.notify_waiters();
        }
    }

    /// Returns once every record through `seq` is applied.
    async fn wait_applied(&self, seq: u64) {
        if self.lock().applied >= seq {
            return;
        }
        let _counted = Waiting::new(self, |s| &mut s.mark_waiters);
        loop {
            // Registered before the re-check, so that a publish in between is not missed.
            let n = self.mark_moved.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.lock().applied >= seq {
                break;
            }
            n.await;
        }
    }

    /// Returns once no earlier record with an overlapping range is in flight: overlapping
    /// records are applied in stream order.
    async fn wait_turn(&self, seq: u64, range: (u64, u64)) {
        if !self.lock().ranges.blocked(seq, range) {
            return;
        }
        let _counted = Waiting::new(self, |s| &mut s.range_waiters);
        loop {
            let n = self.range_done.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if !self.lock().ranges.blocked(seq, range) {
                break;
            }
            n.await;
        }
    }

    /// Records a local disk failure (the first one wins) and marks this replica inconsistent.
    async fn fail(&self, why: String) {
        tracing::error!("{why}; this replica is inconsistent and the link drops");
        self.failed.send_if_modified(|f| {
            let first = f.is_none();
            if first {
                *f = Some(why);
            }
            first
        });
        if let Err(e) = self
            .res
            .commit_meta(|sb| sb.disk = DiskState::Inconsistent)
            .await
        {
            tracing::error!("recording the inconsistent disk: {e}");
        }
    }

    fn failure(&self) -> Option<LinkError> {
        self.failed.borrow().clone().map(LinkError::LocalDisk)
    }

    /// Marks `seq` applied and advances the contiguous mark.
    fn finish(&self, seq: u64) {
        let range_waiters = {
            let mut s = self.lock();
            s.ranges.remove(seq);
            // Usually the next record in order: no detour through the set.
            if seq == s.applied + 1 {
                s.applied = seq;
            } else {
                s.done.insert(seq);
            }
            while s.done.first() == Some(&(s.applied + 1)) {
                s.applied += 1;
                let a = s.applied;
                s.done.remove(&a);
            }
            let a = s.applied;
            while s.terms.get(1).is_some_and(|&(from, _)| from <= a) {
                s.terms.pop_front();
            }
            let term = s.terms.front().map_or(s.applied_term, |&(_, t)| t);
            s.applied_term = term;
            let range_waiters = s.range_waiters;
            drop(s);
            if let Some(rep) = self.res.rep() {
                let mut g = rep.lock();
                g.applied = a;
                g.applied_term = term;
            }
            range_waiters
        };
        if range_waiters > 0 {
            self.range_done.notify_waiters();
        }
        self.publish();
    }

    /// Makes everything applied so far durable: data fdatasync, then the applied mark in the
    /// superblock. Adopts the primary's generation once caught up.
    ///
    /// Never after a failure: a flush that fails may have dropped the dirty pages, so a later
    /// one that succeeds proves nothing about them.
    async fn make_durable(&self) -> Result<u64, LinkError> {
        let _one = self.persist.lock().await;
        if let Some(e) = self.failure() {
            return Err(e);
        }
        let (upto, term) = {
            let s = self.lock();
            (s.applied, s.applied_term)
        };
        if upto <= self.lock().durable {
            return Ok(upto);
        }
        if let Err(e) = self.res.device().local_flush().await {
            let why = format!(
                "flushing the applied stream through sequence {upto} failed (NBD error {e})"
            );
            self.fail(why.clone()).await;
            return Err(LinkError::LocalDisk(why));
        }
        if let Err(e) = self
            .res
            .commit_meta(move |sb| sb.advance_applied((upto, term)))
            .await
        {
            let why = format!("persisting the applied sequence {upto}: {e}");
            self.fail(why.clone()).await;
            return Err(LinkError::LocalDisk(why));
        }
        self.lock().durable = upto;
        self.publish();
        Ok(upto)
    }
}

/// Whether the secondary must acknowledge its progress now rather than within [`ACK_DEFER`]:
/// when a mark moved that writes on the primary wait for. That is the durable mark under
/// every protocol (flushes and FUA writes), the receipt under B and the write under C.
/// Under A no client write waits for the peer; acknowledgements release the journal, so
/// writers waiting for space in a full journal, and the end of a resync, wait up to
/// [`ACK_DEFER`] longer.
fn ack_is_urgent(protocol: Protocol, sent: (u64, u64, u64), now: (u64, u64, u64)) -> bool {
    let (received, applied, durable) = now;
    durable > sent.2
        || match protocol {
            Protocol::A => false,
            Protocol::B => received > sent.0,
            Protocol::C => applied > sent.1,
        }
}

async fn secondary_side(
    res: &Arc<Resource>,
    mut rd: BufReader<LinkRead>,
    mut wr: LinkWrite,
    peer: NodeState,
) -> Result<(), LinkError> {
    let rep = res
        .rep()
        .ok_or(LinkError::Closed("no replication state"))?
        .clone();
    // Writes of an earlier stream are all finished before this one starts (they share the
    // window), so none lands after a newer write to the same range.
    rep.quiesce_applies().await;
    let (applied0, term0) = rep.applied_mark();
    // Only what is synced and committed counts as durable, whatever an earlier stream did.
    let durable0 = res.node_state().durable_seq;
    let ap = Arc::new(Applier {
        res: res.clone(),
        st: Mutex::new(ApplyState {
            ranges: Ranges::default(),
            done: BTreeSet::new(),
            received: applied0,
            applied: applied0,
            applied_term: term0,
            terms: std::collections::VecDeque::from([(applied0, term0)]),
            durable: durable0,
            range_waiters: 0,
            mark_waiters: 0,
        }),
        range_done: Notify::new(),
        progressed: Notify::new(),
        mark_moved: Notify::new(),
        window: rep.apply_window.clone(),
        persist: tokio::sync::Mutex::new(()),
        ack_receipt_now: std::sync::atomic::AtomicBool::new(false),
        failed: watch::channel(None).0,
    });
    // The earlier stream's tail becomes durable now, not at the next checkpoint.
    ap.make_durable().await?;
    // Under B the primary acknowledges a write once this node has received it.
    let ack_on_receipt = res.cfg().protocol == Protocol::B;
    {
        let bytes = rep.lock().bitmap.to_bytes();
        let mut f = Vec::with_capacity(bytes.len() + 64);
        peer::encode_frame(
            &mut f,
            &Msg::Bitmap {
                len: bytes.len() as u32,
                crc: crc32c::crc32c(&bytes),
            },
            &bytes,
        );
        wr.write_all(&f).await?;
    }
    tracing::info!(
        "receiving from the primary from sequence {} (primary issued {})",
        applied0 + 1,
        peer.issued_seq
    );
    res.set_link_state("connected", None);
    // Answers to hash requests (checksum resync, verify), sent by the acker.
    let (reply_tx, mut reply_rx) = mpsc::channel::<Vec<u8>>(64);
    // Hash requests read this node's data through their own handle, off the async threads.
    let hash_file = Arc::new(crate::replication::open_for_resync(&res.cfg().me.backing)?);
    // Hash requests read (up to MAX_HASH_SPAN each) a few at a time: bounded memory.
    let hash_reads = Arc::new(Semaphore::new(8));
    let protocol = res.cfg().protocol;
    let acker = {
        let mut failed = ap.failed.subscribe();
        let ap = ap.clone();
        async move {
            let mut ack = true;
            // What the primary was last told, and until when a change it does not wait for
            // may be held back (one ack then covers many such changes).
            let mut sent: Option<(u64, u64, u64)> = None;
            let mut deferred: Option<tokio::time::Instant> = None;
            loop {
                if ack {
                    let marks = ap.marks();
                    let (received, applied, durable) = marks;
                    // After a local disk failure nothing more is acknowledged; the primary is
                    // told why, so that it backs off before trying again. (A failure while
                    // no ack was due wakes the select below, which then asks for one.)
                    if let Some(e) = ap.failure() {
                        let _ = write_msg(&mut wr, &Msg::refuse(&e.to_string())).await;
                        return Err(e);
                    }
                    let due = match sent {
                        None => true,
                        Some(last) => {
                            ack_is_urgent(protocol, last, marks)
                                || deferred.is_some_and(|t| t <= tokio::time::Instant::now())
                        }
                    };
                    if due {
                        write_msg(
                            &mut wr,
                            &Msg::Ack {
                                received,
                                applied,
                                durable,
                            },
                        )
                        .await?;
                        sent = Some(marks);
                        deferred = None;
                    } else if sent != Some(marks) && deferred.is_none() {
                        deferred = Some(tokio::time::Instant::now() + ACK_DEFER);
                    }
                }
                ack = true;
                tokio::select! {
                    _ = tokio::time::sleep_until(deferred.unwrap_or_else(tokio::time::Instant::now)), if deferred.is_some() => {}
                    _ = failed.changed() => {}
                    _ = ap.res.verify_kick.notified() => {
                        let ask = ap
                            .res
                            .verify
                            .lock()
                            .map(|v| v.on_peer && v.state == "pending")
                            .unwrap_or(false);
                        if ask {
                            write_msg(&mut wr, &Msg::VerifyRequest).await?;
                        }
                        ack = false;
                    }
                    _ = ap.progressed.notified() => {
                        // Let the applies queued behind this one finish first: one ack then
                        // covers all of them; unless a receipt is to go out before its apply.
                        if !ap
                            .ack_receipt_now
                            .swap(false, std::sync::atomic::Ordering::Relaxed)
                        {
                            tokio::task::yield_now().await;
                        }
                    }
                    Some(frame) = reply_rx.recv() => {
                        wr.write_all(&frame).await?;
                        ack = false;
                    }
                    _ = tokio::time::sleep(PING_INTERVAL) => {
                        write_msg(&mut wr, &Msg::Ping { id: 0 }).await?;
                    }
                }
            }
        }
    };
    let durability = {
        let ap = ap.clone();
        async move {
            let mut last = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(RESYNC_CHECKPOINT_INTERVAL).await;
                let every = if ap.res.link_state() == "sync-target" {
                    RESYNC_CHECKPOINT_INTERVAL
                } else {
                    CHECKPOINT_INTERVAL
                };
                if last.elapsed() >= every {
                    ap.make_durable().await?;
                    last = tokio::time::Instant::now();
                }
            }
        }
    };
    let receiver = {
        let ap = ap.clone();
        let rep = rep.clone();
        async move {
            loop {
                let (msg, payload, n) = read_frame_within(
                    &mut rd,
                    res,
                    PEER_TIMEOUT,
                    "no frame from the primary (ping timeout)",
                )
                .await?;
                rep.stats
                    .bytes_received
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                let seq = match msg.seq() {
                    Some(s) => s,
                    None => match msg {
                        Msg::Ping { .. } => continue,
                        Msg::SyncStart { seq, .. } if seq == 0 || seq >= COUNTER_LIMIT => {
                            return Err(LinkError::Protocol(format!(
                                "resync start at sequence {seq} (sequences run from 1 to {COUNTER_LIMIT})"
                            )))
                        }
                        Msg::SyncStart { seq, full, bytes } => {
                            // This node becomes the sync target: inconsistent until SyncDone.
                            tracing::info!(
                                "resync from the primary: {bytes} bytes{}, stream from sequence {seq}",
                                if full { ", full" } else { "" }
                            );
                            res.run_handler("before-resync-target");
                            res.set_link_state("sync-target", None);
                            res.commit_meta(|sb| sb.disk = DiskState::Inconsistent)
                                .await
                                .map_err(|e| LinkError::Protocol(e.to_string()))?;
                            // The record before the resync's stream is not one this node
                            // holds: term 0 until the stream's own records are applied.
                            {
                                let mut s = ap.lock();
                                s.received = seq - 1;
                                s.applied = seq - 1;
                                s.applied_term = 0;
                                s.terms = std::collections::VecDeque::from([(seq - 1, 0)]);
                                s.durable = seq - 1;
                            }
                            {
                                let mut g = rep.lock();
                                g.applied = seq - 1;
                                g.applied_term = 0;
                            }
                            ap.publish();
                            continue;
                        }
                        Msg::State(st) => {
                            res.set_peer(Some(st));
                            continue;
                        }
                        Msg::VerifyProgress(r) => {
                            res.verify_reported(&r);
                            continue;
                        }
                        Msg::Refuse { reason } => return Err(peer_refused(reason)),
                        other => {
                            return Err(LinkError::Protocol(format!(
                                "unexpected message from the primary: {other:?}"
                            )))
                        }
                    },
                };
                {
                    let mut s = ap.lock();
                    if seq <= s.received {
                        // Already have it (a replay after reconnect): skip.
                        continue;
                    }
                    if Some(seq) != s.received.checked_add(1) {
                        rep.stats
                            .protocol_errors
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return Err(LinkError::Protocol(format!(
                            "sequence gap: expected {}, got {seq}",
                            s.received.saturating_add(1)
                        )));
                    }
                    s.received = seq;
                    let term = msg.term().unwrap_or(0);
                    if s.terms.back().map(|&(_, t)| t) != Some(term) {
                        if s.terms.len() >= MAX_TERM_CHANGES {
                            return Err(LinkError::Protocol(format!(
                                "{MAX_TERM_CHANGES} term changes among unapplied records"
                            )));
                        }
                        s.terms.push_back((seq, term));
                    }
                }
                ap.publish();
                let permit = ap
                    .window
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| LinkError::Closed("apply window closed"))?;
                match msg {
                    Msg::HashReq {
                        offset, len, block, ..
                    } => {
                        let count = peer::hash_count(len, block);
                        let end = offset.checked_add(u64::from(len));
                        let (Some(count), Some(end)) = (count, end) else {
                            return Err(LinkError::Protocol(format!(
                                "hash request {offset}+{len} in blocks of {block} is out of bounds"
                            )));
                        };
                        if end > res.device().size() {
                            return Err(LinkError::Protocol(format!(
                                "hash request at {offset}+{len} is past this device's {} bytes",
                                res.device().size()
                            )));
                        }
                        // In stream order: earlier writes to the range are applied first,
                        // later ones wait until it is read.
                        ap.lock().ranges.insert(seq, (offset, end));
                        let ap = ap.clone();
                        let tx = reply_tx.clone();
                        let file = hash_file.clone();
                        let reads = hash_reads.clone();
                        tokio::spawn(async move {
                            ap.wait_turn(seq, (offset, end)).await;
                            let one = reads.acquire_owned().await;
                            let hashes = tokio::task::spawn_blocking(move || {
                                use std::os::unix::fs::FileExt;
                                let mut buf = vec![0u8; len as usize];
                                file.read_exact_at(&mut buf, offset).map(|_| {
                                    crate::replication::drop_cached(&file, offset, u64::from(len));
                                    buf.chunks(block as usize)
                                        .flat_map(crate::replication::sha256)
                                        .collect::<Vec<u8>>()
                                })
                            })
                            .await;
                            let payload = match hashes {
                                Ok(Ok(h)) => h,
                                other => {
                                    // Unreadable here: answer hashes that match nothing, so
                                    // the source treats the range as different.
                                    let e = match other {
                                        Ok(Err(e)) => {
                                            // This node's disk: counted, and the
                                            // local-io-error handler runs.
                                            ap.res.device().note_disk_error();
                                            e.to_string()
                                        }
                                        Err(e) => e.to_string(),
                                        Ok(Ok(_)) => String::new(),
                                    };
                                    tracing::error!("hash request {offset}+{len}: reading this node's data: {e}");
                                    vec![0u8; count * peer::HASH_LEN]
                                }
                            };
                            drop(one);
                            ap.finish(seq);
                            let mut f = Vec::with_capacity(payload.len() + 64);
                            peer::encode_frame(
                                &mut f,
                                &Msg::Hashes {
                                    seq,
                                    len: payload.len() as u32,
                                    crc: crc32c::crc32c(&payload),
                                },
                                &payload,
                            );
                            let _ = tx.send(f).await;
                            drop(permit);
                        });
                    }
                    Msg::Equal { offset, len, .. } => {
                        if offset
                            .checked_add(len)
                            .is_none_or(|e| e > res.device().size())
                        {
                            return Err(LinkError::Protocol(format!(
                                "equal region {offset}+{len} is past this device's {} bytes",
                                res.device().size()
                            )));
                        }
                        // Checksum resync found the region equal: nothing to write.
                        ap.finish(seq);
                        drop(permit);
                    }
                    Msg::SyncDone { gen, term, .. } => {
                        // Everything before is applied: durable, then whole again.
                        let ap = ap.clone();
                        tokio::spawn(async move {
                            ap.wait_applied(seq - 1).await;
                            let r = match ap.make_durable().await {
                                // The failure is recorded: the link drops, the resync
                                // starts again on the next connect.
                                Err(_) => Err(()),
                                Ok(_) => {
                                    let g = state::after_sync(gens(&gen));
                                    let r = ap
                                        .res
                                        .commit_meta(move |sb| {
                                            sb.disk = DiskState::UpToDate;
                                            sb.gen = g;
                                            // SyncDone carries no data: the mark names
                                            // it at once, with the rest (a crash before the
                                            // next checkpoint must not leave an up-to-date
                                            // disk whose mark no stream has).
                                            sb.advance_applied((seq, term));
                                            // Whatever this node had as a crashed
                                            // primary is overwritten by the peer's data.
                                            sb.was_primary = false;
                                        })
                                        .await;
                                    if let Err(e) = &r {
                                        ap.fail(format!("committing the end of the resync: {e}"))
                                            .await;
                                    }
                                    r.map_err(|_| ())
                                }
                            };
                            if r.is_ok() {
                                if let Some(rep) = ap.res.rep() {
                                    let mut g = rep.lock();
                                    g.bitmap.clear_all();
                                    g.bitmap_dirty = true;
                                    // Nothing left that only a bitmap resync could bring.
                                    g.overflowed = false;
                                    // Regions an earlier verify marked here were resynced too.
                                    rep.verify_marked
                                        .store(false, std::sync::atomic::Ordering::SeqCst);
                                }
                                ap.res.sync_target_done();
                                ap.res.set_link_state("connected", None);
                                tracing::info!("resync done: this node is up to date");
                                ap.res.run_handler("after-resync-target");
                            }
                            ap.finish(seq);
                            drop(permit);
                        });
                    }
                    Msg::Flush { .. } => {
                        // Everything before the barrier applied, then durable, then acked.
                        let ap = ap.clone();
                        tokio::spawn(async move {
                            ap.wait_applied(seq - 1).await;
                            // A failure is recorded by make_durable: the flush is never
                            // acknowledged, the link drops.
                            if ap.make_durable().await.is_ok() {
                                ap.finish(seq);
                                let _ = ap.make_durable().await;
                            } else {
                                ap.finish(seq);
                            }
                            drop(permit);
                        });
                    }
                    Msg::Write { .. } | Msg::Zero { .. } => {
                        if ack_on_receipt && rd.buffer().is_empty() {
                            // Nothing more has arrived: the primary may be waiting on this
                            // receipt. Let the acker (polled first) send it, then apply.
                            ap.ack_receipt_now
                                .store(true, std::sync::atomic::Ordering::Relaxed);
                            tokio::task::yield_now().await;
                        }
                        let (offset, len, fua) = match msg {
                            Msg::Write {
                                offset, len, fua, ..
                            } => (offset, u64::from(len), fua),
                            Msg::Zero { offset, len, .. } => (offset, len, false),
                            _ => (0, 0, false),
                        };
                        if offset
                            .checked_add(len)
                            .is_none_or(|e| e > res.device().size())
                        {
                            return Err(LinkError::Protocol(format!(
                                "write at {offset}+{len} is past this device's {} bytes",
                                res.device().size()
                            )));
                        }
                        ap.lock().ranges.insert(seq, (offset, offset + len));
                        let ap = ap.clone();
                        let mut fut = Box::pin(async move {
                            ap.wait_turn(seq, (offset, offset + len)).await;
                            let dev = ap.res.device();
                            // FUA: made durable below together with everything before it
                            // (one sync), which is what the primary waits for under C.
                            let r = match (msg, payload) {
                                (Msg::Write { .. }, Some(buf)) => {
                                    let (r, buf) = dev.local_write(offset, buf, false).await;
                                    dev.pool.put(buf);
                                    r
                                }
                                (Msg::Zero { trim, .. }, _) => {
                                    dev.local_zero(offset, len, trim).await
                                }
                                _ => Ok(()),
                            };
                            if let Err(e) = r {
                                // Recorded before `finish`, so the acker never acknowledges
                                // this write; `finish` only lets later ones stop waiting.
                                ap.fail(format!(
                                    "secondary write seq {seq} at {offset}+{len} failed (NBD error {e})"
                                ))
                                .await;
                                ap.finish(seq);
                            } else {
                                ap.finish(seq);
                                if fua {
                                    ap.wait_applied(seq).await;
                                    let _ = ap.make_durable().await;
                                }
                            }
                            drop(permit);
                        });
                        // Usually nothing overlaps and the page-cache write completes at once:
                        // apply inline. Otherwise it becomes a task and waits its turn.
                        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                        if fut.as_mut().poll(&mut cx).is_pending() {
                            tokio::spawn(fut);
                        }
                    }
                    _ => {}
                }
            }
        }
    };
    let r: Result<(), LinkError> = tokio::select! {
        // The acker first: a receipt the receiver yielded for goes out before its apply.
        biased;
        r = acker => r,
        r = receiver => r,
        r = durability => r,
    };
    // Let every write already started finish, so a new connection never overlaps them.
    rep.quiesce_applies().await;
    let _ = ap.make_durable().await;
    res.update_verify(|v| {
        if v.on_peer && v.active() {
            v.state = "interrupted";
            v.error = Some("the link to the primary dropped during verify".into());
        }
    });
    r
}

/// Both secondary: keep the link alive, watch for the peer's role changes.
async fn idle_side(
    res: &Arc<Resource>,
    mut rd: BufReader<LinkRead>,
    mut wr: LinkWrite,
) -> Result<(), LinkError> {
    res.set_link_state("connected", None);
    // The reader's answers to the peer's requests, written by the writer.
    let (reply_tx, mut reply_rx) = mpsc::channel::<Msg>(4);
    let pinger = async {
        let mut ping = tokio::time::interval(PING_INTERVAL);
        loop {
            tokio::select! {
                _ = ping.tick() => {
                    write_msg(&mut wr, &Msg::Ping { id: 0 }).await?;
                }
                // The admin ran `new-current-uuid --clear-bitmap` here: ask the peer.
                _ = res.skip_sync_kick.notified() => {
                    let gen = res
                        .skip_sync
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .as_ref()
                        .map(|(g, _)| *g);
                    if let Some(gen) = gen {
                        write_msg(&mut wr, &Msg::SkipSync { gen }).await?;
                    }
                }
                Some(m) = reply_rx.recv() => {
                    write_msg(&mut wr, &m).await?;
                }
            }
        }
    };
    let reader = async {
        loop {
            let (msg, _, _) = read_frame_within(
                &mut rd,
                res,
                PEER_TIMEOUT,
                "no frame from the peer (ping timeout)",
            )
            .await?;
            match msg {
                Msg::State(st) => {
                    let primary = st.primary;
                    res.set_peer(Some(st));
                    if primary {
                        // The peer was promoted: reconnect so the stream starts.
                        return Err(LinkError::Closed("peer became primary"));
                    }
                }
                Msg::Refuse { reason } => return Err(peer_refused(reason)),
                Msg::SkipSync { gen } => {
                    let r = res.skip_sync_for_peer(gen).await;
                    if let Err(why) = &r {
                        tracing::warn!("the peer asked to skip the initial sync; refused: {why}");
                    }
                    let _ = reply_tx.send(Msg::skip_sync_reply(gen, r)).await;
                }
                Msg::SkipSyncReply { gen, ok, reason } => {
                    // Only the answer to the request still waiting here.
                    let waiting = {
                        let mut pending = res.skip_sync.lock().unwrap_or_else(|p| p.into_inner());
                        if pending.as_ref().is_some_and(|(g, _)| *g == gen) {
                            pending.take()
                        } else {
                            None
                        }
                    };
                    if let Some((_, answer)) = waiting {
                        let _ = answer.send(if ok { Ok(()) } else { Err(reason) });
                    }
                }
                _ => {}
            }
        }
    };
    let r: Result<(), LinkError> = tokio::select! {
        r = pinger => r,
        r = reader => r,
    };
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_state_with_marks_past_the_counter_bound_is_refused() {
        let ok = NodeState {
            primary: false,
            disk: 2,
            size: 1 << 30,
            gen: peer::GenIds::default(),
            applied_seq: COUNTER_LIMIT - 1,
            applied_term: 7,
            durable_seq: 5,
            issued_seq: 9,
            journal_first_seq: 0,
            out_of_sync: 0,
            crashed_primary: false,
            discard_my_data: false,
            promoted_ms: 0,
        };
        assert_eq!(marks_in_bounds(&ok), Ok(()));
        let bad = [
            NodeState {
                applied_seq: u64::MAX,
                ..ok.clone()
            },
            NodeState {
                issued_seq: COUNTER_LIMIT,
                ..ok.clone()
            },
            NodeState {
                durable_seq: u64::MAX,
                ..ok.clone()
            },
            NodeState {
                journal_first_seq: COUNTER_LIMIT,
                ..ok.clone()
            },
        ];
        for st in bad {
            let e = marks_in_bounds(&st).unwrap_err();
            assert!(e.contains("out of bounds"), "{e}");
        }
    }

    #[test]
    fn acks_are_urgent_only_for_the_mark_the_protocol_waits_on() {
        let sent = (10, 8, 5);
        // Durable moves: flushes and FUA writes wait for it under every protocol.
        for p in [Protocol::A, Protocol::B, Protocol::C] {
            assert!(ack_is_urgent(p, sent, (10, 8, 6)));
            assert!(!ack_is_urgent(p, sent, sent));
        }
        // A receipt: B's writes wait for it; A's and C's do not.
        assert!(ack_is_urgent(Protocol::B, sent, (11, 8, 5)));
        assert!(!ack_is_urgent(Protocol::C, sent, (11, 8, 5)));
        assert!(!ack_is_urgent(Protocol::A, sent, (11, 8, 5)));
        // A write on this disk: C's writes wait for it.
        assert!(ack_is_urgent(Protocol::C, sent, (10, 9, 5)));
        assert!(!ack_is_urgent(Protocol::B, sent, (10, 9, 5)));
        assert!(!ack_is_urgent(Protocol::A, sent, (11, 9, 5)));
    }
}
