"""The TensorDB paper's study in miniature: k-fold cross-validation × two architectures × widths.

The paper (section 4) trains more than 100 models: 5-fold cross-validation × imaging modalities
× architectures, and found them "very hard to monitor all in one view". Here: the digits, 3 folds,
an MLP and a CNN (``tensordb.models.examples:digits_classifier``), two widths: 4 configurations,
12 trials, each configuration judged by its mean validation accuracy over the folds, with the
spread. With the services, the processors and a worker running (see README.md here)::

    python examples/kfold_study/study.py
"""

from __future__ import annotations

import sys

from rich.console import Console
from sklearn.datasets import load_digits

from tensordb.cli.study import best_line, configurations_table
from tensordb.client import TensorDB

STUDY = {
    "name": "kfold-architectures",
    "model": {"entry_point": "tensordb.models.examples:digits_classifier"},
    "data": {"filter": {"dataset": "digits"}, "x": "image", "y": "digit"},
    "folds": 3,
    "space": {"architecture": {"choice": ["mlp", "cnn"]}, "units": {"choice": [16, 64]}},
    "objective": {"metric": "accuracy", "direction": "max"},
    "hyperparameters": {"batch_size": 32},
    "epochs": 3,
    "max_concurrent": 2,
}


def main() -> int:
    console = Console(width=120)
    with TensorDB() as db:
        x, y = load_digits(return_X_y=True)
        db.publish_samples(
            {"arrays": {"image": x[i].reshape(8, 8).astype("uint8")}, "labels": {"digit": int(y[i])},
             "dataset": "digits", "sample_id": f"digits-{i}"}
            for i in range(len(x))
        )  # fmt: skip
        db.flush()
        study = db.create_study(STUDY, name=sys.argv[1] if len(sys.argv) > 1 else STUDY["name"])
        console.print(f"study {study.name!r}: 2 architectures × 2 widths × 3 folds = 12 trials, 2 at a time")
        study.wait(timeout=1200)
        rows = study.configurations()
        console.print(configurations_table(rows, "val. accuracy", title="mean over 3 folds ± spread"))
        console.print(best_line(study.best(), "validation accuracy"))
        return 0 if study.status == "finished" and all(row["status"] == "finished" for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
