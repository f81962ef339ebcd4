#!/usr/bin/env bash
# Installs what blockrep's demo, tests and benchmarks need on a Debian machine, idempotently:
# the NBD clients and servers we test against (libnbd-bin, nbdkit, qemu-utils, fio), FUSE for
# nbdfuse, e2fsprogs for real filesystems. Needs root for apt; skips what is already there.
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have nbdinfo   || need+=(libnbd-bin)
have nbdkit    || need+=(nbdkit)
have fio       || need+=(fio)
have fusermount3 || need+=(fuse3)
have mkfs.ext4 || need+=(e2fsprogs)
have qemu-io   || need+=(qemu-utils)
have losetup   || need+=(mount)
have rsync     || need+=(rsync)
have systemd-analyze || need+=(systemd)   # verifies the shipped unit (not started)
{ python3 -c 'import nbd' 2>/dev/null || /usr/bin/python3 -c 'import nbd' 2>/dev/null; } || need+=(python3-libnbd)
if [ ${#need[@]} -gt 0 ]; then
  echo "deps: installing ${need[*]} (Debian packages)"
  if [ "$(id -u)" != 0 ]; then
    echo "deps: need root to install ${need[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Debian's python3-libnbd lives in the system python; make it importable where python3 is another build.
if ! python3 -c 'import nbd' 2>/dev/null && [ -d /usr/lib/python3/dist-packages ]; then
  echo "deps: note: python3 on PATH cannot import nbd; use /usr/bin/python3 for libnbd scripts"
fi
echo "deps: ok"
