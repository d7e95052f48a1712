"""Projects isolated by the servers themselves (``tensordb project create | delete | list``).

A provisioned project gets a MongoDB database of its own and a user whose only role is
``readWrite`` on it, its Kafka topics, and prefixed ACLs for its Kafka principal on its topics and
consumer groups (``PREFIX.PROJECT.``, :meth:`Settings.acl_prefix`) where the broker keeps ACLs. The
settings given are an administrator's: a MongoDB user allowed to create users and drop databases
(``root``, or ``userAdminAnyDatabase`` with ``dbAdminAnyDatabase``) and a Kafka principal allowed to
create topics and alter ACLs. The store's project choke point stays, as defence in depth. The
generated password is returned once, in :attr:`ProvisionedProject.environment`, and never logged.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
)
from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import OperationFailure

from tensordb.config import Settings, mask_uri
from tensordb.errors import ConfigurationError, NotFoundError, ProvisioningError
from tensordb.infra.bus import create_topics
from tensordb.infra.store import AUTHENTICATION_FAILED

#: Where the projects' users live (``authSource`` of their URIs).
USERS_DATABASE = "admin"
#: The key of the ``customData`` that marks the MongoDB users made here: list and delete see only those.
MARK = "tensordb_project"
#: URI options of the administrator's own credentials and client certificate, never handed to a project.
_ADMIN_URI_OPTIONS = frozenset(
    {
        "authsource", "authmechanism", "authmechanismproperties", "tlscertificatekeyfile",
        "tlscertificatekeyfilepassword", "sslclientcertificatekeyfile", "sslclientcertificatekeypassword",
        "sslpemkeyfile", "sslpemkeypassword",
    }
)  # fmt: skip
#: Kafka options that say how to reach the broker, not who the client is: handed on to the project.
_PUBLIC_KAFKA_OPTIONS = (
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "ssl.ca.location",
    "ssl.endpoint.identification.algorithm",
)
#: What a project's principal may do on its topics (CREATE: processes create missing topics, and the
#: predictor its reply topics) and on its consumer groups.
TOPIC_OPERATIONS = (
    AclOperation.READ,
    AclOperation.WRITE,
    AclOperation.DESCRIBE,
    AclOperation.CREATE,
    AclOperation.DESCRIBE_CONFIGS,
)
GROUP_OPERATIONS = (AclOperation.READ, AclOperation.DESCRIBE, AclOperation.DELETE)
_UNAUTHORIZED = 13
_TIMEOUT = 15.0


@dataclass(frozen=True)
class AclOutcome:
    """What became of the project's Kafka ACLs: ``applied``, and what was done or why not."""

    applied: bool
    detail: str


@dataclass(frozen=True)
class ProvisionedProject:
    """A project just made: where it lives and the settings its processes and SDK users need."""

    project: str
    database: str
    user: str
    principal: str
    topics_created: list[str]
    acls: AclOutcome
    #: Whether MongoDB refused the new user what its role does not allow (False: mongod runs without --auth).
    access_control: bool
    #: ``TENSORDB_*`` variables for the project; ``TENSORDB_MONGO_URI`` holds the password: show it once
    #: (left out of ``repr``, so a logged or printed result never shows it).
    environment: dict[str, str] = field(repr=False)


@dataclass(frozen=True)
class ProjectRecord:
    """A provisioned project as ``project list`` shows it."""

    project: str  # also its MongoDB user's name
    database: str
    principal: str
    created_at: str
    database_exists: bool
    topics: int


def project_settings(admin: Settings, name: str, database: str | None = None) -> Settings:
    """The administrator's settings for project ``name`` in its own database (default ``BASE_NAME``,
    after the administrator's ``mongo_database``), validated."""
    try:
        return admin.with_changes(project=name, mongo_database=database or f"{admin.mongo_database}_{name}")
    except ValueError as exc:  # pydantic's ValidationError: a bad project or database name
        raise ConfigurationError(f"cannot provision project {name!r}: {exc}") from exc


def create_project(admin: Settings, name: str, database: str | None = None, principal: str | None = None) -> ProvisionedProject:
    """Make project ``name``: a MongoDB user (named after it) whose only role is ``readWrite`` on its
    own database, its topics, and ACLs for its Kafka principal where the broker keeps them.

    Parameters
    ----------
    admin:
        Settings of an administrator (MongoDB URI and Kafka options); the project's are derived from them.
    name:
        The project (the MongoDB user gets this name).
    database:
        The project's database; default the administrator's ``mongo_database`` + ``_NAME`` (e.g.
        ``tensordb_radiology``). It must not exist yet.
    principal:
        The Kafka principal of the project's clients; default ``User:NAME``.
    """
    settings = project_settings(admin, name, database)
    principal = principal or f"User:{name}"
    password = secrets.token_urlsafe(32)  # URL-safe: goes into the URI unquoted
    with _admin_database(admin, "create users") as users:
        existing = _find_user(users, name)
        if existing is not None:
            made_here = MARK in existing.get("customData", {})
            raise ProvisioningError(
                f"project {name!r} exists: delete it first (`tensordb project delete {name} --yes`) or choose another name"
                if made_here
                else f"MongoDB already has a user {name!r}, not made by `tensordb project create`: choose another project name"
            )
        if settings.mongo_database in users.client.list_database_names():
            raise ProvisioningError(
                f"database {settings.mongo_database!r} already exists and may hold others' data: "
                "give the project a new one (--database NAME)"
            )
        mark = {"database": settings.mongo_database, "principal": principal, "created_at": datetime.now(UTC).isoformat()}
        roles = [{"role": "readWrite", "db": settings.mongo_database}]
        users.command("createUser", name, pwd=password, roles=roles, customData={MARK: mark})
        try:
            created = create_topics(settings)
            acls = grant_acls(settings, principal)
        except BaseException:
            users.command("dropUser", name)  # nothing half made: the operator can simply run it again
            raise
    environment = project_environment(settings, name, password)
    enforced = _access_control(environment["TENSORDB_MONGO_URI"])
    return ProvisionedProject(name, settings.mongo_database, name, principal, created, acls, enforced, environment)


def delete_project(admin: Settings, name: str) -> list[str]:
    """Remove project ``name``: its topics and ACLs, then its MongoDB user and database (its data);
    returns what was removed, one line each. The user goes last, so a Kafka failure leaves a project
    that ``delete`` finds again.

    Parameters
    ----------
    admin:
        Settings of an administrator.
    name:
        A project made by :func:`create_project`; any other user or database is left alone.
    """
    with _admin_database(admin, "drop users and databases") as users:
        user = _find_user(users, name)
        if user is None or MARK not in user.get("customData", {}):
            raise NotFoundError(
                f"no project {name!r} made by `tensordb project create` (no MongoDB user {name!r} with its mark): "
                "`tensordb project list` shows them"
            )
        settings = project_settings(admin, name, user["customData"][MARK]["database"])
        kafka = AdminClient(settings.kafka_config())
        with _kafka_errors(settings, "delete the project's topics"):
            topics = [topic for topic in kafka.list_topics(timeout=_TIMEOUT).topics if topic.startswith(settings.acl_prefix())]
            if topics:
                for future in kafka.delete_topics(topics, operation_timeout=_TIMEOUT, request_timeout=_TIMEOUT).values():
                    future.result()
        refusal = _delete_acls(kafka, settings, principal=None)
        users.command("dropUser", name)
        users.client.drop_database(settings.mongo_database)
    removed = [f"{len(topics)} topics {settings.acl_prefix()}*"] if topics else []
    removed.append(f"not removed: Kafka ACLs, because {refusal}" if refusal else f"Kafka ACLs on {settings.acl_prefix()}*")
    return [*removed, f"MongoDB user {name}", f"MongoDB database {settings.mongo_database}"]


def list_projects(admin: Settings) -> list[ProjectRecord]:
    """The projects made by :func:`create_project`, with whether their database and topics exist."""
    with _admin_database(admin, "list users") as users:
        found = users.command("usersInfo", 1, filter={f"customData.{MARK}": {"$exists": True}})["users"]
        databases = set(users.client.list_database_names())
    with _kafka_errors(admin, "list the topics"):
        topics = AdminClient(admin.kafka_config()).list_topics(timeout=_TIMEOUT).topics
    records = []
    for user in sorted(found, key=lambda user: user["user"]):
        mark = user["customData"][MARK]
        prefix = project_settings(admin, user["user"], mark["database"]).acl_prefix()
        records.append(
            ProjectRecord(
                user["user"], mark["database"], mark["principal"], mark["created_at"],
                mark["database"] in databases, sum(1 for topic in topics if topic.startswith(prefix)),
            )
        )  # fmt: skip
    return records


def project_uri(admin_uri: str, user: str, password: str) -> str:
    """``admin_uri`` with the project's user and password (``authSource=admin``) in place of the
    administrator's credentials and client certificate; the hosts and other options are kept."""
    parts = urlsplit(admin_uri)
    hosts = parts.netloc.rpartition("@")[2]
    kept = [option for option in parts.query.split("&") if option and option.split("=")[0].lower() not in _ADMIN_URI_OPTIONS]
    query = "&".join([*kept, f"authSource={USERS_DATABASE}"])
    return urlunsplit((parts.scheme, f"{user}:{password}@{hosts}", "/", query, ""))


def project_environment(settings: Settings, user: str, password: str) -> dict[str, str]:
    """The ``TENSORDB_*`` variables of the project's processes and SDK users (the password in the URI)."""
    environment = {
        "TENSORDB_PROJECT": settings.project,
        "TENSORDB_MONGO_URI": project_uri(settings.mongo_uri, user, password),
        "TENSORDB_MONGO_DATABASE": settings.mongo_database,
        "TENSORDB_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "TENSORDB_TOPIC_PREFIX": settings.topic_prefix,
    }
    public = {key: value for key, value in settings.kafka_options.items() if key in _PUBLIC_KAFKA_OPTIONS}
    if public:  # the principal's own credentials are added by whoever holds them (not TensorDB's to make)
        environment["TENSORDB_KAFKA_OPTIONS"] = json.dumps(public)
    return environment


def acl_bindings(settings: Settings, principal: str) -> list[AclBinding]:
    """The ACLs of a project: ``principal`` may use the topics and consumer groups under its prefix, only."""
    prefix = settings.acl_prefix()
    return [
        AclBinding(kind, prefix, ResourcePatternType.PREFIXED, principal, "*", operation, AclPermissionType.ALLOW)
        for kind, operations in ((ResourceType.TOPIC, TOPIC_OPERATIONS), (ResourceType.GROUP, GROUP_OPERATIONS))
        for operation in operations
    ]


def grant_acls(settings: Settings, principal: str) -> AclOutcome:
    """Replace the project's ACLs for ``principal`` by :func:`acl_bindings`; a broker without ACLs is
    told apart by its answer to the removal, which is sent first (see :func:`_delete_acls`)."""
    kafka = AdminClient(settings.kafka_config())
    refusal = _delete_acls(kafka, settings, principal)
    if refusal:
        return AclOutcome(False, refusal)
    for future in kafka.create_acls(acl_bindings(settings, principal), request_timeout=_TIMEOUT).values():
        try:
            future.result()
        except KafkaException as exc:
            raise ConfigurationError(
                f"the broker at {settings.kafka_bootstrap} refused the project's ACLs ({exc.args[0].str()}): run with a "
                "Kafka principal allowed to alter ACLs (TENSORDB_KAFKA_OPTIONS)"
            ) from exc
    prefix = settings.acl_prefix()
    return AclOutcome(True, f"{principal} may read, write and create topics {prefix}* and use consumer groups {prefix}*")


def _delete_acls(kafka: AdminClient, settings: Settings, principal: str | None) -> str | None:
    """Delete the prefixed ACLs of the project (of ``principal``, or of anyone); the reason when the
    broker keeps no ACLs, None when done.

    This is also the probe for ACL support, sent before any CreateAcls: Tansu advertises CreateAcls
    but answers it with bytes on which librdkafka aborts the whole process (an assertion in
    rdkafka_admin.c), while it does not advertise DeleteAcls, which the client then refuses itself."""
    anyone: Any = None  # matches any principal and host (confluent-kafka's stubs say str only)
    filters = [
        AclBindingFilter(
            kind,
            settings.acl_prefix(),
            ResourcePatternType.PREFIXED,
            principal or anyone,
            anyone,
            AclOperation.ANY,
            AclPermissionType.ANY,
        )
        for kind in (ResourceType.TOPIC, ResourceType.GROUP)
    ]
    try:
        for future in kafka.delete_acls(filters, request_timeout=_TIMEOUT).values():
            future.result()
    except KafkaException as exc:
        error: KafkaError = exc.args[0]
        if error.code() == KafkaError._UNSUPPORTED_FEATURE:
            return (
                f"the broker at {settings.kafka_bootstrap} does not support ACLs (the local broker, Tansu, has none): every "
                "client of this broker can read and write every project's topics; only MongoDB keeps the projects apart"
            )
        if error.code() == KafkaError.SECURITY_DISABLED:
            return (
                f"the broker at {settings.kafka_bootstrap} has no authorizer configured (authorizer.class.name), so it keeps "
                "no ACLs: every client can read and write every project's topics until one is configured"
            )
        raise ConfigurationError(
            f"the broker at {settings.kafka_bootstrap} refused to change ACLs ({error.str()}): run with a Kafka principal "
            "allowed to alter ACLs (TENSORDB_KAFKA_OPTIONS)"
        ) from exc
    return None


def _access_control(project_uri: str) -> bool:
    """Whether MongoDB stops the project's user from reading the users (a mongod without --auth lets anyone)."""
    client: MongoClient = MongoClient(project_uri, serverSelectionTimeoutMS=10_000)
    with client:
        try:
            client[USERS_DATABASE].command("usersInfo", 1)
        except OperationFailure as exc:
            if exc.code == _UNAUTHORIZED:
                return True
            raise
    return False


@contextmanager
def _kafka_errors(settings: Settings, what: str) -> Iterator[None]:
    """A Kafka failure in TensorDB's words (the MongoDB part, done first, is said to be done)."""
    try:
        yield
    except KafkaException as exc:
        raise ConfigurationError(
            f"could not {what} on Kafka at {settings.kafka_bootstrap} ({exc.args[0].str()}): check that the broker answers "
            "and that the principal of TENSORDB_KAFKA_OPTIONS may describe and delete topics, then run the command again"
        ) from exc


def _find_user(users: Database, name: str) -> dict[str, Any] | None:
    found = users.command("usersInfo", {"user": name, "db": USERS_DATABASE})["users"]
    return found[0] if found else None


@contextmanager
def _admin_database(admin: Settings, what: str) -> Iterator[Database]:
    """The users' database over the administrator's URI; refusals in TensorDB's words."""
    uri = mask_uri(admin.mongo_uri)
    client: MongoClient = MongoClient(admin.mongo_uri, serverSelectionTimeoutMS=10_000)
    try:
        yield client[USERS_DATABASE]
    except OperationFailure as exc:
        if exc.code == AUTHENTICATION_FAILED:
            raise ConfigurationError(f"MongoDB at {uri} rejected the username or password in TENSORDB_MONGO_URI") from exc
        if exc.code == _UNAUTHORIZED:
            raise ConfigurationError(
                f"the MongoDB user of TENSORDB_MONGO_URI ({uri}) may not {what}: run this with an administrator's URI "
                "(role root, or userAdminAnyDatabase and dbAdminAnyDatabase)"
            ) from exc
        raise
    finally:
        client.close()
