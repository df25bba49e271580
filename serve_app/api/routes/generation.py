"""POST /generate/{text2img,img2img,inpaint,style-transfer,outpaint,upscale}: validate,
submit, 202; and GET /upscalers, what `upscale` may name."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from serve_app.api import uploads
from serve_app.api.admission import admit
from serve_app.api.context import context
from serve_app.api.guard import caller_of
from serve_app.api.images import ImageMode
from serve_app.api.json_body import parse_json
from serve_app.api.routes.docs import errors, request_body
from serve_app.api.submission import build_submission
from serve_app.api.upscaling import upscaler_listing
from serve_app.api.webhook_fields import public_base_url
from serve_app.api.wire import JobRecord, UpscalerList
from serve_app.errors import InvalidRequest
from serve_app.messages import JobType, Submission

IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key",
    description="Submitting again with the same key returns the job first submitted with it")]

router = APIRouter()
_SUBMIT = {"status_code": 202, "response_model": JobRecord,
           "responses": errors(400, 401, 403, 409, 413, 429, 503)}


@router.post("/generate/text2img", **_SUBMIT, openapi_extra=request_body(JobType.TEXT2IMG))
async def generate_text2img(request: Request, key: IdempotencyKey = None) -> Response:
    return await submit(request, JobType.TEXT2IMG, key)


@router.post("/generate/img2img", **_SUBMIT, openapi_extra=request_body(JobType.IMG2IMG))
async def generate_img2img(request: Request, key: IdempotencyKey = None) -> Response:
    return await submit(request, JobType.IMG2IMG, key)


@router.post("/generate/inpaint", **_SUBMIT, openapi_extra=request_body(JobType.INPAINT))
async def generate_inpaint(request: Request, key: IdempotencyKey = None) -> Response:
    return await submit(request, JobType.INPAINT, key)


@router.post("/generate/style-transfer", **_SUBMIT,
             openapi_extra=request_body(JobType.STYLE_TRANSFER))
async def generate_style_transfer(request: Request, key: IdempotencyKey = None) -> Response:
    return await submit(request, JobType.STYLE_TRANSFER, key)


@router.post("/generate/outpaint", **_SUBMIT, openapi_extra=request_body(JobType.OUTPAINT))
async def generate_outpaint(request: Request, key: IdempotencyKey = None) -> Response:
    return await submit(request, JobType.OUTPAINT, key)


@router.post("/generate/upscale", **_SUBMIT, openapi_extra=request_body(JobType.UPSCALE))
async def generate_upscale(request: Request, key: IdempotencyKey = None) -> Response:
    return await submit(request, JobType.UPSCALE, key)


@router.get("/upscalers", response_model=UpscalerList, responses=errors(401))
async def list_upscalers(request: Request) -> Response:
    ctx = context(request)
    return JSONResponse({"upscalers": upscaler_listing(ctx.registry, ctx.settings)})


async def submit(request: Request, job_type: JobType, key: str | None) -> Response:
    ctx = context(request)
    await admit(request)  # the token first: nothing is read for a key past its budget
    body = parse_json(await request.body())
    key = key or None
    if key is not None and len(key) > 255:
        raise InvalidRequest("Idempotency-Key must be at most 255 characters")

    def validate() -> Submission:
        return build_submission(job_type, body, settings=ctx.settings, registry=ctx.registry,
                                served=ctx.served, idempotency_key=key,
                                caller=caller_of(request),
                                request_id=request.headers.get("x-request-id"),
                                base_url=public_base_url(request), admitted=True)

    # Decoding input images is CPU work: keep it off the event loop.
    carries_images = job_type is not JobType.TEXT2IMG
    sub = await run_in_threadpool(validate) if carries_images else validate()
    record = await uploads.submit(ctx.backend, ctx.images.blobs, sub)
    # A repeated Idempotency-Key answers with the job it made, which may have finished.
    await ctx.images.expand(record, ImageMode.DATA, public_base_url(request))
    return JSONResponse(record, status_code=202)
