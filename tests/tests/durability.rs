//! When the secondary's copy becomes durable, and what the primary concludes from it.
//!
//! The secondary makes applied writes durable at the flushes in the stream (the client's own
//! flushes, as DRBD's barriers), at a slow periodic checkpoint, and at the checkpoint records
//! the primary adds for its own bookkeeping: after a journal catch-up (so the dirty bitmap can
//! be cleared while writes go on) and when an activity-log extent goes cold (after a crash of
//! the primary only hot extents are resynced, so a cold extent's writes must be on the peer's
//! disk). Those are not barriers: the stream goes on being applied while the peer syncs. Real daemons, real TCP (the harness's proxy cuts the link), real NBD clients
//! (python3 + libnbd, fio's nbd engine).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blockrep_e2e::blocks::*;
use blockrep_e2e::nbd_const::{CMD_FLAG_FUA, CMD_FLUSH, CMD_WRITE};
use blockrep_e2e::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const EXTENT: u64 = 4 * MIB;

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} is not a number in {v}"))
}

/// Writes 1 MiB at the start of each of `extents` 4 MiB extents through `uri` with libnbd,
/// never flushing; touches `done` once every write was acknowledged, then keeps the connection
/// open for `hold` seconds (so nothing at disconnect can flush for it).
const UNFLUSHED_WRITER: &str = r#"
import nbd, sys, time
uri, extents, done, hold = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
h = nbd.NBD()
h.connect_uri(uri)
buf = bytearray(1 << 20)
for e in range(extents):
    buf[0:8] = (e + 1).to_bytes(8, "little")
    h.pwrite(bytes(buf), e * (4 << 20))
open(done, "w").close()
time.sleep(hold)
h.shutdown()
"#;

fn spawn_unflushed_writer(py: &Path, dir: &Path, uri: &str, extents: u64, tag: &str) -> ChildGuard {
    let script = dir.join("unflushed_writer.py");
    std::fs::write(&script, UNFLUSHED_WRITER).expect("write the writer script");
    let done = dir.join(format!("written-{tag}"));
    let _ = std::fs::remove_file(&done);
    let log = dir.join(format!("writer-{tag}.log"));
    let mut child = ChildGuard::spawn(
        Command::new(py)
            .arg(&script)
            .arg(uri)
            .arg(extents.to_string())
            .arg(&done)
            .arg("8"),
        Some(&log),
    );
    let ok = wait_for(Duration::from_secs(30), || {
        done.exists() || !child.running()
    });
    assert!(
        ok && done.exists(),
        "the writer did not finish its writes:\n{}",
        child.log()
    );
    child
}

#[test]
fn cold_activity_log_extents_reach_the_peers_disk_without_client_flushes() {
    let Some(py) = python_with_nbd() else {
        skip_or_fail("no python3 with the libnbd bindings (python3-libnbd)");
        return;
    };
    // 256 MiB of backing (64 of them journal), an activity log of 7 extents (the smallest
    // allowed).
    let c = Cluster::builder("dur-al-cold")
        .nodes(2)
        .backing_size(256 * MIB)
        .protocol("C")
        .resource_line("al-extents = 7")
        .build();
    c.start_pair();
    c.wait_in_sync(SYNC_TIMEOUT);
    let a = c.alpha();
    let connected_at = Instant::now();
    let size = a.size();
    assert!(
        size >= 32 * EXTENT,
        "export of {size} bytes has fewer than 32 extents"
    );

    // Writes that stay in 5 extents make none cold: the peer applies them (protocol C) but
    // nothing asks it to make them durable, and its own checkpoint is far apart.
    let d0 = a.repl_u64("seq_durable");
    let mut hot = spawn_unflushed_writer(&py, c.dir().path(), &a.uri(), 5, "hot");
    let w1 = a.repl_u64("seq_written");
    std::thread::sleep(Duration::from_secs(3));
    let d1 = a.repl_u64("seq_durable");
    println!("5 hot extents: written {w1}, durable {d0} -> {d1}");
    if connected_at.elapsed() < Duration::from_secs(20) {
        assert!(
            d1 < w1,
            "the peer made writes durable with no flush and no extent gone cold \
             (written {w1}, durable {d1}): is it syncing every second again?"
        );
    } else {
        println!("(slow machine: the periodic checkpoint may have run; not checked)");
    }
    hot.kill();

    // 32 extents through a log of 7: extents go cold one after the other, and each time the
    // primary puts a flush in the stream. Without any client flush, the peer's durable mark
    // must follow within seconds, up to the writes still in hot extents.
    let mut cold = spawn_unflushed_writer(&py, c.dir().path(), &a.uri(), 32, "cold");
    let w2 = a.repl_u64("seq_written");
    let t = Instant::now();
    let r = a.wait_repl(
        Duration::from_secs(10),
        "the peer durable through the cold extents",
        |r| u(r, "seq_durable") + 8 >= w2,
    );
    println!(
        "32 extents, al-extents 7: written {w2}, durable {} after {:?}",
        u(&r, "seq_durable"),
        t.elapsed()
    );
    assert!(
        cold.running(),
        "the writer exited (and may have flushed) too early"
    );
    cold.kill();
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_replicas_identical(size, "after the unflushed writes");
}

#[test]
fn journal_catch_up_clears_the_bitmap_while_writes_go_on() {
    let Some(py) = python_with_nbd() else {
        skip_or_fail("no python3 with the libnbd bindings (python3-libnbd)");
        return;
    };
    if !have_tools(&["fio"]) {
        return;
    }
    let c = Cluster::builder("dur-catchup")
        .nodes(2)
        .backing_size(256 * MIB)
        .protocol("A")
        .beta_via_proxy()
        .build();
    c.start_pair();
    c.wait_in_sync(SYNC_TIMEOUT);
    let a = c.alpha();
    let size = a.size();

    // The peer goes away; writes while it is away land in the journal and the bitmap.
    assert!(c.proxy().cut_and_refuse() >= 1, "no live link to cut");
    a.wait_not_connected(Duration::from_secs(10));
    let blocks: Vec<u64> = (0..200).map(|i| i * 97 % (size / 4096)).collect();
    write_blocks(&py, c.dir().path(), &a.uri(), 1, &blocks);
    let oos = a.repl_u64("out_of_sync");
    assert!(
        oos > 0,
        "writes while disconnected left no out-of-sync bytes"
    );

    // A writer that never pauses, then the link back.
    let fio_log = c.dir().path().join("fio.log");
    let mut fio = ChildGuard::spawn(
        Command::new("fio")
            .arg("--name=steady")
            // One process (the job a thread of it), so that killing it stops the writes.
            .arg("--thread")
            .arg("--ioengine=nbd")
            .arg(format!("--uri={}", a.uri()))
            .arg("--rw=randwrite")
            .arg("--bs=4k")
            .arg("--iodepth=4")
            .arg("--time_based")
            .arg("--runtime=120")
            .arg(format!("--size={}", size / 2))
            .arg("--offset=0"),
        Some(&fio_log),
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(fio.running(), "fio exited early:\n{}", fio.log());
    c.proxy().resume();
    let t = Instant::now();
    // The reconnect (up to 2 s of redial), the catch-up and the checkpoint that clears the
    // bitmap (an fdatasync of what fio dirtied): seconds on a busy disk. fio writes for
    // longer than this may take, and is stopped once it is seen.
    let r = a.wait_repl(
        Duration::from_secs(60),
        "connected with nothing out of sync while fio writes",
        |r| r["connection"] == "connected" && u(r, "out_of_sync") == 0,
    );
    println!(
        "{oos} bytes out of sync cleared {:?} after the link came back, written {}, durable {}",
        t.elapsed(),
        u(&r, "seq_written"),
        u(&r, "seq_durable")
    );
    assert!(
        fio.running(),
        "fio had finished before the bitmap cleared: this did not test writes going on"
    );
    fio.kill();
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_replicas_identical(size, "after the catch-up under writes");
}

/// Pages of `path` in `[offset, offset + len)` that are dirty in the page cache
/// (`cachestat(2)`, Linux 6.5). `None` where the kernel lacks it.
fn dirty_pages(path: &Path, offset: u64, len: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    const SYS_CACHESTAT: libc::c_long = 451;
    let f = std::fs::File::open(path).expect("open the backing file");
    let range = Range { off: offset, len };
    let mut st = Stat::default();
    // SAFETY: cachestat reads `range` and writes `st`, both live locals of the declared layout.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            f.as_raw_fd(),
            &range as *const Range,
            &mut st as *mut Stat,
            0u32,
        )
    };
    (r == 0).then_some(st.nr_dirty + st.nr_writeback)
}

/// With the metadata on its own file, the activity log's fdatasync does not cover the backing
/// device: an extent that goes cold must have its data synced first, or a crash of the primary
/// could leave a cold extent whose last writes are on neither disk as the log claims.
#[test]
#[cfg(target_arch = "x86_64")]
fn cold_extents_data_is_synced_before_the_log_drops_them_with_external_metadata() {
    let Some(py) = python_with_nbd() else {
        skip_or_fail("no python3 with the libnbd bindings (python3-libnbd)");
        return;
    };
    let c = Cluster::builder("dur-al-extmeta")
        .nodes(2)
        .backing_size(256 * MIB)
        .protocol("C")
        .external_meta()
        .resource_line("al-extents = 7")
        .build();
    c.start_pair();
    c.wait_in_sync(SYNC_TIMEOUT);
    let a = c.alpha();
    // The peer away: every extent that goes cold is then covered by the bitmap alone.
    c.beta().down();
    a.wait_repl(CONNECT_TIMEOUT, "the peer gone", |r| {
        r["connection"] != "connected"
    });
    if dirty_pages(a.backing_path(), 0, EXTENT).is_none() {
        println!("SKIP: this kernel has no cachestat(2) to see dirty pages with");
        return;
    }
    let mut w = spawn_unflushed_writer(&py, c.dir().path(), &a.uri(), 32, "extmeta");
    // Extents 0..25 went cold on the way (a log of 7); extent 31 was written after the last
    // eviction's sync and is still hot.
    let cold = dirty_pages(a.backing_path(), 0, 16 * EXTENT).unwrap_or(u64::MAX);
    let hot = dirty_pages(a.backing_path(), 31 * EXTENT, EXTENT).unwrap_or(0);
    println!(
        "dirty or under writeback: {cold} pages in cold extents 0..16, {hot} in hot extent 31"
    );
    assert!(
        w.running(),
        "the writer exited (and may have flushed) too early"
    );
    w.kill();
    if hot == 0 {
        println!("(the kernel wrote back the hot extent on its own: cold extents not checked)");
        return;
    }
    assert_eq!(
        cold, 0,
        "{cold} pages of extents the activity log dropped are not on disk yet"
    );
}

/// The primary's own checkpoints are not barriers on the peer. Here the activity log's: an
/// extent written once, then left idle while the client writes elsewhere, asks for the peer's
/// durable mark at the next cooling round. beta's disk then takes as long to sync as we like
/// (nbdkit's pause filter under a loop device, whose page cache takes the writes at once), and
/// the stream must go on being applied meanwhile: under C every client write waits for its
/// apply on beta, so the writes keep completing, and the checkpoint is acknowledged once the
/// disk goes on. Before protocol 17 the checkpoint was a flush record, a barrier on the
/// secondary: the client's writes waited out beta's whole sync (0.7 s stalls every few
/// seconds in the benchmark).
#[test]
fn the_primarys_own_checkpoint_does_not_hold_up_the_stream_while_the_peer_syncs() {
    if !have_tools(&["nbdkit", "nbdfuse", "fusermount3", "losetup"]) {
        return;
    }
    const SIZE: u64 = 32 * MIB;
    let c = Cluster::builder("checkpoint-no-barrier")
        .nodes(2)
        .backing_size(SIZE)
        .protocol("C")
        .journal_size("8M")
        .external_meta()
        // beta's sync hangs for seconds on purpose: not a peer to give up on.
        .resource_line("ko-count = 0")
        .build();
    // Torn down in this order on any exit: the daemons, the loop device, nbdkit and FUSE.
    let (disk, ctl) = NbdkitFile::paused_memory(c.dir().path(), "beta-disk", SIZE);
    let lo = LoopDev::attach(&disk.file());
    let _stop = StopDaemons(&c);
    let (a, b) = (c.alpha(), c.beta());
    b.back_with(Path::new(lo.dev()));
    c.start_pair();
    c.wait_in_sync(SYNC_TIMEOUT);

    // Extent 0 written once, then idle: the next cooling round but one asks for beta's
    // durable mark through that write.
    let first = random_bytes(4096);
    let mut r = a.raw_open();
    r.write_at(0, &first, 0).expect("write to extent 0");
    r.disconnect();
    let flushes = u(&b.status_json()["io"], "flushes");
    let issued = u(&a.repl(), "seq_written");
    pause_control(&ctl, b'p');
    let resume = ResumeOnDrop(&ctl);

    // Nothing else is written yet, so a record alpha issues now is its checkpoint; and beta's
    // sync for it hangs on the paused disk (the loop device writes back through the FUSE
    // file), a flush in flight there.
    let (mut io, mut written) = (Value::Null, issued);
    let syncing = wait_for(Duration::from_secs(20), || {
        io = b.status_json()["io"].clone();
        written = u(&a.repl(), "seq_written");
        written > issued
            && io["flushes"].as_u64() > Some(flushes)
            && io["inflight"].as_u64() >= Some(1)
    });
    assert!(
        syncing,
        "no checkpoint issued for the idle extent (alpha wrote {written}, after {issued}), or no sync of beta's disk hanging for it: {io}"
    );
    let durable_at = u(&a.repl(), "seq_durable");

    // Now the client: 50 writes of 4 KiB in extent 2 (protocol C) while the sync hangs (for
    // good, until the resume below: a write that waited for it gets no reply in 10 s).
    let mut r = a.raw_open();
    let (mut writes, mut slowest) = (0u64, Duration::ZERO);
    while writes < 50 {
        let t = Instant::now();
        let off = 2 * EXTENT + (writes % 256) * 4096;
        let cookie = r
            .send_request(CMD_WRITE, 0, off, 4096, &random_bytes(4096))
            .expect("send a write");
        match r.read_simple_reply() {
            Ok((0, c)) => assert_eq!(c, cookie, "reply cookie"),
            Ok((e, _)) => panic!("write {writes} failed: NBD error {e}"),
            Err(e) => panic!(
                "write {writes} got no reply in 10 s while beta's checkpoint synced ({e}): the stream waited for the sync"
            ),
        }
        slowest = slowest.max(t.elapsed());
        writes += 1;
    }
    let durable_during = u(&a.repl(), "seq_durable");
    let io_during = b.status_json()["io"].clone();
    drop(resume);
    r.disconnect();
    println!("{writes} client writes while beta's checkpoint synced, the slowest {slowest:?}");
    assert!(
        io_during["inflight"].as_u64() >= Some(1),
        "beta's sync no longer hung when the writes were done, so they proved nothing: {io_during}"
    );
    assert_eq!(
        durable_during, durable_at,
        "beta reported a durable mark while its disk could not sync"
    );
    let written_at = u(&a.repl(), "seq_written");

    // Once the disk goes on, the checkpoint is acknowledged, and the replicas agree.
    let mut durable = 0;
    let acked = wait_for(Duration::from_secs(30), || {
        durable = u(&a.repl(), "seq_durable");
        durable >= written_at
    });
    assert!(
        acked,
        "beta's durable mark stayed at {durable}, below {written_at}, after its disk went on"
    );
    c.wait_in_sync(SYNC_TIMEOUT);
    assert_same_bytes(&b.backing_data(SIZE)[..4096], &first, "beta's extent 0");
    assert_same_bytes(&b.backing_data(SIZE), &a.backing_data(SIZE), "beta's copy");
}

/// Resumes a disk behind nbdkit's pause filter when dropped (a failed assertion while it
/// is paused would otherwise leave the daemons' teardown waiting on it).
struct ResumeOnDrop<'a>(&'a Path);

impl Drop for ResumeOnDrop<'_> {
    fn drop(&mut self) {
        use std::io::{Read, Write};
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(self.0) {
            s.set_read_timeout(Some(Duration::from_secs(10))).ok();
            let _ = s.write_all(b"r");
            let _ = s.read(&mut [0u8; 1]);
        }
    }
}

/// A client's flush costs the secondary one sync of its disk: once everything before the
/// flush record is synced, the record (it carries no data) counts as applied and the mark
/// through it is committed with it. Before, a second round of sync and commit covered the
/// record itself: two syncs of beta's disk per flush, on a database's commit path. Under C
/// each flush still returns only once beta acknowledged it synced, and beta's durable mark
/// (its applied mark committed) follows.
#[test]
fn a_client_flush_costs_the_secondary_one_sync() {
    let c = Cluster::synced_pair("flush-one-sync", 16 * MIB, |b| b.protocol("C"));
    let (a, b) = (c.alpha(), c.beta());
    const FLUSHES: u64 = 20;
    let syncs_before = u(&b.status_json()["io"], "flushes");
    let mut r = a.raw_open();
    for i in 0..FLUSHES {
        let issued = u(&a.repl(), "seq_written");
        r.write_at(i * 4096, &random_bytes(4096), 0).expect("write");
        r.command(CMD_FLUSH, 0, 0, 0).expect("flush");
        // The write and the flush record, at least: synced on beta when the flush returns.
        let synced = u(&a.repl(), "seq_synced");
        assert!(
            synced >= issued + 2,
            "flush {i} returned with beta synced through {synced}, before its record (after {issued} + 2)"
        );
    }
    let issued = u(&a.repl(), "seq_written");
    assert!(
        wait_for(SYNC_TIMEOUT, || u(&a.repl(), "seq_durable") >= issued),
        "beta's durable mark never followed its synced mark to {issued}"
    );
    r.disconnect();
    let syncs = u(&b.status_json()["io"], "flushes") - syncs_before;
    // A checkpoint of beta's own, or one for an activity-log extent, may add one or two.
    assert!(
        (FLUSHES..=FLUSHES + 2).contains(&syncs),
        "{FLUSHES} client flushes cost beta {syncs} syncs of its disk"
    );
    c.wait_in_sync(SYNC_TIMEOUT);
    assert_same_bytes(
        &b.backing_data(FLUSHES * 4096),
        &a.backing_data(FLUSHES * 4096),
        "beta's copy",
    );
}

/// A FUA write is a barrier on the secondary, as a flush is. Under protocol A the client's
/// FUA write is answered before beta has it, and the client may then send a write that
/// depends on it (a journal commit block, then its checkpoint); beta must not put that later
/// write on its disk before the FUA write is synced there, or a crash of beta (with the
/// primary lost) leaves the later write without the one it depended on. Seen on beta's disk
/// itself: nbdkit's log filter records the order of the writes and flushes beta's daemon
/// sends it.
#[test]
fn a_fua_write_is_synced_on_the_secondary_before_any_later_write_reaches_its_disk() {
    if !have_tools(&["nbdkit", "nbdfuse", "fusermount3"]) {
        return;
    }
    let (c, _disk, io_log) = pair_with_a_logged_disk("fua-barrier", "beta", 32 * MIB, |b| {
        b.protocol("A").external_meta()
    });
    let _stop = StopDaemons(&c);
    let a = c.alpha();

    let (first, later) = (8 * MIB, 16 * MIB);
    let mark = std::fs::read_to_string(&io_log).unwrap_or_default().len();
    for round in 0..5u64 {
        let mut r = a.raw_open();
        // Both sent at once, so that the later write reaches beta right behind the FUA one
        // (a client that waited for the FUA write's answer would send it later, but under A
        // that answer may come before beta has synced, which here takes no time at all).
        let (f, l) = (first + round * 4096, later + round * 4096);
        r.send_request(CMD_WRITE, CMD_FLAG_FUA, f, 4096, &random_bytes(4096))
            .expect("send the FUA write");
        r.send_request(CMD_WRITE, 0, l, 4096, &random_bytes(4096))
            .expect("send the later write");
        for _ in 0..2 {
            let (err, _) = r.read_simple_reply().expect("a reply");
            assert_eq!(err, 0, "write failed");
        }
        r.disconnect();
    }
    c.wait_in_sync(SYNC_TIMEOUT);
    let text = std::fs::read_to_string(&io_log).expect("beta's I/O log");
    let lines: Vec<&str> = text[mark..].lines().collect();
    let write_at = |off: u64| {
        let at = format!(" offset={off:#x} count=0x1000 ");
        lines
            .iter()
            .position(|l| l.contains(" Write id=") && l.contains(&at))
            .unwrap_or_else(|| panic!("no write at {off:#x} on beta's disk:\n{}", lines.join("\n")))
    };
    // Two requests in flight together have no order in NBD: the primary may number the
    // second one first (one waiting for its activity-log update, say), and beta then applies
    // it first, rightly. Such a round checks nothing; every other must show the barrier.
    let mut checked = 0;
    for round in 0..5u64 {
        let (f, l) = (
            write_at(first + round * 4096),
            write_at(later + round * 4096),
        );
        if l < f {
            continue;
        }
        checked += 1;
        // The FUA write's completion, then a flush begun after it, then the later write.
        let request = request_of(lines[f]);
        let done = lines[f..]
            .iter()
            .position(|x| x.contains("...Write id=") && request_of(x) == request)
            .map_or(l, |i| f + i);
        assert!(
            done < l && lines[done..l].iter().any(|x| x.contains(" Flush id=")),
            "round {round}: beta wrote the write after a FUA write before syncing the FUA write:\n{}",
            lines[f..=l].join("\n")
        );
    }
    assert!(
        checked > 0,
        "in every round the later write was applied first"
    );
}

/// A pair (8 MiB journal, `f` adding to its builder) whose node `node` has its disk in
/// memory behind nbdkit's log filter, started (alpha primary) and in sync: the cluster, the
/// disk (to drop after the daemons: the caller's `StopDaemons` comes after it) and the log of
/// the requests the disk received, in order.
fn pair_with_a_logged_disk(
    test: &str,
    node: &str,
    size: u64,
    f: impl FnOnce(ClusterBuilder) -> ClusterBuilder,
) -> (Cluster, NbdkitFile, std::path::PathBuf) {
    let io_log = std::cell::OnceCell::new();
    let (c, disk, _) = pair_with_an_nbdkit_disk(test, node, size, false, f, |dir| {
        let log = io_log.get_or_init(|| dir.join(format!("{node}-io.log")));
        vec![
            "--filter=log".into(),
            "memory".into(),
            format!("size={size}"),
            format!("logfile={}", log.display()),
        ]
    });
    let io_log = io_log.into_inner().expect("the disk's arguments were made");
    (c, disk, io_log)
}

/// A pair (8 MiB journal, `f` adding to its builder) whose node `node` has its disk behind
/// nbdkit, run with the arguments `args` makes (given the test's directory), and with
/// `via_loop` a loop device over it (a page cache, written back later, where the FUSE file
/// takes every write at once), started (alpha primary) and in sync: the cluster, the disk
/// and the loop device (to drop after the daemons, in the reverse order: the caller's
/// `StopDaemons` comes after them).
fn pair_with_an_nbdkit_disk(
    test: &str,
    node: &str,
    size: u64,
    via_loop: bool,
    f: impl FnOnce(ClusterBuilder) -> ClusterBuilder,
    args: impl FnOnce(&Path) -> Vec<String>,
) -> (Cluster, NbdkitFile, Option<LoopDev>) {
    let c = f(Cluster::builder(test)
        .nodes(2)
        .backing_size(size)
        .journal_size("8M"))
    .build();
    let disk = NbdkitFile::start(
        c.dir().path(),
        &format!("{node}-disk"),
        &args(c.dir().path()),
        &[],
    );
    let lo = via_loop.then(|| LoopDev::attach(&disk.file()));
    match &lo {
        Some(lo) => c.node(node).back_with(Path::new(lo.dev())),
        None => c.node(node).back_with(&disk.file()),
    }
    {
        // Stopped here if the start fails; the caller's guard stops them after that.
        let stop = StopDaemons(&c);
        c.start_pair();
        c.wait_in_sync(SYNC_TIMEOUT);
        std::mem::forget(stop);
    }
    (c, disk, lo)
}

/// The `connection=` and `id=` tokens of an nbdkit log line: a request and its return.
fn request_of(line: &str) -> Vec<&str> {
    line.split_whitespace()
        .filter(|w| w.starts_with("connection=") || w.starts_with("id="))
        .collect()
}

/// With internal metadata, an extent that goes cold has its data synced before the
/// activity-log write that drops it reaches the disk. The log write is synced too, but a sync
/// after both writes makes them durable together, not in order: a disk with a volatile cache
/// may keep the new log and lose the extent's last writes, and after a crash of the primary
/// neither its log nor its bitmap names that extent (the crashed-primary resync skips it, and
/// the nodes differ there silently). Alpha's disk sits behind nbdkit's log filter: the
/// order of the writes and flushes it receives. Extent 0 gets one unflushed write while
/// extent 1, hot already, stays busy (so no log write adds an extent, and the node never
/// idles into a commit of its own); the next log write is then the one that lets extent 0
/// go cold, and a flush must lie between the two.
#[test]
fn a_cold_extents_data_is_synced_before_the_activity_log_that_drops_it() {
    if !have_tools(&["nbdkit", "nbdfuse", "fusermount3"]) {
        return;
    }
    let (c, _disk, io_log) =
        pair_with_a_logged_disk("al-order", "alpha", 64 * MIB, |b| b.protocol("C"));
    let _stop = StopDaemons(&c);
    let a = c.alpha();
    let md = a.ctl_ok(&["dump-md"]).stdout;
    let (al_off, al_len) = md
        .lines()
        .find_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                ["activity-log", "offset", off, "len", len, ..] => {
                    Some((off.parse::<u64>().ok()?, len.parse::<u64>().ok()?))
                }
                _ => None,
            }
        })
        .unwrap_or_else(|| panic!("no activity-log area in dump-md:\n{md}"));
    assert!(al_off >= 16 * MIB, "internal metadata at {al_off}");

    // The initial sync's end commits its metadata (with flushes) a moment later: the disk
    // must be quiet first, or that commit's flush would cover extent 0's write by chance.
    let quiet = Instant::now() + Duration::from_secs(30);
    let mut heard = std::fs::metadata(&io_log).map_or(0, |m| m.len());
    loop {
        std::thread::sleep(Duration::from_secs(2));
        let now = std::fs::metadata(&io_log).map_or(0, |m| m.len());
        if now == heard || Instant::now() > quiet {
            break;
        }
        heard = now;
    }
    let mut r = a.raw_open();
    let block = random_bytes(4096);
    let cold = 4096;
    r.write_at(EXTENT + 4096, &block, 0).expect("extent 1");
    let mark = std::fs::read_to_string(&io_log).unwrap_or_default().len();
    r.write_at(cold, &block, 0).expect("extent 0");
    // Everything after the write to extent 0, in the order alpha's disk saw it: each write
    // and flush as it came ('W', 'F') and as it returned ('w', 'f'), with its request
    // (connection and id) and a write's offset.
    struct Event {
        kind: char,
        request: Vec<String>,
        offset: Option<u64>,
        line: String,
    }
    let events = || {
        let text = std::fs::read_to_string(&io_log).expect("alpha's I/O log");
        text[mark..]
            .lines()
            .filter_map(|l| {
                let kind = [
                    ("...Write id=", 'w'),
                    ("...Flush id=", 'f'),
                    (" Write id=", 'W'),
                    (" Flush id=", 'F'),
                ]
                .iter()
                .find(|(m, _)| l.contains(m))?
                .1;
                let offset = l
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("offset=0x"))
                    .and_then(|o| u64::from_str_radix(o, 16).ok());
                Some(Event {
                    kind,
                    request: request_of(l).into_iter().map(str::to_string).collect(),
                    offset,
                    line: l.to_string(),
                })
            })
            .collect::<Vec<_>>()
    };
    // The return of the last write to extent 0, and the first activity-log write after it.
    let find = |ev: &[Event]| {
        let w = ev
            .iter()
            .rposition(|e| e.kind == 'W' && e.offset == Some(cold))?;
        let ret = (w..ev.len()).find(|&k| ev[k].kind == 'w' && ev[k].request == ev[w].request)?;
        let log = (ret..ev.len()).find(|&k| {
            ev[k].kind == 'W'
                && ev[k]
                    .offset
                    .is_some_and(|o| (al_off..al_off + al_len).contains(&o))
        })?;
        Some((ret, log))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0u64;
    let (ev, cold_ret, log_at) = loop {
        r.write_at(EXTENT + (i % 256) * 4096, &block, 0)
            .expect("extent 1");
        i += 1;
        if i % 64 == 0 {
            let ev = events();
            if let Some((ret, log)) = find(&ev) {
                break (ev, ret, log);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no activity-log write on alpha's disk after the write to extent 0 ({i} writes to \
             extent 1 in 60 s): extent 0 never went cold"
        );
    };
    r.disconnect();
    // The writes to extent 1 left out (thousands of them).
    let lines: Vec<&str> = ev[cold_ret..=log_at]
        .iter()
        .filter(|e| !e.offset.is_some_and(|o| (EXTENT..2 * EXTENT).contains(&o)))
        .filter(|e| e.kind != 'w')
        .map(|e| e.line.as_str())
        .collect();
    println!(
        "{} events between extent 0's write's return and the activity log that drops it, \
         {} of them other than extent 1's writes:\n{}",
        log_at - cold_ret,
        lines.len(),
        lines.join("\n")
    );
    // A flush that came after extent 0's write had returned, and returned itself before the
    // log write came.
    let flushed = (cold_ret..log_at).any(|f| {
        ev[f].kind == 'F'
            && (f..log_at).any(|k| ev[k].kind == 'f' && ev[k].request == ev[f].request)
    });
    assert!(
        flushed,
        "alpha wrote the activity log that lets extent 0 go cold without a flush between extent \
         0's write and it:\n{}",
        lines.join("\n")
    );
    c.wait_in_sync(SYNC_TIMEOUT);
}

/// A secondary's `down` syncs what it applied since its last checkpoint before its last
/// acknowledgement to the primary, and pings the primary meanwhile: on a slow disk that sync
/// can outlast the link's ping timeout (4 s), and the primary took the planned stop for a
/// lost peer (review finding: `ping timeout`, then fencing and the `peer-lost` handler, and
/// the `down` waited out its goodbye). Beta's disk (a loop device over nbdkit) delays every
/// write it receives by 25 ms; scattered 4 KiB writes (none next to another, so no two are
/// written back as one request) sit in its page cache when it goes down, and more arrive
/// while `down`'s first sync runs, for the last acknowledgement's sync.
#[test]
fn a_secondarys_slow_last_sync_at_down_is_no_lost_peer() {
    if !have_tools(&["nbdkit", "nbdfuse", "fusermount3"]) {
        return;
    }
    const SIZE: u64 = 32 * MIB;
    let (c, _disk, _lo) = pair_with_an_nbdkit_disk(
        "down-slow-sync",
        "beta",
        SIZE,
        true,
        // External metadata: with internal metadata, a commit of `down`'s (a sync of the same
        // device) writes the data back before the last acknowledgement is due.
        |b| b.protocol("A").external_meta(),
        |_| {
            vec![
                "--filter=delay".into(),
                "memory".into(),
                format!("size={SIZE}"),
                "wdelay=25ms".into(),
            ]
        },
    );
    let _stop = StopDaemons(&c);
    let (a, b) = (c.alpha(), c.beta());
    let mut r = a.raw_open();
    let data = random_bytes(4096);
    for i in 0..300u64 {
        r.write_at(MIB + i * 8192, &data, 0)
            .unwrap_or_else(|e| panic!("write {i}: error {e}"));
    }
    r.disconnect();
    a.wait_repl(Duration::from_secs(30), "beta applied every write", |r| {
        r["lag_writes"] == 0 && r["seq_applied"] == r["seq_written"]
    });
    // `down` syncs what beta applied so far first (pings still go out then), and the last
    // acknowledgement then syncs what it applied since: 200 more writes, sent while the first
    // sync runs.
    let started = Instant::now();
    let (out, sent) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut r = a.raw_open();
            std::thread::sleep(Duration::from_millis(300));
            for i in 0..200u64 {
                r.write_at(9 * MIB + i * 8192, &data, 0)
                    .unwrap_or_else(|e| panic!("write {i} during the down: error {e}"));
                std::thread::sleep(Duration::from_millis(5));
            }
            r.disconnect();
            started.elapsed()
        });
        let out = b.ctl_ok(&["down"]);
        (out, writer.join().expect("writer"))
    });
    let took = started.elapsed();
    println!("the writes during the down were sent by {sent:?}");
    println!("beta's down took {took:?}:\n{}", out.stdout);
    let alpha_log = std::fs::read_to_string(a.log_path()).expect("alpha's log");
    assert!(
        !alpha_log.contains("ping timeout"),
        "alpha took beta's down for a lost peer (beta's down took {took:?}):\n{}",
        a.log_tail(30)
    );
    assert!(
        alpha_log.contains("the secondary went down cleanly"),
        "alpha was not told of a clean stop (beta's down took {took:?}):\n{}",
        a.log_tail(30)
    );
    // Otherwise the disk was not slow enough for this test to show anything.
    assert!(
        took > Duration::from_secs(10),
        "beta's down took only {took:?}: its last sync was not slower than the ping timeout"
    );
}
