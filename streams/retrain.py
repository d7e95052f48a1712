"""The retrain trigger: ``data-imported`` events become train jobs, one per threshold crossing.

For each active policy with an ``every_samples`` trigger, the new samples of an import batch that
match the policy's training cohort are counted, each sample once however often it is announced.
When the count reaches the threshold, the threshold is consumed atomically (the overshoot counts
towards the next one) and one train job is
submitted; while a job of the policy is still pending, new arrivals are absorbed into it (it reads
its cohort when it starts) instead of queueing another. Time-based triggers run on a timer.
"""

from __future__ import annotations

import logging

from streams.processing import ProcessorContext
from tensordb.data.cohorts import cohort_from_spec
from tensordb.data.samples import SAMPLES
from tensordb.errors import PolicyError
from tensordb.infra.bus import Received
from tensordb.jobs.queue import JobKind, Jobs, JobStatus
from tensordb.loop.policies import Policies, Policy
from tensordb.loop.training import TrainingStep, submit_training, training_step
from tensordb.studies.studies import Studies

log = logging.getLogger(__name__)


def planned_step(context: ProcessorContext, policy: Policy) -> TrainingStep | None:
    """The policy's training step, or None (logged) while its study has no finished configuration:
    the trigger is then left untaken, so the next import or period tries again."""
    try:
        return training_step(Studies(context.store, context.publisher), policy)
    except PolicyError as exc:
        log.warning("not retraining yet: %s", exc)
        return None


def maybe_trigger(
    context: ProcessorContext, jobs: Jobs, policies: Policies, policy: Policy, threshold: int | None, reason: str
) -> str | None:
    """Submit a train job if the policy has no pending job and room for one; returns its id."""
    if jobs.collection.count_documents(
        {"project": jobs.store.project, "policy": policy.name, "status": JobStatus.PENDING}, limit=1
    ):
        policies.absorb(policy.name)  # the pending job will read these samples when it starts
        return None
    running = jobs.collection.count_documents(
        {"project": jobs.store.project, "policy": policy.name, "kind": JobKind.TRAIN, "status": JobStatus.RUNNING}
    )
    if running >= policy.max_concurrent_jobs:
        return None  # the counter stays; the next import re-checks
    step = planned_step(context, policy)
    if step is None or not policies.take_trigger(policy.name, threshold):
        return None  # another processor took this crossing
    return submit_training(jobs, step, policy, reason)


def handle_imports(context: ProcessorContext, batch: list[Received]) -> None:
    """Count each import batch towards every active sample-triggered policy."""
    policies = Policies(context.store)
    jobs = Jobs(context.store, context.publisher)
    active = [Policies.policy(document) for document in policies.list(include_paused=False)]
    counted = [policy for policy in active if "every_samples" in policy.trigger]
    for received in batch:
        event = received.valid_record
        for policy in counted:
            training = cohort_from_spec(context.store, policy.training)
            query = {"$and": [training.query(), {"_id": {"$in": event["sample_ids"]}}]}
            matching = [document["_id"] for document in context.store[SAMPLES].find(query, {"_id": 1})]
            total = policies.count_new_samples(policy.name, event["batch_id"], matching)
            threshold = int(policy.trigger["every_samples"])
            if total is not None and total >= threshold:
                maybe_trigger(context, jobs, policies, policy, threshold, f"{total} new samples (threshold {threshold})")


def run_timed_triggers(context: ProcessorContext) -> None:
    """Start a round for every active time-triggered policy whose period has passed."""
    policies = Policies(context.store)
    jobs = Jobs(context.store, context.publisher)
    for document in policies.list(include_paused=False):
        policy = Policies.policy(document)
        seconds = policy.trigger.get("every_seconds")
        if not seconds or (step := planned_step(context, policy)) is None:
            continue
        if policies.take_timed_trigger(policy.name, seconds):
            submit_training(jobs, step, policy, f"every {seconds} s")
