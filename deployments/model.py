"""Model replica deployment: one per served model, each with its own resources and scaling.

A thin shell over `serve_app.generation.ModelWorker`; the builder applies
`@serve.deployment` with the model's options. torch and diffusers are imported in the
constructor, so composing the app (and the ingress and tracker processes) never loads
them; only the replica process does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

import psutil
from ray import serve

from serve_app.blobs import open_blobs
from serve_app.messages import GenerationTask, StreamItem, pack
from serve_app.registry import ModelSpec
from serve_app.settings import Settings

log = logging.getLogger(__name__)


class ModelReplica:
    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        began = time.time()
        from serve_app.generation import preload
        from serve_app.generation.worker import ModelWorker

        context = serve.get_replica_context()
        name = f"{spec.id}#{context.replica_id.unique_id}"
        blobs = open_blobs(settings)
        if spec.source == "null":  # benchmarks: the service's own cost, no torch
            from serve_app.generation.null import NullRunner

            self._runner: Any = NullRunner(spec)
        else:
            from serve_app.generation.runner import ModelRunner
            from serve_app.generation.speedups import BlobArtifacts

            # Compiled artifacts (runtime.compile) are shared through the blob store too.
            self._runner = ModelRunner(spec, settings, compiled=BlobArtifacts(blobs))
        # Inputs are read from, and results written to, the blob store here: no image
        # bytes travel between this replica and the tracker.
        self._worker = ModelWorker(self._runner, replica_name=name,
                                   progress_every_s=settings.progress_every_ms / 1000,
                                   blobs=blobs)
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
