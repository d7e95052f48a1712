"""One settings object for every TensorDB process, read from ``TENSORDB_*`` environment variables.

Values may also come from files named like the variables in the directory ``TENSORDB_SECRETS_DIR``
names (compose or Kubernetes secrets, e.g. ``/run/secrets/TENSORDB_DASHBOARD_TOKEN``), and from a
TOML file named by ``TENSORDB_CONFIG``. Precedence: a secret file, then the environment, then the
TOML file, then the default. An empty variable counts as unset (``KEY=`` in an env file is the default).
Nothing else in TensorDB hard-codes an address: the same code runs against the embedded local
services, a production Kafka cluster and a MongoDB replica set by changing these settings only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from contextvars import ContextVar
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from tensordb.errors import ConfigurationError

_PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
#: What is secret, defined once: a librdkafka option, a MongoDB URI option or an ``authMechanismProperties``
#: entry whose name ends like this holds a secret value (``sasl.password``, ``ssl.key.pem``,
#: ``sasl.oauthbearer.client.credentials.client.secret``, ``sasl.oauthbearer.assertion.private.key.passphrase``
#: and ``...private.key.pem``, ``tlsCertificateKeyFilePassword``, ``AWS_SESSION_TOKEN``...); the fields of
#: :class:`Settings` that hold one are ``SecretStr``, and a URI's user info holds its password.
_SECRET_NAME = re.compile(
    r"(password|passphrase|secret|token|credentials?|key\.pem|sasl\.oauthbearer\.config|sasl\.jaas\.config)$", re.IGNORECASE
)
_MODULE_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_URI_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@/\s]*@")
#: ``name=value`` (a URI's query), ``name='value'`` (a driver's repr) and ``'name': 'value'`` (a dict's repr).
_NAMED_VALUE = re.compile(
    r"""(?P<name>[A-Za-z][\w.-]*)(?P<sep>=|['"]:\s*)(?:(?P<quote>['"])(?P<quoted>.*?)(?P=quote)|(?P<value>[^&,;\s'"]*))"""
)
#: ``authMechanismProperties=AWS_SESSION_TOKEN:VALUE,SERVICE_NAME:x``: one URI option holding named values.
_PROPERTY_LIST = re.compile(r"(?P<option>authMechanismProperties=)(?P<properties>[^&\s'\"]*)", re.IGNORECASE)
_PROPERTY = re.compile(r"(?P<name>[^,:%]+)(?P<sep>:|%3A)(?P<value>[^,]*)", re.IGNORECASE)
MASK = "***"
#: Secrets shorter than this are masked only where named, not by value (see :func:`secret_values`).
MIN_SECRET_CHARS = 4
#: Set while :meth:`Settings.with_changes` builds a copy: no source but the values given is read.
_GIVEN_ONLY: ContextVar[bool] = ContextVar("tensordb_settings_given_only", default=False)
#: Variables that say where settings come from; every other ``TENSORDB_*`` variable is a field of Settings.
SOURCE_VARIABLES = ("TENSORDB_CONFIG", "TENSORDB_SECRETS_DIR")


def is_secret_name(name: str) -> bool:
    """Whether an option or property of this name (Kafka, a MongoDB URI) holds a secret value."""
    return bool(_SECRET_NAME.search(name))


def _mask_named(match: re.Match[str]) -> str:
    quote = match["quote"] or ""
    if is_secret_name(match["name"]) and (match["quoted"] or match["value"]):
        return f"{match['name']}{match['sep']}{quote}{MASK}{quote}"
    if match["quoted"]:  # a quoted value may quote more: {'mongo_uri': 'mongodb://h/?tlsCertificateKeyFilePassword=x'}
        return f"{match['name']}{match['sep']}{quote}{_NAMED_VALUE.sub(_mask_named, match['quoted'])}{quote}"
    return match[0]


def _mask_properties(match: re.Match[str]) -> str:
    def mask(entry: re.Match[str]) -> str:
        return f"{entry['name']}{entry['sep']}{MASK}" if is_secret_name(entry["name"]) else entry[0]

    return match["option"] + _PROPERTY.sub(mask, match["properties"])


def mask_uri(text: str) -> str:
    """``text`` (a URI, or any text quoting URIs or a MongoDB client's repr) with the secrets it
    shows replaced by ``***``: the password of a URI's user info, and the value of every option or
    property whose name says it is secret (``tlsCertificateKeyFilePassword=***``,
    ``authMechanismProperties=AWS_SESSION_TOKEN:***``, ``tlscertificatekeyfilepassword='***'``)."""
    text = _URI_PASSWORD.sub(lambda match: f"{match['scheme']}{MASK}@", text)
    text = _PROPERTY_LIST.sub(_mask_properties, text)
    return _NAMED_VALUE.sub(_mask_named, text)


def uri_without_credentials(uri: str) -> str:
    """A MongoDB URI without its user info and secret options (passwords, tokens, auth properties)."""
    parts = urlsplit(uri)
    options = [
        item
        for item in parts.query.split("&")
        if item and not (is_secret_name(name := item.split("=", 1)[0]) or name.lower() == "authmechanismproperties")
    ]
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query="&".join(options)))


def mask_options(options: dict[str, str]) -> dict[str, str]:
    """Kafka client options with secret values replaced by ``***``, for printing and logging."""
    return {key: MASK if is_secret_name(key) else value for key, value in options.items()}


def secret_values(settings: Settings) -> list[str]:
    """The secret values ``settings`` hold, longest first: the MongoDB password (as written and
    decoded) and the values of its URI's secret options, Kafka's secret options, the tokens.

    Values shorter than :data:`MIN_SECRET_CHARS` are left out (masking a one-character "password"
    would mask every such letter); the patterns of :func:`mask_uri` still mask them where named.
    """
    found: list[str] = []
    try:
        parts = urlsplit(settings.mongo_uri)
        password = parts.password
    except ValueError:  # a URI urlsplit cannot parse: its password is still masked by mask_uri
        parts, password = None, None
    if password:
        found += [password, unquote(password)]
    for name, value in parse_qsl(parts.query if parts else "", keep_blank_values=True):
        if name.lower() == "authmechanismproperties":
            found += [item.partition(":")[2] for item in value.split(",") if is_secret_name(item.partition(":")[0])]
        elif is_secret_name(name):
            found.append(value)
    found += [value for key, value in settings.kafka_options.items() if is_secret_name(key)]
    for _name, value in settings:
        if isinstance(value, SecretStr):
            found.append(value.get_secret_value())
    return sorted({secret for secret in found if len(secret) >= MIN_SECRET_CHARS}, key=len, reverse=True)


def mask_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` as it may be printed, logged or stored for others to read: what :func:`mask_uri`
    masks, and each of ``secrets`` (see :func:`secret_values`) wherever it appears."""
    text = mask_uri(text)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class Topic(str, Enum):
    """The kinds of Kafka topic TensorDB uses; each maps to one record schema."""

    INGEST = "ingest"
    DATA_IMPORTED = "data-imported"
    JOB_REQUESTS = "job-requests"
    JOB_EVENTS = "job-events"
    LOGS = "logs"
    MODEL_EVENTS = "model-events"
    DEAD_LETTERS = "dead-letters"
    PREDICT_REQUESTS = "predict-requests"
    PREDICTIONS = "predictions"


#: The topic each kind of stream processor consumes, in its own consumer group (see streams/app.py).
PROCESSOR_TOPICS: dict[str, Topic] = {
    "ingest": Topic.INGEST,
    "retrain": Topic.DATA_IMPORTED,
    "lifecycle": Topic.JOB_EVENTS,
    "log-sink": Topic.LOGS,
    "job-requests": Topic.JOB_REQUESTS,
    "model-events": Topic.MODEL_EVENTS,
    "predict-requests": Topic.PREDICT_REQUESTS,
    "predictions": Topic.PREDICTIONS,
    "study-rungs": Topic.LOGS,  # trials' validation logs only (streams.studies)
    "study-trials": Topic.JOB_EVENTS,  # trials' ends only
}


class Settings(BaseSettings):
    """Connection settings, names and limits shared by the SDK, processors, workers and CLI."""

    # hide_input_in_errors: a malformed value (e.g. TENSORDB_KAFKA_OPTIONS with a password) is never echoed
    model_config = SettingsConfigDict(
        env_prefix="TENSORDB_", env_ignore_empty=True, extra="forbid", frozen=True, hide_input_in_errors=True
    )

    project: str = Field("default", description="Project name; namespaces topics and documents.")

    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, comma separated.")
    kafka_options: dict[str, str] = Field(
        default_factory=dict,
        description="Extra librdkafka client options passed through unchanged (JSON object), "
        "e.g. security.protocol, sasl.mechanism, sasl.username, ssl.ca.location.",
    )
    topic_prefix: str = Field("tensordb", description="Topics are named PREFIX.PROJECT.KIND.")
    topic_partitions: int = Field(3, ge=1, le=1024, description="Partitions of every TensorDB topic.")
    topic_replication: int = Field(1, ge=1, le=16, description="Replication factor of every topic.")

    mongo_uri: str = Field("mongodb://127.0.0.1:27017/", description="MongoDB connection URI.")
    mongo_database: str = Field("tensordb", description="MongoDB database holding every collection.")

    inline_limit_bytes: int = Field(
        256 * 1024,
        ge=1024,
        description="Arrays larger than this are stored in GridFS and published as a reference.",
    )
    max_message_bytes: int = Field(1024 * 1024, ge=4096, description="Largest record the producer sends (the broker's limit).")
    max_sample_bytes: int = Field(
        2 * 1024**3,
        ge=1,
        description="Largest sample (all its arrays together) ingest accepts; larger shapes are dead-lettered.",
    )

    services_dir: Path = Field(Path(".tensordb"), description="Binaries, data and logs of local services.")
    services_host: str = Field("127.0.0.1", description="Address the local services bind to.")
    services_allow_remote: bool = Field(
        False,
        description="Let the local services bind beyond loopback (services_host). They have no authentication "
        "and MongoDB no TLS: only on a network where everyone who can connect may read and change every project.",
    )

    # -- what code may run (see SECURITY.md) ------------------------------------------------------
    trusted_modules: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Module prefixes (comma separated, e.g. 'mylab.models,mylab.prep') whose functions jobs, "
        "policies and stored model versions may name as entry points or builders. Nothing else is imported.",
    )
    task_script_dirs: Annotated[tuple[Path, ...], NoDecode] = Field(
        (),
        description="Directories (comma separated) task scripts may run from, after resolving links; "
        "a task job naming any other script is refused. Empty: task jobs are refused.",
    )
    task_secrets: bool = Field(
        False, description="Hand task scripts the MongoDB password and the Kafka secret options (left out otherwise)."
    )

    # -- workers -----------------------------------------------------------------------------------
    worker_lease_seconds: float = Field(
        30.0, gt=0, le=86_400,
        description="Seconds a claimed job stays a worker's without a heartbeat; then another worker's "
        "reaper hands it back to the queue (its last saved epoch is kept).",
    )  # fmt: skip

    # -- HTTP endpoints: the model server and the dashboard ----------------------------------------
    serve_host: str = Field("127.0.0.1", description="Address `tensordb serve` binds; beyond loopback it needs serve_token.")
    serve_port: int = Field(8000, ge=1, le=65535, description="Port `tensordb serve` listens on.")
    serve_policy: str | None = Field(None, description="Policy `tensordb serve` serves when --policy is not given.")
    predictions_sample_rate: float = Field(
        1.0, ge=0.0, le=1.0,
        description="Share of POST /predict answers also published on the predictions topic (where the streaming "
        "predictor publishes all of its own), so both paths are monitored in one place.",
    )  # fmt: skip
    dashboard_host: str = Field(
        "127.0.0.1", description="Address `tensordb dashboard` binds; beyond loopback it needs dashboard_token."
    )
    dashboard_port: int = Field(8050, ge=1, le=65535, description="Port `tensordb dashboard` listens on.")
    dashboard_token: SecretStr | None = Field(
        None, description="Token every dashboard request must carry; required when bound beyond loopback."
    )
    serve_token: SecretStr | None = Field(
        None, description="Token every model-server request must carry; required when bound beyond loopback."
    )
    http_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        ("localhost", "127.0.0.1", "::1"),
        description="Host header names the HTTP endpoints answer (comma separated; the bound address is "
        "always allowed): a request naming any other host is refused, which stops DNS rebinding.",
    )
    http_max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest request body the HTTP endpoints accept (413 otherwise)."
    )
    http_max_connections: int = Field(
        1000, ge=16, le=1_000_000,
        description="Connections each HTTP endpoint (model server, dashboard, metrics) holds at once, lowered to fit "
        "the open-file limit; at the cap, the connection waiting longest for a request is closed to admit a new one.",
    )  # fmt: skip
    http_header_timeout_seconds: float = Field(
        10.0, gt=0, le=3600,
        description="Seconds a client of an HTTP endpoint has to send a whole request head, from its connection or "
        "from the end of the previous answer; then the connection is closed.",
    )  # fmt: skip
    http_keep_alive_seconds: int = Field(
        5, ge=1, le=3600, description="Seconds an HTTP connection is kept open after an answer without a byte of a new request."
    )
    http_docs: bool = Field(False, description="Serve the model server's OpenAPI schema and /docs pages.")
    http_forwarded_tls: bool = Field(
        False,
        description="The endpoints sit behind a TLS-terminating proxy that sets X-Forwarded-Proto: "
        "trust it, so session cookies are marked Secure.",
    )

    # -- operators: metrics, health and logs (tensordb.infra.metrics, tensordb.infra.logging) -----
    metrics_host: str = Field(
        "127.0.0.1",
        description="Address every long-running process binds its metrics endpoint to (/metrics, /health, /ready); "
        "beyond loopback it needs metrics_token.",
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535,
        description="Port of the metrics endpoint; unset: the default of each kind of process (processors 9470, "
        "worker 9471, serve 9472, predictor 9473, dashboard 9474); 0: no endpoint. --metrics-port overrides it.",
    )  # fmt: skip
    metrics_token: SecretStr | None = Field(
        None, description="Token (Authorization: Bearer) every metrics request must carry; required beyond loopback."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as plain text, or as JSON objects, one a line (for log shippers)."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Least severe log level written.")

    @field_validator("trusted_modules", "task_script_dirs", "http_allowed_hosts", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("trusted_modules")
    @classmethod
    def _check_modules(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for prefix in value:
            if not _MODULE_PATH.match(prefix):
                raise ValueError(f"trusted_modules holds module paths such as 'mylab.models'; got {prefix!r}")
        return value

    @field_validator("project")
    @classmethod
    def _check_project(cls, value: str) -> str:
        if not _PROJECT_NAME.match(value):
            raise ValueError(
                "project names are 1-64 characters of letters, digits, '_' and '-', starting with a "
                f"letter or digit; got {value!r}"
            )
        return value

    @field_validator("mongo_database")
    @classmethod
    def _check_database(cls, value: str) -> str:
        if not value or any(ch in value for ch in '/\\. "$') or len(value) > 63:
            raise ValueError(f'MongoDB database names cannot be empty or contain /\\. "$; got {value!r}')
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings,)
        if _GIVEN_ONLY.get():  # with_changes: the values given, nothing else
            return sources
        secrets_dir = os.environ.get("TENSORDB_SECRETS_DIR")
        if secrets_dir:
            # before the environment: a mounted secret file is the operator's explicit choice, and an
            # empty variable from an env file must not hide it
            if not Path(secrets_dir).is_dir():
                raise ConfigurationError(
                    f"TENSORDB_SECRETS_DIR names {secrets_dir!r}, which is not a directory: fix the path or unset it"
                )
            sources += (SecretsSettingsSource(settings_cls, secrets_dir=secrets_dir),)
        sources += (env_settings,)
        config_file = os.environ.get("TENSORDB_CONFIG")
        if config_file:
            if not Path(config_file).is_file():
                raise ConfigurationError(f"TENSORDB_CONFIG names {config_file!r}, which is not a file: fix the path or unset it")
            sources += (TomlConfigSettingsSource(settings_cls, toml_file=config_file),)
        return sources

    def __repr_args__(self) -> Any:
        """Fields as ``repr()`` shows them: the MongoDB URI's password and secret options, and Kafka's secret options, masked."""
        for name, value in super().__repr_args__():
            if name == "mongo_uri":
                value = mask_uri(value)
            elif name == "kafka_options":
                value = mask_options(value)
            yield name, value

    def topic(self, kind: Topic) -> str:
        """The Kafka topic name for one kind of record in this project."""
        return f"{self.acl_prefix()}{kind.value}"

    def acl_prefix(self) -> str:
        """``PREFIX.PROJECT.``: the start of every topic and consumer group name of this project, and
        of no other project's, because project names cannot contain ``.`` (one prefixed Kafka ACL per
        project covers exactly its own topics and groups)."""
        return f"{self.topic_prefix}.{self.project}."

    def consumer_group(self, name: str) -> str:
        """A consumer group of this project, ``PREFIX.PROJECT.NAME`` (under :meth:`acl_prefix`)."""
        return f"{self.acl_prefix()}{name}"

    def processor_group(self, kind: str) -> str:
        """The consumer group of one processor kind of this project (``ingest``, ``log-sink``...):
        every instance of the kind joins it, so instances share the topic's partitions."""
        return self.consumer_group(kind)

    def all_topics(self) -> dict[Topic, str]:
        return {kind: self.topic(kind) for kind in Topic}

    def kafka_config(self, **overrides: Any) -> dict[str, Any]:
        """A librdkafka configuration: bootstrap servers, the pass-through options, then overrides."""
        return {"bootstrap.servers": self.kafka_bootstrap, **self.kafka_options, **overrides}

    def with_changes(self, **changes: Any) -> Settings:
        """A validated copy with some fields replaced (settings are immutable).

        Only these settings and ``changes`` count: nothing is read again from the environment, the
        secrets directory or the TOML file, which would merge dropped Kafka options back in.
        """
        given_only = _GIVEN_ONLY.set(True)
        try:
            return type(self)(**{**dict(self), **changes})
        finally:
            _GIVEN_ONLY.reset(given_only)

    def as_environment(self) -> dict[str, str]:
        """These settings as ``TENSORDB_*`` variables, to hand to a child process or print."""
        return environment_variables(dict(self))


def environment_variables(fields: dict[str, Any]) -> dict[str, str]:
    """Values of :class:`Settings` fields as the ``TENSORDB_*`` variables that set them (``None`` left out)."""
    env = {}
    for name, value in fields.items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, dict):
            value = json.dumps(value)
        elif isinstance(value, tuple):
            value = ",".join(str(part) for part in value)
        env[f"TENSORDB_{name.upper()}"] = str(value)
    return env


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (and TENSORDB_CONFIG), with explicit overrides on top."""
    try:
        return Settings(**overrides)
    except ConfigurationError:
        raise
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ConfigurationError(f"invalid TensorDB settings: {exc}") from exc
