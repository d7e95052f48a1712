"""The lazy streaming loader against the real mongod/GridFS: complete, ordered or shuffled,
resumable, memory-bounded, and consumable by Keras."""

from __future__ import annotations

import base64
import gc
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from tensordb.client import TensorDB
from tensordb.config import Settings
from tensordb.data.loader import BATCH_ALIGNMENT
from tensordb.data.samples import SAMPLES
from tensordb.errors import QueryError
from tensordb.infra.store import BLOB_BUCKET
from tensordb.testing import raw_database


def images(start: int, count: int, shape: tuple[int, ...] = (8, 8)) -> list[dict]:
    records = []
    for i in range(start, start + count):
        image = np.full(shape, i % 251, np.uint8)
        records.append(
            {
                "schema": "sample/1",
                "sample_id": f"img{i:06d}",
                "dataset": "images",
                "arrays": {"x": {"dtype": "uint8", "shape": list(shape), "data": base64.b64encode(image.tobytes()).decode()}},
                "labels": {"y": i},
            }
        )
    return records


def test_stream_yields_every_sample_once_in_cohort_order_with_its_bytes(settings: Settings, ingest) -> None:
    ingest(images(0, 250))
    with TensorDB(settings) as db:
        batches = list(db.cohort({"dataset": "images"}, sort=[("_id", 1)]).stream(batch_size=64))
    assert [len(x) for x, _ in batches] == [64, 64, 64, 58]
    labels = np.concatenate([y for _, y in batches])
    assert labels.tolist() == list(range(250))
    x = np.concatenate([x for x, _ in batches])
    assert x.shape == (250, 8, 8) and x.dtype == np.uint8
    assert all((x[i] == i % 251).all() for i in range(250))
    assert all(x.ctypes.data % BATCH_ALIGNMENT == 0 for x, _ in batches)  # tf.data takes them without a copy


def test_blobs_of_several_chunks_read_over_several_replies_arrive_whole(
    settings: Settings, ingest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each batch's blobs come in small replies (BLOB_REPLY_BYTES), which may split a blob's chunks
    between two replies: every sample still gets exactly its bytes, by cursor and by snapshot."""
    monkeypatch.setattr("streams.ingest.INLINE_MAX_BYTES", 0)
    monkeypatch.setattr("tensordb.infra.store.CHUNK_BYTES", 100)  # a 16×16 image is 3 chunks
    monkeypatch.setattr("tensordb.infra.store.BLOB_REPLY_BYTES", 250)  # 2 chunks per reply
    ingest(images(0, 40, shape=(16, 16)))
    with TensorDB(settings) as db:
        with raw_database(settings) as raw:
            assert raw[f"{BLOB_BUCKET}.chunks"].count_documents({}) == 120
        cohort = db.cohort({"dataset": "images"}, sort=[("labels.y", 1)])
        for stream in (cohort.stream(batch_size=16), cohort.stream(batch_size=16, shuffle=True)):
            x, y = (np.concatenate(parts) for parts in zip(*stream, strict=True))
            assert sorted(y.tolist()) == list(range(40)) and x.shape == (40, 16, 16)
            assert all((image == label % 251).all() for image, label in zip(x, y, strict=True))


def test_a_cohort_of_inline_samples_and_samples_in_gridfs_streams_each_with_its_bytes(
    settings: Settings, ingest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Samples stored before arrays were kept inline (their bytes in GridFS) and those stored
    since, in one cohort and in the same batches: both read, in order, by cursor and by snapshot."""
    monkeypatch.setattr("streams.ingest.INLINE_MAX_BYTES", 0)  # every array to GridFS, as before
    ingest(images(0, 50))
    monkeypatch.undo()
    ingest(images(50, 50))
    with TensorDB(settings) as db:
        stored = {document["_id"]: document["arrays"]["x"] for document in db.store[SAMPLES].find()}
        assert sum("blob_id" in entry for entry in stored.values()) == sum("data" in entry for entry in stored.values()) == 50
        cohort = db.cohort({"dataset": "images"}, sort=[("labels.y", 1)])
        for stream in (cohort.stream(batch_size=32), cohort.stream(batch_size=32, shuffle=True)):
            x, y = (np.concatenate(parts) for parts in zip(*stream, strict=True))
            assert sorted(y.tolist()) == list(range(100))
            assert all((image == label % 251).all() for image, label in zip(x, y, strict=True))


def test_shuffle_is_a_seeded_permutation(settings: Settings, ingest) -> None:
    ingest(images(0, 200))
    with TensorDB(settings) as db:
        cohort = db.cohort({"dataset": "images"})

        def order(seed: int) -> list[int]:
            return np.concatenate([y for _, y in cohort.stream(32, shuffle_buffer=50, seed=seed)]).tolist()

        first, again, other = order(1), order(1), order(2)
    assert sorted(first) == list(range(200)) and first == again and first != other
    assert first != sorted(first, reverse=True)  # not the cohort order (newest first)


def test_a_restarted_reader_resumes_from_its_position(settings: Settings, ingest) -> None:
    ingest(images(0, 100))
    with TensorDB(settings) as db:
        cohort = db.cohort({"dataset": "images"}).pinned()
        full = np.concatenate([y for _, y in cohort.stream(16, shuffle_buffer=30, seed=7)]).tolist()
        stream = cohort.stream(16, shuffle_buffer=30, seed=7)
        seen = []
        for _, y in stream:
            seen.extend(y.tolist())
            if len(seen) >= 48:
                break
        position = stream.position
        ingest(images(100, 20))  # arrivals after the pin are not members of the pinned cohort
        resumed = np.concatenate([y for _, y in cohort.stream(16, shuffle_buffer=30, seed=7, start=position)]).tolist()
    assert position == 48
    assert seen + resumed == full


def test_streaming_a_cohort_larger_than_the_memory_bound_stays_within_it(settings: Settings, ingest) -> None:
    shape = (64, 64, 4)  # 16 KiB per sample
    sample_bytes = int(np.prod(shape))
    for start in range(0, 1600, 200):  # 1600 samples = 25 MiB of pixels
        ingest(images(start, 200, shape))
    batch_size, prefetch = 32, 2
    bound = 4 * batch_size * (prefetch + 2) * sample_bytes  # a few batches in flight, with headroom
    cohort_bytes = 1600 * sample_bytes
    assert cohort_bytes > 10 * bound / 4  # the cohort is several times the bound
    with TensorDB(settings) as db:
        stream = db.cohort({"dataset": "images"}).stream(batch_size, prefetch=prefetch)
        gc.collect()
        tracemalloc.start()
        try:
            total = 0
            for x, _ in stream:
                total += x.nbytes
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert total == cohort_bytes
    assert peak < bound, f"peak {peak / 2**20:.1f} MiB exceeds the bound {bound / 2**20:.1f} MiB"


def test_keras_trains_an_epoch_from_to_tf_dataset(settings: Settings, ingest) -> None:
    import keras
    import tensorflow as tf

    records = images(0, 256)
    for record in records:
        record["labels"]["y"] = int(record["labels"]["y"] % 2)
    ingest(records)
    with TensorDB(settings) as db:
        dataset = db.cohort({"dataset": "images"}).to_tf_dataset(batch_size=32, shuffle_buffer=64)
        assert dataset.element_spec == (
            tf.TensorSpec((None, 8, 8), tf.uint8),
            tf.TensorSpec((None,), tf.int64),
        )
        model = keras.Sequential(
            [
                keras.Input((8, 8)),
                keras.layers.Rescaling(1 / 255),
                keras.layers.Flatten(),
                keras.layers.Dense(2, activation="softmax"),
            ]
        )
        model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
        history = model.fit(dataset, epochs=1, verbose=0)
    assert len(history.history["loss"]) == 1 and np.isfinite(history.history["loss"][0])


def test_to_tf_dataset_yields_the_streams_batches_though_it_hands_them_over_in_groups(settings: Settings, ingest) -> None:
    """Small samples' batches are handed to tf.data several at a time and cut back there: the
    batches, their order, the epochs and a resumed stream's rest are those of the stream."""
    ingest(images(0, 150))
    with TensorDB(settings) as db:
        cohort = db.cohort({"dataset": "images"}).pinned()
        expected = [[y.tolist() for _, y in cohort.stream(16, shuffle=True, seed=3, epoch=epoch)] for epoch in (0, 1)]
        dataset = cohort.to_tf_dataset(16, shuffle=True, seed=3)
        epochs = [[y.numpy().tolist() for _, y in dataset] for _ in range(2)]
        stream = cohort.stream(16, shuffle=True, seed=3)
        read = iter(stream)
        for _ in range(3):
            next(read)
        state = stream.state()
        resumed = [y.numpy().tolist() for _, y in cohort.to_tf_dataset(16, shuffle=True, seed=3, state=state)]
        dropped = [int(x.shape[0]) for x, _ in cohort.to_tf_dataset(16, drop_remainder=True)]
        x, _ = next(iter(cohort.to_tf_dataset(16)))
    assert epochs == expected and [len(batch) for batch in epochs[0]] == [16] * 9 + [6]
    assert resumed == expected[0][3:]
    assert dropped == [16] * 9
    assert x.shape == (16, 8, 8) and x.dtype.name == "uint8"


#: Run in a fresh interpreter (see tests/unit/test_allocator.py): a pass over each dataset, then
#: whether a large allocation gets its own mmap.
ALLOCATOR_SCRIPT = """
import ctypes
from tensordb.client import TensorDB
from tensordb.infra import allocator
with TensorDB() as db:
    cohort = db.cohort({"dataset": "images"})
    kept, restored = cohort.to_tf_dataset(16, mmap_threshold=None), cohort.to_tf_dataset(16)
    ctypes.CDLL(None).mallopt(allocator.M_MMAP_THRESHOLD, 128 * 1024)  # what TensorFlow sets, once per process
    for dataset in (kept, restored):
        print(sum(int(x.shape[0]) for x, _ in dataset), allocator.large_allocations_are_mapped())
"""


def test_each_pass_of_to_tf_dataset_undoes_tensorflows_allocator_setting_unless_told_not_to(settings: Settings, ingest) -> None:
    """TensorFlow's from_generator makes every allocation of 128 KiB or more its own mmap; a pass
    of to_tf_dataset sets glibc's thresholds back, so a large array comes from the heap again."""
    ingest(images(0, 40))
    result = subprocess.run(
        [sys.executable, "-c", ALLOCATOR_SCRIPT],
        env={**os.environ, **settings.as_environment()},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["40", "True", "40", "False"]
    with TensorDB(settings) as db, pytest.raises(QueryError, match="mmap_threshold must be between 1 and 33554432"):
        db.cohort({"dataset": "images"}).to_tf_dataset(16, mmap_threshold=64 * 2**20)


def test_an_array_whose_name_holds_a_dot_streams_like_any_other(settings: Settings, ingest) -> None:
    """The sample schema allows dots in array names (``img.v1``), which MongoDB paths read as levels."""
    records = images(0, 20)
    for record in records:
        record["arrays"] = {"img.v1": record["arrays"]["x"]}
    ingest(records)
    with TensorDB(settings) as db:
        cohort = db.cohort({"dataset": "images"}, x="img.v1")
        streamed = list(cohort.stream(8))
        shuffled = sorted(int(label) for _, y in cohort.stream(8, shuffle=True) for label in y)
        x, y = next(iter(cohort.to_tf_dataset(8)))
        with pytest.raises(QueryError, match=r"no array 'nope': .*\{'arrays.nope': \{'\$exists': true\}\}"):
            next(iter(db.cohort({"dataset": "images"}, x="nope", y=None).stream(8)))
        with pytest.raises(QueryError, match="no array 'no.pe': filter the cohort to samples that have it or choose"):
            db.cohort({"dataset": "images"}, x="no.pe").to_tf_dataset(8)
        with pytest.raises(QueryError, match="no label 'nope'"):
            db.cohort({"dataset": "images"}, x="img.v1", y="nope").to_tf_dataset(8)
    labels = [int(label) for _, y in streamed for label in y]
    assert sorted(labels) == list(range(20)) and shuffled == list(range(20))
    for images_x, images_y in streamed:
        assert [int(row[0, 0]) for row in images_x] == [int(label) % 251 for label in images_y]
    assert x.shape == (8, 8, 8) and y.dtype.name == "int64"
