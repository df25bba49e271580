"""HTTP ingress deployment: the FastAPI app of `serve_app.http`, wired to the tracker."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from serve_app.errors import ServiceError
from serve_app.http import ApiContext, attach, create_api
from serve_app.registry import Registry
from serve_app.schemas import Submission
from serve_app.settings import Settings


class HandleBackend:
    """The routes' JobsBackend over a handle to the tracker deployment."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await getattr(self._handle, method).remote(*args, **kwargs)
        except RayTaskError as exc:
            # Domain errors travel wrapped; unwrap them so the HTTP layer maps them.
            if isinstance(exc.cause, ServiceError):
                raise exc.cause from None
            raise

    async def submit(self, sub: Submission) -> dict[str, Any]:
        return await self._call("submit", sub)

    async def get(self, job_id: str) -> bytes:
        return await self._call("get", job_id)

    async def image(self, job_id: str, index: int) -> tuple[bytes, str]:
        return await self._call("image", job_id, index)

    async def list_jobs(self, **filters: Any) -> dict[str, Any]:
        return await self._call("list_jobs", **filters)

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return await self._call("cancel", job_id)

    async def queue_status(self) -> dict[str, Any]:
        return await self._call("queue_status")

    async def models(self) -> dict[str, Any]:
        return await self._call("models")


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The app is built per replica (late-bound ingress), so each replica wires its own
    FastAPI instance to its own tracker handle."""

    def __init__(
        self,
        tracker: DeploymentHandle,
        settings: Settings,
        registry: Registry,
        served: frozenset[str],
    ) -> None:
        self._api = create_api()
        attach(self._api, ApiContext(HandleBackend(tracker), settings, registry, served))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._api
