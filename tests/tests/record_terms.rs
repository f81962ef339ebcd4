//! Record terms: every stream record carries its issuer's term, and a journal catch-up
//! resumes only after the record the peer applied last if the primary's record at that
//! sequence has the same term. These tests check the positive side end to end (the terms a
//! node keeps across a cut, a switchover, a restart and a failback let the journal bring the
//! peer back, with no resync) and the upgrade from metadata of format 1, which kept no terms
//! (the first connect after it resyncs the bitmap instead of trusting a catch-up it cannot
//! check, and nothing is lost).

use std::path::Path;
use std::time::Duration;

use blockrep_e2e::nbd_const::*;
use blockrep_e2e::*;
use serde_json::Value;

const BACKING: u64 = 128 << 20;
const MIB: usize = 1 << 20;

fn nbd_write(node: &Node, offset: u64, data: &[u8]) {
    let mut r = node.raw_open();
    for (i, chunk) in data.chunks(MIB).enumerate() {
        let off = offset + (i * MIB) as u64;
        r.write_at(off, chunk, 0)
            .unwrap_or_else(|e| panic!("NBD write at {off} on {} failed: errno {e}", node.name()));
    }
    r.command(CMD_FLUSH, 0, 0, 0)
        .unwrap_or_else(|e| panic!("NBD flush on {} failed: errno {e}", node.name()));
    r.disconnect();
}

fn log_lines(n: &Node) -> Vec<String> {
    String::from_utf8_lossy(&std::fs::read(n.log_path()).unwrap_or_default())
        .lines()
        .map(str::to_string)
        .collect()
}

/// The node's log lines from line `mark` on.
fn since(n: &Node, mark: usize) -> Vec<String> {
    log_lines(n).into_iter().skip(mark).collect()
}

/// Waits until `primary` (either node) is connected to a secondary that applied everything
/// it wrote.
fn wait_following(primary: &Node, secondary: &Node) -> Value {
    let rp = primary.wait_repl(SYNC_TIMEOUT, "its peer caught up", |r| {
        r["connection"] == "connected"
            && r["peer_role"] == "secondary"
            && r["lag_writes"] == 0
            && r["out_of_sync"] == 0
            && r["seq_applied"] == r["seq_written"]
    });
    secondary.wait_repl(SYNC_TIMEOUT, "applied the primary's writes", |r| {
        r["seq_applied"] == rp["seq_written"]
    });
    // Whatever the primary's history (a switchover, a failover), its stream counts what it
    // sent from the peer's mark on: never "sent 0" beside everything applied.
    assert_eq!(
        rp["seq_sent"],
        rp["seq_written"],
        "{}: {rp}",
        primary.name()
    );
    rp
}

/// Asserts that the `source`'s log lines since its mark show the peer brought back from the
/// journal, not by a resync.
fn assert_journal_catch_up(source: &Node, lines: &[String], what: &str) {
    assert!(
        lines
            .iter()
            .any(|l| l.contains("streaming to the peer from sequence")),
        "{what}: {} never streamed to its peer:\n{}",
        source.name(),
        lines.join("\n")
    );
    let resyncs: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("resync to the peer ("))
        .collect();
    assert!(
        resyncs.is_empty(),
        "{what}: a resync where the journal holds every record the peer lacks: {resyncs:?}"
    );
}

/// Alpha primary, beta secondary behind the link proxy (protocol C), started and in sync.
fn pair_via_proxy(test: &str) -> Cluster {
    let c = Cluster::builder(test)
        .nodes(2)
        .backing_size(BACKING)
        .protocol("C")
        .beta_via_proxy()
        .build();
    c.start_pair();
    c
}

#[test]
fn journal_catch_ups_follow_the_terms_across_cuts_a_switchover_a_restart_and_a_failback() {
    let c = pair_via_proxy("terms-catchup");
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let mut want = vec![0u8; size as usize];
    let mut write = |n: &Node, off: usize, len: usize| {
        let d = random_bytes(len);
        nbd_write(n, off as u64, &d);
        want[off..off + len].copy_from_slice(&d);
    };
    write(a, 0, 4 * MIB);
    c.wait_in_sync(SYNC_TIMEOUT);

    // A cut: alpha writes on; the journal brings beta back.
    let ma = log_lines(a).len();
    assert!(c.proxy().cut_and_refuse() >= 1, "no link connection to cut");
    a.wait_not_connected(Duration::from_secs(10));
    write(a, 8 * MIB, 2 * MIB);
    c.proxy().resume();
    wait_following(a, b);
    assert_journal_catch_up(a, &since(a, ma), "after a cut");

    // A switchover with the old primary stopped for maintenance in between: alpha is demoted
    // and goes down, beta is promoted (by force: alpha is unreachable) and writes. The mark
    // alpha reports when it comes back is its own last record, under its own term, from its
    // superblock; beta's journal goes on right after it.
    a.ctl_ok(&["secondary"]);
    let mb = log_lines(b).len();
    a.down();
    b.wait_not_connected(Duration::from_secs(10));
    b.primary_force();
    write(b, 16 * MIB, 2 * MIB);
    a.up();
    wait_following(b, a);
    assert_journal_catch_up(
        b,
        &since(b, mb),
        "after the switchover around alpha's restart",
    );

    // Now alpha's mark is one of beta's records: a cut, and the journal again.
    let mb = log_lines(b).len();
    assert!(c.proxy().cut_and_refuse() >= 1, "no link connection to cut");
    b.wait_not_connected(Duration::from_secs(10));
    write(b, 24 * MIB, 3 * MIB);
    write(b, 17 * MIB, MIB);
    c.proxy().resume();
    wait_following(b, a);
    assert_journal_catch_up(b, &since(b, mb), "after a cut under beta");

    // Failback: alpha primary again, beta cut and caught up from alpha's journal, whose
    // records before its promotion were beta's.
    b.ctl_ok(&["secondary"]);
    a.wait_repl(CONNECT_TIMEOUT, "seeing a secondary peer", |r| {
        r["connection"] == "connected" && r["peer_role"] == "secondary"
    });
    a.ctl_ok(&["primary"]);
    write(a, 40 * MIB, 2 * MIB);
    wait_following(a, b);
    let ma = log_lines(a).len();
    assert!(c.proxy().cut_and_refuse() >= 1, "no link connection to cut");
    a.wait_not_connected(Duration::from_secs(10));
    write(a, 48 * MIB, MIB);
    c.proxy().resume();
    wait_following(a, b);
    assert_journal_catch_up(a, &since(a, ma), "after the failback and a cut");

    c.assert_replicas_identical(size, "after the catch-ups");
    assert_same_bytes(&b.backing_data(size), &want, "beta's data");
    a.assert_alive();
    b.assert_alive();
}

/// crc32c (Castagnoli), bit by bit: the superblock's checksum, for the format-1 rewrite.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Rewrites both superblock slots of the node's metadata (internal, at `offset` in the
/// backing file) as format 1 wrote them: version 1, and the payload without the fields added
/// since (format 2's two terms, format 3's `lost_writes` flag, format 4's `peer_left` and
/// `handed_over` flags, one byte each, format 5's `peer_durable` and format 6's
/// `sync_done_sent`, two varints each, and format 7's `split_primary_gen`, one varint,
/// last). Only slots
/// whose terms are both 0 could be rewritten exactly, so the terms
/// are dropped whatever they were (format 1 did not have them).
fn rewrite_as_format_1(backing: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(backing)
        .unwrap_or_else(|e| panic!("{}: {e}", backing.display()));
    let mut rewritten = 0;
    for slot_at in [offset, offset + 4096] {
        let mut slot = vec![0u8; 4096];
        f.read_exact_at(&mut slot, slot_at).unwrap();
        let version = u32::from_le_bytes(slot[8..12].try_into().unwrap());
        let len = u32::from_le_bytes(slot[12..16].try_into().unwrap()) as usize;
        if !(2..=7).contains(&version) || 16 + len + 4 > slot.len() {
            continue;
        }
        let crc = u32::from_le_bytes(slot[16 + len..20 + len].try_into().unwrap());
        assert_eq!(crc, crc32c(&slot[..16 + len]), "slot at {slot_at}: crc");
        // The two terms are the last fields: postcard varints, 1 to 10 bytes each, ending
        // in a byte below 0x80. Cut them off from the end.
        let mut end = 16 + len;
        let cut_varint = |end: &mut usize| {
            *end -= 1;
            while *end > 16 && slot[*end - 1] >= 0x80 {
                *end -= 1;
            }
        };
        if version >= 7 {
            // `split_primary_gen`: one varint (the generation it parted at as primary).
            cut_varint(&mut end);
        }
        if version >= 6 {
            // `sync_done_sent`: two varints (a resync's end not heard acknowledged).
            for _ in 0..2 {
                cut_varint(&mut end);
            }
        }
        if version >= 5 {
            // `peer_durable`: two varints (what the peer said its disk holds).
            for _ in 0..2 {
                cut_varint(&mut end);
            }
        }
        if version >= 4 {
            // `peer_left` and `handed_over`: one byte each (0 or 1: the nodes record a clean
            // leave of either side), which format 1 did not have.
            for _ in 0..2 {
                assert!(
                    slot[end - 1] <= 1,
                    "slot at {slot_at}: peer_left/handed_over"
                );
                end -= 1;
            }
        }
        if version >= 3 {
            // `lost_writes`: one byte, false on a healthy disk.
            assert_eq!(slot[end - 1], 0, "slot at {slot_at}: lost_writes set");
            end -= 1;
        }
        for _ in 0..2 {
            cut_varint(&mut end);
        }
        let new_len = end - 16;
        let mut out = slot[..end].to_vec();
        out[8..12].copy_from_slice(&1u32.to_le_bytes());
        out[12..16].copy_from_slice(&(new_len as u32).to_le_bytes());
        let crc = crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out.resize(4096, 0);
        f.write_all_at(&out, slot_at).unwrap();
        rewritten += 1;
    }
    f.sync_all().unwrap();
    assert!(
        rewritten >= 1,
        "{}: no superblock of format 2 to 7",
        backing.display()
    );
}

/// The superblocks' offset, from `dump-md` (offline).
fn superblock_offset(n: &Node) -> u64 {
    let out = n.ctl_ok(&["dump-md"]).stdout;
    out.lines()
        .find_map(|l| {
            l.strip_prefix("superblocks")?
                .trim()
                .strip_prefix("offset ")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no superblocks line in dump-md:\n{out}"))
}

#[test]
fn metadata_of_format_1_is_upgraded_and_the_first_connect_resyncs_instead_of_guessing() {
    let c = Cluster::builder("terms-upgrade")
        .nodes(2)
        .backing_size(BACKING)
        .protocol("C")
        .build();
    c.start_pair();
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    let d0 = random_bytes(6 * MIB);
    nbd_write(a, 0, &d0);
    c.wait_in_sync(SYNC_TIMEOUT);
    a.down();
    b.down();

    // Both nodes' metadata as the previous format left it: no terms.
    for n in [a, b] {
        let offset = superblock_offset(n);
        rewrite_as_format_1(n.backing_path(), offset);
        let dump = n.ctl_ok(&["dump-md"]).stdout;
        assert!(
            dump.contains("format          1 (an earlier one")
                && dump.contains("applied-term    0000000000000000"),
            "{}: the format-1 superblock was not read with unknown terms:\n{dump}",
            n.name()
        );
    }

    let (ma, mb) = (log_lines(a).len(), log_lines(b).len());
    b.up();
    a.up();
    a.ctl_ok(&["primary"]);
    let d1 = random_bytes(2 * MIB);
    nbd_write(a, 8 * MIB as u64, &d1);
    wait_following(a, b);
    // The peer's applied mark has no term: no catch-up on trust, a bitmap resync instead
    // (of nothing: both bitmaps are clean), and no split brain or full sync.
    let la = since(a, ma);
    let resync = la
        .iter()
        .find(|l| l.contains("resync to the peer ("))
        .unwrap_or_else(|| panic!("no resync after the upgrade:\n{}", la.join("\n")));
    assert!(
        resync.contains("is not this node's record there") && !resync.contains("full"),
        "the resync after the upgrade is not the term check's: {resync}"
    );
    for (n, m) in [(a, ma), (b, mb)] {
        let l = since(n, m);
        assert!(
            !l.iter()
                .any(|l| l.contains("split brain") || l.contains("panicked")),
            "{}:\n{}",
            n.name(),
            l.join("\n")
        );
    }
    c.assert_replicas_identical(size, "after the upgrade");
    let mut want = d0;
    want.resize(10 * MIB, 0);
    want[8 * MIB..].copy_from_slice(&d1);
    assert_same_bytes(&b.backing_data(10 * MIB as u64), &want, "beta's data");

    // From here on the terms are known: a cut is caught up from the journal again.
    a.down();
    b.wait_not_connected(Duration::from_secs(10));
    a.up();
    let ma = log_lines(a).len();
    a.ctl_ok(&["primary"]);
    nbd_write(a, 12 * MIB as u64, &random_bytes(MIB));
    wait_following(a, b);
    assert_journal_catch_up(a, &since(a, ma), "after the upgrade and a restart");
    c.assert_replicas_identical(size, "after the upgrade and a restart");
    // Both superblocks are in the current format now, with known terms.
    a.down();
    b.down();
    for n in [a, b] {
        let dump = n.ctl_ok(&["dump-md"]).stdout;
        assert!(
            dump.contains("format          7\n")
                && !dump.contains("applied-term    0000000000000000"),
            "{}: not upgraded:\n{dump}",
            n.name()
        );
    }
}

#[test]
fn after_a_sync_between_secondaries_a_failover_is_caught_up_from_the_journal() {
    let c = pair_via_proxy("terms-secsync");
    let (a, b) = (c.alpha(), c.beta());
    let size = a.size();
    nbd_write(a, 0, &random_bytes(2 * MIB));
    c.wait_in_sync(SYNC_TIMEOUT);

    // alpha writes while beta is away, then is demoted: its data is newer (a new generation),
    // and when the link is back it brings beta up to date as a secondary.
    assert!(c.proxy().cut_and_refuse() >= 1, "no link connection to cut");
    a.wait_not_connected(Duration::from_secs(10));
    nbd_write(a, 4 * MIB as u64, &random_bytes(2 * MIB));
    a.ctl_ok(&["secondary"]);
    c.proxy().resume();
    let ra = a.wait_repl(SYNC_TIMEOUT, "beta brought up to date", |r| {
        r["connection"] == "connected" && r["out_of_sync"] == 0 && r["peer_disk"] == "up-to-date"
    });
    assert_eq!(ra["peer_role"], "secondary", "{ra}");

    // alpha goes down for maintenance and beta takes over (by force: alpha is away). What
    // alpha reports when it is back is the end of the stream it sent itself (its `down`
    // added nothing to it), so beta's journal goes on right after it.
    let mb = log_lines(b).len();
    a.down();
    b.wait_not_connected(Duration::from_secs(10));
    b.primary_force();
    nbd_write(b, 8 * MIB as u64, &random_bytes(MIB));
    a.up();
    wait_following(b, a);
    assert_journal_catch_up(b, &since(b, mb), "after the sync between secondaries");
    c.assert_replicas_identical(size, "after the failover");
    a.assert_alive();
    b.assert_alive();
}
