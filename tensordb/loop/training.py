"""What a policy's retraining submits: its own model and hyper-parameters, or what its study found best.

A policy that names a study retrains the study's best finished configuration (the study's model,
fixed and searched hyper-parameters, and the epochs its trials trained) on the policy's own
cohorts, so new data re-runs the winner of the search rather than the search.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tensordb.errors import PolicyError
from tensordb.jobs.queue import JobKind, Jobs
from tensordb.loop.policies import Policy
from tensordb.studies.studies import Studies


@dataclass(frozen=True)
class TrainingStep:
    """The model, hyper-parameters and epochs of one retraining, and where they came from."""

    model: dict[str, Any]
    hyperparameters: dict[str, Any]
    epochs: int
    labels: dict[str, Any] = field(default_factory=dict)


def training_step(studies: Studies, policy: Policy) -> TrainingStep:
    """The policy's training step; raises :class:`PolicyError` while its study has no finished configuration.

    Parameters
    ----------
    studies : Studies
        The project's studies (read only when the policy names one).
    policy : Policy
        The policy to retrain.
    """
    if policy.study is None:
        return TrainingStep(dict(policy.model), dict(policy.hyperparameters), policy.epochs)
    spec = studies.spec(policy.study)
    best = studies.best(policy.study)
    if best is None:
        raise PolicyError(f"policy {policy.name!r} retrains study {policy.study!r}, which has no finished configuration yet")
    return TrainingStep(
        model=dict(spec.model),
        hyperparameters={**spec.hyperparameters, **best["hyperparameters"], **policy.hyperparameters},
        epochs=spec.trial_epochs,
        labels={"from_study": spec.name, "configuration": best["configuration"]},
    )


def submit_training(jobs: Jobs, step: TrainingStep, policy: Policy, reason: str) -> str:
    """The train job of one trigger of ``policy``; its versions are registered under the policy name."""
    return jobs.submit(
        JobKind.TRAIN,
        name=policy.name,
        model=step.model,
        data={**policy.training, "validation": policy.validation},
        hyperparameters=step.hyperparameters,
        epochs=step.epochs,
        policy=policy.name,
        description=reason,
        labels=step.labels,
    )
