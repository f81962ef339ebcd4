//! Hostile and broken NBD clients (issue 2). Each case is followed by a good client that must
//! still be served, by the same daemon process.

use std::time::Duration;

use blockrep_e2e::nbd_const::*;
use blockrep_e2e::*;

const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// The daemon is the same process as before, still serves nbdinfo and a raw write/read.
fn good_client_still_works(c: &Cluster, pid: u32) {
    let a = c.alpha();
    assert!(
        pid_alive(pid),
        "daemon (pid {pid}) died\n--- log tail ---\n{}",
        a.log_tail(60)
    );
    let st = a.status_json();
    assert_eq!(
        st["pid"].as_u64(),
        Some(pid as u64),
        "daemon was replaced: {st}"
    );
    assert_eq!(st["up"], true, "{st}");
    assert_eq!(st["role"], "primary", "{st}");
    let size = st["size"].as_u64().expect("size");
    assert_eq!(nbdinfo_size(&a.uri()), size);
    let mut r = a.raw_open();
    let data = random_bytes(4096);
    r.write_at(1 << 20, &data, 0)
        .expect("write after bad client");
    assert_same_bytes(
        &r.read_at(1 << 20, 4096).expect("read"),
        &data,
        "good client",
    );
    r.disconnect();
}

/// `dump-md` once two reads 300 ms apart agree (metadata may be persisted lazily after a
/// flush; the comparison must only see what the rejected requests could have changed).
fn settled_dump_md(a: &Node) -> String {
    let mut prev = a.ctl_ok(&["dump-md"]).stdout;
    assert!(!prev.trim().is_empty(), "dump-md printed nothing");
    for _ in 0..15 {
        std::thread::sleep(Duration::from_millis(300));
        let cur = a.ctl_ok(&["dump-md"]).stdout;
        if cur == prev {
            return cur;
        }
        prev = cur;
    }
    panic!("dump-md kept changing on an idle node:\n{prev}");
}

fn setup(test: &str) -> (Cluster, u32) {
    let c = Cluster::single_primary(test);
    let pid = c.alpha().pid().expect("pid");
    (c, pid)
}

/// Parses one option reply out of raw bytes: (option, type, payload).
fn parse_option_reply(b: &[u8]) -> Option<(u32, u32, Vec<u8>)> {
    if b.len() < 20 || u64::from_be_bytes(b[0..8].try_into().ok()?) != OPT_REPLY_MAGIC {
        return None;
    }
    let opt = u32::from_be_bytes(b[8..12].try_into().ok()?);
    let ty = u32::from_be_bytes(b[12..16].try_into().ok()?);
    let len = u32::from_be_bytes(b[16..20].try_into().ok()?) as usize;
    let data = b.get(20..20 + len)?.to_vec();
    Some((opt, ty, data))
}

#[test]
fn garbage_after_greeting_closes_connection() {
    let (c, pid) = setup("garbage");
    let a = c.alpha();
    // Garbage where the client flags belong: "GET " has unknown flag bits.
    let mut r = RawNbd::connect(a.export()).expect("connect");
    r.read_greeting();
    let _ = r.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    r.expect_closed(CLOSE_WITHIN)
        .expect("server must close after invalid client flags");
    good_client_still_works(&c, pid);

    // Random bytes sent without even reading the greeting.
    let mut r = RawNbd::connect(a.export()).expect("connect");
    let _ = r.send(&random_bytes(4096));
    r.expect_closed(CLOSE_WITHIN)
        .expect("server must close a connection sending random bytes");
    good_client_still_works(&c, pid);
}

#[test]
fn bad_option_magic_closes_connection() {
    let (c, pid) = setup("bad-opt-magic");
    let mut r = RawNbd::connect(c.alpha().export()).expect("connect");
    r.start_handshake();
    let mut h = Vec::new();
    h.extend_from_slice(&0x0123_4567_89ab_cdefu64.to_be_bytes());
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes());
    let _ = r.send(&h);
    r.expect_closed(CLOSE_WITHIN)
        .expect("server must close after a bad option magic");
    good_client_still_works(&c, pid);
}

#[test]
fn one_gib_option_is_refused_without_reading_it() {
    let (c, pid) = setup("huge-opt");
    let a = c.alpha();
    // NBD_OPT_GO claiming 1 GiB of payload, none sent: the server must answer with an error
    // or close, not wait for (or allocate) 1 GiB.
    let mut r = RawNbd::connect(a.export()).expect("connect");
    r.start_handshake();
    let mut h = Vec::new();
    h.extend_from_slice(&IHAVEOPT.to_be_bytes());
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&(1u32 << 30).to_be_bytes());
    let _ = r.send(&h);
    match r.expect_closed(CLOSE_WITHIN) {
        Ok(bytes) if bytes.is_empty() => {}
        Ok(bytes) | Err(bytes) => {
            let (opt, ty, _) = parse_option_reply(&bytes).unwrap_or_else(|| {
                panic!(
                    "no close and no option reply within {CLOSE_WITHIN:?} after a 1 GiB option \
                     (got {} bytes: {:02x?})",
                    bytes.len(),
                    &bytes[..bytes.len().min(64)]
                )
            });
            assert_eq!(opt, OPT_GO);
            assert!(
                ty & REP_FLAG_ERROR != 0,
                "1 GiB option answered with {ty:#x}"
            );
        }
    }
    drop(r);
    good_client_still_works(&c, pid);

    // NBD_OPT_EXPORT_NAME cannot be answered with an error: the server must close.
    let mut r = RawNbd::connect(a.export()).expect("connect");
    r.start_handshake();
    let mut h = Vec::new();
    h.extend_from_slice(&IHAVEOPT.to_be_bytes());
    h.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    h.extend_from_slice(&(1u32 << 30).to_be_bytes());
    let _ = r.send(&h);
    r.expect_closed(CLOSE_WITHIN)
        .expect("server must close after a 1 GiB NBD_OPT_EXPORT_NAME");
    good_client_still_works(&c, pid);
}

#[test]
fn option_over_the_bound_is_answered_too_big_and_the_handshake_goes_on() {
    let (c, pid) = setup("big-opt");
    let a = c.alpha();
    // A 64 KiB NBD_OPT_GO (a name far over the spec's 4096 bytes): the server skips the data
    // the length announces, answers NBD_REP_ERR_TOO_BIG, and stays in option haggling.
    let mut r = RawNbd::connect(a.export()).expect("connect");
    r.start_handshake();
    let mut junk = RawNbd::go_payload(&"x".repeat(64 * 1024 - 6));
    junk.truncate(64 * 1024);
    r.send_option(OPT_GO, &junk).expect("send a 64 KiB option");
    let rep = r.read_option_reply().expect("a reply to the 64 KiB option");
    assert_eq!(rep.option, OPT_GO, "{rep:?}");
    assert_eq!(
        rep.reply_type,
        REP_ERR_TOO_BIG,
        "expected NBD_REP_ERR_TOO_BIG, got {:#x} ({:?})",
        rep.reply_type,
        rep.text()
    );
    assert!(rep.text().contains("65536"), "message: {:?}", rep.text());
    // The same connection goes on to a proper GO and serves I/O.
    let (size, _) = r.opt_go(a.resource()).unwrap_or_else(|e| {
        panic!(
            "GO after TOO_BIG refused: {:#x} {:?}",
            e.reply_type,
            e.text()
        )
    });
    assert_eq!(size, a.size());
    let data = random_bytes(4096);
    r.write_at(2 << 20, &data, 0).expect("write");
    assert_same_bytes(
        &r.read_at(2 << 20, 4096).expect("read"),
        &data,
        "after TOO_BIG",
    );
    r.disconnect();
    good_client_still_works(&c, pid);
}

#[test]
fn bad_request_magic_closes_connection() {
    let (c, pid) = setup("bad-req-magic");
    let mut r = c.alpha().raw_open();
    r.send_request_raw(0x1234_5678, CMD_READ, 0, 1, 0, 4096, &[])
        .expect("send");
    r.expect_closed(CLOSE_WITHIN)
        .expect("server must close after a request with a bad magic");
    good_client_still_works(&c, pid);
}

#[test]
fn oversized_write_closes_connection() {
    let (c, pid) = setup("big-write");
    let mut r = c.alpha().raw_open();
    // 64 MiB + 1 announced; the payload never comes. The server cannot resynchronise
    // with the stream, so it must close (possibly after an error reply), not wait.
    r.send_request(CMD_WRITE, 0, 0, (64 << 20) + 1, &[])
        .expect("send");
    r.expect_closed(CLOSE_WITHIN)
        .expect("server must close after a write of 64 MiB + 1");
    good_client_still_works(&c, pid);
}

#[test]
fn out_of_bounds_requests_get_errors_and_change_nothing() {
    let (c, pid) = setup("out-of-bounds");
    let a = c.alpha();
    let mut r = a.raw_open();
    let size = r.size;
    assert_eq!(size, a.size());
    let tail = vec![0xabu8; 4096];
    r.write_at(size - 4096, &tail, 0)
        .expect("write the last block");
    r.command(CMD_FLUSH, 0, 0, 0).expect("flush");
    let md_before = settled_dump_md(a);

    assert_eq!(r.read_at(size, 4096), Err(EINVAL), "read at the end");
    assert_eq!(
        r.read_at(size - 4096, 8192),
        Err(EINVAL),
        "read across the end"
    );
    assert_eq!(
        r.read_at(u64::MAX - 4095, 4096),
        Err(EINVAL),
        "read at 2^64-4096"
    );
    // The connection stays usable after each error.
    assert_same_bytes(&r.read_at(size - 4096, 4096).unwrap(), &tail, "last block");

    let junk = vec![0xcdu8; 4096];
    assert_eq!(r.write_at(size, &junk, 0), Err(ENOSPC), "write at the end");
    assert_eq!(
        r.write_at(size - 2048, &junk, 0),
        Err(ENOSPC),
        "write across the end"
    );
    assert_eq!(
        r.write_at(u64::MAX - 511, &junk[..512], 0),
        Err(ENOSPC),
        "write at 2^64-512"
    );
    // The spec: writes past the end SHOULD get ENOSPC, reads and trims EINVAL.
    assert_eq!(
        r.command(CMD_WRITE_ZEROES, 0, size - 2048, 4096),
        Err(ENOSPC),
        "zeroes across the end"
    );
    assert_eq!(
        r.command(CMD_TRIM, 0, size, 4096),
        Err(EINVAL),
        "trim past the end"
    );
    // A flag this server never offered (FAST_ZERO) or that does not exist: refused, not
    // ignored, and nothing written.
    assert_eq!(
        r.write_at(size - 4096, &junk, 1 << 6),
        Err(EINVAL),
        "write with an undefined flag"
    );
    assert_ne!(
        r.command(CMD_WRITE_ZEROES, 1 << 4, size - 4096, 4096),
        Ok(()),
        "zeroes with FAST_ZERO, never offered"
    );
    // Flags on commands that do not take them: NO_HOLE (WRITE_ZEROES only) and DF (never
    // offered: no structured-read fragmentation control).
    const NO_HOLE: u16 = 1 << 1;
    const DF: u16 = 1 << 2;
    assert_eq!(
        r.write_at(size - 4096, &junk, NO_HOLE),
        Err(EINVAL),
        "write with NO_HOLE"
    );
    assert_eq!(
        r.command(CMD_TRIM, NO_HOLE, size - 4096, 4096),
        Err(EINVAL),
        "trim with NO_HOLE"
    );
    assert_eq!(
        r.command(CMD_READ, DF, size - 4096, 4096),
        Err(EINVAL),
        "read with DF, never offered"
    );
    r.command(CMD_FLUSH, 0, 0, 0).expect("flush");
    // Nothing of the crossing write (nor the refused ones) landed.
    assert_same_bytes(
        &r.read_at(size - 4096, 4096).unwrap(),
        &tail,
        "last block after the rejected crossing write",
    );
    r.disconnect();

    let md_after = a.ctl_ok(&["dump-md"]).stdout;
    assert!(!md_after.trim().is_empty(), "dump-md printed nothing");
    assert_eq!(
        md_before, md_after,
        "rejected out-of-bounds requests changed the metadata"
    );
    let st = a.status_json();
    assert_eq!(st["size"].as_u64(), Some(size), "{st}");
    assert_eq!(st["disk"], "up-to-date", "{st}");
    good_client_still_works(&c, pid);
}

/// A zero-length write (which the spec lets a server take or refuse) on a replicated
/// primary is answered at once, without a journal record, an activity-log extent or a round
/// trip to the peer (review finding: it went the whole way, a FUA sync on both nodes
/// included, and at the device's end it named an extent past it).
#[test]
fn a_zero_length_write_takes_no_sequence_number() {
    let c = Cluster::synced_pair("zero-len-write", 64 << 20, |b| b);
    let a = c.alpha();
    let before = a.repl()["seq_written"].as_u64();
    assert!(before.is_some(), "no seq_written in {}", a.repl());
    let mut r = a.raw_open();
    let size = r.size;
    for (off, flags) in [(0, 0), (4096, CMD_FLAG_FUA), (size, CMD_FLAG_FUA)] {
        assert_eq!(
            r.write_at(off, &[], flags),
            Ok(()),
            "zero-length write at {off}"
        );
    }
    r.disconnect();
    assert_eq!(
        a.repl()["seq_written"].as_u64(),
        before,
        "a zero-length write took a sequence number"
    );
}

#[test]
fn handshake_churn_and_stalled_clients() {
    let (c, pid) = setup("churn");
    let a = c.alpha();
    // Let the setup's connections settle before taking the fd baseline.
    assert!(
        wait_for(Duration::from_secs(10), || a.status_json()["clients"] == 0),
        "clients did not drop to 0 after setup"
    );
    let base_fds = fd_count(pid);
    assert!(base_fds > 0);

    for i in 0..240 {
        let mut r = RawNbd::connect(a.export()).expect("connect");
        match i % 8 {
            0 => {}
            1 => {
                let _ = r.recv(8);
            }
            2 => {
                r.read_greeting();
            }
            3 => {
                r.read_greeting();
                let _ = r.send(&[0, 0]);
            }
            4 => {
                r.start_handshake();
                let _ = r.send(&IHAVEOPT.to_be_bytes());
            }
            5 => {
                r.start_handshake();
                let mut h = Vec::new();
                h.extend_from_slice(&IHAVEOPT.to_be_bytes());
                h.extend_from_slice(&OPT_GO.to_be_bytes());
                h.extend_from_slice(&20u32.to_be_bytes());
                h.extend_from_slice(&[0, 0, 0, 2, b'r']);
                let _ = r.send(&h);
            }
            6 => {
                // Full handshake, then gone without NBD_CMD_DISC.
                r.start_handshake();
                r.opt_go(a.resource()).expect("GO");
            }
            _ => {
                // Gone in the middle of a write payload.
                r.start_handshake();
                r.opt_go(a.resource()).expect("GO");
                let mut b = Vec::new();
                b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
                b.extend_from_slice(&0u16.to_be_bytes());
                b.extend_from_slice(&CMD_WRITE.to_be_bytes());
                b.extend_from_slice(&7u64.to_be_bytes());
                b.extend_from_slice(&0u64.to_be_bytes());
                b.extend_from_slice(&4096u32.to_be_bytes());
                b.extend_from_slice(&[0x11; 100]);
                let _ = r.send(&b);
            }
        }
        drop(r);
    }
    assert!(
        pid_alive(pid),
        "daemon died during churn\n{}",
        a.log_tail(60)
    );

    // Clients stalled in the handshake must not block others.
    let mut stalled = Vec::new();
    for _ in 0..16 {
        let mut r = RawNbd::connect(a.export()).expect("connect");
        r.read_greeting();
        stalled.push(r);
    }
    assert_eq!(nbdinfo_size(&a.uri()), a.size());
    good_client_still_works(&c, pid);
    drop(stalled);

    assert!(
        wait_for(Duration::from_secs(10), || a.status_json()["clients"] == 0),
        "clients did not drop to 0: {}",
        a.status_json()
    );
    let mut fds = 0;
    assert!(
        wait_for(Duration::from_secs(10), || {
            fds = fd_count(pid);
            fds <= base_fds + 2
        }),
        "daemon leaks file descriptors: {base_fds} before the churn, {fds} after"
    );
    good_client_still_works(&c, pid);
}

/// Connections are bounded per export (256, handshakes included): one over the bound is closed
/// at once without a greeting, and once the others go, clients are served again.
#[test]
fn connections_over_the_bound_are_closed() {
    let (c, pid) = setup("conn-bound");
    let a = c.alpha();
    let mut held: Vec<RawNbd> = (0..256)
        .map(|_| {
            let mut r = RawNbd::connect(a.export()).expect("connect");
            r.read_greeting();
            r
        })
        .collect();
    let mut over = RawNbd::connect(a.export()).expect("connect");
    let got = over.recv(8);
    assert!(
        got.as_ref().map_or(true, |b| b.is_empty()),
        "the 257th connection was served: {got:?}"
    );
    wait_log_line_contains(a, "connections already open");
    held.clear();
    assert!(
        wait_for(Duration::from_secs(10), || {
            let mut r = RawNbd::connect(a.export()).expect("connect");
            r.recv(8).is_ok_and(|b| !b.is_empty())
        }),
        "clients are not served again after the others left"
    );
    good_client_still_works(&c, pid);
}

fn wait_log_line_contains(n: &Node, needle: &str) {
    assert!(
        wait_for(CLOSE_WITHIN, || std::fs::read_to_string(n.log_path())
            .is_ok_and(|t| t.contains(needle))),
        "log has no {needle:?}:\n{}",
        n.log_tail(20)
    );
}

/// A client may trim or zero any byte range (the export's minimum block is 1 without
/// direct-io), but a block device takes `fallocate` only on whole logical blocks (EINVAL
/// otherwise). Both nodes' disks here are loop devices: TRIM and WRITE_ZEROES off the 4 KiB
/// grid are answered, read back as zeros with the bytes around them intact, and mirrored.
/// Before (review finding) each was a disk error on the primary (EINVAL to the client, the
/// local-io-error handler) and, applied on the secondary, made it inconsistent and dropped
/// the link: a resync any client could cause at will.
#[test]
fn unaligned_trims_and_zeroes_on_block_devices_are_mirrored_not_disk_errors() {
    let c = Cluster::builder("unaligned-zero")
        .nodes(2)
        .backing_size(64 << 20)
        .journal_size("8M")
        .build();
    let mut disks = Vec::new();
    for n in c.nodes() {
        n.create_md();
        let img = c.dir().join(format!("{}-disk.img", n.name()));
        std::fs::rename(n.backing_path(), &img).expect("move the disk");
        disks.push(LoopDev::attach(&img));
        let dev = disks.last().expect("attached").dev();
        std::os::unix::fs::symlink(dev, n.backing_path()).expect("symlink the loop device");
    }
    let _stop = StopDaemons(&c);
    c.up_pair();
    c.wait_in_sync(Duration::from_secs(60));
    let (a, b) = (c.alpha(), c.beta());

    let base: u64 = 3 << 20;
    let mut want = random_bytes(256 << 10);
    let mut r = a.raw_open();
    r.write_at(base, &want, 0).expect("write");
    let cuts: [(u16, u64, u32); 4] = [
        (CMD_TRIM, 100, 5000),
        (CMD_WRITE_ZEROES, (64 << 10) + 513, 70_000),
        (CMD_TRIM, (200 << 10) + 7, 9),
        (CMD_WRITE_ZEROES, 240 << 10, 4096),
    ];
    for (cmd, at, len) in cuts {
        r.command(cmd, 0, base + at, len)
            .unwrap_or_else(|e| panic!("command {cmd} at {at}+{len}: error {e}"));
        want[at as usize..at as usize + len as usize].fill(0);
    }
    r.command(CMD_FLUSH, 0, 0, 0).expect("flush");
    assert_same_bytes(
        &r.read_at(base, want.len() as u32).expect("read back"),
        &want,
        "the primary's export",
    );
    r.disconnect();
    c.wait_in_sync(Duration::from_secs(60));
    for n in [a, b] {
        let st = n.status_json();
        assert_eq!(
            st["io"]["disk_errors"].as_u64(),
            Some(0),
            "{}: {st}",
            n.name()
        );
        assert_eq!(st["disk"], "up-to-date", "{}: {st}", n.name());
        let r = n.repl();
        assert_eq!(r["connection"], "connected", "{}: {r}", n.name());
        assert_eq!(r["crc_errors"].as_u64(), Some(0), "{}: {r}", n.name());
    }
    for (n, disk) in [a, b].iter().zip(&disks) {
        let mut got = vec![0u8; want.len()];
        std::fs::File::open(disk.dev())
            .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut got, base))
            .unwrap_or_else(|e| panic!("read {}: {e}", disk.dev()));
        assert_same_bytes(&got, &want, &format!("{}'s disk", n.name()));
    }
}
