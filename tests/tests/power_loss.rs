//! Power loss: a node whose disk keeps only what was flushed to it.
//!
//! `kill -9` leaves the node's page cache behind: the kernel still writes back everything the
//! daemon wrote, so no kill test can show whether the journal, the peer's durable marks and
//! the dirty bitmap are right about what a disk holds after a power cut. Here a node's backing
//! device is nbdkit's cache filter in writeback mode over a file, exposed as a file by
//! nbdfuse: writes stay in nbdkit's memory until a flush writes them back, so killing nbdkit
//! loses exactly what a power cut loses on a disk with a volatile write cache. The daemon is
//! killed first, then its disk; the disk comes back over the same file with only what was
//! flushed. Real daemons, real TCP, real NBD clients (python3 + libnbd, nbdcopy).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blockrep_e2e::watch::wait_synced;
use blockrep_e2e::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;
const BLOCKS: u64 = 2048;

/// A file that loses its unflushed writes when cut: nbdkit's cache filter (writeback) over
/// `base`, exposed by nbdfuse; `link` becomes a symlink to that file. `name` names this life
/// of it (its own socket and mountpoint).
fn volatile_file(c: &Cluster, link: &Path, name: &str, base: &Path) -> NbdkitFile {
    let disk = NbdkitFile::start(
        c.dir().path(),
        name,
        &[
            "--filter=cache".into(),
            "file".into(),
            format!("file={}", base.display()),
            "cache=writeback".into(),
        ],
        &[],
    );
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(disk.file(), link).expect("symlink to the volatile file");
    disk
}

/// The node's backing device as a volatile disk over `base`; `gen` names each life of it.
fn volatile_disk(c: &Cluster, node: &Node, base: &Path, gen: u32) -> NbdkitFile {
    let name = format!("{}-disk{gen}", node.name());
    volatile_file(c, node.backing_path(), &name, base)
}

/// Moves the node's backing file to `NAME-base.img` and puts a volatile disk over it.
fn volatile_backing(c: &Cluster, node: &Node) -> (PathBuf, NbdkitFile) {
    let base = c.dir().join(format!("{}-base.img", node.name()));
    std::fs::rename(node.backing_path(), &base).expect("move the backing file");
    let disk = volatile_disk(c, node, &base, 1);
    (base, disk)
}

/// The power cut: the daemon dies, then its disk, with whatever it had not written back (the
/// disk is taken only once the daemon is gone: a failed kill leaves it to the guards' order).
fn power_cut(node: &Node, disk: &mut Option<NbdkitFile>) {
    node.kill9_and_wait();
    disk.take().expect("the node's disk is up").close();
}

/// What the file holds in its first `BLOCKS` blocks, read straight from the disk's base file
/// (the node and its volatile disk are down).
fn stamps_on(base: &Path) -> Vec<Stamp> {
    let data = std::fs::read(base).unwrap_or_else(|e| panic!("read {}: {e}", base.display()));
    Stamp::parse_all(&data[..(BLOCKS as usize) * STAMP_BLOCK], BLOCKS as usize)
}

/// The last acknowledged write of each block (the writer never has two writes to one block
/// in flight, so it is the one a replica must hold).
fn last_acked(log: &WriterLog) -> HashMap<u64, u64> {
    let mut last = HashMap::new();
    for &(seq, blk) in &log.acked {
        let e = last.entry(blk).or_insert(0);
        *e = seq.max(*e);
    }
    last
}

/// Blocks whose stamp is not the last acknowledged write (or, with `newer_ok`, one issued
/// after it). Panics on a block holding neither zeroes nor a valid stamp of itself.
fn behind(stamps: &[Stamp], last: &HashMap<u64, u64>, newer_ok: bool, what: &str) -> Vec<u64> {
    let mut out = Vec::new();
    for (blk, st) in stamps.iter().enumerate() {
        let blk = blk as u64;
        let held = match *st {
            Stamp::Zero => 0,
            Stamp::Valid { block, seq } if block == blk => seq,
            other => panic!("{what}: block {blk} holds {other:?}: torn or foreign data"),
        };
        let want = last.get(&blk).copied().unwrap_or(0);
        if held != want && !(newer_ok && held > want) {
            out.push(blk);
        }
    }
    out
}

fn writer(py: &Path, c: &Cluster, tag: &str, uri: &str, flush_every: u64) -> StampWriter {
    writer_with(py, c, tag, uri, |o| o.flush_every = flush_every)
}

/// A writer with the options `f` changes from those of [`writer`] (no flushes).
fn writer_with(
    py: &Path,
    c: &Cluster,
    tag: &str,
    uri: &str,
    f: impl FnOnce(&mut StampOpts),
) -> StampWriter {
    let mut opts = StampOpts {
        blocks: BLOCKS,
        inflight: 16,
        order: StampOrder::Random,
        count: 0,
        seconds: 0.0,
        flush_every: 0,
        flush_until: 0,
    };
    f(&mut opts);
    StampWriter::spawn(py, c.dir().path(), tag, uri, opts)
}

/// For each block, the last write an acknowledged flush covered: what the disk must keep.
fn last_flushed(log: &WriterLog) -> HashMap<u64, u64> {
    let mut last = HashMap::new();
    for &(seq, blk) in log.acked.iter().filter(|w| w.0 <= log.flushed) {
        let e = last.entry(blk).or_insert(0);
        *e = seq.max(*e);
    }
    last
}

fn wait_acked(w: &mut StampWriter, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while w.log().acked.len() < n {
        assert!(w.running(), "the writer exited early:\n{}", w.output());
        assert!(
            Instant::now() < deadline,
            "fewer than {n} writes acknowledged in 60 s:\n{}",
            w.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tools() -> Option<PathBuf> {
    if !have_tools(&["nbdkit", "nbdfuse", "fusermount3", "nbdcopy"]) {
        return None;
    }
    let py = python_with_nbd();
    if py.is_none() {
        skip_or_fail("no python3 with the libnbd bindings (python3-libnbd)");
    }
    py
}

/// Two nodes on loopback with 32 MiB of backing each and an 8 MiB journal, `f` adding to
/// the builder (not started: the volatile disks go in first).
fn cluster(
    test: &str,
    protocol: &str,
    f: impl FnOnce(ClusterBuilder) -> ClusterBuilder,
) -> Cluster {
    f(Cluster::builder(test)
        .nodes(2)
        .backing_size(SIZE)
        .protocol(protocol)
        .journal_size("8M"))
    .build()
}

/// Starts the pair (alpha primary) and waits until it is in sync; returns the exported size.
fn start(c: &Cluster) -> u64 {
    c.start_pair();
    c.wait_in_sync(SYNC_TIMEOUT);
    c.alpha().size()
}

/// Under C the secondary acknowledges a write once it is applied, before its disk has it: the
/// primary releases the journal space then and only remembers the range until the secondary
/// reports it durable. A power cut on the secondary loses such writes from its disk; when it
/// comes back, the primary must send them again (from the journal, or as a bitmap resync), or
/// the replicas silently differ.
#[test]
fn a_secondary_that_loses_power_gets_back_the_writes_it_had_applied() {
    secondary_power_loss("power-loss-secondary", false);
}

/// The same with external metadata on a volatile device of its own, and client flushes: a
/// flush under C returns once the secondary synced its data device and committed its applied
/// mark on the other; its disk must keep every flushed write, and the mark must not claim
/// writes the data device lost.
#[test]
fn a_secondary_with_external_metadata_loses_power_and_keeps_every_flushed_write() {
    secondary_power_loss("power-loss-secondary-external", true);
}

fn secondary_power_loss(test: &str, external: bool) {
    let Some(py) = tools() else { return };
    let c = cluster(test, "C", |b| if external { b.external_meta() } else { b });
    let (a, b) = (c.alpha(), c.beta());
    // Metadata first, on the plain files (create-md sizes an external metadata file).
    a.create_md();
    b.create_md();
    // Declared before the daemons' guard: dropped after the daemons are stopped.
    let (base, disk) = volatile_backing(&c, b);
    let mut disk = Some(disk);
    let meta_link = c.dir().join("beta.meta");
    let meta_base = c.dir().join("beta-meta-base.img");
    let mut meta = external.then(|| {
        std::fs::rename(&meta_link, &meta_base).expect("move the metadata file");
        volatile_file(&c, &meta_link, "beta-meta1", &meta_base)
    });
    let stop = StopDaemons(&c);
    c.up_pair();
    c.wait_in_sync(SYNC_TIMEOUT);
    let size = a.size();

    // Without client flushes beta makes these durable only at its own checkpoints; with them
    // (external metadata), a flush after every 128 writes. The writer stops by itself 16 to
    // 96 writes past its 24th flush, so the last writes are not flushed. (A stop asked from
    // here could land after the next flush, which left nothing unflushed to lose.)
    let flush_every = if external { 128 } else { 0 };
    let past_flush = 16 + u64::from(std::process::id()) % 81;
    let count = 24 * 128 + past_flush;
    let mut w = writer_with(&py, &c, "w", &a.uri(), |o| {
        o.flush_every = flush_every;
        o.count = count;
    });
    assert!(
        w.wait_exit(Duration::from_secs(120)),
        "writer did not finish its {count} writes:\n{}",
        w.output()
    );
    let log = w.log();
    assert!(log.errors.is_empty(), "writes failed: {:?}", log.errors);
    assert_eq!(log.acked.len() as u64, count, "writes acknowledged");
    if external {
        assert_eq!(log.flushed, count - past_flush, "the last flush covered");
    }
    let last = last_acked(&log);

    power_cut(b, &mut disk);
    if let Some(m) = meta.take() {
        m.close();
    }
    let kept = stamps_on(&base);
    let missing = behind(
        &kept,
        &last_flushed(&log),
        true,
        "beta's disk after the cut",
    );
    assert!(
        missing.is_empty(),
        "beta's disk lost {} flushed writes in the power cut, first blocks {:?}",
        missing.len(),
        &missing[..missing.len().min(8)]
    );
    let lost = behind(&kept, &last, false, "beta's disk after the cut");
    assert!(
        !lost.is_empty(),
        "beta's disk kept all {} acknowledged writes through the power cut: it synced them before, and this test exercised nothing",
        log.acked.len()
    );
    let ra = a.wait_not_connected(Duration::from_secs(20));
    println!(
        "beta's disk lost {} of {} blocks written (flushes through {}); alpha at the cut: {ra}",
        lost.len(),
        last.len(),
        log.flushed
    );

    // beta comes back with its devices as the cut left them.
    disk = Some(volatile_disk(&c, b, &base, 2));
    if external {
        meta = Some(volatile_file(&c, &meta_link, "beta-meta2", &meta_base));
    }
    b.up();
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_replicas_identical(size, "after beta's power loss and reconnect");
    println!("--- alpha's log ---\n{}", a.log_tail(12));
    let data = b.backing_data((BLOCKS as usize * STAMP_BLOCK) as u64);
    let still = behind(
        &Stamp::parse_all(&data, BLOCKS as usize),
        &last,
        false,
        "beta after the reconnect",
    );
    assert!(
        still.is_empty(),
        "{} of the {} blocks beta lost in the cut were not sent again, first {:?}; alpha at the cut: {ra}",
        still.len(),
        lost.len(),
        &still[..still.len().min(8)]
    );
    // The daemons hold the disks' files open: they stop first (as on a failed assertion).
    drop(stop);
    drop((disk, meta));
}

/// The primary loses power under C while a client writes: the secondary, promoted, holds every
/// acknowledged write; the old primary comes back with a disk that lost the writes it had not
/// flushed (no client flush here), and the resync from the new primary must cover them as
/// well as what the new primary wrote meanwhile (DRBD: the crashed node's activity log).
#[test]
fn a_primary_that_loses_power_fails_over_and_comes_back_in_sync() {
    let Some(py) = tools() else { return };
    let c = cluster("power-loss-primary", "C", |b| b);
    let (a, b) = (c.alpha(), c.beta());
    let (base, disk) = volatile_backing(&c, a);
    let mut disk = Some(disk);
    let stop = StopDaemons(&c);
    let size = start(&c);

    let mut w = writer(&py, &c, "w", &a.uri(), 0);
    wait_acked(&mut w, 3000);
    assert!(
        w.running(),
        "writer stopped before the cut:\n{}",
        w.output()
    );
    power_cut(a, &mut disk);
    if !w.wait_exit(Duration::from_secs(20)) {
        w.kill();
    }
    let log = w.log();
    let last = last_acked(&log);
    let lost = behind(&stamps_on(&base), &last, true, "alpha's disk after the cut");
    assert!(
        !lost.is_empty(),
        "alpha's disk kept all {} acknowledged writes through the power cut: nothing exercised",
        log.acked.len()
    );

    println!(
        "alpha's disk lost {} of {} blocks written",
        lost.len(),
        last.len()
    );
    // Failover: beta holds every acknowledged write.
    b.wait_not_connected(Duration::from_secs(20));
    b.ctl_ok(&["primary", "--force"]);
    let held = behind(
        &Stamp::parse_all(
            &b.backing_data((BLOCKS as usize * STAMP_BLOCK) as u64),
            BLOCKS as usize,
        ),
        &last,
        true,
        "beta after the failover",
    );
    assert!(
        held.is_empty(),
        "{} acknowledged writes missing on the promoted beta, first blocks {:?}",
        held.len(),
        &held[..held.len().min(8)]
    );
    // New writes on beta while alpha is down: 512 blocks, stamped again.
    let mut w2 = writer(&py, &c, "w2", &b.uri(), 0);
    wait_acked(&mut w2, 512);
    w2.request_stop();
    assert!(w2.wait_exit(Duration::from_secs(30)), "{}", w2.output());

    // alpha comes back with its disk as the cut left it, and is resynced from beta.
    disk = Some(volatile_disk(&c, a, &base, 2));
    a.up();
    wait_synced(&c, SYNC_TIMEOUT, "alpha back after its power loss");
    c.assert_replicas_identical(size, "after alpha's power loss, failover and return");
    println!("--- alpha's log ---\n{}", a.log_tail(12));
    // The daemons hold the disk's file open: they stop first (as on a failed assertion).
    drop(stop);
    drop(disk);
}

/// Under A a write is acknowledged once it is on the primary's disk and in its journal; a
/// client flush makes both durable there, so a flushed write must reach the peer even when
/// the primary loses power before sending it. Here the link is cut while the client goes on
/// writing and flushing, then the primary loses power: its disk keeps only what the flushes
/// covered, and its journal (or the bitmap) on that disk must still name every flushed write
/// beta lacks. The primary comes back, reconnects, is made primary again (no failover), and
/// both replicas end with every flushed write.
#[test]
fn a_primary_that_loses_power_keeps_every_flushed_write_and_brings_its_peer_up_to_date() {
    flushed_writes_survive_a_primary_power_loss("power-loss-flushed", false);
}

/// The same with external metadata, on a volatile device of its own: the journal, bitmap
/// and activity log are then not in the data's file, and a flush must make both devices
/// durable (neither device's flush covers the other's writes).
#[test]
fn a_primary_with_external_metadata_loses_power_and_keeps_every_flushed_write() {
    flushed_writes_survive_a_primary_power_loss("power-loss-external", true);
}

fn flushed_writes_survive_a_primary_power_loss(test: &str, external: bool) {
    let Some(py) = tools() else { return };
    let c = cluster(test, "A", |b| {
        let b = b.beta_via_proxy();
        if external {
            b.external_meta()
        } else {
            b
        }
    });
    let (a, b) = (c.alpha(), c.beta());
    // Metadata first, on the plain files (create-md sizes an external metadata file).
    a.create_md();
    b.create_md();
    let (base, disk) = volatile_backing(&c, a);
    let mut disk = Some(disk);
    let meta_link = c.dir().join("alpha.meta");
    let meta_base = c.dir().join("alpha-meta-base.img");
    let mut meta = external.then(|| {
        std::fs::rename(&meta_link, &meta_base).expect("move the metadata file");
        volatile_file(&c, &meta_link, "alpha-meta1", &meta_base)
    });
    let stop = StopDaemons(&c);
    c.up_pair();
    c.wait_in_sync(SYNC_TIMEOUT);
    let size = a.size();

    // A flush after every 64 writes; the link goes down in the middle of the run.
    let mut w = writer(&py, &c, "w", &a.uri(), 64);
    wait_acked(&mut w, 1500);
    assert!(
        c.proxy().cut_and_refuse() >= 1,
        "no live link connection to cut"
    );
    let at_cut = w.log().acked.len();
    wait_acked(&mut w, at_cut + 1500);
    power_cut(a, &mut disk);
    if let Some(m) = meta.take() {
        m.close();
    }
    if !w.wait_exit(Duration::from_secs(20)) {
        w.kill();
    }
    let log = w.log();
    assert!(
        log.flushed as usize > at_cut,
        "no flush acknowledged after the link was cut (last flush covers {}, {at_cut} acknowledged at the cut):\n{}",
        log.flushed,
        w.output()
    );
    let want = last_flushed(&log);
    let kept = behind(&stamps_on(&base), &want, true, "alpha's disk after the cut");
    assert!(
        kept.is_empty(),
        "alpha's disk lost {} flushed writes in the power cut, first blocks {:?}",
        kept.len(),
        &kept[..kept.len().min(8)]
    );
    let unflushed = behind(&stamps_on(&base), &last_acked(&log), true, "alpha's disk");
    println!(
        "{} writes acknowledged, the last flush covers {}; alpha's disk lost {} blocks' unflushed writes",
        log.acked.len(),
        log.flushed,
        unflushed.len()
    );

    // alpha comes back on what its devices kept, reconnects and takes the primary role again.
    disk = Some(volatile_disk(&c, a, &base, 2));
    if external {
        meta = Some(volatile_file(&c, &meta_link, "alpha-meta2", &meta_base));
    }
    c.proxy().resume();
    a.up();
    a.wait_connected(CONNECT_TIMEOUT);
    a.ctl_ok(&["primary"]);
    wait_synced(&c, SYNC_TIMEOUT, "alpha primary again after its power loss");
    c.assert_replicas_identical(size, "after alpha's power loss and return as primary");
    let on_beta = behind(
        &Stamp::parse_all(
            &b.backing_data((BLOCKS as usize * STAMP_BLOCK) as u64),
            BLOCKS as usize,
        ),
        &want,
        true,
        "beta after the resync",
    );
    assert!(
        on_beta.is_empty(),
        "{} flushed writes missing on beta, first blocks {:?}",
        on_beta.len(),
        &on_beta[..on_beta.len().min(8)]
    );
    println!("--- alpha's log ---\n{}", a.log_tail(12));
    drop(stop);
    drop((disk, meta));
}

/// Both nodes lose power at once under C while a client writes and flushes (a site outage):
/// the primary's memory of what the secondary had not synced is gone with it, so what brings
/// the pair together is on disk: the crashed primary's activity log (an extent goes cold only
/// once the peer made its writes durable). As the runbook says: `up` on both, wait for
/// `connected` and `up-to-date`, `primary` on alpha. The replicas end identical, with every
/// flushed write.
#[test]
fn both_nodes_lose_power_and_come_back_identical_with_every_flushed_write() {
    let Some(py) = tools() else { return };
    let c = cluster("power-loss-both", "C", |b| b);
    let (a, b) = (c.alpha(), c.beta());
    let (base_a, disk_a) = volatile_backing(&c, a);
    let (base_b, disk_b) = volatile_backing(&c, b);
    let (mut disk_a, mut disk_b) = (Some(disk_a), Some(disk_b));
    let stop = StopDaemons(&c);
    let size = start(&c);

    // Cut where some acknowledged writes are not flushed yet, so the disks have something to
    // lose (the point of the test): the writer flushes every 256 writes up to write 3072 and
    // then only writes; the cut comes 32 or more writes past that last flush. (Waiting for a
    // gap between flushes raced the next flush on a loaded machine.)
    const LAST_FLUSH: u64 = 12 * 256;
    let mut w = writer_with(&py, &c, "w", &a.uri(), |o| {
        o.flush_every = 256;
        o.flush_until = LAST_FLUSH;
    });
    wait_acked(&mut w, LAST_FLUSH as usize + 32);
    assert_eq!(w.log().flushed, LAST_FLUSH, "the last flush covered");
    // Both daemons at once, alpha first (with beta gone first, alpha would acknowledge
    // flushes without it, which a cut of both never lets a client see) and beta right after,
    // before it notices the link drop and syncs what it applied; then both disks.
    let pids: Vec<u32> = a.pids().into_iter().chain(b.pids()).collect();
    assert_eq!(pids.len(), 2, "daemon pids: {pids:?}");
    for &p in &pids {
        kill9(p);
    }
    for &p in &pids {
        assert!(
            wait_pid_gone(p, Duration::from_secs(10)),
            "pid {p} survived SIGKILL"
        );
    }
    disk_a.take().expect("alpha's disk").close();
    disk_b.take().expect("beta's disk").close();
    if !w.wait_exit(Duration::from_secs(20)) {
        w.kill();
    }
    let log = w.log();
    assert!(log.flushed > 0, "no flush acknowledged:\n{}", w.output());
    let want = last_flushed(&log);
    let last = last_acked(&log);
    let mut unflushed_lost = 0;
    for (node, base) in [("alpha", &base_a), ("beta", &base_b)] {
        let stamps = stamps_on(base);
        let missing = behind(&stamps, &want, true, node);
        assert!(
            missing.is_empty(),
            "{node}'s disk lost {} flushed writes in the power cut, first blocks {:?}",
            missing.len(),
            &missing[..missing.len().min(8)]
        );
        let lost = behind(&stamps, &last, true, node).len();
        unflushed_lost += lost;
        println!(
            "{node}'s disk lost {lost} blocks' unflushed writes ({} acknowledged, flushes through {})",
            log.acked.len(),
            log.flushed
        );
    }
    assert!(
        unflushed_lost > 0,
        "neither disk lost an unflushed write ({} acknowledged, flushes through {}): nothing here was exercised",
        log.acked.len(),
        log.flushed
    );

    // The runbook: up on both, wait for connected and up-to-date, primary on alpha.
    disk_a = Some(volatile_disk(&c, a, &base_a, 2));
    disk_b = Some(volatile_disk(&c, b, &base_b, 2));
    a.up();
    b.up();
    wait_synced(&c, SYNC_TIMEOUT, "both back after the power loss");
    a.ctl_ok(&["primary"]);
    wait_synced(&c, SYNC_TIMEOUT, "alpha primary again");
    c.assert_replicas_identical(size, "after both nodes lost power");
    let stamps = Stamp::parse_all(
        &a.backing_data((BLOCKS as usize * STAMP_BLOCK) as u64),
        BLOCKS as usize,
    );
    let missing = behind(&stamps, &want, true, "alpha after the resync");
    assert!(
        missing.is_empty(),
        "{} flushed writes missing after the resync, first blocks {:?}",
        missing.len(),
        &missing[..missing.len().min(8)]
    );
    println!("--- alpha's log ---\n{}", a.log_tail(10));
    drop(stop);
    drop((disk_a, disk_b));
}
