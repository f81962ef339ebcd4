//! The node's role state machine as plain logic: what a role change is allowed to do, decided
//! without sockets or disks so every case is unit-tested. The resource applies the decisions.

use crate::meta::{DiskState, Generations};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Secondary,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }
}

/// What a promotion does to the persistent state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Promotion {
    pub disk: DiskState,
    pub gen: Generations,
}

/// What the node knows about its peer when asked to promote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerView {
    /// The resource has no peer configured.
    None,
    /// Connected; the peer's role.
    Connected(Role),
    /// Configured but not connected: we cannot know what it does.
    Unknown,
    /// Not connected since the peer went down cleanly (`Msg::Leaving`: a primary whose every
    /// write this node holds durably, or a secondary with the same data), and nothing heard
    /// from it since: a plain promotion is safe (the peer can only come back as a secondary).
    LeftCleanly,
    /// Not connected, and the `fence-peer` handler just outdated it (or found its node down
    /// or fenced off): with resource-level fencing that makes a plain promotion safe, as in
    /// DRBD, where a fenced failover needs no `--force`.
    Fenced,
}

/// Decides `primary [--force]`. `new_id` is a fresh random generation id, used when the data
/// starts a new generation (forced promotion, or promotion while the peer cannot follow).
pub fn promote(
    disk: DiskState,
    gen: Generations,
    peer: PeerView,
    force: bool,
    new_id: u64,
) -> Result<Promotion, String> {
    if peer == PeerView::Connected(Role::Primary) {
        return Err("the peer is primary; demote it first (single-primary)".into());
    }
    match disk {
        DiskState::UpToDate => {}
        d if force => {
            tracing::warn!("forced promotion: this disk is {}", d.name());
        }
        DiskState::Outdated => {
            return Err(
                "this node's disk is outdated (fencing, or `outdate`): it may lack writes its peer made since. Promote the peer, or connect to it to bring this disk up to date; --force declares this data good and any such writes lost".into(),
            )
        }
        d => {
            return Err(format!(
            "this node's disk is {}: a resync into it has not finished (wait until it has, `wait-sync`), or it failed; refusing to promote it (--force declares its data good, partial as it may be)",
            d.name()
        ))
        }
    }
    if peer == PeerView::Unknown && !force {
        return Err(
            "the peer is not connected, so its role and data are unknown; use --force to promote anyway (failover), once you know by another path that the peer is down or not primary: with only the link cut and the peer still primary, --force makes two primaries (a split brain)"
                .into(),
        );
    }
    // A new generation starts when no connected peer follows this promotion, or the data was
    // declared good by force: history keeps where it came from.
    let new_generation = force || peer != PeerView::Connected(Role::Secondary);
    let gen = if new_generation {
        new_generation_of(gen, new_id)
    } else {
        gen
    };
    Ok(Promotion {
        disk: DiskState::UpToDate,
        gen,
    })
}

/// Decides `secondary [--force]` given the attached NBD clients.
pub fn demote(clients: u64, force: bool) -> Result<(), String> {
    if clients > 0 && !force {
        return Err(format!(
            "{clients} NBD client(s) attached; unmount and disconnect them first, or use --force to cut them off"
        ));
    }
    Ok(())
}

/// DRBD's resource-level fencing (`fencing` in the config): how a secondary comes to know it
/// is outdated, so that nobody promotes it over writes it lacks without saying `--force`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fencing {
    /// No fencing (DRBD's default): a secondary cut off from its primary stays up-to-date.
    DontCare,
    /// A secondary that the admin disconnects from a primary (`disconnect`, `down`) outdates
    /// itself first, and a primary that loses its up-to-date secondary runs the `fence-peer`
    /// handler, which outdates the peer by another path (`blockrep-ctl outdate` there).
    ResourceOnly,
    /// All of `ResourceOnly`, and a primary that loses its up-to-date secondary also
    /// suspends its writes while the handler runs (DRBD's I/O freeze): no write is
    /// acknowledged without the peer until the handler has fenced it, the link is back, or
    /// the admin runs `resume-io`. Under C no write answered after the loss is one a
    /// promotion of the peer would lose.
    ResourceAndStonith,
}

impl Fencing {
    /// As in the config.
    pub fn name(self) -> &'static str {
        match self {
            Fencing::DontCare => "dont-care",
            Fencing::ResourceOnly => "resource-only",
            Fencing::ResourceAndStonith => "resource-and-stonith",
        }
    }

    /// Whether the peer is fenced at all (outdated by the handler, or by itself).
    pub fn enabled(self) -> bool {
        self != Fencing::DontCare
    }

    /// Whether a primary that loses its peer suspends its writes until the peer is fenced.
    pub fn freezes_io(self) -> bool {
        self == Fencing::ResourceAndStonith
    }
}

/// The disk state (0 inconsistent, 1 outdated, 2 up to date, as on the wire) that a connect
/// counts for a node. An outdated node that crashed as primary, met at the generation its
/// peer is at, counts as up to date: its mark came from a fence for a failover that did not
/// happen (the peer never moved on), while its hot extents may hold writes the peer lacks,
/// acknowledged under protocol A, of which DRBD's crashed-primary rule makes it the source.
/// The mark must not turn that around and overwrite them.
pub fn effective_disk(disk: u8, crashed_primary: bool, same_generation: bool) -> u8 {
    if disk == 1 && crashed_primary && same_generation {
        2
    } else {
        disk
    }
}

/// Of two nodes that both crashed as primary and meet at one generation, whether this one is
/// the source of both nodes' hot extents (DRBD's crashed-primary rule with both flags set: one
/// node, chosen by a tie-break, resyncs them; "in sync" would leave each node's unreplicated
/// writes on it alone, the replicas different while both say up to date). A node keeps such a
/// stale mark only after a demotion whose metadata write failed, the other then promoted at the
/// same generation: the node promoted last is the primary that really crashed, and its disk
/// holds every write it acknowledged. Equal times: the smaller node name. Mirrored: the peer,
/// asking with the arguments swapped, gets the other answer.
pub fn crashed_primaries_source(
    me_promoted_ms: u64,
    me_name: &str,
    peer_promoted_ms: u64,
    peer_name: &str,
) -> bool {
    if me_promoted_ms != peer_promoted_ms {
        me_promoted_ms > peer_promoted_ms
    } else {
        me_name < peer_name
    }
}

/// What `outdate` does on a node whose disk is `disk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outdate {
    /// The disk is up to date: it becomes outdated.
    Commit,
    /// It already is.
    AlreadyOutdated,
    /// It is inconsistent, which is worse: nothing to do.
    AlreadyInconsistent,
}

/// Decides `outdate` (DRBD's `drbdadm outdate`): a node may be declared outdated only when it
/// writes nothing (not running as primary) and no primary's stream keeps it current (not
/// connected). A node that went down as primary may be: the peer that asks (its fence-peer
/// handler, before a failover) takes over, and this node's data is then the older.
pub fn outdate(primary: bool, connected: bool, disk: DiskState) -> Result<Outdate, String> {
    if primary {
        return Err(
            "this node is primary: its data is the newest there is, it cannot be outdated; demote it first"
                .into(),
        );
    }
    if connected {
        return Err(
            "refusing to outdate while connected: the peer's stream keeps this disk current (`disconnect` first)"
                .into(),
        );
    }
    Ok(match disk {
        DiskState::UpToDate => Outdate::Commit,
        DiskState::Outdated => Outdate::AlreadyOutdated,
        DiskState::Inconsistent => Outdate::AlreadyInconsistent,
    })
}

/// Whether a secondary the admin disconnects (`disconnect`, `down`) leaves, under
/// resource-level fencing, a connected primary that will go on writing without it: from
/// then on no resync end may declare it up to date.
pub fn leaves_a_primary(
    fencing: Fencing,
    me_primary: bool,
    peer_primary: bool,
    connected: bool,
) -> bool {
    fencing.enabled() && !me_primary && peer_primary && connected
}

/// Whether such a secondary ([`leaves_a_primary`]) outdates itself first: when its disk is
/// up to date (DRBD's graceful disconnect under `fencing resource-only`).
pub fn outdates_itself_on_leaving(
    fencing: Fencing,
    me_primary: bool,
    peer_primary: bool,
    connected: bool,
    disk: DiskState,
) -> bool {
    leaves_a_primary(fencing, me_primary, peer_primary, connected) && disk == DiskState::UpToDate
}

/// What the `fence-peer` handler's exit status says about the peer (DRBD's codes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceOutcome {
    /// 3: its disk was inconsistent already.
    PeerInconsistent,
    /// 4: its disk is now outdated (or was).
    PeerOutdated,
    /// 5: its node could not be reached: taken for down, so outdated when it comes back only
    /// if it was told so; the handler vouches for it.
    PeerUnreachable,
    /// 6: it refused, being primary.
    PeerPrimary,
    /// 7: its node was fenced off (powered down).
    PeerFenced,
    /// Anything else: the fencing failed; the peer may still be promoted with stale data.
    Failed(String),
}

impl FenceOutcome {
    /// From the handler's exit code (`None`: killed by a signal, or not run at all).
    pub fn from_exit(code: Option<i32>) -> Self {
        match code {
            Some(3) => FenceOutcome::PeerInconsistent,
            Some(4) => FenceOutcome::PeerOutdated,
            Some(5) => FenceOutcome::PeerUnreachable,
            Some(6) => FenceOutcome::PeerPrimary,
            Some(7) => FenceOutcome::PeerFenced,
            Some(c) => FenceOutcome::Failed(format!("exit code {c}")),
            None => FenceOutcome::Failed("no exit code".into()),
        }
    }

    /// The peer's disk as `status` shows it while disconnected (`None`: unknown).
    pub fn peer_disk(&self) -> Option<&'static str> {
        match self {
            FenceOutcome::PeerInconsistent => Some("inconsistent"),
            FenceOutcome::PeerOutdated
            | FenceOutcome::PeerUnreachable
            | FenceOutcome::PeerFenced => Some("outdated"),
            FenceOutcome::PeerPrimary | FenceOutcome::Failed(_) => None,
        }
    }

    /// Whether the peer is known not to be promoted with stale data without a `--force`.
    pub fn fenced(&self) -> bool {
        self.peer_disk().is_some()
    }

    pub fn describe(&self) -> String {
        match self {
            FenceOutcome::PeerInconsistent => "the peer's disk was inconsistent already (3)".into(),
            FenceOutcome::PeerOutdated => "the peer's disk is outdated (4)".into(),
            FenceOutcome::PeerUnreachable => {
                "the peer's node could not be reached; taken for down (5)".into()
            }
            FenceOutcome::PeerPrimary => "the peer refused: it is primary (6)".into(),
            FenceOutcome::PeerFenced => "the peer's node was fenced off (7)".into(),
            FenceOutcome::Failed(why) => format!("fencing failed ({why})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::UUID_JUST_CREATED;

    fn fresh() -> Generations {
        Generations {
            current: UUID_JUST_CREATED,
            ..Default::default()
        }
    }

    #[test]
    fn fresh_disk_needs_force() {
        let e = promote(DiskState::Inconsistent, fresh(), PeerView::None, false, 99).unwrap_err();
        assert!(e.contains("--force"), "{e}");
        let p = promote(DiskState::Inconsistent, fresh(), PeerView::None, true, 99).unwrap();
        assert_eq!(p.disk, DiskState::UpToDate);
        assert_eq!(p.gen.current, 99);
        assert_eq!(p.gen.history[0], UUID_JUST_CREATED);
    }

    #[test]
    fn peer_primary_refuses_even_with_force() {
        for force in [false, true] {
            assert!(promote(
                DiskState::UpToDate,
                fresh(),
                PeerView::Connected(Role::Primary),
                force,
                1
            )
            .is_err());
        }
    }

    #[test]
    fn discard_my_data_picks_the_direction_not_the_extent() {
        use SyncDecision::*;
        assert_eq!(discard_mine(SplitBrain), TargetBitmap);
        assert_eq!(discard_mine(SourceBitmap), TargetBitmap);
        assert_eq!(discard_mine(InSync), TargetBitmap);
        // A fresh or replaced disk on either side: no bitmap covers it.
        assert_eq!(discard_mine(SourceFull), TargetFull);
        assert_eq!(discard_mine(TargetFull), TargetFull);
        assert_eq!(discard_mine(Unrelated), Unrelated);
        assert_eq!(discard_peers(SplitBrain), SourceBitmap);
        assert_eq!(discard_peers(TargetFull), SourceFull);
        assert_eq!(discard_peers(Unrelated), Unrelated);
    }

    #[test]
    fn unknown_peer_needs_force_and_starts_new_generation() {
        let g = Generations {
            current: 10,
            bitmap: 0,
            history: [9, 8],
        };
        assert!(promote(DiskState::UpToDate, g, PeerView::Unknown, false, 11).is_err());
        let p = promote(DiskState::UpToDate, g, PeerView::Unknown, true, 11).unwrap();
        assert_eq!(p.gen.current, 11);
        assert_eq!(p.gen.history, [10, 9]);
        assert_eq!(p.gen.bitmap, 10);
    }

    #[test]
    fn a_peer_that_went_down_cleanly_needs_no_force_but_a_new_generation() {
        let g = Generations {
            current: 10,
            bitmap: 0,
            history: [9, 8],
        };
        let p = promote(DiskState::UpToDate, g, PeerView::LeftCleanly, false, 11).unwrap();
        assert_eq!(p.gen.current, 11);
        assert_eq!(
            p.gen.bitmap, 10,
            "the bitmap counts what the peer lacks from here"
        );
        // Not a disk that is not up to date.
        assert!(promote(DiskState::Outdated, g, PeerView::LeftCleanly, false, 11).is_err());
        assert!(promote(DiskState::Inconsistent, g, PeerView::LeftCleanly, false, 11).is_err());
    }

    #[test]
    fn connected_secondary_peer_keeps_generation() {
        let g = Generations {
            current: 10,
            bitmap: 0,
            history: [9, 8],
        };
        let p = promote(
            DiskState::UpToDate,
            g,
            PeerView::Connected(Role::Secondary),
            false,
            11,
        )
        .unwrap();
        assert_eq!(p.gen, g);
    }

    #[test]
    fn standalone_up_to_date_promotes_with_new_generation() {
        let g = Generations {
            current: 10,
            bitmap: 0,
            history: [0, 0],
        };
        let p = promote(DiskState::UpToDate, g, PeerView::None, false, 12).unwrap();
        assert_eq!(p.gen.current, 12);
    }

    #[test]
    fn outdate_only_a_disconnected_non_primary_and_only_a_good_disk() {
        use DiskState::*;
        assert!(outdate(true, false, UpToDate).is_err());
        assert!(outdate(false, true, UpToDate)
            .unwrap_err()
            .contains("connected"));
        assert_eq!(outdate(false, false, UpToDate), Ok(Outdate::Commit));
        assert_eq!(
            outdate(false, false, Outdated),
            Ok(Outdate::AlreadyOutdated)
        );
        assert_eq!(
            outdate(false, false, Inconsistent),
            Ok(Outdate::AlreadyInconsistent)
        );
    }

    #[test]
    fn a_fenced_peer_lets_an_up_to_date_disk_be_promoted_without_force_and_nothing_else() {
        let g = Generations {
            current: 7,
            ..Default::default()
        };
        let p = promote(DiskState::UpToDate, g, PeerView::Fenced, false, 8).unwrap();
        assert_eq!(
            p.gen.current, 8,
            "a fenced failover starts a new generation"
        );
        assert_eq!(p.gen.bitmap, 7);
        for d in [DiskState::Outdated, DiskState::Inconsistent] {
            assert!(promote(d, g, PeerView::Fenced, false, 8).is_err(), "{d:?}");
        }
        assert!(promote(DiskState::UpToDate, g, PeerView::Unknown, false, 8).is_err());
    }

    #[test]
    fn a_secondary_outdates_itself_on_leaving_a_primary_only_with_fencing() {
        use DiskState::*;
        use Fencing::*;
        assert!(outdates_itself_on_leaving(
            ResourceOnly,
            false,
            true,
            true,
            UpToDate
        ));
        for (f, me_p, peer_p, conn, disk) in [
            (DontCare, false, true, true, UpToDate),
            (ResourceOnly, true, false, true, UpToDate),
            (ResourceOnly, false, false, true, UpToDate),
            (ResourceOnly, false, true, false, UpToDate),
            (ResourceOnly, false, true, true, Inconsistent),
            (ResourceOnly, false, true, true, Outdated),
        ] {
            assert!(
                !outdates_itself_on_leaving(f, me_p, peer_p, conn, disk),
                "{f:?} {me_p} {peer_p} {conn} {disk:?}"
            );
        }
    }

    #[test]
    fn of_two_crashed_primaries_the_one_promoted_last_is_the_source_on_both_sides() {
        for (a, b) in [(5, 9), (9, 5), (7, 7)] {
            let alpha = crashed_primaries_source(a, "alpha", b, "beta");
            let beta = crashed_primaries_source(b, "beta", a, "alpha");
            assert_ne!(alpha, beta, "promoted at {a} and {b}: exactly one source");
        }
        assert!(crashed_primaries_source(9, "beta", 5, "alpha"));
        assert!(!crashed_primaries_source(5, "alpha", 9, "beta"));
        assert!(crashed_primaries_source(7, "alpha", 7, "beta"));
    }

    #[test]
    fn an_outdated_crashed_primary_counts_as_up_to_date_only_at_one_generation() {
        assert_eq!(effective_disk(1, true, true), 2);
        assert_eq!(
            effective_disk(1, true, false),
            1,
            "the peer moved on: outdated"
        );
        assert_eq!(effective_disk(1, false, true), 1, "not a crashed primary");
        assert_eq!(effective_disk(0, true, true), 0, "inconsistent stays so");
        assert_eq!(effective_disk(2, false, false), 2);
    }

    #[test]
    fn fence_peer_exit_codes_as_drbd_defines_them() {
        let o = FenceOutcome::from_exit;
        assert_eq!(o(Some(4)).peer_disk(), Some("outdated"));
        assert_eq!(o(Some(5)).peer_disk(), Some("outdated"));
        assert_eq!(o(Some(7)).peer_disk(), Some("outdated"));
        assert_eq!(o(Some(3)).peer_disk(), Some("inconsistent"));
        for failed in [Some(0), Some(1), Some(6), Some(255), None] {
            assert!(!o(failed).fenced(), "{failed:?}");
        }
        assert!(o(Some(1)).describe().contains("exit code 1"));
    }

    #[test]
    fn outdated_refused_without_force() {
        assert!(promote(DiskState::Outdated, fresh(), PeerView::None, false, 1).is_err());
    }

    #[test]
    fn demote_with_clients() {
        assert!(demote(0, false).is_ok());
        assert!(demote(2, false).unwrap_err().contains("2 NBD client"));
        assert!(demote(2, true).is_ok());
    }
}

/// What two nodes' generation identifiers say about their data when they connect (DRBD's
/// UUID comparison).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncDecision {
    /// Same data generation: nothing to move beyond the journal.
    InSync,
    /// This node has newer data; the peer is behind by what this node's bitmap records.
    SourceBitmap,
    /// The peer has newer data; this node is behind by what the peer's bitmap records.
    TargetBitmap,
    /// This node has newer data and no bitmap covers the difference: copy everything.
    SourceFull,
    /// The peer has newer data and no bitmap covers the difference.
    TargetFull,
    /// Both wrote independently since a common generation.
    SplitBrain,
    /// No common history: different data sets.
    Unrelated,
}

impl SyncDecision {
    /// The same decision as the peer sees it: both sides compute it, and must agree.
    pub fn mirror(self) -> Self {
        use SyncDecision::*;
        match self {
            SourceBitmap => TargetBitmap,
            TargetBitmap => SourceBitmap,
            SourceFull => TargetFull,
            TargetFull => SourceFull,
            x => x,
        }
    }
}

/// Compares generation identifiers. `me`/`peer`: each side's ids. The rules, in order:
/// both fresh → in sync (no data written since create-md on either); one fresh → full sync from
/// the other; same current → in sync; one's bitmap id is the other's current → bitmap resync
/// from the one that moved on; (with [`compare_generations_unacked`]: one's current is where
/// the other's unacknowledged SyncDone left it → bitmap resync from the other); both moved on
/// from the same point → split brain; one's current in the other's history → a resync from
/// the newer (by its bitmap only where that provably counts from before the other's current,
/// else full); both moved on from related points → split brain; otherwise unrelated.
///
/// The fresh id (create-md's) is never a common point: two disks created apart hold unrelated
/// data until a sync relates them, so a match on it (two nodes each forced primary from
/// fresh, or a replaced disk forced primary) proves nothing in common.
pub fn compare_generations(me: &Generations, peer: &Generations) -> SyncDecision {
    compare_generations_unacked(me, 0, peer, 0)
}

/// [`compare_generations`] with what each side knows of a SyncDone it sent and never heard
/// acknowledged (`Superblock::sync_done_unacked`: the generation the target adopts with
/// it, while the sender's bitmap still counts from where it did then; 0: none). A peer at
/// that generation holds the sender's data as of the SyncDone: everything the sender wrote
/// since is in its bitmap, which counts from the older bitmap generation, so a bitmap resync
/// from the sender brings the peer up to date, however many generations the sender started
/// since. Without this, two of them push the peer's generation out of the sender's two-entry
/// history, and the two look like a split brain (found by `state_sim`).
pub fn compare_generations_unacked(
    me: &Generations,
    me_unacked: u64,
    peer: &Generations,
    peer_unacked: u64,
) -> SyncDecision {
    use crate::meta::UUID_JUST_CREATED as FRESH;
    use SyncDecision::*;
    let (m, p) = (me, peer);
    match (m.current == FRESH, p.current == FRESH) {
        (true, true) => return InSync,
        (true, false) => return TargetFull,
        (false, true) => return SourceFull,
        _ => {}
    }
    if m.current == p.current {
        return InSync;
    }
    let real = names_a_generation;
    // One side's bitmap counts from exactly where the other side is.
    if real(m.bitmap) && m.bitmap == p.current {
        return SourceBitmap;
    }
    if real(p.bitmap) && p.bitmap == m.current {
        return TargetBitmap;
    }
    // One side is where the other's unacknowledged SyncDone left it (see above).
    let me_unacked = if real(m.bitmap) && real(me_unacked) {
        me_unacked
    } else {
        0
    };
    let peer_unacked = if real(p.bitmap) && real(peer_unacked) {
        peer_unacked
    } else {
        0
    };
    if me_unacked != 0 && me_unacked == p.current {
        return SourceBitmap;
    }
    if peer_unacked != 0 && peer_unacked == m.current {
        return TargetBitmap;
    }
    // Both moved on from the same point (for one side, perhaps the point its unacknowledged
    // SyncDone left the other at).
    if real(m.bitmap) && m.bitmap == p.bitmap
        || me_unacked != 0 && me_unacked == p.bitmap
        || peer_unacked != 0 && peer_unacked == m.bitmap
    {
        return SplitBrain;
    }
    // One side went through the other's current generation and moved on: it is ahead.
    if p.history.contains(&m.current) {
        return if bitmap_covers(p, m.current) {
            TargetBitmap
        } else {
            TargetFull
        };
    }
    if m.history.contains(&p.current) {
        return if bitmap_covers(m, p.current) {
            SourceBitmap
        } else {
            SourceFull
        };
    }
    // Both moved on from related points.
    if (real(m.bitmap) && p.history.contains(&m.bitmap))
        || (real(p.bitmap) && m.history.contains(&p.bitmap))
        || (me_unacked != 0 && p.history.contains(&me_unacked))
        || (peer_unacked != 0 && m.history.contains(&peer_unacked))
    {
        return SplitBrain;
    }
    Unrelated
}

/// Whether `g`'s bitmap counts every change since `past`, a generation in its history: only
/// when the bitmap is known to be no newer than it. The history runs newest first, and a
/// bitmap id names either a generation `g` left or a resync's own generation started at its
/// current one (see `primary_side`), which no history names. So `past` at the head of the
/// history is covered by any bitmap (the bitmap was named there or earlier); further back,
/// only by a bitmap id the history shows to be older still. Anything else may be newer (a
/// peer rolled back to `past`, its disk restored from a backup) and misses what changed in
/// between: a full sync, as DRBD makes every history match. (This keeps the bitmap resync of
/// a SyncDone whose acknowledgement was lost, see the tests.)
fn bitmap_covers(g: &Generations, past: u64) -> bool {
    if g.bitmap == 0 {
        return false;
    }
    match g.history.iter().position(|&h| h == past) {
        Some(0) => true,
        Some(i) => g.history[i + 1..].contains(&g.bitmap),
        None => false,
    }
}

/// A split brain whose two bitmaps count from one real common generation: together they
/// name everything either side changed since, so resolving it resyncs what they name. So do
/// they where one side's bitmap counts from where the other's unacknowledged SyncDone left
/// it (`me_unacked`, `peer_unacked`: see [`compare_generations_unacked`]): the other's own
/// bitmap counts from before that point. Any other split brain (found through the histories)
/// resolves with a full sync, as DRBD's does: what either side changed between the
/// histories' points is in neither bitmap.
pub fn split_brain_bitmaps_cover(
    me: &Generations,
    me_unacked: u64,
    peer: &Generations,
    peer_unacked: u64,
) -> bool {
    let real = names_a_generation;
    (me.bitmap == peer.bitmap && real(me.bitmap))
        || (real(me.bitmap) && real(me_unacked) && me_unacked == peer.bitmap)
        || (real(peer.bitmap) && real(peer_unacked) && peer_unacked == me.bitmap)
}

/// Whether a bitmap (or history) id names a point data was at: not none (0), and not the
/// fresh id create-md writes, which two disks created apart share without sharing any data.
pub fn names_a_generation(id: u64) -> bool {
    id != 0 && id != crate::meta::UUID_JUST_CREATED
}

/// One node's side of the check for a disk that went back in time (see [`back_in_time`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Its current data generation.
    pub current: u64,
    /// The highest sequence its disk holds, issued as primary or applied as secondary (one
    /// sequence space per pair).
    pub high: u64,
    pub primary: bool,
    /// Its disk is up to date (only such a disk is the source of a full sync here).
    pub up_to_date: bool,
    /// What the *other* node told it its disk held: (generation, highest sequence).
    pub told: (u64, u64),
    /// Its generations, newest first: the current one, then its history.
    pub chain: [u64; 3],
}

/// Whether a node holding `high` at generation `current` went back in time: its peer heard
/// from it, at that same generation, that its disk held `told` (as a source, the issued mark
/// its superblock committed; as a target, the applied mark it acknowledged as durable, also
/// committed first), and a restart after any crash reads back at least that much. Holding
/// less, its disk and metadata were restored from an image of an earlier point (or its disk
/// lost flushed writes).
///
/// Or at a generation older than the one it was told at: the peer (its generations, newest
/// first, `peer_chain`) went through both, the told one later. A node's generation moves
/// back only when a resync's SyncStart sets it to its source's bitmap generation, so its
/// disk and metadata were restored from an image taken before it reached `told.0` (the
/// generations alone may take it for a peer left behind, whose changes since some bitmap
/// covers: a resync generation named at the newer one, say, which no history shows), or
/// such a resync was cut. The latter, whose bitmap resync would do, then gets a full sync
/// too: the two are not told apart, and the full sync is the safe one.
pub fn went_back(current: u64, high: u64, told: (u64, u64), peer_chain: &[u64; 3]) -> bool {
    if !names_a_generation(told.0) {
        return false;
    }
    if told.0 == current {
        return high < told.1;
    }
    let at = |g: u64| peer_chain.iter().position(|&h| h == g);
    names_a_generation(current) && matches!((at(told.0), at(current)), (Some(t), Some(c)) if c > t)
}

/// A secondary that went back in time (see [`went_back`]) beside an up-to-date peer is the
/// target of a full sync from that peer, where the generations (`by_generations`, as this
/// node sees them) make the peer the source or call the two in sync: an image of a primary
/// restored with its metadata comes back as a crashed primary at the peer's generation, and
/// its old hot extents must not go over the peer's newer writes; an image of a secondary
/// would look in sync; and after the peer moved on to a newer generation (a switchover, a
/// failover), its bitmap counts only from there, not from the image's point. What the peer
/// holds since that point is in no bitmap (a secondary keeps none of what it applies; a
/// primary's bitmap counts only what its peer lacked), so all of it. `None`: nothing to say
/// (neither went back, both did, the one that did is primary, the other's disk is not up to
/// date, the generations make the one that went back the source or a split brain, or at one
/// generation it still holds more than its peer: then its data is the newer, and the usual
/// rules hold).
pub fn back_in_time(me: &Held, peer: &Held, by_generations: SyncDecision) -> Option<SyncDecision> {
    use SyncDecision::*;
    let me_back = went_back(me.current, me.high, peer.told, &peer.chain);
    let peer_back = went_back(peer.current, peer.high, me.told, &me.chain);
    match (me_back, peer_back, by_generations) {
        (true, false, InSync) if !me.primary && peer.up_to_date && peer.high >= me.high => {
            Some(TargetFull)
        }
        (true, false, TargetBitmap | TargetFull) if !me.primary && peer.up_to_date => {
            Some(TargetFull)
        }
        (false, true, InSync) if !peer.primary && me.up_to_date && me.high >= peer.high => {
            Some(SourceFull)
        }
        (false, true, SourceBitmap | SourceFull) if !peer.primary && me.up_to_date => {
            Some(SourceFull)
        }
        _ => None,
    }
}

/// Whether a peer with generations `peer` has data this node lacks and no data of this
/// node's is newer (it is the sync source): promoting this node over it would lose its writes.
/// `me_unacked`, `peer_unacked`: see [`compare_generations_unacked`].
pub fn peer_is_ahead(
    me: &Generations,
    me_unacked: u64,
    peer: &Generations,
    peer_unacked: u64,
) -> bool {
    matches!(
        compare_generations_unacked(me, me_unacked, peer, peer_unacked),
        SyncDecision::TargetBitmap | SyncDecision::TargetFull
    )
}

/// What the two disk states make of the generations' decision (see [`by_disk_state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskRule {
    /// The decision stands.
    Keep,
    /// The direction is set by the disks: this decision instead.
    Set(SyncDecision),
    /// This node holds writes the peer lacks but its disk is not up to date.
    MineNewerButBad,
    /// The peer holds writes this node lacks but its disk is not up to date.
    PeersNewerButBad,
}

/// Only towards good data: a disk that is not up to date (a sync of it failed, so writes may
/// be lost on it; or a resync into it did not finish) is never the source while the peer's
/// is. At one generation the good disk is the source (a crashed primary whose disk failed
/// would otherwise resync its damaged extents over the peer's good copy). When the
/// generations say the bad disk holds newer data, no copy holds everything: the admin
/// chooses. Mirrored: the two sides always agree.
pub fn by_disk_state(me_good: bool, peer_good: bool, by_generations: SyncDecision) -> DiskRule {
    use SyncDecision::*;
    match (me_good, peer_good, by_generations) {
        (false, true, InSync) => DiskRule::Set(TargetBitmap),
        (true, false, InSync) => DiskRule::Set(SourceBitmap),
        (false, true, SourceBitmap | SourceFull) => DiskRule::MineNewerButBad,
        (true, false, TargetBitmap | TargetFull) => DiskRule::PeersNewerButBad,
        _ => DiskRule::Keep,
    }
}

/// `connect --discard-my-data` on this node: it becomes the sync target whatever the
/// generations say, with a full sync where no bitmap covers the difference. Unrelated data
/// stays refused (another disk, or another resource's).
pub fn discard_mine(d: SyncDecision) -> SyncDecision {
    use SyncDecision::*;
    match d {
        Unrelated => Unrelated,
        SourceFull | TargetFull => TargetFull,
        InSync | SourceBitmap | TargetBitmap | SplitBrain => TargetBitmap,
    }
}

/// The peer discards its data: this node is the sync source (see [`discard_mine`]).
pub fn discard_peers(d: SyncDecision) -> SyncDecision {
    use SyncDecision::*;
    match discard_mine(d) {
        TargetFull => SourceFull,
        TargetBitmap => SourceBitmap,
        other => other,
    }
}

/// What `new-current-uuid --clear-bitmap` needs to know of one node: its role, its disk
/// (0 inconsistent, 1 outdated, 2 up-to-date, as on the wire) and its current generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkipSyncView {
    pub primary: bool,
    pub disk: u8,
    pub current: u64,
}

/// `new-current-uuid --clear-bitmap` (DRBD's way to skip the initial sync of two disks the
/// admin knows to be identical, e.g. both new and zeroed): allowed only between two
/// connected secondaries whose disks are both inconsistent and were never written through
/// blockrep since create-md (fresh generation). Anything else has data one side may lack.
pub fn can_skip_initial_sync(me: SkipSyncView, peer: Option<SkipSyncView>) -> Result<(), String> {
    use crate::meta::UUID_JUST_CREATED as FRESH;
    let Some(peer) = peer else {
        return Err("the peer is not connected: both nodes must take part".into());
    };
    for (who, n) in [("this node", me), ("the peer", peer)] {
        if n.primary {
            return Err(format!(
                "{who} is primary: only two secondaries can skip the initial sync"
            ));
        }
        if n.disk != 0 || n.current != FRESH {
            return Err(format!(
                "{who} is not freshly created (disk {}, generation {:016X}): its data may differ from the other's, so a sync is needed",
                match n.disk {
                    0 => "inconsistent",
                    1 => "outdated",
                    _ => "up-to-date",
                },
                n.current
            ));
        }
    }
    Ok(())
}

/// The generations of both nodes after `new-current-uuid --clear-bitmap`: the new id, coming
/// from the fresh state, with no bitmap (nothing differs).
pub fn skipped_sync(new_id: u64) -> Generations {
    Generations {
        current: new_id,
        bitmap: 0,
        history: [crate::meta::UUID_JUST_CREATED, 0],
    }
}

/// A primary that loses its peer (or is promoted without one) starts a new generation: the
/// bitmap from now on counts changes since the old one.
pub fn new_generation(g: Generations, new_id: u64) -> Generations {
    new_generation_of(g, new_id)
}

fn new_generation_of(g: Generations, new_id: u64) -> Generations {
    Generations {
        current: new_id,
        // Keep the oldest point the bitmap counts from: it is what the peer still has.
        bitmap: if g.bitmap != 0 { g.bitmap } else { g.current },
        history: [g.current, g.history[0]],
    }
}

/// A new generation that a node still at `g.current` can reach only by a full sync: no
/// bitmap generation, the old current in the history. For a peer whose disk failed: the one
/// commit says "full" on its own, whether or not the bitmap written after it (every region)
/// reaches the disk.
pub fn new_generation_full(g: Generations, new_id: u64) -> Generations {
    Generations {
        current: new_id,
        bitmap: 0,
        history: [g.current, g.history[0]],
    }
}

/// After a resync completes, the target adopts the source's generation and both forget the
/// bitmap generation. The bitmap generation goes into the history unless it is there already
/// (a generation started on losing the peer puts the old current in both): one id twice, or
/// an older id ahead of a newer one, would push the newer history out.
pub fn after_sync(source: Generations) -> Generations {
    Generations {
        current: source.current,
        bitmap: 0,
        history: if source.bitmap != 0 && !source.history.contains(&source.bitmap) {
            [source.bitmap, source.history[0]]
        } else {
            source.history
        },
    }
}

#[cfg(test)]
mod gen_tests {
    use super::SyncDecision::*;
    use super::*;
    use crate::meta::UUID_JUST_CREATED as FRESH;

    fn g(current: u64, bitmap: u64, h0: u64, h1: u64) -> Generations {
        Generations {
            current,
            bitmap,
            history: [h0, h1],
        }
    }

    #[test]
    fn skip_initial_sync_only_between_fresh_connected_secondaries() {
        let fresh = SkipSyncView {
            primary: false,
            disk: 0,
            current: FRESH,
        };
        assert_eq!(can_skip_initial_sync(fresh, Some(fresh)), Ok(()));
        assert!(can_skip_initial_sync(fresh, None).is_err());
        for bad in [
            SkipSyncView {
                primary: true,
                ..fresh
            },
            SkipSyncView { disk: 2, ..fresh },
            SkipSyncView { disk: 1, ..fresh },
            SkipSyncView {
                current: 0x8000_0000_0000_0001,
                ..fresh
            },
        ] {
            assert!(can_skip_initial_sync(bad, Some(fresh)).is_err(), "{bad:?}");
            assert!(can_skip_initial_sync(fresh, Some(bad)).is_err(), "{bad:?}");
        }
        // Afterwards both are the same generation: in sync, and a later outage is a bitmap
        // resync from the side that moved on.
        let both = skipped_sync(0x8000_0000_0000_0042);
        assert_eq!(compare_generations(&both, &both), InSync);
        let moved = new_generation(both, 0x8000_0000_0000_0043);
        assert_eq!(compare_generations(&moved, &both), SourceBitmap);
        assert_eq!(compare_generations(&both, &moved), TargetBitmap);
        // A node created afresh later gets everything.
        assert_eq!(compare_generations(&both, &g(FRESH, 0, 0, 0)), SourceFull);
    }

    fn mirror(d: SyncDecision) -> SyncDecision {
        d.mirror()
    }

    fn check(a: Generations, b: Generations, want: SyncDecision) {
        assert_eq!(compare_generations(&a, &b), want, "{a:?} vs {b:?}");
        assert_eq!(compare_generations(&b, &a), mirror(want), "{b:?} vs {a:?}");
    }

    #[test]
    fn fresh_pairs() {
        check(g(FRESH, 0, 0, 0), g(FRESH, 0, 0, 0), InSync);
        check(g(10, 0, FRESH, 0), g(FRESH, 0, 0, 0), SourceFull);
    }

    #[test]
    fn same_generation_is_in_sync() {
        check(g(10, 0, 9, 0), g(10, 0, 9, 0), InSync);
    }

    #[test]
    fn primary_lost_peer_then_wrote() {
        // alpha was primary at 10 with beta in sync, lost beta and moved to 11.
        let alpha = new_generation(g(10, 0, 9, 0), 11);
        assert_eq!(alpha, g(11, 10, 10, 9));
        check(alpha, g(10, 0, 9, 0), SourceBitmap);
        // It lost beta again later (still not resynced): the bitmap still counts from 10.
        let alpha2 = new_generation(alpha, 12);
        assert_eq!(alpha2.bitmap, 10);
        check(alpha2, g(10, 0, 9, 0), SourceBitmap);
    }

    #[test]
    fn a_generation_started_for_a_failed_peer_disk_means_a_full_sync() {
        let both = g(10, 0, 9, 0);
        let good = new_generation_full(both, 11);
        check(good, both, SourceFull);
        // Moving on later (a failover, then writes without the peer): the bitmap counts from
        // 11, and holds every region from the failure on.
        let later = new_generation(good, 12);
        assert_eq!(later, g(12, 11, 11, 10));
        check(later, g(11, 0, 10, 9), SourceBitmap);
    }

    /// Both sides of a comparison where `a` holds an unacknowledged SyncDone to `unacked`.
    fn check_unacked(a: Generations, unacked: u64, b: Generations, want: SyncDecision) {
        assert_eq!(
            compare_generations_unacked(&a, unacked, &b, 0),
            want,
            "{a:?} (unacked {unacked:X}) vs {b:?}"
        );
        assert_eq!(
            compare_generations_unacked(&b, 0, &a, unacked),
            mirror(want),
            "{b:?} vs {a:?} (unacked {unacked:X})"
        );
    }

    /// A source whose SyncDone (to generation 13, its bitmap counting from 11) was never
    /// acknowledged: the target may be at 13 or, had it not applied the SyncDone, at 11.
    /// However many generations the source starts alone, both are bitmap resyncs from it;
    /// a target that moved on from 13 is a split brain; without the record, two
    /// generations made the first a split brain.
    #[test]
    fn an_unacknowledged_sync_done_keeps_the_target_a_bitmap_resync_away() {
        let at_done = g(13, 11, 12, 10);
        let target_took_it = after_sync(at_done);
        let target_did_not = g(11, 0, 10, 9);
        let mut alpha = at_done;
        for (i, id) in [14, 15, 16, 17].into_iter().enumerate() {
            alpha = new_generation(alpha, id);
            assert_eq!(alpha.bitmap, 11, "the bitmap still counts from 11");
            check_unacked(alpha, 13, target_took_it, SourceBitmap);
            check_unacked(alpha, 13, target_did_not, SourceBitmap);
            if i >= 2 {
                // 13 left alpha's history: without the record, a split brain.
                check(alpha, target_took_it, SplitBrain);
            }
        }
        // The target moved on from 13 (promoted while alpha was away): both changed data.
        let beta = new_generation(target_took_it, 30);
        check_unacked(alpha, 13, beta, SplitBrain);
        let beta = new_generation(new_generation(beta, 31), 32);
        check_unacked(alpha, 13, beta, SplitBrain);
        // A record whose bitmap generation is gone (after_sync of a later sync) says nothing.
        let done = after_sync(alpha);
        assert_eq!(
            compare_generations_unacked(&done, 13, &target_took_it, 0),
            compare_generations(&done, &target_took_it)
        );
    }

    #[test]
    fn failover_then_old_primary_returns() {
        // Both at 10; alpha dies; beta is promoted with --force.
        let beta = new_generation(g(10, 0, 9, 0), 20);
        let alpha = g(10, 0, 9, 0);
        check(beta, alpha, SourceBitmap);
    }

    #[test]
    fn both_promoted_while_apart_is_split_brain() {
        let alpha = new_generation(g(10, 0, 9, 0), 11);
        let beta = new_generation(g(10, 0, 9, 0), 20);
        check(alpha, beta, SplitBrain);
    }

    #[test]
    fn resync_end_adopts_source() {
        let alpha = new_generation(g(10, 0, 9, 0), 11);
        let done = after_sync(alpha);
        assert_eq!(done, g(11, 0, 10, 9), "no id twice in the history");
        check(done, done, InSync);
    }

    #[test]
    fn history_without_bitmap_needs_full_sync() {
        // alpha moved on, resynced with someone else, then moved again: only history links.
        check(g(30, 0, 20, 10), g(10, 0, 9, 0), SourceFull);
        check(g(10, 0, 9, 0), g(30, 0, 20, 10), TargetFull);
    }

    #[test]
    fn sync_done_applied_but_not_acknowledged() {
        // alpha sent SyncDone for generation 30 (bitmap counting from 10); beta applied it,
        // but the link dropped before alpha heard, so alpha kept its bitmap id and then moved
        // on again when it lost beta.
        let beta = after_sync(g(30, 10, 20, 10));
        let alpha = new_generation(g(30, 10, 20, 10), 40);
        assert_eq!(alpha, g(40, 10, 30, 20));
        check(alpha, beta, SourceBitmap);
    }

    #[test]
    fn unrelated() {
        check(g(10, 0, 9, 0), g(77, 0, 66, 0), Unrelated);
    }

    #[test]
    fn a_peer_rolled_back_past_the_bitmap_needs_a_full_sync() {
        // Both at 10; alpha moved to 11 alone (bitmap 10), resynced beta to 11, moved to 12
        // alone (bitmap 11). Beta's disk and metadata are then restored from a backup taken
        // at 10: alpha's bitmap counts from 11 and misses what changed from 10 to 11.
        let alpha = new_generation(after_sync(new_generation(g(10, 0, 9, 0), 11)), 12);
        assert_eq!(alpha, g(12, 11, 11, 10));
        check(alpha, g(10, 0, 9, 0), SourceFull);
        // Beta at 11, as it was left: the bitmap counts from exactly there.
        check(alpha, g(11, 0, 10, 9), SourceBitmap);
    }

    #[test]
    fn a_resync_generation_is_no_proof_of_age() {
        // alpha at 10 named a resync generation (77) for a bitmap resync at one generation;
        // its end was never acknowledged, then alpha moved on alone to 12. Beta restored to
        // 9 (a backup): 77 is in no history, so nothing says it is older than 9.
        let alpha = new_generation(g(10, 77, 9, 8), 12);
        assert_eq!(alpha, g(12, 77, 10, 9));
        check(alpha, g(9, 0, 8, 0), SourceFull);
        // Beta at 10 (it got the resync's end): the bitmap counts from there.
        check(alpha, g(10, 0, 77, 9), SourceBitmap);
    }

    #[test]
    fn the_fresh_id_is_no_common_point() {
        // alpha forced primary from fresh, synced nothing to anyone, moved on; beta's disk
        // replaced (create-md) and forced primary too: nothing in common.
        let alpha = new_generation(new_generation(g(FRESH, 0, 0, 0), 21), 22);
        assert_eq!(alpha, g(22, FRESH, 21, FRESH));
        let beta = new_generation(g(FRESH, 0, 0, 0), 31);
        check(alpha, beta, Unrelated);
        // alpha went through a real generation (21, synced to beta) and moved on; beta's disk
        // was replaced and forced primary meanwhile: its bitmap (fresh) is in alpha's
        // history, but its data has nothing of 21.
        let alpha = new_generation(after_sync(new_generation(g(FRESH, 0, 0, 0), 21)), 22);
        assert_eq!(alpha, g(22, 21, 21, FRESH));
        check(alpha, beta, Unrelated);
        // Nor is a split brain through a shared fresh bitmap one the bitmaps cover.
        assert!(!split_brain_bitmaps_cover(&beta, 0, &beta, 0));
    }

    #[test]
    fn only_a_split_brain_from_one_real_point_is_covered_by_the_bitmaps() {
        let alpha = new_generation(g(10, 0, 9, 0), 11);
        let beta = new_generation(g(10, 0, 9, 0), 20);
        check(alpha, beta, SplitBrain);
        assert!(split_brain_bitmaps_cover(&alpha, 0, &beta, 0));
        // Related only through the histories (a resync's end that its source never heard of,
        // then a second split): the bitmaps count from different points.
        let alpha = g(30, 20, 20, 10);
        let beta = g(40, 10, 20, 10);
        check(alpha, beta, SplitBrain);
        assert!(!split_brain_bitmaps_cover(&alpha, 0, &beta, 0));
        // Unless alpha, whose bitmap counts from 10, knows its unacknowledged SyncDone left
        // beta at 20, where beta's bitmap counts from: then both name all that either changed.
        assert!(split_brain_bitmaps_cover(
            &alpha_at(10),
            20,
            &g(40, 20, 25, 20),
            0
        ));
        assert!(split_brain_bitmaps_cover(
            &g(40, 20, 25, 20),
            0,
            &alpha_at(10),
            20
        ));
        // A record for another point says nothing.
        assert!(!split_brain_bitmaps_cover(
            &alpha_at(10),
            25,
            &g(40, 20, 25, 20),
            0
        ));
    }

    /// A source at 30 whose bitmap counts from `bitmap`.
    fn alpha_at(bitmap: u64) -> Generations {
        g(30, bitmap, 20, bitmap)
    }
}

/// The automatic split-brain policies for when neither node is primary (DRBD's after-sb-0pri).
/// Both nodes must run the same (see `Msg::Hello`): its code there is the discriminant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AfterSb0Pri {
    /// Leave it to the admin (`connect --discard-my-data`).
    Disconnect,
    /// The node that was not primary when the two parted loses its changes (DRBD's rule:
    /// the one primary before the split keeps its data); when neither or both were, the
    /// one promoted more recently.
    DiscardYoungerPrimary,
    /// The node with fewer changed bytes loses them (a tie: the younger primary).
    DiscardLeastChanges,
    /// A node that changed nothing syncs from the other; if both changed, disconnect.
    DiscardZeroChanges,
}

impl AfterSb0Pri {
    const ALL: [AfterSb0Pri; 4] = [
        AfterSb0Pri::Disconnect,
        AfterSb0Pri::DiscardYoungerPrimary,
        AfterSb0Pri::DiscardLeastChanges,
        AfterSb0Pri::DiscardZeroChanges,
    ];

    /// As the config spells it.
    pub fn name(self) -> &'static str {
        match self {
            AfterSb0Pri::Disconnect => "disconnect",
            AfterSb0Pri::DiscardYoungerPrimary => "discard-younger-primary",
            AfterSb0Pri::DiscardLeastChanges => "discard-least-changes",
            AfterSb0Pri::DiscardZeroChanges => "discard-zero-changes",
        }
    }

    /// The policy a peer's hello names, if any.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|p| *p as u8 == code)
    }
}

/// One side's facts for the split-brain policies.
#[derive(Debug, Clone, Copy)]
pub struct SbFacts<'a> {
    pub name: &'a str,
    /// Bytes changed since the split (its bitmap).
    pub changes: u64,
    /// When it was last promoted (unix milliseconds).
    pub promoted_ms: u64,
    /// It was primary when the two parted (see `Superblock::split_as_primary`).
    pub split_as_primary: bool,
    /// Its disk is consistent: up to date or outdated, not the target of a resync that did
    /// not finish (inconsistent). Outdated data is complete, only older, and its changes
    /// since the split are changes like any other's: the policy's own rule decides them,
    /// as in DRBD, whose split-brain override by disk state is for an inconsistent disk only.
    pub consistent: bool,
}

/// Decides an automatic resolution: `Some(true)` when this node discards its changes,
/// `Some(false)` when the peer does, `None` to disconnect. Both nodes compute it from the same
/// facts mirrored, and always agree (ties fall back to the node name).
pub fn resolve_split_brain(policy: AfterSb0Pri, me: SbFacts, peer: SbFacts) -> Option<bool> {
    let younger = || {
        if me.split_as_primary != peer.split_as_primary {
            // The primary before the split is the older one, whenever either was promoted
            // since (a restart of it with `primary --force`, say).
            !me.split_as_primary
        } else if me.promoted_ms != peer.promoted_ms {
            me.promoted_ms > peer.promoted_ms
        } else {
            me.name > peer.name
        }
    };
    if policy == AfterSb0Pri::Disconnect {
        return None;
    }
    // Whatever the policy: only a consistent disk can be the source. A node an earlier
    // resolution made the target, cut off midway, is inconsistent; its bitmap has not
    // shrunk as the source's did while the resync ran, so counting changes again could now
    // pick it as the source and spread its half-written regions over the other's changes.
    match (me.consistent, peer.consistent) {
        (true, true) => {}
        (false, true) => return Some(true),
        (true, false) => return Some(false),
        (false, false) => return None,
    }
    match policy {
        AfterSb0Pri::Disconnect => None,
        AfterSb0Pri::DiscardYoungerPrimary => Some(younger()),
        AfterSb0Pri::DiscardLeastChanges => Some(if me.changes != peer.changes {
            me.changes < peer.changes
        } else {
            younger()
        }),
        AfterSb0Pri::DiscardZeroChanges => match (me.changes == 0, peer.changes == 0) {
            (true, false) => Some(true),
            (false, true) => Some(false),
            (true, true) => Some(younger()),
            (false, false) => None,
        },
    }
}

#[cfg(test)]
mod sb_tests {
    use super::*;

    fn f(name: &str, changes: u64, promoted_ms: u64) -> SbFacts<'_> {
        SbFacts {
            name,
            changes,
            promoted_ms,
            split_as_primary: false,
            consistent: true,
        }
    }

    fn parted_as_primary(f: SbFacts<'_>) -> SbFacts<'_> {
        SbFacts {
            split_as_primary: true,
            ..f
        }
    }

    fn inconsistent(f: SbFacts<'_>) -> SbFacts<'_> {
        SbFacts {
            consistent: false,
            ..f
        }
    }

    /// Every policy gives mirrored answers on the two nodes.
    #[test]
    fn both_sides_agree() {
        let cases = [
            (f("alpha", 10, 100), f("beta", 20, 200)),
            (f("alpha", 0, 300), f("beta", 20, 200)),
            (f("alpha", 5, 100), f("beta", 5, 100)),
            (f("alpha", 0, 1), f("beta", 0, 1)),
            (inconsistent(f("alpha", 50, 100)), f("beta", 10, 200)),
            (
                inconsistent(f("alpha", 5, 100)),
                inconsistent(f("beta", 10, 200)),
            ),
            (parted_as_primary(f("alpha", 5, 300)), f("beta", 10, 200)),
            (
                parted_as_primary(f("alpha", 5, 100)),
                parted_as_primary(f("beta", 10, 200)),
            ),
        ];
        for p in [
            AfterSb0Pri::Disconnect,
            AfterSb0Pri::DiscardYoungerPrimary,
            AfterSb0Pri::DiscardLeastChanges,
            AfterSb0Pri::DiscardZeroChanges,
        ] {
            for (a, b) in cases {
                let x = resolve_split_brain(p, a, b);
                let y = resolve_split_brain(p, b, a);
                assert_eq!(x.map(|v| !v), y, "{p:?} {a:?} {b:?}");
            }
        }
    }

    #[test]
    fn policies() {
        let a = f("alpha", 10, 100);
        let b = f("beta", 20, 200);
        assert_eq!(resolve_split_brain(AfterSb0Pri::Disconnect, a, b), None);
        // beta was promoted later: it discards.
        assert_eq!(
            resolve_split_brain(AfterSb0Pri::DiscardYoungerPrimary, a, b),
            Some(false)
        );
        // alpha changed less: it discards.
        assert_eq!(
            resolve_split_brain(AfterSb0Pri::DiscardLeastChanges, a, b),
            Some(true)
        );
        assert_eq!(
            resolve_split_brain(AfterSb0Pri::DiscardZeroChanges, a, b),
            None
        );
        let z = f("alpha", 0, 100);
        assert_eq!(
            resolve_split_brain(AfterSb0Pri::DiscardZeroChanges, z, b),
            Some(true)
        );
        // Review finding: alpha, primary when the link was cut, was restarted and promoted
        // again (with --force) after beta's forced promotion: by the last promotion's time
        // alpha was the younger and lost the writes it made as the primary before the
        // split. DRBD keeps the data of the node that was primary before the split.
        let old_primary = parted_as_primary(f("alpha", 10, 300));
        assert_eq!(
            resolve_split_brain(AfterSb0Pri::DiscardYoungerPrimary, old_primary, b),
            Some(false),
            "the primary before the split keeps its data"
        );
        assert_eq!(
            resolve_split_brain(AfterSb0Pri::DiscardYoungerPrimary, b, old_primary),
            Some(true)
        );
    }

    /// The disk rule agrees on both sides for every pair of disk states and every decision
    /// the generations can give, and never makes a bad disk the source of a good one.
    #[test]
    fn the_disk_rule_is_mirrored_and_never_sources_a_bad_disk() {
        use SyncDecision::*;
        let mirror = SyncDecision::mirror;
        let source = |d: SyncDecision| matches!(d, SourceBitmap | SourceFull);
        for d in [
            InSync,
            SourceBitmap,
            TargetBitmap,
            SourceFull,
            TargetFull,
            SplitBrain,
            Unrelated,
        ] {
            for me in [false, true] {
                for peer in [false, true] {
                    let mine = by_disk_state(me, peer, d);
                    let theirs = by_disk_state(peer, me, mirror(d));
                    let (m, t) = match (mine, theirs) {
                        (DiskRule::Keep, DiskRule::Keep) => (d, mirror(d)),
                        (DiskRule::Set(a), DiskRule::Set(b)) => (a, b),
                        (DiskRule::MineNewerButBad, DiskRule::PeersNewerButBad)
                        | (DiskRule::PeersNewerButBad, DiskRule::MineNewerButBad) => continue,
                        other => panic!("{d:?} me {me} peer {peer}: sides disagree: {other:?}"),
                    };
                    assert_eq!(m, mirror(t), "{d:?} me {me} peer {peer}");
                    if me != peer {
                        // Only the good disk can be the source.
                        assert!(me || !source(m), "{d:?}: bad disk {m:?}");
                        assert!(peer || !source(t), "{d:?}: bad peer disk {t:?}");
                    }
                }
            }
        }
        assert_eq!(
            by_disk_state(false, true, InSync),
            DiskRule::Set(TargetBitmap)
        );
        assert_eq!(
            by_disk_state(false, true, SourceBitmap),
            DiskRule::MineNewerButBad
        );
    }

    /// A resolution's target cut off midway is inconsistent, with more bits left than the
    /// source it was taking data from: it stays the target under every policy but
    /// `disconnect`, and two inconsistent disks are left to the admin.
    #[test]
    fn an_inconsistent_disk_is_never_the_source() {
        let source = f("alpha", 8, 300);
        let target = inconsistent(f("beta", 10, 100));
        for p in [
            AfterSb0Pri::DiscardYoungerPrimary,
            AfterSb0Pri::DiscardLeastChanges,
            AfterSb0Pri::DiscardZeroChanges,
        ] {
            assert_eq!(resolve_split_brain(p, source, target), Some(false), "{p:?}");
            assert_eq!(resolve_split_brain(p, target, source), Some(true), "{p:?}");
            assert_eq!(
                resolve_split_brain(p, inconsistent(source), target),
                None,
                "{p:?}"
            );
        }
        assert_eq!(
            resolve_split_brain(AfterSb0Pri::Disconnect, source, target),
            None
        );
    }
}

#[cfg(test)]
mod back_in_time_tests {
    use super::SyncDecision::*;
    use super::*;

    const G: u64 = 0x1111;

    fn held(high: u64, told: (u64, u64)) -> Held {
        Held {
            current: G,
            high,
            primary: false,
            up_to_date: true,
            told,
            chain: [G, 0, 0],
        }
    }

    #[test]
    fn a_peer_back_at_a_generation_older_than_its_mark_is_the_target_of_a_full_sync() {
        // Review finding: both at 10 (history 9, 8) after a resync; alpha, a crashed primary
        // back up, named a resync generation (77) for its hot extents, and that resync was
        // cut. Beta's disk and metadata are then restored from an image taken at 9. Alpha's
        // bitmap (77, named at 10) is taken to cover 9, its history's head: a bitmap resync
        // of the hot extents alone. But alpha's mark says beta's disk durably reached 10.
        let gens = |current, bitmap, h0, h1| Generations {
            current,
            bitmap,
            history: [h0, h1],
        };
        let (a, b) = (gens(10, 77, 9, 8), gens(9, 0, 8, 0));
        assert_eq!(compare_generations(&a, &b), SourceBitmap);
        // (`told`: what a node holds of its peer's disk.)
        let alpha = Held {
            current: 10,
            high: 500,
            primary: false,
            up_to_date: true,
            told: (10, 400),
            chain: [10, 9, 8],
        };
        let beta = Held {
            current: 9,
            high: 100,
            told: (0, 0),
            chain: [9, 8, 0],
            ..alpha
        };
        assert_eq!(back_in_time(&alpha, &beta, SourceBitmap), Some(SourceFull));
        assert_eq!(back_in_time(&beta, &alpha, TargetBitmap), Some(TargetFull));
        // Beta at 10 as alpha left it, holding what it was told: the usual rules.
        let beta_kept = Held {
            current: 10,
            high: 400,
            chain: [10, 9, 8],
            ..beta
        };
        assert_eq!(back_in_time(&alpha, &beta_kept, SourceBitmap), None);
        // A peer whose generations are newer than the mark (it moved on since, a failover)
        // or unrelated to this node's did not go back.
        for current in [0x2222, crate::meta::UUID_JUST_CREATED] {
            let moved = Held {
                current,
                chain: [current, 10, 9],
                ..beta
            };
            assert_eq!(
                back_in_time(&alpha, &moved, SourceBitmap),
                None,
                "{current:x}"
            );
        }
        // A mark older than the peer's generation says nothing (the peer moved on from it).
        let older_mark = Held {
            told: (8, 50),
            ..alpha
        };
        assert_eq!(back_in_time(&older_mark, &beta, SourceBitmap), None);
    }

    #[test]
    fn a_restored_primary_image_behind_what_it_told_its_peer_is_the_target_of_a_full_sync() {
        // Alpha (restored, a crashed primary) holds through 100; beta applied through 500
        // and was told alpha's metadata held 400 at this generation.
        let alpha = held(100, (0, 0));
        let beta = held(500, (G, 400));
        assert_eq!(back_in_time(&alpha, &beta, InSync), Some(TargetFull));
        assert_eq!(back_in_time(&beta, &alpha, InSync), Some(SourceFull));
    }

    #[test]
    fn a_crash_reads_back_at_least_what_was_told_so_it_is_no_rollback() {
        for high in [400, 401, 900] {
            let alpha = held(high, (0, 0));
            let beta = held(500, (G, 400));
            assert_eq!(back_in_time(&alpha, &beta, InSync), None, "high {high}");
            assert_eq!(back_in_time(&beta, &alpha, InSync), None, "high {high}");
        }
    }

    #[test]
    fn a_mark_of_another_generation_or_none_says_nothing() {
        let alpha = held(100, (0, 0));
        for told in [
            (0, 400),
            (0x2222, 400),
            (crate::meta::UUID_JUST_CREATED, 400),
        ] {
            let beta = held(500, told);
            assert_eq!(back_in_time(&alpha, &beta, InSync), None, "{told:?}");
        }
    }

    #[test]
    fn a_peer_that_moved_on_since_resyncs_a_rolled_back_node_in_full() {
        // Trial 9: alpha's image is at G; beta moved on to a newer generation (a switchover
        // or failover) after alpha's later writes reached it. Its bitmap counts only from
        // there: the generations' bitmap resync becomes a full one.
        let alpha = held(100, (0, 0));
        let beta = Held {
            current: 0x2222,
            high: 50,
            ..held(500, (G, 400))
        };
        assert_eq!(back_in_time(&alpha, &beta, TargetBitmap), Some(TargetFull));
        assert_eq!(back_in_time(&beta, &alpha, SourceBitmap), Some(SourceFull));
        assert_eq!(back_in_time(&alpha, &beta, TargetFull), Some(TargetFull));
        // Where the generations make the node that went back the source, or a split brain,
        // they decide.
        for by_generations in [SourceBitmap, SourceFull, SplitBrain, Unrelated] {
            assert_eq!(
                back_in_time(&alpha, &beta, by_generations),
                None,
                "{by_generations:?}"
            );
        }
    }

    #[test]
    fn a_rolled_back_node_still_ahead_of_its_peer_keeps_the_usual_rules() {
        // Alpha lost what it told (400) but holds 300; beta applied only through 200: alpha's
        // data is still the newer, and its crashed-primary resync brings beta up.
        let alpha = held(300, (0, 0));
        let beta = held(200, (G, 400));
        assert_eq!(back_in_time(&alpha, &beta, InSync), None);
    }

    #[test]
    fn a_primary_or_two_rolled_back_nodes_are_left_to_the_usual_rules() {
        let alpha = Held {
            primary: true,
            ..held(100, (G, 50))
        };
        let beta = held(500, (G, 400));
        assert_eq!(back_in_time(&alpha, &beta, InSync), None);
        let both = held(100, (G, 600));
        assert_eq!(back_in_time(&both, &beta, InSync), None);
        // The other node's disk is not up to date: it is no source of everything.
        let alpha = held(100, (0, 0));
        let beta = Held {
            up_to_date: false,
            ..held(500, (G, 400))
        };
        assert_eq!(back_in_time(&alpha, &beta, InSync), None);
        assert_eq!(back_in_time(&beta, &alpha, InSync), None);
    }
}
