"""Encoding, decoding and validation of the JSON records that travel on TensorDB topics.

Every record carries ``"schema": "<type>/<version>"``. Producers validate before sending (the SDK
raises :class:`~tensordb.errors.ValidationError` naming the field and the rule); consumers validate
again on receipt, because any Kafka client may publish to a TensorDB topic.
"""

from __future__ import annotations

from enum import StrEnum
from functools import cache
from typing import Any

import jsonschema
import jsonschema_rs
import orjson
from jsonschema.exceptions import best_match

from schemas import load_schema
from tensordb.config import Topic
from tensordb.errors import DecodeError, ValidationError


class Schema(StrEnum):
    """The schema id (``"<type>/<version>"``) of each record type this code reads and writes: the
    value of every record's ``schema`` field, and the file it is checked against (``schemas/``)."""

    SAMPLE = "sample/1"
    DATA_IMPORTED = "data-imported/1"
    JOB_REQUEST = "job-request/1"
    JOB_EVENT = "job-event/1"
    LOG = "log/1"
    MODEL_EVENT = "model-event/1"
    DEAD_LETTER = "dead-letter/1"
    PREDICT_REQUEST = "predict-request/1"
    PREDICTION = "prediction/1"


#: The record type each topic carries.
TOPIC_RECORDS: dict[Topic, Schema] = {
    Topic.INGEST: Schema.SAMPLE,
    Topic.DATA_IMPORTED: Schema.DATA_IMPORTED,
    Topic.JOB_REQUESTS: Schema.JOB_REQUEST,
    Topic.JOB_EVENTS: Schema.JOB_EVENT,
    Topic.LOGS: Schema.LOG,
    Topic.MODEL_EVENTS: Schema.MODEL_EVENT,
    Topic.DEAD_LETTERS: Schema.DEAD_LETTER,
    Topic.PREDICT_REQUESTS: Schema.PREDICT_REQUEST,
    Topic.PREDICTIONS: Schema.PREDICTION,
}


def _schema(schema_id: str) -> dict[str, Any]:
    record_type, version = schema_id.rsplit("/", 1)
    return load_schema(record_type, int(version))


@cache
def _fast_check(schema_id: str) -> Any:
    """A compiled (Rust) validator: ~1 µs per log record, against ~50 µs for pure Python."""
    return jsonschema_rs.validator_for(_schema(schema_id))


@cache
def _explainer(schema_id: str) -> Any:
    """The pure-Python validator, used only for invalid records, for its precise error tree."""
    schema = _schema(schema_id)
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


def _field_path(error: jsonschema.ValidationError) -> str:
    path = [str(part) for part in error.absolute_path]
    if error.validator == "required":
        # jsonschema reports a missing field at its parent; name the field itself.
        missing = [name for name in error.validator_value if name not in error.instance]
        path.append(missing[0] if missing else "?")
    return ".".join(path) or "$"


def _most_specific(error: jsonschema.ValidationError) -> tuple[str, str, str]:
    """Field, rule and message of the error a person should fix first.

    For ``oneOf`` (array encodings) pick the failure inside the alternative the record meant, e.g.
    an unknown dtype, rather than "not valid under any of the given schemas".
    """
    if error.validator in ("oneOf", "anyOf") and error.context:
        specific = [e for e in error.context if e.validator not in ("required", "additionalProperties")]
        if specific:
            return _most_specific(best_match(specific))
        forms = "; ".join(
            f"{branch.get('title', 'form')} (fields {', '.join(branch.get('required', []))})" for branch in error.validator_value
        )
        return _field_path(error), str(error.validator), f"must take one of these forms: {forms}"
    return _field_path(error), str(error.validator), error.message


def validate(record: Any, schema_id: str) -> dict[str, Any]:
    """Check ``record`` against the schema ``schema_id`` (e.g. ``"sample/1"``); return it unchanged."""
    if not isinstance(record, dict):
        raise ValidationError(schema_id, "$", "type", f"a record is a JSON object, got {type(record).__name__}")
    declared = record.get("schema")
    if declared != schema_id:
        hint = "add it" if declared is None else f"this topic carries {schema_id} records, not {declared!r}"
        raise ValidationError(schema_id, "schema", "const", f'expected "schema": "{schema_id}"; {hint}')
    try:
        if _fast_check(schema_id).is_valid(record):
            return record
    except ValueError:  # NumPy scalars and arrays: check the JSON they serialise to
        validate(_as_json(record, schema_id), schema_id)
        return record
    error = best_match(_explainer(schema_id).iter_errors(record))
    if error is None:  # the two validators disagree: trust the stricter one, say so
        raise ValidationError(schema_id, "$", "schema", "record rejected by the compiled validator")
    raise ValidationError(schema_id, *_most_specific(error))


def _as_json(record: dict[str, Any], schema_id: str) -> dict[str, Any]:
    try:
        return orjson.loads(orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY))
    except TypeError as exc:
        raise ValidationError(schema_id, "$", "json", f"record is not JSON-serialisable: {exc}") from exc


def encode(record: dict[str, Any], schema_id: str) -> bytes:
    """Validate and serialise a record to the UTF-8 JSON bytes that go on the wire."""
    validate(record, schema_id)
    return orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY)


def parse(raw: bytes | None) -> dict[str, Any]:
    """Parse wire bytes into a JSON object, or raise :class:`DecodeError` saying why not."""
    if raw is None:
        raise DecodeError("record has no value (null/tombstone); publish a JSON object")
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"record is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise DecodeError(f"record must be a JSON object, got JSON {type(record).__name__}")
    return record


def decode(raw: bytes | None, schema_id: str) -> dict[str, Any]:
    """Parse and validate wire bytes; raises :class:`DecodeError` or :class:`ValidationError`."""
    return validate(parse(raw), schema_id)
