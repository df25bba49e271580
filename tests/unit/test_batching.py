"""Batch-invariant layers: a UNet run on a whole batch gives each image the exact bits of an
unbatched run, at one and two torch threads (a replica with num_cpus 1 runs on one)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from diffusers import UNet2DConditionModel

from serve_app.generation.batching import BatchInvariantDenoiser, invariant_layers
from serve_app.generation.pipelines import load_pipeline
from serve_app.settings import Settings
from tests.support.generation import (
    tiny_settings,
    tiny_spec,
    torch_threads,
)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return tiny_settings(tmp_path_factory)


def fresh_unet(settings: Settings, model_id: str = "tiny-sd", source: str = "tiny"
               ) -> UNet2DConditionModel:
    unet = load_pipeline(tiny_spec(model_id, source), settings, "cpu", torch.float32).unet
    assert isinstance(unet, UNet2DConditionModel)
    return unet


@pytest.fixture
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    with torch_threads(request.param):
        yield request.param


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize(("model_id", "source", "size"), [
    ("tiny-sd", "tiny", 16), ("tiny-sd", "tiny", 8), ("tiny-sd-inpaint", "tiny-inpaint", 16),
])
def test_a_batch_of_sixteen_equals_eight_pairs_bit_for_bit(
    settings: Settings, threads: int, model_id: str, source: str, size: int
) -> None:
    unet = fresh_unet(settings, model_id, source)
    assert invariant_layers(unet) > 0
    channels = int(unet.config.in_channels)
    gen = torch.Generator().manual_seed(threads * 100 + size)
    sample = torch.randn(16, channels, size, size, generator=gen)
    context = torch.randn(16, 77, int(unet.config.cross_attention_dim), generator=gen)
    with torch.no_grad():
        whole = unet(sample, 500, encoder_hidden_states=context).sample
        pairs = [unet(sample[i:i + 2], 500, encoder_hidden_states=context[i:i + 2]).sample
                 for i in range(0, 16, 2)]
    assert all(torch.equal(whole[i:i + 2], pair) for i, pair in zip(range(0, 16, 2), pairs,
                                                                    strict=True))


def test_rewritten_layers_compute_what_the_originals_do() -> None:
    torch.manual_seed(0)
    linear, pointwise = torch.nn.Linear(8, 5), torch.nn.Conv2d(8, 5, 1)
    spatial = torch.nn.Conv2d(8, 5, 3, padding=1)
    model = torch.nn.ModuleList([linear, pointwise, spatial])
    inputs = {"2d": torch.randn(4, 8), "3d": torch.randn(4, 7, 8), "4d": torch.randn(4, 3, 7, 8)}
    image = torch.randn(4, 8, 6, 6)
    with torch.no_grad():
        expected = {k: linear(v) for k, v in inputs.items()}
        expected_conv, expected_spatial = pointwise(image), spatial(image)
        assert invariant_layers(model) == 2  # the 3x3 convolution is left alone
        for key, x in inputs.items():
            torch.testing.assert_close(linear(x), expected[key])
        torch.testing.assert_close(pointwise(image), expected_conv)
        assert torch.equal(spatial(image), expected_spatial)
        # Shapes the per-image form cannot take fall back to the original computation.
        assert linear(torch.randn(0, 3, 8)).shape == (0, 3, 5)
        torch.testing.assert_close(pointwise(image[0]), expected_conv[0])


def test_on_a_cpu_the_unet_runs_the_whole_batch_in_one_forward(settings: Settings) -> None:
    unet = fresh_unet(settings)
    wrapper = BatchInvariantDenoiser(unet)
    wrapper.blocks = 2
    calls: list[int] = []
    inner = wrapper._forward
    wrapper._forward = lambda sample, *a, **k: calls.append(len(sample)) or inner(sample, *a, **k)
    context = torch.randn(6, 77, int(unet.config.cross_attention_dim))
    with torch.no_grad():
        unet(torch.randn(6, 4, 8, 8), 10, encoder_hidden_states=context)
    assert not wrapper.split and calls == [6]


def test_split_mode_runs_a_transformer_per_image_with_its_shared_position_ids() -> None:
    # The GPU path, exercised on a CPU: FLUX's transformer takes keyword inputs only, and
    # its position ids have no batch dimension even when their length equals the batch.
    from serve_app.generation import tiny_parts

    transformer = tiny_parts.flux_transformer(text_width=32, pooled_width=32,
                                              guidance_embeds=True)
    wrapper = BatchInvariantDenoiser(transformer, on_cpu=False)
    assert wrapper.split
    calls: list[int] = []
    inner = wrapper._forward
    wrapper._forward = lambda **k: calls.append(len(k["hidden_states"])) or inner(**k)
    gen = torch.Generator().manual_seed(0)
    n, tokens, text = 4, 4, 3  # img_ids has as many rows as the batch has images
    inputs = {
        "hidden_states": torch.randn(n, tokens, 64, generator=gen),
        "encoder_hidden_states": torch.randn(n, text, 32, generator=gen),
        "pooled_projections": torch.randn(n, 32, generator=gen),
        "timestep": torch.full((n,), 0.5), "guidance": torch.full((n,), 3.5),
        "img_ids": torch.randn(tokens, 3, generator=gen), "txt_ids": torch.zeros(text, 3),
        "return_dict": False,
    }
    with torch.no_grad():
        whole = transformer(**inputs)[0]
        alone = [inner(**{k: v[i:i + 1] if k not in ("img_ids", "txt_ids", "return_dict")
                          else v for k, v in inputs.items()})[0] for i in range(n)]
    assert calls == [1] * n
    assert torch.equal(whole, torch.cat(alone))


class _Counted:
    """The denoiser's real forwards (under the invariance wrapper), with their rows."""

    def __init__(self, wrapper: BatchInvariantDenoiser) -> None:
        self.rows: list[int] = []
        inner = wrapper._forward

        def forward(*args, **kwargs):  # type: ignore[no-untyped-def]
            sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            self.rows.append(len(sample))
            return inner(*args, **kwargs)

        wrapper._forward = forward


def _runner_on_an_accelerator(settings: Settings, monkeypatch: pytest.MonkeyPatch,
                              **runtime: object):  # type: ignore[no-untyped-def]
    """The runner as it runs on CUDA (its device resolved to `cuda`: the accelerator's
    policies apply), its tensors on this CPU."""
    from serve_app.generation import runner as runner_module
    from serve_app.generation.runner import ModelRunner

    monkeypatch.setattr(runner_module, "resolve_device", lambda *_: "cuda")
    spec = tiny_spec(runtime=runtime) if runtime else tiny_spec()
    return ModelRunner(spec, settings,
                       loader=lambda s, st, _d, _t: load_pipeline(s, st, "cpu", torch.float32))


@pytest.mark.parametrize(("runtime", "forwards_per_step", "sliced"), [
    ({}, 1, False),  # as shipped (`auto`): the whole batch in one forward
    ({"batch_invariant": True}, 4, True),  # opted in: per-image sub-batches, VAE slicing
])
def test_on_an_accelerator_a_batch_runs_one_denoiser_forward_per_step_by_default(
        settings: Settings, monkeypatch: pytest.MonkeyPatch, runtime: dict[str, object],
        forwards_per_step: int, sliced: bool) -> None:
    from tests.support.generation import make_task

    runner = _runner_on_an_accelerator(settings, monkeypatch, **runtime)
    counted = _Counted(runner._loaded().pipes.denoiser)
    tasks = [make_task(job_id=f"j{i}", seed=i, steps=3) for i in range(4)]
    results = runner.generate_batch(tasks)
    assert len(results) == 4
    # Classifier-free guidance: each forward holds [uncond, cond] of its images.
    assert counted.rows == [8 // forwards_per_step] * (3 * forwards_per_step)
    assert runner.pipeline.vae.use_slicing is sliced


def test_the_per_image_split_copies_nothing_from_the_host_and_syncs_nothing() -> None:
    """Sub-batches are strided views of the batch: no index tensor is built per step (on
    CUDA each would be a host-to-device copy that waits for the stream), and no value is
    read back to the host."""
    from torch.overrides import TorchFunctionMode

    host_bound = {"tensor", "as_tensor", "item", "tolist", "cpu", "numpy", "__bool__",
                  "__int__", "__float__", "__index__", "nonzero"}
    seen: list[str] = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if getattr(func, "__name__", "") in host_bound:
                seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    model = torch.nn.Identity()
    wrapper = BatchInvariantDenoiser(model, on_cpu=False)
    wrapper.blocks = 2
    rows: list[torch.Tensor] = []
    wrapper._forward = lambda sample, *a, **k: rows.append(sample) or (sample * 2,)
    batch = torch.arange(8.0).reshape(8, 1)  # [uncond 0..3, cond 4..7]
    with Watch():
        out = wrapper._split_forward(batch, torch.ones(8), encoder_hidden_states=batch)
    assert seen == []
    assert [r.flatten().tolist() for r in rows] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert torch.equal(out[0], batch * 2)
