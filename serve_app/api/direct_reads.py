"""The backend of an ingress replica that reads the job store itself.

GET /jobs/:id of a running or finished job, GET /jobs and the images are answered from the
store (`serve_app.jobs.reads.StoreReads`) without a call to the tracker, so polling clients
cost the tracker nothing. What only the tracker knows still goes to it: a queued job's
record (its `queuePosition`, and its phase once handed to a replica), a live read (`live`:
A1111's /progress shows the running job's latest preview, which is never stored), a read
the store did not answer (the tracker has its live jobs in memory), and every write. With
several tracker shards, GET /queue/status is counted from the store's totals (every
shard's jobs). Everything else is routed to the trackers as `Trackers` routes it.

These reads are rate limited here, per ingress replica, at the configured read rate divided
among the replicas (Serve's HAProxy spreads a client's requests across them), where the
tracker's shared buckets limited them before; everything else is limited as it was.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from serve_app.api.backend import JobsBackend
from serve_app.api.trackers import Trackers
from serve_app.errors import StoreUnavailable
from serve_app.jobs.job import JobStatus
from serve_app.jobs.ratelimit import RateLimiter
from serve_app.jobs.reads import StoreReads
from serve_app.messages import OPEN, Caller
from serve_app.settings import Settings
from serve_app.shards import ShardMap


class DirectReads(Trackers):
    def __init__(self, clients: Sequence[JobsBackend], shards: ShardMap, reads: StoreReads,
                 settings: Settings, ingress_replicas: int = 1) -> None:
        super().__init__(clients, shards, locate=self._model_of)
        self._reads = reads
        self._max_queue_size = settings.max_queue_size
        replicas = max(1, ingress_replicas)
        self._limiter = RateLimiter("requests", settings.read_rate / replicas,
                                    max(1, math.ceil(settings.read_burst / replicas)))

    async def _model_of(self, job_id: str, caller: Caller) -> str:
        job, _ = await self._reads.find(job_id, caller)
        return job.model

    async def get(self, job_id: str, caller: Caller = OPEN, *, limited: bool = True,
                  live: bool = False) -> bytes:
        """From the store, but a queued or `live` read (the tracker's)."""
        if live and not self.sharded:
            return await self.primary.get(job_id, caller, limited=limited, live=True)
        if limited:
            self._limiter.take(caller.client)
        try:
            job, record = await self._reads.find(job_id, caller)
        except StoreUnavailable:  # (timeouts too) the tracker holds its live jobs
            return await self.first(self.all, lambda t: t.get(
                job_id, caller, limited=False, live=live))
        if live or job.status is JobStatus.QUEUED:
            return await self.of(job.model).get(job_id, caller, limited=False, live=live)
        return record

    async def image(self, job_id: str, index: int, caller: Caller = OPEN) -> dict[str, Any]:
        """From the store."""
        self._limiter.take(caller.client)
        return await self._reads.image(job_id, index, caller)

    async def list_jobs(self, caller: Caller = OPEN, **filters: Any) -> dict[str, Any]:
        """From the store."""
        self._limiter.take(caller.client)
        return await self._reads.list_jobs(caller, **filters)

    async def queue_status(self, caller: Caller = OPEN) -> dict[str, Any]:
        """One tracker counts every job in memory; several: the store's totals."""
        if not self.sharded:
            return await self.primary.queue_status(caller)
        self._limiter.take(caller.client)
        # Each shard caps its own queue at IMAGEGEN_MAX_QUEUE_SIZE.
        return await self._reads.queue_status(caller, self._max_queue_size * self.shards.count)
