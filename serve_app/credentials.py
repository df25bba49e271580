"""API keys as configuration holds them: a name, a role and the key's SHA-256, never the key.

Keys come from `API_KEYS` (comma-separated `key`, `name:key`, `name:key:admin` or
`name:key:role:max_priority`) and from a keys file (`IMAGEGEN_API_KEYS_FILE`, YAML) for real
deployments:

    keys:
      - name: alice
        sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
      - name: ops
        sha256: ...
        role: admin
      - name: batch
        sha256: ...
        max_priority: low

A key's highest priority (`max_priority`) is `normal` for users and `high` for admins unless
given: priority is a privilege, so a user cannot jump every queue with `priority: "high"`.

`imagegen keys new NAME` makes a key and prints its file entry. A plain `key:` is accepted in
the file too (it is hashed at once), for quick trials only. The plain key is hashed the
moment it is read, so only hashes reach `Settings`, the Serve config and every replica.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

Role = Literal["user", "admin"]
PriorityName = Literal["low", "normal", "high"]
_PRIORITIES = ("low", "normal", "high")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_KEY_CHARS = 16


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh key: 32 random bytes, URL-safe, with a recognizable prefix."""
    return "ig_" + secrets.token_urlsafe(32)


class ApiKey(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME.pattern)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    role: Role = "user"
    # The key's share when keys take turns in a queue (2: twice the turns of a 1).
    weight: float = Field(1.0, gt=0, le=100)
    # The highest priority its jobs may ask for; None: `high` for an admin, else `normal`.
    max_priority: PriorityName | None = None

    @property
    def highest(self) -> PriorityName:
        if self.max_priority is not None:
            return self.max_priority
        return "high" if self.role == "admin" else "normal"

    @model_validator(mode="before")
    @classmethod
    def _hash_a_plain_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and "key" in data:
            data = dict(data)
            key = str(data.pop("key"))
            _check_key(key, str(data.get("name", "?")))
            data.setdefault("sha256", hash_key(key))
        return data


def parse_keys(text: str) -> list[ApiKey]:
    """`API_KEYS`: comma-separated `key`, `name:key`, `name:key:admin` (or `:user`), or
    `name:key:role:max_priority` (`low`, `normal` or `high`)."""
    keys = []
    for number, item in enumerate((part.strip() for part in text.split(",")), start=1):
        if not item:
            continue
        parts = item.split(":")
        highest: str | None = None
        if len(parts) == 4 and parts[3] in _PRIORITIES:
            highest = parts.pop()
        role: str = "user"
        if len(parts) == 3 and parts[2] in ("user", "admin"):
            role = parts.pop()
        if len(parts) == 1:
            name, key = f"key{number}", parts[0]
        elif len(parts) == 2:
            name, key = parts
        else:
            raise ValueError(f"API_KEYS entry {number} is not `key`, `name:key`, "
                             "`name:key:admin` or `name:key:role:max_priority`")
        if not _NAME.match(name):
            raise ValueError(f"API_KEYS entry {number}: the name {name!r} must be letters, "
                             "digits, '.', '_', '@' or '-'")
        _check_key(key, name)
        keys.append(ApiKey(name=name, sha256=hash_key(key), role=role,  # type: ignore[arg-type]
                           max_priority=highest))  # type: ignore[arg-type]
    return keys


def load_keys_file(path: str | Path) -> list[ApiKey]:
    try:
        data = yaml.safe_load(Path(path).expanduser().read_text())
    except OSError as exc:
        raise ValueError(f"cannot read the API keys file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"the API keys file {path} is not valid YAML: {exc}") from None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"the API keys file {path} needs a top-level `keys:` list")
    return [ApiKey.model_validate(entry) for entry in entries]


def check_unique(keys: list[ApiKey]) -> list[ApiKey]:
    names = [k.name for k in keys]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"API key names must be unique: {', '.join(twice)} appear twice")
    hashes = [k.sha256 for k in keys]
    if len(set(hashes)) != len(hashes):
        raise ValueError("the same API key is configured twice under different names")
    return keys


def _check_key(key: str, name: str) -> None:
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(f"the API key named {name!r} is shorter than {MIN_KEY_CHARS} "
                         "characters; use `imagegen keys new` to make one")
