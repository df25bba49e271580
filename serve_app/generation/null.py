"""A model replica without a model, for measuring the service's own cost per job.

`source: null` in a registry entry: a runner that answers at once (or after
`runtime.null_step_ms` per step) with one tiny PNG per image (or one of
`runtime.null_image_bytes`, a real image's size), and reports every denoising
step like a real pipeline, so the tracker, the handles and the event streams do all their
work while the replica costs next to nothing. It imports no torch: a null replica starts in
a fraction of a second. Never served by the default registry; bench/ uses it.
"""

from __future__ import annotations

import base64
import random
import time
from collections.abc import Callable

from serve_app.messages import GenerationResult, GenerationTask
from serve_app.registry import ModelSpec

# 1x1 PNG, grey.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNoAAAAggCBd81ytgAAAABJRU5Er"
    "kJggg==")


def image_of_size(size: int) -> bytes:
    """An image of `size` bytes as a model would answer one: the tiny PNG for 0, else PNG's
    signature and bytes that do not compress (a photo's entropy), the same every time."""
    if size <= len(PNG):
        return PNG
    return PNG[:8] + random.Random(size).randbytes(size - 8)


class Interrupted(Exception):
    """Stopped at a step, like the pipeline runner's."""


class NullRunner:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._step_s = spec.runtime.null_step_ms / 1000
        self._image = image_of_size(spec.runtime.null_image_bytes)

    def generate(
        self,
        task: GenerationTask,
        on_step: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_preview: Callable[[int, int, dict[str, bytes]], None] | None = None,
    ) -> GenerationResult:
        (result,) = self.generate_batch([task], on_step, should_stop)
        return result

    def generate_batch(
        self,
        tasks: list[GenerationTask],
        on_step: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_preview: Callable[[int, int, dict[str, bytes]], None] | None = None,
    ) -> list[GenerationResult]:
        """`on_preview` is never called: there are no latents to show."""
        started = time.perf_counter()
        steps = tasks[0].steps
        for step in range(1, steps + 1):
            if self._step_s:
                time.sleep(self._step_s)
            if on_step is not None:
                on_step(step, steps)
            if should_stop is not None and should_stop():
                raise Interrupted(f"stopped after {step} step(s)")
        elapsed = round((time.perf_counter() - started) * 1000)
        return [GenerationResult([self._image] * t.num_images, t.seeds, "image/png",
                                 time_taken_ms=elapsed, model=self.spec.id, job_id=t.job_id)
                for t in tasks]

    def close(self) -> None:
        pass
