"""POST /generate/upscale, POST /generate/outpaint and GET /upscalers over a tracker in the
same process (no Ray, a fake replica): what the replica is asked to do, and the 400s."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from PIL import Image

from serve_app.messages import JobType
from serve_app.registry import Registry
from serve_app.settings import Settings
from tests.support.fakes import FakeReplicas
from tests.support.trackers import http_client, make_tracker

pytestmark = pytest.mark.anyio


@pytest.fixture
def dispatcher() -> FakeReplicas:
    return FakeReplicas()


@pytest.fixture
async def client(registry: Registry, settings: Settings,
                 dispatcher: FakeReplicas) -> AsyncIterator[httpx.AsyncClient]:
    tracker = make_tracker(registry, settings, dispatcher)
    async with http_client(tracker, settings, registry) as c:
        yield c
    await tracker.close()


def png_uri(size: tuple[int, int] = (96, 80)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, "teal").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def submitted(client: httpx.AsyncClient, dispatcher: FakeReplicas, path: str,
                    body: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    resp = await client.post(path, json=body)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    for _ in range(200):
        if dispatcher.calls:
            break
        await _tick()
    model, task = dispatcher.calls[-1]
    return job | {"_model": model}, task


async def _tick() -> None:
    import asyncio

    await asyncio.sleep(0.01)


async def test_upscale_by_scale_is_a_job_on_the_default_models_replica(client, dispatcher):
    job, task = await submitted(client, dispatcher, "/generate/upscale",
                                {"image": png_uri((96, 80)), "scale": 2})
    assert job["type"] == "upscale" and job["status"] == "queued"
    assert job["request"] | {"image": None} == {
        "model": "tiny-sd", "upscaler": "lanczos", "scale": 2, "width": 192, "height": 160,
        "outputFormat": "png", "quality": 95, "priority": "normal", "image": None}
    assert job["_model"] == "tiny-sd"
    assert task.mode is JobType.UPSCALE and (task.width, task.height) == (192, 160)
    assert task.upscaler.name == "lanczos" and task.upscaler.source == "builtin"
    assert (task.init_image.width, task.init_image.height) == (96, 80)


async def test_a_registry_upscaler_travels_with_its_tiles(client, dispatcher):
    _, task = await submitted(client, dispatcher, "/generate/upscale",
                              {"image": png_uri((96, 80)), "width": 300,
                               "upscaler": "tiny-esrgan"})
    assert (task.width, task.height) == (300, 250)  # the aspect ratio kept
    assert (task.upscaler.source, task.upscaler.tile, task.upscaler.tile_overlap) == (
        "tiny-esrgan", 128, 48)


async def test_both_sides_given_are_taken_as_given(client, dispatcher):
    _, task = await submitted(client, dispatcher, "/generate/upscale",
                              {"image": png_uri((96, 80)), "width": 200, "height": 400,
                               "upscaler": "Nearest"})
    assert (task.width, task.height, task.upscaler.name) == (200, 400, "nearest")


@pytest.mark.parametrize(("body", "message"), [
    ({"scale": 0.5}, "scale must be between 1 and 8 (got 0.5)"),
    ({"scale": 9}, "scale must be between 1 and 8"),
    ({"scale": "2"}, "scale must be a number"),
    ({}, "Give scale (e.g. 2), or a target width and/or height"),
    ({"scale": 2, "width": 200}, "Give either scale or width/height, not both"),
    ({"width": 50}, "width 50 is smaller than the image's 96"),
    ({"width": 96 * 9}, "is more than 8x the image's 96"),
    ({"scale": 2, "upscaler": "lanczoss"},
     "Unknown upscaler 'lanczoss'; did you mean 'lanczos'?"),
    ({"scale": 2, "upscaler": "tiny-esrgn"}, "did you mean 'tiny-esrgan'?"),
    ({"scale": 2, "upscaler": "RealESRGAN_x4plus"}, "its weights were not found at"),
    ({"scale": 2, "prompt": "x"}, "Unknown field 'prompt'"),
    ({"scale": 2, "model": "nope"}, "Unknown model 'nope'"),
])
async def test_bad_upscale_requests_get_400_naming_the_problem(client, body, message):
    resp = await client.post("/generate/upscale", json={"image": png_uri((96, 80)), **body})
    assert resp.status_code in (400, 503), resp.text
    assert message in resp.json()["error"]


async def test_an_output_over_the_limit_says_the_largest_scale(client):
    resp = await client.post("/generate/upscale",
                             json={"image": png_uri((1100, 1100)), "scale": 4})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert "4400x4400" in error and "use a scale of at most 3.72" in error


async def test_the_image_is_required(client):
    resp = await client.post("/generate/upscale", json={"scale": 2})
    assert resp.status_code == 400 and resp.json()["error"] == "image is required"


async def test_upscalers_lists_resamplers_and_registry_models(client):
    listing = (await client.get("/upscalers")).json()["upscalers"]
    by_name = {u["name"]: u for u in listing}
    assert list(by_name)[:2] == ["lanczos", "nearest"]
    assert by_name["tiny-esrgan"] | {"description": ""} == {
        "name": "tiny-esrgan", "kind": "model", "scale": 4, "present": True, "description": ""}
    assert by_name["RealESRGAN_x4plus"]["present"] is False


async def test_outpaint_pads_the_canvas_and_runs_on_the_inpainting_model(client, dispatcher):
    job, task = await submitted(client, dispatcher, "/generate/outpaint", {
        "prompt": "more sky", "image": png_uri((96, 80)), "left": 64, "right": 64,
        "top": 64, "bottom": 64, "steps": 2})
    assert job["type"] == "outpaint" and job["_model"] == "tiny-sd-inpaint"
    assert (task.width, task.height) == (224, 208)
    assert task.outpaint == (64, 64, 64, 64, 16)
    req = job["request"]
    assert (req["left"], req["top"], req["right"], req["bottom"], req["seam"]) == (
        64, 64, 64, 64, 16)
    assert (req["width"], req["height"]) == (224, 208)


async def test_outpaint_grows_right_and_bottom_to_the_size_multiple(client, dispatcher):
    _, task = await submitted(client, dispatcher, "/generate/outpaint", {
        "prompt": "x", "image": png_uri((90, 75)), "left": 10, "top": 3, "steps": 2})
    assert task.outpaint == (10, 3, 4, 2, 16)
    assert (task.width, task.height) == (104, 80)


@pytest.mark.parametrize(("body", "message"), [
    ({}, "Give the pixels to add on at least one side"),
    ({"left": -1}, "left must be between 0 and 2048"),
    ({"left": 64, "width": 256}, "outpaint takes no width/height"),
    ({"left": 2000}, "The outpainted width would be 2096"),
    ({"left": 8, "seam": 60}, "seam must be between 0 and 40"),
])
async def test_bad_outpaint_requests_get_400(client, body, message):
    resp = await client.post("/generate/outpaint",
                             json={"prompt": "x", "image": png_uri((96, 80)), **body})
    assert resp.status_code == 400, resp.text
    assert message in resp.json()["error"]


async def test_openapi_documents_the_new_routes(client):
    schema = (await client.get("/openapi.json")).json()
    assert {"/generate/upscale", "/generate/outpaint", "/upscalers"} <= set(schema["paths"])
    components = schema["components"]["schemas"]
    assert {"image", "scale", "upscaler"} <= set(components["UpscaleRequest"]["properties"])
    assert {"left", "seam"} <= set(components["OutpaintRequest"]["properties"])


def test_upscale_and_outpaint_tasks_survive_the_job_record() -> None:
    from serve_app.jobs.codec import task_from_json, task_to_json
    from serve_app.jobs.jsontext import dumps_text, loads
    from serve_app.messages import GenerationTask, UpscalerRef

    base: dict[str, Any] = {"job_id": "j", "prompt": "", "negative_prompt": "", "width": 8,
                            "height": 8, "steps": 1, "guidance_scale": 0.0, "seed": 0,
                            "sampler": "euler_a"}
    for task in (GenerationTask(mode=JobType.UPSCALE, **base,
                                upscaler=UpscalerRef("tiny-esrgan", "tiny-esrgan", tile=64)),
                 GenerationTask(mode=JobType.OUTPAINT, **base, outpaint=(1, 2, 3, 4, 5))):
        assert task_from_json(loads(dumps_text(task_to_json(task)))) == task
