# shellcheck shell=bash
# bench-lib/common.sh - small helpers shared by the bench-*.sh scripts (sourced, not run).
#
# The sourcing script sets BENCH_NAME (the log prefix) before sourcing; it keeps its own
# `set -euo pipefail`. Nothing here installs traps or touches global state other than what
# the function comments say.

BENCH_NAME=${BENCH_NAME:-bench}

bench_log() { printf '[%s] %s\n' "$BENCH_NAME" "$*" >&2; }
bench_die() { bench_log "error: $*"; exit 1; }

have() { command -v "$1" >/dev/null 2>&1; }

# bench_size_bytes SPEC: 2G, 2GiB, 512M, 1073741824 -> bytes (powers of 1024); fails on junk
bench_size_bytes() {
    local spec=${1%iB}
    spec=${spec%B}
    numfmt --from=iec "$spec" 2>/dev/null
}

# stop_pid PID NAME: TERM, wait up to 10 s, then KILL; only this one pid
stop_pid() {
    local pid=$1 name=$2 i
    kill -0 "$pid" 2>/dev/null || return 0
    bench_log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        bench_log "$name (pid $pid) still running: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# wait_pid_gone PID SECONDS: wait for a process we did not start (no `wait` possible)
wait_pid_gone() {
    local pid=$1 secs=$2 i
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    return 1
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_port PORT PID NAME: until something listens on 127.0.0.1:PORT (30 s), dies otherwise
wait_port() {
    local port=$1 pid=$2 name=$3 i
    for ((i = 0; i < 300; i++)); do
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            bench_die "$name exited before listening on port $port"
        fi
        port_busy "$port" && return 0
        sleep 0.1
    done
    bench_die "$name is not listening on 127.0.0.1:$port after 30 s"
}

# free_ports N: prints N distinct free loopback TCP ports on one line
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# build_blockrep REPO_DIR TRIES WAIT_S: `cargo build --release -p blockrep -p blockrep-ctl`,
# retried TRIES times WAIT_S seconds apart (someone may be editing the tree meanwhile).
# Build output goes to stderr. Returns non-zero when every attempt failed.
build_blockrep() {
    local repo=$1 tries=$2 wait_s=$3 n
    for ((n = 1; n <= tries; n++)); do
        bench_log "building (attempt $n/$tries): cargo build --release -p blockrep -p blockrep-ctl"
        if (cd "$repo" && cargo build --release -p blockrep -p blockrep-ctl) >&2; then
            return 0
        fi
        if ((n < tries)); then
            bench_log "build failed; retrying in ${wait_s}s"
            sleep "$wait_s"
        fi
    done
    return 1
}

# snapshot_blockrep SRC_DIR DEST_DIR: copies blockrep + blockrep-ctl, so a rebuild of SRC_DIR
# during the benchmark cannot mix binaries between runs or nodes. blockrep-ctl starts the
# daemon found next to itself, so DEST_DIR/blockrep-ctl starts DEST_DIR/blockrep.
snapshot_blockrep() {
    local src=$1 dest=$2 b
    mkdir -p "$dest"
    for b in blockrep blockrep-ctl; do
        [[ -x $src/$b ]] || { bench_log "no executable $src/$b"; return 1; }
        cp -p "$src/$b" "$dest/$b.tmp" || return 1
        mv "$dest/$b.tmp" "$dest/$b" || return 1
    done
}
