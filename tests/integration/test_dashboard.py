"""The dashboard's HTTP API against the real broker, mongod and processors: the access rules, the
live stream seam, runs and jobs, models, data, zoom. Its logic without servers is
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
