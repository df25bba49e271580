"""The store the settings name. No cycle: this module imports the implementations, the
contract imports none of them."""

from __future__ import annotations

from pathlib import Path

from serve_app.stores.contract import JobStore


def open_store(kind: str, *, data_dir: str, redis_url: str, timeout_s: float = 2.0,
               fsync: bool = True) -> JobStore:
    """`memory`, `redis` (at `redis_url`) or `sqlite` (`<data_dir>/jobs.sqlite3`). Each
    store call gives up after about `timeout_s` (a locked database, an unreachable Redis).
    `fsync`: SQLite syncs a durable save (a submit) before it returns; Redis's durability
    is the server's own setting (`appendfsync always`, as the deploy files run it)."""
    if kind == "memory":
        from serve_app.stores.memory import MemoryStore

        return MemoryStore()
    if kind == "redis":
        from serve_app.stores.redis import RedisStore

        return RedisStore(redis_url, timeout_s=timeout_s)
    from serve_app.stores.sqlite import SQLiteStore

    return SQLiteStore(Path(data_dir) / "jobs.sqlite3", busy_timeout_ms=int(timeout_s * 1000),
                       fsync_durable=fsync)
