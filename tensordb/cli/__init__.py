"""The ``tensordb`` command line: one sub-command per long-running part or admin task.

Each area registers its own sub-commands (``add_commands(subparsers)``) so this file stays an index.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence

from pymongo.errors import ServerSelectionTimeoutError

from tensordb.errors import TensorDBError
from tensordb.version import __version__

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    from tensordb.cli import commands, healthcheck, project, stage, study
    from tensordb.services import commands as service_commands

    parser = argparse.ArgumentParser(
        prog="tensordb",
        description="TensorDB: Kafka + MongoDB infrastructure for continuous machine learning.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    service_commands.add_commands(subparsers)
    commands.add_commands(subparsers)
    study.add_commands(subparsers)
    stage.add_commands(subparsers)
    healthcheck.add_commands(subparsers)
    project.add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except TensorDBError as exc:
        print(f"tensordb: error: {_masked(str(exc))}", file=sys.stderr)
        return 1
    except ServerSelectionTimeoutError:
        from tensordb.config import load_settings, uri_without_credentials

        uri = uri_without_credentials(load_settings().mongo_uri)
        print(
            f"tensordb: error: MongoDB at {uri} did not answer: start it (`tensordb services up`) or set TENSORDB_MONGO_URI",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception:  # noqa: BLE001 - a failure TensorDB did not foresee: its traceback, without secrets
        print(_masked(traceback.format_exc()), file=sys.stderr, end="")
        return 1


def _masked(text: str) -> str:
    """``text`` as a command prints it: masked like every log line, with this process's settings'
    secrets when they load (a driver's error may quote its client's options)."""
    from tensordb.config import load_settings, mask_text, secret_values

    try:
        secrets = secret_values(load_settings())
    except TensorDBError:  # the settings themselves are wrong: the patterns still mask what is named
        secrets = []
    return mask_text(text, secrets)
