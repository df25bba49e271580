"""A generate request becomes a `Submission`: validated (`serve_app.api.validation`), its
defaults settled (`serve_app.api.defaults`), its input images decoded and bounded, then the
task the replica runs and the parameters the job record echoes are built here."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from pydantic.alias_generators import to_camel

from serve_app.api import input_images as images
from serve_app.api.adapter_requests import check_control, check_loras, echo_adapters
from serve_app.api.defaults import Settled, settle, size
from serve_app.api.hires import echo_hires, settle_hires
from serve_app.api.outpainting import outpaint_geometry
from serve_app.api.upscaling import build_upscale_submission
from serve_app.api.validation import (
    check_priority,
    check_text,
    check_work,
    parse,
    resolve_model,
)
from serve_app.api.webhook_fields import webhook_request
from serve_app.api.wire import (
    IMAGE_FIELDS,
    WEBHOOK_FIELDS,
    GenerationCommon,
    InpaintRequest,
    OutpaintRequest,
    Text2ImgRequest,
)
from serve_app.messages import (
    OPEN,
    Caller,
    ControlInput,
    GenerationTask,
    HiresFix,
    InputImage,
    JobType,
    Submission,
)
from serve_app.registry import ModelSpec, Registry
from serve_app.settings import Settings


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
    admitted: bool = False,
) -> Submission:
    """`base_url`: the service's public URL, for the image links of the job's webhooks;
    `admitted`: the caller's submit token was spent already (`serve_app.api.admission`)."""
    if job_type is JobType.UPSCALE:
        return build_upscale_submission(
            body, settings=settings, registry=registry, served=served,
            idempotency_key=idempotency_key, caller=caller, request_id=request_id,
            base_url=base_url, admitted=admitted,
            fingerprint=fingerprint(job_type, body) if idempotency_key is not None else None)
    req = parse(job_type, body)
    check_priority(req.priority, caller)
    spec = resolve_model(req.model or settings.default_model, registry, served)
    limits = settings.limits
    webhook = webhook_request(req, settings, base_url)
    check_text("prompt", getattr(req, "prompt", "") or "", limits.max_prompt_chars)
    check_text("negativePrompt", req.negative_prompt or "", limits.max_prompt_chars)
    settled = settle(req, spec, limits)
    loras = check_loras(req, spec, registry, limits, settings.model_path)
    # The size (without one: the first input image's, or text2img's control image's) and
    # the work budget, from image headers only: no pixel is decoded for a request that
    # asks for too much.
    pads = None
    if isinstance(req, OutpaintRequest):
        width, height, pads = outpaint_geometry(
            req, spec, images.probe_size(req.image, "image", limits), limits)
    else:
        width, height = size(req, spec, _first_size(req, settings), settings)
    hires = settle_hires(req, spec, limits, width, height, settled.steps, settled.sampler)
    check_work(width, height, settled.steps, req.num_images, limits.max_work, hires)

    decoded = _decode_images(req, settings)
    control = check_control(req, job_type, spec, limits)
    task = _task(job_type, req, settled, width, height, decoded, loras, control, hires)
    if pads is not None and isinstance(req, OutpaintRequest):
        task = dataclasses.replace(task, outpaint=(*pads, req.seam))
    echo = _echo(req, spec, settled, task, decoded, control)
    if pads is not None:
        echo.update(zip(("left", "top", "right", "bottom"), pads, strict=True))
    digest = fingerprint(job_type, body) if idempotency_key is not None else None
    return Submission(job_type, _target(job_type, spec, served), req.priority, echo, task,
                      idempotency_key, caller, digest, request_id, webhook,
                      admitted=admitted)


def _task(job_type: JobType, req: GenerationCommon, settled: Settled, width: int,
          height: int, decoded: dict[str, InputImage], loras: tuple[tuple[str, float], ...],
          control: ControlInput | None, hires: HiresFix | None) -> GenerationTask:
    return GenerationTask(
        job_id="",
        mode=job_type,
        prompt=getattr(req, "prompt", "") or "",
        negative_prompt=req.negative_prompt or "",
        width=width,
        height=height,
        steps=settled.steps,
        guidance_scale=settled.guidance,
        seed=settled.seed,
        sampler=settled.sampler,
        num_images=req.num_images,
        strength=settled.strength,
        output_format=req.output_format,
        quality=req.quality,
        init_image=decoded.get("init_image") or decoded.get("image") or decoded.get(
            "content_image"
        ),
        mask_image=decoded.get("mask"),
        style_image=decoded.get("style_image"),
        style_strength=float(getattr(req, "style_strength", 0.0)),
        content_strength=float(getattr(req, "content_strength", 0.0)),
        preview_every=settled.preview_every,
        loras=loras,
        control=control,
        hires=hires,
    )


def _echo(req: GenerationCommon, spec: ModelSpec, settled: Settled, task: GenerationTask,
          decoded: dict[str, InputImage], control: ControlInput | None) -> dict[str, Any]:
    """The job record's `parameters`: the request as sent, without image bytes or webhook
    details, with every default it took filled in."""
    echo = req.model_dump(by_alias=True, mode="json",
                          exclude={**dict.fromkeys([*IMAGE_FIELDS, *WEBHOOK_FIELDS, "preview",
                                                    "preview_every"], True),
                                   "control_net": {"image"}})
    echo_adapters(echo, control)
    if settled.preview_every:
        echo.update(preview=True, previewEvery=settled.preview_every)
    echo.update(
        model=spec.id, width=task.width, height=task.height, steps=settled.steps,
        guidanceScale=settled.guidance, sampler=settled.sampler, seed=settled.seed,
        negativePrompt=task.negative_prompt,
    )
    for field, img in decoded.items():
        echo[to_camel(field)] = images.describe(img)
    if task.hires is not None and isinstance(req, Text2ImgRequest) and req.hires is not None:
        echo["hires"] = echo_hires(task.hires, req.hires)
    elif "hires" in echo:
        del echo["hires"]
    return echo


def fingerprint(job_type: JobType, body: Any) -> str:
    """The request's digest, independent of key order and spacing: what an Idempotency-Key
    is bound to."""
    canonical = json.dumps([job_type.value, body], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _target(job_type: JobType, spec: ModelSpec, served: frozenset[str]) -> str:
    """The model that runs the job: inpainting (and outpainting) goes to the base model's
    dedicated inpainting model when the registry names one and it is served, else the base
    model runs it in legacy (4-channel) mode."""
    inpainting = job_type in (JobType.INPAINT, JobType.OUTPAINT)
    if inpainting and spec.inpainting_model and spec.inpainting_model in served:
        return spec.inpainting_model
    return spec.id


def _first_size(req: GenerationCommon, settings: Settings) -> tuple[int, int] | None:
    """The size of the image a request without width and height takes its size from."""
    if req.width is not None and req.height is not None:
        return None
    for field in IMAGE_FIELDS:
        if field != "mask" and hasattr(req, field):
            return images.probe_size(getattr(req, field), to_camel(field), settings.limits)
    if req.control_net is not None:
        return images.probe_size(req.control_net.image, "controlNet.image", settings.limits)
    return None


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


