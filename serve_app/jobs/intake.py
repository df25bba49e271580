"""Taking submissions in: what is refused, what is a repeat, and what becomes a job.

In order, for each submission of a bundle (the ingress sends concurrent submits together):
its caller's submit budget (429 when the bucket is empty; spent already when the ingress
admitted the request before reading its body: `admit_many`); its Idempotency-Key, scoped to
the caller's API key and bound to the request (the same key answers the same job; with
another body it is a 409); the model; the queue (MAX_QUEUE_SIZE) and the caller's own cap
(429 for that key alone). The new jobs of a bundle are saved together, then queued: a submit
is acknowledged once its job is durable. One refusal does not affect the others.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from serve_app.errors import (
    IdempotencyConflict,
    InvalidRequest,
    QueueFull,
    ServiceError,
)
from serve_app.jobs.book import JobBook
from serve_app.jobs.dispatch import Dispatch
from serve_app.jobs.job import Job, new_job_id
from serve_app.jobs.ratelimit import RateLimiter
from serve_app.jobs.webhook_state import WebhookState
from serve_app.messages import Caller, Submission
from serve_app.settings import Settings
from serve_app.shards import PRIMARY, ShardMap

Outcome = dict[str, Any] | ServiceError


def scoped_key(sub: Submission) -> str | None:
    """Idempotency-Keys are one namespace per API key: another key's is never a match."""
    if sub.idempotency_key is None:
        return None
    return f"{sub.caller.name or '-'}/{sub.idempotency_key}"


class Intake:
    def __init__(self, *, settings: Settings, served: frozenset[str], book: JobBook,
                 dispatch: Dispatch, clock: Callable[[], int],
                 retry_after_s: Callable[[], int],
                 shards: ShardMap | None = None, shard: int = PRIMARY) -> None:
        """`served`: this tracker's models; `shards`: every shard's, and `shard` this one."""
        self._settings = settings
        self._served = served
        self._shards = shards or ShardMap((served,))
        self._shard = shard
        self._book = book
        self._dispatch = dispatch
        self._clock = clock
        self._retry_after_s = retry_after_s
        self.budget = RateLimiter("submits", settings.submit_rate, settings.submit_burst)
        # One bundle at a time: its jobs are saved and queued (and their keys findable)
        # before the next one looks at the queue or the keys.
        self._lock = asyncio.Lock()

    async def submit_many(self, subs: Sequence[Submission]) -> list[Outcome]:
        async with self._lock:
            return await self._submit_many(subs)

    def admit_many(self, callers: Sequence[Caller]) -> list[ServiceError | None]:
        """Spend each caller's submit token (a 429 for an empty bucket): what the ingress
        asks before it reads a submit's body."""
        outcomes: list[ServiceError | None] = []
        for caller in callers:
            try:
                self.budget.take(caller.client)
                outcomes.append(None)
            except ServiceError as exc:
                outcomes.append(exc)
        return outcomes

    async def _submit_many(self, subs: Sequence[Submission]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(subs)
        holders, released = await self._holders(subs)
        fresh: list[tuple[int, Job]] = []
        per_owner: Counter[str | None] = Counter()
        for i, sub in enumerate(subs):
            key = scoped_key(sub)
            try:
                if not sub.admitted:
                    self.budget.take(sub.caller.client)
                if key is not None and key in holders:
                    continue  # answered below with the holder's record
                job = self._new_job(sub, len(fresh), per_owner[sub.caller.name])
            except ServiceError as exc:
                outcomes[i] = exc
                continue
            fresh.append((i, job))
            per_owner[job.owner] += 1
            if key is not None:
                holders[key] = job
        jobs = [job for _, job in fresh]
        if released:  # their keys are free once their release is saved: then ours take them
            await self._book.stored(released)
        try:
            await self._book.add(jobs, self._clock())
        except ServiceError as exc:
            for i, _ in fresh:
                outcomes[i] = exc
            return [o if o is not None else exc for o in outcomes]
        for _, job in fresh:
            self._dispatch.add(job)
        for i, job in fresh:
            outcomes[i] = job.to_wire(self._dispatch.position(job))
        for i, sub in enumerate(subs):
            if outcomes[i] is None:  # a job holds its Idempotency-Key
                outcomes[i] = self._repeat(sub, holders[scoped_key(sub) or ""])
        return [o for o in outcomes if o is not None]

    def _new_job(self, sub: Submission, also_waiting: int, also_theirs: int) -> Job:
        self._shards.check_model(self._shard, sub.model)
        if sub.model not in self._served:
            raise InvalidRequest(f"Model {sub.model} is not served here")
        waiting = self._dispatch.waiting + also_waiting
        if waiting >= self._settings.max_queue_size:
            raise QueueFull(
                f"Queue is full ({waiting} jobs waiting, MAX_QUEUE_SIZE is "
                f"{self._settings.max_queue_size}); retry later",
                retry_after_s=self._retry_after_s())
        theirs = self._dispatch.queues.waiting(sub.caller.name) + also_theirs
        cap = self._settings.max_queued_per_key
        if sub.caller.name is not None and theirs >= cap:
            raise QueueFull(
                f"This API key has {theirs} jobs waiting, its limit "
                f"(IMAGEGEN_MAX_QUEUED_PER_KEY is {cap}); retry when some have started",
                retry_after_s=self._retry_after_s())
        now = self._clock()
        job = Job(id=sub.job_id or new_job_id(now), type=sub.type, model=sub.model,
                  request=sub.request,
                  created_at_ms=now, priority=sub.priority, idempotency_key=scoped_key(sub),
                  owner=sub.caller.name, fingerprint=sub.fingerprint,
                  request_id=sub.request_id,
                  webhook=WebhookState.of(sub.webhook) if sub.webhook is not None else None)
        job.task = dataclasses.replace(sub.task, job_id=job.id)
        return job

    async def _holders(self, subs: Sequence[Submission]) -> tuple[dict[str, Job], list[str]]:
        """Scoped Idempotency-Key -> the job that holds it, for keys already used; and the
        jobs that gave their key up (a submit refused with a 503 whose save may have
        landed), whose release may still be being written."""
        keys = sorted({k for k in map(scoped_key, subs) if k is not None})
        if not keys:
            return {}, []
        ids = await self._book.calls.read(
            lambda store: {k: store.find_idempotent(k) for k in keys})
        holders, released = {}, []
        for key, job_id in ids.items():
            job = (self._dispatch.live(job_id) or await self._book.find(job_id)
                   if job_id is not None else None)
            if job is not None and job.idempotency_key == key:
                holders[key] = job
            elif job is not None:
                released.append(job.id)
        return holders, released

    def _repeat(self, sub: Submission, holder: Job) -> Outcome:
        """The answer to a submission whose Idempotency-Key `holder` already holds."""
        if (sub.fingerprint is not None and holder.fingerprint is not None
                and sub.fingerprint != holder.fingerprint):
            return IdempotencyConflict(
                f"Idempotency-Key {sub.idempotency_key!r} was already used for a different "
                f"request (job {holder.id}); use a new key for a new request")
        return holder.to_wire(self._dispatch.position(holder))
