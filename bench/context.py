"""What the figures share during one run: options, a scratch directory, the one Ray +
Serve cluster (started on first use), and the in-process ModelRunner the e2e and batching
figures compare against."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cluster import SHAPES, BenchCluster, ray_processes
from bench.common import log


@dataclass
class Context:
    quick: bool
    workdir: Path
    profile_dir: Path | None = None
    _cluster: BenchCluster | None = None
    _runner: Any = None
    notes: list[str] = field(default_factory=list)

    @property
    def cluster(self) -> BenchCluster:
        if self._cluster is None:
            self._cluster = BenchCluster(self.workdir)
            self._cluster.start()
        return self._cluster

    def deploy(self, shape: str) -> str:
        if shape == "service" and self.cluster.shape != shape:
            self._prebuild_models()
        return self.cluster.deploy(shape)

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None

    def _prebuild_models(self) -> None:
        """Build the tiny models' weights before any replica needs them, so a cold start
        measures a replica start and a load, not a model build."""
        from serve_app.generation.tiny import ensure_tiny_model

        for entry in SHAPES["service"]["models"]:
            ensure_tiny_model(entry["source"], self.workdir / "models" / entry["id"])

    def runner(self) -> Any:
        """The service shape's tiny-sd in this process, through the replica's own code
        (`ModelRunner`), with as many torch threads as the replica gets from Ray."""
        if self._runner is None:
            import torch

            from serve_app.generation.runner import ModelRunner
            from serve_app.registry import parse_registry
            from serve_app.settings import load_settings

            args = self.cluster.app_args("service")
            settings = load_settings(args["settings"])
            spec = parse_registry(args["models"]).get("tiny-sd")
            threads = replica_threads(spec)
            torch.set_num_threads(threads)
            self._runner = ModelRunner(spec, settings, device="cpu")
            self._runner.warmup()
            log(f"in-process runner ready ({threads} torch thread(s), as the replica)")
        return self._runner

    def pids(self, *roles: str) -> dict[str, int]:
        procs = ray_processes()
        return {role: procs[role].pid for role in roles if role in procs}


def replica_threads(spec: Any) -> int:
    """The torch threads Ray gives a replica: OMP_NUM_THREADS is its whole num_cpus (at
    least 1). Read from the spec: /proc/<pid>/environ does not show what Ray sets."""
    return max(1, int(spec.resources.num_cpus))
