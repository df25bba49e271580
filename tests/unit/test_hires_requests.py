"""The hires fix on the ingress side: the `hires` object's defaults, its final size under
the size rules, the work budget over both passes, the batch key, the record and the store
round trip, and a 400 for each bad field. No torch."""

from __future__ import annotations

from typing import Any

import pytest

from serve_app.api.submission import build_submission
from serve_app.api.wire import Text2ImgRequest
from serve_app.errors import InvalidRequest
from serve_app.hires_plan import cover, crop_box, target_size
from serve_app.jobs.codec import task_from_json, task_to_json
from serve_app.messages import HiresFix, JobType, Submission
from serve_app.registry import Registry, parse_registry
from serve_app.settings import Settings

SERVED = frozenset({"tiny-sd", "tiny-sdxl", "tiny-flux"})


def submit(registry: Registry, settings: Settings, served: frozenset[str] = SERVED,
           job_type: JobType = JobType.TEXT2IMG, **body: Any) -> Submission:
    body = {"prompt": "p", "steps": 10, "seed": 1, "width": 64, "height": 64} | body
    return build_submission(job_type, body, settings=settings, registry=registry,
                            served=served)


def refused(registry: Registry, settings: Settings, **body: Any) -> str:
    with pytest.raises(InvalidRequest) as exc:
        submit(registry, settings, **body)
    return exc.value.message


def test_an_empty_hires_object_doubles_with_the_latent_upscaler_and_first_pass_settings(
        registry: Registry, settings: Settings) -> None:
    sub = submit(registry, settings, hires={}, sampler="ddim")
    assert sub.task.hires == HiresFix(width=128, height=128, upscaler="latent", steps=10,
                                      denoising_strength=0.7, sampler="ddim")
    assert (sub.task.width, sub.task.height) == (64, 64)  # the first pass
    assert sub.task.output_size == (128, 128)
    assert sub.request["hires"] == {"width": 128, "height": 128, "upscaler": "latent",
                                    "steps": 10, "denoisingStrength": 0.7, "sampler": "ddim"}
    assert (sub.request["width"], sub.request["height"]) == (64, 64)


def test_without_hires_nothing_changes(registry: Registry, settings: Settings) -> None:
    sub = submit(registry, settings)
    assert sub.task.hires is None and "hires" not in sub.request
    assert sub.task.output_size == (64, 64)


def test_scale_rounds_down_to_the_models_size_multiple(registry: Registry,
                                                       settings: Settings) -> None:
    sd = submit(registry, settings, hires={"scale": 1.5}, width=72, height=64)
    assert sd.task.output_size == (104, 96)  # 108 -> 104 (multiple of 8)
    assert sd.request["hires"]["scale"] == 1.5
    flux = submit(registry, settings, model="tiny-flux", hires={"scale": 1.5}, width=80,
                  height=64)
    assert flux.task.output_size == (112, 96)  # 120 -> 112 (multiple of 16)


def test_one_side_keeps_the_aspect_and_both_sides_are_taken_as_asked(
        registry: Registry, settings: Settings) -> None:
    assert submit(registry, settings, hires={"width": 160}, width=64, height=128
                  ).task.output_size == (160, 320)
    assert submit(registry, settings, hires={"height": 200}, width=128, height=64
                  ).task.output_size == (400, 200)
    assert submit(registry, settings, hires={"width": 192, "height": 128}
                  ).task.output_size == (192, 128)


def test_the_second_pass_takes_its_own_steps_strength_upscaler_and_sampler(
        registry: Registry, settings: Settings) -> None:
    sub = submit(registry, settings, hires={"steps": 20, "denoisingStrength": 0.45,
                                            "upscaler": "lanczos", "sampler": "euler"})
    assert sub.task.hires == HiresFix(128, 128, "lanczos", 20, 0.45, "euler")
    assert sub.task.hires.denoising_steps == 9  # int(20 x 0.45), as diffusers runs it


@pytest.mark.parametrize(("hires", "words"), [
    ({"scale": 0.5}, "hires.scale must be between 1 and 4 (got 0.5)"),
    ({"scale": 5}, "hires.scale must be between 1 and 4"),
    ({"scale": 2, "width": 128}, "hires takes scale, or width and/or height, not both"),
    ({"upscaler": "Latent"}, "hires.upscaler must be one of: latent, latent-antialiased"),
    ({"steps": 0}, "hires.steps must be between 1 and 150"),
    ({"denoisingStrength": 1.5}, "hires.denoisingStrength must be between 0 and 1"),
    ({"sampler": "euler_x"}, "hires.sampler: Unknown sampler 'euler_x'"),
    ({"width": 100}, "hires.width must be a multiple of 8 for model tiny-sd (got 100; try 96)"),
    ({"width": 4096}, "each side must be between 64 and 2048"),
    ({"scale": 4}, "each side must be between 64 and 2048"),  # 4 x 1024: the max size rule
    ({"colour": "red"}, "Unknown field 'hires.colour'; valid fields are: denoisingStrength"),
    ({"scale": "2"}, "hires.scale must be a number"),
])
def test_a_bad_hires_field_is_a_400_naming_it(registry: Registry, settings: Settings,
                                              hires: dict[str, Any], words: str) -> None:
    body: dict[str, Any] = {"hires": hires}
    if hires == {"scale": 4}:
        body.update(width=1024, height=1024, steps=1)
    assert words in refused(registry, settings, **body)


def test_a_flow_matching_model_refuses_a_second_pass_sampler_it_cannot_take(
        registry: Registry, settings: Settings) -> None:
    message = refused(registry, settings, model="tiny-flux", sampler="euler",
                      hires={"sampler": "euler_a"})
    assert message.startswith("hires.sampler: Sampler 'euler_a' does not apply to model")


def test_only_text2img_takes_hires(registry: Registry, settings: Settings) -> None:
    with pytest.raises(InvalidRequest, match="Unknown field 'hires'"):
        submit(registry, settings, job_type=JobType.IMG2IMG, init_image="aGk=", hires={})


def test_hires_with_a_control_net_is_refused(registry: Registry, settings: Settings) -> None:
    message = refused(registry, settings, hires={},
                      controlNet={"model": "tiny-canny", "image": "aGk="})
    assert message == "hires cannot be combined with controlNet: leave one out"


def test_a_model_without_an_img2img_pipeline_refuses_hires_naming_itself(
        settings: Settings) -> None:
    registry = parse_registry({"models": [{"id": "null", "name": "Null", "source": "null",
                                           "description": "no model"}]})
    with pytest.raises(InvalidRequest) as exc:
        submit(registry, settings, served=frozenset({"null"}), model="null", hires={})
    assert "hires needs an img2img pipeline, which model 'null' does not have" in \
        exc.value.message


def test_the_work_budget_counts_both_passes(registry: Registry, settings: Settings) -> None:
    # 1024^2 x 100 steps = 105 megapixel-steps; a 2x pass at strength 0.7 adds 4.2 MP x 70.
    body = {"width": 1024, "height": 1024, "steps": 100}
    assert submit(registry, settings, **body).task.work == pytest.approx(104.8576)
    message = refused(registry, settings, hires={}, **body)
    assert message.startswith(
        "This request asks for (1024x1024 (1.05 megapixels) x 100 steps + a hires pass of "
        "2048x2048 (4.19 megapixels) x 70 steps) x 1 image(s) = 398 megapixel-steps, over "
        "the limit of 250")
    # A light second pass fits: 105 + 4.19 x 10 = 147.
    light = submit(registry, settings, hires={"denoisingStrength": 0.1}, **body)
    assert light.task.work == pytest.approx(104.8576 + 4.194304 * 10)


def test_batches_group_only_identical_hires_fixes(registry: Registry,
                                                  settings: Settings) -> None:
    plain = submit(registry, settings).task.batch_key()
    doubled = submit(registry, settings, hires={}, prompt="other", seed=9).task.batch_key()
    same = submit(registry, settings, hires={"scale": 2}).task.batch_key()
    softer = submit(registry, settings, hires={"denoisingStrength": 0.5}).task.batch_key()
    assert doubled == same
    assert len({plain, doubled, softer}) == 3


def test_the_hires_fix_survives_the_stores_round_trip(registry: Registry,
                                                      settings: Settings) -> None:
    task = submit(registry, settings, hires={"upscaler": "nearest"}).task
    assert task_from_json(task_to_json(task)) == task
    old = task_to_json(submit(registry, settings).task)
    del old["hires"]  # a record from before the hires fix
    assert task_from_json(old).hires is None


def test_cover_and_crop_keep_the_first_pass_aspect() -> None:
    assert target_size(64, 48, 8, scale=2) == (128, 96)
    # 512x512 to 1024x768: covered at 1024x1024, 128 rows cropped from each side.
    assert cover(512, 512, 1024, 768) == (1024, 1024)
    assert crop_box((1024, 1024), (1024, 768)) == (0, 128, 1024, 896)
    assert cover(512, 512, 1024, 768, unit=8) == (128, 128)
    assert cover(64, 48, 128, 96, unit=8) == (16, 12)


def test_openapi_documents_the_hires_object() -> None:
    schema = Text2ImgRequest.model_json_schema(by_alias=True)
    assert schema["properties"]["hires"]["anyOf"][0] == {"$ref": "#/$defs/HiresRequest"}
    hires = schema["$defs"]["HiresRequest"]["properties"]
    assert set(hires) == {"scale", "width", "height", "upscaler", "steps",
                          "denoisingStrength", "sampler"}
    assert hires["upscaler"]["default"] == "latent"
    assert hires["denoisingStrength"]["default"] == 0.7
    assert "latent-bicubic" in hires["upscaler"]["description"]
