#!/usr/bin/env bash
# bench-resync.sh - how fast blockrep brings a peer back: the full initial sync against
# nbdcopy, and the bitmap resync after an outage against rsync of the image (what admins do
# today), with the bytes each puts on the wire.
#
# Usage: scripts/bench-resync.sh [-h|--help]
#
# Everything is configured through the environment:
#   SIZE=1G              exported device size (K/M/G suffixes, powers of 1024); the backing
#                        files are sized so that the export is SIZE after the internal metadata
#   DIRTY=1%             blocks rewritten during the outage: a percentage of the device's 4 KiB
#                        blocks ("1%", "0.5%") or a number of blocks ("2621")
#   JOURNAL_SIZE=4M      resource journal-size; small, so the outage overflows the journal and
#                        the peer needs a bitmap resync (1 % of 1 GiB is ~10.3 MiB of records)
#   SYNC_TIMEOUT=120     seconds wait-sync may take (full sync and resync each); a daemon that
#                        dies or panics meanwhile ends the wait at once
#   CONNECT_TIMEOUT=30   seconds to wait for the first peer link before the full sync
#   SEED=42              seed of the choice of rewritten blocks (their data is always fresh)
#   RSYNC_DAEMON=1       also run rsync against a loopback `rsync --daemon` (0: local only)
#   SAMPLE_INTERVAL=1    seconds between status samples of alpha while it syncs (0: none)
#   BENCH_OUT=FILE       also write the results as JSON to FILE
#   BLOCKREP_BIN_DIR=DIR use blockrep/blockrep-ctl from DIR instead of running
#                        `cargo build --release -p blockrep -p blockrep-ctl`
#   BUILD_TRIES=10, BUILD_RETRY_WAIT=30
#                        the build is retried (the tree may be mid-edit by someone else)
#   BLOCKREP_IO_ENGINE=auto   io-engine in the generated config (auto|io-uring|sync)
#   BLOCKREP_DIRECT_IO=false  direct-io in the generated config
#   BENCH_TMPDIR=DIR     where the temp dir is created (default: $TMPDIR or /tmp); needs about
#                        5 x SIZE of free space (two backing files, old/new image, rsync target)
#   KEEP_TMP=1           keep the temp dir (images, config, logs, raw outputs)
#
# What it does, in one run:
#   1. sizes the backing files (create-md on beta's file, grown until the export is SIZE), and
#      fills alpha's exported range with non-zero random data (one sequential fio pass, psync,
#      1 MiB blocks, --refill_buffers, fsync at the end). beta's file stays sparse.
#   2. nbdcopy baseline: `nbdkit -r --filter=truncate file alpha.img truncate=DEVSIZE` and
#      `nbdkit file target.img` (sparse, DEVSIZE) on free loopback ports, timed
#      `nbdcopy --flush nbd://SRC nbd://DST` (the flush because blockrep's sync target syncs
#      its disk before it declares itself up to date), then cmp, then target.img is removed.
#   3. full initial sync: a two-node config on loopback (protocol C, secret, journal JOURNAL_SIZE,
#      bitmap-granularity 4K, resync-rate "0" = unlimited, internal metadata), create-md on
#      alpha (its data already there), up on both, a wait for the link, then timed
#      `primary --force` on alpha + `wait-sync` on alpha. bytes_sent of alpha, the daemon's own
#      "resync done: N bytes in S s", cmp of the exported ranges of both backing files.
#   4. outage: `disconnect` on alpha, a copy of beta's exported range (old.img), then DIRTY
#      distinct random 4 KiB blocks rewritten with random data through alpha's NBD export
#      (bench-lib/nbd_dirty.py, libnbd, 16 in flight, one flush). alpha's status (out_of_sync,
#      journal use, bytes_sent and bytes_received) before the reconnect; then timed
#      `connect` + `wait-sync` on alpha, the counters again (wire bytes = the deltas; bytes_sent
#      is alpha's stream to beta, bytes_received beta's acks), the TCP payload of the new
#      connection from `ss -tinp` (bytes_acked/bytes_received of alpha's socket: everything,
#      handshake and bitmap exchange included), cmp of the exported ranges. Then both down.
#   5. rsync baseline: new.img = alpha's exported range; dest/old.img = a copy of old.img with an
#      old mtime; timed `rsync --inplace --no-whole-file --stats new.img DEST/old.img`, locally
#      between two directories and (RSYNC_DAEMON=1) into a loopback `rsync --daemon` module
#      (rsync://127.0.0.1:PORT/bench/old.img, a fresh copy of old.img); cmp after each.
#   Page cache: every image is warm in RAM for every contender; the dirty pages of the files
#   involved are written back (`sync FILE...`, never a global sync) before each timed section.
#
# Prints: the full sync table (blockrep vs nbdcopy: seconds, MiB/s, bytes sent), the resync
# table (blockrep vs rsync local and daemon: seconds, bytes sent/received, wire/dirty ratio,
# identical), speedups, the issue's goals with PASS/FAIL (resync >= 10x faster than rsync,
# bytes sent <= 1.1x the dirty bytes, full sync >= 0.8x nbdcopy's speed), alpha's resync log
# lines and the warnings/errors found in the daemons' logs.
#
# Exit status: 0 when every step ran and every copy was identical, 1 on setup errors, 3 if a
# replica or rsync result differed or a sync did not finish (the tables are still printed).
# Missed goals do not change the exit status. On every exit (trap) the nodes are brought down,
# the daemons and servers stopped by pid and the temp dir removed.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
REPORT_PY="$SCRIPT_DIR/bench-lib/resync_report.py"
GET_PY="$SCRIPT_DIR/bench-lib/replication_report.py"
DIRTY_PY="$SCRIPT_DIR/bench-lib/nbd_dirty.py"
export BENCH_NAME=bench-resync
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
    *) echo "bench-resync.sh: unknown argument: $1 (see --help)" >&2; exit 64 ;;
esac

SIZE=${SIZE:-1G}
DIRTY=${DIRTY:-1%}
JOURNAL_SIZE=${JOURNAL_SIZE:-4M}
SYNC_TIMEOUT=${SYNC_TIMEOUT:-120}
CONNECT_TIMEOUT=${CONNECT_TIMEOUT:-30}
SEED=${SEED:-42}
RSYNC_DAEMON=${RSYNC_DAEMON:-1}
SAMPLE_INTERVAL=${SAMPLE_INTERVAL:-1}
BENCH_OUT=${BENCH_OUT:-}
BUILD_TRIES=${BUILD_TRIES:-10}
BUILD_RETRY_WAIT=${BUILD_RETRY_WAIT:-30}
BLOCKREP_IO_ENGINE=${BLOCKREP_IO_ENGINE:-auto}
BLOCKREP_DIRECT_IO=${BLOCKREP_DIRECT_IO:-false}
KEEP_TMP=${KEEP_TMP:-0}
RESOURCE=bench
SECRET=bench-resync-secret
BLOCK=4096

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
is_pos() { [[ $1 =~ ^[0-9]+$ ]] && ((10#$1 > 0)); }
is_pos "$SYNC_TIMEOUT" || die "SYNC_TIMEOUT must be a positive integer (seconds)"
is_pos "$CONNECT_TIMEOUT" || die "CONNECT_TIMEOUT must be a positive integer (seconds)"
is_uint "$SEED" || die "SEED must be a non-negative integer"
is_uint "$SAMPLE_INTERVAL" || die "SAMPLE_INTERVAL must be a non-negative integer (seconds)"
is_pos "$BUILD_TRIES" || die "BUILD_TRIES must be a positive integer"
is_uint "$BUILD_RETRY_WAIT" || die "BUILD_RETRY_WAIT must be a non-negative integer"
[[ $DIRTY =~ ^[0-9]+(\.[0-9]+)?%$ || $DIRTY =~ ^[0-9]+$ ]] || die "DIRTY: a percentage (1%) or a block count"
case $RSYNC_DAEMON in 0 | 1) ;; *) die "RSYNC_DAEMON: 0|1" ;; esac
case $BLOCKREP_IO_ENGINE in auto | io-uring | sync) ;; *) die "BLOCKREP_IO_ENGINE: auto|io-uring|sync" ;; esac
case $BLOCKREP_DIRECT_IO in true | false) ;; *) die "BLOCKREP_DIRECT_IO: true|false" ;; esac

TARGET_SIZE=$(bench_size_bytes "$SIZE") || die "cannot parse SIZE=$SIZE"
JOURNAL_BYTES=$(bench_size_bytes "$JOURNAL_SIZE") || die "cannot parse JOURNAL_SIZE=$JOURNAL_SIZE"
((TARGET_SIZE % 1048576 == 0 && TARGET_SIZE >= 64 * 1048576)) || die "SIZE must be a multiple of 1M, at least 64M"

# ---------------------------------------------------------------- tools
missing=()
for t in fio nbdcopy nbdkit rsync; do
    have "$t" || missing+=("$t")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]] && have apt-get; then
        log "missing: ${missing[*]}; running scripts/deps.sh"
        bash "$SCRIPT_DIR/deps.sh" >&2 || log "deps.sh failed"
    else
        log "missing: ${missing[*]} (not root: install fio libnbd-bin nbdkit rsync yourself)"
    fi
fi
for t in fio nbdcopy nbdkit rsync python3 cmp numfmt truncate timeout sync; do
    have "$t" || die "$t is required"
done
# the libnbd binding may live only in the system python (Debian's python3-libnbd)
NBD_PY=
for p in python3 /usr/bin/python3; do
    if "$p" -c 'import nbd' 2>/dev/null; then NBD_PY=$p; break; fi
done
[[ -n $NBD_PY ]] || die "no python3 with the libnbd binding (Debian: python3-libnbd)"
HAVE_SS=0
have ss && HAVE_SS=1

# ---------------------------------------------------------------- state + cleanup
TMP_DIR=
CTL=
CFG_FILE=
UP_NODES=()     # nodes that may be up, in down order (alpha first)
DAEMON_PIDS=()  # blockrep daemon pids (from status --json)
DAEMON_NAMES=()
SERVER_PIDS=()  # nbdkit / rsync daemons we started
SERVER_NAMES=()
SAMPLER_PID=
WAITER_PID=     # background wait-sync (wait_sync_timed)

stop_waiter() {
    [[ -n $WAITER_PID ]] || return 0
    kill "$WAITER_PID" 2>/dev/null || true
    wait "$WAITER_PID" 2>/dev/null || true
    WAITER_PID=
}

stop_sampler() {
    [[ -n $SAMPLER_PID ]] || return 0
    kill "$SAMPLER_PID" 2>/dev/null || true
    wait "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=
}

nodes_down() {
    local n i
    stop_waiter
    stop_sampler
    for n in "${UP_NODES[@]}"; do
        log "blockrep-ctl down ($n)"
        timeout 60 "$CTL" -c "$CFG_FILE" -n "$n" down >&2 || log "blockrep-ctl down $n failed"
    done
    UP_NODES=()
    for i in "${!DAEMON_PIDS[@]}"; do
        wait_pid_gone "${DAEMON_PIDS[$i]}" 10 || stop_pid "${DAEMON_PIDS[$i]}" "${DAEMON_NAMES[$i]}"
    done
    DAEMON_PIDS=()
    DAEMON_NAMES=()
}

servers_stop() {
    local i
    for i in "${!SERVER_PIDS[@]}"; do
        stop_pid "${SERVER_PIDS[$i]}" "${SERVER_NAMES[$i]}"
    done
    SERVER_PIDS=()
    SERVER_NAMES=()
}

# shellcheck disable=SC2317  # invoked through the EXIT trap
cleanup() {
    local rc=$? f
    trap - EXIT INT TERM
    set +e
    if [[ -n $CTL && -n $CFG_FILE ]]; then nodes_down; fi
    servers_stop
    if [[ -n $TMP_DIR && -d $TMP_DIR ]]; then
        if ((rc == 1)); then
            for f in "$TMP_DIR"/*.log; do
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

TMP_DIR=$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/bench-resync.XXXXXX")
# control sockets live in the temp dir: keep their paths below the 108-byte sun_path limit
((${#TMP_DIR} <= 70)) || die "temp dir path too long for control sockets: $TMP_DIR (set BENCH_TMPDIR)"
avail=$(df -Pk "$TMP_DIR" | awk 'NR == 2 {print $4 * 1024}')
if is_uint "${avail:-x}" && ((avail < 5 * TARGET_SIZE + JOURNAL_BYTES * 2)); then
    die "not enough space in $TMP_DIR: $(numfmt --to=iec "$avail") free, about $(numfmt --to=iec $((5 * TARGET_SIZE))) needed"
fi
RESULTS=$TMP_DIR/results.env
: >"$RESULTS"
put() { printf '%s=%s\n' "$1" "$2" >>"$RESULTS"; } # put KEY VALUE

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
jget() { python3 "$GET_PY" get "$@"; }
now() { date +%s.%N; }
since() { python3 "$REPORT_PY" elapsed "$@"; } # since T0 [T1]
# sync_files FILE...: writes back these files only (fsync each). Never a global `sync`: it
# blocks on every mounted filesystem, hung FUSE mounts of other jobs included.
sync_files() { timeout 120 sync "$@" || log "sync $* failed or timed out"; }
loadavg() { cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo -; }
same_range() { # same_range A B: the first DEV_SIZE bytes of both files are equal (yes/no)
    local msg
    if msg=$(cmp -n "$DEV_SIZE" "$1" "$2" 2>&1); then
        echo yes
    else
        log "DIFFER: $msg"
        echo no
    fi
}
# copy_range SRC DST: DST = the first DEV_SIZE bytes of SRC
copy_range() {
    cp --sparse=never "$1" "$2" && truncate -s "$DEV_SIZE" "$2"
}
start_sampler() { # start_sampler FILE: alpha's status every SAMPLE_INTERVAL s, concatenated
    ((SAMPLE_INTERVAL > 0)) || return 0
    (
        while :; do
            timeout 10 "$CTL" -c "$CFG_FILE" -n alpha status --json >>"$1" 2>/dev/null || true
            sleep "$SAMPLE_INTERVAL"
        done
    ) &
    SAMPLER_PID=$!
}
# start_server NAME LOGFILE CMD...: background server, remembered for cleanup
start_server() {
    local name=$1 logf=$2
    shift 2
    "$@" >"$logf" 2>&1 &
    SERVER_PIDS+=("$!")
    SERVER_NAMES+=("$name")
    LAST_PID=$!
}
daemon_trouble() { # prints why, when a daemon is gone or panicked; false otherwise
    local i
    for i in "${!DAEMON_PIDS[@]}"; do
        if ! kill -0 "${DAEMON_PIDS[$i]}" 2>/dev/null; then
            echo "${DAEMON_NAMES[$i]} (pid ${DAEMON_PIDS[$i]}) is gone"
            return 0
        fi
    done
    for i in alpha beta; do
        if grep -q 'panicked' "$DIR/$i.log" 2>/dev/null; then
            echo "$i's daemon panicked: $(grep -m1 -A2 'panicked' "$DIR/$i.log" | tr '\n' ' ' | cut -c1-300)"
            return 0
        fi
    done
    return 1
}
# wait_sync_timed TAG: alpha's `wait-sync --timeout SYNC_TIMEOUT` in the background, its end
# time taken by the waiter itself (WAIT_END), watched every 0.2 s for dead or panicked
# daemons (then given up at once). Returns wait-sync's status, or 2 on such trouble.
WAIT_END=
wait_sync_timed() {
    local tag=$1 endf=$DIR/wait-sync-$1.end why rc=0
    rm -f "$endf"
    (
        "$CTL" -c "$CFG_FILE" -n alpha wait-sync --timeout "$SYNC_TIMEOUT" \
            >"$DIR/wait-sync-$tag.out" 2>"$DIR/wait-sync-$tag.err" &
        c=$!
        trap 'kill "$c" 2>/dev/null; exit 143' TERM
        rc=0
        wait "$c" || rc=$?
        date +%s.%N >"$endf.tmp" && mv "$endf.tmp" "$endf"
        exit "$rc"
    ) &
    WAITER_PID=$!
    while [[ ! -e $endf ]]; do
        if why=$(daemon_trouble); then
            WAIT_END=$(now)
            log "giving up on wait-sync: $why"
            put "${tag}_trouble" "$why"
            stop_waiter
            return 2
        fi
        sleep 0.2
    done
    wait "$WAITER_PID" || rc=$?
    WAITER_PID=
    WAIT_END=$(<"$endf")
    return "$rc"
}
# wait_file FILE PID NAME: until FILE is non-empty (30 s); dies when PID exits first
wait_file() {
    local i
    for ((i = 0; i < 300; i++)); do
        [[ -s $1 ]] && return 0
        kill -0 "$2" 2>/dev/null || die "$3 exited: $(tail -n 3 "${1%.pid}.log" 2>/dev/null | tr '\n' ' ')"
        sleep 0.1
    done
    die "$3 not ready after 30 s"
}
tcp_bytes() { # tcp_bytes PID PORT...: "OUT IN SOCKETS" of PID's TCP sockets on those ports
    if ((HAVE_SS)); then
        ss -tinpH state established 2>/dev/null | python3 "$REPORT_PY" ss-bytes "$@"
    else
        echo "- - 0"
    fi
}

DIR=$TMP_DIR
LAST_PID=
DEV_SIZE=
read -r PORT_EA PORT_RA PORT_EB PORT_RB PORT_NBD_SRC PORT_NBD_DST PORT_RSYNCD < <(free_ports 7) ||
    die "cannot find free ports"

write_config() {
    {
        echo "[resource]"
        echo "name = \"$RESOURCE\""
        echo "protocol = \"C\""
        echo "secret = \"$SECRET\""
        echo "io-engine = \"$BLOCKREP_IO_ENGINE\""
        echo "direct-io = $BLOCKREP_DIRECT_IO"
        echo "journal-size = \"$JOURNAL_SIZE\""
        echo "bitmap-granularity = \"4K\""
        echo "resync-rate = \"0\""
        local node e r
        for node in alpha beta; do
            if [[ $node == alpha ]]; then e=$PORT_EA r=$PORT_RA; else e=$PORT_EB r=$PORT_RB; fi
            echo
            echo "[node.$node]"
            echo "backing = \"$DIR/$node.img\""
            echo "meta = \"internal\""
            echo "replication = \"127.0.0.1:$r\""
            echo "export = \"127.0.0.1:$e\""
            echo "control = \"$DIR/$node.sock\""
            echo "log-file = \"$DIR/$node.log\""
        done
    } >"$CFG_FILE"
}

data_size() { # data_size NODE: the metadata's data-size (the exported size)
    ctl "$1" dump-md 2>/dev/null | awk '$1 == "data-size" {print $2; exit}'
}

CFG_FILE=$DIR/$RESOURCE.toml
write_config
put device_target "$TARGET_SIZE"
put journal_size "$JOURNAL_BYTES"
put alpha_log "$DIR/alpha.log"

# ---------------------------------------------------------------- 1. backing files, data
# Size beta's file until the export is SIZE (the metadata size depends on the file size).
FILE_SIZE=$((TARGET_SIZE + JOURNAL_BYTES + 256 * 1024))
for ((try = 1; try <= 5; try++)); do
    rm -f "$DIR/beta.img"
    truncate -s "$FILE_SIZE" "$DIR/beta.img"
    ctl beta create-md --force >"$DIR/create-md-beta.out" 2>&1 || { cat "$DIR/create-md-beta.out" >&2; die "create-md on beta failed"; }
    DEV_SIZE=$(data_size beta)
    is_pos "${DEV_SIZE:-x}" || die "cannot read beta's data-size from dump-md"
    ((DEV_SIZE == TARGET_SIZE)) && break
    FILE_SIZE=$((FILE_SIZE + TARGET_SIZE - DEV_SIZE))
done
((DEV_SIZE % BLOCK == 0)) || die "exported size $DEV_SIZE is not a multiple of $BLOCK"
((DEV_SIZE == TARGET_SIZE)) || log "note: exported size $DEV_SIZE, not exactly $TARGET_SIZE"
NBLOCKS=$((DEV_SIZE / BLOCK))
DIRTY_BLOCKS=$(python3 "$REPORT_PY" count "$DIRTY" "$NBLOCKS")
put device_size "$DEV_SIZE"
put file_size "$FILE_SIZE"
log "backing files $FILE_SIZE bytes, exported $DEV_SIZE bytes ($NBLOCKS blocks of 4 KiB); outage rewrites $DIRTY_BLOCKS blocks"

truncate -s "$FILE_SIZE" "$DIR/alpha.img"
FILL_BS=1M
((DEV_SIZE % 1048576 == 0)) || FILL_BS=4k
log "filling alpha's exported range with random data (fio, $FILL_BS blocks)"
t0=$(now)
fio --name=fill --filename="$DIR/alpha.img" --rw=write --bs="$FILL_BS" --size="$DEV_SIZE" \
    --ioengine=psync --refill_buffers=1 --end_fsync=1 --output="$DIR/fill.fio.out" >&2 ||
    die "fio fill failed: $(tail -n 3 "$DIR/fill.fio.out" 2>/dev/null)"
log "filled in $(since "$t0") s"
[[ $(stat -c %s "$DIR/alpha.img") == "$FILE_SIZE" ]] || die "alpha.img changed size during the fill"
if cmp -s -n "$BLOCK" "$DIR/alpha.img" /dev/zero; then die "alpha.img starts with zeroes after the fill"; fi

# ---------------------------------------------------------------- 2. nbdcopy baseline
log "nbdcopy baseline: nbdkit file (alpha.img, read-only, $DEV_SIZE bytes) -> nbdkit file (target.img)"
truncate -s "$DEV_SIZE" "$DIR/target.img"
# nbdkit writes its -P pid file once it accepts connections: no probe connection needed
start_server "nbdkit (source)" "$DIR/nbdkit-src.log" \
    nbdkit -f --exit-with-parent -P "$DIR/nbdkit-src.pid" -r -i 127.0.0.1 -p "$PORT_NBD_SRC" \
    --filter=truncate file "$DIR/alpha.img" truncate="$DEV_SIZE"
src_pid=$LAST_PID
start_server "nbdkit (target)" "$DIR/nbdkit-dst.log" \
    nbdkit -f --exit-with-parent -P "$DIR/nbdkit-dst.pid" -i 127.0.0.1 -p "$PORT_NBD_DST" \
    file "$DIR/target.img"
dst_pid=$LAST_PID
wait_file "$DIR/nbdkit-src.pid" "$src_pid" "nbdkit (source)"
wait_file "$DIR/nbdkit-dst.pid" "$dst_pid" "nbdkit (target)"
sync_files "$DIR/alpha.img" "$DIR/target.img"
put nbdcopy_load "$(loadavg)"
NBDCOPY_CMD=(nbdcopy --flush "nbd://127.0.0.1:$PORT_NBD_SRC" "nbd://127.0.0.1:$PORT_NBD_DST")
log "timed: ${NBDCOPY_CMD[*]}"
t0=$(now)
"${NBDCOPY_CMD[@]}" >"$DIR/nbdcopy.out" 2>&1 || die "nbdcopy failed: $(tail -n 3 "$DIR/nbdcopy.out")"
t1=$(now)
put nbdcopy_s "$(since "$t0" "$t1")"
servers_stop
put identical_nbdcopy "$(same_range "$DIR/alpha.img" "$DIR/target.img")"
log "nbdcopy: $(since "$t0" "$t1") s"
rm -f "$DIR/target.img"
sync_files "$DIR/alpha.img"

# ---------------------------------------------------------------- 3. full initial sync
log "create-md on alpha (its data is already there), up on both nodes"
ctl alpha create-md >"$DIR/create-md-alpha.out" 2>&1 || { cat "$DIR/create-md-alpha.out" >&2; die "create-md on alpha failed"; }
[[ $(data_size alpha) == "$DEV_SIZE" ]] || die "alpha's data-size differs from beta's"
for node in alpha beta; do
    UP_NODES+=("$node") # from here on nodes_down runs `down`, also if `up` fails halfway
    ctl "$node" up >&2 || die "up on $node failed"
    status_to "$node" "$DIR/status-$node.json" || die "status on $node failed"
    pid=$(jget "$DIR/status-$node.json" pid)
    if is_pos "$pid"; then
        DAEMON_PIDS+=("$pid")
        DAEMON_NAMES+=("blockrep $node")
    else
        log "status of $node has no pid; relying on blockrep-ctl down"
    fi
done
ALPHA_PID=${DAEMON_PIDS[0]:-}
deadline=$((SECONDS + CONNECT_TIMEOUT))
while :; do
    status_to alpha "$DIR/status-alpha.json" || die "status on alpha failed"
    conn=$(jget "$DIR/status-alpha.json" replication.connection)
    [[ $conn == connected ]] && break
    if ((SECONDS >= deadline)); then
        log "no link after ${CONNECT_TIMEOUT}s (connection: $conn): the timed section includes the connect"
        break
    fi
    sleep 0.2
done
log "link before promotion: $conn"
sent0=$(jget "$DIR/status-alpha.json" replication.bytes_sent)
sync_files "$DIR/alpha.img" "$DIR/beta.img"
put full_sync_load "$(loadavg)"
start_sampler "$DIR/samples-full.json"
log "timed: blockrep-ctl -n alpha primary --force; blockrep-ctl -n alpha wait-sync --timeout $SYNC_TIMEOUT"
full_ok=yes
t0=$(now)
ctl alpha primary --force >&2 || die "primary --force on alpha failed"
wait_sync_timed full || full_ok=no
t1=$WAIT_END
read -r tcp_out tcp_in tcp_n < <(tcp_bytes "${ALPHA_PID:-0}" "$PORT_RA" "$PORT_RB")
stop_sampler
put full_sync_ok "$full_ok"
put full_sync_t0 "$t0"
put full_sync_s "$(since "$t0" "$t1")"
if [[ $tcp_n == 1 ]]; then
    put full_sync_tcp_out "$tcp_out"
    put full_sync_tcp_in "$tcp_in"
fi
status_to alpha "$DIR/status-alpha-full.json" || log "status on alpha failed"
sent1=$(jget "$DIR/status-alpha-full.json" replication.bytes_sent)
if is_uint "$sent0" && is_uint "$sent1"; then put full_sync_bytes_sent $((sent1 - sent0)); fi
daemon_s=$(sed -n 's/.*resync done: [0-9]* bytes in \([0-9.]*\) s.*/\1/p' "$DIR/alpha.log" | head -n1)
[[ -n $daemon_s ]] && put full_sync_daemon_s "$daemon_s"
if [[ $full_ok == yes ]]; then
    log "full sync: $(since "$t0" "$t1") s, bytes_sent $((sent1 - sent0)) (daemon: ${daemon_s:-?} s)"
else
    log "full sync did NOT finish: $(tail -n 2 "$DIR/wait-sync-full.err" | tr '\n' ' ')"
fi
put identical_full "$(same_range "$DIR/alpha.img" "$DIR/beta.img")"

# ---------------------------------------------------------------- 4. outage + bitmap resync
resync_ok=no
dirty_done=no
if [[ $full_ok == yes ]]; then
    log "outage: blockrep-ctl -n alpha disconnect"
    ctl alpha disconnect >&2 || die "disconnect on alpha failed"
    status_to alpha "$DIR/status-alpha-disc.json" || die "status on alpha failed"
    log "alpha's link after disconnect: $(jget "$DIR/status-alpha-disc.json" replication.connection)"
    log "saving beta's image as old.img (what rsync would start from)"
    copy_range "$DIR/beta.img" "$DIR/old.img"
    log "rewriting $DIRTY_BLOCKS random 4 KiB blocks through alpha's export"
    "$NBD_PY" "$DIRTY_PY" "nbd://127.0.0.1:$PORT_EA/$RESOURCE" "$DIRTY_BLOCKS" --seed "$SEED" \
        --list "$DIR/dirty-blocks.txt" >"$DIR/dirty.json" || die "writing the dirty blocks failed"
    dirty_done=yes
    read -r dblocks dbytes druns dsecs < <(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
print(d["blocks"], d["bytes"], d["runs"], d["seconds"])' "$DIR/dirty.json")
    put dirty_blocks "$dblocks"
    put dirty_bytes "$dbytes"
    put dirty_runs "$druns"
    log "wrote $dblocks blocks ($dbytes bytes, $druns runs) in $dsecs s"
    status_to alpha "$DIR/status-alpha-before.json" || die "status on alpha failed"
    read -r oos jused conn_b b_sent0 b_recv0 < <(jget "$DIR/status-alpha-before.json" \
        replication.out_of_sync replication.journal_used replication.connection \
        replication.bytes_sent replication.bytes_received)
    put oos_before "$oos"
    put journal_used_before "$jused"
    log "before connect: connection $conn_b, out_of_sync $oos, journal used $jused, bytes_sent $b_sent0"
    if is_uint "$oos" && ((oos == 0)); then
        log "note: out_of_sync is 0 (the journal still covers the outage): this will be a journal replay, not a bitmap resync"
    fi
    lines_before=$(wc -l <"$DIR/alpha.log")
    sync_files "$DIR/alpha.img" "$DIR/beta.img" "$DIR/old.img"
    put resync_load "$(loadavg)"
    start_sampler "$DIR/samples-resync.json"
    log "timed: blockrep-ctl -n alpha connect; blockrep-ctl -n alpha wait-sync --timeout $SYNC_TIMEOUT"
    resync_ok=yes
    t0=$(now)
    ctl alpha connect >&2 || die "connect on alpha failed"
    wait_sync_timed resync || resync_ok=no
    t1=$WAIT_END
    read -r tcp_out tcp_in tcp_n < <(tcp_bytes "${ALPHA_PID:-0}" "$PORT_RA" "$PORT_RB")
    stop_sampler
    put resync_t0 "$t0"
    put resync_s "$(since "$t0" "$t1")"
    status_to alpha "$DIR/status-alpha-after.json" || log "status on alpha failed"
    read -r b_sent1 b_recv1 < <(jget "$DIR/status-alpha-after.json" replication.bytes_sent replication.bytes_received)
    if is_uint "$b_sent0" && is_uint "$b_sent1"; then put resync_bytes_sent $((b_sent1 - b_sent0)); fi
    if is_uint "$b_recv0" && is_uint "$b_recv1"; then put resync_bytes_received $((b_recv1 - b_recv0)); fi
    if [[ $tcp_n == 1 ]]; then
        put resync_tcp_out "$tcp_out"
        put resync_tcp_in "$tcp_in"
    else
        log "ss: $tcp_n matching sockets of alpha (want 1): no TCP byte counts"
    fi
    tail -n +$((lines_before + 1)) "$DIR/alpha.log" >"$DIR/alpha-resync.log"
    kind=unknown
    if grep -q 'resync to the peer' "$DIR/alpha-resync.log"; then
        kind=bitmap
        grep -q 'resync to the peer.*, full' "$DIR/alpha-resync.log" && kind=full
    elif grep -q 'streaming to the peer' "$DIR/alpha-resync.log"; then
        kind=journal
    fi
    put resync_kind "$kind"
    daemon_s=$(sed -n 's/.*resync done: [0-9]* bytes in \([0-9.]*\) s.*/\1/p' "$DIR/alpha-resync.log" | head -n1)
    [[ -n $daemon_s ]] && put resync_daemon_s "$daemon_s"
    if [[ $resync_ok == yes ]]; then
        log "resync ($kind): $(since "$t0" "$t1") s, bytes_sent $((b_sent1 - b_sent0)), TCP out/in ${tcp_out}/${tcp_in}"
    else
        log "resync did NOT finish: $(tail -n 2 "$DIR/wait-sync-resync.err" | tr '\n' ' ')"
    fi
    put identical_resync "$(same_range "$DIR/alpha.img" "$DIR/beta.img")"
else
    put identical_resync skipped
fi
put resync_ok "$resync_ok"
nodes_down

# ---------------------------------------------------------------- 5. rsync baseline
run_rsync() { # run_rsync NAME DEST: time rsync of new.img onto a fresh copy of old.img
    local name=$1 dest=$2 t0 t1 rc=0 sent recv lit matched
    cp --sparse=never "$DIR/old.img" "$DIR/dest/old.img"
    touch -d '2001-01-01 00:00:00' "$DIR/dest/old.img" # never "same size and mtime"
    sync_files "$DIR/old.img" "$DIR/new.img" "$DIR/dest/old.img"
    put "${name}_load" "$(loadavg)"
    log "timed: rsync --inplace --no-whole-file --stats new.img $dest"
    t0=$(now)
    (cd "$DIR" && rsync --inplace --no-whole-file --stats new.img "$dest") >"$DIR/$name.out" 2>&1 || rc=$?
    t1=$(now)
    if ((rc != 0)); then
        log "$name failed (status $rc): $(tail -n 3 "$DIR/$name.out" | tr '\n' ' ')"
        put "identical_$name" failed
        return 0
    fi
    put "${name}_s" "$(since "$t0" "$t1")"
    read -r sent recv lit matched < <(python3 "$REPORT_PY" rsync-stats "$DIR/$name.out")
    put "${name}_sent" "$sent"
    put "${name}_received" "$recv"
    put "${name}_literal" "$lit"
    put "${name}_matched" "$matched"
    put "identical_$name" "$(same_range "$DIR/new.img" "$DIR/dest/old.img")"
    log "$name: $(since "$t0" "$t1") s, sent $sent, received $recv, literal $lit"
}
# rsync needs only the old and the new image: it runs even when blockrep's resync failed
if [[ -e $DIR/old.img && $dirty_done == yes ]]; then
    copy_range "$DIR/alpha.img" "$DIR/new.img"
    mkdir -p "$DIR/dest"
    run_rsync rsync_local "dest/old.img"
    if ((RSYNC_DAEMON)); then
        cat >"$DIR/rsyncd.conf" <<EOF
use chroot = no
log file = $DIR/rsyncd.log
[bench]
    path = $DIR/dest
    read only = no
    uid = $(id -u)
    gid = $(id -g)
EOF
        start_server "rsync --daemon" "$DIR/rsyncd.out" \
            rsync --daemon --no-detach --config="$DIR/rsyncd.conf" --address=127.0.0.1 --port="$PORT_RSYNCD"
        wait_port "$PORT_RSYNCD" "$LAST_PID" "rsync --daemon"
        run_rsync rsync_daemon "rsync://127.0.0.1:$PORT_RSYNCD/bench/old.img"
        servers_stop
    else
        put identical_rsync_daemon skipped
    fi
else
    log "no rsync baseline (no outage was simulated)"
fi

# ---------------------------------------------------------------- report
echo
echo "Resync benchmark: device $DEV_SIZE bytes ($(numfmt --to=iec "$DEV_SIZE")), journal $JOURNAL_SIZE," \
    "bitmap 4K, protocol C, resync-rate unlimited, loopback, $(nproc) CPUs, load $(loadavg)," \
    "blockrep $GIT_REV (sha256 $BLOCKREP_SHA)"
report_args=(report "$RESULTS" --log "alpha=$DIR/alpha.log" --log "beta=$DIR/beta.log"
    --samples "full=$DIR/samples-full.json" --samples "resync=$DIR/samples-resync.json")
[[ -s $DIR/rsyncd.log ]] && report_args+=(--log "rsyncd=$DIR/rsyncd.log")
[[ -n $BENCH_OUT ]] && report_args+=(--json "$BENCH_OUT")
rc=0
python3 "$REPORT_PY" "${report_args[@]}" || rc=$?
[[ -n $BENCH_OUT ]] && log "results written to $BENCH_OUT"
if ((rc != 0)); then
    log "some copy was not identical or some sync did not finish"
    exit 3
fi
exit 0
