#!/usr/bin/env bash
# bench-nbd.sh - compare blockrep's NBD export with nbdkit (and qemu-nbd) on one backing file.
#
# Usage: scripts/bench-nbd.sh [-h|--help]
#
# Everything is configured through the environment:
#   SIZE=2G              backing file size (K/M/G/T suffixes, powers of 1024)
#   RUNTIME=10           seconds per fio workload (time based)
#   RAMP=2               fio ramp_time in seconds (not counted)
#   SERVERS="blockrep nbdkit qemu-nbd"
#                        servers to run, in this order; qemu-nbd is skipped if not installed
#   WORKLOADS="..."      subset of: 4k-randwrite-qd32 4k-randwrite-qd1 4k-randread-qd32
#                        4k-randread-qd1 1m-seqwrite-qd8 (default: all, in that order)
#   BENCH_OUT=FILE       also write the results as JSON to FILE
#   BLOCKREP_BIN_DIR=DIR use blockrep/blockrep-ctl from DIR instead of running
#                        `cargo build --release -p blockrep -p blockrep-ctl`
#   BLOCKREP_IO_ENGINE=auto   io-engine in the generated config (auto|io-uring|sync)
#   BLOCKREP_DIRECT_IO=false  direct-io in the generated config
#   BENCH_TMPDIR=DIR     where the temp dir is created (default: $TMPDIR or /tmp)
#   KEEP_TMP=1           keep the temp dir (backing file, logs, raw fio output)
#
# What it does:
#   * creates a sparse file of SIZE in a fresh temp dir (truncate) and then fills it
#     completely with non-zero pseudo-random data with one sequential fio pass
#     (psync, 1 MiB blocks, --refill_buffers, fsync at the end), so reads hit real data
#     and nothing is a hole; this is much faster than dd from /dev/urandom for 2 GiB.
#   * blockrep: writes a one-node config (node "alpha", meta internal, export on a free
#     loopback port, control socket and log in the temp dir), then create-md, up,
#     primary --force, runs the workloads, then down. Its exported size (status --json
#     "size", smaller than the file because of the internal metadata) becomes the device
#     size for the other servers.
#   * nbdkit: `nbdkit file FILE --filter=truncate truncate=DEVSIZE` on the same file
#     (blockrep is down by then), so both see the same device size.
#   * qemu-nbd (if installed): --cache=writeback, raw format limited to DEVSIZE via
#     --image-opts driver=raw,size=DEVSIZE,... (the same as -f raw plus a size limit),
#     --persistent so every fio run can connect.
#   * workloads (fio --ioengine=nbd --uri=nbd://127.0.0.1:PORT/EXPORT, one job, time
#     based, ramp RAMP, --norandommap --randrepeat=0, fio's default random buffers,
#     no --refill_buffers, no --zero_buffers):
#       4k randwrite qd32, 4k randwrite qd1, 4k randread qd32, 4k randread qd1,
#       1m sequential write qd8.
#   * prints: workload | server | IOPS | MiB/s | p99 completion latency (us) |
#     blockrep/nbdkit IOPS ratio. All servers use the page cache (blockrep with
#     direct-io=false by default), the file is warm in RAM after the fill pass.
#
# Exit status: 0 when every run succeeded, 1 on setup errors, 2 if some fio runs failed
# (the table is still printed). Servers are stopped by PID, blockrep-ctl down is run and
# the temp dir removed on every exit (trap).

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
REPORT_PY="$SCRIPT_DIR/bench-lib/fio_report.py"

usage() {
    sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    "") ;;
    *) echo "bench-nbd.sh: unknown argument: $1 (see --help)" >&2; exit 64 ;;
esac

SIZE=${SIZE:-2G}
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-2}
SERVERS=${SERVERS:-blockrep nbdkit qemu-nbd}
ALL_WORKLOADS="4k-randwrite-qd32 4k-randwrite-qd1 4k-randread-qd32 4k-randread-qd1 1m-seqwrite-qd8"
WORKLOADS=${WORKLOADS:-$ALL_WORKLOADS}
BENCH_OUT=${BENCH_OUT:-}
BLOCKREP_IO_ENGINE=${BLOCKREP_IO_ENGINE:-auto}
BLOCKREP_DIRECT_IO=${BLOCKREP_DIRECT_IO:-false}
KEEP_TMP=${KEEP_TMP:-0}
RESOURCE=bench
NODE=alpha

log() { printf '[bench-nbd] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $RUNTIME =~ ^[0-9]+$ && $RUNTIME -gt 0 ]] || die "RUNTIME must be a positive integer (seconds)"
[[ $RAMP =~ ^[0-9]+$ ]] || die "RAMP must be a non-negative integer (seconds)"
for w in $WORKLOADS; do
    [[ " $ALL_WORKLOADS " == *" $w "* ]] || die "unknown workload '$w' (known: $ALL_WORKLOADS)"
done
for s in $SERVERS; do
    case $s in blockrep | nbdkit | qemu-nbd) ;; *) die "unknown server '$s'" ;; esac
done
want() { [[ " $SERVERS " == *" $1 "* ]]; }

# SIZE -> bytes (accepts 2G, 2GiB, 512M, 1073741824)
size_spec=${SIZE%iB}
size_spec=${size_spec%B}
FILE_SIZE=$(numfmt --from=iec "$size_spec" 2>/dev/null) || die "cannot parse SIZE=$SIZE"
((FILE_SIZE >= 64 * 1024 * 1024)) || die "SIZE must be at least 64M"
((FILE_SIZE % 1048576 == 0)) || die "SIZE must be a multiple of 1M"

# ---------------------------------------------------------------- tools
have() { command -v "$1" >/dev/null 2>&1; }
missing=()
have fio || missing+=(fio)
if want nbdkit && ! have nbdkit; then missing+=(nbdkit); fi
if want qemu-nbd && ! have qemu-nbd; then missing+=(qemu-utils); fi
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]] && have apt-get; then
        log "missing: ${missing[*]}; running: apt-get install -y fio nbdkit qemu-utils"
        { DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y fio nbdkit qemu-utils >&2; } ||
            log "apt-get install failed"
    else
        log "missing: ${missing[*]} (not root: install fio nbdkit qemu-utils yourself)"
    fi
fi
have fio || die "fio is required"
have python3 || die "python3 is required"
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd ioengine (needs libnbd)"
want nbdkit && ! have nbdkit && die "nbdkit is required (or drop it from SERVERS)"
if want qemu-nbd && ! have qemu-nbd; then
    log "qemu-nbd not installed: skipping it"
    SERVERS=${SERVERS//qemu-nbd/}
fi

# ---------------------------------------------------------------- blockrep binaries
if want blockrep; then
    if [[ -n ${BLOCKREP_BIN_DIR:-} ]]; then
        BIN_DIR=$BLOCKREP_BIN_DIR
    else
        log "building: cargo build --release -p blockrep -p blockrep-ctl"
        (cd "$REPO_DIR" && cargo build --release -p blockrep -p blockrep-ctl) >&2 ||
            die "cargo build failed"
        BIN_DIR=$REPO_DIR/target/release
    fi
    BLOCKREP_CTL=$BIN_DIR/blockrep-ctl
    [[ -x $BLOCKREP_CTL && -x $BIN_DIR/blockrep ]] ||
        die "no blockrep / blockrep-ctl executables in $BIN_DIR"
    # blockrep-ctl up starts the daemon; let it find the matching binary
    PATH=$BIN_DIR:$PATH
    export PATH
fi

# ---------------------------------------------------------------- state + cleanup
TMP_DIR=
SERVER_PIDS=()   # pids of servers started by us (nbdkit, qemu-nbd) and blockrep's daemon
SERVER_NAMES=()  # matching names, for messages
BLOCKREP_CFG=
BLOCKREP_UP=0

stop_pid() { # stop_pid PID NAME: TERM, wait up to 10 s, then KILL
    local pid=$1 name=$2 i
    kill -0 "$pid" 2>/dev/null || return 0
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name (pid $pid) still running: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

blockrep_down() {
    [[ $BLOCKREP_UP == 1 && -n $BLOCKREP_CFG ]] || return 0
    BLOCKREP_UP=0
    log "blockrep-ctl down"
    timeout 60 "$BLOCKREP_CTL" -c "$BLOCKREP_CFG" -n "$NODE" down >&2 ||
        log "blockrep-ctl down failed"
}

# shellcheck disable=SC2317  # invoked through the EXIT trap
cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    set +e
    blockrep_down
    for i in "${!SERVER_PIDS[@]}"; do
        stop_pid "${SERVER_PIDS[$i]}" "${SERVER_NAMES[$i]}"
    done
    if [[ -n $TMP_DIR && -d $TMP_DIR ]]; then
        if ((rc == 1)); then
            for f in "$TMP_DIR"/*.log; do
                [[ -s $f ]] || continue
                log "---- tail of $(basename "$f") ----"
                tail -n 20 "$f" >&2
            done
        fi
        if [[ $KEEP_TMP == 1 ]]; then
            log "keeping $TMP_DIR"
        else
            rm -rf "$TMP_DIR"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

TMP_DIR=$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/bench-nbd.XXXXXX")
BACKING=$TMP_DIR/backing.img
MANIFEST=$TMP_DIR/manifest.tsv
: >"$MANIFEST"
mkdir -p "$TMP_DIR/fio"

# ---------------------------------------------------------------- ports
# Four distinct free loopback ports: blockrep export, blockrep replication, nbdkit, qemu-nbd.
read -r PORT_BLOCKREP PORT_REPL PORT_NBDKIT PORT_QEMU < <(python3 - <<'EOF'
import socket
socks = []
for _ in range(4):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # wait_port PORT PID NAME
    local port=$1 pid=$2 name=$3 i
    for ((i = 0; i < 300; i++)); do
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            die "$name exited before listening on port $port"
        fi
        port_busy "$port" && return 0
        sleep 0.1
    done
    die "$name is not listening on 127.0.0.1:$port after 30 s"
}

# ---------------------------------------------------------------- backing file
log "temp dir $TMP_DIR; backing file $(numfmt --to=iec "$FILE_SIZE") (sparse, then filled with random data)"
truncate -s "$FILE_SIZE" "$BACKING"
fio --name=prefill --filename="$BACKING" --size="$FILE_SIZE" --rw=write --bs=1M \
    --ioengine=psync --refill_buffers --end_fsync=1 --output-format=terse \
    >"$TMP_DIR/prefill.out" 2>&1 || die "prefill with fio failed: $(tail -n 5 "$TMP_DIR/prefill.out")"
if [[ $(od -An -tx1 -N4096 "$BACKING" | tr -d ' 0\n') == "" ]]; then
    die "backing file still reads as zeroes after prefill"
fi
DEV_SIZE=$FILE_SIZE   # replaced by blockrep's exported size when blockrep runs

# ---------------------------------------------------------------- workloads
# name -> "rw bs iodepth dir"
workload_spec() {
    case $1 in
        4k-randwrite-qd32) echo "randwrite 4k 32 write" ;;
        4k-randwrite-qd1) echo "randwrite 4k 1 write" ;;
        4k-randread-qd32) echo "randread 4k 32 read" ;;
        4k-randread-qd1) echo "randread 4k 1 read" ;;
        1m-seqwrite-qd8) echo "write 1m 8 write" ;;
    esac
}

FAILED=0
run_workloads() { # run_workloads SERVER URI PID
    local server=$1 uri=$2 pid=$3 w rw bs qd dir raw rc summary load
    for w in $WORKLOADS; do
        read -r rw bs qd dir < <(workload_spec "$w")
        raw=$TMP_DIR/fio/$server-$w.out
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            log "$server (pid $pid) is gone; $w not run"
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n' "$w" "$server" "$dir" "$bs" "$qd" "$raw" 99 >>"$MANIFEST"
            FAILED=1
            continue
        fi
        log "$server: $w (${RUNTIME}s + ${RAMP}s ramp)"
        # write back what the previous run dirtied, so no run pays for another's writeback
        sync "$BACKING" 2>/dev/null || sync
        load=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || true)
        rc=0
        timeout $((RUNTIME + RAMP + 120)) \
            fio --name="$w" --ioengine=nbd --uri="$uri" \
            --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 \
            --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
            --norandommap --randrepeat=0 \
            --output-format=json >"$raw" 2>"$raw.err" || rc=$?
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$w" "$server" "$dir" "$bs" "$qd" "$raw" "$rc" "$load" >>"$MANIFEST"
        if ((rc == 0)) && summary=$(python3 "$REPORT_PY" one "$raw" "$dir" 2>/dev/null); then
            log "    $summary"
        else
            FAILED=1
            log "    FAILED (fio status $rc): $(tail -n 3 "$raw.err" "$raw" 2>/dev/null | tr '\n' ' ' | cut -c1-300)"
        fi
    done
}

# ---------------------------------------------------------------- blockrep
if want blockrep; then
    BLOCKREP_CFG=$TMP_DIR/$RESOURCE.toml
    cat >"$BLOCKREP_CFG" <<EOF
[resource]
name = "$RESOURCE"
protocol = "C"
secret = "bench-nbd-secret"
io-engine = "$BLOCKREP_IO_ENGINE"
direct-io = $BLOCKREP_DIRECT_IO
journal-size = "64M"
bitmap-granularity = "4K"

[node.$NODE]
backing = "$BACKING"
meta = "internal"
replication = "127.0.0.1:$PORT_REPL"
export = "127.0.0.1:$PORT_BLOCKREP"
control = "$TMP_DIR/$RESOURCE-$NODE.sock"
log-file = "$TMP_DIR/blockrep-$NODE.log"
EOF
    ctl() { "$BLOCKREP_CTL" -c "$BLOCKREP_CFG" -n "$NODE" "$@"; }
    port_busy "$PORT_BLOCKREP" && die "port $PORT_BLOCKREP taken meanwhile, rerun"

    log "blockrep: create-md"
    if ! ctl create-md >&2; then
        log "blockrep: create-md refused, retrying with --force (fresh temp file)"
        ctl create-md --force >&2 || die "blockrep-ctl create-md failed"
    fi
    log "blockrep: up"
    BLOCKREP_UP=1 # from here on cleanup runs `down`, also if `up` fails halfway
    ctl up >&2 || die "blockrep-ctl up failed"
    status=$(ctl status --json) || die "blockrep-ctl status --json failed"
    BLOCKREP_PID=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get("pid") or "")' "$status")
    if [[ $BLOCKREP_PID =~ ^[0-9]+$ ]]; then
        SERVER_PIDS+=("$BLOCKREP_PID")
        SERVER_NAMES+=(blockrep)
    else
        log "blockrep: status --json has no pid; relying on blockrep-ctl down"
        BLOCKREP_PID=
    fi
    log "blockrep: primary --force"
    ctl primary --force >&2 || die "blockrep-ctl primary --force failed"
    status=$(ctl status --json) || die "blockrep-ctl status --json failed"
    read -r b_role b_size b_engine < <(python3 -c '
import json, sys
s = json.loads(sys.argv[1])
print(s.get("role"), s.get("size"), s.get("engine"))' "$status")
    [[ $b_role == primary ]] || die "blockrep role is '$b_role' after primary --force"
    [[ $b_size =~ ^[0-9]+$ && $b_size -gt 0 ]] || die "blockrep status reports no size"
    DEV_SIZE=$b_size
    wait_port "$PORT_BLOCKREP" "$BLOCKREP_PID" blockrep
    log "blockrep: pid ${BLOCKREP_PID:-?}, engine $b_engine, exported size $DEV_SIZE of $FILE_SIZE"
    run_workloads blockrep "nbd://127.0.0.1:$PORT_BLOCKREP/$RESOURCE" "$BLOCKREP_PID"
    blockrep_down
    if [[ -n $BLOCKREP_PID ]]; then
        for ((i = 0; i < 100; i++)); do
            kill -0 "$BLOCKREP_PID" 2>/dev/null || break
            sleep 0.1
        done
        stop_pid "$BLOCKREP_PID" blockrep
    fi
fi

# ---------------------------------------------------------------- nbdkit
if want nbdkit; then
    port_busy "$PORT_NBDKIT" && die "port $PORT_NBDKIT taken meanwhile, rerun"
    log "nbdkit: file plugin, truncate to $DEV_SIZE, port $PORT_NBDKIT"
    nbdkit -f -i 127.0.0.1 -p "$PORT_NBDKIT" --filter=truncate \
        file "$BACKING" truncate="$DEV_SIZE" >"$TMP_DIR/nbdkit.log" 2>&1 &
    NBDKIT_PID=$!
    SERVER_PIDS+=("$NBDKIT_PID")
    SERVER_NAMES+=(nbdkit)
    wait_port "$PORT_NBDKIT" "$NBDKIT_PID" nbdkit
    run_workloads nbdkit "nbd://127.0.0.1:$PORT_NBDKIT/$RESOURCE" "$NBDKIT_PID"
    stop_pid "$NBDKIT_PID" nbdkit
fi

# ---------------------------------------------------------------- qemu-nbd
if want qemu-nbd; then
    port_busy "$PORT_QEMU" && die "port $PORT_QEMU taken meanwhile, rerun"
    log "qemu-nbd: raw, cache=writeback, size $DEV_SIZE, port $PORT_QEMU"
    qemu-nbd --persistent --bind=127.0.0.1 --port="$PORT_QEMU" --export-name="$RESOURCE" \
        --cache=writeback \
        --image-opts "driver=raw,size=$DEV_SIZE,file.driver=file,file.filename=$BACKING" \
        >"$TMP_DIR/qemu-nbd.log" 2>&1 &
    QEMU_PID=$!
    SERVER_PIDS+=("$QEMU_PID")
    SERVER_NAMES+=(qemu-nbd)
    wait_port "$PORT_QEMU" "$QEMU_PID" qemu-nbd
    run_workloads qemu-nbd "nbd://127.0.0.1:$PORT_QEMU/$RESOURCE" "$QEMU_PID"
    stop_pid "$QEMU_PID" qemu-nbd
fi

# ---------------------------------------------------------------- report
report_args=(report "$MANIFEST"
    --meta "file_size=$FILE_SIZE" --meta "device_size=$DEV_SIZE"
    --meta "runtime_s=$RUNTIME" --meta "ramp_s=$RAMP"
    --meta "servers=$(xargs <<<"$SERVERS")"
    --meta "host=$(hostname)" --meta "nproc=$(nproc)"
    --meta "nbdkit=$(nbdkit --version 2>/dev/null | head -n1)"
    --meta "prefill=fio sequential write, bs=1M, psync, refill_buffers (random data)"
    --meta "blockrep_io_engine=${b_engine:-}" --meta "blockrep_direct_io=$BLOCKREP_DIRECT_IO")
if have qemu-nbd; then report_args+=(--meta "qemu_nbd=$(qemu-nbd --version | head -n1)"); fi
if [[ -n $BENCH_OUT ]]; then report_args+=(--json "$BENCH_OUT"); fi
echo
echo "NBD benchmark: file $(numfmt --to=iec "$FILE_SIZE"), device $DEV_SIZE bytes, ${RUNTIME}s per run (+${RAMP}s ramp), $(nproc) CPUs"
rc=0
python3 "$REPORT_PY" "${report_args[@]}" || rc=$?
if [[ -n $BENCH_OUT ]]; then log "results written to $BENCH_OUT"; fi
if ((rc != 0 || FAILED)); then
    log "some runs failed"
    exit 2
fi
exit 0
