"""A request body as JSON, bounded: valid UTF-8, not nested past what any route defines,
no lone surrogate. Every failure is an `InvalidRequest` (a 400), never a 500."""

from __future__ import annotations

import json
from typing import Any

from serve_app.errors import InvalidRequest

# Deeper JSON than this is no request this API defines (its bodies are flat objects).
MAX_JSON_DEPTH = 32


def parse_json(raw: bytes) -> Any:
    """A request body as JSON: valid UTF-8, at most MAX_JSON_DEPTH deep, no lone surrogate
    (`"\\ud800"` decodes to a string that no UTF-8 store or encoder accepts)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise _too_deep() from None
    _check_json_values(body, 1)
    return body


def _check_json_values(value: Any, depth: int) -> None:
    if depth > MAX_JSON_DEPTH:
        raise _too_deep()
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest(
                    "Request body holds a lone UTF-16 surrogate (such as \\ud800), which is not "
                    "text; send valid Unicode") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_json_values(key, depth + 1)
            _check_json_values(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_json_values(item, depth + 1)


def _too_deep() -> InvalidRequest:
    return InvalidRequest(f"Request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
