"""Where each model runs, decided once at startup for the cluster the app is deployed on.

A registry entry says what a model asks for (`runtime.device`, `resources.num_gpus`); the
cluster says what there is. `place` resolves each entry:

- `device: auto` on a cluster with GPUs (IMAGEGEN_ACCELERATOR=auto finds them among Ray's
  nodes; `cuda` says so for an autoscaling cluster whose GPU nodes are not up yet): a real
  model asks Ray for its GPU (`num_gpus` from the registry, else 1) and runs in the half
  precision its family wants (`dtype: auto`). The embedded tiny models stay on CPUs (a GPU
  each for a test model would be waste) unless their entry asks for one.
- `device: auto` without GPUs: a real model runs on CPUs if its default job (its default
  size and steps) can finish within JOB_TIMEOUT on the CPUs its replica gets, estimated
  from its family's FLOPs per step (`STEP_TFLOP`) and this node's measured CPU speed;
  otherwise it is not served, and GET /models and every request for it say why and what to
  do. `device: cpu` serves it on CPUs regardless: the operator's explicit choice.
- `device: cuda`, or `num_gpus` above 0, on a cluster without GPUs: not served (a replica
  that can never be placed would hold its jobs until they time out).

The replica enforces the other half: one that was given a GPU and finds no CUDA fails its
start (`serve_app.generation.pipelines.resolve_device`), and Serve restarts it; it never
falls back to the CPU.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from serve_app.model_families import HALF_DTYPES, STEP_TFLOP
from serve_app.registry import ModelSpec, Registry

# The share of a CPU's dense matmul speed a denoiser step reaches (convolutions, attention,
# norms and memory traffic run below the GEMM peak).
CPU_EFFICIENCY = 0.5


@dataclass(frozen=True)
class Cluster:
    """What the app's models can be placed on."""

    gpus: bool
    # Dense float32 GFLOP/s of one CPU of this node, or None where no model needed it.
    cpu_gflops: float | None = None


def place(spec: ModelSpec, cluster: Cluster, job_timeout_s: float) -> tuple[ModelSpec, str | None]:
    """`spec` resolved for `cluster`, and why it cannot be served there (None: it can)."""
    runtime, resources = spec.runtime, spec.resources
    # `device: cpu` is kept as written, whatever Ray resources the model claims (a test
    # cluster's GPUs may be Ray resources only).
    wants_gpu = runtime.device == "cuda" or (runtime.device == "auto" and (
        resources.num_gpus > 0 or (cluster.gpus and not spec.is_tiny)))
    if wants_gpu:
        if not cluster.gpus:
            return spec, (
                f"Model {spec.id} needs a GPU (runtime.device {runtime.device!r}, num_gpus "
                f"{resources.num_gpus:g}) and this cluster has none: add GPU nodes (set "
                f"IMAGEGEN_ACCELERATOR=cuda when they join by autoscaling), or set "
                f"runtime.device: cpu and resources.num_gpus: 0 to serve it on CPUs")
        dtype = HALF_DTYPES[spec.pipeline] if runtime.dtype == "auto" else runtime.dtype
        return spec.model_copy(update={
            "runtime": runtime.model_copy(update={"device": "cuda", "dtype": dtype}),
            "resources": resources.model_copy(
                update={"num_gpus": resources.num_gpus or 1.0}),
        }), None
    placed = spec.model_copy(update={"runtime": runtime.model_copy(update={"device": "cpu"})})
    if runtime.device == "cpu" or spec.is_tiny or cluster.cpu_gflops is None:
        return placed, None
    seconds = cpu_seconds(spec, cluster.cpu_gflops)
    if seconds <= job_timeout_s:
        return placed, None
    d = spec.defaults
    return spec, (
        f"Model {spec.id} needs a GPU: its default job ({d.width}x{d.height}, {d.steps} "
        f"steps) would take ~{_duration(seconds)} on the {resources.num_cpus:g} CPU(s) of its "
        f"replica here (~{cluster.cpu_gflops:.0f} GFLOP/s each), over JOB_TIMEOUT "
        f"({job_timeout_s:g} s). Run it on a GPU node, or set runtime.device: cpu to serve "
        f"it on CPUs anyway")


def cpu_seconds(spec: ModelSpec, cpu_gflops: float) -> float:
    """Estimated seconds of `spec`'s default job on its replica's CPUs."""
    tflop, reference_pixels = STEP_TFLOP[spec.pipeline]
    d = spec.defaults
    flop = tflop * 1e12 * d.steps * (d.width * d.height) / reference_pixels
    speed = cpu_gflops * 1e9 * max(spec.resources.num_cpus, 1.0) * CPU_EFFICIENCY
    return flop / speed


def place_all(registry: Registry, cluster: Cluster, job_timeout_s: float) -> Registry:
    """The registry with every model placed; those that cannot be served keep their entry
    (GET /models lists them) and their reason in `unavailable`."""
    models: list[ModelSpec] = []
    unavailable = dict(registry.unavailable)
    for spec in registry.models:
        placed, reason = place(spec, cluster, job_timeout_s)
        models.append(placed)
        if reason is not None:
            unavailable[spec.id] = reason
    return registry.model_copy(update={"models": models, "unavailable": unavailable})


def needs_cpu_speed(registry: Registry) -> bool:
    """Whether placing `registry` without GPUs depends on the CPU's speed."""
    return any(m.runtime.device == "auto" and not m.is_tiny and m.resources.num_gpus == 0
               for m in registry.models)


def measure_cpu_gflops(seconds: float = 0.2) -> float:
    """Dense float32 GFLOP/s of one CPU: numpy matmuls across the node, divided by its CPUs."""
    import numpy as np

    n = 512
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a  # warm: the BLAS library's threads and buffers
    runs, began = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - began) < seconds:
        a @ a
        runs += 1
    return 2 * n**3 * runs / elapsed / 1e9 / (os.cpu_count() or 1)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
