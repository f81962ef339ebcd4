//! `pause-sync` / `resume-sync` (DRBD's): an admin holds back the resync of a node that was
//! away (during business hours, say) while the application's writes go on replicating.
//!
//! Real daemons, real TCP (a proxy in front of beta cuts the link), libnbd writing known block
//! patterns. The pause is set before the link comes back, so the resync starts paused; it is
//! lifted, set again mid-resync, and lifted again; the replicas are then compared block by block.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use blockrep_e2e::blocks::*;
use blockrep_e2e::*;
use serde_json::Value;

const BLK: u64 = 4096;

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("no number {k} in {v}"))
}

/// Asserts that the resync sends nothing for `hold` (its progress does not move) and says it
/// is paused; returns the progress it stands at.
fn assert_resync_stands(a: &Node, hold: Duration, what: &str) -> u64 {
    let r0 = a.repl();
    let done = u(&r0, "resync_done");
    let end = Instant::now() + hold;
    while Instant::now() < end {
        let r = a.repl();
        assert_eq!(r["connection"], "sync-source", "{what}: {r}");
        assert_eq!(r["resync_paused"], true, "{what}: {r}");
        assert_eq!(
            u(&r, "resync_done"),
            done,
            "{what}: the paused resync went on sending: {r}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    done
}

#[test]
fn a_paused_resync_sends_nothing_while_writes_replicate_and_finishes_after_resume() {
    let Some(py) = python() else { return };
    let c = Cluster::builder("pause-sync")
        .nodes(2)
        .backing_size(128 << 20)
        .journal_size("2M")
        .resource_line("resync-rate = \"1M\"")
        .beta_via_proxy()
        .build();
    c.start_pair();
    c.wait_in_sync(SYNC_TIMEOUT);
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let dir = c.dir().path();

    // Nothing to pause yet: the pause waits for the next resync.
    let out = a.ctl_ok(&["pause-sync"]).stdout;
    assert!(out.contains("will wait"), "{out}");
    let out = a.ctl_ok(&["pause-sync"]).stdout;
    assert!(out.contains("already paused"), "{out}");

    // Away for longer than the journal holds: 1024 blocks every other block from block
    // 4096 (4 MiB, twice the journal), so the link comes back to a bitmap resync.
    assert!(c.proxy().cut_and_refuse() >= 1, "no live link to cut");
    a.wait_not_connected(Duration::from_secs(10));
    let dirty: Vec<u64> = (0..1024).map(|i| 4096 + 2 * i).collect();
    write_blocks(&py, dir, &a.uri(), 1, &dirty);
    let dirty_bytes = dirty.len() as u64 * BLK;
    assert!(a.repl_u64("out_of_sync") >= dirty_bytes, "{}", a.repl());

    c.proxy().resume();
    let r = a.wait_repl(Duration::from_secs(20), "a paused sync source", |r| {
        r["connection"] == "sync-source" && u(r, "resync_total") > 0
    });
    assert_eq!(r["resync_paused"], true, "{r}");
    let done = assert_resync_stands(a, Duration::from_secs(2), "paused from its start");
    assert_eq!(done, 0, "the resync sent before its pause was lifted");
    let status = a.ctl_ok(&["status"]).stdout;
    assert!(status.contains("PAUSED (pause-sync"), "{status}");
    // A wait for the sync says why it cannot end.
    let out = a.ctl(&["wait-sync", "--timeout", "1"]);
    assert!(
        !out.success() && out.all_output().contains("resync PAUSED (pause-sync"),
        "{}",
        out.describe()
    );
    let ev = a.ctl_ok(&["events", "--now"]).stdout;
    assert!(
        ev.lines()
            .any(|l| l.starts_with("exists peer-device") && l.contains("resync-suspended:user")),
        "{ev}"
    );
    // The target cannot pause what the source sends: it is told where to ask.
    let out = b.ctl(&["pause-sync"]);
    assert!(
        !out.success()
            && out
                .all_output()
                .contains("run pause-sync on its source, alpha"),
        "{}",
        out.describe()
    );
    assert_eq!(b.repl()["connection"], "sync-target");
    // The target says why its resync stands still (DRBD's `resync-suspended:peer`), and
    // where a resume must be run.
    let r = b.wait_repl(Duration::from_secs(5), "the target seeing the pause", |r| {
        r["resync_paused_by_peer"] == true
    });
    assert_eq!(r["resync_paused"], false, "{r}");
    let status = b.ctl_ok(&["status"]).stdout;
    assert!(status.contains("PAUSED by the source"), "{status}");
    let ev = b.ctl_ok(&["events", "--now"]).stdout;
    assert!(
        ev.lines()
            .any(|l| l.starts_with("exists peer-device") && l.contains("resync-suspended:peer")),
        "{ev}"
    );
    let out = b.ctl(&["resume-sync"]);
    assert!(
        !out.success() && out.all_output().contains("run resume-sync on alpha"),
        "{}",
        out.describe()
    );

    // The application goes on meanwhile: its writes (elsewhere) reach beta while the resync
    // stands.
    let during: Vec<u64> = (0..64).map(|i| 8192 + i).collect();
    write_blocks(&py, dir, &a.uri(), 2, &during);
    a.wait_repl(
        Duration::from_secs(10),
        "writes applied during the pause",
        |r| u(r, "seq_applied") == u(r, "seq_written"),
    );
    assert_resync_stands(
        a,
        Duration::from_millis(500),
        "after writes during the pause",
    );
    let want_during: BTreeMap<u64, u64> = during.iter().map(|b| (*b, 2)).collect();
    check_tags(
        &b.backing_data(size),
        &want_during,
        "beta: the writes made during the pause",
    );

    // Resumed: it sends; paused again mid-way: it stops (after the region in flight).
    let out = a.ctl_ok(&["resume-sync"]).stdout;
    assert!(out.contains("goes on"), "{out}");
    a.wait_repl(Duration::from_secs(20), "the resync going on", |r| {
        u(r, "resync_done") > 0
    });
    b.wait_repl(
        Duration::from_secs(5),
        "the target seeing the resume",
        |r| r["resync_paused_by_peer"] == false,
    );
    // Paused once the sender parks (it finishes the region in flight first), which it logs.
    let parked = || a.log_count("resync paused (pause-sync)");
    let parked_before = parked();
    a.ctl_ok(&["pause-sync"]);
    wait_for(Duration::from_secs(20), || {
        parked() > parked_before || a.repl()["connection"] != "sync-source"
    });
    let r = a.repl();
    if r["connection"] == "sync-source" {
        let done = assert_resync_stands(a, Duration::from_secs(2), "paused mid-way");
        assert!(done < u(&r, "resync_total"), "{r}");
    } else {
        // 4 MiB at 1 MiB/s: only a host that stalled for seconds gets here.
        println!("the resync ended before the second pause: {r}");
    }
    a.ctl_ok(&["resume-sync"]);
    let out = a.ctl_ok(&["resume-sync"]).stdout;
    assert!(out.contains("not paused"), "{out}");

    c.wait_in_sync(Duration::from_secs(60));
    assert_eq!(a.repl()["resync_paused"], false);
    c.assert_replicas_identical(size, "after a paused resync");
    let mut want: BTreeMap<u64, u64> = dirty.iter().map(|b| (*b, 1)).collect();
    want.extend(want_during);
    check_tags(&b.backing_data(size), &want, "beta after the paused resync");
    let log = std::fs::read_to_string(a.log_path()).unwrap_or_default();
    for line in ["resync paused (pause-sync)", "resync resumed (resume-sync)"] {
        assert!(log.contains(line), "alpha's log lacks {line:?}");
    }
}
