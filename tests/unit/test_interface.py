"""The tracker's interface is declared once (`JobTracker`'s `@tracker_call` methods), and
every path to it has each call with the same signature and carries it through unchanged:
the Ray shell, the ingress's handle client, the shard routing, the store-reading ingress
backend and the tests' counting wrapper.

A new tracker call needs a sample value here for each new parameter name (`SAMPLES`); the
rest of this file covers it by itself."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from deployments.tracker import Tracker
from serve_app.api.direct_reads import DirectReads
from serve_app.api.tracker_client import TrackerClient
from serve_app.api.trackers import Trackers
from serve_app.jobs.interface import CallSpec, Route, derive, tracker_call
from serve_app.jobs.job import JobStatus
from serve_app.jobs.service import TRACKER_CALLS, JobTracker
from serve_app.messages import OPEN, Caller
from serve_app.registry import Registry
from serve_app.settings import Settings
from serve_app.shards import ShardMap
from tests.support.trackers import CountedTracker, submission

pytestmark = pytest.mark.anyio
PATHS = (Tracker, TrackerClient, Trackers, DirectReads, CountedTracker)
CALLER = Caller(name="ana", admin=False, client="ana")


def samples(registry: Registry, settings: Settings) -> dict[str, Any]:
    """A value for every parameter name the tracker's calls take."""
    sub = submission(registry, settings)
    return {"sub": sub, "subs": [sub], "job_id": "job_1", "caller": CALLER, "index": 1,
            "callers": [CALLER],
            "limited": False, "live": True, "samples": [("GET", "/jobs", 200, 0.01)],
            "name": "model", "value": "tiny-sd", "filters": {"status": JobStatus.COMPLETED}}


def arguments(spec: CallSpec, values: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for name, param in list(spec.signature.parameters.items())[1:]:
        assert name in values, f"add a sample value for {spec.name}'s parameter {name!r}"
        if param.kind is param.VAR_KEYWORD:
            kwargs.update(values[name])
        elif param.kind is param.KEYWORD_ONLY:
            kwargs[name] = values[name]
        else:
            args.append(values[name])
    return args, kwargs


def test_the_tracker_declares_its_calls_and_every_path_has_each_with_its_signature() -> None:
    assert set(TRACKER_CALLS) >= {"submit", "get", "watch", "cancel", "list_jobs", "image",
                                  "queue_status", "models", "metrics_text", "record_http",
                                  "remember", "recall", "submit_many"}
    for spec in TRACKER_CALLS.values():
        for path in PATHS:
            method = getattr(path, spec.name)
            assert inspect.signature(method) == spec.signature, (path.__name__, spec.name)
            stream = inspect.isasyncgenfunction(method)
            assert stream is spec.stream and (stream or inspect.iscoroutinefunction(method)), (
                path.__name__, spec.name)


def test_a_call_must_be_async_and_a_stream_an_async_generator() -> None:
    with pytest.raises(TypeError, match="must be async"):
        tracker_call(Route.PRIMARY)(lambda self: None)
    with pytest.raises(TypeError, match="async generator"):
        async def not_a_stream(self: Any) -> None: ...
        tracker_call(Route.JOB, stream=True)(not_a_stream)


def test_a_shard_spanning_call_without_its_merge_is_refused_when_the_class_is_made() -> None:
    class Declares:
        @tracker_call(Route.SHARDS)
        async def census(self) -> int:
            return 1

    from serve_app.api import trackers as routing
    from serve_app.jobs.interface import calls_of

    with pytest.raises(TypeError, match="census"):
        derive(calls_of(Declares), unary=routing._route, stream=routing._route_stream)(
            type("Routed", (), {}))


class Recorder:
    """Stands for the `JobTracker`: records each call as it arrives."""

    def __init__(self) -> None:
        self.arrived: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []


def _record(spec: CallSpec) -> Callable[..., Any]:
    async def call(self: Recorder, *args: Any, **kwargs: Any) -> Any:
        self.arrived.append((spec.name, args, kwargs))
        if spec.name == "admit_many":
            return [None]
        return [{"id": "job_1"}] if spec.name == "submit_many" else {"answer": spec.name}
    return call


def _record_stream(spec: CallSpec) -> Callable[..., AsyncIterator[Any]]:
    async def call(self: Recorder, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        self.arrived.append((spec.name, args, kwargs))
        yield b"record"
    return call


Recorder = derive(TRACKER_CALLS, unary=_record, stream=_record_stream)(Recorder)


class Response:
    """What `handle.method.remote()` returns: awaitable, or iterable when streaming."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __await__(self) -> Any:
        return self._call.__await__()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._call

    def cancel(self) -> None:
        pass


class Handle:
    """A deployment handle to the Ray shell, in process: `handle.get.remote(...)` runs the
    shell's method as Serve would."""

    def __init__(self, shell: Tracker) -> None:
        self._shell = shell

    def options(self, **_: Any) -> Handle:
        return self

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._shell, name)

        class Method:
            @staticmethod
            def remote(*args: Any, **kwargs: Any) -> Response:
                return Response(method(*args, **kwargs))
        return Method


async def test_every_call_goes_through_the_ingress_client_and_the_shell_unchanged(
        registry: Registry, settings: Settings) -> None:
    served = frozenset({"tiny-sd", "tiny-sd-inpaint"})
    shell = Tracker(settings.model_copy(update={"warm_workers": 0}), registry, served, {})
    recorder = Recorder()
    shell._tracker = recorder  # type: ignore[assignment]
    started = asyncio.get_running_loop().create_future()
    started.set_result(0)
    shell._started = started  # type: ignore[assignment]
    routed = Trackers([TrackerClient(Handle(shell))], ShardMap((served,)))  # type: ignore[arg-type]
    values = samples(registry, settings)
    for spec in TRACKER_CALLS.values():
        args, kwargs = arguments(spec, values)
        recorder.arrived.clear()
        call = getattr(routed, spec.name)(*args, **kwargs)
        answer = [item async for item in call] if spec.stream else await call
        (name, got_args, got_kwargs), = recorder.arrived
        if spec.name == "submit":  # coalesced: one submit_many with the client's key
            assert name == "submit_many" and answer == {"id": "job_1"}
            (sent,), = got_args
            assert sent.task == args[0].task and sent.idempotency_key.startswith("auto:")
            continue
        if spec.name == "admit":  # coalesced: one admit_many
            assert (name, got_args) == ("admit_many", ([CALLER],)) and answer is None
            continue
        assert (name, list(got_args), got_kwargs) == (spec.name, args, kwargs)
        expected = [b"record"] if spec.stream else (
            [{"id": "job_1"}] if spec.name == "submit_many" else
            [None] if spec.name == "admit_many" else {"answer": spec.name})
        assert answer == expected
    shell._stopping = True  # nothing started: its finalizer has nothing to stop


async def test_the_tracker_itself_answers_every_call_in_process(
        new_tracker: Callable[..., JobTracker], registry: Registry,
        settings: Settings) -> None:
    """In process the tracker is the routes' backend: every call, awaited as the ingress
    awaits it, answers (a job's calls about an unknown job with JobNotFound)."""
    from serve_app.errors import JobNotFound

    tracker = new_tracker()
    values = samples(registry, settings) | {"caller": OPEN}
    for spec in TRACKER_CALLS.values():
        args, kwargs = arguments(spec, values)
        call = getattr(tracker, spec.name)(*args, **kwargs)
        try:
            answer = [item async for item in call] if spec.stream else await call
        except JobNotFound:
            assert spec.route is Route.JOB, spec.name
            continue
        assert answer is not None or spec.name in ("record_http", "remember", "admit"), (
            spec.name)
