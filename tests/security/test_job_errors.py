"""Issue 24, finding 10: a failed job's stored error is read by anyone who can read jobs, so it is
masked and in TensorDB's terms, never a storage driver's repr of its client (which spells out the
MongoDB URI's options, secrets included)."""

from __future__ import annotations

from pathlib import Path

import keras
import pytest
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from tensordb.client import TensorDB
from tensordb.config import Settings
from tensordb.errors import JobSpecError
from tensordb.infra.bus import Publisher
from tensordb.infra.store import BLOB_BUCKET, Store
from tensordb.jobs.queue import Jobs, JobStatus, describe_job_error
from tensordb.models.registry import COLLECTION
from tensordb.testing import worker_process

PASSWORD, SESSION_TOKEN = "hunter2-user-s3cret", "aws-session-token-s3cret"


def test_a_job_failed_on_a_missing_blob_stores_no_secret_and_no_driver_repr(settings: Settings, tmp_path: Path) -> None:
    """A real worker, whose MongoDB URI carries a password and a secret auth property, evaluates a
    model version whose parameters were deleted from GridFS behind TensorDB's back: pymongo's NoFile
    quotes its client, options and all."""
    if "@" in settings.mongo_uri:
        pytest.skip("the servers' URI already carries credentials")
    user = f"jobs_{settings.project}"
    separator = "&" if "?" in settings.mongo_uri else "?"
    worker_settings = settings.with_changes(
        mongo_uri=settings.mongo_uri.replace("mongodb://", f"mongodb://{user}:{PASSWORD}@", 1)
        + f"{separator}authMechanism=SCRAM-SHA-256&authMechanismProperties=AWS_SESSION_TOKEN:{SESSION_TOKEN}"
    )
    with TensorDB(settings) as db:
        db.models.save(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]), "vanished")
    with MongoClient(settings.mongo_uri) as raw:  # as anyone with database access could
        raw.admin.command("createUser", user, pwd=PASSWORD, roles=[{"role": "readWrite", "db": settings.mongo_database}])
        database = raw[settings.mongo_database]
        blob = database[COLLECTION].find_one({"name": "vanished"})["parameters"]["blob"]
        assert database[f"{BLOB_BUCKET}.files"].delete_one({"_id": blob}).deleted_count == 1
        try:
            with Store(settings) as store, Publisher(settings) as publisher:
                jobs = Jobs(store, publisher)
                job_id = jobs.submit("evaluate", model={"name": "vanished", "versions": [1]}, data={"filter": {}}, max_attempts=1)
                with worker_process(worker_settings, tmp_path / "worker.log"):
                    job = jobs.wait([job_id], timeout=120)[0]
        finally:
            raw.admin.command("dropUser", user)
    assert job["status"] == JobStatus.FAILED, job
    stored = f"{job['error']} {job.get('history')}"
    assert SESSION_TOKEN not in stored and PASSWORD not in stored and "MongoClient(" not in stored, stored
    assert job["error"]["message"].startswith(f"NotFoundError: stored bytes this job reads are missing (GridFS file {blob})")
    assert f"collection {settings.mongo_database}.{BLOB_BUCKET}.files" in job["error"]["traceback"]  # what the repr named


def test_driver_errors_are_described_in_tensordb_s_terms_without_the_driver_s_objects() -> None:
    options = f"authMechanism=SCRAM-SHA-256&authMechanismProperties=AWS_SESSION_TOKEN:{SESSION_TOKEN}"
    client = MongoClient(f"mongodb://u:p@127.0.0.1:1/?{options}", connect=False)
    try:
        failure = OperationFailure(f"not authorized on {client['db']!r} to execute find", code=13)
        described = describe_job_error(failure)
        assert described.startswith("MongoDB failed the job's request (OperationFailure: not authorized on database db")
        assert SESSION_TOKEN not in described and "MongoClient(" not in described
        assert describe_job_error(ValueError(f"bad {client['db']['c']!r}")) == "ValueError: bad collection db.c"
        assert describe_job_error(JobSpecError("an evaluate job's model names a registered model")).startswith("JobSpecError: ")
    finally:
        client.close()
