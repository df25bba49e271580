"""The dispatch core end to end on the Redis store: through real Ray Serve on loopback, with
the tracker actor writing to a real redis-server (CI starts one; see tests/unit/test_store.py).

- a job for a model whose replica can never be placed fails as timed out after JOB_TIMEOUT,
  while another model's jobs run meanwhile;
- a storm of cancels at random moments leaves every model able to run new jobs, the queue
  empty and the counts consistent.

Killing the tracker on Redis (it reloads every job; none is lost or completed twice) runs
with the images in S3: tests/e2e/test_e2e_blobs.py.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.chaos import all_terminal, stats, submit
from tests.support.serve_harness import ServeHarness, wait_for
from tests.support.stores import REDIS_URL, redis_store

pytestmark = pytest.mark.e2e

SMALL = {"width": 64, "height": 64, "steps": 2}
TIMEOUT_MS = 6000


def registry() -> dict[str, Any]:
    tiny = {"source": "tiny", "type": "base", "version": "tiny-1",
            "defaults": {"width": 64, "height": 64, "steps": 2}}
    return {"models": [
        {"id": "tiny-sd", "name": "Tiny SD", "description": "test model", **tiny,
         "scaling": {"min_replicas": 1, "max_replicas": 1, "max_batch_size": 4},
         "resources": {"num_cpus": 1}},
        {"id": "tiny-b", "name": "Tiny B", "description": "test model", **tiny,
         "scaling": {"min_replicas": 1, "max_replicas": 1}, "resources": {"num_cpus": 0.5}},
        # Asks for more memory than this machine has: its replica is never placed. (A GPU
        # model on a cluster without GPUs is refused at submit: serve_app.placement.)
        {"id": "tiny-gpu", "name": "Tiny, too big", "description": "test model", **tiny,
         "scaling": {"min_replicas": 0, "max_replicas": 1},
         "resources": {"num_cpus": 0.5, "memory_gb": 4096}},
    ]}


@pytest.fixture(scope="module")
def harness(serve_harness: ServeHarness) -> ServeHarness:
    redis_store().close()  # flushes the test database, or skips without a server
    serve_harness.deploy(models=registry(), store="redis", redis_url=REDIS_URL,
                         job_timeout_ms=TIMEOUT_MS)
    return serve_harness


@pytest.fixture
def client(harness: ServeHarness) -> Iterator[httpx.Client]:
    with harness.client() as c:
        yield c


def test_a_job_whose_replica_cannot_be_placed_times_out_while_other_models_run(
        client: httpx.Client) -> None:
    stuck = submit(client, model="tiny-gpu", **SMALL)
    started = time.monotonic()
    others = [submit(client, model=m, seed=i, **SMALL)
              for i, m in enumerate(["tiny-sd", "tiny-b"] * 3)]
    done = all_terminal(client, [o["id"] for o in others], 60)
    assert {r["status"] for r in done.values()} == {"completed"}
    assert time.monotonic() - started < TIMEOUT_MS / 1000  # they did not wait for it
    failed = wait_for(client, stuck["id"], timeout_s=60)
    waited = time.monotonic() - started
    assert failed["status"] == "failed", failed
    assert "timed out" in failed["error"] and "waiting for a replica" in failed["error"]
    assert TIMEOUT_MS / 1000 - 1 <= waited <= TIMEOUT_MS / 1000 + 15
    # The model is free for its next job, which waits its own JOB_TIMEOUT (cancelled here,
    # so the next test starts with an empty queue).
    again = submit(client, model="tiny-gpu", **SMALL)
    assert again["queuePosition"] == 0
    assert client.post(f"/jobs/{again['id']}/cancel").json()["status"] == "cancelled"


def test_a_storm_of_cancels_leaves_every_model_working_and_the_queue_empty(
        client: httpx.Client) -> None:
    rng = random.Random(11)
    jobs = [submit(client, model=rng.choice(["tiny-sd", "tiny-b"]), seed=i,
                   **(SMALL | {"steps": rng.choice([2, 8])})) for i in range(40)]
    errors: list[str] = []

    def cancel(job_ids: list[str]) -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=30) as own:
            for job_id in job_ids:
                time.sleep(rng.random() * 0.05)
                resp = own.post(f"/jobs/{job_id}/cancel")
                if resp.status_code not in (200, 409):
                    errors.append(f"{resp.status_code} {resp.text[:100]}")

    chosen = [j["id"] for j in jobs if rng.random() < 0.7]
    threads = [threading.Thread(target=cancel, args=(chosen[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    final = all_terminal(client, [j["id"] for j in jobs], 120)
    assert {r["status"] for r in final.values()} <= {"completed", "cancelled"}
    assert {final[j["id"]]["status"] for j in jobs if j["id"] not in chosen} == {"completed"}
    counts = stats(client)
    assert (counts["queuedJobs"], counts["processingJobs"]) == (0, 0)
    for model in ("tiny-sd", "tiny-b"):
        after = submit(client, model=model, **SMALL)
        assert wait_for(client, after["id"], timeout_s=60)["status"] == "completed"
