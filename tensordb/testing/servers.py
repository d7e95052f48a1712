"""Real servers for tests and benchmarks, and a throwaway project on them.

- :func:`servers`: the servers named by ``TENSORDB_KAFKA_BOOTSTRAP`` and ``TENSORDB_MONGO_URI``
  when both are set, else our own Tansu and mongod (:class:`tensordb.services.LocalServices`) on
  free ports, stopped when the ``with`` block ends;
- :func:`fresh_project`: a project of its own (topics) and a database of its own on those
  servers, both removed afterwards, so tests and measurements never see each other's data.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka.admin import AdminClient
from pymongo import MongoClient

from tensordb.config import Settings, mask_uri
from tensordb.infra.bus import create_topics
from tensordb.services.tansu import Tansu
from tensordb.testing.helpers import free_port


@dataclass
class Servers:
    """Settings pointing at the servers, and the process ids of those we started (by name)."""

    settings: Settings
    description: str
    pids: dict[str, int | None] = field(default_factory=dict)  # empty for servers elsewhere


@contextmanager
def servers(run_dir: Path, services_dir: Path, project: str = "session") -> Iterator[Servers]:
    """Existing servers when ``TENSORDB_KAFKA_BOOTSTRAP`` and ``TENSORDB_MONGO_URI`` are both set;
    otherwise Tansu and mongod on free ports, with binaries in ``services_dir`` (installed there if
    missing) and their data in ``run_dir``, stopped at the end of the block.

    Parameters
    ----------
    run_dir:
        Where the started servers keep their data, logs and pid files (the caller removes it).
    services_dir:
        Where the server binaries are, or are installed (``tensordb services install``).
    project:
        The project of the settings yielded (tests and benchmarks use :func:`fresh_project`).
    """
    if os.environ.get("TENSORDB_KAFKA_BOOTSTRAP") and os.environ.get("TENSORDB_MONGO_URI"):
        settings = Settings()
        yield Servers(settings, f"existing servers {settings.kafka_bootstrap} / {mask_uri(settings.mongo_uri)}")
        return
    from tensordb.services import LocalServices

    settings = Settings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        mongo_uri=f"mongodb://127.0.0.1:{free_port()}/?replicaSet=rs0",
        services_dir=services_dir,
        project=project,
    )
    services = LocalServices(settings, run_dir=run_dir)
    try:
        services.install()
        services.up()
        pids = {"mongod": services.mongod.process.pid(), "tansu": services.tansu.process.pid()}
        yield Servers(settings, f"own Tansu {settings.kafka_bootstrap} + mongod {settings.mongo_uri}", pids)
    finally:
        services.down()


@contextmanager
def fresh_project(base: Settings, prefix: str = "t") -> Iterator[Settings]:
    """``base`` with a new project (its topics created) and database, both removed afterwards.

    Parameters
    ----------
    base:
        Settings of the servers (from :func:`servers`).
    prefix:
        Start of the project's name, followed by a random suffix (``t3f2a...``, ``bench-ingest-...``).
    """
    name = f"{prefix}{uuid.uuid4().hex[:10]}"
    settings = base.with_changes(project=name, mongo_database=f"tensordb_test_{name.replace('-', '_')}")
    create_topics(settings)
    try:
        yield settings
    finally:
        client: MongoClient = MongoClient(settings.mongo_uri)
        with client:
            client.drop_database(settings.mongo_database)
        AdminClient(settings.kafka_config()).delete_topics(list(settings.all_topics().values()))


def kill_broker(tansu: Tansu) -> None:
    """SIGKILL the local broker, as a crash would, and wait until it is gone: its memory engine forgets
    topics, consumer groups and producer ids (``tansu.start()`` brings up an empty one).

    Parameters
    ----------
    tansu:
        The running broker.
    """
    pid = tansu.process.pid()
    assert pid is not None, "the broker is not running"
    os.kill(pid, signal.SIGKILL)
    tansu.process.wait_exit(timeout=10)
