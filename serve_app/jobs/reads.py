"""Job reads answered from the store, by whoever holds it open: an ingress replica.

The tracker writes every job's state to the store (a submit before it is acknowledged,
each later change behind it within milliseconds, a running job's progress as often as its
replica reports it, IMAGEGEN_PROGRESS_EVERY_MS), and before it tells a client that a job
ended or was cancelled it waits for that save (`JobBook.stored`). So GET /jobs/:id of a
running or finished job, GET /jobs and the images can be read from the store by the
ingress itself, and the tracker's one process is left for what only it knows: the queue.
`serve_app.api.direct_reads` decides which reads come here.

Finished records are cached, bounded in bytes, for `FINISHED_TTL_S`: a finished job
changes no more but for its webhook delivery state, which the cache may show that much
late. A record read here has no `queuePosition` and no `preview` (the latest latent
thumbnail of a running job is never stored).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from serve_app.errors import ImageNotFound, InvalidRequest, JobNotFound
from serve_app.jobs import jsontext
from serve_app.jobs.codec import loads
from serve_app.jobs.job import Job, JobStatus
from serve_app.jobs.persistence import StoreCalls
from serve_app.jobs.record_cache import RecordCache
from serve_app.messages import Caller, JobType
from serve_app.stores.contract import JobFilter, Page, Totals, decode_cursor

CACHE_BYTES = 32 * 1024 * 1024
FINISHED_TTL_S = 2.0
MAX_PAGE = 500


class StoreReads:
    def __init__(self, calls: StoreCalls, *, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self._calls = calls
        self._clock = clock
        # finished jobs: (when read, the job) and its rendered record
        self._finished: RecordCache[tuple[float, Job]] = RecordCache(CACHE_BYTES)

    async def find(self, job_id: str, caller: Caller) -> tuple[Job, bytes]:
        """The job and its record as JSON; JobNotFound for an unknown job and for another
        key's (its existence is not disclosed)."""
        cached = self._finished.get(job_id)
        if cached is not None and self._clock() - cached[0][0] < FINISHED_TTL_S:
            (_, job), record = cached
        else:
            text = await self._calls.read(lambda store: store.load(job_id))
            if text is None:
                raise JobNotFound()
            job = loads(text)
            record = jsontext.dumps(job.to_wire())
            if job.status.is_terminal():
                self._finished.put(job.id, (self._clock(), job), record)
        if not caller.may_see(job.owner):
            raise JobNotFound()
        return job, record

    async def image(self, job_id: str, index: int, caller: Caller) -> dict[str, Any]:
        job, _ = await self.find(job_id, caller)
        return image_of(job, index)

    async def list_jobs(self, caller: Caller, **filters: Any) -> dict[str, Any]:
        page = await query_page(self._calls, caller, **filters)
        return {"jobs": page.jobs, "nextCursor": page.next_cursor}

    async def queue_status(self, caller: Caller, max_queue_size: int) -> dict[str, Any]:
        """GET /queue/status from the store's totals (every tracker shard's jobs; a state
        change is there within milliseconds of the tracker making it)."""
        totals = await self._calls.read(lambda store: store.totals())
        return queue_counts(totals, caller, max_queue_size)


def queue_counts(totals: Mapping[str, Totals], caller: Caller, max_queue_size: int
                 ) -> dict[str, Any]:
    """GET /queue/status from per-owner totals: everyone's for an admin key (or an open
    service), else the key's own."""
    mine = totals.values() if caller.admin else [
        t for owner, t in totals.items() if owner == (caller.name or "")]

    def count(status: JobStatus) -> int:
        return sum(t.counts.get(status.value, 0) for t in mine)

    return {
        "queuedJobs": count(JobStatus.QUEUED),
        "processingJobs": count(JobStatus.PROCESSING),
        "completedJobs": count(JobStatus.COMPLETED),
        "failedJobs": count(JobStatus.FAILED),
        "cancelledJobs": count(JobStatus.CANCELLED),
        "averageProcessingTime": average_ms(mine) or 0,
        "maxQueueSize": max_queue_size,
    }


def average_ms(totals: Iterable[Totals]) -> int | None:
    """Mean processing time of completed jobs (whole ms); None before the first."""
    done = ms = 0
    for t in totals:
        done, ms = done + t.completed, ms + t.completed_ms
    return ms // done if done else None


def image_of(job: Job, index: int) -> dict[str, Any]:
    """Where image `index` of a job's result is: its blob reference (`ImageRef.to_json()`),
    or, in a record written before images left records, `{"dataUri": ...}`."""
    if job.result is None:
        raise ImageNotFound(f"Job {job.id} has no images yet: it is {job.status}")
    if not 0 <= index < len(job.result.images):
        raise ImageNotFound(
            f"Image {index} does not exist: job {job.id} has {len(job.result.images)} "
            f"image(s), numbered from 0"
        )
    entry = job.result.images[index]
    return {"dataUri": entry} if isinstance(entry, str) else dict(entry)


async def query_page(
    calls: StoreCalls,
    caller: Caller,
    *,
    status: JobStatus | None = None,
    type: JobType | None = None,
    model: str | None = None,
    limit: int = 100,
    cursor: str | None = None,
) -> Page:
    """A page of GET /jobs summaries from the store, newest first: a key's own jobs, or
    everyone's for an admin key or an open service."""
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE} (got {limit})")
    if cursor is not None:
        try:
            decode_cursor(cursor)
        except ValueError:
            raise InvalidRequest(
                "cursor is not valid: pass the nextCursor of a previous page") from None
    flt = JobFilter(status.value if status else None, type.value if type else None, model,
                    owner=None if caller.admin else caller.name)
    return await calls.read(lambda store: store.query(flt, limit, cursor))
