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


def test_a_client_failing_with_a_system_error_is_a_delivery_error_that_processors_wait_out() -> None:
    publisher = Publisher(Settings(kafka_bootstrap="127.0.0.1:1"))
    publisher._producer = _BrokenProducer()  # type: ignore[assignment]
    with pytest.raises(DeliveryError, match="recreate the publisher"):
        publisher.flush(0.1)
    record = {"schema": "log/1", "run_id": "r", "phase": "train", "step": 0, "wall_time": 0.0, "metrics": {}}
    with pytest.raises(DeliveryError, match="returned a result with an exception set"):
        for _ in range(SERVE_EVERY):  # delivery reports are served once per SERVE_EVERY records
            publisher.publish(Topic.LOGS, record)
