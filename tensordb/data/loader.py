"""The lazy streaming loader: a cohort as a stream of ``(x, y)`` NumPy batches.

Nothing is materialised: metadata documents arrive through one MongoDB cursor; a bounded shuffle
buffer holds metadata only; each batch's bytes are fetched with one query over the GridFS chunks
of its samples (one round trip per batch, not one per sample), in background threads, ``prefetch``
batches ahead. Memory is bounded by ``batch_size × (prefetch + 1)`` samples plus the shuffle
buffer's metadata. The position (samples yielded so far) lets a restarted job resume.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from tensordb.data.samples import to_array
from tensordb.errors import IntegrityError, QueryError
from tensordb.infra.codecs import xxh3_hex
from tensordb.infra.store import Store

if TYPE_CHECKING:
    import tensorflow as tf

Batch = tuple[np.ndarray, np.ndarray | None]


class SampleSource(Protocol):
    """What the loader reads: a cohort (:class:`tensordb.data.cohorts.Cohort`), which builds its
    streams from this module; the loader needs only its documents, store and array names (read-only:
    a cohort is frozen)."""

    @property
    def store(self) -> Store: ...
    @property
    def x(self) -> str: ...
    @property
    def y(self) -> str | None: ...

    def documents(self, projection: Mapping[str, Any] | None = None, batch_size: int = 1000) -> Iterator[dict]: ...


def content_matches(data: bytes, spec: dict[str, Any]) -> bool:
    """Whether ``data`` is the bytes stored for an array: its xxh3 checksum (recorded when it was
    written; samples stored by earlier versions have only their sha256, checked instead).

    Every batch is checked, so corruption or a blob replaced under a reused id is an error, never
    a silent change of the training data; ``bench/loader_and_ingest.py`` measures what it costs.
    """
    if "xxh3" in spec:
        return xxh3_hex(data) == spec["xxh3"]
    return hashlib.sha256(data).hexdigest() == spec["sha256"]


def checked_bytes(blobs: Mapping[Any, bytes], sample_id: str, name: str, spec: Mapping[str, Any]) -> bytes:
    """The bytes of array ``name`` of a sample, read in ``blobs``; raises :class:`IntegrityError`
    when they are missing or do not match the size and checksum recorded when they were stored."""
    data = blobs.get(spec["blob_id"])
    if data is None or len(data) != spec["nbytes"] or not content_matches(data, dict(spec)):
        raise IntegrityError(
            f"the bytes of array {name!r} of sample {sample_id!r} are "
            + ("missing" if data is None else "not those stored (checksum mismatch)")
            + " in GridFS: re-publish the sample, or restore the blobs collection from a backup"
        )
    return data


def sample_arrays(store: Store, documents: Sequence[Mapping[str, Any]]) -> list[dict[str, np.ndarray]]:
    """Every array of each sample document, read in one query and checked (transform stages read
    whole samples this way).

    Parameters
    ----------
    store : Store
        The project's database.
    documents : list of mapping
        Sample documents with their ``arrays`` field.
    """
    blobs = store.read_blobs([spec["blob_id"] for document in documents for spec in document["arrays"].values()])
    return [
        {name: to_array(checked_bytes(blobs, document["_id"], name, spec), spec) for name, spec in document["arrays"].items()}
        for document in documents
    ]


class CohortStream:
    """Iterate to get batches; ``position`` counts the samples yielded (pass it back as ``start``).

    Options: ``shuffle_buffer`` (0 = cohort order), ``seed``, ``prefetch`` (batches fetched ahead),
    ``start`` (samples to skip, for resuming; skipped samples' bytes are never read),
    ``drop_remainder`` (omit a last short batch), ``fetch_threads``.
    """

    def __init__(
        self,
        cohort: SampleSource,
        batch_size: int,
        *,
        shuffle_buffer: int = 0,
        seed: int = 0,
        prefetch: int = 2,
        start: int = 0,
        drop_remainder: bool = False,
        fetch_threads: int = 2,
    ) -> None:
        if batch_size < 1 or prefetch < 1 or shuffle_buffer < 0 or start < 0 or fetch_threads < 1:
            raise QueryError("batch_size, prefetch and fetch_threads must be >= 1; shuffle_buffer and start >= 0")
        self.cohort = cohort
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.prefetch = prefetch
        self.start = start
        self.drop_remainder = drop_remainder
        self.fetch_threads = fetch_threads
        self.position = start

    def _projection(self) -> dict[str, int]:
        projection = {f"arrays.{self.cohort.x}": 1}
        if self.cohort.y is not None:
            projection[f"labels.{self.cohort.y}"] = 1
        return projection

    def _ordered(self) -> Iterator[dict[str, Any]]:
        """Metadata documents in cohort order, or shuffled through a bounded buffer."""
        documents = self.cohort.documents(self._projection())
        if not self.shuffle_buffer:
            yield from documents
            return
        rng = np.random.default_rng(self.seed)
        buffer: list[dict[str, Any]] = []
        for document in documents:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(document)
                continue
            index = int(rng.integers(len(buffer)))
            yield buffer[index]
            buffer[index] = document
        rng.shuffle(buffer)
        yield from buffer

    def _batches_of_metadata(self) -> Iterator[list[dict[str, Any]]]:
        batch: list[dict[str, Any]] = []
        for index, document in enumerate(self._ordered()):
            if index < self.start:
                continue
            batch.append(document)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_remainder:
            yield batch

    def _fetch(self, metadata: list[dict[str, Any]]) -> Batch:
        """Read one batch's bytes in one query and assemble the arrays."""
        x_name, y_name = self.cohort.x, self.cohort.y
        try:
            specs = [document["arrays"][x_name] for document in metadata]
        except KeyError:
            raise QueryError(
                f"a sample of this cohort has no array {x_name!r}: filter the cohort to samples that have it "
                f"(e.g. {{'arrays.{x_name}': {{'$exists': true}}}}) or choose another x"
            ) from None
        blobs = self.cohort.store.read_blobs([spec["blob_id"] for spec in specs])
        first = specs[0]
        x = np.empty((len(specs), *first["shape"]), dtype=np.dtype(first["dtype"]))
        for slot, (document, spec) in enumerate(zip(metadata, specs, strict=True)):
            if spec["shape"] != first["shape"] or spec["dtype"] != first["dtype"]:
                raise QueryError(
                    f"sample {document['_id']} has {spec['dtype']}{spec['shape']} but the batch started with "
                    f"{first['dtype']}{first['shape']}: cohorts stream samples of one shape and dtype"
                )
            data = checked_bytes(blobs, document["_id"], x_name, spec)
            x[slot] = to_array(data, spec)
        if y_name is None:
            return x, None
        y = np.asarray([document.get("labels", {}).get(y_name) for document in metadata])
        if y.dtype == object:
            raise QueryError(f"some samples of this cohort have no label {y_name!r}: filter them out or set y=None")
        return x, y

    def __iter__(self) -> Iterator[Batch]:
        in_flight: deque[Future[Batch]] = deque()
        with ThreadPoolExecutor(self.fetch_threads, thread_name_prefix="tensordb-fetch") as pool:
            try:
                for metadata in self._batches_of_metadata():
                    in_flight.append(pool.submit(self._fetch, metadata))
                    if len(in_flight) > self.prefetch:
                        yield self._deliver(in_flight.popleft())
                while in_flight:
                    yield self._deliver(in_flight.popleft())
            finally:
                for future in in_flight:
                    future.cancel()

    def _deliver(self, future: Future[Batch]) -> Batch:
        batch = future.result()
        self.position += len(batch[0])
        return batch


def _label_spec(value: Any) -> tuple[tuple[int, ...], np.dtype]:
    array = np.asarray(value)
    dtype = np.dtype("int64") if array.dtype.kind in "iub" else np.dtype("float32") if array.dtype.kind == "f" else array.dtype
    return array.shape, dtype


def to_tf_dataset(cohort: SampleSource, batch_size: int = 32, **options: Any) -> tf.data.Dataset:
    """The cohort as a ``tf.data.Dataset`` of ``(x, y)`` batches, with an exact ``element_spec``.

    Shapes and dtypes come from the first sample's metadata (no bytes read). Each pass over the
    dataset (each epoch) re-reads the cohort lazily.
    """
    import tensorflow as tf

    projection = {f"arrays.{cohort.x}": 1, **({f"labels.{cohort.y}": 1} if cohort.y else {})}
    first = next(iter(cohort.documents(projection, batch_size=1)), None)
    if first is None:
        raise QueryError("this cohort has no samples yet: publish data or widen its filter")
    spec = first["arrays"][cohort.x]
    x_spec = tf.TensorSpec((None, *spec["shape"]), tf.as_dtype(np.dtype(spec["dtype"])))
    if cohort.y is None:
        signature: Any = x_spec
    else:
        y_shape, y_dtype = _label_spec(first["labels"][cohort.y])
        signature = (x_spec, tf.TensorSpec((None, *y_shape), tf.as_dtype(y_dtype)))

    def batches() -> Iterator[Any]:
        for x, y in CohortStream(cohort, batch_size, **options):
            yield x if y is None else (x, y.astype(signature[1].dtype.as_numpy_dtype))

    return tf.data.Dataset.from_generator(batches, output_signature=signature)
