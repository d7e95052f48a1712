"""Studies' pure logic: search spaces, specs and their errors, configurations, ASHA's rule, results."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest

from tensordb.cli import main
from tensordb.errors import StudySpecError
from tensordb.studies.results import best_row, configuration_rows
from tensordb.studies.searchers import configuration, judge_at_rung
from tensordb.studies.space import MAX_GRID, grid, parse_space, sample
from tensordb.studies.spec import ObjectiveSpec, parse_study
from tensordb.testing.synthetic import OPTIMUM, ceiling, learning_curve

CURVE = {"epoch_function": "tensordb.testing.synthetic:learning_curve"}


def study(**fields):
    return parse_study({"name": "s", "model": CURVE, "objective": {"metric": "accuracy"}, **fields})


# -- search spaces -----------------------------------------------------------------------------------
def test_a_space_samples_every_kind_within_its_bounds_and_the_same_seed_gives_the_same_values() -> None:
    space = parse_space({"units": {"choice": [32, 64]}, "layers": {"int": [1, 3]}, "dropout": {"uniform": [0, 0.5]},
                         "lr": {"loguniform": [1e-4, 1e-1]}})  # fmt: skip
    draws = [sample(space, np.random.default_rng([7, n])) for n in range(200)]
    assert all(d["units"] in (32, 64) and d["layers"] in (1, 2, 3) and 0 <= d["dropout"] <= 0.5 for d in draws)
    assert all(1e-4 <= d["lr"] <= 1e-1 for d in draws)
    logs = [math.log10(d["lr"]) for d in draws]
    assert min(logs) < -3.3 and max(logs) > -1.7  # log-uniform: spread over the decades, not bunched near 0.1
    assert draws == [sample(space, np.random.default_rng([7, n])) for n in range(200)]


def test_a_grid_takes_every_value_of_choices_and_integers_and_the_given_points_of_reals() -> None:
    space = parse_space({"b": {"int": [1, 2]}, "a": {"choice": ["x", "y"]}, "c": {"loguniform": [0.01, 1], "grid": 3}})
    points = grid(space)
    assert len(points) == 12
    assert points[0] == {"a": "x", "b": 1, "c": pytest.approx(0.01)} and points[1]["c"] == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({}, "needs a search space"),
        ({"x": {"uniform": [1, 0]}}, "low 1 is above high 0"),
        ({"x": {"loguniform": [0, 1]}}, "loguniform needs low > 0"),
        ({"x": {"int": [0.5, 2]}}, "int bounds must be integers"),
        ({"x": {"choice": []}}, "non-empty list"),
        ({"x": {"choice": [1, 1]}}, "lists a value twice"),
        ({"x": {"uniform": [0, 1], "normal": 2}}, "exactly one of"),
        ({"x": {"choice": [1], "grid": 2}}, "grid applies to uniform and loguniform only"),
        ({"x": {"uniform": ["a", 1]}}, "two finite numbers"),
        ({"not valid": {"choice": [1]}}, "must be an identifier"),
    ],
)
def test_a_bad_space_gets_an_error_that_says_what_to_write(space, message) -> None:
    with pytest.raises(StudySpecError, match=message):
        parse_space(space)


def test_a_grid_over_a_real_without_points_or_beyond_the_limit_is_refused_when_the_study_is_created() -> None:
    with pytest.raises(StudySpecError, match='"grid": 3'):
        study(space={"x": {"uniform": [0, 1]}})
    with pytest.raises(StudySpecError, match=f"more than {MAX_GRID}"):
        study(space={"x": {"int": [0, 1000]}, "y": {"int": [0, 1000]}})


# -- specs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"space": {"x": {"choice": [1]}}, "searcher": {"name": "asha", "max_epochs": 2}, "max_trials": 4},
            "at least min_epochs × reduction_factor = 3",
        ),
        ({"space": {"x": {"choice": [1]}}, "searcher": {"name": "asha"}}, "needs max_epochs"),
        ({"space": {"x": {"uniform": [0, 1]}}, "searcher": {"name": "random"}}, "needs max_trials"),
        ({"space": {"x": {"choice": [1]}}, "folds": 3, "max_trials": 4}, "multiple of folds"),
        ({"space": {"x": {"choice": [1]}}, "hyperparameters": {"x": 2}}, "both searched"),
        ({"space": {"x": {"choice": [1]}}, "validation": {"cohort": "v"}, "folds": 2}, "not both"),
        ({"space": {"x": {"choice": [1]}}, "folds": 1}, "folds: Input should be greater than or equal to 2"),
        ({"space": {"x": {"choice": [1]}}, "max_concurent": 2}, "max_concurent: unknown field"),
        ({"space": {"x": {"choice": [1]}}, "name": "no spaces"}, "name: use 1-64 letters"),
    ],
)
def test_a_bad_study_gets_an_error_naming_the_field(fields, message) -> None:
    with pytest.raises(StudySpecError, match=message):
        study(**fields)


def test_a_keras_study_needs_data_and_a_validation_cohort_or_folds() -> None:
    keras = {"entry_point": "tensordb.models.examples:digits_mlp"}
    with pytest.raises(StudySpecError, match="needs data"):
        parse_study({"name": "s", "model": keras, "objective": {"metric": "accuracy"}, "space": {"units": {"choice": [8]}}})
    with pytest.raises(StudySpecError, match="validation .a cohort. or folds=k"):
        parse_study({"name": "s", "model": keras, "objective": {"metric": "accuracy"}, "space": {"units": {"choice": [8]}},
                     "data": {"cohort": "digits"}})  # fmt: skip


def test_asha_rungs_are_min_epochs_times_powers_of_the_reduction_factor_below_max_epochs() -> None:
    spec = study(space={"x": {"uniform": [0, 1]}}, searcher={"name": "asha", "min_epochs": 1, "max_epochs": 27}, max_trials=9)
    assert spec.searcher.rungs() == [1, 3, 9] and spec.trial_epochs == 27
    assert study(space={"x": {"choice": [1]}}).searcher.rungs() == []


# -- configurations -------------------------------------------------------------------------------
def test_configuration_n_is_the_same_every_time_and_none_past_the_last() -> None:
    random = study(space={"x": {"uniform": [0, 1]}}, searcher={"name": "random"}, max_trials=6, folds=2, seed=3)
    assert [configuration(random, n) for n in range(3)] == [configuration(random, n) for n in range(3)]
    assert configuration(random, 3) is None  # 6 trials = 3 configurations × 2 folds
    assert len({configuration(random, n)["x"] for n in range(3)}) == 3
    other_seed = study(space={"x": {"uniform": [0, 1]}}, searcher={"name": "random"}, max_trials=6, folds=2, seed=4)
    assert configuration(other_seed, 0) != configuration(random, 0)
    gridded = study(space={"x": {"choice": [1, 2, 3]}}, max_trials=2)
    assert [configuration(gridded, n) for n in range(3)] == [{"x": 1}, {"x": 2}, None]


# -- ASHA's rule --------------------------------------------------------------------------------------
def test_the_first_configuration_at_a_rung_continues_and_later_ones_must_reach_the_best_share() -> None:
    maximise, minimise = ObjectiveSpec(metric="accuracy", direction="max"), ObjectiveSpec(metric="loss", direction="min")
    first = judge_at_rung(0.1, [], 3, maximise)
    assert first.proceed and first.cutoff is None and "first configuration" in first.reason
    earlier = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    cutoff = float(np.percentile(earlier, 100 * (1 - 1 / 3)))
    assert judge_at_rung(0.42, earlier, 3, maximise).proceed is False
    kept = judge_at_rung(0.44, earlier, 3, maximise)
    assert kept.proceed and kept.cutoff == pytest.approx(cutoff) and kept.compared_with == 6
    assert judge_at_rung(0.2, earlier, 3, minimise).proceed and not judge_at_rung(0.3, earlier, 3, minimise).proceed
    assert "< cut-off 0.4333" in judge_at_rung(0.42, earlier, 3, maximise).reason


def test_a_missing_or_nan_objective_stops_the_configuration() -> None:
    objective = ObjectiveSpec(metric="accuracy")
    assert not judge_at_rung(None, [0.5], 3, objective).proceed
    assert not judge_at_rung(float("nan"), [], 3, objective).proceed


# -- results ---------------------------------------------------------------------------------------
def trial(configuration, fold, status, objective, **fields):
    return {"_id": f"t{configuration}-{fold}", "configuration": configuration, "fold": fold, "status": status,
            "objective": objective, "hyperparameters": {"x": configuration}, **fields}  # fmt: skip


def test_configuration_rows_average_folds_report_the_spread_and_the_best_is_a_finished_configuration() -> None:
    spec = study(space={"x": {"choice": [0, 1, 2]}}, folds=3)
    trials = [trial(0, f, "finished", v) for f, v in enumerate([0.5, 0.6, 0.7])]
    trials += [trial(1, f, "finished", v) for f, v in enumerate([0.8, 0.9, 0.85])]
    trials += [trial(2, 0, "stopped", 0.99, stopped_at_rung=0), trial(2, 1, "active", None), trial(2, 2, "active", None)]
    rows = configuration_rows(spec, reversed(trials))
    assert [row["status"] for row in rows] == ["finished", "finished", "stopped"]
    assert rows[0]["objective"] == pytest.approx(0.6) and rows[0]["spread"] == pytest.approx(statistics.stdev([0.5, 0.6, 0.7]))
    assert rows[2]["objective"] is None and rows[2]["stopped_at_rung"] == 0
    assert best_row(spec, rows)["configuration"] == 1
    minimise = study(space={"x": {"choice": [0, 1, 2]}}, folds=3, objective={"metric": "loss", "direction": "minimize"})
    assert best_row(minimise, configuration_rows(minimise, trials))["configuration"] == 0


def test_the_synthetic_curve_rises_towards_a_ceiling_that_is_highest_at_the_optimum() -> None:
    values = [learning_curve(epoch, **OPTIMUM)["accuracy"] for epoch in range(20)]
    assert values == sorted(values) and values[-1] == pytest.approx(ceiling(**OPTIMUM), rel=1e-3)
    assert ceiling(0.5, 0.5) < ceiling(**OPTIMUM)
    assert learning_curve(3, x=0.1, noise=0.1, seed=1) == learning_curve(3, x=0.1, noise=0.1, seed=1)


# -- the command line, before any server is needed ------------------------------------------------------
def test_the_cli_refuses_a_missing_unreadable_or_invalid_study_file_before_connecting(tmp_path, capsys) -> None:
    assert main(["study", "create", str(tmp_path / "missing.json")]) == 1
    assert "cannot read study file" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text('{"name": ')
    assert main(["study", "create", str(tmp_path / "broken.json")]) == 1
    assert "is not JSON" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({"name": "s", "model": CURVE, "objective": {"metric": "accuracy"},
                                                   "space": {"x": {"uniform": [0, 1]}}, "searcher": {"name": "bayes"}}))  # fmt: skip
    assert main(["study", "create", str(tmp_path / "bad.json")]) == 1
    assert "searcher.name: Input should be 'grid', 'random' or 'asha'" in capsys.readouterr().err


def test_a_shuffled_grid_visits_every_point_once_in_a_seeded_order() -> None:
    def shuffled(seed: int):
        spec = study(
            space={"x": {"int": [0, 9]}}, searcher={"name": "asha", "sampler": "shuffled-grid", "max_epochs": 3}, seed=seed
        )
        return [configuration(spec, n)["x"] for n in range(10)]

    assert sorted(shuffled(1)) == list(range(10)) and shuffled(1) != list(range(10))
    assert shuffled(1) == shuffled(1) and shuffled(1) != shuffled(2)
