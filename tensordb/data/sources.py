"""What the loader, member snapshots and framework adapters read: a cohort, seen through a protocol
so that these modules sit below :mod:`tensordb.data.cohorts`, which builds its streams from them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any, Protocol

from tensordb.infra.store import Store


class SampleSource(Protocol):
    """A cohort (:class:`tensordb.data.cohorts.Cohort`): its documents in cohort order, its store,
    the array and label it yields, and its pin in time (read-only: a cohort is frozen)."""

    @property
    def store(self) -> Store: ...
    @property
    def x(self) -> str: ...
    @property
    def y(self) -> str | None: ...
    @property
    def as_of(self) -> datetime | None: ...

    def documents(self, projection: Mapping[str, Any] | None = None, batch_size: int = 1000) -> Iterator[dict]: ...
    def describe(self) -> dict[str, Any]: ...
    def pinned(self, as_of: datetime | None = None) -> SampleSource: ...
    def with_store(self, store: Store) -> SampleSource: ...
