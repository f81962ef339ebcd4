//! Watching a pair until a condition holds, remembering the connection states each node went
//! through (a resync may start and end between two polls; the states say whether it ran).

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::Cluster;

/// What a pair looks like while it is polled: the distinct `connection` values each node went
/// through, in order.
#[derive(Debug, Default)]
pub struct Seen {
    pub alpha: Vec<String>,
    pub beta: Vec<String>,
}

impl Seen {
    pub fn note(v: &mut Vec<String>, s: &Value) {
        let c = s["replication"]["connection"]
            .as_str()
            .unwrap_or("?")
            .to_string();
        if v.last() != Some(&c) {
            v.push(c);
        }
    }
    pub fn has(v: &[String], state: &str) -> bool {
        v.iter().any(|s| s == state)
    }
}

/// Both nodes' `status --json` satisfy "in sync": connected, nothing out of sync on either
/// side, disks up to date, and the primary (if any) has every write applied on the peer.
pub fn pair_synced(sa: &Value, sb: &Value) -> bool {
    [sa, sb].iter().all(|s| {
        let r = &s["replication"];
        let mut ok =
            r["connection"] == "connected" && r["out_of_sync"] == 0 && s["disk"] == "up-to-date";
        // Lag and sequence marks only mean something on a primary (a secondary that was
        // primary before may still show its old term's journal).
        if s["role"] == "primary" {
            ok = ok
                && r["lag_writes"] == 0
                && r["seq_applied"] == r["seq_written"]
                && r["peer_disk"] == "up-to-date";
        }
        ok
    })
}

/// Polls both nodes (every ~30 ms) until `done(alpha_status, beta_status)`; returns the
/// states seen. Panics after `timeout` with both statuses and log tails.
pub fn watch(
    c: &Cluster,
    timeout: Duration,
    what: &str,
    mut done: impl FnMut(&Value, &Value) -> bool,
) -> Seen {
    let (a, b) = (c.alpha(), c.beta());
    let deadline = Instant::now() + timeout;
    let mut seen = Seen::default();
    loop {
        let sa = a.status_json();
        let sb = b.status_json();
        Seen::note(&mut seen.alpha, &sa);
        Seen::note(&mut seen.beta, &sb);
        if done(&sa, &sb) {
            return seen;
        }
        if Instant::now() >= deadline {
            panic!(
                "not {what} after {timeout:?}\nstates seen: {seen:?}\nalpha: {sa}\nbeta: {sb}\n\
                 --- alpha log ---\n{}\n--- beta log ---\n{}",
                a.log_tail(30),
                b.log_tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(30));
    }
}

/// Waits until the pair is in sync (whatever the roles); returns the states seen.
pub fn wait_synced(c: &Cluster, timeout: Duration, what: &str) -> Seen {
    watch(c, timeout, &format!("in sync ({what})"), pair_synced)
}
