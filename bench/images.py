"""Figure 7, images of a real size: what a job costs the tracker and the job store when its
images are a photo's size, not the null model's 1x1 PNG.

The null model (`source: null`, no pipeline) answers images of `runtime.null_image_bytes`
bytes: none (the 1x1 PNG the tracker figure uses), ~400 KB (a 512² PNG) and ~1.5 MB (a
1024² PNG, SDXL's size). For each, `jobs` 30-step jobs are submitted from 16 connections
on the SQLite store (the shipped default) and the round measures completed jobs per
second, the tracker's CPU milliseconds per job and the job store's growth per job (the
SQLite pages in use). A last round on a local Redis measures
`used_memory` per completed 512² job.

Run it on this commit and on the commit before images left records (with the same null
model): `bench/README.md`, "Images", says how; the two runs' JSON are the before and after
of issue 23. The figure is the tracker CPU per job at 1024² after ÷ the tiny-PNG figure.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench.cluster import SHAPES
from bench.common import cpu_seconds, log, rnd
from bench.context import Context
from bench.loadgen import Client
from bench.tracker import NULL_MODEL, STEPS, local_redis, submit_all

NAME = "images"
SIZES = {"tiny": 0, "512px": 400_000, "1024px": 1_500_000}


def shape(image_bytes: int, redis_url: str | None = None) -> dict[str, Any]:
    store = {"store": "redis", "redis_url": redis_url} if redis_url else {}
    return {
        "models": [{
            "id": NULL_MODEL, "name": "null (benchmark)", "description": "no model",
            "source": "null", "defaults": {"steps": STEPS, "width": 64, "height": 64},
            "scaling": {"min_replicas": 2, "max_replicas": 2, "max_batch_size": 8,
                        "max_batch_wait_s": 0},
            "resources": {"num_cpus": 0.5},
            "runtime": {"null_step_ms": 2, "null_image_bytes": image_bytes},
        }],
        "settings": {"default_model": NULL_MODEL, "max_queue_size": 1_000_000,
                     "max_concurrent_jobs": 16, "submit_rate": 0, "read_rate": 0} | store,
    }


def store_bytes(data_dir: Path) -> int:
    """The SQLite job store's live size: its pages in use, as another connection sees them
    (the write-ahead log's committed pages included; free pages and the log's own size,
    which checkpoints reuse, not)."""
    import sqlite3

    db = sqlite3.connect(f"file:{data_dir / 'jobs.sqlite3'}?mode=ro", uri=True)
    try:
        used, size = db.execute(
            "SELECT (SELECT page_count FROM pragma_page_count()) - "
            "(SELECT freelist_count FROM pragma_freelist_count()), "
            "(SELECT page_size FROM pragma_page_size())").fetchone()
        return int(used) * int(size)
    finally:
        db.close()


def redis_memory(url: str) -> int:
    import redis

    server = redis.Redis.from_url(url)
    try:
        return int(server.info("memory")["used_memory"])
    finally:
        server.close()


def one_round(ctx: Context, label: str, image_bytes: int, jobs: int,
              redis_url: str | None = None) -> dict[str, Any]:
    name = f"null-images-{label}" + ("-redis" if redis_url else "")
    SHAPES[name] = shape(image_bytes, redis_url)
    url = ctx.deploy(name)
    data_dir = ctx.cluster.data_dir(name)
    with Client(url) as client:
        done_before = client.get("/queue/status")[1]["completedJobs"]
        pids = ctx.pids("tracker", "ingress")
        stored_before = redis_memory(redis_url) if redis_url else store_bytes(data_dir)
        before, t0 = cpu_seconds(pids), time.perf_counter()
        asyncio.run(submit_all(url, jobs))
        while client.get("/queue/status")[1]["completedJobs"] - done_before < jobs:
            if time.perf_counter() - t0 > 900:
                raise TimeoutError(f"the {label} jobs did not complete in 900 s")
            time.sleep(0.1)
        elapsed = time.perf_counter() - t0
        after = cpu_seconds(pids)
        time.sleep(1.0)  # the last saves, written behind
        stored_after = redis_memory(redis_url) if redis_url else store_bytes(data_dir)
    per_job = {role: rnd(1000 * (after[role] - before[role]) / jobs, 3) for role in before}
    grown = (stored_after - stored_before) / jobs
    where = "Redis used_memory" if redis_url else "SQLite pages"
    log(f"images: {label}: {jobs / elapsed:.0f} jobs/s, tracker {per_job.get('tracker')} ms "
        f"CPU per job, {where} +{grown / 1024:.1f} KB per job")
    return {"label": label, "image_bytes": image_bytes, "jobs": jobs,
            "store": "redis" if redis_url else "sqlite",
            "completed_per_s": rnd(jobs / elapsed, 1), "cpu_ms_per_job": per_job,
            "store_bytes_per_job": round(grown)}


def run(ctx: Context) -> dict[str, Any]:
    jobs = 100 if ctx.quick else 300
    rounds = [one_round(ctx, label, size, jobs) for label, size in SIZES.items()]
    with local_redis() as redis_url:
        if redis_url is None:
            ctx.notes.append("images: no redis-server installed; the Redis round was skipped")
        else:
            rounds.append(one_round(ctx, "512px", SIZES["512px"], 200, redis_url))
            # Nothing may still use this Redis when it stops: back to a SQLite shape.
            ctx.cluster.shape = None
            ctx.deploy("null-images-tiny")
    by = {(r["label"], r["store"]): r for r in rounds}
    tiny = by[("tiny", "sqlite")]["cpu_ms_per_job"].get("tracker")
    big = by[("1024px", "sqlite")]["cpu_ms_per_job"].get("tracker")
    headline = {f"tracker_cpu_ms_per_job_{label}": by[(label, "sqlite")]["cpu_ms_per_job"]
                .get("tracker") for label in SIZES}
    headline |= {f"completed_jobs_per_s_{label}": by[(label, "sqlite")]["completed_per_s"]
                 for label in SIZES}
    headline |= {f"sqlite_bytes_per_job_{label}": by[(label, "sqlite")]["store_bytes_per_job"]
                 for label in SIZES}
    if ("512px", "redis") in by:
        headline["redis_bytes_per_job_512px"] = by[("512px", "redis")]["store_bytes_per_job"]
    return {
        "figure": "tracker CPU ms per job: 1024² images ÷ the 1x1 PNG",
        "ratio": round(big / tiny, 2) if tiny and big else None,
        "target": 1.0,
        "met": bool(tiny and big and big <= tiny * 1.1),
        "headline": headline,
        "rounds": rounds,
    }
