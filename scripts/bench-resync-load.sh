#!/usr/bin/env bash
# bench-resync-load.sh - what a resync (or an online verify) costs the primary's clients: 4 KiB
# random writes at depth 1 (fio, nbd engine) on a protocol C primary while a bitmap resync or a
# verify runs, against the same pair connected and in sync, in one run.
#
# Usage: scripts/bench-resync-load.sh [-h|--help]
#
# Everything is configured through the environment:
#   SIZE=1G              size of each backing file (K/M/G suffixes, powers of 1024)
#   MODE=resync          what runs beside the probe: resync (a bitmap resync after an
#                        outage), csum (the same with `csums = true`: the source reads and
#                        hashes its regions, the target hashes its own) or verify (`verify`
#                        of the whole device, no outage: both nodes read and hash everything)
#   DIRTY=600M           bytes written (sequentially, 1 MiB at a time) while the peer is
#                        disconnected: what the resync then reads and sends
#   RESYNC_RATE=100M     resync-rate of the pair (the default of the config; verify is paced
#                        by it too)
#   JOURNAL_SIZE=64M     journal-size of the pair (the default; a resync reads chunks of up to
#                        1 MiB, an eighth of the journal at most)
#   RUNTIME=4            seconds of each probe
#   DROP=file            before each resync, drop alpha's file from the page cache (file), or
#                        every clean page and the filesystem's metadata caches of the machine
#                        (all: `echo 3 > /proc/sys/vm/drop_caches`, root only), as after an
#                        outage of hours in which the file's extent tree went cold too
#   ROUNDS=2             probes in sync and during a resync, alternating (a fresh outage
#                        and resync for each)
#   BLOCKREP_BIN_DIR=DIR use blockrep/blockrep-ctl from DIR instead of running
#                        `cargo build --release -p blockrep -p blockrep-ctl`
#   BENCH_TMPDIR=DIR     where the temp dir is created (default: $TMPDIR or /tmp)
#   KEEP_TMP=1           keep the temp dir (backing files, config, logs)
#
# Before each resync the written data's pages are dropped from the page cache (posix_fadvise
# on alpha's file, after an fsync of it; DROP=all: the machine's caches), so the resync reads
# it from the disk, as after an outage of hours. The probe starts once alpha's link shows sync-source; a resync that ends
# before the probe does is said in the output (lower RESYNC_RATE or raise DIRTY). MODE=verify:
# the caches are dropped the same way (both files), the probe starts once the verify runs, and
# a verify that ends before the probe is said the same way (lower RESYNC_RATE or raise SIZE);
# it must find no difference.
#
# Prints per round: IOPS, p50, p99, p99.9 and max completion latency of the probe, in sync and
# during the resync, and the ratio of the IOPS. Exit status: 0 when every step ran and the
# replicas were identical at the end, 1 on setup errors, 3 if they differed. On every exit
# (trap) both nodes are brought down, the daemons stopped by pid and the temp dir removed.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
export BENCH_NAME=bench-resync-load
# shellcheck source-path=SCRIPTDIR source=bench-lib/common.sh disable=SC1091
source "$SCRIPT_DIR/bench-lib/common.sh"

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi

SIZE=${SIZE:-1G}
DIRTY=${DIRTY:-600M}
RESYNC_RATE=${RESYNC_RATE:-100M}
JOURNAL_SIZE=${JOURNAL_SIZE:-64M}
RUNTIME=${RUNTIME:-4}
MODE=${MODE:-resync}
[[ $MODE == resync || $MODE == csum || $MODE == verify ]] || bench_die "MODE=$MODE is not resync, csum or verify"
DROP=${DROP:-file}
[[ $DROP == file || $DROP == all ]] || bench_die "DROP=$DROP is not file or all"
ROUNDS=${ROUNDS:-2}
KEEP_TMP=${KEEP_TMP:-0}

for t in fio python3; do have "$t" || bench_die "$t is not installed"; done
size_b=$(bench_size_bytes "$SIZE") || bench_die "SIZE=$SIZE is not a size"
dirty_b=$(bench_size_bytes "$DIRTY") || bench_die "DIRTY=$DIRTY is not a size"

TMP_DIR=$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/bench-resync-load.XXXXXX")
CFG_FILE=$TMP_DIR/r.toml
CTL=""
STARTED=0

# shellcheck disable=SC2317  # invoked through the EXIT trap
cleanup() {
    local rc=$? n pid
    trap - EXIT INT TERM
    set +e
    if ((STARTED)); then
        for n in alpha beta; do
            pid=$("$CTL" -c "$CFG_FILE" -n "$n" status --json 2>/dev/null |
                python3 -c 'import json,sys; print(json.load(sys.stdin).get("pid") or "")' 2>/dev/null)
            "$CTL" -c "$CFG_FILE" -n "$n" down --force >/dev/null 2>&1
            if [[ -n $pid ]] && ! wait_pid_gone "$pid" 10; then
                bench_log "$n (pid $pid) did not stop: SIGKILL"
                kill -KILL "$pid" 2>/dev/null
            fi
        done
    fi
    if ((rc == 1)); then
        for f in "$TMP_DIR"/*.log; do
            [[ -s $f ]] && { bench_log "---- tail of $f ----"; tail -n 20 "$f" >&2; }
        done
    fi
    if [[ $KEEP_TMP == 1 ]]; then bench_log "keeping $TMP_DIR"; else rm -rf "$TMP_DIR"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -n ${BLOCKREP_BIN_DIR:-} ]]; then
    snapshot_blockrep "$BLOCKREP_BIN_DIR" "$TMP_DIR/bin" || bench_die "no binaries in $BLOCKREP_BIN_DIR"
else
    build_blockrep "$REPO_DIR" 10 30 || bench_die "the build failed"
    snapshot_blockrep "$REPO_DIR/target/release" "$TMP_DIR/bin" || bench_die "no binaries"
fi
CTL=$TMP_DIR/bin/blockrep-ctl
export BLOCKREP_BIN=$TMP_DIR/bin/blockrep

read -r P1 P2 P3 P4 <<<"$(free_ports 4)"
truncate -s "$size_b" "$TMP_DIR/alpha.img" "$TMP_DIR/beta.img"
cat >"$CFG_FILE" <<EOF
[resource]
name = "bench"
protocol = "C"
secret = "bench-resync-load-secret"
resync-rate = "$RESYNC_RATE"
journal-size = "$JOURNAL_SIZE"
csums = $([[ $MODE == csum ]] && echo true || echo false)
[node.alpha]
backing = "$TMP_DIR/alpha.img"
meta = "internal"
replication = "127.0.0.1:$P1"
export = "127.0.0.1:$P2"
control = "$TMP_DIR/alpha.sock"
log-file = "$TMP_DIR/alpha.log"
[node.beta]
backing = "$TMP_DIR/beta.img"
meta = "internal"
replication = "127.0.0.1:$P3"
export = "127.0.0.1:$P4"
control = "$TMP_DIR/beta.sock"
log-file = "$TMP_DIR/beta.log"
EOF
ctl() { "$CTL" -c "$CFG_FILE" -n "$@"; }
repl() { # repl NODE KEY: a field of the node's replication status
    ctl "$1" status --json | python3 -c "import json,sys; print(json.load(sys.stdin)['replication'].get('$2'))"
}

for n in alpha beta; do ctl "$n" create-md >/dev/null; done
STARTED=1
for n in alpha beta; do ctl "$n" up >/dev/null; done
ctl alpha primary --force >/dev/null
ctl alpha wait-sync --timeout 300 >/dev/null || bench_die "the initial sync did not finish"
URI="nbd://127.0.0.1:$P2/bench"

# probe LABEL: 4 KiB random writes at depth 1 for RUNTIME s; one line of figures
probe() {
    fio --name=probe --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=1 \
        --runtime="$RUNTIME" --time_based --norandommap --randrepeat=0 \
        --size="$((size_b / 2))" --output-format=json 2>/dev/null |
        sed -n '/^{/,$p' >"$TMP_DIR/probe.json"
    python3 - "$1" "$TMP_DIR/probe.json" <<'EOF'
import json, sys
w = json.load(open(sys.argv[2]))["jobs"][0]["write"]
p = w["clat_ns"]["percentile"]
print("%-10s %8.0f %8.0f %8.0f %8.0f %8.1f" % (sys.argv[1], w["iops"], p["50.000000"] / 1e3,
      p["99.000000"] / 1e3, p["99.900000"] / 1e3, w["clat_ns"]["max"] / 1e6))
EOF
}

# outage: beta away while DIRTY bytes are written to alpha, whose pages are then dropped
outage() {
    ctl beta disconnect >/dev/null
    fio --name=dirty --ioengine=nbd --uri="$URI" --rw=write --bs=1M --iodepth=8 \
        --size="$dirty_b" --refill_buffers \
        --output-format=json >/dev/null 2>&1 || bench_die "the outage's writes failed"
    drop_pages "$TMP_DIR/alpha.img"
}

# drop_pages FILE...: the files' pages out of the page cache (DROP=all: every clean page and
# the filesystem's metadata caches), so what reads them next reads the disk
drop_pages() {
    python3 - "$@" <<'EOF'
import os, sys
for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
EOF
    if [[ $DROP == all ]]; then
        sync
        echo 3 >/proc/sys/vm/drop_caches || bench_die "DROP=all needs root"
    fi
}

verify_state() {
    ctl alpha status --json | python3 -c "import json,sys; v=json.load(sys.stdin)['replication'].get('verify') or {}; print(v.get('state', ''), v.get('differ_regions', 0))"
}

printf '%-10s %8s %8s %8s %8s %8s\n' state IOPS "p50 us" "p99 us" "p99.9 us" "max ms" >"$TMP_DIR/table"
bad=0
if [[ $MODE == verify ]]; then
    # Data for the verify to read: the outage's writes, resynced, then every page dropped.
    outage
    ctl beta connect >/dev/null
    ctl alpha wait-sync --timeout 300 >/dev/null || bench_die "the resync before the verify did not finish"
fi
for ((r = 1; r <= ROUNDS; r++)); do
    bench_log "round $r of $ROUNDS: in sync"
    probe "in-sync" >>"$TMP_DIR/table"
    if [[ $MODE == verify ]]; then
        drop_pages "$TMP_DIR/alpha.img" "$TMP_DIR/beta.img"
        bench_log "round $r of $ROUNDS: verify at $RESYNC_RATE"
        ctl alpha verify --no-wait >/dev/null || bench_die "verify did not start"
        for ((i = 0; i < 300; i++)); do
            [[ $(verify_state) == running* ]] && break
            sleep 0.1
        done
        probe "verify" >>"$TMP_DIR/table"
        if [[ $(verify_state) != running* ]]; then
            bench_log "round $r: the verify ended before the probe did (lower RESYNC_RATE or raise SIZE)"
        fi
        for ((i = 0; i < 3000; i++)); do
            [[ $(verify_state) == running* || $(verify_state) == pending* ]] || break
            sleep 0.1
        done
        read -r vstate vdiffer <<<"$(verify_state)"
        if [[ $vstate != done || $vdiffer != 0 ]]; then
            bench_log "round $r: verify ended '$vstate' with $vdiffer differing regions"
            bad=1
        fi
        continue
    fi
    outage
    bench_log "round $r of $ROUNDS: $MODE of $DIRTY at $RESYNC_RATE"
    ctl beta connect >/dev/null
    for ((i = 0; i < 300; i++)); do
        [[ $(repl alpha connection) == sync-source ]] && break
        sleep 0.1
    done
    probe "$MODE" >>"$TMP_DIR/table"
    if [[ $(repl alpha connection) != sync-source ]]; then
        bench_log "round $r: the resync ended before the probe did (lower RESYNC_RATE or raise DIRTY)"
    fi
    ctl alpha wait-sync --timeout 300 >/dev/null || { bench_log "round $r: the resync did not finish"; bad=1; }
done
if cmp -s -n "$((size_b - 128 * 1048576))" "$TMP_DIR/alpha.img" "$TMP_DIR/beta.img"; then
    same=yes
else
    same=NO
    bad=1
fi
cat "$TMP_DIR/table"
python3 - "$TMP_DIR/table" "$MODE" <<'EOF'
import sys
rows = [l.split() for l in open(sys.argv[1]).read().splitlines()[1:]]
ins = [float(r[1]) for r in rows if r[0] == "in-sync"]
res = [float(r[1]) for r in rows if r[0] != "in-sync"]
if ins and res:
    a, b = sorted(ins)[len(ins) // 2], sorted(res)[len(res) // 2]
    print("median IOPS during the %s / in sync: %.0f / %.0f = %.2f" % (sys.argv[2], b, a, b / a))
EOF
echo "replicas identical (first SIZE-128M bytes of the files, data area): $same"
((bad == 0)) || exit 3
