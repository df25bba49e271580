"""Pushed job changes: one feed per watched job, however many watch it.

The book tells `Feeds.changed` of every change of every job (a dict lookup for jobs no one
watches). A watched job's feed wakes its watchers, who render the record then and pass it
on: a burst of changes (progress every few milliseconds) reaches a watcher as its latest
state, at most every `min_interval_s`. A watcher's stream ends after the record of a
finished job.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from serve_app.jobs import jsontext
from serve_app.jobs.job import Job, JobStatus

# Bursts of progress are coalesced to at most one record per watcher this often: well within
# the ~100 ms a change should take to reach a client, and cheap across Ray's handles.
MIN_INTERVAL_S = 0.05


@dataclass
class _Feed:
    job: Job
    wakers: set[asyncio.Event] = field(default_factory=set)  # one per watcher


def event_id(record: bytes) -> str:
    """A stream event's id: a digest of the record it carries, so a client that resumes with
    Last-Event-ID is sent the record again only if it changed, across tracker restarts."""
    return hashlib.blake2b(record, digest_size=8).hexdigest()


def without_images(record: dict[str, Any]) -> bytes:
    result = record.get("result")
    if isinstance(result, dict):
        result.pop("images", None)
    return jsontext.dumps(record)


class Feeds:
    """`before_end(job_id)` is awaited before a finished job's record is sent: the book's
    save of it, so a client told by its stream that the job ended reads it ended from the
    store too (GET /jobs/:id is answered from the store)."""

    def __init__(self, min_interval_s: float = MIN_INTERVAL_S,
                 before_end: Callable[[str], Awaitable[None]] | None = None) -> None:
        self._feeds: dict[str, _Feed] = {}
        self._min_interval_s = min_interval_s
        self._before_end = before_end

    def changed(self, job: Job, before: JobStatus | None = None) -> None:
        """A book watcher: wake the job's feed, if anyone watches it. A job that leaves its
        queue moves the others of its model up: their feeds wake too (queuePosition)."""
        feed = self._feeds.get(job.id)
        if feed is not None:
            feed.job = job
            _wake(feed)
        if before is JobStatus.QUEUED and self._feeds:
            for other in self._feeds.values():
                if other.job.model == job.model and other.job.status is JobStatus.QUEUED:
                    _wake(other)

    @property
    def watched(self) -> int:
        return len(self._feeds)

    async def follow(self, job: Job, render: Callable[[Job], dict[str, Any]]
                     ) -> AsyncIterator[bytes]:
        """The record (without images) now and after each change, until the job ends."""
        feed = self._feeds.get(job.id)
        if feed is None:
            feed = self._feeds[job.id] = _Feed(job)
        wake = asyncio.Event()
        feed.wakers.add(wake)
        try:
            while True:
                wake.clear()  # a change from here on wakes it again: none is missed
                # The status as rendered: the job object may have moved on (even ended)
                # by the time the consumer asks for the next record.
                ended = feed.job.status.is_terminal()
                if ended and self._before_end is not None:
                    await self._before_end(job.id)
                yield without_images(render(feed.job))
                if ended:
                    return
                await wake.wait()
                await asyncio.sleep(self._min_interval_s)
        finally:
            feed.wakers.discard(wake)
            if not feed.wakers:
                del self._feeds[job.id]


def _wake(feed: _Feed) -> None:
    for wake in feed.wakers:
        wake.set()
