"""Figure 1, the submit path: accepted submits per second and latency at 16 concurrent
connections, the service (with an API key, as it is deployed) against the bare Starlette
baseline (`bench.baseline_app`), and the same service without keys (auth's cost).

All three get the same text2img body, the same registry and settings, and the same load
generator: `wrk` (`bench.wrk`), far cheaper than the servers, so the figure is the
server's. Rounds alternate baseline and service so drift in the machine's load hits both;
the keyless service is deployed after them and measured in rounds of its own, then the
service with IMAGEGEN_DURABILITY=relaxed (each submit's save not fsynced before its 202:
the behaviour before `fsync` became the default), for the cost of the durable write. In the
service the jobs park in the tracker's queue (the `submit` shape's model can never be
placed), so nothing generates while the submit path is measured; the queue grows by every
accepted job. Rate limits and the per-key queue cap are off in these shapes (one key
sending 16 requests at a time is exactly what they would refuse): the figure is the
capacity of the path, keys checked.
"""

from __future__ import annotations

import json
import time
from typing import Any

from bench.baseline_app import BaselineServer
from bench.cluster import BENCH_KEY
from bench.common import cpu_ms_per, cpu_seconds, idle_cpu, log, ratio, rnd
from bench.context import Context
from bench.loadgen import Client
from bench.profiling import Spy
from bench.wrk import WrkResult, run_wrk

NAME = "submit"
CLIENTS = 16
TARGET = 0.5  # service accepted/s >= 0.5 x the baseline's
AUTH_TARGET = 0.5  # with keys >= 0.5 x without: auth must not halve it
BODY = {"prompt": "a serene lake surrounded by mountains at sunset", "width": 64,
        "height": 64, "steps": 1, "seed": 7}
KEYED = {"Authorization": f"Bearer {BENCH_KEY}"}


def load(url: str, duration_s: float, headers: dict[str, str] | None = None) -> WrkResult:
    return run_wrk(url, "POST", "/generate/text2img", json.dumps(BODY).encode(),
                   headers=headers, connections=CLIENTS, duration_s=duration_s)


def measured(url: str, pids: dict[str, int], idle: dict[str, float], duration_s: float,
             warmup_s: float, headers: dict[str, str] | None = None
             ) -> tuple[WrkResult, dict[str, float | None]]:
    """A warm-up run, then a measured one, and the CPU milliseconds each server process
    spent per request in it (its CPU at rest, `idle`, taken out)."""
    load(url, warmup_s, headers)
    before, t0 = cpu_seconds(pids), time.perf_counter()
    result = load(url, duration_s, headers)
    elapsed = time.perf_counter() - t0
    return result, cpu_ms_per(before, cpu_seconds(pids), result.requests, elapsed, idle)


def merge(runs: list[WrkResult]) -> dict[str, Any]:
    """Rounds together: accepted/s over all windows; latency percentiles per round (wrk
    reports percentiles, not samples) and their median."""
    statuses: dict[str, int] = {}
    for r in runs:
        for k, v in r.statuses.items():
            statuses[str(k)] = statuses.get(str(k), 0) + v
    window = sum(r.window_s for r in runs)
    accepted = sum(r.ok(202) for r in runs)

    def median(values: list[float]) -> float:
        return rnd(sorted(values)[len(values) // 2])

    return {
        "load_generator": "wrk, 1 thread",
        "clients": CLIENTS,
        "rounds": len(runs),
        "window_s": rnd(window),
        "accepted": accepted,
        "accepted_per_s": round(accepted / window, 1) if window else 0.0,
        "per_round_accepted_per_s": [round(r.per_s(202), 1) for r in runs],
        "statuses": statuses,
        "errors": sum(r.errors for r in runs),
        "latency": {"p50_ms": median([r.p50_ms for r in runs]),
                    "p90_ms": median([r.p90_ms for r in runs]),
                    "p99_ms": median([r.p99_ms for r in runs]),
                    "per_round_p50_ms": [rnd(r.p50_ms) for r in runs]},
    }


def run(ctx: Context) -> dict[str, Any]:
    rounds, duration, warmup = (1, 3.0, 1.0) if ctx.quick else (3, 8.0, 2.0)
    service_url = ctx.deploy("submit")
    baseline_runs: list[WrkResult] = []
    service_runs: list[WrkResult] = []
    open_runs: list[WrkResult] = []
    cpu: dict[str, list[dict[str, float | None]]] = {"baseline": [], "service": [],
                                                     "service without keys": []}
    service_pids = ctx.pids("proxy", "ingress", "tracker")
    server = BaselineServer(ctx.cluster.app_args("submit"), ctx.workdir)
    with server as baseline:
        baseline_pids = {"baseline app": server.pid} if server.pid else {}
        idle = idle_cpu(service_pids | baseline_pids, 3.0)
        for i in range(rounds):
            log(f"submit round {i + 1}/{rounds}: baseline")
            result, per = measured(baseline, baseline_pids, idle, duration, warmup)
            baseline_runs.append(result)
            cpu["baseline"].append(per)
            log(f"submit round {i + 1}/{rounds}: service, with an API key")
            result, per = measured(service_url, service_pids, idle, duration, warmup, KEYED)
            service_runs.append(result)
            cpu["service"].append(per)
        profile = _profile(ctx, baseline, service_url, server.pid) if ctx.profile_dir else None
    with Client(service_url, headers=KEYED) as client:
        queue = client.get("/queue/status")[1]
    open_url = ctx.deploy("submit-open")
    open_pids = ctx.pids("proxy", "ingress", "tracker")
    open_idle = idle_cpu(open_pids, 3.0)
    for i in range(rounds):
        log(f"submit round {i + 1}/{rounds}: service without keys")
        result, per = measured(open_url, open_pids, open_idle, duration, warmup)
        open_runs.append(result)
        cpu["service without keys"].append(per)
    relaxed_runs = _relaxed_rounds(ctx, rounds, duration, warmup, cpu)
    base, svc, keyless = merge(baseline_runs), merge(service_runs), merge(open_runs)
    relaxed = merge(relaxed_runs)
    figure = ratio(svc["accepted_per_s"], base["accepted_per_s"])
    auth = ratio(svc["accepted_per_s"], keyless["accepted_per_s"])
    return {
        "figure": "service accepted/s (API key) ÷ bare Starlette accepted/s (16 connections, "
                  "wrk)",
        "ratio": figure,
        "target": f">= {TARGET}",
        "met": figure is not None and figure >= TARGET,
        "auth_ratio": auth,
        "auth_target": f">= {AUTH_TARGET} (with keys ÷ without)",
        "auth_met": auth is not None and auth >= AUTH_TARGET,
        "headline": {
            "service_accepted_per_s": svc["accepted_per_s"],
            "baseline_accepted_per_s": base["accepted_per_s"],
            "keyless_accepted_per_s": keyless["accepted_per_s"],
            "service_p50_ms": svc["latency"]["p50_ms"],
            "service_p99_ms": svc["latency"]["p99_ms"],
            "baseline_p50_ms": base["latency"]["p50_ms"],
            "baseline_p99_ms": base["latency"]["p99_ms"],
        },
        "service": svc,
        "baseline": base,
        "service_without_keys": keyless,
        # The submit's fsync (IMAGEGEN_DURABILITY=fsync, the default) against relaxed.
        "durability": {
            "fsync_accepted_per_s": svc["accepted_per_s"],
            "relaxed_accepted_per_s": relaxed["accepted_per_s"],
            "ratio": ratio(svc["accepted_per_s"], relaxed["accepted_per_s"]),
            "fsync_p50_ms": svc["latency"]["p50_ms"],
            "relaxed_p50_ms": relaxed["latency"]["p50_ms"],
            "fsync_p99_ms": svc["latency"]["p99_ms"],
            "relaxed_p99_ms": relaxed["latency"]["p99_ms"],
            "relaxed": relaxed,
        },
        # Where the CPU goes, per request, by process (the last round's figures; CPU at
        # rest taken out): on two cores, CPU per request is what bounds throughput.
        "cpu_ms_per_request": {k: v[-1] for k, v in cpu.items() if v},
        "idle_cpu_pct": {role: rnd(100 * v, 1) for role, v in idle.items()},
        "p50_ratio": ratio(svc["latency"]["p50_ms"], base["latency"]["p50_ms"]),
        "queued_jobs_at_end": queue.get("queuedJobs") if isinstance(queue, dict) else None,
        "body": BODY,
        **({"profile": profile} if profile else {}),
    }


def _relaxed_rounds(ctx: Context, rounds: int, duration: float, warmup: float,
                    cpu: dict[str, list[dict[str, float | None]]]) -> list[WrkResult]:
    url = ctx.deploy("submit-relaxed")
    pids = ctx.pids("proxy", "ingress", "tracker")
    idle = idle_cpu(pids, 3.0)
    runs: list[WrkResult] = []
    cpu["service, durability relaxed"] = []
    for i in range(rounds):
        log(f"submit round {i + 1}/{rounds}: service, durability relaxed")
        result, per = measured(url, pids, idle, duration, warmup, KEYED)
        runs.append(result)
        cpu["service, durability relaxed"].append(per)
    return runs


def _profile(ctx: Context, baseline: str, service: str, baseline_pid: int | None
             ) -> dict[str, Any]:
    """An extra, unmeasured pass of each target under py-spy."""
    assert ctx.profile_dir is not None
    seconds = 5.0 if ctx.quick else 10.0
    out: dict[str, Any] = {}
    if baseline_pid:
        log("submit: profiling the baseline")
        with Spy(ctx.profile_dir, "submit-baseline", {"baseline": baseline_pid}, seconds) as spy:
            load(baseline, seconds)
        out |= spy.summaries
    log("submit: profiling the service (proxy, ingress, tracker)")
    pids = ctx.pids("proxy", "ingress", "tracker")
    with Spy(ctx.profile_dir, "submit-service", pids, seconds) as spy:
        load(service, seconds, KEYED)
    return out | spy.summaries
