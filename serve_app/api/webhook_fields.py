"""A submit's `webhook` and `webhookEvents`, checked; and the public URL its images get.

The target must be an http(s) URL with a host, and a literal address in it must be a
public one unless the server allows private targets (`serve_app.webhook_targets`); names
are resolved and checked again at every delivery. A server without WEBHOOK_SECRET cannot
sign webhooks, so it refuses them with a 400 that says how to set one.
"""

from __future__ import annotations

from starlette.requests import Request

from serve_app.api.wire import GenerationCommon
from serve_app.errors import InvalidRequest
from serve_app.messages import DEFAULT_WEBHOOK_EVENTS, WebhookEvent, WebhookRequest
from serve_app.settings import WEBHOOK_SECRET_HELP, Settings
from serve_app.webhook_targets import check_url


def webhook_request(req: GenerationCommon, settings: Settings,
                    base_url: str) -> WebhookRequest | None:
    if req.webhook is None:
        if req.webhook_events is not None:
            raise InvalidRequest("webhookEvents needs webhook, the URL to send them to")
        return None
    if settings.webhook_secret is None:
        raise InvalidRequest(
            "webhook: this server sends no webhooks, as it has no signing secret; its "
            f"operator can {WEBHOOK_SECRET_HELP}")
    problem = check_url(req.webhook, allow_private=settings.webhook_allow_private)
    if problem is not None:
        raise InvalidRequest(f"webhook {problem}")
    events = DEFAULT_WEBHOOK_EVENTS if req.webhook_events is None else req.webhook_events
    if not events:
        raise InvalidRequest("webhookEvents must name at least one of: "
                             + ", ".join(e.value for e in WebhookEvent))
    return WebhookRequest(req.webhook, tuple(dict.fromkeys(events)), base_url)


def public_base_url(request: Request) -> str:
    """The service's URL as the client reached it: X-Forwarded-Proto/-Host when a proxy
    set them, else the request's own. Only the submitter's own webhook bodies carry it."""
    proto = _first(request.headers.get("x-forwarded-proto"))
    host = _first(request.headers.get("x-forwarded-host"))
    base = str(request.base_url).rstrip("/")
    if proto not in ("http", "https"):
        proto = request.url.scheme
    if not host or any(c in host for c in "/\\@ ?#"):
        return base if proto == request.url.scheme else proto + base[base.index(":"):]
    root = request.scope.get("root_path", "").rstrip("/")
    return f"{proto}://{host}{root}"


def _first(value: str | None) -> str:
    """The first of a proxy chain's comma-separated values."""
    return value.split(",", 1)[0].strip() if value else ""
