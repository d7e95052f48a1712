"""The study pages' server side without servers: rows under columns, curves as lists, where an
unfinished configuration stands, and the feed that sends a page only what changed. Against the
real services: tests/integration/test_dashboard.py; in the browser: tests/e2e/test_dashboard_browser.py."""

from __future__ import annotations

import copy
from datetime import UTC, datetime

import pytest

from dashboard.studies import (
    TRIAL_COLUMNS,
    StudyFeed,
    StudyState,
    curve_values,
    latest,
    number,
    parameter_axes,
    trial_row,
)
from tensordb.studies.spec import parse_study


def test_values_json_cannot_hold_become_none() -> None:
    values = (1, 2.5, float("nan"), float("inf"), None, "0.3", True)
    assert [number(v) for v in values] == [1.0, 2.5, None, None, None, None, None]


def test_a_curve_is_a_list_by_epoch_with_gaps_as_none() -> None:
    assert curve_values({"0": 0.5, "2": 0.7, "1": float("nan")}) == [0.5, None, 0.7]
    assert curve_values({"3": 1}) == [None, None, None, 1.0]
    assert curve_values({}) == [] and curve_values(None) == []


def test_an_unfinished_configuration_stands_at_the_mean_of_its_folds_last_values() -> None:
    assert latest([[0.1, 0.4], [0.2, 0.6, None]]) == pytest.approx(0.5)
    assert latest([[0.1], []]) is None  # a fold with no value yet
    assert latest([]) is None


def test_a_trial_row_carries_its_values_at_each_rung_and_its_parameters_in_axis_order() -> None:
    spec = parse_study({
        "name": "s", "model": {"epoch_function": "m:f"}, "objective": {"metric": "accuracy"}, "max_trials": 9,
        "space": {"units": {"choice": [16, "wide"]}, "lr": {"loguniform": [1e-4, 1e-1]}},
        "searcher": {"name": "asha", "min_epochs": 1, "max_epochs": 9, "reduction_factor": 3},
    })  # fmt: skip
    axes = parameter_axes(spec)
    assert [(a["name"], a["kind"]) for a in axes] == [("lr", "loguniform"), ("units", "choice")]
    assert axes[1]["values"] == [16, "wide"] and axes[0]["low"] == 1e-4
    at = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    trial = {
        "_id": "trial-s-0002", "configuration": 2, "fold": None, "status": "stopped", "rung": 0, "stopped_at_rung": 1,
        "objective": 0.4, "epochs_done": 4, "hyperparameters": {"units": "wide", "lr": 0.01},
        "curve": {"0": 0.1, "1": 0.2, "2": 0.3, "3": 0.4}, "submitted_at": at, "ended_at": None,
    }  # fmt: skip
    row = dict(zip(TRIAL_COLUMNS, trial_row(trial, [a["name"] for a in axes], spec.searcher.rungs(), "cancelled"), strict=True))
    assert row["hyperparameters"] == [0.01, "wide"]
    assert row["at_rungs"] == [0.1, 0.3]  # rungs at 1 and 3 epochs: curve[0] and curve[2]
    assert row["curve"] == [0.1, 0.2, 0.3, 0.4] and row["job_status"] == "cancelled"
    assert row["submitted_at"] == pytest.approx(at.timestamp()) and row["ended_at"] is None


def _state(trials: dict[str, list], created_at: float = 1.0) -> StudyState:
    return StudyState(
        created_at=created_at,
        head={"name": "s", "status": "running"},
        tables={"trials": list(trials.items()), "configurations": [], "decisions": []},
    )


def test_the_feed_sends_a_page_only_the_rows_that_changed_since_its_version() -> None:
    feed = StudyFeed()
    trials = {"a": ["a", 0, [0.1]], "b": ["b", 1, []]}
    first = feed.answer(_state(trials))
    assert first["full"] and first["trials"]["rows"] == [["a", 0, [0.1]], ["b", 1, []]]
    assert first["trials"]["columns"] == TRIAL_COLUMNS

    same = feed.answer(_state(copy.deepcopy(trials)), since=first["version"])
    assert not same["full"] and same["trials"]["rows"] == [] and same["version"] == first["version"]

    trials["b"] = ["b", 1, [0.2]]
    trials["c"] = ["c", 2, []]
    changed = feed.answer(_state(trials), since=first["version"])
    assert not changed["full"] and changed["trials"]["rows"] == [["b", 1, [0.2]], ["c", 2, []]]
    assert changed["version"] != first["version"]
    # a page that missed an answer still gets everything since the version it holds
    again = feed.answer(_state(trials), since=first["version"])
    assert again["trials"]["rows"] == changed["trials"]["rows"]
    assert feed.answer(_state(trials), since=changed["version"])["trials"]["rows"] == []


@pytest.mark.parametrize("since", [None, "", "elsewhere.1", "garbage", "ffffffff.99999"])
def test_a_version_the_feed_cannot_honour_gets_the_whole_study(since: str | None) -> None:
    feed = StudyFeed()
    feed.answer(_state({"a": [1]}))
    answer = feed.answer(_state({"a": [1], "b": [2]}), since=since)
    assert answer["full"] and len(answer["trials"]["rows"]) == 2


def test_a_study_created_again_or_a_row_removed_starts_over() -> None:
    feed = StudyFeed()
    first = feed.answer(_state({"a": [1], "b": [2]}))
    recreated = feed.answer(_state({"a": [1], "b": [2]}, created_at=2.0), since=first["version"])
    assert recreated["full"] and recreated["version"].split(".")[0] != first["version"].split(".")[0]
    removed = feed.answer(_state({"a": [1]}, created_at=2.0), since=recreated["version"])
    assert removed["full"] and removed["trials"]["rows"] == [[1]]


def test_the_feed_forgets_the_least_recently_asked_studies() -> None:
    feed = StudyFeed(remembered=2)
    versions = {}
    for name in ("s1", "s2", "s3"):
        state = _state({"a": [1]})
        state.head["name"] = name
        versions[name] = feed.answer(state)["version"]
    state = _state({"a": [1]})
    state.head["name"] = "s1"
    assert feed.answer(state, since=versions["s1"])["full"]  # forgotten: sent whole again
