"""The job tracker: the API the ingress calls, over one `Dispatch` and one `JobBook`.

Plain Python on one asyncio loop; the Ray actor in `deployments/tracker.py` is a thin shell
around it. What it needs from the outside is injected: the store (through `StoreCalls`),
the replicas (how a call reaches a model and how its events come back) and the clock.

A job's path: `submit_many` saves it (a submit is acknowledged once it is durable) and
hands it to `Dispatch`, which queues it, sends it to a replica call when the model's lane
allows, and settles it from what the replica says (see `serve_app.jobs.dispatch`).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from serve_app.errors import (
    ImageNotFound,
    InvalidRequest,
    JobNotCancellable,
    JobNotFound,
    QueueFull,
    ServiceError,
)
from serve_app.jobs.book import JobBook
from serve_app.jobs.codec import loads
from serve_app.jobs.dispatch import Dispatch, Limits, Replicas
from serve_app.jobs.job import Job, JobStatus, new_job_id
from serve_app.jobs.lanes import Lane
from serve_app.jobs.persistence import StoreCalls
from serve_app.jobs.queues import JobQueues
from serve_app.jobs.results import gave_up
from serve_app.messages import JobType, Submission
from serve_app.registry import Registry, Scaling
from serve_app.settings import Settings
from serve_app.stores.contract import JobFilter, decode_cursor

log = logging.getLogger(__name__)

MAX_PAGE = 500

Outcome = dict[str, Any] | ServiceError


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class JobTracker:
    def __init__(
        self,
        *,
        settings: Settings,
        registry: Registry,
        store: StoreCalls,
        replicas: Replicas,
        served: frozenset[str],
        clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._served = served
        self._clock = clock
        self._replicas = replicas
        self._book = JobBook(store)
        queues = JobQueues(served)
        self._dispatch = Dispatch(
            book=self._book,
            lanes={m: self._lane(m, queues) for m in served},
            queues=queues,
            replicas=replicas,
            limits=Limits(settings.job_timeout_ms / 1000, settings.max_attempts),
            clock=clock,
        )
        # One submit_many at a time: its jobs are saved and queued (and their
        # Idempotency-Keys findable) before the next one looks at the queue or the keys.
        self._submitting = asyncio.Lock()

    @property
    def book(self) -> JobBook:
        return self._book

    def _lane(self, model: str, queues: JobQueues) -> Lane:
        spec = self._registry.get(model)
        # Served models come from the registry; the fallback (one job a call) is for safety.
        scaling = spec.scaling if spec else Scaling(max_batch_size=1)
        return Lane(model, scaling, queues=queues, max_jobs=self._settings.max_concurrent_jobs,
                    clock=self._clock, on_hold_over=lambda m: self._dispatch.pump(m))

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> int:
        """Load what the store holds: counts, and unfinished jobs back into the queues.
        A job that was running when the service stopped runs again, within its attempts."""
        await self._book.load_totals()
        texts = await self._book.calls.read(lambda store: store.unfinished())
        resumed = 0
        for job in map(loads, texts):
            if job.model not in self._served or job.task is None:
                reason = f"Model {job.model} is no longer served here"
                self._book.apply(job, lambda j, r=reason: j.fail(r, self._clock()))
                continue
            if job.status is JobStatus.PROCESSING:
                reason = "the service restarted while it ran"
                if job.attempts >= self._settings.max_attempts:
                    error = gave_up(job.attempts, reason)
                    self._book.apply(job, lambda j, e=error: j.fail(e, self._clock()))
                    continue
                self._book.apply(job, lambda j, r=reason: j.requeue(r))
            self._dispatch.add(job)
            resumed += 1
        return resumed

    async def prune(self) -> int:
        cutoff = self._clock() - self._settings.retention_s * 1000
        return await self._book.prune(cutoff, self._settings.retention_max_jobs)

    async def close(self) -> None:
        await self._dispatch.close()
        await self._book.writes.close()

    def audit(self) -> list[str]:
        return self._dispatch.audit()

    # -- submit ----------------------------------------------------------------------

    async def submit(self, sub: Submission) -> dict[str, Any]:
        (outcome,) = await self.submit_many([sub])
        if isinstance(outcome, ServiceError):
            raise outcome
        return outcome

    async def submit_many(self, subs: Sequence[Submission]) -> list[Outcome]:
        """Each submission's record, or the error that refused it (queue full, model not
        served, store unavailable); one refusal does not affect the others. A submission
        whose Idempotency-Key a job already holds answers that job's record."""
        async with self._submitting:
            return await self._submit_many(subs)

    async def _submit_many(self, subs: Sequence[Submission]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(subs)
        holders = await self._idempotent(subs)
        fresh: list[tuple[int, Job]] = []
        for i, sub in enumerate(subs):
            key = sub.idempotency_key
            if key is not None and key in holders:
                continue
            try:
                job = self._new_job(sub, also_waiting=len(fresh))
            except ServiceError as exc:
                outcomes[i] = exc
                continue
            fresh.append((i, job))
            if key is not None:
                holders[key] = job.id
        jobs = [job for _, job in fresh]
        failed: ServiceError | None = None
        try:
            await self._book.add(jobs, self._clock())
        except ServiceError as exc:
            failed = exc
        for i, job in fresh:
            if failed is None:
                self._dispatch.add(job)
            outcomes[i] = failed
        for i, job in fresh:
            if failed is None:
                outcomes[i] = job.to_wire(self._dispatch.position(job))
        fresh_ids = {job.id for job in jobs}
        for i, sub in enumerate(subs):
            if outcomes[i] is None:  # another job holds its Idempotency-Key
                holder = holders[sub.idempotency_key or ""]
                outcomes[i] = (failed if failed is not None and holder in fresh_ids
                               else json.loads(await self.get(holder)))
        return [o for o in outcomes if o is not None]

    def _new_job(self, sub: Submission, also_waiting: int) -> Job:
        if sub.model not in self._served:
            raise InvalidRequest(f"Model {sub.model} is not served here")
        waiting = self._dispatch.waiting + also_waiting
        if waiting >= self._settings.max_queue_size:
            raise QueueFull(
                f"Queue is full ({waiting} jobs waiting, MAX_QUEUE_SIZE is "
                f"{self._settings.max_queue_size}); retry later",
                retry_after_s=self._retry_after_s(),
            )
        now = self._clock()
        job = Job(id=new_job_id(now), type=sub.type, model=sub.model, request=sub.request,
                  created_at_ms=now, priority=sub.priority,
                  idempotency_key=sub.idempotency_key, owner=sub.owner)
        job.task = dataclasses.replace(sub.task, job_id=job.id)
        return job

    async def _idempotent(self, subs: Sequence[Submission]) -> dict[str, str]:
        """Idempotency-Key -> job id, for the keys these submissions name that a stored
        job already holds."""
        keys = sorted({s.idempotency_key for s in subs if s.idempotency_key is not None})
        if not keys:
            return {}
        stored = await self._book.calls.read(
            lambda store: {k: store.find_idempotent(k) for k in keys})
        return {k: v for k, v in stored.items() if v is not None}

    # -- reads -----------------------------------------------------------------------

    async def get(self, job_id: str) -> bytes:
        """The record as JSON bytes: a live job rendered now, a finished one from the
        book's cache or the store."""
        job = self._dispatch.live(job_id)
        if job is not None:
            return json.dumps(job.to_wire(self._dispatch.position(job))).encode()
        return await self._book.rendered(job_id)

    async def image(self, job_id: str, index: int) -> tuple[bytes, str]:
        job = self._dispatch.live(job_id) or await self._book.find(job_id)
        if job is None:
            raise JobNotFound()
        if job.result is None:
            raise ImageNotFound(f"Job {job_id} has no images yet: it is {job.status}")
        if not 0 <= index < len(job.result.images):
            raise ImageNotFound(
                f"Image {index} does not exist: job {job_id} has {len(job.result.images)} "
                f"image(s), numbered from 0"
            )
        _, _, payload = job.result.images[index].partition(",")
        return base64.b64decode(payload), job.result.content_type

    async def list_jobs(
        self,
        *,
        status: JobStatus | None = None,
        type: JobType | None = None,
        model: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE} (got {limit})")
        if cursor is not None:
            try:
                decode_cursor(cursor)
            except ValueError:
                raise InvalidRequest(
                    "cursor is not valid: pass the nextCursor of a previous page") from None
        flt = JobFilter(status.value if status else None, type.value if type else None, model)
        page = await self._book.calls.read(lambda store: store.query(flt, limit, cursor))
        # Stored summaries are current but for the progress of running jobs.
        summaries = []
        for summary in page.jobs:
            live = self._dispatch.live(summary["id"])
            summaries.append(live.summary() if live is not None else summary)
        return {"jobs": summaries, "nextCursor": page.next_cursor}

    def queue_status(self) -> dict[str, Any]:
        count = self._book.count
        return {
            "queuedJobs": count(JobStatus.QUEUED),
            "processingJobs": count(JobStatus.PROCESSING),
            "completedJobs": count(JobStatus.COMPLETED),
            "failedJobs": count(JobStatus.FAILED),
            "cancelledJobs": count(JobStatus.CANCELLED),
            "averageProcessingTime": self._book.average_ms or 0,
            "maxQueueSize": self._settings.max_queue_size,
        }

    # -- cancel ----------------------------------------------------------------------

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """A queued job leaves its queue; a running one is interrupted at its next step.
        Cancelling a cancelled job answers the same again (a retried cancel is safe);
        a completed or failed one cannot be cancelled."""
        job = self._dispatch.cancel(job_id) or await self._book.find(job_id)
        if job is None:
            raise JobNotFound()
        if job.status is not JobStatus.CANCELLED:
            raise JobNotCancellable(
                f"Job {job_id} cannot be cancelled: it is already {job.status}")
        return {"success": True, "id": job_id, "status": job.status.value}

    # -- models ----------------------------------------------------------------------

    async def refresh_replicas(self) -> dict[str, int]:
        """Ask how many replicas each model has ready; jobs waiting on a cold start learn
        when their model is up."""
        counts = await self._replicas.ready_counts()
        self._dispatch.replicas_ready(counts)
        return counts

    def waiting_on_cold_start(self) -> bool:
        return self._dispatch.waiting_on_cold_start()

    async def models(self) -> dict[str, Any]:
        counts = await self.refresh_replicas()
        out = []
        for spec in self._registry.models:
            served = spec.id in self._served
            replicas = counts.get(spec.id, 0) if served else 0
            out.append({
                "id": spec.id,
                "name": spec.name,
                "description": spec.description,
                "type": spec.type,
                "pipeline": spec.pipeline,
                "loaded": replicas > 0,
                "version": spec.version,
                "served": served,
                "replicas": replicas,
                "minReplicas": spec.scaling.min_replicas,
                "maxReplicas": spec.scaling.max_replicas,
                "maxBatchSize": spec.scaling.max_batch_size,
                "defaults": {"width": spec.defaults.width, "height": spec.defaults.height,
                             "steps": spec.defaults.steps, "sampler": spec.defaults.sampler,
                             "guidanceScale": spec.defaults.guidance_scale},
                "default": spec.id == self._settings.default_model,
            })
        return {"models": out}

    def _retry_after_s(self) -> int:
        avg_ms = self._book.average_ms
        avg_s = avg_ms / 1000 if avg_ms is not None else 5.0
        lanes = self._dispatch.lanes.values()
        slots = max(1, sum(lane.capacity for lane in lanes))
        return max(1, min(300, round(avg_s * self._dispatch.waiting / slots)))
