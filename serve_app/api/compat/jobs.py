"""What both compatible APIs do with a job: submit it as our own routes do, wait for it, and
say where its images are.

A compatible request becomes our own generate request body (camelCase) and goes through
`build_submission` and `uploads.submit` like `POST /generate/...`: the same validation,
queue, priority, batching, limits, API keys and ownership. The dialects answer only when
the job has ended, so `wait_for_job` waits on the job's pushed feed (the one subscription
per job that event streams share), never polling the tracker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from serve_app.api import uploads
from serve_app.api.admission import admitted
from serve_app.api.compat.dialects import DialectError, renamed
from serve_app.api.context import context
from serve_app.api.guard import caller_of
from serve_app.api.submission import build_submission
from serve_app.errors import InvalidRequest, JobNotCancellable, JobNotFound, ModelNotAvailable
from serve_app.jobs.job import TIMED_OUT
from serve_app.messages import Caller, JobType, Submission

if TYPE_CHECKING:
    from serve_app.api.backend import JobsBackend
    from serve_app.api.events import Subscriptions

GONE_EVERY_S = 0.5
# The tracker stops a job at JOB_TIMEOUT (from its admission, before this wait began): the
# wait outlasts it by this much, so that one answer, the job's own timeout, always comes.
BACKSTOP_S = 5.0
TERMINAL = frozenset({"completed", "failed", "cancelled"})
# Our validation wants a prompt; dialects that have none (OpenAI variations) or allow an
# empty one (AUTOMATIC1111) validate with this stand-in, then run with "".
_NO_PROMPT = "-"
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")


async def submit(request: Request, names: dict[str, str],
                 build: Callable[[], tuple[JobType, dict[str, Any]]],
                 *, heavy: bool) -> dict[str, Any]:
    """Validate what `build()` makes (the job type and our request body) and submit it; the
    job's record. `heavy`: `build` or the validation decodes images, so both run off the
    event loop. A validation error is answered in the dialect's field `names`."""
    ctx = context(request)
    caller = caller_of(request)
    key = request.headers.get("idempotency-key") or None
    if key is not None and len(key) > 255:
        raise InvalidRequest("Idempotency-Key must be at most 255 characters")

    def validate() -> Submission:
        job_type, body = build()
        empty = job_type is not JobType.UPSCALE and not str(body.get("prompt") or "").strip()
        if empty:
            body = {**body, "prompt": _NO_PROMPT}
        try:
            sub = build_submission(job_type, body, settings=ctx.settings,
                                   registry=ctx.registry, served=ctx.served,
                                   idempotency_key=key, caller=caller,
                                   admitted=admitted(request))
        except (InvalidRequest, ModelNotAvailable) as exc:
            raise renamed(exc, names) from None
        return _without_prompt(sub) if empty else sub

    sub = await run_in_threadpool(validate) if heavy else validate()
    return await uploads.submit(ctx.backend, ctx.images.blobs, sub)


def _without_prompt(sub: Submission) -> Submission:
    task = dataclasses.replace(sub.task, prompt="")
    return dataclasses.replace(sub, task=task, request={**sub.request, "prompt": ""})


async def wait_for_job(request: Request, job_id: str, *,
                       timeout_s: float | None = None) -> dict[str, Any]:
    """The job's record once it has ended (completed, failed or cancelled); its images are
    blob references (`ctx.images` makes them data URIs or URLs).

    A job the tracker stopped at JOB_TIMEOUT is a 504, never repeatable; the wait itself
    gives up `BACKSTOP_S` later (cancelling the job, the same 504) should the tracker not
    say so. A client that hangs up ends the wait but not the job
    (it runs on, visible in `GET /jobs`, as an A1111 job does; clients that want it stopped
    say so, as SillyTavern does with `/sdapi/v1/interrupt`)."""
    ctx = context(request)
    if timeout_s is None:  # the tracker stops the job at JOB_TIMEOUT; this is a backstop
        timeout_s = ctx.settings.job_timeout_ms / 1000 + BACKSTOP_S
    record = await wait_until_ended(ctx.backend, ctx.subscriptions, job_id, caller_of(request),
                                    timeout_s, request.is_disconnected)
    if record is None:
        await cancel_quietly(ctx.backend, job_id, caller_of(request))
        raise DialectError(
            f"Job {job_id} did not finish within {timeout_s:g} s and was cancelled; try "
            "fewer steps or a smaller size, or retry later", 504, code="timeout",
            repeatable=False)
    if record["status"] not in TERMINAL:  # nobody is listening any more
        raise DialectError(f"The client closed the request; job {job_id} runs on", 499,
                           repeatable=False)
    error = str(record.get("error") or "")
    if record["status"] == "failed" and error.startswith(TIMED_OUT):
        raise DialectError(f"Job {job_id} failed: {error}; try fewer steps or a smaller "
                           "size, or retry later", 504, code="timeout", repeatable=False)
    return record


async def wait_until_ended(backend: JobsBackend, subscriptions: Subscriptions, job_id: str,
                           caller: Caller, timeout_s: float,
                           gone: Callable[[], Awaitable[bool]] | None = None,
                           ) -> dict[str, Any] | None:
    """The job's record once it has ended; the record as it is if `gone()` says the client
    left first; None if it has not ended after `timeout_s`.

    One read, counted against the caller's read budget like any request's; then the job's
    pushed feed (the one subscription per job of this replica that event streams share:
    nothing polls the tracker); then the ended job's whole record. `gone` is asked every
    `GONE_EVERY_S` (the connection's own state: no tracker call)."""
    record = await _read(backend, job_id, caller, limited=True)
    if record["status"] in TERMINAL:
        return record

    async def ended() -> dict[str, Any] | None:
        async for pushed in subscriptions.listen(job_id, caller):
            if json.loads(pushed)["status"] in TERMINAL:
                return await _read(backend, job_id, caller, limited=False)
        return None  # the feed went quiet for its idle time: say so as a timeout

    async def left() -> None:
        while gone is None or not await gone():
            await asyncio.sleep(GONE_EVERY_S)

    waiting = asyncio.ensure_future(ended())
    watching = asyncio.ensure_future(left())
    try:
        done, _ = await asyncio.wait({waiting, watching}, timeout=timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiting, watching):
            task.cancel()
    if waiting in done and not waiting.cancelled():
        try:
            return waiting.result()
        except DialectError:
            raise
        except Exception as exc:
            raise _unreadable(job_id, exc) from exc
    if watching in done:  # the client left: its job's state as it is
        return await _read(backend, job_id, caller, limited=False)
    return None


async def _read(backend: JobsBackend, job_id: str, caller: Caller, *, limited: bool
                ) -> dict[str, Any]:
    try:
        return dict(json.loads(await backend.get(job_id, caller, limited=limited)))
    except Exception as exc:
        raise _unreadable(job_id, exc) from exc


def _unreadable(job_id: str, exc: BaseException) -> DialectError:
    # The job was accepted: whatever goes wrong now, the client must not repeat it.
    message = getattr(exc, "message", None) or "the job's state could not be read"
    return DialectError(f"Job {job_id} was accepted, but {message}", 500,
                        code="job_unreadable", repeatable=False)


async def cancel_quietly(backend: JobsBackend, job_id: str, caller: Caller) -> None:
    """Cancel the job unless it has ended or is gone."""
    with contextlib.suppress(JobNotCancellable, JobNotFound):
        await backend.cancel(job_id, caller)


def public_base(request: Request) -> str:
    """This service's base URL as the client reached it: the request's scheme and host,
    or what a proxy in front says (RFC 7239 `Forwarded`, else `X-Forwarded-Proto`,
    `X-Forwarded-Host` and `X-Forwarded-Prefix`)."""
    headers = request.headers
    forwarded = _forwarded(headers.get("forwarded", ""))
    proto = forwarded.get("proto") or _first(headers.get("x-forwarded-proto"))
    host = forwarded.get("host") or _first(headers.get("x-forwarded-host"))
    if proto not in ("http", "https"):
        proto = request.url.scheme
    if not host or not _HOST.match(host):
        host = request.url.netloc
    prefix = _first(headers.get("x-forwarded-prefix")) or request.scope.get("root_path", "")
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    if not re.fullmatch(r"[A-Za-z0-9._~/\-]*", prefix):
        prefix = ""
    return f"{proto}://{host}{prefix}"




def _first(value: str | None) -> str:
    return (value or "").split(",")[0].strip()


def _forwarded(value: str) -> dict[str, str]:
    """The first element of a `Forwarded` header: `for=...;proto=https;host=example.com`."""
    found: dict[str, str] = {}
    for pair in _first(value).split(";"):
        name, _, raw = pair.partition("=")
        if raw:
            found[name.strip().lower()] = raw.strip().strip('"')
    return found
