"""Model replica deployment: one per served model, each with its own resources and scaling.

A thin shell over `serve_app.generation.ModelWorker`; the builder applies
`@serve.deployment` with the model's options. torch and diffusers are imported in the
constructor, so composing the app (and the ingress and tracker processes) never loads
them; only the replica process does.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from ray import serve

from serve_app.messages import GenerationTask, ReplicaEvent
from serve_app.registry import ModelSpec
from serve_app.settings import Settings


class ModelReplica:
    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        from serve_app.generation.worker import ModelWorker

        context = serve.get_replica_context()
        name = f"{spec.id}#{context.replica_id.unique_id}"
        if spec.source == "null":  # benchmarks: the service's own cost, no torch
            from serve_app.generation.null import NullRunner

            self._runner: Any = NullRunner(spec)
        else:
            from serve_app.generation.runner import ModelRunner

            self._runner = ModelRunner(spec, settings)
        self._worker = ModelWorker(self._runner, replica_name=name,
                                   progress_every_s=settings.progress_every_ms / 1000)

    def __del__(self) -> None:
        # Serve calls this on graceful shutdown, after the running call has finished (the
        # model's graceful_shutdown_timeout_s is sized to outlast a job).
        runner = getattr(self, "_runner", None)
        if runner is not None:
            runner.close()

    async def run(self, tasks: list[GenerationTask]) -> AsyncGenerator[ReplicaEvent, None]:
        """Streams Started, Progress per denoising step, then one Finished per task (a
        batch of compatible jobs runs as one pipeline call). A caller that
        cancels the stream interrupts the pipeline at its next step."""
        async for event in self._worker.stream(tasks):
            yield event
