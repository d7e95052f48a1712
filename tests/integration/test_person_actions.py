"""A person's operations against the real broker and mongod: retrying a job (same id, fresh
attempts, a new job request for the workers), promoting a version and rolling production back
(recorded in ``decisions`` with ``by: "person"``, announced as model events)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest

from tensordb.config import Settings, Topic
from tensordb.errors import JobError, JobNotFoundError, ModelNotFoundError, PromotionError
from tensordb.infra.bus import Publisher, make_consumer, receive
from tensordb.jobs.queue import Jobs, JobStatus
from tensordb.loop.promotion import DECISIONS, promote_by_person, roll_back
from tensordb.models.registry import ModelRegistry
from tensordb.records import Schema


def records_on(settings: Settings, topic: Topic, schema: str, wanted: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """The first ``wanted`` records of a topic (read from its start by a group of its own)."""
    consumer = make_consumer(settings, f"test-{time.monotonic_ns()}", [topic])
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(found) < wanted and time.monotonic() < deadline:
            found += [received.record for received in receive(consumer, schema, timeout=0.5) if received.record]
    finally:
        consumer.close()
    return found


def test_a_failed_or_cancelled_job_is_retried_under_its_id_and_announced(settings, store) -> None:
    with Publisher(settings) as publisher:
        jobs = Jobs(store, publisher)
        job_id = jobs.submit("train", name="retried", model={"entry_point": "tests.m:f"}, data={"filter": {}}, max_attempts=1)
        with pytest.raises(JobError, match="is pending: only failed or cancelled jobs can be retried .cancel it first."):
            jobs.retry(job_id)
        claimed = jobs.claim("worker-a", 30)
        assert claimed is not None and claimed["_id"] == job_id
        with pytest.raises(JobError, match="is running"):
            jobs.retry(job_id)
        jobs.record_checkpoint(job_id, "worker-a", epoch=2, model_version=3)
        assert jobs.fail(job_id, "worker-a", RuntimeError("out of memory")) == JobStatus.FAILED
        retried = jobs.retry(job_id, by="ops")
        assert (retried["status"], retried["attempts"], retried["max_attempts"]) == ("pending", 0, 1)
        assert retried["retries"] == 1 and retried["retried_by"] == "ops" and retried["error"] is None
        assert retried["checkpoint"]["epoch"] == 2  # a train job resumes after its last saved epoch
        assert [failure["message"] for failure in retried["history"]] == ["RuntimeError: out of memory"]
        again = jobs.claim("worker-b", 30)  # a worker can take it again
        assert again is not None and again["_id"] == job_id and again["attempts"] == 1
        assert jobs.finish(job_id, "worker-b")
        with pytest.raises(JobError, match="is finished: .* .submit a new job to run it again."):
            jobs.retry(job_id)

        cancelled = jobs.submit("train", name="cancelled", model={"entry_point": "tests.m:f"}, data={"filter": {}})
        jobs.cancel(cancelled)
        assert jobs.retry(cancelled)["status"] == "pending" and not jobs.get(cancelled)["cancel_requested"]
        with pytest.raises(JobNotFoundError, match="no job 'nope'"):
            jobs.retry("nope")
    requests = [r for r in records_on(settings, Topic.JOB_REQUESTS, Schema.JOB_REQUEST, 4) if r["job_id"] == job_id]
    assert len(requests) == 2  # submitted, then retried: the workers hear of it
    events = records_on(settings, Topic.JOB_EVENTS, Schema.JOB_EVENT, 10)
    assert any(e["job_id"] == job_id and e["event"] == "retrying" and e["detail"] == {"reason": "retried by ops"} for e in events)


def test_a_person_promotes_and_rolls_back_production_and_each_is_a_decision(settings, store) -> None:
    now = datetime.now(UTC)
    for version in (1, 2, 3):
        store["models"].insert_one({"project": store.project, "name": "m", "version": version, "time": now, "parameters": {}})
    with Publisher(settings) as publisher:
        registry = ModelRegistry(store, publisher)
        with pytest.raises(PromotionError, match="no production version"):
            roll_back(store, registry, "m")
        registry.promote("m", 1, reason={"decision": "eval-1", "reason": "the miner's"}, policy="m")
        with pytest.raises(PromotionError, match="replaced no earlier version"):
            roll_back(store, registry, "m")
        first = promote_by_person(store, registry, "m", 2, "  ", who="ana")
        second = promote_by_person(store, registry, "m", 3, "fixes the night shift")
        with pytest.raises(PromotionError, match="v3 of 'm' is production already"):
            promote_by_person(store, registry, "m", 3)
        with pytest.raises(ModelNotFoundError, match="no version 9"):
            promote_by_person(store, registry, "m", 9)
        back = roll_back(store, registry, "m", "v3 is worse", who="ana")
        further = roll_back(store, registry, "m")
        with pytest.raises(PromotionError):
            roll_back(store, registry, "m")  # v1 replaced nothing
    assert registry.alias("m") == 1
    assert [(d["action"], d["previous_version"], d["version"]) for d in (first, second, back, further)] == [
        ("promote", 1, 2), ("promote", 2, 3), ("roll back", 3, 2), ("roll back", 2, 1),
    ]  # fmt: skip
    assert first["given_reason"] is None and "no reason given" in first["reason"] and first["who"] == "ana"
    assert back["reason"] == "roll back: v3 → v2 by ana: v3 is worse"
    stored = list(store[DECISIONS].find({"policy": "m"}).sort("at", 1))
    assert [d["_id"] for d in stored] == [d["_id"] for d in (first, second, back, further)] and {d["by"] for d in stored} == {
        "person"
    }
    history = registry.alias_info("m")["history"]
    assert [entry["reason"].get("decision") for entry in history] == ["eval-1", *(d["_id"] for d in stored)]
    events = [e for e in records_on(settings, Topic.MODEL_EVENTS, Schema.MODEL_EVENT, 5) if e["event"] == "promoted"]
    assert [e["version"] for e in events] == [1, 2, 3, 2, 1]  # the model server follows each


def test_pausing_a_policy_needs_no_trust_in_its_code(settings, store) -> None:
    """A dashboard that does not trust a policy's builder may still pause and resume it: only the flag changes."""
    from tensordb.errors import PolicyNotFoundError
    from tensordb.infra.store import Store
    from tensordb.loop.policies import Policies, Policy

    Policies(store).register(
        Policy(name="p", model={"entry_point": "tests.m:f"}, training={"filter": {}}, validation={"filter": {}}, epochs=3)
    )
    with Store(settings.with_changes(trusted_modules=())) as untrusting:
        policies = Policies(untrusting)
        assert policies.pause("p").paused and policies.get("p").epochs == 3
        assert not policies.resume("p").paused
        with pytest.raises(PolicyNotFoundError, match="no policy 'nope'"):
            policies.pause("nope")
