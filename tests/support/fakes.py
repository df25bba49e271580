"""Hand-written fakes: model replicas and a clock, for tests that need no Ray."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from serve_app.blobs import Blobs, digest, open_blobs, output_key
from serve_app.errors import ReplicaLost
from serve_app.jobs.persistence import InlineStoreCalls
from serve_app.messages import (
    Finished,
    GenerationResult,
    GenerationTask,
    ImageRef,
    Progress,
    ReplicaEvent,
    Started,
)
from serve_app.settings import Settings


def memory_store() -> InlineStoreCalls:
    """A tracker's store: in memory, its calls run inline (no threads)."""
    from serve_app.stores.memory import MemoryStore

    return InlineStoreCalls(MemoryStore())


class FakeClock:
    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self.now = start_ms

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


# The blob store every in-process test shares (the `settings` fixture names it): fakes
# write results there as replicas do, and the routes read them back.
TEST_BLOBS = "memory://"


def shared_blobs(url: str = TEST_BLOBS) -> Blobs:
    return open_blobs(Settings(blob_url=url))


def fake_image(task: GenerationTask, seed: int) -> bytes:
    return f"{task.prompt}|{seed}|{task.width}x{task.height}".encode()


def finished(task: GenerationTask, images: list[bytes], job_id: str | None = None,
             blob_url: str = TEST_BLOBS, **fields: Any) -> Finished:
    """A task's `Finished` as a replica sends it (for `job_id`, by default the task's):
    its images written to the test blob store, the result carrying their references."""
    job_id = task.job_id if job_id is None else job_id
    refs = tuple(_store(task, job_id, i, data, shared_blobs(blob_url))
                 for i, data in enumerate(images))
    return Finished(GenerationResult([], task.seeds, "image/png", job_id=job_id, refs=refs,
                                     **fields))


def _store(task: GenerationTask, job_id: str, index: int, data: bytes, blobs: Blobs
           ) -> ImageRef:
    key = output_key(job_id, index, "png")
    blobs.put(key, data, "image/png")
    return ImageRef(key, "image/png", len(data), *task.output_size, digest(data))


def fake_previews(tasks: list[GenerationTask], step: int) -> dict[str, bytes]:
    """What a replica's latent thumbnails would be at `step`: the tasks with
    `preview_every` due, before the last step (`serve_app.generation.previews`)."""
    return {t.job_id: f"thumbnail of {t.job_id} at {step}".encode() for t in tasks
            if t.preview_every and step % t.preview_every == 0 and step < t.steps}


@dataclass
class FakeReplicas:
    """Plays the model replicas. Each run: Started, one Progress per step, Finished.

    `hold` (when set) parks every run after Started until released; `lose` makes the next
    N runs die like a killed replica (after Started); `explode` makes runs raise.
    """

    hold: asyncio.Event | None = None
    lose: int = 0
    explode: str | None = None
    elapsed_ms: int = 0  # the time_taken_ms each result reports
    replicas: dict[str, int] = field(default_factory=dict)
    calls: list[tuple[str, GenerationTask]] = field(default_factory=list)
    batches: list[list[str]] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    blob_url: str = TEST_BLOBS  # where results are written

    async def run(
        self, model_id: str, tasks: list[GenerationTask]
    ) -> AsyncGenerator[ReplicaEvent, None]:
        self.calls.extend((model_id, task) for task in tasks)
        self.batches.append([task.job_id for task in tasks])
        steps = tasks[0].steps
        try:
            yield Started(replica=f"{model_id}#fake")
            self.started.extend(task.job_id for task in tasks)
            if self.lose > 0:
                self.lose -= 1
                raise ReplicaLost("fake replica killed")
            if self.explode:
                raise RuntimeError(self.explode)
            for step in range(1, steps + 1):
                yield Progress(step, steps, fake_previews(tasks, step))
                if self.hold is not None and step == 1:
                    await self.hold.wait()
            for task in tasks:
                yield self.result(model_id, task)
        finally:
            self.closed.extend(task.job_id for task in tasks)

    def result(self, model_id: str, task: GenerationTask) -> Finished:
        return finished(task, [fake_image(task, s) for s in task.seeds], model=model_id,
                        replica=f"{model_id}#fake", time_taken_ms=self.elapsed_ms,
                        blob_url=self.blob_url)

    async def replica_states(self) -> dict[str, dict[str, int]]:
        return {m: {"ready": n, "starting": 0} for m, n in self.replicas.items()}
