"""Figure 6, the tracker's cost per job: completed jobs per second through the whole service
and the tracker's CPU milliseconds per completed 30-step job, on the null model (a replica
that answers at once and still reports every step: `source: null`), so the service's own
cost is measured, not a pipeline's.

Two rounds in one run: progress as the service ships it (the replica sends a step's
progress at most every 100 ms, plus the first and last), and the baseline of progress
on every step (`progress_every_ms: 0`, what the service did before). Each round submits
`JOBS` jobs from 16 client connections and waits for the last to complete; the figure is
the tracker CPU per job, baseline ÷ shipped.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from bench.cluster import SHAPES
from bench.common import cpu_seconds, log, ratio, rnd
from bench.context import Context
from bench.loadgen import AsyncConnection, Client

NAME = "tracker"
STEPS = 30
CLIENTS = 16
NULL_MODEL = "null"
BODY = {"prompt": "x", "model": NULL_MODEL, "steps": STEPS, "width": 64, "height": 64}


def null_shape(progress_every_ms: int) -> dict[str, Any]:
    return {
        "models": [{
            "id": NULL_MODEL, "name": "null (benchmark)", "description": "no model",
            "source": "null", "defaults": {"steps": STEPS, "width": 64, "height": 64},
            "scaling": {"min_replicas": 2, "max_replicas": 2, "max_batch_size": 8,
                        "max_batch_wait_s": 0},
            "resources": {"num_cpus": 0.5},
            # 2 ms a step: a call of 30 steps takes 60 ms, so per-step progress is spread
            # over time as a pipeline's is (0 ms would let it coalesce by itself).
            "runtime": {"null_step_ms": 2},
        }],
        "settings": {"default_model": NULL_MODEL, "max_queue_size": 1_000_000,
                     "max_concurrent_jobs": 16, "submit_rate": 0, "read_rate": 0,
                     "progress_every_ms": progress_every_ms},
    }


async def submit_all(url: str, count: int) -> float:
    """POST `count` jobs over CLIENTS connections; seconds taken."""
    body = json.dumps(BODY).encode()
    left = count

    async def worker() -> None:
        nonlocal left
        conn = AsyncConnection(url)
        try:
            while left > 0:
                left -= 1
                status, _ = await conn.request("POST", "/generate/text2img", body)
                if status != 202:
                    raise RuntimeError(f"submit answered {status}")
        finally:
            await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CLIENTS)))
    return time.perf_counter() - t0


def one_round(ctx: Context, progress_every_ms: int, jobs: int) -> dict[str, Any]:
    SHAPES["null"] = null_shape(progress_every_ms)
    ctx.cluster.shape = None  # redeploy: the settings differ between rounds
    url = ctx.deploy("null")
    with Client(url) as client:
        done_before = client.get("/queue/status")[1]["completedJobs"]
        pids = ctx.pids("tracker", "ingress")
        before, t0 = cpu_seconds(pids), time.perf_counter()
        submit_s = asyncio.run(submit_all(url, jobs))
        while client.get("/queue/status")[1]["completedJobs"] - done_before < jobs:
            if time.perf_counter() - t0 > 600:
                raise TimeoutError("the null jobs did not complete in 600 s")
            time.sleep(0.1)
        elapsed = time.perf_counter() - t0
        after = cpu_seconds(pids)
    per_job = {role: rnd(1000 * (after[role] - before[role]) / jobs, 3) for role in before}
    log(f"tracker: progress every {progress_every_ms} ms: {jobs / elapsed:.0f} jobs/s, "
        f"tracker {per_job.get('tracker')} ms CPU per job")
    return {"progress_every_ms": progress_every_ms, "jobs": jobs,
            "completed_per_s": rnd(jobs / elapsed, 1), "submit_s": rnd(submit_s, 2),
            "cpu_ms_per_job": per_job}


def run(ctx: Context) -> dict[str, Any]:
    jobs = 300 if ctx.quick else 2000
    baseline = one_round(ctx, 0, jobs)
    shipped = one_round(ctx, 100, jobs)
    base_ms = baseline["cpu_ms_per_job"].get("tracker")
    ship_ms = shipped["cpu_ms_per_job"].get("tracker")
    return {
        "figure": "tracker CPU ms per completed 30-step job: per-step progress ÷ coalesced",
        "ratio": ratio(base_ms, ship_ms),
        "target": None,
        "met": None,
        "headline": {"tracker_cpu_ms_per_job": ship_ms,
                     "tracker_cpu_ms_per_job_per_step_progress": base_ms,
                     "completed_jobs_per_s": shipped["completed_per_s"],
                     "completed_jobs_per_s_per_step_progress": baseline["completed_per_s"]},
        "rounds": [baseline, shipped],
    }
