"""Session fixtures: the real Kafka-protocol broker and mongod, and an isolated project per test;
markers from the folder a test is in.

Where the servers come from, in order:
1. ``TENSORDB_KAFKA_BOOTSTRAP`` and ``TENSORDB_MONGO_URI`` when both are set (existing servers);
2. testcontainers' Kafka and MongoDB when ``TENSORDB_TEST_BACKEND=containers``;
3. otherwise Tansu and mongod started on free ports through ``tensordb services`` itself.
Each test gets its own project (topics) and database, so tests never see each other's data.
Only tests that request ``servers`` (directly or through ``settings``, ``store``...) start them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pymongo.database import Database

from tensordb.config import Settings
from tensordb.infra.store import Store
from tensordb.testing import ChildProcess, fresh_project, processors_process, raw_database, worker_process
from tensordb.testing import servers as local_or_configured_servers
from tests import REPO, TASK_SCRIPTS, TESTS

# Every process the tests start inherits this: no metrics endpoint on the fixed default ports (tests
# bind only free ports; the metrics tests pass --metrics-port with one).
os.environ["TENSORDB_METRICS_PORT"] = "0"

#: Folders whose tests all get the marker of that name (``pytest -m unit``, or ``pytest tests/unit``).
LAYER_FOLDERS = ("unit", "integration", "e2e")
#: What the session's settings trust: the tests' own code (tests.security.reexports...) and the kit's builders.
TRUSTED_MODULES = ("tests", "tensordb.testing.models", "tensordb.testing.synthetic", "tensordb.testing.stages")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test ``unit``, ``integration`` or ``e2e`` after its folder; elsewhere (tests/security)
    ``integration`` when it needs the session's servers, ``unit`` when not. A unit test that requests
    the servers is a collection error, so ``pytest -m unit`` never starts any."""
    for item in items:
        parts = item.path.resolve().relative_to(TESTS).parts
        needs_servers = "servers" in getattr(item, "fixturenames", ())
        kind = parts[0] if parts[0] in LAYER_FOLDERS else ("integration" if needs_servers else "unit")
        if kind == "unit" and needs_servers:
            raise pytest.UsageError(f"{item.nodeid} is a unit test but needs the servers: move it to tests/integration")
        item.add_marker(getattr(pytest.mark, kind))


def _containers() -> Iterator[Settings]:
    from testcontainers.kafka import KafkaContainer
    from testcontainers.mongodb import MongoDbContainer

    try:
        import docker

        docker.from_env().ping()
    except Exception as exc:  # noqa: BLE001 - any failure means no usable engine
        pytest.exit(f"TENSORDB_TEST_BACKEND=containers but no Docker engine answers ({exc}): start Docker or unset it")
    with KafkaContainer("confluentinc/cp-kafka:7.6.0") as kafka, MongoDbContainer("mongo:7.0") as mongo:
        yield Settings(kafka_bootstrap=kafka.get_bootstrap_server(), mongo_uri=mongo.get_connection_url())


def _local_services(run_dir: Path) -> Iterator[Settings]:
    with local_or_configured_servers(run_dir, services_dir=REPO / ".tensordb", project="session") as found:
        yield found.settings


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings pointing at real servers, shared by the whole session.

    They trust the tests' own code: the ``tests`` package, the kit's builders
    (``tensordb.testing.models``) and scripts in tests/task_scripts (child processes get the same
    settings through their environment)."""
    if os.environ.get("TENSORDB_TEST_BACKEND") == "containers" and not (
        os.environ.get("TENSORDB_KAFKA_BOOTSTRAP") and os.environ.get("TENSORDB_MONGO_URI")
    ):
        found = _containers()
    else:
        found = _local_services(tmp_path_factory.mktemp("services"))
    for settings in found:  # one: the generator's clean-up runs when the session ends
        yield settings.with_changes(trusted_modules=TRUSTED_MODULES, task_script_dirs=(TASK_SCRIPTS,))


@pytest.fixture
def settings(servers: Settings) -> Iterator[Settings]:
    """A fresh project (own topics) and database on the session's servers; removed afterwards."""
    with fresh_project(servers) as project_settings:
        yield project_settings


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    """This test's project database, with every collection and index created."""
    with Store(settings) as store:
        store.ensure_indexes()
        yield store


@pytest.fixture
def raw_db(settings: Settings) -> Iterator[Database]:
    """This test's database through a plain pymongo client, as any client holding the credentials
    sees it: for corrupting, planting or counting what the store keeps to itself (blob chunks)."""
    with raw_database(settings) as database:
        yield database


@pytest.fixture
def processors(settings: Settings, tmp_path: Path) -> Iterator[ChildProcess]:
    """The stream processors (``tensordb processors``) running for this test's project."""
    process = processors_process(settings, tmp_path / "processors.log")
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def ingest(settings: Settings) -> Iterator[Callable[[list[dict]], None]]:
    """Persist sample records through the ingest processor's own code, in-process (no Kafka hop),
    for tests about what is read back rather than about the stream transport."""
    from streams.ingest import handle_samples
    from streams.processing import ProcessorContext, process_batch
    from tensordb import records
    from tensordb.config import Topic
    from tensordb.infra.bus import Received

    context = ProcessorContext(settings)
    offsets = iter(range(10**9))

    def persist(batch: list[dict]) -> None:
        received = [
            Received(settings.topic(Topic.INGEST), 0, next(offsets), None, None, records.validate(r, "sample/1"), None)
            for r in batch
        ]
        process_batch(context, received, handle_samples)

    yield persist
    context.close()


@pytest.fixture
def start_worker(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., ChildProcess]]:
    """Start trainer workers (``tensordb worker``) for this test's project; all stopped afterwards."""
    started: list[ChildProcess] = []

    def start(lease_seconds: float = 30.0, slots: int = 1, gpus: int | None = None) -> ChildProcess:
        worker = worker_process(settings, tmp_path / f"worker-{len(started)}.log", lease_seconds, slots, gpus)
        started.append(worker)
        worker.start()
        return worker

    yield start
    for worker in started:
        worker.stop()
