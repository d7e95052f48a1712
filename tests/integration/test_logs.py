"""Step logging against the real broker, processors and mongod: the log sink, reading back and
deleting, the Keras callback. The caller's side alone is tests/unit/test_runlog.py."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import numpy as np
import orjson
import pytest

from tensordb.client import TensorDB
from tensordb.config import Settings, Topic
from tensordb.errors import BadInputError
from tensordb.infra.bus import Publisher
from tensordb.infra.store import Store
from tensordb.runs.logger import BASE_COLUMNS, LOGS, RunLogger, log_id
from tensordb.runs.queries import delete_logs, read_logs
from tensordb.testing import ChildProcess, wait_for


def _persisted(store: Store, expected: int, **query: Any) -> int:
    """Wait until ``expected`` log documents match, then check that the count stays there."""
    wait_for(lambda: store[LOGS].count_documents(query) >= expected, timeout=60, what=f"{expected} log documents")
    time.sleep(1.0)  # anything still in flight would show up now
    return store[LOGS].count_documents(query)


def test_closing_the_client_closes_its_loggers_before_its_publisher(settings: Settings) -> None:
    """A logger left open inside ``with TensorDB()`` still delivers what it holds."""
    with TensorDB(settings) as db:
        logger = db.logger("run-left-open")
        for step in range(100):
            logger.log(step, loss=1.0)
        publisher = db.publisher
    assert publisher.delivered == 100
    with pytest.raises(BadInputError, match="is closed"):
        logger.log(100, loss=1.0)


# -- end to end: broker, processors, mongod --------------------------------------------------------


def test_ten_thousand_steps_are_stored_exactly_once_even_when_redelivered(settings: Settings, processors: ChildProcess) -> None:
    with Publisher(settings) as publisher, Store(settings) as store:
        with RunLogger(publisher, run_id="run-10k", job_id="job-10k") as logger:
            for step in range(10_000):
                logger.log(step, loss=1.0 / (step + 1), accuracy=step / 10_000, epoch=step // 1000)
            logger.flush()
        assert _persisted(store, 10_000, run_id="run-10k") == 10_000
        assert len(store[LOGS].distinct("step", {"run_id": "run-10k"})) == 10_000

        # a redelivery (or a re-logged step) with other values, then a new step on the same key
        for step in (0, 1, 5000, 9999):
            publisher.publish(
                Topic.LOGS,
                {
                    "schema": "log/1",
                    "run_id": "run-10k",
                    "phase": "train",
                    "step": step,
                    "metrics": {"loss": -1.0},
                    "wall_time": time.time(),
                },
                key="run-10k",
            )
        publisher.publish(
            Topic.LOGS,
            {
                "schema": "log/1",
                "run_id": "run-10k",
                "phase": "train",
                "step": 10_000,
                "metrics": {"loss": 0.0},
                "wall_time": time.time(),
            },
            key="run-10k",
        )
        publisher.flush()
        wait_for(lambda: store[LOGS].find_one({"run_id": "run-10k", "step": 10_000}), what="the step after the duplicates")
        assert _persisted(store, 10_001, run_id="run-10k") == 10_001
        first = store[LOGS].find_one({"_id": log_id("run-10k", "train", 5000)})
        assert first["metrics"] == {"loss": 1.0 / 5001, "accuracy": 0.5} and first["epoch"] == 5  # first write wins
        assert first["job_id"] == "job-10k" and first["project"] == settings.project

        frame = read_logs(store, run_id="run-10k")
        assert len(frame) == 10_001 and frame["step"].tolist() == list(range(10_001))
        assert frame["loss"].iloc[:10_000].tolist() == [1.0 / (step + 1) for step in range(10_000)]


def test_read_logs_returns_sorted_columns_and_delete_logs_removes_only_that_run(
    settings: Settings, processors: ChildProcess
) -> None:
    with Publisher(settings) as publisher:
        with RunLogger(publisher, run_id="b", job_id="job-b") as logger:
            for step in range(3):
                logger.log(loss=10.0 + step)  # no step: 0, 1, 2
        with RunLogger(publisher, run_id="a", job_id="job-a", tags={"lr": 0.1, "arch": "mlp"}) as logger:
            logger.log(phase="validation", epoch=0, loss=0.5, accuracy=0.8)
            for step in range(5):
                logger.log(epoch=step // 3, loss=1.0 - step / 10, accuracy=step / 10)
            logger.log(phase="test", loss=float("nan"), accuracy=0.7)
    with Store(settings) as store:
        assert _persisted(store, 10) == 10
        frame = read_logs(store)
        assert list(frame.columns) == [*BASE_COLUMNS, "accuracy", "loss"]
        assert list(zip(frame["run_id"], frame["phase"], frame["step"])) == [
            ("a", "test", 0),
            *[("a", "train", step) for step in range(5)],
            ("a", "validation", 0),
            ("b", "train", 0),
            ("b", "train", 1),
            ("b", "train", 2),
        ]
        assert frame["loss"].tolist()[1:6] == [1.0, 0.9, 0.8, 0.7, 0.6]
        assert math.isnan(frame["loss"][0]) and frame["accuracy"][0] == 0.7  # NaN was stored as null
        assert frame["loss"].tolist()[7:] == [10.0, 11.0, 12.0] and frame["accuracy"][7:].isna().all()
        assert frame["job_id"].tolist() == ["job-a"] * 7 + ["job-b"] * 3
        assert frame["epoch"][1:6].tolist() == [0, 0, 0, 1, 1] and frame["epoch"][7:].isna().all()
        assert frame["wall_time"].between(time.time() - 300, time.time()).all()

        assert read_logs(store, run_id="a", phase="train", steps=range(1, 3))["step"].tolist() == [1, 2]
        assert read_logs(store, run_id="a", steps=(3, None))["step"].tolist() == [3, 4]
        assert set(read_logs(store, job_id="job-b")["run_id"]) == {"b"}
        assert set(read_logs(store, lr=0.1)["run_id"]) == {"a"}
        assert read_logs(store, run_id=["a", "b"], phase=["validation", "test"])["phase"].tolist() == ["test", "validation"]
        columns = read_logs(store, run_id="b", as_numpy=True)
        assert isinstance(columns["loss"], np.ndarray) and columns["step"].tolist() == [0, 1, 2]
        empty = read_logs(store, run_id="nobody")
        assert empty.empty and list(empty.columns) == list(BASE_COLUMNS)

        assert delete_logs(store, run_id="a", phase="test") == 1
        assert delete_logs(store, run_id="a") == 6
        assert set(read_logs(store)["run_id"]) == {"b"} and store[LOGS].count_documents({}) == 3


def test_keras_fit_with_the_callback_logs_every_batch_and_each_epochs_validation(
    settings: Settings, processors: ChildProcess
) -> None:
    import keras

    from tensordb.runs.keras_callback import TensorDBCallback

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 4)).astype("float32"), rng.integers(0, 2, 64)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    saved: list[int] = []
    with Publisher(settings) as publisher, RunLogger(publisher, run_id="fit", job_id="job-fit") as logger:
        callback = TensorDBCallback(logger, on_epoch_saved=lambda model, epoch, logs: saved.append(epoch))
        history = model.fit(
            x[:48], y[:48], batch_size=16, epochs=2, validation_data=(x[48:], y[48:]), callbacks=[callback], verbose=0
        )
        model.evaluate(x[48:], y[48:], callbacks=[callback], verbose=0)
    assert saved == [0, 1]
    with Store(settings) as store:
        assert _persisted(store, 6 + 2 + 1) == 9
        train = read_logs(store, run_id="fit", phase="train")
        assert train["step"].tolist() == [1, 2, 3, 4, 5, 6] and train["epoch"].tolist() == [0, 0, 0, 1, 1, 1]
        assert {"loss", "accuracy"} <= set(train.columns) and not train["loss"].isna().any()
        epoch_ends = train[train["step"].isin([3, 6])]
        np.testing.assert_allclose(epoch_ends["loss"], history.history["loss"], rtol=1e-6)
        validation = read_logs(store, run_id="fit", phase="validation")
        assert validation["step"].tolist() == [3, 6] and validation["epoch"].tolist() == [0, 1]
        np.testing.assert_allclose(validation["loss"], history.history["val_loss"], rtol=1e-6)
        np.testing.assert_allclose(validation["accuracy"], history.history["val_accuracy"], rtol=1e-6)
        test = read_logs(store, run_id="fit", phase="test")
        assert len(test) == 1 and test["epoch"].tolist() == [1]


def test_the_batched_log_sink_stores_each_record_once_dead_letters_bad_ones_and_resumes_after_a_restart(
    settings: Settings,
) -> None:
    from streams.consumer import TopicProcessor
    from streams.logs import log_sink
    from tensordb.infra.dead_letters import COLLECTION as DEAD_LETTERS

    def start() -> tuple[TopicProcessor, threading.Thread]:
        sink = log_sink(settings, batch_size=3000)
        ready = threading.Event()
        thread = threading.Thread(target=sink.run, kwargs={"on_ready": ready.set}, daemon=True)
        thread.start()
        assert ready.wait(60), "the log sink did not join its consumer group"
        return sink, thread

    sink, thread = start()
    with Publisher(settings) as publisher, Store(settings) as store:
        with RunLogger(publisher, run_id="sink") as logger:
            for step in range(10_000):
                logger.log(step, loss=step / 10)
            logger.flush()
            bad = {
                "schema": "log/1",
                "run_id": "sink",
                "phase": "train",
                "step": 1,
                "metrics": {"loss": "high"},
                "wall_time": 1.0,
            }
            publisher.publish_bytes(settings.topic(Topic.LOGS), orjson.dumps(bad), key="sink")
            logger.log(10_000, loss=0.0)  # redelivery of step 5 next, on the same key
            logger.flush()
            publisher.publish(
                Topic.LOGS,
                {"schema": "log/1", "run_id": "sink", "phase": "train", "step": 5, "metrics": {"loss": -1.0}, "wall_time": 1.0},
                key="sink",
            )
            publisher.flush()
            assert _persisted(store, 10_001) == 10_001
            wait_for(lambda: store["processor_progress"].find_one({"valid": {"$gte": 10_002}}), what="all records read")
            letter = wait_for(lambda: store[DEAD_LETTERS].find_one(), what="the dead letter")
            assert "metrics.loss" in letter["reason"] and store[DEAD_LETTERS].count_documents({}) == 1
            assert store[LOGS].find_one({"run_id": "sink", "step": 5})["metrics"] == {"loss": 0.5}
            sink.stop()
            thread.join(30)
            assert not thread.is_alive() and sink.processed == 10_003  # 10,002 valid + 1 dead letter

            # a restarted sink continues after the committed offsets: nothing is read twice
            sink, thread = start()
            logger.log(10_001, loss=0.0)
            logger.flush()
            assert _persisted(store, 10_002) == 10_002
            progress = store["processor_progress"].find_one({"topic": settings.topic(Topic.LOGS)})
            assert progress["valid"] == 10_003 and progress["invalid"] == 1
            sink.stop()
            thread.join(30)
            assert sink.processed == 1
