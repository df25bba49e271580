"""Model replica deployment: one per served model, each with its own resources and scaling.

A thin shell over `serve_app.generation.ModelWorker`; the builder applies
`@serve.deployment` with the model's options. torch and diffusers are imported in the
constructor, so composing the app (and the ingress and tracker processes) never loads
them; only the replica process does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import psutil
from ray import serve

from serve_app.blobs import Blobs, open_blobs
from serve_app.errors import ModelNotAvailable
from serve_app.messages import (
    GenerationTask,
    PoolReport,
    ReplicaEvent,
    Started,
    StreamItem,
    pack,
)
from serve_app.model_pools import PoolSpec
from serve_app.registry import ModelSpec
from serve_app.settings import Settings

log = logging.getLogger(__name__)


class ModelReplica:
    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        began = time.time()
        from serve_app.generation import preload

        context = serve.get_replica_context()
        name = f"{spec.id}#{context.replica_id.unique_id}"
        self._worker = build_worker(spec, settings, name, open_blobs(settings))
        self._runner = self._worker.runner
        self._startup = startup_phases(psutil.Process().create_time(), began, time.time(),
                                       preload.IMPORTS_STARTED, preload.IMPORTS_DONE)
        log.info("replica %s started: %s", name, self._startup)

    def startup(self) -> dict[str, Any]:
        """How this replica's start went (seconds): see `startup_phases`."""
        return self._startup

    def __del__(self) -> None:
        # Serve calls this on graceful shutdown, after the running call has finished (the
        # model's graceful_shutdown_timeout_s is sized to outlast a job).
        runner = getattr(self, "_runner", None)
        if runner is not None:
            runner.close()

    async def run(self, tasks: list[GenerationTask], packed: bool = False
                  ) -> AsyncGenerator[StreamItem, None]:
        """Streams Started, Progress per denoising step, then one Finished per task (a
        batch of compatible jobs runs as one pipeline call), the batch's Finished as one
        list when the caller asks for `packed` items (a tracker of an earlier version,
        during a rolling update, does not). A caller that cancels the stream interrupts
        the pipeline at its next step."""
        events = self._worker.stream(tasks)
        async for item in pack(events) if packed else events:
            yield item


def build_worker(spec: ModelSpec, settings: Settings, name: str, blobs: Blobs) -> Any:
    """A `ModelWorker` over `spec`'s runner (loaded here: blocking, seconds to minutes)."""
    from serve_app.generation.worker import ModelWorker

    if spec.source == "null":  # benchmarks: the service's own cost, no torch
        from serve_app.generation.null import NullRunner

        runner: Any = NullRunner(spec)
    else:
        from serve_app.generation.runner import ModelRunner
        from serve_app.generation.speedups import BlobArtifacts

        # Compiled artifacts (runtime.compile) are shared through the blob store too.
        runner = ModelRunner(spec, settings, compiled=BlobArtifacts(blobs))
    # Inputs are read from, and results written to, the blob store here: no image bytes
    # travel between this replica and the tracker.
    return ModelWorker(runner, replica_name=name,
                       progress_every_s=settings.progress_every_ms / 1000, blobs=blobs)


class PoolReplica:
    """One replica of a pool deployment (`pool-<id>`): it serves each call with the model
    the call names as its multiplexed model id (`handle.options(multiplexed_model_id=...)`),
    loading it on demand. Which models stay loaded is Serve's multiplexing LRU
    (`get_model`, decorated in `pool_replica_class` with the pool's model count); an
    evicted model's memory is freed for real (`serve_app.generation.pool`)."""

    def __init__(self, pool: PoolSpec, specs: list[ModelSpec], settings: Settings) -> None:
        from serve_app.generation import preload
        from serve_app.generation.pool import PoolLedger

        began = time.time()
        self._pool = pool
        self._specs = {spec.id: spec for spec in specs}
        self._settings = settings
        self._blobs = open_blobs(settings)
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._ledger = PoolLedger()
        self._startup = startup_phases(psutil.Process().create_time(), began, time.time(),
                                       preload.IMPORTS_STARTED, preload.IMPORTS_DONE)

    def startup(self) -> dict[str, Any]:
        return self._startup

    def loaded(self) -> tuple[str, ...]:
        """The models this replica holds now, least recently loaded first."""
        return self._ledger.loaded

    def rss_bytes(self) -> int:
        """This replica process's resident memory (tests and bench watch it)."""
        return int(psutil.Process().memory_info().rss)

    async def _load(self, model_id: str) -> Any:
        from serve_app.generation.pool import PooledModel

        spec = self._specs.get(model_id)
        if spec is None:
            raise ModelNotAvailable(f"model {model_id!r} is not in pool {self._pool.id!r}; "
                                    f"its models: {', '.join(self._specs)}")
        began = time.monotonic()
        name = f"{model_id}#{self._replica}"
        worker = await asyncio.to_thread(build_worker, spec, self._settings, name, self._blobs)
        self._ledger.added(model_id, round(time.monotonic() - began, 4))
        log.info("pool %s: loaded %s in %.2f s", self._pool.id, model_id,
                 time.monotonic() - began)
        return PooledModel(model_id, worker, self._ledger.released)

    async def get_model(self, model_id: str) -> Any:  # replaced in pool_replica_class
        return await self._load(model_id)

    async def run(self, tasks: list[GenerationTask], packed: bool = False
                  ) -> AsyncGenerator[StreamItem, None]:
        """As `ModelReplica.run`, for the call's multiplexed model; its `Started` carries
        this replica's `PoolReport`."""
        model_id = serve.get_multiplexed_model_id()
        fresh = not self._ledger.holds(model_id)
        model = await self.get_model(model_id)
        report = self._ledger.report(model_id, fresh)
        events = _with_report(model.worker.stream(tasks), report)
        del model  # only Serve's LRU holds a model between calls
        async for item in pack(events) if packed else events:
            yield item


async def _with_report(events: AsyncIterator[ReplicaEvent], report: PoolReport
                       ) -> AsyncIterator[ReplicaEvent]:
    async for event in events:
        yield dataclasses.replace(event, pool=report) if isinstance(event, Started) else event


def pool_replica_class(pool: PoolSpec) -> type[PoolReplica]:
    """`PoolReplica` with Serve's multiplexing on `get_model`, keeping `pool`'s count of
    models per replica (the decorator takes it as a constant, so the class is made here)."""

    class Pooled(PoolReplica):
        @serve.multiplexed(max_num_models_per_replica=pool.models_per_replica)
        async def get_model(self, model_id: str) -> Any:
            return await self._load(model_id)

    return Pooled


# A process whose imports were done this long before the replica's constructor began was
# waiting for it: a warm worker. One Ray started for the replica itself (the imports then
# run first, on the replica's own time) begins the constructor within a few hundred ms.
WARM_IDLE_S = 1.0


def startup_phases(born: float, began: float, ready: float, preload_started: float | None,
                   preload_done: float | None) -> dict[str, Any]:
    """A replica's start in wall-clock seconds: `process_age_s`, how old its process was
    when the constructor began; `preload_s`, the imports Ray's preload did in it;
    `idle_before_s`, how long the process had waited, imports done, before the replica
    was put on it; `warm_worker`, whether that wait says it was a warm worker (and not a
    process started for this replica); `init_s`, the constructor (imports not done ahead,
    pipeline load, warm-up)."""
    idle = began - preload_done if preload_done is not None else None
    return {
        "warm_worker": idle is not None and idle >= WARM_IDLE_S,
        "process_age_s": round(began - born, 3),
        "preload_s": round(preload_done - preload_started, 3)
        if preload_started is not None and preload_done is not None else None,
        "idle_before_s": round(idle, 3) if idle is not None else None,
        "init_s": round(ready - began, 3),
    }
