"""Upgrading a database written before ids were project-scoped: an explicit command, a recorded
schema version, nothing invisible and nothing deleted."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pymongo import MongoClient

from tensordb.cli import main
from tensordb.client import TensorDB
from tensordb.config import Settings
from tensordb.data.cohorts import COHORTS
from tensordb.data.samples import SAMPLES
from tensordb.errors import DatabaseVersionError
from tensordb.infra.migrations import MIGRATIONS, SCHEMA, SCHEMA_VERSION, SCOPED_IDS
from tensordb.infra.store import Store
from tensordb.infra.versioning import COUNTERS, next_version
from tensordb.jobs.queue import JOBS
from tensordb.runs.logger import LOGS, log_id


def test_documents_with_earlier_ids_are_renamed_once_by_the_upgrade_command(settings: Settings) -> None:
    raw = MongoClient(settings.mongo_uri)[settings.mongo_database]
    project = settings.project
    raw[SAMPLES].insert_one({"_id": "scan-1", "project": project, "dataset": "d"})
    raw[JOBS].insert_one({"_id": "job-1", "project": project, "status": "finished"})
    raw[LOGS].insert_one(
        {"_id": f"{project}\x1frun\x1ftrain\x1f0", "project": project, "run_id": "run", "phase": "train", "step": 0}
    )
    raw[COUNTERS].insert_one({"_id": {"project": project, "model": "net"}, "last": 3})
    raw[COHORTS].insert_one({"_id": f"{project}:recent", "project": project, "name": "recent"})  # scoped already
    raw[SAMPLES].insert_one({"_id": "scan-9", "project": "other", "dataset": "d"})  # another project's
    with Store(settings) as store:
        with pytest.raises(DatabaseVersionError, match="run `tensordb db upgrade`"):
            store.ensure_indexes()  # no process migrates by itself, nor writes beside old documents
        assert raw[SAMPLES].find_one({"_id": "scan-1"}) is not None
        report = store.upgrade()
        assert (report.from_version, report.to_version, report.renamed, report.collisions) == (1, SCHEMA_VERSION, 5, [])
        store.ensure_indexes()
        assert store[SAMPLES].find_one({"_id": "scan-1"})["dataset"] == "d"
        assert store[JOBS].find_one({"_id": "job-1"})["status"] == "finished"
        assert store[LOGS].count_documents({"_id": log_id("run", "train", 0)}) == 1
        assert store[COHORTS].find_one({"_id": "recent"})["name"] == "recent"
        assert next_version(store, "model", "net") == 4
        assert raw[SAMPLES].find_one({"_id": "other:scan-9"}) is not None
        assert raw[MIGRATIONS].find_one({"_id": SCHEMA})["version"] == SCHEMA_VERSION
        raw[SAMPLES].insert_one({"_id": "written-later-by-hand", "project": project})
        store.ensure_indexes()  # the recorded version stops any further pass
        assert raw[SAMPLES].find_one({"_id": "written-later-by-hand"}) is not None


def test_an_id_taken_by_another_projects_sample_deletes_nothing_and_is_reported(settings: Settings) -> None:
    """Project ``other`` published the id ``PROJECT:scan-1`` before ids were scoped: the upgrade
    keeps both samples (the old code inserted nothing for scan-1, ignored the duplicate, and
    deleted it); once the occupant is renamed, a second pass renames scan-1 too."""
    raw = MongoClient(settings.mongo_uri)[settings.mongo_database]
    project = settings.project
    raw[SAMPLES].insert_one({"_id": "scan-1", "project": project, "dataset": "mine"})
    raw[SAMPLES].insert_one({"_id": f"{project}:scan-1", "project": "other", "dataset": "theirs"})
    raw[SAMPLES].insert_one({"_id": "scan-2", "project": project, "dataset": "mine"})
    raw[SAMPLES].insert_one({"_id": f"{project}:scan-2", "project": project, "dataset": "a copy with other content"})
    with Store(settings) as store:
        report = store.upgrade()
        assert report.renamed == 2  # scan-1 (second pass) and other's sample
        assert [(c.old_id, c.new_id) for c in report.collisions] == [("scan-2", f"{project}:scan-2")]
        assert "delete or rename one of them" in str(report.collisions[0])
        assert store[SAMPLES].find_one({"_id": "scan-1"})["dataset"] == "mine"
        assert raw[SAMPLES].find_one({"_id": f"other:{project}:scan-1"})["dataset"] == "theirs"
        assert raw[SAMPLES].find_one({"_id": "scan-2"})["dataset"] == "mine"  # kept, reported, not deleted
        assert store[SAMPLES].find_one({"_id": "scan-2"})["dataset"] == "a copy with other content"


def test_an_upgrade_cut_off_before_deleting_is_finished_by_the_next(settings: Settings) -> None:
    raw = MongoClient(settings.mongo_uri)[settings.mongo_database]
    project = settings.project
    raw[SAMPLES].insert_one({"_id": "scan-1", "project": project, "dataset": "d"})
    raw[SAMPLES].insert_one({"_id": f"{project}:scan-1", "project": project, "dataset": "d"})  # its copy, stored
    with Store(settings) as store:
        report = store.upgrade()
    assert (report.renamed, report.collisions) == (1, [])
    assert raw[SAMPLES].count_documents({}) == 1


def test_a_fresh_database_just_works_and_the_command_upgrades_an_old_one(settings: Settings, monkeypatch, capsys) -> None:
    with TensorDB(settings) as db:  # no step for a new user: the version is stamped on creation
        db.store[SAMPLES].insert_one({"_id": "scan-1", "dataset": "d"})
    raw = MongoClient(settings.mongo_uri)[settings.mongo_database]
    assert raw[MIGRATIONS].find_one({"_id": SCHEMA})["version"] == SCHEMA_VERSION
    raw[MIGRATIONS].delete_many({})  # as a database of the release before versions were recorded...
    with TensorDB(settings):
        pass  # ...that its automatic renaming had brought to scoped ids: nothing left to upgrade
    raw[MIGRATIONS].update_one({"_id": SCHEMA}, {"$set": {"version": SCHEMA_VERSION + 1}})
    with pytest.raises(DatabaseVersionError, match="install the TensorDB version that upgraded it"):
        TensorDB(settings)
    raw[MIGRATIONS].delete_many({})
    raw[SAMPLES].insert_one({"_id": "old-id", "project": settings.project, "dataset": "d"})
    with pytest.raises(DatabaseVersionError, match="tensordb db upgrade"):
        TensorDB(settings)
    for key, value in settings.as_environment().items():
        monkeypatch.setenv(key, value)
    assert main(["db", "upgrade"]) == 0
    assert "schema 1 -> 2, 1 documents renamed" in capsys.readouterr().out
    with TensorDB(settings) as db:
        assert db.store[SAMPLES].count_documents({}) == 2
    raw[MIGRATIONS].delete_many({})
    raw[MIGRATIONS].insert_one({"_id": SCOPED_IDS, "renamed": 1})  # the automatic renaming's marker: version 2
    with TensorDB(settings):
        pass


def test_the_processors_refuse_an_old_database_naming_the_command(settings: Settings) -> None:
    raw = MongoClient(settings.mongo_uri)[settings.mongo_database]
    raw[SAMPLES].insert_one({"_id": "old-id", "project": settings.project, "dataset": "d"})
    done = subprocess.run(
        [sys.executable, "-m", "tensordb.cli", "processors", "--metrics-port", "0"],
        env={**os.environ, **settings.as_environment()},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "run `tensordb db upgrade` once" in done.stderr
    assert raw[SAMPLES].find_one({"_id": "old-id"}) is not None
