"""A real Ray Serve application on loopback, shared by the end-to-end tests of a module.

Ray start-up costs ~15 s a cycle here, so each e2e module shares one local Ray and one
deployment of the app; a test that needs another shape of the app redeploys it with
`deploy()`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
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

    def deploy(self, models: str | dict[str, Any] = "config/models.yaml",
               ingress_replicas: int = 1, **settings: Any) -> None:
        from ray import serve

        from serve_app.builder import build_app

        base = {"cache_dir": str(self.cache_dir), "data_dir": str(self.data_dir),
                "store": "sqlite"}
        serve.run(build_app({"models": models, "settings": base | settings,
                             "ingress_replicas": ingress_replicas}),
                  name=APP_NAME, route_prefix="/",
                  logging_config={"enable_access_log": False})

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)


def start(tmp: Path) -> Iterator[ServeHarness]:
    from ray import serve

    start_local_ray(num_cpus=4)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                logging_config={"enable_access_log": False})
    harness = ServeHarness(f"http://127.0.0.1:{port}", tmp / "models", tmp / "data")
    try:
        yield harness
    finally:
        import ray

        serve.shutdown()
        ray.shutdown()


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
