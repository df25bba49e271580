"""A job's routes: its record, its images, its event stream, the list, cancel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from serve_app.api.context import context
from serve_app.api.events import HEARTBEAT_S, job_events
from serve_app.api.guard import caller_of
from serve_app.api.routes.docs import errors
from serve_app.api.wire import CancelResult, JobList, JobRecord
from serve_app.errors import InvalidRequest
from serve_app.jobs.job import JobStatus
from serve_app.messages import JobType

E = TypeVar("E", JobStatus, JobType)
router = APIRouter()


@router.get("/jobs/{job_id}", response_model=JobRecord, responses=errors(401, 404, 429, 503))
async def get_job(job_id: str, request: Request) -> Response:
    body = await context(request).backend.get(job_id, caller_of(request))
    return Response(body, media_type="application/json")


@router.get("/jobs/{job_id}/images/{index}", response_class=Response,
            responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}},
                       **errors(400, 401, 404, 429, 503)})
async def get_image(job_id: str, index: str, request: Request) -> Response:
    n = int_param("index", index, 0, 1_000)
    data, content_type = await context(request).backend.image(job_id, n, caller_of(request))
    return Response(data, media_type=content_type)


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
