"""What the dashboard reads from MongoDB, and the downsampling that keeps the overview light.

Curves: a run's points come from the ``logs`` collection (one document per run, phase and step,
index ``(project, run_id, phase, step)``). Up to :data:`FULL_POINTS` per phase a chart gets every
point; beyond, it gets the run's :class:`Envelope`: the minimum and maximum of each metric per
bucket of steps, at most :data:`OVERVIEW_POINTS` points per metric, so spikes survive
downsampling. Zooming in asks for a step range, which is read at full resolution (and min/max
downsampled again only if the range still holds more points than a chart can use).

Envelopes live in an :class:`OverviewCache`: built once per dashboard process from MongoDB, then
kept current from the live log stream in O(1) per point, so the overview of 100 runs × 100,000
points is served from memory. Building one from scratch reads the whole run (~0.3-1 s for
100,000 points on 2 cores), so a large run whose steps are dense is first sampled (a few thousand
evenly spaced steps by index look-up, ~30 ms) and marked approximate until the exact envelope,
built in the background, replaces it.

Everything else (jobs, models, evaluations, decisions, datasets, cohorts, samples, processor
progress, dead letters) is small, index-backed reads returned as JSON-ready dictionaries.
"""

from __future__ import annotations

import base64
import gc
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from pymongo import ASCENDING, DESCENDING
from pymongo.errors import ExecutionTimeout, PyMongoError

from tensordb.data.cohorts import COHORTS, load_cohort
from tensordb.data.datasets import COLLECTION as DATASETS
from tensordb.data.samples import SAMPLES
from tensordb.infra.dead_letters import COLLECTION as DEAD_LETTERS
from tensordb.infra.store import PROGRESS, Store
from tensordb.jobs.queue import JOBS
from tensordb.loop.policies import POLICIES
from tensordb.loop.promotion import DECISIONS, EVALUATIONS
from tensordb.models.registry import ALIASES
from tensordb.models.registry import COLLECTION as MODELS
from tensordb.runs.logger import LOGS, PHASES

log = logging.getLogger(__name__)

#: Points per metric in an overview (an envelope has at most this many).
OVERVIEW_POINTS = 1000
#: Up to this many points per phase a run's charts get every point.
FULL_POINTS = 20_000
#: Runs whose step span is larger are sampled first (approximate), then built exactly.
SAMPLE_ABOVE = 20_000
SAMPLE_STEPS = 4000
_BUCKETS = OVERVIEW_POINTS // 2  # two points (min and max) per bucket
_EMPTY_MIN, _EMPTY_MAX = math.inf, -math.inf


# -- reading curves ---------------------------------------------------------------------------------


@dataclass
class Columns:
    """Points of one run and phase, sorted by step: steps, wall times and one array per metric
    (NaN where a record lacks the metric or logged NaN)."""

    steps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    walls: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    metrics: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.steps)

    @classmethod
    def from_points(cls, points: Iterable[tuple[int, float, Mapping[str, float | None]]]) -> Columns:
        """From (step, wall_time, metrics) tuples, as the live stream delivers them."""
        steps: list[int] = []
        walls: list[float] = []
        columns: dict[str, list[float]] = {}
        nan = math.nan
        for row, (step, wall, metrics) in enumerate(points):
            steps.append(step)
            walls.append(wall)
            for name, value in metrics.items():
                column = columns.get(name)
                if column is None:
                    column = columns[name] = [nan] * row
                column.append(nan if value is None else value)
            for column in columns.values():
                if len(column) <= row:
                    column.append(nan)
        return cls(
            np.array(steps, dtype=np.int64),
            np.array(walls, dtype=np.float64),
            {name: np.array(values, dtype=np.float64) for name, values in columns.items()},
        )


def _query(store: Store, run_id: str, phase: str, lo: int | None = None, hi: int | None = None) -> dict[str, Any]:
    query: dict[str, Any] = {"project": store.project, "run_id": run_id, "phase": phase}
    if lo is not None or hi is not None:
        query["step"] = {**({"$gte": int(lo)} if lo is not None else {}), **({"$lte": int(hi)} if hi is not None else {})}
    return query


def read_columns(store: Store, run_id: str, phase: str, lo: int | None = None, hi: int | None = None, steps: list[int] | None = None) -> Columns:
    """The stored points of a run's phase (optionally steps lo..hi inclusive, or the listed steps)."""
    query = _query(store, run_id, phase, lo, hi)
    if steps is not None:
        query["step"] = {"$in": steps}
    cursor = store[LOGS].find(query, {"_id": 0, "step": 1, "wall_time": 1, "metrics": 1}, sort=[("step", ASCENDING)], batch_size=20_000)
    collecting = gc.isenabled()
    gc.disable()  # ~5 objects per document: without this the collector re-scans them (see tensordb.runs.queries.read_logs)
    try:
        return Columns.from_points((document["step"], document["wall_time"], document["metrics"]) for document in cursor)
    finally:
        if collecting:
            gc.enable()


def count_points(store: Store, run_id: str, phase: str, lo: int | None = None, hi: int | None = None) -> int:
    return store[LOGS].count_documents(_query(store, run_id, phase, lo, hi))


def step_bounds(store: Store, run_id: str, phase: str) -> tuple[int, int] | None:
    """First and last step of a run's phase (two index look-ups), or None if it has none."""
    query = _query(store, run_id, phase)
    first = store[LOGS].find_one(query, {"_id": 0, "step": 1}, sort=[("step", ASCENDING)])
    last = store[LOGS].find_one(query, {"_id": 0, "step": 1}, sort=[("step", DESCENDING)])
    return None if first is None or last is None else (first["step"], last["step"])


# -- the min/max envelope -------------------------------------------------------------------------------


class Envelope:
    """Minimum and maximum of each metric per bucket of steps, with the step and wall time where each
    occurred. Buckets are ``width`` steps wide, ``width`` a power of two, aligned at step 0; when a
    step falls beyond the last bucket the width doubles and neighbouring buckets merge, so memory
    and output stay bounded (:data:`OVERVIEW_POINTS` points per metric) however long the run.

    ``extend`` takes points in any order and any number of times: a point seen twice (the live
    stream and MongoDB) changes nothing. Not thread-safe: :class:`OverviewCache` locks around it.
    """

    def __init__(self, exact: bool = True) -> None:
        self.width = 1
        self.exact = exact
        self.last_step = -1
        #: per metric, rows: min value, its step, its wall time, max value, its step, its wall time
        self.metrics: dict[str, np.ndarray] = {}

    def _new(self) -> np.ndarray:
        array = np.full((6, _BUCKETS), np.nan)
        array[0], array[3] = _EMPTY_MIN, _EMPTY_MAX
        return array

    def _coarsen(self) -> None:
        self.width *= 2
        half = _BUCKETS // 2
        for name, array in self.metrics.items():
            pairs = array.reshape(6, half, 2)
            low = (pairs[0, :, 1] < pairs[0, :, 0]).astype(np.intp)  # ties keep the earlier bucket
            high = (pairs[3, :, 1] > pairs[3, :, 0]).astype(np.intp)
            merged = self._new()
            merged[0:3, :half] = np.take_along_axis(pairs[0:3], np.broadcast_to(low[None, :, None], (3, half, 1)), axis=2)[..., 0]
            merged[3:6, :half] = np.take_along_axis(pairs[3:6], np.broadcast_to(high[None, :, None], (3, half, 1)), axis=2)[..., 0]
            self.metrics[name] = merged

    def extend(self, columns: Columns) -> None:
        if not len(columns):
            return
        top = int(columns.steps.max())
        while top // self.width >= _BUCKETS:
            self._coarsen()
        self.last_step = max(self.last_step, top)
        buckets = columns.steps // self.width
        for name, values in columns.metrics.items():
            present = ~np.isnan(values)
            if not present.any():
                continue
            array = self.metrics.get(name)
            if array is None:
                array = self.metrics[name] = self._new()
            b, v = buckets[present], values[present]
            s, t = columns.steps[present].astype(np.float64), columns.walls[present]
            order = np.lexsort((v, b))  # by bucket, then value; stable, so ties keep the first seen
            sorted_buckets = b[order]
            starts = np.flatnonzero(np.r_[True, sorted_buckets[1:] != sorted_buckets[:-1]])
            ends = np.r_[starts[1:], len(order)] - 1
            where = sorted_buckets[starts]
            lowest, highest = order[starts], order[ends]
            lower = v[lowest] < array[0, where]
            at = where[lower]
            array[0, at], array[1, at], array[2, at] = v[lowest][lower], s[lowest][lower], t[lowest][lower]
            higher = v[highest] > array[3, where]
            at = where[higher]
            array[3, at], array[4, at], array[5, at] = v[highest][higher], s[highest][higher], t[highest][higher]

    def names(self) -> list[str]:
        return sorted(self.metrics)

    def points(self, name: str, lo: float | None = None, hi: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(steps, wall times, values) of a metric's envelope in step order, optionally within lo..hi."""
        array = self.metrics.get(name)
        if array is None:
            empty = np.zeros(0)
            return empty, empty, empty
        filled = array[0] != _EMPTY_MIN
        low, high = array[:3, filled], array[3:, filled]
        distinct = high[1] != low[1]  # a bucket with one point gives it once
        steps = np.concatenate([low[1], high[1, distinct]])
        walls = np.concatenate([low[2], high[2, distinct]])
        values = np.concatenate([low[0], high[0, distinct]])
        order = np.argsort(steps, kind="stable")
        steps, walls, values = steps[order], walls[order], values[order]
        if lo is not None or hi is not None:
            keep = (steps >= (-np.inf if lo is None else lo)) & (steps <= (np.inf if hi is None else hi))
            steps, walls, values = steps[keep], walls[keep], values[keep]
        return steps, walls, values

# -- the overview cache ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvelopeView:
    """A copy of an envelope: per metric (steps, wall times, values), and how it was built."""

    exact: bool
    width: int
    last_step: int
    metrics: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]


class _Entry:
    def __init__(self) -> None:
        self.envelope: Envelope | None = None
        self.building = False
        self.pending: list[Columns] = []  # live points that arrived while building
        self.ready = threading.Event()
        self.refining = False
        self.used = time.monotonic()


class OverviewCache:
    """Envelopes of (run, phase), built on first use and kept current from the live stream.

    ``subscribe`` is the live hub's ``buffered_and_listen``: it returns the points the hub has
    consumed but MongoDB may not hold yet, and routes every later point here, so an envelope built
    from MongoDB plus those points misses nothing. At most ``max_entries`` envelopes are kept
    (least recently used dropped); each is a few hundred kB at most.
    """

    def __init__(self, store: Store, workers: int = 2, max_entries: int = 2000) -> None:
        self.store = store
        self.max_entries = max_entries
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="tensordb-dashboard-overview")
        self.buffered: Callable[[str], list[tuple[str, int, float, dict]]] = lambda run_id: []
        self.builds = 0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # the live hub calls this with every batch it consumes, holding its own lock
    def on_points(self, run_id: str, points: list[tuple[str, int, float, dict]]) -> None:
        by_phase: dict[str, list[tuple[int, float, dict]]] = {}
        for phase, step, wall, metrics in points:
            by_phase.setdefault(phase, []).append((step, wall, metrics))
        with self._lock:
            for phase, rows in by_phase.items():
                entry = self._entries.get((run_id, phase))
                if entry is None:
                    continue
                columns = Columns.from_points(rows)
                if entry.building:
                    entry.pending.append(columns)
                elif entry.envelope is not None:
                    entry.envelope.extend(columns)

    def get(self, run_id: str, phase: str, lo: float | None = None, hi: float | None = None, timeout: float = 30.0) -> EnvelopeView | None:
        """The envelope of a run's phase (built now if needed), copied; None if it has no points."""
        key = (run_id, phase)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry()
                self._evict()
                build = True
            else:
                build = False
            entry.used = time.monotonic()
        if build:
            self._build(key, entry, quick=True)
        elif not entry.ready.wait(timeout):
            raise TimeoutError(f"the overview of {run_id!r} ({phase}) is still being built")
        with self._lock:
            envelope = entry.envelope
            if envelope is None:
                return None
            return EnvelopeView(
                envelope.exact, envelope.width, envelope.last_step, {name: envelope.points(name, lo, hi) for name in envelope.names()}
            )

    def prefetch(self, keys: Iterable[tuple[str, str]]) -> None:
        """Build envelopes in the background (e.g. every run's at start-up)."""
        for key in keys:
            with self._lock:
                if key in self._entries:
                    continue
                entry = self._entries[key] = _Entry()
            self._pool.submit(self._build, key, entry, True)

    def _evict(self) -> None:
        while len(self._entries) > self.max_entries:
            oldest = min((k for k, e in self._entries.items() if e.ready.is_set()), key=lambda k: self._entries[k].used, default=None)
            if oldest is None:
                return
            del self._entries[oldest]

    def _build(self, key: tuple[str, str], entry: _Entry, quick: bool) -> None:
        run_id, phase = key
        with self._lock:
            entry.building = True
            entry.pending = []
        # points the hub consumed that MongoDB may not have yet (after this, on_points queues them)
        replay = [(step, wall, metrics) for p, step, wall, metrics in self.buffered(run_id) if p == phase]
        try:
            envelope, exact = self._read(run_id, phase, quick)
        except Exception:
            with self._lock:
                self._entries.pop(key, None)
                entry.building = False
            entry.ready.set()
            raise
        envelope.extend(Columns.from_points(replay))
        with self._lock:
            for columns in entry.pending:
                envelope.extend(columns)
            entry.pending = []
            entry.building = False
            entry.envelope = envelope if envelope.last_step >= 0 else None
            self.builds += 1
            refine = not exact and not entry.refining and self._entries.get(key) is entry
            if refine:
                entry.refining = True
        entry.ready.set()
        if refine:
            self._pool.submit(self._refine, key, entry)

    def _refine(self, key: tuple[str, str], entry: _Entry) -> None:
        try:
            self._build(key, entry, quick=False)
        except PyMongoError:
            log.exception("could not build the exact overview of %s", key)
        finally:
            entry.refining = False

    def _read(self, run_id: str, phase: str, quick: bool) -> tuple[Envelope, bool]:
        """A new envelope from MongoDB: every point, or (quick, a large dense run) a sample."""
        bounds = step_bounds(self.store, run_id, phase)
        envelope = Envelope()
        if bounds is None:
            return envelope, True
        first, last = bounds
        if quick and last - first + 1 > SAMPLE_ABOVE:
            wanted = np.unique(np.linspace(first, last, SAMPLE_STEPS).round().astype(np.int64)).tolist()
            sample = read_columns(self.store, run_id, phase, steps=wanted)
            if len(sample) >= 0.9 * len(wanted):  # dense steps: the sample is evenly spread over the run
                envelope.exact = False
                envelope.extend(sample)
                return envelope, False
        envelope.extend(read_columns(self.store, run_id, phase))
        return envelope, True


# -- aligning series for one chart --------------------------------------------------------------------


def align(series: Mapping[str, tuple[np.ndarray, np.ndarray]], max_points: int = OVERVIEW_POINTS) -> dict[str, Any]:
    """Put several (x, y) series on one x axis, as uPlot draws them: ``{"x": [...], "y": {label: [...]}}``.

    When the union of x values is small enough every point keeps its own x (a series without a
    point at some x gets null there). Otherwise x is a grid of ``max_points / 2`` buckets over the
    whole range, each holding two slots: each series' minimum and maximum in the bucket, in the
    order they occurred, so the envelope of every curve survives and the payload stays bounded.
    """
    nonempty = {label: (np.asarray(x, np.float64), np.asarray(y, np.float64)) for label, (x, y) in series.items() if len(x)}
    if not nonempty:
        return {"x": [], "y": {label: [] for label in series}}
    union = np.unique(np.concatenate([x for x, _ in nonempty.values()]))
    if len(union) <= max_points:
        grid = union
        columns = {}
        for label in series:
            column = np.full(len(grid), np.nan)
            if label in nonempty:
                x, y = nonempty[label]
                first = np.unique(x, return_index=True)[1]  # a repeated x keeps its first value
                column[np.searchsorted(grid, x[first])] = y[first]
            columns[label] = column
        return {"x": grid.tolist(), "y": {label: _nullable(column) for label, column in columns.items()}}
    buckets = max(max_points // 2, 1)
    lo, hi = float(union[0]), float(union[-1])
    width = (hi - lo) / buckets or 1.0
    grid = lo + np.arange(2 * buckets) * (width / 2)
    columns = {}
    for label in series:
        column = np.full(2 * buckets, np.nan)
        if label in nonempty:
            x, y = nonempty[label]
            keep = ~np.isnan(y)
            x, y = x[keep], y[keep]
            b = np.minimum(((x - lo) / width).astype(np.int64), buckets - 1)
            order = np.lexsort((y, b))
            sb = b[order]
            starts = np.flatnonzero(np.r_[True, sb[1:] != sb[:-1]]) if len(sb) else np.zeros(0, np.int64)
            ends = np.r_[starts[1:], len(sb)] - 1 if len(sb) else starts
            lowest, highest = order[starts], order[ends]
            where = sb[starts]
            low_first = x[lowest] <= x[highest]
            column[2 * where] = np.where(low_first, y[lowest], y[highest])
            column[2 * where + 1] = np.where(low_first, y[highest], y[lowest])
        columns[label] = column
    return {"x": grid.tolist(), "y": {label: _nullable(column) for label, column in columns.items()}, "bucket": width}


def _nullable(values: np.ndarray) -> list[float | None]:
    return [None if value != value else value for value in values.tolist()]


# -- runs, jobs ---------------------------------------------------------------------------------------


_JOB_FIELDS = {
    "_id": 1, "kind": 1, "name": 1, "description": 1, "policy": 1, "status": 1, "attempts": 1, "max_attempts": 1,
    "worker": 1, "host": 1, "progress": 1, "checkpoint": 1, "error.message": 1, "submitted_at": 1, "started_at": 1,
    "finished_at": 1, "lease_until": 1, "priority": 1, "spec.epochs": 1, "cancel_requested": 1, "result": 1,
}  # fmt: skip


@dataclass
class _PhaseSummary:
    count: int
    first_step: int
    last_step: int
    first_wall: float
    last_wall: float
    last_metrics: dict[str, Any]
    checked: float


class RunIndex:
    """Every run of the project with its points per phase, joined with its job (a job's run id is
    its job id). Per (run, phase) it remembers the count and last step, so a refresh costs two
    index look-ups per run and counts only the steps added since (full recount every minute)."""

    def __init__(self, store: Store, workers: int = 4) -> None:
        self.store = store
        self._phases: dict[tuple[str, str], _PhaseSummary] = {}
        self._first: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="tensordb-dashboard-runs")
        self._cached: tuple[float, list[dict[str, Any]]] | None = None
        self._refresh_lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def runs(self, max_age: float = 1.0) -> list[dict[str, Any]]:
        """Runs newest first (cached for ``max_age`` seconds, shared by every browser)."""
        with self._refresh_lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < max_age:
                return self._cached[1]
            runs = self._refresh()
            self._cached = (time.monotonic(), runs)
            return runs

    def _refresh(self) -> list[dict[str, Any]]:
        logs = self.store[LOGS]
        run_ids = logs.distinct("run_id", {"project": self.store.project})
        summaries = dict(zip(run_ids, self._pool.map(self._summary, run_ids), strict=True))
        jobs = {job["_id"]: job for job in self.store[JOBS].find({"project": self.store.project, "_id": {"$in": run_ids}}, _JOB_FIELDS)}
        for job in self.store[JOBS].find({"project": self.store.project}, _JOB_FIELDS, sort=[("submitted_at", DESCENDING)], limit=500):
            jobs.setdefault(job["_id"], job)
        runs = []
        for run_id in set(summaries) | set(jobs):
            summary = summaries.get(run_id) or {"run_id": run_id, "job_id": run_id, "tags": {}, "phases": {}, "metrics": [], "points": 0}
            run_job = jobs.get(run_id) or (jobs.get(summary.get("job_id")) if summary.get("job_id") else None)
            summary["job"] = _job(run_job) if run_job else None
            times = [phase["last_wall_time"] for phase in summary["phases"].values()]
            if run_job:
                times += [run_job[key].timestamp() for key in ("submitted_at", "started_at", "finished_at") if isinstance(run_job.get(key), datetime)]
            summary["updated_at"] = max(times, default=0.0)
            runs.append(summary)
        runs.sort(key=lambda run: run["updated_at"], reverse=True)
        return runs

    def _summary(self, run_id: str) -> dict[str, Any]:
        logs, project = self.store[LOGS], self.store.project
        phases: dict[str, dict[str, Any]] = {}
        for phase in sorted(logs.distinct("phase", {"project": project, "run_id": run_id}), key=_phase_order):
            query = {"project": project, "run_id": run_id, "phase": phase}
            last = logs.find_one(query, {"_id": 0, "step": 1, "wall_time": 1, "metrics": 1}, sort=[("step", DESCENDING)])
            if last is None:
                continue
            key = (run_id, phase)
            with self._lock:
                known = self._phases.get(key)
            now = time.monotonic()
            if known is not None and known.last_step == last["step"] and now - known.checked < 60:
                summary = known
            else:
                if known is not None and now - known.checked < 60 and last["step"] > known.last_step:
                    count = known.count + logs.count_documents({**query, "step": {"$gt": known.last_step}})
                    first_step, first_wall = known.first_step, known.first_wall
                else:
                    count = logs.count_documents(query)
                    earliest = logs.find_one(query, {"_id": 0, "step": 1, "wall_time": 1}, sort=[("step", ASCENDING)]) or last
                    first_step, first_wall = earliest["step"], earliest["wall_time"]
                summary = _PhaseSummary(count, first_step, last["step"], first_wall, last["wall_time"], last["metrics"], now)
                with self._lock:
                    self._phases[key] = summary
            phases[phase] = {
                "count": summary.count, "first_step": summary.first_step, "last_step": summary.last_step,
                "first_wall_time": summary.first_wall, "last_wall_time": summary.last_wall, "last_metrics": summary.last_metrics,
            }  # fmt: skip
        first = self._first.get(run_id)
        if first is None:
            first = logs.find_one({"project": project, "run_id": run_id}, {"_id": 0, "job_id": 1, "tags": 1}) or {}
            self._first[run_id] = first
        metrics = sorted({name for phase in phases.values() for name in phase["last_metrics"]})
        return {
            "run_id": run_id, "job_id": first.get("job_id"), "tags": first.get("tags") or {}, "phases": phases,
            "metrics": metrics, "points": sum(phase["count"] for phase in phases.values()),
        }  # fmt: skip


def _phase_order(phase: str) -> int:
    return PHASES.index(phase) if phase in PHASES else len(PHASES)


def _job(job: dict[str, Any]) -> dict[str, Any]:
    return {
        "job_id": job["_id"], "kind": job.get("kind"), "name": job.get("name"), "description": job.get("description"),
        "policy": job.get("policy"), "status": job.get("status"), "attempts": job.get("attempts"),
        "max_attempts": job.get("max_attempts"), "worker": job.get("worker"), "host": job.get("host"),
        "progress": job.get("progress") or {}, "checkpoint": job.get("checkpoint"), "epochs": (job.get("spec") or {}).get("epochs"),
        "error": (job.get("error") or {}).get("message"), "submitted_at": job.get("submitted_at"),
        "started_at": job.get("started_at"), "finished_at": job.get("finished_at"), "priority": job.get("priority"),
        "cancel_requested": job.get("cancel_requested"), "result": job.get("result"),
    }  # fmt: skip


def job_of(store: Store, run_id: str) -> dict[str, Any] | None:
    job = store[JOBS].find_one({"project": store.project, "_id": run_id}, _JOB_FIELDS)
    if job is None:
        first = store[LOGS].find_one({"project": store.project, "run_id": run_id}, {"job_id": 1})
        if first and first.get("job_id"):
            job = store[JOBS].find_one({"project": store.project, "_id": first["job_id"]}, _JOB_FIELDS)
    return _job(job) if job else None


# -- models ---------------------------------------------------------------------------------------------

_VERSION_FIELDS = {"architecture_json": 0, "compile_json": 0, "build_config": 0, "builder_kwargs": 0, "parameters.blob": 0, "project": 0}


def models(store: Store, versions_per_model: int = 200) -> list[dict[str, Any]]:
    """Per model name (a policy's versions carry its name): versions with their training and
    evaluation metrics, aliases (which version is production) with their history, the policy and
    the decision history of the miner."""
    project = store.project
    names = set(store[MODELS].distinct("name", {"project": project}))
    policies = {doc["name"]: doc for doc in store[POLICIES].find({"project": project}, {"seen_batches": 0, "_id": 0, "project": 0})}
    names |= set(policies)
    result = []
    for name in sorted(names):
        versions = list(store[MODELS].find({"project": project, "name": name}, _VERSION_FIELDS, sort=[("version", DESCENDING)], limit=versions_per_model))
        evaluations: dict[int | None, list[dict[str, Any]]] = {}
        for evaluation in store[EVALUATIONS].find({"project": project, "model": name}, {"_id": 0, "project": 0, "cohort": 0}, sort=[("at", ASCENDING)]):
            evaluations.setdefault(evaluation.get("version"), []).append(evaluation)
        aliases = {}
        for alias in store[ALIASES].find({"project": project, "name": name}, {"_id": 0, "project": 0}):
            alias["history"] = list(reversed(alias.get("history", [])))[:50]
            aliases[alias["alias"]] = alias
        production = (aliases.get("production") or {}).get("version")
        rows = []
        for version in versions:
            rows.append({
                "version": version.get("version"), "time": version.get("time"), "epoch": version.get("epoch"),
                "job_id": version.get("job_id"), "metrics": version.get("metrics") or {}, "tags": version.get("tags") or {},
                "evaluations": evaluations.get(version.get("version"), []),
                "aliases": sorted(a for a, doc in aliases.items() if doc.get("version") == version.get("version")),
                "production": version.get("version") == production, "nbytes": (version.get("parameters") or {}).get("nbytes"),
            })  # fmt: skip
        decisions = list(store[DECISIONS].find({"project": project, "policy": name}, {"project": 0}, sort=[("at", DESCENDING)], limit=200))
        result.append({
            "name": name, "production": production, "aliases": aliases, "versions": rows,
            "version_count": store[MODELS].count_documents({"project": project, "name": name}),
            "policy": policies.get(name), "decisions": decisions,
        })  # fmt: skip
    return result


# -- data -------------------------------------------------------------------------------------------------


class ProgressRates:
    """Records per second per topic partition of ``processor_progress``, from the change between
    two reads (the processors update the counters with every batch)."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}
        self._rates: dict[str, float] = {}
        self._lock = threading.Lock()

    def rows(self, store: Store) -> list[dict[str, Any]]:
        prefix = f"{store.settings.topic_prefix}.{store.project}."
        rows = list(store[PROGRESS].find({"project": store.project}, sort=[("topic", ASCENDING), ("partition", ASCENDING)]))
        now = time.monotonic()
        with self._lock:
            for row in rows:
                key, total = row["_id"], int(row.get("valid", 0)) + int(row.get("invalid", 0))
                previous = self._last.get(key)
                if previous is not None and now - previous[0] >= 0.5:
                    self._rates[key] = max(total - previous[1], 0) / (now - previous[0])
                    self._last[key] = (now, total)
                elif previous is None:
                    self._last[key] = (now, total)
                row["rate"] = self._rates.get(key)
                row["kind"] = row["topic"][len(prefix):] if row["topic"].startswith(prefix) else row["topic"]
                row["id"] = row.pop("_id")
        return rows


def data(store: Store, rates: ProgressRates, window: timedelta = timedelta(hours=1), bucket: timedelta = timedelta(minutes=1)) -> dict[str, Any]:
    """Datasets and cohorts with their sizes, how fast samples arrive, and the processors' progress."""
    project = store.project
    now = datetime.now(UTC)
    samples = store[SAMPLES]
    datasets = []
    for name in sorted(samples.distinct("dataset", {"project": project})):
        query = {"project": project, "dataset": name}
        newest = samples.find_one(query, {"imported_at": 1}, sort=[("imported_at", DESCENDING)])
        oldest = samples.find_one(query, {"imported_at": 1}, sort=[("imported_at", ASCENDING)])
        recent = samples.count_documents({**query, "imported_at": {"$gte": now - timedelta(minutes=1)}})
        datasets.append({
            "name": name, "samples": samples.count_documents(query), "per_second_last_minute": recent / 60.0,
            "first_imported_at": (oldest or {}).get("imported_at"), "last_imported_at": (newest or {}).get("imported_at"),
        })  # fmt: skip
    saved = []
    for document in store[DATASETS].find({"project": project}, {"project": 0}, sort=[("name", ASCENDING), ("time", DESCENDING)], limit=500):
        arrays = document.pop("arrays", [])
        document["arrays"] = [{key: entry.get(key) for key in ("key", "dtype", "shape", "nbytes")} for entry in arrays]
        document["nbytes"] = sum(entry.get("nbytes") or 0 for entry in arrays)
        document["id"] = str(document.pop("_id"))
        saved.append(document)
    cohorts = []
    for document in store[COHORTS].find({"project": project}, {"_id": 0, "project": 0}, sort=[("name", ASCENDING)]):
        try:
            cohort = load_cohort(store, document["name"])
            document["samples"] = store[SAMPLES].count_documents(cohort.query(), maxTimeMS=2000, **({"limit": cohort.limit} if cohort.limit else {}))
        except ExecutionTimeout:
            document["samples"] = None
        except Exception as exc:  # noqa: BLE001 - a cohort that no longer resolves is shown with the reason
            document["samples"], document["error"] = None, str(exc)
        cohorts.append(document)
    start = now - window
    step_ms = int(bucket.total_seconds() * 1000)
    histogram = {
        row["_id"]: row["n"]
        for row in samples.aggregate([
            {"$match": {"project": project, "imported_at": {"$gte": start}}},
            {"$group": {"_id": {"$subtract": [{"$toLong": "$imported_at"}, {"$mod": [{"$toLong": "$imported_at"}, step_ms]}]}, "n": {"$sum": 1}}},
        ])
    }  # fmt: skip
    first_bucket = int(start.timestamp() * 1000) // step_ms * step_ms
    times = list(range(first_bucket, int(now.timestamp() * 1000) + 1, step_ms))
    return {
        "datasets": datasets, "saved_datasets": saved, "cohorts": cohorts,
        "imported": {"bucket_seconds": bucket.total_seconds(), "t": [t / 1000 for t in times], "count": [histogram.get(t, 0) for t in times]},
        "progress": rates.rows(store), "now": now,
    }  # fmt: skip


def dead_letters(store: Store, limit: int = 200) -> dict[str, Any]:
    """The newest dead letters with their reasons and a readable start of the original bytes."""
    project = store.project
    letters = []
    for document in store[DEAD_LETTERS].find({"project": project}, {"project": 0, "key_b64": 0}, sort=[("at", DESCENDING)], limit=limit):
        original = base64.b64decode(document.pop("original_b64", "") or "")  # empty when kept in GridFS
        document["original_bytes"] = document.get("original_size", len(original))
        document["original_preview"] = original[:400].decode("utf-8", errors="replace")
        document["id"] = document.pop("_id")
        letters.append(document)
    counts = list(store[DEAD_LETTERS].aggregate([
        {"$match": {"project": project}},
        {"$group": {"_id": {"topic": "$topic", "error_type": "$error_type"}, "count": {"$sum": 1}, "last": {"$max": "$at"}}},
        {"$sort": {"count": -1}},
    ]))  # fmt: skip
    return {
        "total": store[DEAD_LETTERS].count_documents({"project": project}),
        "by_reason": [{**row["_id"], "count": row["count"], "last": row["last"]} for row in counts],
        "letters": letters,
    }
