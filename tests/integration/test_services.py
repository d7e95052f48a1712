"""``tensordb services``: real Tansu and mongod processes on free ports.

Binaries are shared (the repository's ``.tensordb``, installed once); each test keeps its state
in its own temporary run directory and stops every process it started.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from pymongo import MongoClient

from tensordb.config import Settings, Topic
from tensordb.errors import ServiceError
from tensordb.services import LocalServices, ServiceStatus
from tensordb.services.process import free_port, port_is_free
from tests.services_cli import SERVICES_DIR, services_cli

HOST = "127.0.0.1"


def _settings(**changes: object) -> Settings:
    fields = {
        "kafka_bootstrap": f"{HOST}:{free_port(HOST)}",
        "mongo_uri": f"mongodb://{HOST}:{free_port(HOST)}/",
        "services_dir": SERVICES_DIR,
        "project": "services",
    }
    return Settings(**{**fields, **changes})


@pytest.fixture(scope="module")
def installed() -> None:
    LocalServices(_settings()).install()


@pytest.fixture
def services(installed: None, tmp_path: Path) -> Iterator[LocalServices]:
    local = LocalServices(_settings(), run_dir=tmp_path / "run")
    try:
        yield local
    finally:
        local.down()


def _by_name(statuses: list[ServiceStatus]) -> dict[str, ServiceStatus]:
    return {status.name: status for status in statuses}


def _produce(bootstrap: str, topic: str, value: bytes) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, value, partition=0)
    assert producer.flush(10) == 0, "the broker did not acknowledge the record"


def _first_record(bootstrap: str, topic: str) -> bytes | None:
    """The first record of partition 0 (assigned, not subscribed: no consumer-group join to wait for)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "test-services", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                return message.value()
        return None
    finally:
        consumer.close()


def test_up_serves_kafka_and_mongodb_then_down_leaves_nothing_running(services: LocalServices) -> None:
    started = _by_name(services.up())
    assert {name: (status.running, status.changed) for name, status in started.items()} == {
        "tansu": (True, True),
        "mongod": (True, True),
    }
    settings = services.settings
    topic = settings.topic(Topic.LOGS)
    existing = AdminClient(settings.kafka_config()).list_topics(timeout=5).topics
    assert set(settings.all_topics().values()) <= set(existing)  # up created every TensorDB topic
    _produce(settings.kafka_bootstrap, topic, b"hello")
    assert _first_record(settings.kafka_bootstrap, topic) == b"hello"
    with MongoClient(f"mongodb://{services.mongod.address}/?replicaSet=rs0", serverSelectionTimeoutMS=5000) as client:
        client.test_services.things.insert_one({"_id": "a", "n": 1})
        assert client.test_services.things.find_one({"_id": "a"}) == {"_id": "a", "n": 1}
        is_master = client.admin.command("isMaster")
        assert is_master["ismaster"] and is_master["setName"] == "rs0"

    again = _by_name(services.up())
    assert all(status.running and not status.changed for status in again.values())
    assert {name: status.pid for name, status in again.items()} == {name: s.pid for name, s in started.items()}
    assert [(status.name, status.running) for status in services.status()] == [("tansu", True), ("mongod", True)]

    stopped = _by_name(services.down())
    assert stopped["tansu"].changed and stopped["mongod"].changed
    for status in started.values():
        assert not Path(f"/proc/{status.pid}").exists(), f"{status.name} (pid {status.pid}) is still there"
    assert port_is_free(HOST, services.tansu.port) and port_is_free(HOST, services.mongod.port)
    assert not list((services.run_dir / "pids").iterdir())


def test_a_busy_port_is_refused_with_one_line_that_says_what_to_do(services: LocalServices) -> None:
    port = services.tansu.port
    with socket.socket() as squatter:
        squatter.bind((HOST, port))
        squatter.listen()
        with pytest.raises(ServiceError) as error:
            services.up()
    assert str(error.value) == (
        f"port {port} on 127.0.0.1 is already in use by another program: "
        "stop it or set TENSORDB_KAFKA_BOOTSTRAP=127.0.0.1:OTHERPORT"
    )
    assert not any(status.running for status in services.status())  # refused before starting anything


@pytest.mark.parametrize(
    ("change", "setting"),
    [
        ({"kafka_bootstrap": "kafka.example.com:9092"}, "TENSORDB_KAFKA_BOOTSTRAP"),
        ({"mongo_uri": "mongodb://db.example.com:27017/?replicaSet=rs0"}, "TENSORDB_MONGO_URI"),
    ],
)
def test_settings_that_point_at_external_servers_start_nothing(change: dict, setting: str, tmp_path: Path) -> None:
    local = LocalServices(_settings(**change), run_dir=tmp_path)
    with pytest.raises(ServiceError, match=f"^{setting} points at .*example.com, an external server"):
        local.up()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "db.example.com"])
def test_services_beyond_loopback_are_refused_without_an_explicit_flag(host: str, tmp_path: Path) -> None:
    """mongod without --auth and the broker without authentication must not reach the network by accident (finding 14)."""
    local = LocalServices(_settings(services_host=host), run_dir=tmp_path)
    with pytest.raises(ServiceError, match=f"TENSORDB_SERVICES_HOST={host} .* no authentication .* --allow-remote"):
        local.up()
    assert not any(status.running for status in local.status())  # refused before starting anything

    # with the flag the refusal is gone: up goes on to its next check (a leftover folder, so nothing starts here)
    allowed = LocalServices(_settings(services_host=host, services_allow_remote=True), run_dir=tmp_path)
    (tmp_path / "s3rver").mkdir()
    with pytest.raises(ServiceError, match="--durable`, which was removed"):
        allowed.up()


def test_command_line_up_refuses_a_remote_host_and_says_how_to_allow_it(tmp_path: Path, monkeypatch, capsys) -> None:
    from tensordb.cli import main

    settings = _settings()
    services_cli(tmp_path, monkeypatch, settings.kafka_bootstrap, settings.mongo_uri)
    monkeypatch.setenv("TENSORDB_SERVICES_HOST", "0.0.0.0")
    assert main(["services", "up"]) == 1
    assert "no authentication" in capsys.readouterr().err
    (tmp_path / "services" / "run" / "s3rver").mkdir(parents=True)  # stops `up` at its next check, before starting anything
    assert main(["services", "up", "--allow-remote"]) == 1
    assert "--durable`, which was removed" in capsys.readouterr().err


def test_a_pid_file_naming_another_program_is_never_trusted(tmp_path: Path) -> None:
    local = LocalServices(_settings(), run_dir=tmp_path)
    pid_file = local.tansu.process.pid_path
    pid_file.parent.mkdir(parents=True)
    pid_file.write_text(f"{os.getpid()}\n")  # this Python process: alive, but not Tansu

    assert not _by_name(local.down())["tansu"].changed  # nothing signalled: this test is still running
    assert not pid_file.exists()


def test_the_memory_broker_forgets_what_it_held_when_it_stops(services: LocalServices) -> None:
    """The guarantee `services up` states: acknowledged records live as long as the broker runs."""
    services.up()
    bootstrap, topic = services.settings.kafka_bootstrap, services.settings.topic(Topic.LOGS)
    _produce(bootstrap, topic, b"held")
    assert _first_record(bootstrap, topic) == b"held"
    services.down()
    services.up()
    assert _first_record(bootstrap, topic) is None


def test_a_leftover_of_the_removed_durable_mode_is_refused_plainly(installed: None, tmp_path: Path) -> None:
    local = LocalServices(_settings(), run_dir=tmp_path)
    (tmp_path / "s3rver" / "data").mkdir(parents=True)
    with pytest.raises(ServiceError, match="--durable`, which was removed .* memory only"):
        local.up()
    assert not any(status.running for status in local.status())  # refused before starting anything


def test_down_waits_until_the_processors_stored_every_record_the_broker_acknowledged(services: LocalServices) -> None:
    from tensordb.client import TensorDB

    services.up()
    services.start_app("processors", ["processors"])
    with TensorDB(services.settings) as db:
        ids = db.publish_samples({"arrays": np.full(64, i % 256, np.uint8), "dataset": "d"} for i in range(3000))
    services.down()  # right after the producer's acknowledgements: most are not stored yet
    services.up()
    with MongoClient(services.settings.mongo_uri) as client:
        stored = client[services.settings.mongo_database]["samples"].count_documents({"project": services.settings.project})
    assert stored == len(ids) == 3000


def test_mongodb_data_survives_a_change_of_port(services: LocalServices) -> None:
    services.up()
    with MongoClient(f"mongodb://{services.mongod.address}/?replicaSet=rs0") as client:
        client.test_services.things.insert_one({"_id": "kept"})
    services.down()

    moved = LocalServices(
        services.settings.with_changes(mongo_uri=f"mongodb://{HOST}:{free_port(HOST)}/"), run_dir=services.run_dir
    )
    try:
        moved.up()  # the stored replica set names the old port: up has to repair it to become primary
        with MongoClient(f"mongodb://{moved.mongod.address}/?replicaSet=rs0") as client:
            assert client.test_services.things.find_one() == {"_id": "kept"}
    finally:
        moved.down()


def test_command_line_up_status_down(installed: None, tmp_path: Path, monkeypatch, capsys) -> None:
    settings = _settings()
    services_dir, run = services_cli(tmp_path, monkeypatch, settings.kafka_bootstrap, settings.mongo_uri)

    try:
        assert run("up") == 0
        out = capsys.readouterr().out
        assert f"export TENSORDB_KAFKA_BOOTSTRAP={settings.kafka_bootstrap}\n" in out
        assert "Note: The local Kafka broker (Tansu) keeps records in memory" in " ".join(out.split())
        assert run("status") == 0
        assert run("logs", "tansu", "-n", "1") == 0
        assert "ready in" in capsys.readouterr().out
    finally:
        assert run("down") == 0
    assert run("status") == 3


def test_down_also_stops_the_tensordb_processes_started_in_the_background(services: LocalServices) -> None:
    services.up()
    app = services.start_app("worker", ["worker"])
    assert services.start_app("worker", ["worker"]).process.pid() == app.process.pid()  # a second start is a no-op
    statuses = _by_name(services.status())
    assert statuses["worker"].running
    pid = statuses["worker"].pid
    stopped = _by_name(services.down())
    assert stopped["worker"].changed and app.process.pid() is None
    assert not list((services.run_dir / "pids").iterdir())  # no pid file, no project note left
    assert not Path(f"/proc/{pid}").exists() or b"tensordb.cli" not in Path(f"/proc/{pid}/cmdline").read_bytes()
