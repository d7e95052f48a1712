"""The record contracts: every schema file is valid, good records pass, bad ones name field and rule."""

from __future__ import annotations

import json

import pytest

from schemas import SCHEMA_DIR, load_schema
from tensordb import records
from tensordb.config import Topic
from tensordb.errors import DecodeError, ValidationError

SAMPLE = {
    "schema": "sample/1",
    "dataset": "mnist",
    "arrays": {"image": {"dtype": "uint8", "shape": [2, 2], "data": "AAECAw=="}},
    "labels": {"digit": 3},
}


def test_every_topic_has_a_schema_file_that_is_itself_valid() -> None:
    import jsonschema

    files = {path.name for path in SCHEMA_DIR.glob("*.json")}
    for topic, schema_id in records.TOPIC_RECORDS.items():
        record_type, version = schema_id.split("/")
        schema = load_schema(record_type, int(version))
        jsonschema.validators.validator_for(schema).check_schema(schema)
        assert schema["properties"]["schema"] == {"const": schema_id}, topic
    assert len(files) == len(Topic)


def test_valid_record_round_trips_through_the_wire_format() -> None:
    assert records.decode(records.encode(SAMPLE, "sample/1"), "sample/1") == SAMPLE


@pytest.mark.parametrize(
    ("record", "field", "rule"),
    [
        ({k: v for k, v in SAMPLE.items() if k != "dataset"}, "dataset", "required"),
        ({**SAMPLE, "schema": "sample/2"}, "schema", "const"),
        ({**SAMPLE, "labels": 5}, "labels", "type"),
        ({**SAMPLE, "arrays": {"image": {"dtype": "complex64", "shape": [1], "data": ""}}}, "arrays.image.dtype", "enum"),
        ({**SAMPLE, "arrays": {"image": {"dtype": "uint8", "shape": [1], "blob_id": "0" * 24}}}, "arrays.image", "oneOf"),
        ({**SAMPLE, "unexpected": 1}, "$", "additionalProperties"),
    ],
)
def test_invalid_record_error_names_the_field_and_the_rule(record: dict, field: str, rule: str) -> None:
    with pytest.raises(ValidationError) as caught:
        records.validate(record, "sample/1")
    assert (caught.value.field, caught.value.rule) == (field, rule)
    assert field in str(caught.value) and rule in str(caught.value)


def test_wrong_version_message_says_which_version_the_topic_carries() -> None:
    with pytest.raises(ValidationError, match="this topic carries sample/1 records, not 'sample/2'"):
        records.validate({**SAMPLE, "schema": "sample/2"}, "sample/1")


@pytest.mark.parametrize("raw", [b"\xff\xfe garbage", b"[1, 2]", b"", None, b'"text"'])
def test_bytes_that_are_not_a_json_object_are_a_decode_error(raw: bytes | None) -> None:
    with pytest.raises(DecodeError):
        records.decode(raw, "sample/1")


def test_numpy_scalars_serialise_as_json_numbers() -> None:
    import numpy as np

    log = {"schema": "log/1", "run_id": "r", "phase": "train", "step": 1, "metrics": {"loss": 0.5}, "wall_time": 1.0}
    encoded = records.encode({**log, "metrics": {"loss": np.float32(0.5)}}, "log/1")
    assert json.loads(encoded)["metrics"]["loss"] == 0.5


def _integer_fields(schema: object, path: str = "$") -> list[tuple[str, dict]]:
    """Every subschema of ``schema`` that admits integers, with where it is."""
    if isinstance(schema, list):
        return [found for index, item in enumerate(schema) for found in _integer_fields(item, f"{path}[{index}]")]
    if not isinstance(schema, dict):
        return []
    kinds = schema.get("type", [])
    here = [(path, schema)] if "integer" in (kinds if isinstance(kinds, list) else [kinds]) else []
    return here + [found for key, value in schema.items() for found in _integer_fields(value, f"{path}.{key}")]


def test_every_integer_field_is_bounded_to_what_mongodb_stores() -> None:
    """An integer beyond 64 bits is refused by validation, naming the field (MongoDB would refuse
    the whole insert); labels hold any number and are checked before insert instead."""
    unbounded = []
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        for where, field in _integer_fields(json.loads(path.read_text())):
            if "number" in field["type"]:
                continue  # floats beyond 2**63 are storable: checked before insert (check_storable, insert_new)
            if not (-(2**63) <= field.get("minimum", -(2**64)) and field.get("maximum", 2**64) <= 2**63 - 1):
                unbounded.append(f"{path.name} {where}")
    assert unbounded == []
