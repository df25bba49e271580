"""The job tracker: owns every job, queues them per model, dispatches them, hears back.

Plain Python on one asyncio loop; the Ray actor in `deployments/tracker.py` is a thin shell
around it. What it needs from the outside is injected: the store (persistence), the
dispatcher (how a task reaches a model replica and how its events come back) and the clock.

A job's path: `submit` records it (`serve_app.records`) and pushes it on its model's
priority queue; `_pump` sends queued jobs to the model's deployment as the model's lane
admits them (capacity and batching: `serve_app.lanes`); `_run` consumes the replica's event
stream (started, per-step progress, result) and records each transition.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any, Protocol

from serve_app.errors import (
    ImageNotFound,
    InvalidRequest,
    JobNotCancellable,
    JobNotFound,
    QueueFull,
    ReplicaLost,
    ServiceError,
)
from serve_app.jobs import Job, JobResult, JobStatus, new_job_id
from serve_app.lanes import Lane
from serve_app.queues import JobQueues
from serve_app.records import JobBook
from serve_app.registry import Registry, Scaling
from serve_app.schemas import (
    Finished,
    GenerationResult,
    GenerationTask,
    JobType,
    Progress,
    ReplicaEvent,
    Started,
    Submission,
)
from serve_app.settings import Settings
from serve_app.store import JobFilter, JobStore

log = logging.getLogger(__name__)

MAX_PAGE = 500


class Dispatcher(Protocol):
    """How tasks reach model replicas. Closing the stream early must cancel the task."""

    def run(
        self, model_id: str, tasks: list[GenerationTask]
    ) -> AsyncGenerator[ReplicaEvent, None]: ...

    async def replica_counts(self) -> dict[str, int]: ...


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class JobTracker:
    def __init__(
        self,
        *,
        settings: Settings,
        registry: Registry,
        store: JobStore,
        dispatcher: Dispatcher,
        served: frozenset[str],
        clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._dispatcher = dispatcher
        self._served = served
        self._clock = clock
        self._book = JobBook(store)
        self._queues = JobQueues(served)
        self._lanes = {m: self._lane(m) for m in served}
        self._running: dict[str, asyncio.Task[None]] = {}  # job id -> its replica call
        self._batches: dict[asyncio.Task[None], list[Job]] = {}  # replica call -> its jobs
        self._replicas: dict[str, int] = {}  # ready replicas per model, as last seen
        self._closing = False

    def _lane(self, model: str) -> Lane:
        spec = self._registry.get(model)
        # Served models come from the registry; the fallback (one job a call) is for safety.
        scaling = spec.scaling if spec else Scaling(max_batch_size=1)
        return Lane(model, scaling, queues=self._queues,
                    max_jobs=self._settings.max_concurrent_jobs, clock=self._clock,
                    on_hold_over=self._pump)

    # -- lifecycle -------------------------------------------------------------------

    def recover(self) -> int:
        """Load what the store holds: counters, and unfinished jobs back onto the queues."""
        self._book.load_totals()
        recovered = 0
        for job in self._book.store.unfinished():
            if job.model not in self._served or job.task is None:
                reason = f"Model {job.model} is no longer served here"
                self._finish(job, lambda j, r=reason: j.fail(r, self._clock()))
                continue
            if job.status is JobStatus.PROCESSING:
                if job.attempts >= self._settings.max_attempts:
                    error = self._gave_up(job, "the service restarted while it ran")
                    self._finish(job, lambda j, e=error: j.fail(e, self._clock()))
                    continue
                self._book.transition(
                    job, lambda j: j.requeue("the service restarted while it ran"))
            self._book.restore(job)
            self._queues.push(job)
            recovered += 1
        for model in self._queues.models():
            self._pump(model)
        return recovered

    def prune(self) -> int:
        cutoff = self._clock() - self._settings.retention_s * 1000
        return self._book.prune(cutoff, self._settings.retention_max_jobs)

    async def close(self) -> None:
        self._closing = True
        for lane in self._lanes.values():
            lane.close()
        for task in list(self._running.values()):
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)

    # -- API -------------------------------------------------------------------------

    def submit(self, sub: Submission) -> dict[str, Any]:
        if sub.idempotency_key:
            existing = self._book.store.find_idempotent(sub.idempotency_key)
            if existing is not None:
                return json.loads(self.get(existing))
        if sub.model not in self._served:
            raise InvalidRequest(f"Model {sub.model} is not served here")
        waiting = len(self._queues)
        if waiting >= self._settings.max_queue_size:
            raise QueueFull(
                f"Queue is full ({waiting} jobs waiting, MAX_QUEUE_SIZE is "
                f"{self._settings.max_queue_size}); retry later",
                retry_after_s=self._retry_after_s(),
            )
        now = self._clock()
        job = Job(
            id=new_job_id(now),
            type=sub.type,
            model=sub.model,
            request=sub.request,
            created_at_ms=now,
            priority=sub.priority,
            idempotency_key=sub.idempotency_key,
        )
        job.task = dataclasses.replace(sub.task, job_id=job.id)
        self._book.add(job)
        position = self._queues.push(job)
        self._pump(job.model)
        # Position 0: the job went straight to a replica.
        return job.to_wire(0 if job.id in self._running else position)

    def submit_many(self, subs: list[Submission]) -> list[dict[str, Any] | ServiceError]:
        """`submit` for each, in order; a submission that is refused (queue full, model not
        served) answers its error and does not affect the others."""
        outcomes: list[dict[str, Any] | ServiceError] = []
        for sub in subs:
            try:
                outcomes.append(self.submit(sub))
            except ServiceError as exc:
                outcomes.append(exc)
            except Exception as exc:  # a bug: answer 500 for this one, keep the others
                log.exception("submit failed")
                outcomes.append(ServiceError(
                    f"Internal error ({type(exc).__name__}); the job was not accepted"))
        return outcomes

    def get(self, job_id: str) -> bytes:
        """The record as JSON bytes: finished records are rendered once and cached."""
        job = self._book.live.get(job_id)
        if job is not None:
            return json.dumps(job.to_wire(self._queue_position(job))).encode()
        return self._book.rendered(job_id)

    def image(self, job_id: str, index: int) -> tuple[bytes, str]:
        job = self._book.find(job_id)
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

    def list_jobs(
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
        try:
            page = self._book.store.query(JobFilter(status, type, model), limit, cursor)
        except ValueError:
            raise InvalidRequest(
                "cursor is not valid: pass the nextCursor of a previous page"
            ) from None
        # Stored summaries are current but for the progress of running jobs.
        live = self._book.live
        summaries = [live[j["id"]].summary() if j["id"] in live else j for j in page.jobs]
        return {"jobs": summaries, "nextCursor": page.next_cursor}

    def cancel(self, job_id: str) -> dict[str, Any]:
        job = self._book.live.get(job_id)
        if job is None:
            stored = self._book.store.load(job_id)
            if stored is None:
                raise JobNotFound()
            raise JobNotCancellable(
                f"Job {job_id} cannot be cancelled: it is already {stored.status}"
            )
        running = self._running.get(job_id)
        self._queues.remove(job_id)
        self._finish(job, lambda j: j.cancel(self._clock()))
        if running is not None and all(j.status.is_terminal() for j in self._batches[running]):
            # Closing the replica's stream interrupts the pipeline at its next step. A job
            # cancelled out of a batch with live jobs just has its result dropped.
            running.cancel()
        return {"success": True, "id": job_id, "status": job.status.value}

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

    async def refresh_replicas(self) -> dict[str, int]:
        """Ask how many replicas each model has ready; jobs waiting on a cold start learn
        when their model is up."""
        counts = await self._dispatcher.replica_counts()
        self._replicas = counts
        for job in self._book.live.values():
            if job.phase == "loading_model" and counts.get(job.model, 0) > 0:
                job.phase = "waiting_for_replica"
        return counts

    def waiting_on_cold_start(self) -> bool:
        return any(job.phase == "loading_model" for job in self._book.live.values())

    async def models(self) -> dict[str, Any]:
        counts = await self.refresh_replicas()
        out = []
        for spec in self._registry.models:
            served = spec.id in self._served
            replicas = counts.get(spec.id, 0) if served else 0
            out.append(
                {
                    "id": spec.id,
                    "name": spec.name,
                    "description": spec.description,
                    "type": spec.type,
                    "loaded": replicas > 0,
                    "version": spec.version,
                    "served": served,
                    "replicas": replicas,
                    "minReplicas": spec.scaling.min_replicas,
                    "maxReplicas": spec.scaling.max_replicas,
                    "maxBatchSize": spec.scaling.max_batch_size,
                    "defaults": spec.defaults.model_dump(by_alias=False),
                    "default": spec.id == self._settings.default_model,
                }
            )
        return {"models": out}

    # -- dispatch ----------------------------------------------------------------------

    def _pump(self, model: str) -> None:
        """Send the model's queued jobs to its replicas while its lane admits them."""
        lane = self._lanes[model]
        while not self._closing and (batch := lane.admit()) is not None:
            # With no ready replica the jobs wait for one to start (scale from zero).
            ready = self._replicas.get(model, 0) > 0
            for job in batch:
                job.phase = "waiting_for_replica" if ready else "loading_model"
            name = f"jobs {batch[0].id}+{len(batch) - 1}"
            task = asyncio.get_running_loop().create_task(self._run(model, batch), name=name)
            self._batches[task] = batch
            for job in batch:
                self._running[job.id] = task

    async def _run(self, model: str, batch: list[Job]) -> None:
        """One replica call for `batch` (one job, or compatible jobs sharing a pipeline
        call): consume its events, record each transition, settle every job."""
        tasks = [job.task for job in batch if job.task is not None]
        by_id = {job.id: job for job in batch}
        timeout_s = self._settings.job_timeout_ms / 1000
        loop = asyncio.get_running_loop()
        outcome: tuple[str, str] | None = None
        try:
            # The deadline covers the wait for a replica (a cold start included), then
            # restarts when the replica takes the jobs.
            async with (
                asyncio.timeout(loop.time() + timeout_s) as deadline,
                aclosing(self._dispatcher.run(model, tasks)) as events,
            ):
                async for event in events:
                    live = [j for j in batch if not j.status.is_terminal()]
                    if not live:
                        break  # every job was cancelled while the replica worked
                    if isinstance(event, Started):
                        deadline.reschedule(loop.time() + timeout_s)
                        for job in live:
                            self._book.transition(
                                job, lambda j, e=event: j.start(self._clock(), e.replica))
                    elif isinstance(event, Progress):
                        for job in live:
                            if job.status is JobStatus.PROCESSING:
                                job.report_progress(event.step, event.total)
                    elif isinstance(event, Finished):
                        self._lanes[model].observe(tasks, event.result.time_taken_ms)
                        job = by_id.get(event.result.job_id) or batch[0]
                        if not job.status.is_terminal():
                            self._complete(job, event.result)
        except TimeoutError:
            outcome = ("fail", f"Job timed out after {timeout_s:g} s (JOB_TIMEOUT) and was "
                               "stopped")
        except ReplicaLost as exc:
            outcome = ("lost", str(exc))
        except asyncio.CancelledError:
            # Either cancel() (the jobs are already terminal) or close(): then the jobs stay
            # as stored, and the next start re-queues them.
            if not self._closing:
                outcome = ("fail", "The job's run was cancelled unexpectedly")
        except Exception as exc:  # the pipeline raised: its jobs fail, the service goes on
            log.exception("jobs %s failed", list(by_id))
            outcome = ("fail", f"Generation failed: {type(exc).__name__}: {exc}")
        else:
            outcome = ("lost", "the replica ended the job without a result")
        finally:
            for job in batch:
                if outcome is not None and not job.status.is_terminal():
                    if outcome[0] == "lost":
                        self._replica_lost(job, outcome[1])
                    else:
                        self._fail(job, outcome[1])
                self._running.pop(job.id, None)
                if job.status.is_terminal():
                    self._book.drop(job.id)
            self._batches.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            self._lanes[model].release(batch)
            self._pump(model)

    def _complete(self, job: Job, result: GenerationResult) -> None:
        now = self._clock()
        started = job.started_at_ms or now
        prefix = f"data:{result.content_type};base64,"
        job_result = JobResult(
            images=[prefix + base64.b64encode(img).decode() for img in result.images],
            seeds=result.seeds,
            parameters=self._parameters(job, result),
            time_taken_ms=now - started,
            content_type=result.content_type,
            nsfw_detected=result.nsfw_detected,
        )
        self._finish(job, lambda j: j.complete(job_result, now))

    def _parameters(self, job: Job, result: GenerationResult) -> dict[str, Any]:
        keys = ("prompt", "negativePrompt", "width", "height", "steps", "guidanceScale",
                "sampler", "strength", "inpaintingStrength", "styleStrength",
                "contentStrength", "numImages")
        params = {k: job.request[k] for k in keys if k in job.request}
        params["model"] = result.model or job.model
        params["replica"] = result.replica
        return params

    def _replica_lost(self, job: Job, reason: str) -> None:
        if job.status is JobStatus.PROCESSING and job.attempts < self._settings.max_attempts:
            log.warning("job %s lost its replica (%s); re-queued", job.id, reason)
            self._book.transition(job, lambda j: j.requeue(reason))
            self._queues.push(job)
        elif job.status is JobStatus.QUEUED and job.attempts + 1 < self._settings.max_attempts:
            # Lost before it started (routing failed, replica died while it waited).
            job.attempts += 1
            job.phase = f"retrying: {reason}"
            self._queues.push(job)
        else:
            self._fail(job, self._gave_up(job, reason))

    def _gave_up(self, job: Job, reason: str) -> str:
        return f"Job failed after {job.attempts} attempt(s): {reason}"

    def _fail(self, job: Job, error: str) -> None:
        if not job.status.is_terminal():
            self._finish(job, lambda j: j.fail(error, self._clock()))

    def _finish(self, job: Job, transition: Callable[[Job], None]) -> None:
        # A job of a replica call still out stays live until the call ends.
        self._book.finish(job, transition, keep_live=job.id in self._running)

    def _queue_position(self, job: Job) -> int | None:
        """1-based place among the model's waiting jobs; 0 once handed to a replica."""
        if job.status is not JobStatus.QUEUED:
            return None
        return 0 if job.id in self._running else self._queues.position(job)

    def _retry_after_s(self) -> int:
        avg_ms = self._book.average_ms
        avg_s = avg_ms / 1000 if avg_ms is not None else 5.0
        slots = max(1, sum(lane.capacity for lane in self._lanes.values()))
        return max(1, min(300, round(avg_s * len(self._queues) / slots)))


class InProcessBackend:
    """The `JobsBackend` the HTTP layer needs, over a tracker in the same process."""

    def __init__(self, tracker: JobTracker) -> None:
        self.tracker = tracker

    async def submit(self, sub: Submission) -> dict[str, Any]:
        return self.tracker.submit(sub)

    async def get(self, job_id: str) -> bytes:
        return self.tracker.get(job_id)

    async def image(self, job_id: str, index: int) -> tuple[bytes, str]:
        return self.tracker.image(job_id, index)

    async def list_jobs(self, **filters: Any) -> dict[str, Any]:
        return self.tracker.list_jobs(**filters)

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return self.tracker.cancel(job_id)

    async def queue_status(self) -> dict[str, Any]:
        return self.tracker.queue_status()

    async def models(self) -> dict[str, Any]:
        return await self.tracker.models()
