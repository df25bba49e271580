"""The benchmark suite (bench/, outside testpaths) stays importable, and bench/gpu.py runs
its smoke mode on a CPU on a machine without Ray."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_run_imports_and_parses_without_starting_anything() -> None:
    import bench.run

    opts = bench.run.parse_args(["--quick", "--only", "e2e", "--only", "scale"])
    assert opts.quick and opts.only == ["e2e", "scale"]
    for name in bench.run.FIGURES:  # each figure is a module with its run(ctx)
        module = importlib.import_module(f"bench.{name}")
        assert callable(module.run), name


def test_gpu_script_smoke_mode_runs_on_a_cpu_without_ray(tmp_path: Path) -> None:
    # A `ray` package that refuses to import, ahead of the real one: the script must
    # not need Ray (it runs on GPU machines that have torch only).
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "__init__.py").write_text(
        "raise ImportError('bench/gpu.py must not import ray')\n")
    env = os.environ | {"PYTHONPATH": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "bench/gpu.py", "--device", "cpu", "--tiny", "--steps", "1",
         "--batch-sizes", "1,2", "--repeats", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["ray_imported"] is False
    assert summary["flops"]["per_image"] > 0
    rows = {(r["variant"], r["batch"]) for r in summary["rows"]}
    assert rows == {("replica", 1), ("replica", 2)}
    assert all(r["images_per_s"] > 0 for r in summary["rows"])


def test_gpu_script_without_cuda_says_so_and_exits_cleanly() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the script would run the real benchmark")
    out = subprocess.run([sys.executable, "bench/gpu.py"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CUDA is not available" in out.stderr
    assert "skipped" in json.loads(out.stdout.strip().splitlines()[-1])


def test_the_service_shape_measures_tiny_sd_as_shipped_and_variants_say_what_differs() -> None:
    from bench.cluster import SHAPES, VARIANTS
    from serve_app.registry import load_registry, parse_registry

    shipped = load_registry(ROOT / "config" / "models.yaml").get("tiny-sd")
    for shape, changes in [("service", {}), *((f"service ({k})", v) for k, v in VARIANTS.items())]:
        bench_entry = parse_registry({"models": SHAPES[shape]["models"]}).get("tiny-sd")
        scaling = shipped.scaling.model_copy(
            update={k: v for k, v in changes.items() if k != "num_cpus"})
        assert bench_entry.scaling == scaling, shape
        assert bench_entry.resources.num_cpus == changes.get(
            "num_cpus", shipped.resources.num_cpus), shape
        assert (bench_entry.source, bench_entry.defaults) == (shipped.source, shipped.defaults)


def test_the_scale_figure_fills_the_store_through_its_current_api(tmp_path: Path) -> None:
    from bench.scale import Filler

    filler = Filler(tmp_path / "jobs.sqlite3")
    try:
        assert filler.fill_to(30)["records"] == 30
        assert filler.count() == 30
        assert filler.fill_to(30)["added"] == 0
    finally:
        filler.store.close()


def test_the_gpu_check_dry_run_runs_the_matrix_code_on_a_cpu_without_ray(
        tmp_path: Path) -> None:
    """The prepared GPU check (bench/gpucheck.py) on the tiny models: the SD 1.5 case's
    rows (batches as shipped, invariance on, DeepCache) and its JSON and Markdown."""
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "__init__.py").write_text(
        "raise ImportError('the GPU check must not need ray outside its serve case')\n")
    env = os.environ | {"PYTHONPATH": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "bench.gpucheck", "--dry-run", "--only", "sd15",
         "--out", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    (report_file,) = (tmp_path / "out").glob("*-gpucheck-dry.json")
    report = json.loads(report_file.read_text())
    rows = [r for r in report["rows"] if "s_per_image" in r]
    assert [(r["batch"], r.get("invariance") or r.get("step_cache")) for r in rows] == [
        (1, "auto (off)"), (2, "auto (off)"), (4, "auto (off)"), (8, "auto (off)"),
        (8, "on"), (1, "deepcache/3"), (8, "deepcache/3")]
    alone = {r["case"]: r for r in report["rows"] if "identical" in r}
    # On a CPU, invariance as shipped is on: a batched image is the lone one, bit for bit.
    assert alone["sd15-batched-vs-alone"]["identical"] is True
    assert report["summary"]["sd15_b1_s"] == rows[0]["s_per_image"]
    assert "| sd15 | 8 | 64 | 2 | deepcache/3 |" in report_file.with_suffix(".md").read_text()


def test_the_gpu_check_without_cuda_says_so_and_exits_cleanly(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run for real")
    out = subprocess.run([sys.executable, "-m", "bench.gpucheck", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "No CUDA device here" in out.stderr
    assert "skipped" in json.loads(out.stdout.strip().splitlines()[-1])
