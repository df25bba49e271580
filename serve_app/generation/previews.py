"""Thumbnails of the image forming, from the latents, every N steps (`preview: true`).

Decoding the latents with the VAE at every step would cost as much as the final decode
each time; instead a preview is a linear map of each latent pixel's channels to RGB, then
upscaled: a fraction of a millisecond for a 64x64 latent. The map is fitted, once per
model and on first use, to the model's own VAE: a few seeded random latents are decoded,
the decoded images are averaged down to latent resolution, and least squares gives the
weights (channels x RGB) and a bias. So it fits any family (4 or 16 latent channels) and
any checkpoint, the tiny seeded models included, without tables of magic numbers per
family; the last step's preview is close to a blurred copy of the final image.

`Previews` is what a pipeline call's `StepHook` holds: which tasks want a thumbnail at
which steps, where each task's images sit in the batch, and where the thumbnails go.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from PIL import Image

from serve_app.generation.families import Family
from serve_app.messages import GenerationTask

log = logging.getLogger(__name__)

# (step, total steps, {job id: JPEG thumbnail of its first image}), and the phase in a
# hires fix's second pass, as `StepCallback`.
PreviewCallback = Callable[..., None]

# The longer side of a thumbnail, at most (never larger than the image itself).
THUMBNAIL_SIDE = 128
JPEG_QUALITY = 70
# Fitting: this many random latents of this size decoded once per model.
_FIT_SAMPLES = 8
_FIT_SIDE = 8


@dataclass(frozen=True)
class Projection:
    """Latent channels -> RGB in [-1, 1]: `rgb = latent @ weights + bias`."""

    weights: torch.Tensor  # (channels, 3), float32, CPU
    bias: torch.Tensor  # (3,)

    @classmethod
    def fit(cls, pipe: DiffusionPipeline) -> Projection | None:
        """Fitted to `pipe`'s VAE (see the module docstring), or None if it cannot be (a
        VAE that overflows in half precision on noise, say): previews are then skipped."""
        vae = pipe.vae
        channels = int(vae.config.latent_channels)
        scaling = float(vae.config.scaling_factor or 1.0)
        shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        generator = torch.Generator(device="cpu").manual_seed(0)
        latents = torch.randn(_FIT_SAMPLES, channels, _FIT_SIDE, _FIT_SIDE, generator=generator)
        # As the pipelines decode: a VAE that overflows in half precision, in float32.
        upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
        dtype = vae.dtype
        try:
            if upcast:
                vae.to(dtype=torch.float32)
            with torch.inference_mode():
                decoded = vae.decode((latents / scaling + shift).to(vae.device, vae.dtype)).sample
        finally:
            if upcast:
                vae.to(dtype=dtype)
        decoded = decoded.float().cpu()
        if not torch.isfinite(decoded).all():
            log.warning("latent previews are off for this model: its VAE decodes noise to "
                        "non-finite values in %s", vae.dtype)
            return None
        factor = decoded.shape[-1] // _FIT_SIDE
        pooled = F.avg_pool2d(decoded, factor) if factor > 1 else decoded
        x = latents.permute(0, 2, 3, 1).reshape(-1, channels)
        y = pooled.permute(0, 2, 3, 1).reshape(-1, 3)
        solution = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1)], dim=1), y).solution
        return cls(solution[:channels].contiguous(), solution[channels].contiguous())

    def thumbnail(self, latent: torch.Tensor, width: int, height: int) -> bytes:
        """One image's latent (channels, h, w) as a JPEG thumbnail of an image of `width` x
        `height` (THUMBNAIL_SIDE on its longer side at most)."""
        rgb = torch.einsum("chw,cr->rhw", latent.float().cpu(), self.weights)
        rgb = rgb + self.bias[:, None, None]
        scale = min(1.0, THUMBNAIL_SIDE / max(width, height))
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        rgb = F.interpolate(rgb[None], size=size, mode="bilinear", align_corners=False)[0]
        pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(out, "JPEG", quality=JPEG_QUALITY)
        return out.getvalue()


class Previewer:
    """A model's `Projection`, fitted when the first preview is asked for."""

    def __init__(self) -> None:
        self._projection: Projection | None = None
        self._fitted = False

    def projection(self, pipe: DiffusionPipeline) -> Projection | None:
        if not self._fitted:
            self._projection = Projection.fit(pipe)
            self._fitted = True
        return self._projection


@dataclass(frozen=True)
class Previews:
    """The thumbnails one pipeline call owes: `tasks` in batch order (each task's images
    follow the previous task's), each wanting one every `task.preview_every` steps."""

    tasks: list[GenerationTask]
    previewer: Previewer
    family: Family
    sink: PreviewCallback

    @classmethod
    def wanted(cls, tasks: list[GenerationTask], previewer: Previewer, family: Family,
               sink: PreviewCallback | None) -> Previews | None:
        if sink is None or not any(t.preview_every for t in tasks):
            return None
        return cls(tasks, previewer, family, sink)

    def after_step(self, pipe: DiffusionPipeline, step: int, total: int,
                   latents: torch.Tensor) -> None:
        """Thumbnails of the tasks due at `step` (1-based). None after the last step: the
        final image follows."""
        due = [t.preview_every > 0 and step % t.preview_every == 0 for t in self.tasks]
        if not any(due) or step >= total:
            return
        projection = self.previewer.projection(pipe)
        if projection is None:
            return
        first = self.tasks[0]
        spatial = self.family.spatial_latents(pipe, latents, first.width, first.height)
        thumbnails: dict[str, bytes] = {}
        offset = 0
        for task, wanted in zip(self.tasks, due, strict=True):
            if wanted:
                thumbnails[task.job_id] = projection.thumbnail(spatial[offset], task.width,
                                                               task.height)
            offset += task.num_images
        self.sink(step, total, thumbnails)
