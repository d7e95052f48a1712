"""Studies against the real broker, mongod, processors (the scheduler) and trainer workers.

Trials run ``tensordb.testing.synthetic:learning_curve`` (an epoch function with a known curve),
so outcomes are known in advance: which configurations ASHA stops, and each fold's objective.
"""

from __future__ import annotations

import statistics
import time

import pytest

from tensordb.client import TensorDB
from tensordb.errors import StudyError, StudySpecError, UntrustedCodeError
from tensordb.testing.synthetic import learning_curve

CURVE = {"epoch_function": "tensordb.testing.synthetic:learning_curve"}
OBJECTIVE = {"metric": "accuracy", "direction": "max"}


def wait_for(condition, timeout: float = 60.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"not true within {timeout} s: {condition}")


def trial_jobs(db: TensorDB, study: str) -> list[dict]:
    return db.list_jobs(**{"labels.study": study})


def test_grid_with_folds_runs_every_trial_once_and_reports_means_and_spreads(settings, processors, start_worker) -> None:
    start_worker()
    start_worker()
    xs = [0.0, 0.1, 0.2, 0.3, 0.6, 0.9]
    with TensorDB(settings) as db:
        study = db.create_study(
            name="grid-folds", model=CURVE, space={"x": {"choice": xs}}, folds=3, objective=OBJECTIVE,
            epochs=2, hyperparameters={"y": 0.7, "seconds": 0.05}, max_concurrent=2,
        )  # fmt: skip
        ended = study.wait(timeout=240)
        assert ended["status"] == "finished"
        jobs = trial_jobs(db, "grid-folds")
        assert len(jobs) == 18 and len({job["_id"] for job in jobs}) == 18
        assert all(job["status"] == "finished" and job["attempts"] == 1 for job in jobs), [(j["_id"], j["status"]) for j in jobs]
        trials = study.trials()
        assert sorted((t["configuration"], t["fold"]) for t in trials) == [(c, f) for c in range(6) for f in range(3)]
        rows = study.configurations()
        for row, x in zip(rows, xs, strict=True):
            expected = [learning_curve(1, x=x, y=0.7, fold=fold)["accuracy"] for fold in range(3)]
            assert row["hyperparameters"] == {"x": x}
            assert row["status"] == "finished"
            assert row["objective"] == pytest.approx(statistics.fmean(expected))
            assert row["spread"] == pytest.approx(statistics.stdev(expected))
        best = study.best()
        assert best is not None and best["hyperparameters"] == {"x": 0.3}


def test_asha_stops_the_losers_at_the_first_rung_and_frees_their_slots(settings, processors, start_worker) -> None:
    start_worker()
    start_worker()
    with TensorDB(settings) as db:
        study = db.create_study(
            name="asha", model=CURVE, objective=OBJECTIVE, space={"x": {"choice": [0.2, 0.4, 1.5, 1.6]}},
            searcher={"name": "asha", "sampler": "grid", "min_epochs": 1, "max_epochs": 4, "reduction_factor": 2},
            hyperparameters={"seconds": 0.5}, max_concurrent=2,
        )  # fmt: skip
        study.wait(timeout=240)
        verdicts = {(d["configuration"], d["rung"]): d for d in study.decisions()}
        assert {key: d["action"] for key, d in verdicts.items()} == {
            (0, 0): "continue", (1, 0): "continue", (2, 0): "stop", (3, 0): "stop", (0, 1): "continue", (1, 1): "continue",
        }  # fmt: skip
        stop = verdicts[(2, 0)]
        assert stop["cutoff"] is not None and stop["value"] < stop["cutoff"] and "rung 0" in stop["reason"]
        rows = {row["configuration"]: row for row in study.configurations()}
        assert rows[2]["status"] == rows[3]["status"] == "stopped"
        assert rows[2]["stopped_at_rung"] == 0
        jobs = {job["_id"]: job for job in trial_jobs(db, "asha")}
        loser = jobs[stop["trials"][0]]
        assert loser["status"] == "cancelled" and loser["progress"]["epoch"] < 3
        freed = (loser["finished_at"] - stop["at"]).total_seconds()  # the worker saw the cancel and freed the slot
        assert freed < 3.0, f"the stopped trial's job ended {freed:.2f} s after the verdict"
        assert study.best()["hyperparameters"]["x"] in (0.2, 0.4)


def test_scheduler_killed_mid_study_finishes_it_with_the_same_verdicts_and_no_duplicate_trial(
    settings, processors, start_worker, tmp_path
) -> None:
    from tensordb.testing import processors_process

    start_worker()
    start_worker()
    with TensorDB(settings) as db:
        study = db.create_study(
            name="killed", model=CURVE, objective=OBJECTIVE, space={"x": {"choice": [0.2, 0.4, 1.5, 1.6, 1.7, 1.8]}},
            searcher={"name": "asha", "sampler": "grid", "min_epochs": 1, "max_epochs": 4, "reduction_factor": 2},
            hyperparameters={"seconds": 0.3}, max_concurrent=2,
        )  # fmt: skip
        wait_for(lambda: any(d["action"] == "stop" for d in study.decisions()), timeout=120)
        processors.kill()  # SIGKILL mid-study: no clean-up, uncommitted offsets
        with processors_process(settings, tmp_path / "processors-2.log"):
            study.wait(timeout=240)
        verdicts = {(d["configuration"], d["rung"]): d["action"] for d in study.decisions()}
        assert verdicts == {
            (0, 0): "continue", (1, 0): "continue", (0, 1): "continue", (1, 1): "continue",
            **{(number, 0): "stop" for number in range(2, 6)},
        }  # fmt: skip
        jobs = trial_jobs(db, "killed")
        assert sorted(job["_id"] for job in jobs) == sorted({t["_id"] for t in study.trials()})
        assert len(jobs) == 6 and all(job["attempts"] == 1 for job in jobs)


def test_stopping_a_study_cancels_its_running_trials_and_submits_no_more(settings, processors, start_worker) -> None:
    start_worker()
    start_worker()
    with TensorDB(settings) as db:
        study = db.create_study(
            name="stopped", model=CURVE, objective=OBJECTIVE, space={"x": {"uniform": [0, 1]}},
            searcher={"name": "random"}, max_trials=10, epochs=50, hyperparameters={"seconds": 0.2}, max_concurrent=2,
        )  # fmt: skip
        wait_for(lambda: sum(job["status"] == "running" for job in trial_jobs(db, "stopped")) == 2)
        assert study.stop()["status"] == "stopped"
        ended = wait_for(
            lambda: (jobs := trial_jobs(db, "stopped")) and all(j["status"] == "cancelled" for j in jobs) and jobs, timeout=10
        )
        assert len(ended) == 2
        time.sleep(1.0)  # a trial ending after the stop must not make room for a new one
        assert len(trial_jobs(db, "stopped")) == 2
        assert {trial["status"] for trial in study.trials()} == {"cancelled"}


def test_bad_studies_get_clear_errors(settings) -> None:
    with TensorDB(settings) as db:
        with pytest.raises(StudySpecError, match="searcher.reduction_factor"):
            db.create_study(name="bad", model=CURVE, objective=OBJECTIVE, space={"x": {"uniform": [0, 1]}},
                            searcher={"name": "asha", "max_epochs": 9, "reduction_factor": 1}, max_trials=4)  # fmt: skip
        with pytest.raises(StudySpecError, match="loguniform needs low > 0"):
            db.create_study(name="bad", model=CURVE, objective=OBJECTIVE, space={"lr": {"loguniform": [0, 1]}}, max_trials=4,
                            searcher={"name": "random"})  # fmt: skip
        with pytest.raises(UntrustedCodeError, match="outside the trusted modules"):
            db.create_study(name="bad", model={"epoch_function": "os:system"}, objective=OBJECTIVE, space={"x": {"choice": [1]}})
        assert db.list_studies() == []  # nothing was stored
        db.create_study(name="taken", model=CURVE, objective=OBJECTIVE, space={"x": {"choice": [0.1]}})
        with pytest.raises(StudyError, match="exists"):
            db.create_study(name="taken", model=CURVE, objective=OBJECTIVE, space={"x": {"choice": [0.1]}})


def test_a_policy_that_names_a_study_retrains_its_best_configuration(settings, processors, start_worker) -> None:
    from tensordb.errors import PolicyError
    from tensordb.loop.policies import Policies, Policy

    start_worker()
    with TensorDB(settings) as db:
        study = db.create_study(name="tuned", model=CURVE, objective=OBJECTIVE, space={"x": {"choice": [0.1, 0.3, 0.9]}},
                                hyperparameters={"y": 0.7}, epochs=2)  # fmt: skip
        assert study.wait(timeout=120)["status"] == "finished"
        policies = Policies(db.store)
        everything = {"filter": {}}
        with pytest.raises(PolicyError, match="study 'missing', which does not exist"):
            policies.register(Policy(name="p", study="missing", training=everything, validation=everything))
        policies.register(Policy(name="tuned-policy", study="tuned", training=everything, validation=everything,
                                 trigger={"every_seconds": 1}))  # fmt: skip
        job = wait_for(lambda: db.list_jobs(policy="tuned-policy"), timeout=30)[-1]
        assert job["spec"]["model"] == CURVE and job["spec"]["epochs"] == 2
        assert job["spec"]["hyperparameters"] == {"y": 0.7, "x": 0.3}
        assert job["labels"] == {"from_study": "tuned", "configuration": 1}
        with pytest.raises(PolicyError, match="model_name='tuned-policy'"):
            db.evaluate_study_best("tuned", "tuned-policy")


def test_a_study_whose_trials_the_platform_does_not_trust_fails_with_the_reason(settings, processors, start_worker) -> None:
    """The submitter trusts a module that the processors (scheduler) and workers do not: no trial
    code runs, and the study says why instead of waiting for ever."""
    start_worker()
    submitter = settings.with_changes(trusted_modules=(*settings.trusted_modules, "mylab"))
    with TensorDB(submitter) as db:
        study = db.create_study(name="untrusted", model={"epoch_function": "mylab.curves:f"}, objective=OBJECTIVE,
                                space={"x": {"choice": [1, 2, 3, 4]}}, max_concurrent=1)  # fmt: skip
        ended = study.wait(timeout=60)
        assert ended["status"] == "failed" and "outside the trusted modules" in ended["error"]
        # the submitter's own first fill may race the scheduler's and submit a second trial as the
        # study fails: it is cancelled; every trial the worker got was refused, none ran
        jobs = wait_for(
            lambda: (
                (found := trial_jobs(db, "untrusted")) and all(j["status"] in ("failed", "cancelled") for j in found) and found
            )
        )
        assert 1 <= len(jobs) <= 2
        assert all(job["status"] == "cancelled" or "UntrustedCodeError" in job["error"]["message"] for job in jobs)


def test_asha_with_folds_judges_a_configuration_by_the_mean_of_its_folds(settings, processors, start_worker) -> None:
    start_worker(slots=2)
    with TensorDB(settings) as db:
        study = db.create_study(
            name="asha-folds", model=CURVE, objective=OBJECTIVE, space={"x": {"choice": [0.2, 0.4, 1.5]}}, folds=2,
            searcher={"name": "asha", "sampler": "grid", "min_epochs": 1, "max_epochs": 4, "reduction_factor": 2},
            hyperparameters={"seconds": 0.6}, max_concurrent=2,
        )  # fmt: skip
        study.wait(timeout=120)
        verdicts = {(d["configuration"], d["rung"]): d for d in study.decisions()}
        assert {key: d["action"] for key, d in verdicts.items()} == {
            (0, 0): "continue", (1, 0): "continue", (2, 0): "stop", (0, 1): "continue", (1, 1): "continue",
        }  # fmt: skip
        for number, x in enumerate([0.2, 0.4, 1.5]):
            folds = [learning_curve(0, x=x, fold=fold)["accuracy"] for fold in range(2)]
            assert verdicts[(number, 0)]["fold_values"] == pytest.approx(folds)
            assert verdicts[(number, 0)]["value"] == pytest.approx(statistics.fmean(folds))
            assert len(verdicts[(number, 0)]["trials"]) == 2
        rows = study.configurations()
        assert [row["status"] for row in rows] == ["finished", "finished", "stopped"]


def test_fills_at_the_same_moment_never_hold_more_than_max_concurrent_trials(settings) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with TensorDB(settings) as db:
        db.create_study(
            name="racing", model=CURVE, objective=OBJECTIVE, space={"x": {"uniform": [0, 1]}},
            searcher={"name": "random"}, max_trials=40, max_concurrent=3,
        )  # fmt: skip
        scheduler = db.studies.scheduler
        for round_ in range(4):  # no worker: the jobs stay pending until cancelled here
            for job in trial_jobs(db, "racing")[:2]:
                if job["status"] == "pending":
                    db.cancel_job(job["_id"])
            with ThreadPoolExecutor(6) as pool:
                list(pool.map(lambda _: scheduler.fill("racing"), range(6)))
            jobs = trial_jobs(db, "racing")
            assert sum(job["status"] == "pending" for job in jobs) == 3, (round_, [(j["_id"], j["status"]) for j in jobs])
        numbers = sorted(trial["configuration"] for trial in db.study("racing").trials())
        assert numbers == list(range(len(numbers)))  # each trial number once, none skipped


def test_a_fill_lock_left_by_a_dead_filler_is_taken_over_after_its_lease(settings) -> None:
    from datetime import UTC, datetime, timedelta

    with TensorDB(settings) as db:
        db.create_study(name="orphaned", model=CURVE, objective=OBJECTIVE, space={"x": {"uniform": [0, 1]}},
                        searcher={"name": "random"}, max_trials=5, max_concurrent=1)  # fmt: skip
        db.cancel_job(trial_jobs(db, "orphaned")[0]["_id"])
        until = datetime.now(UTC) + timedelta(seconds=0.5)
        db.studies.collection.update_one({"_id": "orphaned"}, {"$set": {"filling": {"by": "killed", "until": until}}})
        started = time.monotonic()
        assert len(db.studies.scheduler.fill("orphaned")) == 1
        assert time.monotonic() - started >= 0.3  # it waited for the lease to run out
        assert "filling" not in db.studies.get("orphaned")


def test_a_worker_submits_the_next_trial_itself_when_one_ends(settings, start_worker) -> None:
    """No scheduler runs here: the worker that ended a trial fills its study's slot, and claims it."""
    start_worker()
    with TensorDB(settings) as db:
        db.create_study(name="self-filled", model=CURVE, objective=OBJECTIVE, space={"x": {"uniform": [0, 1]}},
                        searcher={"name": "random"}, max_trials=3, max_concurrent=1, hyperparameters={"seconds": 0.05})  # fmt: skip
        jobs = wait_for(lambda: (jobs := trial_jobs(db, "self-filled")) and all(j["status"] == "finished" for j in jobs)
                        and len(jobs) == 3 and jobs)  # fmt: skip
        starts = sorted(job["started_at"] for job in jobs)
        ends = sorted(job["finished_at"] for job in jobs)
        assert all(start >= end for start, end in zip(starts[1:], ends, strict=False))  # one at a time
