"""Figure 2, end-to-end overhead: submit -> completed for the tiny model at 64 px / 1 step,
against the same pipeline call in this process.

One client, one job at a time: POST, then wait on GET /jobs/:id/events (not polling: on two
cores each poll takes CPU from the job). The figure is submit -> completed: from the
moment the POST is sent to the record's `completedAt` (same machine, same clock, 1 ms
resolution), so how late the client hears of it is not in it; when the client saw it is
reported beside it, with the CPU each process spent per job (background work taken out).
The in-process side is `ModelRunner.generate` (the replica's own code, PNG encoding
included) on the same task, with the replica's torch thread count. Samples alternate
service and in-process so both see the same machine.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import (
    cpu_ms_per,
    cpu_seconds,
    idle_cpu,
    iso_ms,
    log,
    ratio,
    rnd,
    submit,
    summary_ms,
    wait_job,
)
from bench.context import Context
from bench.loadgen import Client
from bench.profiling import Spy

NAME = "e2e"
TARGET_MS = 50.0
BODY = {"prompt": "a lighthouse on a cliff", "width": 64, "height": 64, "steps": 1,
        "seed": 11}


def one_job(client: Client, body: dict[str, Any]) -> dict[str, Any]:
    """Submit, wait for the end on the job's event stream. `e2e_s` is submit ->
    completed on the machine's clock (the record's `completedAt` minus the moment the POST
    was sent), so how late the client hears of it is not in it; `seen_s` is when the
    client saw it."""
    wall0 = time.time()
    t0 = time.perf_counter()
    job_id = submit(client, body)
    accepted = time.perf_counter()
    job, seen = wait_job(client, job_id)
    if job["status"] != "completed":
        raise RuntimeError(f"benchmark job ended {job['status']}: {job.get('error')}")
    created, started, done = (iso_ms(job.get(k)) for k in ("createdAt", "startedAt",
                                                            "completedAt"))
    assert done is not None and created is not None
    return {
        "e2e_s": max(0.0, done / 1000 - wall0),
        "seen_s": seen - t0,
        "submit_s": accepted - t0,
        "server_ms": done - created,
        "wait_ms": (started - created) if started else None,
        "replica_ms": job["result"]["timeTaken"],
        "completed_ms": done,
        "sent_wall_s": wall0,
    }


def in_process_task(ctx: Context) -> Any:
    from serve_app.api.submission import build_submission
    from serve_app.messages import JobType
    from serve_app.registry import parse_registry
    from serve_app.settings import load_settings

    args = ctx.cluster.app_args("service")
    registry = parse_registry(args["models"])
    settings = load_settings(args["settings"])
    sub = build_submission(JobType.TEXT2IMG, BODY, settings=settings, registry=registry,
                           served=frozenset(m.id for m in registry.models))
    return sub.task


def run(ctx: Context) -> dict[str, Any]:
    n, warm = (8, 2) if ctx.quick else (40, 5)
    url = ctx.deploy("service")
    runner = ctx.runner()
    task = in_process_task(ctx)
    service: list[dict[str, Any]] = []
    local: list[float] = []
    with Client(url) as client:
        for _ in range(warm):
            one_job(client, BODY)
            runner.generate(task)
        log(f"e2e: {n} jobs through the service, {n} calls in process, alternating")
        pids = ctx.pids("proxy", "ingress", "tracker", "model-tiny-sd")
        idle = idle_cpu(pids, 3.0)
        cpu = dict.fromkeys(pids, 0.0)
        busy_s = 0.0
        for _ in range(n):
            before, t0 = cpu_seconds(pids), time.perf_counter()
            service.append(one_job(client, BODY))
            after = cpu_seconds(pids)
            busy_s += time.perf_counter() - t0
            for role in cpu:
                cpu[role] += after.get(role, 0.0) - before.get(role, 0.0)
            t0 = time.perf_counter()
            runner.generate(task)
            local.append(time.perf_counter() - t0)
        profile = _profile(ctx, client) if ctx.profile_dir else None

    client_ms = summary_ms([s["e2e_s"] for s in service])
    local_ms = summary_ms(local)
    p50 = client_ms["p50_ms"]

    def p50_of(key: str) -> float | None:
        return summary_ms([s[key] / 1000 for s in service if s[key] is not None])["p50_ms"]

    return {
        "figure": "service submit->completed p50 ÷ in-process pipeline call p50 (64 px, 1 step)",
        "ratio": ratio(p50, local_ms["p50_ms"]),
        "target": f"service p50 <= {TARGET_MS:g} ms",
        "met": p50 is not None and p50 <= TARGET_MS,
        "headline": {
            "service_p50_ms": p50,
            "service_p99_ms": client_ms["p99_ms"],
            "in_process_p50_ms": local_ms["p50_ms"],
        },
        "service_e2e": client_ms,
        "service_seen_by_client": summary_ms([s["seen_s"] for s in service]),
        "in_process": local_ms,
        "overhead_p50_ms": rnd(p50 - local_ms["p50_ms"]) if p50 and local_ms["p50_ms"] else None,
        # CPU per job by process (its event stream included), the processes' CPU at rest
        # (shown as idle_cpu_pct) taken out.
        "cpu_ms_per_job": cpu_ms_per(dict.fromkeys(cpu, 0.0), cpu, n, busy_s, idle),
        "idle_cpu_pct": {role: rnd(100 * v, 1) for role, v in idle.items()},
        "service_breakdown_p50_ms": {
            "submit_post (client)": summary_ms([s["submit_s"] for s in service])["p50_ms"],
            "created_to_started (tracker+router)": p50_of("wait_ms"),
            "created_to_completed (server side)": p50_of("server_ms"),
            "replica_generate (result.timeTaken)": p50_of("replica_ms"),
        },
        "body": BODY,
        **({"profile": profile} if profile else {}),
    }


def _profile(ctx: Context, client: Client) -> dict[str, Any]:
    assert ctx.profile_dir is not None
    seconds = 5.0 if ctx.quick else 10.0
    pids = ctx.pids("proxy", "ingress", "tracker", "model-tiny-sd")
    log("e2e: profiling proxy, ingress, tracker and replica")
    with Spy(ctx.profile_dir, "e2e", pids, seconds) as spy:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            one_job(client, BODY)
    return spy.summaries
