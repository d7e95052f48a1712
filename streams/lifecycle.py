"""The model lifecycle: a finished train job of a policy gets evaluated; a finished evaluation
gets a decision (promote or keep production). Driven by ``job-events``, idempotent on redelivery.

An event only says which job to look at: what happens is decided by the job's document in this
project (its status must be finished), so a forged or copied event cannot evaluate a running
job's checkpoint or another project's job.
"""

from __future__ import annotations

from pymongo.errors import DuplicateKeyError

from streams.processing import ProcessorContext
from tensordb.errors import PolicyError
from tensordb.infra.bus import Received
from tensordb.jobs.queue import JobEvent, JobKind, Jobs, JobStatus
from tensordb.loop import promotion
from tensordb.loop.policies import Policies


def handle_job_events(context: ProcessorContext, batch: list[Received]) -> None:
    finished = [received.valid_record["job_id"] for received in batch if received.valid_record["event"] == JobEvent.FINISHED]
    if not finished:
        return
    jobs = Jobs(context.store, context.publisher)
    registry = context.registry
    policies = Policies(context.store)
    for job in jobs.collection.find({"_id": {"$in": finished}, "status": JobStatus.FINISHED, "policy": {"$ne": None}}):
        try:
            policy = policies.get(job["policy"])
        except PolicyError:
            continue  # the policy was deleted since: nothing to do for its jobs
        if job["kind"] == JobKind.TRAIN:
            try:
                promotion.request_evaluation(jobs, registry, policy, job)
            except DuplicateKeyError:
                pass  # already requested for this job (a redelivered event)
        elif job["kind"] == JobKind.EVALUATE:
            promotion.decide(context.store, registry, policies, job)
