#!/usr/bin/env python3
"""Helpers and report for scripts/bench-replication.sh.

Subcommands:
  get FILE KEY...          print the values of dotted KEYs (e.g. replication.lag_writes) of the
                           JSON document in FILE, space separated ("-" when missing or null)
  drained FILE             exit 0 when the status in FILE shows the link drained:
                           replication.lag_writes == 0 and seq_applied == seq_written
  report MANIFEST [--json OUT] [--meta KEY=VALUE ...] [--log CONFIG=PATH ...]
                           MANIFEST has one tab-separated line per run:
                             workload config dir bs iodepth rawfile rc loadavg rundir round
                           With several rounds, each (workload, config) is shown by its
                           round with the median IOPS, plus the lowest and highest IOPS.
                           rundir holds the run's status snapshots of the primary
                           (before.json, end.json, drained.json), the secondary's status
                           after the drain (beta.json), status samples taken during the run
                           (samples.json, concatenated documents) and check.env (key=value:
                           drained, drain_s, identical, cmp, nonzero, alive).
                           --log names a daemon log to scan for warnings and errors.
                           Prints the tables; writes JSON to OUT if given.
                           Exit status: 0 all good, 2 some fio run failed, 3 some replica
                           was not identical or did not drain (3 wins over 2).

fio output is parsed with fio_report.py (same directory), which skips the
"fio: connected to NBD server" line fio's nbd engine prints before the JSON.
"""

import json
import os
import re
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ inside the repository
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fio_report import fmt_num, load_fio, summarize  # noqa: E402

BASELINE = "lone"
CONFIG_ORDER = ["lone", "A", "B", "C", "qemu", "qemu-mirror"]
# Configurations without a peer (no replication facts), and what each ratio is taken to:
# QEMU's mirror is compared with QEMU alone, everything else with blockrep's lone node.
SINGLE = ("lone", "qemu")
RATIO_TO = {"qemu-mirror": "qemu"}
# (config, workload, minimum IOPS ratio to lone): the targets of the replication issue
GOALS = [
    ("C", "4k-randwrite-qd32", 0.6),
    ("C", "1m-seqwrite-qd8", 0.8),
    ("A", "4k-randwrite-qd32", 0.8),
    ("A", "1m-seqwrite-qd8", 0.9),
]
# log lines that are expected in every run of this benchmark
BENIGN_LOG = [
    re.compile(r"forced promotion: this disk is \w+"),
]
# A run in which the hypervisor took this share of the CPUs or more was disturbed by the
# host: the median is taken over the undisturbed rounds when there are any.
STEAL_LIMIT = 0.05
LOG_ISSUE = re.compile(r"\b(ERROR|WARN)\b|panicked")
TS_PREFIX = re.compile(r"^\S+Z\s+")


def load_json(path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_all(path):
    """Every JSON document of a file of concatenated documents."""
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return []
    docs, dec, i = [], json.JSONDecoder(), 0
    while True:
        i = text.find("{", i)
        if i < 0:
            return docs
        try:
            doc, end = dec.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        docs.append(doc)
        i = end


def dig(doc, key):
    for part in key.split("."):
        if not isinstance(doc, dict):
            return None
        doc = doc.get(part)
    return doc


def load_env(path):
    env = {}
    try:
        with open(path, "r", encoding="utf-8") as f:
            for line in f:
                k, sep, v = line.rstrip("\n").partition("=")
                if sep:
                    env[k] = v
    except OSError:
        pass
    return env


def cmd_get(args):
    doc = load_json(args[0])
    if doc is None:
        return 1
    vals = []
    for k in args[1:]:
        v = dig(doc, k)
        vals.append("-" if v is None else (json.dumps(v) if isinstance(v, (dict, list)) else str(v)))
    print(" ".join(vals))
    return 0


def is_drained(doc):
    r = (doc or {}).get("replication") or {}
    try:
        return r["lag_writes"] == 0 and r["seq_applied"] == r["seq_written"]
    except KeyError:
        return False


def delta(a, b, key):
    va, vb = dig(a, key), dig(b, key)
    if isinstance(va, int) and isinstance(vb, int):
        return vb - va
    return None


def max_latency_ms(raw, direction):
    try:
        d = load_fio(raw)["jobs"][0][direction]
        return float((d.get("lat_ns") or {}).get("max", 0.0)) / 1e6
    except (OSError, ValueError, KeyError, IndexError):
        return None


def replication_facts(rundir, direction, raw):
    before = load_json(os.path.join(rundir, "before.json"))
    end = load_json(os.path.join(rundir, "end.json"))
    drained = load_json(os.path.join(rundir, "drained.json"))
    beta = load_json(os.path.join(rundir, "beta.json"))
    samples = load_all(os.path.join(rundir, "samples.json"))
    env = load_env(os.path.join(rundir, "check.env"))
    after = drained or end
    rep_end = dig(end, "replication") or {}
    lags = [dig(s, "replication.lag_writes") for s in samples] + [rep_end.get("lag_writes")]
    lags = [x for x in lags if isinstance(x, int)]
    journal = [dig(s, "replication.journal_used") for s in samples] + [rep_end.get("journal_used")]
    journal = [x for x in journal if isinstance(x, int)]
    conns = {dig(s, "replication.connection") for s in samples} | {rep_end.get("connection")}
    conns.discard(None)
    sent = delta(before, after, "replication.bytes_sent")
    written = delta(before, after, "io.bytes_written")
    return {
        "lag_writes_end": rep_end.get("lag_writes"),
        "lag_bytes_end": rep_end.get("lag_bytes"),
        "journal_used_end": rep_end.get("journal_used"),
        "journal_size": rep_end.get("journal_size"),
        "out_of_sync_end": rep_end.get("out_of_sync"),
        "connection_end": rep_end.get("connection"),
        "connections_seen": sorted(conns),
        "max_lag_writes": max(lags) if lags else None,
        "max_journal_used": max(journal) if journal else None,
        "samples": len(samples),
        "bytes_sent_total": dig(after, "replication.bytes_sent"),
        "bytes_sent_run": sent,
        "bytes_written_run": written,
        "sent_per_written": (sent / written) if sent is not None and written else None,
        "crc_errors": dig(after, "replication.crc_errors"),
        "auth_failures": dig(after, "replication.auth_failures"),
        "last_error": dig(after, "replication.last_error"),
        "out_of_sync_after": dig(after, "replication.out_of_sync"),
        "seq_written": dig(after, "replication.seq_written"),
        "seq_applied": dig(after, "replication.seq_applied"),
        "secondary_seq_applied": dig(beta, "replication.seq_applied"),
        "secondary_role": dig(beta, "role"),
        "drained": env.get("drained"),
        "drain_s": float(env["drain_s"]) if env.get("drain_s", "") not in ("", "-") else None,
        "identical": env.get("identical"),
        "cmp": env.get("cmp") or None,
        "nonzero": env.get("nonzero"),
        "daemons_alive": env.get("alive"),
        "max_lat_ms": max_latency_ms(raw, direction),
    }


def read_cpu(path):
    """cpu_snapshot's file: {"now": seconds, "machine": (idle, total), "fio" and each daemon
    name: ticks}."""
    snap = {}
    try:
        with open(path, "r", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] == "machine" and len(parts) in (3, 4):
                    snap["machine"] = (int(parts[1]), int(parts[2]))
                    if len(parts) == 4:
                        snap["steal"] = int(parts[3])
                elif len(parts) == 2 and parts[0] == "now":
                    snap["now"] = float(parts[1])
                elif len(parts) == 2:
                    snap[parts[0]] = int(parts[1])
    except (OSError, ValueError):
        return None
    return snap if "machine" in snap else None


def cpu_facts(rundir, raw, direction, clk_tck, ncpu):
    """CPU µs per I/O of fio, each daemon and the rest, idle share, over the measured run."""
    a = read_cpu(os.path.join(rundir, "cpu0"))
    b = read_cpu(os.path.join(rundir, "cpu1"))
    if not a or not b or not clk_tck:
        return None
    try:
        job = load_fio(raw)["jobs"][0]
        d = job[direction]
        ios = int(d["total_ios"])
        runtime_s = float(d["runtime"]) / 1000.0
        iops = float(d["iops"])
        fio_busy = (float(job["usr_cpu"]) + float(job["sys_cpu"])) / 100.0 * runtime_s
    except (KeyError, IndexError, TypeError, ValueError, OSError):
        return None
    idle0, total0 = a["machine"]
    idle1, total1 = b["machine"]
    if "now" in a and "now" in b and "fio" in a and "fio" in b and b["now"] > a["now"]:
        # Both snapshots inside fio's run: the I/Os of that window at fio's mean rate, and
        # fio's own ticks over the same window.
        ios = iops * (b["now"] - a["now"])
        fio_busy = (b["fio"] - a["fio"]) / clk_tck
    if ios <= 0 or total1 <= total0:
        return None
    us = 1e6 / clk_tck / ios
    daemons = {k: (b[k] - a[k]) * us for k in b
               if k not in ("machine", "now", "fio", "steal") and k in a}
    busy = (total1 - total0 - (idle1 - idle0)) * us
    fio_us = fio_busy * 1e6 / ios
    other = busy - fio_us - sum(daemons.values())
    per_io = busy
    return {
        "fio_us": fio_us,
        "daemons_us": daemons,
        "other_us": other,
        "idle_share": (idle1 - idle0) / (total1 - total0),
        # The hypervisor's: counted as busy above (no process here ran in it), shown so
        # that a run the host disturbed can be told apart.
        "steal_share": ((b["steal"] - a["steal"]) / (total1 - total0)
                        if "steal" in a and "steal" in b else None),
        "busy_us_per_io": per_io,
        "cpu_bound_iops": (ncpu * 1e6 / per_io) if per_io > 0 and ncpu else None,
    }


def steal_of(r):
    cpu = r.get("cpu") or {}
    return cpu.get("steal_share")


def scan_log(path):
    issues, counts = [], {}
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.rstrip("\n")
                if not LOG_ISSUE.search(line) or any(p.search(line) for p in BENIGN_LOG):
                    continue
                msg = TS_PREFIX.sub("", line)
                # collapse numbers so repeats of one message count as one
                key = re.sub(r"\d+", "N", msg)
                if key not in counts:
                    issues.append(msg)
                counts[key] = counts.get(key, 0) + 1
    except OSError as e:
        return {"path": path, "error": str(e), "lines": 0, "messages": []}
    return {"path": path, "lines": sum(counts.values()), "messages": issues[:8]}


def table(header, rows, right):
    widths = [max(len(str(x[i])) for x in rows + [header]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(
            (str(c).rjust(widths[i]) if i in right else str(c).ljust(widths[i]))
            for i, c in enumerate(cells)) + " |"

    out = [line(header),
           "|" + "|".join(("-" * (w + 1) + ":") if i in right else "-" * (w + 2)
                          for i, w in enumerate(widths)) + "|"]
    out += [line(r) for r in rows]
    print("\n".join(out))


def mib(v):
    return None if v is None else v / (1 << 20)


def cmd_report(args):
    manifest = args[0]
    out, meta, logs = None, {}, []
    i = 1
    while i < len(args):
        if args[i] == "--json":
            out = args[i + 1]
        elif args[i] == "--meta":
            k, _, v = args[i + 1].partition("=")
            meta[k] = int(v) if v.isdigit() else v
        elif args[i] == "--log":
            c, _, p = args[i + 1].partition("=")
            logs.append((c, p))
        else:
            raise SystemExit(f"replication_report.py: unknown argument {args[i]}")
        i += 2

    results = []
    with open(manifest, "r", encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            fields = line.split("\t") + [""] * 10
            workload, config, direction, bs, iodepth, raw, rc, load, rundir, rnd = fields[:10]
            r = {
                "workload": workload, "config": config, "rw": direction, "bs": bs,
                "round": int(rnd) if rnd.isdigit() else 1,
                "iodepth": int(iodepth), "ok": False, "error": None,
                "iops": None, "mib_s": None, "p99_us": None, "p50_us": None,
                "mean_lat_us": None,
                "loadavg_1m_before": float(load) if load else None,
            }
            try:
                if rc == "98":
                    raise ValueError("not run: the configuration could not be set up")
                if rc == "99":
                    raise ValueError("not run: a daemon was gone")
                if rc != "0":
                    raise ValueError(f"fio exited with status {rc}")
                s = summarize(raw, direction)
                meta.setdefault("fio_version", s.pop("fio_version"))
                s.pop("fio_version", None)
                r.update(s)
                r["ok"] = True
            except Exception as e:  # report the failure in the table, keep going
                r["error"] = str(e)
            if rundir and r["ok"]:
                r["cpu"] = cpu_facts(rundir, raw, direction, meta.get("clk_tck"),
                                     meta.get("nproc"))
            if rundir and config not in SINGLE:
                r["replication"] = replication_facts(rundir, direction, raw)
            elif rundir:
                env = load_env(os.path.join(rundir, "check.env"))
                r["nonzero"] = env.get("nonzero")
                r["max_lat_ms"] = max_latency_ms(raw, direction)
            results.append(r)

    workloads, configs = [], []
    for r in results:
        if r["workload"] not in workloads:
            workloads.append(r["workload"])
        if r["config"] not in configs:
            configs.append(r["config"])
    configs.sort(key=lambda c: CONFIG_ORDER.index(c) if c in CONFIG_ORDER else 99)
    # Several rounds: each (workload, config) is represented by its round with the median
    # IOPS (all its facts stay those of one run); the spread is kept beside it.
    groups = {}
    for r in results:
        groups.setdefault((r["workload"], r["config"]), []).append(r)
    by = {}
    left_out = 0
    for key, runs in groups.items():
        ok = sorted((r for r in runs if r["ok"]), key=lambda r: r["iops"])
        clean = [r for r in ok if (steal_of(r) or 0.0) < STEAL_LIMIT]
        left_out += len(ok) - len(clean) if clean else 0
        pool = clean or ok
        pick = pool[(len(pool) - 1) // 2] if pool else runs[-1]
        pick["rounds_iops"] = [r["iops"] for r in ok]
        pick["rounds_failed"] = len(runs) - len(ok)
        pick["disturbed"] = bool(ok) and not clean
        by[key] = pick
    rounds = max((r["round"] for r in results), default=1)
    for r in results:
        r["ratio_to"] = RATIO_TO.get(r["config"], BASELINE)
        base = by.get((r["workload"], r["ratio_to"]))
        r["ratio_iops"] = (r["iops"] / base["iops"]) if (
            r["ok"] and base and base["ok"] and base["iops"]) else None

    loads = [r["loadavg_1m_before"] for r in results if r["loadavg_1m_before"] is not None]
    if loads:
        ncpu = meta.get("nproc")
        print(f"load average (1 min) before the runs: {min(loads):.2f} .. {max(loads):.2f}"
              + (f" on {ncpu} CPUs" if ncpu else "")
              + " (includes this benchmark's own previous runs)")
    # ---- main table
    rows = []
    for w in workloads:
        for c in configs:
            r = by.get((w, c))
            if not r:
                continue
            spread = []
            if rounds > 1:
                ri = r.get("rounds_iops") or []
                spread = [(f"{fmt_num(min(ri))} .. {fmt_num(max(ri))}" if ri else "-")
                          + (f" ({r['rounds_failed']} failed)" if r.get("rounds_failed") else "")]
            if r["ok"]:
                ratio = r["ratio_iops"]
                rows.append([w, c + (" (steal)" if r.get("disturbed") else ""),
                             fmt_num(r["iops"]), fmt_num(r["mib_s"], 1),
                             fmt_num(r["p99_us"]), "-" if ratio is None else f"{ratio:.2f}"]
                            + spread)
            else:
                rows.append([w, c, "FAILED", "-", "-", r["error"] or ""] + spread)
    if rounds > 1:
        print(f"{rounds} rounds: each line is the round with the median IOPS; the last column"
              " is the lowest and highest IOPS over the rounds")
        print(f"rounds the host disturbed (steal >= {100 * STEAL_LIMIT:.0f} % of the CPUs) are"
              f" left out of the median where another round was not: {left_out} left out")
    if any(r.get("disturbed") for r in by.values()):
        print(f"(steal): every round of that line had >= {100 * STEAL_LIMIT:.0f} % steal;"
              " its figures are the host's as much as this machine's")
    if any(c in RATIO_TO for c in configs):
        print("ratio: to blockrep's lone node; qemu-mirror's to qemu (QEMU alone)")
    table(["workload", "config", "IOPS", "MiB/s", "p99 µs", "ratio (IOPS)"]
          + (["IOPS over rounds"] if rounds > 1 else []), rows, {2, 3, 4, 5, 6})

    # ---- replication details
    per_config = {}
    rep_rows = []
    for c in configs:
        if c in SINGLE:
            continue
        verdicts = []
        for w in workloads:
            for x in (r["replication"] for r in groups.get((w, c), []) if "replication" in r):
                verdicts.append(x["identical"] if x["drained"] == "yes" else
                                ("no" if x["identical"] == "no" else "not-drained"))
            r = by.get((w, c))
            if not r or "replication" not in r:
                continue
            x = r["replication"]
            rep_rows.append([
                w, c, fmt_num(x["lag_writes_end"]), fmt_num(x["max_lag_writes"]),
                fmt_num(mib(x["max_journal_used"]), 1),
                fmt_num(mib(x["bytes_sent_run"]), 1),
                "-" if x["sent_per_written"] is None else f"{x['sent_per_written']:.3f}",
                fmt_num(x["drain_s"], 1), fmt_num(mib(x["out_of_sync_after"]), 1),
                fmt_num(x["max_lat_ms"], 1), x["identical"] or "-",
            ])
        if not verdicts:
            per_config[c] = "unknown"
        elif all(v == "yes" for v in verdicts):
            per_config[c] = "yes"
        elif any(v == "no" for v in verdicts):
            per_config[c] = "no"
        else:
            per_config[c] = "unknown"
    if rep_rows:
        print()
        print("Replication (alpha's status: lag at fio's end, max over 1 s samples, bytes"
              " sent/written over ramp+run+drain, out_of_sync once drained):")
        table(["workload", "config", "lag_writes at end", "max lag", "max journal MiB",
               "bytes_sent MiB", "sent/written", "drain s", "out_of_sync MiB", "max lat ms",
               "identical"],
              rep_rows, {2, 3, 4, 5, 6, 7, 8, 9})
        print()
        for c in configs:
            if c in per_config:
                print(f"replicas identical ({c}): {per_config[c]}")

    # ---- CPU per I/O
    cpu_rows = []
    for w in workloads:
        for c in configs:
            r = by.get((w, c))
            x = r.get("cpu") if r else None
            if not x:
                continue
            base = by.get((w, RATIO_TO.get(c, BASELINE)))
            base_ok = bool(base and base["ok"] and base["iops"])
            dm = x["daemons_us"]
            steal = x.get("steal_share")
            bound = x["cpu_bound_iops"]
            cpu_rows.append([
                w, c, fmt_num(x["fio_us"], 1), fmt_num(dm.get("alpha"), 1),
                fmt_num(dm.get("beta"), 1) if "beta" in dm else "-",
                fmt_num(x["other_us"], 1), fmt_num(x["busy_us_per_io"], 1),
                f"{100 * x['idle_share']:.0f} %",
                "-" if steal is None else f"{100 * steal:.0f} %", fmt_num(bound),
                "-" if not bound or not base_ok else f"{bound / base['iops']:.2f}",
            ])
            x["cpu_bound_ratio_to_lone"] = (bound / base["iops"]) if bound and base_ok else None
    if cpu_rows:
        print()
        print("CPU per I/O over the measured run (µs of CPU time; idle: share of all CPUs;"
              " steal: share the hypervisor gave to other guests, inside busy and other;"
              " CPU bound: the IOPS if the busy µs per I/O filled every CPU, and that bound"
              " as a ratio to the measured IOPS its ratio is taken to):")
        table(["workload", "config", "fio", "alpha", "beta", "other", "busy", "idle", "steal",
               "CPU bound IOPS", "bound / base"], cpu_rows, {2, 3, 4, 5, 6, 7, 8, 9, 10})

    # ---- the reference: what mirroring costs a mature implementation on this machine
    ref_rows, reference = [], []
    for w in workloads:
        qm, c = by.get((w, "qemu-mirror")), by.get((w, "C"))
        if not qm or not qm["ok"] or qm.get("ratio_iops") is None:
            continue
        ours = {p: by.get((w, p)) for p in ("A", "B", "C")}
        ratios = {p: (r["ratio_iops"] if r and r["ok"] else None) for p, r in ours.items()}
        vs = (c["iops"] / qm["iops"]) if c and c["ok"] and qm["iops"] else None
        reference.append({"workload": w, "qemu_mirror_ratio": qm["ratio_iops"],
                          "blockrep_ratios": ratios, "c_iops_over_qemu_mirror": vs})
        ref_rows.append([w] + ["-" if ratios[p] is None else f"{ratios[p]:.2f}"
                               for p in ("A", "B", "C")]
                        + [f"{qm['ratio_iops']:.2f}",
                           "-" if vs is None else f"{vs:.2f}"])
    if ref_rows:
        print()
        print("Mirroring cost beside a mature implementation (same run): blockrep's ratios to"
              " its lone node, QEMU quorum's ratio to QEMU alone, and blockrep C's IOPS over"
              " QEMU quorum's:")
        table(["workload", "A / lone", "B / lone", "C / lone", "qemu-mirror / qemu",
               "C / qemu-mirror"], ref_rows, {1, 2, 3, 4, 5})

    # ---- goals
    goals = []
    for c, w, target in GOALS:
        r = by.get((w, c))
        ratio = r["ratio_iops"] if r else None
        if ratio is None:
            result = "n/a"
        elif per_config.get(c) != "yes":
            result = "FAIL (replicas not verified identical)"
        else:
            result = "PASS" if ratio >= target else "FAIL"
        goals.append({"config": c, "workload": w, "target": target, "ratio": ratio,
                      "result": result})
    print()
    print("Goals (IOPS ratio to the lone node; PASS also needs identical replicas):")
    table(["goal", "workload", "ratio", "target", "result"],
          [[f"protocol {g['config']}", g["workload"],
            "-" if g["ratio"] is None else f"{g['ratio']:.2f}", f">= {g['target']:.1f}",
            g["result"]] for g in goals], {2, 3})

    # ---- daemon logs
    log_report = {}
    for c, p in logs:
        log_report.setdefault(c, []).append(scan_log(p))
    noisy = [(c, s) for c, ss in log_report.items() for s in ss if s["lines"] or s.get("error")]
    print()
    if not logs:
        pass
    elif not noisy:
        print("daemon logs: no warnings or errors (besides the expected forced promotion)")
    else:
        print("daemon logs: warnings / errors:")
        for c, s in noisy:
            name = os.path.basename(s["path"])
            if s.get("error"):
                print(f"  [{c}] {name}: cannot read: {s['error']}")
                continue
            print(f"  [{c}] {name}: {s['lines']} line(s)")
            for m in s["messages"]:
                print(f"      {m[:300]}")

    if out:
        meta.setdefault("generated", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        doc = {
            "meta": meta,
            "results": results,
            "replicas_identical": per_config,
            "goals": goals,
            "reference": reference,
            "daemon_logs": log_report,
        }
        with open(out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")

    if any(v != "yes" for v in per_config.values()):
        return 3
    return 0 if all(r["ok"] for r in results) else 2


def main(argv):
    if len(argv) < 3 or argv[1] not in ("get", "drained", "report"):
        print(__doc__, file=sys.stderr)
        return 64
    if argv[1] == "get":
        return cmd_get(argv[2:])
    if argv[1] == "drained":
        return 0 if is_drained(load_json(argv[2])) else 1
    return cmd_report(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
