"""One local Ray + Serve for the whole run, and the shapes of the app the figures deploy.

Started like `tests/support/serve_harness.py`: `serve_app.cli.start_local_ray` (loopback, no
dashboard, capped object store, usage stats and token auth off), Serve's proxy on
127.0.0.1 with the access log off. Each shape is one `serve.run(build_app({...}))` with an
inline registry and settings; a figure that needs another shape redeploys (a few seconds).
Shutting down is `serve.shutdown()` + `ray.shutdown()` of this driver's own cluster only.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import log, shipped_model, tiny_model, wait_http, wait_quiet
from deployments.warm_pool import local_idle_warm_workers
from serve_app.cli import free_port

APP_NAME = "imagegen"
COLD_MODEL = "tiny-cold"
SINK_MODEL = "sink"

# num_cpus 64 on a Ray started with 4 logical CPUs: the replica can never be placed, so
# the jobs of the submit figure park in the tracker's queue and nothing generates while
# the submit path is measured (generation would compete for the same two cores).
# The submit shape runs with an API key, as a deployment does; rate limits and the per-key
# queue cap are off (one key's 16 connections are what they exist to refuse), so the figure
# is the path's capacity with keys checked. `submit-open` is the same without keys;
# `submit-relaxed` the same with keys and IMAGEGEN_DURABILITY=relaxed (a submit's save not
# fsynced before its 202: the behaviour before durability became the default).
BENCH_KEY = "bench-key-0123456789abcdef"
_SUBMIT_SETTINGS: dict[str, Any] = {
    "default_model": SINK_MODEL, "max_queue_size": 10_000_000, "max_concurrent_jobs": 1,
    "submit_rate": 0, "read_rate": 0, "max_queued_per_key": 10_000_000}
# Shipped settings, but with rate limits off: a poller reading a job every few ms is what
# they exist to refuse.
_SERVICE_SETTINGS: dict[str, Any] = {
    "default_model": "tiny-sd", "max_queue_size": 1000, "submit_rate": 0, "read_rate": 0,
    "max_queued_per_key": 1000}
SHAPES: dict[str, dict[str, Any]] = {
    "submit": {
        "models": [tiny_model(SINK_MODEL, num_cpus=64, min_replicas=0, initial_replicas=0)],
        "settings": _SUBMIT_SETTINGS | {"api_keys": [{"name": "bench", "key": BENCH_KEY}]},
    },
    "submit-open": {
        "models": [tiny_model(SINK_MODEL, num_cpus=64, min_replicas=0, initial_replicas=0)],
        "settings": _SUBMIT_SETTINGS,
    },
    "submit-relaxed": {
        "models": [tiny_model(SINK_MODEL, num_cpus=64, min_replicas=0, initial_replicas=0)],
        "settings": _SUBMIT_SETTINGS | {"api_keys": [{"name": "bench", "key": BENCH_KEY}],
                                        "durability": "relaxed"},
    },
    # A key past its burst of 2 (the rate too low to refill it during the figure).
    "admission": {
        "models": [tiny_model(SINK_MODEL, num_cpus=64, min_replicas=0, initial_replicas=0)],
        "settings": _SUBMIT_SETTINGS | {"api_keys": [{"name": "bench", "key": BENCH_KEY}],
                                        "submit_rate": 0.01, "submit_burst": 2},
    },
    # e2e, batching, cold start and scale: tiny-sd as config/models.yaml ships it (its
    # scaling, batch size and CPUs), and a min-0 copy of the tiny model for the cold start.
    "service": {
        "models": [
            shipped_model("tiny-sd"),
            tiny_model(COLD_MODEL, min_replicas=0, initial_replicas=0, idle_timeout_s=3,
                       upscale_delay_s=0),
        ],
        "settings": _SERVICE_SETTINGS,
    },
}
# The cold start's baseline: the service shape without warm workers (every replica from a
# fresh process, as before deployments/warm_pool.py).
SHAPES["service (no warm workers)"] = {
    "models": SHAPES["service"]["models"],
    "settings": _SERVICE_SETTINGS | {"warm_workers": 0},
}
# Labelled variants of the service shape's tiny-sd that the batching figure measures beside
# what ships (each is `service` with these scaling/resources and MAX_CONCURRENT_JOBS).
VARIANTS: dict[str, dict[str, Any]] = {
    "batch 8": {"max_batch_size": 8, "num_cpus": 1},
    "batch 8, 2 CPUs": {"max_batch_size": 8, "num_cpus": 2},
}
for _label, _v in VARIANTS.items():
    SHAPES[f"service ({_label})"] = {
        "models": [shipped_model("tiny-sd", max_batch_size=_v["max_batch_size"],
                                 num_cpus=_v["num_cpus"])],
        "settings": _SERVICE_SETTINGS | {"max_concurrent_jobs": _v["max_batch_size"]}}
LOGGING = {"enable_access_log": False}
RAY_CPUS = 4  # logical, as the e2e tests use: room for two 1-CPU replicas


class BenchCluster:
    """A started Ray + Serve on loopback; `deploy(shape)` (re)deploys the app."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.shape: str | None = None
        self.url = ""

    def start(self) -> None:
        # The submit shape's unplaceable replica would have the autoscaler print an
        # "infeasible request" line to stdout every half minute. Read when Ray is imported.
        os.environ.setdefault("RAY_SCHEDULER_EVENTS", "0")
        from serve_app.cli import local_ray_env, start_local_ray

        # Before `ray.serve` is imported: Serve reads its fast-path switches at import, and
        # the handles this driver builds (build_app) take their transport from them.
        local_ray_env()
        from ray import serve

        t0 = time.perf_counter()
        start_local_ray(num_cpus=RAY_CPUS)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=LOGGING)
        self.url = f"http://127.0.0.1:{port}"
        log(f"Ray + Serve up on {self.url} in {time.perf_counter() - t0:.1f}s")

    def settings(self, shape: str) -> dict[str, Any]:
        base = {"cache_dir": str(self.workdir / "models"),
                "data_dir": str(self.workdir / "data" / shape), "store": "sqlite"}
        return base | SHAPES[shape]["settings"]

    def app_args(self, shape: str) -> dict[str, Any]:
        """The builder's args; a shape's `args` (e.g. `tracker_shards`) go in as they are."""
        registry = {"models": SHAPES[shape]["models"]} | (
            {"pools": SHAPES[shape]["pools"]} if "pools" in SHAPES[shape] else {})
        return {"models": registry, "settings": self.settings(shape),
                **SHAPES[shape].get("args", {})}

    def data_dir(self, shape: str) -> Path:
        return Path(self.settings(shape)["data_dir"])

    def deploy(self, shape: str) -> str:
        """Deploy `shape` unless it is what runs; returns the base URL."""
        if self.shape == shape:
            return self.url
        from ray import serve

        from serve_app.builder import build_app

        t0 = time.perf_counter()
        # The access log off for the app's replicas too, as config/serve.yaml means it:
        # serve.start's logging_config alone leaves them logging every call.
        serve.run(build_app(self.app_args(shape)), name=APP_NAME, route_prefix="/",
                  logging_config=LOGGING)
        wait_http(f"{self.url}/healthz")
        self.shape = shape
        log(f"deployed shape {shape!r} in {time.perf_counter() - t0:.1f}s")
        # The replaced shape's replicas stop after serve.run returns; its tracker may hold
        # a long queue (the submit figure's). Measure nothing until that is over.
        wait_quiet()
        return self.url

    def replica_states(self, model_id: str) -> dict[str, int]:
        """The model deployment's replicas by state (STARTING, RUNNING, ...)."""
        from ray import serve

        app = serve.status().applications.get(APP_NAME)
        dep = app.deployments.get(f"model-{model_id}") if app else None
        return {str(k): v for k, v in dep.replica_states.items() if v} if dep else {}

    def running_replicas(self, model_id: str) -> int:
        return self.replica_states(model_id).get("RUNNING", 0)

    def close(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def ray_processes() -> dict[str, psutil.Process]:
    """This driver's Ray processes by role (`proxy`, `ingress`, `tracker`, `tracker-1`, ...,
    `model-<id>`):
    the cluster ray.init started is a tree under this process, so other people's Ray
    clusters on the machine are never touched."""
    found: dict[str, psutil.Process] = {}
    prefix = f"ray::ServeReplica:{APP_NAME}:"
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if title.startswith("ray::ProxyActor"):
            found["proxy"] = proc
        elif title.startswith(prefix):
            # e.g. `ray::ServeReplica:imagegen:Tracker` or `...:model-tiny-sd.method`
            role = title[len(prefix):].split()[0].split(".")[0]
            found[role if role.startswith("model-") else role.lower()] = proc
    return found


def stop_idle_warm_workers() -> int:
    """Kill this driver's idle warm workers: the cold start's baseline must not find one
    the shipped shape left behind. Returns how many."""
    stopped = 0
    for proc in local_idle_warm_workers():
        try:
            proc.kill()
            stopped += 1
        except psutil.NoSuchProcess:
            continue
    return stopped


def rss_mib(proc: psutil.Process | None) -> float | None:
    try:
        return round(proc.memory_info().rss / 1024**2, 1) if proc else None
    except psutil.NoSuchProcess:
        return None
