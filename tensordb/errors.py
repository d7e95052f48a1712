"""Every error TensorDB raises on purpose, each with a message that says what to do."""


class TensorDBError(Exception):
    """Base class: catch this to handle any TensorDB failure."""


class ConfigurationError(TensorDBError):
    """A setting is missing or malformed."""


class ValidationError(TensorDBError, ValueError):
    """A record does not match its JSON Schema.

    ``field`` is the JSON path of the offending field (``"$"`` for the record itself) and ``rule``
    the schema keyword that failed (``required``, ``type``, ``const``...), so callers can react
    programmatically as well as print the message.
    """

    def __init__(self, record_type: str, field: str, rule: str, detail: str) -> None:
        self.record_type = record_type
        self.field = field
        self.rule = rule
        self.detail = detail
        super().__init__(f"invalid {record_type} record: field {field!r} violates '{rule}': {detail}")


class DecodeError(TensorDBError, ValueError):
    """Bytes read from a topic are not a JSON object."""


class DeliveryError(TensorDBError):
    """The broker did not acknowledge one or more produced records."""


class ServiceError(TensorDBError):
    """A local service could not be installed, started or stopped."""


class RecordTooLargeError(TensorDBError, ValueError):
    """A record exceeds the broker's message size; large arrays belong in GridFS (claim check)."""


class IntegrityError(TensorDBError):
    """Stored bytes do not match their recorded checksum."""


class QueryError(TensorDBError, ValueError):
    """A query, filter or cohort definition is malformed or uses a forbidden operator."""
