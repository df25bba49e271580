"""The compatible APIs' translation rules, as pure functions (no server, no Ray): OpenAI and
AUTOMATIC1111 fields to our request bodies, samplers, answers, error shapes, caller notes."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from PIL import Image

from serve_app.api.compat import a1111_samplers as samplers
from serve_app.api.compat import a1111_translate as a1111
from serve_app.api.compat import openai_translate as oai
from serve_app.api.compat.dialects import DialectError, renamed, render_error
from serve_app.errors import InvalidRequest, QueueFull, ServiceUnavailable, StoreTimeout
from serve_app.jobs.callers import CallerNotes
from serve_app.messages import SAMPLERS, JobType
from serve_app.registry import Registry
from serve_app.settings import Limits, Settings

LIMITS = Limits()


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


# -- OpenAI -------------------------------------------------------------------------------


def test_openai_fields_become_our_body_and_unknown_openai_fields_are_ignored() -> None:
    req = oai.parse_fields({"prompt": "a lake", "model": "dall-e-3", "n": 2, "size": "512x256",
                            "response_format": "url", "quality": "hd", "style": "vivid",
                            "user": "u1", "negative_prompt": "fog", "seed": 7, "steps": 12,
                            "cfg_scale": 6.5, "sampler": "ddim", "priority": "high"})
    assert req.response_format == "url"
    assert req.body == {"prompt": "a lake", "numImages": 2, "width": 512, "height": 256,
                        "outputFormat": "png", "negativePrompt": "fog", "seed": 7,
                        "steps": 12, "guidanceScale": 6.5, "sampler": "ddim",
                        "priority": "high"}


def test_openai_model_names_mean_the_default_and_ours_pass_through() -> None:
    assert "model" not in oai.parse_fields({"prompt": "x", "model": "gpt-image-1"}).body
    assert oai.parse_fields({"prompt": "x", "model": "tiny-sdxl"}).body["model"] == "tiny-sdxl"
    assert "width" not in oai.parse_fields({"prompt": "x", "size": "auto"}).body


def test_multipart_strings_are_converted_and_bad_values_name_their_param() -> None:
    req = oai.parse_fields({"prompt": "x", "n": "3", "seed": "42", "guidance_scale": "7.5",
                            "strength": "0.4", "output_format": "jpeg",
                            "output_compression": "80"})
    assert (req.body["numImages"], req.body["seed"], req.body["guidanceScale"]) == (3, 42, 7.5)
    assert (req.strength, req.body["outputFormat"], req.body["quality"]) == (0.4, "jpeg", 80)
    cases = [({"n": "two"}, "n"), ({"n": True}, "n"), ({"n": 1.5}, "n"), ({"size": "big"}, "size"),
             ({"response_format": "png"}, "response_format"), ({"stream": True}, "stream"),
             ({"output_format": "gif"}, "output_format"), ({"prompt": ""}, "prompt")]
    for fields, param in cases:
        with pytest.raises(DialectError) as caught:
            oai.parse_fields({"prompt": "x"} | fields)
        assert (caught.value.status, caught.value.param) == (400, param), fields
    assert oai.parse_fields({"n": "1"}, needs_prompt=False).body == {
        "outputFormat": "png", "numImages": 1}


def test_an_edit_repaints_where_the_mask_is_transparent() -> None:
    image = png(Image.new("RGB", (64, 48), "red"))
    mask = Image.new("RGBA", (64, 48), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 16, 48))  # the left quarter is transparent
    req = oai.parse_fields({"prompt": "x", "strength": "0.6"})
    job_type, body = oai.edit_job(req, image, png(mask), LIMITS)
    assert job_type is JobType.INPAINT and body["inpaintingStrength"] == 0.6
    repaint = decoded(body["mask"])
    assert repaint.getpixel((4, 10)) == 255 and repaint.getpixel((40, 10)) == 0
    assert decoded(body["image"]).size == (64, 48)


def test_an_edit_without_mask_uses_the_images_transparency_else_it_is_img2img() -> None:
    req = oai.parse_fields({"prompt": "x"})
    holed = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    holed.paste((0, 0, 0, 0), (0, 0, 8, 8))
    job_type, body = oai.edit_job(req, png(holed), None, LIMITS)
    assert job_type is JobType.INPAINT and decoded(body["mask"]).getpixel((1, 1)) == 255
    job_type, body = oai.edit_job(req, png(Image.new("RGB", (32, 32))), None, LIMITS)
    assert job_type is JobType.IMG2IMG and "initImage" in body and "mask" not in body


def test_a_mask_without_alpha_is_read_as_ours_and_an_opaque_one_is_refused() -> None:
    req = oai.parse_fields({"prompt": "x"})
    image = png(Image.new("RGB", (32, 32)))
    white = Image.new("L", (32, 32), 0)
    white.paste(255, (0, 0, 8, 8))
    _, body = oai.edit_job(req, image, png(white), LIMITS)
    assert decoded(body["mask"]).getpixel((1, 1)) == 255
    with pytest.raises(DialectError) as caught:
        oai.edit_job(req, image, png(Image.new("RGBA", (32, 32), (0, 0, 0, 255))), LIMITS)
    assert caught.value.param == "mask"


def test_the_answer_carries_b64_or_url_as_asked_and_both_when_not() -> None:
    record = {"id": "job_1_a", "request": {"prompt": "p"},
              "result": {"images": ["data:image/png;base64,QUJD", "data:image/png;base64,REVG"]}}
    urls = ["https://h/jobs/job_1_a/images/0", "https://h/jobs/job_1_a/images/1"]
    b64 = oai.images_response(record, "b64_json", None, 5, revised_prompt=True)
    assert b64 == {"created": 5, "data": [{"b64_json": "QUJD", "revised_prompt": "p"},
                                          {"b64_json": "REVG", "revised_prompt": "p"}]}
    url = oai.images_response(record, "url", urls, 5)
    assert url["data"][1] == {"url": "https://h/jobs/job_1_a/images/1"}
    assert oai.images_response(record, None, urls, 5)["data"][0] == {
        "b64_json": "QUJD", "url": "https://h/jobs/job_1_a/images/0"}


# -- AUTOMATIC1111 ----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "scheduler", "ours", "label"), [
    ("Euler a", None, "euler_a", "Automatic"),
    ("k_euler_a", "automatic", "euler_a", "Automatic"),
    ("euler", "Automatic", "euler", "Automatic"),
    ("DPM++ 2M", "Karras", "dpm++_2m_karras", "Karras"),
    ("DPM++ 2M", "karras", "dpm++_2m_karras", "Karras"),
    ("DPM++ 2M Karras", None, "dpm++_2m_karras", "Karras"),
    ("DPM++ 2M", "automatic", "dpm++_2m_karras", "Automatic"),  # A1111: its default schedule
    ("DPM++ 2M", "Uniform", "dpm++_2m", "Uniform"),
    ("DDIM", None, "ddim", "Automatic"), ("PLMS", None, "plms", "Automatic"),
    ("LMS", None, "lms", "Automatic"), ("Heun", None, "heun", "Automatic"),
    ("UniPC", "", "unipc", "Automatic"),
])
def test_a1111_samplers_map_onto_ours(name: str, scheduler: str | None, ours: str,
                                      label: str) -> None:
    resolved = samplers.resolve(name, scheduler)
    assert resolved is not None and (resolved.sampler, resolved.scheduler) == (ours, label)


def test_unknown_samplers_get_a1111s_404_and_unusable_schedules_a_400() -> None:
    assert samplers.resolve(None, "karras") is None and samplers.resolve("  ", None) is None
    for name in ("Nope", "DPM++ SDE", "DPM++ 2M SDE Karras"):
        with pytest.raises(DialectError) as caught:
            samplers.resolve(name, None)
        assert (caught.value.status, caught.value.message) == (404, "Sampler not found")
    for name, scheduler in (("Euler", "Karras"), ("Euler a Karras", None), ("Euler", "Beta")):
        with pytest.raises(DialectError) as caught:
            samplers.resolve(name, scheduler)
        assert caught.value.status == 400, (name, scheduler)


def test_every_sampler_we_run_has_an_a1111_name_that_resolves_back() -> None:
    mapped = {s.plain for s in samplers.SAMPLERS} | {s.karras for s in samplers.SAMPLERS}
    assert mapped - {None} == set(SAMPLERS)
    for ours in SAMPLERS:
        named = samplers.a1111_name(ours)
        back = samplers.resolve(named.name, named.scheduler)
        assert back is not None and back.sampler == ours, ours
    listed = samplers.samplers_list()
    assert listed[0] == {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"],
                         "options": {"scheduler": "karras"}}
    assert [s["label"] for s in samplers.schedulers_list()] == ["Automatic", "Uniform", "Karras"]


def test_txt2img_fields_become_our_body() -> None:
    req = {"prompt": "cat", "negative_prompt": "dog", "steps": 9, "cfg_scale": 6, "width": 96,
           "height": 64, "seed": -1, "batch_size": 2, "n_iter": 3, "sampler_name": "DDIM",
           "enable_hr": False, "hr_scale": 3, "restore_faces": False, "alwayson_scripts": {}}
    job_type, body = a1111.generation_job(req, "tiny-sd", LIMITS, img2img=False)
    assert job_type is JobType.TEXT2IMG
    assert body == {"outputFormat": "png", "preview": True, "prompt": "cat",
                    "negativePrompt": "dog",
                    "steps": 9, "guidanceScale": 6, "width": 96, "height": 64, "seed": -1,
                    "numImages": 6, "sampler": "ddim", "model": "tiny-sd"}
    with pytest.raises(DialectError):
        a1111.generation_job({"batch_size": 0}, None, LIMITS, img2img=False)


def test_lora_tags_leave_the_prompt_as_loras() -> None:
    assert a1111.lora_tags("a cat <lora:tiny-style:0.8> <lora:tiny-detail> sitting") == (
        "a cat sitting", [{"name": "tiny-style", "scale": 0.8},
                          {"name": "tiny-detail", "scale": 1.0}])
    assert a1111.lora_tags("<lora:tiny-style:0.7:0.2>x")[1] == [
        {"name": "tiny-style", "scale": 0.7}]
    assert a1111.lora_tags("no tags,  spaced") == ("no tags,  spaced", [])
    with pytest.raises(DialectError, match="not a number"):
        a1111.lora_tags("<lora:tiny-style:lots>")


def test_img2img_is_img2img_without_mask_and_inpainting_with_one() -> None:
    init = base64.b64encode(png(Image.new("RGB", (32, 32)))).decode()
    job_type, body = a1111.generation_job({"init_images": [init], "denoising_strength": 0.3},
                                          None, LIMITS, img2img=True)
    assert job_type is JobType.IMG2IMG and (body["initImage"], body["strength"]) == (init, 0.3)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 8, 8))
    uri = "data:image/png;base64," + base64.b64encode(png(mask)).decode()
    job_type, body = a1111.generation_job(
        {"init_images": [init], "mask": uri, "denoising_strength": 0.5,
         "inpainting_mask_invert": 1}, None, LIMITS, img2img=True)
    assert job_type is JobType.INPAINT and body["inpaintingStrength"] == 0.5
    assert decoded(body["mask"]).getpixel((1, 1)) == 0  # inverted
    assert decoded(body["mask"]).getpixel((20, 20)) == 255
    with pytest.raises(DialectError) as caught:
        a1111.generation_job({"init_images": []}, None, LIMITS, img2img=True)
    assert (caught.value.status, caught.value.message) == (404, "Init image not found")


def finished(status: str = "completed", **request: Any) -> dict[str, Any]:
    ran = {"prompt": "cat", "negativePrompt": "", "steps": 4, "guidanceScale": 7.0,
           "width": 64, "height": 48, "sampler": "dpm++_2m_karras", "seed": 11,
           "model": "tiny-sd"} | request
    result = {"images": ["data:image/png;base64,QUJD", "data:image/png;base64,REVG"],
              "seeds": [11, 12]} if status == "completed" else None
    return {"id": "job_1_a", "type": "text2img", "status": status, "request": ran,
            "createdAt": "2026-11-30T05:00:00.000Z", "result": result}


def test_a_finished_job_is_answered_as_a1111_does(registry: Registry,
                                                  settings: Settings) -> None:
    cp = a1111.checkpoint(registry.get("tiny-sd"), settings)
    req = {"prompt": "cat", "batch_size": 2, "init_images": ["..."], "mask": "..."}
    out = a1111.generation_response(finished(), req, cp)
    assert out["images"] == ["QUJD", "REVG"]
    assert out["parameters"]["init_images"] is None and out["parameters"]["batch_size"] == 2
    info = json.loads(out["info"])
    assert (info["seed"], info["all_seeds"], info["sampler_name"]) == (11, [11, 12], "DPM++ 2M")
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (64, 48, 4, 7.0)
    assert info["infotexts"][1].splitlines()[-1].startswith(
        "Steps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 12, "
        "Size: 64x48")
    assert info["sd_model_hash"] == cp["hash"] and info["job_timestamp"] == "20261130050000"
    stopped = a1111.generation_response(finished("cancelled"), {}, cp)
    assert stopped["images"] == [] and json.loads(stopped["info"])["interrupted"] is True
    assert a1111.generation_response(finished(), {"send_images": False}, cp)["images"] == []


def test_progress_follows_the_callers_job() -> None:
    now = datetime(2026, 11, 30, 5, 0, 10, tzinfo=UTC)
    idle = a1111.progress_body(None, now)
    assert (idle["progress"], idle["state"]["job_count"]) == (0.0, 0)
    queued = finished("queued") | {"progress": 0, "queuePosition": 3}
    body = a1111.progress_body(queued, now)
    assert (body["progress"], body["state"]["job_count"], body["textinfo"]) == (
        0.01, 1, "Queued (position 3)")
    running = finished("processing") | {"progress": 50,
                                        "startedAt": "2026-11-30T05:00:06.000Z"}
    body = a1111.progress_body(running, now)
    assert body["progress"] == 0.5 and body["eta_relative"] == pytest.approx(4.0)
    assert (body["state"]["sampling_step"], body["state"]["sampling_steps"]) == (2, 4)
    assert body["current_image"] is None
    previewed = running | {"preview": {"step": 2, "image": "data:image/jpeg;base64,/9j/AA=="}}
    assert a1111.progress_body(previewed, now)["current_image"] == "/9j/AA=="
    stopped = a1111.progress_body(finished("cancelled"), now)
    assert stopped["state"]["interrupted"] is True and stopped["state"]["job_count"] == 0


def test_checkpoints_are_found_by_title_name_or_file(registry: Registry,
                                                     settings: Settings) -> None:
    cp = a1111.checkpoint(registry.get("tiny-sd"), settings)
    assert cp["title"] == f"tiny-sd [{cp['hash']}]" and cp["sha256"].startswith(cp["hash"])
    served = frozenset({"tiny-sd"})
    for name in (cp["title"], "tiny-sd", "tiny-sd.safetensors", "models/tiny-sd.ckpt"):
        assert a1111.find_checkpoint(name, registry, served) == "tiny-sd", name
    assert a1111.find_checkpoint("tiny-sdxl", registry, served) is None
    assert a1111.find_checkpoint("v1-5-pruned [6ce0161689]", registry, served) is None


# -- errors and caller notes ------------------------------------------------------------


def test_error_bodies_follow_the_dialect_of_the_path() -> None:
    assert render_error("/jobs/x", 404, "gone") == ({"error": "gone"}, {})
    body, headers = render_error("/v1/images/generations", 400, "bad",
                                 DialectError("bad", param="size", code="invalid_value"))
    assert body == {"error": {"message": "bad", "type": "invalid_request_error",
                              "param": "size", "code": "invalid_value"}} and headers == {}
    assert render_error("/sdapi/v1/txt2img", 404, "Sampler not found")[0] == {
        "error": "HTTPException", "detail": "Sampler not found", "body": "",
        "errors": "404: Sampler not found"}
    assert render_error("/v1/models", 401, "no key")[0]["error"]["code"] == "invalid_api_key"


def test_openai_answers_say_whether_the_client_may_repeat_them() -> None:
    def retry(status: int, exc: Exception | None = None) -> str | None:
        return render_error("/v1/images/generations", status, "m", exc)[1].get(
            "x-should-retry")

    assert retry(429, QueueFull("full")) is None  # nothing was done: retry
    assert retry(503, ServiceUnavailable("restarting")) is None
    assert retry(503, StoreTimeout("slow store")) == "false"  # may still land
    assert retry(500) == retry(409) == retry(504) == "false"
    assert retry(500, DialectError("failed", 500, repeatable=False)) == "false"
    assert retry(400) is None  # not retried by the client anyway


def test_validation_messages_are_renamed_to_the_dialects_fields() -> None:
    err = renamed(InvalidRequest("numImages must be between 1 and 4 (got 9)"), oai.FIELD_NAMES)
    assert (err.message, err.param) == ("n must be between 1 and 4 (got 9)", "n")
    err = renamed(InvalidRequest("guidanceScale must be a number"), a1111.FIELD_NAMES)
    assert err.message == "cfg_scale must be a number"
    assert renamed(InvalidRequest("Unknown model 'x'; ..."), oai.FIELD_NAMES).param == "model"


def test_caller_notes_are_per_caller_bounded_and_forgettable() -> None:
    notes = CallerNotes(max_callers=2)
    notes.remember("a", "model", "tiny-sd")
    notes.remember("b", "model", "tiny-sdxl")
    assert notes.recall("a") == {"model": "tiny-sd"}  # a is now the most recent
    notes.remember("c", "job", "job_1")
    assert notes.recall("b") == {} and notes.recall("a") == {"model": "tiny-sd"}
    notes.remember("a", "model", None)
    assert notes.recall("a") == {}
    with pytest.raises(InvalidRequest):
        notes.remember("a", "x" * 65, "v")
    with pytest.raises(InvalidRequest):
        notes.remember("a", "model", "v" * 513)


class Pushed:
    """A backend whose job goes through the given statuses, pushed on its feed."""

    def __init__(self, *statuses: str, hold: bool = False) -> None:
        self.statuses = list(statuses)
        self.hold = hold
        self.reads: list[bool] = []  # each read's `limited`
        self.watches = 0

    def record(self, status: str) -> bytes:
        return json.dumps({"id": "job_1", "status": status}).encode()

    async def get(self, job_id: str, caller: Any, limited: bool = True,
                  live: bool = False) -> bytes:
        self.reads.append(limited)
        return self.record(self.statuses[0] if len(self.reads) == 1 else self.statuses[-1])

    async def watch(self, job_id: str, caller: Any) -> Any:
        self.watches += 1
        for status in self.statuses:
            yield self.record(status)
        if self.hold:
            await asyncio.Event().wait()


@pytest.mark.anyio
async def test_waiting_reads_once_then_follows_the_pushed_feed_to_the_end() -> None:
    from serve_app.api.compat.jobs import wait_until_ended
    from serve_app.api.events import Subscriptions
    from serve_app.messages import OPEN

    backend = Pushed("queued", "processing", "completed")
    done = await wait_until_ended(backend, Subscriptions(backend), "job_1", OPEN, 5)
    assert done is not None and done["status"] == "completed"
    # One read counted against the caller's budget, the feed, the ended record: no polls.
    assert backend.reads == [True, False] and backend.watches == 1
    finished = Pushed("completed")
    assert (await wait_until_ended(finished, Subscriptions(finished), "job_1", OPEN, 5)
            )["status"] == "completed"
    assert finished.reads == [True] and finished.watches == 0


@pytest.mark.anyio
async def test_waiting_ends_when_the_client_leaves_or_at_the_deadline() -> None:
    from serve_app.api.compat import jobs
    from serve_app.api.events import Subscriptions
    from serve_app.messages import OPEN

    async def gone() -> bool:
        return True

    running = Pushed("processing", hold=True)
    left = await jobs.wait_until_ended(running, Subscriptions(running), "job_1", OPEN, 5,
                                       gone)
    assert left is not None and left["status"] == "processing"
    queued = Pushed("queued", hold=True)
    assert await jobs.wait_until_ended(queued, Subscriptions(queued), "job_1", OPEN,
                                       timeout_s=0.15) is None
