"""Reading step logs back and deleting them: a run's (or a job's, or any filter's) records as a
pandas DataFrame with one column per metric, built column-wise from a projected query.

The filters only narrow: the store restricts every query to the project
(:mod:`tensordb.infra.project_scope`), and metric and tag names cannot be query operators.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from tensordb.errors import QueryError
from tensordb.runs.logger import LOGS, PHASES

if TYPE_CHECKING:
    import pandas as pd

    from tensordb.infra.store import Store


def _matching(values: Any, what: str) -> Any:
    """A value, or any of a list/tuple/set of values ($in)."""
    if isinstance(values, (list, tuple, set, frozenset)):
        return {"$in": list(values)}
    if isinstance(values, Mapping):
        raise QueryError(f"{what} must be a value or a list of values, not a query document")
    return values


def _steps_filter(steps: Any) -> Any:
    """An int, a ``range`` or ``slice`` (half-open), ``(start, stop)`` bounds (None: open) or a list."""
    if isinstance(steps, range) and steps.step != 1:
        steps = list(steps)
    if isinstance(steps, slice) and steps.step not in (None, 1):
        raise QueryError("a slice of steps cannot have a stride; pass a range or a list of steps")
    if isinstance(steps, (range, slice)):
        steps = (steps.start, steps.stop)
    if isinstance(steps, tuple) and len(steps) == 2:
        start, stop = steps
        bounds = {**({"$gte": start} if start is not None else {}), **({"$lt": stop} if stop is not None else {})}
        return bounds or {"$exists": True}
    if isinstance(steps, (int, np.integer)) and not isinstance(steps, bool):
        return int(steps)
    if isinstance(steps, Iterable) and not isinstance(steps, (str, bytes, Mapping)):
        return {"$in": [int(step) for step in steps]}
    raise QueryError(f"steps must be an int, a range, a slice, (start, stop) or a list of steps; got {steps!r}")


def logs_filter(
    run_id: str | Iterable[str] | None = None,
    job_id: str | Iterable[str] | None = None,
    phase: str | Iterable[str] | None = None,
    steps: Any = None,
    metrics: Mapping[str, Any] | None = None,
    **tag_filters: Any,
) -> dict[str, Any]:
    """The MongoDB filter over the ``logs`` collection that read_logs and delete_logs use
    (the store restricts it to the project)."""
    query: dict[str, Any] = {}
    if run_id is not None:
        query["run_id"] = _matching(run_id, "run_id")
    if job_id is not None:
        query["job_id"] = _matching(job_id, "job_id")
    if phase is not None:
        wanted = [phase] if isinstance(phase, str) else list(phase)
        unknown = [p for p in wanted if p not in PHASES]
        if unknown:
            raise QueryError(f"unknown phase {unknown[0]!r}: phases are {', '.join(PHASES)}")
        query["phase"] = _matching(phase, "phase")
    if steps is not None:
        query["step"] = _steps_filter(steps)
    for prefix, filters in (("metrics", metrics or {}), ("tags", tag_filters)):
        for name, value in filters.items():
            if not name or name.startswith("$") or "." in name and prefix == "tags":
                raise QueryError(f"cannot filter on {prefix} name {name!r}")
            if isinstance(value, Mapping) and any(str(key).startswith("$") for key in value):
                raise QueryError(f"{prefix}.{name}: pass plain values, not query operators")
            query[f"{prefix}.{name}"] = _matching(value, f"{prefix}.{name}")
    return query


def read_logs(
    store: Store,
    run_id: str | Iterable[str] | None = None,
    job_id: str | Iterable[str] | None = None,
    phase: str | Iterable[str] | None = None,
    steps: Any = None,
    *,
    metrics: Mapping[str, Any] | None = None,
    as_numpy: bool = False,
    **tag_filters: Any,
) -> pd.DataFrame | dict[str, np.ndarray]:
    """The stored log records matching the filters, one row per (run, phase, step).

    Columns: run_id, job_id, phase, step, epoch, wall_time, then one float column per metric
    (NaN where a record lacks it), rows sorted by run, phase and step. Filters: ``run_id``,
    ``job_id`` and ``phase`` take a value or a list; ``steps`` an int, ``range``, ``slice``,
    ``(start, stop)`` or list; ``metrics={"name": value}`` exact metric values; any other keyword
    matches a tag. ``as_numpy=True`` returns the same columns as a dict of NumPy arrays.
    """
    query = logs_filter(run_id, job_id, phase, steps, metrics, **tag_filters)
    projection = {"_id": 0, "run_id": 1, "job_id": 1, "phase": 1, "step": 1, "epoch": 1, "wall_time": 1, "metrics": 1}
    runs: list[str] = []
    jobs: list[str | None] = []
    phases: list[str] = []
    step_list: list[int] = []
    epochs: list[float] = []
    times: list[float] = []
    metric_columns: dict[str, list[float | None]] = {}
    nan = float("nan")
    row = 0
    collecting = gc.isenabled()
    gc.disable()  # decoding builds ~10 objects per record: without this, GC re-scans them (~30% of the time)
    try:
        add_run, add_job, add_phase, add_step = runs.append, jobs.append, phases.append, step_list.append
        add_epoch, add_time = epochs.append, times.append
        for document in store[LOGS].find(query, projection, batch_size=50_000):
            add_run(document["run_id"])
            add_job(document.get("job_id"))
            add_phase(document["phase"])
            add_step(document["step"])
            epoch = document.get("epoch")
            add_epoch(nan if epoch is None else epoch)
            add_time(document["wall_time"])
            metrics = document["metrics"]
            for name, value in metrics.items():
                column = metric_columns.get(name)
                if column is None:
                    column = metric_columns[name] = [nan] * row
                column.append(value)
            row += 1
            if len(metrics) != len(metric_columns):  # this record lacks some metrics: pad them
                for column in metric_columns.values():
                    if len(column) < row:
                        column.append(nan)
    finally:
        if collecting:
            gc.enable()
    step_array = np.array(step_list, dtype=np.int64)
    run_array = np.array(runs, dtype=object)
    phase_array = np.array(phases, dtype=object)
    order = np.lexsort((step_array, phase_array, run_array)) if row else np.arange(0)
    columns: dict[str, np.ndarray] = {
        "run_id": run_array[order],
        "job_id": np.array(jobs, dtype=object)[order],
        "phase": phase_array[order],
        "step": step_array[order],
        "epoch": _epochs(epochs)[order],
        "wall_time": np.array(times, dtype=np.float64)[order],
    }
    for name in sorted(metric_columns):
        if name in columns:  # a metric named like a column: keep both
            columns[f"metrics.{name}"] = np.array(metric_columns[name], dtype=np.float64)[order]
        else:
            columns[name] = np.array(metric_columns[name], dtype=np.float64)[order]
    if as_numpy:
        return columns
    import pandas as pd

    return pd.DataFrame(columns, copy=False)


def _epochs(epochs: list[float]) -> np.ndarray:
    """Epochs as int64 when every record has one, else float64 with NaN for the missing."""
    array = np.array(epochs, dtype=np.float64)
    if array.size and not np.isnan(array).any():
        return array.astype(np.int64)
    return array


def delete_logs(
    store: Store,
    run_id: str | Iterable[str] | None = None,
    phase: str | Iterable[str] | None = None,
    *,
    job_id: str | Iterable[str] | None = None,
    steps: Any = None,
    metrics: Mapping[str, Any] | None = None,
    **tag_filters: Any,
) -> int:
    """Delete the project's log records matching the filters (as :func:`read_logs`); returns how many.

    With no filter at all every log record of the project is deleted (TensorLayer's
    ``delete_training_log()`` semantics). Records of a run still being logged may arrive after
    the deletion; stop or flush the run's logger first.
    """
    query = logs_filter(run_id, job_id, phase, steps, metrics, **tag_filters)
    return store[LOGS].delete_many(query).deleted_count
