"""Transform-stage functions that tests and benchmarks register (``tensordb.testing.stages:halve``...).

Not trusted by default: settings that run them list ``tensordb.testing.stages`` in
``trusted_modules`` (the tests' session fixture and the benchmarks do).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def halve(sample: dict[str, Any]) -> dict[str, Any]:
    """Every other pixel of the image ``x`` in each direction, labels kept (a resize stand-in)."""
    return {"arrays": {"x": sample["arrays"]["x"][::2, ::2]}, "labels": sample["labels"]}


def resize(sample: dict[str, Any]) -> dict[str, Any]:
    """A 2× nearest-neighbour upscale of ``x`` as float32 in [0, 1]: NumPy work of a realistic size."""
    image = np.repeat(np.repeat(sample["arrays"]["x"], 2, axis=0), 2, axis=1)
    return {"arrays": {"x": (image / 255.0).astype(np.float32)}, "labels": sample["labels"]}


def slow_copy(sample: dict[str, Any]) -> dict[str, Any]:
    """The sample unchanged, after 5 ms (backfills long enough to be interrupted)."""
    time.sleep(0.005)
    return {"arrays": sample["arrays"], "labels": sample["labels"]}


def mirror_pair(sample: dict[str, Any]) -> list[dict[str, Any]]:
    """Two derived samples: the image and its mirror (augmentation: one source, several samples)."""
    image = sample["arrays"]["x"]
    return [{"arrays": {"x": image}, "labels": sample["labels"]}, {"arrays": {"x": image[:, ::-1]}, "labels": sample["labels"]}]


def picky(sample: dict[str, Any]) -> Any:
    """Raises for label 3, returns garbage for label 4, nothing for label 5, else the sample."""
    label = sample["labels"].get("y")
    if label == 3:
        raise ValueError("label 3 is not wanted here")
    if label == 4:
        return "not a sample"
    if label == 5:
        return None
    return {"arrays": sample["arrays"], "labels": sample["labels"], "tags": ["picked"]}
