#!/usr/bin/env bash
# Example fence-peer handler for `fencing = "resource-only"` (DRBD's resource-level fencing):
# the primary lost its peer over the replication link, so it reaches the peer's node another
# way (here ssh over a second network) and runs `blockrep-ctl outdate` there. That works
# whether the peer's daemon runs (a cut link) or not (it writes the metadata), and makes
# `primary` on the peer refuse without --force until it has caught up again.
#
#   [resource]
#   fencing = "resource-only"
#   [handlers]
#   fence-peer = "/usr/local/lib/blockrep/fence-peer-outdate.sh"
#
# blockrep calls it with RESOURCE EVENT PEER as arguments (and BLOCKREP_RESOURCE,
# BLOCKREP_EVENT, BLOCKREP_PEER, BLOCKREP_NODE, BLOCKREP_PEER_ADDRESS in the environment), waits
# for it (60 s at most) and reads its exit code as DRBD does:
#   3 the peer's disk was inconsistent already, 4 the peer is outdated, 5 the peer's node could
#   not be reached (taken for down), 6 the peer refused (it is primary), 7 it was fenced off;
#   anything else: fencing failed (logged; the peer may be promoted with older data).
# Settings (environment of the daemon, or edit here):
#   BLOCKREP_FENCE_HOST   where to ssh to: a name or address of the peer's node on ANOTHER
#                         network than the replication link. Default: the host of
#                         BLOCKREP_PEER_ADDRESS, the link that just failed; then a node that
#                         does not answer is a failed fence (1), never "down" (5): when only
#                         that link broke, both nodes would otherwise take the other for dead
#                         and a plain `primary` would make two primaries.
#   BLOCKREP_FENCE_CONFIG the config path on the peer (default /etc/blockrep/$RESOURCE.toml)
set -u
resource=${1:-$BLOCKREP_RESOURCE}
peer=${3:-${BLOCKREP_PEER:-}}
addr=${BLOCKREP_PEER_ADDRESS:-}
host=${BLOCKREP_FENCE_HOST:-${addr%:*}}
separate=${BLOCKREP_FENCE_HOST:+yes}
# An IPv6 address comes bracketed ([::1]:7789): ssh wants it bare.
host=${host#[}
host=${host%]}
config=${BLOCKREP_FENCE_CONFIG:-/etc/blockrep/$resource.toml}
if [ -z "$host" ]; then
  echo "fence-peer: no host to reach $peer" >&2
  exit 1
fi
# A cut link is seen by the peer a moment later: retry a refusal for a few seconds, within
# 40 s in all (blockrep kills the handler at 60 s; `outdate` itself gives up after 10 s on a
# hung daemon).
deadline=$((SECONDS + 40))
out=""
while [ "$SECONDS" -lt "$deadline" ]; do
  left=$((deadline - SECONDS))
  [ "$left" -lt 5 ] && break
  # --foreground: ssh stays in the handler's process group, which blockrep kills whole
  # when it gives up on the handler.
  out=$(timeout --foreground "$left" ssh -o BatchMode=yes -o ConnectTimeout=5 -o ServerAliveInterval=5 \
    -o ServerAliveCountMax=2 "$host" blockrep-ctl -c "$config" -n "$peer" outdate 2>&1)
  rc=$?
  case $rc in
    124) echo "fence-peer: no answer from $host within the time left" >&2; exit 1 ;;
    125|126|127) echo "fence-peer: cannot run ssh or timeout (exit $rc): $out" >&2; exit 1 ;;
  esac
  if [ $rc -eq 0 ]; then
    case "$out" in
      *inconsistent*) exit 3 ;;
      *) exit 4 ;;
    esac
  fi
  # ssh itself failed (255). Only a node that does not answer is taken for down (5); a
  # refused connection, a refused key, a failed login or an unknown host name is a failed
  # fence (1): the node answered, or may well be up, and its daemon may still be primary.
  if [ $rc -eq 255 ]; then
    case "$separate:$out" in
      # Only a failure to connect at all: "Connection timed out during banner exchange"
      # means the node answered (its sshd is slow), so it is up.
      yes:*"connect to host "*": Connection timed out"*|yes:*"connect to host "*": No route to host"*)
        echo "fence-peer: $host unreachable: $out" >&2
        exit 5 ;;
      *)
        echo "fence-peer: ssh to $host failed: $out" >&2
        exit 1 ;;
    esac
  fi
  case "$out" in
    *"this node is primary"*) echo "fence-peer: $out" >&2; exit 6 ;;
  esac
  sleep 0.5
done
echo "fence-peer: $peer on $host refused: $out" >&2
exit 1
