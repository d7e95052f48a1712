"""Searchers: which configuration a study tries next, and ASHA's stop-or-continue rule.

Both are pure functions of the study's specification and what was recorded, so the scheduler can
be killed and restarted (or run twice) and still make the same choices:

- configuration ``n`` of a grid search is the grid's ``n``-th point (of a seeded permutation of
  the grid, for ASHA's ``shuffled-grid`` sampler); of a random search, a draw from a generator
  seeded with ``(seed, n)``. Either costs the same at trial 10 and at trial 10,000
  (model-based samplers that re-read every past trial slow down as a study grows);
- a trial reaching an ASHA rung continues only if its objective is in the best
  1/``reduction_factor`` of those recorded at that rung before it (Li et al., "A System for
  Massively Parallel Hyperparameter Tuning", MLSys 2020: the stopping variant, as in Ray Tune's
  ASHA and Determined's adaptive ASHA). The first configuration at a rung always continues.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from tensordb.studies.space import grid, parse_space, sample
from tensordb.studies.spec import ObjectiveSpec, StudySpec


@lru_cache(maxsize=64)
def _grid_of(space_json: str) -> list[dict[str, Any]]:
    """The grid of a space given as canonical JSON (built once per space, not once per trial)."""
    return grid(parse_space(json.loads(space_json)))


@lru_cache(maxsize=64)
def _order(size: int, seed: int) -> np.ndarray:
    """A seeded permutation of a grid's points (the order a ``shuffled-grid`` sampler visits them)."""
    return np.random.default_rng([seed, size]).permutation(size)


def configuration(spec: StudySpec, number: int) -> dict[str, Any] | None:
    """The hyper-parameters of configuration ``number`` (0-based), or None past the study's last.

    Parameters
    ----------
    spec : StudySpec
        The study.
    number : int
        Which configuration; the same number always gives the same values.
    """
    if number >= spec.configurations_limit():
        return None
    if spec.uses_grid:
        points = _grid_of(json.dumps(spec.space, sort_keys=True))
        if spec.searcher.name == "asha" and spec.searcher.sampler == "shuffled-grid":
            number = int(_order(len(points), spec.seed)[number])
        return dict(points[number])
    return sample(spec.parameters(), np.random.default_rng([spec.seed, number]))


@dataclass(frozen=True)
class RungVerdict:
    """ASHA's verdict on one configuration at one rung, with what it was compared with."""

    proceed: bool
    cutoff: float | None
    compared_with: int
    reason: str


def judge_at_rung(value: float | None, earlier: list[float], reduction_factor: int, objective: ObjectiveSpec) -> RungVerdict:
    """Whether a configuration whose objective at a rung is ``value`` continues.

    Parameters
    ----------
    value : float or None
        Its objective at the rung (mean over folds); None when the metric was missing or NaN.
    earlier : list of float
        The objectives recorded at this rung by other configurations before it.
    reduction_factor : int
        ASHA's η: the best 1/η continue.
    objective : ObjectiveSpec
        The metric's name and direction.
    """
    metric = objective.metric
    if value is None or not math.isfinite(value):
        return RungVerdict(False, None, len(earlier), f"{metric} was not reported as a number: stopped")
    known = [number for number in earlier if number is not None and math.isfinite(number)]
    if not known:
        return RungVerdict(True, None, 0, f"{metric} {value:.6g}: the first configuration at this rung continues")
    share = 100.0 * (1.0 - 1.0 / reduction_factor)
    cutoff = float(np.percentile(known, share if objective.direction == "max" else 100.0 - share))
    proceed = value >= cutoff if objective.direction == "max" else value <= cutoff
    comparison = (">=" if proceed else "<") if objective.direction == "max" else ("<=" if proceed else ">")
    verdict = "continues" if proceed else "stopped"
    return RungVerdict(
        proceed,
        cutoff,
        len(known),
        f"{metric} {value:.6g} {comparison} cut-off {cutoff:.6g} (the best 1/{reduction_factor} of {len(known)} earlier): {verdict}",
    )
