#!/usr/bin/env python3
"""Parse fio JSON results for scripts/bench-nbd.sh and print / save the comparison.

Subcommands:
  one RAWFILE DIR          print "IOPS MiB/s p99_us" for one fio run (DIR = read|write)
  report MANIFEST [--json OUT] [--meta KEY=VALUE ...]
                           MANIFEST has one tab-separated line per run:
                           workload  server  dir  bs  iodepth  rawfile  rc  [loadavg]
                           prints the table, writes JSON to OUT if given.

fio's nbd engine prints "fio: connected to NBD server" on stdout before the JSON
document, so parsing starts at the first '{'.
"""

import json
import sys
import time

BASELINE = "nbdkit"
SUBJECT = "blockrep"


def load_fio(path):
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        text = f.read()
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON document in fio output")
    # raw_decode tolerates trailing garbage after the document
    doc, _ = json.JSONDecoder().raw_decode(text[start:])
    return doc


def summarize(path, direction):
    doc = load_fio(path)
    jobs = doc.get("jobs") or []
    if not jobs:
        raise ValueError("fio JSON has no jobs")
    job = jobs[0]
    if job.get("error"):
        raise ValueError("fio job error %s" % job.get("error"))
    d = job[direction]
    if not d.get("total_ios") and not d.get("io_bytes"):
        raise ValueError("fio did no %s I/O" % direction)
    pct = (d.get("clat_ns") or {}).get("percentile") or {}
    p99 = pct.get("99.000000")
    p50 = pct.get("50.000000")
    return {
        "iops": float(d["iops"]),
        "mib_s": float(d["bw_bytes"]) / (1 << 20),
        "p99_us": None if p99 is None else p99 / 1000.0,
        "p50_us": None if p50 is None else p50 / 1000.0,
        "mean_lat_us": float((d.get("lat_ns") or {}).get("mean", 0.0)) / 1000.0,
        "total_ios": int(d.get("total_ios", 0)),
        "fio_version": doc.get("fio version"),
    }


def fmt_num(v, digits=0):
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def cmd_one(args):
    s = summarize(args[0], args[1])
    print(f"{s['iops']:.0f} IOPS  {s['mib_s']:.1f} MiB/s  p99 {fmt_num(s['p99_us'], 0)} us")


def cmd_report(args):
    manifest = args[0]
    out = None
    meta = {}
    i = 1
    while i < len(args):
        if args[i] == "--json":
            out = args[i + 1]
            i += 2
        elif args[i] == "--meta":
            k, _, v = args[i + 1].partition("=")
            meta[k] = int(v) if v.isdigit() else v
            i += 2
        else:
            raise SystemExit(f"fio_report.py: unknown argument {args[i]}")

    results = []
    with open(manifest, "r", encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            fields = line.split("\t") + [""]
            workload, server, direction, bs, iodepth, raw, rc, load = fields[:8]
            r = {
                "workload": workload,
                "server": server,
                "rw": direction,
                "bs": bs,
                "iodepth": int(iodepth),
                "ok": False,
                "error": None,
                "iops": None,
                "mib_s": None,
                "p99_us": None,
                "p50_us": None,
                "mean_lat_us": None,
                "loadavg_1m_before": float(load) if load else None,
            }
            try:
                if rc != "0":
                    raise ValueError(f"fio exited with status {rc}")
                s = summarize(raw, direction)
                meta.setdefault("fio_version", s.pop("fio_version"))
                s.pop("fio_version", None)
                r.update(s)
                r["ok"] = True
            except Exception as e:  # report the failure in the table, keep going
                r["error"] = str(e)
            results.append(r)

    # ratio blockrep/nbdkit on IOPS, per workload
    by = {(r["workload"], r["server"]): r for r in results}
    workloads = []
    for r in results:
        if r["workload"] not in workloads:
            workloads.append(r["workload"])
    ratios = {}
    for w in workloads:
        a, b = by.get((w, SUBJECT)), by.get((w, BASELINE))
        if a and b and a["ok"] and b["ok"] and b["iops"]:
            ratios[w] = a["iops"] / b["iops"]
        else:
            ratios[w] = None
    for r in results:
        r["ratio_blockrep_nbdkit_iops"] = ratios[r["workload"]] if r["server"] == SUBJECT else None

    header = ["workload", "server", "IOPS", "MiB/s", "p99 lat (us)", "blockrep/nbdkit (IOPS)"]
    rows = []
    for w in workloads:
        for r in results:
            if r["workload"] != w:
                continue
            if r["ok"]:
                ratio = r["ratio_blockrep_nbdkit_iops"]
                rows.append([
                    w, r["server"], fmt_num(r["iops"]), fmt_num(r["mib_s"], 1),
                    fmt_num(r["p99_us"]), "" if ratio is None else f"{ratio:.2f}",
                ])
            else:
                rows.append([w, r["server"], "FAILED", "-", "-", r["error"] or ""])
    widths = [max(len(str(x[i])) for x in rows + [header]) for i in range(len(header))]
    right = {2, 3, 4, 5}

    def line(cells):
        return "| " + " | ".join(
            (str(c).rjust(widths[i]) if i in right else str(c).ljust(widths[i]))
            for i, c in enumerate(cells)) + " |"

    print(line(header))
    print("|" + "|".join(("-" * (w + 1) + ":") if i in right else "-" * (w + 2)
                         for i, w in enumerate(widths)) + "|")
    for row in rows:
        print(line(row))

    if out:
        meta.setdefault("generated", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        doc = {
            "meta": meta,
            "results": results,
            "ratio_blockrep_nbdkit_iops": ratios,
        }
        with open(out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")

    return 0 if all(r["ok"] for r in results) else 2


def main(argv):
    if len(argv) < 2 or argv[1] not in ("one", "report"):
        print(__doc__, file=sys.stderr)
        return 64
    if argv[1] == "one":
        cmd_one(argv[2:])
        return 0
    return cmd_report(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
