"""Every code example of TensorLayer's database API docs (../shared/seeds/001), run against TensorHub.

Each test quotes the calls it ports; they run as written, with Keras models in place of TensorLayer
networks, ``sess`` standing in for TensorFlow 1's session (accepted and ignored), small random arrays
in place of ``tl.files.load_mnist_dataset``, and this test's server, database and project in place
of localhost:27017, ``temp`` and ``tutorial``. Like a TensorLayer script, the hub gets everything
else (Kafka's address, the task script directories) from the environment.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import keras
import numpy as np
import pymongo
import pytest
from pymongo.uri_parser import parse_uri

from tensordb import TensorHub
from tensordb.config import Settings
from tests import REPO, TASK_SCRIPTS

sess = object()  # TensorFlow 1's session in the docs; TensorHub ignores it


@pytest.fixture
def connect(settings: Settings, monkeypatch: pytest.MonkeyPatch):
    """``tl.db.TensorHub(ip='localhost', port=27017, dbname='temp', username=None, password='password', project_name='tutorial')``"""
    for key, value in settings.as_environment().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # task scripts import this checkout's tensordb
    _, port = parse_uri(settings.mongo_uri)["nodelist"][0]
    opened: list[TensorHub] = []

    def connect() -> TensorHub:
        db = TensorHub(ip="localhost", port=port, dbname=settings.mongo_database, username=None, password="password",
                       project_name=settings.project)  # fmt: skip
        opened.append(db)
        return db

    yield connect
    for db in opened:
        db.close()


@pytest.fixture
def db(connect) -> Iterator[TensorHub]:
    yield connect()


def _arrays(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n)


def _net(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((784,)), keras.layers.Dense(10)])


def test_connect_to_the_database(db: TensorHub, settings: Settings) -> None:
    assert db.project_name == settings.project and db.settings.mongo_database == settings.mongo_database
    assert db.settings.mongo_uri.startswith("mongodb://localhost:")  # no username: no credentials, whatever the password


def test_dataset_management(db: TensorHub) -> None:
    (X_train, y_train), (X_test, y_test) = _arrays(20), _arrays(5, seed=1)

    # db.save_dataset(dataset=[X_train, y_train, X_test, y_test], dataset_name='mnist', description='this is a tutorial')
    assert (
        db.save_dataset(dataset=[X_train, y_train, X_test, y_test], dataset_name="mnist", description="this is a tutorial")
        is True
    )

    # dataset = db.find_dataset('mnist')
    dataset = db.find_dataset("mnist")
    assert isinstance(dataset, list) and all(np.array_equal(a, b) for a, b in zip(dataset, [X_train, y_train, X_test, y_test]))

    # dataset = db.find_dataset('mnist', version='1.0')
    dataset = db.find_dataset("mnist", version="1.0")
    assert dataset is False  # nothing saved as version '1.0' yet: TensorLayer's "not found"
    db.save_dataset([X_test, y_test], "mnist", version="1.0")
    dataset = db.find_dataset("mnist", version="1.0")
    assert np.array_equal(dataset[0], X_test)

    # datasets = db.find_all_datasets('mnist')
    datasets = db.find_all_datasets("mnist")
    assert len(datasets) == 2 and len(datasets[0]) == 4  # oldest first

    # TensorLayer 2.x's names
    assert np.array_equal(db.find_top_dataset("mnist", sort=[("time", 1)])[0], X_train)
    assert len(db.find_datasets("mnist", description="this is a tutorial")) == 1
    assert db.delete_datasets(dataset_name="mnist") == 2 and db.find_datasets("mnist") == []


def test_model_management(db: TensorHub) -> None:
    net = _net(0)
    X = _arrays(3)[0]

    # db.save_model(net, accuracy=0.8, loss=2.3, name='second_model')
    assert db.save_model(net, accuracy=0.8, loss=2.3, name="second_model") is True
    db.save_model(_net(1), accuracy=0.9, loss=1.0, test_accuracy=0.92, name="third_model")
    db.save_model(_net(2), accuracy=0.7, loss=3.0, test_accuracy=0.71, name="fourth_model")

    # net = db.find_model(sess=sess, accuracy=0.8, loss=2.3)
    found = db.find_model(sess=sess, accuracy=0.8, loss=2.3)
    assert np.allclose(found.predict(X, verbose=0), net.predict(X, verbose=0))
    assert found.tensordb_info["tensorlayer"] == {"name": "second_model"}  # TensorLayer's free-form name
    assert found.tensordb_info["name"] == "model"  # TensorLayer's default model_name
    assert db.find_model(sess=sess, name="second_model").tensordb_info["accuracy"] == 0.8

    def named(model: keras.Model) -> str:
        return model.tensordb_info["tensorlayer"]["name"]

    # newest model
    # net = db.find_model(sess=sess, sort=[("time", pymongo.DESCENDING)])
    # net = db.find_model(sess=sess, sort=[("time", -1)])
    assert named(db.find_model(sess=sess, sort=[("time", pymongo.DESCENDING)])) == "fourth_model"
    assert named(db.find_model(sess=sess, sort=[("time", -1)])) == "fourth_model"

    # oldest model
    # net = db.find_model(sess=sess, sort=[("time", pymongo.ASCENDING)])
    # net = db.find_model(sess=sess, sort=[("time", 1)])
    assert named(db.find_model(sess=sess, sort=[("time", pymongo.ASCENDING)])) == "second_model"
    assert named(db.find_model(sess=sess, sort=[("time", 1)])) == "second_model"

    # net = db.find_model(sess=sess, sort=[("test_accuracy", -1)])
    assert named(db.find_model(sess=sess, sort=[("test_accuracy", -1)])) == "third_model"

    # TensorLayer 2.x's name, sess first and positional; another model_name is another model
    assert named(db.find_top_model(sess, [("name", 1)])) == "fourth_model"
    assert db.find_top_model(sess, model_name="other") is False

    # "If you want to specify which model you want to delete, you need to put arguments inside."
    assert db.delete_model(name="fourth_model") == 1

    # db.delete_model()
    assert db.delete_model() == 2
    assert db.find_model(sess=sess) is False


def test_event_and_logging_management(db: TensorHub, processors) -> None:
    # db.save_training_log(accuracy=0.33)
    # db.save_training_log(accuracy=0.44)
    db.save_training_log(accuracy=0.33)
    db.save_training_log(accuracy=0.44)
    db.save_validation_log(accuracy=0.5)
    db.save_testing_log(accuracy=0.6)

    # db.delete_training_log(accuracy=0.33)
    assert db.delete_training_log(accuracy=0.33) == 1

    # db.delete_training_log()
    # db.delete_validation_log()
    # db.delete_testing_log()
    assert db.delete_training_log() == 1
    assert db.delete_validation_log() == 1
    assert db.delete_testing_log() == 1
    assert db.tensordb.read_logs().empty


def test_task_distribution(connect, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(TASK_SCRIPTS)  # where script='task_script.py' is, for the distributor and the runner
    db = connect()

    ## save dataset into database, then allow other servers to use it
    # X_train, y_train, X_val, y_val, X_test, y_test = tl.files.load_mnist_dataset(shape=(-1, 784))
    # db.save_dataset((X_train, y_train, X_val, y_val, X_test, y_test), 'mnist', description='handwriting digit')
    (X_train, y_train), (X_val, y_val), (X_test, y_test) = _arrays(64), _arrays(16, seed=1), _arrays(16, seed=2)
    db.save_dataset((X_train, y_train, X_val, y_val, X_test, y_test), "mnist", description="handwriting digit")

    ## push tasks into database, then allow other servers pull tasks to run
    db.create_task(
        task_name="mnist",
        script="task_script.py",
        hyper_parameters=dict(n_units1=800, n_units2=800),
        saved_result_keys=["test_accuracy"],
        description="800-800",
    )
    db.create_task(
        task_name="mnist",
        script="task_script.py",
        hyper_parameters=dict(n_units1=600, n_units2=600),
        saved_result_keys=["test_accuracy"],
        description="600-600",
    )
    db.create_task(
        task_name="mnist",
        script="task_script.py",
        hyper_parameters=dict(n_units1=400, n_units2=400),
        saved_result_keys=["test_accuracy"],
        description="400-400",
    )
    assert db.check_unfinished_task(task_name="mnist", description="600-600")

    ## monitors the database and pull tasks to run (the runner, on "GPU servers": here a thread)
    # while True:
    #     print("waiting task from distributor")
    #     db.run_task(task_name='mnist', sort=[("time", -1)])
    #     time.sleep(1)
    runner, stop, ran, failures = connect(), threading.Event(), [], []

    def run_tasks() -> None:
        try:
            while not stop.is_set():
                if runner.run_task(task_name="mnist", sort=[("time", -1)]):
                    ran.append(time.monotonic())
                else:
                    stop.wait(0.2)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failures.append(exc)

    thread = threading.Thread(target=run_tasks, name="tensorhub-runner")
    thread.start()
    try:
        ## wait for tasks to finish
        # while db.check_unfinished_task(task_name='mnist'):
        #     print("waiting runners to finish the tasks")
        #     time.sleep(1)
        deadline = time.monotonic() + 240
        while db.check_unfinished_task(task_name="mnist"):
            assert not failures and time.monotonic() < deadline, failures or "the runner did not finish the tasks in 240 s"
            time.sleep(1)
    finally:
        stop.set()
        thread.join()
    assert not failures and len(ran) == 3

    ## you can get the model and result from database and do some analysis at the end
    tasks = {task["description"]: task for task in db.jobs.list(name="mnist")}
    assert {task["status"] for task in tasks.values()} == {"finished"}, tasks
    best = max(tasks.values(), key=lambda task: task["result"]["test_accuracy"])
    net = db.find_model(sess=sess, sort=[("test_accuracy", -1)])
    assert net.tensordb_info["test_accuracy"] == best["result"]["test_accuracy"]
    assert net.tensordb_info["tensorlayer"]["name"] == best["description"]
    assert net.predict(X_test, verbose=0).shape == (16, 10)


def test_calls_tensordb_has_no_place_for_are_refused_with_what_to_do(db: TensorHub) -> None:
    from tensordb import JobError, QueryError

    with pytest.raises(JobError, match="pass values the script needs in hyper_parameters"):
        db.create_task(task_name="mnist", script="task_script.py", version=2)
    with pytest.raises(JobError, match="give such tasks their own task_name"):
        db.run_task(task_name="mnist", description="800-800")
    with pytest.raises(QueryError, match="dataset_name is required"):
        db.find_dataset()
