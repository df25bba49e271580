"""A real webhook receiver on 127.0.0.1 for the tests: it verifies every request with the
`standardwebhooks` package (the reference implementation receivers use) and answers from a
script, e.g. 500, 500, then 200 for ever."""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError

SECRET = "whsec_" + base64.b64encode(b"imagegen-test-webhook-secret-32b").decode()


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    verified: Any  # the JSON the package returned, or None
    error: str | None  # why verification failed
    answered: int


@dataclass
class Receiver:
    url: str
    secret: str
    script: list[int]
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self) -> int:
        with self.lock:
            n = len(self.received)
        return self.script[n] if n < len(self.script) else 200

    def wait_for(self, count: int, timeout_s: float = 15) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.received) >= count:
                    return list(self.received)
            time.sleep(0.02)
        raise AssertionError(f"{count} webhook(s) not received in {timeout_s} s: "
                             f"{len(self.received)} came")


@contextmanager
def receiver(script: list[int] | None = None, secret: str = SECRET) -> Iterator[Receiver]:
    """Serve on a free loopback port until the block ends."""
    state = Receiver("", secret, list(script or []))
    hook = Webhook(secret)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                verified, error = hook.verify(body, headers), None
            except WebhookVerificationError as exc:
                verified, error = None, str(exc)
            code = state.answer() if error is None else 401
            with state.lock:
                state.received.append(Received(headers, body, verified, error, code))
            self.send_response(code)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks?from=imagegen"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def body_of(received: Received) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(received.body)
    return data
