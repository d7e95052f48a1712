"""The trainer worker (``tensordb worker``): a consumer-group member that runs one job at a time.

Job requests on Kafka are doorbells; the ``jobs`` collection decides which job runs (atomic claim,
most urgent first), so a lost or duplicated request never loses or repeats a job. While a job runs,
the consumer stays in its group with its partitions paused, a heartbeat thread renews the lease
and watches for cancellation, and a reaper thread re-queues jobs of workers that died.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from tensordb.config import Settings, Topic
from tensordb.errors import UntrustedCodeError
from tensordb.infra.bus import make_consumer, receive
from tensordb.jobs.queue import JobDocument, JobEvent, JobKind, Jobs
from tensordb.records import Schema
from tensordb.runs.logger import RunLogger
from tensordb.runtime import Runtime
from workers.context import JobCancelled, JobContext, Runner
from workers.evaluation import run_evaluation
from workers.tasks import run_task
from workers.training import run_training

log = logging.getLogger(__name__)


def runners() -> dict[str, Runner]:
    """The runner of each job kind."""
    return {JobKind.TRAIN: run_training, JobKind.EVALUATE: run_evaluation, JobKind.TASK: run_task}


class Worker:
    """Runs jobs of one project until :meth:`stop` is called (or SIGTERM/SIGINT via the CLI)."""

    def __init__(
        self, settings: Settings, worker_id: str | None = None, lease_seconds: float = 30.0, idle_scan_seconds: float = 2.0
    ) -> None:
        self.settings = settings
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.lease_seconds = lease_seconds
        self.idle_scan_seconds = idle_scan_seconds
        self.runtime = Runtime.open(settings)
        self.store, self.publisher, self.registry = self.runtime.store, self.runtime.publisher, self.runtime.registry
        self.store.ensure_indexes()
        self.jobs = Jobs(self.store, self.publisher)
        self.runners = runners()
        self._stopping = threading.Event()
        self._current: JobContext | None = None

    def run_one(self, name: str | None = None, sort: Sequence[tuple[str, int]] | None = None) -> bool:
        """Claim one pending job (of ``name``) and run it here; returns whether one ran."""
        job = self.jobs.claim(self.worker_id, self.lease_seconds, name=name, sort=sort)
        if job is None:
            return False
        self._run_job(job)
        return True

    def close(self) -> None:
        self.runtime.close()

    def stop(self) -> None:
        """Stop after handing the running job (if any) back to the queue."""
        self._stopping.set()
        if self._current is not None:
            self._current.request_stop("shutdown")

    def run(self) -> None:
        """The main loop: wait for a doorbell (or scan now and then), claim, run, repeat."""
        consumer = make_consumer(
            self.settings, f"{self.settings.topic_prefix}-{self.settings.project}-workers", [Topic.JOB_REQUESTS]
        )
        reaper = threading.Thread(target=self._reap_forever, name="tensordb-reaper", daemon=True)
        reaper.start()
        log.info("worker ready: %s", self.worker_id)
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="tensordb-job") as executor:
                while not self._stopping.is_set():
                    rang = any(True for _ in receive(consumer, Schema.JOB_REQUEST, timeout=self.idle_scan_seconds))
                    if rang:
                        consumer.commit(asynchronous=True)  # requests are doorbells; the jobs collection is the queue
                    job = self.jobs.claim(self.worker_id, self.lease_seconds)
                    if job is None:
                        continue
                    consumer.pause(consumer.assignment())
                    running = executor.submit(self._run_job, job)
                    while not running.done():  # keep the group membership alive while busy
                        consumer.poll(0.2)
                    consumer.resume(consumer.assignment())
                    running.result()
        finally:
            self._stopping.set()
            consumer.close()
            reaper.join(timeout=5)
            self.close()

    def _run_job(self, job: JobDocument) -> None:
        logger = RunLogger(self.publisher, run_id=job["_id"], job_id=job["_id"])
        context = JobContext(job, self.worker_id, self.settings, self.store, self.jobs, self.registry, logger)
        self._current = context
        heartbeat = threading.Thread(target=self._heartbeat, args=(context,), name="tensordb-heartbeat", daemon=True)
        heartbeat.start()
        log.info("running %s job %s (attempt %s)", job["kind"], job["_id"], job["attempts"])
        try:
            self.jobs.event(job["_id"], JobEvent.STARTED, attempt=job["attempts"], worker=self.worker_id)
            result = self.runners[job["kind"]](context)
            logger.close()
            self.registry.wait()
            self.jobs.finish(job["_id"], self.worker_id, result)
        except JobCancelled:
            logger.close()
            self.registry.wait()
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
            self._current = None
            context.stop.set()
            heartbeat.join(timeout=5)

    def _heartbeat(self, context: JobContext) -> None:
        while not context.stop.wait(min(self.lease_seconds / 3, 1.0)):  # also how fast a cancel is seen
            job = self.jobs.heartbeat(context.job_id, self.worker_id, self.lease_seconds)
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


def run(settings: Settings, lease_seconds: float | None = None) -> None:
    """``tensordb worker``: run until SIGINT/SIGTERM (leases of ``lease_seconds``, default the setting)."""
    import signal

    worker = Worker(settings, lease_seconds=lease_seconds or settings.worker_lease_seconds)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: worker.stop())
    worker.run()
