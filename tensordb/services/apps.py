"""TensorDB's own long-running commands (processors, worker, model server, dashboard) in the background.

They run like the servers: detached, remembered by a pid file under the run folder, logged to a
file, so ``tensordb services status`` lists them and ``tensordb services down`` stops them too.
``start`` returns once the command has printed its ready line, so callers never race the start-up.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tensordb.config import Settings
from tensordb.services.process import ManagedProcess, ServiceStatus, log_since

#: The line each command logs when it is ready to work.
READY_LINES = {
    "processors": "processors ready",
    "worker": "worker ready",
    "predictor": "predictor ready",
    "serve": "Uvicorn running on",
    "dashboard": "Uvicorn running on",
}


class AppProcess:
    """``tensordb ARGUMENTS...`` for the project of ``settings``, as a managed background process."""

    def __init__(self, name: str, arguments: list[str], settings: Settings, run_dir: Path) -> None:
        self.name = name
        self.arguments = arguments
        self.settings = settings
        self.process = ManagedProcess(name, Path(sys.executable), run_dir)

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    @property
    def project_path(self) -> Path:
        """Where the project the app runs for is noted (``services down`` drains that project's processors)."""
        return self.process.pid_path.with_suffix(".project.json")

    def project_settings(self) -> Settings:
        """The settings of the project this app was started for (the caller's if unknown)."""
        try:
            noted = json.loads(self.project_path.read_text())
        except (FileNotFoundError, ValueError):
            return self.settings
        return self.settings.with_changes(**noted)

    def start(self, timeout: float = 90.0) -> int:
        """Start the command unless it runs already; wait for its ready line. Returns its pid."""
        pid = self.process.pid()
        if pid is not None:
            return pid
        self.project_path.parent.mkdir(parents=True, exist_ok=True)
        self.project_path.write_text(json.dumps({"project": self.settings.project, "topic_prefix": self.settings.topic_prefix}))
        ready_line = READY_LINES[self.arguments[0]]
        start_of_run = self.log_path.stat().st_size if self.log_path.exists() else 0
        pid = self.process.start(["-m", "tensordb.cli", *self.arguments], env=self.settings.as_environment())
        self.process.wait_ready(lambda: ready_line in log_since(self.log_path, start_of_run), timeout)
        return pid

    def stop(self, timeout: float = 20.0) -> bool:
        """SIGTERM (each command shuts down cleanly: the worker hands its job back), SIGKILL later."""
        stopped = self.process.stop(timeout)
        self.project_path.unlink(missing_ok=True)
        return stopped

    def status(self) -> ServiceStatus:
        return self.process.status(" ".join(self.arguments))


def running_apps(run_dir: Path, settings: Settings) -> list[AppProcess]:
    """The apps whose pid files are in ``run_dir`` (whether or not they still run)."""
    servers = {"tansu", "tansu-tls", "mongod"}
    names = sorted(path.stem for path in (run_dir / "pids").glob("*.pid") if path.stem not in servers)
    return [AppProcess(name, [name], settings, run_dir) for name in names]
