"""Figure 4, cold start: a min-0 model from zero replicas to its first completed job.

The `service` shape's `tiny-cold` model (the tiny model's weights, prebuilt, under its own
id) starts at zero replicas and scales back to zero after 3 idle seconds. Each sample
waits for zero replicas, submits a 64 px / 1-step job to it, and times the client seeing it
completed; a thread watches `serve.status()` for when the replica was created and turned
RUNNING, and the replica reports its own start (`ModelReplica.startup`: was its process a
warm worker, how old was it, how long did the constructor take). Then the same job again,
warm. Measured as shipped (warm workers on, deployments/warm_pool.py) and, in the same run,
without warm workers (the baseline): the figure is baseline ÷ shipped (medians); the target
is the shipped cold start itself, <= 4 s. Last, a cold process's start is timed step by
step in a fresh interpreter outside Ray: what a replica without a warm worker pays.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from bench.cluster import COLD_MODEL, BenchCluster, stop_idle_warm_workers
from bench.common import ROOT, log, ratio, rnd
from bench.context import Context
from bench.e2e import one_job
from bench.loadgen import Client
from deployments.warm_pool import wait_local_warm_worker

NAME = "coldstart"
BODY = {"prompt": "a cabin in the snow", "model": COLD_MODEL, "width": 64, "height": 64,
        "steps": 1, "seed": 5}


def wait_replicas(cluster: BenchCluster, want: int, timeout_s: float) -> float:
    t0 = time.perf_counter()
    while cluster.running_replicas(COLD_MODEL) != want:
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError(f"{COLD_MODEL} did not reach {want} replica(s) in {timeout_s}s")
        time.sleep(0.25)
    return time.perf_counter() - t0


class ReplicaWatch(threading.Thread):
    """Notes when the model first has a replica at all (the autoscaler decided) and when
    one is RUNNING (started, pipeline loaded, warmed up)."""

    def __init__(self, cluster: BenchCluster) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.started_at = time.perf_counter()
        self.created_at: float | None = None
        self.running_at: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.running_at is None:
            states = self.cluster.replica_states(COLD_MODEL)
            now = time.perf_counter()
            if states and self.created_at is None:
                self.created_at = now
            if states.get("RUNNING"):
                self.running_at = now
            self.stop.wait(0.05)


WARM_SHAPE = "service"  # as shipped: warm workers on (IMAGEGEN_WARM_WORKERS=1)
BASELINE_SHAPE = "service (no warm workers)"
TARGET_S = 4.0


def replica_startup(cluster: BenchCluster) -> dict[str, Any]:
    """The cold replica's own account of its start (`ModelReplica.startup`)."""
    from ray import serve

    from bench.cluster import APP_NAME

    handle = serve.get_deployment_handle(f"model-{COLD_MODEL}", app_name=APP_NAME)
    if not handle.is_initialized:
        # Serve's fast path (RAY_SERVE_THROUGHPUT_OPTIMIZED) would bind the handle to the
        # caller's event loop; a synchronous driver has none.
        handle._init(_run_router_in_separate_loop=True)
    return dict(handle.startup.remote().result(timeout_s=60))


def measure(ctx: Context, shape: str, samples: int) -> dict[str, Any]:
    url = ctx.deploy(shape)
    cluster = ctx.cluster
    cold: list[float] = []
    warm: list[float] = []
    to_running: list[float] = []
    to_created: list[float] = []
    startups: list[dict[str, Any]] = []
    waited_for_zero: list[float] = []
    with Client(url, timeout_s=300) as client:
        for i in range(samples):
            waited_for_zero.append(wait_replicas(cluster, 0, timeout_s=180))
            if shape == BASELINE_SHAPE:
                stopped = stop_idle_warm_workers()
                if stopped:
                    log(f"coldstart: stopped {stopped} idle warm worker(s) left behind")
            else:
                # As a deployment that has been up a while: the tracker's warm worker has
                # done its imports (~10 s after the app starts or a replica took one).
                waited = wait_local_warm_worker()
                log(f"coldstart: a warm worker is ready (waited {waited:.1f} s)")
            log(f"coldstart [{shape}] {i + 1}/{samples}: {COLD_MODEL} at 0 replicas, submitting")
            watch = ReplicaWatch(cluster)
            watch.start()
            sample = one_job(client, BODY)
            watch.stop.set()
            watch.join()
            cold.append(sample["e2e_s"])
            startups.append(replica_startup(cluster))
            if watch.running_at is not None:
                to_running.append(watch.running_at - watch.started_at)
            if watch.created_at is not None:
                to_created.append(watch.created_at - watch.started_at)
            warm.append(one_job(client, BODY)["e2e_s"])
    return {
        "cold_p50_s": rnd(statistics.median(cold), 3),
        "warm_p50_ms": rnd(statistics.median(warm) * 1000),
        "submit_to_replica_created_s": rnd(statistics.median(to_created), 3)
        if to_created else None,
        "submit_to_replica_running_s": rnd(statistics.median(to_running), 3)
        if to_running else None,
        "replica_startup": startups,
        "cold_s": [rnd(x, 3) for x in cold],
        "warm_s": [rnd(x, 3) for x in warm],
        "scale_to_zero_wait_s": [rnd(x, 1) for x in waited_for_zero],
    }


def run(ctx: Context) -> dict[str, Any]:
    samples = 1 if ctx.quick else 3
    shipped = measure(ctx, WARM_SHAPE, samples)
    baseline = measure(ctx, BASELINE_SHAPE, samples)
    log("coldstart: a cold process's start, step by step, in a fresh process")
    phases = replica_phases(ctx)
    cold_s = shipped["cold_p50_s"]
    return {
        "figure": "cold first job without warm workers ÷ with them (shipped), "
                  "submit->completed (64 px, 1 step)",
        "ratio": ratio(baseline["cold_p50_s"], cold_s),
        "target": f"<= {TARGET_S:g} s cold",
        "met": cold_s <= TARGET_S,
        "headline": {
            "cold_p50_s": cold_s,
            "no_warm_workers_cold_p50_s": baseline["cold_p50_s"],
            "warm_p50_ms": shipped["warm_p50_ms"],
            "submit_to_replica_created_s": shipped["submit_to_replica_created_s"],
            "submit_to_replica_running_s": shipped["submit_to_replica_running_s"],
            "replica_startup": shipped["replica_startup"][0],
            "cold_process_phases_s": phases,
        },
        "shipped": shipped,
        "no_warm_workers": baseline,
    }


_PHASES = """
import json, sys, time
t = [time.time()]
import ray, ray.serve  # what every Serve replica process has loaded before our code
t.append(time.time())
from serve_app.generation.runner import ModelRunner  # torch, diffusers, transformers
from serve_app.registry import parse_registry
from serve_app.settings import load_settings
t.append(time.time())
args = json.loads(sys.argv[1])
runner = ModelRunner(parse_registry(args["models"]).get(args["model"]),
                     load_settings(args["settings"]), device="cpu")
t.append(time.time())
import psutil
born = psutil.Process().create_time()
print(json.dumps({"interpreter_start": round(t[0] - born, 2),
                  "import_ray_serve": round(t[1] - t[0], 2),
                  "import_torch_diffusers": round(t[2] - t[1], 2),
                  "pipeline_load": round(t[3] - t[2], 2)}))
"""


def replica_phases(ctx: Context) -> dict[str, float]:
    """What a replica's start does, timed step by step in a fresh process outside Ray:
    the interpreter, `ray` + Serve, torch and diffusers, the pipeline load. The rest of
    submit -> RUNNING is Ray's: the autoscaling decision, placing the actor, starting its
    worker process, and Serve's health check."""
    args = ctx.cluster.app_args("service")
    payload = json.dumps({"models": args["models"], "settings": args["settings"],
                          "model": COLD_MODEL})
    out = subprocess.run([sys.executable, "-c", _PHASES, payload], capture_output=True,
                         text=True, timeout=300, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])
