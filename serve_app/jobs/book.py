"""The tracker's book of records: every change to a job's state, counted and saved.

`apply` is the one way a job's state changes: it runs one of the job's transitions, moves
the counts by status, marks the job for the store (written behind, see
`serve_app.jobs.persistence`) and tells the watchers (event streams). A finished job's
record is rendered once and kept for polling (bounded in bytes: a record carries its
images), so a poll of a recent job costs no store read or JSON encoding.

Where a job *is* (queued, in a call, running) is not kept here: that is `Dispatch`'s.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Sequence

from serve_app.errors import JobNotFound, StoreTimeout
from serve_app.jobs.codec import loads, to_row
from serve_app.jobs.job import Job, JobStatus
from serve_app.jobs.persistence import StoreCalls, WriteBehind

RECENT_BYTES = 64 * 1024 * 1024

Watcher = Callable[[Job], None]


class JobBook:
    def __init__(self, calls: StoreCalls) -> None:
        self.calls = calls
        self.writes = WriteBehind(calls)
        self._counts = dict.fromkeys(JobStatus, 0)
        self._done_count = 0
        self._done_ms = 0
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self._recent_bytes = 0
        self._watchers: list[Watcher] = []

    async def load_totals(self) -> None:
        """Counts and processing time as the store has them (at start, after a prune)."""
        counts, (done, done_ms) = await self.calls.read(
            lambda store: (store.counts(), store.processing_time()))
        self._counts = {status: counts.get(status.value, 0) for status in JobStatus}
        self._done_count, self._done_ms = done, done_ms

    def watch(self, watcher: Watcher) -> None:
        """`watcher(job)` runs after every change to any job (progress included)."""
        self._watchers.append(watcher)

    # -- changes -----------------------------------------------------------------------

    async def add(self, jobs: Sequence[Job], now_ms: int) -> None:
        """New jobs: saved now, then counted. On StoreUnavailable they were not added; if
        the store timed out the save may land later, so a failed record is written behind
        it (the same writer thread keeps the order): a refused job never runs."""
        rows = [to_row(job) for job in jobs]
        try:
            await self.calls.write(lambda store: store.save_many(rows))
        except StoreTimeout:
            for job in jobs:
                job.fail("Not accepted: the job store did not answer in time; the submit "
                         "was refused with 503 and nothing ran", now_ms)
                self._counts[job.status] += 1
                self.writes.mark(job)
            raise
        for job in jobs:
            self._counts[job.status] += 1

    def apply(self, job: Job, step: Callable[[Job], None]) -> None:
        """Run `step` (one of `job`'s transitions) and record the change."""
        before = job.status
        step(job)
        self._counts[before] -= 1
        self._counts[job.status] += 1
        if job.status is JobStatus.COMPLETED and job.result is not None:
            self._done_count += 1
            self._done_ms += job.result.time_taken_ms
        if job.status.is_terminal():
            self.remember(job)
        self.writes.mark(job)
        self.notify(job)

    def notify(self, job: Job) -> None:
        """A change that is not saved (progress): watchers only."""
        for watcher in self._watchers:
            watcher(job)

    async def prune(self, finished_before_ms: int, keep_last: int) -> int:
        removed = await self.calls.write(
            lambda store: store.prune(finished_before_ms, keep_last))
        if removed:
            await self.load_totals()
            self._recent.clear()
            self._recent_bytes = 0
        return removed

    # -- reads -------------------------------------------------------------------------

    async def find(self, job_id: str) -> Job | None:
        """A job that is not live: its unsaved state, else the stored one."""
        pending = self.writes.pending(job_id)
        if pending is not None:
            return pending
        text = await self.calls.read(lambda store: store.load(job_id))
        return loads(text) if text is not None else None

    async def rendered(self, job_id: str) -> bytes:
        """The JSON record of a job that is not live."""
        cached = self._recent.get(job_id)
        if cached is not None:
            self._recent.move_to_end(job_id)
            return cached
        job = await self.find(job_id)
        if job is None:
            raise JobNotFound()
        return self.remember(job)

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
