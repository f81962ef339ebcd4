//! A randomized fault soak: a seeded sequence of faults against a real pair under protocol C
//! while a stamped writer runs on whichever node is primary, checking after every step what a
//! user relies on:
//!
//! - no acknowledged write is lost: every block of the writer's region on the primary holds a
//!   valid stamp of its own block that is not older than the last write to it the writer saw
//!   acknowledged (or zeroes, if none was), over every writer of the run;
//! - once the pair reports in sync, the two backing files are byte-identical over the export;
//! - the daemons never panic, and a primary whose peer fails keeps acknowledging writes.
//!
//! Faults (see [`Fault`]): the link cut through the proxy in front of beta (short enough for a
//! journal catch-up from the 2 MiB journal, or long enough to overflow it into a bitmap
//! resync, sometimes cut again mid-repair); the secondary killed (-9) and brought back up
//! (sometimes killed again mid-repair); the primary killed (-9) and failed over (`primary
//! --force` on the secondary, writes there, the old primary back as secondary and resynced,
//! sometimes with the link cut mid-resync: roles swap); the primary killed and restarted
//! (sometimes right after a link cut, as the source of a repair under way; both secondary, the
//! crashed primary resyncs its hot extents, then a plain `primary` on either node, as the
//! runbook's "both nodes lost power"); a planned switchover (`secondary` with the writer
//! stopped, or `secondary --force` under it, then a plain `primary` on the other node); a
//! clean stop of the primary (`down`, or `down --force` under the writer), a plain `primary`
//! on the peer and the old primary back as secondary.
//! Every step starts and ends with the pair in sync, so no forced promotion ever takes a disk
//! that lacks acknowledged writes (which the README documents as a loss, not a bug).
//!
//! `BLOCKREP_SOAK_SEED=N` replays a run (the seed is printed first), `BLOCKREP_SOAK_STEPS=N`
//! lengthens it (default 7: each kind of fault once, in a seeded order), and
//! `BLOCKREP_SOAK_PROTOCOL=B` runs it under protocol B, whose promise holds the same
//! invariants here: only one node fails at a time, and a write the peer received before its
//! primary crashed is applied there before a promotion (protocol A acknowledges writes the
//! peer may never get, so a failover may lose some: not soaked). The seed decides the
//! faults, their order and their timings (outage lengths, writer depth and rate, which node
//! is promoted); the interleaving with the daemons' own timing is not reproducible.
//!
//! The writer is local to this file (the harness's `stamp_writer.py` numbers each run's writes
//! from 1): the same stamp and log format (so [`Stamp`] and [`WriterLog`] read them), with a
//! first sequence number per run above every earlier run's, an optional rate limit, and a
//! seeded block choice. Writes to one block never overlap (a block with a write in flight is
//! not chosen), and a run starts only after the previous one ended, so for every block the
//! highest acknowledged sequence number of the whole soak is the newest write a user was
//! promised.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use blockrep_e2e::blocks::python;
use blockrep_e2e::watch::{pair_synced, watch};
use blockrep_e2e::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// Blocks (4 KiB) the writers write: the first 32 MiB of the export (8 activity-log extents),
/// more than a throttled outage dirties, so that a bitmap resync names part of it.
const REGION_BLOCKS: u64 = 8192;
/// Sequence numbers of writer run `k` start above `k * SEQ_SPAN`.
const SEQ_SPAN: u64 = 10_000_000;
/// Bound for a pair to reconnect after a fault is repaired.
const RECONNECT: Duration = Duration::from_secs(30);
/// Bound for a pair to report in sync (a bitmap resync of the region under writes included).
const IN_SYNC: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------------------------
// The writer.

const WRITER: &str = r#"
import argparse, os, random, struct, sys, time, zlib
import nbd

BS = 4096

def stamp(block, seq):
    body = struct.pack("<QQ", block, seq) + os.urandom(BS - 20)
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)

p = argparse.ArgumentParser()
p.add_argument("--uri", required=True)
p.add_argument("--log", required=True)
p.add_argument("--blocks", type=int, required=True)
p.add_argument("--inflight", type=int, required=True)
p.add_argument("--base", type=int, required=True)
p.add_argument("--rate", type=float, default=0)
p.add_argument("--seed", type=int, default=1)
p.add_argument("--stop-file", required=True)
a = p.parse_args()
assert a.blocks > a.inflight

rng = random.Random(a.seed)
log = open(a.log, "w", buffering=1)
h = nbd.NBD()
h.connect_uri(a.uri)
start = time.monotonic()
inflight = {}  # seq -> (block, buffer)
done = []
seq = a.base
failed = False

def finish(s):
    def cb(err):
        done.append((s, err.value))
        return 1
    return cb

try:
    while True:
        while done:
            s, e = done.pop()
            b, _ = inflight.pop(s)
            if e == 0:
                log.write("A %d %d\n" % (s, b))
            else:
                log.write("E %d %d %d\n" % (s, b, e))
                failed = True
        if failed:
            break
        stop = os.path.exists(a.stop_file)
        if stop and not inflight:
            break
        wait = 0.0
        if not stop and len(inflight) < a.inflight:
            if a.rate > 0:
                wait = start + (seq - a.base) / a.rate - time.monotonic()
            if wait <= 0:
                busy = {b for b, _ in inflight.values()}
                while True:
                    block = rng.randrange(a.blocks)
                    if block not in busy:
                        break
                seq += 1
                buf = nbd.Buffer.from_bytearray(bytearray(stamp(block, seq)))
                log.write("I %d %d\n" % (seq, block))
                inflight[seq] = (block, buf)
                h.aio_pwrite(buf, block * BS, completion=finish(seq))
                continue
        ms = 50 if wait <= 0 else max(1, min(50, int(wait * 1000)))
        if inflight:
            h.poll(ms)
        else:
            time.sleep(ms / 1000.0)
except nbd.Error as e:
    print("nbd error after %d writes: %s" % (seq - a.base, e), file=sys.stderr)
    sys.exit(2)
if failed:
    print("a write failed", file=sys.stderr)
    sys.exit(2)
h.shutdown()
print("issued %d" % (seq - a.base))
"#;

/// How one writer run writes.
#[derive(Debug, Clone, Copy)]
struct WriterParams {
    inflight: u64,
    /// Writes per second at most (0: as fast as the primary acknowledges them).
    rate: u64,
}

/// A running writer (killed on drop).
struct Writer {
    proc: ChildGuard,
    log: PathBuf,
    stop_file: PathBuf,
    node: String,
    params: WriterParams,
}

impl Writer {
    fn acked(&self) -> usize {
        WriterLog::read(&self.log).acked.len()
    }

    fn output(&self) -> String {
        self.proc.log()
    }
}

/// Every acknowledged write of the soak: per block the highest acknowledged sequence number,
/// and the block of every issued one.
#[derive(Default)]
struct History {
    last_acked: HashMap<u64, u64>,
    block_of: HashMap<u64, u64>,
    issued: usize,
    acked: usize,
    failed: usize,
}

impl History {
    fn absorb(&mut self, log: &WriterLog) {
        for &(s, b) in &log.issued {
            assert!(
                self.block_of.insert(s, b).is_none(),
                "sequence number {s} issued twice"
            );
        }
        for &(s, b) in &log.acked {
            assert_eq!(
                self.block_of.get(&s),
                Some(&b),
                "acknowledged write {s} to block {b} was never issued there"
            );
            let e = self.last_acked.entry(b).or_insert(0);
            *e = (*e).max(s);
        }
        self.issued += log.issued.len();
        self.acked += log.acked.len();
        self.failed += log.errors.len();
    }
}

// ---------------------------------------------------------------------------------------------
// The plan.

#[derive(Debug, Clone)]
enum Fault {
    /// The link cut at the proxy for `ms` while writing, then resumed; with `recut`, cut again
    /// `recut_after_ms` after it came back (likely mid-repair) for `recut_ms`.
    LinkCut { ms: u64, recut: Option<(u64, u64)> },
    /// The secondary's daemon killed (-9); `ms` later `up` again; with `again`, killed again
    /// `again_after_ms` after it reconnected (likely a resync target mid-resync) and `up`
    /// `again_ms` later.
    KillSecondary { ms: u64, again: Option<(u64, u64)> },
    /// The primary's daemon killed (-9) under writes; the secondary promoted with `--force`;
    /// writes there; `ms` later the old primary `up` again (secondary, resynced); with
    /// `recut`, the link cut `recut_after_ms` after it reconnected (likely mid-resync) for
    /// `recut_ms`.
    Failover { ms: u64, recut: Option<(u64, u64)> },
    /// The primary's daemon killed (-9) and restarted; once the two are in sync, a plain
    /// `primary` on the restarted node or (`other`) on its peer. With `cut_first`, the link is
    /// cut for that many ms first and the primary killed as soon as it reconnected (likely the
    /// source of a resync or catch-up under way).
    CrashRestart { other: bool, cut_first: Option<u64> },
    /// `secondary` (with the writer stopped first) or `secondary --force` under the writer,
    /// then a plain `primary` on the other node.
    Switchover { force: bool },
    /// The primary stopped cleanly (`down` with the writer stopped first, or `down --force`
    /// under it), a plain `primary` on the peer (the runbook's "the primary was shut down
    /// cleanly"), writes there, and `ms` later the old primary `up` again as secondary.
    CleanStop { force: bool, ms: u64 },
}

#[derive(Debug, Clone)]
struct Step {
    fault: Fault,
    writer: WriterParams,
    /// Writing before the fault, and after the repair began.
    lead_ms: u64,
    tail_ms: u64,
}

fn range(rng: &mut XorShift, lo: u64, hi: u64) -> u64 {
    lo + rng.next_u64() % (hi - lo + 1)
}

/// A fair coin (the generator's top bit).
fn coin(rng: &mut XorShift) -> bool {
    rng.next_u64() >> 63 == 1
}

fn pick<T: Copy>(rng: &mut XorShift, v: &[T]) -> T {
    v[(rng.next_u64() % v.len() as u64) as usize]
}

/// Kinds of fault: 0 short link cut, 1 long link cut, 2 secondary killed, 3 failover,
/// 4 crash and restart, 5 switchover, 6 clean stop of the primary.
const KINDS: u64 = 7;

fn make_step(rng: &mut XorShift, kind: u64) -> Step {
    let throttled = WriterParams {
        inflight: pick(rng, &[2, 4, 8]),
        rate: range(rng, 100, 300),
    };
    let any = WriterParams {
        inflight: pick(rng, &[4, 8, 16, 32]),
        rate: pick(rng, &[0, 0, 200, 1000]),
    };
    let (fault, writer) = match kind {
        // Fits the 2 MiB journal: a catch-up from it.
        0 => (
            Fault::LinkCut {
                ms: range(rng, 200, 700),
                recut: None,
            },
            throttled,
        ),
        // Overflows it (thousands of writes): a bitmap resync, maybe cut again midway.
        1 => {
            let recut = (coin(rng)).then(|| (range(rng, 50, 400), range(rng, 200, 1000)));
            (
                Fault::LinkCut {
                    ms: range(rng, 1500, 3000),
                    recut,
                },
                WriterParams {
                    inflight: pick(rng, &[8, 16, 32]),
                    rate: 0,
                },
            )
        }
        2 => (
            Fault::KillSecondary {
                ms: range(rng, 200, 2500),
                again: coin(rng).then(|| (range(rng, 50, 400), range(rng, 200, 1500))),
            },
            any,
        ),
        3 => (
            Fault::Failover {
                ms: range(rng, 300, 2000),
                recut: coin(rng).then(|| (range(rng, 50, 400), range(rng, 200, 1000))),
            },
            any,
        ),
        4 => (
            Fault::CrashRestart {
                other: coin(rng),
                cut_first: coin(rng).then(|| range(rng, 300, 2500)),
            },
            any,
        ),
        5 => (Fault::Switchover { force: coin(rng) }, any),
        _ => (
            Fault::CleanStop {
                force: coin(rng),
                ms: range(rng, 300, 2000),
            },
            any,
        ),
    };
    Step {
        fault,
        writer,
        lead_ms: range(rng, 200, 1000),
        tail_ms: range(rng, 200, 1200),
    }
}

/// Each kind once in a seeded order (as far as `steps` goes), then seeded draws.
fn plan(rng: &mut XorShift, steps: usize) -> Vec<Step> {
    let mut kinds: Vec<u64> = (0..KINDS).collect();
    for i in (1..kinds.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        kinds.swap(i, j);
    }
    while kinds.len() < steps {
        kinds.push(rng.next_u64() % KINDS);
    }
    kinds.truncate(steps);
    kinds.into_iter().map(|k| make_step(rng, k)).collect()
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Log and status helpers.

fn log_text(n: &Node) -> String {
    let mut s = String::new();
    for p in [
        n.log_path().to_path_buf(),
        n.log_path().with_extension("fg.log"),
    ] {
        if let Ok(b) = std::fs::read(&p) {
            s.push_str(&String::from_utf8_lossy(&b));
        }
    }
    s
}

/// Panics if either daemon's log holds a Rust panic.
fn assert_no_panics(c: &Cluster, what: &str) {
    for n in c.nodes() {
        let text = log_text(n);
        let hits: Vec<&str> = text.lines().filter(|l| l.contains("panicked")).collect();
        assert!(
            hits.is_empty(),
            "{what}: {}'s daemon panicked:\n{}\n--- {} log tail ---\n{}",
            n.name(),
            hits.join("\n"),
            n.name(),
            n.log_tail(60)
        );
    }
}

/// Both nodes' status and log tails, for a panic message (never panics itself).
fn report(c: &Cluster) -> String {
    let mut s = String::new();
    for n in c.nodes() {
        let st = n.ctl(&["status", "--json"]);
        let st = match serde_json::from_str::<Value>(st.stdout.trim()) {
            Ok(v) => v.to_string(),
            Err(_) => st.describe(),
        };
        s.push_str(&format!(
            "{}: {st}\n--- {} log tail ---\n{}\n",
            n.name(),
            n.name(),
            n.log_tail(30)
        ));
    }
    s
}

/// The current daemon pid of `n`, from its status.
fn daemon_pid(n: &Node) -> u32 {
    let st = n.status_json();
    st["pid"]
        .as_u64()
        .filter(|p| *p != 0 && st["up"] == true)
        .unwrap_or_else(|| {
            panic!(
                "{} has no running daemon: {st}\n--- log tail ---\n{}",
                n.name(),
                n.log_tail(40)
            )
        }) as u32
}

/// SIGKILL of `n`'s current daemon (only that pid), waited for until the node reports itself
/// not up: the thread-group leader dies first, and the daemon's other threads (a disk write
/// in flight) may hold its control socket a moment longer, a status asked meanwhile getting
/// no answer (exit 4).
fn crash(n: &Node) {
    // Running now (its pid is remembered); the harness kills only pids that are still this
    // node's daemon, so this one.
    daemon_pid(n);
    n.kill9_and_wait();
}

fn linked(r: &Value) -> bool {
    matches!(
        r["connection"].as_str(),
        Some("connected" | "sync-source" | "sync-target")
    )
}

// ---------------------------------------------------------------------------------------------
// The soak.

struct Soak<'a> {
    c: &'a Cluster,
    py: PathBuf,
    seed: u64,
    size: u64,
    prim_alpha: bool,
    hist: History,
    runs: u64,
    rng: XorShift,
    /// What the current step is, for messages.
    ctx: String,
}

impl<'a> Soak<'a> {
    fn prim(&self) -> &'a Node {
        if self.prim_alpha {
            self.c.alpha()
        } else {
            self.c.beta()
        }
    }

    fn sec(&self) -> &'a Node {
        if self.prim_alpha {
            self.c.beta()
        } else {
            self.c.alpha()
        }
    }

    fn swap_roles(&mut self) {
        self.prim_alpha = !self.prim_alpha;
    }

    /// Polls both nodes until `pred(primary's status, secondary's status)` (the roles this
    /// soak expects now); panics after `timeout` with both statuses and log tails.
    fn wait(&self, timeout: Duration, what: &str, pred: impl Fn(&Value, &Value) -> bool) {
        let prim_alpha = self.prim_alpha;
        watch(
            self.c,
            timeout,
            &format!("{}: {what}", self.ctx),
            |sa, sb| {
                if prim_alpha {
                    pred(sa, sb)
                } else {
                    pred(sb, sa)
                }
            },
        );
    }

    /// `blockrep-ctl ARGS` on `n`, panicking with both nodes' status and logs if it fails.
    fn ctl(&self, n: &Node, args: &[&str]) -> CmdOutput {
        let t = Instant::now();
        let out = n.ctl(args);
        if t.elapsed() > Duration::from_secs(2) {
            println!(
                "    note: {} {args:?} took {:.1} s",
                n.name(),
                t.elapsed().as_secs_f64()
            );
        }
        assert!(
            out.success(),
            "{}: {} {args:?} failed:\n{}\n{}",
            self.ctx,
            n.name(),
            out.describe(),
            report(self.c)
        );
        out
    }

    fn assert_roles(&self, what: &str) {
        let (sp, ss) = (self.prim().status_json(), self.sec().status_json());
        assert!(
            sp["role"] == "primary" && ss["role"] == "secondary",
            "{}: {what}: expected {} primary and {} secondary\n{}",
            self.ctx,
            self.prim().name(),
            self.sec().name(),
            report(self.c)
        );
    }

    /// The roles as expected and the pair in sync: connected, nothing out of sync, both disks
    /// up to date, every write the primary made applied on the secondary as both report it.
    fn wait_in_sync(&self, what: &str) {
        self.wait(IN_SYNC, &format!("in sync ({what})"), |sp, ss| {
            let (rp, rs) = (&sp["replication"], &ss["replication"]);
            sp["role"] == "primary"
                && ss["role"] == "secondary"
                && pair_synced(sp, ss)
                && rp["lag_bytes"] == 0
                && rp["seq_written"].as_u64().is_some()
                && rs["seq_applied"] == rp["seq_written"]
        });
    }

    fn start_writer(&mut self, params: WriterParams) -> Writer {
        self.runs += 1;
        let k = self.runs;
        let dir = self.c.dir().path();
        let script = dir.join("soak_writer.py");
        if !script.exists() {
            std::fs::write(&script, WRITER).expect("write soak_writer.py");
        }
        let log = dir.join(format!("soak{k}.writes"));
        let stop_file = dir.join(format!("soak{k}.stop"));
        let node = self.prim();
        let mut cmd = Command::new(&self.py);
        cmd.arg(&script)
            .arg("--uri")
            .arg(node.uri())
            .arg("--log")
            .arg(&log)
            .arg("--blocks")
            .arg(REGION_BLOCKS.to_string())
            .arg("--inflight")
            .arg(params.inflight.to_string())
            .arg("--base")
            .arg((k * SEQ_SPAN).to_string())
            .arg("--rate")
            .arg(params.rate.to_string())
            .arg("--seed")
            .arg((self.rng.next_u64() >> 1).to_string())
            .arg("--stop-file")
            .arg(&stop_file);
        let proc = ChildGuard::spawn(&mut cmd, Some(&dir.join(format!("soak{k}.out"))));
        Writer {
            proc,
            log,
            stop_file,
            node: node.name().to_string(),
            params,
        }
    }

    /// Waits until `w` has `n` more writes acknowledged than `from` (the primary serves).
    fn wait_acked(&self, w: &mut Writer, from: usize, n: usize, what: &str) {
        let timeout = Duration::from_secs(20);
        let deadline = Instant::now() + timeout;
        loop {
            let got = w.acked();
            if got >= from + n {
                return;
            }
            assert!(
                w.proc.running(),
                "{}: {what}: the writer on {} exited with {} of {} more writes acknowledged:\n{}\n{}",
                self.ctx,
                w.node,
                got - from,
                n,
                w.output(),
                report(self.c)
            );
            assert!(
                Instant::now() < deadline,
                "{}: {what}: the primary {} acknowledged {} of {n} writes in {timeout:?} \
                 (writer {:?})\n{}",
                self.ctx,
                w.node,
                got - from,
                w.params,
                report(self.c)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops a writer whose primary stayed up: it must exit cleanly, no write failed.
    fn stop_writer(&mut self, mut w: Writer, what: &str) {
        std::fs::write(&w.stop_file, b"stop").expect("write stop file");
        let exited = w.proc.wait_exit(Duration::from_secs(30));
        let log = WriterLog::read(&w.log);
        self.hist.absorb(&log);
        assert!(
            exited && w.proc.exit_code() == Some(0) && log.errors.is_empty(),
            "{}: {what}: the writer on {} (a primary that stayed up) did not end cleanly \
             (exited: {exited}, code {:?}); failed writes {:?}:\n{}\n{}",
            self.ctx,
            w.node,
            w.proc.exit_code(),
            &log.errors[..log.errors.len().min(10)],
            w.output(),
            report(self.c)
        );
        println!(
            "    writer on {} {:?}: {} issued, {} acknowledged",
            w.node,
            w.params,
            log.issued.len(),
            log.acked.len()
        );
    }

    /// Collects a writer whose primary went away or was demoted with `--force` (it ends by
    /// itself on the connection's error, or is killed after 15 s): unacknowledged and failed
    /// writes are allowed.
    fn reap_writer(&mut self, mut w: Writer) {
        std::fs::write(&w.stop_file, b"stop").expect("write stop file");
        if !w.proc.wait_exit(Duration::from_secs(15)) {
            w.proc.kill();
        }
        let log = WriterLog::read(&w.log);
        self.hist.absorb(&log);
        println!(
            "    writer on {} {:?}: {} issued, {} acknowledged, {} failed (its primary went away or cut it off)",
            w.node,
            w.params,
            log.issued.len(),
            log.acked.len(),
            log.errors.len()
        );
    }

    /// Every block of the region on node `on` (its backing file) holds a valid stamp of itself,
    /// not older than the last acknowledged write to it, or zeroes if none was acknowledged.
    fn check_stamps(&self, on: &Node, what: &str) {
        let data = on.backing_data(REGION_BLOCKS * STAMP_BLOCK as u64);
        let other = if on.name() == "alpha" {
            self.c.beta()
        } else {
            self.c.alpha()
        };
        let mut bad = Vec::new();
        for (blk, st) in Stamp::parse_all(&data, REGION_BLOCKS as usize)
            .into_iter()
            .enumerate()
        {
            let blk = blk as u64;
            let want = self.hist.last_acked.get(&blk).copied();
            let ok = match st {
                Stamp::Zero => want.is_none(),
                Stamp::Invalid => false,
                Stamp::Valid { block, seq } => {
                    block == blk
                        && self.hist.block_of.get(&seq) == Some(&blk)
                        && want.is_none_or(|w| seq >= w)
                }
            };
            if !ok {
                bad.push((blk, st, want));
            }
        }
        if bad.is_empty() {
            return;
        }
        // The other node's copy of the same blocks, for the report (it may be down).
        let theirs = std::fs::read(other.backing_path()).ok();
        let lines: Vec<String> = bad
            .iter()
            .take(12)
            .map(|(blk, st, want)| {
                let o = theirs
                    .as_ref()
                    .and_then(|d| {
                        let off = (*blk as usize) * STAMP_BLOCK;
                        d.get(off..off + STAMP_BLOCK).map(Stamp::parse)
                    })
                    .map(|s| format!("{s:?}"))
                    .unwrap_or_else(|| "?".into());
                format!(
                    "block {blk}: {} holds {st:?}, last acknowledged write {want:?}, {} holds {o}",
                    on.name(),
                    other.name()
                )
            })
            .collect();
        panic!(
            "{}: {what}: {} of {REGION_BLOCKS} blocks on {} break the stamp invariant (an \
             acknowledged write lost, or torn/foreign data); first:\n{}\n{}",
            self.ctx,
            bad.len(),
            on.name(),
            lines.join("\n"),
            report(self.c)
        );
    }

    /// Both backing files identical over the export; else panics naming the first differing
    /// block, what each node holds there and the last acknowledged write to it.
    fn assert_identical(&self, what: &str) {
        let (a, b) = (self.c.alpha(), self.c.beta());
        let Some(off) = first_difference(a.backing_path(), b.backing_path(), self.size) else {
            return;
        };
        let blk = off / STAMP_BLOCK as u64;
        let at = |n: &Node| {
            let d = n.backing_data((blk + 1) * STAMP_BLOCK as u64);
            Stamp::parse(&d[(blk as usize) * STAMP_BLOCK..])
        };
        panic!(
            "{}: {what}: the pair reports in sync but the replicas differ at offset {off} \
             (block {blk}): alpha holds {:?}, beta {:?}, last acknowledged write {:?}\n{}",
            self.ctx,
            at(a),
            at(b),
            self.hist.last_acked.get(&blk),
            report(self.c)
        );
    }

    /// The checks after a step: roles, in sync, stamps on the primary, replicas identical,
    /// both daemons alive, no panic.
    fn check(&self, what: &str) {
        self.wait_in_sync(what);
        self.assert_roles(what);
        self.check_stamps(self.prim(), &format!("{what}: the primary's data"));
        self.assert_identical(what);
        for n in self.c.nodes() {
            n.assert_alive();
        }
        assert_no_panics(self.c, &self.ctx);
    }

    /// A writer on the primary, once 20 of its writes were acknowledged and `ms` more passed.
    fn write_for(&mut self, params: WriterParams, ms: u64, what: &str) -> Writer {
        let mut w = self.start_writer(params);
        self.wait_acked(&mut w, 0, 20, what);
        std::thread::sleep(Duration::from_millis(ms));
        w
    }

    fn run_step(&mut self, step: &Step) {
        let lead = step.lead_ms;
        match step.fault.clone() {
            Fault::LinkCut { ms, recut } => {
                let mut w = self.write_for(step.writer, lead, "before the link cut");
                self.cut(&mut w, ms, "the link cut");
                if let Some((after, ms2)) = recut {
                    std::thread::sleep(Duration::from_millis(after));
                    self.cut(&mut w, ms2, "the link cut again during the repair");
                }
                std::thread::sleep(Duration::from_millis(step.tail_ms));
                self.stop_writer(w, "link cut");
            }
            Fault::KillSecondary { ms, again } => {
                let mut w = self.write_for(step.writer, lead, "before the secondary's crash");
                self.crash_secondary(&mut w, ms, "the secondary's crash");
                if let Some((after, ms2)) = again {
                    std::thread::sleep(Duration::from_millis(after));
                    self.crash_secondary(&mut w, ms2, "the secondary's crash during the repair");
                }
                std::thread::sleep(Duration::from_millis(step.tail_ms));
                self.stop_writer(w, "secondary crashed and restarted");
            }
            Fault::Failover { ms, recut } => {
                let w = self.write_for(step.writer, lead, "before the primary's crash");
                let (old, new) = (self.prim(), self.sec());
                crash(old);
                self.reap_writer(w);
                self.wait(
                    CONNECT_TIMEOUT,
                    "the secondary sees its primary gone",
                    |_, rs| !linked(&rs["replication"]),
                );
                self.ctl(new, &["primary", "--force"]);
                self.swap_roles();
                let sp = new.status_json();
                assert_eq!(
                    sp["role"], "primary",
                    "{}: after primary --force: {sp}",
                    self.ctx
                );
                // The invariant at the failover itself: under C (and B: the peer applies
                // what it received), every acknowledged write is on the promoted node.
                self.check_stamps(new, "right after the failover");
                let mut w = self.write_for(step.writer, ms, "on the promoted node");
                old.up();
                let so = old.status_json();
                assert_eq!(
                    so["role"], "secondary",
                    "{}: the old primary after its crash and up: {so}",
                    self.ctx
                );
                self.wait(RECONNECT, "the old primary reconnected", |rp, rs| {
                    linked(&rp["replication"]) && linked(&rs["replication"])
                });
                if let Some((after, ms2)) = recut {
                    std::thread::sleep(Duration::from_millis(after));
                    self.cut(&mut w, ms2, "the link cut during the old primary's resync");
                }
                std::thread::sleep(Duration::from_millis(step.tail_ms));
                self.stop_writer(w, "failover and the old primary's return");
            }
            Fault::CrashRestart { other, cut_first } => {
                let mut w = self.write_for(step.writer, lead, "before the primary's crash");
                if let Some(ms) = cut_first {
                    self.cut(&mut w, ms, "the link cut before the primary's crash");
                }
                let (crashed, peer) = (self.prim(), self.sec());
                crash(crashed);
                self.reap_writer(w);
                // The crashed primary's own disk holds every write it acknowledged.
                self.check_stamps(crashed, "the crashed primary's disk");
                self.wait(
                    CONNECT_TIMEOUT,
                    "the secondary sees its primary gone",
                    |_, rs| !linked(&rs["replication"]),
                );
                crashed.up();
                watch(
                    self.c,
                    IN_SYNC,
                    &format!("{}: both secondary and in sync after the restart", self.ctx),
                    |sa, sb| {
                        sa["role"] == "secondary"
                            && sb["role"] == "secondary"
                            && pair_synced(sa, sb)
                    },
                );
                let promote = if other { peer } else { crashed };
                self.ctl(promote, &["primary"]);
                if other {
                    self.swap_roles();
                }
                let w = self.write_for(step.writer, step.tail_ms, "on the node promoted");
                self.stop_writer(w, "crash, restart and promotion");
            }
            Fault::Switchover { force } => {
                let w = self.write_for(step.writer, lead, "before the switchover");
                let (old, new) = (self.prim(), self.sec());
                if force {
                    self.ctl(old, &["secondary", "--force"]);
                    self.reap_writer(w);
                } else {
                    self.stop_writer(w, "before the switchover");
                    self.ctl(old, &["secondary"]);
                }
                self.ctl(new, &["primary"]);
                self.swap_roles();
                let w = self.write_for(step.writer, step.tail_ms, "after the switchover");
                self.stop_writer(w, "switchover");
            }
            Fault::CleanStop { force, ms } => {
                let w = self.write_for(step.writer, lead, "before the primary's stop");
                let (old, new) = (self.prim(), self.sec());
                if force {
                    self.ctl(old, &["down", "--force"]);
                    self.reap_writer(w);
                } else {
                    self.stop_writer(w, "before the primary's stop");
                    self.ctl(old, &["down"]);
                }
                self.wait(
                    CONNECT_TIMEOUT,
                    "the secondary sees its primary gone",
                    |_, rs| !linked(&rs["replication"]),
                );
                self.ctl(new, &["primary"]);
                self.swap_roles();
                self.check_stamps(new, "the peer promoted after the primary's clean stop");
                let w = self.write_for(step.writer, ms, "on the promoted node");
                old.up();
                self.wait(RECONNECT, "the old primary reconnected", |rp, rs| {
                    rs["role"] == "secondary"
                        && linked(&rp["replication"])
                        && linked(&rs["replication"])
                });
                std::thread::sleep(Duration::from_millis(step.tail_ms));
                self.stop_writer(w, "clean stop of the primary and its return");
            }
        }
    }

    /// Kills the secondary's daemon while `w` writes, `up` again `ms` later, waits until it
    /// reconnected.
    fn crash_secondary(&self, w: &mut Writer, ms: u64, what: &str) {
        let sec = self.sec();
        crash(sec);
        self.wait(
            CONNECT_TIMEOUT,
            &format!("{what}: the primary sees its peer gone"),
            |rp, _| !linked(&rp["replication"]),
        );
        let from = w.acked();
        self.wait_acked(w, from, 20, &format!("{what}: the primary serves alone"));
        std::thread::sleep(Duration::from_millis(ms));
        sec.up();
        self.wait(
            RECONNECT,
            &format!("{what}: reconnected after the restart"),
            |rp, rs| {
                rs["role"] == "secondary"
                    && linked(&rp["replication"])
                    && linked(&rs["replication"])
            },
        );
    }

    /// Cuts the link at the proxy for `ms` while `w` writes, then lets it reconnect.
    fn cut(&self, w: &mut Writer, ms: u64, what: &str) {
        let p = self.c.proxy();
        p.cut_and_refuse();
        self.wait(
            CONNECT_TIMEOUT,
            &format!("{what}: disconnected"),
            |rp, rs| !linked(&rp["replication"]) && !linked(&rs["replication"]),
        );
        let from = w.acked();
        self.wait_acked(w, from, 20, &format!("{what}: the primary serves alone"));
        std::thread::sleep(Duration::from_millis(ms));
        p.resume();
        self.wait(RECONNECT, &format!("{what}: reconnected"), |rp, rs| {
            linked(&rp["replication"]) && linked(&rs["replication"])
        });
    }
}

#[test]
fn soak_random_faults_under_protocol_c() {
    let Some(py) = python() else { return };
    let seed = env_u64("BLOCKREP_SOAK_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ u64::from(std::process::id())
    });
    let steps = env_u64("BLOCKREP_SOAK_STEPS").unwrap_or(KINDS) as usize;
    let protocol = std::env::var("BLOCKREP_SOAK_PROTOCOL").unwrap_or_else(|_| "C".into());
    assert!(
        protocol == "B" || protocol == "C",
        "BLOCKREP_SOAK_PROTOCOL={protocol}: B or C (under A a failover may lose acknowledged writes)"
    );
    println!("soak seed {seed} steps {steps} protocol {protocol} (replay: BLOCKREP_SOAK_SEED={seed} BLOCKREP_SOAK_STEPS={steps} BLOCKREP_SOAK_PROTOCOL={protocol})");
    let mut rng = XorShift::new(seed);
    let plan = plan(&mut rng, steps);
    for (i, s) in plan.iter().enumerate() {
        println!("  plan {}: {s:?}", i + 1);
    }

    let c = Cluster::builder("soak")
        .nodes(2)
        .backing_size(128 * MIB)
        .protocol(&protocol)
        .journal_size("2M")
        .beta_via_proxy()
        .build();
    c.start_pair();
    c.wait_in_sync(SYNC_TIMEOUT);
    let size = c.alpha().size();
    assert!(
        size >= REGION_BLOCKS * STAMP_BLOCK as u64,
        "export of {size} bytes is smaller than the writers' region"
    );
    let started = Instant::now();
    let mut soak = Soak {
        c: &c,
        py,
        seed,
        size,
        prim_alpha: true,
        hist: History::default(),
        runs: 0,
        rng: XorShift::new(seed ^ 0x5eed),
        ctx: format!("seed {seed}: start"),
    };
    soak.check("the initial sync");
    let (mut resyncs, mut catchups) = (0, 0);
    for (i, step) in plan.iter().enumerate() {
        let t = Instant::now();
        let marks: Vec<usize> = c
            .nodes()
            .iter()
            .map(|n| log_text(n).lines().count())
            .collect();
        soak.ctx = format!(
            "seed {} step {}/{steps} {:?} (primary {})",
            soak.seed,
            i + 1,
            step.fault,
            soak.prim().name()
        );
        println!("{}", soak.ctx);
        soak.run_step(step);
        soak.check("after the step");
        // What repaired the secondary, as the sources logged it.
        let mut repairs = Vec::new();
        for (n, m) in c.nodes().iter().zip(marks) {
            for l in log_text(n).lines().skip(m) {
                if let Some(i) = l.find("resync to the peer (") {
                    resyncs += 1;
                    repairs.push(format!("{} {}", n.name(), &l[i..]));
                } else if l.contains("journal catch-up done: the peer") {
                    catchups += 1;
                    repairs.push(format!("{} journal catch-up", n.name()));
                }
            }
        }
        println!(
            "  ok in {:.1} s: primary now {}; repairs: {repairs:?}; {} writes acknowledged so far",
            t.elapsed().as_secs_f64(),
            soak.prim().name(),
            soak.hist.acked
        );
    }
    soak.ctx = format!("seed {seed}: end");
    assert_no_panics(&c, &soak.ctx);
    println!(
        "soak seed {seed}: {steps} steps in {:.1} s; {} writes issued, {} acknowledged, {} \
         failed (at a crash or forced demotion); {resyncs} bitmap resyncs, {catchups} journal \
         catch-ups",
        started.elapsed().as_secs_f64(),
        soak.hist.issued,
        soak.hist.acked,
        soak.hist.failed
    );
}
