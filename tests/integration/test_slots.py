"""Resources against the real broker and mongod: workers run jobs concurrently up to their slots,
claims respect the slots and GPUs jobs ask for, and workers advertise themselves."""

from __future__ import annotations

import pytest

from tensordb import TensorDB
from tensordb.infra.bus import Publisher
from tensordb.jobs.queue import Jobs, JobStatus
from tensordb.jobs.workers import Workers
from tensordb.testing import wait_for

#: A train job without Keras: three epochs of about a second each (trusted by the session's settings).
SLOW_TRAINING = {
    "model": {"epoch_function": "tensordb.testing.synthetic:learning_curve"},
    "hyperparameters": {"seconds": 1.0},
    "epochs": 3,
}


@pytest.fixture
def jobs(store):
    with Publisher(store.settings) as publisher:
        yield Jobs(store, publisher)


def test_a_worker_with_two_slots_runs_two_jobs_at_once(jobs, start_worker) -> None:
    start_worker(slots=2)
    ids = [jobs.submit("train", name="overlap", **SLOW_TRAINING) for _ in range(2)]
    done = jobs.wait(ids, timeout=120)
    assert [job["status"] for job in done] == [JobStatus.FINISHED] * 2
    assert len({job["worker"] for job in done}) == 1
    # each ran about 3 s; they overlapped when each started before the other finished
    assert max(job["started_at"] for job in done) < min(job["finished_at"] for job in done)


def test_a_freed_slot_is_filled_without_a_new_request(jobs, start_worker) -> None:
    """A job that was pending while the worker was full starts when a slot frees, although its
    request was read (and committed) long before."""
    start_worker(slots=1)
    running = jobs.submit("train", name="first", **SLOW_TRAINING)
    wait_for(lambda: jobs.get(running)["status"] == JobStatus.RUNNING, what="the first job to start")
    waiting = jobs.submit("train", name="second", **{**SLOW_TRAINING, "epochs": 1})
    first, second = jobs.wait([running, waiting], timeout=120)
    assert first["status"] == second["status"] == JobStatus.FINISHED
    gap = (second["started_at"] - first["finished_at"]).total_seconds()
    assert 0 <= gap  # one slot: one job after the other
    assert gap < 2.0  # polled every 0.25 s while busy (an idle worker waits up to 2 s for a request)


def test_a_job_asking_for_more_slots_or_gpus_than_are_free_is_not_claimed(jobs) -> None:
    wide = jobs.submit("train", name="wide", priority=5, slots=2, **SLOW_TRAINING)
    narrow = jobs.submit("train", name="narrow", **SLOW_TRAINING)
    on_gpu = jobs.submit("train", name="gpu", priority=-5, gpus=1, **SLOW_TRAINING)
    assert jobs.get(wide)["resources"] == {"slots": 2, "gpus": 0}

    # the urgent two-slot job does not fit one free slot: the next one that fits is taken instead
    assert jobs.claim("one-slot", 30.0, free_slots=1, free_gpus=0)["_id"] == narrow
    assert jobs.claim("one-slot", 30.0, free_slots=1, free_gpus=0) is None
    claimed = jobs.claim("two-slots", 30.0, free_slots=2, free_gpus=0)
    assert claimed["_id"] == wide and claimed["resources"] == {"slots": 2, "gpus": 0}
    assert jobs.claim("no-gpu", 30.0, free_slots=4, free_gpus=0) is None
    assert jobs.claim("one-gpu", 30.0, free_slots=1, free_gpus=1)["_id"] == on_gpu


def test_jobs_stored_before_resources_count_as_one_slot_and_no_gpu(jobs, store) -> None:
    old = jobs.submit("train", name="old", **SLOW_TRAINING)
    store["jobs"].update_one({"_id": old}, {"$unset": {"resources": ""}})
    assert "resources" not in jobs.get(old)
    assert jobs.claim("full", 30.0, free_slots=0, free_gpus=0) is None
    assert jobs.claim("one-slot", 30.0, free_slots=1, free_gpus=0)["_id"] == old


def test_claims_without_bounds_take_any_job(jobs) -> None:
    wide = jobs.submit("train", name="wide", slots=8, gpus=2, **SLOW_TRAINING)
    assert jobs.claim("anything", 30.0)["_id"] == wide


def test_a_running_worker_is_listed_with_its_slots_and_jobs_and_is_gone_after_a_clean_stop(jobs, store, start_worker) -> None:
    worker = start_worker(slots=2, gpus=0)
    workers = Workers(store)
    (listed,) = workers.list()
    assert (listed["slots"], listed["gpus"], listed["busy_slots"], listed["running"]) == (2, 0, 0, [])
    assert listed["pid"] == worker.process.pid

    job_id = jobs.submit("train", name="listed", **{**SLOW_TRAINING, "epochs": 30})
    wait_for(lambda: workers.list()[0]["running"] == [job_id], timeout=30, what="the worker to list its job")
    assert workers.list()[0]["busy_slots"] == 1
    with TensorDB(store.settings) as db:
        assert [found["_id"] for found in db.workers()] == [listed["_id"]]

    worker.stop()  # SIGTERM: the job is handed back and the worker's document removed
    assert workers.list() == [] and store["workers"].count_documents({}) == 0
    assert jobs.get(job_id)["status"] == JobStatus.PENDING
