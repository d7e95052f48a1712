"""tensordb.infra.metrics without servers: the endpoint's binding rule, token, Host check and answers."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from pydantic import SecretStr

from tensordb.config import Settings
from tensordb.errors import ConfigurationError
from tensordb.infra import metrics
from tensordb.infra.metrics import MetricsServer, start_metrics
from tensordb.testing import free_port


@pytest.fixture
def endpoint() -> Iterator[MetricsServer]:
    server = MetricsServer(Settings(), "127.0.0.1", 0, lambda: None, token=None)
    yield server
    server.close()


def test_beyond_loopback_without_a_token_refuses_to_start() -> None:
    with pytest.raises(ConfigurationError, match="TENSORDB_METRICS_TOKEN"):
        start_metrics(Settings(metrics_host="0.0.0.0"), "worker", port=free_port())


def test_port_zero_turns_it_off() -> None:
    assert start_metrics(Settings(), "worker", port=0) is None
    assert start_metrics(Settings(metrics_port=0), "worker") is None


def test_an_explicit_port_that_is_taken_is_an_error(endpoint: MetricsServer) -> None:
    with pytest.raises(ConfigurationError, match="--metrics-port"):
        start_metrics(Settings(), "worker", port=endpoint.port)


def test_metrics_health_and_ready(endpoint: MetricsServer) -> None:
    metrics.observe_predictions("unit-model", "http", 2, 0.01)
    url = f"http://127.0.0.1:{endpoint.port}"
    scraped = httpx.get(f"{url}/metrics")
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    assert 'tensordb_predictions_total{model="unit-model",via="http"} 2.0' in scraped.text
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/ready").json() == {"status": "ready"}
    assert httpx.get(f"{url}/other").status_code == 404


def test_an_unknown_host_is_refused_on_loopback(endpoint: MetricsServer) -> None:
    answer = httpx.get(f"http://127.0.0.1:{endpoint.port}/metrics", headers={"Host": "attacker.example"})
    assert answer.status_code == 421


def test_a_token_is_required_when_set() -> None:
    server = MetricsServer(Settings(metrics_token=SecretStr("t0ken")), "127.0.0.1", 0, lambda: "MongoDB away", token="t0ken")
    try:
        url = f"http://127.0.0.1:{server.port}"
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ready = httpx.get(f"{url}/ready", headers={"Authorization": "Bearer t0ken"})
        assert ready.status_code == 503 and ready.json()["reason"] == "MongoDB away"
    finally:
        server.close()


def test_a_supervised_loop_that_waits_makes_the_process_not_ready_and_shows_in_the_metrics(endpoint: MetricsServer) -> None:
    import threading

    from pymongo.errors import ServerSelectionTimeoutError

    from tensordb.infra.supervision import Supervisor
    from tensordb.testing import wait_for

    url = f"http://127.0.0.1:{endpoint.port}"
    supervisor = Supervisor("unit-loop")
    outage = threading.Event()
    outage.set()

    def step() -> None:
        if outage.is_set():
            raise ServerSelectionTimeoutError("no primary (injected)")

    waiting = threading.Thread(target=supervisor.wait_out, args=(step, "reading the queue"))
    waiting.start()
    try:
        wait_for(lambda: supervisor.status != "ok", what="the loop waiting")
        ready = httpx.get(f"{url}/ready")
        assert ready.status_code == 503 and "unit-loop: waiting since" in ready.json()["reason"]
        assert "reading the queue: no primary (injected)" in ready.json()["reason"]
        assert 'tensordb_loop_ok{loop="unit-loop"} 0.0' in httpx.get(f"{url}/metrics").text
    finally:
        outage.clear()
        waiting.join(10)
    assert supervisor.status == "ok" and metrics.loop_problems() is None
    assert 'tensordb_loop_ok{loop="unit-loop"} 1.0' in httpx.get(f"{url}/metrics").text
    endpoint._ready_at = float("-inf")  # the cached answer expires
    assert httpx.get(f"{url}/ready").json() == {"status": "ready"}
