"""The HTTP API: the seed's routes, the playground and the compatible dialects, behind the
guard (API keys, body size), the HTTP metrics and request ids.

The routes live by resource in `serve_app.api.routes` and speak to a backend with the
tracker's interface (`serve_app.api.backend`): in production the tracker shards through
`TrackerClient`, in unit tests a tracker in the same process. Bodies go out as the job
layer rendered them, documented by the models of `serve_app.api.wire`. Errors become HTTP
in `serve_app.api.errors` only. Nothing here imports torch or diffusers.
"""

from __future__ import annotations

from fastapi import FastAPI

from serve_app.api import errors
from serve_app.api.compat import a1111, a1111_extras, openai
from serve_app.api.context import ApiContext
from serve_app.api.guard import Guard
from serve_app.api.http_metrics import HttpMetrics, HttpRecorder
from serve_app.api.request_ids import RequestIds
from serve_app.api.routes import generation, jobs, service
from serve_app.api.routes.docs import document_request_models
from serve_app.playground import routes as playground_routes

__all__ = ["ApiContext", "create_api"]


def create_api(ctx: ApiContext, *, echo_request_id: bool = True) -> FastAPI:
    """The ASGI app over `ctx`'s backend. `echo_request_id=False` under Ray Serve, which
    echoes X-Request-ID itself."""
    api = FastAPI(title="imagegen", version="0.2.0", docs_url="/docs", redoc_url=None,
                  description="Stable Diffusion image generation as an async job API.")
    api.state.ctx = ctx
    api.add_middleware(Guard, settings=ctx.settings)
    # Outermost: a request the guard refuses is counted too.
    api.state.http_metrics = HttpRecorder(ctx.backend)
    api.add_middleware(HttpMetrics, recorder=api.state.http_metrics)
    api.add_middleware(RequestIds, echo=echo_request_id)
    errors.install(api)
    for router in (generation.router, jobs.router, service.router):
        api.include_router(router)
    api.router.routes.extend(playground_routes())
    api.include_router(openai.router)  # the tools people already use (docs/compat.md)
    api.include_router(a1111.router)
    api.include_router(a1111_extras.router)
    document_request_models(api)
    return api
