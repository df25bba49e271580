"""Figure 3, batching: 8 concurrent 128 px / 20-step jobs against the same 8 one after
another, through the service, with tiny-sd as config/models.yaml ships it (the headline
figure: what users get) and in the labelled variants of `bench.cluster.VARIANTS` (another
batch size or CPU count, with MAX_CONCURRENT_JOBS raised to match), measured in the same
run so the shipped defaults can be chosen by measurement.

Concurrent: 8 POSTs at once, then wait for all; the time from sending them to the last
record's `completedAt`. Sequential: POST, wait, next; the sum of each job's submit ->
completedAt. The figure is sequential ÷ concurrent (medians of the rounds). The
batches the tracker formed are read back from the records (jobs of one replica call share
`startedAt`).

Beside it, in this process and so without the tracker: `ModelRunner.generate_batch` of
the 8 tasks against 8 `generate` calls, as the replica runs it (one UNet forward per step
for the whole batch, with the batch-invariant layers of `serve_app.generation.batching`).
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.cluster import VARIANTS
from bench.common import iso_ms, log, ratio, rnd, submit, wait_all
from bench.context import Context
from bench.e2e import one_job
from bench.loadgen import Client

NAME = "batching"
JOBS = 8
TARGET = 2.5


def body(i: int) -> dict[str, Any]:
    return {"prompt": f"a harbour at night, variation {i}", "width": 128, "height": 128,
            "steps": 20, "seed": 100 + i}


def concurrent_round(url: str) -> tuple[float, list[int]]:
    """8 POSTs at once (one client each), then one GET /jobs every 250 ms for all."""
    clients = [Client(url) for _ in range(JOBS)]
    for c in clients:
        c.get("/healthz")  # connect before the clock starts
    try:
        wall0 = time.time()
        with ThreadPoolExecutor(JOBS) as pool:
            ids = list(pool.map(lambda i: submit(clients[i], body(i)), range(JOBS)))
        jobs = wait_all(clients[0], ids)
    finally:
        for c in clients:
            c.close()
    _check(jobs)
    last = max(iso_ms(j["completedAt"]) or 0 for j in jobs)
    return last / 1000 - wall0, batch_sizes(jobs)


def sequential_round(url: str) -> float:
    """The same 8, each submitted when the one before is done: the sum of their
    submit -> completed times (the client's polling gaps left out)."""
    with Client(url) as client:
        return sum(one_job(client, body(i))["e2e_s"] for i in range(JOBS))


def batch_sizes(jobs: list[dict[str, Any]]) -> list[int]:
    """Jobs of one replica call are started by one event: their `startedAt` differ by a
    millisecond at most, while calls are tens of milliseconds apart."""
    starts = sorted(iso_ms(j["startedAt"]) or 0 for j in jobs)
    sizes = [1]
    for before, after in itertools.pairwise(starts):
        if after - before <= 5:
            sizes[-1] += 1
        else:
            sizes.append(1)
    return sizes


def _check(jobs: list[dict[str, Any]]) -> None:
    bad = [j for j in jobs if j["status"] != "completed"]
    if bad:
        raise RuntimeError(f"{len(bad)} batching job(s) did not complete: {bad[0].get('error')}")


def in_process(ctx: Context) -> dict[str, Any]:
    from serve_app.api.submission import build_submission
    from serve_app.messages import JobType
    from serve_app.registry import parse_registry
    from serve_app.settings import load_settings

    runner = ctx.runner()
    args = ctx.cluster.app_args("service")
    registry = parse_registry(args["models"])
    settings = load_settings(args["settings"])
    served = frozenset(m.id for m in registry.models)
    tasks = [dataclasses.replace(
        build_submission(JobType.TEXT2IMG, body(i), settings=settings, registry=registry,
                         served=served).task, job_id=f"bench-{i}") for i in range(JOBS)]

    def timed(fn: Any) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    one_by_one = timed(lambda: [runner.generate(t) for t in tasks])
    alone = [runner.generate(t).images for t in tasks]
    batched = timed(lambda: runner.generate_batch(tasks))
    identical = sum(r.images == a for r, a in zip(runner.generate_batch(tasks), alone,
                                                    strict=True))
    return {
        "one_by_one_s": rnd(one_by_one, 3),
        "generate_batch_s": rnd(batched, 3),
        "speedup_as_replica_runs_it": ratio(one_by_one, batched),
        "batched_images_identical_to_alone": f"{identical}/{len(tasks)}",
    }


def measure(ctx: Context, shape: str, rounds: int) -> dict[str, Any]:
    """The concurrent and sequential rounds on one deployed shape."""
    url = ctx.deploy(shape)
    concurrent: list[float] = []
    sequential: list[float] = []
    shapes: list[list[int]] = []
    for i in range(rounds):
        log(f"batching [{shape}] round {i + 1}/{rounds}: 8 concurrent, then 8 one after another")
        wall, batches = concurrent_round(url)
        concurrent.append(wall)
        shapes.append(batches)
        sequential.append(sequential_round(url))
    conc, seq = statistics.median(concurrent), statistics.median(sequential)
    return {"ratio": ratio(seq, conc), "concurrent_s": rnd(conc, 3),
            "sequential_s": rnd(seq, 3), "batches_formed": shapes,
            "rounds": {"concurrent_s": [rnd(x, 3) for x in concurrent],
                       "sequential_s": [rnd(x, 3) for x in sequential]}}


def run(ctx: Context) -> dict[str, Any]:
    rounds = 1 if ctx.quick else 3
    # The variants first, so the run goes on with the shipped shape deployed.
    variants = {label: measure(ctx, f"service ({label})", rounds) for label in VARIANTS}
    shipped = measure(ctx, "service", rounds)
    log("batching: the same in process (generate x8, generate_batch)")
    local = in_process(ctx)
    figure = shipped["ratio"]
    scaling = ctx.cluster.app_args("service")["models"]["models"][0]["scaling"]
    return {
        "figure": "8 jobs one after another ÷ 8 concurrent (128 px, 20 steps), wall time, "
                  f"tiny-sd as shipped (max_batch_size {scaling.get('max_batch_size', 1)})",
        "ratio": figure,
        "target": f">= {TARGET}",
        "met": figure is not None and figure >= TARGET,
        "headline": {
            "concurrent_s": shipped["concurrent_s"],
            "sequential_s": shipped["sequential_s"],
            "batches_formed": shipped["batches_formed"],
            "variants": {label: v["ratio"] for label, v in variants.items()},
            "in_process_batch_speedup": local["speedup_as_replica_runs_it"],
            "in_process_identical": local["batched_images_identical_to_alone"],
        },
        "shipped": shipped,
        "variants": variants,
        "in_process": local,
    }
