"""HTTP request metrics of one ingress replica, reported to the tracker's registry.

A pure ASGI middleware times each request to the end of its response (an event stream's
whole life) and notes its route template (never the raw path: job ids would make a series
per job), method and status. Samples are sent to the tracker in one call a second, and
before `/metrics` answers, so one scrape counts every replica's requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from serve_app.api.backend import JobsBackend
from serve_app.api.guard import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

REPORT_EVERY_S = 1.0
MAX_BUFFERED = 100_000  # samples kept while the tracker cannot be reached


class HttpMetrics:
    """The middleware: times every request and hands it to the recorder."""

    def __init__(self, app: ASGIApp, recorder: HttpRecorder) -> None:
        self.app = app
        self.recorder = recorder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.recorder.note(scope, status, time.perf_counter() - started)


class HttpRecorder:
    """Samples noted on this replica, reported to the tracker."""

    def __init__(self, backend: JobsBackend) -> None:
        self._backend = backend
        self._samples: list[tuple[str, str, int, float]] = []
        self._reporter: asyncio.Task[None] | None = None

    def note(self, scope: Scope, status: int, seconds: float) -> None:
        route: Any = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        if len(self._samples) < MAX_BUFFERED:
            self._samples.append((template, scope.get("method", "GET"), status, seconds))
        if self._reporter is None or self._reporter.done():
            self._reporter = asyncio.get_running_loop().create_task(self._report_every())

    async def flush(self) -> None:
        """Send what was noted since the last report."""
        samples, self._samples = self._samples, []
        if samples:
            try:
                await self._backend.record_http(samples)
            except Exception:
                log.warning("could not report %d HTTP samples to the tracker", len(samples),
                            exc_info=True)
                self._samples = (samples + self._samples)[-MAX_BUFFERED:]

    async def _report_every(self) -> None:
        while self._samples:
            await asyncio.sleep(REPORT_EVERY_S)
            await self.flush()
