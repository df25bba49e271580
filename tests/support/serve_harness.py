"""A real Ray Serve application on loopback, shared by the end-to-end tests.

Ray start-up and shutdown cost ~20 s a cycle here, so one local Ray + Serve serves every
e2e module of the session (`LocalRay`); each module deploys the app it needs and gets a job
store of its own, so no module sees another's jobs. A module that needs a Ray of another
shape (tests/e2e/test_multinode.py) stops it first; the next module starts it again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from serve_app.cli import free_port, start_local_ray

APP_NAME = "imagegen"
TERMINAL = {"completed", "failed", "cancelled"}


@dataclass
class ServeHarness:
    url: str
    cache_dir: Path
    data_dir: Path

    def for_module(self, name: str) -> ServeHarness:
        """The same Ray and Serve, with a job store of the module's own."""
        return ServeHarness(self.url, self.cache_dir, self.data_dir.parent / name / "data")

    def deploy(self, models: str | dict[str, Any] = "config/models.yaml",
               ingress_replicas: int = 1, tracker_shards: int = 1, **settings: Any) -> None:
        from ray import serve

        from serve_app.builder import build_app

        # Tests poll and submit faster than a person: rate limits are off unless a test
        # turns them on (tests/e2e/test_e2e_security.py). Warm workers are off unless a test
        # turns them on (tests/e2e/test_scaling.py): on two cores, a replacement's ~10 s of
        # imports after each deploy slows the timing-sensitive chaos tests' replicas.
        base = {"cache_dir": str(self.cache_dir), "data_dir": str(self.data_dir),
                "store": "sqlite", "submit_rate": 0, "read_rate": 0, "warm_workers": 0}
        serve.run(build_app({"models": models, "settings": base | settings,
                             "ingress_replicas": ingress_replicas,
                             "tracker_shards": tracker_shards}),
                  name=APP_NAME, route_prefix="/",
                  logging_config={"enable_access_log": False})

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def replica_startup(self, model_id: str) -> dict[str, Any]:
        """How a running replica of `model_id` started (`ModelReplica.startup`)."""
        from ray import serve

        handle = serve.get_deployment_handle(f"model-{model_id}", app_name=APP_NAME)
        if not handle.is_initialized:
            # Serve's fast path (RAY_SERVE_THROUGHPUT_OPTIMIZED) would bind the handle to the
            # caller's event loop; a synchronous driver has none.
            handle._init(_run_router_in_separate_loop=True)
        return dict(handle.startup.remote().result(timeout_s=60))


class LocalRay:
    """The session's local Ray + Serve, started on first use and stopped at the end (or
    by a module that needs the machine to itself)."""

    def __init__(self, tmp: Path) -> None:
        self._tmp = tmp
        self._harness: ServeHarness | None = None

    def harness(self) -> ServeHarness:
        if self._harness is None:
            from ray import serve

            start_local_ray(num_cpus=4)
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port},
                        logging_config={"enable_access_log": False})
            self._harness = ServeHarness(f"http://127.0.0.1:{port}", self._tmp / "models",
                                         self._tmp / "base" / "data")
        return self._harness

    def stop(self) -> None:
        if self._harness is not None:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
            self._harness = None


def wait_for(client: httpx.Client, job_id: str, timeout_s: float = 120,
             until: set[str] | None = None) -> dict[str, Any]:
    until = until or TERMINAL
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not in {until} after {timeout_s}s: {job}")
