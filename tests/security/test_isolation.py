"""Nothing shared: two projects on one broker and one database, tried as an attacker would.

Project A is the test's project; project B (the "neighbour") shares A's broker and database, as
projects of one TensorDB deployment do. Each test is one attack from issue 10's findings, run
against the real broker and mongod, and asserts that it fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import gridfs
import numpy as np
import orjson
import pytest
from bson import ObjectId
from pymongo.database import Database

from streams.ingest import blob_id, handle_samples, sweep_sample_blobs
from streams.lifecycle import handle_job_events
from streams.processing import ProcessorContext, process_batch
from tensordb import records
from tensordb.client import TensorDB
from tensordb.compat.tensorhub import TensorHub
from tensordb.config import Settings, Topic
from tensordb.data.samples import INLINE_MAX_BYTES, SAMPLES, build_sample
from tensordb.errors import IntegrityError, ProjectScopeError
from tensordb.infra.bus import Publisher, Received, create_topics
from tensordb.infra.codecs import sha256_hex, xxh3_hex
from tensordb.infra.dead_letters import COLLECTION as DEAD_LETTERS
from tensordb.infra.store import BLOB_BUCKET, Blob, Store
from tensordb.jobs.queue import JOBS, JobStatus
from tensordb.loop.policies import Policies, Policy
from tensordb.testing import ChildProcess, processors_process, wait_for


@pytest.fixture
def neighbour(settings: Settings) -> Settings:
    """Project B: the same broker and database as the test's project A, its own topics."""
    other = settings.with_changes(project=f"{settings.project}-b")
    create_topics(other)
    return other


class Ingest:
    """One project's ingest processor code, fed records directly (no Kafka hop), for attacks
    on what is stored rather than on the transport."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.context = ProcessorContext(settings, processor="ingest")
        self._offsets = iter(range(10**9))

    def __call__(self, *batch: dict[str, Any]) -> None:
        received = [
            Received(self.settings.topic(Topic.INGEST), 0, next(self._offsets), None, None, records.validate(r, "sample/1"), None)
            for r in batch
        ]
        process_batch(self.context, received, handle_samples)

    @property
    def store(self) -> Store:
        return self.context.store

    def reasons(self) -> list[str]:
        return [letter["reason"] for letter in self.store[DEAD_LETTERS].find({}, sort=[("at", 1), ("offset", 1)])]


@pytest.fixture
def ingest_a(settings: Settings) -> Iterator[Ingest]:
    ingest = Ingest(settings)
    yield ingest
    ingest.context.close()


@pytest.fixture
def ingest_b(neighbour: Settings) -> Iterator[Ingest]:
    ingest = Ingest(neighbour)
    yield ingest
    ingest.context.close()


#: A train job of a registered model (nothing imported): the attacks below are about job ids and filters.
TRAIN: dict[str, Any] = {"model": {"name": "m"}, "data": {"filter": {"dataset": "d"}}}


def inline(sample_id: str | None, values: list[int], dataset: str = "scans") -> dict[str, Any]:
    record: dict[str, Any] = {
        "schema": "sample/1",
        "dataset": dataset,
        "arrays": {"x": {"dtype": "int16", "shape": [len(values)], "values": values}},
    }
    if sample_id is not None:
        record["sample_id"] = sample_id
    return record


def streamed(store: Store, filter: dict[str, Any] | None = None) -> list[list[int]]:
    from tensordb.data.cohorts import Cohort

    return [row.tolist() for x, _ in Cohort(store, filter=filter or {}, x="x", y=None).stream(batch_size=64) for row in x]


# -- 1. identities are per project ---------------------------------------------------------------


def test_the_same_records_on_two_projects_topics_are_stored_in_both_with_their_own_bytes(
    settings: Settings, neighbour: Settings, processors: ChildProcess, tmp_path: Path
) -> None:
    """The README's record without an id, published to two projects, is stored twice; and a
    record on A's topic carrying B's sample id leaves B's sample (published later) intact."""
    neighbour_processors = processors_process(neighbour, tmp_path / "neighbour.log")
    neighbour_processors.start()
    try:
        with Publisher(settings) as to_a, Publisher(neighbour) as to_b:
            to_a.publish(Topic.INGEST, inline(None, [-1, 300], dataset="cli"))
            to_b.publish(Topic.INGEST, inline(None, [-1, 300], dataset="cli"))
            to_a.publish(Topic.INGEST, inline("scan-1", [1, 2]))  # B's (predictable) id, A's bytes
            to_a.flush()
            to_b.flush()
            to_b.publish(Topic.INGEST, inline("scan-1", [9, 9]))
            to_b.flush()
        with Store(settings) as a, Store(neighbour) as b:
            wait_for(
                lambda: a[SAMPLES].count_documents({}) == 2 and b[SAMPLES].count_documents({}) == 2, what="both projects' samples"
            )
            assert streamed(a, {"dataset": "cli"}) == streamed(b, {"dataset": "cli"}) == [[-1, 300]]
            assert streamed(a, {"_id": "scan-1"}) == [[1, 2]]
            assert streamed(b, {"_id": "scan-1"}) == [[9, 9]]
            assert a[DEAD_LETTERS].count_documents({}) == b[DEAD_LETTERS].count_documents({}) == 0
    finally:
        neighbour_processors.stop()


def test_a_sample_id_reused_with_other_content_is_dead_lettered_and_the_stored_sample_kept(ingest_a: Ingest) -> None:
    ingest_a(inline("scan-7", [1, 2]))
    ingest_a(inline("scan-7", [1, 2]))  # a redelivery: the same content, nothing to report
    assert ingest_a.reasons() == []
    ingest_a(inline("scan-7", [5, 5]), inline("scan-8", [3, 3]))
    [reason] = ingest_a.reasons()
    assert "sample id 'scan-7' is already stored" in reason and "different content" in reason
    assert streamed(ingest_a.store, {"_id": "scan-7"}) == [[1, 2]]
    assert "data" in ingest_a.store[SAMPLES].find_one({"_id": "scan-7"})["arrays"]["x"]  # kept inline: one document
    assert streamed(ingest_a.store, {"_id": "scan-8"}) == [[3, 3]]  # the rest of the batch is stored


# -- 2. claim checks are bound to their project and upload ---------------------------------------


def _claim_check(settings: Settings, store: Store, array: np.ndarray, sample_id: str) -> dict[str, Any]:
    """A sample record whose array was uploaded to GridFS first (as the SDK does for large arrays)."""
    record = build_sample(store, array, dataset="big", sample_id=sample_id)
    assert "blob_id" in record["arrays"]["x"], "the array should be large enough to travel as a claim check"
    return record


def test_a_claim_check_copied_from_another_project_or_sample_or_with_another_shape_is_dead_lettered(
    settings: Settings, neighbour: Settings, ingest_a: Ingest, ingest_b: Ingest
) -> None:
    pixels = np.arange(300_000, dtype=np.uint8).reshape(600, 500)
    theirs = _claim_check(neighbour, ingest_b.store, pixels, "b-scan")
    ingest_a(theirs)  # copied from B's ingest topic into A's
    ours = _claim_check(settings, ingest_a.store, pixels, "a-scan")
    other_sample = {**ours, "sample_id": "a-scan-copy"}
    reshaped = {**ours, "sample_id": "a-scan", "arrays": {"x": {**ours["arrays"]["x"], "shape": [500, 600]}}}
    retyped = {**ours, "sample_id": "a-scan", "arrays": {"x": {**ours["arrays"]["x"], "dtype": "int8"}}}
    ingest_a(other_sample, reshaped, retyped)
    reasons = ingest_a.reasons()
    assert len(reasons) == 4 and ingest_a.store[SAMPLES].count_documents({}) == 0
    assert f"does not exist in project {settings.project!r}" in reasons[0]
    assert "different sample_id" in reasons[1]
    assert "different shape" in reasons[2] and "different dtype" in reasons[3]
    ingest_a(ours)  # the genuine reference is stored, with its bytes
    [document] = ingest_a.store[SAMPLES].find({})
    assert document["_id"] == "a-scan"
    assert ingest_a.store.get_bytes(document["arrays"]["x"]["blob_id"]) == pixels.tobytes()
    assert document["arrays"]["x"]["xxh3"] == xxh3_hex(pixels.tobytes())  # recorded at upload, checked by reads


def test_a_blob_of_another_project_cannot_be_read_by_id(settings: Settings, neighbour: Settings) -> None:
    with Store(settings) as a, Store(neighbour) as b:
        blob_id, _ = b.put_bytes(b"their weights", "weights.npz", kind="model-parameters")
        with pytest.raises(gridfs.errors.NoFile):
            a.get_bytes(blob_id)
        assert b.get_bytes(blob_id) == b"their weights"


def test_orphaned_sample_blobs_are_swept_after_the_grace_period_and_only_this_projects(
    settings: Settings, neighbour: Settings, ingest_a: Ingest, ingest_b: Ingest, raw_db: Database
) -> None:
    pixels = np.ones((600, 500), dtype=np.uint8)
    kept = build_sample(ingest_a.store, {"x": pixels, "tiny": np.ones(2)}, dataset="big", sample_id="kept")
    assert "blob_id" in kept["arrays"]["x"] and "data" in kept["arrays"]["tiny"]  # a claim check, and an array kept inline
    ingest_a(kept, inline("small", [1]))
    _claim_check(settings, ingest_a.store, pixels, "never-published")
    _claim_check(neighbour, ingest_b.store, pixels, "theirs-never-published")
    files = raw_db[f"{BLOB_BUCKET}.files"]
    assert files.count_documents({}) == 3  # kept, never-published, theirs; small and tiny are inline
    assert sweep_sample_blobs(ingest_a.store) == 0  # all younger than the grace period
    assert sweep_sample_blobs(ingest_a.store, grace=timedelta(0)) == 1
    assert {file["metadata"]["sample_id"] for file in files.find({})} == {"kept", "theirs-never-published"}
    assert sorted(len(row) for row in streamed(ingest_a.store, {"dataset": "scans"})) == [1]


def test_blob_ids_of_another_project_cannot_be_read_deleted_or_overwritten(
    settings: Settings, neighbour: Settings, ingest_a: Ingest, ingest_b: Ingest
) -> None:
    """Ingest's blob ids are predictable from project, sample id and array name: knowing them gives
    another project nothing (issue 24, finding 2)."""
    large = INLINE_MAX_BYTES // 2 + 1  # int16 values: a blob, not inline
    ingest_b(inline("b-scan", [9] * large))
    theirs = blob_id(neighbour.project, "b-scan", "x")
    a = ingest_a.store
    with pytest.raises(ProjectScopeError, match=f"cannot read blob {theirs}: it does not belong to project"):
        a.read_blobs([theirs])
    with pytest.raises(ProjectScopeError, match="cannot delete blob"):
        a.delete_blobs([theirs])
    with pytest.raises(ProjectScopeError, match="cannot write blob"):
        a.write_blobs([Blob(theirs, "planted", b"\0" * 8, {"kind": "sample-array"})])
    assert streamed(ingest_b.store) == [[9] * large]  # B's bytes, whole and unchanged


def test_a_blob_id_freed_by_its_project_and_taken_by_another_is_refused_to_the_first(
    neighbour: Settings, ingest_a: Ingest, ingest_b: Ingest
) -> None:
    """A store remembers the blobs it found to be its own (each is checked once): deleting one
    forgets it, so an id another project takes afterwards is refused, not read."""
    a, b = ingest_a.store, ingest_b.store
    (own,) = a.write_blobs([Blob(ObjectId(), "mine", b"ours", {"kind": "sample-array"})])
    assert a.read_blobs([own]) == {own: b"ours"} == a.read_blobs([own])  # checked, then remembered
    a.delete_blobs([own])
    assert b.write_blobs([Blob(own, "theirs", b"theirs", {"kind": "sample-array"})]) == {own}
    with pytest.raises(ProjectScopeError, match=f"cannot read blob {own}"):
        a.read_blobs([own])


def test_a_blob_id_another_project_took_first_dead_letters_only_that_sample(
    neighbour: Settings, ingest_a: Ingest, ingest_b: Ingest
) -> None:
    """An id planted before its owner writes it is refused to the owner: that sample is dead-lettered
    with the reason, the rest of its batch stored (the servers' access control, per-project databases,
    prevents the planting itself)."""
    large = INLINE_MAX_BYTES // 2 + 1
    planted = blob_id(neighbour.project, "b-next", "x")
    assert ingest_a.store.write_blobs([Blob(planted, "planted", b"\0" * 8, {"kind": "sample-array"})]) == {planted}
    ingest_b(inline("b-next", [7] * large), inline("b-other", [8] * large))
    assert streamed(ingest_b.store) == [[8] * large]
    assert ingest_b.reasons() == [
        f"cannot write blob {planted}: it does not belong to project {neighbour.project!r}; a store only "
        "reads and writes its own project's blobs (ids come from this project's documents)"
    ]


@pytest.mark.parametrize("key", ["project", "sha256", "xxh3"])
def test_blob_metadata_cannot_choose_the_project_or_the_digests(settings: Settings, neighbour: Settings, key: str) -> None:
    with Store(settings) as a, Store(neighbour) as b:
        forged = {"project": neighbour.project, "sha256": "0" * 64, "xxh3": "0" * 32}[key]
        with pytest.raises(ProjectScopeError, match=f"blob metadata cannot set '{key}'"):
            a.put_bytes(b"bytes", "f", **{key: forged})
        with pytest.raises(ProjectScopeError, match=f"blob metadata cannot set '{key}'"):
            Blob(ObjectId(), "f", b"bytes", {key: forged})
        assert b[f"{BLOB_BUCKET}.files"].count_documents({}) == a[f"{BLOB_BUCKET}.files"].count_documents({}) == 0


def test_a_claim_checks_recorded_digests_are_those_of_its_bytes(settings: Settings, ingest_a: Ingest) -> None:
    """The digests a claim check is checked against are the store's, of the bytes uploaded: an
    upload cannot claim another array's sha256 (issue 24, finding 15)."""
    pixels = np.arange(300_000, dtype=np.uint8).reshape(600, 500)
    record = _claim_check(settings, ingest_a.store, pixels, "a-scan")
    file = ingest_a.store[f"{BLOB_BUCKET}.files"].find_one({"_id": ObjectId(record["arrays"]["x"]["blob_id"])})
    assert file["metadata"]["sha256"] == sha256_hex(pixels.tobytes()) == record["arrays"]["x"]["sha256"]
    assert file["metadata"]["xxh3"] == xxh3_hex(pixels.tobytes())
    ingest_a(record)
    assert ingest_a.store[SAMPLES].find_one({"_id": "a-scan"})["arrays"]["x"]["xxh3"] == xxh3_hex(pixels.tobytes())


# -- 3. callers cannot widen their filters; events act on their own project's jobs ---------------


def test_filters_naming_another_project_are_refused_and_cannot_delete_running_jobs(
    settings: Settings, neighbour: Settings
) -> None:
    with TensorDB(neighbour) as b:
        pending = b.submit_job("train", name="theirs", **TRAIN)
        running = b.submit_job("train", name="theirs", **TRAIN)
        assert b.jobs.claim("worker-b", 60.0)["_id"] in (pending, running)
    with TensorDB(settings) as a, TensorHub(settings=settings) as hub:
        with pytest.raises(ProjectScopeError, match="names the project"):
            a.list_jobs(project=neighbour.project)
        with pytest.raises(ProjectScopeError):
            hub.delete_tasks(project=neighbour.project, status="pending")
        with pytest.raises(ProjectScopeError):
            a.store[JOBS].find_one({"project": {"$ne": settings.project}})
        assert a.list_jobs() == []
    with TensorDB(neighbour) as b, TensorHub(settings=neighbour) as hub:
        assert hub.delete_tasks(status="pending") == 0  # a status filter narrows; it never deletes unfinished jobs
        assert hub.delete_tasks(status=JobStatus.RUNNING) == 0
        assert sorted(job["status"] for job in b.list_jobs()) == ["pending", "running"]


@pytest.mark.parametrize(
    "stage",
    [
        {"$lookup": {"from": SAMPLES, "pipeline": [], "as": "all"}},
        {"$lookup": {"from": f"{BLOB_BUCKET}.chunks", "localField": "x", "foreignField": "y", "as": "all"}},
        {"$unionWith": {"coll": SAMPLES}},
        {"$graphLookup": {"from": SAMPLES, "startWith": "$x", "connectFromField": "x", "connectToField": "x", "as": "all"}},
        {"$facet": {"inner": [{"$unionWith": SAMPLES}]}},
    ],
    ids=["lookup-pipeline", "lookup-chunks", "unionWith", "graphLookup", "nested-facet"],
)
def test_a_facet_sub_pipeline_cannot_read_other_collections(ingest_a: Ingest, ingest_b: Ingest, stage: dict[str, Any]) -> None:
    """Issue 24, finding 1: stages that read other collections were refused only at the top level."""
    ingest_a(inline("a-1", [1]))
    ingest_b(inline("b-1", [2]))
    with pytest.raises(ProjectScopeError, match="is not allowed, since it could read or write outside"):
        list(ingest_a.store[SAMPLES].aggregate([{"$facet": {"leak": [stage]}}]))
    with pytest.raises(ProjectScopeError, match="is not allowed"):
        list(ingest_a.store[SAMPLES].aggregate([{"$match": {}}, stage]))


def test_a_facet_of_allowed_stages_sees_only_this_projects_documents(ingest_a: Ingest, ingest_b: Ingest) -> None:
    ingest_a(inline("a-1", [1]), inline("a-2", [2]))
    ingest_b(inline("b-1", [3]))
    pipeline = [
        {"$facet": {"ids": [{"$match": {"_id": {"$in": ["a-1", "b-1"]}}}, {"$project": {"_id": 1}}], "n": [{"$count": "n"}]}}
    ]
    (result,) = ingest_a.store[SAMPLES].aggregate(pipeline)
    assert result["ids"] == [{"_id": f"{ingest_a.settings.project}:a-1"}] and result["n"] == [{"n": 2}]
    with pytest.raises(ProjectScopeError, match="names the project"):
        list(ingest_a.store[SAMPLES].aggregate([{"$facet": {"x": [{"$match": {"project": ingest_b.settings.project}}]}}]))


def test_a_job_id_chosen_in_one_project_does_not_touch_the_neighbours_job_of_that_id(
    settings: Settings, neighbour: Settings
) -> None:
    with TensorDB(neighbour) as b, TensorDB(settings) as a:
        train = b.submit_job("train", name="train", **TRAIN)
        a.submit_job("train", name="squatter", job_id=f"eval-{train}", **TRAIN)
        a.cancel_job(f"eval-{train}")
        theirs = b.jobs.submit("train", name="evaluation", job_id=f"eval-{train}", **TRAIN)
        assert theirs == f"eval-{train}"
        assert b.jobs.get(theirs)["status"] == "pending" and b.jobs.get(theirs)["name"] == "evaluation"
        assert a.jobs.get(theirs)["status"] == "cancelled"


def test_a_forged_finished_event_does_not_evaluate_a_running_jobs_checkpoint(settings: Settings) -> None:
    import keras

    with TensorDB(settings) as db:
        db.store.ensure_indexes()
        Policies(db.store).register(
            Policy(
                name="p",
                model={"name": "p"},
                training={"filter": {"dataset": "t"}},
                validation={"filter": {"dataset": "v"}},
                trigger={"manual": True},
            )
        )
        job_id = db.jobs.submit("train", name="p", model={"name": "p"}, data={"filter": {"dataset": "t"}}, policy="p")
        db.jobs.claim("worker-1", 60.0)
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        db.models.save(model, "p", epoch=1, job_id=job_id)  # a checkpoint of the running job
    forged = {"schema": "job-event/1", "job_id": job_id, "event": "finished", "attempt": 1, "at": "2026-01-01T00:00:00+00:00"}
    context = ProcessorContext(settings, processor="lifecycle")
    try:
        received = Received(
            settings.topic(Topic.JOB_EVENTS), 0, 0, None, orjson.dumps(forged), records.validate(forged, "job-event/1"), None
        )
        process_batch(context, [received], handle_job_events)
        assert context.store[JOBS].find_one({"_id": f"eval-{job_id}"}) is None
        assert context.store[JOBS].find_one({"_id": job_id})["status"] == JobStatus.RUNNING
    finally:
        context.close()


# -- 5. reads are verified -----------------------------------------------------------------------


@pytest.mark.parametrize("length", [3, INLINE_MAX_BYTES // 2 + 1], ids=["inline", "gridfs"])  # int16 values
def test_corrupted_or_replaced_bytes_are_an_integrity_error_naming_the_sample(
    ingest_a: Ingest, raw_db: Database, length: int
) -> None:
    ingest_a(inline("good", [1, 2, 3]), inline("victim", [4] * length))
    store = ingest_a.store
    entry = store[SAMPLES].find_one({"_id": "victim"})["arrays"]["x"]
    stale = np.full(length, 7, np.int16).tobytes()  # other bytes of the same length under the same id
    if length == 3:
        assert "data" in entry
        store[SAMPLES].update_one({"_id": "victim"}, {"$set": {"arrays.x.data": stale}})
    else:
        raw_db[f"{BLOB_BUCKET}.chunks"].update_one({"files_id": entry["blob_id"]}, {"$set": {"data": stale}})
    with pytest.raises(IntegrityError, match="sample 'victim'.*checksum mismatch"):
        streamed(store)
    if length == 3:
        store[SAMPLES].update_one({"_id": "victim"}, {"$unset": {"arrays.x.data": ""}})
    else:
        raw_db[f"{BLOB_BUCKET}.chunks"].delete_many({"files_id": entry["blob_id"]})
    with pytest.raises(IntegrityError, match="sample 'victim'.*missing"):
        streamed(store)
    assert streamed(store, {"_id": "good"}) == [[1, 2, 3]]


@pytest.mark.parametrize("length", [3, INLINE_MAX_BYTES // 2 + 1], ids=["inline", "gridfs"])
def test_samples_stored_before_the_xxh3_was_recorded_are_checked_against_their_sha256(
    ingest_a: Ingest, raw_db: Database, length: int
) -> None:
    ingest_a(inline("newer", [4] * length), inline("older", [5] * length))
    store = ingest_a.store
    store[SAMPLES].update_one({"_id": "older"}, {"$unset": {"arrays.x.xxh3": ""}})  # as earlier versions stored it
    assert sorted(streamed(store)) == [[4] * length, [5] * length]
    entry = store[SAMPLES].find_one({"_id": "older"})["arrays"]["x"]
    stale = np.full(length, 7, np.int16).tobytes()
    if length == 3:
        store[SAMPLES].update_one({"_id": "older"}, {"$set": {"arrays.x.data": stale}})
    else:
        raw_db[f"{BLOB_BUCKET}.chunks"].update_one({"files_id": entry["blob_id"]}, {"$set": {"data": stale}})
    with pytest.raises(IntegrityError, match="sample 'older'.*checksum mismatch"):
        streamed(store)


def test_stored_ids_carry_the_project_so_raw_tools_see_which_project_owns_a_document(
    ingest_a: Ingest, settings: Settings, raw_db: Database
) -> None:
    ingest_a(inline("scan-1", [1]))
    raw = raw_db[SAMPLES].find_one({})
    assert raw["_id"] == f"{settings.project}:scan-1" and raw["project"] == settings.project
    assert ingest_a.store[SAMPLES].find_one({})["_id"] == "scan-1"
