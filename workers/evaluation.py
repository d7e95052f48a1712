"""Evaluate jobs: score a registered model version on a cohort and log the result."""

from __future__ import annotations

from typing import Any

from tensordb.cohorts import cohort_from_spec
from workers.trainer import JobContext
from workers.training import JobSpecError


def run_evaluation(context: JobContext) -> dict[str, Any]:
    """Load the model (by name and version, or alias), stream the cohort once, return its metrics."""
    spec = context.job["spec"]
    target = spec["model"]
    if "name" not in target:
        raise JobSpecError("an evaluate job's model names a registered model: {'name': ..., 'version': N}")
    model = context.registry.find(name=target["name"], version=target.get("version"), alias=target.get("alias"))
    if model is None:
        raise JobSpecError(f"no registered model matches {target}")
    info = model.tensordb_info
    cohort = cohort_from_spec(context.store, spec["data"]).pinned()
    batch_size = int(spec.get("hyperparameters", {}).get("batch_size", 256))
    metrics = model.evaluate(cohort.to_tf_dataset(batch_size), return_dict=True, verbose=0)
    metrics = {name: float(value) for name, value in metrics.items()}
    context.logger.log(step=0, phase="test", **metrics)
    return {"model": {"name": info["name"], "version": info["version"]}, "samples": cohort.count(), "metrics": metrics}
