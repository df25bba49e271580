"""A job's blobs from start to end, on the tracker in process: pruning deletes them, a job
with a webhook delivery pending outlives retention until the delivery ends, the sweep
deletes orphans (and nothing else), pending webhooks hold job ids rather than jobs, and a
replica that cannot reach the image store is a fault the job is retried for."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from serve_app.blobs import Blobs
from serve_app.errors import BlobStoreUnavailable
from serve_app.jobs.housekeeping import BlobSweep
from serve_app.jobs.persistence import InlineStoreCalls
from serve_app.jobs.service import JobTracker
from serve_app.messages import GenerationTask, ReplicaEvent, Started
from serve_app.registry import Registry
from serve_app.settings import Settings
from serve_app.stores.memory import MemoryStore
from tests.support.fakes import FakeClock, FakeReplicas, shared_blobs
from tests.support.trackers import make_tracker, record, settle, submission
from tests.support.webhook_receiver import ScriptedSender, hook_settings

pytestmark = pytest.mark.anyio


class Blobbed:
    """A tracker on a store and a blob store of this test's own."""

    def __init__(self, registry: Registry, settings: Settings, name: str,
                 replicas: FakeReplicas | None = None, **kwargs: Any) -> None:
        url = f"memory://{name}"
        self.settings = settings.model_copy(update={"blob_url": url})
        self.blobs: Blobs = shared_blobs(url)
        self.store = MemoryStore()
        self.replicas = replicas or FakeReplicas()
        self.replicas.blob_url = url
        self.tracker: JobTracker = make_tracker(registry, self.settings, self.replicas,
                                                store=InlineStoreCalls(self.store), **kwargs)

    def jobs_with_blobs(self) -> set[str]:
        return {m.key.split("/")[1] for m in self.blobs.listing()}


async def test_pruning_a_job_deletes_its_blobs(registry: Registry, settings: Settings,
                                               request: pytest.FixtureRequest) -> None:
    clock = FakeClock()
    t = Blobbed(registry, settings, request.node.name, clock=clock)
    old = await t.tracker.submit(submission(registry, t.settings))
    await settle()
    clock.advance(8 * 24 * 3600 * 1000)  # past the 7 days of retention
    new = await t.tracker.submit(submission(registry, t.settings, seed=9))
    await settle()
    await t.tracker.book.writes.flush()
    assert t.jobs_with_blobs() == {old["id"], new["id"]}
    assert await t.tracker.prune() == 1
    assert t.jobs_with_blobs() == {new["id"]} and t.store.load(old["id"]) is None
    await t.tracker.close()


async def test_a_job_with_a_pending_webhook_outlives_retention_until_its_delivery_ends(
        registry: Registry, settings: Settings, request: pytest.FixtureRequest) -> None:
    loop = asyncio.get_running_loop()
    sender = ScriptedSender(time.time, script=[503] * 3)
    hooked = hook_settings(settings, webhook_retry_base_s=0.05, retention_max_jobs=10)
    t = Blobbed(registry, hooked, request.node.name, webhook_sender=sender,
                clock=lambda: int(loop.time() * 1000))
    job = await t.tracker.submit(submission(registry, t.settings,
                                            webhook="https://hooks.example.com/h"))
    await asyncio.sleep(0.01)  # the oldest job: the first a count limit prunes
    for seed in range(12):  # retention pressure: more finished jobs than it keeps
        await t.tracker.submit(submission(registry, t.settings, seed=100 + seed))
    await settle()
    await t.tracker.book.writes.flush()
    await t.tracker.prune()
    assert t.store.load(job["id"]) is not None and job["id"] in t.jobs_with_blobs()
    for _ in range(200):  # the receiver answers 200 on the fourth attempt
        if len(sender.sent) >= 4:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)
    await t.tracker.book.writes.flush()
    done = await record(t.tracker, job["id"], t.settings.blob_url or "")
    assert done["webhook"]["deliveries"][0]["status"] == "delivered"
    await t.tracker.prune()
    assert t.store.load(job["id"]) is None and job["id"] not in t.jobs_with_blobs()
    await t.tracker.close()


async def test_pending_webhooks_hold_ids_and_an_attempt_finds_its_job_in_the_store(
        registry: Registry, settings: Settings, request: pytest.FixtureRequest) -> None:
    sender = ScriptedSender(time.time, script=[503])
    hooked = hook_settings(settings, webhook_retry_base_s=0.3)
    t = Blobbed(registry, hooked, request.node.name, webhook_sender=sender)
    job = await t.tracker.submit(submission(registry, t.settings,
                                            webhook="https://hooks.example.com/h"))
    for _ in range(100):
        if sender.sent:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    notifier = t.tracker.webhooks
    assert notifier._held == {}  # between attempts: no Job is held, only its id
    assert [(job_id, d.event.value) for job_id, d in _scheduled(notifier)] == [
        (job["id"], "completed")]
    for _ in range(200):
        if len(sender.sent) >= 2:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)
    done = await record(t.tracker, job["id"], t.settings.blob_url or "")
    assert done["webhook"]["deliveries"][0]["status"] == "delivered"
    assert notifier._held == {}
    await t.tracker.close()


def _scheduled(notifier: Any) -> list[tuple[str, Any]]:
    """What the timers will queue: (job id, delivery) pairs."""
    found = []
    for timer in notifier._scheduled.values():
        if timer is not None:
            found.append(timer._args[0])
    return found


async def test_the_sweep_deletes_old_orphans_only(registry: Registry, settings: Settings,
                                                  request: pytest.FixtureRequest) -> None:
    t = Blobbed(registry, settings, request.node.name)
    kept = await t.tracker.submit(submission(registry, t.settings))
    await settle()
    await t.tracker.book.writes.flush()
    for orphan in ("job_1_refused", "job_2_replica_died"):
        t.blobs.put(f"jobs/{orphan}/in/init_image.png", b"x", "image/png")
    now = [int(time.time() * 1000)]
    sweep = BlobSweep(t.blobs, t.tracker.book.calls, grace_s=60, clock=lambda: now[0],
                      batch=2)
    assert await sweep.run() == 0  # all young: kept
    now[0] += 61_000
    deleted = 0
    for _ in range(3):  # a batch of two blobs a run: the whole store over several runs
        deleted += await sweep.run()
    assert deleted == 2 and t.jobs_with_blobs() == {kept["id"]}
    await t.tracker.close()


class CannotStore(FakeReplicas):
    """A replica whose image store is down: every call fails as the worker would."""

    async def run(self, model_id: str, tasks: list[GenerationTask]
                  ) -> AsyncIterator[ReplicaEvent]:
        self.calls.extend((model_id, task) for task in tasks)
        yield Started(replica=f"{model_id}#fake")
        raise BlobStoreUnavailable("The image store did not answer (GenericError); retry "
                                   "shortly")


async def test_an_image_store_outage_on_a_replica_is_retried_then_fails_saying_so(
        registry: Registry, settings: Settings) -> None:
    replicas = CannotStore()
    tracker = make_tracker(registry, settings.model_copy(update={"max_attempts": 3}),
                           replicas)
    job = await tracker.submit(submission(registry, settings))
    await settle(200)
    done = await record(tracker, job["id"])
    assert done["status"] == "failed" and len(replicas.calls) == 3
    assert done["error"] == ("Job failed after 3 attempt(s): the replica could not reach the "
                             "image store")
    await tracker.close()
