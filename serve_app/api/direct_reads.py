"""The `JobsBackend` of an ingress replica that reads the job store itself.

GET /jobs/:id of a running or finished job, GET /jobs and the images are answered from the
store (`serve_app.jobs.reads.StoreReads`) without a call to the tracker, so polling clients
cost the tracker nothing. What only the tracker knows still goes to it: a queued job's
record (its `queuePosition`, and its phase once handed to a replica), a live read (`live`:
A1111's /progress shows the running job's latest preview, which is never stored), a read
the store did not answer (the tracker has its live jobs in memory), and every write.

With several tracker shards (`serve_app.shards`) this is also where calls are routed: a
submit to its model's shard, a job's cancel, event stream and tracker reads to the shard of
the model its stored record names, GET /queue/status from the store's totals (every shard's
jobs), GET /models and /metrics put together from every shard (`serve_app.api.trackers`).

These reads are rate limited here, per ingress replica, at the configured read rate divided
among the replicas (Serve's HAProxy spreads a client's requests across them), where the
tracker's shared buckets limited them before; everything else is limited as it was.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from serve_app.api.backend import JobsBackend
from serve_app.api.trackers import Trackers
from serve_app.errors import JobNotFound, NotThisShard, StoreUnavailable
from serve_app.jobs.job import JobStatus
from serve_app.jobs.ratelimit import RateLimiter
from serve_app.jobs.reads import StoreReads
from serve_app.messages import Caller, Submission
from serve_app.settings import Settings


class DirectReads:
    def __init__(self, trackers: Trackers, reads: StoreReads, settings: Settings,
                 ingress_replicas: int = 1) -> None:
        self._trackers = trackers
        self._tracker = trackers.primary
        self._reads = reads
        self._max_queue_size = settings.max_queue_size
        replicas = max(1, ingress_replicas)
        self._limiter = RateLimiter("requests", settings.read_rate / replicas,
                                    max(1, math.ceil(settings.read_burst / replicas)))

    # -- answered from the store ---------------------------------------------------------

    async def get(self, job_id: str, caller: Caller, limited: bool = True,
                  live: bool = False) -> bytes:
        if live and not self._trackers.sharded:
            return await self._tracker.get(job_id, caller, limited, live=True)
        if limited:
            self._limiter.take(caller.client)
        try:
            job, record = await self._reads.find(job_id, caller)
        except StoreUnavailable:  # (timeouts too) the tracker holds its live jobs
            return await self._trackers.first(
                lambda t: t.get(job_id, caller, limited=False, live=live))
        if live or job.status is JobStatus.QUEUED:
            return await self._trackers.of(job.model).get(job_id, caller, limited=False,
                                                          live=live)
        return record

    async def image(self, job_id: str, index: int, caller: Caller) -> tuple[bytes, str]:
        self._limiter.take(caller.client)
        return await self._reads.image(job_id, index, caller)

    async def list_jobs(self, caller: Caller, **filters: Any) -> dict[str, Any]:
        self._limiter.take(caller.client)
        return await self._reads.list_jobs(caller, **filters)

    async def queue_status(self, caller: Caller) -> dict[str, Any]:
        if not self._trackers.sharded:  # one tracker counts every job in memory
            return await self._tracker.queue_status(caller)
        self._limiter.take(caller.client)
        # Each shard caps its own queue at IMAGEGEN_MAX_QUEUE_SIZE.
        return await self._reads.queue_status(
            caller, self._max_queue_size * self._trackers.shards.count)

    # -- the tracker's (the owning shard's) ------------------------------------------------

    async def _owner(self, job_id: str, caller: Caller) -> JobsBackend:
        """The tracker of the job's model, as its stored record names it."""
        if not self._trackers.sharded:
            return self._tracker
        job, _ = await self._reads.find(job_id, caller)
        return self._trackers.of(job.model)

    async def submit(self, sub: Submission) -> dict[str, Any]:
        return await self._trackers.of(sub.model).submit(sub)

    async def watch(self, job_id: str, caller: Caller) -> AsyncIterator[bytes]:
        try:
            candidates = [await self._owner(job_id, caller)]
        except StoreUnavailable:  # the shard that runs the job has it in memory
            candidates = list(self._trackers.all)
        for tracker in candidates:
            async with aclosing(tracker.watch(job_id, caller)) as records:  # type: ignore[type-var]
                try:
                    first = await anext(records)
                except StopAsyncIteration:
                    return
                except (JobNotFound, NotThisShard, StoreUnavailable):
                    if tracker is candidates[-1]:
                        raise
                    continue
                yield first
                async for record in records:
                    yield record
                return

    async def cancel(self, job_id: str, caller: Caller) -> dict[str, Any]:
        try:  # (one tracker: it, with no store read)
            tracker = await self._owner(job_id, caller)
        except StoreUnavailable:
            return await self._trackers.first(lambda t: t.cancel(job_id, caller))
        return await tracker.cancel(job_id, caller)

    async def models(self, caller: Caller) -> dict[str, Any]:
        return await self._trackers.models(caller)

    async def metrics_text(self, caller: Caller) -> bytes:
        return await self._trackers.metrics_text(caller)

    # -- the primary's: they belong to no model --------------------------------------------

    async def record_http(self, samples: list[tuple[str, str, int, float]]) -> None:
        await self._tracker.record_http(samples)

    async def remember(self, caller: Caller, name: str, value: str | None) -> None:
        await self._tracker.remember(caller, name, value)

    async def recall(self, caller: Caller) -> dict[str, str]:
        return await self._tracker.recall(caller)
