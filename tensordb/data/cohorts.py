"""Cohorts: named, saved MongoDB queries over sample metadata, resolved each time they are read.

"The last 1000 images imported with a tumour label" is a cohort: a filter, a sort and a limit. It
is never copied; reading it again sees the data that has arrived since. Filters are validated:
only query operators are accepted, and server-side JavaScript (``$where``, ``$function``,
``$accumulator``) is refused. Splits are deterministic by a hash of the sample id (``split_key``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from tensordb.data.loader import CohortStream, to_tf_dataset
from tensordb.data.samples import SAMPLES, SPLIT_KEY_RANGE
from tensordb.errors import QueryError
from tensordb.infra.store import Store

if TYPE_CHECKING:
    import tensorflow as tf

    from tensordb.data.pytorch import CohortDataset


COHORTS = "cohorts"
JAVASCRIPT_OPERATORS = {"$where", "$function", "$accumulator"}
QUERY_OPERATORS = {
    "$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin",
    "$and", "$or", "$nor", "$not", "$exists", "$type",
    "$all", "$elemMatch", "$size", "$regex", "$options", "$mod",
}  # fmt: skip
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-]+)*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
DEFAULT_SORT = (("imported_at", -1),)


def validate_filter(query: Any, path: str = "filter") -> dict[str, Any]:
    """Return ``query`` if it is a plain MongoDB query over sample fields, else raise QueryError."""
    if not isinstance(query, Mapping):
        raise QueryError(f"{path} must be a JSON object (a MongoDB query), got {type(query).__name__}")
    for key, value in query.items():
        where = f"{path}.{key}"
        if key in JAVASCRIPT_OPERATORS:
            raise QueryError(f"{where}: server-side JavaScript ({key}) is not allowed in cohorts; use query operators")
        if key.startswith("$"):
            if key not in QUERY_OPERATORS:
                raise QueryError(f"{where}: unknown or unsupported operator {key}; allowed: {', '.join(sorted(QUERY_OPERATORS))}")
        elif not _FIELD.match(key):
            raise QueryError(f"{where}: {key!r} is not a field path (letters, digits, _ and -, dot-separated)")
        _validate_value(value, where)
    return dict(query)


def _validate_value(value: Any, path: str) -> None:
    if isinstance(value, Mapping):
        validate_filter(value, path)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _validate_value(item, f"{path}[{index}]")


@dataclass(frozen=True)
class Split:
    """The samples whose ``split_key`` falls in [low, high) of [0, SPLIT_KEY_RANGE), or outside it."""

    low: int
    high: int
    inside: bool = True

    def contains(self, key: int) -> bool:
        return (self.low <= key < self.high) == self.inside

    def as_query(self) -> dict[str, Any]:
        band = {"split_key": {"$gte": self.low, "$lt": self.high}}
        return band if self.inside else {"$nor": [band]}


@dataclass(frozen=True)
class Cohort:
    """A query over a project's samples; ``x``/``y`` name the array and label the loader yields."""

    store: Store = field(repr=False, compare=False)
    filter: dict[str, Any] = field(default_factory=dict)
    sort: tuple[tuple[str, int], ...] = DEFAULT_SORT
    limit: int | None = None
    x: str = "x"
    y: str | None = "y"
    name: str | None = None
    split: Split | None = None
    as_of: datetime | None = None

    def __post_init__(self) -> None:
        validate_filter(self.filter)
        if self.limit is not None and self.limit < 1:
            raise QueryError(f"limit must be a positive number of samples, got {self.limit}")
        for key, direction in self.sort:
            if direction not in (1, -1) or not _FIELD.match(key):
                raise QueryError(f"sort entries are (field, 1 | -1), got {(key, direction)!r}")
        object.__setattr__(self, "sort", tuple(tuple(entry) for entry in self.sort))

    # -- what the cohort is -------------------------------------------------------------------
    def query(self) -> dict[str, Any]:
        """The MongoDB filter: project, user filter, the pin in time and (without a limit) the split."""
        clauses: list[dict[str, Any]] = [{"project": self.store.project}]
        if self.filter:
            clauses.append(self.filter)
        if self.as_of is not None:
            clauses.append({"imported_at": {"$lte": self.as_of}})
        if self.split is not None and self.limit is None:
            clauses.append(self.split.as_query())
        return clauses[0] if len(clauses) == 1 else {"$and": clauses}

    def mongo_sort(self) -> list[tuple[str, int]]:
        """The sort with ``_id`` as the last tie-break, so the order is total and reproducible."""
        return [*self.sort, ("_id", self.sort[-1][1] if self.sort else 1)]

    def documents(self, projection: Mapping[str, Any] | None = None, batch_size: int = 1000) -> Iterator[dict]:
        """Sample documents in cohort order (whole, small arrays' bytes included, unless ``projection``
        leaves them out); a split of a limited cohort is applied here, after the limit, so its folds
        partition exactly the cohort's members."""
        wanted = dict(projection) if projection is not None else None
        if wanted is not None and self.split is not None:
            wanted["split_key"] = 1
        cursor = self.store[SAMPLES].find(
            self.query(), wanted, sort=self.mongo_sort(), limit=self.limit or 0, batch_size=batch_size
        )
        for document in cursor:
            if self.split is None or self.limit is None or self.split.contains(document["split_key"]):
                yield document

    def ids(self) -> list[str]:
        return [document["_id"] for document in self.documents({"_id": 1})]

    def count(self) -> int:
        if self.split is not None and self.limit is not None:
            return sum(1 for _ in self.documents({"_id": 1}))
        limit = {"limit": self.limit} if self.limit else {}
        return self.store[SAMPLES].count_documents(self.query(), **limit)

    # -- derived cohorts ------------------------------------------------------------------------
    def pinned(self, as_of: datetime | None = None) -> Cohort:
        """This cohort frozen at ``as_of`` (now by default): later imports are not members, so a
        restarted job reads the same samples in the same order."""
        return replace(self, as_of=as_of or datetime.now(UTC))

    def with_store(self, store: Store) -> Cohort:
        """This cohort read through another connection (a data loader worker's own client)."""
        return replace(self, store=store)

    def train_validation(self, validation_fraction: float = 0.2) -> tuple[Cohort, Cohort]:
        """Disjoint (train, validation) cohorts by hash of the sample id; stable as data arrives."""
        if not 0 < validation_fraction < 1:
            raise QueryError(f"validation_fraction must be between 0 and 1, got {validation_fraction}")
        cut = round(SPLIT_KEY_RANGE * validation_fraction)
        return replace(self, split=Split(0, cut, inside=False)), replace(self, split=Split(0, cut))

    def folds(self, k: int = 5) -> list[tuple[Cohort, Cohort]]:
        """k (train, validation) pairs for k-fold cross-validation; the validation folds partition
        the cohort."""
        if k < 2:
            raise QueryError(f"k-fold needs k >= 2, got {k}")
        bounds = [round(SPLIT_KEY_RANGE * i / k) for i in range(k + 1)]
        return [
            (replace(self, split=Split(low, high, inside=False)), replace(self, split=Split(low, high)))
            for low, high in zip(bounds, bounds[1:], strict=False)
        ]

    # -- reading the data -------------------------------------------------------------------------
    def stream(self, batch_size: int = 32, **options: Any) -> CohortStream:
        """Batches ``(x, y)`` of NumPy arrays, read lazily; see :class:`tensordb.data.loader.CohortStream`."""
        return CohortStream(self, batch_size, **options)

    def to_tf_dataset(self, batch_size: int = 32, **options: Any) -> tf.data.Dataset:
        """A ``tf.data.Dataset`` of ``(x, y)`` batches that ``model.fit`` consumes directly."""
        return to_tf_dataset(self, batch_size, **options)

    def to_torch_dataset(self, batch_size: int = 32, **options: Any) -> CohortDataset:
        """A PyTorch ``IterableDataset`` of ``(x, y)`` tensor batches (``DataLoader(..., batch_size=None)``);
        see :class:`tensordb.data.pytorch.CohortDataset`. Needs ``pip install 'tensordb[torch]'``."""
        from tensordb.data.pytorch import CohortDataset

        return CohortDataset(self, batch_size, **options)

    # -- saving -------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What defines the members, as JSON-friendly data (recorded as a model's lineage)."""
        return {
            "name": self.name,
            **self.spec(),
            "as_of": self.as_of.isoformat() if self.as_of else None,
            "split": [self.split.low, self.split.high, self.split.inside] if self.split else None,
        }

    def spec(self) -> dict[str, Any]:
        """What is saved: the query as JSON text (MongoDB 4.0 cannot store ``$`` keys), sort, limit."""
        return {
            "filter_json": orjson.dumps(self.filter).decode(),
            "sort": [list(entry) for entry in self.sort],
            "limit": self.limit,
            "x": self.x,
            "y": self.y,
        }


def save_cohort(cohort: Cohort, name: str, description: str = "") -> Cohort:
    """Save (or replace) ``cohort`` under ``name``; the query is stored, never the samples."""
    if not _NAME.match(name):
        raise QueryError(f"cohort names are 1-128 letters, digits, '_', '.' or '-'; got {name!r}")
    now = datetime.now(UTC)
    store = cohort.store
    store[COHORTS].update_one(
        {"_id": name},
        {
            "$set": {"project": store.project, "name": name, "description": description, "updated_at": now, **cohort.spec()},
            "$setOnInsert": {"created_at": now},
        },
        upsert=True,
    )
    return replace(cohort, name=name)


def load_cohort(store: Store, name: str) -> Cohort:
    """The saved cohort ``name``, resolved fresh on every read."""
    document = store[COHORTS].find_one({"_id": name})
    if document is None:
        raise QueryError(f"no cohort named {name!r} in project {store.project!r}; save it first with save_cohort")
    return Cohort(
        store,
        filter=orjson.loads(document["filter_json"]),
        sort=tuple(tuple(entry) for entry in document["sort"]),
        limit=document["limit"],
        x=document["x"],
        y=document["y"],
        name=name,
    )


def cohort_from_spec(store: Store, spec: Mapping[str, Any]) -> Cohort:
    """A cohort from a job's ``data`` spec: ``{"cohort": name}`` (a saved cohort) or an inline
    query ``{"filter": {...}, "sort": [[field, -1]], "limit": N, "x": "image", "y": "label"}``."""
    if "cohort" in spec:
        return load_cohort(store, spec["cohort"])
    if "filter" not in spec:
        raise QueryError("a data spec names a saved cohort ({'cohort': NAME}) or gives a query ({'filter': {...}})")
    options = {key: spec[key] for key in ("limit", "x", "y") if key in spec}
    if "sort" in spec:
        options["sort"] = tuple(tuple(entry) for entry in spec["sort"])
    return Cohort(store, filter=dict(spec["filter"]), **options)


def list_cohorts(store: Store) -> list[dict[str, Any]]:
    return list(store[COHORTS].find({"project": store.project}, {"_id": 0}).sort("name", 1))


def delete_cohort(store: Store, name: str) -> bool:
    return store[COHORTS].delete_one({"_id": name}).deleted_count == 1
