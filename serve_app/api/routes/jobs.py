"""A job's routes: its record, its images, its event stream, the list, cancel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from serve_app.api.context import context
from serve_app.api.events import HEARTBEAT_S, job_events
from serve_app.api.guard import caller_of
from serve_app.api.images import ImageMode
from serve_app.api.routes.docs import errors
from serve_app.api.webhook_fields import public_base_url
from serve_app.api.wire import CancelResult, JobList, JobRecord
from serve_app.errors import InvalidRequest, RangeNotSatisfiable
from serve_app.jobs.job import JobStatus
from serve_app.messages import JobType

E = TypeVar("E", JobStatus, JobType)
router = APIRouter()


ImagesParam = Annotated[str | None, Query(
    description="`data` (default): `result.images` as data URIs; `url`: as URLs "
                "(presigned GET URLs on an S3 image store, else `/jobs/:id/images/:n`)",
    pattern="^(data|url)$")]
# An image's bytes never change (its ETag is their sha256); it is a key's own: private.
IMMUTABLE = "private, max-age=31536000, immutable"


@router.get("/jobs/{job_id}", response_model=JobRecord, responses=errors(400, 401, 404, 429,
                                                                         503))
async def get_job(job_id: str, request: Request, images: ImagesParam = None) -> Response:
    ctx = context(request)
    mode = ImageMode.parse(images)
    body = await ctx.backend.get(job_id, caller_of(request))
    body = await ctx.images.render(body, mode, public_base_url(request))
    return Response(body, media_type="application/json")


_IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}},
    206: {"description": "The bytes a `Range` header asked for"},
    304: {"description": "`If-None-Match` names its ETag"},
    **errors(400, 401, 404, 416, 429, 503)}


@router.get("/jobs/{job_id}/images/{index}", response_class=Response,
            responses=_IMAGE_RESPONSES)
async def get_image(job_id: str, index: str, request: Request) -> Response:
    """The image's bytes, streamed from the blob store, with `ETag` (their sha256) and
    `Cache-Control: immutable`; `If-None-Match` and one `Range` honoured."""
    return await _image(job_id, index, request)


@router.head("/jobs/{job_id}/images/{index}", response_class=Response,
             responses=_IMAGE_RESPONSES)
async def head_image(job_id: str, index: str, request: Request) -> Response:
    """The image's headers (`Content-Length`, `ETag`, content type) without its bytes."""
    return await _image(job_id, index, request)


async def _image(job_id: str, index: str, request: Request) -> Response:
    ctx = context(request)
    n = int_param("index", index, 0, 1_000)
    entry = await ctx.backend.image(job_id, n, caller_of(request))
    etag = f'"{entry["sha256"]}"' if "sha256" in entry else None
    headers = {"Cache-Control": IMMUTABLE, "Accept-Ranges": "bytes"}
    if etag is not None:
        headers["ETag"] = etag
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
    size = int(entry["bytes"]) if "bytes" in entry else None
    wanted = byte_range(request.headers.get("range"), size)
    if request.method == "HEAD" and size is not None:
        return Response(status_code=200, media_type=entry.get("contentType"),
                        headers=headers | {"Content-Length": str(size)})
    body = await ctx.images.open(entry, wanted)
    status = 200
    if wanted is not None:
        status = 206
        headers["Content-Range"] = f"bytes {wanted[0]}-{wanted[0] + body.size - 1}/{size}"
    headers["Content-Length"] = str(body.size)
    if request.method == "HEAD":
        return Response(status_code=status, media_type=body.content_type, headers=headers)
    return StreamingResponse(body.chunks, status_code=status, media_type=body.content_type,
                             headers=headers)


@router.get("/jobs/{job_id}/events", response_class=EventSourceResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "`event: job` with the record (no images) at "
                                            "every change; closes after the final one"},
                       **errors(401, 404, 429, 503)})
async def get_job_events(job_id: str, request: Request) -> EventSourceResponse:
    ctx, caller = context(request), caller_of(request)
    first = await ctx.backend.get(job_id, caller)  # 404 before the stream starts
    slot = ctx.streams.take(caller.client)  # 429 past the key's cap
    last_event_id = request.headers.get("last-event-id")

    async def stream() -> AsyncIterator[ServerSentEvent]:
        with slot:
            async for event in job_events(ctx.subscriptions, job_id, first, caller,
                                          last_event_id):
                yield event

    return EventSourceResponse(stream(), ping=HEARTBEAT_S)


@router.get("/jobs", response_model=JobList, responses=errors(400, 401, 429, 503))
async def list_jobs(request: Request) -> Response:
    q = request.query_params
    filters: dict[str, Any] = {
        "status": enum_param("status", q.get("status"), JobStatus),
        "type": enum_param("type", q.get("type"), JobType),
        "model": q.get("model") or None,
        "limit": int_param("limit", q.get("limit", "100"), 1, 500),
        "cursor": q.get("cursor") or None,
    }
    return JSONResponse(await context(request).backend.list_jobs(caller_of(request), **filters))


@router.post("/jobs/{job_id}/cancel", response_model=CancelResult,
             responses=errors(401, 404, 409, 429, 503))
async def cancel_job(job_id: str, request: Request) -> Response:
    return JSONResponse(await context(request).backend.cancel(job_id, caller_of(request)))


def byte_range(header: str | None, size: int | None) -> tuple[int, int] | None:
    """One `bytes=a-b`, `bytes=a-` or `bytes=-n` range as (start, end exclusive); None to
    send it whole (no header, or one this answers whole: several ranges, another unit, an
    unknown size). Outside the image: 416."""
    if header is None or size is None:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    try:
        if not dash:
            return None
        if first == "":
            start, end = max(0, size - int(last)), size
        else:
            start = int(first)
            end = min(size, int(last) + 1) if last else size
    except ValueError:
        return None
    if start < 0 or start >= end:
        raise RangeNotSatisfiable(f"Range {header!r} is outside the image ({size} bytes)",
                                  size)
    return start, end


def int_param(name: str, raw: str, lo: int, hi: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer (got {raw!r})") from None
    if not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be between {lo} and {hi} (got {value})")
    return value


def enum_param(name: str, raw: str | None, enum: type[E]) -> E | None:
    if not raw:
        return None
    try:
        return enum(raw)
    except ValueError:
        valid = ", ".join(e.value for e in enum)
        raise InvalidRequest(f"{name} must be one of: {valid} (got {raw!r})") from None
