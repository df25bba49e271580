"""Lane: what leaves the queue for a replica, with whom, and when it waits for companions.

A lane only answers; `Driven` plays Dispatch's part (the jobs leave the queue, the call is
out until released), so each test reads as the tracker uses a lane.
"""

from __future__ import annotations

import asyncio

import pytest

from serve_app.jobs.job import Job
from serve_app.jobs.lanes import Lane
from serve_app.jobs.queues import JobQueues
from serve_app.messages import GenerationTask, JobType, Priority
from serve_app.model_runtime import Scaling
from tests.support.fakes import FakeClock
from tests.support.generation import make_task
from tests.support.virtual_time import VIRTUAL_TIME

# Virtual time: a hold's timer (50 ms) and a test's sleep past it (80 ms) fire in that
# order, exactly, however loaded the machine is.
pytestmark = [pytest.mark.anyio, VIRTUAL_TIME]


def job(job_id: str, *, mode: JobType = JobType.TEXT2IMG, width: int = 64,
        priority: str = "normal", created_at_ms: int = 0) -> Job:
    task = make_task(job_id=job_id, mode=mode, prompt=job_id, width=width, steps=20, seed=1)
    return Job(id=job_id, type=mode, model="m", request={}, created_at_ms=created_at_ms,
               priority=Priority(priority), task=task)


class Driven:
    """A lane and the calls it let out."""

    def __init__(self, lane: Lane, queues: JobQueues) -> None:
        self.lane = lane
        self.queues = queues
        self.out: list[list[Job]] = []

    def admit(self) -> list[Job] | None:
        batch = self.lane.next_call(self.calls, self.jobs)
        if batch is not None:
            for j in batch:
                self.queues.remove(j.id)
            self.out.append(batch)
        return batch

    def release(self, batch: list[Job]) -> None:
        self.out.remove(batch)

    @property
    def calls(self) -> int:
        return len(self.out)

    @property
    def jobs(self) -> int:
        return sum(len(b) for b in self.out)

    def observe(self, tasks: list[GenerationTask], elapsed_ms: float) -> None:
        self.lane.observe(tasks, elapsed_ms)

    def close(self) -> None:
        self.lane.close()


def lane(queues: JobQueues, *, replicas: int = 1, batch: int = 4, max_jobs: int = 100,
         wait_s: float = 0.0, clock: FakeClock | None = None,
         on_hold_over: list[str] | None = None) -> Driven:
    scaling = Scaling(max_replicas=replicas, max_batch_size=batch, max_batch_wait_s=wait_s)
    over = on_hold_over if on_hold_over is not None else []
    return Driven(Lane("m", scaling, queues=queues, max_jobs=max_jobs,
                       clock=clock or FakeClock(0), on_hold_over=over.append), queues)


def knows_the_cost(one: Driven) -> None:
    """A lone 64 px job ran 2 s: the next may wait 5% of that, capped at 50 ms."""
    task = job("done").task
    assert task is not None
    one.observe([task], 2000)


def queued(*jobs: Job) -> JobQueues:
    queues = JobQueues(["m"])
    for j in jobs:
        queues.push(j)
    return queues


def ids(batch: list[Job] | None) -> list[str] | None:
    return None if batch is None else [j.id for j in batch]


async def test_a_call_takes_the_lead_and_its_compatible_jobs_in_queue_order() -> None:
    queues = queued(job("a"), job("big", width=128), job("b"), job("c", priority="high"),
                    job("d"), job("e"), job("paint", mode=JobType.INPAINT))
    one = lane(queues, replicas=3, batch=3)
    assert ids(one.admit()) == ["c", "a", "b"]  # the high one leads
    assert ids(one.admit()) == ["big"]  # nothing else is its size
    assert ids(one.admit()) == ["d", "e"]
    assert one.admit() is None  # three calls out: one per replica
    assert (one.calls, one.jobs, len(queues)) == (3, 6, 1)


async def test_capacity_comes_back_when_a_call_is_released() -> None:
    queues = queued(*(job(str(i), mode=JobType.IMG2IMG) for i in range(3)))
    one = lane(queues, replicas=2, batch=4)
    first = one.admit()
    assert ids(first) == ["0"]  # img2img carries its own input image: it runs alone
    assert ids(one.admit()) == ["1"]
    assert one.admit() is None
    assert first is not None
    one.release(first)
    assert ids(one.admit()) == ["2"]
    assert one.lane.capacity == 8


async def test_max_jobs_bounds_the_batch_and_the_calls() -> None:
    queues = queued(*(job(str(i)) for i in range(5)))
    one = lane(queues, replicas=4, batch=4, max_jobs=3)
    assert ids(one.admit()) == ["0", "1", "2"]
    assert one.admit() is None  # three jobs out: the limit, though replicas are free


async def test_a_lone_lead_at_the_only_free_replica_waits_then_goes() -> None:
    clock, over = FakeClock(0), []
    queues = queued(job("warm"))
    one = lane(queues, batch=4, wait_s=0.05, clock=clock, on_hold_over=over)
    warm = one.admit()
    assert warm is not None
    knows_the_cost(one)
    one.release(warm)

    queues.push(job("a"))
    assert one.admit() is None and over == []  # held for companions
    queues.push(job("b"))
    assert one.admit() is None  # still within its wait, and the batch is not full
    await asyncio.sleep(0.08)
    assert over == ["m"]  # the timer asked for another admit
    assert ids(one.admit()) == ["a", "b"]


async def test_no_wait_for_a_full_batch_an_old_lead_or_with_replicas_to_spare() -> None:
    clock = FakeClock(0)
    queues = JobQueues(["m"])
    two = lane(queues, replicas=2, batch=2, wait_s=0.05, clock=clock)
    knows_the_cost(two)
    queues.push(job("a"))
    assert ids(two.admit()) == ["a"]  # the other replica is free too: no point waiting
    queues.push(job("b"))
    queues.push(job("c"))
    assert ids(two.admit()) == ["b", "c"]  # a full batch

    one = lane(queues, replicas=1, batch=2, wait_s=0.05, clock=clock)
    knows_the_cost(one)
    queues.push(job("old", created_at_ms=0))
    clock.advance(60)  # it has been queued 60 ms: past its 50 ms
    assert ids(one.admit()) == ["old"]


async def test_a_held_batch_that_fills_up_leaves_at_once_and_its_timer_is_off() -> None:
    over: list[str] = []
    queues = JobQueues(["m"])
    one = lane(queues, batch=2, wait_s=0.05, on_hold_over=over)
    knows_the_cost(one)
    queues.push(job("a"))
    assert one.admit() is None
    queues.push(job("b"))
    assert ids(one.admit()) == ["a", "b"]
    await asyncio.sleep(0.08)
    assert over == []  # no stray wake-up for a hold that is over


async def test_a_new_lead_replaces_the_held_one_with_its_own_wait() -> None:
    clock, over = FakeClock(0), []
    queues = JobQueues(["m"])
    one = lane(queues, batch=4, wait_s=0.05, clock=clock, on_hold_over=over)
    knows_the_cost(one)
    queues.push(job("low", priority="low"))
    assert one.admit() is None
    first = one.lane._held
    clock.advance(30)
    queues.push(job("high", priority="high", created_at_ms=30))
    assert one.admit() is None  # "high" leads now, held 50 ms from its own submission
    assert first is not None and first.timer.cancelled()
    assert one.lane._held is not None and one.lane._held.job_id == "high"
    await asyncio.sleep(0.08)
    assert over == ["m"]  # one wake-up: the new hold's
    assert ids(one.admit()) == ["high", "low"]


async def test_close_cancels_a_hold() -> None:
    over: list[str] = []
    queues = JobQueues(["m"])
    one = lane(queues, batch=4, wait_s=0.05, on_hold_over=over)
    knows_the_cost(one)
    queues.push(job("a"))
    assert one.admit() is None
    one.close()
    await asyncio.sleep(0.08)
    assert over == []
