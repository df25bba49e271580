"""Server-sent events of one job: the record (without images) whenever it changes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from serve_app.api.backend import JobsBackend
from serve_app.jobs.job import JobStatus
from serve_app.messages import Caller

EVENT_POLL_S = 0.25


async def job_events(backend: JobsBackend, job_id: str, first: bytes,
                     caller: Caller) -> AsyncIterator[bytes]:
    """`event: job` with the record at every change, until the job ends."""
    last = b""
    record = first
    while True:
        job = json.loads(record)
        job.get("result", {}).pop("images", None)
        payload = json.dumps(job).encode()
        if payload != last:
            yield b"event: job\ndata: " + payload + b"\n\n"
            last = payload
        if JobStatus(job["status"]).is_terminal():
            return
        await asyncio.sleep(EVENT_POLL_S)
        record = await backend.get(job_id, caller, limited=False)
