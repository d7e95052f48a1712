"""One supervision contract for every loop that consumes a topic or polls the store.

The stream processors defined it (:mod:`streams.processing`); the streaming predictor, the model
server's promotion follower, the worker's claim loop and the dashboard's live feed run under the
same one, from here:

- :func:`is_transient` tells an outage (MongoDB or Kafka unreachable, a broker that does not
  acknowledge) from a failure of the work itself, which is answered, dead-lettered or retried;
- :meth:`Supervisor.wait_out` runs one step until it succeeds, waiting out outages of any length
  with bounded back-off (a publisher replaces a failed or stuck producer by itself:
  :class:`~tensordb.infra.bus.Publisher`), and raises :class:`Stopping` when the loop is asked to
  stop meanwhile, so the step's records stay uncommitted and are read again;
- :meth:`Supervisor.start_thread` runs a loop on a thread that is started again when it dies;
- what each loop waits for is its state: ``tensordb_loop_ok{loop}`` and ``/ready``
  (:func:`tensordb.infra.metrics.loop_state`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from confluent_kafka import KafkaException
from pymongo.errors import ConnectionFailure, OperationFailure, WriteConcernError

from tensordb.errors import DeliveryError
from tensordb.infra import metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

#: MongoDB error codes of a server that is shutting down, starting, or changing primary.
_TRANSIENT_CODES = {6, 7, 89, 91, 189, 9001, 10107, 11600, 11602, 13435, 13436}
#: How long a supervised loop's MongoDB calls wait for a server before counting as an outage, so
#: that a stop request is noticed within seconds even in the middle of one.
SERVER_WAIT_MS = 5000
#: How long a supervised loop's flush waits for acknowledgements: longer means a broker that is
#: down or forgot this producer (the publisher then replaces its producer).
FLUSH_SECONDS = 8.0
#: The longest wait between two tries of a step.
MAX_BACKOFF = 5.0


class Stopping(Exception):
    """The loop was asked to stop while waiting out an outage; the step was not completed."""


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` means "unreachable now" (wait it out) rather than "this input is bad"."""
    if isinstance(error, ConnectionFailure | KafkaException | DeliveryError | WriteConcernError):
        return True
    if isinstance(error, OperationFailure):
        return error.code in _TRANSIENT_CODES or error.has_error_label("RetryableWriteError")
    return False


class Supervisor:
    """Runs the steps of one loop under the contract (see the module docstring).

    Parameters
    ----------
    loop:
        The loop's name in logs, ``tensordb_loop_ok`` and ``/ready`` (``ingest``, ``predictor``...).
    stopping:
        Set when the loop should stop: waits end early then (a new event by default).
    """

    def __init__(self, loop: str, stopping: threading.Event | None = None) -> None:
        self.loop = loop
        self.stopping = stopping if stopping is not None else threading.Event()
        self._status = "ok"
        metrics.loop_state(loop, None)

    @property
    def status(self) -> str:
        """What the loop is doing: "ok", or what it waits for (also in metrics and on ``/ready``)."""
        return self._status

    @status.setter
    def status(self, status: str) -> None:
        self._status = status
        metrics.loop_state(self.loop, None if status == "ok" else status)

    def wait_out(self, call: Callable[[], T], what: str, retry_failures: bool = False) -> T:
        """Run ``call`` until it succeeds, waiting out MongoDB/Kafka outages with bounded back-off.

        Parameters
        ----------
        call:
            The step; it must be safe to run again after it failed (idempotent).
        what:
            What the step does, for the status and the log ("claiming jobs").
        retry_failures:
            Also retry errors that are not outages (logged with their traceback), for a step that
            must not end its loop on a bug: the loop stalls visibly instead. Otherwise they are
            raised to the caller.

        Raises :class:`Stopping` if the loop stops meanwhile.
        """
        delay, started = 0.2, time.monotonic()
        while True:
            if self.stopping.is_set():
                raise Stopping(what)
            try:
                result = call()
            except Exception as exc:
                transient = is_transient(exc)
                if not transient and not retry_failures:
                    raise
                waited = time.monotonic() - started
                if transient:
                    self.status = f"waiting since {waited:.0f} s: {what}: {exc}"
                    log.warning("%s: %s; retrying in %.1f s", self.loop, self.status, delay)
                else:
                    self.status = f"failing since {waited:.0f} s: {what}: {type(exc).__name__}: {exc}"
                    log.exception("%s: %s failed; retrying in %.1f s", self.loop, what, delay)
                self.stopping.wait(delay)
                delay = min(delay * 2, MAX_BACKOFF)
                continue
            if self.status != "ok":
                log.warning("%s recovered after %.1f s: %s", self.loop, time.monotonic() - started, what)
                self.status = "ok"
            return result

    def close(self) -> None:
        """The loop ended: its state no longer counts (``/ready``, ``tensordb_loop_ok``)."""
        metrics.forget_loop(self.loop)

    def working(self) -> None:
        """Say the loop works again (a supervised thread calls it after each pass that succeeded)."""
        if self.status != "ok":
            log.warning("%s works again", self.loop)
            self.status = "ok"

    def start_thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        """Run the loop ``target`` on a daemon thread, started again (after bounded back-off)
        whenever it raises or returns before :attr:`stopping` is set. Until ``target`` calls
        :meth:`working`, the loop's status says it died and why; once stopped, the loop is closed."""

        def forever() -> None:
            try:
                restart_forever()
            finally:
                self.close()

        def restart_forever() -> None:
            delay = 0.2
            while not self.stopping.is_set():
                began = time.monotonic()
                try:
                    target()
                    problem = "it returned by itself"
                except Exception as exc:  # noqa: BLE001 - any death is answered with a restart
                    problem = f"{type(exc).__name__}: {exc}"
                    log.exception("%s: %s died", self.loop, name)
                if self.stopping.is_set():
                    return
                if time.monotonic() - began > 60 * MAX_BACKOFF:
                    delay = 0.2  # it ran for a while: restart it at once, as after its first death
                self.status = f"{name} died ({problem}); restarting it in {delay:.1f} s"
                log.warning("%s: %s", self.loop, self.status)
                self.stopping.wait(delay)
                delay = min(delay * 2, MAX_BACKOFF)

        thread = threading.Thread(target=forever, name=name, daemon=True)
        thread.start()
        return thread
