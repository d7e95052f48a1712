"""Whole datasets (``(X_train, y_train, X_test, y_test)`` and the like) saved and loaded by name.

This is TensorLayer's ``save_dataset`` / ``find_dataset`` / ``find_all_datasets`` / ``delete_datasets``
without pickle: each array is a ``.npy`` blob in GridFS (sha256-checked on read) and one document in
the ``datasets`` collection describes a saved dataset: its name, version, save time, the caller's
keyword arguments as top-level fields (so ``description='...'`` can be filtered and sorted on, as in
TensorLayer) and, per array, the blob id, dtype, shape, nbytes and sha256.

Writes are ordered so that no document ever points at missing blobs: a save uploads the blobs and
then inserts the document; a delete removes documents and then their blobs. A process dying between
the two steps of a delete leaves orphan blobs, which :meth:`Datasets.sweep_orphans` (run by every
:meth:`Datasets.delete`) removes; one dying in the middle of a save leaves blobs marked pending,
removed by a sweep once they are older than ``PENDING_GRACE``. Counters, field checks and the blob
lifecycle are shared with the model registry (:mod:`tensordb.infra.versioning`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, TypeAlias

import numpy as np
from bson import ObjectId

from tensordb.errors import QueryError
from tensordb.infra import versioning
from tensordb.infra.store import Store
from tensordb.infra.versioning import PENDING_GRACE

COLLECTION = "datasets"
BLOB_KIND = "dataset"

#: What can be saved: one array, or a tuple, list or dict (string keys) of arrays.
Dataset: TypeAlias = np.ndarray | tuple[np.ndarray, ...] | list[np.ndarray] | dict[str, np.ndarray]
Version: TypeAlias = int | str

#: Fields TensorDB sets itself; a keyword argument with one of these names would overwrite them.
RESERVED = frozenset({"_id", "project", "name", "time", "arrays", "structure"})

_NEWEST = [("time", -1), ("_id", -1)]  # _id breaks ties between saves within one millisecond
_OLDEST = [("time", 1), ("_id", 1)]


class Datasets:
    """A project's saved datasets; every query is restricted to ``store.project``.

    Versions: ``save`` keeps a ``version=`` given by the caller (TensorLayer scripts use strings such
    as ``'1.0'``) and otherwise numbers saves of a name 1, 2, 3... Because versions may mix strings
    and integers, "the" dataset of a name is the newest by save time unless ``version=`` or ``sort=``
    says otherwise. Saving an existing version again does not replace it: both are kept and the
    newer one is found first.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.project = store.project
        self.collection = store[COLLECTION]

    def save(self, dataset: Dataset, name: str, version: Version | None = None, **meta: Any) -> dict[str, Any]:
        """Store ``dataset`` under ``name`` with ``meta`` as extra fields; returns its document.

        Object arrays are refused (codecs.ArrayCodecError) because they would need pickle. If anything
        fails, what was already written is deleted again, so a failed save leaves nothing behind.
        """
        _check_name(name)
        _check_fields(meta, "dataset metadata")
        if version is not None and (isinstance(version, bool) or not isinstance(version, (int, str))):
            raise QueryError(f"versions are integers or strings such as '1.0'; got {version!r}")
        structure, items = _flatten(dataset)
        document_id = ObjectId()
        blob_ids: list[ObjectId] = []
        try:
            arrays = []
            for key, array in items:
                blob_id, digest, _ = self.store.put_array(
                    array, f"dataset/{name}/{key}", kind=BLOB_KIND, dataset=name, pending=True
                )
                blob_ids.append(blob_id)
                entry = {
                    "blob": blob_id,
                    "dtype": str(array.dtype),
                    "shape": list(array.shape),
                    "nbytes": int(array.nbytes),
                    "sha256": digest,
                }
                arrays.append({"key": key, **entry} if structure == "dict" else entry)
            document = {
                **meta,
                "_id": document_id,
                "project": self.project,
                "name": name,
                "version": self._next_version(name, version),
                "time": versioning.now(),
                "structure": structure,
                "arrays": arrays,
            }
            self.collection.insert_one(document)
        except BaseException:
            # an insert that failed on the network may still have happened: remove it before its blobs
            self.collection.delete_one({"_id": document_id})
            self.store.delete_blobs(blob_ids)
            raise
        # the document now references the blobs, so they are no longer a save in progress
        versioning.mark_referenced(self.store, blob_ids)
        return document

    def find(
        self, name: str, version: Version | None = None, sort: list[tuple[str, int]] | None = None, **filters: Any
    ) -> Dataset | None:
        """The newest dataset named ``name`` matching the filters (or the first by ``sort``), else None.

        It comes back in the structure it was saved in: an array, tuple, list or dict of arrays.
        """
        if version is not None:
            filters["version"] = version
        document = self.collection.find_one(self._query(name, filters), sort=sort or _NEWEST)
        return None if document is None else self._load(document)

    def find_all(self, name: str, **filters: Any) -> list[Dataset]:
        """Every dataset named ``name`` matching the filters, oldest first (TensorLayer's find_all_datasets)."""
        return [self._load(document) for document in self.collection.find(self._query(name, filters), sort=_OLDEST)]

    def list(self, name: str | None = None, **filters: Any) -> list[dict[str, Any]]:
        """Documents only, oldest first: name, version, time, metadata and each array's dtype, shape, size."""
        return list(self.collection.find(self._query(name, filters, all_names=True), sort=_OLDEST))

    def delete(self, name: str | None = None, **filters: Any) -> int:
        """Delete the matching datasets and their blobs; returns how many datasets were deleted.

        No name and no filters deletes every dataset of the project. Documents go first, then their
        blobs, then :meth:`sweep_orphans`, so retrying a delete that died half-way finishes it.
        """
        documents = list(self.collection.find(self._query(name, filters, all_names=True), {"arrays.blob": 1}))
        ids = [document["_id"] for document in documents]
        deleted = self.collection.delete_many({"_id": {"$in": ids}}).deleted_count
        self.store.delete_blobs([entry["blob"] for document in documents for entry in document["arrays"]])
        self.sweep_orphans()
        return deleted

    def sweep_orphans(self, grace: timedelta = PENDING_GRACE) -> int:
        """Delete this project's dataset blobs that no dataset document references; returns how many.

        Blobs of a save in progress (marked pending) are spared for ``grace``; see
        :func:`tensordb.infra.versioning.sweep_orphans`.
        """
        return versioning.sweep_orphans(self.store, COLLECTION, BLOB_KIND, "arrays.blob", grace)

    def _next_version(self, name: str, version: Version | None) -> Version:
        """The caller's version, or the next integer for ``name`` from an atomic per-name counter.

        An explicit integer version raises the counter to it, so later automatic versions do not
        repeat it; a string version leaves the counter alone.
        """
        if isinstance(version, str):
            return version
        return versioning.next_version(self.store, "dataset", name, at_least=version)

    def _query(self, name: str | None, filters: dict[str, Any], all_names: bool = False) -> dict[str, Any]:
        """The MongoDB query for this project; ``name=None`` means every name only where ``all_names``."""
        _check_fields(filters, "filter")
        query = {**filters, "project": self.project}
        if name is not None or not all_names:
            _check_name(name)
            query["name"] = name
        return query

    def _load(self, document: dict[str, Any]) -> Dataset:
        arrays = [self.store.get_array(entry["blob"], entry["sha256"]) for entry in document["arrays"]]
        structure = document["structure"]
        if structure == "array":
            return arrays[0]
        if structure == "dict":
            return {entry["key"]: array for entry, array in zip(document["arrays"], arrays)}
        return tuple(arrays) if structure == "tuple" else arrays


def _flatten(dataset: Dataset) -> tuple[str, list[tuple[str, np.ndarray]]]:
    """The structure's name and its (key, array) pairs; keys are dict keys or positions."""
    if isinstance(dataset, np.ndarray):
        return "array", [("0", dataset)]
    if isinstance(dataset, dict):
        for key in dataset:
            if not isinstance(key, str):
                raise TypeError(f"dataset dict keys must be strings, got {key!r}")
        return "dict", [(key, np.asarray(value)) for key, value in dataset.items()]
    if isinstance(dataset, (tuple, list)):
        return type(dataset).__name__, [(str(index), np.asarray(value)) for index, value in enumerate(dataset)]
    raise TypeError(f"a dataset is a NumPy array or a tuple, list or dict of arrays; got {type(dataset).__name__}")


def _check_name(name: object) -> None:
    versioning.check_name(name, "dataset")


def _check_fields(fields: dict[str, Any], what: str) -> None:
    versioning.check_fields(fields, what, RESERVED)
