"""Imports go one way: api -> jobs -> stores; only generation loads torch; no cycles.

The rules are checked on the source (module-level imports, read with `ast`), and the torch
rule also by importing each module in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("serve_app", "deployments")
# What each layer may import of the project (module prefixes). The kernel (errors, settings,
# registry, messages) is shared by all; the composers (builder, cli) may import anything.
KERNEL = ("serve_app.errors", "serve_app.settings", "serve_app.registry", "serve_app.messages",
          "serve_app.credentials", "serve_app.model_families", "serve_app.webhook_targets",
          "serve_app.model_adapters", "serve_app.shards", "serve_app.blobs",
          "serve_app.lora_folders", "serve_app.hires_plan",
          "serve_app.model_runtime", "serve_app.model_upscalers", "serve_app.model_pools")
ALLOWED: dict[str, tuple[str, ...]] = {
    # The tracker's interface is declared by `JobTracker` (serve_app.jobs.service); the
    # ingress derives its client and routing from it.
    "serve_app.api": ("serve_app.api", "serve_app.jobs.job", "serve_app.jobs.feeds",
                      "serve_app.jobs.reads", "serve_app.jobs.ratelimit",
                      "serve_app.jobs.interface", "serve_app.jobs.service",
                      "serve_app.playground", *KERNEL),
    "serve_app.playground": (),
    "serve_app.jobs": ("serve_app.jobs", "serve_app.stores", *KERNEL),
    "serve_app.stores": ("serve_app.stores",),
    "serve_app.generation": ("serve_app.generation", *KERNEL),
    # Training the embedded models: the replica side's pipelines, and nothing of the service.
    "serve_app.training": ("serve_app.training", "serve_app.generation", *KERNEL),
    "serve_app.errors": (),
    "serve_app.messages": (),
    "serve_app.settings": ("serve_app.errors", "serve_app.credentials"),
    "serve_app.credentials": (),
    "serve_app.shards": ("serve_app.errors",),
    "serve_app.blobs": ("serve_app.errors", "serve_app.settings", "serve_app.messages"),
    "serve_app.webhook_targets": (),
    # Where each model runs (the builder's helper; numpy, no torch, no Ray).
    "serve_app.placement": ("serve_app.registry", "serve_app.model_families"),
    # What a local `imagegen serve` started (cli's helper; psutil, no Ray).
    "serve_app.runfile": ("serve_app.errors",),
    "serve_app.registry": ("serve_app.errors", "serve_app.settings", "serve_app.messages",
                           "serve_app.model_families", "serve_app.model_adapters",
                           "serve_app.model_runtime", "serve_app.model_upscalers",
                           "serve_app.model_pools"),
    # A model's scaling, resources and runtime knobs (pydantic only).
    "serve_app.model_runtime": (),
    "serve_app.model_families": ("serve_app.messages",),
    # The hires fix's upscaler names and sizes, for the ingress and the replica alike.
    "serve_app.hires_plan": (),
    "serve_app.model_adapters": ("serve_app.model_families", "serve_app.model_runtime"),
    "serve_app.model_upscalers": ("serve_app.messages", "serve_app.model_runtime",
                                  "serve_app.settings"),
    "serve_app.model_pools": ("serve_app.model_runtime",),
    # LoRA folders' files (torch-free: the ingress validates names with it).
    "serve_app.lora_folders": ("serve_app.model_adapters", "serve_app.registry"),
    "deployments.ingress": ("serve_app.api", "serve_app.jobs.reads", "serve_app.jobs.persistence",
                            "serve_app.stores", *KERNEL),
    "deployments.tracker": ("serve_app.jobs", "serve_app.stores", "deployments.warm_pool",
                            *KERNEL),
    # The marker of a model replica's process, from the module that acts on it (no torch).
    "deployments.warm_pool": ("serve_app.generation.preload", *KERNEL),
    "deployments.model": ("serve_app.generation", *KERNEL),
}
TORCH = ("torch", "diffusers", "transformers")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def module_level_imports(path: Path) -> set[str]:
    """Absolute imports at module level (not inside functions or `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(tree.body)
    return found


def project_imports(path: Path, known: dict[str, Path]) -> set[str]:
    return {name for name in module_level_imports(path) if name in known}


def layer_of(module: str) -> str | None:
    matches = [layer for layer in ALLOWED if module == layer or module.startswith(layer + ".")]
    return max(matches, key=len) if matches else None


def test_each_layer_imports_only_what_it_may() -> None:
    known = modules()
    problems = []
    for module, path in known.items():
        layer = layer_of(module)
        if layer is None:
            continue  # builder, cli: the composers
        for imported in sorted(project_imports(path, known)):
            if not any(imported == ok or imported.startswith(ok + ".") for ok in ALLOWED[layer]):
                problems.append(f"{module} imports {imported}")
    assert problems == []


def test_no_import_cycles() -> None:
    known = modules()
    graph = {m: {i for i in project_imports(p, known) if i != m} for m, p in known.items()}
    cycles = _cycles(graph)
    assert cycles == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            strongconnect(v)
    return found


def test_the_checker_sees_a_cycle_and_a_wrong_way_import() -> None:
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert layer_of("serve_app.stores.sqlite") == "serve_app.stores"
    assert not any("serve_app.jobs.job".startswith(ok) for ok in ALLOWED["serve_app.stores"])


# The replica's worker and the null runner load no torch either: a null replica starts fast.
# The shapes world and its judge (serve_app.training) are numpy + Pillow: tests and the quality
# benchmark judge images with them anywhere.
TORCH_FREE = sorted([m for m in modules()
                     if not m.startswith(("serve_app.generation", "serve_app.training"))]
                    + ["serve_app.generation.worker", "serve_app.generation.null",
                       "serve_app.generation.preload"]
                    + [m for m in ("serve_app.training.world", "serve_app.training.judge")
                       if m in modules()])


def test_only_generation_loads_torch() -> None:
    assert {"serve_app.api.app", "serve_app.jobs.service", "serve_app.stores.redis",
            "deployments.model", "serve_app.builder"} <= set(TORCH_FREE)
    code = (
        "import importlib, sys\n"
        f"for name in {TORCH_FREE!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(','.join(m for m in {TORCH!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=180, cwd=ROOT)
    assert out.stdout.strip() == ""
