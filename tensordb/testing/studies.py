"""A whole study written straight into MongoDB, as the scheduler would have left it, for tests and
benchmarks of what reads studies (the dashboard, the SDK) at sizes that real trials would take
hours to reach: no processors, no workers.

Configurations come from the study's own searcher (:func:`tensordb.studies.searchers.configuration`),
curves from :func:`tensordb.testing.synthetic.learning_curve`, and ASHA's verdicts from its own rule
(:func:`tensordb.studies.searchers.judge_at_rung`), applied in configuration order.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from tensordb.infra.store import Store
from tensordb.studies.results import TrialStatus, best_row, configuration_rows
from tensordb.studies.scheduler import DECISIONS, STUDIES, TRIALS, StudyStatus, trial_id
from tensordb.studies.searchers import configuration, judge_at_rung
from tensordb.studies.spec import StudySpec, parse_study
from tensordb.testing.synthetic import learning_curve

#: The searched space: x and y set the curve's ceiling; the others only widen the chart.
SPACE = {
    "x": {"uniform": [0.0, 1.0]},
    "y": {"uniform": [0.0, 1.0]},
    "learning_rate": {"loguniform": [1e-4, 1e-1]},
    "units": {"choice": [16, 32, 64, 128]},
}


def insert_study(store: Store, name: str, trials: int = 1000, epochs: int = 27, asha: bool = True, seed: int = 0) -> StudySpec:
    """Write a finished study of ``trials`` trials (one fold each) with its trials and verdicts.

    Parameters
    ----------
    store : Store
        The project's database.
    name : str
        The study's name (not taken yet).
    trials : int
        How many configurations (= trials).
    epochs : int
        The longest a trial trains (ASHA's ``max_epochs``; every trial's length without ASHA).
    asha : bool
        ASHA (η=3 from 1 epoch: most trials stop at the first rungs), or a random search whose
        trials all train every epoch (the longest curves: the largest answers).
    seed : int
        The study's seed (which configurations are drawn).
    """
    searcher: dict[str, Any] = (
        {"name": "asha", "sampler": "random", "min_epochs": 1, "max_epochs": epochs, "reduction_factor": 3}
        if asha
        else {"name": "random"}
    )
    spec = parse_study({
        "name": name, "model": {"epoch_function": "tensordb.testing.synthetic:learning_curve"}, "space": SPACE,
        "searcher": searcher, "objective": {"metric": "accuracy", "direction": "max"}, "epochs": epochs,
        "max_trials": trials, "max_concurrent": 8, "seed": seed,
    })  # fmt: skip
    rungs = spec.searcher.rungs()
    start = datetime.now(UTC) - timedelta(seconds=trials)
    at_rung: list[list[float]] = [[] for _ in rungs]
    documents, decisions = [], []
    for number in range(trials):
        hyperparameters = configuration(spec, number)
        assert hyperparameters is not None
        job_id = trial_id(name, number, None)
        curve: dict[str, float] = {}
        rung, stopped_at = None, None
        for epoch in range(spec.trial_epochs):
            point = learning_curve(epoch, x=hyperparameters["x"], y=hyperparameters["y"], noise=0.01, seed=seed)
            curve[str(epoch)] = point["accuracy"]
            if epoch + 1 not in rungs:
                continue
            index = rungs.index(epoch + 1)
            value = curve[str(epoch)]
            verdict = judge_at_rung(value, at_rung[index], spec.searcher.reduction_factor, spec.objective)
            at_rung[index].append(value)
            decisions.append({
                "_id": f"{name}:{number}:{index}", "project": store.project, "study": name, "configuration": number,
                "rung": index, "epochs": epoch + 1, "metric": "accuracy", "value": value, "fold_values": [value],
                "cutoff": verdict.cutoff, "compared_with": verdict.compared_with, "action": "continue" if verdict.proceed else "stop",
                "reason": f"rung {index} ({epoch + 1} epochs): {verdict.reason}", "trials": [job_id],
                "at": start + timedelta(seconds=number, milliseconds=epoch),
            })  # fmt: skip
            if not verdict.proceed:
                stopped_at = index
                break
            rung = index
        last = curve[max(curve, key=int)]
        documents.append({
            "_id": job_id, "project": store.project, "study": name, "configuration": number, "fold": None,
            "hyperparameters": hyperparameters, "status": TrialStatus.FINISHED if stopped_at is None else TrialStatus.STOPPED,
            "curve": curve, "rung": rung, "stopped_at_rung": stopped_at, "objective": last, "epochs_done": len(curve),
            "submitted_at": start + timedelta(seconds=number), "ended_at": start + timedelta(seconds=number + 1),
        })  # fmt: skip
    best = best_row(spec, configuration_rows(spec, documents))
    store[STUDIES].insert_one({
        "_id": name, "project": store.project, "name": name, "spec": spec.as_json(), "status": StudyStatus.FINISHED,
        "created_at": start, "finished_at": start + timedelta(seconds=trials + 1), "best": best,
    })  # fmt: skip
    store[TRIALS].insert_many(documents)
    if decisions:
        store[DECISIONS].insert_many(decisions)
    return spec
