"""Upgrading a database written before ids were project-scoped: nothing becomes invisible."""

from __future__ import annotations

from pymongo import MongoClient

from tensordb.config import Settings
from tensordb.data.cohorts import COHORTS
from tensordb.data.samples import SAMPLES
from tensordb.infra.migrations import MIGRATIONS
from tensordb.infra.store import Store
from tensordb.infra.versioning import COUNTERS, next_version
from tensordb.jobs.queue import JOBS
from tensordb.runs.logger import LOGS, log_id


def test_documents_with_earlier_ids_are_renamed_once_and_found_by_their_ids(settings: Settings) -> None:
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
        store.ensure_indexes()
        assert store[SAMPLES].find_one({"_id": "scan-1"})["dataset"] == "d"
        assert store[JOBS].find_one({"_id": "job-1"})["status"] == "finished"
        assert store[LOGS].count_documents({"_id": log_id("run", "train", 0)}) == 1
        assert store[COHORTS].find_one({"_id": "recent"})["name"] == "recent"
        assert next_version(store, "model", "net") == 4
        assert raw[SAMPLES].find_one({"_id": "other:scan-9"}) is not None
        assert raw[MIGRATIONS].find_one({})["renamed"] == 5
        raw[SAMPLES].insert_one({"_id": "written-later-by-hand", "project": project})
        store.ensure_indexes()  # once only: the marker stops a second pass
        assert raw[SAMPLES].find_one({"_id": "written-later-by-hand"}) is not None
