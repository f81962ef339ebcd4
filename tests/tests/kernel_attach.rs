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

#[test]
fn kernel_device_attach_mkfs_mount_detach() {
    if !Path::new("/dev/nbd0").exists() {
        println!("SKIP: kernel nbd module not present");
        return;
    }
    let c = Cluster::builder("kernel")
        .kernel_device("/dev/nbd0")
        .build();
    let a = c.alpha();
    a.make_primary();
    let st = a.status_json();
    assert_eq!(st["kernel_device"], "/dev/nbd0", "{st}");
    let size = st["size"].as_u64().unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || sysfs_sectors("nbd0") > 0),
        "/sys/block/nbd0/size stayed 0"
    );
    assert_eq!(sysfs_sectors("nbd0") * 512, size);

    run_ok(
        Command::new("mkfs.ext4").args(["-q", "-F", "/dev/nbd0"]),
        LONG_TIMEOUT,
    );
    let mnt = c.dir().join("mnt");
    let m = Mount::new("/dev/nbd0", &mnt, None);
    let body = XorShift::new(42).bytes(3 << 20);
    std::fs::write(mnt.join("f"), &body).unwrap();
    run_ok(&mut Command::new("sync"), CMD_TIMEOUT);
    assert_same_bytes(
        &std::fs::read(mnt.join("f")).unwrap(),
        &body,
        "file on /dev/nbd0",
    );
    m.close();
    run_ok(
        Command::new("fsck.ext4").args(["-f", "-n", "/dev/nbd0"]),
        LONG_TIMEOUT,
    );

    a.down();
    assert!(
        wait_for(Duration::from_secs(10), || sysfs_sectors("nbd0") == 0),
        "/dev/nbd0 still attached after down"
    );
}
