//! Two-node helpers: bring a pair up, wait for the link, compare the replicas.

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::{Cluster, Node};

/// How long a pair may take to connect (reconnect backoff is at most 2 s).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the link may take to drain what a test wrote.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

impl Node {
    /// The `replication` object of `status --json`; panics if it is missing.
    pub fn repl(&self) -> Value {
        let st = self.status_json();
        let r = st["replication"].clone();
        assert!(
            r.is_object(),
            "status --json of {} has no replication object: {st}",
            self.name()
        );
        r
    }

    /// A numeric field of the replication object (panics if absent).
    pub fn repl_u64(&self, key: &str) -> u64 {
        let r = self.repl();
        r[key]
            .as_u64()
            .unwrap_or_else(|| panic!("replication.{key} of {} is not a number: {r}", self.name()))
    }

    /// Polls the replication object until `pred` holds; panics after `timeout` with the last
    /// object and the log tail.
    pub fn wait_repl(&self, timeout: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.repl();
            if pred(&r) {
                return r;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{}: not {what} after {timeout:?}; replication status: {r}\n--- log tail ---\n{}",
                    self.name(),
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for `connection == "connected"`.
    pub fn wait_connected(&self, timeout: Duration) -> Value {
        self.wait_repl(timeout, "connected", |r| r["connection"] == "connected")
    }

    /// Waits for `connection != "connected"`.
    pub fn wait_not_connected(&self, timeout: Duration) -> Value {
        self.wait_repl(timeout, "disconnected", |r| r["connection"] != "connected")
    }

    /// The first `len` bytes of the backing file (the exported data; metadata follows).
    pub fn backing_data(&self, len: u64) -> Vec<u8> {
        let mut f = std::fs::File::open(self.backing_path())
            .unwrap_or_else(|e| panic!("open {}: {e}", self.backing_path().display()));
        let mut v = vec![0u8; len as usize];
        f.read_exact(&mut v)
            .unwrap_or_else(|e| panic!("read {}: {e}", self.backing_path().display()));
        v
    }
}

impl Cluster {
    /// Both nodes: `create-md`, `up`; alpha `primary --force`; waits until both report the
    /// link connected with alpha primary and beta secondary.
    pub fn start_pair(&self) {
        self.alpha().create_md();
        self.beta().create_md();
        self.up_pair();
    }

    /// A two-node pair with `bytes` of backing each and an 8 MiB journal, `f` adding to its
    /// builder: started (alpha primary) and in sync.
    pub fn synced_pair(
        test: &str,
        bytes: u64,
        f: impl FnOnce(crate::cluster::ClusterBuilder) -> crate::cluster::ClusterBuilder,
    ) -> Cluster {
        let c = f(Cluster::builder(test)
            .nodes(2)
            .backing_size(bytes)
            .journal_size("8M"))
        .build();
        c.start_pair();
        c.wait_in_sync(SYNC_TIMEOUT);
        c
    }

    /// [`Self::start_pair`] on nodes whose metadata exists already.
    pub fn up_pair(&self) {
        let (a, b) = (self.alpha(), self.beta());
        a.up();
        b.up();
        a.primary_force();
        a.wait_repl(CONNECT_TIMEOUT, "connected to a secondary peer", |r| {
            r["connection"] == "connected" && r["peer_role"] == "secondary"
        });
        b.wait_repl(CONNECT_TIMEOUT, "connected to a primary peer", |r| {
            r["connection"] == "connected" && r["peer_role"] == "primary"
        });
    }

    /// Waits until the primary alpha is connected with nothing outstanding (lag 0, nothing
    /// out of sync, every written sequence applied on beta, as both report it). Returns alpha's replication
    /// object.
    pub fn wait_in_sync(&self, timeout: Duration) -> Value {
        let (a, b) = (self.alpha(), self.beta());
        let deadline = Instant::now() + timeout;
        loop {
            let ra = a.repl();
            let rb = b.repl();
            let written = ra["seq_written"].as_u64();
            let ok = ra["connection"] == "connected"
                && rb["connection"] == "connected"
                && ra["lag_writes"] == 0
                && ra["lag_bytes"] == 0
                && ra["out_of_sync"] == 0
                && written.is_some()
                && ra["seq_applied"].as_u64() == written
                && rb["seq_applied"].as_u64() == written;
            if ok {
                return ra;
            }
            if Instant::now() >= deadline {
                panic!(
                    "replicas not in sync after {timeout:?}\nalpha: {ra}\nbeta: {rb}\n\
                     --- alpha log ---\n{}\n--- beta log ---\n{}",
                    a.log_tail(30),
                    b.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Panics unless the first `size` bytes (the exported data) of both backing files are
    /// identical, naming the first differing offset.
    pub fn assert_replicas_identical(&self, size: u64, what: &str) {
        let (a, b) = (self.alpha(), self.beta());
        if let Some(off) = first_difference(a.backing_path(), b.backing_path(), size) {
            let ra = a.status_json();
            let rb = b.status_json();
            panic!(
                "{what}: replicas differ: first difference at offset {off} (block {}) of \
                 {size}\nalpha: {ra}\nbeta: {rb}",
                off / 4096
            );
        }
    }
}

/// The first offset below `len` where files `a` and `b` differ (compared in 4 MiB chunks).
pub fn first_difference(a: &Path, b: &Path, len: u64) -> Option<u64> {
    let open =
        |p: &Path| std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a), open(b));
    let chunk = 4 << 20;
    let mut ba = vec![0u8; chunk];
    let mut bb = vec![0u8; chunk];
    let mut off = 0u64;
    while off < len {
        let n = chunk.min((len - off) as usize);
        fa.read_exact(&mut ba[..n])
            .unwrap_or_else(|e| panic!("read {} at {off}: {e}", a.display()));
        fb.read_exact(&mut bb[..n])
            .unwrap_or_else(|e| panic!("read {} at {off}: {e}", b.display()));
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .expect("chunks differ");
            return Some(off + i as u64);
        }
        off += n as u64;
    }
    None
}
