"""The stream processors as a child process (``tensordb processors``), for the demo and the tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tensordb.config import Settings
from tensordb.errors import ServiceError


class ProcessorsProcess:
    """Starts ``tensordb processors`` for one project with its own log file, and stops it."""

    READY_LINE = "[^Worker]: Ready"

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        """Start the processors and wait until faust reports the worker ready."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tensordb.cli", "processors"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.settings.as_environment()},
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while self.READY_LINE not in self.log():
            if self.process.poll() is not None:
                raise ServiceError(f"the processors exited with code {self.process.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceError(f"the processors were not ready after {timeout} s; see {self.log_path}")
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the process group (faust shuts down cleanly), SIGKILL after ``timeout``."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> ProcessorsProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
