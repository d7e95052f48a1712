"""TensorHub, TensorLayer's API, against the real servers: both method spellings, credentials that
are actually checked, and the task runner loop."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from pymongo import MongoClient
from pymongo.uri_parser import parse_uri

from tensordb import TensorHub
from tensordb.config import Settings
from tensordb.errors import ConfigurationError
from tests import TASK_SCRIPTS


def _address(settings: Settings) -> tuple[str, int]:
    return parse_uri(settings.mongo_uri)["nodelist"][0]


def _hub(settings: Settings, **credentials: str) -> TensorHub:
    ip, port = _address(settings)
    return TensorHub(
        ip=ip, port=port, dbname=settings.mongo_database, project_name=settings.project, settings=settings, **credentials
    )


def test_datasets_models_and_logs_with_tensorlayer_names(settings: Settings, processors) -> None:
    with _hub(settings) as db:
        X, y = np.arange(40, dtype=np.float32).reshape(10, 4), np.arange(10)
        db.save_dataset((X, y), "toy", description="first")
        db.save_dataset((X * 2, y), "toy", description="second")
        assert np.array_equal(db.find_top_dataset("toy")[0], X * 2)  # newest first
        assert np.array_equal(db.find_dataset("toy", description="first")[0], X)
        assert len(db.find_datasets("toy")) == len(db.find_all_datasets("toy")) == 2
        assert db.delete_datasets(dataset_name="toy") == 2

        for accuracy in (0.7, 0.9, 0.8):
            model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
            db.save_model(model, model_name="net", accuracy=accuracy, loss=1 - accuracy)
        best = db.find_top_model(sort=[("accuracy", -1)], model_name="net")
        assert best.tensordb_info["accuracy"] == 0.9
        assert db.find_model(accuracy=0.8, model_name="net").tensordb_info["version"] == 3
        assert len(db.find_models(sort=[("accuracy", 1)], model_name="net")) == 3
        assert db.delete_model(model_name="net") == 3

        db.save_training_log(accuracy=0.33)
        db.save_training_log(accuracy=0.44)
        db.save_validation_log(accuracy=0.5)
        assert db.delete_training_log(accuracy=0.33) == 1
        assert db.delete_training_log() == 1 and db.delete_validation_log() == 1


def test_tasks_are_created_checked_and_run_by_a_runner_loop(settings: Settings, tmp_path: Path) -> None:
    with _hub(settings) as db:
        for value in (1, 2):
            db.create_task(task_name="double", script=str(TASK_SCRIPTS / "record_run.py"),
                           hyper_parameters={"marker_file": str(tmp_path / "runs"), "value": value},
                           saved_result_keys=["doubled"], description=f"value {value}")  # fmt: skip
        db.create_task(task_name="double", script=str(TASK_SCRIPTS / "fail.py"))
        assert db.check_unfinished_task(task_name="double")
        ran = 0
        while db.run_top_task(task_name="double", sort=[("time", 1)]):
            ran += 1
        assert ran == 3 and not db.check_unfinished_task(task_name="double")
        tasks = {task["description"]: task for task in db.jobs.list(name="double")}
        assert tasks["value 1"]["result"]["doubled"] == 2 and tasks["value 2"]["result"]["doubled"] == 4
        assert tasks[""]["status"] == "failed" and "boom" in tasks[""]["error"]["message"]
        assert db.delete_tasks(task_name="double") == 3


def test_username_and_password_are_used_not_ignored(settings: Settings) -> None:
    admin = MongoClient(settings.mongo_uri)
    user = f"user_{settings.project}"
    admin.admin.command("createUser", user, pwd="right-password", roles=[{"role": "readWrite", "db": settings.mongo_database}])
    try:
        with _hub(settings, username=user, password="right-password") as db:
            db.save_training_log(loss=1.0)
            assert db.store.authenticated_user() == user
        with pytest.raises(ConfigurationError, match="rejected the username or password"):
            _hub(settings, username=user, password="wrong-password")
    finally:
        admin.admin.command("dropUser", user)
        admin.close()
