#!/usr/bin/env bash
# The two-node demo, on one machine: create, up, mount, write, outage, catch-up, verify,
# switchover. Run as root (losetup and mount). Installs what it needs, builds blockrep,
# and cleans up after itself (also on failure or Ctrl-C).
#
# Without a kernel nbd module the filesystem is mounted the way any NBD client can: nbdfuse
# exposes the export as a file, losetup puts a loop device on it. Where the module exists,
# set `kernel-device = "/dev/nbd0"` in the config instead and mount /dev/nbd0.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

[ "$(id -u)" = 0 ] || { echo "demo: run as root (it uses losetup and mount)" >&2; exit 1; }
bash scripts/deps.sh
say "building blockrep (release)"
cargo build --release -q -p blockrep -p blockrep-ctl
PATH="$ROOT/target/release:$PATH"

DIR=$(mktemp -d /tmp/blockrep-demo.XXXXXX)
FUSE_PID=""
LOOP=""
# A loop device just detached may hold its file for a moment: unmounting nbdfuse is retried.
unmount_fuse() {
  for _ in $(seq 100); do
    mountpoint -q "$DIR/fuse" || return 0
    fusermount3 -u "$DIR/fuse" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}
cleanup() {
  set +e
  mountpoint -q "$DIR/mnt" && umount "$DIR/mnt"
  [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null
  if [ -n "$FUSE_PID" ]; then
    unmount_fuse
    kill "$FUSE_PID" 2>/dev/null
    wait "$FUSE_PID" 2>/dev/null
  fi
  for n in alpha beta; do
    pid=$(blockrep-ctl -c "$DIR/r0.toml" -n "$n" status --json 2>/dev/null |
      python3 -c 'import json,sys; print(json.load(sys.stdin).get("pid") or "")' 2>/dev/null)
    timeout 60 blockrep-ctl -c "$DIR/r0.toml" -n "$n" down --force >/dev/null 2>&1
    # One that did not go down (hung) is stopped by its pid.
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
  done
  # Never through a mount that is still there.
  if mountpoint -q "$DIR/mnt" || mountpoint -q "$DIR/fuse"; then
    echo "demo: $DIR is left behind: a mount under it could not be removed" >&2
  else
    rm -rf "$DIR"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Four distinct free ports below the kernel's ephemeral range: the daemons bind them later
# (beta again after its restart), and a port of that range could meanwhile become the local
# end of any outgoing connection.
read -r RA RB EA EB < <(python3 - <<'PY'
import random, socket
low, start = 20000, int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
if start <= low + 1000:
    low, start = 1024, 65535
ports = []
while len(ports) < 4:
    p = random.randrange(low, start)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        continue
    finally:
        s.close()
    if p not in ports:
        ports.append(p)
print(*ports)
PY
)

say "two backing devices (sparse files standing in for disks) and one config for both nodes"
run truncate -s 512M "$DIR/alpha.img" "$DIR/beta.img"
cat > "$DIR/r0.toml" <<EOF
[resource]
name = "r0"
protocol = "C"
secret = "demo-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
encryption = "aes-256-gcm"
journal-size = "64M"

[node.alpha]
backing = "$DIR/alpha.img"
replication = "127.0.0.1:$RA"
export = "127.0.0.1:$EA"
control = "$DIR/alpha.sock"

[node.beta]
backing = "$DIR/beta.img"
replication = "127.0.0.1:$RB"
export = "127.0.0.1:$EB"
control = "$DIR/beta.sock"
EOF
sed 's/^secret = .*/secret = "…"/' "$DIR/r0.toml"
CFG=(-c "$DIR/r0.toml")

say "create-md and up on both nodes; alpha becomes primary (first time: --force)"
run blockrep-ctl "${CFG[@]}" -n alpha create-md
run blockrep-ctl "${CFG[@]}" -n beta create-md
run blockrep-ctl "${CFG[@]}" -n alpha up
run blockrep-ctl "${CFG[@]}" -n beta up
run blockrep-ctl "${CFG[@]}" -n alpha primary --force
run blockrep-ctl "${CFG[@]}" -n alpha wait-sync --timeout 30

mount_export() { # $1 = export port
  mkdir -p "$DIR/fuse" "$DIR/mnt"
  nbdfuse "$DIR/fuse" "nbd://127.0.0.1:$1/r0" &
  FUSE_PID=$!
  for _ in $(seq 100); do [ -e "$DIR/fuse/nbd" ] && break; sleep 0.05; done
  LOOP=$(losetup --find --show "$DIR/fuse/nbd")
  echo "nbdfuse (pid $FUSE_PID) exposes the export as $DIR/fuse/nbd, loop device $LOOP"
}
unmount_export() {
  umount "$DIR/mnt"
  losetup -d "$LOOP"; LOOP=""
  unmount_fuse; wait "$FUSE_PID" 2>/dev/null || true; FUSE_PID=""
}

say "a filesystem on alpha's export, some files"
mount_export "$EA"
run mkfs.ext4 -q "$LOOP"
run mount "$LOOP" "$DIR/mnt"
head -c 8M /dev/urandom > "$DIR/mnt/before-outage.bin"
cp -r "$ROOT/blockrep/src" "$DIR/mnt/src"
sync
run blockrep-ctl "${CFG[@]}" -n alpha status

say "outage: beta goes down; alpha keeps serving and journals what beta misses"
run blockrep-ctl "${CFG[@]}" -n beta down
head -c 16M /dev/urandom > "$DIR/mnt/during-outage.bin"
sync
run blockrep-ctl "${CFG[@]}" -n alpha status

say "beta comes back: only the writes it missed are sent (journal replay), in order"
run blockrep-ctl "${CFG[@]}" -n beta up
run blockrep-ctl "${CFG[@]}" -n alpha wait-sync --timeout 60
run blockrep-ctl "${CFG[@]}" -n alpha status
(cd "$DIR/mnt" && find . -type f -print0 | sort -z | xargs -0 sha256sum) > "$DIR/files.sha256"
unmount_export

say "verify: the replicas are byte-identical over the exported range"
SIZE=$(blockrep-ctl "${CFG[@]}" -n alpha status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["size"])')
run cmp -n "$SIZE" "$DIR/alpha.img" "$DIR/beta.img"
echo "identical: $SIZE bytes"

say "switchover: alpha steps down, beta takes over and mounts the same files"
run blockrep-ctl "${CFG[@]}" -n alpha secondary
run blockrep-ctl "${CFG[@]}" -n beta primary
mount_export "$EB"
run mount "$LOOP" "$DIR/mnt"
# On its own line: a failed check ends the demo (set -e does not look inside an && list).
(cd "$DIR/mnt" && sha256sum --quiet -c "$DIR/files.sha256")
echo "all $(wc -l < "$DIR/files.sha256") files intact on beta"
unmount_export
run blockrep-ctl "${CFG[@]}" -n beta status

say "demo done; cleaning up"
