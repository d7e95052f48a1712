"""What a job runner is given (:class:`JobContext`) and how it is told to stop: shared by the
worker loop (``workers.trainer``) and the runners of each job kind, which import nothing else of
the worker."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tensordb.config import Settings
from tensordb.infra.store import Store
from tensordb.jobs.queue import JobDocument, Jobs
from tensordb.models.registry import ModelRegistry
from tensordb.runs.logger import RunLogger


class JobCancelled(Exception):
    """Raised inside a job runner when the job was cancelled or its lease was lost."""


@dataclass
class JobContext:
    """What a job runner gets: the job, the shared services and the stop signal."""

    job: JobDocument
    worker: str
    settings: Settings
    store: Store
    jobs: Jobs
    registry: ModelRegistry
    logger: RunLogger
    stop: threading.Event = field(default_factory=threading.Event)
    stop_reason: str | None = None  # "cancelled", "lease lost" or "shutdown"

    @property
    def job_id(self) -> str:
        return self.job["_id"]

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stop.set()

    def check_stop(self) -> None:
        """Runners call this between steps: raises JobCancelled once a stop was requested."""
        if self.stop.is_set():
            raise JobCancelled(self.stop_reason or "stopped")


#: A job runner: does the work of one job kind and returns the job's result.
Runner = Callable[[JobContext], dict[str, Any]]
