#!/usr/bin/env python
"""Step-logging benchmark: the non-blocking RunLogger against a synchronous insert per step.

Everything is measured in one run, on one machine, against servers this script starts (or the
ones named by TENSORDB_KAFKA_BOOTSTRAP and TENSORDB_MONGO_URI), so both sides of each ratio see
the same CPU and load:

a. per-call cost of ``RunLogger.log`` in a tight loop (p50/p99 of ``perf_counter_ns`` around each
   call) against ``collection.insert_one`` per step, TensorLayer's ``save_training_log`` (goal:
   p50 <= 10 us and >= 100x faster);
b. sustained throughput, log -> Kafka -> stream processors -> ``logs`` collection, with zero loss
   (goal: >= 60,000 records/s, producer on the same machine);
c. reading logs back into a DataFrame (``read_logs``) for 10k and 100k records, against the
   TensorDB paper's 0.5 s and 4 s, and against ``pd.json_normalize`` of the same query.

Next to the throughput it prints the CPU each process used (in cores): on a 2-core machine that
shows which side limits the figure.

    .venv/bin/python bench/step_logging.py [--calls N] [--records N] [--quick] [--stages]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from harness import REPO, CpuMeter, children_cwd, make_console, project, servers
from pymongo.collection import Collection
from rich.table import Table

from streams.logs import log_document
from tensordb import records
from tensordb.config import Settings
from tensordb.infra.bus import Publisher
from tensordb.infra.store import Store, insert_ignoring_duplicates
from tensordb.runs.logger import LOGS, SCHEMA, RunLogger
from tensordb.runs.queries import read_logs
from tensordb.testing import ChildProcess, processors_process, raw_database

PAPER_STEP_MS = 1.5
THROUGHPUT_GOAL = 60_000  # records/s into MongoDB, zero loss (issue 14)
PAPER_READ_SECONDS = {10_000: 0.5, 100_000: 4.0}
console = make_console(180)


@dataclass
class Row:
    section: str
    what: str
    tensordb: str
    baseline: str = ""
    ratio: str = ""
    goal: str = ""
    met: bool | None = None
    note: str = ""


def _us(ns: float) -> str:
    return f"{ns / 1000:.2f} µs"


def _percentiles(samples: list[int]) -> tuple[float, float]:
    array = np.asarray(samples, dtype=np.int64)
    return float(np.percentile(array, 50)), float(np.percentile(array, 99))


def _metrics(step: int) -> dict[str, float]:
    """Three metrics per step, as a typical training loop logs them."""
    return {"loss": 1.0 / (step + 1), "accuracy": step * 1e-6, "learning_rate": 0.001}


# -- a. per-call cost ------------------------------------------------------------------------------


def bench_call_cost(base: Settings, calls: int, sync_calls: int) -> list[Row]:
    """log() per call against insert_one per step, in the same run, on the same servers."""
    with project(base, "call") as settings, Publisher(settings) as publisher, Store(settings) as store:
        store.ensure_indexes()
        # warm both paths (connections, code paths, the logger's thread)
        with RunLogger(publisher, run_id="warm-up") as logger:
            for step in range(1000):
                logger.log(step, **_metrics(step))
        collection = store["tensorlayer_train_log"]
        for step in range(100):
            collection.insert_one({"project": settings.project, "time": datetime.now(UTC), **_metrics(step)})

        logger = RunLogger(publisher, run_id="call-cost", job_id="bench")
        clock = time.perf_counter_ns
        samples = [0] * calls
        loop_started = clock()
        for step in range(calls):
            loss, accuracy = 1.0 / (step + 1), step * 1e-6
            started = clock()
            logger.log(step, loss=loss, accuracy=accuracy, learning_rate=0.001)
            samples[step] = clock() - started
        loop_ns = clock() - loop_started
        flush_started = time.perf_counter()
        logger.close()
        flush_seconds = time.perf_counter() - flush_started

        # TensorLayer's save_training_log: one synchronous insert_one per step
        sync_samples = [0] * sync_calls
        for step in range(sync_calls):
            document = {
                "project": settings.project,
                "time": datetime.now(UTC),
                "loss": 1.0 / (step + 1),
                "accuracy": step * 1e-6,
                "learning_rate": 0.001,
            }
            started = clock()
            collection.insert_one(document)
            sync_samples[step] = clock() - started

    p50, p99 = _percentiles(samples)
    sync_p50, sync_p99 = _percentiles(sync_samples)
    ratio = sync_p50 / p50
    return [
        Row(
            "a. log() per call",
            f"p50 ({calls:,} calls vs {sync_calls:,} insert_one)",
            _us(p50),
            _us(sync_p50),
            f"{ratio:,.0f}×",
            "p50 ≤ 10 µs, ≥ 100×",
            p50 <= 10_000 and ratio >= 100,
            f"paper: {PAPER_STEP_MS} ms per step → {PAPER_STEP_MS * 1e6 / p50:,.0f}× faster",
        ),
        Row("a. log() per call", "p99", _us(p99), _us(sync_p99), f"{sync_p99 / p99:,.0f}×"),
        Row(
            "a. log() per call",
            "mean over the whole loop (incl. the timer)",
            _us(loop_ns / calls),
            _us(statistics.fmean(sync_samples)),
            f"{statistics.fmean(sync_samples) / (loop_ns / calls):,.0f}×",
        ),
        Row(
            "a. log() per call",
            f"close(): drain + broker ack of the last {calls:,}",
            f"{flush_seconds:.2f} s",
            note="after the loop; the loop itself never waited",
        ),
    ]


# -- b. sustained throughput -----------------------------------------------------------------------


class Sink:
    """The process that persists log records: ``tensordb processors`` (every processor kind, its
    ``log-sink`` among them) or ``python -m streams.logs`` (the log sink alone)."""

    def __init__(self, kind: str, settings: Settings, log_dir: Path) -> None:
        self.kind = kind
        self.log_path = log_dir / f"{kind}-{settings.project}.log"
        self.child: ChildProcess | None = None
        self.process: subprocess.Popen | None = None
        if kind == "processors":
            self.child = processors_process(settings, self.log_path)
        self.settings = settings

    def __enter__(self) -> Sink:
        if self.child is not None:
            self.child.start()
            self.process = self.child.process
            return self
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streams.logs"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.settings.as_environment()},
                cwd=REPO,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while "log sink ready" not in self.log_path.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the log sink did not start; see {self.log_path}")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.child is not None:
            self.child.stop()
        elif self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def check(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"the {self.kind} exited; see {self.log_path}")


def wait_for_count(store: Store, wanted: int, timeout: float, sink: Sink) -> float:
    """Poll until the logs collection holds ``wanted`` documents; returns the perf_counter time."""
    with raw_database(store.settings) as raw:  # an O(1) count of the whole collection
        return _wait_for_count(raw[LOGS], wanted, timeout, sink)


def _wait_for_count(collection: Collection, wanted: int, timeout: float, sink: Sink) -> float:
    deadline = time.monotonic() + timeout
    while True:
        count = collection.estimated_document_count()  # O(1): fine while only this run writes
        if count >= wanted:
            return time.perf_counter()
        sink.check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {count:,} of {wanted:,} log records persisted after {timeout} s")
        time.sleep(0.02)


SINKS = {
    "processors": "tensordb processors (its log-sink TopicProcessor among every other kind)",
    "log-sink": "python -m streams.logs (the log-sink TopicProcessor alone: librdkafka batches, 2 writers, handle_logs)",
}


@dataclass
class Pass:
    rate: float
    total: float
    logged: float
    acknowledged: float
    cpu: str


def bench_throughput(base: Settings, pids: dict[str, int | None], count: int, log_dir: Path, kind: str, passes: int) -> list[Row]:
    """Log ``count`` records as fast as possible, ``passes`` times (one run each); time until all
    are in MongoDB; then check every record is stored exactly once."""
    results: list[Pass] = []
    with project(base, "throughput") as settings, Sink(kind, settings, log_dir) as sink:
        all_pids = {**pids, kind: sink.process.pid if sink.process else None}
        with Publisher(settings) as publisher, Store(settings) as store:
            store.ensure_indexes()
            with RunLogger(publisher, run_id="warm-up") as warm_up:  # connections, producer id, group join
                warm_up.log(0, loss=0.0)
            wait_for_count(store, 1, timeout=60, sink=sink)
            for number in range(passes):
                with CpuMeter(all_pids) as meter:
                    logger = RunLogger(publisher, run_id=f"throughput-{number}", job_id="bench")
                    started = time.perf_counter()
                    for step in range(count):
                        logger.log(step, loss=1.0 / (step + 1), accuracy=step * 1e-6, learning_rate=0.001)
                    logged = time.perf_counter()
                    logger.close()
                    acknowledged = time.perf_counter()
                    persisted = wait_for_count(store, 1 + (number + 1) * count, timeout=max(120.0, count / 2000), sink=sink)
                total = persisted - started
                results.append(Pass(count / total, total, logged - started, acknowledged - started, meter.describe()))
            time.sleep(1.0)  # anything beyond the expected count (a duplicate) would show up now
            stored = store[LOGS].count_documents({"run_id": {"$ne": "warm-up"}})
            exact = stored == passes * count and all(
                store[LOGS].distinct("step", {"project": settings.project, "run_id": f"throughput-{number}"})
                == list(range(count))
                for number in range(passes)
            )
    median = sorted(results, key=lambda result: result.rate)[len(results) // 2]
    rates = ", ".join(f"{result.rate:,.0f}" for result in results)
    return [
        Row(
            f"b. throughput, {kind}",
            f"{count:,} records: log → Kafka → {SINKS[kind]} → MongoDB; median of {passes}",
            f"{median.rate:,.0f} rec/s",
            goal=f"≥ {THROUGHPUT_GOAL:,} rec/s",
            met=median.rate >= THROUGHPUT_GOAL,
            note=f"passes: {rates} rec/s; median pass {median.total:.2f} s, {median.cpu}",
        ),
        Row(
            f"b. throughput, {kind}",
            "stored exactly once",
            f"{stored:,} of {passes * count:,}",
            goal="zero loss",
            met=exact,
            note="count, and distinct steps of every run",
        ),
        Row(
            f"b. throughput, {kind}",
            "where the time goes (median pass)",
            "",
            note=f"log() loop {median.logged:.2f} s ({count / median.logged:,.0f}/s); all acknowledged by the "
            f"broker at {median.acknowledged:.2f} s ({count / median.acknowledged:,.0f}/s); all persisted at "
            f"{median.total:.2f} s",
        ),
    ]


# -- c. reading back -------------------------------------------------------------------------------


def store_run(store: Store, run_id: str, count: int) -> None:
    """``count`` log documents of one run, written directly as the sink would write them."""
    now = time.time()
    for start in range(0, count, 10_000):
        documents = [
            log_document(
                store.project,
                records.validate(
                    {
                        "schema": SCHEMA,
                        "run_id": run_id,
                        "job_id": "bench",
                        "phase": "train",
                        "step": step,
                        "epoch": step // 1000,
                        "metrics": _metrics(step),
                        "wall_time": now + step * 0.01,
                    },
                    SCHEMA,
                ),
            )
            for step in range(start, min(start + 10_000, count))
        ]
        insert_ignoring_duplicates(store[LOGS], documents)


def best_of(passes: int, run: Callable[[], Any]) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(passes):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    return min(times), result


def naive_read(store: Store, run_id: str) -> Any:
    """The obvious way: every document whole, then pandas' json_normalize."""
    import pandas as pd

    return pd.json_normalize(list(store[LOGS].find({"project": store.project, "run_id": run_id})))


def bench_read(base: Settings, sizes: list[int], passes: int) -> list[Row]:
    rows = []
    with project(base, "read") as settings, Store(settings) as store:
        store.ensure_indexes()
        for size in sizes:
            run_id = f"read-{size}"
            store_run(store, run_id, size)
            seconds, frame = best_of(passes, lambda: read_logs(store, run_id=run_id))
            assert len(frame) == size and frame["step"].iloc[-1] == size - 1
            numpy_seconds, _ = best_of(passes, lambda: read_logs(store, run_id=run_id, as_numpy=True))
            naive_seconds, naive = best_of(1, lambda: naive_read(store, run_id))
            assert len(naive) == size
            paper = PAPER_READ_SECONDS.get(size)
            rows.append(
                Row(
                    "c. read_logs",
                    f"{size:,} records → DataFrame (best of {passes})",
                    f"{seconds:.3f} s",
                    f"{paper} s paper" if paper else "",
                    f"{paper / seconds:,.0f}×" if paper else "",
                    f"< {paper} s" if paper else "",
                    seconds < paper if paper else None,
                    f"{size / seconds:,.0f} rec/s; as_numpy {numpy_seconds:.3f} s; "
                    f"find()+json_normalize {naive_seconds:.3f} s ({naive_seconds / seconds:.1f}× slower)",
                )
            )
    return rows


# -- stage costs (--stages) --------------------------------------------------------------------------


def bench_stages(base: Settings, count: int) -> list[Row]:
    """What each step of the sink costs per record, in this process, without Kafka."""
    from streams.logs import handle_logs
    from tensordb.infra.bus import Received

    with project(base, "stages") as settings, Store(settings) as store:
        store.ensure_indexes()
        now = time.time()
        raw = [
            records.encode(
                {
                    "schema": SCHEMA,
                    "run_id": "s",
                    "job_id": "bench",
                    "phase": "train",
                    "step": step,
                    "epoch": step // 1000,
                    "metrics": _metrics(step),
                    "wall_time": now,
                },
                SCHEMA,
            )
            for step in range(count)
        ]
        started = time.perf_counter()
        decoded = [records.decode(value, SCHEMA) for value in raw]
        decode = time.perf_counter() - started

        class Context:
            pass

        context = Context()
        context.store = store  # type: ignore[attr-defined]
        received = [Received("t", 0, offset, b"s", None, record, None) for offset, record in enumerate(decoded)]
        started = time.perf_counter()
        for start in range(0, count, 2000):
            handle_logs(context, received[start : start + 2000])
        insert = time.perf_counter() - started
        assert store[LOGS].count_documents({}) == count
    return [
        Row(
            "stages",
            "decode + validate (records.decode)",
            f"{decode / count * 1e6:.2f} µs/rec",
            note=f"{count / decode:,.0f} rec/s on one core",
        ),
        Row(
            "stages",
            "handle_logs: documents + insert_many (2000/batch)",
            f"{insert / count * 1e6:.2f} µs/rec",
            note=f"{count / insert:,.0f} rec/s, mongod included",
        ),
    ]


# -- output ----------------------------------------------------------------------------------------


def print_table(rows: list[Row], description: str) -> None:
    table = Table(title=f"TensorDB step logging ({description}, {os.cpu_count()} cores)")
    for name in ("section", "measurement", "TensorDB", "baseline", "ratio", "goal", "met", "notes"):
        table.add_column(name, overflow="fold")
    for row in rows:
        met = "" if row.met is None else ("yes" if row.met else "NO")
        table.add_row(row.section, row.what, row.tensordb, row.baseline, row.ratio, row.goal, met, row.note)
    console.print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100_000, help="log() calls timed in (a)")
    parser.add_argument("--sync-calls", type=int, default=5_000, help="insert_one calls timed in (a)")
    parser.add_argument("--records", type=int, default=200_000, help="records logged in (b)")
    parser.add_argument("--passes", type=int, default=3, help="timed passes of (b) through the log sink")
    parser.add_argument("--quick", action="store_true", help="smaller figures, for a smoke test")
    parser.add_argument("--stages", action="store_true", help="also time the sink's stages in-process")
    parser.add_argument("--sink", choices=sorted(SINKS), action="append", help="sinks to measure in (b)")
    parser.add_argument("--only", choices=["a", "b", "c"], action="append", help="run only these sections")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.calls, args.sync_calls, args.records, args.passes = 20_000, 1_000, 20_000, 1
    sections = set(args.only or ["a", "b", "c"])
    read_sizes = [10_000] if args.quick else [10_000, 100_000]
    rows: list[Row] = []
    with (
        servers("logging") as found,
        tempfile.TemporaryDirectory(prefix="tensordb-bench-logs-") as log_dir,
        children_cwd(Path(log_dir)),
    ):
        console.print(f"servers: {found.description}; load average before: {os.getloadavg()[0]:.2f}")
        if "a" in sections:
            rows += bench_call_cost(found.settings, args.calls, args.sync_calls)
        if "b" in sections:
            for kind in args.sink or ["log-sink", "processors"]:
                passes = args.passes if kind == "log-sink" else 1  # the whole processors: one pass, for comparison
                rows += bench_throughput(found.settings, found.pids, args.records, Path(log_dir), kind, passes)
        if "c" in sections:
            rows += bench_read(found.settings, read_sizes, passes=3)
        if args.stages:
            rows += bench_stages(found.settings, min(args.records, 100_000))
    print_table(rows, found.description)
    console.print(f"load average after: {os.getloadavg()[0]:.2f} (other processes on this machine share its cores)")
    return 0 if all(row.met is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
