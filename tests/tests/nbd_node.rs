//! One node serving its device over NBD (issue 2), checked with real NBD clients: nbdinfo,
//! nbdcopy, qemu-io, and a filesystem on nbdfuse + loop. Setup for each test: create-md, up,
//! primary --force.

use std::process::Command;
use std::time::Duration;

use blockrep_e2e::nbd_const::*;
use blockrep_e2e::*;
use serde_json::Value;

const BACKING: u64 = 256 << 20;

/// The `status --json` object of a freshly promoted single node, checked against the contract.
fn check_status_contract(c: &Cluster, st: &Value) {
    let a = c.alpha();
    assert_eq!(st["resource"], c.resource(), "{st}");
    assert_eq!(st["node"], "alpha", "{st}");
    assert!(st["pid"].as_u64().is_some_and(|p| p > 0), "pid: {st}");
    assert_eq!(st["up"], true, "{st}");
    assert_eq!(st["role"], "primary", "{st}");
    assert_eq!(st["disk"], "up-to-date", "{st}");
    assert_eq!(st["export"], a.export().config_value(), "{st}");
    assert!(
        matches!(st["engine"].as_str(), Some("io-uring" | "sync")),
        "engine: {st}"
    );
    assert_eq!(st["kernel_device"], Value::Null, "{st}");
    assert!(st["clients"].as_u64().is_some(), "clients: {st}");
    for k in [
        "reads",
        "writes",
        "flushes",
        "trims",
        "zeroes",
        "bytes_read",
        "bytes_written",
        "errors",
        "disk_errors",
    ] {
        assert!(st["io"][k].as_u64().is_some(), "io.{k} missing: {st}");
    }
}

#[test]
fn nbdinfo_reports_size_name_and_flags() {
    let c = Cluster::builder("nbdinfo").backing_size(BACKING).build();
    let a = c.alpha();
    a.make_primary();
    let st = a.status_json();
    check_status_contract(&c, &st);
    assert!(pid_alive(st["pid"].as_u64().unwrap() as u32));

    let size = st["size"].as_u64().expect("size");
    assert!(
        size > 0 && size < BACKING,
        "size {size} vs backing {BACKING}"
    );
    assert_eq!(size % 4096, 0, "size {size} is not a multiple of 4096");

    let info = nbdinfo_json(&a.uri());
    assert_eq!(info["export-size"].as_u64(), Some(size), "{info}");
    assert_eq!(info["export-name"], c.resource(), "{info}");
    assert_eq!(info["is_read_only"], false, "{info}");

    for flag in ["fua", "trim", "zero", "flush", "multi-conn"] {
        let code = nbdinfo_can(&a.uri(), flag);
        assert!(
            code == 0 || code == 2,
            "nbdinfo --can {flag} exited {code} (error)"
        );
        let key = format!("can_{}", flag.replace('-', "_"));
        assert_eq!(
            info[&key].as_bool(),
            Some(code == 0),
            "nbdinfo --can {flag} exit {code} disagrees with --json {key}: {info}"
        );
        if flag != "multi-conn" {
            assert_eq!(code, 0, "the export must support {flag}");
        }
    }

    // The same through a hand-written handshake: size and transmission flags.
    let mut raw = a.raw_open();
    assert_eq!(raw.size, size);
    for (bit, what) in [
        (TFLAG_HAS_FLAGS, "HAS_FLAGS"),
        (TFLAG_SEND_FLUSH, "SEND_FLUSH"),
        (TFLAG_SEND_FUA, "SEND_FUA"),
        (TFLAG_SEND_TRIM, "SEND_TRIM"),
        (TFLAG_SEND_WRITE_ZEROES, "SEND_WRITE_ZEROES"),
    ] {
        assert!(raw.flags & bit != 0, "{what} not set in {:#x}", raw.flags);
    }
    assert_eq!(raw.flags & TFLAG_READ_ONLY, 0, "export is read-only");
    assert_eq!(
        raw.flags & TFLAG_CAN_MULTI_CONN != 0,
        info["can_multi_conn"] == true,
        "CAN_MULTI_CONN bit disagrees with nbdinfo"
    );
    // And the commands behind the flags work.
    let data = random_bytes(8192);
    raw.write_at(0, &data, CMD_FLAG_FUA).expect("FUA write");
    raw.command(CMD_FLUSH, 0, 0, 0).expect("flush");
    raw.command(CMD_WRITE_ZEROES, 0, 0, 4096)
        .expect("write zeroes");
    // NO_HOLE (zero, do not deallocate) goes with WRITE_ZEROES, FUA with every command.
    raw.command(CMD_WRITE_ZEROES, 1 << 1, 0, 4096)
        .expect("write zeroes with NO_HOLE");
    raw.command(CMD_FLUSH, CMD_FLAG_FUA, 0, 0)
        .expect("flush with FUA");
    raw.command(CMD_TRIM, 0, 65536, 65536).expect("trim");
    let back = raw.read_at(0, 8192).expect("read");
    assert_all_zero(&back[..4096], "after WRITE_ZEROES");
    assert_same_bytes(
        &back[4096..],
        &data[4096..],
        "second half after WRITE_ZEROES",
    );
    raw.disconnect();

    let st = a.status_json();
    assert!(st["io"]["flushes"].as_u64().unwrap() >= 1, "{st}");
    assert!(st["io"]["zeroes"].as_u64().unwrap() >= 1, "{st}");
    assert!(st["io"]["trims"].as_u64().unwrap() >= 1, "{st}");
    assert!(st["io"]["writes"].as_u64().unwrap() >= 1, "{st}");
    assert!(st["io"]["bytes_written"].as_u64().unwrap() >= 8192, "{st}");
    assert!(st["io"]["bytes_read"].as_u64().unwrap() >= 8192, "{st}");
}

#[test]
fn unix_socket_export_serves_io() {
    let c = Cluster::builder("unix-export")
        .export(ExportKind::Unix)
        .build();
    let a = c.alpha();
    a.make_primary();
    let st = a.status_json();
    check_status_contract(&c, &st);
    assert!(st["export"].as_str().unwrap().starts_with("unix:"), "{st}");
    let uri = a.uri();
    assert_eq!(nbdinfo_size(&uri), st["size"].as_u64().unwrap());
    run_ok(
        Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0x5a 1048576 65536",
                "-c",
                "flush",
            ])
            .arg(&uri),
        LONG_TIMEOUT,
    );
    let out = run_ok(
        Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "read -P 0x5a 1048576 65536",
                "-c",
                "read -P 0 1114112 4096",
            ])
            .arg(&uri),
        LONG_TIMEOUT,
    );
    assert!(
        !out.stdout.contains("Pattern verification failed"),
        "{}",
        out.describe()
    );
    assert!(
        out.stdout
            .contains("read 65536/65536 bytes at offset 1048576"),
        "{}",
        out.describe()
    );

    // Whoever reaches the socket reads and writes the device: it is the owner's alone, and a
    // connection from another user is refused even where the mode would let it in.
    use std::os::unix::fs::PermissionsExt;
    let socket = st["export"].as_str().unwrap().trim_start_matches("unix:");
    let mode = std::fs::metadata(socket)
        .expect("the socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "export socket mode {mode:o}");
    if !have_tools(&["setpriv"]) || !nix::unistd::geteuid().is_root() {
        return;
    }
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    std::fs::set_permissions(c.dir().path(), std::fs::Permissions::from_mode(0o711))
        .expect("chmod the test dir");
    let out = run(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "nbdinfo",
                "--size",
            ])
            .arg(&uri),
        LONG_TIMEOUT,
    );
    assert!(
        !out.success(),
        "another user read the export:\n{}",
        out.describe()
    );
    assert!(
        wait_for(Duration::from_secs(5), || a.log_count(
            "refused a connection on the Unix socket from uid Some(65534)"
        ) > 0),
        "the daemon did not say it refused uid 65534:\n{}",
        a.log_tail(10)
    );
    assert_eq!(nbdinfo_size(&uri), st["size"].as_u64().unwrap());
}

fn nbdcopy_round_trip(test: &str, extra: &[&str]) {
    let c = Cluster::builder(test).backing_size(BACKING).build();
    let a = c.alpha();
    a.make_primary();
    let size = a.size();
    let n: usize = 64 << 20;
    assert!(size >= n as u64, "export of {size} bytes is below 64 MiB");
    let input = c.dir().join("in.bin");
    let data = write_random_file(&input, n);

    run_ok(
        Command::new("nbdcopy")
            .args(extra)
            .arg("--flush")
            .arg(&input)
            .arg(a.uri()),
        LONG_TIMEOUT,
    );
    let output = c.dir().join("out.bin");
    run_ok(
        Command::new("nbdcopy")
            .args(extra)
            .arg(a.uri())
            .arg(&output),
        LONG_TIMEOUT,
    );
    let back = std::fs::read(&output).expect("read out.bin");
    assert_eq!(
        back.len() as u64,
        size,
        "nbdcopy copied out the whole export"
    );
    assert_same_bytes(&back[..n], &data, "export after nbdcopy round trip");
    assert_all_zero(&back[n..], "export beyond the copied 64 MiB");

    let st = a.status_json();
    assert!(
        st["io"]["bytes_written"].as_u64().unwrap() >= n as u64,
        "bytes_written after a 64 MiB copy: {st}"
    );
    assert!(
        st["io"]["bytes_read"].as_u64().unwrap() >= n as u64,
        "bytes_read after copying out: {st}"
    );
    assert!(st["io"]["flushes"].as_u64().unwrap() >= 1, "{st}");
    assert_eq!(st["io"]["errors"].as_u64(), Some(0), "{st}");
    a.assert_alive();
}

#[test]
fn nbdcopy_64mib_round_trip() {
    nbdcopy_round_trip("nbdcopy", &[]);
}

#[test]
fn nbdcopy_multi_conn_round_trip() {
    // If the server does not advertise multi-conn, nbdcopy silently uses one connection.
    nbdcopy_round_trip("nbdcopy-c4", &["-C", "4"]);
}

#[test]
fn qemu_io_scattered_patterns() {
    let c = Cluster::builder("qemu-io").backing_size(BACKING).build();
    let a = c.alpha();
    a.make_primary();
    let size = a.size();
    let lens: [u64; 6] = [512, 4096, 12800, 65536, 1 << 20, 3584];
    let stride = (size / 64) & !4095;
    assert!(stride >= (1 << 20) + 16384, "export too small: {size}");
    // (offset, length, pattern): 512-aligned but often not 4K-aligned offsets, varied
    // lengths, no overlaps, plus one write ending exactly at the end of the export.
    let mut writes: Vec<(u64, u64, u8)> = (0..60u64)
        .map(|i| {
            let off = i * stride + 512 * (i % 8) + 4096 * (i % 3);
            (off, lens[(i % 6) as usize], (i * 37 % 254 + 1) as u8)
        })
        .collect();
    writes.push((size - 8192, 8192, 0xee));

    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for (off, len, pat) in &writes {
        cmd.arg("-c")
            .arg(format!("aio_write -P {pat:#x} {off} {len}"));
    }
    cmd.arg("-c").arg("aio_flush").arg(a.uri());
    let out = run(&mut cmd, LONG_TIMEOUT);
    assert_eq!(out.code, Some(0), "qemu-io writes:\n{}", out.describe());
    for (off, len, _) in &writes {
        let line = format!("wrote {len}/{len} bytes at offset {off}");
        assert!(
            out.stdout.contains(&line),
            "missing `{line}`:\n{}",
            out.describe()
        );
    }

    // Second process: every pattern, and zeroes right before and after each write.
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    let mut reads = Vec::new();
    for (off, len, pat) in &writes {
        reads.push((*off, *len, *pat));
        if *off >= 512 {
            reads.push((off - 512, 512, 0));
        }
        if off + len + 512 <= size {
            reads.push((off + len, 512, 0));
        }
    }
    for (off, len, pat) in &reads {
        cmd.arg("-c").arg(format!("read -P {pat:#x} {off} {len}"));
    }
    let out = run(cmd.arg(a.uri()), LONG_TIMEOUT);
    assert!(
        !out.stdout.contains("Pattern verification failed")
            && !out.stderr.contains("Pattern verification failed"),
        "qemu-io found wrong data:\n{}",
        out.describe()
    );
    assert_eq!(out.code, Some(0), "qemu-io reads:\n{}", out.describe());
    let done = out.stdout.matches(" bytes at offset ").count();
    assert_eq!(
        done,
        reads.len(),
        "not every read completed:\n{}",
        out.describe()
    );
    a.assert_alive();
}

/// A file of the test filesystem: path, content seed, size.
const FILES: &[(&str, u64, usize)] = &[
    ("empty", 1, 0),
    ("small.txt", 2, 100),
    ("block", 3, 4096),
    ("odd-size", 4, 1_000_003),
    ("dir/sub/big", 5, 8 << 20),
    ("dir/other", 6, 70_000),
];

fn verify_files(mnt: &std::path::Path, sums: &[(String, u32, usize)]) {
    for (rel, crc, len) in sums {
        let body = std::fs::read(mnt.join(rel))
            .unwrap_or_else(|e| panic!("{rel} is gone after down/up: {e}"));
        assert_eq!(body.len(), *len, "{rel}: size changed");
        assert_eq!(crc32c::crc32c(&body), *crc, "{rel}: content changed");
    }
}

#[test]
fn filesystem_survives_down_and_up() {
    let c = Cluster::builder("fs-down-up").backing_size(BACKING).build();
    let a = c.alpha();
    a.make_primary();
    let size = a.size();
    let first_pid = a.pid().expect("pid");

    let mut fs = FsStack::attach(c.dir().path(), "1", &a.uri());
    fs.mkfs_ext4();
    let mnt = fs.mount();
    let mut sums = Vec::new();
    for (rel, seed, len) in FILES {
        let p = mnt.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let body = XorShift::new(*seed).bytes(*len);
        std::fs::write(&p, &body).unwrap_or_else(|e| panic!("write {rel}: {e}"));
        sums.push((rel.to_string(), crc32c::crc32c(&body), *len));
    }
    // This filesystem only: a global sync would wait on every other test's devices too.
    run_ok(Command::new("sync").arg("-f").arg(&mnt), CMD_TIMEOUT);
    verify_files(&mnt, &sums);
    fs.umount();
    fs.fsck_clean();
    fs.close();

    a.down();
    assert!(
        wait_pid_gone(first_pid, Duration::from_secs(10)),
        "daemon pid {first_pid} still alive after down"
    );
    a.up();
    // Not fresh metadata any more: promotion must not need --force.
    a.ctl_ok(&["primary"]);
    let st = a.status_json();
    assert_eq!(st["role"], "primary", "{st}");
    assert_eq!(st["disk"], "up-to-date", "{st}");
    assert_eq!(
        st["size"].as_u64(),
        Some(size),
        "size changed across down/up: {st}"
    );
    assert_ne!(
        a.pid(),
        Some(first_pid),
        "up after down must start a new daemon"
    );

    let mut fs = FsStack::attach(c.dir().path(), "2", &a.uri());
    fs.fsck_clean();
    let mnt = fs.mount();
    verify_files(&mnt, &sums);
    fs.umount();
    fs.close();
    a.assert_alive();
}

/// With `direct-io = true` only aligned requests can be served. A client that does not ask
/// for the block size (stock nbd-client never does) is still served, so that `nbd-client -b
/// 4096` works, and the daemon logs why its unaligned requests will fail; an unaligned request
/// gets EINVAL, aligned ones work. A client that asks gets 4096 as the minimum: nbdinfo sees
/// it, and data written with nbdcopy reads back.
#[test]
fn direct_io_export_serves_aligned_io_and_says_what_it_needs() {
    let c = Cluster::builder("nbd-direct-io")
        .backing_size(BACKING)
        .direct_io(true)
        .build();
    let a = c.alpha();
    a.make_primary();
    let mut r = RawNbd::open(a.export(), c.resource());
    let data = random_bytes(8192);
    r.write_at(4096, &data, 0).expect("aligned write");
    assert_same_bytes(
        &r.read_at(4096, 8192).expect("aligned read"),
        &data,
        "aligned read",
    );
    assert_eq!(
        r.write_at(512, &data[..512], 0),
        Err(EINVAL),
        "unaligned write"
    );
    assert_eq!(r.read_at(512, 512), Err(EINVAL), "unaligned read");
    r.disconnect();
    let log = std::fs::read_to_string(a.log_path()).unwrap_or_default();
    assert!(
        log.contains("did not ask for the block size") && log.contains("-b 4096"),
        "the daemon does not say what the client needs:\n{}",
        a.log_tail(10)
    );

    let out = run_ok(
        Command::new("nbdinfo").arg("--json").arg(a.uri()),
        CMD_TIMEOUT,
    );
    let info: Value = serde_json::from_str(&out.stdout).expect("nbdinfo --json");
    assert_eq!(
        info["exports"][0]["block_size_minimum"], 4096,
        "{}",
        out.stdout
    );
    let file = c.dir().join("in.bin");
    let d = write_random_file(&file, 1 << 20);
    a.nbdcopy_in(&file);
    let mut r = RawNbd::open_with_block_size(a.export(), c.resource());
    assert_same_bytes(
        &r.read_at(0, 1 << 20).expect("read back"),
        &d,
        "nbdcopy's data",
    );
    r.disconnect();
}

/// A node whose backing device is a loop device (a block device, as in production): the
/// node holds the kernel's exclusive claim on it, and zero and trim still work over writes
/// not yet flushed (only the claim's holder may discard a range with dirty page cache: the
/// engine's I/O goes through the claim's descriptor). The loop device's own file is refused
/// as another node's backing: it is the same disk.
#[test]
fn a_loop_device_backing_is_claimed_and_zero_and_trim_work_over_unflushed_writes() {
    /// Fields drop in order: the daemon is stopped before its loop device is detached, and
    /// the loop device before the directory of its file is removed (its own, so that the
    /// cluster's directory, removed with the cluster, holds no attached loop device).
    struct Fixture {
        c: Cluster,
        lo: LoopDev,
        _files: TestDir,
    }
    let files = TestDir::new("loop-backing-file");
    let c = Cluster::builder("loop-backing")
        .nodes(1)
        .no_backing_files()
        .build();
    let file = files.path().join("alpha-file.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(BACKING)
        .unwrap();
    let lo = LoopDev::attach(&file);
    let f = Fixture {
        c,
        lo,
        _files: files,
    };
    let n = f.c.alpha();
    std::os::unix::fs::symlink(f.lo.dev(), n.backing_path()).unwrap();
    n.make_primary();

    let mut r = n.raw_open();
    for round in 0..20u64 {
        let off = round * 65536;
        r.write_at(off, &[0x5a; 8192], 0).expect("write");
        r.command(CMD_WRITE_ZEROES, 0, off, 4096)
            .unwrap_or_else(|e| panic!("write-zeroes over an unflushed write: errno {e}"));
        r.command(CMD_TRIM, 0, off + 4096, 4096)
            .unwrap_or_else(|e| panic!("trim over an unflushed write: errno {e}"));
        let back = r.read_at(off, 8192).expect("read");
        assert!(
            back.iter().all(|&b| b == 0),
            "round {round}: not zero after zero+trim"
        );
    }
    r.command(CMD_FLUSH, 0, 0, 0).expect("flush");
    r.disconnect();
    let st = n.status_json();
    assert_eq!(st["io"]["errors"], 0, "{st}");

    // The loop device's file, configured as a backing of its own: refused, as in use.
    let text = std::fs::read_to_string(f.c.config_path()).unwrap();
    let copy = text
        .replace(
            &format!("{:?}", n.backing_path().to_string_lossy()),
            &format!("{:?}", file.to_string_lossy()),
        )
        .replace("alpha.ctl", "alpha2.ctl")
        .replace("alpha.log", "alpha2.log");
    assert!(copy.contains("alpha-file.img"), "{copy}");
    let copy_path = f.c.dir().path().join("copy.toml");
    std::fs::write(&copy_path, copy).unwrap();
    let out = run(
        Command::new(bin_dir().join("blockrep-ctl"))
            .arg("-c")
            .arg(&copy_path)
            .args(["-n", "alpha", "create-md", "--force"]),
        CMD_TIMEOUT,
    );
    assert_ne!(out.code, Some(0), "{}", out.describe());
    assert!(
        out.stderr.contains("in use") && out.stderr.contains(f.lo.dev()),
        "the refusal should name the loop device:\n{}",
        out.describe()
    );
    assert_eq!(n.status_json()["role"], "primary");
}

/// A structured read longer than the advertised maximum payload (a 1 MiB journal caps it at
/// about 500 KiB) is answered in chunks of at most that payload, the last one marked done,
/// which together hold the data (the spec bounds every chunk's data by the advertised
/// maximum; a strict client drops a server that sends more). libnbd's structured read shows
/// each chunk.
#[test]
fn a_structured_read_longer_than_the_maximum_payload_comes_in_chunks() {
    let Some(py) = blocks::python() else { return };
    let c = Cluster::builder("nbd-read-chunks")
        .nodes(2)
        .journal_size("1M")
        .build();
    let a = c.alpha();
    a.make_primary();
    let script = c.dir().path().join("chunks.py");
    std::fs::write(
        &script,
        r#"
import nbd, sys
h = nbd.NBD()
if not hasattr(h, "set_request_block_size"):
    sys.exit(77)  # libnbd before 1.12
h.set_request_structured_replies(True)
h.set_request_block_size(True)
h.connect_uri(sys.argv[1])
assert h.get_structured_replies_negotiated()
most = h.get_block_size(nbd.SIZE_MAXIMUM)
data = bytes((i * 7 + 3) % 251 for i in range(2 << 20))
for at in range(0, len(data), 256 << 10):
    h.pwrite(data[at:at + (256 << 10)], at)
h.flush()
# A request above the maximum payload is the client's to allow (libnbd >= 1.16 refuses it).
h.set_strict_mode(h.get_strict_mode() & ~getattr(nbd, "STRICT_PAYLOAD", 0))
chunks = []
def chunk(sub, off, status, err):
    chunks.append((off, len(sub)))
    return 0
got = h.pread_structured(len(data), 0, chunk)
assert got == data, "the chunks do not hold the data"
assert len(chunks) > 1, chunks
assert all(n <= most for _, n in chunks), (most, chunks)
assert sorted(chunks) == sorted(set(chunks)) and sum(n for _, n in chunks) == len(data), chunks
# Past the server's 32 MiB request bound: EOVERFLOW, the spec's answer to a structured read
# too large, on which a client retries with smaller ones.
import errno
assert h.get_size() > 33 << 20
try:
    h.pread(33 << 20, 0)
    raise SystemExit("a 33 MiB read was served")
except nbd.Error as e:
    assert e.errnum == errno.EOVERFLOW, e
print("max", most, "chunks", len(chunks))
h.shutdown()
"#,
    )
    .expect("script");
    let out = run(Command::new(&py).arg(&script).arg(a.uri()), CMD_TIMEOUT);
    if out.code == Some(77) {
        println!("SKIP: libnbd's Python bindings are older than 1.12 (no block-size request)");
        a.down();
        return;
    }
    assert!(out.success(), "{}", out.describe());
    a.down();
}
