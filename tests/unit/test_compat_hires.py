"""AUTOMATIC1111's hires fix in our terms, and the refusal of every image-changing A1111
field we do not implement (pure functions: `serve_app.api.compat.a1111_fields` through
`a1111_translate.generation_job`)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from serve_app.api.compat import a1111_translate as a1111
from serve_app.api.compat.a1111_fields import HR_UPSCALERS
from serve_app.api.compat.dialects import DialectError
from serve_app.hires_plan import UPSCALERS
from serve_app.registry import Registry
from serve_app.settings import Limits, Settings

LIMITS = Limits()


def txt2img(**req: Any) -> dict[str, Any]:
    return a1111.generation_job({"prompt": "cat"} | req, None, LIMITS, img2img=False)[1]


def refusal(img2img: bool = False, **req: Any) -> str:
    base: dict[str, Any] = {"prompt": "cat"}
    if img2img:
        base["init_images"] = ["aGk="]
    with pytest.raises(DialectError) as caught:
        a1111.generation_job(base | req, None, LIMITS, img2img=img2img)
    assert caught.value.status == 400
    return caught.value.message


def test_enable_hr_with_a1111s_defaults_is_a_2x_latent_pass_at_strength_075() -> None:
    assert txt2img(enable_hr=True)["hires"] == {"scale": 2.0, "upscaler": "latent",
                                                "denoisingStrength": 0.75}


def test_every_hr_field_maps_onto_ours() -> None:
    body = txt2img(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent (bicubic antialiased)",
                   hr_second_pass_steps=12, denoising_strength=0.4, sampler_name="Euler a",
                   hr_sampler_name="DPM++ 2M", hr_scheduler="Karras")
    assert body["sampler"] == "euler_a"
    assert body["hires"] == {"scale": 1.5, "upscaler": "latent-bicubic-antialiased",
                             "steps": 12, "denoisingStrength": 0.4,
                             "sampler": "dpm++_2m_karras"}
    # hr_second_pass_steps 0 means the first pass's; "Use same sampler" the first's too.
    same = txt2img(enable_hr=True, hr_second_pass_steps=0, hr_sampler_name="Use same sampler",
                   hr_checkpoint_name="Use same checkpoint", hr_prompt="", hr_prompt_2=None)
    assert "steps" not in same["hires"] and "sampler" not in same["hires"]


def test_hr_resize_overrides_the_scale_and_one_side_keeps_the_aspect() -> None:
    assert txt2img(enable_hr=True, hr_scale=3, hr_resize_x=1024, hr_resize_y=768)["hires"][
        "width"] == 1024
    hires = txt2img(enable_hr=True, hr_resize_x=0, hr_resize_y=640)["hires"]
    assert (hires.get("width"), hires["height"], "scale" in hires) == (None, 640, False)


@pytest.mark.parametrize(("theirs", "ours"), list(HR_UPSCALERS.items()))
def test_a1111s_upscaler_names_map_onto_upscalers_we_run(theirs: str, ours: str) -> None:
    assert txt2img(enable_hr=True, hr_upscaler=theirs)["hires"]["upscaler"] == ours
    assert ours in UPSCALERS


def test_without_enable_hr_the_hr_fields_change_nothing() -> None:
    body = txt2img(hr_scale=4, hr_upscaler="ESRGAN_4x", denoising_strength=0.2,
                   hr_checkpoint_name="other")
    assert "hires" not in body


@pytest.mark.parametrize(("req", "words"), [
    ({"hr_upscaler": "ESRGAN_4x"}, "hr_upscaler: could not find upscaler named 'ESRGAN_4x'"),
    ({"hr_checkpoint_name": "sdxl.safetensors"}, "hr_checkpoint_name: the hires pass runs "
                                                 "on the same checkpoint here"),
    ({"hr_prompt": "a dog"}, "hr_prompt: the hires pass uses the first pass's prompts"),
    ({"hr_negative_prompt": "blur"}, "hr_negative_prompt:"),
    ({"firstphase_width": 256}, "firstphase_width: the old hires fix's first-pass size"),
    ({"hr_scale": "2"}, "hr_scale: expected a number"),
])
def test_hires_fields_we_cannot_honour_are_refused_by_name(req: dict[str, Any],
                                                          words: str) -> None:
    assert words in refusal(enable_hr=True, **req)


def test_the_same_hr_prompt_as_the_prompt_is_no_change() -> None:
    assert "hires" in txt2img(enable_hr=True, hr_prompt="cat")


@pytest.mark.parametrize(("req", "field"), [
    ({"restore_faces": True}, "restore_faces"),
    ({"tiling": True}, "tiling"),
    ({"subseed_strength": 0.3, "subseed": 5}, "subseed_strength"),
    ({"seed_resize_from_w": 512}, "seed_resize_from_w"),
    ({"s_churn": 0.5}, "s_churn"),
    ({"s_noise": 0.9}, "s_noise"),
    ({"s_min_uncond": 0.2}, "s_min_uncond"),
    ({"eta": 0.5, "sampler_name": "Euler a"}, "eta"),
    ({"eta": 1.0, "sampler_name": "DDIM"}, "eta"),
    ({"script_name": "x/y/z plot"}, "script_name"),
    ({"refiner_checkpoint": "refiner.safetensors"}, "refiner_checkpoint"),
    ({"alwayson_scripts": {"ADetailer": {"args": []}}}, "alwayson_scripts"),
    ({"infotext": "cat\nSteps: 20"}, "infotext"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 2}},
     "override_settings.CLIP_stop_at_last_layers"),
])
def test_image_changing_fields_we_do_not_implement_are_refused_naming_them(
        req: dict[str, Any], field: str) -> None:
    assert refusal(**req).startswith(f"{field}:")
    assert refusal(img2img=True, **req).startswith(f"{field}:")


@pytest.mark.parametrize(("req", "field"), [
    ({"resize_mode": 1}, "resize_mode"),
    ({"initial_noise_multiplier": 0.9}, "initial_noise_multiplier"),
    ({"latent_mask": "aGk="}, "latent_mask"),
    ({"mask": "aGk=", "inpainting_fill": 2}, "inpainting_fill"),
    ({"mask": "aGk=", "mask_blur": 16}, "mask_blur"),
])
def test_img2img_fields_we_do_not_implement_are_refused_naming_them(
        req: dict[str, Any], field: str) -> None:
    assert refusal(img2img=True, **req).startswith(f"{field}:")


def test_face_restoration_says_it_is_not_here() -> None:
    assert refusal(restore_faces=True) == (
        "restore_faces: face restoration is not available on this server (GET "
        "/sdapi/v1/face-restorers lists none); send restore_faces false")


def test_what_clients_send_by_default_is_accepted() -> None:
    # webuiapi's defaults (its txt2img and img2img keyword defaults), and fields that do
    # not change the image.
    defaults = {"restore_faces": False, "tiling": False, "subseed": -1, "subseed_strength": 0,
                "seed_resize_from_h": 0, "seed_resize_from_w": 0, "eta": 1.0, "s_churn": 0,
                "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "override_settings": {},
                "script_args": [], "script_name": None, "alwayson_scripts": {},
                "sampler_name": "Euler a", "styles": [], "save_images": False,
                "do_not_save_grid": False, "refiner_checkpoint": None, "comments": {}}
    txt2img(**defaults)
    img2img = {"init_images": ["aGk="], "resize_mode": 0, "image_cfg_scale": 1.5,
               "mask_blur": 4, "inpainting_fill": 0, "inpaint_full_res": True,
               "inpaint_full_res_padding": 0, "initial_noise_multiplier": 1,
               "include_init_images": False}
    a1111.generation_job({"prompt": "cat"} | defaults | img2img, None, LIMITS, img2img=True)
    # eta only changes ancestral samplers and DDIM: another sampler ignores it.
    txt2img(eta=0.3, sampler_name="DPM++ 2M")


def test_disable_extra_networks_leaves_the_lora_tags_unapplied() -> None:
    body = txt2img(prompt="cat <lora:tiny-style:0.5>", disable_extra_networks=True)
    assert body["prompt"] == "cat" and "loras" not in body


def test_a_hires_answer_says_so_as_a1111s_info_does(registry: Registry,
                                                    settings: Settings) -> None:
    ran = {"prompt": "cat", "negativePrompt": "", "steps": 4, "guidanceScale": 7.0,
           "width": 64, "height": 48, "sampler": "euler_a", "seed": 11, "model": "tiny-sd",
           "hires": {"scale": 2.0, "width": 128, "height": 96, "upscaler": "latent-nearest",
                     "steps": 4, "denoisingStrength": 0.6, "sampler": "euler_a"}}
    record = {"id": "job_1_a", "type": "text2img", "status": "completed", "request": ran,
              "createdAt": "2026-11-30T05:00:00.000Z",
              "result": {"images": ["data:image/png;base64,QUJD"], "seeds": [11]}}
    cp = a1111.checkpoint(registry.get("tiny-sd"), settings)
    info = json.loads(a1111.generation_response(record, {"enable_hr": True}, cp)["info"])
    assert info["denoising_strength"] == 0.6
    assert info["extra_generation_params"] == {
        "Schedule type": "Automatic", "Denoising strength": 0.6, "Hires upscale": 2.0,
        "Hires upscaler": "Latent (nearest)"}
    assert "Denoising strength: 0.6, Hires upscale: 2.0, Hires upscaler: Latent (nearest), " \
        "Version:" in info["infotexts"][0]


def test_progress_of_a_hires_job_counts_both_passes_and_names_the_second() -> None:
    record = {"id": "job_1_a", "type": "text2img", "status": "processing", "phase": "hires",
              "progress": 75, "createdAt": "2026-11-30T05:00:00.000Z",
              "startedAt": "2026-11-30T05:00:01.000Z",
              "request": {"steps": 10, "hires": {"steps": 20, "denoisingStrength": 0.5}}}
    body = a1111.progress_body(record, datetime(2026, 11, 30, 5, 0, 4, tzinfo=UTC))
    assert (body["state"]["sampling_step"], body["state"]["sampling_steps"]) == (15, 20)
    assert body["textinfo"] == "hires" and body["progress"] == 0.75
