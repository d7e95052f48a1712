"""One processor kind on one topic: a batched librdkafka consumer that commits only what is durable.

Every instance of a kind (``tensordb processors`` started several times, for one project or several
sharing a database) joins the kind's consumer group, ``PREFIX.PROJECT.KIND``, so instances share
the topic's partitions and take over those of an instance that dies.

Two threads per processor (or more): the reader polls batches of up to ``batch_size`` records
(returning as soon as one arrives), validates them and commits the offsets of batches already
persisted; the writer persists each batch with :func:`~streams.processing.process_batch`, which
returns only when every record is stored or dead-lettered durably. Offsets are committed after
that, never before, so a crash or a stop in the middle of a batch leaves it to be read again
(at-least-once; every handler is idempotent). A kind whose batches are independent of each other
(ingest, logs) may run several writers, so that one batch's Python work overlaps another's wait
for MongoDB's journaled writes; offsets are still committed in the order the batches were read,
and only up to the first batch not persisted yet. A consumer that fails fatally is replaced; a broker outage is waited out.

A topic that is recreated (a memory broker that restarted, or a topic deleted and created again)
starts its offsets at 0 again, below the consumer's positions: the processor notices the topic's
new id (checked every few seconds), reads the new topic from its start, and never commits offsets
of the old one to it, so records published after the restart are not skipped.

Why not faust's agents: ``Stream.take_events`` acknowledges a taken batch in a ``finally`` block
even when processing raised, so a batch that failed during an outage was committed at shutdown
and lost; its aiokafka consumer waits a fixed 1.5 s on an empty fetch (0.35-0.8 s a hop against
Tansu); and a broker unreachable at start-up stops the whole app instead of being waited out.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicCollection, TopicPartition
from confluent_kafka.admin import AdminClient

from streams.processing import Handler, ProcessorContext, last_offsets, process_batch
from tensordb import records
from tensordb.config import Settings, Topic
from tensordb.errors import FatalClientError
from tensordb.infra import metrics
from tensordb.infra.bus import FETCH_WAIT_MS, Received, close_consumer, make_consumer, receive
from tensordb.infra.supervision import Stopping

log = logging.getLogger(__name__)
#: How often a processor checks whether its topic was recreated.
TOPIC_CHECK_SECONDS = 3.0
#: How long the broker may hold a fetch of the processors that only validate a topic (nothing waits
#: on them): fewer fetches for the broker to serve than the short :data:`~tensordb.infra.bus.FETCH_WAIT_MS`
#: of those that act on their records.
VALIDATION_FETCH_WAIT_MS = 500


class TopicProcessor:
    """Consumes one topic for one processor kind (see the module docstring).

    Parameters
    ----------
    settings:
        The project, brokers and database.
    kind:
        The processor kind; names the consumer group (``Settings.processor_group``).
    topic:
        The topic consumed; its records are validated against the topic's schema.
    handler:
        Persists a batch of valid records (idempotently); None for topics that are only validated.
    batch_size:
        Most records handed to the handler at once.
    select:
        A test of each message's key: the others are not decoded or handled (their offsets are
        committed), for a processor that reads a few records of a busy topic.
    counts_progress:
        Whether batches count in ``processor_progress`` (False for a second reader of a topic).
    writers:
        Batches persisted at once (threads); more than 1 only for handlers whose batches may be
        stored in any order.
    fetch_wait_ms:
        How long the broker may hold a fetch (:data:`FETCH_WAIT_MS`): what a record waits at most
        on a broker that answers at the end of the wait.
    client_options:
        librdkafka consumer options, over :func:`~tensordb.infra.bus.make_consumer`'s.
    """

    def __init__(
        self,
        settings: Settings,
        kind: str,
        topic: Topic,
        handler: Handler | None,
        batch_size: int = 2000,
        poll_timeout: float = 0.1,
        select: Callable[[bytes | None], bool] | None = None,
        counts_progress: bool = True,
        writers: int = 1,
        fetch_wait_ms: int = FETCH_WAIT_MS,
        **client_options: Any,
    ) -> None:
        self.settings = settings
        self.kind = kind
        self.topic = topic
        self.handler = handler
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self.select = select
        self.group = settings.processor_group(kind)
        self._client_options = {"fetch.wait.max.ms": fetch_wait_ms, **client_options}
        self.context = ProcessorContext(settings, processor=kind, counts_progress=counts_progress)
        self.processed = 0  # records handled so far, stored or dead-lettered
        self.writers = writers
        self._stop = self.context.stopping
        self._processed_lock = threading.Lock()
        # (sequence number, incarnation, batch): the sequence orders the commits of several writers
        self._batches: queue.Queue[tuple[int, int, list[Received]] | None] = queue.Queue(maxsize=max(2, writers))
        self._read = 0  # batches handed to the writers so far: the next batch's sequence number
        self._persisted_offsets: queue.Queue[tuple[int, int, dict[tuple[str, int], int]]] = queue.Queue()
        self._persisted: dict[int, tuple[int, dict[tuple[str, int], int]]] = {}  # persisted, not yet committable
        self._committed = 0  # sequence number of the first batch whose offsets are not committed
        self._admin = AdminClient(settings.kafka_config())
        self._topic_id = self._current_topic_id()
        self._incarnation = 0  # how often the topic was found recreated; tags batches and their offsets
        self._rewinding = False  # a recreated topic was noticed and its partitions are not rewound yet
        self._checked_at = time.monotonic()
        self.consumer = self._new_consumer()

    def _new_consumer(self) -> Consumer:
        return make_consumer(
            self.settings, self.group, [self.topic], **metrics.lag_statistics(self.group), **self._client_options
        )

    def _current_topic_id(self) -> str | None:
        """The topic's id (new for each creation of a topic of that name), or None if unknown now."""
        name = self.settings.topic(self.topic)
        try:
            return str(self._admin.describe_topics(TopicCollection([name]))[name].result(timeout=5).topic_id)
        except Exception:  # noqa: BLE001 - broker down, topic missing, or a broker without topic ids
            return None

    def _check_topic(self) -> None:
        """Rewind the consumer if the topic was recreated (see the module docstring)."""
        if time.monotonic() - self._checked_at < TOPIC_CHECK_SECONDS:
            return
        self._checked_at = time.monotonic()
        topic_id = self._current_topic_id()
        if topic_id is None:
            return
        if self._topic_id is not None and topic_id != self._topic_id:
            if not self._rewinding:
                log.warning("%s processor: topic %s was recreated (the broker restarted and forgot it?): reading it from its start",
                            self.kind, self.settings.topic(self.topic))  # fmt: skip
                self._rewinding = True
            self._incarnation += 1
            if not self._rewind():
                return  # the change is noticed, and the rewind tried, again at the next check
            self._rewinding = False
        self._topic_id = topic_id

    def _rewind(self) -> bool:
        """Read the assigned partitions from offset 0 again, and commit 0 over any offset of the old
        topic committed before the change was noticed. The group membership is kept: a new member
        would wait for the coordinator to forget the old one."""
        try:
            assigned = self.consumer.assignment()
            if not assigned:
                return False  # rejoining the group after the restart: rewind once partitions are assigned
            for partition in assigned:
                self.consumer.seek(TopicPartition(partition.topic, partition.partition, OFFSET_BEGINNING))
            self.consumer.commit(offsets=[TopicPartition(p.topic, p.partition, 0) for p in assigned], asynchronous=False)
        except KafkaException as exc:  # not fetching yet, or the broker went away again
            log.warning("%s processor: could not rewind the recreated topic yet (%s)", self.kind, exc)
            return False
        log.info("%s processor: rewound partitions %s of the recreated topic", self.kind, sorted(p.partition for p in assigned))
        return True

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Consume until :meth:`stop`, then commit what was persisted and close.

        ``on_ready`` is called once the consumer has joined its group and has partitions.
        """
        schema = records.TOPIC_RECORDS[self.topic]
        writers = [
            threading.Thread(target=self._write_batches, name=f"tensordb-{self.kind}-writer-{number}", daemon=True)
            for number in range(self.writers)
        ]
        for writer in writers:
            writer.start()
        delay = 0.2
        try:
            while not self._stop.is_set():
                self._check_topic()  # before reading: a batch is tagged with the topic it was read from
                try:
                    batch = list(
                        receive(
                            self.consumer, schema, timeout=self.poll_timeout, max_messages=self.batch_size, select=self.select
                        )
                    )
                except FatalClientError as exc:
                    log.error("%s processor: %s; replacing the consumer", self.kind, exc)
                    self._close_consumer()
                    self.consumer = self._new_consumer()
                    continue
                except KafkaException as exc:  # the broker is unreachable: wait it out
                    self.context.status = f"waiting for Kafka: {exc}"
                    log.warning("%s processor %s; retrying in %.1f s", self.kind, self.context.status, delay)
                    self._stop.wait(delay)
                    delay = min(delay * 2, 10.0)
                    continue
                delay = 0.2
                if on_ready is not None and self.consumer.assignment():  # joined the group
                    on_ready()
                    on_ready = None
                self._commit_persisted(asynchronous=True)
                while batch and not self._stop.is_set():
                    try:
                        self._batches.put((self._read, self._incarnation, batch), timeout=0.5)  # bounded: back-pressure
                        self._read += 1
                        break
                    except queue.Full:
                        self._commit_persisted(asynchronous=True)
        finally:
            deadline = time.monotonic() + 15.0
            try:
                for _ in writers:  # each writer skips what is queued once stopping
                    self._batches.put(None, timeout=max(0.0, deadline - time.monotonic()))
            except queue.Full:
                log.error("%s processor: a writer did not stop; uncommitted batches will be read again", self.kind)
            for writer in writers:
                writer.join(timeout=max(0.0, deadline - time.monotonic()))
            self._commit_persisted(asynchronous=False)
            self._close_consumer()
            self.context.close()

    def stop(self) -> None:
        """Ask the processor to stop: it finishes or abandons (uncommitted) the batch in hand."""
        self._stop.set()

    def _write_batches(self) -> None:
        while (item := self._batches.get()) is not None:
            sequence, incarnation, batch = item
            if not self._persist(batch):
                continue  # stopping: not committed (nor any batch after it), read again after a restart
            with self._processed_lock:
                self.processed += len(batch)
            self._persisted_offsets.put((sequence, incarnation, last_offsets(batch)))

    def _persist(self, batch: list[Received]) -> bool:
        """Process ``batch`` until it is done (True) or the processor stops (False).

        A batch is never skipped: committing a later batch would commit past it. An unexpected
        error (a bug) is logged and the batch tried again, so the processor stalls visibly
        instead of losing records.
        """
        while not self._stop.is_set():
            try:
                process_batch(self.context, batch, self.handler)
                return True
            except Stopping:
                return False
            except Exception:
                self.context.status = "failing: see the log"
                log.exception("%s processor could not process a batch; trying it again in 5 s", self.kind)
                self._stop.wait(5.0)
        return False

    def _commit_persisted(self, asynchronous: bool) -> None:
        """Commit the offsets of the batches the writers have persisted, from the consuming thread.

        Only this thread uses the consumer: a synchronous commit from another thread while this
        one polls was seen to wait for seconds (until polling stopped).
        """
        while True:
            try:
                sequence, incarnation, done = self._persisted_offsets.get_nowait()
            except queue.Empty:
                break
            self._persisted[sequence] = (incarnation, done)
        offsets: dict[tuple[str, int], int] = {}
        while self._committed in self._persisted:  # in reading order, up to the first batch still in hand
            incarnation, done = self._persisted.pop(self._committed)
            self._committed += 1
            if incarnation != self._incarnation:
                continue  # offsets of a topic since recreated: meaningless for the new one
            for key, offset in done.items():
                offsets[key] = max(offsets.get(key, -1), offset)
        if not offsets:
            return
        try:
            # confluent_kafka's stubs overload commit() on Literal[True]/Literal[False] only, not on bool
            self.consumer.commit(  # type: ignore[call-overload]
                offsets=[TopicPartition(topic, partition, offset + 1) for (topic, partition), offset in offsets.items()],
                asynchronous=asynchronous,
            )
        except KafkaException as exc:  # e.g. the partition moved to another instance: it re-reads, idempotently
            log.warning("%s processor could not commit offsets (%s); those records may be processed again", self.kind, exc)

    def _close_consumer(self) -> None:
        close_consumer(self.consumer)
