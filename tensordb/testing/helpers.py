"""Free ports and polling, for tests and benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from pymongo import MongoClient
from pymongo.database import Database

from tensordb.config import Settings
from tensordb.services import process

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now on ``host`` (the kernel picks it)."""
    return process.free_port(host)


def wait_for(probe: Callable[[], T], timeout: float = 30.0, interval: float = 0.1, what: str = "condition") -> T:
    """Poll ``probe`` until it returns something truthy; fail the test with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@contextmanager
def raw_database(settings: Settings) -> Iterator[Database]:
    """The settings' database through a plain pymongo client, as any client holding its credentials
    sees it (a :class:`~tensordb.infra.store.Store` keeps its own to itself): for tests that corrupt,
    plant or count what the store guards (blob chunks), and benchmarks that ask the server about itself.

    Parameters
    ----------
    settings:
        Where the database is (``mongo_uri``, ``mongo_database``).
    """
    client: MongoClient = MongoClient(settings.mongo_uri, tz_aware=True)
    with client:
        yield client[settings.mongo_database]
