"""The ingest processor: sample records become GridFS blobs plus one metadata document each.

Idempotent by construction: a sample's id comes from the record (or its content), its blobs' ids
from the sample id and array name, and documents are inserted only if absent, so a redelivered
record changes nothing. Each batch that adds samples publishes one ``data-imported`` event, which
the retrain trigger consumes.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId

from tensordb.bus import Received
from tensordb.config import Topic
from tensordb.samples import SAMPLES, SampleError, content_id, inline_bytes, split_key
from tensordb.store import BLOB_BUCKET, Store, insert_ignoring_duplicates


def blob_id(sample_id: str, array_name: str) -> ObjectId:
    """The deterministic GridFS id of an inline array, so a redelivery cannot write a second blob."""
    return ObjectId(hashlib.sha256(f"{sample_id}\0{array_name}".encode()).digest()[:12])


def _prepare(received: Received, project: str, now: datetime) -> tuple[dict[str, Any], list[tuple]]:
    """The metadata document and the blobs to write for one valid sample record."""
    record = received.record
    assert record is not None
    sample_id = record.get("sample_id") or content_id(record)
    arrays, blobs = {}, []
    for name, spec in record["arrays"].items():
        entry = {"dtype": spec["dtype"], "claim_check": "blob_id" in spec}
        if entry["claim_check"]:  # claim check: the SDK stored the bytes already
            entry.update(shape=spec["shape"], nbytes=spec["nbytes"], sha256=spec["sha256"], blob_id=ObjectId(spec["blob_id"]))
        else:
            data, shape = inline_bytes(name, spec)
            digest = hashlib.sha256(data).hexdigest()
            entry.update(shape=shape, nbytes=len(data), sha256=digest, blob_id=blob_id(sample_id, name))
            blobs.append((entry["blob_id"], f"{record['dataset']}/{sample_id}/{name}", data, {"kind": "sample-array", "sha256": digest, "sample_id": sample_id}))
        arrays[name] = entry
    document = {
        "_id": sample_id,
        "project": project,
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
    """Persist a batch of valid sample records (see the module docstring)."""
    store: Store = context.store
    now = datetime.now(UTC)
    prepared: list[tuple[Received, dict[str, Any], list[tuple]]] = []
    for received in batch:
        try:
            prepared.append((received, *_prepare(received, store.project, now)))
        except SampleError as exc:
            context.dead_letters.divert(received, exc)
    broken = _check_claims(store, [document for _, document, _ in prepared])
    accepted = []
    for received, document, blobs in prepared:
        if document["_id"] in broken:
            context.dead_letters.divert(received, SampleError(broken[document["_id"]]))
        else:
            accepted.append((document, blobs))
    if not accepted:
        return
    store.write_blobs([blob for _, blobs in accepted for blob in blobs])
    documents = [document for document, _ in accepted]
    duplicates = insert_ignoring_duplicates(store[SAMPLES], documents)  # first delivery wins
    new = [document for index, document in enumerate(documents) if index not in duplicates]
    new_ids = [document["_id"] for document in new]
    if new_ids:
        positions = sorted(f"{r.topic}:{r.partition}:{r.offset}" for r in batch)
        context.publisher.publish(
            Topic.DATA_IMPORTED,
            {
                "schema": "data-imported/1",
                "batch_id": "import-" + hashlib.sha256("\n".join(positions).encode()).hexdigest()[:32],
                "sample_ids": new_ids,
                "datasets": sorted({document["dataset"] for document in new}),
                "imported_at": now.isoformat(),
            },
        )
