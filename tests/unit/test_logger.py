"""Step logging on the caller's side, no servers: the non-blocking RunLogger's validation and
records, an unreachable broker, filters, the Keras callback. tests/integration/test_runlog.py runs
the real broker, processors and mongod."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pytest

from tensordb import records
from tensordb.config import Settings, Topic
from tensordb.errors import DeliveryError, QueryError, ValidationError
from tensordb.infra.bus import Publisher
from tensordb.runs.logger import RunLogger
from tensordb.runs.queries import delete_logs, read_logs


class RecordingPublisher:
    """Stands in for the Kafka publisher where only the records matter; checks each against log/1."""

    settings = Settings(project="recorded")
    generation = 0  # its producer is never replaced

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def publish_bytes(self, topic_name: str, value: bytes, key: str | None = None) -> None:
        assert topic_name == self.settings.topic(Topic.LOGS)
        self.records.append({**records.decode(value, "log/1"), "key": key})

    def flush(self, timeout: float = 30.0) -> None:
        pass


@pytest.mark.parametrize(
    ("call", "field", "words"),
    [
        (lambda log: log(loss="0.3"), "metrics.loss", "real number"),
        (lambda log: log(loss=[0.1, 0.2]), "metrics.loss", "real number"),
        (lambda log: log(loss=np.zeros(3)), "metrics.loss", "one number per metric"),
        (lambda log: log(phase="training", loss=0.3), "phase", "train, validation, test"),
        (lambda log: log(**{"bad name": 0.3}), "metrics.bad name", "must match"),
        (lambda log: log(-1, loss=0.3), "step", ">= 0"),
        (lambda log: log(1.5, loss=0.3), "step", "integer"),
        (lambda log: log(3, epoch="1", loss=0.3), "epoch", "integer"),
        (lambda log: log(3), "metrics", "at least one metric"),
    ],
)
def test_bad_input_raises_a_validation_error_at_the_call(call: Any, field: str, words: str) -> None:
    publisher = RecordingPublisher()
    with RunLogger(publisher, run_id="r") as logger:
        with pytest.raises(ValidationError) as caught:
            call(logger.log)
        assert isinstance(caught.value, ValueError)
        assert caught.value.field == field and words in str(caught.value)
        logger.log(loss=0.1)  # the logger keeps working
    assert [record["metrics"] for record in publisher.records] == [{"loss": 0.1}]


def test_records_are_log_v1_keyed_by_run_with_steps_numbered_per_phase() -> None:
    publisher = RecordingPublisher()
    with RunLogger(publisher, run_id="run-1", job_id="job-1", tags={"lr": np.float32(0.5), "layers": [2]}) as logger:
        logger.log(loss=1.0)
        logger.log(loss=np.float32(0.5), correct=np.int64(7), accuracy=np.array(0.25))
        logger.log(10, loss=0.25, epoch=np.int64(1))
        logger.log(loss=float("nan"), other=math.inf)
        logger.log(phase="validation", loss=0.75)
        logger.log(phase="validation", loss=0.5)
    records = publisher.records
    assert [(r["phase"], r["step"]) for r in records] == [
        ("train", 0),
        ("train", 1),
        ("train", 10),
        ("train", 11),
        ("validation", 0),
        ("validation", 1),
    ]
    assert {r["key"] for r in records} == {"run-1"} and {r["job_id"] for r in records} == {"job-1"}
    assert records[0]["tags"] == {"lr": 0.5, "layers": [2]} and records[2]["epoch"] == 1 and "epoch" not in records[0]
    assert records[1]["metrics"] == {"loss": 0.5, "correct": 7.0, "accuracy": 0.25}
    assert all(type(value) is float for value in records[1]["metrics"].values())
    assert records[3]["metrics"] == {"loss": None, "other": None}  # NaN/inf are stored as null
    assert all(abs(r["wall_time"] - time.time()) < 60 for r in records)


def test_log_does_not_wait_for_an_unreachable_broker_and_flush_says_it_was_not_delivered() -> None:
    publisher = Publisher(Settings(kafka_bootstrap="127.0.0.1:1"), **{"message.timeout.ms": 2000, "log_level": 0})
    logger = RunLogger(publisher, run_id="nowhere")
    started = time.perf_counter()
    for step in range(1000):
        logger.log(step, loss=0.5)
    assert time.perf_counter() - started < 0.5
    with pytest.raises(DeliveryError, match="not delivered"):
        logger.flush(timeout=5)
    logger.log(1000, loss=0.5)
    with pytest.raises(DeliveryError):
        logger.close(timeout=1)


def test_filters_refuse_query_operators() -> None:
    class FakeStore:
        project = "p"

    with pytest.raises(QueryError):
        read_logs(FakeStore(), run_id={"$ne": "x"})  # type: ignore[arg-type]
    with pytest.raises(QueryError):
        delete_logs(FakeStore(), phase="training")  # type: ignore[arg-type]
    with pytest.raises(QueryError):
        read_logs(FakeStore(), **{"$where": "1"})  # type: ignore[arg-type]


def test_keras_callback_every_n_batches_still_logs_each_epochs_end_once() -> None:
    import keras

    from tensordb.runs.keras_callback import TensorDBCallback

    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((40, 3)).astype("float32"), rng.standard_normal((40, 1)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse", metrics=["mae"])
    publisher = RecordingPublisher()
    with RunLogger(publisher, run_id="every-2") as logger:
        model.fit(
            x[:30],
            y[:30],
            batch_size=10,
            epochs=2,
            validation_data=(x[30:], y[30:]),
            verbose=0,
            callbacks=[TensorDBCallback(logger, every_n_batches=2)],
        )
    logged = [(r["phase"], r["step"], r["epoch"], sorted(r["metrics"])) for r in publisher.records]
    assert logged == [
        ("train", 2, 0, ["loss", "mae"]),
        ("train", 3, 0, ["loss", "mae"]),
        ("validation", 3, 0, ["loss", "mae"]),
        ("train", 4, 1, ["loss", "mae"]),
        ("train", 6, 1, ["loss", "mae"]),
        ("validation", 6, 1, ["loss", "mae"]),
    ]


def test_steps_published_on_a_producer_that_was_replaced_before_the_flush_are_reported() -> None:
    """The background thread publishes, the caller flushes: the logger itself notices that the
    publisher replaced its producer (dropping the steps queued on it) and says so."""
    publisher = RecordingPublisher()
    with RunLogger(publisher, run_id="replaced") as logger:  # type: ignore[arg-type]
        logger.log(loss=1.0)
        logger.flush()
        logger.log(loss=0.5)
        logger._drain()  # published, as the background thread does
        publisher.generation += 1  # a failed producer was replaced meanwhile
        with pytest.raises(DeliveryError, match="replaced while steps were queued"):
            logger.flush()
        logger.log(loss=0.25)
        logger.flush()  # published on the new producer: nothing to report
