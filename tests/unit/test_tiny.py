"""The embedded tiny models: reproducible, loadable like real checkpoints, built safely."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from diffusers import FluxPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline

from serve_app.errors import ConfigError
from serve_app.generation import tiny
from serve_app.generation.tiny import (
    build_tiny_model,
    ensure_tiny_model,
    tokenizer_vocab,
    write_tokenizer_files,
)


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(("source", "weights"), [
    ("tiny", {"unet", "vae", "text_encoder", "safety_checker"}),
    ("tiny-inpaint", {"unet", "vae", "text_encoder", "safety_checker"}),
    ("tiny-sdxl", {"unet", "vae", "text_encoder", "text_encoder_2"}),
    ("tiny-flux", {"transformer", "vae", "text_encoder", "text_encoder_2"}),
    ("tiny-sd3", {"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}),
])
def test_two_builds_are_byte_identical(tmp_path: Path, source: str, weights: set[str]) -> None:
    first = digests(build_tiny_model(tmp_path / "a" / source, source))
    second = digests(build_tiny_model(tmp_path / "b" / source, source))
    assert {name.split("/")[0] for name in first if name.endswith(".safetensors")} == weights
    assert first == second


def test_tiny_model_loads_like_a_real_checkpoint(tmp_path: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(build_tiny_model(tmp_path / "tiny-sd"))
    assert pipe.vae_scale_factor == 8
    # As SD 1.x ships: a checker and its feature extractor (the runner drops them unless
    # ENABLE_NSFW_FILTER is set).
    assert type(pipe.safety_checker).__name__ == "StableDiffusionSafetyChecker"
    assert pipe.feature_extractor.crop_size == {"height": 32, "width": 32}
    assert pipe.unet.config.in_channels == 4
    assert pipe.tokenizer.model_max_length == 77
    ids = pipe.tokenizer("A red fox, jumping!", padding="max_length").input_ids
    assert len(ids) == 77
    assert ids[0] == pipe.tokenizer.bos_token_id
    assert pipe.tokenizer.unk_token_id not in ids[1 : ids.index(pipe.tokenizer.eos_token_id)]


def test_inpainting_variant_has_a_nine_channel_unet(tmp_path: Path) -> None:
    folder = build_tiny_model(tmp_path / "tiny-inpaint", "tiny-inpaint")
    pipe = StableDiffusionInpaintPipeline.from_pretrained(folder)
    assert pipe.unet.config.in_channels == 9


def test_the_t5_tokenizer_is_built_offline_and_round_trips_through_save_and_load(
    tmp_path: Path,
) -> None:
    folder = build_tiny_model(tmp_path / "tiny-flux", "tiny-flux")
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    t5 = pipe.tokenizer_2
    assert type(t5).__name__ == "T5Tokenizer" and t5.model_max_length == 512
    ids = t5("A red fox, jumping!").input_ids
    assert ids[-1] == t5.eos_token_id and t5.unk_token_id not in ids
    assert t5.convert_ids_to_tokens(ids[:3]) == ["\u2581A", "\u2581r", "e"]


def test_generated_vocab_is_byte_level_bpe(tmp_path: Path) -> None:
    vocab = tokenizer_vocab()
    assert len(vocab) == 256 * 2 + 2
    assert vocab["<|startoftext|>"] == 512 and vocab["<|endoftext|>"] == 513
    assert vocab["a</w>"] == vocab["a"] + 256
    vocab_path, merges_path = write_tokenizer_files(tmp_path)
    assert vocab_path.name == "vocab.json"
    assert merges_path.read_text() == "#version: 0.2\n"


def test_ensure_builds_only_when_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "tiny-sd"
    ensure_tiny_model("tiny", target)
    before = digests(target)

    def no_rebuild(*args: object, **kwargs: object) -> Path:
        raise AssertionError("rebuilt an existing model")

    monkeypatch.setattr(tiny, "build_tiny_model", no_rebuild)
    assert ensure_tiny_model("tiny", target) == target
    assert digests(target) == before


def test_concurrent_builders_produce_one_complete_model(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "tiny-sd"
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda _: build_tiny_model(target), range(3)))
    assert results == [target] * 3
    assert (target / "model_index.json").is_file()
    leftovers = [p.name for p in target.parent.iterdir() if ".build-" in p.name]
    assert leftovers == []


def test_an_empty_leftover_folder_is_replaced(tmp_path: Path) -> None:
    target = tmp_path / "tiny-sd"
    target.mkdir()
    ensure_tiny_model("tiny", target)
    assert (target / "model_index.json").is_file()


def test_a_foreign_folder_is_never_overwritten(tmp_path: Path) -> None:
    target = tmp_path / "tiny-sd"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds no model_index\.json"):
        ensure_tiny_model("tiny", target)
    assert (target / "notes.txt").read_text() == "mine"


def test_ensure_rejects_sources_that_are_not_tiny(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a tiny model source"):
        ensure_tiny_model("path", tmp_path / "x")
