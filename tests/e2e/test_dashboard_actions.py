"""Acting from the dashboard in a real browser: Debian's headless Chromium driven by Playwright
against the real broker, mongod, stream processors, a trainer worker and ``tensordb dashboard``.
Screenshots land in test-output/dashboard/ (actions-*.png).

Clicked through: cancelling a job a worker is running and retrying it (its page, the runs table);
promoting a version trained by the worker and rolling production back, each with a reason and a
confirmation; pausing and resuming a policy and a stage; stopping a running study; trying a model on
a cohort's samples and on pasted JSON. A form posted to the dashboard from a page of another origin
is refused and changes nothing.
"""

# ruff: noqa: F811 - the browser fixtures are imported from the other browser tests, then requested by name
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest

from tensordb.config import Settings, Topic
from tensordb.data.cohorts import Cohort, save_cohort
from tensordb.data.samples import SAMPLES
from tensordb.infra.bus import Publisher
from tensordb.infra.store import Store
from tensordb.jobs.queue import Jobs
from tensordb.loop.policies import Policies, Policy
from tensordb.models.registry import ModelRegistry
from tensordb.stages.stages import Stages
from tensordb.testing import (
    Dashboard,
    dashboard_process,
    free_port,
    fresh_project,
    image_samples,
    processors_process,
    wait_for,
    worker_process,
)
from tests.e2e.test_dashboard_browser import browser, tab  # noqa: F401 - fixtures

MODEL = "tensordb.testing.models:small_classifier"


@dataclass
class Stack:
    settings: Settings
    dashboard: Dashboard


@pytest.fixture(scope="module")
def stack(servers: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One project with its processors, a worker, a dashboard and 320 image samples (a saved cohort
    "images" of them) for the whole module; everything stopped afterwards."""
    folder = tmp_path_factory.mktemp("dashboard-actions")
    with fresh_project(servers) as settings:
        processors = processors_process(settings, folder / "processors.log")
        worker = worker_process(settings, folder / "worker.log")
        port = free_port()
        dashboard = dashboard_process(settings, folder / "dashboard.log", port)
        try:
            processors.start()
            worker.start()
            dashboard.start()
            with Store(settings) as store, Publisher(settings) as publisher:
                for record in image_samples(320):
                    publisher.publish(Topic.INGEST, record, key=record["sample_id"])
                publisher.flush()
                wait_for(lambda: store[SAMPLES].count_documents({"dataset": "train"}) == 320, what="320 samples ingested")
                save_cohort(Cohort(store, filter={"dataset": "train"}, x="x", y="y"), "images")
            yield Stack(settings, Dashboard(dashboard, port))
        finally:
            dashboard.stop()
            worker.stop()
            processors.stop()


def submit(settings: Settings, name: str, epochs: int) -> str:
    with Store(settings) as store, Publisher(settings) as publisher:
        return Jobs(store, publisher).submit(
            "train", name=name, epochs=epochs, model={"entry_point": MODEL}, data={"filter": {"dataset": "train"}},
            hyperparameters={"batch_size": 8, "units": 8},
        )  # fmt: skip


def job_status(settings: Settings, job_id: str) -> str:
    with Store(settings) as store:
        return str(store["jobs"].find_one({"_id": job_id}, {"status": 1})["status"])


def outcome(page: Any, state: str = "ok", timeout: float = 30_000) -> str:
    """The text of the page's outcome box once it reports ``state`` (ok / error)."""
    page.wait_for_selector(f".outcome[data-state='{state}']", timeout=timeout)
    return str(page.locator(f".outcome[data-state='{state}']").first.text_content())


def test_a_running_job_is_cancelled_and_retried_from_its_page_and_the_runs_table(stack, tab) -> None:
    settings, page = stack.settings, tab.page
    job_id = submit(settings, "long-training", epochs=300)
    wait_for(lambda: job_status(settings, job_id) == "running", timeout=60, what="the worker running the job")
    page.goto(f"{stack.dashboard.url}/#/run/{quote(job_id, safe='')}")
    page.wait_for_selector(".job .badge.running")
    page.locator(".job button.job-cancel").click()
    assert "cancel requested" in outcome(page)
    page.wait_for_selector(".job .badge.cancelled", timeout=60_000)  # the worker stopped at its next step
    assert job_status(settings, job_id) == "cancelled"
    tab.screenshot("actions-job-cancelled")
    page.locator(".job button.job-retry").click()
    page.wait_for_function("() => document.querySelector('.outcome').textContent.includes('pending again')")
    wait_for(lambda: job_status(settings, job_id) == "running", timeout=60, what="the worker running the retried job")
    with Store(settings) as store:
        job = store["jobs"].find_one({"_id": job_id})
    assert job["retries"] == 1 and job["retried_by"] == "dashboard"

    page.goto(f"{stack.dashboard.url}/#/runs")
    page.locator(f"button.job-cancel[data-job='{job_id}']").click()
    outcome(page)
    page.wait_for_selector(f"button.job-retry[data-job='{job_id}']", timeout=60_000)  # cancelled: retry offered
    assert job_status(settings, job_id) == "cancelled"
    tab.screenshot("actions-runs-table")
    assert not tab.errors and not tab.dialogs


def test_versions_are_promoted_rolled_back_and_tried_from_the_models_page(stack, tab) -> None:
    settings, page = stack.settings, tab.page
    job_id = submit(settings, "digits", epochs=2)  # the worker saves a version per epoch: v1, v2
    wait_for(lambda: job_status(settings, job_id) == "finished", timeout=120, what="the training of two versions")
    with Store(settings) as store:
        Policies(store).register(
            Policy(name="digits", model={"entry_point": MODEL}, training={"filter": {"dataset": "train"}},
                   validation={"filter": {"dataset": "train"}, "x": "x", "y": "y"}, trigger={"manual": True})
        )  # fmt: skip
        ModelRegistry(store).promote("digits", 1, reason={"reason": "the first"})
    page.goto(f"{stack.dashboard.url}/#/models")
    card = page.locator(".model[data-model='digits']")
    card.locator(".badge.production", has_text="production v1").wait_for()

    card.locator("tr[data-version='2'] button.promote").click()
    card.locator(".confirm input.reason").fill("v2 trained one more epoch")
    card.locator(".confirm button.confirm-yes").click()
    assert "production is v2 (was v1)" in outcome(page)
    card.locator("h2 .badge.production", has_text="production v2").wait_for()
    row = card.locator("tr.by-person").first
    assert "v2 trained one more epoch" in row.text_content() and "by dashboard" in row.text_content()
    tab.screenshot("actions-promoted")

    held: list[Any] = []  # the page's next refresh, held until a confirmation is open: its data must not remove it
    page.route("**/api/models", lambda route: held.append(route))
    wait_for(lambda: page.wait_for_timeout(50) or held, timeout=15, what="the page's next refresh")
    card.locator("button.rollback").click()
    held[0].continue_()
    page.unroute("**/api/models")
    page.wait_for_timeout(500)
    card.locator(".confirm button.confirm-no").click()  # cancelled: nothing happens
    assert not card.locator(".confirm").count()
    card.locator("button.rollback").click()
    card.locator(".confirm input.reason").fill("back to the tested one")
    card.locator(".confirm button.confirm-yes").click()
    page.wait_for_function("() => document.querySelector('.outcome').textContent.includes('rolled back to v1')")
    card.locator("h2 .badge.production", has_text="production v1").wait_for()
    with Store(settings) as store:
        assert ModelRegistry(store).alias("digits") == 1
        decisions = list(store["decisions"].find({"policy": "digits"}).sort("at", 1))
    assert [(d["by"], d["action"], d["version"], d["given_reason"]) for d in decisions] == [
        ("person", "promote", 2, "v2 trained one more epoch"), ("person", "roll back", 1, "back to the tested one"),
    ]  # fmt: skip
    tab.screenshot("actions-rolled-back")

    card.locator("button.policy-pause").click()
    card.locator(".policy-line .badge", has_text="paused").wait_for()
    assert Policies(Store(settings)).get("digits").paused
    card.locator("button.policy-resume").click()
    card.locator(".policy-line .badge", has_text="active").wait_for()

    panel = page.locator(".try")
    panel.locator("select.try-model").select_option("digits")
    panel.locator(".try-versions input[data-version='2']").check()
    panel.locator("select.try-source").select_option("cohort:images")
    panel.locator("input.try-count").fill("6")
    panel.locator("button.try-run").click()
    panel.locator(".try-result[data-rows='6'][data-versions='1,2']").wait_for(timeout=60_000)
    headers = panel.locator(".try-table th").all_text_contents()
    assert headers == ["#", "sample", "label", "v1 (production)", "v2"]
    assert panel.locator(".try-table td.prediction").count() == 12
    assert all(text.startswith("class ") for text in panel.locator(".try-table td.prediction").all_text_contents())
    tab.screenshot("actions-try-cohort")

    panel.locator("select.try-source").select_option("json")
    panel.locator("textarea.try-json").fill(str([[[200] * 8] * 8, [[10] * 8] * 8]))
    panel.locator("button.try-run").click()
    panel.locator(".try-result[data-rows='2']").wait_for(timeout=30_000)
    panel.locator("textarea.try-json").fill("[[1, 2, 3]]")
    panel.locator("button.try-run").click()
    assert "each instance must have shape [8, 8]" in outcome(page, "error")
    tab.screenshot("actions-try-refused")
    assert all("status of 422" in error for error in tab.errors) and not tab.dialogs  # the refusal, as the console logs it


def test_a_stage_is_paused_and_resumed_from_the_data_page(stack, tab) -> None:
    settings, page = stack.settings, tab.page
    with Store(settings) as store:
        Stages(store).register(
            {"name": "halve", "input": {"filter": {"dataset": "raw"}}, "function": "tensordb.testing.stages:halve",
             "output": {"dataset": "halved"}}
        )  # fmt: skip
    page.goto(f"{stack.dashboard.url}/#/data")
    row = page.locator("tr.stage[data-stage='halve']")
    row.locator("button.stage-pause").click()
    page.wait_for_selector("tr.stage.paused[data-stage='halve']")
    assert "stage halve paused" in outcome(page)
    with Store(settings) as store:
        assert Stages(store).get("halve")["paused"] is True
    tab.screenshot("actions-stage-paused")
    row.locator("button.stage-resume").click()
    page.wait_for_selector("tr.stage[data-stage='halve']:not(.paused)")
    with Store(settings) as store:
        assert Stages(store).get("halve")["paused"] is False
    assert not tab.errors and not tab.dialogs


def test_a_running_study_is_stopped_from_its_page(stack, tab) -> None:
    from tensordb.client import TensorDB

    settings, page = stack.settings, tab.page
    with TensorDB(settings) as db:
        db.create_study(
            name="to-stop", model={"epoch_function": "tensordb.testing.synthetic:learning_curve"},
            objective={"metric": "accuracy", "direction": "max"}, space={"x": {"choice": [0.2, 0.4, 1.5, 1.6]}},
            searcher={"name": "asha", "sampler": "grid", "min_epochs": 1, "max_epochs": 27, "reduction_factor": 3},
            hyperparameters={"seconds": 0.5}, max_concurrent=1,
        )  # fmt: skip
    page.goto(f"{stack.dashboard.url}/#/study/to-stop")
    page.wait_for_selector(".trials tr.trial .badge.running", timeout=60_000)
    page.locator("button.study-stop").click()
    assert "study to-stop stopped" in outcome(page)
    page.wait_for_selector(".study-title .badge.stopped", timeout=30_000)
    with Store(settings) as store:
        ended = lambda: {job["status"] for job in store["jobs"].find({"labels.study": "to-stop"})} <= {"cancelled", "finished"}  # noqa: E731
        wait_for(ended, timeout=30, what="the running trial cancelled by its worker")
        assert "cancelled" in {job["status"] for job in store["jobs"].find({"labels.study": "to-stop"})}
    assert not page.locator("button.study-stop").count()
    tab.screenshot("actions-study-stopped")
    assert not tab.errors and not tab.dialogs


EVIL = "http://evil.test"
FORGED_FORM = """<!doctype html><html><body><h1>You won a prize</h1>
<form id="f" method="POST" enctype="text/plain" action="{action}">
<input name='{{"job_id": "{job}", "x": "' value='"}}'></form>
<script>document.getElementById("f").submit();</script></body></html>"""


def test_a_forged_cross_site_form_post_is_refused(stack, browser, tab) -> None:
    """A page of another origin (served by the browser's request routing: no server) posts a form to
    the dashboard while the person is signed in to it: refused, and the job stays as it was."""
    settings, page = stack.settings, tab.page
    job_id = submit(settings, "forgery-target", epochs=300)  # long enough that the worker cannot finish it first
    with Store(settings) as store, Publisher(settings) as publisher:
        Jobs(store, publisher).cancel(job_id)  # pending: cancelled at once; claimed already: stopped at its next step
    wait_for(lambda: job_status(settings, job_id) == "cancelled", timeout=60, what="the target job cancelled")
    page.goto(f"{stack.dashboard.url}/#/runs")
    page.locator(f"button.job-retry[data-job='{job_id}']").wait_for()  # the person's page has its session cookie
    page.evaluate("() => fetch('/api/csrf')")
    assert page.context.cookies()

    action = f"{stack.dashboard.url}/api/jobs/retry"
    page.route(
        f"{EVIL}/**", lambda route: route.fulfill(content_type="text/html", body=FORGED_FORM.format(action=action, job=job_id))
    )
    with page.expect_navigation(url=action):
        page.goto(f"{EVIL}/prize.html")
    page.wait_for_load_state()
    refused = page.locator("body").text_content()
    assert "csrf" in refused and ("cross-site request refused" in refused or "X-CSRF-Token" in refused), refused
    tab.screenshot("actions-forged-form-refused")

    page.goto(f"{EVIL}/prize.html#again")  # a script's request from that page, with the person's cookies
    status = page.evaluate(
        """([url, job]) => fetch(url, {method: "POST", mode: "no-cors", credentials: "include",
             headers: {"Content-Type": "text/plain"}, body: JSON.stringify({job_id: job})}).then(() => "sent", () => "blocked")""",
        [action, job_id],
    )
    assert status in ("sent", "blocked")
    time.sleep(0.5)
    assert job_status(settings, job_id) == "cancelled"  # neither changed anything
