"""Per-step plumbing of a pipeline call: progress and interruption, and CPU thread counts.

`StepHook` is the pipelines' `callback_on_step_end`: it reports `(step, total)` after every
denoising step (after the latent thumbnails the call owes, `serve_app.generation.previews`)
and, when asked to stop, sets `pipe._interrupt` (diffusers' supported way: the loop skips
the remaining steps); the caller then raises `Interrupted` rather than returning a partial
result. `cpu_threads` runs small images on one CPU thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import DiffusionPipeline

from serve_app.generation.previews import Previews
from serve_app.messages import GenerationTask

# (step, total), or (step, total, phase) in a hires fix's second pass (phase "hires",
# `serve_app.generation.hires`): a callback for hires tasks takes the third argument.
StepCallback = Callable[..., None]
StopCheck = Callable[[], bool]

# Below this many pixels per image a CPU call runs on one thread: a second one costs more
# in synchronization than it saves on layers this small (through the service, 64 px / 1 step:
# p50 49 ms on one thread, 57 ms on two), while batches of 128 px images gain from two.
SMALL_IMAGE_PIXELS = 128 * 128


class Interrupted(Exception):
    """`should_stop` asked the task to stop; no result was produced."""


class StepHook:
    """The pipeline's `callback_on_step_end`: reports progress and requests interruption."""

    def __init__(self, on_step: StepCallback | None, should_stop: StopCheck | None,
                 previews: Previews | None = None) -> None:
        self._on_step = on_step
        self._should_stop = should_stop
        self._previews = previews
        self.steps = 0
        self.stopped = False

    def tick(self, step: int, total: int) -> bool:
        """Progress of work outside a pipeline call (an upscale's tiles): report it, and
        whether to stop."""
        self.steps = step
        if self._on_step is not None:
            self._on_step(step, total)
        if self._should_stop is not None and self._should_stop():
            self.stopped = True
        return self.stopped

    def __call__(
        self, pipe: DiffusionPipeline, step: int, timestep: Any, tensors: dict[str, Any]
    ) -> dict[str, Any]:
        self.steps = step + 1
        total = int(pipe.num_timesteps)
        if self._previews is not None:
            self._previews.after_step(pipe, step + 1, total, tensors["latents"])
        if self._on_step is not None:
            self._on_step(step + 1, total)
        if self._should_stop is not None and self._should_stop():
            # diffusers' supported way to stop: the loop skips the remaining steps.
            pipe._interrupt = True
            self.stopped = True
        return tensors


@contextmanager
def cpu_threads(device: str, task: GenerationTask) -> Iterator[None]:
    """One torch thread for small images on a CPU, else the replica's count. It depends on
    the image size only, so a job gets the same count batched or alone (the layers are
    batch-invariant at any one thread count, not across counts)."""
    threads = torch.get_num_threads()
    if device != "cpu" or threads == 1 or task.width * task.height >= SMALL_IMAGE_PIXELS:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
