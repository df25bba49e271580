"""The job tracker: the API the ingress calls, over one `Dispatch` and one `JobBook`.
(Over ~300 lines: it is the tracker's whole interface, declared here once, a short method
each.)

Plain Python on one asyncio loop; the Ray actor in `deployments/tracker.py` is a thin shell
around it. What it needs from the outside is injected: the store (through `StoreCalls`),
the replicas (how a call reaches a model and how its events come back) and the clock.

Its methods marked `@tracker_call` are the tracker's interface, declared here once: the Ray
shell, the ingress's handle client and its shard routing are derived from them
(`serve_app.jobs.interface`), and in process the tracker itself is the routes' backend.

A job's path: `submit_many` saves it (a submit is acknowledged once it is durable) and
hands it to `Dispatch`, which queues it, sends it to a replica call when the model's lane
allows, and settles it from what the replica says (see `serve_app.jobs.dispatch`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from serve_app.blobs import Blobs, open_blobs
from serve_app.errors import Forbidden, JobNotCancellable, JobNotFound, ServiceError
from serve_app.jobs import jsontext
from serve_app.jobs.book import JobBook
from serve_app.jobs.callers import CallerNotes
from serve_app.jobs.calls import Limits, Replicas
from serve_app.jobs.catalog import describe_models
from serve_app.jobs.codec import loads
from serve_app.jobs.delivery import Sender
from serve_app.jobs.dispatch import Dispatch
from serve_app.jobs.feeds import Feeds, without_images
from serve_app.jobs.housekeeping import BlobSweep, Retention
from serve_app.jobs.intake import Intake, Outcome
from serve_app.jobs.interface import Route, calls_of, tracker_call
from serve_app.jobs.job import Job, JobStatus
from serve_app.jobs.joblog import JobLog
from serve_app.jobs.lanes import Lane
from serve_app.jobs.metrics import ServiceMetrics
from serve_app.jobs.persistence import StoreCalls
from serve_app.jobs.pools import PoolView
from serve_app.jobs.queues import JobQueues
from serve_app.jobs.ratelimit import RateLimiter
from serve_app.jobs.reads import image_of, query_page, queue_counts
from serve_app.jobs.results import gave_up
from serve_app.jobs.webhooks import WebhookNotifier, image_urls
from serve_app.messages import OPEN, Caller, Submission
from serve_app.model_runtime import Scaling
from serve_app.registry import Registry
from serve_app.settings import Settings
from serve_app.shards import PRIMARY, ShardMap

log = logging.getLogger(__name__)


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
        webhook_sender: Sender | None = None,
        shards: ShardMap | None = None,
        shard: int = PRIMARY,
        blobs: Blobs | None = None,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._served = served
        # Which tracker owns which models' jobs (`serve_app.shards`); alone, all of them.
        self._shards = shards or ShardMap((served,))
        self._shard = shard
        self._clock = clock
        self._replicas = replicas
        self._book = JobBook(store)
        self.metrics = ServiceMetrics()
        self._book.watch(self.metrics.job_changed)
        self._book.watch(JobLog().changed)
        queues = JobQueues(served, weights={k.name: k.weight for k in settings.api_keys})
        self._pools = PoolView({m: spec.pool for m in sorted(served)
                                if (spec := registry.get(m)) is not None and spec.pool})
        self._dispatch = Dispatch(
            book=self._book,
            lanes={m: self._lane(m, queues) for m in served},
            queues=queues,
            replicas=replicas,
            limits=Limits(settings.job_timeout_ms / 1000, settings.max_attempts),
            clock=clock,
            observer=self.metrics,
            pools=self._pools,
        )
        self._replica_states: dict[str, dict[str, int]] = {}
        self.metrics.live(queues.depths, lambda: self._replica_states,
                          lambda: self._pool_loads())
        self._intake = Intake(settings=settings, served=served, book=self._book,
                              dispatch=self._dispatch, clock=clock,
                              retry_after_s=self._retry_after_s,
                              shards=self._shards, shard=shard)
        self._reads = RateLimiter("requests", settings.read_rate, settings.read_burst)
        self._feeds = Feeds(before_end=lambda job_id: self._book.stored([job_id]))
        self._book.watch(self._feeds.changed)
        self._notes = CallerNotes()
        # The tracker never reads or writes image bytes: it deletes a pruned job's blobs,
        # sweeps orphans and signs the URLs webhooks carry.
        blobs = blobs or open_blobs(settings)
        self._retention = Retention(self._book, blobs, settings, clock)
        self._sweep = BlobSweep(blobs, self._book.calls, grace_s=settings.blob_sweep_grace_s,
                                clock=clock)
        self.webhooks = WebhookNotifier(self._book, settings, clock=clock, sender=webhook_sender,
                                        on_outcome=self.metrics.webhook_delivery,
                                        find=self._find_any,
                                        image_urls=image_urls(blobs, settings))

    @property
    def book(self) -> JobBook:
        return self._book

    @property
    def primary(self) -> bool:
        """The shard that also does what belongs to no model (pruning, warm workers)."""
        return self._shard == PRIMARY

    def owns(self, job: Job) -> bool:
        """Is `job` this tracker's (its model is this shard's, or no shard's and this is
        the primary)? Another shard's stored jobs are left to it."""
        return self._shards.owns(self._shard, job.model)

    def _lane(self, model: str, queues: JobQueues) -> Lane:
        # Served models come from the registry (a pool model runs under its pool's
        # scaling); the fallback (one job a call) is for safety.
        scaling = self._registry.scaling_of(model) or Scaling(max_batch_size=1)
        return Lane(model, scaling, queues=queues, max_jobs=self._settings.max_concurrent_jobs,
                    clock=self._clock, on_hold_over=lambda m: self._dispatch.pump(m))

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> int:
        """Load what the store holds: counts, and this shard's unfinished jobs back into
        the queues. A job that was running when the service stopped runs again, within its
        attempts; one of a model no longer served fails."""
        await self._book.load_totals()
        texts = await self._book.calls.read(lambda store: store.unfinished())
        loaded = {job.id: job for job in map(loads, texts) if self.owns(job)}
        runnable = []
        for job in loaded.values():
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
            runnable.append(job)
        # Webhooks first: a job handed to dispatch may run and settle while the resume
        # reads the store.
        await self.webhooks.resume(mine=self.owns)
        for job in runnable:
            self._dispatch.add(job)
        return len(runnable)

    async def prune(self) -> int:
        """Delete finished jobs past retention, and their blobs (`Retention`)."""
        return await self._retention.prune()

    async def sweep(self) -> int:
        """Delete blobs no record names (`BlobSweep`); how many."""
        return await self._sweep.run()

    async def _find_any(self, job_id: str) -> Job | None:
        """A job, live or stored (a webhook attempt looks its job up by id)."""
        return self._dispatch.live(job_id) or await self._book.find(job_id)

    async def close(self) -> None:
        await self._dispatch.close()
        await self.webhooks.close()
        await self._book.writes.close()

    def audit(self) -> list[str]:
        return self._dispatch.audit()

    # -- submit ----------------------------------------------------------------------

    @tracker_call(Route.MODEL)
    async def submit(self, sub: Submission) -> dict[str, Any]:
        """The new job's record (202), or the record of the job first submitted with the
        same Idempotency-Key."""
        (outcome,) = await self.submit_many([sub])
        if isinstance(outcome, ServiceError):
            raise outcome
        return outcome

    @tracker_call(Route.PRIMARY)
    async def admit(self, caller: Caller) -> None:
        """Spend the caller's submit token (429 when its bucket is empty). The ingress asks
        before it reads a submit's body, so a key past its budget costs nothing more; a
        submission it then sends is marked `admitted` and spends no second token."""
        (refused,) = self._intake.admit_many([caller])
        if refused is not None:
            raise refused

    @tracker_call(Route.PRIMARY)
    async def admit_many(self, callers: Sequence[Caller]) -> list[ServiceError | None]:
        """`admit` for several callers at once (the ingress coalesces them)."""
        return self._intake.admit_many(callers)

    @tracker_call(Route.MODEL)
    async def submit_many(self, subs: Sequence[Submission]) -> list[Outcome]:
        """Each submission's record, or the error that refused it; one refusal does not
        affect the others (see `serve_app.jobs.intake`)."""
        return await self._intake.submit_many(subs)

    # -- reads ---------------------------------------------------------------------
    # Every read names its caller: a key sees only its own jobs (another's answer as
    # unknown, 404), an admin key or an open service sees all. Reads draw on the caller's
    # read budget, but for the compatible APIs' waits (`limited=False`).

    @tracker_call(Route.JOB)
    async def get(self, job_id: str, caller: Caller = OPEN, *, limited: bool = True,
                  live: bool = False) -> bytes:
        """The record as JSON bytes: a live job rendered now, a finished one from the
        book's cache or the store. The tracker's read is always `live` (it has a running
        job's latest preview, which is never stored); an ingress that reads the store
        itself asks the tracker when `live` is set."""
        if limited:
            self._reads.take(caller.client)
        job = self._dispatch.live(job_id)
        if job is not None:
            _visible(job.owner, caller)
            return jsontext.dumps(self._render(job))
        owner, record = await self._book.rendered(job_id)
        _visible(owner, caller)
        return record

    @tracker_call(Route.JOB, stream=True)
    async def watch(self, job_id: str, caller: Caller = OPEN) -> AsyncIterator[bytes]:
        """The record (without images) now and at every change until the job ends: what an
        event stream sends. Pushed: nothing polls."""
        job = self._dispatch.live(job_id)
        if job is None:
            owner, record = await self._book.rendered(job_id)
            _visible(owner, caller)
            stored = jsontext.loads(record)
            self._shards.check_mine(self._shard, job_id, stored["model"],
                                    ended=JobStatus(stored["status"]).is_terminal())
            yield without_images(stored)
            return
        _visible(job.owner, caller)
        async for record in self._feeds.follow(job, self._render):
            yield record

    def _render(self, job: Job) -> dict[str, Any]:
        return job.to_wire(self._dispatch.position(job))

    @tracker_call(Route.JOB)
    async def image(self, job_id: str, index: int, caller: Caller = OPEN) -> dict[str, Any]:
        """Where image `index` of a completed job is (`serve_app.jobs.reads.image_of`): the
        ingress reads its bytes from the blob store, never through the tracker."""
        self._reads.take(caller.client)
        return image_of(await self._find(job_id, caller), index)

    @tracker_call(Route.PRIMARY)
    async def list_jobs(self, caller: Caller = OPEN, **filters: Any) -> dict[str, Any]:
        """A page of job summaries, newest first (`serve_app.jobs.reads.query_page`)."""
        self._reads.take(caller.client)
        page = await query_page(self._book.calls, caller, **filters)
        # Stored summaries are current but for the progress of running jobs.
        summaries = []
        for summary in page.jobs:
            live = self._dispatch.live(summary["id"])
            summaries.append(live.summary() if live is not None else summary)
        return {"jobs": summaries, "nextCursor": page.next_cursor}

    @tracker_call(Route.PRIMARY)
    async def queue_status(self, caller: Caller = OPEN) -> dict[str, Any]:
        """Everyone's counts for an admin key (or an open service), else the key's own."""
        self._reads.take(caller.client)
        return self.counts(caller)

    def counts(self, caller: Caller = OPEN) -> dict[str, Any]:
        """`queue_status`'s answer, at once and outside the read budget (for code on the
        tracker's own loop, and tests)."""
        return queue_counts(self._book.totals, caller, self._settings.max_queue_size)

    async def _find(self, job_id: str, caller: Caller) -> Job:
        job = self._dispatch.live(job_id) or await self._book.find(job_id)
        if job is None:
            raise JobNotFound()
        _visible(job.owner, caller)
        return job

    def _mine(self, job: Job) -> Job:
        """`job`, if this shard may change it (`ShardMap.check_mine`)."""
        self._shards.check_mine(self._shard, job.id, job.model,
                                ended=job.status.is_terminal())
        return job

    # -- cancel ----------------------------------------------------------------------

    @tracker_call(Route.JOB)
    async def cancel(self, job_id: str, caller: Caller = OPEN) -> dict[str, Any]:
        """A queued job leaves its queue; a running one is interrupted at its next step.
        Cancelling a cancelled job answers the same again (a retried cancel is safe);
        a completed or failed one cannot be cancelled."""
        self._reads.take(caller.client)
        job = self._mine(await self._find(job_id, caller))
        job = self._dispatch.cancel(job_id) or job
        if job.status is not JobStatus.CANCELLED:
            raise JobNotCancellable(
                f"Job {job_id} cannot be cancelled: it is already {job.status}")
        await self._book.stored([job_id])  # a GET after the answer reads it cancelled
        return {"success": True, "id": job_id, "status": job.status.value}

    # -- models ----------------------------------------------------------------------

    async def refresh_replicas(self) -> dict[str, int]:
        """Ask how many replicas each model has ready (and starting); jobs waiting on a
        cold start learn when their model is up."""
        self._replica_states = await self._replicas.replica_states()
        counts = {m: s.get("ready", 0) for m, s in self._replica_states.items()}
        self._dispatch.replicas_ready(counts)
        return counts

    # -- metrics ---------------------------------------------------------------------

    @tracker_call(Route.SHARDS)
    async def metrics_text(self, caller: Caller = OPEN) -> bytes:
        """The Prometheus exposition of the whole service (admin keys only)."""
        if not caller.admin:
            raise Forbidden("Metrics are for admin keys")
        return self.metrics.exposition()

    @tracker_call(Route.PRIMARY)
    async def record_http(self, samples: list[tuple[str, str, int, float]]) -> None:
        """HTTP requests an ingress replica served since its last report."""
        self.metrics.http_requests(samples)

    @tracker_call(Route.PRIMARY)
    async def ready(self) -> dict[str, str]:
        """Readiness: this tracker answers and its store answers one read (StoreUnavailable
        otherwise). Free of rate limits: the ingress asks at most once a second."""
        await self._book.calls.read(lambda store: store.load("readiness-probe"))
        return {"tracker": "ok", "store": "ok"}

    def waiting_on_cold_start(self) -> bool:
        return self._dispatch.waiting_on_cold_start()

    @tracker_call(Route.SHARDS)
    async def models(self, caller: Caller = OPEN) -> dict[str, Any]:
        """GET /models: every served model, with this shard's replica counts."""
        self._reads.take(caller.client)
        counts = await self.refresh_replicas()
        # Every shard's models are served; the replica counts are this shard's own.
        return describe_models(self._registry, self._shards.served, counts,
                               self._settings.default_model, self._pools.loaded_counts(),
                               self._settings.model_path)

    def _pool_loads(self) -> list[tuple[str, str, int]]:
        """(pool, model, replicas holding it) for each of this shard's pool models."""
        return [(pool, model, count) for model, count in self._pools.loaded_counts().items()
                if (pool := self._pools.pool(model)) is not None]

    # -- per-caller settings (the compatible APIs' state, shared by every ingress) ----

    @tracker_call(Route.PRIMARY)
    async def remember(self, caller: Caller, name: str, value: str | None) -> None:
        """Keep a small per-caller setting (`serve_app.jobs.callers`)."""
        self._notes.remember(caller.client, name, value)

    @tracker_call(Route.PRIMARY)
    async def recall(self, caller: Caller) -> dict[str, str]:
        """The caller's settings that `remember` kept."""
        return self._notes.recall(caller.client)

    def _retry_after_s(self) -> int:
        avg_ms = self._book.average_ms()
        avg_s = avg_ms / 1000 if avg_ms is not None else 5.0
        lanes = self._dispatch.lanes.values()
        slots = max(1, sum(lane.capacity for lane in lanes))
        return max(1, min(300, round(avg_s * self._dispatch.waiting / slots)))


def _visible(owner: str | None, caller: Caller) -> None:
    """Another key's job is answered as unknown: its existence is not disclosed."""
    if not caller.may_see(owner):
        raise JobNotFound()


TRACKER_CALLS = calls_of(JobTracker)
