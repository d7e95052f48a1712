"""Whole datasets against the real mongod: byte-identical round trips, versions, filters, and deletes
that leave no blob behind, even after a delete that died half-way."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import numpy as np
import pytest
from bson.errors import InvalidDocument
from pymongo.database import Database

from tensordb.config import Settings
from tensordb.data.datasets import COLLECTION, Datasets
from tensordb.errors import ArrayCodecError, IntegrityError, QueryError
from tensordb.infra.store import BLOB_BUCKET, Store
from tensordb.testing import raw_database

RNG = np.random.default_rng(7)
MNIST_LIKE = (
    RNG.integers(0, 256, size=(6, 28, 28), dtype=np.uint8),  # images
    RNG.integers(0, 10, size=6, dtype=np.int64),  # labels
    RNG.standard_normal((3, 5)).astype(np.float32),
    np.array([True, False, True]),
)


@pytest.fixture
def datasets(store: Store) -> Datasets:
    return Datasets(store)


def blob_counts(store: Store) -> tuple[int, int]:
    """GridFS files of this project, and all chunks (each test has a database of its own)."""
    files = store[f"{BLOB_BUCKET}.files"].count_documents({"metadata.project": store.project})
    with raw_database(store.settings) as raw:
        return files, raw[f"{BLOB_BUCKET}.chunks"].count_documents({})


def assert_identical(loaded: np.ndarray, saved: np.ndarray) -> None:
    assert loaded.dtype == saved.dtype and loaded.shape == saved.shape
    assert loaded.tobytes() == saved.tobytes()


def test_a_tuple_of_arrays_comes_back_byte_identical_with_its_document(datasets: Datasets) -> None:
    document = datasets.save(MNIST_LIKE, "mnist", description="this is a tutorial")

    loaded = datasets.find("mnist")
    assert type(loaded) is tuple and len(loaded) == len(MNIST_LIKE)
    for array, saved in zip(loaded, MNIST_LIKE):
        assert_identical(array, saved)

    assert (document["name"], document["version"], document["description"]) == ("mnist", 1, "this is a tutorial")
    assert document["project"] == datasets.project and document["time"].tzinfo is not None
    assert [(entry["dtype"], entry["shape"], entry["nbytes"]) for entry in document["arrays"]] == [
        (str(a.dtype), list(a.shape), a.nbytes) for a in MNIST_LIKE
    ]
    assert all(len(entry["sha256"]) == 64 for entry in document["arrays"])
    # what save returns is what is stored, to the millisecond
    (listed,) = datasets.list("mnist")
    assert listed == document


def test_the_saved_structure_comes_back(datasets: Datasets) -> None:
    image = np.asfortranarray(RNG.integers(0, 256, size=(4, 3), dtype=np.uint8))
    as_dict = {"train": image, "labels": np.arange(4, dtype=np.int64), "weights": np.ones(2, dtype=">f8")}
    datasets.save(as_dict, "dict")
    datasets.save([image, image[::-1]], "list")
    datasets.save(image, "single")
    datasets.save(np.array(3.5), "scalar")  # 0-d

    loaded = datasets.find("dict")
    assert type(loaded) is dict and list(loaded) == ["train", "labels", "weights"]
    for key, saved in as_dict.items():
        assert_identical(loaded[key], saved)
    loaded = datasets.find("list")
    assert type(loaded) is list and len(loaded) == 2
    assert_identical(loaded[1], np.ascontiguousarray(image[::-1]))
    loaded = datasets.find("single")
    assert isinstance(loaded, np.ndarray)
    assert_identical(loaded, image)
    assert datasets.find("scalar").shape == () and datasets.find("scalar") == 3.5


def test_versions_are_numbered_per_name_unless_given(datasets: Datasets) -> None:
    versions = [datasets.save(np.full(2, i), "mnist")["version"] for i in range(3)]
    assert versions == [1, 2, 3]
    assert datasets.save(np.full(2, 9), "mnist", version="1.0")["version"] == "1.0"
    assert datasets.save(np.full(2, 4), "mnist")["version"] == 4  # a string version leaves the count alone
    assert datasets.save(np.zeros(1), "other")["version"] == 1  # each name counts on its own
    assert datasets.save(np.full(2, 10), "mnist", version=10)["version"] == 10
    assert datasets.save(np.full(2, 11), "mnist")["version"] == 11  # never repeats an explicit integer

    assert datasets.find("mnist", version=2).tolist() == [1, 1]
    assert datasets.find("mnist", version="1.0").tolist() == [9, 9]
    assert datasets.find("mnist").tolist() == [11, 11]  # newest by save time
    assert datasets.find("mnist", sort=[("time", 1)]).tolist() == [0, 0]
    assert datasets.find("mnist", version=99) is None
    assert datasets.find("absent") is None


def test_concurrent_saves_of_one_name_get_distinct_versions(store: Store) -> None:
    def save(i: int) -> int:
        return Datasets(store).save(np.full(3, i), "shared")["version"]

    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(save, range(16)))
    assert sorted(versions) == list(range(1, 17))


def test_find_by_metadata_and_find_all_in_save_order(datasets: Datasets) -> None:
    datasets.save(np.zeros(1), "mnist", description="handwriting digit", split="train")
    datasets.save(np.ones(1), "mnist", description="handwriting digit", split="test")
    datasets.save(np.full(1, 2.0), "mnist", description="other")
    datasets.save(np.full(1, 3.0), "cifar", description="handwriting digit")

    assert datasets.find("mnist", split="train").tolist() == [0.0]
    assert datasets.find("mnist", description="handwriting digit").tolist() == [1.0]
    assert datasets.find("mnist", split="validation") is None
    assert [d.tolist() for d in datasets.find_all("mnist")] == [[0.0], [1.0], [2.0]]
    assert [d.tolist() for d in datasets.find_all("mnist", description="handwriting digit")] == [[0.0], [1.0]]
    assert [(d["name"], d["version"]) for d in datasets.list(description="handwriting digit")] == [
        ("mnist", 1),
        ("mnist", 2),
        ("cifar", 1),
    ]
    assert [d["version"] for d in datasets.list("mnist", version=3)] == [3]


def test_delete_removes_documents_and_every_blob(datasets: Datasets, store: Store) -> None:
    store.put_bytes(b"not a dataset", "other-blob")  # blobs of other kinds are left alone
    before = blob_counts(store)
    for i in range(3):
        datasets.save(MNIST_LIKE, "mnist", run=i)
    datasets.save({"x": np.zeros(3)}, "cifar")
    assert blob_counts(store) == (before[0] + 13, before[1] + 13)

    assert datasets.delete("mnist", run=1) == 1  # only the matching one
    assert [d["run"] for d in datasets.list("mnist")] == [0, 2]
    assert blob_counts(store) == (before[0] + 9, before[1] + 9)

    assert datasets.delete("mnist") == 2
    assert datasets.find("mnist") is None and datasets.find("cifar") is not None
    assert datasets.delete() == 1  # everything left in the project
    assert store[COLLECTION].count_documents({}) == 0
    assert blob_counts(store) == before
    assert datasets.delete() == 0


def test_projects_do_not_see_or_delete_each_others_datasets(settings: Settings, datasets: Datasets) -> None:
    with Store(settings.with_changes(project=f"{settings.project}-b")) as other_store:
        other = Datasets(other_store)
        other.save(np.arange(3), "mnist")
        datasets.save(np.arange(5), "mnist")

        assert datasets.find("mnist").tolist() == [0, 1, 2, 3, 4]
        assert datasets.save(np.arange(1), "mnist")["version"] == 2  # counters are per project too
        assert datasets.delete() == 2
        assert other.find("mnist").tolist() == [0, 1, 2]
        assert blob_counts(other_store)[0] == 1


def test_refused_inputs_leave_nothing_behind(datasets: Datasets, store: Store) -> None:
    before = blob_counts(store)
    with pytest.raises(ArrayCodecError, match="pickle"):
        datasets.save((np.zeros(3), np.array([{"a": 1}, None], dtype=object)), "objects")
    with pytest.raises(InvalidDocument):  # BSON has no NumPy scalars: refused by the insert, after the upload
        datasets.save(np.zeros(1), "mnist", accuracy=np.float32(0.8))
    with pytest.raises(QueryError, match="reserved"):
        datasets.save(np.zeros(1), "mnist", time="yesterday")
    with pytest.raises(QueryError, match="'\\$'"):
        datasets.save(np.zeros(1), "mnist", **{"$set": 1})
    with pytest.raises(QueryError, match="versions"):
        datasets.save(np.zeros(1), "mnist", version=1.5)
    with pytest.raises(TypeError, match="tuple, list or dict"):
        datasets.save("not arrays", "mnist")  # type: ignore[arg-type]
    # the object array came second: the first one, already uploaded, was deleted again
    assert blob_counts(store) == before and store[COLLECTION].count_documents({}) == 0

    datasets.save(np.zeros(1), "mnist", description="x")
    for bad in ({"$where": "1"}, {"description": {"$ne": None}}, {"a\0b": 1}, {"project": "another"}):
        with pytest.raises(QueryError):
            datasets.find("mnist", **bad)
        with pytest.raises(QueryError):
            datasets.delete(**bad)
    for bad_name in ({"$ne": None}, None, ""):
        with pytest.raises(QueryError, match="non-empty strings"):
            datasets.find(bad_name)  # type: ignore[arg-type]
    assert datasets.list("mnist") != []


def test_a_delete_that_died_before_removing_blobs_is_finished_by_the_next_one(datasets: Datasets, store: Store) -> None:
    before = blob_counts(store)
    crashed = datasets.save(MNIST_LIKE, "mnist")
    datasets.save(np.arange(4), "kept")
    store[COLLECTION].delete_one({"_id": crashed["_id"]})  # the document went, the process died
    assert blob_counts(store) == (before[0] + 5, before[1] + 5)

    assert datasets.delete("nothing-by-this-name") == 0
    assert blob_counts(store) == (before[0] + 1, before[1] + 1)
    assert datasets.find("kept").tolist() == [0, 1, 2, 3]

    store[COLLECTION].delete_many({})
    assert datasets.sweep_orphans() == 1
    assert blob_counts(store) == before


def test_sweeping_spares_the_blobs_of_a_save_in_progress(datasets: Datasets, store: Store) -> None:
    before = blob_counts(store)
    store.put_array(np.zeros(3), "dataset/mnist/0", kind="dataset", dataset="mnist", pending=True)  # no document yet

    assert datasets.sweep_orphans() == 0
    assert blob_counts(store) == (before[0] + 1, before[1] + 1)
    assert datasets.sweep_orphans(grace=timedelta(0)) == 1  # pending that long: its save crashed
    assert blob_counts(store) == before


def test_a_corrupted_blob_is_an_error_not_silent(datasets: Datasets, raw_db: Database) -> None:
    document = datasets.save(np.arange(8, dtype=np.int64), "mnist")
    blob_id = document["arrays"][0]["blob"]
    chunk = raw_db[f"{BLOB_BUCKET}.chunks"].find_one({"files_id": blob_id})
    flipped = bytes(chunk["data"][:-1]) + bytes([chunk["data"][-1] ^ 1])
    raw_db[f"{BLOB_BUCKET}.chunks"].update_one({"_id": chunk["_id"]}, {"$set": {"data": flipped}})

    with pytest.raises(IntegrityError, match="sha256"):
        datasets.find("mnist")


def test_the_datasets_indexes_exist(store: Store, raw_db: Database) -> None:
    keys = [list(index["key"]) for index in raw_db[COLLECTION].list_indexes()]
    assert ["project", "name", "time", "_id"] in keys and ["project", "name", "version"] in keys
