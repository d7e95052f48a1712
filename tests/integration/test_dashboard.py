"""The dashboard's HTTP API against the real broker, mongod and processors: the access rules, the
live stream seam, runs and jobs, models, data, zoom, studies. Its logic without servers is
tests/unit/test_dashboard.py; the browser, tests/e2e/test_dashboard_browser.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from dashboard.curves import OVERVIEW_POINTS
from streams.logs import log_document
from tensordb.config import Settings, Topic
from tensordb.infra.bus import Publisher
from tensordb.infra.store import Store
from tensordb.runs.logger import LOGS, RunLogger
from tensordb.testing import Dashboard, dashboard_process, free_port, wait_for

# -- helpers --------------------------------------------------------------------------------------------


@pytest.fixture
def start_dashboard(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., Dashboard]]:
    """Start ``tensordb dashboard`` processes for this test's project; all stopped afterwards."""
    started: list[Dashboard] = []

    def start(host: str = "127.0.0.1", token: str | None = None) -> Dashboard:
        port = free_port()
        process = dashboard_process(settings, tmp_path / f"dashboard-{len(started)}.log", port, host=host, token=token)
        process.start(timeout=60)
        dashboard = Dashboard(process, port, token)
        started.append(dashboard)
        return dashboard

    yield start
    for dashboard in started:
        dashboard.http.close()
        dashboard.process.stop()


def insert_points(
    store: Store, run_id: str, steps: np.ndarray, values: np.ndarray, phase: str = "train", start: float = 1.7e9
) -> None:
    """Log documents written the way the log sink writes them (for runs too long to log in a test)."""
    documents = [
        log_document(
            store.project,
            {
                "run_id": run_id,
                "phase": phase,
                "step": int(step),
                "wall_time": start + int(step) * 0.01,
                "metrics": {"loss": float(value)},
            },
        )
        for step, value in zip(steps, values, strict=True)
    ]
    for chunk in range(0, len(documents), 20_000):
        store[LOGS].insert_many(documents[chunk : chunk + 20_000], ordered=False)


def sse_events(response: httpx.Response) -> Iterator[tuple[str, Any]]:
    """(event, data) of a Server-Sent Events response, as they arrive."""
    event, data = "message", []
    for line in response.iter_lines():
        if line == "":
            if data:
                yield event, orjson.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


# -- the API against the real services ----------------------------------------------------------------


def test_a_token_is_required_on_every_request_when_bound_elsewhere(settings, start_dashboard) -> None:
    dashboard = start_dashboard(host="0.0.0.0", token="s3cret token; with=odd chars")
    plain = httpx.Client(base_url=dashboard.url, timeout=10)
    for path in ("/", "/api/runs", "/static/app.js", "/api/live?all=1"):
        refused = plain.get(path)
        assert refused.status_code == 401 and "token" in refused.text
    assert plain.get("/api/runs", headers={"X-TensorDB-Token": "wrong"}).status_code == 401
    assert plain.get("/api/runs", headers={"Authorization": "Bearer s3cret token; with=odd chars"}).status_code == 200
    assert plain.get("/api/runs", params={"token": "s3cret token"}).status_code == 401
    opened = plain.get("/", params={"token": "s3cret token; with=odd chars"}, follow_redirects=True)  # to the page without it
    assert (
        opened.status_code == 200
        and opened.url == f"{dashboard.url}/"
        and "script-src 'self'" in opened.headers["content-security-policy"]
    )
    signed_in = opened.history[0].headers["set-cookie"]
    assert "HttpOnly" in signed_in and "SameSite=Strict" in signed_in and "s3cret" not in signed_in
    assert plain.get("/static/app.js").status_code == 200  # the page's later requests carry the cookie
    plain.close()


def test_live_points_and_history_meet_without_gap_or_duplicate(settings, processors, start_dashboard) -> None:
    """Subscribe while a run logs, read the history once subscribed, merge by step: every step once."""
    dashboard = start_dashboard()
    total, run_id = 5000, "seam-run"

    def train() -> None:
        with Publisher(settings) as publisher, RunLogger(publisher, run_id) as logger:
            for step in range(total):
                logger.log(step, loss=1.0 / (step + 1))
                time.sleep(0.001)

    trainer = threading.Thread(target=train)
    trainer.start()
    steps: dict[int, float] = {}
    live_steps: list[int] = []
    history_steps: list[int] = []
    try:
        with Store(settings) as store:
            wait_for(lambda: store[LOGS].count_documents({"run_id": run_id}) > 100, what="the first points persisted")
        with dashboard.http.stream("GET", "/api/live", params={"run": run_id}, timeout=60) as response:
            for event, data in sse_events(response):
                if event == "ready":
                    history = dashboard.get("/api/run", id=run_id)
                    assert history["phases"]["train"]["full"]
                    chart = history["charts"]["loss"]
                    history_steps = chart["x"]
                    steps.update(zip(chart["x"], chart["y"]["train"], strict=True))
                elif event == "points":
                    for item in data:
                        assert item["run"] == run_id
                        for phase, step, _, metrics in item["points"]:
                            live_steps.append(step)
                            steps.setdefault(step, metrics["loss"])
                if len(steps) == total:
                    break
    finally:
        trainer.join()
    assert sorted(steps) == list(range(total))
    assert all(steps[step] == 1.0 / (step + 1) for step in steps)
    assert history_steps and live_steps and max(history_steps) < total - 1  # both sides of the seam were used
    assert min(live_steps) <= max(history_steps) + 1  # the live side starts at or before the history's end


def test_runs_jobs_models_and_data_as_the_pages_show_them(settings, start_dashboard, ingest) -> None:
    from tensordb.data.cohorts import Cohort, save_cohort
    from tensordb.infra.dead_letters import DeadLetters
    from tensordb.jobs.queue import Jobs
    from tensordb.loop.policies import Policies, Policy
    from tensordb.loop.promotion import DECISIONS, EVALUATIONS
    from tensordb.models.registry import ModelRegistry

    dashboard = start_dashboard()
    now = datetime.now(UTC)
    with Store(settings) as store, Publisher(settings) as publisher:
        job_id = Jobs(store, publisher).submit(
            "train", name="digits-mlp", policy="digits", model={"entry_point": "tests.m:f"}, data={"filter": {}}
        )
        insert_points(store, job_id, np.arange(10), np.linspace(1, 0.1, 10))
        Policies(store).register(
            Policy(
                name="digits",
                model={"entry_point": "tests.m:f"},
                training={"filter": {"dataset": "d"}},
                validation={"filter": {"dataset": "v"}},
            )
        )
        for version in (1, 2):
            store["models"].insert_one({"project": store.project, "name": "digits", "version": version, "time": now, "epoch": 3, "job_id": job_id,
                                        "metrics": {"accuracy": 0.8 + version / 100}, "tags": {}, "parameters": {"nbytes": 1234}})  # fmt: skip
            store[EVALUATIONS].insert_one({"_id": f"eval:{version}", "project": store.project, "policy": "digits", "model": "digits", "version": version,
                                           "job_id": "eval-job", "metrics": {"accuracy": [0.8, 0.9][version - 1]}, "at": now})  # fmt: skip
        ModelRegistry(store).promote("digits", 2, reason={"reason": "v2 beats v1"}, policy="digits")
        store[DECISIONS].insert_one({"_id": "eval-job", "project": store.project, "policy": "digits", "candidate": {"version": 2, "accuracy": 0.9},
                                     "production": {"version": 1, "accuracy": 0.8}, "metric": "accuracy", "direction": "max", "margin": 0.0,
                                     "promoted": True, "reason": "promoted: candidate v2 accuracy 0.9000 vs production v1 0.8000", "at": now})  # fmt: skip
        ingest([{"schema": "sample/1", "dataset": "scans", "sample_id": f"s{i}", "labels": {"y": i % 2},
                 "arrays": {"x": {"dtype": "int16", "shape": [2], "values": [i, -i]}}} for i in range(30)])  # fmt: skip
        save_cohort(Cohort(store, filter={"labels.y": 1}, limit=10), "positives", description="<b>not bold</b>")
        from tensordb.errors import SampleError
        from tensordb.infra.bus import Received

        DeadLetters(store, publisher, "streams").divert(
            Received(settings.topic(Topic.INGEST), 0, 30, None, b'{"dataset": null}', None, None),
            SampleError("dataset must be a string"),
        )

    def listed_runs() -> dict[str, dict] | None:  # the runs list is cached for a second, shared by browsers
        runs = {run["run_id"]: run for run in dashboard.get("/api/runs")["runs"]}
        return runs if job_id in runs else None

    run = wait_for(listed_runs, timeout=10, what="the run in /api/runs")[job_id]
    assert run["job"]["status"] == "pending" and run["job"]["policy"] == "digits" and run["job"]["attempts"] == 0
    assert run["points"] == 10 and run["phases"]["train"]["last_step"] == 9 and run["metrics"] == ["loss"]
    assert dashboard.get("/api/job", id=job_id)["name"] == "digits-mlp"

    (model,) = dashboard.get("/api/models")["models"]
    assert model["name"] == "digits" and model["production"] == 2 and model["policy"]["objective"]["metric"] == "accuracy"
    assert [(v["version"], v["production"], v["evaluations"][0]["metrics"]["accuracy"]) for v in model["versions"]] == [
        (2, True, 0.9),
        (1, False, 0.8),
    ]
    assert model["decisions"][0]["promoted"] and "v2 accuracy 0.9000" in model["decisions"][0]["reason"]
    assert model["aliases"]["production"]["history"][0]["reason"] == {"reason": "v2 beats v1"}

    data = dashboard.get("/api/data")
    (scans,) = data["datasets"]
    assert scans["name"] == "scans" and scans["samples"] == 30 and scans["per_second_last_minute"] == pytest.approx(0.5)
    (cohort,) = data["cohorts"]
    assert cohort["name"] == "positives" and cohort["samples"] == 10 and cohort["description"] == "<b>not bold</b>"
    assert sum(data["imported"]["count"]) == 30
    (progress,) = data["progress"]
    assert progress["kind"] == "ingest" and progress["valid"] == 30 and progress["invalid"] == 0  # the ingest fixture's batch

    letters = dashboard.get("/api/dead-letters")
    assert letters["total"] == 1 and letters["letters"][0]["reason"] == "dataset must be a string"
    assert letters["letters"][0]["original_preview"] == '{"dataset": null}'


def test_a_long_run_is_an_overview_and_a_zoom_is_full_resolution(settings, start_dashboard) -> None:
    steps = np.arange(60_000)
    values = np.exp(-steps / 20_000)
    values[12_345] = 50.0  # a spike: min/max downsampling keeps it
    with Store(settings) as store:
        for run_id, scale in (("long-a", 1.0), ("long-b", 2.0), ("short", 3.0)):
            insert_points(
                store,
                run_id,
                steps if run_id != "short" else steps[:500],
                (values * scale)[: 60_000 if run_id != "short" else 500],
            )
    dashboard = start_dashboard()

    def exact() -> dict[str, Any]:
        run = dashboard.get("/api/run", id="long-a")
        return run if run["phases"]["train"]["exact"] else {}

    overview = wait_for(exact, timeout=30, what="the exact overview (built in the background after a sample)")
    assert not overview["full"] and overview["phases"]["train"]["count"] == 60_000
    chart = overview["charts"]["loss"]
    assert len(chart["x"]) <= OVERVIEW_POINTS and 50.0 in chart["y"]["train"]

    zoomed = dashboard.get("/api/run", id="long-a", lo=12_000, hi=12_999)
    assert zoomed["charts"]["loss"]["x"] == list(range(12_000, 13_000))
    assert zoomed["charts"]["loss"]["y"]["train"] == pytest.approx(values[12_000:13_000].tolist())

    def compared_exactly() -> dict[str, Any]:
        compared = dashboard.get("/api/compare", run=["long-a", "long-b", "short", "missing"], metric="loss")
        return compared if compared["exact"] else {}

    compared = wait_for(compared_exactly, timeout=30, what="exact overviews of every run")
    assert len(compared["x"]) <= OVERVIEW_POINTS and set(compared["y"]) == {"long-a", "long-b", "short", "missing"}
    assert max(v for v in compared["y"]["long-b"] if v is not None) == 100.0 and compared["empty"] == ["missing"]
    close = dashboard.get("/api/compare", run=["long-a", "long-b"], metric="loss", lo=100, hi=299)
    assert close["x"] == list(range(100, 300)) and set(close["raw"]) == {"long-a", "long-b"}
    by_time = dashboard.get("/api/compare", run=["long-a", "short"], metric="loss", x="relative")
    assert by_time["x"][0] == 0.0 and by_time["axis"] == "relative"


# -- studies ---------------------------------------------------------------------------------------------


def merged(answers: list[dict[str, Any]]) -> dict[str, dict[Any, list[Any]]]:
    """What a page holds after merging answers in order, as the front end does (a trial by its id, a
    configuration by its number, a verdict by its configuration and rung)."""
    held: dict[str, dict[Any, list[Any]]] = {"trials": {}, "configurations": {}, "decisions": {}}
    for answer in answers:
        for table, rows in held.items():
            if answer["full"]:
                rows.clear()
            rows.update((tuple(row[:2]) if table == "decisions" else row[0], row) for row in answer[table]["rows"])
    return held


def test_a_running_study_as_the_study_page_follows_it(settings, processors, start_worker, start_dashboard) -> None:
    """Polled while it runs, with since= each time: the merged answers equal a whole answer at the
    end, which agrees with the SDK on trials, curves, objectives per rung, verdicts and the best."""
    from tensordb.client import TensorDB

    start_worker()
    start_worker()
    dashboard = start_dashboard()
    with TensorDB(settings) as db:
        study = db.create_study(
            name="followed", model={"epoch_function": "tensordb.testing.synthetic:learning_curve"},
            objective={"metric": "accuracy", "direction": "max"}, space={"x": {"choice": [0.2, 0.4, 1.5, 1.6]}},
            searcher={"name": "asha", "sampler": "grid", "min_epochs": 1, "max_epochs": 4, "reduction_factor": 2},
            hyperparameters={"seconds": 0.3}, max_concurrent=2,
        )  # fmt: skip
        answers = [dashboard.get("/api/study", name="followed")]
        while answers[-1]["status"] == "running":
            time.sleep(0.3)
            answers.append(dashboard.get("/api/study", name="followed", since=answers[-1]["version"]))
            assert len(answers) < 1000, "the study did not end"
        trials, rows, verdicts = study.trials(), study.configurations(), study.decisions()
        best = study.best()
    whole = dashboard.get("/api/study", name="followed")
    assert whole["full"] and merged(answers) == merged([whole])
    assert sum(not answer["full"] for answer in answers) == len(answers) - 1  # only the first was whole
    assert any(0 < len(answer["trials"]["rows"]) < answer["trial_count"] for answer in answers[1:])  # the running ones
    assert dashboard.get("/api/study", name="followed", since=answers[-1]["version"])["trials"]["rows"] == []  # ended: no change
    assert [a["name"] for a in whole["parameters"]] == ["x"] and whole["searcher"]["rungs"] == [1, 2]
    assert whole["counts"] == {"finished": 2, "stopped": 2} and whole["trial_count"] == 4
    assert whole["best"]["configuration"] == best["configuration"] and whole["best"]["objective"] == best["objective"]

    got = [dict(zip(whole["trials"]["columns"], row, strict=True)) for row in whole["trials"]["rows"]]
    assert [t["id"] for t in got] == [t["_id"] for t in trials]
    for row, trial in zip(got, trials, strict=True):
        curve = [trial["curve"][str(epoch)] for epoch in range(len(trial["curve"]))]
        assert row["curve"] == curve and row["status"] == trial["status"] and row["job_status"] == trial["job_status"]
        assert row["at_rungs"] == [curve[epochs - 1] if epochs <= len(curve) else None for epochs in (1, 2)]
        assert row["hyperparameters"] == [trial["hyperparameters"]["x"]] and row["objective"] == trial["objective"]
        assert (row["rung"], row["stopped_at_rung"]) == (trial["rung"], trial["stopped_at_rung"])
    configurations = [dict(zip(whole["configurations"]["columns"], r, strict=True)) for r in whole["configurations"]["rows"]]
    assert [(c["configuration"], c["status"], c["objective"]) for c in configurations] == [
        (r["configuration"], r["status"], r["objective"]) for r in rows
    ]
    decisions = [dict(zip(whole["decisions"]["columns"], r, strict=True)) for r in whole["decisions"]["rows"]]
    assert [(d["configuration"], d["rung"], d["action"], d["value"], d["cutoff"]) for d in decisions] == [
        (d["configuration"], d["rung"], d["action"], d["value"], d["cutoff"]) for d in verdicts
    ]

    (listed,) = dashboard.get("/api/studies")["studies"]
    assert listed["name"] == "followed" and listed["status"] == "finished" and listed["searcher"]["name"] == "asha"
    assert listed["trials"] == 4 and listed["counts"] == {"finished": 2, "stopped": 2}
    assert listed["best_objective"] == best["objective"] and listed["best_configuration"] == best["configuration"]

    missing = dashboard.http.get("/api/study", params={"name": "nope"})
    assert missing.status_code == 404 and "no study 'nope'" in missing.json()["detail"]


def test_a_study_of_a_thousand_trials_answers_quickly_compactly_and_then_only_with_changes(
    settings, start_dashboard, capsys
) -> None:
    from tensordb.studies.scheduler import TRIALS
    from tensordb.testing import insert_study

    with Store(settings) as store:
        insert_study(store, "thousand", trials=1000, epochs=27, asha=False)  # every trial trains 27 epochs: the largest answer
        insert_study(store, "thousand-asha", trials=1000, epochs=27)
        dashboard = start_dashboard()
        timings = {}
        for name in ("thousand", "thousand-asha"):
            dashboard.get("/api/study", name=name)  # a first read warms the connection pool and caches
            started = time.perf_counter()
            response = dashboard.http.get("/api/study", params={"name": name})
            timings[name] = (time.perf_counter() - started, len(response.content))
            answer = response.json()
            assert len(answer["trials"]["rows"]) == 1000 and len(answer["configurations"]["rows"]) == 1000
        seconds, size = timings["thousand"]
        assert seconds < 2.0 and size < 1_000_000, timings  # ~27,000 curve values: about 20 bytes each, once
        assert timings["thousand-asha"][1] < 600_000, timings  # most ASHA trials stopped after an epoch or three

        version = answer["version"]
        unchanged = dashboard.http.get("/api/study", params={"name": "thousand-asha", "since": version})
        assert unchanged.json()["trials"]["rows"] == [] and len(unchanged.content) < 5_000
        store[TRIALS].update_one({"_id": "trial-thousand-asha-0007"}, {"$set": {"curve.26": 0.99}})
        changed = dashboard.get("/api/study", name="thousand-asha", since=version)
        assert [row[0] for row in changed["trials"]["rows"]] == ["trial-thousand-asha-0007"]
        assert [row[0] for row in changed["configurations"]["rows"]] == [7] and changed["decisions"]["rows"] == []
        started = time.perf_counter()
        listed = dashboard.get("/api/studies")["studies"]
        listing = time.perf_counter() - started
    assert {s["name"]: s["trials"] for s in listed} == {"thousand": 1000, "thousand-asha": 1000}
    with capsys.disabled():
        print(
            f"\n/api/study of 1,000 trials: {timings['thousand'][0] * 1000:.0f} ms, {timings['thousand'][1] / 1000:.0f} kB "
            f"(all 27 epochs); {timings['thousand-asha'][0] * 1000:.0f} ms, {timings['thousand-asha'][1] / 1000:.0f} kB (ASHA); "
            f"since= unchanged {len(unchanged.content)} B; /api/studies {listing * 1000:.0f} ms"
        )
