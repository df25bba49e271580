"""End to end through real Ray Serve on loopback with the tiny model: the official `openai`
client and `webuiapi`, unchanged, against the compatible APIs. Images come back at the
requested sizes, seeds are honoured (the same seed gives the same pixels, in a batch or
alone, through either dialect), errors are the clients' own types, and an A1111 client can
watch and interrupt its running job."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import webuiapi
from PIL import Image

from serve_app.registry import load_registry
from tests.support.serve_harness import ServeHarness, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4


def models() -> dict[str, Any]:
    """tiny-sd and its inpainting model, both warm (an edit should not wait a cold start)."""
    registry = load_registry(ROOT / "config" / "models.yaml")
    entries = [registry.get(m).model_dump(exclude_none=True) for m in ("tiny-sd",
                                                                        "tiny-sd-inpaint")]
    entries[1]["scaling"]["min_replicas"] = 1
    return {"models": entries}


@pytest.fixture(scope="module")
def harness(local_ray) -> ServeHarness:  # type: ignore[no-untyped-def]
    """The session's Ray with this module's app (not `serve_harness`, which would deploy
    the default app first)."""
    harness: ServeHarness = local_ray.harness().for_module("test_e2e_compat")
    harness.deploy(models())
    return harness


@pytest.fixture(scope="module")
def oai(harness: ServeHarness) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{harness.url}/v1", api_key="unused", timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def sdapi(harness: ServeHarness) -> Iterator[webuiapi.WebUIApi]:
    host, port = harness.url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host, int(port))
    yield api
    api.session.close()  # webuiapi keeps a requests.Session and never closes it


def picture(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_the_openai_client_generates_edits_and_gets_its_errors(harness, oai) -> None:
    out = oai.images.generate(prompt="a lake", size="96x64", n=2, response_format="b64_json",
                              extra_body={"seed": 1234, "steps": STEPS})
    first, second = (base64.b64decode(d.b64_json) for d in out.data)
    assert picture(first).size == picture(second).size == (96, 64) and first != second
    linked = oai.images.generate(prompt="a lake", size="96x64", response_format="url",
                                 extra_body={"seed": 1234, "steps": STEPS})
    assert httpx.get(linked.data[0].url).content == first  # same seed, same bytes

    image, mask = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(image, "PNG")
    hole = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    hole.paste((0, 0, 0, 0), (16, 16, 48, 48))
    hole.save(mask, "PNG")
    edited = oai.images.edit(image=("in.png", image.getvalue(), "image/png"),
                             mask=("mask.png", mask.getvalue(), "image/png"), prompt="a door",
                             response_format="b64_json", extra_body={"steps": STEPS})
    result = picture(base64.b64decode(edited.data[0].b64_json)).convert("RGB")
    assert result.size == (64, 64)
    assert result.getpixel((2, 2)) == (255, 0, 0) and result.getpixel((32, 32)) != (255, 0, 0)
    [job] = httpx.get(f"{harness.url}/jobs", params={"type": "inpaint"}).json()["jobs"]
    assert (job["status"], job["model"]) == ("completed", "tiny-sd-inpaint")

    with pytest.raises(openai.BadRequestError) as bad:
        oai.images.generate(prompt="x", size="65x64")
    assert bad.value.param == "size"


def test_webuiapi_seeds_batches_and_img2img(oai, sdapi) -> None:
    batch = sdapi.txt2img(prompt="a lake", seed=1234, batch_size=2, width=96, height=64,
                          steps=STEPS, cfg_scale=7, sampler_name="Euler a")
    assert [i.size for i in batch.images] == [(96, 64)] * 2
    assert batch.info["all_seeds"] == [1234, 1235]
    alone = sdapi.txt2img(prompt="a lake", seed=1235, width=96, height=64, steps=STEPS,
                          cfg_scale=7, sampler_name="Euler a")
    assert alone.image.tobytes() == batch.images[1].tobytes()  # batched = alone
    same = oai.images.generate(prompt="a lake", size="96x64", response_format="b64_json",
                               extra_body={"seed": 1234, "steps": STEPS, "guidance_scale": 7,
                                           "sampler": "euler_a"})
    assert picture(base64.b64decode(same.data[0].b64_json)).tobytes() == (
        batch.images[0].tobytes())  # the same request through either dialect

    varied = sdapi.img2img(images=[batch.image], prompt="a lake", width=64, height=64,
                           steps=STEPS, denoising_strength=0.5, seed=9)
    assert varied.image.size == (64, 64) and varied.info["seed"] == 9


def test_webuiapi_enable_hr_makes_twice_the_size_as_our_own_hires_fix(harness, sdapi) -> None:
    made = sdapi.txt2img(prompt="a lake", seed=21, width=96, height=64, steps=STEPS,
                         cfg_scale=7, sampler_name="Euler a", enable_hr=True, hr_scale=2,
                         hr_upscaler="Latent (nearest)", hr_second_pass_steps=4,
                         denoising_strength=0.5)
    assert made.image.size == (192, 128)
    with harness.client() as client:  # the same job in our API gives the same pixels
        done = wait_for(client, client.post("/generate/text2img", json={
            "prompt": "a lake", "seed": 21, "width": 96, "height": 64, "steps": STEPS,
            "guidanceScale": 7, "sampler": "euler_a", "model": "tiny-sd",
            "hires": {"scale": 2, "upscaler": "latent-nearest", "steps": 4,
                      "denoisingStrength": 0.5}}).json()["id"])
    ours = picture(base64.b64decode(done["result"]["images"][0].partition(",")[2]))
    assert ours.tobytes() == made.image.tobytes()


def test_webuiapi_watches_and_interrupts_its_running_job(harness, sdapi) -> None:
    box: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: box.update(result=sdapi.txt2img(
        prompt="a long one", width=192, height=192, steps=60, seed=5)))
    worker.start()
    deadline = time.monotonic() + 60
    # A1111's live preview: the latent thumbnail, every 60 // 8 = 7 steps.
    while (progress := sdapi.get_progress())["current_image"] is None:
        assert time.monotonic() < deadline and worker.is_alive(), progress
        time.sleep(0.05)
    assert progress["state"]["job_count"] == 1 and progress["state"]["sampling_steps"] == 60
    assert progress["state"]["sampling_step"] >= 7 and 0 < progress["progress"] < 1
    assert picture(base64.b64decode(progress["current_image"])).size == (128, 128)
    assert sdapi.interrupt() == {}
    worker.join(60)
    assert box["result"].images == [] and box["result"].info["interrupted"] is True
    after = sdapi.get_progress()
    assert after["state"]["interrupted"] is True and after["state"]["job_count"] == 0
    job = httpx.get(f"{harness.url}/jobs/{box['result'].info['job_id']}").json()
    assert job["status"] == "cancelled"
