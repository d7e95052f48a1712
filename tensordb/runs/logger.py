"""Step logging from training loops that never waits on the network.

``RunLogger.log`` does only cheap checks on the caller's thread (metric names against the
``log/1`` schema's pattern, values are real numbers, the phase is known) and appends a tuple to a
buffer: a few microseconds, against ~1.5 ms for the synchronous database write per step that the
TensorDB paper measured. A daemon thread drains the buffer every ``interval`` seconds (sooner once
``batch`` records wait), builds ``log/1`` records and hands them to the shared, asynchronous
:class:`~tensordb.infra.bus.Publisher` keyed by run, so a run's records stay ordered in one partition.
The log sink (``streams/logs.py``) persists them to the ``logs`` collection in bulk.

A record is identified by (project, run, phase, step): logging a step twice, or a redelivery,
stores it once (the first write wins). Nothing is lost: ``flush``/``close`` drain the buffer and
wait for the broker's acknowledgement, and every logger still open is flushed at interpreter exit.

Reading the logs back is :mod:`tensordb.runs.queries`.
"""

from __future__ import annotations

import atexit
import logging
import re
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from tensordb import records
from tensordb.config import Topic
from tensordb.errors import BadInputError, DeliveryError, RecordTooLargeError, UnreachableError, ValidationError

if TYPE_CHECKING:
    from tensordb.infra.bus import Publisher
    from tensordb.infra.store import Store

LOGS = "logs"
SCHEMA = records.Schema.LOG.value  # a plain str in the per-step records: the fastest to serialise
PHASES = ("train", "validation", "test")
_PHASES = frozenset(PHASES)
#: The ``propertyNames`` pattern of ``metrics`` in schemas/log.v1.json.
METRIC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_./-]{0,127}$")
#: Columns every DataFrame from :func:`tensordb.runs.queries.read_logs` has, before the metric columns.
BASE_COLUMNS = ("run_id", "job_id", "phase", "step", "epoch", "wall_time")
_SEPARATOR = "\x1f"  # ASCII unit separator: cannot occur in a run id by accident

_log = logging.getLogger(__name__)
_open_loggers: weakref.WeakSet[RunLogger] = weakref.WeakSet()


def log_id(run_id: str, phase: str, step: int) -> str:
    """The ``_id`` of a stored log record: one document per (run, phase, step) of a project.

    The store scopes it by project, since run ids are chosen by users (TensorLayer-era scripts use
    names such as ``"mnist"``) and several projects may share one database.
    """
    return f"{run_id}{_SEPARATOR}{phase}{_SEPARATOR}{step}"


def _invalid(field: str, rule: str, detail: str) -> ValidationError:
    return ValidationError(SCHEMA, field, rule, detail)


def _as_number(name: str, value: Any) -> float | None:
    """A metric value as a float (None for NaN/inf, which JSON cannot carry), or a clear error."""
    if isinstance(value, (str, bytes)):
        raise _invalid(f"metrics.{name}", "type", f"metric {name!r} must be a real number, got the string {value!r}")
    if isinstance(value, np.ndarray) and value.ndim != 0:
        raise _invalid(
            f"metrics.{name}",
            "type",
            f"metric {name!r} is an array of shape {value.shape}: log one number per metric",
        )
    try:
        number = float(value)  # int, bool, NumPy scalars, 0-d arrays, scalar tensors
    except (TypeError, ValueError) as exc:
        raise _invalid(
            f"metrics.{name}", "type", f"metric {name!r} must be a real number, got {type(value).__name__}: {exc}"
        ) from exc
    return number if number - number == 0.0 else None


def _check_name(name: str) -> None:
    if not METRIC_NAME.match(name):
        raise _invalid(
            f"metrics.{name}",
            "propertyNames",
            f"metric name {name!r} must match {METRIC_NAME.pattern} (a letter or '_', then letters, "
            "digits, '_', '.', '/' or '-', at most 128 characters)",
        )


def _check_count(field: str, value: Any) -> int:
    """A step or epoch: a non-negative integer (Python or NumPy)."""
    if isinstance(value, bool):
        raise _invalid(field, "type", f"{field} must be an integer, got a bool")
    try:
        number = int(value) if type(value) is int else value.__index__()
    except AttributeError:
        raise _invalid(field, "type", f"{field} must be an integer, got {type(value).__name__} {value!r}") from None
    if number < 0:
        raise _invalid(field, "minimum", f"{field} must be >= 0, got {number}")
    return number


class RunLogger:
    """Non-blocking logger of one run's training, validation and test metrics.

    ``publisher`` is a shared :class:`~tensordb.infra.bus.Publisher` (thread-safe); the logger never
    closes it. ``log`` is safe to call from several threads. Use as a context manager or call
    :meth:`close`. ``step=None`` means the step after the highest one logged so far in that phase.

    If the broker is unreachable records wait in memory; beyond ``max_buffered`` of them ``log``
    blocks until the background thread catches up (back-pressure instead of unbounded memory).
    """

    def __init__(
        self,
        publisher: Publisher,
        run_id: str,
        job_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        *,
        interval: float = 0.02,
        batch: int = 5000,
        max_buffered: int = 1_000_000,
    ) -> None:
        if not isinstance(run_id, str) or not 1 <= len(run_id) <= 256:
            raise _invalid("run_id", "type", f"run_id must be a string of 1-256 characters, got {run_id!r}")
        if job_id is not None and not isinstance(job_id, str):
            raise _invalid("job_id", "type", f"job_id must be a string, got {type(job_id).__name__}")
        if tags is not None and not isinstance(tags, Mapping):
            raise _invalid("tags", "type", f"tags must be a mapping, got {type(tags).__name__}")
        # run id, job id and tags go into every record: check them once, here
        records.encode(
            {
                "schema": SCHEMA,
                "run_id": run_id,
                **({"job_id": job_id} if job_id is not None else {}),
                "phase": "train",
                "step": 0,
                "metrics": {},
                "wall_time": 0.0,
                **({"tags": dict(tags)} if tags else {}),
            },
            SCHEMA,
        )
        self.publisher = publisher
        self._topic = publisher.settings.topic(Topic.LOGS)
        self.run_id = run_id
        self.job_id = job_id
        # a JSON copy: NumPy values become numbers, and later changes to the caller's dict do not leak in
        self.tags = orjson.loads(orjson.dumps(dict(tags), option=orjson.OPT_SERIALIZE_NUMPY)) if tags else None
        self._interval = interval
        self._batch = batch
        self._max_buffered = max_buffered
        self._known_names: set[str] = set()
        self._next_step = {phase: 0 for phase in PHASES}  # step=None means "the next one"
        self._confirmed = dict(self._next_step)  # steps known to be persisted (wait_persisted)
        self._step_lock = threading.Lock()
        self._buffer: deque[tuple[str, int, int | None, float, dict[str, Any]]] = deque()
        self._drain_lock = threading.Lock()  # one drainer at a time keeps a run's records in order
        self._errors: list[BaseException] = []
        # the publisher's generation when the first record since the last flush was published: the
        # background thread publishes, the caller flushes, so the publisher's own per-thread check
        # cannot see that a replaced producer dropped them
        self._generation: int | None = None
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"tensordb-runlog-{run_id}", daemon=True)
        self._thread.start()
        _open_loggers.add(self)

    # -- the caller's side: cheap checks and an append -------------------------------------------

    def log(self, step: int | None = None, *, phase: str = "train", epoch: int | None = None, **metrics: Any) -> None:
        """Record ``metrics`` of ``step`` (the next step of this phase when None); returns at once.

        Values are real numbers (int, float, NumPy scalars, 0-d arrays); NaN and infinity are
        stored as null. Bad input raises :class:`~tensordb.errors.ValidationError` here, not later.
        """
        if self._closed:
            raise BadInputError(f"RunLogger for run {self.run_id!r} is closed; create a new one")
        if phase not in _PHASES:
            raise _invalid("phase", "enum", f"phase must be one of {', '.join(PHASES)}; got {phase!r}")
        if not metrics:
            raise _invalid("metrics", "minProperties", "log() needs at least one metric, e.g. log(loss=0.3)")
        if not self._known_names.issuperset(metrics):
            for name in metrics:
                _check_name(name)
            self._known_names.update(metrics)
        for value in metrics.values():
            if type(value) is not float or value - value != 0.0:  # noqa: PLR0124 - NaN/inf test
                metrics = {name: _as_number(name, value) for name, value in metrics.items()}
                break
        next_step = self._next_step
        if step is None:
            with self._step_lock:  # two threads never get the same automatic step
                step = next_step[phase]
                next_step[phase] = step + 1
        else:
            if type(step) is not int or step < 0:
                step = _check_count("step", step)
            if step >= next_step[phase]:
                next_step[phase] = step + 1
        if epoch is not None and (type(epoch) is not int or epoch < 0):
            epoch = _check_count("epoch", epoch)
        buffer = self._buffer
        buffer.append((phase, step, epoch, time.time(), metrics))
        if len(buffer) >= self._batch:
            if not self._wake.is_set():
                self._wake.set()
            if len(buffer) >= self._max_buffered:
                self._drain()  # back-pressure: the caller publishes (and waits) itself

    # -- the background side: records, validation, produce ---------------------------------------

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self._interval)
            self._wake.clear()
            try:
                self._drain()
            except BaseException as exc:  # noqa: BLE001 - kept and raised by flush(), never lost
                self._errors.append(exc)

    def _drain(self) -> None:
        """Publish everything buffered so far, in order (callable from any thread).

        Records are valid ``log/1`` by construction: run id, job id and tags were validated
        against the schema in ``__init__``, every other field was checked by ``log``. So they are
        encoded and queued without a second schema pass, which halves the cost per record here
        (~2.6 against ~5.4 µs); the log sink validates every record it receives in any case.
        """
        with self._drain_lock:
            buffer, publish, dumps = self._buffer, self.publisher.publish_bytes, orjson.dumps
            topic, key = self._topic, self.run_id
            base: dict[str, Any] = {"schema": SCHEMA, "run_id": self.run_id}
            if self.job_id is not None:
                base["job_id"] = self.job_id
            if self.tags:
                base["tags"] = self.tags
            if buffer and self._generation is None:
                self._generation = self.publisher.generation
            while buffer:
                phase, step, epoch, wall_time, metrics = buffer.popleft()
                record = {**base, "phase": phase, "step": step, "metrics": metrics, "wall_time": wall_time}
                if epoch is not None:
                    record["epoch"] = epoch
                try:
                    publish(topic, dumps(record), key)
                except (RecordTooLargeError, TypeError) as exc:  # e.g. a step beyond 64 bits: raised by flush()
                    self._errors.append(exc)

    def flush(self, timeout: float = 30.0) -> None:
        """Return once everything logged so far is acknowledged by the broker.

        Raises :class:`~tensordb.errors.DeliveryError` if the broker did not acknowledge every
        record within ``timeout`` seconds, or the error a record failed with in the background.
        """
        self._drain()
        with self._drain_lock:
            generation, self._generation = self._generation, None
        self.publisher.flush(timeout)
        if generation is not None and generation != self.publisher.generation:
            raise DeliveryError(
                f"run {self.run_id!r}: the Kafka producer failed and was replaced while steps were queued; "
                "they were not delivered: log them again"
            )
        if self._errors:
            errors, self._errors = self._errors, []
            raise errors[0]

    def wait_persisted(self, store: Store, timeout: float = 30.0) -> None:
        """Flush, then wait until the log sink has stored the last step logged in each phase
        (records of one run are persisted in order). For code that reads its logs right back."""
        self.flush(timeout)
        logged = dict(self._next_step)
        last = [log_id(self.run_id, phase, step - 1) for phase, step in logged.items() if step > self._confirmed[phase]]
        deadline = time.monotonic() + timeout
        while last and store[LOGS].count_documents({"_id": {"$in": last}}) < len(last):
            if time.monotonic() > deadline:
                raise UnreachableError(
                    f"run {self.run_id!r}: logs were delivered but not persisted within {timeout} s; "
                    "are the processors running (`tensordb processors`)?"
                )
            time.sleep(0.05)
        self._confirmed = logged  # already-confirmed steps may be deleted later: never wait for them again

    def close(self, timeout: float = 30.0) -> None:
        """Flush and stop the background thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join(timeout)
        _open_loggers.discard(self)
        self.flush(timeout)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunLogger(run_id={self.run_id!r}, job_id={self.job_id!r}, buffered={len(self._buffer)})"


@atexit.register
def _flush_open_loggers() -> None:
    """A process that exits without close() still delivers what it logged (if the broker answers)."""
    for logger in list(_open_loggers):
        try:
            logger.close(timeout=10.0)
        except Exception as exc:  # noqa: BLE001 - at exit, say what was lost and go on
            _log.error("could not flush the logs of run %r at exit: %s", logger.run_id, exc)
