"""What named, versioned documents with blobs have in common (datasets, models).

- :func:`next_version`: version numbers 1, 2, 3... per (project, kind, name) from an atomic counter
  in the ``counters`` collection, so concurrent saves of one name never get the same number.
- :func:`check_fields`: caller-supplied metadata and filters are plain fields compared for
  equality, never MongoDB operators (``$``-names are refused, at any depth).
- The blob lifecycle that leaves no orphans: blobs are uploaded marked *pending*, the document that
  references them is inserted, then :func:`mark_referenced` clears the mark; deletes remove
  documents first and blobs second, and :func:`sweep_orphans` removes whatever a crash between two
  steps left behind (pending blobs only once they are older than a grace period).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId
from pymongo import ReturnDocument

from tensordb.errors import QueryError
from tensordb.infra.store import BLOB_BUCKET, Store

COUNTERS = "counters"
#: How long the blobs of a save in progress are spared by :func:`sweep_orphans`; blobs still
#: pending after that belong to a save that crashed. Generous, so slow uploads are safe.
PENDING_GRACE = timedelta(days=1)


def next_version(store: Store, kind: str, name: str, at_least: int | None = None) -> int:
    """The next integer version of ``name`` (1, 2, 3...) from an atomic per-project, per-kind counter.

    With ``at_least`` the counter is only raised to that value (an explicit version chosen by the
    caller), so later automatic versions never repeat it; ``at_least`` is returned.
    """
    counter = {"_id": f"{kind}:{name}"}
    if at_least is not None:
        store[COUNTERS].update_one(counter, {"$max": {"last": at_least}}, upsert=True)
        return at_least
    updated = store[COUNTERS].find_one_and_update(
        counter, {"$inc": {"last": 1}}, upsert=True, return_document=ReturnDocument.AFTER
    )
    assert updated is not None  # an upsert returning the document AFTER always has one
    return int(updated["last"])


def check_name(name: object, what: str) -> str:
    """``name`` if it can name a ``what``; raises :class:`QueryError` otherwise."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise QueryError(f"{what} names are non-empty strings without NUL characters; got {name!r}")
    return name


def check_fields(fields: dict[str, Any], what: str, reserved: Iterable[str] = ()) -> None:
    """Refuse names that would not be a plain equality match on a field, or that are reserved.

    Values are checked too: ``description={"$ne": None}`` would otherwise turn an equality filter
    into an operator query.
    """
    reserved = frozenset(reserved)
    for key, value in fields.items():
        if key in reserved:
            raise QueryError(
                f"{what}: {key!r} is set by TensorDB and cannot be used as a field here "
                f"(reserved: {', '.join(sorted(reserved))}); rename it"
            )
        check_keys({key: value}, what)


def check_keys(value: Any, what: str) -> None:
    """Refuse ``$``-prefixed (operator) and NUL-containing names anywhere inside ``value``."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or key.startswith("$") or "\0" in key:
                raise QueryError(
                    f"{what}: field name {key!r} is not allowed: names are strings that do not start with '$' "
                    "or contain NUL; filters match equal values only, so pass plain values"
                )
            check_keys(item, what)
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_keys(item, what)


def now() -> datetime:
    """The current UTC time at MongoDB's millisecond precision, so a returned document equals the stored one."""
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def mark_referenced(store: Store, blob_ids: list[ObjectId]) -> None:
    """Clear the pending mark of blobs whose document is now stored: sweeps may judge them from now on."""
    if blob_ids:
        store[f"{BLOB_BUCKET}.files"].update_many({"_id": {"$in": blob_ids}}, {"$unset": {"metadata.pending": ""}})


def sweep_orphans(store: Store, collection: str, kind: str, reference: str, grace: timedelta = PENDING_GRACE) -> int:
    """Delete this project's blobs of ``kind`` that no document of ``collection`` references; returns how many.

    ``reference`` is the field (dotted path) of the documents that holds blob ids. Blobs of a save
    in progress are marked pending and spared for ``grace``, so a sweep running alongside a save
    never takes its blobs. Candidates are listed before references are read: a blob that stopped
    being pending already had its document, so it is seen as referenced.
    """
    candidates = [
        blob["_id"]
        for blob in store[f"{BLOB_BUCKET}.files"].find(
            {
                "metadata.project": store.project,
                "metadata.kind": kind,
                "$or": [{"metadata.pending": {"$exists": False}}, {"uploadDate": {"$lt": now() - grace}}],
            },
            {"_id": 1},
        )
    ]
    if not candidates:
        return 0
    referenced = set(store[collection].distinct(reference, {"project": store.project, reference: {"$in": candidates}}))
    orphans = [blob_id for blob_id in candidates if blob_id not in referenced]
    store.delete_blobs(orphans)
    return len(orphans)
