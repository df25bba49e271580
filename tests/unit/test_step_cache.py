"""Step caching (serve_app/generation/step_cache.py) on the embedded tiny models: the cached
UNet step computes exactly what the whole UNet does from the same features, full steps come
on a fixed schedule, a batch still equals its images made alone, and the transformer
families' diffusers hooks run, skip work and start every call afresh."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from serve_app.errors import ConfigError
from serve_app.generation.pipelines import load_pipeline
from serve_app.generation.runner import ModelRunner
from serve_app.generation.step_cache import DeepCache
from serve_app.settings import Settings
from tests.support.generation import make_task, tiny_settings, tiny_spec

DEEP = {"step_cache": {"kind": "deepcache", "every": 3}}


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return tiny_settings(tmp_path_factory)


def runner(settings: Settings, model_id: str = "tiny-sd", source: str = "tiny",
           **runtime: Any) -> ModelRunner:
    return ModelRunner(tiny_spec(model_id, source, runtime=runtime), settings)


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize(("model_id", "source"), [("tiny-sd", "tiny"),
                                                  ("tiny-sdxl", "tiny-sdxl")])
def test_a_cached_step_computes_what_the_whole_unet_does_from_the_same_features(
        settings: Settings, model_id: str, source: str) -> None:
    pipe = load_pipeline(tiny_spec(model_id, source), settings, "cpu", torch.float32)
    unet = pipe.unet
    cache = DeepCache(unet, every=2)
    gen = torch.Generator().manual_seed(3)
    sample = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.randn(2, 77, int(unet.config.cross_attention_dim), generator=gen)
    extra: dict[str, Any] = {}
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text and time ids
        width = int(unet.config.projection_class_embeddings_input_dim) - 6 * int(
            unet.config.addition_time_embed_dim)
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(2, width, generator=gen),
                                      "time_ids": torch.randn(2, 6, generator=gen)}
    with torch.no_grad(), cache.call():
        whole = unet(sample, 500, context, **extra).sample  # step 0: full, keeps features
        kept = cache._kept
        assert kept is not None
        shallow = cache._shallow(sample, 500, context, kept, **extra).sample
    assert torch.equal(whole, shallow)


def test_full_steps_come_every_n_and_the_deep_layers_run_only_then(settings: Settings) -> None:
    r = runner(settings, **DEEP)
    unet = r.pipeline.unet
    mids: list[int] = []
    unet.mid_block.register_forward_pre_hook(lambda *_: mids.append(1))
    r.generate(make_task(steps=7))
    cache = r._loaded().pipes.step_cache
    assert cache.full_steps == 3  # steps 0, 3 and 6
    assert len(mids) == 3


def test_with_deepcache_a_batch_still_equals_its_images_made_alone(settings: Settings) -> None:
    r = runner(settings, **DEEP)
    tasks = [make_task(job_id=f"j{i}", seed=10 + i, steps=6) for i in range(3)]
    batched = r.generate_batch(tasks)
    alone = [r.generate(t) for t in tasks]
    assert [b.images for b in batched] == [a.images for a in alone]
    assert r.generate(tasks[0]).images == alone[0].images  # and again: nothing carried over


def test_deepcache_changes_the_image_a_little_not_what_it_shows(settings: Settings) -> None:
    task = make_task(steps=9, width=64, height=64)
    cached = png(runner(settings, **DEEP).generate(task).images[0])
    plain = png(runner(settings).generate(task).images[0])
    assert not np.array_equal(cached, plain)
    assert np.abs(cached - plain).mean() < 40  # of 255: the tiny model's noise, not a picture


@pytest.mark.parametrize(("model_id", "source", "cache", "error"), [
    ("tiny-flux", "tiny-flux", {"kind": "deepcache"}, "is for UNet models"),
    ("tiny-sd", "tiny", {"kind": "taylorseer"}, "is for transformer models"),
    ("tiny-sd3", "tiny-sd3", {"kind": "first_block"}, "does not apply to SD 3"),
])
def test_a_cache_for_the_other_kind_of_denoiser_is_refused_naming_the_right_one(
        settings: Settings, model_id: str, source: str, cache: dict[str, Any],
        error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        runner(settings, model_id, source, step_cache=cache)


@pytest.fixture
def attention_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    calls: list[int] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    yield calls


@pytest.mark.parametrize(("model_id", "source", "cache"), [
    ("tiny-flux", "tiny-flux", {"kind": "taylorseer", "every": 3}),
    ("tiny-flux", "tiny-flux", {"kind": "first_block", "threshold": 0.5}),
    ("tiny-sd3", "tiny-sd3", {"kind": "taylorseer", "every": 3}),
])
def test_transformer_caches_skip_work_and_start_each_call_afresh(
        settings: Settings, attention_calls: list[int], model_id: str, source: str,
        cache: dict[str, Any]) -> None:
    task = make_task(steps=8, width=64, height=64, guidance_scale=3.5, sampler="euler")
    plain = runner(settings, model_id, source)
    attention_calls.clear()
    reference = plain.generate(task).images
    uncached = len(attention_calls)
    cached = runner(settings, model_id, source, step_cache=cache)
    attention_calls.clear()
    first = cached.generate(task).images
    assert len(attention_calls) < uncached
    assert cached.generate(task).images == first  # the cache's state was reset between calls
    assert first != reference
