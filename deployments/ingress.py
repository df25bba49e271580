"""HTTP ingress deployment: the FastAPI app of `serve_app.api`, wired to the tracker.

A shell: the builder applies `@serve.deployment` and `@serve.ingress` to it. The app is
built per replica (late-bound ingress), so each replica wires its own FastAPI instance to
its own tracker handle.
"""

from __future__ import annotations

from fastapi import FastAPI
from ray.serve.handle import DeploymentHandle

from serve_app.api.app import ApiContext, create_api
from serve_app.api.tracker_client import TrackerClient
from serve_app.registry import Registry
from serve_app.settings import Settings


class Ingress:
    def __init__(
        self,
        tracker: DeploymentHandle,
        settings: Settings,
        registry: Registry,
        served: frozenset[str],
    ) -> None:
        self._api = create_api(ApiContext(TrackerClient(tracker), settings, registry, served))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._api
