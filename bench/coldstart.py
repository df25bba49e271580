"""Figure 4, cold start: a min-0 model from zero replicas to its first completed job,
against the same job once the replica is warm.

The `service` shape's `tiny-cold` model (the tiny model's weights, prebuilt, under its own
id) starts at zero replicas and scales back to zero after 3 idle seconds. Each sample
waits for zero replicas, submits a 64 px / 1-step job to it, and times the client seeing it
completed; a thread watches `serve.status()` for when the replica turned RUNNING. Then the
same job again, warm. The figure is cold ÷ warm (medians).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from bench.cluster import COLD_MODEL, BenchCluster
from bench.common import ROOT, log, ratio, rnd
from bench.context import Context
from bench.e2e import one_job
from bench.loadgen import Client

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


def run(ctx: Context) -> dict[str, Any]:
    samples = 1 if ctx.quick else 3
    url = ctx.deploy("service")
    cluster = ctx.cluster
    cold: list[float] = []
    warm: list[float] = []
    to_running: list[float] = []
    to_created: list[float] = []
    waited_for_zero: list[float] = []
    with Client(url, timeout_s=300) as client:
        for i in range(samples):
            waited_for_zero.append(wait_replicas(cluster, 0, timeout_s=180))
            log(f"coldstart sample {i + 1}/{samples}: {COLD_MODEL} at 0 replicas, submitting")
            watch = ReplicaWatch(cluster)
            watch.start()
            sample = one_job(client, BODY)
            watch.stop.set()
            watch.join()
            cold.append(sample["e2e_s"])
            if watch.running_at is not None:
                to_running.append(watch.running_at - watch.started_at)
            if watch.created_at is not None:
                to_created.append(watch.created_at - watch.started_at)
            warm.append(one_job(client, BODY)["e2e_s"])
    cold_p50, warm_p50 = statistics.median(cold), statistics.median(warm)
    log("coldstart: a replica's start, step by step, in a fresh process")
    phases = replica_phases(ctx)
    return {
        "figure": "cold first job ÷ warm job, submit->completed (64 px, 1 step)",
        "ratio": ratio(cold_p50, warm_p50),
        "target": None,
        "met": None,
        "headline": {
            "cold_p50_s": rnd(cold_p50, 3),
            "warm_p50_ms": rnd(warm_p50 * 1000),
            "submit_to_replica_created_s": rnd(statistics.median(to_created), 3)
            if to_created else None,
            "submit_to_replica_running_s": rnd(statistics.median(to_running), 3)
            if to_running else None,
            "replica_phases_s": phases,
        },
        "cold_s": [rnd(x, 3) for x in cold],
        "warm_s": [rnd(x, 3) for x in warm],
        "submit_to_replica_created_s": [rnd(x, 3) for x in to_created],
        "submit_to_replica_running_s": [rnd(x, 3) for x in to_running],
        "scale_to_zero_wait_s": [rnd(x, 1) for x in waited_for_zero],
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
