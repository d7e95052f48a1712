"""``tensordb study create FILE.json | list | show NAME | stop NAME``: studies from the command line.

The tables are shared with ``tensordb demo --study``, which prints a finished study the same way.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

from tensordb.cli.files import read_json_file
from tensordb.config import load_settings
from tensordb.errors import StudySpecError
from tensordb.studies.spec import parse_study


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def configurations_table(rows: Iterable[Mapping[str, Any]], metric: str, title: str | None = None) -> Table:
    """One line per configuration: hyper-parameters, status, rung reached, objective (± spread over
    folds; in brackets, where an unfinished or stopped one stood last)."""
    table = Table("#", "hyper-parameters", "status", "rung", metric, "± spread", "folds", title=title)
    for row in rows:
        status = row["status"] + (f" at rung {row['stopped_at_rung']}" if row["status"] == "stopped" else "")
        table.add_row(
            str(row["configuration"]),
            ", ".join(f"{name}={_number(value)}" for name, value in row["hyperparameters"].items()),
            status,
            _number(row["rung"]),
            _number(row["objective"]) if row["objective"] is not None else f"({_number(row['latest'])})",
            _number(row["spread"]),
            str(len(row["fold_objectives"])) if row["fold_objectives"] else "-",
        )
    return table


def best_line(best: Mapping[str, Any] | None, metric: str) -> str:
    """The best configuration in one sentence (what the demo and ``study show`` print)."""
    if best is None:
        return "no configuration has finished yet"
    spread = f" ± {best['spread']:.4g}" if best.get("spread") is not None else ""
    model = best.get("model")
    version = f"; model {model['name']} v{model['version']} (alias best, trial {model['trial']})" if model else ""
    settings = ", ".join(f"{name}={_number(value)}" for name, value in best["hyperparameters"].items())
    return f"best: configuration {best['configuration']} ({settings}): {metric} {best['objective']:.4g}{spread}{version}"


def _study(args: argparse.Namespace) -> int:
    from tensordb.client import TensorDB

    console = Console()
    # a bad file or spec is refused before connecting
    spec = parse_study(read_json_file(args.file, "study", StudySpecError)).as_json() if args.action == "create" else {}
    with TensorDB(load_settings()) as db:
        if args.action == "create":
            study = db.create_study(spec)
            console.print(f"created study {study.name!r}: {study.spec.configurations_limit()} configurations at most, "
                          f"{study.spec.max_concurrent} trials at a time; follow it with `tensordb study show {study.name}`")  # fmt: skip
        elif args.action == "list":
            table = Table("name", "status", "searcher", "objective", "trials", "unfinished", "created")
            for document in db.list_studies():
                listed = db.study(document["_id"]).spec
                table.add_row(document["_id"], document["status"], listed.searcher.name,
                              f"{listed.objective.direction} {listed.objective.metric}", str(document["trials"]),
                              str(document["unfinished"]), f"{document['created_at']:%Y-%m-%d %H:%M:%S}")  # fmt: skip
            console.print(table)
        elif args.action == "show":
            study = db.study(args.name)
            if args.json:
                print(json.dumps({"study": db.studies.get(args.name), "configurations": study.configurations(),
                                  "decisions": study.decisions()}, indent=2, default=str))  # fmt: skip
                return 0
            metric = study.spec.objective.metric
            document = db.studies.get(args.name)
            console.print(f"study {study.name!r}: {document['status']}, {study.spec.searcher.name} search, "
                          f"{study.spec.objective.direction} validation {metric}")  # fmt: skip
            if document.get("error"):
                console.print(f"[red]{document['error']}[/]")
            console.print(configurations_table(study.configurations(), metric))
            console.print(best_line(study.best(), metric))
        elif args.action == "stop":
            document = db.study(args.name).stop()
            console.print(f"study {args.name!r} is {document['status']}; its unfinished trials were cancelled")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    study = subparsers.add_parser("study", help="hyper-parameter studies and k-fold experiments")
    actions = study.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("create", help="create a study from a JSON file and submit its first trials").add_argument("file")
    actions.add_parser("list", help="list the project's studies")
    show = actions.add_parser("show", help="a study's configurations, their objectives and the best so far")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print the study, its configurations and verdicts as JSON")
    actions.add_parser("stop", help="stop a study and cancel its unfinished trials").add_argument("name")
    study.set_defaults(handler=_study)
