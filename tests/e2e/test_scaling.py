"""Scale to zero through real Ray Serve on loopback: a model with `min_replicas: 0` holds no
replica while idle, its first job waits in `loading_model` through a cold start, and after
`idle_timeout_s` without work its last replica goes, until the next job brings it back, on
one of the warm workers the tracker keeps (its imports done ahead)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.warm_pool import wait_local_warm_worker
from serve_app.builder import build_app
from serve_app.errors import ConfigError
from tests.support.serve_harness import TERMINAL, ServeHarness

pytestmark = pytest.mark.e2e

MODEL = "tiny-cold"
IDLE_TIMEOUT_S = 3.0
# Serve averages a deployment's load over `look_back_period_s` (30 s by default; the
# registry has no key for it), and the average of a window that holds the last job is not
# zero: measured here, the last replica went 30-37 s after the job, not IDLE_TIMEOUT_S.
SCALE_TO_ZERO_DEADLINE_S = 90
JOB = {"prompt": "a lake at dawn", "model": MODEL, "width": 64, "height": 64, "steps": 2}


def tiny_entry(model_id: str, **scaling: Any) -> dict[str, Any]:
    return {"id": model_id, "name": model_id, "description": "tiny test model",
            "source": "tiny", "scaling": scaling, "resources": {"num_cpus": 0.5}}


REGISTRY = {"models": [tiny_entry(
    MODEL, min_replicas=0, initial_replicas=0, max_replicas=1, idle_timeout_s=IDLE_TIMEOUT_S,
    upscale_delay_s=0, downscale_delay_s=1, graceful_shutdown_timeout_s=5,
)]}


@pytest.fixture(scope="module")
def scale_to_zero_app(serve_harness: ServeHarness) -> ServeHarness:
    serve_harness.deploy(REGISTRY, default_model=MODEL, warm_workers=1)
    return serve_harness


@pytest.fixture
def client(scale_to_zero_app: ServeHarness) -> Iterator[httpx.Client]:
    with scale_to_zero_app.client() as c:
        yield c


def model_entry(client: httpx.Client) -> dict[str, Any]:
    models = {m["id"]: m for m in client.get("/models").json()["models"]}
    return models[MODEL]


def wait_for_replicas(client: httpx.Client, count: int, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entry = model_entry(client)
        if entry["replicas"] == count:
            return entry
        time.sleep(0.25)
    raise AssertionError(f"{MODEL} not at {count} replica(s) after {timeout_s}s: {entry}")


def run_cold_start(client: httpx.Client) -> tuple[dict[str, Any], list[str | None]]:
    """Submit a job to a model at zero replicas; return its final record and the phases
    its record showed (GET /jobs/:id) while it was queued, in order, repeats dropped."""
    resp = client.post("/generate/text2img", json=JOB)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert (job["status"], job.get("phase")) == ("queued", "loading_model"), job
    phases: list[str | None] = []
    deadline = time.monotonic() + 90
    while job["status"] not in TERMINAL and time.monotonic() < deadline:
        job = client.get(f"/jobs/{job['id']}").json()
        if job["status"] == "queued" and job.get("phase") not in phases[-1:]:
            phases.append(job.get("phase"))
        time.sleep(0.05)
    return job, phases


def test_an_idle_min_zero_model_holds_no_replica(client) -> None:
    entry = model_entry(client)
    assert (entry["replicas"], entry["loaded"], entry["served"]) == (0, False, True)
    assert (entry["minReplicas"], entry["maxReplicas"]) == (0, 1)


def test_first_job_waits_in_loading_model_through_a_cold_start(client) -> None:
    done, phases = run_cold_start(client)
    assert done["status"] == "completed", done
    assert phases[:1] == ["loading_model"], phases
    assert set(phases) <= {"loading_model", "waiting_for_replica"}, phases
    assert done["result"]["parameters"]["model"] == MODEL
    assert done["result"]["parameters"]["replica"].startswith(f"{MODEL}#")
    entry = model_entry(client)
    assert (entry["replicas"], entry["loaded"]) == (1, True)


def test_an_idle_model_scales_to_zero_and_the_next_job_brings_it_back(
        client, scale_to_zero_app: ServeHarness) -> None:
    # Stand-alone: warm the model first if an earlier test did not.
    if model_entry(client)["replicas"] == 0:
        assert run_cold_start(client)[0]["status"] == "completed"
    gone = wait_for_replicas(client, 0, timeout_s=SCALE_TO_ZERO_DEADLINE_S)
    assert gone["loaded"] is False
    # Idle since its last job ended, and not gone before the idle timeout.
    last = client.get("/jobs", params={"model": MODEL, "limit": 1}).json()["jobs"][0]
    idle_for = time.time() - datetime.fromisoformat(last["completedAt"]).timestamp()
    assert idle_for >= IDLE_TIMEOUT_S, idle_for

    # The tracker replaces a warm worker a replica took within seconds; its imports take
    # ~10 s more on this machine. A deployment that has been up a while has one ready.
    wait_local_warm_worker(timeout_s=120)
    done, phases = run_cold_start(client)
    assert done["status"] == "completed", done
    assert phases[:1] == ["loading_model"], phases
    entry = model_entry(client)
    assert (entry["replicas"], entry["loaded"]) == (1, True)
    # The replica took the warm worker: its imports were done before it was created.
    startup = scale_to_zero_app.replica_startup(MODEL)
    assert startup["warm_worker"] is True, startup
    assert startup["preload_s"] > 0 and startup["idle_before_s"] >= 1.0, startup


def test_a_misspelt_autoscaling_key_stops_the_build_naming_it(tmp_path: Path) -> None:
    # Ray ignores unknown autoscaling keys silently; the registry must not.
    registry = {"models": [tiny_entry(MODEL, min_replica=0, max_replicas=1)]}
    settings = {"cache_dir": str(tmp_path), "data_dir": str(tmp_path), "store": "memory",
                "default_model": MODEL}
    with pytest.raises(ConfigError) as exc:
        build_app({"models": registry, "settings": settings})
    message = str(exc.value)
    assert "min_replica" in message and "unknown key" in message, message
    assert f"({MODEL}).scaling.min_replica" in message, message
