"""Request validation: a parsed JSON body in, a `Submission` (or an `InvalidRequest`) out.

The body comes parsed and bounded (`serve_app.api.json_body`); types and shapes come from
the pydantic models in `serve_app.api.wire`, limits from settings and defaults from the
model's registry entry, in the spirit of diffusers' `check_inputs()`: every message names
the camelCase field and says what would be accepted.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any

from pydantic import ValidationError
from pydantic.alias_generators import to_camel

from serve_app.api import input_images as images
from serve_app.api.adapter_requests import check_control, check_loras, echo_adapters
from serve_app.api.webhook_fields import webhook_request
from serve_app.api.wire import (
    IMAGE_FIELDS,
    NESTED_MODELS,
    REQUEST_MODELS,
    WEBHOOK_FIELDS,
    GenerationCommon,
    Img2ImgRequest,
    InpaintRequest,
    StyleTransferRequest,
)
from serve_app.errors import InvalidRequest, ModelNotAvailable
from serve_app.messages import (
    MAX_SEED,
    OPEN,
    SAMPLERS,
    Caller,
    GenerationTask,
    InputImage,
    JobType,
    Submission,
)
from serve_app.registry import ModelSpec, Registry
from serve_app.settings import Settings

_TYPE_WORDS = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
}


def parse(job_type: JobType, body: Any) -> GenerationCommon:
    """Check types and field names; the first problem found is reported."""
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object")
    if job_type is not JobType.STYLE_TRANSFER and not _present(body.get("prompt")):
        raise InvalidRequest("Prompt is required")
    try:
        return REQUEST_MODELS[job_type].model_validate(body)
    except ValidationError as exc:
        raise InvalidRequest(_describe(exc, job_type)) from None


def _present(value: Any) -> bool:
    return value is not None and (not isinstance(value, str) or value.strip() != "")


def _describe(exc: ValidationError, job_type: JobType) -> str:
    err = exc.errors()[0]
    name = _field_path(err["loc"])
    kind = err["type"]
    got = err.get("input")
    if kind == "missing":
        return f"{name} is required"
    if kind == "extra_forbidden":
        model = NESTED_MODELS.get(str(err["loc"][0]), REQUEST_MODELS[job_type]) \
            if len(err["loc"]) > 1 else REQUEST_MODELS[job_type]
        valid = sorted({to_camel(f) for f in model.model_fields})
        return f"Unknown field {name!r}; valid fields are: {', '.join(valid)}"
    if kind in _TYPE_WORDS:
        return f"{name} must be {_TYPE_WORDS[kind]} (got {got!r})"
    if kind == "enum":
        return f"{name} must be one of: {err.get('ctx', {}).get('expected', '')} (got {got!r})"
    if kind == "finite_number":
        return f"{name} must be a finite number"
    return f"{name}: {err['msg']} (got {got!r})"


def _field_path(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as the wire names it: `loras[0].scale`."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else ("." if path else "") + to_camel(part)
    return path or "body"


def build_submission(
    job_type: JobType,
    body: Any,
    *,
    settings: Settings,
    registry: Registry,
    served: frozenset[str],
    idempotency_key: str | None = None,
    caller: Caller = OPEN,
    request_id: str | None = None,
    base_url: str = "",
) -> Submission:
    """`base_url`: the service's public URL, for the image links of the job's webhooks."""
    req = parse(job_type, body)
    spec = resolve_model(req.model or settings.default_model, registry, served)
    limits = settings.limits
    webhook = webhook_request(req, settings, base_url)

    _check_text("prompt", getattr(req, "prompt", "") or "", limits.max_prompt_chars)
    _check_text("negativePrompt", req.negative_prompt or "", limits.max_prompt_chars)
    steps = req.steps if req.steps is not None else spec.defaults.steps
    _check_range("steps", steps, 1, limits.max_steps)
    guidance = req.guidance_scale
    if guidance is None:
        guidance = spec.defaults.guidance_scale
    _check_range("guidanceScale", guidance, limits.min_guidance, limits.max_guidance)
    _check_range("numImages", req.num_images, 1, limits.max_images)
    _check_range("quality", req.quality, 1, 100)
    sampler = req.sampler or spec.defaults.sampler
    if sampler not in SAMPLERS:
        raise InvalidRequest(f"Unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
    if (problem := spec.sampler_error(sampler)) is not None:  # e.g. FLUX: flow matching only
        raise InvalidRequest(problem)
    seed = _seed(req.seed)
    preview_every = _preview_every(req, steps)

    decoded = _decode_images(req, settings)
    loras = check_loras(req, spec, registry, limits)
    control = check_control(req, job_type, spec, limits)
    # Without a size, text2img with a ControlNet makes its control image's.
    first = next(iter(decoded.values()), control.image if control else None)
    width, height = _size(req, spec, first, settings)

    task = GenerationTask(
        job_id="",
        mode=job_type,
        prompt=getattr(req, "prompt", "") or "",
        negative_prompt=req.negative_prompt or "",
        width=width,
        height=height,
        steps=steps,
        guidance_scale=float(guidance),
        seed=seed,
        sampler=sampler,
        num_images=req.num_images,
        strength=_strength(req),
        output_format=req.output_format,
        quality=req.quality,
        init_image=decoded.get("init_image") or decoded.get("image") or decoded.get(
            "content_image"
        ),
        mask_image=decoded.get("mask"),
        style_image=decoded.get("style_image"),
        style_strength=float(getattr(req, "style_strength", 0.0)),
        content_strength=float(getattr(req, "content_strength", 0.0)),
        preview_every=preview_every,
        loras=loras,
        control=control,
    )
    echo = req.model_dump(by_alias=True, mode="json",
                          exclude={**dict.fromkeys([*IMAGE_FIELDS, *WEBHOOK_FIELDS, "preview",
                                                    "preview_every"], True),
                                   "control_net": {"image"}})
    echo_adapters(echo, control)
    if preview_every:
        echo.update(preview=True, previewEvery=preview_every)
    echo.update(
        model=spec.id, width=width, height=height, steps=steps, guidanceScale=float(guidance),
        sampler=sampler, seed=seed, negativePrompt=task.negative_prompt,
    )
    for field, img in decoded.items():
        echo[to_camel(field)] = images.describe(img)
    _check_work(task, limits.max_work)
    fingerprint = _fingerprint(job_type, body) if idempotency_key is not None else None
    return Submission(job_type, _target(job_type, spec, served), req.priority, echo, task,
                      idempotency_key, caller, fingerprint, request_id, webhook)


def _fingerprint(job_type: JobType, body: Any) -> str:
    """The request's digest, independent of key order and spacing: what an Idempotency-Key
    is bound to."""
    canonical = json.dumps([job_type.value, body], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _check_work(task: GenerationTask, max_work: float) -> None:
    megapixels = task.width * task.height / 1e6
    work = megapixels * task.steps * task.num_images
    if work > max_work:
        raise InvalidRequest(
            f"This request asks for {task.width}x{task.height} ({megapixels:.2f} megapixels) x "
            f"{task.steps} steps x {task.num_images} image(s) = {work:.0f} megapixel-steps, "
            f"over the limit of {max_work:g}: use fewer steps or images, or a smaller size")


def resolve_model(model_id: str, registry: Registry, served: frozenset[str]) -> ModelSpec:
    spec = registry.get(model_id)
    if spec is None:
        known = ", ".join(m.id for m in registry.models)
        raise InvalidRequest(f"Unknown model {model_id!r}; available models: {known}")
    if model_id not in served:
        raise ModelNotAvailable(
            f"Model {model_id} not loaded: its weights were not found on this server. Put "
            f"the diffusers folder or .safetensors file at the path its registry entry names "
            f"(under MODEL_PATH) and restart, or use one of: {', '.join(sorted(served))}"
        )
    return spec


def _target(job_type: JobType, spec: ModelSpec, served: frozenset[str]) -> str:
    """The model that runs the job: inpainting goes to the base model's dedicated
    inpainting model when the registry names one and it is served, else the base model
    runs it in legacy (4-channel) mode."""
    if job_type is JobType.INPAINT and spec.inpainting_model and spec.inpainting_model in served:
        return spec.inpainting_model
    return spec.id


def _check_text(name: str, value: str, max_chars: int) -> None:
    if len(value) > max_chars:
        raise InvalidRequest(f"{name} is too long: {len(value)} characters, at most {max_chars}")


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise InvalidRequest(
            f"{name} must be between {_number(lo)} and {_number(hi)} (got {_number(value)})")


def _number(x: float) -> str:
    """As a client wrote it: integers whole (a seed bound is 4294967295, not 4.29497e+09)."""
    return str(x) if isinstance(x, int) else f"{x:g}"


def _preview_every(req: GenerationCommon, steps: int) -> int:
    """Steps between latent thumbnails: 0 without `preview`, else `previewEvery`, by
    default about eight per job."""
    if not req.preview:
        if req.preview_every is not None:
            raise InvalidRequest("previewEvery needs preview: true")
        return 0
    if req.preview_every is None:
        return max(1, steps // 8)
    _check_range("previewEvery", req.preview_every, 1, steps)
    return req.preview_every


def _seed(seed: int | None) -> int:
    # -1 means "random", as in most Stable Diffusion front ends.
    if seed is None or seed == -1:
        return secrets.randbelow(MAX_SEED + 1)
    _check_range("seed", seed, 0, MAX_SEED)
    return seed


def _strength(req: GenerationCommon) -> float:
    if isinstance(req, Img2ImgRequest):
        _check_range("strength", req.strength, 0.0, 1.0)
        return float(req.strength)
    if isinstance(req, InpaintRequest):
        _check_range("inpaintingStrength", req.inpainting_strength, 0.0, 1.0)
        return float(req.inpainting_strength)
    if isinstance(req, StyleTransferRequest):
        _check_range("styleStrength", req.style_strength, 0.0, 1.0)
        _check_range("contentStrength", req.content_strength, 0.0, 1.0)
    return 1.0


def _decode_images(req: GenerationCommon, settings: Settings) -> dict[str, InputImage]:
    decoded: dict[str, InputImage] = {}
    for field in IMAGE_FIELDS:
        if field == "mask" or not hasattr(req, field):
            continue
        decoded[field] = images.decode_input_image(
            getattr(req, field), to_camel(field), settings.limits
        )
    if isinstance(req, InpaintRequest):
        decoded["mask"] = images.decode_mask(req.mask, "mask", settings.limits, decoded["image"])
    return decoded


def _size(
    req: GenerationCommon, spec: ModelSpec, source: InputImage | None, settings: Settings
) -> tuple[int, int]:
    """Explicit size, else the input image's (rounded down to the model's size multiple:
    8, or 16 for the transformer families; scaled down to fit the limits), else the
    model's default."""
    limits = settings.limits
    multiple = spec.size_multiple
    if source is not None:
        scale = min(1.0, limits.max_size / max(source.width, source.height),
                    (limits.max_pixels / (source.width * source.height)) ** 0.5)
        default_w, default_h = images.round_to_multiple(
            int(source.width * scale), int(source.height * scale), multiple)
    else:
        default_w, default_h = spec.defaults.width, spec.defaults.height
    width = req.width if req.width is not None else default_w
    height = req.height if req.height is not None else default_h
    for name, value, given in (("width", width, req.width), ("height", height, req.height)):
        if given is None and source is not None and value < limits.min_size:
            raise InvalidRequest(
                f"The input image is {source.width}x{source.height}: images must be at least "
                f"{limits.min_size} px on each side, or pass width and height to resize it"
            )
        _check_range(name, value, limits.min_size, limits.max_size)
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
