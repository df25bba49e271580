"""What the routes need from the job tracker, and that interface over a tracker in process.

In production the routes speak to the tracker actor through `TrackerClient`
(`serve_app.api.tracker_client`); unit tests and benchmarks use `InProcessBackend`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from serve_app.messages import Submission

if TYPE_CHECKING:  # the ingress itself never loads the tracker's code
    from serve_app.jobs.service import JobTracker


class JobsBackend(Protocol):
    async def submit(self, sub: Submission) -> dict[str, Any]: ...
    async def get(self, job_id: str) -> bytes: ...
    async def image(self, job_id: str, index: int) -> tuple[bytes, str]: ...
    async def list_jobs(self, **filters: Any) -> dict[str, Any]: ...
    async def cancel(self, job_id: str) -> dict[str, Any]: ...
    async def queue_status(self) -> dict[str, Any]: ...
    async def models(self) -> dict[str, Any]: ...


class InProcessBackend:
    """The `JobsBackend` over a tracker on the same event loop."""

    def __init__(self, tracker: JobTracker) -> None:
        self.tracker = tracker

    async def submit(self, sub: Submission) -> dict[str, Any]:
        return await self.tracker.submit(sub)

    async def get(self, job_id: str) -> bytes:
        return await self.tracker.get(job_id)

    async def image(self, job_id: str, index: int) -> tuple[bytes, str]:
        return await self.tracker.image(job_id, index)

    async def list_jobs(self, **filters: Any) -> dict[str, Any]:
        return await self.tracker.list_jobs(**filters)

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return await self.tracker.cancel(job_id)

    async def queue_status(self) -> dict[str, Any]:
        return self.tracker.queue_status()

    async def models(self) -> dict[str, Any]:
        return await self.tracker.models()
