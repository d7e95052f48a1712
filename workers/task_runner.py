"""Runs one task script in this (child) process: ``python -m workers.task_runner SCRIPT PARAMS RESULT``.

The script is a file on the worker (never code from the database); its hyper-parameters are its
initial globals. Afterwards the requested keys are read from its globals and written as JSON.
"""

from __future__ import annotations

import json
import runpy
import sys
from typing import Any


def _json_value(value: Any) -> Any:
    """NumPy scalars and arrays become plain JSON; anything else that JSON cannot hold, its repr."""
    if hasattr(value, "tolist"):
        return value.tolist()
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def main(script: str, parameters_path: str, result_path: str) -> None:
    with open(parameters_path) as file:
        parameters = json.load(file)
    final_globals = runpy.run_path(script, init_globals=parameters["globals"], run_name="__main__")
    missing = [key for key in parameters["save_keys"] if key not in final_globals]
    if missing:
        raise SystemExit(f"the script finished without defining {missing}; set them as globals or change saved_result_keys")
    with open(result_path, "w") as file:
        json.dump({key: _json_value(final_globals[key]) for key in parameters["save_keys"]}, file)


if __name__ == "__main__":
    main(*sys.argv[1:4])
