//! Roles (issue 2): only a Primary serves NBD I/O. A Secondary answers NBD_OPT_GO with
//! NBD_REP_ERR_POLICY and a message, then closes; the daemon keeps running.

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
    r.expect_closed(Duration::from_secs(5))
        .expect("connection must be closed after the refusal");

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
