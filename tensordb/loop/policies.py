"""Training policies: what to retrain, on which data, when, and when a candidate may replace production.

A policy names a model spec, a training cohort and a validation cohort, a trigger (every N new
matching samples, every T seconds, or manual), an objective (metric and direction) and a promotion
rule (better than production by a margin). Policies live in the ``policies`` collection; the retrain
trigger (streams/retrain.py) and the miner (tensordb/mining.py) act on them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ReturnDocument

from tensordb.data.cohorts import cohort_from_spec
from tensordb.errors import PolicyError, PolicyNotFoundError
from tensordb.infra.store import Store, insert_ignoring_duplicates
from tensordb.infra.trusted import check_model_spec
from tensordb.studies.scheduler import STUDIES

POLICIES = "policies"
#: One marker per (policy, sample) counted, naming the import batch that counted it first.
COUNTED = "policy_counted_samples"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Policy:
    """One continuous-training policy (see the module docstring).

    ``trigger``: ``{"every_samples": N}``, ``{"every_seconds": T}`` or ``{"manual": True}``.
    ``objective``: ``{"metric": "accuracy", "direction": "max"}``.
    ``promotion``: ``{"margin": 0.0}`` — promote when the candidate beats production by more.
    The model registry name of the policy's versions is the policy name.
    ``study``: a study whose best configuration is the training step (its model, hyper-parameters
    and epochs; ``model`` may then be left out): retraining re-runs what the study found best.
    """

    name: str
    training: dict[str, Any]
    validation: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)
    trigger: dict[str, Any] = field(default_factory=lambda: {"every_samples": 1000})
    objective: dict[str, Any] = field(default_factory=lambda: {"metric": "accuracy", "direction": "max"})
    promotion: dict[str, Any] = field(default_factory=lambda: {"margin": 0.0})
    epochs: int = 5
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    max_concurrent_jobs: int = 1
    paused: bool = False
    study: str | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise PolicyError(f"policy names are 1-64 letters, digits, '_', '.' or '-'; got {self.name!r}")
        kinds = [key for key in ("every_samples", "every_seconds", "manual") if key in self.trigger]
        if len(kinds) != 1 or len(self.trigger) != 1:
            raise PolicyError("trigger is one of {'every_samples': N}, {'every_seconds': T} or {'manual': True}")
        if kinds[0] != "manual" and not (isinstance(self.trigger[kinds[0]], int | float) and self.trigger[kinds[0]] > 0):
            raise PolicyError(f"trigger {kinds[0]} must be a positive number, got {self.trigger[kinds[0]]!r}")
        if self.objective.get("direction") not in ("max", "min") or not isinstance(self.objective.get("metric"), str):
            raise PolicyError("objective is {'metric': NAME, 'direction': 'max' | 'min'}")
        if not isinstance(self.promotion.get("margin", 0.0), int | float) or self.promotion.get("margin", 0.0) < 0:
            raise PolicyError("promotion margin must be a number >= 0")
        if self.epochs < 1 or self.max_concurrent_jobs < 1:
            raise PolicyError("epochs and max_concurrent_jobs must be >= 1")
        if self.study is None and not any(key in self.model for key in ("architecture", "entry_point", "name")):
            raise PolicyError(
                "model needs 'architecture' (Keras JSON), 'entry_point' or 'name'; or name a study to train its best configuration"
            )

    def better(self, candidate: float, production: float | None) -> bool:
        """Whether ``candidate`` beats ``production`` by more than the margin in the objective's direction."""
        if production is None:
            return True
        margin = float(self.promotion.get("margin", 0.0))
        if self.objective["direction"] == "max":
            return candidate > production + margin
        return candidate < production - margin


def _document(policy: Policy, store: Store) -> dict[str, Any]:
    return {**asdict(policy), "project": store.project}


class Policies:
    """The project's policies, plus the trigger's counters (new samples since the last job)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.collection = store[POLICIES]

    def register(self, policy: Policy) -> Policy:
        """Create or replace a policy (its counters are kept when it already exists).

        Its model spec must name trusted code only (``TENSORDB_TRUSTED_MODULES``): the retrain trigger
        submits it as jobs, and workers check it again before building."""
        check_model_spec(policy.model, self.store.settings)
        if policy.study is not None and self.store[STUDIES].find_one({"_id": policy.study}, {"_id": 1}) is None:
            raise PolicyError(f"policy {policy.name!r} names study {policy.study!r}, which does not exist: create it first")
        cohort_from_spec(self.store, policy.training)  # refuse a bad query now, not at the first trigger
        cohort_from_spec(self.store, policy.validation)
        now = datetime.now(UTC)
        self.collection.update_one(
            {"_id": policy.name},
            {
                "$set": {**_document(policy, self.store), "updated_at": now},
                "$setOnInsert": {
                    "created_at": now,
                    "new_samples": 0,
                    "samples_counted": 0,
                    "seen_batches": [],
                    "last_triggered_at": None,
                    "triggers": 0,
                },  # fmt: skip
            },
            upsert=True,
        )
        return policy

    def get(self, name: str) -> Policy:
        return self.policy(self.document(name))

    @staticmethod
    def policy(document: Mapping[str, Any]) -> Policy:
        """The :class:`Policy` stored in ``document``."""
        return Policy(**{key: document[key] for key in Policy.__dataclass_fields__ if key in document})

    def document(self, name: str) -> dict[str, Any]:
        document = self.collection.find_one({"_id": name})
        if document is None:
            raise PolicyNotFoundError(f"no policy {name!r} in project {self.store.project!r}; register it first")
        return document

    def list(self, include_paused: bool = True) -> list[dict[str, Any]]:
        query: dict[str, Any] = {"project": self.store.project}
        if not include_paused:
            query["paused"] = False
        return list(self.collection.find(query, {"seen_batches": 0}).sort("name", 1))

    def change(self, name: str, **changes: Any) -> Policy:
        """Change some fields (validated as a whole policy)."""
        updated = Policy(**{**asdict(self.get(name)), **changes})
        return self.register(updated)

    def pause(self, name: str) -> Policy:
        """Stop triggering training for ``name`` (samples keep being counted); returns the policy."""
        return self._set_paused(name, True)

    def resume(self, name: str) -> Policy:
        """Trigger training for ``name`` again; returns the policy."""
        return self._set_paused(name, False)

    def _set_paused(self, name: str, paused: bool) -> Policy:
        """Only the flag changes: pausing is no new registration, so it needs no trust in the policy's code."""
        document = self.collection.find_one_and_update(
            {"_id": name}, {"$set": {"paused": paused, "updated_at": datetime.now(UTC)}}, return_document=ReturnDocument.AFTER
        )
        if document is None:
            raise PolicyNotFoundError(f"no policy {name!r} in project {self.store.project!r}; register it first")
        return self.policy(document)

    def delete(self, name: str) -> bool:
        return self.collection.delete_one({"_id": name}).deleted_count == 1

    # -- the trigger's counters ---------------------------------------------------------------
    def count_new_samples(self, name: str, batch_id: str, sample_ids: Sequence[str]) -> int | None:
        """Count the samples of import batch ``batch_id`` that match the policy, each once ever.

        Exact under redelivery and crashes: a marker per (policy, sample) records which batch
        counted the sample first, and the counter grows by that batch's markers once per batch.
        Returns the new count, or None if this batch was already counted.

        Parameters
        ----------
        name:
            The policy.
        batch_id:
            The ``data-imported`` event's batch id.
        sample_ids:
            The batch's samples that match the policy's training cohort.
        """
        project = self.store.project
        markers = [
            {"_id": f"{name}:{sample_id}", "project": project, "policy": name, "batch_id": batch_id} for sample_id in sample_ids
        ]
        if markers:
            insert_ignoring_duplicates(self.store[COUNTED], markers)  # a sample counted before keeps its batch
        first_counted = self.store[COUNTED].count_documents({"project": project, "policy": name, "batch_id": batch_id})
        document = self.collection.find_one_and_update(
            {"_id": name, "seen_batches": {"$ne": batch_id}},
            {
                "$inc": {"new_samples": first_counted, "samples_counted": first_counted},
                "$push": {"seen_batches": {"$each": [batch_id], "$slice": -1000}},
            },
            projection={"new_samples": 1},
            return_document=ReturnDocument.AFTER,
        )
        return None if document is None else document["new_samples"]

    def take_trigger(self, name: str, threshold: int | None) -> bool:
        """Atomically consume ``threshold`` samples of the counter if it holds that many (None: all).

        The samples past the threshold stay counted towards the next trigger.
        """
        query: dict[str, Any] = {"_id": name}
        consume: dict[str, Any] = {"$set": {"new_samples": 0, "last_triggered_at": datetime.now(UTC)}, "$inc": {"triggers": 1}}
        if threshold is not None:
            query["new_samples"] = {"$gte": threshold}
            consume = {"$set": {"last_triggered_at": datetime.now(UTC)}, "$inc": {"triggers": 1, "new_samples": -threshold}}
        return self.collection.update_one(query, consume).modified_count == 1

    def take_timed_trigger(self, name: str, every_seconds: float) -> bool:
        """Atomically start a time-triggered round if the last one is ``every_seconds`` old."""
        now = datetime.now(UTC)
        due = {"$or": [{"last_triggered_at": None}, {"last_triggered_at": {"$lte": now - timedelta(seconds=every_seconds)}}]}
        update = {"$set": {"new_samples": 0, "last_triggered_at": now}, "$inc": {"triggers": 1}}
        return self.collection.update_one({"_id": name, **due}, update).modified_count == 1

    def absorb(self, name: str) -> None:
        """New samples are covered by a job still pending (it reads its cohort when it starts)."""
        self.collection.update_one({"_id": name}, {"$set": {"new_samples": 0}})
