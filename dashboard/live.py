"""The live log stream: one Kafka consumer per dashboard process, fanned out to every browser.

The hub reads the project's logs topic with a consumer group of its own (unique per process, so
every dashboard sees every record) and hands each batch to the browsers subscribed to its runs
(Server-Sent Events, see :mod:`dashboard.app`) and to the overview cache.

The seam between history and live points. A page shows a run by subscribing first and reading
MongoDB second, then merging the two by step. That is gap-free only if every point the hub
consumed *before* the subscription is in MongoDB by the time of the read. The log sink
(``streams/logs.py``, group ``PREFIX.PROJECT.log-sink``) commits a record's offset only after
the record is persisted, so the hub keeps each point it consumed in a per-run buffer until the
sink's committed offset for its partition has passed it, and a new subscription first receives
the buffered points of its runs. Every point is then either replayed, or live, or committed (so
in MongoDB before the read); duplicates are harmless because the page keys points by step.

Where the hub starts reading follows the same rule: at the sink's committed offsets (everything
before is in MongoDB), or at the beginning of a partition the sink never committed. Nothing
depends on ``auto.offset.reset=latest`` or high watermarks, which the embedded broker (Tansu)
under-reports. ``fetch.wait.max.ms`` is kept low because Tansu holds a fetch on an empty
partition for that long before answering, which would delay live points on the others.

The consumer runs under the contract of every loop (:mod:`tensordb.infra.supervision`): when it
fails (a broker outage or restart, an error of the client), it is closed and started again after
bounded back-off, from the sink's committed offsets, so the seam holds across the restart (points
sent twice are harmless); the state is in :meth:`LiveHub.status` (shown on the dashboard), on
``/ready`` and in ``tensordb_loop_ok{loop="dashboard-live"}``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient

from tensordb.config import Settings, Topic
from tensordb.errors import ConfigurationError, UnreachableError
from tensordb.infra.bus import close_consumer
from tensordb.infra.supervision import Supervisor
from tensordb.runs.logger import METRIC_NAME, PHASES

log = logging.getLogger(__name__)

#: (phase, step, wall_time, metrics) of one logged step
Point = tuple[str, int, float, dict[str, float | None]]
#: Called with (run_id, points) for every consumed batch, under the hub's lock: keep it quick.
Listener = Callable[[str, list[Point]], None]

_PHASES = frozenset(PHASES)
#: The item a subscription yields when it fell too far behind: the page re-subscribes and re-reads.
RESET = "reset"


def sink_group(settings: Settings) -> str:
    """The consumer group of the log sink (the ``log-sink`` processor kind)."""
    return settings.processor_group("log-sink")


def parse(value: bytes | None) -> tuple[str, Point] | None:
    """(run_id, point) of a ``log/1`` record, or None for anything malformed (the log sink
    dead-letters those; the dashboard only skips them). Checks only what it uses: faster than
    the full schema validation, which the sink does anyway."""
    try:
        record = orjson.loads(value or b"")
        run_id, phase, step, wall, metrics = (
            record["run_id"],
            record["phase"],
            record["step"],
            record["wall_time"],
            record["metrics"],
        )
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if not (isinstance(run_id, str) and phase in _PHASES and type(step) is int and step >= 0 and isinstance(metrics, dict)):
        return None
    if not isinstance(wall, (int, float)) or isinstance(wall, bool):
        return None
    for name, number in metrics.items():
        if not (number is None or type(number) in (int, float)) or not METRIC_NAME.match(name):
            return None
        if type(number) is float and not math.isfinite(number):
            return None
    return run_id, (phase, step, float(wall), metrics)


@dataclass(eq=False)
class Subscription:
    """One browser's stream: the runs it follows (None: all) and the batches waiting for it."""

    runs: frozenset[str] | None
    loop: asyncio.AbstractEventLoop
    limit: int
    items: deque = field(default_factory=deque)
    waiting: int = 0
    overflowed: bool = False
    closed: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def _push(self, items: list[dict[str, Any]]) -> None:  # on the event loop
        if self.overflowed:
            return
        self.items.extend(items)
        self.waiting += sum(len(item["points"]) for item in items)
        if self.waiting > self.limit:  # a page that cannot keep up starts over rather than lag for ever
            self.overflowed = True
            self.items.clear()
        self.wake.set()

    def _close(self) -> None:  # on the event loop
        self.closed = True
        self.wake.set()

    async def next(self, timeout: float) -> list[dict[str, Any]] | str | None:
        """Every batch waiting (several runs' points), :data:`RESET`, or None after ``timeout``
        seconds of silence or once the hub stopped (check ``closed``)."""
        if not self.items and not self.overflowed and not self.closed:
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout)
            except TimeoutError:
                return None
        if self.overflowed:
            return RESET
        items, self.items, self.waiting = list(self.items), deque(), 0
        return items or None


class LiveHub:
    """The dashboard's consumer of the logs topic (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        fetch_wait_ms: int = 50,
        buffer_limit: int = 500_000,
        subscriber_limit: int = 200_000,
        prune_seconds: float = 0.5,
    ) -> None:
        self.settings = settings
        self.topic = settings.topic(Topic.LOGS)
        self.group = settings.consumer_group(f"dashboard-{uuid.uuid4().hex[:12]}")
        self.fetch_wait_ms = fetch_wait_ms
        self.buffer_limit = buffer_limit
        self.subscriber_limit = subscriber_limit
        self.prune_seconds = prune_seconds
        self.listeners: list[Listener] = []
        self.consumed = 0
        self.skipped = 0
        self.last_record_at: float | None = None
        self._lock = threading.Lock()
        self._by_run: dict[str, set[Subscription]] = {}
        self._everything: set[Subscription] = set()
        self._buffer: dict[str, deque[tuple[int, int, Point]]] = {}
        self._buffered = 0
        self._committed: dict[int, int] = {}
        self._partitions_followed: list[int] = []
        self._stop = threading.Event()
        self._supervisor = Supervisor("dashboard-live", self._stop)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._pruner: threading.Thread | None = None
        self._admin = AdminClient(settings.kafka_config())
        self._offsets_lock = threading.Lock()  # the feed's thread and the pruner both ask
        self._offsets = self._offsets_reader()

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start consuming; returns once the partitions are assigned at their starting offsets."""
        self._thread = self._supervisor.start_thread(self._follow, "tensordb-dashboard-live")
        if not self._ready.wait(timeout):
            self.stop()
            raise UnreachableError(
                f"the dashboard could not start reading {self.topic} within {timeout} s: is Kafka at {self.settings.kafka_bootstrap} up?"
            )
        if self._error is not None:
            self.stop()
            raise UnreachableError(f"the dashboard could not read {self.topic}: {self._error}") from self._error
        self._pruner = threading.Thread(target=self._prune_forever, name="tensordb-dashboard-prune", daemon=True)
        self._pruner.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in (self._thread, self._pruner):
            if thread is not None:
                thread.join(timeout=10)
        close_consumer(self._offsets)
        with self._lock:
            subscriptions = set(self._everything).union(*self._by_run.values()) if self._by_run else set(self._everything)
            self._by_run.clear()
            self._everything.clear()
        for subscription in subscriptions:
            try:
                subscription.loop.call_soon_threadsafe(subscription._close)
            except RuntimeError:  # its loop is already closed
                pass

    # -- subscriptions -----------------------------------------------------------------------------

    def subscribe(self, runs: set[str] | None, loop: asyncio.AbstractEventLoop) -> tuple[Subscription, list[dict[str, Any]]]:
        """Follow ``runs`` (None: every run). Returns the subscription and the points of those runs
        the hub consumed that MongoDB may not hold yet (send them first; see the module docstring)."""
        subscription = Subscription(None if runs is None else frozenset(runs), loop, self.subscriber_limit)
        with self._lock:
            replay = []
            if runs is None:
                self._everything.add(subscription)
            else:
                for run_id in runs:
                    self._by_run.setdefault(run_id, set()).add(subscription)
                    buffered = self._buffer.get(run_id)
                    if buffered:
                        replay.append({"run": run_id, "points": [point for _, _, point in buffered]})
        return subscription, replay

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            self._everything.discard(subscription)
            for run_id in subscription.runs or ():
                followers = self._by_run.get(run_id)
                if followers is not None:
                    followers.discard(subscription)
                    if not followers:
                        del self._by_run[run_id]

    def buffered(self, run_id: str) -> list[Point]:
        """The points of ``run_id`` consumed but not yet known to be in MongoDB."""
        with self._lock:
            return [point for _, _, point in self._buffer.get(run_id, ())]

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "topic": self.topic, "group": self.group, "consumed": self.consumed, "skipped": self.skipped,
                "buffered": self._buffered, "subscribers": len(self._everything) + len({s for subs in self._by_run.values() for s in subs}),
                "last_record_at": self.last_record_at, "sink_committed": dict(self._committed),
                "state": self._supervisor.status,
            }  # fmt: skip

    # -- the consumer thread -----------------------------------------------------------------------

    def _follow(self) -> None:
        """Consume until stopped. Raises when the consumer fails: the supervisor starts it again,
        from the sink's committed offsets. A failure of the first start is reported by :meth:`start`."""
        try:
            consumer, partitions = self._new_consumer()
        except Exception as exc:
            if self._ready.is_set():
                raise
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._partitions_followed = partitions
        last_metadata = time.monotonic()
        try:
            while not self._stop.is_set():
                self._consume(consumer.consume(2000, 0.1))
                self._supervisor.working()
                if time.monotonic() - last_metadata >= 30:  # partitions added to the topic
                    last_metadata = time.monotonic()
                    added = [p for p in self._partitions() if p not in partitions]
                    if added:
                        consumer.incremental_assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in added])
                        self._partitions_followed = partitions = partitions + added
        finally:
            close_consumer(consumer)

    def _new_consumer(self) -> tuple[Consumer, list[int]]:
        """A consumer assigned every partition of the topic at the sink's committed offsets."""
        consumer = Consumer(
            self.settings.kafka_config(
                **{
                    "group.id": self.group,
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    "fetch.wait.max.ms": self.fetch_wait_ms,
                    "fetch.error.backoff.ms": 50,
                    "enable.partition.eof": False,
                }
            )  # fmt: skip
        )
        try:
            partitions = self._partitions()
            committed = self._sink_offsets(partitions)
            with self._lock:
                self._committed = committed
            consumer.assign([TopicPartition(self.topic, p, committed.get(p, OFFSET_BEGINNING)) for p in partitions])
        except BaseException:
            close_consumer(consumer)
            raise
        log.info("following %s from the log sink's committed offsets %s", self.topic, committed or "(none: from the start)")
        return consumer, partitions

    def _prune_forever(self) -> None:
        """Every ``prune_seconds``, in its own thread so a slow answer never delays live points."""
        while not self._stop.wait(self.prune_seconds):
            self._prune(self._partitions_followed)

    def _partitions(self) -> list[int]:
        topics = self._admin.list_topics(timeout=10).topics
        if self.topic not in topics:
            raise ConfigurationError(f"topic {self.topic} does not exist: run `tensordb topics create`")
        return sorted(topics[self.topic].partitions)

    def _offsets_reader(self) -> Consumer:
        """A client of the sink's group that never joins it (nothing subscribed) nor commits: it reads
        the sink's committed offsets. Not AdminClient's ``list_consumer_group_offsets``: librdkafka
        aborts the whole process when a broker connection drops during that coordinator request
        (``rd_kafka_enq_once_del_source_return: Assertion 'eonce->refcnt > 0' failed``, librdkafka
        issue 4605), which a dashboard asking every ``prune_seconds`` met in a broker restart."""
        return Consumer(
            self.settings.kafka_config(
                **{"group.id": sink_group(self.settings), "enable.auto.commit": False, "enable.auto.offset.store": False}
            )
        )

    def _sink_offsets(self, partitions: list[int]) -> dict[int, int]:
        """The log sink's committed offset per partition (absent: never committed)."""
        with self._offsets_lock:
            found = self._offsets.committed([TopicPartition(self.topic, p) for p in partitions], timeout=10)
        return {tp.partition: tp.offset for tp in found if tp.offset >= 0 and tp.error is None}

    def _consume(self, messages: list) -> None:
        if not messages:
            return
        batches: dict[str, list[tuple[int, int, Point]]] = {}
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("log consumer: %s", error.str())
                continue
            parsed = parse(message.value())
            if parsed is None:
                self.skipped += 1
                continue
            run_id, point = parsed
            batches.setdefault(run_id, []).append((message.partition(), message.offset(), point))
        if not batches:
            return
        outgoing: dict[Subscription, list[dict[str, Any]]] = {}
        with self._lock:
            for run_id, entries in batches.items():
                points = [point for _, _, point in entries]
                self._buffer.setdefault(run_id, deque()).extend(entries)
                self._buffered += len(entries)
                self.consumed += len(entries)
                for listener in self.listeners:
                    try:
                        listener(run_id, points)
                    except Exception:  # noqa: BLE001 - a listener's bug must not stop the stream
                        log.exception("dashboard listener failed")
                item = {"run": run_id, "points": points}
                for subscription in self._by_run.get(run_id, ()):
                    outgoing.setdefault(subscription, []).append(item)
                for subscription in self._everything:
                    outgoing.setdefault(subscription, []).append(item)
            self.last_record_at = time.time()
            if self._buffered > self.buffer_limit:
                self._trim()
        for subscription, items in outgoing.items():
            try:
                subscription.loop.call_soon_threadsafe(subscription._push, items)
            except RuntimeError:  # the page's loop is gone
                self.unsubscribe(subscription)

    def _prune(self, partitions: list[int]) -> None:
        """Forget buffered points the log sink has committed (so they are in MongoDB)."""
        try:
            committed = self._sink_offsets(partitions)
        except Exception as exc:  # noqa: BLE001 - the broker is away: prune at the next pass
            log.warning("could not read the log sink's offsets (%s); keeping buffered points", exc)
            return
        with self._lock:
            self._committed = committed
            for run_id in list(self._buffer):
                entries = self._buffer[run_id]
                while entries and entries[0][1] < committed.get(entries[0][0], -1):
                    entries.popleft()
                    self._buffered -= 1
                if not entries:
                    del self._buffer[run_id]

    def _trim(self) -> None:
        """The sink is far behind (or not running): drop the oldest buffered points, so memory
        stays bounded. A page opened now may miss them until the sink persists them."""
        target = int(self.buffer_limit * 0.9)
        while self._buffered > target and self._buffer:
            for run_id in list(self._buffer):
                entries = self._buffer[run_id]
                drop = min(len(entries), max(1, (self._buffered - target) // max(len(self._buffer), 1)))
                for _ in range(drop):
                    entries.popleft()
                self._buffered -= drop
                if not entries:
                    del self._buffer[run_id]
                if self._buffered <= target:
                    break
