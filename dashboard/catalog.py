"""The dashboard's pages beyond curves: models (versions, evaluations, aliases, decisions), data
(datasets, cohorts, samples, transform stages, processor progress and rates) and dead letters; small, index-backed
reads returned as JSON-ready dictionaries."""

from __future__ import annotations

import base64
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, DESCENDING
from pymongo.errors import ExecutionTimeout

from tensordb.data.cohorts import COHORTS, load_cohort
from tensordb.data.datasets import COLLECTION as DATASETS
from tensordb.data.samples import SAMPLES
from tensordb.infra.dead_letters import COLLECTION as DEAD_LETTERS
from tensordb.infra.store import PROGRESS, Store
from tensordb.loop.policies import POLICIES
from tensordb.loop.promotion import DECISIONS, EVALUATIONS
from tensordb.models.registry import ALIASES
from tensordb.models.registry import COLLECTION as MODELS
from tensordb.stages.stages import Stages

# -- models ---------------------------------------------------------------------------------------------

_VERSION_FIELDS = {
    "architecture_json": 0,
    "compile_json": 0,
    "build_config": 0,
    "builder_kwargs": 0,
    "parameters.blob": 0,
    "project": 0,
}


def models(store: Store, versions_per_model: int = 200) -> list[dict[str, Any]]:
    """Per model name (a policy's versions carry its name): versions with their training and
    evaluation metrics, aliases (which version is production) with their history, the policy and
    the decision history of the miner."""
    project = store.project
    names = set(store[MODELS].distinct("name", {"project": project}))
    policies = {
        doc["name"]: doc for doc in store[POLICIES].find({"project": project}, {"seen_batches": 0, "_id": 0, "project": 0})
    }
    names |= set(policies)
    result = []
    for name in sorted(names):
        versions = list(
            store[MODELS].find(
                {"project": project, "name": name}, _VERSION_FIELDS, sort=[("version", DESCENDING)], limit=versions_per_model
            )
        )
        evaluations: dict[int | None, list[dict[str, Any]]] = {}
        for evaluation in store[EVALUATIONS].find(
            {"project": project, "model": name}, {"_id": 0, "project": 0, "cohort": 0}, sort=[("at", ASCENDING)]
        ):
            evaluations.setdefault(evaluation.get("version"), []).append(evaluation)
        aliases = {}
        for alias in store[ALIASES].find({"project": project, "name": name}, {"_id": 0, "project": 0}):
            alias["history"] = list(reversed(alias.get("history", [])))[:50]
            aliases[alias["alias"]] = alias
        production = (aliases.get("production") or {}).get("version")
        rows = []
        for version in versions:
            rows.append({
                "version": version.get("version"), "time": version.get("time"), "epoch": version.get("epoch"),
                "job_id": version.get("job_id"), "metrics": version.get("metrics") or {}, "tags": version.get("tags") or {},
                "evaluations": evaluations.get(version.get("version"), []),
                "aliases": sorted(a for a, doc in aliases.items() if doc.get("version") == version.get("version")),
                "production": version.get("version") == production, "nbytes": (version.get("parameters") or {}).get("nbytes"),
            })  # fmt: skip
        decisions = list(
            store[DECISIONS].find({"project": project, "policy": name}, {"project": 0}, sort=[("at", DESCENDING)], limit=200)
        )
        result.append({
            "name": name, "production": production, "aliases": aliases, "versions": rows,
            "version_count": store[MODELS].count_documents({"project": project, "name": name}),
            "policy": policies.get(name), "decisions": decisions,
        })  # fmt: skip
    return result


# -- data -------------------------------------------------------------------------------------------------


class ProgressRates:
    """Records per second per topic partition of ``processor_progress``, from the change between
    two reads (the processors update the counters with every batch)."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}
        self._rates: dict[str, float] = {}
        self._lock = threading.Lock()

    def rows(self, store: Store) -> list[dict[str, Any]]:
        prefix = store.settings.acl_prefix()
        rows = list(store[PROGRESS].find({"project": store.project}, sort=[("topic", ASCENDING), ("partition", ASCENDING)]))
        now = time.monotonic()
        with self._lock:
            for row in rows:
                key, total = row["_id"], int(row.get("valid", 0)) + int(row.get("invalid", 0))
                previous = self._last.get(key)
                if previous is not None and now - previous[0] >= 0.5:
                    self._rates[key] = max(total - previous[1], 0) / (now - previous[0])
                    self._last[key] = (now, total)
                elif previous is None:
                    self._last[key] = (now, total)
                row["rate"] = self._rates.get(key)
                row["kind"] = row["topic"][len(prefix) :] if row["topic"].startswith(prefix) else row["topic"]
                row["id"] = row.pop("_id")
        return rows


def data(
    store: Store, rates: ProgressRates, window: timedelta = timedelta(hours=1), bucket: timedelta = timedelta(minutes=1)
) -> dict[str, Any]:
    """Datasets and cohorts with their sizes, how fast samples arrive, and the processors' progress."""
    project = store.project
    now = datetime.now(UTC)
    samples = store[SAMPLES]
    datasets = []
    for name in sorted(samples.distinct("dataset", {"project": project})):
        query = {"project": project, "dataset": name}
        newest = samples.find_one(query, {"imported_at": 1}, sort=[("imported_at", DESCENDING)])
        oldest = samples.find_one(query, {"imported_at": 1}, sort=[("imported_at", ASCENDING)])
        recent = samples.count_documents({**query, "imported_at": {"$gte": now - timedelta(minutes=1)}})
        datasets.append({
            "name": name, "samples": samples.count_documents(query), "per_second_last_minute": recent / 60.0,
            "first_imported_at": (oldest or {}).get("imported_at"), "last_imported_at": (newest or {}).get("imported_at"),
        })  # fmt: skip
    saved = []
    for document in store[DATASETS].find(
        {"project": project}, {"project": 0}, sort=[("name", ASCENDING), ("time", DESCENDING)], limit=500
    ):
        arrays = document.pop("arrays", [])
        document["arrays"] = [{key: entry.get(key) for key in ("key", "dtype", "shape", "nbytes")} for entry in arrays]
        document["nbytes"] = sum(entry.get("nbytes") or 0 for entry in arrays)
        document["id"] = str(document.pop("_id"))
        saved.append(document)
    cohorts = []
    for document in store[COHORTS].find({"project": project}, {"_id": 0, "project": 0}, sort=[("name", ASCENDING)]):
        try:
            cohort = load_cohort(store, document["name"])
            document["samples"] = store[SAMPLES].count_documents(
                cohort.query(), maxTimeMS=2000, **({"limit": cohort.limit} if cohort.limit else {})
            )
        except ExecutionTimeout:
            document["samples"] = None
        except Exception as exc:  # noqa: BLE001 - a cohort that no longer resolves is shown with the reason
            document["samples"], document["error"] = None, str(exc)
        cohorts.append(document)
    start = now - window
    step_ms = int(bucket.total_seconds() * 1000)
    histogram = {
        row["_id"]: row["n"]
        for row in samples.aggregate([
            {"$match": {"project": project, "imported_at": {"$gte": start}}},
            {"$group": {"_id": {"$subtract": [{"$toLong": "$imported_at"}, {"$mod": [{"$toLong": "$imported_at"}, step_ms]}]}, "n": {"$sum": 1}}},
        ])
    }  # fmt: skip
    first_bucket = int(start.timestamp() * 1000) // step_ms * step_ms
    times = list(range(first_bucket, int(now.timestamp() * 1000) + 1, step_ms))
    return {
        "datasets": datasets, "saved_datasets": saved, "cohorts": cohorts, "stages": stages(store),
        "imported": {"bucket_seconds": bucket.total_seconds(), "t": [t / 1000 for t in times], "count": [histogram.get(t, 0) for t in times]},
        "progress": rates.rows(store), "now": now,
    }  # fmt: skip


def stages(store: Store) -> list[dict[str, Any]]:
    """The transform stages with what the data page shows: version, input, output, paused, counters,
    lag, and the samples each derived in the last minute (its rate; an index scan of that minute)."""
    minute_ago = datetime.now(UTC) - timedelta(minutes=1)
    return [
        {
            "name": stage["name"],
            "version": stage["version"],
            "input": stage["spec"]["input"],
            "output": stage["spec"]["output"],
            "function": stage["spec"].get("function"),
            "paused": stage.get("paused", False),
            "counters": stage["counters"],
            "lag": stage["lag"],
            "per_minute": store[SAMPLES].count_documents({"imported_at": {"$gte": minute_ago}, "lineage.stage": stage["name"]}),
            "backfill": stage.get("backfill"),
        }  # fmt: skip
        for stage in Stages(store).list()
    ]


def dead_letters(store: Store, limit: int = 200) -> dict[str, Any]:
    """The newest dead letters with their reasons and a readable start of the original bytes."""
    project = store.project
    letters = []
    for document in store[DEAD_LETTERS].find(
        {"project": project}, {"project": 0, "key_b64": 0}, sort=[("at", DESCENDING)], limit=limit
    ):
        original = base64.b64decode(document.pop("original_b64", "") or "")  # empty when kept in GridFS
        document["original_bytes"] = document.get("original_size", len(original))
        document["original_preview"] = original[:400].decode("utf-8", errors="replace")
        document["id"] = document.pop("_id")
        letters.append(document)
    counts = list(store[DEAD_LETTERS].aggregate([
        {"$match": {"project": project}},
        {"$group": {"_id": {"topic": "$topic", "error_type": "$error_type"}, "count": {"$sum": 1}, "last": {"$max": "$at"}}},
        {"$sort": {"count": -1}},
    ]))  # fmt: skip
    return {
        "total": store[DEAD_LETTERS].count_documents({"project": project}),
        "by_reason": [{**row["_id"], "count": row["count"], "last": row["last"]} for row in counts],
        "letters": letters,
    }
