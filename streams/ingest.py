"""The ingest processor: sample records become GridFS blobs plus one metadata document each.

Idempotent by construction: a sample's id comes from the record (or its content), its blobs' ids
from the sample id and array name, and documents are inserted only if absent, so a redelivered
record changes nothing. A record MongoDB refuses is dead-lettered on its own and its blobs removed;
the rest of the batch is stored.

Announced by what is stored: each batch publishes one ``data-imported`` event for its samples that
are stored but not yet announced (``announced: false``), then marks them announced. A retry or a
redelivery after a crash between storing and announcing therefore announces what the earlier
attempt stored, and the retrain trigger counts each sample once however often it is announced.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId

from tensordb.bus import Received
from tensordb.config import Topic
from tensordb.errors import StorageError
from tensordb.samples import SAMPLES, SampleError, array_nbytes, check_storable, content_id, inline_bytes, split_key
from tensordb.store import BLOB_BUCKET, Store, insert_new


def blob_id(sample_id: str, array_name: str) -> ObjectId:
    """The deterministic GridFS id of an inline array, so a redelivery cannot write a second blob."""
    return ObjectId(hashlib.sha256(f"{sample_id}\0{array_name}".encode()).digest()[:12])


def _prepare(received: Received, store: Store, now: datetime) -> tuple[dict[str, Any], list[tuple]]:
    """The metadata document and the blobs to write for one valid sample record."""
    record = received.record
    assert record is not None
    for field in ("labels", "metadata"):
        check_storable(field, record.get(field, {}))
    sample_id = record.get("sample_id") or content_id(record)
    arrays, blobs, total = {}, [], 0
    limit = store.settings.max_sample_bytes
    for name, spec in record["arrays"].items():
        entry = {"dtype": spec["dtype"], "claim_check": "blob_id" in spec}
        if entry["claim_check"]:  # claim check: the SDK stored the bytes already
            if array_nbytes(name, spec["dtype"], spec["shape"], limit) != spec["nbytes"]:
                raise SampleError(
                    f"array {name!r}: nbytes {spec['nbytes']} does not fit shape {spec['shape']} of {spec['dtype']}: "
                    "fix the reference's shape or nbytes"
                )
            entry.update(shape=[int(size) for size in spec["shape"]], nbytes=spec["nbytes"], sha256=spec["sha256"], blob_id=ObjectId(spec["blob_id"]))
        else:
            data, shape = inline_bytes(name, spec, limit)
            digest = hashlib.sha256(data).hexdigest()
            entry.update(shape=shape, nbytes=len(data), sha256=digest, blob_id=blob_id(sample_id, name))
            blobs.append((entry["blob_id"], f"{record['dataset']}/{sample_id}/{name}", data, {"kind": "sample-array", "sha256": digest, "sample_id": sample_id}))
        arrays[name] = entry
        total += entry["nbytes"]
    if total > limit:
        raise SampleError(
            f"the sample's arrays hold {total} bytes together, over the {limit}-byte sample limit "
            "(TENSORDB_MAX_SAMPLE_BYTES): split the sample, or raise the limit"
        )
    document = {
        "_id": sample_id,
        "project": store.project,
        "dataset": record["dataset"],
        "version": record.get("version"),
        "arrays": arrays,
        "labels": record.get("labels", {}),
        "metadata": record.get("metadata", {}),
        "tags": record.get("tags", []),
        "source": record.get("source", "kafka"),
        "published_at": record.get("published_at"),
        "imported_at": now,
        "split_key": split_key(sample_id),
        "origin": {"topic": received.topic, "partition": received.partition, "offset": received.offset},
        "announced": False,
    }
    return document, blobs


def _check_claims(store: Store, documents: list[dict[str, Any]]) -> dict[str, str]:
    """Sample ids whose claim-check blob is missing or differs from its reference, with the reason."""
    claimed = {
        entry["blob_id"]: (document["_id"], name, entry)
        for document in documents
        for name, entry in document["arrays"].items()
        if entry["claim_check"]
    }
    if not claimed:
        return {}
    found = {
        file["_id"]: file
        for file in store[f"{BLOB_BUCKET}.files"].find({"_id": {"$in": list(claimed)}}, {"length": 1, "metadata.sha256": 1})
    }
    broken = {}
    for blob, (sample_id, name, entry) in claimed.items():
        file = found.get(blob)
        if file is None:
            broken[sample_id] = f"array {name!r}: blob {blob} does not exist; upload it before publishing the reference"
        elif file["length"] != entry["nbytes"] or file.get("metadata", {}).get("sha256") != entry["sha256"]:
            broken[sample_id] = f"array {name!r}: blob {blob} does not match the record's nbytes/sha256"
    return broken


def handle_samples(context: Any, batch: list[Received]) -> None:
    """Persist a batch of valid sample records and announce them (see the module docstring)."""
    store: Store = context.store
    now = datetime.now(UTC)
    prepared: list[tuple[Received, dict[str, Any], list[tuple]]] = []
    for received in batch:
        try:
            prepared.append((received, *_prepare(received, store, now)))
        except SampleError as exc:
            context.dead_letters.divert(received, exc)
    broken = _check_claims(store, [document for _, document, _ in prepared])
    accepted = []
    for received, document, blobs in prepared:
        if document["_id"] in broken:
            context.dead_letters.divert(received, SampleError(broken[document["_id"]]))
        else:
            accepted.append((received, document, blobs))
    if not accepted:
        return
    store.write_blobs([blob for _, _, blobs in accepted for blob in blobs])
    _, refused = insert_new(store[SAMPLES], [document for _, document, _ in accepted])  # first delivery wins
    for index, reason in refused.items():
        received, document, blobs = accepted[index]
        context.dead_letters.divert(received, StorageError(reason))
        store.delete_blobs([blob[0] for blob in blobs])  # only the inline arrays' blobs, written above
    stored = [document["_id"] for index, (_, document, _) in enumerate(accepted) if index not in refused]
    announce(context, stored, now)


def announce(context: Any, sample_ids: list[str], now: datetime) -> None:
    """Publish one ``data-imported`` event for those of ``sample_ids`` stored and not yet announced."""
    store: Store = context.store
    pending = list(store[SAMPLES].find({"project": store.project, "_id": {"$in": sample_ids}, "announced": False}, {"dataset": 1}))
    if not pending:
        return
    ids = sorted(document["_id"] for document in pending)
    context.publisher.publish(
        Topic.DATA_IMPORTED,
        {
            "schema": "data-imported/1",
            "batch_id": "import-" + hashlib.sha256("\n".join(ids).encode()).hexdigest()[:32],
            "sample_ids": ids,
            "datasets": sorted({document["dataset"] for document in pending}),
            "imported_at": now.isoformat(),
        },
    )
    context.publisher.flush()  # announced only once the event is acknowledged
    store[SAMPLES].update_many({"_id": {"$in": ids}}, {"$set": {"announced": True}})
