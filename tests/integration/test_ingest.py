"""Publishing samples and the ingest processor, end to end through the real broker, processors,
mongod and GridFS."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson

from streams.ingest import sample_document, store_samples, stored_arrays
from streams.processing import ProcessorContext
from tensordb.client import TensorDB
from tensordb.config import Settings, Topic
from tensordb.data.loader import sample_arrays
from tensordb.data.samples import INLINE_MAX_BYTES, SAMPLES
from tensordb.infra.bus import Publisher, Received, make_consumer, receive
from tensordb.infra.dead_letters import COLLECTION as DEAD_LETTERS
from tensordb.testing import ChildProcess, raw_database, wait_for


def raw_chunks(settings: Settings) -> int:
    """Blob chunks in the test's database, counted by a plain client (the store keeps them to itself)."""
    with raw_database(settings) as raw:
        return raw["blobs.chunks"].count_documents({})


def _stored(db: TensorDB, sample_id: str) -> dict | None:
    return db.store[SAMPLES].find_one({"_id": sample_id})


def test_published_sample_is_queryable_with_metadata_and_identical_bytes(settings: Settings, processors: ChildProcess) -> None:
    image = np.random.default_rng(1).integers(0, 255, (28, 28), dtype=np.uint8)
    with TensorDB(settings) as db:
        sample_id = db.publish_sample(
            {"image": image, "mask": image > 128},
            dataset="scans",
            labels={"tumour": 1, "grade": "high"},
            metadata={"hospital": "St Mary's", "age": 61},
            tags=["tumour"],
            version="2",
        )
        db.flush()
        doc = wait_for(lambda: _stored(db, sample_id), what="the sample document")
        assert doc["dataset"] == "scans" and doc["version"] == "2" and doc["tags"] == ["tumour"]
        assert doc["labels"] == {"tumour": 1, "grade": "high"} and doc["metadata"] == {"hospital": "St Mary's", "age": 61}
        assert doc["arrays"]["image"]["dtype"] == "uint8" and doc["arrays"]["image"]["shape"] == [28, 28]
        assert doc["arrays"]["mask"]["dtype"] == "bool"
        assert doc["arrays"]["image"]["sha256"] == hashlib.sha256(image.tobytes()).hexdigest()
        assert doc["imported_at"] is not None and doc["source"] == "tensordb-sdk"
        # found by a query on user fields, and the bytes read back are identical
        cohort = db.cohort({"metadata.age": {"$gt": 60}, "labels.grade": "high"}, x="image", y="tumour")
        assert cohort.ids() == [sample_id]
        x, y = next(iter(cohort.stream(batch_size=4)))
        assert hashlib.sha256(x[0].tobytes()).hexdigest() == doc["arrays"]["image"]["sha256"]
        np.testing.assert_array_equal(x[0], image)
        assert y.tolist() == [1]


def test_a_record_delivered_twice_is_stored_once_as_one_document(settings: Settings, processors: ChildProcess) -> None:
    record = {
        "schema": "sample/1",
        "sample_id": "twice",
        "dataset": "d",
        "arrays": {"x": {"dtype": "float32", "shape": [3], "data": base64.b64encode(np.ones(3, np.float32).tobytes()).decode()}},
    }
    with Publisher(settings) as publisher:
        # one key, one partition: "after" is processed only once both copies have been
        publisher.publish(Topic.INGEST, record, key="one-partition")
        publisher.publish(Topic.INGEST, record, key="one-partition")  # a producer retry or a replayed partition looks like this
        publisher.publish(Topic.INGEST, {**record, "sample_id": "after"}, key="one-partition")
    with TensorDB(settings) as db:
        wait_for(lambda: _stored(db, "after"), what="the sample after the duplicate")
        assert db.store[SAMPLES].count_documents({"_id": "twice"}) == 1
        assert _stored(db, "twice")["arrays"]["x"]["data"] == np.ones(3, np.float32).tobytes()  # small: inline
        assert db.store["blobs.files"].count_documents({}) == raw_chunks(settings) == 0
    # the data-imported events name each new sample exactly once
    consumer = make_consumer(settings, "imported-reader", [Topic.DATA_IMPORTED])
    try:
        announced: list[str] = []
        for _ in range(30):
            for message in receive(consumer, "data-imported/1", timeout=0.5):
                announced.extend(message.record["sample_ids"])
            if sorted(announced) == ["after", "twice"]:
                break
    finally:
        consumer.close()
    assert sorted(announced) == ["after", "twice"]


def test_five_megabyte_array_goes_through_the_claim_check_and_comes_back_identical(
    settings: Settings, processors: ChildProcess
) -> None:
    big = np.random.default_rng(2).standard_normal(5 * 1024 * 1024 // 8)  # 5 MB of float64
    with TensorDB(settings) as db:
        sample_id = db.publish_sample(big, dataset="big", labels=0.5)
        db.flush()
        doc = wait_for(lambda: _stored(db, sample_id), what="the big sample")
        entry = doc["arrays"]["x"]
        assert entry["claim_check"] and entry["nbytes"] == big.nbytes
        assert db.store["blobs.files"].count_documents({"_id": entry["blob_id"]}) == 1
        x, y = next(iter(db.cohort({"dataset": "big"}).stream(batch_size=1)))
        np.testing.assert_array_equal(x[0], big)
        assert y.tolist() == [0.5]


def test_small_arrays_are_kept_in_the_sample_document_and_larger_ones_in_gridfs(settings: Settings, ingest) -> None:
    """Up to INLINE_MAX_BYTES of a sample's arrays, smallest first, are kept in its document; the
    rest are GridFS blobs, as every array was before (and samples stored then are still read)."""

    def record(sample_id: str, **sizes: int) -> dict:
        arrays = {name: np.full(size, len(name), np.uint8) for name, size in sizes.items()}
        specs = {
            name: {"dtype": "uint8", "shape": [a.size], "data": base64.b64encode(a.tobytes()).decode()}
            for name, a in arrays.items()
        }
        return {"schema": "sample/1", "sample_id": sample_id, "dataset": "sizes", "arrays": specs}

    ingest(
        [
            record("at-limit", x=INLINE_MAX_BYTES),
            record("over-limit", x=INLINE_MAX_BYTES + 1),
            record("two", x=INLINE_MAX_BYTES // 2 + 1, xx=INLINE_MAX_BYTES // 2),  # together over the limit
        ]
    )
    with TensorDB(settings) as db:
        stored = {document["_id"]: document["arrays"] for document in db.store[SAMPLES].find()}
        files = db.store["blobs.files"]
        assert "data" in stored["at-limit"]["x"] and "blob_id" not in stored["at-limit"]["x"]
        assert (
            "data" not in stored["over-limit"]["x"] and files.count_documents({"_id": stored["over-limit"]["x"]["blob_id"]}) == 1
        )
        assert "data" in stored["two"]["xx"] and "blob_id" in stored["two"]["x"]  # the smaller one inline
        assert files.count_documents({}) == 2
        for sample_id in stored:
            ((x, _),) = db.cohort({"_id": sample_id}, y=None).stream(batch_size=1)
            assert x[0].tolist() == [1] * x.shape[1]
        reread = sample_arrays(db.store, list(db.store[SAMPLES].find({"_id": "two"})))
        assert reread[0]["xx"].tolist() == [2] * (INLINE_MAX_BYTES // 2)


def test_inconsistent_arrays_and_broken_references_become_dead_letters(settings: Settings, processors: ChildProcess) -> None:
    good = {"schema": "sample/1", "dataset": "d", "arrays": {"x": {"dtype": "uint8", "values": [[1, 2], [3, 4]]}}}
    wrong_size = {**good, "sample_id": "wrong-size", "arrays": {"x": {"dtype": "uint16", "shape": [3], "data": "AAAA"}}}
    missing_blob = {
        **good,
        "sample_id": "no-blob",
        "arrays": {"x": {"dtype": "uint8", "shape": [4], "blob_id": "0" * 24, "sha256": "0" * 64, "nbytes": 4}},
    }
    with Publisher(settings) as publisher:
        for record in (wrong_size, missing_blob, {**good, "sample_id": "good"}):
            publisher.publish(Topic.INGEST, record, key="k")
    with TensorDB(settings) as db:
        doc = wait_for(lambda: _stored(db, "good"), what="the good sample")
        assert doc["arrays"]["x"]["shape"] == [2, 2]  # inferred from the JSON values
        letters = {letter["offset"]: letter["reason"] for letter in db.store[DEAD_LETTERS].find()}
        assert len(letters) == 2
        assert "do not fit shape [3] of uint16" in letters[0]
        assert "does not exist" in letters[1]
        assert db.store[SAMPLES].count_documents({}) == 1


def _kcat_environment(tmp_path: Path) -> dict[str, str]:
    """Debian bookworm's kcat links librdkafka 2.0.2, which cannot parse Tansu 0.6's ApiVersions
    reply (real Kafka is fine); run the same kcat binary on the newer librdkafka that ships inside
    the confluent-kafka wheel."""
    import confluent_kafka

    bundled = next((Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs").glob("librdkafka*.so*"))
    (tmp_path / "librdkafka.so.1").symlink_to(bundled)
    return {**os.environ, "LD_LIBRARY_PATH": str(tmp_path)}


def test_a_sample_published_with_kcat_is_persisted(settings: Settings, processors: ChildProcess, tmp_path: Path) -> None:
    assert shutil.which("kcat"), "kcat is missing: `make test` installs it (Debian package kcat)"
    record = {
        "schema": "sample/1",
        "sample_id": "from-kcat",
        "dataset": "cli",
        "arrays": {"x": {"dtype": "int16", "shape": [2], "values": [-1, 300]}},
        "labels": {"y": 7},
    }
    subprocess.run(
        ["kcat", "-P", "-b", settings.kafka_bootstrap, "-t", settings.topic(Topic.INGEST), "-k", "from-kcat"],
        input=orjson.dumps(record),
        check=True,
        timeout=30,
        env=_kcat_environment(tmp_path),
    )
    with TensorDB(settings) as db:
        doc = wait_for(lambda: _stored(db, "from-kcat"), what="the kcat sample")
        assert doc["source"] == "kafka" and doc["labels"] == {"y": 7}
        x, _ = next(iter(db.cohort({"dataset": "cli"}).stream(batch_size=1)))
        assert x.dtype == np.int16 and x[0].tolist() == [-1, 300]


def test_a_refused_document_never_removes_the_blobs_of_a_sample_stored_under_its_id(settings: Settings) -> None:
    """MongoDB refuses one of two documents of a sample id in a batch (a tag too long for its
    4.0 index, a stand-in for any refusal): the blobs, written once for both, stay with the one stored."""
    context = ProcessorContext(settings)
    try:
        data = np.arange(INLINE_MAX_BYTES + 1, dtype=np.uint64).astype(np.uint8).tobytes()
        prepared = []
        for offset, tag in enumerate(["t" * 1100, "ok"]):  # the refused one first: it wrote the blob
            arrays, blobs = stored_arrays(context.store, "d", "shared-id", {"x": ("uint8", [len(data)], data)})
            origin = {"topic": settings.topic(Topic.INGEST), "partition": 0, "offset": offset}
            document = sample_document(
                context.store, {"dataset": "d", "tags": [tag]}, "shared-id", arrays, datetime.now(UTC), origin
            )
            received = Received(origin["topic"], 0, offset, None, orjson.dumps({"tag": tag}), {}, None)
            prepared.append((received, document, blobs))
        stored, inserted = store_samples(context, prepared)
        assert inserted == {"shared-id"}
        assert context.store[DEAD_LETTERS].count_documents({}) == 1
        (arrays,) = sample_arrays(context.store, list(context.store[SAMPLES].find({"_id": "shared-id"})))
        assert arrays["x"].tobytes() == data  # old code: the refused document's cleanup deleted the stored sample's blob
    finally:
        context.close()
