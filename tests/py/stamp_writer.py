#!/usr/bin/python3
"""Stamped 4 KiB writes over NBD with several requests in flight (libnbd async API).

Every write fills one 4 KiB block:
    [0:8)      block index, u64 little-endian
    [8:16)     sequence number (1, 2, ...; one per write, in issue order), u64 LE
    [16:4092)  random bytes
    [4092:4096) crc32 (zlib / IEEE) of bytes [0:4092), u32 LE

Log (line-buffered, one write(2) per line, so a line is on disk as soon as it is printed):
    "I SEQ BLOCK"  before the request is sent
    "A SEQ BLOCK"  after the server replied success (never for a failed write)
    "E SEQ BLOCK ERRNO" after the server replied an error
    "F SEQ 0"      after a flush the server acknowledged, sent once every write <= SEQ was
                   acknowledged and none was in flight: all of them are durable (with
                   --flush-every N, after every N writes; with --flush-until M, none
                   after write M, so a test can cut the power with unflushed writes)

Orders:
    random: block chosen at random among those with no write in flight (two writes in flight
            never overlap, so their order is never ambiguous); up to --inflight in flight.
    window: block = (seq - 1) % blocks; write SEQ is sent only once every write
            <= SEQ - inflight was acknowledged (so for j <= i - inflight the server saw j
            before i). Needs blocks >= inflight (writes in flight never overlap).

Stops after --count writes, after --seconds, or when --stop-file exists; then waits for the
writes in flight and exits 0. Exits 2 when the connection fails (a killed server).
"""
import argparse
import os
import random
import struct
import sys
import time
import zlib

import nbd

BS = 4096


def stamp(block, seq):
    body = struct.pack("<QQ", block, seq) + os.urandom(BS - 20)
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--uri", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--blocks", type=int, required=True)
    p.add_argument("--inflight", type=int, default=16)
    p.add_argument("--order", choices=["random", "window"], default="random")
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--seconds", type=float, default=0)
    p.add_argument("--stop-file", default="")
    p.add_argument("--flush-every", type=int, default=0)
    p.add_argument("--flush-until", type=int, default=0)
    a = p.parse_args()
    if a.order == "window" and a.blocks < a.inflight:
        sys.exit("window order needs blocks >= inflight")
    if a.order == "random" and a.blocks <= a.inflight:
        sys.exit("random order needs blocks > inflight")

    log = open(a.log, "w", buffering=1)
    h = nbd.NBD()
    h.connect_uri(a.uri)
    start = time.monotonic()

    inflight = {}  # seq -> (block, buffer)
    done = []  # (seq, errno)
    acked = set()
    acked_prefix = 0  # every write <= this one is acknowledged
    seq = 0
    flushed_at = 0
    failed = False

    def finish(s):
        def cb(err):
            done.append((s, err.value))
            return 1

        return cb

    def stopping():
        if a.count and seq >= a.count:
            return True
        if a.seconds and time.monotonic() - start >= a.seconds:
            return True
        if a.stop_file and os.path.exists(a.stop_file):
            return True
        return False

    try:
        while True:
            while done:
                s, e = done.pop()
                b, _ = inflight.pop(s)
                if e == 0:
                    log.write("A %d %d\n" % (s, b))
                    acked.add(s)
                    while acked_prefix + 1 in acked:
                        acked_prefix += 1
                        acked.discard(acked_prefix)
                else:
                    log.write("E %d %d %d\n" % (s, b, e))
                    failed = True
            if failed:
                break
            stop = stopping()
            if stop and not inflight:
                break
            flushing = a.flush_every and (not a.flush_until or seq <= a.flush_until)
            if not stop and flushing and seq - flushed_at >= a.flush_every:
                # Drain, then flush: the flush covers exactly the writes <= seq.
                if inflight:
                    h.poll(-1)
                    continue
                h.flush()
                log.write("F %d 0\n" % seq)
                flushed_at = seq
                continue
            can = False
            if not stop:
                if a.order == "window":
                    can = acked_prefix >= seq + 1 - a.inflight
                else:
                    can = len(inflight) < a.inflight
            if can:
                seq += 1
                if a.order == "window":
                    block = (seq - 1) % a.blocks
                else:
                    busy = {b for b, _ in inflight.values()}
                    while True:
                        block = random.randrange(a.blocks)
                        if block not in busy:
                            break
                buf = nbd.Buffer.from_bytearray(bytearray(stamp(block, seq)))
                log.write("I %d %d\n" % (seq, block))
                inflight[seq] = (block, buf)
                h.aio_pwrite(buf, block * BS, completion=finish(seq))
            else:
                h.poll(-1)
    except nbd.Error as e:
        print("nbd error after %d writes: %s" % (seq, e), file=sys.stderr)
        sys.exit(2)
    if failed:
        print("a write failed", file=sys.stderr)
        sys.exit(2)
    h.shutdown()
    print("issued %d" % seq)


main()
