"""The tracker's book of jobs: what it knows of each job and where that is kept.

Every record is in the store, saved at each status change; the jobs still queued or running
are also in memory (`live`), where progress changes without a store write. Counts by
status and the completed jobs' processing time are kept as running totals, so queue
statistics cost nothing. A finished job's record is rendered once and kept for polling
(bounded in bytes: a record carries its images), so a poll costs no store read or JSON
encoding.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable

from serve_app.errors import JobNotFound
from serve_app.jobs import Job, JobStatus
from serve_app.store import JobStore

RECENT_BYTES = 64 * 1024 * 1024


class JobBook:
    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.live: dict[str, Job] = {}
        self._counts = dict.fromkeys(JobStatus, 0)
        self._done_count = 0
        self._done_ms = 0
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self._recent_bytes = 0

    def load_totals(self) -> None:
        """Counts and processing time as the store has them (at start, after a prune)."""
        self._counts.update(self.store.counts())
        self._done_count, self._done_ms = self.store.processing_time()

    # -- changes -----------------------------------------------------------------------

    def add(self, job: Job) -> None:
        """A new job: saved, live, counted."""
        self.store.save(job)
        self.live[job.id] = job
        self._counts[job.status] += 1

    def restore(self, job: Job) -> None:
        """A stored unfinished job, live again after a restart (counted by `load_totals`)."""
        self.live[job.id] = job

    def transition(self, job: Job, step: Callable[[Job], None]) -> None:
        """`step` (one of the Job's transitions) moves `job` between queued and processing;
        ending a job goes through `finish`."""
        self._apply(job, step)
        assert not job.status.is_terminal(), f"{job.id} ended outside finish()"

    def finish(self, job: Job, step: Callable[[Job], None], *, keep_live: bool = False) -> None:
        """`step` ends `job` (completed, failed, cancelled). It leaves the live jobs unless
        `keep_live` (its replica call is still out: the call's end drops it)."""
        self._apply(job, step)
        if job.status is JobStatus.COMPLETED and job.result is not None:
            self._done_count += 1
            self._done_ms += job.result.time_taken_ms
        if not keep_live:
            self.drop(job.id)
        self.remember(job)

    def drop(self, job_id: str) -> None:
        """A finished job leaves the live jobs (its record stays)."""
        self.live.pop(job_id, None)

    def prune(self, finished_before_ms: int, keep_last: int) -> int:
        removed = self.store.prune(finished_before_ms, keep_last)
        if removed:
            self.load_totals()
            self._recent.clear()
            self._recent_bytes = 0
        return removed

    # -- reads -------------------------------------------------------------------------

    def find(self, job_id: str) -> Job | None:
        """The live job, else the stored one."""
        return self.live.get(job_id) or self.store.load(job_id)

    def rendered(self, job_id: str) -> bytes:
        """The JSON record of a job that is not live."""
        cached = self._recent.get(job_id)
        if cached is not None:
            self._recent.move_to_end(job_id)
            return cached
        stored = self.store.load(job_id)
        if stored is None:
            raise JobNotFound()
        return self.remember(stored)

    def count(self, status: JobStatus) -> int:
        return self._counts[status]

    @property
    def average_ms(self) -> int | None:
        """Mean processing time of completed jobs (whole ms); None before the first."""
        return self._done_ms // self._done_count if self._done_count else None

    def remember(self, job: Job) -> bytes:
        rendered = json.dumps(job.to_wire()).encode()
        old = self._recent.pop(job.id, None)
        self._recent_bytes += len(rendered) - (len(old) if old is not None else 0)
        self._recent[job.id] = rendered
        while self._recent_bytes > RECENT_BYTES and len(self._recent) > 1:
            _, evicted = self._recent.popitem(last=False)
            self._recent_bytes -= len(evicted)
        return rendered

    def _apply(self, job: Job, step: Callable[[Job], None]) -> None:
        before = job.status
        step(job)
        self._counts[before] -= 1
        self._counts[job.status] += 1
        self.store.save(job)
