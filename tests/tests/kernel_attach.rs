//! Kernel attach (issue 2): with `kernel-device` set, `up` attaches /dev/nbdN to the export
//! and `down` detaches it. Needs the kernel nbd module; skipped without it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use blockrep_e2e::*;

fn sysfs_sectors(dev: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/block/{dev}/size"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// A kernel NBD device nobody uses (no `pid` in sysfs, size 0), loading the module first if
/// it can be: tests may run beside another user of /dev/nbd0. None without the module.
fn free_nbd_device() -> Option<String> {
    if !Path::new("/sys/module/nbd").exists() {
        // Where the module exists but is not loaded; a kernel without it says no here.
        let _ = Command::new("modprobe").arg("nbd").output();
    }
    (0..16).map(|i| format!("nbd{i}")).find(|n| {
        Path::new(&format!("/dev/{n}")).exists()
            && !Path::new(&format!("/sys/block/{n}/pid")).exists()
            && sysfs_sectors(n) == 0
    })
}

#[test]
fn kernel_device_attach_mkfs_mount_detach() {
    let Some(nbd) = free_nbd_device() else {
        println!(
            "SKIP: no kernel nbd device (the nbd module is not available here, or every /dev/nbdN is in use); the attach path's unit tests still run"
        );
        return;
    };
    let dev = format!("/dev/{nbd}");
    let c = Cluster::builder("kernel").kernel_device(&dev).build();
    let a = c.alpha();
    a.make_primary();
    let st = a.status_json();
    assert_eq!(st["kernel_device"], dev.as_str(), "{st}");
    let size = st["size"].as_u64().unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || sysfs_sectors(&nbd) > 0),
        "/sys/block/{nbd}/size stayed 0"
    );
    assert_eq!(sysfs_sectors(&nbd) * 512, size);

    run_ok(
        Command::new("mkfs.ext4").args(["-q", "-F", &dev]),
        LONG_TIMEOUT,
    );
    let mnt = c.dir().join("mnt");
    let m = Mount::new(&dev, &mnt, None);
    let body = XorShift::new(42).bytes(3 << 20);
    std::fs::write(mnt.join("f"), &body).unwrap();
    // This filesystem only: a global sync would wait on every other test's devices too.
    run_ok(Command::new("sync").arg("-f").arg(&mnt), CMD_TIMEOUT);
    assert_same_bytes(
        &std::fs::read(mnt.join("f")).unwrap(),
        &body,
        &format!("file on {dev}"),
    );
    m.close();
    run_ok(
        Command::new("fsck.ext4").args(["-f", "-n", &dev]),
        LONG_TIMEOUT,
    );

    a.down();
    assert!(
        wait_for(Duration::from_secs(10), || sysfs_sectors(&nbd) == 0),
        "{dev} still attached after down"
    );
}

/// Where the kernel has no nbd module at all (this machine, a container): `primary` says the
/// device is not attached, in its own answer (the admin's next step is a mount of it), and
/// `status` says why; the export still serves on its socket. Where the module exists this
/// is the test above's case instead.
#[test]
fn without_the_nbd_module_primary_says_the_device_is_not_attached() {
    if free_nbd_device().is_some() || Path::new("/sys/module/nbd").exists() {
        println!("SKIP: the kernel has an nbd module here (the attach test above runs instead)");
        return;
    }
    let dev = "/dev/nbd15";
    let c = Cluster::builder("kernel-absent").kernel_device(dev).build();
    let a = c.alpha();
    a.create_md();
    a.up();
    let out = a.ctl_ok(&["primary", "--force"]);
    assert!(
        out.stdout
            .contains(&format!("warning: {dev} is not attached"))
            && out.stdout.contains("the export serves on its socket only"),
        "{}",
        out.describe()
    );
    let st = a.status_json();
    assert_eq!(st["role"], "primary", "{st}");
    let note = st["kernel_note"].as_str().unwrap_or("");
    assert!(note.contains("nbd module not loaded"), "{st}");
    // The socket export works all the same.
    let data = XorShift::new(7).bytes(1 << 20);
    let mut r = a.raw_open();
    r.write_at(0, &data, 0)
        .expect("write through the socket export");
    assert_eq!(r.read_at(0, 1 << 20).expect("read back"), data);
    r.disconnect();
}
