"""The routes' backend over a Ray Serve handle to one tracker deployment.

Every call of the tracker's interface (`serve_app.jobs.interface`) is sent over the handle
as it is; a streaming call (`watch`) is a streaming handle call. Submits are coalesced:
concurrent submits of this ingress replica travel to the tracker in one `submit_many` call
(see `serve_app.api.coalescing`), which is what makes the submit path cheap under load. A
call the tracker had accepted when it died fails with an actor error; Serve restarts the
tracker (it reloads every job from the store) within seconds, so calls are retried until
then. Every call is safe to repeat: submits carry an Idempotency-Key (one is made up when
the client sent none) and a cancel of a cancelled job answers the same again. A submit's
admission (its token, spent before the body is read) is coalesced the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle

from serve_app.api.coalescing import Coalescer
from serve_app.errors import ServiceError, ServiceUnavailable
from serve_app.jobs.interface import CallSpec, derive
from serve_app.jobs.service import TRACKER_CALLS
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


def _send(spec: CallSpec) -> Callable[..., Awaitable[Any]]:
    async def call(self: TrackerClient, *args: Any, **kwargs: Any) -> Any:
        return await self._call(spec.name, *args, **kwargs)
    return call


def _send_stream(spec: CallSpec) -> Callable[..., AsyncIterator[Any]]:
    async def call(self: TrackerClient, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async with aclosing(self._stream(spec.name, *args, **kwargs)) as items:
            async for item in items:
                yield item
    return call


@derive(TRACKER_CALLS, unary=_send, stream=_send_stream)
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
        self._admits: Coalescer[Caller, None] = Coalescer(
            lambda callers: self._call("admit_many", callers),
            max_bundle=SUBMIT_BUNDLE, max_in_flight=SUBMITS_IN_FLIGHT,
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

    async def _stream(self, method: str, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        """A streaming call's items as the tracker yields them; closing this generator
        cancels the call."""
        response = getattr(self._handle.options(stream=True), method).remote(*args, **kwargs)
        try:
            async for item in response:
                yield item
        except RayTaskError as exc:
            if isinstance(exc.cause, ServiceError):
                raise exc.cause from None
            raise
        finally:
            response.cancel()

    async def submit(self, sub: Submission) -> dict[str, Any]:
        """Coalesced with this replica's concurrent submits into one `submit_many`."""
        if sub.idempotency_key is None:
            # Makes a retried submit (see `_call`) return the job the first try saved.
            sub = dataclasses.replace(sub, idempotency_key=f"auto:{uuid.uuid4().hex}")
        return await self._submits(sub)

    async def admit(self, caller: Caller) -> None:
        """Coalesced with this replica's concurrent admissions into one `admit_many`."""
        await self._admits(caller)
