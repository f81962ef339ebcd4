//! The shipped systemd unit (`scripts/systemd/blockrep@.service`): systemd accepts it, and
//! its ExecStart, run as systemd would (foreground, SIGTERM to stop), brings the resource up
//! secondary and ends with a clean `down`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use blockrep_e2e::*;

/// `name` on the PATH.
fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn unit_text() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/systemd/blockrep@.service");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn the_systemd_unit_verifies_and_its_exec_start_runs_the_node() {
    let c = Cluster::builder("systemd-unit").nodes(1).build();
    let a = c.alpha();
    a.create_md();
    let dir = c.dir().path();
    // The resource's config where the unit looks for it, the binaries where it runs them.
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).expect("etc dir");
    std::fs::copy(a.config_path(), etc.join(format!("{}.toml", c.resource()))).expect("config");
    let bin = a.daemon_path();
    let bin_dir = bin
        .parent()
        .expect("bin dir")
        .to_string_lossy()
        .into_owned();
    let unit = unit_text()
        .replace("/usr/local/sbin", &bin_dir)
        .replace("/etc/blockrep/", &format!("{}/", etc.display()));

    match which("systemd-analyze") {
        None => eprintln!("SKIP the systemd-analyze part: systemd-analyze is not installed"),
        Some(sa) => {
            let path = dir.join(format!("blockrep@{}.service", c.resource()));
            std::fs::write(&path, &unit).expect("unit file");
            let out = run(Command::new(sa).arg("verify").arg(&path), CMD_TIMEOUT);
            assert!(
                out.success() && out.stderr.trim().is_empty(),
                "systemd-analyze verify:\n{}",
                out.describe()
            );
        }
    }

    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart")
        .replace("%i", c.resource());
    let mut args = exec.split_whitespace();
    let program = args.next().expect("program");
    // This node's name: the unit's default is the host name.
    let mut cmd = Command::new(program);
    cmd.args(args).arg("-n").arg("alpha");
    let log = dir.join("unit.log");
    let mut daemon = ChildGuard::spawn(&mut cmd, Some(&log));
    let up = wait_for(Duration::from_secs(20), || {
        a.ctl(&["status", "--json"]).success()
    });
    assert!(up, "the unit's daemon did not come up:\n{}", daemon.log());
    let st = a.status_json();
    assert_eq!(st["up"], true, "{st}");
    assert_eq!(st["role"], "secondary", "a unit must not promote: {st}");
    let pid = nix::unistd::Pid::from_raw(daemon.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    assert!(
        daemon.wait_exit(Duration::from_secs(30)),
        "SIGTERM did not stop the daemon:\n{}",
        daemon.log()
    );
    assert_eq!(
        daemon.exit_code(),
        Some(0),
        "a service stop must exit 0:\n{}",
        daemon.log()
    );
    assert!(!a.ctl(&["status"]).success(), "still running after SIGTERM");
}
