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
//!
//! Here: the link's life (dial or accept, backoff, one connection at a time), framing with
//! bounds, and the choice of what a new connection does (journal catch-up, resync, idle).
//! `handshake` authenticates and exchanges states, `primary` streams, `secondary`
//! applies.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use proto::peer::{self, Msg, NodeState, PREFIX_LEN};
use proto::{bitmap_wire, seal};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify, Semaphore};

use crate::bitmap::Bitmap;
use crate::buf::Buf;
use crate::config::Protocol;
use crate::link::{self, LinkKeys, LinkRead, LinkWrite};
use crate::meta::{DiskState, Generations, PEER_COUNTER_LIMIT};
use crate::replication::{Ranges, Record, Replication};
use crate::resource::Resource;
use crate::state::{self, Role, SyncDecision};

mod handshake;
mod primary;
mod secondary;

pub(crate) use handshake::protocol_letter;
use handshake::Established;
use handshake::{exchange_states, handshake, too_small_here, too_small_peer};
use primary::primary_side;
use secondary::secondary_side;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Incoming connections that may be in their handshake at once (the oldest goes first).
const MAX_HANDSHAKES: usize = 32;
const PING_INTERVAL: Duration = Duration::from_millis(500);
/// No frame for this long: the peer is dead.
const PEER_TIMEOUT: Duration = Duration::from_secs(4);
/// How long the secondary may hold back an acknowledgement that no write on the primary
/// waits for (see [`secondary::ack_is_urgent`]): the journal release and `status` can wait this long.
const ACK_DEFER: Duration = Duration::from_millis(1);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// The link's read buffer (see where it is made).
const LINK_READ_BUFFER: usize = 64 * 1024;
/// Most journal bytes the sender writes to the socket in one call.
const SEND_BATCH: usize = 2 << 20;

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
    /// A refusal from a peer that had not proved the secret yet: only logged, never taken
    /// as the peer's state (a split brain, say), since anyone could have sent it.
    #[error("peer refused before authenticating: {0}")]
    RefusedBeforeAuth(String),
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
    /// The `fence-peer` handler's run since the link was lost: what it said, and the peer's
    /// disk as it leaves it (`None`: unknown). Cleared when the link is back.
    pub fence: Option<(String, Option<&'static str>)>,
    /// The primary said it went down cleanly (`Msg::Leaving`) once this node held its every
    /// write through this sequence durably: a plain `primary` may then follow. Cleared as
    /// soon as the peer is heard from again.
    pub peer_left: Option<u64>,
    /// The secondary went down cleanly while this node was its primary (`Msg::Leaving` from
    /// it): a planned stop, shown as such and told to the `peer-lost` handler; it decides
    /// nothing (this node holds the data). Cleared as soon as the peer is heard from again.
    pub peer_stopped: bool,
    /// When an established link was last lost (see `Resource::primary`); `None`: never, or
    /// a reconnect was asked for since (`connect`, a role change).
    pub lost_at: Option<std::time::Instant>,
}

/// Where `down` puts its `Msg::Leaving`, and `adjust` its `Msg::Protocol`, for the running
/// connection: the channel of the task that writes to the peer (messages, or frames already
/// encoded).
#[derive(Clone)]
pub enum PeerTx {
    Msg(mpsc::Sender<Msg>),
    Frame(mpsc::Sender<Vec<u8>>),
}

impl PeerTx {
    /// Queues `m` for the peer (bounded by the caller); false when the connection is gone.
    pub async fn send(&self, m: Msg) -> bool {
        match self {
            PeerTx::Msg(tx) => tx.send(m).await.is_ok(),
            PeerTx::Frame(tx) => {
                let mut f = Vec::with_capacity(64);
                peer::encode_frame(&mut f, &m, &[]);
                tx.send(f).await.is_ok()
            }
        }
    }
}

/// Offers a connection's channel to `down` and `adjust` (see [`PeerTx`]) for as long as it
/// lives.
pub(super) struct PeerTxGuard<'a>(&'a Resource);

impl<'a> PeerTxGuard<'a> {
    pub(super) fn offer(res: &'a Resource, tx: PeerTx) -> Self {
        if let Ok(mut t) = res.peer_tx.lock() {
            *t = Some(tx);
        }
        PeerTxGuard(res)
    }
}

impl Drop for PeerTxGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut t) = self.0.peer_tx.lock() {
            *t = None;
        }
    }
}

/// The peer says it goes down cleanly (`Msg::Leaving`, through sequence `issued` of its
/// stream, or 0 from a secondary; at generation `gen`): recorded if this node, a secondary,
/// then holds everything it had (`durable`: its durable mark of the peer's stream), so that
/// a plain `primary` may follow. Ends the connection either way.
pub(super) async fn peer_leaving(res: &Resource, issued: u64, gen: u64, durable: u64) -> LinkError {
    let peer = peer_name(res);
    let heard = res.peer_heard_count();
    let me = res.node_state();
    let clean = res.rep().is_none_or(|r| r.lock().bitmap.dirty_bits() == 0);
    let why = if res.role() != crate::state::Role::Secondary {
        Some("this node is primary")
    } else if me.disk != 2 {
        Some("this node's disk is not up to date")
    } else if me.gen.current != gen {
        Some("this node is at another data generation")
    } else if durable < issued {
        Some("this node has not made every write durable")
    } else if issued == 0 && !clean {
        Some("this node has regions out of sync")
    } else {
        None
    };
    match why {
        None => {
            tracing::info!(
                "{peer} goes down cleanly{}: `primary` here needs no --force",
                if issued > 0 {
                    format!(", and this node holds every write it made (through sequence {issued}) durably")
                } else {
                    " as a secondary with the same data as this node".to_string()
                }
            );
            res.peer_left_cleanly(issued, heard).await;
            LinkError::Closed(PEER_LEFT)
        }
        Some(why) => {
            tracing::warn!("{peer} goes down, but {why}: promoting this node needs --force");
            LinkError::Closed("the peer went down, leaving this node without all of its data")
        }
    }
}

/// The peer's `adjust` changed its replication protocol (`Msg::Protocol`): this node takes
/// it too (see [`Resource::adopt_peer_protocol`]). A letter that names no protocol is a
/// protocol error.
pub(super) async fn peer_protocol(res: &Resource, letter: u8) -> Result<(), LinkError> {
    match handshake::protocol_of_letter(letter) {
        Some(p) => {
            res.adopt_peer_protocol(p).await;
            Ok(())
        }
        None => Err(LinkError::Protocol(format!(
            "the peer changed to an unknown replication protocol {:?}",
            char::from(letter).escape_default().to_string()
        ))),
    }
}

/// Admin control of the link: `disconnect` makes it standalone; `bump` forces a reconnect
/// (after a role change, so the new handshake sets the stream direction).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCtl {
    pub standalone: bool,
    pub bump: u64,
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
    LinkError::PeerRefused(printable(&reason))
}

/// See [`LinkError::RefusedBeforeAuth`].
fn refused_before_auth(reason: String) -> LinkError {
    LinkError::RefusedBeforeAuth(printable(&reason))
}

/// A peer's text as one bounded log line.
fn printable(reason: &str) -> String {
    reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(400)
        .collect()
}

/// Reads one frame; the payload (writes only) lands in a pooled, aligned buffer.
async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    res: &Resource,
) -> Result<(Msg, Option<Buf>, usize), LinkError> {
    let read = async {
        let mut p = [0u8; PREFIX_LEN];
        r.read_exact(&mut p).await?;
        read_frame_rest(r, res, &p).await
    };
    count_corruption(res, read.await)
}

/// Counts a frame that arrived corrupt (`crc_errors` in `status`): a header or payload whose
/// crc does not match, or a sealed record that fails authentication (altered on the way).
fn count_corruption<T>(res: &Resource, r: Result<T, LinkError>) -> Result<T, LinkError> {
    let corrupt = match &r {
        Err(LinkError::Frame(
            peer::FrameError::HeaderCrc | peer::FrameError::PayloadCrc { .. },
        )) => true,
        Err(LinkError::Io(e)) => matches!(
            crate::link::sealing_error(e),
            Some(proto::seal::SealError::Forged(_))
        ),
        _ => false,
    };
    if let (true, Some(rep)) = (corrupt, res.rep()) {
        rep.stats
            .crc_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    r
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
    let read = async {
        let mut p = [0u8; PREFIX_LEN];
        tokio::time::timeout(first, r.read_exact(&mut p))
            .await
            .map_err(|_| LinkError::Timeout(what))??;
        let payload = peer::parse_prefix(&p).map_or(0, |pre| pre.payload_len);
        let rest = first + Duration::from_secs_f64(f64::from(payload) / MIN_LINK_RATE);
        tokio::time::timeout(rest, read_frame_rest(r, res, &p))
            .await
            .map_err(|_| LinkError::Timeout(what))?
    };
    count_corruption(res, read.await)
}

/// Sends this node's dirty bitmap to the peer at connect: parts of at most
/// [`bitmap_wire::PART_WORDS`] words, each as words or runs, whichever is shorter, all full
/// but the last. Each part's words are copied out under a short lock and sent before the next
/// is taken: one part in memory, never the whole bitmap's frames.
async fn send_bitmap<W: AsyncWrite + Unpin>(wr: &mut W, rep: &Replication) -> std::io::Result<()> {
    let total = rep.lock().bitmap.words().len();
    let parts = total.div_ceil(bitmap_wire::PART_WORDS).max(1);
    let (mut part, mut frame) = (Vec::new(), Vec::new());
    for i in 0..parts {
        let from = i * bitmap_wire::PART_WORDS;
        part.clear();
        {
            let g = rep.lock();
            let words = g.bitmap.words();
            part.extend_from_slice(
                &words[from.min(words.len())..(from + bitmap_wire::PART_WORDS).min(words.len())],
            );
        }
        frame.clear();
        bitmap_part_frame(&mut frame, from, &part, i + 1 == parts);
        wr.write_all(&frame).await?;
    }
    Ok(())
}

/// Appends the frame of one bitmap part: the words from `first_word` on.
fn bitmap_part_frame(out: &mut Vec<u8>, first_word: usize, words: &[u64], last: bool) {
    let mut payload = Vec::new();
    let runs = bitmap_wire::encode_part(words, &mut payload);
    peer::encode_frame(
        out,
        &Msg::BitmapPart {
            first_word: first_word as u64,
            words: words.len() as u32,
            runs,
            last,
            len: payload.len() as u32,
            crc: crc32c::crc32c(&payload),
        },
        &payload,
    );
}

/// The peer's dirty bitmap, read in its parts (see [`send_bitmap`]) and laid over this
/// node's device: words past it are dropped (a peer that shrank to the pair's size keeps the
/// bitmap of its whole device), none may be missing (a dropped dirty bit is a region never
/// resynced). The parts must come in order, full but the last, each within the handshake's
/// time, and no more words than a node keeps.
async fn read_peer_bitmap<R: AsyncRead + Unpin>(
    rd: &mut R,
    res: &Resource,
) -> Result<Bitmap, LinkError> {
    let size = res.device().size();
    let granularity = res.cfg().bitmap_granularity;
    let ours = size.div_ceil(granularity).div_ceil(64);
    let bound = bitmap_wire::MAX_BITMAP_BYTES / 8;
    let mut words = vec![0u64; ours as usize];
    let mut part = Vec::new();
    let mut next = 0u64;
    loop {
        let (msg, payload, _) =
            read_frame_within(rd, res, HANDSHAKE_TIMEOUT, "waiting for the peer's bitmap").await?;
        let (first_word, n, runs, last) = match msg {
            Msg::BitmapPart {
                first_word,
                words,
                runs,
                last,
                ..
            } => (first_word, u64::from(words), runs, last),
            Msg::Refuse { reason } => return Err(peer_refused(reason)),
            other => {
                return Err(LinkError::Protocol(format!(
                    "expected the peer's bitmap, got {other:?}"
                )))
            }
        };
        // In order; full but the last (an empty or short part before the end would let a
        // peer stall the connect for ever); within the bound; and at the end covering this
        // node's device.
        let full = n == bitmap_wire::PART_WORDS as u64;
        let end = next.saturating_add(n);
        if first_word != next
            || n > bitmap_wire::PART_WORDS as u64
            || (!last && !full)
            || end > bound
            || (last && end < ours)
        {
            return Err(LinkError::Protocol(format!(
                "the peer's bitmap part of words {first_word}+{n} (last: {last}) does not follow word {next}, or the bitmap does not cover this node's {ours} words within {bound}"
            )));
        }
        part.clear();
        part.resize(n as usize, 0);
        let decoded = bitmap_wire::decode_part(payload.as_deref().unwrap_or(&[]), runs, &mut part);
        if let Some(b) = payload {
            res.device().pool.put(b);
        }
        decoded.map_err(|e| LinkError::Protocol(format!("the peer's bitmap: {e}")))?;
        // The part's words that fall in this node's device.
        if next < ours {
            let end = (next + n).min(ours);
            words[next as usize..end as usize].copy_from_slice(&part[..(end - next) as usize]);
        }
        next += n;
        if last {
            break;
        }
    }
    Ok(Bitmap::from_words(size, granularity, words))
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
    let crc = match crate::buf::read_checksummed(r, &mut buf).await {
        Ok(crc) => crc,
        Err(e) => {
            res.device().pool.put(buf);
            return Err(e.into());
        }
    };
    if let Err(e) = peer::check_payload_crc(&msg, crc) {
        // (Counted by the caller, see `count_corruption`.)
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

/// Runs the link for the life of the resource: dials or accepts, handshakes, runs the
/// connection, and starts over after it ends.
pub async fn run(res: Arc<Resource>, listener: TcpListener, mut ctl: watch::Receiver<LinkCtl>) {
    let cfg = res.cfg().clone();
    let Some(peer_cfg) = cfg.peer.clone() else {
        return;
    };
    let dialer = cfg.me.name < peer_cfg.name;
    let (in_tx, mut in_rx) = mpsc::channel::<Established>(1);
    {
        let res = res.clone();
        let ctl = ctl.clone();
        tokio::spawn(accept_loop(res, listener, in_tx, ctl));
    }
    let mut backoff = Duration::from_millis(50);
    let mut pending: Option<Established> = None;
    loop {
        // Going down cleanly (see `Resource::tell_peer_leaving`): no new connection, which
        // would show the peer this node as primary again.
        while res.is_leaving() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let c = *ctl.borrow_and_update();
        if c.standalone {
            res.set_link_state("standalone", None);
            if ctl.changed().await.is_err() {
                return;
            }
            continue;
        }
        // Until a connection gets past a split brain, the link says so.
        let split = res
            .split_brain_reported
            .load(std::sync::atomic::Ordering::SeqCst)
            != 0;
        res.set_link_state(if split { "split-brain" } else { "connecting" }, None);
        // Read at each try: `adjust` may have moved the peer.
        let dial_addr = res
            .cfg()
            .peer
            .as_ref()
            .and_then(|p| p.connect_address.or(p.replication));
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
                log_link_error(&res, &e, false);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        // Reset only once the connection has lasted (see below): one that fails at once
        // every time (a peer whose disk fails each resync) must not be redialled 20 times a
        // second.
        let started = tokio::time::Instant::now();
        let addr = est.addr;
        info_unless(
            split_brain_retry(&res),
            format_args!("peer {} connected from/to {addr}", peer_cfg.name),
        );
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
        let was_state = res.link_state();
        let was_established = crate::resource::established(was_state);
        // A resync cut here, however the connection ended (an aborted link task runs none of
        // its own ends), is no longer running; a target keeps what it had left as out of sync
        // in `status` until a resync completes.
        if let Some(p) = res.resync.lock().ok().and_then(|mut p| p.take()) {
            if was_state == "sync-target" {
                res.resync_left.store(
                    p.total.saturating_sub(p.done),
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
        }
        // Read before `link_down` ends it: whether this node ran the connection as primary
        // (from `set_connected` on, a resync or catch-up included), not whether it is one
        // now (a promotion's reconnect ends a connection run as secondary).
        let ran_as_primary = res.rep().is_some_and(|r| r.link_ran_as_primary());
        res.sync_expected
            .store(false, std::sync::atomic::Ordering::SeqCst);
        res.sync_paused_by_peer
            .store(false, std::sync::atomic::Ordering::Relaxed);
        // A close this node made only to reconnect at once (not one for a role change, whose
        // own flag a role command never sets). Taken by whatever close comes first, so that a
        // flag left by a link that dropped on its own does not cover a later close.
        let asked = res
            .planned_reconnect
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        // The peer closing the link this node asked it to close (`Msg::Reconnect`) is no
        // fault either.
        let r = match r {
            Err(LinkError::Io(e))
                if asked
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::UnexpectedEof
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::BrokenPipe
                    ) =>
            {
                Err(LinkError::Closed(RECONNECT_ASKED))
            }
            r => r,
        };
        // Or the peer said it closes only to reconnect (`Msg::Reconnect`).
        let planned = matches!(&r, Err(LinkError::Closed(why))
            if (asked && *why == ADMIN_CLOSE) || *why == PEER_RECONNECTS);
        res.link_down().await;
        // With resource-level fencing, a primary that lost its peer has it outdated by
        // another path (a resync target is inconsistent: the handler says so, harmlessly).
        // After a planned reconnect only if the link does not come back in time: the
        // handler may power the peer off. (Under resource-and-stonith writes wait for the
        // link meanwhile, as after any loss.)
        if ran_as_primary && res.role() == crate::state::Role::Primary && !res.is_leaving() {
            if planned && was_established {
                let res = res.clone();
                let seen = res.connections_established();
                tokio::spawn(async move {
                    tokio::time::sleep(PLANNED_RECONNECT_GRACE).await;
                    if res.connections_established() == seen
                        && !crate::resource::established(res.link_state())
                        && res.role() == crate::state::Role::Primary
                        && !res.is_leaving()
                    {
                        tracing::warn!(
                            "the link did not come back within {} s of a planned reconnect: the peer counts as lost",
                            PLANNED_RECONNECT_GRACE.as_secs()
                        );
                        res.fence_peer();
                    }
                });
            } else {
                res.fence_peer();
            }
        }
        if was_established {
            // A role change or a `connect` reconnects at once (the handshake sets the
            // stream's direction): only a link that stays down is the peer lost, for the
            // handler that pages someone.
            let res = res.clone();
            let seen = res.connections_established();
            tokio::spawn(async move {
                tokio::time::sleep(PEER_LOST_GRACE).await;
                if res.connections_established() == seen
                    && !crate::resource::established(res.link_state())
                {
                    res.run_handler("peer-lost");
                }
            });
        }
        let failed_early = started.elapsed() < HEALTHY_CONNECTION
            && match &r {
                Ok(()) => false,
                Err(LinkError::Closed(why)) => {
                    *why != ADMIN_CLOSE
                        && *why != PEER_RECONNECTS
                        && *why != RECONNECT_ASKED
                        && !why.starts_with("replaced")
                }
                Err(_) => true,
            };
        backoff = if failed_early {
            // Below PEER_LOST_GRACE: a role change's reconnect (the peer closes at once) must
            // not look like a lost peer.
            (backoff * 2).min(EARLY_FAILURE_BACKOFF)
        } else {
            Duration::from_millis(50)
        };
        match r {
            Ok(()) => tracing::info!("peer {} disconnected", peer_cfg.name),
            Err(e) => {
                log_link_error(&res, &e, was_established);
                if matches!(
                    e,
                    LinkError::NeedsResync(_)
                        | LinkError::Refused(_)
                        | LinkError::PeerRefused(_)
                        | LinkError::RefusedBeforeAuth(_)
                        | LinkError::LocalDisk(_)
                        | LinkError::PeerStuck(_)
                        | LinkError::SplitBrain(_)
                ) {
                    backoff = MAX_BACKOFF;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The most a connection that failed early delays the next dial.
const EARLY_FAILURE_BACKOFF: Duration = Duration::from_secs(1);

/// A connection that lasted this long was healthy: the next one is dialled without delay.
const HEALTHY_CONNECTION: Duration = Duration::from_secs(10);

/// How long a link that was up may stay down before the `peer-lost` handler runs.
const PEER_LOST_GRACE: Duration = Duration::from_secs(2);
/// How long a planned reconnect (`invalidate-remote`) may take before the peer counts as lost
/// and is fenced: a healthy pair is back within a second.
pub const PLANNED_RECONNECT_GRACE: Duration = Duration::from_secs(10);

/// Why a link closed because this node asked it to (not a fault: logged at info).
const ADMIN_CLOSE: &str = "role change or admin command";

/// Why a link closed because the peer asked (`Msg::Reconnect`): it reconnects at once.
pub(super) const PEER_RECONNECTS: &str = "the peer reconnects (a planned reconnect)";

/// Why a link closed: the peer closed it as this node asked (`Msg::Reconnect`).
const RECONNECT_ASKED: &str = "a planned reconnect, as this node asked";

/// Why a secondary closed its link: its primary went down cleanly (`Msg::Leaving`).
pub(super) const PEER_LEFT: &str = "the peer went down cleanly";

/// Why a primary closed its link: its secondary went down cleanly (`Msg::Leaving`).
pub(super) const SECONDARY_STOPPED: &str = "the secondary went down cleanly";

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

/// Logs why a connection attempt or a connection (`established`) ended, and shows it in
/// `status`.
fn log_link_error(res: &Resource, e: &LinkError, established: bool) {
    // What `status` shows as the last error: a peer that went down cleanly is not a fault.
    let shown = match e {
        LinkError::Closed(why) if *why == PEER_LEFT => {
            "the peer went down cleanly, leaving this node every write".to_string()
        }
        LinkError::Closed(why) if *why == SECONDARY_STOPPED => {
            "the peer went down cleanly (a planned stop): it catches up when it comes back"
                .to_string()
        }
        LinkError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the peer closed the connection (it went down or restarted, or the network cut it)"
                .to_string()
        }
        _ => e.to_string(),
    };
    // The same error at every retry (a peer kept standalone, a wrong secret) is logged once
    // as a warning; `status` keeps showing it.
    let repeated = res.link_error().as_deref() == Some(shown.as_str());
    match e {
        LinkError::Closed(why)
            if *why == ADMIN_CLOSE
                || *why == PEER_LEFT
                || *why == SECONDARY_STOPPED
                || *why == PEER_RECONNECTS
                || *why == RECONNECT_ASKED =>
        {
            tracing::info!("peer link: {e}")
        }
        // A peer that is down refuses or closes every attempt: not worth a line each time.
        // An established connection that ends is (on a secondary, the primary's loss).
        LinkError::Io(io)
            if !established
                && matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::UnexpectedEof
                ) =>
        {
            tracing::debug!("peer link: {e}")
        }
        // Info, not a warning: the peer also closes for a role change or a `down`.
        LinkError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            tracing::info!("peer link ended: {shown}")
        }
        // Logged where it was found (see `split_brain_found`).
        LinkError::SplitBrain(_) => tracing::debug!("peer link: {e}"),
        LinkError::Refused(why) if why.contains("split brain") => {
            tracing::debug!("peer link: {e}")
        }
        LinkError::PeerRefused(why) if why.contains("split brain") => {
            let kind = if why.contains("both nodes are primary") {
                SplitBrainKind::BothPrimary
            } else {
                SplitBrainKind::Diverged
            };
            split_brain_found(res, kind, &e.to_string())
        }
        _ if repeated => tracing::debug!("peer link: {e}"),
        _ => tracing::warn!("peer link: {e}"),
    }
    res.set_link_state("connecting", Some(shown));
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
    // Each with whether it comes from the peer's configured address: those are dropped
    // last, so that a flood from elsewhere cannot keep the real peer out.
    let mut handshakes: std::collections::VecDeque<(tokio::task::AbortHandle, bool)> =
        Default::default();
    let peer_ips: Vec<std::net::IpAddr> = res
        .cfg()
        .peer
        .iter()
        .flat_map(|p| [p.replication, p.connect_address])
        .flatten()
        .map(|a| a.ip())
        .collect();
    loop {
        let (s, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("replication accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        handshakes.retain(|(h, _)| !h.is_finished());
        if handshakes.len() >= MAX_HANDSHAKES {
            let victim = handshakes
                .iter()
                .position(|(_, from_peer)| !from_peer)
                .unwrap_or(0);
            if let Some((oldest, _)) = handshakes.remove(victim) {
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
            // Going down cleanly (see `Resource::is_leaving`): no Hello either, which would
            // tell the peer this node is back.
            if res.is_leaving() {
                return;
            }
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
                    // Shown while no connection is up (the peer's refusal, a wrong secret);
                    // beside a working link it is a stranger's, and would stand in `status`
                    // as the link's error with text the stranger chose.
                    if !crate::resource::established(res.link_state()) {
                        res.set_link_error(format!("connection from {addr}: {e}"));
                    }
                }
            }
        });
        handshakes.push_back((task.abort_handle(), peer_ips.contains(&addr.ip())));
    }
}

/// The two split brains an admin resolves differently: both nodes primary (demote one), and
/// data changed on both sides (`connect --discard-my-data` on one): each is reported once.
#[derive(Clone, Copy)]
enum SplitBrainKind {
    BothPrimary = 1,
    Diverged = 2,
}

/// A split brain was found here or reported by the peer: logged, and the split-brain handler
/// run, once per split brain on each node. The link keeps trying (backing off) so that the
/// admin's resolution on either node (`secondary`, `connect --discard-my-data`) is taken up
/// at once, but the retries that find it again are logged at debug level only.
fn split_brain_found(res: &Resource, kind: SplitBrainKind, why: &str) {
    let kind = kind as u8;
    match res
        .split_brain_reported
        .swap(kind, std::sync::atomic::Ordering::SeqCst)
    {
        // The retries of one split brain: quiet.
        k if k == kind => tracing::debug!("{why}"),
        // Still the same incident, seen differently (both primary, then one demoted on the
        // way to `--discard-my-data`): said, but neither an error nor a handler run again.
        0 => {
            tracing::error!("{why}");
            res.run_handler("split-brain");
        }
        _ => tracing::warn!("{why}"),
    }
}

/// Whether a split brain is already reported: its retries (every 2 s) are quiet.
fn split_brain_retry(res: &Resource) -> bool {
    res.split_brain_reported
        .load(std::sync::atomic::Ordering::SeqCst)
        != 0
}

/// Logs `msg` at info level, or at debug level when `quiet`.
fn info_unless(quiet: bool, msg: std::fmt::Arguments) {
    if quiet {
        tracing::debug!("{msg}");
    } else {
        tracing::info!("{msg}");
    }
}

/// The peer's answer to this node's `PromoteAsk` (`Msg::PromoteAnswer`), handed to the
/// promotion waiting for it; its reason is the peer's text, made printable.
fn promote_answered(res: &Resource, id: u64, ok: bool, busy: bool, reason: &str) {
    let answer = if ok {
        Ok(())
    } else {
        Err((printable(reason), busy))
    };
    res.peer_answered_promotion(id, answer);
}

/// A state the peer sends mid-connection (its disk failed, its role changed) is input like
/// the handshake's: bounded the same way before anything (status, a promotion's checks)
/// uses it.
fn state_in_bounds(st: &NodeState) -> Result<(), LinkError> {
    handshake::marks_in_bounds(st)
        .map_err(|why| LinkError::Protocol(format!("a state update from the peer: {why}")))
}

/// Runs one established connection until it fails or ends.
async fn connection(res: &Arc<Resource>, est: Established) -> Result<(), LinkError> {
    let (mut rd, mut wr) = (est.rd, est.wr);
    let after_sb_0pri = est.after_sb_0pri;
    res.link_sealed
        .store(est.sealed, std::sync::atomic::Ordering::Relaxed);
    let (me, peer) = exchange_states(res, &mut rd, &mut wr).await?;
    // Authenticated and heard: what this node handed over at a clean `down` is settled by
    // this connection from here (see `Superblock::handed_over`).
    if let Err(e) = res.peer_met_again(&peer).await {
        return Err(LinkError::LocalDisk(format!(
            "clearing the hand-over record in the metadata: {e}"
        )));
    }
    let my_role = res.role();
    res.set_peer(Some(peer.clone()));
    if me.primary && peer.primary {
        let why = "split brain: both nodes are primary; on the node whose changes are to be dropped: unmount, `blockrep-ctl secondary`, then `blockrep-ctl connect --discard-my-data`";
        split_brain_found(res, SplitBrainKind::BothPrimary, why);
        return Err(refuse(&mut wr, why.into()).await);
    }
    // A secondary whose disk failed a sync cannot make a primary's stream durable (every
    // later flush fails): it says why, so the primary shows the cause instead of a connection
    // that keeps closing. A failed primary still streams its writes to the good copy; and
    // between two secondaries the connection goes on, so that the good node sees this one as
    // a connected secondary and a plain `primary` there works (the runbook's failover).
    if !me.primary && peer.primary && res.device().sync_failed() {
        let why = format!(
            "{}'s disk failed a flush (writes may be lost on it): it takes no stream until repaired or replaced (there: `down`, `create-md` on a new disk, `up`; a full sync follows)",
            res.cfg().me.name
        );
        return Err(refuse(&mut wr, why).await);
    }
    // Two secondaries, one with a failed disk: connected, and nothing moves (the failed disk
    // can take nothing, and is never a source). Both sides see it in the states they just
    // exchanged, so both go idle; the good node sees a connected secondary, so a plain
    // `primary` there works, and then the failed node refuses its stream (above).
    if !me.primary && !peer.primary && (me.disk_failed || peer.disk_failed) {
        let failed = if me.disk_failed {
            res.cfg().me.name.clone()
        } else {
            peer_name(res)
        };
        tracing::warn!(
            "connected without a resync: {failed}'s disk failed a flush and takes no data until it is repaired or replaced (there: `down`, `create-md` on a new disk, `up`)"
        );
        return idle_side(res, rd, wr).await;
    }
    // Size: the primary's export must fit on the secondary (checked again below for whichever
    // side a resync between two secondaries makes the source).
    if me.primary && peer.size < me.size {
        return Err(refuse(&mut wr, too_small_peer(&me, &peer)).await);
    }
    if peer.primary && me.size < peer.size {
        return Err(refuse(&mut wr, too_small_here(&me, &peer)).await);
    }
    // From the first connect on, the pair exports the smaller size (DRBD's negotiation).
    // Sizes (DRBD's negotiation): a larger side without usable data shrinks to the other's;
    // each side decides for itself, and predicts the other's decision from its state.
    let mine = match res.agree_size(peer.size).await {
        Ok(Some(size)) => size,
        Ok(None) => {
            return Err(LinkError::Closed(
                "a promotion is under way: the size is agreed at the next connect",
            ))
        }
        Err(e) => {
            return Err(LinkError::LocalDisk(format!(
                "agreeing on the exported size: {e}"
            )))
        }
    };
    let (mut me, mut peer) = (me, peer);
    if peer.size > me.size && Resource::shrinks_at_connect(&peer, Role::Secondary) {
        peer.size = me.size;
    }
    me.size = mine;
    // A primary whose disk failed: this node keeps the good copy (a new generation of its
    // own, which the comparison below then sees).
    let me = if res.peer_disk_failed(&peer).await {
        res.node_state()
    } else {
        me
    };
    let mut decision = state::compare_generations_unacked(
        &gens(&me.gen),
        me.gen.sync_done_unacked,
        &gens(&peer.gen),
        peer.gen.sync_done_unacked,
    );
    let by_generations = decision;
    // The journal can bring the peer back only when the generations alone say so; every
    // override below (crashed primary, discard, policy) means regions the journal never saw.
    let journal_ok = matches!(decision, SyncDecision::InSync | SyncDecision::SourceBitmap);
    // Same generation, but one side holds less than it told the other its disk held: it
    // went back in time (an image of its disk restored with its metadata), and is the target
    // of a full sync from the other, not the source of its old hot extents (nor in sync).
    // Also where the peer moved on to a newer generation since: its bitmap counts from there.
    let back = {
        let held = |s: &NodeState| state::Held {
            current: s.gen.current,
            high: s.issued_seq.max(s.applied_seq),
            primary: s.primary,
            up_to_date: s.disk == 2,
            told: (s.peer_durable_gen, s.peer_durable_seq),
            chain: [s.gen.current, s.gen.history[0], s.gen.history[1]],
        };
        state::back_in_time(&held(&me), &held(&peer), by_generations)
    };
    if let Some(d) = back {
        let (node, held, told) = if d == SyncDecision::TargetFull {
            (
                res.cfg().me.name.clone(),
                me.issued_seq.max(me.applied_seq),
                peer.peer_durable_seq,
            )
        } else {
            (
                peer_name(res),
                peer.issued_seq.max(peer.applied_seq),
                me.peer_durable_seq,
            )
        };
        let (gen, told_gen) = if d == SyncDecision::TargetFull {
            (me.gen.current, peer.peer_durable_gen)
        } else {
            (peer.gen.current, me.peer_durable_gen)
        };
        if gen == told_gen {
            tracing::warn!(
                "{node}'s disk went back in time: at generation {gen:016X} it holds through sequence {held}, but it had told its peer its disk held {told} (its disk was restored from an image or snapshot, or lost flushed writes); it is the target of a full sync from the other node, whose data is newer"
            );
        } else {
            tracing::warn!(
                "{node}'s disk went back in time: it is at generation {gen:016X}, older than {told_gen:016X}, which it had told its peer its disk held (its disk and metadata were restored from an image or snapshot, or a resync into it was cut); it is the target of a full sync from the other node, whose data is newer"
            );
        }
        decision = d;
    }
    // Same generation, but one side crashed as primary: its hot extents may hold writes the
    // other never got (DRBD's crashed-primary rule): it is the source for them. Both did (one
    // with a stale mark a failed metadata write left at its demotion): one source for both
    // nodes' hot extents (its resync merges the target's bitmap, which names the target's).
    if back.is_none()
        && decision == SyncDecision::InSync
        && (me.crashed_primary || peer.crashed_primary)
    {
        let me_source = if me.crashed_primary != peer.crashed_primary {
            me.crashed_primary
        } else {
            let (mine, theirs) = (res.cfg().me.name.clone(), peer_name(res));
            let me_source =
                state::crashed_primaries_source(me.promoted_ms, &mine, peer.promoted_ms, &theirs);
            tracing::warn!(
                "both nodes crashed as primary at generation {:016X}: {} (promoted last) is the source of both nodes' hot extents",
                me.gen.current,
                if me_source { &mine } else { &theirs }
            );
            me_source
        };
        decision = if me_source {
            SyncDecision::SourceBitmap
        } else {
            SyncDecision::TargetBitmap
        };
    }
    // `--discard-my-data` settles what the nodes cannot settle themselves, as in DRBD: a split
    // brain, or newer writes on a disk that is not up to date (no copy holds everything).
    // Anywhere else the generations decide, and the node with newer data stays the source
    // (before, the flag made it the target and its acknowledged writes were discarded).
    // An outdated crashed primary at one generation keeps its hot extents (see
    // `state::effective_disk`): its premature mark goes, and it is the source as before.
    // Only one-sided: of two crashed primaries at one generation, the disk states stand.
    let same_gen = by_generations == SyncDecision::InSync;
    let me_disk = state::effective_disk(
        me.disk,
        me.crashed_primary && !peer.crashed_primary && back.is_none(),
        same_gen,
    );
    let peer_disk = state::effective_disk(
        peer.disk,
        peer.crashed_primary && !me.crashed_primary && back.is_none(),
        same_gen,
    );
    // The mark goes only once the resync of the hot extents has ended (the source's end
    // commits it): dropped now, a connection refused below would leave this node up to date
    // and unfenced at an old generation.
    res.premature_outdate
        .store(me_disk != me.disk, std::sync::atomic::Ordering::SeqCst);
    if me_disk != me.disk {
        tracing::warn!(
            "this node crashed as primary and was outdated since, but the peer is still at its generation (no failover happened): it is the source of its hot extents, and up to date once they are resynced"
        );
    }
    let disk_rule = state::by_disk_state(me_disk == 2, peer_disk == 2, by_generations);
    let unsettled = by_generations == SyncDecision::SplitBrain
        || matches!(
            disk_rule,
            state::DiskRule::MineNewerButBad | state::DiskRule::PeersNewerButBad
        );
    let discard_asked =
        (me.discard_my_data && !me.primary) || (peer.discard_my_data && !peer.primary);
    if discard_asked && !unsettled {
        tracing::warn!(
            "discard-my-data is not used: there is no split brain ({}); the generations decide ({decision:?})",
            if me.discard_my_data { "asked here" } else { "asked on the peer" }
        );
        res.clear_discard_my_data();
    }
    // Asked on both nodes, it names no copy to keep: the split brain stands (DRBD drops such
    // a connection too), reported as one, until one node's request is withdrawn.
    let both_discard = me.discard_my_data && !me.primary && peer.discard_my_data && !peer.primary;
    if both_discard && unsettled {
        tracing::warn!(
            "discard-my-data was asked on both nodes, so it chooses neither copy (an automatic after-sb-0pri policy may still decide; otherwise the split brain stands): on the node whose data is to be kept, `disconnect` (which withdraws it) and `connect`"
        );
    }
    let discard_applies = discard_asked && unsettled && !both_discard;
    // Only towards good data (see `state::by_disk_state`); `--discard-my-data` has its own
    // checks below.
    if !discard_applies {
        match disk_rule {
            state::DiskRule::Keep => {}
            // (The same direction when a node went back in time, which is a full sync.)
            state::DiskRule::Set(d) if back.is_none() => decision = d,
            state::DiskRule::Set(_) => {}
            rule => {
                let (newer, bad, older, disk, fix) = if rule == state::DiskRule::MineNewerButBad {
                    let newer = "this node has writes the peer lacks";
                    (newer, "its", "the peer's", me.disk, "this node")
                } else {
                    let newer = "the peer has writes this node lacks";
                    (newer, "the peer's", "this node's", peer.disk, "the peer")
                };
                return Err(refuse(
                    &mut wr,
                    format!(
                        "{newer}, but {bad} disk is {} (it failed, a resync into it did not finish, or it was outdated): no copy holds everything. To keep {older} older data, `connect --discard-my-data` on {fix}",
                        disk_name(disk)
                    ),
                )
                .await);
            }
        }
    }
    // It picks the direction only: a difference no bitmap covers (a fresh or replaced disk)
    // still needs a full sync, and unrelated data is still refused.
    // And only towards good data: never from a disk that is not up to date.
    type Pick = fn(SyncDecision) -> SyncDecision;
    let discard: Option<(u8, Pick, &str)> = if !discard_applies {
        None
    } else if me.discard_my_data && !me.primary {
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
        // Said once, plainly: the one step in which data is knowingly given up.
        let (loser, changes) = if me.discard_my_data && !me.primary {
            (res.cfg().me.name.clone(), me.out_of_sync)
        } else {
            (peer_name(res), peer.out_of_sync)
        };
        tracing::warn!(
            "discard-my-data: {loser}'s changes since the split ({changes} bytes by its bitmap) are overwritten from the other node ({decision:?})"
        );
    }
    // In hex, as dump-md and the error messages show them.
    let hex = |g: &peer::GenIds| {
        format!(
            "current {:016X} bitmap {:016X} history {:016X} {:016X}{}",
            g.current,
            g.bitmap,
            g.history[0],
            g.history[1],
            if g.sync_done_unacked != 0 {
                format!(" sync-done-unacked {:016X}", g.sync_done_unacked)
            } else {
                String::new()
            }
        )
    };
    let line = format!(
        "generations: this node {}, peer {}: {decision:?}",
        hex(&me.gen),
        hex(&peer.gen)
    );
    // A refused pair (unrelated data, a split brain) retries every few seconds with the same
    // line: said once (trial: 54 lines a minute).
    let same = res
        .last_generations_line
        .lock()
        .map(|mut last| std::mem::replace(&mut *last, line.clone()) == line)
        .unwrap_or(false);
    let refused = matches!(decision, SyncDecision::SplitBrain | SyncDecision::Unrelated);
    info_unless(
        refused && same || decision == SyncDecision::SplitBrain && split_brain_retry(res),
        format_args!("{line}"),
    );
    // The policies settle only a split brain whose two bitmaps together name everything
    // either side changed (as DRBD applies them only to its rule-100 split brain): one found
    // through the histories has bitmaps counting from different points, whose counts the
    // policies would compare as if they meant the same, and is left to the admin.
    let bitmaps_cover = by_generations != SyncDecision::SplitBrain
        || state::split_brain_bitmaps_cover(
            &gens(&me.gen),
            me.gen.sync_done_unacked,
            &gens(&peer.gen),
            peer.gen.sync_done_unacked,
        );
    if decision == SyncDecision::SplitBrain
        && !me.primary
        && !peer.primary
        && !bitmaps_cover
        && after_sb_0pri != state::AfterSb0Pri::Disconnect
    {
        info_unless(
            same,
            format_args!(
                "after-sb-0pri {after_sb_0pri:?} does not settle this split brain: the two bitmaps count from different generations (bitmap {:016X} here, {:016X} on the peer), so neither names all the other changed; `connect --discard-my-data` on the node whose changes go settles it (with a full sync)",
                me.gen.bitmap, peer.gen.bitmap
            ),
        );
    }
    if decision == SyncDecision::SplitBrain && !me.primary && !peer.primary && bitmaps_cover {
        let facts = |s: &NodeState, name: &'static str| state::SbFacts {
            name,
            changes: s.out_of_sync,
            promoted_ms: s.promoted_ms,
            split_as_primary: s.split_as_primary,
            consistent: s.disk != 0,
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
        // Said when the disk states decided rather than the policy's own rule.
        let by_disk = match (mine.consistent, theirs.consistent) {
            (false, true) => format!(" (this node's disk is {})", disk_name(me.disk)),
            (true, false) => format!(" (the peer's disk is {})", disk_name(peer.disk)),
            _ => String::new(),
        };
        match state::resolve_split_brain(after_sb_0pri, mine, theirs) {
            Some(true) => {
                tracing::warn!(
                    "split brain resolved by after-sb-0pri {:?}: this node discards its changes{by_disk}",
                    after_sb_0pri
                );
                if !res
                    .sb_policy_reported
                    .swap(true, std::sync::atomic::Ordering::SeqCst)
                {
                    res.run_handler("split-brain");
                }
                decision = SyncDecision::TargetBitmap;
            }
            Some(false) => {
                tracing::warn!(
                    "split brain resolved by after-sb-0pri {:?}: the peer discards its changes{by_disk}",
                    after_sb_0pri
                );
                if !res
                    .sb_policy_reported
                    .swap(true, std::sync::atomic::Ordering::SeqCst)
                {
                    res.run_handler("split-brain");
                }
                decision = SyncDecision::SourceBitmap;
            }
            None => {}
        }
    }
    // Settled (by `--discard-my-data`: no policy settles it), a split brain found through the
    // histories rather than one shared bitmap generation is a full sync: what either side
    // changed between the two bitmaps' points is named by neither (DRBD does the same).
    if !bitmaps_cover {
        let full = match decision {
            SyncDecision::SourceBitmap => Some(SyncDecision::SourceFull),
            SyncDecision::TargetBitmap => Some(SyncDecision::TargetFull),
            _ => None,
        };
        if let Some(full) = full {
            tracing::warn!(
                "the split brain is settled with a full sync: the two nodes' bitmaps count from different generations (bitmap {:016X} here, {:016X} on the peer), so neither names everything the other lacks",
                me.gen.bitmap,
                peer.gen.bitmap
            );
            decision = full;
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
            split_brain_found(res, SplitBrainKind::Diverged, &why);
            return Err(LinkError::SplitBrain(
                refuse(&mut wr, why).await.to_string(),
            ));
        }
        SyncDecision::Unrelated => {
            res.split_brain_reported
                .store(0, std::sync::atomic::Ordering::SeqCst);
            let why = format!(
                "unrelated data: generation {:016X} here, {:016X} on the peer, no common history (another disk, an old one put back, or another resource's). On the node whose data is to be replaced: `down`, `create-md --force`, `up` (a full sync from the other follows)",
                me.gen.current, peer.gen.current
            );
            return Err(refuse(&mut wr, why).await);
        }
        _ => {
            res.split_brain_reported
                .store(0, std::sync::atomic::Ordering::SeqCst);
            if by_generations != SyncDecision::SplitBrain {
                res.sb_policy_reported
                    .store(false, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }
    // Never a resync from an inconsistent disk (DRBD: "I shall become SyncSource, but I am
    // inconsistent!"): a resync into it did not finish, or it lost writes, so it lacks
    // regions and would make its target up to date without them. `by_disk_state` covers a
    // good peer; this covers two disks neither of which is up to date (a half-synced node
    // beside a replaced disk, say), whatever decided the direction. An outdated source is
    // complete, only older: its target ends outdated too.
    if let Some((bad, fix)) = match decision {
        SyncDecision::SourceBitmap | SyncDecision::SourceFull if me_disk == 0 => {
            Some((res.cfg().me.name.clone(), "here"))
        }
        SyncDecision::TargetBitmap | SyncDecision::TargetFull if peer_disk == 0 => {
            Some((peer_name(res), "there"))
        }
        _ => None,
    } {
        let why = format!(
            "{bad} would be the resync source ({decision:?}), but its disk is inconsistent (a resync into it did not finish, or it lost writes): no copy is known to be complete, and no data moves. To use {bad}'s data anyway, a forced promotion {fix} (`blockrep-ctl primary --force`; on a primary, `secondary --force` first) makes it up to date and the source; otherwise repair or replace the other node's disk"
        );
        return Err(refuse(&mut wr, why).await);
    }
    let source = matches!(
        decision,
        SyncDecision::InSync | SyncDecision::SourceBitmap | SyncDecision::SourceFull
    );
    // Until its SyncDone commits (or the link ends), this node lacks what the peer holds.
    res.sync_expected
        .store(!source, std::sync::atomic::Ordering::SeqCst);
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
        (Role::Primary, false) if me.disk != 2 => Err(refuse(
            &mut wr,
            format!(
                "this primary's disk is {} (a sync of it failed: writes may be lost on it) and the peer's is up to date: demote it (`secondary --force`) and promote the peer; it then takes a full resync",
                disk_name(me.disk)
            ),
        )
        .await),
        (Role::Primary, false) => Err(refuse(
            &mut wr,
            "the primary has older data than its peer (generations say the peer moved on): demote it and promote the peer".into(),
        )
        .await),
        (Role::Secondary, true) if !matches!(decision, SyncDecision::SourceBitmap | SyncDecision::SourceFull) => {
            secondary_side(res, rd, wr, peer).await
        }
        // The primary's disk failed: this node holds the good copy, and the advice to drop
        // it (below) would wipe the only one.
        (Role::Secondary, true) if peer.disk != 2 => Err(refuse(
            &mut wr,
            format!(
                "this secondary has newer data than the primary, whose disk is {}: fail over: demote the primary (`secondary --force` there) and promote this node; the old primary then takes a full resync",
                disk_name(peer.disk)
            ),
        )
        .await),
        (Role::Secondary, true) => Err(refuse(
            &mut wr,
            "this secondary has newer data than the primary: demote the primary and promote this node (its newer data then goes to the other), or, to drop this node's newer data, `down` here, `create-md --force`, `up` (a full sync from the primary follows)".into(),
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

/// A disk state as the handshake carries it, by name.
fn disk_name(disk: u8) -> &'static str {
    match disk {
        2 => "up-to-date",
        1 => "outdated",
        _ => "inconsistent",
    }
}

pub(super) fn peer_name(res: &Resource) -> String {
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

/// The peer acknowledged more than it now reports as durable (since this daemon started): its
/// disk went back in time (a restored snapshot, a write cache that ignored flushes). Nothing
/// says which regions it lost: at one generation the pair would look in sync, and a resync it
/// was the target of would count the regions it acknowledged as done. Everything is resynced
/// (the error says so; every region is marked).
pub(super) fn peer_went_back(res: &Resource, peer: &NodeState) -> Option<LinkError> {
    let rep = res.rep()?;
    let high = rep
        .peer_durable_high
        .load(std::sync::atomic::Ordering::SeqCst);
    // (A fresh disk, created or invalidated since, is fully synced by its generation alone,
    // and is no disk that went back in time.)
    if peer.durable_seq >= high || peer.gen.current == crate::meta::UUID_JUST_CREATED {
        return None;
    }
    let why = format!(
        "the peer reports its writes durable through sequence {} but acknowledged {high} as durable before: its disk lost writes it had made durable (a restored snapshot, or a write cache that ignores flushes); full resync",
        peer.durable_seq
    );
    tracing::warn!("{why}");
    rep.mark_out_of_sync(0, res.device().size());
    Some(LinkError::NeedsResync(why))
}

/// Decides where the stream starts for a secondary that applied up to `peer.applied_seq`.
fn stream_start(res: &Resource, peer: &NodeState, me: &NodeState) -> Result<u64, LinkError> {
    let rep = res.rep().ok_or(LinkError::Closed("no replication state"))?;
    // (A peer whose disk went back in time was sent to a full resync before: see
    // `peer_went_back`.)
    if rep.verify_marked.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(LinkError::NeedsResync(format!(
            "{} bytes marked out of sync (regions a verify found different, or all of them after invalidate-remote)",
            rep.lock().bitmap.dirty_bytes()
        )));
    }
    if me.crashed_primary {
        return Err(LinkError::NeedsResync(
            "this node crashed as primary: its activity-log extents go to the peer".into(),
        ));
    }
    if peer.discard_my_data {
        return Err(LinkError::NeedsResync(
            "the peer discards its data (connect --discard-my-data)".into(),
        ));
    }
    if peer.crashed_primary {
        return Err(LinkError::NeedsResync(format!(
            "the peer crashed as primary: its activity-log extents{} are resynced from here",
            if peer.out_of_sync > 0 {
                format!(" and the {} bytes its bitmap names", peer.out_of_sync)
            } else {
                String::new()
            }
        )));
    }
    if peer.out_of_sync > 0 {
        return Err(LinkError::NeedsResync(format!(
            "the peer's bitmap names {} bytes that may differ from this node",
            peer.out_of_sync
        )));
    }
    let mut inner = rep.lock();
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
            "the bitmap holds {} bytes that no journal record carries (the journal overflowed or was dropped: a long outage, a crash, a failed disk, a split-brain resolution or a verify's marks)",
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
    // Under the same lock as the checks above: the records the catch-up sends are kept.
    inner.keep_journal_from(start);
    Ok(start)
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
    let _leave = PeerTxGuard::offer(res, PeerTx::Msg(reply_tx.clone()));
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
                    state_in_bounds(&st)?;
                    let primary = st.primary;
                    res.set_peer(Some(st));
                    if primary {
                        // The peer was promoted: reconnect so the stream starts.
                        return Err(LinkError::Closed("peer became primary"));
                    }
                }
                Msg::Refuse { reason } => return Err(peer_refused(reason)),
                Msg::Leaving { issued, gen } => {
                    return Err(peer_leaving(res, issued, gen, issued).await)
                }
                Msg::Reconnect => return Err(LinkError::Closed(PEER_RECONNECTS)),
                Msg::Protocol { protocol } => peer_protocol(res, protocol).await?,
                Msg::PromoteAsk { id } => {
                    let answer = Msg::promote_answer(id, res.answer_peer_promotion());
                    let _ = reply_tx.send(answer).await;
                }
                Msg::PromoteAnswer {
                    id,
                    ok,
                    busy,
                    reason,
                } => promote_answered(res, id, ok, busy, &reason),
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
                // The peer streams or resyncs to this node, which decided there is nothing to
                // move: the two disagree on the connection's mode, and records would vanish
                // here.
                m if m.seq().is_some() => {
                    return Err(LinkError::Protocol(format!(
                        "a stream record (sequence {}) from a peer this node takes no stream from",
                        m.seq().unwrap_or(0)
                    )))
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

    /// The frames of a bitmap decode, part by part in order, to its words; a clean bitmap
    /// of several parts is a few bytes each, a dense one its words.
    #[test]
    fn bitmap_frames_carry_the_words_in_order() {
        let n = 2 * bitmap_wire::PART_WORDS + 5;
        for dense in [false, true] {
            let mut words = vec![0u64; n];
            let mut x = 0x2545_F491_4F6C_DD1Du64;
            for (i, w) in words.iter_mut().enumerate() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if dense || i % 50_000 == 7 || i == n - 1 {
                    *w = x;
                }
            }
            let mut frames = Vec::new();
            let parts: Vec<_> = words.chunks(bitmap_wire::PART_WORDS).collect();
            for (i, p) in parts.iter().enumerate() {
                bitmap_part_frame(
                    &mut frames,
                    i * bitmap_wire::PART_WORDS,
                    p,
                    i + 1 == parts.len(),
                );
            }
            if !dense {
                assert!(frames.len() < 1024, "{} bytes", frames.len());
            }
            let mut back = Vec::new();
            let mut at = 0;
            loop {
                let p: &[u8; PREFIX_LEN] = frames[at..at + PREFIX_LEN].try_into().expect("prefix");
                let pre = peer::parse_prefix(p).expect("prefix");
                let h = at + PREFIX_LEN;
                let msg =
                    peer::decode_header(p, &pre, &frames[h..h + pre.header_len]).expect("header");
                let body = &frames[h + pre.header_len..][..pre.payload_len as usize];
                peer::check_payload(&msg, body).expect("crc");
                at = h + pre.header_len + pre.payload_len as usize;
                let Msg::BitmapPart {
                    first_word,
                    words: count,
                    runs,
                    last,
                    ..
                } = msg
                else {
                    panic!("{msg:?}");
                };
                assert_eq!(first_word, back.len() as u64);
                let mut part = vec![0u64; count as usize];
                bitmap_wire::decode_part(body, runs, &mut part).expect("part");
                assert_eq!(runs, !dense);
                back.extend(part);
                if last {
                    break;
                }
            }
            assert_eq!(at, frames.len(), "nothing after the last part");
            assert_eq!(back, words);
        }
    }
}
