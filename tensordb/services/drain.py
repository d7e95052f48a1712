"""Waiting until the stream processors have stored every record the broker holds.

The local broker keeps records in memory, so stopping it while the processors still have records
to read would lose records the broker acknowledged. ``tensordb services down`` therefore waits
here first. "Processed" is read from the data, not from the broker's end-of-partition watermarks
(Tansu under-reports those): a probe consumer reads each partition from the offset the processor
kind committed (committed only once stored); a partition where nothing is left to read is done.
"""

from __future__ import annotations

import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from tensordb.config import PROCESSOR_TOPICS, Settings
from tensordb.errors import DrainError


def unprocessed(settings: Settings, quiet_seconds: float = 1.0) -> list[str]:
    """The ``topic[partition]`` of each partition that still holds records a processor kind has not
    stored, by reading from its group's committed offset for ``quiet_seconds``."""
    behind: list[str] = []
    for kind, topic in PROCESSOR_TOPICS.items():
        name = settings.topic(topic)
        group = Consumer(settings.kafka_config(**{"group.id": settings.processor_group(kind), "enable.auto.commit": False}))
        probe = Consumer(
            settings.kafka_config(**{"group.id": f"{settings.processor_group(kind)}-drain-probe", "enable.auto.commit": False})
        )
        try:
            count = len(group.list_topics(name, timeout=10).topics[name].partitions)
            committed = group.committed([TopicPartition(name, p) for p in range(count)], timeout=10)
            probe.assign(
                [TopicPartition(name, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING) for tp in committed]
            )
            found: set[int] = set()
            deadline = time.monotonic() + quiet_seconds
            while time.monotonic() < deadline and len(found) < count:
                message = probe.poll(0.1)
                partition = None if message is None or message.error() else message.partition()
                if partition is not None:
                    found.add(partition)
                    probe.pause([TopicPartition(name, partition)])
            behind += [f"{name}[{partition}]" for partition in sorted(found)]
        finally:
            probe.close()
            group.close()
    return behind


def wait_until_processed(settings: Settings, timeout: float = 120.0) -> None:
    """Return once every processor kind has stored every record of its topic; raise
    :class:`DrainError` naming the partitions still behind after ``timeout`` seconds.

    Parameters
    ----------
    settings:
        The project and broker.
    timeout:
        Seconds to wait for the processors.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            behind = unprocessed(settings)
        except KafkaException as exc:
            raise DrainError(f"cannot read the processors' progress from Kafka ({exc})") from exc
        if not behind:
            return
        if time.monotonic() > deadline:
            raise DrainError(f"after {timeout:.0f} s the processors still have records to store in {', '.join(behind[:6])}")
        time.sleep(0.5)
