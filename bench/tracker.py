"""Figure 6, the tracker's cost per job: completed jobs per second through the whole service
and the tracker's CPU milliseconds per completed 30-step job, on the null model (a replica
that answers at once and still reports every step: `source: null`), so the service's own
cost is measured, not a pipeline's.

Rounds in one run: progress as the service ships it (the replica sends a step's progress
at most every 100 ms, plus the first and last), and the baseline of progress on every step
(`progress_every_ms: 0`, what the service did before); then tracker shards on a Redis store
(a local `redis-server` the bench starts): two null models behind one tracker, and the same
two models behind two shards (`tracker_shards: 2`, one model each). Each round submits
`jobs` jobs from 16 client connections and waits for the last to complete; the figure is
the tracker CPU per job, baseline ÷ shipped. Per shard, the CPU per job is what that shard's
process spent over all the round's jobs; a shard's own jobs are half of them.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench.cluster import SHAPES
from bench.common import cpu_seconds, log, ratio, rnd
from bench.context import Context
from bench.loadgen import AsyncConnection, Client
from bench.profiling import Spy
from serve_app.cli import free_port

NAME = "tracker"
STEPS = 30
CLIENTS = 16
NULL_MODEL = "null"
NULL_MODELS = ("null", "null-2")


def null_model(model_id: str, replicas: int) -> dict[str, Any]:
    return {
        "id": model_id, "name": "null (benchmark)", "description": "no model",
        "source": "null", "defaults": {"steps": STEPS, "width": 64, "height": 64},
        "scaling": {"min_replicas": replicas, "max_replicas": replicas, "max_batch_size": 8,
                    "max_batch_wait_s": 0},
        "resources": {"num_cpus": 0.5},
        # 2 ms a step: a call of 30 steps takes 60 ms, so per-step progress is spread
        # over time as a pipeline's is (0 ms would let it coalesce by itself).
        "runtime": {"null_step_ms": 2},
    }


def null_shape(progress_every_ms: int, models: int = 1, shards: int = 1,
               redis_url: str | None = None) -> dict[str, Any]:
    """`models` null models with two replicas in all; on Redis when `redis_url` is given."""
    store = {"store": "redis", "redis_url": redis_url} if redis_url else {}
    return {
        "models": [null_model(m, 2 // models) for m in NULL_MODELS[:models]],
        "settings": {"default_model": NULL_MODEL, "max_queue_size": 1_000_000,
                     "max_concurrent_jobs": 16, "submit_rate": 0, "read_rate": 0,
                     "progress_every_ms": progress_every_ms} | store,
        "args": {"tracker_shards": shards},
    }


@contextmanager
def local_redis() -> Iterator[str | None]:
    """A throwaway redis-server on loopback (no persistence); None without one installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


async def submit_all(url: str, count: int, models: tuple[str, ...] = (NULL_MODEL,)) -> float:
    """POST `count` jobs over CLIENTS connections, the models in turn; seconds taken."""
    bodies = [json.dumps({"prompt": "x", "model": m, "steps": STEPS, "width": 64,
                          "height": 64}).encode() for m in models]
    left = count

    async def worker() -> None:
        nonlocal left
        conn = AsyncConnection(url)
        try:
            while left > 0:
                left -= 1
                body = bodies[left % len(bodies)]
                status, _ = await conn.request("POST", "/generate/text2img", body)
                if status != 202:
                    raise RuntimeError(f"submit answered {status}")
        finally:
            await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CLIENTS)))
    return time.perf_counter() - t0


def one_round(ctx: Context, progress_every_ms: int, jobs: int, models: int = 1,
              shards: int = 1, redis_url: str | None = None) -> dict[str, Any]:
    SHAPES["null"] = null_shape(progress_every_ms, models, shards, redis_url)
    ctx.cluster.shape = None  # redeploy: the settings differ between rounds
    url = ctx.deploy("null")
    roles = ["tracker", *(f"tracker-{i}" for i in range(1, shards)), "ingress"]
    with Client(url) as client:
        done_before = client.get("/queue/status")[1]["completedJobs"]
        pids = ctx.pids(*roles)
        before, t0 = cpu_seconds(pids), time.perf_counter()
        submit_s = asyncio.run(submit_all(url, jobs, NULL_MODELS[:models]))
        while client.get("/queue/status")[1]["completedJobs"] - done_before < jobs:
            if time.perf_counter() - t0 > 600:
                raise TimeoutError("the null jobs did not complete in 600 s")
            time.sleep(0.1)
        elapsed = time.perf_counter() - t0
        after = cpu_seconds(pids)
    per_job = {role: rnd(1000 * (after[role] - before[role]) / jobs, 3) for role in before}
    trackers = [per_job[r] for r in roles[:-1] if r in per_job]
    label = (f"progress every {progress_every_ms} ms, {models} model(s), {shards} shard(s)"
             + (", Redis" if redis_url else ", SQLite"))
    log(f"tracker: {label}: {jobs / elapsed:.0f} jobs/s, tracker(s) {trackers} ms CPU per job")
    return {"label": label, "progress_every_ms": progress_every_ms, "models": models,
            "shards": shards, "store": "redis" if redis_url else "sqlite", "jobs": jobs,
            "completed_per_s": rnd(jobs / elapsed, 1), "submit_s": rnd(submit_s, 2),
            "cpu_ms_per_job": per_job,
            "tracker_cpu_ms_per_job_all_shards": rnd(sum(trackers), 3) if trackers else None,
            "busiest_shard_cpu_ms_per_job": max(trackers) if trackers else None}


def run(ctx: Context) -> dict[str, Any]:
    jobs = 300 if ctx.quick else 2000
    baseline = one_round(ctx, 0, jobs)
    shipped = one_round(ctx, 100, jobs)
    rounds = [baseline, shipped]
    with local_redis() as redis_url:
        if redis_url is None:
            ctx.notes.append("tracker: no redis-server installed; the shard rounds were skipped")
        else:
            rounds += [one_round(ctx, 100, jobs, models=2, shards=n, redis_url=redis_url)
                       for n in (1, 2)]
            # Nothing may still use this Redis when it stops: back to the SQLite shape.
            # (Not serve.delete: it waits for every old deployment to go, and the submit
            # figure's never-placed replica may still be going.)
            SHAPES["null"] = null_shape(100)
            ctx.cluster.shape = None
            ctx.deploy("null")
    profile = _profile(ctx, jobs) if ctx.profile_dir else None
    base_ms = baseline["cpu_ms_per_job"].get("tracker")
    ship_ms = shipped["cpu_ms_per_job"].get("tracker")
    headline = {"tracker_cpu_ms_per_job": ship_ms,
                "tracker_cpu_ms_per_job_per_step_progress": base_ms,
                "completed_jobs_per_s": shipped["completed_per_s"],
                "completed_jobs_per_s_per_step_progress": baseline["completed_per_s"]}
    if len(rounds) == 4:
        one, two = rounds[2], rounds[3]
        headline |= {
            "redis_1_shard_completed_jobs_per_s": one["completed_per_s"],
            "redis_2_shards_completed_jobs_per_s": two["completed_per_s"],
            "redis_1_shard_tracker_cpu_ms_per_job": one["busiest_shard_cpu_ms_per_job"],
            "redis_2_shards_busiest_shard_cpu_ms_per_job": two["busiest_shard_cpu_ms_per_job"],
            "redis_2_shards_all_shards_cpu_ms_per_job": two["tracker_cpu_ms_per_job_all_shards"],
        }
    return {
        "figure": "tracker CPU ms per completed 30-step job: per-step progress ÷ coalesced",
        "ratio": ratio(base_ms, ship_ms),
        "target": None,
        "met": None,
        "headline": headline,
        "rounds": rounds,
        **({"profile": profile} if profile else {}),
    }


def _profile(ctx: Context, jobs: int) -> dict[str, Any]:
    """An extra, unmeasured pass of the shipped shape with the tracker under py-spy."""
    assert ctx.profile_dir is not None
    SHAPES["null"] = null_shape(100)
    ctx.cluster.shape = None
    url = ctx.deploy("null")
    seconds = 5.0 if ctx.quick else 10.0
    log("tracker: profiling the tracker and the ingress")
    with Spy(ctx.profile_dir, "tracker", ctx.pids("tracker", "ingress"), seconds) as spy:
        asyncio.run(submit_all(url, jobs))
    return spy.summaries
