"""The dead-letter path: a record that cannot be parsed, validated or processed is set aside.

It goes to the project's dead-letter topic (for subscribers such as dashboards and alerts) and to
the ``dead_letters`` collection (to inspect and replay), with the reason, where it came from and its
original bytes. Its id is its topic/partition/offset, so diverting a redelivered record again
overwrites the same document instead of adding a second one.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

from tensordb.bus import Publisher, Received
from tensordb.config import Topic
from tensordb.store import Store

COLLECTION = "dead_letters"


class DeadLetters:
    """Diverts bad records for one processor; call :meth:`flush` before committing offsets."""

    def __init__(self, store: Store, publisher: Publisher, processor: str) -> None:
        self.store = store
        self.publisher = publisher
        self.processor = processor

    def divert(self, received: Received, error: BaseException) -> dict[str, Any]:
        """Record ``received`` as a dead letter because of ``error``; returns the dead-letter record."""
        now = datetime.now(UTC)
        record = {
            "schema": "dead-letter/1",
            "reason": str(error),
            "error_type": type(error).__name__,
            "topic": received.topic,
            "partition": received.partition,
            "offset": received.offset,
            "key_b64": base64.b64encode(received.key).decode() if received.key is not None else None,
            "original_b64": base64.b64encode(received.value or b"").decode(),
            "processor": self.processor,
            "at": now.isoformat(),
        }
        letter_id = f"{received.topic}:{received.partition}:{received.offset}"
        self.publisher.publish(Topic.DEAD_LETTERS, record, key=letter_id)
        document = {**record, "_id": letter_id, "project": self.store.project, "at": now}
        self.store[COLLECTION].replace_one({"_id": letter_id}, document, upsert=True)
        return record

    def flush(self, timeout: float = 30.0) -> None:
        self.publisher.flush(timeout)


def original_bytes(document: dict[str, Any]) -> bytes:
    """The exact bytes of the record a dead letter set aside (for inspection or replay)."""
    return base64.b64decode(document["original_b64"])
