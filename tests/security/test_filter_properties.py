"""Property tests: no filter or pipeline, however built, reads or deletes another project's documents.

Hypothesis generates operator trees (``$or``/``$and``/``$nor`` over conditions on the project, on
ids, on ordinary fields, with comparison, set, regex and code-running operators) and feeds them to
every entry point that takes a caller's filter; and aggregation pipelines of those filters and of
stages that reshape, group, nest (``$facet``) or read other collections (``$lookup``,
``$unionWith``...) at any depth. Against the real mongod holding two projects' documents, each call
either refuses the filter with a TensorDB error (or a MongoDB refusal of a malformed query), or
returns and changes only the caller's project's documents.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pymongo.database import Database
from pymongo.errors import OperationFailure

from tensordb.config import Settings
from tensordb.data.cohorts import Cohort
from tensordb.data.samples import SAMPLES
from tensordb.errors import TensorDBError
from tensordb.infra.store import Store
from tensordb.jobs.queue import JOBS, Jobs
from tensordb.runs.logger import LOGS
from tensordb.runs.queries import delete_logs, read_logs
from tensordb.testing import raw_database

EXAMPLES = int(os.environ.get("TENSORDB_PROPERTY_EXAMPLES", "150"))
A, B = "alpha", "beta"
FIELDS = ["project", "_id", "status", "name", "dataset", "labels.y", "tags", "metadata.project", "run_id", "step"]
VALUES = st.one_of(
    st.sampled_from([A, B, f"{B}:b-1", "b-1", "a-1", f"{A}:a-1", "pending", "d", "r-b", ""]),
    st.integers(-2, 3),
    st.booleans(),
    st.none(),
)
OPERATORS = [
    "$eq",
    "$ne",
    "$gt",
    "$gte",
    "$lt",
    "$in",
    "$nin",
    "$exists",
    "$regex",
    "$not",
    "$type",
    "$where",
    "$expr",
    "$function",
    "$elemMatch",
    "$size",
]


def _operand(operator: str) -> st.SearchStrategy[Any]:
    if operator in ("$in", "$nin"):
        return st.lists(VALUES, max_size=3)
    if operator == "$not":
        return st.fixed_dictionaries({"$regex": st.sampled_from(["^b", ".*", A])})
    if operator in ("$where", "$regex"):
        return st.sampled_from(["true", "^beta", ".*", "this.project != 'alpha'"])
    if operator == "$expr":
        return st.just({"$ne": ["$project", A]})
    if operator == "$elemMatch":
        return st.fixed_dictionaries({"$ne": VALUES})
    return VALUES


CONDITIONS = st.one_of(
    VALUES,
    st.sampled_from(OPERATORS).flatmap(lambda operator: st.fixed_dictionaries({operator: _operand(operator)})),
)
LEAVES = st.dictionaries(st.sampled_from(FIELDS + ["$where", "$expr"]), CONDITIONS, min_size=1, max_size=3)
FILTERS = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        children,
        st.sampled_from(["$or", "$and", "$nor"]).flatmap(
            lambda operator: st.fixed_dictionaries({operator: st.lists(children, min_size=1, max_size=3)})
        ),
        st.builds(lambda inner, extra: {**extra, "$or": [inner]}, children, LEAVES),
    ),
    max_leaves=6,
)


#: Stages of generated pipelines: those that reshape what they are given, and those that reach other
#: collections or the server (a third of the stages each, the last third ``$facet``).
OTHER_COLLECTIONS = st.sampled_from([JOBS, SAMPLES, LOGS, "blobs.files", "blobs.chunks"])
SHAPERS = st.one_of(
    FILTERS.map(lambda query: {"$match": query}),
    st.just({"$project": {"_id": 1, "name": 1, "project": 1}}),
    st.just({"$group": {"_id": "$project", "names": {"$push": "$name"}}}),
    st.just({"$sort": {"name": 1}}),
    st.just({"$replaceRoot": {"newRoot": {"p": "$project", "n": "$name"}}}),
)
READERS = st.one_of(
    OTHER_COLLECTIONS.map(lambda other: {"$lookup": {"from": other, "pipeline": [], "as": "joined"}}),
    OTHER_COLLECTIONS.map(lambda other: {"$lookup": {"from": other, "localField": "tags", "foreignField": "tags", "as": "j"}}),
    OTHER_COLLECTIONS.map(lambda other: {"$unionWith": {"coll": other}}),
    OTHER_COLLECTIONS.map(
        lambda other: {
            "$graphLookup": {"from": other, "startWith": "$tags", "connectFromField": "tags", "connectToField": "tags", "as": "g"}
        }
    ),
    st.just({"$out": "stolen"}),
    st.just({"$collStats": {"count": {}}}),
)


def _pipelines(depth: int) -> st.SearchStrategy[list[dict[str, Any]]]:
    """Pipelines of shapers, readers and (above depth 0) ``$facet`` stages, in equal parts."""
    kinds = ["shape", "read"] + (["facet"] if depth else [])
    stage = st.sampled_from(kinds).flatmap(
        lambda kind: _facets(depth - 1) if kind == "facet" else {"shape": SHAPERS, "read": READERS}[kind]
    )
    return st.lists(stage, min_size=1, max_size=2)


def _facets(depth: int) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(["x", "y"]), _pipelines(depth), min_size=1, max_size=2).map(lambda f: {"$facet": f})


PIPELINES = _pipelines(2)


def _populate(settings: Settings) -> dict[str, int]:
    """Jobs, samples and logs of both projects, written raw (as any client could); returns B's counts."""
    with raw_database(settings) as db:
        return _insert_both(db)


def _insert_both(db: Database) -> dict[str, int]:
    """The documents of :func:`_populate`, written through ``db``; returns B's counts."""
    for project, prefix in ((A, "a"), (B, "b")):
        for index in range(3):
            local = f"{prefix}-{index}"
            common = {"project": project, "name": local, "status": "pending", "tags": ["t"], "labels": {"y": index}}
            db[JOBS].insert_one({"_id": f"{project}:{local}", **common})
            db[SAMPLES].insert_one({"_id": f"{project}:{local}", "dataset": "d", "imported_at": index, "arrays": {}, **common})
            db[LOGS].insert_one(
                {
                    "_id": f"{project}:{local}",
                    "run_id": f"r-{prefix}",
                    "phase": "train",
                    "step": index,
                    "wall_time": 0.0,
                    "metrics": {},
                    **common,
                }
            )
    return {name: db[name].count_documents({"project": B}) for name in (JOBS, SAMPLES, LOGS)}


def _refused_or_own(call: Any) -> Any:
    try:
        return call()
    except (TensorDBError, OperationFailure):
        return None


def test_no_generated_filter_reaches_another_projects_documents(settings: Settings, raw_db: Database) -> None:
    theirs = _populate(settings)
    store = Store(settings.with_changes(project=A))
    jobs = Jobs(store, publisher=None)  # type: ignore[arg-type]  # listing and deleting publish nothing

    @hypothesis_settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(FILTERS)
    def every_filter(query: dict[str, Any]) -> None:
        for name in (JOBS, SAMPLES, LOGS):
            found = _refused_or_own(lambda name=name: list(store[name].find(query)))
            assert found is None or all(document["project"] == A for document in found), query
            _refused_or_own(lambda name=name: store[name].update_many(query, {"$set": {"touched": True}}))
        ids = _refused_or_own(lambda: Cohort(store, filter=query).ids())
        assert ids is None or all(sample_id.startswith("a-") for sample_id in ids), query
        listed = _refused_or_own(lambda: jobs.list(**query))
        assert listed is None or all(job["project"] == A for job in listed), query
        logs = _refused_or_own(lambda: read_logs(store, **query))
        assert logs is None or set(logs["run_id"]) <= {"r-a"}, query
        _refused_or_own(lambda: jobs.delete(**query))
        _refused_or_own(lambda: delete_logs(store, **query))
        _refused_or_own(lambda: store[SAMPLES].delete_many(query))
        raw = raw_db
        assert {name: raw[name].count_documents({"project": B}) for name in theirs} == theirs, query
        assert raw[JOBS].count_documents({"project": B, "touched": True}) == 0, query

    every_filter()


def test_no_generated_pipeline_reaches_another_projects_documents(settings: Settings, raw_db: Database) -> None:
    _populate(settings)
    store = Store(settings.with_changes(project=A))

    @hypothesis_settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(PIPELINES)
    def every_pipeline(pipeline: list[dict[str, Any]]) -> None:
        for name in (JOBS, SAMPLES, LOGS):
            found = _refused_or_own(lambda name=name: list(store[name].aggregate(pipeline)))
            # B's documents hold its project's name and its ids' prefix; A's never do
            assert found is None or B not in repr(found) and "b-" not in repr(found), pipeline
        assert "stolen" not in raw_db.list_collection_names(), pipeline

    every_pipeline()
