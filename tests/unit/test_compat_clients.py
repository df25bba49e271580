"""The tools people already use, unchanged: the official `openai` package and `webuiapi`
against a live loopback server (the real app and tracker in process, a fake replica that
makes real PNGs of the requested size whose colour follows the seed). The same clients run
against the real Ray Serve app and tiny model in tests/e2e/test_e2e_compat.py."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import webuiapi
from PIL import Image

from serve_app.registry import Registry
from serve_app.settings import Settings
from tests.support.client_server import LiveServer, live_server

KEY = "compat-key-0123456789abcdef"


@pytest.fixture
def server(registry: Registry, settings: Settings) -> Iterator[LiveServer]:
    with live_server(registry, settings) as live:
        yield live


_clients: list[openai.OpenAI | webuiapi.WebUIApi] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Each test's clients closed when it ends: a connection pool left to the garbage
    collector warns about its sockets in whichever later test the collection runs in."""
    yield
    while _clients:
        client = _clients.pop()
        if isinstance(client, webuiapi.WebUIApi):
            client.session.close()  # webuiapi keeps a requests.Session and never closes it
        else:
            client.close()


def oai(server: LiveServer, key: str = "unused", **options: Any) -> openai.OpenAI:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, **options)
    _clients.append(client)
    return client


def sdapi(server: LiveServer, **options: Any) -> webuiapi.WebUIApi:
    host, port = server.url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host, int(port), **options)
    _clients.append(api)
    return api


def jobs(server: LiveServer, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    return httpx.get(f"{server.url}/jobs", headers=headers).json()["jobs"]


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def size_of(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


# -- OpenAI Images API ------------------------------------------------------------------


def test_openai_generate_answers_b64_json_and_urls_of_the_requested_size(server) -> None:
    client = oai(server)
    out = client.images.generate(model="dall-e-3", prompt="a lake", size="96x64", n=2,
                                 response_format="b64_json", quality="hd", style="vivid",
                                 user="someone", extra_body={"seed": 5, "steps": 3})
    assert isinstance(out.created, int) and len(out.data) == 2
    first, second = (base64.b64decode(d.b64_json) for d in out.data)
    assert size_of(first) == size_of(second) == (96, 64) and first != second  # seeds 5, 6
    assert out.data[0].revised_prompt == "a lake" and out.data[0].url is None

    linked = client.images.generate(prompt="a lake", size="96x64", response_format="url",
                                    extra_body={"seed": 5, "steps": 3})
    url = linked.data[0].url
    assert url.startswith(f"{server.url}/jobs/job_") and linked.data[0].b64_json is None
    assert httpx.get(url).content == first  # the same seed, the same image
    [latest, *_] = jobs(server)
    assert (latest["type"], latest["model"], latest["status"]) == ("text2img", "tiny-sd",
                                                                   "completed")


def test_openai_urls_follow_the_proxy_in_front(server) -> None:
    out = oai(server).images.generate(
        prompt="x", size="64x64", response_format="url",
        extra_headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "img.example.com",
                       "X-Forwarded-Prefix": "/gen"})
    assert out.data[0].url.startswith("https://img.example.com/gen/jobs/job_")


def test_openai_edit_with_a_mask_inpaints_and_variations_are_img2img(server) -> None:
    client = oai(server)
    image = png(Image.new("RGB", (80, 64), "red"))
    mask = Image.new("RGBA", (80, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 40, 64))
    edited = client.images.edit(image=("in.png", image, "image/png"),
                                mask=("mask.png", png(mask), "image/png"),
                                prompt="a door", n=2, size="80x64", response_format="b64_json")
    assert [size_of(base64.b64decode(d.b64_json)) for d in edited.data] == [(80, 64)] * 2
    assert jobs(server)[0]["type"] == "inpaint"
    plain = client.images.edit(image=("in.png", image, "image/png"), prompt="a door",
                               extra_body={"strength": 0.5})
    assert size_of(base64.b64decode(plain.data[0].b64_json)) == (80, 64)  # the input's size
    assert jobs(server)[0]["type"] == "img2img"
    with warnings.catch_warnings():  # the client marks variations deprecated; they work
        warnings.simplefilter("ignore", DeprecationWarning)
        varied = client.images.create_variation(image=("in.png", image, "image/png"), n=1,
                                                size="64x64", response_format="b64_json")
    assert size_of(base64.b64decode(varied.data[0].b64_json)) == (64, 64)
    assert jobs(server)[0]["type"] == "img2img"


def test_openai_errors_are_the_clients_own_exceptions(server) -> None:
    client = oai(server, max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="x", size="65x64")
    assert bad.value.param == "size" and "multiple of 8" in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="x", model="no-such-model")
    assert bad.value.param == "model"
    with pytest.raises(openai.BadRequestError) as bad:  # a type error is a 400, not a 422
        client.images.generate(prompt="x", extra_body={"steps": "many"})
    assert bad.value.param == "steps"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert missing.value.code == "model_not_found"
    assert client.models.retrieve("tiny-sd").id == "tiny-sd"
    assert {m.id for m in client.models.list()} == {"tiny-sd", "tiny-sd-inpaint"}


def test_a_failed_job_is_an_error_the_client_does_not_repeat(server) -> None:
    server.dispatcher.explode = "the replica broke"
    before = len(jobs(server))
    with pytest.raises(openai.InternalServerError) as failed:
        oai(server, max_retries=2).images.generate(prompt="x", size="64x64")
    assert "failed: Generation failed" in failed.value.message
    assert failed.value.response.headers["x-should-retry"] == "false"
    assert len(jobs(server)) == before + 1  # one job, not three


def test_a_job_past_job_timeout_is_a_504_and_the_job_failed_as_timed_out(
        registry, settings) -> None:
    """One answer, not a race between two timers: the tracker stops the job at JOB_TIMEOUT
    (from its admission); the dialect's wait outlasts that and answers its 504."""
    with live_server(registry, settings, hold=True, job_timeout_ms=1000) as server:
        with pytest.raises(openai.APIStatusError) as late:
            oai(server, max_retries=2).images.generate(prompt="x", size="64x64")
        assert late.value.status_code == 504
        assert late.value.response.headers["x-should-retry"] == "false"
        assert "Job timed out after 1 s running (JOB_TIMEOUT)" in late.value.message
        [job] = jobs(server)
        assert job["status"] == "failed" and job["error"].startswith("Job timed out")


def test_openai_keys_arrive_as_the_clients_bearer(registry, settings) -> None:
    with live_server(registry, settings, api_key=KEY) as server:
        assert oai(server, KEY).images.generate(prompt="x", size="64x64").data
        with pytest.raises(openai.AuthenticationError) as refused:
            oai(server, "wrong-key-0123456789").models.list()
        assert refused.value.code == "invalid_api_key"


# -- AUTOMATIC1111 API ------------------------------------------------------------------


def test_webuiapi_txt2img_honours_seed_batch_and_size(server) -> None:
    api = sdapi(server)
    result = api.txt2img(prompt="a cat", negative_prompt="dogs", seed=7, width=96, height=64,
                         steps=3, cfg_scale=6, batch_size=2, n_iter=2,
                         sampler_name="DPM++ 2M", scheduler="Karras")
    assert [image.size for image in result.images] == [(96, 64)] * 4
    assert result.info["all_seeds"] == [7, 8, 9, 10] and result.info["seed"] == 7
    assert (result.info["sampler_name"], result.info["scheduler"]) == ("DPM++ 2M", "Karras")
    assert result.parameters["batch_size"] == 2
    again = api.txt2img(prompt="a cat", seed=7, width=96, height=64, steps=3)
    assert png(again.image) == png(result.image)
    job = httpx.get(f"{server.url}/jobs/{result.info['job_id']}").json()
    assert (job["type"], job["request"]["sampler"], job["request"]["numImages"]) == (
        "text2img", "dpm++_2m_karras", 4)


def test_webuiapi_txt2img_with_enable_hr_returns_twice_the_size(server) -> None:
    api = sdapi(server)
    result = api.txt2img(prompt="a cat", seed=7, width=96, height=64, steps=3,
                         enable_hr=True, hr_scale=2, hr_upscaler=webuiapi.HiResUpscaler.Lanczos,
                         hr_second_pass_steps=4, denoising_strength=0.5)
    assert result.image.size == (192, 128)
    assert result.info["extra_generation_params"]["Hires upscaler"] == "Lanczos"
    job = httpx.get(f"{server.url}/jobs/{result.info['job_id']}").json()
    assert job["request"]["hires"] == {"scale": 2, "width": 192, "height": 128,
                                       "upscaler": "lanczos", "steps": 4,
                                       "denoisingStrength": 0.5, "sampler": "euler_a"}
    # webuiapi's own defaults (enable_hr=False and its hr_* values) change nothing.
    assert api.txt2img(prompt="a cat", seed=7, width=96, height=64, steps=3).image.size == (
        96, 64)
    modes = httpx.get(f"{server.url}/sdapi/v1/latent-upscale-modes").json()
    assert modes[0] == {"name": "Latent"} and {"name": "Latent (nearest-exact)"} in modes


def test_a1111_image_changing_fields_we_lack_are_refused_naming_them(server) -> None:
    api = sdapi(server)
    with pytest.raises(RuntimeError) as faces:
        api.txt2img(prompt="x", width=64, height=64, restore_faces=True)
    assert faces.value.args[0] == 400
    assert json.loads(faces.value.args[1])["detail"].startswith("restore_faces: face "
                                                                "restoration is not available")
    with pytest.raises(RuntimeError) as upscaler:
        api.txt2img(prompt="x", width=64, height=64, enable_hr=True, hr_upscaler="ESRGAN_4x")
    assert upscaler.value.args[0] == 400 and "hr_upscaler" in upscaler.value.args[1]
    with pytest.raises(RuntimeError) as too_big:
        api.txt2img(prompt="x", width=1024, height=1024, enable_hr=True, hr_scale=4, steps=1)
    assert too_big.value.args[0] == 400
    assert json.loads(too_big.value.args[1])["detail"].startswith("hr_scale")


def test_webuiapi_img2img_and_inpainting(server) -> None:
    api = sdapi(server)
    source = Image.new("RGB", (96, 80), "blue")
    result = api.img2img(images=[source], prompt="x", width=64, height=64, steps=2,
                         denoising_strength=0.4, seed=3)
    assert result.image.size == (64, 64) and result.info["seed"] == 3
    assert jobs(server)[0]["type"] == "img2img"
    mask = Image.new("L", (96, 80), 0)
    mask.paste(255, (0, 0, 48, 80))
    result = api.img2img(images=[source], mask_image=mask, prompt="x", width=96, height=80,
                         steps=2)
    assert result.image.size == (96, 80) and jobs(server)[0]["type"] == "inpaint"


def test_webuiapi_start_up_probes_and_listings_answer(server) -> None:
    api = sdapi(server)
    assert api.util_get_sampler_names() == sorted(
        ["DPM++ 2M", "Euler a", "Euler", "LMS", "Heun", "DDIM", "PLMS", "UniPC"])
    assert api.util_get_scheduler_names() == ["automatic", "karras", "uniform"]
    [model] = api.get_sd_models()  # the inpainting model is not a checkpoint to select
    assert model.keys() == {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert api.get_options()["sd_model_checkpoint"] == model["title"]
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert [lo["name"] for lo in api.get_loras()] == ["outline", "tiny-style", "tiny-detail"]
    assert api.get_sd_vae() == [] and api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert api.get_upscalers()[0]["name"] == "None" and api.get_cmd_flags()["api"] is True
    assert api.get_progress()["state"]["job_count"] == 0
    api.util_set_model("tiny-sd")
    assert api.util_get_current_model() == model["title"]


def test_a1111_lora_tags_in_the_prompt_become_the_jobs_loras(server) -> None:
    api = sdapi(server)
    api.txt2img(prompt="a barn <lora:tiny-style:0.5>, red", width=64, height=64, steps=2,
                seed=3)
    job = httpx.get(f"{server.url}/jobs/{jobs(server)[0]['id']}").json()
    assert job["request"]["prompt"] == "a barn , red"
    assert job["request"]["loras"] == [{"name": "tiny-style", "scale": 0.5}]
    with pytest.raises(RuntimeError) as unknown:
        api.txt2img(prompt="x <lora:nope:1>", width=64, height=64)
    assert unknown.value.args[0] == 400 and "nope" in unknown.value.args[1]


def test_a1111_errors_are_a1111s(server) -> None:
    api = sdapi(server)
    with pytest.raises(RuntimeError) as unknown:
        api.txt2img(prompt="x", sampler_name="Not A Sampler", width=64, height=64)
    assert unknown.value.args[0] == 404 and '"detail":"Sampler not found"' in unknown.value.args[1]
    with pytest.raises(RuntimeError) as invalid:
        api.txt2img(prompt="x", width=65, height=64)
    assert invalid.value.args[0] == 400 and "width must be a multiple of 8" in (
        invalid.value.args[1])
    refused = httpx.post(f"{server.url}/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
    assert refused.status_code == 400 and refused.json()["error"] == "HTTPException"


def test_progress_and_interrupt_act_on_the_callers_running_job(registry, settings) -> None:
    with live_server(registry, settings, hold=True) as server:
        api = sdapi(server)
        box: dict[str, Any] = {}
        worker = threading.Thread(target=lambda: box.update(result=api.txt2img(
            prompt="x", width=64, height=64, steps=10, seed=1)))
        worker.start()
        deadline = time.monotonic() + 10
        while (progress := api.get_progress())["progress"] < 0.1:  # held after step 1
            assert time.monotonic() < deadline, progress
            time.sleep(0.02)
        state = progress["state"]
        assert (state["job_count"], state["sampling_step"], state["sampling_steps"]) == (1, 1, 10)
        assert progress["progress"] == pytest.approx(0.1) and progress["eta_relative"] >= 0
        assert api.interrupt() == {}
        worker.join(10)
        result = box["result"]
        assert result.images == [] and result.info["interrupted"] is True
        after = api.get_progress()
        assert after["state"]["interrupted"] is True and after["state"]["job_count"] == 0
        assert jobs(server)[0]["status"] == "cancelled"


def test_a1111_clients_authenticate_with_basic_auth(registry, settings) -> None:
    with live_server(registry, settings, api_key=KEY) as server:
        api = sdapi(server, username="anyone", password=KEY)
        assert api.txt2img(prompt="x", width=64, height=64, steps=2).image.size == (64, 64)
        refused = httpx.get(f"{server.url}/sdapi/v1/options", auth=("anyone", "wrong"))
        assert refused.status_code == 401 and refused.json()["error"] == "HTTPException"


# -- per caller (two API keys, in process) --------------------------------------------


@pytest.mark.anyio
async def test_a1111_model_choice_and_progress_are_per_caller(registry, settings) -> None:
    from serve_app.settings import load_settings
    from tests.support.trackers import http_client, make_tracker

    served = frozenset({"tiny-sd", "tiny-sd-inpaint", "tiny-sdxl"})
    ana, bo = "ana-key-0123456789abcdef", "bo-key-0123456789abcdef"
    keyed = load_settings(settings.model_dump(exclude={"api_keys"}),
                          env={"API_KEYS": f"ana:{ana},bo:{bo}"})
    tracker = make_tracker(registry, keyed, served=served)
    async with http_client(tracker, keyed, registry, served) as client:
        as_ana, as_bo = ({"Authorization": f"Bearer {k}"} for k in (ana, bo))
        options = (await client.get("/sdapi/v1/options", headers=as_ana)).json()
        assert options["sd_model_checkpoint"].startswith("tiny-sd [")
        options["sd_model_checkpoint"] = "tiny-sdxl"  # clients post the whole dict back
        assert (await client.post("/sdapi/v1/options", json=options,
                                  headers=as_ana)).json() is None
        chosen = (await client.get("/sdapi/v1/options", headers=as_ana)).json()
        assert chosen["sd_model_checkpoint"].startswith("tiny-sdxl [")
        other = (await client.get("/sdapi/v1/options", headers=as_bo)).json()
        assert other["sd_model_checkpoint"].startswith("tiny-sd [")
        small = {"prompt": "x", "width": 64, "height": 64, "steps": 2, "seed": 1}
        made = (await client.post("/sdapi/v1/txt2img", json=small, headers=as_ana)).json()
        assert json.loads(made["info"])["sd_model_name"] == "tiny-sdxl"
        assert (await client.get("/jobs", headers=as_ana)).json()["jobs"][0]["model"] == (
            "tiny-sdxl")
        assert (await client.get("/sdapi/v1/progress", headers=as_bo)).json()[
            "current_task"] is None
        mine = (await client.get("/sdapi/v1/progress", headers=as_ana)).json()
        assert mine["current_task"] == json.loads(made["info"])["job_id"]
        prioritised = await client.post("/v1/images/generations", headers=as_bo, json={
            "prompt": "x", "size": "64x64", "priority": "low", "response_format": "url"})
        job_id = prioritised.json()["data"][0]["url"].split("/")[-3]
        job = (await client.get(f"/jobs/{job_id}", headers=as_bo)).json()
        assert (job["priority"], job["model"]) == ("low", "tiny-sd")
        assert (await client.get(f"/jobs/{job_id}", headers=as_ana)).status_code == 404
        above = await client.post("/v1/images/generations", headers=as_bo, json={
            "prompt": "x", "size": "64x64", "priority": "high"})
        assert above.status_code == 403  # a user key's highest is normal
        assert "above this API key's highest" in above.json()["error"]["message"]
    await tracker.close()


def test_webuiapi_extras_upscale_twice_with_every_listed_upscaler(server) -> None:
    api = sdapi(server)
    listed = [u["name"] for u in api.get_upscalers()]
    assert listed[:3] == ["None", "Lanczos", "Nearest"] and "tiny-esrgan" in listed
    assert "RealESRGAN_x4plus" not in listed  # its weights are not here
    source = Image.new("RGB", (40, 24), "green")
    for name in listed:
        result = api.extra_single_image(source, upscaler_1=name, upscaling_resize=2)
        assert result.image.size == (80, 48), name
    last = httpx.get(f"{server.url}/jobs/{jobs(server)[0]['id']}").json()
    assert last["type"] == "upscale" and last["request"]["upscaler"] == "tiny-esrgan"


def test_webuiapi_extras_batch_second_upscaler_and_resize_to_a_size(server) -> None:
    api = sdapi(server)
    images = [Image.new("RGB", (40, 24), "green"), Image.new("RGB", (30, 30), "red")]
    result = api.extra_batch_images(images, upscaler_1="Lanczos", upscaler_2="Nearest",
                                    extras_upscaler_2_visibility=0.5, upscaling_resize=3)
    assert [im.size for im in result.images] == [(120, 72), (90, 90)]
    assert len(jobs(server)) == 4  # two upscalers, two images
    cropped = api.extra_single_image(images[0], resize_mode=1, upscaling_resize_w=100,
                                     upscaling_resize_h=100, upscaler_1="Lanczos")
    assert cropped.image.size == (100, 100)
    stretched = api.extra_single_image(images[0], resize_mode=1, upscaling_resize_w=100,
                                       upscaling_resize_h=50, upscaling_crop=False)
    assert stretched.image.size == (100, 50)


def test_a1111_extras_refuse_face_restoration_and_bad_upscalers_in_its_shape(server) -> None:
    source = base64.b64encode(png(Image.new("RGB", (40, 24)))).decode()
    url = f"{server.url}/sdapi/v1/extra-single-image"
    for field in ("gfpgan_visibility", "codeformer_visibility"):
        resp = httpx.post(url, json={"image": source, field: 0.5})
        assert resp.status_code == 400
        body = resp.json()
        assert body["error"] == "HTTPException"
        assert f"{field}=0.5: face restoration" in body["detail"]
    resp = httpx.post(url, json={"image": source, "upscaler_1": "Lanczoz"})
    assert resp.status_code == 400 and "did you mean 'Lanczos'" in resp.json()["detail"]
    resp = httpx.post(url, json={"image": source, "upscaling_resize": 20})
    assert resp.status_code == 400 and "upscaling_resize_w 800" in resp.json()["detail"]
