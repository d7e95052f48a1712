"""The dashboard's actions against the real broker and mongod and ``tensordb dashboard`` itself: each
changes what it says (and a GET changes nothing), each is refused without the token, with a forged
CSRF token or from another origin, and "try a model" answers real Keras versions side by side.
The domain operations behind them: tests/integration/test_person_actions.py; the browser:
tests/e2e/test_dashboard_actions.py."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np
import pytest

from tensordb.config import Settings
from tensordb.infra.bus import Publisher
from tensordb.infra.store import Store
from tensordb.jobs.queue import Jobs
from tensordb.loop.policies import Policies, Policy
from tensordb.loop.promotion import DECISIONS
from tensordb.models.registry import ModelRegistry
from tensordb.stages.stages import Stages
from tests.integration.test_dashboard import start_dashboard  # noqa: F401 - the fixture

TOKEN = "act10n t0ken; with=odd chars"


def seed(settings: Settings) -> dict[str, Any]:
    """A pending job, a policy with three stored versions (v1 in production), a stage and a running
    study whose trials wait for a worker; returns the job's id."""
    from tensordb.client import TensorDB

    now = datetime.now(UTC)
    with Store(settings) as store, Publisher(settings) as publisher:
        job_id = Jobs(store, publisher).submit("train", name="digits", model={"entry_point": "tests.m:f"}, data={"filter": {}})
        Policies(store).register(
            Policy(name="digits", model={"entry_point": "tests.m:f"}, training={"filter": {"dataset": "d"}},
                   validation={"filter": {"dataset": "v"}})
        )  # fmt: skip
        for version in (1, 2, 3):
            store["models"].insert_one({"project": store.project, "name": "digits", "version": version, "time": now, "metrics": {},
                                        "tags": {}, "parameters": {"nbytes": 1}})  # fmt: skip
        ModelRegistry(store).promote("digits", 1, reason={"reason": "first"}, policy="digits")
        Stages(store).register(
            {"name": "halve", "input": {"filter": {"dataset": "raw"}}, "function": "tensordb.testing.stages:halve",
             "output": {"dataset": "halved"}}
        )  # fmt: skip
    with TensorDB(settings) as db:
        db.create_study(
            name="waiting", model={"epoch_function": "tensordb.testing.synthetic:learning_curve"},
            objective={"metric": "accuracy", "direction": "max"}, space={"x": {"choice": [0.2, 0.4]}}, searcher={"name": "grid"},
        )  # fmt: skip
    return {"job": job_id}


def state(settings: Settings, job_id: str) -> dict[str, Any]:
    with Store(settings) as store:
        return {
            "job": store["jobs"].find_one({"_id": job_id}, {"status": 1})["status"],
            "policy": store["policies"].find_one({"_id": "digits"})["paused"],
            "stage": store["stages"].find_one({"_id": "halve"})["paused"],
            "production": ModelRegistry(store).alias("digits"),
            "study": store["studies"].find_one({"_id": "waiting"})["status"],
            "decisions": store[DECISIONS].count_documents({}),
        }


ACTIONS: list[tuple[str, dict[str, Any]]] = [
    ("/api/jobs/cancel", {"job_id": "JOB"}),
    ("/api/jobs/retry", {"job_id": "JOB"}),
    ("/api/policies/pause", {"name": "digits"}),
    ("/api/policies/resume", {"name": "digits"}),
    ("/api/stages/pause", {"name": "halve"}),
    ("/api/stages/resume", {"name": "halve"}),
    ("/api/models/promote", {"model": "digits", "version": 2, "reason": "r"}),
    ("/api/models/rollback", {"model": "digits"}),
    ("/api/studies/stop", {"name": "waiting"}),
    ("/api/try", {"model": "digits", "instances": [[1]]}),
]


def body_of(body: dict[str, Any], job_id: str) -> dict[str, Any]:
    return {key: job_id if value == "JOB" else value for key, value in body.items()}


def test_each_action_does_what_it_says_and_a_get_changes_nothing(settings, start_dashboard) -> None:  # noqa: F811
    job_id = seed(settings)["job"]
    dashboard = start_dashboard()
    before = state(settings, job_id)
    assert before == {"job": "pending", "policy": False, "stage": False, "production": 1, "study": "running", "decisions": 0}
    for path, _ in ACTIONS:
        assert dashboard.http.get(path).status_code == 405, path  # actions are POSTs only
    assert state(settings, job_id) == before

    def ok(path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = dashboard.post(path, body)
        assert response.status_code == 200, (path, response.text)
        return dict(response.json())

    def refused(path: str, body: dict[str, Any], status: int, words: str) -> None:
        response = dashboard.post(path, body)
        assert response.status_code == status and words in response.json()["detail"], (path, response.text)

    assert ok("/api/jobs/cancel", {"job_id": job_id})["job"]["status"] == "cancelled"
    refused("/api/jobs/cancel", {"job_id": "nope"}, 404, "no job 'nope'")
    retried = ok("/api/jobs/retry", {"job_id": job_id})["job"]
    assert retried["status"] == "pending" and retried["retries"] == 1 and retried["attempts"] == 0
    refused("/api/jobs/retry", {"job_id": job_id}, 409, "is pending: only failed or cancelled jobs can be retried")
    assert ok("/api/policies/pause", {"name": "digits"}) == {"policy": "digits", "paused": True}
    assert state(settings, job_id)["policy"] is True
    assert ok("/api/policies/resume", {"name": "digits"})["paused"] is False
    refused("/api/policies/pause", {"name": "nope"}, 404, "no policy 'nope'")
    assert ok("/api/stages/pause", {"name": "halve"}) == {"stage": "halve", "paused": True}
    assert state(settings, job_id)["stage"] is True
    assert ok("/api/stages/resume", {"name": "halve"})["paused"] is False
    refused("/api/stages/resume", {"name": "nope"}, 404, "no stage 'nope'")

    promoted = ok("/api/models/promote", {"model": "digits", "version": 3, "reason": "v3 looks better on <b>new</b> data"})[
        "decision"
    ]
    assert (promoted["by"], promoted["who"], promoted["previous_version"], promoted["version"]) == ("person", "dashboard", 1, 3)
    refused("/api/models/promote", {"model": "digits", "version": 3}, 409, "is production already")
    refused("/api/models/promote", {"model": "digits", "version": 9}, 404, "no version 9")
    rolled = ok("/api/models/rollback", {"model": "digits", "reason": "v3 misbehaves"})["decision"]
    assert (rolled["action"], rolled["previous_version"], rolled["version"], rolled["given_reason"]) == (
        "roll back",
        3,
        1,
        "v3 misbehaves",
    )
    refused("/api/models/rollback", {"model": "digits"}, 409, "nothing to roll back to")
    (model,) = dashboard.get("/api/models")["models"]
    assert model["production"] == 1
    assert [(d["by"], d["action"], d["given_reason"]) for d in model["decisions"]] == [
        ("person", "roll back", "v3 misbehaves"), ("person", "promote", "v3 looks better on <b>new</b> data"),
    ]  # fmt: skip

    assert ok("/api/studies/stop", {"name": "waiting"}) == {"study": "waiting", "status": "stopped"}
    with Store(settings) as store:
        assert {job["status"] for job in store["jobs"].find({"labels.study": "waiting"})} == {"cancelled"}
        trial = store["jobs"].find_one({"labels.study": "waiting"})["_id"]
    refused("/api/jobs/retry", {"job_id": trial}, 409, "is a trial of study 'waiting'")
    refused("/api/studies/stop", {"name": "nope"}, 404, "no study 'nope'")

    invalid = dashboard.post("/api/models/promote", {"model": "digits", "version": "three", "extra": 1})
    assert invalid.status_code == 422 and {tuple(e["loc"]) for e in invalid.json()["detail"]} == {
        ("body", "version"),
        ("body", "extra"),
    }
    stages = dashboard.get("/api/data")["stages"]
    assert [(s["name"], s["version"], s["output"]["dataset"], s["paused"], s["lag"]) for s in stages] == [
        ("halve", 1, "halved", False, 0)
    ]
    assert state(settings, job_id) == {**before, "study": "stopped", "decisions": 2}


def test_actions_are_refused_without_the_token_with_a_forged_csrf_token_or_from_another_origin(settings, start_dashboard) -> None:  # noqa: F811
    job_id = seed(settings)["job"]
    dashboard = start_dashboard(host="0.0.0.0", token=TOKEN)
    before = state(settings, job_id)
    browser = httpx.Client(base_url=dashboard.url, timeout=30)  # a browser: signs in with ?token=, then holds a cookie
    try:
        for path, body in ACTIONS:
            assert browser.post(path, json=body_of(body, job_id)).status_code == 401, path
        browser.get("/", params={"token": TOKEN})
        token = browser.get("/api/csrf").json()["csrf_token"]
        origin = {"Origin": dashboard.url}
        for path, body in ACTIONS:
            sent = body_of(body, job_id)
            for headers, words in (
                (origin, "X-CSRF-Token header is missing"),
                ({**origin, "X-CSRF-Token": "f" * 64}, "wrong X-CSRF-Token"),
                ({"X-CSRF-Token": token, "Origin": "http://evil.example"}, "cross-site request refused"),
                (
                    {"X-CSRF-Token": token, "Origin": dashboard.url.replace(str(dashboard.url.rsplit(":", 1)[1]), "1")},
                    "cross-site",
                ),
                ({"X-CSRF-Token": token, "Origin": "null"}, "cross-site request refused"),
                ({"X-CSRF-Token": token, "Referer": "http://evil.example/form.html"}, "Referer"),
            ):
                response = browser.post(path, json=sent, headers=headers)
                assert response.status_code == 403 and response.json()["error"] == "csrf", (path, headers, response.text)
                assert words in response.json()["detail"], (path, response.text)
        assert state(settings, job_id) == before  # nothing changed
        done = browser.post("/api/jobs/cancel", json={"job_id": job_id}, headers={**origin, "X-CSRF-Token": token})
        assert done.status_code == 200 and done.json()["job"]["status"] == "cancelled"
        by_program = dashboard.http.post(
            "/api/jobs/retry", json={"job_id": job_id}
        )  # the token in a header: no CSRF token needed
        assert by_program.status_code == 200 and by_program.json()["job"]["status"] == "pending"
    finally:
        browser.close()
    loopback = start_dashboard()  # no token: the CSRF check still applies
    refused = loopback.http.post("/api/jobs/cancel", json={"job_id": job_id})
    assert refused.status_code == 403 and refused.json()["error"] == "csrf"
    assert loopback.post("/api/jobs/cancel", {"job_id": job_id}).json()["job"]["status"] == "cancelled"


@pytest.fixture
def two_versions(settings: Settings, ingest) -> list[Any]:
    """Two small classifiers of 8×8 images saved as v1 (production) and v2 of "digits", 20 image
    samples and a saved cohort "images" of them; the models."""
    import keras

    from tensordb.data.cohorts import Cohort, save_cohort
    from tensordb.testing import image_samples
    from tensordb.testing.models import small_classifier

    ingest(image_samples(20))
    models = []
    with Store(settings) as store:
        registry = ModelRegistry(store)
        for seed_value in (1, 2):
            keras.utils.set_random_seed(seed_value)
            model = small_classifier(units=4)
            registry.save(model, "digits", builder="tensordb.testing.models:small_classifier", builder_kwargs={"units": 4})
            models.append(model)
        registry.promote("digits", 1)
        save_cohort(Cohort(store, filter={"dataset": "train"}, x="x", y="y"), "images")
    return models


def test_try_a_model_answers_versions_side_by_side_and_checks_inputs(settings, start_dashboard, two_versions) -> None:  # noqa: F811
    from tensordb.data.cohorts import load_cohort

    dashboard = start_dashboard()
    answer = dashboard.post("/api/try", {"model": "digits", "versions": [2], "cohort": {"name": "images"}, "samples": 5})
    assert answer.status_code == 200, answer.text
    tried = answer.json()
    assert tried["production"] == 1 and [(v["version"], v["production"]) for v in tried["versions"]] == [(1, True), (2, False)]
    with Store(settings) as store:
        cohort = load_cohort(store, "images")
        ids = cohort.ids()[:5]
        (x, y), *_ = list(cohort.stream(5))
    assert [s["id"] for s in tried["samples"]] == ids and [s["label"] for s in tried["samples"]] == y.tolist()
    for version, model in zip(tried["versions"], two_versions, strict=True):
        expected = model.predict_on_batch(x.astype("float32"))
        assert np.allclose(version["predictions"], expected, atol=1e-5) and version["classes"] == expected.argmax(axis=1).tolist()

    pasted = dashboard.post("/api/try", {"model": "digits", "instances": [x[0].tolist(), x[1].tolist()], "production": True})
    assert (
        pasted.status_code == 200 and pasted.json()["samples"] is None and len(pasted.json()["versions"][0]["predictions"]) == 2
    )
    by_query = dashboard.post("/api/try", {"model": "digits", "versions": [2], "production": False,
                                           "cohort": {"filter": {"labels.y": 1}, "x": "x", "y": "y"}, "samples": 3})  # fmt: skip
    assert by_query.status_code == 200 and {s["label"] for s in by_query.json()["samples"]} == {1}
    assert [v["version"] for v in by_query.json()["versions"]] == [2]

    def refused(body: dict[str, Any], status: int, words: str) -> None:
        response = dashboard.post("/api/try", body)
        assert response.status_code == status and words in response.text, response.text

    refused({"model": "digits", "instances": [[1, 2, 3]]}, 422, "each instance must have shape [8, 8]")
    refused({"model": "digits", "instances": [[[0] * 8] * 8] * 65}, 422, "instances")
    refused({"model": "digits", "cohort": {"name": "images"}, "samples": 65}, 422, "samples")
    refused({"model": "digits", "cohort": {"name": "images"}, "instances": [[1]]}, 422, "not both")
    refused({"model": "digits", "versions": [7], "instances": [[1]]}, 404, "no version 7")
    refused({"model": "other", "instances": [[1]]}, 422, "no production version yet")
    refused({"model": "digits", "cohort": {"name": "nope"}}, 422, "no cohort named 'nope'")
    refused({"model": "digits", "cohort": {"filter": {"dataset": "none"}}}, 422, "has no samples")
    refused({"model": "digits", "cohort": {"filter": {"$where": "1"}}}, 422, "server-side JavaScript")
