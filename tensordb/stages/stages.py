"""The transform stages of a project: registering versions, pausing, backfill requests, counters.

One document per stage in ``stages``: the current version's spec, ``since`` (when that version was
registered: the processors derive from samples imported from then on; older ones on request, by a
backfill), ``paused``, counters for the dashboard, and the state of the last backfill, which the
processors advance in batches under a lease so that a killed processor's backfill resumes where it
stopped (:mod:`streams.stages`).
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

from tensordb.data.samples import SAMPLES
from tensordb.errors import StageError, StageNotFoundError
from tensordb.infra.store import Store
from tensordb.infra.trusted import check_entry_point
from tensordb.models.predictions import PREDICTIONS, answered_samples
from tensordb.stages.spec import StageSpec, parse_stage

STAGES = "stages"


def _now() -> datetime:
    return datetime.now(UTC)


def _fresh_counters() -> dict[str, Any]:
    return {"processed": 0, "derived": 0, "errors": 0, "last_at": None}


class Stages:
    """A project's transform stages (see the module docstring).

    Parameters
    ----------
    store : Store
        The project's database.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.collection = store[STAGES]

    # -- registering ---------------------------------------------------------------------------
    def register(self, spec: Mapping[str, Any] | StageSpec) -> StageSpec:
        """Register a stage, or a new version of one; returns the validated spec.

        Re-registering the same version with the same work changes nothing; a new version (higher
        number) replaces the work from now on and resets the counters. Raises
        :class:`~tensordb.errors.StageSpecError` (malformed), :class:`~tensordb.errors.UntrustedCodeError`
        (a function outside the trusted modules) and :class:`~tensordb.errors.StageError` (a changed
        stage under the same or a lower version; a chain of stages that feeds itself).
        """
        stage = spec if isinstance(spec, StageSpec) else parse_stage(dict(spec))
        check_entry_point(stage.function, self.store.settings)  # the processors check again before importing it
        self._refuse_cycle(stage)
        current = self.collection.find_one({"_id": stage.name})
        now = _now()
        document = {"spec": stage.as_json(), "version": stage.version, "since": now, "counters": _fresh_counters()}
        if current is None:
            try:
                self.collection.insert_one(
                    {"_id": stage.name, "project": self.store.project, "name": stage.name, "paused": False,
                     "registered_at": now, "backfill": None, **document}
                )  # fmt: skip
                return stage
            except DuplicateKeyError:
                current = self.collection.find_one({"_id": stage.name})
                assert current is not None
        registered = parse_stage(current["spec"])
        if stage.version == registered.version and stage.same_work(registered):
            return registered
        if stage.version <= registered.version:
            raise StageError(
                f"stage {stage.name!r} version {registered.version} is registered with other input, function or output: "
                f"register the change as version {registered.version + 1}"
            )
        changed = self.collection.find_one_and_update(
            {"_id": stage.name, "version": registered.version}, {"$set": document}, return_document=ReturnDocument.AFTER
        )
        if changed is None:
            raise StageError(f"stage {stage.name!r} changed while registering version {stage.version}: try again")
        return stage

    def _refuse_cycle(self, stage: StageSpec) -> None:
        """Refuse a stage whose output feeds, through stages that read one dataset each, its own input."""
        feeds: dict[str, set[str]] = {}
        for other in self.collection.find({}, {"spec": 1}):
            if other["_id"] != stage.name:
                source = (other["spec"]["input"].get("filter") or {}).get("dataset")
                if isinstance(source, str):
                    feeds.setdefault(source, set()).add(other["spec"]["output"]["dataset"])
        start = (stage.input.filter or {}).get("dataset")
        if not isinstance(start, str):
            return
        seen, frontier = set(), {stage.output.dataset}
        while frontier:
            if start in frontier:
                raise StageError(
                    f"stage {stage.name!r} would feed itself: its output {stage.output.dataset!r} leads back to its input {start!r} "
                    "through the registered stages; write to another dataset"
                )
            seen |= frontier
            frontier = {target for dataset in frontier for target in feeds.get(dataset, ())} - seen

    # -- reading -------------------------------------------------------------------------------
    def get(self, name: str) -> dict[str, Any]:
        stage = self.collection.find_one({"_id": name})
        if stage is None:
            raise StageNotFoundError(f"no stage {name!r} in project {self.store.project!r}: `tensordb stage list` shows them")
        return stage

    def spec(self, name: str) -> StageSpec:
        return parse_stage(self.get(name)["spec"])

    def list(self) -> builtins.list[dict[str, Any]]:
        """Every stage, by name, with ``lag``: samples of its input imported since its version that it has not processed."""
        stages = list(self.collection.find({}).sort("name", ASCENDING))
        for stage in stages:
            stage["lag"] = self.lag(stage)
        return stages

    def lag(self, stage: Mapping[str, Any]) -> int:
        """Input samples imported since the stage's version was registered, less those processed
        (an estimate: a redelivered batch is counted again, so it reads low, never below 0)."""
        matching = self.store[source_collection(stage)].count_documents(live_query(stage))
        return max(0, matching - int(stage["counters"]["processed"]))

    # -- changing ------------------------------------------------------------------------------
    def pause(self, name: str) -> dict[str, Any]:
        """Stop deriving (the processors stop the stage's consumer; new samples wait for resume)."""
        return self._set(name, paused=True)

    def resume(self, name: str) -> dict[str, Any]:
        """Derive again, starting with the samples imported while paused."""
        return self._set(name, paused=False)

    def delete(self, name: str) -> bool:
        """Forget the stage (the samples it derived stay); True if it existed."""
        return self.collection.delete_one({"_id": name}).deleted_count == 1

    def _set(self, name: str, **fields: Any) -> dict[str, Any]:
        stage = self.collection.find_one_and_update({"_id": name}, {"$set": fields}, return_document=ReturnDocument.AFTER)
        if stage is None:
            raise StageNotFoundError(f"no stage {name!r} in project {self.store.project!r}")
        return stage

    def count(self, name: str, version: int, processed: int, derived: int, errors: int) -> None:
        """Add to the current version's counters (a batch's work; older versions' batches are not counted)."""
        self.collection.update_one(
            {"_id": name, "version": version},
            {"$inc": {"counters.processed": processed, "counters.derived": derived, "counters.errors": errors},
             "$set": {"counters.last_at": _now()}},
        )  # fmt: skip

    # -- backfill --------------------------------------------------------------------------------
    def request_backfill(self, name: str) -> dict[str, Any]:
        """Ask the processors to apply the current version to every stored input sample (those derived
        already are stored once); returns the stage. Asking again while one runs changes nothing."""
        stage = self.get(name)
        backfill = stage.get("backfill")
        if backfill and backfill["version"] == stage["version"] and backfill["status"] != "done":
            return stage
        total = self.store[source_collection(stage)].count_documents(source_query(stage))
        state = {"version": stage["version"], "status": "requested", "after": None, "done": 0, "derived": 0, "errors": 0,
                 "total": total, "requested_at": _now(), "finished_at": None, "holder": None, "lease_until": None}  # fmt: skip
        return self._set(name, backfill=state)

    def claim_backfill(self, holder: str, lease: timedelta) -> dict[str, Any] | None:
        """Take a requested backfill, or one whose holder stopped renewing its lease; None if none."""
        now = _now()
        return self.collection.find_one_and_update(
            {"backfill.status": {"$in": ["requested", "running"]},
             "$or": [{"backfill.lease_until": None}, {"backfill.lease_until": {"$lt": now}}]},
            {"$set": {"backfill.status": "running", "backfill.holder": holder, "backfill.lease_until": now + lease}},
            return_document=ReturnDocument.AFTER,
        )  # fmt: skip

    def advance_backfill(
        self, name: str, holder: str, lease: timedelta, after: str, done: int, derived: int, errors: int
    ) -> bool:
        """Record a finished batch of a backfill this holder holds (and renew its lease); False if
        the backfill is no longer its own (its lease expired and another processor took it)."""
        result = self.collection.update_one(
            {"_id": name, "backfill.holder": holder, "backfill.status": "running"},
            {"$set": {"backfill.after": after, "backfill.lease_until": _now() + lease},
             "$inc": {"backfill.done": done, "backfill.derived": derived, "backfill.errors": errors}},
        )  # fmt: skip
        return result.modified_count == 1

    def finish_backfill(self, name: str, holder: str) -> None:
        self.collection.update_one(
            {"_id": name, "backfill.holder": holder, "backfill.status": "running"},
            {"$set": {"backfill.status": "done", "backfill.finished_at": _now(), "backfill.lease_until": None}},
        )


def source_collection(stage: Mapping[str, Any]) -> str:
    """Where a stage's sources are stored: ``samples``, or ``predictions`` for a stage of a model's answers."""
    return PREDICTIONS if "predictions" in stage["spec"]["input"] else SAMPLES


def source_query(stage: Mapping[str, Any]) -> dict[str, Any]:
    """The stored sources of a stage: samples matching its filter (less what it derived itself), or
    the model's stored answers for stored samples."""
    source = stage["spec"]["input"]
    if "predictions" in source:
        return answered_samples(source["predictions"]["model"])
    return {"$and": [dict(source["filter"]), {"lineage.stage": {"$ne": stage["_id"]}}]}


def live_query(stage: Mapping[str, Any]) -> dict[str, Any]:
    """The sources the processors derive from as they arrive: those stored since the version."""
    arrived = "stored_at" if "predictions" in stage["spec"]["input"] else "imported_at"
    return {"$and": [source_query(stage), {arrived: {"$gte": stage["since"]}}]}
