"""The record contracts: one versioned JSON Schema file per record type (``<type>.v<N>.json``).

The files are language-neutral so that any Kafka client can produce valid records; this module only
finds and loads them.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

SCHEMA_DIR = Path(__file__).parent


@cache
def load_schema(record_type: str, version: int = 1) -> dict:
    """The JSON Schema of ``record_type`` (e.g. ``"sample"``, ``"job-request"``) at ``version``."""
    path = SCHEMA_DIR / f"{record_type.replace('-', '_')}.v{version}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no schema file {path.name} for {record_type}/{version} in {SCHEMA_DIR}")
    return json.loads(path.read_text())
