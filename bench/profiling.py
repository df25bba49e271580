"""py-spy sampling of the service's processes while a figure's load runs (`--profile`).

Profiled passes are extra, unmeasured passes: sampling pauses the target ~100 times a
second, which on two cores would bend the measured numbers. Each process's raw collapsed
stacks land in `<out>/<figure>-<role>.txt` (feed them to flamegraph.pl or speedscope), and
a summary goes into the figure's JSON: where the samples were, by function (self and
inclusive) and by area of the code.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.common import log

# py-spy names frames `function (package/module.py:line)`.
# Exclusive attribution: each sample goes to the first of these that a frame matches,
# walking from the innermost frame out, so the shares add up to 100 (with "other").
LIBRARIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("json", ("(json/",)),
    ("sqlite3", ("(sqlite3/",)),
    ("pydantic", ("(pydantic/", "(pydantic_core/")),
    ("cloudpickle", ("cloudpickle",)),
    ("logging", ("(logging/",)),
    ("serve_app / deployments (own code)", ("(serve_app/", "(deployments/", "(bench/")),
    ("starlette / fastapi", ("(starlette/", "(fastapi/")),
    ("uvicorn / httptools / h11", ("(uvicorn/", "(httptools/", "(h11/")),
    ("ray serve", ("(ray/serve/",)),
    ("ray core", ("(ray/",)),
    ("torch / diffusers / transformers / PIL", ("(torch/", "(diffusers/", "(transformers/",
                                                "(PIL/")),
    ("asyncio", ("(asyncio/",)),
    ("threading / concurrent.futures", ("(threading.py", "(concurrent/")),
)
# Inclusive: share of samples whose stack passes through these call sites.
THROUGH: dict[str, tuple[str, ...]] = {
    "serve_app.api.submission.build_submission": ("build_submission (serve_app/api/",),
    "JobTracker.submit": ("JobTracker.submit (",),
    "JobTracker.get": ("JobTracker.get (",),
    "job store (serve_app/sqlite_store.py)": ("(serve_app/sqlite_store.py",),
    "tracker event handling (_run/_complete)": ("JobTracker._run (", "JobTracker._complete ("),
    "serve.status() (tracker's replica refresh)": ("status (ray/serve/api.py",),
    "ModelRunner.generate": ("ModelRunner.generate",),
    "Serve router (handle calls)": ("(ray/serve/_private/router.py",),
    "Serve replica wrapper": ("(ray/serve/_private/replica.py",),
    "Serve proxy": ("(ray/serve/_private/proxy.py",),
    "Ray metrics": ("(ray/util/metrics.py", "metrics_utils"),
    "cloudpickle": ("cloudpickle",),
}


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Spy:
    """`with Spy(out_dir, figure, {"tracker": pid, ...}, seconds):` samples each process
    for `seconds` (run the load inside the block); `.summaries` afterwards."""

    def __init__(self, out_dir: Path, figure: str, pids: dict[str, int], seconds: float,
                 rate: int = 100) -> None:
        self.out_dir = out_dir
        self.figure = figure
        self.pids = pids
        self.seconds = seconds
        self.rate = rate
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.summaries: dict[str, Any] = {}

    def path(self, role: str) -> Path:
        return self.out_dir / f"{self.figure}-{role}.txt"

    def __enter__(self) -> Spy:
        exe = py_spy()
        if exe is None:
            log("py-spy not found: skipping the profile")
            return self
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for role, pid in self.pids.items():
            self.procs[role] = subprocess.Popen(
                [exe, "record", "--pid", str(pid), "--duration", str(round(self.seconds)),
                 "--rate", str(self.rate), "--gil", "--format", "raw", "--output",
                 str(self.path(role))],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        for role, proc in self.procs.items():
            try:
                _, err = proc.communicate(timeout=self.seconds + 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if proc.returncode != 0 or not self.path(role).exists():
                self.summaries[role] = {"error": err.decode(errors="replace")[-500:]}
                continue
            self.summaries[role] = summarize(self.path(role))
            self.summaries[role]["file"] = str(self.path(role))


def _frames(stack: str) -> list[str]:
    # py-spy raw lines: `fn (path:line);fn (path:line);... count`, outermost first.
    return [f for f in stack.split(";") if f]


def _name(frame: str) -> str:
    """`fn (path/to/module.py:12)` -> `fn (module.py)`."""
    fn, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{fn} ({short})"


def _library(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, keys in LIBRARIES:
            if any(k in frame for k in keys):
                return name
    return "other"


def summarize(path: Path, top: int = 12) -> dict[str, Any]:
    """Shares (%) of the samples: by library (exclusive), through call sites (inclusive),
    and the top functions by self and inclusive time."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    libraries: Counter[str] = Counter()
    through: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = _frames(stack)
        if not frames:
            continue
        total += count
        self_time[_name(frames[-1])] += count
        for name in {_name(f) for f in frames}:
            inclusive[name] += count
        libraries[_library(frames)] += count
        for site, keys in THROUGH.items():
            if any(k in f for f in frames for k in keys):
                through[site] += count
    if not total:
        return {"samples": 0}

    def pct(counter: Counter[str], n: int | None = None) -> list[list[Any]]:
        return [[name, round(100 * c / total, 1)] for name, c in counter.most_common(n)]

    return {
        "samples": total,
        "by_library_pct": dict(pct(libraries)),
        "through_pct": dict(pct(through)),
        "top_self_pct": pct(self_time, top),
        "top_inclusive_pct": pct(inclusive, top),
    }
