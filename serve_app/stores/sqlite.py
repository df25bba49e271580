"""A JobStore in one SQLite file: durable on a single node, no server to run.

The full record is the codec's JSON text; the columns beside it exist only to be indexed,
so every method is one or two statements over an index, fast at hundreds of thousands of
rows. Listing is keyset-paginated on (created_at, id), newest first.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from serve_app.stores.contract import (
    FINISHED,
    UNFINISHED,
    JobFilter,
    JobRow,
    Page,
    Totals,
    decode_cursor,
    encode_cursor,
)

SCHEMA_VERSION = 4

_FINISHED = "(" + ", ".join(f"'{s}'" for s in FINISHED) + ")"
_UNFINISHED = "(" + ", ".join(f"'{s}'" for s in UNFINISHED) + ")"

# jobs_status_time covers counts() and processing_time(). The partial indexes serve
# prune(); their condition is repeated verbatim in its statements (SQLite uses a partial
# index only for a query whose WHERE clause contains the index's own condition).
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    type TEXT NOT NULL,
    model TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    completed_at INTEGER,
    time_taken INTEGER,
    idempotency_key TEXT UNIQUE,
    record TEXT NOT NULL,
    summary TEXT NOT NULL,
    owner TEXT
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at, id);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, created_at, id);
CREATE INDEX IF NOT EXISTS jobs_type ON jobs (type, created_at, id);
CREATE INDEX IF NOT EXISTS jobs_model ON jobs (model, created_at, id);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, created_at, id);
CREATE INDEX IF NOT EXISTS jobs_status_time ON jobs (status, time_taken);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (created_at, id)
    WHERE status IN {_FINISHED};
CREATE INDEX IF NOT EXISTS jobs_finished_at ON jobs (completed_at)
    WHERE status IN {_FINISHED};
CREATE TABLE IF NOT EXISTS webhooks_pending (id TEXT PRIMARY KEY);
"""

# Insert or replace by id. A job may name an Idempotency-Key another job already holds
# (the first holder keeps it, as in MemoryStore); it is then left out of the unique column
# instead of failing the write. The record still carries it.
_UPSERT = """
INSERT INTO jobs (id, status, type, model, owner, created_at, completed_at, time_taken,
                  idempotency_key, record, summary)
VALUES (:id, :status, :type, :model, :owner, :created_at, :completed_at, :time_taken,
        CASE WHEN EXISTS (SELECT 1 FROM jobs WHERE idempotency_key = :key AND id != :id)
             THEN NULL ELSE :key END,
        :record, :summary)
ON CONFLICT (id) DO UPDATE SET
    status = excluded.status, type = excluded.type, model = excluded.model,
    owner = excluded.owner, created_at = excluded.created_at,
    completed_at = excluded.completed_at, time_taken = excluded.time_taken,
    idempotency_key = excluded.idempotency_key, record = excluded.record,
    summary = excluded.summary
"""

# prune()'s two deletes. Without statistics the planner prefers jobs_status for
# `status IN (...)` and then reads every finished row, so each names its partial index.
# Every terminal transition stamps completed_at, so a finished job's is never NULL.
# Jobs with webhook deliveries pending are kept (and not counted in keep_last).
_PRUNE_OLD = f"""
DELETE FROM jobs INDEXED BY jobs_finished_at
WHERE status IN {_FINISHED} AND completed_at < ?
  AND id NOT IN (SELECT id FROM webhooks_pending)
RETURNING id
"""
_PRUNE_BEYOND = f"""
DELETE FROM jobs WHERE id IN (
    SELECT id FROM jobs INDEXED BY jobs_finished WHERE status IN {_FINISHED}
      AND id NOT IN (SELECT id FROM webhooks_pending)
    ORDER BY created_at DESC, id DESC LIMIT -1 OFFSET ?)
RETURNING id
"""


class SchemaTooNew(RuntimeError):
    """The file was written by a newer version of this service."""


class SQLiteStore:
    """A JobStore on stdlib sqlite3 (WAL mode). One connection, guarded by a lock, so the
    tracker may call it from any thread; records survive restarts of the process."""

    def __init__(self, path: str | Path, busy_timeout_ms: int = 5000,
                 fsync_durable: bool = True) -> None:
        """`fsync_durable`: a `durable` save is fsynced before it returns (synchronous=FULL
        for that transaction; every other write stays NORMAL: WAL-safe against a crash of
        the process, fsynced at checkpoints)."""
        self._fsync_durable = fsync_durable
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Autocommit: a lone statement is its own transaction; prune() opens one for its two.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"job database schema version {version} is newer than this service's "
                f"{SCHEMA_VERSION}; upgrade the service or point it at another file"
            )
        if version == 1:
            self._add_summaries()
        if 0 < version < 3:
            self._db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
        if version < SCHEMA_VERSION:
            self._db.executescript(
                f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
            )

    def _add_summaries(self) -> None:
        """Version 1 had no summary column: add it and fill it from the records."""
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute("ALTER TABLE jobs ADD COLUMN summary TEXT NOT NULL DEFAULT ''")
        rows = self._db.execute("SELECT record FROM jobs").fetchall()
        self._db.executemany(
            "UPDATE jobs SET summary = ? WHERE id = ?",
            ((json.dumps(_summary_of(record)), record["id"])
             for record in (json.loads(r[0]) for r in rows)),
        )
        self._db.execute("COMMIT")

    def save_many(self, rows: Sequence[JobRow], *, durable: bool = False) -> None:
        params = [
            {
                "id": r.id, "status": r.status, "type": r.type, "model": r.model,
                "owner": r.owner, "created_at": r.created_at_ms,
                "completed_at": r.completed_at_ms, "time_taken": r.time_taken_ms,
                "key": r.idempotency_key, "record": r.record, "summary": r.summary,
            }
            for r in rows
        ]
        pending = [(r.id,) for r in rows if r.webhooks_pending]
        settled = [(r.id,) for r in rows if not r.webhooks_pending]
        fsync = durable and self._fsync_durable
        with self._lock:
            if fsync:  # the WAL is synced at this transaction's commit
                self._db.execute("PRAGMA synchronous=FULL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany(_UPSERT, params)
                    self._db.executemany(
                        "INSERT OR IGNORE INTO webhooks_pending (id) VALUES (?)", pending)
                    self._db.executemany("DELETE FROM webhooks_pending WHERE id = ?", settled)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if fsync:
                    self._db.execute("PRAGMA synchronous=NORMAL")

    def load(self, job_id: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row else None

    def unfinished(self) -> list[str]:
        sql = f"SELECT record FROM jobs WHERE status IN {_UNFINISHED} ORDER BY created_at, id"
        with self._lock:
            rows = self._db.execute(sql).fetchall()
        return [r[0] for r in rows]

    def webhooks_pending(self) -> list[str]:
        sql = "SELECT record FROM jobs JOIN webhooks_pending USING (id)"
        with self._lock:
            rows = self._db.execute(sql).fetchall()
        return [r[0] for r in rows]

    def find_idempotent(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id FROM jobs WHERE idempotency_key = ?", (key,)
            ).fetchone()
        return row[0] if row else None

    def query(self, flt: JobFilter, limit: int, cursor: str | None) -> Page:
        where: list[str] = []
        args: list[object] = []
        if cursor is not None:
            where.append("(created_at, id) < (?, ?)")
            args.extend(decode_cursor(cursor))
        for column, value in (
            ("status", flt.status), ("type", flt.type), ("model", flt.model),
            ("owner", flt.owner),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = "SELECT summary, created_at, id FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        args.append(max(limit, 0) + 1)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        page = rows[:limit]
        more = len(rows) > limit
        cursor_out = encode_cursor(page[-1][1], page[-1][2]) if more and page else None
        return Page([json.loads(r[0]) for r in page], cursor_out)

    def totals(self) -> dict[str, Totals]:
        sql = ("SELECT COALESCE(owner, ''), status, COUNT(*), COUNT(time_taken), "
               "COALESCE(SUM(time_taken), 0) FROM jobs GROUP BY owner, status")
        with self._lock:
            rows = self._db.execute(sql).fetchall()
        out: dict[str, Totals] = {}
        for owner, status, count, timed, total_ms in rows:
            t = out.get(owner) or Totals(dict.fromkeys(UNFINISHED + FINISHED, 0))
            t.counts[status] = count
            done = status == "completed"
            out[owner] = Totals(t.counts, t.completed + (timed if done else 0),
                                t.completed_ms + (total_ms if done else 0))
        return out

    def missing(self, job_ids: Sequence[str]) -> list[str]:
        found: set[str] = set()
        with self._lock:
            for i in range(0, len(job_ids), 500):  # SQLite's bound on host parameters
                chunk = list(job_ids[i:i + 500])
                marks = ",".join("?" * len(chunk))
                found.update(row[0] for row in self._db.execute(
                    f"SELECT id FROM jobs WHERE id IN ({marks})", chunk))
        return [i for i in job_ids if i not in found]

    def prune(self, finished_before_ms: int, keep_last: int) -> list[str]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                old = self._db.execute(_PRUNE_OLD, (finished_before_ms,)).fetchall()
                beyond = self._db.execute(_PRUNE_BEYOND, (keep_last,)).fetchall()
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return [row[0] for row in old + beyond]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _summary_of(record: dict[str, Any]) -> dict[str, Any]:
    """A version-1 record's listing summary, as `Job.summary` renders it (schema version 1
    had no summary column; its records are the codec's, fields in snake_case)."""
    out = {k: record[k] for k in ("id", "type", "status", "model", "priority", "progress")}
    out["createdAt"] = _iso(record["created_at_ms"])
    if record.get("completed_at_ms") is not None:
        out["completedAt"] = _iso(record["completed_at_ms"])
    if record.get("error") is not None:
        out["error"] = record["error"]
    return out


def _iso(ms: int) -> str:
    stamp = datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
    return f"{stamp}{ms % 1000:03d}Z"
