//! Stamped 4 KiB writes: `py/stamp_writer.py` (python3 + libnbd, many writes in flight)
//! writes them and logs what it sent and what the server acknowledged; the helpers here
//! parse its log and the stamps found on a replica.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::guards::ChildGuard;

/// Block size of a stamped write.
pub const STAMP_BLOCK: usize = 4096;

const WRITER: &str = include_str!("../py/stamp_writer.py");

/// CRC-32 (IEEE 802.3, zlib's `crc32`), bitwise: the writer's checksum.
pub fn crc32_ieee(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// What one 4 KiB block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stamp {
    /// All zero: never written.
    Zero,
    /// A well-formed stamp (crc ok).
    Valid { block: u64, seq: u64 },
    /// Neither: torn, corrupt or foreign data.
    Invalid,
}

impl Stamp {
    pub fn parse(b: &[u8]) -> Stamp {
        assert_eq!(b.len(), STAMP_BLOCK);
        if b.iter().all(|x| *x == 0) {
            return Stamp::Zero;
        }
        let want = u32::from_le_bytes(b[4092..].try_into().expect("4"));
        if crc32_ieee(&b[..4092]) != want {
            return Stamp::Invalid;
        }
        Stamp::Valid {
            block: u64::from_le_bytes(b[..8].try_into().expect("8")),
            seq: u64::from_le_bytes(b[8..16].try_into().expect("8")),
        }
    }

    /// The stamps of the first `blocks` blocks of `data`.
    pub fn parse_all(data: &[u8], blocks: usize) -> Vec<Stamp> {
        assert!(data.len() >= blocks * STAMP_BLOCK, "data too short");
        data.chunks(STAMP_BLOCK)
            .take(blocks)
            .map(Stamp::parse)
            .collect()
    }
}

/// An interpreter that can `import nbd` (Debian's python3-libnbd lives in /usr/bin/python3's
/// dist-packages, which a pyenv python3 first on PATH does not see).
pub fn python_with_nbd() -> Option<PathBuf> {
    for p in ["/usr/bin/python3", "python3"] {
        let ok = crate::cmd::run_quiet(
            Command::new(p).args(["-c", "import nbd"]),
            std::time::Duration::from_secs(20),
        )
        .is_some_and(|o| o.success());
        if ok {
            return Some(PathBuf::from(p));
        }
    }
    None
}

/// Write order of [`StampWriter`]; see `py/stamp_writer.py`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StampOrder {
    /// Random blocks, never two writes in flight to one block.
    Random,
    /// Round robin over the blocks; write `i` is sent only after every write `<= i - inflight`
    /// was acknowledged.
    Window,
}

/// Options of one writer run.
#[derive(Debug, Clone)]
pub struct StampOpts {
    pub blocks: u64,
    pub inflight: u64,
    pub order: StampOrder,
    /// Stop after this many writes (0: no limit).
    pub count: u64,
    /// Stop after this long (0: no limit).
    pub seconds: f64,
    /// Flush after every this many writes, once none is in flight (0: never).
    pub flush_every: u64,
    /// No flush after this write (0: no limit).
    pub flush_until: u64,
}

/// A running `stamp_writer.py`. Killed on drop.
pub struct StampWriter {
    proc: ChildGuard,
    log: PathBuf,
    stop_file: PathBuf,
    opts: StampOpts,
}

impl StampWriter {
    /// Starts the writer against `uri`; its files (script, log, output) go into `dir` with
    /// the prefix `tag`.
    pub fn spawn(python: &Path, dir: &Path, tag: &str, uri: &str, opts: StampOpts) -> Self {
        let script = dir.join("stamp_writer.py");
        std::fs::write(&script, WRITER).expect("write stamp_writer.py");
        let log = dir.join(format!("{tag}.writes"));
        let stop_file = dir.join(format!("{tag}.stop"));
        let _ = std::fs::remove_file(&stop_file);
        let mut c = Command::new(python);
        c.arg(&script)
            .arg("--uri")
            .arg(uri)
            .arg("--log")
            .arg(&log)
            .arg("--blocks")
            .arg(opts.blocks.to_string())
            .arg("--inflight")
            .arg(opts.inflight.to_string())
            .arg("--order")
            .arg(match opts.order {
                StampOrder::Random => "random",
                StampOrder::Window => "window",
            })
            .arg("--count")
            .arg(opts.count.to_string())
            .arg("--seconds")
            .arg(opts.seconds.to_string())
            .arg("--stop-file")
            .arg(&stop_file)
            .arg("--flush-every")
            .arg(opts.flush_every.to_string())
            .arg("--flush-until")
            .arg(opts.flush_until.to_string());
        let proc = ChildGuard::spawn(&mut c, Some(&dir.join(format!("{tag}.out"))));
        Self {
            proc,
            log,
            stop_file,
            opts,
        }
    }

    pub fn opts(&self) -> &StampOpts {
        &self.opts
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn running(&mut self) -> bool {
        self.proc.running()
    }

    /// Asks the writer to stop (it finishes the writes in flight).
    pub fn request_stop(&self) {
        std::fs::write(&self.stop_file, b"stop").expect("write stop file");
    }

    /// Waits for the writer to exit; returns whether it did within `timeout`.
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> bool {
        self.proc.wait_exit(timeout)
    }

    /// stdout and stderr of the writer.
    pub fn output(&self) -> String {
        self.proc.log()
    }

    /// The log so far.
    pub fn log(&self) -> WriterLog {
        WriterLog::read(&self.log)
    }

    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

/// The writer's log: `issued` in send order (seq, block); `acked` in reply order.
#[derive(Debug, Default, Clone)]
pub struct WriterLog {
    pub issued: Vec<(u64, u64)>,
    pub acked: Vec<(u64, u64)>,
    pub errors: Vec<(u64, u64)>,
    /// The highest SEQ an acknowledged flush covered: every write <= it is durable.
    pub flushed: u64,
}

impl WriterLog {
    /// Parses a log; a last line cut short (the writer was killed mid-line) is ignored.
    pub fn read(path: &Path) -> WriterLog {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut l = WriterLog::default();
        for line in text.split_inclusive('\n') {
            if !line.ends_with('\n') {
                break;
            }
            let mut it = line.split_whitespace();
            let kind = it.next();
            let seq = it.next().and_then(|s| s.parse::<u64>().ok());
            let block = it.next().and_then(|s| s.parse::<u64>().ok());
            let (Some(kind), Some(seq), Some(block)) = (kind, seq, block) else {
                panic!("{}: bad line {line:?}", path.display());
            };
            match kind {
                "I" => l.issued.push((seq, block)),
                "A" => l.acked.push((seq, block)),
                "E" => l.errors.push((seq, block)),
                "F" => l.flushed = l.flushed.max(seq),
                _ => panic!("{}: bad line {line:?}", path.display()),
            }
        }
        l
    }

    /// Block of each issued seq.
    pub fn block_of(&self) -> HashMap<u64, u64> {
        self.issued.iter().copied().collect()
    }
}
