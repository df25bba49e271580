"""A JobStore in a dict: nothing survives the process (tests, throwaway runs)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from serve_app.stores.contract import (
    FINISHED,
    UNFINISHED,
    JobFilter,
    JobRow,
    Page,
    Totals,
    decode_cursor,
    encode_cursor,
    newest_first,
)


class MemoryStore:
    def __init__(self) -> None:
        self._rows: dict[str, JobRow] = {}
        self._idempotency: dict[str, str] = {}

    def save_many(self, rows: Sequence[JobRow], *, durable: bool = False) -> None:
        for row in rows:
            old = self._rows.get(row.id)
            self._rows[row.id] = row
            released = old.idempotency_key if old is not None else None
            if (released and released != row.idempotency_key
                    and self._idempotency.get(released) == row.id):
                del self._idempotency[released]  # saved without it: the key is free
            if row.idempotency_key:
                self._idempotency.setdefault(row.idempotency_key, row.id)

    def load(self, job_id: str) -> str | None:
        row = self._rows.get(job_id)
        return row.record if row is not None else None

    def unfinished(self) -> list[str]:
        rows = [r for r in self._rows.values() if r.status in UNFINISHED]
        return [r.record for r in reversed(newest_first(rows))]

    def webhooks_pending(self) -> list[str]:
        return [r.record for r in self._rows.values() if r.webhooks_pending]

    def find_idempotent(self, key: str) -> str | None:
        job_id = self._idempotency.get(key)
        return job_id if job_id in self._rows else None

    def query(self, flt: JobFilter, limit: int, cursor: str | None) -> Page:
        rows = newest_first(list(self._rows.values()))
        if cursor is not None:
            after = decode_cursor(cursor)
            rows = [r for r in rows if (r.created_at_ms, r.id) < after]
        rows = [
            r for r in rows
            if (flt.status is None or r.status == flt.status)
            and (flt.type is None or r.type == flt.type)
            and (flt.model is None or r.model == flt.model)
            and (flt.owner is None or r.owner == flt.owner)
        ]
        page = rows[:limit]
        more = len(rows) > limit and page
        return Page([json.loads(r.summary) for r in page],
                    encode_cursor(page[-1].created_at_ms, page[-1].id) if more else None)

    def totals(self) -> dict[str, Totals]:
        out: dict[str, Totals] = {}
        for row in self._rows.values():
            t = out.setdefault(row.owner or "", Totals(dict.fromkeys(UNFINISHED + FINISHED, 0)))
            t.counts[row.status] += 1
            if row.status == "completed" and row.time_taken_ms is not None:
                out[row.owner or ""] = Totals(t.counts, t.completed + 1,
                                              t.completed_ms + row.time_taken_ms)
        return out

    def missing(self, job_ids: Sequence[str]) -> list[str]:
        return [i for i in job_ids if i not in self._rows]

    def prune(self, finished_before_ms: int, keep_last: int) -> list[str]:
        finished = newest_first([r for r in self._rows.values()
                                 if r.finished and not r.webhooks_pending])
        doomed = [r for i, r in enumerate(finished)
                  if i >= keep_last or (r.completed_at_ms or 0) < finished_before_ms]
        for row in doomed:
            del self._rows[row.id]
            if row.idempotency_key and self._idempotency.get(row.idempotency_key) == row.id:
                del self._idempotency[row.idempotency_key]
        return [row.id for row in doomed]

    def close(self) -> None:
        self._rows.clear()
