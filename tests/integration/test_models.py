"""The model registry against the real mongod and broker: identical round trips, versions, TensorLayer
sorts and filters, non-blocking checkpoints, builder entry points, atomic promotions with their model
events, and deletes that leave no blob behind."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import keras
import numpy as np
import pytest
from pymongo.database import Database

from tensordb.config import Settings, Topic
from tensordb.errors import IntegrityError, ModelFormatError, ModelNotFoundError, QueryError
from tensordb.infra.bus import Publisher, make_consumer, receive
from tensordb.infra.store import BLOB_BUCKET, Store
from tensordb.models.keras_format import npz_to_weights, private_weights, weights_to_npz
from tensordb.models.registry import ALIASES, BLOB_KIND, COLLECTION, ModelRegistry
from tensordb.testing import raw_database, wait_for
from tensordb.testing.models import two_tower

X = np.random.default_rng(3).standard_normal((16, 8)).astype(np.float32)


@pytest.fixture
def registry(store: Store) -> Iterator[ModelRegistry]:
    with ModelRegistry(store) as registry:
        yield registry


@pytest.fixture
def publisher(settings: Settings) -> Iterator[Publisher]:
    with Publisher(settings) as publisher:
        yield publisher


def small_model(seed: int = 0, compiled: bool = True) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3, activation="softmax")]
    )
    if compiled:
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def blob_counts(store: Store) -> tuple[int, int]:
    """GridFS files of this project, and all chunks (each test has a database of its own)."""
    files = store[f"{BLOB_BUCKET}.files"].count_documents({"metadata.project": store.project})
    with raw_database(store.settings) as raw:
        return files, raw[f"{BLOB_BUCKET}.chunks"].count_documents({})


def assert_same_weights(loaded: keras.Model, saved: keras.Model) -> None:
    for ours, theirs in zip(loaded.get_weights(), saved.get_weights(), strict=True):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        assert ours.tobytes() == theirs.tobytes()


def model_events(settings: Settings, count: int, timeout: float = 30.0) -> list[dict]:
    """The first ``count`` model events of the project's topic, in partition order."""
    consumer = make_consumer(settings, f"test-{uuid.uuid4().hex[:8]}", [Topic.MODEL_EVENTS])
    seen: list[dict] = []
    try:

        def probe() -> bool:
            for message in receive(consumer, "model-event/1", timeout=0.5):
                assert message.error is None, message.error
                seen.append(message.record)
            return len(seen) >= count

        wait_for(probe, timeout=timeout, interval=0, what=f"{count} model events")
    finally:
        consumer.close()
    return seen


def test_a_saved_model_comes_back_with_identical_weights_and_predictions(registry: ModelRegistry) -> None:
    model = small_model()
    model.fit(X, np.arange(16) % 3, epochs=1, verbose=0)  # weights that differ from any initialiser
    cohort = {"labels.tumour": {"$exists": True}, "dataset": "scans"}
    info = registry.save(
        model,
        "classifier",
        epoch=4,
        job_id="job-1",
        lineage={"job": "job-1", "cohort": cohort, "epoch": 4},
        accuracy=0.75,
        loss=0.5,
        description="first",
    )

    loaded = registry.find(name="classifier")
    assert_same_weights(loaded, model)
    np.testing.assert_array_equal(loaded.predict(X, verbose=0), model.predict(X, verbose=0))
    assert loaded.tensordb_info == info == registry.find_info(name="classifier")
    assert "tensordb_info" not in [getattr(v, "path", "") for v in loaded.variables]
    assert loaded.compiled and isinstance(loaded.optimizer, keras.optimizers.Adam)  # names get _1 suffixes per process
    loaded.evaluate(X, np.arange(16) % 3, verbose=0)  # restored compile config: ready for evaluation

    assert (info["name"], info["version"], info["epoch"], info["job_id"]) == ("classifier", 1, 4, "job-1")
    assert info["metrics"] == {"accuracy": 0.75, "loss": 0.5} and info["tags"] == {"description": "first"}
    assert (info["accuracy"], info["description"]) == (0.75, "first")  # top-level, as in TensorLayer
    assert json.loads(info["lineage"]["cohort"]) == cohort  # a query is kept as JSON text (MongoDB 4.0)
    assert info["lineage"]["job"] == "job-1" and info["lineage"]["epoch"] == 4
    assert json.loads(info["architecture_json"])["class_name"] == "Sequential" and "builder" not in info
    parameters = info["parameters"]
    assert parameters["arrays"] == 4 and len(parameters["sha256"]) == 64 and parameters["nbytes"] > 4 * (8 * 16 + 16 * 3)
    assert npz_to_weights(weights_to_npz(model.get_weights()))[0].tobytes() == model.get_weights()[0].tobytes()


def test_the_parameter_blob_is_tagged(registry: ModelRegistry, store: Store) -> None:
    info = registry.save(small_model(compiled=False), "plain")
    blob = store[f"{BLOB_BUCKET}.files"].find_one({"_id": info["parameters"]["blob"]})
    assert blob["metadata"]["kind"] == BLOB_KIND and blob["metadata"]["name"] == "plain"
    assert blob["metadata"]["version"] == 1 and "pending" not in blob["metadata"]
    assert info["compile_json"] is None and not registry.find(name="plain").compiled
    assert [w.tobytes() for w in registry.weights(info)] == [w.tobytes() for w in registry.find(name="plain").get_weights()]


def test_versions_count_per_name_and_the_newest_is_found(registry: ModelRegistry) -> None:
    models = [small_model(seed) for seed in range(3)]
    assert [registry.save(m, "mnist")["version"] for m in models] == [1, 2, 3]
    assert registry.save(small_model(9), "other")["version"] == 1

    assert [d["version"] for d in registry.versions("mnist")] == [1, 2, 3]
    assert_same_weights(registry.find(name="mnist"), models[2])  # newest by default
    assert_same_weights(registry.find(name="mnist", version=2), models[1])
    assert_same_weights(registry.find(name="mnist", sort=[("time", 1), ("version", 1)]), models[0])
    assert registry.find(name="mnist", version=7) is None and registry.find(name="absent") is None
    assert registry.find_info()["name"] == "other"  # any name: the newest of the project


def test_concurrent_saves_of_one_name_get_distinct_versions(registry: ModelRegistry) -> None:
    model = small_model()
    with ThreadPoolExecutor(6) as pool:
        versions = list(pool.map(lambda i: registry.save(model, "shared", run=i)["version"], range(12)))
    assert sorted(versions) == list(range(1, 13))


def test_tensorlayer_sorts_and_filters(registry: ModelRegistry) -> None:
    scores = [(0.8, 2.3), (0.9, 1.1), (0.7, 3.0)]
    models = [small_model(seed) for seed in range(3)]
    for model, (accuracy, loss) in zip(models, scores):
        registry.save(model, "second_model", accuracy=accuracy, loss=loss)
    # NumPy scalars from an evaluation loop: stored as plain numbers, float32 by its shortest decimal
    numpy_info = registry.save(models[0], "numpy", accuracy=np.float32(0.8), loss=np.float64(0.25), steps=np.int64(7))
    assert numpy_info["metrics"] == {"accuracy": 0.8, "loss": 0.25, "steps": 7}
    assert type(numpy_info["steps"]) is int and type(numpy_info["accuracy"]) is float

    assert registry.find_info(sort=[("accuracy", -1)], name="second_model")["accuracy"] == 0.9
    assert_same_weights(registry.find(sort=[("accuracy", -1)], name="second_model"), models[1])
    assert_same_weights(registry.find(sort=[("loss", -1)], name="second_model"), models[2])
    assert registry.find(accuracy=0.8, loss=2.3).tensordb_info["version"] == 1  # TensorLayer's find_model(accuracy=.., loss=..)
    assert registry.find_info(accuracy=0.8, name="numpy")["version"] == 1
    assert registry.find_info(accuracy=np.float32(0.8), name="numpy")["version"] == 1
    assert registry.find_info(**{"metrics.loss": 0.25})["name"] == "numpy"
    assert registry.find_info(accuracy=0.123) is None


def test_save_async_blocks_only_for_the_snapshot(registry: ModelRegistry, store: Store, monkeypatch) -> None:
    model = small_model()
    release = threading.Event()
    uploading = threading.Event()
    put_bytes = store.put_bytes

    def held_upload(*args, **kwargs):
        uploading.set()
        assert release.wait(30), "test never released the upload"
        return put_bytes(*args, **kwargs)

    monkeypatch.setattr(store, "put_bytes", held_upload)
    expected = model.get_weights()
    future = registry.save_async(model, "ckpt", epoch=1, loss=0.4)  # returns while its upload is held
    assert uploading.wait(10) and not future.done()
    model.fit(X, np.arange(16) % 3, epochs=2, verbose=0)  # training goes on: in-place optimizer updates
    assert any((w != e).any() for w, e in zip(model.get_weights(), expected))
    model.set_weights([np.zeros_like(w) for w in expected])
    second = registry.save_async(model, "ckpt", epoch=2, loss=0.3)
    assert registry.find_info(name="ckpt") is None
    release.set()

    first_info, second_info = registry.wait()
    assert future.result() == first_info and second.result() == second_info
    assert (first_info["version"], first_info["epoch"], second_info["version"]) == (1, 1, 2)  # in call order
    stored = registry.find(name="ckpt", version=1).get_weights()
    assert [w.tobytes() for w in stored] == [w.tobytes() for w in expected]  # the snapshot, not later updates
    assert all(not w.any() for w in registry.find(name="ckpt", version=2).get_weights())


def test_snapshots_never_alias_live_variables() -> None:
    live = np.arange(6.0)
    for backend, weights in (("tensorflow", [live[:]]), ("numpy", [live]), ("torch", [live[:]])):
        (snapshot,) = private_weights(weights, backend)
        live[0] = 99.0  # an in-place optimizer update
        assert snapshot[0] == 0.0, backend
        live[0] = 0.0
    owned = np.ones(3)
    assert private_weights([owned], "tensorflow")[0] is owned  # TensorFlow's get_weights arrays are private already


def test_a_failed_async_upload_is_reported_and_leaves_nothing(registry: ModelRegistry, store: Store, monkeypatch) -> None:
    before = blob_counts(store)

    def broken_insert(*args, **kwargs):
        raise RuntimeError("network gone")

    monkeypatch.setattr(registry.collection, "insert_one", broken_insert)
    future = registry.save_async(small_model(), "ckpt")
    with pytest.raises(RuntimeError, match="network gone"):
        registry.wait()
    assert isinstance(future.exception(), RuntimeError)
    assert blob_counts(store) == before
    monkeypatch.undo()
    assert registry.save(small_model(), "ckpt")["version"] == 2  # a failed save leaves a gap, never a reuse


def test_a_subclassed_model_round_trips_through_its_builder(registry: ModelRegistry) -> None:
    model = two_tower(units=5, build=True)
    with pytest.raises(ModelFormatError, match="builder="):
        registry.save(model, "tower")
    for bad in ("os.system", "tensordb.testing.models:two_tower; rm", "a:b:c", "import os"):
        with pytest.raises(ModelFormatError, match="package.module:function"):
            registry.save(model, "tower", builder=bad)
    with pytest.raises(ModelFormatError, match="JSON"):
        registry.save(model, "tower", builder="tensordb.testing.models:two_tower", builder_kwargs={"units": object()})

    info = registry.save(model, "tower", builder="tensordb.testing.models:two_tower", builder_kwargs={"units": 5}, accuracy=0.5)
    assert "architecture_json" not in info and info["builder_kwargs"] == {"units": 5}
    loaded = registry.find(name="tower")  # the builder returns it unbuilt: built from the stored input shape
    assert type(loaded).__name__ == "TwoTower" and len(loaded.get_weights()) == info["parameters"]["arrays"] == 4
    assert_same_weights(loaded, model)
    np.testing.assert_array_equal(loaded.predict(X, verbose=0), model.predict(X, verbose=0))

    registry.collection.update_one({"_id": info["_id"]}, {"$set": {"builder": "tests.no_such_module:build"}})
    with pytest.raises(ModelFormatError, match="cannot import tests.no_such_module:build"):
        registry.find(name="tower")


def test_promote_moves_the_alias_and_publishes_an_event(settings: Settings, store: Store, publisher: Publisher) -> None:
    registry = ModelRegistry(store, publisher)
    models = [small_model(seed) for seed in range(3)]
    for model in models:
        registry.save(model, "classifier")
    assert registry.alias("classifier") is None
    assert registry.find(name="classifier", alias="production") is None

    first = registry.promote("classifier", 1)
    assert (first["version"], first["previous_version"], first["revision"]) == (1, None, 1)
    second = registry.promote(
        "classifier", 3, reason={"metric": "accuracy", "candidate": np.float32(0.9), "production": 0.8}, policy="digits"
    )
    assert (second["version"], second["previous_version"], second["revision"]) == (3, 1, 2)
    assert registry.alias("classifier") == 3 and registry.alias("classifier", "staging") is None
    assert_same_weights(registry.find(name="classifier", alias="production"), models[2])
    assert [(h["version"], h["previous_version"]) for h in registry.alias_info("classifier")["history"]] == [(1, None), (3, 1)]

    with pytest.raises(ModelNotFoundError):
        registry.promote("classifier", 9)
    with pytest.raises(QueryError, match="name="):
        registry.find_info(alias="production")
    registry.close()

    events = model_events(settings, 5)
    assert [(e["event"], e["version"]) for e in events] == [
        ("saved", 1),
        ("saved", 2),
        ("saved", 3),
        ("promoted", 1),
        ("promoted", 3),
    ]
    promoted = events[-1]
    assert promoted["model_name"] == "classifier" and promoted["alias"] == "production" and promoted["policy"] == "digits"
    assert promoted["detail"]["previous_version"] == 1 and promoted["detail"]["reason"]["candidate"] == 0.9


def test_concurrent_promotions_leave_one_consistent_alias(registry: ModelRegistry) -> None:
    model = small_model()
    for _ in range(4):
        registry.save(model, "classifier")
    rng = np.random.default_rng(1)
    targets = [int(v) for v in rng.integers(1, 5, size=40)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda v: registry.promote("classifier", v, alias="production"), targets))

    (alias,) = list(registry.aliases.find({"name": "classifier"}))  # one document per (name, alias)
    assert alias["revision"] == len(targets) == len({r["revision"] for r in results})
    history = alias["history"]
    assert sorted(h["version"] for h in history) == sorted(targets)
    assert history[0]["previous_version"] is None
    assert all(later["previous_version"] == earlier["version"] for earlier, later in zip(history, history[1:]))
    assert alias["version"] == history[-1]["version"] and alias["previous_version"] == history[-2]["version"]


def test_delete_removes_versions_blobs_and_aliases(settings: Settings, registry: ModelRegistry, store: Store) -> None:
    store.put_bytes(b"not a model", "other-blob")  # blobs of other kinds are left alone
    before = blob_counts(store)
    model = small_model()
    for run in range(3):
        registry.save(model, "mnist", run=run)
    registry.save(model, "cifar")
    registry.promote("mnist", 2)
    assert blob_counts(store) == (before[0] + 4, before[1] + 4)

    assert registry.delete("mnist", run=1) == 1  # only the matching one, and the alias that pointed at it
    assert [d["run"] for d in registry.versions("mnist")] == [0, 2]
    assert registry.alias("mnist") is None and store[ALIASES].count_documents({}) == 0
    assert blob_counts(store) == (before[0] + 3, before[1] + 3)
    assert registry.delete(version=3) == 1  # TensorLayer's delete_model(**filters), over every name

    assert registry.delete() == 2  # everything left in the project
    assert store[COLLECTION].count_documents({}) == 0 and blob_counts(store) == before
    assert registry.delete() == 0


def test_deletes_publish_events(settings: Settings, store: Store, publisher: Publisher) -> None:
    with ModelRegistry(store, publisher) as registry:
        registry.save(small_model(), "gone")
        registry.promote("gone", 1)
        assert registry.delete("gone") == 1
    deleted = model_events(settings, 3)[-1]
    assert (deleted["event"], deleted["version"], deleted["detail"]["aliases_removed"]) == ("deleted", 1, ["production"])


def test_crashed_saves_and_deletes_leave_no_orphans_after_a_sweep(registry: ModelRegistry, store: Store) -> None:
    before = blob_counts(store)
    crashed = registry.save(small_model(), "mnist")
    registry.save(small_model(), "kept")
    store[COLLECTION].delete_one({"_id": crashed["_id"]})  # the document went, the process died
    store.put_bytes(b"half a save", "model/x/9", kind=BLOB_KIND, pending=True)  # a save in progress
    assert blob_counts(store) == (before[0] + 3, before[1] + 3)

    assert registry.delete("nothing-by-this-name") == 0  # every delete sweeps
    assert blob_counts(store) == (before[0] + 2, before[1] + 2)  # the pending blob is spared
    assert registry.sweep_orphans(grace=timedelta(0)) == 1
    assert registry.find(name="kept") is not None


def test_operator_filters_and_reserved_fields_are_refused(registry: ModelRegistry, store: Store) -> None:
    model = small_model()
    registry.save(model, "mnist", accuracy=0.8)
    for bad in ({"$where": "1"}, {"accuracy": {"$gt": 0.5}}, {"a\0b": 1}, {"project": "another"}):
        with pytest.raises(QueryError):
            registry.find_info(**bad)
        with pytest.raises(QueryError):
            registry.delete(**bad)
    before = blob_counts(store)
    for bad in ({"$set": 1}, {"version": 3}, {"parameters": "x"}, {"note": {"$ne": 1}}):
        with pytest.raises(QueryError):
            registry.save(model, "mnist", **bad)
    with pytest.raises(QueryError, match="lineage field names"):
        registry.save(model, "mnist", lineage={"$where": "1"})
    for bad_name in ({"$ne": None}, ""):
        with pytest.raises(QueryError, match="non-empty strings"):
            registry.find_info(name=bad_name)
    assert blob_counts(store) == before and len(registry.versions("mnist")) == 1


def test_a_corrupted_parameter_blob_is_an_error_not_silent(registry: ModelRegistry, raw_db: Database) -> None:
    info = registry.save(small_model(), "mnist")
    chunk = raw_db[f"{BLOB_BUCKET}.chunks"].find_one({"files_id": info["parameters"]["blob"]})
    flipped = bytes(chunk["data"][:-1]) + bytes([chunk["data"][-1] ^ 1])
    raw_db[f"{BLOB_BUCKET}.chunks"].update_one({"_id": chunk["_id"]}, {"$set": {"data": flipped}})

    with pytest.raises(IntegrityError, match="sha256"):
        registry.find(name="mnist")


def test_the_model_indexes_exist(registry: ModelRegistry, raw_db: Database) -> None:
    indexes = {tuple(index["key"]): index.get("unique", False) for index in raw_db[COLLECTION].list_indexes()}
    assert indexes[("project", "name", "version")] is True
    assert ("project", "name", "time") in indexes and ("project", "job_id") in indexes
    aliases = {tuple(index["key"]): index.get("unique", False) for index in raw_db[ALIASES].list_indexes()}
    assert aliases[("project", "name", "alias")] is True
