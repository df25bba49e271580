"""The tracker's interface, declared once: the methods of `JobTracker` marked `@tracker_call`.

Every path to the tracker is derived from that declaration, never copied by hand:
- the Ray shell (`deployments.tracker.Tracker`) forwards each call to its `JobTracker`;
- the ingress's handle client (`serve_app.api.tracker_client.TrackerClient`) sends each over
  a deployment handle, with retries while the tracker restarts;
- the ingress's routing over tracker shards (`serve_app.api.trackers.Trackers`) sends each to
  the shard its `Route` names;
- in process (unit tests, benchmarks) the `JobTracker` itself is the backend.

So a new call is one method of `JobTracker` (async, decorated) plus its test;
`tests/unit/test_interface.py` checks that every call is reachable through each path with
the same signature. A class that needs a call done differently (the store reads of
`serve_app.api.direct_reads`) defines that method itself, with the same signature.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=type)

_MARK = "__tracker_call__"


class Route(Enum):
    """Which tracker shard answers a call (`serve_app.shards`)."""

    MODEL = "model"      # the shard of the submission's model
    JOB = "job"          # the shard of the model the job's stored record names
    PRIMARY = "primary"  # what belongs to no model: shard 0
    SHARDS = "shards"    # every shard's answer, put together by the ingress


@dataclass(frozen=True)
class CallSpec:
    name: str
    route: Route
    stream: bool  # an async generator: a streaming handle call
    signature: inspect.Signature
    doc: str | None


def tracker_call(route: Route, *, stream: bool = False) -> Callable[[F], F]:
    """Mark a `JobTracker` method as part of the tracker's interface."""
    def mark(method: F) -> F:
        kind_ok = (inspect.isasyncgenfunction(method) if stream
                   else inspect.iscoroutinefunction(method))
        if not kind_ok:
            want = "an async generator" if stream else "async"
            raise TypeError(f"tracker call {method.__name__} must be {want}")
        setattr(method, _MARK, (route, stream))
        return method
    return mark


def calls_of(cls: type) -> dict[str, CallSpec]:
    """The calls `cls` declares, by name, in definition order."""
    found: dict[str, CallSpec] = {}
    for name, member in vars(cls).items():
        mark = getattr(member, _MARK, None)
        if mark is not None:
            route, stream = mark
            found[name] = CallSpec(name, route, stream, inspect.signature(member),
                                   inspect.getdoc(member))
    return found


Maker = Callable[[CallSpec], Callable[..., Any]]


def derive(calls: dict[str, CallSpec], *, unary: Maker, stream: Maker) -> Callable[[C], C]:
    """A class decorator: one method per call that the class does not define itself, made
    by `unary(spec)` (an async function) or `stream(spec)` (an async generator function)
    and given the call's name, signature and docstring."""
    def apply(cls: C) -> C:
        for spec in calls.values():
            if spec.name in vars(cls):
                continue  # done differently here, with the same signature (tested)
            method = (stream if spec.stream else unary)(spec)
            method.__name__ = spec.name
            method.__qualname__ = f"{cls.__qualname__}.{spec.name}"
            method.__doc__ = spec.doc
            method.__signature__ = spec.signature  # type: ignore[attr-defined]
            setattr(cls, spec.name, method)
        return cls
    return apply
