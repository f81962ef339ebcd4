//! A resource's config, backing files and daemons ("nodes"), driven through `blockrep-ctl`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

use crate::cmd::{run, run_ok, run_quiet, CmdOutput};
use crate::guards::ChildGuard;
use crate::nbd_raw::RawNbd;
use crate::proc::{kill9, pid_alive, pids_with_arg};
use crate::proxy::LinkProxy;
use crate::testdir::{free_port, TestDir};
use crate::CMD_TIMEOUT;

/// Directory holding the `blockrep` and `blockrep-ctl` binaries: `$BLOCKREP_BIN_DIR` if set,
/// else `target/debug` (or `target/release`) of the workspace. The harness never builds
/// them: run `cargo build -p blockrep -p blockrep-ctl` first.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BLOCKREP_BIN_DIR") {
        let d = PathBuf::from(d);
        assert!(
            d.join("blockrep-ctl").is_file() && d.join("blockrep").is_file(),
            "BLOCKREP_BIN_DIR={} does not hold blockrep and blockrep-ctl",
            d.display()
        );
        return d;
    }
    let mut roots = Vec::new();
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        roots.push(PathBuf::from(t));
    }
    roots.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    for r in &roots {
        for profile in ["debug", "release"] {
            let d = r.join(profile);
            if d.join("blockrep-ctl").is_file() && d.join("blockrep").is_file() {
                return d.canonicalize().unwrap_or(d);
            }
        }
    }
    panic!(
        "blockrep binaries not found under {:?}: run `cargo build -p blockrep -p blockrep-ctl` \
         first (or set BLOCKREP_BIN_DIR)",
        roots
    );
}

/// Where a node exports its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Export {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Export {
    /// The value of the `export` config key (also what `status --json` reports).
    pub fn config_value(&self) -> String {
        match self {
            Export::Tcp(a) => a.to_string(),
            Export::Unix(p) => format!("unix:{}", p.display()),
        }
    }

    /// The NBD URI of export `name` (for nbdinfo, nbdcopy, nbdfuse, qemu-io).
    pub fn uri(&self, name: &str) -> String {
        match self {
            Export::Tcp(a) => format!("nbd://{a}/{name}"),
            Export::Unix(p) => format!("nbd+unix:///{name}?socket={}", p.display()),
        }
    }
}

/// TCP (`127.0.0.1:PORT`) or unix socket (`unix:DIR/NODE.nbd`) exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportKind {
    Tcp,
    Unix,
}

/// Builds a [`Cluster`]: see [`Cluster::builder`].
pub struct ClusterBuilder {
    test: String,
    nodes: usize,
    backing_size: u64,
    export: ExportKind,
    protocol: String,
    io_engine: String,
    direct_io: bool,
    journal_size: String,
    bitmap_granularity: String,
    external_meta: bool,
    kernel_device: Option<String>,
    resource_lines: Vec<String>,
    node_lines: Vec<(String, String)>,
    create_backing: bool,
    node_backing_sizes: Vec<(String, u64)>,
    resource_name: Option<String>,
    secret: String,
    secret_file: Option<PathBuf>,
    beta_proxy: bool,
}

pub(crate) fn toml_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

const NODE_NAMES: [&str; 2] = ["alpha", "beta"];

impl ClusterBuilder {
    /// Number of nodes: 1 (alpha) or 2 (alpha, beta). Default 1.
    pub fn nodes(mut self, n: usize) -> Self {
        assert!((1..=2).contains(&n), "1 or 2 nodes");
        self.nodes = n;
        self
    }
    /// Size of each backing file (sparse, made with `truncate`). Default 256 MiB.
    pub fn backing_size(mut self, bytes: u64) -> Self {
        self.backing_size = bytes;
        self
    }
    /// Size of one node's backing file (overrides [`Self::backing_size`] for it).
    pub fn node_backing_size(mut self, node: &str, bytes: u64) -> Self {
        self.node_backing_sizes.push((node.to_string(), bytes));
        self
    }
    /// The resource name (default: unique per test, `r-TAG`).
    pub fn resource_name(mut self, name: &str) -> Self {
        self.resource_name = Some(name.to_string());
        self
    }
    /// `secret-file = PATH` instead of an inline secret.
    pub fn secret_file(mut self, path: &Path) -> Self {
        self.secret_file = Some(path.to_path_buf());
        self
    }
    /// The shared secret (default "e2e-shared-secret").
    pub fn secret(mut self, secret: &str) -> Self {
        self.secret = secret.to_string();
        self
    }
    /// Puts a [`LinkProxy`] in front of beta: beta's `connect-address` is the proxy, which
    /// forwards to beta's replication port. See [`Cluster::proxy`].
    pub fn beta_via_proxy(mut self) -> Self {
        self.beta_proxy = true;
        self
    }
    /// Do not create backing files (for "missing backing file" tests).
    pub fn no_backing_files(mut self) -> Self {
        self.create_backing = false;
        self
    }
    pub fn export(mut self, kind: ExportKind) -> Self {
        self.export = kind;
        self
    }
    /// Replication protocol: "A", "B" or "C" (default "C"); any string is written as is.
    pub fn protocol(mut self, p: &str) -> Self {
        self.protocol = p.to_string();
        self
    }
    /// `io-engine` (default "auto").
    pub fn io_engine(mut self, e: &str) -> Self {
        self.io_engine = e.to_string();
        self
    }
    pub fn direct_io(mut self, on: bool) -> Self {
        self.direct_io = on;
        self
    }
    /// `journal-size` (default "64M").
    pub fn journal_size(mut self, s: &str) -> Self {
        self.journal_size = s.to_string();
        self
    }
    /// `bitmap-granularity` (default "4K").
    pub fn bitmap_granularity(mut self, s: &str) -> Self {
        self.bitmap_granularity = s.to_string();
        self
    }
    /// `meta = "DIR/NODE.meta"` instead of "internal".
    pub fn external_meta(mut self) -> Self {
        self.external_meta = true;
        self
    }
    /// `kernel-device` of node alpha.
    pub fn kernel_device(mut self, dev: &str) -> Self {
        self.kernel_device = Some(dev.to_string());
        self
    }
    /// An extra raw TOML line in `[resource]`.
    pub fn resource_line(mut self, line: &str) -> Self {
        self.resource_lines.push(line.to_string());
        self
    }
    /// An extra raw TOML line in `[node.NODE]`.
    pub fn node_line(mut self, node: &str, line: &str) -> Self {
        self.node_lines.push((node.to_string(), line.to_string()));
        self
    }

    /// Creates the test directory, backing files and config file. Starts nothing.
    pub fn build(self) -> Cluster {
        let dir = TestDir::new(&self.test);
        let resource = self
            .resource_name
            .clone()
            .unwrap_or_else(|| format!("r-{}", dir.tag()));
        let proxy_port = self.beta_proxy.then(free_port);
        let config = dir.join("blockrep.toml");
        let bin = bin_dir();
        let mut nodes = Vec::new();
        let mut text = String::new();
        text.push_str("[resource]\n");
        text.push_str(&format!("name = {}\n", toml_str(&resource)));
        text.push_str(&format!("protocol = {}\n", toml_str(&self.protocol)));
        match &self.secret_file {
            Some(p) => text.push_str(&format!(
                "secret-file = {}\n",
                toml_str(&p.to_string_lossy())
            )),
            None => text.push_str(&format!("secret = {}\n", toml_str(&self.secret))),
        }
        text.push_str(&format!("io-engine = {}\n", toml_str(&self.io_engine)));
        text.push_str(&format!("direct-io = {}\n", self.direct_io));
        text.push_str(&format!(
            "journal-size = {}\n",
            toml_str(&self.journal_size)
        ));
        text.push_str(&format!(
            "bitmap-granularity = {}\n",
            toml_str(&self.bitmap_granularity)
        ));
        for l in &self.resource_lines {
            text.push_str(l);
            text.push('\n');
        }
        for name in NODE_NAMES.iter().take(self.nodes) {
            let backing = dir.join(format!("{name}.img"));
            let backing_size = self
                .node_backing_sizes
                .iter()
                .rev()
                .find(|(n, _)| n == name)
                .map(|(_, s)| *s)
                .unwrap_or(self.backing_size);
            if self.create_backing {
                run_ok(
                    Command::new("truncate")
                        .arg("-s")
                        .arg(backing_size.to_string())
                        .arg(&backing),
                    CMD_TIMEOUT,
                );
            }
            let export = match self.export {
                ExportKind::Tcp => Export::Tcp(SocketAddr::from(([127, 0, 0, 1], free_port()))),
                ExportKind::Unix => Export::Unix(dir.join(format!("{name}.nbd"))),
            };
            let control = dir.join(format!("{name}.ctl"));
            let log = dir.join(format!("{name}.log"));
            let replication = SocketAddr::from(([127, 0, 0, 1], free_port()));
            text.push_str(&format!("\n[node.{name}]\n"));
            text.push_str(&format!(
                "backing = {}\n",
                toml_str(&backing.to_string_lossy())
            ));
            if self.external_meta {
                let meta = dir.join(format!("{name}.meta"));
                text.push_str(&format!("meta = {}\n", toml_str(&meta.to_string_lossy())));
            } else {
                text.push_str("meta = \"internal\"\n");
            }
            text.push_str(&format!(
                "replication = {}\n",
                toml_str(&replication.to_string())
            ));
            text.push_str(&format!("export = {}\n", toml_str(&export.config_value())));
            text.push_str(&format!(
                "control = {}\n",
                toml_str(&control.to_string_lossy())
            ));
            text.push_str(&format!(
                "log-file = {}\n",
                toml_str(&log.to_string_lossy())
            ));
            if let (Some(p), "beta") = (proxy_port, *name) {
                text.push_str(&format!("connect-address = \"127.0.0.1:{p}\"\n"));
            }
            if *name == "alpha" {
                if let Some(k) = &self.kernel_device {
                    text.push_str(&format!("kernel-device = {}\n", toml_str(k)));
                }
            }
            for (n, l) in &self.node_lines {
                if n == name {
                    text.push_str(l);
                    text.push('\n');
                }
            }
            nodes.push(Node {
                name: name.to_string(),
                config: config.clone(),
                resource: resource.clone(),
                export,
                control,
                backing,
                replication,
                log,
                bin: bin.clone(),
                pids: Mutex::new(Vec::new()),
                up_attempted: AtomicBool::new(false),
            });
        }
        std::fs::write(&config, &text)
            .unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
        let proxy = proxy_port.map(|p| {
            let beta = nodes.get(1).expect("beta_via_proxy needs 2 nodes");
            LinkProxy::start(p, beta.replication)
        });
        Cluster {
            proxy,
            nodes,
            resource,
            config,
            dir,
        }
    }
}

/// One resource: its config file, backing files and 1–2 nodes. Dropping it stops every
/// daemon (see [`Node`]) and then removes the test directory.
pub struct Cluster {
    // Field order matters: nodes (daemons) go before the directory is removed.
    proxy: Option<LinkProxy>,
    nodes: Vec<Node>,
    resource: String,
    config: PathBuf,
    dir: TestDir,
}

impl Cluster {
    /// A builder for test `test_name` (used for the directory and resource names).
    /// Defaults: 1 node, 256 MiB backing, TCP export, protocol C.
    pub fn builder(test_name: &str) -> ClusterBuilder {
        ClusterBuilder {
            test: test_name.to_string(),
            nodes: 1,
            backing_size: 256 << 20,
            export: ExportKind::Tcp,
            protocol: "C".into(),
            io_engine: "auto".into(),
            direct_io: false,
            journal_size: "64M".into(),
            bitmap_granularity: "4K".into(),
            external_meta: false,
            kernel_device: None,
            resource_lines: Vec::new(),
            node_lines: Vec::new(),
            create_backing: true,
            node_backing_sizes: Vec::new(),
            resource_name: None,
            secret: "e2e-shared-secret".into(),
            secret_file: None,
            beta_proxy: false,
        }
    }

    /// One node, `create-md`, `up`, `primary --force`: a ready NBD export.
    pub fn single_primary(test_name: &str) -> Cluster {
        let c = Self::builder(test_name).build();
        c.alpha().make_primary();
        c
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }
    pub fn alpha(&self) -> &Node {
        &self.nodes[0]
    }
    pub fn beta(&self) -> &Node {
        self.nodes.get(1).expect("cluster has no beta node")
    }
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }
    /// The proxy in front of beta (built with [`ClusterBuilder::beta_via_proxy`]).
    pub fn proxy(&self) -> &LinkProxy {
        self.proxy
            .as_ref()
            .expect("cluster was not built with beta_via_proxy()")
    }
    /// The resource (and NBD export) name.
    pub fn resource(&self) -> &str {
        &self.resource
    }
    pub fn config_path(&self) -> &Path {
        &self.config
    }
    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config).expect("read config")
    }
    /// Replaces the config file (for config-error tests).
    pub fn write_config(&self, text: &str) {
        std::fs::write(&self.config, text).expect("write config");
    }
    pub fn dir(&self) -> &TestDir {
        &self.dir
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Nodes first (each runs `down` and kills what it started), then any straggler that
        // was started with this test's config (e.g. a daemon whose pid we never learnt).
        for n in self.nodes.drain(..) {
            drop(n);
        }
        let cfg = self.config.to_string_lossy().into_owned();
        for pid in pids_with_arg(&cfg) {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.starts_with("blockrep") {
                eprintln!("cleanup: killing straggler {} (pid {pid})", comm.trim());
                kill9(pid);
                // Gone (threads and all) before the test's directory and the client stack
                // it may still hold files of are taken down.
                crate::proc::wait_pid_gone(pid, Duration::from_secs(5));
            }
        }
    }
}

/// One node of a [`Cluster`]: runs `blockrep-ctl -c CONFIG -n NAME ...`.
///
/// Every daemon pid seen in `status --json` is remembered. On drop (also on panic) the node
/// runs `blockrep-ctl down` (at most 10 s), then SIGKILLs any remembered pid still alive, and
/// if the test is failing, prints the tail of the daemon's log.
pub struct Node {
    name: String,
    config: PathBuf,
    resource: String,
    export: Export,
    control: PathBuf,
    backing: PathBuf,
    replication: SocketAddr,
    log: PathBuf,
    bin: PathBuf,
    pids: Mutex<Vec<u32>>,
    up_attempted: AtomicBool,
}

impl Node {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn resource(&self) -> &str {
        &self.resource
    }
    pub fn config_path(&self) -> &Path {
        &self.config
    }
    pub fn export(&self) -> &Export {
        &self.export
    }
    /// The NBD URI of this node's export.
    pub fn uri(&self) -> String {
        self.export.uri(&self.resource)
    }
    pub fn control_path(&self) -> &Path {
        &self.control
    }
    pub fn backing_path(&self) -> &Path {
        &self.backing
    }
    pub fn replication_addr(&self) -> SocketAddr {
        self.replication
    }
    pub fn log_path(&self) -> &Path {
        &self.log
    }
    /// How many times `needle` occurs in the daemon's log so far.
    pub fn log_count(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches(needle)
            .count()
    }
    /// Puts `path` (a device, or a file a test serves: nbdfuse over nbdkit's pause filter,
    /// say) where this node's backing file was, as a symlink. Before the daemon starts.
    pub fn back_with(&self, path: &Path) {
        std::fs::remove_file(&self.backing)
            .unwrap_or_else(|e| panic!("remove {}: {e}", self.backing.display()));
        std::os::unix::fs::symlink(path, &self.backing)
            .unwrap_or_else(|e| panic!("symlink {}: {e}", self.backing.display()));
    }
    pub fn ctl_path(&self) -> PathBuf {
        self.bin.join("blockrep-ctl")
    }
    pub fn daemon_path(&self) -> PathBuf {
        self.bin.join("blockrep")
    }

    fn ctl_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.ctl_path());
        c.arg("-c").arg(&self.config).arg("-n").arg(&self.name);
        c.args(args);
        // `up` starts the daemon: make sure it can find the matching binary.
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![self.bin.clone()];
        paths.extend(std::env::split_paths(&path));
        c.env("PATH", std::env::join_paths(paths).expect("PATH"));
        c
    }

    /// `blockrep-ctl -c CONFIG -n NAME ARGS...` (20 s bound); never panics on failure.
    pub fn ctl(&self, args: &[&str]) -> CmdOutput {
        self.ctl_timeout(args, CMD_TIMEOUT)
    }

    /// [`Self::ctl`] with an explicit time bound.
    pub fn ctl_timeout(&self, args: &[&str], timeout: Duration) -> CmdOutput {
        let is_up = args.first() == Some(&"up");
        if is_up {
            self.up_attempted.store(true, Ordering::SeqCst);
        }
        let out = run(&mut self.ctl_command(args), timeout);
        if is_up && out.success() {
            self.remember_pid_quiet();
        }
        out
    }

    /// A plain `primary` here, which must be refused with every one of `says` in its
    /// message (`what`: the situation, for the panic).
    pub fn assert_primary_refused(&self, says: &[&str], what: &str) {
        let out = self.ctl(&["primary"]);
        assert!(
            !out.success() && says.iter().all(|s| out.stderr.contains(s)),
            "{what}: a plain primary on {} was not refused saying {says:?}:\n{}",
            self.name(),
            out.describe()
        );
    }

    /// [`Self::ctl`], panicking (with output and the daemon log tail) unless it exits 0.
    pub fn ctl_ok(&self, args: &[&str]) -> CmdOutput {
        let out = self.ctl(args);
        assert!(
            out.success(),
            "blockrep-ctl failed:\n{}\n--- {} log tail ---\n{}",
            out.describe(),
            self.name,
            self.log_tail(40)
        );
        out
    }

    /// `status --json` parsed; panics if the command fails or prints invalid JSON. Exit 3
    /// (the resource is not up) is not a failure here: the report says so.
    pub fn status_json(&self) -> Value {
        let out = self.ctl(&["status", "--json"]);
        assert!(
            matches!(out.code, Some(0 | 3)),
            "blockrep-ctl status --json failed:\n{}\n--- {} log tail ---\n{}",
            out.describe(),
            self.name,
            self.log_tail(40)
        );
        let v: Value = serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "status --json printed invalid JSON ({e}):\n{}",
                out.describe()
            )
        });
        if v["up"] == true || v["running"] == true {
            if let Some(pid) = v["pid"].as_u64() {
                self.remember_pid(pid as u32);
            }
        }
        v
    }

    fn remember_pid(&self, pid: u32) {
        // A stopped node reports pid 0; never remember it (kill(0) means our process group).
        if pid == 0 || pid == std::process::id() {
            return;
        }
        let mut g = self.pids.lock().unwrap();
        if !g.contains(&pid) {
            g.push(pid);
        }
    }

    fn remember_pid_quiet(&self) {
        if let Some(out) = run_quiet(
            &mut self.ctl_command(&["status", "--json"]),
            Duration::from_secs(10),
        ) {
            if let Ok(v) = serde_json::from_str::<Value>(out.stdout.trim()) {
                if let Some(pid) = v["pid"].as_u64() {
                    self.remember_pid(pid as u32);
                }
            }
        }
    }

    /// The most recently seen daemon pid.
    pub fn pid(&self) -> Option<u32> {
        self.pids.lock().unwrap().last().copied()
    }

    /// Every daemon pid seen so far.
    pub fn pids(&self) -> Vec<u32> {
        self.pids.lock().unwrap().clone()
    }

    /// Panics (with the log tail) unless the current daemon pid is alive.
    pub fn assert_alive(&self) {
        let pid = self
            .pid()
            .expect("no daemon pid known: was the node brought up?");
        assert!(
            pid_alive(pid),
            "daemon of {} (pid {pid}) is not running\n--- log tail ---\n{}",
            self.name,
            self.log_tail(60)
        );
    }

    /// Whether `pid`, remembered as this node's daemon, still is: pids are reused (every
    /// `blockrep-ctl` run takes one, and `pid_max` may be 32768), so a remembered one may name
    /// another test's daemon by now, or anything else. A blockrep process with this node's
    /// config on its command line, or with none left (exiting: a zombie leader whose threads
    /// still run has an empty command line).
    fn is_own_daemon(&self, pid: u32) -> bool {
        let blockrep = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.starts_with("blockrep"));
        blockrep
            && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.is_empty()
                    || c.split(|b| *b == 0).any(|arg| {
                        String::from_utf8_lossy(arg).contains(&*self.config.to_string_lossy())
                    })
            })
    }

    /// Whether this node's daemon of pid `pid` is still running (not a reused pid).
    fn own_daemon_alive(&self, pid: u32) -> bool {
        pid_alive(pid) && self.is_own_daemon(pid)
    }

    /// SIGKILLs every daemon pid seen that is still this node's daemon (for fault tests).
    pub fn kill9(&self) {
        for pid in self.pids() {
            if self.own_daemon_alive(pid) {
                kill9(pid);
            }
        }
    }

    /// [`Self::kill9`], then waits until every pid it had is gone (a crash, fully over).
    pub fn kill9_and_wait(&self) {
        let pids = self.pids();
        assert!(!pids.is_empty(), "no daemon pid known for {}", self.name());
        self.kill9();
        for p in pids {
            assert!(
                crate::proc::wait_for(Duration::from_secs(10), || !self.own_daemon_alive(p)),
                "{}'s daemon {p} survived SIGKILL",
                self.name()
            );
        }
        // The daemon's threads may hold its control socket a moment after the process is
        // gone from `/proc`'s view, and a `status` then gets no answer (exit 4) instead of
        // "not up" (exit 3). Over once status says so; one `status` may itself take up to
        // its 15 s timeout.
        let mut last = None;
        let down = crate::proc::wait_for(Duration::from_secs(30), || {
            let o = self.ctl(&["status", "--json"]);
            let down = o.code == Some(3);
            last = Some(o);
            down
        });
        assert!(
            down,
            "{}'s status after SIGKILL never said it is down:\n{}\n--- log tail ---\n{}",
            self.name(),
            last.map(|o| o.describe()).unwrap_or_default(),
            self.log_tail(40)
        );
    }

    pub fn create_md(&self) {
        self.ctl_ok(&["create-md"]);
    }

    /// `up`, then checks that the daemon reports itself up and remembers its pid.
    pub fn up(&self) {
        self.ctl_ok(&["up"]);
        let st = self.status_json();
        assert_eq!(st["up"], Value::Bool(true), "status after up: {st}");
        assert!(
            st["pid"].as_u64().is_some(),
            "status --json has no pid: {st}"
        );
    }

    pub fn down(&self) {
        self.ctl_ok(&["down"]);
    }

    pub fn primary_force(&self) {
        self.ctl_ok(&["primary", "--force"]);
    }

    /// `create-md`, `up`, `primary --force`.
    pub fn make_primary(&self) {
        self.create_md();
        self.up();
        self.primary_force();
        let st = self.status_json();
        assert_eq!(st["role"], "primary", "status after primary --force: {st}");
    }

    /// `size` from `status --json`.
    pub fn size(&self) -> u64 {
        let st = self.status_json();
        st["size"]
            .as_u64()
            .unwrap_or_else(|| panic!("status --json has no numeric size: {st}"))
    }

    /// Copies `file` to the start of the export with `nbdcopy --flush` (a real client; the
    /// data is durable and, under protocol C, on the peer when it returns).
    pub fn nbdcopy_in(&self, file: &Path) {
        run_ok(
            Command::new("nbdcopy")
                .arg("--flush")
                .arg(file)
                .arg(self.uri()),
            crate::LONG_TIMEOUT,
        );
    }

    /// A raw NBD connection that completed NBD_OPT_GO.
    pub fn raw_open(&self) -> RawNbd {
        RawNbd::open(&self.export, &self.resource)
    }

    /// The daemon in the foreground (`blockrep -c CONFIG -n NAME [--up]`), its stdout and
    /// stderr appended to `DIR/NAME.fg.log`. Killed on drop of the guard.
    pub fn spawn_foreground(&self, up: bool) -> ChildGuard {
        let mut c = Command::new(self.daemon_path());
        c.arg("-c").arg(&self.config).arg("-n").arg(&self.name);
        if up {
            c.arg("--up");
            self.up_attempted.store(true, Ordering::SeqCst);
        }
        let g = ChildGuard::spawn(&mut c, Some(&self.log.with_extension("fg.log")));
        self.remember_pid(g.pid());
        g
    }

    /// The last `n` lines of the daemon log (and of a foreground run's output, if any).
    pub fn log_tail(&self, n: usize) -> String {
        let mut s = String::new();
        for p in [self.log.clone(), self.log.with_extension("fg.log")] {
            if let Ok(b) = std::fs::read(&p) {
                let text = String::from_utf8_lossy(&b);
                let lines: Vec<&str> = text.lines().collect();
                let from = lines.len().saturating_sub(n);
                s.push_str(&format!(
                    "[{}]\n{}\n",
                    p.display(),
                    lines[from..].join("\n")
                ));
            }
        }
        if s.is_empty() {
            s.push_str("(no log)");
        }
        s
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        let mut down_ok = true;
        if self.up_attempted.load(Ordering::SeqCst) || !self.pids().is_empty() {
            // --force: cleanup must not be refused by a client a failed test left attached.
            match run_quiet(
                &mut self.ctl_command(&["down", "--force"]),
                Duration::from_secs(10),
            ) {
                Some(o) if o.success() => {}
                Some(o) => {
                    down_ok = false;
                    if panicking {
                        eprintln!("cleanup: down of {} failed:\n{}", self.name, o.describe());
                    }
                }
                None => down_ok = false,
            }
        }
        for pid in self.pids() {
            let grace = if down_ok {
                Duration::from_secs(3)
            } else {
                Duration::ZERO
            };
            if self.own_daemon_alive(pid)
                && !crate::proc::wait_for(grace, || !self.own_daemon_alive(pid))
            {
                eprintln!(
                    "cleanup: daemon of {} (pid {pid}) still alive after down; SIGKILL",
                    self.name
                );
                kill9(pid);
                crate::proc::wait_for(Duration::from_secs(5), || !self.own_daemon_alive(pid));
            }
        }
        if panicking {
            eprintln!(
                "--- {} daemon log tail ---\n{}",
                self.name,
                self.log_tail(80)
            );
        }
    }
}

impl Cluster {
    /// Live `blockrep*` processes (daemons, or a ctl that forked itself into one) whose
    /// command line names this cluster's config file. Call it while no ctl command runs.
    pub fn daemon_processes(&self) -> Vec<u32> {
        pids_with_arg(&self.config.to_string_lossy())
            .into_iter()
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.starts_with("blockrep"))
            })
            .collect()
    }
}
