"""Every Kafka client TensorDB makes, over TLS, against the embedded broker; and what Tansu 0.6's
own TLS and SASL options do (why the local broker sits behind TensorDB's TLS terminator).

The broker is Tansu behind :mod:`tensordb.services.tls` (as ``tensordb services up --tls`` runs
it), with a throwaway CA and certificate made by ``openssl``; MongoDB is the session's mongod.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka.admin import AdminClient

from tensordb.client import TensorDB
from tensordb.config import Settings, Topic
from tensordb.data.samples import SAMPLES
from tensordb.errors import DeliveryError, UnreachableError
from tensordb.infra.bus import Publisher, create_topics, make_consumer, receive
from tensordb.services.process import ManagedProcess, free_port
from tensordb.services.tansu import MEMORY_STORAGE, Tansu
from tensordb.services.tls import TlsFiles, make_certificates
from tensordb.testing import fresh_project, processors_process, wait_for
from tests import REPO
from tests.services_cli import services_cli

TANSU = REPO / ".tensordb" / "bin" / "tansu"
#: How long a client that cannot connect may take to say so (librdkafka retries until the timeout given).
FAIL_WITHIN_SECONDS = 10


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_broker(tls_files: TlsFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tansu]:
    """Tansu reachable only with TLS on a free 127.0.0.1 port; stopped (with its terminator) afterwards."""
    tansu = Tansu(TANSU, tmp_path_factory.mktemp("tls-broker"), "127.0.0.1", free_port("127.0.0.1"), tls=tls_files)
    try:
        tansu.start()
        yield tansu
    finally:
        tansu.stop()


@pytest.fixture
def tls_settings(servers: Settings, tls_broker: Tansu, tls_files: TlsFiles) -> Iterator[Settings]:
    """A fresh project on the TLS broker and the session's mongod, with TLS in TENSORDB_KAFKA_OPTIONS only."""
    options = {"security.protocol": "SSL", "ssl.ca.location": str(tls_files.ca)}
    with fresh_project(servers.with_changes(kafka_bootstrap=tls_broker.address, kafka_options=options), "tls") as settings:
        yield settings


def test_samples_go_through_tls_to_the_processors_mongod_and_a_data_imported_reader(
    tls_settings: Settings, tmp_path: Path
) -> None:
    """The SDK's producer, the processors' consumers, producers and admin clients (a child process
    given the settings through its environment, as in production) and a reader of data-imported."""
    image = np.arange(16, dtype=np.uint8).reshape(4, 4)
    with processors_process(tls_settings, tmp_path / "processors.log"), TensorDB(tls_settings) as db:
        sample_id = db.publish_sample({"image": image}, dataset="tls", labels={"y": 1})
        db.flush()
        doc = wait_for(lambda: db.store[SAMPLES].find_one({"_id": sample_id}), what="the sample stored over TLS")
        assert doc["dataset"] == "tls"
        x, y = next(iter(db.cohort({"dataset": "tls"}, x="image", y="y").stream(batch_size=1)))
        np.testing.assert_array_equal(x[0], image)
    consumer = make_consumer(tls_settings, "tls-reader", [Topic.DATA_IMPORTED])
    try:
        announced: list[str] = []
        deadline = time.monotonic() + 30
        while sample_id not in announced and time.monotonic() < deadline:
            announced += [
                name for message in receive(consumer, "data-imported/1", 0.5) for name in message.valid_record["sample_ids"]
            ]
        assert sample_id in announced
    finally:
        consumer.close()


def test_a_client_without_tls_gets_a_clear_error_quickly(tls_broker: Tansu) -> None:
    settings = Settings(kafka_bootstrap=tls_broker.address, project="notls")
    started = time.monotonic()
    with pytest.raises(UnreachableError, match="TENSORDB_KAFKA_OPTIONS"):
        create_topics(settings, timeout=3)
    assert time.monotonic() - started < FAIL_WITHIN_SECONDS


def test_a_client_trusting_another_ca_gets_a_clear_error_quickly(tls_broker: Tansu, tmp_path: Path) -> None:
    other = make_certificates(tmp_path / "other-ca")
    settings = Settings(kafka_bootstrap=tls_broker.address, project="wrongca", kafka_options=other.kafka_options())
    started = time.monotonic()
    with pytest.raises(UnreachableError, match="certificate verify failed"):
        create_topics(settings, timeout=3)
    publisher = Publisher(settings, flush_timeout=3)
    publisher.publish_bytes(settings.topic(Topic.LOGS), b"{}")
    with pytest.raises(DeliveryError, match="1 records still unacknowledged.*certificate verify failed.*replaced its producer"):
        publisher.flush()  # the record is dropped with the producer, which is replaced
    publisher.close(timeout=0)  # nothing left to report; the client stops here rather than reconnect for the session
    assert time.monotonic() - started < 2 * FAIL_WITHIN_SECONDS


def test_tansu_0_6_refuses_cert_and_key_together(tmp_path: Path, tls_files: TlsFiles) -> None:
    """Why the terminator: if this starts to pass TLS to Tansu itself, drop tensordb.services.tls."""
    port = free_port("127.0.0.1")
    url = f"tcp://127.0.0.1:{port}"
    result = subprocess.run(
        [str(TANSU), "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", MEMORY_STORAGE,
         "--cert", str(tls_files.certificate), "--key", str(tls_files.key)],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert result.returncode != 0
    assert "'--cert <CERT>' cannot be used with '--key <KEY>'" in result.stderr


def test_tansu_0_6_authentication_accepts_no_sasl_mechanism_librdkafka_speaks(tmp_path: Path) -> None:
    """With --authentication no client gets in: SCRAM-SHA-512/256 and PLAIN all fail with
    NoSharedMechanism in Tansu's log, and `tansu user create` (itself unauthenticated) is refused,
    so SASL cannot be proven against the embedded broker (README: Security)."""
    port = free_port("127.0.0.1")
    url = f"tcp://127.0.0.1:{port}"
    broker = ManagedProcess("tansu-sasl", TANSU, tmp_path)
    broker.start(["broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", MEMORY_STORAGE,
                  "--authentication"])  # fmt: skip
    try:
        wait_for(lambda: b"listening on" in broker.log_path.read_bytes(), what="tansu --authentication listening")
        created = subprocess.run(
            [str(TANSU), "user", "create", "--broker", url, "alice", "s3cret-pw"], capture_output=True, text=True, timeout=20
        )
        assert created.returncode != 0
        for mechanism in ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"):
            options = {
                "security.protocol": "SASL_PLAINTEXT",
                "sasl.mechanism": mechanism,
                "sasl.username": "alice",
                "sasl.password": "s3cret-pw",
            }
            settings = Settings(kafka_bootstrap=f"127.0.0.1:{port}", project="sasl", kafka_options=options)
            with pytest.raises(UnreachableError) as raised:
                create_topics(settings, timeout=3)
            assert "s3cret-pw" not in str(raised.value)
        assert "NoSharedMechanism" in broker.log_path.read_text(errors="replace")
    finally:
        broker.stop()


def test_services_up_tls_makes_a_ca_starts_the_broker_behind_tls_and_prints_the_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    kafka = f"127.0.0.1:{free_port('127.0.0.1')}"
    services_dir, run = services_cli(tmp_path, monkeypatch, kafka, f"mongodb://127.0.0.1:{free_port('127.0.0.1')}/")

    try:
        assert run("up", "--tls") == 0
        out = capsys.readouterr().out
        exported = next(line for line in out.splitlines() if "export TENSORDB_KAFKA_OPTIONS=" in line)
        options = json.loads(shlex.split(exported.split("=", 1)[1])[0])
        ca = services_dir / "run" / "tls" / "ca.pem"
        assert options == {"security.protocol": "SSL", "ssl.ca.location": str(ca)} and ca.is_file()
        assert (ca.parent / "ca.key").stat().st_mode & 0o077 == 0  # the CA's key is the owner's only
        topics = AdminClient({"bootstrap.servers": kafka, **options}).list_topics(timeout=10).topics
        assert Settings().topic(Topic.INGEST) in topics  # `up` created the topics over TLS
        with pytest.raises(UnreachableError):
            create_topics(Settings(), timeout=2)  # without the options: refused
        assert run("status") == 0
        assert "TLS" in capsys.readouterr().out
    finally:
        assert run("down") == 0
    assert not any(path.read_text().strip() for path in (services_dir / "run" / "pids").glob("*.pid"))
