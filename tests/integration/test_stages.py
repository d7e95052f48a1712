"""Transform stages against the real broker, mongod and processors: derived samples, lineage,
redelivery, failures, chaining, pause and resume, backfills that survive a SIGKILL."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tensordb.client import TensorDB
from tensordb.config import Topic
from tensordb.errors import StageError, StageSpecError, UntrustedCodeError
from tensordb.infra.dead_letters import COLLECTION as DEAD_LETTERS
from tensordb.records import Schema
from tensordb.testing import processors_process
from tensordb.testing.samples import image_samples

HALVE = "tensordb.testing.stages:halve"


def wait_for(condition, timeout: float = 60.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(interval)
    raise AssertionError(f"not true within {timeout} s")


def publish(db: TensorDB, records: list[dict]) -> None:
    for record in records:
        db.publisher.publish(Topic.INGEST, record, key=record["sample_id"])
    db.flush()


def labelled(count: int, dataset: str) -> list[dict]:
    """Images labelled 0..9 in turn (image_samples labels 0/1), ids unique per dataset."""
    records = image_samples(count, dataset=dataset)
    for index, record in enumerate(records):
        record["sample_id"] = f"{dataset}-{index:05d}"
        record["labels"] = {"y": index % 10}
    return records


def count(db: TensorDB, **query) -> int:
    return db.store["samples"].count_documents(query)


def test_a_stage_derives_one_sample_per_new_source_with_lineage_and_redelivery_changes_nothing(settings, processors) -> None:
    with TensorDB(settings) as db:
        db.register_stage(name="halve", input={"filter": {"dataset": "raw"}}, function=HALVE, output={"dataset": "halved"})
        publish(db, labelled(50, "raw"))
        wait_for(lambda: count(db, dataset="halved") == 50)
        derived = db.store["samples"].find_one({"_id": "halve.v1:raw-00007:0"})
        assert derived["lineage"] == {"derived_from": "raw-00007", "stage": "halve", "stage_version": 1}
        assert derived["arrays"]["x"]["shape"] == [4, 4] and derived["labels"] == {"y": 7}
        source = db.cohort({"_id": "raw-00007"}, x="x").stream(batch_size=1)
        halved = db.cohort({"_id": "halve.v1:raw-00007:0"}, x="x").stream(batch_size=1)
        assert np.array_equal(next(iter(halved))[0][0], next(iter(source))[0][0][::2, ::2])
        # the same sources announced again (a redelivered data-imported event) derive nothing new
        ids = [f"raw-{index:05d}" for index in range(50)]
        db.publisher.publish(Topic.DATA_IMPORTED, {"schema": Schema.DATA_IMPORTED, "batch_id": "replayed", "sample_ids": ids,
                                                   "imported_at": "2026-01-01T00:00:00+00:00"})  # fmt: skip
        publish(db, labelled(50, "raw"))  # and the same samples published again
        publish(db, labelled(1, "other"))
        wait_for(lambda: db.stages.get("halve")["counters"]["processed"] >= 100)
        assert count(db, dataset="halved") == 50
        assert db.stages.get("halve")["counters"]["derived"] >= 50


def test_a_failing_function_dead_letters_that_source_only(settings, processors) -> None:
    with TensorDB(settings) as db:
        db.register_stage(name="picky", input={"filter": {"dataset": "mixed"}}, function="tensordb.testing.stages:picky",
                          output={"dataset": "picked"})  # fmt: skip
        publish(db, labelled(20, "mixed"))
        wait_for(lambda: db.stages.get("picky")["counters"]["processed"] == 20)
        assert count(db, dataset="picked") == 14  # labels 3, 4 and 5 derive nothing (twice each)
        letters = list(db.store[DEAD_LETTERS].find({"topic": "stage:picky"}))
        reasons = {letter["reason"] for letter in letters}
        assert len(letters) == 4
        assert any("raised ValueError: label 3 is not wanted here" in reason for reason in reasons)
        assert any("returned str" in reason for reason in reasons)
        assert db.stages.get("picky")["counters"]["errors"] == 4


def test_stages_chain_and_policies_count_derived_samples(settings, processors) -> None:
    from tensordb.loop.policies import Policies, Policy

    with TensorDB(settings) as db:
        db.register_stage(name="mirror", input={"filter": {"dataset": "raw"}}, function="tensordb.testing.stages:mirror_pair",
                          output={"dataset": "augmented"})  # fmt: skip
        db.register_stage(name="halve", input={"filter": {"dataset": "augmented"}}, function=HALVE, output={"dataset": "small"})
        Policies(db.store).register(Policy(name="small-model", model={"entry_point": "tensordb.testing.models:small_classifier"},
                                           training={"filter": {"dataset": "small"}}, validation={"filter": {"dataset": "small"}},
                                           trigger={"every_samples": 20}))  # fmt: skip
        with pytest.raises(StageError, match="would feed itself"):
            db.register_stage(name="loop", input={"filter": {"dataset": "small"}}, function=HALVE, output={"dataset": "raw"})
        publish(db, labelled(10, "raw"))
        wait_for(lambda: count(db, dataset="small") == 20)
        small = db.store["samples"].find_one({"_id": "halve.v1:mirror.v1:raw-00003:1:0"})
        assert small["lineage"]["derived_from"] == "mirror.v1:raw-00003:1"
        job = wait_for(lambda: db.list_jobs(policy="small-model"), timeout=30)
        assert job[0]["description"] == "20 new samples (threshold 20)"


def test_pause_stops_deriving_and_resume_derives_what_arrived_meanwhile(settings, processors) -> None:
    with TensorDB(settings) as db:
        db.register_stage(name="halve", input={"filter": {"dataset": "raw"}}, function=HALVE, output={"dataset": "halved"})
        publish(db, labelled(5, "raw"))
        wait_for(lambda: count(db, dataset="halved") == 5)
        db.stages.pause("halve")
        time.sleep(6.0)  # the processors' timer stops the stage's consumer
        records = labelled(10, "raw")[5:]
        publish(db, records)
        time.sleep(3.0)
        assert count(db, dataset="halved") == 5
        db.stages.resume("halve")
        wait_for(lambda: count(db, dataset="halved") == 10)


def test_a_stage_that_pauses_itself_keeps_its_events_waiting_like_a_paused_stage(settings, tmp_path) -> None:
    """Processors that do not trust the stage's function pause it; the events in flight are not
    dead-lettered (as "Stopping: ... a TensorDB bug") but derived once trusting processors resume it."""
    untrusting = settings.with_changes(
        trusted_modules=tuple(m for m in settings.trusted_modules if m != "tensordb.testing.stages")
    )
    with TensorDB(settings) as db:
        with processors_process(untrusting, tmp_path / "untrusting.log"):
            db.register_stage(name="halve", input={"filter": {"dataset": "raw"}}, function=HALVE, output={"dataset": "halved"})
            publish(db, labelled(5, "raw"))
            wait_for(lambda: count(db, dataset="raw") == 5)
            stage = wait_for(lambda: (found := db.stages.get("halve"))["paused"] and found)
            assert "tensordb.testing.stages" in stage["error"]
            time.sleep(8.0)  # the processors' timer stops the paused stage's consumer, with the batch in hand
        assert db.store[DEAD_LETTERS].count_documents({}) == 0, list(db.store[DEAD_LETTERS].find({}, {"reason": 1}))
        with processors_process(settings, tmp_path / "trusting.log"):
            db.stages.resume("halve")
            wait_for(lambda: count(db, dataset="halved") == 5)
        assert db.store[DEAD_LETTERS].count_documents({}) == 0


def test_a_backfill_survives_a_processor_killed_midway_and_derives_each_sample_once(settings, processors, tmp_path) -> None:
    with TensorDB(settings) as db:
        publish(db, labelled(600, "old"))
        wait_for(lambda: count(db, dataset="old") == 600)
        db.register_stage(name="copy", input={"filter": {"dataset": "old"}}, function="tensordb.testing.stages:slow_copy",
                          output={"dataset": "copied"})  # fmt: skip
        time.sleep(6.0)
        assert count(db, dataset="copied") == 0  # stored before the stage: only a backfill derives them
        assert db.backfill_stage("copy")["backfill"]["total"] == 600
        wait_for(lambda: 0 < db.stages.get("copy")["backfill"]["done"] < 600, timeout=60, interval=0.05)
        processors.kill()
        assert db.stages.get("copy")["backfill"]["status"] == "running"
        with processors_process(settings, tmp_path / "processors-2.log"):
            wait_for(lambda: db.stages.get("copy")["backfill"]["status"] == "done", timeout=120)
        assert count(db, dataset="copied") == 600
        assert len(db.store["samples"].distinct("lineage.derived_from", {"dataset": "copied"})) == 600
        assert db.stages.get("copy")["backfill"]["done"] >= 600


def test_stage_registration_checks_the_spec_the_trust_and_the_versions(store) -> None:
    from tensordb.stages.stages import Stages

    stages = Stages(store)
    spec = {"name": "s", "input": {"filter": {"dataset": "a"}}, "function": HALVE, "output": {"dataset": "b"}}
    with pytest.raises(StageSpecError, match="function: Value error|function: a function is named"):
        stages.register({**spec, "function": "not a function"})
    with pytest.raises(StageSpecError, match=r"input.filter.\$where"):
        stages.register({**spec, "input": {"filter": {"$where": "1"}}})
    with pytest.raises(StageSpecError, match="outputs: unknown field"):
        stages.register({**spec, "outputs": {}})
    with pytest.raises(UntrustedCodeError):
        stages.register({**spec, "function": "os:system"})
    stages.register(spec)
    assert stages.register(spec).version == 1  # the same again: nothing changes
    with pytest.raises(StageError, match="register the change as version 2"):
        stages.register({**spec, "output": {"dataset": "c"}})
    assert stages.register({**spec, "version": 2, "output": {"dataset": "c"}}).version == 2
    assert stages.get("s")["counters"]["processed"] == 0
