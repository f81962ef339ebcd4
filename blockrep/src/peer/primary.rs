//! The primary's side of a connection: the journal stream to the peer, acknowledgements back,
//! and the resync and verify runs that go through the same ordered stream.

use super::*;

/// The sender's lease on a run of journal records: unpinned when dropped, also when the
/// connection ends in the middle of a write.
pub(super) struct SendLease<'a> {
    rep: &'a Replication,
    lease: crate::journal::Lease,
}

impl Drop for SendLease<'_> {
    fn drop(&mut self) {
        self.rep.lock().ring.unpin();
    }
}

pub(super) async fn primary_side(
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
    let peer_bitmap = read_peer_bitmap(&mut rd, res).await?;
    // A peer whose disk went back in time is checked first: a resync it was the target of
    // counted what it acknowledged as done (its bits cleared here), so whatever resync the
    // generations or its inconsistent disk call for would leave those regions out.
    let journal = match (super::peer_went_back(res, &peer), decision) {
        (Some(e), _) => Err(e),
        (None, SyncDecision::SourceFull) => Err(LinkError::NeedsResync(
            "full sync: no bitmap covers what the peer lacks".into(),
        )),
        _ if peer.disk == 0 => Err(LinkError::NeedsResync(
            "the peer is inconsistent (a resync that did not finish)".into(),
        )),
        // The peer is where this node's unacknowledged SyncDone left it, a generation this
        // node has moved on from: a journal catch-up whose own SyncDone the peer then missed
        // would leave it there while the record named the newer one (and two generations
        // later the pair would look split). A resync's SyncStart first moves it back to the
        // bitmap generation, which this node's bitmap always counts from.
        (None, SyncDecision::SourceBitmap)
            if state::names_a_generation(me.gen.sync_done_unacked)
                && me.gen.sync_done_unacked == peer.gen.current =>
        {
            Err(LinkError::NeedsResync(
                "the peer took the end of the last resync, which this node never heard acknowledged: a bitmap resync, not the journal, brings it up to date".into(),
            ))
        }
        (None, SyncDecision::InSync | SyncDecision::SourceBitmap) if journal_ok => {
            stream_start(res, &peer, &me)
        }
        _ => Err(LinkError::NeedsResync("generations diverged".into())),
    };
    let (start, resync) = match journal {
        Ok(s) => (s, None),
        Err(e) => {
            let full = decision == SyncDecision::SourceFull;
            // Past what the peer said its disk held too: the target commits the stream's
            // start as its mark at SyncStart, so a node fully synced after going back in time
            // (or replaced) ends above it, and no later connect takes it for a rollback.
            let seen = peer
                .applied_seq
                .max(peer.issued_seq)
                .max(res.peer_durable_heard().1);
            let start = rep.start_resync(Some(&peer_bitmap), full, res.device().size(), seen);
            let bytes = rep.lock().bitmap.dirty_bytes();
            // The bitmap as merged (every bit, for a full sync) is on disk before the
            // SyncStart: from then on the target forgets its own bits (they are this
            // bitmap's to say, and a cut must not resend them all), so a crash here must not
            // lose them. A full sync counts from a bitmap generation the target takes as its
            // own (see `Msg::SyncStart::from`): every bit is set, so the bitmap trivially
            // records all that differs from it, and a cut leaves the pair at a bitmap resync
            // of the rest. Up to two syncs of this disk, which a busy one may take seconds
            // for: the peer hears pings meanwhile, or it would give up on a silent link.
            let from = {
                // (Only when the target has bits to forget, or every bit is set: a sync of
                // this disk under heavy writes can take seconds.)
                let target_forgets = peer_bitmap.dirty_bits() > 0;
                // Every resync counts from a bitmap generation the target takes as its
                // current one. A bitmap resync at one generation (a crashed primary's hot
                // extents, verify's marks, a target that had not finished) starts one here:
                // a target forced primary midway then moves on from it as this node has (a
                // split brain), where at the old generation it would have looked like the
                // newer copy and resynced its partial data over this node's writes. The
                // fresh id is no point to resume from either: a target that took it would
                // be fresh again after a cut, and a full sync would start over.
                let names_one = !state::names_a_generation(res.node_state().gen.bitmap);
                let prepare = async {
                    if full || target_forgets || names_one {
                        rep.persist().await.map_err(|e| {
                            LinkError::LocalDisk(format!("writing the bitmap of a resync: {e}"))
                        })?;
                    }
                    if names_one {
                        let id = crate::resource::random_id();
                        res.commit_meta(move |sb| {
                            if !state::names_a_generation(sb.gen.bitmap) {
                                sb.gen.bitmap = id;
                            }
                        })
                        .await
                        .map_err(|e| LinkError::LocalDisk(format!("starting a resync: {e}")))?;
                    }
                    Ok::<u64, LinkError>(res.node_state().gen.bitmap)
                };
                tokio::pin!(prepare);
                loop {
                    tokio::select! {
                        r = &mut prepare => break r?,
                        _ = tokio::time::sleep(PING_INTERVAL) => {
                            write_msg(&mut wr, &Msg::Ping { id: 0 }).await?;
                        }
                    }
                }
            };
            tracing::info!(
                "resync to the peer ({}): {bytes} bytes{}",
                e,
                if full { ", full" } else { "" }
            );
            if let Ok(mut w) = res.resync_why.lock() {
                let why = e.to_string();
                *w = if full && !why.starts_with("full") {
                    format!("full sync: {why}")
                } else {
                    why
                };
            }
            write_msg(
                &mut wr,
                &Msg::SyncStart {
                    seq: start,
                    full,
                    bytes,
                    from,
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
    // The peer's durable marks describe this node's generation only once it is at it.
    rep.peer_at_gen_from.store(
        if resync.is_some() || decision != SyncDecision::InSync {
            u64::MAX
        } else {
            0
        },
        std::sync::atomic::Ordering::SeqCst,
    );
    rep.set_connected(true, start - 1, peer_durable);
    if resync.is_some() {
        rep.confirm_resync_start(start);
    }
    // Everything before the stream's start the peer has (or the resync brings): counted as
    // sent, so that a new primary's `status` does not say "sent 0" beside its applied mark.
    rep.stats
        .seq_sent
        .store(start - 1, std::sync::atomic::Ordering::Relaxed);
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
    // Writes suspended by fencing (the link was lost earlier) go on: the peer is back as
    // this node's secondary and gets every one of them in this stream.
    if rep.resume_io() {
        tracing::info!("writes resumed: the peer is connected again and gets them in the stream");
    }
    // A journal catch-up after the generations diverged (this primary lost the peer and moved
    // on) is a sync too: it ends, in stream order, with the same SyncDone as a bitmap resync.
    let journal_sync = resync.is_none() && decision != SyncDecision::InSync;
    let replies = Arc::new(HashReplies::default());
    // Messages to the secondary beside the stream (verify reports); the sender writes them
    // between journal batches.
    let (side_tx, mut side_rx) = mpsc::channel::<Msg>(4);
    // `down` tells the peer through it that this node goes down cleanly (only while this
    // connection runs: dropped with it).
    let _leave = PeerTxGuard::offer(res, PeerTx::Msg(side_tx.clone()));
    let resync_worker = {
        let rep = rep.clone();
        let res = res.clone();
        let replies = replies.clone();
        async move {
            if let Some(total) = resync {
                // A record at the resync's start at once, whatever the resync does first (it
                // may start paused): the writes that waited through the reconnect are
                // answered when the peer has taken it (see `Acks::confirm_from`).
                rep.begin(Record::Checkpoint).await?;
                res.run_handler("before-resync-source");
                run_resync(&res, &rep, total, &replies).await?;
            } else {
                // The journal replays what the bitmap recorded while the peer was away: once
                // the peer is durable through a checkpoint behind it, the bitmap is cleared, even
                // if writes never pause.
                if rep.lock().bitmap.dirty_bits() > 0 {
                    let seq = rep.begin(Record::Checkpoint).await?;
                    rep.lock().clear_at = Some(seq);
                }
                if journal_sync {
                    finish_sync(&res, &rep, std::time::Instant::now(), 0, false).await?;
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
        let side_tx = side_tx.clone();
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
                if let Err(e) = run_verify(&res, &rep, &replies, &side_tx).await {
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
            // A resync's progress goes to the target the same way, whoever asked.
            let mut last_sync = None;
            // So does this node's disk state when it changes (a disk that failed): the peer
            // shows it, and keeps the good copy (see `Resource::peer_disk_failed`).
            let mut last_disk = me.disk;
            // And what this node's metadata holds on disk, as it moves: the peer remembers
            // it, and a later connect in which this node holds less (its disk restored from
            // an image of itself) makes the peer the source (see `state::went_back`).
            let mut last_durable = (0, 0);
            loop {
                tokio::time::sleep(VERIFY_REPORT_INTERVAL).await;
                let now = res.node_state();
                if now.disk != last_disk {
                    last_disk = now.disk;
                    let _ = side_tx.send(Msg::State(now)).await;
                }
                let durable = res.durable_issued_mark();
                if durable != last_durable && state::names_a_generation(durable.0) {
                    last_durable = durable;
                    let (gen, issued) = durable;
                    let _ = side_tx.send(Msg::Durable { gen, issued }).await;
                }
                let r = res.verify_report();
                if r.is_some() && r != last {
                    if let Some(m) = r.clone() {
                        let _ = side_tx.send(Msg::VerifyProgress(m)).await;
                    }
                    last = r;
                }
                // With whether `pause-sync` holds it: the target shows why it stands still.
                let paused = *res.sync_paused.borrow();
                let sync = res
                    .resync
                    .lock()
                    .ok()
                    .and_then(|p| p.map(|p| (p.total, p.done, paused)));
                if let Some((total, done, paused)) = sync {
                    if last_sync != sync {
                        let _ = side_tx
                            .send(Msg::SyncProgress {
                                total,
                                done,
                                paused,
                            })
                            .await;
                        last_sync = sync;
                    }
                }
            }
        }
    };
    let reader = async {
        let mut heard_durable = 0;
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
                    synced,
                    durable,
                } => {
                    // Held to the stream's order whatever the peer says (received, applied,
                    // synced, durable, each at most the one before): a mark past another
                    // answers a client or forgets a record too early.
                    let cap = sent_through.load(std::sync::atomic::Ordering::Relaxed);
                    let applied = applied.min(cap);
                    let synced = synced.min(applied);
                    let durable = durable.min(synced);
                    rep.on_ack(received.min(cap).max(applied), applied, synced, durable);
                    // What the peer's disk holds from here on: remembered (in the metadata
                    // with its next commit), so that an image of its disk restored later,
                    // holding less, is told from a disk that is current (`state::went_back`).
                    // Only at this node's generation, which the peer of a catch-up or a
                    // resync reaches with its SyncDone: noted under this generation before,
                    // it would replace what the peer's disk holds at the one it is still at,
                    // and an image of it restored after a cut went unnoticed.
                    let at_gen = durable
                        >= rep
                            .peer_at_gen_from
                            .load(std::sync::atomic::Ordering::SeqCst);
                    if durable > heard_durable && at_gen {
                        heard_durable = durable;
                        res.note_peer_durable(0, durable);
                    }
                }
                Msg::Ping { .. } => {}
                Msg::State(st) => {
                    state_in_bounds(&st)?;
                    res.set_peer(Some(st));
                }
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
                // A secondary source (its resync done): the target goes down cleanly.
                Msg::Leaving { issued: 0, gen } if res.role() == Role::Secondary => {
                    return Err(peer_leaving(res, 0, gen, 0).await)
                }
                // This primary's secondary goes down cleanly (its everything acknowledged).
                Msg::Leaving { issued: 0, .. } => {
                    res.secondary_stopped();
                    return Err(LinkError::Closed(SECONDARY_STOPPED));
                }
                Msg::Protocol { protocol } => peer_protocol(res, protocol).await?,
                // A resync's target (a secondary too) asks to become primary: this node,
                // its source, may be being promoted itself.
                Msg::PromoteAsk { id } => {
                    // Not waited for (the writer may be waiting for this reader's peer):
                    // an answer that finds the queue full is the asker's timeout.
                    let answer = Msg::promote_answer(id, res.answer_peer_promotion());
                    let _ = side_tx.try_send(answer);
                }
                Msg::PromoteAnswer {
                    id,
                    ok,
                    busy,
                    reason,
                } => promote_answered(res, id, ok, busy, &reason),
                // The secondary reconnects at once (its `invalidate`): not a lost peer.
                Msg::Reconnect => return Err(LinkError::Closed(PEER_RECONNECTS)),
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
        let res = res.clone();
        async move {
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
                // Read each time: `adjust` may change it (0: never).
                let limit = PEER_TIMEOUT * res.cfg().ko_count;
                if now != last || !waiting || limit.is_zero() {
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
/// both sides of the comparison or on neither. Differing blocks are marked out of sync here,
/// and on the peer (`Msg::OutOfSync` through `side_tx`, as DRBD marks both sides), so that
/// its `status` and `wait-sync` do not call it in sync; the next connect resyncs them.
pub(super) async fn run_verify(
    res: &Arc<Resource>,
    rep: &Arc<Replication>,
    replies: &HashReplies,
    side_tx: &mpsc::Sender<Msg>,
) -> Result<(), LinkError> {
    let size = res.device().size();
    let block = res.cfg().bitmap_granularity;
    let span = (1u64 << 20).min(u64::from(peer::MAX_HASH_SPAN)).max(block);
    let mut pace = Pace::new(res.cfg().resync_rate);
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
            let (seq, mine) = rep
                .verify_chunk(&file, at, len as u32, block as u32, &mut buf)
                .await
                .map_err(|e| step_error(res, e))?;
            replies.expect(seq, mine.len());
            pending.push_back((seq, at, len, mine));
            at += len;
        }
        let Some((seq, off, len, mine)) = pending.pop_front() else {
            break;
        };
        let theirs = replies.take(seq).await?;
        let differ = crate::replication::differing_blocks(&mine, &theirs);
        regions += differ.len() as u64;
        for (first, count) in crate::replication::runs(&differ) {
            let s = off + first as u64 * block;
            let n = (count as u64 * block).min(off + len - s);
            rep.mark_out_of_sync(s, n);
            bytes += n;
            tracing::warn!("verify: {s}+{n} differs on the peer");
            // A connection that ends meanwhile is no loss: the next one resyncs the marks.
            let _ = side_tx.send(Msg::OutOfSync { offset: s, len: n }).await;
        }
        done += len;
        res.update_verify(|v| {
            v.done = done;
            v.differ_regions = regions;
            v.differ_bytes = bytes;
        });
        pace.wait(done, || res.cfg().resync_rate).await;
    }
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        "verify run {run} done: {regions} regions ({bytes} bytes) differ, {size} bytes compared in {secs:.1} s{}",
        if regions > 0 {
            "; they are marked out of sync: `invalidate-remote --reset-bitmap=no` on the primary resyncs them"
        } else {
            ""
        }
    );
    // The marks on disk before the run says done: a crash of this node right after would
    // otherwise leave them to the once-a-second persister, and its restart (a crashed
    // primary) would resync only its hot extents, not the regions found different.
    if regions > 0 {
        if let Err(e) = rep.persist().await {
            tracing::error!("writing verify's marks to the bitmap failed: {e}; the next periodic write tries again");
        }
    }
    res.update_verify(|v| {
        v.state = "done";
        v.done = size;
    });
    Ok(())
}

/// The source's resync: every dirty region goes out as a stream record, paced by the
/// configured rate; then a SyncDone record, and once the target applied it, the bitmap
/// generation is forgotten.
/// Paces a resync or verify to a rate in bytes per second (0: unlimited), counted from the
/// last change of rate, so that `adjust` takes effect at once in either direction.
struct Pace {
    rate: u64,
    since: std::time::Instant,
    base: u64,
}

/// How far a resync may run ahead of its rate after a stretch below it (see `Pace::wait`).
const PACE_CREDIT: Duration = Duration::from_secs(1);

impl Pace {
    fn new(rate: u64) -> Self {
        Pace {
            rate,
            since: std::time::Instant::now(),
            base: 0,
        }
    }

    /// A new rate from here on (`bytes`: what was counted so far).
    fn set(&mut self, rate: u64, bytes: u64) {
        if rate != self.rate {
            *self = Pace {
                rate,
                since: std::time::Instant::now(),
                base: bytes,
            };
        }
    }

    /// Counts from here on (`bytes`: what was counted so far): after a pause, so that the
    /// paused time is not made up for with a burst.
    fn restart(&mut self, bytes: u64) {
        *self = Pace {
            rate: self.rate,
            since: std::time::Instant::now(),
            base: bytes,
        };
    }

    /// Sleeps until `bytes` (counted as in [`Self::set`]) are due at the rate, which
    /// `rate` reads again every fifth of a second: a chunk paced at a low rate may owe
    /// minutes, and an `adjust` must not wait for them.
    async fn wait(&mut self, bytes: u64, rate: impl Fn() -> u64) {
        loop {
            self.set(rate(), bytes);
            if self.rate == 0 {
                return;
            }
            let due =
                Duration::from_secs_f64(bytes.saturating_sub(self.base) as f64 / self.rate as f64);
            let el = self.since.elapsed();
            // At most a second of credit: time spent on regions that moved no data (zeros,
            // equal checksums) or held to the rate floor is not made up for with a burst
            // above the rate.
            if el > due + PACE_CREDIT {
                self.since = std::time::Instant::now()
                    .checked_sub(PACE_CREDIT)
                    .unwrap_or_else(std::time::Instant::now);
                self.base = bytes;
                return;
            }
            if due <= el {
                return;
            }
            tokio::time::sleep((due - el).min(Duration::from_millis(200))).await;
        }
    }
}

/// `pause-sync`: the resync waits here, before its next region, until `resume-sync`. The link
/// is watched meanwhile (a lost peer ends the resync, as anywhere else), no journal space is
/// held back for it (its rate floor is off), and its pace counts again from the resume.
async fn wait_while_paused(
    res: &Resource,
    rep: &Replication,
    pace: &mut Pace,
    data_bytes: u64,
) -> Result<(), LinkError> {
    let mut paused = res.sync_paused.subscribe();
    if !*paused.borrow_and_update() {
        return Ok(());
    }
    tracing::info!("resync paused (pause-sync): it goes on at resume-sync");
    let set_paused = |paused: bool| {
        if let Ok(mut p) = res.resync.lock() {
            if let Some(p) = p.as_mut() {
                p.set_paused(paused);
            }
        }
    };
    set_paused(true);
    rep.resync_floor
        .store(0, std::sync::atomic::Ordering::SeqCst);
    loop {
        if !rep.acks().connected {
            return Err(LinkError::Closed("peer lost during resync"));
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), paused.changed()).await;
        if !*paused.borrow_and_update() {
            break;
        }
    }
    rep.resync_floor.store(
        res.cfg().resync_rate_min,
        std::sync::atomic::Ordering::SeqCst,
    );
    set_paused(false);
    pace.restart(data_bytes);
    tracing::info!("resync resumed (resume-sync)");
    Ok(())
}

pub(super) async fn run_resync(
    res: &Arc<Resource>,
    rep: &Arc<Replication>,
    total: u64,
    replies: &HashReplies,
) -> Result<(), LinkError> {
    let size = res.device().size();
    let csums = res.cfg().csums;
    let block = res.cfg().bitmap_granularity;
    let file = crate::replication::open_for_resync(&res.cfg().me.backing)?;
    let started = std::time::Instant::now();
    if let Ok(mut p) = res.resync.lock() {
        *p = Some(crate::resource::ResyncProgress::start(total));
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
    let mut pace = Pace::new(res.cfg().resync_rate);
    let mut equal_bytes = 0u64;
    // A chunk is one journal record: keep it well inside the journal (the metadata's, which
    // is what runs: a config's different journal-size waits for create-md).
    let journal_cap = rep.lock().ring.cap();
    let chunk = (1u64 << 20)
        .min(journal_cap / 8)
        .max(block)
        .min(u64::from(peer::MAX_HASH_SPAN));
    // Checksum resync: hash requests in flight ahead of the regions being decided.
    const CSUM_WINDOW: usize = 16;
    // (sequence, offset, length, pins before the request: see `resync_csum_chunk`)
    let mut asked: std::collections::VecDeque<(u64, u64, u64, u64)> = Default::default();
    if csums {
        tracing::info!("checksum resync (sha256 per {block} bytes): only differing regions move");
    }
    loop {
        wait_while_paused(res, rep, &mut pace, data_bytes).await?;
        // One region (or, with checksums, one answered hash request) per turn.
        let progressed = if csums {
            while asked.len() < CSUM_WINDOW {
                let Some((off, len)) = rep.next_dirty(at, chunk, size) else {
                    break;
                };
                let count = peer::hash_count(len as u32, block as u32).ok_or_else(|| {
                    LinkError::Protocol(format!("resync region {off}+{len} out of hash bounds"))
                })?;
                let pins = rep.pins();
                let seq = rep
                    .hash_request(off, len as u32, block as u32)
                    .await
                    .map_err(|e| step_error(res, e))?;
                replies.expect(seq, count);
                asked.push_back((seq, off, len, pins));
                at = off + len;
            }
            match asked.pop_front() {
                Some((seq, off, len, pins)) => {
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
                                pins,
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
                        // The writes the run's hold kept waiting take their sequences now,
                        // before the next run holds the rest of the region.
                        tokio::task::yield_now().await;
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
            if let Some(p) = p.as_mut() {
                p.advance(total, sent);
            }
        }
        // Rate limit on the data that travels (zero and equal regions are a header each).
        // Read each turn: `adjust` may change the rate (and the floor) mid-resync.
        rep.resync_floor.store(
            res.cfg().resync_rate_min,
            std::sync::atomic::Ordering::SeqCst,
        );
        pace.wait(data_bytes, || res.cfg().resync_rate).await;
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
    finish_sync(res, rep, started, sent, true).await?;
    if let Ok(mut p) = res.resync.lock() {
        *p = None;
    }
    Ok(())
}

/// Ends a sync: a SyncDone record after everything sent; once the target applied it, both
/// sides are on this node's generation and the bitmap generation is forgotten. `resync`: a
/// bitmap resync, which ran `before-resync-source` (a journal catch-up runs neither handler).
pub(super) async fn finish_sync(
    res: &Arc<Resource>,
    rep: &Arc<Replication>,
    started: std::time::Instant,
    sent: u64,
    resync: bool,
) -> Result<(), LinkError> {
    // A source whose disk lost writes during the resync may have sent damaged regions: the
    // target must not be declared up to date from them.
    if res.device().sync_failed() {
        return Err(LinkError::LocalDisk(
            "this node's disk lost writes during the resync: the peer is not declared up to date from it".into(),
        ));
    }
    // A region marked out of sync since the last sweep (a client write this disk failed
    // after the peer applied it): the target is not declared in sync over it; the next
    // connect resyncs what is marked. (A journal catch-up clears the bitmap at its own
    // checkpoint: its bits are expected here.) Checked before the SyncDone is recorded as
    // sent. A write whose local half fails after this check is not covered: it marks its
    // region here, and the next connect resyncs it.
    if resync && rep.lock().bitmap.dirty_bits() > 0 {
        return Err(LinkError::NeedsResync(format!(
            "{} bytes were marked out of sync as the resync ended: resyncing them",
            rep.lock().bitmap.dirty_bytes()
        )));
    }
    let gen = res.node_state().gen;
    // On disk before the SyncDone leaves: if its acknowledgement never comes, the target may
    // be at `gen.current` (see `Superblock::sync_done_sent`), and later generations here must
    // not make that look like a split brain.
    let recorded = res.sync_done_sent() == (gen.bitmap, gen.current);
    if state::names_a_generation(gen.bitmap) && !recorded {
        res.commit_meta(move |sb| {
            if sb.gen.bitmap == gen.bitmap {
                sb.sync_done_sent = (gen.bitmap, gen.current);
            }
        })
        .await
        .map_err(|e| LinkError::LocalDisk(format!("recording the end of the resync: {e}")))?;
    }
    let seq = rep.begin(Record::SyncDone { gen }).await?;
    rep.peer_at_gen_from
        .store(seq, std::sync::atomic::Ordering::SeqCst);
    let mut rx = rep.subscribe_acks();
    let _ = rx.wait_for(|a| !a.connected || a.applied >= seq).await;
    if rep.acks().applied >= seq {
        let secs = started.elapsed().as_secs_f64();
        // The target ends no better than this node's disk (an outdated source leaves an
        // outdated copy), unless this resync ends an outdated crashed primary's mark (below).
        let good = res.node_state().disk == 2
            || res
                .premature_outdate
                .load(std::sync::atomic::Ordering::SeqCst);
        let peer_is = if good {
            "up to date"
        } else {
            "in sync with this node, and outdated like it"
        };
        if resync {
            tracing::info!("resync done: {sent} bytes in {secs:.1} s; the peer is {peer_is}");
        } else {
            tracing::info!(
                "journal catch-up done: the peer applied every write through sequence {seq} in {secs:.1} s; it is {peer_is}"
            );
        }
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
        // An outdated crashed primary at the peer's generation was the source of its hot
        // extents (see `state::effective_disk`): with them resynced, its mark goes.
        let premature = res
            .premature_outdate
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        res.commit_meta(move |sb| {
            sb.gen = state::after_sync(sb.gen);
            sb.sync_done_sent = (0, 0);
            if premature && sb.disk == crate::meta::DiskState::Outdated {
                sb.disk = crate::meta::DiskState::UpToDate;
            }
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
        if resync {
            res.run_handler("after-resync-source");
        }
    }
    if let Ok(mut p) = res.resync.lock() {
        *p = None;
    }
    Ok(())
}

/// How long the source waits for the answer to one hash request.
pub(super) const HASH_ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// Expected hash answers: request sequence → (number of hashes, the answer once arrived).
pub(super) type ReplyMap = std::collections::HashMap<u64, (usize, Option<Vec<[u8; 32]>>)>;

/// Hash answers (`Msg::Hashes`) the source waits for, by request sequence. Answers nobody
/// waits for (a request replayed from the journal after a reconnect) are dropped, so memory
/// is bounded by what the workers asked for.
#[derive(Default)]
pub(super) struct HashReplies {
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

#[cfg(test)]
mod pace_tests {
    use super::*;

    /// A stretch that moved nothing (zero or equal regions) banks at most a second of credit:
    /// the data after it still goes at the rate, not in a burst.
    #[tokio::test]
    async fn a_slow_stretch_banks_at_most_a_second_of_credit() {
        let rate = 1 << 20;
        let mut pace = Pace {
            rate,
            since: std::time::Instant::now() - Duration::from_secs(10),
            base: 0,
        };
        // Ten seconds with nothing moved.
        pace.wait(0, || rate).await;
        // A second and a half's worth next: one is credit, half a second is waited.
        let t = std::time::Instant::now();
        pace.wait(rate + rate / 2, || rate).await;
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(350),
            "the burst went out after {waited:?}: ten seconds of credit were spent"
        );
    }
}
