//! The resource configuration: one TOML file per resource, the same file on both nodes (DRBD's
//! convention). Parsing is strict: unknown keys are errors, and every error names the file, the
//! key and what is wrong, because a typo in a replication config is how data gets lost.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {error}")]
    Read {
        file: PathBuf,
        error: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{file}: key `{key}`: {message}")]
    Key {
        file: PathBuf,
        key: String,
        message: String,
    },
}

/// Replication protocol: when a write is acknowledged to the NBD client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Local write done and queued to the peer (journaled).
    A,
    /// Local write done and the peer has received it.
    B,
    /// Local write done and the peer has written it.
    C,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::A => "A",
            Protocol::B => "B",
            Protocol::C => "C",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEngineChoice {
    Auto,
    IoUring,
    Sync,
}

/// Where the NBD export listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ExportAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExportAddr::Tcp(a) => write!(f, "{a}"),
            ExportAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaLocation {
    Internal,
    External(PathBuf),
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    pub backing: PathBuf,
    pub meta: MetaLocation,
    pub replication: Option<SocketAddr>,
    /// Where the other node dials this one, when not `replication` (a proxy, NAT).
    pub connect_address: Option<SocketAddr>,
    pub export: ExportAddr,
    pub control: PathBuf,
    pub kernel_device: Option<PathBuf>,
    pub log_file: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub resource: String,
    pub protocol: Protocol,
    pub secret: Option<Vec<u8>>,
    /// Where the secret was read from (`secret-file`), if not inline.
    pub secret_file: Option<PathBuf>,
    pub io_engine: IoEngineChoice,
    pub direct_io: bool,
    pub journal_size: u64,
    pub bitmap_granularity: u64,
    /// Most resync bytes per second (0: unlimited).
    pub resync_rate: u64,
    /// Resync bytes per second the resync gets even while application writes fill the
    /// journal (DRBD's c-min-rate); 0: no floor.
    pub resync_rate_min: u64,
    /// Checksum-based bitmap resync (DRBD's csums-alg): the target hashes each dirty region,
    /// the source sends only the regions whose hash differs.
    pub csums: bool,
    /// DRBD's ko-count: a peer that applies nothing for this many 4 s link timeouts while
    /// records wait is dropped (its lack goes to the bitmap); 0: never.
    pub ko_count: u32,
    /// Seal everything after the handshake in AES-256-GCM records (keys derived from the
    /// secret and the connection's nonces).
    pub encryption: bool,
    /// Hot 4 MiB extents the activity log keeps.
    pub al_extents: usize,
    /// Split-brain resolution when neither node is primary.
    pub after_sb_0pri: crate::state::AfterSb0Pri,
    /// Resource-level fencing (DRBD's `fencing`).
    pub fencing: crate::state::Fencing,
    /// Event name → command run on that event.
    pub handlers: BTreeMap<String, PathBuf>,
    /// This node.
    pub me: NodeConfig,
    /// The other node, if the resource names one.
    pub peer: Option<NodeConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawFile {
    resource: RawResource,
    #[serde(default)]
    node: BTreeMap<String, RawNode>,
    #[serde(default)]
    handlers: BTreeMap<String, PathBuf>,
}

/// Events a handler can be configured for.
pub const HANDLER_EVENTS: [&str; 9] = [
    "split-brain",
    "fence-peer",
    "before-resync-target",
    "after-resync-target",
    "before-resync-source",
    "after-resync-source",
    "peer-lost",
    "became-primary",
    "local-io-error",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawResource {
    name: String,
    protocol: Option<String>,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
    io_engine: Option<String>,
    direct_io: Option<bool>,
    journal_size: Option<String>,
    bitmap_granularity: Option<String>,
    resync_rate: Option<String>,
    resync_rate_min: Option<String>,
    csums: Option<bool>,
    csums_alg: Option<String>,
    ko_count: Option<u32>,
    encryption: Option<String>,
    after_sb_0pri: Option<String>,
    fencing: Option<String>,
    al_extents: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawNode {
    backing: PathBuf,
    meta: Option<String>,
    replication: Option<String>,
    connect_address: Option<String>,
    export: String,
    control: PathBuf,
    kernel_device: Option<PathBuf>,
    log_file: Option<PathBuf>,
}

/// Parses sizes like `64M`, `4K`, `1G`, `4096`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        (i, 'T' | 't') => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

/// A TOML error in one line: where (line, column and the line's text, which names the key)
/// and what, instead of the parser's multi-line snippet.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            // On a character boundary whatever the parser reports: slicing inside a
            // multi-byte character would panic on a config file's text.
            let mut at = span.start.min(text.len());
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            let line_no = text[..at].matches('\n').count() + 1;
            let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
            let column = text[line_start..at].chars().count() + 1;
            let line = text[line_start..].lines().next().unwrap_or("").trim();
            // The secret is never printed, not even from a line the parser could not read:
            // no value is shown, only the key (a misspelt `Secret` or `secert` too), a
            // section header, or nothing (a line inside a multi-line string); and the
            // parser's message, which may quote the value, not for a key that may be the
            // secret's.
            let key = line.split('=').next().unwrap_or("").trim();
            // A line inside a multi-line string (an odd number of triple quotes before it)
            // is a value's, whatever it looks like: a base64 secret's line may hold `=`.
            let opened = |q: &str| text[..line_start].matches(q).count() % 2 == 1;
            let in_string = opened("\"\"\"") || opened("'''");
            let secretish = in_string || line.to_ascii_lowercase().contains("sec");
            let shown = if in_string {
                "(not shown)".to_string()
            } else if line.contains('=') {
                format!("{key} = …")
            } else if line.starts_with('[') && !secretish {
                line.to_string()
            } else {
                "(not shown)".to_string()
            };
            let message = if secretish {
                "the value could not be read (not shown: it may be the secret)"
            } else {
                e.message().trim_end()
            };
            format!("line {line_no}, column {column} (`{shown}`): {message}")
        }
        None => e.message().trim_end().to_string(),
    }
}

/// The largest config file read: a real one is a few KiB.
const MAX_CONFIG_FILE: u64 = 1 << 20;
/// The largest `secret-file` read.
const MAX_SECRET_FILE: u64 = 64 << 10;

/// Reads a regular file of at most `limit` bytes. Anything else is refused before it is
/// opened (a FIFO would block the open, `/dev/zero` would fill the memory), and a file that
/// grows past the bound while read is refused too.
fn read_small_file(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking, then looked at through the handle: a FIFO put in the file's place
    // between a look at the path and the open cannot block the open.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.len() > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} bytes, more than the {limit} read", meta.len()),
        ));
    }
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("more than the {limit} bytes read"),
        ));
    }
    Ok(bytes)
}

impl Config {
    /// Loads `file` and selects node `node` (default: the host name).
    pub fn load(file: &Path, node: Option<&str>) -> Result<Self, ConfigError> {
        let read = |error| ConfigError::Read {
            file: file.to_owned(),
            error,
        };
        let bytes = read_small_file(file, MAX_CONFIG_FILE).map_err(read)?;
        let text = String::from_utf8(bytes).map_err(|e| {
            read(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not UTF-8 text ({e})"),
            ))
        })?;
        Self::parse(file, &text, node)
    }

    pub fn parse(file: &Path, text: &str, node: Option<&str>) -> Result<Self, ConfigError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: toml_error(text, &e),
        })?;
        let key_err = |key: &str, message: String| ConfigError::Key {
            file: file.to_owned(),
            key: key.to_owned(),
            message,
        };
        let r = raw.resource;
        if r.name.is_empty()
            || r.name.len() > 64
            || !r
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(key_err(
                "resource.name",
                format!(
                    "{:?} is not a valid name (1-64 of letters, digits, '-', '_', '.')",
                    r.name
                ),
            ));
        }
        let protocol = match r.protocol.as_deref().unwrap_or("C") {
            "A" | "a" => Protocol::A,
            "B" | "b" => Protocol::B,
            "C" | "c" => Protocol::C,
            other => {
                return Err(key_err(
                    "resource.protocol",
                    format!("{other:?} is not a protocol (expected A, B or C)"),
                ))
            }
        };
        let secret_from_file = r.secret_file.is_some();
        let secret_file = r.secret_file.clone();
        let secret = match (r.secret, r.secret_file) {
            (Some(_), Some(_)) => {
                return Err(key_err(
                    "resource.secret-file",
                    "give either `secret` or `secret-file`, not both".into(),
                ))
            }
            (Some(s), None) => Some(s.into_bytes()),
            (None, Some(p)) => {
                let s = read_small_file(&p, MAX_SECRET_FILE).map_err(|e| {
                    key_err("resource.secret-file", format!("{}: {e}", p.display()))
                })?;
                let trimmed = s.trim_ascii().to_vec();
                Some(trimmed)
            }
            (None, None) => None,
        };
        if secret.as_ref().is_some_and(|s| s.is_empty()) {
            let key = if secret_from_file {
                "resource.secret-file"
            } else {
                "resource.secret"
            };
            return Err(key_err(key, "the secret is empty".into()));
        }
        let io_engine = match r.io_engine.as_deref().unwrap_or("auto") {
            "auto" => IoEngineChoice::Auto,
            "io-uring" | "io_uring" => IoEngineChoice::IoUring,
            "sync" => IoEngineChoice::Sync,
            other => {
                return Err(key_err(
                    "resource.io-engine",
                    format!("{other:?} is not an engine (expected auto, io-uring or sync)"),
                ))
            }
        };
        let journal_size = match r.journal_size.as_deref() {
            None => 64 << 20,
            Some(s) => parse_size(s)
                .filter(|&v| (1 << 20..=16 << 30).contains(&v))
                .ok_or_else(|| {
                    key_err(
                        "resource.journal-size",
                        format!("{s:?} is not a size between 1M and 16G"),
                    )
                })?,
        };
        let bitmap_granularity = match r.bitmap_granularity.as_deref() {
            None => 4096,
            Some(s) => parse_size(s)
                .filter(|&v| v.is_power_of_two() && (4096..=1 << 20).contains(&v))
                .ok_or_else(|| {
                    key_err(
                        "resource.bitmap-granularity",
                        format!("{s:?} is not a power of two between 4K and 1M"),
                    )
                })?,
        };
        // A resync chunk is at least one bitmap block and one journal record, which must fit
        // well inside the journal: with a larger block every resync chunk would be refused.
        if bitmap_granularity > journal_size / 8 {
            return Err(key_err(
                "resource.bitmap-granularity",
                format!(
                    "{bitmap_granularity} bytes per bit needs a journal of at least 8 times that ({} bytes; journal-size is {journal_size}): a resync moves whole bitmap blocks through the journal",
                    bitmap_granularity * 8
                ),
            ));
        }

        let resync_rate = match r.resync_rate.as_deref() {
            None => 100 << 20,
            Some(s) => parse_size(s).ok_or_else(|| {
                key_err(
                    "resource.resync-rate",
                    format!("{s:?} is not a rate in bytes per second (e.g. 100M; 0 for unlimited)"),
                )
            })?,
        };
        let resync_rate_min = match r.resync_rate_min.as_deref() {
            None => (4 << 20).min(if resync_rate == 0 {
                u64::MAX
            } else {
                resync_rate
            }),
            Some(s) => parse_size(s).ok_or_else(|| {
                key_err(
                    "resource.resync-rate-min",
                    format!("{s:?} is not a rate in bytes per second (e.g. 4M; 0 for no floor)"),
                )
            })?,
        };
        if resync_rate > 0 && resync_rate_min > resync_rate {
            return Err(key_err(
                "resource.resync-rate-min",
                format!(
                    "{} bytes/s is above resync-rate ({resync_rate} bytes/s)",
                    resync_rate_min
                ),
            ));
        }
        if let Some(a) = r.csums_alg.as_deref() {
            if !a.eq_ignore_ascii_case("sha256") {
                return Err(key_err(
                    "resource.csums-alg",
                    format!("{a:?} is not supported (only \"sha256\")"),
                ));
            }
        }
        let csums = r.csums.unwrap_or(false);
        let encryption = match r.encryption.as_deref() {
            None | Some("none") => false,
            Some(a) if a.eq_ignore_ascii_case("aes-256-gcm") => true,
            Some(a) => {
                return Err(key_err(
                    "resource.encryption",
                    format!("{a:?} is not supported (\"none\" or \"aes-256-gcm\")"),
                ))
            }
        };
        let al_extents = match r.al_extents {
            None => 1237,
            // A slot of the on-disk log (32 KiB) holds 8187 extents, and the log may run up
            // to 256 over its capacity while the peer catches up.
            Some(n) if (7..=7900).contains(&n) => n as usize,
            Some(n) => {
                return Err(key_err(
                    "resource.al-extents",
                    format!("{n} is not between 7 and 7900"),
                ))
            }
        };
        let after_sb_0pri = match r.after_sb_0pri.as_deref().unwrap_or("disconnect") {
            "disconnect" => crate::state::AfterSb0Pri::Disconnect,
            "discard-younger-primary" => crate::state::AfterSb0Pri::DiscardYoungerPrimary,
            "discard-least-changes" => crate::state::AfterSb0Pri::DiscardLeastChanges,
            "discard-zero-changes" => crate::state::AfterSb0Pri::DiscardZeroChanges,
            other => {
                return Err(key_err(
                    "resource.after-sb-0pri",
                    format!(
                        "{other:?} is not a policy (disconnect, discard-younger-primary, discard-least-changes, discard-zero-changes)"
                    ),
                ))
            }
        };
        let fencing = match r.fencing.as_deref().unwrap_or("dont-care") {
            "dont-care" => crate::state::Fencing::DontCare,
            "resource-only" => crate::state::Fencing::ResourceOnly,
            "resource-and-stonith" => crate::state::Fencing::ResourceAndStonith,
            other => {
                return Err(key_err(
                    "resource.fencing",
                    format!(
                        "{other:?} is not a fencing policy (dont-care, resource-only, resource-and-stonith)"
                    ),
                ))
            }
        };
        for (event, cmd) in &raw.handlers {
            if !HANDLER_EVENTS.contains(&event.as_str()) {
                return Err(key_err(
                    &format!("handlers.{event}"),
                    format!("unknown event (known: {})", HANDLER_EVENTS.join(", ")),
                ));
            }
            if cmd.as_os_str().is_empty() {
                return Err(key_err(
                    &format!("handlers.{event}"),
                    "empty command".into(),
                ));
            }
        }
        if raw.node.is_empty() {
            return Err(key_err("node", "no [node.NAME] table".into()));
        }
        if raw.node.len() > 2 {
            return Err(key_err(
                "node",
                format!(
                    "{} nodes configured; a resource has one or two",
                    raw.node.len()
                ),
            ));
        }
        let host;
        let me_name = match node {
            Some(n) => n,
            None => {
                host = nix::unistd::gethostname()
                    .ok()
                    .and_then(|h| h.into_string().ok())
                    .unwrap_or_default();
                host.as_str()
            }
        };
        if !raw.node.contains_key(me_name) {
            let known: Vec<&str> = raw.node.keys().map(String::as_str).collect();
            return Err(key_err(
                &format!("node.{me_name}"),
                format!(
                    "this node is not in the file (configured: {}); pick one with --node",
                    known.join(", ")
                ),
            ));
        }
        let mut nodes = Vec::new();
        // Node names travel in every hello and live in the superblock: the same bounds as the
        // resource's name.
        for name in raw.node.keys() {
            if name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            {
                return Err(key_err(
                    "node",
                    format!(
                        "{name:?} is not a valid node name (1-64 of letters, digits, '-', '_', '.')"
                    ),
                ));
            }
        }
        for (name, n) in raw.node {
            let k = |field: &str| format!("node.{name}.{field}");
            let meta = match n.meta.as_deref() {
                None | Some("internal") => MetaLocation::Internal,
                Some("") => return Err(key_err(&k("meta"), "empty path".into())),
                Some(p) => MetaLocation::External(PathBuf::from(p)),
            };
            let replication = match &n.replication {
                None => None,
                Some(a) => Some(a.parse::<SocketAddr>().map_err(|e| {
                    key_err(&k("replication"), format!("{a:?} is not host:port: {e}"))
                })?),
            };
            let connect_address = match &n.connect_address {
                None => None,
                Some(a) => Some(a.parse::<SocketAddr>().map_err(|e| {
                    key_err(
                        &k("connect-address"),
                        format!("{a:?} is not host:port: {e}"),
                    )
                })?),
            };
            let export = if let Some(p) = n.export.strip_prefix("unix:") {
                if p.is_empty() {
                    return Err(key_err(&k("export"), "empty unix socket path".into()));
                }
                ExportAddr::Unix(PathBuf::from(p))
            } else {
                ExportAddr::Tcp(n.export.parse::<SocketAddr>().map_err(|e| {
                    key_err(
                        &k("export"),
                        format!("{:?} is not host:port or unix:/path: {e}", n.export),
                    )
                })?)
            };
            if n.control.as_os_str().is_empty() {
                return Err(key_err(&k("control"), "empty path".into()));
            }
            let log_file = n.log_file.unwrap_or_else(|| {
                let mut p = n.control.clone().into_os_string();
                p.push(".log");
                PathBuf::from(p)
            });
            // Port 0 binds anywhere and dials nowhere.
            let tcp_export = match &export {
                ExportAddr::Tcp(a) => Some(*a),
                ExportAddr::Unix(_) => None,
            };
            for (key, addr) in [
                ("replication", replication),
                ("connect-address", connect_address),
                ("export", tcp_export),
            ] {
                if addr.is_some_and(|a| a.port() == 0) {
                    return Err(key_err(&k(key), "port 0: name the port".into()));
                }
            }
            // The peer dials `connect-address`, or else `replication`: a wildcard there
            // would reach the dialling node itself.
            if let (Some(a), None) = (replication, connect_address) {
                if a.ip().is_unspecified() {
                    return Err(key_err(
                        &k("replication"),
                        format!("{a} listens on every address, and the peer needs one to dial: set connect-address too"),
                    ));
                }
            }
            // One file, one role: a socket path that names the disk image would remove it as
            // a stale socket, and a log file over it would overwrite it.
            let mut paths: Vec<(&str, &Path)> = vec![
                ("backing", n.backing.as_path()),
                ("control", n.control.as_path()),
                ("log-file", log_file.as_path()),
            ];
            if let MetaLocation::External(p) = &meta {
                paths.push(("meta", p.as_path()));
            }
            if let ExportAddr::Unix(p) = &export {
                paths.push(("export", p.as_path()));
            }
            for (i, (key, path)) in paths.iter().enumerate() {
                if let Some((other, _)) = paths[..i].iter().find(|(_, p)| p == path) {
                    return Err(key_err(
                        &k(key),
                        format!("{} is this node's {other} too", path.display()),
                    ));
                }
            }
            nodes.push(NodeConfig {
                name,
                backing: n.backing,
                meta,
                replication,
                connect_address,
                export,
                control: n.control,
                kernel_device: n.kernel_device,
                log_file,
            });
        }
        let (mine, others): (Vec<_>, Vec<_>) = nodes.into_iter().partition(|n| n.name == me_name);
        let me = mine.into_iter().next().ok_or_else(|| {
            key_err(
                &format!("node.{me_name}"),
                "this node is not in the file".into(),
            )
        })?;
        let peer = others.into_iter().next();
        if let Some(p) = &peer {
            let k = |n: &NodeConfig, f: &str| format!("node.{}.{f}", n.name);
            if me.replication.is_none() {
                return Err(key_err(
                    &k(&me, "replication"),
                    "required when the resource has two nodes".into(),
                ));
            }
            if p.replication.is_none() {
                return Err(key_err(
                    &k(p, "replication"),
                    "required when the resource has two nodes".into(),
                ));
            }
            if secret.is_none() {
                return Err(key_err(
                    "resource.secret",
                    "required when the resource has two nodes (the peer link is authenticated)"
                        .into(),
                ));
            }
            if p.control == me.control {
                return Err(key_err(
                    &k(p, "control"),
                    "both nodes use the same control socket".into(),
                ));
            }
            // The node that dials would reach itself.
            if p.replication == me.replication {
                return Err(key_err(
                    &k(p, "replication"),
                    format!(
                        "both nodes use {}: each node needs its own replication address",
                        p.replication.map(|a| a.to_string()).unwrap_or_default()
                    ),
                ));
            }
        }
        Ok(Config {
            file: file.to_owned(),
            resource: r.name,
            protocol,
            secret,
            secret_file,
            io_engine,
            direct_io: r.direct_io.unwrap_or(false),
            journal_size,
            bitmap_granularity,
            resync_rate,
            resync_rate_min,
            csums,
            ko_count: r.ko_count.unwrap_or(15),
            encryption,
            al_extents,
            after_sb_0pri,
            fencing,
            handlers: raw.handlers,
            me,
            peer,
        })
    }
}

/// When a changed setting takes effect on a running node (`blockrep-ctl adjust`, DRBD's
/// `drbdadm adjust`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakesEffect {
    /// At once (the next write, resync step or event reads it).
    Now,
    /// At once, where this node is the resync (or verify) source: the source paces.
    NowAsSource,
    /// When the next resync starts.
    NextResync,
    /// At the next connection to the peer (`disconnect` then `connect` applies it now).
    NextConnection,
    /// Only when the resource comes up again (`down` then `up`): what the daemon opened or
    /// bound at start.
    NextUp,
    /// What the metadata was created with, or where it is: `down`, `create-md` (which
    /// forgets the bitmap, so a full sync follows) and `up`.
    NeedsCreateMd,
}

impl fmt::Display for TakesEffect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TakesEffect::Now => "now",
            TakesEffect::NowAsSource => {
                "now, for the resyncs and verifies this node runs as source: adjust the peer too"
            }
            TakesEffect::NextResync => "from the next resync",
            TakesEffect::NextConnection => "from the next connection to the peer",
            TakesEffect::NextUp => "not applied: needs `down` and `up`",
            TakesEffect::NeedsCreateMd => {
                "not applied: needs `down`, `create-md` (a full sync follows) and `up`"
            }
        })
    }
}

/// One setting that differs between the running configuration and the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingChange {
    /// The key as written in the file (`resource.protocol`, `node.alpha.export`).
    pub key: String,
    pub from: String,
    pub to: String,
    pub when: TakesEffect,
}

/// What `adjust` does: the changes, and the configuration to run from now on (the file's,
/// except for the settings that need a `down`/`up`, which keep their running values so that
/// `status` and the node's behaviour stay true to what is open).
#[derive(Debug, Clone)]
pub struct AdjustPlan {
    pub changes: Vec<SettingChange>,
    pub running: Config,
}

/// `ResourceOnly` -> `resource-only`, as the config file spells it.
fn kebab(debug: impl fmt::Debug) -> String {
    let mut out = String::new();
    for (i, c) in format!("{debug:?}").chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('-');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// A rate as the file writes it: `100M`, `512K`, or `0 (unlimited)`.
fn rate(r: u64) -> String {
    match r {
        0 => "0 (unlimited)".into(),
        r if r % (1 << 20) == 0 => format!("{}M", r >> 20),
        r if r % (1 << 10) == 0 => format!("{}K", r >> 10),
        r => r.to_string(),
    }
}

fn opt_path(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map_or_else(|| "(none)".into(), |p| p.display().to_string())
}

fn opt_addr(a: &Option<SocketAddr>) -> String {
    a.map_or_else(|| "(none)".into(), |a| a.to_string())
}

fn meta_loc(m: &MetaLocation) -> String {
    match m {
        MetaLocation::Internal => "internal".into(),
        MetaLocation::External(p) => p.display().to_string(),
    }
}

/// Compares the running configuration with a newly read one (the same resource and node, or
/// an error) and says what changes when. Plain logic: the daemon applies the plan.
pub fn plan_adjust(old: &Config, new: &Config) -> Result<AdjustPlan, String> {
    if new.resource != old.resource {
        return Err(format!(
            "{} is the config of resource {}, this daemon runs resource {}",
            new.file.display(),
            new.resource,
            old.resource
        ));
    }
    if new.me.name != old.me.name {
        return Err(format!(
            "{} was read for node {}, this daemon runs node {}",
            new.file.display(),
            new.me.name,
            old.me.name
        ));
    }
    let mut changes = Vec::new();
    let mut running = new.clone();
    let mut note = |key: String, from: String, to: String, when: TakesEffect| {
        if from != to {
            changes.push(SettingChange {
                key,
                from,
                to,
                when,
            });
        }
    };
    use TakesEffect::*;
    let r = |k: &str| format!("resource.{k}");
    note(
        r("protocol"),
        old.protocol.to_string(),
        new.protocol.to_string(),
        Now,
    );
    note(
        r("resync-rate"),
        rate(old.resync_rate),
        rate(new.resync_rate),
        NowAsSource,
    );
    note(
        r("resync-rate-min"),
        rate(old.resync_rate_min),
        rate(new.resync_rate_min),
        NowAsSource,
    );
    note(
        r("ko-count"),
        old.ko_count.to_string(),
        new.ko_count.to_string(),
        Now,
    );
    note(r("fencing"), kebab(old.fencing), kebab(new.fencing), Now);
    note(
        r("csums"),
        old.csums.to_string(),
        new.csums.to_string(),
        NextResync,
    );
    note(
        r("after-sb-0pri"),
        kebab(old.after_sb_0pri),
        kebab(new.after_sb_0pri),
        NextConnection,
    );
    let enc = |e: bool| if e { "aes-256-gcm" } else { "none" }.to_string();
    note(
        r("encryption"),
        enc(old.encryption),
        enc(new.encryption),
        NextConnection,
    );
    // Never the secret itself: only that it changed.
    if old.secret != new.secret {
        note(r("secret"), "(old)".into(), "(new)".into(), NextConnection);
    }
    let events: std::collections::BTreeSet<&String> =
        old.handlers.keys().chain(new.handlers.keys()).collect();
    for ev in events {
        note(
            format!("handlers.{ev}"),
            opt_path(&old.handlers.get(ev).cloned()),
            opt_path(&new.handlers.get(ev).cloned()),
            Now,
        );
    }
    // Fixed while up: the disk and its metadata, what the daemon bound, how it does I/O.
    note(
        r("io-engine"),
        kebab(old.io_engine),
        kebab(new.io_engine),
        NextUp,
    );
    note(
        r("direct-io"),
        old.direct_io.to_string(),
        new.direct_io.to_string(),
        NextUp,
    );
    note(
        r("journal-size"),
        old.journal_size.to_string(),
        new.journal_size.to_string(),
        NeedsCreateMd,
    );
    note(
        r("bitmap-granularity"),
        old.bitmap_granularity.to_string(),
        new.bitmap_granularity.to_string(),
        NeedsCreateMd,
    );
    note(
        r("al-extents"),
        old.al_extents.to_string(),
        new.al_extents.to_string(),
        NextUp,
    );
    running.io_engine = old.io_engine;
    running.direct_io = old.direct_io;
    running.journal_size = old.journal_size;
    running.bitmap_granularity = old.bitmap_granularity;
    running.al_extents = old.al_extents;
    let n = |k: &str| format!("node.{}.{k}", old.me.name);
    let (o, w) = (&old.me, &new.me);
    note(
        n("backing"),
        o.backing.display().to_string(),
        w.backing.display().to_string(),
        NeedsCreateMd,
    );
    note(
        n("meta"),
        meta_loc(&o.meta),
        meta_loc(&w.meta),
        NeedsCreateMd,
    );
    note(
        n("replication"),
        opt_addr(&o.replication),
        opt_addr(&w.replication),
        NextUp,
    );
    note(
        n("export"),
        o.export.to_string(),
        w.export.to_string(),
        NextUp,
    );
    note(
        n("control"),
        o.control.display().to_string(),
        w.control.display().to_string(),
        NextUp,
    );
    note(
        n("kernel-device"),
        opt_path(&o.kernel_device),
        opt_path(&w.kernel_device),
        NextUp,
    );
    note(
        n("log-file"),
        o.log_file.display().to_string(),
        w.log_file.display().to_string(),
        NextUp,
    );
    // The peer's connect-address in this node's own section is the peer's business.
    running.me = NodeConfig {
        connect_address: w.connect_address,
        ..o.clone()
    };
    match (&old.peer, &new.peer) {
        (Some(op), Some(np)) if op.name == np.name => {
            let p = |k: &str| format!("node.{}.{k}", op.name);
            // Where this node dials the peer: read at each try.
            note(
                p("replication"),
                opt_addr(&op.replication),
                opt_addr(&np.replication),
                NextConnection,
            );
            note(
                p("connect-address"),
                opt_addr(&op.connect_address),
                opt_addr(&np.connect_address),
                NextConnection,
            );
        }
        (op, np) => {
            let name = |p: &Option<NodeConfig>| {
                p.as_ref()
                    .map_or_else(|| "(none)".to_string(), |p| p.name.clone())
            };
            note("peer".into(), name(op), name(np), NextUp);
            running.peer = old.peer.clone();
        }
    }
    // The running address with the file's peer: the node would dial itself.
    if let Some(p) = &running.peer {
        if p.replication == running.me.replication {
            return Err(format!(
                "node.{}.replication would be {}, the address this node listens on until its `down`/`up`",
                p.name,
                opt_addr(&p.replication)
            ));
        }
    }
    Ok(AdjustPlan { changes, running })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[resource]
name = "r0"
protocol = "B"
secret = "x"
[node.alpha]
backing = "/tmp/a.img"
replication = "127.0.0.1:7000"
export = "127.0.0.1:10809"
control = "/tmp/a.sock"
[node.beta]
backing = "/tmp/b.img"
meta = "/tmp/b.meta"
replication = "127.0.0.1:7001"
export = "unix:/tmp/b.nbd"
control = "/tmp/b.sock"
"#;

    fn parse(text: &str, node: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/r0.toml"), text, Some(node))
    }

    fn plan(old: &str, new: &str) -> AdjustPlan {
        plan_adjust(&parse(old, "alpha").unwrap(), &parse(new, "alpha").unwrap()).unwrap()
    }

    fn when(p: &AdjustPlan, key: &str) -> Option<TakesEffect> {
        p.changes.iter().find(|c| c.key == key).map(|c| c.when)
    }

    #[test]
    fn a_toml_error_on_the_secret_line_does_not_print_the_secret() {
        for bad in [
            "secret = \"hunter2-hunter2",
            "secret = hunter2-hunter2",
            "secret = \"hunter2-hunter2\"\nsecret = \"hunter2-hunter2\"",
            "resource.secret = \"hunter2-hunter2",
        ] {
            let text = GOOD.replacen("[node.alpha]", &format!("{bad}\n[node.alpha]"), 1);
            let e = parse(&text, "alpha").unwrap_err().to_string();
            assert!(!e.contains("hunter2"), "{e}");
            assert!(e.contains("line "), "{e}");
        }
        // Review finding: a misspelt key, a value the parser quotes in its message, and a
        // bad line inside a multi-line string.
        for bad in [
            "Secret = \"hunter2-hunter2\"",
            "secert = \"hunter2-hunter2\"",
            "secret = 1234567890",
            "secret = \"\"\"hunter2\n\\q hunter2-hunter2\"\"\"",
            "secret = \"\"\"aHVudGVyMg\naHVudGVy=\\q\"\"\"",
        ] {
            let text = GOOD.replace("secret = \"x\"", bad);
            assert_ne!(text, GOOD);
            let e = parse(&text, "alpha").unwrap_err().to_string();
            assert!(
                !e.contains("hunter2") && !e.contains("1234567890") && !e.contains("aHVudGVy"),
                "{bad}: {e}"
            );
            assert!(e.contains("line "), "{e}");
        }
        // Other lines keep the parser's message and their key.
        let text = GOOD.replace("protocol = \"B\"", "protocol = \"B\"\nko-count = \"three\"");
        let e = parse(&text, "alpha").unwrap_err().to_string();
        assert!(e.contains("ko-count = …") && e.contains("three"), "{e}");
    }

    #[test]
    fn adjust_of_the_same_file_changes_nothing() {
        let p = plan(GOOD, GOOD);
        assert!(p.changes.is_empty(), "{:?}", p.changes);
    }

    #[test]
    fn adjust_applies_what_a_running_node_can_take() {
        let new = GOOD
            .replace("protocol = \"B\"", "protocol = \"C\"\nresync-rate = \"10M\"\nko-count = 3\ncsums = true\nfencing = \"resource-only\"\nafter-sb-0pri = \"discard-zero-changes\"")
            .replace("secret = \"x\"", "secret = \"y\"")
            .replace("127.0.0.1:7001", "127.0.0.2:7001")
            + "[handlers]\nfence-peer = \"/bin/true\"\n";
        let p = plan(GOOD, &new);
        assert_eq!(when(&p, "resource.protocol"), Some(TakesEffect::Now));
        assert_eq!(
            when(&p, "resource.resync-rate"),
            Some(TakesEffect::NowAsSource)
        );
        assert_eq!(when(&p, "resource.ko-count"), Some(TakesEffect::Now));
        assert_eq!(when(&p, "resource.fencing"), Some(TakesEffect::Now));
        assert_eq!(when(&p, "handlers.fence-peer"), Some(TakesEffect::Now));
        assert_eq!(when(&p, "resource.csums"), Some(TakesEffect::NextResync));
        assert_eq!(
            when(&p, "resource.after-sb-0pri"),
            Some(TakesEffect::NextConnection)
        );
        assert_eq!(
            when(&p, "resource.secret"),
            Some(TakesEffect::NextConnection)
        );
        assert_eq!(
            when(&p, "node.beta.replication"),
            Some(TakesEffect::NextConnection)
        );
        assert_eq!(p.changes.len(), 9, "{:?}", p.changes);
        // The secret is never shown.
        let secret = p
            .changes
            .iter()
            .find(|c| c.key == "resource.secret")
            .unwrap();
        assert_eq!(
            (secret.from.as_str(), secret.to.as_str()),
            ("(old)", "(new)")
        );
        assert_eq!(p.running.protocol, Protocol::C);
        assert_eq!(p.running.resync_rate, 10 << 20);
        assert_eq!(p.running.secret.as_deref(), Some(&b"y"[..]));
        assert_eq!(
            p.running.peer.as_ref().unwrap().replication,
            Some("127.0.0.2:7001".parse().unwrap())
        );
    }

    #[test]
    fn adjust_keeps_what_needs_down_and_up_and_says_so() {
        let new = GOOD
            .replace("/tmp/a.img", "/tmp/other.img")
            .replace("127.0.0.1:10809", "127.0.0.1:10900")
            .replace("127.0.0.1:7000", "127.0.0.1:7100")
            .replace(
                "protocol = \"B\"",
                "protocol = \"B\"\njournal-size = \"128M\"\nio-engine = \"sync\"",
            );
        let p = plan(GOOD, &new);
        for (key, want) in [
            ("node.alpha.backing", TakesEffect::NeedsCreateMd),
            ("node.alpha.export", TakesEffect::NextUp),
            ("node.alpha.replication", TakesEffect::NextUp),
            ("resource.journal-size", TakesEffect::NeedsCreateMd),
            ("resource.io-engine", TakesEffect::NextUp),
        ] {
            assert_eq!(when(&p, key), Some(want), "{key}: {:?}", p.changes);
        }
        let old = parse(GOOD, "alpha").unwrap();
        assert_eq!(p.running.me.backing, old.me.backing);
        assert_eq!(p.running.me.export, old.me.export);
        assert_eq!(p.running.me.replication, old.me.replication);
        assert_eq!(p.running.journal_size, old.journal_size);
        assert_eq!(p.running.io_engine, old.io_engine);
    }

    #[test]
    fn adjust_refuses_a_peer_address_this_node_still_listens_on() {
        // alpha keeps 7000 until down/up; beta moved there.
        let new = GOOD
            .replace("127.0.0.1:7000", "127.0.0.1:7100")
            .replace("127.0.0.1:7001", "127.0.0.1:7000");
        let e = plan_adjust(
            &parse(GOOD, "alpha").unwrap(),
            &parse(&new, "alpha").unwrap(),
        )
        .unwrap_err();
        assert!(
            e.contains("node.beta.replication") && e.contains("127.0.0.1:7000"),
            "{e}"
        );
    }

    #[test]
    fn adjust_shows_rates_as_the_file_writes_them() {
        let p = plan(
            GOOD,
            &GOOD.replace("protocol = \"B\"", "protocol = \"B\"\nresync-rate = \"0\""),
        );
        let c = &p.changes[0];
        assert_eq!((c.from.as_str(), c.to.as_str()), ("100M", "0 (unlimited)"));
    }

    #[test]
    fn adjust_refuses_another_resource_or_node() {
        let old = parse(GOOD, "alpha").unwrap();
        let other = parse(&GOOD.replace("\"r0\"", "\"r1\""), "alpha").unwrap();
        assert!(plan_adjust(&old, &other)
            .unwrap_err()
            .contains("resource r1"));
        let beta = parse(GOOD, "beta").unwrap();
        assert!(plan_adjust(&old, &beta).unwrap_err().contains("node beta"));
    }

    #[test]
    fn parses_both_nodes() {
        let c = parse(GOOD, "beta").unwrap();
        assert_eq!(c.protocol, Protocol::B);
        assert_eq!(c.me.name, "beta");
        assert_eq!(c.me.meta, MetaLocation::External("/tmp/b.meta".into()));
        assert_eq!(c.me.export, ExportAddr::Unix("/tmp/b.nbd".into()));
        assert_eq!(c.peer.as_ref().unwrap().name, "alpha");
        assert_eq!(c.me.log_file, PathBuf::from("/tmp/b.sock.log"));
        assert_eq!(c.journal_size, 64 << 20);
    }

    #[test]
    fn errors_name_file_and_key() {
        let e = parse(&GOOD.replace("\"B\"", "\"D\""), "alpha").unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("/etc/r0.toml") && s.contains("resource.protocol"),
            "{s}"
        );
        let e = parse(GOOD, "gamma").unwrap_err().to_string();
        assert!(e.contains("node.gamma") && e.contains("alpha, beta"), "{e}");
        let e = parse(&GOOD.replace("backing = \"/tmp/a.img\"", ""), "alpha")
            .unwrap_err()
            .to_string();
        assert!(e.contains("backing"), "{e}");
        let e = parse(
            &GOOD.replace("export = \"unix:", "export = \"bogus:"),
            "beta",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("node.beta.export"), "{e}");
        let e = parse("[resource\nname=", "alpha").unwrap_err().to_string();
        assert!(e.starts_with("/etc/r0.toml: "), "{e}");
        let e = parse(&GOOD.replace("secret = \"x\"", "colour = 1"), "alpha")
            .unwrap_err()
            .to_string();
        assert!(e.contains("colour"), "{e}");
    }

    /// Review finding: a socket path naming the disk image made `up` remove the image as a
    /// stale socket; port 0 and a wildcard the peer would dial were accepted.
    #[test]
    fn paths_ports_and_addresses_that_cannot_work_are_refused() {
        for (from, to, key, says) in [
            (
                "control = \"/tmp/a.sock\"",
                "control = \"/tmp/a.img\"",
                "node.alpha.control",
                "/tmp/a.img is this node's backing too",
            ),
            (
                "control = \"/tmp/b.sock\"",
                "control = \"/tmp/b.meta\"",
                "node.beta.meta",
                "/tmp/b.meta is this node's control too",
            ),
            (
                "export = \"unix:/tmp/b.nbd\"",
                "export = \"unix:/tmp/b.img\"",
                "node.beta.export",
                "/tmp/b.img is this node's backing too",
            ),
            (
                "control = \"/tmp/a.sock\"",
                "control = \"/tmp/a.sock\"\nlog-file = \"/tmp/a.img\"",
                "node.alpha.log-file",
                "this node's backing too",
            ),
            (
                "127.0.0.1:7000",
                "127.0.0.1:0",
                "node.alpha.replication",
                "port 0",
            ),
            (
                "export = \"127.0.0.1:10809\"",
                "export = \"127.0.0.1:0\"",
                "node.alpha.export",
                "port 0",
            ),
            (
                "127.0.0.1:7001",
                "0.0.0.0:7001",
                "node.beta.replication",
                "set connect-address too",
            ),
        ] {
            let text = GOOD.replacen(from, to, 1);
            assert_ne!(text, GOOD);
            let e = parse(&text, "alpha").unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(says), "{to}: {e}");
        }
        // A wildcard with a connect-address to dial is fine.
        let text = GOOD.replacen(
            "127.0.0.1:7001",
            "0.0.0.0:7001\"\nconnect-address = \"127.0.0.1:7001",
            1,
        );
        let c = parse(&text, "alpha").expect("a wildcard with connect-address");
        assert!(c.peer.is_some());
    }

    #[test]
    fn parse_errors_are_one_line_naming_the_line_and_its_key() {
        let e = parse(
            &GOOD.replace("protocol = \"B\"", "protocl = \"B\""),
            "alpha",
        )
        .unwrap_err()
        .to_string();
        assert!(
            !e.contains('\n') && e.contains("line 4, column 1 (`protocl = …`)"),
            "{e}"
        );
        assert!(e.contains("unknown field `protocl`"), "{e}");
        let e = parse(
            &GOOD.replace("[node.alpha]", "ko-count = \"15\"\n[node.alpha]"),
            "alpha",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("(`ko-count = …`)") && e.contains("string \"15\""),
            "{e}"
        );
    }

    #[test]
    fn fencing_is_dont_care_by_default_and_names_what_it_takes() {
        assert_eq!(
            parse(GOOD, "alpha").unwrap().fencing,
            crate::state::Fencing::DontCare
        );
        let text = GOOD.replace(
            "protocol = \"B\"",
            "protocol = \"B\"\nfencing = \"resource-only\"",
        );
        assert_eq!(
            parse(&text, "alpha").unwrap().fencing,
            crate::state::Fencing::ResourceOnly
        );
        let ras = parse(
            &text.replace("resource-only", "resource-and-stonith"),
            "alpha",
        )
        .unwrap()
        .fencing;
        assert_eq!(ras, crate::state::Fencing::ResourceAndStonith);
        assert!(ras.enabled() && ras.freezes_io());
        assert!(!crate::state::Fencing::ResourceOnly.freezes_io());
        let e = parse(&text.replace("resource-only", "stonith"), "alpha")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("resource.fencing")
                && e.contains("dont-care, resource-only, resource-and-stonith"),
            "{e}"
        );
    }

    #[test]
    fn both_nodes_on_one_replication_address_are_refused() {
        let e = parse(&GOOD.replace("127.0.0.1:7001", "127.0.0.1:7000"), "alpha")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("node.beta.replication") && e.contains("127.0.0.1:7000"),
            "{e}"
        );
    }

    #[test]
    fn an_empty_secret_file_is_named_as_such() {
        let dir = crate::test_dir::TestDir::new("blockrep-cfg");
        let f = dir.join("secret");
        std::fs::write(&f, "\n").unwrap();
        let text = GOOD.replace(
            "secret = \"x\"",
            &format!("secret-file = \"{}\"", f.display()),
        );
        let e = parse(&text, "alpha").unwrap_err().to_string();
        assert!(
            e.contains("resource.secret-file") && e.contains("empty"),
            "{e}"
        );
    }

    /// Only a regular file of a sane size is read: `/dev/zero` would fill the memory and a
    /// FIFO block the daemon's thread (an `adjust` naming the wrong path).
    #[test]
    fn a_config_that_is_no_regular_file_or_too_large_is_refused_clearly() {
        for (path, says) in [
            ("/dev/zero", "not a regular file"),
            ("/", "not a regular file"),
        ] {
            let e = Config::load(Path::new(path), Some("alpha"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(path) && e.contains(says), "{e}");
        }
        let dir = crate::test_dir::TestDir::new("blockrep-cfg-big");
        let f = dir.join("big.toml");
        std::fs::write(&f, vec![b'#'; (MAX_CONFIG_FILE + 1) as usize]).unwrap();
        let e = Config::load(&f, Some("alpha")).unwrap_err().to_string();
        assert!(e.contains("more than"), "{e}");
    }

    #[test]
    fn a_bitmap_block_too_large_for_the_journal_is_refused() {
        let text = GOOD.replace(
            "[resource]\n",
            "[resource]\njournal-size = \"2M\"\nbitmap-granularity = \"512K\"\n",
        );
        assert_ne!(text, GOOD);
        let e = parse(&text, "alpha").unwrap_err().to_string();
        assert!(
            e.contains("bitmap-granularity") && e.contains("4194304"),
            "{e}"
        );
        let ok = GOOD.replace(
            "[resource]\n",
            "[resource]\njournal-size = \"4M\"\nbitmap-granularity = \"512K\"\n",
        );
        parse(&ok, "alpha").expect("a journal of 8 blocks");
    }

    #[test]
    fn node_names_are_bounded() {
        let long = "b".repeat(65);
        let e = parse(
            &GOOD.replace("[node.beta]", &format!("[node.{long}]")),
            "alpha",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a valid node name"), "{e}");
        let e = parse(&GOOD.replace("[node.beta]", "[node.\"b c\"]"), "alpha")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a valid node name"), "{e}");
    }

    #[test]
    fn resync_keys() {
        let c = parse(GOOD, "alpha").unwrap();
        assert!(!c.csums);
        assert_eq!(c.resync_rate, 100 << 20);
        assert_eq!(c.resync_rate_min, 4 << 20);
        let with =
            |extra: &str| GOOD.replace("secret = \"x\"", &format!("secret = \"x\"\n{extra}"));
        let c = parse(&with("csums = true\ncsums-alg = \"sha256\""), "alpha").unwrap();
        assert!(c.csums);
        let c = parse(&with("resync-rate = \"1M\""), "alpha").unwrap();
        assert_eq!(
            c.resync_rate_min,
            1 << 20,
            "the floor defaults to at most the maximum"
        );
        let c = parse(
            &with("resync-rate = \"0\"\nresync-rate-min = \"8M\""),
            "alpha",
        )
        .unwrap();
        assert_eq!(c.resync_rate_min, 8 << 20);
        let e = parse(
            &with("resync-rate = \"2M\"\nresync-rate-min = \"3M\""),
            "alpha",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("resource.resync-rate-min") && e.contains("above"),
            "{e}"
        );
        let e = parse(&with("resync-rate-min = \"fast\""), "alpha")
            .unwrap_err()
            .to_string();
        assert!(e.contains("resource.resync-rate-min"), "{e}");
        let e = parse(&with("csums-alg = \"md5\""), "alpha")
            .unwrap_err()
            .to_string();
        assert!(e.contains("resource.csums-alg"), "{e}");
        let e = parse(&with("csums = \"yes\""), "alpha")
            .unwrap_err()
            .to_string();
        assert!(e.contains("csums"), "{e}");
        assert!(!parse(&with(""), "alpha").unwrap().encryption);
        assert!(
            parse(&with("encryption = \"aes-256-gcm\""), "alpha")
                .unwrap()
                .encryption
        );
        let e = parse(&with("encryption = \"rot13\""), "alpha")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("resource.encryption") && e.contains("rot13"),
            "{e}"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4K"), Some(4096));
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("12"), Some(12));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("99999999999999999999T"), None);
    }
}
