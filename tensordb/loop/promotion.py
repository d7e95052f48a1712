"""Model mining: after training, score the candidate against production and promote the better one.

``request_evaluation`` submits one evaluate job that scores the candidate *and* the current
production version on the policy's validation cohort (the same pinned samples for both).
``decide`` reads that job's result, applies the policy's rule and, when the candidate wins, moves
the ``production`` alias atomically (the registry publishes a model event, which the model server
follows). Every decision is recorded in ``decisions`` with the metric, values, margin and reason.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tensordb.errors import PolicyError
from tensordb.jobs.queue import JobKind, Jobs
from tensordb.loop.policies import Policies, Policy
from tensordb.models.registry import ModelRegistry
from tensordb.studies.studies import Studies

DECISIONS = "decisions"
#: One document per (evaluation job, model version), written by the evaluate runner (workers.evaluation).
EVALUATIONS = "evaluations"
PRODUCTION = "production"


def request_evaluation(jobs: Jobs, registry: ModelRegistry, policy: Policy, train_job: dict[str, Any]) -> str | None:
    """Submit the evaluation of the train job's last version against production; None if the job
    saved no version."""
    candidate = registry.find_info(name=policy.name, job_id=train_job["_id"], sort=[("version", -1)])
    if candidate is None:
        return None
    versions = [candidate["version"]]
    production = registry.alias(policy.name, PRODUCTION)
    if production is not None and production != candidate["version"]:
        versions.append(production)
    return jobs.submit(
        JobKind.EVALUATE,
        name=f"{policy.name}-evaluation",
        model={"name": policy.name, "versions": versions},
        data=policy.validation,
        policy=policy.name,
        job_id=f"eval-{train_job['_id']}",
        description=f"candidate v{candidate['version']} vs production v{production}",
    )


def evaluate_study_best(jobs: Jobs, registry: ModelRegistry, studies: Studies, policy: Policy, study: str) -> str | None:
    """Hand a finished study's best trial to the policy's evaluation and promotion, like any candidate.

    The study must register its versions under the policy's name (``model_name``), so that its best
    version is a version of the policy's model. Returns the evaluation job's id (the same one if asked
    twice); raises :class:`PolicyError` when the study has no best version or registers elsewhere.
    """
    spec = studies.spec(study)
    if spec.registered_name != policy.name:
        raise PolicyError(
            f"study {study!r} registers its versions as {spec.registered_name!r}, but policy {policy.name!r} promotes "
            f"versions of {policy.name!r}: create the study with model_name={policy.name!r}"
        )
    best = studies.best(study)
    if best is None or "model" not in best:
        raise PolicyError(f"study {study!r} has no best version yet: it must finish, and its trials must save Keras models")
    return request_evaluation(jobs, registry, policy, dict(jobs.get(best["model"]["trial"])))


def evaluate_versions(jobs: Jobs, policy: Policy, versions: list[int]) -> str:
    """Score any chosen set of versions (e.g. "the five with the lowest training loss") on the
    policy's validation cohort; results land in ``evaluations``."""
    return jobs.submit(
        JobKind.EVALUATE,
        name=f"{policy.name}-evaluation",
        model={"name": policy.name, "versions": versions},
        data=policy.validation,
    )


def decide(store: Any, registry: ModelRegistry, policies: Policies, evaluation_job: dict[str, Any]) -> dict[str, Any]:
    """Promote the candidate (first version of the evaluation) if it beats production; record why.

    Deciding twice on the same evaluation (a redelivered event) returns the first decision.
    """
    earlier = store[DECISIONS].find_one({"_id": evaluation_job["_id"]})
    if earlier is not None:
        return earlier
    policy = policies.get(evaluation_job["policy"])
    metric, direction = policy.objective["metric"], policy.objective["direction"]
    scores = {entry["version"]: entry["metrics"] for entry in evaluation_job["result"]["evaluations"]}
    candidate = evaluation_job["spec"]["model"]["versions"][0]
    production = registry.alias(policy.name, PRODUCTION)
    if metric not in scores[candidate]:
        raise KeyError(
            f"the evaluation has no metric {metric!r} (it has {sorted(scores[candidate])}): fix the policy's objective"
        )
    candidate_value = scores[candidate][metric]
    production_value = scores.get(production, {}).get(metric) if production is not None else None
    promote = production != candidate and policy.better(candidate_value, production_value)
    margin = policy.promotion.get("margin", 0.0)
    if production is None:
        reason = f"no production model yet: v{candidate} becomes production ({metric} {candidate_value:.4f})"
    elif production_value is None:
        promote = False
        reason = f"production v{production} moved during the evaluation; not comparable, nothing changed"
    else:
        comparison = ">" if direction == "max" else "<"
        verdict = "promoted" if promote else "kept production"
        reason = (
            f"{verdict}: candidate v{candidate} {metric} {candidate_value:.4f} vs production v{production} "
            f"{production_value:.4f}; rule: candidate {comparison} production {'+' if direction == 'max' else '-'} {margin}"
        )
    decision = {
        "_id": evaluation_job["_id"],
        "project": store.project,
        "policy": policy.name,
        "candidate": {"version": candidate, metric: candidate_value},
        "production": {"version": production, metric: production_value},
        "metric": metric,
        "direction": direction,
        "margin": margin,
        "promoted": promote,
        "reason": reason,
        "samples": evaluation_job["result"]["samples"],
        "at": datetime.now(UTC),
    }
    store[DECISIONS].replace_one({"_id": decision["_id"]}, decision, upsert=True)
    if promote:
        registry.promote(
            policy.name, candidate, alias=PRODUCTION, reason={"decision": decision["_id"], "reason": reason}, policy=policy.name
        )
    return decision
