"""MongoDB and GridFS: the collections TensorDB keeps, their indexes, and blob storage for arrays.

MongoDB holds everything that is known (metadata, jobs, logs, models); GridFS holds the bytes.
Every blob carries its sha256, checked on read, so corruption is an error, never silent.
"""

from __future__ import annotations

from typing import Any

import gridfs
import numpy as np
from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, IndexModel, MongoClient
from pymongo.collection import Collection
from pymongo.database import Database

from tensordb.codecs import array_to_npy, npy_to_array, sha256_hex
from tensordb.config import Settings
from tensordb.errors import IntegrityError

#: Indexes created at start-up, per collection. Each area adds the ones its queries need.
INDEXES: dict[str, list[IndexModel]] = {
    "dead_letters": [
        IndexModel([("project", ASCENDING), ("at", DESCENDING)]),
        IndexModel([("project", ASCENDING), ("topic", ASCENDING), ("at", DESCENDING)]),
    ],
}

BLOB_BUCKET = "blobs"


class Store:
    """A project's view of the MongoDB database: collections, indexes and the GridFS blob bucket."""

    def __init__(self, settings: Settings, client: MongoClient | None = None) -> None:
        self.settings = settings
        self.project = settings.project
        self._owns_client = client is None
        self.client: MongoClient = client or MongoClient(
            settings.mongo_uri, tz_aware=True, appname=f"tensordb-{settings.project}"
        )
        self.db: Database = self.client[settings.mongo_database]
        self.blobs = gridfs.GridFSBucket(self.db, bucket_name=BLOB_BUCKET)

    def __getitem__(self, name: str) -> Collection:
        return self.db[name]

    def ensure_indexes(self) -> None:
        """Create every collection and index TensorDB needs (idempotent; cheap when they exist).

        Collections are created explicitly because MongoDB 4.0 cannot create them inside a
        transaction.
        """
        existing = set(self.db.list_collection_names())
        for name, indexes in INDEXES.items():
            if name not in existing:
                self.db.create_collection(name)
            self.db[name].create_indexes(indexes)
        for name in (f"{BLOB_BUCKET}.files", f"{BLOB_BUCKET}.chunks"):
            if name not in existing:
                self.db.create_collection(name)

    def put_bytes(self, data: bytes, filename: str, **metadata: Any) -> tuple[ObjectId, str]:
        """Store bytes as a GridFS blob tagged with the project and sha256; returns (id, sha256)."""
        digest = sha256_hex(data)
        blob_id = self.blobs.upload_from_stream(
            filename, data, metadata={"project": self.project, "sha256": digest, **metadata}
        )
        return blob_id, digest

    def get_bytes(self, blob_id: ObjectId | str, sha256: str | None = None) -> bytes:
        """Read a blob, verifying it against ``sha256`` (or the digest stored with it)."""
        with self.blobs.open_download_stream(ObjectId(blob_id)) as stream:
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

    def delete_blobs(self, blob_ids: list[ObjectId]) -> None:
        """Delete blobs by id; ids already gone are ignored so deletion can be retried safely."""
        for blob_id in blob_ids:
            try:
                self.blobs.delete(blob_id)
            except gridfs.errors.NoFile:
                pass

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
