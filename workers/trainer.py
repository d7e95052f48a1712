"""The trainer worker (``tensordb worker``): a consumer-group member that runs up to ``slots`` jobs at once.

Job requests on Kafka are doorbells; the ``jobs`` collection decides which job runs (atomic claim
of the most urgent pending job that fits the free slots and GPUs), so a lost or duplicated request
never loses or repeats a job. One loop polls the consumer (which keeps the worker in its group),
claims while slots are free and advertises the worker in the ``workers`` collection
(:mod:`tensordb.jobs.workers`). Each running job has a thread of its own and a heartbeat thread
that renews its lease and watches for cancellation; a reaper thread re-queues jobs of workers that
died.

The loop runs under the contract of every loop (:mod:`tensordb.infra.supervision`): a MongoDB or
broker outage is waited out with bounded back-off (a consumer that fails is replaced, and the
publisher replaces a producer that a restarted broker no longer acknowledges), an unexpected
error is logged and the pass tried again, and the loop's state is on ``/ready`` and
``tensordb_loop_ok{loop="worker"}``; a heartbeat outlives an outage shorter than the lease.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from confluent_kafka import Consumer

from tensordb.config import Settings, Topic
from tensordb.errors import UntrustedCodeError
from tensordb.infra import metrics
from tensordb.infra.bus import close_consumer, make_consumer, receive
from tensordb.infra.supervision import Stopping, Supervisor, is_transient
from tensordb.jobs.queue import STATUSES, JobDocument, JobEvent, JobKind, JobResources, Jobs, resources_of
from tensordb.jobs.workers import ADVERTISE_SECONDS, Workers, capacity
from tensordb.models.registry import ModelRegistry
from tensordb.records import Schema
from tensordb.runs.logger import RunLogger
from tensordb.runtime import Runtime
from tensordb.studies.scheduler import StudyScheduler
from workers.context import JobCancelled, JobContext, Runner
from workers.evaluation import run_evaluation
from workers.tasks import run_task
from workers.training import run_training

log = logging.getLogger(__name__)

#: How long the loop waits for a doorbell while jobs run, before looking at the queue anyway.
BUSY_POLL_SECONDS = 0.25
#: The loop's poll step: a slot freed by a finished job is refilled within about this.
POLL_STEP_SECONDS = 0.02


def runners() -> dict[str, Runner]:
    """The runner of each job kind."""
    return {JobKind.TRAIN: run_training, JobKind.EVALUATE: run_evaluation, JobKind.TASK: run_task}


class Worker:
    """Runs jobs of one project, up to ``slots`` at once, until :meth:`stop` is called (or SIGTERM/SIGINT via the CLI)."""

    def __init__(
        self,
        settings: Settings,
        worker_id: str | None = None,
        lease_seconds: float = 30.0,
        idle_scan_seconds: float = 0.5,
        slots: int = 1,
        gpus: int | None = None,
    ) -> None:
        """
        Parameters
        ----------
        settings : Settings
            The project and servers.
        worker_id : str, optional
            The id recorded on claimed jobs and in the ``workers`` collection; default: host, pid and a random part.
        lease_seconds : float
            How long a claimed job stays this worker's without a heartbeat.
        idle_scan_seconds : float
            How long an idle worker waits for a doorbell before looking at the queue anyway.
        slots : int
            How many slots the worker offers: it runs jobs at once as long as their slots fit
            (a job asks for 1 unless submitted with ``slots=``).
        gpus : int, optional
            How many GPUs the worker offers to jobs asking for some; default: those detected
            (:func:`tensordb.jobs.workers.detect_gpus`).

        Raises ``ConfigurationError`` when ``slots`` is not a whole number of at least 1, or ``gpus`` is negative.
        """
        self.slots, self.gpus = capacity(slots, gpus)
        self.settings = settings
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.lease_seconds = lease_seconds
        self.idle_scan_seconds = idle_scan_seconds
        self.runtime = Runtime.open(settings)
        self.store, self.publisher, self.registry = self.runtime.store, self.runtime.publisher, self.runtime.registry
        self.store.ensure_indexes()
        self.jobs = Jobs(self.store, self.publisher)
        self.workers = Workers(self.store)
        self.runners = runners()
        self._stopping = threading.Event()
        self.supervisor = Supervisor("worker", self._stopping)
        self._started_at = datetime.now(UTC)
        # The jobs running now. Added to by the loop (before a job's thread starts, so its slots are
        # busy at once), removed from by the job's thread when it is done. Single dict operations and
        # list() copies are atomic, so no lock: stop() runs in signal handlers, where a lock could deadlock.
        self._running: dict[str, JobContext] = {}
        self._slot_freed = threading.Event()  # set by a job's thread when it ends
        # Claims come from the loop and from a job's thread that just freed its slot: one at a time,
        # so that two never both count the same free slot.
        self._claiming = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None  # the job threads, while run() runs
        self._advertised: frozenset[str] | None = None  # the running job ids last advertised...
        self._advertised_at = 0.0  # ...and when (time.monotonic())

    def run_one(self, name: str | None = None, sort: Sequence[tuple[str, int]] | None = None) -> bool:
        """Claim one pending job (of ``name``) that fits this worker and run it here; returns whether one ran."""
        job = self.jobs.claim(
            self.worker_id, self.lease_seconds, name=name, sort=sort, free_slots=self.slots, free_gpus=self.gpus
        )
        if job is None:
            return False
        self._run_job(self._start_context(job))
        return True

    def close(self) -> None:
        self.runtime.close()

    def stop(self) -> None:
        """Stop after handing every running job back to the queue."""
        self._stopping.set()
        self._hand_back_running()

    def run(self) -> None:
        """The main loop: wait for a doorbell (briefly while jobs run), claim while slots are free,
        advertise the worker, repeat (each pass supervised: see the module docstring)."""
        self._consumer = self._new_consumer()
        reaper = threading.Thread(target=self._reap_forever, name="tensordb-reaper", daemon=True)
        reaper.start()
        self._advertise()
        log.info("worker ready: %s (%d slots, %d GPUs)", self.worker_id, self.slots, self.gpus)
        try:
            with ThreadPoolExecutor(self.slots, thread_name_prefix="tensordb-job") as self._executor:
                try:
                    while not self._stopping.is_set():
                        self.supervisor.wait_out(self._pass, "waiting for and claiming jobs", retry_failures=True)
                except Stopping:
                    pass
                finally:
                    self._hand_back_running()  # also after an error in the loop; the executor waits for them
        finally:
            self._stopping.set()
            close_consumer(self._consumer)
            reaper.join(timeout=5)
            self._withdraw()
            self.supervisor.close()
            self.close()

    # -- the loop's steps ----------------------------------------------------------------------
    def _new_consumer(self) -> Consumer:
        return make_consumer(self.settings, self.settings.consumer_group("workers"), [Topic.JOB_REQUESTS])

    def _pass(self) -> None:
        """One pass of the loop; a consumer that failed is replaced (doorbells are hints: none is needed)."""
        try:
            if self._doorbell_rang(self._consumer):
                self._consumer.commit(asynchronous=True)  # requests are doorbells; the jobs collection is the queue
        except Exception:
            close_consumer(self._consumer)
            self._consumer = self._new_consumer()
            raise
        self._claim_while_free()
        self._advertise_if_due()

    def _doorbell_rang(self, consumer: Consumer) -> bool:
        """Wait for job requests: up to ``BUSY_POLL_SECONDS`` while jobs run, ``idle_scan_seconds``
        when idle, and no longer once a job finishes (its slot is claimed for at once). A request
        reaches one worker of the group, maybe a full one: the others find its job when they look
        at the queue after their wait. Polling also keeps the consumer in its group."""
        deadline = time.monotonic() + (BUSY_POLL_SECONDS if self._running else self.idle_scan_seconds)
        while (left := deadline - time.monotonic()) > 0:
            if any(True for _ in receive(consumer, Schema.JOB_REQUEST, timeout=min(POLL_STEP_SECONDS, left))):
                return True
            if self._slot_freed.is_set():
                break
        self._slot_freed.clear()
        return False

    def _claim_while_free(self) -> None:
        """Claim pending jobs that fit the free slots and GPUs, each started on a thread of its own,
        until none fits (a job asking for more than this worker has is left to others)."""
        assert self._executor is not None, "claims start jobs on run()'s threads"
        with self._claiming:
            while not self._stopping.is_set():
                free = self._free()
                if free["slots"] < 1:
                    return
                job = self.jobs.claim(self.worker_id, self.lease_seconds, free_slots=free["slots"], free_gpus=free["gpus"])
                if job is None:
                    return
                self._executor.submit(self._run_in_slot, self._start_context(job))

    def _free(self) -> JobResources:
        """The slots and GPUs no running job occupies."""
        busy = [resources_of(context.job) for context in list(self._running.values())]
        return {"slots": self.slots - sum(r["slots"] for r in busy), "gpus": self.gpus - sum(r["gpus"] for r in busy)}

    def _advertise_if_due(self) -> None:
        """Refresh the worker's document when its jobs changed, or every ``ADVERTISE_SECONDS``."""
        if frozenset(self._running) != self._advertised or time.monotonic() - self._advertised_at >= ADVERTISE_SECONDS:
            self._advertise()

    def _advertise(self) -> None:
        running = {job_id: resources_of(context.job) for job_id, context in list(self._running.items())}
        self.workers.advertise(self.worker_id, slots=self.slots, gpus=self.gpus, running=running, started_at=self._started_at)
        self._advertised, self._advertised_at = frozenset(running), time.monotonic()

    def _withdraw(self) -> None:
        """Remove the worker's document (a clean stop); if MongoDB does not answer, it ages out of the list."""
        try:
            self.workers.remove(self.worker_id)
        except Exception:  # noqa: BLE001 - stopping must not fail on it
            log.warning("could not remove worker %s from the workers collection", self.worker_id, exc_info=True)

    def _hand_back_running(self) -> None:
        for context in list(self._running.values()):
            context.request_stop("shutdown")

    # -- one job ---------------------------------------------------------------------------------
    def _start_context(self, job: JobDocument) -> JobContext:
        """The context of a claimed job, registered as running (its slots are busy from now on)."""
        logger = RunLogger(self.publisher, run_id=job["_id"], job_id=job["_id"])
        registry = ModelRegistry(self.store, self.publisher)  # its own, so a job waits for its own uploads only
        context = JobContext(job, self.worker_id, self.settings, self.store, self.jobs, registry, logger)
        self._running[job["_id"]] = context
        return context

    def _run_in_slot(self, context: JobContext) -> None:
        """A job's thread: a failure to record the outcome is logged, never ends the worker. The
        thread then refills the slot it freed at once, rather than when the loop next wakes."""
        try:
            self._run_job(context)
        except Exception:  # noqa: BLE001 - the other jobs keep running
            log.exception("could not record the outcome of job %s: its lease will expire and it is re-queued", context.job_id)
        try:
            self._claim_while_free()
        except Exception:  # noqa: BLE001 - the loop claims it at its next pass
            log.warning("could not claim a job after %s ended; the worker's loop will", context.job_id, exc_info=True)

    def _run_job(self, context: JobContext) -> None:
        job, registry, logger = context.job, context.registry, context.logger
        heartbeat = threading.Thread(target=self._heartbeat, args=(context,), name="tensordb-heartbeat", daemon=True)
        heartbeat.start()
        log.info("running %s job %s (attempt %s)", job["kind"], job["_id"], job["attempts"])
        study = (job.get("labels") or {}).get("study")
        try:
            self.jobs.event(job["_id"], JobEvent.STARTED, attempt=job["attempts"], worker=self.worker_id, wait=True)
            result = self.runners[job["kind"]](context)
            if study:  # the trial's work is done: its successor waits in the queue while its end is recorded
                self._fill_study(study, ending=job["_id"])
                study = None
            logger.close()
            registry.wait()
            self.jobs.finish(job["_id"], self.worker_id, result)
        except JobCancelled:
            logger.close()
            registry.wait()
            if context.stop_reason == "cancelled":
                self.jobs.cancelled(job["_id"], self.worker_id)
            elif context.stop_reason == "shutdown":
                self.jobs.release(job["_id"], self.worker_id)
        except Exception as exc:  # noqa: BLE001 - any failure of user code marks the job, never the worker
            log.exception("job %s failed", job["_id"])
            logger.close()
            # refused code is refused on every retry: fail at once with the reason
            self.jobs.fail(job["_id"], self.worker_id, exc, retryable=not isinstance(exc, UntrustedCodeError))
        finally:
            context.stop.set()
            heartbeat.join(timeout=5)
            try:
                registry.close()  # uploads of a failed job: waited for, their errors only logged
            except Exception:  # noqa: BLE001 - the job's outcome is recorded already
                log.warning("a model upload of job %s failed", job["_id"], exc_info=True)
            if study and not self._stopping.is_set():  # a trial that failed or was cancelled
                self._fill_study(study)
            self._running.pop(job["_id"], None)
            self._slot_freed.set()

    def _fill_study(self, study: str, ending: str | None = None) -> None:
        """Submit the study's next trial before freeing the slot, so that this worker claims it at
        once, without waiting for the scheduler to hear of the job's end over the bus (which it
        still does, and finds the slot filled: fills are idempotent and take turns)."""
        try:
            StudyScheduler(self.store, self.publisher, self.registry).fill(study, ending=ending)
        except Exception:  # noqa: BLE001 - the scheduler's processor fills the slot anyway
            log.warning("could not submit study %s's next trial here; the scheduler will", study, exc_info=True)

    def _heartbeat(self, context: JobContext) -> None:
        while not context.stop.wait(min(self.lease_seconds / 3, 1.0)):  # also how fast a cancel is seen
            try:
                job = self.jobs.heartbeat(context.job_id, self.worker_id, self.lease_seconds)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                # an outage: the next beat renews the lease, or finds it lost if the outage outlasted it
                log.warning("job %s: could not renew its lease (%s); trying again", context.job_id, exc)
                continue
            if job is None:
                context.request_stop("lease lost")
            elif job["cancel_requested"]:
                context.request_stop("cancelled")

    def _reap_forever(self) -> None:
        while not self._stopping.wait(max(self.lease_seconds / 2, 0.5)):
            try:
                for job_id in self.jobs.requeue_expired():
                    log.warning("re-queued job %s: its worker stopped heartbeating", job_id)
            except Exception:  # noqa: BLE001 - the reaper must outlive a transient database error
                log.exception("reaper pass failed")


def run(settings: Settings, lease_seconds: float | None = None, slots: int = 1, gpus: int | None = None) -> None:
    """``tensordb worker``: run until SIGINT/SIGTERM.

    Parameters
    ----------
    settings : Settings
        The project and servers.
    lease_seconds : float, optional
        Leases of claimed jobs; default: ``settings.worker_lease_seconds``.
    slots : int
        Jobs (their slots) run at once.
    gpus : int, optional
        GPUs offered to jobs; default: those detected.
    """
    import signal

    worker = Worker(settings, lease_seconds=lease_seconds or settings.worker_lease_seconds, slots=slots, gpus=gpus)
    metrics.watch_jobs(worker.jobs.collection, STATUSES)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: worker.stop())
    worker.run()
