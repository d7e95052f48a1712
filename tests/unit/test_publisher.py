"""The publisher's answer to a Kafka client that fails inside its C extension."""

from __future__ import annotations

import pytest

from tensordb.config import Settings, Topic
from tensordb.errors import DeliveryError
from tensordb.infra.bus import SERVE_EVERY, Publisher


class _BrokenProducer:
    """What confluent-kafka did after a broker restart: a bare SystemError from flush and poll."""

    def produce(self, *args: object, **kwargs: object) -> None:
        pass

    def poll(self, timeout: float) -> int:
        raise SystemError("<built-in method __enter__ of _thread.lock object> returned a result with an exception set")

    def flush(self, timeout: float) -> int:
        raise SystemError("<method 'flush' of 'cimpl.Producer' objects> returned NULL without setting an exception")

    def purge(self, in_queue: bool, in_flight: bool) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_client_failing_with_a_system_error_is_a_delivery_error_and_the_producer_is_replaced() -> None:
    publisher = Publisher(Settings(kafka_bootstrap="127.0.0.1:1"))
    publisher._producer = broken = _BrokenProducer()  # type: ignore[assignment]
    with pytest.raises(DeliveryError, match="replaced its producer"):
        publisher.flush(0.1)
    assert publisher._producer is not broken and publisher.generation == 1
    publisher._producer = _BrokenProducer()  # type: ignore[assignment]
    record = {"schema": "log/1", "run_id": "r", "phase": "train", "step": 0, "wall_time": 0.0, "metrics": {}}
    with pytest.raises(DeliveryError, match="returned a result with an exception set"):
        for _ in range(SERVE_EVERY):  # delivery reports are served once per SERVE_EVERY records
            publisher.publish(Topic.LOGS, record)


def test_a_stuck_producer_is_replaced_and_every_thread_whose_records_it_dropped_is_told() -> None:
    """One thread's flush times out (a broker that never acknowledges): the producer is replaced,
    and another thread's records queued on the old one are reported by that thread's flush, not
    lost in silence; records published after the replacement are not blamed on it."""
    import threading

    publisher = Publisher(Settings(kafka_bootstrap="127.0.0.1:1"))
    record = {"schema": "log/1", "run_id": "r", "phase": "train", "step": 0, "wall_time": 0.0, "metrics": {}}
    published = threading.Event()
    flushed = threading.Event()
    outcome: list[BaseException | None] = []

    def other_thread() -> None:
        publisher.publish(Topic.LOGS, record)
        published.set()
        flushed.wait(10)
        try:
            publisher._producer = _AcknowledgingProducer()  # type: ignore[assignment]
            publisher.flush(0.1)
            outcome.append(None)
        except DeliveryError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=other_thread)
    thread.start()
    published.wait(10)
    publisher.publish(Topic.LOGS, record)
    with pytest.raises(DeliveryError, match="still unacknowledged after 0.2 s.*the publisher replaced its producer"):
        publisher.flush(0.2)
    assert publisher.generation == 1
    flushed.set()
    thread.join(10)
    assert isinstance(outcome[0], DeliveryError) and "replaced while records of this thread were queued" in str(outcome[0])
    publisher.publish(Topic.LOGS, record)  # on the new producer: its flush succeeds
    publisher._producer = _AcknowledgingProducer()  # type: ignore[assignment]
    publisher.flush(0.1)


class _AcknowledgingProducer(_BrokenProducer):
    """A producer with nothing left to deliver."""

    def produce(self, *args: object, **kwargs: object) -> None:
        pass

    def flush(self, timeout: float) -> int:
        return 0
