"""What the routes need from the job tracker, and that interface over a tracker in process.

In production the routes speak to the tracker actor through `TrackerClient`
(`serve_app.api.tracker_client`); unit tests and benchmarks use `InProcessBackend`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from serve_app.messages import Caller, Submission

if TYPE_CHECKING:  # the ingress itself never loads the tracker's code
    from serve_app.jobs.service import JobTracker


class JobsBackend(Protocol):
    """Every call but `submit` names its caller (a submission carries its own): the
    tracker checks ownership and rate limits. `limited=False` reads (an event stream's
    polls) do not draw on the caller's read budget."""

    async def submit(self, sub: Submission) -> dict[str, Any]: ...
    async def get(self, job_id: str, caller: Caller, limited: bool = True) -> bytes: ...
    async def image(self, job_id: str, index: int, caller: Caller) -> tuple[bytes, str]: ...
    async def list_jobs(self, caller: Caller, **filters: Any) -> dict[str, Any]: ...
    async def cancel(self, job_id: str, caller: Caller) -> dict[str, Any]: ...
    async def queue_status(self, caller: Caller) -> dict[str, Any]: ...
    async def models(self, caller: Caller) -> dict[str, Any]: ...
    # Small per-caller settings (serve_app.jobs.callers), shared by every ingress replica.
    async def remember(self, caller: Caller, name: str, value: str | None) -> None: ...
    async def recall(self, caller: Caller) -> dict[str, str]: ...


class InProcessBackend:
    """The `JobsBackend` over a tracker on the same event loop."""

    def __init__(self, tracker: JobTracker) -> None:
        self.tracker = tracker

    async def submit(self, sub: Submission) -> dict[str, Any]:
        return await self.tracker.submit(sub)

    async def get(self, job_id: str, caller: Caller, limited: bool = True) -> bytes:
        return await self.tracker.get(job_id, caller, limited=limited)

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

    async def remember(self, caller: Caller, name: str, value: str | None) -> None:
        self.tracker.remember(caller, name, value)

    async def recall(self, caller: Caller) -> dict[str, str]:
        return self.tracker.recall(caller)
