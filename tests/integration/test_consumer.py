"""The processors' consumer (streams.consumer.TopicProcessor): offsets committed only after durable writes, in order."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from streams.consumer import TopicProcessor
from streams.processing import ProcessorContext
from tensordb.config import Settings, Topic
from tensordb.infra.bus import Publisher, Received
from tensordb.runs.logger import RunLogger
from tensordb.testing import wait_for


class RecordingConsumer:
    """Stands in for the librdkafka consumer where only the commits matter."""

    def __init__(self) -> None:
        self.commits: list[dict[tuple[str, int], int]] = []

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> None:
        self.commits.append({(p.topic, p.partition): p.offset for p in offsets})


def test_offsets_of_batches_persisted_out_of_order_are_committed_only_up_to_the_first_still_in_hand(settings: Settings) -> None:
    processor = TopicProcessor(settings, "order-check", Topic.LOGS, None, writers=2)
    real, recording = processor.consumer, RecordingConsumer()
    processor.consumer = recording  # type: ignore[assignment]
    try:
        processor._persisted_offsets.put((1, 0, {("t", 0): 20, ("t", 1): 7}))  # the second batch read, persisted first
        processor._commit_persisted(asynchronous=True)
        assert recording.commits == []  # the first batch is still in hand: committing 21 would skip it after a crash
        processor._persisted_offsets.put((0, 0, {("t", 0): 10}))
        processor._persisted_offsets.put((3, 0, {("t", 0): 40}))  # a gap at 2: not committable yet
        processor._commit_persisted(asynchronous=True)
        assert recording.commits == [{("t", 0): 21, ("t", 1): 8}]
        processor._persisted_offsets.put((2, 0, {("t", 1): 9}))
        processor._commit_persisted(asynchronous=True)
        assert recording.commits[-1] == {("t", 0): 41, ("t", 1): 10}
    finally:
        processor.consumer = real
        processor._close_consumer()
        processor.context.close()


def test_a_processor_with_two_writers_stores_every_record_once_and_commits_them_all(settings: Settings) -> None:
    stored: list[int] = []
    lock = threading.Lock()

    def handler(context: ProcessorContext, batch: list[Received]) -> None:
        with lock:
            stored.extend(received.valid_record["step"] for received in batch)

    processor = TopicProcessor(settings, "two-writers", Topic.LOGS, handler, batch_size=100, writers=2)
    ready = threading.Event()
    thread = threading.Thread(target=processor.run, kwargs={"on_ready": ready.set}, daemon=True)
    thread.start()
    try:
        assert ready.wait(60)
        with Publisher(settings) as publisher, RunLogger(publisher, run_id="two-writers") as logger:
            for step in range(5000):
                logger.log(step, loss=0.5)
        wait_for(lambda: processor.processed >= 5000, timeout=60, what="every record processed")
    finally:
        processor.stop()
        thread.join(30)
    assert sorted(stored) == list(range(5000))
    committed: dict[Any, int] = {}
    reader = TopicProcessor(settings, "two-writers", Topic.LOGS, None)  # the same group: its committed offsets
    try:
        for partition in reader.consumer.committed(
            [TopicPartition(settings.topic(Topic.LOGS), p) for p in range(settings.topic_partitions)], timeout=10
        ):
            committed[partition.partition] = partition.offset
    finally:
        reader._close_consumer()
        reader.context.close()
    assert sum(offset for offset in committed.values() if offset > 0) == 5000


#: A second member of a group, in its own process (so that it can be SIGKILLed): it reads until it
#: has partitions and ``argv[2]`` records, says so, and then waits, never committing. (The processor
#: must keep polling meanwhile, for the group to rebalance: its records all fit the batches in hand.)
VICTIM = """
import sys, time
from tensordb.config import Topic, load_settings
from tensordb.infra.bus import make_consumer
consumer = make_consumer(load_settings(), sys.argv[1], [Topic.LOGS])
taken = 0
while not consumer.assignment() or taken < int(sys.argv[2]):
    taken += sum(1 for m in consumer.consume(100, 0.2) if not m.error())
print("taken", taken, sorted(p.partition for p in consumer.assignment()), flush=True)
time.sleep(600)
"""


def test_a_partition_revoked_while_its_batch_is_persisted_then_its_new_owner_killed_loses_nothing(settings: Settings) -> None:
    """Forced timing of issue 24, finding 18: a batch is in hand when a second member joins and
    takes partitions of it; the batch is persisted after the revocation and its offsets committed
    (for partitions the processor no longer owns); the new owner reads but never persists nor
    commits, and is SIGKILLed. Once the group has evicted it, the processor owns every partition
    again and stores every record."""
    handled: set[int] = set()
    in_hand, release = threading.Event(), threading.Event()
    lock = threading.Lock()

    def handler(context: ProcessorContext, batch: list[Received]) -> None:
        if not in_hand.is_set():
            in_hand.set()
            assert release.wait(60)  # persisted only after the revocation
        with lock:
            handled.update(received.valid_record["step"] for received in batch)

    def publish(steps: range) -> None:
        with Publisher(settings) as publisher:
            for step in steps:
                record = {"schema": "log/1", "run_id": "r", "phase": "train", "step": step, "wall_time": 1.0, "metrics": {}}
                publisher.publish(Topic.LOGS, record, key=f"k{step}")  # keys spread the records over the partitions

    processor = TopicProcessor(settings, "revoke-check", Topic.LOGS, handler, batch_size=50)
    ready = threading.Event()
    thread = threading.Thread(target=processor.run, kwargs={"on_ready": ready.set}, daemon=True)
    thread.start()
    victim: subprocess.Popen[str] | None = None
    try:
        assert ready.wait(60)
        publish(range(30))
        assert in_hand.wait(30)
        victim = subprocess.Popen(
            [sys.executable, "-c", VICTIM, processor.group, "5"],
            env={**os.environ, **settings.as_environment()},
            stdout=subprocess.PIPE,
            text=True,
        )
        assert victim.stdout is not None
        said = victim.stdout.readline()  # once it owns partitions (revoked from the processor) and read records
        assert said.startswith("taken"), said
        release.set()  # the old batch persisted now: its offsets committed after the revocation
        victim.kill()
        publish(range(30, 330))
        wait_for(lambda: len(handled) == 330, timeout=90, what="every record stored by the surviving processor")
    finally:
        release.set()
        if victim is not None:
            victim.kill()
            victim.wait()
        processor.stop()
        thread.join(30)
    assert sorted(handled) == list(range(330)), sorted(set(range(330)) - handled)


class FailingOnce:
    """A real consumer whose first ``poll`` or ``consume`` that takes messages fails, as
    confluent_kafka's does when a callback raised (it destroys the messages it took): a forced timing."""

    def __init__(self, consumer: Any, method: str) -> None:
        self.consumer, self.method = consumer, method
        self.failed = False

    def _taken(self, method: str, messages: list) -> list:
        if method == self.method and not self.failed and any(not message.error() for message in messages):
            self.failed = True  # the messages are gone, the position is past them
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, f"injected: {method} failed after taking messages"))
        return messages

    def poll(self, timeout: float) -> Any:
        message = self.consumer.poll(timeout)
        return None if message is None else self._taken("poll", [message])[0]

    def consume(self, count: int, timeout: float) -> list:
        return self._taken("consume", self.consumer.consume(count, timeout))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.consumer, name)


@pytest.mark.parametrize("method", ["poll", "consume"])
def test_a_consumer_failing_after_it_took_messages_is_replaced_and_nothing_skipped(settings: Settings, method: str) -> None:
    """The consumer's position is past the messages it took when ``poll`` or ``consume`` fails:
    the processor replaces it (resuming from the committed offsets) instead of going on past them
    (issue 24, finding 18: the old code waited and kept the consumer, skipping those messages)."""
    handled: set[int] = set()
    lock = threading.Lock()

    def handler(context: ProcessorContext, batch: list[Received]) -> None:
        with lock:
            handled.update(received.valid_record["step"] for received in batch)

    class Processor(TopicProcessor):
        def _new_consumer(self) -> Any:
            consumer = super()._new_consumer()
            return FailingOnce(consumer, method) if not hasattr(self, "consumer") else consumer  # only the first fails

    processor = Processor(settings, "failing-once", Topic.LOGS, handler, batch_size=10)
    first = processor.consumer
    thread = threading.Thread(target=processor.run, daemon=True)
    thread.start()
    try:
        with Publisher(settings) as publisher, RunLogger(publisher, run_id="failing-once") as logger:
            for step in range(40):
                logger.log(step, loss=0.5)
        wait_for(lambda: len(handled) == 40, timeout=60, what="every record handled")
    finally:
        processor.stop()
        thread.join(30)
    assert first.failed and processor.consumer is not first
    assert sorted(handled) == list(range(40))
