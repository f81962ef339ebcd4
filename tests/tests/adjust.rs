//! `adjust` (DRBD's `drbdadm adjust`): a running pair takes an edited config file without
//! going down. The protocol and the resync rate change at once (a running resync speeds up),
//! settings that need `down`/`up` are reported and left as they run, a config that is not
//! this resource's is refused with nothing changed, and `adjust` on a node that is down
//! brings it up.
//!
//! Real daemons, real TCP, real NBD clients (nbdcopy, nbdinfo).

use std::process::Command;
use std::time::{Duration, Instant};

use blockrep_e2e::*;

const MIB: u64 = 1 << 20;

/// Replaces the first `from` with `to` in the shared config file.
fn edit_config(c: &Cluster, from: &str, to: &str) {
    let text = c.config_text();
    assert!(text.contains(from), "the config has no {from:?}:\n{text}");
    c.write_config(&text.replacen(from, to, 1));
}

/// SIGSTOPs a daemon; SIGCONTs it when dropped (also when the test fails).
struct Stopped(nix::unistd::Pid);

impl Stopped {
    fn new(pid: u32) -> Self {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// How many connections to its peer `n` has logged so far.
fn connections_logged(n: &Node, peer: &str) -> usize {
    std::fs::read_to_string(n.log_path())
        .unwrap_or_default()
        .matches(&format!("peer {peer} connected from/to"))
        .count()
}

fn protocol(n: &Node) -> String {
    n.repl()["protocol"].as_str().unwrap_or("?").to_string()
}

#[test]
fn adjust_changes_the_protocol_and_a_running_resyncs_rate_without_going_down() {
    let c = Cluster::synced_pair("adjust-live", 128 << 20, |b| {
        b.protocol("C").resource_line("resync-rate = \"1M\"")
    });
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    assert_eq!(protocol(a), "C");
    let links = connections_logged(a, "beta");
    let pid = a.pid().expect("alpha's pid");

    // Protocol C -> A: a dry run changes nothing, then both nodes take it, the link stays.
    edit_config(&c, "protocol = \"C\"", "protocol = \"A\"");
    let dry = a.ctl_ok(&["adjust", "--dry-run"]).stdout;
    assert!(
        dry.contains("would change") && dry.contains("resource.protocol: C -> A (now)"),
        "{dry}"
    );
    assert!(
        dry.contains("beta is connected: it would be told the new protocol over the link"),
        "the dry run does not say the peer is told:\n{dry}"
    );
    assert_eq!(protocol(a), "C", "a dry run changed the protocol");
    assert_eq!(protocol(b), "C", "a dry run told the peer");
    // Adjusted on alpha only: beta is told over the link, as DRBD's peer is.
    let out = a.ctl_ok(&["adjust"]).stdout;
    assert!(
        out.contains("adjusted on alpha")
            && out.contains("resource.protocol: C -> A (now)")
            && out.contains("beta was sent the new protocol over the link and runs protocol A too"),
        "{out}"
    );
    assert_eq!(protocol(a), "A");
    b.wait_repl(CONNECT_TIMEOUT, "running the protocol alpha set", |r| {
        r["protocol"] == "A"
    });
    // Its own adjust then finds the file is what runs.
    let out = b.ctl_ok(&["adjust"]).stdout;
    assert!(out.contains("nothing to change"), "{out}");
    let again = a.ctl_ok(&["adjust"]).stdout;
    assert!(again.contains("nothing to change"), "{again}");
    assert_eq!(a.repl()["connection"], "connected");
    assert_eq!(
        connections_logged(a, "beta"),
        links,
        "adjusting the protocol dropped the link\n{}",
        a.log_tail(20)
    );
    assert_eq!(a.pid(), Some(pid), "the daemon was restarted");
    // Under A a write waits for nothing on the peer: with beta's daemon stopped, 4 MiB go
    // through while the link still stands and beta has applied none of them (under C they
    // would wait until the link's timeout dropped beta).
    let first = write_random_file(&c.dir().path().join("first"), 4 * MIB as usize);
    let written_before = a.repl_u64("seq_written");
    let link_ends = || a.log_count("peer link ended");
    let ends_before = link_ends();
    {
        let _stopped = Stopped::new(b.pid().expect("beta's pid"));
        a.nbdcopy_in(&c.dir().path().join("first"));
        // Read at once (a status call could outlast the link's 4 s timeout on a loaded
        // machine): the link did not end before the copy did, as it must have under C.
        assert_eq!(
            link_ends(),
            ends_before,
            "the writes under A waited for the stopped peer until the link dropped\n{}",
            a.log_tail(20)
        );
        let r = a.repl();
        let (written, applied) = (
            r["seq_written"].as_u64().unwrap_or(0),
            r["seq_applied"].as_u64().unwrap_or(u64::MAX),
        );
        assert!(
            written > written_before && applied < written,
            "the writes under A never reached the journal, or the stopped peer applied them: {r}"
        );
    }
    c.wait_in_sync(SYNC_TIMEOUT);
    assert_eq!(
        &b.backing_data(4 * MIB)[..],
        &first[..],
        "beta lacks writes made under A"
    );

    // A resync paced at 1 MiB/s speeds up at once when the rate is lifted.
    b.ctl_ok(&["disconnect"]);
    a.wait_not_connected(CONNECT_TIMEOUT);
    let data = c.dir().path().join("second");
    write_random_file(&data, 24 * MIB as usize);
    a.nbdcopy_in(&data);
    b.ctl_ok(&["connect"]);
    a.wait_repl(CONNECT_TIMEOUT, "resyncing", |r| {
        r["connection"] == "sync-source" && r["out_of_sync"].as_u64().unwrap_or(0) > 0
    });
    std::thread::sleep(Duration::from_secs(2));
    let left = a.repl_u64("out_of_sync");
    assert!(
        left > 16 * MIB,
        "the resync is not paced at 1 MiB/s: {left} bytes left after 2 s"
    );
    edit_config(&c, "resync-rate = \"1M\"", "resync-rate = \"0\"");
    let out = a.ctl_ok(&["adjust"]).stdout;
    assert!(
        out.contains("resource.resync-rate: 1M -> 0 (unlimited) (now, for the resyncs"),
        "{out}"
    );
    // 1 MiB/s would need 16 s and more for what is left (22 s at 1 MiB/s counted from
    // the adjust: the bound tells the two apart with room for a loaded machine).
    let t = Instant::now();
    c.wait_in_sync(Duration::from_secs(40));
    assert!(
        t.elapsed() < Duration::from_secs(left / MIB - 4),
        "the resync took {:?} after the rate was lifted, with {left} bytes left: not sped up",
        t.elapsed()
    );
    c.assert_replicas_identical(size, "after the resync the adjust sped up");

    // Back to C, adjusted on the secondary this time: the primary is told, acknowledges
    // under C again, and a reconnect before the other node's own adjust is not refused.
    edit_config(&c, "protocol = \"A\"", "protocol = \"C\"");
    let out = b.ctl_ok(&["adjust"]).stdout;
    assert!(
        out.contains("alpha was sent the new protocol over the link and runs protocol C too"),
        "{out}"
    );
    a.wait_repl(CONNECT_TIMEOUT, "running the protocol beta set", |r| {
        r["protocol"] == "C"
    });
    assert!(
        std::fs::read_to_string(a.log_path())
            .unwrap_or_default()
            .contains(
                "protocol A -> C, as the peer's adjust set it (this node's config file says so too)"
            ),
        "alpha's log does not say the peer set its protocol (the shared config file already says C: no warning)\n{}",
        a.log_tail(20)
    );
    let links = connections_logged(a, "beta");
    a.ctl_ok(&["disconnect"]);
    a.wait_not_connected(CONNECT_TIMEOUT);
    a.ctl_ok(&["connect"]);
    a.wait_repl(CONNECT_TIMEOUT, "reconnected", |r| {
        r["connection"] == "connected"
    });
    assert!(connections_logged(a, "beta") > links, "{}", a.log_tail(20));
    // Under C again: with beta stopped, a write is not answered (until beta goes on, or
    // the link's timeout drops it).
    let mut client = a.raw_open();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let writer = {
        let stopped = Stopped::new(b.pid().expect("beta's pid"));
        let writer = std::thread::spawn(move || {
            let r = client.write_at(0, &[7u8; 4096], 0);
            let _ = done_tx.send(());
            (client, r)
        });
        assert!(
            done_rx.recv_timeout(Duration::from_millis(800)).is_err(),
            "a write under C was answered while the peer was stopped: {}",
            a.repl()
        );
        drop(stopped);
        writer
    };
    let (client, r) = writer.join().expect("the writer thread");
    assert_eq!(r, Ok(()), "the write under C failed");
    client.disconnect();
    c.wait_in_sync(SYNC_TIMEOUT);
    assert!(
        std::fs::read_to_string(a.log_path())
            .unwrap_or_default()
            .contains("adjust: resource.resync-rate: 1M -> 0 (unlimited) (now, for the resyncs"),
        "alpha's log does not record the change\n{}",
        a.log_tail(20)
    );
}

#[test]
fn adjust_reports_what_needs_down_and_up_and_refuses_another_resource() {
    let c = Cluster::synced_pair("adjust-fixed", 64 << 20, |b| b);
    let (a, b) = (c.alpha(), c.beta());
    let uri = a.uri();
    let export = a.status_json()["export"].clone();
    let original = c.config_text();

    // A new export address cannot be taken by a running node: said, and left as it runs.
    let port = a.uri();
    let old_port = port
        .rsplit(':')
        .next()
        .and_then(|s| s.split('/').next())
        .expect("port in the export URI")
        .to_string();
    let free = free_port().to_string();
    edit_config(&c, &format!(":{old_port}\""), &format!(":{free}\""));
    let out = a.ctl_ok(&["adjust"]).stdout;
    assert!(
        out.contains("node.alpha.export") && out.contains("not applied: needs `down` and `up`"),
        "{out}"
    );
    assert_eq!(a.status_json()["export"], export, "the export moved");
    let info = run(Command::new("nbdinfo").arg("--size").arg(&uri), CMD_TIMEOUT);
    assert!(
        info.success(),
        "the running export stopped serving\n{}",
        info.describe()
    );

    // A journal size of another metadata: it needs create-md, and says so each time.
    edit_config(&c, "journal-size = \"8M\"", "journal-size = \"16M\"");
    for _ in 0..2 {
        let out = a.ctl_ok(&["adjust"]).stdout;
        assert!(
            out.contains("resource.journal-size: 8388608 -> 16777216 (not applied: needs `down`, `create-md`"),
            "{out}"
        );
    }
    c.write_config(&original);

    // Another resource's config (same control socket): refused, nothing changed.
    c.write_config(
        &original
            .replacen(
                &format!("name = \"{}\"", c.resource()),
                "name = \"other\"",
                1,
            )
            .replacen("protocol = \"C\"", "protocol = \"A\"", 1),
    );
    let out = a.ctl(&["adjust"]);
    assert!(
        !out.success(),
        "adjust took another resource's config\n{}",
        out.describe()
    );
    // (Refused by the CLI, which finds another resource's daemon on the socket, before the
    // daemon's own check of the file's resource.)
    assert!(
        out.stderr.contains("not resource other") && out.stderr.contains("nothing done"),
        "{}",
        out.describe()
    );
    c.write_config(&original);
    assert_eq!(a.repl()["protocol"], "C");

    // A malformed file: a clear error from the CLI, the node runs on.
    c.write_config("[resource\nname = ");
    let out = a.ctl(&["adjust"]);
    assert!(!out.success(), "{}", out.describe());
    assert!(
        out.stderr.contains("error:") && out.stderr.contains("blockrep.toml: line 1"),
        "{}",
        out.describe()
    );
    c.write_config(&original);
    assert_eq!(a.repl()["connection"], "connected");
    assert_eq!(a.repl()["protocol"], "C");

    // A new control socket: the running daemon does not answer there, but holds the disk;
    // adjust says why and starts no second daemon (which would only fail to claim it).
    let ctl = a.control_path().display().to_string();
    edit_config(&c, &ctl, &format!("{ctl}2"));
    let daemons = c.daemon_processes();
    for args in [&["adjust", "--dry-run"][..], &["adjust"][..]] {
        let out = a.ctl(args);
        assert!(
            !out.success()
                && out.stderr.contains("its disk is in use")
                && out.stderr.contains("`control` differs")
                && out
                    .stderr
                    .contains("run `down` with the config it was started with"),
            "{args:?} with another control socket:\n{}",
            out.describe()
        );
    }
    assert_eq!(c.daemon_processes(), daemons, "adjust started a daemon");
    c.write_config(&original);
    assert_eq!(a.repl()["connection"], "connected");

    // A new secret on one node: from the next connection, which it then refuses until the
    // peer has it too.
    let secret_line = original
        .lines()
        .find(|l| l.starts_with("secret"))
        .expect("a secret line")
        .to_string();
    c.write_config(&original.replacen(&secret_line, "secret = \"a new shared secret\"", 1));
    let out = a.ctl_ok(&["adjust"]).stdout;
    assert!(
        out.contains("resource.secret: (old) -> (new) (from the next connection to the peer)")
            && out.contains("beta must have the same encryption and secret")
            && !out.contains("a new shared secret"),
        "{out}"
    );
    assert_eq!(
        a.repl()["connection"],
        "connected",
        "the secret dropped the link"
    );
    a.ctl_ok(&["disconnect"]);
    a.ctl_ok(&["connect"]);
    b.wait_repl(CONNECT_TIMEOUT, "refusing alpha's new secret", |r| {
        r["auth_failures"].as_u64().unwrap_or(0) > 0
    });
    assert_ne!(a.repl()["connection"], "connected");
    let out = b.ctl_ok(&["adjust"]).stdout;
    assert!(out.contains("resource.secret"), "{out}");
    a.wait_connected(CONNECT_TIMEOUT);
    c.wait_in_sync(SYNC_TIMEOUT);

    // On a node that is down, adjust brings it up (as DRBD's does).
    b.down();
    let out = b.ctl_ok(&["adjust"]).stdout;
    assert!(out.contains("bringing it up"), "{out}");
    assert_eq!(b.status_json()["up"], true);
    c.wait_in_sync(SYNC_TIMEOUT);
}
