"""``tensordb demo``: the continuous-learning loop on the local services, narrated.

It starts the stream processors, a trainer worker and (once a model is in production) the model
server in the background, registers a policy, and publishes scikit-learn's digits in two waves.
Each wave triggers training on its own; each candidate is evaluated against production and promoted
only if it is better; the server swaps to it while it keeps answering. A broken record shows the
dead-letter path. Everything keeps running afterwards for the user to explore.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import orjson
from pymongo import MongoClient
from rich.console import Console
from rich.live import Live
from rich.table import Table

from dashboard.background import start_dashboard
from tensordb.client import TensorDB
from tensordb.config import Settings, Topic, mask_uri
from tensordb.infra.bus import create_topics
from tensordb.infra.dead_letters import COLLECTION as DEAD_LETTERS
from tensordb.loop.policies import Policies, Policy
from tensordb.loop.promotion import DECISIONS, EVALUATIONS, PRODUCTION
from tensordb.records import Schema
from tensordb.services import LocalServices
from tensordb.services.apps import running_apps
from tensordb.services.process import free_port, port_is_free

POLICY = "digits"
WAVE_SIZES = (500, 1000)  # training samples per wave; the rest of the 1797 digits validate
console = Console(highlight=False, width=None if sys.stdout.isatty() else 110)


class Timeline:
    """Prints what happens with the seconds since the demo started."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def say(self, message: str) -> None:
        console.print(f"[dim]{time.monotonic() - self.start:6.1f}s[/]  {message}")


def _jobs_table(db: TensorDB) -> Table:
    table = Table(title="jobs (live)", title_justify="left")
    for column in ("job", "kind", "status", "worker", "epoch", "accuracy"):
        table.add_column(column)
    for job in reversed(db.jobs.list()):
        progress = job.get("progress") or {}
        metrics = progress.get("metrics") or (job.get("result") or {}).get("metrics") or {}
        accuracy = metrics.get("val_accuracy", metrics.get("accuracy"))
        epoch = progress.get("epoch")
        table.add_row(
            job["_id"][-12:], job["kind"], job["status"], (job.get("worker") or "-")[-14:],
            "-" if epoch is None else f"{epoch + 1}/{job['spec'].get('epochs', '?')}",
            "-" if accuracy is None else f"{accuracy:.3f}",
        )  # fmt: skip
    return table


def _watch(db: TensorDB, done: Callable[[], Any], what: str, timeout: float = 240.0) -> Any:
    """Show the jobs table live until ``done()`` returns something truthy."""
    deadline = time.monotonic() + timeout
    with Live(_jobs_table(db), console=console, refresh_per_second=4, transient=True) as live:
        while not (result := done()):
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}; see `tensordb services logs processors` / `worker`")
            time.sleep(0.5)
            live.update(_jobs_table(db))
    return result


def _decisions(db: TensorDB) -> list[dict[str, Any]]:
    return list(db.store[DECISIONS].find({"policy": POLICY}).sort("at", 1))


def publish_wave(db: TensorDB, x: np.ndarray, y: np.ndarray, indexes: range, dataset: str) -> None:
    db.publish_samples(
        {
            "arrays": {"image": x[i].reshape(8, 8).astype(np.uint8)},
            "labels": {"digit": int(y[i])},
            "dataset": dataset,
            "sample_id": f"{dataset}-{i}",
        }
        for i in indexes
    )


def _predict(base: str, x: np.ndarray, y: np.ndarray, indexes: list[int]) -> dict[str, Any]:
    response = httpx.post(f"{base}/predict", json={"instances": [x[i].reshape(8, 8).tolist() for i in indexes]}, timeout=30)
    response.raise_for_status()
    body = response.json()
    correct = sum(int(p == y[i]) for p, i in zip(body["classes"], indexes, strict=True))
    return {"version": body["version"], "classes": body["classes"], "correct": correct, "of": len(indexes)}


def fresh_start(settings: Settings, services: LocalServices) -> None:
    """Stop the demo's processes from a previous run and drop its database: every run starts clean."""
    for app in running_apps(services.run_dir, settings):
        app.stop()
    client: MongoClient = MongoClient(settings.mongo_uri, serverSelectionTimeoutMS=30_000)
    with client:  # the demo's own database
        client.drop_database(settings.mongo_database)
    create_topics(settings)


def run_demo(base_settings: Settings) -> int:
    from sklearn.datasets import load_digits

    settings = base_settings.with_changes(project="demo", mongo_database="tensordb_demo")
    services = LocalServices(settings)
    timeline = Timeline()
    console.rule("[bold]TensorDB: the continuous-learning loop")
    console.print(f"Kafka {settings.kafka_bootstrap} · MongoDB {mask_uri(settings.mongo_uri)} · project {settings.project!r}")
    fresh_start(settings, services)
    services.start_app("processors", ["processors"])
    timeline.say("stream processors running (ingest, log sink, retrain trigger, evaluation → promotion)")
    services.start_app("worker", ["worker"])
    timeline.say("trainer worker running")
    dashboard = start_dashboard(settings)
    timeline.say(f"dashboard at {dashboard} — open it to watch the runs train live")

    x, y = load_digits(return_X_y=True)
    first, second = range(0, WAVE_SIZES[0]), range(WAVE_SIZES[0], sum(WAVE_SIZES))
    validation = range(sum(WAVE_SIZES), len(x))
    with TensorDB(settings) as db:
        policy = Policies(db.store).register(Policy(
            name=POLICY, model={"entry_point": "tensordb.models.examples:digits_mlp"},
            training={"filter": {"dataset": "digits"}, "x": "image", "y": "digit"},
            validation={"filter": {"dataset": "digits-validation"}, "x": "image", "y": "digit"},
            trigger={"every_samples": 400}, objective={"metric": "accuracy", "direction": "max"},
            promotion={"margin": 0.0}, epochs=8, hyperparameters={"units": 64, "batch_size": 32},
        ))  # fmt: skip
        timeline.say(
            f"policy {POLICY!r}: retrain every {policy.trigger['every_samples']} new digits, promote if validation accuracy is higher"
        )
        publish_wave(db, x, y, validation, "digits-validation")
        broken = orjson.dumps(
            {
                "schema": Schema.SAMPLE,
                "dataset": "digits",
                "arrays": {"image": {"dtype": "uint8", "shape": [8, 8], "data": "AAA="}},
            }
        )
        db.publisher.publish_bytes(settings.topic(Topic.INGEST), broken)
        db.flush()
        timeline.say(f"published {len(validation)} validation digits, and one broken record (2 bytes for an 8×8 image)")

        rounds: list[dict[str, Any]] = []
        shown = list(validation)[:12]
        publish_wave(db, x, y, first, "digits")
        timeline.say(f"wave 1: published {len(first)} training digits → the trigger submits a train job")
        decision = _watch(db, lambda: _decisions(db)[0:1], "the first decision")[0]
        timeline.say(f"decision: {decision['reason']}")

        port = (
            settings.serve_port
            if port_is_free(settings.services_host, settings.serve_port)
            else free_port(settings.services_host)
        )
        services.start_app("serve", ["serve", "--policy", POLICY, "--port", str(port)])
        base = f"http://{settings.services_host}:{port}"
        timeline.say(f"model server running at {base} (POST /predict, GET /model, GET /health)")
        rounds.append(_predict(base, x, y, shown))
        timeline.say(f"served 12 predictions with version {rounds[-1]['version']}: {rounds[-1]['correct']}/12 correct")

        publish_wave(db, x, y, second, "digits")
        timeline.say(f"wave 2: published {len(second)} more training digits → retraining on all {sum(WAVE_SIZES)}")
        decision = _watch(db, lambda: _decisions(db)[1:2], "the second decision")[0]
        timeline.say(f"decision: {decision['reason']}")
        production = db.models.alias(POLICY, PRODUCTION)
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/model", timeout=10).json()["version"] != production and time.monotonic() < deadline:
            time.sleep(0.2)
        rounds.append(_predict(base, x, y, shown))
        timeline.say(f"served 12 predictions with version {rounds[-1]['version']}: {rounds[-1]['correct']}/12 correct")

        _print_summary(db, rounds, shown, y)
        letters = list(db.store[DEAD_LETTERS].find({"topic": settings.topic(Topic.INGEST)}))
        for letter in letters:
            timeline.say(f"dead letter at {letter['topic']}[{letter['partition']}]@{letter['offset']}: {letter['reason']}")
        complete = len(letters) == 1 and len(_decisions(db)) == 2
    _print_next_steps(settings, base, dashboard)
    return 0 if complete else 1


def _print_summary(db: TensorDB, rounds: list[dict[str, Any]], shown: list[int], y: np.ndarray) -> None:
    production = db.models.alias(POLICY, PRODUCTION)
    scores = {doc["version"]: doc["metrics"] for doc in db.store[EVALUATIONS].find({"policy": POLICY})}
    decided = {d["candidate"]["version"]: d for d in _decisions(db)}
    versions = db.models.versions(POLICY)
    candidates = [info for info in versions if info["version"] in scores or info["version"] in decided]
    table = Table(
        title=f"candidates of {POLICY!r} (the last epoch of each train job; {len(versions)} versions saved in all, one per epoch)"
    )
    for column in ("version", "job", "epoch", "train acc.", "validation acc.", "decision", ""):
        table.add_column(column)
    for info in candidates:
        version = info["version"]
        validation = scores.get(version, {}).get("accuracy")
        decision = decided.get(version)
        table.add_row(
            str(version), (info.get("job_id") or "")[-12:], str(info.get("epoch")),
            f"{info['metrics'].get('accuracy', float('nan')):.3f}",
            "-" if validation is None else f"{validation:.3f}",
            "-" if decision is None else ("promoted" if decision["promoted"] else "not promoted"),
            "◀ production" if version == production else "",
        )  # fmt: skip
    console.print(table)
    served = Table(title="which version served which predictions (12 validation digits)")
    for column in ("round", "version", "predicted", "true", "correct"):
        served.add_column(column)
    truth = " ".join(str(int(y[i])) for i in shown)
    for number, round_ in enumerate(rounds, 1):
        served.add_row(
            str(number),
            str(round_["version"]),
            " ".join(map(str, round_["classes"])),
            truth,
            f"{round_['correct']}/{round_['of']}",
        )
    console.print(served)


def _print_next_steps(settings: Settings, base: str, dashboard: str) -> None:
    env = f"TENSORDB_PROJECT={settings.project} TENSORDB_MONGO_DATABASE={settings.mongo_database}"
    console.print(
        "\n[bold]Everything keeps running.[/] Explore:\n"
        f"  {dashboard:<56} # the dashboard: runs, curves, models, data\n"
        f"  .venv/bin/tensordb services status                      # servers and TensorDB processes\n"
        f"  curl -s {base}/model                         # the version in production\n"
        f"  {env} .venv/bin/tensordb policy list\n"
        f"  .venv/bin/tensordb services logs worker -f\n"
        "Stop everything with: .venv/bin/tensordb services down"
    )
