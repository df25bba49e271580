"""`AsyncClient`: the asyncio twin of `imagegen.client.Client` (import it from there)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Unpack

import httpx
from httpx_sse import SSEError, aconnect_sse

from imagegen import payloads
from imagegen.exceptions import APIError, ConnectionFailed
from imagegen.payloads import Call, GenerationOptions, HiresOptions, UpscaleOptions
from imagegen.results import CancelResult, Job, JobPage, ModelInfo, QueueStatus, open_image
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


class AsyncClient:
    """The asyncio twin of `Client`: the same methods, awaited; `stream` is an async
    iterator."""

    def __init__(self, base_url: str = DEFAULT_URL, *, api_key: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT_S,
                 headers: dict[str, str] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(**client_options(base_url, api_key, timeout, headers))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call) -> httpx.Response:
        try:
            response = await self._http.request(call.method, call.path, json=call.json,
                                                params=call.params, headers=call.headers)
        except httpx.TransportError as exc:
            raise connection_failed(self.base_url, exc) from None
        return check(response)

    async def _json(self, call: Call) -> Any:
        return (await self._send(call)).json()

    async def text2img(self, prompt: str, *, idempotency_key: str | None = None,
                       hires: HiresOptions | None = None,
                       **options: Unpack[GenerationOptions]) -> Job:
        call = payloads.text2img(prompt, options, idempotency_key, hires)
        return Job.from_wire(await self._json(call))

    async def img2img(self, image: ImageInput, prompt: str, *, strength: float | None = None,
                      idempotency_key: str | None = None,
                      **options: Unpack[GenerationOptions]) -> Job:
        call = payloads.img2img(image, prompt, strength, options, idempotency_key)
        return Job.from_wire(await self._json(call))

    async def inpaint(self, image: ImageInput, mask: ImageInput, prompt: str, *,
                      strength: float | None = None, idempotency_key: str | None = None,
                      **options: Unpack[GenerationOptions]) -> Job:
        call = payloads.inpaint(image, mask, prompt, strength, options, idempotency_key)
        return Job.from_wire(await self._json(call))

    async def style_transfer(self, content: ImageInput, style: ImageInput, *,
                             prompt: str | None = None, style_strength: float | None = None,
                             content_strength: float | None = None,
                             idempotency_key: str | None = None,
                             **options: Unpack[GenerationOptions]) -> Job:
        call = payloads.style_transfer(content, style, prompt, style_strength,
                                       content_strength, options, idempotency_key)
        return Job.from_wire(await self._json(call))

    async def outpaint(self, image: ImageInput, prompt: str, *, left: int = 0, top: int = 0,
                       right: int = 0, bottom: int = 0, seam: int | None = None,
                       strength: float | None = None, idempotency_key: str | None = None,
                       **options: Unpack[GenerationOptions]) -> Job:
        call = payloads.outpaint(image, prompt, (left, top, right, bottom), seam, strength,
                                 options, idempotency_key)
        return Job.from_wire(await self._json(call))

    async def upscale(self, image: ImageInput, *, scale: float | None = None,
                      width: int | None = None, height: int | None = None,
                      upscaler: str | None = None, idempotency_key: str | None = None,
                      **options: Unpack[UpscaleOptions]) -> Job:
        call = payloads.upscale(image, scale, width, height, upscaler, options,
                                idempotency_key)
        return Job.from_wire(await self._json(call))

    async def upscalers(self) -> list[dict[str, Any]]:
        return list((await self._json(payloads.upscalers()))["upscalers"])

    async def get(self, job: JobRef) -> Job:
        return Job.from_wire(await self._json(payloads.get(job)))

    async def image_bytes(self, job: JobRef, index: int = 0) -> bytes:
        return (await self._send(payloads.image(job, index))).content

    async def image(self, job: JobRef, index: int = 0) -> Image:
        return open_image(await self.image_bytes(job, index))

    async def jobs(self, *, status: str | None = None, type: str | None = None,
                   model: str | None = None, limit: int | None = None,
                   cursor: str | None = None) -> JobPage:
        call = payloads.jobs(status, type, model, limit, cursor)
        return JobPage.from_wire(await self._json(call))

    async def iter_jobs(self, *, status: str | None = None, type: str | None = None,
                        model: str | None = None,
                        page_size: int | None = None) -> AsyncIterator[Job]:
        cursor: str | None = None
        while True:
            page = await self.jobs(status=status, type=type, model=model, limit=page_size,
                                   cursor=cursor)
            for job in page.jobs:
                yield job
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def cancel(self, job: JobRef) -> CancelResult:
        return CancelResult.from_wire(await self._json(payloads.cancel(job)), job_id(job))

    async def queue_status(self) -> QueueStatus:
        return QueueStatus.from_wire(await self._json(payloads.queue_status()))

    async def models(self) -> list[ModelInfo]:
        return [ModelInfo.from_wire(m) for m in (await self._json(payloads.models()))["models"]]

    async def stream(self, job: JobRef, *, timeout: float | None = None,
                     on_progress: ProgressCallback | None = None) -> AsyncIterator[Job]:
        async for record in self._stream(job, Watch(job_id(job), timeout, on_progress)):
            yield record

    async def _stream(self, job: JobRef, watch: Watch) -> AsyncIterator[Job]:
        path = payloads.events(job).path
        try:
            async with aconnect_sse(self._http, "GET", path,
                                    timeout=watch.stream_timeout(self._http.timeout)) as source:
                if not source.response.is_success:
                    await source.response.aread()
                    raise error_for(source.response)
                async for sse in source.aiter_sse():
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

    async def wait(self, job: JobRef, *, timeout: float | None = None,
                   on_progress: ProgressCallback | None = None,
                   raise_on_failure: bool = True) -> Job:
        watch = Watch(job_id(job), timeout, on_progress)
        try:
            async for _ in self._stream(job, watch):
                pass
        except (ConnectionFailed, APIError):
            # No usable stream (a proxy that buffers, an older service): poll. An error
            # that is about the job itself comes back from get() as well.
            while not (watch.last is not None and watch.last.done):
                if watch.expired():
                    raise watch.timed_out() from None
                await asyncio.sleep(watch.next_poll_s())
                watch.seen(await self.get(job))
        return finished(await self.get(job), raise_on_failure)
