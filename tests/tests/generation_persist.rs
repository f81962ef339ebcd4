//! A primary that lost its peer cannot persist its new data generation: the write that
//! needed it fails with EIO, nothing changes, the next write tries again, and once the
//! metadata takes writes again a write succeeds under a new generation that the peer adopts.
//!
//! The code path (blockrep/src/resource.rs `link_down`, blockrep/src/replication.rs `begin`,
//! `diverge_generation`, `start_new_generation`): when a connected primary loses its peer,
//! `new_gen_pending` is set; the first write's `begin` then persists a new current generation
//! (`MetaStore::update`: a superblock slot write + fdatasync on the metadata device) before
//! anything else happens. If that fails, the error is logged ("persisting the new generation
//! failed (...): the write fails, the next one tries again"), the flag stays set, and the
//! client's write fails with EIO (device.rs: `begin` failing returns EIO) before anything is
//! journaled or written locally.
//!
//! How only the metadata write fails: alpha uses external metadata (`meta = DIR/alpha.meta`),
//! and that path is a symlink to an nbdfuse file served by nbdkit's `file` plugin over the
//! metadata file `create-md` wrote, behind the `error` filter with `error-pwrite-rate=1` and
//! `error-pwrite-file=TRIGGER`: while TRIGGER exists every NBD write to the metadata fails with
//! EIO, which FUSE (write-through: nbdfuse does not enable the writeback cache) returns to the
//! daemon's `pwrite` of the superblock slot. Reads keep working, so `dump-md` still reads the
//! superblock on disk, through the same device (a failed FUSE write leaves no page cache
//! behind it: the kernel clears the pages' up-to-date flag). Alpha's data (its backing file)
//! and everything of beta are plain files and never fail.
//!
//! The link is cut by the proxy in front of beta (alpha, whose name sorts first, is the one
//! that dials), refusing new connections until the test resumes it.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use blockrep_e2e::watch::{pair_synced, watch};
use blockrep_e2e::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// Backing size of both nodes (external metadata: all of it is exported).
const SIZE: u64 = 64 * MIB;
const BLK: usize = 4096;
/// Where the test writes: the first failed write, then its retry (the third write).
const OFF_A: u64 = 3 * MIB;
/// The second failed write (never retried: it must stay as it was on both nodes).
const OFF_B: u64 = 5 * MIB + 8192;

const FAIL_LINE: &str = "persisting the new generation failed (";
const FAIL_TAIL: &str = "the write fails, the next one tries again";
const NEW_GEN_LINE: &str = "peer away: new data generation ";

fn log_text(n: &Node) -> String {
    std::fs::read(n.log_path())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The node's log lines after the first `mark` lines.
fn log_since(n: &Node, mark: usize) -> Vec<String> {
    log_text(n).lines().skip(mark).map(str::to_string).collect()
}

/// `dump-md`'s fields as (key, rest of the line).
fn dump_md(n: &Node) -> Vec<(String, String)> {
    let out = n.ctl_ok(&["dump-md"]);
    out.stdout
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut it = l.splitn(2, ' ');
            Some((it.next()?.to_string(), it.next()?.trim().to_string()))
        })
        .collect()
}

fn md_field(md: &[(String, String)], key: &str) -> String {
    md.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("dump-md has no {key}: {md:?}"))
}

/// The current generation in the node's metadata on disk.
fn current_gen(n: &Node) -> String {
    md_field(&dump_md(n), "current-gen")
}

fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    std::fs::File::open(path)
        .and_then(|f| f.read_exact_at(&mut v, off))
        .unwrap_or_else(|e| panic!("read {} at {off}: {e}", path.display()));
    v
}

fn io_counter(st: &Value, k: &str) -> u64 {
    st["io"][k]
        .as_u64()
        .unwrap_or_else(|| panic!("io.{k} is not a number in {st}"))
}

#[test]
fn a_new_generation_that_cannot_be_persisted_fails_the_write_until_the_metadata_takes_it() {
    if !have_tools(&["nbdkit", "nbdfuse", "fusermount3"]) {
        return;
    }
    let t0 = Instant::now();
    let c = Cluster::builder("gen-persist")
        .nodes(2)
        .backing_size(SIZE)
        .protocol("C")
        .external_meta()
        .journal_size("8M")
        .beta_via_proxy()
        .build();
    let dir = c.dir().path().to_path_buf();
    let (a, b) = (c.alpha(), c.beta());
    let meta = dir.join("alpha.meta");
    let meta_img = dir.join("alpha-meta.img");
    let trigger = ErrorTrigger(dir.join("alpha-meta.fail"));

    // Alpha's metadata, written by create-md to a plain file, then moved behind nbdkit.
    a.create_md();
    std::fs::rename(&meta, &meta_img).expect("move alpha's metadata");
    // Torn down in this order on any exit: the daemons, then nbdkit and the FUSE mount.
    let disk = NbdkitFile::start(
        &dir,
        "alpha-meta",
        &[
            "--filter=error".into(),
            "file".into(),
            meta_img.display().to_string(),
            "error=EIO".into(),
            "error-pwrite-rate=1".into(),
            format!("error-pwrite-file={}", trigger.0.display()),
        ],
        &[],
    );
    let file = disk.file();
    std::os::unix::fs::symlink(&file, &meta).expect("symlink alpha.meta");
    let _stop = StopDaemons(&c);
    // The metadata reads back through the new device.
    let md0 = dump_md(a);
    assert_eq!(md_field(&md0, "node"), "alpha", "{md0:?}");

    // The pair, as `start_pair` makes it (alpha's metadata exists already).
    b.create_md();
    c.up_pair();
    assert!(
        c.proxy().accepted() >= 1,
        "alpha did not dial through the proxy"
    );
    watch(
        &c,
        SYNC_TIMEOUT,
        "in sync after the first sync",
        pair_synced,
    );
    let size = a.size();
    assert_eq!(
        size, SIZE,
        "external metadata: the whole backing is exported"
    );
    let pid_a = a.pid().expect("alpha pid");
    let pid_b = b.pid().expect("beta pid");

    // Base data on both nodes.
    let base_a = random_bytes(BLK);
    let base_b = random_bytes(BLK);
    {
        let mut r = a.raw_open();
        r.write_at(OFF_A, &base_a, 0).expect("base write A");
        r.write_at(OFF_B, &base_b, 0).expect("base write B");
        r.command(nbd_const::CMD_FLUSH, 0, 0, 0).expect("flush");
        r.disconnect();
    }
    watch(
        &c,
        SYNC_TIMEOUT,
        "in sync after the base writes",
        pair_synced,
    );
    let gen0 = current_gen(a);
    assert_eq!(gen0, current_gen(b), "a pair in sync shares its generation");

    // The link drops. Nothing is written yet: the generation does not move.
    assert!(c.proxy().cut_and_refuse() >= 1, "no link connection to cut");
    a.wait_not_connected(Duration::from_secs(10));
    b.wait_not_connected(Duration::from_secs(10));
    // Let the background writers finish, so that the armed device fails the generation's
    // write, not a background one: the once-a-second journal persister (whatever the
    // disconnect left dirty) and the activity log's cooling, which evicts the base writes'
    // extents at its second 5 s round after them. The metadata file behind nbdkit must stay
    // untouched for longer than two cooling rounds (a quiet spell of 1.5 s once let an
    // eviction land while the device was armed, on a loaded machine).
    let mtime = || {
        std::fs::metadata(&meta_img)
            .and_then(|m| m.modified())
            .expect("mtime of alpha's metadata")
    };
    let (mut last, mut since) = (mtime(), Instant::now());
    assert!(
        wait_for(Duration::from_secs(45), || {
            let m = mtime();
            if m != last {
                (last, since) = (m, Instant::now());
            }
            since.elapsed() >= Duration::from_secs(11)
        }),
        "alpha's metadata kept being written after the link dropped"
    );
    assert_eq!(
        current_gen(a),
        gen0,
        "alpha started a new generation on the link drop, before any write"
    );
    let st0 = a.status_json();
    assert_eq!(st0["role"], "primary", "{st0}");
    let mark = log_text(a).lines().count();
    let (errors0, disk_errors0) = (io_counter(&st0, "errors"), io_counter(&st0, "disk_errors"));
    let md_before = dump_md(a);

    // The metadata device fails writes from now on.
    trigger.arm();
    println!(
        "{:?}: link cut, alpha's metadata fails writes",
        t0.elapsed()
    );
    let d1 = random_bytes(BLK);
    let d2 = random_bytes(BLK);
    let d3 = random_bytes(BLK);
    let mut r = a.raw_open();
    for (n, off, data) in [(1usize, OFF_A, &d1), (2, OFF_B, &d2)] {
        let t = Instant::now();
        let res = r.write_at(off, data, 0);
        println!(
            "{:?}: write {n} at {off}: {res:?} after {:?}",
            t0.elapsed(),
            t.elapsed()
        );
        assert_eq!(
            res,
            Err(nbd_const::EIO),
            "write {n} while the new generation cannot be persisted: not EIO\n{}",
            a.log_tail(20)
        );
        // The log says why, once per failed write: a retry, not a one-shot.
        let lines = log_since(a, mark);
        let fails: Vec<&String> = lines.iter().filter(|l| l.contains(FAIL_LINE)).collect();
        assert_eq!(
            fails.len(),
            n,
            "after failed write {n}, the log should have {n} line(s) {FAIL_LINE:?}:\n{}",
            lines.join("\n")
        );
        assert!(
            fails
                .iter()
                .all(|l| l.contains(FAIL_TAIL) && l.contains("ERROR")),
            "{fails:?}"
        );
        assert!(
            !lines.iter().any(|l| l.contains(NEW_GEN_LINE)),
            "a new generation was reported while the metadata failed writes:\n{}",
            lines.join("\n")
        );
        // Nothing changed on disk: no generation, not even another superblock.
        let md = dump_md(a);
        assert_eq!(
            md, md_before,
            "alpha's metadata changed although its writes fail (after write {n})"
        );
        // The write did not go on: alpha's data is as it was.
        assert_eq!(
            read_at(a.backing_path(), off, BLK),
            if off == OFF_A {
                base_a.clone()
            } else {
                base_b.clone()
            },
            "failed write {n} reached alpha's disk"
        );
        // The daemon lives on, primary, its disk up to date; the failure counts as a failed
        // request, not as a backing-device error (metadata I/O is not counted there).
        a.assert_alive();
        assert_eq!(a.pid(), Some(pid_a), "alpha's daemon was replaced");
        let st = a.status_json();
        assert_eq!(st["role"], "primary", "after failed write {n}: {st}");
        assert_eq!(st["disk"], "up-to-date", "after failed write {n}: {st}");
        assert_eq!(io_counter(&st, "errors"), errors0 + n as u64, "{st}");
        assert_eq!(io_counter(&st, "disk_errors"), disk_errors0, "{st}");
        assert_eq!(
            st["replication"]["out_of_sync"], 0,
            "a failed write was recorded for the peer: {st}"
        );
    }
    // Reads still work on the same connection.
    assert_eq!(
        r.read_at(OFF_A, BLK as u32)
            .expect("read after the failures"),
        base_a,
        "alpha serves something else than its data"
    );

    // Only the generation's superblock writes failed while the device was armed: no other
    // metadata write (journal, bitmap, activity log) was attempted and failed meanwhile.
    let armed_lines = log_since(a, mark);
    let other_errors: Vec<&String> = armed_lines
        .iter()
        .filter(|l| (l.contains("ERROR") || l.contains("WARN")) && !l.contains(FAIL_LINE))
        .collect();
    assert!(
        other_errors.is_empty(),
        "other errors while alpha's metadata failed writes: {other_errors:?}"
    );
    let injected = disk
        .log()
        .matches("injecting EIO error into pwrite")
        .count();
    assert!(
        injected >= 2,
        "nbdkit injected {injected} write errors, not one per failed write:\n{}",
        disk.log()
    );

    // The metadata takes writes again: the next write starts the new generation and succeeds.
    trigger.disarm();
    let t = Instant::now();
    let res = r.write_at(OFF_A, &d3, 0);
    println!(
        "{:?}: write 3 at {OFF_A}: {res:?} after {:?}",
        t0.elapsed(),
        t.elapsed()
    );
    assert_eq!(
        res,
        Ok(()),
        "the write after the metadata recovered failed\n{}",
        a.log_tail(20)
    );
    r.command(nbd_const::CMD_FLUSH, 0, 0, 0)
        .expect("flush after the recovery");
    r.disconnect();
    let lines = log_since(a, mark);
    let new_gen: Vec<&String> = lines.iter().filter(|l| l.contains(NEW_GEN_LINE)).collect();
    assert_eq!(
        new_gen.len(),
        1,
        "one new generation should have been started:\n{}",
        lines.join("\n")
    );
    let logged_id = new_gen[0]
        .split(NEW_GEN_LINE)
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("generation id in the log line")
        .to_string();
    assert_eq!(
        lines.iter().filter(|l| l.contains(FAIL_LINE)).count(),
        2,
        "the successful write logged a failure:\n{}",
        lines.join("\n")
    );
    let md1 = dump_md(a);
    let gen1 = md_field(&md1, "current-gen");
    assert_ne!(
        gen1, gen0,
        "the write succeeded, but the generation on disk is the old one"
    );
    assert_eq!(
        gen1, logged_id,
        "the generation on disk is not the one logged"
    );
    // The bitmap counts from the generation the peer still has.
    assert_eq!(md_field(&md1, "bitmap-gen"), gen0, "{md1:?}");
    assert!(
        md_field(&md1, "history-gen").starts_with(&gen0),
        "the old generation is not first in the history: {md1:?}"
    );
    assert_eq!(current_gen(b), gen0, "beta moved without alpha");
    assert_eq!(
        read_at(a.backing_path(), OFF_A, BLK),
        d3,
        "write 3 on alpha's disk"
    );
    let st = a.status_json();
    assert_eq!(st["role"], "primary", "{st}");
    assert_eq!(st["disk"], "up-to-date", "{st}");
    assert_eq!(io_counter(&st, "errors"), errors0 + 2, "{st}");
    assert!(
        st["replication"]["out_of_sync"]
            .as_u64()
            .is_some_and(|n| n >= BLK as u64),
        "the write made while the peer was away is not out of sync: {st}"
    );

    // The peer comes back: alpha is newer, brings beta up to date, and both end on alpha's
    // new generation with identical data.
    c.proxy().resume();
    let seen = watch(
        &c,
        Duration::from_secs(30),
        "in sync after the reconnect",
        pair_synced,
    );
    println!("{:?}: in sync again; states seen {seen:?}", t0.elapsed());
    c.assert_replicas_identical(size, "after the reconnect");
    assert_eq!(
        read_at(b.backing_path(), OFF_A, BLK),
        d3,
        "beta lacks write 3"
    );
    assert_eq!(
        read_at(b.backing_path(), OFF_B, BLK),
        base_b,
        "the failed write 2 reached beta"
    );
    let (ga, gb) = (current_gen(a), current_gen(b));
    assert_eq!(ga, gen1, "alpha's generation moved again on the reconnect");
    assert_eq!(gb, ga, "the pair is not on one generation after the resync");
    let lines = log_since(a, mark);
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("split brain") || l.contains("split-brain")),
        "a split brain was reported:\n{}",
        lines.join("\n")
    );

    assert_eq!(a.pids(), vec![pid_a], "alpha's daemon was replaced");
    assert_eq!(b.pids(), vec![pid_b], "beta's daemon was replaced");
    a.assert_alive();
    b.assert_alive();
    for n in [a, b] {
        assert!(
            !log_text(n).contains("panicked"),
            "{} panicked:\n{}",
            n.name(),
            n.log_tail(40)
        );
    }
    println!("--- alpha log since the cut ---\n{}", lines.join("\n"));
    println!("total {:?}", t0.elapsed());
    a.down();
    b.down();
    disk.close();
}
