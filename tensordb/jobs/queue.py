"""Jobs: the ``jobs`` collection is the queue and the source of truth; Kafka rings the doorbell.

``submit`` records a job as *pending* and publishes a ``job-request``. A worker that hears a
request claims the most urgent pending job atomically (``find_one_and_update``) with a lease, and
keeps the lease alive with heartbeats. A job whose lease expires (its worker died) is re-queued by
the reaper and resumes from its last saved epoch. Lifecycle::

    pending ──claim──► running ──► finished
       ▲                 │  └────► failed      (attempts exhausted, or not retryable)
       └── retry/reap ───┘  └────► cancelled   (cancel requested)
       ▲                                │
       └──────── Jobs.retry (a person) ─┘      (failed or cancelled: same id, fresh attempts)
"""

from __future__ import annotations

import builtins
import re
import socket
import time
import traceback as traceback_module
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Literal, TypedDict, cast

import gridfs.errors
from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.errors import PyMongoError

from tensordb import records
from tensordb.config import Topic, mask_text, secret_values
from tensordb.errors import DeliveryError, JobError, JobNotFoundError, QueryError
from tensordb.infra import metrics
from tensordb.infra.bus import Publisher
from tensordb.infra.store import Store
from tensordb.infra.trusted import check_submitted_job

JOBS = "jobs"
#: The file id in GridFS's NoFile messages (``... with _id ObjectId('...')`` or ``no blob ID in project``).
_GRIDFS_ID = re.compile(r"(?:_id ObjectId\('|no blob )(?P<id>[0-9a-f]{24})")


class JobKind(StrEnum):
    """What a job runs: a training of a model, an evaluation of versions, or a task script."""

    TRAIN = "train"
    EVALUATE = "evaluate"
    TASK = "task"


class JobStatus(StrEnum):
    """A job's ``status`` field (the module docstring draws how it changes)."""

    PENDING = "pending"  #: waiting for a worker (new, retried, or handed back)
    RUNNING = "running"  #: claimed by a worker that holds its lease
    FINISHED = "finished"  #: done; ``result`` holds what the runner returned
    FAILED = "failed"  #: out of attempts, or refused for good; ``error`` says why
    CANCELLED = "cancelled"  #: cancelled before or while running


UNFINISHED = (JobStatus.PENDING, JobStatus.RUNNING)
STATUSES = tuple(JobStatus)
#: What :meth:`Jobs.fail` answers when the job is no longer this worker's (its lease was lost and
#: the reaper, a cancel or another worker changed it): nothing was recorded. Never a stored status.
LOST: Literal["lost"] = "lost"


class JobEvent(StrEnum):
    """The ``event`` of a ``job-event`` record: one step of a job's lifecycle."""

    SUBMITTED = "submitted"
    CLAIMED = "claimed"
    STARTED = "started"
    EPOCH = "epoch"
    CHECKPOINT = "checkpoint"
    FINISHED = "finished"
    FAILED = "failed"
    RETRYING = "retrying"  #: failed, re-queued for another attempt
    CANCEL_REQUESTED = "cancel-requested"
    CANCELLED = "cancelled"
    REQUEUED = "requeued"  #: handed back (worker shutdown) or its lease expired


CLAIM_ORDER = [("priority", DESCENDING), ("submitted_at", ASCENDING)]
KINDS = tuple(JobKind)
#: The most slots and GPUs one job may ask for (``schemas/job_request.v1.json`` says the same).
MAX_SLOTS, MAX_GPUS = 64, 16


class JobResources(TypedDict):
    """What a job occupies on its worker while it runs: slots (concurrent jobs) and GPUs."""

    slots: int
    gpus: int


#: What a job stored without ``resources`` (before jobs asked for any) occupies.
DEFAULT_RESOURCES: JobResources = {"slots": 1, "gpus": 0}


class JobFailure(TypedDict):
    """A failed attempt: the job's ``error``, and one entry of its ``history`` once retried."""

    message: str
    traceback: str
    at: datetime
    worker: str


class JobCheckpoint(TypedDict):
    """The last epoch whose parameters are saved (a re-run resumes after it)."""

    epoch: int
    model_version: int
    at: datetime


class JobDocument(TypedDict):
    """A document of the ``jobs`` collection, as :meth:`Jobs.submit` stores it."""

    _id: str
    project: str
    kind: str
    name: str
    description: str
    policy: str | None
    #: what groups the job with others, e.g. a study's trial: ``{"study": ..., "trial": ..., "fold": ...}``
    labels: dict[str, Any]
    #: the job-request's model, data, hyperparameters, epochs, save_keys (and script for tasks)
    spec: dict[str, Any]
    priority: int
    max_attempts: int
    #: what the job occupies on its worker; absent on jobs stored before jobs asked for resources
    #: (:func:`resources_of` reads either)
    resources: JobResources
    status: str  # a JobStatus value
    attempts: int
    worker: str | None
    host: str | None
    lease_until: datetime | None
    cancel_requested: bool
    progress: dict[str, Any]
    checkpoint: JobCheckpoint | None
    result: dict[str, Any] | None
    error: JobFailure | None
    submitted_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    history: list[JobFailure]


def _equality(filters: Mapping[str, Any]) -> dict[str, Any]:
    """Filters that can only compare fields for equality: no operators, no server-side code."""
    for key, value in filters.items():
        if key.startswith("$") or (isinstance(value, Mapping) and any(str(k).startswith("$") for k in value)):
            raise QueryError(f"job filters are equality filters on fields; {key!r}={value!r} is not")
    return dict(filters)


def _now() -> datetime:
    return datetime.now(UTC)


def resources_of(job: Mapping[str, Any]) -> JobResources:
    """The slots and GPUs ``job`` occupies (:data:`DEFAULT_RESOURCES` for jobs stored without them)."""
    resources = job.get("resources") or {}
    return {"slots": resources.get("slots", DEFAULT_RESOURCES["slots"]), "gpus": resources.get("gpus", DEFAULT_RESOURCES["gpus"])}


def _checked_resources(slots: int, gpus: int) -> JobResources:
    """The resources a job asks for, refused with the reason before anything is stored."""
    for what, value, minimum, maximum in (("slots", slots, 1, MAX_SLOTS), ("gpus", gpus, 0, MAX_GPUS)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise JobError(f"a job's {what} must be a whole number, got {value!r}")
        if not minimum <= value <= maximum:
            raise JobError(f"a job's {what} must be between {minimum} and {maximum}, got {value}")
    return {"slots": slots, "gpus": gpus}


def _fitting(free_slots: int | None, free_gpus: int | None) -> list[dict[str, Any]]:
    """Conditions on a pending job's resources: it asks for at most ``free_slots`` slots and
    ``free_gpus`` GPUs (a bound that is None is no bound). Jobs stored without ``resources``
    occupy :data:`DEFAULT_RESOURCES`."""
    bounds = [("slots", free_slots, DEFAULT_RESOURCES["slots"]), ("gpus", free_gpus, DEFAULT_RESOURCES["gpus"])]
    conditions = []
    for field, free, default in bounds:
        if free is None:
            continue
        fits = {f"resources.{field}": {"$lte": free}}
        conditions.append({"$or": [fits, {"resources": {"$exists": False}}]} if default <= free else fits)
    return conditions


#: pymongo's reprs of its objects, which spell out the client's options: ``Collection(Database(MongoClient(...), 'db'), 'c')``.
_COLLECTION_REPR = re.compile(r"Collection\(Database\(MongoClient\(.*?\), '(?P<database>[^']*)'\), '(?P<collection>[^']*)'\)")
_DATABASE_REPR = re.compile(r"Database\(MongoClient\(.*?\), '(?P<database>[^']*)'\)")
_CLIENT_REPR = re.compile(r"MongoClient\(host=(?P<hosts>\[[^\]]*\]).*?\)(?=[,)\s]|$)")


def _short_reprs(text: str) -> str:
    """``text`` with pymongo's object reprs replaced by what they name (a collection, a database, hosts)."""
    text = _COLLECTION_REPR.sub(lambda match: f"collection {match['database']}.{match['collection']}", text)
    text = _DATABASE_REPR.sub(lambda match: f"database {match['database']}", text)
    return _CLIENT_REPR.sub(lambda match: f"MongoDB at {match['hosts']}", text)


def describe_job_error(error: BaseException) -> str:
    """Why a job failed, as stored in its ``error`` and read by anyone who can read jobs.

    TensorDB's errors and the job's own code's say it already (``Type: message``); the storage
    driver's are put in TensorDB's terms, without the driver objects they quote.
    """
    if isinstance(error, gridfs.errors.NoFile):
        found = _GRIDFS_ID.search(str(error))
        blob = f" (GridFS file {found['id']})" if found else ""
        return (
            f"NotFoundError: stored bytes this job reads are missing{blob}: they were deleted, or belong to another "
            "project; save the model version or re-publish the samples again, then retry the job"
        )
    if isinstance(error, PyMongoError):
        return (
            f"MongoDB failed the job's request ({type(error).__name__}: {_short_reprs(str(error))}): check that MongoDB is "
            "up and that the worker's user may do this, then retry the job"
        )
    return f"{type(error).__name__}: {_short_reprs(str(error))}"


class Jobs:
    """The job queue of one project: submission, claims with leases, progress and outcomes."""

    def __init__(self, store: Store, publisher: Publisher) -> None:
        self.store = store
        self.publisher = publisher
        self.collection = store[JOBS]

    # -- submitting and watching -----------------------------------------------------------------
    def submit(
        self,
        kind: str = JobKind.TRAIN,
        *,
        name: str | None = None,
        model: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
        epochs: int = 1,
        save_keys: Iterable[str] = (),
        priority: int = 0,
        max_attempts: int = 3,
        script: str | None = None,
        policy: str | None = None,
        description: str = "",
        job_id: str | None = None,
        labels: Mapping[str, Any] | None = None,
        slots: int = 1,
        gpus: int = 0,
        flush: bool = True,
    ) -> str:
        """Record a job as pending and announce it on the job-request topic; returns its id.

        The ``jobs`` collection is the queue: a worker claims the job from it whether or not it heard
        the announcement. The job is checked here (kind, schema, trusted code) so that a bad job is
        refused before anything is stored.

        Parameters
        ----------
        kind : {"train", "evaluate", "task"}
            What the worker does: train a model on a cohort, evaluate model versions, or run a script.
        name : str, optional
            What jobs are listed, waited on and claimed by (``Jobs.list(name=...)``); default: ``kind``.
        model : mapping, optional
            To train: ``{"architecture": <Keras JSON>, "compile": {...}}``, ``{"entry_point":
            "package.module:function"}`` (a trusted builder, called with the hyper-parameters it
            declares) or ``{"name": ..., "version": ...}`` (continue a registered model). To evaluate:
            ``{"name": ..., "versions": [...]}``.
        data : mapping, optional
            The cohort to read: ``{"cohort": NAME}`` (a saved one) or ``{"filter": {...}, "sort": [[field, -1]],
            "limit": N, "x": ..., "y": ...}``.
        hyperparameters : mapping, optional
            Training options (batch size, learning rate...); for a task, the script's globals.
        epochs : int
            Epochs to train; a resumed job continues after its last saved epoch.
        save_keys : iterable of str
            For a task: the script's globals kept as the job's ``result`` when it finishes.
        priority : int
            Higher is claimed first; equal priorities go oldest first.
        max_attempts : int
            Runs before the job is marked failed (a failure or an expired lease spends one).
        script : str, optional
            For a task (required there): the path of a Python file inside the workers' ``task_script_dirs``.
        policy : str, optional
            The continuous-training policy this job serves (set by the loop; its evaluation follows).
        description : str
            Free text for people and dashboards.
        job_id : str, optional
            The id to use (idempotent submitters: a second submit of the id raises
            ``DuplicateKeyError`` and publishes nothing); default: a random ``job-...`` id.
        labels : mapping, optional
            What groups this job with others (a study's trial is labelled with its study,
            configuration and fold); list them with ``Jobs.list(**{"labels.study": NAME})``.
        slots : int
            Worker slots the job occupies while it runs (1 to 64): a worker runs jobs concurrently up
            to its ``--slots``, and only a worker with this many free slots claims the job.
        gpus : int
            GPUs the job needs (0 to 16): only a worker with this many free GPUs claims it.
        flush : bool
            Wait until the announcement and the ``submitted`` event are acknowledged (default).
            False leaves them to the producer's next flush, for a caller that flushes soon after
            anyway (a worker submitting a study's next trial while it records a job's end); the
            job itself is stored either way.

        Raises ``JobError`` (unknown kind, task without script, slots or GPUs out of range),
        ``ValidationError`` (the request breaks
        ``schemas/job-request``) and ``UntrustedCodeError`` (a builder or script this process does not trust).
        """
        if kind not in KINDS:
            raise JobError(f"job kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if kind == JobKind.TASK and not script:
            raise JobError("a task job needs script=<path of a Python file on the worker>")
        resources = _checked_resources(slots, gpus)
        check_submitted_job(kind, model, script, self.store.settings)  # workers check again before running
        job_id = job_id or f"job-{uuid.uuid4().hex[:16]}"
        request: dict[str, Any] = {
            "schema": records.Schema.JOB_REQUEST,
            "job_id": job_id,
            "kind": kind,
            "name": name or kind,
            "model": dict(model or {}),
            "data": dict(data or {}),
            "hyperparameters": dict(hyperparameters or {}),
            "epochs": epochs,
            "save_keys": list(save_keys),
            "priority": priority,
            "max_attempts": max_attempts,
            "resources": dict(resources),
            "submitted_at": _now().isoformat(),
        }
        if script:
            request["script"] = script
        if policy:
            request["policy"] = policy
        records.validate(request, records.Schema.JOB_REQUEST)  # refuse bad jobs before anything is stored
        now = _now()
        document: JobDocument = {
            "_id": job_id,
            "project": self.store.project,
            "kind": kind,
            "name": request["name"],
            "description": description,
            "policy": policy,
            "labels": dict(labels or {}),
            "spec": {key: request[key] for key in ("model", "data", "hyperparameters", "epochs", "save_keys")}
            | ({"script": script} if script else {}),
            "priority": priority,
            "max_attempts": max_attempts,
            "resources": resources,
            "status": JobStatus.PENDING,
            "attempts": 0,
            "worker": None,
            "host": None,
            "lease_until": None,
            "cancel_requested": False,
            "progress": {},
            "checkpoint": None,
            "result": None,
            "error": None,
            "submitted_at": now,
            "started_at": None,
            "finished_at": None,
            "history": [],
        }
        self.collection.insert_one(document)
        self.publisher.publish(Topic.JOB_REQUESTS, request, key=job_id)
        self.event(job_id, JobEvent.SUBMITTED, attempt=0)
        if flush:
            self.publisher.flush()
        return job_id

    def get(self, job_id: str) -> JobDocument:
        """The job's document; raises :class:`~tensordb.errors.JobNotFoundError` (a ``JobError``) for an unknown id."""
        job = self.collection.find_one({"_id": job_id})
        if job is None:
            raise JobNotFoundError(f"no job {job_id!r} in project {self.store.project!r}")
        return cast(JobDocument, job)

    def list(
        self, status: str | Iterable[str] | None = None, name: str | None = None, **filters: Any
    ) -> builtins.list[JobDocument]:
        """Jobs newest first, filtered by status (one or several), name and equality filters."""
        query: dict[str, Any] = {}
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status) if isinstance(status, Iterable) else [status]
            unknown = [value for value in statuses if value not in STATUSES]
            if unknown:
                raise QueryError(f"unknown job status {unknown[0]!r}: statuses are {', '.join(STATUSES)}")
            query["status"] = {"$in": statuses}
        if name is not None:
            query["name"] = name
        query.update(_equality(filters))
        return [cast(JobDocument, job) for job in self.collection.find(query).sort("submitted_at", DESCENDING)]

    def unfinished(self, name: str | None = None) -> bool:
        """Whether any job (of ``name``) is pending or running (TensorLayer's check_unfinished_task)."""
        query: dict[str, Any] = {"status": {"$in": list(UNFINISHED)}}
        if name is not None:
            query["name"] = name
        return self.collection.count_documents(query, limit=1) > 0

    def wait(self, job_ids: Iterable[str], timeout: float = 600.0, interval: float = 0.2) -> builtins.list[JobDocument]:
        """Block until every job has ended; returns their documents. Raises JobError on timeout."""
        ids = list(job_ids)
        deadline = time.monotonic() + timeout
        while True:
            jobs = [cast(JobDocument, job) for job in self.collection.find({"_id": {"$in": ids}})]
            if len(jobs) == len(ids) and all(job["status"] not in UNFINISHED for job in jobs):
                return sorted(jobs, key=lambda job: ids.index(job["_id"]))
            if time.monotonic() > deadline:
                waiting = [job["_id"] for job in jobs if job["status"] in UNFINISHED]
                raise JobError(f"jobs still unfinished after {timeout} s: {waiting}; are workers running?")
            time.sleep(interval)

    def cancel(self, job_id: str) -> JobDocument:
        """Cancel a pending job at once; ask a running one to stop (its worker stops at the next step)."""
        job = self.collection.find_one_and_update(
            {"_id": job_id, "status": JobStatus.PENDING},
            {"$set": {"status": JobStatus.CANCELLED, "cancel_requested": True, "finished_at": _now()}},
            return_document=ReturnDocument.AFTER,
        )
        if job is None:
            job = self.collection.find_one_and_update(
                {"_id": job_id, "status": JobStatus.RUNNING},
                {"$set": {"cancel_requested": True}},
                return_document=ReturnDocument.AFTER,
            )
        if job is None:
            return self.get(job_id)  # already ended: nothing to cancel
        self.event(
            job_id,
            JobEvent.CANCELLED if job["status"] == JobStatus.CANCELLED else JobEvent.CANCEL_REQUESTED,
            attempt=job["attempts"],
        )
        self.publisher.flush()
        return cast(JobDocument, job)

    def retry(self, job_id: str, by: str = "person") -> JobDocument:
        """Put a failed or cancelled job back in the queue, under the same id, with a fresh attempt budget.

        The job keeps its id, so its run, logs and model versions stay in one place, and its
        checkpoint, so a train job resumes after its last saved epoch (as after a worker's death);
        its last error moves to ``history``. Workers hear of it through a new job request.
        A study's trials are refused: the study's scheduler decides about them.

        Parameters
        ----------
        job_id : str
            The job to retry.
        by : str
            Who asked (recorded with the job's ``retrying`` event and in ``retried_by``).

        Raises :class:`~tensordb.errors.JobNotFoundError` for an unknown id and :class:`~tensordb.errors.JobError`
        for a job that is pending, running or finished, or that is a study's trial.
        """
        job = self.get(job_id)
        if (job.get("labels") or {}).get("study"):
            raise JobError(
                f"job {job_id!r} is a trial of study {job['labels']['study']!r}: its scheduler decides about its trials, "
                "so create a new study instead"
            )
        retryable = (JobStatus.FAILED, JobStatus.CANCELLED)
        update: dict[str, Any] = {
            "$set": {
                "status": JobStatus.PENDING, "attempts": 0, "cancel_requested": False, "worker": None, "host": None,
                "lease_until": None, "finished_at": None, "error": None, "retried_at": _now(), "retried_by": by,
            },
            "$inc": {"retries": 1},
        }  # fmt: skip
        if job.get("error"):
            update["$push"] = {"history": job["error"]}
        retried = self.collection.find_one_and_update(
            {"_id": job_id, "status": {"$in": list(retryable)}}, update, return_document=ReturnDocument.AFTER
        )
        if retried is None:
            status = self.get(job_id)["status"]
            advice = "cancel it first" if status in UNFINISHED else "submit a new job to run it again"
            raise JobError(f"job {job_id!r} is {status}: only failed or cancelled jobs can be retried ({advice})")
        self._announce(retried, JobEvent.RETRYING, {"reason": f"retried by {by}"})
        return cast(JobDocument, retried)

    def delete(self, name: str | None = None, **filters: Any) -> int:
        """Delete ended jobs (running ones are left alone: cancel them first).

        ``filters`` narrow the selection and can never widen it: a ``status`` filter of pending or
        running jobs deletes nothing, and the project is always this store's.
        """
        query = _equality(filters) | ({"name": name} if name is not None else {})
        return self.collection.delete_many({"$and": [query, {"status": {"$nin": list(UNFINISHED)}}]}).deleted_count

    # -- the worker's side ---------------------------------------------------------------------
    def claim(
        self,
        worker: str,
        lease_seconds: float,
        name: str | None = None,
        sort: Sequence[tuple[str, int]] | None = None,
        free_slots: int | None = None,
        free_gpus: int | None = None,
    ) -> JobDocument | None:
        """Atomically take the most urgent pending job (of ``name``) that fits, with a lease; None if none.

        Parameters
        ----------
        worker : str
            The claiming worker's id (recorded on the job; its heartbeats and outcomes must name it).
        lease_seconds : float
            How long the claim holds without a heartbeat before the reaper re-queues the job.
        name : str, optional
            Claim only jobs of this name.
        sort : sequence of (field, direction), optional
            Overrides the order (priority, then oldest first); TensorLayer's ``time`` field is
            accepted as the submission time.
        free_slots, free_gpus : int, optional
            Claim only a job asking for at most this many slots / GPUs (jobs stored without
            ``resources`` ask for 1 slot and no GPU); None: no bound.
        """
        query: dict[str, Any] = {"status": JobStatus.PENDING, "cancel_requested": False}
        if name is not None:
            query["name"] = name
        fitting = _fitting(free_slots, free_gpus)
        if fitting:
            query["$and"] = fitting
        order = [("submitted_at" if key == "time" else key, direction) for key, direction in sort or CLAIM_ORDER]
        now, started = _now(), time.monotonic()
        job = self.collection.find_one_and_update(
            query,
            {
                "$set": {
                    "status": JobStatus.RUNNING,
                    "worker": worker,
                    "host": socket.gethostname(),
                    "lease_until": now + timedelta(seconds=lease_seconds),
                    "started_at": now,
                    "error": None,
                },
                "$inc": {"attempts": 1},
            },
            sort=order,
            return_document=ReturnDocument.AFTER,
        )
        metrics.observe_claim(time.monotonic() - started, job)
        if job is not None:
            self.event(job["_id"], JobEvent.CLAIMED, attempt=job["attempts"], worker=worker)
        return cast(JobDocument | None, job)

    def heartbeat(self, job_id: str, worker: str, lease_seconds: float) -> dict[str, Any] | None:
        """Extend the lease; returns the job (check ``cancel_requested``), or None if the lease was lost."""
        return self.collection.find_one_and_update(
            {"_id": job_id, "status": JobStatus.RUNNING, "worker": worker},
            {"$set": {"lease_until": _now() + timedelta(seconds=lease_seconds)}},
            projection={"cancel_requested": 1, "attempts": 1},
            return_document=ReturnDocument.AFTER,
        )

    def record_progress(self, job_id: str, worker: str, **progress: Any) -> bool:
        """Record how far the job is; returns whether a cancel was requested meanwhile, so a runner
        that records progress each epoch stops at the epoch's end rather than at the next heartbeat."""
        job = self.collection.find_one_and_update(
            {"_id": job_id, "worker": worker, "status": JobStatus.RUNNING},
            {"$set": {f"progress.{key}": value for key, value in progress.items()}},
            projection={"cancel_requested": 1},
        )
        return bool(job and job.get("cancel_requested"))

    def record_checkpoint(self, job_id: str, worker: str, epoch: int, model_version: int) -> None:
        """The last epoch whose parameters are saved: a re-run resumes after it."""
        self.collection.update_one(
            {"_id": job_id, "worker": worker, "status": JobStatus.RUNNING},
            {"$set": {"checkpoint": {"epoch": epoch, "model_version": model_version, "at": _now()}}},
        )

    def finish(self, job_id: str, worker: str, result: Mapping[str, Any] | None = None) -> bool:
        return self._end(job_id, worker, JobStatus.FINISHED, {"result": dict(result or {})})

    def cancelled(self, job_id: str, worker: str) -> bool:
        return self._end(job_id, worker, JobStatus.CANCELLED, {})

    def fail(self, job_id: str, worker: str, error: BaseException | str, retryable: bool = True) -> JobStatus | Literal["lost"]:
        """Record a failure; re-queue the job if attempts remain. Returns the new status, or :data:`LOST`."""
        failure = {"error": {**self._readable(error), "at": _now(), "worker": worker}}
        job = self.collection.find_one(
            {"_id": job_id, "worker": worker, "status": JobStatus.RUNNING}, {"attempts": 1, "max_attempts": 1}
        )
        if job is None:
            return LOST
        if retryable and job["attempts"] < job["max_attempts"]:
            return (
                JobStatus.PENDING
                if self._requeue({"_id": job_id, "worker": worker, "status": JobStatus.RUNNING}, failure, JobEvent.RETRYING)
                else LOST
            )
        return JobStatus.FAILED if self._end(job_id, worker, JobStatus.FAILED, failure) else LOST

    def release(self, job_id: str, worker: str) -> bool:
        """Hand a running job back to the queue without spending an attempt (worker shutdown)."""
        failure = {
            "error": {
                "message": f"worker {worker} shut down; the job was handed back",
                "traceback": "",
                "at": _now(),
                "worker": worker,
            }
        }
        return self._requeue(
            {"_id": job_id, "worker": worker, "status": JobStatus.RUNNING}, failure, JobEvent.REQUEUED, refund_attempt=True
        )

    def requeue_expired(self) -> builtins.list[str]:
        """The reaper: jobs whose lease expired (their worker died) go back to pending, or fail
        when out of attempts. Safe to run in every worker at once."""
        requeued: builtins.list[str] = []
        while True:
            expired = {"status": JobStatus.RUNNING, "lease_until": {"$lt": _now()}}
            job = self.collection.find_one(expired, {"attempts": 1, "max_attempts": 1, "worker": 1})
            if job is None:
                return requeued
            failure = {
                "error": {
                    "message": f"lease expired: worker {job['worker']} stopped heartbeating",
                    "traceback": "",
                    "at": _now(),
                    "worker": job["worker"],
                }
            }
            guard = {**expired, "_id": job["_id"], "worker": job["worker"]}
            if job["attempts"] < job["max_attempts"]:
                if self._requeue(guard, failure, JobEvent.REQUEUED):
                    requeued.append(job["_id"])
            else:
                ended = self.collection.find_one_and_update(
                    guard, {"$set": {"status": JobStatus.FAILED, "finished_at": _now(), "lease_until": None, **failure}}
                )
                if ended is not None:
                    self.event(
                        job["_id"], JobEvent.FAILED, attempt=job["attempts"], detail={"reason": failure["error"]["message"]}
                    )

    # -- internals ---------------------------------------------------------------------------
    def _readable(self, error: BaseException | str) -> dict[str, str]:
        """A failure's ``message`` and ``traceback`` as stored for everyone who reads jobs: in
        TensorDB's terms (:func:`describe_job_error`), driver objects' reprs shortened, and every
        secret of this process's settings (or named as one) masked."""
        secrets = secret_values(self.store.settings)
        if isinstance(error, str):
            return {"message": mask_text(error, secrets), "traceback": ""}
        trace = "".join(traceback_module.format_exception(error))
        return {"message": mask_text(describe_job_error(error), secrets), "traceback": mask_text(_short_reprs(trace), secrets)}

    def _requeue(self, guard: dict[str, Any], failure: dict[str, Any], event: JobEvent, refund_attempt: bool = False) -> bool:
        update: dict[str, Any] = {
            "$set": {"status": JobStatus.PENDING, "worker": None, "lease_until": None, **failure},
            "$push": {"history": failure["error"]},
        }
        if refund_attempt:
            update["$inc"] = {"attempts": -1}
        job = self.collection.find_one_and_update(guard, update, return_document=ReturnDocument.AFTER)
        if job is None:
            return False
        self._announce(job, event, {"reason": failure["error"]["message"]})
        return True

    def _announce(self, job: Mapping[str, Any], event: JobEvent, detail: dict[str, Any]) -> None:
        """Ring the workers' doorbell for a job that is pending again, and publish ``event``."""
        request = {
            "schema": records.Schema.JOB_REQUEST, "job_id": job["_id"], "kind": job["kind"], "name": job["name"],
            "priority": job["priority"], "max_attempts": job["max_attempts"], "resources": dict(resources_of(job)),
            "submitted_at": _now().isoformat(),
        }  # fmt: skip

        def announce() -> None:
            self.publisher.publish(Topic.JOB_REQUESTS, request, key=job["_id"])
            self.event(job["_id"], event, attempt=job["attempts"], detail=detail)

        self._deliver(announce)

    def _end(self, job_id: str, worker: str, status: JobStatus, fields: dict[str, Any]) -> bool:
        job = self.collection.find_one_and_update(
            {"_id": job_id, "worker": worker, "status": JobStatus.RUNNING},
            {"$set": {"status": status, "finished_at": _now(), "lease_until": None, **fields}},
            return_document=ReturnDocument.AFTER,
        )
        if job is None:
            return False
        detail = {"error": fields["error"]["message"]} if "error" in fields else {}
        self._deliver(lambda: self.event(job_id, JobEvent(status), attempt=job["attempts"], worker=worker, detail=detail))
        return True

    def _deliver(self, publish: Callable[[], None]) -> None:
        """Queue records (``publish``) and wait for their acknowledgement; publish them once more
        if the first flush failed (the publisher then replaced its producer, dropping them: a
        broker that restarted and forgot it), so that the event of a change already made in
        MongoDB is not lost to one broker restart."""
        publish()
        try:
            self.publisher.flush()
        except DeliveryError:
            publish()
            self.publisher.flush()

    def event(
        self,
        job_id: str,
        event: JobEvent,
        attempt: int,
        worker: str | None = None,
        detail: dict[str, Any] | None = None,
        wait: bool = False,
    ) -> None:
        """Publish a job event for dashboards and the processors.

        Parameters
        ----------
        job_id, event, attempt, worker, detail
            What the event says.
        wait : bool
            Return once the broker acknowledged it (publishing it again if a failed producer
            dropped it), as a worker does before it runs a job: a producer that a restarted broker
            no longer acknowledges is then replaced before the job's own records need it, rather
            than failing the attempt. Otherwise it is only queued.
        """
        if wait:
            self._deliver(lambda: self.event(job_id, event, attempt, worker, detail))
            return
        record: dict[str, Any] = {
            "schema": records.Schema.JOB_EVENT,
            "job_id": job_id,
            "event": event,
            "attempt": attempt,
            "at": _now().isoformat(),
        }
        if worker:
            record["worker"] = worker
        if detail:
            record["detail"] = detail
        self.publisher.publish(Topic.JOB_EVENTS, record, key=job_id)
