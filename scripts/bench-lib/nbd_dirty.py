#!/usr/bin/env python3
"""Rewrites distinct random blocks of an NBD export (for scripts/bench-resync.sh).

Usage: nbd_dirty.py URI COUNT [--block-size N] [--seed S] [--list FILE] [--queue Q]

Picks COUNT distinct block indices uniformly at random over the export (block size N,
default 4096; the export size comes from the server), writes fresh random bytes
(os.urandom, so every block differs from what was there) to each with up to Q
(default 16) requests in flight, then sends one NBD flush. Prints one JSON object:
{"blocks": COUNT, "block_size": N, "bytes": COUNT*N, "runs": R, "seconds": S}
where R is the number of maximal runs of adjacent blocks (what a bitmap resync
can coalesce). --list writes the sorted block indices, one a line.

Needs the libnbd Python binding (Debian: python3-libnbd, in the system python).
"""

import argparse
import json
import os
import random
import sys
import time

sys.dont_write_bytecode = True

try:
    import nbd
except ImportError:
    sys.exit("nbd_dirty.py: the libnbd Python binding is missing (Debian: python3-libnbd)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("uri")
    ap.add_argument("count", type=int)
    ap.add_argument("--block-size", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--list", default=None)
    ap.add_argument("--queue", type=int, default=16)
    a = ap.parse_args()

    h = nbd.NBD()
    h.connect_uri(a.uri)
    size = h.get_size()
    nblocks = size // a.block_size
    if not 0 < a.count <= nblocks:
        sys.exit(f"nbd_dirty.py: count {a.count} not in 1..{nblocks} (export {size} bytes)")
    rng = random.Random(a.seed)
    blocks = sorted(rng.sample(range(nblocks), a.count))

    t0 = time.monotonic()
    pending = []
    for b in blocks:
        while len(pending) >= a.queue:
            h.poll(-1)
            pending = [c for c in pending if not h.aio_command_completed(c)]
        buf = nbd.Buffer.from_bytearray(bytearray(os.urandom(a.block_size)))
        pending.append(h.aio_pwrite(buf, b * a.block_size))
    while pending:
        h.poll(-1)
        pending = [c for c in pending if not h.aio_command_completed(c)]
    h.flush()
    secs = time.monotonic() - t0
    h.shutdown()

    runs = sum(1 for i, b in enumerate(blocks) if i == 0 or blocks[i - 1] != b - 1)
    if a.list:
        with open(a.list, "w", encoding="utf-8") as f:
            f.writelines(f"{b}\n" for b in blocks)
    print(json.dumps({
        "blocks": len(blocks),
        "block_size": a.block_size,
        "bytes": len(blocks) * a.block_size,
        "runs": runs,
        "export_size": size,
        "seconds": round(secs, 3),
    }))


if __name__ == "__main__":
    main()
