#!/usr/bin/env bash
# bench-replication.sh - what replication costs: a blockrep primary replicating to a peer over
# loopback with protocols A, B and C, against a lone node without a peer.
#
# Usage: scripts/bench-replication.sh [-h|--help]
#
# Everything is configured through the environment:
#   SIZE=1G              size of each backing file (K/M/G suffixes, powers of 1024)
#   RUNTIME=10           seconds per fio workload (time based)
#   RAMP=2               fio ramp_time in seconds (not counted)
#   CONFIGS="lone A B C qemu qemu-mirror"
#                        configurations, in this order: lone = one node without a peer,
#                        A/B/C = two nodes with that replication protocol; and a reference
#                        nobody here wrote, measured in the same run: qemu = QEMU's
#                        qemu-storage-daemon exporting alpha's file over NBD (aio=io_uring,
#                        page cache, as blockrep), qemu-mirror = the same daemon exporting
#                        QEMU's quorum driver over two children, alpha's file and an NBD
#                        client to a second qemu-storage-daemon that exports beta's file: a
#                        write completes once both files have it (blockrep's protocol C,
#                        without journal, bitmap or ordering). qemu-mirror's ratio is to qemu,
#                        so "what mirroring costs on this machine" is read off a mature
#                        implementation beside blockrep's. Default: all six when
#                        qemu-storage-daemon is installed (Debian qemu-system-common /
#                        qemu-utils), else the first four
#   ROUNDS=1             run every configuration this many times, interleaved (lone A B C,
#                        lone A B C, ...; fresh nodes each time); the tables show the round
#                        with the median IOPS of each workload and configuration, and the
#                        lowest and highest IOPS over the rounds
#   WORKLOADS="..."      subset of: 4k-randwrite-qd32 4k-randwrite-qd1 1m-seqwrite-qd8
#                        4k-randwrite-fsync (default: the first three, in that order);
#                        4k-randwrite-fsync is a database's commit path: 4 KiB random
#                        writes at depth 1, each followed by a flush (fio --fsync=1, an
#                        NBD FLUSH), IOPS counting the writes
#   JOURNAL_SIZE=64M     resource journal-size (also in the lone config: same exported size)
#   INITIAL_SYNC=full    how the pair starts: full = primary --force on alpha, then the
#                        initial full sync of the (all-zero) device runs to its end before
#                        the workloads (beta's file then holds zeroed extents); skip = DRBD's
#                        new-current-uuid --clear-bitmap on the two fresh secondaries, then
#                        primary: no sync at all (beta's file stays sparse, so every first
#                        write to a block allocates it, on both nodes)
#   SYNC_WAIT=300        seconds to wait for the initial full sync
#   CONNECT_TIMEOUT=30   seconds to wait for the peer link to show "connected"
#   DRAIN_TIMEOUT=120    seconds to wait after a run for lag_writes == 0 and
#                        seq_applied == seq_written before comparing the replicas
#   SAMPLE_INTERVAL=1    seconds between status samples of the primary during a run
#                        (max lag, journal use, connection drops); 0 disables sampling
#   BENCH_OUT=FILE       also write the results as JSON to FILE
#   BLOCKREP_BIN_DIR=DIR use blockrep/blockrep-ctl from DIR instead of running
#                        `cargo build --release -p blockrep -p blockrep-ctl`
#   BUILD_TRIES=10, BUILD_RETRY_WAIT=30
#                        the build is retried (the tree may be mid-edit by someone else)
#   BLOCKREP_IO_ENGINE=auto   io-engine in the generated configs (auto|io-uring|sync)
#   BLOCKREP_DIRECT_IO=false  direct-io in the generated configs
#   BLOCKREP_ENCRYPTION=none  encryption of the peer link in the pair configs
#                        (none|aes-256-gcm): what sealing costs, against the same lone node
#   BENCH_TMPDIR=DIR     where the temp dir is created (default: $TMPDIR or /tmp)
#   KEEP_TMP=1           keep the temp dir (backing files, configs, logs, raw fio output)
#
# What it does, per configuration:
#   * fresh sparse backing files of SIZE (truncate), alpha.img and beta.img, identical
#     (all zeroes);
#   * a config with [node.alpha] and, except for lone, [node.beta], on free loopback ports
#     (replication and export), control sockets and logs in the temp dir; internal metadata;
#   * create-md on each node, up on each node; lone: primary --force on alpha; A/B/C: see
#     INITIAL_SYNC, then a wait until alpha's `status --json` shows
#     .replication.connection == "connected" and, after a full sync, out_of_sync == 0;
#   * the workloads on alpha's export (fio --ioengine=nbd --uri=nbd://127.0.0.1:PORT/bench,
#     one job, time based, ramp RAMP, --norandommap --randrepeat=0, fio's random, non-zero
#     buffers with --scramble_buffers=1, no --zero_buffers):
#       4k randwrite qd32, 4k randwrite qd1, 1m sequential write qd8;
#   * qemu / qemu-mirror: the daemons started with --daemonize and a pid file, the files cut
#     to the size blockrep exports; after each qemu-mirror run the two files are compared;
#   * after each replicated run: alpha's status right after fio (lag_writes at the end), a
#     wait until the link drained, then bytes_sent over the run and `cmp -n DEVSIZE` of the two
#     backing files (the exported range starts at offset 0; the metadata behind it differs by
#     design). After every run alpha's exported range is also checked to be not all zeroes;
#   * down on alpha, then beta; the daemons are waited for by pid.
# The blockrep binaries are copied into the temp dir first, so a rebuild of target/release
# while the benchmark runs cannot mix binaries.
#
# Also, per run, the CPU each I/O cost (from the end of the ramp to half a second before fio
# ends; I/Os in that window at fio's mean rate): fio and each daemon (/proc/PID/stat, fio's
# process tree, every thread, io_uring workers included),
# the rest of the machine (kernel writeback, softirq threads, ...), the idle share, and the
# steal share (CPU time the hypervisor gave to other guests: a run with 5 % or more was
# disturbed by the host, and is left out of the median when another round was not). "CPU
# bound" is what the machine could do if it never idled: CPUs / (busy µs per I/O), also as a
# ratio to the lone node's measured IOPS: the most that configuration's code could reach
# here. A pair far below its bound waits (placement, latency) rather than works. The machine's
# figures are sampled at the clock tick and the processes' are not, so "other" carries a few
# µs of error either way at depth 1 (a few hundred ticks in the window).
#
# Prints: workload | config | IOPS | MiB/s | p99 µs | ratio (IOPS, to lone; qemu-mirror's to
# qemu); the replication details (lag at the end, bytes sent, drain time, identical
# replicas); "replicas identical: yes/no" per configuration; with the QEMU reference, the
# mirroring cost of both side by side; the issue's goals (C >= 0.6 at 4k qd32 and >= 0.8 at 1M seq,
# A >= 0.8 and >= 0.9) with PASS/FAIL (PASS also needs identical replicas); warnings and
# errors found in the daemons' logs.
#
# Exit status: 0 when every run succeeded and every replica was identical, 1 on setup errors,
# 2 if some fio run failed, 3 if some replica differed or did not drain (the tables are still
# printed). Missed goals do not change the exit status. On every exit (trap) the nodes are
# brought down, the daemons stopped by pid and the temp dir removed.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
REPORT_PY="$SCRIPT_DIR/bench-lib/replication_report.py"
export BENCH_NAME=bench-replication
# shellcheck source-path=SCRIPTDIR source=bench-lib/common.sh disable=SC1091
source "$SCRIPT_DIR/bench-lib/common.sh"
log() { bench_log "$@"; }
die() { bench_die "$@"; }

usage() {
    sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    "") ;;
    *) echo "bench-replication.sh: unknown argument: $1 (see --help)" >&2; exit 64 ;;
esac

SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-10}
ROUNDS=${ROUNDS:-1}
RAMP=${RAMP:-2}
ALL_CONFIGS="lone A B C qemu qemu-mirror"
if [[ -z ${CONFIGS:-} ]]; then
    if command -v qemu-storage-daemon >/dev/null 2>&1; then
        CONFIGS=$ALL_CONFIGS
    else
        CONFIGS="lone A B C"
        printf '[bench-replication] %s\n' "no qemu-storage-daemon: the QEMU reference (qemu, qemu-mirror) is left out" >&2
    fi
fi
ALL_WORKLOADS="4k-randwrite-qd32 4k-randwrite-qd1 1m-seqwrite-qd8 4k-randwrite-fsync"
WORKLOADS=${WORKLOADS:-4k-randwrite-qd32 4k-randwrite-qd1 1m-seqwrite-qd8}
JOURNAL_SIZE=${JOURNAL_SIZE:-64M}
INITIAL_SYNC=${INITIAL_SYNC:-full}
SYNC_WAIT=${SYNC_WAIT:-300}
CONNECT_TIMEOUT=${CONNECT_TIMEOUT:-30}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-120}
SAMPLE_INTERVAL=${SAMPLE_INTERVAL:-1}
BENCH_OUT=${BENCH_OUT:-}
BUILD_TRIES=${BUILD_TRIES:-10}
BUILD_RETRY_WAIT=${BUILD_RETRY_WAIT:-30}
BLOCKREP_IO_ENGINE=${BLOCKREP_IO_ENGINE:-auto}
BLOCKREP_DIRECT_IO=${BLOCKREP_DIRECT_IO:-false}
BLOCKREP_ENCRYPTION=${BLOCKREP_ENCRYPTION:-none}
KEEP_TMP=${KEEP_TMP:-0}
RESOURCE=bench
SECRET=bench-replication-secret

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
is_pos() { [[ $1 =~ ^[0-9]+$ ]] && ((10#$1 > 0)); }
is_pos "$RUNTIME" || die "RUNTIME must be a positive integer (seconds)"
is_pos "$ROUNDS" || die "ROUNDS must be a positive integer"
[[ $INITIAL_SYNC == full || $INITIAL_SYNC == skip ]] || die "INITIAL_SYNC must be full or skip"
is_uint "$RAMP" || die "RAMP must be a non-negative integer (seconds)"
is_pos "$CONNECT_TIMEOUT" || die "CONNECT_TIMEOUT must be a positive integer"
is_pos "$DRAIN_TIMEOUT" || die "DRAIN_TIMEOUT must be a positive integer"
is_uint "$SAMPLE_INTERVAL" || die "SAMPLE_INTERVAL must be a non-negative integer (seconds)"
is_pos "$BUILD_TRIES" || die "BUILD_TRIES must be a positive integer"
is_uint "$BUILD_RETRY_WAIT" || die "BUILD_RETRY_WAIT must be a non-negative integer"
for w in $WORKLOADS; do
    [[ " $ALL_WORKLOADS " == *" $w "* ]] || die "unknown workload '$w' (known: $ALL_WORKLOADS)"
done
for c in $CONFIGS; do
    [[ " $ALL_CONFIGS " == *" $c "* ]] || die "unknown config '$c' (known: $ALL_CONFIGS)"
done
[[ -n ${WORKLOADS// /} ]] || die "WORKLOADS is empty"
[[ -n ${CONFIGS// /} ]] || die "CONFIGS is empty"
case $BLOCKREP_IO_ENGINE in auto | io-uring | sync) ;; *) die "BLOCKREP_IO_ENGINE: auto|io-uring|sync" ;; esac
case $BLOCKREP_DIRECT_IO in true | false) ;; *) die "BLOCKREP_DIRECT_IO: true|false" ;; esac
case $BLOCKREP_ENCRYPTION in none | aes-256-gcm) ;; *) die "BLOCKREP_ENCRYPTION: none|aes-256-gcm" ;; esac

FILE_SIZE=$(bench_size_bytes "$SIZE") || die "cannot parse SIZE=$SIZE"
JOURNAL_BYTES=$(bench_size_bytes "$JOURNAL_SIZE") || die "cannot parse JOURNAL_SIZE=$JOURNAL_SIZE"
((FILE_SIZE % 1048576 == 0)) || die "SIZE must be a multiple of 1M"
((FILE_SIZE >= JOURNAL_BYTES + 128 * 1024 * 1024)) ||
    die "SIZE must be at least JOURNAL_SIZE + 128M (the metadata lives in the backing file)"

# ---------------------------------------------------------------- tools
missing=()
have fio || missing+=(fio)
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]] && have apt-get; then
        log "missing: ${missing[*]}; running: apt-get install -y fio"
        { DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y fio >&2; } || log "apt-get install failed"
    else
        log "missing: ${missing[*]} (not root: install fio yourself)"
    fi
fi
have fio || die "fio is required"
if [[ " $CONFIGS " == *" qemu"* ]]; then
    have qemu-storage-daemon || die "CONFIGS has a qemu reference but there is no qemu-storage-daemon"
fi
for t in python3 cmp numfmt truncate timeout; do
    have "$t" || die "$t is required"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd ioengine (needs libnbd)"

# ---------------------------------------------------------------- state + cleanup
TMP_DIR=
BIN=
CTL=
CFG_FILE=
UP_NODES=()     # nodes of the current config that may be up, in down order (alpha first)
QEMU_PIDS=()    # qemu-storage-daemon pids of the current config (stopped by pid)
DAEMON_PIDS=()  # daemon pids of the current config (from status --json)
DAEMON_NAMES=()
SAMPLER_PID=

node_down() { # node_down NODE
    log "blockrep-ctl down ($1)"
    timeout 60 "$CTL" -c "$CFG_FILE" -n "$1" down >&2 || log "blockrep-ctl down $1 failed"
}

stop_sampler() {
    [[ -n $SAMPLER_PID ]] || return 0
    kill "$SAMPLER_PID" 2>/dev/null || true
    wait "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=
}

# Down every node of the current config, then make sure its daemons are gone.
config_down() {
    local n i
    stop_sampler
    for n in "${UP_NODES[@]}"; do
        node_down "$n"
    done
    UP_NODES=()
    for i in "${!QEMU_PIDS[@]}"; do
        stop_pid "${QEMU_PIDS[$i]}" "qemu-storage-daemon"
    done
    QEMU_PIDS=()
    for i in "${!DAEMON_PIDS[@]}"; do
        wait_pid_gone "${DAEMON_PIDS[$i]}" 10 || stop_pid "${DAEMON_PIDS[$i]}" "${DAEMON_NAMES[$i]}"
    done
    DAEMON_PIDS=()
    DAEMON_NAMES=()
}

# shellcheck disable=SC2317  # invoked through the EXIT trap
cleanup() {
    local rc=$? f
    trap - EXIT INT TERM
    set +e
    if [[ -n $CTL && -n $CFG_FILE ]] || ((${#QEMU_PIDS[@]})); then config_down; fi
    if [[ -n $TMP_DIR && -d $TMP_DIR ]]; then
        if ((rc == 1)); then
            for f in "$TMP_DIR"/*/*.log; do
                [[ -s $f ]] || continue
                log "---- tail of ${f#"$TMP_DIR"/} ----"
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

TMP_DIR=$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/bench-repl.XXXXXX")
# control sockets live in the temp dir: keep their paths below the 108-byte sun_path limit
((${#TMP_DIR} <= 70)) || die "temp dir path too long for control sockets: $TMP_DIR (set BENCH_TMPDIR)"
MANIFEST=$TMP_DIR/manifest.tsv
: >"$MANIFEST"

# ---------------------------------------------------------------- blockrep binaries
if [[ -n ${BLOCKREP_BIN_DIR:-} ]]; then
    SRC_BIN=$BLOCKREP_BIN_DIR
else
    build_blockrep "$REPO_DIR" "$BUILD_TRIES" "$BUILD_RETRY_WAIT" || die "cargo build failed $BUILD_TRIES times"
    SRC_BIN=$REPO_DIR/target/release
fi
BIN=$TMP_DIR/bin
snapshot_blockrep "$SRC_BIN" "$BIN" || die "cannot copy blockrep / blockrep-ctl from $SRC_BIN"
CTL=$BIN/blockrep-ctl
BLOCKREP_VERSION=$("$BIN/blockrep" --version 2>/dev/null | head -n1 || true)
BLOCKREP_SHA=$(sha256sum "$BIN/blockrep" | cut -c1-16)
GIT_REV=$(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$REPO_DIR" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    GIT_REV="$GIT_REV+dirty"
fi
log "binaries: $SRC_BIN (${BLOCKREP_VERSION:-?}, sha256 $BLOCKREP_SHA, tree $GIT_REV), copied to $BIN"

# ---------------------------------------------------------------- helpers
ctl() { # ctl NODE ARGS...
    local node=$1
    shift
    timeout 60 "$CTL" -c "$CFG_FILE" -n "$node" "$@"
}
status_to() { # status_to NODE FILE: status --json into FILE
    timeout 10 "$CTL" -c "$CFG_FILE" -n "$1" status --json >"$2" 2>/dev/null
}
jget() { python3 "$REPORT_PY" get "$@"; }
now() { date +%s.%N; }
elapsed() { python3 -c 'import sys; print(f"{float(sys.argv[2]) - float(sys.argv[1]):.2f}")' "$1" "$(now)"; }

workload_spec() { # name -> "rw bs iodepth dir fdatasync-every"
    case $1 in
        4k-randwrite-qd32) echo "randwrite 4k 32 write 0" ;;
        4k-randwrite-qd1) echo "randwrite 4k 1 write 0" ;;
        1m-seqwrite-qd8) echo "write 1m 8 write 0" ;;
        4k-randwrite-fsync) echo "randwrite 4k 1 write 1" ;;
    esac
}

write_config() { # write_config CONFIG DIR
    local cfg=$1 dir=$2 protocol
    local ea ra eb rb
    read -r ea ra eb rb < <(free_ports 4) || return 1
    EXPORT_PORT=$ea
    protocol=$cfg
    [[ $cfg == lone ]] && protocol=C
    {
        echo "[resource]"
        echo "name = \"$RESOURCE\""
        echo "protocol = \"$protocol\""
        [[ $cfg == lone ]] || echo "secret = \"$SECRET\""
        [[ $cfg == lone ]] || echo "encryption = \"$BLOCKREP_ENCRYPTION\""
        echo "io-engine = \"$BLOCKREP_IO_ENGINE\""
        echo "direct-io = $BLOCKREP_DIRECT_IO"
        echo "journal-size = \"$JOURNAL_SIZE\""
        echo
        echo "[node.alpha]"
        echo "backing = \"$dir/alpha.img\""
        echo "meta = \"internal\""
        echo "replication = \"127.0.0.1:$ra\""
        echo "export = \"127.0.0.1:$ea\""
        echo "control = \"$dir/alpha.sock\""
        echo "log-file = \"$dir/alpha.log\""
        if [[ $cfg != lone ]]; then
            echo
            echo "[node.beta]"
            echo "backing = \"$dir/beta.img\""
            echo "meta = \"internal\""
            echo "replication = \"127.0.0.1:$rb\""
            echo "export = \"127.0.0.1:$eb\""
            echo "control = \"$dir/beta.sock\""
            echo "log-file = \"$dir/beta.log\""
        fi
    } >"$CFG_FILE"
    local p
    for p in "$ea" "$ra" "$eb" "$rb"; do
        if port_busy "$p"; then log "port $p taken meanwhile"; return 1; fi
    done
}

# setup_config CONFIG: backing files, config, create-md, up, primary, connected.
# Returns non-zero (after logging why) instead of exiting, so other configs still run.
setup_config() {
    local cfg=$1 dir node nodes st pid role size conn t0 deadline
    dir=$(cfg_dir "$cfg")
    nodes=(alpha)
    [[ $cfg == lone ]] || nodes+=(beta)
    mkdir -p "$dir/runs" || return 1
    CFG_FILE=$dir/$RESOURCE.toml
    for node in "${nodes[@]}"; do
        truncate -s "$FILE_SIZE" "$dir/$node.img" || return 1
    done
    write_config "$cfg" "$dir" || return 1
    for node in "${nodes[@]}"; do
        if ! ctl "$node" create-md >&2; then
            log "$cfg: create-md on $node refused, retrying with --force (fresh file)"
            ctl "$node" create-md --force >&2 || { log "$cfg: create-md on $node failed"; return 1; }
        fi
    done
    for node in "${nodes[@]}"; do
        UP_NODES+=("$node") # from here on config_down runs `down`, also if `up` fails halfway
        ctl "$node" up >&2 || { log "$cfg: up on $node failed"; return 1; }
        st=$dir/status-$node.json
        status_to "$node" "$st" || { log "$cfg: status on $node failed"; return 1; }
        pid=$(jget "$st" pid) || return 1
        if is_pos "$pid"; then
            DAEMON_PIDS+=("$pid")
            DAEMON_NAMES+=("blockrep $cfg/$node")
        else
            log "$cfg: status of $node has no pid; relying on blockrep-ctl down"
        fi
    done
    if [[ $cfg == lone || $INITIAL_SYNC == full ]]; then
        ctl alpha primary --force >&2 || { log "$cfg: primary --force on alpha failed"; return 1; }
    else
        # Both files are new and all zeroes: skip the initial full sync (DRBD's
        # new-current-uuid --clear-bitmap), so that no resync runs beside the workloads and
        # the lone node and the pair start from the same page-cache state. It needs the two
        # secondaries connected.
        deadline=$((SECONDS + CONNECT_TIMEOUT))
        until ctl alpha new-current-uuid --clear-bitmap >&2; do
            if ((SECONDS >= deadline)); then
                log "$cfg: new-current-uuid --clear-bitmap on alpha kept failing"
                return 1
            fi
            sleep 0.2
        done
        ctl alpha primary >&2 || { log "$cfg: primary on alpha failed"; return 1; }
    fi
    st=$dir/status-alpha.json
    status_to alpha "$st" || return 1
    read -r role size < <(jget "$st" role size) || return 1
    [[ $role == primary ]] || { log "$cfg: alpha's role is '$role' after its promotion"; return 1; }
    is_pos "$size" || { log "$cfg: alpha's status reports no size"; return 1; }
    DEV_SIZE=$size
    if [[ $cfg != lone ]]; then
        t0=$(now)
        deadline=$((SECONDS + CONNECT_TIMEOUT))
        while :; do
            status_to alpha "$st" || return 1
            conn=$(jget "$st" replication.connection) || return 1
            # (sync-source: connected, the initial full sync running)
            [[ $conn == connected || $conn == sync-source ]] && break
            if ((SECONDS >= deadline)); then
                log "$cfg: not connected after ${CONNECT_TIMEOUT}s (connection: $conn; last_error: $(jget "$st" replication.last_error))"
                return 1
            fi
            sleep 0.2
        done
        log "$cfg: connected after $(elapsed "$t0")s"
        # The initial full sync (INITIAL_SYNC=full) ends before the workloads start.
        deadline=$((SECONDS + SYNC_WAIT))
        while :; do
            status_to alpha "$st" || return 1
            conn=$(jget "$st" replication.connection) || return 1
            oos=$(jget "$st" replication.out_of_sync) || return 1
            [[ $conn == connected && $oos == 0 ]] && break
            if ((SECONDS >= deadline)); then
                log "$cfg: the initial sync did not finish within ${SYNC_WAIT}s (connection $conn, out_of_sync $oos)"
                return 1
            fi
            sleep 0.2
        done
        log "$cfg: in sync after $(elapsed "$t0")s"
        status_to beta "$dir/status-beta.json" || return 1
        read -r role size < <(jget "$dir/status-beta.json" role size) || return 1
        [[ $role == secondary ]] || { log "$cfg: beta's role is '$role'"; return 1; }
        [[ $size == "$DEV_SIZE" ]] || { log "$cfg: beta exports $size bytes, alpha $DEV_SIZE"; return 1; }
    fi
    # status "up": true means the export listens; no test connection (the daemon would log
    # every aborted handshake as a warning)
    [[ $(jget "$st" up) == True ]] || { log "$cfg: alpha is not up"; return 1; }
    log "$cfg: alpha primary (pid ${DAEMON_PIDS[0]:-?}, engine $(jget "$st" engine)), exported size $DEV_SIZE of $FILE_SIZE"
}

is_qemu() { [[ $1 == qemu || $1 == qemu-mirror ]]; }

# qemu_daemon NAME DIR ARGS...: starts qemu-storage-daemon --daemonize with ARGS (its pid
# file DIR/NAME.pid, its messages in DIR/NAME.log); records the pid for config_down.
qemu_daemon() {
    local name=$1 dir=$2 pid
    shift 2
    rm -f "$dir/$name.pid"
    if ! qemu-storage-daemon "$@" --pidfile "$dir/$name.pid" --daemonize >"$dir/$name.log" 2>&1; then
        log "qemu-storage-daemon ($name) failed: $(tail -n 3 "$dir/$name.log" | tr '\n' ' ')"
        return 1
    fi
    pid=$(cat "$dir/$name.pid" 2>/dev/null || true)
    if ! is_pos "$pid"; then
        # Started, but no pid to stop it by: found by its pid file's path instead.
        log "qemu-storage-daemon ($name): no pid in $dir/$name.pid; stopping it"
        pkill -f -- "--pidfile $dir/$name.pid" 2>/dev/null || true
        return 1
    fi
    QEMU_PIDS+=("$pid")
    DAEMON_PIDS+=("$pid")
    DAEMON_NAMES+=("qemu/$name")
}

# setup_qemu CONFIG: the QEMU reference. Its files are cut to the size blockrep exports (the
# lone node's, when it ran first), so that fio spreads its writes over the same range.
setup_qemu() {
    local cfg=$1 dir ea eb node size
    dir=$(cfg_dir "$cfg")
    mkdir -p "$dir/runs" || return 1
    size=${DEV_SIZE:-$FILE_SIZE}
    read -r ea eb < <(free_ports 2) || return 1
    EXPORT_PORT=$ea
    for node in alpha beta; do
        [[ $cfg == qemu && $node == beta ]] && continue
        truncate -s "$size" "$dir/$node.img" || return 1
    done
    local file=(driver=file,filename="$dir/alpha.img",cache.direct=off,aio=io_uring)
    if [[ $cfg == qemu ]]; then
        qemu_daemon alpha "$dir" --blockdev "${file[0]},node-name=disk" \
            --nbd-server "addr.type=inet,addr.host=127.0.0.1,addr.port=$ea" \
            --export "type=nbd,id=exp,node-name=disk,name=$RESOURCE,writable=on" || return 1
    else
        qemu_daemon beta "$dir" \
            --blockdev "driver=file,node-name=disk,filename=$dir/beta.img,cache.direct=off,aio=io_uring" \
            --nbd-server "addr.type=inet,addr.host=127.0.0.1,addr.port=$eb" \
            --export "type=nbd,id=exp,node-name=disk,name=$RESOURCE,writable=on" || return 1
        # vote-threshold=2 of 2 children: a write is complete once both have it; reads
        # (none here) from the first child only
        qemu_daemon alpha "$dir" --blockdev "${file[0]},node-name=local" \
            --blockdev "driver=nbd,node-name=peer,server.type=inet,server.host=127.0.0.1,server.port=$eb,export=$RESOURCE" \
            --blockdev "driver=quorum,node-name=mirror,vote-threshold=2,read-pattern=fifo,children.0=local,children.1=peer" \
            --nbd-server "addr.type=inet,addr.host=127.0.0.1,addr.port=$ea" \
            --export "type=nbd,id=exp,node-name=mirror,name=$RESOURCE,writable=on" || return 1
    fi
    local i
    for ((i = 0; i < 300; i++)); do
        port_busy "$ea" && break
        sleep 0.1
    done
    port_busy "$ea" || { log "$cfg: qemu-storage-daemon is not listening on 127.0.0.1:$ea"; return 1; }
    QEMU_SIZE=$size
    log "$cfg: qemu-storage-daemon $(qemu-storage-daemon --version | head -n1 | awk '{print $3}') exporting $size bytes on 127.0.0.1:$ea"
}

# tree_ticks PID: user + system ticks of PID and all its descendants (every thread).
tree_ticks() {
    local p t=0 c
    for p in $(pgrep -P "$1" 2>/dev/null); do
        c=$(tree_ticks "$p")
        t=$((t + c))
    done
    c=$(awk '{print $14+$15}' "/proc/$1/stat" 2>/dev/null || echo 0)
    echo $((t + ${c:-0}))
}

# cpu_snapshot FILE [FIO_PID]: the time (/proc/uptime), the machine's idle and total CPU ticks
# (/proc/stat; and steal: time the hypervisor gave to others), the ticks (user + system, every thread) of fio's process tree and of each daemon
# of the current config, one "name value" a line. Both snapshots are taken while fio runs, so
# every figure covers the same window.
cpu_snapshot() {
    local i
    {
        awk '{print "now", $1}' /proc/uptime
        awk '/^cpu /{t=0; for (i=2;i<=NF;i++) t+=$i; print "machine", $5+$6, t, $9}' /proc/stat
        [[ -n ${2:-} ]] && echo "fio $(tree_ticks "$2")"
        for i in "${!DAEMON_PIDS[@]}"; do
            awk -v n="${DAEMON_NAMES[$i]##*/}" '{print n, $14+$15}' "/proc/${DAEMON_PIDS[$i]}/stat" 2>/dev/null
        done
    } >"$1"
}

daemons_alive() {
    local p
    for p in "${DAEMON_PIDS[@]}"; do
        kill -0 "$p" 2>/dev/null || return 1
    done
}

FAILED=0
# run_one CONFIG WORKLOAD
run_one() {
    local cfg=$1 w=$2 dir rundir rw bs qd wdir raw rc load summary
    dir=$(cfg_dir "$cfg")
    local drained=skipped drain_s=- identical=skipped cmp_msg='' nonzero alive t0 deadline
    local size=$DEV_SIZE
    is_qemu "$cfg" && size=$QEMU_SIZE
    local syncs
    read -r rw bs qd wdir syncs < <(workload_spec "$w")
    rundir=$dir/runs/$w
    mkdir -p "$rundir"
    raw=$rundir/fio.out
    if ! daemons_alive; then
        log "$cfg: a daemon is gone; $w not run"
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t\t%s\t%s\n' "$w" "$cfg" "$wdir" "$bs" "$qd" "$raw" 99 "$rundir" "$ROUND" >>"$MANIFEST"
        FAILED=1
        return 0
    fi
    log "$cfg: $w (${RUNTIME}s + ${RAMP}s ramp)"
    is_qemu "$cfg" || status_to alpha "$rundir/before.json" || log "$cfg: status before $w failed"
    # write back what the previous run dirtied, so no run pays for another's writeback
    if [[ -e $dir/beta.img ]]; then sync "$dir/alpha.img" "$dir/beta.img"; else sync "$dir/alpha.img"; fi
    load=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || true)
    if [[ $cfg != lone ]] && ! is_qemu "$cfg" && ((SAMPLE_INTERVAL > 0)); then
        (
            while :; do
                timeout 10 "$CTL" -c "$CFG_FILE" -n alpha status --json >>"$rundir/samples.json" 2>/dev/null || true
                sleep "$SAMPLE_INTERVAL"
            done
        ) &
        SAMPLER_PID=$!
    fi
    rm -f "$rundir/cpu0" "$rundir/cpu1"
    rc=0
    timeout $((RUNTIME + RAMP + 120)) \
        fio --name="$w" --ioengine=nbd --uri="nbd://127.0.0.1:$EXPORT_PORT/$RESOURCE" \
        --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 --fsync="$syncs" \
        --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
        --norandommap --randrepeat=0 --scramble_buffers=1 \
        --output-format=json >"$raw" 2>"$raw.err" &
    local fio_pid=$!
    # CPU use over the measured part of the run: from the end of the ramp until half a second
    # before fio's end, both inside the run, fio's own process tree measured like the daemons
    (sleep "$RAMP" && cpu_snapshot "$rundir/cpu0" "$fio_pid" &&
        sleep "$(awk -v r="$RUNTIME" 'BEGIN{print (r > 1 ? r - 0.5 : r / 2)}')" &&
        cpu_snapshot "$rundir/cpu1" "$fio_pid") &
    local cpu_pid=$!
    wait "$fio_pid" || rc=$?
    wait "$cpu_pid" 2>/dev/null || true
    stop_sampler
    is_qemu "$cfg" || status_to alpha "$rundir/end.json" || log "$cfg: status after $w failed"

    if [[ $cfg == qemu-mirror ]]; then
        # QEMU's quorum completes a write only once both children have it: nothing lags
        # behind fio's end, so the files are compared right away.
        drained=yes
        drain_s=0
        if cmp_msg=$(cmp -n "$size" "$dir/alpha.img" "$dir/beta.img" 2>&1); then
            identical=yes
        else
            identical=no
            log "$cfg: REPLICAS DIFFER after $w: $cmp_msg"
        fi
    elif [[ $cfg != lone && $cfg != qemu ]]; then
        t0=$(now)
        deadline=$((SECONDS + DRAIN_TIMEOUT))
        drained=no
        while :; do
            if status_to alpha "$rundir/drained.json" &&
                python3 "$REPORT_PY" drained "$rundir/drained.json"; then
                drained=yes
                break
            fi
            ((SECONDS < deadline)) || break
            sleep 0.2
        done
        drain_s=$(elapsed "$t0")
        status_to beta "$rundir/beta.json" || log "$cfg: status of beta failed"
        if [[ $drained != yes ]]; then
            log "$cfg: link not drained after ${DRAIN_TIMEOUT}s: $(jget "$rundir/drained.json" \
                replication.connection replication.seq_written replication.seq_applied \
                replication.lag_writes replication.out_of_sync replication.last_error 2>/dev/null)"
        fi
        if cmp_msg=$(cmp -n "$DEV_SIZE" "$dir/alpha.img" "$dir/beta.img" 2>&1); then
            identical=yes
        else
            identical=no
            log "$cfg: REPLICAS DIFFER after $w: $cmp_msg"
        fi
    fi
    if cmp -s -n "$size" "$dir/alpha.img" /dev/zero; then
        nonzero=no
        log "$cfg: alpha's exported range is still all zeroes after $w"
    else
        nonzero=yes
    fi
    alive=yes
    daemons_alive || alive=no
    {
        echo "drained=$drained"
        echo "drain_s=$drain_s"
        echo "identical=$identical"
        echo "cmp=${cmp_msg//$'\n'/ }"
        echo "nonzero=$nonzero"
        echo "alive=$alive"
    } >"$rundir/check.env"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$w" "$cfg" "$wdir" "$bs" "$qd" "$raw" "$rc" "$load" "$rundir" "$ROUND" >>"$MANIFEST"
    if ((rc == 0)) && summary=$(python3 "$SCRIPT_DIR/bench-lib/fio_report.py" one "$raw" "$wdir" 2>/dev/null); then
        if [[ $cfg == lone || $cfg == qemu ]]; then
            log "    $summary"
        elif [[ $cfg == qemu-mirror ]]; then
            log "    $summary; identical $identical"
        else
            log "    $summary; lag at end $(jget "$rundir/end.json" replication.lag_writes 2>/dev/null || echo ?), drained $drained in ${drain_s}s, identical $identical"
        fi
    else
        FAILED=1
        log "    FAILED (fio status $rc): $(tail -n 3 "$raw.err" "$raw" 2>/dev/null | tr '\n' ' ' | cut -c1-300)"
    fi
    [[ $alive == yes ]] || log "$cfg: a daemon died during $w"
}

# ---------------------------------------------------------------- main loop
DEV_SIZE=
QEMU_SIZE=
EXPORT_PORT=
LOG_ARGS=()
SETUP_FAILED=0
ROUND=1
cfg_dir() { echo "$TMP_DIR/$1-r$ROUND"; }
for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
for cfg in $CONFIGS; do
    cdir=$(cfg_dir "$cfg")
    case $cfg in
        lone) what="one node, no peer" ;;
        qemu) what="reference: QEMU's qemu-storage-daemon, one node" ;;
        qemu-mirror) what="reference: QEMU's quorum over alpha's file and beta's (NBD)" ;;
        *) what="protocol $cfg, alpha -> beta" ;;
    esac
    log "==== $cfg: $what$( ((ROUNDS > 1)) && echo ", round $ROUND of $ROUNDS")"
    if is_qemu "$cfg"; then setup=setup_qemu; else setup=setup_config; fi
    if "$setup" "$cfg"; then
        for w in $WORKLOADS; do
            run_one "$cfg" "$w"
        done
    else
        SETUP_FAILED=1
        FAILED=1
        for w in $WORKLOADS; do
            read -r _ bs qd wdir _ < <(workload_spec "$w")
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t\t\t%s\n' "$w" "$cfg" "$wdir" "$bs" "$qd" "-" 98 "$ROUND" >>"$MANIFEST"
        done
        for f in "$cdir"/*.log; do
            [[ -s $f ]] || continue
            log "---- tail of ${f#"$TMP_DIR"/} ----"
            tail -n 20 "$f" >&2
        done
    fi
    config_down
    for f in "$cdir"/*.log; do
        [[ -e $f ]] && LOG_ARGS+=(--log "$cfg=$f")
    done
    [[ $KEEP_TMP == 1 ]] || rm -f "$cdir"/*.img
done
done
CFG_FILE=

# ---------------------------------------------------------------- report
report_args=(report "$MANIFEST"
    --meta "file_size=$FILE_SIZE" --meta "device_size=${DEV_SIZE:-0}"
    --meta "journal_size=$JOURNAL_BYTES"
    --meta "runtime_s=$RUNTIME" --meta "ramp_s=$RAMP" --meta "rounds=$ROUNDS"
    --meta "configs=$(xargs <<<"$CONFIGS")" --meta "workloads=$(xargs <<<"$WORKLOADS")"
    --meta "host=$(hostname)" --meta "nproc=$(nproc)"
    --meta "blockrep_version=$BLOCKREP_VERSION" --meta "blockrep_sha256_16=$BLOCKREP_SHA"
    --meta "git_rev=$GIT_REV" --meta "clk_tck=$(getconf CLK_TCK)"
    --meta "backing=sparse files (truncate), fresh per configuration, loopback peer link"
    --meta "blockrep_io_engine=$BLOCKREP_IO_ENGINE" --meta "blockrep_direct_io=$BLOCKREP_DIRECT_IO"
    --meta "blockrep_encryption=$BLOCKREP_ENCRYPTION"
    "${LOG_ARGS[@]}")
if [[ -n $BENCH_OUT ]]; then report_args+=(--json "$BENCH_OUT"); fi
echo
echo "Replication benchmark: backing files $(numfmt --to=iec "$FILE_SIZE"), device ${DEV_SIZE:-?} bytes, journal $JOURNAL_SIZE, ${RUNTIME}s per run (+${RAMP}s ramp), $ROUNDS round(s), $(nproc) CPUs, blockrep $GIT_REV"
rc=0
python3 "$REPORT_PY" "${report_args[@]}" || rc=$?
if [[ -n $BENCH_OUT ]]; then log "results written to $BENCH_OUT"; fi
if ((rc == 3)); then
    log "some replicas were not identical or did not drain"
    exit 3
fi
if ((rc != 0 || FAILED)); then
    ((SETUP_FAILED)) && log "some configurations could not be set up"
    log "some runs failed"
    exit 2
fi
exit 0
