"""Webhook receivers for the tests: a real one on 127.0.0.1 that verifies every request with
the `standardwebhooks` package (the reference implementation receivers use) and answers
from a script, e.g. 500, 500, then 200 for ever; and `ScriptedSender`, which plays one in
process, on the tracker's clock."""

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

from pydantic import SecretStr
from standardwebhooks import Webhook, WebhookVerificationError

from serve_app.jobs.delivery import DeliveryFailed
from serve_app.settings import Settings

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


@dataclass
class ScriptedSender:
    """Plays the receiver: answers each attempt from `script` (an int is a status, a str a
    failure without one), then 200; records what was sent and when (the tracker's clock)."""

    clock: Any
    script: list[int | str] = field(default_factory=list)
    sent: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)

    async def send(self, url: str, headers: dict[str, str], body: bytes) -> int:
        self.sent.append((self.clock(), headers, body))
        answer = self.script.pop(0) if self.script else 200
        if isinstance(answer, str):
            raise DeliveryFailed(answer)
        return answer

    async def aclose(self) -> None:
        pass

    def events(self) -> list[str]:
        return [json.loads(body)["event"] for _, _, body in self.sent]


def hook_settings(settings: Settings, **more: Any) -> Settings:
    return settings.model_copy(update={"webhook_secret": SecretStr(SECRET),
                                       "webhook_allow_private": True} | more)
