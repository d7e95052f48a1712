"""The ported TensorLayer database example runs end to end: dispatch, a runner, the best model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tensordb.config import Settings
from tests import REPO

EXAMPLE = REPO / "examples" / "tensorlayer_db"


def test_tensorlayer_example_dispatches_runs_and_loads_the_best_model(settings: Settings, processors, tmp_path) -> None:
    env = {**os.environ, **settings.as_environment(), "TENSORDB_TASK_SCRIPT_DIRS": str(EXAMPLE)}
    with open(tmp_path / "dispatch.log", "w") as dispatch_log, open(tmp_path / "runner.log", "w") as runner_log:
        dispatcher = subprocess.Popen(
            [sys.executable, str(EXAMPLE / "dispatch_tasks.py")], env=env, stdout=dispatch_log, stderr=subprocess.STDOUT
        )
        runner = subprocess.Popen(
            [sys.executable, str(EXAMPLE / "run_tasks.py")], env=env, stdout=runner_log, stderr=subprocess.STDOUT
        )
        try:
            assert dispatcher.wait(timeout=400) == 0, (tmp_path / "dispatch.log").read_text()
            assert runner.wait(timeout=60) == 0, (tmp_path / "runner.log").read_text()
        finally:
            for process in (dispatcher, runner):
                if process.poll() is None:
                    process.kill()
    output = (tmp_path / "dispatch.log").read_text()
    assert output.count(": finished, test_accuracy=") == 3, output
    assert "best model: n_units=" in output
    reloaded = float(output.rsplit("reloaded best model scores ", 1)[1].split()[0])
    assert reloaded > 0.85, output
    assert "ran 3 task(s)" in (tmp_path / "runner.log").read_text()


def test_the_kfold_study_example_runs_every_fold_of_both_architectures(
    settings: Settings, processors, start_worker, tmp_path
) -> None:
    start_worker(slots=2)
    env = {**os.environ, **settings.as_environment()}
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "kfold_study" / "study.py")],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "architecture=cnn" in result.stdout and "architecture=mlp" in result.stdout
    assert result.stdout.count("finished") >= 4 and "best: configuration" in result.stdout


@pytest.mark.timeout(900)
def test_distillation_teacher_predictions_become_the_students_training_data(
    settings: Settings, processors, start_worker, tmp_path
) -> None:
    from tensordb.testing import predictor_process

    start_worker()
    with predictor_process(settings, tmp_path / "predictor.log", "teacher"):
        result = subprocess.run(
            [sys.executable, str(REPO / "examples" / "distillation" / "run.py")],
            env={**os.environ, **settings.as_environment()}, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "teacher v" in result.stdout and "student v" in result.stdout
    derived = int(result.stdout.split("pseudo-labelled ", 1)[1].split()[0])
    assert derived >= 500, result.stdout  # enough confident answers to fire the student's trigger
