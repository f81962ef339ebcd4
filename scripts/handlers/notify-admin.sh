#!/usr/bin/env bash
# Example blockrep handler: log the event and mail the admin, as the ping-and-mail scripts of
# the background articles do by hand. Configure it for any event:
#
#   [handlers]
#   split-brain = "/usr/local/lib/blockrep/notify-admin.sh"
#   peer-lost = "/usr/local/lib/blockrep/notify-admin.sh"
#   after-resync-target = "/usr/local/lib/blockrep/notify-admin.sh"
#
# blockrep calls it with RESOURCE EVENT PEER as arguments (and BLOCKREP_RESOURCE, BLOCKREP_EVENT,
# BLOCKREP_PEER, BLOCKREP_NODE, BLOCKREP_PEER_ADDRESS, BLOCKREP_PEER_LEFT_CLEANLY in the
# environment) and does not wait for it.
# Set BLOCKREP_MAILTO to mail someone (needs a working `mail` command).
set -u
resource=${1:-$BLOCKREP_RESOURCE}
event=${2:-$BLOCKREP_EVENT}
peer=${3:-${BLOCKREP_PEER:-}}
node=${BLOCKREP_NODE:-$(hostname)}
msg="blockrep: resource $resource on $node: $event (peer $peer)"
logger -t blockrep -- "$msg" 2>/dev/null || true
echo "$(date -Is) $msg" >> "${BLOCKREP_HANDLER_LOG:-/var/log/blockrep-events.log}" 2>/dev/null || true
if [ -n "${BLOCKREP_MAILTO:-}" ] && command -v mail >/dev/null 2>&1; then
  case "$event" in
    split-brain) body="Split brain: both nodes changed the data. Nothing was moved. Pick the victim and run: blockrep-ctl secondary; blockrep-ctl connect --discard-my-data" ;;
    peer-lost)
      if [ "${BLOCKREP_PEER_LEFT_CLEANLY:-no}" = yes ]; then
        body="The peer went down cleanly (a planned stop). It catches up when it comes back; see 'blockrep-ctl status' for what this node may do meanwhile."
      else
        body="The peer link is down. The primary keeps serving and records what the peer misses; it catches up when the link is back."
      fi ;;
    *) body="$msg" ;;
  esac
  printf '%s\n' "$body" | mail -s "$msg" "$BLOCKREP_MAILTO" || true
fi
exit 0
