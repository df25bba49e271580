"""Server-sent events of one job, pushed: `GET /jobs/:id/events`.

Each event is `event: job`, `id: <digest of the record>` and the record (without images)
as `data`, sent when the job changes (status, phase, queue position, each step's progress),
then the final record, then the stream closes. A client that resumes with `Last-Event-ID`
is sent the current record only if it changed since. Heartbeat comments keep proxies from
closing a quiet stream; a stream with nothing to say for `IDLE_S` ends (the client may
reconnect). Framing is sse-starlette's.

Listeners of one job on this replica share one subscription to the tracker (`Subscriptions`),
which pushes each change through a streaming call: nothing polls.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType

from sse_starlette.sse import ServerSentEvent

from serve_app.api.backend import JobsBackend
from serve_app.errors import RateLimited
from serve_app.jobs.feeds import event_id, without_images
from serve_app.jobs.job import JobStatus
from serve_app.messages import Caller

HEARTBEAT_S = 15
IDLE_S = 600.0


class StreamSlots:
    """Open event streams per key on this replica, at most `cap` each
    (IMAGEGEN_MAX_STREAMS_PER_KEY): a stream holds a slot from before its first byte until
    it ends, however it ends."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._open: Counter[str] = Counter()

    def held(self, client: str) -> int:
        return self._open[client]

    def take(self, client: str) -> Slot:
        """A slot for one of `client`'s streams (a 429 past the cap); release it by using
        it as a context manager around the stream."""
        if self._open[client] >= self.cap:
            raise RateLimited(f"{self._open[client]} event streams are open for this key on "
                              f"this server (IMAGEGEN_MAX_STREAMS_PER_KEY is {self.cap}); "
                              "close one first", retry_after_s=5, limit=self.cap)
        self._open[client] += 1
        return Slot(self, client)

    def _release(self, client: str) -> None:
        self._open[client] -= 1
        if self._open[client] <= 0:
            del self._open[client]


class Slot:
    def __init__(self, slots: StreamSlots, client: str) -> None:
        self._slots: StreamSlots | None = slots
        self._client = client

    def release(self) -> None:
        """Once; later calls do nothing."""
        if self._slots is not None:
            self._slots._release(self._client)
            self._slots = None

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


@dataclass
class _Subscription:
    latest: bytes | None = None
    done: bool = False
    error: BaseException | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    listeners: int = 0
    task: asyncio.Task[None] | None = None


class Subscriptions:
    """One tracker subscription per job on this replica, however many listen."""

    def __init__(self, backend: JobsBackend) -> None:
        self._backend = backend
        self._subs: dict[str, _Subscription] = {}

    @property
    def open(self) -> int:
        return len(self._subs)

    async def listen(self, job_id: str, caller: Caller) -> AsyncIterator[bytes]:
        """Records of `job_id` (without images) as the tracker pushes them; the caller's
        right to see the job is checked before (`JobsBackend.get`)."""
        sub = self._subs.get(job_id)
        if sub is None:
            sub = self._subs[job_id] = _Subscription()
            sub.task = asyncio.create_task(self._pump(job_id, caller, sub))
        sub.listeners += 1
        seen: bytes | None = None
        try:
            while True:
                async with sub.changed:
                    try:
                        await asyncio.wait_for(
                            sub.changed.wait_for(
                                lambda seen=seen: sub.latest is not seen or sub.done),
                            IDLE_S)
                    except TimeoutError:
                        return  # nothing happened for IDLE_S: the client may reconnect
                    latest, done, error = sub.latest, sub.done, sub.error
                if latest is not None and latest is not seen:
                    seen = latest
                    yield latest
                if error is not None:
                    raise error
                if done:
                    return
        finally:
            sub.listeners -= 1
            if sub.listeners == 0:
                self._subs.pop(job_id, None)
                if sub.task is not None:
                    sub.task.cancel()

    async def _pump(self, job_id: str, caller: Caller, sub: _Subscription) -> None:
        try:
            async for record in self._backend.watch(job_id, caller):
                async with sub.changed:
                    sub.latest = record
                    sub.changed.notify_all()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            sub.error = exc
        async with sub.changed:
            sub.done = True
            sub.changed.notify_all()


async def job_events(subscriptions: Subscriptions, job_id: str, first: bytes, caller: Caller,
                     last_event_id: str | None) -> AsyncIterator[ServerSentEvent]:
    """The stream: the current record (unless the client has it), then every change."""
    record = without_images(json.loads(first))
    if event_id(record) != last_event_id:
        yield _event(record)
    if _finished(record):
        return
    last = record
    async for record in subscriptions.listen(job_id, caller):
        if record != last:
            yield _event(record)
            last = record
        if _finished(record):
            return


def _event(record: bytes) -> ServerSentEvent:
    return ServerSentEvent(data=record.decode(), event="job", id=event_id(record))


def _finished(record: bytes) -> bool:
    return JobStatus(json.loads(record)["status"]).is_terminal()
