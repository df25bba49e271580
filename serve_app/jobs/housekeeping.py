"""Keeping the job store and the blob store in step: retention, and the blob sweep.

`Retention.prune` deletes finished jobs past `IMAGEGEN_RETENTION_S` or beyond
`IMAGEGEN_RETENTION_MAX_JOBS` (never one with a webhook delivery pending) and then their
blobs; a blob store that is down then leaves them to the sweep.

`BlobSweep`: blobs that no job record names are deleted once they are old enough.

They come from submits the tracker never saved (refused after the ingress stored their
input images, or lost with the tracker mid-submit), from a replica that died mid-upload of
an attempt whose job then failed and was pruned, and from prunes whose deletes failed (the
blob store was down). A blob's job is in its key (`jobs/<id>/...`); a job whose blobs are
all older than the grace period and that has no record is deleted whole. Each run reads at
most `batch` blobs, from where the last run stopped, so a sweep of a big bucket is spread
over many runs and never holds the tracker for long (the listing and deletes run in a
thread).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections import defaultdict
from collections.abc import Callable

from serve_app.blobs import Blobs, job_of
from serve_app.errors import ServiceError
from serve_app.jobs.book import JobBook
from serve_app.jobs.persistence import StoreCalls
from serve_app.settings import Settings

log = logging.getLogger(__name__)


class Retention:
    def __init__(self, book: JobBook, blobs: Blobs, settings: Settings,
                 clock: Callable[[], int]) -> None:
        self._book = book
        self._blobs = blobs
        self._retention_ms = settings.retention_s * 1000
        self._keep = settings.retention_max_jobs
        self._clock = clock

    async def prune(self) -> int:
        """Delete finished jobs past retention, and their blobs; how many jobs."""
        pruned = await self._book.prune(self._clock() - self._retention_ms, self._keep)
        try:
            await asyncio.to_thread(lambda: [self._blobs.delete_job(i) for i in pruned])
        except ServiceError as exc:  # the blob store is down: the sweep deletes them later
            log.warning("blobs of %d pruned job(s) not deleted: %s", len(pruned), exc)
        return len(pruned)


class BlobSweep:
    def __init__(self, blobs: Blobs, calls: StoreCalls, *, grace_s: int,
                 clock: Callable[[], int], batch: int = 2000) -> None:
        self._blobs = blobs
        self._calls = calls
        self._grace_ms = grace_s * 1000
        self._clock = clock
        self._batch = batch
        self._after: str | None = None  # the last key read: the next run starts after it

    async def run(self) -> int:
        """One bounded pass; the number of blobs deleted."""
        listed = await asyncio.to_thread(self._list)
        cutoff = self._clock() - self._grace_ms
        oldest_first: dict[str, int] = defaultdict(int)  # job -> its newest blob (ms)
        for key, modified_ms in listed:
            job_id = job_of(key)
            if job_id is not None:
                oldest_first[job_id] = max(oldest_first[job_id], modified_ms)
        candidates = [j for j, newest in oldest_first.items() if newest < cutoff]
        if not candidates:
            return 0
        orphans = await self._calls.read(lambda store: store.missing(candidates))
        deleted = await asyncio.to_thread(lambda: sum(map(self._blobs.delete_job, orphans)))
        if deleted:
            log.info("blob sweep: deleted %d blob(s) of %d job(s) with no record", deleted,
                     len(orphans))
        return deleted

    def _list(self) -> list[tuple[str, int]]:
        found: list[tuple[str, int]] = []
        for meta in self._blobs.listing(after=self._after):
            found.append((meta.key, _ms(meta.modified)))
            if len(found) >= self._batch:
                self._after = meta.key
                return found
        self._after = None  # the end: the next run starts over
        return found


def _ms(moment: datetime.datetime) -> int:
    return int(moment.timestamp() * 1000)
