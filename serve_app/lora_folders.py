"""LoRA folders (`lora_dirs:` of a model or its pool): every `.safetensors` file in them is a
LoRA of the model, requested by its file stem. Torch-free: the ingress validates names with
it, the tracker lists them (GET /models, A1111 `/sdapi/v1/loras`), the replica loads them.

Contract:
- A file's format is read from its tensor names in the safetensors header (8 bytes of
  length, then JSON; no tensor is read): kohya (`lora_unet_…`, `lora_te…`) or diffusers/PEFT
  (`unet.…`, `text_encoder…`, `transformer.…`). A file of neither kind, or whose stem is
  not a valid LoRA name, is left out (logged once per scan).
- A folder is scanned again when asked and its modification time changed (a file was
  added, removed or renamed: one `stat`), when the last scan is `RESCAN_S` (10 s) old, and
  when a name is asked for that the last scan did not find (at most once a second): a file
  copied into a folder is listed and requestable at once, a file rewritten in place within
  10 s. Copy a file in under another name, then rename it, so a scan never reads half a
  file (a half file's header fails to parse and it is left out until the next scan).
- A registry LoRA of the model wins over a folder file of the same name; the first folder
  (the model's own, then its pool's) wins among folders.
- On a multi-node cluster the folders must be on a filesystem every node mounts at the same
  path (like MODEL_PATH's files): the ingress reads them to validate a request.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from serve_app.model_adapters import ADAPTER_NAME, LORA_SUFFIX, LoraSpec
from serve_app.registry import ModelSpec

log = logging.getLogger(__name__)

RESCAN_S = 10.0
MISS_RESCAN_S = 1.0
_KOHYA_PREFIXES = ("lora_unet_", "lora_te", "lora_transformer_")
_DIFFUSERS_PREFIXES = ("unet.", "text_encoder", "transformer.")
_NAME = re.compile(ADAPTER_NAME)
_MAX_HEADER = 64 * 1024 * 1024


def header_format(path: Path) -> str:
    """`kohya`, `diffusers` or `unknown`, from the tensor names in the file's header."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > _MAX_HEADER:
                return "unknown"
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError):
        return "unknown"
    keys = [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []
    if keys and all(k.startswith(_KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if keys and all(k.startswith(_DIFFUSERS_PREFIXES) for k in keys):
        return "diffusers"
    return "unknown"


@dataclass
class _Scan:
    at: float = float("-inf")
    mtime_ns: int | None = None
    loras: dict[str, LoraSpec] = field(default_factory=dict)


class LoraFolders:
    """The LoRAs in folders, rescanned as the module docstring says. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 rescan_s: float = RESCAN_S) -> None:
        self._clock = clock
        self._rescan_s = rescan_s
        self._scans: dict[Path, _Scan] = {}
        self._lock = threading.Lock()

    def loras(self, dirs: Iterable[Path]) -> dict[str, LoraSpec]:
        """Every LoRA of `dirs`, by name (a scan older than `rescan_s` is redone)."""
        out: dict[str, LoraSpec] = {}
        for folder in dirs:
            for name, lora in self._scan(folder, self._rescan_s).loras.items():
                out.setdefault(name, lora)
        return out

    def find(self, dirs: Iterable[Path], name: str) -> LoraSpec | None:
        """The LoRA called `name` in `dirs`; a miss rescans (at most once a second)."""
        dirs = list(dirs)
        found = self.loras(dirs).get(name)
        if found is None and dirs:
            for folder in dirs:
                self._scan(folder, MISS_RESCAN_S)
            found = self.loras(dirs).get(name)
        return found

    def _scan(self, folder: Path, max_age_s: float) -> _Scan:
        now = self._clock()
        mtime = _mtime_ns(folder)
        with self._lock:
            scan = self._scans.get(folder)
            if scan is not None and now - scan.at < max_age_s and scan.mtime_ns == mtime:
                return scan
            scan = self._scans[folder] = _Scan(now, mtime, _read_folder(folder))
            return scan


def _mtime_ns(folder: Path) -> int | None:
    try:
        return folder.stat().st_mtime_ns
    except OSError:
        return None


def _read_folder(folder: Path) -> dict[str, LoraSpec]:
    try:
        files = sorted(folder.glob(f"*{LORA_SUFFIX}"))
    except OSError:
        files = []
    found: dict[str, LoraSpec] = {}
    skipped = []
    for path in files:
        fmt = header_format(path)
        if not _NAME.match(path.stem) or fmt == "unknown":
            skipped.append(path.name)
            continue
        found[path.stem] = LoraSpec(name=path.stem, source="path", path=str(path.resolve()),
                                    format=fmt,  # type: ignore[arg-type]
                                    description=f"{fmt} LoRA from {folder}")
    if skipped:
        log.warning("LoRA folder %s: left out %d file(s) that are not a LoRA of a known "
                    "format or have no valid name: %s", folder, len(skipped),
                    ", ".join(skipped[:10]))
    return found


# The process's folders: the ingress, the tracker and each replica keep their own.
FOLDERS = LoraFolders()


def model_lora_dirs(dirs: Iterable[str], model_path: str) -> tuple[Path, ...]:
    """A registry's `lora_dirs` entries as paths: absolute, or relative to MODEL_PATH."""
    out = []
    for entry in dirs:
        path = Path(entry).expanduser()
        out.append(path if path.is_absolute() else Path(model_path) / path)
    return tuple(out)


def model_loras(spec: ModelSpec, model_path: str, folders: LoraFolders | None = None
                ) -> tuple[LoraSpec, ...]:
    """A model's LoRAs: its registry ones, then its folders' (by name)."""
    folders = folders or FOLDERS
    own = {lo.name for lo in spec.loras}
    found = folders.loras(model_lora_dirs(spec.lora_dirs, model_path)) if spec.lora_dirs else {}
    return spec.loras + tuple(lo for name, lo in sorted(found.items()) if name not in own)


def find_lora(spec: ModelSpec, name: str, model_path: str,
              folders: LoraFolders | None = None) -> LoraSpec | None:
    """The model's LoRA called `name`: a registry one, else a folder file (a miss rescans
    the folders)."""
    folders = folders or FOLDERS
    lora = spec.lora(name)
    if lora is None and spec.lora_dirs:
        lora = folders.find(model_lora_dirs(spec.lora_dirs, model_path), name)
    return lora
