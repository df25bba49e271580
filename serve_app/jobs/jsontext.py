"""JSON on the tracker's hot paths: job records, summaries, rendered responses, log lines.

orjson encodes a record several times faster than the standard library (a record carries
its images as base64 text, and every save and read encodes one). It refuses a few things
`json` takes (integers beyond 64 bits, NaN in old records): those go through `json`, so
nothing that encoded before fails now. Output is compact (no spaces), as records always
were.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":")).encode()


def dumps_text(obj: Any) -> str:
    return dumps(obj).decode()


def loads(text: str | bytes) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)
