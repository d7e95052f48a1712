"""tensordb.infra.logging: one set-up for every process, text or JSON lines, and no secret in either."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from tensordb.config import Settings
from tensordb.infra.logging import configure_logging

PASSWORD = "s3cr3t-p@ss/word"  # as the URI carries it: percent-encoded
SECRETS = ("s3cr3t-p%40ss%2Fword", PASSWORD, "kafka-sasl-secret", "dashboard-token-1", "metrics-token-1")


@pytest.fixture
def settings() -> Settings:
    return Settings(
        mongo_uri="mongodb://admin:s3cr3t-p%40ss%2Fword@db.example:27017/?replicaSet=rs0",
        kafka_options={"security.protocol": "SASL_SSL", "sasl.username": "svc", "sasl.password": "kafka-sasl-secret"},
        dashboard_token=SecretStr("dashboard-token-1"),
        metrics_token=SecretStr("metrics-token-1"),
    )


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def log_everything(settings: Settings) -> None:
    """What a careless caller might log: the settings, their dump, the URI, the options, a traceback."""
    log = logging.getLogger("tensordb.test")
    log.info("starting with %s", settings)
    log.info("dump %s", settings.model_dump())
    log.info("environment %s", settings.as_environment())
    log.warning("connecting to %s with %s", settings.mongo_uri, settings.kafka_options)
    log.info("another URI: %s", "mongodb://someone:hunter22@other.example/")
    try:
        raise ConnectionError(f"cannot reach {settings.mongo_uri}")
    except ConnectionError:
        log.exception("failed")
    log.info("extra fields", extra={"uri": settings.mongo_uri, "count": 3})


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_secret_reaches_a_line(settings: Settings, log_format: str) -> None:
    stream = io.StringIO()
    configure_logging(settings.with_changes(log_format=log_format), stream=stream)
    log_everything(settings)
    written = stream.getvalue()
    assert "mongodb://admin:***@db.example" in written
    for secret in (*SECRETS, "hunter22"):
        assert secret not in written, f"{secret!r} was logged"


def test_json_lines_are_objects_with_the_usual_fields(settings: Settings) -> None:
    stream = io.StringIO()
    configure_logging(settings.with_changes(log_format="json", log_level="debug"), stream=stream)
    log_everything(settings)
    logging.getLogger("tensordb.test").debug("debug shown")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 8
    assert {"time", "level", "logger", "message", "process", "thread"} <= set(lines[0])
    assert lines[0]["logger"] == "tensordb.test" and lines[0]["level"] == "INFO"
    failed = next(line for line in lines if line["message"] == "failed")
    assert "ConnectionError" in failed["exception"] and "***" in failed["exception"]
    extra = next(line for line in lines if line["message"] == "extra fields")
    assert extra["count"] == 3 and extra["uri"].startswith("mongodb://admin:***@")
    assert lines[-1]["message"] == "debug shown" and lines[-1]["level"] == "DEBUG"


def test_text_is_the_default_and_the_level_filters(settings: Settings) -> None:
    stream = io.StringIO()
    configure_logging(settings.with_changes(log_level="warning"), stream=stream)
    logging.getLogger("tensordb.test").info("hidden")
    logging.getLogger("tensordb.test").warning("shown")
    assert stream.getvalue().count("\n") == 1
    assert " WARNING tensordb.test: shown" in stream.getvalue()


def test_configuring_again_replaces_the_handler(settings: Settings) -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(settings, stream=first)
    configure_logging(settings, stream=second)
    logging.getLogger("uvicorn.access").info("GET /")
    assert first.getvalue() == "" and "GET /" in second.getvalue()
