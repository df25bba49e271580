"""GET /metrics: the Prometheus text of the whole service, parsed with prometheus_client's
own parser; a job moves the counters and histograms it should."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from serve_app.settings import load_settings
from tests.support.fakes import FakeReplicas
from tests.support.metrics import samples, value
from tests.support.trackers import http_client, make_tracker

pytestmark = pytest.mark.anyio
ADMIN, USER = "admin-0123456789abcdef", "user-0123456789abcdef"


@pytest.fixture
async def client(registry, settings) -> AsyncIterator[httpx.AsyncClient]:
    settings = load_settings(settings.model_dump(exclude={"api_keys"}),
                             env={"API_KEYS": f"ops:{ADMIN}:admin,user:{USER}"})
    tracker = make_tracker(registry, settings, FakeReplicas(replicas={"tiny-sd": 1}))
    async with http_client(tracker, settings, registry,
                           headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        yield c
    await tracker.close()


async def test_a_job_moves_the_counters_and_histograms(client) -> None:
    await client.get("/models")  # the replica gauges come from the last refresh
    job = (await client.post("/generate/text2img", json={
        "prompt": "a", "steps": 3, "width": 64, "height": 64})).json()
    for _ in range(100):
        if (await client.get(f"/jobs/{job['id']}")).json()["status"] == "completed":
            break
        await asyncio.sleep(0.01)
    resp = await client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    m = samples(resp.text)
    for status in ("queued", "processing", "completed"):
        assert value(m, "imagegen_jobs_total", status=status, type="text2img",
                     model="tiny-sd") == 1
    assert value(m, "imagegen_job_queue_wait_seconds_count", model="tiny-sd") == 1
    assert value(m, "imagegen_job_run_seconds_count", model="tiny-sd") == 1
    assert value(m, "imagegen_batch_size_count", model="tiny-sd") == 1
    assert value(m, "imagegen_batch_size_sum", model="tiny-sd") == 1
    assert value(m, "imagegen_denoising_steps_total", model="tiny-sd") == 3
    assert value(m, "imagegen_cold_starts_total", model="tiny-sd") == 0  # a replica was up
    assert value(m, "imagegen_replicas", model="tiny-sd", state="ready") == 1
    assert value(m, "imagegen_queue_depth", model="tiny-sd", priority="normal") == 0
    assert value(m, "imagegen_http_requests_total", route="/generate/text2img",
                 method="POST", status="202") == 1
    assert value(m, "imagegen_http_request_duration_seconds_count",
                 route="/jobs/{job_id}", method="GET") >= 1
    assert value(m, "imagegen_http_requests_total", route="/models", method="GET",
                 status="200") == 1


async def test_metrics_are_for_admin_keys(client) -> None:
    resp = await client.get("/metrics", headers={"Authorization": f"Bearer {USER}"})
    assert resp.status_code == 403 and set(resp.json()) == {"error"}
    assert (await client.get("/metrics", headers={"Authorization": ""})).status_code == 401
    # Refusals are counted as well.
    m = samples((await client.get("/metrics")).text)
    assert value(m, "imagegen_http_requests_total", route="/metrics", method="GET",
                 status="403") == 1


async def test_one_json_log_line_per_transition_with_the_request_id(client, caplog) -> None:
    import json
    import logging

    caplog.set_level(logging.INFO, logger="imagegen.jobs")
    await client.get("/models")  # the tracker learns the model has a replica up
    resp = await client.post("/generate/text2img", headers={"X-Request-ID": "req-42"},
                             json={"prompt": "a", "steps": 3, "width": 64, "height": 64})
    assert resp.headers["x-request-id"] == "req-42"
    job = resp.json()
    for _ in range(100):
        if (await client.get(f"/jobs/{job['id']}")).json()["status"] == "completed":
            break
        await asyncio.sleep(0.01)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "imagegen.jobs"]
    mine = [line for line in lines if line["jobId"] == job["id"]]
    assert [(line["status"], line["phase"]) for line in mine] == [
        ("queued", "queued"), ("queued", "waiting_for_replica"),
        ("processing", "generating"), ("completed", None)]
    assert {line["requestId"] for line in mine} == {"req-42"}
    assert mine[-1]["runMs"] is not None and mine[-1]["queueWaitMs"] is not None
    assert mine[-1]["attempt"] == 1 and mine[0]["model"] == "tiny-sd"
    made = await client.get("/healthz")
    assert len(made.headers["x-request-id"]) == 32  # made here when the client sent none


def test_the_grafana_dashboard_loads_and_reads_only_metrics_we_export() -> None:
    import json
    import re

    from serve_app.jobs.metrics import ServiceMetrics
    from tests.support import ROOT

    dashboard = json.loads((ROOT / "config" / "grafana-dashboard.json").read_text())
    assert dashboard["templating"]["list"][0]["type"] == "datasource"
    exported = ServiceMetrics()
    exported.live(lambda: [], lambda: {})
    families = {family.name for family in exported.registry.collect()}
    assert {"imagegen_jobs", "imagegen_queue_depth", "imagegen_replicas"} <= families
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            for name in re.findall(r"imagegen_[a-z_]+", target["expr"]):
                family = re.sub(r"_(bucket|sum|count|total)$", "", name)
                assert family in families, (panel["title"], name)
