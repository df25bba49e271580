"""X-Request-ID: the client's, or one made here, on every request and echoed on its answer.

Under Ray Serve the replica already does both (its RequestIdMiddleware), so the ingress
turns the echo off (`echo=False`) and this only makes sure the header is there.
"""

from __future__ import annotations

import uuid

from starlette.datastructures import MutableHeaders

from serve_app.api.guard import ASGIApp, Message, Receive, Scope, Send

MAX_CHARS = 200


class RequestIds:
    def __init__(self, app: ASGIApp, echo: bool = True) -> None:
        self.app = app
        self.echo = echo

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = MutableHeaders(scope=scope)
        request_id = headers.get("x-request-id", "")
        if not request_id or len(request_id) > MAX_CHARS or not request_id.isprintable():
            request_id = uuid.uuid4().hex
            headers["x-request-id"] = request_id
        if not self.echo:
            await self.app(scope, receive, send)
            return

        async def echo(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        await self.app(scope, receive, echo)
