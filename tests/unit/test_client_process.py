"""The client as a user runs it: its own process, nothing of the service loaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from serve_app.cli import free_port

IMAGEGEN = Path(sys.executable).with_name("imagegen")


def test_client_and_a_cli_command_load_no_ray_torch_or_service_code() -> None:
    code = ("import sys\n"
            "from imagegen.cli import main\n"
            "import imagegen.client\n"
            f"main(['status', '--url', 'http://127.0.0.1:{free_port()}'])\n"
            "heavy = ('ray', 'torch', 'diffusers', 'transformers', 'serve_app')\n"
            "print(','.join(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == ""


def test_a_closed_port_exits_2_with_one_line_and_no_traceback() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    out = subprocess.run([str(IMAGEGEN), "generate", "a lake", "-o", "never.png", "--url", url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"imagegen: cannot reach {url}: ")
