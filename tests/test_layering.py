"""Imports go one way: ingress -> tracker -> replicas. Only replicas load torch."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", [
    "serve_app.http", "serve_app.tracker", "serve_app.validation", "serve_app.builder",
    "deployments.ingress", "deployments.tracker", "deployments.model",
])
def test_module_does_not_import_torch_or_diffusers(module: str) -> None:
    code = (f"import sys, {module}; "
            "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == ""
