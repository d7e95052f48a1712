"""``tensordb project create NAME | delete NAME --yes | list | carry-offsets NAME``: projects isolated by MongoDB and Kafka.

Run with an administrator's settings (see :mod:`tensordb.infra.provisioning`); ``create`` prints
the settings of the new project once, password included, or writes them to ``--secrets-file``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from rich.console import Console

from tensordb.config import load_settings, mask_uri
from tensordb.errors import ConfigurationError

_console = Console(highlight=False, stderr=True)  # what is said about the run; the settings block goes to stdout


def settings_block(project: str, principal: str, environment: dict[str, str], masked: bool = False) -> str:
    """The project's settings as shell lines to copy (``export`` lines), the password masked if asked."""
    lines = [f"# TensorDB project {project}: hand these settings to its processes and SDK users only"]
    for key, value in environment.items():
        lines.append(f"export {key}={shlex.quote(mask_uri(value) if masked and key == 'TENSORDB_MONGO_URI' else value)}")
    lines.append(
        f"# Kafka: the project's clients act as {principal}; add that principal's own credentials to "
        "TENSORDB_KAFKA_OPTIONS (sasl.username, sasl.password, or a client certificate) where the broker authenticates"
    )
    return "\n".join(lines) + "\n"


def _open_secrets_file(path: Path) -> int:
    """A new file only its owner can read (mode 0600), opened before anything is made, so the password
    is never made without a place to keep it."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigurationError(f"{path} already exists: give --secrets-file a new path (it is never overwritten)") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot create {path} for the project's settings: {exc.strerror}") from exc


def _create(args: argparse.Namespace) -> int:
    from tensordb.infra.provisioning import create_project

    descriptor = _open_secrets_file(args.secrets_file) if args.secrets_file else None
    try:
        made = create_project(load_settings(), args.name, database=args.database, principal=args.principal)
    except BaseException:
        if descriptor is not None:
            os.close(descriptor)
            args.secrets_file.unlink()
        raise
    _console.print(
        f"Project {made.project}: MongoDB user {made.user!r} whose only role is readWrite on database {made.database!r}"
    )
    _console.print(f"Topics: {len(made.topics_created)} created")
    if made.acls.applied:
        _console.print(f"Kafka ACLs: {made.acls.detail}")
    else:
        _console.print(f"[yellow]Kafka ACLs not set:[/] {made.acls.detail}")
    if not made.access_control:
        _console.print(
            "[yellow]Warning:[/] MongoDB let the new user read what its role does not allow: this mongod runs without "
            "access control (--auth), so nothing stops a client without credentials either"
        )
    if descriptor is not None:
        with os.fdopen(descriptor, "w") as secrets_file:
            secrets_file.write(settings_block(made.project, made.principal, made.environment))
        _console.print(f"The settings, password included, are in {args.secrets_file} (mode 0600):")
        print(settings_block(made.project, made.principal, made.environment, masked=True), end="")
    else:
        _console.print("The settings, with the password, shown this once only:")
        print(settings_block(made.project, made.principal, made.environment), end="")
    return 0


def _delete(args: argparse.Namespace) -> int:
    from tensordb.infra.provisioning import delete_project

    if not args.yes:
        print(
            f"tensordb: this drops project {args.name!r}'s MongoDB user and database (all its data), its topics and "
            "ACLs: run again with --yes",
            file=sys.stderr,
        )
        return 2
    for line in delete_project(load_settings(), args.name):
        print(line if line.startswith("not removed") else f"removed: {line}")
    return 0


def _list(args: argparse.Namespace) -> int:
    """One tab-separated line per project, never cut to the terminal's width (names are long)."""
    from tensordb.infra.provisioning import list_projects

    print("\t".join(("project", "database", "kafka-principal", "topics", "created")))
    for record in list_projects(load_settings()):
        database = record.database if record.database_exists else f"{record.database}(empty)"
        print("\t".join((record.project, database, record.principal, str(record.topics), record.created_at[:19])))
    return 0


def _carry_offsets(args: argparse.Namespace) -> int:
    from tensordb.infra.legacy_groups import carry_offsets, legacy_group_prefix

    settings = load_settings().with_changes(project=args.name)
    carried = carry_offsets(settings)
    if not carried:
        print(f"no consumer group {legacy_group_prefix(settings)}* holds offsets of this project: nothing to carry")
    for group, partitions in carried.items():
        print(f"{group}: {partitions} partitions carried" if partitions else f"{group}: already has its offsets")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    project = subparsers.add_parser(
        "project",
        help="provision projects isolated by MongoDB and Kafka themselves (run with administrator settings)",
        description="Each project gets its own MongoDB database and a user whose only role is readWrite on it, its "
        "topics, and prefixed Kafka ACLs for its principal where the broker has ACLs. TENSORDB_MONGO_URI and "
        "TENSORDB_KAFKA_OPTIONS must be an administrator's.",
    )
    actions = project.add_subparsers(dest="project_command", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="make a project and print its settings (the password once)")
    create.add_argument("name")
    create.add_argument("--database", help="the project's MongoDB database (default: TENSORDB_MONGO_DATABASE + '_NAME')")
    create.add_argument("--principal", help="the Kafka principal of its clients (default: User:NAME)")
    create.add_argument(
        "--secrets-file", type=Path, help="write the settings, password included, to this new file (mode 0600) instead"
    )
    create.set_defaults(handler=_create)
    delete = actions.add_parser("delete", help="drop a project's user, database (its data), topics and ACLs")
    delete.add_argument("name")
    delete.add_argument("--yes", action="store_true", help="confirm: the project's data is deleted")
    delete.set_defaults(handler=_delete)
    actions.add_parser("list", help="the projects made by `project create`").set_defaults(handler=_list)
    carry = actions.add_parser(
        "carry-offsets",
        help="once, when upgrading: copy the committed offsets of the groups named PREFIX-NAME-KIND before to PREFIX.NAME.KIND",
        description="Consumer groups are now PREFIX.PROJECT.KIND. Stop every process of the project, run this, then "
        "start the new version: its groups resume where the old ones stopped instead of at the earliest record.",
    )
    carry.add_argument("name")
    carry.set_defaults(handler=_carry_offsets)
