"""What every processor does with a batch: divert invalid records, run the handler, make it durable.

The contract, for every topic: each record of a batch ends stored (by the topic's handler) or
dead-lettered with a reason, and :func:`process_batch` returns only when that is durable, so the
caller may then commit the batch's offsets. Outages of MongoDB or Kafka of any length are waited
out with bounded back-off (every call: handler, dead letters, flush, progress; the contract every
loop shares, :mod:`tensordb.infra.supervision`), a failed producer is replaced, and a record the
handler cannot process is set aside alone (the batch is halved until it is). When the processor is
asked to stop while waiting, :class:`~tensordb.infra.supervision.Stopping` is raised and the batch
stays uncommitted (redelivered).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from pymongo.errors import BulkWriteError

from tensordb.config import Settings
from tensordb.errors import DeliveryError
from tensordb.infra import metrics
from tensordb.infra.bus import Publisher, Received
from tensordb.infra.dead_letters import DeadLetters
from tensordb.infra.store import DUPLICATE_KEY, PROGRESS, Store
from tensordb.infra.supervision import FLUSH_SECONDS, SERVER_WAIT_MS, Stopping, Supervisor, is_transient
from tensordb.models.registry import ModelRegistry
from tensordb.runtime import Runtime

log = logging.getLogger(__name__)

#: A processor of valid records: gets the context and a batch, raises on failure.
Handler = Callable[["ProcessorContext", list[Received]], None]
T = TypeVar("T")


@dataclass
class ProcessorContext:
    """What every handler needs: settings, the store, a publisher, the dead-letter path, the registry.

    ``stopping`` is set when the processor should stop; waits for an outage end early then.
    """

    settings: Settings
    processor: str = "streams"
    #: whether batches count in ``processor_progress`` (one processor kind per topic does, so a
    #: second reader of a topic, like the study scheduler's, does not count its records twice)
    counts_progress: bool = True
    stopping: threading.Event = field(default_factory=threading.Event)
    supervisor: Supervisor = field(init=False)
    store: Store = field(init=False)
    publisher: Publisher = field(init=False)
    dead_letters: DeadLetters = field(init=False)
    registry: ModelRegistry = field(init=False)
    runtime: Runtime = field(init=False)

    def __post_init__(self) -> None:
        self.supervisor = Supervisor(self.processor, self.stopping)
        # a flush that takes more than seconds means a broker that is down or forgot this producer
        self.runtime = self.wait_out(
            lambda: Runtime.open(self.settings, server_wait_ms=SERVER_WAIT_MS, flush_timeout=FLUSH_SECONDS),
            "connecting to MongoDB",
        )
        self.store, self.publisher, self.registry = self.runtime.store, self.runtime.publisher, self.runtime.registry
        self.wait_out(self.store.ensure_indexes, "preparing MongoDB collections")
        self.dead_letters = DeadLetters(self.store, self.publisher, processor=self.processor)

    def wait_out(self, call: Callable[[], T], what: str) -> T:
        """Run ``call`` until it succeeds, waiting out MongoDB/Kafka outages with bounded back-off
        (:meth:`tensordb.infra.supervision.Supervisor.wait_out`); errors that are not outages are
        raised to the caller. Raises :class:`Stopping` if the processor stops meanwhile."""
        return self.supervisor.wait_out(call, what)

    @property
    def status(self) -> str:
        """What the processor is doing now ("ok", or what it waits for), for operators."""
        return self.supervisor.status

    @status.setter
    def status(self, status: str) -> None:
        self.supervisor.status = status

    def close(self) -> None:
        """Flush (5 s at most: a stop must not wait on a broker that is down) and disconnect."""
        self.supervisor.close()
        try:
            self.runtime.close(timeout=5.0)
        except DeliveryError as exc:  # their batches' offsets were not committed: read again after a restart
            log.warning("%s processor closed with undelivered records: %s", self.processor, exc)


def last_offsets(batch: list[Received]) -> dict[tuple[str, int], int]:
    """The last offset of each topic partition in ``batch`` (a consumer delivers a partition's
    records in offset order, so the last one seen is the highest)."""
    return {(received.topic, received.partition): received.offset for received in batch}


def record_progress(store: Store, batch: list[Received]) -> None:
    """Count valid and invalid records and the last offset processed, per topic partition.

    ``processor_progress`` shows that a processor keeps up (ingest rates on the dashboard) and
    lets operators see how far each partition has been processed.
    """
    records = Counter((received.topic, received.partition) for received in batch)
    invalid = Counter((received.topic, received.partition) for received in batch if received.error is not None)
    last = last_offsets(batch)
    totals = {
        key: {"valid": count - invalid[key], "invalid": invalid[key], "offset": last[key]} for key, count in records.items()
    }
    now = datetime.now(UTC)
    updates: list[tuple[Mapping[str, Any], Mapping[str, Any]]] = [
        (
            {"_id": f"{topic}:{partition}"},
            {
                "$set": {
                    "project": store.project, "topic": topic, "partition": partition, "updated_at": now,
                    "last_offset": entry["offset"],  # the latest, even after the broker's offsets restart
                },
                "$inc": {"valid": entry["valid"], "invalid": entry["invalid"]},
            },
        )
        for (topic, partition), entry in totals.items()
    ]  # fmt: skip
    for attempt in range(3):
        try:
            store[PROGRESS].upsert_many(updates)
            return
        except BulkWriteError as exc:  # two writers of a processor raced to create a partition's document
            errors = exc.details.get("writeErrors", [])
            if attempt == 2 or exc.details.get("writeConcernErrors") or any(e["code"] != DUPLICATE_KEY for e in errors):
                raise
            updates = updates[errors[0]["index"] :]  # an ordered bulk write: those before it were applied


def process_batch(context: ProcessorContext, batch: list[Received], handler: Handler | None) -> None:
    """Divert the invalid records of a batch, process the valid ones, and make both durable.

    Returns only when every record is stored or dead-lettered and the records published meanwhile
    are acknowledged; raises only :class:`Stopping` (see the module docstring). An outage at any
    step retries the whole batch, which is safe because every step is idempotent: a record whose
    delivery failed is published again rather than forgotten.
    """
    context.wait_out(lambda: _process_once(context, batch, handler), f"processing a batch of {len(batch)} records")


def _process_once(context: ProcessorContext, batch: list[Received], handler: Handler | None) -> None:
    started = time.monotonic()
    invalid = [(received, received.error) for received in batch if received.error is not None]
    if invalid:
        context.dead_letters.divert_many(invalid)
    valid = [received for received in batch if received.error is None and not received.skipped]
    if valid and handler is not None:
        _handle(context, valid, handler)
    context.publisher.flush()
    if context.counts_progress:
        record_progress(context.store, batch)
    metrics.observe_batch(context.processor, batch, time.monotonic() - started)


def _handle(context: ProcessorContext, valid: list[Received], handler: Handler, whole: bool = True) -> None:
    """Run the handler; isolate the records it cannot process.

    Handlers are idempotent, so a batch that failed can be retried in parts: it is halved until
    the records that fail on their own are alone, and those become dead letters with the error.
    A few bad records in a batch of n cost about 2 log2(n) calls each, not n calls (each a durable
    write). Outages propagate, so the caller waits them out and retries the batch; so does a stop
    (the batch stays uncommitted).
    """
    try:
        handler(context, valid)
        return
    except Exception as exc:
        if _not_the_records(exc):
            raise
        if len(valid) == 1:
            context.dead_letters.divert(valid[0], exc)  # set aside, never lost
            return
        if whole:
            log.warning("%s processor: a batch of %d records failed (%s: %s); isolating the records that fail",
                        context.processor, len(valid), type(exc).__name__, exc)  # fmt: skip
    half = len(valid) // 2
    _handle(context, valid[:half], handler, whole=False)
    _handle(context, valid[half:], handler, whole=False)


def _not_the_records(error: BaseException) -> bool:
    """Whether ``error`` says nothing about the records: an outage (waited out), or a stop while the
    handler waited (a stage that paused itself waits like one a person paused: the batch stays
    uncommitted and is derived after ``resume``), never a reason to dead-letter them."""
    return is_transient(error) or isinstance(error, Stopping)
