"""The routes' `JobsBackend` over a Ray Serve handle to the tracker deployment.

Submits are coalesced: concurrent submits of this ingress replica travel to the tracker in
one `submit_many` call (see `serve_app.api.coalescing`), which is what makes the submit path
cheap under load; the other calls are one call each. A call the tracker had accepted when it
died fails with an actor error; Serve restarts the tracker (it reloads every job from the
store) within seconds, so calls are retried until then. Every call is safe to repeat:
submits carry an Idempotency-Key (one is made up when the client sent none) and a cancel of
a cancelled job answers the same again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle

from serve_app.api.coalescing import Coalescer
from serve_app.errors import ServiceError, ServiceUnavailable
from serve_app.messages import Caller, Submission

log = logging.getLogger(__name__)

TRACKER_RESTART_S = 30.0
RETRY_PAUSE_S = 0.5
# Submits per tracker call, and calls out at once: with two out, one is always being
# filled while the other travels.
SUBMIT_BUNDLE = 64
SUBMITS_IN_FLIGHT = 2


def _tracker_unavailable() -> ServiceUnavailable:
    return ServiceUnavailable(
        "The job tracker is restarting; retry shortly (submits with the same "
        "Idempotency-Key are never duplicated)", retry_after_s=5,
    )


class TrackerClient:
    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle
        self._submits: Coalescer[Submission, dict[str, Any]] = Coalescer(
            lambda subs: self._call("submit_many", subs),
            max_bundle=SUBMIT_BUNDLE, max_in_flight=SUBMITS_IN_FLIGHT,
            # Submits queued behind calls stuck retrying a restarting tracker give up with
            # the same 503 a call would, instead of starting their own wait.
            max_wait_s=TRACKER_RESTART_S, expired=_tracker_unavailable,
        )

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + TRACKER_RESTART_S
        while True:
            try:
                return await getattr(self._handle, method).remote(*args, **kwargs)
            except RayTaskError as exc:
                # Domain errors travel wrapped; unwrap them so the HTTP layer maps them.
                if isinstance(exc.cause, ServiceError):
                    raise exc.cause from None
                raise
            except (RayActorError, ActorUnavailableError) as exc:
                if time.monotonic() >= deadline:
                    raise _tracker_unavailable() from exc
                log.warning("tracker unavailable (%s); retrying %s", type(exc).__name__, method)
                await asyncio.sleep(RETRY_PAUSE_S)

    async def submit(self, sub: Submission) -> dict[str, Any]:
        if sub.idempotency_key is None:
            # Makes a retried submit (see `_call`) return the job the first try saved.
            sub = dataclasses.replace(sub, idempotency_key=f"auto:{uuid.uuid4().hex}")
        return await self._submits(sub)

    async def get(self, job_id: str, caller: Caller, limited: bool = True,
                  live: bool = False) -> bytes:
        return await self._call("get", job_id, caller, limited)  # the tracker's is live

    async def watch(self, job_id: str, caller: Caller) -> AsyncIterator[bytes]:
        """The tracker's pushed records of one job, over a streaming call; closing this
        generator cancels the call."""
        response = self._handle.options(stream=True).watch.remote(job_id, caller)
        try:
            async for record in response:
                yield record
        except RayTaskError as exc:
            if isinstance(exc.cause, ServiceError):
                raise exc.cause from None
            raise
        finally:
            response.cancel()

    async def image(self, job_id: str, index: int, caller: Caller) -> tuple[bytes, str]:
        return await self._call("image", job_id, index, caller)

    async def list_jobs(self, caller: Caller, **filters: Any) -> dict[str, Any]:
        return await self._call("list_jobs", caller, **filters)

    async def cancel(self, job_id: str, caller: Caller) -> dict[str, Any]:
        return await self._call("cancel", job_id, caller)

    async def queue_status(self, caller: Caller) -> dict[str, Any]:
        return await self._call("queue_status", caller)

    async def models(self, caller: Caller) -> dict[str, Any]:
        return await self._call("models", caller)

    async def metrics_text(self, caller: Caller) -> bytes:
        return await self._call("metrics_text", caller)

    async def record_http(self, samples: list[tuple[str, str, int, float]]) -> None:
        await self._call("record_http", samples)

    async def remember(self, caller: Caller, name: str, value: str | None) -> None:
        await self._call("remember", caller, name, value)

    async def recall(self, caller: Caller) -> dict[str, str]:
        return await self._call("recall", caller)
