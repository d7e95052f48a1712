"""Streaming inference against the real broker, mongod and a `tensordb predictor` child process:
every request answered exactly once, across a promotion and across a SIGKILL of the predictor."""

from __future__ import annotations

import base64
import collections
import threading
import time

import numpy as np
import pytest

from tensordb.config import Settings, Topic
from tensordb.infra.bus import Publisher, make_consumer, receive
from tensordb.infra.store import Store
from tensordb.models.registry import ModelRegistry
from tensordb.records import Schema
from tensordb.testing import predictor_process
from tensordb.testing.models import small_classifier

MODEL = "digits"


def save_version(settings: Settings, seed: int, promote: bool = True, input_shape: tuple[int, ...] = (8, 8)) -> int:
    import keras

    keras.utils.set_random_seed(seed)
    with Store(settings) as store, ModelRegistry(store, Publisher(settings)) as registry:
        version = registry.save(small_classifier(units=4 + seed, input_shape=input_shape), MODEL)["version"]
        if promote:
            registry.promote(MODEL, version)
    return int(version)


def request(request_id: str, **inputs) -> dict:
    return {"schema": Schema.PREDICT_REQUEST, "request_id": request_id, "model": MODEL, **inputs}


def instances(rng: np.random.Generator, count: int = 1) -> list:
    return rng.integers(0, 255, (count, 8, 8)).astype(float).tolist()


class Answers:
    """Every prediction record published, read from the predictions topic in the background."""

    def __init__(self, settings: Settings) -> None:
        self.records: list[dict] = []
        self._stop = threading.Event()
        self._consumer = make_consumer(settings, f"answers-{time.monotonic_ns()}", [Topic.PREDICTIONS])
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            self.records.extend(
                received.record for received in receive(self._consumer, Schema.PREDICTION, timeout=0.2) if received.record
            )

    def by_request(self) -> dict[str, list[dict]]:
        grouped = collections.defaultdict(list)
        for record in list(self.records):
            grouped[record["request_id"]].append(record)
        return grouped

    def wait_for(self, ids: set[str], timeout: float = 90.0) -> dict[str, list[dict]]:
        deadline = time.monotonic() + timeout
        while not ids <= set(self.by_request()) and time.monotonic() < deadline:
            time.sleep(0.2)
        answered = self.by_request()
        assert ids <= set(answered), f"{len(ids - set(answered))} requests unanswered"
        return answered

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()


@pytest.fixture
def answers(settings: Settings):
    reader = Answers(settings)
    yield reader
    reader.close()


def assert_answered_once(answered: dict[str, list[dict]], ids: set[str]) -> None:
    """One answer per request: a record published again after a crash is the same answer."""
    for request_id in ids:
        first, *again = answered[request_id]
        assert all(repeat == first for repeat in again), f"{request_id} was answered differently: {answered[request_id]}"


def test_every_form_of_request_is_answered_once_and_bad_input_gets_an_error(settings, ingest, answers, tmp_path) -> None:
    from tensordb.testing.samples import image_samples

    save_version(settings, 1)
    ingest(image_samples(3, dataset="unlabelled"))
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (3, 8, 8)).astype(np.uint8)
    with predictor_process(settings, tmp_path / "predictor.log", MODEL), Publisher(settings) as publisher:
        sent = [
            request("json", instances=instances(rng, 2)),
            request("bytes", array={"dtype": "uint8", "shape": [3, 8, 8], "data": base64.b64encode(array.tobytes()).decode()}),
            request("stored", sample={"id": "img00001", "x": "x"}),
            request("misfit", instances=[[1, 2, 3]]),
            request("missing", sample={"id": "nope", "x": "x"}),
            request("json", instances=instances(rng, 5)),  # the same id again: the first answer stands
            {**request("elsewhere", instances=instances(rng)), "reply_topic": "tensordb.other.ingest"},
        ]
        for record in sent:
            publisher.publish(Topic.PREDICT_REQUESTS, record, key=record["request_id"])
        publisher.flush()
        answered = answers.wait_for({"json", "bytes", "stored", "misfit", "missing", "elsewhere"})
    assert_answered_once(answered, set(answered))
    assert len(answered["json"][0]["outputs"]) == 2 and answered["json"][0]["version"] == 1
    assert len(answered["bytes"][0]["outputs"]) == 3 and len(answered["bytes"][0]["classes"]) == 3
    assert answered["stored"][0]["sample_id"] == "img00001" and len(answered["stored"][0]["outputs"]) == 1
    assert "each instance must have shape [8, 8]" in answered["misfit"][0]["error"] and "outputs" not in answered["misfit"][0]
    assert "sample 'nope'" in answered["missing"][0]["error"]
    assert all(record["via"] == "stream" and record["latency_ms"] >= 0 for records in answered.values() for record in records)


def test_a_sample_whose_stored_bytes_are_corrupted_is_answered_with_an_error_not_a_crash(
    settings, ingest, answers, tmp_path
) -> None:
    """A poison pill: the sample's GridFS bytes fail their checksum. Its request is answered with
    the integrity error, the requests behind it are answered, and so after a restart."""
    from pymongo import MongoClient

    shape = [256, 300]  # 75 KiB of uint8: past INLINE_MAX_BYTES, so its bytes are a GridFS blob
    save_version(settings, 1, input_shape=tuple(shape))
    rng = np.random.default_rng(3)
    ingest([
        {"schema": "sample/1", "sample_id": name, "dataset": "d",
         "arrays": {"x": {"dtype": "uint8", "shape": shape,
                          "data": base64.b64encode(rng.integers(0, 255, shape, dtype=np.uint8).tobytes()).decode()}}}
        for name in ("good", "poisoned")
    ])  # fmt: skip
    with MongoClient(settings.mongo_uri) as client:
        db = client[settings.mongo_database]
        document = db["samples"].find_one({"arrays.x.blob_id": {"$exists": True}, "_id": {"$regex": "poisoned$"}})
        assert document is not None, "the sample's bytes are not in GridFS"
        chunk = db["blobs.chunks"].find_one({"files_id": document["arrays"]["x"]["blob_id"], "n": 0})
        corrupted = bytes(255 - byte for byte in chunk["data"][:64]) + chunk["data"][64:]
        db["blobs.chunks"].update_one({"_id": chunk["_id"]}, {"$set": {"data": corrupted}})

    def send(publisher: Publisher, round_: str) -> set[str]:
        sent = [
            request(f"{round_}-before", sample={"id": "good", "x": "x"}),
            request(f"{round_}-poisoned", sample={"id": "poisoned", "x": "x"}),
            request(f"{round_}-after", sample={"id": "good", "x": "x"}),
            request(f"{round_}-after-json", instances=rng.integers(0, 255, (2, *shape)).astype(float).tolist()),
        ]
        for record in sent:
            publisher.publish(Topic.PREDICT_REQUESTS, record, key="one-partition")  # in this order, one partition
        publisher.flush()
        return {record["request_id"] for record in sent}

    with Publisher(settings) as publisher:
        for round_ in ("first", "restarted"):
            with predictor_process(settings, tmp_path / f"predictor-{round_}.log", MODEL) as predictor:
                ids = send(publisher, round_)
                answered = answers.wait_for(ids, timeout=60)
                assert predictor.process is not None and predictor.process.poll() is None
            poisoned = answered[f"{round_}-poisoned"][0]
            assert "checksum mismatch" in poisoned["error"] and "outputs" not in poisoned, poisoned
            assert all(len(answered[i][0]["outputs"]) >= 1 for i in ids - {f"{round_}-poisoned"})
    assert_answered_once(answers.by_request(), ids)


def test_requests_under_load_are_answered_once_across_a_promotion_and_a_sigkill(settings, answers, tmp_path) -> None:
    first = save_version(settings, 1)
    second = save_version(settings, 2, promote=False)
    rng = np.random.default_rng(1)
    ids: set[str] = set()
    stop = threading.Event()

    def load() -> None:
        with Publisher(settings) as publisher:
            number = 0
            while not stop.is_set():
                record = request(f"r{number:05d}", instances=instances(rng))
                publisher.publish(Topic.PREDICT_REQUESTS, record, key=record["request_id"])
                ids.add(record["request_id"])
                number += 1
                if number % 20 == 0:
                    publisher.flush()
                    time.sleep(0.01)

    predictor = predictor_process(settings, tmp_path / "predictor.log", MODEL, max_batch=16)
    predictor.start()
    sender = threading.Thread(target=load, daemon=True)
    sender.start()
    try:
        time.sleep(2.0)
        with Store(settings) as store, ModelRegistry(store, Publisher(settings)) as registry:
            registry.promote(MODEL, second)  # swapped between batches while requests keep coming
        time.sleep(2.0)
        predictor.kill()  # SIGKILL: answers stored but not yet published or committed are redelivered
        time.sleep(1.0)
        predictor = predictor_process(settings, tmp_path / "predictor-2.log", MODEL, max_batch=16)
        predictor.start()
        time.sleep(2.0)
    finally:
        stop.set()
        sender.join(10)
    try:
        answered = answers.wait_for(set(ids), timeout=120)
    finally:
        predictor.stop()
    assert_answered_once(answered, ids)
    versions = collections.Counter(answered[request_id][0]["version"] for request_id in ids)
    assert set(versions) == {first, second} and all(count > 0 for count in versions.values())
    with Store(settings) as store:
        assert store["predictions"].count_documents({}) == len(ids)  # one stored answer per request id
    print(f"{len(ids)} requests; answers by version: {dict(versions)}; "
          f"published twice after the SIGKILL: {sum(len(answered[i]) - 1 for i in ids)}")  # fmt: skip


def test_the_model_server_publishes_what_it_answered_on_the_predictions_topic(settings, answers, tmp_path) -> None:
    import httpx

    from tensordb.testing import free_port, server_process

    version = save_version(settings, 1)
    port = free_port()
    with server_process(settings, tmp_path / "serve.log", MODEL, port):
        body = httpx.post(
            f"http://127.0.0.1:{port}/predict", json={"instances": instances(np.random.default_rng(2), 3)}, timeout=30
        ).json()
        deadline = time.monotonic() + 30
        while not answers.records and time.monotonic() < deadline:
            time.sleep(0.2)
    (record,) = answers.records
    assert record["via"] == "http" and record["version"] == version == body["version"]
    assert record["outputs"] == body["predictions"] and record["classes"] == body["classes"]
    assert record["request_id"].startswith("http-") and record["latency_ms"] > 0
