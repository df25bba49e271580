"""The tracker's book of records: every change to a job's state, counted and saved.

`apply` is the one way a job's state changes: it runs one of the job's transitions, moves
the counts by status, marks the job for the store (written behind, see
`serve_app.jobs.persistence`) and tells the watchers (event streams). A finished job's
record is rendered once and kept for polling (bounded in bytes: a record carries its
images), so a poll of a recent job costs no store read or JSON encoding.

Where a job *is* (queued, in a call, running) is not kept here: that is `Dispatch`'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from serve_app.errors import JobNotFound, StoreTimeout
from serve_app.jobs import jsontext
from serve_app.jobs.codec import loads, to_row
from serve_app.jobs.job import Job, JobStatus
from serve_app.jobs.persistence import StoreCalls, WriteBehind
from serve_app.jobs.reads import average_ms
from serve_app.jobs.record_cache import RecordCache
from serve_app.stores.contract import Totals

RECENT_BYTES = 64 * 1024 * 1024
SETTLE_S = 2.0

log = logging.getLogger(__name__)

# Called after every change of any job with the status it had before: None for a new job;
# the same status for a change within it (progress, phase).
Watcher = Callable[[Job, "JobStatus | None"], None]
_STATUSES = tuple(s.value for s in JobStatus)


class JobBook:
    def __init__(self, calls: StoreCalls) -> None:
        self.calls = calls
        self.writes = WriteBehind(calls)
        self._totals: dict[str, Totals] = {}  # per owner ("" for none)
        self._recent: RecordCache[str | None] = RecordCache(RECENT_BYTES)  # value: owner
        self._watchers: list[Watcher] = []

    async def load_totals(self) -> None:
        """Counts and processing time as the store has them (at start, after a prune)."""
        self._totals = await self.calls.read(lambda store: store.totals())

    def watch(self, watcher: Watcher) -> None:
        """`watcher(job, before)` runs after every change to any job (progress included).
        It must not block: the tracker's loop runs it."""
        self._watchers.append(watcher)

    # -- changes -----------------------------------------------------------------------

    async def add(self, jobs: Sequence[Job], now_ms: int) -> None:
        """New jobs: saved now, then counted. On StoreUnavailable they were not added; if
        the store timed out the save may land later, so a failed record is written behind
        it (the same writer thread keeps the order): a refused job never runs, and its
        record gives its Idempotency-Key up, so the retry the 503 asks for makes a job."""
        rows = [to_row(job) for job in jobs]
        try:
            await self.calls.write(lambda store: store.save_many(rows, durable=True))
        except StoreTimeout:
            for job in jobs:
                job.idempotency_key = None
                job.fail("Not accepted: the job store did not answer in time; the submit "
                         "was refused with 503 and nothing ran", now_ms)
                self._count(job, job.status, 1)
                self.writes.mark(job)
            raise
        for job in jobs:
            self._count(job, job.status, 1)
            self.notify(job, None)

    def apply(self, job: Job, step: Callable[[Job], None]) -> None:
        """Run `step` (one of `job`'s transitions) and record the change."""
        before = job.status
        step(job)
        self._count(job, before, -1)
        self._count(job, job.status, 1)
        if job.status.is_terminal():
            self.remember(job)
        self.writes.mark(job)
        self.notify(job, before)

    def touch(self, job: Job) -> None:
        """A change outside the state machine (a webhook delivery's state): saved behind,
        and a finished job's cached record dropped, so the next read renders it anew."""
        self._recent.pop(job.id)
        self.writes.mark(job)

    def progressed(self, job: Job) -> None:
        """A running job's progress (and preview) changed: saved behind, so readers of the
        store see it (a replica reports progress at most every IMAGEGEN_PROGRESS_EVERY_MS;
        the saves of all jobs that changed meanwhile are one store call)."""
        self.writes.mark(job)
        self.notify(job, job.status)

    def notify(self, job: Job, before: JobStatus | None) -> None:
        """Tell the watchers."""
        for watcher in self._watchers:
            watcher(job, before)

    async def stored(self, job_ids: Sequence[str], timeout_s: float = SETTLE_S) -> None:
        """Until the store holds these jobs' current states, for at most `timeout_s` (a
        store that is down must not hold an answer up: the state is saved when it is back).
        Called before a client is told of a state it may then read from the store."""
        try:
            await asyncio.wait_for(self.writes.saved(job_ids), timeout_s)
        except TimeoutError:
            log.warning("%d job state(s) not saved within %.1f s; answering anyway",
                        len(job_ids), timeout_s)

    async def prune(self, finished_before_ms: int, keep_last: int) -> list[str]:
        """Delete old finished jobs (`JobStore.prune`); their ids."""
        removed = await self.calls.write(
            lambda store: store.prune(finished_before_ms, keep_last))
        if removed:
            await self.load_totals()
            self._recent.clear()
        return removed

    # -- reads -------------------------------------------------------------------------

    async def find(self, job_id: str) -> Job | None:
        """A job that is not live: its unsaved state, else the stored one."""
        pending = self.writes.pending(job_id)
        if pending is not None:
            return pending
        text = await self.calls.read(lambda store: store.load(job_id))
        return loads(text) if text is not None else None

    async def rendered(self, job_id: str) -> tuple[str | None, bytes]:
        """The owner and JSON record of a job that is not live."""
        cached = self._recent.get(job_id)
        if cached is not None:
            return cached
        job = await self.find(job_id)
        if job is None:
            raise JobNotFound()
        return job.owner, self.remember(job)

    @property
    def totals(self) -> dict[str, Totals]:
        """Per owner ("" for none): jobs per status, completed jobs' processing time."""
        return self._totals

    def count(self, status: JobStatus, owner: str | None = None, *, everyone: bool = True
              ) -> int:
        """Jobs in `status`: everyone's, or (`everyone=False`) those of `owner`."""
        return sum(t.counts.get(status.value, 0) for t in self._of(owner, everyone))

    def average_ms(self, owner: str | None = None, *, everyone: bool = True) -> int | None:
        """Mean processing time of completed jobs (whole ms); None before the first."""
        return average_ms(self._of(owner, everyone))

    def _of(self, owner: str | None, everyone: bool) -> list[Totals]:
        if everyone:
            return list(self._totals.values())
        return [t for o, t in self._totals.items() if o == (owner or "")]

    def _count(self, job: Job, status: JobStatus, sign: int) -> None:
        owner = job.owner or ""
        t = self._totals.get(owner) or Totals(dict.fromkeys(_STATUSES, 0))
        t.counts[status.value] = t.counts.get(status.value, 0) + sign
        if status is JobStatus.COMPLETED and job.result is not None:
            t = Totals(t.counts, t.completed + sign,
                       t.completed_ms + sign * job.result.time_taken_ms)
        self._totals[owner] = t

    def remember(self, job: Job) -> bytes:
        rendered = jsontext.dumps(job.to_wire())
        self._recent.put(job.id, job.owner, rendered)
        return rendered
