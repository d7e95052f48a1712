"""The distributor: save the data, dispatch three tasks, wait, and load the best model."""

import os
from pathlib import Path

from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from tensordb.compat.tensorhub import TensorHub

TASK_NAME = "digits-mlp"


def main() -> float:
    db = TensorHub(project_name=os.environ.get("TENSORDB_PROJECT", "tensorlayer-example"))
    X, y = load_digits(return_X_y=True)
    X_train, X_rest, y_train, y_rest = train_test_split(X.astype("float32"), y, test_size=0.4, random_state=0)
    X_val, X_test, y_val, y_test = train_test_split(X_rest, y_rest, test_size=0.5, random_state=0)
    db.delete_datasets(dataset_name="digits")
    db.save_dataset((X_train, y_train, X_val, y_val, X_test, y_test), "digits", description="sklearn 8x8 digits")

    db.delete_tasks(task_name=TASK_NAME)
    script = str(Path(__file__).with_name("task_script.py"))
    for units in (800, 600, 400):
        db.create_task(task_name=TASK_NAME, script=script, hyper_parameters=dict(n_units1=units, n_units2=units),
                       saved_result_keys=["test_accuracy"], description=f"{units}-{units}")  # fmt: skip

    while db.check_unfinished_task(task_name=TASK_NAME):
        print("waiting for runners to finish the tasks")
        db.jobs.wait([job["_id"] for job in db.jobs.list(name=TASK_NAME)], timeout=600)

    for task in db.jobs.list(name=TASK_NAME):
        print(f"{task['description']}: {task['status']}, test_accuracy={(task['result'] or {}).get('test_accuracy')}")
    best = db.find_top_model(sort=[("test_accuracy", -1)], model_name="mlp")
    print(f"best model: n_units={best.tensordb_info['n_units1']}, version {best.tensordb_info['version']}, "
          f"test accuracy {best.tensordb_info['test_accuracy']:.3f}")  # fmt: skip
    _, accuracy = best.evaluate(X_test, y_test, verbose=0)
    db.close()
    return accuracy


if __name__ == "__main__":
    print(f"reloaded best model scores {main():.3f} on the test set")
