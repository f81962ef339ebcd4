#!/usr/bin/env python3
"""Helpers and report for scripts/bench-resync.sh.

Subcommands:
  rsync-stats FILE         parse `rsync --stats` output; prints
                           "SENT RECEIVED LITERAL MATCHED" (bytes, "-" when missing)
  ss-bytes PID PORT...     read `ss -tinpH state established` from stdin; for the TCP
                           sockets of process PID whose local or peer port is one of PORTs,
                           print "ACKED_OUT RECEIVED_IN SOCKETS" (payload bytes since each
                           connection was established: tcpi_bytes_acked, tcpi_bytes_received)
  elapsed T0 [T1]          T1 (default: now) - T0, seconds with 3 decimals (epoch floats)
  count COUNT_OR_PCT NBLOCKS
                           number of blocks: "1%" -> 1 % of NBLOCKS (at least 1), "2621" -> 2621
  report RESULTS [--json OUT] [--log NAME=PATH ...] [--samples NAME=PATH ...]
                           RESULTS has key=value lines written by bench-resync.sh; prints the
                           tables and the goals; writes JSON to OUT if given. Exit status 0,
                           or 3 when a replica or an rsync result was not identical or a sync
                           did not finish. --samples names a file of concatenated status
                           documents of the primary (taken while it synced) that goes into
                           the JSON, condensed.
"""

import json
import os
import re
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ inside the repository

# The issue's goals.
GOAL_RESYNC_SPEEDUP = 10.0   # blockrep bitmap resync at least 10x faster than rsync
GOAL_WIRE_RATIO = 1.1        # wire bytes at most 1.1x the dirty bytes
GOAL_FULL_SPEED = 0.8        # full sync at least 0.8x nbdcopy's speed

LOG_ISSUE = re.compile(r"\b(ERROR|WARN)\b|panicked")
TS_PREFIX = re.compile(r"^\S+Z\s+")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# log lines this benchmark provokes on purpose
BENIGN_LOG = [
    re.compile(r"forced promotion: this disk is \w+"),          # primary --force on a fresh pair
    re.compile(r"link closed: role change or admin command"),  # primary --force, disconnect
    re.compile(r"journal cannot take seq \d+ .*resync of the dirty bitmap"),  # the outage
]


def cmd_rsync_stats(args):
    text = open(args[0], "r", encoding="utf-8", errors="replace").read()

    def grab(label):
        m = re.search(r"^" + re.escape(label) + r":\s*([\d,.]+)", text, re.M)
        return m.group(1).replace(",", "").split(".")[0] if m else "-"

    print(grab("Total bytes sent"), grab("Total bytes received"),
          grab("Literal data"), grab("Matched data"))


def cmd_ss_bytes(args):
    pid = args[0]
    ports = {p for p in args[1:]}
    lines = sys.stdin.read().splitlines()
    out = inn = n = 0
    i = 0
    while i < len(lines):
        head = lines[i]
        info = ""
        if i + 1 < len(lines) and lines[i + 1][:1] in (" ", "\t"):
            info = lines[i + 1]
            i += 2
        else:
            i += 1
        f = head.split()
        if len(f) < 4 or f"pid={pid}," not in head:
            continue
        lport = f[2].rsplit(":", 1)[-1]
        pport = f[3].rsplit(":", 1)[-1]
        if lport not in ports and pport not in ports:
            continue
        a = re.search(r"\bbytes_acked:(\d+)", info)
        r = re.search(r"\bbytes_received:(\d+)", info)
        out += int(a.group(1)) if a else 0
        inn += int(r.group(1)) if r else 0
        n += 1
    print(out, inn, n)


def cmd_elapsed(args):
    t1 = float(args[1]) if len(args) > 1 else time.time()
    print(f"{t1 - float(args[0]):.3f}")


def cmd_count(args):
    spec, nblocks = args[0], int(args[1])
    if spec.endswith("%"):
        n = int(nblocks * float(spec[:-1]) / 100.0)
    else:
        n = int(spec)
    print(max(1, min(n, nblocks)))


def load_env(path):
    d = {}
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if "=" in line:
                k, v = line.split("=", 1)
                d[k] = v
    return d


def num(d, k):
    try:
        v = d.get(k, "")
        if v in ("", "-"):
            return None
        return float(v) if "." in v or "e" in v else int(v)
    except ValueError:
        return None


def fmt_bytes(v):
    if v is None:
        return "-"
    if v >= 1 << 20:
        return f"{v:,} ({v / (1 << 20):.1f} MiB)"
    return f"{v:,}"


def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def scan_log(path):
    """Distinct warning/error lines of a log (timestamps and colours stripped) with counts."""
    seen = {}
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            for line in f:
                line = ANSI.sub("", line.rstrip("\n"))
                if not LOG_ISSUE.search(line) or any(p.search(line) for p in BENIGN_LOG):
                    continue
                key = TS_PREFIX.sub("", line)
                key = re.sub(r"\d+(\.\d+)?", "N", key)[:220]
                if key not in seen:
                    seen[key] = [0, TS_PREFIX.sub("", line)[:300]]
                seen[key][0] += 1
    except OSError:
        return []
    return [(c, ex) for c, ex in seen.values()]


def log_time(line):
    """Epoch seconds of a log line's leading RFC 3339 UTC timestamp, or None."""
    m = re.match(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(\.\d+)?Z", line)
    if not m:
        return None
    import calendar
    t = calendar.timegm(tuple(int(m.group(i)) for i in range(1, 7)) + (0, 0, 0))
    return t + (float(m.group(7)) if m.group(7) else 0.0)


def resync_events(path):
    """The primary's resync log lines, in order: starts (reason, bytes, full), streams, ends,
    link errors; each with its log time (epoch seconds, "t")."""
    ev = []
    lost = re.compile(r"WARN .*peer link: (.*)|panicked at (.*)")
    start = re.compile(r"resync to the peer \((.*)\): (\d+) bytes(, full)?")
    done = re.compile(r"resync done: (\d+) bytes in ([\d.]+) s")
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            for line in f:
                line = ANSI.sub("", line)
                t = log_time(line)
                m = start.search(line)
                if m:
                    ev.append({"event": "start", "t": t, "reason": m.group(1),
                               "bytes": int(m.group(2)), "full": bool(m.group(3))})
                    continue
                m = done.search(line)
                if m:
                    ev.append({"event": "done", "t": t, "bytes": int(m.group(1)),
                               "seconds": float(m.group(2))})
                    continue
                if "streaming to the peer from sequence" in line:
                    ev.append({"event": "stream", "t": t,
                               "text": TS_PREFIX.sub("", line.strip())[:160]})
                    continue
                m = lost.search(line)
                if m:
                    ev.append({"event": "link", "t": t,
                               "text": (m.group(1) or "panicked at " + m.group(2))[:200]})
    except OSError:
        pass
    return ev


def load_samples(path):
    """Condensed replication fields of every status document in a file of concatenated ones."""
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return []
    docs, dec, i = [], json.JSONDecoder(), 0
    keep = ("connection", "bytes_sent", "out_of_sync", "resync_total", "resync_done",
            "resync_rate", "journal_used", "last_error")
    while True:
        i = text.find("{", i)
        if i < 0:
            return docs
        try:
            doc, end = dec.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        r = doc.get("replication") or {}
        docs.append({k: r.get(k) for k in keep})
        i = end


def table(header, rows):
    w = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            (str(c).ljust(w[i]) if i == 0 else str(c).rjust(w[i])) for i, c in enumerate(cells)
        )

    out = [line(header), "  ".join("-" * x for x in w)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def goal_line(name, value, goal, ok, value_fmt):
    if value is None:
        return f"  {name}: n/a (goal {goal}): FAIL (not measured)"
    return f"  {name}: {value_fmt(value)} (goal {goal}): {'PASS' if ok else 'FAIL'}"


def cmd_report(args):
    results = args[0]
    out_json = None
    logs = []
    samples = {}
    i = 1
    while i < len(args):
        if args[i] == "--json":
            out_json = args[i + 1]
            i += 2
        elif args[i] == "--log":
            name, _, path = args[i + 1].partition("=")
            logs.append((name, path))
            i += 2
        elif args[i] == "--samples":
            name, _, path = args[i + 1].partition("=")
            samples[name] = load_samples(path)
            i += 2
        else:
            sys.exit(f"resync_report.py: unknown argument {args[i]}")
    d = load_env(results)
    dev = num(d, "device_size")
    mib = (dev or 0) / (1 << 20)

    # ---- full initial sync
    full_s = num(d, "full_sync_s")
    full_daemon_s = num(d, "full_sync_daemon_s")
    full_wire = num(d, "full_sync_bytes_sent")
    nbdcopy_s = num(d, "nbdcopy_s")
    full_speed = (mib / full_s) if full_s and d.get("full_sync_ok") == "yes" else None
    nbdcopy_speed = (mib / nbdcopy_s) if nbdcopy_s else None
    full_ratio = ratio(full_speed, nbdcopy_speed)

    print()
    print(f"Full initial sync of {fmt_bytes(dev)} of random data "
          f"(load before: blockrep {d.get('full_sync_load', '?')}, nbdcopy {d.get('nbdcopy_load', '?')})")
    full_done = d.get("full_sync_ok") == "yes"
    rows = [
        ["blockrep  (primary --force -> wait-sync)",
         fmt(full_s) if full_done else f"DNF {fmt(full_s, '.1f')}", fmt(full_speed, ".0f"),
         fmt_bytes(full_wire), d.get("identical_full", "-")],
        ["  of which the daemon's resync (its log)", fmt(full_daemon_s, ".1f"),
         fmt(mib / full_daemon_s, ".0f") if full_daemon_s else "-", "", ""],
        ["nbdcopy --flush  (nbdkit file -> nbdkit file)", fmt(nbdcopy_s),
         fmt(nbdcopy_speed, ".0f"), "-", d.get("identical_nbdcopy", "-")],
    ]
    print(table(["method", "time s", "MiB/s", "bytes sent (app)", "identical"], rows))
    print(f"  blockrep speed / nbdcopy speed: {fmt(full_ratio)}; TCP payload of the full sync's"
          f" connection (ss): out {fmt_bytes(num(d, 'full_sync_tcp_out'))},"
          f" in {fmt_bytes(num(d, 'full_sync_tcp_in'))}")

    # ---- resync after the outage
    dirty = num(d, "dirty_bytes")
    blocks = num(d, "dirty_blocks")
    br_s = num(d, "resync_s")
    br_sent = num(d, "resync_bytes_sent")
    br_recv = num(d, "resync_bytes_received")
    tcp_out = num(d, "resync_tcp_out")
    tcp_in = num(d, "resync_tcp_in")
    tcp_total = None if tcp_out is None or tcp_in is None else tcp_out + tcp_in
    app_total = None if br_sent is None or br_recv is None else br_sent + br_recv

    def rs(prefix):
        s = num(d, prefix + "_s")
        sent = num(d, prefix + "_sent")
        recv = num(d, prefix + "_received")
        total = None if sent is None or recv is None else sent + recv
        return s, sent, recv, total

    rl = rs("rsync_local")
    rd = rs("rsync_daemon")
    print()
    pct = 100.0 * blocks * 4096 / dev if blocks and dev else None
    print(f"Resync after an outage: {int(blocks or 0)} distinct 4 KiB blocks rewritten on alpha "
          f"while disconnected ({fmt_bytes(dirty)}, {fmt(pct)} % of the device, "
          f"{d.get('dirty_runs', '?')} runs of adjacent blocks)")
    print(f"  before connect: alpha out_of_sync {fmt_bytes(num(d, 'oos_before'))}, journal "
          f"{d.get('journal_used_before', '?')}/{d.get('journal_size', '?')} bytes used; "
          f"resync kind: {d.get('resync_kind', '?')}")
    resync_done = d.get("resync_ok") == "yes"
    full_done = d.get("full_sync_ok") == "yes"
    br_time = fmt(br_s, ".3f") if resync_done else f"DNF {fmt(br_s, '.1f')}"
    rows = [
        ["blockrep  (connect -> wait-sync)", br_time, fmt_bytes(br_sent), fmt_bytes(br_recv),
         fmt(ratio(br_sent, dirty)), d.get("identical_resync", "-")],
        ["  same, TCP payload (ss)", "", fmt_bytes(tcp_out), fmt_bytes(tcp_in),
         fmt(ratio(tcp_total, dirty)), ""],
        ["rsync --inplace --no-whole-file, local dirs", fmt(rl[0], ".3f"), fmt_bytes(rl[1]),
         fmt_bytes(rl[2]), fmt(ratio(rl[3], dirty)), d.get("identical_rsync_local", "-")],
        ["rsync --inplace --no-whole-file, rsync://127.0.0.1", fmt(rd[0], ".3f"), fmt_bytes(rd[1]),
         fmt_bytes(rd[2]), fmt(ratio(rd[3], dirty)), d.get("identical_rsync_daemon", "-")],
    ]
    print(table(["method", "time s", "bytes sent", "bytes received", "wire/dirty", "identical"], rows))
    print("  (blockrep's wire/dirty uses bytes sent, the data direction; rsync's and the TCP row use"
          " both directions)")
    if not resync_done:
        print(f"  DNF: blockrep's resync did not finish (wait-sync given up after {fmt(br_s, '.1f')} s);"
              " its bytes are what it sent before that; no speedup is computed")
        br_s = None
    print(f"  blockrep daemon's own resync time (its log): {fmt(num(d, 'resync_daemon_s'), '.1f')} s; "
          f"rsync literal data: local {fmt_bytes(num(d, 'rsync_local_literal'))}, "
          f"daemon {fmt_bytes(num(d, 'rsync_daemon_literal'))}")
    speed_local = ratio(rl[0], br_s)
    speed_daemon = ratio(rd[0], br_s)
    print(f"  speedup (rsync time / blockrep time): local {fmt(speed_local, '.1f')}x, "
          f"daemon {fmt(speed_daemon, '.1f')}x")
    print(f"  wire bytes vs rsync (rsync total / blockrep total app bytes): local "
          f"{fmt(ratio(rl[3], app_total), '.1f')}x, daemon {fmt(ratio(rd[3], app_total), '.1f')}x")

    # ---- goals
    print()
    print("Goals (from the issue):")
    speedups = [s for s in (speed_local, speed_daemon) if s is not None]
    speed = min(speedups) if speedups else None
    wire = ratio(br_sent, dirty)
    # a goal counts only for a sync that finished with identical replicas
    resync_ok = resync_done and d.get("identical_resync") == "yes"
    full_ok = full_done and d.get("identical_full") == "yes"
    goals = {
        "resync_speedup_vs_rsync": (speed, speed is not None and speed >= GOAL_RESYNC_SPEEDUP
                                    and resync_ok),
        "resync_wire_over_dirty": (wire, wire is not None and wire <= GOAL_WIRE_RATIO and resync_ok),
        "full_sync_speed_vs_nbdcopy": (full_ratio, full_ratio is not None
                                       and full_ratio >= GOAL_FULL_SPEED and full_ok),
    }
    print(goal_line("blockrep resync speedup over rsync (the slower-for-blockrep of local/daemon)",
                    speed, f">= {GOAL_RESYNC_SPEEDUP:g}x", goals["resync_speedup_vs_rsync"][1],
                    lambda v: f"{v:.1f}x"))
    print(goal_line("resync bytes sent / dirty bytes", wire, f"<= {GOAL_WIRE_RATIO}",
                    goals["resync_wire_over_dirty"][1], lambda v: f"{v:.3f}"))
    print(goal_line("full sync speed / nbdcopy speed", full_ratio, f">= {GOAL_FULL_SPEED}",
                    goals["full_sync_speed_vs_nbdcopy"][1], lambda v: f"{v:.2f}"))
    if not (resync_ok and full_ok):
        print("  (PASS also needs the sync to finish with identical replicas)")
    for k in ("full_trouble", "resync_trouble"):
        if d.get(k):
            print(f"  {k.replace('_', ' ')}: {d[k]}")

    # ---- logs
    log_issues = {}
    events = resync_events(d.get("alpha_log", ""))
    for name, path in logs:
        issues = scan_log(path)
        log_issues[name] = [{"count": c, "line": ex} for c, ex in issues]
    print()
    if events:
        # times relative to the start of the timed section they fall in
        marks = [(num(d, "resync_t0"), "resync"), (num(d, "full_sync_t0"), "full")]
        print("alpha's resync log lines (+s from the start of the timed section):")
        for e in events:
            rel = ""
            for t0, name in marks:
                if t0 is not None and e.get("t") is not None and e["t"] >= t0 - 0.5:
                    rel = f"{name} +{e['t'] - t0:.3f}s"
                    break
            if e["event"] == "start":
                what = f"resync start: {e['bytes']:,} bytes{' (full)' if e['full'] else ''}: {e['reason']}"
            elif e["event"] == "done":
                what = f"resync done: {e['bytes']:,} bytes in {e['seconds']} s"
            else:
                what = e["text"]
            print(f"  {rel:>16}  {what}")
    any_issue = False
    for name, issues in log_issues.items():
        if not issues:
            continue
        any_issue = True
        print(f"warnings/errors in {name}'s log ({sum(x['count'] for x in issues)} lines):")
        for x in issues[:12]:
            print(f"  {x['count']:>4}x {x['line']}")
        if len(issues) > 12:
            print(f"  ... {len(issues) - 12} more distinct lines")
    if not any_issue:
        print("no warnings or errors in the logs")

    bad = any(d.get(k, "yes") != "yes" for k in (
        "identical_full", "identical_resync", "identical_nbdcopy",
        "identical_rsync_local", "identical_rsync_daemon", "full_sync_ok", "resync_ok"))
    if out_json:
        doc = {
            "benchmark": "bench-resync",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "results": {k: (num(d, k) if num(d, k) is not None else v) for k, v in d.items()},
            "derived": {
                "full_sync_mib_s": full_speed,
                "nbdcopy_mib_s": nbdcopy_speed,
                "full_sync_speed_ratio": full_ratio,
                "resync_speedup_rsync_local": speed_local,
                "resync_speedup_rsync_daemon": speed_daemon,
                "resync_wire_over_dirty": wire,
                "resync_tcp_over_dirty": ratio(tcp_total, dirty),
            },
            "goals": {k: {"value": v, "pass": ok} for k, (v, ok) in goals.items()},
            "resync_events": events,
            "status_samples": samples,
            "log_issues": log_issues,
        }
        tmp = out_json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, out_json)
    return 3 if bad else 0


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "rsync-stats":
        cmd_rsync_stats(args)
    elif cmd == "ss-bytes":
        cmd_ss_bytes(args)
    elif cmd == "elapsed":
        cmd_elapsed(args)
    elif cmd == "count":
        cmd_count(args)
    elif cmd == "report":
        sys.exit(cmd_report(args))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
