"""The dashboard's studies: a project's studies at a glance, and one study whole (its spec in
brief, the best configuration so far, configurations, trials with their validation curves, ASHA's
verdicts).

A study of thousands of trials must stay quick to read and to follow live, so an answer reads each
collection once (never once per trial), rows travel as arrays under named columns rather than one
object per row, and :class:`StudyFeed` remembers what it last read: a page that passes back the
``version`` it holds gets only the rows that changed since (the dashboard only reads; the
scheduler's documents carry no change times to ask MongoDB with).
"""

from __future__ import annotations

import math
import secrets
import statistics
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING

from tensordb.errors import StudyNotFoundError
from tensordb.infra.store import Store
from tensordb.jobs.queue import JOBS
from tensordb.studies.results import best_row, configuration_rows
from tensordb.studies.scheduler import DECISIONS, STUDIES, TRIALS
from tensordb.studies.spec import StudySpec, parse_study

TRIAL_COLUMNS = (
    "id", "configuration", "fold", "status", "job_status", "rung", "stopped_at_rung", "objective", "epochs_done",
    "hyperparameters", "at_rungs", "curve", "submitted_at", "ended_at",
)  # fmt: skip
#: A configuration's hyper-parameters are those of its trials (not sent twice).
CONFIGURATION_COLUMNS = ("configuration", "status", "objective", "spread", "latest", "rung", "stopped_at_rung", "trials")
#: A verdict's numbers, not its sentence (``reason`` is most of a verdict's size, and a page can say
#: it from these): a configuration's rung identifies it.
DECISION_COLUMNS = ("configuration", "rung", "epochs", "value", "cutoff", "compared_with", "action", "at")
#: What the list of studies reads of each trial (no curves).
_SUMMARY_FIELDS = {
    "study": 1, "configuration": 1, "fold": 1, "status": 1, "objective": 1, "rung": 1, "stopped_at_rung": 1, "hyperparameters": 1,
}  # fmt: skip
_DECISION_FIELDS = {key: 1 for key in DECISION_COLUMNS}
_CURVE = TRIAL_COLUMNS.index("curve")
#: Studies whose last answer a feed remembers (each costs about one answer's worth of memory).
FEED_STUDIES = 16


# -- values ----------------------------------------------------------------------------------------


def number(value: Any) -> float | None:
    """A finite number as a float, anything else (None, NaN, a string) as None: JSON has no NaN."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def seconds(value: Any) -> float | None:
    """A time as seconds since the epoch (millisecond precision), or None."""
    return round(value.timestamp(), 3) if isinstance(value, datetime) else None


def curve_values(curve: Mapping[str, Any] | None) -> list[float | None]:
    """A trial's ``curve`` ({"<epoch>": value}) as a list indexed by epoch, None where missing."""
    epochs = {int(epoch): number(value) for epoch, value in (curve or {}).items() if str(epoch).isdigit()}
    if not epochs:
        return []
    values: list[float | None] = [None] * (max(epochs) + 1)
    for epoch, value in epochs.items():
        values[epoch] = value
    return values


def latest(curves: Iterable[Sequence[float | None]]) -> float | None:
    """The mean over folds of each fold's last recorded value (where an unfinished configuration
    stands), or None until every fold has one."""
    lasts = [next((value for value in reversed(curve) if value is not None), None) for curve in curves]
    if not lasts or any(value is None for value in lasts):
        return None
    return statistics.fmean(value for value in lasts if value is not None)


def parameter_axes(spec: StudySpec) -> list[dict[str, Any]]:
    """The searched parameters in the order rows list their values: name, kind and domain (what a
    parallel-coordinates axis needs: a log scale for loguniform, categories for choice)."""
    return [
        {"name": name, "kind": parameter.kind, "low": parameter.low, "high": parameter.high, "values": list(parameter.values)}
        for name, parameter in spec.parameters().items()
    ]


# -- rows ------------------------------------------------------------------------------------------


def trial_row(trial: Mapping[str, Any], names: Sequence[str], rungs: Sequence[int], job_status: str | None) -> list[Any]:
    """One trial under :data:`TRIAL_COLUMNS`: ``at_rungs`` is its objective at each rung's epoch count."""
    curve = curve_values(trial.get("curve"))
    hyperparameters = trial.get("hyperparameters") or {}
    return [
        trial["_id"], trial["configuration"], trial.get("fold"), trial["status"], job_status, trial.get("rung"),
        trial.get("stopped_at_rung"), number(trial.get("objective")), trial.get("epochs_done"),
        [hyperparameters.get(name) for name in names], [curve[epochs - 1] if epochs <= len(curve) else None for epochs in rungs],
        curve, seconds(trial.get("submitted_at")), seconds(trial.get("ended_at")),
    ]  # fmt: skip


def configuration_row(row: Mapping[str, Any], curves: Iterable[Sequence[float | None]]) -> list[Any]:
    """One :func:`~tensordb.studies.results.configuration_rows` row under :data:`CONFIGURATION_COLUMNS`,
    with ``latest`` (see :func:`latest`) and ``trials`` as a count."""
    return [
        row["configuration"], row["status"], number(row["objective"]), number(row["spread"]), latest(curves), row["rung"],
        row["stopped_at_rung"], len(row["trials"]),
    ]  # fmt: skip


def decision_row(decision: Mapping[str, Any]) -> list[Any]:
    """One ASHA verdict under :data:`DECISION_COLUMNS`."""
    return [
        decision["configuration"], decision["rung"], decision.get("epochs"), number(decision.get("value")),
        number(decision.get("cutoff")), decision.get("compared_with"), decision.get("action"), seconds(decision.get("at")),
    ]  # fmt: skip


def searcher_summary(spec: StudySpec) -> dict[str, Any]:
    """The searcher as the pages describe it, with its rungs' epoch counts (none for grid and random)."""
    return {**spec.searcher.model_dump(mode="json"), "rungs": spec.searcher.rungs()}


def best_so_far(study: Mapping[str, Any], spec: StudySpec, rows: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The study's ``best`` once it finished (with the model version it registered), else the best
    finished configuration so far."""
    if study.get("status") == "finished" and study.get("best"):
        return dict(study["best"])
    return best_row(spec, rows)


# -- the list ----------------------------------------------------------------------------------------


def list_studies(store: Store) -> list[dict[str, Any]]:
    """Every study of the project, newest first: status, searcher, objective, trials per status and
    the best objective so far (two queries, whatever the number of studies and trials)."""
    trials: dict[str, list[dict[str, Any]]] = {}
    for trial in store[TRIALS].find({}, _SUMMARY_FIELDS):
        trials.setdefault(trial["study"], []).append(trial)
    result = []
    for study in store[STUDIES].find({}, sort=[("created_at", DESCENDING)]):
        spec = parse_study(study["spec"])
        own = trials.get(study["_id"], [])
        best = best_so_far(study, spec, configuration_rows(spec, own))
        result.append({
            "name": study["_id"], "status": study["status"], "searcher": searcher_summary(spec),
            "objective": spec.objective.model_dump(mode="json"), "folds": spec.folds, "trials": len(own),
            "configurations": len({trial["configuration"] for trial in own}), "configurations_limit": spec.configurations_limit(),
            "counts": dict(Counter(str(trial["status"]) for trial in own)),
            "best_objective": number(best["objective"]) if best else None,
            "best_configuration": best["configuration"] if best else None, "created_at": seconds(study.get("created_at")),
            "finished_at": seconds(study.get("finished_at")), "description": spec.description,
        })  # fmt: skip
    return result


# -- one study -----------------------------------------------------------------------------------------


@dataclass
class StudyState:
    """One read of a study: its summary (``head``) and its rows per table, keyed and in order."""

    created_at: float | None
    head: dict[str, Any]
    tables: dict[str, list[tuple[Any, list[Any]]]]


def read_study(store: Store, name: str) -> StudyState:
    """Read a study whole: one query on each of studies, study_trials, jobs and study_decisions.

    Raises :class:`~tensordb.errors.StudyNotFoundError` for a name the project has no study of.
    """
    study = store[STUDIES].find_one({"_id": name})
    if study is None:
        raise StudyNotFoundError(f"no study {name!r} in project {store.project!r}: /api/studies lists them")
    spec = parse_study(study["spec"])
    axes = parameter_axes(spec)
    names = [axis["name"] for axis in axes]
    rungs = spec.searcher.rungs()
    trials = list(store[TRIALS].find({"study": name}, sort=[("configuration", ASCENDING), ("fold", ASCENDING)]))
    jobs = {job["_id"]: job.get("status") for job in store[JOBS].find({"labels.study": name}, {"status": 1})}
    decisions = list(store[DECISIONS].find({"study": name}, _DECISION_FIELDS, sort=[("at", ASCENDING)]))
    trial_rows = []
    curves: dict[int, list[list[float | None]]] = {}  # per configuration, its folds' curves
    for trial in trials:
        row = trial_row(trial, names, rungs, jobs.get(trial["_id"]))
        trial_rows.append((trial["_id"], row))
        curves.setdefault(trial["configuration"], []).append(row[_CURVE])
    rows = configuration_rows(spec, trials)
    best = best_so_far(study, spec, rows)
    head = {
        "name": name, "status": study["status"], "created_at": seconds(study.get("created_at")),
        "finished_at": seconds(study.get("finished_at")), "description": spec.description, "searcher": searcher_summary(spec),
        "objective": spec.objective.model_dump(mode="json"), "folds": spec.folds, "max_trials": spec.max_trials,
        "max_concurrent": spec.max_concurrent, "trial_epochs": spec.trial_epochs, "configurations_limit": spec.configurations_limit(),
        "parameters": axes, "fixed": spec.hyperparameters, "counts": dict(Counter(str(trial["status"]) for trial in trials)),
        "trial_count": len(trials), "best": best,
    }  # fmt: skip
    return StudyState(
        created_at=head["created_at"],
        head=head,
        tables={
            "trials": trial_rows,
            "configurations": [
                (row["configuration"], configuration_row(row, curves.get(row["configuration"], []))) for row in rows
            ],
            "decisions": [(decision["_id"], decision_row(decision)) for decision in decisions],
        },
    )


COLUMNS = {"trials": TRIAL_COLUMNS, "configurations": CONFIGURATION_COLUMNS, "decisions": DECISION_COLUMNS}


@dataclass
class _Sent:
    """What a feed last read of one study: each row with the version at which it last changed."""

    created_at: float | None
    instance: str
    version: int
    rows: dict[str, dict[Any, tuple[list[Any], int]]]


class StudyFeed:
    """Answers ``/api/study``: the whole study, or with ``since`` (the ``version`` of an earlier
    answer) only the rows that changed after it. A ``since`` the feed cannot honour (another
    dashboard process, a study deleted and created again, a row removed) gets the whole study, with
    ``full: true``: the page then replaces what it holds rather than merging."""

    def __init__(self, remembered: int = FEED_STUDIES) -> None:
        self.remembered = remembered
        self._sent: OrderedDict[str, _Sent] = OrderedDict()
        self._lock = threading.Lock()

    def answer(self, state: StudyState, since: str | None = None) -> dict[str, Any]:
        """The answer to a page holding ``since`` (or nothing) about the study just read as ``state``
        (read outside the lock: pages of other studies never wait on this one's read)."""
        name = state.head["name"]
        with self._lock:
            sent = self._sent.get(name)
            if sent is None or sent.created_at != state.created_at or _removed(sent, state):
                sent = _Sent(state.created_at, secrets.token_hex(4), 0, {table: {} for table in state.tables})
            self._sent[name] = sent
            self._sent.move_to_end(name)
            while len(self._sent) > self.remembered:
                self._sent.popitem(last=False)
            version = sent.version + 1
            changed = False
            for table, rows in state.tables.items():
                known = sent.rows[table]
                for key, row in rows:
                    before = known.get(key)
                    if before is None or before[0] != row:
                        known[key] = (row, version)
                        changed = True
            if changed:
                sent.version = version
            after = _version_in(since, sent)
            answer: dict[str, Any] = {**state.head, "version": f"{sent.instance}.{sent.version}", "full": after is None}
            for table, rows in state.tables.items():
                known = sent.rows[table]
                answer[table] = {
                    "columns": COLUMNS[table],
                    "rows": [row for key, row in rows if after is None or known[key][1] > after],
                }
            return answer


def _removed(sent: _Sent, state: StudyState) -> bool:
    """Whether a row the feed sent is gone (a page merging changes would keep it)."""
    return any(not set(sent.rows[table]) <= {key for key, _ in rows} for table, rows in state.tables.items())


def _version_in(since: str | None, sent: _Sent) -> int | None:
    """The version number in ``since`` if it names this feed's current instance of the study, else None."""
    if not since:
        return None
    instance, _, number = since.partition(".")
    if instance != sent.instance or not number.isdigit() or int(number) > sent.version:
        return None
    return int(number)
