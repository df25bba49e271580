"""The HTTP contract, over a tracker in the same process (no Ray, a fake replica)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from PIL import Image

from serve_app.registry import Registry
from serve_app.settings import Settings
from tests.support.fakes import FakeReplicas
from tests.support.images import BAD_INPUTS
from tests.support.trackers import http_client, make_tracker

pytestmark = pytest.mark.anyio


@pytest.fixture
def dispatcher() -> FakeReplicas:
    return FakeReplicas()


@pytest.fixture
async def client(registry: Registry, settings: Settings,
                 dispatcher: FakeReplicas) -> AsyncIterator[httpx.AsyncClient]:
    settings = settings.model_copy(update={"max_queue_size": 5})
    tracker = make_tracker(registry, settings, dispatcher)
    async with http_client(tracker, settings, registry) as c:
        yield c
    await tracker.close()


def png_uri(size: tuple[int, int] = (96, 80), color: str = "red") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def wait_done(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    for _ in range(200):
        job = (await client.get(f"/jobs/{job_id}")).json()
        if job["status"] in ("completed", "failed", "cancelled"):
            return job
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {job_id} did not finish")


async def test_text2img_is_accepted_with_the_seed_record(client) -> None:
    resp = await client.post("/generate/text2img", json={
        "prompt": "A serene lake", "steps": 30, "width": 512, "height": 512})
    assert resp.status_code == 202
    job = resp.json()
    assert job["id"].startswith("job_") and job["type"] == "text2img"
    assert (job["status"], job["progress"]) == ("queued", 0)
    assert job["request"]["prompt"] == "A serene lake" and job["request"]["width"] == 512
    assert job["createdAt"].endswith("Z")
    done = await wait_done(client, job["id"])
    assert done["status"] == "completed" and done["progress"] == 100
    assert done["result"]["images"][0].startswith("data:image/png;base64,")
    assert isinstance(done["result"]["seed"], int)
    assert {"startedAt", "completedAt"} <= done.keys()


async def test_img2img_job_echoes_a_description_not_the_image(client) -> None:
    resp = await client.post("/generate/img2img", json={
        "prompt": "watercolor", "initImage": png_uri((100, 76)), "strength": 0.5})
    assert resp.status_code == 202
    req = resp.json()["request"]
    assert req["initImage"] == {"width": 100, "height": 76, "bytes": req["initImage"]["bytes"]}
    # default size: the input's, rounded down to multiples of 8
    assert (req["width"], req["height"]) == (96, 72)


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/generate/text2img", {}, "Prompt is required"),
        ("/generate/text2img", {"prompt": "  "}, "Prompt is required"),
        ("/generate/text2img", {"prompt": "x", "width": 500}, "width must be a multiple of 8"),
        ("/generate/text2img", {"prompt": "x", "height": 8192}, "height must be between"),
        ("/generate/text2img", {"prompt": "x", "width": "512"}, "width must be an integer"),
        ("/generate/text2img", {"prompt": "x", "steps": 0}, "steps must be between 1 and 150"),
        ("/generate/text2img", {"prompt": "x", "steps": 7.5}, "steps must be an integer"),
        ("/generate/text2img", {"prompt": "x", "previewEvery": 2}, "previewEvery needs preview"),
        ("/generate/text2img", {"prompt": "x", "steps": 4, "preview": True, "previewEvery": 5},
         "previewEvery must be between 1 and 4"),
        ("/generate/text2img", {"prompt": "x", "preview": "yes"}, "preview must be true or false"),
        ("/generate/text2img", {"prompt": "x", "guidanceScale": 99}, "guidanceScale must be"),
        ("/generate/text2img", {"prompt": "x", "guidanceScale": "hi"}, "guidanceScale must be"),
        ("/generate/text2img", {"prompt": "x", "sampler": "magic"}, "valid samplers: euler_a"),
        ("/generate/text2img", {"prompt": "x", "model": "nope"}, "Unknown model 'nope'"),
        ("/generate/text2img", {"prompt": "x", "model": "sdxl"}, "Model sdxl not loaded"),
        ("/generate/text2img", {"prompt": "x", "seed": -5},
         "seed must be between 0 and 4294967295 (got -5)"),
        ("/generate/text2img", {"prompt": "x", "numImages": 9}, "numImages must be between"),
        ("/generate/text2img", {"prompt": "x", "priority": "urgent"}, "priority must be one of"),
        ("/generate/text2img", {"prompt": "x", "outputFormat": "gif"}, "outputFormat must be"),
        ("/generate/text2img", {"prompt": "x", "colour": 1}, "Unknown field 'colour'"),
        ("/generate/text2img", {"prompt": "x" * 2001}, "prompt is too long"),
        ("/generate/text2img", [1, 2], "Request body must be a JSON object"),
        ("/generate/img2img", {"prompt": "x"}, "initImage is required"),
        ("/generate/img2img", {"prompt": "x", "initImage": "nope!"}, "initImage"),
        ("/generate/img2img", {"prompt": "x", "initImage": png_uri(), "strength": 2},
         "strength must be between 0 and 1"),
        ("/generate/inpaint", {"prompt": "x", "image": png_uri()}, "mask is required"),
        ("/generate/style-transfer", {"contentImage": png_uri()}, "styleImage is required"),
        ("/generate/style-transfer", {"contentImage": png_uri(), "styleImage": png_uri(),
                                      "styleStrength": -1}, "styleStrength must be between"),
    ],
)
async def test_bad_input_gets_400_naming_the_problem(client, path, body, message) -> None:
    resp = await client.post(path, json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json().keys() == {"error"}
    assert message in resp.json()["error"]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
async def test_a_bad_input_image_gets_400_naming_the_field(client, case: str) -> None:
    mode, field, reason, body = BAD_INPUTS[case]
    resp = await client.post(f"/generate/{mode}", json=body())
    assert resp.status_code == 400, resp.text
    assert resp.headers["content-type"] == "application/json"
    payload = resp.json()
    assert list(payload) == ["error"]
    # Messages start with the camelCase wire name, e.g. "initImage: not valid base64; ...".
    assert payload["error"].split(":")[0].split(" ")[0] == field, payload["error"]
    assert reason in payload["error"]


async def test_malformed_json_gets_400(client) -> None:
    resp = await client.post("/generate/text2img", content=b"{not json",
                             headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert resp.json()["error"].startswith("Request body is not valid JSON")


async def test_unknown_job_and_route_get_404_error_bodies(client) -> None:
    assert (await client.get("/jobs/job_0_nope")).json() == {"error": "Job not found"}
    assert (await client.post("/jobs/job_0_nope/cancel")).status_code == 404
    resp = await client.get("/nowhere")
    assert resp.status_code == 404 and "error" in resp.json()
    resp = await client.delete("/generate/text2img")
    assert resp.status_code == 405 and "error" in resp.json()


async def test_hostile_bodies_get_400_not_500(client) -> None:
    deep = b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    nested = b'{"prompt": "x", "model": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}"
    for body, message in ((deep, "nested too deeply"), (nested, "nested too deeply"),
                          (b'{"prompt": "\\ud800"}', "lone UTF-16 surrogate"),
                          (b'{"prompt": "a", "negativePrompt": "\\udfff x"}', "surrogate"),
                          (b"\xff\xfe{}", "not valid JSON")):
        resp = await client.post("/generate/text2img", content=body,
                                  headers={"content-type": "application/json"})
        assert resp.status_code == 400, (body[:40], resp.text)
        assert message in resp.json()["error"]
    resp = await client.post("/generate/img2img", json={"prompt": "x", "initImage": "é" * 8})
    assert resp.status_code == 400 and "not valid base64" in resp.json()["error"]
    # A valid surrogate pair is one character, and welcome.
    ok = await client.post("/generate/text2img", content=b'{"prompt": "\\ud83d\\ude00"}',
                           headers={"content-type": "application/json"})
    assert ok.status_code == 202 and ok.json()["request"]["prompt"] == "\U0001f600"


async def test_list_rejects_bad_filters(client) -> None:
    for query, message in (("status=done", "status must be one of"),
                           ("limit=0", "limit must be between"),
                           ("limit=x", "limit must be an integer"),
                           ("cursor=zzz", "cursor is not valid"),
                           ("cursor=99999999999999999999:x", "cursor is not valid"),
                           ("cursor=-5:job_1", "cursor is not valid")):
        resp = await client.get(f"/jobs?{query}")
        assert resp.status_code == 400 and message in resp.json()["error"], query


async def test_queue_full_gets_429_with_retry_after(client, dispatcher) -> None:
    dispatcher.hold = asyncio.Event()
    codes = [(await client.post("/generate/text2img", json={"prompt": "x"})).status_code
             for _ in range(7)]
    assert codes == [202] * 6 + [429]  # one running + five queued
    resp = await client.post("/generate/text2img", json={"prompt": "x"})
    assert int(resp.headers["retry-after"]) >= 1
    assert "Queue is full" in resp.json()["error"]
    dispatcher.hold.set()


async def test_cancel_list_stats_and_image_bytes(client, dispatcher) -> None:
    dispatcher.hold = asyncio.Event()
    first = (await client.post("/generate/text2img", json={"prompt": "a"})).json()
    second = (await client.post("/generate/text2img", json={"prompt": "b"})).json()
    cancelled = (await client.post(f"/jobs/{second['id']}/cancel")).json()
    assert cancelled == {"success": True, "id": second["id"], "status": "cancelled"}
    # A retried cancel answers the same (it may cross a tracker restart).
    assert (await client.post(f"/jobs/{second['id']}/cancel")).json() == cancelled
    dispatcher.hold.set()
    await wait_done(client, first["id"])
    resp = await client.post(f"/jobs/{first['id']}/cancel")
    assert resp.status_code == 409 and "already completed" in resp.json()["error"]
    listed = (await client.get("/jobs?status=cancelled")).json()["jobs"]
    assert [j["id"] for j in listed] == [second["id"]]
    stats = (await client.get("/queue/status")).json()
    assert (stats["completedJobs"], stats["queuedJobs"], stats["processingJobs"]) == (1, 0, 0)
    image = await client.get(f"/jobs/{first['id']}/images/0")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert (await client.get(f"/jobs/{first['id']}/images/3")).status_code == 404


def sse_events(body: str) -> list[dict[str, str]]:
    """The events of a server-sent event stream, each as its fields."""
    events = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines()
                      if ": " in line and not line.startswith(":"))
        if fields:
            events.append(fields)
    return events


async def test_events_stream_until_the_job_ends(client) -> None:
    job = (await client.post("/generate/text2img", json={"prompt": "a", "steps": 4})).json()
    async with client.stream("GET", f"/jobs/{job['id']}/events") as resp:
        body = (await resp.aread()).decode()
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(body)
    records = [json.loads(e["data"]) for e in events]
    assert {e["event"] for e in events} == {"job"} and all(e["id"] for e in events)
    assert records[-1]["status"] == "completed" and "images" not in records[-1]["result"]
    assert len({e["id"] for e in events}) == len(events)  # each event a new state
    # Resuming with the last id sends nothing new: the job has not changed since.
    async with client.stream("GET", f"/jobs/{job['id']}/events",
                             headers={"Last-Event-ID": events[-1]["id"]}) as again:
        assert sse_events((await again.aread()).decode()) == []


async def test_models_and_health(client) -> None:
    models = (await client.get("/models")).json()["models"]
    ids = [m["id"] for m in models]
    assert ids[:2] == ["tiny-sd", "tiny-sd-inpaint"] and "stable-diffusion-v1.5" in ids
    tiny = models[0]
    assert {"id", "name", "description", "type", "loaded", "version"} <= tiny.keys()
    assert "shapes" in tiny["name"].lower() and "circle" in tiny["description"]
    assert (await client.get("/healthz")).json() == {"status": "ok"}
