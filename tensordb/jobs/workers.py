"""Workers: what each running trainer worker offers (slots, GPUs) and what it runs, so people,
dashboards and schedulers can see the project's capacity.

A worker upserts its document in the ``workers`` collection when it starts, whenever it claims or
finishes a job, and every :data:`ADVERTISE_SECONDS`; a clean stop removes it. A worker that died
leaves its document behind: :meth:`Workers.list` shows only those seen in the last
:data:`LIVE_SECONDS`, and MongoDB removes the rest after a day (a TTL index, ``tensordb.infra.store``).
"""

from __future__ import annotations

import builtins
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TypedDict, cast

from pymongo import ASCENDING

from tensordb.errors import ConfigurationError
from tensordb.infra.store import Store
from tensordb.jobs.queue import JobResources

WORKERS = "workers"
#: How often a running worker refreshes its document (it also does on every claim and finish).
ADVERTISE_SECONDS = 5.0
#: A worker not seen for this long is taken as gone (it missed three refreshes).
LIVE_SECONDS = 3 * ADVERTISE_SECONDS
#: How long ``nvidia-smi -L`` may take before a worker assumes no GPU.
NVIDIA_SMI_TIMEOUT_SECONDS = 10.0


class WorkerDocument(TypedDict):
    """A document of the ``workers`` collection: one running worker."""

    _id: str  #: the worker id (the ``worker`` of the jobs it claims)
    project: str
    host: str
    pid: int
    slots: int  #: how many slots (concurrent jobs) it offers
    gpus: int  #: how many GPUs it offers
    busy_slots: int
    busy_gpus: int
    running: list[str]  #: the ids of the jobs it runs now
    started_at: datetime
    seen_at: datetime


class Workers:
    """The live workers of one project (see the module docstring)."""

    def __init__(self, store: Store) -> None:
        self.collection = store[WORKERS]

    def advertise(
        self,
        worker_id: str,
        *,
        slots: int,
        gpus: int,
        running: Mapping[str, JobResources],
        started_at: datetime,
        host: str | None = None,
        pid: int | None = None,
    ) -> None:
        """Record what worker ``worker_id`` offers and runs now (creating its document if needed).

        Parameters
        ----------
        worker_id : str
            The worker's id.
        slots, gpus : int
            What the worker offers.
        running : mapping of job id to its resources
            The jobs it runs now and what each occupies.
        started_at : datetime
            When the worker started.
        host, pid : optional
            Where it runs; default: this machine and process.
        """
        document: WorkerDocument = {
            "_id": worker_id,
            "project": self.collection.project,
            "host": host or socket.gethostname(),
            "pid": pid if pid is not None else os.getpid(),
            "slots": slots,
            "gpus": gpus,
            "busy_slots": sum(resources["slots"] for resources in running.values()),
            "busy_gpus": sum(resources["gpus"] for resources in running.values()),
            "running": sorted(running),
            "started_at": started_at,
            "seen_at": datetime.now(UTC),
        }
        self.collection.replace_one({"_id": worker_id}, document, upsert=True)

    def remove(self, worker_id: str) -> bool:
        """Forget worker ``worker_id`` (it stopped cleanly); returns whether it was listed."""
        return self.collection.delete_one({"_id": worker_id}).deleted_count > 0

    def list(self, live_seconds: float = LIVE_SECONDS) -> builtins.list[WorkerDocument]:
        """The workers seen in the last ``live_seconds``, oldest first."""
        since = datetime.now(UTC) - timedelta(seconds=live_seconds)
        found = self.collection.find({"seen_at": {"$gte": since}}).sort("started_at", ASCENDING)
        return [cast(WorkerDocument, document) for document in found]


def capacity(slots: int, gpus: int | None = None) -> tuple[int, int]:
    """The slots and GPUs a worker offers, checked; ``gpus`` None: those detected (:func:`detect_gpus`).

    Raises ``ConfigurationError`` when ``slots`` is not a whole number of at least 1, or ``gpus`` one of at least 0.
    """
    _check_count("slots", slots, minimum=1)
    if gpus is None:
        return slots, detect_gpus()
    _check_count("gpus", gpus, minimum=0)
    return slots, gpus


def _check_count(what: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"a worker's {what} must be a whole number of at least {minimum}, got {value!r}")


def detect_gpus(
    environ: Mapping[str, str] = os.environ,
    which: Callable[[str], str | None] = shutil.which,
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
) -> int:
    """How many GPUs this process may use, found without importing TensorFlow (which takes seconds).

    ``CUDA_VISIBLE_DEVICES`` when set (its entries up to the first negative one, as CUDA reads it:
    ``""`` or ``"-1"`` hides every GPU); else the lines of ``nvidia-smi -L`` when it is on the
    ``PATH``; else 0. ``which`` and ``run`` are replaceable for tests.
    """
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return _count_visible(visible)
    nvidia_smi = which("nvidia-smi")
    if nvidia_smi is None:
        return 0
    try:
        listed = run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_SECONDS, check=False)
    except (OSError, subprocess.SubprocessError):
        return 0
    if listed.returncode != 0:
        return 0
    return sum(1 for line in listed.stdout.splitlines() if line.startswith("GPU "))


def _count_visible(visible: str) -> int:
    count = 0
    for entry in (part.strip() for part in visible.split(",")):
        if not entry or entry.startswith("-"):
            break
        count += 1
    return count
