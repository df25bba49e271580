"""Webhooks: the events a job asked for, sent to its URL off the tracker's hot path.
(Over ~300 lines: events, attempts, their backoff and resumption are one state machine.)

`WebhookNotifier` watches the book (`JobBook.watch`): when a job with a webhook starts or
ends, the watcher only records a `Delivery` in the job (its `webhook-id`, `msg_<job>_<event>`,
and its body, the job record at that moment with image URLs in place of the images:
presigned on an S3 image store, else `/jobs/:id/images/:n`), marks the job to be saved
with it, and arms a timer. Timers and the queue hold the job's id, not the job: a receiver
that is down for a day costs the tracker a few hundred bytes per delivery, and an attempt
finds its job (live, or from the store) when it runs; the jobs of attempts in flight (at
most `webhook_concurrency`) are the only ones held. Worker tasks (at most
`webhook_concurrency` at once) make the attempts; an attempt that gets no 2xx is tried
again after an exponential, jittered wait (`delivery.backoff_s`) until the delivery's
deadline (`webhook_deadline_s` from the event), then it is given up as `failed`. Every
change of a delivery is saved through the book like any job change, so a tracker that
restarts resumes pending deliveries (`resume`), with the same id and body: delivery is at
least once, and receivers de-duplicate by `webhook-id`.

`progress` is best effort: at most once a second per job, one attempt, never retried nor
resumed (a later progress or the final event supersedes it); the job record shows the
latest one sent.

`on_outcome` hears every attempt's outcome: "delivered", "retried" (failed, will be tried
again), "failed" (given up), "dropped" (a progress attempt that failed): for metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from serve_app.blobs import Blobs
from serve_app.jobs.book import JobBook
from serve_app.jobs.codec import loads
from serve_app.jobs.delivery import DeliveryFailed, HttpSender, Sender, backoff_s, signed_headers
from serve_app.jobs.job import Job, JobStatus
from serve_app.jobs.webhook_state import Delivery, DeliveryStatus, WebhookState
from serve_app.messages import WebhookEvent
from serve_app.settings import Settings, webhook_key

log = logging.getLogger(__name__)

PROGRESS_EVERY_MS = 1000
NO_SECRET = "WEBHOOK_SECRET is not set on the tracker: the webhook cannot be signed"


def _ignore(outcome: str) -> None:
    pass


def message_id(job_id: str, event: str) -> str:
    """The `webhook-id` of a job's event: the same on every attempt and after restarts."""
    return f"msg_{job_id.removeprefix('job_')}_{event}"


def payload(job: Job, event: WebhookEvent, urls: list[str]) -> str:
    """The body: the job record without its webhook section, with `event`, and with
    `urls` in place of the images."""
    record: dict[str, Any] = job.to_wire()
    record.pop("webhook", None)
    result = record.get("result")
    if result is not None:
        record["result"] = result | {"images": urls}
    return json.dumps({"event": event.value} | record, separators=(",", ":"))


def own_urls(job: Job, base_url: str) -> list[str]:
    """The service's own image URLs of a job (`GET /jobs/:id/images/:n`)."""
    count = len(job.result.images) if job.result is not None else 0
    return [f"{base_url.rstrip('/')}/jobs/{job.id}/images/{n}" for n in range(count)]


def image_urls(blobs: Blobs, settings: Settings) -> Callable[[Job, str], list[str]]:
    """A job's image URLs for a webhook body: presigned on an S3 store (valid until the
    delivery's deadline, and `IMAGEGEN_PRESIGN_EXPIRY_S` after), else the service's own."""
    if not blobs.signs:
        return own_urls
    expiry = settings.webhook_deadline_s + settings.presign_expiry_s

    def presigned(job: Job, base_url: str) -> list[str]:
        entries = job.result.images if job.result is not None else []
        own = own_urls(job, base_url)
        return [blobs.presigned(str(e["key"]), expiry) if isinstance(e, dict) else own[i]
                for i, e in enumerate(entries)]
    return presigned


async def _nowhere(job_id: str) -> Job | None:
    return None


class WebhookNotifier:
    def __init__(self, book: JobBook, settings: Settings, *, clock: Callable[[], int],
                 sender: Sender | None = None, rng: random.Random | None = None,
                 on_outcome: Callable[[str], None] = _ignore,
                 find: Callable[[str], Awaitable[Job | None]] = _nowhere,
                 image_urls: Callable[[Job, str], list[str]] = own_urls) -> None:
        """`find`: a job by id, live or stored; `image_urls`: a job's image URLs for a
        body, given the base URL its submit reached."""
        self._book = book
        self._find = find
        self._image_urls = image_urls
        self._clock = clock
        self._key = webhook_key(settings.webhook_secret) if settings.webhook_secret else None
        self._sender = sender or HttpSender(timeout_s=settings.webhook_timeout_s,
                                            allow_private=settings.webhook_allow_private)
        self._rng = rng or random.Random()
        self._on_outcome = on_outcome
        self._deadline_ms = settings.webhook_deadline_s * 1000
        self._base_s = settings.webhook_retry_base_s
        self._max_s = settings.webhook_retry_max_s
        self._concurrency = settings.webhook_concurrency
        self._queue: asyncio.Queue[tuple[str, Delivery]] = asyncio.Queue()
        self._held: dict[str, tuple[Job, int]] = {}  # jobs of attempts in flight, and how many
        self._scheduled: dict[str, asyncio.TimerHandle | None] = {}  # delivery id -> timer
        self._progress: dict[str, tuple[int, int]] = {}  # job id -> (progress, at ms) sent
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False
        book.watch(self._on_change)

    # -- events ----------------------------------------------------------------------

    def _on_change(self, job: Job, before: JobStatus | None) -> None:
        """Runs after every change of every job, on the tracker's loop: cheap, no I/O."""
        hook = job.webhook
        if hook is None:
            return
        if job.status is JobStatus.PROCESSING:
            if hook.wants(WebhookEvent.STARTED) and hook.get(WebhookEvent.STARTED) is None:
                self._add(job, hook, WebhookEvent.STARTED)
            if hook.wants(WebhookEvent.PROGRESS):
                self._maybe_progress(job, hook)
        elif job.status.is_terminal():
            self._progress.pop(job.id, None)
            event = WebhookEvent(job.status.value)
            if hook.wants(event) and hook.get(event) is None:
                self._add(job, hook, event)

    def _add(self, job: Job, hook: WebhookState, event: WebhookEvent) -> None:
        now = self._clock()
        delivery = Delivery(event, message_id(job.id, event.value),
                            self._body(job, hook, event), created_at_ms=now,
                            next_attempt_ms=now)
        hook.put(delivery)
        self._book.touch(job)  # saved with the job: a restart resumes it
        self._schedule(job.id, delivery)

    def _body(self, job: Job, hook: WebhookState, event: WebhookEvent) -> str:
        return payload(job, event, self._image_urls(job, hook.base_url))

    def _maybe_progress(self, job: Job, hook: WebhookState) -> None:
        sent, at_ms = self._progress.get(job.id, (0, 0))
        now = self._clock()
        if job.progress <= sent or now - at_ms < PROGRESS_EVERY_MS:
            return
        self._progress[job.id] = (job.progress, now)
        event = WebhookEvent.PROGRESS
        delivery = Delivery(event, message_id(job.id, f"progress_{job.progress}"),
                            self._body(job, hook, event), created_at_ms=now)
        self._schedule(job.id, delivery)

    # -- attempts ----------------------------------------------------------------------

    def _schedule(self, job_id: str, delivery: Delivery) -> None:
        if self._closed or delivery.id in self._scheduled:
            return  # closed: it stays pending in the saved record; the next start sends it
        self._start_workers()
        delay_s = max(0, (delivery.next_attempt_ms or self._clock()) - self._clock()) / 1000
        loop = asyncio.get_running_loop()
        if delay_s == 0:
            self._scheduled[delivery.id] = None
            self._queue.put_nowait((job_id, delivery))
        else:
            self._scheduled[delivery.id] = loop.call_later(
                delay_s, self._queue.put_nowait, (job_id, delivery))

    def _start_workers(self) -> None:
        if not self._workers:
            loop = asyncio.get_running_loop()
            self._workers = [loop.create_task(self._work(), name=f"webhooks-{i}")
                             for i in range(self._concurrency)]

    async def _work(self) -> None:
        while True:
            job_id, delivery = await self._queue.get()
            try:
                job = await self._hold(job_id)
                try:
                    await self._attempt(job, delivery)
                finally:
                    self._release(job_id)
            except Exception:
                log.exception("webhook %s of job %s: attempt failed unexpectedly",
                              delivery.id, job_id)
                self._scheduled.pop(delivery.id, None)

    async def _hold(self, job_id: str) -> Job | None:
        """The job, held while an attempt of it runs: attempts of one job at once change
        one object, so neither's save undoes the other's."""
        held = self._held.get(job_id)
        if held is not None:
            self._held[job_id] = (held[0], held[1] + 1)
            return held[0]
        job = await self._find(job_id)
        if job is not None:
            held = self._held.get(job_id)  # another attempt found it meanwhile
            job = held[0] if held is not None else job
            self._held[job_id] = (job, (held[1] if held is not None else 0) + 1)
        return job

    def _release(self, job_id: str) -> None:
        held = self._held.get(job_id)
        if held is not None:
            if held[1] <= 1:
                del self._held[job_id]
            else:
                self._held[job_id] = (held[0], held[1] - 1)

    async def _attempt(self, job: Job | None, delivery: Delivery) -> None:
        if job is None:  # no record any more: nothing to send, nothing to save
            self._scheduled.pop(delivery.id, None)
            return
        hook = job.webhook
        if hook is not None and delivery.event is not WebhookEvent.PROGRESS:
            # The job's own delivery: the one its record shows and its saves carry.
            delivery = hook.get(delivery.event) or delivery
        progress = delivery.event is WebhookEvent.PROGRESS
        stale = progress and job.status.is_terminal()  # the final event says more
        if hook is None or stale or delivery.status is not DeliveryStatus.PENDING:
            self._scheduled.pop(delivery.id, None)
            return
        if self._key is None:
            self._scheduled.pop(delivery.id, None)
            delivery.give_up(self._clock(), NO_SECRET)
            self._settled(job, hook, delivery, "failed")
            return
        if job.status.is_terminal():
            # A receiver that reads the job on its final event reads it from the store.
            await self._book.stored([job.id])
        body = delivery.payload.encode()
        headers = signed_headers(self._key, delivery.id, self._clock() // 1000, body)
        status: int | None = None
        error: str | None = None
        try:
            status = await self._sender.send(hook.url, headers, body)
        except DeliveryFailed as exc:
            error = exc.reason
        self._scheduled.pop(delivery.id, None)
        delivery.attempted(status, error)
        now = self._clock()
        if status is not None and 200 <= status < 300:
            delivery.delivered(now)
            outcome = "delivered"
        elif progress:
            delivery.give_up(now)
            outcome = "dropped"
        else:
            wait_ms = int(1000 * backoff_s(delivery.attempts, self._rng, base_s=self._base_s,
                                           max_s=self._max_s))
            if now + wait_ms > delivery.created_at_ms + self._deadline_ms:
                delivery.give_up(now)
                outcome = "failed"
                log.warning("webhook %s of job %s given up after %d attempt(s): %s",
                            delivery.id, job.id, delivery.attempts, error or f"HTTP {status}")
            else:
                delivery.retry_at(now + wait_ms)
                outcome = "retried"
        self._settled(job, hook, delivery, outcome)
        if outcome == "retried":
            self._schedule(job.id, delivery)

    def _settled(self, job: Job, hook: WebhookState, delivery: Delivery, outcome: str) -> None:
        if delivery.event is WebhookEvent.PROGRESS:
            hook.put(delivery)  # shown in the record, saved with the next change
        else:
            self._book.touch(job)
        self._on_outcome(outcome)

    # -- lifecycle ---------------------------------------------------------------------

    async def resume(self, mine: Callable[[Job], bool] = lambda job: True) -> int:
        """Schedule the pending deliveries the store holds (at start) of the jobs that are
        `mine` (another tracker shard resumes its own). Each attempt finds its job by id
        when it runs (the tracker's own object when the job is live)."""
        texts = await self._book.calls.read(lambda store: store.webhooks_pending())
        resumed = 0
        for text in texts:
            stored = loads(text)
            if not mine(stored):
                continue
            for delivery in stored.webhook.pending if stored.webhook is not None else []:
                if delivery.id not in self._scheduled:
                    self._schedule(stored.id, delivery)
                    resumed += 1
        return resumed

    async def close(self) -> None:
        """Stop: timers and attempts in flight are dropped; what is pending stays saved
        as pending, and a restart sends it again (same id)."""
        self._closed = True
        for timer in self._scheduled.values():
            if timer is not None:
                timer.cancel()
        self._scheduled.clear()
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        await self._sender.aclose()
