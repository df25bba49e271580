"""The AUTOMATIC1111 WebUI API (`/sdapi/v1/...`), as a thin adapter over our jobs.

`txt2img` and `img2img` submit one job each (same queue, priority, batching, limits, keys,
`GET /jobs`) and answer when it has ended. `progress` and `interrupt` act on the caller's
last such job, and `options` keeps the caller's selected checkpoint: both are kept by the
tracker per caller (`JobsBackend.remember`/`recall`), so every ingress replica sees them.
The listings clients probe on start-up answer with what we have (empty where we have
none). Translation rules: `serve_app.api.compat.a1111_translate`; samplers:
`serve_app.api.compat.a1111_samplers`.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serve_app.api.admission import admit
from serve_app.api.compat import a1111_samplers as samplers
from serve_app.api.compat import a1111_translate as translate
from serve_app.api.compat.a1111_fields import HR_UPSCALERS, LATENT_MODES
from serve_app.api.compat.dialects import A1111_PREFIX, DialectError, error_responses, json_body
from serve_app.api.compat.jobs import cancel_quietly, submit, wait_for_job
from serve_app.api.context import context
from serve_app.api.guard import caller_of
from serve_app.api.images import ImageMode
from serve_app.api.json_body import parse_json
from serve_app.errors import JobNotFound
from serve_app.registry import ModelSpec

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111 API"])
MODEL_NOTE = "a1111.model"
JOB_NOTE = "a1111.job"

# What clients probe on start-up and we have nothing of: A1111's answer for an empty list.
EMPTY: dict[str, Any] = {
    "/sd-vae": [], "/hypernetworks": [],
    "/face-restorers": [], "/realesrgan-models": [], "/prompt-styles": [], "/extensions": [],
    "/embeddings": {"loaded": {}, "skipped": {}},
    "/scripts": {"txt2img": [], "img2img": []},
    "/cmd-flags": {"api": True, "nowebui": True, "api_auth": None, "listen": False,
                   "port": None, "skip_torch_cuda_test": False},
}
# The hires fix's latent upscalers (`hr_upscaler`), as A1111 lists them.
LISTINGS: dict[str, Any] = {
    "/latent-upscale-modes": [{"name": name} for name in LATENT_MODES],
}
# Refreshing lists we do not have: A1111 answers null.
REFRESH = ("/refresh-checkpoints", "/refresh-loras", "/refresh-vae", "/refresh-embeddings")

# What /docs and /openapi.json show of the request bodies (the routes read the raw request,
# to answer a malformed one in A1111's words). Unknown fields are accepted and ignored,
# unless they change the image (`a1111_fields.refuse_unsupported`).
_TXT2IMG_FIELDS: dict[str, Any] = {
    "prompt": {"type": "string"}, "negative_prompt": {"type": "string"},
    "steps": {"type": "integer"}, "cfg_scale": {"type": "number"},
    "width": {"type": "integer"}, "height": {"type": "integer"}, "seed": {"type": "integer"},
    "sampler_name": {"type": "string"}, "scheduler": {"type": "string"},
    "batch_size": {"type": "integer"}, "n_iter": {"type": "integer"},
    "send_images": {"type": "boolean"},
    "override_settings": {"type": "object",
                          "properties": {"sd_model_checkpoint": {"type": "string"}}},
}
# txt2img's hires fix (docs/compat.md).
_HIRES_FIELDS: dict[str, Any] = {
    "enable_hr": {"type": "boolean"}, "hr_scale": {"type": "number"},
    "hr_resize_x": {"type": "integer"}, "hr_resize_y": {"type": "integer"},
    "hr_upscaler": {"type": "string", "enum": list(HR_UPSCALERS)},
    "hr_second_pass_steps": {"type": "integer"}, "denoising_strength": {"type": "number"},
    "hr_sampler_name": {"type": "string"}, "hr_scheduler": {"type": "string"},
}
_IMG2IMG_FIELDS: dict[str, Any] = {
    **_TXT2IMG_FIELDS, "init_images": {"type": "array", "items": {"type": "string"}},
    "denoising_strength": {"type": "number"}, "mask": {"type": "string"},
    "inpainting_mask_invert": {"type": "integer", "enum": [0, 1]},
}
_GENERATE_ERRORS = error_responses(A1111_PREFIX, 400, 401, 404, 413, 429, 500, 503, 504)
_READ_ERRORS = error_responses(A1111_PREFIX, 401, 429, 503)


@router.post("/txt2img", responses=_GENERATE_ERRORS,
             openapi_extra=json_body({"type": "object",
                                      "properties": _TXT2IMG_FIELDS | _HIRES_FIELDS}))
async def txt2img(request: Request) -> JSONResponse:
    return await _generate(request, img2img=False)


@router.post("/img2img", responses=_GENERATE_ERRORS,
             openapi_extra=json_body({"type": "object", "required": ["init_images"],
                                      "properties": _IMG2IMG_FIELDS}))
async def img2img(request: Request) -> JSONResponse:
    return await _generate(request, img2img=True)


@router.get("/progress", responses=_READ_ERRORS)
async def progress(request: Request) -> JSONResponse:
    ctx, caller = context(request), caller_of(request)
    job_id = (await ctx.backend.recall(caller)).get(JOB_NOTE)
    record = None
    if job_id is not None:
        try:
            # Live: the running job's latest preview is the tracker's (never stored).
            record = json.loads(await ctx.backend.get(job_id, caller, live=True))
        except JobNotFound:  # pruned, or another key's after a key change
            record = None
    return JSONResponse(translate.progress_body(record, datetime.now(UTC)))


@router.post("/interrupt", responses=_READ_ERRORS)
async def interrupt(request: Request) -> JSONResponse:
    ctx, caller = context(request), caller_of(request)
    job_id = (await ctx.backend.recall(caller)).get(JOB_NOTE)
    if job_id is not None:
        await cancel_quietly(ctx.backend, job_id, caller)
    return JSONResponse({})


@router.get("/samplers", responses=_READ_ERRORS)
async def list_samplers() -> JSONResponse:
    return JSONResponse(samplers.samplers_list())


@router.get("/schedulers", responses=_READ_ERRORS)
async def list_schedulers() -> JSONResponse:
    return JSONResponse(samplers.schedulers_list())


@router.get("/sd-models", responses=_READ_ERRORS)
async def list_sd_models(request: Request) -> JSONResponse:
    ctx = context(request)
    return JSONResponse([translate.checkpoint(m, ctx.settings) for m in _checkpoints(request)])


@router.get("/loras", responses=_READ_ERRORS)
async def list_loras(request: Request) -> JSONResponse:
    """The LoRAs of the caller's selected checkpoint (or the default model)."""
    return JSONResponse(translate.lora_entries(await _selected(request),
                                               context(request).settings.model_path))


@router.get("/options", responses=_READ_ERRORS)
async def get_options(request: Request) -> JSONResponse:
    ctx = context(request)
    chosen = translate.checkpoint(await _selected(request), ctx.settings)
    return JSONResponse({
        "sd_model_checkpoint": chosen["title"], "sd_checkpoint_hash": chosen["sha256"],
        "samples_format": "png", "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1,
        "eta_noise_seed_delta": 0, "img2img_fix_steps": False, "return_grid": False,
    })


@router.post("/options", responses=error_responses(A1111_PREFIX, 400, 401, 429, 503),
             openapi_extra=json_body({"type": "object", "properties": {
                 "sd_model_checkpoint": {"type": "string"}}}))
async def set_options(request: Request) -> JSONResponse:
    """Only `sd_model_checkpoint` is acted on (for this caller); every other option is
    accepted and ignored, so a client may post back the whole `GET` answer."""
    ctx = context(request)
    body = parse_json(await request.body())
    if not isinstance(body, dict):
        raise DialectError("The request body must be a JSON object of options")
    name = body.get("sd_model_checkpoint")
    if name is not None:
        model = translate.find_checkpoint(str(name), ctx.registry, ctx.served)
        if model is None:
            raise DialectError(f"model {name!r} not found; GET /sdapi/v1/sd-models lists them")
        await ctx.backend.remember(caller_of(request), MODEL_NOTE, model)
    return JSONResponse(None)


def _listing(value: Any) -> Any:
    async def answer() -> JSONResponse:
        return JSONResponse(value)

    return answer


for _path, _value in {**EMPTY, **LISTINGS}.items():
    router.add_api_route(_path, _listing(_value), methods=["GET"], responses=_READ_ERRORS)
for _path in REFRESH:
    router.add_api_route(_path, _listing(None), methods=["POST"], responses=_READ_ERRORS)


async def _generate(request: Request, *, img2img: bool) -> JSONResponse:
    ctx, caller = context(request), caller_of(request)
    await admit(request)  # the submit token before the body is read
    req = parse_json(await request.body())
    if not isinstance(req, dict):
        raise DialectError("The request body must be a JSON object")
    model = await _requested_model(request, req)
    limits = ctx.settings.limits
    record = await submit(
        request, translate.FIELD_NAMES,
        lambda: translate.generation_job(req, model, limits, img2img=img2img), heavy=img2img)
    await ctx.backend.remember(caller, JOB_NOTE, record["id"])
    done = await wait_for_job(request, record["id"])
    if done["status"] == "failed":
        raise DialectError(f"Job {done['id']} failed: {done.get('error') or 'unknown error'}",
                           500, repeatable=False)
    await ctx.images.expand(done, ImageMode.DATA, "")
    spec = ctx.registry.get(done["request"]["model"])
    if spec is None:  # the registry is fixed for the life of the process
        raise DialectError(f"Model {done['request']['model']} is no longer known", 500)
    return JSONResponse(translate.generation_response(
        done, req, translate.checkpoint(spec, ctx.settings)))


async def _requested_model(request: Request, req: dict[str, Any]) -> str | None:
    """`override_settings.sd_model_checkpoint`, else the caller's selected checkpoint,
    else None (the server's default)."""
    ctx = context(request)
    override = req.get("override_settings")
    name = override.get("sd_model_checkpoint") if isinstance(override, dict) else None
    if name:
        model = translate.find_checkpoint(str(name), ctx.registry, ctx.served)
        if model is None:
            raise DialectError(f"Model not found: {name!r}; GET /sdapi/v1/sd-models lists them")
        return model
    chosen = (await ctx.backend.recall(caller_of(request))).get(MODEL_NOTE)
    return chosen if chosen in ctx.served else None


async def _selected(request: Request) -> ModelSpec:
    ctx = context(request)
    chosen = (await ctx.backend.recall(caller_of(request))).get(MODEL_NOTE)
    spec = ctx.registry.get(chosen) if chosen in ctx.served else None
    default = ctx.registry.get(ctx.settings.default_model)
    return spec or default or _checkpoints(request)[0]


def _checkpoints(request: Request) -> list[ModelSpec]:
    """Served models a client may select (inpainting models run inpainting only)."""
    ctx = context(request)
    return [m for m in ctx.registry.models if m.id in ctx.served and m.type != "inpainting"]
