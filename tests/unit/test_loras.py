"""Per-request LoRAs on the tiny seeded models: loaded once, switched per call, base weights
exact without them, batch-invariant with them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors.torch import save_file

from serve_app.errors import ModelNotAvailable
from serve_app.generation.runner import ModelRunner
from serve_app.messages import GenerationTask, JobType
from serve_app.settings import Settings
from tests.support.generation import (
    gradient,
    input_image,
    kohya_copy,
    make_task,
    tiny_settings,
    tiny_spec,
)

LORAS = [{"name": "style", "source": "tiny-lora", "seed": 1},
         {"name": "detail", "source": "tiny-lora", "seed": 2},
         {"name": "kohya-style", "path": "loras/kohya-style.safetensors", "format": "kohya"}]


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return tiny_settings(tmp_path_factory)


@pytest.fixture(scope="module")
def plain(settings: Settings) -> ModelRunner:
    """Never loads a LoRA: what the base weights make."""
    return ModelRunner(tiny_spec(), settings)


@pytest.fixture(scope="module")
def runner(settings: Settings) -> ModelRunner:
    return ModelRunner(tiny_spec(loras=LORAS[:2]), settings)


def lora_task(*loras: tuple[str, float], **fields: object) -> GenerationTask:
    return make_task(steps=3, loras=tuple(loras), **fields)


def test_scale_zero_and_no_lora_give_the_base_images_byte_for_byte(
        plain: ModelRunner, runner: ModelRunner) -> None:
    base = plain.generate(lora_task()).images
    assert runner.generate(lora_task(("style", 0.0))).images == base
    assert runner.generate(lora_task(("style", 1.0))).images != base
    # After a LoRA ran, a job without one runs the base weights exactly.
    assert runner.generate(lora_task()).images == base


def test_a_lora_is_deterministic_across_loads_and_two_combine(
        settings: Settings, runner: ModelRunner) -> None:
    style = runner.generate(lora_task(("style", 1.0))).images
    detail = runner.generate(lora_task(("detail", 1.0))).images
    both = runner.generate(lora_task(("style", 1.0), ("detail", 1.0))).images
    assert len({style[0], detail[0], both[0]}) == 3
    again = ModelRunner(tiny_spec(loras=LORAS[:2]), settings)
    assert again.generate(lora_task(("style", 1.0))).images == style
    # In any order: the replica applies a set in name order.
    assert again.generate(lora_task(("detail", 1.0), ("style", 1.0))).images == both
    assert runner.generate(lora_task(("style", 0.5))).images not in (style, both)


def test_each_lora_is_loaded_once_as_peft_layers_inside_the_batch_invariant_unet(
        runner: ModelRunner) -> None:
    runner.generate(lora_task(("style", 1.0), ("detail", 0.5)))
    runner.generate(lora_task(("style", 0.3)))
    assert runner._loras.loaded == ["style", "detail"]
    layers = [m for m in runner.pipeline.unet.modules() if isinstance(m, LoraLayer)]
    assert layers and all(set(m.lora_A) == {"style", "detail"} for m in layers)
    # PEFT's own linear layers got the per-image forward too (an instance attribute).
    assert all("forward" in m.lora_A["style"].__dict__ for m in layers)


def test_a_batch_with_loras_makes_each_image_it_makes_alone(runner: ModelRunner) -> None:
    loras = (("style", 0.8), ("detail", 0.4))
    tasks = [lora_task(*loras, job_id=f"j{i}", seed=20 + i, prompt=p, num_images=n)
             for i, (p, n) in enumerate([("a fox", 2), ("a boat", 1)])]
    assert len({t.batch_key() for t in tasks}) == 1
    batched = runner.generate_batch(tasks)
    alone = [runner.generate(t).images for t in tasks]
    assert [r.images for r in batched] == alone
    assert len({img for images in alone for img in images}) == 3


def test_jobs_with_other_lora_sets_do_not_share_a_call(runner: ModelRunner) -> None:
    tasks = [lora_task(("style", 1.0), job_id="a"), lora_task(("style", 0.5), job_id="b"),
             lora_task(job_id="c")]
    assert len({t.batch_key() for t in tasks}) == 3
    results = runner.generate_batch(tasks)  # run one after another, each with its own set
    assert [r.job_id for r in results] == ["a", "b", "c"]
    assert [r.images for r in results] == [runner.generate(t).images for t in tasks]


def test_a_kohya_lora_makes_the_image_of_the_same_weights_in_diffusers_format(
        settings: Settings, runner: ModelRunner) -> None:
    styled = runner.generate(lora_task(("style", 0.7))).images  # builds the diffusers file
    spec = runner.spec
    kohya_copy(spec.adapter_path(spec.lora("style"), settings) / "pytorch_lora_weights.safetensors",
               Path(settings.model_path) / "loras" / "kohya-style.safetensors")
    kohya = ModelRunner(tiny_spec(loras=LORAS), settings)
    assert kohya.generate(lora_task(("kohya-style", 0.7))).images == styled


def test_a_lora_whose_file_does_not_fit_fails_the_job_naming_it(settings: Settings) -> None:
    folder = Path(settings.model_path) / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    # An SDXL-shaped key set: the tiny SD UNet has no such layer.
    save_file({"unet.down_blocks.9.attentions.0.proj_in.lora_A.weight": torch.ones(4, 8),
               "unet.down_blocks.9.attentions.0.proj_in.lora_B.weight": torch.ones(8, 4)},
              str(folder / "other.safetensors"))
    entries = [{"name": "other", "path": "loras/other.safetensors"},
               {"name": "mislabelled", "path": "loras/other.safetensors", "format": "kohya"}]
    runner = ModelRunner(tiny_spec(loras=entries), settings)
    with pytest.raises(ModelNotAvailable, match=r"'mislabelled'.*looks like a diffusers LoRA"):
        runner.generate(lora_task(("mislabelled", 1.0)))
    with pytest.raises(ModelNotAvailable, match="LoRA 'other' cannot be loaded on model"):
        runner.generate(lora_task(("other", 1.0)))
    assert runner._loras.loaded == []
    assert runner.generate(lora_task()).images  # the model still runs


@pytest.mark.parametrize(("model_id", "source"), [("tiny-sdxl", "tiny-sdxl"),
                                                  ("tiny-flux", "tiny-flux"),
                                                  ("tiny-sd3", "tiny-sd3")])
def test_the_other_families_take_loras_too(settings: Settings, model_id: str,
                                           source: str) -> None:
    runner = ModelRunner(tiny_spec(model_id, source, loras=LORAS[:1]), settings)
    task = dataclasses.replace(lora_task(), steps=2, sampler="euler", guidance_scale=3.0)
    base = runner.generate(task).images
    assert runner.generate(dataclasses.replace(task, loras=(("style", 0.0),))).images == base
    styled = runner.generate(dataclasses.replace(task, loras=(("style", 1.0),))).images
    assert styled != base
    assert runner.generate(task).images == base


def test_img2img_and_inpainting_jobs_take_loras(settings: Settings, runner: ModelRunner) -> None:
    img2img = make_task(mode=JobType.IMG2IMG, init_image=input_image(gradient(64, 64)),
                        strength=0.6, steps=3)
    base = runner.generate(img2img).images
    assert runner.generate(dataclasses.replace(img2img, loras=(("style", 0.0),))).images == base
    assert runner.generate(dataclasses.replace(img2img, loras=(("style", 1.0),))).images != base
    inpainter = ModelRunner(tiny_spec("tiny-sd-inpaint", "tiny-inpaint", loras=LORAS[:1]),
                            settings)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpaint = dataclasses.replace(img2img, mode=JobType.INPAINT, mask_image=input_image(mask))
    plain = inpainter.generate(inpaint).images
    styled = inpainter.generate(dataclasses.replace(inpaint, loras=(("style", 1.0),))).images
    assert styled != plain
    assert inpainter.generate(inpaint).images == plain
