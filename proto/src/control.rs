//! The control protocol between `blockrep-ctl` and a node's daemon: one JSON object per line on a
//! Unix socket. JSON rather than postcard because admins debug it with `socat`, and the status
//! object is the stable machine-readable interface (`status --json`).

use serde::{Deserialize, Serialize};

/// Longest control line accepted, so a confused client cannot make the daemon buffer forever.
pub const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Bring the resource up: open backing device, check metadata, open the export.
    Up,
    /// Drain, flush, close, and stop the daemon. Refused while NBD clients are attached
    /// unless `force` (DRBD's "held open").
    Down {
        #[serde(default)]
        force: bool,
    },
    Status,
    /// DRBD's `events2`: the daemon answers with a `Status` line at once and another each
    /// time the node's state changes (a few at once, then at most one every 10 ms; and one
    /// every second while nothing changes, so a silent daemon is a hung one), until the
    /// client closes the connection; nothing else is asked on it.
    Events,
    Primary {
        force: bool,
    },
    Secondary {
        force: bool,
    },
    Connect {
        discard_my_data: bool,
    },
    Disconnect,
    /// Discard this node's data; fetch everything from the peer.
    Invalidate,
    /// DRBD's `invalidate-remote`: the peer's data is discarded; this node (up to date,
    /// connected) resyncs it in full. `reset_bitmap: false` (DRBD 9's `--reset-bitmap=no`):
    /// only the regions already marked out of sync (a verify's differences) are resynced,
    /// through a planned reconnect, which no fence-peer handler takes for a lost peer.
    InvalidateRemote {
        #[serde(default = "yes")]
        reset_bitmap: bool,
    },
    /// Declare this node's disk outdated (what a primary's fence-peer handler asks for):
    /// `primary` then needs `--force` here. Refused on a primary and while connected.
    Outdate,
    /// DRBD's `resume-io`: writes suspended by fencing (`resource-and-stonith`, a lost peer
    /// whose fence-peer handler failed) go on without the peer.
    ResumeIo,
    /// DRBD's `pause-sync`: a resync from this node waits before its next region (and one
    /// that starts, before its first) until `ResumeSync`. Writes still replicate.
    PauseSync,
    /// DRBD's `resume-sync`: ends `PauseSync`.
    ResumeSync,
    /// Online verify: compare the hashes of every region with the peer's, mark the differing
    /// ones out of sync. Returns at once; progress and result are in `status`.
    Verify,
    /// `new-current-uuid --clear-bitmap`: skip the initial sync of two freshly created,
    /// connected secondaries whose disks the admin knows to be identical.
    SkipInitialSync,
    /// DRBD's `adjust`: read the config file again and apply what changed that a running node
    /// can take (the rest is reported as needing `down`/`up`). `dry_run`: only report.
    Adjust {
        config: String,
        /// The node the file is read for: a daemon of another node refuses.
        node: String,
        #[serde(default)]
        dry_run: bool,
    },
    /// Which resource and node this daemon serves, answered at once (`Ok` with the message
    /// `RESOURCE NODE`): two config files that name one control socket reach one daemon, and
    /// `blockrep-ctl` asks this first, so that a command meant for one resource never acts
    /// on another.
    Identify,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Reply {
    Ok { message: String },
    Error { message: String },
    Status { status: Box<Status> },
}

/// I/O counters of the NBD export.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct IoCounters {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub trims: u64,
    pub zeroes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Failed requests: bad requests from clients and failed I/O on the backing device.
    pub errors: u64,
    /// Failed I/O on the backing device: the export's reads, writes, zeroing and syncs (also
    /// in `errors`), the secondary's applying of the stream, and the reads of a resync, a
    /// verify or a peer's hash request (not client requests, so not in `errors`). Metadata
    /// I/O fails its own operation and is logged, not counted.
    #[serde(default)]
    pub disk_errors: u64,
    /// Requests in flight on the backing device (clients' and, on a secondary, the stream's).
    #[serde(default)]
    pub inflight: u64,
    /// Seconds the backing device has completed none of them (0 when idle): a hung disk.
    #[serde(default)]
    pub stalled_s: u64,
}

/// Replication state, present when the resource names a peer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerStatus {
    pub peer: String,
    pub connection: String,
    pub peer_role: String,
    pub peer_disk: String,
    pub protocol: String,
    /// "aes-256-gcm" when the link is sealed, else "none".
    #[serde(default)]
    pub encryption: String,
    /// Highest sequence number assigned to a write on this node.
    pub seq_written: u64,
    /// Highest sequence number sent to the peer.
    pub seq_sent: u64,
    /// Highest sequence number the peer has acknowledged receiving.
    pub seq_received: u64,
    /// Highest sequence number the peer has written to its backing device.
    pub seq_applied: u64,
    /// Highest sequence number the peer has synced to its disk (a flush under C returns on
    /// it); its superblock may not say so yet.
    #[serde(default)]
    pub seq_synced: u64,
    /// Highest sequence number the peer has made durable (synced, and its applied mark
    /// committed); a disconnect puts every write after it back in the bitmap.
    #[serde(default)]
    pub seq_durable: u64,
    /// The highest sequence the peer last said its disk holds, at this node's generation (a
    /// source's committed issued mark, a target's durable acknowledgement; 0: nothing heard).
    /// A peer that comes back holding less went back in time (its disk restored from an
    /// image) and is resynced in full from this node.
    #[serde(default)]
    pub peer_disk_holds: u64,
    pub lag_writes: u64,
    pub lag_bytes: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub crc_errors: u64,
    pub auth_failures: u64,
    pub journal_used: u64,
    pub journal_size: u64,
    /// Bytes the peer is known to lack (dirty bitmap), when the journal could not hold them.
    pub out_of_sync: u64,
    /// Resync as the source: bytes in all, bytes sent, bytes per second, seconds left.
    pub resync_total: u64,
    pub resync_done: u64,
    pub resync_rate: u64,
    pub resync_eta_s: u64,
    /// While a resync runs: on the source, why, and whether it is full (its decision at
    /// connect: "full sync: no bitmap covers what the peer lacks", "this node crashed as
    /// primary..."); on the target only whether it is full (the source's status says why).
    #[serde(default)]
    pub resync_reason: Option<String>,
    /// `pause-sync` is in force on this node: a resync from it waits (DRBD's
    /// `resync-suspended:user`), until `resume-sync`.
    #[serde(default)]
    pub resync_paused: bool,
    /// This node is the target of a resync its source paused with `pause-sync` (DRBD's
    /// `resync-suspended:peer`): `resume-sync` on the source lets it go on.
    #[serde(default)]
    pub resync_paused_by_peer: bool,
    pub last_error: Option<String>,
    /// With fencing (`resource-only`, `resource-and-stonith`), after the link to an up-to-date
    /// peer was lost on the primary: what the fence-peer handler did (cleared when the link
    /// is back).
    #[serde(default)]
    pub fence: Option<String>,
    /// The latest online verify started on this node, if any.
    #[serde(default)]
    pub verify: Option<VerifyStatus>,
    /// The peer went down cleanly (a primary handing over every write, or a secondary with
    /// the same data) and was not heard from since: a plain `primary` promotes this node.
    #[serde(default)]
    pub peer_left: bool,
    /// The peer, this primary's secondary, went down cleanly (a planned stop) and was not
    /// heard from since. It decides nothing: this node holds the data.
    #[serde(default)]
    pub peer_stopped: bool,
}

/// Progress and result of an online verify (`blockrep-ctl verify`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VerifyStatus {
    /// Number of the run (1, 2, ...), so a client can tell its run from an earlier one.
    pub run: u64,
    /// "pending", "running", "done", "interrupted" (the link dropped) or "failed".
    pub state: String,
    /// Bytes to compare, and compared so far.
    pub total: u64,
    pub done: u64,
    /// Regions (bitmap bits) found different, and their bytes; marked out of sync.
    pub differ_regions: u64,
    pub differ_bytes: u64,
    pub elapsed_ms: u64,
    pub error: Option<String>,
    /// The node that runs the comparison and holds the differences in its bitmap: the
    /// primary, also for a verify asked for on the secondary.
    #[serde(default)]
    pub source: Option<String>,
    /// A resync to the peer ended after this run: the regions it found are repaired.
    #[serde(default)]
    pub resynced: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    pub resource: String,
    pub node: String,
    pub pid: u32,
    pub up: bool,
    pub role: String,
    pub disk: String,
    /// A sync of the backing device failed since `up`: writes may be lost on it (`disk` is
    /// then `inconsistent` too, as on a resync target; this tells the two apart).
    #[serde(default)]
    pub disk_failed: bool,
    /// Why I/O (writes and reads) is suspended (DRBD's `suspended:`): `"fencing"` while a
    /// primary that lost its peer waits for the fence-peer handler under
    /// `resource-and-stonith` (or, after it failed, for the link or `resume-io`); `null` when
    /// they run.
    #[serde(default)]
    pub suspended: Option<String>,
    /// Settings of the config that this node does not apply (the metadata's win), said at
    /// `up` and kept here; empty when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    pub export: String,
    pub size: u64,
    pub engine: String,
    pub kernel_device: Option<String>,
    pub kernel_note: Option<String>,
    pub clients: u64,
    pub io: IoCounters,
    pub replication: Option<PeerStatus>,
}

impl Request {
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

impl Reply {
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_else(|e| {
            format!("{{\"result\":\"error\",\"message\":\"cannot encode reply: {e}\"}}")
        });
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for r in [
            Request::Up,
            Request::Primary { force: true },
            Request::Connect {
                discard_my_data: false,
            },
            Request::Verify,
            Request::InvalidateRemote {
                reset_bitmap: false,
            },
        ] {
            let line = r.to_line();
            assert!(line.ends_with('\n'));
            let back: Request = serde_json::from_str(line.trim_end()).unwrap();
            assert_eq!(back, r);
        }
        // An older CLI's `down` (no force field) is a plain down.
        let old: Request = serde_json::from_str(r#"{"cmd":"down"}"#).unwrap();
        assert_eq!(old, Request::Down { force: false });
        // And its `invalidate-remote` a full one.
        let old: Request = serde_json::from_str(r#"{"cmd":"invalidate-remote"}"#).unwrap();
        assert_eq!(old, Request::InvalidateRemote { reset_bitmap: true });
        let rep = Reply::Status {
            status: Box::default(),
        };
        let back: Reply = serde_json::from_str(rep.to_line().trim_end()).unwrap();
        assert_eq!(back, rep);
        // A status without the verify object (an older daemon) still decodes.
        let p: PeerStatus = serde_json::from_str(
            &serde_json::to_string(&PeerStatus::default())
                .unwrap()
                .replace(",\"verify\":null", ""),
        )
        .unwrap();
        assert_eq!(p.verify, None);
    }
}
