"""``tensordb stage register FILE.json | list | show NAME | pause NAME | resume NAME | backfill NAME``."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tensordb.cli.files import read_json_file
from tensordb.config import load_settings
from tensordb.errors import StageSpecError
from tensordb.stages.spec import parse_stage


def _when(value: Any) -> str:
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M:%S}"


def _watch_backfill(db: Any, name: str, console: Console) -> dict[str, Any]:
    """A progress bar of the stage's backfill until it is done (Ctrl-C leaves it running)."""
    stage = db.stages.get(name)
    columns = (TextColumn(f"backfill of {name} v{stage['version']}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("backfill", total=stage["backfill"]["total"])
        while (state := db.stages.get(name)["backfill"])["status"] != "done":
            progress.update(task, completed=min(state["done"], state["total"]))
            time.sleep(0.5)
        progress.update(task, completed=state["total"])
    return state


def _stage(args: argparse.Namespace) -> int:
    from tensordb.client import TensorDB

    console = Console()
    spec = parse_stage(read_json_file(args.file, "stage", StageSpecError)).as_json() if args.action == "register" else {}
    with TensorDB(load_settings()) as db:
        if args.action == "register":
            registered = db.register_stage(spec)
            console.print(f"stage {registered.name!r} v{registered.version} registered: {registered.function} on new samples of "
                          f"{json.dumps(registered.input.filter)} → dataset {registered.output.dataset!r}; older samples: "
                          f"`tensordb stage backfill {registered.name}`")  # fmt: skip
        elif args.action == "list":
            table = Table(
                "name", "version", "input", "function", "output", "paused", "processed", "derived", "errors", "lag", "last"
            )
            for stage in db.stages.list():
                counters, stage_spec = stage["counters"], stage["spec"]
                table.add_row(stage["_id"], str(stage["version"]), json.dumps(stage_spec["input"]["filter"]), stage_spec["function"],
                              stage_spec["output"]["dataset"], "yes" if stage["paused"] else "no", str(counters["processed"]),
                              str(counters["derived"]), str(counters["errors"]), str(stage["lag"]), _when(counters["last_at"]))  # fmt: skip
            console.print(table)
        elif args.action == "show":
            print(json.dumps(db.stages.get(args.name), indent=2, default=str))
        elif args.action in ("pause", "resume"):
            getattr(db.stages, args.action)(args.name)
            console.print(f"stage {args.name!r} {args.action}d (the processors act on it within 5 s)")
        elif args.action == "backfill":
            state = db.backfill_stage(args.name)["backfill"]
            if args.no_wait:
                console.print(
                    f"backfill of {args.name!r} requested: {state['total']} samples; follow it with `tensordb stage show {args.name}`"
                )
                return 0
            state = _watch_backfill(db, args.name, console)
            console.print(
                f"backfill of {args.name!r} done: {state['done']} samples read, {state['derived']} derived, {state['errors']} dead-lettered"
            )
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    stage = subparsers.add_parser("stage", help="transform stages: preprocessing that derives samples on the stream")
    actions = stage.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("register", help="register a stage (or a new version) from a JSON file").add_argument("file")
    actions.add_parser("list", help="the project's stages with their counters and lag")
    for action, text in (
        ("show", "a stage as JSON"),
        ("pause", "stop deriving"),
        ("resume", "derive again, from where it paused"),
    ):
        actions.add_parser(action, help=text).add_argument("name")
    backfill = actions.add_parser("backfill", help="apply the stage to the samples stored before it (resumable), with progress")
    backfill.add_argument("name")
    backfill.add_argument("--no-wait", action="store_true", help="request it and return (the processors run it)")
    stage.set_defaults(handler=_stage)
