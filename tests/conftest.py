"""Session fixtures: the real Kafka-protocol broker and mongod, and an isolated project per test.

Where the servers come from, in order:
1. ``TENSORDB_KAFKA_BOOTSTRAP`` and ``TENSORDB_MONGO_URI`` when both are set (existing servers);
2. testcontainers' Kafka and MongoDB when ``TENSORDB_TEST_BACKEND=containers``;
3. otherwise Tansu and mongod started on free ports through ``tensordb services`` itself.
Each test gets its own project (topics) and database, so tests never see each other's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient
from pymongo import MongoClient

from tensordb.config import Settings
from tensordb.infra.bus import create_topics
from tensordb.infra.store import Store
from tensordb.services.children import ChildProcess, processors_process, worker_process
from tests.helpers import free_port

REPO = Path(__file__).resolve().parent.parent
TASK_SCRIPTS = REPO / "tests" / "task_scripts"


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
    from tensordb.services import LocalServices

    settings = Settings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        mongo_uri=f"mongodb://127.0.0.1:{free_port()}/?replicaSet=rs0",
        services_dir=REPO / ".tensordb",
        project="session",
    )
    services = LocalServices(settings, run_dir=run_dir)
    services.install()
    services.up()
    try:
        yield settings
    finally:
        services.down()


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings pointing at real servers, shared by the whole session.

    They trust the tests' own code: builders in the ``tests`` package and scripts in
    tests/task_scripts (child processes get the same settings through their environment)."""
    if os.environ.get("TENSORDB_KAFKA_BOOTSTRAP") and os.environ.get("TENSORDB_MONGO_URI"):
        found: Iterator[Settings] = iter([Settings()])
    elif os.environ.get("TENSORDB_TEST_BACKEND") == "containers":
        found = _containers()
    else:
        found = _local_services(tmp_path_factory.mktemp("services"))
    for settings in found:  # one: the generator's clean-up runs when the session ends
        yield settings.with_changes(trusted_modules=("tests",), task_script_dirs=(TASK_SCRIPTS,))


@pytest.fixture
def settings(servers: Settings) -> Iterator[Settings]:
    """A fresh project (own topics) and database on the session's servers; removed afterwards."""
    name = f"t{uuid.uuid4().hex[:10]}"
    project_settings = servers.with_changes(project=name, mongo_database=f"tensordb_test_{name}")
    create_topics(project_settings)
    yield project_settings
    MongoClient(project_settings.mongo_uri).drop_database(project_settings.mongo_database)
    AdminClient(project_settings.kafka_config()).delete_topics(list(project_settings.all_topics().values()))


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    """This test's project database, with every collection and index created."""
    with Store(settings) as store:
        store.ensure_indexes()
        yield store


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

    def start(lease_seconds: float = 30.0) -> ChildProcess:
        worker = worker_process(settings, tmp_path / f"worker-{len(started)}.log", lease_seconds)
        started.append(worker)
        worker.start()
        return worker

    yield start
    for worker in started:
        worker.stop()
