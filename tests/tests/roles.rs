//! Roles (issue 2): only a Primary serves NBD I/O. A Secondary answers NBD_OPT_GO with
//! NBD_REP_ERR_POLICY and a message, and the client aborts; the daemon keeps running.

use std::process::Command;
use std::time::Duration;

use blockrep_e2e::nbd_const::*;
use blockrep_e2e::*;

/// Every way of asking a secondary for the export fails, and the daemon survives it.
fn assert_refuses_clients(c: &Cluster, pid: u32) {
    let a = c.alpha();
    let out = run(
        Command::new("nbdinfo").arg("--size").arg(a.uri()),
        CMD_TIMEOUT,
    );
    assert_ne!(
        out.code,
        Some(0),
        "nbdinfo succeeded on a secondary\n{}",
        out.describe()
    );
    assert!(
        !out.stderr.trim().is_empty(),
        "nbdinfo failed without a message"
    );

    let mut r = RawNbd::connect(a.export()).expect("connect");
    r.start_handshake();
    let rep = r
        .opt_go(a.resource())
        .expect_err("NBD_OPT_GO must be refused on a secondary");
    assert_eq!(
        rep.reply_type,
        REP_ERR_POLICY,
        "expected NBD_REP_ERR_POLICY, got {:#x} ({:?})",
        rep.reply_type,
        rep.text()
    );
    assert!(
        !rep.text().trim().is_empty(),
        "NBD_REP_ERR_POLICY without a message"
    );
    r.abort_after_refusal();

    let mut r = RawNbd::connect(a.export()).expect("connect");
    r.start_handshake();
    r.send_option(OPT_EXPORT_NAME, a.resource().as_bytes())
        .expect("send EXPORT_NAME");
    let bytes = r
        .expect_closed(Duration::from_secs(5))
        .expect("NBD_OPT_EXPORT_NAME on a secondary must end in a close");
    if !bytes.is_empty() {
        assert!(
            bytes.len() >= 20 && bytes[..8] == OPT_REPLY_MAGIC.to_be_bytes(),
            "EXPORT_NAME on a secondary answered with export data: {:02x?}",
            &bytes[..bytes.len().min(32)]
        );
        let ty = u32::from_be_bytes(bytes[12..16].try_into().unwrap());
        assert!(ty & REP_FLAG_ERROR != 0, "reply type {ty:#x}");
    }

    assert!(pid_alive(pid), "daemon died\n{}", a.log_tail(60));
    let st = a.status_json();
    assert_eq!(st["pid"].as_u64(), Some(pid as u64), "{st}");
    assert_eq!(st["role"], "secondary", "{st}");
    assert!(
        wait_for(Duration::from_secs(10), || a.status_json()["clients"] == 0),
        "refused clients still counted: {}",
        a.status_json()
    );
}

#[test]
fn secondary_refuses_nbd_clients() {
    let c = Cluster::builder("secondary").build();
    let a = c.alpha();
    a.create_md();
    a.up();
    let pid = a.pid().unwrap();
    let st = a.status_json();
    assert_eq!(st["role"], "secondary", "a node starts secondary: {st}");
    assert_eq!(
        st["disk"], "inconsistent",
        "fresh metadata is inconsistent: {st}"
    );
    assert_refuses_clients(&c, pid);

    // Fresh metadata: promotion without --force is refused.
    let out = a.ctl(&["primary"]);
    assert_eq!(
        out.code,
        Some(1),
        "primary without --force on fresh metadata\n{}",
        out.describe()
    );
    assert_eq!(a.status_json()["role"], "secondary");

    // After promotion it serves; after demotion it refuses again.
    a.primary_force();
    assert_eq!(nbdinfo_size(&a.uri()), a.size());
    // `secondary` without --force is refused while clients are attached: wait for nbdinfo's
    // connection to be gone first.
    assert!(wait_for(Duration::from_secs(10), || a.status_json()
        ["clients"]
        == 0));
    a.ctl_ok(&["secondary"]);
    assert_refuses_clients(&c, pid);
}

/// A client that sends a write header and then stalls its payload neither holds up a forced
/// demotion nor gets its write onto the demoted node: `secondary --force` closes it at once,
/// and the payload sent afterwards reaches nothing (the data stays as it was).
#[test]
fn forced_demotion_closes_a_client_stalled_mid_payload_and_writes_nothing() {
    let c = Cluster::single_primary("demote-stalled-payload");
    let a = c.alpha();
    let before = {
        let mut r = RawNbd::open(a.export(), c.resource());
        let d = r.read_at(0, 4096).expect("read block 0");
        r.disconnect();
        d
    };
    let mut stalled = RawNbd::open(a.export(), c.resource());
    // A 1 MiB write at 0 whose payload never comes (only its first 4 KiB).
    stalled
        .send_request(nbd_const::CMD_WRITE, 0, 0, 1 << 20, &[0xA5; 4096])
        .expect("send the write header");
    assert!(wait_for(Duration::from_secs(10), || a.status_json()
        ["clients"]
        == 1));
    let t0 = std::time::Instant::now();
    a.ctl_ok(&["secondary", "--force"]);
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "the forced demotion waited {took:?} for the stalled client"
    );
    assert_eq!(a.status_json()["role"], "secondary");
    // The rest of the payload, too late: the connection is closed, nothing is written.
    let _ = stalled.send(&vec![0xA5; (1 << 20) - 4096]);
    assert!(
        stalled.expect_closed(Duration::from_secs(10)).is_ok(),
        "the stalled client's connection is still open"
    );
    a.primary_force();
    let mut r = RawNbd::open(a.export(), c.resource());
    let after = r.read_at(0, 4096).expect("read block 0");
    r.disconnect();
    assert_eq!(after, before, "the stalled write reached the disk");
    let st = a.status_json();
    assert_eq!(st["io"]["writes"], 0, "{st}");
}

/// An unmount followed at once by `secondary`: the client that just disconnected may still be
/// finishing on the node, and the demotion waits a moment for it instead of refusing. A client
/// that stays attached still refuses it, after that moment.
#[test]
fn secondary_right_after_a_client_disconnects_succeeds_and_an_attached_client_refuses_it() {
    let c = Cluster::single_primary("demote-after-disc");
    let a = c.alpha();
    let held = RawNbd::open(a.export(), c.resource());
    let t0 = std::time::Instant::now();
    let out = a.ctl(&["secondary"]);
    assert_eq!(
        out.code,
        Some(1),
        "secondary with a client attached\n{}",
        out.describe()
    );
    assert!(
        out.describe().contains("NBD client(s) attached"),
        "{}",
        out.describe()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "the refusal took {:?}",
        t0.elapsed()
    );
    assert_eq!(a.status_json()["role"], "primary");
    held.disconnect();
    for round in 0..5 {
        // A write and its flush, the client gone, and the demotion at once.
        let mut w = RawNbd::open(a.export(), c.resource());
        w.write_at(4096 * round, &[round as u8 + 1; 4096], 0)
            .expect("write");
        w.command(CMD_FLUSH, 0, 0, 0).expect("flush");
        w.disconnect();
        a.ctl_ok(&["secondary"]);
        assert_eq!(a.status_json()["role"], "secondary");
        a.ctl_ok(&["primary"]);
    }
}

/// DRBD's habit: `connect` on a connected resource and `disconnect` on a disconnected one
/// change nothing. The link is not cut (no new connection, no new data generation on the
/// primary, no resync), and each says so.
#[test]
fn connect_when_connected_and_disconnect_when_disconnected_are_no_ops() {
    let c = Cluster::builder("connect-noop").nodes(2).build();
    c.start_pair();
    c.wait_in_sync(Duration::from_secs(60));
    let (a, b) = (c.alpha(), c.beta());
    let count = |n: &Node, needle: &str| {
        std::fs::read_to_string(n.log_path())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    };
    let connects = (count(a, "connected from/to"), count(b, "connected from/to"));
    let gens = count(a, "new data generation");
    // The promotion in start_pair may have closed an early connection: only what follows counts.
    let closed = count(a, "admin command");
    for n in [a, b] {
        let out = n.ctl_ok(&["connect"]);
        assert!(
            out.stdout.contains("already connecting or connected"),
            "{}",
            out.describe()
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        (count(a, "connected from/to"), count(b, "connected from/to")),
        connects,
        "connect on a connected pair reconnected:\n{}\n{}",
        a.log_tail(20),
        b.log_tail(20)
    );
    assert_eq!(count(a, "admin command"), closed, "{}", a.log_tail(20));
    assert_eq!(a.repl()["connection"], "connected");
    assert_eq!(
        count(a, "new data generation"),
        gens,
        "a new data generation on the primary:\n{}",
        a.log_tail(20)
    );

    b.ctl_ok(&["disconnect"]);
    let out = b.ctl_ok(&["disconnect"]);
    assert!(
        out.stdout.contains("already disconnected"),
        "{}",
        out.describe()
    );
    assert_eq!(b.repl()["connection"], "standalone");
    b.ctl_ok(&["connect"]);
    b.wait_connected(Duration::from_secs(30));
}

/// DRBD's "held open": `down` of a primary with an NBD client attached is refused (a mounted
/// filesystem would lose its disk), the node keeps serving it; `down --force` cuts it off
/// and a write the client acknowledged before is on disk.
#[test]
fn down_with_a_client_attached_is_refused_unless_forced() {
    let c = Cluster::single_primary("down-held-open");
    let a = c.alpha();
    let pid = a.pid().expect("daemon pid");
    let mut held = RawNbd::open(a.export(), c.resource());
    held.write_at(0, &[7u8; 4096], 0).expect("write");
    let out = a.ctl(&["down"]);
    assert_eq!(
        out.code,
        Some(1),
        "down with a client attached\n{}",
        out.describe()
    );
    assert!(
        out.describe().contains("NBD client(s) attached"),
        "{}",
        out.describe()
    );
    assert_eq!(a.status_json()["role"], "primary");
    // Still served after the refusal.
    held.write_at(4096, &[8u8; 4096], 0)
        .expect("a write after the refused down");
    held.command(CMD_FLUSH, 0, 0, 0).expect("flush");
    a.ctl_ok(&["down", "--force"]);
    assert!(
        wait_for(Duration::from_secs(10), || !pid_alive(pid)),
        "the daemon is still running after down --force"
    );
    let data = std::fs::read(a.backing_path()).expect("read backing");
    assert!(data[..4096].iter().all(|&b| b == 7) && data[4096..8192].iter().all(|&b| b == 8));
}

/// `status` against a hung daemon gives up within its bound (not the two minutes a role
/// change may take) and says why, with exit code 4 ("may be running, did not answer").
#[test]
fn status_of_a_stopped_daemon_gives_up_within_its_bound() {
    let c = Cluster::single_primary("status-hung");
    let a = c.alpha();
    let pid = a.pid().expect("daemon pid");
    /// Resumes the daemon whatever happens, so its cleanup can stop it.
    struct Cont(u32);
    impl Drop for Cont {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0 as i32),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
    }
    let _cont = Cont(pid);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("SIGSTOP the daemon");
    let t0 = std::time::Instant::now();
    let out = a.ctl_timeout(&["status"], Duration::from_secs(60));
    let took = t0.elapsed();
    assert_eq!(out.code, Some(4), "{}", out.describe());
    assert!(
        out.stderr.contains("did not answer within"),
        "{}",
        out.describe()
    );
    assert!(took < Duration::from_secs(30), "status took {took:?}");
    // With --json, stdout still holds an object (for monitoring), saying the state is unknown.
    let out = a.ctl_timeout(&["status", "--json"], Duration::from_secs(60));
    assert_eq!(out.code, Some(4), "{}", out.describe());
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json of a hung daemon: {e}\n{}", out.describe()));
    assert!(
        v["up"].is_null()
            && v["error"]
                .as_str()
                .is_some_and(|e| e.contains("did not answer")),
        "{v}"
    );
    // Every status that gave up left its connection queued: once the hung daemon's backlog
    // is full a blocking connect would wait for ever. Filled here, without blocking.
    let mut held = Vec::new();
    let path = a.control_path().to_path_buf();
    loop {
        use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        let addr = UnixAddr::new(path.as_path()).expect("address");
        match connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
            Ok(()) => held.push(fd),
            Err(nix::errno::Errno::EAGAIN) => break,
            Err(e) => panic!("connect {}: {e}", path.display()),
        }
        assert!(held.len() < 100_000, "the backlog never filled");
    }
    let t0 = std::time::Instant::now();
    let out = a.ctl_timeout(&["status"], Duration::from_secs(60));
    assert_eq!(out.code, Some(4), "backlog full: {}", out.describe());
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "status with the backlog full took {:?}",
        t0.elapsed()
    );
    drop(held);
    drop(_cont);
    // Resumed, the daemon first accepts (and drops) what queued up: status answers within
    // the CLI's retry of a full backlog, or a moment later.
    let answered = wait_for(Duration::from_secs(30), || {
        a.ctl(&["status", "--json"]).success()
    });
    assert!(answered, "the resumed daemon never answered status");
    assert_eq!(a.status_json()["role"], "primary");
}

/// Two nodes, beta's disk 16 MiB smaller than alpha's, both with fresh metadata (not up).
fn pair_of_two_sizes(name: &str) -> Cluster {
    let c = Cluster::builder(name)
        .nodes(2)
        .node_backing_size("beta", 256 * 1024 * 1024 - (16 << 20))
        .build();
    c.alpha().create_md();
    c.beta().create_md();
    c
}

/// Two nodes whose devices differ (DRBD's size negotiation): from their first connect the
/// pair exports the smaller size, on the larger node too, which can then be promoted (its
/// clients see the agreed size); the agreement is kept in the metadata, so the larger node
/// still exports it after a restart and a failover, and the smaller node's failback is not
/// refused as too small.
#[test]
fn a_pair_exports_the_smaller_size_from_its_first_connect() {
    let c = pair_of_two_sizes("agreed-size");
    let (a, b) = (c.alpha(), c.beta());
    a.up();
    let alone = a.size();
    b.up();
    a.wait_connected(Duration::from_secs(30));
    b.wait_connected(Duration::from_secs(30));
    let small = b.size();
    assert!(small < alone, "beta {small} vs alpha {alone}");
    assert_eq!(a.size(), small, "alpha does not export the agreed size");
    assert!(
        std::fs::read_to_string(a.log_path())
            .unwrap_or_default()
            .contains(&format!("exporting {small} bytes from now on")),
        "{}",
        a.log_tail(20)
    );
    a.ctl_ok(&["primary", "--force"]);
    let out = run_ok(
        Command::new("nbdinfo").arg("--size").arg(a.uri()),
        CMD_TIMEOUT,
    );
    assert_eq!(out.stdout.trim(), small.to_string(), "the client's size");
    c.wait_in_sync(SYNC_TIMEOUT);
    let file = c.dir().path().join("data");
    write_random_file(&file, 4 << 20);
    a.nbdcopy_in(&file);
    c.wait_in_sync(SYNC_TIMEOUT);

    // Kept across a restart: alpha comes back at the agreed size before any connect.
    a.ctl_ok(&["secondary"]);
    a.ctl_ok(&["down"]);
    let md = a.ctl_ok(&["dump-md"]).stdout;
    assert!(
        md.contains(&format!("agreed-size     {small}")),
        "dump-md:\n{md}"
    );
    b.ctl_ok(&["down"]);
    a.up();
    assert_eq!(a.size(), small, "alpha's size after a restart");
    // Failover to alpha with beta away, then beta's failback: connected, not refused.
    a.ctl_ok(&["primary", "--force"]);
    a.nbdcopy_in(&file);
    b.up();
    c.wait_in_sync(SYNC_TIMEOUT);
    assert_eq!(b.status_json()["role"], "secondary");
    c.assert_replicas_identical(small, "after beta's failback");

    // A replacement disk for beta that is smaller still: alpha, which holds the data, does
    // not shrink to it; beta is refused with both sizes.
    b.ctl_ok(&["down"]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(b.backing_path())
        .expect("beta's backing file");
    f.set_len(256 * 1024 * 1024 - (32 << 20))
        .expect("shrink beta's file");
    drop(f);
    b.ctl_ok(&["create-md", "--force"]);
    b.up();
    a.wait_repl(CONNECT_TIMEOUT, "refusing the smaller disk", |r| {
        r["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("too small") && e.contains(&small.to_string()))
    });
    assert_eq!(
        a.size(),
        small,
        "alpha shrank to a smaller replacement disk"
    );
}

/// A fresh node on a larger disk becomes the secondary of a smaller primary: it shrinks to the
/// primary's size at its first connect and takes the initial sync, then a switchover, without
/// a restart (the bitmap it sends at each connect still covers its whole disk; the primary
/// reads what the pair exports of it).
#[test]
fn a_larger_fresh_secondary_syncs_from_a_smaller_primary_and_takes_over() {
    let c = pair_of_two_sizes("agreed-size-secondary");
    let (a, b) = (c.alpha(), c.beta());
    b.up();
    b.ctl_ok(&["primary", "--force"]);
    let small = b.size();
    let file = c.dir().path().join("data");
    write_random_file(&file, 4 << 20);
    b.nbdcopy_in(&file);
    a.up();
    let synced = |primary: &Node, what: &str| {
        primary.wait_repl(SYNC_TIMEOUT, what, |r| {
            r["connection"] == "connected"
                && r["peer_disk"] == "up-to-date"
                && r["out_of_sync"] == 0
                && r["lag_writes"] == 0
        })
    };
    synced(b, "alpha synced from beta");
    assert_eq!(a.size(), small, "alpha does not export the agreed size");
    c.assert_replicas_identical(small, "after alpha's initial sync");
    // Switchover: alpha, still at its first start, becomes the primary.
    b.ctl_ok(&["secondary"]);
    a.wait_repl(CONNECT_TIMEOUT, "connected to a secondary", |r| {
        r["connection"] == "connected" && r["peer_role"] == "secondary"
    });
    a.ctl_ok(&["primary"]);
    write_random_file(&file, 4 << 20);
    a.nbdcopy_in(&file);
    synced(a, "beta follows alpha");
    c.assert_replicas_identical(small, "after the switchover");
    a.ctl_ok(&["secondary"]);
    a.down();
    b.down();
}

/// Takes down, on drop, whatever daemon a test started from a second config (only one that
/// should have been refused; a pass leaves nothing to stop).
struct DownOnDrop(std::path::PathBuf);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        // Never a panic here (one while unwinding aborts the test binary): a `down` that
        // hangs is given up on, and whatever runs from that config is killed.
        let _ = run_quiet(
            Command::new(bin_dir().join("blockrep-ctl"))
                .arg("-c")
                .arg(&self.0)
                .args(["-n", "alpha", "down", "--force"]),
            CMD_TIMEOUT,
        );
        for pid in pids_with_arg(&self.0.to_string_lossy()) {
            kill9(pid);
            wait_pid_gone(pid, Duration::from_secs(5));
        }
    }
}

/// A second daemon for a disk a running daemon holds (a copy of the config with other sockets
/// and ports, the way an admin could start one by mistake) is refused before it reads or
/// writes the metadata, and so is `create-md --force` through it; the running pair is
/// untouched and goes on replicating.
#[test]
fn a_second_daemon_on_a_disk_in_use_is_refused_and_writes_nothing() {
    let c = Cluster::builder("disk-in-use").nodes(2).build();
    c.start_pair();
    c.wait_in_sync(Duration::from_secs(60));
    let a = c.alpha();
    let size = a.size();
    let text = std::fs::read_to_string(c.config_path()).unwrap();
    let mut copy = String::new();
    let mut in_alpha = false;
    for line in text.lines() {
        if line.starts_with('[') {
            in_alpha = line.trim() == "[node.alpha]";
        }
        let key = line.split('=').next().unwrap_or("").trim();
        let line = match (in_alpha, key) {
            (true, "replication" | "export") => {
                format!("{key} = \"127.0.0.1:{}\"", free_port())
            }
            (true, "control") => {
                format!("control = {:?}", c.dir().path().join("alpha2.ctl"))
            }
            (true, "log-file") => {
                format!("log-file = {:?}", c.dir().path().join("alpha2.log"))
            }
            _ => line.to_string(),
        };
        copy.push_str(&line);
        copy.push('\n');
    }
    let copy_path = c.dir().path().join("copy.toml");
    std::fs::write(&copy_path, copy).unwrap();
    let _guard = DownOnDrop(copy_path.clone());
    let ctl = |args: &[&str]| {
        run(
            Command::new(bin_dir().join("blockrep-ctl"))
                .arg("-c")
                .arg(&copy_path)
                .args(["-n", "alpha"])
                .args(args),
            CMD_TIMEOUT,
        )
    };
    let before = a.status_json();

    for args in [&["up"][..], &["create-md", "--force"][..]] {
        let out = ctl(args);
        assert_ne!(
            out.code,
            Some(0),
            "{args:?} on a disk in use\n{}",
            out.describe()
        );
        let said = format!("{}{}", out.stdout, out.stderr);
        assert!(
            said.contains("in use") && said.contains("alpha.img"),
            "{args:?}: the refusal should name the disk and say it is in use\n{}",
            out.describe()
        );
    }
    let second_log = std::fs::read_to_string(c.dir().path().join("alpha2.log")).unwrap_or_default();
    for needle in ["activity-log", "was primary", "journal:", "up on node"] {
        assert!(
            !second_log.contains(needle),
            "the refused daemon went as far as {needle:?}:\n{second_log}"
        );
    }

    // The running node is as it was, and the pair goes on.
    let s = a.status_json();
    assert_eq!(s["role"], "primary", "{s}");
    assert_eq!(s["pid"], before["pid"], "{s}");
    assert_eq!(s["replication"]["out_of_sync"], 0, "{s}");
    let mut r = a.raw_open();
    r.write_at(0, &vec![0x5a; 1 << 20], 0).expect("write");
    r.command(CMD_FLUSH, 0, 0, 0).expect("flush");
    r.disconnect();
    c.wait_in_sync(Duration::from_secs(30));
    c.assert_replicas_identical(size, "after the refused second daemon");
}

/// The control socket admits root and the daemon's own user only, by the credentials the
/// kernel gives, even when its mode would let others in (as in the instant between bind and
/// chmod, or after an admin's chmod).
#[test]
fn the_control_socket_refuses_other_users() {
    let c = Cluster::builder("ctl-cred").nodes(1).build();
    let n = c.node("alpha");
    n.create_md();
    n.up();
    let sock = n.control_path().to_path_buf();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
        std::fs::set_permissions(c.dir().path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let script = format!(
        "import socket\ns = socket.socket(socket.AF_UNIX)\ns.settimeout(10)\ns.connect({:?})\n\
         try:\n    s.sendall(b'{{\"cmd\":\"status\"}}\\n')\n    print(repr(s.recv(4096)))\n\
         except (ConnectionResetError, BrokenPipeError):\n    print('reset')\n",
        sock.to_string_lossy()
    );
    let out = run(
        Command::new("runuser").args(["-u", "nobody", "--", "python3", "-c", &script]),
        CMD_TIMEOUT,
    );
    assert!(
        out.success() && matches!(out.stdout.trim(), "b''" | "reset"),
        "a connection from nobody got an answer (or could not be tried):\n{}",
        out.describe()
    );
    assert!(
        std::fs::read_to_string(n.log_path())
            .unwrap_or_default()
            .contains("control connection refused: uid 65534"),
        "{}",
        n.log_tail(10)
    );
    // Root still gets its answers.
    assert_eq!(n.status_json()["up"], true);
}

/// SIGTERMs `n`'s daemon (a service stop: a forced `down`) and waits for it to exit.
fn service_stop(n: &Node) {
    let pid = n.pid().expect("daemon pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    assert!(
        wait_pid_gone(pid, Duration::from_secs(30)),
        "{} did not stop",
        n.name()
    );
}

/// Waits until the primary `p` has its peer connected with every write applied.
fn wait_caught_up(p: &Node) {
    p.wait_repl(SYNC_TIMEOUT, "the peer caught up", |r| {
        r["connection"] == "connected"
            && r["lag_writes"] == 0
            && r["out_of_sync"] == 0
            && r["seq_applied"] == r["seq_written"]
    });
}

/// A primary that goes down cleanly (a service stop: SIGTERM is a forced `down`) hands its
/// peer every write and tells it so; the peer is then promoted with a plain `primary`, as an
/// admin used to DRBD expects after a planned shutdown, and `status` says why while the peer
/// stays down (also on the node that dials, whose redials fail meanwhile). The old primary
/// comes back as the catch-up target. A primary killed with -9 still leaves its peer needing
/// `--force`.
#[test]
fn a_primary_that_goes_down_cleanly_leaves_its_peer_promotable_without_force() {
    let c = Cluster::synced_pair("clean-leave", 64 << 20, |b| b);
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    // Alpha (the node that dials: its name sorts first) goes down, then beta.
    for (round, (p, s)) in [(a, b), (b, a)].into_iter().enumerate() {
        let file = c.dir().path().join(format!("data{round}"));
        let data = write_random_file(&file, 4 << 20);
        p.nbdcopy_in(&file);
        // At once after the writes: the down hands them over.
        service_stop(p);
        s.wait_repl(
            CONNECT_TIMEOUT,
            "told that its primary went down cleanly",
            |r| {
                r["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("went down cleanly"))
            },
        );
        // Still said after the redials to the stopped node have failed for a while.
        std::thread::sleep(Duration::from_secs(2));
        let r = s.repl();
        assert!(
            r["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("went down cleanly")),
            "{}: {r}",
            s.name()
        );
        let out = s.ctl_ok(&["primary"]).stdout;
        assert!(out.contains("gone down cleanly"), "{out}");
        // The clean leave is history once it promoted: not on disk for a later `primary`
        // after a restart to rely on.
        let md = s.ctl_ok(&["dump-md"]).stdout;
        assert!(
            md.contains("peer-left       false"),
            "{}'s dump-md:\n{md}",
            s.name()
        );
        // No peer has taken anything of this primary's stream yet: no marks of an earlier
        // period (as a secondary, or an earlier primary) shown as if they were.
        let r = s.repl();
        assert!(
            r["seq_sent"] == 0 && r["seq_received"] == 0 && r["seq_applied"] == 0,
            "{}'s status after its promotion: {r}",
            s.name()
        );
        assert_eq!(
            &s.backing_data(4 << 20)[..],
            &data[..],
            "{} lacks {}'s last writes",
            s.name(),
            p.name()
        );
        let more = c.dir().path().join(format!("more{round}"));
        write_random_file(&more, 2 << 20);
        s.nbdcopy_in(&more);
        // The old primary comes back as a secondary and catches up.
        p.up();
        wait_caught_up(s);
        c.assert_replicas_identical(size, &format!("after {} came back", p.name()));
        assert_eq!(p.status_json()["role"], "secondary");
    }

    // `down` says what it left the peer (here, through the CLI rather than a signal).
    let file = c.dir().path().join("said");
    write_random_file(&file, 1 << 20);
    a.nbdcopy_in(&file);
    let down = a.ctl_ok(&["down"]).stdout;
    assert!(
        down.contains("knows this node went down cleanly: a plain `primary` there promotes it"),
        "{down}"
    );
    a.up();
    wait_caught_up(a);
    // A switchover there and back, so that beta was primary once in this daemon's life.
    a.ctl_ok(&["secondary"]);
    b.ctl_ok(&["primary"]);
    let file = c.dir().path().join("switched");
    write_random_file(&file, 1 << 20);
    b.nbdcopy_in(&file);
    wait_caught_up(b);
    b.ctl_ok(&["secondary"]);
    a.ctl_ok(&["primary"]);
    a.nbdcopy_in(&file);
    wait_caught_up(a);

    // A crash is not a clean leave: beta needs --force.
    let pid = a.pid().expect("alpha's pid");
    a.kill9();
    assert!(wait_pid_gone(pid, Duration::from_secs(10)));
    b.wait_not_connected(CONNECT_TIMEOUT);
    let out = b.ctl(&["primary"]);
    assert!(
        !out.success() && out.stderr.contains("--force"),
        "a plain primary after the peer's crash:\n{}",
        out.describe()
    );
    b.ctl_ok(&["primary", "--force"]);
    // Its marks as the primary it was before are not this primary's stream.
    let r = b.repl();
    assert!(
        r["seq_sent"] == 0 && r["seq_received"] == 0 && r["seq_applied"] == 0,
        "beta's status after its forced promotion: {r}"
    );
}

/// `down` on the secondary `leaving` says it handed over, and a plain `primary` then
/// promotes `peer`.
fn down_then_plain_primary(leaving: &Node, peer: &Node) {
    let down = leaving.ctl_ok(&["down"]).stdout;
    assert!(
        down.contains("holds the same data and knows this node went down cleanly"),
        "{down}"
    );
    let out = peer.ctl_ok(&["primary"]).stdout;
    assert!(out.contains("gone down cleanly"), "{out}");
}

/// DRBD's habit for a planned stop: `secondary`, then `down` on the old primary. With both
/// nodes holding the same data, the one left is told, and a plain `primary` promotes it;
/// also when the node going down was the target of a resync from its (secondary) peer. A
/// node that goes down while it lacks data (in the middle of that resync) tells nothing,
/// and its peer still needs `--force`.
#[test]
fn a_secondary_that_goes_down_with_the_same_data_leaves_its_peer_promotable() {
    let c = Cluster::synced_pair("secondary-leave", 64 << 20, |b| {
        b.resource_line("resync-rate = \"2M\"")
    });
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let file = c.dir().path().join("data");
    write_random_file(&file, 8 << 20);
    a.nbdcopy_in(&file);
    wait_caught_up(a);
    a.ctl_ok(&["secondary"]);
    b.wait_repl(CONNECT_TIMEOUT, "connected to a secondary", |r| {
        r["connection"] == "connected" && r["peer_role"] == "secondary"
    });
    down_then_plain_primary(a, b);
    b.nbdcopy_in(&file);
    a.up();
    wait_caught_up(b);
    c.assert_replicas_identical(size, "after alpha came back");

    // Two secondaries; alpha fetches everything from beta (a resync paced at 2 MiB/s, so
    // several seconds for its 8 MiB of data) and goes down in the middle: it lacks data, so
    // it tells nothing.
    b.ctl_ok(&["secondary"]);
    a.wait_repl(CONNECT_TIMEOUT, "connected to a secondary", |r| {
        r["connection"] == "connected" && r["peer_role"] == "secondary"
    });
    // Paused on its source from the start (`pause-sync`), so that the down surely comes in
    // the middle; lifted once alpha is down.
    b.ctl_ok(&["pause-sync"]);
    a.ctl_ok(&["invalidate"]);
    a.wait_repl(CONNECT_TIMEOUT, "resyncing", |r| {
        r["connection"] == "sync-target"
    });
    let down = a.ctl_ok(&["down"]).stdout;
    b.ctl_ok(&["resume-sync"]);
    assert!(!down.contains("went down cleanly"), "{down}");
    let out = b.ctl(&["primary"]);
    assert!(
        !out.success() && out.stderr.contains("--force"),
        "a plain primary after a down in the middle of a resync:\n{}",
        out.describe()
    );

    // Back, the resync ends (alpha its target, beta a secondary source); then alpha's down
    // hands over again.
    a.up();
    a.wait_repl(Duration::from_secs(60), "resynced", |r| {
        r["connection"] == "connected" && r["out_of_sync"] == 0
    });
    b.wait_repl(SYNC_TIMEOUT, "resynced", |r| {
        r["connection"] == "connected" && r["out_of_sync"] == 0
    });
    c.assert_replicas_identical(size, "after the resync from a secondary");
    down_then_plain_primary(a, b);
}

/// What the survivor of a clean leave was told is kept in its metadata: a restart of the
/// survivor (here a kill -9, so only what was made durable counts) still promotes it with a
/// plain `primary`, and says why. The `peer-lost` handler hears that the stop was planned
/// (`BLOCKREP_PEER_LEFT_CLEANLY=yes`; `no` after a crash). Once the peer is back the record
/// is gone from the metadata too: after the peer's later crash, a restarted survivor needs
/// `--force` again (a record that outlived the peer's return would promote it over the
/// writes the peer made since).
#[test]
fn a_clean_leave_is_remembered_across_a_restart_of_the_survivor_until_the_peer_returns() {
    let c = Cluster::builder("clean-leave-kept")
        .nodes(2)
        .backing_size(64 << 20)
        .journal_size("8M")
        .build();
    let hlog = c.dir().path().join("peer-lost.log");
    let script = c.dir().path().join("peer-lost.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$BLOCKREP_NODE $BLOCKREP_EVENT left-cleanly=$BLOCKREP_PEER_LEFT_CLEANLY\" >> '{}'\n",
            hlog.display()
        ),
    )
    .expect("write peer-lost.sh");
    run_ok(Command::new("chmod").arg("755").arg(&script), CMD_TIMEOUT);
    c.write_config(&format!(
        "{}\n[handlers]\npeer-lost = \"{}\"\n",
        c.config_text(),
        script.display()
    ));
    c.start_pair();
    c.wait_in_sync(SYNC_TIMEOUT);
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let handler_said = |line: &str| {
        let deadline = std::time::Instant::now() + CONNECT_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&hlog).unwrap_or_default();
            if text.lines().any(|l| l == line) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no handler line {line:?}; the log has:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    let file = c.dir().path().join("data");
    let data = write_random_file(&file, 4 << 20);
    a.nbdcopy_in(&file);
    let down = a.ctl_ok(&["down"]).stdout;
    assert!(down.contains("knows this node went down cleanly"), "{down}");
    handler_said("beta peer-lost left-cleanly=yes");

    // The survivor crashes and comes back before anyone promotes it.
    let pid = b.pid().expect("beta's pid");
    b.kill9();
    assert!(wait_pid_gone(pid, Duration::from_secs(10)));
    b.up();
    let r = b.repl();
    assert!(
        r["peer_left"] == true
            && r["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("went down cleanly")),
        "beta's status after its restart: {r}"
    );
    // A stranger that names alpha but cannot prove the secret clears nothing (it used to:
    // the record went at any hello naming the peer, so a plain `primary` needed --force).
    stranger_fails_the_proof(b, "alpha");
    let r = b.repl();
    assert!(
        r["peer_left"] == true && r["auth_failures"].as_u64() >= Some(1),
        "beta's record after a stranger's hello: {r}"
    );
    // The other side of it: alpha, which handed over, is not promoted alone (beta may have
    // been promoted meanwhile; no fence could tell), until the two meet again.
    b.ctl_ok(&["down"]);
    let md = a.ctl_ok(&["dump-md"]).stdout;
    assert!(
        md.contains("handed-over     true"),
        "alpha's dump-md:\n{md}"
    );
    a.up();
    a.assert_primary_refused(
        &["went down cleanly before and told beta", "--force"],
        "alpha alone after handing over",
    );
    a.ctl_ok(&["down"]);
    b.up();
    assert_eq!(b.repl()["peer_left"], true, "{}", b.repl());
    let out = b.ctl_ok(&["primary"]).stdout;
    assert!(out.contains("gone down cleanly"), "{out}");
    assert_eq!(
        &b.backing_data(4 << 20)[..],
        &data[..],
        "beta lacks alpha's writes"
    );

    // Alpha returns (its handshake clears beta's record, and alpha's own), catches up, and
    // takes over in a planned switchover; then it crashes with writes beta holds too, but
    // was never told about as a leave.
    a.up();
    wait_caught_up(b);
    let md = a.ctl(&["dump-md"]).stdout;
    assert!(
        md.contains("handed-over     false"),
        "alpha's dump-md:\n{md}"
    );
    b.ctl_ok(&["secondary"]);
    a.ctl_ok(&["primary"]);
    let more = c.dir().path().join("more");
    write_random_file(&more, 2 << 20);
    a.nbdcopy_in(&more);
    wait_caught_up(a);
    c.assert_replicas_identical(size, "after the switchover");
    let pid = a.pid().expect("alpha's pid");
    a.kill9();
    assert!(wait_pid_gone(pid, Duration::from_secs(10)));
    handler_said("beta peer-lost left-cleanly=no");
    let pid = b.pid().expect("beta's pid");
    b.kill9();
    assert!(wait_pid_gone(pid, Duration::from_secs(10)));
    b.up();
    assert_eq!(b.repl()["peer_left"], false, "{}", b.repl());
    b.assert_primary_refused(&["--force"], "after the returned peer's crash");
}

/// A secondary's `down` while its primary goes on: what it applied is made durable and
/// acknowledged first, so the primary counts nothing of its stream as lacking (it used to
/// resend the tail the secondary had not yet made durable, as an admin trial saw: a bitmap
/// resync at the next connect for nothing, and a new generation that made a later failover
/// a split brain), and the primary is told it is a planned stop.
#[test]
fn a_secondary_that_goes_down_acknowledges_everything_it_applied() {
    let c = Cluster::synced_pair("secondary-down-ack", 64 << 20, |b| b.protocol("C"));
    let (a, b) = (c.alpha(), c.beta());
    // Writes with no flush and no FUA: beta applies them (protocol C) but has no reason to
    // make them durable before its next checkpoint.
    let mut client = a.raw_open();
    for i in 0..64u64 {
        client
            .write_at(i * 65536, &[i as u8 + 1; 65536], 0)
            .expect("write");
    }
    client.disconnect();
    let r = a.repl();
    assert!(
        r["seq_durable"].as_u64() < r["seq_applied"].as_u64(),
        "beta made the writes durable already (a checkpoint ran?): {r}"
    );
    b.ctl_ok(&["down"]);
    // Until the link's end is recorded (alpha shows the link down a moment before it sets
    // why).
    let r = a.wait_repl(CONNECT_TIMEOUT, "the end of the link recorded", |r| {
        r["connection"] != "connected" && !r["last_error"].is_null()
    });
    assert_eq!(
        r["out_of_sync"], 0,
        "alpha counts writes beta applied as lacking after beta's down: {r}"
    );
    // A planned stop, said as such; and no new generation for writes beta did not lack.
    assert!(
        r["peer_stopped"] == true
            && r["peer_left"] == false
            && r["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("went down cleanly (a planned stop)")),
        "alpha's status after beta's down: {r}"
    );
    let log = std::fs::read_to_string(a.log_path()).unwrap_or_default();
    assert!(
        !log.contains("peer away: new data generation"),
        "{}",
        a.log_tail(20)
    );
    assert!(
        std::fs::read_to_string(b.log_path())
            .unwrap_or_default()
            .contains("everything applied here is durable and acknowledged to the primary"),
        "{}",
        b.log_tail(20)
    );
    // An admin trial's sequence: the primary then crashes, idle; beta comes back and is
    // forced primary; alpha returns as its resync target, not as the other side of a split
    // brain (its stop of beta started no generation of its own).
    let pid = a.pid().expect("alpha's pid");
    a.kill9();
    assert!(wait_pid_gone(pid, Duration::from_secs(10)));
    b.up();
    b.ctl_ok(&["primary", "--force"]);
    a.up();
    b.wait_repl(SYNC_TIMEOUT, "alpha caught up", |r| {
        r["connection"] == "connected" && r["out_of_sync"] == 0 && r["lag_writes"] == 0
    });
    assert_eq!(a.status_json()["role"], "secondary");
    let log = std::fs::read_to_string(a.log_path()).unwrap_or_default();
    assert!(!log.contains("split brain"), "{}", a.log_tail(30));
    c.assert_replicas_identical(a.size(), "after beta's failover and alpha's return");
}

/// Connects to `n`'s replication port as a node calling itself `name`, with `n`'s own
/// settings, and sends a wrong proof: the handshake must get to the proof and fail there.
fn stranger_fails_the_proof(n: &Node, name: &str) {
    use std::io::{Read, Write};
    let r = n.repl();
    let frame = |msg: &proto::peer::Msg| {
        let mut v = Vec::new();
        proto::peer::encode_frame(&mut v, msg, &[]);
        v
    };
    let hello = proto::peer::Msg::Hello {
        version: proto::peer::PROTOCOL_VERSION,
        resource: n.resource().to_string(),
        node: name.to_string(),
        nonce: [7; 32],
        encryption: false,
        protocol: r["protocol"]
            .as_str()
            .and_then(|p| p.bytes().next())
            .unwrap_or(b'C'),
        bitmap_granularity: 4096,
        after_sb_0pri: 0,
        direct_io: false,
    };
    let mut s = std::net::TcpStream::connect(n.replication_addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(&frame(&hello)).expect("send hello");
    s.write_all(&frame(&proto::peer::Msg::Auth { mac: [0; 32] }))
        .expect("send proof");
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("authentication failed"),
        "{}'s answer to a stranger's proof: {text:?}",
        n.name()
    );
}

/// `connect` then at once `primary` (a script's habit): the promotion waits for the link the
/// connect asked for, as after a role change, rather than refusing an "unknown" peer whose
/// link was lost long ago (a review finding on the shorter wait for a lost peer).
#[test]
fn a_primary_right_after_connect_waits_for_the_peer() {
    let c = Cluster::synced_pair("primary-after-connect", 64 << 20, |b| b);
    let (a, b) = (c.alpha(), c.beta());
    a.ctl_ok(&["secondary"]);
    b.ctl_ok(&["disconnect"]);
    a.wait_not_connected(CONNECT_TIMEOUT);
    std::thread::sleep(Duration::from_secs(3));
    b.ctl_ok(&["connect"]);
    let out = b.ctl_ok(&["primary"]).stdout;
    assert!(out.contains("is now primary"), "{out}");
}

/// Single primary holds when both secondaries of a connected pair are told `primary` at the
/// same moment (two admins, or a cluster manager on each node): a promotion asks the peer
/// first, as DRBD's cluster-wide state change does, so exactly one node wins each round and
/// the other is refused saying why. Before, each saw a secondary peer and both became
/// primary, found only at the next handshake as a split brain.
#[test]
fn two_secondaries_promoted_at_the_same_moment_give_exactly_one_primary() {
    let c = Cluster::synced_pair("promote-race", 64 << 20, |b| b);
    let (a, b) = (c.alpha(), c.beta());
    a.ctl_ok(&["secondary"]);
    for round in 0..6 {
        for n in [a, b] {
            n.wait_repl(CONNECT_TIMEOUT, "connected to a secondary peer", |r| {
                r["connection"] == "connected" && r["peer_role"] == "secondary"
            });
        }
        let barrier = std::sync::Barrier::new(2);
        let (ra, rb) = std::thread::scope(|s| {
            let ta = s.spawn(|| {
                barrier.wait();
                a.ctl(&["primary"])
            });
            let tb = s.spawn(|| {
                barrier.wait();
                b.ctl(&["primary"])
            });
            (
                ta.join().expect("alpha's primary"),
                tb.join().expect("beta's primary"),
            )
        });
        let roles = (
            a.status_json()["role"].clone(),
            b.status_json()["role"].clone(),
        );
        let winners: Vec<&Node> = [(a, &ra), (b, &rb)]
            .into_iter()
            .filter(|(_, r)| r.success())
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            winners.len(),
            1,
            "round {round}: {} promotions succeeded (roles now {roles:?})\nalpha: {}\nbeta: {}",
            winners.len(),
            ra.describe(),
            rb.describe()
        );
        let (winner, loser, lost) = if ra.success() {
            (a, b, &rb)
        } else {
            (b, a, &ra)
        };
        assert!(
            lost.stderr.contains("primary"),
            "round {round}: the refusal does not say the peer is (being made) primary:\n{}",
            lost.describe()
        );
        assert_eq!(winner.status_json()["role"], "primary", "round {round}");
        assert_eq!(loser.status_json()["role"], "secondary", "round {round}");
        loser.wait_repl(CONNECT_TIMEOUT, "connected to the winner as primary", |r| {
            r["connection"] == "connected" && r["peer_role"] == "primary"
        });
        winner.ctl_ok(&["secondary"]);
    }
}
