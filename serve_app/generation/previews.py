"""Thumbnails of the image forming, from the latents, every N steps (`preview: true`).

Decoding the latents with the VAE at every step would cost as much as the final decode
each time; instead a preview is a linear map of each latent pixel's channels to RGB, then
upscaled: a fraction of a millisecond for a 64x64 latent. The map is fitted, once per
model and on first use, to the model's own VAE: a few seeded pictures of random flat
colour blocks are encoded and decoded, the decoded pictures are averaged down to latent
resolution, and least squares gives the weights (channels x RGB) and a bias. So it fits
any family (4 or 16 latent channels) and any checkpoint, the tiny seeded models included,
without tables of magic numbers per family; the last step's preview is close to a blurred
copy of the final image. The latents are the encoder's, not random ones: a decoder
fine-tuned on real latents (the trained `tiny-sd`'s is) may draw noise in colours that
have nothing to do with what it draws from a picture's latents (a red square previewed
green). A VAE without an encoder is fitted on seeded random latents.

`Previews` is what a pipeline call's `StepHook` holds: which tasks want a thumbnail at
which steps, where each task's images sit in the batch, and where the thumbnails go.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterator
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
# Fitting: this many pictures of this size (blocks of flat colour) encoded and decoded once
# per model; random latents of `_FIT_SIDE` for a VAE without an encoder.
_FIT_SAMPLES = 8
_FIT_PICTURE = 64
_FIT_BLOCK = 16
_FIT_SIDE = 8
# The fit's shrinkage (`Projection.least_squares`), for the encoder's latents.
_RIDGE = 0.02
# A linear preview is used when it explains this much of the fitted pictures' colours.
LINEAR_R2 = 0.9


@dataclass(frozen=True)
class Projection:
    """Latent channels -> RGB in [-1, 1]: `rgb = latent @ weights + bias`."""

    weights: torch.Tensor  # (channels, 3), float32, CPU
    bias: torch.Tensor  # (3,)
    r2: float = 1.0  # the fraction of the fitted pictures' colour variance it explains

    @classmethod
    def fit(cls, pipe: DiffusionPipeline) -> Projection | None:
        """Fitted to `pipe`'s VAE (see the module docstring), or None if it cannot be (a
        VAE that overflows in half precision on noise, say): previews are then skipped."""
        vae = pipe.vae
        channels = int(vae.config.latent_channels)
        scaling = float(vae.config.scaling_factor or 1.0)
        shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        generator = torch.Generator(device="cpu").manual_seed(0)
        encoded = hasattr(vae, "encode")
        with _decoding_precision(vae), torch.inference_mode():
            if encoded:
                pictures = _colour_blocks(generator).to(vae.device, vae.dtype)
                latents = (vae.encode(pictures).latent_dist.mean.float().cpu() - shift) * scaling
            else:
                latents = torch.randn(_FIT_SAMPLES, channels, _FIT_SIDE, _FIT_SIDE,
                                      generator=generator)
            decoded = vae.decode((latents / scaling + shift).to(vae.device, vae.dtype)).sample
        decoded = decoded.float().cpu()
        if not torch.isfinite(decoded).all():
            log.warning("latent previews are off for this model: its VAE decodes to "
                        "non-finite values in %s", vae.dtype)
            return None
        factor = decoded.shape[-1] // latents.shape[-1]
        pooled = F.avg_pool2d(decoded, factor) if factor > 1 else decoded
        x = latents.permute(0, 2, 3, 1).reshape(-1, channels)
        y = pooled.permute(0, 2, 3, 1).reshape(-1, 3)
        return cls.least_squares(x, y, _RIDGE if encoded else 0.0)

    @classmethod
    def least_squares(cls, x: torch.Tensor, y: torch.Tensor, ridge: float) -> Projection:
        """`y ~ x @ weights + bias`, the weights shrunk by `ridge` (relative to the
        latents' mean variance): pictures' latents span fewer directions than the latent
        space has, and a direction the fit never saw must get no weight, or the noise
        still in a late step's latents lights up colours in the preview."""
        x_mean, y_mean = x.mean(0), y.mean(0)
        xc, yc = x - x_mean, y - y_mean
        gram = xc.T @ xc
        penalty = ridge * torch.trace(gram) / x.shape[1]
        weights = torch.linalg.solve(gram + penalty * torch.eye(x.shape[1]), xc.T @ yc)
        r2 = 1.0 - float((yc - xc @ weights).pow(2).sum() / yc.pow(2).sum().clamp_min(1e-12))
        return cls(weights.contiguous(), (y_mean - x_mean @ weights).contiguous(), r2)

    def thumbnail(self, latent: torch.Tensor, width: int, height: int) -> bytes:
        """One image's latent (channels, h, w) as a JPEG thumbnail of an image of `width` x
        `height` (THUMBNAIL_SIDE on its longer side at most)."""
        rgb = torch.einsum("chw,cr->rhw", latent.float().cpu(), self.weights)
        return _jpeg(rgb + self.bias[:, None, None], width, height)


class DecodedPreview:
    """Thumbnails decoded by the model's own VAE (in the precision the pipelines decode
    in), for a VAE whose latents no linear map reads (`Projection.r2` under `LINEAR_R2`;
    the trained `tiny-sd`'s: 0.62). Costs one VAE decode per thumbnail."""

    def __init__(self, pipe: DiffusionPipeline) -> None:
        self.vae = pipe.vae
        self.scaling = float(self.vae.config.scaling_factor or 1.0)
        self.shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    def thumbnail(self, latent: torch.Tensor, width: int, height: int) -> bytes:
        with _decoding_precision(self.vae), torch.inference_mode():
            z = (latent[None] / self.scaling + self.shift).to(self.vae.device, self.vae.dtype)
            rgb = self.vae.decode(z).sample[0].float().cpu()
        return _jpeg(torch.nan_to_num(rgb), width, height)


@contextlib.contextmanager
def _decoding_precision(vae: torch.nn.Module) -> Iterator[None]:
    """As the pipelines decode: a VAE that overflows in half precision (`force_upcast`)
    runs in float32 inside the block, and goes back to its dtype after it."""
    dtype = vae.dtype
    upcast = dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    try:
        if upcast:
            vae.to(dtype=torch.float32)
        yield
    finally:
        if upcast:
            vae.to(dtype=dtype)


def _jpeg(rgb: torch.Tensor, width: int, height: int) -> bytes:
    """RGB (3, h, w) in [-1, 1] as a JPEG thumbnail of an image of `width` x `height`
    (THUMBNAIL_SIDE on its longer side at most)."""
    scale = min(1.0, THUMBNAIL_SIDE / max(width, height))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    rgb = F.interpolate(rgb[None], size=size, mode="bilinear", align_corners=False)[0]
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def _colour_blocks(generator: torch.Generator) -> torch.Tensor:
    """`_FIT_SAMPLES` pictures (B, 3, H, W) in [-1, 1] of `_FIT_PICTURE` pixels, each a grid
    of `_FIT_BLOCK`-pixel blocks of random flat colours."""
    blocks = _FIT_PICTURE // _FIT_BLOCK
    colours = torch.rand(_FIT_SAMPLES, 3, blocks, blocks, generator=generator) * 2 - 1
    return colours.repeat_interleave(_FIT_BLOCK, 2).repeat_interleave(_FIT_BLOCK, 3)


class Previewer:
    """How a model's thumbnails are made, decided when the first preview is asked for: its
    `Projection` if that reads its latents (r2 >= `LINEAR_R2`), else `DecodedPreview`;
    None (no previews) if its VAE cannot decode in its precision."""

    def __init__(self) -> None:
        self._projection: Projection | DecodedPreview | None = None
        self._fitted = False

    def projection(self, pipe: DiffusionPipeline) -> Projection | DecodedPreview | None:
        if not self._fitted:
            fitted = Projection.fit(pipe)
            if fitted is not None and fitted.r2 < LINEAR_R2:
                log.info("latent previews decode with the VAE: a linear map explains %.0f %% "
                         "of its colours", 100 * fitted.r2)
                self._projection = DecodedPreview(pipe)
            else:
                self._projection = fitted
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
