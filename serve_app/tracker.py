"""The job tracker: owns every job, queues them per model, dispatches them, hears back.

Plain Python on one asyncio loop; the Ray actor in `deployments/tracker.py` is a thin shell
around it. What it needs from the outside is injected: the store (persistence), the
dispatcher (how a task reaches a model replica and how its events come back) and the clock.

A job's path: `submit` saves it and pushes it on its model's priority queue; `_pump`
releases queued jobs to the model's deployment while it has capacity; `_run` consumes the
replica's event stream (started, per-step progress, result) and records each transition.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any, Protocol

from serve_app.batch_window import BatchWindow
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
from serve_app.queues import JobQueues
from serve_app.registry import Registry
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

# Rendered records of recently finished jobs, so polling them costs no store read or JSON
# encoding. Bounded in bytes: a record carries its images.
RECENT_BYTES = 64 * 1024 * 1024
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
        self._store = store
        self._dispatcher = dispatcher
        self._served = served
        self._clock = clock
        self._active: dict[str, Job] = {}
        self._queues = JobQueues(served)
        self._running: dict[str, asyncio.Task[None]] = {}
        self._batches: dict[asyncio.Task[None], list[Job]] = {}
        self._calls: dict[str, int] = dict.fromkeys(served, 0)  # replica calls in flight
        self._inflight: dict[str, int] = dict.fromkeys(served, 0)  # jobs in those calls
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self._recent_bytes = 0
        self._replicas: dict[str, int] = {}  # ready replicas per model, as last seen
        self._windows = {m: BatchWindow(self._max_batch_wait_ms(m)) for m in served}
        self._held: dict[str, _Hold] = {}  # per model: the job waiting for companions
        self._closing = False
        self._counts = dict.fromkeys(JobStatus, 0)
        self._done_count = 0
        self._done_ms = 0

    # -- lifecycle -------------------------------------------------------------------

    def recover(self) -> int:
        """Load what the store holds: counters, and unfinished jobs back onto the queues."""
        self._counts.update(self._store.counts())
        self._done_count, self._done_ms = self._store.processing_time()
        recovered = 0
        for job in self._store.unfinished():
            if job.model not in self._served or job.task is None:
                reason = f"Model {job.model} is no longer served here"
                self._finish(job, lambda j, r=reason: j.fail(r, self._clock()))
                continue
            if job.status is JobStatus.PROCESSING:
                if job.attempts >= self._settings.max_attempts:
                    error = self._gave_up(job, "the service restarted while it ran")
                    self._finish(job, lambda j, e=error: j.fail(e, self._clock()))
                    continue
                self._transition(job, JobStatus.PROCESSING, JobStatus.QUEUED,
                                 lambda j: j.requeue("the service restarted while it ran"))
            self._active[job.id] = job
            self._queues.push(job)
            recovered += 1
        for model in self._queues.models():
            self._pump(model)
        return recovered

    def prune(self) -> int:
        cutoff = self._clock() - self._settings.retention_s * 1000
        removed = self._store.prune(cutoff, self._settings.retention_max_jobs)
        if removed:
            self._counts.update(self._store.counts())
            self._done_count, self._done_ms = self._store.processing_time()
            self._recent.clear()
            self._recent_bytes = 0
        return removed

    async def close(self) -> None:
        self._closing = True
        for held in self._held.values():
            held.timer.cancel()
        self._held.clear()
        for task in list(self._running.values()):
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)

    # -- API -------------------------------------------------------------------------

    def submit(self, sub: Submission) -> dict[str, Any]:
        if sub.idempotency_key:
            existing = self._store.find_idempotent(sub.idempotency_key)
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
        self._store.save(job)
        self._active[job.id] = job
        self._counts[JobStatus.QUEUED] += 1
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
        job = self._active.get(job_id)
        if job is not None:
            return json.dumps(job.to_wire(self._queue_position(job))).encode()
        cached = self._recent.get(job_id)
        if cached is not None:
            self._recent.move_to_end(job_id)
            return cached
        stored = self._store.load(job_id)
        if stored is None:
            raise JobNotFound()
        return self._remember(stored)

    def image(self, job_id: str, index: int) -> tuple[bytes, str]:
        job = self._active.get(job_id) or self._store.load(job_id)
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
            page = self._store.query(JobFilter(status, type, model), limit, cursor)
        except ValueError:
            raise InvalidRequest(
                "cursor is not valid: pass the nextCursor of a previous page"
            ) from None
        # Stored summaries are current but for the progress of running jobs.
        summaries = [self._active[j["id"]].summary() if j["id"] in self._active else j
                     for j in page.jobs]
        return {"jobs": summaries, "nextCursor": page.next_cursor}

    def cancel(self, job_id: str) -> dict[str, Any]:
        job = self._active.get(job_id)
        if job is None:
            stored = self._store.load(job_id)
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
        avg = self._done_ms // self._done_count if self._done_count else 0
        return {
            "queuedJobs": self._counts[JobStatus.QUEUED],
            "processingJobs": self._counts[JobStatus.PROCESSING],
            "completedJobs": self._counts[JobStatus.COMPLETED],
            "failedJobs": self._counts[JobStatus.FAILED],
            "cancelledJobs": self._counts[JobStatus.CANCELLED],
            "averageProcessingTime": avg,
            "maxQueueSize": self._settings.max_queue_size,
        }

    async def refresh_replicas(self) -> dict[str, int]:
        """Ask how many replicas each model has ready; jobs waiting on a cold start learn
        when their model is up."""
        counts = await self._dispatcher.replica_counts()
        self._replicas = counts
        for job in self._active.values():
            if job.phase == "loading_model" and counts.get(job.model, 0) > 0:
                job.phase = "waiting_for_replica"
        return counts

    def waiting_on_cold_start(self) -> bool:
        return any(job.phase == "loading_model" for job in self._active.values())

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

    def _call_slots(self, model: str) -> int:
        # One pipeline call per replica at a time. Calls past the ready replicas wait in
        # Serve's router, where the autoscaler sees them as demand and adds replicas, up
        # to max_replicas; jobs past that wait here, where priority and batching apply.
        spec = self._registry.get(model)
        return spec.scaling.max_replicas if spec else 1

    def _batch_size(self, model: str) -> int:
        spec = self._registry.get(model)
        return spec.scaling.max_batch_size if spec else 1

    def _max_batch_wait_ms(self, model: str) -> float:
        spec = self._registry.get(model)
        return spec.scaling.max_batch_wait_s * 1000 if spec else 0.0

    def _pump(self, model: str) -> None:
        loop = asyncio.get_running_loop()
        while (not self._closing and self._calls[model] < self._call_slots(model)
               and self._inflight[model] < self._settings.max_concurrent_jobs):
            lead = self._queues.peek(model)
            if lead is None:
                return
            size = min(self._batch_size(model),
                       self._settings.max_concurrent_jobs - self._inflight[model])
            key = lead.task.batch_key() if lead.task else None
            batch = (self._queues.matching(model, key, _batch_key, size)
                     if key is not None else [lead])
            if key is not None and len(batch) < size and self._hold(model, lead, loop):
                return  # a replica is free, but companions may be on their way
            if (held := self._held.pop(model, None)) is not None:
                held.timer.cancel()
            self._queues.pop(model)
            for job in batch[1:]:
                self._queues.remove(job.id)
            # With no ready replica the jobs wait for one to start (scale from zero).
            phase = "loading_model" if self._replicas.get(model, 0) == 0 else "waiting_for_replica"
            for job in batch:
                job.phase = phase
            self._calls[model] += 1
            self._inflight[model] += len(batch)
            name = f"jobs {lead.id}+{len(batch) - 1}"
            task = loop.create_task(self._run(model, batch), name=name)
            self._batches[task] = batch
            for job in batch:
                self._running[job.id] = task

    def _hold(self, model: str, lead: Job, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether `lead` waits for compatible jobs before it is dispatched (see
        `serve_app.batch_window`); if so, a timer ends the wait and pumps again."""
        held = self._held.get(model)
        if held is not None and held.job_id == lead.id:
            return not held.over
        if held is not None:
            held.timer.cancel()
            self._held.pop(model)
        if self._call_slots(model) - self._calls[model] > 1:
            return False  # other replicas are free too: holding would only idle them
        # The wait counts from submission: a job that already queued is not held again.
        wait_ms = self._windows[model].wait_ms(lead.task) if lead.task else 0.0
        wait_s = (wait_ms - (self._clock() - lead.created_at_ms)) / 1000
        if wait_s <= 0:
            return False
        hold = _Hold(lead.id, loop.call_later(wait_s, self._end_hold, model, lead.id))
        self._held[model] = hold
        return True

    def _end_hold(self, model: str, job_id: str) -> None:
        held = self._held.get(model)
        if held is not None and held.job_id == job_id:
            held.over = True
        self._pump(model)

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
                            self._transition(job, JobStatus.QUEUED, JobStatus.PROCESSING,
                                             lambda j, e=event: j.start(self._clock(), e.replica))
                    elif isinstance(event, Progress):
                        for job in live:
                            if job.status is JobStatus.PROCESSING:
                                job.report_progress(event.step, event.total)
                    elif isinstance(event, Finished):
                        if len(tasks) == 1:  # a lone job's run time: what a hold is 5% of
                            self._windows[model].observe(tasks, event.result.time_taken_ms)
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
                    self._active.pop(job.id, None)
            self._batches.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            self._calls[model] -= 1
            self._inflight[model] -= len(batch)
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
        self._done_count += 1
        self._done_ms += job_result.time_taken_ms

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
            self._transition(job, JobStatus.PROCESSING, JobStatus.QUEUED,
                             lambda j: j.requeue(reason))
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
        before = job.status
        transition(job)
        self._counts[before] -= 1
        self._counts[job.status] += 1
        self._store.save(job)
        if job.id not in self._running:
            self._active.pop(job.id, None)
        self._remember(job)

    def _transition(self, job: Job, before: JobStatus, after: JobStatus,
                    step: Callable[[Job], None]) -> None:
        step(job)
        self._counts[before] -= 1
        self._counts[after] += 1
        self._store.save(job)

    def _remember(self, job: Job) -> bytes:
        rendered = json.dumps(job.to_wire()).encode()
        old = self._recent.pop(job.id, None)
        self._recent_bytes += len(rendered) - (len(old) if old is not None else 0)
        self._recent[job.id] = rendered
        while self._recent_bytes > RECENT_BYTES and len(self._recent) > 1:
            _, evicted = self._recent.popitem(last=False)
            self._recent_bytes -= len(evicted)
        return rendered

    def _queue_position(self, job: Job) -> int | None:
        """1-based place among the model's waiting jobs; 0 once handed to a replica."""
        if job.status is not JobStatus.QUEUED:
            return None
        return 0 if job.id in self._running else self._queues.position(job)

    def _retry_after_s(self) -> int:
        avg_s = (self._done_ms / self._done_count / 1000) if self._done_count else 5.0
        slots = max(1, sum(self._call_slots(m) * self._batch_size(m) for m in self._served))
        return max(1, min(300, round(avg_s * len(self._queues) / slots)))


@dataclasses.dataclass
class _Hold:
    job_id: str
    timer: asyncio.TimerHandle
    over: bool = False


def _batch_key(job: Job) -> Any:
    return job.task.batch_key() if job.task else None


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
