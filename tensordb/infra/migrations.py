"""One-time upgrades of documents written by earlier TensorDB versions, run at start-up.

Ids became project-scoped (see :mod:`tensordb.infra.project_scope`): documents stored before are
renamed to their scoped ids, so an upgraded deployment keeps seeing its samples, jobs, logs and
counters. Each migration runs once per database (a marker document records it), is idempotent,
and is safe when several processes start together.
"""

from __future__ import annotations

import logging
from typing import Any

from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError

log = logging.getLogger(__name__)

MIGRATIONS = "tensordb_migrations"
SCOPED_IDS = "scoped-ids"
BATCH = 1000
_OLD_LOG_SEPARATOR = "\x1f"  # logs' ids began with the project and this separator
DUPLICATE_KEY = 11000


def migrate(db: Database) -> None:
    """Apply every migration this database has not had yet."""
    if db[MIGRATIONS].find_one({"_id": SCOPED_IDS}) is not None:
        return
    renamed = sum(_scope_ids(db, name) for name in db.list_collection_names() if _holds_documents(name))
    try:
        db[MIGRATIONS].update_one({"_id": SCOPED_IDS}, {"$set": {"renamed": renamed}}, upsert=True)
    except DuplicateKeyError:
        pass  # another process starting at the same time recorded it first (concurrent upserts race)
    if renamed:
        log.info("renamed %d documents to project-scoped ids", renamed)


def _holds_documents(name: str) -> bool:
    return not name.startswith(("blobs.", "system.")) and name != MIGRATIONS  # GridFS ids are ObjectIds


def scoped_id(document: dict[str, Any]) -> str | None:
    """The project-scoped id of a document stored with an earlier version's id; None if it has one."""
    old = document["_id"]
    if isinstance(old, dict) and isinstance(old.get("project"), str) and len(old) == 2:  # a version counter
        ((kind, name),) = ((key, value) for key, value in old.items() if key != "project")
        return f"{old['project']}:{kind}:{name}"
    project = document.get("project")
    if not isinstance(old, str) or not isinstance(project, str) or old.startswith(f"{project}:"):
        return None
    if old.startswith(f"{project}{_OLD_LOG_SEPARATOR}"):
        return f"{project}:{old[len(project) + 1 :]}"
    return f"{project}:{old}"


def _scope_ids(db: Database, name: str) -> int:
    """Rename one collection's documents to scoped ids: insert under the new id, then delete."""
    collection = db[name]
    renamed = 0
    pending: list[tuple[Any, str]] = []
    cursor = collection.find({"_id": {"$type": ["string", "object"]}}, {"_id": 1, "project": 1})
    for document in cursor:
        new_id = scoped_id(document)
        if new_id is not None:
            pending.append((document["_id"], new_id))
        if len(pending) == BATCH:
            renamed += _rename(db, name, pending)
            pending = []
    return renamed + _rename(db, name, pending)


def _rename(db: Database, name: str, renames: list[tuple[Any, str]]) -> int:
    if not renames:
        return 0
    collection = db[name]
    old_ids = [old_id for old_id, _ in renames]
    new_ids = {_hashable(old_id): new_id for old_id, new_id in renames}
    documents = list(collection.find({"_id": {"$in": old_ids}}))
    for document in documents:
        old_id = document["_id"]
        document["_id"] = new_ids[_hashable(old_id)]
        if isinstance(old_id, dict):
            document.setdefault("project", old_id["project"])
    try:
        collection.insert_many(documents, ordered=False)
    except BulkWriteError as exc:  # renamed already by a process that died before deleting
        if any(error["code"] != DUPLICATE_KEY for error in exc.details["writeErrors"]):
            raise
    collection.delete_many({"_id": {"$in": old_ids}})
    return len(documents)


def _hashable(document_id: Any) -> Any:
    return tuple(document_id.items()) if isinstance(document_id, dict) else document_id
