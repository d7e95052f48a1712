"""The dashboard in a real browser: Debian's headless Chromium (/usr/bin/chromium) driven by
Playwright (its Python package; no browser is downloaded), against the real broker, mongod, stream
processors, a trainer worker and ``tensordb dashboard``. Screenshots land in test-output/dashboard/.

What is checked: points appear on a chart while a run logs, without reloading the page; a page
opened in the middle of a run shows the whole curve (every step once: no gap, no duplicate at the
seam between MongoDB's history and the live stream); a run named like HTML renders as text; a real
training job's status and curves update live; a real study's trials appear and change status live
on its page, and brushing an axis of its parallel-coordinates chart filters its table; a study of
1,000 trials loads, draws and filters within generous bounds (the times are printed).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from dashboard.app import STATIC
from tensordb.config import Settings, Topic
from tensordb.data.samples import SAMPLES
from tensordb.infra.bus import Publisher
from tensordb.infra.store import Store
from tensordb.jobs.queue import Jobs
from tensordb.runs.logger import LOGS, RunLogger
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
from tests import REPO

CHROMIUM = Path(os.environ.get("TENSORDB_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = REPO / "test-output" / "dashboard"
#: Chromium on a machine with no screen and a closed network (see the env notes of this project)
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
MARKUP_NAME = "<img src=x onerror=alert(1)>"


@dataclass
class Stack:
    settings: Settings
    dashboard: Dashboard
    folder: Path


@pytest.fixture(scope="module")
def stack(servers: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One project with its processors and a dashboard for the whole module (each test uses its
    own runs): starting them once keeps the browser tests well under a minute."""
    folder = tmp_path_factory.mktemp("dashboard-browser")
    with fresh_project(servers) as settings:
        processors = processors_process(settings, folder / "processors.log")
        port = free_port()
        dashboard = dashboard_process(settings, folder / "dashboard.log", port)
        try:
            processors.start()
            dashboard.start()
            yield Stack(settings, Dashboard(dashboard, port), folder)
        finally:
            dashboard.stop()
            processors.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (sh .ci/apt-install chromium)")
    if not (STATIC / "index.html").is_file():
        pytest.fail(f"the dashboard's front end is not built ({STATIC} is missing): run `make dashboard`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Tab:
    """A browser page, and what it reported: dialogs (alert...), uncaught errors, console errors."""

    page: Any
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def points(self, metric: str) -> int:
        value = self.page.evaluate("(m) => document.querySelector(`.chart[data-metric='${m}']`)?.dataset.points", metric)
        return int(value or 0)

    def wait_points(self, metric: str, count: int, timeout: float = 30.0) -> None:
        self.page.wait_for_function(
            "([m, n]) => document.querySelector(`.chart[data-metric='${m}']`)?.dataset.points === String(n)",
            arg=[metric, count], timeout=timeout * 1000,
        )  # fmt: skip

    def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def tab(browser: Any) -> Iterator[Tab]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    tab = Tab(page)

    def on_dialog(dialog: Any) -> None:
        tab.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda error: tab.errors.append(str(error)))
    page.on("console", lambda message: tab.errors.append(message.text) if message.type == "error" else None)
    try:
        yield tab
    finally:
        context.close()


def run_url(dashboard: Any, run_id: str) -> str:
    return f"{dashboard.url}/#/run/{quote(run_id, safe='')}"


def loss(step: int) -> float:
    return 1.0 / (1.0 + step / 100.0)


def test_points_appear_on_the_chart_while_the_run_logs_without_reloading(stack, tab) -> None:
    settings, dashboard = stack.settings, stack.dashboard
    page = tab.page
    page.goto(run_url(dashboard, "live-run"))
    page.wait_for_selector("#live-state.live")
    page.evaluate("window.__sameDocument = true")
    seen = []
    with Publisher(settings) as publisher, RunLogger(publisher, "live-run", tags={"model": "mlp"}) as logger:
        for chunk in range(3):
            for step in range(chunk * 100, chunk * 100 + 100):
                logger.log(step, loss=loss(step), accuracy=step / 300)
                time.sleep(0.002)
            tab.wait_points("loss", (chunk + 1) * 100)
            seen.append(tab.points("loss"))
    assert seen == [100, 200, 300]  # the chart grew with the run
    assert page.evaluate("window.__sameDocument") is True
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1  # never reloaded
    assert page.evaluate("window.tensordbCharts['run:loss'].steps()") == list(range(300))
    assert page.evaluate("window.tensordbCharts['run:loss'].values('train')") == [loss(step) for step in range(300)]
    tab.wait_points("accuracy", 300)
    tab.screenshot("live-run")
    assert not tab.errors and not tab.dialogs


def test_a_page_opened_in_the_middle_of_a_run_shows_the_whole_curve(stack, browser, tab) -> None:
    settings, dashboard = stack.settings, stack.dashboard
    total, run_id = 4000, "late-run"

    def train() -> None:
        with Publisher(settings) as publisher, RunLogger(publisher, run_id) as logger:
            for step in range(total):
                logger.log(step, loss=loss(step))
                time.sleep(0.001)

    trainer = threading.Thread(target=train)
    trainer.start()
    try:
        with Store(settings) as store:
            wait_for(lambda: store[LOGS].count_documents({"run_id": run_id}) >= 1000, timeout=30, what="1000 steps persisted")
        tab.page.goto(run_url(dashboard, run_id))  # history from MongoDB + the rest live
    finally:
        trainer.join()
    tab.wait_points("loss", total)
    steps = tab.page.evaluate("window.tensordbCharts['run:loss'].steps()")
    assert steps == list(range(total))  # every step, once: no gap and no duplicate at the seam
    assert tab.page.evaluate("window.tensordbCharts['run:loss'].values('train')") == [loss(step) for step in range(total)]
    tab.screenshot("late-run")

    later = Tab(browser.new_page())  # and after the run, from MongoDB alone
    try:
        later.page.goto(run_url(dashboard, run_id))
        later.wait_points("loss", total)
        assert later.page.evaluate("window.tensordbCharts['run:loss'].steps()") == list(range(total))
    finally:
        later.page.close()
    assert not tab.errors and not tab.dialogs


def test_a_run_named_like_markup_renders_as_text(stack, tab) -> None:
    settings, dashboard = stack.settings, stack.dashboard
    with (
        Publisher(settings) as publisher,
        RunLogger(publisher, MARKUP_NAME, tags={"note": "<script>alert(2)</script>", "html": "<b>x</b>"}) as logger,
    ):
        for step in range(20):
            logger.log(step, loss=loss(step))
    page = tab.page
    page.goto(f"{dashboard.url}/#/runs")
    link = page.locator("a.run-link", has_text="onerror")
    link.wait_for(timeout=30_000)
    assert link.text_content() == MARKUP_NAME
    assert page.locator("td", has_text="note=<script>alert(2)</script>").count() == 1
    tab.screenshot("markup-runs")

    link.click()
    page.wait_for_selector("h1.run-title")
    tab.wait_points("loss", 20)
    assert page.locator("h1.run-title").text_content() == MARKUP_NAME
    page.goto(f"{dashboard.url}/#/compare?run={quote(MARKUP_NAME, safe='')}&metric=loss")
    page.wait_for_function("() => document.querySelector('#main .chart')?.dataset.points === '20'", timeout=30_000)
    assert MARKUP_NAME in page.locator(".u-legend").text_content()  # uPlot's legend, as text too
    assert MARKUP_NAME in page.locator(".run-list").text_content()
    tab.screenshot("markup-compare")
    for selector in ("img", "b", "script:not([src])"):
        assert page.locator(selector).count() == 0, selector  # nothing the names contain became an element
    assert not tab.dialogs and not tab.errors


def test_a_training_job_s_status_and_curves_update_live(stack, tab) -> None:
    settings, dashboard = stack.settings, stack.dashboard
    worker = worker_process(settings, stack.folder / "worker.log")
    with Store(settings) as store, Publisher(settings) as publisher:
        for record in image_samples(320):  # through the ingest topic and the processors
            publisher.publish(Topic.INGEST, record, key=record["sample_id"])
        publisher.flush()
        wait_for(lambda: store[SAMPLES].count_documents({"dataset": "train"}) == 320, what="320 samples ingested")
        job_id = Jobs(store, publisher).submit(
            "train", name="dashboard-training", epochs=8,
            model={"entry_point": "tensordb.testing.models:small_classifier"},
            data={"filter": {"dataset": "train"}}, hyperparameters={"batch_size": 8, "units": 8},
        )  # fmt: skip
        page = tab.page
        page.goto(run_url(dashboard, job_id))
        page.wait_for_selector(".job .badge.pending")
        worker.start()
        try:
            seen, statuses = {0}, []
            deadline = time.monotonic() + 120
            while not page.locator(".job .badge.finished").count():  # watch the curve grow while the job trains
                seen.add(tab.points("loss"))
                statuses.append(page.locator(".job .badge").first.text_content())
                assert time.monotonic() < deadline, f"the job did not finish within 120 s ({statuses[-1]})"
                time.sleep(0.05)
        finally:
            worker.stop()
        steps = 8 * (320 // 8)
        wait_for(lambda: store[LOGS].count_documents({"run_id": job_id, "phase": "train"}) == steps, what="every step persisted")
    tab.wait_points("loss", steps)
    assert len(seen - {0, steps}) >= 2, f"the chart should have grown in several steps while training, saw {sorted(seen)}"
    assert statuses[0] == "pending" and page.evaluate("performance.getEntriesByType('navigation').length") == 1
    assert page.locator(".chart[data-metric='val_loss'], .chart[data-metric='accuracy']").count() >= 1
    assert "epoch 8/8" in page.locator(".job").text_content()
    tab.screenshot("training-job")
    assert not tab.errors and not tab.dialogs


def test_a_link_with_the_token_signs_the_browser_in_and_lands_on_the_page_without_it(stack, tab) -> None:
    """Beyond loopback a person opens the dashboard with ``?token=``: the redirect trades it for a
    session cookie, and the page it lands on (without the token) loads its data and live points."""
    token = "browser s3cret/token"
    port = free_port()
    process = dashboard_process(stack.settings, stack.folder / "dashboard-token.log", port, host="0.0.0.0", token=token)
    process.start(timeout=60)
    try:
        with Publisher(stack.settings) as publisher, RunLogger(publisher, "signed-in-run") as logger:
            for step in range(20):
                logger.log(step, loss=loss(step))
        url = f"http://127.0.0.1:{port}"
        tab.page.goto(f"{url}/?token={quote(token, safe='')}#/run/signed-in-run")
        assert tab.page.url == f"{url}/#/run/signed-in-run"
        tab.wait_points("loss", 20)
        cookies = tab.page.context.cookies()
        assert [(c["httpOnly"], c["sameSite"], c["secure"]) for c in cookies] == [(True, "Strict", False)]
        assert "s3cret" not in cookies[0]["value"]
        assert not tab.errors and not tab.dialogs
    finally:
        process.stop()
    assert "s3cret" not in process.log()


# -- studies ---------------------------------------------------------------------------------------------

LONG_TASKS = """
window.tensordbLongTasks = [];
new PerformanceObserver((list) => { for (const entry of list.getEntries()) window.tensordbLongTasks.push(entry.duration); })
  .observe({ type: "longtask", buffered: true });
"""


def study_url(dashboard: Any, name: str) -> str:
    return f"{dashboard.url}/#/study/{quote(name, safe='')}"


def brush(page: Any, axis: str, top: float, bottom: float) -> None:
    """Drag along the parallel-coordinates axis ``axis`` from ``top`` to ``bottom`` (fractions of its
    height from the top), as a person brushes a range."""
    box = page.locator(".parallel canvas").bounding_box()
    (where,) = [a for a in page.evaluate("window.tensordbParallel.study.axes()") if a["name"] == axis]
    x = box["x"] + where["x"]
    y = lambda f: box["y"] + where["top"] + f * (where["bottom"] - where["top"])  # noqa: E731
    page.mouse.move(x, y(top))
    page.mouse.down()
    for step in range(1, 6):
        page.mouse.move(x, y(top + (bottom - top) * step / 5))
    page.mouse.up()


def shown_rows(page: Any) -> list[dict[str, str]]:
    return page.evaluate(
        "() => [...document.querySelectorAll('.trials tr.trial')].map((r) => ({...r.dataset, badge: r.querySelector('.badge').textContent}))"
    )


def test_a_study_runs_live_on_its_page_and_brushing_an_axis_filters_its_trials(stack, tab) -> None:
    from tensordb.client import TensorDB

    settings, dashboard, page = stack.settings, stack.dashboard, tab.page
    workers = [worker_process(settings, stack.folder / f"study-worker-{i}.log") for i in range(2)]
    try:
        with TensorDB(settings) as db:
            db.create_study(
                name="live-study", model={"epoch_function": "tensordb.testing.synthetic:learning_curve"},
                objective={"metric": "accuracy", "direction": "max"}, max_trials=8, max_concurrent=2, seed=3,
                space={"x": {"uniform": [0, 1]}, "y": {"choice": [0.5, 0.7, 0.9]}, "speed": {"loguniform": [0.1, 2]}},
                searcher={"name": "asha", "sampler": "random", "min_epochs": 1, "max_epochs": 4, "reduction_factor": 2},
                hyperparameters={"seconds": 1.0},  # per epoch: the study spans several of the page's 2-s polls
            )  # fmt: skip
        page.goto(f"{dashboard.url}/#/studies")
        page.locator("a.study-link", has_text="live-study").wait_for()
        tab.screenshot("studies")
        page.locator("a.study-link", has_text="live-study").click()
        page.wait_for_selector(".trials tr.trial .badge.pending")  # no worker yet: submitted, nothing to draw
        assert "no validation values yet" in page.locator(".study-curves + div").text_content()
        for worker in workers:
            worker.start()
        totals, statuses, shown_errors = set(), {}, set()  # the page as it changed, without a reload
        deadline = time.monotonic() + 180
        while not page.locator(".study-title .badge.finished").count():
            totals.add(page.locator(".trials").get_attribute("data-total"))
            for row in shown_rows(page):
                statuses.setdefault(row["trial"], []).append(row["badge"])
            shown_errors.update(page.locator(".error").all_text_contents())
            assert time.monotonic() < deadline, "the study did not finish within 180 s"
            time.sleep(0.1)
    finally:
        for worker in workers:
            worker.stop()
    page.wait_for_selector(".trials[data-total='8']")
    assert not shown_errors, shown_errors
    assert len(totals) >= 3, f"trials should have appeared in several steps, saw totals {sorted(totals)}"
    changed = [trial for trial, seen in statuses.items() if seen[0] in ("pending", "running") and seen[-1] != seen[0]]
    assert changed, f"no trial was seen changing status live: {statuses}"
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
    final = {row["trial"]: row["status"] for row in shown_rows(page)}
    assert set(final.values()) <= {"finished", "stopped"} and "stopped" in final.values()
    assert page.locator("tr.trial.stopped .badge.stopped", has_text="stopped early").count() == list(final.values()).count(
        "stopped"
    )
    assert page.locator(".best .best-value").text_content()

    study = dashboard.get("/api/study", name="live-study")
    trials = [dict(zip(study["trials"]["columns"], row, strict=True)) for row in study["trials"]["rows"]]
    x = [axis["name"] for axis in study["parameters"]].index("x")
    upper = {t["id"] for t in trials if t["hyperparameters"][x] >= 0.5}
    kept = upper if 0 < len(upper) < len(trials) else {t["id"] for t in trials} - upper
    assert 0 < len(kept) < len(trials)
    brush(page, "x", 0.0, 0.5) if kept == upper else brush(page, "x", 0.5, 1.0)
    page.wait_for_function(f"() => document.querySelector('.trials').dataset.shown === '{len(kept)}'", timeout=5000)
    assert {row["trial"] for row in shown_rows(page)} == kept
    assert int(page.locator(".parallel").get_attribute("data-selected")) == len(kept)
    tab.screenshot("study-live")
    page.locator("button", has_text="clear filters").click()
    page.wait_for_selector(".trials[data-shown='8']")
    assert not page.locator(".error").count() and not tab.errors and not tab.dialogs


def test_a_study_of_a_thousand_trials_loads_and_stays_responsive(stack, tab, capsys) -> None:
    from tensordb.testing import insert_study

    page = tab.page
    with Store(stack.settings) as store:
        insert_study(store, "thousand", trials=1000, epochs=27)
    page.add_init_script(LONG_TASKS)
    started = time.monotonic()
    page.goto(study_url(stack.dashboard, "thousand"))
    page.wait_for_selector(".trials[data-total='1000']", timeout=60_000)
    page.wait_for_selector(".parallel[data-lines='1000']", timeout=60_000)
    page.wait_for_selector(".study-curves[data-points='27']", timeout=60_000)
    loaded = time.monotonic() - started
    assert page.locator(".trials tr.trial").count() == 100  # one page of rows, not a thousand

    started = time.monotonic()
    brush(page, "accuracy", 0.0, 0.3)  # the best configurations
    page.wait_for_function("() => document.querySelector('.trials').dataset.shown !== '1000'", timeout=10_000)
    brushed = time.monotonic() - started
    shown = int(page.locator(".trials").get_attribute("data-shown"))
    assert 0 < shown < 1000
    redraw = page.evaluate("window.tensordbCharts['study-curves'].redraw()")
    longest = max(page.evaluate("window.tensordbLongTasks") or [0])
    tab.screenshot("study-thousand")
    with capsys.disabled():
        print(
            f"\nstudy page of 1,000 trials: loaded and drawn in {loaded:.2f} s, a brush filtered the table to {shown} trials "
            f"in {brushed * 1000:.0f} ms, the curves redraw in {redraw:.0f} ms, longest main-thread task {longest:.0f} ms"
        )
    assert loaded < 20 and brushed < 3 and longest < 3000
    assert not page.locator(".error").count() and not tab.errors and not tab.dialogs
