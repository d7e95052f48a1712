"""``tensordb services`` run in-process with a state folder of its own, for the tests of its command line."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tensordb.services.commands import add_commands
from tests import REPO

#: Where the installed programs (Tansu, mongod) are: shared by every test, whatever its state folder.
SERVICES_DIR = Path(os.environ.get("TENSORDB_SERVICES_DIR", REPO / ".tensordb"))


def services_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kafka_bootstrap: str, mongo_uri: str
) -> tuple[Path, Callable[..., int]]:
    """A services folder under ``tmp_path`` (its programs linked to the installed ones) named by the
    environment with the given addresses, and a function running ``tensordb services ARGS...`` against it."""
    services_dir = tmp_path / "services"
    services_dir.mkdir()
    for name in ("bin", "npm"):
        (services_dir / name).symlink_to((SERVICES_DIR / name).resolve())
    monkeypatch.setenv("TENSORDB_SERVICES_DIR", str(services_dir))
    monkeypatch.setenv("TENSORDB_KAFKA_BOOTSTRAP", kafka_bootstrap)
    monkeypatch.setenv("TENSORDB_MONGO_URI", mongo_uri)
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())

    def run(*argv: str) -> int:
        args = parser.parse_args(["services", *argv])
        return int(args.handler(args))

    return services_dir, run
