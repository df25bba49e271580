"""One model's lane to its replicas: the policy of when queued jobs leave, and which leave
together. It owns no job: `Dispatch` asks it, with the calls it has out, and moves the jobs.

A lane allows a replica call while it has capacity: one call per replica (up to the model's
`max_replicas`; calls past the ready replicas wait in Serve's router, where the autoscaler
sees them as demand) and at most MAX_CONCURRENT_JOBS jobs out at once. A call carries the
first queued job and the queued jobs that can share its pipeline call (same batch key), up
to `max_batch_size`. A lead that could take more companions and finds the only free replica
may be held briefly for them (`serve_app.jobs.batch_window`).

Jobs past a lane's capacity wait in the model's queue, where priority and batching apply.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from serve_app.jobs.batch_window import BatchWindow
from serve_app.jobs.job import Job
from serve_app.jobs.queues import JobQueues
from serve_app.messages import GenerationTask
from serve_app.model_runtime import Scaling


def batch_key(job: Job) -> Hashable:
    """What jobs must share to run as one pipeline call; None: the job runs alone."""
    return job.task.batch_key() if job.task else None


class Lane:
    def __init__(
        self,
        model: str,
        scaling: Scaling,
        *,
        queues: JobQueues,
        max_jobs: int,
        clock: Callable[[], int],
        on_hold_over: Callable[[str], None],
    ) -> None:
        self.model = model
        self._slots = scaling.max_replicas
        self._batch_size = scaling.max_batch_size
        self._max_jobs = max_jobs
        self._queues = queues
        self._clock = clock
        self._on_hold_over = on_hold_over  # called when a held lead may go: admit again
        self._window = BatchWindow(scaling.max_batch_wait_s * 1000)
        self._held: _Hold | None = None

    @property
    def slots(self) -> int:
        """Replica calls the lane allows out at once."""
        return self._slots

    @property
    def max_jobs(self) -> int:
        return self._max_jobs

    @property
    def capacity(self) -> int:
        """Replica slots times batch size: the jobs the model's replicas could run at once
        (MAX_CONCURRENT_JOBS may allow fewer)."""
        return self._slots * self._batch_size

    def next_call(self, calls_out: int, jobs_out: int) -> list[Job] | None:
        """The queued jobs that should leave together in the next replica call, given the
        calls and jobs out now; None while the lane is full, the queue empty, or its lead
        held for companions. The jobs stay queued: the caller moves them."""
        if calls_out >= self._slots or jobs_out >= self._max_jobs:
            return None
        lead = self._queues.peek(self.model)
        if lead is None:
            return None
        size = min(self._batch_size, self._max_jobs - jobs_out)
        key = batch_key(lead)
        batch = (self._queues.matching(self.model, key, batch_key, size)
                 if key is not None else [lead])
        if key is not None and len(batch) < size and self._hold(lead, calls_out):
            return None
        self._cancel_hold()
        return batch

    def observe(self, tasks: list[GenerationTask], elapsed_ms: float) -> None:
        """A finished call's run time. Only lone calls teach the window: a hold is a
        fraction of what a job costs alone."""
        if len(tasks) == 1:
            self._window.observe(tasks, elapsed_ms)

    def close(self) -> None:
        self._cancel_hold()

    def _hold(self, lead: Job, calls_out: int) -> bool:
        """Whether `lead` waits for companions; if so, a timer ends the wait."""
        if self._held is not None and self._held.job_id == lead.id:
            return not self._held.over
        self._cancel_hold()
        if self._slots - calls_out > 1:
            return False  # other replicas are free too: holding would only idle them
        # The wait counts from submission: a job that already queued is not held again.
        if lead.task is None:
            return False
        wait_ms = self._window.wait_ms(lead.task)
        wait_s = (wait_ms - (self._clock() - lead.created_at_ms)) / 1000
        if wait_s <= 0:
            return False
        timer = asyncio.get_running_loop().call_later(wait_s, self._end_hold, lead.id)
        self._held = _Hold(lead.id, timer)
        return True

    def _end_hold(self, job_id: str) -> None:
        if self._held is not None and self._held.job_id == job_id:
            self._held.over = True
        self._on_hold_over(self.model)

    def _cancel_hold(self) -> None:
        if self._held is not None:
            self._held.timer.cancel()
            self._held = None


@dataclass
class _Hold:
    job_id: str
    timer: asyncio.TimerHandle
    over: bool = False  # the wait ended: the lead goes with whatever it has
