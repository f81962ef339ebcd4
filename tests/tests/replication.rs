//! Replication between two nodes (issue 3): alpha (dials, made primary) and beta (accepts,
//! secondary). Real daemons, real NBD clients, a real TCP proxy in front of beta for link
//! faults. The secondary's data is checked by reading its backing file directly (the first
//! `size` bytes are the exported data) or, after a failover, through its NBD export.
//!
//! Both backing files start as fresh, equal sparse files: there is no initial full sync.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blockrep_e2e::nbd_const::*;
use blockrep_e2e::*;
use serde_json::Value;

const BACKING: u64 = 128 << 20;
const MIB: usize = 1 << 20;

fn pair(test: &str, protocol: &str) -> Cluster {
    let c = Cluster::builder(test)
        .nodes(2)
        .backing_size(BACKING)
        .protocol(protocol)
        .build();
    c.start_pair();
    c
}

fn pair_via_proxy(test: &str, protocol: &str) -> Cluster {
    let c = Cluster::builder(test)
        .nodes(2)
        .backing_size(BACKING)
        .protocol(protocol)
        .beta_via_proxy()
        .build();
    c.start_pair();
    assert!(
        c.proxy().accepted() >= 1,
        "alpha did not dial through the proxy"
    );
    c
}

/// Writes `data` at `offset` of the node's export (1 MiB requests), then flushes.
fn nbd_write(node: &Node, offset: u64, data: &[u8]) {
    let mut r = node.raw_open();
    for (i, chunk) in data.chunks(MIB).enumerate() {
        let off = offset + (i * MIB) as u64;
        r.write_at(off, chunk, 0)
            .unwrap_or_else(|e| panic!("NBD write at {off} failed: errno {e}"));
    }
    r.command(CMD_FLUSH, 0, 0, 0)
        .unwrap_or_else(|e| panic!("NBD flush failed: errno {e}"));
    r.disconnect();
}

/// Reads `len` bytes at `offset` of the node's export.
fn nbd_read(node: &Node, offset: u64, len: usize) -> Vec<u8> {
    let mut r = node.raw_open();
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        let n = MIB.min(len - v.len());
        let off = offset + v.len() as u64;
        let b = r
            .read_at(off, n as u32)
            .unwrap_or_else(|e| panic!("NBD read at {off} failed: errno {e}"));
        v.extend_from_slice(&b);
    }
    r.disconnect();
    v
}

/// The first `len` bytes of the node's export, copied out with nbdcopy (at most 30 s; a
/// node that stops answering fails the test with its status and log).
fn read_export(c: &Cluster, node: &Node, len: usize) -> Vec<u8> {
    let out = c.dir().join(format!("{}-export.bin", node.name()));
    let mut g = ChildGuard::spawn(
        Command::new("nbdcopy").arg(node.uri()).arg(&out),
        Some(&c.dir().join("nbdcopy-read.log")),
    );
    if !g.wait_exit(Duration::from_secs(30)) {
        let log = g.log();
        g.kill();
        panic!(
            "nbdcopy from {} ({}) did not finish in 30 s: {log}\nstatus: {}\n--- log ---\n{}",
            node.name(),
            node.uri(),
            node.status_json(),
            node.log_tail(20)
        );
    }
    let v = std::fs::read(&out)
        .unwrap_or_else(|e| panic!("nbdcopy from {}: {e}\n{}", node.name(), g.log()));
    assert!(
        v.len() >= len,
        "nbdcopy copied {} bytes: {}",
        v.len(),
        g.log()
    );
    v[..len].to_vec()
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} is not a number in {v}"))
}

/// The replication object carries every field of the contract.
fn check_repl_fields(r: &Value) {
    for k in ["peer", "connection", "peer_role", "peer_disk", "protocol"] {
        assert!(
            r[k].is_string(),
            "replication.{k} missing or not a string: {r}"
        );
    }
    for k in [
        "seq_written",
        "seq_sent",
        "seq_received",
        "seq_applied",
        "lag_writes",
        "lag_bytes",
        "bytes_sent",
        "bytes_received",
        "crc_errors",
        "auth_failures",
        "journal_used",
        "journal_size",
        "out_of_sync",
    ] {
        assert!(r[k].as_u64().is_some(), "replication.{k} missing: {r}");
    }
    assert!(
        r["last_error"].is_null() || r["last_error"].is_string(),
        "replication.last_error: {r}"
    );
}

/// Counters of a pair in sync over one connection that never broke: everything written was
/// sent and acknowledged, beta received at least what alpha sent, both disks up to date.
fn check_counters_in_sync(c: &Cluster) {
    let (a, b) = (c.alpha(), c.beta());
    let (ra, rb) = (a.repl(), b.repl());
    let written = u(&ra, "seq_written");
    assert_eq!(u(&ra, "seq_sent"), written, "alpha: {ra}");
    assert_eq!(u(&ra, "seq_received"), written, "alpha: {ra}");
    assert_eq!(u(&ra, "seq_applied"), written, "alpha: {ra}");
    assert_eq!(u(&rb, "seq_applied"), written, "beta: {rb}");
    assert!(
        u(&rb, "bytes_received") >= u(&ra, "bytes_sent"),
        "beta received less than alpha sent\nalpha: {ra}\nbeta: {rb}"
    );
    assert!(u(&ra, "journal_size") > 0, "{ra}");
    assert!(u(&ra, "journal_used") <= u(&ra, "journal_size"), "{ra}");
    for r in [&ra, &rb] {
        assert_eq!(u(r, "crc_errors"), 0, "{r}");
        assert_eq!(u(r, "auth_failures"), 0, "{r}");
        assert!(r["last_error"].is_null(), "{r}");
    }
    assert_eq!(ra["peer_role"], "secondary", "{ra}");
    assert_eq!(rb["peer_role"], "primary", "{rb}");
    assert_eq!(rb["peer_disk"], "up-to-date", "{rb}");
    let sb = b.status_json();
    assert_eq!(sb["disk"], "up-to-date", "beta caught up: {sb}");
}

// ---------------------------------------------------------------------------------------------
// 1. Data arrives identical under C (filesystem), A and B (nbdcopy).

#[test]
fn protocol_c_filesystem_replicates_identically() {
    let c = pair("repl-fs-c", "C");
    let (a, b) = (c.alpha(), c.beta());
    let ra = a.repl();
    check_repl_fields(&ra);
    assert_eq!(ra["peer"], "beta", "{ra}");
    assert_eq!(ra["protocol"], "C", "{ra}");
    let rb = b.repl();
    check_repl_fields(&rb);
    assert_eq!(rb["peer"], "alpha", "{rb}");
    let size = a.size();

    let mut fs = FsStack::attach(c.dir().path(), "a", &a.uri());
    fs.mkfs_ext4();
    let mnt = fs.mount();
    let mut files = Vec::new();
    std::fs::create_dir_all(mnt.join("d/e")).unwrap();
    for (i, n) in [3 * MIB, 1, 4096, 700_000, 5 * MIB, 12_345]
        .into_iter()
        .enumerate()
    {
        let name = if i % 2 == 0 {
            format!("f{i}")
        } else {
            format!("d/e/g{i}")
        };
        let data = write_random_file(&mnt.join(&name), n);
        files.push((name, data));
    }
    // Overwrite part of one file in place, delete another.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(mnt.join("f0"))
            .unwrap();
        f.seek(SeekFrom::Start(MIB as u64)).unwrap();
        let patch = random_bytes(200_000);
        f.write_all(&patch).unwrap();
        f.sync_all().unwrap();
        files[0].1[MIB..MIB + 200_000].copy_from_slice(&patch);
    }
    std::fs::remove_file(mnt.join("d/e/g3")).unwrap();
    files.retain(|(n, _)| n != "d/e/g3");
    // This filesystem only: a global sync would wait on every other test's devices too.
    run_ok(Command::new("sync").arg("-f").arg(&mnt), CMD_TIMEOUT);
    fs.umount();
    fs.fsck_clean();
    fs.close();

    let ra = c.wait_in_sync(SYNC_TIMEOUT);
    check_counters_in_sync(&c);
    assert!(u(&ra, "seq_written") > 0, "nothing replicated? {ra}");
    assert!(u(&ra, "bytes_sent") > 9 * MIB as u64, "{ra}");
    assert_eq!(ra["peer_disk"], "up-to-date", "{ra}");
    assert_eq!(u(&ra, "crc_errors"), 0, "{ra}");
    c.assert_replicas_identical(size, "protocol C, ext4 workload");

    // The secondary's copy is a clean filesystem holding the same files (read-only, from its
    // backing file; the daemon never writes it without a stream).
    let lo = LoopDev::attach(b.backing_path());
    let m = Mount::new(lo.dev(), &c.dir().join("mnt-beta"), Some("ro,noload"));
    for (name, data) in &files {
        let got = std::fs::read(m.dir().join(name))
            .unwrap_or_else(|e| panic!("beta's copy lacks {name}: {e}"));
        assert_same_bytes(&got, data, &format!("file {name} on beta"));
    }
    assert!(!m.dir().join("d/e/g3").exists(), "deleted file on beta");
    m.close();
    lo.close();
}

/// nbdcopy of random data into alpha, then overwrites at offsets; replicas identical once
/// the link drained.
fn bulk_replicates(test: &str, protocol: &str) {
    let c = pair(test, protocol);
    let a = c.alpha();
    assert_eq!(a.repl()["protocol"], protocol);
    let size = a.size();
    let n = 48 * MIB;
    let input = c.dir().join("in.bin");
    let data = write_random_file(&input, n);
    a.nbdcopy_in(&input);
    let patch = random_bytes(3 * MIB);
    nbd_write(a, 40 * MIB as u64 + 512, &patch);
    let tail = random_bytes(MIB);
    nbd_write(a, size - MIB as u64, &tail);

    let ra = c.wait_in_sync(SYNC_TIMEOUT);
    check_counters_in_sync(&c);
    assert!(u(&ra, "bytes_sent") >= (n + 4 * MIB) as u64, "{ra}");
    c.assert_replicas_identical(size, &format!("protocol {protocol}"));
    let beta = c.beta().backing_data(size);
    let mut want = data;
    want[40 * MIB + 512..43 * MIB + 512].copy_from_slice(&patch);
    assert_same_bytes(&beta[..n], &want, "beta's data (first 48 MiB)");
    assert_same_bytes(&beta[(size as usize - MIB)..], &tail, "beta's last MiB");
    assert_all_zero(&beta[n..size as usize - MIB], "beta between the writes");
}

#[test]
fn protocol_a_bulk_replicates_identically() {
    bulk_replicates("repl-bulk-a", "A");
}

#[test]
fn protocol_b_bulk_replicates_identically() {
    bulk_replicates("repl-bulk-b", "B");
}

/// Rounds of writes for [`secondary_writes_beside_its_direct_writes_land_in_order`]: in each
/// round, for every 2 MiB span of the first `SPAN_MIB` MiB, one 1 MiB write (aligned: the
/// secondary writes it around its page cache) and six small writes (4 KiB and 512 bytes, through
/// its page cache) in the span's other half, all of the round in flight at once in a shuffled
/// order (libnbd, 64 in flight), none overlapping another of its round; each round starts once
/// the one before finished, and overwrites the same spans. Writes the expected image to `out`.
const MIXED_WRITER: &str = r#"
import random, sys
import nbd

uri, rounds, span_mib, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(20261129)
M = 1 << 20
image = bytearray(span_mib * M)
h = nbd.NBD()
h.connect_uri(uri)
for r in range(rounds):
    writes = []
    for s in range(span_mib // 2):
        half = (r + s) % 2
        big = s * 2 * M + half * M
        writes.append((big, rng.randbytes(M)))
        other = s * 2 * M + (1 - half) * M
        for slot in rng.sample(range(256), 6):
            at = other + slot * 4096
            if rng.random() < 0.5:
                writes.append((at, rng.randbytes(4096)))
            else:
                writes.append((at + 512 * rng.randrange(8), rng.randbytes(512)))
    rng.shuffle(writes)
    pending = []
    for off, data in writes:
        image[off:off + len(data)] = data
        while len(pending) >= 64:
            h.poll(-1)
            pending = [(c, b) for (c, b) in pending if not h.aio_command_completed(c)]
        buf = nbd.Buffer.from_bytearray(bytearray(data))
        pending.append((h.aio_pwrite(buf, off), buf))
    while pending:
        pending = [(c, b) for (c, b) in pending if not h.aio_command_completed(c)]
        if pending:
            h.poll(-1)
h.flush()
h.shutdown()
open(out, "wb").write(image)
print("wrote %d rounds" % rounds)
"#;

/// Whether process `pid` holds `path` open with O_DIRECT (from /proc/PID/fdinfo).
fn holds_open_direct(pid: u32, path: &Path) -> bool {
    let want = std::fs::canonicalize(path).expect("canonical backing path");
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        let target = std::fs::read_link(fd.path()).ok();
        let flags = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        });
        target.as_deref() == Some(want.as_path())
            && flags.is_some_and(|f| f & libc::O_DIRECT as u32 != 0)
    })
}

/// The secondary writes large stream records around its page cache and small ones through
/// it, on two descriptors of one file. Small writes beside a large one in the same 2 MiB span,
/// applied while it is in flight, must neither be lost nor bring back bytes it replaced: under
/// C, after rounds that overwrite the same spans, beta holds exactly the image the writes
/// leave, and its daemon holds its backing file open with O_DIRECT.
#[test]
fn secondary_writes_beside_its_direct_writes_land_in_order() {
    let Some(py) = blocks::python() else {
        return;
    };
    const SPAN_MIB: u64 = 32;
    let c = pair("repl-mixed-direct", "C");
    let (a, b) = (c.alpha(), c.beta());
    let beta_pid = b.pid().expect("beta's daemon pid");
    let direct = holds_open_direct(beta_pid, b.backing_path());
    // Where the kernel refuses a second io_uring (a seccomp filter, a low memlock limit),
    // beta says so and applies everything through the page cache.
    let no_ring = std::fs::read_to_string(b.log_path())
        .unwrap_or_default()
        .contains("for a secondary's direct writes");
    if !direct {
        println!(
            "note: beta does not hold {} with O_DIRECT ({}): only the page cache path runs",
            b.backing_path().display(),
            if no_ring {
                "no engine for its direct writes"
            } else {
                "its filesystem refuses it"
            }
        );
    }
    let script = c.dir().join("mixed_writer.py");
    std::fs::write(&script, MIXED_WRITER).expect("write mixed_writer.py");
    let expected = c.dir().join("expected.img");
    run_ok(
        Command::new(&py)
            .arg(&script)
            .arg(a.uri())
            .arg("4")
            .arg(SPAN_MIB.to_string())
            .arg(&expected),
        LONG_TIMEOUT * 3,
    );
    c.wait_in_sync(SYNC_TIMEOUT);
    let size = a.size();
    c.assert_replicas_identical(size, "mixed direct and cached writes");
    let want = std::fs::read(&expected).expect("expected image");
    let beta = b.backing_data(size);
    assert_same_bytes(
        &beta[..want.len()],
        &want,
        "beta's first spans after the mixed rounds",
    );
    // Checked on a filesystem that takes O_DIRECT (this machine's): the direct path ran.
    let tmp_takes_direct = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(b.backing_path())
            .is_ok()
    };
    assert!(
        direct || !tmp_takes_direct || no_ring,
        "beta's filesystem takes O_DIRECT, but beta's daemon holds no O_DIRECT descriptor of its backing file"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Protocol C: no acknowledged write is lost when the primary dies.

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        ^ u64::from(std::process::id())
}

/// Waits until the writer's log shows at least `n` acknowledged writes.
fn wait_acked(w: &mut StampWriter, n: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if w.log().acked.len() >= n {
            return;
        }
        assert!(
            w.running(),
            "the writer exited early:\n{}\nlog: {:?}",
            w.output(),
            w.log().acked.len()
        );
        assert!(
            Instant::now() < deadline,
            "the writer had fewer than {n} writes acknowledged after {timeout:?}:\n{}",
            w.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Under C an acknowledged write is on the peer's disk; under B it is in the peer's memory,
/// which survives the primary's death as long as the secondary process lives (it applies what
/// it received before it lets the link go). Either way, killing the primary loses none.
/// `wait-sync` on a primary whose clients keep writing ends once the peer has applied what was
/// written when the wait began: a busy primary always has writes in flight, and a wait for
/// none in flight timed out although the pair was connected and healthy.
#[test]
fn wait_sync_on_a_busy_primary_ends() {
    if !have_tools(&["fio"]) {
        return;
    }
    let c = pair("repl-wait-sync-busy", "C");
    let a = c.alpha();
    // A writer that keeps 32 writes in flight all along.
    let mut fio = ChildGuard::spawn(
        Command::new("fio")
            .arg("--name=steady")
            .arg("--ioengine=nbd")
            .arg(format!("--uri={}", a.uri()))
            .arg("--rw=randwrite")
            .arg("--bs=4k")
            .arg("--iodepth=32")
            .arg("--time_based")
            .arg("--runtime=60")
            .arg(format!("--size={}", a.size() / 2)),
        Some(&c.dir().path().join("fio.log")),
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(fio.running(), "fio exited early:\n{}", fio.log());
    let out = a.ctl_timeout(&["wait-sync", "--timeout", "20"], Duration::from_secs(40));
    assert!(
        fio.running(),
        "fio stopped before wait-sync ended:\n{}",
        fio.log()
    );
    drop(fio);
    assert!(
        out.success() && out.stdout.contains("in sync"),
        "wait-sync under constant writes: {}",
        out.describe()
    );
}

fn kill_primary_loses_no_acknowledged_write(test: &str, protocol: &str) {
    let Some(py) = python_with_nbd() else {
        skip_or_fail("no python3 with the libnbd bindings (python3-libnbd)");
        return;
    };
    let c = pair(test, protocol);
    let (a, b) = (c.alpha(), c.beta());
    let blocks = 2048u64;
    let mut w = StampWriter::spawn(
        &py,
        c.dir().path(),
        "w",
        &a.uri(),
        StampOpts {
            blocks,
            inflight: 32,
            order: StampOrder::Random,
            count: 0,
            seconds: 0.0,
            flush_every: 0,
            flush_until: 0,
        },
    );
    // The kill comes at a random point, counted in acknowledged writes (a time would leave
    // too few on a loaded machine).
    let at = 100 + XorShift::new(seed()).next_u64() % 1000;
    wait_acked(&mut w, at as usize, Duration::from_secs(60));
    let pid = a.status_json()["pid"].as_u64().expect("pid") as u32;
    assert!(
        w.running(),
        "writer stopped before the kill:\n{}",
        w.output()
    );
    kill9(pid);
    assert!(
        wait_pid_gone(pid, Duration::from_secs(10)),
        "pid {pid} survived SIGKILL"
    );
    if !w.wait_exit(Duration::from_secs(15)) {
        w.kill();
    }
    let log = w.log();
    assert!(
        log.acked.len() >= at as usize,
        "only {} writes acknowledged, {at} before the kill:\n{}",
        log.acked.len(),
        w.output()
    );

    // Beta sees the link drop; without a reachable peer, promotion needs --force.
    b.wait_not_connected(Duration::from_secs(10));
    let out = b.ctl(&["primary"]);
    assert_eq!(
        out.code,
        Some(1),
        "primary without --force, peer gone\n{}",
        out.describe()
    );
    assert!(out.stderr.contains("--force"), "{}", out.describe());
    b.ctl_ok(&["primary", "--force"]);
    assert_eq!(b.status_json()["role"], "primary");

    let data = read_export(&c, b, (blocks as usize) * STAMP_BLOCK);
    let block_of = log.block_of();
    let mut max_acked: HashMap<u64, u64> = HashMap::new();
    for &(s, blk) in &log.acked {
        let e = max_acked.entry(blk).or_insert(0);
        *e = (*e).max(s);
    }
    let mut newer = 0;
    for (blk, st) in Stamp::parse_all(&data, blocks as usize)
        .into_iter()
        .enumerate()
    {
        let blk = blk as u64;
        let want = max_acked.get(&blk).copied();
        match st {
            Stamp::Zero => assert!(
                want.is_none(),
                "block {blk}: write seq {} was acknowledged but beta's block is all zero \
                 ({} acknowledged, {} issued; primary killed after {at} acknowledged writes)",
                want.unwrap_or(0),
                log.acked.len(),
                log.issued.len()
            ),
            Stamp::Invalid => panic!("block {blk}: beta holds a torn or corrupt block"),
            Stamp::Valid { block, seq } => {
                assert_eq!(
                    block, blk,
                    "block {blk} holds the stamp of block {block} (seq {seq})"
                );
                assert_eq!(
                    block_of.get(&seq),
                    Some(&blk),
                    "block {blk} holds seq {seq}, which the writer never sent there"
                );
                if let Some(w) = want {
                    assert!(
                        seq >= w,
                        "block {blk}: acknowledged write seq {w} lost; beta holds older seq {seq}"
                    );
                    if seq > w {
                        newer += 1;
                    }
                }
            }
        }
    }
    println!(
        "{} writes issued, {} acknowledged, {newer} blocks hold a write newer than the last \
         acknowledged one (in flight at the kill)",
        log.issued.len(),
        log.acked.len()
    );
}

#[test]
fn protocol_c_no_acknowledged_write_lost_when_primary_is_killed() {
    kill_primary_loses_no_acknowledged_write("repl-kill-c", "C");
}

#[test]
fn protocol_b_no_acknowledged_write_lost_when_primary_is_killed() {
    kill_primary_loses_no_acknowledged_write("repl-kill-b", "B");
}

// ---------------------------------------------------------------------------------------------
// 3. Protocol A: the secondary holds a prefix of the write stream after the link is cut.

/// Checks that `stamps` is the result of applying a prefix of the server's write order, given
/// a writer in `Window` order with `w` writes in flight over `blocks` blocks: write `i` went to
/// block `(i - 1) % blocks` and was sent only after every write `<= i - w` was acknowledged,
/// so the server ordered every `j <= i - w` before `i`. The set applied on the secondary is
/// then a down-set D of that order: with `m = max(D)`, D holds every write `<= m - w`, so each
/// block must show at least the last write to it that is `<= m - w` (with `w = 1` this is
/// exactly "the state after the first m writes"). Returns `m`.
fn check_prefix(stamps: &[Stamp], issued: &[(u64, u64)], w: u64) -> u64 {
    let blocks = stamps.len() as u64;
    let block_of: HashMap<u64, u64> = issued.iter().copied().collect();
    let mut found = vec![0u64; stamps.len()];
    for (b, st) in stamps.iter().enumerate() {
        match *st {
            Stamp::Zero => {}
            Stamp::Invalid => panic!("block {b}: torn or corrupt data on the secondary"),
            Stamp::Valid { block, seq } => {
                assert_eq!(
                    block, b as u64,
                    "block {b} holds block {block}'s stamp (seq {seq})"
                );
                assert_eq!(
                    block_of.get(&seq),
                    Some(&(b as u64)),
                    "block {b} holds seq {seq}, never sent to it"
                );
                found[b] = seq;
            }
        }
    }
    let m = found.iter().copied().max().unwrap_or(0);
    let forced = m.saturating_sub(w);
    for (b, &f) in found.iter().enumerate() {
        // Last write to block b with seq <= forced: seqs b+1, b+1+blocks, ...
        let first = b as u64 + 1;
        let last_forced = if forced >= first {
            first + (forced - first) / blocks * blocks
        } else {
            0
        };
        assert!(
            f >= last_forced,
            "not a prefix: the secondary shows write {m}, so it must hold every write up to \
             {forced}, but block {b} holds {} instead of write {last_forced} (writes in \
             flight: {w})",
            if f == 0 {
                "zeroes".to_string()
            } else {
                format!("write {f}")
            }
        );
    }
    // With one write in flight the state must be exactly "after the first m writes".
    if w == 1 {
        let mut want = vec![0u64; stamps.len()];
        for &(s, b) in issued.iter().filter(|(s, _)| *s <= m) {
            want[b as usize] = want[b as usize].max(s);
        }
        assert_eq!(
            found, want,
            "secondary is not the state after the first {m} writes"
        );
    }
    m
}

fn write_order_after_cut(test: &str, inflight: u64) {
    let Some(py) = python_with_nbd() else {
        skip_or_fail("no python3 with the libnbd bindings (python3-libnbd)");
        return;
    };
    let c = pair_via_proxy(test, "A");
    let (a, b) = (c.alpha(), c.beta());
    let blocks = 64u64;
    let mut w = StampWriter::spawn(
        &py,
        c.dir().path(),
        "w",
        &a.uri(),
        StampOpts {
            blocks,
            inflight,
            order: StampOrder::Window,
            count: 0,
            seconds: 0.0,
            flush_every: 0,
            flush_until: 0,
        },
    );
    wait_acked(&mut w, 200, Duration::from_secs(15));
    let delay = 300 + XorShift::new(seed()).next_u64() % 700;
    std::thread::sleep(Duration::from_millis(delay));
    assert!(
        w.running(),
        "writer stopped before the cut:\n{}",
        w.output()
    );
    let cut = c.proxy().cut_and_refuse();
    assert!(cut >= 1, "no live link connection to cut");
    let acked_at_cut = w.log().acked.len();
    // Writes go on while the link is down (counted, not timed: a starved writer may issue
    // nothing in a given half second).
    wait_acked(&mut w, acked_at_cut + 50, Duration::from_secs(30));
    w.request_stop();
    assert!(
        w.wait_exit(Duration::from_secs(15)),
        "writer did not stop:\n{}",
        w.output()
    );
    let log = w.log();
    assert!(log.errors.is_empty(), "writes failed: {:?}", log.errors);
    assert_eq!(log.acked.len(), log.issued.len(), "{}", w.output());

    // Wait for the secondary to notice and settle: not connected, applied seq stable.
    b.wait_not_connected(Duration::from_secs(10));
    let mut last = b.repl_u64("seq_applied");
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = b.repl_u64("seq_applied");
        if now == last {
            break;
        }
        last = now;
    }
    let ra = a.repl();
    assert_ne!(ra["connection"], "connected", "{ra}");
    assert!(
        u(&ra, "seq_written") > last,
        "the primary wrote nothing after the cut? alpha {ra}, beta applied {last}"
    );
    let size = b.size();
    let stamps = Stamp::parse_all(&b.backing_data(size), blocks as usize);
    let m = check_prefix(&stamps, &log.issued, inflight);
    assert!(m > 0, "nothing reached the secondary before the cut");
    assert!(
        (m as usize) < log.issued.len(),
        "all {} writes on the secondary although the link was cut after {acked_at_cut}",
        log.issued.len()
    );
    println!(
        "{} writes, {acked_at_cut} acknowledged at the cut, secondary holds a prefix up to \
         write {m} (applied seq {last})",
        log.issued.len()
    );

    // Link back: the secondary catches up to exactly the primary's data.
    c.proxy().resume();
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_replicas_identical(size, "after the link came back");
    let stamps = Stamp::parse_all(&b.backing_data(size), blocks as usize);
    let total = log.issued.len() as u64;
    assert_eq!(check_prefix(&stamps, &log.issued, 1), total);
}

#[test]
fn protocol_a_secondary_holds_a_prefix_after_cut() {
    write_order_after_cut("repl-order-a", 4);
}

#[test]
fn protocol_a_secondary_holds_exact_prefix_one_in_flight() {
    write_order_after_cut("repl-order-a1", 1);
}

// ---------------------------------------------------------------------------------------------
// 4. Hostile peers: wrong secret, wrong resource, garbage. Refused, logged, nothing written,
//    and the real peer still connects.

/// Connects to a replication port, sends `bytes`, and expects the daemon to close the
/// connection within 12 s (the handshake timeout is 10 s). Returns our local address (the
/// daemon logs it).
fn hostile_send(to: SocketAddr, bytes: &[u8]) -> SocketAddr {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {to}: {e}"));
    let local = s.local_addr().unwrap();
    let _ = s.write_all(bytes);
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(12);
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return local,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return local,
        }
        assert!(
            Instant::now() < deadline,
            "{to} kept a connection open after {} hostile bytes",
            bytes.len()
        );
    }
}

fn log_text(n: &Node) -> String {
    String::from_utf8_lossy(&std::fs::read(n.log_path()).unwrap_or_default()).into_owned()
}

/// Waits until the node's log has a line containing every one of `needles`; returns it.
fn wait_log_line(n: &Node, needles: &[&str], timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = log_text(n);
        if let Some(l) = text.lines().find(|l| needles.iter().all(|x| l.contains(x))) {
            return l.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "{}'s log has no line with all of {needles:?} after {timeout:?}:\n{}",
            n.name(),
            n.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A lone impostor node: `Cluster` with its own directory, ports and backing files, started on
/// node `who` only.
fn impostor(
    test: &str,
    who: &str,
    resource: Option<&str>,
    secret: &str,
    dial: Option<SocketAddr>,
) -> Cluster {
    let mut bld = Cluster::builder(test)
        .nodes(2)
        .backing_size(BACKING)
        .secret(secret);
    if let Some(r) = resource {
        bld = bld.resource_name(r);
    }
    if let Some(d) = dial {
        bld = bld.node_line("beta", &format!("connect-address = \"{d}\""));
    }
    let f = bld.build();
    let n = f.node(who);
    n.create_md();
    n.up();
    f
}

#[test]
fn hostile_peers_are_refused_and_the_real_peer_still_connects() {
    let c = pair_via_proxy("repl-hostile", "C");
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let first = random_bytes(MIB);
    nbd_write(a, 0, &first);
    c.wait_in_sync(SYNC_TIMEOUT);
    let io0 = a.status_json()["io"].clone();
    let beta_auth0 = b.repl_u64("auth_failures");
    let alpha_auth0 = a.repl_u64("auth_failures");

    // Garbage, an oversized frame header and an oversized payload, on both nodes' ports.
    let mut big_header = Vec::new();
    big_header.extend_from_slice(&0x4252_5031u32.to_le_bytes()); // "BRP1"
    big_header.extend_from_slice(&0xffffu16.to_le_bytes());
    big_header.extend_from_slice(&16u32.to_le_bytes());
    big_header.extend_from_slice(&[0u8; 4]);
    let mut big_payload = Vec::new();
    big_payload.extend_from_slice(&0x4252_5031u32.to_le_bytes());
    big_payload.extend_from_slice(&8u16.to_le_bytes());
    big_payload.extend_from_slice(&u32::MAX.to_le_bytes());
    big_payload.extend_from_slice(&[0u8; 4]);
    let garbage = random_bytes(8192);
    // A well-formed hello for a resource whose name, quoted back in the refusal, is larger
    // than a frame header may be (this once tripped an assert before authentication).
    let mut long_hello = Vec::new();
    proto::peer::encode_frame(
        &mut long_hello,
        &proto::peer::Msg::Hello {
            version: proto::peer::PROTOCOL_VERSION,
            resource: "\u{1}".repeat(900),
            node: "alpha".into(),
            nonce: [7; 32],
            encryption: false,
            protocol: b'C',
            bitmap_granularity: 4096,
            after_sb_0pri: 0,
            direct_io: false,
        },
        &[],
    );
    for node in [a, b] {
        let addr = node.replication_addr();
        for (bytes, what) in [
            (&long_hello[..], "is for resource"),
            (&garbage[..], "bad frame magic"),
            (&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], "bad frame magic"),
            (&big_header[..], "exceeds the bound"),
            (&big_payload[..], "exceeds the bound"),
        ] {
            let local = hostile_send(addr, bytes);
            let line = wait_log_line(node, &[&local.to_string(), what], Duration::from_secs(5));
            assert!(line.contains("refused"), "{line}");
        }
        node.assert_alive();
    }

    // A silent client holding a connection open does not delay the real peer.
    let silent = TcpStream::connect(b.replication_addr()).unwrap();
    a.ctl_ok(&["disconnect"]);
    a.wait_repl(Duration::from_secs(5), "standalone", |r| {
        r["connection"] == "standalone"
    });
    a.ctl_ok(&["connect"]);
    a.wait_connected(CONNECT_TIMEOUT);
    // Connected while beta still held the silent one (it hangs up on it only at its 10 s
    // handshake timeout): the real peer did not wait behind it.
    silent
        .set_nonblocking(true)
        .expect("non-blocking silent socket");
    // What beta sent it (its hello) is read first; then nothing more, and no end.
    let open = {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        loop {
            match (&silent).read(&mut buf) {
                Ok(0) => break false,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break true,
                Err(_) => break false,
            }
        }
    };
    assert!(
        open,
        "beta hung up on the silent client before the real peer connected: the peer waited behind it"
    );
    drop(silent);

    // An impostor "alpha" with the wrong secret dials beta; it is primary with data of its own,
    // which must never reach beta.
    let fake = impostor(
        "repl-fake-secret",
        "alpha",
        Some(c.resource()),
        "not-the-secret",
        Some(b.replication_addr()),
    );
    let fa = fake.alpha();
    fa.primary_force();
    nbd_write(fa, 0, &random_bytes(MIB));
    b.wait_repl(
        Duration::from_secs(10),
        "counting an authentication failure",
        |r| r["auth_failures"].as_u64().is_some_and(|n| n > beta_auth0),
    );
    wait_log_line(
        b,
        &["refused", "authentication failed"],
        Duration::from_secs(5),
    );
    wait_log_line(fa, &["authentication failed"], Duration::from_secs(5));
    drop(fake);

    // An impostor for another resource (right secret): refused at hello.
    let fake = impostor(
        "repl-fake-res",
        "alpha",
        None,
        "e2e-shared-secret",
        Some(b.replication_addr()),
    );
    let line = wait_log_line(
        b,
        &["refused", "resource", fake.resource()],
        Duration::from_secs(10),
    );
    assert!(line.contains(c.resource()), "{line}");
    drop(fake);

    // A "beta" impostor with the wrong secret: the proxy sends alpha's next dial to it.
    let fake = impostor(
        "repl-fake-beta",
        "beta",
        Some(c.resource()),
        "not-the-secret",
        None,
    );
    let proxy = c.proxy();
    proxy.set_target(fake.beta().replication_addr());
    proxy.cut();
    a.wait_repl(
        Duration::from_secs(10),
        "counting an authentication failure",
        |r| r["auth_failures"].as_u64().is_some_and(|n| n > alpha_auth0),
    );
    wait_log_line(a, &["authentication failed"], Duration::from_secs(5));
    let ra = a.repl();
    assert_ne!(ra["connection"], "connected", "{ra}");
    assert!(
        ra["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("auth")),
        "last_error after a failed authentication: {ra}"
    );
    proxy.set_target(b.replication_addr());
    proxy.cut();
    drop(fake);

    // Nothing was written anywhere; the real pair reconnects and replicates.
    a.wait_connected(CONNECT_TIMEOUT);
    let ra = c.wait_in_sync(SYNC_TIMEOUT);
    let io = a.status_json()["io"].clone();
    for k in ["writes", "bytes_written", "zeroes", "trims"] {
        assert_eq!(
            io[k], io0[k],
            "alpha's io.{k} changed: before {io0}, after {io}"
        );
    }
    assert_eq!(u(&ra, "crc_errors"), 0, "{ra}");
    c.assert_replicas_identical(size, "after the hostile peers");
    let beta = b.backing_data(size);
    assert_same_bytes(&beta[..MIB], &first, "beta's first MiB");
    assert_all_zero(&beta[MIB..], "beta beyond the first MiB");
    let second = random_bytes(MIB);
    nbd_write(a, 8 * MIB as u64, &second);
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_replicas_identical(size, "write after the hostile peers");
    assert_same_bytes(
        &b.backing_data(9 * MIB as u64)[8 * MIB..],
        &second,
        "beta after a new write",
    );
    a.assert_alive();
    b.assert_alive();
}

/// Frames read from `s` until it closes or `quiet` passes without a byte.
fn read_msgs(s: &mut TcpStream, quiet: Duration) -> Vec<proto::peer::Msg> {
    use std::io::Read;
    let mut raw = Vec::new();
    s.set_read_timeout(Some(quiet)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    let mut msgs = Vec::new();
    let mut rest = &raw[..];
    while rest.len() >= proto::peer::PREFIX_LEN {
        let p: [u8; proto::peer::PREFIX_LEN] = rest[..proto::peer::PREFIX_LEN].try_into().unwrap();
        let pre = proto::peer::parse_prefix(&p).expect("a frame from the node");
        let h = proto::peer::PREFIX_LEN;
        let end = h + pre.header_len + pre.payload_len as usize;
        assert!(rest.len() >= end, "a truncated frame from the node");
        msgs.push(proto::peer::decode_header(&p, &pre, &rest[h..h + pre.header_len]).unwrap());
        rest = &rest[end..];
    }
    msgs
}

fn frame(msg: &proto::peer::Msg) -> Vec<u8> {
    let mut v = Vec::new();
    proto::peer::encode_frame(&mut v, msg, &[]);
    v
}

/// Hardening of the handshake: a stranger who connects with a perfect hello gets no HMAC to
/// test guesses of the secret against (the dialing node proves first), and a refusal from a
/// peer that never authenticated is logged, not taken for a split brain.
#[test]
fn a_stranger_gets_no_proof_and_its_refusals_are_not_split_brains() {
    use std::io::Write;
    use std::net::TcpListener;
    let c = pair_via_proxy("repl-stranger", "C");
    let (a, b) = (c.alpha(), c.beta());
    let hello = |node: &str| proto::peer::Msg::Hello {
        version: proto::peer::PROTOCOL_VERSION,
        resource: c.resource().to_string(),
        node: node.to_string(),
        nonce: [9; 32],
        encryption: false,
        protocol: b'C',
        bitmap_granularity: 4096,
        after_sb_0pri: 0,
        direct_io: false,
    };
    let auth0 = b.repl_u64("auth_failures");

    let mut s = TcpStream::connect(b.replication_addr()).unwrap();
    s.write_all(&frame(&hello("alpha"))).unwrap();
    let got = read_msgs(&mut s, Duration::from_secs(5));
    assert!(
        matches!(got.first(), Some(proto::peer::Msg::Hello { .. })),
        "beta's answer to a matching hello: {got:?}"
    );
    assert!(
        !got.iter()
            .any(|m| matches!(m, proto::peer::Msg::Auth { .. })),
        "beta proved the secret to a stranger: {got:?}"
    );
    s.write_all(&frame(&proto::peer::Msg::Auth { mac: [0; 32] }))
        .unwrap();
    let got = read_msgs(&mut s, Duration::from_secs(5));
    assert!(
        got.iter().any(|m| matches!(m, proto::peer::Msg::Refuse { reason } if reason.contains("authentication failed"))),
        "beta's answer to a wrong proof: {got:?}"
    );
    assert!(
        !got.iter()
            .any(|m| matches!(m, proto::peer::Msg::Auth { .. })),
        "beta proved the secret to a stranger: {got:?}"
    );
    b.wait_repl(Duration::from_secs(5), "counting the failure", |r| {
        r["auth_failures"].as_u64().is_some_and(|n| n > auth0)
    });

    // A stranger answers alpha's dials (beta stays away) and claims a split brain.
    b.ctl_ok(&["disconnect"]);
    a.wait_not_connected(Duration::from_secs(10));
    let fake = TcpListener::bind("127.0.0.1:0").unwrap();
    let fake_addr = fake.local_addr().unwrap();
    let beta_hello = frame(&hello("beta"));
    let stranger = std::thread::spawn(move || {
        fake.set_nonblocking(false).unwrap();
        let mut served = 0;
        for conn in fake.incoming().take(3) {
            let Ok(mut conn) = conn else { break };
            let _ = conn.write_all(&beta_hello);
            let _ = conn.write_all(&frame(&proto::peer::Msg::Refuse {
                reason: "split brain: both nodes are primary".into(),
            }));
            let _ = read_msgs(&mut conn, Duration::from_millis(300));
            served += 1;
        }
        served
    });
    let proxy = c.proxy();
    proxy.set_target(fake_addr);
    proxy.cut();
    wait_log_line(
        a,
        &["refused before authenticating", "split brain"],
        Duration::from_secs(15),
    );
    let r = a.repl();
    assert_ne!(r["connection"], "split-brain", "{r}");
    assert!(
        log_text(a)
            .lines()
            .all(|l| !(l.contains("ERROR") && l.contains("split brain"))),
        "alpha reported a split brain from a stranger:\n{}",
        a.log_tail(30)
    );
    proxy.set_target(b.replication_addr());
    proxy.cut();
    // The stranger's listener is released by its third connection or by this one.
    let _ = TcpStream::connect(fake_addr);
    let _ = TcpStream::connect(fake_addr);
    let _ = TcpStream::connect(fake_addr);
    assert!(stranger.join().unwrap() >= 1);

    b.ctl_ok(&["connect"]);
    a.wait_connected(CONNECT_TIMEOUT);
    let data = random_bytes(MIB);
    nbd_write(a, 0, &data);
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_replicas_identical(a.size(), "after the stranger");
}

// ---------------------------------------------------------------------------------------------
// 5. Roles in a pair.

#[test]
fn secondary_refuses_nbd_and_promotion_while_peer_is_primary() {
    let c = pair("repl-roles", "C");
    let (a, b) = (c.alpha(), c.beta());
    let pid = b.pid().unwrap();

    let out = run(
        Command::new("nbdinfo").arg("--size").arg(b.uri()),
        CMD_TIMEOUT,
    );
    assert_ne!(
        out.code,
        Some(0),
        "nbdinfo succeeded on the secondary\n{}",
        out.describe()
    );
    assert!(
        !out.stderr.trim().is_empty(),
        "nbdinfo failed without a message"
    );
    let mut r = RawNbd::connect(b.export()).expect("connect");
    r.start_handshake();
    let rep = r
        .opt_go(b.resource())
        .expect_err("NBD_OPT_GO on a secondary");
    assert_eq!(rep.reply_type, REP_ERR_POLICY, "{:?}", rep.text());
    assert!(!rep.text().trim().is_empty(), "refusal without a message");
    r.abort_after_refusal();
    assert!(pid_alive(pid), "secondary died\n{}", b.log_tail(40));

    for args in [&["primary"][..], &["primary", "--force"][..]] {
        let out = b.ctl(args);
        assert_eq!(
            out.code,
            Some(1),
            "{args:?} while the peer is primary\n{}",
            out.describe()
        );
        let msg = out.stderr.to_lowercase();
        assert!(
            msg.contains("peer") && msg.contains("primary"),
            "{args:?}: the message should say the peer is primary\n{}",
            out.describe()
        );
    }
    assert_eq!(b.status_json()["role"], "secondary");
    assert_eq!(a.status_json()["role"], "primary");
    let rb = b.wait_connected(Duration::from_secs(5));
    assert_eq!(rb["peer_role"], "primary", "{rb}");

    // The pair still replicates.
    let data = random_bytes(2 * MIB);
    nbd_write(a, 4096, &data);
    c.wait_in_sync(SYNC_TIMEOUT);
    assert_same_bytes(
        &b.backing_data(4096 + 2 * MIB as u64)[4096..],
        &data,
        "beta after the refused promotions",
    );

    // Switchover: demote alpha, promote beta (no --force needed: connected, up to date).
    a.ctl_ok(&["secondary"]);
    b.wait_repl(CONNECT_TIMEOUT, "seeing a secondary peer", |r| {
        r["connection"] == "connected" && r["peer_role"] == "secondary"
    });
    b.ctl_ok(&["primary"]);
    a.wait_repl(CONNECT_TIMEOUT, "connected to the new primary", |r| {
        r["connection"] == "connected" && r["peer_role"] == "primary"
    });
    let out = run(
        Command::new("nbdinfo").arg("--size").arg(a.uri()),
        CMD_TIMEOUT,
    );
    assert_ne!(out.code, Some(0), "nbdinfo succeeded on the demoted alpha");
    let out = a.ctl(&["primary"]);
    assert_eq!(
        out.code,
        Some(1),
        "alpha promoted while beta is primary\n{}",
        out.describe()
    );
    let data2 = random_bytes(MIB);
    nbd_write(b, 16 * MIB as u64, &data2);
    let size = b.size();
    let rb = b.wait_repl(SYNC_TIMEOUT, "in sync as the new primary", |r| {
        r["connection"] == "connected"
            && r["lag_writes"] == 0
            && r["seq_applied"] == r["seq_written"]
    });
    let ra = a.wait_repl(SYNC_TIMEOUT, "applied the new primary's writes", |r| {
        r["seq_applied"] == rb["seq_written"]
    });
    // A secondary shows its own marks, not its earlier term's journal or stale acks.
    assert_eq!(
        ra["seq_received"], ra["seq_applied"],
        "alpha as secondary: {ra}"
    );
    assert_eq!(
        ra["seq_written"], ra["seq_applied"],
        "alpha as secondary: {ra}"
    );
    assert!(u(&ra, "seq_durable") <= u(&ra, "seq_applied"), "{ra}");
    c.assert_replicas_identical(size, "after the switchover");
    assert_same_bytes(
        &a.backing_data(17 * MIB as u64)[16 * MIB..],
        &data2,
        "alpha after a write on the new primary",
    );
    // A planned switchover between connected, up-to-date nodes starts no generation (the new
    // primary ending its old secondary connection is no loss of a peer), so the way back is
    // just as direct.
    assert_eq!(
        current_gen(a),
        current_gen(b),
        "a switchover moved one node's generation
{}",
        b.log_tail(20)
    );
    b.ctl_ok(&["secondary"]);
    a.wait_repl(CONNECT_TIMEOUT, "seeing a secondary peer again", |r| {
        r["connection"] == "connected" && r["peer_role"] == "secondary"
    });
    a.ctl_ok(&["primary"]);
    b.wait_repl(
        CONNECT_TIMEOUT,
        "connected to alpha as primary again",
        |r| r["connection"] == "connected" && r["peer_role"] == "primary",
    );
    assert_eq!(current_gen(a), current_gen(b), "after the switch back");
}

// ---------------------------------------------------------------------------------------------
// 6. A peer whose device is too small is refused; no data moves.

#[test]
fn peer_with_smaller_backing_is_refused() {
    let c = Cluster::builder("repl-small")
        .nodes(2)
        .backing_size(BACKING)
        .node_backing_size("beta", BACKING - (16 << 20))
        .build();
    let (a, b) = (c.alpha(), c.beta());
    a.create_md();
    b.create_md();
    // alpha is primary before beta comes up: two connected secondaries of different sizes
    // would refuse the promotion itself (see `roles.rs`), which is not what this test is for.
    a.up();
    a.primary_force();
    b.up();
    let (sa, sb) = (a.size(), b.size());
    assert!(sb < sa, "beta {sb} vs alpha {sa}");
    let nums = |text: &str| text.contains(&sa.to_string()) && text.contains(&sb.to_string());
    let ra = a.wait_repl(CONNECT_TIMEOUT, "refusing the small peer", |r| {
        r["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("small"))
    });
    let err = ra["last_error"].as_str().unwrap();
    assert!(
        nums(err),
        "alpha's last_error should give both sizes ({sa}, {sb}): {err}"
    );
    wait_log_line(
        a,
        &["small", &sa.to_string(), &sb.to_string()],
        Duration::from_secs(5),
    );
    // Beta says so too (its status or its log).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rb = b.repl();
        let in_status = rb["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("small") && nums(e));
        let in_log = log_text(b).lines().any(|l| l.contains("small") && nums(l));
        if in_status || in_log {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "beta does not report the size mismatch: {rb}\n{}",
            b.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Writes on alpha stay on alpha.
    let data = random_bytes(2 * MIB);
    nbd_write(a, 0, &data);
    std::thread::sleep(Duration::from_secs(3));
    let ra = a.repl();
    assert_ne!(ra["connection"], "connected", "{ra}");
    assert!(u(&ra, "seq_written") > 0, "{ra}");
    assert_eq!(u(&ra, "seq_applied"), 0, "{ra}");
    assert!(
        u(&ra, "out_of_sync") >= 2 * MIB as u64,
        "the bitmap should hold the writes: {ra}"
    );
    let rb = b.repl();
    assert_eq!(u(&rb, "seq_applied"), 0, "{rb}");
    assert_eq!(u(&rb, "seq_received"), 0, "{rb}");
    assert_all_zero(&b.backing_data(sb), "beta's data");
    assert_same_bytes(&a.backing_data(2 * MIB as u64), &data, "alpha's data");
    a.assert_alive();
    b.assert_alive();
}

/// The nodes' configs name different protocols (an admin edited one copy): the acks would
/// not mean what either side's admin chose, so the link is refused, on both sides, naming
/// both settings; once the configs agree the nodes connect.
#[test]
fn protocol_mismatch_is_refused_on_both_sides() {
    let c = Cluster::builder("repl-proto-mismatch")
        .nodes(2)
        .backing_size(BACKING)
        .protocol("B")
        .build();
    let (a, b) = (c.alpha(), c.beta());
    a.create_md();
    b.create_md();
    a.up();
    a.primary_force();
    let text = c.config_text();
    let changed = text.replace("protocol = \"B\"", "protocol = \"C\"");
    assert_ne!(
        changed, text,
        "the harness config should set the protocol: {text}"
    );
    c.write_config(&changed);
    b.up();
    assert_refused_on_both_sides(a, b, &["replication protocol differs", "has B", "has C"]);
    c.write_config(&text);
    b.down();
    b.up();
    a.wait_connected(CONNECT_TIMEOUT);
    b.wait_connected(CONNECT_TIMEOUT);
    nbd_write(a, 0, &random_bytes(MIB));
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_replicas_identical(a.size(), "after the configs agree");
}

/// Both nodes log the refusal (a line with every one of `needles`, naming both nodes), neither
/// connects, and the secondary received nothing.
fn assert_refused_on_both_sides(a: &Node, b: &Node, needles: &[&str]) {
    for n in [a, b] {
        let l = wait_log_line(n, needles, Duration::from_secs(20));
        assert!(l.contains("alpha") && l.contains("beta"), "{l}");
    }
    assert_ne!(a.repl()["connection"], "connected");
    assert_ne!(b.repl()["connection"], "connected");
    assert_eq!(u(&b.repl(), "seq_received"), 0, "no data before agreement");
}

/// Nodes whose bitmaps count different bytes per bit would read each other's bitmap wrongly
/// (a resync of the wrong regions): refused at the handshake on both sides, with both
/// values, and no data flows; with the same granularity they connect.
#[test]
fn bitmap_granularity_mismatch_is_refused_on_both_sides() {
    let c = Cluster::builder("repl-gran-mismatch")
        .nodes(2)
        .backing_size(BACKING)
        .protocol("C")
        .build();
    let (a, b) = (c.alpha(), c.beta());
    a.create_md();
    a.up();
    a.primary_force();
    let text = c.config_text();
    let changed = text.replace(
        "bitmap-granularity = \"4K\"",
        "bitmap-granularity = \"64K\"",
    );
    assert_ne!(
        changed, text,
        "the harness config should set the granularity: {text}"
    );
    c.write_config(&changed);
    b.create_md();
    b.up();
    assert_refused_on_both_sides(a, b, &["bitmap granularity differs", "4096", "65536"]);
    b.down();
    c.write_config(&text);
    b.ctl_ok(&["create-md", "--force"]);
    b.up();
    a.wait_connected(CONNECT_TIMEOUT);
    b.wait_connected(CONNECT_TIMEOUT);
    nbd_write(a, 0, &random_bytes(MIB));
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_replicas_identical(a.size(), "after the configs agree");
}

/// Nodes with different split-brain policies could each decide the other's data is the one
/// to drop (or each its own): refused at the handshake on both sides, naming both policies,
/// as DRBD refuses incompatible after-sb settings; with the same policy they connect.
#[test]
fn split_brain_policy_mismatch_is_refused_on_both_sides() {
    setting_mismatch_is_refused(
        "repl-sb-mismatch",
        "bitmap-granularity = \"4K\"\n",
        "bitmap-granularity = \"4K\"\nafter-sb-0pri = \"discard-zero-changes\"\n",
        &[
            "split-brain policy differs",
            "discard-zero-changes",
            "disconnect",
        ],
    );
}

/// Review finding: a primary without `direct-io` accepts 512-byte writes, which a secondary
/// with it (4 KiB-aligned I/O only) could not apply: each failed as a disk error, the link
/// dropped, and the resync that followed failed again, for ever. The setting must now agree,
/// as the others in the hello do.
#[test]
fn direct_io_mismatch_is_refused_on_both_sides() {
    setting_mismatch_is_refused(
        "repl-dio-mismatch",
        "direct-io = false",
        "direct-io = true",
        &[
            "direct-io differs",
            "set the same `direct-io` on both nodes",
        ],
    );
}

/// Alpha up and primary with the cluster's config; beta with `from` replaced by `to` in it:
/// both refuse the connection with a message holding all of `needles`; with the same config
/// again, the two connect and replicate.
fn setting_mismatch_is_refused(test: &str, from: &str, to: &str, needles: &[&str]) {
    let c = Cluster::builder(test)
        .nodes(2)
        .backing_size(BACKING)
        .protocol("C")
        .build();
    let (a, b) = (c.alpha(), c.beta());
    a.create_md();
    a.up();
    a.primary_force();
    let text = c.config_text();
    assert!(text.contains(from), "{text}");
    c.write_config(&text.replace(from, to));
    b.create_md();
    b.up();
    assert_refused_on_both_sides(a, b, needles);
    b.down();
    c.write_config(&text);
    b.up();
    a.wait_connected(CONNECT_TIMEOUT);
    b.wait_connected(CONNECT_TIMEOUT);
    nbd_write(a, 0, &random_bytes(MIB));
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_replicas_identical(a.size(), &format!("after the settings agree ({to})"));
}

// ---------------------------------------------------------------------------------------------
// 7. Link cut and reconnect within the journal, under each protocol.

#[derive(Clone, Copy, Debug)]
enum Cut {
    Proxy,
    Disconnect,
}

fn cut_and_reconnect(test: &str, protocol: &str, how: Cut) {
    let c = pair_via_proxy(test, protocol);
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let mut want = vec![0u8; size as usize];
    let d0 = random_bytes(8 * MIB);
    nbd_write(a, 0, &d0);
    want[..8 * MIB].copy_from_slice(&d0);
    c.wait_in_sync(SYNC_TIMEOUT);

    // Cut while a 16 MiB write stream is going on.
    let d1 = random_bytes(16 * MIB);
    let started = Instant::now();
    std::thread::scope(|s| {
        let h = s.spawn(|| nbd_write(a, 8 * MIB as u64, &d1));
        std::thread::sleep(Duration::from_millis(100));
        match how {
            Cut::Proxy => {
                assert!(c.proxy().cut_and_refuse() >= 1, "no link connection to cut");
            }
            Cut::Disconnect => {
                a.ctl_ok(&["disconnect"]);
            }
        }
        h.join().expect("writer thread");
    });
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "writes stalled for {:?} around the cut",
        started.elapsed()
    );
    want[8 * MIB..24 * MIB].copy_from_slice(&d1);
    let ra = match how {
        Cut::Proxy => a.wait_not_connected(Duration::from_secs(10)),
        Cut::Disconnect => a.wait_repl(Duration::from_secs(10), "standalone", |r| {
            r["connection"] == "standalone"
        }),
    };
    assert_eq!(ra["peer_role"], "unknown", "{ra}");

    // More writes while cut: new data and overwrites.
    let d2 = random_bytes(8 * MIB);
    nbd_write(a, 30 * MIB as u64, &d2);
    want[30 * MIB..38 * MIB].copy_from_slice(&d2);
    let d3 = random_bytes(MIB);
    nbd_write(a, 2 * MIB as u64 + 4096, &d3);
    want[2 * MIB + 4096..3 * MIB + 4096].copy_from_slice(&d3);
    let ra = a.repl();
    assert_ne!(ra["connection"], "connected", "{ra}");
    assert!(u(&ra, "seq_written") > u(&ra, "seq_applied"), "{ra}");
    assert!(
        u(&ra, "lag_writes") > 0 && u(&ra, "lag_bytes") >= 9 * MIB as u64,
        "{ra}"
    );
    assert!(u(&ra, "journal_used") >= 9 * MIB as u64, "{ra}");
    assert!(u(&ra, "out_of_sync") >= 9 * MIB as u64, "{ra}");
    // The cut is real: beta does not have the new data.
    let beta_now = b.backing_data(38 * MIB as u64);
    assert!(
        beta_now[30 * MIB..38 * MIB] != d2[..],
        "beta received data while the link was cut"
    );

    // The secondary's text status says its disk state is as of the last contact.
    b.wait_not_connected(Duration::from_secs(10));
    let text = b.ctl_ok(&["status"]).stdout;
    assert!(
        text.contains("disk:up-to-date (as of the last contact with the peer"),
        "beta's status with the link down:\n{text}"
    );
    // `wait-sync` gives up while the link is down...
    let out = a.ctl(&["wait-sync", "--timeout", "1"]);
    assert_eq!(
        out.code,
        Some(1),
        "wait-sync with the link down\n{}",
        out.describe()
    );

    match how {
        Cut::Proxy => c.proxy().resume(),
        Cut::Disconnect => {
            a.ctl_ok(&["connect"]);
        }
    }
    // ...and returns once the peer has everything (with no limit of its own: it waits as
    // long as that takes).
    let out = a.ctl_timeout(&["wait-sync"], Duration::from_secs(60));
    assert!(
        out.success(),
        "wait-sync after the link came back\n{}",
        out.describe()
    );
    let ra = a.repl();
    assert_eq!(ra["connection"], "connected", "after wait-sync: {ra}");
    assert_eq!(u(&ra, "lag_writes"), 0, "after wait-sync: {ra}");
    assert_eq!(
        u(&ra, "seq_applied"),
        u(&ra, "seq_written"),
        "after wait-sync: {ra}"
    );
    let ra = c.wait_in_sync(SYNC_TIMEOUT);
    assert_eq!(ra["peer_disk"], "up-to-date", "{ra}");
    assert_eq!(u(&ra, "crc_errors"), 0, "{ra}");
    a.wait_repl(Duration::from_secs(10), "with an empty bitmap", |r| {
        r["out_of_sync"] == 0
    });
    c.assert_replicas_identical(size, &format!("protocol {protocol}, {how:?} cut"));
    assert_same_bytes(&b.backing_data(size), &want, "beta's data");
    a.assert_alive();
    b.assert_alive();
}

#[test]
fn link_cut_by_proxy_and_back_protocol_a() {
    cut_and_reconnect("repl-cut-a", "A", Cut::Proxy);
}

#[test]
fn link_disconnect_and_connect_protocol_b() {
    cut_and_reconnect("repl-cut-b", "B", Cut::Disconnect);
}

#[test]
fn link_cut_by_proxy_and_back_protocol_c() {
    cut_and_reconnect("repl-cut-c", "C", Cut::Proxy);
}

#[test]
fn link_disconnect_and_connect_protocol_c() {
    cut_and_reconnect("repl-cut-c-disc", "C", Cut::Disconnect);
}

/// The secondary dies (SIGKILL) while the primary writes; the primary goes on alone, and the
/// restarted secondary catches up from the journal.
#[test]
fn secondary_killed_and_restarted_catches_up() {
    let c = pair("repl-beta-kill", "C");
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let mut want = vec![0u8; size as usize];
    let d0 = random_bytes(8 * MIB);
    nbd_write(a, 0, &d0);
    want[..8 * MIB].copy_from_slice(&d0);
    c.wait_in_sync(SYNC_TIMEOUT);

    let d1 = random_bytes(16 * MIB);
    let pid = b.status_json()["pid"].as_u64().expect("pid") as u32;
    let started = Instant::now();
    std::thread::scope(|s| {
        let h = s.spawn(|| nbd_write(a, 8 * MIB as u64, &d1));
        std::thread::sleep(Duration::from_millis(100));
        kill9(pid);
        h.join().expect("writer thread");
    });
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "writes stalled for {:?} after the secondary died",
        started.elapsed()
    );
    assert!(wait_pid_gone(pid, Duration::from_secs(30)));
    want[8 * MIB..24 * MIB].copy_from_slice(&d1);
    a.wait_not_connected(Duration::from_secs(10));
    let d2 = random_bytes(4 * MIB);
    nbd_write(a, 40 * MIB as u64, &d2);
    want[40 * MIB..44 * MIB].copy_from_slice(&d2);

    let mark = log_text(a).lines().count();
    b.up();
    let rb = b.status_json();
    assert_eq!(rb["role"], "secondary", "{rb}");
    c.wait_in_sync(SYNC_TIMEOUT);
    // Beta's durable mark and the term of its record came back from its superblock: the
    // journal (which holds every write of this test) brings it back, not a resync.
    let since: Vec<String> = log_text(a).lines().skip(mark).map(str::to_string).collect();
    assert!(
        since
            .iter()
            .any(|l| l.contains("streaming to the peer from sequence"))
            && !since.iter().any(|l| l.contains("resync to the peer (")),
        "beta was not caught up from the journal after its restart:\n{}",
        since.join("\n")
    );
    c.assert_replicas_identical(size, "after the secondary's restart");
    assert_same_bytes(&b.backing_data(size), &want, "beta's data");
}

// ---------------------------------------------------------------------------------------------
// Acknowledgement timing: with the link stalled (proxy paused, nothing closed), a write is
// acknowledged at once under A, and only once the peer has it under B and C.

/// Sends one 4 KiB write while the link is paused for `pause`; returns (whether the write
/// was acknowledged before the link resumed, its latency).
/// Writes one block while the link is stalled for `pause`. Returns whether the write was
/// acknowledged during the stall, its latency, and whether its reply came only after the
/// stall ended (both instants taken on the same clock, so thread start-up skew cannot blur
/// the order).
fn write_during_stall(c: &Cluster, offset: u64, pause: Duration) -> (bool, Duration, bool) {
    let a = c.alpha();
    let mut r = a.raw_open();
    let block = random_bytes(4096);
    let done = std::sync::atomic::AtomicBool::new(false);
    c.proxy().pause();
    let (before, (lat, done_at), unpaused_at) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let t = Instant::now();
            r.write_at(offset, &block, 0)
                .unwrap_or_else(|e| panic!("write during the stall failed: errno {e}"));
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            (t.elapsed(), Instant::now())
        });
        std::thread::sleep(pause);
        let before = done.load(std::sync::atomic::Ordering::SeqCst);
        let unpaused_at = Instant::now();
        c.proxy().unpause();
        (before, h.join().expect("writer thread"), unpaused_at)
    });
    r.disconnect();
    (before, lat, done_at >= unpaused_at)
}

fn ack_timing(test: &str, protocol: &str) {
    let c = pair_via_proxy(test, protocol);
    let a = c.alpha();
    nbd_write(a, 0, &random_bytes(64 * 1024));
    c.wait_in_sync(SYNC_TIMEOUT);

    let pause = Duration::from_millis(1500);
    let (acked_in_stall, lat, after_stall) = write_during_stall(&c, MIB as u64, pause);
    // Decided by the order of events (acknowledged before or after the unpause), not by
    // latencies a loaded machine stretches.
    if protocol == "A" {
        assert!(
            acked_in_stall,
            "protocol A: the write waited for the stalled peer ({lat:?})"
        );
    } else {
        assert!(
            !acked_in_stall && after_stall,
            "protocol {protocol}: the write was acknowledged after {lat:?} although the peer \
             could not have {} it (link stalled for {pause:?})",
            if protocol == "B" {
                "received"
            } else {
                "written"
            }
        );
    }
    // A short stall does not break the link.
    let ra = c.wait_in_sync(SYNC_TIMEOUT);
    assert_eq!(u(&ra, "crc_errors"), 0, "{ra}");
    c.assert_replicas_identical(a.size(), &format!("protocol {protocol} after a stall"));
}

#[test]
fn ack_timing_protocol_a() {
    ack_timing("repl-ack-a", "A");
}

#[test]
fn ack_timing_protocol_b() {
    ack_timing("repl-ack-b", "B");
}

#[test]
fn ack_timing_protocol_c() {
    ack_timing("repl-ack-c", "C");
}

/// Under C, a link that stalls for good (no FIN, no RST) must not block writes forever: the
/// peer is declared dead, waiting writes are acknowledged and new ones go on; the link comes
/// back once traffic flows again.
#[test]
fn protocol_c_long_stall_releases_writes_and_recovers() {
    let c = pair_via_proxy("repl-stall-c", "C");
    let a = c.alpha();
    let size = a.size();
    nbd_write(a, 0, &random_bytes(64 * 1024));
    c.wait_in_sync(SYNC_TIMEOUT);
    let mut r = a.raw_open();
    let block = random_bytes(4096);
    let d = random_bytes(2 * MIB);
    c.proxy().pause();
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            let t = Instant::now();
            r.write_at(MIB as u64, &block, 0)
                .unwrap_or_else(|e| panic!("write during the stall failed: errno {e}"));
            t.elapsed()
        });
        // Bounded by RawNbd's 10 s read timeout: a write still waiting then fails the test.
        let lat = h.join().expect("writer thread");
        println!("write acknowledged after {lat:?} of stall");
        let ra = a.repl();
        assert_ne!(
            ra["connection"], "connected",
            "stalled peer still connected: {ra}"
        );
        // Writes go on while the peer is unreachable (a write that waited for it would fail
        // on RawNbd's 10 s timeout; the bound leaves room for a flush's fsync on a busy disk).
        let t = Instant::now();
        nbd_write(a, 4 * MIB as u64, &d);
        assert!(
            t.elapsed() < Duration::from_secs(9),
            "writes blocked while the peer is unreachable: {:?}",
            t.elapsed()
        );
    });
    r.disconnect();
    c.proxy().unpause();
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_replicas_identical(size, "after a long stall");
    assert_same_bytes(
        &c.beta().backing_data(6 * MIB as u64)[4 * MIB..],
        &d,
        "beta after a long stall",
    );
}

/// The link flaps (cut, sometimes held down for a moment) many times while a writer keeps
/// many stamped writes in flight; once it stays up, both replicas are identical and hold every
/// acknowledged write.
fn flapping_link(test: &str, protocol: &str) {
    let Some(py) = python_with_nbd() else {
        skip_or_fail("no python3 with the libnbd bindings (python3-libnbd)");
        return;
    };
    let c = pair_via_proxy(test, protocol);
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let blocks = 4096u64;
    let mut w = StampWriter::spawn(
        &py,
        c.dir().path(),
        "w",
        &a.uri(),
        StampOpts {
            blocks,
            inflight: 16,
            order: StampOrder::Random,
            count: 0,
            seconds: 0.0,
            flush_every: 0,
            flush_until: 0,
        },
    );
    wait_acked(&mut w, 100, Duration::from_secs(15));
    let mut rng = XorShift::new(seed());
    let p = c.proxy();
    let mut cuts = 0;
    let mut accepted_at_cut = 0;
    for i in 0..6 {
        // Each cut hits a live connection: the link must have come back (a connection made
        // after the previous cut, and alpha reporting connected) first.
        let t = Instant::now();
        a.wait_repl(
            CONNECT_TIMEOUT,
            &format!("reconnected before cut {}", i + 1),
            |r| r["connection"] == "connected" && p.accepted() > accepted_at_cut && p.active() >= 1,
        );
        let back = t.elapsed();
        std::thread::sleep(Duration::from_millis(100 + rng.next_u64() % 400));
        accepted_at_cut = p.accepted();
        let n = if i % 2 == 0 {
            p.cut()
        } else {
            let n = p.cut_and_refuse();
            std::thread::sleep(Duration::from_millis(rng.next_u64() % 400));
            p.resume();
            n
        };
        assert!(
            n >= 1,
            "cut {}: no live link connection (reconnected after {back:?})",
            i + 1
        );
        cuts += n;
        assert!(w.running(), "writer stopped:\n{}", w.output());
    }
    w.request_stop();
    assert!(
        w.wait_exit(Duration::from_secs(20)),
        "writer did not stop:\n{}",
        w.output()
    );
    let log = w.log();
    assert!(log.errors.is_empty(), "writes failed: {:?}", log.errors);
    assert_eq!(log.acked.len(), log.issued.len(), "{}", w.output());
    assert!(
        p.accepted() >= 6,
        "alpha reconnected only {} times",
        p.accepted()
    );

    let ra = c.wait_in_sync(SYNC_TIMEOUT);
    assert_eq!(u(&ra, "crc_errors"), 0, "{ra}");
    c.assert_replicas_identical(size, &format!("protocol {protocol}, flapping link"));
    let stamps = Stamp::parse_all(&b.backing_data(size), blocks as usize);
    let mut last: HashMap<u64, u64> = HashMap::new();
    for &(s, blk) in &log.acked {
        let e = last.entry(blk).or_insert(0);
        *e = (*e).max(s);
    }
    for (blk, st) in stamps.iter().enumerate() {
        let want = last.get(&(blk as u64)).copied();
        match (want, *st) {
            (None, Stamp::Zero) => {}
            (Some(w), Stamp::Valid { block, seq }) if block == blk as u64 && seq == w => {}
            (w, got) => panic!("block {blk}: want the last write {w:?}, beta holds {got:?}"),
        }
    }
    println!(
        "{} writes, {cuts} connections cut, {} accepted by the proxy",
        log.acked.len(),
        p.accepted()
    );
}

#[test]
fn flapping_link_protocol_a() {
    flapping_link("repl-flap-a", "A");
}

#[test]
fn flapping_link_protocol_c() {
    flapping_link("repl-flap-c", "C");
}

/// The primary goes down cleanly and comes back: it starts secondary, is promoted again
/// without --force (its disk is up to date and the peer is a connected secondary), and
/// replication continues where it stopped.
#[test]
fn primary_restart_and_repromotion_continues_replication() {
    let c = pair("repl-restart", "B");
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let d0 = random_bytes(8 * MIB);
    nbd_write(a, 0, &d0);
    let ra0 = c.wait_in_sync(SYNC_TIMEOUT);
    a.down();
    b.wait_not_connected(Duration::from_secs(10));
    a.up();
    let sa = a.status_json();
    assert_eq!(sa["role"], "secondary", "{sa}");
    assert_eq!(sa["disk"], "up-to-date", "{sa}");
    a.wait_repl(CONNECT_TIMEOUT, "connected to a secondary", |r| {
        r["connection"] == "connected" && r["peer_role"] == "secondary"
    });
    a.ctl_ok(&["primary"]);
    c.wait_in_sync(SYNC_TIMEOUT);
    let d1 = random_bytes(4 * MIB);
    nbd_write(a, 2 * MIB as u64, &d1);
    let ra = c.wait_in_sync(SYNC_TIMEOUT);
    assert!(
        u(&ra, "seq_written") > u(&ra0, "seq_written"),
        "sequence numbers went backwards across a restart: before {ra0}, after {ra}"
    );
    c.assert_replicas_identical(size, "after the primary's restart");
    let mut want = d0;
    want[2 * MIB..6 * MIB].copy_from_slice(&d1);
    assert_same_bytes(&b.backing_data(8 * MIB as u64), &want, "beta's data");
}

// ---------------------------------------------------------------------------------------------
// The journal: a small ring wraps many times under a connected peer (back-pressure, no
// overflow); a disconnected primary that writes more than the ring holds tells the peer it
// needs a resync instead of streaming a journal with holes.

fn small_journal_pair(test: &str, protocol: &str, journal: &str) -> Cluster {
    let c = Cluster::builder(test)
        .nodes(2)
        .backing_size(BACKING)
        .protocol(protocol)
        .journal_size(journal)
        .build();
    c.start_pair();
    c
}

fn journal_wraps(test: &str, protocol: &str) {
    let c = small_journal_pair(test, protocol, "2M");
    let a = c.alpha();
    let size = a.size();
    let ra = a.repl();
    assert!(u(&ra, "journal_size") <= 2 << 20, "{ra}");
    let n = 40 * MIB;
    let input = c.dir().join("in.bin");
    let data = write_random_file(&input, n);
    run_ok(
        Command::new("nbdcopy")
            .args(["--flush", "-C", "2", "--request-size=262144"])
            .arg(&input)
            .arg(a.uri()),
        LONG_TIMEOUT,
    );
    let ra = c.wait_in_sync(SYNC_TIMEOUT);
    assert!(u(&ra, "bytes_sent") >= n as u64, "{ra}");
    assert_eq!(
        u(&ra, "out_of_sync"),
        0,
        "the journal overflowed while connected: {ra}"
    );
    c.assert_replicas_identical(size, &format!("protocol {protocol}, 2M journal"));
    assert_same_bytes(
        &c.beta().backing_data(n as u64),
        &data,
        "beta after 20 journal wraps",
    );
}

#[test]
fn small_journal_wraps_while_connected_protocol_a() {
    journal_wraps("repl-wrap-a", "A");
}

#[test]
fn small_journal_wraps_while_connected_protocol_c() {
    journal_wraps("repl-wrap-c", "C");
}

/// Writes the node's export in requests of `req` bytes.
fn nbd_write_req(node: &Node, offset: u64, data: &[u8], req: usize) {
    let mut r = node.raw_open();
    for (i, chunk) in data.chunks(req).enumerate() {
        let off = offset + (i * req) as u64;
        r.write_at(off, chunk, 0)
            .unwrap_or_else(|e| panic!("NBD write at {off} failed: errno {e}"));
    }
    r.command(CMD_FLUSH, 0, 0, 0)
        .unwrap_or_else(|e| panic!("NBD flush failed: errno {e}"));
    r.disconnect();
}

/// After the link comes back, the pair must end in one of two honest states: in sync (and
/// then the replicas are identical), or refusing with a message that says a resync is needed
/// (and then beta still holds exactly `beta_before`). Waits up to 25 s for either.
fn honest_after_reconnect(c: &Cluster, beta_before: &[u8]) {
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let (ra, rb) = (a.repl(), b.repl());
        let in_sync = ra["connection"] == "connected"
            && ra["lag_writes"] == 0
            && ra["out_of_sync"] == 0
            && ra["seq_applied"] == ra["seq_written"]
            && rb["seq_applied"] == ra["seq_written"];
        if in_sync {
            // Give a resync that claims to be done a moment to settle, then compare.
            let out = a.ctl_timeout(&["wait-sync", "--timeout", "20"], Duration::from_secs(30));
            assert!(out.success(), "{}", out.describe());
            c.assert_replicas_identical(
                size,
                &format!("pair reports in sync after an overflow\nalpha: {ra}\nbeta: {rb}"),
            );
            return;
        }
        let refused = ra["last_error"]
            .as_str()
            .is_some_and(|e| e.to_lowercase().contains("resync"));
        if refused && ra["connection"] != "connected" {
            std::thread::sleep(Duration::from_secs(1));
            assert_same_bytes(
                &b.backing_data(beta_before.len() as u64),
                beta_before,
                "beta while the primary says it needs a resync",
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "neither in sync nor refusing after 25 s\nalpha: {ra}\nbeta: {rb}\n\
             --- alpha log ---\n{}\n--- beta log ---\n{}",
            a.log_tail(20),
            b.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// More data written while disconnected than the journal holds (each record fits).
#[test]
fn journal_overflow_while_disconnected_never_leaves_a_silent_gap() {
    let c = small_journal_pair("repl-overflow", "C", "2M");
    let (a, b) = (c.alpha(), c.beta());
    let d0 = random_bytes(MIB);
    nbd_write_req(a, 0, &d0, 256 * 1024);
    c.wait_in_sync(SYNC_TIMEOUT);
    let beta_before = b.backing_data(16 * MIB as u64);
    a.ctl_ok(&["disconnect"]);
    a.wait_repl(Duration::from_secs(5), "standalone", |r| {
        r["connection"] == "standalone"
    });
    let d1 = random_bytes(8 * MIB);
    nbd_write_req(a, 4 * MIB as u64, &d1, 256 * 1024);
    let ra = a.repl();
    assert!(u(&ra, "out_of_sync") >= 8 * MIB as u64, "{ra}");
    a.ctl_ok(&["connect"]);
    honest_after_reconnect(&c, &beta_before);
    assert_same_bytes(&nbd_read(a, 4 * MIB as u64, 8 * MIB), &d1, "alpha's data");
    a.assert_alive();
    b.assert_alive();
}

/// Single NBD writes larger than a small journal can hold, while connected.
#[test]
fn writes_larger_than_the_journal_never_leave_a_silent_gap() {
    let c = small_journal_pair("repl-bigrec", "C", "2M");
    let (a, b) = (c.alpha(), c.beta());
    let beta_before = b.backing_data(16 * MIB as u64);
    let d = random_bytes(4 * MIB);
    nbd_write_req(a, 0, &d[..MIB], MIB);
    nbd_write_req(a, MIB as u64, &d[MIB..], 3 * MIB);
    honest_after_reconnect(&c, &beta_before);
    assert_same_bytes(&nbd_read(a, 0, 4 * MIB), &d, "alpha's data");
    a.assert_alive();
    b.assert_alive();
}

/// The smallest link-flap case: the primary disconnects and reconnects a few times with no
/// write at all in between. Every time the pair must come back connected and in sync.
#[test]
fn repeated_reconnects_without_writes_stay_in_sync() {
    let c = pair("repl-reconnect", "C");
    let (a, b) = (c.alpha(), c.beta());
    let d = random_bytes(MIB);
    nbd_write(a, 0, &d);
    c.wait_in_sync(SYNC_TIMEOUT);
    for round in 1..=3 {
        eprintln!("round {round}: disconnect, connect");
        a.ctl_ok(&["disconnect"]);
        a.wait_repl(Duration::from_secs(5), "standalone", |r| {
            r["connection"] == "standalone"
        });
        b.wait_not_connected(Duration::from_secs(10));
        a.ctl_ok(&["connect"]);
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        loop {
            let ra = a.repl();
            if ra["connection"] == "connected" && ra["out_of_sync"] == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: not back in sync after a disconnect/connect with no writes: \
                 {ra}\n--- alpha log ---\n{}\n--- beta log ---\n{}",
                a.log_tail(12),
                b.log_tail(12)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        c.wait_in_sync(SYNC_TIMEOUT);
    }
    c.assert_replicas_identical(a.size(), "after three reconnects");
}

// ---------------------------------------------------------------------------------------------
// FUA and failing secondary disks.

/// Under C a FUA write is acknowledged once the secondary has synced it, which it does at once
/// (with everything before it), not at its next periodic checkpoint; its durable mark (the
/// applied mark committed) follows. (The bounds leave room for fsyncs on a busy disk and stay
/// below the 30 s checkpoint; a reply that waited for one fails on RawNbd's 10 s timeout.)
#[test]
fn protocol_c_fua_write_is_durable_on_the_peer_without_waiting_for_a_checkpoint() {
    let c = pair("repl-fua-c", "C");
    let a = c.alpha();
    let mut r = a.raw_open();
    // Plain writes first: applied on beta, in its page cache only.
    for i in 0..8u64 {
        r.write_at(i * 4096, &random_bytes(4096), 0)
            .unwrap_or_else(|e| panic!("write {i}: errno {e}"));
    }
    // The FUA write's sequence is past everything issued before it (a checkpoint the
    // primary issues after the reply may number past it, so the mark is taken before).
    let before = u(&a.repl(), "seq_written");
    let t = Instant::now();
    r.write_at(MIB as u64, &random_bytes(4096), CMD_FLAG_FUA)
        .unwrap_or_else(|e| panic!("FUA write: errno {e}"));
    let lat = t.elapsed();
    let ra = a.repl();
    r.disconnect();
    assert!(
        lat < Duration::from_secs(9),
        "a FUA write under C took {lat:?}: the peer made it durable only at a checkpoint"
    );
    // Acknowledged under C: the peer reported it (and everything before it) synced; its
    // durable mark follows with its commit, long before a checkpoint (30 s).
    assert!(
        u(&ra, "seq_synced") > before,
        "FUA write acknowledged before the peer synced it (issued after {before}): {ra}"
    );
    assert!(
        wait_for(Duration::from_secs(20), || u(&a.repl(), "seq_durable")
            > before),
        "the peer's durable mark did not follow its synced mark past {before} within 20 s"
    );
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_replicas_identical(a.size(), "after FUA writes");
}

/// The same for FUA write-zeroes and trims: a zero record carries no FUA of its own, so the
/// primary puts a flush behind it and, under C, answers once the peer is durable through it
/// (it used to wait for the peer's next checkpoint, up to 30 s).
#[test]
fn protocol_c_fua_zeroes_and_trims_are_durable_on_the_peer_without_a_checkpoint() {
    let c = pair("repl-fua-zero-c", "C");
    let a = c.alpha();
    let mut r = a.raw_open();
    r.write_at(0, &random_bytes(64 * 1024), 0)
        .unwrap_or_else(|e| panic!("write: errno {e}"));
    for (cmd, what) in [(CMD_WRITE_ZEROES, "write-zeroes"), (CMD_TRIM, "trim")] {
        let before = u(&a.repl(), "seq_written");
        let t = Instant::now();
        r.command(cmd, CMD_FLAG_FUA, 0, 64 * 1024)
            .unwrap_or_else(|e| panic!("FUA {what}: errno {e}"));
        let lat = t.elapsed();
        let ra = a.repl();
        assert!(
            lat < Duration::from_secs(9),
            "a FUA {what} under C took {lat:?}: the peer made it durable only at a checkpoint"
        );
        // The zero record and the flush behind it, at least.
        assert!(
            u(&ra, "seq_synced") >= before + 2,
            "FUA {what} acknowledged before the peer synced it (issued after {before}): {ra}"
        );
        assert!(
            wait_for(Duration::from_secs(20), || u(&a.repl(), "seq_durable") >= before + 2),
            "the peer's durable mark did not follow its synced mark after the FUA {what} within 20 s"
        );
    }
    r.disconnect();
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_replicas_identical(a.size(), "after FUA zeroes and trims");
}

/// The secondary's disk fails mid-stream: its backing file sits on a small tmpfs that fills
/// up. It must not acknowledge what it could not write: it marks itself inconsistent and
/// drops the link, the primary keeps going and keeps what the peer lacks in its bitmap, and
/// once the disk has room again a resync makes the replicas identical. (Before, the failed
/// writes were acknowledged as applied and the replicas differed silently.)
#[test]
fn secondary_disk_full_is_never_acknowledged_and_resyncs_once_it_has_room() {
    let c = Cluster::builder("repl-beta-enospc")
        .nodes(2)
        .backing_size(BACKING)
        .protocol("C")
        .external_meta()
        .build();
    let b = c.beta();
    // Room for the initial full sync (which allocates every block) first.
    let (tmpfs, fs, on_tmpfs) = backing_on_tmpfs(&c, b, "256m");
    let _stop = StopDaemons(&c);
    let handler_log = local_io_error_handler(&c);
    c.start_pair();
    let a = c.alpha();
    let size = a.size();
    c.wait_in_sync(SYNC_TIMEOUT);
    // Then the first 16 MiB of beta's file become holes again (they read as the zeroes they
    // hold) and the tmpfs shrinks to 4 MiB more than it uses: writing them runs out of space.
    run_ok(
        Command::new("fallocate")
            .args(["--punch-hole", "--offset", "0", "--length"])
            .arg((16 * MIB).to_string())
            .arg(&on_tmpfs),
        Duration::from_secs(10),
    );
    let used = fs_used(&fs);
    run_ok(
        Command::new("mount")
            .arg("-o")
            .arg(format!("remount,size={}", used + (4 << 20)))
            .arg(&fs),
        Duration::from_secs(10),
    );

    // The primary is healthy: every write succeeds, although beta has room for ~4 MiB.
    let d = random_bytes(16 * MIB);
    nbd_write(a, 0, &d);
    let line = wait_log_line(b, &["failed", "inconsistent"], Duration::from_secs(20));
    assert!(
        line.contains("ERROR"),
        "beta's disk failure is not logged as an error: {line}"
    );
    // Beta never claims what it could not write: alpha's bitmap holds it (out of sync) while
    // the link is down or resyncing.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ra = a.repl();
        if ra["out_of_sync"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alpha does not record what beta lacks after beta's disk failed: {ra}\n\
             beta: {}\n--- beta log ---\n{}",
            b.status_json(),
            b.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        b.status_json()["disk"],
        "inconsistent",
        "{}",
        b.status_json()
    );
    // Beta's failed writes are disk errors, and its handler ran once; alpha's disk is fine.
    let sb = b.status_json();
    assert!(
        sb["io"]["disk_errors"].as_u64().unwrap_or(0) >= 1,
        "beta's status does not count its disk errors: {sb}"
    );
    let calls = handler_calls(&handler_log);
    assert_eq!(calls.len(), 1, "local-io-error handler calls: {calls:?}");
    assert!(
        calls[0].starts_with("beta ") && calls[0].contains(" local-io-error alpha"),
        "local-io-error handler call: {calls:?}"
    );
    assert_eq!(a.status_json()["io"]["disk_errors"], 0);

    // Room again: the next connect resyncs what beta lacks.
    run_ok(
        Command::new("mount")
            .arg("-o")
            .arg("remount,size=512m")
            .arg(&fs),
        Duration::from_secs(10),
    );
    c.wait_in_sync(Duration::from_secs(60));
    let rb = b.status_json();
    assert_eq!(rb["disk"], "up-to-date", "{rb}");
    c.assert_replicas_identical(size, "after beta's disk had room again");
    assert_same_bytes(&b.backing_data(16 * MIB as u64), &d, "beta's data");
    // Only what beta lacks was resent: a bitmap resync, not a full one.
    let alog = log_text(a);
    let last = alog
        .lines()
        .rfind(|l| l.contains("resync to the peer ("))
        .unwrap_or_else(|| panic!("alpha never resynced beta:\n{}", a.log_tail(30)));
    assert!(
        !last.contains(", full"),
        "a full resync after a disk error: {last}"
    );
    assert_eq!(
        handler_calls(&handler_log).len(),
        1,
        "the local-io-error handler ran again"
    );
    stop_pair_on_tmpfs(a, b, tmpfs);
}

/// The primary's own disk fails (its backing file is on a tmpfs that runs full): the client
/// whose write could not be stored gets an error (never an acknowledgement), the node stays up
/// and primary, counts the failure in `status`, runs the `local-io-error` handler (DRBD's
/// call-local-io-error) once, and marks the range out of sync. The record had already gone to
/// the peer, which may hold the new data: once the disk has room, a reconnect resyncs that
/// range from the primary, so both replicas agree again and nothing the client was told is
/// stored went missing.
#[test]
fn primary_disk_error_fails_the_write_runs_the_handler_and_resyncs_the_range() {
    let c = Cluster::builder("repl-alpha-enospc")
        .nodes(2)
        .backing_size(BACKING)
        .protocol("C")
        .external_meta()
        .build();
    let a = c.alpha();
    let (tmpfs, fs, _) = backing_on_tmpfs(&c, a, "256m");
    let _stop = StopDaemons(&c);
    let handler_log = local_io_error_handler(&c);
    c.start_pair();
    let b = c.beta();
    let size = a.size();
    c.wait_in_sync(SYNC_TIMEOUT);
    let before = random_bytes(MIB);
    nbd_write(a, 0, &before);
    c.wait_in_sync(SYNC_TIMEOUT);
    // Room for about 1 MiB more on alpha's disk.
    let used = fs_used(&fs);
    run_ok(
        Command::new("mount")
            .arg("-o")
            .arg(format!("remount,size={}", used + MIB as u64))
            .arg(&fs),
        Duration::from_secs(10),
    );

    // 8 MiB at 16 MiB: some 1 MiB writes fail, and each failure reaches the client.
    let d = random_bytes(8 * MIB);
    let mut r = a.raw_open();
    let mut failed = Vec::new();
    for (i, chunk) in d.chunks(MIB).enumerate() {
        let off = 16 * MIB as u64 + (i * MIB) as u64;
        if let Err(e) = r.write_at(off, chunk, 0) {
            failed.push((off, e));
        }
    }
    r.disconnect();
    assert!(!failed.is_empty(), "no write failed on a full disk");
    assert!(
        failed
            .iter()
            .all(|&(_, e)| e == nbd_const::ENOSPC || e == nbd_const::EIO),
        "failed writes' errors: {failed:?}"
    );
    let sa = a.status_json();
    assert_eq!(sa["role"], "primary", "{sa}");
    assert!(
        sa["io"]["disk_errors"].as_u64().unwrap_or(0) >= failed.len() as u64,
        "alpha's status does not count its disk errors ({} failed writes): {sa}",
        failed.len()
    );
    assert!(
        a.repl()["out_of_sync"].as_u64().unwrap_or(0) > 0,
        "the failed ranges are not marked out of sync: {}",
        a.repl()
    );
    let calls = handler_calls(&handler_log);
    assert_eq!(calls.len(), 1, "local-io-error handler calls: {calls:?}");
    assert!(
        calls[0].starts_with("alpha ") && calls[0].contains(" local-io-error beta"),
        "local-io-error handler call: {calls:?}"
    );
    // Reads of what was stored before still work.
    assert_same_bytes(
        &nbd_read(a, 0, MIB),
        &before,
        "alpha's data before the failure",
    );

    // Room again; a reconnect resyncs the marked ranges from the primary.
    run_ok(
        Command::new("mount")
            .arg("-o")
            .arg("remount,size=512m")
            .arg(&fs),
        Duration::from_secs(10),
    );
    a.ctl_ok(&["disconnect"]);
    a.ctl_ok(&["connect"]);
    c.wait_in_sync(Duration::from_secs(60));
    c.assert_replicas_identical(size, "after alpha's disk had room again");
    assert_eq!(a.repl()["out_of_sync"], 0, "{}", a.repl());
    assert_eq!(b.status_json()["io"]["disk_errors"], 0);
    assert_eq!(
        handler_calls(&handler_log).len(),
        1,
        "the local-io-error handler ran again"
    );
    stop_pair_on_tmpfs(a, b, tmpfs);
}

/// A resync source whose own disk cannot be read (here its backing file lost its last 4 MiB,
/// where the region to resync lies) reports a disk error, not a network one: `disk_errors`
/// counts it, the local-io-error handler runs once, the log names the disk, and nothing is
/// marked in sync. Once the disk reads again, the retried resync completes and the replicas
/// are identical.
#[test]
fn resync_source_disk_read_error_is_a_disk_error_and_the_resync_resumes() {
    let c = Cluster::builder("repl-resync-read-error")
        .nodes(2)
        .backing_size(BACKING)
        .protocol("C")
        .journal_size("1M")
        .external_meta()
        .build();
    let _stop = StopDaemons(&c);
    let handler_log = local_io_error_handler(&c);
    c.start_pair();
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    c.wait_in_sync(SYNC_TIMEOUT);

    // Standalone, alpha writes 2 MiB near the end of the device, more than its 1 MiB
    // journal holds: a bitmap resync (which reads alpha's disk) is due, not a journal replay.
    a.ctl_ok(&["disconnect"]);
    let off = size - 3 * MIB as u64;
    nbd_write(a, off, &random_bytes(2 * MIB));
    assert!(a.repl_u64("out_of_sync") >= 2 * MIB as u64, "{}", a.repl());
    // The disk loses its end (a failing or shrunk device): the resync cannot read it.
    let backing = std::fs::OpenOptions::new()
        .write(true)
        .open(a.backing_path())
        .expect("open alpha's backing file");
    backing
        .set_len(BACKING - 4 * MIB as u64)
        .expect("cut alpha's backing file");
    a.ctl_ok(&["connect"]);
    // The count, the link's error and the handler come from different tasks (and each retry
    // clears the error until its read fails again): waited for together.
    let mut st = Value::Null;
    let counted = wait_for(Duration::from_secs(30), || {
        st = a.status_json();
        let err = st["replication"]["last_error"].as_str().unwrap_or("");
        st["io"]["disk_errors"].as_u64().unwrap_or(0) >= 1
            && err.contains("backing device")
            && err.contains("disk")
            && !handler_calls(&handler_log).is_empty()
    });
    assert!(
        counted,
        "the failed resync read is not counted, named in the link error and handed to the local-io-error handler: {st}\n{:?}",
        handler_calls(&handler_log)
    );
    let calls = handler_calls(&handler_log);
    assert_eq!(calls.len(), 1, "local-io-error handler calls: {calls:?}");
    assert!(
        calls[0].starts_with("alpha ") && calls[0].contains(" local-io-error beta"),
        "local-io-error handler call: {calls:?}"
    );
    assert!(
        a.repl_u64("out_of_sync") >= 2 * MIB as u64,
        "the unread region was taken as synced: {}",
        a.repl()
    );
    let log = std::fs::read_to_string(a.log_path()).unwrap_or_default();
    assert!(
        log.contains("reading this node's backing device at"),
        "alpha's log does not name the disk read:\n{}",
        a.log_tail(20)
    );

    // The disk reads again (its lost end as zeroes): the retried resync completes.
    backing
        .set_len(BACKING)
        .expect("restore alpha's backing file");
    drop(backing);
    c.wait_in_sync(Duration::from_secs(60));
    c.assert_replicas_identical(size, "after alpha's disk read again");
    assert_eq!(a.repl()["out_of_sync"], 0, "{}", a.repl());
    assert_eq!(
        handler_calls(&handler_log).len(),
        1,
        "the local-io-error handler ran again"
    );
    a.down();
    b.down();
}

/// DRBD's `new-current-uuid --clear-bitmap`: two freshly created nodes whose disks are known
/// to be identical (here both new sparse files, all zeroes) skip the initial full sync. It is
/// refused without the peer and once the nodes are no longer fresh; when done, both are up to
/// date with one generation, a plain `primary` (no --force) works, no resync runs, and writes
/// replicate as usual.
#[test]
fn new_current_uuid_clear_bitmap_skips_the_initial_sync() {
    let c = Cluster::builder("repl-skip-sync")
        .nodes(2)
        .backing_size(BACKING)
        .protocol("C")
        .build();
    let (a, b) = (c.alpha(), c.beta());
    a.create_md();
    b.create_md();
    a.up();
    let refused = |out: &CmdOutput, why: &str| {
        assert!(
            !out.success() && out.stderr.contains(why),
            "expected a refusal naming {why:?}\n{}",
            out.describe()
        );
    };
    refused(&a.ctl(&["new-current-uuid"]), "--clear-bitmap");
    refused(
        &a.ctl(&["new-current-uuid", "--clear-bitmap"]),
        "not connected",
    );
    b.up();
    a.wait_connected(CONNECT_TIMEOUT);
    b.wait_connected(CONNECT_TIMEOUT);
    let out = a.ctl_ok(&["new-current-uuid", "--clear-bitmap"]);
    assert!(
        out.stdout.contains("initial sync is skipped"),
        "{}",
        out.describe()
    );
    let gen = |n: &Node| {
        let md = n.ctl_ok(&["dump-md"]).stdout;
        md.lines()
            .find(|l| l.starts_with("current-gen"))
            .map(|l| l.split_whitespace().last().unwrap_or("").to_owned())
            .unwrap_or_else(|| panic!("dump-md has no current-gen:\n{md}"))
    };
    assert_eq!(
        gen(a),
        gen(b),
        "the two nodes adopted different generations"
    );
    for n in [a, b] {
        let st = n.status_json();
        assert_eq!(st["disk"], "up-to-date", "{}: {st}", n.name());
    }
    // Not again: neither node is fresh any more. (Once both are connected again after the
    // skip's reconnect: a node not connected says that first.)
    a.wait_connected(CONNECT_TIMEOUT);
    b.wait_connected(CONNECT_TIMEOUT);
    refused(
        &b.ctl(&["new-current-uuid", "--clear-bitmap"]),
        "not freshly created",
    );
    // A plain promotion, no resync, and the stream works.
    a.ctl_ok(&["primary"]);
    a.wait_repl(CONNECT_TIMEOUT, "connected to a secondary peer", |r| {
        r["connection"] == "connected" && r["peer_role"] == "secondary"
    });
    let size = a.size();
    let d = random_bytes(4 * MIB);
    nbd_write(a, MIB as u64, &d);
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_replicas_identical(size, "after skipping the initial sync");
    assert_same_bytes(&b.backing_data(5 * MIB as u64)[MIB..], &d, "beta's data");
    let alog = log_text(a);
    assert!(
        !alog.contains("resync to the peer ("),
        "a resync ran although the initial sync was skipped:\n{}",
        a.log_tail(30)
    );
    assert_eq!(a.repl()["out_of_sync"], 0, "{}", a.repl());
}

/// A primary demoted while its peer is behind (protocol A, the link stalled so the drain
/// times out) keeps the writes the peer lacks and says so with a new generation: once the
/// link is back, the two secondaries resync from it, so the old secondary, promoted next,
/// serves every write the old primary acknowledged. (Before, the two secondaries were "in
/// sync" by generation and the writes never moved.)
#[test]
fn demoted_primary_with_a_lagging_peer_brings_it_up_to_date() {
    let c = pair_via_proxy("repl-demote-behind", "A");
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let d0 = random_bytes(MIB);
    nbd_write(a, 0, &d0);
    c.wait_in_sync(SYNC_TIMEOUT);

    c.proxy().pause();
    let d1 = random_bytes(4 * MIB);
    {
        // Acknowledged under A while the peer cannot have it (no flush: that would wait for
        // the journal only, but keep it simple).
        let mut r = a.raw_open();
        for (i, chunk) in d1.chunks(MIB).enumerate() {
            r.write_at((MIB + i * MIB) as u64, chunk, 0)
                .unwrap_or_else(|e| panic!("write {i}: errno {e}"));
        }
        r.disconnect();
    }
    let out = a.ctl_timeout(&["secondary"], Duration::from_secs(60));
    assert!(out.success(), "demotion failed: {}", out.describe());
    assert!(
        out.stdout.contains("the peer lacks writes of this node"),
        "{}",
        out.describe()
    );
    // Started by the demotion, or before it by the link drop (the paused proxy times the
    // link out 4 s after the pause, which a loaded machine may reach before the demotion).
    wait_log_line(a, &["new data generation"], Duration::from_secs(5));
    c.proxy().unpause();

    // The two secondaries reconnect and alpha's data reaches beta.
    let deadline = Instant::now() + Duration::from_secs(60);
    while first_difference(a.backing_path(), b.backing_path(), size).is_some()
        || b.status_json()["disk"] != "up-to-date"
    {
        assert!(
            Instant::now() < deadline,
            "beta never got the writes the demoted alpha had\nalpha: {}\nbeta: {}\n--- alpha log ---\n{}\n--- beta log ---\n{}",
            a.status_json(),
            b.status_json(),
            a.log_tail(20),
            b.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut want = vec![0u8; 5 * MIB];
    want[..MIB].copy_from_slice(&d0);
    want[MIB..].copy_from_slice(&d1);
    assert_same_bytes(
        &b.backing_data(5 * MIB as u64),
        &want,
        "beta after the catch-up",
    );
    // Beta may now take over and serves all of it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = b.ctl(&["primary"]);
        if out.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "beta cannot be promoted after the catch-up: {}",
            out.describe()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_same_bytes(
        &nbd_read(b, 0, 5 * MIB),
        &want,
        "beta's export after failover",
    );
}

/// A host that reaches both replication ports relays a connection to alpha and one to beta
/// into each other, so that each node's proof would answer the other's challenge. On both
/// relayed connections both nodes accepted, and an accepting node proves nothing before it
/// has checked the dialer's proof: neither sends one, both give up (or, were a proof sent,
/// it says which side dialed and fails), and the real link is never replaced.
#[test]
fn relaying_between_two_accepting_nodes_does_not_authenticate() {
    let c = pair("repl-relay", "C");
    let (a, b) = (c.alpha(), c.beta());
    nbd_write(a, 0, &random_bytes(MIB));
    c.wait_in_sync(SYNC_TIMEOUT);
    let fails_before = u(&a.repl(), "auth_failures") + u(&b.repl(), "auth_failures");

    let to_a = TcpStream::connect(a.replication_addr()).expect("connect to alpha");
    let to_b = TcpStream::connect(b.replication_addr()).expect("connect to beta");
    let pipe = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Both);
        })
    };
    let t1 = pipe(
        to_a.try_clone().expect("clone"),
        to_b.try_clone().expect("clone"),
    );
    let t2 = pipe(to_b, to_a);

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let fails = u(&a.repl(), "auth_failures") + u(&b.repl(), "auth_failures");
        // One side times out; the other then sees the relay close.
        let gave_up = [a, b]
            .iter()
            .any(|n| log_text(n).contains("waiting for the peer's proof"));
        if fails > fails_before || gave_up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the relayed handshakes were neither refused nor given up\nalpha: {}\nbeta: {}\n--- alpha log ---\n{}\n--- beta log ---\n{}",
            a.repl(),
            b.repl(),
            a.log_tail(15),
            b.log_tail(15)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = t1.join();
    let _ = t2.join();
    for n in [a, b] {
        let log = log_text(n);
        assert!(
            !log.contains("replaced by a new connection"),
            "{}: the relayed connection replaced the real link:\n{}",
            n.name(),
            n.log_tail(20)
        );
    }
    // The real link carries on.
    let d = random_bytes(MIB);
    nbd_write(a, MIB as u64, &d);
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_replicas_identical(a.size(), "after the relay attempt");
}

/// A primary killed with writes its peer never got (protocol A, the link stalled, no flush:
/// the journal on disk does not hold them either) comes back, is promoted with --force, then
/// meets its peer. Only its activity log knows those extents: they must go to the peer as a
/// bitmap resync, even though the generations alone would allow a journal catch-up and the
/// forced promotion forgot the crash. (Before, the catch-up cleared the bitmap and the
/// replicas differed while both said up to date.)
#[test]
fn crashed_primary_promoted_by_force_still_resyncs_its_hot_extents() {
    let c = pair_via_proxy("repl-crash-force", "A");
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    nbd_write(a, 0, &random_bytes(MIB));
    c.wait_in_sync(SYNC_TIMEOUT);

    c.proxy().pause();
    {
        let mut r = a.raw_open();
        let d = random_bytes(4 * MIB);
        for (i, chunk) in d.chunks(MIB).enumerate() {
            r.write_at((8 * MIB + i * MIB) as u64, chunk, 0)
                .unwrap_or_else(|e| panic!("write {i}: errno {e}"));
        }
        // No flush, no disconnect: the daemon dies with the writes acknowledged.
    }
    let pid = a.status_json()["pid"].as_u64().expect("pid") as u32;
    kill9(pid);
    assert!(wait_pid_gone(pid, Duration::from_secs(30)));
    c.proxy().cut_and_refuse();
    b.wait_not_connected(Duration::from_secs(10));

    a.up();
    wait_log_line(
        a,
        &["crashed primary", "marked out of sync"],
        Duration::from_secs(5),
    );
    a.primary_force();
    c.proxy().unpause();
    c.proxy().resume();
    c.wait_in_sync(Duration::from_secs(60));
    c.assert_replicas_identical(
        size,
        "after the crashed primary was forced back and met its peer",
    );
}

/// ko-count: the secondary's disk hangs while its daemon keeps answering pings (its backing
/// file is an nbdfuse file served by nbdkit's pause filter, paused). Under C a write would wait
/// for that disk for ever; after ko-count link timeouts (here 2 × 4 s) the primary drops the
/// peer, the write is acknowledged with its range in the bitmap, and once the disk answers
/// again a resync makes the replicas identical.
#[test]
fn a_secondary_whose_disk_hangs_is_dropped_after_ko_count() {
    const SIZE: u64 = 64 << 20;
    let c = Cluster::builder("repl-ko-count")
        .nodes(2)
        .backing_size(SIZE)
        .protocol("C")
        .io_engine("sync")
        .external_meta()
        .resource_line("ko-count = 2")
        .build();
    // Torn down in this order on any exit: the daemons (which hold the FUSE file), then
    // nbdkit and the FUSE mount.
    let (disk, ctl) = NbdkitFile::paused_memory(c.dir().path(), "beta-disk", SIZE);
    let file = disk.file();
    let _stop = StopDaemons(&c);
    let b = c.beta();
    b.back_with(&file);
    c.start_pair();
    let a = c.alpha();
    nbd_write(a, 0, &random_bytes(MIB));
    c.wait_in_sync(SYNC_TIMEOUT);

    let pause = |cmd: u8| pause_control(&ctl, cmd);
    pause(b'p');
    let t = Instant::now();
    let d = random_bytes(64 * 1024);
    {
        let mut r = a.raw_open();
        r.write_at(4 * MIB as u64, &d, 0)
            .unwrap_or_else(|e| panic!("write while beta's disk hangs: errno {e}"));
        r.disconnect();
    }
    let waited = t.elapsed();
    assert!(
        waited < Duration::from_secs(30),
        "a write under C waited {waited:?} for a peer whose disk hangs"
    );
    let line = wait_log_line(a, &["applied nothing", "ko-count"], Duration::from_secs(5));
    assert!(line.contains("WARN"), "{line}");
    b.assert_alive();
    // The write beta never applied is in alpha's bitmap (beta's disk still hangs, so no
    // resync can have cleared it).
    let ra = a.repl();
    assert!(
        u(&ra, "out_of_sync") > 0,
        "alpha forgot what beta lacks: {ra}"
    );

    pause(b'r');
    c.wait_in_sync(Duration::from_secs(60));
    c.assert_replicas_identical(a.size(), "after beta's disk answered again");
    a.down();
    b.down();
    disk.close();
}

/// Moves `node`'s backing file onto a tmpfs of `size` (a symlink stays at the old path), so
/// that a test can fill its disk. Returns the mount (unmounted on drop: declare a
/// [`StopDaemons`] after it), its directory and the file on it.
fn backing_on_tmpfs(c: &Cluster, node: &Node, size: &str) -> (Mount, PathBuf, PathBuf) {
    let fs = c.dir().join(format!("{}-fs", node.name()));
    let tmpfs = Mount::tmpfs(&fs, size);
    let on_tmpfs = fs.join("backing.img");
    run_ok(
        Command::new("truncate")
            .arg("-s")
            .arg(BACKING.to_string())
            .arg(&on_tmpfs),
        Duration::from_secs(10),
    );
    std::fs::remove_file(node.backing_path()).expect("remove the backing file");
    std::os::unix::fs::symlink(&on_tmpfs, node.backing_path()).expect("symlink the backing file");
    (tmpfs, fs, on_tmpfs)
}

/// Adds a `local-io-error` handler (DRBD's call-local-io-error) to the config; it appends
/// "NODE RESOURCE EVENT PEER" to the returned log.
fn local_io_error_handler(c: &Cluster) -> PathBuf {
    let log = c.dir().join("handlers.log");
    let script = c.dir().join("local-io-error.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$BLOCKREP_NODE $1 $2 $3\" >> '{}'\n",
            log.display()
        ),
    )
    .expect("write the handler");
    run_ok(
        Command::new("chmod").arg("755").arg(&script),
        Duration::from_secs(10),
    );
    c.write_config(&format!(
        "{}\n[handlers]\nlocal-io-error = \"{}\"\n",
        c.config_text(),
        script.display()
    ));
    log
}

/// The handler's calls so far, once there is one (at most 10 s).
fn handler_calls(log: &Path) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if !text.is_empty() || Instant::now() > deadline {
            return text.lines().map(str::to_owned).collect();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Both daemons are still running; they are brought down before the tmpfs that holds a
/// backing file is unmounted (on a failure, a [`StopDaemons`] kills them first instead).
fn stop_pair_on_tmpfs(a: &Node, b: &Node, tmpfs: Mount) {
    a.assert_alive();
    b.assert_alive();
    a.down();
    b.down();
    tmpfs.close();
}

/// Bytes used on the filesystem at `dir`.
fn fs_used(dir: &Path) -> u64 {
    run_ok(
        Command::new("df").args(["-B1", "--output=used"]).arg(dir),
        Duration::from_secs(10),
    )
    .stdout
    .lines()
    .filter_map(|l| l.trim().parse::<u64>().ok())
    .next()
    .expect("df: used bytes")
}

/// A pair through the proxy, in sync on one generation (returned), then its link stalled.
fn stalled_pair(test: &str, protocol: &str) -> (Cluster, String) {
    let c = pair_via_proxy(test, protocol);
    c.wait_in_sync(Duration::from_secs(30));
    let before = current_gen(c.alpha());
    assert_eq!(
        before,
        current_gen(c.beta()),
        "a pair in sync shares its generation"
    );
    c.proxy().pause();
    (c, before)
}

/// One 4 KiB write at `offset`, acknowledged (under A, with the link stalled).
fn write_unreplicated(n: &Node, offset: u64) {
    let mut r = n.raw_open();
    r.write_at(offset, &random_bytes(4096), 0)
        .expect("a write under A is acknowledged with the link stalled");
    r.disconnect();
}

/// This node's current data generation, as `dump-md` prints it (read from the metadata).
fn current_gen(n: &Node) -> String {
    let out = n.ctl_ok(&["dump-md"]);
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("current-gen").map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("dump-md has no current-gen:\n{}", out.stdout))
}

/// Under C a write that waits for the peer when the link drops is acknowledged from the
/// journal and the bitmap. The primary's data now differs from the peer's, so a new
/// generation must be on disk before that acknowledgement: without it (and with no later
/// write to start one), a failover to the peer would make this node look merely behind, and
/// the next connect would overwrite the acknowledged write instead of reporting a split brain.
#[test]
fn a_write_released_by_a_link_drop_is_acknowledged_under_a_new_generation() {
    let (c, before) = stalled_pair("repl-gen-on-drop", "C");
    let (a, b) = (c.alpha(), c.beta());
    let data = random_bytes(4096);
    let writer = {
        let mut r = a.raw_open();
        let data = data.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let res = r.write_at(3 << 20, &data, 0);
            r.disconnect();
            (res, t.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        !writer.is_finished(),
        "under C a write was acknowledged while the link was stalled"
    );
    assert!(c.proxy().cut_and_refuse() >= 1, "no link connection to cut");
    let (res, took) = writer.join().expect("writer thread");
    assert_eq!(res, Ok(()), "the write released by the link drop failed");
    assert!(
        took >= Duration::from_millis(800),
        "acknowledged after {took:?}"
    );
    // No other write has come: only the released one can have started the new generation.
    let after = current_gen(a);
    assert_ne!(
        after,
        before,
        "the write was acknowledged after the link dropped, but alpha's generation is still \
         the one beta has\n{}",
        a.log_tail(20)
    );
    assert_eq!(current_gen(b), before, "beta moved without alpha");

    // The peer comes back: alpha is newer, sends the write, and both end at one generation.
    c.proxy().unpause();
    c.proxy().resume();
    c.wait_in_sync(Duration::from_secs(60));
    let mut got = vec![0u8; 4096];
    {
        use std::os::unix::fs::FileExt;
        std::fs::File::open(b.backing_path())
            .and_then(|f| f.read_exact_at(&mut got, 3 << 20))
            .expect("read beta's backing file");
    }
    assert_same_bytes(&got, &data, "beta after the reconnect");
    assert_eq!(
        current_gen(b),
        current_gen(a),
        "one generation after the sync"
    );
    assert_eq!(current_gen(a), after, "alpha's generation moved again");
}

/// Under A a write is acknowledged before the peer has it. When the link then drops, the
/// primary's data has already diverged: the new generation is persisted at once, not at the
/// next write (which may never come before a crash and a failover, after which the next
/// connect would overwrite the acknowledged write instead of reporting a split brain).
#[test]
fn protocol_a_link_drop_with_unreplicated_writes_starts_a_generation_at_once() {
    let (c, before) = stalled_pair("repl-gen-a-drop", "A");
    let (a, b) = (c.alpha(), c.beta());
    write_unreplicated(a, 5 << 20);
    assert_eq!(current_gen(a), before, "no generation while connected");
    assert!(c.proxy().cut_and_refuse() >= 1, "no link connection to cut");
    // No write after the drop: the drop itself must start the generation.
    let mut now = before.clone();
    assert!(
        wait_for(Duration::from_secs(10), || {
            now = current_gen(a);
            now != before
        }),
        "the link dropped with a write the peer never got, but alpha's generation stays the \
         one beta has\n{}",
        a.log_tail(20)
    );
    assert_eq!(current_gen(b), before, "beta moved without alpha");

    // Back: alpha is newer and brings beta to its generation.
    c.proxy().unpause();
    c.proxy().resume();
    c.wait_in_sync(Duration::from_secs(60));
    assert!(
        wait_for(Duration::from_secs(10), || current_gen(b) == now),
        "beta did not adopt alpha's generation {now}: {}",
        current_gen(b)
    );
    c.assert_replicas_identical(a.size(), "after the reconnect");
}

/// A primary taken `down` while its peer lacks acknowledged writes (A, link stalled) commits a
/// new generation with its shutdown, as a demotion does: a failover to the peer then ends in a
/// reported split brain, never in those writes being overwritten by a resync.
#[test]
fn primary_down_with_writes_the_peer_lacks_commits_a_new_generation() {
    let (c, before) = stalled_pair("repl-gen-down", "A");
    let (a, b) = (c.alpha(), c.beta());
    write_unreplicated(a, 7 << 20);
    let pid = a.pid().expect("alpha's pid");
    // `down` waits (bounded) for the stalled peer (whose ping timeout may end the link
    // first), then goes down without it.
    a.down();
    assert!(
        wait_pid_gone(pid, Duration::from_secs(10)),
        "alpha still runs after down"
    );
    let after = current_gen(a);
    assert_ne!(
        after,
        before,
        "alpha went down with a write beta never got, under the generation beta has\n{}",
        a.log_tail(20)
    );
    wait_log_line(
        a,
        &["the peer lacks writes of this node"],
        Duration::from_secs(1),
    );
    assert_eq!(current_gen(b), before, "beta moved without alpha");
}

/// A link lost while the peer had every record diverges nothing: a demotion afterwards
/// starts no generation, so a failover to the peer (`primary --force` there) makes this node
/// a plain sync target on reconnect, not one side of a false split brain.
#[test]
fn an_idle_link_loss_and_a_demotion_start_no_generation_and_the_failover_is_clean() {
    let c = pair_via_proxy("repl-gen-idle-loss", "C");
    let (a, b) = (c.alpha(), c.beta());
    nbd_write(a, 0, &random_bytes(MIB));
    c.wait_in_sync(Duration::from_secs(30));
    let before = current_gen(a);
    assert_eq!(
        before,
        current_gen(b),
        "a pair in sync shares its generation"
    );

    assert!(c.proxy().cut_and_refuse() >= 1, "no link connection to cut");
    a.wait_not_connected(Duration::from_secs(10));
    a.ctl_ok(&["secondary"]);
    assert_eq!(
        current_gen(a),
        before,
        "a demotion with nothing the peer lacks started a generation\n{}",
        a.log_tail(20)
    );

    failover_to_beta_which_alpha_follows(&c);
}

/// A flush while the peer is away puts no record in the stream (none would reach the peer,
/// and its sequence number would collide with the records of a peer promoted meanwhile): it
/// starts no generation, and after a failover this node follows the new primary, whose
/// first writes it applies (none skipped), with no split brain.
#[test]
fn a_flush_while_the_peer_is_away_starts_no_generation_and_skips_no_write_after_failover() {
    let c = pair_via_proxy("repl-gen-flush-away", "C");
    let a = c.alpha();
    nbd_write(a, 0, &random_bytes(MIB));
    c.wait_in_sync(Duration::from_secs(30));
    let before = current_gen(a);

    assert!(c.proxy().cut_and_refuse() >= 1, "no link connection to cut");
    a.wait_not_connected(Duration::from_secs(10));
    let mut r = a.raw_open();
    r.command(CMD_FLUSH, 0, 0, 0)
        .expect("a flush with the peer away");
    r.command(CMD_FLUSH, nbd_const::CMD_FLAG_FUA, 0, 0)
        .expect("a FUA flush with the peer away");
    r.disconnect();
    assert_eq!(current_gen(a), before, "a flush started a generation");
    a.ctl_ok(&["secondary"]);
    assert_eq!(current_gen(a), before, "the demotion started a generation");

    failover_to_beta_which_alpha_follows(&c);
}

/// With the proxy refusing: beta is promoted with --force and writes 1 MiB at 4 MiB; the
/// link comes back, and alpha (secondary) follows beta: it applies every write of beta's
/// (the 1 MiB among them), with no split brain, and the replicas end identical.
fn failover_to_beta_which_alpha_follows(c: &Cluster) {
    let (a, b) = (c.alpha(), c.beta());
    b.wait_not_connected(Duration::from_secs(10));
    b.primary_force();
    let data = random_bytes(MIB);
    nbd_write(b, 4 * MIB as u64, &data);
    c.proxy().resume();
    let rb = b.wait_repl(SYNC_TIMEOUT, "alpha in sync behind beta", |r| {
        r["connection"] == "connected" && r["peer_role"] == "secondary" && r["out_of_sync"] == 0
    });
    a.wait_repl(SYNC_TIMEOUT, "applied beta's writes", |r| {
        r["seq_applied"] == rb["seq_written"]
    });
    assert!(
        !a.log_tail(200).contains("split brain"),
        "a false split brain\n{}",
        a.log_tail(30)
    );
    assert_same_bytes(
        &a.backing_data(5 * MIB as u64)[4 * MIB..],
        &data,
        "alpha after following the new primary",
    );
    c.assert_replicas_identical(a.size(), "after the failover");
}

// ---------------------------------------------------------------------------------------------
// A client that ignores the advertised maximum request.

/// The export advertises as its maximum request what one journal record can hold (half the
/// journal). A client that sends a longer write anyway (nbdfuse does, with its 1 MiB writes)
/// is not refused: the write is journaled in parts, and under protocol C it is acknowledged
/// only once the peer has all of it, with no journal overflow and no resync. Before (an admin
/// trial found it), the one record overflowed the journal, the link dropped, and the write was
/// acknowledged without the peer: a kill -9 of the primary then lost it on the peer.
#[test]
fn a_write_over_the_advertised_maximum_is_replicated_in_parts_before_its_reply() {
    let c = Cluster::builder("repl-max-request")
        .nodes(2)
        .backing_size(BACKING)
        .protocol("C")
        .journal_size("4M")
        .build();
    c.start_pair();
    let (a, b) = (c.alpha(), c.beta());
    let out = run_ok(
        Command::new("nbdinfo").arg("--json").arg(a.uri()),
        CMD_TIMEOUT,
    );
    let info: Value = serde_json::from_str(&out.stdout).expect("nbdinfo --json");
    let max = info["exports"][0]["block_size_maximum"]
        .as_u64()
        .unwrap_or_else(|| panic!("no block_size_maximum: {}", out.stdout));
    assert!(
        max < 2 * MIB as u64 && max > MIB as u64 && max.is_multiple_of(4096),
        "a 4 MiB journal holds records up to 2 MiB less a frame head: {max}"
    );
    let before = a.repl();
    let mark = std::fs::read_to_string(a.log_path())
        .unwrap_or_default()
        .len();

    let mut r = RawNbd::open_with_block_size(a.export(), c.resource());
    let over = random_bytes(max as usize + 4096);
    r.write_at(0, &over, 0).expect("a write over the maximum");
    // Protocol C: acknowledged, so on the peer already (no flush, no resync yet).
    assert_same_bytes(
        &b.backing_data(over.len() as u64),
        &over,
        "beta holds the long write at its reply",
    );
    let fits = random_bytes(max as usize);
    r.write_at(4 * MIB as u64, &fits, 0)
        .expect("a write of the maximum");
    r.command(nbd_const::CMD_FLUSH, 0, 0, 0).expect("flush");
    assert_same_bytes(
        &r.read_at(0, over.len() as u32).expect("read"),
        &over,
        "the long write on the primary",
    );
    r.disconnect();

    let ra = a.wait_repl(SYNC_TIMEOUT, "beta resynced and in sync", |r| {
        r["connection"] == "connected"
            && r["out_of_sync"] == 0
            && r["seq_applied"] == r["seq_written"]
            && r["lag_writes"] == 0
    });
    assert_eq!(
        ra["crc_errors"], before["crc_errors"],
        "nothing went wrong on the link: {ra}"
    );
    let log = std::fs::read_to_string(a.log_path()).unwrap_or_default();
    let log = log.get(mark..).unwrap_or_default();
    assert!(
        !log.contains("journal cannot take") && !log.contains("resync to the peer ("),
        "the long write overflowed the journal:\n{}",
        a.log_tail(30)
    );

    let size = over.len() as u64;
    assert_same_bytes(&b.backing_data(size), &over, "beta holds the long write");
    assert_same_bytes(
        &b.backing_data(4 * MIB as u64 + max)[4 * MIB..],
        &fits,
        "beta holds the write of the maximum",
    );
    c.assert_replicas_identical(a.size(), "after the long write");
}

/// A FUA write right behind a journal catch-up's `SyncDone`: the secondary syncs the FUA
/// write and may do so while the `SyncDone` still commits the catch-up's end (its record
/// is not finished yet), so the FUA write must wait for it before it says it is synced.
/// Before (review finding) it said so past the applied mark: a debug build's assertion
/// killed the apply task (the client's FUA write under C then waited for the secondary's
/// next sync, up to 30 s), and a release build committed an applied mark past a record not
/// finished. A writer sends FUA writes at depth 1 while beta disconnects and reconnects,
/// each reconnect a catch-up.
#[test]
fn fua_writes_right_after_a_catch_up_wait_for_its_end() {
    let c = pair("fua-catchup", "C");
    let (a, b) = (c.alpha(), c.beta());
    let stop = std::sync::atomic::AtomicBool::new(false);
    /// Stops the writer however the rounds end: a round that panics would otherwise wait
    /// for ever for a writer that never stops (the scope joins it before the panic goes on).
    struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let slowest = std::thread::scope(|s| {
        let _stop_writer = StopOnDrop(&stop);
        let writer = s.spawn(|| {
            let mut r = a.raw_open();
            let data = random_bytes(4096);
            let (mut n, mut slowest) = (0u64, Duration::ZERO);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                r.write_at((n % 64) * 4096, &data, CMD_FLAG_FUA)
                    .unwrap_or_else(|e| panic!("FUA write {n}: error {e}"));
                slowest = slowest.max(t.elapsed());
                n += 1;
            }
            r.disconnect();
            (n, slowest)
        });
        for round in 0..10 {
            b.ctl_ok(&["disconnect"]);
            std::thread::sleep(Duration::from_millis(200));
            b.ctl_ok(&["connect"]);
            b.wait_repl(Duration::from_secs(30), "the catch-up's end", |r| {
                r["connection"] == "connected"
            });
            assert!(!writer.is_finished(), "round {round}: the writer stopped");
        }
        std::thread::sleep(Duration::from_millis(300));
        drop(_stop_writer);
        writer.join().expect("writer")
    });
    // (The slowest write is shown, not bounded: one that finds the journal full during a
    // catch-up waits for the peer's releases, by design.)
    println!("{} FUA writes, the slowest {:?}", slowest.0, slowest.1);
    assert!(slowest.0 > 10, "the writer wrote {} times", slowest.0);
    let panics = b.log_count("panicked");
    assert_eq!(panics, 0, "beta:\n{}", b.log_tail(40));
    c.wait_in_sync(Duration::from_secs(60));
}
