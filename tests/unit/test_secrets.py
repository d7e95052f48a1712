"""Secrets in the settings are never printed: the MongoDB password and Kafka's secret options are
masked wherever settings, URIs or configuration errors are shown."""

from __future__ import annotations

import pytest

from tensordb.config import Settings, load_settings, mask_options, mask_uri
from tensordb.errors import ConfigurationError
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
