"""Figure: model pools. 8 seeded tiny models with a Zipf-like popularity, served two ways
in the same run, on the same replica budget:

- `pool`: one pool deployment (`pool-bench`), at most 2 replicas of 2 CPUs each, each
  keeping 3 models loaded (Serve's multiplexing routes a job to a replica that holds its
  model; a miss loads it in the warm process, evicting the least recently used);
- `dedicated`: one deployment per model, `min_replicas: 0`, `max_replicas: 1`, 2 CPUs
  each, so at most 2 run at once on the 4 logical CPUs this Ray has: a job for a model
  without a replica waits for one to start (from zero, a fresh process) and, with two
  running, for one of them to go idle and scale down first (`idle_timeout_s` 2 s both
  ways).

The same open-loop plan for both: jobs arrive at `RATE` per second (seeded exponential
gaps), each for model k with probability proportional to 1 / k^1.1, 64 px / 2 steps.
Reported per way: p50 and p95 of each job's submit -> completed (the record's own
timestamps), jobs per second (jobs / first submit to last completion), and, for the pool,
its loads, hits and evictions from /metrics. The headline is dedicated p95 / pool p95.
"""

from __future__ import annotations

import random
import re
import time
import urllib.request
from typing import Any

from bench.cluster import SHAPES
from bench.common import iso_ms, log, percentile, ratio, rnd, submit, wait_all
from bench.context import Context
from bench.loadgen import Client

NAME = "pools"
MODELS = 8
ZIPF_S = 1.1
RATE = 1.0  # jobs per second, open loop
BODY = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2}
_SETTINGS = {"max_queue_size": 1000, "submit_rate": 0, "read_rate": 0,
             "max_queued_per_key": 1000, "max_concurrent_jobs": 8}
_SCALING = {"min_replicas": 0, "initial_replicas": 0, "idle_timeout_s": 2,
            "upscale_delay_s": 0, "downscale_delay_s": 2}


def model_ids() -> list[str]:
    return [f"zipf-{k}" for k in range(1, MODELS + 1)]


def _entry(model_id: str, seed: int, **over: Any) -> dict[str, Any]:
    return {"id": model_id, "name": model_id, "description": "seeded tiny variant (bench)",
            "source": "tiny", "seed": seed,
            "defaults": {"width": 64, "height": 64, "steps": 2}} | over


SHAPES["pools: pool"] = {
    "models": [_entry(m, k, pool="bench") for k, m in enumerate(model_ids(), 1)],
    "pools": [{"id": "bench", "max_models_per_replica": 3,
               "scaling": _SCALING | {"max_replicas": 2}, "resources": {"num_cpus": 2}}],
    "settings": _SETTINGS | {"default_model": "zipf-1"},
}
SHAPES["pools: dedicated"] = {
    "models": [_entry(m, k, scaling=_SCALING | {"max_replicas": 1},
                      resources={"num_cpus": 2}) for k, m in enumerate(model_ids(), 1)],
    "settings": _SETTINGS | {"default_model": "zipf-1"},
}


def plan(jobs: int, seed: int = 7) -> list[tuple[float, str]]:
    """(seconds after the start, model) for each job: Poisson arrivals, Zipf models."""
    rng = random.Random(seed)
    weights = [1 / k**ZIPF_S for k in range(1, MODELS + 1)]
    at, out = 0.0, []
    for _ in range(jobs):
        out.append((at, rng.choices(model_ids(), weights)[0]))
        at += rng.expovariate(RATE)
    return out


def drive(url: str, schedule: list[tuple[float, str]]) -> dict[str, Any]:
    with Client(url) as client:
        t0 = time.perf_counter()
        ids = []
        for i, (at, model) in enumerate(schedule):
            time.sleep(max(0.0, at - (time.perf_counter() - t0)))
            ids.append(submit(client, BODY | {"model": model, "seed": i}))
        jobs = wait_all(client, ids, timeout_s=900)
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    failed = [j for j in jobs if j["status"] != "completed"]
    latencies = [((iso_ms(j["completedAt"]) or 0) - (iso_ms(j["createdAt"]) or 0)) / 1000
                 for j in jobs if j["status"] == "completed"]
    first = min(iso_ms(j["createdAt"]) or 0 for j in jobs)
    last = max(iso_ms(j.get("completedAt")) or 0 for j in jobs)
    return {"jobs": len(jobs), "failed": len(failed),
            "p50_s": rnd(percentile(latencies, 50)), "p95_s": rnd(percentile(latencies, 95)),
            "jobs_per_s": rnd(len(latencies) / max(1e-9, (last - first) / 1000), 3),
            "pool_metrics": pool_counts(text)}


def pool_counts(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for kind in ("loads", "hits", "evictions"):
        pattern = rf"imagegen_pool_model_{kind}_total\{{[^}}]*\}} (\S+)"
        out[kind] = sum(float(v) for v in re.findall(pattern, text))
    return out


def prebuild(ctx: Context) -> None:
    """The seeded weights, built before either way runs: loads measure loads, not builds."""
    from serve_app.generation.tiny import ensure_tiny_model

    for k, model in enumerate(model_ids(), 1):
        ensure_tiny_model("tiny", ctx.workdir / "models" / f"{model}.seed-{k}", seed=k)


def run(ctx: Context) -> dict[str, Any]:
    jobs = 16 if ctx.quick else 80
    schedule = plan(jobs)
    prebuild(ctx)
    results = {}
    for way in ("pool", "dedicated"):
        url = ctx.deploy(f"pools: {way}")
        log(f"pools: {way}, {jobs} jobs at {RATE:g}/s")
        results[way] = drive(url, schedule)
        log(f"pools: {way}: {results[way]}")
    pool, dedicated = results["pool"], results["dedicated"]
    return {
        "figure": "dedicated deployments' p95 job latency ÷ one pool's, 8 Zipf-popular "
                  "models, min_replicas 0, 2 replicas at most either way",
        "ratio": ratio(dedicated["p95_s"], pool["p95_s"]),
        "headline": {"pool": pool, "dedicated": dedicated,
                     "popularity": {m: sum(1 for _, x in schedule if x == m)
                                    for m in model_ids()}},
    }
