"""One test per defect the dispatch-core review found; each failed on the tracker before the
dispatch rewrite. Time-dependent ones run on a virtual-time loop (tests/support/virtual_time.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence

import pytest

from serve_app.errors import JobNotCancellable, ReplicaLost, StoreUnavailable
from serve_app.jobs.codec import loads
from serve_app.jobs.job import Phase
from serve_app.jobs.persistence import InlineStoreCalls, StoreIO
from serve_app.messages import (
    Finished,
    GenerationResult,
    GenerationTask,
    ReplicaEvent,
    Started,
)
from serve_app.stores.contract import JobRow
from serve_app.stores.memory import MemoryStore
from tests.support.fakes import FakeClock, FakeReplicas, finished, memory_store
from tests.support.stores import FlakyStore
from tests.support.trackers import batching_registry, make_tracker, record, settle, submission
from tests.support.virtual_time import run_virtual


class Unplaceable(FakeReplicas):
    """A model whose replica never starts: calls wait in Serve's router forever."""

    async def run(self, model_id: str, tasks: list[GenerationTask]
                  ) -> AsyncIterator[ReplicaEvent]:
        self.batches.append([t.job_id for t in tasks])
        try:
            await asyncio.Event().wait()
            yield Started("never")  # pragma: no cover
        finally:
            self.closed.extend(t.job_id for t in tasks)


def test_1_a_job_that_never_gets_a_replica_times_out_and_frees_the_model(
        registry, settings) -> None:
    async def main() -> None:
        replicas = Unplaceable()
        patient = settings.model_copy(update={"job_timeout_ms": 30_000})
        tracker = make_tracker(registry, patient, replicas, clock=FakeClock())
        stuck = await tracker.submit(submission(registry, settings))
        other = await tracker.submit(submission(registry, settings, model="tiny-sd-inpaint"))
        await asyncio.sleep(29)
        assert (await record(tracker, stuck["id"]))["status"] == "queued"
        await asyncio.sleep(2)
        failed = await record(tracker, stuck["id"])
        assert failed["status"] == "failed"
        assert "timed out after 30 s waiting for a replica (JOB_TIMEOUT)" in failed["error"]
        assert stuck["id"] in replicas.closed  # the call left Serve's queue
        assert (await record(tracker, other["id"]))["status"] == "failed"  # same fate, alone
        # The model's slot is free again: the next job gets a call of its own.
        nxt = await tracker.submit(submission(registry, settings))
        await settle()
        assert replicas.batches[-1] == [nxt["id"]]
        assert tracker.audit() == []
        await tracker.close()

    run_virtual(main())


@pytest.mark.anyio
async def test_2_cancelling_before_the_call_ran_a_step_leaks_no_slot(registry, settings) -> None:
    replicas = FakeReplicas()
    tracker = make_tracker(registry, settings, replicas, clock=FakeClock())
    for _ in range(3):  # more than the model's one replica slot
        job = await tracker.submit(submission(registry, settings))
        await tracker.cancel(job["id"])  # its call task exists, and has not run yet
    assert tracker.audit() == []
    later = await tracker.submit(submission(registry, settings))
    await settle()
    assert (await record(tracker, later["id"]))["status"] == "completed"
    assert tracker.audit() == [] and tracker.counts()["cancelledJobs"] == 3
    await tracker.close()


def test_3_a_store_error_while_jobs_settle_skips_nothing(registry, settings) -> None:
    async def main() -> None:
        store = FlakyStore()
        replicas = FakeReplicas()
        tracker = make_tracker(registry, settings, replicas, store=InlineStoreCalls(store),
                               clock=FakeClock())
        job = await tracker.submit(submission(registry, settings))
        store.failures = 3  # the writes of the run and its cleanup fail three times
        await settle()
        assert (await record(tracker, job["id"]))["status"] == "completed"
        assert tracker.audit() == [] and store.failures > 0
        await asyncio.sleep(5)  # retries with backoff until the store takes the writes
        assert store.failures == 0
        nxt = await tracker.submit(submission(registry, settings))  # the slot came back
        await settle()
        assert (await record(tracker, nxt["id"]))["status"] == "completed"
        for job_id in (job["id"], nxt["id"]):
            stored = store.load(job_id)
            assert stored is not None and loads(stored).status.value == "completed"
        await tracker.close()

    run_virtual(main())


class FinishesOneOfTwo(FakeReplicas):
    """A lone call waits for `hold`, then finishes; a call of two finishes its first job
    and keeps working on the second."""

    async def run(self, model_id, tasks):  # type: ignore[no-untyped-def]
        self.batches.append([t.job_id for t in tasks])
        try:
            async for event in self._events(tasks):
                yield event
        finally:
            self.closed.extend(t.job_id for t in tasks)

    async def _events(self, tasks):  # type: ignore[no-untyped-def]
        yield Started("r")
        if len(tasks) == 1:
            assert self.hold is not None
            await self.hold.wait()
        first = tasks[0]
        yield finished(first, [b"x"])
        if len(tasks) > 1:
            await asyncio.Event().wait()


@pytest.mark.anyio
async def test_4_cancelling_a_job_that_finished_inside_a_running_batch_is_409(
        registry, settings) -> None:
    registry = batching_registry(registry, 2)
    replicas = FinishesOneOfTwo(hold=asyncio.Event())
    tracker = make_tracker(registry, settings, replicas, clock=FakeClock())
    await tracker.submit(submission(registry, settings, seed=9))
    await settle()
    a = await tracker.submit(submission(registry, settings, seed=1))
    b = await tracker.submit(submission(registry, settings, seed=2))
    replicas.hold.set()  # type: ignore[union-attr]
    await settle()
    assert replicas.batches[-1] == [a["id"], b["id"]]
    assert [(await record(tracker, j["id"]))["status"] for j in (a, b)] == [
        "completed", "processing"]
    with pytest.raises(JobNotCancellable, match="already completed"):
        await tracker.cancel(a["id"])
    assert (await tracker.cancel(b["id"]))["status"] == "cancelled"
    await settle()
    assert tracker.audit() == [] and b["id"] in replicas.closed
    await tracker.close()


def test_6_a_lost_attempt_before_start_is_a_stored_transition(registry, settings) -> None:
    class LostInRouting(FakeReplicas):
        async def run(self, model_id, tasks):  # type: ignore[no-untyped-def]
            raise ReplicaLost("routing failed")
            yield  # pragma: no cover

    async def main() -> None:
        store = MemoryStore()
        tracker = make_tracker(registry, settings.model_copy(update={"max_attempts": 5}),
                               LostInRouting(), store=InlineStoreCalls(store), clock=FakeClock())
        job = await tracker.submit(submission(registry, settings))
        await settle()
        await tracker.book.writes.flush()
        stored = loads(store.load(job["id"]) or "")
        assert stored.status.value == "failed" and stored.attempts == 5
        assert "after 5 attempt(s): routing failed" in (stored.error or "")
        await tracker.close()

        # One loss, then a restart: the attempt and its phase survive in the store.
        class LoseOnce(FakeReplicas):
            lost = False

            async def run(self, model_id, tasks):  # type: ignore[no-untyped-def]
                if not self.lost:
                    self.lost = True
                    raise ReplicaLost("replica vanished")
                await asyncio.Event().wait()
                yield  # pragma: no cover

        store2 = MemoryStore()
        first = make_tracker(registry, settings, LoseOnce(), store=InlineStoreCalls(store2),
                             clock=FakeClock())
        j = await first.submit(submission(registry, settings))
        await settle()
        await first.book.writes.flush()
        saved = loads(store2.load(j["id"]) or "")
        assert (saved.attempts, saved.retry_reason) == (1, "replica vanished")
        assert saved.phase is Phase.LOADING_MODEL  # in its next call, waiting for a replica
        await first.close()
        after = make_tracker(registry, settings, FakeReplicas(), store=InlineStoreCalls(store2),
                             clock=FakeClock())
        await after.start()
        await asyncio.sleep(0.01)
        done = await record(after, j["id"])
        assert done["status"] == "completed" and done["attempts"] == 2
        await after.close()

    run_virtual(main())


@pytest.mark.anyio
async def test_7_a_result_for_a_job_the_call_does_not_carry_completes_nothing(
        registry, settings) -> None:
    class Confused(FakeReplicas):
        async def run(self, model_id, tasks):  # type: ignore[no-untyped-def]
            yield Started("r")
            yield Finished(GenerationResult([b"x"], [1], "image/png", job_id="job_0_other"))

    tracker = make_tracker(registry, settings, Confused(), clock=FakeClock())
    job = await tracker.submit(submission(registry, settings))
    await settle()
    rec = await record(tracker, job["id"])
    # Not completed with another job's image: its call ended without its result.
    assert rec["status"] != "completed" and "result" not in rec
    await tracker.close()


class SlowStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.slow = threading.Event()

    def save_many(self, rows: Sequence[JobRow], *, durable: bool = False) -> None:
        if self.slow.is_set():
            time.sleep(1.0)
        super().save_many(rows, durable=durable)


@pytest.mark.anyio
async def test_8_a_slow_store_costs_a_submit_a_503_and_never_freezes_the_loop(
        registry, settings) -> None:
    store = SlowStore()
    calls = StoreIO(store, timeout_s=0.2)
    tracker = make_tracker(registry, settings, FakeReplicas(), store=calls, clock=FakeClock())
    ok = await tracker.submit(submission(registry, settings))
    store.slow.set()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    beat = asyncio.create_task(ticker())
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as refused:
        await tracker.submit(submission(registry, settings))
    took = time.monotonic() - started
    beat.cancel()
    assert refused.value.retry_after_s >= 1 and took < 0.6
    assert ticks >= 5  # the loop kept running while the store call hung
    store.slow.clear()
    await asyncio.sleep(1.0)  # the hung write lands in its thread, then the failed record
    await tracker.book.writes.flush()
    assert (await record(tracker, ok["id"]))["status"] == "completed"
    status = tracker.counts()
    assert (status["queuedJobs"], status["failedJobs"]) == (0, 1)  # never queued
    (refused_row,) = [r for r in store._rows.values() if r.id != ok["id"]]
    assert refused_row.status == "failed" and "Not accepted" in refused_row.summary
    await tracker.close()
    calls.close()


@pytest.mark.anyio
async def test_10_a_cancel_retried_across_a_restart_answers_the_same(registry, settings) -> None:
    store = memory_store()
    before = make_tracker(registry, settings, FakeReplicas(hold=asyncio.Event()), store=store,
                          clock=FakeClock())
    await before.submit(submission(registry, settings))
    await settle()
    waiting = await before.submit(submission(registry, settings))
    first = await before.cancel(waiting["id"])
    await before.close()
    after = make_tracker(registry, settings, FakeReplicas(), store=store, clock=FakeClock())
    await after.start()
    assert await after.cancel(waiting["id"]) == first
    await after.close()
