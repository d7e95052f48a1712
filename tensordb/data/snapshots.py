"""Member snapshots: a pinned cohort's member ids, in cohort order, materialised once per project.

Ranks of a distributed job and a resumed job must agree on the members of a cohort and their order
without talking to each other, and a resume must not re-read the metadata it skips. A snapshot gives
both: the ids are read once from the cohort's cursor and stored, packed into one GridFS blob, under
an id derived from what defines the members (query, sort, limit, split and the pin ``as_of``). Any
process that names the same pinned cohort finds the same snapshot; loading it is one document and
one blob read, whatever the cohort's size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from bson import ObjectId

from tensordb.errors import IntegrityError, QueryError
from tensordb.infra.codecs import xxh3_hex
from tensordb.infra.store import Blob, Store, insert_ignoring_duplicates

if TYPE_CHECKING:
    from tensordb.data.sources import SampleSource

SNAPSHOTS = "cohort_snapshots"
BLOB_KIND = "cohort-snapshot"


@dataclass(frozen=True)
class Snapshot:
    """The members of a pinned cohort, in cohort order (``ids`` holds one string per member)."""

    id: str
    ids: list[str]


def snapshot_id(cohort: SampleSource) -> str:
    """The id of a pinned cohort's snapshot: a digest of what defines its members (not its name,
    nor the arrays it yields), so equal definitions pinned at the same time share one snapshot."""
    if cohort.as_of is None:
        raise QueryError("only a pinned cohort has a member snapshot: pin it first with cohort.pinned(as_of)")
    definition = {key: value for key, value in cohort.describe().items() if key not in ("name", "x", "y")}
    return hashlib.sha256(orjson.dumps(definition, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def _blob_id(snapshot: str, digest: str) -> ObjectId:
    """Deterministic, so processes that race to create the same snapshot write one blob."""
    return ObjectId(hashlib.sha256(f"{snapshot}:{digest}".encode()).digest()[:12])


def take_snapshot(cohort: SampleSource) -> Snapshot:
    """The snapshot of the pinned ``cohort``: loaded when one exists in this project, else created
    from one pass over the cohort's ids (the only time they are read from the samples)."""
    found = load_snapshot(cohort.store, snapshot_id(cohort))
    return found if found is not None else _create(cohort)


def _create(cohort: SampleSource) -> Snapshot:
    store, snapshot, as_of = cohort.store, snapshot_id(cohort), cohort.as_of
    assert as_of is not None  # snapshot_id refused an unpinned cohort
    ids = [document["_id"] for document in cohort.documents({"_id": 1}, batch_size=10_000)]
    data = orjson.dumps(ids)
    digest = xxh3_hex(data)
    blob_id = _blob_id(snapshot, digest)
    store.write_blobs([Blob(blob_id, f"cohort-snapshot/{snapshot}", data, {"kind": BLOB_KIND, "snapshot": snapshot})])
    document = {
        "_id": snapshot,
        "project": store.project,
        "definition": cohort.describe(),
        "as_of": as_of,
        "members": len(ids),
        "blob_id": blob_id,
        "nbytes": len(data),
        "xxh3": digest,
        "created_at": datetime.now(UTC),
    }
    if insert_ignoring_duplicates(store[SNAPSHOTS], [document]):
        found = load_snapshot(store, snapshot)  # another process created it meanwhile: theirs is the snapshot
        assert found is not None
        if found.ids != ids:
            store.delete_blobs([blob_id])
        return found
    return Snapshot(snapshot, ids)


def load_snapshot(store: Store, snapshot: str) -> Snapshot | None:
    """The snapshot ``snapshot`` of this project (``None`` when there is none), its blob checked."""
    document = store[SNAPSHOTS].find_one({"_id": snapshot})
    if document is None:
        return None
    data = store.read_blobs([document["blob_id"]]).get(document["blob_id"])
    if data is None or len(data) != document["nbytes"] or xxh3_hex(data) != document["xxh3"]:
        raise IntegrityError(
            f"the member ids of cohort snapshot {snapshot!r} are missing or corrupted in GridFS: delete the "
            f"snapshot (store['{SNAPSHOTS}'].delete_one({{'_id': {snapshot!r}}})) and stream the pinned cohort again"
        )
    ids: Any = orjson.loads(data)
    return Snapshot(snapshot, ids)
