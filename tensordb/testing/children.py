"""TensorDB's long-running commands as child processes (processors, workers, the model server, the
dashboard), each for one project with its own log file, for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tensordb.config import Settings
from tensordb.errors import ServiceError
from tensordb.services.apps import READY_LINES
from tensordb.services.process import ManagedProcess, log_since


class ChildProcess:
    """Runs ``tensordb ARGS...`` for one project with its own log file, and stops it.

    It is launched like the background apps of ``tensordb services`` (:class:`ManagedProcess`: its
    own session, a pid file beside the log), but belongs to the caller: tests stop or kill it.
    ``start`` returns once ``ready_line`` appears in the log, so callers never race the start-up.
    """

    def __init__(self, args: list[str], ready_line: str, settings: Settings, log_path: Path) -> None:
        self.args = args
        self.ready_line = ready_line
        self.settings = settings
        self.log_path = log_path
        self._managed = ManagedProcess(log_path.stem, Path(sys.executable), log_path.parent, log_path=log_path)

    @property
    def name(self) -> str:
        return " ".join(self.args)

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The running (or exited) process, once started."""
        return self._managed.child

    def start(self, timeout: float = 60.0) -> None:
        """Start the command and wait until it reports itself ready (stopped again if it does not)."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._managed.start(["-m", "tensordb.cli", *self.args], env=self.settings.as_environment())
        try:
            self._managed.wait_ready(lambda: self.ready_line in log_since(self.log_path, offset), timeout)
        except ServiceError:
            self.stop()
            raise

    def log(self) -> str:
        return log_since(self.log_path, 0)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the process group (every command shuts down cleanly), SIGKILL after ``timeout``."""
        self._managed.stop(timeout)

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


def _metrics(port: int) -> list[str]:
    """``--metrics-port``: 0 (no endpoint) unless a test asks for one, on a free port it chose."""
    return ["--metrics-port", str(port)]


def processors_process(settings: Settings, log_path: Path, metrics_port: int = 0) -> ChildProcess:
    """``tensordb processors``: the stream processors (metrics on ``metrics_port``; 0: none)."""
    return ChildProcess(["processors", *_metrics(metrics_port)], READY_LINES["processors"], settings, log_path)


def worker_process(
    settings: Settings,
    log_path: Path,
    lease_seconds: float = 30.0,
    slots: int = 1,
    gpus: int | None = None,
    metrics_port: int = 0,
) -> ChildProcess:
    """``tensordb worker``: a trainer worker running up to ``slots`` jobs at once, offering ``gpus``
    GPUs (default: those it detects)."""
    options = ["--lease", str(lease_seconds), "--slots", str(slots), *(["--gpus", str(gpus)] if gpus is not None else [])]
    return ChildProcess(["worker", *options, *_metrics(metrics_port)], READY_LINES["worker"], settings, log_path)


def predictor_process(
    settings: Settings, log_path: Path, model: str, version: int | None = None, max_batch: int = 64, metrics_port: int = 0
) -> ChildProcess:
    """``tensordb predictor``: the streaming predictor of ``model`` (its production version, or ``version``)."""
    arguments = ["predictor", "--policy", model, "--max-batch", str(max_batch), *(["--version", str(version)] if version else [])]
    arguments += _metrics(metrics_port)
    return ChildProcess(arguments, READY_LINES["predictor"], settings, log_path)


def server_process(
    settings: Settings,
    log_path: Path,
    policy: str,
    port: int,
    host: str = "127.0.0.1",
    token: str | None = None,
    metrics_port: int = 0,
) -> ChildProcess:
    """``tensordb serve``: the model server of ``policy`` on ``host``:``port`` (``token`` through its environment)."""
    return ChildProcess(
        ["serve", "--policy", policy, "--host", host, "--port", str(port), *_metrics(metrics_port)],
        READY_LINES["serve"], settings.with_changes(serve_token=token) if token else settings, log_path,
    )  # fmt: skip


def dashboard_process(
    settings: Settings,
    log_path: Path,
    port: int,
    host: str = "127.0.0.1",
    token: str | None = None,
    metrics_port: int = 0,
) -> ChildProcess:
    """``tensordb dashboard``: the live dashboard on ``host``:``port`` (``token`` through its environment)."""
    return ChildProcess(
        ["dashboard", "--host", host, "--port", str(port), *_metrics(metrics_port)],
        READY_LINES["dashboard"],
        settings.with_changes(dashboard_token=token) if token else settings,
        log_path,
    )


class Dashboard:
    """A running ``tensordb dashboard`` (a :class:`ChildProcess`) and an HTTP client for it."""

    def __init__(self, process: ChildProcess, port: int, token: str | None = None) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=30)
        self._csrf: str | None = None

    def get(self, path: str, **params: Any) -> Any:
        """GET ``path`` with query ``params``; the decoded JSON (raises on an HTTP error)."""
        response = self.http.get(path, params=params)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: Any) -> httpx.Response:
        """POST ``body`` as JSON to an action, as the dashboard's page does: with the CSRF token of
        this client's session (fetched once from ``/api/csrf``, which sets the cookie) and its Origin.
        The response, whatever its status."""
        if self._csrf is None:
            answer = self.http.get("/api/csrf")
            answer.raise_for_status()
            self._csrf = answer.json()["csrf_token"]
        return self.http.post(path, json=body, headers={"X-CSRF-Token": self._csrf, "Origin": self.url})
