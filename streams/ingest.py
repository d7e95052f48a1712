"""The ingest processor: each sample record becomes one document, holding small arrays' bytes
(up to :data:`~tensordb.data.samples.INLINE_MAX_BYTES` together) and referring to GridFS blobs
for the larger ones.

Idempotent by construction: a sample's id comes from the record (or its content), its blobs' ids
from the project, sample id and array name, and documents are inserted only if absent, so a
redelivered record changes nothing. A sample id already stored with different content is
dead-lettered with the reason (never dropped, never replaced). A record MongoDB refuses is
dead-lettered on its own and the blobs written for it removed (only those this batch wrote and no
document it stored refers to: never another sample's); the rest of the batch is stored.

A claim check (an array the SDK uploaded to GridFS beforehand) is accepted only if its blob was
uploaded in this project for this sample id and matches the record's size, sha256, dtype and
shape: a reference copied from another project's topic, or to another sample's bytes, is refused.

Announced by what is stored: each batch is one import, with an id that every document it inserts
carries (``import_id``). The batch publishes ``data-imported`` events (a few hundred ids each,
keyed, so they spread over the partitions) for the samples it inserted, and once the broker has
acknowledged them records the import announced: one small document in ``sample_imports``, not a
second write of every sample. A redelivered sample whose import was never recorded (a crash
between storing and announcing) is announced by the batch that meets it again, and then marked
``announced: true`` on its own, so each sample is announced once; the retrain trigger would
count it once anyway, however often it is announced.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from bson import ObjectId

from streams.processing import ProcessorContext
from tensordb.config import Topic
from tensordb.data.samples import (
    INLINE_MAX_BYTES,
    SAMPLE_IMPORTS,
    SAMPLES,
    SampleDocument,
    SampleOrigin,
    StoredArray,
    array_nbytes,
    check_storable,
    content_id,
    inline_bytes,
    split_key,
)
from tensordb.errors import SampleError, StorageError
from tensordb.infra.bus import Received
from tensordb.infra.codecs import xxh3_hex
from tensordb.infra.store import BLOB_BUCKET, Blob, Store, insert_new
from tensordb.records import Schema


def blob_id(project: str, sample_id: str, array_name: str) -> ObjectId:
    """The deterministic id of an array ingest writes to GridFS, so a redelivery cannot write a
    second blob (and the same sample id in two projects names two blobs)."""
    return ObjectId(hashlib.sha256(f"{project}\0{sample_id}\0{array_name}".encode()).digest()[:12])


def fingerprint(document: Mapping[str, Any]) -> str:
    """The sha256 of what a sample holds (arrays' digests, labels, metadata...), not of how or
    when it was delivered: a redelivery has the same fingerprint, a reused id a different one."""
    content = {key: document[key] for key in ("dataset", "version", "labels", "metadata", "tags")}
    content["arrays"] = {name: [entry["dtype"], entry["shape"], entry["sha256"]] for name, entry in document["arrays"].items()}
    try:
        encoded = orjson.dumps(content, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # integers beyond 64 bits, which orjson refuses
        encoded = json.dumps(content, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()


def _prepare(received: Received, store: Store, now: datetime, import_id: ObjectId) -> tuple[SampleDocument, list[Blob]]:
    """The document and the blobs to write for one valid sample record, imported by ``import_id``."""
    record = received.valid_record
    sample_id = record.get("sample_id") or content_id(record)
    claimed: dict[str, StoredArray] = {}
    in_hand: dict[str, ArrayBytes] = {}
    limit = store.settings.max_sample_bytes
    for name, spec in record["arrays"].items():
        if "blob_id" in spec:  # claim check: the SDK stored the bytes already
            if array_nbytes(name, spec["dtype"], spec["shape"], limit) != spec["nbytes"]:
                raise SampleError(
                    f"array {name!r}: nbytes {spec['nbytes']} does not fit shape {spec['shape']} of {spec['dtype']}: "
                    "fix the reference's shape or nbytes"
                )
            if not record.get("sample_id"):
                raise SampleError(f"array {name!r} is a claim check, so the record needs the sample_id its blob was uploaded for")
            claimed[name] = {
                "dtype": spec["dtype"], "claim_check": True, "shape": [int(size) for size in spec["shape"]],
                "nbytes": spec["nbytes"], "sha256": spec["sha256"], "blob_id": ObjectId(spec["blob_id"]),
            }  # fmt: skip
        else:
            data, shape = inline_bytes(name, spec, limit)
            in_hand[name] = (spec["dtype"], shape, data)
    stored, blobs = stored_arrays(store, record["dataset"], sample_id, in_hand)
    arrays = {name: claimed[name] if name in claimed else stored[name] for name in record["arrays"]}
    origin: SampleOrigin = {"topic": received.topic, "partition": received.partition, "offset": received.offset}
    document = sample_document(store, record, sample_id, arrays, now, origin)
    document["import_id"] = import_id
    return document, blobs


#: An array whose bytes are in hand: its dtype, shape and raw little-endian bytes.
ArrayBytes = tuple[str, list[int], bytes]


def stored_arrays(
    store: Store, dataset: str, sample_id: str, arrays: Mapping[str, ArrayBytes]
) -> tuple[dict[str, StoredArray], list[Blob]]:
    """How arrays whose bytes are in hand are stored: their entries in the sample document, and
    the blobs to write. The smallest arrays keep their bytes in their entries, up to
    :data:`INLINE_MAX_BYTES` together; each other one is a blob under the deterministic :func:`blob_id`."""
    entries: dict[str, StoredArray] = {}
    blobs: list[Blob] = []
    budget = INLINE_MAX_BYTES
    for name, (dtype, shape, data) in sorted(arrays.items(), key=lambda item: len(item[1][2])):
        if len(data) <= budget:
            budget -= len(data)
            entry: StoredArray = {
                "dtype": dtype, "claim_check": False, "shape": shape, "nbytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(), "xxh3": xxh3_hex(data), "data": data,
            }  # fmt: skip
        else:  # the blob computes the digests the entry records
            blob = Blob(
                blob_id(store.project, sample_id, name),
                f"{dataset}/{sample_id}/{name}",
                data,
                {"kind": "sample-array", "sample_id": sample_id},
            )
            entry = {
                "dtype": dtype, "claim_check": False, "shape": shape, "nbytes": len(data),
                "sha256": blob.sha256, "xxh3": blob.xxh3, "blob_id": blob.id,
            }  # fmt: skip
            blobs.append(blob)
        entries[name] = entry
    return {name: entries[name] for name in arrays}, blobs


def sample_document(
    store: Store,
    fields: Mapping[str, Any],
    sample_id: str,
    arrays: dict[str, StoredArray],
    now: datetime,
    origin: SampleOrigin,
    announced: bool = False,
) -> SampleDocument:
    """The metadata document of one sample: ``fields`` as in a ``sample/1`` record (dataset, version,
    labels, metadata, tags, source, published_at, lineage), its stored ``arrays`` and where it came
    from; refused with a :class:`~tensordb.errors.SampleError` if it cannot be stored whole."""
    for field in ("labels", "metadata"):
        check_storable(field, fields.get(field, {}))
    limit = store.settings.max_sample_bytes
    total = sum(entry["nbytes"] for entry in arrays.values())
    if total > limit:
        raise SampleError(
            f"the sample's arrays hold {total} bytes together, over the {limit}-byte sample limit "
            "(TENSORDB_MAX_SAMPLE_BYTES): split the sample, or raise the limit"
        )
    document: SampleDocument = {
        "_id": sample_id,
        "project": store.project,
        "dataset": fields["dataset"],
        "version": fields.get("version"),
        "arrays": arrays,
        "labels": fields.get("labels", {}),
        "metadata": fields.get("metadata", {}),
        "tags": fields.get("tags", []),
        "source": fields.get("source", "kafka"),
        "published_at": fields.get("published_at"),
        "imported_at": now,
        "split_key": split_key(sample_id),
        "origin": origin,
        "announced": announced,
    }
    if "lineage" in fields:
        document["lineage"] = fields["lineage"]
    document["fingerprint"] = fingerprint(document)
    return document


def _check_claims(store: Store, documents: list[SampleDocument]) -> dict[int, str]:
    """The positions of documents whose claim-check blob is missing, another project's or
    sample's, or differs from its reference, with the reason (blobs are read as this project
    sees them)."""
    claimed = [
        (position, name, entry)
        for position, document in enumerate(documents)
        for name, entry in document["arrays"].items()
        if entry["claim_check"]
    ]
    if not claimed:
        return {}
    blob_ids = list({entry["blob_id"] for _, _, entry in claimed})
    found = {
        file["_id"]: file for file in store[f"{BLOB_BUCKET}.files"].find({"_id": {"$in": blob_ids}}, {"length": 1, "metadata": 1})
    }
    broken = {}
    for position, name, entry in claimed:
        blob, sample_id = entry["blob_id"], documents[position]["_id"]
        file = found.get(blob)
        if file is None:
            broken[position] = (
                f"array {name!r}: blob {blob} does not exist in project {store.project!r}; upload it in this project "
                "(TensorDB.publish does) before publishing the reference"
            )
            continue
        uploaded = file.get("metadata", {})
        expected = {"sample_id": sample_id, "sha256": entry["sha256"], "dtype": entry["dtype"], "shape": entry["shape"]}
        mismatched = [field for field, value in expected.items() if uploaded.get(field) != value]
        if file["length"] != entry["nbytes"]:
            mismatched.insert(0, "nbytes")
        if mismatched:
            broken[position] = (
                f"array {name!r}: blob {blob} was uploaded with a different {', '.join(mismatched)} than the record "
                "says; a claim check names the blob uploaded for that sample, with its exact size, digest, dtype and shape"
            )
        elif "xxh3" in uploaded:  # recorded at upload by the SDK: reads check it instead of the slower sha256
            entry["xxh3"] = uploaded["xxh3"]
    return broken


def handle_samples(context: ProcessorContext, batch: list[Received]) -> None:
    """Persist a batch of valid sample records and announce them (see the module docstring)."""
    now = datetime.now(UTC)
    import_id = ObjectId()
    prepared: list[Prepared] = []
    for received in batch:
        try:
            prepared.append((received, *_prepare(received, context.store, now, import_id)))
        except SampleError as exc:
            context.dead_letters.divert(received, exc)
    broken = _check_claims(context.store, [document for _, document, _ in prepared])
    for position in broken:
        context.dead_letters.divert(prepared[position][0], SampleError(broken[position]))
    stored, inserted = store_samples(context, [item for position, item in enumerate(prepared) if position not in broken])
    announce_import(context, import_id, stored, inserted, _unannounced(context.store, stored, inserted), now)


def announce_import(
    context: ProcessorContext,
    import_id: ObjectId,
    stored: Mapping[str, str],
    inserted: set[str],
    redelivered: set[str],
    now: datetime,
) -> None:
    """Announce the samples of ``stored`` (id → dataset) that the import ``import_id`` inserted, and
    those ``redelivered`` that no event announced yet; then record them announced: the import as a
    whole, the redelivered ones each on its own."""
    announce(
        context,
        {sample_id: dataset for sample_id, dataset in stored.items() if sample_id in inserted or sample_id in redelivered},
        now,
    )
    if inserted:
        context.store[SAMPLE_IMPORTS].insert_one({"_id": import_id, "samples": len(inserted), "announced_at": datetime.now(UTC)})
    if redelivered:
        context.store[SAMPLES].update_many({"_id": {"$in": sorted(redelivered)}}, {"$set": {"announced": True}})


def _unannounced(store: Store, stored: Mapping[str, str], inserted: set[str]) -> set[str]:
    """Those of the ``stored`` samples this batch did not insert (redeliveries) that no
    ``data-imported`` event announced yet: neither marked announced nor inserted by an import
    recorded announced. Only MongoDB knows them; a batch of new samples asks nothing."""
    redelivered = [sample_id for sample_id in stored if sample_id not in inserted]
    if not redelivered:
        return set()
    found = list(store[SAMPLES].find({"_id": {"$in": redelivered}, "announced": {"$ne": True}}, {"import_id": 1}))
    imports = list({document["import_id"] for document in found if "import_id" in document})
    recorded = {document["_id"] for document in store[SAMPLE_IMPORTS].find({"_id": {"$in": imports}}, {"_id": 1})}
    return {document["_id"] for document in found if document.get("import_id") not in recorded}


#: A sample ready to store: what its dead letter would quote, its document and its blobs.
Prepared = tuple[Received, SampleDocument, list[Blob]]


def store_samples(context: ProcessorContext, prepared: list[Prepared]) -> tuple[dict[str, str], set[str]]:
    """Write the blobs and insert the documents of ``prepared``, each once: an id already stored with
    the same content is a redelivery (kept, and counted as stored); with other content, or refused by
    MongoDB, the sample is dead-lettered with the reason. Returns the ids stored, with their datasets,
    and those whose documents this call inserted (the others were redeliveries)."""
    if not prepared:
        return {}, set()
    store: Store = context.store
    written = store.write_blobs([blob for _, _, blobs in prepared for blob in blobs])
    duplicates, refused = insert_new(store[SAMPLES], [document for _, document, _ in prepared])  # the first stored wins
    for index, reason in refused.items():
        context.dead_letters.divert(prepared[index][0], StorageError(reason))
    kept = {blob.id for index, (_, _, blobs) in enumerate(prepared) if index not in refused for blob in blobs}
    # only blobs this call wrote, for no document it kept: a stored sample of that id keeps its own
    store.delete_blobs(sorted(({blob.id for index in refused for blob in prepared[index][2]} & written) - kept))
    positions = sorted(duplicates)
    reused = _reused_ids(store, [prepared[index][1] for index in positions])
    for position, reason in reused.items():
        context.dead_letters.divert(prepared[positions[position]][0], SampleError(reason))
    dropped = set(refused) | {positions[position] for position in reused}
    stored = {document["_id"]: document["dataset"] for index, (_, document, _) in enumerate(prepared) if index not in dropped}
    inserted = {
        document["_id"] for index, (_, document, _) in enumerate(prepared) if index not in refused and index not in duplicates
    }
    return stored, inserted


def _reused_ids(store: Store, duplicates: list[SampleDocument]) -> dict[int, str]:
    """Which of the documents whose id was already stored hold different content, with the reason.

    A redelivery (same content) is what duplicates normally are, and changes nothing; an id reused
    for other content is reported rather than dropped, and the stored sample is kept unchanged.
    """
    if not duplicates:
        return {}
    stored = {
        document["_id"]: document.get("fingerprint")
        for document in store[SAMPLES].find({"_id": {"$in": [document["_id"] for document in duplicates]}}, {"fingerprint": 1})
    }
    return {
        index: (
            f"sample id {document['_id']!r} is already stored in project {store.project!r} with different content "
            "(arrays, labels, metadata, tags, dataset or version); the stored sample is kept: publish changed data "
            "under a new sample_id, or delete the stored sample first"
        )
        for index, document in enumerate(duplicates)
        if stored.get(document["_id"], document["fingerprint"]) not in (document["fingerprint"], None)
    }


#: Sample ids per ``data-imported`` event: small enough that a large batch's events spread over the
#: topic's partitions (and so over the instances of a stage's consumer group).
ANNOUNCE_CHUNK = 250


def announce(context: ProcessorContext, samples: Mapping[str, str], now: datetime) -> None:
    """Publish ``data-imported`` events for ``samples`` (id → dataset), in chunks of
    :data:`ANNOUNCE_CHUNK` keyed by their first id, and wait until the broker has acknowledged them.

    Ingest then records them announced (:func:`announce_import`). A stage's derived samples are
    not recorded: a redelivered source re-derives the same ids and announces them again, and every
    reader counts a sample once.
    """
    ids = sorted(samples)
    for start in range(0, len(ids), ANNOUNCE_CHUNK):
        chunk = ids[start : start + ANNOUNCE_CHUNK]
        context.publisher.publish(
            Topic.DATA_IMPORTED,
            {
                "schema": Schema.DATA_IMPORTED,
                "batch_id": "import-" + hashlib.sha256("\n".join(chunk).encode()).hexdigest()[:32],
                "sample_ids": chunk,
                "datasets": sorted({samples[sample_id] for sample_id in chunk}),
                "imported_at": now.isoformat(),
            },
            key=chunk[0],
        )
    if ids:
        context.publisher.flush()  # announced only once the events are acknowledged


#: How old an unreferenced sample blob must be before :func:`sweep_sample_blobs` removes it: long
#: enough for a claim check uploaded before an outage of the processors to be ingested after it.
SAMPLE_BLOB_GRACE = timedelta(days=1)


def sweep_sample_blobs(store: Store, grace: timedelta = SAMPLE_BLOB_GRACE) -> int:
    """Delete this project's sample blobs that no stored sample references; returns how many.

    They are claim-check uploads whose record was never published or was dead-lettered, and
    blobs left by a record MongoDB refused while the processor crashed. Only blobs older than
    ``grace`` are judged, so a record still on its way (or retried) keeps its blobs. Every sample
    blob records the sample id it was written for (a claim check must match it), so references
    are found by reading those samples by id: no extra index on the samples.
    """
    candidates: dict[str, list[ObjectId]] = {}
    files = store[f"{BLOB_BUCKET}.files"].find(
        {
            "metadata.kind": "sample-array",
            "metadata.sample_id": {"$exists": True},
            "uploadDate": {"$lt": datetime.now(UTC) - grace},
        },
        {"metadata.sample_id": 1},
    )
    for file in files:
        candidates.setdefault(file.get("metadata", {}).get("sample_id"), []).append(file["_id"])
    orphans = []
    sample_ids = list(candidates)
    for start in range(0, len(sample_ids), 1000):
        chunk = sample_ids[start : start + 1000]
        referenced = {
            entry["blob_id"]
            for document in store[SAMPLES].find({"_id": {"$in": chunk}}, {"arrays": 1})
            for entry in document["arrays"].values()
            if "blob_id" in entry  # not an array kept inline
        }
        orphans += [blob for sample_id in chunk for blob in candidates[sample_id] if blob not in referenced]
    store.delete_blobs(orphans)
    return len(orphans)
