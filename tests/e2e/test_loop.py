"""The continuous-learning loop end to end against the real broker, mongod, processors, a worker
and the model server: data triggers training, evaluation mines the best model, the server swaps."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
from sklearn.datasets import load_digits

from tensordb.client import TensorDB
from tensordb.jobs.queue import Jobs
from tensordb.loop.policies import Policies, Policy
from tensordb.loop.promotion import DECISIONS
from tensordb.testing import free_port, server_process, wait_for

DIGITS_X, DIGITS_Y = load_digits(return_X_y=True)
GOOD = {"units": 64, "classes": 10, "scale": 1 / 16, "learning_rate": 0.01}
BAD = {"units": 2, "classes": 10, "scale": 1 / 16, "learning_rate": 1e-5}


def publish(db: TensorDB, dataset: str, indexes: range) -> None:
    db.publish_samples(
        {
            "arrays": DIGITS_X[i].reshape(8, 8).astype(np.uint8),
            "labels": int(DIGITS_Y[i]),
            "dataset": dataset,
            "sample_id": f"{dataset}-{i}",
        }
        for i in indexes
    )


def train_jobs(jobs: Jobs) -> list[dict]:
    return jobs.list(kind="train", policy="digits")


def decisions(db: TensorDB) -> list[dict]:
    return list(db.store[DECISIONS].find({"policy": "digits"}).sort("at", 1))


def test_new_data_retrains_evaluates_promotes_and_the_server_swaps(settings, processors, start_worker, tmp_path) -> None:
    with TensorDB(settings) as db:
        jobs, policies = db.jobs, Policies(db.store)
        policies.register(Policy(
            name="digits", model={"entry_point": "tensordb.testing.models:small_classifier"},
            training={"filter": {"dataset": "digits"}}, validation={"filter": {"dataset": "digits-validation"}},
            trigger={"every_samples": 100}, objective={"metric": "accuracy", "direction": "max"},
            promotion={"margin": 0.0}, epochs=2, hyperparameters={**GOOD, "learning_rate": 0.001},
        ))  # fmt: skip
        publish(db, "digits-validation", range(1400, 1797))  # another dataset: never counts as training data

        # one threshold crossing -> one job (no worker yet, so it stays pending)
        publish(db, "digits", range(0, 100))
        wait_for(lambda: len(train_jobs(jobs)) == 1, timeout=60, what="the first train job")
        # a burst while it is pending, plus redelivered duplicates: absorbed, no second job
        publish(db, "digits", range(100, 350))
        publish(db, "digits", range(0, 100))
        wait_for(lambda: db.store["samples"].count_documents({"dataset": "digits"}) == 350, what="the burst persisted")
        wait_for(lambda: policies.document("digits")["samples_counted"] == 350, timeout=30, what="the burst counted")
        assert len(train_jobs(jobs)) == 1 and policies.document("digits")["triggers"] == 1

        start_worker()
        first = wait_for(lambda: decisions(db), timeout=180, what="the first decision")[0]
        assert first["promoted"] and first["production"]["version"] is None
        production = first["candidate"]["version"]
        assert db.models.alias("digits", "production") == production

        port = free_port()
        server = server_process(settings, tmp_path / "server.log", "digits", port)
        server.start()
        try:
            base = f"http://127.0.0.1:{port}"
            assert httpx.get(f"{base}/model").json()["version"] == production
            bad = httpx.post(f"{base}/predict", json={"instances": [[1, 2, 3]]})
            assert bad.status_code == 422 and "shape [8, 8]" in bad.text

            # a worse candidate is evaluated but not promoted
            policies.change("digits", hyperparameters=BAD, epochs=1)
            publish(db, "digits", range(350, 450))
            second = wait_for(lambda: decisions(db)[1:], timeout=180, what="the second decision")[0]
            assert not second["promoted"] and "kept production" in second["reason"]
            assert second["candidate"]["accuracy"] <= second["production"]["accuracy"]
            assert db.models.alias("digits", "production") == production

            # a better one is promoted while requests keep flowing, and none of them fails
            failures, served = [], []
            stop = threading.Event()

            def steady_requests() -> None:
                with httpx.Client(base_url=base, timeout=10) as client:
                    while not stop.is_set():
                        response = client.post("/predict", json={"instances": DIGITS_X[1400:1408].reshape(8, 8, 8).tolist()})
                        (served if response.status_code == 200 else failures).append(response)

            requests = threading.Thread(target=steady_requests)
            requests.start()
            try:
                policies.change("digits", hyperparameters=GOOD, epochs=12)
                publish(db, "digits", range(450, 1400))
                third = wait_for(lambda: decisions(db)[2:], timeout=240, what="the third decision")[0]
                assert third["promoted"], third["reason"]
                wait_for(
                    lambda: httpx.get(f"{base}/model").json()["version"] == third["candidate"]["version"],
                    timeout=30,
                    what="the swap",
                )
                time.sleep(1)
            finally:
                stop.set()
                requests.join()
            assert not failures, failures[:3]
            versions_served = [response.json()["version"] for response in served]
            assert production in versions_served and third["candidate"]["version"] in versions_served
        finally:
            server.stop()

        # the production version is the best evaluated by the objective; every decision says why
        scores = {doc["version"]: doc["metrics"]["accuracy"] for doc in db.store["evaluations"].find({"policy": "digits"})}
        assert max(scores, key=scores.get) == db.models.alias("digits", "production")
        assert len(train_jobs(jobs)) == 3
        assert all("accuracy" in decision["reason"] for decision in decisions(db))
