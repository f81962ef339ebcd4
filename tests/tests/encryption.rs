//! Link encryption (`encryption = "aes-256-gcm"`): real daemons talking through the harness's
//! TCP proxy, which watches the bytes on the wire for a plaintext marker and can alter them.

use std::time::Duration;

use blockrep_e2e::nbd_const::CMD_FLUSH;
use blockrep_e2e::*;
use serde_json::Value;

const BACKING: u64 = 128 << 20;
const MIB: usize = 1 << 20;
const SEALED: &str = "encryption = \"aes-256-gcm\"";

fn pair(test: &str, encrypted: bool) -> Cluster {
    let mut b = Cluster::builder(test)
        .nodes(2)
        .backing_size(BACKING)
        .protocol("C")
        .beta_via_proxy();
    if encrypted {
        b = b.resource_line(SEALED);
    }
    let c = b.build();
    c.start_pair();
    c
}

/// 1 MiB of a recognisable text, repeated: what an eavesdropper would look for.
fn marked(tag: &str) -> (Vec<u8>, Vec<u8>) {
    let needle = format!("CONFIDENTIAL-{tag}-PAYROLL-RECORD;").into_bytes();
    let data: Vec<u8> = needle.iter().copied().cycle().take(MIB).collect();
    (needle, data)
}

/// Writes `data` at `offset` of the node's export and flushes (raw NBD client).
fn write(node: &Node, offset: u64, data: &[u8]) {
    let mut r = node.raw_open();
    r.write_at(offset, data, 0)
        .unwrap_or_else(|e| panic!("NBD write at {offset} failed: errno {e}"));
    r.command(CMD_FLUSH, 0, 0, 0)
        .unwrap_or_else(|e| panic!("NBD flush failed: errno {e}"));
    r.disconnect();
}

fn log_text(n: &Node) -> String {
    String::from_utf8_lossy(&std::fs::read(n.log_path()).unwrap_or_default()).into_owned()
}

fn wait_log(n: &Node, needle: &str, timeout: Duration) -> String {
    let ok = wait_for(timeout, || log_text(n).contains(needle));
    let text = log_text(n);
    assert!(
        ok,
        "{}'s log has no {needle:?} after {timeout:?}:\n{}",
        n.name(),
        n.log_tail(30)
    );
    text.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn sealed_link_replicates_and_hides_the_data() {
    // The control: without encryption the marker is on the wire, so the watch works.
    let plain = pair("enc-plain", false);
    let (needle, data) = marked("plain");
    plain.proxy().watch_for(&needle);
    write(plain.alpha(), 0, &data);
    plain.wait_in_sync(SYNC_TIMEOUT);
    assert!(
        plain.proxy().needle_seen(),
        "the unencrypted link did not carry the marker in the clear (is the watch broken?)"
    );
    assert_eq!(plain.alpha().repl()["encryption"], "none");
    drop(plain);

    let c = pair("enc-sealed", true);
    let (a, b) = (c.alpha(), c.beta());
    for n in [a, b] {
        let r: Value = n.repl();
        assert_eq!(r["encryption"], "aes-256-gcm", "{}: {r}", n.name());
    }
    let (needle, data) = marked("sealed");
    c.proxy().watch_for(&needle);
    let before = c.proxy().bytes_forwarded();
    for i in 0..8u64 {
        write(a, i * MIB as u64, &data);
    }
    c.wait_in_sync(SYNC_TIMEOUT);
    let moved = c.proxy().bytes_forwarded() - before;
    assert!(
        moved >= 8 * MIB as u64,
        "only {moved} bytes crossed the proxy for 8 MiB of writes"
    );
    assert!(
        !c.proxy().needle_seen(),
        "the marker crossed the sealed link in the clear"
    );
    c.assert_replicas_identical(a.size(), "after writes over the sealed link");
    assert_eq!(b.backing_data(MIB as u64), data, "beta's first MiB");
}

#[test]
fn encryption_mismatch_is_refused_on_both_sides() {
    let c = Cluster::builder("enc-mismatch")
        .nodes(2)
        .backing_size(BACKING)
        .resource_line(SEALED)
        .build();
    let (a, b) = (c.alpha(), c.beta());
    a.create_md();
    b.create_md();
    a.up();
    a.primary_force();
    // beta's copy of the config lost the key (the same file on both nodes is the rule; an
    // admin who edits one node's copy gets told, not a silent plaintext link).
    let text = c.config_text().replace(SEALED, "");
    c.write_config(&text);
    b.up();
    let la = wait_log(a, "encryption differs", Duration::from_secs(20));
    let lb = wait_log(b, "encryption differs", Duration::from_secs(20));
    for l in [&la, &lb] {
        assert!(
            l.contains("aes-256-gcm") && l.contains("none"),
            "the refusal should name both settings: {l}"
        );
    }
    assert_ne!(a.repl()["connection"], "connected");
    assert_ne!(b.repl()["connection"], "connected");
    // Fixed config: they connect.
    c.write_config(&text.replace("[resource]", &format!("[resource]\n{SEALED}")));
    b.down();
    b.up();
    a.wait_connected(Duration::from_secs(30));
    b.wait_connected(Duration::from_secs(30));
}

#[test]
fn altered_sealed_traffic_is_dropped_not_written() {
    let c = pair("enc-tamper", true);
    let (a, b) = (c.alpha(), c.beta());
    let first = random_bytes(MIB);
    write(a, 0, &first);
    c.wait_in_sync(SYNC_TIMEOUT);
    let written0 = b.status_json()["io"]["bytes_written"].as_u64().unwrap_or(0);

    // A man in the middle flips one bit somewhere inside the next megabyte of alpha's stream.
    c.proxy().corrupt_after(300_000);
    let (_, second) = marked("tampered");
    write(a, 4 * MIB as u64, &second);
    assert!(
        wait_for(Duration::from_secs(10), || c.proxy().corrupted() == 1),
        "the proxy did not alter the stream"
    );
    // beta refuses the record and drops the link; the reconnect replays from the journal.
    let line = wait_log(b, "authentication", Duration::from_secs(20));
    assert!(line.contains("WARN") || line.contains("ERROR"), "{line}");
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_replicas_identical(a.size(), "after a tampered record and the reconnect");
    assert_eq!(
        &b.backing_data(5 * MIB as u64)[4 * MIB..],
        &second[..],
        "beta's copy of the tampered write"
    );
    // Nothing of the altered record was written: beta wrote the megabyte once, from the
    // replay (the first copy ended at the record that failed), and counted the record.
    let written = b.status_json()["io"]["bytes_written"].as_u64().unwrap_or(0) - written0;
    println!("beta wrote {written} bytes for a 1 MiB write sent twice");
    assert_eq!(
        written, MIB as u64,
        "beta's bytes written for the write sent twice"
    );
    let crc_errors = b.repl()["crc_errors"].as_u64();
    assert!(
        crc_errors.is_some_and(|n| n >= 1),
        "the altered record is not counted: crc_errors {crc_errors:?}"
    );
}

/// A secret read from `secret-file`: both nodes authenticate with it and replicate; a file
/// others can read is warned about at start (and one only root reads is not).
#[test]
fn a_secret_file_works_and_a_readable_one_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = TestDir::new("enc-secret-file");
    let secret = tmp.path().join("r0.secret");
    std::fs::write(&secret, "c2VjcmV0LWZyb20tYS1maWxl\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let c = Cluster::builder("enc-secret-file")
        .nodes(2)
        .backing_size(BACKING)
        .secret_file(&secret)
        .build();
    let (a, b) = (c.alpha(), c.beta());
    a.create_md();
    a.up();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    b.create_md();
    b.up();
    a.primary_force();
    a.wait_connected(Duration::from_secs(30));
    let data = random_bytes(MIB);
    write(a, 0, &data);
    c.wait_in_sync(Duration::from_secs(60));
    c.assert_replicas_identical(a.size(), "with a secret from a file");
    let warned = |n: &Node| log_text(n).contains("is readable by others (mode 644)");
    assert!(warned(a), "{}", a.log_tail(10));
    assert!(!warned(b), "{}", b.log_tail(10));
}
