"""What the sync and async clients share around a request: headers, timeouts, turning error
responses and broken connections into typed exceptions, and a job being watched."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
from httpx_sse import ServerSentEvent

from imagegen.exceptions import (
    APIError,
    ConnectionFailed,
    JobCancelled,
    JobFailed,
    WaitTimeout,
    api_error,
)
from imagegen.results import Job, JobStatus

DEFAULT_URL = "http://localhost:3003"
DEFAULT_TIMEOUT_S = 30.0
USER_AGENT = "imagegen-client"
# Polling when the event stream is unavailable: fast at first, then at most once a second.
POLL_FIRST_S = 0.1
POLL_MAX_S = 1.0

ProgressCallback = Callable[[Job], Any]


JobRef = str | Job


def job_id(job: JobRef) -> str:
    return job if isinstance(job, str) else job.id


def finished(job: Job, raise_on_failure: bool) -> Job:
    """`job`, or the error for a job that ended without images."""
    if raise_on_failure and job.status is JobStatus.CANCELLED:
        raise JobCancelled(job)
    if raise_on_failure and job.status is JobStatus.FAILED:
        raise JobFailed(job)
    return job


def client_options(base_url: str, api_key: str | None, timeout: float | None,
                   headers: dict[str, str] | None) -> dict[str, Any]:
    """Keyword arguments for `httpx.Client` / `httpx.AsyncClient`."""
    merged = {"User-Agent": USER_AGENT, **(headers or {})}
    if api_key:
        merged["Authorization"] = f"Bearer {api_key}"
    return {"base_url": base_url.rstrip("/"), "headers": merged,
            "timeout": httpx.Timeout(timeout)}


def error_for(response: httpx.Response) -> APIError:
    """The typed error for a read 4xx/5xx response, carrying the service's `error` text."""
    message = ""
    try:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            message = body["error"]
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    if not message:
        # Not the service's JSON (a proxy's page, say): its first line, or the reason.
        text = response.text.strip().splitlines()
        message = text[0][:200] if text else response.reason_phrase or "error"
    return api_error(response.status_code, message, _retry_after(response))


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def check(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    raise error_for(response)


def connection_failed(base_url: str, exc: httpx.TransportError) -> ConnectionFailed:
    if isinstance(exc, httpx.TimeoutException):
        return ConnectionFailed(f"no answer from {base_url} in time ({type(exc).__name__})")
    reason = str(exc) or type(exc).__name__
    return ConnectionFailed(f"cannot reach {base_url}: {reason}")


class Watch:
    """One job being waited on: its deadline, the last record seen, the progress callback."""

    def __init__(self, job_id: str, timeout: float | None,
                 on_progress: ProgressCallback | None) -> None:
        self.job_id = job_id
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.on_progress = on_progress
        self.last: Job | None = None
        self.poll_s = POLL_FIRST_S

    def remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def timed_out(self) -> WaitTimeout:
        return WaitTimeout(self.job_id, self.timeout or 0.0, self.last)

    def stream_timeout(self, base: httpx.Timeout) -> httpx.Timeout:
        """Connect/write/pool as usual; a read may wait until the deadline (or forever)."""
        return httpx.Timeout(base.connect, read=self.remaining(), write=base.write,
                             pool=base.pool)

    def next_poll_s(self) -> float:
        delay = self.poll_s
        self.poll_s = min(POLL_MAX_S, self.poll_s * 2)
        remaining = self.remaining()
        return delay if remaining is None else min(delay, remaining)

    def seen(self, job: Job) -> None:
        """Record `job`; tell the callback when something it shows has changed."""
        key = (job.status, job.progress, job.phase, job.queue_position)
        last = self.last
        self.last = job
        if last is not None and key == (last.status, last.progress, last.phase,
                                        last.queue_position):
            return
        if self.on_progress is not None:
            self.on_progress(job)

    def event(self, sse: ServerSentEvent) -> Job | None:
        """The record an event carries, or None for an event type this client ignores."""
        if sse.event != "job":
            return None
        try:
            job = Job.from_wire(sse.json())
        except (ValueError, KeyError, TypeError) as exc:
            raise ConnectionFailed(f"unreadable event for job {self.job_id}: {exc}") from None
        self.seen(job)
        return job

    def ended_early(self) -> ConnectionFailed:
        return ConnectionFailed(f"the event stream of job {self.job_id} ended before the job did")
