"""`kill -9` of `imagegen serve` under load, then `imagegen serve` again: the second start
ends what the first left (its Ray, Serve's HAProxy on the port), serves within its usual
start time, and every job the first acknowledged completes. The real command, as a user
runs it, in processes of its own: this module stops the session's shared Ray first."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from serve_app.runfile import RunFile, end, port_holder
from tests.support.serve_harness import free_port, wait_for

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
JOB = {"prompt": "a red circle", "width": 128, "height": 128, "steps": 12}


class Served:
    """`imagegen serve` on a port and data dir of its own; its output in a file."""

    def __init__(self, tmp: Path, port: int) -> None:
        self.tmp, self.port = tmp, port
        self.url = f"http://127.0.0.1:{port}"
        self.runs: list[subprocess.Popen[bytes]] = []

    def start(self) -> tuple[subprocess.Popen[bytes], float]:
        """A run, and the seconds it took to be ready."""
        env = os.environ | {"PORT": str(self.port), "IMAGEGEN_DATA_DIR": str(self.tmp / "data"),
                            "IMAGEGEN_SUBMIT_RATE": "0", "IMAGEGEN_READ_RATE": "0"}
        log = (self.tmp / f"run{len(self.runs) + 1}.log").open("wb")
        began = time.monotonic()
        run = subprocess.Popen([sys.executable, "-m", "serve_app.cli", "serve"], cwd=ROOT,
                               env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.runs.append(run)
        deadline = began + 180
        while time.monotonic() < deadline:
            assert run.poll() is None, self.output(len(self.runs))
            # Its own line first: a previous run's leftovers could answer on the port.
            if "imagegen is serving on" in self.output(len(self.runs)):
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                        return run, time.monotonic() - began
            time.sleep(0.2)
        raise AssertionError(f"not ready after 180 s:\n{self.output(len(self.runs))}")

    def output(self, run: int) -> str:
        return (self.tmp / f"run{run}.log").read_text(errors="replace")[-4000:]

    def close(self) -> None:
        for run in self.runs:
            if run.poll() is None:
                run.send_signal(signal.SIGTERM)
                try:
                    run.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    run.kill()
        record = RunFile(self.tmp / "data").read()  # a failed test's leftovers
        if record is not None:
            end(p for p in (proc.alive() for proc in record.started) if p is not None)


@pytest.fixture
def served(local_ray, tmp_path: Path) -> Iterator[Served]:  # type: ignore[no-untyped-def]
    local_ray.stop()  # the machine to itself: two services' Rays in turn
    s = Served(tmp_path, free_port())
    try:
        yield s
    finally:
        s.close()


def test_a_killed_service_leaves_nothing_that_stops_the_next_start(served: Served) -> None:
    first, first_start_s = served.start()
    with httpx.Client(base_url=served.url, timeout=30) as client:
        acknowledged = []
        for seed in range(4):
            resp = client.post("/generate/text2img", json=JOB | {"seed": seed})
            assert resp.status_code == 202, resp.text
            acknowledged.append(resp.json()["id"])
        wait_for(client, acknowledged[0], timeout_s=60, until={"processing", "completed"})

    first.send_signal(signal.SIGKILL)
    first.wait()
    holder = port_holder(served.port)
    assert holder is not None and holder.name() == "haproxy"  # what used to block a start
    record = RunFile(served.tmp / "data").read()
    assert record is not None and holder.pid in {p.pid for p in record.started}

    second, second_start_s = served.start()
    assert "ended" in served.output(2) and "a previous run left behind" in served.output(2)
    assert second_start_s < 2 * first_start_s + 10, (first_start_s, second_start_s)
    assert not any(p.alive() for p in record.started), "a process of the killed run lives on"
    with httpx.Client(base_url=served.url, timeout=30) as client:
        final = {j: wait_for(client, j, timeout_s=180) for j in acknowledged}
    assert {j: r["status"] for j, r in final.items()} == dict.fromkeys(acknowledged,
                                                                        "completed")

    # A clean stop ends everything it started and leaves no record to clear.
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=30) == 0
    assert RunFile(served.tmp / "data").read() is None
    assert port_holder(served.port) is None
    assert psutil.pid_exists(second.pid) is False
