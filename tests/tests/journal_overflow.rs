//! The journal overflows while the primary is the source of a bitmap resync and the peer has
//! stopped draining it, with the link still up.
//!
//! The code path (blockrep/src/replication.rs): an application write's `begin` finds the
//! journal full while the peer is connected and waits for space at most SPACE_WAIT (30 s);
//! then it gives up on the journal ("journal cannot take seq N (Full { .. }): the peer will
//! need a resync of the dirty bitmap"), marks what the journal held for the peer in the
//! bitmap, and the write goes on. The resync, waiting for journal space itself, then finds
//! `append_locked` returning `AppendError::Overflowed`, and `overflowed_error()` ends the
//! connection ("peer link: i/o: the journal overflowed: the peer is brought back by a bitmap
//! resync"); the next connection resyncs the bitmap.
//!
//! How the peer is made to stop draining while the link stays up. Pausing the harness's
//! `LinkProxy` does *not* do it: a paused proxy holds the pings too, so both nodes drop the
//! link after the 4 s liveness timeout ("timed out: no frame from the peer (ping timeout)"),
//! and the journal then overflows in `begin`'s disconnected branch at once, never after the
//! 30 s wait (checked while writing this test: with the proxy paused during a resync, a write
//! that found the journal full returned after 4.0 s, right after the ping-timeout line). So
//! here beta's *disk* hangs instead, as in `replication.rs`'s ko-count test: beta's backing
//! file is an nbdfuse file served by nbdkit's pause filter. Beta keeps answering pings (its
//! I/O runs on the sync engine's thread pool) but applies nothing, so alpha's acks stop and
//! the journal fills while the connection stays the same. `ko-count = 0` turns the stuck-peer
//! watchdog off, so that nothing but the journal overflow can end the stall.
//!
//! Which of two places notices the overflow first depends on alpha's sender: idle, it wakes
//! for the overflowing write at once and ends the link itself ("the journal lost sequence N
//! while streaming (overflow)"), and the resync never reaches `append_locked` again. To reach
//! `append_locked`'s `Overflowed`, the sender must be stuck in a socket write when the journal
//! overflows: beta stops reading once its apply window (128 records) is taken by writes its
//! disk never finishes, so the journal (64 MiB, the default) must hold more than the TCP
//! buffers between the nodes can (on loopback at most 4 MiB send + 32 MiB receive buffer).
//! That is why the nodes are connected directly (a proxy would add its own two buffers), the
//! protocol is A (application writes fill the journal without waiting for the peer), and the
//! test checks that records were still unsent just before the overflow.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blockrep_e2e::blocks::{check_tags, python, BLOCK_WRITER};
use blockrep_e2e::watch::{pair_synced, watch};
use blockrep_e2e::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const BLK: u64 = 4096;
/// Backing size of both nodes (metadata is external: all of it is exported).
const SIZE: u64 = 160 << 20;
/// The journal: the default size, more than the TCP buffers of a loopback link hold.
const JOURNAL: u64 = 64 << 20;
/// `SPACE_WAIT` in blockrep/src/replication.rs.
const SPACE_WAIT: Duration = Duration::from_secs(30);

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} is not a number in {v}"))
}

fn log_text(n: &Node) -> String {
    std::fs::read(n.log_path())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The node's log lines after the first `mark` lines.
fn log_since(n: &Node, mark: usize) -> Vec<String> {
    log_text(n).lines().skip(mark).map(str::to_string).collect()
}

/// The first line that contains every needle.
fn find<'a>(lines: &'a [String], needles: &[&str]) -> Option<&'a String> {
    lines.iter().find(|l| needles.iter().all(|n| l.contains(n)))
}

/// Starts `blocks::BLOCK_WRITER` (libnbd, 32 writes in flight, then a flush) in the
/// background: `pattern(tag, b)` to every block `b`. Killed on drop of the guard.
fn spawn_block_writer(py: &Path, dir: &Path, uri: &str, tag: u64, blocks: &[u64]) -> ChildGuard {
    let script = dir.join("block_writer.py");
    if !script.exists() {
        std::fs::write(&script, BLOCK_WRITER).expect("write block_writer.py");
    }
    let list = dir.join(format!("blocks-tag{tag}.txt"));
    let text: Vec<String> = blocks.iter().map(|b| b.to_string()).collect();
    std::fs::write(&list, text.join("\n")).expect("write block list");
    ChildGuard::spawn(
        Command::new(py)
            .arg(&script)
            .arg(uri)
            .arg(tag.to_string())
            .arg(&list),
        Some(&dir.join(format!("writer-tag{tag}.log"))),
    )
}

/// Whether the writer's output says it wrote (and flushed) all `n` blocks.
fn writer_ok(w: &ChildGuard, n: usize) -> bool {
    w.log().contains(&format!("wrote {n} blocks"))
}

/// Writes the blocks and waits for the writer (bounded), panicking with its output.
fn write_blocks_now(py: &Path, dir: &Path, uri: &str, tag: u64, blocks: &[u64]) {
    let mut w = spawn_block_writer(py, dir, uri, tag, blocks);
    assert!(
        w.wait_exit(LONG_TIMEOUT),
        "block writer (tag {tag}) did not finish: {}",
        w.log()
    );
    assert!(
        writer_ok(&w, blocks.len()),
        "block writer (tag {tag}) failed: {}",
        w.log()
    );
}

#[test]
fn journal_overflow_during_resync_with_a_stuck_peer_releases_writes_and_resyncs() {
    let Some(py) = python() else { return };
    if !have_tools(&["nbdkit", "nbdfuse", "fusermount3"]) {
        return;
    }
    let t0 = Instant::now();
    let c = Cluster::builder("jo-resync-stall")
        .nodes(2)
        .backing_size(SIZE)
        .protocol("A")
        // Beta's applies go through the thread pool, so its hung disk does not stop its
        // runtime (pings go on): the link stalls without dropping.
        .io_engine("sync")
        // Beta's metadata stays off the hung disk.
        .external_meta()
        .journal_size("64M")
        // A resync that is still running when beta's disk hangs (72 MiB dirty), and not too
        // long afterwards (about 140 MiB).
        .resource_line("resync-rate = \"20M\"")
        // No stuck-peer watchdog: only the journal overflow may end the stall.
        .resource_line("ko-count = 0")
        .build();
    let dir = c.dir().path().to_path_buf();
    // Torn down in this order on any exit: the daemons, then nbdkit and the FUSE mount.
    let (disk, ctl) = NbdkitFile::paused_memory(&dir, "beta-disk", SIZE);
    let file = disk.file();
    let _stop = StopDaemons(&c);
    let (a, b) = (c.alpha(), c.beta());
    b.back_with(&file);

    c.start_pair();
    c.wait_in_sync(SYNC_TIMEOUT);
    let size = a.size();
    assert_eq!(
        size, SIZE,
        "external metadata: the whole backing is exported"
    );
    assert_eq!(a.repl_u64("journal_size"), JOURNAL);
    let pid_a = a.pid().expect("alpha pid");
    let pid_b = b.pid().expect("beta pid");

    // Layout, in 4 KiB blocks: D0 0..18432 (72 MiB), base 19000..19256, fresh 20480..37888.
    // Base data both nodes have: tag 1.
    let base: Vec<u64> = (19000..19256).collect();
    write_blocks_now(&py, &dir, &a.uri(), 1, &base);
    c.wait_in_sync(SYNC_TIMEOUT);

    // A dirty region for a bitmap resync: D0, more than the journal, written while
    // standalone (tag 2).
    a.ctl_ok(&["disconnect"]);
    a.wait_repl(Duration::from_secs(5), "standalone", |r| {
        r["connection"] == "standalone"
    });
    let d0: Vec<u64> = (0..18432).collect();
    write_blocks_now(&py, &dir, &a.uri(), 2, &d0);
    let ra = a.repl();
    assert_eq!(
        u(&ra, "out_of_sync"),
        d0.len() as u64 * BLK,
        "what was written while standalone is not exactly alpha's bitmap: {ra}"
    );

    // Reconnect: a bitmap resync. Once it has made some progress, beta's disk hangs: alpha
    // stays sync-source on the same connection, and nothing it sends is applied any more.
    a.ctl_ok(&["connect"]);
    a.wait_repl(Duration::from_secs(15), "the source of a resync", |r| {
        r["connection"] == "sync-source" && r["resync_done"].as_u64().is_some_and(|d| d >= MIB)
    });
    let mark_a = log_text(a).lines().count();
    let mark_b = log_text(b).lines().count();
    pause_control(&ctl, b'p');
    // A resync target holds old and new regions until the end: the source must not show it
    // up to date (a cluster manager checks that before a switchover).
    let ra = a.repl();
    assert_eq!(ra["connection"], "sync-source", "{ra}");
    assert_eq!(
        ra["peer_disk"], "inconsistent",
        "the target's disk as the source shows it: {ra}"
    );
    println!(
        "{:?}: beta's disk paused during the resync: {}",
        t0.elapsed(),
        a.repl()
    );

    // Application writes during the stall (tag 3): over part of D0, over the base data, and
    // 68 MiB never written before, more than the journal holds. Under protocol A they are
    // acknowledged as soon as they are journaled, until the journal is full; then they wait
    // for space, and must complete anyway.
    let d1: Vec<u64> = (0..16)
        .map(|i| 37 + i * 1009)
        .chain((0..16).map(|i| 19003 + i * 13))
        .chain(20480..37888)
        .collect();
    let written_at = Instant::now();
    let mut writer = spawn_block_writer(&py, &dir, &a.uri(), 3, &d1);

    // While the writer waits: alpha must stay on the same connection, as the resync source,
    // until the journal is declared overflowed (SPACE_WAIT after the first write that found
    // it full), with records still waiting to go out (the sender stuck on a full socket).
    let overflow_needles = ["journal cannot take seq", "resync of the dirty bitmap"];
    let mut states: Vec<String> = Vec::new();
    let mut last_before: Option<Value> = None;
    let mut full_at: Option<Duration> = None;
    let mut overflow_after: Option<Duration> = None;
    let writer_done = loop {
        // Looked at before the log: a writer seen done is scanned for once more (its writes
        // completed after the overflow was logged).
        let running = writer.running();
        let lines = log_since(a, mark_a);
        if overflow_after.is_none() && find(&lines, &overflow_needles).is_some() {
            overflow_after = Some(written_at.elapsed());
        }
        if overflow_after.is_none() {
            let r = a.repl();
            if find(&log_since(a, mark_a), &overflow_needles).is_none() {
                let s = r["connection"].as_str().unwrap_or("?").to_string();
                if states.last() != Some(&s) {
                    states.push(s);
                }
                if full_at.is_none() && u(&r, "journal_used") >= JOURNAL - 4 * MIB {
                    full_at = Some(written_at.elapsed());
                    println!("{:?}: alpha's journal is full: {r}", t0.elapsed());
                }
                last_before = Some(r);
            }
        }
        if !running {
            break Some(written_at.elapsed());
        }
        if written_at.elapsed() > SPACE_WAIT + Duration::from_secs(25) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let lines_a = log_since(a, mark_a);
    let lines_b = log_since(b, mark_b);
    println!(
        "{:?}: writer done after {writer_done:?}; journal full after {full_at:?}; overflow \
         logged after {overflow_after:?}; alpha's states until then {states:?}\nlast status \
         before the overflow: {}\n--- alpha log since the pause ---\n{}\n--- beta log since \
         the pause ---\n{}",
        t0.elapsed(),
        last_before
            .as_ref()
            .map(|v| v.to_string())
            .unwrap_or_default(),
        lines_a.join("\n"),
        lines_b.join("\n")
    );

    // Both daemons are still the same, living processes.
    assert!(pid_alive(pid_a), "alpha's daemon died during the stall");
    assert!(pid_alive(pid_b), "beta's daemon died during the stall");
    for (n, l) in [("alpha", &lines_a), ("beta", &lines_b)] {
        assert!(
            find(l, &["panicked"]).is_none(),
            "{n} panicked:\n{}",
            l.join("\n")
        );
    }

    // The writes completed: no write blocks for ever on a journal the peer does not drain.
    let writer_done = writer_done.unwrap_or_else(|| {
        panic!(
            "the application writes made during the stall did not complete within {:?} \
             (SPACE_WAIT is {SPACE_WAIT:?}); writer output: {}\nalpha: {}",
            SPACE_WAIT + Duration::from_secs(25),
            writer.log(),
            a.repl()
        )
    });
    assert!(
        writer_ok(&writer, d1.len()),
        "the application writes during the stall failed: {}",
        writer.log()
    );

    // They completed because the journal overflowed SPACE_WAIT into a connected stall, not
    // because the link dropped for another reason first.
    let full_at = full_at.unwrap_or_else(|| {
        panic!(
            "alpha's journal never filled: {last_before:?}\n{}",
            lines_a.join("\n")
        )
    });
    let overflow = find(&lines_a, &overflow_needles).unwrap_or_else(|| {
        panic!(
            "alpha never logged the journal overflow ({overflow_needles:?}):\n{}",
            lines_a.join("\n")
        )
    });
    assert!(
        overflow.contains("WARN") && overflow.contains("the journal is full"),
        "{overflow}"
    );
    let overflow_after = overflow_after.expect("overflow seen while polling");
    // No write could wait for space before the writer started, and the first one that found
    // the journal full waited SPACE_WAIT (the journal filled `full_at` into the writes, as
    // seen by polling).
    assert!(
        full_at < Duration::from_secs(20),
        "the writes took {full_at:?} to fill the journal"
    );
    assert!(
        overflow_after >= SPACE_WAIT - Duration::from_secs(1)
            && overflow_after <= full_at + SPACE_WAIT + Duration::from_secs(10),
        "the journal was full {full_at:?} after the writes started and overflowed after \
         {overflow_after:?}; SPACE_WAIT is {SPACE_WAIT:?}"
    );
    assert!(
        writer_done >= overflow_after - Duration::from_secs(1),
        "the writes completed after {writer_done:?}, before the journal overflowed \
         ({overflow_after:?})"
    );
    let before_overflow: Vec<&String> = lines_a.iter().take_while(|l| *l != overflow).collect();
    for bad in [
        "ping timeout",
        "applied nothing",
        "ko-count",
        "peer link:",
        "connected from/to",
    ] {
        let hits: Vec<&&String> = before_overflow.iter().filter(|l| l.contains(bad)).collect();
        assert!(
            hits.is_empty(),
            "the link dropped or was re-made ({bad}) before the journal overflowed: {hits:?}"
        );
    }
    assert_eq!(
        states,
        vec!["sync-source".to_string()],
        "alpha left the resync before the journal overflowed"
    );
    let last_before = last_before.expect("a status before the overflow");
    assert!(
        u(&last_before, "seq_sent") < u(&last_before, "seq_written"),
        "just before the overflow alpha had sent every record: its sender was not stuck, so \
         the resync could not be the one to notice the overflow: {last_before}"
    );

    // The resync, the next time it tries the journal, finds it overflowed and ends the
    // connection, so that the next one resyncs the bitmap (polled: on a loaded machine the
    // writes may complete just before the resync's next try).
    let ends_link = |lines: &[String]| {
        lines
            .iter()
            .skip_while(|l| *l != overflow)
            .find(|l| l.contains("peer link:"))
            .cloned()
    };
    let mut drop_line = ends_link(&lines_a);
    let deadline = Instant::now() + Duration::from_secs(15);
    while drop_line.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        drop_line = ends_link(&log_since(a, mark_a));
    }
    let drop_line = drop_line.unwrap_or_else(|| {
        panic!(
            "alpha did not end the link after the overflow:\n{}",
            log_since(a, mark_a).join("\n")
        )
    });
    assert!(
        drop_line.contains("the journal overflowed: the peer is brought back by a bitmap resync"),
        "the link ended after the overflow, but not through the resync's append \
         (append_locked -> Overflowed): {drop_line}"
    );
    println!("overflow: {overflow}\nlink ended: {drop_line}");

    // Alpha has every write, and its bitmap records what beta lacks.
    let mut want: BTreeMap<u64, u64> = base.iter().map(|&b| (b, 1)).collect();
    for &blk in &d0 {
        want.insert(blk, 2);
    }
    for &blk in &d1 {
        want.insert(blk, 3);
    }
    check_tags(&a.backing_data(size), &want, "alpha after the stall");
    let ra = a.repl();
    assert!(
        u(&ra, "out_of_sync") >= d1.len() as u64 * BLK,
        "alpha's bitmap does not cover the writes made during the stall: {ra}"
    );
    assert_ne!(
        ra["connection"], "connected",
        "alpha reports connected to a peer whose disk still hangs: {ra}"
    );

    // Beta's disk answers again: the link comes back, a bitmap resync runs, the pair ends in
    // sync with identical replicas holding every write.
    let mark_a2 = log_text(a).lines().count();
    pause_control(&ctl, b'r');
    println!("{:?}: beta's disk resumed", t0.elapsed());
    let seen = watch(
        &c,
        Duration::from_secs(40),
        "in sync after the stall",
        pair_synced,
    );
    println!("{:?}: in sync; states seen {seen:?}", t0.elapsed());
    let after = log_since(a, mark_a2);
    let resync = find(&after, &["resync to the peer"]).unwrap_or_else(|| {
        panic!(
            "no resync after the stall (states seen {seen:?}):\n{}",
            after.join("\n")
        )
    });
    assert!(
        !resync.contains(", full"),
        "a full sync instead of a bitmap resync: {resync}"
    );
    assert!(
        find(&after, &["resync done"]).is_some(),
        "the resync after the stall did not finish:\n{}",
        after.join("\n")
    );
    c.assert_replicas_identical(size, "after the journal overflow and the bitmap resync");
    check_tags(&b.backing_data(size), &want, "beta after the bitmap resync");

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
    println!("total {:?}", t0.elapsed());
    a.down();
    b.down();
    disk.close();
}
