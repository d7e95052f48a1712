"""Search spaces: what each hyper-parameter of a study may be, how it is sampled, and its grid.

A space maps names to one of four kinds, written as one-key objects in a study's JSON::

    {"units": {"choice": [32, 64, 128]},         # one of the values
     "layers": {"int": [1, 3]},                   # an integer in [low, high]
     "dropout": {"uniform": [0.0, 0.5]},          # a real in [low, high]
     "learning_rate": {"loguniform": [1e-4, 1e-1], "grid": 4}}   # a real, log-scaled

``grid`` says how many points a real parameter contributes to a grid search (grids of integers
and choices use every value). Sampling is by a caller's NumPy generator, so one seed gives one
sequence of configurations.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tensordb.errors import StudySpecError

KINDS = ("choice", "int", "uniform", "loguniform")
#: Most configurations a grid may have: beyond, a random or ASHA search is what is wanted.
MAX_GRID = 100_000


@dataclass(frozen=True)
class Parameter:
    """One hyper-parameter's domain (see the module docstring)."""

    name: str
    kind: str
    values: tuple[Any, ...] = ()  #: for ``choice``
    low: float = 0.0
    high: float = 0.0
    grid_points: int | None = None  #: for ``uniform`` and ``loguniform`` in a grid

    def sample(self, rng: np.random.Generator) -> Any:
        """One value drawn from the domain (uniformly; log-uniformly for ``loguniform``)."""
        if self.kind == "choice":
            return self.values[int(rng.integers(len(self.values)))]
        if self.kind == "int":
            return int(rng.integers(int(self.low), int(self.high) + 1))
        if self.kind == "uniform":
            return float(rng.uniform(self.low, self.high))
        return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))

    def grid_size(self) -> int:
        """How many values :meth:`grid` gives (without building them)."""
        if self.kind == "choice":
            return len(self.values)
        if self.kind == "int":
            return int(self.high - self.low) + 1
        return len(self.grid())

    def grid(self) -> list[Any]:
        """The values a grid search tries, in order."""
        if self.kind == "choice":
            return list(self.values)
        if self.kind == "int":
            if self.high - self.low + 1 > MAX_GRID:
                raise StudySpecError(
                    f"parameter {self.name!r} alone has more than {MAX_GRID} grid values: use a random or ASHA searcher"
                )
            return list(range(int(self.low), int(self.high) + 1))
        if self.grid_points is None:
            raise StudySpecError(
                f"a grid search needs a number of points for the real parameter {self.name!r}: "
                f'write {{"{self.kind}": [{self.low}, {self.high}], "grid": 3}}, or use a random or ASHA searcher'
            )
        if self.grid_points == 1:
            return [float(self.low)]
        if self.kind == "uniform":
            return [float(value) for value in np.linspace(self.low, self.high, self.grid_points)]
        return [float(value) for value in np.geomspace(self.low, self.high, self.grid_points)]

    def as_json(self) -> dict[str, Any]:
        """The parameter as a study's JSON writes it."""
        domain: dict[str, Any] = {self.kind: list(self.values) if self.kind == "choice" else [self.low, self.high]}
        if self.grid_points is not None:
            domain["grid"] = self.grid_points
        return domain


def _bounds(name: str, kind: str, bounds: Any) -> tuple[float, float]:
    if not (isinstance(bounds, list | tuple) and len(bounds) == 2) or not all(
        isinstance(bound, int | float) and not isinstance(bound, bool) and math.isfinite(bound) for bound in bounds
    ):
        raise StudySpecError(f"parameter {name!r}: {kind} takes [low, high] as two finite numbers, got {bounds!r}")
    low, high = bounds
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise StudySpecError(f"parameter {name!r}: int bounds must be integers, got {bounds!r}")
    if low > high:
        raise StudySpecError(f"parameter {name!r}: low {low} is above high {high}")
    if kind == "loguniform" and low <= 0:
        raise StudySpecError(f"parameter {name!r}: loguniform needs low > 0 (a logarithm is taken), got {low}")
    return float(low), float(high)


def parse_parameter(name: str, domain: Any) -> Parameter:
    """One parameter from its JSON form; raises :class:`StudySpecError` saying what is wrong.

    Parameters
    ----------
    name : str
        The hyper-parameter's name (what the model builder or epoch function receives).
    domain : mapping
        ``{"choice": [...]}``, ``{"int": [low, high]}``, ``{"uniform": [low, high]}`` or
        ``{"loguniform": [low, high]}``, with ``"grid": N`` for reals in a grid search.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise StudySpecError(f"a searched parameter's name must be an identifier (it becomes an argument), got {name!r}")
    if not isinstance(domain, Mapping):
        raise StudySpecError(f'parameter {name!r}: expected an object such as {{"uniform": [0, 1]}}, got {domain!r}')
    kinds = [key for key in domain if key in KINDS]
    unknown = sorted(set(domain) - set(KINDS) - {"grid"})
    if len(kinds) != 1 or unknown:
        raise StudySpecError(
            f"parameter {name!r}: give exactly one of {', '.join(KINDS)} (and optionally grid), got {sorted(domain)}"
        )
    kind = kinds[0]
    grid_points = domain.get("grid")
    if grid_points is not None:
        if kind not in ("uniform", "loguniform"):
            raise StudySpecError(
                f"parameter {name!r}: grid applies to uniform and loguniform only (a {kind} grid uses every value)"
            )
        if not isinstance(grid_points, int) or isinstance(grid_points, bool) or not 1 <= grid_points <= 1000:
            raise StudySpecError(f"parameter {name!r}: grid must be an integer from 1 to 1000, got {grid_points!r}")
    if kind == "choice":
        values = domain["choice"]
        if not isinstance(values, list | tuple) or not values:
            raise StudySpecError(f"parameter {name!r}: choice takes a non-empty list of values, got {values!r}")
        if len({repr(value) for value in values}) != len(values):
            raise StudySpecError(f"parameter {name!r}: choice lists a value twice: {values!r}")
        return Parameter(name, kind, values=tuple(values))
    low, high = _bounds(name, kind, domain[kind])
    return Parameter(name, kind, low=low, high=high, grid_points=grid_points)


def parse_space(space: Any) -> dict[str, Parameter]:
    """A whole search space from its JSON form, in name order; raises :class:`StudySpecError`."""
    if not isinstance(space, Mapping) or not space:
        raise StudySpecError(
            f'a study needs a search space: an object of parameters, e.g. {{"units": {{"choice": [32, 64]}}}}; got {space!r}'
        )
    return {name: parse_parameter(name, space[name]) for name in sorted(space)}


def grid_size(space: Mapping[str, Parameter]) -> int:
    """How many configurations :func:`grid` gives; raises :class:`StudySpecError` beyond :data:`MAX_GRID`."""
    size = math.prod(parameter.grid_size() for parameter in space.values())
    if size > MAX_GRID:
        raise StudySpecError(
            f"the grid has {size} configurations (more than {MAX_GRID}): use fewer points, or a random or ASHA searcher"
        )
    return size


def grid(space: Mapping[str, Parameter]) -> list[dict[str, Any]]:
    """Every configuration of a grid search, in a fixed order (the last parameter varies fastest)."""
    grid_size(space)
    axes = [parameter.grid() for parameter in space.values()]
    return [dict(zip(space, values, strict=True)) for values in itertools.product(*axes)]


def sample(space: Mapping[str, Parameter], rng: np.random.Generator) -> dict[str, Any]:
    """One configuration drawn at random (each parameter independently)."""
    return {name: parameter.sample(rng) for name, parameter in space.items()}
