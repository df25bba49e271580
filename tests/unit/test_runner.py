"""ModelRunner on the tiny seeded models: reproducibility, modes, progress, stopping."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from serve_app.errors import ConfigError, InvalidRequest
from serve_app.generation.pipelines import load_pipeline, resolve_device
from serve_app.generation.runner import Interrupted, ModelRunner
from serve_app.generation.tiny import build_tiny_ip_adapter
from serve_app.messages import GenerationTask, JobType, OutputFormat
from serve_app.model_runtime import Runtime
from serve_app.registry import ModelSpec
from serve_app.settings import Settings
from tests.support.generation import (
    gradient,
    input_image,
    make_task,
    noise,
    pixels,
    tiny_settings,
    tiny_spec,
    torch_threads,
)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return tiny_settings(tmp_path_factory)


@pytest.fixture(scope="module")
def runner(settings: Settings) -> ModelRunner:
    return ModelRunner(tiny_spec(), settings)


@pytest.fixture(scope="module")
def inpaint_runner(settings: Settings) -> ModelRunner:
    return ModelRunner(tiny_spec("tiny-sd-inpaint", "tiny-inpaint"), settings)


def counting_stop(after: int, calls: list[tuple[int, int]]) -> Callable[[], bool]:
    return lambda: len(calls) >= after


# -- reproducibility -------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(runner: ModelRunner) -> None:
    first = runner.generate(make_task(seed=7))
    again = runner.generate(make_task(seed=7))
    other = runner.generate(make_task(seed=8))
    assert first.images == again.images
    assert first.images != other.images


@pytest.mark.parametrize("sampler", ["euler_a", "dpm++_2m"])
def test_an_image_made_in_a_batch_equals_the_same_seed_made_alone(
    runner: ModelRunner, sampler: str
) -> None:
    batch = runner.generate(make_task(seed=100, num_images=3, sampler=sampler))
    alone = [runner.generate(make_task(seed=s, sampler=sampler)).images[0] for s in batch.seeds]
    assert batch.seeds == [100, 101, 102]
    assert batch.images == alone
    assert len(set(batch.images)) == 3


def test_result_describes_the_run(runner: ModelRunner) -> None:
    result = runner.generate(make_task(seed=5, num_images=2))
    assert result.seeds == [5, 6]
    assert len(result.images) == 2
    assert result.content_type == "image/png"
    assert result.model == "tiny-sd"
    assert result.nsfw_detected == []  # no safety checker: no flags
    assert result.time_taken_ms > 0


@pytest.mark.parametrize("fmt", list(OutputFormat))
def test_output_formats_decode_to_the_requested_size(
    runner: ModelRunner, fmt: OutputFormat
) -> None:
    result = runner.generate(make_task(width=96, height=64, output_format=fmt, quality=80))
    with Image.open(io.BytesIO(result.images[0])) as img:
        assert img.format == fmt.value.upper()
        assert img.size == (96, 64)
    assert result.content_type == f"image/{fmt.value}"


# -- progress and stopping --------------------------------------------------------------


def test_progress_is_reported_after_every_step(runner: ModelRunner) -> None:
    calls: list[tuple[int, int]] = []
    runner.generate(make_task(steps=5, sampler="euler"), on_step=lambda s, t: calls.append((s, t)))
    assert calls == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]


def test_should_stop_interrupts_mid_run(runner: ModelRunner) -> None:
    calls: list[tuple[int, int]] = []
    with pytest.raises(Interrupted, match="after 3 step"):
        runner.generate(
            make_task(steps=20),
            on_step=lambda s, t: calls.append((s, t)),
            should_stop=counting_stop(3, calls),
        )
    assert calls == [(1, 20), (2, 20), (3, 20)]
    assert len(runner.generate(make_task(steps=2)).images) == 1  # usable afterwards


def test_a_task_stopped_before_it_starts_runs_no_step(runner: ModelRunner) -> None:
    calls: list[tuple[int, int]] = []
    with pytest.raises(Interrupted, match="before it started"):
        runner.generate(
            make_task(), on_step=lambda s, t: calls.append((s, t)), should_stop=lambda: True
        )
    assert calls == []


def test_concurrent_calls_are_serialized_and_unmixed(runner: ModelRunner) -> None:
    tasks = [make_task(seed=s, prompt=p) for s, p in ((1, "a boat"), (2, "a tree"))]
    expected = [runner.generate(t).images for t in tasks]
    got: dict[int, list[bytes]] = {}
    threads = [
        threading.Thread(target=lambda i=i: got.__setitem__(i, runner.generate(tasks[i]).images))
        for i in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[0], got[1]] == expected


# -- img2img and inpainting ----------------------------------------------------------------


def test_img2img_follows_the_init_image_at_the_task_size(runner: ModelRunner) -> None:
    def run(init: Image.Image) -> bytes:
        task = make_task(mode=JobType.IMG2IMG, init_image=input_image(init), strength=0.6, steps=5)
        return runner.generate(task).images[0]

    first, again, other = run(noise(100, 80)), run(noise(100, 80)), run(gradient(100, 80))
    assert pixels(first).shape == (64, 64, 3)
    assert first == again
    assert first != other


@pytest.mark.parametrize("which", ["runner", "inpaint_runner"])
def test_inpainting_repaints_inside_the_mask_only(
    which: str, request: pytest.FixtureRequest
) -> None:
    model: ModelRunner = request.getfixturevalue(which)
    image = gradient(64, 64)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    task = make_task(
        mode=JobType.INPAINT,
        init_image=input_image(image),
        mask_image=input_image(Image.fromarray(mask, "L")),
        strength=1.0,
    )
    out = pixels(model.generate(task).images[0])
    original = np.asarray(image, dtype=np.int16)
    inside = mask == 255
    assert np.array_equal(out[~inside], original[~inside])
    assert np.abs(out[inside] - original[inside]).mean() > 10


def test_a_nine_channel_model_serves_text2img_and_img2img(inpaint_runner: ModelRunner) -> None:
    text = inpaint_runner.generate(make_task(num_images=2))
    init = input_image(gradient(64, 64))
    img2img = inpaint_runner.generate(
        make_task(mode=JobType.IMG2IMG, init_image=init, strength=0.5)
    )
    assert len(text.images) == 2 and len(set(text.images)) == 2
    assert pixels(img2img.images[0]).shape == (64, 64, 3)


def test_a_missing_input_image_is_an_invalid_request(runner: ModelRunner) -> None:
    with pytest.raises(InvalidRequest, match="img2img needs 'init_image'"):
        runner.generate(make_task(mode=JobType.IMG2IMG))


def test_a_size_the_vae_cannot_take_is_an_invalid_request(runner: ModelRunner) -> None:
    with pytest.raises(InvalidRequest, match="multiples of 8"):
        runner.generate(make_task(width=100))


# -- style transfer -----------------------------------------------------------------------


def style_task(
    content: Image.Image, style: Image.Image, strength: float, **kw: object
) -> GenerationTask:
    return make_task(
        mode=JobType.STYLE_TRANSFER,
        prompt="",
        init_image=input_image(content),
        style_image=input_image(style),
        style_strength=strength,
        content_strength=0.3,
        steps=6,
        **kw,
    )


def test_adain_style_transfer_properties(runner: ModelRunner) -> None:
    content = gradient(64, 64)
    # A style image of another shape and a larger area: only its statistics are used.
    noisy, flat = noise(64, 64, seed=3), Image.new("RGB", (300, 120), (200, 40, 40))
    first = runner.generate(style_task(content, noisy, 0.8)).images[0]
    again = runner.generate(style_task(content, noisy, 0.8)).images[0]
    other_style = runner.generate(style_task(content, flat, 0.8)).images[0]
    assert first == again
    assert first != other_style
    unstyled = pixels(runner.generate(style_task(content, noisy, 0.0)).images[0])
    assert np.abs(unstyled - np.asarray(content, dtype=np.int16)).mean() < 1.0


def test_ip_adapter_style_transfer(settings: Settings, tmp_path: Path, runner: ModelRunner) -> None:
    weights, encoder = build_tiny_ip_adapter(tmp_path / "ip")
    spec = tiny_spec(ip_adapter=str(weights), image_encoder=str(encoder))
    model = ModelRunner(spec, settings)
    plain_before = model.generate(make_task(seed=9)).images
    content = gradient(64, 64)
    first = model.generate(style_task(content, noise(64, 64), 0.8, num_images=2))
    other = model.generate(
        style_task(content, Image.new("RGB", (64, 64), "blue"), 0.8, num_images=2)
    )
    again = model.generate(style_task(content, noise(64, 64), 0.8, num_images=2))
    assert first.images == again.images
    assert first.images[0] != other.images[0]
    # The adapter is attached only during style calls: plain text2img is unaffected.
    assert model.generate(make_task(seed=9)).images == plain_before
    assert plain_before == runner.generate(make_task(seed=9)).images


# -- loading and runtime knobs -----------------------------------------------------------------


def test_runtime_knobs_apply_on_a_cpu(settings: Settings) -> None:
    runtime = Runtime(
        device="auto",
        dtype="float16",
        channels_last=True,
        compile=True,
        vae_tiling=True,
        vae_slicing=True,
        attention_slicing=True,
    )
    model = ModelRunner(tiny_spec(runtime=runtime), settings, device="cpu")
    assert (model.device, model.dtype) == ("cpu", torch.float32)  # half precision is CUDA-only
    assert model.pipeline.vae.use_tiling
    assert len(model.generate(make_task(steps=2)).images) == 1


def test_an_injected_loader_builds_the_pipeline(settings: Settings) -> None:
    seen: list[tuple[str, str, torch.dtype]] = []

    def loader(spec: ModelSpec, s: Settings, device: str, dtype: torch.dtype) -> DiffusionPipeline:
        seen.append((spec.id, device, dtype))
        return load_pipeline(spec, s, device, dtype)

    model = ModelRunner(tiny_spec(), settings, device="cpu", loader=loader)
    model.warmup()
    assert seen == [("tiny-sd", "cpu", torch.float32)]


def test_weights_that_are_neither_folder_nor_checkpoint_are_a_config_error(
    settings: Settings, tmp_path: Path
) -> None:
    spec = ModelSpec(id="real", name="Real", description="d", path=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="neither a diffusers folder nor"):
        ModelRunner(spec, settings)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_replica_given_a_gpu_without_cuda_fails_its_start_instead_of_using_the_cpu(
        settings: Settings) -> None:
    assert resolve_device("auto") == "cpu"
    with pytest.raises(RuntimeError, match="refusing to run on the CPU"):
        resolve_device("cuda")
    spec = tiny_spec(runtime={"device": "cuda"})  # as placement resolves a GPU model
    with pytest.raises(RuntimeError, match="no CUDA device"):
        ModelRunner(spec, settings)


@pytest.mark.parametrize("sampler", ["euler_a", "dpm++_2m", "ddim"])
def test_jobs_batched_into_one_call_equal_each_job_made_alone(
    runner: ModelRunner, sampler: str
) -> None:
    tasks = [
        make_task(job_id="a", prompt="a red barn", seed=3, sampler=sampler),
        make_task(job_id="b", prompt="a blue sea", seed=9, num_images=2, sampler=sampler,
                  negative_prompt="blurry"),
        make_task(job_id="c", prompt="a red barn", seed=11, sampler=sampler),
    ]
    steps: list[tuple[int, int]] = []
    batched = runner.generate_batch(tasks, on_step=lambda s, t: steps.append((s, t)))
    alone = [runner.generate(t) for t in tasks]
    assert [r.job_id for r in batched] == ["a", "b", "c"]
    assert [r.seeds for r in batched] == [[3], [9, 10], [11]]
    assert [r.images for r in batched] == [r.images for r in alone]
    assert len(steps) == len({s for s, _ in steps})  # one progress stream for the batch


def test_incompatible_tasks_in_a_batch_run_one_after_another(runner: ModelRunner) -> None:
    tasks = [make_task(job_id="a"), make_task(job_id="b", width=128)]
    results = runner.generate_batch(tasks)
    assert [r.job_id for r in results] == ["a", "b"]
    assert results[1].images == runner.generate(tasks[1]).images


def test_close_releases_the_pipelines(settings: Settings) -> None:
    own = ModelRunner(tiny_spec(), settings)
    own.generate(make_task(steps=1))
    own.close()
    with pytest.raises(RuntimeError, match="unloaded"):
        own.generate(make_task(steps=1))


@pytest.mark.parametrize("threads", [1, 2])
def test_eight_batched_jobs_equal_alone_at_any_thread_count(
    runner: ModelRunner, threads: int
) -> None:
    # A replica with num_cpus 1 runs torch on one thread, where kernels pick other paths
    # by shape than at two: identity must hold for both.
    with torch_threads(threads):
        tasks = [make_task(job_id=str(i), seed=i, prompt=f"p{i}", steps=3, width=128,
                           height=128) for i in range(8)]
        batched = runner.generate_batch(tasks)
        assert [r.images for r in batched] == [runner.generate(t).images for t in tasks]


def test_a_repeated_prompt_reuses_its_embeddings_and_makes_the_same_image(
    settings: Settings,
) -> None:
    own = ModelRunner(tiny_spec(), settings)
    first = own.generate(make_task(prompt="a quiet harbour", seed=4))
    again = own.generate(make_task(prompt="a quiet harbour", seed=4))
    assert (own._modes.prompts.misses, own._modes.prompts.hits) == (1, 1)
    fresh = ModelRunner(tiny_spec(), settings).generate(make_task(prompt="a quiet harbour",
                                                                  seed=4))
    assert first.images == again.images == fresh.images


def test_pipelines_keep_their_diffusers_class_with_the_device_pinned(runner: ModelRunner) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    base, img2img = runner.pipeline, runner._modes.pipes.img2img()
    assert isinstance(base, StableDiffusionPipeline)
    assert isinstance(img2img, StableDiffusionImg2ImgPipeline)
    assert type(base).__name__ == "StableDiffusionPipeline"
    assert base._execution_device == img2img._execution_device == torch.device("cpu")


def test_small_images_run_on_one_cpu_thread_and_the_count_comes_back() -> None:
    from serve_app.generation.steps import cpu_threads

    with torch_threads(2):
        seen = {}
        for size in (64, 128):
            with cpu_threads("cpu", make_task(width=size, height=size)):
                seen[size] = torch.get_num_threads()
        assert seen == {64: 1, 128: 2} and torch.get_num_threads() == 2
