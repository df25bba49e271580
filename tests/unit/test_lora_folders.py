"""LoRA folders: files found by stem with their format read from the header, rescanned on a
timer and on an unknown name, validated at the ingress with near matches, loaded on first
use by the replica and kept in a capped LRU."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from serve_app.api.submission import build_submission
from serve_app.errors import InvalidRequest
from serve_app.lora_folders import LoraFolders, find_lora, header_format, model_loras
from serve_app.messages import JobType
from serve_app.registry import parse_registry
from serve_app.settings import Settings

ZERO = np.zeros((2, 2), dtype=np.float32)


def rewrite_in_place(path: Path, kind: str, scratch: Path) -> None:
    """New contents for `path` written into the same file (its folder is unchanged)."""
    path.write_bytes(write_lora(scratch / path.name, kind).read_bytes())


def write_lora(path: Path, kind: str = "kohya") -> Path:
    keys = {"kohya": ["lora_unet_down_blocks_0.lora_down.weight", "lora_unet_down_blocks_0.alpha"],
            "diffusers": ["unet.down_blocks.0.to_q.lora_A.weight"],
            "other": ["model.diffusion_model.weight"]}[kind]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: ZERO for k in keys}, str(path))
    return path


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_folders_files_are_loras_by_stem_with_their_format(tmp_path: Path) -> None:
    write_lora(tmp_path / "ink.safetensors")
    write_lora(tmp_path / "film-grain.safetensors", "diffusers")
    write_lora(tmp_path / "a-checkpoint.safetensors", "other")
    (tmp_path / "half.safetensors").write_bytes(b"\x10\x00")  # a copy in progress
    (tmp_path / "notes.txt").write_text("not a LoRA")
    found = LoraFolders().loras([tmp_path])
    assert {n: lo.format for n, lo in found.items()} == {"ink": "kohya",
                                                         "film-grain": "diffusers"}
    assert found["ink"].path == str((tmp_path / "ink.safetensors").resolve())
    assert header_format(tmp_path / "half.safetensors") == "unknown"


def test_a_file_added_shows_at_once_and_one_rewritten_in_place_after_the_period(
        tmp_path: Path) -> None:
    clock = Clock()
    folders = LoraFolders(clock=clock, rescan_s=10)
    (tmp_path / "scratch").mkdir()
    assert folders.loras([tmp_path]) == {}
    write_lora(tmp_path / "late.safetensors")  # the folder's mtime changes: a rescan
    assert {n: lo.format for n, lo in folders.loras([tmp_path]).items()} == {"late": "kohya"}
    stamp = tmp_path.stat().st_mtime_ns
    rewrite_in_place(tmp_path / "late.safetensors", "diffusers", tmp_path / "scratch")
    assert tmp_path.stat().st_mtime_ns == stamp
    clock.now += 5
    assert folders.loras([tmp_path])["late"].format == "kohya"  # the last scan is 5 s old
    clock.now += 5
    assert folders.loras([tmp_path])["late"].format == "diffusers"


def test_an_unknown_name_rescans_at_most_once_a_second(tmp_path: Path) -> None:
    clock = Clock()
    folders = LoraFolders(clock=clock, rescan_s=10)
    (tmp_path / "scratch").mkdir()
    write_lora(tmp_path / "old.safetensors", "other")  # not a LoRA: left out
    assert folders.find([tmp_path], "old") is None
    rewrite_in_place(tmp_path / "old.safetensors", "kohya", tmp_path / "scratch")
    assert folders.find([tmp_path], "old") is None  # the miss's rescan was 0 s ago
    clock.now += 1.5
    assert folders.find([tmp_path], "old") is not None


def test_two_hundred_files_are_listed(tmp_path: Path) -> None:
    for i in range(200):
        write_lora(tmp_path / f"style-{i:03d}.safetensors", "kohya" if i % 2 else "diffusers")
    found = LoraFolders().loras([tmp_path])
    assert len(found) == 200 and found["style-007"].format == "kohya"


def folder_registry(folder: Path) -> Any:
    return parse_registry({
        "pools": [{"id": "p", "lora_dirs": [str(folder / "shared")]}],
        "models": [{"id": "m", "name": "m", "description": "d", "source": "tiny",
                    "pool": "p", "lora_dirs": [str(folder / "own")],
                    "loras": [{"name": "ink", "source": "tiny-lora", "seed": 1}]}]})


def test_registry_loras_come_first_then_the_models_folders_then_its_pools(
        tmp_path: Path) -> None:
    write_lora(tmp_path / "own" / "ink.safetensors")  # shadowed by the registry's
    write_lora(tmp_path / "own" / "grain.safetensors")
    write_lora(tmp_path / "shared" / "grain.safetensors", "diffusers")
    write_lora(tmp_path / "shared" / "bloom.safetensors")
    spec = folder_registry(tmp_path).get("m")
    assert spec.lora_dirs == (str(tmp_path / "own"), str(tmp_path / "shared"))
    loras = model_loras(spec, "", LoraFolders())
    assert [(lo.name, lo.source, lo.format) for lo in loras] == [
        ("ink", "tiny-lora", "diffusers"), ("bloom", "path", "kohya"),
        ("grain", "path", "kohya")]
    assert find_lora(spec, "bloom", "", LoraFolders()) is not None


def test_an_unknown_folder_lora_is_a_400_naming_near_matches(
        tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    import serve_app.lora_folders

    clock = Clock()
    monkeypatch.setattr(serve_app.lora_folders, "FOLDERS", LoraFolders(clock=clock))
    registry = folder_registry(tmp_path)
    write_lora(tmp_path / "own" / "watercolour-v2.safetensors")
    write_lora(tmp_path / "shared" / "detail-tweaker.safetensors")

    def submit(name: str) -> Any:
        return build_submission(JobType.TEXT2IMG, {"prompt": "x", "model": "m",
                                                   "loras": [{"name": name, "scale": 0.5}]},
                                settings=settings, registry=registry, served=frozenset({"m"}))
    assert submit("watercolour-v2").task.loras == (("watercolour-v2", 0.5),)
    with pytest.raises(InvalidRequest) as err:
        submit("watercolor-v2")
    assert "did you mean watercolour-v2?" in str(err.value)
    write_lora(tmp_path / "shared" / "fresh.safetensors")  # copied in while serving
    assert submit("fresh").task.loras == (("fresh", 0.5),)


def test_a_folder_lora_loads_on_first_use_and_the_lru_keeps_the_cap(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    from serve_app.generation.runner import ModelRunner
    from serve_app.generation.tiny_adapters import write_tiny_lora
    from tests.support.generation import make_task, tiny_settings, tiny_spec

    settings = tiny_settings(tmp_path_factory).model_copy(update={"max_loaded_loras": 1})
    folder = tmp_path / "loras"
    runner = ModelRunner(tiny_spec("folder-model", lora_dirs=(str(folder),)), settings,
                         device="cpu")
    base = runner.generate(make_task(steps=2)).images
    for seed, name in ((1, "first"), (2, "second")):
        write_tiny_lora(tmp_path / name, runner.pipeline, "unet", seed)
        folder.mkdir(exist_ok=True)
        shutil.copy(tmp_path / name / "pytorch_lora_weights.safetensors",
                    folder / f"{name}.safetensors")
    first = runner.generate(make_task(steps=2, loras=(("first", 0.8),))).images
    second = runner.generate(make_task(steps=2, loras=(("second", 0.8),))).images
    assert len({base[0], first[0], second[0]}) == 3
    assert runner._loras.loaded == ["second"]  # the cap is 1: first was unloaded
    again = runner.generate(make_task(steps=2, loras=(("first", 0.8),))).images
    assert again == first  # reloaded from the file, the same image
    assert runner.generate(make_task(steps=2)).images == base


def test_each_of_two_hundred_folder_loras_loads_on_first_use(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """200 files (one LoRA's weights, half of them under kohya names) in a model's folder:
    each name is loaded from its file the first time a task names it, and each gives the
    image of those weights; the LRU keeps `max_loaded_loras` of them."""
    from serve_app.generation.runner import ModelRunner
    from serve_app.generation.tiny_adapters import write_tiny_lora
    from tests.support.generation import kohya_copy, make_task, tiny_settings, tiny_spec

    settings = tiny_settings(tmp_path_factory).model_copy(update={"max_loaded_loras": 4})
    folder = tmp_path / "loras"
    runner = ModelRunner(tiny_spec("folder-model", lora_dirs=(str(folder),)), settings,
                         device="cpu")
    write_tiny_lora(tmp_path / "weights", runner.pipeline, "unet", 3)
    weights = tmp_path / "weights" / "pytorch_lora_weights.safetensors"
    folder.mkdir()
    names = [f"style-{i:03d}" for i in range(200)]
    for i, name in enumerate(names):
        if i % 2:
            kohya_copy(weights, folder / f"{name}.safetensors")
        else:
            shutil.copy(weights, folder / f"{name}.safetensors")
    loads: list[str] = []
    load = runner._loras._load
    runner._loras._load = lambda name: (loads.append(name), load(name))[1]  # type: ignore[method-assign]

    def draw(*loras: tuple[str, float]) -> list[bytes]:
        return runner.generate(make_task(steps=1, width=32, height=32, loras=loras)).images

    base = draw()
    # Every name is named by a task; two in twenty of those tasks draw, one of each format
    # (the load is what costs here, ~0.1 s each: diffusers' PEFT injection).
    styled = {}
    for i, name in enumerate(names):
        if i % 20 in (0, 1):
            styled[name] = draw((name, 0.8))
        else:
            runner._loras.activate(((name, 0.8),))
    assert loads == names  # each one loaded once, when first named
    assert len({tuple(images) for images in styled.values()}) == 1  # both formats alike
    assert styled[names[0]] != base
    assert runner._loras.loaded == names[-4:]
