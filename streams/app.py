"""The stream processors of a project: one processor per TensorDB topic, in one process.

Each processor kind consumes its topic in its own consumer group (:mod:`streams.consumer`), so
``tensordb processors`` started several times, on any machines, shares the partitions of every
topic; each validates its records, dead-letters what fails and hands the valid ones to its handler:

================  ================  =================================================================
kind              topic             handler
================  ================  =================================================================
ingest            ingest            samples to GridFS + metadata, announced (:mod:`streams.ingest`)
retrain           data-imported     policy counters, train jobs (:mod:`streams.retrain`)
lifecycle         job-events        evaluation, promotion decisions (:mod:`streams.lifecycle`)
log-sink          logs              step logs in bulk (:mod:`streams.logs`)
study-rungs       logs              trials' validation metrics: ASHA verdicts (:mod:`streams.studies`)
study-trials      job-events        trials that ended: next trials, studies ended (:mod:`streams.studies`)
stage-NAME        data-imported     one per active transform stage: derived samples (:mod:`streams.stages`)
job-requests      job-requests      validated only (workers consume the requests)
model-events      model-events      validated only (model servers consume the events)
predict-requests  predict-requests  validated only (``tensordb predictor`` answers the requests)
predictions       predictions       validated only (dashboards, stages and clients read the answers)
================  ================  =================================================================

Stage consumers start and stop as stages are registered, paused and resumed (checked by the
timer), and a backfill runner applies stages to stored samples on request. A timer starts
time-triggered policies, reconciles running studies (trials whose end no event reported, free
slots) and, hourly, removes sample blobs no sample references (:func:`streams.ingest.sweep_sample_blobs`). SIGTERM or SIGINT stops every processor within seconds:
batches in hand finish (or, in an outage, stay uncommitted and are read again later).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable

from streams.consumer import VALIDATION_FETCH_WAIT_MS, TopicProcessor
from streams.ingest import handle_samples, sweep_sample_blobs
from streams.lifecycle import handle_job_events
from streams.logs import log_sink, tune_gc_for_batches
from streams.processing import Handler, ProcessorContext
from streams.retrain import handle_imports, run_timed_triggers
from streams.stages import StageProcessors
from streams.studies import reconcile_studies, study_processors
from tensordb.config import PROCESSOR_TOPICS, Settings
from tensordb.infra.bus import FETCH_WAIT_MS
from tensordb.infra.logging import configure_logging
from tensordb.infra.supervision import Stopping
from tensordb.stages.stages import Stages

log = logging.getLogger(__name__)

#: (handler, batch size) of every processor kind but the log sink's and the studies'; its topic is PROCESSOR_TOPICS[kind].
HANDLERS: dict[str, tuple[Handler | None, int]] = {
    "ingest": (handle_samples, 2000),
    "retrain": (handle_imports, 500),
    "lifecycle": (handle_job_events, 200),
    "job-requests": (None, 2000),
    "model-events": (None, 2000),
    "predict-requests": (None, 2000),
    "predictions": (None, 2000),
}
#: Batches persisted at once, for kinds whose batches may be stored in any order (see
#: :class:`~streams.consumer.TopicProcessor`): one batch's Python work overlaps another's wait for MongoDB.
WRITERS: dict[str, int] = {"ingest": 2}
TIMER_SECONDS = 5.0
SWEEP_SECONDS = 3600.0
READY_LINE = "processors ready"
STOP_SECONDS = 20.0


class Processors:
    """Every processor of a project, run together (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.processors = [
            TopicProcessor(
                settings, kind, PROCESSOR_TOPICS[kind], handler, batch_size, writers=WRITERS.get(kind, 1),
                fetch_wait_ms=FETCH_WAIT_MS if handler is not None else VALIDATION_FETCH_WAIT_MS,
            )
            for kind, (handler, batch_size) in HANDLERS.items()
        ] + [log_sink(settings), *study_processors(settings)]  # fmt: skip
        self.timers = ProcessorContext(settings, processor="timers")
        self.stages = StageProcessors(settings, holder=f"{socket.gethostname()}-{os.getpid()}")
        self._stop = threading.Event()
        self._next_sweep = time.monotonic()

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Run until :meth:`stop`; then stop every processor and wait (bounded) for them."""
        threads = [
            threading.Thread(target=processor.run, name=f"tensordb-{processor.kind}", daemon=True)
            for processor in self.processors
        ]
        for thread in threads:
            thread.start()
        self.stages.start()
        self._run_timers()  # stages registered before the start run at once
        if on_ready is not None:
            on_ready()
        while not self._stop.wait(TIMER_SECONDS):
            self._run_timers()
        deadline = time.monotonic() + STOP_SECONDS
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.stages.stop(wait=lambda thread: thread.join(max(0.0, deadline - time.monotonic())))
        if any(thread.is_alive() for thread in threads):
            log.error("some processors did not stop within %.0f s; their uncommitted batches will be read again", STOP_SECONDS)
        self.timers.close()

    def _run_timers(self) -> None:
        try:
            self.timers.wait_out(lambda: run_timed_triggers(self.timers), "starting time-triggered policies")
        except Stopping:
            pass
        except Exception:  # noqa: BLE001 - a bad policy must not stop the processors
            log.exception("timed triggers failed; trying again in %.0f s", TIMER_SECONDS)
        try:
            self.timers.wait_out(lambda: self.stages.reconcile(Stages(self.timers.store)), "starting and stopping stages")
        except Stopping:
            pass
        except Exception:  # noqa: BLE001 - a bad stage must not stop the processors
            log.exception("starting or stopping stages failed; trying again in %.0f s", TIMER_SECONDS)
        try:
            self.timers.wait_out(lambda: reconcile_studies(self.timers), "reconciling running studies")
        except Stopping:
            pass
        except Exception:  # noqa: BLE001 - a study that cannot be scheduled must not stop the processors
            log.exception("reconciling studies failed; trying again in %.0f s", TIMER_SECONDS)
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + SWEEP_SECONDS
            try:
                swept = sweep_sample_blobs(self.timers.store)
            except Exception:  # noqa: BLE001 - an outage: the next sweep tries again
                log.exception("sweeping orphaned sample blobs failed; trying again in %.0f s", SWEEP_SECONDS)
            else:
                if swept:
                    log.info("removed %d orphaned sample blobs", swept)

    def stop(self) -> None:
        """Ask every processor to stop (safe from a signal handler): waits for an outage end now."""
        self._stop.set()
        self.timers.stopping.set()
        for processor in self.processors:
            processor.stop()
        self.stages.stop(wait=lambda thread: None)  # run() waits for them


def run(settings: Settings, loglevel: str | None = None) -> None:
    """Run the processors in the foreground until SIGTERM or SIGINT (``tensordb processors``)."""
    configure_logging(settings, level=loglevel)
    tune_gc_for_batches()
    processors = Processors(settings)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack: where a processor waits
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: processors.stop())
    processors.run(
        on_ready=lambda: log.info("%s: project %r, %d processor kinds", READY_LINE, settings.project, len(processors.processors))
    )
    log.info("processors stopped")
