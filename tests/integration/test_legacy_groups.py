"""Upgrading to consumer groups named ``PREFIX.PROJECT.KIND``: the old groups' committed offsets are
carried over, so the renamed groups do not read their topics from the start again."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from tensordb.cli import main
from tensordb.config import Settings, Topic
from tensordb.infra.bus import create_topics


@pytest.fixture
def sibling(settings: Settings) -> Iterator[Settings]:
    """A second project whose name starts with the first's, on the same servers (its topics removed afterwards)."""
    other = settings.with_changes(project=f"{settings.project}-research")
    create_topics(other)
    try:
        yield other
    finally:
        AdminClient(other.kafka_config()).delete_topics(list(other.all_topics().values()))


def _commit(settings: Settings, group: str, offsets: dict[int, int], topic: Topic = Topic.INGEST) -> None:
    consumer = Consumer(settings.kafka_config(**{"group.id": group, "enable.auto.commit": False}))
    try:
        consumer.commit(offsets=[TopicPartition(settings.topic(topic), p, o) for p, o in offsets.items()], asynchronous=False)
    finally:
        consumer.close()


def _committed(settings: Settings, group: str, partitions: int = 3) -> dict[int, int]:
    consumer = Consumer(settings.kafka_config(**{"group.id": group, "enable.auto.commit": False}))
    try:
        found = consumer.committed([TopicPartition(settings.topic(Topic.INGEST), p) for p in range(partitions)], timeout=10)
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in found if tp.offset >= 0}


def test_carry_offsets_moves_each_old_group_s_offsets_to_its_new_name_once(
    settings: Settings, sibling: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    producer = Producer(settings.kafka_config())
    for i in range(30):
        producer.produce(settings.topic(Topic.INGEST), b"{}", partition=i % 3)
        producer.produce(sibling.topic(Topic.INGEST), b"{}", partition=i % 3)
    producer.flush(10)
    # what the earlier version committed: PREFIX-PROJECT-KIND, for both projects
    _commit(settings, f"tensordb-{settings.project}-ingest", {0: 4, 1: 7, 2: 9})
    _commit(settings, f"tensordb-{settings.project}-stage-resize", {0: 2}, Topic.INGEST)
    _commit(sibling, f"tensordb-{sibling.project}-ingest", {0: 1, 1: 1, 2: 1})
    _commit(settings, settings.processor_group("ingest"), {2: 10})  # the new group got further on one partition: kept

    for key, value in settings.as_environment().items():
        monkeypatch.setenv(key, value)
    assert main(["project", "carry-offsets", settings.project]) == 0
    said = capsys.readouterr().out
    assert f"{settings.processor_group('ingest')}: 2 partitions carried" in said
    assert f"{settings.processor_group('stage-resize')}: 1 partitions carried" in said
    assert "research" not in said  # the sibling's old group starts like ours, but its offsets are on its own topics

    assert _committed(settings, settings.processor_group("ingest")) == {0: 4, 1: 7, 2: 10}
    assert _committed(settings, settings.processor_group("stage-resize")) == {0: 2}
    assert _committed(sibling, settings.consumer_group("research-ingest")) == {}
    assert _committed(sibling, sibling.processor_group("ingest")) == {}  # the sibling carries its own when it upgrades

    assert main(["project", "carry-offsets", settings.project]) == 0  # once: a second run changes nothing
    assert f"{settings.processor_group('ingest')}: already has its offsets" in capsys.readouterr().out
    assert _committed(settings, settings.processor_group("ingest")) == {0: 4, 1: 7, 2: 10}
