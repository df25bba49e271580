"""Figure 1, the submit path: accepted submits per second and latency at 16 concurrent
clients, the service against the bare Starlette baseline (`bench.baseline_app`).

Both get the same text2img body, the same registry and settings, and the same load
generator (`bench.loadgen`: keep-alive HTTP/1.1 on asyncio streams, closed loop, in this
process; see there why not httpx). Rounds alternate baseline and
service so drift in the machine's load hits both. In the service the jobs park in the
tracker's queue (the `submit` shape's model can never be placed), so nothing generates
while the submit path is measured; the queue grows by every accepted job.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from bench.baseline_app import BaselineServer
from bench.common import cpu_ms_per, cpu_seconds, idle_cpu, log, ratio, rnd, summary_ms
from bench.context import Context
from bench.loadgen import Client, LoadResult, closed_loop
from bench.profiling import Spy

NAME = "submit"
CLIENTS = 16
TARGET = 0.5  # service accepted/s >= 0.5 x the baseline's
BODY = {"prompt": "a serene lake surrounded by mountains at sunset", "width": 64,
        "height": 64, "steps": 1, "seed": 7}


def load(url: str, duration_s: float, warmup_s: float) -> LoadResult:
    return asyncio.run(closed_loop(url, "POST", "/generate/text2img", json.dumps(BODY).encode(),
                                   clients=CLIENTS, duration_s=duration_s, warmup_s=warmup_s))


def measured(url: str, pids: dict[str, int], idle: dict[str, float], duration_s: float,
             warmup_s: float) -> tuple[LoadResult, dict[str, float | None]]:
    """A load run, and the CPU milliseconds each process spent per request in it (its
    CPU at rest, `idle`, taken out)."""
    pids = pids | {"load generator": os.getpid()}
    before, t0 = cpu_seconds(pids), time.perf_counter()
    result = load(url, duration_s, warmup_s)
    elapsed = time.perf_counter() - t0
    return result, cpu_ms_per(before, cpu_seconds(pids), result.all_requests, elapsed, idle)


def merge(runs: list[LoadResult]) -> dict[str, Any]:
    latencies = [x for r in runs for x in r.latencies]
    statuses: dict[str, int] = {}
    for r in runs:
        for k, v in r.statuses.items():
            statuses[str(k)] = statuses.get(str(k), 0) + v
    window = sum(r.window_s for r in runs)
    accepted = sum(r.ok(202) for r in runs)
    return {
        "clients": CLIENTS,
        "rounds": len(runs),
        "window_s": window,
        "accepted": accepted,
        "accepted_per_s": round(accepted / window, 1),
        "per_round_accepted_per_s": [round(r.ok(202) / r.window_s, 1) for r in runs],
        "statuses": statuses,
        "latency": summary_ms(latencies),
    }


def run(ctx: Context) -> dict[str, Any]:
    rounds, duration, warmup = (1, 4.0, 1.0) if ctx.quick else (3, 8.0, 2.0)
    service_url = ctx.deploy("submit")
    baseline_runs: list[LoadResult] = []
    service_runs: list[LoadResult] = []
    cpu: dict[str, list[dict[str, float | None]]] = {"baseline": [], "service": []}
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
            log(f"submit round {i + 1}/{rounds}: service")
            result, per = measured(service_url, service_pids, idle, duration, warmup)
            service_runs.append(result)
            cpu["service"].append(per)
        profile = _profile(ctx, baseline, service_url, server.pid) if ctx.profile_dir else None
    with Client(service_url) as client:
        queue = client.get("/queue/status")[1]
    base, svc = merge(baseline_runs), merge(service_runs)
    figure = ratio(svc["accepted_per_s"], base["accepted_per_s"])
    return {
        "figure": "service accepted/s ÷ bare Starlette accepted/s (16 clients)",
        "ratio": figure,
        "target": f">= {TARGET}",
        "met": figure is not None and figure >= TARGET,
        "headline": {
            "service_accepted_per_s": svc["accepted_per_s"],
            "baseline_accepted_per_s": base["accepted_per_s"],
            "service_p50_ms": svc["latency"]["p50_ms"],
            "service_p99_ms": svc["latency"]["p99_ms"],
            "baseline_p50_ms": base["latency"]["p50_ms"],
            "baseline_p99_ms": base["latency"]["p99_ms"],
        },
        "service": svc,
        "baseline": base,
        # Where the CPU goes, per request, by process (the last round's figures; CPU at
        # rest taken out): on two cores, CPU per request is what bounds throughput.
        "cpu_ms_per_request": {k: v[-1] for k, v in cpu.items() if v},
        "idle_cpu_pct": {role: rnd(100 * v, 1) for role, v in idle.items()},
        "p50_ratio": ratio(svc["latency"]["p50_ms"], base["latency"]["p50_ms"]),
        "queued_jobs_at_end": queue.get("queuedJobs"),
        "body": BODY,
        **({"profile": profile} if profile else {}),
    }


def _profile(ctx: Context, baseline: str, service: str, baseline_pid: int | None
             ) -> dict[str, Any]:
    """An extra, unmeasured pass of each target under py-spy."""
    assert ctx.profile_dir is not None
    seconds = 5.0 if ctx.quick else 10.0
    out: dict[str, Any] = {}
    if baseline_pid:
        log("submit: profiling the baseline")
        with Spy(ctx.profile_dir, "submit-baseline", {"baseline": baseline_pid}, seconds) as spy:
            load(baseline, seconds, 0.5)
        out |= spy.summaries
    log("submit: profiling the service (proxy, ingress, tracker)")
    pids = ctx.pids("proxy", "ingress", "tracker")
    with Spy(ctx.profile_dir, "submit-service", pids, seconds) as spy:
        load(service, seconds, 0.5)
    return out | spy.summaries
