"""The model registry: Keras models saved as numbered versions, found by query, promoted by alias.

TensorLayer's ``save_model`` / ``find_model`` / ``delete_model`` without pickle. A version is one
document in the ``models`` collection plus one blob in GridFS:

- the architecture as Keras JSON (``model.to_json()``, rebuilt by ``keras.models.model_from_json``,
  whose safe mode refuses Lambda layers), or, for models Keras cannot describe in JSON (subclassed
  models), a ``builder="package.module:function"`` entry point importable where the model is loaded,
  with JSON ``builder_kwargs``. Both are checked against the loading process's trusted modules
  before anything is imported (:mod:`tensordb.infra.trusted`): a stored document never chooses the code
  that runs. Nothing stored is ever unpickled or executed (the format: :mod:`tensordb.models.keras_format`);
- the parameters as a ``.npz`` of ``model.get_weights()`` (``allow_pickle=False``), sha256-checked on
  read, in GridFS blobs tagged ``kind="model-parameters"``;
- metrics and tags given as keyword arguments, kept as top-level fields as in TensorLayer (so
  ``find(sort=[("accuracy", -1)])`` and ``find(accuracy=0.8)`` work) and grouped again under
  ``metrics`` (the numbers) and ``tags`` (everything else); NumPy scalars become Python numbers.

Versions are 1, 2, 3... per name from an atomic counter. Aliases (``production``...) are one
document per (name, alias), changed by compare-and-swap with ``find_one_and_update`` so concurrent
promotions serialise, each recording the version it replaced. Saves, promotions and deletes are
published as ``model-event/1`` records when the registry has a publisher.

``save_async`` is the checkpoint path of a training loop: the caller's thread only copies the
weights; serialising and uploading happen on one background thread, in order.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from numbers import Number
from typing import TYPE_CHECKING, Any

import numpy as np
from bson import ObjectId
from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from tensordb.config import Topic
from tensordb.errors import ModelFormatError, ModelNotFoundError, QueryError
from tensordb.infra import versioning
from tensordb.infra.store import Store
from tensordb.infra.versioning import PENDING_GRACE
from tensordb.models.keras_format import (
    architecture_fields,
    build_model,
    compile_json,
    compile_loaded,
    count_members,
    npz_to_weights,
    private_weights,
    weights_to_npz,
)
from tensordb.records import Schema

if TYPE_CHECKING:
    import keras

    from tensordb.infra.bus import Publisher

COLLECTION = "models"
ALIASES = "model_aliases"
BLOB_KIND = "model-parameters"
#: Fields the registry sets itself; a metric or tag with one of these names would overwrite them.
RESERVED = frozenset(
    {
        "_id",
        "project",
        "name",
        "version",
        "time",
        "epoch",
        "job_id",
        "lineage",
        "metrics",
        "tags",
        "architecture_json",
        "builder",
        "builder_kwargs",
        "build_config",
        "compile_json",
        "keras_version",
        "parameters",
        "alias",
        "sort",
    }
)
#: Fields a filter may not name: every query is restricted to the registry's project.
FILTER_RESERVED = frozenset({"project"})
#: How many past promotions an alias document keeps in its ``history``.
ALIAS_HISTORY = 100

_NEWEST = [("time", -1), ("_id", -1)]  # _id breaks ties between saves within one millisecond


# -- the registry -----------------------------------------------------------------------------------


@dataclass
class _Snapshot:
    """Everything a save needs, taken on the caller's thread; the weights are private copies."""

    document: dict[str, Any]  # all but version and parameters
    weights: list[np.ndarray]


class ModelRegistry:
    """A project's model versions, aliases and model events; every query is restricted to ``store.project``.

    ``publisher`` (a :class:`tensordb.infra.bus.Publisher`) is optional: without it no model events are
    published. ``max_pending`` bounds the snapshots ``save_async`` keeps in memory: if uploads fall
    that far behind, ``save_async`` waits for the oldest instead of growing without limit.
    The registry owns neither the store nor the publisher; :meth:`close` waits for pending uploads.
    """

    def __init__(self, store: Store, publisher: Publisher | None = None, max_pending: int = 2) -> None:
        self.store = store
        self.project = store.project
        self.publisher = publisher
        self.collection = store[COLLECTION]
        self.aliases = store[ALIASES]
        store.ensure_indexes(COLLECTION, ALIASES)  # the unique indexes are what make versions and aliases safe
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_pending)
        self._pending: list[Future[dict[str, Any]]] = []
        self._pending_lock = threading.Lock()

    # -- saving ----------------------------------------------------------------------------------

    def save(
        self,
        model: keras.Model,
        name: str,
        *,
        epoch: int | None = None,
        job_id: str | None = None,
        lineage: dict[str, Any] | None = None,
        builder: str | None = None,
        builder_kwargs: dict[str, Any] | None = None,
        **metrics_and_tags: Any,
    ) -> dict[str, Any]:
        """Store ``model`` as the next version of ``name``; returns the stored document.

        Numbers among ``metrics_and_tags`` are metrics (``accuracy=0.8``), anything else a tag; both
        are also top-level fields for filters and sorts. ``lineage`` (job, cohort query, epoch,
        parent version...) is stored as given, except that sub-documents with ``$`` or dotted field
        names (MongoDB queries) are kept as JSON text: MongoDB before 5.0 cannot store such names.
        If anything fails, what was already written is removed again.
        """
        snapshot = self._snapshot(model, name, epoch, job_id, lineage, builder, builder_kwargs, metrics_and_tags, copy=False)
        return self._write(snapshot)

    def save_async(
        self,
        model: keras.Model,
        name: str,
        *,
        epoch: int | None = None,
        job_id: str | None = None,
        lineage: dict[str, Any] | None = None,
        builder: str | None = None,
        builder_kwargs: dict[str, Any] | None = None,
        **metrics_and_tags: Any,
    ) -> Future[dict[str, Any]]:
        """Like :meth:`save`, but the caller waits only for a snapshot of the weights (a private copy);
        serialising and uploading run on a background thread.

        Uploads run one at a time in call order; the future gives the stored document (or the
        error). Arguments are checked now, so a bad metric name fails here, not in the future.
        If ``max_pending`` uploads are already under way, this waits for the oldest to finish.
        """
        self._slots.acquire()  # at most max_pending snapshots alive: back-pressure, not unbounded memory
        try:
            snapshot = self._snapshot(model, name, epoch, job_id, lineage, builder, builder_kwargs, metrics_and_tags, copy=True)
            future = self._background().submit(self._write, snapshot)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        with self._pending_lock:
            self._pending.append(future)
        return future

    def wait(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Wait for every ``save_async`` upload started so far; their documents in call order.

        Raises the first upload's error, if any failed (the others are still waited for).
        """
        with self._pending_lock:
            pending, self._pending = self._pending, []
        documents, first_error = [], None
        for future in pending:
            try:
                documents.append(future.result(timeout))
            except Exception as exc:  # noqa: BLE001 - reported below, after waiting for the rest
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return documents

    def close(self) -> None:
        """Wait for pending uploads, stop the background thread and flush model events."""
        try:
            self.wait()
        finally:
            with self._executor_lock:
                if self._executor is not None:
                    self._executor.shutdown(wait=True)
                    self._executor = None
            if self.publisher is not None:
                self.publisher.flush()

    def __enter__(self) -> ModelRegistry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- finding ---------------------------------------------------------------------------------

    def find_info(
        self,
        sort: list[tuple[str, int]] | None = None,
        name: str | None = None,
        version: int | None = None,
        alias: str | None = None,
        **filters: Any,
    ) -> dict[str, Any] | None:
        """The document of the first matching version (newest unless ``sort`` says otherwise), or None.

        ``alias="production"`` (with ``name``) resolves the alias to its version first. Filters are
        equalities on fields (``accuracy=0.8``, ``job_id=...``, ``"lineage.epoch": 3``).
        """
        query = self._query(name, version, alias, filters)
        return None if query is None else self.collection.find_one(query, sort=sort or _NEWEST)

    def find_infos(
        self,
        sort: list[tuple[str, int]] | None = None,
        name: str | None = None,
        alias: str | None = None,
        **filters: Any,
    ) -> list[dict[str, Any]]:
        """The documents of every matching version, ordered by ``sort`` (newest first by default)."""
        query = self._query(name, None, alias, filters)
        return [] if query is None else list(self.collection.find(query, sort=sort or _NEWEST))

    def find(
        self,
        sort: list[tuple[str, int]] | None = None,
        name: str | None = None,
        version: int | None = None,
        alias: str | None = None,
        **filters: Any,
    ) -> keras.Model | None:
        """The first matching version as a Keras model ready to predict (compiled when it was saved
        compiled), its document at ``model.tensordb_info``; None if nothing matches."""
        info = self.find_info(sort, name, version, alias, **filters)
        return None if info is None else self.load(info)

    def versions(self, name: str) -> list[dict[str, Any]]:
        """Every version of ``name``, oldest first (documents only)."""
        versioning.check_name(name, "model")
        return list(self.collection.find({"project": self.project, "name": name}, sort=[("version", 1)]))

    def load(self, info: dict[str, Any]) -> keras.Model:
        """Rebuild the model a document describes and set its stored parameters."""
        weights = self.weights(info)
        model = build_model(info, self.store.settings)
        try:
            model.set_weights(weights)
        except ValueError as exc:
            raise ModelFormatError(
                f"the parameters of {info['name']} v{info['version']} do not fit its rebuilt architecture: {exc}"
            ) from exc
        compile_loaded(model, info, self.store.settings)
        object.__setattr__(model, "tensordb_info", info)  # not a Keras-tracked attribute
        return model

    def weights(self, info: dict[str, Any]) -> list[np.ndarray]:
        """The stored parameters of a version (``model.get_weights()`` order), sha256-verified.

        For a caller that already has the architecture built (a trainer resuming a job):
        ``model.set_weights(registry.weights(info))`` skips rebuilding it.
        """
        parameters = info["parameters"]
        return npz_to_weights(self.store.get_bytes(parameters["blob"], parameters["sha256"]))

    # -- deleting --------------------------------------------------------------------------------

    def delete(self, name: str | None = None, **filters: Any) -> int:
        """Delete the matching versions, their parameter blobs and the aliases pointing at them;
        returns how many versions were deleted. No name and no filters deletes every model of the project.

        Documents go first, then blobs, then a sweep of orphans, so retrying a delete that died
        half-way finishes it.
        """
        query = self._query(name, None, None, filters)
        documents = list(self.collection.find(query, {"name": 1, "version": 1, "parameters.blob": 1}))
        deleted = self.collection.delete_many({"_id": {"$in": [d["_id"] for d in documents]}}).deleted_count
        self.store.delete_blobs([d["parameters"]["blob"] for d in documents])
        for document in documents:
            dropped = [
                alias["alias"]
                for alias in self.aliases.find(
                    {"project": self.project, "name": document["name"], "version": document["version"]}, {"alias": 1}
                )
            ]
            if dropped:
                self.aliases.delete_many({"project": self.project, "name": document["name"], "version": document["version"]})
            self._publish("deleted", document["name"], document["version"], detail={"aliases_removed": dropped})
        self.sweep_orphans()
        return deleted

    def sweep_orphans(self, grace: timedelta = PENDING_GRACE) -> int:
        """Delete parameter blobs no version references (crashed saves and deletes); returns how many."""
        return versioning.sweep_orphans(self.store, COLLECTION, BLOB_KIND, "parameters.blob", grace)

    # -- aliases ---------------------------------------------------------------------------------

    def promote(
        self,
        name: str,
        version: int,
        alias: str = "production",
        reason: dict[str, Any] | None = None,
        policy: str | None = None,
    ) -> dict[str, Any]:
        """Point ``alias`` of ``name`` at ``version`` atomically; returns the alias document.

        The document records the version it replaced (``previous_version``), a ``revision``
        counter and the last promotions (``history``); a ``promoted`` model event is published and
        flushed. Concurrent promotions are serialised by compare-and-swap on ``revision``: each one
        replaces exactly the version it read, so the history is one unbroken chain.
        """
        versioning.check_name(name, "model")
        versioning.check_name(alias, "alias")
        if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
            raise QueryError(f"model versions are integers; got {version!r}")
        version = int(version)
        reason = _plain(reason or {})
        versioning.check_keys(reason, "promotion reason")
        if self.collection.find_one({"project": self.project, "name": name, "version": version}, {"_id": 1}) is None:
            raise ModelNotFoundError(f"model {name!r} has no version {version} in project {self.project!r}")
        key = {"project": self.project, "name": name, "alias": alias}
        while True:
            current = self.aliases.find_one(key)
            at = versioning.now()
            previous = None if current is None else current["version"]
            entry = {"version": version, "previous_version": previous, "time": at, "reason": reason, "policy": policy}
            fields = {"version": version, "previous_version": previous, "time": at, "reason": reason, "policy": policy}
            if current is None:
                document: dict[str, Any] = {**key, **fields, "revision": 1, "history": [entry]}
                try:
                    self.aliases.insert_one(document)
                    break
                except DuplicateKeyError:  # another promotion created it first: read it and retry
                    continue
            updated = self.aliases.find_one_and_update(
                {**key, "revision": current["revision"]},
                {
                    "$set": fields,
                    "$inc": {"revision": 1},
                    "$push": {"history": {"$each": [entry], "$slice": -ALIAS_HISTORY}},
                },
                return_document=ReturnDocument.AFTER,
            )
            if updated is not None:
                document = updated
                break
        self._publish(
            "promoted",
            name,
            version,
            alias=alias,
            policy=policy,
            detail={"previous_version": previous, "reason": reason, "revision": document["revision"]},
        )
        if self.publisher is not None:
            self.publisher.flush()
        return document

    def alias(self, name: str, alias: str = "production") -> int | None:
        """The version ``alias`` of ``name`` points at, or None."""
        versioning.check_name(name, "model")
        versioning.check_name(alias, "alias")
        document = self.aliases.find_one({"project": self.project, "name": name, "alias": alias}, {"version": 1})
        return None if document is None else document["version"]

    def alias_info(self, name: str, alias: str = "production") -> dict[str, Any] | None:
        """The whole alias document: version, previous_version, revision, time, reason, history."""
        versioning.check_name(name, "model")
        return self.aliases.find_one({"project": self.project, "name": name, "alias": alias})

    # -- internals -------------------------------------------------------------------------------

    def _background(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="tensordb-model-upload")
            return self._executor

    def _snapshot(
        self,
        model: keras.Model,
        name: str,
        epoch: int | None,
        job_id: str | None,
        lineage: dict[str, Any] | None,
        builder: str | None,
        builder_kwargs: dict[str, Any] | None,
        metrics_and_tags: dict[str, Any],
        copy: bool,
    ) -> _Snapshot:
        versioning.check_name(name, "model")
        versioning.check_fields(metrics_and_tags, "model metrics and tags", RESERVED)
        fields = {key: _plain(value) for key, value in metrics_and_tags.items()}
        epoch = _plain(epoch)
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
            raise QueryError(f"epoch is an integer; got {epoch!r}")
        if job_id is not None and not isinstance(job_id, str):
            raise QueryError(f"job_id is a string; got {job_id!r}")
        import keras

        document: dict[str, Any] = {
            **fields,
            "_id": ObjectId(),
            "project": self.project,
            "name": name,
            "time": versioning.now(),
            "epoch": epoch,
            "job_id": job_id,
            "lineage": _storable_lineage(_plain(lineage or {})),
            "metrics": {k: v for k, v in fields.items() if _is_metric(v)},
            "tags": {k: v for k, v in fields.items() if not _is_metric(v)},
            **architecture_fields(model, builder, builder_kwargs, self.store.settings),
            "compile_json": compile_json(model),
            "keras_version": keras.__version__,
        }
        weights = model.get_weights()
        if copy:  # the training loop goes on updating the variables while the upload runs
            weights = private_weights(weights, keras.backend.backend())
        return _Snapshot(document, weights)

    def _write(self, snapshot: _Snapshot) -> dict[str, Any]:
        """Upload the parameters (marked pending), insert the document, clear the mark, publish ``saved``."""
        document = snapshot.document
        name = document["name"]
        data = weights_to_npz(snapshot.weights)
        snapshot.weights = []  # release the copy as soon as it is serialised
        version = versioning.next_version(self.store, "model", name)
        blob_id = None
        try:
            blob_id, digest = self.store.put_bytes(
                data, f"model/{name}/{version}", kind=BLOB_KIND, name=name, version=version, pending=True
            )
            document = {
                **document,
                "version": version,
                "parameters": {
                    "blob": blob_id,
                    "sha256": digest,
                    "nbytes": len(data),
                    "format": "npz",
                    "arrays": count_members(data),
                },
            }
            self.collection.insert_one(document)
        except BaseException:
            # an insert that failed on the network may still have happened: remove it before its blob
            self.collection.delete_one({"_id": document["_id"]})
            if blob_id is not None:
                self.store.delete_blobs([blob_id])
            raise
        versioning.mark_referenced(self.store, [blob_id])
        self._publish(
            "saved",
            name,
            version,
            detail={
                "epoch": document["epoch"],
                "job_id": document["job_id"],
                "metrics": document["metrics"],
                "nbytes": len(data),
                "sha256": digest,
            },
        )
        return document

    def _query(self, name: str | None, version: int | None, alias: str | None, filters: dict[str, Any]) -> dict[str, Any] | None:
        """The MongoDB query for this project, or None when ``alias`` points nowhere."""
        versioning.check_fields(filters, "model filter", FILTER_RESERVED)
        query = {key: _plain(value) for key, value in filters.items()}
        query["project"] = self.project
        if name is not None:
            versioning.check_name(name, "model")
            query["name"] = name
        if alias is not None:
            if name is None:
                raise QueryError("an alias belongs to one model: give name= with alias=")
            if version is not None:
                raise QueryError("give either version= or alias=, not both")
            version = self.alias(name, alias)
            if version is None:
                return None
        if version is not None:
            query["version"] = _plain(version)
        return query

    def _publish(
        self,
        event: str,
        name: str,
        version: int,
        alias: str | None = None,
        policy: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        if self.publisher is None:
            return
        record: dict[str, Any] = {
            "schema": Schema.MODEL_EVENT,
            "event": event,
            "model_name": name,
            "version": version,
            "at": versioning.now().isoformat(),
            "detail": json.loads(json.dumps(detail or {}, default=str)),  # JSON, whatever BSON types it held
        }
        if alias is not None:
            record["alias"] = alias
        if policy is not None:
            record["policy"] = policy
        self.publisher.publish(Topic.MODEL_EVENTS, record, key=name)


# -- values -------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """NumPy scalars and arrays as Python numbers and lists, recursively.

    float16/float32 become the shortest decimal that reads back as the same float32
    (``np.float32(0.8)`` → ``0.8``), so ``find(accuracy=0.8)`` finds a metric computed in float32.
    """
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
        value = value[()] if isinstance(value, np.ndarray) else value
        if isinstance(value, np.floating) and value.dtype.itemsize < 8:
            return float(str(value))
        if isinstance(value, np.floating):
            return float(value)
        return value.item()
    if isinstance(value, np.ndarray):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _is_metric(value: Any) -> bool:
    return isinstance(value, Number) and not isinstance(value, bool) and not isinstance(value, complex)


def _storable_lineage(lineage: Any) -> dict[str, Any]:
    """Lineage as stored: each value that is (or holds) a MongoDB query, i.e. has ``$`` or dotted
    field names somewhere, becomes its JSON text; plain values stay as they are."""
    if not isinstance(lineage, dict):
        raise QueryError(f"lineage is a dict (job, cohort, epoch, parent_version...); got {type(lineage).__name__}")
    for key in lineage:
        if not isinstance(key, str) or not key or key.startswith("$") or "." in key or "\0" in key:
            raise QueryError(f"lineage field names are plain strings without '$', '.' or NUL; got {key!r}")
    return {key: _storable_value(value) for key, value in lineage.items()}


def _storable_value(value: Any) -> Any:
    if isinstance(value, dict) and _has_query_names(value):
        return json.dumps(value, sort_keys=True, default=_json_default)
    if isinstance(value, list):
        return [_storable_value(item) for item in value]
    return value


def _has_query_names(value: Any) -> bool:
    if isinstance(value, dict):
        return any(
            not isinstance(key, str) or key.startswith("$") or "." in key or _has_query_names(item) for key, item in value.items()
        )
    if isinstance(value, list):
        return any(_has_query_names(item) for item in value)
    return False


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)
