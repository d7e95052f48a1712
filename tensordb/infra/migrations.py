"""The database's schema version, and the upgrade of documents written by earlier TensorDB versions.

Every TensorDB process checks the version when it opens a database (:func:`check_version`, from
``Store.ensure_indexes``) and refuses one written by another version with a message that says what
to run; a fresh database is stamped with the current version, so it needs no step. Upgrading is an
explicit operator command, ``tensordb db upgrade`` (:func:`upgrade`), run once with every process
of the old version stopped, never a side effect of constructing a client.

Version 2 made ids project-scoped (see :mod:`tensordb.infra.project_scope`): documents stored
before are renamed to their scoped ids, so an upgraded deployment keeps seeing its samples, jobs,
logs and counters. A document is removed under its old id only once its copy under the new id is
stored; when another document holds the new id already (e.g. another project had published the id
``PROJECT:ID``), both are kept and the collision is reported for the operator to resolve.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError

from tensordb.errors import DatabaseVersionError

log = logging.getLogger(__name__)

MIGRATIONS = "tensordb_migrations"
#: The marker document of the database's schema version.
SCHEMA = "schema"
#: The marker the automatic renaming of earlier releases left: such a database is at version 2.
SCOPED_IDS = "scoped-ids"
#: The schema version this TensorDB writes: 1 had unscoped ids, 2 project-scoped ones.
SCHEMA_VERSION = 2
UPGRADE_COMMAND = "tensordb db upgrade"
BATCH = 1000
_OLD_LOG_SEPARATOR = "\x1f"  # logs' ids began with the project and this separator
DUPLICATE_KEY = 11000


@dataclass(frozen=True)
class Collision:
    """A document kept under its old id because another document holds its scoped id."""

    collection: str
    old_id: Any
    new_id: str

    def __str__(self) -> str:
        return (
            f"{self.collection}: {self.old_id!r} kept under its old id, invisible to TensorDB, because {self.new_id!r} "
            "is taken by another document: delete or rename one of them with a MongoDB shell, then run "
            f"`{UPGRADE_COMMAND}` again"
        )


@dataclass
class UpgradeReport:
    """What :func:`upgrade` did: the versions, the documents renamed and the collisions left."""

    from_version: int
    to_version: int
    renamed: int = 0
    collisions: list[Collision] = field(default_factory=list)


def stored_version(db: Database) -> int | None:
    """The database's schema version, or None if none is recorded (a fresh database, or one of
    a release before versions were recorded)."""
    marker = db[MIGRATIONS].find_one({"_id": SCHEMA})
    if marker is not None:
        return int(marker["version"])
    if db[MIGRATIONS].find_one({"_id": SCOPED_IDS}) is not None:
        return 2  # renamed by the automatic migration of the release before
    return None


def check_version(db: Database) -> None:
    """Refuse a database of another schema version, saying what to run; stamp a fresh one.

    A database without a recorded version is stamped with :data:`SCHEMA_VERSION` when it holds
    no document of an earlier version (a new database, or one this version wrote before any
    process checked it); otherwise it needs :func:`upgrade`.

    Raises
    ------
    DatabaseVersionError
        The database holds documents of an earlier version (run ``tensordb db upgrade``), or of a
        later one (run a newer TensorDB).
    """
    version = stored_version(db)
    if version is None:
        version = 1 if _first_old_document(db) is not None else SCHEMA_VERSION
        if version == SCHEMA_VERSION:
            _stamp(db, SCHEMA_VERSION, renamed=0, collisions=0)
    if version < SCHEMA_VERSION:
        raise DatabaseVersionError(
            f"the MongoDB database {db.name!r} holds documents of an earlier TensorDB version (schema {version}, this is "
            f"{SCHEMA_VERSION}): stop every process of the old version and run `{UPGRADE_COMMAND}` once, then start again"
        )
    if version > SCHEMA_VERSION:
        raise DatabaseVersionError(
            f"the MongoDB database {db.name!r} was upgraded by a newer TensorDB (schema {version}, this is "
            f"{SCHEMA_VERSION}): install the TensorDB version that upgraded it"
        )


def upgrade(db: Database) -> UpgradeReport:
    """Bring the database to :data:`SCHEMA_VERSION` (idempotent; resumes an upgrade that was cut off).

    Documents are renamed pass after pass until one renames nothing: a scoped id held by another
    project's document of an old id is free once that document was renamed in turn. What still
    collides then is kept under its old id and reported, and the version recorded all the same
    (those documents stay as they are until the operator resolves them and upgrades again).

    Raises
    ------
    DatabaseVersionError
        The database was upgraded by a newer TensorDB.
    """
    from_version = stored_version(db) or 1
    if from_version > SCHEMA_VERSION:
        check_version(db)  # raises, saying which version to install
    report = UpgradeReport(from_version, SCHEMA_VERSION)
    while True:
        collisions: list[Collision] = []
        renamed = sum(_scope_ids(db, name, collisions) for name in db.list_collection_names() if _holds_documents(name))
        report.renamed += renamed
        if not renamed:
            report.collisions = collisions
            break
    _stamp(db, SCHEMA_VERSION, renamed=report.renamed, collisions=len(report.collisions))
    for collision in report.collisions:
        log.warning("upgrade: %s", collision)
    log.info("upgraded to schema %d: %d documents renamed to project-scoped ids", SCHEMA_VERSION, report.renamed)
    return report


def _stamp(db: Database, version: int, renamed: int, collisions: int) -> None:
    change = {"version": version, "at": datetime.now(UTC), "renamed": renamed, "collisions": collisions}
    try:
        db[MIGRATIONS].update_one({"_id": SCHEMA}, {"$set": change}, upsert=True)
    except DuplicateKeyError:
        pass  # another process stamped it at the same time (concurrent upserts race)


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


def _old_documents(db: Database, name: str) -> Iterator[tuple[Any, str]]:
    """(old id, scoped id) of each document of collection ``name`` stored with an earlier id."""
    for document in db[name].find({"_id": {"$type": ["string", "object"]}}, {"_id": 1, "project": 1}):
        new_id = scoped_id(document)
        if new_id is not None:
            yield document["_id"], new_id


def _first_old_document(db: Database) -> tuple[Any, str] | None:
    return next(
        (found for name in db.list_collection_names() if _holds_documents(name) for found in _old_documents(db, name)), None
    )


def _scope_ids(db: Database, name: str, collisions: list[Collision]) -> int:
    """Rename one collection's documents to scoped ids, a batch at a time; returns how many."""
    renamed = 0
    pending: list[tuple[Any, str]] = []
    for rename in _old_documents(db, name):
        pending.append(rename)
        if len(pending) == BATCH:
            renamed += _rename(db, name, pending, collisions)
            pending = []
    return renamed + _rename(db, name, pending, collisions)


def _rename(db: Database, name: str, renames: list[tuple[Any, str]], collisions: list[Collision]) -> int:
    """Insert each document under its new id, then delete the old ids whose copy is stored: the
    copy inserted now, or an identical one (inserted by an upgrade cut off before deleting)."""
    if not renames:
        return 0
    collection = db[name]
    new_ids = {_hashable(old_id): new_id for old_id, new_id in renames}
    copies = []
    for document in collection.find({"_id": {"$in": [old_id for old_id, _ in renames]}}):
        old_id = document.pop("_id")
        if isinstance(old_id, dict):
            document.setdefault("project", old_id["project"])
        copies.append((old_id, {"_id": new_ids[_hashable(old_id)], **document}))
    taken: set[int] = set()
    try:
        collection.insert_many([copy for _, copy in copies], ordered=False)
    except BulkWriteError as exc:
        if exc.details.get("writeConcernErrors") or any(error["code"] != DUPLICATE_KEY for error in exc.details["writeErrors"]):
            raise
        taken = {error["index"] for error in exc.details["writeErrors"]}
    occupants = {
        occupant["_id"]: occupant for occupant in collection.find({"_id": {"$in": [copies[index][1]["_id"] for index in taken]}})
    }
    done = []
    for index, (old_id, copy) in enumerate(copies):
        if index in taken and occupants.get(copy["_id"]) != copy:
            collisions.append(Collision(name, old_id, copy["_id"]))
        else:
            done.append(old_id)
    collection.delete_many({"_id": {"$in": done}})
    return len(done)


def _hashable(document_id: Any) -> Any:
    return tuple(document_id.items()) if isinstance(document_id, dict) else document_id
