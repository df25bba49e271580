"""The HTTP API: routes, request parsing, and the one place errors become status codes.

The routes speak to a `JobsBackend`: in production a handle to the tracker actor
(`deployments/ingress.py`), in unit tests a tracker in the same process. Nothing here
imports torch or diffusers.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.errors import (
    IllegalTransition,
    ImageNotFound,
    InvalidRequest,
    JobNotCancellable,
    JobNotFound,
    ModelNotAvailable,
    QueueFull,
    ServiceError,
    ServiceUnavailable,
)
from serve_app.jobs import JobStatus
from serve_app.registry import Registry
from serve_app.schemas import JobType, Submission
from serve_app.settings import Settings
from serve_app.validation import build_submission

log = logging.getLogger(__name__)

STATUS_CODES: dict[type[ServiceError], int] = {
    InvalidRequest: 400,
    ModelNotAvailable: 400,
    JobNotFound: 404,
    ImageNotFound: 404,
    JobNotCancellable: 409,
    QueueFull: 429,
    IllegalTransition: 500,
    ServiceUnavailable: 503,
}

EVENT_POLL_S = 0.25
E = TypeVar("E", JobStatus, JobType)


class JobsBackend(Protocol):
    """What the routes need from the job tracker."""

    async def submit(self, sub: Submission) -> dict[str, Any]: ...
    async def get(self, job_id: str) -> bytes: ...
    async def image(self, job_id: str, index: int) -> tuple[bytes, str]: ...
    async def list_jobs(self, **filters: Any) -> dict[str, Any]: ...
    async def cancel(self, job_id: str) -> dict[str, Any]: ...
    async def queue_status(self) -> dict[str, Any]: ...
    async def models(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ApiContext:
    backend: JobsBackend
    settings: Settings
    registry: Registry
    served: frozenset[str]


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_api() -> FastAPI:
    """The ASGI app; `attach(app, ctx)` gives it a backend before it serves."""
    api = FastAPI(title="imagegen", docs_url=None, redoc_url=None)

    @api.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        status = next((c for t, c in STATUS_CODES.items() if isinstance(exc, t)), 500)
        retry_after = getattr(exc, "retry_after_s", None)
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return error(status, exc.message, headers)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error(404, f"Not found: {request.method} {request.url.path}")
        if exc.status_code == 405:
            return error(405, f"Method {request.method} not allowed on {request.url.path}")
        return error(exc.status_code, str(exc.detail))

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"][1:]) or "request"
        return error(400, f"{where}: {first['msg']}")

    @api.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error(500, f"Internal error ({type(exc).__name__}); the request was not applied")

    for job_type in JobType:
        api.add_api_route(
            f"/generate/{job_type.value}",
            _submit_route(job_type),
            methods=["POST"],
            status_code=202,
            name=f"generate_{job_type.name.lower()}",
        )

    @api.get("/jobs/{job_id}")
    async def get_job(job_id: str, request: Request) -> Response:
        body = await _ctx(request).backend.get(job_id)
        return Response(body, media_type="application/json")

    @api.get("/jobs/{job_id}/images/{index}")
    async def get_image(job_id: str, index: str, request: Request) -> Response:
        n = _int_param("index", index, 0, 1_000)
        data, content_type = await _ctx(request).backend.image(job_id, n)
        return Response(data, media_type=content_type)

    @api.get("/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        backend = _ctx(request).backend
        first = await backend.get(job_id)  # 404 before the stream starts
        return StreamingResponse(_events(backend, job_id, first), media_type="text/event-stream")

    @api.get("/jobs")
    async def list_jobs(request: Request) -> dict[str, Any]:
        q = request.query_params
        filters: dict[str, Any] = {
            "status": _enum_param("status", q.get("status"), JobStatus),
            "type": _enum_param("type", q.get("type"), JobType),
            "model": q.get("model") or None,
            "limit": _int_param("limit", q.get("limit", "100"), 1, 500),
            "cursor": q.get("cursor") or None,
        }
        return await _ctx(request).backend.list_jobs(**filters)

    @api.post("/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
        return await _ctx(request).backend.cancel(job_id)

    @api.get("/queue/status")
    async def queue_status(request: Request) -> dict[str, Any]:
        return await _ctx(request).backend.queue_status()

    @api.get("/models")
    async def models(request: Request) -> dict[str, Any]:
        return await _ctx(request).backend.models()

    @api.get("/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        queue = await _ctx(request).backend.queue_status()
        return {"status": "ok", "queuedJobs": queue["queuedJobs"]}

    from serve_app.playground import routes as playground_routes

    api.router.routes.extend(playground_routes())
    return api


def attach(api: FastAPI, ctx: ApiContext) -> None:
    api.state.ctx = ctx


def _ctx(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


def _submit_route(job_type: JobType) -> Any:
    async def submit(request: Request) -> JSONResponse:
        ctx = _ctx(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"Request body is not valid JSON: {exc}") from None
        key = request.headers.get("idempotency-key") or None
        if key is not None and len(key) > 255:
            raise InvalidRequest("Idempotency-Key must be at most 255 characters")

        def validate() -> Submission:
            return build_submission(
                job_type, body, settings=ctx.settings, registry=ctx.registry,
                served=ctx.served, idempotency_key=key,
            )

        # Decoding input images is CPU work: keep it off the event loop.
        carries_images = job_type is not JobType.TEXT2IMG
        sub = await run_in_threadpool(validate) if carries_images else validate()
        record = await ctx.backend.submit(sub)
        return JSONResponse(record, status_code=202)

    submit.__name__ = f"submit_{job_type.name.lower()}"
    return submit


def _int_param(name: str, raw: str, lo: int, hi: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer (got {raw!r})") from None
    if not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be between {lo} and {hi} (got {value})")
    return value


def _enum_param(name: str, raw: str | None, enum: type[E]) -> E | None:
    if not raw:
        return None
    try:
        return enum(raw)
    except ValueError:
        valid = ", ".join(e.value for e in enum)
        raise InvalidRequest(f"{name} must be one of: {valid} (got {raw!r})") from None


async def _events(backend: JobsBackend, job_id: str, first: bytes) -> AsyncIterator[bytes]:
    """Server-sent events: the record (without images) whenever it changes, until it ends."""
    last = b""
    record = first
    while True:
        job = json.loads(record)
        job.get("result", {}).pop("images", None)
        payload = json.dumps(job).encode()
        if payload != last:
            yield b"event: job\ndata: " + payload + b"\n\n"
            last = payload
        if JobStatus(job["status"]).is_terminal():
            return
        await asyncio.sleep(EVENT_POLL_S)
        record = await backend.get(job_id)
