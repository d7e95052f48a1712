"""A server program run in the background: started detached, remembered by a pid file, logged to a file.

``tensordb services up``, ``status`` and ``down`` are separate Python processes, so the pid file is
the only link between them. A pid is trusted only while ``/proc/PID/cmdline`` still names our
executable: a pid that the kernel has since given to an unrelated program is never signalled.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tensordb.errors import ServiceError

# Children started by this Python process. They are polled (reaped) here: an exited child that is
# never waited for stays a zombie, which still has a pid, until this process ends.
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class ServiceStatus:
    """What one local service is doing. ``changed`` is true when this call started or stopped it."""

    name: str
    running: bool
    pid: int | None
    address: str
    changed: bool = False
    detail: str = ""


class ManagedProcess:
    """One background program: ``RUN/pids/NAME.pid`` holds its pid, ``RUN/logs/NAME.log`` its output."""

    def __init__(
        self,
        name: str,
        executable: Path,
        run_dir: Path,
        stop_signal: signal.Signals = signal.SIGTERM,
        log_path: Path | None = None,
    ) -> None:
        """
        Parameters
        ----------
        name:
            Names the pid file (and the log, unless ``log_path`` is given).
        executable:
            The program; also how a pid found in a pid file is recognised as ours.
        run_dir:
            Where ``pids/`` (and ``logs/``) are.
        stop_signal:
            What :meth:`stop` sends first.
        log_path:
            Where the output goes, instead of ``RUN/logs/NAME.log``.
        """
        self.name = name
        self.executable = executable
        self.stop_signal = stop_signal
        self.pid_path = run_dir / "pids" / f"{name}.pid"
        self.log_path = log_path or run_dir / "logs" / f"{name}.log"
        self.child: subprocess.Popen[bytes] | None = None  #: the process, when this Python process started it

    def pid(self) -> int | None:
        """The pid of our program if it is running; a stale pid file is removed."""
        try:
            pid = int(self.pid_path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            pid = -1
        if pid > 0 and self._is_ours(pid):
            return pid
        self.pid_path.unlink(missing_ok=True)
        return None

    def _is_ours(self, pid: int) -> bool:
        child = _children.get(pid)
        if child is None:
            return self.arguments(pid) is not None
        # Started by this Python process: the pid cannot be reused before we reap it. (Its cmdline
        # is briefly empty while it execs, so it would not be a reliable test here.)
        if child.poll() is None:
            return True
        del _children[pid]
        return False

    def arguments(self, pid: int) -> list[str] | None:
        """The command-line arguments of ``pid`` if it runs our executable, else None."""
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        except OSError:  # no such process (or not ours to read)
            return None
        # The executable is argv[0], or comes after the interpreter of a ``#!`` script
        # (``/usr/bin/env node SCRIPT`` for a moment, then ``node SCRIPT``).
        executable = os.fsencode(self.executable)
        if executable not in argv:
            return None
        return [os.fsdecode(arg) for arg in argv[argv.index(executable) + 1 :]]

    def start(self, arguments: Sequence[str], env: Mapping[str, str] | None = None) -> int:
        """Start the program in its own session (so a Ctrl-C in the terminal does not reach it)."""
        if not self.executable.is_file():
            raise ServiceError(f"{self.executable} is missing: run `tensordb services install` first")
        self.pid_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [str(self.executable), *arguments]
        with self.log_path.open("ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n".encode())
            log.flush()
            child = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **env} if env else None,
            )
        _children[child.pid] = child
        self.child = child
        self.pid_path.write_text(f"{child.pid}\n")
        return child.pid

    def wait_ready(self, is_ready: Callable[[], bool], timeout: float) -> None:
        """Poll ``is_ready`` until it is true; fail early, with the log's last line, if the program exits."""
        deadline = time.monotonic() + timeout
        while not is_ready():
            if self.pid() is None:
                raise ServiceError(f"{self.name} exited while starting ({self.last_log_line()}): see {self.log_path}")
            if time.monotonic() > deadline:
                raise ServiceError(f"{self.name} did not become ready within {timeout:.0f} s: see {self.log_path}")
            time.sleep(0.05)

    def wait_exit(self, timeout: float) -> bool:
        """Wait until the program has exited; false if it still runs after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.pid() is not None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self, timeout: float = 10.0) -> bool:
        """The stop signal, then SIGKILL after ``timeout``, to the program's whole process group.

        Returns whether it was running.
        """
        pid = self.pid()
        if pid is None:
            return False
        for sig in (self.stop_signal, signal.SIGKILL):
            try:
                os.killpg(pid, sig)  # start_new_session made the program its group's leader
            except ProcessLookupError:
                pass
            if self.wait_exit(timeout):
                return True
        raise ServiceError(f"{self.name} (pid {pid}) survived SIGKILL: check it with `ps -p {pid}`")

    def status(self, address: str, detail: str = "", changed: bool = False) -> ServiceStatus:
        pid = self.pid()
        return ServiceStatus(self.name, pid is not None, pid, address, changed, detail)

    def last_log_line(self) -> str:
        lines = tail(self.log_path, 1)
        return lines[0] if lines else "no output"


def log_since(path: Path, offset: int) -> str:
    """What a log file gained after ``offset`` bytes (a restarted program appends to its log)."""
    try:
        with path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def tail(path: Path, count: int) -> list[str]:
    """The last ``count`` lines of a log file (none if it does not exist yet)."""
    try:
        with path.open(errors="replace") as log:
            return [line.rstrip("\n") for line in deque(log, maxlen=max(count, 0))]
    except FileNotFoundError:
        return []


def port_is_free(host: str, port: int) -> bool:
    """Whether nothing listens on ``host:port`` (SO_REUSEADDR: a closing connection does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def free_port(host: str) -> int:
    """A port nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
