"""A single original-layout `.safetensors` checkpoint loads offline with `from_single_file`
and makes exactly the images of the diffusers folder it was exported from."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from serve_app.errors import ConfigError
from serve_app.generation.ldm_checkpoint import export_ldm_checkpoint
from serve_app.generation.runner import ModelRunner
from serve_app.generation.tiny import ensure_tiny_model
from serve_app.registry import ModelSpec
from serve_app.settings import Settings
from tests.support.generation import make_task, tiny_settings, tiny_spec


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return tiny_settings(tmp_path_factory)


@pytest.fixture(scope="module")
def checkpoint(settings: Settings) -> Path:
    """tiny-sd exported as `<MODEL_PATH>/tiny-sd15.safetensors` + its config folder."""
    folder = ensure_tiny_model("tiny", tiny_spec().weights_path(settings))
    return export_ldm_checkpoint(folder, Path(settings.model_path) / "tiny-sd15.safetensors")


def file_spec(path: str) -> ModelSpec:
    return ModelSpec(id="sd15-file", name="SD 1.5 file", description="d", path=path)


def test_the_checkpoint_has_the_original_layout_and_its_folder_no_weights(
    checkpoint: Path,
) -> None:
    with safe_open(str(checkpoint), "pt") as f:
        keys = set(f.keys())
        attention = f.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()
    assert {key.split(".")[0] for key in keys} == {
        "model", "first_stage_model", "cond_stage_model"}
    assert {"model.diffusion_model.input_blocks.0.0.weight",
            "model.diffusion_model.middle_block.1.proj_in.weight",
            "model.diffusion_model.output_blocks.1.2.conv.weight",
            "model.diffusion_model.time_embed.0.weight",
            "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
            } <= keys
    assert len(attention) == 4  # stored as a 1x1 convolution, as the original code does
    configs = checkpoint.with_suffix("")
    assert (configs / "model_index.json").is_file() and (configs / "tokenizer").is_dir()
    assert not list(configs.rglob("*.safetensors"))


def test_a_single_file_loads_offline_and_makes_the_folder_models_images(
    settings: Settings, checkpoint: Path,
) -> None:
    single = ModelRunner(file_spec("tiny-sd15.safetensors"), settings)  # relative to MODEL_PATH
    folder = ModelRunner(tiny_spec(), settings)
    # Every weight is copied bit for bit (the 1x1-conv reshape is exact) and realigned in
    # memory (see pipelines.realign_weights): equal bytes.
    for seed in (1, 2):
        task = make_task(seed=seed, steps=2)
        assert single.generate(task).images == folder.generate(task).images


def test_a_single_file_without_its_config_folder_is_a_config_error_naming_it(
    settings: Settings, checkpoint: Path, tmp_path: Path,
) -> None:
    alone = tmp_path / "lonely.safetensors"
    shutil.copyfile(checkpoint, alone)
    with pytest.raises(ConfigError, match=r"configs .* in .*/lonely/"):
        ModelRunner(file_spec(str(alone)), settings)
