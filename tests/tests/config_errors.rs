//! Config and lifecycle errors of `blockrep-ctl` (issue 2): bad config files are rejected with
//! an `error:` line naming the file and the key; create-md guards existing metadata; up and
//! down are idempotent; status works on a stopped node.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use blockrep_e2e::*;

/// The contract: exit code 1 and a line `error: ...` on stderr.
fn assert_error(out: &CmdOutput) -> String {
    assert_eq!(
        out.code,
        Some(1),
        "expected exit code 1 (contract)\n{}",
        out.describe()
    );
    let line = out
        .stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no `error: ...` line on stderr\n{}", out.describe()));
    assert!(line.len() > "error:".len() + 3, "empty error: {line:?}");
    out.stderr.clone()
}

/// A config error must name the config file and every word of `words` (e.g. the key).
fn assert_config_error(out: &CmdOutput, config: &Path, words: &[&str]) {
    let err = assert_error(out);
    let cfg = config.to_string_lossy();
    assert!(
        err.contains(cfg.as_ref()),
        "error does not name the config file {cfg}\n{}",
        out.describe()
    );
    for w in words {
        assert!(
            err.contains(w),
            "error does not mention {w:?}\n{}",
            out.describe()
        );
    }
}

/// Runs create-md and up on a broken config: both fail the same way, no daemon is left.
fn check_broken_config(c: &Cluster, words: &[&str]) {
    let a = c.alpha();
    assert_config_error(&a.ctl(&["create-md"]), c.config_path(), words);
    assert_config_error(&a.ctl(&["up"]), c.config_path(), words);
    assert!(
        c.daemon_processes().is_empty(),
        "a daemon was left running after a config error: {:?}",
        c.daemon_processes()
    );
}

fn edit_config(c: &Cluster, from: &str, to: &str) {
    let text = c.config_text();
    assert!(text.contains(from), "config has no {from:?}:\n{text}");
    c.write_config(&text.replacen(from, to, 1));
}

#[test]
fn malformed_toml_is_rejected() {
    let c = Cluster::builder("cfg-malformed").build();
    // An unquoted size: not valid TOML.
    edit_config(&c, "journal-size = \"64M\"", "journal-size = 64M");
    let line_no = c
        .config_text()
        .lines()
        .position(|l| l.starts_with("journal-size"))
        .unwrap()
        + 1;
    let a = c.alpha();
    for args in [&["create-md"][..], &["up"][..]] {
        let out = a.ctl(args);
        assert_config_error(&out, c.config_path(), &[]);
        assert!(
            out.stderr.contains("journal-size") || out.stderr.contains(&format!("line {line_no}")),
            "error names neither the key nor its line {line_no}\n{}",
            out.describe()
        );
    }
    assert!(c.daemon_processes().is_empty());

    // Broken structure.
    edit_config(&c, "[resource]", "[resource");
    assert_config_error(&a.ctl(&["create-md"]), c.config_path(), &[]);
}

#[test]
fn unknown_node_is_rejected() {
    let c = Cluster::builder("cfg-node").build();
    let a = c.alpha();
    for sub in ["create-md", "up", "status"] {
        let out = run(
            Command::new(a.ctl_path())
                .arg("-c")
                .arg(c.config_path())
                .args(["-n", "gamma", sub]),
            CMD_TIMEOUT,
        );
        assert_config_error(&out, c.config_path(), &["gamma"]);
    }
    assert!(c.daemon_processes().is_empty());
}

#[test]
fn missing_key_is_named() {
    let c = Cluster::builder("cfg-missing").build();
    let text = c.config_text();
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("backing ="))
        .collect();
    assert_eq!(kept.len() + 1, text.lines().count());
    c.write_config(&(kept.join("\n") + "\n"));
    check_broken_config(&c, &["backing"]);
}

#[test]
fn protocol_d_is_rejected() {
    let c = Cluster::builder("cfg-proto").protocol("D").build();
    check_broken_config(&c, &["protocol"]);
}

#[test]
fn bad_values_are_named() {
    for (key, from, to) in [
        (
            "journal-size",
            "journal-size = \"64M\"",
            "journal-size = \"64Q\"",
        ),
        (
            "bitmap-granularity",
            "bitmap-granularity = \"4K\"",
            "bitmap-granularity = \"3K\"",
        ),
        (
            "bitmap-granularity",
            "bitmap-granularity = \"4K\"",
            "bitmap-granularity = \"2M\"",
        ),
        ("io-engine", "io-engine = \"auto\"", "io-engine = \"turbo\""),
        ("export", "export = \"127.0.0.1:", "export = \"127.0.0.1:x"),
    ] {
        let c = Cluster::builder("cfg-values").build();
        edit_config(&c, from, to);
        assert_config_error(&c.alpha().ctl(&["create-md"]), c.config_path(), &[key]);
    }
}

#[test]
fn unknown_key_is_rejected() {
    // A misspelt key must not be silently ignored (here: the protocol would stay the default).
    let c = Cluster::builder("cfg-unknown-key").build();
    edit_config(&c, "protocol = \"C\"", "protocl = \"A\"");
    check_broken_config(&c, &["protocl"]);
}

#[test]
fn missing_backing_file_fails_create_md() {
    let c = Cluster::builder("no-backing").no_backing_files().build();
    let a = c.alpha();
    assert!(!a.backing_path().exists());
    let out = a.ctl(&["create-md"]);
    let err = assert_error(&out);
    let backing = a.backing_path().to_string_lossy();
    assert!(
        err.contains(backing.as_ref()),
        "error does not name the missing backing file {backing}\n{}",
        out.describe()
    );
    assert!(
        !a.backing_path().exists(),
        "create-md created the missing backing file"
    );
}

#[test]
fn create_md_twice_needs_force() {
    let c = Cluster::builder("create-md-twice").build();
    let a = c.alpha();
    a.create_md();
    let md = a.ctl_ok(&["dump-md"]).stdout;
    assert!(!md.trim().is_empty(), "dump-md printed nothing");
    assert_error(&a.ctl(&["create-md"]));
    assert_eq!(
        a.ctl_ok(&["dump-md"]).stdout,
        md,
        "refused create-md changed the metadata"
    );
    a.ctl_ok(&["create-md", "--force"]);
    a.ctl_ok(&["dump-md"]);
    // And the result is usable.
    a.up();
    a.primary_force();
    assert!(nbdinfo_size(&a.uri()) > 0);
}

/// An admin turning a disk that holds a filesystem into a replicated device: internal
/// metadata takes the end of the device, so create-md refuses to cut off a filesystem's tail
/// (as DRBD's create-md does) and writes nothing; a filesystem that fits in the exported range
/// is kept, and the export serves it intact.
#[test]
fn create_md_refuses_to_cut_a_filesystem_and_keeps_one_that_fits() {
    let c = Cluster::builder("create-md-fs")
        .backing_size(128 << 20)
        .build();
    let a = c.alpha();
    let img = a.backing_path().to_owned();
    let mkfs = |size: Option<&str>| {
        let mut cmd = Command::new("mkfs.ext4");
        cmd.args(["-q", "-F", "-L", "kept"]).arg(&img);
        if let Some(s) = size {
            cmd.arg(s);
        }
        run_ok(&mut cmd, LONG_TIMEOUT);
    };
    // A filesystem over the whole device: refused, naming it and the ways out.
    mkfs(None);
    let before = std::fs::read(&img).expect("read the backing file");
    let out = a.ctl(&["create-md"]);
    let err = assert_error(&out);
    for w in [
        "ext4 filesystem of 134217728 bytes",
        "Shrink",
        "meta =",
        "--force",
    ] {
        assert!(
            err.contains(w),
            "error does not mention {w:?}\n{}",
            out.describe()
        );
    }
    assert!(
        std::fs::read(&img).expect("read the backing file") == before,
        "a refused create-md changed the device"
    );
    assert!(
        !a.ctl(&["dump-md"]).success(),
        "a refused create-md wrote metadata"
    );

    // Shrunk to fit (here: made smaller): kept, and said so.
    mkfs(Some("48M"));
    let out = a.ctl_ok(&["create-md"]);
    assert!(
        out.stdout.contains("ext4 filesystem of 50331648 bytes") && out.stdout.contains("kept"),
        "create-md does not report the filesystem it kept\n{}",
        out.describe()
    );
    run_ok(Command::new("e2fsck").arg("-fn").arg(&img), LONG_TIMEOUT);
    // Served intact through the export (a real NBD client reads it back).
    a.up();
    a.primary_force();
    let copy = c.dir().path().join("through-export.img");
    run_ok(
        Command::new("nbdcopy").arg(a.uri()).arg(&copy),
        LONG_TIMEOUT,
    );
    let out = run_ok(Command::new("e2fsck").arg("-fn").arg(&copy), LONG_TIMEOUT);
    assert!(
        out.stdout.contains("kept"),
        "e2fsck of the export:\n{}",
        out.describe()
    );
}

/// An admin taking a node out of blockrep (DRBD's `wipe-md`): refused while the resource is
/// up, and without --force where nobody can answer its question (no terminal); then the
/// metadata is gone (`up` says to run create-md) and the filesystem made through the export
/// is intact at the start of the backing device, readable without blockrep.
#[test]
fn wipe_md_destroys_the_metadata_and_leaves_the_filesystem_usable() {
    let c = Cluster::builder("wipe-md").backing_size(128 << 20).build();
    let a = c.alpha();
    let img = a.backing_path().to_owned();
    // A filesystem with a file in it, made beside and copied in through the export.
    let content = c.dir().path().join("content");
    std::fs::create_dir(&content).expect("content dir");
    std::fs::write(content.join("hello.txt"), "kept through wipe-md\n").expect("the file");
    let fs = c.dir().path().join("fs.img");
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "wiped", "-d"])
            .arg(&content)
            .arg(&fs)
            .arg("32M"),
        LONG_TIMEOUT,
    );
    a.create_md();
    a.up();
    a.primary_force();
    run_ok(Command::new("nbdcopy").arg(&fs).arg(a.uri()), LONG_TIMEOUT);
    let err = assert_error(&a.ctl(&["wipe-md", "--force"]));
    assert!(err.contains("is up"), "{err}");
    a.down();

    let md = a.ctl_ok(&["dump-md"]).stdout;
    let err = assert_error(&a.ctl(&["wipe-md"]));
    assert!(err.contains("--force"), "{err}");
    assert_eq!(
        a.ctl_ok(&["dump-md"]).stdout,
        md,
        "a refused wipe-md changed the metadata"
    );
    // On a terminal it asks, and anything but `yes` wipes nothing.
    if have_tools(&["script"]) {
        let line = format!(
            "{} -c {} -n {} wipe-md",
            a.ctl_path().display(),
            a.config_path().display(),
            a.name()
        );
        let out = run(
            Command::new("sh")
                .arg("-c")
                .arg(format!("printf 'no\\n' | script -qec '{line}' /dev/null")),
            LONG_TIMEOUT,
        );
        assert!(
            !out.success() && out.stdout.contains("Type 'yes'") && out.stdout.contains("not wiped"),
            "wipe-md on a terminal answered 'no':\n{}",
            out.describe()
        );
        assert_eq!(
            a.ctl_ok(&["dump-md"]).stdout,
            md,
            "wipe-md answered 'no' changed the metadata"
        );
    }
    let out = a.ctl_ok(&["wipe-md", "--force"]);
    for w in ["metadata wiped", "mounted directly", "create-md"] {
        assert!(
            out.stdout.contains(w),
            "wipe-md does not say {w:?}\n{}",
            out.describe()
        );
    }
    assert!(
        !a.ctl(&["dump-md"]).success(),
        "metadata left after wipe-md"
    );
    let err = assert_error(&a.ctl(&["up"]));
    assert!(err.contains("create-md"), "{err}");
    // The filesystem, straight from the backing device.
    run_ok(Command::new("e2fsck").arg("-fn").arg(&img), LONG_TIMEOUT);
    let cat = run_ok(
        Command::new("debugfs")
            .args(["-R", "cat /hello.txt"])
            .arg(&img),
        LONG_TIMEOUT,
    );
    assert!(
        cat.stdout.contains("kept through wipe-md"),
        "the file on the wiped device:\n{}",
        cat.describe()
    );
    // Wiped is new: create-md needs no --force, and keeps the filesystem that fits.
    a.ctl_ok(&["create-md"]);
    a.up();
}

/// Decimal numbers in `s`.
fn numbers(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|t| !t.is_empty())
        .filter_map(|t| t.parse().ok())
        .collect()
}

#[test]
fn backing_too_small_is_refused_with_numbers() {
    let c = Cluster::builder("too-small").backing_size(64 << 10).build();
    let a = c.alpha();
    let out = a.ctl(&["create-md"]);
    let err = assert_error(&out);
    let err_line = err.lines().find(|l| l.starts_with("error:")).unwrap();
    let nums = numbers(err_line);
    assert!(
        nums.contains(&65536) || nums.contains(&64),
        "error does not state the backing size (65536 bytes / 64 KiB): {err_line:?}"
    );
    assert!(
        nums.len() >= 2,
        "error should state both the size and what is needed: {err_line:?}"
    );
}

#[test]
fn up_twice_is_idempotent() {
    let c = Cluster::builder("up-twice").build();
    let a = c.alpha();
    a.create_md();
    a.up();
    let pid = a.pid().unwrap();
    a.ctl_ok(&["up"]);
    let st = a.status_json();
    assert_eq!(
        st["pid"].as_u64(),
        Some(pid as u64),
        "second up replaced the daemon: {st}"
    );
    assert_eq!(st["up"], true, "{st}");
    assert_eq!(st["role"], "secondary", "a node starts secondary: {st}");
    assert_eq!(
        c.daemon_processes(),
        vec![pid],
        "exactly one daemon for this resource"
    );
}

#[test]
fn down_twice_is_idempotent() {
    let c = Cluster::builder("down-twice").build();
    let a = c.alpha();
    // down on a node that was never up.
    a.ctl_ok(&["down"]);
    a.create_md();
    a.up();
    a.primary_force();
    let pid = a.pid().unwrap();
    a.ctl_ok(&["down"]);
    assert!(
        wait_pid_gone(pid, Duration::from_secs(10)),
        "daemon {pid} still running after down"
    );
    a.ctl_ok(&["down"]);
    assert!(c.daemon_processes().is_empty());
    // The export is gone with it.
    let out = run(
        Command::new("nbdinfo").arg("--size").arg(a.uri()),
        CMD_TIMEOUT,
    );
    assert_ne!(out.code, Some(0), "export still served after down");
}

/// Something listens on the control socket but does not answer like a daemon (a hung or
/// foreign process): `status` must not call the node "not running" (exit 3) but say it cannot
/// tell (exit 4, with the error), and create-md must not write metadata under it.
#[test]
fn status_and_create_md_when_the_control_socket_answers_garbage() {
    let c = Cluster::builder("status-garbage").build();
    let a = c.alpha();
    let path = a.control_path().to_owned();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("control socket dir");
    }
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind control socket");
    listener.set_nonblocking(true).expect("nonblocking");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        use std::io::BufRead;
                        // Reads the request first, so the client never fails to send it.
                        let _ = s.set_nonblocking(false);
                        let mut r = std::io::BufReader::new(s);
                        let mut line = String::new();
                        let _ = r.read_line(&mut line);
                        let _ = r.get_mut().write_all(b"this is not a daemon\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        })
    };
    let out = a.ctl_timeout(&["status"], Duration::from_secs(10));
    let json = a.ctl_timeout(&["status", "--json"], Duration::from_secs(10));
    let md = a.ctl_timeout(&["create-md"], Duration::from_secs(10));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = server.join();
    let _ = std::fs::remove_file(&path);
    for out in [&out, &json] {
        assert_eq!(out.code, Some(4), "status exit code\n{}", out.describe());
        assert!(
            out.stderr.contains("error:") && out.stderr.contains("decoding the daemon's reply"),
            "status does not say why it cannot tell\n{}",
            out.describe()
        );
    }
    let err = assert_error(&md);
    assert!(err.contains("cannot tell"), "{}", md.describe());
    assert!(
        !a.ctl(&["dump-md"]).success(),
        "create-md wrote metadata while it could not tell whether a daemon runs"
    );
}

/// A daemon on its way out (a `down` in progress, or a kill -9 whose last threads still hold
/// the control socket after the process already shows as a zombie) accepts a connection and
/// drops it unanswered: `up` must wait for it to go and then start a daemon, not fail with
/// "connection reset by peer".
#[test]
fn up_waits_out_a_daemon_that_hangs_up_on_it() {
    let c = Cluster::builder("up-dying").nodes(1).build();
    let a = c.node("alpha");
    a.create_md();
    let path = a.control_path().to_owned();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("control socket dir");
    }
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind control socket");
    listener.set_nonblocking(true).expect("nonblocking");
    let hung_up = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let dying = {
        let hung_up = hung_up.clone();
        std::thread::spawn(move || {
            // Hangs up for 1.5 s after the first connection it sees (however late a loaded
            // machine starts `up`), 30 s at most.
            let start = std::time::Instant::now();
            let mut until = start + Duration::from_secs(30);
            while std::time::Instant::now() < until {
                match listener.accept() {
                    Ok((s, _)) => {
                        drop(s);
                        if hung_up.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                            until = std::time::Instant::now() + Duration::from_millis(1500);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            // The listener closes here and its socket file stays behind, as a dead
            // daemon's does.
        })
    };
    let out = a.ctl_timeout(&["up"], Duration::from_secs(60));
    let _ = dying.join();
    assert!(
        hung_up.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the dying daemon never saw up's connection"
    );
    assert!(
        out.success(),
        "up failed on a dying daemon\n{}",
        out.describe()
    );
    assert_eq!(a.status_json()["up"], true);
    a.down();
}

#[test]
fn status_of_a_stopped_node() {
    let c = Cluster::builder("status-stopped").build();
    let a = c.alpha();
    a.create_md();
    // Before any up, and after down.
    for phase in ["never started", "after down"] {
        if phase == "after down" {
            a.up();
            a.down();
        }
        let out = a.ctl_timeout(&["status"], Duration::from_secs(10));
        // Not up: exit 3 (LSB "not running"), so `status || alert` works in scripts.
        assert_eq!(
            out.code,
            Some(3),
            "{phase}: status exit code\n{}",
            out.describe()
        );
        let all = out.all_output();
        assert!(
            all.contains("alpha") || all.contains(&a.control_path().to_string_lossy().into_owned()),
            "{phase}: status does not mention the node\n{}",
            out.describe()
        );
        assert!(
            all.to_lowercase().contains("down")
                || all.to_lowercase().contains("not running")
                || all.to_lowercase().contains("stopped"),
            "{phase}: status does not say the node is down\n{}",
            out.describe()
        );

        let out = a.ctl_timeout(&["status", "--json"], Duration::from_secs(10));
        assert_eq!(
            out.code,
            Some(3),
            "{phase}: status --json exit code\n{}",
            out.describe()
        );
        let v: serde_json::Value = serde_json::from_str(out.stdout.trim())
            .unwrap_or_else(|e| panic!("{phase}: invalid JSON ({e})\n{}", out.describe()));
        assert_eq!(v["up"], false, "{phase}: {v}");
        assert_eq!(v["node"], "alpha", "{phase}: {v}");
    }
}

/// `journal-size` is fixed by `create-md`: a config changed afterwards is not applied (the
/// metadata's size is used, nothing moves), and `up` says so instead of ignoring it silently.
#[test]
fn a_journal_size_changed_after_create_md_is_named_at_up() {
    let c = Cluster::builder("cfg-journal-size").nodes(2).build();
    let a = c.alpha();
    a.create_md();
    edit_config(&c, "journal-size = \"64M\"", "journal-size = \"16M\"");
    let out = a.ctl_ok(&["up"]).stdout;
    assert!(
        out.contains("warning: journal-size is 16777216 bytes in the config"),
        "up's answer does not name the overridden journal-size:\n{out}"
    );
    let st = a.status_json();
    assert_eq!(
        st["replication"]["journal_size"].as_u64(),
        Some(64 << 20),
        "the metadata's journal is used: {st}"
    );
    let text = a.ctl_ok(&["status"]).stdout;
    assert!(
        text.contains("warning: journal-size is 16777216 bytes"),
        "status does not keep the warning:\n{text}"
    );
    let log = std::fs::read_to_string(a.log_path()).unwrap_or_default();
    assert!(
        log.contains("journal-size is 16777216 bytes in the config")
            && log.contains("67108864-byte journal"),
        "up does not say the config's journal-size is not the metadata's:\n{}",
        a.log_tail(10)
    );
    a.down();
}

/// A journal smaller than the config's `journal-size` (create-md ran with the smaller one):
/// a resync cuts its chunks to the journal that runs, not to the config's, and ends (chunks
/// of the config's size never fit the metadata's journal: the sync failed and restarted for
/// ever).
#[test]
fn a_full_sync_fits_the_metadata_journal_when_the_config_names_a_larger_one() {
    let c = Cluster::builder("cfg-journal-resync")
        .nodes(2)
        .journal_size("1M")
        .build();
    let (a, b) = (c.alpha(), c.beta());
    a.create_md();
    b.create_md();
    // Data on alpha for the sync to move: 8 MiB of a pattern no zero-region shortcut skips.
    let pattern: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(a.backing_path())
            .expect("alpha's backing file");
        f.write_all_at(&pattern, 0).expect("pattern");
        f.sync_all().expect("sync");
    }
    edit_config(&c, "journal-size = \"1M\"", "journal-size = \"64M\"");
    a.up();
    b.up();
    a.primary_force();
    c.wait_in_sync(Duration::from_secs(120));
    let mut got = vec![0u8; pattern.len()];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(b.backing_path()).expect("beta's backing file");
        f.read_exact_at(&mut got, 0).expect("read beta");
    }
    assert!(
        got == pattern,
        "beta does not hold alpha's data after the sync"
    );
    assert_eq!(
        a.log_count("resync chunk larger than the journal"),
        0,
        "resync chunks did not fit the journal:\n{}",
        a.log_tail(20)
    );
    a.down();
    b.down();
}

/// A control socket path that names an existing file which is not a socket (a slip of the
/// pen: another resource's disk image, say) is refused at `up`, and the file is left as it
/// was. Before (review finding), `up` took it for a stale socket and removed it.
#[test]
fn a_control_path_naming_a_file_is_refused_and_the_file_kept() {
    let c = Cluster::builder("control-file").build();
    let a = c.alpha();
    a.create_md();
    let other = c.dir().join("other-resource.img");
    std::fs::write(&other, b"another resource's data").expect("write the other file");
    edit_config(
        &c,
        &format!("control = \"{}\"", a.control_path().display()),
        &format!("control = \"{}\"", other.display()),
    );
    let err = assert_error(&a.ctl(&["up"]));
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(
        std::fs::read(&other).expect("the file is still there"),
        b"another resource's data"
    );
    assert!(
        c.daemon_processes().is_empty(),
        "a daemon was left running: {:?}",
        c.daemon_processes()
    );
}

/// Two config files that name one control socket reach one daemon: a command read from the
/// other file is refused and names both resources, and the daemon is left as it was. Before
/// (review finding), `up` from the copy said "already up" and `primary` promoted the other
/// resource.
#[test]
fn a_command_from_another_resources_config_sharing_the_control_socket_is_refused() {
    let c = Cluster::builder("control-shared").build();
    let a = c.alpha();
    a.create_md();
    a.up();
    let text = c.config_text();
    let name = text
        .lines()
        .find_map(|l| l.strip_prefix("name = "))
        .expect("the resource's name line")
        .to_string();
    let copy = c.dir().join("copy.toml");
    std::fs::write(
        &copy,
        text.replacen(&format!("name = {name}"), "name = \"r-copy\"", 1),
    )
    .expect("write the copy");
    for args in [&["primary", "--force"][..], &["status"], &["down"], &["up"]] {
        let out = run(
            Command::new(a.ctl_path())
                .arg("-c")
                .arg(&copy)
                .arg("-n")
                .arg("alpha")
                .args(args),
            Duration::from_secs(30),
        );
        assert!(
            !out.success(),
            "{args:?} from the copy:\n{}",
            out.describe()
        );
        assert!(
            out.stderr.contains("r-copy") && out.stderr.contains("the same `control` path"),
            "{args:?}:\n{}",
            out.describe()
        );
    }
    let st = a.status_json();
    assert_eq!(st["up"], true, "{st}");
    assert_eq!(st["role"], "secondary", "{st}");
}
