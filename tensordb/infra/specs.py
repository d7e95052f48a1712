"""Specifications written as JSON by users (studies, stages), checked by pydantic models and
refused with one error that names every field at fault and what to write instead."""

from __future__ import annotations

from typing import Any, TypeVar

import pydantic

from tensordb.errors import BadInputError

Spec = TypeVar("Spec", bound=pydantic.BaseModel)


class StrictSpec(pydantic.BaseModel):
    """A part of a specification: a misspelt field is an error (not ignored), and it never changes."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


def parse_spec(model: type[Spec], data: Any, what: str, error: type[BadInputError]) -> Spec:
    """``data`` as an instance of ``model``, or ``error`` listing each problem as ``field: message``.

    Parameters
    ----------
    model : type
        The pydantic model (``extra="forbid"``, so a misspelt field is named).
    data : mapping
        The specification as JSON.
    what : str
        What it is, for the message (e.g. "study").
    error : type
        The exception to raise (a :class:`~tensordb.errors.BadInputError`).
    """
    if not isinstance(data, dict):
        raise error(f"a {what} is a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        problems = []
        for detail in exc.errors():
            where = ".".join(str(part) for part in detail["loc"]) or what
            message = detail["msg"].removeprefix("Value error, ")
            if detail["type"] == "extra_forbidden":
                message = "unknown field (check its spelling)"
            problems.append(f"{where}: {message}")
        raise error(f"{what} {data.get('name', '?')!r} is not valid: " + "; ".join(problems)) from None
