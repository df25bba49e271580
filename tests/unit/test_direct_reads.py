"""Reads off the tracker (serve_app/api/direct_reads.py, serve_app/jobs/reads.py): the HTTP
app over `DirectReads`, whose store is the tracker's own, with every call that still
reaches the tracker counted. Through Ray Serve: every e2e module on the SQLite store."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import httpx
import pytest

from serve_app.api.direct_reads import DirectReads
from serve_app.jobs.job import JobStatus
from serve_app.jobs.persistence import InlineStoreCalls
from serve_app.jobs.reads import StoreReads
from serve_app.messages import OPEN
from serve_app.registry import Registry
from serve_app.settings import Settings, load_settings
from serve_app.shards import ShardMap
from serve_app.stores.contract import JobStore
from serve_app.stores.memory import MemoryStore
from tests.support.fakes import FakeReplicas, memory_store, shared_blobs
from tests.support.stores import DownStore
from tests.support.trackers import (
    SERVED,
    SMALL,
    CountedTracker,
    http_client,
    make_tracker,
    record,
    submission,
)

pytestmark = pytest.mark.anyio
ANA, BO = "ana-key-0123456789abcdef", "bo-key-0123456789abcdefg"
T = TypeVar("T")


class SlowWrites(InlineStoreCalls):
    """A store whose writes land 300 ms late, as a busy disk or a far Redis."""

    async def write(self, call: Callable[[JobStore], T]) -> T:
        await asyncio.sleep(0.3)
        return await super().write(call)


class App:
    def __init__(self, registry: Registry, settings: Settings, replicas: FakeReplicas,
                 ingress_replicas: int = 1, slow_writes: bool = False) -> None:
        calls = SlowWrites(MemoryStore()) if slow_writes else memory_store()
        self.tracker = make_tracker(registry, settings, replicas, store=calls)
        self.counted = CountedTracker(self.tracker)
        backend = DirectReads([self.counted], ShardMap((SERVED,)), StoreReads(calls), settings,
                              ingress_replicas=ingress_replicas)
        self.client = http_client(backend, settings, registry)

    async def submit(self, key: str = ANA, **body: Any) -> dict[str, Any]:
        resp = await self.client.post("/generate/text2img", json=SMALL | body,
                                      headers=as_(key))
        assert resp.status_code == 202, resp.text
        return dict(resp.json())

    async def read(self, job_id: str, key: str = ANA) -> httpx.Response:
        return await self.client.get(f"/jobs/{job_id}", headers=as_(key))


def as_(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def keyed(settings: Settings, **overrides: Any) -> Settings:
    base = settings.model_dump(exclude={"api_keys"}) | {"submit_rate": 0, "read_rate": 0}
    return load_settings(base | overrides, env={"API_KEYS": f"ana:{ANA},bo:{BO}"})


@pytest.fixture
def replicas() -> FakeReplicas:
    return FakeReplicas()


@pytest.fixture
async def app(registry: Registry, settings: Settings, replicas: FakeReplicas
              ) -> AsyncIterator[App]:
    a = App(registry, keyed(settings), replicas)
    async with a.client:
        yield a
    await a.tracker.close()


async def finished(app: App, job_id: str) -> None:
    """Until the tracker has the job completed and the store has what it has."""
    for _ in range(200):
        await asyncio.sleep(0.01)
        if json.loads(await app.tracker.get(job_id))["status"] == "completed":
            await app.tracker.book.writes.flush()
            return
    raise AssertionError(f"{job_id} did not finish")


async def test_a_finished_job_is_read_from_the_store_as_the_tracker_renders_it(app) -> None:
    job = await app.submit(numImages=2)
    await finished(app, job["id"])
    app.counted.calls.clear()
    from_store = (await app.read(job["id"])).json()
    assert from_store == await record(app.tracker, job["id"])
    assert from_store["status"] == "completed" and len(from_store["result"]["images"]) == 2
    image = await app.client.get(f"/jobs/{job['id']}/images/1", headers=as_(ANA))
    ref = await app.tracker.image(job["id"], 1)
    assert (image.status_code, image.content, image.headers["content-type"]) == (
        200, shared_blobs().get(ref["key"]), "image/png")
    page = (await app.client.get("/jobs", headers=as_(ANA))).json()
    assert [j["id"] for j in page["jobs"]] == [job["id"]]
    assert page["jobs"][0]["status"] == "completed"
    assert app.counted.calls == Counter()  # none of it reached the tracker


async def running_in_the_store(app: App, job_id: str) -> None:
    """Until the job runs (parked by `hold`) and the store has it running."""
    for _ in range(200):
        await asyncio.sleep(0.01)
        if app.tracker.book.count(JobStatus.PROCESSING):
            break
    await app.tracker.book.writes.flush()
    app.counted.calls.clear()
    assert (await app.read(job_id)).json()["status"] == "processing"
    assert app.counted.calls == Counter()  # read from the store


async def test_a_running_jobs_progress_is_read_from_the_store(app, replicas) -> None:
    replicas.hold = asyncio.Event()  # parks the run after its first step
    job = await app.submit(steps=4)
    await running_in_the_store(app, job["id"])
    assert (await app.read(job["id"])).json()["progress"] == 25
    replicas.hold.set()


async def test_a_queued_job_is_the_trackers_it_knows_its_place(app, replicas) -> None:
    replicas.hold = asyncio.Event()
    first = await app.submit()
    await asyncio.sleep(0.05)
    second = await app.submit(seed=8)
    await app.tracker.book.writes.flush()
    app.counted.calls.clear()
    queued = (await app.read(second["id"])).json()
    assert (queued["status"], queued["queuePosition"]) == ("queued", 1)
    assert app.counted.calls == Counter({"get": 1})
    replicas.hold.set()
    assert first["id"] != second["id"]


async def test_a_cancelled_job_reads_cancelled_from_the_store_at_once(
        registry, settings, replicas) -> None:
    replicas.hold = asyncio.Event()  # parks the run after its first step
    app = App(registry, keyed(settings), replicas, slow_writes=True)
    async with app.client:
        job = await app.submit()
        await running_in_the_store(app, job["id"])
        resp = await app.client.post(f"/jobs/{job['id']}/cancel", headers=as_(ANA))
        assert resp.status_code == 200, resp.text
        # No flush: the cancel answered only once the store had it.
        assert (await app.read(job["id"])).json()["status"] == "cancelled"
        replicas.hold.set()
    await app.tracker.close()


async def test_a_stream_says_a_job_ended_only_once_the_store_has_it(
        registry, settings, replicas) -> None:
    replicas.hold = asyncio.Event()
    app = App(registry, keyed(settings), replicas, slow_writes=True)
    async with app.client:
        job = await app.submit()
        await running_in_the_store(app, job["id"])
        # It completes while the stream is open; the store hears of it 300 ms later.
        asyncio.get_running_loop().call_later(0.1, replicas.hold.set)
        events = await app.client.get(f"/jobs/{job['id']}/events", headers=as_(ANA))
        last = [line for line in events.text.splitlines() if line.startswith("data:")][-1]
        assert json.loads(last.removeprefix("data:"))["status"] == "completed"
        assert (await app.read(job["id"])).json()["status"] == "completed"
    await app.tracker.close()


async def test_another_keys_job_is_unknown_from_the_store_too(app) -> None:
    job = await app.submit(key=ANA)
    await finished(app, job["id"])
    resp = await app.read(job["id"], key=BO)
    assert resp.status_code == 404 and resp.json().keys() == {"error"}
    assert (await app.client.get(f"/jobs/{job['id']}/images/0", headers=as_(BO))).status_code \
        == 404
    assert (await app.client.get("/jobs", headers=as_(BO))).json()["jobs"] == []
    assert (await app.read("job_1_nope")).status_code == 404


async def test_reads_are_limited_per_replica_at_its_share_of_the_rate(
        registry, settings, replicas) -> None:
    limited = keyed(settings, read_rate=1, read_burst=4)
    a = App(registry, limited, replicas, ingress_replicas=2)  # a bucket of 2 each
    async with a.client:
        statuses = [(await a.client.get("/jobs", headers=as_(ANA))).status_code
                    for _ in range(3)]
    await a.tracker.close()
    assert statuses == [200, 200, 429]


async def test_a_job_read_the_store_cannot_answer_is_the_trackers(
        registry, settings, replicas) -> None:
    calls = memory_store()
    tracker = make_tracker(registry, settings, replicas, store=calls)
    counted = CountedTracker(tracker)
    backend = DirectReads([counted], ShardMap((SERVED,)), StoreReads(DownStore(MemoryStore())),
                          settings)
    job = await tracker.submit(submission(registry, settings))
    await tracker.book.writes.flush()
    record = json.loads(await backend.get(job["id"], OPEN))
    assert record["id"] == job["id"] and counted.calls == Counter({"get": 1})
    await tracker.close()
