//! `blockrep-ctl events` (DRBD's `drbdsetup events2`): a monitoring script reads the node's
//! state and then one line per change, across a disconnect, a role change and a restart of
//! the daemon.
//!
//! Real daemons, real TCP; the events reader is the real CLI, run in the background.

use std::process::Command;
use std::time::Duration;

use blockrep_e2e::*;

/// Waits until a line of the events log after byte `from` contains `needle`; returns the
/// offset just past that line.
fn wait_line(ev: &ChildGuard, from: usize, needle: &str) -> usize {
    let find = |log: &str| -> Option<usize> {
        let mut at = from;
        for line in log.get(from..)?.split_inclusive('\n') {
            at += line.len();
            if line.ends_with('\n') && line.contains(needle) {
                return Some(at);
            }
        }
        None
    };
    let mut log = String::new();
    let found = wait_for(Duration::from_secs(30), || {
        log = ev.log();
        find(&log).is_some()
    });
    assert!(
        found,
        "no {needle:?} after byte {from} of the events:\n{log}"
    );
    find(&log).unwrap_or(from)
}

/// `blockrep-ctl events` on `n`, in the background, its output in the cluster's directory.
fn follow_events(c: &Cluster, n: &Node) -> ChildGuard {
    let log = c.dir().path().join(format!("events-{}.log", n.name()));
    let mut cmd = Command::new(n.ctl_path());
    cmd.arg("-c")
        .arg(n.config_path())
        .arg("-n")
        .arg(n.name())
        .arg("events");
    ChildGuard::spawn(&mut cmd, Some(&log))
}

/// `role`, `cstate` and `dstate` print exactly these lines on `n`.
fn assert_states(n: &Node, role: &str, cstate: &str, dstate: &str) {
    for (q, want) in [("role", role), ("cstate", cstate), ("dstate", dstate)] {
        let out = n.ctl_ok(&[q]);
        assert_eq!(out.stdout.trim_end(), want, "{} {q}", n.name());
    }
}

#[test]
fn events_follow_a_pair_through_a_disconnect_a_role_change_and_a_restart() {
    let c = Cluster::synced_pair("events", 64 << 20, |b| b);
    let (a, b) = (c.alpha(), c.beta());
    let r = c.resource().to_string();

    let now = a.ctl_ok(&["events", "--now"]).stdout;
    let want = [
        format!("exists resource name:{r} node:alpha up:yes role:primary suspended:no"),
        format!("exists device name:{r} disk:up-to-date disk-failed:no stalled:no clients:0"),
        format!(
            "exists connection name:{r} conn-name:beta connection:connected role:secondary left-cleanly:no"
        ),
        format!("exists peer-device name:{r} conn-name:beta peer-disk:up-to-date out-of-sync:no resync-suspended:no fence:none"),
        "exists -".to_string(),
    ];
    assert_eq!(now.lines().collect::<Vec<_>>(), want, "{now}");
    // DRBD's one-line queries, on both nodes.
    assert_states(a, "primary/secondary", "connected", "up-to-date/up-to-date");
    assert_states(b, "secondary/primary", "connected", "up-to-date/up-to-date");

    let mut ev = follow_events(&c, a);
    let mut at = wait_line(&ev, 0, "exists -");

    // The peer leaves and comes back.
    b.ctl_ok(&["disconnect"]);
    at = wait_line(
        &ev,
        at,
        &format!("change connection name:{r} conn-name:beta connection:connecting role:unknown"),
    );
    assert_states(a, "primary/unknown", "connecting", "up-to-date/unknown");
    assert_states(b, "secondary/unknown", "standalone", "up-to-date/unknown");
    b.ctl_ok(&["connect"]);
    at = wait_line(
        &ev,
        at,
        &format!("change connection name:{r} conn-name:beta connection:connected role:secondary"),
    );
    c.wait_in_sync(SYNC_TIMEOUT);

    // A demotion, then the daemon stops and starts again.
    a.ctl_ok(&["secondary"]);
    at = wait_line(&ev, at, &format!("change resource name:{r} role:secondary"));
    a.down();
    at = wait_line(
        &ev,
        at,
        &format!("destroy connection name:{r} conn-name:beta"),
    );
    at = wait_line(&ev, at, &format!("change resource name:{r} up:no"));
    for q in ["role", "cstate", "dstate"] {
        let out = a.ctl(&[q]);
        assert_eq!(
            out.code,
            Some(3),
            "{q} of a node that is down: {}",
            out.describe()
        );
        assert!(out.stdout.is_empty(), "{}", out.describe());
    }
    a.up();
    at = wait_line(
        &ev,
        at,
        &format!("change resource name:{r} up:yes role:secondary"),
    );
    // Created connecting or connected, depending on the poll; connected in the end.
    wait_line(
        &ev,
        at,
        &format!("create connection name:{r} conn-name:beta"),
    );
    at = wait_line(
        &ev,
        at,
        "conn-name:beta connection:connected role:secondary",
    );

    // Beta, primary now, goes down cleanly: alpha's reader says it was planned.
    b.ctl_ok(&["primary"]);
    b.down();
    // Only the fields that changed since the last poll: the link may show connecting from
    // beta's promotion already.
    at = wait_line(&ev, at, "left-cleanly:yes");

    // A daemon that stops answering is said once, and again when it answers.
    let pid = nix::unistd::Pid::from_raw(a.pid().expect("alpha's pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let hung = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_line(&ev, at, &format!("change resource name:{r} answering:no"))
    }));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
    let at = hung.unwrap_or_else(|e| std::panic::resume_unwind(e));
    wait_line(&ev, at, &format!("change resource name:{r} answering:yes"));
    assert!(ev.running(), "events stopped:\n{}", ev.log());
    ev.kill();
}

/// A state that lasts only a moment still gets its line: the daemon pushes every change of
/// its state (as DRBD's `events2` reports each), where a poll of `status` every 200 ms saw
/// one only if it happened to fall on a poll. Here the node stands alone for as long as one
/// run of the CLI takes, three times.
#[test]
fn events_show_a_state_that_lasts_only_a_moment() {
    let c = Cluster::synced_pair("events-moment", 64 << 20, |b| b);
    let a = c.alpha();
    let r = c.resource().to_string();
    let mut ev = follow_events(&c, a);
    let mut at = wait_line(&ev, 0, "exists -");
    for round in 0..3 {
        a.ctl_ok(&["disconnect"]);
        a.ctl_ok(&["connect"]);
        at = wait_line(
            &ev,
            at,
            &format!("change connection name:{r} conn-name:beta connection:standalone"),
        );
        at = wait_line(
            &ev,
            at,
            &format!("change connection name:{r} conn-name:beta connection:connected"),
        );
        assert!(
            ev.running(),
            "events stopped in round {round}:\n{}",
            ev.log()
        );
    }
    ev.kill();
}
