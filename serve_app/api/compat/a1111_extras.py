"""AUTOMATIC1111's upscaling: `/sdapi/v1/upscalers`, `/extra-single-image` and
`/extra-batch-images`, over our upscale jobs (`serve_app.api.upscaling`).

Synchronous as in A1111: each image is one upscale job (same queue, priority, limits and
keys as `POST /generate/upscale`), waited for like `txt2img`'s. `upscaler_1` (and
`upscaler_2`, blended in at `extras_upscaler_2_visibility`) name A1111's `None`, `Lanczos`,
`Nearest` or a registry upscaler; A1111's "None" still resizes to the target with Lanczos,
and so does ours. `resize_mode` 0 scales by `upscaling_resize`; 1 makes
`upscaling_resize_w` x `upscaling_resize_h`, covering it and cropping the centre when
`upscaling_crop` (A1111's default), else stretching. Face restoration (`gfpgan_visibility`,
`codeformer_visibility` above 0) is not offered: refused, in A1111's error shape, rather
than silently skipped.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from serve_app.api import input_images
from serve_app.api.admission import admit
from serve_app.api.compat.dialects import A1111_PREFIX, DialectError, error_responses, json_body
from serve_app.api.compat.jobs import submit, wait_for_job
from serve_app.api.context import context
from serve_app.api.images import ImageMode
from serve_app.api.json_body import parse_json
from serve_app.api.upscaling import available_upscalers, near_matches
from serve_app.messages import JobType
from serve_app.model_upscalers import BUILTIN_UPSCALERS

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111 API"])
# Our request fields as A1111 names them, for validation messages.
FIELD_NAMES = {"scale": "upscaling_resize", "width": "upscaling_resize_w",
               "height": "upscaling_resize_h", "upscaler": "upscaler_1", "image": "image"}
_A1111_NAMES = {"lanczos": "Lanczos", "nearest": "Nearest"}
_FIELDS: dict[str, Any] = {
    "resize_mode": {"type": "integer", "enum": [0, 1]},
    "upscaling_resize": {"type": "number"}, "upscaling_resize_w": {"type": "integer"},
    "upscaling_resize_h": {"type": "integer"}, "upscaling_crop": {"type": "boolean"},
    "upscaler_1": {"type": "string"}, "upscaler_2": {"type": "string"},
    "extras_upscaler_2_visibility": {"type": "number"},
    "gfpgan_visibility": {"type": "number", "description": "must be 0 (not offered)"},
    "codeformer_visibility": {"type": "number", "description": "must be 0 (not offered)"},
}
_ERRORS = error_responses(A1111_PREFIX, 400, 401, 413, 429, 500, 503, 504)


@router.get("/upscalers", responses=error_responses(A1111_PREFIX, 401, 429, 503))
async def list_upscalers(request: Request) -> JSONResponse:
    """A1111's list: "None" first (clients expect it), the resamplers, then the registry's
    model upscalers whose weights are here."""
    ctx = context(request)
    entries = [_entry("None", None, 4)]
    entries += [_entry(_A1111_NAMES[n], None, 4) for n in BUILTIN_UPSCALERS]
    for name in available_upscalers(ctx.registry, ctx.settings)[len(BUILTIN_UPSCALERS):]:
        spec = ctx.registry.upscaler(name)
        if spec is not None:
            entries.append(_entry(name, str(spec.weights_path(ctx.settings)), spec.scale))
    return JSONResponse(entries)


def _entry(name: str, path: str | None, scale: int) -> dict[str, Any]:
    return {"name": name, "model_name": name if path else None, "model_path": path,
            "model_url": None, "scale": scale}


@router.post("/extra-single-image", responses=_ERRORS, openapi_extra=json_body(
    {"type": "object", "required": ["image"],
     "properties": {"image": {"type": "string"}, **_FIELDS}}))
async def extra_single_image(request: Request) -> JSONResponse:
    await admit(request)
    body = _body(parse_json(await request.body()))
    image, info = await _upscale_one(request, body, _text(body.get("image"), "image"))
    return JSONResponse({"html_info": info, "image": image})


@router.post("/extra-batch-images", responses=_ERRORS, openapi_extra=json_body(
    {"type": "object", "required": ["imageList"],
     "properties": {"imageList": {"type": "array", "items": {
         "type": "object", "properties": {"data": {"type": "string"},
                                          "name": {"type": "string"}}}}, **_FIELDS}}))
async def extra_batch_images(request: Request) -> JSONResponse:
    await admit(request)
    body = _body(parse_json(await request.body()))
    items = body.get("imageList")
    if not isinstance(items, list) or not items:
        raise DialectError("imageList must be a non-empty list of {data, name} objects")
    out, info = [], ""
    for n, item in enumerate(items):
        data = item.get("data") if isinstance(item, dict) else None
        image, info = await _upscale_one(request, body, _text(data, f"imageList[{n}].data"))
        out.append(image)
    return JSONResponse({"html_info": info, "images": out})


def _body(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise DialectError("The request body must be a JSON object")
    for field, what in (("gfpgan_visibility", "GFPGAN"), ("codeformer_visibility", "CodeFormer")):
        value = body.get(field) or 0
        if not isinstance(value, int | float) or value != 0:
            raise DialectError(
                f"{field}={value!r}: face restoration ({what}) is not offered by this server; "
                f"send {field}=0 (upscaling only)")
    if body.get("resize_mode", 0) not in (0, 1):
        raise DialectError("resize_mode must be 0 (scale by upscaling_resize) or 1 (to "
                           "upscaling_resize_w x upscaling_resize_h)")
    return body


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise DialectError(f"{name} is required: a base64-encoded image")
    return value


async def _upscale_one(request: Request, body: dict[str, Any], image: str) -> tuple[str, str]:
    """One image through upscaler_1 (and upscaler_2, blended): its base64 PNG and a line
    of html_info."""
    ctx = context(request)
    limits = ctx.settings.limits
    size = await run_in_threadpool(input_images.probe_size, image, "image", limits)
    target, crop = _target(body, size)
    names = _a1111_names(request)
    first = _our_name(body.get("upscaler_1"), "upscaler_1", names)
    second = _our_name(body.get("upscaler_2"), "upscaler_2", names)
    visibility = body.get("extras_upscaler_2_visibility") or 0
    if not isinstance(visibility, int | float) or not 0 <= visibility <= 1:
        raise DialectError("extras_upscaler_2_visibility must be a number from 0 to 1")
    result = await _run_job(request, image, target, first)
    if str(body.get("upscaler_2") or "None").lower() != "none" and visibility > 0:
        other = await _run_job(request, image, target, second)
        result = await run_in_threadpool(_blend, result, other, float(visibility))
    if crop is not None:
        result = await run_in_threadpool(_crop, result, crop)
    return base64.b64encode(result).decode(), f"<p>Upscaled to {target[0]}x{target[1]}</p>"


def _a1111_names(request: Request) -> list[str]:
    ctx = context(request)
    ours = available_upscalers(ctx.registry, ctx.settings)
    return ["None", *(_A1111_NAMES.get(n, n) for n in ours)]


def _our_name(name: Any, field: str, known: list[str]) -> str:
    """An A1111 upscaler name (any case) as ours; unknown ones refused naming near ones."""
    if name is None:
        name = "None"
    if not isinstance(name, str):
        raise DialectError(f"{field} must be an upscaler's name (got {name!r})")
    found = next((k for k in known if k.lower() == name.lower()), None)
    if found is None:
        raise DialectError(f"{field}: unknown upscaler {name!r}; {near_matches(name, known)}"
                           f"available: {', '.join(known)} (GET /sdapi/v1/upscalers)")
    if found == "None":
        return "lanczos"  # A1111's "None" resizes with Lanczos
    return next((ours for ours, theirs in _A1111_NAMES.items() if theirs == found), found)


def _target(body: dict[str, Any], size: tuple[int, int]
            ) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """The size the upscaler makes, and the centred crop after it (resize_mode 1, crop)."""
    src_w, src_h = size
    if body.get("resize_mode", 0) == 0:
        scale = body.get("upscaling_resize", 2)
        if not isinstance(scale, int | float) or isinstance(scale, bool):
            raise DialectError(f"upscaling_resize must be a number (got {scale!r})")
        return (round(src_w * scale), round(src_h * scale)), None
    width, height = body.get("upscaling_resize_w", 512), body.get("upscaling_resize_h", 512)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
               for v in (width, height)):
        raise DialectError("upscaling_resize_w and upscaling_resize_h must be positive "
                           "integers")
    if not body.get("upscaling_crop", True):
        return (width, height), None
    scale = max(width / src_w, height / src_h)
    return (max(width, math.ceil(src_w * scale)), max(height, math.ceil(src_h * scale))), (
        width, height)


async def _run_job(request: Request, image: str, target: tuple[int, int],
                   upscaler: str) -> bytes:
    ctx = context(request)
    job = {"image": image, "width": target[0], "height": target[1], "upscaler": upscaler}
    record = await submit(request, FIELD_NAMES, lambda: (JobType.UPSCALE, job), heavy=True)
    done = await wait_for_job(request, record["id"])
    if done["status"] != "completed":
        raise DialectError(f"Job {done['id']} {done['status']}: "
                           f"{done.get('error') or 'no image'}", 500, repeatable=False)
    await ctx.images.expand(done, ImageMode.DATA, "")
    uri = done["result"]["images"][0]
    return base64.b64decode(uri.split(",", 1)[1])


def _blend(first: bytes, second: bytes, visibility: float) -> bytes:
    with Image.open(io.BytesIO(first)) as a, Image.open(io.BytesIO(second)) as b:
        return _png(Image.blend(a.convert("RGB"), b.convert("RGB"), visibility))


def _crop(data: bytes, size: tuple[int, int]) -> bytes:
    with Image.open(io.BytesIO(data)) as img:
        left, top = (img.width - size[0]) // 2, (img.height - size[1]) // 2
        return _png(img.crop((left, top, left + size[0], top + size[1])))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()
