"""Figure 5, the tracker at scale: 100k job records — the tracker's memory, and GET
/jobs/:id and GET /jobs latency, at 100k records against 1k.

The records go into the SQLite store the running service's tracker reads (the `service`
shape's `data_dir`), written from this process through the store's own `save_many()` (one
transaction per 5,000, so filling takes seconds, not minutes): finished jobs spread over
time, 90% completed (with a small PNG data URI as their image), 5% failed, 5% cancelled.

Measured three times, at each size:
- through the real Serve app (HAProxy -> ingress -> SQLite: the ingress reads the store
  itself, `serve_app.api.direct_reads`; GET /jobs likewise): one client (`http.client`,
  keep-alive), one request at a time, random job ids (nearly all miss the caches);
- in this process, without Ray: the same routes (`serve_app.api.app`) over the same
  `DirectReads` on the same file, the ASGI app called directly (no socket, no client
  library); the difference is the cost of HAProxy and Serve's hop to the ingress;
- in this process, every read through a `JobTracker` on the same file (as before reads
  left the tracker).
Memory is the tracker actor's RSS (psutil) and the database's size on disk.
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from bench.cluster import ray_processes, rss_mib
from bench.common import log, ratio, rnd, summary_ms
from bench.context import Context
from bench.loadgen import Client

NAME = "scale"
TARGET_MS = 3.0  # issue 15: without the tracker on the path
CHUNK = 5_000
SPACING_MS = 37  # between fake creation times: 100k records span about an hour


def tiny_png_uri() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (40, 90, 160)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Filler:
    """Adds finished job records to a SQLite job store, oldest further back in time."""

    def __init__(self, db_path: Path) -> None:
        from serve_app.stores.sqlite import SQLiteStore

        self.store = SQLiteStore(db_path)
        self.path = db_path
        self.ids: list[str] = []
        self.cursors: list[str] = []
        self.newest_ms = time.time_ns() // 1_000_000 - 60_000
        self.image = tiny_png_uri()

    def count(self) -> int:
        return sum(sum(t.counts.values()) for t in self.store.totals().values())

    def fill_to(self, total: int) -> dict[str, Any]:
        from serve_app.jobs.codec import to_row
        from serve_app.jobs.job import Job, JobResult, JobStatus, new_job_id
        from serve_app.messages import JobType
        from serve_app.stores.contract import encode_cursor

        start = self.count()
        t0 = time.perf_counter()
        added = 0
        while start + added < total:
            chunk = min(CHUNK, total - start - added)
            rows = []
            for _ in range(chunk):
                k = len(self.ids)
                created = self.newest_ms - k * SPACING_MS
                status = (JobStatus.FAILED if k % 20 == 0 else
                          JobStatus.CANCELLED if k % 20 == 1 else JobStatus.COMPLETED)
                request = {"prompt": f"benchmark record {k}", "model": "tiny-sd",
                           "width": 64, "height": 64, "steps": 1, "guidanceScale": 7.5,
                           "sampler": "euler_a", "seed": k, "numImages": 1}
                job = Job(id=new_job_id(created), type=JobType.TEXT2IMG, model="tiny-sd",
                          request=request, created_at_ms=created, status=status,
                          progress=100 if status is JobStatus.COMPLETED else 0, phase=None,
                          started_at_ms=created + 5, completed_at_ms=created + 60,
                          attempts=1, replica="model-tiny-sd#bench")
                if status is JobStatus.COMPLETED:
                    job.result = JobResult(images=[self.image], seeds=[k],
                                           parameters=dict(request), time_taken_ms=55,
                                           content_type="image/png")
                elif status is JobStatus.FAILED:
                    job.error = "Generation failed: benchmark record"
                rows.append(to_row(job))
                self.ids.append(job.id)
                if k % 1000 == 500:
                    self.cursors.append(encode_cursor(job.created_at_ms, job.id))
            self.store.save_many(rows)
            added += chunk
        elapsed = time.perf_counter() - t0
        return {"records": start + added, "added": added, "fill_s": rnd(elapsed, 2),
                "fill_per_s": round(added / elapsed) if added and elapsed else None,
                "db_mib": self.size_mib()}

    def size_mib(self) -> float:
        files = [self.path, self.path.with_name(self.path.name + "-wal")]
        return round(sum(f.stat().st_size for f in files if f.exists()) / 1024**2, 1)


def requests_plan(filler: Filler, n_get: int, n_list: int) -> dict[str, list[str]]:
    rng = random.Random(7)
    ids = rng.sample(filler.ids, min(n_get, len(filler.ids)))
    cursors = [rng.choice(filler.cursors) for _ in range(n_list)] if filler.cursors else []
    return {
        "GET /jobs/:id": [f"/jobs/{i}" for i in ids],
        "GET /jobs": ["/jobs"] * n_list,
        "GET /jobs?status=failed": ["/jobs?status=failed"] * n_list,
        "GET /jobs?cursor=<deep>": [f"/jobs?cursor={c}" for c in cursors],
    }


def measure_serve(url: str, plan: dict[str, list[str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with Client(url) as client:
        for name, paths in plan.items():
            for path in paths[:10]:  # warm connections and caches of the route
                client.get(path)
            times = []
            for path in paths:
                t0 = time.perf_counter()
                status, data = client.get(path)
                times.append(time.perf_counter() - t0)
                if status != 200:
                    raise RuntimeError(f"{path} -> {status}: {str(data)[:200]}")
            out[name] = summary_ms(times)
    return out


class NoReplicas:
    """Replicas for a tracker that only answers reads."""

    async def run(self, model_id: str, tasks: list[Any]) -> AsyncGenerator[Any, None]:
        raise RuntimeError("the scale benchmark runs no jobs")
        yield  # pragma: no cover

    async def replica_states(self) -> dict[str, dict[str, int]]:
        return {}


async def _measure_in_process(ctx: Context, db_path: Path, plan: dict[str, list[str]],
                              direct: bool) -> dict[str, Any]:
    """The routes called directly (no Serve): `direct`, reading the store as an ingress
    does (`DirectReads`), else every read through the tracker itself."""
    from serve_app.api.app import ApiContext, create_api
    from serve_app.api.backend import JobsBackend
    from serve_app.api.direct_reads import DirectReads
    from serve_app.jobs.persistence import StoreIO
    from serve_app.jobs.reads import StoreReads
    from serve_app.jobs.service import JobTracker
    from serve_app.registry import parse_registry
    from serve_app.settings import load_settings
    from serve_app.shards import ShardMap
    from serve_app.stores.sqlite import SQLiteStore

    args = ctx.cluster.app_args("service")
    settings = load_settings(args["settings"])
    registry = parse_registry(args["models"])
    served = frozenset(m.id for m in registry.models)
    store = StoreIO(SQLiteStore(db_path))
    tracker = JobTracker(settings=settings, registry=registry, store=store,
                         replicas=NoReplicas(), served=served)
    backend: JobsBackend = tracker
    reader = StoreIO(SQLiteStore(db_path))
    if direct:
        backend = DirectReads([tracker], ShardMap((served,)), StoreReads(reader), settings)
    api = create_api(ApiContext(backend, settings, registry, served))
    out: dict[str, Any] = {}
    for name, paths in plan.items():
        for path in paths[:10]:
            await asgi_get(api, path)
        times = []
        for path in paths:
            t0 = time.perf_counter()
            status, body = await asgi_get(api, path)
            times.append(time.perf_counter() - t0)
            if status != 200:
                raise RuntimeError(f"{path} -> {status}: {body[:200]!r}")
        out[name] = summary_ms(times)
    store.close()
    reader.close()
    return out


async def asgi_get(app: Any, path_and_query: str) -> tuple[int, bytes]:
    """One GET through an ASGI app, called directly."""
    path, _, query = path_and_query.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": query.encode(), "root_path": "", "headers": [],
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1)}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


def measure(ctx: Context, url: str, filler: Filler) -> dict[str, Any]:
    n_get, n_list = (100, 20) if ctx.quick else (500, 100)
    plan = requests_plan(filler, n_get, n_list)
    serve = measure_serve(url, plan)
    local = asyncio.run(_measure_in_process(ctx, filler.path, plan, direct=True))
    via_tracker = asyncio.run(_measure_in_process(ctx, filler.path, plan, direct=False))
    return {"serve": serve, "in_process": local, "in_process_via_tracker": via_tracker,
            "tracker_rss_mib": rss_mib(ray_processes().get("tracker"))}


def run(ctx: Context) -> dict[str, Any]:
    small, large = (1_000, 10_000) if ctx.quick else (1_000, 100_000)
    url = ctx.deploy("service")
    filler = Filler(ctx.cluster.data_dir("service") / "jobs.sqlite3")
    rss_before = rss_mib(ray_processes().get("tracker"))
    results: dict[str, Any] = {}
    for size in (small, large):
        log(f"scale: filling the store to {size:,} records")
        fill = filler.fill_to(size)
        log(f"scale: measuring at {fill['records']:,} records ({fill['fill_s']}s to fill)")
        results[str(size)] = fill | measure(ctx, url, filler)
    filler.store.close()
    at_small, at_large = results[str(small)], results[str(large)]
    get_large = at_large["serve"]["GET /jobs/:id"]["p50_ms"]
    get_small = at_small["serve"]["GET /jobs/:id"]["p50_ms"]
    rss_small, rss_large = at_small["tracker_rss_mib"], at_large["tracker_rss_mib"]
    return {
        "figure": f"GET /jobs/:id p50 at {large:,} records ÷ at {small:,} (through Serve)",
        "ratio": ratio(get_large, get_small),
        "target": f"GET /jobs/:id p50 <= {TARGET_MS:g} ms at {large:,} records (through Serve)",
        "met": get_large is not None and get_large <= TARGET_MS,
        "headline": {
            "records": at_large["records"],
            "get_p50_ms": get_large,
            "get_p99_ms": at_large["serve"]["GET /jobs/:id"]["p99_ms"],
            "get_p50_in_process_ms": at_large["in_process"]["GET /jobs/:id"]["p50_ms"],
            "get_p50_in_process_via_tracker_ms":
                at_large["in_process_via_tracker"]["GET /jobs/:id"]["p50_ms"],
            "list_p50_ms": at_large["serve"]["GET /jobs"]["p50_ms"],
            "list_p99_ms": at_large["serve"]["GET /jobs"]["p99_ms"],
            "tracker_rss_mib": rss_large,
            "tracker_rss_delta_mib": rnd(rss_large - rss_small)
            if rss_large and rss_small else None,
            "db_mib": at_large["db_mib"],
        },
        "tracker_rss_mib": {"before_fill": rss_before, str(small): rss_small,
                            str(large): rss_large},
        "by_size": results,
    }
