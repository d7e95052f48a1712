"""What ``tensordb project create`` hands a project: its own credentials only, and ACLs on its own prefix only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from confluent_kafka.admin import AclOperation, AclPermissionType, ResourcePatternType, ResourceType
from pymongo.uri_parser import parse_uri

from tensordb.cli import main
from tensordb.cli.project import settings_block
from tensordb.config import Settings
from tensordb.infra.provisioning import acl_bindings, project_environment, project_uri


def test_the_project_uri_keeps_the_servers_and_drops_the_administrator_s_credentials_and_certificate(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("")  # pymongo checks that the CA file exists
    admin = (
        "mongodb://root:admin-pw@m1:27017,m2:27018/tensordb?replicaSet=rs0&authSource=admin&authMechanism=SCRAM-SHA-256"
        f"&tls=true&tlsCAFile={tmp_path}/ca.pem&tlsCertificateKeyFile=/etc/admin.pem&tlsCertificateKeyFilePassword=key-pw"
    )
    uri = project_uri(admin, "radiology", "project-pw")
    parsed = parse_uri(uri)
    assert parsed["username"] == "radiology" and parsed["password"] == "project-pw"
    assert parsed["nodelist"] == [("m1", 27017), ("m2", 27018)]
    assert parsed["options"]["authSource"] == "admin" and parsed["options"]["replicaSet"] == "rs0"
    assert parsed["options"]["tlsCAFile"] == f"{tmp_path}/ca.pem"
    assert not {"authMechanism", "tlsCertificateKeyFile", "tlsCertificateKeyFilePassword"} & set(parsed["options"])
    assert "admin-pw" not in uri and "key-pw" not in uri and "root:" not in uri


def test_the_environment_names_the_project_and_passes_only_public_kafka_options() -> None:
    settings = Settings(
        project="radiology", mongo_database="tensordb_radiology", mongo_uri="mongodb://root:pw@m1/",
        kafka_options={"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "admin",
                       "sasl.password": "kafka-admin-pw", "ssl.ca.location": "/etc/ca.pem"},
    )  # fmt: skip
    environment = project_environment(settings, "radiology", "pw2")
    assert environment["TENSORDB_PROJECT"] == "radiology" and environment["TENSORDB_MONGO_DATABASE"] == "tensordb_radiology"
    options = json.loads(environment["TENSORDB_KAFKA_OPTIONS"])
    assert options == {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "ssl.ca.location": "/etc/ca.pem"}
    block = settings_block("radiology", "User:radiology", environment, masked=True)
    assert "pw2" not in block and "kafka-admin-pw" not in block and "export TENSORDB_MONGO_URI=" in block


def test_the_acls_allow_the_principal_its_own_prefix_only() -> None:
    settings = Settings(project="radiology")
    bindings = acl_bindings(settings, "User:radiology")
    assert {(b.restype, b.name, b.resource_pattern_type, b.principal, b.permission_type) for b in bindings} == {
        (kind, "tensordb.radiology.", ResourcePatternType.PREFIXED, "User:radiology", AclPermissionType.ALLOW)
        for kind in (ResourceType.TOPIC, ResourceType.GROUP)
    }
    topic_operations = {b.operation for b in bindings if b.restype == ResourceType.TOPIC}
    assert {AclOperation.READ, AclOperation.WRITE, AclOperation.DESCRIBE} <= topic_operations
    assert AclOperation.ALL not in topic_operations and AclOperation.ALTER not in topic_operations
    assert {b.operation for b in bindings if b.restype == ResourceType.GROUP} >= {AclOperation.READ, AclOperation.DESCRIBE}


def test_an_existing_secrets_file_is_refused_before_anything_is_made(tmp_path: Path, capsys) -> None:
    existing = tmp_path / "radiology.env"
    existing.write_text("kept\n")
    # an unreachable MongoDB: had the command gone on, it would fail differently after 10 s
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TENSORDB_MONGO_URI", "mongodb://127.0.0.1:9/")
        assert main(["project", "create", "radiology", "--secrets-file", str(existing)]) == 1
    assert "already exists" in capsys.readouterr().err and existing.read_text() == "kept\n"
