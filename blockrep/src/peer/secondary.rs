//! The secondary's side of a connection: the stream applied in order (overlapping writes in
//! sequence, the rest concurrently), its progress acknowledged, durability checkpointed.

use super::*;

/// Counts a task among the waiters of an [`ApplyState`] counter while it waits (also when
/// its future is dropped mid-wait).
pub(super) struct Waiting<'a> {
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
pub(super) struct ApplyState {
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
    /// Everything through it synced to this disk: acknowledged at once, so that a flush
    /// under C is answered without waiting for the commit of `durable`.
    synced: u64,
    /// Synced, and the applied mark through it committed: a restart resumes after it.
    durable: u64,
    /// Tasks waiting for an earlier overlapping write ([`Applier::wait_turn`]) and for the
    /// applied mark ([`Applier::wait_applied`]): a finished record wakes them only when
    /// there are any (usually none: a wake-up per record would cost more than its apply).
    range_waiters: usize,
    mark_waiters: usize,
}

/// Most term changes among received but unapplied records.
pub(super) const MAX_TERM_CHANGES: usize = crate::replication::APPLY_WINDOW + 2;

/// Bytes of received payload being applied at once, at most (one record larger than this
/// takes the whole budget): 64 MiB, counted in units of 64 KiB.
const APPLY_BYTES_UNIT: usize = 64 << 10;
const APPLY_BYTES_UNITS: u32 = 1024;
/// Writes the receiver applies from one batch before it lets the acker run, under C: the
/// primary's waiting writes are acknowledged a few at a time, so it answers its client while
/// the rest of the batch is applied here, instead of after all of it. (Under A no write
/// waits; under B the receipt already goes out before the apply.) Each ack costs the primary
/// a wake-up and a receive: 8 did 6.5 % more 4 KiB writes at depth 32 than 4 (6 of 7
/// interleaved rounds, with the primary's batches of 16), and 16 less than 8.
const APPLY_YIELD_EVERY: usize = 8;

pub(super) struct Applier {
    res: Arc<Resource>,
    st: Mutex<ApplyState>,
    range_done: Notify,
    /// Wakes the acker when a mark moved (one waiter, so a permit is kept: no change is
    /// missed, and many changes before it runs cost one wake-up).
    progressed: Notify,
    /// Wakes the tasks waiting for the applied mark (flushes, checkpoints, FUA writes,
    /// SyncDone).
    mark_moved: Notify,
    window: Arc<Semaphore>,
    /// Payload bytes of the records being applied, in [`APPLY_BYTES_UNIT`]s: the window
    /// counts records, and 128 of the largest would be gigabytes.
    bytes: Arc<Semaphore>,
    persist: tokio::sync::Mutex<()>,
    /// Protocol B: the receiver asks the acker to report a receipt before the write is
    /// applied, because the primary's client is waiting for exactly that.
    ack_receipt_now: std::sync::atomic::AtomicBool,
    /// A write, flush or commit of the stream failed on this disk. From then on nothing is
    /// acknowledged and the link drops: the primary keeps every record this node did not
    /// acknowledge, and puts it in its bitmap.
    failed: watch::Sender<Option<String>>,
    /// `Replication::pins` when this stream started: a verify mark the primary sends during
    /// it (a verify runs beside a journal catch-up) must outlive the catch-up's SyncDone.
    pins_at_start: u64,
    /// `Resource::disk_failures` when this stream started: a failed write or an
    /// `invalidate` since then (the stream's SyncStart or SyncDone may be read after either)
    /// must not be overwritten by their commits (an up-to-date disk, or a resync generation
    /// a later connect would take for a bitmap resync).
    failures_at_start: u64,
}

impl Applier {
    fn lock(&self) -> std::sync::MutexGuard<'_, ApplyState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The marks the acker reports.
    fn marks(&self) -> Marks {
        let s = self.lock();
        Marks {
            received: s.received,
            applied: s.applied,
            synced: s.synced,
            durable: s.durable,
        }
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
        self.wait_until(
            &self.mark_moved,
            |s| &mut s.mark_waiters,
            |s| s.applied >= seq,
        )
        .await
    }

    /// Returns once no earlier record with an overlapping range is in flight: overlapping
    /// records are applied in stream order.
    async fn wait_turn(&self, seq: u64, range: (u64, u64)) {
        self.wait_until(
            &self.range_done,
            |s| &mut s.range_waiters,
            |s| !s.ranges.blocked(seq, range),
        )
        .await
    }

    /// Returns once `ready` holds, woken by `notify`; counted in `counter` while it waits, so
    /// that the side that changes the state notifies only when someone waits.
    async fn wait_until(
        &self,
        notify: &Notify,
        counter: fn(&mut ApplyState) -> &mut usize,
        ready: impl Fn(&ApplyState) -> bool,
    ) {
        if ready(&self.lock()) {
            return;
        }
        let _counted = Waiting::new(self, counter);
        loop {
            // Registered before the re-check, so that a notification in between is not
            // missed.
            let n = notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if ready(&self.lock()) {
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
        self.res.mark_inconsistent().await;
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
                // Only ever raised: two finishes on the engine's threads may get here out of
                // order once the apply lock is released.
                let mut g = rep.lock();
                if a >= g.applied {
                    g.applied = a;
                    g.applied_term = term;
                }
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
        // The mark first, then the failure check: a failed write records its failure before
        // it finishes, so a mark that passed it is always seen with the failure.
        let (upto, term) = {
            let s = self.lock();
            (s.applied, s.applied_term)
        };
        if let Some(e) = self.failure() {
            return Err(e);
        }
        if upto <= self.lock().durable {
            return Ok(upto);
        }
        self.sync_through(upto).await?;
        self.note_synced(upto);
        self.commit_durable(upto, term).await?;
        Ok(upto)
    }

    /// A flush record at `seq` (under `term`) whose predecessors are all applied: one sync of
    /// the data, then the record (it carries none) counts as applied and the mark through it
    /// is committed and acknowledged as durable. Before, the flush took two rounds of data
    /// sync and metadata commit, the second only to cover the flush record itself: four syncs
    /// of this disk per client flush, on a database's commit path.
    ///
    /// The record is finished in any case (later records wait for it), after the sync: the
    /// barrier holds until then.
    ///
    /// `own_data`: the record at `seq` is a FUA write, applied (not finished yet): the sync
    /// covers it too, and runs even when everything before it is durable already.
    async fn make_flush_durable(
        &self,
        seq: u64,
        term: u64,
        own_data: bool,
    ) -> Result<(), LinkError> {
        let _one = self.persist.lock().await;
        let synced = async {
            // After the caller saw every record before `seq` applied: a failed one recorded
            // its failure before it finished, so it shows here.
            if let Some(e) = self.failure() {
                return Err(e);
            }
            if !own_data && self.lock().durable >= seq - 1 {
                return Ok(());
            }
            self.sync_through(if own_data { seq } else { seq - 1 })
                .await
        }
        .await;
        self.finish(seq);
        synced?;
        // The flush record is applied (finished above) and carries no data of its own.
        self.note_synced(seq);
        self.commit_durable(seq, term).await
    }

    /// Everything through `upto` (applied) is synced to this disk: acknowledged at once,
    /// before the applied mark that says so is committed. A flush under C waits for this;
    /// the primary forgets nothing until the commit (`durable`), so a crash in between costs
    /// only a replay of records this disk already holds.
    fn note_synced(&self, upto: u64) {
        {
            let mut s = self.lock();
            debug_assert!(
                upto <= s.applied,
                "synced {upto} past applied {}",
                s.applied
            );
            s.synced = s.synced.max(upto.min(s.applied));
        }
        self.publish();
    }

    /// The data sync that makes everything applied through `upto` durable; a failure is
    /// recorded (nothing more is acknowledged, the link drops).
    async fn sync_through(&self, upto: u64) -> Result<(), LinkError> {
        if let Err(e) = self.res.device().local_flush().await {
            let why = format!(
                "flushing the applied stream through sequence {upto} failed (NBD error {e})"
            );
            self.fail(why.clone()).await;
            return Err(LinkError::LocalDisk(why));
        }
        Ok(())
    }

    /// After the data sync: commits the applied mark `(upto, term)`, then acknowledges it as
    /// durable (never lower than a durable mark already acknowledged).
    async fn commit_durable(&self, upto: u64, term: u64) -> Result<(), LinkError> {
        if let Err(e) = self
            .res
            .commit_meta(move |sb| sb.advance_applied((upto, term)))
            .await
        {
            let why = format!("persisting the applied sequence {upto}: {e}");
            self.fail(why.clone()).await;
            return Err(LinkError::LocalDisk(why));
        }
        {
            let mut s = self.lock();
            s.durable = s.durable.max(upto);
            s.synced = s.synced.max(s.durable);
        }
        self.publish();
        Ok(())
    }
}

/// What the secondary acknowledges (see [`Msg::Ack`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Marks {
    pub received: u64,
    pub applied: u64,
    pub synced: u64,
    pub durable: u64,
}

/// The acknowledgement of `m`.
fn ack_of(m: Marks) -> Msg {
    Msg::Ack {
        received: m.received,
        applied: m.applied,
        synced: m.synced,
        durable: m.durable,
    }
}

/// Whether the secondary must acknowledge its progress now rather than within [`ACK_DEFER`]:
/// when a mark moved that writes on the primary wait for. That is the durable mark under
/// every protocol (a planned disconnect, the activity log, a full list of undurable
/// records), the receipt under B, and the write and the synced mark (flushes, FUA writes)
/// under C. Under A no client write waits for the peer; acknowledgements release the
/// journal, so writers waiting for space in a full journal, and the end of a resync, wait
/// up to [`ACK_DEFER`] longer.
pub(super) fn ack_is_urgent(protocol: Protocol, sent: Marks, now: Marks) -> bool {
    now.durable > sent.durable
        || match protocol {
            Protocol::A => false,
            Protocol::B => now.received > sent.received,
            Protocol::C => now.applied > sent.applied || now.synced > sent.synced,
        }
}

pub(super) async fn secondary_side(
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
    // A new stream: the handshake carried the disk as it is, outdated included, and the
    // resync this stream may end with is what brings it up to date.
    res.leaving_outdated
        .store(false, std::sync::atomic::Ordering::SeqCst);
    // As the connect counted it (an outdated crashed primary at this generation is good).
    let mine = res.node_state();
    let source_disk = state::effective_disk(
        peer.disk,
        peer.crashed_primary && !mine.crashed_primary,
        peer.gen.current == mine.gen.current,
    );
    // What the source had issued when it sent its state: a SyncDone at or below it was
    // written before this connection (this one's end comes after its stream started), and
    // is an earlier connection's, replayed from the journal by a catch-up.
    let issued_at_connect = peer.issued_seq;
    // The source's data moved on from this node's generation: a stream without a SyncStart
    // is a journal catch-up, which ends with the SyncDone that makes this node current again.
    let behind = peer.gen.current != mine.gen.current;
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
            synced: durable0,
            durable: durable0,
            range_waiters: 0,
            mark_waiters: 0,
        }),
        range_done: Notify::new(),
        progressed: Notify::new(),
        mark_moved: Notify::new(),
        window: rep.apply_window.clone(),
        bytes: Arc::new(Semaphore::new(APPLY_BYTES_UNITS as usize)),
        persist: tokio::sync::Mutex::new(()),
        ack_receipt_now: std::sync::atomic::AtomicBool::new(false),
        failed: watch::channel(None).0,
        pins_at_start: rep.pins(),
        failures_at_start: res.disk_failures.load(std::sync::atomic::Ordering::SeqCst),
    });
    // The earlier stream's tail becomes durable now, not at the next checkpoint.
    ap.make_durable().await?;
    send_bitmap(&mut wr, &rep).await?;
    tracing::info!(
        "receiving from the peer from sequence {} (it issued {})",
        applied0 + 1,
        peer.issued_seq
    );
    res.set_link_state("connected", None);
    // Answers to hash requests (checksum resync, verify), sent by the acker.
    let (reply_tx, mut reply_rx) = mpsc::channel::<Vec<u8>>(64);
    // A secondary's `down` tells an idle secondary peer through it (see `PeerTx`).
    let _leave = PeerTxGuard::offer(res, PeerTx::Frame(reply_tx.clone()));
    // Hash requests read this node's data through their own handle, off the async threads.
    let hash_file = Arc::new(crate::replication::open_for_resync(&res.cfg().me.backing)?);
    // Hash requests read (up to MAX_HASH_SPAN each) a few at a time: bounded memory.
    let hash_reads = Arc::new(Semaphore::new(8));
    let acker = {
        let rep = rep.clone();
        let mut failed = ap.failed.subscribe();
        let ap = ap.clone();
        async move {
            let mut ack = true;
            // What the primary was last told, and until when a change it does not wait for
            // may be held back (one ack then covers many such changes).
            let mut sent: Option<Marks> = None;
            let mut deferred: Option<tokio::time::Instant> = None;
            loop {
                if ack {
                    let marks = ap.marks();
                    // After a local disk failure nothing more is acknowledged; the primary is
                    // told why, so that it backs off before trying again. (A failure while
                    // no ack was due wakes the select below, which then asks for one.)
                    let failed = ap.failed.borrow().clone();
                    if let Some(d) = failed {
                        // Named for the reader on the other node ("this node" would be it).
                        let why = format!("{}'s disk failed: {d}", ap.res.cfg().me.name);
                        let _ = write_msg(&mut wr, &Msg::refuse(&why)).await;
                        return Err(LinkError::LocalDisk(d));
                    }
                    let due = match sent {
                        None => true,
                        Some(last) => {
                            // Read each time: `adjust` may change it.
                            ack_is_urgent(rep.protocol(), last, marks)
                                || deferred.is_some_and(|t| t <= tokio::time::Instant::now())
                        }
                    };
                    if due {
                        write_msg(&mut wr, &ack_of(marks)).await?;
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
                    _ = ap.res.final_ack.notified() => {
                        // This node goes down (see `Resource::final_ack_to_primary`). Its
                        // sync may take long (everything applied since the last checkpoint,
                        // on a slow disk): the primary hears pings meanwhile, or it would take
                        // a planned stop for a lost peer (fencing, `peer-lost`).
                        let durable = ap.make_durable();
                        tokio::pin!(durable);
                        let mut ping = tokio::time::interval_at(
                            tokio::time::Instant::now() + PING_INTERVAL,
                            PING_INTERVAL,
                        );
                        loop {
                            tokio::select! {
                                r = &mut durable => {
                                    r?;
                                    break;
                                }
                                _ = ping.tick() => {
                                    write_msg(&mut wr, &Msg::Ping { id: 0 }).await?;
                                }
                            }
                        }
                        let marks = ap.marks();
                        write_msg(&mut wr, &ack_of(marks)).await?;
                        sent = Some(marks);
                        ap.res.final_acked.notify_waiters();
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
            // A resync starts a stream, never joins one: a SyncStart after records would
            // reset the marks over writes in flight.
            let mut records_seen = false;
            // Writes applied since the receiver last let the acker run.
            let mut since_yield = 0usize;
            loop {
                let (msg, payload, n) = read_frame_within(
                    &mut rd,
                    res,
                    PEER_TIMEOUT,
                    "no frame from the primary (ping timeout)",
                )
                .await?;
                if msg.seq().is_some() && !records_seen {
                    records_seen = true;
                    // A catch-up from a source that moved on: this node is outdated until its
                    // SyncDone (on disk before the first record is applied). Were the source
                    // lost midway, a plain `primary` here would otherwise promote a copy
                    // without the rest of the catch-up, writes the source acknowledged (a
                    // resync's target is inconsistent from its SyncStart, as in DRBD).
                    if behind {
                        res.update_meta_if_changed(|sb| {
                            if sb.disk == DiskState::UpToDate {
                                sb.disk = DiskState::Outdated;
                            }
                            Ok(())
                        })
                        .await
                        .map_err(|e| {
                            LinkError::LocalDisk(format!("recording the catch-up's start: {e}"))
                        })?;
                    }
                }
                rep.stats
                    .bytes_received
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                let seq = match msg.seq() {
                    Some(s) => s,
                    None => match msg {
                        Msg::Ping { .. } => continue,
                        Msg::SyncStart { seq, .. } if seq == 0 || seq >= PEER_COUNTER_LIMIT => {
                            return Err(LinkError::Protocol(format!(
                                "resync start at sequence {seq} (sequences run from 1 to {PEER_COUNTER_LIMIT})"
                            )))
                        }
                        Msg::SyncStart { seq, .. } if records_seen => {
                            return Err(LinkError::Protocol(format!(
                                "resync start at sequence {seq} in the middle of the stream"
                            )))
                        }
                        Msg::SyncStart { .. } if res.stream_held() => {
                            return Err(LinkError::Closed("this node is being promoted"))
                        }
                        Msg::SyncStart {
                            seq,
                            full,
                            bytes,
                            from,
                        } => {
                            // This node becomes the sync target: inconsistent until SyncDone.
                            tracing::info!(
                                "resync from {}: {bytes} bytes{}, stream from sequence {seq}",
                                peer_name(res),
                                if full { ", full" } else { "" }
                            );
                            res.run_handler("before-resync-target");
                            if let Ok(mut w) = res.resync_why.lock() {
                                // Only the kind: SyncStart carries no reason (the source's
                                // status and log say why).
                                *w = if full {
                                    format!("full sync from {}: every block", peer_name(res))
                                } else {
                                    format!(
                                        "resync from {} of the regions its bitmap names (its status says why)",
                                        peer_name(res)
                                    )
                                };
                            }
                            res.resync_target_started
                                .store(true, std::sync::atomic::Ordering::SeqCst);
                            res.set_link_state("sync-target", None);
                            if let Ok(mut p) = res.resync.lock() {
                                *p = Some(crate::resource::ResyncProgress::start(bytes));
                            }
                            // From here on this node's data counts from the source's
                            // bitmap generation (what it held before is being replaced), so
                            // that a cut resumes with what is left, and a forced promotion
                            // of this node midway moves on from where the source's bitmap
                            // counts (a split brain, not an older copy that looks newer).
                            // Committed before anything of the stream is applied.
                            // And what is left is the source's bitmap's to say from now on:
                            // it merged this node's bits, and had them on its disk before
                            // this start. So this node forgets its own (a disk that lost
                            // writes no longer names every region itself), or each cut
                            // would resend them all: a full resync after a disk failure
                            // started again from zero. Its disk stays inconsistent.
                            let (res2, at_start) = (res.clone(), ap.failures_at_start);
                            let started = res
                                .update_meta(move |sb| {
                                    if res2.disk_failures.load(std::sync::atomic::Ordering::SeqCst)
                                        != at_start
                                    {
                                        return Ok(false);
                                    }
                                sb.disk = DiskState::Inconsistent;
                                sb.lost_writes = false;
                                // The mark this node acknowledges as durable from here on
                                // (the stream's start: everything before it is the
                                // resync's), on disk before it is acknowledged: a source
                                // takes a lower one at the next connect for a disk that
                                // went back in time.
                                sb.advance_applied((seq - 1, 0));
                                if from != 0 {
                                    sb.gen.current = from;
                                    sb.gen.bitmap = 0;
                                }
                                // Its data is being replaced: a SyncDone this node once sent
                                // as a source no longer says where any peer is.
                                sb.sync_done_sent = (0, 0);
                                    Ok(true)
                                })
                                .await
                                .map_err(|e| {
                                    LinkError::LocalDisk(format!(
                                        "recording the resync's start: {e}"
                                    ))
                                })?;
                            if !started {
                                return Err(LinkError::Closed(
                                    "the disk was marked inconsistent (a failed write, or invalidate) since this stream began",
                                ));
                            }
                            // (A crash before the cleared bitmap is on disk loads the bits
                            // again: sent once more, nothing lost.)
                            let had_bits = {
                                let mut g = rep.lock();
                                let had = g.bitmap.dirty_bits() > 0;
                                g.bitmap.clear_all();
                                // Its verify marks were among those bits.
                                rep.verify_marked
                                    .store(false, std::sync::atomic::Ordering::SeqCst);
                                had
                            };
                            if had_bits {
                                if let Err(e) = rep.persist().await {
                                    tracing::warn!("writing the cleared bitmap: {e}");
                                }
                            }
                            // The record before the resync's stream is not one this node
                            // holds: term 0 until the stream's own records are applied.
                            {
                                let mut s = ap.lock();
                                s.received = seq - 1;
                                s.applied = seq - 1;
                                s.applied_term = 0;
                                s.terms = std::collections::VecDeque::from([(seq - 1, 0)]);
                                s.synced = seq - 1;
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
                            state_in_bounds(&st)?;
                            res.peer_disk_failed(&st).await;
                            res.set_peer(Some(st));
                            continue;
                        }
                        Msg::VerifyProgress(r) => {
                            res.verify_reported(&r);
                            continue;
                        }
                        Msg::Leaving { issued, gen } => {
                            let durable = ap.lock().durable;
                            return Err(peer_leaving(res, issued, gen, durable).await);
                        }
                        Msg::Reconnect => return Err(LinkError::Closed(PEER_RECONNECTS)),
                        // Only from a secondary source (a primary would be refused there
                        // anyway): not waited for, like the primary side's answer.
                        Msg::PromoteAsk { id } => {
                            let answer = Msg::promote_answer(id, res.answer_peer_promotion());
                            let mut f = Vec::with_capacity(64);
                            peer::encode_frame(&mut f, &answer, &[]);
                            let _ = reply_tx.try_send(f);
                            continue;
                        }
                        Msg::PromoteAnswer {
                    id,
                    ok,
                    busy,
                    reason,
                } => {
                            promote_answered(res, id, ok, busy, &reason);
                            continue;
                        }
                        Msg::Protocol { protocol } => {
                            peer_protocol(res, protocol).await?;
                            continue;
                        }
                        Msg::Durable { gen, issued } => {
                            // Told back to the source at the next connect (see
                            // `state::went_back`); a sequence past the bound is no mark.
                            if issued >= PEER_COUNTER_LIMIT {
                                return Err(LinkError::Protocol(format!(
                                    "the source reports issued sequence {issued} durable (sequences run to {PEER_COUNTER_LIMIT})"
                                )));
                            }
                            if crate::state::names_a_generation(gen) {
                                res.note_peer_durable(gen, issued);
                            }
                            continue;
                        }
                        Msg::OutOfSync { offset, len } => {
                            let size = res.device().size();
                            if len == 0 || offset.checked_add(len).is_none_or(|end| end > size)
                            {
                                return Err(LinkError::Protocol(format!(
                                    "out-of-sync mark {offset}+{len} outside the {size}-byte device"
                                )));
                            }
                            if let Some(rep) = res.rep() {
                                rep.mark_out_of_sync(offset, len);
                            }
                            tracing::warn!(
                                "the primary's verify found {offset}+{len} different on the two nodes: marked out of sync here too (disconnect and connect to resync it from the primary)"
                            );
                            continue;
                        }
                        Msg::SyncProgress {
                            total,
                            done,
                            paused,
                        } => {
                            // Shown by `status` only: nothing here depends on it.
                            if res.link_state() == "sync-target" {
                                if res
                                    .sync_paused_by_peer
                                    .swap(paused, std::sync::atomic::Ordering::Relaxed)
                                    != paused
                                {
                                    crate::bell::ring();
                                }
                                if let Ok(mut p) = res.resync.lock() {
                                    p.get_or_insert_with(|| {
                                        crate::resource::ResyncProgress::start(total)
                                    })
                                    .advance(total, done.min(total));
                                    if let Some(p) = p.as_mut() {
                                        p.set_paused(paused);
                                    }
                                }
                            }
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
                // A promotion under way: no stream record may write this disk any more.
                if res.stream_held() {
                    return Err(LinkError::Closed("this node is being promoted"));
                }
                // Refused before it counts as received: under B the primary answers its client
                // on the receipt alone.
                record_in_bounds(&msg, res.device().size())?;
                let units = payload.as_ref().map_or(0, |p| {
                    u32::try_from(p.len().div_ceil(APPLY_BYTES_UNIT))
                        .unwrap_or(u32::MAX)
                        .min(APPLY_BYTES_UNITS)
                });
                let bytes = if units > 0 {
                    Some(
                        ap.bytes
                            .clone()
                            .acquire_many_owned(units)
                            .await
                            .map_err(|_| LinkError::Closed("apply budget closed"))?,
                    )
                } else {
                    None
                };
                // Dropped together, when the record is applied.
                let permit = (
                    ap.window
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|_| LinkError::Closed("apply window closed"))?,
                    bytes,
                );
                // Checked again with the permit: a promotion that waited out the applies in
                // flight may have started while this record waited for its turn.
                if res.stream_held() {
                    return Err(LinkError::Closed("this node is being promoted"));
                }
                // Received (and so acknowledged as such under B) only now, with its room to be
                // applied taken: a record counted while it waited for room would be dropped
                // unapplied if the link then ended, and under B the primary answers its client
                // on the receipt alone.
                {
                    let mut s = ap.lock();
                    if seq <= s.received {
                        // Already have it (a replay after reconnect): skip.
                        continue;
                    }
                    // In sequence, and below the bound this node's metadata can hold (with
                    // room to go on: see `PEER_COUNTER_LIMIT`).
                    if Some(seq) != s.received.checked_add(1) || seq >= PEER_COUNTER_LIMIT {
                        rep.stats
                            .protocol_errors
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return Err(LinkError::Protocol(format!(
                            "sequence gap: expected {}, got {seq} (sequences run to {PEER_COUNTER_LIMIT})",
                            s.received.saturating_add(1)
                        )));
                    }
                    s.received = seq;
                    rep.stats
                        .seq_received
                        .store(seq, std::sync::atomic::Ordering::Relaxed);
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
                match msg {
                    Msg::HashReq {
                        offset, len, block, ..
                    } => {
                        let count = peer::hash_count(len, block);
                        // In this device (`record_in_bounds`, before the receipt).
                        let end = offset.saturating_add(u64::from(len));
                        let Some(count) = count else {
                            return Err(LinkError::Protocol(format!(
                                "hash request {offset}+{len} in blocks of {block} is out of bounds"
                            )));
                        };
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
                                let mut buf = vec![0u8; len as usize];
                                crate::replication::read_from_disk(&file, &mut buf, offset).map(
                                    |()| {
                                        buf.chunks(block as usize)
                                            .flat_map(crate::replication::sha256)
                                            .collect::<Vec<u8>>()
                                    },
                                )
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
                    Msg::Equal { .. } => {
                        // Checksum resync found the region equal: nothing to write.
                        ap.finish(seq);
                        drop(permit);
                    }
                    Msg::SyncDone { gen, .. } if seq <= issued_at_connect => {
                        // An earlier connection's end, which its link did not live to
                        // deliver: the journal kept it, and this connection's catch-up
                        // replays it. Adopting it would put this node at a generation the
                        // source has since left (it moved on at that link's loss), and the
                        // next connect would find a split brain (seen in a flapping-link
                        // test). Only this connection's end counts.
                        tracing::debug!(
                            "skipping an earlier connection's SyncDone at sequence {seq} (generation {:016X}; the source had issued {issued_at_connect} when this connection began)",
                            gen.current
                        );
                        ap.finish(seq);
                        drop(permit);
                    }
                    Msg::SyncDone { gen, term, .. } => {
                        // Everything before is applied: durable, then whole again.
                        let ap = ap.clone();
                        tokio::spawn(async move {
                            let failures = ap.failures_at_start;
                            ap.wait_applied(seq - 1).await;
                            let r = match ap.make_durable().await {
                                // The failure is recorded: the link drops, the resync
                                // starts again on the next connect.
                                Err(_) => Err(()),
                                Ok(_) => {
                                    let g = state::after_sync(gens(&gen));
                                    let res = ap.res.clone();
                                    let r = ap
                                        .res
                                        .update_meta(move |sb| {
                                            // A later write that failed while this finished
                                            // marked the disk inconsistent: it stays so.
                                            if res
                                                .disk_failures
                                                .load(std::sync::atomic::Ordering::SeqCst)
                                                != failures
                                            {
                                                return Err(crate::resource::NodeError::Refused(
                                                    "the disk was marked inconsistent while the resync was finishing (a failed write, or invalidate)"
                                                        .into(),
                                                ));
                                            }
                                            // No better than the source: an outdated one
                                            // (fenced) leaves this copy outdated too. And not
                                            // over the outdated mark of a secondary leaving
                                            // its primary meanwhile (fencing).
                                            let leaving = res
                                                .leaving_outdated
                                                .load(std::sync::atomic::Ordering::SeqCst);
                                            // (An inconsistent source is refused at the
                                            // connect; were one to get here, this copy
                                            // stays inconsistent.)
                                            sb.disk = match source_disk {
                                                0 => DiskState::Inconsistent,
                                                1 => DiskState::Outdated,
                                                _ if leaving => DiskState::Outdated,
                                                _ => DiskState::UpToDate,
                                            };
                                            sb.gen = g;
                                            // The peer's generations now: a SyncDone this
                                            // node once sent says nothing any more.
                                            sb.sync_done_sent = (0, 0);
                                            // SyncDone carries no data: the mark names
                                            // it at once, with the rest (a crash before the
                                            // next checkpoint must not leave an up-to-date
                                            // disk whose mark no stream has).
                                            sb.advance_applied((seq, term));
                                            // Whatever this node had as a crashed
                                            // primary is overwritten by the peer's data.
                                            sb.was_primary = false;
                                            // And whatever it handed over at a clean
                                            // `down`: it holds the peer's data now.
                                            sb.handed_over = false;
                                            Ok(())
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
                                let mut marked_meanwhile = false;
                                if let Some(rep) = ap.res.rep() {
                                    let mut g = rep.lock();
                                    // Marks made during this stream (a verify beside a
                                    // journal catch-up) name regions it did not resync.
                                    marked_meanwhile = g.pins != ap.pins_at_start;
                                    if !marked_meanwhile {
                                        g.bitmap.clear_all();
                                    }
                                    g.bitmap_dirty = true;
                                    // Nothing left that only a bitmap resync could bring.
                                    g.overflowed = false;
                                    // This node's own records (an earlier term's, a split
                                    // brain's victim's) are history the resync replaced:
                                    // kept, a later cut would count them as the peer's lack.
                                    if !g.ring.is_empty() {
                                        tracing::info!(
                                            "dropping {} journal records of an earlier term: the resync replaced them",
                                            g.ring.len()
                                        );
                                        let next = g.issued + 1;
                                        g.ring.clear(next, 0);
                                    }
                                    // Regions an earlier verify marked here were resynced too.
                                    if !marked_meanwhile {
                                        rep.verify_marked
                                            .store(false, std::sync::atomic::Ordering::SeqCst);
                                    }
                                }
                                ap.res.sync_target_done(!marked_meanwhile);
                                if let Ok(mut p) = ap.res.resync.lock() {
                                    *p = None;
                                }
                                ap.res
                                    .resync_left
                                    .store(0, std::sync::atomic::Ordering::Relaxed);
                                ap.res.set_link_state("connected", None);
                                let outdated = ap.res.node_state().disk == 1;
                                // Paired with before-resync-target: a journal catch-up
                                // (no SyncStart) ends with a SyncDone too, and runs neither.
                                let resync = ap
                                    .res
                                    .resync_target_started
                                    .swap(false, std::sync::atomic::Ordering::SeqCst);
                                tracing::info!(
                                    "{} done: this node is {}",
                                    if resync { "resync" } else { "journal catch-up" },
                                    if outdated {
                                        "in sync with its peer, and outdated like it (or leaving it)"
                                    } else {
                                        "up to date"
                                    }
                                );
                                if resync {
                                    ap.res.run_handler("after-resync-target");
                                }
                            }
                            ap.finish(seq);
                            drop(permit);
                        });
                    }
                    Msg::Flush { .. } => {
                        // Everything before the barrier applied, then durable, then acked.
                        // And nothing after it written before that (it spans every range):
                        // under A and B the client may already have sent its next write,
                        // which the page cache could otherwise make durable ahead of what
                        // the flush covers (a barrier broken on this disk if it crashes).
                        ap.lock().ranges.insert(seq, (0, u64::MAX));
                        let ap = ap.clone();
                        let term = msg.term().unwrap_or(0);
                        tokio::spawn(async move {
                            ap.wait_applied(seq - 1).await;
                            // A failure is recorded there: the flush is never acknowledged,
                            // the link drops.
                            let _ = ap.make_flush_durable(seq, term, false).await;
                            drop(permit);
                        });
                    }
                    Msg::Checkpoint { .. } => {
                        // Everything before applied, then durable, then acked; but not a
                        // barrier: no client ordered its writes around this point, so what
                        // follows is applied while the sync runs (the sync claims only what
                        // was applied when it began, as the periodic checkpoint does).
                        let ap = ap.clone();
                        tokio::spawn(async move {
                            ap.wait_applied(seq - 1).await;
                            ap.finish(seq);
                            let _ = ap.make_durable().await;
                            drop(permit);
                        });
                    }
                    Msg::Write { .. } | Msg::Zero { .. } => {
                        // Under B the primary acknowledges a write once this node has
                        // received it. Nothing more has arrived: the primary may be waiting
                        // on this receipt, which the acker sends before the write is applied
                        // (below).
                        let receipt_first = rep.protocol() == Protocol::B && rd.buffer().is_empty();
                        let (offset, len, fua) = match msg {
                            Msg::Write {
                                offset, len, fua, ..
                            } => (offset, u64::from(len), fua),
                            Msg::Zero { offset, len, .. } => (offset, len, false),
                            _ => (0, 0, false),
                        };
                        // In this device (`record_in_bounds`, before the receipt).
                        // A write that goes around the page cache holds the span of every
                        // cached page it can share (see `Device::direct_span`). A FUA write is
                        // a barrier, as a flush is: the client sends what depends on it only
                        // once it is durable, so under A and B (answered before this disk
                        // has it) nothing after it may reach this disk before it does, or a
                        // crash here leaves the later write without the one it depended on.
                        let span = match msg {
                            _ if fua => Some((0, u64::MAX)),
                            Msg::Write { .. } => res.device().direct_span(offset, len),
                            _ => None,
                        }
                        .unwrap_or((offset, offset + len));
                        let term = msg.term().unwrap_or(0);
                        ap.lock().ranges.insert(seq, span);
                        let apply = ap.clone();
                        let mut fut = Box::pin(async move {
                            let ap = apply;
                            ap.wait_turn(seq, span).await;
                            let dev = ap.res.device();
                            // FUA: made durable below together with everything before it
                            // (one sync), which is what the primary waits for under C.
                            let r = match (msg, payload) {
                                (Msg::Write { .. }, Some(buf)) => {
                                    let (r, buf) = dev.apply_write(offset, buf).await;
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
                            } else if fua {
                                // Synced with everything before it (one sync), then finished:
                                // what follows waits until then. Its span held off every
                                // earlier write, but not a record without one: a `SyncDone`
                                // that still commits a resync's end must finish first, or
                                // this would be said synced past the applied mark.
                                ap.wait_applied(seq - 1).await;
                                let _ = ap.make_flush_durable(seq, term, true).await;
                            } else {
                                ap.finish(seq);
                            }
                            drop(permit);
                        });
                        if receipt_first {
                            // A task of its own before the receipt goes out: the receiver may
                            // end while it yields (the acker's write failed), and a received
                            // write must be applied all the same. The task yields first, so
                            // that the receipt still goes out before the apply.
                            tokio::spawn(async move {
                                tokio::task::yield_now().await;
                                fut.await
                            });
                            ap.ack_receipt_now
                                .store(true, std::sync::atomic::Ordering::Relaxed);
                            tokio::task::yield_now().await;
                        } else {
                            // Usually nothing overlaps and the page-cache write completes at
                            // once: apply inline. Otherwise it becomes a task and waits its
                            // turn.
                            let pending = {
                                let mut cx =
                                    std::task::Context::from_waker(std::task::Waker::noop());
                                fut.as_mut().poll(&mut cx).is_pending()
                            };
                            if pending {
                                tokio::spawn(fut);
                            }
                        }
                        // A batch of received records is applied a few at a time, each
                        // few acknowledged at once: the primary answers its client sooner
                        // (under C), instead of after the whole batch.
                        if rep.protocol() == Protocol::C {
                            since_yield += 1;
                        }
                        if since_yield >= APPLY_YIELD_EVERY {
                            since_yield = 0;
                            tokio::task::yield_now().await;
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

/// A stream record's data range lies in this node's device of `size` bytes (what it writes,
/// zeroes, vouches for or hashes); anything else is the primary's error and ends the link.
fn record_in_bounds(msg: &Msg, size: u64) -> Result<(), LinkError> {
    let (what, offset, len) = match *msg {
        Msg::Write { offset, len, .. } => ("write", offset, u64::from(len)),
        Msg::Zero { offset, len, .. } => ("zero", offset, len),
        Msg::Equal { offset, len, .. } => ("equal region", offset, len),
        Msg::HashReq {
            offset, len, block, ..
        } => {
            if peer::hash_count(len, block).is_none() {
                return Err(LinkError::Protocol(format!(
                    "hash request {offset}+{len} in blocks of {block} is out of bounds"
                )));
            }
            ("hash request", offset, u64::from(len))
        }
        _ => return Ok(()),
    };
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(LinkError::Protocol(format!(
            "{what} at {offset}+{len} is past this device's {size} bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_are_urgent_only_for_the_mark_the_protocol_waits_on() {
        let m = |received, applied, synced, durable| Marks {
            received,
            applied,
            synced,
            durable,
        };
        let sent = m(10, 8, 5, 5);
        // Durable moves: a planned disconnect and the activity log wait for it under every
        // protocol.
        for p in [Protocol::A, Protocol::B, Protocol::C] {
            assert!(ack_is_urgent(p, sent, m(10, 8, 6, 6)));
            assert!(!ack_is_urgent(p, sent, sent));
        }
        // A receipt: B's writes wait for it; A's and C's do not.
        assert!(ack_is_urgent(Protocol::B, sent, m(11, 8, 5, 5)));
        assert!(!ack_is_urgent(Protocol::C, sent, m(11, 8, 5, 5)));
        assert!(!ack_is_urgent(Protocol::A, sent, m(11, 8, 5, 5)));
        // A write on this disk: C's writes wait for it.
        assert!(ack_is_urgent(Protocol::C, sent, m(10, 9, 5, 5)));
        assert!(!ack_is_urgent(Protocol::B, sent, m(10, 9, 5, 5)));
        assert!(!ack_is_urgent(Protocol::A, sent, m(11, 9, 5, 5)));
        // Synced before its commit: C's flushes wait for it; under A and B it rides along
        // with the durable mark that follows.
        assert!(ack_is_urgent(Protocol::C, sent, m(10, 8, 7, 5)));
        assert!(!ack_is_urgent(Protocol::B, sent, m(10, 8, 7, 5)));
        assert!(!ack_is_urgent(Protocol::A, sent, m(10, 8, 7, 5)));
    }

    #[test]
    fn records_past_the_device_are_refused_before_their_receipt() {
        let size = 1 << 20;
        let write = |offset, len| Msg::Write {
            seq: 1,
            term: 1,
            offset,
            len,
            crc: 0,
            fua: false,
        };
        assert!(record_in_bounds(&write(size - 4096, 4096), size).is_ok());
        let e = record_in_bounds(&write(size - 4096, 8192), size).expect_err("past the end");
        assert!(e.to_string().contains("write at"), "{e}");
        assert!(record_in_bounds(&write(u64::MAX - 10, 4096), size).is_err());
        let zero = Msg::Zero {
            seq: 2,
            term: 1,
            offset: 0,
            len: size + 1,
            trim: false,
        };
        assert!(record_in_bounds(&zero, size).is_err());
        let flush = Msg::Flush { seq: 3, term: 1 };
        assert!(record_in_bounds(&flush, size).is_ok());
    }
}
