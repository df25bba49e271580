"""Python client for the imagegen service: `Client` (blocking) and `AsyncClient` (asyncio).

    from imagegen.client import Client

    with Client("http://localhost:3003") as client:
        job = client.text2img("a lake at dawn", width=512, height=512, seed=42)
        done = client.wait(job, timeout=120, on_progress=lambda j: print(j.status, j.progress))
        done.image().save("lake.png")

Every route has a typed method; records come back as `Job` and friends (`imagegen.results`);
errors are typed (`imagegen.exceptions`) and carry the service's `error` text and status.
Importing this module loads httpx only: no Ray, torch or diffusers (Pillow when an image is
asked for as a PIL image).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Unpack

import httpx
from httpx_sse import SSEError, connect_sse

from imagegen import payloads
from imagegen.async_client import AsyncClient
from imagegen.exceptions import (
    APIError,
    BadRequest,
    Conflict,
    ConnectionFailed,
    ImagegenError,
    JobCancelled,
    JobFailed,
    NotFound,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    Unauthorized,
    WaitTimeout,
)
from imagegen.payloads import Call, GenerationOptions, HiresOptions, UpscaleOptions
from imagegen.results import (
    CancelResult,
    Job,
    JobPage,
    JobResult,
    JobStatus,
    ModelInfo,
    QueueStatus,
    open_image,
)
from imagegen.transport import (
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    JobRef,
    ProgressCallback,
    Watch,
    check,
    client_options,
    connection_failed,
    error_for,
    finished,
    job_id,
)

if TYPE_CHECKING:
    from PIL.Image import Image

    from imagegen.payloads import ImageInput

__all__ = [
    "APIError", "AsyncClient", "BadRequest", "CancelResult", "Client", "Conflict",
    "ConnectionFailed", "GenerationOptions", "HiresOptions", "ImagegenError", "Job", "JobCancelled",
    "JobFailed", "JobPage", "JobResult", "JobStatus", "ModelInfo", "NotFound",
    "QueueStatus", "RateLimited", "ServerError", "ServiceUnavailable", "Unauthorized",
    "WaitTimeout",
]

class Client:
    """Blocking client. `api_key` is sent as `Authorization: Bearer <key>`; `timeout` bounds
    each request (waiting for a job has its own timeout)."""

    def __init__(self, base_url: str = DEFAULT_URL, *, api_key: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT_S,
                 headers: dict[str, str] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(**client_options(base_url, api_key, timeout, headers))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: Call) -> httpx.Response:
        try:
            response = self._http.request(call.method, call.path, json=call.json,
                                          params=call.params, headers=call.headers)
        except httpx.TransportError as exc:
            raise connection_failed(self.base_url, exc) from None
        return check(response)

    def _json(self, call: Call) -> Any:
        return self._send(call).json()

    # -- submitting ------------------------------------------------------------------

    def text2img(self, prompt: str, *, idempotency_key: str | None = None,
                 hires: HiresOptions | None = None,
                 **options: Unpack[GenerationOptions]) -> Job:
        """`hires`: made at width x height, then scaled up and refined in the same job,
        e.g. `hires={"scale": 2, "upscaler": "latent", "denoising_strength": 0.6}`."""
        call = payloads.text2img(prompt, options, idempotency_key, hires)
        return Job.from_wire(self._json(call))

    def img2img(self, image: ImageInput, prompt: str, *, strength: float | None = None,
                idempotency_key: str | None = None, **options: Unpack[GenerationOptions]) -> Job:
        call = payloads.img2img(image, prompt, strength, options, idempotency_key)
        return Job.from_wire(self._json(call))

    def inpaint(self, image: ImageInput, mask: ImageInput, prompt: str, *,
                strength: float | None = None, idempotency_key: str | None = None,
                **options: Unpack[GenerationOptions]) -> Job:
        call = payloads.inpaint(image, mask, prompt, strength, options, idempotency_key)
        return Job.from_wire(self._json(call))

    def style_transfer(self, content: ImageInput, style: ImageInput, *,
                       prompt: str | None = None, style_strength: float | None = None,
                       content_strength: float | None = None,
                       idempotency_key: str | None = None,
                       **options: Unpack[GenerationOptions]) -> Job:
        call = payloads.style_transfer(content, style, prompt, style_strength,
                                       content_strength, options, idempotency_key)
        return Job.from_wire(self._json(call))

    def outpaint(self, image: ImageInput, prompt: str, *, left: int = 0, top: int = 0,
                 right: int = 0, bottom: int = 0, seam: int | None = None,
                 strength: float | None = None, idempotency_key: str | None = None,
                 **options: Unpack[GenerationOptions]) -> Job:
        """`image` on a canvas grown by `left`/`top`/`right`/`bottom` pixels, the new area
        painted from `prompt`; pixels outside it and the `seam` band stay the input's."""
        call = payloads.outpaint(image, prompt, (left, top, right, bottom), seam, strength,
                                 options, idempotency_key)
        return Job.from_wire(self._json(call))

    def upscale(self, image: ImageInput, *, scale: float | None = None,
                width: int | None = None, height: int | None = None,
                upscaler: str | None = None, idempotency_key: str | None = None,
                **options: Unpack[UpscaleOptions]) -> Job:
        """`image` made larger by `upscaler` (`upscalers()`; default lanczos): by `scale`,
        or to `width` and/or `height`."""
        call = payloads.upscale(image, scale, width, height, upscaler, options,
                                idempotency_key)
        return Job.from_wire(self._json(call))

    def upscalers(self) -> list[dict[str, Any]]:
        """The upscalers `upscale` may name: resamplers and the registry's models."""
        return list((self._json(payloads.upscalers()))["upscalers"])

    # -- reading -----------------------------------------------------------------------

    def get(self, job: JobRef) -> Job:
        return Job.from_wire(self._json(payloads.get(job)))

    def image_bytes(self, job: JobRef, index: int = 0) -> bytes:
        """Image `index` of a completed job, as the service encoded it (PNG by default)."""
        return self._send(payloads.image(job, index)).content

    def image(self, job: JobRef, index: int = 0) -> Image:
        return open_image(self.image_bytes(job, index))

    def jobs(self, *, status: str | None = None, type: str | None = None,
             model: str | None = None, limit: int | None = None,
             cursor: str | None = None) -> JobPage:
        """One page of job summaries, newest first (no request echo, no images)."""
        return JobPage.from_wire(self._json(payloads.jobs(status, type, model, limit, cursor)))

    def iter_jobs(self, *, status: str | None = None, type: str | None = None,
                  model: str | None = None, page_size: int | None = None) -> Iterator[Job]:
        """Every matching job summary, page after page."""
        cursor: str | None = None
        while True:
            page = self.jobs(status=status, type=type, model=model, limit=page_size,
                             cursor=cursor)
            yield from page.jobs
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def cancel(self, job: JobRef) -> CancelResult:
        return CancelResult.from_wire(self._json(payloads.cancel(job)), job_id(job))

    def queue_status(self) -> QueueStatus:
        return QueueStatus.from_wire(self._json(payloads.queue_status()))

    def models(self) -> list[ModelInfo]:
        return [ModelInfo.from_wire(m) for m in self._json(payloads.models())["models"]]

    # -- following a job ---------------------------------------------------------------

    def stream(self, job: JobRef, *, timeout: float | None = None,
               on_progress: ProgressCallback | None = None) -> Iterator[Job]:
        """The job's record (without images) at every change, until it ends.

        Raises `WaitTimeout` past `timeout`, `ConnectionFailed` if the stream breaks.
        """
        yield from self._stream(job, Watch(job_id(job), timeout, on_progress))

    def _stream(self, job: JobRef, watch: Watch) -> Iterator[Job]:
        path = payloads.events(job).path
        try:
            with connect_sse(self._http, "GET", path,
                             timeout=watch.stream_timeout(self._http.timeout)) as source:
                if not source.response.is_success:
                    source.response.read()
                    raise error_for(source.response)
                for sse in source.iter_sse():
                    record = watch.event(sse)
                    if record is not None:
                        yield record
                        if record.done:
                            return
                    if watch.expired():
                        raise watch.timed_out()
        except httpx.TransportError as exc:
            if isinstance(exc, httpx.TimeoutException) and watch.expired():
                raise watch.timed_out() from None
            raise connection_failed(self.base_url, exc) from None
        except SSEError as exc:
            raise ConnectionFailed(f"not an event stream: {exc}") from None
        raise watch.ended_early()

    def wait(self, job: JobRef, *, timeout: float | None = None,
             on_progress: ProgressCallback | None = None,
             raise_on_failure: bool = True) -> Job:
        """Block until the job ends; return its full record (with images).

        Follows the event stream and polls instead if the stream is unavailable.
        `on_progress(job)` is called at every change. Raises `JobFailed` / `JobCancelled`
        (unless `raise_on_failure=False`) and `WaitTimeout` past `timeout` seconds.
        """
        watch = Watch(job_id(job), timeout, on_progress)
        try:
            for _ in self._stream(job, watch):
                pass
        except (ConnectionFailed, APIError):
            # No usable stream (a proxy that buffers, an older service): poll. An error
            # that is about the job itself comes back from get() as well.
            while not (watch.last is not None and watch.last.done):
                if watch.expired():
                    raise watch.timed_out() from None
                time.sleep(watch.next_poll_s())
                watch.seen(self.get(job))
        return finished(self.get(job), raise_on_failure)
