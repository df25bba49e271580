"""The web playground: a static page at `/` that drives the HTTP API from the browser.

Plain HTML, CSS and ES modules shipped inside the package (no build step, no CDN: the
machines that run this have no internet). `routes()` gives the ingress `GET /` (the page)
and `GET /playground/{path}` (its files). The page talks to the API only through the
public routes, with relative URLs, so it works wherever the app is mounted. Nothing here
imports torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import NotModifiedResponse, StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).parent / "static"

# Fixed, not guessed from the platform's MIME table: a browser refuses an ES module served
# as anything but JavaScript, and some systems map .js to text/plain.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# The files keep their names across releases (no build step to hash them), so a browser
# may keep them but must revalidate each time; the ETag makes that a cheap 304.
CACHE_CONTROL = "no-cache"


class PlaygroundFiles(StaticFiles):
    """The static folder, with fixed content types and revalidating caches; only the
    suffixes in `CONTENT_TYPES` are served."""

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        media_type = CONTENT_TYPES.get(Path(full_path).suffix)
        if media_type is None:
            raise HTTPException(status_code=404)
        headers = {"Cache-Control": CACHE_CONTROL, "X-Content-Type-Options": "nosniff"}
        response = FileResponse(full_path, status_code=status_code, headers=headers,
                                media_type=media_type, stat_result=stat_result)
        if self.is_not_modified(response.headers, Headers(scope=scope)):
            return NotModifiedResponse(response.headers)
        return response


def routes() -> list[BaseRoute]:
    """`GET /` (the page) and `GET /playground/{path}` (its scripts and styles)."""
    files = PlaygroundFiles(directory=STATIC_DIR)

    async def index(request: Request) -> Response:
        return await files.get_response("index.html", request.scope)

    return [
        Route("/", index, methods=["GET", "HEAD"], name="playground"),
        Mount("/playground", app=files, name="playground_files"),
    ]
