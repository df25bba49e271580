"""After a crash the next start works: what a killed `imagegen serve` left is ended, a live
service on the same data dir is not touched, and a port held by anything else is named.

Real processes stand in for a run's leftovers: `sleep` in a process group of its own (as
Serve's HAProxy is), and a Python child that listens on a port.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from serve_app.runfile import AlreadyServing, PortTaken, Proc, RunFile, RunRecord

LISTENER = """
import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
print(s.getsockname()[1], flush=True); time.sleep(60)
"""


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for child in started:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


def orphan_like(children: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    children.append(child)
    return child


def listener(children: list[subprocess.Popen[bytes]]) -> tuple[subprocess.Popen[bytes], int]:
    child = subprocess.Popen([sys.executable, "-c", LISTENER], stdout=subprocess.PIPE)
    children.append(child)
    assert child.stdout is not None
    return child, int(child.stdout.readline())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def record_of_a_dead_run(tmp_path: Path, port: int, *started: int) -> None:
    """What a SIGKILLed run leaves: a record whose service process is gone."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    service = Proc(dead.pid, time.time() - 100)
    procs = tuple(Proc.of(psutil.Process(pid)) for pid in started)
    (tmp_path / "serve.run.json").write_text(RunRecord(service, port, procs).dump())


def test_a_dead_runs_leftovers_are_ended_and_its_port_freed(tmp_path, children) -> None:
    stray = orphan_like(children)
    holder, port = listener(children)
    record_of_a_dead_run(tmp_path, port, stray.pid, holder.pid)
    ended = RunFile(tmp_path).clear_leftovers("127.0.0.1", port)
    assert ended == 2
    assert stray.wait(timeout=5) is not None and holder.wait(timeout=5) is not None
    assert not (tmp_path / "serve.run.json").exists()


def test_a_pid_reused_by_another_process_is_not_ended(tmp_path, children) -> None:
    other = orphan_like(children)
    dead = subprocess.Popen(["true"])
    dead.wait()
    # The record names `other`'s pid with another start time: not the process it recorded.
    procs = (Proc(other.pid, psutil.Process(other.pid).create_time() - 50),)
    (tmp_path / "serve.run.json").write_text(
        RunRecord(Proc(dead.pid, 1.0), free_port(), procs).dump())
    assert RunFile(tmp_path).clear_leftovers("127.0.0.1", free_port()) == 0
    assert other.poll() is None


def test_a_live_service_on_the_same_data_dir_is_refused_and_left_running(
        tmp_path, children) -> None:
    live = orphan_like(children)  # stands for the running service
    mine = orphan_like(children)
    (tmp_path / "serve.run.json").write_text(RunRecord(
        Proc.of(psutil.Process(live.pid)), 3003, (Proc.of(psutil.Process(mine.pid)),)).dump())
    with pytest.raises(AlreadyServing, match=f"pid {live.pid}, port 3003"):
        RunFile(tmp_path).clear_leftovers("127.0.0.1", free_port())
    assert live.poll() is None and mine.poll() is None


def test_a_port_held_by_a_process_we_did_not_start_is_named_and_left_alone(
        tmp_path, children) -> None:
    holder, port = listener(children)
    with pytest.raises(PortTaken) as caught:
        RunFile(tmp_path).clear_leftovers("127.0.0.1", port)
    message = str(caught.value)
    assert f"port {port} on 127.0.0.1 is held by pid {holder.pid} (python" in message
    assert "set PORT to another port" in message and "\n" not in message
    assert holder.poll() is None


def test_a_running_service_records_what_it_starts_and_a_clean_stop_removes_it(
        tmp_path, children, monkeypatch) -> None:
    monkeypatch.setattr("serve_app.runfile.REFRESH_S", 0.05)
    runfile = RunFile(tmp_path)
    runfile.keep(4321)
    try:
        child = orphan_like(children)  # started after the first write: the refresh finds it
        deadline = time.monotonic() + 5
        while True:
            record = runfile.read()
            assert record is not None
            if child.pid in {p.pid for p in record.started}:
                break
            assert time.monotonic() < deadline, "the child was never recorded"
            time.sleep(0.02)
        assert (record.service.pid, record.port) == (os.getpid(), 4321)
        # This process is the recorded service: its own next check does not refuse itself.
        assert RunFile(tmp_path).read() == record
    finally:
        runfile.release()
    assert not (tmp_path / "serve.run.json").exists()


@pytest.mark.parametrize("text", ["", "{", '{"service": [1]}', '{"service": "x", "port": 1}'])
def test_a_torn_record_is_ignored(tmp_path, text) -> None:
    (tmp_path / "serve.run.json").write_text(text)
    assert RunFile(tmp_path).clear_leftovers("127.0.0.1", free_port()) == 0
