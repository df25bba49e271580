"""Error bodies in each API dialect, chosen by the request's path.

Our own API answers `{"error": "<message>"}`. The OpenAI Images API (`/v1/...`) answers
`{"error": {"message", "type", "param", "code"}}`, which the official `openai` client reads
into its exception types. AUTOMATIC1111 (`/sdapi/v1/...`) answers
`{"error": "HTTPException", "detail": "<message>", "body": "", "errors": "<status>: <message>"}`
(or `"RuntimeError"` with the message in `errors` for a 5xx), the shape its own exception
handler writes (clients show `detail` or `errors`; some match `error`).

Retries: the official `openai` client repeats, on its own, requests answered 408, 409, 429
or any 5xx (`BaseClient._should_retry`, up to twice), unless the answer carries
`x-should-retry: false`. Our 429 and 503 mean "nothing was done, try again" (queue full,
rate limited, tracker restarting) and stay retryable; every other status the client would
repeat is sent with `x-should-retry: false`, as is any error after a job was accepted
(a failed or timed-out job: repeating it would run it again).

Nothing here imports the routes: `serve_app.api.errors` and the guard use it.
"""

from __future__ import annotations

from typing import Any

from serve_app.errors import InvalidRequest, ModelNotAvailable, ServiceError, StoreTimeout

OPENAI_PREFIX = "/v1/"
A1111_PREFIX = "/sdapi/"
# Statuses the official openai client retries by itself.
OPENAI_RETRIED = frozenset({408, 409, 429})


class DialectError(ServiceError):
    """An error a compatible API answers in its own terms: its status, and for OpenAI's
    shape the `param` and `code`. `repeatable=False` marks an answer given after a job was
    accepted: a client must not send the request again by itself."""

    def __init__(self, message: str, status: int = 400, *, param: str | None = None,
                 code: str | None = None, repeatable: bool | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code
        self.repeatable = repeatable


def renamed(exc: InvalidRequest | ModelNotAvailable,
            names: dict[str, str]) -> DialectError:
    """`exc` (a 400 from our validation, whose message starts with our camelCase field
    name) in a dialect's words: the field named as that dialect names it, and as `param`."""
    message = exc.message
    first = message.split(" ", 1)[0].rstrip(":")
    param = names.get(first)
    if param is None and message.startswith(("Unknown model", "Model ")):
        param = "model"
    elif param is None and message.startswith(("Unknown sampler", "Sampler ")):
        param = names.get("sampler", "sampler")
    elif param is not None:
        message = param + message[len(first):]
    return DialectError(message, 400, param=param)


def render_error(path: str, status: int, message: str,
                 exc: Exception | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """The body and extra headers of an error answer to a request for `path`."""
    if path.startswith(OPENAI_PREFIX):
        return _openai_body(status, message, exc), _openai_headers(status, exc)
    if path.startswith(A1111_PREFIX):
        if status >= 500:
            return {"error": "RuntimeError", "detail": "", "body": "", "errors": message}, {}
        return {"error": "HTTPException", "detail": message, "body": "",
                "errors": f"{status}: {message}"}, {}
    return {"error": message}, {}


def _openai_body(status: int, message: str, exc: Exception | None) -> dict[str, Any]:
    param = getattr(exc, "param", None)
    code = getattr(exc, "code", None)
    if status == 401:
        kind, code = "invalid_request_error", code or "invalid_api_key"
    elif status == 429:
        kind, code = "requests", code or "rate_limit_exceeded"
    elif status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _openai_headers(status: int, exc: Exception | None) -> dict[str, str]:
    repeatable = getattr(exc, "repeatable", None)
    if repeatable is None:
        # 429 and 503 are refusals before anything was done; a store that timed out may
        # still apply the submit later, so that one is not repeated.
        repeatable = status in (429, 503) and not isinstance(exc, StoreTimeout)
    if not repeatable and (status in OPENAI_RETRIED or status >= 500):
        return {"x-should-retry": "false"}
    return {}


# -- OpenAPI: each dialect's error answers, as documented on its routes ---------------------

_OPENAI_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]},
                       "code": {"type": ["string", "null"]}}}}}
_A1111_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error", "detail"],
    "properties": {"error": {"type": "string"}, "detail": {"type": "string"},
                   "body": {"type": "string"}, "errors": {"type": "string"}}}
_MEANING = {400: "Invalid request", 401: "Missing or wrong API key",
            403: "The key may not do this", 404: "Not found", 409: "The job was cancelled",
            413: "Request body too large", 429: "Rate limited or queue full",
            500: "The job failed", 503: "Tracker or job store unavailable",
            504: "The job did not end in time; it runs on (GET /jobs/{id})"}


def error_responses(prefix: str, *codes: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a compatible route: its error statuses, each with the error
    body of the dialect `prefix` (OPENAI_PREFIX or A1111_PREFIX) names."""
    schema = _OPENAI_ERROR_SCHEMA if prefix == OPENAI_PREFIX else _A1111_ERROR_SCHEMA
    return {code: {"description": _MEANING.get(code, "Error"),
                   "content": {"application/json": {"schema": schema}}} for code in codes}


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra=` documenting a route's JSON request body (routes that read the raw
    request, to answer malformed bodies in their dialect)."""
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema}}}}


def multipart_body(schema: dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra=` documenting a route's multipart/form-data request body."""
    return {"requestBody": {"required": True,
                            "content": {"multipart/form-data": {"schema": schema}}}}
