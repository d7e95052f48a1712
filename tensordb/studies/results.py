"""A study's results from its trials: one row per configuration (mean and spread over its folds),
and the best configuration so far. Pure functions of the trial documents, shared by the scheduler
(when a study finishes) and every reader (SDK, CLI, dashboard)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any

from tensordb.studies.spec import StudySpec


class TrialStatus(StrEnum):
    """A trial's ``status``: its train job's outcome, told apart from being stopped early."""

    ACTIVE = "active"  #: submitted: its job is pending or running
    FINISHED = "finished"  #: trained every epoch; ``objective`` is its final value
    STOPPED = "stopped"  #: stopped early by ASHA at a rung (``stopped_at_rung``)
    FAILED = "failed"  #: its job failed (out of attempts)
    CANCELLED = "cancelled"  #: cancelled by a person or by stopping the study


def configuration_rows(spec: StudySpec, trials: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration, in configuration order.

    ``status`` is ``finished`` when every fold finished, ``stopped`` when ASHA stopped it,
    ``failed``/``cancelled`` when a fold did, else ``active``. ``objective`` is the mean of the
    folds' final objectives (finished configurations only) and ``spread`` their sample standard
    deviation (k-fold studies); ``rung`` is the highest ASHA rung it passed; ``latest`` the mean of
    its folds' last validation values, whatever its status (where a stopped one stood).
    """
    grouped: dict[int, list[Mapping[str, Any]]] = {}
    for trial in trials:
        grouped.setdefault(int(trial["configuration"]), []).append(trial)
    rows = []
    for number in sorted(grouped):
        folds = sorted(grouped[number], key=lambda trial: trial.get("fold") or 0)
        statuses = {trial["status"] for trial in folds}
        finished = [trial for trial in folds if trial["status"] == TrialStatus.FINISHED and trial.get("objective") is not None]
        if len(finished) == spec.folds_or_one:
            status = TrialStatus.FINISHED
        else:
            status = next(
                (state for state in (TrialStatus.STOPPED, TrialStatus.FAILED, TrialStatus.CANCELLED) if state in statuses),
                TrialStatus.ACTIVE,
            )
        values = [float(trial["objective"]) for trial in finished]
        latest = [value for trial in folds if (value := _latest(trial)) is not None]
        rungs = [int(trial["rung"]) for trial in folds if trial.get("rung") is not None]
        stopped_at = [int(trial["stopped_at_rung"]) for trial in folds if trial.get("stopped_at_rung") is not None]
        rows.append(
            {
                "configuration": number,
                "hyperparameters": dict(folds[0]["hyperparameters"]),
                "status": str(status),
                "trials": [trial["_id"] for trial in folds],
                "objective": statistics.fmean(values) if status == TrialStatus.FINISHED else None,
                "spread": statistics.stdev(values) if status == TrialStatus.FINISHED and len(values) > 1 else None,
                "fold_objectives": values,
                "latest": statistics.fmean(latest) if latest else None,
                "rung": max(rungs) if rungs else None,
                "stopped_at_rung": min(stopped_at) if stopped_at else None,
            }
        )
    return rows


def _latest(trial: Mapping[str, Any]) -> float | None:
    """A trial's last validation value (its curve's highest epoch), if it logged a number."""
    curve = trial.get("curve") or {}
    value = curve[max(curve, key=int)] if curve else None
    return float(value) if isinstance(value, int | float) else None


def best_row(spec: StudySpec, rows: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The finished configuration with the best objective (the lowest number on ties), or None."""
    best: Mapping[str, Any] | None = None
    for row in rows:
        if row["status"] != TrialStatus.FINISHED:
            continue
        if best is None or spec.objective.better(row["objective"], best["objective"]):
            best = row
    return dict(best) if best is not None else None
