//! Outages and their repair (issue 4): bitmap resync after a link cut longer than the journal,
//! primary crash and failover/failback, split brain (manual and automatic resolution),
//! interrupted resync, resync under application writes, and `invalidate`.
//!
//! Real daemons, real TCP (a proxy in front of beta where the link is cut), real NBD clients
//! (python3 + libnbd for known block patterns, nbdcopy, nbdfuse + loop + ext4). Replicas are
//! compared through their backing files: the first `size` bytes are the exported data.
//!
//! Known patterns: `write_blocks` writes whole 4 KiB blocks whose content is a pure function of
//! (tag, block) (see [`pattern`]), so a test knows exactly what every block must hold and which
//! write ("tag") won.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockrep_e2e::blocks::*;
use blockrep_e2e::nbd_const::*;
use blockrep_e2e::watch::*;
use blockrep_e2e::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const BLK: u64 = 4096;

// ---------------------------------------------------------------------------------------------
// Helpers (local to this file on purpose: the shared harness is being changed elsewhere).

/// `n` distinct block numbers below `limit`, scattered (no two adjacent), in random order.
fn scattered_blocks(rng: &mut XorShift, n: usize, limit: u64) -> Vec<u64> {
    let mut set = BTreeSet::new();
    while set.len() < n {
        let b = rng.next_u64() % limit;
        if !set.contains(&b) && !set.contains(&(b + 1)) && (b == 0 || !set.contains(&(b - 1))) {
            set.insert(b);
        }
    }
    let mut v: Vec<u64> = set.into_iter().collect();
    shuffle(rng, &mut v);
    v
}

fn shuffle(rng: &mut XorShift, v: &mut [u64]) {
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

fn seed() -> u64 {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        ^ u64::from(std::process::id());
    println!("seed {s}");
    s
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} is not a number in {v}"))
}

fn log_text(n: &Node) -> String {
    std::fs::read(n.log_path())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Lines of the node's log that contain `needle` (case-insensitive).
fn log_lines(n: &Node, needle: &str) -> Vec<String> {
    let needle = needle.to_lowercase();
    log_text(n)
        .lines()
        .filter(|l| l.to_lowercase().contains(&needle))
        .map(str::to_string)
        .collect()
}

/// The number of lines in the node's log so far (a mark for [`log_since`]).
fn log_mark(n: &Node) -> usize {
    log_text(n).lines().count()
}

/// The node's log lines after `mark`.
fn log_since(n: &Node, mark: usize) -> Vec<String> {
    log_text(n).lines().skip(mark).map(str::to_string).collect()
}

/// Whether `target` took a resync from `source` since the marks (see [`log_mark`]), by the
/// daemons' own record: a resync over mostly zero regions (sent unpaced) can be over between
/// two polls of their state.
fn resynced(source: &Node, source_mark: usize, target: &Node, target_mark: usize) -> bool {
    let from = format!("resync from {}:", source.name());
    log_since(source, source_mark)
        .iter()
        .any(|l| l.contains("resync to the peer ("))
        && log_since(target, target_mark)
            .iter()
            .any(|l| l.contains(&from))
}

/// Sizes in bytes of the resyncs these log lines say the node started as the source
/// ("resync to the peer (WHY): N bytes").
fn resync_sizes(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .filter(|l| l.contains("resync to the peer ("))
        .filter_map(|l| {
            l.rsplit("): ")
                .next()?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Bytes of the activity-log extents a restarted crashed primary marked out of sync
/// ("crashed primary: N activity-log extents (M MiB) marked"), if the lines say so.
fn crashed_al_bytes(lines: &[String]) -> Option<u64> {
    lines.iter().find_map(|l| {
        let i = l.find("crashed primary: ")?;
        let n: u64 = l[i + 17..].split_whitespace().next()?.parse().ok()?;
        Some(n * 4 * MIB)
    })
}

/// A two-node cluster, `extra_toml` appended to the config (e.g. a `[handlers]` table), the
/// pair started (alpha primary) and the initial sync finished.
fn pair(test: &str, extra_toml: &str, f: impl FnOnce(ClusterBuilder) -> ClusterBuilder) -> Cluster {
    let c = f(Cluster::builder(test).nodes(2).backing_size(128 << 20)).build();
    if !extra_toml.is_empty() {
        c.write_config(&format!("{}\n{extra_toml}\n", c.config_text()));
    }
    c.start_pair();
    c.wait_in_sync(SYNC_TIMEOUT);
    c
}

/// Panics unless both replicas are identical, naming the states the pair went through (the
/// pair reports in sync at this point, so a difference is silent divergence).
fn assert_identical(c: &Cluster, size: u64, what: &str, seen: &Seen) {
    let (a, b) = (c.alpha(), c.beta());
    if let Some(off) = first_difference(a.backing_path(), b.backing_path(), size) {
        panic!(
            "{what}: the pair reports in sync (states seen {seen:?}) but the replicas differ at \
             offset {off} (block {})\nalpha: {}\nbeta: {}\n--- alpha log ---\n{}\n--- beta log \
             ---\n{}",
            off / BLK,
            a.status_json(),
            b.status_json(),
            a.log_tail(12),
            b.log_tail(12)
        );
    }
}

/// (current-gen, bitmap-gen) as `dump-md` prints them.
fn gens(n: &Node) -> (String, String) {
    let out = n.ctl_ok(&["dump-md"]);
    let field = |k: &str| {
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("dump-md has no {k}:\n{}", out.stdout))
    };
    (field("current-gen"), field("bitmap-gen"))
}

/// Waits (up to 10 s) until both nodes' metadata name the same current generation and no
/// bitmap generation (a finished sync).
fn wait_same_generation(c: &Cluster) {
    let mut last = (Default::default(), Default::default());
    let ok = wait_for(Duration::from_secs(10), || {
        last = (gens(c.alpha()), gens(c.beta()));
        last.0 .0 == last.1 .0 && last.0 .1 == "0000000000000000" && last.1 .1 == last.0 .1
    });
    assert!(
        ok,
        "after the sync the generations differ: alpha (current, bitmap) {:?}, beta {:?}",
        last.0, last.1
    );
}

/// The number of 4 KiB blocks that differ between two equally long buffers.
fn blocks_differing(x: &[u8], y: &[u8]) -> u64 {
    x.chunks(BLK as usize)
        .zip(y.chunks(BLK as usize))
        .filter(|(p, q)| p != q)
        .count() as u64
}

/// Waits until `n`'s replication status mentions a split brain (state or last error).
fn wait_split_brain_reported(n: &Node, timeout: Duration) -> Value {
    n.wait_repl(timeout, "reporting a split brain", |r| {
        r["connection"] == "split-brain"
            || r["last_error"]
                .as_str()
                .is_some_and(|e| e.to_lowercase().contains("split brain"))
    })
}

/// A handler script that appends "NODE ARGS... EVENT-ENV" to `DIR/handlers.log`; returns the
/// `[handlers]` table naming it for every event, and the log path.
fn handler_table(dir: &Path) -> (String, PathBuf) {
    let log = dir.join("handlers.log");
    let script = dir.join("handler.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$BLOCKREP_NODE $1 $2 $3 env=$BLOCKREP_RESOURCE/$BLOCKREP_EVENT/$BLOCKREP_PEER\" >> '{}'\n",
            log.display()
        ),
    )
    .expect("write handler.sh");
    run_ok(Command::new("chmod").arg("755").arg(&script), CMD_TIMEOUT);
    let mut t = String::from("[handlers]\n");
    for ev in [
        "split-brain",
        "before-resync-target",
        "after-resync-target",
        "before-resync-source",
        "after-resync-source",
        "peer-lost",
        "became-primary",
    ] {
        t.push_str(&format!("{ev} = \"{}\"\n", script.display()));
    }
    (t, log)
}

/// `sync -f DIR`: flushes the one filesystem (a global `sync` would also wait for every other
/// test's filesystems).
fn syncfs(dir: &Path) {
    run_ok(Command::new("sync").arg("-f").arg(dir), CMD_TIMEOUT);
}

/// Guards a test that has a filesystem on a node's export: if the test panics (or is still
/// running after `limit`), the cluster's daemons are SIGKILLed *before* the client stack is torn
/// down, so a wedged daemon cannot leave umount, `sync` or fsync stuck in the kernel forever
/// (its NBD requests then fail instead). Declare it after the `FsStack` it protects.
struct Watchdog {
    config: String,
    stop: Arc<AtomicBool>,
}

fn kill_daemons_of(config: &str) {
    for pid in pids_with_arg(config) {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.starts_with("blockrep") {
            eprintln!("watchdog: SIGKILL {} (pid {pid})", comm.trim());
            kill9(pid);
        }
    }
}

impl Watchdog {
    fn new(c: &Cluster, limit: Duration) -> Self {
        let config = c.config_path().to_string_lossy().into_owned();
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (config, stop) = (config.clone(), stop.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + limit;
                while Instant::now() < deadline {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                eprintln!("watchdog: test still running after {limit:?}; killing its daemons");
                kill_daemons_of(&config);
            });
        }
        Watchdog { config, stop }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if std::thread::panicking() {
            kill_daemons_of(&self.config);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. A link cut longer than the journal: bitmap resync of exactly the dirty blocks.

#[test]
fn link_cut_beyond_journal_resyncs_only_dirty_blocks() {
    let Some(py) = python() else { return };
    let c = pair("out-cut-bitmap", "", |b| {
        b.journal_size("2M")
            .resource_line("resync-rate = \"4M\"")
            .beta_via_proxy()
    });
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let dir = c.dir().path();
    let nblocks = size / BLK;
    let mut rng = XorShift::new(seed());

    // Some data both sides have.
    let base: Vec<u64> = (0..256).collect();
    write_blocks(&py, dir, &a.uri(), 1, &base);
    c.wait_in_sync(SYNC_TIMEOUT);

    assert!(c.proxy().cut_and_refuse() >= 1, "no live link to cut");
    a.wait_not_connected(Duration::from_secs(10));
    let sent0 = a.repl_u64("bytes_sent");

    // 2048 scattered blocks (8 MiB, four times the journal), some over the base data.
    let n = 2048;
    let mut dirty = scattered_blocks(&mut rng, n, nblocks);
    dirty[..32].copy_from_slice(&(0..64).step_by(2).collect::<Vec<u64>>());
    let dirty_set: BTreeSet<u64> = dirty.iter().copied().collect();
    let dirty: Vec<u64> = dirty_set.iter().copied().collect();
    let dirty_bytes = dirty.len() as u64 * BLK;
    write_blocks(&py, dir, &a.uri(), 2, &dirty);
    let ra = a.repl();
    assert_ne!(ra["connection"], "connected", "{ra}");
    assert_eq!(
        u(&ra, "out_of_sync"),
        dirty_bytes,
        "alpha's out_of_sync should be exactly the {} distinct blocks written while cut: {ra}",
        dirty.len()
    );
    // The journal overflowed: the lag still counts every write the peer lacks.
    assert!(
        u(&ra, "lag_writes") >= dirty.len() as u64 && u(&ra, "lag_bytes") >= dirty_bytes,
        "alpha's lag after the journal overflowed: {ra}"
    );

    let marks = (log_mark(a), log_mark(b));
    c.proxy().resume();
    let mut totals = BTreeSet::new();
    let mut reasons = BTreeSet::new();
    let seen = watch(&c, Duration::from_secs(40), "resynced", |sa, sb| {
        let r = &sa["replication"];
        if r["connection"] == "sync-source" {
            totals.insert(u(r, "resync_total"));
            if u(r, "resync_total") > 0 {
                reasons.insert(format!("alpha: {}", r["resync_reason"]));
            }
        }
        let r = &sb["replication"];
        if r["connection"] == "sync-target" && u(r, "resync_total") > 0 {
            reasons.insert(format!("beta: {}", r["resync_reason"]));
        }
        pair_synced(sa, sb)
    });
    // `status` says why the resync runs, on both sides, while it runs.
    println!("resync reasons seen: {reasons:?}");
    for r in &reasons {
        assert!(
            r.starts_with("alpha: \"the bitmap holds")
                || r.starts_with("beta: \"resync from alpha of the regions its bitmap names"),
            "a resync reason that does not say why, or a full sync: {r} (all: {reasons:?})"
        );
    }
    assert!(
        reasons.iter().any(|r| r.starts_with("alpha: ")),
        "the source's status never said why it resynced (totals seen {totals:?}): {reasons:?}"
    );
    assert_identical(&c, size, "bitmap resync after a cut", &seen);
    println!("states seen: {seen:?}; resync totals {totals:?}");
    assert!(
        resynced(a, marks.0, b, marks.1),
        "alpha never started a resync of beta (a bitmap resync, not a journal catch-up, was \
         expected: {} dirty bytes, journal 2M): {seen:?}\n{}",
        dirty_bytes,
        a.log_tail(30)
    );
    assert_eq!(
        seen.alpha.last().map(String::as_str),
        Some("connected"),
        "{seen:?}"
    );
    assert!(
        totals.iter().all(|t| *t <= dirty_bytes + 64 * 1024),
        "resync_total {totals:?} larger than the {dirty_bytes} dirty bytes"
    );
    let ra = c.wait_in_sync(SYNC_TIMEOUT);
    let sent = u(&ra, "bytes_sent") - sent0;
    println!(
        "dirty {dirty_bytes} bytes ({} blocks), bytes_sent for the resync {sent} ({:.3}x)",
        dirty.len(),
        sent as f64 / dirty_bytes as f64
    );
    assert!(
        sent >= dirty_bytes,
        "the resync sent {sent} bytes, less than the {dirty_bytes} dirty bytes"
    );
    assert!(
        sent <= dirty_bytes * 3 / 2 + 256 * 1024,
        "the resync sent {sent} bytes for {dirty_bytes} dirty bytes (> 1.5x + 256 KiB)"
    );
    c.assert_replicas_identical(size, "after the bitmap resync");
    let mut want: BTreeMap<u64, u64> = base.iter().map(|b| (*b, 1)).collect();
    for b in &dirty {
        want.insert(*b, 2);
    }
    check_tags(&b.backing_data(size), &want, "beta after the resync");
}

#[test]
fn link_cut_beyond_journal_with_mounted_filesystem() {
    let c = pair("out-cut-fs", "", |b| {
        b.backing_size(256 << 20)
            .journal_size("2M")
            .resource_line("resync-rate = \"20M\"")
            .beta_via_proxy()
    });
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let mut fs = FsStack::attach(c.dir().path(), "a", &a.uri());
    let _wd = Watchdog::new(&c, Duration::from_secs(150));
    fs.mkfs_ext4();
    let mnt = fs.mount();
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (i, n) in [2 * MIB, 4096, 700_000, 3 * MIB].into_iter().enumerate() {
        let name = format!("before{i}");
        files.insert(
            name.clone(),
            write_random_file(&mnt.join(&name), n as usize),
        );
    }
    syncfs(&mnt);
    c.wait_in_sync(SYNC_TIMEOUT);

    assert!(c.proxy().cut_and_refuse() >= 1, "no live link to cut");
    a.wait_not_connected(Duration::from_secs(10));
    let sent0 = a.repl_u64("bytes_sent");
    std::fs::create_dir_all(mnt.join("during")).unwrap();
    for (i, n) in [5 * MIB, 1, 123_456, 6 * MIB].into_iter().enumerate() {
        let name = format!("during/f{i}");
        files.insert(
            name.clone(),
            write_random_file(&mnt.join(&name), n as usize),
        );
    }
    {
        let patch = random_bytes(300_000);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(mnt.join("before0"))
            .unwrap();
        f.seek(SeekFrom::Start(MIB)).unwrap();
        f.write_all(&patch).unwrap();
        f.sync_all().unwrap();
        files.get_mut("before0").unwrap()[MIB as usize..MIB as usize + 300_000]
            .copy_from_slice(&patch);
    }
    std::fs::remove_file(mnt.join("before1")).unwrap();
    files.remove("before1");
    syncfs(&mnt);
    let oos = a.repl_u64("out_of_sync");
    assert!(oos >= 11 * MIB, "out_of_sync {oos} after 11+ MiB of files");

    let marks = (log_mark(a), log_mark(b));
    c.proxy().resume();
    // The filesystem stays mounted and in use during the resync.
    let extra = write_random_file(&mnt.join("while-resync"), 64 * 1024);
    files.insert("while-resync".into(), extra);
    let seen = wait_synced(&c, Duration::from_secs(40), "after the cut, fs mounted");
    assert_identical(&c, size, "ext4, bitmap resync after a cut", &seen);
    println!("states seen: {seen:?}");
    assert!(
        resynced(a, marks.0, b, marks.1),
        "alpha never started a resync of beta: {seen:?}"
    );
    let ra = c.wait_in_sync(SYNC_TIMEOUT);
    let sent = u(&ra, "bytes_sent") - sent0;
    println!(
        "out of sync at reconnect {oos} bytes, sent {sent} ({:.3}x)",
        sent as f64 / oos as f64
    );
    assert!(
        sent <= oos * 3 / 2 + 4 * MIB,
        "sent {sent} bytes for {oos} out of sync (> 1.5x + 4 MiB of filesystem traffic)"
    );

    for (name, data) in &files {
        let got = std::fs::read(mnt.join(name)).unwrap();
        assert_same_bytes(&got, data, &format!("{name} on alpha"));
    }
    fs.umount();
    fs.fsck_clean();
    fs.close();
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_replicas_identical(size, "ext4 after a bitmap resync");

    let lo = LoopDev::attach(b.backing_path());
    let out = run(
        Command::new("fsck.ext4").args(["-f", "-n"]).arg(lo.dev()),
        LONG_TIMEOUT,
    );
    assert_eq!(out.code, Some(0), "beta's copy:\n{}", out.describe());
    let m = Mount::new(lo.dev(), &c.dir().join("mnt-beta"), Some("ro,noload"));
    for (name, data) in &files {
        let got = std::fs::read(m.dir().join(name))
            .unwrap_or_else(|e| panic!("beta's copy lacks {name}: {e}"));
        assert_same_bytes(&got, data, &format!("{name} on beta"));
    }
    m.close();
    lo.close();
}

// ---------------------------------------------------------------------------------------------
// 2. The primary is SIGKILLed during writes.

/// The activity log of the crash tests: at most this many hot 4 MiB extents (the minimum), so
/// that "only the hot extents" is much less than the device.
const AL_EXTENTS: u64 = 7;

/// Blocks 32768..40960 (128..160 MiB): data written and replicated before the crash tests.
const BACKGROUND: std::ops::Range<u64> = 32768..40960;

/// Stamped writes to the first 8 MiB of alpha, SIGKILL of alpha's daemon while they run.
/// Returns the writer's log.
fn kill_alpha_during_writes(c: &Cluster, py: &Path) -> WriterLog {
    let a = c.alpha();
    // 32 MiB of data far from the hot region, replicated long before the crash: a resync of
    // more than the hot extents would have to move it.
    write_blocks(
        py,
        c.dir().path(),
        &a.uri(),
        5,
        &BACKGROUND.collect::<Vec<_>>(),
    );
    c.wait_in_sync(SYNC_TIMEOUT);
    let mut w = StampWriter::spawn(
        py,
        c.dir().path(),
        "w",
        &a.uri(),
        StampOpts {
            blocks: 2048,
            inflight: 32,
            order: StampOrder::Random,
            count: 0,
            seconds: 0.0,
            flush_every: 0,
            flush_until: 0,
        },
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while w.log().acked.len() < 300 {
        assert!(w.running(), "writer exited early:\n{}", w.output());
        assert!(
            Instant::now() < deadline,
            "writer too slow:\n{}",
            w.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        w.running(),
        "writer stopped before the kill:\n{}",
        w.output()
    );
    Node::kill9_and_wait(a);
    if !w.wait_exit(Duration::from_secs(15)) {
        w.kill();
    }
    let log = w.log();
    println!(
        "{} stamped writes issued, {} acknowledged before the kill",
        log.issued.len(),
        log.acked.len()
    );
    log
}

/// Every block of the first 2048 holds a valid stamp of its own block (or zeroes), and no
/// acknowledged write is older than the stamp found (protocol C).
fn check_stamps(data: &[u8], log: &WriterLog, what: &str) {
    let mut last = BTreeMap::new();
    for &(s, blk) in &log.acked {
        let e = last.entry(blk).or_insert(0);
        *e = s.max(*e);
    }
    let block_of = log.block_of();
    for (blk, st) in Stamp::parse_all(data, 2048).into_iter().enumerate() {
        let blk = blk as u64;
        match (st, last.get(&blk)) {
            (Stamp::Zero, None) => {}
            (Stamp::Valid { block, seq }, w) => {
                assert_eq!(
                    block, blk,
                    "{what}: block {blk} holds block {block}'s stamp"
                );
                assert_eq!(
                    block_of.get(&seq),
                    Some(&blk),
                    "{what}: block {blk} seq {seq}"
                );
                if let Some(w) = w {
                    assert!(
                        seq >= *w,
                        "{what}: block {blk}: acked seq {w} lost (has {seq})"
                    );
                }
            }
            (st, w) => panic!("{what}: block {blk} holds {st:?}, last acked write {w:?}"),
        }
    }
}

/// The activity log cools: on a device smaller than `al-extents` covers (the default's 4.8 GiB
/// against 256 MiB here), a primary that wrote everywhere, then went quiet for a while, then
/// wrote to two extents and crashed, resyncs those extents after its restart, not every
/// extent it wrote since `up` (a full copy at worst; found by an admin trial's failback).
#[test]
fn a_primary_crashed_after_a_quiet_spell_resyncs_only_its_recent_extents() {
    let Some(py) = python() else { return };
    let c = pair("out-al-cooling", "", |b| {
        b.backing_size(256 << 20).journal_size("8M")
    });
    let a = c.alpha();
    let size = a.size();
    let extents = size / (4 * MIB);
    let everywhere: Vec<u64> = (0..extents).map(|e| e * (4 * MIB / BLK)).collect();
    write_blocks(&py, c.dir().path(), &a.uri(), 1, &everywhere);
    c.wait_in_sync(SYNC_TIMEOUT);
    // Two cooling rounds of 5 s: every extent idle for a whole one, its writes durable on beta
    // (waited for with a round to spare: the rounds are counted by a loop that drifts under
    // load).
    std::thread::sleep(Duration::from_secs(17));
    let recent = [1u64, 4 * MIB / BLK + 1];
    write_blocks(&py, c.dir().path(), &a.uri(), 2, &recent);
    c.wait_in_sync(SYNC_TIMEOUT);
    let pid = a.pid().expect("alpha's pid");
    a.kill9();
    assert!(wait_pid_gone(pid, Duration::from_secs(10)));
    let ma = log_mark(a);
    a.up();
    let seen = wait_synced(&c, Duration::from_secs(40), "alpha's hot extents resynced");
    assert_identical(&c, size, "after the crashed primary's restart", &seen);
    let la = log_since(a, ma);
    let al = crashed_al_bytes(&la)
        .unwrap_or_else(|| panic!("no crashed-primary line in alpha's log:\n{}", la.join("\n")));
    assert!(
        al <= 3 * 4 * MIB,
        "alpha marked {al} bytes of hot extents after a quiet spell ({extents} extents written \
         before it, 2 after); its log:\n{}",
        la.join("\n")
    );
}

/// Failover: alpha dies, beta is promoted with --force and writes; alpha comes back with `up`
/// as secondary and is resynced from beta, only the regions that changed.
#[test]
fn primary_killed_failover_then_old_primary_resyncs_changed_regions() {
    let Some(py) = python() else { return };
    let c = pair("out-kill-failover", "", |b| {
        b.backing_size(256 << 20)
            .journal_size("8M")
            .resource_line(&format!("al-extents = {AL_EXTENTS}"))
    });
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let log = kill_alpha_during_writes(&c, &py);

    b.wait_not_connected(Duration::from_secs(10));
    // A plain `primary` is refused (the peer is unknown) at once, not after waiting 5 s for
    // a reconnect that only a role change would bring (trial 6: a failover lost 5 s).
    std::thread::sleep(Duration::from_millis(2500));
    let t = Instant::now();
    b.assert_primary_refused(&["unknown", "--force"], "a peer lost 2.5 s ago");
    // The wait it must not do is 5 s; a command (process start and reply) on a loaded
    // machine may take a second or two.
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "the refusal took {:?}",
        t.elapsed()
    );
    b.ctl_ok(&["primary", "--force"]);
    check_stamps(&b.backing_data(8 * MIB), &log, "beta after failover");
    // New writes on beta: inside alpha's hot region and far away from it.
    let mut beta_blocks: Vec<u64> = (0..2048).step_by(16).collect();
    beta_blocks.extend((0..128).map(|i| 16384 + i * 37));
    write_blocks(&py, c.dir().path(), &b.uri(), 7, &beta_blocks);
    let beta_before = b.backing_data(size);
    let alpha_before = a.backing_data(size);
    let differ = blocks_differing(&alpha_before, &beta_before);
    let sent0 = b.repl_u64("bytes_sent");
    let (ma, mb) = (log_mark(a), log_mark(b));

    a.up();
    let sa = a.status_json();
    assert_eq!(sa["role"], "secondary", "alpha after a crash and up: {sa}");
    let seen = wait_synced(&c, Duration::from_secs(40), "alpha resynced from beta");
    assert_identical(&c, size, "failover, old primary resynced", &seen);
    println!("states seen: {seen:?}");
    let sb = b.status_json();
    assert_eq!(sb["role"], "primary", "{sb}");
    let sent = u(&sb["replication"], "bytes_sent") - sent0;
    let la = log_since(a, ma);
    let al = crashed_al_bytes(&la).unwrap_or(0);
    let sizes = resync_sizes(&log_since(b, mb));
    println!(
        "{differ} blocks differed; alpha's hot extents {al} bytes; resyncs {sizes:?}; beta sent \
         {sent} bytes to resync alpha (device {size} bytes)"
    );
    // The resync covers alpha's hot extents (at most al-extents of them) and what beta wrote,
    // not the whole device.
    let al_cap = AL_EXTENTS * 4 * MIB;
    assert!(
        al <= al_cap,
        "alpha marked {al} bytes of hot extents, more than al-extents = {AL_EXTENTS} allows"
    );
    let want_max = al_cap + beta_blocks.len() as u64 * BLK + MIB;
    assert!(
        !sizes.is_empty() && sizes.iter().all(|s| *s <= want_max),
        "resync sizes {sizes:?} (from beta's log) exceed alpha's hot extents ({al} bytes, at \
         most {al_cap}) plus beta's {} written blocks (bound {want_max}); alpha's log since \
         restart:\n{}",
        beta_blocks.len(),
        la.join("\n")
    );
    assert!(
        sent < size / 4 && sent <= want_max * 3 / 2 + MIB,
        "the resync after failover moved {sent} bytes of a {size}-byte device (bound {want_max})"
    );
    c.assert_replicas_identical(size, "after failover and the old primary's return");
    assert_same_bytes(
        &b.backing_data(size),
        &beta_before,
        "beta (the source) changed during the resync",
    );
    let want: BTreeMap<u64, u64> = beta_blocks.iter().map(|x| (*x, 7)).collect();
    check_tags(&a.backing_data(size), &want, "alpha after the resync");
}

/// The crashed primary comes back (`up`, secondary) and is promoted again with
/// `primary --force` while beta stayed secondary: alpha is the sync source of its possibly
/// unreplicated recent writes, and the pair ends identical with alpha's data.
#[test]
fn primary_killed_restarted_and_repromoted_resyncs_from_it() {
    let Some(py) = python() else { return };
    let c = pair("out-kill-repromote", "", |b| {
        b.backing_size(256 << 20)
            .journal_size("8M")
            .resource_line(&format!("al-extents = {AL_EXTENTS}"))
    });
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let log = kill_alpha_during_writes(&c, &py);
    b.wait_not_connected(Duration::from_secs(10));
    assert_eq!(b.status_json()["role"], "secondary");

    // Alpha's disk as the crash left it (the daemon is dead: nothing changes it now).
    let alpha_before = a.backing_data(size);
    let differ = blocks_differing(&alpha_before, &b.backing_data(size));
    println!("{differ} blocks differ between alpha and beta after the crash");
    check_stamps(&alpha_before[..8 << 20], &log, "alpha after the crash");

    // Back as secondary; at equal generations the crashed primary is the source of its hot
    // extents (it may resync before it is promoted).
    let ma = log_mark(a);
    a.up();
    let sa = a.status_json();
    assert_eq!(sa["role"], "secondary", "alpha after a crash and up: {sa}");
    // What alpha resyncs: its hot extents (and its journal's records), not the whole device.
    let resynced = wait_for(Duration::from_secs(20), || {
        !resync_sizes(&log_since(a, ma)).is_empty()
    });
    let la = log_since(a, ma);
    assert!(
        resynced,
        "the restarted crashed primary never resynced its hot extents; its log since the restart:\n{}",
        la.join("\n")
    );
    let al = crashed_al_bytes(&la).unwrap_or_else(|| {
        panic!(
            "no activity-log line after the crash; log since the restart:\n{}",
            la.join("\n")
        )
    });
    let sizes = resync_sizes(&la);
    println!("alpha's hot extents: {al} bytes; resyncs it started: {sizes:?}");
    assert!(
        al <= AL_EXTENTS * 4 * MIB && sizes.iter().all(|s| *s <= AL_EXTENTS * 4 * MIB + MIB),
        "the restarted crashed primary resyncs {sizes:?} bytes although its activity log \
         marked {al} bytes (device {size}); its log since the restart:\n{}",
        la.join("\n")
    );
    let seen1 = watch(&c, Duration::from_secs(30), "connected again", |sa, sb| {
        sa["replication"]["connection"] == "connected"
            && sb["replication"]["connection"] == "connected"
    });
    a.ctl_ok(&["primary", "--force"]);
    let seen2 = wait_synced(&c, Duration::from_secs(40), "beta resynced from alpha");
    assert_identical(
        &c,
        size,
        "crashed primary restarted and promoted again",
        &seen2,
    );
    println!("states seen before the promotion: {seen1:?}; after: {seen2:?}");
    assert_eq!(a.status_json()["role"], "primary");
    for s in [&seen1, &seen2] {
        assert!(
            !Seen::has(&s.alpha, "sync-target") && !Seen::has(&s.beta, "sync-source"),
            "alpha was resynced from beta; its data should have been the source: {s:?}"
        );
    }
    // A new daemon: everything it ever sent is the resync (and the journal catch-up).
    let sent = a.repl_u64("bytes_sent");
    println!("alpha sent {sent} bytes since its restart (device {size})");
    assert!(
        sent <= AL_EXTENTS * 4 * MIB * 3 / 2 + MIB,
        "the resync after the restart moved {sent} bytes; al-extents = {AL_EXTENTS} bounds the \
         hot extents to {} bytes",
        AL_EXTENTS * 4 * MIB
    );
    c.assert_replicas_identical(size, "after the crashed primary was promoted again");
    assert_same_bytes(
        &b.backing_data(size),
        &alpha_before,
        "beta must end with alpha's data (alpha was promoted)",
    );
    check_stamps(&b.backing_data(8 * MIB), &log, "beta at the end");
}

/// A crashed primary that is stopped cleanly before it could bring its peer its hot extents
/// stays a crashed primary: at the next start it says so again, and when the link comes back
/// it is the source of those extents. Before, the clean `down` cleared the mark; both nodes
/// then stood at one generation, looked in sync, and a later promotion of the peer resynced
/// the extents from it, over writes the crashed node had acknowledged.
#[test]
fn a_crashed_primary_stopped_cleanly_before_it_reconnected_is_still_the_source_of_its_extents() {
    let Some(py) = python() else { return };
    let c = pair("out-crash-down-up", "", |b| {
        b.backing_size(256 << 20)
            .journal_size("8M")
            .beta_via_proxy()
            .resource_line(&format!("al-extents = {AL_EXTENTS}"))
    });
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let log = kill_alpha_during_writes(&c, &py);
    // The link stays down: alpha (the dialer) reaches beta only through the proxy.
    c.proxy().cut_and_refuse();
    b.wait_not_connected(Duration::from_secs(10));
    let alpha_before = a.backing_data(size);

    let ma = log_mark(a);
    a.up();
    assert!(
        crashed_al_bytes(&log_since(a, ma)).is_some(),
        "the first start after the crash did not recover alpha as a crashed primary:\n{}",
        log_since(a, ma).join("\n")
    );
    a.down();
    let md = a.ctl_ok(&["dump-md"]).stdout;
    assert!(
        md.lines()
            .any(|l| l.starts_with("was-primary") && l.trim_end().ends_with("true")),
        "a clean down cleared the crashed primary's mark before its peer had its extents:\n{md}"
    );

    let ma = log_mark(a);
    a.up();
    assert!(
        log_since(a, ma)
            .iter()
            .any(|l| l.contains("was primary when it stopped last")),
        "the second start forgot the crash:\n{}",
        log_since(a, ma).join("\n")
    );
    c.proxy().resume();
    let seen = wait_synced(&c, Duration::from_secs(40), "beta resynced from alpha");
    let la = log_since(a, ma);
    assert!(
        la.iter()
            .any(|l| l
                .contains("this node crashed as primary: its activity-log extents go to the peer")),
        "alpha did not resync its hot extents to beta; its log:\n{}",
        la.join("\n")
    );
    assert!(
        !Seen::has(&seen.alpha, "sync-target"),
        "alpha was resynced from beta: {seen:?}"
    );
    assert_identical(&c, size, "the crashed primary's extents resynced", &seen);
    assert_same_bytes(
        &b.backing_data(size),
        &alpha_before,
        "beta must end with the crashed primary's data",
    );
    check_stamps(&b.backing_data(8 * MIB), &log, "beta at the end");
    let md = a.ctl_ok(&["dump-md"]).stdout;
    assert!(
        md.lines()
            .any(|l| l.starts_with("was-primary") && l.trim_end().ends_with("false")),
        "the mark outlived the resync that settled it:\n{md}"
    );
}

/// The secondary applies a write (protocol C acknowledges it) and loses power before syncing
/// it: it comes back without it, at the generation it had. The primary, cut off, flushes the
/// write locally and is demoted. Its loss of the peer started a new generation, because the
/// peer had not made the write durable: when the peer comes back the old primary is the
/// source of the write, and the peer promoted afterwards holds it. Before, the loss of the
/// peer started a generation only for writes the peer had not applied: both nodes stood at
/// one generation, looked in sync, and the promoted peer resynced the region from its stale
/// disk over the write on the old primary.
#[test]
fn a_write_the_peer_applied_but_lost_in_a_power_cut_comes_back_from_the_old_primary() {
    let c = pair("out-peer-powercut", "", |b| {
        b.backing_size(64 << 20).journal_size("8M")
    });
    let (a, b) = (c.alpha(), c.beta());
    let off = 4 * MIB;
    let stale = b.backing_data(off + MIB)[off as usize..].to_vec();
    let data = random_bytes(MIB as usize);
    let mut r = a.raw_open();
    r.write_at(off, &data, 0).expect("write");
    let ra = a.repl();
    assert_eq!(ra["seq_applied"], ra["seq_written"], "protocol C: {ra}");
    assert!(
        u(&ra, "seq_durable") < u(&ra, "seq_written"),
        "beta synced the write already (its checkpoint ran): the power cut cannot lose it: {ra}"
    );
    // The power cut: beta dies, and the write's range on its disk holds what it held before
    // (its page cache never reached the disk; its metadata's applied mark is its last sync).
    Node::kill9_and_wait(b);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(b.backing_path())
            .expect("open beta's backing");
        f.write_all_at(&stale, off).expect("roll back beta's disk");
        f.sync_all().expect("sync");
    }
    a.wait_not_connected(Duration::from_secs(10));
    r.command(CMD_FLUSH, 0, 0, 0)
        .expect("a flush with the peer away");
    r.disconnect();
    a.ctl_ok(&["secondary"]);

    b.up();
    let seen = wait_synced(&c, Duration::from_secs(40), "beta resynced from alpha");
    assert!(
        !Seen::has(&seen.alpha, "sync-target"),
        "alpha was resynced from beta: {seen:?}"
    );
    b.ctl_ok(&["primary"]);
    let seen = wait_synced(&c, Duration::from_secs(40), "in sync behind beta");
    assert_identical(&c, a.size(), "beta promoted after the power cut", &seen);
    assert_same_bytes(
        &a.backing_data(off + MIB)[off as usize..],
        &data,
        "alpha's acknowledged and flushed write",
    );
    assert_same_bytes(
        &b.backing_data(off + MIB)[off as usize..],
        &data,
        "beta after it came back and was promoted",
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Failover and failback with a filesystem.

fn write_files(dir: &Path, prefix: &str, sizes: &[u64]) -> BTreeMap<String, Vec<u8>> {
    std::fs::create_dir_all(dir).unwrap();
    let mut m = BTreeMap::new();
    for (i, n) in sizes.iter().enumerate() {
        let name = format!("{prefix}{i}");
        m.insert(
            name.clone(),
            write_random_file(&dir.join(&name), *n as usize),
        );
    }
    m
}

fn check_files(dir: &Path, files: &BTreeMap<String, Vec<u8>>, what: &str) {
    for (name, data) in files {
        let got = std::fs::read(dir.join(name))
            .unwrap_or_else(|e| panic!("{what}: cannot read {name}: {e}"));
        assert_same_bytes(&got, data, &format!("{what}: {name}"));
    }
}

#[test]
fn failover_and_failback_with_files() {
    let c = pair("out-failback", "", |b| {
        b.backing_size(512 << 20)
            .journal_size("8M")
            .resource_line(&format!("al-extents = {AL_EXTENTS}"))
    });
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let dir = c.dir().path();

    let mut fs = FsStack::attach(dir, "a1", &a.uri());
    // One watchdog a stage: each new one replaces (drops) the one before, whose deadline
    // would otherwise run over the whole test.
    let mut _wd = Watchdog::new(&c, Duration::from_secs(150));
    fs.mkfs_ext4();
    let mnt = fs.mount();
    let mut files = write_files(
        &mnt,
        "alpha",
        &[4 * MIB, 1, 300_000, 6 * MIB, 4096, 2 * MIB],
    );
    syncfs(&mnt);
    c.wait_in_sync(SYNC_TIMEOUT);

    // The primary dies with the filesystem mounted.
    Node::kill9_and_wait(a);
    drop(fs); // its I/O now fails; lazy teardown of the client stack

    b.wait_not_connected(Duration::from_secs(10));
    let out = b.ctl(&["primary"]);
    assert!(
        !out.success(),
        "primary without --force, peer gone:\n{}",
        out.describe()
    );
    b.ctl_ok(&["primary", "--force"]);
    let written0 = u(&b.status_json()["io"], "bytes_written");
    let mut fs = FsStack::attach(dir, "b", &b.uri());
    _wd = Watchdog::new(&c, Duration::from_secs(150));
    let mnt = fs.mount();
    check_files(&mnt, &files, "beta after failover");
    let new = write_files(&mnt.join("on-beta"), "beta", &[3 * MIB, 12_345, MIB]);
    std::fs::remove_file(mnt.join("alpha4")).unwrap();
    files.remove("alpha4");
    syncfs(&mnt);
    fs.umount();
    fs.fsck_clean();
    fs.close();
    for (k, v) in new {
        files.insert(format!("on-beta/{k}"), v);
    }
    let differ = blocks_differing(&a.backing_data(size), &b.backing_data(size));
    let written = u(&b.status_json()["io"], "bytes_written") - written0;
    let sent0 = b.repl_u64("bytes_sent");
    let (ma, mb) = (log_mark(a), log_mark(b));

    a.up();
    assert_eq!(a.status_json()["role"], "secondary");
    let seen = wait_synced(&c, Duration::from_secs(40), "alpha resynced from beta");
    assert_identical(&c, size, "failover with ext4, old primary resynced", &seen);
    println!("states seen: {seen:?}");
    let sent = b.repl_u64("bytes_sent") - sent0;
    let la = log_since(a, ma);
    let al = crashed_al_bytes(&la).unwrap_or(0);
    let sizes = resync_sizes(&log_since(b, mb));
    println!(
        "{differ} blocks differed; beta wrote {written} bytes since its promotion; alpha's hot \
         extents {al} bytes; resyncs {sizes:?}; beta sent {sent} bytes (device {size})"
    );
    c.assert_replicas_identical(size, "after failover");

    // Failback.
    b.ctl_ok(&["secondary"]);
    a.ctl_ok(&["primary"]);
    let sa = a.status_json();
    assert_eq!(sa["role"], "primary", "{sa}");
    let mut fs = FsStack::attach(dir, "a2", &a.uri());
    _wd = Watchdog::new(&c, Duration::from_secs(150));
    let mnt = fs.mount();
    check_files(&mnt, &files, "alpha after failback");
    assert!(
        !mnt.join("alpha4").exists(),
        "a file deleted on beta is back"
    );
    write_files(&mnt, "back", &[MIB]);
    syncfs(&mnt);
    fs.umount();
    fs.fsck_clean();
    fs.close();
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_replicas_identical(size, "after failback");

    // The resync after the failover moved only the changed regions: what beta wrote since
    // its promotion and alpha's hot extents (checked last, so a failure here still shows that
    // the data parts held).
    assert!(
        al <= AL_EXTENTS * 4 * MIB,
        "alpha marked {al} bytes of hot extents, more than al-extents = {AL_EXTENTS} allows"
    );
    let bound = AL_EXTENTS * 4 * MIB + written + MIB;
    assert!(
        !sizes.is_empty() && sizes.iter().all(|s| *s <= bound),
        "resync sizes {sizes:?} exceed what changed (beta wrote {written} bytes, alpha's hot \
         extents {al} bytes); alpha's log since restart:\n{}",
        la.join("\n")
    );
    assert!(
        sent < size / 4 && sent <= bound * 3 / 2 + MIB,
        "the resync after failover sent {sent} bytes (device {size}, changed at most {bound})"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Split brain: detected, nothing moves, handler runs, resolved by --discard-my-data.

/// alpha `disconnect`, beta `primary --force`, then tag-2 writes on alpha and tag-3 writes on
/// beta. Both nodes are primary afterwards.
fn diverge(c: &Cluster, py: &Path, alpha_blocks: &[u64], beta_blocks: &[u64]) {
    let (a, b) = (c.alpha(), c.beta());
    a.ctl_ok(&["disconnect"]);
    a.wait_repl(Duration::from_secs(10), "standalone", |r| {
        r["connection"] == "standalone"
    });
    b.wait_not_connected(Duration::from_secs(10));
    b.ctl_ok(&["primary", "--force"]);
    if !alpha_blocks.is_empty() {
        write_blocks(py, c.dir().path(), &a.uri(), 2, alpha_blocks);
    }
    if !beta_blocks.is_empty() {
        write_blocks(py, c.dir().path(), &b.uri(), 3, beta_blocks);
    }
}

#[test]
fn split_brain_detected_nothing_moves_then_discard_my_data_resolves() {
    let Some(py) = python() else { return };
    let tmp = TestDir::new("out-sb-handler");
    let (handlers, hlog) = handler_table(tmp.path());
    let c = pair("out-split-brain", &handlers, |b| {
        b.backing_size(64 << 20).journal_size("4M")
    });
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let base: Vec<u64> = (0..512).collect();
    write_blocks(&py, c.dir().path(), &a.uri(), 1, &base);
    c.wait_in_sync(SYNC_TIMEOUT);

    let alpha_blocks: Vec<u64> = (0..128).chain(1000..1100).collect();
    let beta_blocks: Vec<u64> = (64..192).chain(2000..2200).collect();
    diverge(&c, &py, &alpha_blocks, &beta_blocks);
    let alpha_snap = a.backing_data(size);
    let beta_snap = b.backing_data(size);
    let sent_a0 = a.repl_u64("bytes_sent");
    let sent_b0 = b.repl_u64("bytes_sent");

    a.ctl_ok(&["connect"]);
    let ra = wait_split_brain_reported(a, Duration::from_secs(15));
    let rb = wait_split_brain_reported(b, Duration::from_secs(15));
    println!("alpha: {ra}\nbeta: {rb}");
    assert!(
        wait_for(Duration::from_secs(5), || {
            !log_lines(a, "split brain").is_empty() && !log_lines(b, "split brain").is_empty()
        }),
        "both logs should say split brain\n--- alpha ---\n{}\n--- beta ---\n{}",
        a.log_tail(20),
        b.log_tail(20)
    );
    // Let the link retry for a while: still refused, no data moves.
    std::thread::sleep(Duration::from_secs(3));
    // Told once, not at every retry: one handler run and one error line per node (the retries
    // back off and log at debug level).
    let text = std::fs::read_to_string(&hlog).unwrap_or_default();
    for n in [a, b] {
        let runs = text
            .lines()
            .filter(|l| l.starts_with(&format!("{} {} split-brain", n.name(), c.resource())))
            .count();
        assert_eq!(runs, 1, "split-brain handler runs on {}:\n{text}", n.name());
        let errors = log_lines(n, "split brain")
            .into_iter()
            .filter(|l| l.contains("ERROR"))
            .count();
        assert_eq!(
            errors,
            1,
            "split-brain error lines on {}:\n{}",
            n.name(),
            n.log_tail(30)
        );
    }
    for (n, snap) in [(a, &alpha_snap), (b, &beta_snap)] {
        let s = n.status_json();
        let r = &s["replication"];
        assert!(
            !matches!(
                r["connection"].as_str(),
                Some("connected" | "sync-source" | "sync-target")
            ),
            "{} connected despite the split brain: {s}",
            n.name()
        );
        assert_eq!(
            r["connection"],
            "split-brain",
            "{} does not show the split brain: {s}",
            n.name()
        );
        assert_eq!(s["role"], "primary", "{s}");
        assert_same_bytes(
            &n.backing_data(size),
            snap,
            &format!("{}'s data during the split brain", n.name()),
        );
    }
    assert_eq!(a.repl_u64("bytes_sent"), sent_a0, "alpha sent data");
    assert_eq!(b.repl_u64("bytes_sent"), sent_b0, "beta sent data");

    // Resolution: alpha (the victim) drops its changes. The resync is paced (the source's
    // rate, adjusted live) so that its progress can be watched: the victim's out-of-sync
    // follows what the source has left, including the victim's own changes, and is not
    // left showing them when the resync is done.
    c.write_config(&c.config_text().replacen(
        "[resource]\n",
        "[resource]\nresync-rate = \"512K\"\n",
        1,
    ));
    b.ctl_ok(&["adjust"]);
    a.ctl_ok(&["secondary"]);
    // A plain promotion in a split brain says so and how to settle it (a trial saw "the peer
    // is not connected ... use --force").
    wait_split_brain_reported(a, Duration::from_secs(15));
    a.assert_primary_refused(
        &["split brain", "discard-my-data"],
        "a node in a split brain",
    );
    a.ctl_ok(&["connect", "--discard-my-data"]);
    let mut progress_seen = 0;
    let seen = watch(
        &c,
        Duration::from_secs(60),
        "in sync after --discard-my-data",
        |sa, sb| {
            let r = &sa["replication"];
            if r["connection"] == "sync-target" && r["resync_total"].as_u64().unwrap_or(0) > 0 {
                progress_seen += 1;
                let left = r["resync_total"].as_u64().unwrap_or(0)
                    - r["resync_done"].as_u64().unwrap_or(0);
                assert_eq!(
                    r["out_of_sync"].as_u64(),
                    Some(left),
                    "the victim's out-of-sync is not what its resync has left: {r}"
                );
            }
            pair_synced(sa, sb)
        },
    );
    assert!(
        progress_seen > 0,
        "the paced resync was never seen running: {seen:?}"
    );
    assert_identical(&c, size, "split brain resolved by --discard-my-data", &seen);
    for n in [a, b] {
        assert!(
            !log_lines(n, "discard-my-data: alpha's changes since the split").is_empty(),
            "{}'s log does not say whose changes were given up:\n{}",
            n.name(),
            n.log_tail(30)
        );
    }
    println!("states seen: {seen:?}");
    assert_eq!(b.status_json()["role"], "primary");
    c.assert_replicas_identical(size, "after resolving the split brain");
    assert_same_bytes(
        &a.backing_data(size),
        &beta_snap,
        "alpha = the winner's data",
    );
    assert_same_bytes(&b.backing_data(size), &beta_snap, "beta (winner) unchanged");
    let sent = b.repl_u64("bytes_sent") - sent_b0;
    let union: BTreeSet<u64> = alpha_blocks.iter().chain(&beta_blocks).copied().collect();
    let union_bytes = union.len() as u64 * BLK;
    println!("resolution resync sent {sent} bytes; blocks changed on either side: {union_bytes}");
    assert!(
        sent <= union_bytes * 3 / 2 + 256 * 1024,
        "resolving moved {sent} bytes for {union_bytes} bytes changed on either side"
    );
    wait_same_generation(&c);

    // The victim's own records of the split are history the resync replaced: cut off again,
    // it names nothing as out of sync and its journal holds none of them.
    a.ctl_ok(&["disconnect"]);
    a.wait_repl(Duration::from_secs(10), "standalone", |r| {
        r["connection"] == "standalone"
    });
    let s = a.status_json();
    let r = &s["replication"];
    assert_eq!(
        u(r, "out_of_sync"),
        0,
        "the victim after the resolution: {s}"
    );
    assert_eq!(
        u(r, "journal_used"),
        0,
        "the victim after the resolution: {s}"
    );
    a.ctl_ok(&["connect"]);
    wait_synced(&c, Duration::from_secs(30), "after reconnecting the victim");

    // The split-brain handler ran on both nodes, with RESOURCE EVENT PEER.
    let ok = wait_for(Duration::from_secs(5), || {
        let t = std::fs::read_to_string(&hlog).unwrap_or_default();
        t.lines()
            .any(|l| l.starts_with(&format!("alpha {} split-brain beta", c.resource())))
            && t.lines()
                .any(|l| l.starts_with(&format!("beta {} split-brain alpha", c.resource())))
    });
    let text = std::fs::read_to_string(&hlog).unwrap_or_default();
    println!("handler log:\n{text}");
    assert!(
        ok,
        "the split-brain handler did not run on both nodes; handler log:\n{text}\n\
         alpha split-brain log lines: {:?}\nbeta split-brain log lines: {:?}",
        log_lines(a, "split brain"),
        log_lines(b, "split brain")
    );
    assert!(
        text.lines()
            .all(|l| l.contains(&format!("env={}/", c.resource()))),
        "handler environment: {text}"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Automatic split-brain policies (after-sb-0pri), both nodes secondary at connect.

/// A split brain met by both nodes as secondaries under `policy`: alpha changed `alpha_n`
/// blocks, beta `beta_n`; `winner` is the node whose data must survive, or `None` when the pair
/// must stay split (then `connect --discard-my-data` on alpha resolves it).
fn sb_policy(test: &str, policy: &str, alpha_n: u64, beta_n: u64, winner: Option<&str>) {
    sb_policy_with(test, policy, alpha_n, beta_n, winner, |_| {}, "alpha")
}

/// [`sb_policy`], with `before_connect` run once both nodes are demoted, before they meet,
/// and a split brain left standing settled by `connect --discard-my-data` on `discard_on`.
fn sb_policy_with(
    test: &str,
    policy: &str,
    alpha_n: u64,
    beta_n: u64,
    winner: Option<&str>,
    before_connect: impl Fn(&Cluster),
    discard_on: &str,
) {
    let Some(py) = python() else { return };
    let c = pair(test, "", |b| {
        b.backing_size(64 << 20)
            .journal_size("4M")
            .resource_line(&format!("after-sb-0pri = \"{policy}\""))
    });
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    write_blocks(
        &py,
        c.dir().path(),
        &a.uri(),
        1,
        &(0..512).collect::<Vec<_>>(),
    );
    c.wait_in_sync(SYNC_TIMEOUT);

    let alpha_blocks: Vec<u64> = (0..alpha_n).map(|i| i * 3).collect();
    let beta_blocks: Vec<u64> = (0..beta_n).map(|i| 1 + i * 5).collect();
    diverge(&c, &py, &alpha_blocks, &beta_blocks);
    a.ctl_ok(&["secondary"]);
    b.ctl_ok(&["secondary"]);
    before_connect(&c);
    let alpha_snap = a.backing_data(size);
    let beta_snap = b.backing_data(size);
    println!(
        "alpha changed {} bytes, beta {} bytes",
        a.repl_u64("out_of_sync"),
        b.repl_u64("out_of_sync")
    );
    a.ctl_ok(&["connect"]);

    match winner {
        Some(w) => {
            let seen = wait_synced(&c, Duration::from_secs(30), &format!("{policy} resolved"));
            assert_identical(
                &c,
                size,
                &format!("split brain resolved by {policy}"),
                &seen,
            );
            println!("states seen: {seen:?}");
            let want = if w == "alpha" {
                &alpha_snap
            } else {
                &beta_snap
            };
            let loser = if w == "alpha" { b } else { a };
            c.assert_replicas_identical(size, &format!("after {policy}"));
            assert_same_bytes(
                &a.backing_data(size),
                want,
                &format!("{policy}: {w}'s data should have won"),
            );
            for n in [a, b] {
                assert!(
                    !log_lines(n, "split brain resolved").is_empty(),
                    "{}'s log does not say the split brain was resolved by the policy:\n{}",
                    n.name(),
                    n.log_tail(20)
                );
            }
            let lines = log_lines(loser, "this node discards its changes");
            assert!(
                !lines.is_empty(),
                "the loser {} does not log that it discards its changes:\n{}",
                loser.name(),
                loser.log_tail(20)
            );
            for n in [a, b] {
                assert_eq!(n.status_json()["role"], "secondary");
            }
            wait_same_generation(&c);
        }
        None => {
            wait_split_brain_reported(a, Duration::from_secs(15));
            wait_split_brain_reported(b, Duration::from_secs(15));
            std::thread::sleep(Duration::from_secs(3));
            for (n, snap) in [(a, &alpha_snap), (b, &beta_snap)] {
                let r = n.repl();
                assert!(
                    !matches!(
                        r["connection"].as_str(),
                        Some("connected" | "sync-source" | "sync-target")
                    ),
                    "{policy}: {} connected although both changed: {r}",
                    n.name()
                );
                assert_same_bytes(
                    &n.backing_data(size),
                    snap,
                    &format!("{policy}: {}'s data", n.name()),
                );
            }
            assert!(
                !log_lines(a, "split brain").is_empty() && !log_lines(b, "split brain").is_empty(),
                "logs should say split brain"
            );
            // The admin resolves it: the other node's data wins.
            let (loser, kept) = if discard_on == "alpha" {
                (a, &beta_snap)
            } else {
                (b, &alpha_snap)
            };
            loser.ctl_ok(&["connect", "--discard-my-data"]);
            wait_synced(&c, Duration::from_secs(30), "after --discard-my-data");
            c.assert_replicas_identical(size, &format!("{policy} then --discard-my-data"));
            assert_same_bytes(&a.backing_data(size), kept, "the kept node's data won");
        }
    }
}

/// beta was promoted last (the failover) and changed more: the younger primary still loses.
#[test]
fn split_brain_policy_discard_younger_primary() {
    sb_policy(
        "out-sb-younger",
        "discard-younger-primary",
        100,
        300,
        Some("alpha"),
    );
}

/// Review finding: the same, but alpha (primary when the link was cut) is restarted and
/// promoted again with --force after beta's failover, so its last promotion is the later one.
/// It was still the primary before the split, whose data DRBD's policy keeps: beta loses.
/// Before, the later promotion made alpha the "younger" and its writes were discarded.
#[test]
fn split_brain_policy_discard_younger_primary_keeps_the_primary_before_the_split() {
    sb_policy_with(
        "out-sb-younger-again",
        "discard-younger-primary",
        100,
        300,
        Some("alpha"),
        |c| {
            let (a, b) = (c.alpha(), c.beta());
            // Beta stays apart meanwhile (alpha's `up` dials it).
            b.ctl_ok(&["disconnect"]);
            a.down();
            a.up();
            a.ctl_ok(&["primary", "--force"]);
            a.ctl_ok(&["secondary"]);
            b.ctl_ok(&["connect"]);
        },
        "beta",
    );
}

/// Same history, but the policy looks at the amount of change: alpha (fewer) loses.
#[test]
fn split_brain_policy_discard_least_changes() {
    sb_policy(
        "out-sb-least",
        "discard-least-changes",
        100,
        300,
        Some("beta"),
    );
}

/// beta was promoted but wrote nothing: it syncs from alpha.
#[test]
fn split_brain_policy_discard_zero_changes() {
    sb_policy("out-sb-zero", "discard-zero-changes", 100, 0, Some("alpha"));
}

/// Both changed: discard-zero-changes cannot decide and leaves the pair split.
#[test]
fn split_brain_policy_discard_zero_changes_both_changed_stays_split() {
    sb_policy("out-sb-zero-both", "discard-zero-changes", 100, 300, None);
}

/// Both changed, and beta (the failover) was outdated since, by a fence or an admin's
/// `outdate`: outdated data is complete, only older, and its changes are changes, so the
/// policy still cannot decide (DRBD overrides a split brain by disk state for an inconsistent
/// disk only). Before, beta's changes were discarded for its disk state.
#[test]
fn split_brain_policy_discard_zero_changes_keeps_an_outdated_nodes_changes() {
    sb_policy_with(
        "out-sb-zero-outdated",
        "discard-zero-changes",
        100,
        300,
        None,
        |c| {
            let b = c.beta();
            b.ctl_ok(&["outdate"]);
            assert_eq!(b.status_json()["disk"], "outdated");
        },
        // Only towards up-to-date data: beta's changes are the ones an admin can drop.
        "beta",
    );
}

/// `connect --discard-my-data` on both nodes names no copy to keep: the split brain stands,
/// shown as one, with nothing moved; `disconnect` withdraws it on the node to keep, and the
/// next connect settles it. Before, both took the target's side and the link looped on a
/// protocol error, showing `connecting` instead of the split brain.
#[test]
fn discard_my_data_on_both_nodes_leaves_the_split_brain_standing() {
    let Some(py) = python() else { return };
    let c = pair("out-sb-both-discard", "", |b| {
        b.backing_size(64 << 20).journal_size("4M")
    });
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    write_blocks(
        &py,
        c.dir().path(),
        &a.uri(),
        1,
        &(0..512).collect::<Vec<_>>(),
    );
    c.wait_in_sync(SYNC_TIMEOUT);
    diverge(
        &c,
        &py,
        &(0..100).collect::<Vec<_>>(),
        &(200..300).collect::<Vec<_>>(),
    );
    a.ctl_ok(&["secondary"]);
    b.ctl_ok(&["secondary"]);
    let alpha_snap = a.backing_data(size);
    let beta_snap = b.backing_data(size);
    b.ctl_ok(&["connect", "--discard-my-data"]);
    a.ctl_ok(&["connect", "--discard-my-data"]);
    wait_split_brain_reported(a, Duration::from_secs(15));
    wait_split_brain_reported(b, Duration::from_secs(15));
    std::thread::sleep(Duration::from_secs(3));
    for (n, snap) in [(a, &alpha_snap), (b, &beta_snap)] {
        let r = n.repl();
        assert_eq!(
            r["connection"],
            "split-brain",
            "{} does not show the split brain with discard-my-data asked on both: {r}\n{}",
            n.name(),
            n.log_tail(20)
        );
        assert_same_bytes(
            &n.backing_data(size),
            snap,
            &format!("{}'s data with discard-my-data on both", n.name()),
        );
        assert!(
            !log_lines(n, "asked on both nodes").is_empty(),
            "{} does not say why:\n{}",
            n.name(),
            n.log_tail(20)
        );
    }
    // alpha's data is to be kept: its request is withdrawn; beta's settles it.
    a.ctl_ok(&["disconnect"]);
    a.ctl_ok(&["connect"]);
    wait_synced(
        &c,
        Duration::from_secs(30),
        "after alpha withdrew its discard-my-data",
    );
    c.assert_replicas_identical(size, "both discard, then alpha withdrew");
    assert_same_bytes(&b.backing_data(size), &alpha_snap, "alpha's data won");
}

#[test]
fn split_brain_policy_disconnect_stays_split() {
    sb_policy("out-sb-disconnect", "disconnect", 100, 300, None);
}

// ---------------------------------------------------------------------------------------------
// 6. An interrupted resync resumes where it stopped.

#[test]
fn resync_interrupted_and_resumed() {
    let c = pair("out-resync-resume", "", |b| {
        b.journal_size("2M")
            .resource_line("resync-rate = \"10M\"")
            .beta_via_proxy()
    });
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    assert!(c.proxy().cut_and_refuse() >= 1);
    a.wait_not_connected(Duration::from_secs(10));
    let sent0 = a.repl_u64("bytes_sent");
    let n = 48 * MIB;
    let input = c.dir().join("in.bin");
    let data = write_random_file(&input, n as usize);
    a.nbdcopy_in(&input);
    let oos0 = a.repl_u64("out_of_sync");
    assert_eq!(oos0, n, "out_of_sync after writing {n} bytes while cut");

    // First part: until a quarter is done.
    c.proxy().resume();
    let t1 = Instant::now();
    let mut first_total = 0;
    watch(
        &c,
        Duration::from_secs(30),
        "a quarter resynced",
        |sa, _| {
            let r = &sa["replication"];
            if r["connection"] == "sync-source" {
                first_total = u(r, "resync_total");
                u(r, "resync_done") >= n / 4
            } else {
                assert!(
                    r["out_of_sync"] != 0,
                    "the resync finished before it could be interrupted: {sa}"
                );
                false
            }
        },
    );
    // Held there (`pause-sync`: on a loaded machine the rest could go before the cut), and
    // progress survives a cut only once the peer made it durable (writes after its last
    // flush go back into the bitmap, as DRBD's transfer log does): wait for a flush past the
    // quarter.
    a.ctl_ok(&["pause-sync"]);
    let applied = a.repl_u64("seq_applied");
    a.wait_repl(
        Duration::from_secs(30),
        "the quarter durable on beta",
        |r| u(r, "seq_durable") >= applied,
    );
    assert!(c.proxy().cut_and_refuse() >= 1, "no live link to cut");
    let part1 = t1.elapsed();
    // The bitmap keeps what was done.
    let oos1 = u(&wait_link_down(a), "out_of_sync");
    a.ctl_ok(&["resume-sync"]);
    println!(
        "first part: total {first_total}, {:?}; out of sync after the cut {oos1} of {oos0}",
        part1
    );
    assert!(
        oos1 > 0 && oos1 < oos0 - n / 8,
        "after the cut, out_of_sync is {oos1} of {oos0}: the progress was not kept"
    );
    // The target, cut off midway, says what it still lacks (its own bitmap does not name it).
    b.wait_not_connected(Duration::from_secs(10));
    let sb = b.status_json();
    assert_eq!(sb["disk"], "inconsistent", "{sb}");
    let left = u(&sb["replication"], "out_of_sync");
    assert!(
        left > 0 && left <= oos0,
        "the cut target shows {left} bytes out of sync (the source {oos1}): {sb}"
    );
    std::thread::sleep(Duration::from_secs(1));

    // Second part.
    let marks = (log_mark(a), log_mark(b));
    c.proxy().resume();
    let t2 = Instant::now();
    let seen = wait_synced(&c, Duration::from_secs(40), "after the resumed resync");
    assert_identical(&c, size, "interrupted and resumed resync", &seen);
    let part2 = t2.elapsed();
    println!("second part: {part2:?}; states seen {seen:?}");
    assert!(resynced(a, marks.0, b, marks.1), "{seen:?}");
    let ra = c.wait_in_sync(SYNC_TIMEOUT);
    let sent = u(&ra, "bytes_sent") - sent0;
    println!(
        "dirty {n}, sent over both parts {sent} ({:.3}x)",
        sent as f64 / n as f64
    );
    assert!(
        sent <= n * 5 / 4 + 4 * MIB,
        "the interrupted resync sent {sent} bytes for {n} dirty bytes (restarted from scratch?)"
    );
    assert!(sent >= n, "sent {sent} < dirty {n}");
    // The rate limit: 48 MiB at 10 MiB/s is at least ~4.8 s of sending.
    let active = part1 + part2;
    assert!(
        active >= Duration::from_millis(3200),
        "48 MiB resynced in {active:?} despite resync-rate 10M"
    );
    c.assert_replicas_identical(size, "after the resumed resync");
    assert_same_bytes(&b.backing_data(n), &data, "beta's data");
}

/// A full sync (after `invalidate`) cut midway resumes with what is left, as a bitmap resync:
/// the target took the source's bitmap generation at the start, so the ids no longer say
/// "full". (It restarted from zero before: on a large device every link blip during the
/// initial sync began it again.)
/// A resync target disconnected midway by the admin (its link task is cut short, not ended by
/// an error) still says what it lacks while standalone, and nothing once a resync completed.
#[test]
fn a_resync_target_disconnected_midway_shows_what_it_lacks() {
    let c = pair("out-target-disc", "", |b| {
        b.journal_size("2M")
            .resource_line("resync-rate = \"10M\"")
            .beta_via_proxy()
    });
    let (a, b) = (c.alpha(), c.beta());
    assert!(c.proxy().cut_and_refuse() >= 1);
    a.wait_not_connected(Duration::from_secs(10));
    let n = 32 * MIB;
    let input = c.dir().join("in.bin");
    write_random_file(&input, n as usize);
    a.nbdcopy_in(&input);
    c.proxy().resume();
    b.wait_repl(Duration::from_secs(30), "resyncing", |r| {
        r["connection"] == "sync-target" && u(r, "resync_done") > 0
    });
    b.ctl_ok(&["disconnect"]);
    let r = b.wait_repl(Duration::from_secs(10), "standalone", |r| {
        r["connection"] == "standalone"
    });
    let s = b.status_json();
    assert_eq!(s["disk"], "inconsistent", "{s}");
    let left = u(&r, "out_of_sync");
    assert!(
        left > 0 && left <= n,
        "a target cut off midway shows {left} out of sync: {s}"
    );
    assert_eq!(u(&r, "resync_total"), 0, "no resync is running: {r}");
    b.ctl_ok(&["connect"]);
    let seen = wait_synced(&c, Duration::from_secs(60), "after reconnecting the target");
    assert_identical(&c, a.size(), "target reconnected", &seen);
    let r = b.repl();
    assert_eq!(u(&r, "out_of_sync"), 0, "{r}");
}

#[test]
fn full_sync_interrupted_resumes_with_what_is_left() {
    let n = 24 * MIB;
    let FullSyncUnderWay {
        c,
        data,
        total: first_total,
        mark,
    } = full_sync_a_quarter_done("out-full-resume");
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    // The target shows the progress too (the source reports it over the link).
    let rb = b.wait_repl(
        Duration::from_secs(5),
        "resync progress on the target",
        |r| r["connection"] == "sync-target" && u(r, "resync_done") > 0,
    );
    assert_eq!(u(&rb, "resync_total"), first_total, "{rb}");
    assert!(
        u(&rb, "out_of_sync") > 0 && u(&rb, "out_of_sync") < first_total,
        "the target's out_of_sync during its resync: {rb}"
    );
    let left = cut_once_durable(&c);
    println!("full sync of {first_total} bytes cut with {left} bytes left");
    assert!(
        left > 0 && left < first_total - first_total / 8,
        "after the cut {left} of {first_total} bytes are out of sync: the progress was not kept"
    );
    // The target restarted while the source is away: what is left is in the source's
    // bitmap, so its status says it does not know rather than 0 B.
    b.ctl_ok(&["down"]);
    b.up();
    let text = b.ctl_ok(&["status"]).stdout;
    assert!(
        text.contains("disk:inconsistent") && text.contains("out-of-sync unknown"),
        "beta, inconsistent with its peer away, shows an amount it cannot know:\n{text}"
    );

    c.proxy().resume();
    let seen = wait_synced(&c, Duration::from_secs(40), "after the resumed full sync");
    assert_identical(&c, size, "full sync interrupted and resumed", &seen);
    let starts = full_then_bitmap_resync(a, mark);
    let second: u64 = starts[1]
        .split("): ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX);
    assert!(
        second <= left + MIB,
        "the resumed part resynced {second} bytes with {left} left at the cut"
    );
    assert_eq!(b.status_json()["disk"], "up-to-date");
    c.assert_replicas_identical(size, "after the resumed full sync");
    assert_same_bytes(&b.backing_data(n), &data, "beta's data");
    wait_same_generation(&c);
}

/// Review finding: the initial full sync (from a node forced primary on a fresh disk) counted
/// from the fresh id, which the target then took as its current one: after a cut it was fresh
/// again, and the full sync started over from zero. It now counts from a generation of its
/// own, and a cut resumes with what is left, as any full sync's does.
#[test]
fn an_initial_full_sync_cut_midway_resumes_with_what_is_left() {
    let c = Cluster::builder("out-initial-resume")
        .nodes(2)
        .backing_size(64 << 20)
        .journal_size("2M")
        .resource_line("resync-rate = \"4M\"")
        .beta_via_proxy()
        .build();
    let (a, b) = (c.alpha(), c.beta());
    a.create_md();
    b.create_md();
    // What alpha's disk held before it was replicated (the data area is the file's head).
    let data = random_bytes((24 * MIB) as usize);
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(a.backing_path())
            .expect("open alpha.img");
        std::os::unix::fs::FileExt::write_all_at(&f, &data, 0).expect("write");
        f.sync_all().expect("sync");
    }
    let mark = log_mark(a);
    a.up();
    b.up();
    a.primary_force();
    let mut total = 0;
    watch(
        &c,
        Duration::from_secs(30),
        "a quarter of the initial sync",
        |sa, _| {
            let r = &sa["replication"];
            total = u(r, "resync_total");
            r["connection"] == "sync-source" && total > 0 && u(r, "resync_done") >= total / 4
        },
    );
    a.ctl_ok(&["pause-sync"]);
    let left = cut_once_durable(&c);
    println!("initial sync of {total} bytes cut with {left} bytes left");
    c.proxy().resume();
    let seen = wait_synced(
        &c,
        Duration::from_secs(60),
        "after the resumed initial sync",
    );
    assert_identical(&c, a.size(), "initial sync interrupted and resumed", &seen);
    full_then_bitmap_resync(a, mark);
    assert_same_bytes(&b.backing_data(24 * MIB), &data, "beta's data");
}

/// With alpha's resync paused (`pause-sync`, so that it cannot end first: the zero regions
/// past the data go unpaced) and what it sent durable on beta, cuts the link (the proxy in
/// front of beta), lifts the pause for the next connection and returns what alpha has left
/// out of sync.
fn cut_once_durable(c: &Cluster) -> u64 {
    let a = c.alpha();
    let applied = a.repl_u64("seq_applied");
    a.wait_repl(
        Duration::from_secs(30),
        "the resync so far durable on beta",
        |r| u(r, "seq_durable") >= applied,
    );
    assert!(c.proxy().cut_and_refuse() >= 1, "no live link to cut");
    let r = wait_link_down(a);
    a.ctl_ok(&["resume-sync"]);
    u(&r, "out_of_sync")
}

/// Waits until `n` has noticed its link is down (not connected, and no resync running over
/// it: `wait_not_connected` takes a resync's states for a link that is down) and returns its
/// replication status then.
fn wait_link_down(n: &Node) -> Value {
    n.wait_repl(Duration::from_secs(20), "noticing the link is down", |r| {
        !matches!(
            r["connection"].as_str(),
            Some("connected" | "sync-source" | "sync-target")
        )
    })
}

/// Alpha's resync starts since `mark`: exactly two, a full sync and then (after a cut) a
/// bitmap resync of what was left, not a full sync over again.
fn full_then_bitmap_resync(a: &Node, mark: usize) -> Vec<String> {
    let starts: Vec<String> = log_since(a, mark)
        .into_iter()
        .filter(|l| l.contains("resync to the peer ("))
        .collect();
    println!("alpha's resync starts: {starts:#?}");
    assert_eq!(starts.len(), 2, "{starts:#?}");
    assert!(starts[0].ends_with(", full"), "{starts:#?}");
    assert!(
        !starts[1].ends_with(", full"),
        "the full sync started over after the cut: {starts:#?}"
    );
    starts
}

/// A pair whose beta was invalidated after alpha wrote 24 MiB of random data (through a
/// proxy, paced at 4 MiB/s), with a quarter of the full sync done and the sync paused there
/// (`pause-sync` on alpha): past the data the zero regions go unpaced, and an unpaused sync
/// could end before a test cuts the link.
struct FullSyncUnderWay {
    c: Cluster,
    data: Vec<u8>,
    /// The full sync's size, as the source shows it.
    total: u64,
    /// Alpha's log before the invalidate (see `log_mark`).
    mark: usize,
}

fn full_sync_a_quarter_done(test: &str) -> FullSyncUnderWay {
    let c = pair(test, "", |b| {
        b.backing_size(64 << 20)
            .journal_size("2M")
            // Slow enough that the cut below comes before the end on a loaded machine (at 8M
            // the 24 MiB of data took 3 s, and waiting for the quarter to be durable on the
            // target once outran it).
            .resource_line("resync-rate = \"4M\"")
            .beta_via_proxy()
    });
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let input = c.dir().join("in.bin");
    let data = write_random_file(&input, (24 * MIB) as usize);
    a.nbdcopy_in(&input);
    c.wait_in_sync(SYNC_TIMEOUT);

    let mark = log_mark(a);
    b.ctl_ok(&["invalidate"]);
    let mut total = 0;
    watch(
        &c,
        Duration::from_secs(30),
        "a quarter of the full sync",
        |sa, _| {
            let r = &sa["replication"];
            if r["connection"] == "sync-source" {
                total = u(r, "resync_total");
                u(r, "resync_done") >= total / 4 && total > 0
            } else {
                false
            }
        },
    );
    a.ctl_ok(&["pause-sync"]);
    assert!(
        total >= size - MIB,
        "invalidate should start a full sync of {size} bytes, total {total}"
    );
    FullSyncUnderWay {
        c,
        data,
        total,
        mark,
    }
}

/// A resync target forced primary midway (a resync between two secondaries): the stream
/// stops before the promotion commits, so a client's write on the new primary is never
/// overwritten by a resync record; the two nodes then show a split brain (both moved on from
/// the full sync's generation), which `connect --discard-my-data` on the forced node settles.
#[test]
fn a_resync_target_forced_primary_midway_keeps_its_client_writes_and_is_a_split_brain() {
    let c = pair("out-force-target", "", |b| {
        b.backing_size(64 << 20)
            .journal_size("2M")
            .resource_line("resync-rate = \"6M\"")
    });
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let input = c.dir().join("in.bin");
    let data = write_random_file(&input, (16 * MIB) as usize);
    a.nbdcopy_in(&input);
    c.wait_in_sync(SYNC_TIMEOUT);
    a.ctl_ok(&["secondary"]);
    a.wait_repl(Duration::from_secs(20), "connected as secondaries", |r| {
        r["connection"] == "connected" && r["peer_role"] == "secondary"
    });
    b.ctl_ok(&["invalidate"]);
    b.wait_repl(Duration::from_secs(20), "a part of the resync", |r| {
        r["connection"] == "sync-target" && u(r, "resync_done") >= 4 * MIB
    });
    // Held there (`pause-sync` on its source) while beta is looked at and forced: past the
    // 16 MiB of data, the zero regions go unpaced and the resync could end first.
    a.ctl_ok(&["pause-sync"]);
    // A plain promotion is refused as a partial copy (not only as older data).
    b.assert_primary_refused(&["inconsistent", "wait-sync"], "a resync target");
    // As in DRBD, no invalidate while a resync runs (its end would commit over it).
    let out = b.ctl(&["invalidate"]);
    assert!(
        !out.success() && out.stderr.contains("resync is running"),
        "invalidate on a resync target:\n{}",
        out.describe()
    );
    b.ctl_ok(&["primary", "--force"]);
    a.ctl_ok(&["resume-sync"]);
    // Client writes on the new primary, over regions the resync had not reached yet.
    let mut w = RawNbd::open(b.export(), c.resource());
    let tail = size - 4 * MIB;
    for i in 0..16u64 {
        w.write_at(tail + i * 65536, &[0xA5; 65536], 0)
            .expect("write");
    }
    w.command(CMD_FLUSH, 0, 0, 0).expect("flush");
    w.disconnect();
    std::thread::sleep(Duration::from_secs(3));
    let on_b = b.backing_data(size);
    assert!(
        on_b[tail as usize..(tail + MIB) as usize]
            .iter()
            .all(|&x| x == 0xA5),
        "a client write on the forced primary was overwritten"
    );
    wait_split_brain_reported(a, Duration::from_secs(15));
    wait_split_brain_reported(b, Duration::from_secs(15));

    // Settled by hand: the forced node drops its changes and gets alpha's data back.
    b.ctl_ok(&["secondary"]);
    b.ctl_ok(&["connect", "--discard-my-data"]);
    let seen = wait_synced(&c, Duration::from_secs(60), "after --discard-my-data");
    assert_identical(&c, size, "forced target settled", &seen);
    assert_same_bytes(&b.backing_data(16 * MIB), &data, "beta has alpha's data");
}

/// Review finding: a bitmap resync at one generation (a restarted crashed primary's hot
/// extents; verify's marks are the other case) left the source's generations as they were, so
/// a target forced primary midway moved on with a bitmap generation naming the source's
/// current one, and at the next connect it looked like the newer copy: its data went over the
/// crashed primary's extents with no split brain said. Every resync now counts from a bitmap
/// generation the target takes at its start (as a full sync's did), so the forced target has
/// moved on from where the source's bitmap counts: a split brain, and nothing moves.
#[test]
fn a_target_forced_primary_midway_through_a_bitmap_resync_is_a_split_brain() {
    let c = pair("out-force-bm-target", "", |b| {
        b.backing_size(64 << 20)
            .journal_size("2M")
            .resource_line("resync-rate = \"2M\"")
    });
    let (a, b) = (c.alpha(), c.beta());
    // 2 MiB of data in each of twelve 4 MiB extents: hot in alpha's activity log. (Data, not
    // a block each: zero regions are resynced unpaced, and the resync must still be running
    // when beta is forced primary.)
    let mut w = a.raw_open();
    let chunk = random_bytes(MIB as usize);
    for i in 0..12u64 {
        for j in 0..2u64 {
            w.write_at(i * 4 * MIB + j * MIB, &chunk, 0).expect("write");
        }
    }
    w.command(CMD_FLUSH, 0, 0, 0).expect("flush");
    w.disconnect();
    c.wait_in_sync(SYNC_TIMEOUT);
    Node::kill9_and_wait(a);
    b.wait_not_connected(Duration::from_secs(10));
    // Back as secondary: at the one generation it is the source of its hot extents (24 MiB
    // of data at 2 MiB/s).
    a.up();
    b.wait_repl(
        Duration::from_secs(30),
        "a part of the hot extents' resync",
        |r| r["connection"] == "sync-target" && u(r, "resync_done") >= 2 * MIB,
    );
    b.ctl_ok(&["primary", "--force"]);
    wait_split_brain_reported(a, Duration::from_secs(15));
    wait_split_brain_reported(b, Duration::from_secs(15));
}

/// Review finding: a peer whose disk and metadata are restored from a backup taken two
/// generations ago (its current generation is the older entry of this node's history) was
/// resynced by this node's bitmap, which counts only from the newer one: what changed between
/// the two stayed old on the peer, and both said in sync. A bitmap that is newer than the
/// peer's generation cannot cover the difference: a full sync (as DRBD makes every history
/// match). Alpha restarts between, so its in-memory record of the peer's durable mark (the
/// other guard against a disk that went back in time) is gone.
#[test]
fn a_peer_restored_from_a_backup_two_generations_old_gets_a_full_sync() {
    let c = pair("out-rollback", "", |b| b.journal_size("4M"));
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let write = |at: u64, byte: u8| {
        let mut w = a.raw_open();
        for i in 0..16u64 {
            w.write_at(at + i * 65536, &[byte; 65536], 0)
                .expect("write");
        }
        w.command(CMD_FLUSH, 0, 0, 0).expect("flush");
        w.disconnect();
    };
    // The backup: beta's whole backing file (data and internal metadata), taken while down.
    b.down();
    let backup = c.dir().join("beta-backup.img");
    std::fs::copy(b.backing_path(), &backup).expect("backup");
    // Alpha moves on alone (a new generation), beta catches up by resync; then alpha moves
    // on alone again.
    write(8 * MIB, 0x11);
    b.up();
    c.wait_in_sync(SYNC_TIMEOUT);
    wait_same_generation(&c);
    b.down();
    write(40 * MIB, 0x22);
    // Alpha restarts (as a secondary), and beta comes back from the backup.
    a.down();
    a.up();
    std::fs::copy(&backup, b.backing_path()).expect("restore");
    b.up();
    let seen = wait_synced(&c, Duration::from_secs(60), "after the restore");
    assert_identical(&c, size, "a peer restored from an old backup", &seen);
    let first = b.backing_data(9 * MIB);
    assert!(
        first[8 * MIB as usize..].iter().all(|&x| x == 0x11),
        "beta lacks what changed between its backup and the generation after"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Application writes to the regions being resynced.

#[test]
fn resync_with_concurrent_writes_to_the_same_regions() {
    let Some(py) = python() else { return };
    // 16 MiB at 2 MiB/s: 8 s of resync, for two python writers (a second or two each on a
    // loaded machine) to run during.
    let c = pair("out-resync-writes", "", |b| {
        b.journal_size("2M")
            .resource_line("resync-rate = \"2M\"")
            .beta_via_proxy()
    });
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let dir = c.dir().path();
    let mut rng = XorShift::new(seed());
    let all: Vec<u64> = (0..4096).collect();
    write_blocks(&py, dir, &a.uri(), 1, &all);
    c.wait_in_sync(SYNC_TIMEOUT);

    assert!(c.proxy().cut_and_refuse() >= 1);
    a.wait_not_connected(Duration::from_secs(10));
    write_blocks(&py, dir, &a.uri(), 2, &all);
    assert_eq!(a.repl_u64("out_of_sync"), 4096 * BLK);

    c.proxy().resume();
    let r = a.wait_repl(Duration::from_secs(20), "resyncing", |r| {
        r["connection"] == "sync-source" && u(r, "resync_done") < u(r, "resync_total") / 2
    });
    println!("resync under way: {r}");
    // Writes ahead of and behind the resync cursor, in random order, twice over a subset.
    let mut s3: Vec<u64> = (0..4096).step_by(3).collect();
    shuffle(&mut rng, &mut s3);
    write_blocks(&py, dir, &a.uri(), 3, &s3);
    let mut s4: Vec<u64> = (0..4096).step_by(6).collect();
    shuffle(&mut rng, &mut s4);
    write_blocks(&py, dir, &a.uri(), 4, &s4);
    let r = a.repl();
    println!("after the application writes: {r}");
    assert!(
        r["connection"] != "connected" || u(&r, "out_of_sync") > 0,
        "the resync ended before the application writes did; lower resync-rate: {r}"
    );
    if r["connection"] != "sync-source" {
        println!(
            "note: the link dropped during the resync with application writes: {}",
            r["last_error"]
        );
    }

    wait_synced(&c, Duration::from_secs(40), "after the resync with writes");
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_replicas_identical(size, "resync with concurrent writes");
    let want: BTreeMap<u64, u64> = all
        .iter()
        .map(|&x| {
            let t = if x % 6 == 0 {
                4
            } else if x % 3 == 0 {
                3
            } else {
                2
            };
            (x, t)
        })
        .collect();
    check_tags(&a.backing_data(size), &want, "alpha");
    check_tags(&b.backing_data(size), &want, "beta");
}

// ---------------------------------------------------------------------------------------------
// 8. invalidate: the secondary throws its data away and fetches all of it.

#[test]
fn invalidate_secondary_full_resync() {
    let c = pair("out-invalidate", "", |b| b.journal_size("4M"));
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let n = 24 * MIB;
    let input = c.dir().join("in.bin");
    let data = write_random_file(&input, n as usize);
    a.nbdcopy_in(&input);
    c.wait_in_sync(SYNC_TIMEOUT);

    // The secondary's disk goes bad behind the daemon's back.
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(b.backing_path())
            .unwrap();
        for (off, len) in [(MIB, 4096usize), (10 * MIB, 65536), (size - 8192, 8192)] {
            f.seek(SeekFrom::Start(off)).unwrap();
            f.write_all(&random_bytes(len)).unwrap();
        }
        f.sync_all().unwrap();
    }
    assert!(
        first_difference(a.backing_path(), b.backing_path(), size).is_some(),
        "corruption did not take"
    );

    let out = a.ctl(&["invalidate"]);
    assert!(
        !out.success(),
        "invalidate on the primary must be refused:\n{}",
        out.describe()
    );
    let sent0 = a.repl_u64("bytes_sent");
    let marks = (log_mark(a), log_mark(b));
    b.ctl_ok(&["invalidate"]);
    let seen = wait_synced(&c, Duration::from_secs(40), "after invalidate");
    assert_identical(&c, size, "after invalidate", &seen);
    println!("states seen: {seen:?}");
    assert!(
        resynced(a, marks.0, b, marks.1),
        "no resync was logged after invalidate: {seen:?}"
    );
    let sent = a.repl_u64("bytes_sent") - sent0;
    println!("full resync sent {sent} bytes for {n} bytes of data");
    assert!(
        sent >= n,
        "a full resync must send all {n} non-zero bytes; sent {sent}"
    );
    assert!(
        sent <= n * 3 / 2 + 4 * MIB,
        "the full resync sent {sent} bytes for {n} bytes of non-zero data"
    );
    c.assert_replicas_identical(size, "after invalidate");
    assert_same_bytes(&b.backing_data(n), &data, "beta's data after invalidate");
    wait_same_generation(&c);
}

/// `connect --discard-my-data` on the node with the newer data, when there is no split brain
/// (the other node wrote nothing since they parted): as in DRBD, the flag settles only a split
/// brain, so the generations decide and the newer node stays the source. Before (found by an
/// admin trial), it made that node the target and its acknowledged writes were overwritten on
/// both nodes. A forced promotion after the flag also drops it.
#[test]
fn discard_my_data_without_a_split_brain_keeps_the_newer_data() {
    let c = pair("out-discard-nosb", "", |b| {
        b.backing_size(64 << 20).journal_size("4M")
    });
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    // Alpha goes standalone and writes nothing more; beta takes over and writes. (The
    // disconnect lets beta make alpha's last writes durable first, so alpha's data does not
    // count as diverged: without that, this was a split brain too.)
    a.ctl_ok(&["disconnect"]);
    a.ctl_ok(&["secondary"]);
    b.ctl_ok(&["primary", "--force"]);
    let newer = random_bytes(MIB as usize);
    {
        let mut r = b.raw_open();
        r.write_at(2 * MIB, &newer, 0).expect("beta's write");
        r.command(CMD_FLUSH, 0, 0, 0).expect("flush");
        r.disconnect();
    }
    b.ctl_ok(&["secondary"]);
    // The admin asks beta to discard, though alpha has nothing beta lacks.
    b.ctl_ok(&["connect", "--discard-my-data"]);
    a.ctl_ok(&["connect"]);
    let seen = wait_synced(&c, Duration::from_secs(30), "after the reconnect");
    assert!(
        Seen::has(&seen.beta, "sync-source") || !Seen::has(&seen.beta, "sync-target"),
        "beta, with the newer data, must not be the target: {seen:?}"
    );
    assert_same_bytes(
        &b.backing_data(3 * MIB)[2 * MIB as usize..],
        &newer,
        "beta kept its acknowledged write",
    );
    c.assert_replicas_identical(size, "after the reconnect");
    assert!(
        !log_lines(b, "discard-my-data is not used").is_empty(),
        "beta's log does not say the flag was not used:\n{}",
        b.log_tail(20)
    );

    // A flag set while the peer is away, then a forced promotion and writes: dropped at the
    // promotion. Alpha moves on too, so the next connect is a split brain, which a flag left
    // pending would settle against beta's writes: it must be reported instead.
    a.ctl_ok(&["down"]);
    b.ctl_ok(&["connect", "--discard-my-data"]);
    let out = b.ctl_ok(&["primary", "--force"]).stdout;
    assert!(
        out.contains("the pending `connect --discard-my-data` is dropped"),
        "the promotion does not say it drops the flag:\n{out}"
    );
    let later = random_bytes(MIB as usize);
    {
        let mut r = b.raw_open();
        r.write_at(5 * MIB, &later, 0).expect("beta's later write");
        r.command(CMD_FLUSH, 0, 0, 0).expect("flush");
        r.disconnect();
    }
    let out = b.ctl_ok(&["secondary"]).stdout;
    assert!(
        out.contains("the peer lacks writes of this node"),
        "the demotion does not say alpha lacks beta's writes:\n{out}"
    );
    b.ctl_ok(&["disconnect"]);
    a.up();
    a.ctl_ok(&["primary", "--force"]);
    let alphas = random_bytes(MIB as usize);
    {
        let mut r = a.raw_open();
        r.write_at(8 * MIB, &alphas, 0)
            .expect("alpha's write while apart");
        r.command(CMD_FLUSH, 0, 0, 0).expect("flush");
        r.disconnect();
    }
    a.ctl_ok(&["secondary"]);
    b.ctl_ok(&["connect"]);
    let rb = wait_split_brain_reported(b, Duration::from_secs(15));
    println!("beta: {rb}");
    std::thread::sleep(Duration::from_secs(2));
    assert_same_bytes(
        &b.backing_data(6 * MIB)[5 * MIB as usize..],
        &later,
        "beta kept its write through the split brain",
    );
    assert_same_bytes(
        &a.backing_data(9 * MIB)[8 * MIB as usize..],
        &alphas,
        "alpha kept its write through the split brain",
    );
}

/// The resync handlers come in pairs, as DRBD's do (a `before-resync-target` that takes a
/// snapshot and an `after-resync-target` that drops it): both run for a resync, neither for
/// the journal catch-up that follows a switchover.
#[test]
fn resync_handlers_run_in_pairs_and_not_for_a_journal_catch_up() {
    let tmp = TestDir::new("out-handler-pairs");
    let (handlers, hlog) = handler_table(tmp.path());
    let c = pair("out-handler-pairs", &handlers, |b| {
        b.backing_size(64 << 20).journal_size("8M")
    });
    let (a, b) = (c.alpha(), c.beta());
    let r = c.resource().to_string();
    let count = |node: &str, event: &str| -> usize {
        std::fs::read_to_string(&hlog)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(&format!("{node} {r} {event} ")))
            .count()
    };
    let pairs = |n: usize| {
        count("alpha", "before-resync-source") == n
            && count("alpha", "after-resync-source") == n
            && count("beta", "before-resync-target") == n
            && count("beta", "after-resync-target") == n
    };
    // The initial full sync: one pair on each side.
    assert!(
        wait_for(Duration::from_secs(10), || pairs(1)),
        "the initial sync's handlers:\n{}",
        std::fs::read_to_string(&hlog).unwrap_or_default()
    );

    // An outage shorter than the journal: alpha writes on alone (a new data generation),
    // and beta catches up from the journal.
    b.ctl_ok(&["disconnect"]);
    a.wait_not_connected(CONNECT_TIMEOUT);
    let f = c.dir().path().join("outage");
    write_random_file(&f, 1 << 20);
    a.nbdcopy_in(&f);
    b.ctl_ok(&["connect"]);
    c.wait_in_sync(SYNC_TIMEOUT);
    assert!(
        log_lines(b, "catch").len() + log_lines(a, "journal").len() > 0,
        "no journal catch-up logged\n{}",
        a.log_tail(20)
    );
    std::thread::sleep(Duration::from_secs(1));
    let text = std::fs::read_to_string(&hlog).unwrap_or_default();
    assert!(
        pairs(1),
        "resync handlers ran for a journal catch-up:\n{text}"
    );

    // A switchover, then writes on beta that alpha catches up on from the journal.
    a.ctl_ok(&["secondary"]);
    b.ctl_ok(&["primary"]);
    let f = c.dir().path().join("data");
    write_random_file(&f, 2 << 20);
    b.nbdcopy_in(&f);
    b.wait_repl(SYNC_TIMEOUT, "caught up", |r| {
        r["connection"] == "connected"
            && r["lag_writes"] == 0
            && r["out_of_sync"] == 0
            && r["seq_applied"] == r["seq_written"]
    });
    std::thread::sleep(Duration::from_secs(1));
    let text = std::fs::read_to_string(&hlog).unwrap_or_default();
    assert!(
        pairs(1),
        "resync handlers ran for a journal catch-up:\n{text}"
    );
    for ev in ["before-resync-source", "after-resync-source"] {
        assert_eq!(count("beta", ev), 0, "{text}");
    }
    for ev in ["before-resync-target", "after-resync-target"] {
        assert_eq!(count("alpha", ev), 0, "{text}");
    }
}

/// A half-synced node is never a resync source (DRBD: "I shall become SyncSource, but I am
/// inconsistent!"): alpha, the primary of a full sync into beta, loses its disk midway and
/// comes back on a fresh one (`create-md`, as the runbook says for a replaced disk). The
/// generations make beta (with data) the source of alpha (just created), but beta holds a
/// quarter of the data: the connect is refused on both nodes with the reason, nothing moves,
/// and neither disk is declared up to date. Before, beta synced its partial copy into alpha
/// and both ended "up to date" without the rest. The admin's way out stays: a forced
/// promotion of beta makes its data the good copy, and alpha then takes it.
#[test]
fn an_inconsistent_disk_is_never_a_resync_source() {
    let FullSyncUnderWay { c, .. } = full_sync_a_quarter_done("out-inconsistent-source");
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    assert!(c.proxy().cut_and_refuse() >= 1, "no live link to cut");
    a.wait_not_connected(Duration::from_secs(10));
    assert_eq!(b.status_json()["disk"], "inconsistent");

    // Alpha's disk is replaced: a new, empty one with fresh metadata.
    a.ctl_ok(&["down", "--force"]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(a.backing_path())
        .expect("open alpha's disk");
    let len = f.metadata().expect("stat").len();
    f.set_len(0)
        .and_then(|()| f.set_len(len))
        .expect("a new empty disk");
    drop(f);
    a.create_md();
    a.up();
    let mark = (log_mark(a), log_mark(b));
    c.proxy().resume();

    let said = |n: &Node, from: usize| {
        log_since(n, from)
            .into_iter()
            .any(|l| l.contains("would be the resync source") && l.contains("inconsistent"))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(said(a, mark.0) && said(b, mark.1)) {
        assert!(
            Instant::now() < deadline,
            "no refusal of the half-synced source on both nodes:\nalpha:\n{}\nbeta:\n{}",
            a.log_tail(15),
            b.log_tail(15)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A few more retries: still nothing moves, and neither disk is up to date.
    std::thread::sleep(Duration::from_secs(3));
    for n in [a, b] {
        let st = n.status_json();
        assert_eq!(st["disk"], "inconsistent", "{}: {st}", n.name());
        assert_ne!(st["replication"]["connection"], "sync-source", "{st}");
        assert_ne!(st["replication"]["connection"], "sync-target", "{st}");
    }
    let why = b.repl()["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        why.contains("primary --force"),
        "beta's status should say the way out: {why}"
    );
    a.assert_primary_refused(&["inconsistent"], "a fresh disk beside a half-synced one");

    // The admin takes beta's partial data as the good copy; alpha takes all of it.
    b.primary_force();
    let seen = wait_synced(&c, Duration::from_secs(60), "alpha from the forced beta");
    assert_identical(&c, size, "alpha synced from beta's data", &seen);
    assert_eq!(a.status_json()["disk"], "up-to-date");
}

/// `invalidate-remote` (DRBD's) on the primary: a secondary whose disk was damaged behind the
/// pair's back (nothing in any bitmap names it) is resynced in full from the primary, shows
/// inconsistent while that runs, and ends byte-identical. Refused where it would do harm: on
/// a secondary, and without a connected peer.
#[test]
fn invalidate_remote_resyncs_a_damaged_secondary_in_full_from_the_primary() {
    use std::os::unix::fs::FileExt;
    let c = pair("out-inval-remote", "", |b| {
        b.backing_size(64 << 20)
            .journal_size("2M")
            .resource_line("resync-rate = \"16M\"")
    });
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let input = c.dir().join("in.bin");
    let data = write_random_file(&input, (16 * MIB) as usize);
    a.nbdcopy_in(&input);
    c.wait_in_sync(SYNC_TIMEOUT);

    // Damage on beta's disk that no bitmap knows of.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(b.backing_path())
        .expect("open beta's backing");
    for off in [0, 5 * MIB + 512, 15 * MIB] {
        f.write_all_at(&[0x5A; 4096], off).expect("damage");
    }
    f.sync_all().expect("fsync");
    drop(f);
    assert!(
        first_difference(a.backing_path(), b.backing_path(), size).is_some(),
        "the damage did not make the replicas differ"
    );

    let out = b.ctl(&["invalidate-remote"]);
    assert!(
        !out.success() && out.all_output().contains("runs on the primary"),
        "invalidate-remote on the secondary:\n{}",
        out.describe()
    );

    let mark = log_mark(a);
    // The resync starts paused (`pause-sync`), so that its states are seen for sure: 16 MiB
    // of data, then zero regions, unpaced, can be over between two polls.
    a.ctl_ok(&["pause-sync"]);
    let out = a.ctl_ok(&["invalidate-remote"]).stdout;
    assert!(out.contains("beta invalidated"), "{out}");
    let mut total = 0;
    let mut target_inconsistent = false;
    watch(
        &c,
        Duration::from_secs(30),
        "the paused full resync",
        |sa, sb| {
            let r = &sa["replication"];
            if r["connection"] == "sync-source" {
                total = total.max(u(r, "resync_total"));
            }
            if sb["replication"]["connection"] == "sync-target" && sb["disk"] == "inconsistent" {
                target_inconsistent = true;
            }
            total > 0 && target_inconsistent
        },
    );
    a.ctl_ok(&["resume-sync"]);
    let seen = wait_synced(&c, Duration::from_secs(60), "the full resync");
    assert!(
        total >= size - MIB,
        "invalidate-remote should resync all {size} bytes, the source showed {total}: {seen:?}"
    );
    assert!(
        target_inconsistent,
        "beta never showed inconsistent while it was the target: {seen:?}"
    );
    assert_identical(&c, size, "after invalidate-remote", &seen);
    assert_eq!(&b.backing_data(data.len() as u64)[..], &data[..]);
    assert!(
        log_since(a, mark)
            .iter()
            .any(|l| l.contains("invalidate-remote: all")),
        "alpha's log does not say why it resynced in full"
    );

    // Without the peer there is nothing to invalidate now (its next connect resyncs what it
    // lacks anyway).
    b.ctl_ok(&["disconnect"]);
    a.wait_not_connected(Duration::from_secs(10));
    let out = a.ctl(&["invalidate-remote"]);
    assert!(
        !out.success() && out.all_output().contains("not connected"),
        "invalidate-remote without a peer:\n{}",
        out.describe()
    );
}

/// A u64 as postcard encodes it (LEB128).
fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// The generation ids alpha logged at its last connect ("generations: this node current X
/// bitmap Y history H0 H1, ..."), as they travel in its frames (the peer's `GenIds`: the
/// four ids and no unacknowledged SyncDone).
fn gen_ids_on_the_wire(line: &str) -> Vec<u8> {
    let mine = line
        .split("this node ")
        .nth(1)
        .and_then(|r| r.split(", peer").next())
        .unwrap_or_else(|| panic!("no generations in {line:?}"));
    let w: Vec<&str> = mine.split_whitespace().collect();
    let hex = |s: &str| u64::from_str_radix(s, 16).unwrap_or_else(|e| panic!("{s:?}: {e}"));
    assert_eq!(
        (w[0], w[2], w[4]),
        ("current", "bitmap", "history"),
        "{line}"
    );
    let mut out = Vec::new();
    for id in [hex(w[1]), hex(w[3]), hex(w[5]), hex(w[6]), 0] {
        varint(id, &mut out);
    }
    out
}

/// A resync whose end the target commits but whose acknowledgement the source never hears:
/// the proxy holds beta's replies from the moment alpha's SyncDone passes (its generation
/// ids, the same bytes as in the handshake, watched for once the resync runs), then the link
/// is cut. Then two failovers of the source alone (`secondary`, `primary --force`, twice,
/// with writes), which push the target's generation out of the source's two-entry history.
/// The source remembers (on disk, superblock format 6) where its unacknowledged SyncDone left
/// the target: the next connect is a bitmap resync from it, not a split brain, and the
/// replicas end identical with every write.
#[test]
fn a_lost_resync_end_acknowledgement_then_two_failovers_is_a_bitmap_resync() {
    let Some(py) = python() else { return };
    let c = Cluster::builder("lost-sync-done-ack")
        .nodes(2)
        .backing_size(128 << 20)
        .journal_size("4M")
        .resource_line("resync-rate = \"2M\"")
        .beta_via_proxy()
        .build();
    c.start_pair();
    c.wait_in_sync(SYNC_TIMEOUT);
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let dir = c.dir().path();

    // Away for longer than the journal holds (6 MiB against 4): a bitmap resync follows.
    assert!(c.proxy().cut_and_refuse() >= 1, "no live link to cut");
    a.wait_not_connected(Duration::from_secs(10));
    let outage: Vec<u64> = (4096..4096 + 1536).collect();
    write_blocks(&py, dir, &a.uri(), 1, &outage);
    let mark = log_mark(a);
    c.proxy().resume();
    let mut line = None;
    let connected = wait_for(Duration::from_secs(20), || {
        line = log_since(a, mark)
            .into_iter()
            .find(|l| l.contains("generations: this node current"));
        line.is_some()
    });
    assert!(connected, "alpha never connected:\n{}", a.log_tail(20));
    let needle = gen_ids_on_the_wire(&line.unwrap_or_default());
    c.proxy().pause_inbound_at(&needle);
    let r = a.repl();
    assert!(
        r["connection"] == "sync-source" && u(&r, "resync_done") < u(&r, "resync_total"),
        "the resync must still be running when the proxy starts watching: {r}"
    );
    let took = wait_for(Duration::from_secs(20), || {
        b.status_json()["disk"] == "up-to-date"
    });
    assert!(
        took,
        "beta never committed the resync's end: {}",
        b.status_json()
    );
    assert!(
        c.proxy().needle_seen(),
        "beta took the end without alpha's SyncDone passing"
    );
    assert!(c.proxy().cut_and_refuse() >= 1, "no live link to cut");
    c.proxy().unpause_inbound();
    a.wait_not_connected(Duration::from_secs(10));
    assert!(
        !log_since(a, mark).iter().any(|l| l.contains("resync done")),
        "alpha heard the resync's end acknowledged after all:\n{}",
        log_since(a, mark).join("\n")
    );

    // Two failovers of alpha alone, each with writes.
    let mut want: BTreeMap<u64, u64> = outage.iter().map(|b| (*b, 1)).collect();
    for round in 0..2u64 {
        a.ctl_ok(&["secondary"]);
        a.ctl_ok(&["primary", "--force"]);
        let blocks: Vec<u64> = (0..64).map(|i| 8192 + round * 64 + i).collect();
        write_blocks(&py, dir, &a.uri(), 2 + round, &blocks);
        want.extend(blocks.iter().map(|b| (*b, 2 + round)));
    }
    let dump = a.ctl_ok(&["dump-md"]).stdout;
    assert!(dump.contains("sync-done-unacked"), "{dump}");

    let (ma, mb) = (log_mark(a), log_mark(b));
    c.proxy().resume();
    c.wait_in_sync(Duration::from_secs(60));
    let la = log_since(a, ma);
    assert!(
        la.iter().any(|l| l.contains(
            "the peer took the end of the last resync, which this node never heard acknowledged"
        )),
        "alpha did not resync beta as the target its SyncDone left:\n{}",
        la.join("\n")
    );
    for (n, m) in [(a, ma), (b, mb)] {
        let l = log_since(n, m);
        assert!(
            !l.iter()
                .any(|l| l.to_lowercase().contains("split brain") || l.contains("unrelated")),
            "{}:\n{}",
            n.name(),
            l.join("\n")
        );
    }
    c.assert_replicas_identical(size, "after a lost resync-end acknowledgement");
    check_tags(&b.backing_data(size), &want, "beta after the bitmap resync");
}

/// A device whose dirty bitmap is larger than a link frame (2 TiB at 4 KiB a bit: a 64 MiB
/// bitmap, where a frame carries 32 MiB) comes up, and the bitmap a crashed primary brings
/// back to the new primary crosses the link in parts, run-length coded: its hot extents at
/// both ends of the device are resynced from the new primary, and nothing else (a full sync
/// of 2 TiB would not end within the test's time).
#[test]
fn a_crashed_primarys_bitmap_of_a_two_tib_device_crosses_in_parts() {
    let c = Cluster::builder("out-big-bitmap")
        .nodes(2)
        .backing_size(2 << 40)
        .protocol("C")
        .build();
    let (a, b) = (c.alpha(), c.beta());
    a.create_md();
    b.create_md();
    a.up();
    b.up();
    a.wait_connected(CONNECT_TIMEOUT);
    b.wait_connected(CONNECT_TIMEOUT);
    // Two new sparse files: identical, no initial sync.
    a.ctl_ok(&["new-current-uuid", "--clear-bitmap"]);
    a.wait_connected(CONNECT_TIMEOUT);
    b.wait_connected(CONNECT_TIMEOUT);
    a.ctl_ok(&["primary"]);
    let size = a.size();
    assert!(size > 1 << 40, "export of {size} bytes");
    // One MiB near the start and one in the device's last extent: the first and the last
    // part of the bitmap.
    let spots = [1u64 << 30, (size - 2 * MIB) / BLK * BLK];
    let data: Vec<Vec<u8>> = spots.iter().map(|_| random_bytes(MIB as usize)).collect();
    {
        let mut r = a.raw_open();
        for (&off, d) in spots.iter().zip(&data) {
            r.write_at(off, d, 0)
                .unwrap_or_else(|e| panic!("NBD write at {off}: errno {e}"));
        }
        r.command(CMD_FLUSH, 0, 0, 0)
            .unwrap_or_else(|e| panic!("NBD flush: errno {e}"));
        r.disconnect();
    }
    // At once: under C the flush's reply means beta has both writes on disk, and the two
    // extents go cold (out of alpha's activity log) after a quiet cooling round or two.
    a.kill9_and_wait();
    b.ctl_ok(&["primary", "--force"]);
    // What a crash leaves on the old primary's disk inside its hot extents: writes beta
    // never got (put there directly: alpha's daemon is dead).
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(a.backing_path())
            .expect("alpha's backing file");
        for &off in &spots {
            f.write_all_at(&vec![0xEE; MIB as usize], off)
                .expect("alpha's unreplicated write");
        }
        f.sync_all().expect("sync");
    }
    let (ma, mb) = (log_mark(a), log_mark(b));
    a.up();
    let done = wait_for(Duration::from_secs(120), || {
        // A full sync of 2 TiB would fill the test machine's disk: stop at once.
        let sizes = resync_sizes(&log_since(b, mb));
        assert!(
            sizes.iter().all(|&s| s <= 64 * MIB),
            "beta resyncs {sizes:?} bytes: more than alpha's hot extents"
        );
        resynced(b, mb, a, ma) && {
            let r = b.status_json()["replication"].clone();
            r["connection"] == "connected" && r["out_of_sync"] == 0
        }
    });
    assert!(
        done,
        "beta never resynced alpha's hot extents; beta's log since alpha's restart:\n{}\nalpha's:\n{}",
        log_since(b, mb).join("\n"),
        log_since(a, ma).join("\n")
    );
    for (&off, d) in spots.iter().zip(&data) {
        use std::os::unix::fs::FileExt;
        for n in [a, b] {
            let mut got = vec![0u8; MIB as usize];
            std::fs::File::open(n.backing_path())
                .and_then(|f| f.read_exact_at(&mut got, off))
                .unwrap_or_else(|e| panic!("{}'s backing at {off}: {e}", n.name()));
            assert_same_bytes(&got, d, &format!("{}'s data at {off}", n.name()));
        }
    }
    let sizes = resync_sizes(&log_since(b, mb));
    assert!(
        !sizes.is_empty() && sizes.iter().all(|&s| s <= 64 * MIB),
        "beta's resyncs were {sizes:?} bytes: more than alpha's hot extents"
    );
    assert!(
        crashed_al_bytes(&log_since(a, ma)).is_some(),
        "alpha marked no hot extents at its restart"
    );
    a.down();
    b.down();
}
