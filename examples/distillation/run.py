"""Model chaining on the bus: a teacher's predictions become a student's training data.

h3mlcore's actor network and Kafka-ML's deployed models, in one loop that runs by itself:

1. a *teacher* policy trains on 300 labelled digits (its trigger fires on its own);
2. `tensordb predictor --policy teacher` answers predict requests for 1,000 unlabelled digits,
   each request naming a stored sample, on the predictions topic;
3. the `pseudo-label` stage reads the teacher's predictions and derives, for each confident
   answer, a sample of dataset `pseudo-labelled` (the image, the teacher's class, its probabilities);
4. the *student* policy counts those derived samples and retrains by itself; its candidate is
   evaluated on real labels and promoted.

Run with the services, the processors, a worker and the teacher's predictor running (README.md here).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
from rich.console import Console
from sklearn.datasets import load_digits

from tensordb.client import TensorDB
from tensordb.config import Topic
from tensordb.loop.policies import Policies, Policy
from tensordb.loop.promotion import DECISIONS
from tensordb.records import Schema

LABELLED, VALIDATION = 300, 400
MODEL = {"entry_point": "tensordb.models.examples:digits_mlp"}
console = Console(width=110)


def image(x: np.ndarray, index: int) -> np.ndarray:
    return x[index].reshape(8, 8).astype(np.uint8)


def wait_for(what: str, condition: Any, timeout: float = 600.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}: are the processors, a worker and the teacher's predictor running?")
        time.sleep(0.5)
    return value


def main() -> int:
    x, y = load_digits(return_X_y=True)
    unlabelled = range(LABELLED, len(x) - VALIDATION)
    validation = {"filter": {"dataset": "digits-validation"}, "x": "image", "y": "digit"}
    with TensorDB() as db:
        policies = Policies(db.store)
        policies.register(Policy(name="teacher", model=MODEL, training={"filter": {"dataset": "digits"}, "x": "image", "y": "digit"},
                                 validation=validation, trigger={"every_samples": LABELLED}, epochs=40,
                                 hyperparameters={"batch_size": 16}))  # fmt: skip
        policies.register(Policy(name="student", model=MODEL, validation=validation, epochs=10,
                                 training={"filter": {"dataset": "pseudo-labelled"}, "x": "image", "y": "digit"},
                                 trigger={"every_samples": 500}))  # fmt: skip
        db.register_stage(name="pseudo-label", input={"predictions": {"model": "teacher"}},
                          function="tensordb.stages.examples:pseudo_label", output={"dataset": "pseudo-labelled"})  # fmt: skip
        db.publish_samples({"arrays": {"image": image(x, i)}, "labels": {"digit": int(y[i])}, "dataset": "digits-validation",
                            "sample_id": f"digit-{i}"} for i in range(len(x) - VALIDATION, len(x)))  # fmt: skip
        db.publish_samples({"arrays": {"image": image(x, i)}, "labels": {"digit": int(y[i])}, "dataset": "digits",
                            "sample_id": f"digit-{i}"} for i in range(LABELLED))  # fmt: skip
        console.print(f"published {LABELLED} labelled digits: the teacher's trigger fires")
        teacher = wait_for("the teacher's first production version", lambda: db.models.alias("teacher"))
        console.print(f"teacher v{teacher} is in production")
        db.publish_samples(
            {"arrays": {"image": image(x, i)}, "dataset": "unlabelled", "sample_id": f"digit-{i}"} for i in unlabelled
        )
        for i in unlabelled:
            request = {"schema": Schema.PREDICT_REQUEST, "request_id": f"teach-{i}", "model": "teacher",
                       "sample": {"id": f"digit-{i}", "x": "image"}}  # fmt: skip
            db.publisher.publish(Topic.PREDICT_REQUESTS, request, key=request["request_id"])
        db.flush()
        console.print(f"asked the teacher about {len(unlabelled)} unlabelled digits (predict requests naming stored samples)")
        student = wait_for("the student's first production version", lambda: db.models.alias("student"))
        derived = list(db.store["samples"].find({"dataset": "pseudo-labelled"}, {"labels.digit": 1, "lineage": 1}))
        truth = {f"digit-{i}": int(y[i]) for i in unlabelled}
        correct = sum(document["labels"]["digit"] == truth[document["lineage"]["derived_from"]] for document in derived)
        decision = db.store[DECISIONS].find_one({"policy": "student", "promoted": True})
        console.print(
            f"pseudo-labelled {len(derived)} digits ({correct / max(len(derived), 1):.1%} correct); the student retrained on them"
        )
        console.print(f"student v{student} in production: {decision['reason'] if decision else 'promoted'}")
        return 0 if derived and student else 1


if __name__ == "__main__":
    sys.exit(main())
