"""A JobStore in Redis: shared by every node of a cluster.
(Over ~300 lines: the whole `JobStore` contract over one key layout, kept in one place.)

Keys, all under one namespace `ns`:
    {ns}:job:{id}             the record (the JSON codec's text)
    {ns}:meta:{id}            the few fields the indexes are built from (small JSON), so a
                              save need not read back a record that may carry images
    {ns}:idx:all              listing indexes: sorted sets whose members are
    {ns}:idx:status:{s}       "{created_at:013d}:{id}", all scored 0, so Redis orders them
    {ns}:idx:type:{t}         by (created_at, id) and ZREVRANGEBYLEX pages through them
    {ns}:idx:model:{m}        newest first with an exact keyset bound
    {ns}:idx:owner:{o}
    {ns}:idx:unfinished       the same, for queued and processing jobs
    {ns}:idx:finished         the same, for finished jobs (prune's keep_last)
    {ns}:idx:finished_at      finished job ids scored by completed_at (prune's cutoff)
    {ns}:idempotency          hash: Idempotency-Key -> job id (the first holder keeps it)
    {ns}:webhooks             set: ids of jobs with webhook deliveries still to make
    {ns}:totals               hash: "{owner}|{status}" -> jobs, "{owner}|#done" and
                              "{owner}|#done_ms" -> the completed jobs' count and time

A save reads the jobs' old meta under WATCH and rewrites records, metas, indexes and stats
in one MULTI/EXEC, so indexes and counters move exactly once per change of state. Every
command gives up after `timeout_s` (socket and connect timeouts): an unreachable Redis
fails a call quickly instead of hanging the tracker's store thread.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from typing import Any

import redis
from redis.client import Pipeline

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

_MS_DIGITS = 13  # zero-padded creation time in index members: good until the year 2286
_SCAN_CHUNK = 200  # members read per round when a filter is checked against other indexes
# Index members one listing may read: past this, the page ends (maybe short, maybe empty)
# with a cursor to go on from, so filters that match little cost a bounded time a request.
SCAN_BUDGET = 2000
_PRUNE_CHUNK = 500


def _member(created_at_ms: int, job_id: str) -> str:
    return f"{created_at_ms:0{_MS_DIGITS}d}:{job_id}"


def _text(value: object) -> str:
    """A reply as text: the client decodes replies, but its types cannot say so."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _member_parts(member: str) -> tuple[int, str]:
    return int(member[:_MS_DIGITS]), member[_MS_DIGITS + 1 :]


@dataclass(frozen=True)
class _Meta:
    """What a job is indexed by. `time_taken` is set only for completed jobs: those are the
    ones processing_time counts."""

    status: str
    type: str
    model: str
    owner: str | None
    created_at: int
    completed_at: int | None
    time_taken: int | None
    idempotency_key: str | None

    @classmethod
    def of(cls, row: JobRow) -> _Meta:
        done = row.status == "completed"
        return cls(row.status, row.type, row.model, row.owner, row.created_at_ms,
                   row.completed_at_ms, row.time_taken_ms if done else None,
                   row.idempotency_key)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def dump(self) -> str:
        return json.dumps(astuple(self), separators=(",", ":"))

    @classmethod
    def parse(cls, text: str) -> _Meta:
        values = json.loads(text)
        if len(values) == 7:  # written before owners existed
            values.insert(3, None)
        return cls(*values)


class RedisStore:
    """A JobStore on redis-py's synchronous client. Safe to share between threads (the
    client pools its connections); several processes may write through it at once."""

    def __init__(self, url: str, namespace: str = "imagegen", timeout_s: float = 2.0) -> None:
        self._r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout_s,
                                       socket_connect_timeout=timeout_s)
        self._ns = namespace

    # -- keys --------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return ":".join((self._ns, *parts))

    def _indexes(self, meta: _Meta) -> list[str]:
        """The listing indexes (and unfinished/finished) that hold this job's member."""
        keys = [
            self._key("idx", "all"),
            self._key("idx", "status", meta.status),
            self._key("idx", "type", meta.type),
            self._key("idx", "model", meta.model),
            self._key("idx", "finished" if meta.finished else "unfinished"),
        ]
        if meta.owner is not None:
            keys.append(self._key("idx", "owner", meta.owner))
        return keys

    # -- writes ------------------------------------------------------------------------

    def _index(self, pipe: Pipeline, job_id: str, meta: _Meta, sign: int) -> None:
        """Queue the commands that add (sign=1) or remove (sign=-1) a job's index entries."""
        member = _member(meta.created_at, job_id)
        for key in self._indexes(meta):
            if sign > 0:
                pipe.zadd(key, {member: 0})
            else:
                pipe.zrem(key, member)
        if meta.finished:
            finished_at = self._key("idx", "finished_at")
            if sign > 0:
                pipe.zadd(finished_at, {job_id: meta.completed_at or 0})
            else:
                pipe.zrem(finished_at, job_id)
        totals, owner = self._key("totals"), meta.owner or ""
        pipe.hincrby(totals, f"{owner}|{meta.status}", sign)
        if meta.time_taken is not None:
            pipe.hincrby(totals, f"{owner}|#done", sign)
            pipe.hincrby(totals, f"{owner}|#done_ms", sign * meta.time_taken)

    def save_many(self, rows: Sequence[JobRow], *, durable: bool = False) -> None:
        # `durable` is the server's: with `appendfsync always` (the deploy files) every
        # EXEC is fsynced before Redis answers it.
        latest = {row.id: row for row in rows}  # a job saved twice: its last row wins
        meta_keys = [self._key("meta", job_id) for job_id in latest]

        def write(pipe: Pipeline) -> None:
            # Runs again if another writer changes one of these jobs' meta before EXEC.
            olds = [_Meta.parse(_text(m)) if m else None for m in pipe.mget(meta_keys)]
            released = {old.idempotency_key for old, row in zip(olds, latest.values(),
                                                                strict=True)
                        if old is not None and old.idempotency_key
                        and old.idempotency_key != row.idempotency_key}
            holders = dict(zip(released, pipe.hmget(self._key("idempotency"), list(released)),
                               strict=True)) if released else {}
            pipe.multi()
            for row, old, meta_key in zip(latest.values(), olds, meta_keys, strict=True):
                new = _Meta.of(row)
                pipe.set(self._key("job", row.id), row.record)
                pipe.set(self._key("sum", row.id), row.summary)
                if old != new:
                    if old is not None:
                        self._index(pipe, row.id, old, -1)
                    self._index(pipe, row.id, new, 1)
                    pipe.set(meta_key, new.dump())
                if (old is not None and old.idempotency_key in holders
                        and _text(holders[old.idempotency_key] or b"") == row.id):
                    # Saved without its key (a submit that was not accepted): the key is free.
                    pipe.hdel(self._key("idempotency"), old.idempotency_key)
                if row.idempotency_key:
                    pipe.hsetnx(self._key("idempotency"), row.idempotency_key, row.id)
                if row.webhooks_pending:
                    pipe.sadd(self._key("webhooks"), row.id)
                else:
                    pipe.srem(self._key("webhooks"), row.id)

        if meta_keys:
            self._r.transaction(write, self._key("idempotency"), *meta_keys)

    def missing(self, job_ids: Sequence[str]) -> list[str]:
        pipe = self._r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.exists(self._key("job", job_id))
        return [i for i, found in zip(job_ids, pipe.execute(), strict=True) if not found]

    def prune(self, finished_before_ms: int, keep_last: int) -> list[str]:
        beyond = self._r.zrevrangebylex(
            self._key("idx", "finished"), "+", "-", start=max(keep_last, 0), num=-1
        )
        too_old = self._r.zrangebyscore(
            self._key("idx", "finished_at"), "-inf", f"({finished_before_ms}"
        )
        doomed = sorted({_member_parts(_text(m))[1] for m in beyond} | {_text(i) for i in too_old})
        deleted: list[str] = []
        for i in range(0, len(doomed), _PRUNE_CHUNK):
            deleted += self._delete_finished(doomed[i : i + _PRUNE_CHUNK])
        return deleted

    def _delete_finished(self, ids: Sequence[str]) -> list[str]:
        """Those of `ids` that are finished and have no webhook deliveries pending,
        deleted; the ids deleted."""
        meta_keys = [self._key("meta", i) for i in ids]
        deleted: list[str] = []

        def delete(pipe: Pipeline) -> None:
            # Runs again if one of these jobs is saved meanwhile.
            deleted.clear()
            metas = [_Meta.parse(_text(m)) if m else None for m in pipe.mget(meta_keys)]
            owners = self._idempotency_owners(pipe, metas)
            hooked = pipe.smismember(self._key("webhooks"), list(ids))
            pipe.multi()
            for job_id, meta, owner, pending in zip(ids, metas, owners, hooked, strict=True):
                if meta is None or not meta.finished or pending:
                    continue
                self._index(pipe, job_id, meta, -1)
                pipe.delete(self._key("job", job_id), self._key("meta", job_id),
                            self._key("sum", job_id))
                pipe.srem(self._key("webhooks"), job_id)
                if meta.idempotency_key and owner == job_id:
                    pipe.hdel(self._key("idempotency"), meta.idempotency_key)
                deleted.append(job_id)

        self._r.transaction(delete, self._key("webhooks"), *meta_keys)
        return list(deleted)

    def _idempotency_owners(self, pipe: Pipeline, metas: list[_Meta | None]) -> list[str | None]:
        """Which job holds each job's Idempotency-Key (it may be another, earlier job)."""
        keys = [m.idempotency_key if m else None for m in metas]
        wanted = [k for k in keys if k]
        if not wanted:
            return [None] * len(keys)
        holders = pipe.hmget(self._key("idempotency"), wanted)
        found = {k: _text(h) if h else None for k, h in zip(wanted, holders, strict=True)}
        return [found[k] if k else None for k in keys]

    # -- reads -------------------------------------------------------------------------

    def load(self, job_id: str) -> str | None:
        raw = self._r.get(self._key("job", job_id))
        return _text(raw) if raw is not None else None

    def unfinished(self) -> list[str]:
        members = self._r.zrangebylex(self._key("idx", "unfinished"), "-", "+")
        keys = [self._key("job", _member_parts(_text(m))[1]) for m in members]
        # A record pruned between the index read and this one is skipped.
        return [_text(raw) for raw in (self._r.mget(keys) if keys else []) if raw is not None]

    def webhooks_pending(self) -> list[str]:
        ids = sorted(_text(i) for i in self._r.smembers(self._key("webhooks")))
        keys = [self._key("job", job_id) for job_id in ids]
        # A record pruned between the two reads is skipped.
        return [_text(raw) for raw in (self._r.mget(keys) if keys else []) if raw is not None]

    def find_idempotent(self, key: str) -> str | None:
        raw = self._r.hget(self._key("idempotency"), key)
        if raw is None:
            return None
        job_id = _text(raw)
        return job_id if self._r.exists(self._key("job", job_id)) else None

    def query(self, flt: JobFilter, limit: int, cursor: str | None) -> Page:
        upper = "+"
        if cursor is not None:
            upper = "(" + _member(*decode_cursor(cursor))
        base, *others = self._filter_indexes(flt)
        want = max(limit, 0) + 1
        found, stopped = self._walk(base, others, upper, want)
        page = found[:limit]
        keys = [self._key("sum", _member_parts(m)[1]) for m in page]
        # A job pruned between the index read and this one is skipped.
        jobs = [json.loads(raw) for raw in (self._r.mget(keys) if keys else []) if raw]
        if len(found) > limit and page:
            # The cursor comes from the index member, the same text encode_cursor makes,
            # so it holds even if the last record vanished since.
            return Page(jobs, encode_cursor(*_member_parts(page[-1])))
        if stopped is not None:  # the scan budget ran out: go on below what was read
            return Page(jobs, encode_cursor(*_member_parts(stopped)))
        return Page(jobs, None)

    def _filter_indexes(self, flt: JobFilter) -> list[str]:
        """The indexes a filter reads, smallest first (the one to walk)."""
        keys = []
        for name, value in (("status", flt.status), ("type", flt.type), ("model", flt.model),
                            ("owner", flt.owner)):
            if value is not None:
                keys.append(self._key("idx", name, value))
        if not keys:
            return [self._key("idx", "all")]
        if len(keys) == 1:
            return keys
        with self._r.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.zcard(key)
            sizes = pipe.execute()
        return [k for _, k in sorted(zip(sizes, keys, strict=True))]

    def _walk(self, base: str, others: list[str], upper: str, want: int
              ) -> tuple[list[str], str | None]:
        """Up to `want` members of `base` below `upper`, newest first, that every index in
        `others` also holds; and, when `SCAN_BUDGET` members were read before that many were
        found (filters that match little or nothing), the last member read, where the next
        page starts. A request's work is bounded whatever its filters."""
        chunk = want if not others else max(want, _SCAN_CHUNK)
        found: list[str] = []
        read = 0
        while len(found) < want:
            if read >= SCAN_BUDGET:
                return found[:want], upper[1:]
            batch = [_text(m) for m in self._r.zrevrangebylex(base, upper, "-", 0, chunk)]
            read += len(batch)
            kept = batch
            if others and batch:
                with self._r.pipeline(transaction=False) as pipe:
                    for key in others:
                        pipe.zmscore(key, batch)
                    scores: list[list[Any]] = pipe.execute()
                kept = [m for i, m in enumerate(batch) if all(s[i] is not None for s in scores)]
            found.extend(kept)
            if len(batch) < chunk:
                break
            upper = "(" + batch[-1]
        return found[:want], None

    def totals(self) -> dict[str, Totals]:
        raw = self._r.hgetall(self._key("totals"))
        if not raw and self._r.exists(self._key("idx", "all")):
            raw = self._rebuild_totals()
        out: dict[str, Totals] = {}
        for field, value in raw.items():
            owner, _, what = _text(field).rpartition("|")
            t = out.get(owner) or Totals(dict.fromkeys(UNFINISHED + FINISHED, 0))
            n = int(value)
            if what == "#done":
                t = Totals(t.counts, n, t.completed_ms)
            elif what == "#done_ms":
                t = Totals(t.counts, t.completed, n)
            else:
                t.counts[what] = n
            out[owner] = t
        return out

    def _rebuild_totals(self) -> dict[str, int]:
        """Totals from every job's meta: for a namespace written before totals were kept."""
        counts: dict[str, int] = {}
        for key in self._r.scan_iter(match=self._key("meta", "*"), count=500):
            raw = self._r.get(key)
            if not raw:
                continue
            meta = _Meta.parse(_text(raw))
            owner = meta.owner or ""
            for field, n in ((f"{owner}|{meta.status}", 1),
                             (f"{owner}|#done", int(meta.time_taken is not None)),
                             (f"{owner}|#done_ms", meta.time_taken or 0)):
                counts[field] = counts.get(field, 0) + n
        if counts:
            self._r.hset(self._key("totals"), mapping=counts)
        return counts

    def close(self) -> None:
        self._r.close()
