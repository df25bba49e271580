"""What a local `imagegen serve` started, kept under its data dir, so that the next start
can stop what a crash left behind.

A SIGKILLed `imagegen serve` (the OOM killer, a container kill) cannot stop its Ray: its
raylet, workers and Serve's HAProxy (in a process group of its own) live on, and HAProxy
keeps the port. So a running service writes `<data dir>/serve.run.json`: its own pid and
every process it has started (pid and start time, so a reused pid is never taken for one of
ours), refreshed every few seconds while it runs. The next start reads it:

- the recorded service is still running → `AlreadyServing` (two services on one data dir
  would share one SQLite file and run every job twice);
- it is gone → its recorded processes still alive are ended (SIGTERM, then SIGKILL);
- the port is then still taken → `PortTaken`, naming the pid that holds it, before Ray
  starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from serve_app.errors import ConfigError

FILE_NAME = "serve.run.json"
REFRESH_S = 2.0
# Process start times (psutil, seconds since the epoch) compared with this slack: the
# value read back from /proc can differ from the recorded one in its last digits.
_SAME_START_S = 0.05


class AlreadyServing(ConfigError):
    pass


class PortTaken(ConfigError):
    pass


@dataclass(frozen=True)
class Proc:
    pid: int
    started: float

    @classmethod
    def of(cls, process: psutil.Process) -> Proc:
        return cls(process.pid, process.create_time())

    def alive(self) -> psutil.Process | None:
        """The process, if this pid is still the process that was recorded."""
        try:
            process = psutil.Process(self.pid)
            same = abs(process.create_time() - self.started) < _SAME_START_S
            return process if same and process.status() != psutil.STATUS_ZOMBIE else None
        except psutil.Error:
            return None


@dataclass(frozen=True)
class RunRecord:
    service: Proc
    port: int
    started: tuple[Proc, ...]

    def dump(self) -> str:
        return json.dumps({"service": [self.service.pid, self.service.started],
                           "port": self.port,
                           "started": [[p.pid, p.started] for p in self.started]})

    @classmethod
    def parse(cls, text: str) -> RunRecord | None:
        try:
            raw = json.loads(text)
            return cls(Proc(*raw["service"]), int(raw["port"]),
                       tuple(Proc(int(pid), float(t)) for pid, t in raw["started"]))
        except (ValueError, KeyError, TypeError):
            return None  # a record torn by a crash mid-write (renames make that rare)


class RunFile:
    """The run record of the service whose data dir is `data_dir`."""

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / FILE_NAME
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: dict[int, Proc] = {}

    # -- before the start ------------------------------------------------------------------

    def clear_leftovers(self, host: str, port: int) -> int:
        """Stop what a crashed previous run left, then check that `port` is free. How many
        processes were ended. Raises AlreadyServing or PortTaken."""
        ended = 0
        record = self.read()
        if record is not None:
            if record.service.pid != os.getpid() and record.service.alive() is not None:
                raise AlreadyServing(
                    f"imagegen is already serving from {self.path.parent} (pid "
                    f"{record.service.pid}, port {record.port}); stop it first, or give this "
                    f"one another IMAGEGEN_DATA_DIR")
            ended = end(p for p in (proc.alive() for proc in record.started) if p is not None)
            self.path.unlink(missing_ok=True)
        check_port_free(host, port)
        return ended

    def read(self) -> RunRecord | None:
        try:
            return RunRecord.parse(self.path.read_text())
        except OSError:
            return None

    # -- while it runs ---------------------------------------------------------------------

    def keep(self, port: int) -> None:
        """Record this process and every process it has started, now and every REFRESH_S
        until `release`. A process that has ended stays recorded until this one ends: its
        pid may be reused, and `Proc.alive` tells the two apart."""
        me = psutil.Process()
        service = Proc.of(me)

        def write() -> None:
            with contextlib.suppress(psutil.Error):
                for child in me.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        self._seen.setdefault(child.pid, Proc.of(child))
            self._seen = {pid: p for pid, p in self._seen.items() if p.alive() is not None}
            record = RunRecord(service, port, tuple(self._seen.values()))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(record.dump())
            tmp.replace(self.path)

        def loop() -> None:
            while not self._stop.wait(REFRESH_S):
                with contextlib.suppress(OSError):
                    write()

        write()
        self._thread = threading.Thread(target=loop, name="imagegen-runfile", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """A clean stop: nothing is left to clear."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=REFRESH_S + 1)
        self.path.unlink(missing_ok=True)


def end(processes: Iterable[psutil.Process], grace_s: float = 1.0) -> int:
    """SIGTERM, then SIGKILL after `grace_s`, to `processes`; how many there were."""
    alive = [p for p in processes if p.is_running()]
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, stuck = psutil.wait_procs(alive, timeout=grace_s)
    for proc in stuck:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(stuck, timeout=grace_s)
    return len(alive)


def check_port_free(host: str, port: int) -> None:
    """Raise PortTaken, naming the process that listens on `port`, unless it is free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return
        except OSError as exc:
            reason = exc.strerror or str(exc)
    holder = port_holder(port)
    who = (f"pid {holder.pid} ({_name(holder)})" if holder is not None
           else "a process this user cannot see")
    raise PortTaken(f"port {port} on {host} is held by {who}: {reason}. It was not "
                    f"started by this data dir's last imagegen run; stop it, or set PORT to "
                    f"another port")


def port_holder(port: int) -> psutil.Process | None:
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections(kind="tcp"):
            listening = conn.status == psutil.CONN_LISTEN and conn.laddr
            if listening and conn.laddr.port == port and conn.pid is not None:
                with contextlib.suppress(psutil.Error):
                    return psutil.Process(conn.pid)
    return None


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return "?"
