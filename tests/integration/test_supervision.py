"""Every Kafka loop under the processors' contract, against the real broker and mongod with real
kills and restarts: the streaming predictor and the worker wait out a mongod outage longer than the
driver's timeout and a restart of the local broker (which forgets producer ids), without being
restarted themselves."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tensordb.config import Settings, Topic
from tensordb.infra.bus import Publisher, create_topics
from tensordb.infra.store import Store
from tensordb.jobs.queue import Jobs, JobStatus
from tensordb.services.mongod import Mongod
from tensordb.services.tansu import Tansu
from tensordb.testing import ChildProcess, predictor_process, worker_process
from tensordb.testing.servers import kill_broker
from tests import TASK_SCRIPTS
from tests.integration import test_faults
from tests.integration.test_faults import _kill
from tests.integration.test_predictor import MODEL, Answers, instances, request, save_version

own_mongod = test_faults.own_mongod  # a mongod of the test's own, to kill and restart
own_broker = test_faults.own_broker  # a Tansu of the test's own, likewise

#: Past pymongo's 30 s server selection timeout: a loop that does not wait out outages fails in it.
OUTAGE_SECONDS = 35


def _alive(process: ChildProcess) -> bool:
    return process.process is not None and process.process.poll() is None


def _restart(tansu: Tansu, settings: Settings) -> None:
    """SIGKILL the broker and start it again: its memory engine forgets topics, groups and producer ids."""
    kill_broker(tansu)
    tansu.start()
    create_topics(settings)


def _send(settings: Settings, ids: list[str], rng: np.random.Generator) -> set[str]:
    with Publisher(settings) as publisher:
        for request_id in ids:
            publisher.publish(Topic.PREDICT_REQUESTS, request(request_id, instances=instances(rng)), key=request_id)
    return set(ids)


def test_the_predictor_waits_out_a_mongod_outage_and_answers_every_request(
    own_mongod: tuple[Mongod, Settings], tmp_path: Path
) -> None:
    mongod, settings = own_mongod
    save_version(settings, 1)
    rng = np.random.default_rng(0)
    answers = Answers(settings)
    try:
        with predictor_process(settings, tmp_path / "predictor.log", MODEL) as predictor:
            answers.wait_for(_send(settings, [f"before-{i}" for i in range(5)], rng), timeout=60)
            _kill(mongod)
            during = _send(settings, [f"during-{i}" for i in range(5)], rng)  # answered, not stored: waits
            time.sleep(OUTAGE_SECONDS)
            assert _alive(predictor), predictor.log()[-3000:]
            mongod.start()
            answered = answers.wait_for(during | _send(settings, [f"after-{i}" for i in range(5)], rng), timeout=90)
            assert _alive(predictor)
    finally:
        answers.close()
    assert all("outputs" in answered[request_id][0] for request_id in during)


def test_the_predictor_answers_requests_after_the_broker_restarts(own_broker: tuple[Tansu, Settings], tmp_path: Path) -> None:
    tansu, settings = own_broker
    save_version(settings, 1)
    rng = np.random.default_rng(0)
    with predictor_process(settings, tmp_path / "predictor.log", MODEL) as predictor:
        answers = Answers(settings)
        try:
            answers.wait_for(_send(settings, [f"before-{i}" for i in range(5)], rng), timeout=60)
        finally:
            answers.close()
        _restart(tansu, settings)
        answers = Answers(settings)
        try:
            answered = answers.wait_for(_send(settings, [f"after-{i}" for i in range(5)], rng), timeout=120)
        finally:
            answers.close()
        assert _alive(predictor)
    assert all("outputs" in records[0] for records in answered.values())


def _run_jobs(jobs: Jobs, marker: Path, values: range, timeout: float) -> list[dict]:
    ids = [
        jobs.submit("task", name="count", script=str(TASK_SCRIPTS / "record_run.py"),
                    hyperparameters={"marker_file": str(marker), "value": value}, save_keys=["doubled"])
        for value in values
    ]  # fmt: skip
    return [dict(job) for job in jobs.wait(ids, timeout=timeout)]


def test_a_running_worker_completes_jobs_after_the_broker_restarts(own_broker: tuple[Tansu, Settings], tmp_path: Path) -> None:
    tansu, settings = own_broker
    with worker_process(settings, tmp_path / "worker.log") as worker, Store(settings) as store:
        with Publisher(settings) as publisher:
            # jobs enough that the worker's producer has published on every partition (its sequence
            # numbers there are past 0, which the restarted broker does not accept from a producer it forgot)
            done = _run_jobs(Jobs(store, publisher), tmp_path / "runs", range(12), timeout=120)
            assert [job["status"] for job in done] == [JobStatus.FINISHED] * 12
        _restart(tansu, settings)
        started = time.monotonic()
        with Publisher(settings) as publisher:  # a new client: this test's own producer id was forgotten too
            job = _run_jobs(Jobs(store, publisher), tmp_path / "runs", range(12, 13), timeout=180)[0]
        assert job["status"] == JobStatus.FINISHED and job["result"]["doubled"] == 24, (job, worker.log()[-3000:])
        assert _alive(worker)
        print(f"the job after the broker's restart finished in {time.monotonic() - started:.0f} s, attempts {job['attempts']}")


def test_the_worker_waits_out_a_mongod_outage_and_claims_the_next_job(
    own_mongod: tuple[Mongod, Settings], tmp_path: Path
) -> None:
    mongod, settings = own_mongod
    with worker_process(settings, tmp_path / "worker.log") as worker:
        with Store(settings) as store, Publisher(settings) as publisher:
            assert _run_jobs(Jobs(store, publisher), tmp_path / "runs", range(1), timeout=60)[0]["status"] == JobStatus.FINISHED
        _kill(mongod)
        time.sleep(OUTAGE_SECONDS)
        assert _alive(worker), worker.log()[-3000:]
        mongod.start()
        with Store(settings) as store, Publisher(settings) as publisher:
            job = _run_jobs(Jobs(store, publisher), tmp_path / "runs", range(2, 3), timeout=90)[0]
        assert job["status"] == JobStatus.FINISHED and job["result"]["doubled"] == 4
        assert _alive(worker)


def test_the_dashboards_live_feed_is_restarted_after_a_broker_outage(own_broker: tuple[Tansu, Settings]) -> None:
    """The feed's periodic metadata request fails while the broker is down (it stopped the feed for
    good before); the restarted consumer follows the restarted broker's new records."""
    from dashboard.live import LiveHub
    from tensordb.testing import wait_for

    tansu, settings = own_broker

    def publish(run_id: str, steps: int) -> None:
        with Publisher(settings) as publisher:
            for step in range(steps):
                record = {"schema": "log/1", "run_id": run_id, "phase": "train", "step": step, "wall_time": 1.0,
                          "metrics": {"loss": 1.0 / (step + 1)}}  # fmt: skip
                publisher.publish(Topic.LOGS, record, key=run_id)

    hub = LiveHub(settings)
    hub.start()
    try:
        publish("before", 10)
        wait_for(lambda: hub.consumed == 10, what="the points before the outage")
        kill_broker(tansu)
        time.sleep(45)  # past the feed's 30 s metadata check and its 10 s timeout
        tansu.start()
        create_topics(settings)
        publish("after", 10)
        wait_for(lambda: len(hub.buffered("after")) == 10, timeout=60, what="the points after the restart")
        assert hub.status()["state"] == "ok"
    finally:
        hub.stop()


def test_the_model_servers_promotion_follower_is_restarted_when_it_dies_and_says_so(settings, monkeypatch) -> None:
    """The follower's consumer fails (injected, in process: a real one fails this way only on rare
    client errors); the thread is restarted, its state is the loop's, and promotions are followed again."""
    import threading

    from confluent_kafka import KafkaError, KafkaException
    from starlette.testclient import TestClient

    from tensordb.infra import metrics
    from tensordb.models.registry import ModelRegistry
    from tensordb.testing import wait_for
    from workers import serve

    first, second = save_version(settings, 1), save_version(settings, 2, promote=False)
    failing = threading.Event()
    failing.set()
    real_receive = serve.receive

    def receive_or_fail(*args, **kwargs):  # type: ignore[no-untyped-def]
        if failing.is_set():
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "injected consumer failure"))
        return real_receive(*args, **kwargs)

    monkeypatch.setattr(serve, "receive", receive_or_fail)
    stop = threading.Event()
    with Store(settings) as store, Publisher(settings) as publisher, ModelRegistry(store, publisher) as registry:
        holder = serve.ModelHolder(registry, MODEL)
        holder.refresh()
        assert holder.current is not None and holder.current.version == first
        thread = serve.start_follower(settings, holder, stop)
        http = TestClient(serve.create_app(holder, settings), base_url="http://127.0.0.1")
        try:
            assert holder.following is not None
            wait_for(lambda: "died (KafkaException" in holder.following.status, what="the follower's death, said")
            assert f"follower-{MODEL}" in (metrics.loop_problems() or "")
            health = http.get("/health").json()
            assert health["status"] == "degraded" and "injected consumer failure" in health["following"], health
            failing.clear()
            registry.promote(MODEL, second)
            wait_for(lambda: holder.current.version == second, timeout=30, what="the promotion, followed again")
            wait_for(lambda: holder.following.status == "ok", what="the follower's recovery, said")
            assert http.get("/health").json() == {"status": "ok", "model": MODEL, "version": second, "following": "ok"}
            assert metrics.loop_problems() is None or f"follower-{MODEL}" not in metrics.loop_problems()
        finally:
            stop.set()
            thread.join(10)
