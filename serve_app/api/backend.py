"""What the routes need from the job tracker, and that interface over a tracker in process.

In production the routes speak to the tracker actor through `TrackerClient`
(`serve_app.api.tracker_client`); unit tests and benchmarks use `InProcessBackend`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

from serve_app.messages import Caller, Submission

if TYPE_CHECKING:  # the ingress itself never loads the tracker's code
    from serve_app.jobs.service import JobTracker


class JobsBackend(Protocol):
    """Every call but `submit` names its caller (a submission carries its own): the
    tracker checks ownership and rate limits. `limited=False` reads do not draw on the
    caller's read budget; a `live` read asks the tracker even where the ingress reads the
    store itself (`serve_app.api.direct_reads`): it has the running job's latest preview.
    `watch` pushes a job's record at each change until it ends."""

    async def submit(self, sub: Submission) -> dict[str, Any]: ...
    async def get(self, job_id: str, caller: Caller, limited: bool = True,
                  live: bool = False) -> bytes: ...
    def watch(self, job_id: str, caller: Caller) -> AsyncIterator[bytes]: ...
    async def image(self, job_id: str, index: int, caller: Caller) -> tuple[bytes, str]: ...
    async def list_jobs(self, caller: Caller, **filters: Any) -> dict[str, Any]: ...
    async def cancel(self, job_id: str, caller: Caller) -> dict[str, Any]: ...
    async def queue_status(self, caller: Caller) -> dict[str, Any]: ...
    async def models(self, caller: Caller) -> dict[str, Any]: ...
    async def metrics_text(self, caller: Caller) -> bytes: ...
    async def record_http(self, samples: list[tuple[str, str, int, float]]) -> None: ...

    # Small per-caller settings (serve_app.jobs.callers), shared by every ingress replica.
    async def remember(self, caller: Caller, name: str, value: str | None) -> None: ...
    async def recall(self, caller: Caller) -> dict[str, str]: ...


class InProcessBackend:
    """The `JobsBackend` over a tracker on the same event loop."""

    def __init__(self, tracker: JobTracker) -> None:
        self.tracker = tracker

    async def submit(self, sub: Submission) -> dict[str, Any]:
        return await self.tracker.submit(sub)

    async def get(self, job_id: str, caller: Caller, limited: bool = True,
                  live: bool = False) -> bytes:
        return await self.tracker.get(job_id, caller, limited=limited)  # always live

    def watch(self, job_id: str, caller: Caller) -> AsyncIterator[bytes]:
        return self.tracker.watch(job_id, caller)

    async def image(self, job_id: str, index: int, caller: Caller) -> tuple[bytes, str]:
        return await self.tracker.image(job_id, index, caller)

    async def list_jobs(self, caller: Caller, **filters: Any) -> dict[str, Any]:
        return await self.tracker.list_jobs(caller, **filters)

    async def cancel(self, job_id: str, caller: Caller) -> dict[str, Any]:
        return await self.tracker.cancel(job_id, caller)

    async def queue_status(self, caller: Caller) -> dict[str, Any]:
        return self.tracker.queue_status(caller)

    async def models(self, caller: Caller) -> dict[str, Any]:
        return await self.tracker.models(caller)

    async def metrics_text(self, caller: Caller) -> bytes:
        return self.tracker.metrics_text(caller)

    async def record_http(self, samples: list[tuple[str, str, int, float]]) -> None:
        self.tracker.record_http(samples)

    async def remember(self, caller: Caller, name: str, value: str | None) -> None:
        self.tracker.remember(caller, name, value)

    async def recall(self, caller: Caller) -> dict[str, str]:
        return self.tracker.recall(caller)
