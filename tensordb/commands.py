"""Sub-commands for topics, the stream processors and the demo (services live in tensordb.services)."""

from __future__ import annotations

import argparse

from tensordb.config import load_settings


def _topics_create(args: argparse.Namespace) -> int:
    from tensordb.bus import create_topics

    settings = load_settings()
    created = create_topics(settings)
    for name in settings.all_topics().values():
        print(f"{name}\t{'created' if name in created else 'exists'}")
    return 0


def _processors(args: argparse.Namespace) -> int:
    from streams.app import run

    run(load_settings(), loglevel=args.loglevel)
    return 0


def _worker(args: argparse.Namespace) -> int:
    import logging

    from workers.trainer import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(load_settings(), lease_seconds=args.lease)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from tensordb.demo import run_demo

    return run_demo(load_settings())


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    topics = subparsers.add_parser("topics", help="manage the project's Kafka topics")
    topic_commands = topics.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    create = topic_commands.add_parser("create", help="create every TensorDB topic that is missing")
    create.set_defaults(handler=_topics_create)

    processors = subparsers.add_parser("processors", help="run the stream processors (faust) in the foreground")
    processors.add_argument("--loglevel", default="info", choices=["debug", "info", "warning", "error"])
    processors.set_defaults(handler=_processors)

    worker = subparsers.add_parser("worker", help="run a trainer worker: claims and runs jobs until stopped")
    worker.add_argument("--lease", type=float, default=30.0, help="seconds a job stays claimed without a heartbeat")
    worker.set_defaults(handler=_worker)

    demo = subparsers.add_parser("demo", help="run the demo against the running services")
    demo.set_defaults(handler=_demo)
