"""The dead-letter path: a record that cannot be parsed, validated or processed is set aside.

It goes to the ``dead_letters`` collection (to inspect and replay: the source of truth, each letter
exactly once) and to the project's dead-letter topic (for subscribers such as dashboards and alerts;
at least once, keyed by the letter's id), with the reason, where it came from and its original bytes.

A letter's id hashes the record's position, broker timestamp and bytes: a redelivered record
gets the same id (stored once), while a different record at a reused position (offsets restart
after a memory broker restarts) gets a new one, and an earlier letter is never overwritten.

Diverting never fails on the letter's own content: an original too large to travel in a
dead-letter record is kept in GridFS and referenced, and an overlong reason is shortened, saying so.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId

from tensordb.config import Topic
from tensordb.errors import describe_error
from tensordb.infra import metrics
from tensordb.infra.bus import Publisher, Received
from tensordb.infra.store import Blob, Store, insert_ignoring_duplicates
from tensordb.records import Schema

COLLECTION = "dead_letters"
#: Longest reason kept whole; longer ones (e.g. quoting a huge value) are cut, saying so.
MAX_REASON_CHARS = 2000
#: Room kept in a dead-letter record for everything but the original bytes (reason, position...).
ENVELOPE_BYTES = 16 * 1024


def letter_id(received: Received) -> str:
    """The id of ``received``'s dead letter: the same for a redelivery, new for any other record."""
    digest = hashlib.sha256(received.value or b"")
    digest.update(f"\0{received.topic}\0{received.partition}\0{received.offset}\0{received.timestamp}".encode())
    return digest.hexdigest()[:32]


def _short(reason: str) -> str:
    if len(reason) <= MAX_REASON_CHARS:
        return reason
    return f"{reason[:MAX_REASON_CHARS]}… ({len(reason) - MAX_REASON_CHARS} more characters cut)"


class DeadLetters:
    """Diverts bad records for one processor; call :meth:`flush` before committing offsets."""

    def __init__(self, store: Store, publisher: Publisher, processor: str) -> None:
        self.store = store
        self.publisher = publisher
        self.processor = processor
        # an original travels inline only if its base64 and the envelope fit one message
        self.inline_limit = max(0, (store.settings.max_message_bytes - ENVELOPE_BYTES) * 3 // 4)

    def divert(self, received: Received, error: BaseException) -> dict[str, Any]:
        """Record ``received`` as a dead letter because of ``error``; returns the dead-letter record."""
        return self.divert_many([(received, error)])[0]

    def divert_many(self, letters: Sequence[tuple[Received, BaseException]]) -> list[dict[str, Any]]:
        """Set many records aside in one write; returns their dead-letter records.

        Parameters
        ----------
        letters:
            (record, why) pairs. Redelivered records are stored once; errors raised here are only
            those of an unreachable MongoDB or Kafka, which callers wait out.
        """
        now = datetime.now(UTC)
        built = [self._record(received, error, now) for received, error in letters]
        for letter, _ in built:
            self.publisher.publish(Topic.DEAD_LETTERS, letter, key=letter["id"])
        documents = [{**letter, "_id": letter["id"], "project": self.store.project, "at": now} for letter, _ in built]
        blobs = [blob for _, blob in built if blob is not None]
        self.store.write_blobs(blobs)  # before the letters that reference them
        insert_ignoring_duplicates(self.store[COLLECTION], documents)
        metrics.count_dead_letters(self.processor, letters)
        return [letter for letter, _ in built]

    def _record(self, received: Received, error: BaseException, now: datetime) -> tuple[dict[str, Any], Blob | None]:
        identifier = letter_id(received)
        original = received.value or b""
        record: dict[str, Any] = {
            "schema": Schema.DEAD_LETTER,
            "id": identifier,
            "reason": _short(describe_error(error)),
            "error_type": type(error).__name__,
            "topic": received.topic,
            "partition": received.partition,
            "offset": received.offset,
            "key_b64": base64.b64encode(received.key[:1024]).decode() if received.key is not None else None,
            "original_size": len(original),
            "processor": self.processor,
            "at": now.isoformat(),
        }
        blob: Blob | None = None
        if len(original) <= self.inline_limit:
            record["original_b64"] = base64.b64encode(original).decode()
        else:  # too large to travel in a record: keep the bytes in GridFS
            blob_id = ObjectId(bytes.fromhex(identifier[:24]))
            record["original_b64"] = None
            record["original_blob_id"] = str(blob_id)
            blob = Blob(blob_id, f"dead-letters/{identifier}", original, {"kind": "dead-letter"})
        return record, blob

    def flush(self, timeout: float = 30.0) -> None:
        self.publisher.flush(timeout)


def original_bytes(document: dict[str, Any], store: Store | None = None) -> bytes:
    """The exact bytes of the record a dead letter set aside (for inspection or replay).

    Parameters
    ----------
    document:
        A document of the ``dead_letters`` collection.
    store:
        Needed only for originals too large to travel inline, which are kept in GridFS.
    """
    if document.get("original_b64") is not None:
        return base64.b64decode(document["original_b64"])
    if store is None:
        raise ValueError(f"dead letter {document['_id']} keeps its original in GridFS: pass the store to read it")
    return store.get_bytes(document["original_blob_id"])
