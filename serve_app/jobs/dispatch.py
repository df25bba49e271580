"""Dispatch: the one owner of where an unfinished job is.
(Over ~300 lines: the four moves and their bookkeeping must stay in one owner.)

A live job is in exactly one place: its model's queue, or one replica call (waiting for a
replica, then running on it). Only this class moves it, and every move is one of four:

- `add`: into the queue (a new job, or one resumed after a restart);
- `_pump`: from the queue into a new call, as the model's `Lane` allows (a pool's models
  share their pool's capacity and take turns: `serve_app.jobs.pools`);
- `_back_to_queue`: out of a call whose replica was lost, for another attempt;
- `_settle`: out of wherever it is, for good (completed, failed, cancelled).

A call's capacity is derived, not counted: a model has as many calls out as its set of
calls holds, and a call leaves that set in its task's done callback, which asyncio runs
exactly once however the task ends (finished, failed, cancelled before its first step).
Every job still open in a call that ends is settled or re-queued there, by the call's
outcome. A call's deadline (JOB_TIMEOUT, from admission, and again from the replica's
start) is a loop timer that settles the call's jobs as timed out and cancels the call.

The job's state changes go through `JobBook.apply` (counted, saved, watched); what a replica
says comes back as `ReplicaEvent`s on the call's stream (`Replicas.run`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from serve_app.errors import BlobStoreUnavailable, ReplicaLost
from serve_app.jobs.book import JobBook
from serve_app.jobs.calls import Call, Limits, Observer, Outcome, Replicas, Unobserved
from serve_app.jobs.job import TIMED_OUT, Job, JobStatus, Phase
from serve_app.jobs.lanes import Lane
from serve_app.jobs.pools import PoolView
from serve_app.jobs.queues import JobQueues
from serve_app.jobs.results import describe_failure, gave_up, job_result, preview_of
from serve_app.messages import Finished, GenerationResult, Progress, Started

log = logging.getLogger(__name__)

Step = Callable[[Job], None]


@dataclass(eq=False)
class _Place:
    job: Job
    call: Call | None = None  # None: in its model's queue


@dataclass
class Dispatch:
    book: JobBook
    lanes: dict[str, Lane]
    queues: JobQueues
    replicas: Replicas
    limits: Limits
    clock: Callable[[], int]
    observer: Observer = field(default_factory=Unobserved)
    pools: PoolView = field(default_factory=lambda: PoolView({}))
    _places: dict[str, _Place] = field(default_factory=dict)
    _calls: dict[str, set[Call]] = field(default_factory=dict)
    _ready: dict[str, int] = field(default_factory=dict)
    _closing: bool = False

    def __post_init__(self) -> None:
        self._calls = {model: set() for model in self.lanes}

    # -- what the tracker asks -----------------------------------------------------------

    def live(self, job_id: str) -> Job | None:
        place = self._places.get(job_id)
        return place.job if place is not None else None

    def live_jobs(self) -> list[Job]:
        return [place.job for place in self._places.values()]

    def position(self, job: Job) -> int | None:
        """1-based place among the model's waiting jobs; 0 once in a call."""
        place = self._places.get(job.id)
        if place is None or job.status is not JobStatus.QUEUED:
            return None
        return 0 if place.call is not None else self.queues.position(job)

    @property
    def waiting(self) -> int:
        return len(self.queues)

    def add(self, job: Job) -> None:
        """Queue a live job (new, or resumed after a restart)."""
        self._places[job.id] = _Place(job)
        self.queues.push(job)
        self.pump(job.model)

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a live job wherever it is; None if it is not live. Cancelling the last
        open job of a call cancels the call, which interrupts the pipeline."""
        place = self._places.get(job_id)
        if place is None:
            return None
        call = place.call
        self._settle(place.job, lambda j: j.cancel(self.clock()))
        if call is not None and not call.open and call.task is not None:
            call.task.cancel()
        return place.job

    def replicas_ready(self, counts: dict[str, int]) -> None:
        """What the replicas' status says: jobs waiting on a cold model learn it is up
        (a pool model's: once a replica of its pool holds it)."""
        self._ready = dict(counts)
        self.pools.deployment_ready(counts)
        self._wake_loaded()

    def model_ready(self, model: str) -> bool:
        """Whether a call of `model` would find it loaded: a ready replica of its own, or
        a pool replica that holds it."""
        if self.pools.pool(model) is not None:
            return self.pools.holding(model) > 0
        return self._ready.get(model, 0) > 0

    def _wake_loaded(self) -> None:
        for model, calls in self._calls.items():
            if calls and self.model_ready(model):
                for call in calls:
                    for job in call.open.values():
                        if job.phase is Phase.LOADING_MODEL:
                            self.book.apply(job, Job.replica_ready)

    def waiting_on_cold_start(self) -> bool:
        return any(job.phase is Phase.LOADING_MODEL
                   for calls in self._calls.values() for call in calls
                   for job in call.open.values())

    async def close(self) -> None:
        """Stop every call. The jobs stay as saved: the next start resumes them."""
        self._closing = True
        for lane in self.lanes.values():
            lane.close()
        tasks = [c.task for calls in self._calls.values() for c in calls if c.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._places.clear()

    # -- moves -------------------------------------------------------------------------

    def pump(self, model: str) -> None:
        """Start the calls the lanes allow now: the model's own, or, for a pool model,
        those of its pool's models whose turn it is, within the pool's capacity."""
        group = self.pools.group(model)
        while not self._closing:
            calls_out = sum(len(self._calls[m]) for m in group)
            jobs_out = sum(len(c.jobs) for m in group for c in self._calls[m])
            leads = {m: lead for m in group if (lead := self.queues.peek(m)) is not None}
            for candidate in self.pools.order(model, leads):
                jobs = self.lanes[candidate].next_call(calls_out, jobs_out)
                if jobs is not None:
                    self.pools.took(candidate, jobs[0])
                    self._admit(candidate, jobs)
                    break
            else:
                return

    def _admit(self, model: str, jobs: list[Job]) -> None:
        """The move from the queue into a new call."""
        calls = self._calls[model]
        tasks = [job.task for job in jobs if job.task is not None]
        ready = self.model_ready(model)
        loop = asyncio.get_running_loop()
        call = Call(model, jobs, tasks, {job.id: job for job in jobs},
                    admitted_at=loop.time(), cold=not ready)
        self.observer.call_admitted(model, len(jobs))
        for job in jobs:
            self.queues.take(job.id)
            self._places[job.id].call = call
            self.book.apply(job, lambda j, r=ready: j.admit(r))
        name = f"call {jobs[0].id}+{len(jobs) - 1}"
        call.task = loop.create_task(self._drive(call), name=name)
        call.task.add_done_callback(functools.partial(self._ended, call))
        call.deadline = loop.call_later(self.limits.timeout_s, self._expire, call)
        calls.add(call)

    def _settle(self, job: Job, step: Step) -> None:
        """The only way out for good: `step` ends the job, which leaves its place."""
        place = self._places.pop(job.id)
        if place.call is None:
            self.queues.remove(job.id)
        else:
            del place.call.open[job.id]
        self.book.apply(job, step)

    def _back_to_queue(self, job: Job, step: Step) -> None:
        """Out of its call, back in the queue for another attempt."""
        place = self._places[job.id]
        assert place.call is not None, f"{job.id} is not in a call"
        del place.call.open[job.id]
        place.call = None
        self.book.apply(job, step)
        self.queues.push(job)

    # -- a call's life -------------------------------------------------------------------

    async def _drive(self, call: Call) -> None:
        try:
            async with aclosing(self.replicas.run(call.model, call.tasks)) as events:
                async for event in events:
                    if isinstance(event, Started):
                        self._started(call, event)
                    elif isinstance(event, Progress):
                        self._progress(call, event)
                    elif isinstance(event, Finished):
                        self._finished(call, event.result)
                    if not call.open:
                        return  # every job has its result (or left): the call is over
            call.outcome = Outcome(lost=True, reason="the replica ended the call without a "
                                                     "result")
        except ReplicaLost as exc:
            call.outcome = Outcome(lost=True, reason=str(exc))
            if call.replica is not None:  # what it held went with it
                self.pools.lost(call.model, call.replica)
        except Exception as exc:
            cause = getattr(exc, "cause", None) or exc  # Ray wraps a replica's errors
            if isinstance(cause, BlobStoreUnavailable):  # not the job's fault: run it again
                call.outcome = Outcome(lost=True, reason="the replica could not reach the "
                                                         "image store")
                return
            # The pipeline raised: its jobs fail, the service goes on.
            log.exception("replica call for jobs %s failed", list(call.open))
            call.outcome = Outcome(lost=False, reason=describe_failure(exc))

    def _started(self, call: Call, event: Started) -> None:
        call.started = True
        call.replica = event.replica
        loop = asyncio.get_running_loop()
        self.observer.call_started(call.model, call.cold, loop.time() - call.admitted_at)
        pool = self.pools.pool(call.model)
        if pool is not None and event.pool is not None:
            self.pools.reported(call.model, event.replica, event.pool)
            self.observer.pool_call(pool, call.model, event.pool)
        if call.deadline is not None:
            call.deadline.cancel()
        call.deadline = loop.call_later(self.limits.timeout_s, self._expire, call)
        now = self.clock()
        for job in list(call.open.values()):
            if job.status is JobStatus.QUEUED:
                self.book.apply(job, lambda j: j.start(now, event.replica))
        if event.pool is not None:
            self._wake_loaded()  # other calls of the model it loaded may find it now

    def _progress(self, call: Call, event: Progress) -> None:
        self.observer.step(call.model)
        for job in call.open.values():
            if job.status is JobStatus.PROCESSING:
                thumbnail = event.previews.get(job.id)
                preview = None if thumbnail is None else preview_of(event.step, thumbnail)
                job.report_progress(event.step, event.total, preview, event.phase)
                self.book.progressed(job)

    def _finished(self, call: Call, result: GenerationResult) -> None:
        job = call.open.get(result.job_id)
        if job is None:
            if all(j.id != result.job_id for j in call.jobs):
                log.warning("replica returned a result for job %r, which call %s does not "
                            "carry; ignored", result.job_id, [j.id for j in call.jobs])
            return  # a job of the call that left already (cancelled): its result is dropped
        if job.status is not JobStatus.PROCESSING:
            log.warning("job %s: result before the replica started it; ignored", job.id)
            return
        self.lanes[call.model].observe(call.tasks, result.time_taken_ms)
        now = self.clock()
        record = job_result(job, result, now)
        self._settle(job, lambda j: j.complete(record, now))

    def _expire(self, call: Call) -> None:
        """The call's deadline passed: its jobs fail as timed out, the call is cancelled."""
        call.deadline = None
        waited = "waiting for a replica" if not call.started else "running"
        error = (f"{TIMED_OUT} after {self.limits.timeout_s:g} s {waited} (JOB_TIMEOUT) "
                 "and was stopped")
        for job in list(call.open.values()):
            self._settle(job, lambda j: j.fail(error, self.clock()))
        if call.task is not None:
            call.task.cancel()

    def _ended(self, call: Call, task: asyncio.Task[None]) -> None:
        """The call's task is done, however it ended: what it still holds is settled or
        re-queued by its outcome, and its capacity goes back to the lane."""
        self._calls[call.model].discard(call)
        if call.deadline is not None:
            call.deadline.cancel()
        if self._closing:
            return
        outcome = call.outcome or Outcome(lost=True, reason="the replica call was interrupted")
        for job in list(call.open.values()):
            if outcome.lost:
                self._lost(job, outcome.reason)
            else:
                self._settle(job, lambda j, e=outcome.reason: j.fail(e, self.clock()))
        self.pump(call.model)

    def _lost(self, job: Job, reason: str) -> None:
        """Its replica was lost: another attempt, unless this was the last one."""
        unstarted = job.status is JobStatus.QUEUED
        if job.attempts + unstarted >= self.limits.max_attempts:
            error = gave_up(job.attempts + unstarted, reason)
            self._settle(job, lambda j: j.fail(error, self.clock(), lost_attempt=True))
        elif unstarted:
            self._back_to_queue(job, lambda j: j.retry_unstarted(reason))
        else:
            log.warning("job %s lost its replica (%s); re-queued", job.id, reason)
            self._back_to_queue(job, lambda j: j.requeue(reason))

    # -- checks ------------------------------------------------------------------------

    def audit(self) -> list[str]:
        """Every way the places could disagree, as readable problems (none when sound)."""
        problems: list[str] = []
        in_calls: dict[str, Call] = {}
        for model, calls in self._calls.items():
            lane = self.lanes[model]
            group = self.pools.group(model)
            name = self.pools.pool(model) or model  # a pool's capacity is the pool's
            out = [c for m in group for c in self._calls[m]]
            if len(out) > lane.slots:
                problems.append(f"{name}: {len(out)} calls out, {lane.slots} allowed")
            jobs_out = sum(len(c.jobs) for c in out)
            if jobs_out > lane.max_jobs:
                problems.append(f"{name}: {jobs_out} jobs out, {lane.max_jobs} allowed")
            for call in calls:
                for job_id in call.open:
                    if job_id in in_calls:
                        problems.append(f"{job_id} is in two calls")
                    in_calls[job_id] = call
        for job_id, place in self._places.items():
            job = place.job
            queued = job_id in self.queues
            if job.status.is_terminal():
                problems.append(f"{job_id} is settled ({job.status}) but still placed")
            if place.call is None:
                if not queued:
                    problems.append(f"{job_id} is neither queued nor in a call")
                if job.status is not JobStatus.QUEUED:
                    problems.append(f"{job_id} is queued but {job.status}")
            else:
                if queued:
                    problems.append(f"{job_id} is both queued and in a call")
                if in_calls.get(job_id) is not place.call:
                    problems.append(f"{job_id} is placed in a call that does not hold it")
                want = JobStatus.PROCESSING if place.call.started else JobStatus.QUEUED
                if job.status is not want:
                    problems.append(f"{job_id} is {job.status} in a call "
                                    f"{'started' if place.call.started else 'not started'}")
        for job_id in in_calls.keys() - self._places.keys():
            problems.append(f"{job_id} is held by a call but not placed")
        if len(self.queues) != sum(1 for p in self._places.values() if p.call is None):
            problems.append("the queues hold jobs that are not placed")
        return problems
