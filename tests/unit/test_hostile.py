"""Hostile bodies, not derived from our own schema: every field of a valid request of each
dialect (the seed API, OpenAI, AUTOMATIC1111) replaced in turn by every JSON type, unknown
fields, huge strings and deep nesting. None may answer 5xx; each 4xx is in its dialect's
error shape. (Fuzzing from our OpenAPI, which says what each field's type is, missed the
500s these found: a list where a string was expected met a set and raised TypeError.)"""

from __future__ import annotations

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
from tests.support.trackers import http_client, make_tracker

pytestmark = pytest.mark.anyio


def png_b64(size: int = 64) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), "red").save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = {"a": [value]}
    return value


# Every JSON type, and values that stress a type's handling.
HOSTILE: list[Any] = [None, True, False, 0, -1, 1.5, 1e308, 2**70, "", "x", "x" * 100_000,
                      [], ["a"], [1, "a", None], {}, {"a": 1}, nested(40)]

SMALL = {"prompt": "a lake", "width": 64, "height": 64, "steps": 2, "seed": 1}
BODIES: dict[str, dict[str, Any]] = {
    "/generate/text2img": SMALL | {"negativePrompt": "fog", "guidanceScale": 5,
                                   "sampler": "euler", "model": "tiny-sd", "numImages": 1,
                                   "outputFormat": "png", "quality": 90,
                                   "priority": "normal", "preview": True, "previewEvery": 1,
                                   "loras": [{"name": "tiny-style", "scale": 0.5}]},
    "/generate/img2img": SMALL | {"initImage": png_b64(), "strength": 0.5},
    "/generate/inpaint": SMALL | {"image": png_b64(), "mask": png_b64(),
                                  "inpaintingStrength": 1.0},
    "/generate/style-transfer": {"contentImage": png_b64(), "styleImage": png_b64(),
                                 "styleStrength": 0.5, "contentStrength": 0.5, "steps": 2},
    "/v1/images/generations": {"prompt": "a lake", "model": "tiny-sd", "n": 1,
                               "size": "64x64", "response_format": "b64_json",
                               "output_format": "png", "output_compression": 80,
                               "quality": "standard", "style": "vivid", "user": "u",
                               "negative_prompt": "fog", "seed": 1, "steps": 2,
                               "guidance_scale": 5, "sampler": "euler",
                               "priority": "normal", "strength": 0.5},
    "/sdapi/v1/txt2img": {"prompt": "a lake", "negative_prompt": "fog", "steps": 2,
                          "cfg_scale": 5, "width": 64, "height": 64, "seed": 1,
                          "sampler_name": "Euler a", "scheduler": "Automatic",
                          "batch_size": 1, "n_iter": 1, "send_images": True,
                          "override_settings": {"sd_model_checkpoint": "tiny-sd"}},
    "/sdapi/v1/img2img": {"prompt": "a lake", "steps": 2, "width": 64, "height": 64,
                          "seed": 1, "init_images": [png_b64()], "denoising_strength": 0.5,
                          "mask": png_b64(), "inpainting_mask_invert": 0,
                          "sampler_name": "Euler", "cfg_scale": 5},
    "/sdapi/v1/options": {"sd_model_checkpoint": "tiny-sd"},
}


def cases() -> list[tuple[str, str, Any]]:
    out: list[tuple[str, str, Any]] = []
    for path, body in BODIES.items():
        for field in body:
            out += [(path, field, value) for value in HOSTILE]
        out += [(path, "anUnknownField", "x"), (path, "", nested(60)),
                (path, "__proto__", {"polluted": True})]
    return out


def well_formed(path: str, status: int, body: Any) -> bool:
    if path.startswith("/v1/"):
        return isinstance(body, dict) and isinstance(body.get("error"), dict) and isinstance(
            body["error"].get("message"), str)
    if path.startswith("/sdapi/"):
        return isinstance(body, dict) and isinstance(body.get("detail"), str)
    return isinstance(body, dict) and isinstance(body.get("error"), str)


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def client(registry: Registry, tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[httpx.AsyncClient]:
    tmp = tmp_path_factory.mktemp("hostile")
    settings = Settings(data_dir=str(tmp / "data"), store="memory", blob_url="memory://",
                        submit_rate=0, read_rate=0, max_queue_size=100_000,
                        max_queued_per_key=100_000)
    tracker = make_tracker(registry, settings,
                           served=frozenset({"tiny-sd", "tiny-sd-inpaint"}))
    async with http_client(tracker, settings, registry,
                           frozenset({"tiny-sd", "tiny-sd-inpaint"}),
                           raise_app_exceptions=False, timeout=60) as c:
        yield c
    await tracker.close()


async def test_every_field_of_every_dialect_takes_every_json_type_without_a_5xx(
        client: httpx.AsyncClient) -> None:
    failures = []
    for path, field, value in cases():
        body = dict(BODIES[path]) | {field: value}
        resp = await client.post(path, content=json.dumps(body),
                                 headers={"content-type": "application/json"})
        answer = resp.json() if resp.content else None
        if resp.status_code >= 500 or (resp.status_code >= 400
                                       and not well_formed(path, resp.status_code, answer)):
            failures.append((path, field, repr(value)[:40], resp.status_code,
                             resp.text[:160]))
    assert failures == []


async def test_bodies_that_are_not_objects_are_4xx_in_each_dialect(
        client: httpx.AsyncClient) -> None:
    failures = []
    for path in BODIES:
        for value in [*[v for v in HOSTILE if not isinstance(v, dict)], "{not json",
                      b"\xff\xfe".decode("latin-1")]:
            content = value if isinstance(value, str) and value.startswith("{not") else (
                json.dumps(value))
            resp = await client.post(path, content=content,
                                     headers={"content-type": "application/json"})
            if not 400 <= resp.status_code < 500 or not well_formed(path, resp.status_code,
                                                                    resp.json()):
                failures.append((path, repr(value)[:40], resp.status_code, resp.text[:160]))
    assert failures == []


async def test_multipart_edits_and_variations_take_hostile_fields_without_a_5xx(
        client: httpx.AsyncClient) -> None:
    image = base64.b64decode(png_b64())
    failures = []
    for path in ("/v1/images/edits", "/v1/images/variations"):
        good = {"prompt": "a lake", "model": "tiny-sd", "n": "1", "size": "64x64",
                "response_format": "b64_json", "steps": "2", "seed": "1",
                "guidance_scale": "5", "strength": "0.5"}
        for field in good:
            for value in ["", "x" * 10_000, "-1", "1e308", "nan", "[1]", '{"a": 1}', "null",
                          "true", "\u0000"]:
                data = good | {field: value}
                resp = await client.post(path, data=data, files={"image": ("i.png", image)})
                if resp.status_code >= 500 or (resp.status_code >= 400 and not well_formed(
                        path, resp.status_code, resp.json())):
                    failures.append((path, field, value[:20], resp.status_code,
                                     resp.text[:160]))
    assert failures == []
