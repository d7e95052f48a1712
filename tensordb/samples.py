"""Sample records: building them from NumPy arrays (with the claim check) and reading arrays back.

A sample's arrays travel inline (base64 of the raw little-endian C-order bytes) up to
``settings.inline_limit_bytes`` in total; larger ones are first written to GridFS and the record
carries a reference (claim check), so no size is rejected by the broker and nothing is truncated.
Any Kafka client may also send arrays as nested JSON lists (``"values"``).
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

from tensordb.bus import Publisher
from tensordb.config import Topic
from tensordb.errors import TensorDBError
from tensordb.store import Store

ArrayLike = np.ndarray | Mapping[str, np.ndarray]
SPLIT_KEY_RANGE = 1_000_000
SAMPLES = "samples"


class SampleError(TensorDBError, ValueError):
    """A sample's arrays are inconsistent (bytes vs dtype/shape) or its blob reference is broken."""


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
    named = {name: _little_endian(np.asarray(array)) for name, array in _named(arrays, "x").items()}
    specs: dict[str, dict[str, Any]] = {}
    inline_budget = store.settings.inline_limit_bytes
    for name, array in sorted(named.items(), key=lambda item: item[1].nbytes):
        data = array.tobytes()
        spec: dict[str, Any] = {"dtype": array.dtype.name, "shape": list(array.shape)}
        if len(data) <= inline_budget:
            inline_budget -= len(data)
            spec["data"] = base64.b64encode(data).decode()
        else:
            blob_id, digest = store.put_bytes(data, f"{dataset}/{name}", kind="sample-array", dataset=dataset)
            spec.update(blob_id=str(blob_id), sha256=digest, nbytes=len(data))
        specs[name] = spec
    record: dict[str, Any] = {
        "schema": "sample/1",
        "sample_id": sample_id or uuid.uuid4().hex,
        "dataset": dataset,
        "arrays": {name: specs[name] for name in named},  # keep the caller's order
        "source": source,
        "published_at": datetime.now(UTC).isoformat(),
    }
    if labels is not None:
        record["labels"] = {name: _label_value(value) for name, value in _named(labels, "y").items()}
    if metadata:
        record["metadata"] = dict(metadata)
    if tags:
        record["tags"] = list(tags)
    if version is not None:
        record["version"] = version
    return record


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


def inline_bytes(name: str, spec: Mapping[str, Any]) -> tuple[bytes, list[int]]:
    """The raw bytes and shape of an inline array spec, checked against its dtype and shape."""
    dtype = np.dtype(spec["dtype"]).newbyteorder("<")
    if "data" in spec:
        try:
            data = base64.b64decode(spec["data"], validate=True)
        except ValueError as exc:
            raise SampleError(f"array {name!r}: 'data' is not valid base64 ({exc})") from exc
        shape = list(spec["shape"])
    else:
        try:
            values = np.asarray(spec["values"], dtype=dtype)
        except (ValueError, TypeError) as exc:
            raise SampleError(f"array {name!r}: 'values' do not form a regular {dtype.name} array ({exc})") from exc
        shape = list(spec.get("shape", values.shape))
        data = values.tobytes()
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise SampleError(
            f"array {name!r}: {len(data)} bytes do not fit shape {list(shape)} of {dtype.name} "
            f"({expected} bytes expected); fix the shape or the data"
        )
    return data, shape


def to_array(data: bytes, spec: Mapping[str, Any]) -> np.ndarray:
    """A read-only array over stored bytes (no copy)."""
    return np.frombuffer(data, dtype=np.dtype(spec["dtype"]).newbyteorder("<")).reshape(spec["shape"])
