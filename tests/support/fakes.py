"""Hand-written fakes: model replicas and a clock, for tests that need no Ray."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from serve_app.errors import ReplicaLost
from serve_app.jobs.persistence import InlineStoreCalls
from serve_app.messages import (
    Finished,
    GenerationResult,
    GenerationTask,
    Progress,
    ReplicaEvent,
    Started,
)


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


def fake_image(task: GenerationTask, seed: int) -> bytes:
    return f"{task.prompt}|{seed}|{task.width}x{task.height}".encode()


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
                images = [fake_image(task, s) for s in task.seeds]
                yield Finished(GenerationResult(images, task.seeds, "image/png", model=model_id,
                                                replica=f"{model_id}#fake", job_id=task.job_id,
                                                time_taken_ms=self.elapsed_ms))
        finally:
            self.closed.extend(task.job_id for task in tasks)

    async def replica_states(self) -> dict[str, dict[str, int]]:
        return {m: {"ready": n, "starting": 0} for m, n in self.replicas.items()}
