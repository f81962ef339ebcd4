//! DRBD's one-word state queries (`drbdadm role`, `cstate`, `dstate`): what ping-loop and
//! failover scripts test, one line each, so they need not parse `status`.

use proto::control::Status;

/// Which state a query prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    /// This node's role, then the peer's: `primary/secondary` (`unknown` while not
    /// connected).
    Role,
    /// The connection: `connected`, `connecting`, `standalone`, `sync-source`,
    /// `sync-target` or `split-brain`.
    Cstate,
    /// This node's disk, then the peer's: `up-to-date/outdated`.
    Dstate,
}

/// The line a query prints for a resource that is up. Without a peer in the config, the
/// peer's half is left out and the connection is `standalone`.
pub fn line(q: Query, s: &Status) -> String {
    let peer = s.replication.as_ref();
    match q {
        Query::Role => match peer {
            Some(r) => format!("{}/{}", s.role, r.peer_role),
            None => s.role.clone(),
        },
        Query::Cstate => peer.map_or("standalone".into(), |r| r.connection.clone()),
        Query::Dstate => {
            // A failed disk says so (`status` shows FAILED), whatever its state reads.
            let disk = if s.disk_failed { "failed" } else { &s.disk };
            match peer {
                Some(r) => format!("{disk}/{}", r.peer_disk),
                None => disk.to_string(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::control::PeerStatus;

    fn status(peer: Option<(&str, &str, &str)>) -> Status {
        Status {
            up: true,
            role: "primary".into(),
            disk: "up-to-date".into(),
            replication: peer.map(|(conn, role, disk)| PeerStatus {
                connection: conn.into(),
                peer_role: role.into(),
                peer_disk: disk.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn each_query_prints_this_node_then_the_peer() {
        let s = status(Some(("connected", "secondary", "up-to-date")));
        assert_eq!(line(Query::Role, &s), "primary/secondary");
        assert_eq!(line(Query::Cstate, &s), "connected");
        assert_eq!(line(Query::Dstate, &s), "up-to-date/up-to-date");
        let s = status(Some(("connecting", "unknown", "outdated")));
        assert_eq!(line(Query::Role, &s), "primary/unknown");
        assert_eq!(line(Query::Cstate, &s), "connecting");
        assert_eq!(line(Query::Dstate, &s), "up-to-date/outdated");
    }

    #[test]
    fn a_lone_node_has_no_peer_half_and_a_failed_disk_says_so() {
        let mut s = status(None);
        assert_eq!(line(Query::Role, &s), "primary");
        assert_eq!(line(Query::Cstate, &s), "standalone");
        s.disk_failed = true;
        s.disk = "inconsistent".into();
        assert_eq!(line(Query::Dstate, &s), "failed");
    }
}
