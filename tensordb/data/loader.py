"""The lazy streaming loader: a cohort as a stream of ``(x, y)`` NumPy batches.

Nothing is materialised: sample documents arrive through one MongoDB cursor (a bounded shuffle
buffer holds their ids, each batch then read by id), or, for a global shuffle, sharding and
resuming, by id from a member snapshot (one query per batch). Small arrays' bytes come inside
those documents; larger ones (and those of samples stored before arrays were kept inline) are
fetched with one query over the GridFS chunks of the batch's samples (not one per sample; mongod
sends them in replies of about 1.5 MiB), in background threads, ``prefetch`` batches ahead. Memory
is bounded by about three times ``batch_size × (prefetch + 1)`` samples (the batches in flight,
those the reading thread holds ahead, and the cursor's own batch) plus the shuffle buffer's or the
snapshot's ids.
``position`` and :meth:`CohortStream.state` let a restarted job resume.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from tensordb.data.order import StreamState, epoch_order, rank_share
from tensordb.data.samples import SAMPLES, record_dtype, to_array
from tensordb.data.snapshots import Snapshot, snapshot_id, take_snapshot
from tensordb.data.sources import SampleSource
from tensordb.errors import IntegrityError, NotFoundError, QueryError, StreamStateError
from tensordb.infra.allocator import GLIBC_MMAP_THRESHOLD_MAX, restore_large_allocations
from tensordb.infra.codecs import xxh3_hex
from tensordb.infra.store import Store

if TYPE_CHECKING:
    import tensorflow as tf

Batch = tuple[np.ndarray, np.ndarray | None]

#: :func:`to_tf_dataset` hands tf.data up to this many batches of small samples as one element, up
#: to this many bytes: ``from_generator`` costs ~0.65 ms of Python per element, whatever its size.
#: 28×28, batch 64, 6,000 samples (2 cores, loaded): groups of 16 76,900/s, of 8 or 4 69,100/s.
TF_GROUP_BATCHES = 16
TF_GROUP_BYTES = 4 * 2**20

#: What a batch reads of each sample's ``arrays`` entry: its bytes (inline, or their GridFS id) and
#: what checks them. Leaving out the sha256 (read only for samples stored before the xxh3 was) and
#: the claim-check flag cuts decoding a 28×28 sample's document from 2.1 to 1.4 µs.
BATCH_FIELDS = ("data", "blob_id", "dtype", "shape", "nbytes", "xxh3")

#: Batches start at a multiple of this many bytes: TensorFlow copies a NumPy array into a new tensor
#: unless its data is aligned for Eigen (``EIGEN_MAX_ALIGN_BYTES``, 64 at most; ``TF_NewTensor``),
#: and malloc aligns only to 16. Aligned, a batch yielded to ``from_generator`` becomes a tensor
#: without a copy: 256×256×3 batches of 64 cost tf.data 4–6 µs of CPU per sample instead of 23–33 µs.
BATCH_ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts at a multiple of :data:`BATCH_ALIGNMENT` bytes.

    Parameters
    ----------
    shape : tuple of int
        The array's shape (at least one element: NumPy gives an empty view no particular address).
    dtype : numpy.dtype
        Its element type.
    """
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buffer = np.empty(nbytes + BATCH_ALIGNMENT, np.uint8)
    offset = -buffer.ctypes.data % BATCH_ALIGNMENT
    return buffer[offset : offset + nbytes].view(dtype).reshape(shape)


def entry_projection(parent: str, name: str, fields: Iterable[str] = ()) -> dict[str, int]:
    """The projection that reads entry ``name`` of a sample's ``parent`` (``arrays``, ``labels``), only
    its ``fields`` when given. MongoDB reads a dot in a path as one more level, so an entry whose
    name holds a dot (the sample schema allows it: ``img.v1``) is read through its whole parent."""
    if "." in name:
        return {parent: 1}
    return {f"{parent}.{name}.{field}": 1 for field in fields} if fields else {f"{parent}.{name}": 1}


def _missing_array(name: str) -> QueryError:
    """The error for a cohort sample without the array the loader reads."""
    example = f" (e.g. {{'arrays.{name}': {{'$exists': true}}}})" if "." not in name else ""
    return QueryError(
        f"a sample of this cohort has no array {name!r}: filter the cohort to samples that have it{example} or choose another x"
    )


def _missing_label(name: str) -> QueryError:
    """The error for cohort samples without the label the loader reads."""
    return QueryError(f"some samples of this cohort have no label {name!r}: filter them out or set y=None")


def content_matches(data: bytes, spec: Mapping[str, Any]) -> bool:
    """Whether ``data`` is the bytes stored for an array: its xxh3 checksum (recorded when it was
    written; samples stored by earlier versions have only their sha256, checked instead).

    Every batch is checked, so corruption or a blob replaced under a reused id is an error, never
    a silent change of the training data; ``bench/loader_and_ingest.py`` measures what it costs.
    """
    if "xxh3" in spec:
        return xxh3_hex(data) == spec["xxh3"]
    return hashlib.sha256(data).hexdigest() == spec["sha256"]


def read_blobs(store: Store, specs: Iterable[Mapping[str, Any]]) -> dict[Any, bytes]:
    """The GridFS bytes of those array entries that are not inline, in one query (none if all are)."""
    in_gridfs = [spec for spec in specs if "blob_id" in spec]
    if not in_gridfs:
        return {}
    return store.read_blobs([spec["blob_id"] for spec in in_gridfs], max(spec["nbytes"] for spec in in_gridfs))


def checked_bytes(blobs: Mapping[Any, bytes], sample_id: str, name: str, spec: Mapping[str, Any]) -> bytes:
    """The bytes of array ``name`` of a sample: inline in its entry, or read in ``blobs``; raises
    :class:`IntegrityError` when they are missing or do not match the size and checksum recorded
    when they were stored."""
    inline = "data" in spec
    data = spec["data"] if inline else blobs.get(spec.get("blob_id"))
    if data is None or len(data) != spec["nbytes"] or not content_matches(data, spec):
        raise IntegrityError(
            f"the bytes of array {name!r} of sample {sample_id!r} are "
            + ("missing" if data is None else "not those stored (checksum mismatch)")
            + (" in its sample document" if inline else " in GridFS")
            + ": re-publish the sample, or restore the samples and blobs collections from a backup"
        )
    return data


def sample_arrays(store: Store, documents: Sequence[Mapping[str, Any]]) -> list[dict[str, np.ndarray]]:
    """Every array of each sample document, checked; the arrays in GridFS are read in one query
    (transform stages and the predictor read whole samples this way).

    Parameters
    ----------
    store : Store
        The project's database.
    documents : list of mapping
        Sample documents with their ``arrays`` field.
    """
    blobs = read_blobs(store, (spec for document in documents for spec in document["arrays"].values()))
    return [
        {name: to_array(checked_bytes(blobs, document["_id"], name, spec), spec) for name, spec in document["arrays"].items()}
        for document in documents
    ]


class CohortStream:
    """Iterate to get one epoch's batches; iterating again gives the next epoch.

    Two readers, chosen by the options:

    - **the cohort's cursor** (the default): cohort order, or ``shuffle_buffer`` samples shuffled
      through a window; ``start`` skips samples of the first epoch, re-reading their documents;
    - **a member snapshot** (:mod:`tensordb.data.snapshots`) when ``shuffle=True``, ``rank`` /
      ``world_size`` or ``state`` is given: one global order per epoch (:mod:`tensordb.data.order`),
      this rank's share of it, and :meth:`state` to resume at any position without reading what
      is skipped. An unpinned cohort is pinned now (the state records the pin); ranks of a job must
      share the pin, so ``world_size > 1`` needs a pinned cohort or a state.

    ``position`` counts the samples of this epoch (of this rank's share) yielded so far; ``epoch``
    seeds the shuffles with ``seed``.
    """

    def __init__(
        self,
        cohort: SampleSource,
        batch_size: int,
        *,
        shuffle: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        epoch: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        state: Mapping[str, Any] | None = None,
        prefetch: int = 2,
        start: int = 0,
        drop_remainder: bool = False,
        fetch_threads: int = 2,
    ) -> None:
        """
        Parameters
        ----------
        cohort : SampleSource
            The cohort to read (:class:`tensordb.data.cohorts.Cohort`).
        batch_size : int
            Samples per batch.
        shuffle : bool
            A seeded permutation of all members each epoch (global shuffle), instead of cohort order.
        shuffle_buffer : int
            Shuffle through a window of this many samples over cohort order (0: none); not with ``shuffle``.
        seed, epoch : int
            The shuffles of epoch ``epoch`` are seeded by ``(seed, epoch)``; ``epoch`` is the first one read.
        rank, world_size : int
            This process's share of the global order: positions ``rank``, ``rank + world_size``, ...
        state : dict
            What :meth:`state` returned: resume there (the other arguments must be those it was saved with).
        prefetch, fetch_threads : int
            Batches fetched ahead, by this many threads.
        start : int
            Samples of the first epoch to skip (their bytes in GridFS are never read).
        drop_remainder : bool
            Omit a last short batch.
        """
        if batch_size < 1 or prefetch < 1 or shuffle_buffer < 0 or start < 0 or fetch_threads < 1 or epoch < 0:
            raise QueryError("batch_size, prefetch and fetch_threads must be >= 1; shuffle_buffer, start and epoch >= 0")
        if shuffle and shuffle_buffer:
            raise QueryError("shuffle=True permutes the whole cohort: leave shuffle_buffer at 0 (it is the windowed shuffle)")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = epoch
        self.prefetch = prefetch
        self.position = start
        self.drop_remainder = drop_remainder
        self.fetch_threads = fetch_threads
        self.from_snapshot = shuffle or rank is not None or world_size is not None or state is not None
        self.rank, self.world_size = rank or 0, world_size or 1
        if not 0 <= self.rank < self.world_size:
            raise QueryError(f"rank must be in [0, world_size), got rank {rank} of world_size {world_size}")
        self._snapshot: Snapshot | None = None
        self.cohort = self._pin(cohort, None if state is None else self._resume(state))

    def _resume(self, state: Mapping[str, Any]) -> StreamState:
        resumed = StreamState.from_dict(state)
        resumed.check_fits(
            shuffle=self.shuffle, seed=self.seed, rank=self.rank, world_size=self.world_size, batch_size=self.batch_size
        )
        self.epoch, self.position = resumed.epoch, resumed.position
        return resumed

    def _pin(self, cohort: SampleSource, resumed: StreamState | None) -> SampleSource:
        """The cohort this stream reads: as given for the cursor; pinned for a snapshot (at the
        state's pin when resuming), checked against the state's snapshot."""
        if not self.from_snapshot or (cohort.as_of is not None and resumed is None):
            return cohort
        if resumed is not None:
            pinned = cohort if cohort.as_of is not None else cohort.pinned(datetime.fromisoformat(resumed.as_of))
            if snapshot_id(pinned) != resumed.snapshot:
                raise StreamStateError(
                    f"this stream state belongs to another cohort (snapshot {resumed.snapshot}, pinned at {resumed.as_of}): "
                    "resume it with the cohort it was saved from"
                )
            return pinned
        if self.world_size > 1:
            raise QueryError(
                "the ranks of a sharded stream must read the same members: pin the cohort at one time on every rank "
                "(cohort.pinned(as_of), e.g. the job's start time), or pass every rank a state saved by stream.state()"
            )
        now = datetime.now(UTC)
        return cohort.pinned(now.replace(microsecond=now.microsecond // 1000 * 1000))  # MongoDB keeps milliseconds

    # -- the member snapshot ------------------------------------------------------------------------
    def members(self) -> Snapshot:
        """The cohort's member snapshot (taken on first use, then loaded: one document and one blob)."""
        if not self.from_snapshot:
            raise QueryError(
                "this stream reads the cohort's cursor: pass shuffle=True, rank/world_size or state to use a snapshot"
            )
        if self._snapshot is None:
            self._snapshot = take_snapshot(self.cohort)
        return self._snapshot

    def state(self) -> dict[str, Any]:
        """Where this stream is, as a small JSON-able dict (see :class:`tensordb.data.order.StreamState`):
        save it with a checkpoint and pass it back as ``cohort.stream(..., state=...)`` to go on
        with exactly the samples not yet yielded."""
        if not self.from_snapshot:
            raise QueryError(
                "state() needs a stream over a member snapshot: pass shuffle=True, or rank and world_size "
                "(world_size=1 for one process); a cursor stream resumes with start=position"
            )
        as_of = self.cohort.as_of
        assert as_of is not None  # pinned in __init__
        return StreamState(
            snapshot=snapshot_id(self.cohort),
            as_of=as_of.isoformat(),
            members=len(self.members().ids),
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch,
            position=self.position,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
        ).as_dict()

    def sample_ids(self) -> list[str]:
        """The ids of the samples the rest of this epoch yields, in order (no bytes read)."""
        if self.from_snapshot:
            return [sample for batch in self._batches_of_ids(0, 1) for sample in batch]
        return [document["_id"] for batch in self._batches_of_metadata({"_id": 1}) for document in batch]

    # -- what each batch holds ----------------------------------------------------------------------
    def _projection(self) -> dict[str, int]:
        projection = entry_projection("arrays", self.cohort.x, BATCH_FIELDS)
        if self.cohort.y is not None:
            projection.update(entry_projection("labels", self.cohort.y))
        return projection

    def _ordered(self, projection: Mapping[str, int] | None) -> Iterator[dict[str, Any]]:
        """Sample documents in cohort order, or shuffled through a bounded buffer (the same order
        whatever the ``projection``). Whole documents (``projection`` None) carry their inline
        bytes, so the cursor then reads only the batches in flight at a time, not 1,000 documents."""
        if projection is None:
            documents = self.cohort.documents(self._projection(), batch_size=self.batch_size * (self.prefetch + 1))
        else:
            documents = self.cohort.documents(projection)
        if not self.shuffle_buffer:
            yield from documents
            return
        rng = np.random.default_rng([self.seed, self.epoch])
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

    def _batches_of_metadata(self, projection: Mapping[str, int] | None = None) -> Generator[list[dict[str, Any]], None, None]:
        start = self.position
        batch: list[dict[str, Any]] = []
        for index, document in enumerate(self._ordered(projection)):
            if index < start:
                continue
            batch.append(document)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_remainder:
            yield batch

    def _batches_of_ids(self, worker: int, workers: int) -> Iterator[list[str]]:
        """This rank's share of the epoch's global order from ``position``, batch by batch; with
        ``workers`` > 1, only every ``workers``-th batch from ``worker`` on."""
        ids = self.members().ids
        share = rank_share(epoch_order(len(ids), self.shuffle, self.seed, self.epoch), self.rank, self.world_size)
        for index, begin in enumerate(range(self.position, len(share), self.batch_size)):
            positions = share[begin : begin + self.batch_size]
            if index % workers == worker and (len(positions) == self.batch_size or not self.drop_remainder):
                yield [ids[position] for position in positions]

    def _fetch_ids(self, ids: list[str]) -> Batch:
        """Read one batch's documents (one query by id) and its bytes in GridFS (one query), in the order of ``ids``."""
        found = {
            document["_id"]: document for document in self.cohort.store[SAMPLES].find({"_id": {"$in": ids}}, self._projection())
        }
        missing = [sample for sample in ids if sample not in found]
        if missing:
            raise NotFoundError(
                f"sample {missing[0]!r} of this cohort was deleted while the stream read it (pinned at "
                f"{self.cohort.as_of}): stream the cohort again, pinned at a later time (a new snapshot)"
            )
        return self._fetch([found[sample] for sample in ids])

    def _fetch(self, metadata: list[dict[str, Any]]) -> Batch:
        """Assemble one batch's arrays: bytes kept inline come with ``metadata``, those in GridFS in one query."""
        x_name, y_name = self.cohort.x, self.cohort.y
        try:
            specs = [document["arrays"][x_name] for document in metadata]
        except KeyError:
            raise _missing_array(x_name) from None
        self._read_sha256(metadata, specs)
        blobs = read_blobs(self.cohort.store, specs)
        first = specs[0]
        shape, dtype = first["shape"], first["dtype"]
        # Stored bytes are little-endian; the batch is one array they are copied into once each,
        # through a flat byte view (no per-sample array objects).
        x = aligned_empty((len(specs), *shape), record_dtype(dtype))
        flat, size = x.reshape(-1).view(np.uint8).data, x.itemsize * int(np.prod(shape, dtype=np.int64))
        for slot, (document, spec) in enumerate(zip(metadata, specs, strict=True)):
            if spec["shape"] != shape or spec["dtype"] != dtype:
                raise QueryError(
                    f"sample {document['_id']} has {spec['dtype']}{spec['shape']} but the batch started with "
                    f"{dtype}{shape}: cohorts stream samples of one shape and dtype"
                )
            flat[slot * size : (slot + 1) * size] = checked_bytes(blobs, document["_id"], x_name, spec)
        if y_name is None:
            return x, None
        y = np.asarray([document.get("labels", {}).get(y_name) for document in metadata])
        if y.dtype == object:
            raise _missing_label(y_name)
        return x, y

    def _read_sha256(self, metadata: list[dict[str, Any]], specs: list[dict[str, Any]]) -> None:
        """Add the sha256 to the entries of samples stored before the xxh3 was recorded (one query,
        none for the others): :data:`BATCH_FIELDS` leaves it out to decode less."""
        older = {document["_id"]: spec for document, spec in zip(metadata, specs, strict=True) if "xxh3" not in spec}
        if older:
            projection = entry_projection("arrays", self.cohort.x, ("sha256",))
            for document in self.cohort.store[SAMPLES].find({"_id": {"$in": list(older)}}, projection):
                older[document["_id"]]["sha256"] = document["arrays"][self.cohort.x]["sha256"]

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()

    def batches(self, worker: int = 0, workers: int = 1) -> Iterator[Batch]:
        """The rest of this epoch's batches, then the next epoch starts (``position`` 0).

        Parameters
        ----------
        worker, workers : int
            Yield only every ``workers``-th batch from ``worker`` on (a snapshot's stream split
            between data loader workers without duplicates; they take turns, so the batches in
            turn are those of one reader).
        """
        if workers > 1 and not self.from_snapshot:
            raise QueryError("splitting a stream between workers needs a member snapshot: pass shuffle=True or rank/world_size")
        in_flight: deque[Future[Batch]] = deque()
        with ThreadPoolExecutor(self.fetch_threads, thread_name_prefix="tensordb-fetch") as pool:
            try:
                for fetch in self._fetches(worker, workers):
                    in_flight.append(pool.submit(fetch))
                    if len(in_flight) > self.prefetch:
                        yield self._deliver(in_flight.popleft())
                while in_flight:
                    yield self._deliver(in_flight.popleft())
            finally:
                for future in in_flight:
                    future.cancel()
        self.epoch, self.position = self.epoch + 1, 0

    def _fetches(self, worker: int, workers: int) -> Iterator[Callable[[], Batch]]:
        """One call per batch that reads it (run in the fetch threads)."""
        if self.from_snapshot:
            return (partial(self._fetch_ids, ids) for ids in self._batches_of_ids(worker, workers))
        if self.shuffle_buffer:  # the buffer holds ids, not inline bytes: each batch is read by id
            batches = self._batches_of_metadata({"_id": 1})
            return (partial(self._fetch_ids, [document["_id"] for document in batch]) for batch in batches)
        return (partial(self._fetch, metadata) for metadata in read_ahead(self._batches_of_metadata(), self.prefetch + 1))

    def _deliver(self, future: Future[Batch]) -> Batch:
        batch = future.result()
        self.position += len(batch[0])
        return batch


def read_ahead(batches: Generator[list[dict[str, Any]], None, None], depth: int) -> Iterator[list[dict[str, Any]]]:
    """Yield ``batches`` as a background thread reads them, up to ``depth`` ahead.

    The cursor's reads then overlap the caller's work: the thread waits for mongod's next
    getMore (without the GIL) while the caller hands batches on (28×28 in cohort order: 108,000 →
    131,000 samples/s). Errors of the reading are raised here; when the caller stops early, the
    thread stops at its next batch and closes ``batches`` (and so its cursor).
    """
    ready: queue.Queue[Any] = queue.Queue(depth)
    done, stopping = object(), threading.Event()

    def offer(item: Any) -> bool:
        """Queue ``item`` unless the caller stopped; returns whether it was queued."""
        while not stopping.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            if all(offer(batch) for batch in batches):
                offer(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, raised there
            offer(exc)
        finally:
            batches.close()

    threading.Thread(target=read, name="tensordb-cursor", daemon=True).start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stopping.set()


def _label_spec(value: Any) -> tuple[tuple[int, ...], np.dtype]:
    array = np.asarray(value)
    dtype = np.dtype("int64") if array.dtype.kind in "iub" else np.dtype("float32") if array.dtype.kind == "f" else array.dtype
    return array.shape, dtype


def to_tf_dataset(
    cohort: SampleSource, batch_size: int = 32, *, mmap_threshold: int | None = GLIBC_MMAP_THRESHOLD_MAX, **options: Any
) -> tf.data.Dataset:
    """The cohort as a ``tf.data.Dataset`` of ``(x, y)`` batches, with an exact ``element_spec``.

    Shapes and dtypes come from the first sample's array entry (no bytes read). Each pass over the
    dataset reads the stream's next epoch (a new permutation with ``shuffle=True``), lazily.
    Batches of small samples are handed to tf.data several at a time (up to 16 batches, 4 MiB) and
    cut back to ``batch_size`` there, and batches are read ahead (``prefetch``). tf.data's
    autotuning is off on the dataset returned, and so on what is chained after it (deleting an
    autotuned iterator, at the end of each pass, stalled for 0.1–0.6 s);
    ``dataset.with_options(options)`` with ``options.autotune.enabled = True`` turns it on.

    Parameters
    ----------
    cohort : SampleSource
        The cohort to read.
    batch_size : int
        Samples per batch.
    mmap_threshold : int or None
        Each pass first undoes, for the whole process, the allocator setting TensorFlow's
        ``from_generator`` makes (:mod:`tensordb.infra.allocator`: 256×256×3 samples read 2.2–2.5× faster):
        allocations from this size on (at most 32 MiB) get their own ``mmap``. None keeps TensorFlow's.
    **options
        :class:`CohortStream`'s options (``shuffle``, ``rank``, ``state``, ``prefetch``...).
    """
    import tensorflow as tf

    if mmap_threshold is not None and not 0 < mmap_threshold <= GLIBC_MMAP_THRESHOLD_MAX:
        raise QueryError(
            f"mmap_threshold must be between 1 and {GLIBC_MMAP_THRESHOLD_MAX} bytes (the ceiling of glibc's own adaptive "
            "threshold), or None to keep TensorFlow's setting"
        )

    projection = entry_projection("arrays", cohort.x, ("dtype", "shape", "nbytes"))
    if cohort.y:
        projection.update(entry_projection("labels", cohort.y))
    first = next(iter(cohort.documents(projection, batch_size=1)), None)
    if first is None:
        raise QueryError("this cohort has no samples yet: publish data or widen its filter")
    spec = first.get("arrays", {}).get(cohort.x)
    if spec is None:
        raise _missing_array(cohort.x)
    x_spec = tf.TensorSpec((None, *spec["shape"]), tf.as_dtype(np.dtype(spec["dtype"])))
    if cohort.y is None:
        signature: Any = x_spec
    else:
        label = first.get("labels", {}).get(cohort.y)
        if label is None:
            raise _missing_label(cohort.y)
        y_shape, y_dtype = _label_spec(label)
        signature = (x_spec, tf.TensorSpec((None, *y_shape), tf.as_dtype(y_dtype)))

    # The stream reads batches of ``batch_size``, and ``group`` of them are joined into one element,
    # cut back by ``rebatch`` (slices, in C++): same samples, same order. Reading larger batches
    # instead kept more documents alive (4 container objects each), which survived the young
    # collections and set off a full one, ~0.19 s with TensorFlow's ~385,000 objects, in 3 to 5 of
    # 7 passes of 30,000 28×28 samples (none to 2 of 7 this way).
    group = max(1, min(TF_GROUP_BATCHES, TF_GROUP_BYTES // max(1, batch_size * spec["nbytes"])))
    stream = CohortStream(cohort, batch_size, **options)

    def element(batches: list[Batch]) -> Any:
        x = batches[0][0]
        if len(batches) > 1:  # joined into an aligned array, which tf.data then takes without a copy
            x = aligned_empty((sum(len(batch_x) for batch_x, _ in batches), *x.shape[1:]), x.dtype)
            np.concatenate([batch_x for batch_x, _ in batches], out=x)
        if cohort.y is None:
            return x
        y = np.concatenate([y for _, y in batches if y is not None])
        return x, y.astype(signature[1].dtype.as_numpy_dtype, copy=False)

    def elements() -> Iterator[Any]:  # one stream: each pass reads its next epoch
        if mmap_threshold is not None:  # TensorFlow sets its own once, when a from_generator first runs
            restore_large_allocations(mmap_threshold)
        batches: list[Batch] = []
        for batch in stream:
            batches.append(batch)
            if len(batches) == group:
                yield element(batches)
                batches = []
        if batches:
            yield element(batches)

    dataset = tf.data.Dataset.from_generator(elements, output_signature=signature)
    if group > 1:
        dataset = dataset.rebatch(batch_size)
    # Without autotuning: deleting an autotuned iterator (at the end of each pass, each Keras epoch)
    # waited 0.1–0.6 s in some passes for tf.data's threads (none of 15 without it). The prefetch
    # buffer still adapts; a caller turns autotuning back on with ``with_options``.
    untuned = tf.data.Options()
    untuned.autotune.enabled = False
    # the generator reads ahead on tf.data's thread while the training step runs (28×28: 50,000 →
    # 70,000 samples/s read in bench/loader_and_ingest.py); it stays within the pass being read
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(untuned)
