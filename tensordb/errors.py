"""Every error TensorDB raises on purpose, each with a message that says what to do.

They form one tree under :class:`TensorDBError`, by what the caller can do about them:

- :class:`ConfigurationError`: a setting is missing, malformed or refuses the request (an
  untrusted entry point): change the settings;
- :class:`BadInputError` (also a ``ValueError``): a record, query, model, job or policy given is
  wrong: fix the input (schema violations, forbidden operators, other projects' data...);
- :class:`UnreachableError`: Kafka or MongoDB did not answer or acknowledge: retry, check the servers;
- :class:`NotFoundError` (also a ``LookupError``): what was named does not exist in this project;
- :class:`IntegrityError`: stored bytes do not match their checksum: restore or re-publish;
- :class:`DatabaseVersionError`: the database is of another TensorDB version: upgrade it (or TensorDB);
- the rest (``StorageError``, ``ServiceError``, ``JobError``, ``TaskScriptError``, ``DrainError``)
  are failures of one operation, explained by their message.
"""


class TensorDBError(Exception):
    """Base class: catch this to handle any TensorDB failure."""


class ConfigurationError(TensorDBError):
    """A setting is missing or malformed, or forbids what was asked: change the settings."""


class BadInputError(TensorDBError, ValueError):
    """What the caller gave (a record, query, model, job, policy...) is wrong: fix it."""


class NotFoundError(TensorDBError, LookupError):
    """What was named does not exist in this project."""


class ValidationError(BadInputError):
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


class DecodeError(BadInputError):
    """Bytes read from a topic are not a JSON object."""


class UnreachableError(TensorDBError):
    """Kafka or MongoDB did not answer in time; the message says where TensorDB looked."""


class DeliveryError(UnreachableError):
    """The broker did not acknowledge one or more produced records."""


class FatalClientError(DeliveryError):
    """A Kafka client reached a state it cannot leave (e.g. the idempotent producer's fatal errors)."""


class ServiceError(TensorDBError):
    """A local service could not be installed, started or stopped."""


class RecordTooLargeError(BadInputError):
    """A record exceeds the broker's message size; large arrays belong in GridFS (claim check)."""


class StorageError(TensorDBError):
    """MongoDB refused to store a document (its content breaks one of MongoDB's rules)."""


class IntegrityError(TensorDBError):
    """Stored bytes do not match their recorded checksum."""


class DatabaseVersionError(TensorDBError):
    """The database was written by another TensorDB version: run the command the message names."""


class ProjectScopeError(BadInputError):
    """A filter, document or update tried to read or write outside its project."""


class QueryError(BadInputError):
    """A query, filter or cohort definition is malformed or uses a forbidden operator."""


class StreamStateError(BadInputError):
    """A saved stream state does not fit the stream it is resumed into (another cohort, world size...)."""


#: What to do about the refusals MongoDB answers for a document, by its error code.
_MONGO_REFUSALS = {
    2: "a value MongoDB cannot store: check metadata and labels",
    15: "values nest too deeply: flatten metadata and labels (MongoDB stores at most 100 levels)",
    52: "a field name starts with '$': rename the metadata or label keys",
    57: "a field name contains '.': rename the metadata or label keys",
    10334: "the document exceeds MongoDB's 16 MB limit: keep large values in arrays, which go to GridFS",
    17419: "the document exceeds MongoDB's 16 MB limit: keep large values in arrays, which go to GridFS",
}


def mongo_refusal(code: int | None, message: str) -> str:
    """A reason, in TensorDB's terms, for a document MongoDB refused with ``code`` and ``message``."""
    advice = _MONGO_REFUSALS.get(code or 0, "check the record's metadata and labels against MongoDB's document rules")
    return f"MongoDB refused to store the record ({message}, code {code}): {advice}"


def describe_error(error: BaseException) -> str:
    """``error`` as a dead letter's reason: what went wrong in TensorDB's terms and what to do.

    TensorDB's own errors say so already; MongoDB's refusals of a document are translated; any
    other exception is a processing failure that names its type, never a bare traceback line.
    """
    if isinstance(error, TensorDBError):
        return str(error)
    details = getattr(error, "details", None)
    if isinstance(details, dict) and "errmsg" in details:  # a pymongo OperationFailure
        return mongo_refusal(details.get("code"), str(details["errmsg"]))
    if type(error).__name__ == "DocumentTooLarge":
        return mongo_refusal(10334, str(error))
    if type(error).__name__ == "InvalidDocument":  # refused by the BSON encoder, before reaching MongoDB
        return f"MongoDB cannot store the record ({str(error)[-300:]}): rename keys that hold a NUL byte, start with '$' or contain '.'"
    if isinstance(error, OverflowError):
        return f"the record holds an integer MongoDB cannot store ({error}): send integers past 64 bits as strings or floats"
    return (
        f"the record could not be processed ({type(error).__name__}: {error}); if the record is valid this is "
        "a TensorDB bug: report it with this dead letter's id"
    )


class ArrayCodecError(BadInputError):
    """An array cannot be stored safely (object dtype) or stored bytes are not a valid ``.npy``."""


class SampleError(BadInputError):
    """A sample's arrays are inconsistent (bytes vs dtype/shape) or its blob reference is broken."""


class ModelNotFoundError(NotFoundError):
    """The model version named does not exist in this project."""


class ModelFormatError(BadInputError):
    """A model cannot be stored safely, or a stored one cannot be rebuilt."""


class JobError(TensorDBError):
    """A job cannot be submitted, found or changed as asked."""


class JobNotFoundError(JobError, NotFoundError):
    """No job of that id exists in this project."""


class JobSpecError(BadInputError):
    """A job's model or data specification cannot be used; the message says what to change."""


class TaskScriptError(TensorDBError, RuntimeError):
    """The task script exited with an error; the message carries the end of its output."""


class PolicyError(BadInputError):
    """A policy is malformed, missing, or cannot be changed as asked."""


class PolicyNotFoundError(PolicyError, NotFoundError):
    """No policy of that name exists in this project."""


class PromotionError(TensorDBError):
    """A person's promotion or roll-back cannot be done as asked (the version is production
    already, there is nothing to roll back to); the message says what production is."""


class InputShapeError(BadInputError):
    """Instances given to a model do not fit its input shape (or are not finite numbers); the
    message names the first misfit."""


class DrainError(TensorDBError):
    """The processors did not store every record within the time allowed."""


class EntryPointError(BadInputError):
    """An entry point is malformed, cannot be imported here, or does not take the arguments given."""


class UntrustedCodeError(ConfigurationError):
    """A job, policy or stored document names code outside what this process's operator trusts:
    an entry point outside ``TENSORDB_TRUSTED_MODULES``, or a task script outside
    ``TENSORDB_TASK_SCRIPT_DIRS``. Nothing was imported or run; the message says what to set."""


class StudySpecError(BadInputError):
    """A study's specification (search space, searcher, objective, limits) is malformed; the message says what to fix."""


class StudyNotFoundError(NotFoundError):
    """No study of that name exists in this project."""


class StudyError(TensorDBError):
    """A study cannot be created or changed as asked (e.g. the name is taken)."""


class StageSpecError(BadInputError):
    """A transform stage's specification is malformed; the message says what to fix."""


class StageNotFoundError(NotFoundError):
    """No transform stage of that name exists in this project."""


class StageError(TensorDBError):
    """A transform stage cannot be registered or changed as asked (a version conflict, a cycle)."""


class StageFunctionError(BadInputError):
    """A transform stage's function raised, or returned something that is not samples, for one source sample."""


class ProvisioningError(TensorDBError):
    """A project cannot be provisioned or removed on the servers as asked (it exists already, or it was not made by TensorDB)."""
