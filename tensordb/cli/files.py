"""Reading the JSON files users hand to the CLI (a study's, a stage's), with errors in TensorDB's terms."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tensordb.errors import BadInputError


def read_json_file(path: str, what: str, error: type[BadInputError]) -> dict[str, Any]:
    """The JSON object in ``path``; raises ``error`` when it cannot be read or parsed.

    Parameters
    ----------
    path : str
        The file the user named.
    what : str
        What the file holds ("study", "stage"), for the messages.
    error : type
        The exception to raise, so each command reports the error kind of its own specs.
    """
    try:
        spec = json.loads(Path(path).read_text())
    except OSError as exc:
        raise error(f"cannot read {what} file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{what} file {path} is not JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    if not isinstance(spec, dict):
        raise error(f"{what} file {path} must hold one JSON object, got {type(spec).__name__}")
    return spec
