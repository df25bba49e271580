"""JSON on the tracker's hot paths: job records, summaries, rendered responses, log lines.

orjson encodes a record several times faster than the standard library (a record carries
its images as base64 text, and every save and read encodes one). What it refuses to encode
(integers beyond 64 bits, keys that are not strings) goes through `json`, so nothing that
encoded before fails now; a float NaN, which `json` wrote as the non-JSON `NaN`, becomes
`null`. Decoding stays with `json`: orjson would read an integer beyond 64 bits as a float,
and decoding is not where the time went. Output is compact (no spaces), as records always
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
    return json.loads(text)
