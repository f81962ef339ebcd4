//! Tagged 4 KiB blocks for end-to-end tests: a libnbd writer (many writes in flight) that
//! stamps each block with `(tag, block)` and a pattern, and checks that a device holds exactly
//! the expected tag in every block.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{python_with_nbd, run_ok, LONG_TIMEOUT};

const BLK: u64 = 4096;

/// A python3 that can `import nbd`, or `None` (the test is then skipped, like the harness's
/// stamped-writer tests).
pub fn python() -> Option<PathBuf> {
    let p = python_with_nbd();
    if p.is_none() {
        crate::skip_or_fail("no python3 with the libnbd bindings (python3-libnbd)");
    }
    p
}

/// Writes each listed 4 KiB block with `pattern(tag, block)`: libnbd, 32 writes in flight, then
/// a flush. Exits non-zero on any NBD error.
pub const BLOCK_WRITER: &str = r#"
import struct, sys
import nbd

uri, tag, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
blocks = [int(x) for x in open(path).read().split()]
base = bytes(range(251)) * 18
h = nbd.NBD()
h.connect_uri(uri)
pending = []

def reap():
    global pending
    # aio_command_completed raises nbd.Error when the write failed.
    pending = [(c, b) for (c, b) in pending if not h.aio_command_completed(c)]

for blk in blocks:
    o = (tag * 131 + blk * 7 + 16) % 251
    data = struct.pack("<QQ", tag, blk) + base[o:o + 4080]
    buf = nbd.Buffer.from_bytearray(bytearray(data))
    reap()
    while len(pending) >= 32:
        h.poll(-1)
        reap()
    pending.append((h.aio_pwrite(buf, blk * 4096), buf))
while pending:
    reap()
    if pending:
        h.poll(-1)
h.flush()
h.shutdown()
print("wrote %d blocks with tag %d" % (len(blocks), tag))
"#;

/// The content `write_blocks` gives `block` under `tag`: (tag, block) as two u64 LE, then
/// bytes `(tag*131 + block*7 + i) % 251`.
pub fn pattern(tag: u64, block: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BLK as usize);
    v.extend_from_slice(&tag.to_le_bytes());
    v.extend_from_slice(&block.to_le_bytes());
    for i in 16..BLK {
        v.push(((tag * 131 + block * 7 + i) % 251) as u8);
    }
    v
}

static WRITES: AtomicUsize = AtomicUsize::new(0);

/// Writes `pattern(tag, b)` to every block `b` of `blocks` (in the given order) through `uri`.
pub fn write_blocks(py: &Path, dir: &Path, uri: &str, tag: u64, blocks: &[u64]) {
    let n = WRITES.fetch_add(1, Ordering::SeqCst);
    let script = dir.join("block_writer.py");
    if !script.exists() {
        std::fs::write(&script, BLOCK_WRITER).expect("write block_writer.py");
    }
    let list = dir.join(format!("blocks-{n}-tag{tag}.txt"));
    let text: Vec<String> = blocks.iter().map(|b| b.to_string()).collect();
    std::fs::write(&list, text.join("\n")).expect("write block list");
    run_ok(
        Command::new(py)
            .arg(&script)
            .arg(uri)
            .arg(tag.to_string())
            .arg(&list),
        LONG_TIMEOUT,
    );
}

/// The tag whose pattern block `b` of `data` holds exactly (`Some(0)` for all zeroes), or
/// `None` for anything else.
pub fn tag_of(data: &[u8], b: u64) -> Option<u64> {
    let blk = &data[(b * BLK) as usize..((b + 1) * BLK) as usize];
    if blk.iter().all(|x| *x == 0) {
        return Some(0);
    }
    let tag = u64::from_le_bytes(blk[..8].try_into().expect("8"));
    (blk == pattern(tag, b).as_slice()).then_some(tag)
}

/// Panics unless every block in `want` holds the pattern of its tag (0: zeroes) in `data`.
pub fn check_tags(data: &[u8], want: &BTreeMap<u64, u64>, what: &str) {
    let mut bad = Vec::new();
    for (&b, &t) in want {
        let got = tag_of(data, b);
        if got != Some(t) {
            bad.push(format!("block {b}: want tag {t}, got {got:?}"));
        }
    }
    assert!(
        bad.is_empty(),
        "{what}: {} of {} blocks wrong, first: {:?}",
        bad.len(),
        want.len(),
        &bad[..bad.len().min(8)]
    );
}
