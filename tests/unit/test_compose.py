"""docker-compose.yml and the Dockerfile agree with the code they deploy; no Docker engine needed.

The files are parsed and checked against what they configure: every ``TENSORDB_*`` variable must be
a real ``Settings`` field that parses, every command a real ``tensordb`` sub-command, every address a
compose service. A renamed setting or command then fails here rather than in a deployment.
"""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from typing import Any
from urllib.parse import parse_qs

import pytest
import yaml

from tensordb.config import Settings
from tests import REPO

COMPOSE: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
DOCKERFILE = (REPO / "Dockerfile").read_text()

INFRASTRUCTURE = {"kafka": "apache/kafka", "mongo": "mongo"}
# Services built from the repository's Dockerfile: everything that is not infrastructure.
TENSORDB_SERVICES = sorted(set(SERVICES) - set(INFRASTRUCTURE))
PREFIX = "TENSORDB_"


def environment(service: str) -> dict[str, str]:
    """A service's environment as a mapping (compose accepts a mapping or a list of KEY=VALUE)."""
    env = SERVICES[service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def command(service: str) -> list[str]:
    """A service's command as an argument list (compose accepts a list or a shell-like string)."""
    value = SERVICES[service]["command"]
    return shlex.split(value) if isinstance(value, str) else [str(arg) for arg in value]


def published(port: str | int | dict[str, Any]) -> tuple[str | None, str]:
    """(host address, host port) of a published port, in short ("IP:HOST:CONTAINER") or long syntax."""
    if isinstance(port, dict):
        return port.get("host_ip"), str(port.get("published", ""))
    parts = str(port).split(":")
    return (parts[0], parts[1]) if len(parts) == 3 else (None, parts[0])


def mongo_replica_set() -> str:
    args = command("mongo")
    return args[args.index("--replSet") + 1]


def named_mounts(service: str) -> dict[str, str]:
    """Named volume -> container path for a service's volume mounts (bind mounts left out)."""
    mounts = {}
    for volume in SERVICES[service].get("volumes", []):
        if isinstance(volume, dict):
            source, target = volume.get("source", ""), volume["target"]
            if volume.get("type", "volume") != "volume":
                continue
        else:
            source, target = volume.split(":")[:2]
        if source and not source.startswith((".", "/", "~")):
            mounts[source] = target
    return mounts


def kafka_advertised() -> dict[str, str]:
    """Listener name -> advertised host:port of the kafka service."""
    listeners = environment("kafka")["KAFKA_ADVERTISED_LISTENERS"].split(",")
    return dict(listener.split("://", 1) for listener in listeners)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_the_expected_services_exist_with_pinned_official_images() -> None:
    assert {"kafka", "mongo", "topics", "processors"} <= set(SERVICES)
    for name, image in INFRASTRUCTURE.items():
        repository, _, tag = SERVICES[name]["image"].partition(":")
        assert repository == image, f"{name} should run the official {image} image"
        assert tag and tag != "latest", f"{name} should pin an image tag, not {tag or 'none'}"
        assert "build" not in SERVICES[name]


@pytest.mark.parametrize("service", TENSORDB_SERVICES)
def test_tensordb_services_build_the_repository_dockerfile(service: str) -> None:
    build = SERVICES[service].get("build")
    assert build is not None, f"{service} is neither infrastructure nor built from the Dockerfile"
    if isinstance(build, str):
        build = {"context": build}
    assert (REPO / build["context"]).resolve() == REPO
    assert build.get("dockerfile", "Dockerfile") == "Dockerfile"
    # The image's ENTRYPOINT is tensordb: `command` holds the sub-command, so keep the entrypoint.
    assert "entrypoint" not in SERVICES[service]


@pytest.mark.parametrize("service", sorted(INFRASTRUCTURE))
def test_infrastructure_has_a_healthcheck(service: str) -> None:
    healthcheck = SERVICES[service].get("healthcheck")
    assert healthcheck, f"{service} needs a healthcheck for depends_on: service_healthy"
    test = healthcheck["test"]
    assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1
    assert healthcheck.get("interval") and healthcheck.get("retries")


def test_kafka_runs_kraft_without_zookeeper() -> None:
    env = environment("kafka")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@")
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in env["KAFKA_LISTENERS"]
    assert "zookeeper" not in (REPO / "docker-compose.yml").read_text().lower()
    # TensorDB creates its topics explicitly; the broker must not invent them.
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert "kafka-broker-api-versions" in " ".join(SERVICES["kafka"]["healthcheck"]["test"])


def test_kafka_advertises_each_published_port_on_the_host() -> None:
    advertised = kafka_advertised().values()
    for port in SERVICES["kafka"].get("ports", []):
        _, host_port = published(port)
        assert f"127.0.0.1:{host_port}" in advertised or f"localhost:{host_port}" in advertised, (
            f"host clients reach kafka on port {host_port}, so a listener must advertise it"
        )


def test_mongo_runs_a_replica_set_that_its_healthcheck_initiates() -> None:
    assert "--replSet" in command("mongo")
    healthcheck = " ".join(SERVICES["mongo"]["healthcheck"]["test"])
    assert "rs.initiate" in healthcheck and f"_id: '{mongo_replica_set()}'" in healthcheck
    assert "host: 'mongo:27017'" in healthcheck


def test_named_volumes_are_declared_and_mounted() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    assert {"kafka-data", "mongo-data"} <= declared
    mounted = {name: path for service in SERVICES for name, path in named_mounts(service).items()}
    assert set(mounted) == declared, "every named volume is declared once and used"
    assert named_mounts("kafka")["kafka-data"] == environment("kafka")["KAFKA_LOG_DIRS"]
    assert named_mounts("mongo")["mongo-data"] == "/data/db"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_published_ports_bind_loopback_only(service: str) -> None:
    for port in SERVICES[service].get("ports", []):
        assert published(port)[0] == "127.0.0.1", f"{service} publishes {port} beyond this machine"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_tensordb_variable_is_a_settings_field(service: str) -> None:
    fields = {f"{PREFIX}{name.upper()}" for name in Settings.model_fields}
    unknown = {key for key in environment(service) if key.startswith(PREFIX)} - fields
    assert not unknown, f"{service} sets {sorted(unknown)}, which Settings does not read"


@pytest.mark.parametrize("service", TENSORDB_SERVICES)
def test_tensordb_services_point_at_the_compose_kafka_and_mongo(service: str) -> None:
    env = environment(service)
    assert {f"{PREFIX}KAFKA_BOOTSTRAP", f"{PREFIX}MONGO_URI"} <= set(env), f"{service} needs both addresses"
    assert env[f"{PREFIX}KAFKA_BOOTSTRAP"].split(",") == ["kafka:9092"]
    assert "kafka:9092" in kafka_advertised().values(), "kafka must advertise its compose address"

    match = re.fullmatch(r"mongodb://([^/?]+)/?(?:\?(.*))?", env[f"{PREFIX}MONGO_URI"])
    assert match, f"{service}: TENSORDB_MONGO_URI is not a mongodb:// URI"
    assert match.group(1).split(",") == ["mongo:27017"]
    assert parse_qs(match.group(2) or "").get("replicaSet") == [mongo_replica_set()]


@pytest.mark.parametrize("service", TENSORDB_SERVICES)
def test_tensordb_environment_parses_into_settings(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(PREFIX):  # the test run's own settings must not leak in
            monkeypatch.delenv(key)
    env = environment(service)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.kafka_bootstrap == env[f"{PREFIX}KAFKA_BOOTSTRAP"]
    assert settings.mongo_uri == env[f"{PREFIX}MONGO_URI"]


@pytest.mark.parametrize("service", TENSORDB_SERVICES)
def test_dependencies_wait_for_healthy_infrastructure(service: str) -> None:
    depends_on = SERVICES[service].get("depends_on")
    assert isinstance(depends_on, dict), f"{service}: use the long depends_on form with conditions"
    assert "kafka" in depends_on  # every TensorDB process talks to Kafka
    for name in INFRASTRUCTURE:
        if name in depends_on:
            assert depends_on[name]["condition"] == "service_healthy"
    for name, dependency in depends_on.items():
        assert name in SERVICES
        if name == "topics":  # a one-shot service: wait until it has finished, successfully
            assert dependency["condition"] == "service_completed_successfully"


def test_topics_runs_once_and_processors_keep_running() -> None:
    assert SERVICES["topics"]["restart"] == "no"  # quoted in YAML: a bare `no` is a boolean
    assert SERVICES["processors"]["restart"] == "unless-stopped"
    assert {"kafka", "mongo", "topics"} <= set(SERVICES["processors"]["depends_on"])


@pytest.mark.parametrize("service", TENSORDB_SERVICES)
def test_command_is_a_tensordb_sub_command(service: str) -> None:
    from tensordb.cli import build_parser

    args = command(service)
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"{service}: `tensordb {' '.join(args)}` is not a tensordb command (exit {exc.code})")
    assert callable(parsed.handler)


def test_dockerfile_installs_pinned_and_runs_tensordb_unprivileged() -> None:
    instructions = dockerfile_instructions()
    stages = [args for op, args in instructions if op == "FROM"]
    assert stages == ["node:20-slim AS dashboard", "python:3.11-slim"]  # the front end is built, then copied
    installs = [args for op, args in instructions if op == "RUN" and "pip install" in args]
    assert installs and all(re.search(r"(^|\s)-c constraints\.txt(\s|$)", args) for args in installs)
    entrypoints = [args for op, args in instructions if op == "ENTRYPOINT"]
    assert entrypoints == ['["tensordb"]']
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    # The entrypoint is the console script pyproject.toml declares.
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "tensordb" in scripts


def test_dockerfile_copies_files_that_exist() -> None:
    for op, args in dockerfile_instructions():
        if op == "COPY" and "--from=" not in args:  # copies from an earlier stage come from that stage
            *sources, _destination = [arg for arg in args.split() if not arg.startswith("--")]
            for source in sources:
                assert (REPO / source).exists(), f"the Dockerfile copies {source}, which the repository lacks"
