"""Issue 10, attack 4 ("any importable callable runs"), tried against the real broker, mongod and
workers: entry points, stored builders, Keras configurations and task scripts name only what the
operator trusts, checked at submit and again before anything is imported or run; task scripts get
no secrets.

Every attack that would run a command runs ``touch MARKER``; the tests assert the marker is absent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import keras
import pytest

from tensordb.client import TensorDB
from tensordb.compat.tensorhub import TensorHub
from tensordb.config import Settings, load_settings, uri_without_credentials
from tensordb.errors import EntryPointError, ModelFormatError, UntrustedCodeError
from tensordb.infra.bus import Publisher
from tensordb.infra.store import Store
from tensordb.infra.trusted import (
    call_entry_point,
    check_entry_point,
    check_keras_config,
    load_entry_point,
    resolve_task_script,
    task_environment,
    trusts,
)
from tensordb.jobs.queue import Jobs, JobStatus
from tensordb.loop.policies import Policies, Policy
from tensordb.testing import raw_database, worker_process
from tensordb.testing.models import two_tower
from tests import TASK_SCRIPTS
from workers.trainer import Worker

PASSWORD = "hunter2-s3cret"
TRAIN_DATA = {"filter": {"dataset": "train"}}
#: librdkafka's credentials, the JWT-assertion key among them: none may reach a task script.
KAFKA_SECRETS = {
    "sasl.password": PASSWORD,
    "sasl.oauthbearer.assertion.private.key.passphrase": f"{PASSWORD}-passphrase",
    "sasl.oauthbearer.assertion.private.key.pem": f"-----BEGIN ENCRYPTED PRIVATE KEY-----{PASSWORD}-----END",
    "sasl.oauthbearer.client.credentials.client.secret": f"{PASSWORD}-client",
    "ssl.key.location": f"/etc/tensordb/{PASSWORD}.key",  # a credential's file is left out too
}


@keras.saving.register_keras_serializable(package="tensordb_security_tests")
class RegisteredLayer(keras.layers.Layer):
    """A Keras layer registered by a module (this one) that a process may not trust."""


def small_model() -> keras.Model:
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])


# -- the rules, without services --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "prefixes", "trusted"),
    [
        ("mylab", ("mylab",), True),
        ("mylab.nets.resnet", ("mylab",), True),
        ("mylab.nets", ("mylab.nets",), True),
        ("mylabs", ("mylab",), False),
        ("mylab_evil.nets", ("mylab",), False),
        ("mylab", ("mylab.nets",), False),
        ("my", ("mylab",), False),
        ("os", (), False),
        ("tensordb.cli.demo", (), False),
    ],
)
def test_prefixes_match_whole_dotted_components(module: str, prefixes: tuple[str, ...], trusted: bool) -> None:
    assert trusts(module, prefixes) is trusted


def test_an_untrusted_entry_point_is_refused_with_the_setting_to_change() -> None:
    settings = Settings(trusted_modules=("mylab",))
    for path in ("os:system", "subprocess:getoutput", "builtins:eval", "mylabs.models:build", "tensordb.cli.demo:run_demo"):
        with pytest.raises(UntrustedCodeError, match="TENSORDB_TRUSTED_MODULES=mylab,"):
            check_entry_point(path, settings)
    with pytest.raises(UntrustedCodeError, match="TENSORDB_TRUSTED_MODULES=os"):
        check_entry_point("os:system", Settings())
    for path in ("os.system", "os:system; rm", "a:b:c", "import os", ""):
        with pytest.raises(EntryPointError, match="package.module:function"):
            check_entry_point(path, settings)
    assert check_entry_point("mylab.nets.resnet:build", settings) == ("mylab.nets.resnet", "build")
    assert (
        call_entry_point("tensordb.models.examples:digits_mlp", {"units": 8}, Settings()).count_params() > 0
    )  # the demo's, always trusted


def test_a_trusted_module_does_not_make_what_it_imported_callable() -> None:
    settings = Settings(trusted_modules=("tests", "tensordb.testing.models"))
    for name in ("system", "getoutput"):  # a builtin from os; a plain function defined in subprocess
        with pytest.raises(UntrustedCodeError, match="not a function defined in a trusted module"):
            load_entry_point(f"tests.security.reexports:{name}", settings)
    with pytest.raises(UntrustedCodeError):
        load_entry_point("tensordb.testing.models:TwoTower", settings)  # a class, not a builder function


def test_arguments_a_builder_does_not_declare_are_refused(tmp_path: Path) -> None:
    settings = Settings(trusted_modules=("tensordb.testing.models",))
    with pytest.raises(EntryPointError, match=r"takes no parameters \['command'\]"):
        call_entry_point("tensordb.testing.models:two_tower", {"units": 3, "command": f"touch {tmp_path / 'marker'}"}, settings)
    assert call_entry_point("tensordb.testing.models:two_tower", {"units": 3}, settings).hidden.units == 3


def test_keras_configurations_name_only_keras_and_trusted_modules() -> None:
    untrusted, trusted = Settings(), Settings(trusted_modules=("tests",))
    check_keras_config(json.loads(small_model().to_json()), untrusted, "the architecture")
    for module, name in (("os", "system"), ("subprocess", "Popen"), ("keras_hub.models", "Backbone"), ("kerasx", "Dense")):
        config = {"module": module, "class_name": name, "config": {}, "registered_name": None}
        with pytest.raises(UntrustedCodeError, match=f"names {module}.{name}"):
            check_keras_config({"class_name": "Sequential", "config": {"layers": [config]}}, untrusted, "the architecture")
    registered = json.loads(keras.Sequential([keras.Input((4,)), RegisteredLayer()]).to_json())
    with pytest.raises(UntrustedCodeError, match="TENSORDB_TRUSTED_MODULES=tests.security.test_trusted_code"):
        check_keras_config(registered, untrusted, "the architecture")
    check_keras_config(registered, trusted, "the architecture")


def test_task_scripts_outside_the_listed_directories_are_refused(tmp_path: Path) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    for folder in (allowed, outside):
        folder.mkdir()
        (folder / "script.py").write_text("done = True\n")
    (allowed / "escape.py").symlink_to(outside / "script.py")
    (tmp_path / "allowed-link").symlink_to(allowed, target_is_directory=True)
    settings = Settings(task_script_dirs=(tmp_path / "allowed-link",))  # a listed directory may be a link itself

    assert resolve_task_script(str(allowed / "script.py"), settings) == allowed / "script.py"
    for script in (outside / "script.py", allowed / "escape.py", allowed / ".." / "outside" / "script.py", Path("/bin/sh")):
        with pytest.raises(UntrustedCodeError, match="outside the task script directories"):
            resolve_task_script(str(script), settings)
    with pytest.raises(UntrustedCodeError, match="TENSORDB_TASK_SCRIPT_DIRS="):
        resolve_task_script(str(allowed / "script.py"), Settings())  # no directories listed: no scripts run


def test_a_task_environment_carries_no_secrets_unless_the_operator_says_so() -> None:
    settings = Settings(
        mongo_uri=f"mongodb://admin:{PASSWORD}@db1:27017,db2/?replicaSet=rs0&tlsCertificateKeyFilePassword={PASSWORD}",
        kafka_options={"sasl.username": "tensordb", "sasl.password": PASSWORD, "ssl.key.password": PASSWORD},
        dashboard_token=PASSWORD, serve_token=PASSWORD, trusted_modules=("mylab",),
    )  # fmt: skip
    parent = {
        "PATH": "/usr/bin",
        "HOME": "/home/w",
        "LC_ALL": "C.UTF-8",
        "AWS_SECRET_ACCESS_KEY": PASSWORD,
        "TENSORDB_CONFIG": "/etc/t.toml",
    }
    environment = task_environment(settings, "job-1", parent)
    assert not [key for key, value in environment.items() if PASSWORD in value]
    assert {"PATH": "/usr/bin", "HOME": "/home/w", "LC_ALL": "C.UTF-8", "TENSORDB_JOB_ID": "job-1"}.items() <= environment.items()
    assert "AWS_SECRET_ACCESS_KEY" not in environment and "TENSORDB_CONFIG" not in environment
    assert environment["TENSORDB_MONGO_URI"] == "mongodb://db1:27017,db2/?replicaSet=rs0"
    assert json.loads(environment["TENSORDB_KAFKA_OPTIONS"]) == {"sasl.username": "tensordb"}
    assert environment["TENSORDB_TRUSTED_MODULES"] == "mylab"

    with_secrets = task_environment(settings.with_changes(task_secrets=True), "job-1", parent)
    assert with_secrets["TENSORDB_MONGO_URI"] == settings.mongo_uri
    assert json.loads(with_secrets["TENSORDB_KAFKA_OPTIONS"]) == settings.kafka_options
    assert "TENSORDB_DASHBOARD_TOKEN" not in with_secrets and "AWS_SECRET_ACCESS_KEY" not in with_secrets
    assert uri_without_credentials("mongodb+srv://u:p@cluster.example.com/db") == "mongodb+srv://cluster.example.com/db"


def test_a_task_environment_reads_nothing_back_from_the_worker_s_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 24, finding 3: the worker's ``TENSORDB_KAFKA_OPTIONS`` (where its secrets are) must not be
    merged back into the filtered options, and the metrics token is a token like the others."""
    monkeypatch.setenv("TENSORDB_KAFKA_OPTIONS", json.dumps({"sasl.username": "tensordb", **KAFKA_SECRETS}))
    monkeypatch.setenv("TENSORDB_METRICS_TOKEN", f"{PASSWORD}-metrics")
    monkeypatch.setenv("TENSORDB_SERVE_TOKEN", f"{PASSWORD}-serve")
    settings = load_settings()
    environment = task_environment(settings, "job-1", {"PATH": "/usr/bin"})
    assert not [key for key, value in environment.items() if PASSWORD in value]
    assert json.loads(environment["TENSORDB_KAFKA_OPTIONS"]) == {"sasl.username": "tensordb"}
    assert "TENSORDB_METRICS_TOKEN" not in environment and "TENSORDB_SERVE_TOKEN" not in environment
    with_secrets = task_environment(settings.with_changes(task_secrets=True), "job-1", {})
    assert json.loads(with_secrets["TENSORDB_KAFKA_OPTIONS"]) == {"sasl.username": "tensordb", **KAFKA_SECRETS}
    assert "TENSORDB_METRICS_TOKEN" not in with_secrets  # tokens never, even with task_secrets
    assert settings.with_changes(kafka_options={}).kafka_options == {}  # a copy is the values given, nothing re-read


# -- against the real services -----------------------------------------------------------------------


def test_untrusted_code_is_refused_at_submit(settings: Settings, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    with TensorDB(settings) as db:
        with pytest.raises(UntrustedCodeError, match="TENSORDB_TRUSTED_MODULES="):
            db.submit_job(model={"entry_point": "os:system"}, data=TRAIN_DATA, hyperparameters={"command": f"touch {marker}"})
        with pytest.raises(UntrustedCodeError):
            db.submit_job(model={"architecture": {"module": "os", "class_name": "system", "config": {}}}, data=TRAIN_DATA)
        with pytest.raises(UntrustedCodeError, match="outside the task script directories"):
            db.submit_job("task", script="/bin/sh")
        with pytest.raises(UntrustedCodeError):
            Policies(db.store).register(
                Policy(name="evil", model={"entry_point": "os:system"}, training=TRAIN_DATA, validation=TRAIN_DATA)
            )
        with pytest.raises(UntrustedCodeError):
            db.models.save(small_model(), "evil", builder="os:system", builder_kwargs={"command": f"touch {marker}"})
        assert db.list_jobs() == [] and Policies(db.store).list() == [] and db.models.find_infos() == []
    assert not marker.exists()


@pytest.fixture
def worker_settings(settings: Settings, tmp_path: Path) -> Settings:
    """A worker's settings that list tmp_path/allowed as its only task script directory."""
    (tmp_path / "allowed").mkdir()
    return settings.with_changes(task_script_dirs=(tmp_path / "allowed",))


@pytest.fixture
def jobs(worker_settings: Settings) -> Iterator[Jobs]:
    with Store(worker_settings) as store, Publisher(worker_settings) as publisher:
        yield Jobs(store, publisher)


def test_a_worker_refuses_jobs_written_past_the_sdk(worker_settings: Settings, jobs: Jobs, tmp_path: Path) -> None:
    """Jobs submitted harmless, then rewritten in MongoDB as an attacker with database access would."""
    allowed, outside, marker = tmp_path / "allowed", tmp_path / "outside", tmp_path / "marker"
    outside.mkdir()
    (allowed / "ok.py").write_text("done = True\n")
    (outside / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    (allowed / "escape.py").symlink_to(outside / "evil.py")

    def forged(kind: str, changes: dict, **spec: object) -> str:
        job_id = jobs.submit(kind, max_attempts=3, **spec)
        jobs.collection.update_one({"_id": job_id}, {"$set": changes})
        return job_id

    def builder_job(entry_point: str, hyperparameters: dict) -> str:
        changes = {"spec.model.entry_point": entry_point, "spec.hyperparameters": hyperparameters}
        return forged("train", changes, model={"entry_point": "tensordb.testing.models:small_classifier"}, data=TRAIN_DATA)

    shell = builder_job("os:system", {"command": f"touch {marker}"})
    reexport = builder_job("tests.security.reexports:getoutput", {"cmd": f"touch {marker}"})
    extra = builder_job("tensordb.testing.models:two_tower", {"command": f"touch {marker}"})
    elsewhere = forged("task", {"spec.script": str(outside / "evil.py")}, script=str(allowed / "ok.py"))
    escape = forged("task", {"spec.script": str(allowed / "escape.py")}, script=str(allowed / "ok.py"))
    fine = jobs.submit("task", script=str(allowed / "ok.py"), save_keys=["done"])

    with worker_process(worker_settings, tmp_path / "worker.log"):
        done = {job["_id"]: job for job in jobs.wait([shell, reexport, extra, elsewhere, escape, fine], timeout=180)}
    assert done[fine]["status"] == JobStatus.FINISHED and done[fine]["result"]["done"] is True  # the worker does run trusted work
    for job_id in (shell, reexport, elsewhere, escape):
        job = done[job_id]
        assert job["status"] == JobStatus.FAILED and job["attempts"] == 1, job  # refused once, not retried
        assert job["error"]["message"].startswith("UntrustedCodeError"), job["error"]["message"]
    assert "TENSORDB_TRUSTED_MODULES" in done[shell]["error"]["message"]
    assert "TENSORDB_TASK_SCRIPT_DIRS" in done[escape]["error"]["message"]
    assert done[extra]["status"] == JobStatus.FAILED and "takes no parameters ['command']" in done[extra]["error"]["message"]
    assert not marker.exists()


def test_a_stored_model_rewritten_to_name_untrusted_code_is_refused_by_every_reader(settings: Settings, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    command = f"touch {marker}"
    with TensorDB(settings) as db:
        info = db.models.save(small_model(), "net", accuracy=0.9)
        rewrite = {"$unset": {"architecture_json": ""}, "$set": {"builder": "os:system", "builder_kwargs": {"command": command}}}
        db.models.collection.update_one({"_id": info["_id"]}, rewrite)
        with pytest.raises(UntrustedCodeError, match="os:system"):
            db.find_model(name="net")
    with TensorHub(settings=settings) as hub:
        with pytest.raises(UntrustedCodeError):
            hub.find_top_model(sort=[("accuracy", -1)], model_name="net")
        for builder, kwargs, error in (
            ("tests.security.reexports:getoutput", {"cmd": command}, UntrustedCodeError),
            ("tensordb.testing.models:two_tower", {"command": command}, ModelFormatError),
        ):
            hub.models.collection.update_one({"_id": info["_id"]}, {"$set": {"builder": builder, "builder_kwargs": kwargs}})
            with pytest.raises(error):
                hub.find_top_model(model_name="net")
    assert not marker.exists()


def test_stored_keras_configurations_naming_untrusted_classes_are_refused(settings: Settings) -> None:
    with TensorDB(settings) as db:
        db.models.save(keras.Sequential([keras.Input((4,)), RegisteredLayer()]), "registered")
        assert db.find_model(name="registered") is not None  # the test settings trust the tests package
        compiled = two_tower(build=True)  # its builder returns it uncompiled: the stored compile configuration is used
        compiled.compile("adam", "mse")
        info = db.models.save(compiled, "compiled", builder="tensordb.testing.models:two_tower")
        optimizer = {"module": "os", "class_name": "system", "config": {}, "registered_name": None}
        db.models.collection.update_one(
            {"_id": info["_id"]}, {"$set": {"compile_json": json.dumps({"optimizer": optimizer, "loss": "mse"})}}
        )
        with pytest.raises(UntrustedCodeError, match="compile configuration"):
            db.find_model(name="compiled")
    with TensorDB(settings.with_changes(trusted_modules=())) as db:
        with pytest.raises(UntrustedCodeError, match="tests.security.test_trusted_code"):
            db.find_model(name="registered")


def test_a_task_script_gets_neither_the_database_password_nor_the_worker_s_environment(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real task, run by a worker whose MongoDB URI carries a password (checked by mongod)."""
    if "@" in settings.mongo_uri:
        pytest.skip("the servers' URI already carries credentials")
    user = f"worker_{settings.project}"
    with raw_database(settings) as admin:
        admin.client.admin.command("createUser", user, pwd=PASSWORD, roles=[{"role": "readWrite", "db": settings.mongo_database}])
    try:
        authenticated = settings.with_changes(
            mongo_uri=settings.mongo_uri.replace("mongodb://", f"mongodb://{user}:{PASSWORD}@", 1)
        )
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PASSWORD)  # in the worker's environment
        with Store(authenticated) as store, Publisher(authenticated) as publisher:
            job_id = Jobs(store, publisher).submit(
                "task", script=str(TASK_SCRIPTS / "dump_environment.py"), save_keys=["environment"]
            )
        worker = Worker(authenticated)
        try:
            assert worker.run_one()
        finally:
            worker.close()
        with Store(settings) as store:
            job = store["jobs"].find_one({"_id": job_id})
    finally:
        with raw_database(settings) as admin:
            admin.client.admin.command("dropUser", user)
    assert job["status"] == JobStatus.FINISHED, job["error"]
    environment = job["result"]["environment"]
    assert not [key for key, value in environment.items() if PASSWORD in value]
    assert "AWS_SECRET_ACCESS_KEY" not in environment
    assert environment["TENSORDB_MONGO_URI"] == settings.mongo_uri and environment["TENSORDB_JOB_ID"] == job_id


def test_a_task_script_run_by_a_worker_process_gets_none_of_its_kafka_secrets_or_tokens(
    settings: Settings, tmp_path: Path
) -> None:
    """Issue 24, finding 3, end to end: a real ``tensordb worker`` whose environment holds Kafka
    credentials (SASL, the JWT-assertion key and passphrase, a client secret) and every token runs a
    task script that reports its whole environment."""
    worker_settings = settings.with_changes(
        kafka_options={"sasl.username": "tensordb", "client.id": "tensordb-worker", **KAFKA_SECRETS},
        metrics_token=f"{PASSWORD}-metrics", serve_token=f"{PASSWORD}-serve", dashboard_token=f"{PASSWORD}-dashboard",
    )  # fmt: skip
    with Store(settings) as store, Publisher(settings) as publisher:
        jobs = Jobs(store, publisher)
        job_id = jobs.submit("task", script=str(TASK_SCRIPTS / "dump_environment.py"), save_keys=["environment"])
        with worker_process(worker_settings, tmp_path / "worker.log") as worker:
            job = jobs.wait([job_id], timeout=120)[0]
            log = worker.log()
    assert job["status"] == JobStatus.FINISHED, job["error"]
    environment = job["result"]["environment"]
    assert not [key for key, value in environment.items() if PASSWORD in value]
    assert json.loads(environment["TENSORDB_KAFKA_OPTIONS"]) == {"sasl.username": "tensordb", "client.id": "tensordb-worker"}
    assert not {"TENSORDB_METRICS_TOKEN", "TENSORDB_SERVE_TOKEN", "TENSORDB_DASHBOARD_TOKEN"} & set(environment)
    assert environment["TENSORDB_KAFKA_BOOTSTRAP"] == settings.kafka_bootstrap and environment["TENSORDB_JOB_ID"] == job_id
    assert PASSWORD not in log
