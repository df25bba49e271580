"""One JSON log line per job transition: what an operator greps and a log pipeline parses.

Status changes and phase changes (queued -> loading_model -> generating, retries) each
write a line to the `imagegen.jobs` logger with the job's id, model, type, status, phase,
attempt, queue wait and run time, and the X-Request-ID of the request that submitted it.
Progress within a phase writes nothing.
"""

from __future__ import annotations

import logging

from serve_app.jobs import jsontext
from serve_app.jobs.job import Job, JobStatus, Phase

log = logging.getLogger("imagegen.jobs")


class JobLog:
    def __init__(self) -> None:
        self._last: dict[str, tuple[JobStatus, Phase | None]] = {}

    def changed(self, job: Job, before: JobStatus | None) -> None:
        """A book watcher."""
        now = (job.status, job.phase)
        if self._last.get(job.id) == now:
            return
        if job.status.is_terminal():
            self._last.pop(job.id, None)
        else:
            self._last[job.id] = now
        log.info(jsontext.dumps_text(line(job)))


def line(job: Job) -> dict[str, object]:
    wait = (job.started_at_ms - job.created_at_ms) if job.started_at_ms else None
    run = job.result.time_taken_ms if job.result is not None else None
    out: dict[str, object] = {
        "event": "job", "jobId": job.id, "model": job.model, "type": job.type.value,
        "status": job.status.value, "phase": job.phase.value if job.phase else None,
        "attempt": job.attempts, "queueWaitMs": wait, "runMs": run,
        "requestId": job.request_id, "owner": job.owner,
    }
    if job.retry_reason:
        out["retryReason"] = job.retry_reason
    if job.error:
        out["error"] = job.error
    return out
