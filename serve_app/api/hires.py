"""A text2img request's `hires` settled: its fields checked against the limits and the
model, its defaults filled in, its final size computed (`serve_app.hires_plan`). The size
obeys the same rules as `width` and `height`; the work budget counts both passes
(`serve_app.api.validation.check_work`)."""

from __future__ import annotations

from typing import Any

from serve_app.api.validation import check_range
from serve_app.api.wire import GenerationCommon, HiresRequest
from serve_app.errors import InvalidRequest
from serve_app.hires_plan import MAX_SCALE, UPSCALERS, target_size
from serve_app.messages import HiresFix
from serve_app.registry import ModelSpec
from serve_app.settings import Limits


def settle_hires(req: GenerationCommon, spec: ModelSpec, limits: Limits, width: int,
                 height: int, steps: int, sampler: str) -> HiresFix | None:
    """The request's hires fix for a first pass of `width` x `height` with `steps` and
    `sampler`, or None without one."""
    hires: HiresRequest | None = getattr(req, "hires", None)
    if hires is None:
        return None
    if spec.source == "null":
        raise InvalidRequest(f"hires needs an img2img pipeline, which model {spec.id!r} does "
                             "not have: leave hires out or use another model")
    if req.control_net is not None:
        raise InvalidRequest("hires cannot be combined with controlNet: leave one out")
    if hires.scale is not None and (hires.width is not None or hires.height is not None):
        raise InvalidRequest("hires takes scale, or width and/or height, not both")
    if hires.scale is not None:
        check_range("hires.scale", hires.scale, 1, MAX_SCALE)
    if hires.upscaler not in UPSCALERS:
        raise InvalidRequest(f"hires.upscaler must be one of: {', '.join(UPSCALERS)} "
                             f"(got {hires.upscaler!r})")
    second_steps = hires.steps if hires.steps is not None else steps
    check_range("hires.steps", second_steps, 1, limits.max_steps)
    check_range("hires.denoisingStrength", hires.denoising_strength, 0.0, 1.0)
    second_sampler = hires.sampler or sampler
    if (problem := spec.sampler_error(second_sampler)) is not None:
        raise InvalidRequest(f"hires.sampler: {problem}")
    final = target_size(width, height, spec.size_multiple, scale=hires.scale,
                        to_width=hires.width, to_height=hires.height)
    by_scale = hires.width is None and hires.height is None
    _check_size(final, spec, limits, "hires.scale" if by_scale else None)
    return HiresFix(width=final[0], height=final[1], upscaler=hires.upscaler,
                    steps=second_steps, denoising_strength=float(hires.denoising_strength),
                    sampler=second_sampler)


def _check_size(size: tuple[int, int], spec: ModelSpec, limits: Limits,
                field: str | None) -> None:
    """The rules `width` and `height` obey, for the final size; `field` names what set it
    (None: hires.width and hires.height)."""
    multiple = spec.size_multiple
    for name, value in ((field or "hires.width", size[0]), (field or "hires.height", size[1])):
        if not limits.min_size <= value <= limits.max_size:
            raise InvalidRequest(
                f"{name}: the hires image would be {size[0]}x{size[1]}, but each side must be "
                f"between {limits.min_size} and {limits.max_size}: use a smaller scale or size")
        if value % multiple:
            raise InvalidRequest(f"{name} must be a multiple of {multiple} for model {spec.id} "
                                 f"(got {value}; try {value - value % multiple})")
    if size[0] * size[1] > limits.max_pixels:
        raise InvalidRequest(
            f"{field or 'hires'}: the hires image would be {size[0]}x{size[1]} = "
            f"{size[0] * size[1]} pixels, at most {limits.max_pixels}: use a smaller scale or size")


def echo_hires(hires: HiresFix, asked: HiresRequest) -> dict[str, Any]:
    """What a job record shows of its hires fix: the settled values."""
    echo: dict[str, Any] = {
        "width": hires.width, "height": hires.height, "upscaler": hires.upscaler,
        "steps": hires.steps, "denoisingStrength": hires.denoising_strength,
        "sampler": hires.sampler}
    if asked.scale is not None:
        echo["scale"] = asked.scale
    return echo
