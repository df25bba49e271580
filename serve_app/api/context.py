"""What every route of one ingress replica shares: the backend, settings, registry, the
served models, this replica's open event streams and its way to the blob store."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from serve_app.api.backend import JobsBackend
from serve_app.api.events import StreamSlots, Subscriptions
from serve_app.api.images import ImageReader
from serve_app.api.readiness import Readiness
from serve_app.blobs import open_blobs
from serve_app.registry import Registry
from serve_app.settings import Settings


@dataclass(frozen=True)
class ApiContext:
    backend: JobsBackend
    settings: Settings
    registry: Registry
    served: frozenset[str]
    # Per replica: one tracker subscription per watched job, the open streams per key, and
    # the blob store the images are read from and input images written to.
    subscriptions: Subscriptions = field(init=False)
    streams: StreamSlots = field(init=False)
    images: ImageReader = field(init=False)
    readiness: Readiness = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "subscriptions", Subscriptions(self.backend))
        object.__setattr__(self, "streams", StreamSlots(self.settings.max_streams_per_key))
        object.__setattr__(self, "images", ImageReader(open_blobs(self.settings),
                                                       self.settings.presign_expiry_s))
        object.__setattr__(self, "readiness", Readiness(self.backend))


def context(request: Request) -> ApiContext:
    """The context of the app that serves `request` (`create_api` puts it there)."""
    ctx: ApiContext = request.app.state.ctx
    return ctx
