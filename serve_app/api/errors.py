"""The one place errors become HTTP: domain errors to status codes, and every error body
as `{"error": "<what is wrong and how to fix it>"}` (FastAPI's own 404/405/422 included).
Under the compatible APIs' paths the body takes that dialect's shape instead
(`serve_app.api.compat.dialects`)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.api.compat.dialects import DialectError, render_error
from serve_app.errors import (
    Forbidden,
    IdempotencyConflict,
    IllegalTransition,
    ImageNotFound,
    InvalidRequest,
    JobNotCancellable,
    JobNotFound,
    ModelNotAvailable,
    PayloadTooLarge,
    QueueFull,
    RangeNotSatisfiable,
    RateLimited,
    ServiceError,
    ServiceUnavailable,
    Unauthorized,
)

log = logging.getLogger(__name__)

STATUS_CODES: dict[type[ServiceError], int] = {
    InvalidRequest: 400,
    ModelNotAvailable: 400,
    Unauthorized: 401,
    Forbidden: 403,
    JobNotFound: 404,
    ImageNotFound: 404,
    RangeNotSatisfiable: 416,
    JobNotCancellable: 409,
    IdempotencyConflict: 409,
    PayloadTooLarge: 413,
    QueueFull: 429,
    RateLimited: 429,
    IllegalTransition: 500,
    ServiceUnavailable: 503,
}


def error(status: int, message: str, headers: dict[str, str] | None = None, *,
          path: str = "/", exc: Exception | None = None) -> JSONResponse:
    body, extra = render_error(path, status, message, exc)
    return JSONResponse(body, status_code=status, headers={**(headers or {}), **extra} or None)


def status_of(exc: ServiceError) -> int:
    if isinstance(exc, DialectError):
        return exc.status
    return next((code for kind, code in STATUS_CODES.items() if isinstance(exc, kind)), 500)


def headers_of(exc: ServiceError) -> dict[str, str] | None:
    """Retry-After on refusals that say when to retry; the RateLimit fields on a 429 for an
    empty bucket; WWW-Authenticate on a 401."""
    headers: dict[str, str] = {}
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if isinstance(exc, RateLimited):
        headers |= {"RateLimit-Limit": str(exc.limit), "RateLimit-Remaining": "0",
                    "RateLimit-Reset": str(exc.retry_after_s)}
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="imagegen"'
    if isinstance(exc, RangeNotSatisfiable):
        headers["Content-Range"] = f"bytes */{exc.size}"
    return headers or None


def install(api: FastAPI) -> None:
    """Register the handlers that turn every error into an `{"error": ...}` answer."""

    @api.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error(status_of(exc), exc.message, headers_of(exc), path=request.url.path,
                     exc=exc)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        path = request.url.path
        if exc.status_code == 404:
            return error(404, f"Not found: {request.method} {path}", path=path)
        if exc.status_code == 405:
            return error(405, f"Method {request.method} not allowed on {path}", path=path)
        return error(exc.status_code, str(exc.detail), path=path)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"][1:]) or "request"
        return error(400, f"{where}: {first['msg']}", path=request.url.path)

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Details go to the log, never to the client.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error(500, "Internal error; the request was not applied. It was logged.",
                     path=request.url.path)
