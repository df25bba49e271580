"""What every route of one ingress replica shares: the backend, settings, registry, the
served models, and this replica's open event streams."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from serve_app.api.backend import JobsBackend
from serve_app.api.events import StreamSlots, Subscriptions
from serve_app.registry import Registry
from serve_app.settings import Settings


@dataclass(frozen=True)
class ApiContext:
    backend: JobsBackend
    settings: Settings
    registry: Registry
    served: frozenset[str]
    # Per replica: one tracker subscription per watched job, and the open streams per key.
    subscriptions: Subscriptions = field(init=False)
    streams: StreamSlots = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "subscriptions", Subscriptions(self.backend))
        object.__setattr__(self, "streams", StreamSlots(self.settings.max_streams_per_key))


def context(request: Request) -> ApiContext:
    """The context of the app that serves `request` (`create_api` puts it there)."""
    ctx: ApiContext = request.app.state.ctx
    return ctx
