"""`imagegen keys new`: make an API key, and the entry a keys file holds for it.

The key is printed once; the service keeps only its SHA-256 (serve_app.credentials). With
`--file`, the entry is appended to that keys file (created, owner-only, if new), ready for
IMAGEGEN_API_KEYS_FILE; `--bare` prints the key alone, for `API_KEYS="name:$(...)"`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    keys = sub.add_parser("keys", help="make API keys for the service")
    what = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    new = what.add_parser("new", help="make a key: print it, and its keys-file entry")
    new.add_argument("name", nargs="?", default="key",
                     help="the key's name (jobs and limits are per name)")
    new.add_argument("--role", choices=("user", "admin"), default="user",
                     help="admin keys see every job and the whole queue")
    new.add_argument("--file", type=Path, help="append the entry to this keys file")
    new.add_argument("--bare", action="store_true", help="print only the key")
    new.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from serve_app.credentials import ApiKey, hash_key, new_key

    key = new_key()
    entry = ApiKey(name=args.name, sha256=hash_key(key), role=args.role)
    if args.bare:
        print(key)
        return 0
    line = entry.model_dump(exclude_defaults=False, exclude={"weight"})
    if args.file is not None:
        append(args.file, line)
        print(f"{args.name}: {key}\n(added to {args.file}; the key is shown only now)")
    else:
        print(f"{args.name}: {key}\n\nits keys-file entry (under `keys:`):\n"
              + yaml.safe_dump([line], sort_keys=False))
    return 0


def append(path: Path, line: dict[str, object]) -> None:
    data = yaml.safe_load(path.read_text()) if path.exists() else None
    data = data if isinstance(data, dict) else {}
    entries = data.setdefault("keys", [])
    if any(e.get("name") == line["name"] for e in entries if isinstance(e, dict)):
        raise SystemExit(f"imagegen: {path} already has a key named {line['name']!r}")
    entries.append(line)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        yaml.safe_dump(data, out, sort_keys=False)
