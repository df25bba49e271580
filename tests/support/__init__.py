"""What tests share: fakes, fixtures' building blocks and harnesses (no tests here)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the project's root
