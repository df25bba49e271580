"""An upscale request (`POST /generate/upscale`, A1111's extras) becomes a `Submission`.

Upscaling runs as a job like the generate modes (queue, priority, progress, cancel,
results in the blob store), on the replica of the request's `model` (default: the default
model): see docs/upscaling.md for why no separate deployment. The upscaler is a built-in
resampler or a registry `upscalers:` entry; the target is `scale` times the image, or
`width` x `height` (one of them alone keeps the aspect ratio), never smaller than the
image and at most `Limits.max_upscale_pixels`.
"""

from __future__ import annotations

import difflib
from typing import Any, cast

from serve_app.api import input_images as images
from serve_app.api.validation import check_priority, check_range, parse, resolve_model
from serve_app.api.webhook_fields import webhook_request
from serve_app.api.wire import UpscaleRequest
from serve_app.errors import InvalidRequest, ModelNotAvailable
from serve_app.messages import OPEN, Caller, GenerationTask, JobType, Submission, UpscalerRef
from serve_app.model_upscalers import BUILTIN_UPSCALERS
from serve_app.registry import Registry
from serve_app.settings import Limits, Settings

MAX_SCALE = 8


def build_upscale_submission(body: Any, *, settings: Settings, registry: Registry,
                             served: frozenset[str], idempotency_key: str | None = None,
                             caller: Caller = OPEN, request_id: str | None = None,
                             base_url: str = "", admitted: bool = False,
                             fingerprint: str | None = None) -> Submission:
    req = cast(UpscaleRequest, parse(JobType.UPSCALE, body))
    check_priority(req.priority, caller)
    spec = resolve_model(req.model or settings.default_model, registry, served)
    ref = resolve_upscaler(req.upscaler, registry, settings)
    check_range("quality", req.quality, 1, 100)
    limits = settings.limits
    webhook = webhook_request(req, settings, base_url)  # type: ignore[arg-type]
    source = images.probe_size(req.image, "image", limits)
    width, height = target_size(req.scale, req.width, req.height, source, limits)
    image = images.decode_input_image(req.image, "image", limits)
    task = GenerationTask(
        job_id="", mode=JobType.UPSCALE, prompt="", negative_prompt="", width=width,
        height=height, steps=1, guidance_scale=0.0, seed=0, sampler=spec.defaults.sampler,
        output_format=req.output_format, quality=req.quality, init_image=image, upscaler=ref)
    echo = {"model": spec.id, "upscaler": ref.name, "scale": req.scale, "width": width,
            "height": height, "outputFormat": req.output_format.value,
            "quality": req.quality, "priority": req.priority.value,
            "image": images.describe(image)}
    return Submission(JobType.UPSCALE, spec.id, req.priority, echo, task, idempotency_key,
                      caller, fingerprint, request_id, webhook, admitted=admitted)


def resolve_upscaler(name: str, registry: Registry, settings: Settings) -> UpscalerRef:
    """A built-in resampler or a registry upscaler whose weights are here."""
    if name.lower() in BUILTIN_UPSCALERS:
        return UpscalerRef(name.lower())
    spec = registry.upscaler(name)
    if spec is None:
        known = [*BUILTIN_UPSCALERS, *(u.name for u in registry.upscalers)]
        raise InvalidRequest(f"Unknown upscaler {name!r}; {near_matches(name, known)}"
                             f"available upscalers: {', '.join(known)} (GET /upscalers)")
    if not spec.present(settings):
        raise ModelNotAvailable(
            f"Upscaler {name!r} is not available: its weights were not found at "
            f"{spec.weights_path(settings)}. Put the file there and restart, or use one of: "
            f"{', '.join(available_upscalers(registry, settings))}")
    return spec.ref()


def near_matches(name: str, known: list[str]) -> str:
    """"did you mean 'x'? " for the names closest to `name` (any case), or ""."""
    lowered = {k.lower(): k for k in known}
    near = difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.5)
    return f"did you mean {' or '.join(repr(lowered[n]) for n in near)}? " if near else ""


def available_upscalers(registry: Registry, settings: Settings) -> list[str]:
    return [*BUILTIN_UPSCALERS, *(u.name for u in registry.upscalers if u.present(settings))]


def target_size(scale: float | None, width: int | None, height: int | None,
                source: tuple[int, int], limits: Limits) -> tuple[int, int]:
    """The output size: `scale` x the image, or `width`/`height` (one alone keeps the
    aspect ratio)."""
    src_w, src_h = source
    if scale is not None and (width is not None or height is not None):
        raise InvalidRequest("Give either scale or width/height, not both")
    if scale is not None:
        check_range("scale", scale, 1, MAX_SCALE)
        width, height = round(src_w * scale), round(src_h * scale)
    elif width is None and height is None:
        raise InvalidRequest("Give scale (e.g. 2), or a target width and/or height")
    elif height is None:
        height = round(src_h * cast(int, width) / src_w)
    elif width is None:
        width = round(src_w * height / src_h)
    for name, value, side in (("width", width, src_w), ("height", height, src_h)):
        if value < side:
            raise InvalidRequest(
                f"{name} {value} is smaller than the image's {side}: upscaling makes images "
                f"larger (at least {src_w}x{src_h})")
        if value > side * MAX_SCALE:
            raise InvalidRequest(f"{name} {value} is more than {MAX_SCALE}x the image's {side}")
    if width * height > limits.max_upscale_pixels:
        most = (limits.max_upscale_pixels / (src_w * src_h)) ** 0.5
        raise InvalidRequest(
            f"The output would be {width}x{height} ({width * height} pixels), over the limit "
            f"of {limits.max_upscale_pixels}: for this {src_w}x{src_h} image use a scale of "
            f"at most {int(most * 100) / 100:g}")
    return width, height


def upscaler_listing(registry: Registry, settings: Settings) -> list[dict[str, Any]]:
    """`GET /upscalers`: the resamplers, then the registry's model upscalers."""
    listing: list[dict[str, Any]] = [
        {"name": name, "kind": "resampler", "scale": None, "present": True,
         "description": f"PIL {name} resampling (no model)"} for name in BUILTIN_UPSCALERS]
    listing += [{"name": u.name, "kind": "model", "scale": u.scale, "present": u.present(settings),
                 "description": u.description} for u in registry.upscalers]
    return listing
