"""``tensordb demo --study``: a small ASHA study on the digits data, on the local services, narrated.

It starts the stream processors (the study scheduler runs in them) and a trainer worker with two
slots, publishes scikit-learn's digits, and searches the demo model's width, learning rate and
batch size with ASHA: each trial is an ordinary train job, judged at rungs of 1 and 3 epochs, and
the hopeless ones stop early. The trials table updates live; at the end it prints every
configuration and the best one, whose final version gets the alias ``best``.
"""

from __future__ import annotations

import time

from rich.live import Live
from rich.table import Table

from dashboard.background import start_dashboard
from tensordb.cli.demo import Timeline, console, fresh_start, publish_wave
from tensordb.cli.study import best_line, configurations_table
from tensordb.client import TensorDB
from tensordb.config import Settings
from tensordb.services import LocalServices
from tensordb.studies.studies import Study

STUDY = {
    "name": "digits-asha",
    "model": {"entry_point": "tensordb.models.examples:digits_mlp"},
    "data": {"filter": {"dataset": "digits"}, "x": "image", "y": "digit"},
    "validation": {"filter": {"dataset": "digits-validation"}, "x": "image", "y": "digit"},
    "space": {
        "units": {"choice": [8, 16, 32, 64, 128]},
        "learning_rate": {"loguniform": [3e-4, 3e-2]},
        "batch_size": {"choice": [16, 64]},
    },
    "searcher": {"name": "asha", "sampler": "random", "min_epochs": 1, "max_epochs": 9, "reduction_factor": 3},
    "objective": {"metric": "accuracy", "direction": "max"},
    "max_trials": 12,
    "max_concurrent": 2,
    "seed": 7,
}
VALIDATION = 400  # the last digits validate; the others train


def _trials_table(study: Study) -> Table:
    table = Table(title=f"study {study.name!r} (live)", title_justify="left")
    for column in ("trial", "units", "lr", "batch", "job", "epochs", "val. accuracy", "outcome"):
        table.add_column(column)
    for trial in study.trials():
        curve = trial["curve"]
        last = curve[max(curve, key=int)] if curve else None
        outcome = trial["status"] + (f" at rung {trial['stopped_at_rung']}" if trial["status"] == "stopped" else "")
        settings = trial["hyperparameters"]
        table.add_row(
            str(trial["configuration"]), str(settings["units"]), f"{settings['learning_rate']:.2g}", str(settings["batch_size"]),
            trial["job_status"] or "-", str(len(curve)), "-" if last is None else f"{last:.3f}", outcome,
        )  # fmt: skip
    return table


def run_study_demo(base_settings: Settings, timeout: float = 900.0) -> int:
    """Run the study demo (see the module docstring); 0 when the study finished with a best configuration."""
    from sklearn.datasets import load_digits

    settings = base_settings.with_changes(project="demo-study", mongo_database="tensordb_demo_study")
    services = LocalServices(settings)
    timeline = Timeline()
    console.rule("[bold]TensorDB: a hyper-parameter study with early stopping (ASHA)")
    fresh_start(settings, services)
    services.start_app("processors", ["processors"])
    timeline.say("stream processors running (with the study scheduler)")
    services.start_app("worker", ["worker", "--slots", "2"])
    timeline.say("trainer worker running with 2 slots: two trials at a time")
    dashboard = start_dashboard(settings)
    timeline.say(f"dashboard at {dashboard} — its Studies page shows the trials live")

    x, y = load_digits(return_X_y=True)
    with TensorDB(settings) as db:
        publish_wave(db, x, y, range(0, len(x) - VALIDATION), "digits")
        publish_wave(db, x, y, range(len(x) - VALIDATION, len(x)), "digits-validation")
        db.flush()
        timeline.say(f"published {len(x) - VALIDATION} training and {VALIDATION} validation digits")
        study = db.create_study(STUDY)
        rungs = study.spec.searcher.rungs()
        timeline.say(
            f"study {study.name!r}: {STUDY['max_trials']} random configurations of units, learning rate and batch size; "
            f"judged at {', '.join(map(str, rungs))} epochs (the best third goes on), {study.spec.trial_epochs} epochs at most"
        )
        deadline = time.monotonic() + timeout
        with Live(_trials_table(study), console=console, refresh_per_second=2, transient=True) as live:
            while study.status == "running" and time.monotonic() < deadline:
                time.sleep(1.0)
                live.update(_trials_table(study))
        timeline.say(f"study {study.status}")
        rows = study.configurations()
        console.print(configurations_table(rows, "val. accuracy", title=f"configurations of {study.name!r}"))
        epochs = sum(trial.get("epochs_done") or 0 for trial in study.trials())
        timeline.say(
            f"{sum(row['status'] == 'stopped' for row in rows)} of {len(rows)} configurations stopped early; "
            f"{epochs} epochs trained in all, against {len(rows) * study.spec.trial_epochs} without early stopping"
        )
        best = study.best()
        timeline.say(best_line(best, "validation accuracy"))
        finished = study.status == "finished"
    console.print(
        "\n[bold]Everything keeps running.[/] Explore:\n"
        f"  {dashboard:<56} # the dashboard's Studies page\n"
        f"  TENSORDB_PROJECT={settings.project} TENSORDB_MONGO_DATABASE={settings.mongo_database} "
        f".venv/bin/tensordb study show {STUDY['name']}\n"
        "Stop everything with: .venv/bin/tensordb services down"
    )
    return 0 if best is not None and finished else 1
