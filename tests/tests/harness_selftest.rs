//! Self-tests of the harness against nbdkit (a reference NBD server) instead of blockrep: the
//! raw protocol client, the nbdfuse/loop/mount guards and their cleanup on panic, the command
//! runner's timeout. They need no blockrep binary.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blockrep_e2e::nbd_const::*;
use blockrep_e2e::*;

/// nbdkit's memory plugin in the foreground, on TCP or a unix socket.
fn nbdkit(dir: &TestDir, unix: bool) -> (ChildGuard, Export) {
    assert!(have_tool("nbdkit"), "nbdkit is not installed");
    let mut cmd = Command::new("nbdkit");
    cmd.arg("-f");
    let export = if unix {
        let p = dir.join("nbdkit.sock");
        cmd.arg("-U").arg(&p);
        Export::Unix(p)
    } else {
        let port = free_port();
        cmd.args(["-i", "127.0.0.1", "-p", &port.to_string()]);
        Export::Tcp(SocketAddr::from(([127, 0, 0, 1], port)))
    };
    cmd.args(["memory", "256M"]);
    let mut g = ChildGuard::spawn(&mut cmd, Some(&dir.join("nbdkit.log")));
    let up = wait_for(Duration::from_secs(10), || RawNbd::connect(&export).is_ok());
    assert!(up && g.running(), "nbdkit did not start:\n{}", g.log());
    (g, export)
}

#[test]
fn raw_client_round_trip_and_errors() {
    let dir = TestDir::new("self-raw");
    let (_srv, export) = nbdkit(&dir, false);
    let mut c = RawNbd::open(&export, "r0");
    assert_eq!(c.size, 256 << 20);
    assert!(c.flags & TFLAG_HAS_FLAGS != 0);
    assert!(c.flags & TFLAG_SEND_FLUSH != 0);

    let data = random_bytes(65536);
    c.write_at(4096, &data, 0).expect("write");
    c.write_at(1 << 20, &data[..512], CMD_FLAG_FUA)
        .expect("fua write");
    c.command(CMD_FLUSH, 0, 0, 0).expect("flush");
    assert_eq!(c.read_at(4096, 65536).expect("read"), data);
    assert_eq!(c.read_at(1 << 20, 512).expect("read"), &data[..512]);
    c.command(CMD_TRIM, 0, 4096, 4096).expect("trim");
    c.command(CMD_WRITE_ZEROES, 0, 8192, 4096)
        .expect("write zeroes");
    assert_eq!(c.read_at(8192, 4096).expect("read"), vec![0u8; 4096]);

    let size = c.size;
    assert_eq!(c.read_at(size, 4096), Err(EINVAL));
    assert_eq!(c.write_at(size - 512, &[1u8; 4096], 0), Err(ENOSPC));
    assert_eq!(c.read_at(u64::MAX - 10, 100), Err(EINVAL));
    // Still usable after the errors.
    assert_eq!(
        c.read_at(4096 + 65536 - 512, 512).unwrap(),
        &data[65536 - 512..]
    );
    c.disconnect();
}

#[test]
fn raw_client_sees_server_close() {
    let dir = TestDir::new("self-close");
    let (_srv, export) = nbdkit(&dir, true);
    let mut c = RawNbd::open(&export, "");
    c.send_request_raw(0xdead_beef, CMD_READ, 0, 1, 0, 512, &[])
        .unwrap();
    c.expect_closed(Duration::from_secs(5))
        .expect("nbdkit closes on a bad request magic");

    // expect_closed reports an open connection as such, in bounded time.
    let mut idle = RawNbd::open(&export, "");
    let t = Instant::now();
    assert!(idle.expect_closed(Duration::from_millis(300)).is_err());
    assert!(t.elapsed() < Duration::from_secs(3));
}

fn mounted(dir: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(dir.to_str().unwrap()))
}

/// Whether any loop device is bound to a file below `dir` (names are reused at once by
/// concurrent tests, so the backing file is what identifies our device).
fn loop_attached_below(dir: &Path) -> bool {
    let out = run_ok(
        Command::new("losetup").args(["-l", "-n", "-O", "BACK-FILE"]),
        CMD_TIMEOUT,
    );
    out.stdout
        .lines()
        .any(|l| Path::new(l.trim()).starts_with(dir))
}

#[test]
fn fs_stack_mkfs_mount_fsck() {
    let dir = TestDir::new("self-fs");
    let (_srv, export) = nbdkit(&dir, false);
    let mut fs = FsStack::attach(dir.path(), "a", &export.uri("r0"));
    fs.mkfs_ext4();
    let mnt = fs.mount();
    let body = XorShift::new(7).bytes(300_000);
    std::fs::write(mnt.join("f"), &body).unwrap();
    // This filesystem only: a global sync would wait on every other test's devices too.
    run_ok(Command::new("sync").arg("-f").arg(&mnt), CMD_TIMEOUT);
    fs.umount();
    assert!(!mounted(&mnt));
    fs.fsck_clean();
    fs.close();
    assert!(
        !loop_attached_below(dir.path()),
        "loop device still attached"
    );
    assert!(!mounted(&dir.join("fuse-a")));

    // The data reached the server: mount again through a new stack.
    let mut fs = FsStack::attach(dir.path(), "b", &export.uri("r0"));
    let mnt = fs.mount();
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), body);
    fs.close();
}

#[test]
fn fs_stack_cleans_up_when_the_test_panics() {
    let dir = TestDir::new("self-panic");
    let (_srv, export) = nbdkit(&dir, true);
    let uri = export.uri("");
    let base = dir.path().to_path_buf();
    let info = std::sync::Mutex::new(None);
    let r = std::panic::catch_unwind(|| {
        let mut fs = FsStack::attach(&base, "p", &uri);
        fs.mkfs_ext4();
        let mnt = fs.mount();
        std::fs::write(mnt.join("x"), b"x").unwrap();
        *info.lock().unwrap() = Some(mnt);
        panic!("deliberate");
    });
    assert!(r.is_err());
    let mnt = info.lock().unwrap().take().unwrap();
    assert!(!mounted(&mnt), "{} still mounted", mnt.display());
    assert!(
        !loop_attached_below(dir.path()),
        "loop device still attached"
    );
    assert!(!mounted(&dir.join("fuse-p")), "nbdfuse still mounted");
}

#[test]
fn nbdfuse_guard_reaps_nbdfuse() {
    let dir = TestDir::new("self-fuse");
    let (_srv, export) = nbdkit(&dir, false);
    let f = NbdFuseMount::start(&dir.join("fuse"), &export.uri(""));
    assert_eq!(std::fs::metadata(f.file()).unwrap().len(), 256 << 20);
    let pid = f.pid();
    assert!(pid_alive(pid));
    drop(f);
    assert!(!pid_alive(pid), "nbdfuse {pid} survived its guard");
    assert!(!mounted(&dir.join("fuse")));
}

#[test]
fn run_times_out_and_kills() {
    let t = Instant::now();
    let r = std::panic::catch_unwind(|| {
        run(Command::new("sleep").arg("30"), Duration::from_millis(300))
    });
    assert!(r.is_err(), "run should panic on timeout");
    assert!(t.elapsed() < Duration::from_secs(5));
    let out = run(
        Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
        CMD_TIMEOUT,
    );
    assert_eq!(out.code, Some(3));
    assert_eq!(out.stdout, "out\n");
    assert_eq!(out.stderr, "err\n");
    // A background process holding the pipes does not hang the runner.
    let t = Instant::now();
    let out = run(
        Command::new("sh").args(["-c", "sleep 20 & echo started"]),
        CMD_TIMEOUT,
    );
    assert!(out.success());
    assert!(out.stdout.contains("started"));
    assert!(t.elapsed() < Duration::from_secs(6));
}

#[test]
fn testdir_removed_even_on_panic() {
    let p = std::sync::Mutex::new(None);
    let r = std::panic::catch_unwind(|| {
        let d = TestDir::new("self-dir");
        std::fs::write(d.join("f"), b"x").unwrap();
        *p.lock().unwrap() = Some(d.path().to_path_buf());
        panic!("deliberate");
    });
    assert!(r.is_err());
    let p = p.lock().unwrap().take().unwrap();
    assert!(p.to_str().unwrap().len() < 60, "keep paths short: {p:?}");
    assert!(!p.exists(), "{p:?} survived");
}

#[test]
fn free_ports_are_distinct_and_bindable() {
    let ports: Vec<u16> = (0..100).map(|_| free_port()).collect();
    let set: std::collections::HashSet<_> = ports.iter().collect();
    assert_eq!(set.len(), ports.len());
    for p in ports.iter().take(10) {
        std::net::TcpListener::bind(("127.0.0.1", *p)).expect("port is free");
    }
}
