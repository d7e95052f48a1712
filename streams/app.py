"""The faust-streaming application: one small agent per TensorDB topic.

Every agent takes the records of its topic in batches, validates each against the topic's schema,
diverts what fails to dead letters (the processor keeps going), and hands the valid records to
the topic's handler, if the topic has one. Handlers are plain synchronous functions run in a thread,
so MongoDB writes never block the event loop and the same code runs outside faust.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import faust
from confluent_kafka import KafkaException
from faust.types import EventT
from pymongo import UpdateOne
from pymongo.errors import ConnectionFailure

from streams.ingest import handle_samples
from streams.lifecycle import handle_job_events
from streams.logs import LogSink, tune_gc_for_batches
from streams.retrain import handle_imports, run_timed_triggers
from tensordb import records
from tensordb.bus import Publisher, Received
from tensordb.config import Settings, Topic
from tensordb.dead_letters import DeadLetters
from tensordb.errors import DecodeError, DeliveryError, ValidationError
from tensordb.models import ModelRegistry
from tensordb.store import Store

log = logging.getLogger(__name__)

#: A processor of valid records: gets the context and a batch, raises on failure.
Handler = Callable[["ProcessorContext", list[Received]], None]

BATCH_SIZE = 2000
BATCH_WITHIN_SECONDS = 0.2
PROGRESS = "processor_progress"
#: Failures worth waiting out (the database or broker is unreachable), as opposed to bad records.
TRANSIENT = (ConnectionFailure, KafkaException, DeliveryError)
TIMER_SECONDS = 5.0


@dataclass
class ProcessorContext:
    """What every handler needs: settings, the store, a publisher, the dead-letter path, the registry."""

    settings: Settings
    store: Store = field(init=False)
    publisher: Publisher = field(init=False)
    dead_letters: DeadLetters = field(init=False)
    registry: ModelRegistry = field(init=False)

    def __post_init__(self) -> None:
        self.store = Store(self.settings)
        self.store.ensure_indexes()
        self.publisher = Publisher(self.settings)
        self.dead_letters = DeadLetters(self.store, self.publisher, processor="streams")
        self.registry = ModelRegistry(self.store, self.publisher)

    def close(self) -> None:
        self.registry.close()
        self.publisher.close()
        self.store.close()


def handlers() -> dict[Topic, Handler]:
    """The handler of each topic that has one; topics without one are validated only."""
    return {Topic.INGEST: handle_samples, Topic.DATA_IMPORTED: handle_imports, Topic.JOB_EVENTS: handle_job_events}


def guarded_topics() -> list[Topic]:
    """Every topic a faust agent checks: all but the dead letters themselves and the logs, which
    the batched :class:`~streams.logs.LogSink` consumes (and guards) at ten times faust's rate."""
    return [topic for topic in Topic if topic not in (Topic.DEAD_LETTERS, Topic.LOGS)]


def to_received(event: EventT) -> Received:
    """Decode and validate one faust event into the same shape the confluent consumers use."""
    message = event.message
    topic = Topic(message.topic.rsplit(".", 1)[1])
    record, error = None, None
    try:
        record = records.decode(event.value, records.TOPIC_RECORDS[topic])
    except (DecodeError, ValidationError) as exc:
        error = exc
    return Received(message.topic, message.partition, message.offset, event.key, event.value, record, error)


def record_progress(store: Store, batch: list[Received]) -> None:
    """Count valid and invalid records and the last offset processed, per topic partition.

    ``processor_progress`` shows that a processor keeps up (ingest rates on the dashboard) and
    lets operators see how far each partition has been processed.
    """
    totals: dict[tuple[str, int], dict[str, int]] = {}
    for received in batch:
        entry = totals.setdefault((received.topic, received.partition), {"valid": 0, "invalid": 0, "offset": -1})
        entry["valid" if received.error is None else "invalid"] += 1
        entry["offset"] = max(entry["offset"], received.offset)
    now = datetime.now(UTC)
    store[PROGRESS].bulk_write(
        [
            UpdateOne(
                {"_id": f"{topic}:{partition}"},
                {
                    "$set": {"project": store.project, "topic": topic, "partition": partition, "updated_at": now},
                    "$max": {"last_offset": entry["offset"]},
                    "$inc": {"valid": entry["valid"], "invalid": entry["invalid"]},
                },
                upsert=True,
            )
            for (topic, partition), entry in totals.items()
        ]
    )


def process_batch(context: ProcessorContext, batch: list[Received], handler: Handler | None) -> None:
    """Divert the invalid records of a batch, process the valid ones, and make both durable."""
    valid = []
    for received in batch:
        if received.error is None:
            valid.append(received)
        else:
            context.dead_letters.divert(received, received.error)
    if valid and handler is not None:
        _handle(context, valid, handler)
    context.publisher.flush()
    record_progress(context.store, batch)


def _handle(context: ProcessorContext, valid: list[Received], handler: Handler) -> None:
    """Run the handler; wait out outages of MongoDB or Kafka; isolate records it cannot process.

    Handlers are idempotent, so a batch that failed can be retried, and then retried record by
    record: only the records that fail on their own become dead letters, with the error.
    """
    delay = 0.5
    while True:
        try:
            handler(context, valid)
            return
        except TRANSIENT as exc:
            log.warning("%s while processing %d records; retrying in %.1f s", exc, len(valid), delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
        except Exception:  # noqa: BLE001 - isolate the culprit below
            break
    for received in valid:
        try:
            handler(context, [received])
        except TRANSIENT:
            raise
        except Exception as exc:  # noqa: BLE001 - a record that cannot be processed is set aside, never lost
            context.dead_letters.divert(received, exc)


def _make_agent(context: ProcessorContext, handler: Handler | None) -> Callable:
    async def agent(stream: faust.StreamT) -> None:
        async for events in stream.take_events(BATCH_SIZE, within=BATCH_WITHIN_SECONDS):
            batch = [to_received(event) for event in events]
            await asyncio.to_thread(process_batch, context, batch, handler)

    return agent


def create_app(settings: Settings) -> faust.App:
    """A faust app for ``settings.project``: its id is the processors' consumer group."""
    datadir = Path(tempfile.gettempdir()) / "tensordb-faust" / f"{settings.topic_prefix}-{settings.project}"
    datadir.mkdir(parents=True, exist_ok=True)  # faust keeps table state there; TensorDB has no tables
    app = faust.App(
        f"{settings.topic_prefix}-{settings.project}-processors",
        broker=[f"kafka://{server.strip()}" for server in settings.kafka_bootstrap.split(",")],
        value_serializer="raw",
        key_serializer="raw",
        topic_allow_declare=False,  # TensorDB creates its topics explicitly (tensordb topics create)
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=6.0,
        broker_heartbeat_interval=1.0,
        web_enabled=False,
        store="memory://",
        datadir=datadir,
    )
    context = ProcessorContext(settings)
    topic_handlers = handlers()
    for topic in guarded_topics():
        channel = app.topic(settings.topic(topic), value_serializer="raw", key_serializer="raw")
        app.agent(channel, name=f"{topic.value}-processor")(_make_agent(context, topic_handlers.get(topic)))

    log_sink = LogSink(settings)

    @app.task
    async def _run_log_sink() -> None:
        await asyncio.to_thread(log_sink.run)

    @app.timer(interval=TIMER_SECONDS)
    async def _timed_triggers() -> None:
        await asyncio.to_thread(run_timed_triggers, context)

    @app.on_before_shutdown.connect
    async def _close_context(sender: faust.App, **kwargs: object) -> None:
        log_sink.stop()
        context.close()

    return app


def run(settings: Settings, loglevel: str = "info") -> None:
    """Run the processors in the foreground until interrupted (``tensordb processors``)."""
    tune_gc_for_batches()
    app = create_app(settings)
    faust.Worker(app, loglevel=loglevel).execute_from_commandline()
