"""A transform stage's specification, written as JSON (``tensordb stage register FILE.json``)::

    {"name": "resize", "version": 1,
     "input": {"filter": {"dataset": "raw-scans"}},
     "function": "mypkg.prep:resize",
     "output": {"dataset": "scans-64"}}

The function (in a trusted module) takes one sample and returns zero or more derived samples
(see :mod:`tensordb.stages.derive`). With ``"input": {"predictions": {"model": "teacher"}}`` it
takes a model's answers instead (each with the stored sample the request named), which turns one
model's predictions into another's training data. A new ``version`` changes what the stage does from then on;
samples stored before are re-derived on request (backfill).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from tensordb.data.cohorts import validate_filter
from tensordb.errors import QueryError, StageSpecError
from tensordb.infra.specs import StrictSpec, parse_spec

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
DATASET = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
ENTRY_POINT = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


class PredictionsInput(StrictSpec):
    """A model's answers on the predictions topic (model chaining): each answer to a request that
    named a stored sample is given to the function with that sample."""

    model: str

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        if not DATASET.match(value):
            raise ValueError("a model name is 1-128 letters, digits, '_', '.' or '-'")
        return value


class StageInput(StrictSpec):
    """What the stage reads: new samples matching a filter, as in cohorts (``{"filter": {"dataset":
    "raw"}}``), or a model's predictions (``{"predictions": {"model": "teacher"}}``)."""

    filter: dict[str, Any] | None = None
    predictions: PredictionsInput | None = None

    @field_validator("filter")
    @classmethod
    def _query(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        try:
            return None if value is None else validate_filter(value, "input.filter")
        except QueryError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _one(self) -> StageInput:
        if (self.filter is None) == (self.predictions is None):
            raise ValueError("input is either {'filter': {...}} (samples) or {'predictions': {'model': NAME}}")
        return self


class StageOutput(StrictSpec):
    """Where derived samples go: their dataset (and dataset version)."""

    dataset: str
    version: str | int | None = None

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, value: str) -> str:
        if not DATASET.match(value):
            raise ValueError("a dataset name is 1-128 letters, digits, '_', '.' or '-'")
        return value


class StageSpec(StrictSpec):
    """A validated stage (see the module docstring)."""

    name: str
    version: int = Field(1, ge=1, le=1_000_000)
    input: StageInput
    function: str
    output: StageOutput
    description: str = Field("", max_length=10_000)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError("use 1-64 letters, digits, '_' or '-', starting with a letter or digit")
        return value

    @field_validator("function")
    @classmethod
    def _function(cls, value: str) -> str:
        if not ENTRY_POINT.match(value):
            raise ValueError("a function is named 'package.module:function'")
        return value

    def as_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    @property
    def reads_predictions(self) -> bool:
        return self.input.predictions is not None

    def same_work(self, other: StageSpec) -> bool:
        """Whether ``other`` does what this does (a re-registration that changes nothing)."""
        return (self.input, self.function, self.output) == (other.input, other.function, other.output)


def parse_stage(spec: Any) -> StageSpec:
    """A :class:`StageSpec` from JSON-like data; raises :class:`StageSpecError` naming every problem.

    Parameters
    ----------
    spec : mapping
        The stage as JSON (see the module docstring).
    """
    return parse_spec(StageSpec, spec, "stage", StageSpecError)
