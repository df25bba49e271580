"""The submit figure's baseline: a bare Starlette app in one process.

It does what the service's submit path must do at the least — parse the JSON body, run
the same validation (`serve_app.api.submission.build_submission`), make the same job record
(`serve_app.jobs.job.Job`, rendered with `to_wire`) — and keeps the record in a dict. No Ray,
no actor hops, no store. Served by uvicorn (its defaults: uvloop and httptools when
installed, as Serve's proxy) in a subprocess on 127.0.0.1:

    .venv/bin/python -m bench.baseline_app --port 8123 --config args.json

`args.json` holds the same `{"models": {...}, "settings": {...}}` the service is built with.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serve_app.api.submission import build_submission
from serve_app.errors import ServiceError
from serve_app.jobs.job import Job, new_job_id
from serve_app.messages import JobType
from serve_app.registry import parse_registry
from serve_app.settings import load_settings


def create_baseline(args: dict[str, Any]) -> Starlette:
    settings = load_settings(args.get("settings"))
    registry = parse_registry(args["models"], "baseline models")
    served = frozenset(m.id for m in registry.served(settings))
    records: dict[str, dict[str, Any]] = {}

    def submit_route(job_type: JobType) -> Any:
        async def submit(request: Request) -> Response:
            try:
                body = json.loads(await request.body())
                sub = build_submission(job_type, body, settings=settings, registry=registry,
                                       served=served,
                                       idempotency_key=request.headers.get("idempotency-key"))
            except ServiceError as exc:
                return JSONResponse({"error": exc.message}, status_code=400)
            except ValueError as exc:
                return JSONResponse({"error": f"Request body is not valid JSON: {exc}"}, 400)
            now = time.time_ns() // 1_000_000
            job = Job(id=new_job_id(now), type=sub.type, model=sub.model, request=sub.request,
                      created_at_ms=now, priority=sub.priority,
                      idempotency_key=sub.idempotency_key)
            job.task = dataclasses.replace(sub.task, job_id=job.id)
            record = job.to_wire(len(records) + 1)
            records[job.id] = record
            return JSONResponse(record, status_code=202)

        return submit

    async def get_job(request: Request) -> Response:
        record = records.get(request.path_params["job_id"])
        if record is None:
            return JSONResponse({"error": "Job not found"}, status_code=404)
        return JSONResponse(record)

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok", "records": len(records)})

    routes = [Route(f"/generate/{t.value}", submit_route(t), methods=["POST"]) for t in JobType]
    routes += [Route("/jobs/{job_id}", get_job), Route("/healthz", healthz)]
    return Starlette(routes=routes)


class BaselineServer:
    """`with BaselineServer(args) as url:` runs the baseline in a subprocess."""

    def __init__(self, args: dict[str, Any], workdir: Path) -> None:
        from serve_app.cli import free_port

        self.port = free_port()
        self.config = workdir / "baseline-args.json"
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text(json.dumps(args))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> str:
        from bench.common import ROOT, wait_http

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.baseline_app", "--port", str(self.port),
             "--config", str(self.config)],
            cwd=ROOT,
        )
        try:
            wait_http(f"{self.url}/healthz", timeout_s=60)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.url

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--config", type=Path, required=True)
    opts = parser.parse_args(argv)
    app = create_baseline(json.loads(opts.config.read_text()))
    uvicorn.run(app, host="127.0.0.1", port=opts.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
