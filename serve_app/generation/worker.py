"""`ModelWorker`: the asyncio bridge a Ray Serve model replica delegates to.

Plain Python, testable without Ray. The replica's event loop must stay free (health checks,
new requests, cancellations), so the blocking pipeline call runs in a thread
(`asyncio.to_thread`) and its per-step progress comes back through an `asyncio.Queue` fed
with `loop.call_soon_threadsafe`.

Contract of `stream(task)`:
- One pipeline call at a time per worker (an `asyncio.Lock`); other tasks wait their turn.
- Events, in order: `Started(replica)`, `Progress(step, total)` for the first step, then at
  most every `progress_every_s` (0.1 s: the tracker, the store and every event stream need
  no more), and for the last step, `Finished(result)` with `result.replica` set. A hires
  fix's second pass names itself (`Progress.phase` "hires"; its first step always gets a
  `Progress`). A step with latent thumbnails (tasks with `preview_every`) always gets its
  `Progress`, carrying them. A runner error propagates unchanged.
- With a blob store (`blobs`, as every replica has one): the tasks' input images are read
  from it by their keys before the pipeline runs, and each result's images are written to
  it (`Blobs.store_output`) before its `Finished`, which then carries only references
  (`GenerationResult.refs`): no image bytes leave the replica. A store that fails raises
  `BlobStoreUnavailable` (the tracker retries the job as a replica fault).
- If the consumer goes away (its task is cancelled at an `await`, or it closes the
  generator with `aclose()`), the runner is told to stop at its next step, and the worker
  waits for the thread to finish before re-raising: the lock is released only once the
  pipeline is free, so the next task never overlaps a dying one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol, cast

from serve_app.blobs import Blobs
from serve_app.messages import (
    Finished,
    GenerationResult,
    GenerationTask,
    InputImage,
    Progress,
    ReplicaEvent,
    Started,
)


class Runner(Protocol):
    """What the worker needs of a `ModelRunner` (tests pass hand-written fakes)."""

    def generate(
        self,
        task: GenerationTask,
        on_step: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_preview: Callable[[int, int, dict[str, bytes]], None] | None = None,
    ) -> GenerationResult: ...

    def generate_batch(
        self,
        tasks: list[GenerationTask],
        on_step: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_preview: Callable[[int, int, dict[str, bytes]], None] | None = None,
    ) -> list[GenerationResult]: ...


_DONE = object()  # queue sentinel: the pipeline thread has finished
PROGRESS_EVERY_S = 0.1


class ModelWorker:
    """Runs tasks on one runner, one at a time, streaming their progress."""

    def __init__(self, runner: Runner, replica_name: str,
                 progress_every_s: float = PROGRESS_EVERY_S, blobs: Blobs | None = None
                 ) -> None:
        self.runner = runner
        self.replica_name = replica_name
        self.progress_every_s = progress_every_s
        self.blobs = blobs
        self._lock = asyncio.Lock()

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    async def stream(
        self, task: GenerationTask | list[GenerationTask]
    ) -> AsyncIterator[ReplicaEvent]:
        """One task, or several jobs' tasks run as one batch: one `Finished` per task, in
        order, each result tagged with its task's `job_id`."""
        tasks = task if isinstance(task, list) else [task]
        async with self._lock:
            yield Started(self.replica_name)
            if self.blobs is not None:
                tasks = [await read_inputs(t, self.blobs) for t in tasks]
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[object] = asyncio.Queue()
            stop = threading.Event()

            sent = [0.0]  # when the last Progress left (monotonic)
            phases = [""]  # the pass the last Progress named

            def on_step(step: int, total: int, phase: str = "") -> None:
                now = time.monotonic()
                if (1 < step < total and now - sent[0] < self.progress_every_s
                        and phase == phases[0]):
                    return  # coalesced: the next one carries this step's progress too
                sent[0], phases[0] = now, phase
                loop.call_soon_threadsafe(queue.put_nowait, Progress(step, total, phase=phase))

            def on_preview(step: int, total: int, thumbnails: dict[str, bytes],
                           phase: str = "") -> None:
                # Before on_step for the same step, which this makes coalesce.
                sent[0], phases[0] = time.monotonic(), phase
                loop.call_soon_threadsafe(queue.put_nowait,
                                          Progress(step, total, thumbnails, phase))

            # Only asked of a runner when a task wants previews (fakes need not know it).
            wants = {"on_preview": on_preview} if any(t.preview_every for t in tasks) else {}

            def run() -> list[GenerationResult]:
                if len(tasks) == 1:
                    return [self.runner.generate(tasks[0], on_step, stop.is_set, **wants)]
                return self.runner.generate_batch(tasks, on_step, stop.is_set, **wants)

            job = asyncio.ensure_future(asyncio.to_thread(run))
            # Scheduled after every progress item the thread queued, so it arrives last.
            job.add_done_callback(lambda _: queue.put_nowait(_DONE))
            try:
                while (item := await queue.get()) is not _DONE:
                    yield cast(Progress, item)  # only Progress items and _DONE are queued
            except BaseException:
                # Cancelled, closed (GeneratorExit) or failed: stop the pipeline, wait for it.
                stop.set()
                await _settle(job)
                raise
            results = await job
            if self.blobs is not None:
                results = await asyncio.gather(*(store_outputs(t, r, self.blobs)
                                                 for t, r in zip(tasks, results, strict=True)))
        for t, result in zip(tasks, results, strict=True):
            yield Finished(dataclasses.replace(result, replica=self.replica_name, job_id=t.job_id))

    async def generate(self, task: GenerationTask) -> GenerationResult:
        """Run `task` to completion and return its result (progress is dropped)."""
        stream = self.stream(task)
        try:
            async for event in stream:
                if isinstance(event, Finished):
                    return event.result
        finally:
            await stream.aclose()
        raise RuntimeError("the worker's stream ended without a result")  # unreachable


async def read_inputs(task: GenerationTask, blobs: Blobs) -> GenerationTask:
    """`task` with the bytes of its stored input images (those with a key) read back."""
    async def read(image: InputImage) -> InputImage:
        if not image.key:
            return image
        return dataclasses.replace(image, png=await blobs.get_async(image.key))

    async def maybe(image: InputImage | None) -> InputImage | None:
        return None if image is None else await read(image)

    control = task.control
    if control is not None:
        control = dataclasses.replace(control, image=await read(control.image))
    return dataclasses.replace(task, init_image=await maybe(task.init_image),
                               mask_image=await maybe(task.mask_image),
                               style_image=await maybe(task.style_image), control=control)


async def store_outputs(task: GenerationTask, result: GenerationResult, blobs: Blobs
                        ) -> GenerationResult:
    """`result` with its images written to the blob store: references instead of bytes."""
    refs = await asyncio.gather(*(
        blobs.store_output(task.job_id, i, data, result.content_type, *task.output_size)
        for i, data in enumerate(result.images)))
    return dataclasses.replace(result, images=[], refs=tuple(refs))


async def _settle(job: asyncio.Future[list[GenerationResult]]) -> None:
    """Wait until `job` is done, through repeated cancellations, ignoring its outcome."""
    while not job.done():
        # Shielded: cancelling us must not cancel the wait for the thread.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.shield(job)
    if not job.cancelled():
        job.exception()  # mark the outcome as retrieved: no "never retrieved" warning
