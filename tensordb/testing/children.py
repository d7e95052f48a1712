"""TensorDB's long-running commands as child processes (processors, workers, the model server, the
dashboard), each for one project with its own log file, for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tensordb.config import Settings
from tensordb.errors import ServiceError


class ChildProcess:
    """Runs ``tensordb ARGS...`` for one project with its own log file, and stops it.

    ``start`` returns once ``ready_line`` appears in the log, so callers never race the start-up.
    """

    def __init__(self, args: list[str], ready_line: str, settings: Settings, log_path: Path) -> None:
        self.args = args
        self.ready_line = ready_line
        self.settings = settings
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        return " ".join(self.args)

    def start(self, timeout: float = 60.0) -> None:
        """Start the command and wait until it reports itself ready."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tensordb.cli", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.settings.as_environment()},
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while self.ready_line not in self.log():
            if self.process.poll() is not None:
                raise ServiceError(f"`tensordb {self.name}` exited with code {self.process.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceError(f"`tensordb {self.name}` was not ready after {timeout} s; see {self.log_path}")
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the process group (both commands shut down cleanly), SIGKILL after ``timeout``."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL, as a machine failure would: no clean-up runs."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> ChildProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def processors_process(settings: Settings, log_path: Path) -> ChildProcess:
    """``tensordb processors``: the stream processors."""
    return ChildProcess(["processors"], "processors ready", settings, log_path)


def worker_process(settings: Settings, log_path: Path, lease_seconds: float = 30.0) -> ChildProcess:
    """``tensordb worker``: a trainer worker."""
    return ChildProcess(["worker", "--lease", str(lease_seconds)], "worker ready", settings, log_path)


def server_process(
    settings: Settings, log_path: Path, policy: str, port: int, host: str = "127.0.0.1", token: str | None = None
) -> ChildProcess:
    """``tensordb serve``: the model server of ``policy`` on ``host``:``port``."""
    return ChildProcess(
        ["serve", "--policy", policy, "--host", host, "--port", str(port), *(["--token", token] if token else [])],
        "Uvicorn running on", settings, log_path,
    )  # fmt: skip


def dashboard_process(
    settings: Settings, log_path: Path, port: int, host: str = "127.0.0.1", token: str | None = None
) -> ChildProcess:
    """``tensordb dashboard``: the live dashboard on ``host``:``port``."""
    return ChildProcess(
        ["dashboard", "--host", host, "--port", str(port), *(["--token", token] if token else [])],
        "Uvicorn running on",
        settings,
        log_path,
    )


class Dashboard:
    """A running ``tensordb dashboard`` (a :class:`ChildProcess`) and an HTTP client for it."""

    def __init__(self, process: ChildProcess, port: int, token: str | None = None) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def get(self, path: str, **params: Any) -> Any:
        """GET ``path`` with query ``params``; the decoded JSON (raises on an HTTP error)."""
        response = self.http.get(path, params=params)
        response.raise_for_status()
        return response.json()
