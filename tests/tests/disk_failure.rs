//! A primary's backing disk fails a sync: the kernel may have dropped written pages, and
//! nothing says which. The disk must never be a sync source again before the peer has given it
//! everything (DRBD detaches it), and the node must still be able to go down.
//!
//! How the sync fails: alpha's backing (internal metadata, so the superblock too) is a loop
//! device over an nbdfuse file served by nbdkit's `file` plugin behind the `error` filter with
//! `error-pwrite-rate=1` and `error-pwrite-file=TRIGGER`. The loop device buffers writes in its
//! page cache, so a write still completes while TRIGGER exists; its writeback fails, and the
//! next fdatasync reports EIO (the kernel may drop those pages), as a failing disk does.
//!
//! Before the fix (found by a fault trial): `secondary` and `down` were refused ("flush
//! failed"), the only way down was a signal, and the restarted node, up to date and a crashed
//! primary, resynced its damaged extents over the peer's good copy.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use blockrep_e2e::nbd_const::*;
use blockrep_e2e::watch::{wait_synced, Seen};
use blockrep_e2e::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

fn log_text(n: &Node) -> String {
    std::fs::read(n.log_path())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Log marks of both nodes (lines so far), for [`resynced_from`].
fn marks(c: &Cluster) -> (usize, usize) {
    (
        log_text(c.alpha()).lines().count(),
        log_text(c.beta()).lines().count(),
    )
}

/// Whether `target` was the target of a resync from `source` since `marks` (alpha's, beta's),
/// by the daemons' own record: a resync over mostly zero regions can be over between two
/// polls of their state.
fn resynced_from(c: &Cluster, source: &Node, target: &Node, marks: (usize, usize)) -> bool {
    let since = |n: &Node| {
        let mark = if n.name() == c.alpha().name() {
            marks.0
        } else {
            marks.1
        };
        log_text(n)
            .lines()
            .skip(mark)
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let from = format!("resync from {}:", source.name());
    since(source)
        .iter()
        .any(|l| l.contains("resync to the peer ("))
        && since(target).iter().any(|l| l.contains(&from))
}

/// A node's disk, made by create-md as a plain file (`DIR/NAME-disk.img`), then put behind
/// nbdkit's error filter (writes fail while the trigger exists) and a loop device, which the
/// node's backing path then names. Returns them in the order they must be torn down last to
/// first: declare the daemons' guard after them.
fn failing_disk(c: &Cluster, node: &Node) -> (ErrorTrigger, NbdkitFile, LoopDev) {
    let dir = c.dir().path().to_path_buf();
    let name = node.name();
    let img = dir.join(format!("{name}-disk.img"));
    let trigger = ErrorTrigger(dir.join(format!("{name}-disk.fail")));
    node.create_md();
    std::fs::rename(node.backing_path(), &img).expect("move the node's disk");
    let disk = NbdkitFile::start(
        &dir,
        &format!("{name}-disk"),
        &[
            "--filter=error".into(),
            "file".into(),
            img.display().to_string(),
            "error=EIO".into(),
            "error-pwrite-rate=1".into(),
            format!("error-pwrite-file={}", trigger.0.display()),
        ],
        &[],
    );
    let lo = LoopDev::attach(&disk.file());
    std::os::unix::fs::symlink(lo.dev(), node.backing_path()).expect("symlink the backing path");
    (trigger, disk, lo)
}

fn failing_alpha_disk(c: &Cluster) -> (ErrorTrigger, NbdkitFile, LoopDev) {
    failing_disk(c, c.alpha())
}

/// The pair these tests use: protocol C, an 8 MiB journal, `SIZE` backing files.
fn pair_cluster(name: &str) -> Cluster {
    Cluster::builder(name)
        .nodes(2)
        .backing_size(SIZE)
        .protocol("C")
        .journal_size("8M")
        .build()
}

/// After `failing_disk` made the other node's metadata: `good`'s too, both up (alpha
/// primary), and the initial sync finished.
fn start_in_sync(c: &Cluster, good: &Node) {
    good.create_md();
    c.up_pair();
    c.wait_in_sync(SYNC_TIMEOUT);
}

/// Overwrites `[off, off + len)` of a failing disk with zeros, as the pages the kernel dropped
/// after a failed writeback (through the FUSE file, so that no cache on the way keeps the
/// new bytes; the loop device's cache went with the daemon's last descriptor).
fn drop_on_disk(disk: &NbdkitFile, off: u64, len: usize) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(disk.file())
        .expect("open the failing disk");
    f.write_all_at(&vec![0u8; len], off)
        .expect("drop the write on the disk");
    f.sync_all().expect("sync the disk");
}

#[test]
fn a_primary_whose_disk_lost_writes_goes_down_and_takes_a_full_resync_from_its_peer() {
    if !have_tools(&["nbdkit", "nbdfuse", "fusermount3"]) {
        return;
    }
    // Paced, so that the full resync below can be cut midway.
    let c = Cluster::builder("disk-lost")
        .nodes(2)
        .backing_size(SIZE)
        .protocol("C")
        .journal_size("8M")
        .resource_line("resync-rate = \"8M\"")
        .build();
    let (a, b) = (c.alpha(), c.beta());
    let (trigger, disk, _lo) = failing_alpha_disk(&c);
    let _stop = StopDaemons(&c);
    start_in_sync(&c, b);
    let size = a.size();
    // Data all over the device (zeros would travel as headers, unpaced).
    let fill = c.dir().path().join("fill.bin");
    write_random_file(&fill, (40 * MIB) as usize);
    a.nbdcopy_in(&fill);

    let base = random_bytes(MIB as usize);
    let mut r = a.raw_open();
    r.write_at(MIB, &base, 0).expect("base write");
    r.command(CMD_FLUSH, 0, 0, 0)
        .expect("a flush while the disk works");

    // The disk starts failing its syncs: a write still completes (protocol C: beta has it),
    // the flush after it fails.
    trigger.arm();
    let lost = random_bytes(MIB as usize);
    r.write_at(3 * MIB, &lost, 0)
        .expect("a write before the failing flush");
    assert_eq!(
        r.command(CMD_FLUSH, 0, 0, 0),
        Err(EIO),
        "a flush on a disk whose sync fails"
    );
    r.disconnect();
    let mut st = a.status_json();
    let marked = wait_for(Duration::from_secs(10), || {
        st = a.status_json();
        st["disk"] == "inconsistent"
    });
    assert!(marked, "alpha's failed disk is not shown: {st}");
    assert_eq!(st["role"], "primary", "{st}");
    assert_eq!(st["disk_failed"], true, "{st}");
    let text = a.ctl_ok(&["status"]).stdout;
    assert!(text.contains("FAILED"), "the text status hides it:\n{text}");
    assert!(
        st["replication"]["out_of_sync"].as_u64() >= Some(size - MIB),
        "the failed disk's every region is out of sync: {st}"
    );
    // Said once the failed disk's bitmap was written (or failed to be): the status shows
    // the disk inconsistent before that.
    assert!(
        wait_for(Duration::from_secs(10), || log_text(a)
            .contains("disk lost writes")),
        "alpha's log does not say its disk lost writes:\n{}",
        a.log_tail(20)
    );
    assert_same_bytes(
        &b.backing_data(4 * MIB)[3 * MIB as usize..],
        &lost,
        "beta holds the write",
    );

    // The disk takes syncs again; the node is restarted. `down` must work although the
    // flush that stopping the export does fails (every sync after a failed one does).
    trigger.disarm();
    a.ctl_ok(&["down"]);
    // What the kernel dropped: the write's range on alpha's disk holds its old bytes.
    drop_on_disk(&disk, 3 * MIB, MIB as usize);
    let md = a.ctl_ok(&["dump-md"]).stdout;
    assert!(
        md.lines()
            .any(|l| l.starts_with("disk") && l.contains("inconsistent")),
        "the failed disk is not recorded as inconsistent:\n{md}"
    );

    let mb = log_text(b).lines().count();
    a.up();
    let st = a.status_json();
    assert_eq!(st["role"], "secondary", "{st}");
    assert_eq!(st["disk"], "inconsistent", "{st}");
    assert_eq!(
        st["disk_failed"], false,
        "a new start has seen no failure yet: {st}"
    );
    // Cut midway (beta, the source, leaves and comes back): the full resync resumes with
    // what is left (it used to start again from zero: alpha's failed disk named every region
    // until the resync ended).
    b.wait_repl(
        Duration::from_secs(30),
        "a quarter of alpha's resync",
        |r| {
            let total = r["resync_total"].as_u64().unwrap_or(0);
            r["connection"] == "sync-source"
                && total > 0
                && r["resync_done"].as_u64() >= Some(total / 4)
        },
    );
    // Held there until the cut (`pause-sync` on the source): the rest could go first on a
    // loaded machine.
    b.ctl_ok(&["pause-sync"]);
    let r = b.repl();
    assert!(
        r["resync_done"].as_u64() < r["resync_total"].as_u64(),
        "the resync ended before the cut: {r}"
    );
    b.ctl_ok(&["disconnect"]);
    b.ctl_ok(&["resume-sync"]);
    let left = b.repl_u64("out_of_sync");
    let m = marks(&c);
    b.ctl_ok(&["connect"]);
    let seen = wait_synced(&c, Duration::from_secs(60), "alpha resynced from beta");
    assert!(
        resynced_from(&c, b, a, m) && !Seen::has(&seen.alpha, "sync-source"),
        "alpha must be the target: {seen:?}"
    );
    let lb: Vec<String> = log_text(b).lines().skip(mb).map(str::to_string).collect();
    let starts: Vec<(&String, u64)> = lb
        .iter()
        .filter(|l| l.contains("resync to the peer ("))
        .map(|l| {
            let n = l
                .rsplit("): ")
                .next()
                .and_then(|t| t.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(u64::MAX);
            (l, n)
        })
        .collect();
    println!("beta's resyncs: {starts:#?}");
    assert!(
        starts.len() == 2
            && starts[0].1 >= size - MIB
            && left < starts[0].1 - starts[0].1 / 8
            && starts[1].1 <= left + MIB,
        "beta should resync the whole device to alpha, then after the cut what was left \
         ({left} bytes):\n{}",
        lb.join("\n")
    );
    c.assert_replicas_identical(size, "after alpha's full resync");
    assert_same_bytes(
        &a.backing_data(4 * MIB)[3 * MIB as usize..],
        &lost,
        "alpha got the write it lost back from beta",
    );
    assert_same_bytes(
        &a.backing_data(2 * MIB)[MIB as usize..],
        &base,
        "alpha's earlier write",
    );
}

/// A secondary's disk hangs (nbdkit's pause filter under its backing file): its `status` shows
/// the stream's writes in flight and for how long the disk has completed none (DRBD's
/// pending count), in the JSON and as a line of the text; once the disk goes on, both clear
/// and the write that waited (protocol C) completes.
#[test]
fn a_hung_disk_shows_in_status_and_clears_when_it_goes_on() {
    if !have_tools(&["nbdkit", "nbdfuse", "fusermount3"]) {
        return;
    }
    let c = Cluster::builder("disk-hung")
        .nodes(2)
        .backing_size(SIZE)
        .protocol("C")
        // The sync engine's threads wait on the hung disk; with io_uring a small write is
        // copied into the page cache on the daemon's thread (a FUSE file: written through),
        // and the whole daemon waits, `status` included (it then exits 4, "hung, or stalled
        // on its disk").
        .io_engine("sync")
        .journal_size("8M")
        .external_meta()
        .resource_line("ko-count = 0")
        .build();
    // Torn down in this order on any exit: the daemons (which hold the FUSE file), then
    // nbdkit and the FUSE mount.
    let (disk, ctl) = NbdkitFile::paused_memory(c.dir().path(), "beta-disk", SIZE);
    let _stop = StopDaemons(&c);
    let (a, b) = (c.alpha(), c.beta());
    b.back_with(&disk.file());
    c.start_pair();
    c.wait_in_sync(SYNC_TIMEOUT);
    let io = b.status_json()["io"].clone();
    assert_eq!(io["stalled_s"], 0, "an idle disk is not stalled: {io}");

    let pause = |cmd: u8| pause_control(&ctl, cmd);
    pause(b'p');
    let data = random_bytes(64 * 1024);
    let uri = a.export().clone();
    let name = c.resource().to_string();
    let writer = std::thread::spawn({
        let data = data.clone();
        move || {
            let mut r = RawNbd::open(&uri, &name);
            // Answered only after the test saw 6 s of stall and resumed the disk: longer
            // than the client's usual 10 s on a loaded machine.
            r.set_read_timeout(Duration::from_secs(120));
            let res = r.write_at(2 * MIB, &data, 0);
            r.disconnect();
            res
        }
    });
    let mut io = b.status_json()["io"].clone();
    let stalled = wait_for(Duration::from_secs(20), || {
        io = b.status_json()["io"].clone();
        io["inflight"].as_u64() >= Some(1) && io["stalled_s"].as_u64() >= Some(6)
    });
    assert!(stalled, "beta's hung disk does not show: {io}");
    let text = b.ctl_ok(&["status"]).stdout;
    assert!(
        text.contains("DISK STALLED"),
        "the text status does not say the disk is stalled:\n{text}"
    );
    assert!(
        !writer.is_finished(),
        "the write completed on a hung peer disk under C"
    );

    pause(b'r');
    let done = writer.join().expect("writer thread");
    assert_eq!(done, Ok(()), "the write after the disk went on");
    let mut io = b.status_json()["io"].clone();
    let cleared = wait_for(Duration::from_secs(10), || {
        io = b.status_json()["io"].clone();
        io["stalled_s"] == 0
    });
    assert!(cleared, "the stall did not clear: {io}");
    c.wait_in_sync(SYNC_TIMEOUT);
    assert_same_bytes(
        &b.backing_data(2 * MIB + data.len() as u64)[2 * MIB as usize..],
        &data,
        "beta after its disk went on",
    );
}

/// Writes `data` at `off` through `n`'s export in pieces of `piece` bytes, then flushes.
fn write_flushed(n: &Node, off: u64, data: &[u8], piece: u64) {
    let mut r = n.raw_open();
    for (i, chunk) in data.chunks(piece as usize).enumerate() {
        r.write_at(off + i as u64 * piece, chunk, 0).expect("write");
    }
    r.command(CMD_FLUSH, 0, 0, 0).expect("flush");
    r.disconnect();
}

/// The log lines of alpha and beta so far (see [`resynced_after_going_back`]).
fn log_marks(c: &Cluster) -> (usize, usize) {
    let lines = |n: &Node| log_text(n).lines().count();
    (lines(c.alpha()), lines(c.beta()))
}

/// After `restored`'s disk went back to an image and the pair came up: waits until they are
/// in sync, and checks that `restored` was the sync target, that both logs since `marks`
/// name its rollback, and that the replicas are identical.
fn resynced_after_going_back(c: &Cluster, restored: &Node, marks: (usize, usize)) {
    let (a, b) = (c.alpha(), c.beta());
    let name = restored.name();
    let seen = wait_synced(
        c,
        Duration::from_secs(90),
        &format!("{name} resynced after its restore"),
    );
    let (other, source) = if name == a.name() {
        (&seen.beta, b)
    } else {
        (&seen.alpha, a)
    };
    assert!(
        resynced_from(c, source, restored, marks) && !Seen::has(other, "sync-target"),
        "{name} was not the target of the resync: {seen:?}"
    );
    let said = |n: &Node, mark: usize| {
        let needle = format!("{name}'s disk went back in time");
        log_text(n).lines().skip(mark).any(|l| l.contains(&needle))
    };
    assert!(
        said(a, marks.0) && said(b, marks.1),
        "the restore was not named on both nodes ({seen:?}):\nalpha:\n{}\nbeta:\n{}",
        log_text(a),
        log_text(b)
    );
    c.assert_replicas_identical(a.size(), &format!("after {name}'s restore and resync"));
}

/// Beta's disk goes back to `snap` (beta is stopped), beta comes up, and alpha must notice
/// that beta lost writes it had acknowledged as durable and resync until both are in sync.
fn restore_and_resync(c: &Cluster, snap: &std::path::Path) {
    let (a, b) = (c.alpha(), c.beta());
    std::fs::copy(snap, b.backing_path()).expect("beta's disk goes back in time");
    let mark = log_text(a).lines().count();
    b.up();
    let seen = wait_synced(
        c,
        Duration::from_secs(90),
        "beta resynced after its rollback",
    );
    let la: Vec<String> = log_text(a).lines().skip(mark).map(str::to_string).collect();
    assert!(
        la.iter()
            .any(|l| l.contains("lost writes it had made durable")),
        "alpha did not notice beta's rollback ({seen:?}):\n{}",
        la.join("\n")
    );
}

/// A secondary's disk goes back in time (restored from a snapshot taken before writes it
/// had acknowledged as durable: a VM rollback, or a write cache that ignored flushes). The
/// generations match, so they say nothing; the primary remembers what the peer made durable
/// and resyncs everything, instead of taking the peer for caught up by a short catch-up
/// (before: "in sync" with thousands of stale blocks that only `verify` found).
#[test]
fn a_secondary_disk_restored_from_an_old_snapshot_is_fully_resynced() {
    let c = pair_cluster("disk-rollback");
    c.start_pair();
    c.wait_in_sync(SYNC_TIMEOUT);
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let (snap, later) = image_of_beta_then_later_writes(&c);

    b.down();
    restore_and_resync(&c, &snap);
    c.assert_replicas_identical(size, "after beta's rollback and resync");
    assert_same_bytes(
        &b.backing_data(12 * MIB)[4 * MIB as usize..],
        &later,
        "beta has the writes its old disk lacked",
    );
}

/// Trial 8's finding: an image of the primary's disk, metadata included, restored at the
/// peer's generation came back as a crashed primary and resynced its old hot extents over
/// the peer's newer writes (its other extents kept the image's data beside the peer's newer
/// ones). The peer remembers what the primary's disk held (`Msg::Durable`); the restored node
/// holds less, so it is the target of a full sync from the peer and both end with the newer
/// data. Before the fix: alpha was the source, and the newer writes were gone.
#[test]
fn a_primary_disk_restored_from_an_image_of_itself_is_resynced_from_its_peer() {
    restored_primary_image("primary-restored", false);
}

/// The same with the peer's daemon restarted in between: what it heard is in its metadata.
#[test]
fn a_restored_primary_image_is_recognised_by_a_peer_restarted_since() {
    restored_primary_image("primary-restored-peer-restarted", true);
}

fn restored_primary_image(name: &str, restart_beta: bool) {
    let c = pair_cluster(name);
    c.start_pair();
    c.wait_in_sync(SYNC_TIMEOUT);
    let (a, b) = (c.alpha(), c.beta());
    write_flushed(a, 0, &random_bytes(4 * MIB as usize), MIB);
    c.wait_in_sync(SYNC_TIMEOUT);
    // The image: alpha is primary and idle, its hot extents in its activity log.
    let at_image = a.repl()["seq_written"].as_u64().unwrap_or(0);
    let image = c.dir().join("alpha-image.img");
    std::fs::copy(a.backing_path(), &image).expect("image alpha's disk");
    // Newer writes in one batch, flushed and replicated: over the image's hot extents and
    // elsewhere (the cold ones in 2048 small writes: more sequences than the full sync below
    // takes, so that alpha, synced in full, still holds less than the mark beta heard).
    let hot = random_bytes(2 * MIB as usize);
    let cold = random_bytes(8 * MIB as usize);
    {
        let mut r = a.raw_open();
        for (i, chunk) in hot.chunks(MIB as usize).enumerate() {
            r.write_at(i as u64 * MIB, chunk, 0).expect("write");
        }
        for (i, chunk) in cold.chunks(4096).enumerate() {
            r.write_at(24 * MIB + i as u64 * 4096, chunk, 0)
                .expect("write");
        }
        r.command(CMD_FLUSH, 0, 0, 0).expect("flush");
        r.disconnect();
    }
    c.wait_in_sync(SYNC_TIMEOUT);
    // Trial 9: a flush commits the issued mark of the writes before it, so after a single
    // batch that mark stood before it for as long as alpha stayed idle; the idle persister
    // commits the rest, and beta hears all of it.
    let written = a.repl()["seq_written"].as_u64().unwrap_or(0);
    assert!(written > at_image + 2048, "alpha wrote through {written}");
    b.wait_repl(
        Duration::from_secs(20),
        "beta heard that alpha's disk holds every newer write",
        |r| r["peer_disk_holds"].as_u64().unwrap_or(0) >= written,
    );
    if restart_beta {
        // Beta goes down cleanly (its last commit carries what it heard) and stays down
        // until alpha is back: all it knows then is in its metadata.
        b.down();
    }
    a.kill9_and_wait();
    std::fs::copy(&image, a.backing_path()).expect("restore alpha's disk from its image");
    let marks = log_marks(&c);
    if restart_beta {
        b.up();
    }
    a.up();
    resynced_after_going_back(&c, a, marks);
    for (n, name) in [(a, "alpha"), (b, "beta")] {
        let d = n.backing_data(32 * MIB);
        assert_same_bytes(
            &d[..2 * MIB as usize],
            &hot,
            &format!("{name}'s newer hot writes"),
        );
        assert_same_bytes(
            &d[24 * MIB as usize..],
            &cold,
            &format!("{name}'s newer writes elsewhere"),
        );
    }
    // Review finding: synced in full, alpha's sequences stay below the mark beta heard from
    // its old disk; kept, that mark made every later connect another full sync.
    let (ma, mb) = log_marks(&c);
    a.down();
    a.up();
    let seen = wait_synced(&c, Duration::from_secs(30), "in sync again after a restart");
    assert!(
        !Seen::has(&seen.alpha, "sync-target") && !Seen::has(&seen.beta, "sync-source"),
        "a second resync after alpha's restart: {seen:?}"
    );
    let named = |n: &Node, mark: usize| {
        log_text(n)
            .lines()
            .skip(mark)
            .any(|l| l.contains("went back in time"))
    };
    assert!(
        !named(a, ma) && !named(b, mb),
        "alpha taken for a rollback again:\n{}",
        log_text(b)
    );
}

/// Trial 9: the image of alpha is restored after beta took over (a switchover: alpha went
/// down cleanly, beta was promoted to a new generation and wrote on). The generations make it
/// a bitmap resync from beta, but beta's bitmap counts only from its promotion: alpha's
/// writes after the image, which beta had, were in no bitmap and the replicas diverged with
/// both up to date. Beta remembers what alpha's disk held at the old generation: a full sync.
#[test]
fn a_primary_image_restored_after_its_peer_took_over_is_resynced_in_full() {
    let c = pair_cluster("primary-restored-after-takeover");
    c.start_pair();
    c.wait_in_sync(SYNC_TIMEOUT);
    let (a, b) = (c.alpha(), c.beta());
    let write = |n: &Node, off: u64, data: &[u8]| write_flushed(n, off, data, MIB);
    write(a, 0, &random_bytes(4 * MIB as usize));
    c.wait_in_sync(SYNC_TIMEOUT);
    let image = c.dir().join("alpha-image.img");
    std::fs::copy(a.backing_path(), &image).expect("image alpha's disk");
    let t2 = random_bytes(2 * MIB as usize);
    write(a, 8 * MIB, &t2);
    c.wait_in_sync(SYNC_TIMEOUT);
    let written = a.repl()["seq_written"].as_u64().unwrap_or(0);
    b.wait_repl(
        Duration::from_secs(20),
        "beta heard that alpha's disk holds the newer writes",
        |r| r["peer_disk_holds"].as_u64().unwrap_or(0) >= written,
    );
    // The switchover: alpha down cleanly, beta promoted (a new generation), beta writes.
    a.ctl_ok(&["secondary"]);
    a.down();
    b.ctl_ok(&["primary"]);
    let t3 = random_bytes(MIB as usize);
    write(b, 32 * MIB, &t3);
    std::fs::copy(&image, a.backing_path()).expect("restore alpha's disk from its image");
    let marks = log_marks(&c);
    a.up();
    resynced_after_going_back(&c, a, marks);
    let d = a.backing_data(33 * MIB);
    assert_same_bytes(
        &d[8 * MIB as usize..10 * MIB as usize],
        &t2,
        "alpha's writes after its image",
    );
    assert_same_bytes(&d[32 * MIB as usize..], &t3, "beta's writes as primary");
}

/// The other half of trial 8's finding: an image of a secondary's disk restored while its
/// primary restarted looked in sync (the primary's memory of what the secondary had
/// acknowledged as durable went with its restart), and the pair ran on at one generation with
/// the secondary's stale blocks, which only `verify` found. The primary keeps that mark in
/// its metadata now (committed once it stands still, so a kill -9 right after a burst keeps
/// it too): the restored node holds less and is resynced in full.
#[test]
fn a_secondary_disk_restored_while_its_primary_restarted_is_fully_resynced() {
    let c = pair_cluster("secondary-restored-primary-restarted");
    c.start_pair();
    c.wait_in_sync(SYNC_TIMEOUT);
    let (a, b) = (c.alpha(), c.beta());
    let write = |off: u64, data: &[u8]| write_flushed(a, off, data, MIB);
    write(0, &random_bytes(2 * MIB as usize));
    c.wait_in_sync(SYNC_TIMEOUT);
    let at_image = b.repl()["seq_applied"].as_u64().unwrap_or(0);
    b.down();
    let image = c.dir().join("beta-image.img");
    std::fs::copy(b.backing_path(), &image).expect("image beta's disk");
    b.up();
    c.wait_in_sync(SYNC_TIMEOUT);
    let later = random_bytes(8 * MIB as usize);
    write(4 * MIB, &later);
    write(16 * MIB, &later[..MIB as usize]);
    c.wait_in_sync(SYNC_TIMEOUT);
    a.wait_repl(
        Duration::from_secs(20),
        "alpha heard that beta's disk holds the later writes",
        |r| r["peer_disk_holds"].as_u64().unwrap_or(0) > at_image,
    );
    // Alpha's metadata takes the mark once it stands still (the acknowledgement of the last
    // flush comes after that flush's own commit); then alpha dies, beta goes down, and beta's
    // disk goes back.
    let heard = a.repl()["peer_disk_holds"].as_u64().unwrap_or(0);
    assert!(
        wait_for(Duration::from_secs(10), || committed_peer_durable(a).1
            >= heard),
        "alpha's metadata does not hold beta's durable mark {heard}:\n{}",
        a.ctl_ok(&["dump-md"]).stdout
    );
    kill_alpha_and_restore_beta(&c, &image, &later);
}

/// Alpha (primary) writes 2 MiB at 0, beta's disk is imaged while beta is down, then alpha
/// writes 8 MiB more at 4 MiB: returns the image and those later bytes (beta holds them
/// durably, the image not).
fn image_of_beta_then_later_writes(c: &Cluster) -> (std::path::PathBuf, Vec<u8>) {
    let (a, b) = (c.alpha(), c.beta());
    write_flushed(a, 0, &random_bytes(2 * MIB as usize), MIB);
    c.wait_in_sync(SYNC_TIMEOUT);
    b.down();
    let image = c.dir().join("beta-image.img");
    std::fs::copy(b.backing_path(), &image).expect("image beta's disk");
    b.up();
    c.wait_in_sync(SYNC_TIMEOUT);
    let later = random_bytes(8 * MIB as usize);
    write_flushed(a, 4 * MIB, &later, MIB);
    c.wait_in_sync(SYNC_TIMEOUT);
    (image, later)
}

/// Alpha dies, then see [`restore_beta_and_resync`].
fn kill_alpha_and_restore_beta(c: &Cluster, image: &std::path::Path, later: &[u8]) {
    c.alpha().kill9_and_wait();
    restore_beta_and_resync(c, image, later);
}

/// With alpha stopped: beta goes down and its disk goes back to `image`; both come up, and
/// beta must be recognised and fully resynced, ending with `later` (written at 4 MiB after
/// the image).
fn restore_beta_and_resync(c: &Cluster, image: &std::path::Path, later: &[u8]) {
    let (a, b) = (c.alpha(), c.beta());
    b.down();
    std::fs::copy(image, b.backing_path()).expect("restore beta's disk from its image");
    let marks = log_marks(c);
    a.up();
    b.up();
    resynced_after_going_back(c, b, marks);
    assert_same_bytes(
        &b.backing_data(4 * MIB + later.len() as u64)[4 * MIB as usize..],
        later,
        "beta has the writes its image lacked",
    );
}

/// The committed `peer-durable` mark in `n`'s metadata, as (generation, sequence).
fn committed_peer_durable(n: &Node) -> (String, u64) {
    let dump = n.ctl_ok(&["dump-md"]).stdout;
    let line = dump
        .lines()
        .find_map(|l| l.strip_prefix("peer-durable"))
        .unwrap_or_else(|| panic!("no peer-durable in dump-md:\n{dump}"));
    let w: Vec<&str> = line.split_whitespace().collect();
    match w.as_slice() {
        ["gen", gen, "seq", seq] => (gen.to_string(), seq.parse().unwrap_or(0)),
        _ => panic!("peer-durable line {line:?}"),
    }
}

/// Review finding: the primary kept what the peer's disk holds (`peer-durable`) under its
/// own generation also while the peer was not at it yet (a resync's target, a journal
/// catch-up's peer, until the SyncDone): the first durable acknowledgement of such a
/// connection replaced the mark at the generation the peer was still at. Cut before the
/// SyncDone, then the peer's disk restored from an image of that generation, the restored
/// disk was not recognised (the mark named another generation) and took a bitmap resync that
/// left the writes between the image and the mark stale. Here: beta's image, later writes
/// beta makes durable (the mark), an outage long enough for a bitmap resync, the resync held
/// by pause-sync while flushed writes go on (durable acknowledgements from a target at the
/// resync's generation), alpha stopped, beta's disk restored: beta must be fully resynced.
#[test]
fn a_secondary_image_restored_after_a_cut_resync_is_still_recognised() {
    let c = Cluster::builder("restored-after-cut-resync")
        .nodes(2)
        .backing_size(SIZE)
        .protocol("C")
        .journal_size("8M")
        .beta_via_proxy()
        .build();
    c.start_pair();
    c.wait_in_sync(SYNC_TIMEOUT);
    let a = c.alpha();
    let (image, later) = image_of_beta_then_later_writes(&c);
    let heard = a.repl()["peer_disk_holds"].as_u64().unwrap_or(0);
    assert!(
        wait_for(Duration::from_secs(10), || committed_peer_durable(a).1
            >= heard),
        "alpha's metadata does not hold beta's durable mark {heard}"
    );
    let (gen1, mark1) = committed_peer_durable(a);

    // An outage longer than the journal: a bitmap resync at the next connect, held.
    assert!(c.proxy().cut_and_refuse() >= 1, "no link to cut");
    a.wait_not_connected(Duration::from_secs(10));
    write_flushed(a, 24 * MIB, &random_bytes(12 * MIB as usize), MIB);
    a.ctl_ok(&["pause-sync"]);
    c.proxy().resume();
    a.wait_repl(
        CONNECT_TIMEOUT,
        "the resync to beta started (paused)",
        |r| r["connection"] == "sync-source",
    );
    // Flushed writes during the held resync: beta acknowledges them durable at the
    // resync's generation.
    let before = a.repl()["seq_durable"].as_u64().unwrap_or(0);
    write_flushed(a, 48 * MIB, &random_bytes(MIB as usize), MIB);
    a.wait_repl(
        Duration::from_secs(10),
        "beta durable through the writes during the held resync",
        |r| {
            let durable = r["seq_durable"].as_u64().unwrap_or(0);
            durable > before && Some(durable) == r["seq_written"].as_u64()
        },
    );
    // Alpha goes down (its metadata takes what it heard; a clean stop, so that no
    // crashed-primary resync of its hot extents covers what this test checks).
    a.down();
    let (gen2, mark2) = committed_peer_durable(a);
    println!("peer-durable before the outage {gen1} {mark1}, after the held resync {gen2} {mark2}");
    assert_eq!(
        gen2, gen1,
        "alpha's mark of beta's disk moved to another generation while beta was not at it"
    );

    restore_beta_and_resync(&c, &image, &later);
}

/// Review finding: a resync target's disk goes back in time midway (a write cache that
/// ignored the resync's flushes, or a snapshot restored): the regions it had acknowledged as
/// durable were cleared from the source's bitmap, and the next connect, seeing an
/// inconsistent disk, resynced only what the bitmap still named. The disk then said up to
/// date with the regions synced before its rollback stale. The source now checks the mark the
/// peer reports against what it acknowledged before any resync, and resyncs everything.
#[test]
fn a_resync_target_whose_disk_goes_back_in_time_midway_is_fully_resynced() {
    let c = Cluster::builder("disk-rollback-target")
        .nodes(2)
        .backing_size(SIZE)
        .protocol("C")
        .journal_size("2M")
        .resource_line("resync-rate = \"4M\"")
        .build();
    c.start_pair();
    c.wait_in_sync(SYNC_TIMEOUT);
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let data = random_bytes((24 * MIB) as usize);
    let mut r = a.raw_open();
    for (i, chunk) in data.chunks(MIB as usize).enumerate() {
        r.write_at(i as u64 * MIB, chunk, 0).expect("write");
    }
    r.command(CMD_FLUSH, 0, 0, 0).expect("flush");
    r.disconnect();
    c.wait_in_sync(SYNC_TIMEOUT);
    // Beta's copy goes bad behind its daemon's back; invalidate starts a full sync into it.
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(b.backing_path())
            .expect("open beta.img");
        f.write_all_at(&vec![0x5A; (24 * MIB) as usize], 0)
            .expect("corrupt");
        f.sync_all().expect("sync");
    }
    b.ctl_ok(&["invalidate"]);
    b.wait_repl(Duration::from_secs(30), "the full sync started", |r| {
        r["connection"] == "sync-target"
    });
    // The snapshot the disk will go back to: early in the sync (its metadata says so).
    let snap = c.dir().join("beta-snapshot.img");
    std::fs::copy(b.backing_path(), &snap).expect("snapshot beta's disk");
    b.wait_repl(Duration::from_secs(30), "half the data synced", |r| {
        r["connection"] == "sync-target" && r["resync_done"].as_u64().unwrap_or(0) >= 12 * MIB
    });
    let applied = a.repl()["seq_applied"].as_u64().unwrap_or(0);
    a.wait_repl(Duration::from_secs(30), "that part durable on beta", |r| {
        r["seq_durable"].as_u64().unwrap_or(0) >= applied
    });
    b.kill9_and_wait();
    restore_and_resync(&c, &snap);
    c.assert_replicas_identical(size, "after beta's rollback mid-resync");
    assert_same_bytes(&b.backing_data(24 * MIB), &data, "beta's data");
}

/// The primary's disk fails for good (writes fail, so its metadata cannot record it): the
/// secondary learns it over the link, shows it, and keeps the good copy under a generation
/// of its own. The failed primary can be demoted although its metadata writes fail; killed
/// and restarted with its stale metadata (up to date, a crashed primary), it is still the
/// target of a full resync, never the source of its damaged extents (a fault trial saw beta's
/// good blocks overwritten this way).
#[test]
fn a_primary_whose_disk_fails_for_good_is_never_the_source_after_a_restart() {
    if !have_tools(&["nbdkit", "nbdfuse", "fusermount3"]) {
        return;
    }
    let c = pair_cluster("disk-dead");
    let (a, b) = (c.alpha(), c.beta());
    let (trigger, disk, _lo) = failing_alpha_disk(&c);
    let _stop = StopDaemons(&c);
    start_in_sync(&c, b);
    let size = a.size();

    let mut r = a.raw_open();
    r.write_at(MIB, &random_bytes(MIB as usize), 0)
        .expect("base write");
    r.command(CMD_FLUSH, 0, 0, 0).expect("flush");
    trigger.arm();
    let lost = random_bytes(MIB as usize);
    r.write_at(3 * MIB, &lost, 0)
        .expect("a write before the failing flush");
    assert_eq!(r.command(CMD_FLUSH, 0, 0, 0), Err(EIO), "the failing flush");
    r.disconnect();

    // Beta hears of it over the link, shows it, and keeps the good copy.
    let mut rb = b.repl();
    let shown = wait_for(Duration::from_secs(10), || {
        rb = b.repl();
        rb["peer_disk"] == "inconsistent"
    });
    assert!(shown, "beta does not show alpha's failed disk: {rb}");
    assert!(
        log_text(b).contains("keeps the good copy"),
        "beta's log does not say it keeps the good copy:\n{}",
        b.log_tail(20)
    );

    // The runbook: demote the failed primary (its metadata writes fail), then a plain
    // `primary` on beta (alpha is a connected secondary, no --force needed); then alpha dies.
    let out = a.ctl_ok(&["secondary", "--force"]).stdout;
    assert!(
        out.contains("the peer holds the good copy"),
        "the demotion of the failed primary does not point at the good copy:\n{out}"
    );
    let mut last = String::new();
    let promoted = wait_for(Duration::from_secs(20), || {
        let out = b.ctl(&["primary"]);
        last = format!("{}{}", out.stdout, out.stderr);
        out.success()
    });
    assert!(promoted, "a plain `primary` on beta is refused: {last}");
    a.kill9_and_wait();
    trigger.disarm();
    // What the kernel dropped on alpha's disk: the write's range holds its old bytes.
    drop_on_disk(&disk, 3 * MIB, MIB as usize);

    let m = marks(&c);
    a.up();
    let seen = wait_synced(&c, Duration::from_secs(60), "alpha resynced from beta");
    assert!(
        resynced_from(&c, b, a, m) && !Seen::has(&seen.alpha, "sync-source"),
        "alpha must be the target: {seen:?}"
    );
    c.assert_replicas_identical(size, "after alpha's restart");
    assert_same_bytes(
        &b.backing_data(4 * MIB)[3 * MIB as usize..],
        &lost,
        "beta kept the write",
    );
    assert_same_bytes(
        &a.backing_data(4 * MIB)[3 * MIB as usize..],
        &lost,
        "alpha got the write back from beta",
    );
}

/// A secondary's disk fails a flush: it can make no stream durable from then on, so it says
/// why at every connect and the primary shows that cause (before, the primary showed only "the
/// peer closed the connection", once a second). The primary goes on writing, with what beta
/// lacks in its bitmap; once beta's disk is repaired (`down`, `up` there), the catch-up brings
/// back what the failing disk dropped.
#[test]
fn a_secondary_whose_disk_fails_tells_the_primary_why_and_catches_up_after_repair() {
    if !have_tools(&["nbdkit", "nbdfuse", "fusermount3"]) {
        return;
    }
    let c = pair_cluster("disk-sec-dead");
    let (a, b) = (c.alpha(), c.beta());
    let (trigger, disk, _lo) = failing_disk(&c, b);
    let _stop = StopDaemons(&c);
    start_in_sync(&c, a);
    let size = a.size();

    let mut r = a.raw_open();
    trigger.arm();
    let lost = random_bytes(MIB as usize);
    r.write_at(3 * MIB, &lost, 0)
        .expect("a write while beta's disk starts failing");
    // Beta's flush of the stream fails: its disk is marked failed and the link drops. The
    // primary's own flush still succeeds (its disk holds the data; the bitmap holds what beta
    // lacks).
    r.command(CMD_FLUSH, 0, 0, 0)
        .expect("the primary's flush with a failed peer disk");

    let mut ra = a.repl();
    let told = wait_for(Duration::from_secs(20), || {
        ra = a.repl();
        ra["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("beta's disk failed a flush"))
    });
    assert!(told, "alpha does not show why beta's disk refuses: {ra}");
    let text = a.ctl_ok(&["status"]).stdout;
    assert!(
        text.contains("beta's disk failed a flush"),
        "alpha's text status hides the cause:\n{text}"
    );
    let rb = b.status_json();
    assert_eq!(rb["disk_failed"], true, "beta shows its failed disk: {rb}");
    // The primary goes on: a write after the failure is taken and recorded for beta.
    let after = random_bytes(MIB as usize);
    r.write_at(9 * MIB, &after, 0)
        .expect("a write while beta's disk is failed");
    r.command(CMD_FLUSH, 0, 0, 0).expect("flush");
    r.disconnect();
    assert!(
        a.repl_u64("out_of_sync") >= 2 * MIB,
        "alpha's bitmap names what beta lacks: {}",
        a.repl()
    );

    // Repair: beta goes down (its metadata writes fail: tolerated), the disk works again but
    // lost the pages the failed writeback held; beta comes back up and is resynced.
    b.ctl_ok(&["down"]);
    trigger.disarm();
    drop_on_disk(&disk, 3 * MIB, MIB as usize);
    b.up();
    // Beta's metadata could not record the failure, so it comes back at its last durable
    // applied mark: the journal replays the stream from there (the dropped write included).
    let seen = wait_synced(&c, Duration::from_secs(60), "beta caught up after repair");
    assert!(
        !Seen::has(&seen.beta, "sync-source"),
        "beta must not be a source: {seen:?}"
    );
    c.assert_replicas_identical(size, "after beta's repair");
    assert_same_bytes(
        &b.backing_data(4 * MIB)[3 * MIB as usize..],
        &lost,
        "beta got the dropped write back",
    );
}

/// A primary's disk fails while the peer is away, so the peer never hears of it; the
/// superblock records the failure, but the bitmap written after it is lost (a crash between
/// the two writes, or a bitmap write the failing disk refused). The superblock alone must still
/// bring a full resync: before, the restart found an inconsistent disk with a partial bitmap,
/// and the resync copied only that, leaving the pages the kernel dropped stale on a disk then
/// declared up to date (a review found it).
#[test]
fn a_disk_that_lost_writes_is_fully_resynced_even_if_its_bitmap_never_reached_the_disk() {
    if !have_tools(&["nbdkit", "nbdfuse", "fusermount3"]) {
        return;
    }
    let c = pair_cluster("disk-lost-bm");
    let (a, b) = (c.alpha(), c.beta());
    let (trigger, disk, _lo) = failing_alpha_disk(&c);
    let _stop = StopDaemons(&c);
    start_in_sync(&c, b);
    let size = a.size();
    let base = random_bytes(MIB as usize);
    let mut r = a.raw_open();
    r.write_at(3 * MIB, &base, 0)
        .expect("a write both nodes get");
    r.command(CMD_FLUSH, 0, 0, 0).expect("flush");
    c.wait_in_sync(SYNC_TIMEOUT);
    // The peer goes away: it will not hear of the failure. (A first write without it
    // commits the new generation while the disk still works.)
    b.ctl_ok(&["down"]);
    r.write_at(8 * MIB, &random_bytes(4096), 0)
        .expect("a write without the peer");
    r.command(CMD_FLUSH, 0, 0, 0).expect("flush");
    trigger.arm();
    r.write_at(3 * MIB, &random_bytes(MIB as usize), 0)
        .expect("a write before the failing flush");
    assert_eq!(r.command(CMD_FLUSH, 0, 0, 0), Err(EIO), "the failing flush");
    r.disconnect();
    // The disk works again; the failure is committed by the metadata writes of the way down.
    trigger.disarm();
    a.ctl_ok(&["secondary", "--force"]);
    a.ctl_ok(&["down"]);
    let md = a.ctl_ok(&["dump-md"]).stdout;
    assert!(
        md.lines()
            .any(|l| l.starts_with("lost-writes") && l.contains("yes")),
        "the superblock does not record the lost writes:\n{md}"
    );
    // The bitmap that went with it never reached the disk, and the kernel dropped the
    // failed write's pages: alpha's disk holds neither the new write nor a bit for it.
    let bitmap_at = md
        .lines()
        .find_map(|l| l.strip_prefix("bitmap "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no bitmap offset in dump-md:\n{md}"));
    let bitmap_len = md
        .lines()
        .find_map(|l| l.strip_prefix("bitmap "))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("no bitmap length in dump-md:\n{md}"));
    drop_on_disk(&disk, bitmap_at, bitmap_len);
    // And pages of a write synced long ago whose writeback failed later (its error reported
    // to another descriptor): stale bytes that no journal record or bit names.
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(disk.file())
            .expect("open alpha's disk");
        f.write_all_at(&random_bytes(MIB as usize), 20 * MIB)
            .expect("stale bytes");
        f.sync_all().expect("sync");
    }

    b.up();
    a.up();
    // Alpha also wrote without beta before its disk failed: no copy holds everything, both
    // refuse, and the admin keeps beta's data.
    let mut st = a.repl();
    let refused = wait_for(Duration::from_secs(20), || {
        st = a.repl();
        st["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("no copy holds everything"))
    });
    assert!(refused, "alpha does not refuse: {st}");
    let m = marks(&c);
    a.ctl_ok(&["connect", "--discard-my-data"]);
    let seen = wait_synced(&c, Duration::from_secs(60), "alpha resynced from beta");
    assert!(
        resynced_from(&c, b, a, m) && !Seen::has(&seen.alpha, "sync-source"),
        "alpha must be the target: {seen:?}"
    );
    assert_same_bytes(
        &a.backing_data(4 * MIB)[3 * MIB as usize..],
        &base,
        "alpha has beta's copy of the region its disk lost",
    );
    c.assert_replicas_identical(size, "after alpha's resync");
    assert!(
        log_text(a).contains("lost writes before this start"),
        "alpha's log does not say why every region is out of sync:\n{}",
        a.log_tail(20)
    );
}

/// A FUA write syncs, so its error may be an earlier write's page that the kernel dropped:
/// reported once per open file, the next flush would then succeed over the lost write. A
/// failed FUA write counts as a failed sync (review finding): the disk is marked, and every
/// later flush fails, also once the disk takes writes again.
#[test]
fn a_failed_fua_write_makes_every_later_flush_fail() {
    if !have_tools(&["nbdkit", "nbdfuse", "fusermount3"]) {
        return;
    }
    let c = pair_cluster("disk-fua");
    let (a, b) = (c.alpha(), c.beta());
    let (trigger, _disk, _lo) = failing_alpha_disk(&c);
    let _stop = StopDaemons(&c);
    start_in_sync(&c, b);

    let mut r = a.raw_open();
    // The extent is hot (its activity-log write, a sync, is behind it).
    r.write_at(0, &[1u8; 4096], 0)
        .expect("a write while the disk works");
    r.command(CMD_FLUSH, 0, 0, 0)
        .expect("a flush while the disk works");
    trigger.arm();
    let lost = random_bytes(MIB as usize);
    r.write_at(MIB, &lost, 0)
        .expect("a write into the page cache");
    assert_eq!(
        r.write_at(3 * MIB, &lost[..4096], CMD_FLAG_FUA),
        Err(EIO),
        "a FUA write on a disk whose writeback fails"
    );
    // The disk takes writes again: nothing says the first write reached it.
    trigger.disarm();
    assert_eq!(
        r.command(CMD_FLUSH, 0, 0, 0),
        Err(EIO),
        "a flush after a failed FUA write"
    );
    r.disconnect();
    let st = a.status_json();
    assert_eq!(st["disk_failed"], true, "{st}");
}
