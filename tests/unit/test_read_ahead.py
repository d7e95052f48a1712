"""The loader's read-ahead thread: same batches in the same order, errors raised to the reader,
and the source closed when the reader stops early."""

from __future__ import annotations

import threading
from collections.abc import Generator

import pytest

from tensordb.data.loader import read_ahead


def numbered(count: int, closed: threading.Event, fail_at: int | None = None) -> Generator[list[dict], None, None]:
    try:
        for number in range(count):
            if number == fail_at:
                raise ValueError(f"cannot read batch {number}")
            yield [{"_id": number}]
    finally:
        closed.set()


def test_yields_every_batch_in_order_and_closes_the_source() -> None:
    closed = threading.Event()
    assert [batch[0]["_id"] for batch in read_ahead(numbered(50, closed), depth=2)] == list(range(50))
    assert closed.wait(5)


def test_an_error_of_the_reading_is_raised_to_the_reader_after_the_batches_before_it() -> None:
    closed = threading.Event()
    seen = []
    with pytest.raises(ValueError, match="cannot read batch 7"):
        for batch in read_ahead(numbered(50, closed, fail_at=7), depth=3):
            seen.append(batch[0]["_id"])
    assert seen == list(range(7))
    assert closed.wait(5)


def test_a_reader_that_stops_early_stops_the_thread_and_closes_the_source() -> None:
    closed = threading.Event()
    batches = read_ahead(numbered(10_000, closed), depth=2)
    assert next(batches)[0]["_id"] == 0
    batches.close()  # the reader is done: the thread must not block on a full queue forever
    assert closed.wait(5)
