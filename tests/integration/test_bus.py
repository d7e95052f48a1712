"""The bus against the real broker: round trips, validation on produce, delivery, consumer helpers."""

from __future__ import annotations

import time

import pytest
from confluent_kafka.admin import AdminClient

from tensordb.config import Settings, Topic
from tensordb.errors import DeliveryError, RecordTooLargeError, ValidationError
from tensordb.infra.bus import Publisher, create_topics, make_consumer, receive
from tensordb.testing.helpers import free_port


def _log(step: int) -> dict:
    return {
        "schema": "log/1",
        "run_id": "run-1",
        "phase": "train",
        "step": step,
        "metrics": {"loss": 1.0 / (step + 1)},
        "wall_time": time.time(),
    }


def _consume(settings: Settings, topic: Topic, count: int, group: str, timeout: float = 30.0) -> list:
    consumer = make_consumer(settings, group, [topic])
    got: list = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < count and time.monotonic() < deadline:
            got.extend(receive(consumer, "log/1" if topic is Topic.LOGS else "sample/1", timeout=0.5))
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    return got


def test_topics_are_created_explicitly_with_the_configured_partitions(settings: Settings) -> None:
    assert create_topics(settings) == []  # the fixture created them; a second call is a no-op
    metadata = AdminClient(settings.kafka_config()).list_topics(timeout=10).topics
    for name in settings.all_topics().values():
        assert len(metadata[name].partitions) == settings.topic_partitions


def test_produce_consume_round_trip_keeps_every_record_and_its_content(settings: Settings) -> None:
    with Publisher(settings) as publisher:
        for step in range(200):
            publisher.publish(Topic.LOGS, _log(step), key="run-1")
    assert publisher.delivered == 200
    received = _consume(settings, Topic.LOGS, 200, group="round-trip")
    assert sorted(r.record["step"] for r in received) == list(range(200))
    assert all(r.error is None and r.key == b"run-1" for r in received)
    # one key -> one partition -> offsets consecutive: nothing lost, nothing duplicated
    assert sorted(r.offset for r in received) == list(range(200))


def test_a_closed_publisher_refuses_records_and_closing_again_does_nothing(settings: Settings) -> None:
    publisher = Publisher(settings)
    publisher.publish(Topic.LOGS, _log(0), key="run-1")
    publisher.close()
    assert publisher.delivered == 1
    with pytest.raises(DeliveryError, match="this publisher is closed"):
        publisher.publish(Topic.LOGS, _log(1), key="run-1")
    publisher.close()


def test_closing_with_the_broker_gone_drops_what_is_unacknowledged_within_the_timeout(settings: Settings) -> None:
    gone = settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{free_port()}"})  # nothing listens there
    publisher = Publisher(gone)
    publisher.publish(Topic.LOGS, _log(0), key="run-1")
    began = time.monotonic()
    with pytest.raises(DeliveryError, match="1 records still unacknowledged after 1.0 s"):
        publisher.close(timeout=1.0)
    assert time.monotonic() - began < 10  # not librdkafka's message timeout (300 s)


def test_invalid_record_is_refused_by_the_sdk_before_it_reaches_the_broker(settings: Settings) -> None:
    with Publisher(settings) as publisher:
        with pytest.raises(ValidationError) as caught:
            publisher.publish(Topic.LOGS, {**_log(0), "phase": "warmup"})
    assert caught.value.field == "phase" and caught.value.rule == "enum"
    assert publisher.delivered == 0


def test_oversized_record_is_refused_with_advice_to_use_blobs(settings: Settings) -> None:
    with Publisher(settings) as publisher:
        with pytest.raises(RecordTooLargeError, match="GridFS"):
            publisher.publish_bytes(settings.topic(Topic.LOGS), b"x" * (settings.max_message_bytes + 1))


def test_consumer_group_resumes_after_the_committed_offset(settings: Settings) -> None:
    with Publisher(settings) as publisher:
        for step in range(10):
            publisher.publish(Topic.LOGS, _log(step), key="run-1")
    assert len(_consume(settings, Topic.LOGS, 10, group="resume")) == 10
    with Publisher(settings) as publisher:
        publisher.publish(Topic.LOGS, _log(10), key="run-1")
    second = _consume(settings, Topic.LOGS, 1, group="resume")
    assert [r.record["step"] for r in second] == [10]
