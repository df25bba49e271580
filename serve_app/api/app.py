"""The HTTP API: every route, greppable by its path.

The routes speak to a `JobsBackend` (`serve_app.api.backend`): in production the tracker
actor through `TrackerClient`, in unit tests a tracker in the same process. Bodies go out as
the job layer rendered them (`Response`), documented by the models of `serve_app.api.wire`.
Errors become HTTP in `serve_app.api.errors` only. Nothing here imports torch or diffusers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from serve_app.api import errors
from serve_app.api.backend import JobsBackend
from serve_app.api.compat import a1111, openai
from serve_app.api.events import HEARTBEAT_S, Subscriptions, job_events
from serve_app.api.guard import Guard, caller_of
from serve_app.api.http_metrics import HttpMetrics, HttpRecorder
from serve_app.api.json_body import parse_json
from serve_app.api.request_ids import RequestIds
from serve_app.api.validation import build_submission
from serve_app.api.webhook_fields import public_base_url
from serve_app.api.wire import (
    REQUEST_MODELS,
    CancelResult,
    ErrorBody,
    Health,
    JobList,
    JobRecord,
    ModelList,
    QueueStatus,
)
from serve_app.errors import InvalidRequest, RateLimited
from serve_app.jobs.job import JobStatus
from serve_app.messages import OPEN, JobType, Submission
from serve_app.playground import routes as playground_routes
from serve_app.registry import Registry
from serve_app.settings import Settings

E = TypeVar("E", JobStatus, JobType)
IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key",
    description="Submitting again with the same key returns the job first submitted with it")]


@dataclass(frozen=True)
class ApiContext:
    backend: JobsBackend
    settings: Settings
    registry: Registry
    served: frozenset[str]


_ERROR_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}},
          "RateLimit-Limit": {"description": "The bucket's size (when a rate limit refused)",
                              "schema": {"type": "integer"}},
          "RateLimit-Remaining": {"schema": {"type": "integer"}},
          "RateLimit-Reset": {"description": "Seconds until a request is allowed",
                              "schema": {"type": "integer"}}},
    503: {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}},
}
_ERROR_TEXT = {400: "Invalid request", 401: "Missing or wrong API key",
               403: "The key may not do this", 404: "Unknown job (or another key's)",
               409: "Conflict", 413: "Request body too large",
               429: "Rate limited or queue full", 503: "Tracker or job store unavailable"}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """Error responses as documented: `{"error": ...}`, and the headers some carry."""
    return {code: {"model": ErrorBody, "description": _ERROR_TEXT.get(code, "Error"),
                   **({"headers": _ERROR_HEADERS[code]} if code in _ERROR_HEADERS else {})}
            for code in codes}


def create_api(ctx: ApiContext, *, echo_request_id: bool = True) -> FastAPI:
    """The ASGI app over `ctx`'s backend, behind the guard (API keys, body size).
    `echo_request_id=False` under Ray Serve, which echoes X-Request-ID itself."""
    api = FastAPI(title="imagegen", version="0.2.0", docs_url="/docs", redoc_url=None,
                  description="Stable Diffusion image generation as an async job API.")
    api.state.ctx = ctx
    api.state.streams = Counter()  # open event streams per caller, on this replica
    api.state.subscriptions = Subscriptions(ctx.backend)
    api.add_middleware(Guard, settings=ctx.settings)
    # Outermost: a request the guard refuses is counted too.
    api.state.http_metrics = HttpRecorder(ctx.backend)
    api.add_middleware(HttpMetrics, recorder=api.state.http_metrics)
    api.add_middleware(RequestIds, echo=echo_request_id)
    errors.install(api)
    submit_doc = {"status_code": 202, "response_model": JobRecord,
                  "responses": _errors(400, 401, 409, 413, 429, 503)}

    @api.post("/generate/text2img", **submit_doc, openapi_extra=_body(JobType.TEXT2IMG))
    async def generate_text2img(request: Request, key: IdempotencyKey = None) -> Response:
        return await _submit(request, JobType.TEXT2IMG, key)

    @api.post("/generate/img2img", **submit_doc, openapi_extra=_body(JobType.IMG2IMG))
    async def generate_img2img(request: Request, key: IdempotencyKey = None) -> Response:
        return await _submit(request, JobType.IMG2IMG, key)

    @api.post("/generate/inpaint", **submit_doc, openapi_extra=_body(JobType.INPAINT))
    async def generate_inpaint(request: Request, key: IdempotencyKey = None) -> Response:
        return await _submit(request, JobType.INPAINT, key)

    @api.post("/generate/style-transfer", **submit_doc,
              openapi_extra=_body(JobType.STYLE_TRANSFER))
    async def generate_style_transfer(request: Request, key: IdempotencyKey = None) -> Response:
        return await _submit(request, JobType.STYLE_TRANSFER, key)

    @api.get("/jobs/{job_id}", response_model=JobRecord, responses=_errors(401, 404, 429, 503))
    async def get_job(job_id: str, request: Request) -> Response:
        body = await _ctx(request).backend.get(job_id, caller_of(request))
        return Response(body, media_type="application/json")

    @api.get("/jobs/{job_id}/images/{index}", response_class=Response,
             responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}},
                        **_errors(400, 401, 404, 429, 503)})
    async def get_image(job_id: str, index: str, request: Request) -> Response:
        n = _int_param("index", index, 0, 1_000)
        data, content_type = await _ctx(request).backend.image(job_id, n, caller_of(request))
        return Response(data, media_type=content_type)

    @api.get("/jobs/{job_id}/events", response_class=EventSourceResponse,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "`event: job` with the record (no images) at "
                                             "every change; closes after the final one"},
                        **_errors(401, 404, 429, 503)})
    async def get_job_events(job_id: str, request: Request) -> EventSourceResponse:
        ctx, caller = _ctx(request), caller_of(request)
        first = await ctx.backend.get(job_id, caller)  # 404 before the stream starts
        streams: Counter[str] = request.app.state.streams
        cap = ctx.settings.max_streams_per_key
        if streams[caller.client] >= cap:
            raise RateLimited(f"{streams[caller.client]} event streams are open for this key "
                              f"on this server (IMAGEGEN_MAX_STREAMS_PER_KEY is {cap}); close "
                              "one first", retry_after_s=5, limit=cap)
        streams[caller.client] += 1
        last_event_id = request.headers.get("last-event-id")

        async def stream() -> AsyncIterator[ServerSentEvent]:
            try:
                async for event in job_events(request.app.state.subscriptions, job_id, first,
                                              caller, last_event_id):
                    yield event
            finally:
                streams[caller.client] -= 1
                if streams[caller.client] <= 0:
                    del streams[caller.client]

        return EventSourceResponse(stream(), ping=HEARTBEAT_S)

    @api.get("/jobs", response_model=JobList, responses=_errors(400, 401, 429, 503))
    async def list_jobs(request: Request) -> Response:
        q = request.query_params
        filters: dict[str, Any] = {
            "status": _enum_param("status", q.get("status"), JobStatus),
            "type": _enum_param("type", q.get("type"), JobType),
            "model": q.get("model") or None,
            "limit": _int_param("limit", q.get("limit", "100"), 1, 500),
            "cursor": q.get("cursor") or None,
        }
        return JSONResponse(
            await _ctx(request).backend.list_jobs(caller_of(request), **filters))

    @api.post("/jobs/{job_id}/cancel", response_model=CancelResult,
              responses=_errors(401, 404, 409, 429, 503))
    async def cancel_job(job_id: str, request: Request) -> Response:
        return JSONResponse(await _ctx(request).backend.cancel(job_id, caller_of(request)))

    @api.get("/queue/status", response_model=QueueStatus, responses=_errors(401, 429, 503))
    async def queue_status(request: Request) -> Response:
        return JSONResponse(await _ctx(request).backend.queue_status(caller_of(request)))

    @api.get("/models", response_model=ModelList, responses=_errors(401, 429, 503))
    async def models(request: Request) -> Response:
        return JSONResponse(await _ctx(request).backend.models(caller_of(request)))

    @api.get("/metrics", response_class=Response, responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}},
              "description": "Prometheus text exposition of the whole service"},
        **_errors(401, 403, 503)})
    async def metrics(request: Request) -> Response:
        """This replica reports its HTTP counts first; the others report every second."""
        await request.app.state.http_metrics.flush()
        body = await _ctx(request).backend.metrics_text(caller_of(request))
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @api.get("/healthz", response_model=Health, responses=_errors(503))
    async def healthz(request: Request) -> Response:
        queue = await _ctx(request).backend.queue_status(OPEN)
        return JSONResponse({"status": "ok", "queuedJobs": queue["queuedJobs"]})

    api.router.routes.extend(playground_routes())
    api.include_router(openai.router)  # the tools people already use (docs/compat.md)
    api.include_router(a1111.router)
    _document_request_models(api)
    return api


def _ctx(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


async def _submit(request: Request, job_type: JobType, key: str | None) -> Response:
    ctx = _ctx(request)
    body = parse_json(await request.body())
    key = key or None
    if key is not None and len(key) > 255:
        raise InvalidRequest("Idempotency-Key must be at most 255 characters")

    def validate() -> Submission:
        return build_submission(job_type, body, settings=ctx.settings, registry=ctx.registry,
                                served=ctx.served, idempotency_key=key,
                                caller=caller_of(request),
                                request_id=request.headers.get("x-request-id"),
                                base_url=public_base_url(request))

    # Decoding input images is CPU work: keep it off the event loop.
    carries_images = job_type is not JobType.TEXT2IMG
    sub = await run_in_threadpool(validate) if carries_images else validate()
    record = await ctx.backend.submit(sub)
    return JSONResponse(record, status_code=202)


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


def _body(job_type: JobType) -> dict[str, Any]:
    """OpenAPI for a body the route parses itself (it bounds JSON before pydantic sees it)."""
    name = REQUEST_MODELS[job_type].__name__
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{name}"}}}}}


def _document_request_models(api: FastAPI) -> None:
    """Put the request models (and the enums they use) into the schema's components."""
    build = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in REQUEST_MODELS.values():
                components.update(_schemas_of(model))
            api.openapi_schema = schema
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]


def _schemas_of(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return {model.__name__: schema, **defs}
