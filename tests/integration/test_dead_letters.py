"""The dead-letter path against the real broker, mongod and processors: bad records are set aside
with their reason and bytes, and the processor keeps going."""

from __future__ import annotations

import base64
import time

import orjson

from tensordb.config import Settings, Topic
from tensordb.errors import DecodeError
from tensordb.infra.bus import Publisher, Received, make_consumer, receive
from tensordb.infra.dead_letters import COLLECTION, DeadLetters, original_bytes
from tensordb.infra.store import Store
from tensordb.testing import ChildProcess, wait_for

VALID = {
    "schema": "sample/1",
    "dataset": "digits",
    "arrays": {"image": {"dtype": "uint8", "shape": [2], "data": base64.b64encode(b"\x01\x02").decode()}},
}
GARBAGE = b"\xff\xfe\x00 not json at all"
WRONG_VERSION = orjson.dumps({**VALID, "schema": "sample/9"})
MISSING_FIELD = orjson.dumps({k: v for k, v in VALID.items() if k != "dataset"})


def test_bad_records_become_dead_letters_and_a_valid_one_after_them_is_processed(
    settings: Settings, processors: ChildProcess
) -> None:
    topic = settings.topic(Topic.INGEST)
    with Publisher(settings) as publisher:
        for value in (GARBAGE, WRONG_VERSION, MISSING_FIELD, orjson.dumps(VALID)):
            publisher.publish_bytes(topic, value, key=b"one-partition")

    with Store(settings) as store:
        letters = wait_for(
            lambda: (
                list(store[COLLECTION].find({"topic": topic}).sort("offset", 1))
                if store[COLLECTION].count_documents({}) >= 3
                else None
            ),
            what="three dead letters",
        )
        assert [original_bytes(letter) for letter in letters] == [GARBAGE, WRONG_VERSION, MISSING_FIELD]
        assert "not valid UTF-8 JSON" in letters[0]["reason"] and letters[0]["error_type"] == "DecodeError"
        assert "sample/9" in letters[1]["reason"] and letters[1]["error_type"] == "ValidationError"
        assert "'dataset'" in letters[2]["reason"] and "required" in letters[2]["reason"]
        assert [letter["offset"] for letter in letters] == [0, 1, 2]
        assert all(letter["partition"] == letters[0]["partition"] and letter["project"] == settings.project for letter in letters)

        # the valid record after them was processed: the processor moved past it without a dead letter
        progress = wait_for(
            lambda: store["processor_progress"].find_one({"topic": topic, "last_offset": 3}), what="the valid record"
        )
        assert (progress["valid"], progress["invalid"]) == (1, 3)
        assert store[COLLECTION].count_documents({}) == 3

    # the dead-letter topic carries the same three, as valid dead-letter records
    consumer = make_consumer(settings, "dead-letter-reader", [Topic.DEAD_LETTERS])
    try:
        seen: list = []
        deadline = time.monotonic() + 30
        while len(seen) < 3 and time.monotonic() < deadline:
            seen.extend(receive(consumer, "dead-letter/1", timeout=0.5))
    finally:
        consumer.close()
    assert sorted(r.record["offset"] for r in seen) == [0, 1, 2]
    assert all(r.error is None and r.record["topic"] == topic for r in seen)


def test_every_topic_is_guarded_not_only_ingest(settings: Settings, processors: ChildProcess) -> None:
    guarded = [kind for kind in Topic if kind is not Topic.DEAD_LETTERS]
    with Publisher(settings) as publisher:
        for kind in guarded:
            publisher.publish_bytes(settings.topic(kind), b'{"schema": "nonsense/1"}')
    with Store(settings) as store:
        wait_for(lambda: store[COLLECTION].count_documents({}) == len(guarded), what="a dead letter per topic")
        assert {letter["topic"] for letter in store[COLLECTION].find()} == {settings.topic(k) for k in guarded}


def test_a_redelivered_bad_record_is_stored_once(settings: Settings) -> None:
    """At-least-once delivery can hand a processor the same bad record twice: one document."""
    received = Received(settings.topic(Topic.INGEST), 0, 7, None, GARBAGE, None, DecodeError("not JSON"))
    with Store(settings) as store, Publisher(settings) as publisher:
        dead_letters = DeadLetters(store, publisher, processor="test")
        dead_letters.divert(received, received.error)
        dead_letters.divert(received, received.error)
        dead_letters.flush()
        assert store[COLLECTION].count_documents({}) == 1
        assert original_bytes(store[COLLECTION].find_one()) == GARBAGE


def test_a_record_the_handler_cannot_process_is_set_aside_and_the_rest_are_processed(settings: Settings) -> None:
    from streams.processing import ProcessorContext, process_batch

    processed: list[int] = []

    def handler(context: ProcessorContext, batch: list[Received]) -> None:
        if any(received.record["poison"] for received in batch):
            raise KeyError("no such model")
        processed.extend(received.offset for received in batch)

    topic = settings.topic(Topic.INGEST)
    batch = [Received(topic, 0, offset, None, b"{}", {"poison": offset == 2}, None) for offset in range(5)]
    context = ProcessorContext(settings)
    try:
        process_batch(context, batch, handler)
        letters = list(context.store[COLLECTION].find())
    finally:
        context.close()
    assert processed == [0, 1, 3, 4]
    assert [(letter["offset"], letter["error_type"]) for letter in letters] == [(2, "KeyError")]
    assert "no such model" in letters[0]["reason"]
