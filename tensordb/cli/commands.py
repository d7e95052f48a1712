"""Sub-commands for topics, the stream processors and the demo (services live in tensordb.services)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from pydantic import SecretStr

from tensordb.config import Settings, load_settings
from tensordb.errors import ConfigurationError


def _topics_create(args: argparse.Namespace) -> int:
    from tensordb.infra.bus import create_topics

    settings = load_settings()
    created = create_topics(settings)
    for name in settings.all_topics().values():
        print(f"{name}\t{'created' if name in created else 'exists'}")
    return 0


def _operated(args: argparse.Namespace, kind: str, **changes: str) -> Settings:
    """The settings of a long-running command (``changes`` on top), once its logging is set up and
    its metrics endpoint (``--metrics-port``) started: before it opens its MongoDB clients, whose
    writes are timed."""
    from tensordb.infra.logging import configure_logging
    from tensordb.infra.metrics import start_metrics

    settings = load_settings(**changes)
    configure_logging(settings, level=getattr(args, "loglevel", None))
    start_metrics(settings, kind, port=args.metrics_port)
    return settings


def _token_file(args: argparse.Namespace, field: str) -> dict[str, str]:
    """``{field: token}`` from the file ``--token-file`` names (its content, whitespace around it
    removed), or nothing without the option: a token never travels in the command line."""
    if args.token_file is None:
        return {}
    try:
        token = Path(args.token_file).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read the token file {args.token_file} ({exc}): fix --token-file") from exc
    if not token:
        raise ConfigurationError(f"the token file {args.token_file} is empty: write the token into it")
    return {field: token}


def _check_binding(host: str, token: SecretStr | None, command: str) -> None:
    """Refuse an HTTP endpoint beyond loopback without a token before anything starts (the metrics endpoint included)."""
    from tensordb.infra.http_guard import check_binding

    check_binding(host, token.get_secret_value() if token else None, f"tensordb {command}", f"TENSORDB_{command.upper()}_TOKEN")


def _processors(args: argparse.Namespace) -> int:
    from streams.app import run

    settings = _operated(args, "processors")
    run(settings, loglevel=args.loglevel or settings.log_level)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from workers.trainer import run

    settings = _operated(args, "worker")
    run(settings, lease_seconds=args.lease or settings.worker_lease_seconds, slots=args.slots, gpus=args.gpus)
    return 0


def _predictor(args: argparse.Namespace) -> int:
    from workers.predictor import run

    run(_operated(args, "predictor"), args.policy, args.version, args.max_batch, args.max_wait_ms)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from workers.serve import run

    token = _token_file(args, "serve_token")
    settings = load_settings(**token)
    policy = args.policy or settings.serve_policy
    if not policy:
        raise ConfigurationError("`tensordb serve` needs a policy: pass --policy NAME or set TENSORDB_SERVE_POLICY")
    _check_binding(args.host or settings.serve_host, settings.serve_token, "serve")
    settings = _operated(args, "serve", **token)
    run(settings, policy, args.host or settings.serve_host, args.port or settings.serve_port)
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    from dashboard.app import run

    token = _token_file(args, "dashboard_token")
    settings = load_settings(**token)
    _check_binding(args.host or settings.dashboard_host, settings.dashboard_token, "dashboard")
    settings = _operated(args, "dashboard", **token)
    run(settings, args.host or settings.dashboard_host, args.port or settings.dashboard_port)
    return 0


def _policy(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from tensordb.infra.store import Store
    from tensordb.loop.policies import Policies, Policy

    with Store(load_settings()) as store:
        policies = Policies(store)
        if args.action == "register":
            policy = policies.register(Policy(**json.loads(Path(args.file).read_text())))
            print(f"registered policy {policy.name!r}")
        elif args.action == "list":
            table = Table("name", "trigger", "objective", "margin", "new samples", "triggers", "paused")
            for document in policies.list():
                table.add_row(document["name"], json.dumps(document["trigger"]), json.dumps(document["objective"]),
                              str(document["promotion"].get("margin", 0)), str(document["new_samples"]), str(document["triggers"]),
                              "yes" if document["paused"] else "no")  # fmt: skip
            Console().print(table)
        elif args.action == "show":
            print(json.dumps(policies.document(args.name), indent=2, default=str))
        elif args.action in ("pause", "resume"):
            getattr(policies, args.action)(args.name)
            print(f"policy {args.name!r} {args.action}d")
        elif args.action == "delete":
            print(f"policy {args.name!r} {'deleted' if policies.delete(args.name) else 'did not exist'}")
    return 0


def _db_upgrade(args: argparse.Namespace) -> int:
    """Upgrade the database; exit 1 if documents were kept under their old ids (collisions)."""
    import sys

    from tensordb.infra.store import Store

    with Store(load_settings()) as store:
        report = store.upgrade()
    print(f"database {store.settings.mongo_database!r}: schema {report.from_version} -> {report.to_version}, "
          f"{report.renamed} documents renamed to project-scoped ids")  # fmt: skip
    for collision in report.collisions:
        print(f"tensordb: collision: {collision}", file=sys.stderr)
    return 1 if report.collisions else 0


def _demo(args: argparse.Namespace) -> int:
    if args.study:
        from tensordb.cli.demo_study import run_study_demo

        return run_study_demo(load_settings())
    from tensordb.cli.demo import run_demo

    return run_demo(load_settings())


def _whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number of at least ``minimum`` (argparse names the option in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


class _RefusedTokenOption(argparse.Action):
    """The former ``--token TOKEN``, refused with what to use instead: every user of the machine
    reads a process's command line (``ps``), so a token there is no secret."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object, option: str | None = None
    ) -> None:
        parser.error(
            f"--token is no longer accepted: a command line is visible to every user of this machine (ps); "
            f"set {self.const} in the environment (or a file of that name in TENSORDB_SECRETS_DIR), or pass --token-file PATH"
        )


def _add_http_arguments(parser: argparse.ArgumentParser, setting: str, port: int) -> None:
    """``--host``, ``--port`` and ``--token-file`` of an HTTP endpoint, defaulting to its settings
    (``TENSORDB_<SETTING>_HOST``, ``_PORT``, ``_TOKEN``); the old ``--token`` is refused."""
    variable = f"TENSORDB_{setting}_TOKEN"
    parser.add_argument(
        "--host", default=None, help=f"address to bind (default: TENSORDB_{setting}_HOST, 127.0.0.1; any other needs a token)"
    )
    parser.add_argument("--port", type=int, default=None, help=f"port (default: TENSORDB_{setting}_PORT, {port})")
    parser.add_argument(
        "--token-file",
        default=None,
        metavar="PATH",
        help=f"file holding the token every request must carry (default: ${variable}; never on the command line)",
    )
    parser.add_argument("--token", nargs="?", const=variable, action=_RefusedTokenOption, help=argparse.SUPPRESS)


def _add_metrics_argument(parser: argparse.ArgumentParser, kind: str) -> None:
    """``--metrics-port`` of a long-running command (README, "Operating")."""
    from tensordb.infra.metrics import DEFAULT_PORTS

    parser.add_argument(
        "--metrics-port",
        type=_whole_number(0),
        default=None,
        help=f"port of /metrics, /health and /ready on TENSORDB_METRICS_HOST (default: TENSORDB_METRICS_PORT, else "
        f"{DEFAULT_PORTS[kind]}; 0: none)",
    )


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    topics = subparsers.add_parser("topics", help="manage the project's Kafka topics")
    topic_commands = topics.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    create = topic_commands.add_parser("create", help="create every TensorDB topic that is missing")
    create.set_defaults(handler=_topics_create)

    processors = subparsers.add_parser("processors", help="run the stream processors in the foreground")
    processors.add_argument(
        "--loglevel", default=None, choices=["debug", "info", "warning", "error"], help="default: TENSORDB_LOG_LEVEL, info"
    )
    _add_metrics_argument(processors, "processors")
    processors.set_defaults(handler=_processors)

    worker = subparsers.add_parser("worker", help="run a trainer worker: claims and runs jobs until stopped")
    worker.add_argument(
        "--lease",
        type=float,
        default=None,
        help="seconds a job stays claimed without a heartbeat (default: TENSORDB_WORKER_LEASE_SECONDS, 30)",
    )
    worker.add_argument(
        "--slots",
        type=_whole_number(1),
        default=1,
        help="slots offered: jobs run at once while the slots they ask for fit (a job asks for 1 unless submitted with slots=N) (default: 1)",
    )
    worker.add_argument(
        "--gpus",
        type=_whole_number(0),
        default=None,
        help="GPUs offered to jobs that ask for some (default: those of CUDA_VISIBLE_DEVICES, else of nvidia-smi -L, else 0)",
    )
    _add_metrics_argument(worker, "worker")
    worker.set_defaults(handler=_worker)

    predictor = subparsers.add_parser("predictor", help="answer predict requests from Kafka with a policy's production model")
    predictor.add_argument("--policy", required=True, help="policy (model) name whose production version answers")
    predictor.add_argument("--version", type=_whole_number(1), default=None, help="answer requests for this version instead")
    predictor.add_argument(
        "--max-batch", type=_whole_number(1), default=64, help="most instances predicted at once (default: 64)"
    )
    predictor.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long to wait for more requests once one arrived (default: 5)"
    )
    _add_metrics_argument(predictor, "predictor")
    predictor.set_defaults(handler=_predictor)

    serve = subparsers.add_parser("serve", help="serve a policy's production model over HTTP")
    serve.add_argument(
        "--policy", default=None, help="policy (model) name whose production version to serve (default: TENSORDB_SERVE_POLICY)"
    )
    _add_http_arguments(serve, "SERVE", 8000)
    _add_metrics_argument(serve, "serve")
    serve.set_defaults(handler=_serve)

    dashboard = subparsers.add_parser("dashboard", help="serve the live dashboard: runs, curves, models, data")
    _add_http_arguments(dashboard, "DASHBOARD", 8050)
    _add_metrics_argument(dashboard, "dashboard")
    dashboard.set_defaults(handler=_dashboard)

    policy = subparsers.add_parser("policy", help="manage continuous-training policies")
    actions = policy.add_subparsers(dest="action", required=True, metavar="ACTION")
    register = actions.add_parser("register", help="create or replace a policy from a JSON file")
    register.add_argument("file")
    actions.add_parser("list", help="list the project's policies")
    for action in ("show", "pause", "resume", "delete"):
        actions.add_parser(action, help=f"{action} a policy").add_argument("name")
    policy.set_defaults(handler=_policy)

    database = subparsers.add_parser("db", help="manage the MongoDB database's schema version")
    db_commands = database.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_commands.add_parser(
        "upgrade", help="upgrade documents written by earlier TensorDB versions (once, with their processes stopped)"
    ).set_defaults(handler=_db_upgrade)

    demo = subparsers.add_parser("demo", help="run the demo against the running services")
    demo.add_argument("--study", action="store_true", help="run the hyper-parameter study demo (ASHA on the digits) instead")
    demo.set_defaults(handler=_demo)
