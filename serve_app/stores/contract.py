"""What a job store is: durable rows of job records, indexed for the tracker's few questions.

A store knows nothing of jobs beyond a `JobRow`: the record and summary as JSON text (made by
`serve_app.jobs.codec`) and the handful of fields it indexes. Every method is synchronous
and cheap (one key or index read, or one transaction); the tracker calls them from a worker
thread, never on its event loop. Implementations: `MemoryStore`, `SQLiteStore`,
`RedisStore`; one contract test-suite runs against all of them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

UNFINISHED: tuple[str, ...] = ("queued", "processing")
FINISHED: tuple[str, ...] = ("completed", "failed", "cancelled")

# Creation times are unix ms; 13 digits last until the year 2286.
MAX_CREATED_MS = 10**13 - 1
_CURSOR_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class JobRow:
    """One job as a store keeps it. `time_taken_ms` is set for completed jobs only."""

    id: str
    status: str
    type: str
    model: str
    owner: str | None
    created_at_ms: int
    completed_at_ms: int | None
    time_taken_ms: int | None
    idempotency_key: str | None
    record: str  # the whole job (serve_app.jobs.codec)
    summary: str  # what listings show, stored beside it so a page never decodes images
    # Webhook deliveries are still to be made for it (finished or not): what a restart
    # resumes (`JobStore.webhooks_pending`).
    webhooks_pending: bool = False

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


@dataclass(frozen=True)
class JobFilter:
    status: str | None = None
    type: str | None = None
    model: str | None = None
    owner: str | None = None


@dataclass(frozen=True)
class Totals:
    """One owner's jobs: how many per status, and the completed ones' processing time."""

    counts: dict[str, int]
    completed: int = 0
    completed_ms: int = 0


@dataclass(frozen=True)
class Page:
    """One page of a listing: job summaries (decoded JSON), newest first."""

    jobs: list[dict[str, Any]]
    next_cursor: str | None


class JobStore(Protocol):
    def save_many(self, rows: Sequence[JobRow], *, durable: bool = False) -> None:
        """Insert or replace each row, all in one transaction where the store has them. A
        row may name an Idempotency-Key that another job already holds: the first holder
        keeps it. A job saved again without the key it held releases it. `durable`: the
        rows are on disk when this returns (new jobs: a submit is acknowledged only then),
        as far as the store's durability setting allows."""

    def load(self, job_id: str) -> str | None:
        """The record text of one job."""

    def unfinished(self) -> list[str]:
        """Records of queued and processing jobs, oldest first: what a restart resumes."""

    def find_idempotent(self, key: str) -> str | None:
        """The id of the job that holds this Idempotency-Key, if any."""

    def webhooks_pending(self) -> list[str]:
        """Records of the jobs last saved with `webhooks_pending` set, in no set order."""

    def query(self, flt: JobFilter, limit: int, cursor: str | None) -> Page:
        """Newest first; `cursor` is the `next_cursor` of the previous page (checked with
        `decode_cursor`: a malformed one raises ValueError). A store may bound the work of
        one call: its page is then shorter than `limit` (even empty) with a `next_cursor`
        that goes on from where it stopped."""

    def totals(self) -> dict[str, Totals]:
        """Per owner ("" for jobs without one): jobs per status, and the number and summed
        processing time (ms) of completed jobs. Owners without jobs may be left out."""

    def missing(self, job_ids: Sequence[str]) -> list[str]:
        """Those of `job_ids` that have no record (the blob sweep's question)."""

    def prune(self, finished_before_ms: int, keep_last: int) -> list[str]:
        """Delete finished jobs older than the cutoff, or beyond the newest `keep_last`,
        but never one with webhook deliveries still pending (its next attempt needs the
        record); the ids deleted (their blobs go next)."""

    def close(self) -> None: ...


def encode_cursor(created_at_ms: int, job_id: str) -> str:
    return f"{created_at_ms}:{job_id}"


def decode_cursor(cursor: str) -> tuple[int, str]:
    """`(created_at_ms, id)` of a cursor; ValueError unless it is one this service made."""
    ms_text, _, job_id = cursor.partition(":")
    ms_ok = ms_text.isascii() and ms_text.isdigit() and len(ms_text) <= 13
    if not (ms_ok and _CURSOR_ID.match(job_id)):
        raise ValueError(f"malformed cursor {cursor!r}")
    return int(ms_text), job_id


def newest_first(rows: Sequence[JobRow]) -> list[JobRow]:
    """Listing order: creation time, then id as tie-break, newest first."""
    return sorted(rows, key=lambda r: (r.created_at_ms, r.id), reverse=True)
