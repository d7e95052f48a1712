"""Every long-running process's metrics endpoint during a small run: processors, a worker, the model
server and the dashboard as child processes against the session's broker and mongod, each with
``--metrics-port`` on a free port. The counters move with the work; ``/health`` and ``/ready`` answer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tensordb.config import Settings, Topic
from tensordb.infra.bus import Publisher
from tensordb.infra.store import Store
from tensordb.jobs.queue import Jobs, JobStatus
from tensordb.models.registry import ModelRegistry
from tensordb.testing import (
    dashboard_process,
    free_port,
    processors_process,
    server_process,
    wait_for,
    worker_process,
)
from tensordb.testing.models import small_classifier
from tensordb.testing.samples import image_samples
from tests import TASK_SCRIPTS

MODEL = "digits"
#: A scrape: (name, labels) → value.
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample of ``/metrics`` on ``port``: (name, labels) → value."""
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(value for (sample, have), value in samples.items() if sample == name and wanted <= have)


def scrape_until(port: int, condition: Callable[[Samples], bool], what: str, timeout: float = 60.0) -> Samples:
    """Scrape ``port`` (every half second) until ``condition`` holds for its samples; those samples."""
    return wait_for(lambda: samples if condition(samples := scrape(port)) else None, timeout=timeout, interval=0.5, what=what)


def assert_health_and_ready(port: int) -> None:
    health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=15)
    assert ready.status_code == 200, ready.text


@pytest.fixture
def promoted(settings: Settings) -> Iterator[int]:
    """A production version of ``MODEL`` for the model server."""
    with Store(settings) as store, ModelRegistry(store, Publisher(settings)) as registry:
        version = int(registry.save(small_classifier(units=4), MODEL)["version"])
        registry.promote(MODEL, version)
    yield version


def test_every_process_exposes_metrics_that_move_with_the_work(settings: Settings, promoted: int, tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("processors", "worker", "serve", "serve-http", "dashboard", "dashboard-http")}
    processors = processors_process(settings, tmp_path / "processors.log", metrics_port=ports["processors"])
    worker = worker_process(settings, tmp_path / "worker.log", lease_seconds=10, metrics_port=ports["worker"])
    serve = server_process(settings, tmp_path / "serve.log", MODEL, ports["serve-http"], metrics_port=ports["serve"])
    dashboard = dashboard_process(settings, tmp_path / "dashboard.log", ports["dashboard-http"], metrics_port=ports["dashboard"])
    with processors, worker, serve, dashboard:
        for name in ("processors", "worker", "serve", "dashboard"):
            assert_health_and_ready(ports[name])
            assert total(scrape(ports[name]), "tensordb_info", kind=name) == 1

        # -- the processors: samples stored, one record dead-lettered ------------------------------
        ingest = settings.topic(Topic.INGEST)
        with Publisher(settings) as publisher:
            for record in image_samples(20):
                publisher.publish(Topic.INGEST, record, key=record["sample_id"])
            publisher.publish_bytes(ingest, b"not json", key=b"bad")
            publisher.flush()
        processed = scrape_until(
            ports["processors"],
            lambda s: (
                total(s, "tensordb_records_processed_total", processor="ingest", topic=ingest) >= 21
                and total(s, "tensordb_records_dead_lettered_total", topic=ingest) >= 1
            ),
            "the processors' counters",
        )
        assert total(processed, "tensordb_handler_seconds_count", processor="ingest") >= 1
        assert total(processed, "tensordb_mongo_write_seconds_count", command="insert") >= 1
        # librdkafka reports the lag every 5 s (Tansu under-reports watermarks: the value is not checked)
        scrape_until(
            ports["processors"],
            lambda s: any(name == "tensordb_consumer_lag" and ("topic", ingest) in labels for name, labels in s),
            "the ingest consumer's lag",
        )

        # -- the worker: a tiny task job claimed and finished --------------------------------------
        with Store(settings) as store, Publisher(settings) as publisher:
            jobs = Jobs(store, publisher)
            job_id = jobs.submit("task", script=str(TASK_SCRIPTS / "record_run.py"),
                                 hyperparameters={"marker_file": str(tmp_path / "marker"), "value": 1})  # fmt: skip
            assert jobs.wait([job_id], timeout=60)[0]["status"] == JobStatus.FINISHED
        worked = scrape_until(ports["worker"], lambda s: total(s, "tensordb_jobs", status="finished") >= 1, "tensordb_jobs")
        assert total(worked, "tensordb_job_claim_seconds_count", outcome="claimed") >= 1
        assert total(worked, "tensordb_job_queue_seconds_count", kind="task", trial="false") >= 1
        assert total(worked, "tensordb_jobs", status="pending") == 0

        # -- the model server: its version, predictions and requests -------------------------------
        assert total(scrape(ports["serve"]), "tensordb_model_version_served", model=MODEL) == promoted
        answer = httpx.post(f"http://127.0.0.1:{ports['serve-http']}/predict", json={"instances": [[[0.0] * 8] * 8] * 3})
        assert answer.status_code == 200, answer.text
        served = scrape(ports["serve"])
        assert total(served, "tensordb_predictions_total", model=MODEL, via="http") == 3
        assert total(served, "tensordb_prediction_seconds_count", model=MODEL, via="http") == 1
        assert total(served, "tensordb_http_requests_total", app="serve", code="200") >= 1

        # -- the dashboard: its requests -----------------------------------------------------------
        before = total(scrape(ports["dashboard"]), "tensordb_http_requests_total", app="dashboard", code="200")
        assert httpx.get(f"http://127.0.0.1:{ports['dashboard-http']}/api/status", timeout=30).status_code == 200
        after = total(scrape(ports["dashboard"]), "tensordb_http_requests_total", app="dashboard", code="200")
        assert after == before + 1


def test_ready_answers_503_when_a_server_is_unreachable(settings: Settings, tmp_path: Path) -> None:
    from tensordb.infra.metrics import MetricsServer, connectivity

    unreachable = settings.with_changes(kafka_bootstrap=f"127.0.0.1:{free_port()}")
    metrics = MetricsServer(unreachable, "127.0.0.1", 0, connectivity(unreachable, timeout=1.0), token=None)
    try:
        assert httpx.get(f"http://127.0.0.1:{metrics.port}/health").status_code == 200
        ready = httpx.get(f"http://127.0.0.1:{metrics.port}/ready", timeout=10)
        assert ready.status_code == 503 and "Kafka" in ready.json()["reason"]
    finally:
        metrics.close()
