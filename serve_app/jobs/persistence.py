"""The tracker's way to its store: off the event loop, bounded in time, written behind.

`StoreIO` runs every store call in a worker thread (writes in one thread, so they land in
the order they were made; reads in a small pool) and gives up after a timeout: a locked
SQLite file or an unreachable Redis then costs one request a 503, and never freezes the
loop that carries every other job's progress.

`WriteBehind` saves job state changes after the fact: the tracker changes a job in memory at
once and marks it; a background task saves the latest state of every marked job in one
store call, and retries (with backoff) until the store takes it. A job marked several times
before a save is saved once, in its latest state. Until then `pending` answers reads, so a
client never reads an older state than one it was told about. Only a new job's first save
is awaited (`StoreIO.write`): a submit is acknowledged once it is durable.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

from serve_app.errors import StoreTimeout, StoreUnavailable
from serve_app.jobs.codec import to_row
from serve_app.jobs.job import Job
from serve_app.stores.contract import JobRow, JobStore

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_FIRST_S = 0.05
RETRY_MAX_S = 2.0


class StoreCalls(Protocol):
    """How store calls are run: `StoreIO` (threads), or inline in tests."""

    store: JobStore

    async def write(self, call: Callable[[JobStore], T]) -> T: ...
    async def read(self, call: Callable[[JobStore], T]) -> T: ...
    def close(self) -> None: ...


class StoreIO:
    def __init__(self, store: JobStore, *, timeout_s: float = 3.0, readers: int = 2) -> None:
        self.store = store
        self._timeout_s = timeout_s
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="store-write")
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="store-read")

    async def write(self, call: Callable[[JobStore], T]) -> T:
        return await self._run(self._writer, call)

    async def read(self, call: Callable[[JobStore], T]) -> T:
        return await self._run(self._readers, call)

    async def _run(self, pool: ThreadPoolExecutor, call: Callable[[JobStore], T]) -> T:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(pool, call, self.store)
        try:
            return await asyncio.wait_for(future, self._timeout_s)
        except TimeoutError:
            raise StoreTimeout(
                f"The job store did not answer within {self._timeout_s:g} s; retry shortly"
            ) from None
        except Exception as exc:
            log.warning("store call failed: %s: %s", type(exc).__name__, exc)
            raise StoreUnavailable("The job store is unavailable; retry shortly") from exc

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self.store.close()


class InlineStoreCalls:
    """Store calls run on the caller's thread: for tests on a virtual-time loop, where a
    thread would race the jumping clock. Failures still surface as `StoreUnavailable`."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    async def write(self, call: Callable[[JobStore], T]) -> T:
        return self._run(call)

    async def read(self, call: Callable[[JobStore], T]) -> T:
        return self._run(call)

    def _run(self, call: Callable[[JobStore], T]) -> T:
        try:
            return call(self.store)
        except StoreUnavailable:
            raise  # (a test's store playing a timeout)
        except Exception as exc:
            raise StoreUnavailable("The job store is unavailable; retry shortly") from exc

    def close(self) -> None:
        self.store.close()


class WriteBehind:
    def __init__(self, calls: StoreCalls) -> None:
        self._calls = calls
        self._marked: dict[str, Job] = {}  # changed, not yet handed to the store
        self._saving: dict[str, Job] = {}  # handed to the store, not yet confirmed
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._saved = asyncio.Event()  # set and cleared after each successful save
        self._taken = 0  # save batches handed to the store so far
        self._done = 0  # the latest of them the store confirmed
        self._task: asyncio.Task[None] | None = None

    def mark(self, job: Job) -> None:
        """`job` changed: save its state soon."""
        self._marked[job.id] = job
        self._idle.clear()
        self._wake.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="write-behind")

    def pending(self, job_id: str) -> Job | None:
        """The job's state that the store may not have yet."""
        return self._marked.get(job_id) or self._saving.get(job_id)

    @property
    def backlog(self) -> int:
        return len(self._marked) + len(self._saving)

    async def flush(self) -> None:
        """Until every job marked so far is saved (retrying through store errors)."""
        await self._idle.wait()

    async def saved(self, job_ids: Sequence[str]) -> None:
        """Until the store has these jobs' states as of now (later changes may still be
        on their way): what a reader of the store (the ingress, `serve_app.jobs.reads`)
        must see once a client was told of it."""
        if any(i in self._marked for i in job_ids):
            batch = self._taken + 1  # the next batch carries them
        elif any(i in self._saving for i in job_ids):
            batch = self._taken
        else:
            return
        while self._done < batch:
            await self._saved.wait()

    async def close(self, timeout_s: float = 5.0) -> None:
        """Save what is marked (for up to `timeout_s`), then stop."""
        try:
            await asyncio.wait_for(self.flush(), timeout_s)
        except TimeoutError:
            log.error("%d job state(s) not saved at shutdown: the store did not answer; a "
                      "restart resumes them from their last saved state", self.backlog)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        pause = RETRY_FIRST_S
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._marked:
                continue
            self._saving, self._marked = self._marked, {}
            self._taken += 1
            rows = [to_row(job) for job in self._saving.values()]
            try:
                await self._calls.write(functools.partial(_save, rows=rows))
            except StoreUnavailable:
                # Put back what was not marked again meanwhile; saved in its latest state.
                self._marked = self._saving | self._marked
                self._saving = {}
                log.warning("saving %d job state(s) failed; retrying in %.2f s",
                            len(self._marked), pause)
                await asyncio.sleep(pause)
                pause = min(RETRY_MAX_S, pause * 2)
                self._wake.set()
                continue
            pause = RETRY_FIRST_S
            self._saving = {}
            self._done = self._taken  # a batch that failed went out again in this one
            self._saved.set()
            self._saved.clear()  # wakes the waiters of `saved`; the next save sets it again
            if not self._marked:
                self._idle.set()


def _save(store: JobStore, rows: list[JobRow]) -> None:
    store.save_many(rows)
