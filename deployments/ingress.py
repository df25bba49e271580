"""HTTP ingress deployment: the FastAPI app of `serve_app.api`, wired to the tracker shards.

A shell: the builder applies `@serve.deployment` and `@serve.ingress` to it. The app is
built per replica (late-bound ingress), so each replica wires its own FastAPI instance to
its own tracker handle.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from ray.serve.handle import DeploymentHandle

from serve_app.api.app import ApiContext, create_api
from serve_app.api.backend import JobsBackend
from serve_app.api.direct_reads import DirectReads
from serve_app.api.tracker_client import TrackerClient
from serve_app.api.trackers import Trackers
from serve_app.jobs.persistence import StoreIO
from serve_app.jobs.reads import StoreReads
from serve_app.registry import Registry
from serve_app.settings import Settings
from serve_app.shards import ShardMap
from serve_app.stores.factory import open_store

log = logging.getLogger(__name__)


class Ingress:
    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self,
        trackers: list[DeploymentHandle],
        shards: ShardMap,
        settings: Settings,
        registry: Registry,
        replicas: int = 1,
    ) -> None:
        """`trackers`: each shard's deployment handle, in `shards`' order."""
        # The builder checked IMAGEGEN_HOST; Serve's own HTTP host (the serve config's
        # http_options) is only known here. An open service on another host does not start.
        host = await _serve_http_host()
        if host is not None:
            settings.check_exposure(host)
        clients = [TrackerClient(t) for t in trackers]
        backend: JobsBackend
        # The builder allows several shards on Redis only, which every replica reads.
        if shards.count > 1 or await _store_readable_here(trackers[0], settings):
            # Reads of running and finished jobs come from the store, not the tracker.
            store = open_store(settings.store, data_dir=settings.data_dir,
                               redis_url=settings.redis_url)
            backend = DirectReads(clients, shards, StoreReads(StoreIO(store, readers=4)),
                                  settings, ingress_replicas=replicas)
        else:
            backend = Trackers(clients, shards)
        # Serve echoes X-Request-ID on every answer itself.
        self._api = create_api(ApiContext(backend, settings, registry, shards.served),
                               echo_request_id=False)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._api


async def _store_readable_here(tracker: DeploymentHandle, settings: Settings) -> bool:
    """Can this replica read the tracker's store? Redis: yes. Memory: no, it lives in the
    tracker's process. SQLite: when this replica runs on the tracker's node (a file on a
    local disk; a service on several nodes uses Redis)."""
    if settings.store == "redis":
        return True
    if settings.store != "sqlite":
        return False
    import ray

    try:
        here = ray.get_runtime_context().get_node_id()
        return bool(await tracker.node_id.remote() == here)
    except Exception:
        log.warning("could not tell whether the tracker shares this node; reads go to it",
                    exc_info=True)
        return False


async def _serve_http_host() -> str | None:
    """The host Serve's HTTP options name, as its controller has them; None if unknown."""
    from ray.serve.context import _get_global_client

    try:
        client = _get_global_client()
        options = await client._controller.get_http_config.remote()
        return str(options.host) if options.host else None
    except Exception:  # a Ray internal: never let it stop the service
        log.warning("could not read Serve's HTTP host; the open-service check used "
                    "IMAGEGEN_HOST only", exc_info=True)
        return None
