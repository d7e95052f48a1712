"""MongoDB and GridFS: the collections TensorDB keeps, their indexes, and blob storage for arrays.

MongoDB holds everything that is known (metadata, jobs, logs, models); GridFS holds the bytes.
Every blob carries its sha256, checked on read, so corruption is an error, never silent.

Blobs belong to a project like documents do: a blob's GridFS files document records its project
(``metadata.project``) and its digests, both set here and never by a caller's metadata, and every
blob method refuses ids whose files document belongs to another project. Chunks carry no project,
so they are only reached through the ids of this project's files documents.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import bson
import gridfs
import numpy as np
from bson import Binary, ObjectId
from bson.errors import InvalidDocument
from pymongo import ASCENDING, DESCENDING, IndexModel, MongoClient
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import (
    BulkWriteError,
    CollectionInvalid,
    DocumentTooLarge,
    OperationFailure,
    ServerSelectionTimeoutError,
    WriteConcernError,
)
from pymongo.uri_parser import parse_uri

from tensordb.config import Settings, mask_uri
from tensordb.errors import (
    ConfigurationError,
    IntegrityError,
    ProjectScopeError,
    StorageError,
    UnreachableError,
    describe_error,
    mongo_refusal,
)
from tensordb.infra.codecs import array_to_npy, npy_to_array, sha256_hex, xxh3_hex
from tensordb.infra.migrations import UpgradeReport, check_version, upgrade
from tensordb.infra.project_scope import ProjectCollection

#: Indexes created at start-up, per collection. Each area adds the ones its queries need.
INDEXES: dict[str, list[IndexModel]] = {
    # GridFS's own indexes, created up front because TensorDB also writes chunks directly
    "blobs.files": [
        IndexModel([("filename", ASCENDING), ("uploadDate", ASCENDING)]),
        IndexModel([("metadata.project", ASCENDING), ("metadata.kind", ASCENDING)]),  # orphan sweeps
    ],
    "blobs.chunks": [IndexModel([("files_id", ASCENDING), ("n", ASCENDING)], unique=True)],
    # sample metadata: the common cohort queries ("last N", by dataset, by tag, by split) are index scans
    "samples": [
        IndexModel([("project", ASCENDING), ("imported_at", DESCENDING), ("_id", DESCENDING)]),
        IndexModel([("project", ASCENDING), ("dataset", ASCENDING), ("imported_at", DESCENDING), ("_id", DESCENDING)]),
        IndexModel([("project", ASCENDING), ("tags", ASCENDING), ("imported_at", DESCENDING)]),
        IndexModel([("project", ASCENDING), ("split_key", ASCENDING)]),
    ],
    # ingest batches recorded announced (streams.ingest): read by id only
    "sample_imports": [],
    # member snapshots of pinned cohorts (tensordb.data.snapshots): found by id, listed newest first
    "cohort_snapshots": [IndexModel([("project", ASCENDING), ("created_at", DESCENDING)])],
    # the job queue: claims take the most urgent pending job; the reaper scans expired leases
    "jobs": [
        IndexModel([("project", ASCENDING), ("status", ASCENDING), ("priority", DESCENDING), ("submitted_at", ASCENDING)]),
        IndexModel([("project", ASCENDING), ("status", ASCENDING), ("lease_until", ASCENDING)]),
        IndexModel([("project", ASCENDING), ("name", ASCENDING), ("submitted_at", DESCENDING)]),
        IndexModel([("project", ASCENDING), ("policy", ASCENDING), ("status", ASCENDING)]),  # the retrain trigger
        IndexModel([("project", ASCENDING), ("labels.study", ASCENDING), ("status", ASCENDING)]),  # a study's free slots
    ],
    # running workers (tensordb.jobs.workers): the live ones are those seen lately; a killed worker's
    # document is removed by MongoDB a day after it was last seen
    "workers": [
        IndexModel([("project", ASCENDING), ("seen_at", DESCENDING)]),
        IndexModel([("seen_at", ASCENDING)], expireAfterSeconds=24 * 3600),
    ],
    # the continuous-learning loop: policies, the scores of versions, and the miner's decisions
    # studies (tensordb.studies): the study, its trials (one per train job) and ASHA's rung verdicts
    "studies": [IndexModel([("project", ASCENDING), ("created_at", DESCENDING)])],
    "study_trials": [
        IndexModel([("project", ASCENDING), ("study", ASCENDING), ("configuration", ASCENDING), ("fold", ASCENDING)])
    ],
    "study_decisions": [IndexModel([("project", ASCENDING), ("study", ASCENDING), ("rung", ASCENDING), ("at", ASCENDING)])],
    # streaming inference (workers.predictor): one answer per request id, kept a week for redeliveries
    "predictions": [IndexModel([("stored_at", ASCENDING)], expireAfterSeconds=7 * 24 * 3600)],
    "policies": [IndexModel([("project", ASCENDING), ("name", ASCENDING)])],
    "policy_counted_samples": [IndexModel([("project", ASCENDING), ("policy", ASCENDING), ("batch_id", ASCENDING)])],
    "evaluations": [
        IndexModel([("project", ASCENDING), ("policy", ASCENDING), ("at", DESCENDING)]),
        IndexModel([("project", ASCENDING), ("model", ASCENDING), ("version", ASCENDING)]),
    ],
    "decisions": [IndexModel([("project", ASCENDING), ("policy", ASCENDING), ("at", DESCENDING)])],
    "dead_letters": [
        IndexModel([("project", ASCENDING), ("at", DESCENDING)]),
        IndexModel([("project", ASCENDING), ("topic", ASCENDING), ("at", DESCENDING)]),
    ],
    # whole datasets (tensordb.data.datasets): the newest of a name, and a name's given version
    "datasets": [
        IndexModel([("project", ASCENDING), ("name", ASCENDING), ("time", DESCENDING), ("_id", DESCENDING)]),
        IndexModel([("project", ASCENDING), ("name", ASCENDING), ("version", ASCENDING)]),
    ],
    # model registry (tensordb.models.registry): one document per version, a name's newest, a job's checkpoints
    "models": [
        IndexModel([("project", ASCENDING), ("name", ASCENDING), ("version", ASCENDING)], unique=True),
        IndexModel([("project", ASCENDING), ("name", ASCENDING), ("time", DESCENDING)]),
        IndexModel([("project", ASCENDING), ("job_id", ASCENDING)]),
    ],
    # one document per (model, alias), changed atomically by promotions
    "model_aliases": [
        IndexModel([("project", ASCENDING), ("name", ASCENDING), ("alias", ASCENDING)], unique=True),
    ],
    # step logs (tensordb.runs.logger, tensordb.runs.queries): a run's steps in order, a job's runs, recent activity
    "logs": [
        IndexModel([("project", ASCENDING), ("run_id", ASCENDING), ("phase", ASCENDING), ("step", ASCENDING)]),
        IndexModel([("project", ASCENDING), ("job_id", ASCENDING)]),
        IndexModel([("project", ASCENDING), ("wall_time", ASCENDING)]),
    ],
}

BLOB_BUCKET = "blobs"
#: Each processor's last stored offset per partition (written by streams.processing, shown by the dashboard).
PROGRESS = "processor_progress"
#: Chunk size of blobs TensorDB writes: one chunk (one document) for all but the largest arrays,
#: so reading a batch of samples costs one query instead of one per sample.
CHUNK_BYTES = 4 * 1024 * 1024
#: About how many bytes of chunks :meth:`Store.read_blobs` asks mongod for per reply. Its default
#: first reply holds up to 16 MiB, built by growing (copying) one buffer, then copied through the
#: socket and pymongo's decoding, presumably out of the CPUs' caches. Reading batches of 64, one
#: after another, replies of ~1.5 MiB cut mongod's CPU per 256×256×3 sample from 147–160 µs to
#: 100 µs and read 6,600 samples/s instead of 4,800–5,000 (150×150×3: 12,900–14,100/s instead of
#: 10,600–11,400; 512×512×3: 1,560–1,610/s instead of 1,390–1,450).
BLOB_REPLY_BYTES = 3 * 2**19
#: Blob ids a store remembers having found to be its project's, so that a cohort read epoch after
#: epoch checks each blob once: the check is one more query per batch, which cost a 256×256×3
#: stream 8 % (4,971 against 5,383 samples/s, 6 interleaved passes in one process). Forgotten all
#: at once when full.
OWN_BLOBS_REMEMBERED = 100_000
#: Blob metadata the store records itself: a caller's metadata never names a blob's project or digests.
RESERVED_BLOB_METADATA = frozenset({"project", "sha256", "xxh3"})
#: Where :func:`insert_new` writes: a project's view, or a raw collection (blob chunks carry no project).
Insertable = ProjectCollection | Collection[Mapping[str, Any]]
DUPLICATE_KEY = 11000
#: The largest document MongoDB stores.
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
NAMESPACE_EXISTS = 48
AUTHENTICATION_FAILED = 18


@dataclass(frozen=True)
class Blob:
    """A blob for :meth:`Store.write_blobs`: its digests are computed here from its bytes, never given,
    so the ``sha256`` and ``xxh3`` recorded with it describe the bytes stored.

    Parameters
    ----------
    id:
        The blob's id, chosen by the caller (deterministic ids make a rewrite a no-op).
    filename:
        The GridFS filename (for people and tools; TensorDB reads blobs by id).
    data:
        The bytes.
    metadata:
        More fields of the files document's ``metadata`` (not ``project`` or a digest).
    """

    id: ObjectId
    filename: str
    data: bytes
    metadata: Mapping[str, Any]
    sha256: str = field(init=False)
    xxh3: str = field(init=False)

    def __post_init__(self) -> None:
        check_blob_metadata(self.metadata)
        object.__setattr__(self, "sha256", sha256_hex(self.data))
        object.__setattr__(self, "xxh3", xxh3_hex(self.data))


def check_blob_metadata(metadata: Mapping[str, Any]) -> None:
    """Refuse metadata that would choose a blob's project or digests (the store records them)."""
    reserved = sorted(RESERVED_BLOB_METADATA.intersection(metadata))
    if reserved:
        raise ProjectScopeError(
            f"blob metadata cannot set {', '.join(map(repr, reserved))}: the store records a blob's project and "
            "digests itself, from the project it belongs to and the bytes stored; leave those keys out"
        )


class Store:
    """A project's view of the MongoDB database: collections, indexes and the GridFS blob bucket.

    The client, database and bucket it holds are private: every document is reached through
    :meth:`__getitem__` and every blob through the blob methods, which keep to the project.

    Every write is acknowledged only once it survives a mongod crash: journaled, and on a replica
    set by a majority (``w="majority", j=True``), so nothing TensorDB acknowledges or commits
    offsets for can be forgotten by a restarted server. A ``w`` or ``journal`` option in
    ``TENSORDB_MONGO_URI`` replaces this default (e.g. ``w=1&journal=false`` trades that
    guarantee for speed; ``bench/faults.py`` measures the difference).
    """

    def __init__(self, settings: Settings, client: MongoClient | None = None, server_wait_ms: int = 30_000) -> None:
        """
        Parameters
        ----------
        settings:
            Where the database is (``mongo_uri``, ``mongo_database``) and the project.
        client:
            An existing client to share (not closed by :meth:`close`); one is created otherwise.
        server_wait_ms:
            How long a call waits for a reachable server before raising (pymongo's server
            selection timeout): processors use a few seconds so they notice a stop request.
        """
        self.settings = settings
        self.project = settings.project
        self._owns_client = client is None
        self._ensured: set[str] = set()  # collections ensure_indexes created with their indexes
        self._own_blobs: set[ObjectId] = set()  # see OWN_BLOBS_REMEMBERED
        self._client: MongoClient = client or MongoClient(
            settings.mongo_uri,
            tz_aware=True,
            appname=f"tensordb-{settings.project}",
            serverSelectionTimeoutMS=server_wait_ms,
            **durable_writes(settings.mongo_uri),
        )
        self._db: Database = self._client[settings.mongo_database]
        self._bucket = gridfs.GridFSBucket(self._db, bucket_name=BLOB_BUCKET, chunk_size_bytes=CHUNK_BYTES)

    def __getitem__(self, name: str) -> ProjectCollection:
        """The collection ``name`` as this project sees it: the only way to its documents
        (see :mod:`tensordb.infra.project_scope`)."""
        if name == f"{BLOB_BUCKET}.chunks":
            raise ProjectScopeError("blob chunks carry no project: read and write blobs through the Store's blob methods")
        return ProjectCollection(
            self._db[name], self.project, "metadata.project" if name == f"{BLOB_BUCKET}.files" else "project"
        )

    def ensure_indexes(self, *names: str) -> None:
        """Create the collections ``names`` (default: all, after checking the database's schema
        version: :mod:`tensordb.infra.migrations`) and their indexes (idempotent; cheap when they exist).

        Collections are created explicitly because MongoDB 4.0 cannot create them inside a
        transaction. Safe when several processes start at once: a collection another one created
        meanwhile is taken as it is. Named collections this store has ensured already are not
        asked about again (a worker opens a model registry, which names its own, for every job).
        """
        if names and self._ensured.issuperset(names):
            return
        existing = self._collection_names()
        if not names:
            check_version(self._db)  # never write beside documents of another version
        for name in names or INDEXES:
            indexes = INDEXES[name]
            if name not in existing:
                try:
                    self._db.create_collection(name)
                except CollectionInvalid:
                    pass  # created by another process since list_collection_names
                except OperationFailure as exc:
                    if exc.code != NAMESPACE_EXISTS:
                        raise
            if indexes:
                self._db[name].create_indexes(indexes)
        self._ensured.update(names or INDEXES)

    def upgrade(self) -> UpgradeReport:
        """Upgrade documents of earlier TensorDB versions (``tensordb db upgrade``; see
        :func:`tensordb.infra.migrations.upgrade`), then create the collections and indexes."""
        self._collection_names()  # unreachable servers and rejected credentials in TensorDB's words
        report = upgrade(self._db)
        self.ensure_indexes()
        return report

    def _collection_names(self) -> set[str]:
        """The database's collections; the first call of a process, so connection failures get
        TensorDB's words: rejected credentials, a TLS handshake that failed, no answer."""
        uri = mask_uri(self.settings.mongo_uri)
        try:
            return set(self._db.list_collection_names())
        except OperationFailure as exc:
            if exc.code == AUTHENTICATION_FAILED:
                raise ConfigurationError(
                    f"MongoDB at {uri} rejected the username or password in TENSORDB_MONGO_URI: check them "
                    "(and the authSource in the URI: the database the user was created in)"
                ) from exc
            raise
        except ServerSelectionTimeoutError as exc:
            raise UnreachableError(
                f"MongoDB at {uri} did not answer ({mask_uri(str(exc).split(', Timeout:')[0])}): start it (`tensordb "
                "services up`) or fix TENSORDB_MONGO_URI; a server that requires TLS needs tls=true and, for a private CA, "
                "tlsCAFile=PATH in the URI"
            ) from exc

    def put_bytes(self, data: bytes, filename: str, **metadata: Any) -> tuple[ObjectId, str]:
        """Store bytes as a GridFS blob of this project; returns (id, sha256).

        Parameters
        ----------
        data:
            The bytes.
        filename:
            The GridFS filename.
        **metadata:
            More fields of the blob's metadata; ``project``, ``sha256`` and ``xxh3`` are refused with
            a :class:`~tensordb.errors.ProjectScopeError` (the store records them itself).
        """
        check_blob_metadata(metadata)
        digest = sha256_hex(data)
        recorded = {**metadata, "project": self.project, "sha256": digest, "xxh3": xxh3_hex(data)}
        blob_id = self._bucket.upload_from_stream(filename, data, metadata=recorded)
        return blob_id, digest

    def get_bytes(self, blob_id: ObjectId | str, sha256: str | None = None) -> bytes:
        """Read a blob, verifying it against ``sha256`` (or the digest stored with it)."""
        with self._bucket.open_download_stream(ObjectId(blob_id)) as stream:
            if (stream.metadata or {}).get("project") != self.project:
                raise gridfs.errors.NoFile(f"no blob {blob_id} in project {self.project!r}")
            expected = sha256 or (stream.metadata or {}).get("sha256")
            data = stream.read()
        if expected and sha256_hex(data) != expected:
            raise IntegrityError(
                f"blob {blob_id} does not match its sha256 {expected}: it was corrupted or overwritten; "
                "re-publish the sample or restore the blobs collection from backup"
            )
        return data

    def put_array(self, array: np.ndarray, filename: str, **metadata: Any) -> tuple[ObjectId, str, int]:
        """Store an array as ``.npy`` bytes; returns (blob id, sha256, number of bytes)."""
        data = array_to_npy(array)
        blob_id, digest = self.put_bytes(data, filename, dtype=str(array.dtype), shape=list(array.shape), **metadata)
        return blob_id, digest, len(data)

    def get_array(self, blob_id: ObjectId | str, sha256: str | None = None) -> np.ndarray:
        return npy_to_array(self.get_bytes(blob_id, sha256))

    def write_blobs(self, blobs: list[Blob]) -> set[ObjectId]:
        """Write many small blobs in two round trips, as standard GridFS files readable by any tool.

        Ids are chosen by the caller (deterministic), and a blob of this project that already exists
        is left as it is, so writing the same batch twice (a redelivery) stores each blob once. An id
        that belongs to another project is refused (:class:`~tensordb.errors.ProjectScopeError`),
        before anything is written.

        Parameters
        ----------
        blobs:
            The blobs to write.

        Returns
        -------
        set of ObjectId
            The ids this call stored (the others existed already): only those are its to remove
            again when what references them cannot be stored.
        """
        existing = self._owned(self._owners(blob.id for blob in blobs), "write")
        new = [blob for blob in blobs if blob.id not in existing]
        if not new:
            return set()
        now = datetime.now(UTC)
        chunks, files = [], []
        for blob in new:
            view = memoryview(blob.data)
            for n, start in enumerate(range(0, max(len(blob.data), 1), CHUNK_BYTES)):
                chunks.append({"files_id": blob.id, "n": n, "data": Binary(bytes(view[start : start + CHUNK_BYTES]))})
            metadata = {**blob.metadata, "project": self.project, "sha256": blob.sha256, "xxh3": blob.xxh3}
            files.append(
                {
                    "_id": blob.id,
                    "length": len(blob.data),
                    "chunkSize": CHUNK_BYTES,
                    "uploadDate": now,
                    "filename": blob.filename,
                    "metadata": metadata,
                }
            )
        # chunks first: a files document is only visible once its bytes are all there
        insert_ignoring_duplicates(self._db[f"{BLOB_BUCKET}.chunks"], chunks)
        raced = {new[index].id for index in insert_ignoring_duplicates(self._db[f"{BLOB_BUCKET}.files"], files)}
        self._owned(self._owners(raced), "write")  # written meanwhile by another process: ours, or refused
        return {blob.id for blob in new} - raced

    def read_blobs(self, blob_ids: list[ObjectId], blob_bytes: int | None = None) -> dict[ObjectId, bytes]:
        """The bytes of many of this project's blobs in one query over their chunks (no per-file
        round trips), after one query that checks whose they are (once per blob and store: see
        :data:`OWN_BLOBS_REMEMBERED`).

        Callers check the bytes against the checksums recorded in their own documents (as the loader
        does). An id of another project's blob is refused with a
        :class:`~tensordb.errors.ProjectScopeError`; one that does not exist is left out.

        Parameters
        ----------
        blob_ids : list of ObjectId
            The blobs to read.
        blob_bytes : int, optional
            The size of the largest of them, when known: mongod then sends about
            :data:`BLOB_REPLY_BYTES` per reply instead of its default first batch of up to 16 MiB.
        """
        owned = list(self._readable(blob_ids))
        parts: dict[ObjectId, list[bytes]] = {}
        # no projection: mongod 4.0 would rebuild every projected chunk document (~13 % slower)
        cursor = self._db[f"{BLOB_BUCKET}.chunks"].find({"files_id": {"$in": owned}}, sort=[("files_id", 1), ("n", 1)])
        if blob_bytes:
            cursor = cursor.batch_size(max(1, BLOB_REPLY_BYTES // min(blob_bytes, CHUNK_BYTES)))
        for chunk in cursor:
            parts.setdefault(chunk["files_id"], []).append(chunk["data"])
        return {blob_id: b"".join(pieces) if len(pieces) > 1 else pieces[0] for blob_id, pieces in parts.items()}

    def delete_blobs(self, blob_ids: list[ObjectId]) -> None:
        """Delete this project's blobs by id; ids already gone are ignored so deletion can be retried
        safely, and an id of another project's blob is refused before anything is deleted.

        Parameters
        ----------
        blob_ids:
            The blobs to delete.
        """
        owned = list(self._owned(self._owners(blob_ids), "delete"))
        self._own_blobs.difference_update(owned)
        if owned:  # as GridFS deletes: the files document first, so no reader finds a blob without its bytes
            self._db[f"{BLOB_BUCKET}.files"].delete_many({"_id": {"$in": owned}, "metadata.project": self.project})
            self._db[f"{BLOB_BUCKET}.chunks"].delete_many({"files_id": {"$in": owned}})

    def _readable(self, blob_ids: Iterable[ObjectId]) -> set[ObjectId]:
        """Those of ``blob_ids`` that are this project's blobs, refusing another project's; those this
        store found to be its own before are not asked about again."""
        ids = set(blob_ids)
        remembered = self._own_blobs
        known = {blob_id for blob_id in ids if blob_id in remembered}  # before another thread may forget them
        owned = self._owned(self._owners(ids - known), "read")
        if len(remembered) + len(owned) > OWN_BLOBS_REMEMBERED:
            remembered.clear()
        remembered.update(owned)
        return known | owned

    def _owners(self, blob_ids: Iterable[ObjectId]) -> dict[ObjectId, Any]:
        """The project of each of ``blob_ids`` that has a files document (the others do not exist)."""
        ids = list(set(blob_ids))
        if not ids:
            return {}
        found = self._db[f"{BLOB_BUCKET}.files"].find({"_id": {"$in": ids}}, {"metadata.project": 1})
        return {file["_id"]: (file.get("metadata") or {}).get("project") for file in found}

    def _owned(self, owners: Mapping[ObjectId, Any], what: str) -> set[ObjectId]:
        """The ids of ``owners`` (see :meth:`_owners`), refusing any that belongs to another project."""
        foreign = sorted(str(blob_id) for blob_id, owner in owners.items() if owner != self.project)
        if foreign:
            raise ProjectScopeError(
                f"cannot {what} blob {foreign[0]}"
                + (f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else "")
                + f": it does not belong to project {self.project!r}; a store only reads and writes its own "
                "project's blobs (ids come from this project's documents)"
            )
        return set(owners)

    def ping(self) -> None:
        """Have the server answer (health checks); raises pymongo's error when it does not."""
        self._client.admin.command("ping")

    def authenticated_user(self) -> str | None:
        """The MongoDB user this store's connections are authenticated as (None without authentication)."""
        users = self._client.admin.command("connectionStatus")["authInfo"]["authenticatedUsers"]
        return users[0]["user"] if users else None

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def durable_writes(mongo_uri: str) -> dict[str, Any]:
    """The write concern that survives a mongod crash, unless the URI chooses its own."""
    options = parse_uri(mongo_uri)["options"] if mongo_uri.startswith("mongodb://") else {}
    if "w" in options or "journal" in options:
        return {}
    return {"w": "majority", "journal": True}


def insert_new(collection: Insertable, documents: Sequence[Mapping[str, Any]]) -> tuple[set[int], dict[int, str]]:
    """Insert documents, each on its own: returns the positions of duplicates and of refusals.

    A document whose unique key exists already is a duplicate (skipped: idempotent writes); one
    MongoDB refuses (too deep, bad field name...) is returned with the reason, in TensorDB's terms,
    and the others are stored all the same. Plain inserts are ~3x faster than upserts.

    A document that cannot even be encoded (an integer beyond 64 bits, a key BSON refuses, over
    16 MB) makes pymongo refuse the whole call before sending it: the documents are then checked
    one by one in memory and the others inserted in one more call, so a few such documents cost
    one extra pass over the batch, never a write per document.
    """
    try:
        return _insert_many(collection, documents)
    except (OverflowError, InvalidDocument, DocumentTooLarge):
        pass  # documents before the one that failed may be stored already: duplicates on the next try
    refused = {index: reason for index, document in enumerate(documents) if (reason := unencodable(document))}
    rest = [index for index in range(len(documents)) if index not in refused]
    duplicates, refused_by_mongo = _insert_many(collection, [documents[index] for index in rest])
    refused.update({rest[position]: reason for position, reason in refused_by_mongo.items()})
    return {rest[position] for position in duplicates}, refused


def unencodable(document: Mapping[str, Any]) -> str | None:
    """Why MongoDB cannot store ``document`` as it is (in TensorDB's terms), or None if it can."""
    try:
        size = len(bson.encode(document))
    except (OverflowError, InvalidDocument) as exc:
        return describe_error(exc)
    return mongo_refusal(10334, f"{size} bytes of BSON") if size > MAX_DOCUMENT_BYTES else None


def _insert_many(collection: Insertable, documents: Sequence[Mapping[str, Any]]) -> tuple[set[int], dict[int, str]]:
    if not documents:
        return set(), {}
    try:
        collection.insert_many(documents, ordered=False)
    except BulkWriteError as exc:
        if exc.details.get("writeConcernErrors"):
            raise WriteConcernError(str(exc.details["writeConcernErrors"][0].get("errmsg"))) from exc
        duplicates, refused = set(), {}
        for error in exc.details["writeErrors"]:
            if error["code"] == DUPLICATE_KEY:
                duplicates.add(error["index"])
            else:
                refused[error["index"]] = mongo_refusal(error["code"], error.get("errmsg", ""))
        return duplicates, refused
    return set(), {}


def insert_ignoring_duplicates(collection: Insertable, documents: Sequence[Mapping[str, Any]]) -> set[int]:
    """Insert documents whose unique key is new (see :func:`insert_new`); returns the duplicates'
    positions, and raises :class:`~tensordb.errors.StorageError` if MongoDB refused any."""
    duplicates, refused = insert_new(collection, documents)
    if refused:
        raise StorageError(next(iter(refused.values())))
    return duplicates
