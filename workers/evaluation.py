"""Evaluate jobs: score one or several registered model versions on one pinned cohort.

Every version is scored on exactly the same samples, so the miner compares like with like. Each
score goes to the ``evaluations`` collection and to the job's test log.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tensordb.data.cohorts import cohort_from_spec
from tensordb.errors import JobSpecError
from tensordb.loop.promotion import EVALUATIONS
from workers.context import JobContext


def _versions(context: JobContext, target: dict[str, Any]) -> list[int]:
    if "name" not in target:
        raise JobSpecError("an evaluate job's model names a registered model: {'name': ..., 'versions': [..]}")
    if "versions" in target:
        return [int(version) for version in target["versions"]]
    if "alias" in target:
        version = context.registry.alias(target["name"], target["alias"])
        if version is None:
            raise JobSpecError(f"model {target['name']!r} has no {target['alias']!r} alias yet")
        return [version]
    info = context.registry.find_info(name=target["name"], version=target.get("version"))
    if info is None:
        raise JobSpecError(f"no registered model matches {target}")
    return [info["version"]]


def run_evaluation(context: JobContext) -> dict[str, Any]:
    """Load each version, stream the pinned cohort once per version, record and return the metrics."""
    spec = context.job["spec"]
    name = spec["model"].get("name")
    versions = _versions(context, spec["model"])
    cohort = cohort_from_spec(context.store, spec["data"]).pinned()
    batch_size = int(spec.get("hyperparameters", {}).get("batch_size", 256))
    scores = []
    for step, version in enumerate(versions):
        context.check_stop()
        model = context.registry.find(name=name, version=version)
        if model is None:
            raise JobSpecError(f"model {name!r} has no version {version}")
        # named by Keras, so any name may come back: ``log`` checks them (``Any``: not its keywords' types)
        metrics: dict[str, Any] = {
            key: float(value)
            for key, value in model.evaluate(cohort.to_tf_dataset(batch_size), return_dict=True, verbose=0).items()
        }
        context.logger.log(step=step, phase="test", **metrics)
        context.store[EVALUATIONS].replace_one(
            {"_id": f"{context.job_id}:{version}"},
            {
                "_id": f"{context.job_id}:{version}", "project": context.store.project, "job_id": context.job_id,
                "policy": context.job.get("policy"), "model": name, "version": version, "metrics": metrics,
                "cohort": cohort.describe(), "at": datetime.now(UTC),
            },
            upsert=True,
        )  # fmt: skip
        scores.append({"version": version, "metrics": metrics})
    return {"model": name, "samples": cohort.count(), "evaluations": scores}
