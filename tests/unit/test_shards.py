"""Tracker shards (serve_app/shards.py, serve_app/api/trackers.py, the routing in
serve_app/api/direct_reads.py): two trackers over one store, each owning one model, behind
the HTTP app as an ingress replica runs it, with every call that reaches a tracker counted.
Through Ray Serve on the three-node cluster: tests/e2e/test_multinode.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve_app.api.backend import JobsBackend
from serve_app.api.direct_reads import DirectReads
from serve_app.api.trackers import Trackers
from serve_app.errors import ConfigError, NotThisShard, ServiceUnavailable
from serve_app.jobs.persistence import InlineStoreCalls, StoreCalls, StoreIO
from serve_app.jobs.reads import StoreReads
from serve_app.jobs.service import JobTracker
from serve_app.messages import OPEN, Caller
from serve_app.registry import Registry
from serve_app.settings import Settings
from serve_app.shards import ShardMap, tracker_deployment_name
from serve_app.stores.contract import JobStore
from serve_app.stores.memory import MemoryStore
from serve_app.stores.redis import RedisStore
from tests.support.fakes import FakeReplicas
from tests.support.stores import REDIS_URL, DownStore, redis_store
from tests.support.trackers import SMALL, CountedTracker, http_client, make_tracker, submission

pytestmark = pytest.mark.anyio
A, B = "tiny-sd", "tiny-sdxl"
SHARDS = ShardMap((frozenset({A}), frozenset({B})))


def test_models_are_dealt_to_shards_in_turn_and_unserved_ones_are_the_primarys() -> None:
    shards = ShardMap.deal(["a", "b", "c", "d", "e"], 2)
    assert shards.shards == (frozenset({"a", "c", "e"}), frozenset({"b", "d"}))
    assert [shards.of(m) for m in "abcde"] == [0, 1, 0, 1, 0]
    assert shards.of("gone") == 0 and shards.owns(0, "gone") and not shards.owns(1, "gone")
    assert ShardMap.deal(["a"], 1).shards == (frozenset({"a"}),)
    assert [tracker_deployment_name(i) for i in range(3)] == ["Tracker", "Tracker-1",
                                                              "Tracker-2"]


@pytest.mark.parametrize("count", [0, 3])
def test_a_shard_count_that_cannot_own_whole_models_is_refused(count: int) -> None:
    with pytest.raises(ConfigError, match="tracker_shards"):
        ShardMap.deal(["a", "b"], count)


def test_several_shards_need_a_store_every_replica_reaches(settings: Settings) -> None:
    from serve_app.builder import AppArgs, resolve

    args = AppArgs(settings={"store": "sqlite", "data_dir": settings.data_dir},
                   tracker_shards=2)
    with pytest.raises(ConfigError, match="IMAGEGEN_STORE=redis"):
        resolve(args)


def test_the_app_has_a_tracker_deployment_per_shard_with_its_models_handles() -> None:
    from serve_app.builder import build_app

    models = [{"id": m, "name": m, "description": "test", "source": "tiny"} for m in "abc"]
    app = build_app({"models": {"models": models}, "tracker_shards": 2,
                     "settings": {"store": "redis", "default_model": "a"}})
    trackers, shards = app._bound_deployment.init_args[:2]  # the ingress's
    assert shards == ShardMap((frozenset({"a", "c"}), frozenset({"b"})))
    bound = [t._bound_deployment for t in trackers]
    assert [d.name for d in bound] == ["Tracker", "Tracker-1"]
    # (settings, registry, own models, their deployments' handles, the map, the index)
    assert [(d.init_args[2], sorted(d.init_args[3]), d.init_args[5]) for d in bound] == [
        (frozenset({"a", "c"}), ["a", "c"], 0), (frozenset({"b"}), ["b"], 1)]


class Sharded:
    """Two tracker shards on one store, behind the HTTP app. `calls` makes each shard's way
    to the store (default: inline calls on `store`)."""

    def __init__(self, registry: Registry, settings: Settings, store: JobStore,
                 calls: Callable[[], StoreCalls] | None = None) -> None:
        self.registry, self.settings, self.store = registry, settings, store
        self.calls = calls or (lambda: InlineStoreCalls(store))
        self.replicas = [FakeReplicas(replicas={A: 1}), FakeReplicas(replicas={B: 1})]
        self.trackers = [self.shard(i) for i in range(2)]
        self.counted = [CountedTracker(t) for t in self.trackers]
        backend = DirectReads(self.counted, SHARDS, StoreReads(InlineStoreCalls(store)),
                              settings)
        self.client = http_client(backend, settings, registry, SHARDS.served)

    def shard(self, index: int) -> JobTracker:
        return make_tracker(self.registry, self.settings, self.replicas[index],
                            store=self.calls(), served=SHARDS.shards[index],
                            shards=SHARDS, shard=index)

    async def submit(self, model: str, **body: Any) -> dict[str, Any]:
        resp = await self.client.post("/generate/text2img", json=SMALL | {"model": model} | body)
        assert resp.status_code == 202, resp.text
        return dict(resp.json())

    async def status(self, job_id: str) -> str:
        return str((await self.client.get(f"/jobs/{job_id}")).json()["status"])

    async def until(self, job_id: str, status: str) -> None:
        for _ in range(300):
            if await self.status(job_id) == status:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{job_id} is {await self.status(job_id)}, not {status}")

    async def close(self) -> None:
        for tracker in self.trackers:
            await tracker.close()


@pytest.fixture
async def sharded(registry: Registry, settings: Settings) -> AsyncIterator[Sharded]:
    s = Sharded(registry, settings, MemoryStore())
    for tracker in s.trackers:
        await tracker.start()
    async with s.client:
        yield s
    await s.close()


async def test_each_models_jobs_go_to_its_shard_and_complete_there(sharded) -> None:
    a, b = await sharded.submit(A), await sharded.submit(B)
    assert [c.calls["submit"] for c in sharded.counted] == [1, 1]
    for job in (a, b):
        await sharded.until(job["id"], "completed")
    assert [m for m, _ in sharded.replicas[0].calls] == [A]
    assert [m for m, _ in sharded.replicas[1].calls] == [B]
    done = [(await sharded.client.get(f"/jobs/{j['id']}")).json() for j in (a, b)]
    assert [d["result"]["parameters"]["model"] for d in done] == [A, B]


async def test_a_jobs_cancel_and_stream_reach_the_shard_of_its_model(sharded) -> None:
    sharded.replicas[1].hold = asyncio.Event()
    running = await sharded.submit(B)
    queued = await sharded.submit(B, seed=8)  # the one replica is busy: it waits
    await sharded.until(running["id"], "processing")
    for counted in sharded.counted:
        counted.calls.clear()
    assert (await sharded.client.get(f"/jobs/{queued['id']}")).json()["queuePosition"] == 1
    assert [c.calls["get"] for c in sharded.counted] == [0, 1]  # a queued job: its shard
    resp = await sharded.client.post(f"/jobs/{queued['id']}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled", resp.text
    assert [c.calls["cancel"] for c in sharded.counted] == [0, 1]
    # (the ASGI transport answers when the stream ends: release the job meanwhile)
    asyncio.get_running_loop().call_later(0.1, sharded.replicas[1].hold.set)
    body = (await sharded.client.get(f"/jobs/{running['id']}/events")).text
    assert [c.calls["watch"] for c in sharded.counted] == [0, 1]
    last = [line for line in body.splitlines() if line.startswith("data:")][-1]
    assert json.loads(last.removeprefix("data:"))["status"] == "completed", body


async def test_queue_status_models_and_metrics_cover_every_shard(sharded) -> None:
    jobs = [await sharded.submit(A), await sharded.submit(B), await sharded.submit(B, seed=9)]
    for job in jobs:
        await sharded.until(job["id"], "completed")
    for tracker in sharded.trackers:
        await tracker.book.writes.flush()
    stats = (await sharded.client.get("/queue/status")).json()
    assert (stats["completedJobs"], stats["queuedJobs"], stats["processingJobs"]) == (3, 0, 0)
    models = {m["id"]: m for m in (await sharded.client.get("/models")).json()["models"]}
    assert (models[A]["replicas"], models[B]["replicas"]) == (1, 1)  # each from its shard
    assert models["tiny-flux"]["served"] is False
    text = (await sharded.client.get("/metrics")).text
    completed = {
        (s.labels["model"], s.labels["shard"]): s.value
        for family in text_string_to_metric_families(text) if family.name == "imagegen_jobs"
        for s in family.samples
        if s.name == "imagegen_jobs_total" and s.labels["status"] == "completed"
    }
    assert completed == {(A, "0"): 1.0, (B, "1"): 2.0}


async def test_a_restarted_shard_resumes_its_own_jobs_and_leaves_the_others(
        registry: Registry, settings: Settings) -> None:
    """A shard's start must not fail (or run) another shard's unfinished jobs: before
    shards, a tracker failed every stored job of a model it did not serve."""
    store = MemoryStore()
    first = Sharded(registry, settings, store)
    for replicas in first.replicas:
        replicas.hold = asyncio.Event()
    async with first.client:
        a, b = await first.submit(A), await first.submit(B)
        a2, b2 = await first.submit(A, seed=8), await first.submit(B, seed=8)
        for job in (a, b):
            await first.until(job["id"], "processing")
    await first.close()  # both shards stop: two running and two queued jobs stored

    again = Sharded(registry, settings, store)
    await again.trackers[1].start()  # shard 1 alone, as after losing its actor
    async with again.client:
        for job in (b, b2):
            await again.until(job["id"], "completed")
        assert {task.job_id for _, task in again.replicas[1].calls} == {b["id"], b2["id"]}
        record = json.loads(store.load(a["id"]) or "{}")
        assert record["status"] == "processing", record  # still shard 0's to resume
        await again.trackers[0].start()
        for job in (a, a2):
            await again.until(job["id"], "completed")
    await again.close()


async def test_a_misrouted_call_is_told_to_retry_and_the_fallback_finds_the_owner(
        sharded) -> None:
    """What a call that reaches the wrong shard gets (an ingress of the previous
    deployment, or the ingress's fallback when the store could not name the model): a
    retryable 503, never a wrong 400 or 409, and asking each shard reaches the owner."""
    sharded.replicas[1].hold = asyncio.Event()
    running = await sharded.submit(B)
    queued = await sharded.submit(B, seed=8)
    await sharded.until(running["id"], "processing")
    shard0 = sharded.trackers[0]
    with pytest.raises(NotThisShard):
        await shard0.cancel(queued["id"])
    with pytest.raises(NotThisShard):
        await anext(aiter(shard0.watch(queued["id"])))
    sub = submission(sharded.registry, sharded.settings)
    (refused,) = await shard0.submit_many([dataclasses.replace(sub, model=B)])
    assert isinstance(refused, NotThisShard) and refused.retry_after_s == 2
    trackers = Trackers(sharded.counted, SHARDS)
    answer = await trackers.first(trackers.all, lambda t: t.cancel(queued["id"], OPEN))
    assert answer["status"] == "cancelled" and [c.calls["cancel"] for c in sharded.counted] \
        == [1, 1]
    sharded.replicas[1].hold.set()
    await sharded.until(running["id"], "completed")


class Restarting(CountedTracker):
    """A shard whose actor is being replaced: every call fails as the client's retries
    run out (after `delay_s`)."""

    def __init__(self, tracker: JobsBackend, delay_s: float) -> None:
        super().__init__(tracker)
        self.delay_s = delay_s

    async def models(self, caller: Caller = OPEN) -> dict[str, Any]:
        await asyncio.sleep(self.delay_s)
        raise ServiceUnavailable("The job tracker is restarting; retry shortly")

    async def metrics_text(self, caller: Caller = OPEN) -> bytes:
        return await self.models(caller)  # type: ignore[return-value]


async def test_models_and_metrics_answer_at_once_while_a_shard_restarts(sharded) -> None:
    await sharded.until((await sharded.submit(A))["id"], "completed")
    down = Restarting(sharded.trackers[1], delay_s=30)
    trackers = Trackers([sharded.counted[0], down], SHARDS)
    loop = asyncio.get_running_loop()
    began = loop.time()
    models = {m["id"]: m for m in (await trackers.models(OPEN))["models"]}
    text = (await trackers.metrics_text(OPEN)).decode()
    assert loop.time() - began < 5  # not the restarting shard's 30 s
    assert (models[A]["replicas"], models[B]["served"], models[B]["replicas"]) == (1, True, 0)
    shards = {s.labels["shard"] for f in text_string_to_metric_families(text)
              for s in f.samples if "shard" in s.labels}
    assert shards == {"0"}
    with pytest.raises(ServiceUnavailable):  # the primary's failure is the answer's
        await Trackers([Restarting(sharded.trackers[0], delay_s=0), sharded.counted[1]],
                       SHARDS).models(OPEN)


async def test_with_the_store_unreadable_a_cancel_and_a_stream_find_the_jobs_shard(
        sharded) -> None:
    """The ingress cannot read the store (so cannot tell a job's model): each shard is
    asked in turn, the one running the job answers."""
    sharded.replicas[1].hold = asyncio.Event()
    running = await sharded.submit(B)
    queued = await sharded.submit(B, seed=8)
    await sharded.until(running["id"], "processing")
    blind = DirectReads(sharded.counted, SHARDS, StoreReads(DownStore(MemoryStore())),
                        sharded.settings)
    assert (await blind.cancel(queued["id"], OPEN))["status"] == "cancelled"
    asyncio.get_running_loop().call_later(0.1, sharded.replicas[1].hold.set)
    records = [json.loads(r) async for r in blind.watch(running["id"], OPEN)]
    assert records[0]["status"] == "processing" and records[-1]["status"] == "completed"
    assert [c.calls["watch"] for c in sharded.counted] == [1, 1]  # shard 0 said: not mine


async def test_two_shards_on_one_real_redis_take_concurrent_submits_and_cancels_exactly(
        registry: Registry, settings: Settings) -> None:
    """As two tracker actors run: each its own Redis connections and store threads, on one
    database, writing the same indexes, totals and idempotency hash at once."""
    redis_store("shards").close()  # an empty database (or, without a server, a skip)
    stores: list[RedisStore] = []

    def calls() -> StoreCalls:
        stores.append(RedisStore(REDIS_URL, namespace="shards"))
        return StoreIO(stores[-1])

    s = Sharded(registry, settings, RedisStore(REDIS_URL, namespace="shards"), calls)
    for replicas in s.replicas:
        replicas.hold = asyncio.Event()  # runs park after their first step until released
    for tracker in s.trackers:
        await tracker.start()
    try:
        async with s.client:
            async def keyed(model: str, key: str) -> dict[str, Any]:
                resp = await s.client.post("/generate/text2img", headers={
                    "Idempotency-Key": key}, json=SMALL | {"model": model})
                assert resp.status_code == 202, resp.text
                return dict(resp.json())

            async def cancel(job_id: str) -> int:
                return (await s.client.post(f"/jobs/{job_id}/cancel")).status_code

            async def release() -> None:
                for replicas in s.replicas:
                    assert replicas.hold is not None
                    replicas.hold.set()

            first = await asyncio.gather(*(s.submit(m, seed=i) for i in range(10)
                                           for m in (A, B)))
            # Submits (some twice with one key) and cancels of queued or parked jobs at once.
            more = [s.submit(m, seed=i) for i in range(10, 20) for m in (A, B)]
            twice = [keyed(m, f"{m}-{i}") for i in range(4) for m in (A, B) for _ in (0, 1)]
            early = [j["id"] for j in first[::2]]
            *later, codes = await asyncio.gather(*more, *twice,
                                                 asyncio.gather(*map(cancel, early)))
            assert codes == [200] * len(early)
            jobs = [*first, *later]
            ids = {j["id"] for j in jobs}
            assert len(ids) == 40 + 8  # each key's two submits are one job
            cancelled = set(early)
            # Cancels racing the runs' release: each either cancels or finds the job done.
            racing = [j["id"] for j in later[::3]]
            _, codes = await asyncio.gather(release(), asyncio.gather(*map(cancel, racing)))
            assert set(codes) <= {200, 409}
            cancelled |= {j for j, code in zip(racing, codes, strict=True) if code == 200}
            for job_id in ids:
                await s.until(job_id, "cancelled" if job_id in cancelled else "completed")
            done = sorted(ids - cancelled)[:5]
            assert await asyncio.gather(*map(cancel, done)) == [409] * len(done)
            status = (await s.client.get("/queue/status")).json()
    finally:
        await s.close()  # each shard's writes flushed

    models = {j["id"]: j["request"]["model"] for j in jobs}
    for shard, model in enumerate((A, B)):
        assert {t.job_id for _, t in s.replicas[shard].calls} <= {
            j for j, m in models.items() if m == model}
    fresh = RedisStore(REDIS_URL, namespace="shards")
    stored = {j: json.loads(fresh.load(j) or "null")["status"] for j in ids}
    assert stored == {j: "cancelled" if j in cancelled else "completed" for j in ids}
    counts: dict[str, int] = {}
    for owner in fresh.totals().values():
        for name, n in owner.counts.items():
            counts[name] = counts.get(name, 0) + n
    assert {k: v for k, v in counts.items() if v} == {
        "cancelled": len(cancelled), "completed": len(ids) - len(cancelled)}
    assert (status["cancelledJobs"], status["completedJobs"], status["queuedJobs"]) == (
        len(cancelled), len(ids) - len(cancelled), 0)
    assert fresh.unfinished() == []
    for store in [fresh, *stores]:
        store.close()
