"""The OpenAI Images API (base URL `http://host:3003/v1`), as a thin adapter over our jobs.

`POST /v1/images/generations` (JSON), `/v1/images/edits` and `/v1/images/variations`
(multipart), `GET /v1/models` and `/v1/models/{id}`. Each image request is one job like
any other (same queue, priority, batching, limits, keys, `GET /jobs`), answered when it has
ended. Errors take OpenAI's shape and retry semantics (`serve_app.api.compat.dialects`).
Translation rules: `serve_app.api.compat.openai_translate`.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from serve_app.api.admission import admit
from serve_app.api.compat import openai_translate as translate
from serve_app.api.compat.dialects import (
    OPENAI_PREFIX,
    DialectError,
    error_responses,
    json_body,
    multipart_body,
)
from serve_app.api.compat.jobs import public_base, submit, wait_for_job
from serve_app.api.context import context
from serve_app.api.images import ImageMode
from serve_app.api.json_body import parse_json
from serve_app.messages import JobType

router = APIRouter(prefix="/v1", tags=["OpenAI Images API"])
# Multipart bounds: a few files (image, mask), a few dozen fields; the guard bounds the body.
MAX_FILES = 4
MAX_FIELDS = 64

# What /docs and /openapi.json show of the request bodies (the routes read the raw request,
# to answer a malformed one in OpenAI's words). Unknown fields are accepted and ignored.
_FIELDS: dict[str, Any] = {
    "prompt": {"type": "string"}, "model": {"type": "string"},
    "n": {"type": "integer", "minimum": 1}, "size": {"type": "string", "example": "512x512"},
    "response_format": {"type": "string", "enum": list(translate.RESPONSE_FORMATS)},
    "output_format": {"type": "string", "enum": sorted(translate.OUTPUT_FORMATS)},
    "negative_prompt": {"type": "string"}, "seed": {"type": "integer"},
    "steps": {"type": "integer"}, "guidance_scale": {"type": "number"},
    "sampler": {"type": "string"}, "priority": {"type": "string"}, "user": {"type": "string"},
}
_BINARY = {"type": "string", "format": "binary"}
_GENERATION = json_body({"type": "object", "required": ["prompt"], "properties": _FIELDS})
_EDIT = multipart_body({"type": "object", "required": ["image", "prompt"],
                        "properties": {**_FIELDS, "image": _BINARY, "mask": _BINARY,
                                       "strength": {"type": "number"}}})
_VARIATION = multipart_body({"type": "object", "required": ["image"],
                             "properties": {**_FIELDS, "image": _BINARY}})
_IMAGE_ERRORS = error_responses(OPENAI_PREFIX, 400, 401, 403, 409, 413, 429, 500, 503,
                                504)


@router.post("/images/generations", responses=_IMAGE_ERRORS, openapi_extra=_GENERATION)
async def create_image(request: Request) -> JSONResponse:
    await admit(request)  # the submit token before the body is read
    fields = parse_json(await request.body())
    if not isinstance(fields, dict):
        raise DialectError("The request body must be a JSON object.")
    req = translate.parse_fields(fields)
    record = await submit(request, translate.FIELD_NAMES,
                          lambda: (JobType.TEXT2IMG, req.body), heavy=False)
    return await _answer(request, record, req.response_format, revised_prompt=True)


@router.post("/images/edits", responses=_IMAGE_ERRORS, openapi_extra=_EDIT)
async def edit_image(request: Request) -> JSONResponse:
    await admit(request)  # the submit token before the body is read
    fields, files = await _multipart(request)
    req = translate.parse_fields(fields)
    image = _required_file(files, "image")
    mask = _optional_file(files, "mask")
    limits = context(request).settings.limits
    record = await submit(request, translate.FIELD_NAMES,
                          lambda: translate.edit_job(req, image, mask, limits), heavy=True)
    return await _answer(request, record, req.response_format)


@router.post("/images/variations", responses=_IMAGE_ERRORS, openapi_extra=_VARIATION)
async def create_variation(request: Request) -> JSONResponse:
    await admit(request)  # the submit token before the body is read
    fields, files = await _multipart(request)
    req = translate.parse_fields(fields, needs_prompt=False)
    image = _required_file(files, "image")
    record = await submit(request, translate.FIELD_NAMES,
                          lambda: translate.variation_job(req, image), heavy=True)
    return await _answer(request, record, req.response_format)


@router.get("/models", responses=error_responses(OPENAI_PREFIX, 401, 429))
async def list_models(request: Request) -> JSONResponse:
    ctx = context(request)
    created = int(time.time())
    models = [translate.model_entry(m.id, created) for m in ctx.registry.models
              if m.id in ctx.served]
    return JSONResponse({"object": "list", "data": models})


@router.get("/models/{model_id:path}",
            responses=error_responses(OPENAI_PREFIX, 401, 404, 429))
async def retrieve_model(model_id: str, request: Request) -> JSONResponse:
    if model_id not in context(request).served:
        raise DialectError(f"The model '{model_id}' does not exist or is not served here; "
                           "GET /v1/models lists the models.", 404, param="model",
                           code="model_not_found")
    return JSONResponse(translate.model_entry(model_id, int(time.time())))


async def _answer(request: Request, record: dict[str, Any], response_format: str | None,
                  *, revised_prompt: bool = False) -> JSONResponse:
    done = await wait_for_job(request, record["id"])
    if done["status"] == "cancelled":
        raise DialectError(f"Job {done['id']} was cancelled before it finished.", 409,
                           code="job_cancelled", repeatable=False)
    if done["status"] == "failed":
        raise DialectError(f"Job {done['id']} failed: {done.get('error') or 'unknown error'}",
                           500, code="job_failed", repeatable=False)
    images = context(request).images
    urls = images.urls(done, public_base(request)) if response_format != "b64_json" else None
    if response_format != "url":
        await images.expand(done, ImageMode.DATA, public_base(request))
    body = translate.images_response(done, response_format, urls, int(time.time()),
                                     revised_prompt=revised_prompt)
    return JSONResponse(body)


async def _multipart(request: Request) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
    """The form's text fields (the last value of each name) and its files' bytes by name
    (`image[]`, as the client sends a list, counts as `image`)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise DialectError("This endpoint takes multipart/form-data (image files and fields).")
    fields: dict[str, Any] = {}
    files: dict[str, list[bytes]] = {}
    async with request.form(max_files=MAX_FILES, max_fields=MAX_FIELDS) as form:
        for name, value in form.multi_items():
            name = name.removesuffix("[]")
            if isinstance(value, UploadFile):
                files.setdefault(name, []).append(await value.read())
            else:
                fields[name] = value
    return fields, files


def _required_file(files: dict[str, list[bytes]], name: str) -> bytes:
    data = _optional_file(files, name)
    if data is None:
        raise DialectError(f"Missing required parameter: '{name}' (an image file).",
                           param=name, code="missing_required_parameter")
    return data


def _optional_file(files: dict[str, list[bytes]], name: str) -> bytes | None:
    found = files.get(name, [])
    if len(found) > 1:
        raise DialectError(f"Send one '{name}' file; this server edits one image at a time.",
                           param=name, code="invalid_value")
    return found[0] if found else None
