"""The gate in front of every route: who is calling (API keys, 401) and how much they may
send (413), both settled before a route reads a byte of the body.

A pure ASGI middleware, so a refused request costs a header lookup and a hash. The caller
it finds goes in the request's state (`caller_of(request)`); the routes pass it to the
tracker, which owns ownership checks and rate limits (shared by every ingress replica).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import Request

from serve_app.api.compat.dialects import render_error
from serve_app.credentials import ApiKey, hash_key
from serve_app.errors import PayloadTooLarge
from serve_app.messages import Caller, Priority
from serve_app.settings import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Served to anyone: liveness and readiness (probes carry no key), and pages that hold no
# data (the playground's page, and the API's own description), so a browser can load them
# before the user gives a key.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/", "/docs", "/openapi.json",
                          "/favicon.ico"})
PUBLIC_PREFIXES = ("/playground/",)


class KeyRing:
    """The configured keys, compared as SHA-256 digests in constant time."""

    def __init__(self, keys: tuple[ApiKey, ...]) -> None:
        self._keys = keys

    def __bool__(self) -> bool:
        return bool(self._keys)

    def find(self, presented: str) -> ApiKey | None:
        digest = hash_key(presented)
        found = None
        for key in self._keys:  # every key is compared: the time says nothing of a match
            if hmac.compare_digest(key.sha256, digest):
                found = key
        return found


def caller_of(request: Request) -> Caller:
    caller: Caller = request.state.caller
    return caller


class Guard:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.keys = KeyRing(settings.api_keys)
        self.max_body = settings.limits.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            await _reject(scope, send, 413, self._too_large(int(length)))
            return
        caller = self._caller(scope, headers)
        if caller is None:
            await _reject(scope, send, 401, self._unauthorized(headers), {
                "www-authenticate": 'Bearer realm="imagegen"'})
            return
        scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, self._capped(receive), send)

    def _caller(self, scope: Scope, headers: dict[str, str]) -> Caller | None:
        """The caller, or None when a key is required and missing or wrong."""
        if not self.keys:
            client = scope.get("client")
            return Caller(name=None, admin=True, client=f"ip:{client[0] if client else '?'}")
        presented = _presented_key(headers)
        key = self.keys.find(presented) if presented else None
        if key is not None:
            return Caller(name=key.name, admin=key.role == "admin", client=key.name,
                          max_priority=Priority(key.highest))
        path = scope.get("path", "")
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return Caller(name=None, admin=False, client="public")
        return None

    def _capped(self, receive: Receive) -> Receive:
        """`receive` that refuses a body growing past the limit (chunked bodies too)."""
        seen = 0

        async def capped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise PayloadTooLarge(self._too_large(seen, at_least=True))
            return message

        return capped

    def _too_large(self, size: int, at_least: bool = False) -> str:
        return (f"Request body is {'over ' if at_least else ''}{size} bytes; the limit is "
                f"{self.max_body} bytes (limits.max_body_bytes). Send smaller input images.")

    @staticmethod
    def _unauthorized(headers: dict[str, str]) -> str:
        if _presented_key(headers):
            return "The API key is not valid; check it, or ask for a new one"
        return ("An API key is required: send it as 'Authorization: Bearer <key>' "
                "(or 'X-API-Key: <key>')")


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _presented_key(headers: dict[str, str]) -> str:
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if scheme.lower() == "basic" and value.strip():
        # AUTOMATIC1111 clients (webuiapi, Open WebUI, SillyTavern) send HTTP Basic auth:
        # the key is the password, the user name is not checked.
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return ""
        return decoded.partition(":")[2].strip()
    return headers.get("x-api-key", "").strip()


async def _reject(scope: Scope, send: Send, status: int, message: str,
                  extra: dict[str, str] | None = None) -> None:
    payload, dialect_headers = render_error(scope.get("path", "/"), status, message)
    extra = {**(extra or {}), **dialect_headers}
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
