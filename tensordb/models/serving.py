"""Answering with a stored version: loading it ready to predict, checking inputs against its input
shape before any array is built, and shaping its outputs. The model server (``workers.serve``) and
the dashboard's "try a model" share these, so both refuse the same misfits with the same words.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from tensordb.errors import InputShapeError, ModelNotFoundError
from tensordb.models.registry import ModelRegistry


def load_version(registry: ModelRegistry, name: str, version: int) -> Any:
    """Version ``version`` of ``name`` rebuilt, with its weights, and warmed up on zeros (so the first
    real request does not pay for tracing); ``model.tensordb_info`` is its document.

    Raises :class:`~tensordb.errors.ModelNotFoundError` when there is no such version.
    """
    model = registry.find(name=name, version=version)
    if model is None:
        raise ModelNotFoundError(f"model {name!r} has no version {version} in project {registry.project!r}")
    model.predict_on_batch(np.zeros((1, *model.input_shape[1:]), dtype="float32"))
    return model


def input_shape(model: Any) -> tuple[int | None, ...]:
    """The shape of one instance (the model's input shape without the batch axis)."""
    return tuple(model.input_shape[1:])


def _misfit(value: Any, expected: tuple[int | None, ...], path: str) -> str | None:
    """How ``value`` (nested lists from JSON) departs from ``expected``, or ``None`` when it fits:
    checked before numpy sees it, so no array is ever built from a wrong shape."""
    if not expected:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        return f"{path} is {type(value).__name__}, not a number"
    if not isinstance(value, list):
        return f"{path} is {type(value).__name__}, not a list"
    if expected[0] is not None and len(value) != expected[0]:
        return f"{path} has {len(value)} items, not {expected[0]}"
    return next(
        (problem for index, item in enumerate(value) if (problem := _misfit(item, expected[1:], f"{path}[{index}]"))), None
    )


def _refuse(expected: tuple[int | None, ...], problem: str) -> InputShapeError:
    return InputShapeError(f"each instance must have shape {list(expected)} (numbers in nested lists): {problem}")


def _finite(batch: np.ndarray) -> np.ndarray:
    if not np.isfinite(batch).all():
        raise InputShapeError("instances contain NaN or infinity (or numbers too large for float32)")
    return batch


def instances_batch(instances: list[Any], model: Any) -> np.ndarray:
    """JSON instances (nested lists) as one float32 batch, once each fits the model's input shape.

    Raises :class:`~tensordb.errors.InputShapeError` naming the first misfit, or a value that is not a
    finite float32.
    """
    expected = input_shape(model)
    for index, instance in enumerate(instances):
        problem = _misfit(instance, expected, f"instances[{index}]")
        if problem is not None:
            raise _refuse(expected, problem)
    try:
        batch = np.asarray(instances, dtype="float32")
    except OverflowError:
        raise InputShapeError("instances hold a number too large for float32") from None
    return _finite(batch)


def array_batch(arrays: np.ndarray, model: Any) -> np.ndarray:
    """Stored arrays (one per instance, stacked) as a float32 batch, once their shape fits the model's
    input shape; the same refusals as :func:`instances_batch`."""
    expected = input_shape(model)
    shape = arrays.shape[1:]
    if len(shape) != len(expected) or any(want is not None and got != want for got, want in zip(shape, expected, strict=False)):
        raise _refuse(expected, f"the samples' arrays have shape {list(shape)}")
    return _finite(arrays.astype("float32"))


def predictions(model: Any, batch: np.ndarray) -> dict[str, Any]:
    """The model's outputs for ``batch`` as JSON-ready lists: ``predictions``, and ``classes`` (the
    arg-max) when the output is a vector of scores per instance."""
    outputs = np.asarray(model.predict_on_batch(batch))
    answer: dict[str, Any] = {"predictions": outputs.tolist()}
    if outputs.ndim == 2 and outputs.shape[1] > 1:
        answer["classes"] = outputs.argmax(axis=1).tolist()
    return answer


class LoadedVersions:
    """The last few versions loaded (any model), each loaded once even when asked for at once by
    several threads; the least recently used is dropped beyond ``capacity``.

    Parameters
    ----------
    registry : ModelRegistry
        Where versions are loaded from.
    capacity : int
        How many loaded versions are kept.
    """

    def __init__(self, registry: ModelRegistry, capacity: int = 4) -> None:
        self.registry = registry
        self.capacity = capacity
        self.loads = 0
        self._models: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, int], threading.Lock] = {}

    def get(self, name: str, version: int) -> Any:
        """Version ``version`` of ``name``, ready to predict (see :func:`load_version`)."""
        key = (name, version)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one load per version; the others wait for it
            with self._lock:
                if key in self._models:
                    return self._models[key]
            try:
                model = load_version(self.registry, name, version)
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            with self._lock:
                self.loads += 1
                self._models[key] = model
                while len(self._models) > self.capacity:
                    self._models.popitem(last=False)
            return model
