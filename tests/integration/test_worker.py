"""Trainer workers against the real broker, mongod and processors: exactly-once jobs, crash
recovery with resume, failures, cancellation."""

from __future__ import annotations

import pytest

from tensordb.infra.bus import Publisher
from tensordb.infra.store import Store
from tensordb.jobs.queue import Jobs, JobStatus
from tensordb.testing import image_samples, wait_for
from tests import TASK_SCRIPTS


@pytest.fixture
def jobs(settings):
    with Store(settings) as store, Publisher(settings) as publisher:
        yield Jobs(store, publisher)


def test_two_workers_run_ten_jobs_each_exactly_once(settings, jobs, start_worker, tmp_path) -> None:
    start_worker(), start_worker()
    marker = tmp_path / "runs.txt"
    ids = [
        jobs.submit("task", name="count", script=str(TASK_SCRIPTS / "record_run.py"),
                    hyperparameters={"marker_file": str(marker), "value": i}, save_keys=["doubled"])
        for i in range(10)
    ]  # fmt: skip
    done = jobs.wait(ids, timeout=120)
    assert [job["status"] for job in done] == [JobStatus.FINISHED] * 10
    assert [job["attempts"] for job in done] == [1] * 10
    assert [job["result"]["doubled"] for job in done] == [2 * i for i in range(10)]
    assert sorted(marker.read_text().split()) == sorted(ids)  # each script ran once, no more
    assert not jobs.unfinished("count")


def test_a_failing_script_is_marked_failed_and_the_next_job_still_runs(settings, jobs, start_worker, tmp_path) -> None:
    start_worker()
    failing = jobs.submit("task", script=str(TASK_SCRIPTS / "fail.py"), max_attempts=1)
    after = jobs.submit("task", script=str(TASK_SCRIPTS / "record_run.py"),
                        hyperparameters={"marker_file": str(tmp_path / "m"), "value": 1}, save_keys=["doubled"])  # fmt: skip
    failed, finished = jobs.wait([failing, after], timeout=60)
    assert failed["status"] == JobStatus.FAILED and "boom from the task script" in failed["error"]["message"]
    assert "about to fail" in failed["error"]["message"] and failed["error"]["traceback"]
    assert finished["status"] == JobStatus.FINISHED


def test_a_failed_job_is_retried_up_to_its_max_attempts(settings, jobs, start_worker) -> None:
    start_worker()
    job = jobs.wait([jobs.submit("task", script=str(TASK_SCRIPTS / "fail.py"), max_attempts=2)], timeout=60)[0]
    assert job["status"] == JobStatus.FAILED and job["attempts"] == 2 and len(job["history"]) == 1


def test_cancellation_stops_a_running_job(settings, jobs, start_worker) -> None:
    start_worker()
    job_id = jobs.submit("task", script=str(TASK_SCRIPTS / "slow.py"), hyperparameters={"seconds": 300})
    wait_for(lambda: jobs.get(job_id)["status"] == JobStatus.RUNNING, what="the job to start")
    jobs.cancel(job_id)
    job = jobs.wait([job_id], timeout=30)[0]
    assert job["status"] == JobStatus.CANCELLED
    pending = jobs.submit("task", script=str(TASK_SCRIPTS / "slow.py"), hyperparameters={"seconds": 300}, priority=-1)
    blocker = jobs.submit("task", script=str(TASK_SCRIPTS / "slow.py"), hyperparameters={"seconds": 300}, priority=5)
    wait_for(lambda: jobs.get(blocker)["status"] == JobStatus.RUNNING, what="the urgent job to run first")
    assert jobs.cancel(pending)["status"] == JobStatus.CANCELLED  # a pending job is cancelled at once
    jobs.cancel(blocker)
    jobs.wait([blocker], timeout=30)


def test_a_killed_worker_s_job_is_requeued_and_resumes_from_its_last_epoch(
    settings, jobs, ingest, processors, start_worker
) -> None:
    ingest(image_samples(512))
    epochs, batch_size = 12, 32
    steps_per_epoch = 512 // batch_size
    victim = start_worker(lease_seconds=2)
    job_id = jobs.submit(
        "train", name="resumable", epochs=epochs,
        model={"entry_point": "tensordb.testing.models:small_classifier"},
        data={"filter": {"dataset": "train"}}, hyperparameters={"batch_size": batch_size, "units": 8},
    )  # fmt: skip
    wait_for(
        lambda: (jobs.get(job_id).get("checkpoint") or {}).get("epoch", -1) >= 2,
        timeout=120,
        interval=0.02,
        what="two saved epochs",
    )
    victim.kill()  # SIGKILL mid-job: no clean-up, the lease simply stops being renewed
    killed_at = jobs.get(job_id)
    assert killed_at["status"] == JobStatus.RUNNING and killed_at["checkpoint"]["epoch"] < epochs - 1

    start_worker(lease_seconds=2)  # its reaper re-queues the job after the lease, then claims it
    job = jobs.wait([job_id], timeout=180)[0]
    assert job["status"] == JobStatus.FINISHED and job["attempts"] == 2
    assert job["result"]["resumed_from_epoch"] >= killed_at["checkpoint"]["epoch"] + 1
    assert "lease expired" in job["history"][0]["message"]

    # every train step is persisted exactly once, including those logged before the kill
    with Store(settings) as store:
        expected = epochs * steps_per_epoch
        wait_for(
            lambda: store["logs"].count_documents({"run_id": job_id, "phase": "train"}) >= expected, timeout=60, what="all steps"
        )
        steps = [doc["step"] for doc in store["logs"].find({"run_id": job_id, "phase": "train"}, {"step": 1})]
    assert sorted(steps) == list(range(1, expected + 1))
