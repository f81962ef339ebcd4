//! `blockrep-ctl events`: the node's state as a stream of lines, in the shape of DRBD's
//! `drbdsetup events2`, for monitoring scripts that today run ping loops.
//!
//! Each status the daemon pushes (at every change of its state: `Request::Events`) is turned
//! into objects (resource, device, connection, peer-device) with key:value fields; the first
//! prints them as `exists` lines and `exists -`, later ones print `create`, `change` (only
//! the fields that changed) and `destroy` lines. Plain functions of two snapshots, so the
//! diff is tested without a daemon.

use proto::control::Status;

/// One object of the state: its kind, the fields naming it, and its state fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub kind: &'static str,
    pub id: Vec<(&'static str, String)>,
    pub fields: Vec<(&'static str, String)>,
}

impl Object {
    fn line(&self, verb: &str, fields: &[(&'static str, String)]) -> String {
        let mut s = format!("{verb} {}", self.kind);
        for (k, v) in self.id.iter().chain(fields) {
            s.push(' ');
            s.push_str(k);
            s.push(':');
            // One token per value: a space would split it for `read`/awk.
            s.push_str(&v.replace(char::is_whitespace, "_"));
        }
        s
    }

    fn same(&self, o: &Object) -> bool {
        self.kind == o.kind && self.id == o.id
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

/// The objects of one snapshot: `None` when no daemon runs for the node.
pub fn objects(resource: &str, node: &str, st: Option<&Status>) -> Vec<Object> {
    let name = || ("name", resource.to_string());
    let up = st.is_some_and(|s| s.up);
    let mut out = vec![Object {
        kind: "resource",
        id: vec![name()],
        fields: {
            let mut f = vec![("node", node.to_string()), ("up", yes_no(up))];
            if let Some(s) = st.filter(|s| s.up) {
                f.push(("role", s.role.clone()));
                // DRBD's `suspended` (here only by fencing: writes held).
                f.push((
                    "suspended",
                    s.suspended.clone().unwrap_or_else(|| "no".into()),
                ));
            }
            f
        },
    }];
    let Some(s) = st.filter(|s| s.up) else {
        return out;
    };
    out.push(Object {
        kind: "device",
        id: vec![name()],
        fields: vec![
            ("disk", s.disk.clone()),
            ("disk-failed", yes_no(s.disk_failed)),
            // As `status` shows it: `DISK STALLED` from 5 s without a completion.
            ("stalled", yes_no(s.io.stalled_s >= 5)),
            ("clients", s.clients.to_string()),
        ],
    });
    if let Some(r) = &s.replication {
        let conn = || ("conn-name", r.peer.clone());
        out.push(Object {
            kind: "connection",
            id: vec![name(), conn()],
            fields: vec![
                ("connection", r.connection.clone()),
                ("role", r.peer_role.clone()),
                // A planned stop of the peer, not a fault (see `primary`).
                ("left-cleanly", yes_no(r.peer_left || r.peer_stopped)),
            ],
        });
        let mut f = vec![
            ("peer-disk", r.peer_disk.clone()),
            // Only whether: the byte count moves with every write.
            // An inconsistent disk may lack more than its bitmap says (as `status` shows it).
            (
                "out-of-sync",
                if r.out_of_sync == 0 && s.disk == "inconsistent" && r.connection != "sync-target" {
                    "unknown".to_string()
                } else {
                    yes_no(r.out_of_sync > 0)
                },
            ),
            // DRBD's names: `user` is a pause-sync here, `peer` one on the resync's source.
            (
                "resync-suspended",
                if r.resync_paused {
                    "user"
                } else if r.resync_paused_by_peer {
                    "peer"
                } else {
                    "no"
                }
                .to_string(),
            ),
        ];
        // Always there, `none` when cleared (a reconnect clears it): a field that only
        // disappeared would never show as changed.
        f.push(("fence", r.fence.clone().unwrap_or_else(|| "none".into())));

        if let Some(v) = &r.verify {
            f.push(("verify", v.state.clone()));
            f.push(("verify-differ", v.differ_bytes.to_string()));
        }
        out.push(Object {
            kind: "peer-device",
            id: vec![name(), conn()],
            fields: f,
        });
    }
    out
}

/// The lines that take a reader of `before` to `now`.
pub fn diff(before: &[Object], now: &[Object]) -> Vec<String> {
    let mut lines = Vec::new();
    for o in before {
        if !now.iter().any(|n| n.same(o)) {
            lines.push(o.line("destroy", &[]));
        }
    }
    for n in now {
        match before.iter().find(|o| o.same(n)) {
            None => lines.push(n.line("create", &n.fields)),
            Some(o) => {
                let changed: Vec<_> = n
                    .fields
                    .iter()
                    .filter(|f| !o.fields.contains(f))
                    .cloned()
                    .collect();
                if !changed.is_empty() {
                    lines.push(n.line("change", &changed));
                }
            }
        }
    }
    lines
}

/// The line for a daemon that stopped answering `status` (hung, or stalled on its disk), or
/// answers again.
pub fn answering(resource: &str, yes: bool) -> String {
    format!("change resource name:{resource} answering:{}", yes_no(yes))
}

/// The first status's lines: every object, then `exists -`.
pub fn exists(now: &[Object]) -> Vec<String> {
    let mut lines: Vec<String> = now.iter().map(|o| o.line("exists", &o.fields)).collect();
    lines.push("exists -".into());
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::control::PeerStatus;

    fn status(role: &str, connection: &str, peer_disk: &str) -> Status {
        Status {
            resource: "r0".into(),
            node: "alpha".into(),
            up: true,
            role: role.into(),
            disk: "up-to-date".into(),
            replication: Some(PeerStatus {
                peer: "beta".into(),
                connection: connection.into(),
                peer_role: "secondary".into(),
                peer_disk: peer_disk.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_first_poll_lists_everything() {
        let now = objects(
            "r0",
            "alpha",
            Some(&status("primary", "connected", "up-to-date")),
        );
        let lines = exists(&now);
        assert_eq!(
            lines,
            vec![
                "exists resource name:r0 node:alpha up:yes role:primary suspended:no",
                "exists device name:r0 disk:up-to-date disk-failed:no stalled:no clients:0",
                "exists connection name:r0 conn-name:beta connection:connected role:secondary left-cleanly:no",
                "exists peer-device name:r0 conn-name:beta peer-disk:up-to-date out-of-sync:no resync-suspended:no fence:none",
                "exists -",
            ]
        );
    }

    #[test]
    fn a_change_names_only_what_changed() {
        let a = objects(
            "r0",
            "alpha",
            Some(&status("primary", "connected", "up-to-date")),
        );
        let b = objects(
            "r0",
            "alpha",
            Some(&status("primary", "connecting", "unknown")),
        );
        assert_eq!(
            diff(&a, &b),
            vec![
                "change connection name:r0 conn-name:beta connection:connecting",
                "change peer-device name:r0 conn-name:beta peer-disk:unknown",
            ]
        );
        assert!(diff(&b, &b).is_empty());
    }

    #[test]
    fn a_daemon_that_goes_away_destroys_its_objects_and_comes_back_created() {
        let a = objects(
            "r0",
            "alpha",
            Some(&status("secondary", "connected", "up-to-date")),
        );
        let gone = objects("r0", "alpha", None);
        let lines = diff(&a, &gone);
        assert_eq!(
            lines,
            vec![
                "destroy device name:r0",
                "destroy connection name:r0 conn-name:beta",
                "destroy peer-device name:r0 conn-name:beta",
                "change resource name:r0 up:no",
            ]
        );
        let back = diff(&gone, &a);
        assert_eq!(
            back[0],
            "change resource name:r0 up:yes role:secondary suspended:no"
        );
        assert!(back[1].starts_with("create device name:r0 disk:up-to-date"));
    }

    #[test]
    fn values_stay_one_token() {
        let mut s = status("primary", "connected", "up-to-date");
        if let Some(r) = s.replication.as_mut() {
            r.fence = Some("peer outdated".into());
        }
        let lines = exists(&objects("r0", "alpha", Some(&s)));
        assert!(lines[3].ends_with("fence:peer_outdated"), "{}", lines[3]);
    }
}
