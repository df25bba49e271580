"""Job tracker deployment: the actor that owns job state (a shell over JobTracker); one per
tracker shard (`serve_app.shards`), each owning its models' jobs.

It reaches each model's deployment through a streaming handle (`ServeReplicas`): the
replica's events (started, progress, result) come back on the call itself, so replicas never
need a handle to the tracker and cancelling the call is how a running job is interrupted.
The builder applies `@serve.deployment`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ReplicaState

from deployments.warm_pool import WarmPool
from serve_app.errors import ReplicaLost
from serve_app.jobs.interface import CallSpec, derive
from serve_app.jobs.persistence import StoreIO
from serve_app.jobs.service import TRACKER_CALLS, JobTracker
from serve_app.messages import GenerationTask, ReplicaEvent, unpack
from serve_app.registry import Registry
from serve_app.settings import Settings
from serve_app.shards import PRIMARY, ShardMap
from serve_app.stores.factory import open_store

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 300
SWEEP_EVERY_S = 60  # each pass reads a bounded slice of the blob store
# serve.status() costs the tracker real CPU (it rebuilds and pickles status objects), so
# replica counts are polled every second only while a job waits on a cold model.
REPLICAS_EVERY_S = 1.0
REPLICAS_IDLE_EVERY_S = 15.0
WARM_EVERY_S = 5.0


_STARTING = frozenset({ReplicaState.STARTING, ReplicaState.UPDATING, ReplicaState.RECOVERING,
                       ReplicaState.PENDING_MIGRATION})


def model_deployment_name(model_id: str) -> str:
    return f"model-{model_id}"


def pool_deployment_name(pool_id: str) -> str:
    return f"pool-{pool_id}"


class ServeReplicas:
    """Routes a call to its model's deployment and streams the replica's events back. A
    pool model's call goes to its pool's deployment with the model as its multiplexed id:
    Serve's router prefers a replica that holds the model, and the replica loads it if
    none does."""

    def __init__(self, handles: dict[str, DeploymentHandle],
                 pools: Mapping[str, str] | None = None) -> None:
        self._pools = dict(pools or {})
        self._handles = {
            m: h.options(stream=True, multiplexed_model_id=m) if m in self._pools
            else h.options(stream=True)
            for m, h in handles.items()}

    async def run(
        self, model_id: str, tasks: list[GenerationTask]
    ) -> AsyncGenerator[ReplicaEvent, None]:
        response = self._handles[model_id].run.remote(tasks, packed=True)
        finished = False
        try:
            async for item in response:  # a batch's results come as one item
                for event in unpack(item):
                    yield event
            finished = True
        except (ActorDiedError, ActorUnavailableError, RayActorError) as exc:
            finished = True
            raise ReplicaLost(f"model replica died ({type(exc).__name__})") from exc
        finally:
            if not finished:
                response.cancel()  # interrupts the pipeline at its next step

    async def replica_states(self) -> dict[str, dict[str, int]]:
        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(serve.get_replica_context().app_name)
        out: dict[str, dict[str, int]] = {}
        for model_id in self._handles:
            pool = self._pools.get(model_id)
            name = pool_deployment_name(pool) if pool else model_deployment_name(model_id)
            dep = app.deployments.get(name) if app else None
            states = dep.replica_states if dep else {}
            out[model_id] = {
                "ready": states.get(ReplicaState.RUNNING, 0),
                "starting": sum(n for state, n in states.items() if state in _STARTING),
            }
        return out


def _forward(spec: CallSpec) -> Callable[..., Awaitable[Any]]:
    async def call(self: Tracker, *args: Any, **kwargs: Any) -> Any:
        return await getattr(await self._ready(), spec.name)(*args, **kwargs)
    return call


def _forward_stream(spec: CallSpec) -> Callable[..., AsyncIterator[Any]]:
    async def call(self: Tracker, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async for item in getattr(await self._ready(), spec.name)(*args, **kwargs):
            yield item  # (a streaming handle call: each item travels as it comes)
    return call


@derive(TRACKER_CALLS, unary=_forward, stream=_forward_stream)
class Tracker:
    """Every call of the tracker's interface (`JobTracker`'s `@tracker_call` methods)
    waits for the one start (the store's jobs reloaded), then runs on the `JobTracker`."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        served: frozenset[str],
        models: dict[str, DeploymentHandle],
        shards: ShardMap | None = None,
        shard: int = PRIMARY,
    ) -> None:
        """`served` and `models`: this shard's models and their deployments' handles."""
        store = open_store(settings.store, data_dir=settings.data_dir,
                           redis_url=settings.redis_url,
                           fsync=settings.durability == "fsync")
        self._tracker = JobTracker(
            settings=settings, registry=registry, store=StoreIO(store),
            replicas=ServeReplicas(models, {m: spec.pool for m in models
                                            if (spec := registry.get(m)) and spec.pool}),
            served=served, shards=shards, shard=shard,
        )
        # The primary keeps warm workers for every shard's models: they are per node.
        everyone = shards.served if shards else served
        needs = [{"CPU": res.num_cpus, "GPU": res.num_gpus}
                 for m in everyone
                 if (spec := registry.get(m)) is not None and spec.source != "null"
                 and (res := (registry.pool_of(m) or spec).resources)]
        self._warm = (WarmPool(settings.warm_workers, needs)
                      if settings.warm_workers and needs and shard == PRIMARY else None)
        self._started: asyncio.Task[int] | None = None
        self._background: list[asyncio.Task[None]] = []
        self._next_idle_refresh = 0.0
        self._stopping = False

    def __del__(self) -> Awaitable[None] | None:
        """Serve's graceful stop calls this on the replica's loop and awaits the result:
        stop the calls and save what is still written behind. Python's own finalizer call
        (no running loop, or a second call) does nothing."""
        if getattr(self, "_stopping", True):  # stopped, or never fully built
            return None
        self._stopping = True
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return None
        return self._stop()

    async def _stop(self) -> None:
        for task in self._background:
            task.cancel()
        await self._tracker.close()

    async def _ready(self) -> JobTracker:
        # Starting needs the replica's event loop, which the constructor does not run on;
        # every early call waits for the one start. A start that failed (the store was
        # down) is tried again by the next call; it changes nothing before its reads.
        started = self._started
        if started is None or (started.done() and (started.cancelled() or started.exception())):
            started = self._started = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(started)
        return self._tracker

    async def _start(self) -> int:
        resumed = await self._tracker.start()
        log.info("tracker started; %d unfinished job(s) resumed", resumed)
        loop = asyncio.get_running_loop()
        self._background = [loop.create_task(self._every(REPLICAS_EVERY_S, self._refresh))]
        if self._tracker.primary:  # a prune or sweep covers every shard's jobs
            self._background.append(loop.create_task(self._every(PRUNE_EVERY_S, self._prune)))
            self._background.append(loop.create_task(self._every(SWEEP_EVERY_S, self._sweep)))
        if self._warm is not None:
            self._background.append(loop.create_task(self._every(WARM_EVERY_S, self._top_up)))
        return resumed

    async def _top_up(self) -> None:
        if self._warm is not None:
            await asyncio.to_thread(self._warm.top_up)

    async def _prune(self) -> None:
        await self._tracker.prune()

    async def _sweep(self) -> None:
        await self._tracker.sweep()

    async def _refresh(self) -> None:
        now = asyncio.get_running_loop().time()
        if self._tracker.waiting_on_cold_start() or now >= self._next_idle_refresh:
            self._next_idle_refresh = now + REPLICAS_IDLE_EVERY_S
            await self._tracker.refresh_replicas()

    async def _every(self, period_s: float, work: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await work()
            except Exception:
                log.exception("periodic %s failed; will retry", work.__name__)
            await asyncio.sleep(period_s)

    async def check_health(self) -> None:
        await self._ready()

    async def node_id(self) -> str:
        """The Ray node this tracker runs on (an ingress there can read a SQLite store)."""
        import ray

        return str(ray.get_runtime_context().get_node_id())
