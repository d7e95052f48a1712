"""Sample records: building them from NumPy arrays (with the claim check) and reading arrays back.

A sample's arrays travel inline (base64 of the raw little-endian C-order bytes) up to
``settings.inline_limit_bytes`` in total; larger ones are first written to GridFS and the record
carries a reference (claim check), so no size is rejected by the broker and nothing is truncated.
Any Kafka client may also send arrays as nested JSON lists (``"values"``).
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from functools import cache
from typing import Any, NotRequired, TypedDict

import numpy as np
import orjson
from bson import ObjectId

from tensordb.config import Topic
from tensordb.errors import SampleError
from tensordb.infra.bus import Publisher
from tensordb.infra.codecs import from_base64, to_base64
from tensordb.infra.store import Store
from tensordb.records import Schema

ArrayLike = np.ndarray | Mapping[str, np.ndarray]
SPLIT_KEY_RANGE = 1_000_000
SAMPLES = "samples"
#: The ingest batches whose ``data-imported`` events the broker acknowledged, one document each
#: (see :mod:`streams.ingest`).
SAMPLE_IMPORTS = "sample_imports"


#: The most bytes of a sample's arrays kept inside its document, as BSON binaries (``data``),
#: instead of in GridFS: a small sample is then one document written and one read, where GridFS
#: takes a file and a chunk document more. Larger arrays stay in GridFS, so a sample document
#: stays far below MongoDB's 16 MiB limit and queries over metadata stay light.
INLINE_MAX_BYTES = 64 * 1024


class StoredArray(TypedDict):
    """One array of a stored sample: its bytes are ``data`` (small arrays, see
    :data:`INLINE_MAX_BYTES`) or the GridFS blob ``blob_id``. Samples stored before arrays were
    kept inline all have ``blob_id``; every reader takes both, so they need no migration."""

    dtype: str
    shape: list[int]
    nbytes: int
    sha256: str
    data: NotRequired[bytes]
    blob_id: NotRequired[ObjectId]
    #: whether the SDK uploaded the blob before publishing (else ingest stored the bytes the record carried)
    claim_check: bool
    #: recorded at upload; reads check it instead of the slower sha256 (absent on older samples)
    xxh3: NotRequired[str]


class SampleOrigin(TypedDict):
    topic: str
    partition: int
    offset: int


class SampleLineage(TypedDict):
    """Where a derived sample comes from: the transform stage (and its version) that derived it from a source sample."""

    derived_from: str
    stage: str
    stage_version: int


class SampleDocument(TypedDict):
    """A document of the ``samples`` collection, as the ingest processor stores a ``sample/1`` record."""

    _id: str
    project: str
    dataset: str
    version: str | int | None
    arrays: dict[str, StoredArray]
    labels: dict[str, Any]
    metadata: dict[str, Any]
    tags: list[str]
    source: str
    published_at: str | None
    imported_at: datetime
    split_key: int
    origin: SampleOrigin
    #: True where the sample's announcement is recorded on the sample itself (derived samples, and a
    #: redelivered one announced after a crash); False for one that ingest stored, whose announcement
    #: is recorded with its import (see :mod:`streams.ingest`)
    announced: bool
    #: the ingest batch that stored it: announced once ``sample_imports`` holds this id
    import_id: NotRequired[ObjectId]
    #: the sha256 of what the sample holds, computed from the rest when it is stored
    fingerprint: NotRequired[str]
    #: a derived sample's source, stage and stage version (see :mod:`tensordb.stages`)
    lineage: NotRequired[SampleLineage]


@cache
def record_dtype(name: str) -> np.dtype[Any]:
    """The little-endian dtype a record's ``dtype`` names; cached, as it is looked up per array of
    every sample stored or read."""
    return np.dtype(name).newbyteorder("<")


@cache
def dtype_name(dtype: np.dtype[Any]) -> str:
    """``dtype.name`` (a record's ``dtype``), cached: NumPy computes it in Python, ~2.5 µs a call."""
    return dtype.name


def _named(value: Any, default_name: str) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {default_name: value}


def _little_endian(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    if array.dtype.hasobject:
        raise SampleError("arrays of Python objects cannot be published: convert to a numeric or boolean dtype")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array


def _label_value(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else value


def named_arrays(arrays: ArrayLike) -> dict[str, np.ndarray]:
    """One array (named ``x``) or a dict of named arrays, each contiguous and little-endian: the
    bytes a sample stores."""
    return {name: _little_endian(np.asarray(array)) for name, array in _named(arrays, "x").items()}


def sample_fields(
    *,
    dataset: str,
    labels: Any = None,
    metadata: Mapping[str, Any] | None = None,
    tags: Iterable[str] = (),
    version: str | int | None = None,
    source: str = "tensordb-sdk",
    lineage: SampleLineage | None = None,
) -> dict[str, Any]:
    """What a ``sample/1`` record says about its sample besides its id and arrays (see :func:`build_sample`)."""
    fields: dict[str, Any] = {"dataset": dataset, "source": source, "published_at": datetime.now(UTC).isoformat()}
    if labels is not None:
        fields["labels"] = {name: _label_value(value) for name, value in _named(labels, "y").items()}
    if metadata:
        fields["metadata"] = dict(metadata)
    if tags:
        fields["tags"] = list(tags)
    if version is not None:
        fields["version"] = version
    if lineage is not None:
        fields["lineage"] = dict(lineage)
    return fields


def build_sample(
    store: Store,
    arrays: ArrayLike,
    *,
    dataset: str,
    labels: Any = None,
    metadata: Mapping[str, Any] | None = None,
    tags: Iterable[str] = (),
    version: str | int | None = None,
    sample_id: str | None = None,
    source: str = "tensordb-sdk",
) -> dict[str, Any]:
    """A ``sample/1`` record for ``arrays`` (one array, named ``x``, or a dict of named arrays).

    ``labels`` is one value (named ``y``) or a dict. Arrays beyond the inline limit are uploaded
    to GridFS now and referenced; the smallest arrays are kept inline first.
    """
    named = named_arrays(arrays)
    sample_id = sample_id or uuid.uuid4().hex
    specs: dict[str, dict[str, Any]] = {}
    inline_budget = store.settings.inline_limit_bytes
    for name, array in sorted(named.items(), key=lambda item: item[1].nbytes):
        spec: dict[str, Any] = {"dtype": dtype_name(array.dtype), "shape": list(array.shape)}
        if array.nbytes <= inline_budget:
            inline_budget -= array.nbytes
            spec["data"] = to_base64(array.data)
        else:
            data = array.tobytes()
            blob_id, digest = store.put_bytes(
                data,
                f"{dataset}/{sample_id}/{name}",
                kind="sample-array",
                dataset=dataset,
                sample_id=sample_id,
                dtype=spec["dtype"],
                shape=spec["shape"],
            )  # the claim check is bound to this upload: ingest compares all of these, and the digests the store records
            spec.update(blob_id=str(blob_id), sha256=digest, nbytes=len(data))
        specs[name] = spec
    fields = sample_fields(dataset=dataset, labels=labels, metadata=metadata, tags=tags, version=version, source=source)
    arrays_in_order = {name: specs[name] for name in named}  # keep the caller's order
    return {"schema": Schema.SAMPLE, "sample_id": sample_id, "arrays": arrays_in_order, **fields}


def publish_samples(publisher: Publisher, store: Store, samples: Iterable[Mapping[str, Any]]) -> list[str]:
    """Publish many samples (each a dict of :func:`build_sample` arguments); returns their ids.

    Records are queued asynchronously and flushed once at the end, so bulk publishing runs at the
    producer's batching speed; a delivery failure raises :class:`~tensordb.errors.DeliveryError`.
    """
    ids = []
    for sample in samples:
        record = build_sample(store, **sample)
        publisher.publish(Topic.INGEST, record, key=record["sample_id"])
        ids.append(record["sample_id"])
    publisher.flush()
    return ids


def content_id(record: Mapping[str, Any]) -> str:
    """A deterministic id for a record published without ``sample_id`` (same content, same id)."""
    return "c" + hashlib.sha256(orjson.dumps(record, option=orjson.OPT_SORT_KEYS)).hexdigest()[:31]


def split_key(sample_id: str) -> int:
    """A stable pseudo-random number in [0, 1e6) per sample, for k-fold and train/validation splits."""
    return int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "big") % SPLIT_KEY_RANGE


#: Deepest nesting of metadata and label values stored (MongoDB refuses documents past 100 levels).
MAX_NESTING = 32
INT64 = (-(2**63), 2**63 - 1)


def array_nbytes(name: str, dtype_name: str, shape: list[int], max_bytes: int) -> int:
    """The size in bytes of an array of ``shape``, refusing shapes past ``max_bytes`` (no overflow:
    Python integers, so a shape like ``[2**32, 2**32]`` is refused, never wrapped round to a small size)."""
    nbytes = math.prod(shape) * record_dtype(dtype_name).itemsize
    if nbytes > max_bytes:
        raise SampleError(
            f"array {name!r}: shape {shape} of {dtype_name} is {nbytes} bytes, over the {max_bytes}-byte sample limit "
            "(TENSORDB_MAX_SAMPLE_BYTES): fix the shape, or raise the limit if samples really are this large"
        )
    return nbytes


def check_storable(field: str, value: Any, depth: int = 0) -> None:
    """Refuse metadata or label values MongoDB cannot store, naming the field and what to do.

    Parameters
    ----------
    field:
        The value's path in the record, for the message (e.g. ``metadata.scanner``).
    value:
        A JSON value from the record.
    """
    if depth > MAX_NESTING:
        raise SampleError(f"{field}: values nest more than {MAX_NESTING} levels: flatten them")
    if isinstance(value, bool | float | str) or value is None:
        return
    if isinstance(value, int):
        if not INT64[0] <= value <= INT64[1]:
            raise SampleError(f"{field}: the integer {value} does not fit 64 bits: send it as a string or a float")
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            check_storable(f"{field}[{index}]", item, depth + 1)
        return
    for key, item in value.items():
        if key.startswith("$") or "." in key or "\0" in key:
            raise SampleError(f"{field}: the key {key[:64]!r} has '$' at its start, a '.' or a NUL: rename it")
        check_storable(f"{field}.{key}", item, depth + 1)


def inline_bytes(name: str, spec: Mapping[str, Any], max_bytes: int = 2**63) -> tuple[bytes, list[int]]:
    """The raw bytes and shape of an inline array spec, checked against its dtype and shape.

    Parameters
    ----------
    name, spec:
        The array's name and its spec from a ``sample/1`` record (``data`` or ``values``).
    max_bytes:
        The largest array accepted (the settings' ``max_sample_bytes``).
    """
    dtype = record_dtype(spec["dtype"])
    kind = dtype_name(dtype)
    if "data" in spec:
        shape = [int(size) for size in spec["shape"]]  # JSON may spell 2 as 2.0
        expected = array_nbytes(name, kind, shape, max_bytes)
        try:
            data = from_base64(spec["data"])
        except ValueError as exc:
            raise SampleError(f"array {name!r}: 'data' is not valid base64 ({exc})") from exc
    else:
        if "shape" in spec:
            array_nbytes(name, kind, list(spec["shape"]), max_bytes)
        try:
            with np.errstate(over="raise", invalid="raise"):  # 1e300 as float16 is an error, not inf
                values = np.asarray(spec["values"], dtype=dtype)
        except (ValueError, TypeError, OverflowError, FloatingPointError) as exc:
            raise SampleError(
                f"array {name!r}: 'values' do not form a regular {kind} array ({exc}): "
                f"send equal-length lists of numbers that fit {kind}"
            ) from exc
        shape = [int(size) for size in spec.get("shape", values.shape)]
        data = values.tobytes()
        expected = array_nbytes(name, kind, shape, max_bytes)
    if len(data) != expected:
        raise SampleError(
            f"array {name!r}: {len(data)} bytes do not fit shape {list(shape)} of {kind} "
            f"({expected} bytes expected); fix the shape or the data"
        )
    return data, shape


def to_array(data: bytes, spec: Mapping[str, Any]) -> np.ndarray:
    """A read-only array over stored bytes (no copy)."""
    return np.frombuffer(data, dtype=record_dtype(spec["dtype"])).reshape(spec["shape"])
