"""The benchmark suite in one command:

    .venv/bin/python -m bench.run [--quick] [--only NAME ...] [--profile]

Starts one local Ray + Serve on loopback, runs the figures (submit, e2e, batching,
coldstart, scale, tracker), shuts its Ray down, then prints a table and, as the LAST line of
stdout, the JSON summary. Every run writes `bench/results/<date>-<label>[-quick].json`
(machine, date, load average, every number); a full run (all figures, not --quick) also
rewrites the results table in bench/README.md. Progress goes to stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import importlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import traceback
from typing import Any

from bench.common import ROOT, load_average, log, machine_info, wait_quiet

FIGURES = ("submit", "e2e", "batching", "coldstart", "scale", "tracker", "images",
           "admission", "pools")
RESULTS_DIR = ROOT / "bench" / "results"
README = ROOT / "bench" / "README.md"
TABLE_START = "<!-- results:start -->"
TABLE_END = "<!-- results:end -->"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=FIGURES, metavar="NAME",
                        help=f"run only this figure (repeatable): {', '.join(FIGURES)}")
    parser.add_argument("--quick", action="store_true",
                        help="fewer samples and 10k instead of 100k records: for debugging")
    parser.add_argument("--profile", action="store_true",
                        help="add an unmeasured py-spy pass to submit and e2e "
                             "(raw stacks under bench/results/profiles/)")
    parser.add_argument("--label", default=default_label(),
                        help="the machine's name in the results file (default: %(default)s)")
    parser.add_argument("--no-write", action="store_true", help="write no results file")
    parser.add_argument("--keep-workdir", action="store_true",
                        help="keep the scratch directory (job stores, tiny models)")
    return parser.parse_args(argv)


def default_label() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()) or "host"
    return f"cpu{os.cpu_count()}-{host}"


def run_figures(names: tuple[str, ...], quick: bool, profile_dir: Path | None,
                workdir: Path) -> dict[str, Any]:
    from bench.context import Context

    ctx = Context(quick=quick, workdir=workdir, profile_dir=profile_dir)
    results: dict[str, Any] = {}
    try:
        for name in names:
            module = importlib.import_module(f"bench.{name}")
            log(f"== {name}")
            t0 = time.perf_counter()
            try:
                if results:  # after a figure: let its tail settle first
                    wait_quiet()
                results[name] = module.run(ctx)
            except Exception as exc:
                log(f"{name} failed: {type(exc).__name__}: {exc}")
                results[name] = {"error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc()[-4000:]}
            results[name]["seconds"] = round(time.perf_counter() - t0, 1)
            results[name]["loadavg_after"] = load_average()
    finally:
        ctx.close()  # before printing: Ray's log forwarding must not follow the JSON line
    return results


def headline(name: str, result: dict[str, Any]) -> str:
    h = result.get("headline") or {}
    if "error" in result:
        return f"ERROR {result['error'][:60]}"
    if name == "submit":
        return (f"{h['service_accepted_per_s']}/s p50 {h['service_p50_ms']} p99 "
                f"{h['service_p99_ms']} ms (API key) vs bare {h['baseline_accepted_per_s']}/s "
                f"p50 {h['baseline_p50_ms']} p99 {h['baseline_p99_ms']} ms; without keys "
                f"{h['keyless_accepted_per_s']}/s (auth ratio {result.get('auth_ratio')})")
    if name == "pools":
        p, d = h["pool"], h["dedicated"]
        return (f"pool p50 {p['p50_s']} p95 {p['p95_s']} s, {p['jobs_per_s']} jobs/s "
                f"({p['pool_metrics']}) vs dedicated p50 {d['p50_s']} p95 {d['p95_s']} s, "
                f"{d['jobs_per_s']} jobs/s")
    if name == "e2e":
        return (f"p50 {h['service_p50_ms']} p99 {h['service_p99_ms']} ms vs in-process "
                f"{h['in_process_p50_ms']} ms")
    if name == "batching":
        variants = ", ".join(f"{k} {v}x" for k, v in (h.get("variants") or {}).items())
        return (f"as shipped: concurrent {h['concurrent_s']} s (batches {h['batches_formed']}) "
                f"vs sequential {h['sequential_s']} s; variants: {variants}; in-process batch "
                f"{h['in_process_batch_speedup']}x, identical to alone "
                f"{h['in_process_identical']}")
    if name == "coldstart":
        return (f"cold {h['cold_p50_s']} s with warm workers (replica created after "
                f"{h['submit_to_replica_created_s']} s, RUNNING after "
                f"{h['submit_to_replica_running_s']} s; the replica: "
                f"{h.get('replica_startup')}) vs {h['no_warm_workers_cold_p50_s']} s without "
                f"(a cold process: {h.get('cold_process_phases_s')}); warm job "
                f"{h['warm_p50_ms']} ms")
    if name == "scale":
        return (f"{h['records']:,} records: GET /jobs/:id p50 {h['get_p50_ms']} p99 "
                f"{h['get_p99_ms']} ms (in-process {h['get_p50_in_process_ms']}, through the "
                f"tracker {h.get('get_p50_in_process_via_tracker_ms')}), GET /jobs "
                f"p50 {h['list_p50_ms']} ms; tracker RSS {h['tracker_rss_mib']} MiB "
                f"(+{h['tracker_rss_delta_mib']}), db {h['db_mib']} MiB")
    return json.dumps(h)


def verdict(result: dict[str, Any]) -> str:
    met = result.get("met")
    return "n/a" if met is None else ("met" if met else "MISSED")


def table(results: dict[str, Any]) -> list[str]:
    rows = [("figure", "ratio", "target", "verdict", "measured")]
    for name, r in results.items():
        rows.append((name, str(r.get("ratio")), str(r.get("target") or "-"), verdict(r),
                     headline(name, r)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for i, row in enumerate(rows):
        lines.append(" | ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True))
                     + " | " + row[4])
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths) + "-+-" + "-" * 20)
    return lines


def readme_table(summary: dict[str, Any]) -> str:
    m = summary["machine"]
    lines = [
        f"Last full run: {m['date']} on `{summary['label']}` ({m['cpu_count']} x "
        f"{m['cpu_model']}, {m['mem_total_gib']} GiB), torch {m['versions']['torch']}, "
        f"ray {m['versions']['ray']}; load average at start {m['loadavg_start']}, at end "
        f"{m['loadavg_end']}. File: `{summary['results_file']}`.",
        "",
        "| figure | measured | ratio | target | verdict |",
        "|---|---|---|---|---|",
    ]
    for name, r in summary["figures"].items():
        lines.append(f"| {name} | {headline(name, r)} | {r.get('ratio')} | "
                     f"{r.get('target') or '-'} | {verdict(r)} |")
    return "\n".join(lines)


def update_readme(summary: dict[str, Any]) -> None:
    text = README.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        log(f"{README} has no results markers; table not written")
        return
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    README.write_text(f"{head}{TABLE_START}\n{readme_table(summary)}\n{TABLE_END}{tail}")


def compact(results: dict[str, Any]) -> dict[str, Any]:
    keys = ("figure", "ratio", "target", "met", "headline", "error", "seconds",
            "loadavg_after")
    return {name: {k: r[k] for k in keys if k in r} for name, r in results.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = tuple(n for n in FIGURES if n in (args.only or FIGURES))
    full = not args.quick and names == FIGURES
    machine = machine_info()
    stamp = machine["date"][:10]
    suffix = ("-quick" if args.quick else "") + ("" if names == FIGURES else
                                                  "-" + "-".join(names))
    profile_dir = (RESULTS_DIR / "profiles" / f"{stamp}-{args.label}{suffix}"
                   if args.profile else None)
    workdir = Path(tempfile.mkdtemp(prefix="imagegen-bench-"))
    log(f"figures {', '.join(names)}{' (quick)' if args.quick else ''}; scratch {workdir}; "
        f"load average {machine['loadavg_start']}")
    try:
        results = run_figures(names, args.quick, profile_dir, workdir)
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    machine["loadavg_end"] = load_average()
    path = RESULTS_DIR / f"{stamp}-{args.label}{suffix}.json"
    summary: dict[str, Any] = {
        "label": args.label,
        "quick": args.quick,
        "results_file": None if args.no_write else str(path.relative_to(ROOT)),
        "machine": machine,
        "figures": results,
    }
    if not args.no_write:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")
        if full:
            update_readme(summary)
    for line in table(results):
        print(line)
    print(f"machine: {machine['cpu_count']} x {machine['cpu_model']}; load average "
          f"{machine['loadavg_start']} -> {machine['loadavg_end']}; results: "
          f"{summary['results_file']}")
    print(json.dumps(summary | {"figures": compact(results)}, separators=(",", ":")),
          flush=True)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
