"""LoRAs and ControlNets on the ingress side: the registry entries, request validation
against them, what the task and the job record carry, and `GET /models`. No torch."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from PIL import Image

from serve_app.api.submission import build_submission
from serve_app.api.wire import JobRecord, ModelList
from serve_app.errors import ConfigError, InvalidRequest
from serve_app.jobs.codec import task_from_json, task_to_json
from serve_app.jobs.job import JobResult
from serve_app.messages import JobType, Submission
from serve_app.registry import Registry, parse_registry
from serve_app.settings import Settings
from tests.support.trackers import http_client, make_tracker

SERVED = frozenset({"tiny-sd", "tiny-sd-inpaint", "tiny-sdxl"})


def png(size: tuple[int, int] = (96, 64)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, "white").save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def submit(registry: Registry, settings: Settings, job_type: JobType = JobType.TEXT2IMG,
           **body: Any) -> Submission:
    body = {"prompt": "p", "steps": 2, "seed": 1} | body
    return build_submission(job_type, body, settings=settings, registry=registry,
                            served=SERVED)


def refused(registry: Registry, settings: Settings, **body: Any) -> str:
    with pytest.raises(InvalidRequest) as exc:
        submit(registry, settings, **body)
    return exc.value.message


# -- LoRAs ------------------------------------------------------------------------------


def test_loras_reach_the_task_in_name_order_and_the_record_as_sent(
        registry: Registry, settings: Settings) -> None:
    loras = [{"name": "tiny-style", "scale": 0.8}, {"name": "tiny-detail", "scale": -0.5}]
    sub = submit(registry, settings, loras=loras)
    assert sub.task.loras == (("tiny-detail", -0.5), ("tiny-style", 0.8))
    assert sub.request["loras"] == loras
    swapped = submit(registry, settings, loras=loras[::-1])
    assert swapped.task.batch_key() == sub.task.batch_key()
    plain = submit(registry, settings)
    assert plain.task.loras == () and "loras" not in plain.request
    other_scale = submit(registry, settings, loras=[{"name": "tiny-style", "scale": 0.7}])
    assert len({plain.task.batch_key(), sub.task.batch_key(),
                other_scale.task.batch_key()}) == 3


def test_an_unknown_lora_is_a_400_naming_it_and_the_models_loras(
        registry: Registry, settings: Settings) -> None:
    message = refused(registry, settings, loras=[{"name": "watercolor", "scale": 1}])
    assert message == ("loras: unknown LoRA 'watercolor' for model 'tiny-sd'; its LoRAs: "
                       "outline, tiny-style, tiny-detail (GET /models lists them)")


def test_a_lora_of_another_model_family_is_a_400_saying_whose_it_is(
        registry: Registry, settings: Settings) -> None:
    message = refused(registry, settings, loras=[{"name": "tiny-xl-style"}])
    assert "LoRA 'tiny-xl-style' belongs to tiny-sdxl (a sdxl model), not to model " \
           "'tiny-sd' (a sd model)" in message


@pytest.mark.parametrize(("loras", "expected"), [
    ([{"name": "tiny-style", "scale": 4.5}], "loras[0].scale must be between -4 and 4 (got 4.5)"),
    ([{"name": "tiny-style"}, {"name": "tiny-style", "scale": 0.1}],
     "loras[1]: LoRA 'tiny-style' is listed twice; give it once with the scale you want"),
    ([{"name": "tiny-style", "weight": 1}],
     "Unknown field 'loras[0].weight'; valid fields are: name, scale"),
    ([{"name": "tiny-style", "scale": "high"}], "loras[0].scale must be a number (got 'high')"),
    ({"name": "tiny-style"}, "loras: Input should be a valid list (got {'name': 'tiny-style'})"),
])
def test_malformed_loras_are_400s_naming_the_field(
        registry: Registry, settings: Settings, loras: Any, expected: str) -> None:
    assert refused(registry, settings, loras=loras) == expected


def test_a_dedicated_inpainting_model_takes_its_base_models_loras(
        registry: Registry, settings: Settings) -> None:
    assert [lo.name for lo in registry.get("tiny-sd-inpaint").loras] == [
        "outline", "tiny-style", "tiny-detail"]
    sub = submit(registry, settings, JobType.INPAINT, image=png((64, 64)),
                 mask=png((64, 64)), loras=[{"name": "tiny-style", "scale": 0.5}])
    assert sub.model == "tiny-sd-inpaint" and sub.task.loras == (("tiny-style", 0.5),)


# -- ControlNet -------------------------------------------------------------------------


def test_a_controlnet_request_carries_its_decoded_image_and_sizes_text2img_by_it(
        registry: Registry, settings: Settings) -> None:
    sub = submit(registry, settings, controlNet={"model": "tiny-canny", "image": png(),
                                                 "conditioningScale": 0.6,
                                                 "preprocess": "canny"})
    control = sub.task.control
    assert control is not None and (control.model, control.preprocess) == ("tiny-canny", "canny")
    assert (control.image.width, control.image.height, control.conditioning_scale) == (96, 64, 0.6)
    assert (sub.task.width, sub.task.height) == (96, 64)  # the control image's size
    assert sub.task.batch_key() is None
    assert sub.request["controlNet"] == {"model": "tiny-canny", "conditioningScale": 0.6,
                                         "preprocess": "canny",
                                         "image": {"width": 96, "height": 64,
                                                   "bytes": len(control.image.png)}}
    assert task_from_json(task_to_json(sub.task)) == sub.task  # survives the job store


@pytest.mark.parametrize(("job_type", "control", "expected"), [
    (JobType.TEXT2IMG, {"model": "depth"}, "controlNet.model: unknown ControlNet 'depth' for "
     "model 'tiny-sd'; its ControlNets: tiny-canny (GET /models lists them)"),
    (JobType.TEXT2IMG, {"conditioningScale": 2.5},
     "controlNet.conditioningScale must be between 0 and 2 (got 2.5)"),
    (JobType.TEXT2IMG, {"preprocess": "sobel"},
     "controlNet.preprocess: Input should be 'none' or 'canny' (got 'sobel')"),
    (JobType.TEXT2IMG, {"image": "not base64!"}, "controlNet.image: not valid base64"),
    (JobType.INPAINT, {}, "controlNet applies to text2img and img2img, not inpaint"),
])
def test_bad_controlnet_requests_are_400s_naming_the_field(
        registry: Registry, settings: Settings, job_type: JobType, control: dict[str, Any],
        expected: str) -> None:
    body: dict[str, Any] = {"controlNet": {"model": "tiny-canny", "image": png()} | control}
    if job_type is JobType.INPAINT:
        body |= {"image": png((64, 64)), "mask": png((64, 64))}
    with pytest.raises(InvalidRequest) as exc:
        submit(registry, settings, job_type, **body)
    assert exc.value.message.startswith(expected)


# -- the registry -----------------------------------------------------------------------


def entry(**over: Any) -> dict[str, Any]:
    return {"id": "m", "name": "M", "description": "d", "source": "tiny"} | over


@pytest.mark.parametrize(("fields", "expected"), [
    ({"source": "path", "path": "m", "loras": [{"name": "a", "source": "tiny-lora"}]},
     "LoRA 'a': tiny-lora adapters fit the embedded tiny models only"),
    ({"loras": [{"name": "a", "path": "a.safetensors", "pipeline": "sdxl"}]},
     "LoRA 'a' is a sdxl adapter; model 'm' is a sd model: it cannot load it"),
    ({"loras": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]},
     "duplicate LoRA names: a"),
    ({"loras": [{"name": "a"}]}, "an adapter with source 'path' needs a 'path'"),
    ({"source": "tiny-flux", "control_nets": [{"id": "c", "source": "tiny-controlnet"}]},
     "ControlNets are supported on sd and sdxl models, not on flux model 'm'"),
])
def test_adapter_entries_that_cannot_work_stop_the_start(fields: dict[str, Any],
                                                         expected: str) -> None:
    with pytest.raises(ConfigError, match="models\\[0\\]") as exc:
        parse_registry({"models": [entry(**fields)]})
    assert expected in str(exc.value)


# -- the wire ---------------------------------------------------------------------------


@pytest.fixture
async def api(registry: Registry, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    tracker = make_tracker(registry, settings, served=SERVED)
    async with http_client(tracker, settings, registry, SERVED) as client:
        yield client
    await tracker.close()


@pytest.mark.anyio
async def test_get_models_lists_each_models_loras_and_controlnets(
        api: httpx.AsyncClient) -> None:
    body = (await api.get("/models")).json()
    models = {m["id"]: m for m in ModelList.model_validate(body).model_dump(by_alias=True)[
        "models"]}
    assert [lo["name"] for lo in models["tiny-sd"]["loras"]] == [
        "outline", "tiny-style", "tiny-detail"]
    assert models["tiny-sd"]["loras"][0]["format"] == "diffusers"
    assert [c["id"] for c in models["tiny-sd"]["controlNets"]] == ["tiny-canny"]
    assert models["tiny-sdxl"]["controlNets"][0]["id"] == "tiny-xl-canny"
    assert models["sdxl"]["loras"] == [] and models["sdxl"]["controlNets"] == []
    assert "path" not in models["tiny-sd"]["loras"][0]


@pytest.mark.anyio
async def test_an_unknown_lora_is_refused_over_http_before_a_job_exists(
        api: httpx.AsyncClient) -> None:
    resp = await api.post("/generate/text2img", json={
        "prompt": "p", "loras": [{"name": "nope", "scale": 1}]})
    assert resp.status_code == 400 and "unknown LoRA 'nope'" in resp.json()["error"]
    assert (await api.get("/jobs")).json()["jobs"] == []


def test_a_result_says_nsfw_per_image_only_when_a_checker_ran() -> None:
    flagged = JobResult(["a", "b"], [1, 2], {}, 5, "image/png", [True, False]).to_wire()
    assert flagged["nsfw"] == [True, False] and "nsfwContentDetected" not in flagged
    assert "nsfw" not in JobResult(["a"], [1], {}, 5, "image/png", []).to_wire()
    record = {"id": "j", "type": "text2img", "status": "completed", "request": {},
              "model": "tiny-sd", "priority": "normal", "createdAt": "t", "progress": 100,
              "result": flagged}
    assert JobRecord.model_validate(record).result.nsfw == [True, False]
