"""A study's specification: what is searched, how, judged by what, within which limits.

Written as JSON (``tensordb study create FILE.json``) or keyword arguments (``db.create_study``)
and checked here, before anything is stored, with errors that name the field and what to write::

    {"name": "digits-mlp", "model": {"entry_point": "tensordb.models.examples:digits_mlp"},
     "data": {"filter": {"dataset": "digits"}}, "folds": 5,
     "space": {"units": {"choice": [32, 64]}, "learning_rate": {"loguniform": [1e-4, 1e-2]}},
     "searcher": {"name": "asha", "sampler": "random", "min_epochs": 1, "max_epochs": 9, "reduction_factor": 3},
     "objective": {"metric": "accuracy", "direction": "max"},
     "max_trials": 40, "max_concurrent": 4, "seed": 7}

A *trial* is one train job: one configuration on one fold. With ``folds=k`` every configuration
runs k trials and is judged by the mean of their objectives; ``max_trials`` counts trials.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tensordb.errors import StudySpecError
from tensordb.infra.specs import StrictSpec, parse_spec
from tensordb.studies.space import Parameter, grid_size, parse_space

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Model spec keys that build something to train (see ``workers.training``).
MODEL_KEYS = ("architecture", "entry_point", "epoch_function")


class SearcherSpec(StrictSpec):
    """How configurations are chosen, and whether hopeless trials stop early.

    ``grid`` tries every configuration of the space in order; ``random`` draws ``max_trials``
    configurations with the study's seed; ``asha`` (asynchronous successive halving) draws
    configurations with its ``sampler`` (``random``, ``grid`` in order, or ``shuffled-grid``: the
    grid in an order drawn with the seed, so that early configurations, which ASHA judges against
    fewer others, are not all alike) and stops a trial at a rung (epochs ``min_epochs`` ×
    ``reduction_factor``\\ :sup:`k` below ``max_epochs``) unless it is in the best
    1/``reduction_factor`` of the configurations that reached that rung before it.
    """

    name: Literal["grid", "random", "asha"] = "grid"
    sampler: Literal["grid", "shuffled-grid", "random"] = "random"
    min_epochs: int = Field(1, ge=1, le=100_000)
    max_epochs: int | None = Field(None, ge=1, le=100_000)
    reduction_factor: int = Field(3, ge=2, le=100)

    def rungs(self) -> list[int]:
        """ASHA's rungs: the epoch counts at which trials are judged (none for grid and random)."""
        if self.name != "asha" or self.max_epochs is None:
            return []
        rungs, epochs = [], self.min_epochs
        while epochs < self.max_epochs:
            rungs.append(epochs)
            epochs *= self.reduction_factor
        return rungs


class ObjectiveSpec(StrictSpec):
    """The validation metric a study optimises (as logged in phase ``validation``) and its direction."""

    metric: str = Field(min_length=1, max_length=128)
    direction: Literal["max", "min"] = "max"

    @field_validator("direction", mode="before")
    @classmethod
    def _short_direction(cls, value: Any) -> Any:
        return {"maximize": "max", "minimize": "min"}.get(value, value)

    def better(self, value: float, other: float) -> bool:
        """Whether ``value`` beats ``other`` in this direction."""
        return value > other if self.direction == "max" else value < other


class StudySpec(StrictSpec):
    """A validated study (see the module docstring for the JSON form)."""

    name: str
    model: dict[str, Any]
    objective: ObjectiveSpec
    space: dict[str, Any]
    searcher: SearcherSpec = SearcherSpec()
    data: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None
    folds: int | None = Field(None, ge=2, le=20)
    hyperparameters: dict[str, Any] = {}
    epochs: int = Field(1, ge=1, le=100_000)
    max_trials: int | None = Field(None, ge=1, le=1_000_000)
    max_concurrent: int = Field(2, ge=1, le=10_000)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    model_name: str | None = None
    priority: int = Field(0, ge=-100, le=100)
    description: str = Field("", max_length=10_000)

    @field_validator("name", "model_name")
    @classmethod
    def _names(cls, value: str | None) -> str | None:
        if value is not None and not NAME.match(value):
            raise ValueError("use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> StudySpec:
        builders = [key for key in MODEL_KEYS if key in self.model]
        if len(builders) != 1:
            raise ValueError(f"model needs exactly one of {', '.join(MODEL_KEYS)}; got {sorted(self.model) or 'none'}")
        keras = builders[0] != "epoch_function"
        if keras and self.data is None:
            raise ValueError("a study that trains a Keras model needs data: the training cohort, e.g. {'cohort': NAME}")
        if self.validation is not None and self.folds is not None:
            raise ValueError("give either validation (a cohort) or folds (k-fold splits of data), not both")
        if keras and self.validation is None and self.folds is None:
            raise ValueError("the objective is read from validation logs: give validation (a cohort) or folds=k")
        overlap = sorted(set(self.space) & set(self.hyperparameters))
        if overlap:
            raise ValueError(f"{overlap} are both searched (space) and fixed (hyperparameters): keep one")
        searcher = self.searcher
        if searcher.name == "asha":
            if searcher.max_epochs is None:
                raise ValueError("an asha searcher needs max_epochs (trials that are never stopped train that long)")
            if not searcher.rungs() or searcher.min_epochs * searcher.reduction_factor > searcher.max_epochs:
                raise ValueError(
                    f"asha with min_epochs={searcher.min_epochs}, reduction_factor={searcher.reduction_factor} "
                    f"judges nothing before max_epochs={searcher.max_epochs}: max_epochs must be at least "
                    f"min_epochs × reduction_factor = {searcher.min_epochs * searcher.reduction_factor}"
                )
        if not self.uses_grid and self.max_trials is None:
            raise ValueError("a search that samples at random needs max_trials (how many trials to run in all)")
        if self.max_trials is not None and self.max_trials % self.folds_or_one:
            raise ValueError(
                f"max_trials ({self.max_trials}) must be a multiple of folds ({self.folds}): each configuration runs once per fold"
            )
        return self

    # -- derived ------------------------------------------------------------------------------
    @property
    def folds_or_one(self) -> int:
        return self.folds or 1

    @property
    def trial_epochs(self) -> int:
        """How long a trial trains unless stopped early."""
        return self.searcher.max_epochs if self.searcher.name == "asha" and self.searcher.max_epochs else self.epochs

    @property
    def registered_name(self) -> str:
        """The model name the trials' versions are registered under."""
        return self.model_name or self.name

    def parameters(self) -> dict[str, Parameter]:
        return parse_space(self.space)

    def configurations_limit(self) -> int:
        """How many configurations the study tries at most."""
        if self.uses_grid:
            size = grid_size(self.parameters())
            return min(size, self.max_trials // self.folds_or_one) if self.max_trials else size
        assert self.max_trials is not None  # checked by the validator
        return self.max_trials // self.folds_or_one

    @property
    def uses_grid(self) -> bool:
        return self.searcher.name == "grid" or (self.searcher.name == "asha" and self.searcher.sampler != "random")

    def as_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def parse_study(spec: Any) -> StudySpec:
    """A :class:`StudySpec` from JSON-like data; raises :class:`StudySpecError` naming every problem.

    Parameters
    ----------
    spec : mapping
        The study as JSON (see the module docstring).
    """
    study = parse_spec(StudySpec, spec, "study", StudySpecError)
    study.parameters()  # the space's own checks
    if study.uses_grid:
        study.configurations_limit()  # a grid that cannot be built is refused now, not at the first trial
    return study
