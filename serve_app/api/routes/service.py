"""The service as a whole: queue counts, the model registry, metrics, health."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from serve_app.api.context import context
from serve_app.api.guard import caller_of
from serve_app.api.routes.docs import errors
from serve_app.api.wire import Health, ModelList, QueueStatus, Ready

router = APIRouter()


@router.get("/queue/status", response_model=QueueStatus, responses=errors(401, 429, 503))
async def queue_status(request: Request) -> Response:
    return JSONResponse(await context(request).backend.queue_status(caller_of(request)))


@router.get("/models", response_model=ModelList, responses=errors(401, 429, 503))
async def models(request: Request) -> Response:
    return JSONResponse(await context(request).backend.models(caller_of(request)))


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {CONTENT_TYPE_LATEST: {}},
          "description": "Prometheus text exposition of the whole service"},
    **errors(401, 403, 503)})
async def metrics(request: Request) -> Response:
    """This replica reports its HTTP counts first; the others report every second."""
    await request.app.state.http_metrics.flush()
    body = await context(request).backend.metrics_text(caller_of(request))
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz", response_model=Health)
async def healthz() -> Response:
    """Liveness: this process answers HTTP. Nothing else is asked (no tracker, no store, no
    rate limit, no key): a load balancer's or Kubernetes' liveness probe."""
    return JSONResponse({"status": "ok"})


@router.get("/readyz", response_model=Ready, responses=errors(503))
async def readyz(request: Request) -> Response:
    """Readiness: the tracker and the job store answer (checked at most once a second per
    ingress replica); 503 with the reason otherwise. No rate limit, no key."""
    return JSONResponse(await context(request).readiness.check())
