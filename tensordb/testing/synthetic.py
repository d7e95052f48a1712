"""A synthetic training objective with a known optimum, for studies' tests, benchmarks and demos.

:func:`learning_curve` is an ``epoch_function`` (see ``workers.training.run_epoch_function``): each
call is one epoch of a "training" whose validation accuracy rises towards a ceiling set by the
configuration, ``1 - (x - 0.3)² - (y - 0.7)²`` (best at x=0.3, y=0.7), at a speed set by ``speed``,
with seeded noise, so searchers and early stopping can be checked against the truth. Not trusted
by default: settings that run it list ``tensordb.testing.synthetic`` in ``trusted_modules``.
"""

from __future__ import annotations

import math
import time
import zlib

import numpy as np

#: Where :func:`ceiling` is highest.
OPTIMUM = {"x": 0.3, "y": 0.7}


def ceiling(x: float, y: float) -> float:
    """The accuracy a configuration reaches after infinitely many epochs."""
    return 1.0 - (x - OPTIMUM["x"]) ** 2 - (y - OPTIMUM["y"]) ** 2


def learning_curve(
    epoch: int,
    x: float = 0.0,
    y: float = 0.0,
    speed: float = 0.5,
    noise: float = 0.0,
    seconds: float = 0.0,
    seed: int = 0,
    fold: int | None = None,
) -> dict[str, float]:
    """Validation metrics of ``epoch`` for configuration (x, y); sleeps ``seconds`` first.

    Parameters
    ----------
    epoch : int
        The epoch (0-based); accuracy is ``ceiling * (1 - exp(-speed * (epoch + 1)))`` plus noise.
    x, y : float
        The searched hyper-parameters.
    speed : float
        How fast the curve approaches its ceiling.
    noise : float
        Standard deviation of the Gaussian noise, the same for the same (configuration, epoch, fold, seed).
    seconds : float
        Time one epoch takes (a stand-in for training).
    seed : int
        Seeds the noise.
    fold : int, optional
        The cross-validation fold (given by k-fold studies): shifts the noise and the level a little.
    """
    if seconds > 0:
        time.sleep(seconds)
    rng = np.random.default_rng(zlib.crc32(repr((x, y, epoch, seed, fold)).encode()))
    level = ceiling(x, y) + (0.01 * fold if fold is not None else 0.0)
    accuracy = level * (1.0 - math.exp(-speed * (epoch + 1))) + noise * float(rng.standard_normal())
    return {"accuracy": accuracy, "loss": 1.0 - accuracy}
