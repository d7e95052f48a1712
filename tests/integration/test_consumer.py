"""The processors' consumer (streams.consumer.TopicProcessor): offsets committed only after durable writes, in order."""

from __future__ import annotations

import threading
from typing import Any

from confluent_kafka import TopicPartition

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
