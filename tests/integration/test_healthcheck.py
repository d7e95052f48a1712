"""``tensordb healthcheck PART``, the compose services' healthchecks, against the real servers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

from tensordb.config import Settings
from tensordb.testing import ChildProcess, free_port
from tests import REPO


def healthcheck(part: str, settings: Settings) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tensordb.cli", "healthcheck", part],
        cwd=REPO, env={"PATH": "/usr/bin:/bin", **settings.as_environment()}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_processors_are_healthy_while_kafka_and_mongodb_answer(settings: Settings) -> None:
    assert healthcheck("processors", settings).returncode == 0
    down = healthcheck("processors", settings.with_changes(kafka_bootstrap=f"127.0.0.1:{free_port('127.0.0.1')}"))
    assert down.returncode == 1 and "Kafka" in down.stderr


def test_a_worker_is_healthy_once_it_advertised_itself(settings: Settings, start_worker: Callable[..., ChildProcess]) -> None:
    missing = healthcheck("worker", settings)
    assert missing.returncode == 1 and "no worker on" in missing.stderr
    start_worker()
    assert healthcheck("worker", settings).returncode == 0


def test_an_http_endpoint_that_does_not_answer_is_unhealthy(settings: Settings) -> None:
    port = free_port("127.0.0.1")
    for part, changes in (("dashboard", {"dashboard_port": port}), ("serve", {"serve_port": port})):
        down = healthcheck(part, settings.with_changes(**changes))
        assert down.returncode == 1 and "did not answer" in down.stderr
