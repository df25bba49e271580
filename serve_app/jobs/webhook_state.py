"""A job's webhook: its target, the events it asked for, and the state of each delivery.

Plain data, kept in the job's record (so a restart resumes what is pending) and shown in
the job record as `webhook`. One `Delivery` per event the job went through, with a
`webhook-id` that stays the same for every attempt of it (receivers de-duplicate by it)
and the body fixed when the event happened. `progress` is best effort (see
`serve_app.jobs.webhooks`): one entry, the latest progress sent, never retried. Nothing
here knows the signing secret.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from serve_app.messages import WebhookEvent, WebhookRequest


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # gave up: the deadline passed (or it could never be sent)


@dataclass
class Delivery:
    """One event's webhook: the same id and body on every attempt."""

    event: WebhookEvent
    id: str
    payload: str  # the JSON body
    created_at_ms: int
    next_attempt_ms: int | None = None
    status: DeliveryStatus = DeliveryStatus.PENDING
    attempts: int = 0
    last_status: int | None = None  # the HTTP status of the last attempt, if one came
    last_error: str | None = None  # why the last attempt failed without a status
    finished_at_ms: int | None = None

    def attempted(self, status: int | None, error: str | None) -> None:
        self.attempts += 1
        self.last_status = status
        self.last_error = error

    def delivered(self, now_ms: int) -> None:
        self.status = DeliveryStatus.DELIVERED
        self.next_attempt_ms = None
        self.finished_at_ms = now_ms

    def retry_at(self, at_ms: int) -> None:
        self.next_attempt_ms = at_ms

    def give_up(self, now_ms: int, reason: str | None = None) -> None:
        self.status = DeliveryStatus.FAILED
        self.next_attempt_ms = None
        self.finished_at_ms = now_ms
        if reason is not None:
            self.last_error = reason

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": self.event.value, "id": self.id,
                               "status": self.status.value, "attempts": self.attempts}
        if self.last_status is not None:
            out["lastStatus"] = self.last_status
        if self.last_error is not None:
            out["lastError"] = self.last_error
        if self.next_attempt_ms is not None and self.status is DeliveryStatus.PENDING:
            out["nextAttemptAt"] = _iso(self.next_attempt_ms)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Delivery:
        values = dict(data)
        values["event"] = WebhookEvent(values["event"])
        values["status"] = DeliveryStatus(values["status"])
        return cls(**values)


@dataclass
class WebhookState:
    url: str
    events: list[WebhookEvent]
    base_url: str
    deliveries: list[Delivery] = field(default_factory=list)

    @classmethod
    def of(cls, request: WebhookRequest) -> WebhookState:
        return cls(request.url, list(request.events), request.base_url)

    def wants(self, event: WebhookEvent) -> bool:
        return event in self.events

    def get(self, event: WebhookEvent) -> Delivery | None:
        return next((d for d in self.deliveries if d.event is event), None)

    def put(self, delivery: Delivery) -> None:
        """Add `delivery`, replacing the entry of its event (progress has one)."""
        self.deliveries = [d for d in self.deliveries if d.event is not delivery.event]
        self.deliveries.append(delivery)

    @property
    def pending(self) -> list[Delivery]:
        """Deliveries still to make (progress is never retried, so never pending)."""
        return [d for d in self.deliveries
                if d.status is DeliveryStatus.PENDING and d.event is not WebhookEvent.PROGRESS]

    def to_wire(self) -> dict[str, Any]:
        return {"url": self.url, "events": [e.value for e in self.events],
                "deliveries": [d.to_wire() for d in self.deliveries]}

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "events": [e.value for e in self.events],
                "base_url": self.base_url,
                "deliveries": [{**d.__dict__, "event": d.event.value, "status": d.status.value}
                               for d in self.deliveries]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WebhookState:
        return cls(data["url"], [WebhookEvent(e) for e in data["events"]], data["base_url"],
                   [Delivery.from_json(d) for d in data.get("deliveries", [])])


def _iso(ms: int) -> str:
    """As `serve_app.jobs.job.iso` writes times (that module imports this one)."""
    stamp = datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
    return f"{stamp}{ms % 1000:03d}Z"
