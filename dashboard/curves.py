"""A run's curves for the dashboard: reading them from MongoDB, and the downsampling that keeps the
overview light.

A run's points come from the ``logs`` collection (one document per run, phase and step, index
``(project, run_id, phase, step)``). Up to :data:`FULL_POINTS` per phase a chart gets every
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
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pymongo import ASCENDING, DESCENDING
from pymongo.errors import PyMongoError

from tensordb.infra.store import Store
from tensordb.runs.logger import LOGS

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


def read_columns(
    store: Store, run_id: str, phase: str, lo: int | None = None, hi: int | None = None, steps: list[int] | None = None
) -> Columns:
    """The stored points of a run's phase (optionally steps lo..hi inclusive, or the listed steps)."""
    query = _query(store, run_id, phase, lo, hi)
    if steps is not None:
        query["step"] = {"$in": steps}
    cursor = store[LOGS].find(
        query, {"_id": 0, "step": 1, "wall_time": 1, "metrics": 1}, sort=[("step", ASCENDING)], batch_size=20_000
    )
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
            merged[3:6, :half] = np.take_along_axis(pairs[3:6], np.broadcast_to(high[None, :, None], (3, half, 1)), axis=2)[
                ..., 0
            ]
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

    def get(
        self, run_id: str, phase: str, lo: float | None = None, hi: float | None = None, timeout: float = 30.0
    ) -> EnvelopeView | None:
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
                envelope.exact,
                envelope.width,
                envelope.last_step,
                {name: envelope.points(name, lo, hi) for name in envelope.names()},
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
            oldest = min(
                (k for k, e in self._entries.items() if e.ready.is_set()), key=lambda k: self._entries[k].used, default=None
            )
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
