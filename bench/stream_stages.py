#!/usr/bin/env python
"""Stream stages benchmark: transform stages and streaming inference against plain in-process loops.

Measured in one run, on one machine, against servers this script starts (or those named by
TENSORDB_KAFKA_BOOTSTRAP and TENSORDB_MONGO_URI), with real ``tensordb processors`` and
``tensordb predictor`` child processes:

1. Transform stage throughput: ``tensordb.testing.stages:resize`` (a 2× nearest-neighbour upscale
   to float32, 28×28 uint8 → 56×56 float32; trusted through the settings) over N samples (10,000;
   ``--quick`` 2,000), as a backfill (stage registered after the samples were stored, ``backfill``,
   until its status is ``done``) and live (samples published after registration, first publish →
   all derived: the ingest of the sources is part of it). Baseline: the same function in a plain
   loop in this process that reads the source documents and their arrays from MongoDB
   (``sample_arrays``), calls it, and writes exactly what the stage stores (``stored_arrays`` and
   ``sample_document`` of ``streams.ingest``: 56×56 float32 is 12 KiB, kept inline in the document;
   ``Store.write_blobs`` of larger arrays + ``insert_many``, 200 at a time). Goal ≥ 0.7×. Then live with two
   processor instances against one (the stage's consumer group shares ``data-imported``'s
   partitions).
2. Streaming inference at batch 64: N requests of 64 instances (``array``: base64 bytes; and fewer
   as ``instances`` JSON) published to ``predict-requests``, answered by ``tensordb predictor
   --max-batch 64``; first publish → last answer read back from the predictions topic. Baseline:
   ``predict_on_batch`` (and ``model.predict``) of the same batches in a loop here. Goal ≥ 0.8×.
   Then the latency (request published → its answer read here, one clock) of 64-instance requests
   at half the measured maximum request rate. Goal: p99 ≤ 100 ms.
3. A promotion swap under a steady load of single-instance requests: lost (no answer), duplicated
   (more than one different answer for a request id), answered by the old and the new version.
   Goal: 0 lost, 0 duplicated.

Every client runs with TensorDB's defaults except this script's own reader of the predictions
topic, which fetches with ``fetch.wait.max.ms`` 10 (the broker holds a fetch for its whole wait).

    .venv/bin/python bench/stream_stages.py [--quick] [--samples N] [--requests N] [--skip stage|predict|swap]
"""

from __future__ import annotations

import argparse
import base64
import gc
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from harness import (
    CpuMeter,
    GoalRow,
    Pids,
    Timing,
    children_cwd,
    cpu_shares,
    make_console,
    ms,
    pct,
    print_goal_rows,
    project,
    servers,
    us,
)

from streams.ingest import sample_document, stored_arrays
from tensordb import records
from tensordb.client import TensorDB
from tensordb.config import Settings, Topic
from tensordb.data.loader import sample_arrays
from tensordb.data.samples import SAMPLES, SampleLineage, SampleOrigin, dtype_name, sample_fields
from tensordb.infra.bus import Publisher, Received, make_consumer
from tensordb.infra.store import Store
from tensordb.models.registry import ModelRegistry
from tensordb.models.serving import load_version
from tensordb.records import Schema
from tensordb.stages.derive import source_view
from tensordb.stages.stages import Stages
from tensordb.testing import ChildProcess, predictor_process, processors_process
from tensordb.testing.stages import resize

console = make_console(200)

STAGES_MODULE, MODELS_MODULE = "tensordb.testing.stages", "tensordb.testing.models"
RESIZE = f"{STAGES_MODULE}:resize"
SHAPE = (28, 28)
LOOP_CHUNK = 200  # the baseline's read/write batch: the processors' CHUNK
WARM = 40  # samples / requests that warm a path up before it is timed
SETTLE = 3.0  # s: between the warm-up waves of the live stage runs (consumer groups settle)
BATCH = 64
MODEL, CLASSES = "digits28", 10
STAGE_GOAL, INFERENCE_GOAL, P99_GOAL = 0.7, 0.8, 0.100
READER_FETCH_WAIT_MS = 10


# -- helpers ------------------------------------------------------------------------------------------


def signed(seconds: float) -> str:
    """'120 ms after' / '58 ms before' (the promote call)."""
    return "n/a" if math.isnan(seconds) else f"{ms(abs(seconds))} {'after' if seconds >= 0 else 'before'}"


def images(seed: int, count: int) -> np.ndarray:
    """Uniform random 28×28 uint8 pixels."""
    return np.random.default_rng(seed).integers(0, 256, (count, *SHAPE), dtype=np.uint8)


def pid_of(child: ChildProcess) -> int | None:
    return child.process.pid if child.process is not None else None


def check_alive(children: list[ChildProcess]) -> None:
    for child in children:
        if child.process is not None and child.process.poll() is not None:
            raise RuntimeError(f"{child.name} exited (code {child.process.returncode}); see {child.log_path}")


@contextmanager
def started(children: list[ChildProcess]) -> Iterator[list[ChildProcess]]:
    """Start the children (each ready when start returns); stop them all at the end."""
    with ExitStack() as stack:
        for child in children:
            stack.callback(child.stop)
        for child in children:
            child.start(timeout=180)
        yield children


def wait_until(
    condition: Callable[[], bool], timeout: float, children: list[ChildProcess], what: str, poll: float = 0.02
) -> float:
    """Poll ``condition`` until true; returns perf_counter() then. Raises after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        check_alive(children)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not done after {timeout:.0f} s")
        time.sleep(poll)
    return time.perf_counter()


# -- 1. transform stages -----------------------------------------------------------------------------


def stage_spec(source: str, output: str) -> dict[str, Any]:
    return {"name": "resize", "input": {"filter": {"dataset": source}}, "function": RESIZE, "output": {"dataset": output}}


def publish_images(db: TensorDB, dataset: str, prefix: str, pixels: np.ndarray) -> None:
    db.publish_samples(
        {"arrays": image, "dataset": dataset, "labels": {"y": index % 10}, "sample_id": f"{prefix}-{index:06d}"}
        for index, image in enumerate(pixels)
    )


def resize_loop(store: Store, source: str, output: str, parts: dict[str, float] | None = None, prefix: str = "loop") -> int:
    """The baseline: what a user writes without stages. Read the source samples 200 at a time in
    ``_id`` order with their arrays (``sample_arrays``), call the function, and write the derived
    documents and blobs exactly as the stage builds them (``stored_arrays``, ``sample_document``)."""
    collection, after, done = store[SAMPLES], None, 0
    origin: SampleOrigin = {"topic": "bench-loop", "partition": 0, "offset": 0}
    while True:
        query = {"dataset": source} if after is None else {"dataset": source, "_id": {"$gt": after}}
        clock = time.perf_counter()
        documents = list(collection.find(query).sort("_id", 1).limit(LOOP_CHUNK))
        if not documents:
            return done
        read = sample_arrays(store, documents)
        now = datetime.now(UTC)
        blobs, derived = [], []
        function = 0.0
        tick = time.perf_counter()
        for document, arrays in zip(documents, read, strict=True):
            started = time.perf_counter()
            out = resize(source_view(document, arrays))
            function += time.perf_counter() - started
            x, sample_id = np.ascontiguousarray(out["arrays"]["x"]), f"{prefix}:{document['_id']}"
            lineage: SampleLineage = {"derived_from": document["_id"], "stage": "loop", "stage_version": 1}
            fields = sample_fields(dataset=output, labels=out["labels"], source="bench-loop", lineage=lineage)
            stored, sample_blobs = stored_arrays(
                store, output, sample_id, {"x": (dtype_name(x.dtype), list(x.shape), x.tobytes())}
            )
            blobs += sample_blobs
            derived.append(sample_document(store, fields, sample_id, stored, now, origin, announced=True))
        built = time.perf_counter()
        store.write_blobs(blobs)
        collection.insert_many(derived, ordered=False)
        if parts is not None:
            for name, seconds in (("read", tick - clock), ("function", function), ("documents", built - tick - function),
                                  ("write", time.perf_counter() - built)):  # fmt: skip
                parts[name] = parts.get(name, 0.0) + seconds
        after, done = documents[-1]["_id"], done + len(documents)


def same_output(store: Store, source_id: str, derived_id: str, loop_id: str) -> bool:
    """The stage's derived array equals the loop's (the baselines did the same work)."""
    documents = list(store[SAMPLES].find({"_id": {"$in": [derived_id, loop_id]}}))
    arrays = {document["_id"]: arrays["x"] for document, arrays in zip(documents, sample_arrays(store, documents), strict=True)}
    return len(arrays) == 2 and np.array_equal(arrays[derived_id], arrays[loop_id])


@dataclass
class StageRun:
    """One measured stage run (TensorDB side)."""

    seconds: float
    samples: int
    meter: CpuMeter
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.samples / self.seconds


def bench_backfill(base: Settings, pids: Pids, log_dir: Path, count: int) -> tuple[StageRun, Timing, StageRun]:
    """Samples stored first (their ingest timed: context), then the loop baseline here, then the
    stage registered and backfilled. Returns (backfill, baseline, ingest alone)."""
    console.print(f"\n[bold]1a. backfill[/]: {count:,} samples stored, then the loop here, then register + backfill")
    with project(base, "stage-backfill") as settings, TensorDB(settings) as db:
        processors = processors_process(settings, log_dir / f"processors-{settings.project}.log")
        with started([processors]):
            all_pids = {**pids, "processors": pid_of(processors)}
            samples = db.store[SAMPLES]
            publish_images(db, "warm", "warm", images(0, WARM))
            wait_until(lambda: samples.count_documents({"dataset": "warm"}) == WARM, 120, [processors], "warm-up ingest", 0.05)
            with CpuMeter(all_pids) as ingest_meter:
                publish_images(db, "raw", "raw", images(1, count))
                wait_until(lambda: samples.count_documents({"dataset": "raw"}) == count, 600, [processors], "ingest", 0.05)
            ingest = StageRun(ingest_meter.wall, count, ingest_meter)
            console.print(
                f"  ingest alone (publish → stored): {ingest.rate:,.0f}/s in {ingest.seconds:.2f} s; {cpu_shares(ingest_meter)}"
            )
            # the loop runs before and after the backfill (the database grows by a third each time): its rate is the mean
            baseline = Timing({key: all_pids.get(key) for key in ("mongod", "processors")})
            loop_parts: dict[str, float] = {}

            def loop(run: str) -> None:
                done = baseline.run(lambda: resize_loop(db.store, "raw", f"resized-{run}", loop_parts, run))
                assert done == count and samples.count_documents({"dataset": f"resized-{run}"}) == count
                console.print(f"  loop here ({run}): {count / baseline.seconds[-1]:,.0f}/s in {baseline.seconds[-1]:.2f} s")

            loop("loop-before")
            db.register_stage(stage_spec("raw", "resized"))
            stages = Stages(db.store)
            claimed: list[float] = []

            def backfilled() -> bool:
                state = stages.get("resize")["backfill"] or {}
                if not claimed and state.get("status") in ("running", "done"):
                    claimed.append(time.perf_counter())
                return state.get("status") == "done"

            with CpuMeter(all_pids) as meter:
                began = time.perf_counter()
                db.backfill_stage("resize")
                wait_until(backfilled, 600, [processors], "backfill")
            derived = samples.count_documents({"dataset": "resized"})
            if derived != count:
                raise RuntimeError(f"backfill derived {derived} samples of {count}")
            run = StageRun(meter.wall, count, meter, {"claimed": claimed[0] - began})
            loop("loop-after")
            console.print(f"  loop here: {baseline.rate:,.0f}/s (mean); {baseline.describe()}")
            assert same_output(db.store, "raw-000007", "resize.v1:raw-000007:0", "loop-before:raw-000007")
            run.notes["loop"] = {name: seconds / (2 * count) for name, seconds in loop_parts.items()}
            run.notes["stage"], run.notes["store"] = stage_breakdown(settings, db.store, min(count, 2000))
            console.print(
                "  per sample, the loop: " + ", ".join(f"{name} {us(value)}" for name, value in run.notes["loop"].items())
                + "; the stage's steps run here: " + ", ".join(f"{name} {us(value)}" for name, value in run.notes["stage"].items())
                + "; store + announce: " + ", ".join(f"{name} {us(value)}" for name, value in run.notes["store"].items())
            )  # fmt: skip
            console.print(
                f"  backfill: {run.rate:,.0f}/s in {run.seconds:.2f} s (claimed after {ms(run.notes['claimed'])}; "
                f"{count / (run.seconds - run.notes['claimed']):,.0f}/s from the claim); {cpu_shares(meter)}"
            )
    return run, baseline, ingest


def stage_breakdown(settings: Settings, store: Store, count: int) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per sample of the steps of ``apply_stage`` run here, 200 samples at a time on the
    stored ``raw`` samples (a stage of its own, so everything is derived anew): reading the
    documents and arrays (as the backfill does), the function alone, ``derive`` (the function and
    the derived samples' checks), preparing their documents and blobs (hashes, fingerprint),
    ``store_samples`` (blobs and documents written) and ``announce`` (the ``data-imported`` events
    published and flushed); and the parts of ``store_samples`` (timed through wrappers)."""
    import streams.ingest as ingest
    from streams.ingest import announce, store_samples
    from streams.processing import ProcessorContext
    from streams.stages import _prepared
    from tensordb.stages.derive import derive
    from tensordb.stages.spec import parse_stage

    spec = parse_stage(
        {"name": "here", "input": {"filter": {"dataset": "raw"}}, "function": RESIZE, "output": {"dataset": "here"}}
    )
    context = ProcessorContext(settings, processor="bench")
    parts = {"read": 0.0, "function": 0.0, "derive (incl. function)": 0.0, "prepare": 0.0, "store": 0.0, "announce": 0.0}
    timed = Timed()
    original_insert = ingest.insert_new
    ingest.insert_new = timed.wrap("insert_new", original_insert)
    context.store.write_blobs = timed.wrap("write_blobs", context.store.write_blobs)  # type: ignore[method-assign]

    def apply(query: dict[str, Any], counted: bool) -> str | None:
        clock = time.perf_counter()
        chunk = list(store[SAMPLES].find(query).sort("_id", 1).limit(LOOP_CHUNK))
        if not chunk:
            return None
        arrays = sample_arrays(store, chunk)
        read = time.perf_counter()
        for document, read_arrays in zip(chunk, arrays, strict=True):
            resize(source_view(document, read_arrays))
        function = time.perf_counter()
        derived = [sample for document, read_arrays in zip(chunk, arrays, strict=True)
                   for sample in derive(spec, resize, document, read_arrays)]  # fmt: skip
        derived_at = time.perf_counter()
        now = datetime.now(UTC)
        prepared = [_prepared(context, "here", 1, sample, now) for sample in derived]
        prepared_at = time.perf_counter()
        stored, _ = store_samples(context, prepared)
        stored_at = time.perf_counter()
        announce(context, stored, now)
        if counted:
            took = (read - clock, function - read, derived_at - function, prepared_at - derived_at, stored_at - prepared_at,
                    time.perf_counter() - stored_at)  # fmt: skip
            for name, seconds in zip(parts, took, strict=True):
                parts[name] += seconds
        return chunk[-1]["_id"]

    done = 0
    try:
        apply({"dataset": "warm"}, counted=False)  # connections open, code paths warm
        timed.seconds.clear()
        after = apply({"dataset": "raw"}, counted=True)
        done = LOOP_CHUNK
        while after is not None and done < count:
            after = apply({"dataset": "raw", "_id": {"$gt": after}}, counted=True)
            done += LOOP_CHUNK
    finally:
        ingest.insert_new = original_insert
        context.close()
    done = min(done, count)
    return {name: seconds / done for name, seconds in parts.items()}, {
        name: seconds / done for name, seconds in timed.seconds.items()
    }


def assignment(settings: Settings, group: str) -> list[list[int]]:
    """The partitions each member of ``group`` holds, or [] when the broker does not describe groups."""
    from confluent_kafka.admin import AdminClient

    try:
        described = AdminClient(settings.kafka_config()).describe_consumer_groups([group])[group].result(timeout=10)
        return sorted(sorted(tp.partition for tp in member.assignment.topic_partitions) for member in described.members)
    except Exception:  # noqa: BLE001 - a broker without DescribeGroups: the row says what the bound is
        return []


def imported_partitions(settings: Settings, dataset: str) -> tuple[dict[int, int], dict[int, int]]:
    """Source samples of ``dataset``, and the events announcing them, per partition of
    ``data-imported`` (read from its start)."""
    consumer = make_consumer(settings, f"bench-partitions-{time.monotonic_ns()}", [Topic.DATA_IMPORTED])
    counts: Counter[int] = Counter()
    events: Counter[int] = Counter()
    quiet_since, seen = time.monotonic() + 20.0, False  # up to 20 s for the group to join, then 2 s of quiet
    try:
        while time.monotonic() - quiet_since < 2.0:
            messages = consumer.consume(500, 0.5)
            for message in messages:
                if message.error() is None:
                    quiet_since, seen = time.monotonic(), True
                    record = orjson.loads(message.value())
                    if dataset in record.get("datasets", []):
                        events[message.partition()] += 1
                        counts[message.partition()] += sum(
                            sample_id.startswith(f"{dataset}-") for sample_id in record["sample_ids"]
                        )
            if not seen and time.monotonic() > quiet_since:
                break
    finally:
        consumer.close()
    return dict(sorted(counts.items())), dict(sorted(events.items()))


def bench_live(base: Settings, pids: Pids, log_dir: Path, count: int, instances: int) -> StageRun:
    """The stage registered first, warmed up, then N samples published: first publish → all derived."""
    console.print(f"\n[bold]1b. live, {instances} processor instance(s)[/]: {count:,} samples published after registration")
    with project(base, f"stage-live{instances}") as settings, TensorDB(settings) as db:
        children = [processors_process(settings, log_dir / f"processors-{settings.project}-{n}.log") for n in range(instances)]
        with started(children):
            all_pids = {
                **pids,
                **{f"processors-{n}" if instances > 1 else "processors": pid_of(c) for n, c in enumerate(children)},
            }
            samples, stages = db.store[SAMPLES], Stages(db.store)
            db.register_stage(stage_spec("raw", "resized"))
            # every instance's timer has started the stage's consumer (else a late one would join the group, and
            # rebalance it, during the timed run); then two waves of warm-up samples, SETTLE seconds apart
            wait_until(lambda: all("stage resize running" in child.log() for child in children), 60, children, "stage start", 0.2)
            for wave in range(2):
                time.sleep(SETTLE)
                publish_images(db, "raw", f"warm{wave}", images(wave, WARM))
                wait_until(
                    lambda wanted=(wave + 1) * WARM: samples.count_documents({"dataset": "resized"}) == wanted,
                    120, children, "warm-up", 0.05,
                )  # fmt: skip
            marks: dict[str, float] = {}
            polls = [0]

            def derived_all() -> bool:
                polls[0] += 1
                if (
                    "sources" not in marks
                    and polls[0] % 5 == 0
                    and samples.count_documents({"dataset": "raw"}) == count + 2 * WARM
                ):
                    marks["sources"] = time.perf_counter()
                derived = stages.get("resize")["counters"]["derived"]
                if "first" not in marks and derived > 2 * WARM:
                    marks["first"] = time.perf_counter()
                return derived >= count + 2 * WARM

            with CpuMeter(all_pids) as meter:
                began = time.perf_counter()
                publish_images(db, "raw", "raw", images(2, count))
                marks["published"] = time.perf_counter()
                wait_until(derived_all, 600, children, "live stage")
            derived = samples.count_documents({"dataset": "resized"})
            if derived != count + 2 * WARM:
                raise RuntimeError(f"live stage derived {derived - 2 * WARM} samples of {count}")
            notes = {key: value - began for key, value in marks.items()}
            notes["partitions"], notes["events"] = imported_partitions(settings, "raw")
            notes["topic_partitions"] = settings.topic_partitions
            notes["assignment"] = assignment(settings, settings.processor_group("stage-resize"))
            run = StageRun(meter.wall, count, meter, notes)
            console.print(
                f"  {run.rate:,.0f}/s in {run.seconds:.2f} s; published (acknowledged) after {notes['published']:.2f} s, "
                f"all sources stored after {notes.get('sources', math.nan):.2f} s, the stage's first batch counted after "
                f"{notes.get('first', math.nan):.2f} s; {cpu_shares(meter)}"
            )
            console.print(
                f"  data-imported: source samples per partition {notes['partitions']} in {notes['events']} events; the stage's "
                f"group assigns "
                f"{notes['assignment'] or 'unknown (the broker did not say)'}"
            )
    return run


def stage_rows(backfill: StageRun, baseline: Timing, ingest: StageRun, live: StageRun, two: StageRun | None) -> list[GoalRow]:
    loop_rate = baseline.rate
    loop_text = f"loop here {loop_rate:,.0f}/s (mean of {baseline.seconds[0]:.2f} s before the backfill, {baseline.seconds[1]:.2f} s after)"
    loop_cpu = baseline.describe()
    live_notes = live.notes
    stage_share = live.seconds - live_notes.get("sources", live.seconds)
    loop_parts, stage_parts, store_parts = backfill.notes["loop"], backfill.notes["stage"], backfill.notes["store"]
    loop_total, stage_total = sum(loop_parts.values()), sum(stage_parts.values()) - stage_parts["function"]
    per_sample = (
        "per sample, the loop: " + " + ".join(f"{name} {us(value)}" for name, value in loop_parts.items())
        + f" = {us(loop_total)}; the stage's steps run here: read {us(stage_parts['read'])} + derive "
        f"{us(stage_parts['derive (incl. function)'])} (the function {us(stage_parts['function'])}; the rest: the derived "
        f"samples checked) + prepare {us(stage_parts['prepare'])} (documents and blobs: sha256 + xxh3, fingerprint) + store "
        f"{us(stage_parts['store'])} (write_blobs {us(store_parts.get('write_blobs', math.nan))}; insert_new "
        f"{us(store_parts.get('insert_new', math.nan))}) + announce {us(stage_parts['announce'])} (publish + flush the events) "
        f"= {us(stage_total)}: {loop_total / stage_total:.2f}× the loop's rate in one process"
    )  # fmt: skip
    rows = [
        GoalRow(
            f"1. stage resize 28×28 → 56×56 float32, live, 1 processor: first publish → all {live.samples:,} derived",
            f"{live.rate:,.0f}/s ({live.seconds:.2f} s)",
            loop_text,
            f"{live.rate / loop_rate:.2f}×",
            f"≥ {STAGE_GOAL}×",
            live.rate / loop_rate >= STAGE_GOAL,
            f"ingest of the sources is part of it: alone (no stage) {ingest.rate:,.0f}/s; here all sources stored after "
            f"{live_notes.get('sources', math.nan):.2f} s, the last derived {stage_share:.2f} s later; ingest and the stage "
            f"share the processors' one interpreter; {cpu_shares(live.meter)}; loop: {loop_cpu}; {per_sample}",
        ),
        GoalRow(
            f"1. stage, backfill, 1 processor: request → done ({backfill.samples:,})",
            f"{backfill.rate:,.0f}/s ({backfill.seconds:.2f} s)",
            loop_text,
            f"{backfill.rate / loop_rate:.2f}×",
            f"≥ {STAGE_GOAL}×",
            backfill.rate / loop_rate >= STAGE_GOAL,
            f"claimed {ms(backfill.notes['claimed'])} after the request (the runner looks every 1 s), "
            f"{backfill.samples / (backfill.seconds - backfill.notes['claimed']):,.0f}/s from the claim; {per_sample}; "
            f"{cpu_shares(backfill.meter)}",
        ),
    ]
    if two is not None and two.notes["partitions"]:
        partitions = two.notes["partitions"]
        total = sum(partitions.values()) or 1
        shares = sorted((count / total for count in partitions.values()), reverse=True)
        heavier = sum(shares[:2]) if len(shares) > 2 else 1.0
        best_pair = min(max(shares[0], sum(shares[1:])), max(sum(shares[:2]), sum(shares[2:])))
        held = two.notes.get("assignment") or []
        if held:
            loads = [sum(partitions.get(p, 0) for p in member) / total for member in held]
            actual = f"; this run's assignment {held}: {' / '.join(f'{load:.0%}' for load in loads)} of the samples"
        else:
            actual = ""
        rows.append(
            GoalRow(
                "1. stage, live: 2 processor instances vs 1",
                f"{two.rate:,.0f}/s ({two.seconds:.2f} s)",
                f"1 instance {live.rate:,.0f}/s",
                f"{two.rate / live.rate:.2f}×",
                "(context)",
                None,
                f"data-imported: {sum(two.notes['events'].values())} events announced the sources (one per ingest batch), "
                f"{len(partitions)} of its {two.notes['topic_partitions']} partitions hold {', '.join(f'{s:.0%}' for s in shares)} of the "
                f"samples (events have no key: each goes to a random partition); the stage's group splits the partitions 2 + 1, "
                f"so one instance has at least {best_pair:.0%} of the stage's work ({heavier:.0%} in the worst split; ingest, "
                f"keyed by sample id, splits evenly){actual}; {cpu_shares(two.meter)}",
            )
        )
    return rows


def bench_stages(base: Settings, pids: Pids, log_dir: Path, args: argparse.Namespace) -> list[GoalRow]:
    backfill, baseline, ingest = bench_backfill(base, pids, log_dir, args.samples)
    live = bench_live(base, pids, log_dir, args.samples, 1)
    two = bench_live(base, pids, log_dir, args.samples, 2) if not args.quick or args.two else None
    return stage_rows(backfill, baseline, ingest, live, two)


# -- 2. and 3. streaming inference ----------------------------------------------------------------------


def request(request_id: str, pixels: np.ndarray, form: str) -> dict[str, Any]:
    """A predict request of ``pixels`` (instances × 28 × 28 uint8) as an ``array`` or as ``instances``."""
    record: dict[str, Any] = {"schema": Schema.PREDICT_REQUEST, "request_id": request_id, "model": MODEL}
    if form == "array":
        record["array"] = {"dtype": "uint8", "shape": list(pixels.shape), "data": base64.b64encode(pixels.tobytes()).decode()}
    else:
        record["instances"] = pixels.tolist()
    return record


class Answers:
    """Every answer on the predictions topic, with when it arrived here (time.time()), read in the
    background by a consumer fetching with a 10 ms broker wait."""

    def __init__(self, settings: Settings) -> None:
        self.arrived: dict[str, list[tuple[float, bytes]]] = defaultdict(list)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._consumer = make_consumer(
            settings, f"bench-answers-{time.monotonic_ns()}", [Topic.PREDICTIONS], **{"fetch.wait.max.ms": READER_FETCH_WAIT_MS}
        )
        self._thread = threading.Thread(target=self._read, name="bench-answers", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            messages = self._consumer.consume(1000, 0.05)
            now = time.time()
            with self._lock:
                for message in messages:
                    if message.error() is None and message.key():
                        self.arrived[message.key().decode()].append((now, message.value()))

    def answered(self, ids: list[str]) -> int:
        with self._lock:
            return sum(request_id in self.arrived for request_id in ids)

    def first(self, request_id: str) -> tuple[float, bytes]:
        with self._lock:
            return self.arrived[request_id][0]

    def all(self, request_id: str) -> list[tuple[float, bytes]]:
        with self._lock:
            return list(self.arrived.get(request_id, []))

    def wait(self, ids: list[str], timeout: float, children: list[ChildProcess]) -> float:
        """perf_counter() when every id has an answer (raises after ``timeout``)."""
        return wait_until(lambda: self.answered(ids) == len(ids), timeout, children, f"answers to {len(ids)} requests", 0.005)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()


@dataclass
class Inference:
    """Everything the inference rows are made of."""

    baseline: Timing  # predict_on_batch
    predict: Timing  # model.predict
    array: dict[str, Any]
    instances: dict[str, Any]
    breakdown: dict[str, float]
    latency: dict[str, Any] | None = None
    swap: dict[str, Any] | None = None


def batching(store: Store, ids: list[str]) -> dict[str, float]:
    """How the predictor grouped ``ids``: one ``stored_at`` per batch (all answers of a batch are
    stored at once); batches, requests per batch, the gap between consecutive batches."""
    stamps = Counter(document["stored_at"] for document in store["predictions"].find({"_id": {"$in": ids}}, {"stored_at": 1}))
    ordered = sorted(stamps)
    gaps = [(later - earlier).total_seconds() for earlier, later in zip(ordered, ordered[1:], strict=False)]
    return {"batches": len(stamps), "per_batch": len(ids) / max(1, len(stamps)), "gap_p50": pct(gaps, 50)}


def save_versions(store: Store, publisher: Publisher, units: int) -> tuple[int, int]:
    import keras

    from tensordb.testing.models import small_classifier

    with ModelRegistry(store, publisher) as registry:
        versions = []
        for seed in (1, 2):
            keras.utils.set_random_seed(seed)
            model = small_classifier(units=units, input_shape=SHAPE, classes=CLASSES)
            versions.append(int(registry.save(model, MODEL)["version"]))  # Keras JSON, rebuilt without the builder
        registry.promote(MODEL, versions[0])
    return versions[0], versions[1]


def baselines(store: Store, publisher: Publisher, batches: np.ndarray) -> tuple[Timing, Timing]:
    """predict_on_batch and model.predict of the same batches here, on the version the predictor loads."""
    with ModelRegistry(store, publisher) as registry:
        model = load_version(registry, MODEL, registry.alias(MODEL))
    for batch in batches[:5]:
        model.predict_on_batch(batch.astype("float32"))
        model.predict(batch.astype("float32"), verbose=0)

    def on_batch() -> int:
        for batch in batches:
            np.asarray(model.predict_on_batch(batch.astype("float32")))
        return len(batches) * BATCH

    def predict() -> int:  # ~60 ms a call: 50 batches are enough for a rate
        for batch in batches[:50]:
            np.asarray(model.predict(batch.astype("float32"), verbose=0))
        return min(50, len(batches)) * BATCH

    timings = {"predict_on_batch": Timing(), "predict": Timing()}
    for _ in range(3):
        for name, work in (("predict_on_batch", on_batch), ("predict", predict)):
            timings[name].run(work)
    return timings["predict_on_batch"], timings["predict"]


class Timed:
    """Wraps callables so that the seconds spent in them add up under a name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started

        return timed


def breakdown(settings: Settings, batches: np.ndarray, model_seconds: float) -> dict[str, float]:
    """Seconds per request of 64 instances of the predictor's own steps, run here on batches of
    64 requests (what it takes at once when requests queue): encode (the client's), decode +
    validate, the inputs as an array, ``_compute`` (the inputs, the model, the answers' lists),
    and in ``answer`` its MongoDB calls and publishing (timed through wrappers), for ``array`` and
    ``instances`` JSON requests. ``model_seconds``: predict_on_batch of 64 here (the baseline)."""
    import workers.predictor as module

    predictor = module.Predictor(settings, MODEL)
    timed = Timed()
    original_insert = module.insert_new
    module.insert_new = timed.wrap("insert", original_insert)  # type: ignore[assignment]
    for name in ("find", "update_many"):
        setattr(predictor.answers, name, timed.wrap(name, getattr(predictor.answers, name)))
    for name in ("publish", "flush"):
        setattr(predictor.publisher, name, timed.wrap(name, getattr(predictor.publisher, name)))
    try:
        predictor.holder.refresh()
        serving = predictor.holder.current
        assert serving is not None
        serving.model.predict_on_batch = timed.wrap("predict_on_batch", serving.model.predict_on_batch)
        result: dict[str, float] = {"model": model_seconds}
        topic = settings.topic(Topic.PREDICT_REQUESTS)

        def received(tag: str, form: str) -> tuple[list[dict[str, Any]], list[bytes], list[Received]]:
            requests = [request(f"bd-{tag}-{n}", batch, form) for n, batch in enumerate(batches[:BATCH])]
            values = [records.encode(record, Schema.PREDICT_REQUEST) for record in requests]
            stamp = int(time.time() * 1000)
            return requests, values, [
                Received(topic, 0, n, r["request_id"].encode(), value, r, None, stamp)
                for n, (r, value) in enumerate(zip(requests, values, strict=True))
            ]  # fmt: skip

        predictor.answer(received("warm", "array")[2][:4])  # the producer's connections, the code paths
        samples: dict[str, list[float]] = defaultdict(list)
        for rep in range(3):  # the median of 3 of each
            for form in ("array", "instances"):
                requests, values, batch = received(f"{form}-{rep}", form)
                started = time.perf_counter()
                for record in requests:
                    records.encode(record, Schema.PREDICT_REQUEST)
                samples[f"{form}: encode"].append((time.perf_counter() - started) / BATCH)
                started = time.perf_counter()
                decoded = [records.decode(value, Schema.PREDICT_REQUEST) for value in values]
                samples[f"{form}: decode"].append((time.perf_counter() - started) / BATCH)
                started = time.perf_counter()
                for record in decoded:
                    predictor._instances(record, serving)
                samples[f"{form}: inputs"].append((time.perf_counter() - started) / BATCH)
                if form == "array":  # _compute concatenates the whole batch once per max_batch instances
                    valid = [predictor._instances(record, serving) for record in decoded]
                    started = time.perf_counter()
                    for start in range(0, sum(len(part) for part in valid), BATCH):
                        np.concatenate(valid)[start : start + BATCH]
                    samples["concatenations"].append((time.perf_counter() - started) / BATCH)
                    started = time.perf_counter()
                    np.concatenate(valid)
                    samples["one concatenation"].append((time.perf_counter() - started) / BATCH)
                samples[f"{form}: bytes"].append(statistics.fmean(len(value) for value in values))
                timed.seconds.clear()
                started = time.perf_counter()
                predictor._compute(serving, batch)
                samples[f"{form}: compute"].append((time.perf_counter() - started) / BATCH)
                samples[f"{form}: model in compute"].append(timed.seconds["predict_on_batch"] / BATCH)
                timed.seconds.clear()
                started = time.perf_counter()
                predictor.answer(batch)
                samples[f"{form}: answer"].append((time.perf_counter() - started) / BATCH)
                if form == "array":
                    for name, seconds in timed.seconds.items():
                        samples[f"answer: {name}"].append(seconds / BATCH)
        result |= {name: statistics.median(values) for name, values in samples.items()}
        return result
    finally:
        module.insert_new = original_insert  # type: ignore[assignment]
        predictor.runtime.close()


def throughput(
    publisher: Publisher, answers: Answers, predictor: ChildProcess, pids: Pids, form: str, batches: np.ndarray, tag: str
) -> dict[str, Any]:
    """Publish every batch as one request, as fast as the publisher takes them; first publish → last answer here."""
    prepared = [request(f"{tag}-{n:05d}", batch, form) for n, batch in enumerate(batches)]
    ids = [record["request_id"] for record in prepared]
    sent: dict[str, float] = {}
    with CpuMeter(pids) as meter:
        began_wall, began = time.time(), time.perf_counter()
        for record in prepared:
            sent[record["request_id"]] = time.time()
            publisher.publish(Topic.PREDICT_REQUESTS, record, key=record["request_id"])
        publisher.flush()
        published = time.perf_counter() - began
        answers.wait(ids, max(120, len(ids)), [predictor])
    last = max(answers.first(request_id)[0] for request_id in ids)
    seconds = last - began_wall
    served = [orjson.loads(answers.first(request_id)[1]) for request_id in ids]
    assert all(len(answer.get("outputs", [])) == BATCH for answer in served), "an answer without its 64 outputs"
    predictor_latency = [answer["latency_ms"] / 1e3 for answer in served]
    result = {
        "seconds": seconds, "requests": len(ids), "rate": len(ids) * BATCH / seconds, "published": published, "meter": meter,
        "predictor_latency_p50": pct(predictor_latency, 50),
    }  # fmt: skip
    console.print(
        f"  {form}: {len(ids)} requests × {BATCH}: {result['rate']:,.0f} instances/s ({seconds:.2f} s; all published and "
        f"acknowledged after {published:.2f} s); {cpu_shares(meter)}"
    )
    return result


def steady(
    publisher: Publisher,
    answers: Answers,
    predictor: ChildProcess,
    pids: Pids,
    rate: float,
    seconds: float,
    make: Callable[[int], dict[str, Any]],
    during: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Publish ``make(n)`` at ``rate`` per second for ``seconds`` (open loop, from a thread);
    ``during(t)`` runs here meanwhile (t: the run's start, time.time()). Returns when each was sent
    and the CPU used; waits for every answer (or 60 s past the end: the rest are lost)."""
    total = max(1, int(rate * seconds))
    prepared = [make(n) for n in range(total)]
    sent: dict[str, float] = {}
    lag: list[float] = []

    def send() -> None:
        start = time.perf_counter()
        for n, record in enumerate(prepared):
            due = start + n / rate
            if (wait := due - time.perf_counter()) > 0:
                time.sleep(wait)
            else:
                lag.append(-wait)
            sent[record["request_id"]] = time.time()
            publisher.publish(Topic.PREDICT_REQUESTS, record, key=record["request_id"])
        publisher.flush()

    with CpuMeter(pids) as meter:
        began = time.time()
        sender = threading.Thread(target=send, name="bench-sender", daemon=True)
        sender.start()
        if during is not None:
            during(began)
        sender.join()
    ids = [record["request_id"] for record in prepared]
    try:
        answers.wait(ids, 60, [predictor])
    except RuntimeError:
        pass  # counted as lost
    return {"ids": ids, "sent": sent, "meter": meter, "late_sends": sum(value > 0.01 for value in lag)}


def latencies(answers: Answers, run: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Request published → answer read here, and the predictor's own ``latency_ms`` (request's
    broker timestamp → answered), for the answered requests."""
    whole, own = [], []
    for request_id in run["ids"]:
        got = answers.all(request_id)
        if got:
            whole.append(got[0][0] - run["sent"][request_id])
            own.append(orjson.loads(got[0][1])["latency_ms"] / 1e3)
    return whole, own


def bench_latency(
    publisher: Publisher,
    answers: Answers,
    predictor: ChildProcess,
    pids: Pids,
    batches: np.ndarray,
    rate: float,
    seconds: float,
    tag: str = "lat",
) -> dict[str, Any]:
    console.print(f"  latency: {BATCH}-instance requests at {rate:.1f}/s (half the measured maximum) for {seconds:.0f} s")
    run = steady(
        publisher,
        answers,
        predictor,
        pids,
        rate,
        seconds,
        lambda n: request(f"{tag}-{n:05d}", batches[n % len(batches)], "array"),
    )
    whole, own = latencies(answers, run)
    run.update(latency=whole, own=own, rate=rate)
    console.print(
        f"    p50 {ms(pct(whole, 50))}, p99 {ms(pct(whole, 99))}, max {ms(max(whole, default=math.nan))} "
        f"({len(whole)} of {len(run['ids'])} answered); the predictor's own (request's broker time → answered) p50 "
        f"{ms(pct(own, 50))}, p99 {ms(pct(own, 99))}; {cpu_shares(run['meter'])}"
    )
    return run


def bench_swap(
    settings: Settings,
    publisher: Publisher,
    answers: Answers,
    predictor: ChildProcess,
    pids: Pids,
    new: int,
    rate: float,
    seconds: float,
) -> dict[str, Any]:
    """Single-instance requests at ``rate``; version ``new`` promoted a third of the way in."""
    console.print(
        f"\n[bold]3. promotion swap[/]: 1-instance requests at {rate:.0f}/s for {seconds:.0f} s; v{new} promoted at {seconds / 3:.0f} s"
    )
    pixels = images(4, 512)
    promoted: dict[str, float] = {}

    def promote(began: float) -> None:
        time.sleep(max(0.0, began + seconds / 3 - time.time()))
        with Store(settings) as store, ModelRegistry(store, publisher) as registry:
            promoted["at"] = time.time()
            registry.promote(MODEL, new)
            promoted["returned"] = time.time()

    run = steady(
        publisher, answers, predictor, pids, rate, seconds,
        lambda n: request(f"swap-{n:05d}", pixels[n % len(pixels)][np.newaxis], "array"), promote,
    )  # fmt: skip
    lost = duplicated = repeated = 0
    versions: Counter[int] = Counter()
    old_after: list[float] = []  # requests sent after the promotion but answered by the old version
    new_arrivals: list[float] = []
    old_arrivals: list[float] = []
    for request_id in run["ids"]:
        got = answers.all(request_id)
        if not got:
            lost += 1
            continue
        parsed = [orjson.loads(value) for _, value in got]
        distinct = {orjson.dumps({key: answer.get(key) for key in ("version", "outputs", "error")}) for answer in parsed}
        duplicated += len(distinct) > 1
        repeated += len(got) > 1 and len(distinct) == 1
        version = parsed[0]["version"]
        versions[version] += 1
        (new_arrivals if version == new else old_arrivals).append(got[0][0])
        if version != new and run["sent"][request_id] > promoted["at"]:
            old_after.append(run["sent"][request_id] - promoted["at"])
    with Store(settings) as store:
        stored = store["predictions"].count_documents({"_id": {"$in": run["ids"]}})
    whole, own = latencies(answers, run)
    first_new = min(new_arrivals, default=math.nan) - promoted["at"]
    last_old = max(old_arrivals, default=math.nan) - promoted["at"]
    run.update(
        lost=lost, duplicated=duplicated, repeated=repeated, versions=dict(versions), stored=stored, latency=whole, own=own,
        first_new=first_new, last_old=last_old, old_after=len(old_after), promote_call=promoted["returned"] - promoted["at"],
    )  # fmt: skip
    console.print(
        f"  {len(run['ids'])} requests: lost {lost}, duplicated {duplicated}, repeated identically {repeated}; by version "
        f"{dict(sorted(versions.items()))}; stored answers {stored}; promote → first answer by v{new} {ms(first_new)}, "
        f"last by the old version {signed(last_old)} ({len(old_after)} requests sent after the promotion answered by it); "
        f"latency p50 {ms(pct(whole, 50))}, p99 {ms(pct(whole, 99))}; {cpu_shares(run['meter'])}"
    )
    return run


def bench_inference(base: Settings, pids: Pids, log_dir: Path, args: argparse.Namespace) -> Inference:
    console.print(
        f"\n[bold]2. streaming inference[/]: small_classifier (28×28 → {args.units} relu → {CLASSES} softmax), "
        f"{args.requests} requests × {BATCH} instances"
    )
    with (
        project(base, "predict") as settings,
        Store(settings) as store,
        Publisher(settings) as publisher,
    ):
        store.ensure_indexes()
        old, new = save_versions(store, publisher, args.units)
        batches = images(3, args.requests * BATCH).reshape(args.requests, BATCH, *SHAPE)
        on_batch, predict = baselines(store, publisher, batches)
        console.print(
            f"  here: predict_on_batch {on_batch.rate:,.0f} instances/s ({on_batch.spread(1e3, 'ms', 0)} per pass); "
            f"model.predict {predict.rate:,.0f}/s"
        )
        parts = breakdown(settings, batches, on_batch.median / (on_batch.produced / BATCH))
        console.print(
            "  per request of 64 (the predictor's steps run here, 64 requests at once): "
            + ", ".join(f"{name} {us(value) if 'bytes' not in name else f'{value:,.0f} B'}" for name, value in parts.items())
        )
        predictor = predictor_process(settings, log_dir / "predictor.log", MODEL, max_batch=BATCH)
        answers = Answers(settings)
        try:
            with started([predictor]):
                all_pids = {**pids, "predictor": pid_of(predictor)}
                warm_up(publisher, answers, predictor, batches, "warm")
                array = throughput(publisher, answers, predictor, all_pids, "array", batches, "tp-array")
                array["batching"] = batching(store, [f"tp-array-{n:05d}" for n in range(len(batches))])
                few = batches[: max(4, len(batches) // 5)]
                instances = throughput(publisher, answers, predictor, all_pids, "instances", few, "tp-json")
                result = Inference(on_batch, predict, array, instances, parts)
                rate = array["rate"] / BATCH / 2
                if "latency" not in args.skip:
                    result.latency = bench_latency(publisher, answers, predictor, all_pids, batches, rate, args.latency_seconds)
                    result.latency["batching"] = batching(store, result.latency["ids"])
                if "swap" not in args.skip:
                    result.swap = bench_swap(
                        settings, publisher, answers, predictor, all_pids, new, args.swap_rate, args.swap_seconds
                    )
        finally:
            answers.close()
    return result


def warm_up(publisher: Publisher, answers: Answers, predictor: ChildProcess, batches: np.ndarray, tag: str) -> None:
    """A few requests answered: the model loaded, the consumer group joined."""
    warm = [request(f"{tag}-{n}", batches[n % len(batches)], "array") for n in range(WARM // 4)]
    for record in warm:
        publisher.publish(Topic.PREDICT_REQUESTS, record, key=record["request_id"])
    publisher.flush()
    answers.wait([record["request_id"] for record in warm], 180, [predictor])


def batch_text(stats: dict[str, float]) -> str:
    return f"{stats['batches']} batches of {stats['per_batch']:.1f} requests, p50 {ms(stats['gap_p50'])} apart"


def core_seconds(run: dict[str, Any], name: str = "predictor") -> float:
    """CPU seconds the process used per request of the run."""
    return run["meter"].cpu_seconds.get(name, math.nan) / max(1, len(run.get("ids") or []) or run.get("requests", 1))


def latency_rows(label: str, run: dict[str, Any], goal: bool) -> list[GoalRow]:
    whole, own = run["latency"], run["own"]
    limits = (
        f"at {run['rate']:.1f} requests/s ({run['rate'] * BATCH:,.0f} instances/s): {batch_text(run['batching'])}; the "
        f"predictor's own share (request's broker timestamp → answered) p50 {ms(pct(own, 50))}, p99 {ms(pct(own, 99))}; "
        f"the rest (store, publish, flush, the answer's hop to this reader, {READER_FETCH_WAIT_MS} ms fetch wait) p50 "
        f"{ms(pct([a - b for a, b in zip(whole, own, strict=True)], 50))}; {len(whole)} of {len(run['ids'])} answered; "
        f"{cpu_shares(run['meter'])}"
    )
    return [
        GoalRow(f"{label}, p50 (n={len(whole)})", ms(pct(whole, 50)), limits=limits),
        GoalRow(
            f"{label}, p99",
            ms(pct(whole, 99)),
            goal=f"≤ {ms(P99_GOAL)}" if goal else "(context)",
            met=(pct(whole, 99) <= P99_GOAL) if goal else None,
            limits=limits,
        ),
    ]


def inference_rows(result: Inference, args: argparse.Namespace) -> list[GoalRow]:
    base_rate = result.baseline.rate
    parts = result.breakdown
    array, instances = result.array, result.instances
    per_array = parts["array: decode"] + parts["array: answer"]
    per_json = parts["instances: decode"] + parts["instances: answer"]
    mongo = sum(parts.get(f"answer: {name}", 0.0) for name in ("find", "insert", "update_many"))
    publishing = sum(parts.get(f"answer: {name}", 0.0) for name in ("publish", "flush"))
    lists = parts["array: compute"] - parts["array: inputs"] - parts["array: model in compute"]
    wall_per_request = array["seconds"] / array["requests"]
    rest = (
        f"{batch_text(array['batching'])}; per request of 64, the predictor's steps run here (64 requests at once): "
        f"decode + validate {us(parts['array: decode'])}, inputs {us(parts['array: inputs'])}, the model "
        f"{us(parts['array: model in compute'])} (predict_on_batch here {us(parts['model'])}), the batch concatenated "
        f"once per 64 instances {us(parts['concatenations'])} (once: {us(parts['one concatenation'])}) and the answers' "
        f"lists {us(lists - parts['concatenations'])}, MongoDB (find, insert, update_many) {us(mongo)}, publish + "
        f"flush {us(publishing)}: {us(per_array)} in all, a ceiling of {BATCH / per_array:,.0f} instances/s; the "
        f"predictor used {ms(core_seconds(array), 1)} CPU per request against {ms(wall_per_request, 1)} of wall: the "
        f"rest is waiting (its request consumer's fetch, librdkafka's default fetch.wait.max.ms 500, which Tansu holds "
        f"to the end; the synchronous commit); {cpu_shares(array['meter'])}"
    )
    rows = [
        GoalRow(
            f"2. streaming inference, {BATCH}-instance array requests (base64 uint8, {parts['array: bytes'] / 1024:,.0f} KiB), "
            f"--max-batch {BATCH}: first publish → last answer read",
            f"{array['rate']:,.0f} instances/s ({array['requests']} requests, {array['seconds']:.2f} s)",
            f"predict_on_batch here {base_rate:,.0f}/s",
            f"{array['rate'] / base_rate:.2f}×",
            f"≥ {INFERENCE_GOAL}×",
            array["rate"] / base_rate >= INFERENCE_GOAL,
            rest,
        ),
        GoalRow(
            "2. streaming inference, the same against model.predict",
            f"{array['rate']:,.0f} instances/s",
            f"model.predict here {result.predict.rate:,.0f}/s",
            f"{array['rate'] / result.predict.rate:.2f}×",
            "(context)",
            None,
            f"model.predict costs {ms(result.predict.median / (result.predict.produced / BATCH), 2)} per batch of 64 (a "
            f"data adapter and a predict loop per call) against predict_on_batch's "
            f"{ms(result.baseline.median / (result.baseline.produced / BATCH), 2)}",
        ),
        GoalRow(
            f"2. streaming inference, {BATCH}-instance instances JSON requests ({parts['instances: bytes'] / 1024:,.0f} KiB)",
            f"{instances['rate']:,.0f} instances/s ({instances['requests']} requests)",
            f"predict_on_batch here {base_rate:,.0f}/s",
            f"{instances['rate'] / base_rate:.2f}×",
            "(context)",
            None,
            f"per request of 64: encode (the client's) {us(parts['instances: encode'])} vs {us(parts['array: encode'])} as "
            f"an array; decode + validate {us(parts['instances: decode'])} vs {us(parts['array: decode'])}; inputs (the shape "
            f"check of every number, nested lists → float32) {us(parts['instances: inputs'])} vs {us(parts['array: inputs'])}: "
            f"{us((parts['instances: decode'] + parts['instances: inputs']) / BATCH)} per instance vs "
            f"{us((parts['array: decode'] + parts['array: inputs']) / BATCH)}; a ceiling of {BATCH / per_json:,.0f} "
            f"instances/s in one process; {cpu_shares(instances['meter'])}",
        ),
    ]
    if result.latency is not None:
        rows += latency_rows(f"2. latency, {BATCH}-instance array requests at half the maximum", result.latency, True)
    if result.swap is not None:
        run = result.swap
        versions = ", ".join(f"v{version}: {count}" for version, count in sorted(run["versions"].items()))
        context = (
            f"{len(run['ids'])} requests at {args.swap_rate:.0f}/s; answered by {versions}; promote → first answer by the new "
            f"version {ms(run['first_new'])}, the last answer by the old {signed(run['last_old'])} ({run['old_after']} sent after the "
            f"promotion answered by the old: swapped between batches once loaded); stored answers {run['stored']}; "
            f"latency p50 {ms(pct(run['latency'], 50))}, p99 {ms(pct(run['latency'], 99))}; {cpu_shares(run['meter'])}"
        )
        rows += [
            GoalRow(
                "3. promotion swap under load: lost (no answer)", str(run["lost"]), goal="0", met=run["lost"] == 0, limits=context
            ),
            GoalRow(
                "3. promotion swap under load: duplicated (two different answers)",
                str(run["duplicated"]),
                goal="0",
                met=run["duplicated"] == 0,
                limits=f"{run['repeated']} answers published twice identically (a redelivery republishes the stored answer)",
            ),
        ]
    return rows


# -- output ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller figures, for a smoke test")
    parser.add_argument("--samples", type=int, help="samples of the stage measurements (10,000)")
    parser.add_argument("--two", action="store_true", help="with --quick: run the two-instance stage measurement too")
    parser.add_argument("--requests", type=int, help="64-instance requests of the throughput run (300)")
    parser.add_argument("--units", type=int, default=128, help="hidden units of the model (128)")
    parser.add_argument("--latency-seconds", type=float, help="the latency run's length (20)")
    parser.add_argument("--swap-rate", type=float, default=200.0, help="single-instance requests/s in 3. (200)")
    parser.add_argument("--swap-seconds", type=float, help="the swap run's length (30)")
    parser.add_argument(
        "--skip",
        choices=["stage", "predict", "latency", "swap"],
        action="append",
        default=[],
        help="leave a part out (repeatable)",
    )
    args = parser.parse_args(argv)
    args.samples = args.samples or (2000 if args.quick else 10_000)
    args.requests = args.requests or (40 if args.quick else 300)
    args.latency_seconds = args.latency_seconds or (5.0 if args.quick else 20.0)
    args.swap_seconds = args.swap_seconds or (8.0 if args.quick else 30.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    console.print(
        f"TensorDB stream stages benchmark; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    rows: list[GoalRow] = []
    log_dir = Path(tempfile.mkdtemp(prefix="tensordb-bench-stream-stages-"))
    with servers("stream-stages") as found, children_cwd(log_dir):
        console.print(f"servers: {found.description}; child logs in {log_dir}")
        base = found.settings.with_changes(trusted_modules=(STAGES_MODULE, MODELS_MODULE))
        console.print(f"topics have {base.topic_partitions} partitions (Settings.topic_partitions)")
        if "stage" not in args.skip:
            rows += bench_stages(base, found.pids, log_dir, args)
        if "predict" not in args.skip:
            rows += inference_rows(bench_inference(base, found.pids, log_dir, args), args)
        gc.collect()  # Kafka clients left in reference cycles go now, not after the servers
    shutil.rmtree(log_dir, ignore_errors=True)  # kept when a part fails: the children's logs are there
    console.print()
    print_goal_rows(console, rows, f"TensorDB stream stages ({found.description})")
    print(f"wall time {time.perf_counter() - began:.0f} s; load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
