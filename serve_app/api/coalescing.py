"""Concurrent calls to a remote method, coalesced into bundles: one call per round trip.

A Ray call costs the caller and the callee a few milliseconds of CPU each, whatever it
carries; on a busy submit path that per-call cost is most of the work. `Coalescer` sends
an item at once when no call is out (no added latency at low load); items that arrive
while calls are out wait and leave together in the next one. So the bundle size follows
the load by itself, with no timer.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# What the bundle method answers per item: its result, or the error that item ran into.
Outcome = R | BaseException


class Coalescer(Generic[T, R]):
    """`await coalescer(item)` -> that item's result from `call([..., item, ...])`.

    `call` answers one outcome per item, in order: a result, or an exception instance
    that is raised to that item's caller only. If `call` itself raises, every caller of
    that bundle gets the exception (the bundle method decides what is safe to retry).

    An item whose caller has gone (its await was cancelled) before its bundle leaves is not
    sent. With `max_wait_s`, an item that waited longer than that for a call to leave (the
    calls out are stuck retrying) fails with `expired()` instead of starting a new wait.
    """

    def __init__(
        self,
        call: Callable[[list[T]], Awaitable[Sequence[Outcome[R]]]],
        *,
        max_bundle: int = 64,
        max_in_flight: int = 2,
        max_wait_s: float | None = None,
        expired: Callable[[], BaseException] = lambda: TimeoutError("bundle call queue"),
    ) -> None:
        if max_bundle < 1 or max_in_flight < 1:
            raise ValueError("max_bundle and max_in_flight must be at least 1")
        self._call = call
        self._max_bundle = max_bundle
        self._max_in_flight = max_in_flight
        self._max_wait_s = max_wait_s
        self._expired = expired
        self._pending: list[tuple[T, asyncio.Future[R], float]] = []
        self._in_flight: set[asyncio.Task[None]] = set()

    async def __call__(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future, time.monotonic()))
        self._flush()
        return await future

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def _flush(self) -> None:
        self._drop_gone_and_expired()
        while self._pending and len(self._in_flight) < self._max_in_flight:
            bundle = [(item, future) for item, future, _ in self._pending[: self._max_bundle]]
            del self._pending[: self._max_bundle]
            # A fresh context: the call must not inherit the request context of whichever
            # caller happened to flush (Serve cancels a request's child calls when that
            # client disconnects, which would fail everyone else's items in the bundle).
            task = asyncio.get_running_loop().create_task(self._send(bundle),
                                                          context=contextvars.Context())
            self._in_flight.add(task)
            task.add_done_callback(self._sent)

    def _drop_gone_and_expired(self) -> None:
        now = time.monotonic()
        keep = []
        for entry in self._pending:
            future, queued = entry[1], entry[2]
            if future.done():
                continue
            if self._max_wait_s is not None and now - queued > self._max_wait_s:
                future.set_exception(self._expired())
                continue
            keep.append(entry)
        self._pending = keep

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._flush()

    async def _send(self, bundle: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            outcomes = await self._call([item for item, _ in bundle])
            if len(outcomes) != len(bundle):
                raise RuntimeError(
                    f"bundle call answered {len(outcomes)} outcomes for {len(bundle)} items"
                )
        except asyncio.CancelledError:
            for _, future in bundle:
                future.cancel()
            raise
        except Exception as exc:
            for _, future in bundle:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), outcome in zip(bundle, outcomes, strict=True):
            if future.done():  # its caller went away
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
