//! Harness of the blockrep end-to-end tests.
//!
//! Everything here drives real processes: the `blockrep` daemon through `blockrep-ctl`, real
//! NBD clients (`nbdinfo`, `nbdcopy`, `qemu-io`, `nbdfuse`), loop devices and filesystems.
//! Every resource a test creates is owned by an RAII guard, so a failing (panicking) test
//! cleans up as well as a passing one:
//!
//! - [`TestDir`]: a unique directory under /tmp, removed on drop (after lazily unmounting and
//!   detaching anything a buggy test left inside it).
//! - [`Cluster`] / [`Node`]: config file, backing files and daemons of one resource; dropping a
//!   node runs `blockrep-ctl down` (bounded in time) and then SIGKILLs every daemon pid it saw.
//! - [`NbdFuseMount`], [`LoopDev`], [`Mount`], [`FsStack`]: the client-side stack, torn down in
//!   the order umount → `losetup -d` → `fusermount3 -u`.
//! - [`RawNbd`]: a hand-written NBD client for protocol-level (and hostile) tests. It does
//!   not share code with the server on purpose.
//! - [`LinkProxy`]: a TCP proxy in front of beta's replication port that can cut, refuse and
//!   resume the peer link ([`ClusterBuilder::beta_via_proxy`]).
//! - [`StampWriter`]: stamped 4 KiB writes with many in flight (python3 + libnbd), logging
//!   what was sent and what was acknowledged; [`Stamp`] parses a replica's blocks.
//! - Two-node helpers on [`Cluster`]/[`Node`]: `start_pair`, `wait_in_sync`,
//!   `assert_replicas_identical`, `repl`, `wait_repl`, `backing_data`.
//!
//! Tests run in parallel: every test gets its own directory, ports and resource name.

pub mod blocks;
mod cluster;
mod cmd;
mod data;
mod guards;
mod nbd_raw;
mod proc;
mod proxy;
mod repl;
mod stamp;
mod testdir;
pub mod watch;

pub use cluster::{bin_dir, Cluster, ClusterBuilder, Export, ExportKind, Node};
pub use cmd::{run, run_ok, run_quiet, CmdOutput};
pub use data::{random_bytes, write_random_file, XorShift};
pub use guards::{
    pause_control, ChildGuard, ErrorTrigger, FsStack, LoopDev, Mount, NbdFuseMount, NbdkitFile,
    StopDaemons,
};
pub use nbd_raw::{nbd_const, RawNbd, Reply};
pub use proc::{fd_count, kill9, pid_alive, pids_with_arg, wait_for, wait_pid_gone};
pub use proxy::LinkProxy;
pub use repl::{first_difference, CONNECT_TIMEOUT, SYNC_TIMEOUT};
pub use stamp::{
    crc32_ieee, python_with_nbd, Stamp, StampOpts, StampOrder, StampWriter, WriterLog, STAMP_BLOCK,
};
pub use testdir::{free_port, TestDir};

use std::time::Duration;

/// Default bound for one short command (ctl calls, nbdinfo, mount, ...).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound for a data-moving command (nbdcopy, qemu-io, mkfs).
pub const LONG_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether an external program is on PATH (for tests that need an optional tool).
pub fn have_tool(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

/// Whether every tool is on PATH; prints which one is missing (the test then skips itself).
pub fn have_tools(names: &[&str]) -> bool {
    match names.iter().find(|n| !have_tool(n)) {
        Some(missing) => {
            skip_or_fail(&format!("{missing} not installed"));
            false
        }
        None => true,
    }
}

/// Says why a test skips, or fails it where every tool must be there: `scripts/test.sh` (the
/// README's test command, also what CI runs) sets `BLOCKREP_E2E_REQUIRE_TOOLS=1` after
/// `deps.sh` installed them, so a failed install fails the suite instead of skipping half
/// of it green.
pub fn skip_or_fail(why: &str) {
    if std::env::var_os("BLOCKREP_E2E_REQUIRE_TOOLS").is_some_and(|v| v == "1") {
        panic!("{why}, although scripts/deps.sh ran (BLOCKREP_E2E_REQUIRE_TOOLS=1)");
    }
    println!("SKIP: {why}");
}

/// Runs `nbdinfo --json URI` and returns the JSON object of the (single) export.
pub fn nbdinfo_json(uri: &str) -> serde_json::Value {
    let out = run_ok(
        std::process::Command::new("nbdinfo").arg("--json").arg(uri),
        CMD_TIMEOUT,
    );
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo --json printed invalid JSON ({e}):\n{}", out.stdout));
    let exports = v["exports"]
        .as_array()
        .unwrap_or_else(|| panic!("nbdinfo --json has no exports array:\n{}", out.stdout));
    assert_eq!(
        exports.len(),
        1,
        "nbdinfo --json {uri} should describe exactly one export:\n{}",
        out.stdout
    );
    exports[0].clone()
}

/// Runs `nbdinfo --size URI` and returns the size. Panics (with stderr) if it fails.
pub fn nbdinfo_size(uri: &str) -> u64 {
    let out = run_ok(
        std::process::Command::new("nbdinfo").arg("--size").arg(uri),
        CMD_TIMEOUT,
    );
    out.stdout
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("nbdinfo --size printed {:?}: {e}", out.stdout))
}

/// Exit code of `nbdinfo --can FLAG URI` (0 = yes, 2 = no, anything else = error).
pub fn nbdinfo_can(uri: &str, flag: &str) -> i32 {
    let out = run(
        std::process::Command::new("nbdinfo")
            .arg("--can")
            .arg(flag)
            .arg(uri),
        CMD_TIMEOUT,
    );
    out.code.unwrap_or(-1)
}

/// Panics unless `got == want`, naming the first differing offset (never dumps megabytes).
pub fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let ctx = |v: &[u8]| {
        let e = (first + 16).min(v.len());
        format!("{:02x?}", &v[first.min(v.len())..e])
    };
    panic!(
        "{what}: data differs: lengths {} (got) vs {} (want), first difference at offset {first}: \
         got {} want {}",
        got.len(),
        want.len(),
        ctx(got),
        ctx(want)
    );
}

/// Panics unless every byte of `v` is zero, naming the first non-zero offset.
pub fn assert_all_zero(v: &[u8], what: &str) {
    if let Some(i) = v.iter().position(|b| *b != 0) {
        panic!("{what}: expected zeroes, found {:#04x} at offset {i}", v[i]);
    }
}
