"""Model mining: after training, score the candidate against production and promote the better one.

``request_evaluation`` submits one evaluate job that scores the candidate *and* the current
production version on the policy's validation cohort (the same pinned samples for both).
``decide`` reads that job's result, applies the policy's rule and, when the candidate wins, moves
the ``production`` alias atomically (the registry publishes a model event, which the model server
follows). Every decision is recorded in ``decisions`` with the metric, values, margin and reason.

A person may overrule the miner: ``promote_by_person`` moves production to any version and
``roll_back`` returns it to the version it replaced. Both are recorded in ``decisions`` like the
automatic ones, with ``by: "person"``, who asked, the reason given, and the previous and new versions.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from tensordb.errors import PolicyError, PromotionError
from tensordb.jobs.queue import JobKind, Jobs
from tensordb.loop.policies import Policies, Policy
from tensordb.models.registry import ModelRegistry
from tensordb.studies.studies import Studies

DECISIONS = "decisions"
#: One document per (evaluation job, model version), written by the evaluate runner (workers.evaluation).
EVALUATIONS = "evaluations"
PRODUCTION = "production"
#: ``by`` of a decision: the miner's, or a person's (through the dashboard, the SDK...)
BY_MINER, BY_PERSON = "miner", "person"


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


# -- a person's promotions ------------------------------------------------------------------------------


def promote_by_person(
    store: Any, registry: ModelRegistry, model: str, version: int, reason: str | None = None, who: str = BY_PERSON
) -> dict[str, Any]:
    """Move ``model``'s production alias to ``version`` because a person said so; returns the decision.

    The alias moves first (the registry publishes the model event the model server follows), then
    the decision is recorded in ``decisions`` next to the miner's: ``by: "person"``, ``who``, the
    ``reason`` and the previous and new versions; the alias' history names the decision.

    Parameters
    ----------
    store : Store
        The project's database.
    registry : ModelRegistry
        The project's models (with a publisher, so that model servers hear of the change).
    model : str
        The model's name (a policy's versions carry the policy's name).
    version : int
        The version to serve.
    reason : str, optional
        Why, in the person's words.
    who : str
        Who asked: a user name, or the dashboard's session.

    Raises :class:`~tensordb.errors.ModelNotFoundError` (no such version) and
    :class:`~tensordb.errors.PromotionError` (it is production already).
    """
    current = registry.alias(model, PRODUCTION)
    if current == version:
        raise PromotionError(f"v{version} of {model!r} is production already: nothing to change")
    return _move_production(store, registry, model, version, "promote", reason, who)


def roll_back(store: Any, registry: ModelRegistry, model: str, reason: str | None = None, who: str = BY_PERSON) -> dict[str, Any]:
    """Return ``model``'s production alias to the version the current one replaced; returns the decision.

    Rolling back again goes one version further back (a roll-back is not itself a version to
    return to): after v1, v2, v3 were promoted, two roll-backs serve v2, then v1.

    Parameters are those of :func:`promote_by_person`, less the version. Raises
    :class:`~tensordb.errors.PromotionError` when production has no earlier version to return to.
    """
    alias = registry.alias_info(model, PRODUCTION)
    if alias is None:
        raise PromotionError(f"{model!r} has no production version: nothing to roll back")
    target = rollback_target(alias.get("history") or [])
    if target is None:
        raise PromotionError(f"production v{alias['version']} of {model!r} replaced no earlier version: nothing to roll back to")
    return _move_production(store, registry, model, target, "roll back", reason, who)


def rollback_target(history: list[Mapping[str, Any]]) -> int | None:
    """The version a roll-back returns to, from an alias' ``history`` (oldest first): promotions
    stack up, each roll-back takes the top one off; the answer is the version under the top."""
    stack: list[int] = []
    for entry in history:
        if (entry.get("reason") or {}).get("action") == "roll back":
            if stack:
                stack.pop()
            if not stack or stack[-1] != entry["version"]:
                stack.append(entry["version"])
        elif not stack or stack[-1] != entry["version"]:
            stack.append(entry["version"])
    return stack[-2] if len(stack) >= 2 else None


def _move_production(
    store: Any, registry: ModelRegistry, model: str, version: int, action: str, reason: str | None, who: str
) -> dict[str, Any]:
    """Move the alias (the registry refuses an unknown version before changing anything), then record why."""
    decision_id = f"person-{uuid.uuid4().hex[:16]}"
    said = (reason or "").strip() or None
    alias = registry.promote(
        model, version, alias=PRODUCTION, reason={"decision": decision_id, "action": action, "by": BY_PERSON, "who": who,
                                                   "reason": said or f"{action} by {who}"},
    )  # fmt: skip
    previous = alias.get("previous_version")
    decision = {
        "_id": decision_id,
        "project": store.project,
        "policy": model,
        "by": BY_PERSON,
        "who": who,
        "action": action,
        "candidate": {"version": version},
        "production": {"version": previous},
        "previous_version": previous,
        "version": version,
        "promoted": True,
        "reason": f"{action}: v{previous} → v{version} by {who}" + (f": {said}" if said else " (no reason given)"),
        "given_reason": said,
        "at": datetime.now(UTC),
    }
    store[DECISIONS].insert_one(decision)
    return decision
