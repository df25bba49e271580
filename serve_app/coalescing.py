"""Concurrent calls to a remote batch method, coalesced into one call per round trip.

A Ray call costs the caller and the callee a few milliseconds of CPU each, whatever it
carries; on a busy submit path that per-call cost is most of the work. `Coalescer` sends
an item at once when no call is out (no added latency at low load); items that arrive
while calls are out wait and leave together in the next one. So the batch size follows
the load by itself, with no timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# What the batch method answers per item: its result, or the error that item ran into.
Outcome = R | BaseException


class Coalescer(Generic[T, R]):
    """`await coalescer(item)` -> that item's result from `call([..., item, ...])`.

    `call` answers one outcome per item, in order: a result, or an exception instance
    that is raised to that item's caller only. If `call` itself raises, every caller of
    that batch gets the exception (the batch method decides what is safe to retry).
    """

    def __init__(
        self,
        call: Callable[[list[T]], Awaitable[Sequence[Outcome[R]]]],
        *,
        max_batch: int = 64,
        max_in_flight: int = 2,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        self._call = call
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._in_flight: set[asyncio.Task[None]] = set()

    async def __call__(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._flush()
        return await future

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def _flush(self) -> None:
        while self._pending and len(self._in_flight) < self._max_in_flight:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._in_flight.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._flush()

    async def _send(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            outcomes = await self._call([item for item, _ in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(
                    f"batch call answered {len(outcomes)} outcomes for {len(batch)} items"
                )
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # its caller went away
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
