"""TensorDB's own example stage function, trusted without configuration like the example model
builders (:data:`tensordb.infra.trusted.ALWAYS_TRUSTED`): the distillation example runs on a
fresh installation."""

from __future__ import annotations

from typing import Any

import numpy as np

#: Below this probability the teacher is not sure enough: no pseudo-label.
CONFIDENCE = 0.5


def pseudo_label(sample: dict[str, Any]) -> dict[str, Any] | None:
    """A teacher's answer about an unlabelled sample as its label: the most likely class as
    ``digit``, the probabilities as ``soft`` (for distillation), the arrays kept; nothing when the
    teacher is unsure (highest probability below :data:`CONFIDENCE`)."""
    prediction = sample.get("prediction")
    if not prediction or not prediction.get("outputs"):
        return None
    probabilities = np.asarray(prediction["outputs"][0], dtype=float)
    if probabilities.ndim != 1 or probabilities.max() < CONFIDENCE:
        return None
    return {
        "arrays": sample["arrays"],
        "labels": {"digit": int(probabilities.argmax()), "soft": [round(float(p), 6) for p in probabilities]},
        "metadata": {"teacher": {"model": prediction["model"], "version": prediction["version"]}},
    }
