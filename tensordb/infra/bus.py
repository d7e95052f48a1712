"""Kafka through confluent-kafka: topic creation, a validating asynchronous publisher, consumers.

Publishing never waits on the network: ``publish`` validates, hands the record to librdkafka's
queue and returns; delivery reports arrive through callbacks served by ``poll``/``flush``. The
producer is idempotent, so retries inside librdkafka never duplicate a record.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from tensordb import records
from tensordb.config import Settings, Topic
from tensordb.errors import (
    ConfigurationError,
    DecodeError,
    DeliveryError,
    FatalClientError,
    RecordTooLargeError,
    TensorDBError,
    UnreachableError,
    ValidationError,
)

DeliveryCallback = Callable[[KafkaError | None, Message], None]
#: ``publish`` serves delivery reports (``poll``) once per this many records, not after each one:
#: a poll per record cost ~1 µs of a logging producer's ~7 µs. Reports of records still waiting are
#: served by the next poll, by ``flush``, or when the local queue is full.
SERVE_EVERY = 100
_log = logging.getLogger(__name__)


def create_topics(settings: Settings, timeout: float = 15.0) -> list[str]:
    """Create every TensorDB topic of the project that does not exist yet; returns those created.

    Topics are always created explicitly: brokers that auto-create use their own partition count.
    """
    client_errors: list[KafkaError] = []  # the connection's own errors (a TLS handshake's, SASL's) say why
    admin = AdminClient(settings.kafka_config(error_cb=client_errors.append))
    try:
        existing = admin.list_topics(timeout=timeout).topics
    except KafkaException as exc:
        admin.poll(0.1)  # serves error_cb
        raise UnreachableError(
            f"cannot reach Kafka at {settings.kafka_bootstrap} ({_connection_reason(exc.args[0], client_errors)}): "
            "start the local services with `tensordb services up`, or set TENSORDB_KAFKA_BOOTSTRAP to your brokers; "
            "brokers that need TLS or SASL need TENSORDB_KAFKA_OPTIONS (security.protocol, ssl.ca.location, "
            "sasl.mechanism, sasl.username, sasl.password)"
        ) from exc
    wanted = [
        NewTopic(name, num_partitions=settings.topic_partitions, replication_factor=settings.topic_replication)
        for name in settings.all_topics().values()
        if name not in existing
    ]
    if not wanted:
        return []
    created = []
    for name, future in admin.create_topics(wanted, operation_timeout=timeout, request_timeout=timeout).items():
        try:
            future.result(timeout)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise ConfigurationError(
                    f"could not create topic {name}: {exc.args[0].str()}; check the broker's permissions for this principal "
                    "and that TENSORDB_TOPIC_REPLICATION does not exceed its brokers"
                ) from exc
    return created


def _connection_reason(error: KafkaError, client_errors: list[KafkaError]) -> str:
    """What failed: the client's most telling error (a TLS or SASL failure) over the generic one."""
    telling = [e.str() for e in client_errors if e.code() != KafkaError._ALL_BROKERS_DOWN]
    return telling[-1] if telling else error.str()


def _client_failure(error: SystemError) -> DeliveryError:
    """confluent-kafka's C extension sometimes fails with a bare ``SystemError`` (an error left set
    while serving callbacks; seen after a broker restart): the producer cannot be trusted any more,
    so this is a delivery failure, answered by replacing it and publishing again."""
    return DeliveryError(
        f"the Kafka client failed while serving acknowledgements ({error}); the publisher replaced its producer: "
        "publish the records again"
    )


def _disconnect(producer: Producer) -> None:
    """Drop what ``producer`` has not delivered and stop its threads now (``close`` alone would wait
    for the undelivered records, up to librdkafka's message timeout)."""
    try:
        producer.purge(in_queue=True, in_flight=True)
        producer.close()
    except (KafkaException, RuntimeError):
        pass  # a fatal or closed producer may refuse: it is dropped all the same


#: Delivery errors of records purged from a replaced producer.
_PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})


class Publisher:
    """A validating, idempotent, asynchronous producer for TensorDB records.

    Use as a context manager, or call :meth:`close`, so that buffered records are flushed.
    Failed deliveries are collected and raised by :meth:`flush` as a :class:`DeliveryError`.

    A producer that failed is replaced by a fresh one, by the publisher itself, so that a
    long-running process never needs a restart to publish again: after a fatal error (the
    idempotent producer's unrecoverable states, raised once as :class:`FatalClientError`), a
    failure inside the client, or a flush that found records refused or still unacknowledged (a
    broker that restarted fences or forgets this producer's id: it refuses, or never acknowledges,
    every later record of it). Its undelivered records are
    dropped; every thread that had published some since its last flush gets a
    :class:`DeliveryError` from its next :meth:`flush` (or from the call that noticed the failure),
    so it publishes them again: a publisher shared by threads never loses one thread's records
    silently when another thread's flush replaced the producer. Code that publishes from one
    thread and flushes from another compares :attr:`generation` itself (the run logger does).
    """

    def __init__(
        self, settings: Settings, queue_timeout: float = 30.0, flush_timeout: float = 30.0, **client_options: Any
    ) -> None:
        """
        Parameters
        ----------
        settings:
            The brokers and the project (topic names, message size limit).
        queue_timeout:
            How long :meth:`publish` waits for room in a full local queue before raising.
        flush_timeout:
            How long :meth:`flush` waits by default for every record to be acknowledged.
        client_options:
            librdkafka producer options, over TensorDB's defaults.
        """
        self.settings = settings
        self.queue_timeout = queue_timeout
        self.flush_timeout = flush_timeout
        self._options = client_options
        # delivery failures, appended by librdkafka's callbacks and drained by flush: a deque, whose
        # append and popleft are atomic, so no lock is held inside a callback (a callback that failed
        # inside the C extension once left such a lock held, and the next flush waited forever)
        self._failures: deque[str] = deque()
        self._fatal: KafkaError | None = None
        self._connection_error: str | None = None
        self.delivered = 0
        self._unserved = 0  # records published since callbacks were last served
        self._closed = False
        self._generation = 0  # how often the producer was replaced
        # per thread: the generation of the producer its first record since its last flush went to
        self._marks = threading.local()
        self._replacing = threading.Lock()
        self._producer = self._new_producer()

    def _new_producer(self) -> Producer:
        return Producer(
            self.settings.kafka_config(
                **{
                    "enable.idempotence": True,
                    "linger.ms": 5,
                    "compression.type": "lz4",
                    "message.max.bytes": self.settings.max_message_bytes + 64 * 1024,
                    "queue.buffering.max.messages": 1_000_000,
                    "error_cb": self._on_error,
                    **self._options,
                }
            )
        )

    def _on_error(self, error: KafkaError) -> None:
        if error.fatal():
            self._fatal = error
        elif error.code() != KafkaError._ALL_BROKERS_DOWN:
            self._connection_error = error.str()  # e.g. a TLS handshake or SASL failure, named by flush

    @property
    def generation(self) -> int:
        """How often the producer was replaced: records published before a change were dropped
        unless a flush between confirmed them."""
        return self._generation

    def _check_usable(self) -> None:
        """Refuse to go on with a closed publisher; replace a producer that failed fatally, and say so."""
        if self._closed:
            raise DeliveryError("this publisher is closed: publish through a new one (or a new TensorDB client)")
        fatal = self._fatal
        if fatal is not None:
            self._replace(self._generation)
            self._marks.generation = None  # told now: its next flush need not say it again
            raise FatalClientError(
                f"the Kafka producer failed fatally ({fatal.str()}); records queued since were not delivered and the "
                "publisher replaced its producer: publish them again"
            )

    def _replace(self, seen: int) -> None:
        """Replace the producer unless another thread did since generation ``seen``."""
        with self._replacing:
            if self._generation == seen and not self._closed:
                _log.warning("replacing the Kafka producer (it failed, or could not get its records acknowledged)")
                self.recreate()

    def recreate(self) -> None:
        """Replace the producer now (see the class docstring). Records it had not delivered are
        dropped: those who published them are told by their next flush, and publish them again."""
        old = self._producer
        self._producer = self._new_producer()
        self._generation += 1
        self._fatal = None
        self._failures.clear()
        try:
            old.purge(in_queue=True, in_flight=True)
        except (KafkaException, RuntimeError):
            pass  # a fatal producer may refuse: it is dropped all the same
        # not closed here: another thread may still be inside its flush or produce (its records are
        # reported by its mark); the last reference gone, garbage collection destroys it

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is None:
            self.delivered += 1
            return
        if error.code() in _PURGED:
            return  # dropped with a replaced producer: the publishing thread's mark reports it
        self._failures.append(f"{message.topic()}: {error.str()}")

    def publish(
        self,
        topic: Topic,
        record: dict[str, Any],
        key: str | bytes | None = None,
        on_delivery: DeliveryCallback | None = None,
    ) -> None:
        """Validate ``record`` against the topic's schema and queue it; returns immediately."""
        value = records.encode(record, records.TOPIC_RECORDS[topic])
        self.publish_bytes(self.settings.topic(topic), value, key, on_delivery)

    def publish_bytes(
        self,
        topic_name: str,
        value: bytes,
        key: str | bytes | None = None,
        on_delivery: DeliveryCallback | None = None,
    ) -> None:
        """Queue already-encoded bytes (used for dead letters and tests of bad input)."""
        if len(value) > self.settings.max_message_bytes:
            raise RecordTooLargeError(
                f"a {len(value)}-byte record exceeds the {self.settings.max_message_bytes}-byte message limit "
                "(TENSORDB_MAX_MESSAGE_BYTES): store large arrays in GridFS and publish a reference"
            )
        callback = on_delivery or self._on_delivery
        deadline = time.monotonic() + self.queue_timeout
        marks = self._marks
        while True:
            self._check_usable()
            generation = self._generation
            if getattr(marks, "generation", None) is None:  # before producing: a replacement after it is noticed
                marks.generation = generation
            try:
                self._producer.produce(topic_name, value, key=key, on_delivery=callback)
                break
            except KafkaException as exc:
                error = exc.args[0]
                if error.fatal() or error.code() == KafkaError._FATAL:  # raised here before error_cb has run
                    self._fatal = error
                    self._check_usable()
                raise
            except BufferError:  # local queue full: serve delivery reports to make room, then retry
                if time.monotonic() > deadline:
                    self._replace(generation)
                    raise DeliveryError(
                        f"the producer's queue stayed full for {self.queue_timeout} s: the broker at "
                        f"{self.settings.kafka_bootstrap} does not acknowledge; check that it runs"
                    ) from None
                self._serve_callbacks(0.05)
            except SystemError as exc:
                self._replace(generation)
                raise _client_failure(exc) from exc
        self._unserved += 1
        if self._unserved >= SERVE_EVERY:
            self._serve_callbacks(0)

    def _serve_callbacks(self, timeout: float) -> None:
        """Run pending delivery reports and error callbacks (``poll``)."""
        self._unserved = 0
        generation = self._generation
        try:
            self._producer.poll(timeout)
        except SystemError as exc:
            self._replace(generation)
            raise _client_failure(exc) from exc

    def flush(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` (default: ``flush_timeout``) until every queued record is
        acknowledged; raise :class:`DeliveryError` if any was not, or if records this thread
        published since its last flush were dropped with a failed producer (class docstring)."""
        timeout = self.flush_timeout if timeout is None else timeout
        mark, self._marks.generation = getattr(self._marks, "generation", None), None
        self._check_usable()
        generation = self._generation
        try:
            remaining = self._producer.flush(timeout)
        except SystemError as exc:
            self._replace(generation)
            raise _client_failure(exc) from exc
        self._check_usable()
        failures = []
        while self._failures:
            failures.append(self._failures.popleft())
        if remaining:
            reason = f" (last connection error: {self._connection_error})" if self._connection_error else ""
            failures.append(f"{remaining} records still unacknowledged after {timeout} s{reason}")
        if failures:
            # stuck, or refused (a broker that restarted fences or forgets this producer's id and
            # refuses every later record of it): the next records go to a fresh producer
            self._replace(generation)
            raise DeliveryError(
                f"{len(failures)} record(s) were not delivered; check the broker at {self.settings.kafka_bootstrap}: "
                + "; ".join(failures[:5])
                + "; the publisher replaced its producer: publish them again"
            )
        if mark is not None and mark != self._generation:
            raise DeliveryError(
                "the producer failed and was replaced while records of this thread were queued: publish them again"
            )

    def close(self, timeout: float | None = None) -> None:
        """Flush (raising what :meth:`flush` raises, within ``timeout``), then disconnect: records
        still unacknowledged are dropped (the error says how many), and the client's threads stop
        rather than reconnect, until garbage collection, to a broker that may be gone. Closing
        again does nothing."""
        if self._closed:
            return
        try:
            self.flush(timeout)
        finally:
            _disconnect(self._producer)
            self._closed = True

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


#: How long the broker may hold a fetch of TensorDB's consumers (librdkafka's ``fetch.wait.max.ms``,
#: 500 ms by default). Tansu answers a pending fetch not when a record arrives but at a later check,
#: up to this long, so at the default a hop cost up to half a second (bench/loop_latency.py, the
#: broker hop rows); Apache Kafka answers as soon as a record is there, and a short wait only makes
#: an idle consumer's empty fetches more frequent.
FETCH_WAIT_MS = 10


def close_consumer(consumer: Consumer, wait: float = 5.0) -> None:
    """Leave the group and close, waiting at most ``wait`` seconds: against a broker that is down
    or restarted, librdkafka's close can wait for a coordinator that no longer knows the group.
    A consumer that does not close in time is left to its threads."""

    def close() -> None:
        try:
            consumer.close()
        except (KafkaException, RuntimeError) as exc:
            _log.warning("closing a Kafka consumer failed: %s", exc)

    closing = threading.Thread(target=close, name="tensordb-consumer-close", daemon=True)
    closing.start()
    closing.join(wait)
    if closing.is_alive():
        _log.warning("a Kafka consumer did not close within %.0f s; going on without it", wait)


def make_consumer(settings: Settings, group: str, topics: list[Topic], **client_options: Any) -> Consumer:
    """A consumer-group member subscribed to ``topics``, committing offsets only when told to,
    fetching with :data:`FETCH_WAIT_MS` unless ``client_options`` say otherwise.

    Offsets are committed after processing (at-least-once); TensorDB's writes are idempotent, so a
    redelivery after a crash is harmless.
    """
    consumer = Consumer(
        settings.kafka_config(
            **{
                "group.id": group,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 1000,
                "fetch.wait.max.ms": FETCH_WAIT_MS,
                **client_options,
            }
        )
    )
    consumer.subscribe([settings.topic(topic) for topic in topics])
    return consumer


class Received(NamedTuple):
    """One consumed message: its position, raw bytes, and either the valid record or the error.

    A named tuple, not a frozen dataclass: as immutable, and made ~5× faster (0.3 against 1.6 µs),
    which counts at tens of thousands of records a second.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    record: dict[str, Any] | None
    error: TensorDBError | None
    #: the broker's timestamp (ms): with the position, it tells a redelivery from a new record
    timestamp: int = 0
    #: left out by the consumer's key filter: not decoded, not handled, only its offset counts
    skipped: bool = False

    @property
    def valid_record(self) -> dict[str, Any]:
        """The record, for code given only valid messages (the handlers); raises the message's error otherwise."""
        if self.record is None:
            raise self.error or DecodeError("the message carries no record")
        return self.record


def receive(
    consumer: Consumer,
    schema_id: str,
    timeout: float = 1.0,
    max_messages: int = 500,
    select: Callable[[bytes | None], bool] | None = None,
) -> Iterator[Received]:
    """Wait up to ``timeout`` for messages and yield each decoded and validated against ``schema_id``.

    Returns as soon as the first message arrives, with whatever else is already fetched (up to
    ``max_messages``), so a job request is acted on at once rather than at the end of a window.

    ``select`` (a test of the message key) leaves out the messages a reader does not want without
    decoding them (yielded with ``skipped`` set, for their offsets): the study scheduler reads only
    the trials' records of the busy logs topic this way.

    Invalid records are yielded with ``error`` set rather than raised, so the caller can divert
    them to dead letters and keep going. A fatal consumer error raises :class:`FatalClientError`
    (recreate the consumer: it resumes from the committed offsets), and so does a failure of the
    client's calls (its position may be past messages nobody will see); other client errors are logged.
    """
    try:
        first = consumer.poll(timeout)  # returns as soon as one message arrives (consume() waited for all)
        if first is None:
            return
        messages = [first, *consumer.consume(max_messages - 1, 0)] if max_messages > 1 else [first]
    except Exception as exc:
        # confluent_kafka raises here when a callback raised, after destroying the messages it had
        # taken: the consumer's position is past them, so going on with it would skip them (and
        # commit past them); replaced, a consumer resumes from the committed offsets
        raise FatalClientError(
            f"the Kafka consumer failed while handing over messages ({type(exc).__name__}: {exc}): recreate it"
        ) from exc
    for message in messages:
        error = message.error()
        if error:
            if error.fatal():
                raise FatalClientError(f"the Kafka consumer failed fatally ({error.str()}): recreate it")
            # informational (end of partition, a broker connection lost and retried): the records
            # around it are still yielded, never skipped
            if error.code() != KafkaError._PARTITION_EOF:
                _log.warning("Kafka consumer: %s", error.str())
            continue
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        assert topic is not None and partition is not None and offset is not None  # set on every message without an error
        if select is not None and not select(message.key()):
            yield Received(topic, partition, offset, message.key(), None, None, None, message.timestamp()[1], skipped=True)
            continue
        record, decode_error = None, None
        try:
            record = records.decode(message.value(), schema_id)
        except (DecodeError, ValidationError) as exc:
            decode_error = exc
        yield Received(
            topic,
            partition,
            offset,
            message.key(),
            message.value(),
            record,
            decode_error,
            message.timestamp()[1],
        )
