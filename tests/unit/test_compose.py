"""docker-compose.yml, its secrets override, .env.example and the Dockerfile agree with the code they
deploy; no Docker engine needed.

The files are parsed and checked against what they configure: every ``TENSORDB_*`` variable must be
a real ``Settings`` field that parses, every command and healthcheck a real ``tensordb`` sub-command,
every address a compose service, every setting listed in .env.example. A renamed setting or command
then fails here rather than in a deployment. Debian's ``docker-compose`` (``make test`` installs it)
then validates the files as a real compose implementation does, with the values of .env.example.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
from typing import Any
from urllib.parse import parse_qs

import pytest
import yaml

from tensordb.config import SOURCE_VARIABLES, Settings
from tests import REPO

COMPOSE_FILE, SECRETS_FILE, ENV_EXAMPLE = "docker-compose.yml", "docker-compose.secrets.yml", ".env.example"
_VARIABLE = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\})")


def env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines of an env file (comments and blank lines skipped; values taken as they are)."""
    pairs = (line.split("=", 1) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    return {key.strip(): value for key, value in pairs}


def interpolate(text: str, values: dict[str, str]) -> str:
    """Compose's ``${NAME}``, ``${NAME:-default}``, ``${NAME-default}`` and ``$$``, from ``values``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(1):
            return "$"
        name, operator, default = match.group(2), match.group(3), match.group(4) or ""
        value = values.get(name)
        if operator in (":-", ":?") and not value or operator in ("-", "?") and value is None:
            assert "?" not in operator, f"{name} is required: {default}"
            return default
        return value or ""

    return _VARIABLE.sub(replace, text)


def variables_used(text: str) -> set[str]:
    return {match.group(2) for match in _VARIABLE.finditer(text) if match.group(2)}


EXAMPLE: dict[str, str] = env_file((REPO / ENV_EXAMPLE).read_text())
COMPOSE: dict[str, Any] = yaml.safe_load(interpolate((REPO / COMPOSE_FILE).read_text(), EXAMPLE))
SECRETS: dict[str, Any] = yaml.safe_load(interpolate((REPO / SECRETS_FILE).read_text(), EXAMPLE))
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
DOCKERFILE = (REPO / "Dockerfile").read_text()

INFRASTRUCTURE = {"kafka": "apache/kafka", "mongo": "mongo", "mongo-init": "mongo"}
# Services built from the repository's Dockerfile: everything that is not infrastructure.
TENSORDB_SERVICES = sorted(set(SERVICES) - set(INFRASTRUCTURE))
# Services that run once and exit 0; the others keep running (and have a healthcheck).
ONE_SHOTS = {"mongo-init", "topics"}
LONG_RUNNING = sorted(set(SERVICES) - ONE_SHOTS)
# The HTTP endpoints: (service, the setting prefix of its host, port and token).
HTTP_SERVICES = {"serve": "SERVE", "dashboard": "DASHBOARD"}
PREFIX = "TENSORDB_"
FIELDS = {f"{PREFIX}{name.upper()}" for name in Settings.model_fields}


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
    assert {"kafka", "mongo", "mongo-init", "topics", "processors", "worker", "serve", "dashboard"} <= set(SERVICES)
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


@pytest.mark.parametrize("service", LONG_RUNNING)
def test_long_running_services_have_a_healthcheck_and_restart(service: str) -> None:
    healthcheck = SERVICES[service].get("healthcheck")
    assert healthcheck, f"{service} needs a healthcheck (depends_on: service_healthy, `docker compose ps`)"
    test = healthcheck["test"]
    assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1
    assert healthcheck.get("interval") and healthcheck.get("retries")
    assert SERVICES[service]["restart"] == "unless-stopped"


@pytest.mark.parametrize("service", sorted(ONE_SHOTS))
def test_one_shots_run_once(service: str) -> None:
    assert SERVICES[service]["restart"] == "no"  # quoted in YAML: a bare `no` is a boolean
    assert "healthcheck" not in SERVICES[service]  # waited for with service_completed_successfully


@pytest.mark.parametrize("service", sorted(set(TENSORDB_SERVICES) - ONE_SHOTS))
def test_tensordb_healthchecks_are_tensordb_commands(service: str) -> None:
    from tensordb.cli import build_parser

    test = SERVICES[service]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "tensordb", "healthcheck"], f"{service}: use `tensordb healthcheck PART`"
    parsed = build_parser().parse_args(test[2:])
    assert parsed.part == service


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_service_has_resource_hints(service: str) -> None:
    resources = SERVICES[service].get("deploy", {}).get("resources", {})
    assert {"cpus", "memory"} <= set(resources.get("limits", {})), f"{service} needs cpu and memory limits"
    if service not in ONE_SHOTS:
        assert resources.get("reservations", {}).get("memory"), f"{service} needs a memory reservation"


def test_kafka_runs_kraft_without_zookeeper() -> None:
    env = environment("kafka")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@")
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in env["KAFKA_LISTENERS"]
    assert "zookeeper" not in (REPO / COMPOSE_FILE).read_text().lower()
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


def test_mongo_runs_a_replica_set_that_a_one_shot_initiates() -> None:
    assert "--replSet" in command("mongo")
    script = " ".join(command("mongo-init"))
    assert "rs.initiate" in script and f"_id: '{mongo_replica_set()}'" in script
    assert "host: 'mongo:27017'" in script and "--host mongo:27017" in script
    assert "isWritablePrimary" in script, "mongo-init exits only once the node is primary"
    assert SERVICES["mongo-init"]["depends_on"] == {"mongo": {"condition": "service_healthy"}}


def test_named_volumes_are_declared_and_mounted() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    assert {"kafka-data", "mongo-data"} <= declared
    mounted = {name: path for service in SERVICES for name, path in named_mounts(service).items()}
    assert set(mounted) == declared, "every named volume is declared once and used"
    assert named_mounts("kafka")["kafka-data"] == environment("kafka")["KAFKA_LOG_DIRS"]
    assert named_mounts("mongo")["mongo-data"] == "/data/db"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_published_ports_bind_loopback_by_default(service: str) -> None:
    for port in SERVICES[service].get("ports", []):
        assert published(port)[0] == "127.0.0.1", f"{service} publishes {port} beyond this machine"


@pytest.mark.parametrize("service", ["processors", "worker"])
def test_scalable_services_can_run_several_replicas(service: str) -> None:
    # a fixed name or host port would clash between replicas
    assert "container_name" not in SERVICES[service] and "ports" not in SERVICES[service]
    assert "replicas" not in SERVICES[service].get("deploy", {}), "scale with --scale, not a fixed count"


@pytest.mark.parametrize("service", sorted(HTTP_SERVICES))
def test_http_endpoints_bind_their_container_and_need_a_token(service: str) -> None:
    name = HTTP_SERVICES[service]
    env = environment(service)
    assert env[f"{PREFIX}{name}_HOST"] == "0.0.0.0"  # so the published port reaches it; hence a token
    raw = yaml.safe_load((REPO / COMPOSE_FILE).read_text())["services"][service]["environment"]
    assert raw[f"{PREFIX}{name}_TOKEN"] == f"${{{PREFIX}{name}_TOKEN:-}}", "the token comes from .env"
    container_port = env[f"{PREFIX}{name}_PORT"]
    assert [str(port).rsplit(":", 1)[1] for port in SERVICES[service]["ports"]] == [container_port]
    # or from a compose secret, mounted where TENSORDB_SECRETS_DIR makes Settings read it
    override = SECRETS["services"][service]
    assert override["environment"]["TENSORDB_SECRETS_DIR"] == "/run/secrets"
    assert [secret["target"] for secret in override["secrets"]] == [f"{PREFIX}{name}_TOKEN"]
    assert {secret["source"] for secret in override["secrets"]} <= set(SECRETS["secrets"])


def test_the_model_server_serves_a_named_policy() -> None:
    assert environment("serve")[f"{PREFIX}SERVE_POLICY"], "the model server needs a policy"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_tensordb_variable_is_a_settings_field(service: str) -> None:
    variables = set(environment(service)) | set(SECRETS["services"].get(service, {}).get("environment", {}))
    unknown = {key for key in variables if key.startswith(PREFIX)} - FIELDS - set(SOURCE_VARIABLES)
    assert not unknown, f"{service} sets {sorted(unknown)}, which Settings does not read"


def test_passed_through_settings_keep_their_names() -> None:
    raw = yaml.safe_load((REPO / COMPOSE_FILE).read_text())["x-tensordb-env"]
    for key, value in raw.items():
        used = variables_used(str(value))
        assert used <= {key}, f"{key} is set from {sorted(used)}: a setting passes through under its own name"


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


def _clean_settings_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(PREFIX):  # the test run's own settings must not leak in
            monkeypatch.delenv(key)


@pytest.mark.parametrize("service", TENSORDB_SERVICES)
def test_tensordb_environment_parses_into_settings(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_settings_environment(monkeypatch)
    env = environment(service)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.kafka_bootstrap == env[f"{PREFIX}KAFKA_BOOTSTRAP"]
    assert settings.mongo_uri == env[f"{PREFIX}MONGO_URI"]


@pytest.mark.parametrize("service", sorted(set(TENSORDB_SERVICES) - ONE_SHOTS))
def test_long_running_tensordb_services_wait_for_the_whole_infrastructure(service: str) -> None:
    assert SERVICES[service]["depends_on"] == {
        "kafka": {"condition": "service_healthy"},
        "mongo": {"condition": "service_healthy"},
        "mongo-init": {"condition": "service_completed_successfully"},
        "topics": {"condition": "service_completed_successfully"},
    }


def test_topics_waits_for_a_healthy_broker() -> None:
    assert SERVICES["topics"]["depends_on"] == {"kafka": {"condition": "service_healthy"}}


@pytest.mark.parametrize("service", TENSORDB_SERVICES)
def test_command_is_a_tensordb_sub_command(service: str) -> None:
    from tensordb.cli import build_parser

    args = command(service)
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"{service}: `tensordb {' '.join(args)}` is not a tensordb command (exit {exc.code})")
    assert callable(parsed.handler)


# -- .env.example: every setting, each a real one, with its default ------------------------------


def test_env_example_lists_every_setting_and_nothing_else() -> None:
    names = set(EXAMPLE)
    assert FIELDS - names == set(), f".env.example lacks {sorted(FIELDS - names)}"
    assert set(SOURCE_VARIABLES) <= names
    unknown = {name for name in names if name.startswith(PREFIX)} - FIELDS - set(SOURCE_VARIABLES)
    assert not unknown, f".env.example sets {sorted(unknown)}, which Settings does not read"
    compose_text = (REPO / COMPOSE_FILE).read_text() + (REPO / SECRETS_FILE).read_text()
    stack_only = {name for name in names if not name.startswith(PREFIX)}
    assert stack_only <= variables_used(compose_text), "a non-setting variable must be one the compose files use"
    assert variables_used(compose_text) <= names, "every variable the compose files use is in .env.example"


def test_env_example_comments_every_variable() -> None:
    lines = (REPO / ENV_EXAMPLE).read_text().splitlines()
    for index, line in enumerate(lines):
        if line and not line.startswith("#"):
            previous = lines[index - 1]
            assert previous.startswith("# ") or "=" in previous, f"{line.split('=')[0]} has no comment above it"


def test_env_example_holds_the_defaults_and_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_settings_environment(monkeypatch)
    for key, value in EXAMPLE.items():
        monkeypatch.setenv(key, value)
    assert Settings() == Settings.model_construct(
        **{name: field.get_default(call_default_factory=True) for name, field in Settings.model_fields.items()}
    )
    for key in (
        "TENSORDB_DASHBOARD_TOKEN",
        "TENSORDB_SERVE_TOKEN",
        "TENSORDB_METRICS_TOKEN",
        "TENSORDB_MONGO_URI",
        "TENSORDB_KAFKA_OPTIONS",
    ):
        assert "@" not in EXAMPLE[key] and "password" not in EXAMPLE[key].lower()
    assert EXAMPLE["TENSORDB_DASHBOARD_TOKEN"] == EXAMPLE["TENSORDB_SERVE_TOKEN"] == EXAMPLE["TENSORDB_METRICS_TOKEN"] == ""


# -- a real compose implementation ----------------------------------------------------------------


def docker_compose(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("Debian's docker-compose is not installed (`make test` installs it: sh .ci/apt-install docker-compose)")
    # only the .env.example values: neither the test run's TENSORDB_* nor a developer's .env
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        [binary, "--project-directory", str(REPO), "--env-file", str(REPO / ENV_EXAMPLE), *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("files", [[COMPOSE_FILE], [COMPOSE_FILE, SECRETS_FILE]], ids=["stack", "stack+secrets"])
def test_docker_compose_validates_the_files(files: list[str]) -> None:
    options = [arg for name in files for arg in ("-f", str(REPO / name))]
    checked = docker_compose(*options, "config", "-q")
    assert checked.returncode == 0 and not checked.stderr.strip(), checked.stderr


def test_docker_compose_resolves_what_these_tests_check() -> None:
    resolved = docker_compose("-f", str(REPO / COMPOSE_FILE), "config")
    assert resolved.returncode == 0, resolved.stderr
    services = yaml.safe_load(resolved.stdout)["services"]
    assert set(services) == set(SERVICES)
    for name in TENSORDB_SERVICES:
        got = {key: str(value) for key, value in (services[name].get("environment") or {}).items()}
        assert got == environment(name), f"{name}: compose resolves another environment than these tests read"
        assert services[name]["command"] == command(name)


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


@pytest.mark.parametrize("service", sorted(set(TENSORDB_SERVICES) - ONE_SHOTS))
def test_metrics_ports_are_exposed_on_the_compose_network_only(service: str) -> None:
    port = environment(service)[f"{PREFIX}METRICS_PORT"]
    assert [str(exposed) for exposed in SERVICES[service].get("expose", [])] == [port]
    assert all(str(mapping).rsplit(":", 1)[-1] != port for mapping in SERVICES[service].get("ports", [])), "never published"
    # beyond the container's loopback the endpoint needs a token: it comes from .env, never a default
    raw = yaml.safe_load((REPO / COMPOSE_FILE).read_text())["x-tensordb-env"]
    assert raw[f"{PREFIX}METRICS_TOKEN"] == f"${{{PREFIX}METRICS_TOKEN:-}}"
