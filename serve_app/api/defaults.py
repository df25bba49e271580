"""What a request leaves out, from its model's registry defaults, and the checks that need
the settled values: steps, guidance, sampler, seed, previews, strength and the output
size (which, without width and height, is the input image's)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from serve_app.api import input_images as images
from serve_app.api.validation import check_range, check_sampler
from serve_app.api.wire import (
    GenerationCommon,
    Img2ImgRequest,
    InpaintRequest,
    StyleTransferRequest,
)
from serve_app.errors import InvalidRequest
from serve_app.messages import MAX_SEED
from serve_app.registry import ModelSpec
from serve_app.settings import Limits, Settings


@dataclass(frozen=True)
class Settled:
    """A request's generation settings with its model's defaults applied."""

    steps: int
    guidance: float
    sampler: str
    seed: int
    preview_every: int
    strength: float


def settle(req: GenerationCommon, spec: ModelSpec, limits: Limits) -> Settled:
    steps = req.steps if req.steps is not None else spec.defaults.steps
    check_range("steps", steps, 1, limits.max_steps)
    guidance = req.guidance_scale
    if guidance is None:
        guidance = spec.defaults.guidance_scale
    check_range("guidanceScale", guidance, limits.min_guidance, limits.max_guidance)
    check_range("numImages", req.num_images, 1, limits.max_images)
    check_range("quality", req.quality, 1, 100)
    sampler = req.sampler or spec.defaults.sampler
    check_sampler(sampler, spec)
    return Settled(steps=steps, guidance=float(guidance), sampler=sampler, seed=_seed(req.seed),
                   preview_every=_preview_every(req, steps), strength=_strength(req))


def _preview_every(req: GenerationCommon, steps: int) -> int:
    """Steps between latent thumbnails: 0 without `preview`, else `previewEvery`, by
    default about eight per job."""
    if not req.preview:
        if req.preview_every is not None:
            raise InvalidRequest("previewEvery needs preview: true")
        return 0
    if req.preview_every is None:
        return max(1, steps // 8)
    check_range("previewEvery", req.preview_every, 1, steps)
    return req.preview_every


def _seed(seed: int | None) -> int:
    # -1 means "random", as in most Stable Diffusion front ends.
    if seed is None or seed == -1:
        return secrets.randbelow(MAX_SEED + 1)
    check_range("seed", seed, 0, MAX_SEED)
    return seed


def _strength(req: GenerationCommon) -> float:
    if isinstance(req, Img2ImgRequest):
        check_range("strength", req.strength, 0.0, 1.0)
        return float(req.strength)
    if isinstance(req, InpaintRequest):
        check_range("inpaintingStrength", req.inpainting_strength, 0.0, 1.0)
        return float(req.inpainting_strength)
    if isinstance(req, StyleTransferRequest):
        check_range("styleStrength", req.style_strength, 0.0, 1.0)
        check_range("contentStrength", req.content_strength, 0.0, 1.0)
    return 1.0


def size(
    req: GenerationCommon, spec: ModelSpec, source: tuple[int, int] | None, settings: Settings
) -> tuple[int, int]:
    """Explicit size, else the input image's (`source`, its width and height; rounded down
    to the model's size multiple: 8, or 16 for the transformer families; scaled down to
    fit the limits), else the model's default."""
    limits = settings.limits
    multiple = spec.size_multiple
    if source is not None:
        source_w, source_h = source
        scale = min(1.0, limits.max_size / max(source_w, source_h),
                    (limits.max_pixels / (source_w * source_h)) ** 0.5)
        default_w, default_h = images.round_to_multiple(
            int(source_w * scale), int(source_h * scale), multiple)
    else:
        default_w, default_h = spec.defaults.width, spec.defaults.height
    width = req.width if req.width is not None else default_w
    height = req.height if req.height is not None else default_h
    for name, value, given in (("width", width, req.width), ("height", height, req.height)):
        if given is None and source is not None and value < limits.min_size:
            raise InvalidRequest(
                f"The input image is {source[0]}x{source[1]}: images must be at least "
                f"{limits.min_size} px on each side, or pass width and height to resize it"
            )
        check_range(name, value, limits.min_size, limits.max_size)
        if value % multiple:
            raise InvalidRequest(
                f"{name} must be a multiple of {multiple} for model {spec.id} (got {value}; "
                f"try {value - value % multiple})"
            )
    if width * height > limits.max_pixels:
        raise InvalidRequest(
            f"width x height is {width * height} pixels, at most {limits.max_pixels}"
        )
    return width, height
