"""A tracker in process with fake replicas, as most unit tests use one, and what goes with
it: the served models, a submission, a record read, an HTTP client over the routes, the
loop let run, and a backend that counts the calls reaching the tracker."""

from __future__ import annotations

import asyncio
import base64
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import httpx

from serve_app.api.app import ApiContext, create_api
from serve_app.api.backend import JobsBackend
from serve_app.api.submission import build_submission
from serve_app.jobs.calls import Replicas
from serve_app.jobs.interface import CallSpec, derive
from serve_app.jobs.persistence import StoreCalls
from serve_app.jobs.service import TRACKER_CALLS, JobTracker
from serve_app.messages import JobType, Submission
from serve_app.registry import Registry
from serve_app.settings import Settings
from tests.support.fakes import TEST_BLOBS, FakeReplicas, memory_store, shared_blobs

SERVED = frozenset({"tiny-sd", "tiny-sd-inpaint"})
SMALL = {"prompt": "a lake", "steps": 3, "width": 64, "height": 64, "seed": 7}


def make_tracker(registry: Registry, settings: Settings, replicas: Replicas | None = None, *,
                 store: StoreCalls | None = None, served: frozenset[str] = SERVED,
                 **kwargs: Any) -> JobTracker:
    """A tracker over an in-memory store (its calls inline) and `FakeReplicas`; `kwargs`
    go to `JobTracker` (clock, webhook_sender, shards, ...)."""
    return JobTracker(settings=settings, registry=registry, store=store or memory_store(),
                      replicas=replicas if replicas is not None else FakeReplicas(),
                      served=served, **kwargs)


def submission(registry: Registry, settings: Settings, *, key: str | None = None,
               job_type: JobType = JobType.TEXT2IMG, served: frozenset[str] = SERVED,
               base_url: str = "", **body: Any) -> Submission:
    """A small job (64 px, 3 steps, seed 7) as the routes would submit it; `body` fields
    are added or replace those."""
    return build_submission(job_type, SMALL | body, settings=settings, registry=registry,
                            served=served, idempotency_key=key, base_url=base_url)


async def record(backend: JobsBackend, job_id: str, blob_url: str = TEST_BLOBS
                 ) -> dict[str, Any]:
    """The job's record as GET /jobs/:id answers it: its images as data URIs, read from
    the tests' blob store (a tracker's own record holds references). The reads are
    synchronous: a test on a virtual-time loop must not wait on another thread."""
    data: dict[str, Any] = json.loads(await backend.get(job_id))
    result = data.get("result")
    if result:
        result["images"] = [_data_uri(entry, blob_url) for entry in result["images"]]
    return data


def _data_uri(entry: dict[str, Any] | str, blob_url: str) -> str:
    if isinstance(entry, str):
        return entry
    data = shared_blobs(blob_url).get(entry["key"])
    return f"data:{entry['contentType']};base64,{base64.b64encode(data).decode()}"


async def settle(rounds: int = 50) -> None:
    """Let the loop run everything that is ready, `rounds` times over (fake replicas answer
    at once, so a submitted job runs to its end)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def http_client(backend: JobsBackend, settings: Settings, registry: Registry,
                served: frozenset[str] = SERVED, *, raise_app_exceptions: bool = True,
                **options: Any) -> httpx.AsyncClient:
    """An HTTP client over the routes of `create_api`, in process (no server, no Ray); use
    it with `async with`. `raise_app_exceptions=False`: an unhandled error is the 500 a
    server would send, not an exception in the test."""
    api = create_api(ApiContext(backend, settings, registry, served))
    transport = httpx.ASGITransport(app=api, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://test", **options)


def _counted(spec: CallSpec) -> Callable[..., Awaitable[Any]]:
    async def call(self: CountedTracker, *args: Any, **kwargs: Any) -> Any:
        self.calls[spec.name] += 1
        return await getattr(self.tracker, spec.name)(*args, **kwargs)
    return call


def _counted_stream(spec: CallSpec) -> Callable[..., AsyncIterator[Any]]:
    async def call(self: CountedTracker, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        self.calls[spec.name] += 1
        async with aclosing(getattr(self.tracker, spec.name)(*args, **kwargs)) as items:
            async for item in items:
                yield item
    return call


@derive(TRACKER_CALLS, unary=_counted, stream=_counted_stream)
class CountedTracker:
    """The tracker, every call that reaches it counted by name (`calls`)."""

    def __init__(self, tracker: JobsBackend) -> None:
        self.tracker = tracker
        self.calls: Counter[str] = Counter()


def batching_registry(registry: Registry, size: int, **scaling: Any) -> Registry:
    """The registry with its first model batching `size` jobs a call (and `scaling`)."""
    data = registry.model_dump()
    data["models"][0]["scaling"] |= {"max_batch_size": size} | scaling
    return Registry.model_validate(data)
