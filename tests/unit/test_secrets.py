"""Secrets in the settings are never printed: the MongoDB password and Kafka's secret options are
masked wherever settings, URIs or configuration errors are shown."""

from __future__ import annotations

import io
import logging
import socket

import pytest
from pymongo import MongoClient

from tensordb.config import Settings, load_settings, mask_options, mask_uri
from tensordb.errors import ConfigurationError, UnreachableError
from tensordb.infra.logging import configure_logging
from tensordb.infra.store import Store
from tensordb.services import LocalServices

PASSWORD = "hunter2-s3cret"


def test_repr_and_str_of_settings_mask_the_mongodb_password_and_kafka_secrets() -> None:
    settings = Settings(
        mongo_uri=f"mongodb://admin:{PASSWORD}@db1:27017,db2/?replicaSet=rs0",
        kafka_options={"sasl.username": "tensordb", "sasl.password": PASSWORD, "ssl.key.password": PASSWORD},
    )
    for shown in (repr(settings), str(settings)):
        assert PASSWORD not in shown
        assert "mongodb://admin:***@db1:27017,db2/?replicaSet=rs0" in shown and "'sasl.username': 'tensordb'" in shown
    assert settings.mongo_uri.endswith(f"{PASSWORD}@db1:27017,db2/?replicaSet=rs0")  # the value itself is intact


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        (f"mongodb://u:{PASSWORD}@h:1/db", "mongodb://u:***@h:1/db"),
        (f"mongodb+srv://u:{PASSWORD}@cluster.example.com/", "mongodb+srv://u:***@cluster.example.com/"),
        ("mongodb://127.0.0.1:27017/?replicaSet=rs0", "mongodb://127.0.0.1:27017/?replicaSet=rs0"),
        ("mongodb://user@h/", "mongodb://user@h/"),
    ],
)
def test_mask_uri(uri: str, shown: str) -> None:
    assert mask_uri(uri) == shown


def test_mask_options_masks_only_secret_options() -> None:
    options = {"sasl.password": PASSWORD, "sasl.oauthbearer.client.secret": PASSWORD, "security.protocol": "SASL_SSL"}
    assert mask_options(options) == {
        "sasl.password": "***",
        "sasl.oauthbearer.client.secret": "***",
        "security.protocol": "SASL_SSL",
    }


def test_every_tls_and_sasl_secret_option_is_masked_and_the_paths_are_not() -> None:
    secrets = ("sasl.password", "ssl.key.password", "ssl.keystore.password", "ssl.key.pem", "sasl.oauthbearer.config")
    shown = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "tensordb",
             "ssl.ca.location": "/etc/tensordb/ca.pem", "ssl.certificate.location": "/etc/tensordb/client.pem"}  # fmt: skip
    settings = Settings(kafka_options={**dict.fromkeys(secrets, PASSWORD), **shown})
    assert PASSWORD not in repr(settings) and PASSWORD not in str(settings)
    assert mask_options(settings.kafka_options) == {**dict.fromkeys(secrets, "***"), **shown}


def test_configuration_errors_do_not_echo_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENSORDB_KAFKA_OPTIONS", f'{{"sasl.password": "{PASSWORD}"')  # malformed JSON
    with pytest.raises(ConfigurationError) as error:
        load_settings()
    assert PASSWORD not in str(error.value) and "kafka_options" in str(error.value)
    monkeypatch.delenv("TENSORDB_KAFKA_OPTIONS")
    with pytest.raises(ConfigurationError) as error:
        LocalServices(Settings(mongo_uri=f"mongodb://admin:{PASSWORD}@:notaport/"))
    assert PASSWORD not in str(error.value) and "mongodb://admin:***@" in str(error.value)


# -- issue 24, finding 9: URI query secrets and librdkafka's JWT-assertion options -----------------------

KEY_PASSWORD, SESSION_TOKEN, PASSPHRASE = "tls-key-pass-1", "aws-session-token-1", "jwt-key-passphrase-1"
URI_WITH_SECRETS = (
    f"mongodb://db1:27017/?replicaSet=rs0&tls=true&tlsCertificateKeyFilePassword={KEY_PASSWORD}"
    f"&authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:{SESSION_TOKEN},SERVICE_NAME:mongodb"
)
JWT_OPTIONS = {
    "sasl.oauthbearer.method": "oidc",
    "sasl.oauthbearer.grant.type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
    "sasl.oauthbearer.assertion.private.key.passphrase": PASSPHRASE,
    "sasl.oauthbearer.assertion.private.key.pem": f"-----BEGIN ENCRYPTED PRIVATE KEY-----{PASSPHRASE}x",
    "sasl.oauthbearer.client.credentials.client.secret": f"{PASSPHRASE}-client",
    "sasl.oauthbearer.assertion.private.key.file": "/etc/tensordb/jwt.key",
}
FINDING_9_SECRETS = (KEY_PASSWORD, SESSION_TOKEN, PASSPHRASE)


def test_repr_of_settings_masks_uri_secret_options_and_jwt_assertion_options() -> None:
    settings = Settings(mongo_uri=URI_WITH_SECRETS, kafka_options=JWT_OPTIONS)
    for shown in (repr(settings), str(settings)):
        assert not [secret for secret in FINDING_9_SECRETS if secret in shown], shown
        assert "tlsCertificateKeyFilePassword=***" in shown and "AWS_SESSION_TOKEN:***,SERVICE_NAME:mongodb" in shown
        assert "'sasl.oauthbearer.assertion.private.key.file': '/etc/tensordb/jwt.key'" in shown  # a path, shown


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (URI_WITH_SECRETS, URI_WITH_SECRETS.replace(KEY_PASSWORD, "***").replace(SESSION_TOKEN, "***")),
        ("mongodb://h/?authMechanismProperties=AWS_SESSION_TOKEN%3Aabcd&w=1", "mongodb://h/?authMechanismProperties=AWS_SESSION_TOKEN%3A***&w=1"),
        ("tlscertificatekeyfilepassword='a\"b', authmechanismproperties={'AWS_SESSION_TOKEN': 'abc'}",
         "tlscertificatekeyfilepassword='***', authmechanismproperties={'AWS_SESSION_TOKEN': '***'}"),
        ("{'mongo_uri': 'mongodb://h/?tlsCertificateKeyFilePassword=abcd&w=1'}",
         "{'mongo_uri': 'mongodb://h/?tlsCertificateKeyFilePassword=***&w=1'}"),  # a secret quoted inside a value
        ("ENVIRONMENT:azure,TOKEN_RESOURCE:api://x the token: stays", "ENVIRONMENT:azure,TOKEN_RESOURCE:api://x the token: stays"),
    ],
)  # fmt: skip
def test_mask_uri_masks_secret_options_in_uris_and_driver_reprs(text: str, shown: str) -> None:
    assert mask_uri(text) == shown


def test_the_log_masker_masks_a_mongo_client_s_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    """pymongo's reprs (in NoFile and other driver errors) spell the URI's options their own way."""
    client = MongoClient(URI_WITH_SECRETS, connect=False)
    stream = io.StringIO()
    configure_logging(Settings(mongo_uri=URI_WITH_SECRETS, kafka_options=JWT_OPTIONS), stream=stream)
    try:
        logging.getLogger("tensordb.test").error("no file in collection %r; options %s", client, JWT_OPTIONS)
        configure_logging(Settings(), stream=stream)  # settings that do not know these secrets: masked by name
        logging.getLogger("tensordb.test").error("no file in collection %r", client)
    finally:
        client.close()
        logging.getLogger().handlers.clear()
    written = stream.getvalue()
    assert str(SESSION_TOKEN) in repr(client)  # what pymongo would show
    assert not [secret for secret in FINDING_9_SECRETS if secret in written], written
    assert written.count("tlscertificatekeyfilepassword='***'") == 2


def test_an_unreachable_mongodb_error_masks_the_uri_s_secret_options() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = URI_WITH_SECRETS.replace("db1:27017", f"127.0.0.1:{port}").replace("tls=true&", "")
    with pytest.raises(UnreachableError) as error, Store(Settings(mongo_uri=uri), server_wait_ms=300) as store:
        store.ensure_indexes()
    assert not [secret for secret in FINDING_9_SECRETS if secret in str(error.value)], str(error.value)
    assert "tlsCertificateKeyFilePassword=***" in str(error.value)


def test_a_command_that_fails_unforeseen_prints_its_traceback_without_secrets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A driver's error quoting its client (options and all) escapes a command: the traceback printed is masked."""
    from tensordb.cli import commands, main

    client = MongoClient(URI_WITH_SECRETS, connect=False)

    def fails(args: object) -> int:
        raise RuntimeError(f"no file in gridfs collection {client!r}")

    monkeypatch.setenv("TENSORDB_MONGO_URI", URI_WITH_SECRETS)
    monkeypatch.setattr(commands, "_policy", fails)
    try:
        assert main(["policy", "list"]) == 1
    finally:
        client.close()
    printed = capsys.readouterr().err
    assert "RuntimeError: no file in gridfs collection MongoClient(" in printed
    assert not [secret for secret in FINDING_9_SECRETS if secret in printed], printed
