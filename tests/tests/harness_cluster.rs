//! Self-tests of the harness's cleanup with the real daemon: whatever a failing test leaves
//! up (daemon, nbdfuse, loop device, mount) is torn down, and a hung daemon is killed.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use blockrep_e2e::*;

fn nothing_left(pid: u32, dir: &Path) {
    assert!(!pid_alive(pid), "daemon {pid} survived the cluster");
    assert!(!dir.exists(), "{} survived", dir.display());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(dir.to_str().unwrap()),
        "mounts left below {}",
        dir.display()
    );
    let loops = run_ok(
        Command::new("losetup").args(["-l", "-n", "-O", "BACK-FILE"]),
        CMD_TIMEOUT,
    );
    assert!(
        !loops.stdout.contains(dir.to_str().unwrap()),
        "loop devices left: {}",
        loops.stdout
    );
}

#[test]
fn cluster_cleans_up_when_a_test_panics() {
    let seen = Mutex::new(None);
    let r = std::panic::catch_unwind(|| {
        let c = Cluster::single_primary("self-cluster");
        let a = c.alpha();
        let mut fs = FsStack::attach(c.dir().path(), "p", &a.uri());
        fs.mkfs_ext4();
        let mnt = fs.mount();
        std::fs::write(mnt.join("f"), b"data").unwrap();
        *seen.lock().unwrap() = Some((a.pid().unwrap(), c.dir().path().to_path_buf()));
        panic!("deliberate");
    });
    assert!(r.is_err());
    let (pid, dir) = seen.lock().unwrap().take().unwrap();
    nothing_left(pid, &dir);
}

#[test]
fn hung_daemon_is_killed_on_drop() {
    let c = Cluster::single_primary("self-hung");
    let pid = c.alpha().pid().unwrap();
    let dir = c.dir().path().to_path_buf();
    // A stopped daemon cannot answer `down`: the drop must time it out and SIGKILL.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let t = Instant::now();
    drop(c);
    assert!(
        t.elapsed() < Duration::from_secs(25),
        "cleanup took {:?}",
        t.elapsed()
    );
    nothing_left(pid, &dir);
}

#[test]
fn two_node_config_is_accepted() {
    let c = Cluster::builder("self-two").nodes(2).build();
    assert_eq!(c.nodes().len(), 2);
    for n in c.nodes() {
        n.create_md();
        let md = n.ctl_ok(&["dump-md"]).stdout;
        assert!(
            md.contains(n.name()),
            "dump-md of {} does not name it:\n{md}",
            n.name()
        );
        assert!(
            md.contains(c.resource()),
            "dump-md does not name the resource:\n{md}"
        );
        n.up();
        let st = n.status_json();
        assert_eq!(st["node"], n.name(), "{st}");
        assert_eq!(st["export"], n.export().config_value(), "{st}");
    }
    assert_ne!(c.alpha().pid(), c.beta().pid());
    assert_ne!(c.alpha().export(), c.beta().export());
}
