"""The hires fix on the replica: one text2img job in two passes, as AUTOMATIC1111 runs it
(`StableDiffusionProcessingTxt2Img.sample_hr_pass`).

1. The first pass at the task's `width` x `height`: latents out (`latent*` upscalers), or
   decoded images (image upscalers).
2. Scaled to cover the target with the first pass's aspect, centre-cropped
   (`serve_app.hires_plan`): latents by `torch.nn.functional.interpolate` in the mode the
   upscaler names; images by an image upscaler (`image_upscaler`: Pillow's Lanczos or
   nearest, or one a model plugs in by name).
3. Refined by the family's img2img pipeline at the target size (`ModeCalls.refine`):
   `hires.steps` steps at `hires.denoising_strength` with `hires.sampler`, fresh noise from
   the same seeds (A1111 re-seeds its generator for the second pass too).

Contract, as `ModelRunner.generate`'s: the same seed gives the same image; a batch of
tasks with equal `batch_key`s (the same hires fix) gives each task the images it makes
alone, byte for byte (both passes are batch-invariant calls with per-image generators);
`on_step` sees one count across both passes (`total` = the first pass's timesteps plus an
estimate of the second's until it starts, then both exactly), with phase "hires" in the
second; `should_stop` stops either pass at its next step (and between them) and raises
`Interrupted`. A 9-channel inpainting model runs both passes on its inpainting route, so
its latent upscalers resample the decoded image (the same interpolation, in pixels).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from serve_app.errors import InvalidRequest
from serve_app.generation.previews import PreviewCallback, Previews
from serve_app.generation.steps import Interrupted, StepCallback, StepHook, StopCheck
from serve_app.hires_plan import LATENT_UPSCALERS, cover, crop_box, is_latent
from serve_app.messages import GenerationTask, HiresFix

if TYPE_CHECKING:
    from serve_app.generation.modes import Images, ModeCalls

HIRES_PHASE = "hires"

# An image upscaler: an image and the size to make it (exactly).
ImageUpscaler = Callable[[Image.Image, int, int], Image.Image]
_PIL_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}


def image_upscaler(name: str, extra: Mapping[str, ImageUpscaler] | None = None
                   ) -> ImageUpscaler:
    """The image upscaler `name`: Pillow's `lanczos` or `nearest`, or one of `extra` (model
    upscalers a replica has loaded, by their registry names)."""
    if extra and name in extra:
        return extra[name]
    if name not in _PIL_FILTERS:
        raise InvalidRequest(f"unknown hires upscaler {name!r}")
    resample = _PIL_FILTERS[name]

    def resize(image: Image.Image, width: int, height: int) -> Image.Image:
        return image.resize((width, height), resample)

    return resize


def upscale_image(image: Image.Image, hires: HiresFix, upscaler: ImageUpscaler
                  ) -> Image.Image:
    """`image` (the first pass) scaled to cover the hires target, centre-cropped to it."""
    size = cover(image.width, image.height, hires.width, hires.height)
    target = (hires.width, hires.height)
    scaled = upscaler(image, *size)
    return scaled if size == target else scaled.crop(crop_box(size, target))


def upscale_latents(latents: torch.Tensor, hires: HiresFix, first: tuple[int, int],
                    unit: int) -> torch.Tensor:
    """Spatial latents (batch, channels, h, w) of a `first`-sized pass scaled to cover the
    hires target (`unit`: pixels per latent pixel), centre-cropped, as A1111's latent modes
    do. Computed in float32 (bicubic and antialiasing need it on some devices)."""
    mode, antialias = LATENT_UPSCALERS[hires.upscaler]
    size = cover(first[0], first[1], hires.width, hires.height, unit)
    target = (hires.width // unit, hires.height // unit)
    scaled = torch.nn.functional.interpolate(
        latents.float(), size=(size[1], size[0]), mode=mode, antialias=antialias,
        **({} if mode.startswith("nearest") else {"align_corners": False}))
    left, top, right, bottom = crop_box(size, target)
    return scaled[:, :, top:bottom, left:right].to(latents.dtype)


def resample_like_latents(image: Image.Image, hires: HiresFix) -> Image.Image:
    """A decoded image scaled with a latent upscaler's interpolation (for models whose
    passes run on the inpainting route, which take images, not latents)."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))
    batch = pixels.permute(2, 0, 1)[None]
    scaled = upscale_latents(batch, hires, (image.width, image.height), 1)
    out = scaled[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(out)


class HiresRun:
    """One hires call over `tasks` (equal `batch_key`s), on `modes` under the runner's
    lock. See the module docstring."""

    def __init__(self, modes: ModeCalls, tasks: list[GenerationTask],
                 on_step: StepCallback | None, should_stop: StopCheck | None,
                 on_preview: PreviewCallback | None) -> None:
        hires = tasks[0].hires
        if hires is None:
            raise ValueError("HiresRun needs tasks with a hires fix")
        self.modes = modes
        self.tasks = tasks
        self.hires = hires
        self._on_step = on_step
        self._should_stop = should_stop
        self._on_preview = on_preview
        self._first_total = 0
        self._second_total = 0

    def run(self) -> Images:
        modes, first, hires = self.modes, self.tasks[0], self.hires
        latent = is_latent(hires.upscaler) and not modes.pipes.inpaint_route
        hook = StepHook(self._first_step, self._should_stop, self._previews(
            self.tasks, self._first_preview))
        made, _ = modes.first_pass(self.tasks, hook, "latent" if latent else "pil")
        if self._should_stop is not None and self._should_stop():
            raise Interrupted(f"task {first.job_id} was stopped between its passes")
        size = (first.width, first.height)
        if latent:
            pipe = modes.pipes.text2img()
            spatial = modes.family.spatial_latents(pipe, torch.stack(made), *size)
            image: torch.Tensor | list[Image.Image] = upscale_latents(
                spatial, hires, size, int(pipe.vae_scale_factor))
        elif is_latent(hires.upscaler):
            image = [resample_like_latents(img, hires) for img in made]
        else:
            upscaler = image_upscaler(hires.upscaler, modes.image_upscalers)
            image = [upscale_image(img, hires, upscaler) for img in made]
        second = [dataclasses.replace(t, width=hires.width, height=hires.height,
                                      steps=hires.steps, sampler=hires.sampler, hires=None)
                  for t in self.tasks]
        hook = StepHook(self._second_step, self._should_stop,
                        self._previews(second, self._second_preview))
        return modes.refine(second, hook, image, hires.denoising_strength)

    def _previews(self, tasks: list[GenerationTask],
                  sink: PreviewCallback) -> Previews | None:
        if self._on_preview is None:
            return None
        return Previews.wanted(tasks, self.modes.previewer, self.modes.family, sink)

    # -- one count across both passes ----------------------------------------------------

    def _estimate_second(self, first_total: int) -> int:
        """The second pass's timesteps before it starts: its denoising steps, times the
        first pass's timesteps per step (second-order samplers take about two)."""
        per_step = max(1, round(first_total / max(1, self.tasks[0].steps)))
        return self.hires.denoising_steps * per_step

    def _first_step(self, step: int, total: int) -> None:
        self._first_total = total
        if self._on_step is not None:
            self._on_step(step, total + self._estimate_second(total))

    def _second_step(self, step: int, total: int) -> None:
        self._second_total = total
        if self._on_step is not None:
            self._on_step(self._first_total + step, self._first_total + total, HIRES_PHASE)

    def _first_preview(self, step: int, total: int, thumbnails: dict[str, bytes]) -> None:
        if self._on_preview is not None:
            self._on_preview(step, total + self._estimate_second(total), thumbnails)

    def _second_preview(self, step: int, total: int, thumbnails: dict[str, bytes]) -> None:
        if self._on_preview is not None:
            self._on_preview(self._first_total + step, self._first_total + total,
                             thumbnails, HIRES_PHASE)
