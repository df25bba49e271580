"""Dispatch over a model pool: the pool's capacity is shared, its models take turns, only
one model's jobs batch together, and a job waiting for its model's load says so."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from serve_app.api.wire import ModelList
from serve_app.errors import JobNotCancellable, ReplicaLost
from serve_app.messages import GenerationTask, PoolReport, ReplicaEvent, Started
from serve_app.registry import Registry, parse_registry
from serve_app.settings import Settings
from tests.support.fakes import fake_image, finished
from tests.support.trackers import record, settle, submission

POOLED = ("a", "b", "c")
SERVED = frozenset({*POOLED, "solo"})


def pool_registry(max_replicas: int = 1, max_batch_size: int = 1) -> Registry:
    def model(model_id: str, **over: Any) -> dict[str, Any]:
        return {"id": model_id, "name": model_id, "description": "d", "source": "tiny"} | over
    return parse_registry({
        "pools": [{"id": "shared", "max_models_per_replica": 2,
                   "scaling": {"min_replicas": 0, "max_replicas": max_replicas,
                               "max_batch_size": max_batch_size, "max_batch_wait_s": 0}}],
        "models": [model(m, seed=i, pool="shared") for i, m in enumerate(POOLED)]
        + [model("solo", scaling={"max_replicas": 1})]})


@dataclass
class PoolReplicasFake:
    """One pool replica holding up to 2 models (LRU) and one solo replica. Every call waits
    for the test's `release()`, then reports like a real pool replica and finishes."""

    calls: list[tuple[str, list[str]]] = field(default_factory=list)
    gates: list[asyncio.Event] = field(default_factory=list)
    ended: list[bool] = field(default_factory=list)  # per call: its stream is over
    held: list[str] = field(default_factory=list)
    lose: int = 0  # the next N pool calls die after their Started, like a killed replica

    async def run(self, model_id: str, tasks: list[GenerationTask]
                  ) -> AsyncGenerator[ReplicaEvent, None]:
        gate = asyncio.Event()
        index = len(self.calls)
        self.calls.append((model_id, [t.job_id for t in tasks]))
        self.gates.append(gate)
        self.ended.append(False)
        try:
            async for event in self._answer(model_id, tasks, gate):
                yield event
        finally:
            self.ended[index] = True

    async def _answer(self, model_id: str, tasks: list[GenerationTask], gate: asyncio.Event
                      ) -> AsyncGenerator[ReplicaEvent, None]:
        await gate.wait()
        if model_id == "solo":
            yield Started(replica="solo#1")
        else:
            fresh, evicted = model_id not in self.held, ()
            if fresh:
                self.held.append(model_id)
                if len(self.held) > 2:
                    evicted = (self.held.pop(0),)
            else:
                self.held.remove(model_id)
                self.held.append(model_id)
            yield Started(replica=f"{model_id}#r1", pool=PoolReport(
                loaded=tuple(self.held), load_s=0.25 if fresh else None, evicted=evicted))
            if self.lose > 0:
                self.lose -= 1
                self.held.clear()
                raise ReplicaLost("fake pool replica killed")
        for task in tasks:
            yield finished(task, [fake_image(task, s) for s in task.seeds], model=model_id)

    async def release(self, index: int) -> None:
        self.gates[index].set()
        await settle()

    @property
    def out(self) -> int:
        return self.ended.count(False)

    def open_calls(self) -> list[tuple[str, list[str]]]:
        return [c for c, ended in zip(self.calls, self.ended, strict=True) if not ended]

    async def replica_states(self) -> dict[str, dict[str, int]]:
        return {m: {"ready": 1, "starting": 0} for m in SERVED}


def make(new_tracker: Any, registry: Registry, settings: Settings, **over: Any) -> Any:
    replicas = PoolReplicasFake()
    tracker = new_tracker(replicas, registry=registry, served=SERVED,
                          settings=settings.model_copy(update=over))
    return tracker, replicas


async def submit(tracker: Any, registry: Registry, settings: Settings, model: str,
                 **body: Any) -> str:
    sub = submission(registry, settings, served=SERVED, model=model, **body)
    return str((await tracker.submit(sub))["id"])


@pytest.mark.anyio
async def test_a_popular_model_cannot_starve_the_pools_others(new_tracker, settings) -> None:
    registry = pool_registry()
    tracker, replicas = make(new_tracker, registry, settings)
    for _ in range(6):
        await submit(tracker, registry, settings, "a")
    await submit(tracker, registry, settings, "b")
    await submit(tracker, registry, settings, "c")
    await settle()
    for i in range(8):
        assert replicas.out == 1  # one replica: one call out in the whole pool
        await replicas.release(i)
    # b and c, queued behind five jobs of a, each get the next turn.
    assert [m for m, _ in replicas.calls] == ["a", "b", "c", "a", "a", "a", "a", "a"]
    assert tracker.audit() == []


@pytest.mark.anyio
async def test_the_pool_shares_max_concurrent_jobs_and_other_models_keep_their_own(
        new_tracker, settings) -> None:
    registry = pool_registry(max_replicas=3)
    tracker, replicas = make(new_tracker, registry, settings, max_concurrent_jobs=2)
    for model in ("a", "b", "c", "a"):
        await submit(tracker, registry, settings, model)
    await submit(tracker, registry, settings, "solo")
    await settle()
    pooled_out = [m for m, _ in replicas.calls if m != "solo"]
    assert pooled_out == ["a", "b"]  # 3 replicas, but 2 jobs out per pool
    assert ("solo", [replicas.calls[-1][1][0]]) in replicas.calls
    await replicas.release(0)
    assert [m for m, _ in replicas.calls if m != "solo"] == ["a", "b", "c"]
    assert tracker.audit() == []


@pytest.mark.anyio
async def test_only_one_models_jobs_share_a_call(new_tracker, settings) -> None:
    registry = pool_registry(max_batch_size=4)
    tracker, replicas = make(new_tracker, registry, settings)
    await submit(tracker, registry, settings, "c")  # occupies the replica
    for model in ("a", "b", "a", "b", "a"):
        await submit(tracker, registry, settings, model)
    await settle()
    await replicas.release(0)
    await replicas.release(1)
    assert [(m, len(ids)) for m, ids in replicas.calls] == [("c", 1), ("a", 3), ("b", 2)]


@pytest.mark.anyio
async def test_a_job_waiting_for_its_models_load_says_so_and_loads_are_counted(
        new_tracker, settings) -> None:
    registry = pool_registry(max_replicas=2)
    tracker, replicas = make(new_tracker, registry, settings)
    first = await submit(tracker, registry, settings, "a")
    await settle()
    assert (await record(tracker, first))["phase"] == "loading_model"
    await replicas.release(0)
    assert (await record(tracker, first))["status"] == "completed"
    again = await submit(tracker, registry, settings, "a")
    other = await submit(tracker, registry, settings, "b")
    await settle()
    assert (await record(tracker, again))["phase"] == "waiting_for_replica"  # a is loaded
    assert (await record(tracker, other))["phase"] == "loading_model"
    listed = await tracker.models()
    ModelList.model_validate(listed)  # the OpenAPI schema declares the pool fields
    models = {m["id"]: m for m in listed["models"]}
    assert (models["a"]["pool"], models["a"]["loadedReplicas"]) == ("shared", 1)
    assert models["b"]["loadedReplicas"] == 0 and models["b"]["loaded"] is False
    await replicas.release(1)
    await replicas.release(2)
    third = await submit(tracker, registry, settings, "c")  # evicts a on the fake's replica
    await settle()
    await replicas.release(3)
    assert (await record(tracker, third))["status"] == "completed"
    text = (await tracker.metrics_text()).decode()
    assert 'imagegen_pool_model_loads_total{model="a",pool="shared"} 1.0' in text
    assert 'imagegen_pool_model_hits_total{model="a",pool="shared"} 1.0' in text
    assert 'imagegen_pool_model_loads_total{model="c",pool="shared"} 1.0' in text
    assert 'imagegen_pool_model_evictions_total{model="a",pool="shared"} 1.0' in text
    assert 'imagegen_pool_model_load_seconds_count{model="b",pool="shared"} 1.0' in text
    assert 'imagegen_pool_model_replicas{model="a",pool="shared"} 0.0' in text
    assert 'imagegen_pool_model_replicas{model="c",pool="shared"} 1.0' in text


@pytest.mark.anyio
async def test_a_replica_found_dead_holds_no_model_any_more(new_tracker, settings) -> None:
    registry = pool_registry()
    tracker, replicas = make(new_tracker, registry, settings)
    await submit(tracker, registry, settings, "a")
    await settle()
    await replicas.release(0)
    models = {m["id"]: m for m in (await tracker.models())["models"]}
    assert models["a"]["loadedReplicas"] == 1
    replicas.lose = 1
    retried = await submit(tracker, registry, settings, "a")
    await settle()
    await replicas.release(1)  # started, then the replica died: the job runs again
    models = {m["id"]: m for m in (await tracker.models())["models"]}
    assert models["a"]["loadedReplicas"] == 0
    assert (await record(tracker, retried))["phase"] == "loading_model"
    await replicas.release(2)
    assert (await record(tracker, retried))["status"] == "completed"


OPS = st.lists(st.one_of(
    st.tuples(st.just("submit"), st.sampled_from([*POOLED, "solo"]),
              st.sampled_from(["low", "normal", "high"])),
    st.tuples(st.just("release"), st.integers(0, 50), st.none()),
    st.tuples(st.just("cancel"), st.integers(0, 50), st.none()),
), max_size=40)


@given(ops=OPS, max_replicas=st.integers(1, 3), max_jobs=st.integers(1, 4),
       batch=st.integers(1, 3))
@hsettings(max_examples=60, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_interleavings_keep_the_pools_capacity_and_every_job_ends(
        settings: Settings, ops: list[tuple[str, Any, Any]], max_replicas: int,
        max_jobs: int, batch: int) -> None:
    from tests.support.trackers import make_tracker

    registry = pool_registry(max_replicas=max_replicas, max_batch_size=batch)
    over = settings.model_copy(update={"max_concurrent_jobs": max_jobs})

    async def scenario() -> None:
        replicas = PoolReplicasFake()
        tracker = make_tracker(registry, over, replicas, served=SERVED)
        ids: list[str] = []
        try:
            for op, arg, priority in ops:
                if op == "submit":
                    sub = submission(registry, over, served=SERVED, model=arg,
                                     priority=priority)
                    ids.append(str((await tracker.submit(sub))["id"]))
                elif op == "release" and replicas.gates:
                    replicas.gates[arg % len(replicas.gates)].set()
                elif op == "cancel" and ids:
                    with contextlib.suppress(JobNotCancellable):
                        await tracker.cancel(ids[arg % len(ids)])
                await settle()
                assert tracker.audit() == []
                pooled = [c for c in replicas.open_calls() if c[0] != "solo"]
                assert len(pooled) <= max_replicas
                assert sum(len(j) for _, j in pooled) <= max_jobs
                assert all(len(j) <= batch for _, j in pooled)
            for _ in range(200):  # every replica answers from now on
                for gate in replicas.gates:
                    gate.set()
                await settle()
                records = [await record(tracker, i) for i in ids]
                if all(r["status"] in ("completed", "cancelled") for r in records):
                    break
            assert all(r["status"] in ("completed", "cancelled") for r in records)
            assert tracker.audit() == []
        finally:
            await tracker.close()

    asyncio.run(scenario())
