"""A real HTTP server on 127.0.0.1 for the client and CLI tests: the project's FastAPI app
over a tracker in the same process, with a fake replica that makes real PNGs.

All wiring of server internals for those tests lives here (the core's modules are being
reorganised: adapt this file, not the tests). uvicorn runs in a thread with its own event
loop; the tracker lives on that loop.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from PIL import Image
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.api.app import ApiContext, create_api
from serve_app.cli import free_port
from serve_app.messages import Finished, GenerationTask
from serve_app.registry import Registry
from serve_app.settings import Settings, load_settings
from tests.support.fakes import TEST_BLOBS, FakeReplicas, finished
from tests.support.trackers import SERVED, make_tracker


def png(width: int, height: int, seed: int) -> bytes:
    """A flat PNG whose colour follows the seed: a fake replica's image."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (seed % 256, (seed // 256) % 256, 128)).save(buf, "PNG")
    return buf.getvalue()


@dataclass
class PngDispatcher(FakeReplicas):
    """FakeReplicas' events, with a real PNG of the task's output size (a hires fix's
    target) for each image."""

    def result(self, model_id: str, task: GenerationTask) -> Finished:
        return finished(task, [png(*task.output_size, seed) for seed in task.seeds],
                        model=model_id, replica=f"{model_id}#fake")


class NoStreams:
    """What stands in front of the service in some deployments: a proxy that does not pass
    event streams."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/events"):
            response: Response = PlainTextResponse("streams are not passed here")
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


@dataclass
class LiveServer:
    url: str
    dispatcher: PngDispatcher
    loop: asyncio.AbstractEventLoop
    hold: asyncio.Event | None = None

    def release(self) -> None:
        """Let every job parked by `hold` finish (thread-safe)."""
        if self.hold is not None:
            self.loop.call_soon_threadsafe(self.hold.set)


@contextmanager
def live_server(registry: Registry, settings: Settings, *, hold: bool = False,
                api_key: str | None = None, events: bool = True,
                **overrides: Any) -> Iterator[LiveServer]:
    """Serve the API on a free loopback port until the block ends.

    `hold`: jobs stop after their first step until `server.release()`; `api_key`: the
    service's one API key (every request needs it); `events=False`: no event streams.
    """
    # Its fake replica writes images where the in-process tests' do.
    settings = settings.model_copy(update={"blob_url": TEST_BLOBS} | overrides)
    if api_key is not None:
        settings = load_settings(settings.model_dump(exclude={"api_keys"}),
                                 env={"API_KEYS": f"client:{api_key}"})
    port = free_port()
    started = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        dispatcher = PngDispatcher(hold=asyncio.Event() if hold else None)
        tracker = make_tracker(registry, settings, dispatcher)
        api = create_api(ApiContext(tracker, settings, registry, SERVED))
        app = api if events else NoStreams(api)
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                lifespan="off")
        server = uvicorn.Server(config)
        box.update(server=server, dispatcher=dispatcher, loop=asyncio.get_running_loop())
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        started.set()
        try:
            await serving
        finally:
            if dispatcher.hold is not None:
                dispatcher.hold.set()
            await tracker.close()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("the test server did not start in 10 s")
    live = LiveServer(f"http://127.0.0.1:{port}", box["dispatcher"], box["loop"],
                      hold=box["dispatcher"].hold)
    try:
        yield live
    finally:
        box["server"].should_exit = True
        thread.join(10)
