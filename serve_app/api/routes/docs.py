"""How the routes are documented in /openapi.json: error bodies and the headers they carry,
and the request models of bodies the routes parse themselves."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from serve_app.api.wire import REQUEST_MODELS, ErrorBody
from serve_app.messages import JobType

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
               416: "The range is outside the image",
               429: "Rate limited or queue full", 503: "Tracker or job store unavailable"}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """Error responses as documented: `{"error": ...}`, and the headers some carry."""
    return {code: {"model": ErrorBody, "description": _ERROR_TEXT.get(code, "Error"),
                   **({"headers": _ERROR_HEADERS[code]} if code in _ERROR_HEADERS else {})}
            for code in codes}


def request_body(job_type: JobType) -> dict[str, Any]:
    """OpenAPI for a body the route parses itself (it bounds JSON before pydantic sees it)."""
    name = REQUEST_MODELS[job_type].__name__
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{name}"}}}}}


def document_request_models(api: FastAPI) -> None:
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
