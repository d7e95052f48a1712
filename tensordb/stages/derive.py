"""Running a stage's function on one source sample: what it is given, what it may return, and the
records of the derived samples (deterministic ids, lineage), checked before anything is stored.

The function receives one sample as a dict: ``id``, ``dataset``, ``version``, ``arrays`` (name →
NumPy array), ``labels``, ``metadata`` and ``tags``. It returns None or an empty list (nothing
derived), one derived sample, or a list of them; a derived sample is a dict with ``arrays`` (one
array, or name → array) and optionally ``labels``, ``metadata`` and ``tags``. The ``index``-th
derived sample of a source always gets the same id (:func:`derived_id`), so a redelivered
source, a retried batch or a backfill stores it once. Anything else it returns, or any exception
it raises, is a :class:`~tensordb.errors.StageFunctionError` naming the stage, the source sample
and what was wrong: the processors dead-letter that source sample and go on.

Derived samples never travel the bus: the processors store their bytes as they are (no base64
either way), after the same checks a ``sample/1`` record gets.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tensordb import records
from tensordb.data.samples import dtype_name, named_arrays, sample_fields
from tensordb.errors import StageFunctionError, TensorDBError
from tensordb.records import Schema
from tensordb.stages.spec import StageSpec

#: Most samples one source may derive: beyond, the function is probably wrong (and a batch would not fit).
MAX_DERIVED = 1000
_MAX_ID = 128


def derived_id(stage: str, version: int, source_id: str, index: int) -> str:
    """The id of the ``index``-th sample a stage version derives from ``source_id`` (the same every time)."""
    readable = f"{stage}.v{version}:{source_id}:{index}"
    if len(readable) <= _MAX_ID:
        return readable
    return f"{stage}.v{version}:h" + hashlib.sha256(f"{source_id}\0{index}".encode()).hexdigest()[:40]


@dataclass(frozen=True)
class DerivedSample:
    """A derived sample, checked and ready to store: its id, what a ``sample/1`` record would say
    about it besides its arrays (:func:`~tensordb.data.samples.sample_fields`), and its arrays
    (contiguous, little-endian)."""

    sample_id: str
    fields: dict[str, Any]
    arrays: dict[str, np.ndarray]


def source_view(
    document: Mapping[str, Any], arrays: dict[str, Any], prediction: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What the function is given for one stored sample (and, for a stage of a model's answers,
    the answer under ``prediction``: ``outputs``, ``classes``, ``model``, ``version``)."""
    view = {
        "id": document["_id"],
        "dataset": document["dataset"],
        "version": document.get("version"),
        "arrays": arrays,
        "labels": dict(document.get("labels") or {}),
        "metadata": dict(document.get("metadata") or {}),
        "tags": list(document.get("tags") or []),
    }
    if prediction is not None:
        view["prediction"] = {
            key: prediction[key] for key in ("outputs", "classes", "model", "version", "request_id") if key in prediction
        }
    return view


def derive(
    stage: StageSpec,
    function: Callable[[dict[str, Any]], Any],
    document: Mapping[str, Any],
    arrays: dict[str, Any],
    prediction: Mapping[str, Any] | None = None,
) -> list[DerivedSample]:
    """The samples ``function`` derives from one source sample (see the module docstring).

    Parameters
    ----------
    stage : StageSpec
        The stage: its name, version and output dataset.
    function : callable
        The stage's function, already loaded from a trusted module.
    document : mapping
        The source sample's stored document.
    arrays : dict
        Its arrays, read and checked.
    prediction : mapping, optional
        A model's answer about the sample (stages of a model's predictions): derived ids then
        come from the answer's request id, so each answer derives its own samples once.
    """
    source = document["_id"]
    key = source if prediction is None else str(prediction["request_id"])
    where = f"stage {stage.name!r} v{stage.version} ({stage.function}) on sample {source!r}"
    try:
        returned = function(source_view(document, arrays, prediction))
    except Exception as exc:  # noqa: BLE001 - any failure of user code is this sample's, never the processor's
        raise StageFunctionError(f"{where} raised {type(exc).__name__}: {exc}") from exc
    outputs = [] if returned is None else [returned] if isinstance(returned, Mapping) else returned
    if not isinstance(outputs, list | tuple):
        raise StageFunctionError(
            f"{where} returned {type(returned).__name__}; return a sample (a dict with 'arrays'), a list of them, or None"
        )
    if len(outputs) > MAX_DERIVED:
        raise StageFunctionError(f"{where} returned {len(outputs)} samples; at most {MAX_DERIVED} may be derived from one sample")
    derived = []
    for index, output in enumerate(outputs):
        if not isinstance(output, Mapping) or "arrays" not in output:
            raise StageFunctionError(
                f"{where}: derived sample {index} is {type(output).__name__} without 'arrays'; return dicts with 'arrays'"
            )
        unknown = sorted(set(output) - {"arrays", "labels", "metadata", "tags"})
        if unknown:
            raise StageFunctionError(
                f"{where}: derived sample {index} has unknown fields {unknown}; allowed: arrays, labels, metadata, tags"
            )
        try:
            sample = DerivedSample(
                derived_id(stage.name, stage.version, key, index),
                sample_fields(
                    dataset=stage.output.dataset,
                    labels=output.get("labels"),
                    metadata=output.get("metadata"),
                    tags=output.get("tags") or (),
                    version=stage.output.version,
                    source=f"stage:{stage.name}",
                    lineage={"derived_from": source, "stage": stage.name, "stage_version": stage.version},
                ),
                named_arrays(output["arrays"]),
            )
            records.validate(_described(sample), Schema.SAMPLE)
        except (TypeError, ValueError, TensorDBError) as exc:
            raise StageFunctionError(f"{where}: derived sample {index} cannot be stored: {exc}") from exc
        derived.append(sample)
    return derived


def _described(sample: DerivedSample) -> dict[str, Any]:
    """The ``sample/1`` record of ``sample`` with its arrays' bytes left out (``data`` empty), so the
    schema checks everything else a published record is checked for (names, dtypes, shapes, labels,
    tags) without encoding the bytes; their size is checked against dtype and shape when stored."""
    arrays = {
        name: {"dtype": dtype_name(array.dtype), "shape": list(array.shape), "data": ""} for name, array in sample.arrays.items()
    }
    return {"schema": Schema.SAMPLE, "sample_id": sample.sample_id, "arrays": arrays, **sample.fields}
