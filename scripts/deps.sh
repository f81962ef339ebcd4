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
have script    || need+=(bsdutils)   # a terminal for the tests of commands that ask
have debugfs   || need+=(e2fsprogs)
have systemd-analyze || need+=(systemd)   # verifies the shipped unit (not started)
have cc        || need+=(gcc libc6-dev)   # cargo's linker
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
# The Rust toolchain is not a Debian package here (Debian 12's is too old for this lock file).
if ! have cargo; then
  echo "deps: cargo is not on PATH: install a Rust toolchain of 1.85 or later (https://rustup.rs)," >&2
  echo "deps: then run this again from a shell that has ~/.cargo/bin on PATH (sudo's secure_path drops it)" >&2
  exit 1
fi
rustc_minor=$(rustc --version 2>/dev/null | sed -n 's/^rustc 1\.\([0-9]*\).*/\1/p')
if [ -z "$rustc_minor" ] || [ "$rustc_minor" -lt 85 ]; then
  echo "deps: $(rustc --version 2>/dev/null || echo 'rustc: not found') is too old: blockrep needs Rust 1.85 or later (rustup update)" >&2
  exit 1
fi
# The demo and the tests put filesystems on NBD exports through nbdfuse and loop devices.
if [ "$(id -u)" = 0 ]; then
  [ -c /dev/fuse ] || modprobe fuse 2>/dev/null || true
  [ -c /dev/fuse ] || echo "deps: warning: no /dev/fuse (an unprivileged container?): the demo and the filesystem tests need it" >&2
  losetup -f >/dev/null 2>&1 || modprobe loop 2>/dev/null || true
  losetup -f >/dev/null 2>&1 || echo "deps: warning: no free loop device (losetup -f failed): the demo and the filesystem tests need one" >&2
fi
echo "deps: ok"
