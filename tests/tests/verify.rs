//! Checksum-based resync (`csums = true`), online verify (`blockrep-ctl verify`) and the resync
//! rate floor (`resync-rate-min`), issue 4.
//!
//! Real daemons, real TCP (the harness's proxy in front of beta where the link is cut), python3 and
//! libnbd for known block patterns. Replicas are compared through their backing files: the
//! first `size` bytes are the exported data.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockrep_e2e::blocks::*;
use blockrep_e2e::watch::*;
use blockrep_e2e::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const BLK: u64 = 4096;

// ---------------------------------------------------------------------------------------------
// Helpers (the tagged-block writer and checks are in the harness: blockrep_e2e::blocks).

fn seed() -> u64 {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        ^ u64::from(std::process::id());
    println!("seed {s}");
    s
}

fn shuffle(rng: &mut XorShift, v: &mut [u64]) {
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} is not a number in {v}"))
}

fn log_lines(n: &Node, needle: &str) -> Vec<String> {
    std::fs::read(n.log_path())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// A two-node cluster (128 MiB backing), the pair started (alpha primary) and synced.
fn pair(test: &str, f: impl FnOnce(ClusterBuilder) -> ClusterBuilder) -> Cluster {
    let c = f(Cluster::builder(test).nodes(2).backing_size(128 << 20)).build();
    c.start_pair();
    c.wait_in_sync(SYNC_TIMEOUT);
    c
}

/// Cuts the link (the harness proxy in front of beta) and waits until alpha sees it down.
fn cut(c: &Cluster) {
    assert!(c.proxy().cut_and_refuse() >= 1, "no live link to cut");
    c.alpha().wait_not_connected(Duration::from_secs(10));
}

/// `verify` on `n`: (regions, bytes) from its last line `verify: N regions (B bytes) differ`.
fn run_verify(n: &Node) -> (u64, u64, String) {
    let out = n.ctl_timeout(&["verify"], Duration::from_secs(120));
    // 0: the replicas are the same; 2: regions differ (for cron and monitoring).
    assert!(
        matches!(out.code, Some(0 | 2)),
        "verify failed:\n{}\n--- log ---\n{}",
        out.describe(),
        n.log_tail(30)
    );
    let line = out
        .stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("verify: "))
        .unwrap_or_else(|| panic!("no `verify:` line in:\n{}", out.describe()))
        .to_string();
    let words: Vec<&str> = line.split_whitespace().collect();
    let regions: u64 = words[1].parse().expect("region count");
    let bytes: u64 = words[3]
        .trim_start_matches('(')
        .parse()
        .expect("byte count");
    assert_eq!(
        out.code,
        Some(if regions > 0 { 2 } else { 0 }),
        "verify's exit code for {regions} differing regions\n{}",
        out.describe()
    );
    (regions, bytes, line)
}

/// Overwrites `data` at `offset` of a node's backing file behind the daemon's back.
fn pwrite_backing(n: &Node, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(n.backing_path())
        .expect("open backing");
    f.write_all_at(data, offset).expect("pwrite backing");
    f.sync_all().expect("fsync backing");
}

// ---------------------------------------------------------------------------------------------
// 1. Checksum resync.

/// The bitmap says 8 MiB are dirty (rewritten while the link was cut, beyond the 2 MiB
/// journal), but the data was rewritten with exactly what both sides had: checksum resync
/// moves hashes and "equal" records, not the data.
#[test]
fn checksum_resync_moves_almost_nothing_when_data_is_equal() {
    let Some(py) = python() else { return };
    let c = pair("csum-equal", |b| {
        b.journal_size("2M")
            .resource_line("csums = true")
            .beta_via_proxy()
    });
    let a = c.alpha();
    let size = a.size();
    let dir = c.dir().path();
    let blocks: Vec<u64> = (0..2048).collect();
    write_blocks(&py, dir, &a.uri(), 1, &blocks);
    c.wait_in_sync(SYNC_TIMEOUT);

    cut(&c);
    let sent0 = a.repl_u64("bytes_sent");
    // The same content again: dirty in the bitmap, equal on both sides.
    write_blocks(&py, dir, &a.uri(), 1, &blocks);
    let dirty = a.repl_u64("out_of_sync");
    assert_eq!(dirty, 2048 * BLK, "out_of_sync after rewriting 8 MiB");

    c.proxy().resume();
    let seen = wait_synced(&c, Duration::from_secs(40), "checksum resync of equal data");
    c.wait_in_sync(SYNC_TIMEOUT);
    let sent = a.repl_u64("bytes_sent") - sent0;
    println!(
        "equal data: dirty {dirty} bytes, sent {sent} bytes ({:.4}x); states {seen:?}",
        sent as f64 / dirty as f64
    );
    assert!(
        sent * 50 < dirty,
        "checksum resync of equal data sent {sent} bytes for {dirty} dirty bytes (>= 2%)"
    );
    let lines = log_lines(a, "checksum resync: ");
    println!("{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("{dirty} equal (not sent), 0 sent as data"))),
        "alpha's log does not report {dirty} bytes equal: {lines:?}"
    );
    c.assert_replicas_identical(size, "after a checksum resync of equal data");
}

/// Mixed: some blocks rewritten with the same data, some with new data, some zeroed data
/// regions: exactly the changed blocks travel as data, and the replicas end identical.
#[test]
fn checksum_resync_sends_only_the_differing_blocks() {
    let Some(py) = python() else { return };
    let c = pair("csum-mixed", |b| {
        b.journal_size("2M")
            .resource_line("csums = true")
            .beta_via_proxy()
    });
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let dir = c.dir().path();
    let mut rng = XorShift::new(seed());
    let base: Vec<u64> = (0..4096).collect();
    write_blocks(&py, dir, &a.uri(), 1, &base);
    c.wait_in_sync(SYNC_TIMEOUT);

    cut(&c);
    let sent0 = a.repl_u64("bytes_sent");
    // Every base block rewritten with the same data (dirty but equal), then 1 in 8 (scattered)
    // with new data, and 64 blocks beyond the base data written for the first time.
    write_blocks(&py, dir, &a.uri(), 1, &base);
    let mut changed: Vec<u64> = base
        .iter()
        .copied()
        .filter(|_| rng.next_u64().is_multiple_of(8))
        .collect();
    changed.extend(8192..8256);
    shuffle(&mut rng, &mut changed);
    write_blocks(&py, dir, &a.uri(), 2, &changed);
    let dirty = a.repl_u64("out_of_sync");
    let changed_bytes = changed.len() as u64 * BLK;
    assert_eq!(dirty, (4096 + 64) * BLK);

    c.proxy().resume();
    let seen = wait_synced(&c, Duration::from_secs(40), "checksum resync, mixed");
    c.wait_in_sync(SYNC_TIMEOUT);
    let sent = a.repl_u64("bytes_sent") - sent0;
    println!(
        "mixed: dirty {dirty}, changed {changed_bytes} ({} blocks), sent {sent} ({:.3}x of changed, {:.3}x of dirty); states {seen:?}",
        changed.len(),
        sent as f64 / changed_bytes as f64,
        sent as f64 / dirty as f64
    );
    println!("{:?}", log_lines(a, "checksum resync: "));
    assert!(
        sent >= changed_bytes,
        "sent {sent} < the {changed_bytes} changed bytes"
    );
    assert!(
        sent <= changed_bytes * 11 / 10 + 64 * 1024,
        "checksum resync sent {sent} bytes for {changed_bytes} changed bytes (> 1.1x + 64 KiB)"
    );
    c.assert_replicas_identical(size, "after a mixed checksum resync");
    let mut want: BTreeMap<u64, u64> = base.iter().map(|b| (*b, 1)).collect();
    for x in &changed {
        want.insert(*x, 2);
    }
    check_tags(
        &b.backing_data(size),
        &want,
        "beta after the checksum resync",
    );
}

/// Application writes hit the regions while the checksum resync decides them: stale data must
/// never win, whether a region was found equal or sent.
#[test]
fn checksum_resync_with_concurrent_writes_to_the_same_regions() {
    let Some(py) = python() else { return };
    let c = pair("csum-writes", |b| {
        b.journal_size("2M")
            .resource_line("csums = true")
            .resource_line("resync-rate = \"6M\"")
            .beta_via_proxy()
    });
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let dir = c.dir().path();
    let mut rng = XorShift::new(seed());
    let all: Vec<u64> = (0..4096).collect();
    write_blocks(&py, dir, &a.uri(), 1, &all);
    c.wait_in_sync(SYNC_TIMEOUT);

    cut(&c);
    // Half the blocks equal (rewritten as they were), half changed.
    write_blocks(&py, dir, &a.uri(), 1, &all[..2048]);
    write_blocks(&py, dir, &a.uri(), 2, &all[2048..]);
    c.proxy().resume();
    let r = a.wait_repl(Duration::from_secs(20), "resyncing", |r| {
        r["connection"] == "sync-source"
    });
    println!("resync under way: {r}");
    let mut s3: Vec<u64> = (0..4096).step_by(3).collect();
    shuffle(&mut rng, &mut s3);
    write_blocks(&py, dir, &a.uri(), 3, &s3);
    let mut s4: Vec<u64> = (0..4096).step_by(5).collect();
    shuffle(&mut rng, &mut s4);
    write_blocks(&py, dir, &a.uri(), 4, &s4);
    let r = a.repl();
    println!("after the application writes: {r}");
    if r["connection"] != "sync-source" {
        println!("note: the resync ended before the application writes did: {r}");
    }
    wait_synced(&c, Duration::from_secs(40), "checksum resync with writes");
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_replicas_identical(size, "checksum resync with concurrent writes");
    let want: BTreeMap<u64, u64> = all
        .iter()
        .map(|&x| {
            let t = if x % 5 == 0 {
                4
            } else if x % 3 == 0 {
                3
            } else if x >= 2048 {
                2
            } else {
                1
            };
            (x, t)
        })
        .collect();
    check_tags(&a.backing_data(size), &want, "alpha");
    check_tags(&b.backing_data(size), &want, "beta");
}

// ---------------------------------------------------------------------------------------------
// 2. Online verify.

/// Blocks changed behind the replicator's back on the secondary's backing file: verify finds
/// exactly those regions, marks them out of sync, and `invalidate-remote --reset-bitmap=no`
/// (DRBD 9's; a planned reconnect, where DRBD 8's disconnect and connect would run a
/// fence-peer handler under fencing) resyncs only them.
#[test]
fn verify_finds_blocks_changed_behind_the_back_and_resync_repairs_them() {
    let c = pair("verify-finds", |b| b.journal_size("8M"));
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let n = 16 * MIB;
    let input = c.dir().join("in.bin");
    let data = write_random_file(&input, n as usize);
    a.nbdcopy_in(&input);
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_replicas_identical(size, "before the corruption");

    // Behind the daemon's back: one whole block, one flipped byte, one block past the data
    // (zeroes on alpha), at the very end of the device.
    let bad_blocks = [1000u64, 3000, 6000, size / BLK - 1];
    pwrite_backing(b, 1000 * BLK, &random_bytes(BLK as usize));
    let mut byte = [0u8; 1];
    std::fs::File::open(b.backing_path())
        .unwrap()
        .read_exact_at(&mut byte, 3000 * BLK + 77)
        .unwrap();
    pwrite_backing(b, 3000 * BLK + 77, &[byte[0] ^ 0x40]);
    pwrite_backing(b, 6000 * BLK + 100, b"behind the back");
    pwrite_backing(b, size - 10, b"tail");
    assert!(first_difference(a.backing_path(), b.backing_path(), size).is_some());

    let t = Instant::now();
    let (regions, bytes, line) = run_verify(a);
    println!("{line} (in {:?})", t.elapsed());
    assert_eq!(
        (regions, bytes),
        (bad_blocks.len() as u64, bad_blocks.len() as u64 * BLK),
        "verify should find exactly the {} corrupted blocks",
        bad_blocks.len()
    );
    let r = a.repl();
    assert_eq!(u(&r, "out_of_sync"), bad_blocks.len() as u64 * BLK, "{r}");
    let v = &r["verify"];
    assert_eq!(v["state"], "done", "{r}");
    assert_eq!(u(v, "differ_regions"), bad_blocks.len() as u64, "{r}");
    let logged = log_lines(a, "differs on the peer");
    for blk in bad_blocks {
        assert!(
            logged
                .iter()
                .any(|l| l.contains(&format!(": {}+", blk * BLK))),
            "no log line for block {blk}: {logged:?}"
        );
    }
    assert!(
        !log_lines(a, &format!("{} regions ({} bytes) differ", regions, bytes)).is_empty(),
        "no summary log line"
    );
    // The marks survive acknowledgements (they are not journal lag).
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(a.repl_u64("out_of_sync"), bad_blocks.len() as u64 * BLK);
    // The secondary is told (DRBD marks both sides): its status shows the same marks, its
    // log names them, and its wait-sync does not call the pair in sync.
    b.wait_repl(CONNECT_TIMEOUT, "the verify's marks", |r| {
        r["out_of_sync"].as_u64() == Some(bad_blocks.len() as u64 * BLK)
    });
    assert_eq!(
        log_lines(b, "marked out of sync here too").len(),
        bad_blocks.len(),
        "{}",
        b.log_tail(20)
    );
    let w = b.ctl(&["wait-sync", "--timeout", "2"]);
    assert!(
        !w.success() && !w.stdout.contains("in sync:"),
        "wait-sync on the secondary with the verify's marks:\n{}",
        w.describe()
    );

    // A resync repairs them. Asked on the secondary, it is refused, naming the primary.
    let out = b.ctl(&["invalidate-remote", "--reset-bitmap=no"]);
    assert!(
        !out.success() && out.stderr.contains("runs on the primary"),
        "{}",
        out.describe()
    );
    let sent0 = a.repl_u64("bytes_sent");
    let out = a.ctl_ok(&["invalidate-remote", "--reset-bitmap=no"]).stdout;
    assert!(
        out.contains(&format!(
            "the {} bytes marked out of sync are resynced",
            4 * BLK
        )),
        "{out}"
    );
    let seen = wait_synced(&c, Duration::from_secs(30), "after verify and reconnect");
    c.wait_in_sync(SYNC_TIMEOUT);
    let sent = a.repl_u64("bytes_sent") - sent0;
    println!("resync after verify: states {seen:?}, sent {sent} bytes");
    // The resync of 4 blocks may be over between two polls: its log line is the evidence.
    let started = log_lines(a, "resync to the peer (");
    assert!(
        started.iter().any(
            |l| l.contains(&format!("({} bytes marked out of sync", 4 * BLK))
                && l.ends_with(&format!(": {} bytes", 4 * BLK))
        ),
        "no bitmap resync of the 4 blocks started: {started:?}; states {seen:?}"
    );
    // Two of the blocks hold data on alpha (two writes), two are zero there (Zero records).
    assert!(
        (2 * BLK..=64 * 1024).contains(&sent),
        "resync after verify sent {sent} bytes for 4 blocks (2 of data, 2 zero)"
    );
    c.assert_replicas_identical(size, "after verify and resync");
    assert_same_bytes(&b.backing_data(n), &data, "beta's data after the repair");
    // The verify's line no longer reads as differences still there.
    let mut st = a.repl();
    assert!(
        wait_for(Duration::from_secs(5), || {
            st = a.repl();
            st["verify"]["resynced"] == true
        }),
        "the verify is not shown as resynced: {st}"
    );
    let text = a.ctl_ok(&["status"]).stdout;
    assert!(
        text.contains("(resynced since)"),
        "the text status does not say the verify's differences are repaired:\n{text}"
    );
    let (regions, _, line) = run_verify(a);
    assert_eq!(regions, 0, "a second verify after the repair: {line}");
    // Nothing marked now: nothing to do, and the link stays as it is.
    let out = a.ctl_ok(&["invalidate-remote", "--reset-bitmap=no"]).stdout;
    assert!(out.contains("nothing is marked out of sync"), "{out}");
    assert_eq!(a.repl()["connection"], "connected");
}

/// Verify reads what the secondary's disk holds, not what its page cache does (as DRBD's
/// verify reads the lower device): beta's disk is a loop device whose page cache still holds
/// a block that was changed underneath it, on the file behind the loop device (a disk that
/// lost or misplaced a write the kernel wrote back). Verify must find the difference; read
/// through the cache it reported 0 (review finding), and a cron verify vouched for a standby
/// it had not read.
#[test]
fn verify_reads_the_disk_not_the_page_cache() {
    let c = Cluster::builder("verify-disk")
        .nodes(2)
        .backing_size(64 * MIB)
        .journal_size("8M")
        .build();
    let (a, b) = (c.alpha(), c.beta());
    let img = c.dir().join("beta-disk.img");
    b.create_md();
    std::fs::rename(b.backing_path(), &img).expect("move beta's disk");
    let lo = LoopDev::attach(&img);
    std::os::unix::fs::symlink(lo.dev(), b.backing_path()).expect("symlink beta's disk");
    let _stop = StopDaemons(&c);
    a.create_md();
    c.up_pair();
    c.wait_in_sync(SYNC_TIMEOUT);

    // A small write (through beta's page cache, not its direct path), flushed on both nodes.
    let at = 5 * MIB + 8 * BLK;
    let data = random_bytes(BLK as usize);
    {
        let mut r = a.raw_open();
        r.write_at(at, &data, 0).expect("write");
        r.command(nbd_const::CMD_FLUSH, 0, 0, 0).expect("flush");
        r.disconnect();
    }
    c.wait_in_sync(SYNC_TIMEOUT);
    let cached = |what: &str| {
        let mut got = vec![0u8; BLK as usize];
        std::fs::File::open(lo.dev())
            .and_then(|f| f.read_exact_at(&mut got, at))
            .unwrap_or_else(|e| panic!("read {} ({what}): {e}", lo.dev()));
        got
    };
    assert_eq!(
        cached("before"),
        data,
        "beta's disk does not hold the write"
    );
    // Underneath the loop device: its page cache keeps the old block.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .expect("open beta's image");
    f.write_all_at(&random_bytes(BLK as usize), at)
        .expect("change the block underneath");
    f.sync_all().expect("fsync beta's image");
    assert_eq!(
        cached("after the change underneath"),
        data,
        "the loop device's page cache no longer holds the block: nothing to check"
    );

    let (regions, bytes, line) = run_verify(a);
    println!("{line}");
    assert_eq!(
        (regions, bytes),
        (1, BLK),
        "verify did not find the block beta's disk lost: {line}"
    );
}

/// `blockrep-ctl verify` waits for its run, but not for a run the daemon lost: a primary
/// killed and restarted while a verify runs holds no run any more, and the command says the
/// verify was interrupted (exit 1), whether it asks while the daemon is down or once it is
/// back, instead of waiting for ever (a cron job that hung when it asked only once the
/// daemon was back; in this suite's first run it asked while the daemon was down and said
/// "daemon not running").
#[test]
fn verify_whose_daemon_restarts_midway_says_interrupted() {
    let c = pair("verify-lost", |b| {
        b.journal_size("8M").resource_line("resync-rate = \"2M\"")
    });
    let a = c.alpha();
    let out = std::thread::scope(|s| {
        let verify = s.spawn(|| a.ctl_timeout(&["verify"], Duration::from_secs(90)));
        a.wait_repl(Duration::from_secs(20), "the verify running", |r| {
            r["verify"]["state"] == "running"
        });
        a.kill9_and_wait();
        a.up();
        verify.join().expect("verify thread")
    });
    assert!(
        out.code == Some(1) && out.stderr.contains("verify interrupted"),
        "verify across a restart of its daemon:\n{}",
        out.describe()
    );
}

#[test]
fn verify_of_identical_replicas_reports_zero() {
    let Some(py) = python() else { return };
    let c = pair("verify-zero", |b| b);
    let (a, b) = (c.alpha(), c.beta());
    let blocks: Vec<u64> = (0..8192).step_by(3).collect();
    write_blocks(&py, c.dir().path(), &a.uri(), 7, &blocks);
    c.wait_in_sync(SYNC_TIMEOUT);
    let (regions, bytes, line) = run_verify(a);
    println!("{line}");
    assert_eq!((regions, bytes), (0, 0));
    assert_eq!(a.repl_u64("out_of_sync"), 0);
    // Asked on the secondary, it runs on the primary and reports back.
    let (regions, bytes, line) = run_verify(b);
    println!("on the secondary: {line}");
    assert_eq!((regions, bytes), (0, 0));
    let v = b.repl()["verify"].clone();
    assert_eq!(
        (v["state"].as_str(), v["source"].as_str()),
        (Some("done"), Some("alpha")),
        "{v}"
    );
    // Refused while disconnected, on either node (once each has seen the link go: a verify
    // asked of beta in the instant before is interrupted instead).
    a.ctl_ok(&["disconnect"]);
    b.wait_not_connected(Duration::from_secs(10));
    for n in [a, b] {
        let out = n.ctl(&["verify"]);
        assert!(
            !out.success() && out.stderr.contains("connected"),
            "verify while standalone:\n{}",
            out.describe()
        );
    }
    a.ctl_ok(&["connect"]);
    c.wait_in_sync(SYNC_TIMEOUT);
}

/// DRBD's `verify` runs from either node: asked on the secondary, the comparison runs on the
/// primary (whose stream carries the hash requests), the secondary follows its progress, the
/// differences are marked in the primary's bitmap, and a reconnect asked on the secondary
/// repairs them. With neither node primary it is refused, clearly.
#[test]
fn verify_asked_on_the_secondary_runs_on_the_primary() {
    let c = pair("verify-secondary", |b| b);
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let input = c.dir().join("in.bin");
    let data = write_random_file(&input, 8 * MIB as usize);
    a.nbdcopy_in(&input);
    c.wait_in_sync(SYNC_TIMEOUT);
    pwrite_backing(b, 100 * BLK, &random_bytes(BLK as usize));
    pwrite_backing(b, 1500 * BLK + 9, b"behind the back");

    let (regions, bytes, line) = run_verify(b);
    println!("{line}");
    assert_eq!((regions, bytes), (2, 2 * BLK), "{line}");
    let vb = b.repl()["verify"].clone();
    assert_eq!(vb["source"], "alpha", "{vb}");
    assert_eq!(u(&vb, "differ_regions"), 2, "{vb}");
    let va = a.repl()["verify"].clone();
    assert_eq!(
        (va["state"].as_str(), u(&va, "differ_regions")),
        (Some("done"), 2),
        "{va}"
    );
    assert_eq!(a.repl_u64("out_of_sync"), 2 * BLK);
    assert!(
        !log_lines(a, "asked by the peer").is_empty(),
        "alpha should log that beta asked"
    );

    b.ctl_ok(&["disconnect"]);
    b.ctl_ok(&["connect"]);
    wait_synced(&c, Duration::from_secs(30), "after verify on the secondary");
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_replicas_identical(size, "after verify on the secondary and reconnect");
    assert_same_bytes(
        &b.backing_data(8 * MIB),
        &data,
        "beta's data after the repair",
    );

    // Neither node primary: nothing carries the hash requests; refused on both.
    a.ctl_ok(&["secondary"]);
    a.wait_repl(CONNECT_TIMEOUT, "both secondary and connected", |r| {
        r["connection"] == "connected" && r["peer_role"] == "secondary"
    });
    for n in [a, b] {
        let out = n.ctl(&["verify"]);
        assert!(
            !out.success() && out.stderr.contains("neither node is primary"),
            "verify with two secondaries:\n{}",
            out.describe()
        );
    }
}

/// Verify while application writes go on all over the device (protocol A, so the secondary
/// lags behind the primary): no false differences, because both sides hash at the same
/// point of the stream.
#[test]
fn verify_under_concurrent_writes_reports_no_false_differences() {
    let Some(py) = python() else { return };
    let c = pair("verify-writes", |b| {
        b.protocol("A")
            .journal_size("16M")
            // Paces the verify (about 8 s for 128 MiB) so the writes overlap all of it.
            .resource_line("resync-rate = \"16M\"")
    });
    let a = c.alpha();
    let size = a.size();
    let nblocks = size / BLK;
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, rounds) = (stop.clone(), rounds.clone());
        let (py, dir, uri) = (py.clone(), c.dir().path().to_path_buf(), a.uri());
        let mut rng = XorShift::new(seed());
        std::thread::spawn(move || {
            let mut tag = 100;
            while !stop.load(Ordering::SeqCst) {
                let blocks: BTreeSet<u64> = (0..1024).map(|_| rng.next_u64() % nblocks).collect();
                let mut v: Vec<u64> = blocks.into_iter().collect();
                shuffle(&mut rng, &mut v);
                write_blocks(&py, &dir, &uri, tag, &v);
                tag += 1;
                rounds.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    // Let the writes get going first (a writer that failed stops the test, not a loop).
    let deadline = Instant::now() + Duration::from_secs(120);
    while rounds.load(Ordering::SeqCst) < 1 {
        assert!(
            !writer.is_finished() && Instant::now() < deadline,
            "the writer finished no round (it failed, or took over 120 s)"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let r0 = rounds.load(Ordering::SeqCst);
    let t = Instant::now();
    let (regions, bytes, line) = run_verify(a);
    let during = rounds.load(Ordering::SeqCst) - r0;
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer thread");
    println!(
        "{line} in {:?}, with {during} rounds of 1024 random block writes during the verify",
        t.elapsed()
    );
    // A round that ended while the verify ran overlapped it (a round is a python process of
    // 1024 writes: on a loaded machine a few seconds).
    assert!(
        during >= 1,
        "the writes did not overlap the verify ({during} rounds)"
    );
    assert_eq!(
        (regions, bytes),
        (0, 0),
        "false differences under concurrent writes"
    );
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_replicas_identical(size, "after verify under writes");
}

// ---------------------------------------------------------------------------------------------
// 3. The resync rate floor.

/// A TCP forwarder that limits the primary→secondary direction to `rate` bytes per second
/// (the peer link's bandwidth), so application writes under protocol A fill the journal.
struct Throttle {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Throttle {
    fn start(target: SocketAddr, rate: u64) -> Throttle {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind throttle");
        l.set_nonblocking(true).expect("nonblocking");
        let port = l.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((down, _)) => {
                        let _ = down.set_nonblocking(false);
                        let Ok(up) = TcpStream::connect(target) else {
                            continue;
                        };
                        let _ = up.set_nodelay(true);
                        let _ = down.set_nodelay(true);
                        let (d2, u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                        let (s1, s2) = (st.clone(), st.clone());
                        std::thread::spawn(move || pump(down, up, rate, s1));
                        std::thread::spawn(move || pump(u2, d2, 0, s2));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Throttle { port, stop }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` at most `rate` bytes/s (0: unlimited) until either side closes.
fn pump(mut from: TcpStream, mut to: TcpStream, rate: u64, stop: Arc<AtomicBool>) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = vec![0u8; 16 * 1024];
    let start = Instant::now();
    let mut moved = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => break,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        moved += n as u64;
        if rate > 0 {
            let due = Duration::from_secs_f64(moved as f64 / rate as f64);
            let el = start.elapsed();
            if due > el {
                std::thread::sleep(due - el);
            }
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// One run: a 24 MiB resync over a 32 MB/s link while application writes (protocol A, so
/// only the journal holds them back) saturate it. Returns the resync's progress (bytes/s)
/// while the writes ran.
fn resync_rate_under_writes(py: &Path, test: &str, floor: &str) -> f64 {
    let c = Cluster::builder(test)
        .nodes(2)
        .backing_size(256 << 20)
        .protocol("A")
        .journal_size("4M")
        .resource_line(&format!("resync-rate-min = {floor:?}"))
        .beta_via_proxy()
        .build();
    let throttle = Throttle::start(c.beta().replication_addr(), 32 << 20);
    c.proxy()
        .set_target(SocketAddr::from(([127, 0, 0, 1], throttle.port)));
    c.start_pair();
    c.wait_in_sync(SYNC_TIMEOUT);
    let a = c.alpha();
    let dir = c.dir().path();
    cut(&c);
    let dirty = 24 * MIB;
    let input = dir.join("dirty.bin");
    write_random_file(&input, dirty as usize);
    a.nbdcopy_in(&input);
    // Application writes at 64..192 MiB, over and over, while the resync runs.
    let script = dir.join("app_writer.py");
    std::fs::write(&script, APP_WRITER).expect("write app_writer.py");
    let stopfile = dir.join("app.stop");
    let mut writer = ChildGuard::spawn(
        Command::new(py)
            .arg(&script)
            .arg(a.uri())
            .arg((64 * MIB).to_string())
            .arg((128 * MIB).to_string())
            .arg(&stopfile),
        Some(&dir.join("app_writer.log")),
    );
    std::thread::sleep(Duration::from_millis(500));
    let before = a.repl();
    c.proxy().resume();
    let t0 = Instant::now();
    let mut samples = Vec::new();
    let deadline = t0 + Duration::from_secs(10);
    let mut last = 0;
    while Instant::now() < deadline {
        let r = a.repl();
        if r["connection"] == "sync-source" {
            last = u(&r, "resync_done");
            samples.push((t0.elapsed(), last));
        } else if !samples.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Counted from the first sample seen syncing, not from the resume: the redial (up to
    // 2 s) and the handshake are no part of the resync's rate.
    let (t_first, done_first) = samples.first().copied().unwrap_or((t0.elapsed(), 0));
    let elapsed = samples
        .last()
        .map_or(Duration::ZERO, |s| s.0)
        .saturating_sub(t_first);
    let last = last - done_first;
    std::fs::write(&stopfile, b"stop").expect("stop file");
    assert!(
        writer.wait_exit(Duration::from_secs(20)),
        "app writer did not stop"
    );
    let log = writer.log();
    let rate = last as f64 / elapsed.as_secs_f64().max(0.1);
    println!(
        "{test} (resync-rate-min {floor}): before {before}\n  resync progress {last} bytes in {elapsed:?} ({:.2} MB/s) while the application wrote: {}",
        rate / 1e6,
        log.trim()
    );
    rate
}

/// Writes 256 KiB buffers over `[start, start+len)` again and again (16 in flight) until
/// the stop file exists; prints the bytes written.
const APP_WRITER: &str = r#"
import os, sys
import nbd

uri, start, length, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
h = nbd.NBD()
h.connect_uri(uri)
chunk = 256 * 1024
data = bytearray(os.urandom(chunk))
pending = []
off = 0
total = 0

def reap():
    global pending
    pending = [(c, b) for (c, b) in pending if not h.aio_command_completed(c)]

while not os.path.exists(stop):
    buf = nbd.Buffer.from_bytearray(data)
    reap()
    while len(pending) >= 16:
        h.poll(-1)
        reap()
    pending.append((h.aio_pwrite(buf, start + off), buf))
    off = (off + chunk) % length
    total += chunk
while pending:
    reap()
    if pending:
        h.poll(-1)
h.shutdown()
print("application wrote %d MiB" % (total >> 20))
"#;

#[test]
fn resync_rate_floor_keeps_resync_going_under_application_writes() {
    let Some(py) = python() else { return };
    let without = resync_rate_under_writes(&py, "floor-off", "0");
    let with = resync_rate_under_writes(&py, "floor-on", "8M");
    println!(
        "resync progress under saturating application writes: {:.2} MB/s without a floor, {:.2} MB/s with resync-rate-min 8M",
        without / 1e6,
        with / 1e6
    );
    assert!(
        with >= 0.5 * (8 << 20) as f64,
        "with resync-rate-min 8M the resync made only {with:.0} bytes/s"
    );
    // Without the floor the application's writes held the resync back (0.05 MB/s in a run
    // on the 2-core machine): otherwise the floor showed nothing.
    assert!(
        without < 0.25 * with,
        "without a floor the resync made {without:.0} bytes/s, with one {with:.0}: the floor made no difference"
    );
}

/// The new keys are checked like every other: exit 1, an `error:` line naming file and key.
#[test]
fn resync_keys_are_checked() {
    for (lines, key) in [
        (
            &["resync-rate = \"2M\"", "resync-rate-min = \"3M\""][..],
            "resource.resync-rate-min",
        ),
        (
            &["resync-rate-min = \"lots\""][..],
            "resource.resync-rate-min",
        ),
        (&["csums-alg = \"md5\""][..], "resource.csums-alg"),
        (&["csums = \"yes\""][..], "csums"),
    ] {
        let mut b = Cluster::builder("verify-cfg");
        for l in lines {
            b = b.resource_line(l);
        }
        let c = b.build();
        let out = c.alpha().ctl(&["create-md"]);
        assert_eq!(out.code, Some(1), "{lines:?}:\n{}", out.describe());
        let err = out
            .stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_else(|| panic!("no error line for {lines:?}:\n{}", out.describe()))
            .to_string();
        assert!(
            err.contains(&*c.config_path().to_string_lossy()) && err.contains(key),
            "{lines:?}: {err}"
        );
    }
    // And the good ones are accepted.
    let c = Cluster::builder("verify-cfg-ok")
        .resource_line("csums = true")
        .resource_line("csums-alg = \"sha256\"")
        .resource_line("resync-rate-min = \"1M\"")
        .build();
    c.alpha().ctl_ok(&["create-md"]);
}

/// A checksum resync cut at about a quarter and resumed: what was decided (sent or found
/// equal) and made durable by the peer is kept, the rest is hashed again; the replicas end
/// identical.
#[test]
fn checksum_resync_interrupted_and_resumed() {
    let c = pair("csum-resume", |b| {
        b.journal_size("2M")
            .resource_line("csums = true")
            .resource_line("resync-rate = \"4M\"")
            .beta_via_proxy()
    });
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    // 48 MiB both sides have, then the first 32 MiB rewritten equal, the rest changed.
    let n = 48 * MIB;
    let input = c.dir().join("in.bin");
    let mut data = write_random_file(&input, n as usize);
    a.nbdcopy_in(&input);
    c.wait_in_sync(SYNC_TIMEOUT);
    cut(&c);
    let sent0 = a.repl_u64("bytes_sent");
    let fresh = random_bytes((16 * MIB) as usize);
    data[(32 * MIB) as usize..].copy_from_slice(&fresh);
    std::fs::write(&input, &data).expect("rewrite input");
    a.nbdcopy_in(&input);
    assert_eq!(a.repl_u64("out_of_sync"), n);

    c.proxy().resume();
    watch(
        &c,
        Duration::from_secs(30),
        "a quarter resynced",
        |sa, _| {
            let r = &sa["replication"];
            r["connection"] == "sync-source" && u(r, "resync_done") >= n / 4
        },
    );
    // Only what the peer made durable counts as done (a region found equal may be equal only
    // in the peer's page cache): the target's resync checkpoint comes within a second.
    let decided = a.repl_u64("seq_written");
    a.wait_repl(
        Duration::from_secs(10),
        "the peer durable past a quarter of the resync",
        |r| u(r, "seq_durable") >= decided,
    );
    cut(&c);
    std::thread::sleep(Duration::from_millis(300));
    let oos1 = a.repl_u64("out_of_sync");
    println!("after the cut: {oos1} of {n} bytes still out of sync");
    assert!(oos1 < n, "no progress was kept: {oos1}");
    c.proxy().resume();
    wait_synced(
        &c,
        Duration::from_secs(40),
        "after the resumed checksum resync",
    );
    c.wait_in_sync(SYNC_TIMEOUT);
    let sent = a.repl_u64("bytes_sent") - sent0;
    println!(
        "changed {} bytes, sent over both parts {sent} ({:.3}x); {:?}",
        16 * MIB,
        sent as f64 / (16 * MIB) as f64,
        log_lines(a, "checksum resync: ")
    );
    assert!(
        sent <= 16 * MIB * 5 / 4 + 2 * MIB,
        "sent {sent} bytes for 16 MiB of changed data"
    );
    c.assert_replicas_identical(size, "after the resumed checksum resync");
    assert_same_bytes(&b.backing_data(n), &data, "beta's data");
}

#[test]
fn verify_marks_survive_a_restart_of_the_primary() {
    let c = pair("verify-restart", |b| b.journal_size("8M"));
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let n = 4 * MIB;
    let input = c.dir().join("in.bin");
    let data = write_random_file(&input, n as usize);
    a.nbdcopy_in(&input);
    c.wait_in_sync(SYNC_TIMEOUT);
    pwrite_backing(b, 100 * BLK, &random_bytes(BLK as usize));
    pwrite_backing(b, 700 * BLK + 5, b"changed behind the back");
    let (regions, _, line) = run_verify(a);
    assert_eq!(regions, 2, "{line}");

    // The primary restarts before anyone resyncs: the marks must not be forgotten (a journal
    // catch-up with nothing to replay would otherwise declare the pair in sync). Its down is
    // no clean hand-over: beta lacks the marked blocks, so a plain `primary` there is refused
    // (promoted, it would make alpha's good blocks the target of its bad ones).
    let down = a.ctl_ok(&["down"]).stdout;
    assert!(
        down.contains("the peer lacks writes of this node") && down.contains("--force"),
        "down does not say the peer lacks the marked blocks: {down}"
    );
    let out = b.ctl(&["primary"]);
    assert!(
        !out.success() && out.stderr.contains("--force"),
        "beta promoted plainly although it lacks the marked blocks:\n{}",
        out.describe()
    );
    // Alpha's own marks are back with it, before the peer connects (beta's, which the
    // verify also told it, would start the same resync: this is alpha's side).
    b.ctl_ok(&["disconnect"]);
    a.up();
    let r = a.repl();
    assert_eq!(
        u(&r, "out_of_sync"),
        2 * BLK,
        "alpha's marks after its restart: {r}"
    );
    b.ctl_ok(&["connect"]);
    // Linked first (a `primary` waits only 5 s for a peer that has not connected yet).
    a.wait_repl(CONNECT_TIMEOUT, "linked to beta again", |r| {
        matches!(
            r["connection"].as_str(),
            Some("connected" | "sync-source" | "sync-target")
        )
    });
    a.ctl_ok(&["primary"]);
    let seen = wait_synced(&c, Duration::from_secs(30), "after the restart");
    c.wait_in_sync(SYNC_TIMEOUT);
    // Either node's marks start it: alpha's (recorded as a journal that no longer carries
    // what its bitmap holds) or beta's (told by the verify, and sent with its bitmap).
    let started = log_lines(a, "resync to the peer (");
    assert!(
        started
            .iter()
            .any(|l| l.ends_with(&format!(": {} bytes", 2 * BLK))),
        "no bitmap resync of the 2 marked blocks after the restart: {started:?}; states {seen:?}"
    );
    c.assert_replicas_identical(size, "verify marks resynced after a restart");
    assert_same_bytes(&b.backing_data(n), &data, "beta's data after the repair");
    let (regions, _, line) = run_verify(a);
    assert_eq!(regions, 0, "a second verify after the repair: {line}");
}
