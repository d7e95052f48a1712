"""``TensorDB``: the user-facing SDK for one project — publish samples, manage datasets, define and
stream cohorts, log runs, register models and submit jobs.

    with TensorDB(project="radiology") as db:
        db.publish_sample(image, dataset="scans", labels={"tumour": 1}, tags=["grade-3"])
        recent = db.cohort({"labels.tumour": 1}, limit=1000, x="x", y="tumour")
        model.fit(recent.to_tf_dataset(batch_size=64), epochs=3)
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from tensordb.config import Settings, Topic, load_settings
from tensordb.data import cohorts
from tensordb.data.cohorts import Cohort
from tensordb.data.datasets import Datasets
from tensordb.data.samples import ArrayLike, build_sample, publish_samples
from tensordb.infra.bus import Publisher
from tensordb.infra.store import Store
from tensordb.jobs.queue import JobDocument, JobKind, Jobs
from tensordb.jobs.workers import WorkerDocument, Workers
from tensordb.loop.policies import Policies
from tensordb.loop.promotion import evaluate_study_best
from tensordb.models.registry import ModelRegistry
from tensordb.runs.logger import RunLogger
from tensordb.runs.queries import delete_logs, read_logs
from tensordb.stages.spec import StageSpec
from tensordb.stages.stages import Stages
from tensordb.studies.studies import Studies, Study

#: How long :meth:`TensorDB.flush` and :meth:`TensorDB.close` wait by default for the broker's acknowledgements.
FLUSH_SECONDS = 60.0


class TensorDB:
    """One project's connection to Kafka and MongoDB. Close it (or use ``with``) to flush.

    Parameters
    ----------
    settings : Settings, optional
        Where the servers are and which project this is; default: the ``TENSORDB_*`` variables
        (and ``TENSORDB_CONFIG``), see :class:`tensordb.config.Settings`.
    **overrides
        Settings to change, e.g. ``project="radiology"``, ``mongo_uri=...``.

    Raises ``ConfigurationError`` when a setting is malformed or MongoDB rejects the credentials,
    ``DatabaseVersionError`` when the database needs ``tensordb db upgrade``.
    Kafka is connected on first use: reading data needs MongoDB only.
    """

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        self.settings = settings.with_changes(**overrides) if settings else load_settings(**overrides)
        self.store = Store(self.settings)
        try:
            self.store.ensure_indexes()  # raises ConfigurationError when MongoDB rejects the credentials
        except BaseException:
            self.store.close()
            raise
        self._publisher: Publisher | None = None
        self._loggers: weakref.WeakSet[RunLogger] = weakref.WeakSet()  # closed before the publisher
        self._models: ModelRegistry | None = None
        self._studies: Studies | None = None
        self.datasets = Datasets(self.store)

    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:  # created on first use: reading data needs no Kafka connection
            self._publisher = Publisher(self.settings)
        return self._publisher

    @property
    def models(self) -> ModelRegistry:
        if self._models is None:
            self._models = ModelRegistry(self.store, self.publisher)
        return self._models

    @property
    def jobs(self) -> Jobs:
        return Jobs(self.store, self.publisher)

    # -- publishing samples ---------------------------------------------------------------------
    def publish_sample(self, arrays: ArrayLike, *, dataset: str, **fields: Any) -> str:
        """Queue one sample for ingestion and return its id without waiting for the broker.

        Call :meth:`flush` (or close) to wait until every queued sample is acknowledged; the ingest
        processor stores it (or dead-letters it with the reason).

        Parameters
        ----------
        arrays : array or dict of str to array
            The sample's arrays; one array is named ``x``. Arrays past ``TENSORDB_INLINE_LIMIT_BYTES``
            go to GridFS first and the record carries a reference.
        dataset : str
            The dataset it belongs to.
        **fields
            ``labels`` (one value, named ``y``, or a dict), ``metadata`` (a dict to query on),
            ``tags`` (strings), ``version``, ``sample_id`` (default: derived from the content, so a
            re-send is stored once) and ``source``.
        """
        record = build_sample(self.store, arrays, dataset=dataset, **fields)
        self.publisher.publish(Topic.INGEST, record, key=record["sample_id"])
        return record["sample_id"]

    def publish_samples(self, samples: Iterable[Mapping[str, Any]]) -> list[str]:
        """Publish many samples and wait until the broker acknowledged them all; returns their ids.

        Parameters
        ----------
        samples : iterable of mappings
            Each has ``arrays``, ``dataset`` and the optional fields of :meth:`publish_sample`.
        """
        return publish_samples(self.publisher, self.store, samples)

    def flush(self, timeout: float = FLUSH_SECONDS) -> None:
        """Wait up to ``timeout`` seconds until the broker acknowledged everything published so far."""
        if self._publisher is not None:
            self._publisher.flush(timeout)

    # -- cohorts --------------------------------------------------------------------------------
    def cohort(self, filter: Mapping[str, Any] | None = None, **options: Any) -> Cohort:
        """A cohort over this project's samples, resolved each time it is read ("the last 1000" moves).

        Parameters
        ----------
        filter : mapping, optional
            A MongoDB query on the samples, e.g. ``{"labels.tumour": {"$exists": True}}``; server-side
            JavaScript and ``$expr`` are refused.
        **options
            ``sort`` (default newest first), ``limit``, ``x`` (the array to yield, default ``"x"``) and
            ``y`` (the label, default ``"y"``; None for none).
        """
        return Cohort(self.store, filter=dict(filter or {}), **options)

    def save_cohort(self, name: str, cohort: Cohort, description: str = "") -> Cohort:
        """Save ``cohort``'s query (not its samples) under ``name``, for jobs and policies to name."""
        return cohorts.save_cohort(cohort, name, description)

    def find_cohort(self, name: str) -> Cohort:
        """The cohort saved as ``name``."""
        return cohorts.load_cohort(self.store, name)

    def list_cohorts(self) -> list[dict[str, Any]]:
        """The saved cohorts' documents."""
        return cohorts.list_cohorts(self.store)

    def delete_cohort(self, name: str) -> bool:
        """Delete the cohort saved as ``name``; returns whether there was one."""
        return cohorts.delete_cohort(self.store, name)

    # -- whole datasets (TensorLayer's API) --------------------------------------------------------
    def save_dataset(self, dataset: Any, dataset_name: str, **meta: Any) -> dict[str, Any]:
        """Save a whole dataset under a name; returns its document.

        Parameters
        ----------
        dataset : array or tuple, list or dict of arrays
            E.g. ``(X_train, y_train, X_test, y_test)``; it comes back in the same structure.
        dataset_name : str
            Its name; several saves of one name are all kept, the newest found first.
        **meta
            Fields to filter and sort on, e.g. ``description=``; ``version=`` (default 1, 2, 3...).
        """
        return self.datasets.save(dataset, dataset_name, **meta)

    def find_dataset(self, dataset_name: str, **filters: Any) -> Any:
        """The newest dataset of that name matching ``filters`` (``version=``, ``sort=``, metadata), or None."""
        return self.datasets.find(dataset_name, **filters)

    def find_all_datasets(self, dataset_name: str, **filters: Any) -> list[Any]:
        """Every dataset of that name matching ``filters`` (metadata equalities), oldest first."""
        return self.datasets.find_all(dataset_name, **filters)

    def delete_datasets(self, dataset_name: str | None = None, **filters: Any) -> int:
        """Delete the matching datasets and their arrays (no name and no filters: all); returns how many."""
        return self.datasets.delete(dataset_name, **filters)

    delete_dataset = delete_datasets

    # -- runs: non-blocking logging ---------------------------------------------------------------
    def logger(self, run_id: str, job_id: str | None = None, **tags: Any) -> RunLogger:
        """A logger whose ``log(step, **metrics)`` returns without waiting on the network.

        Parameters
        ----------
        run_id : str
            The run the records belong to (one chart per metric in the dashboard).
        job_id : str, optional
            The job doing the run, if any.
        **tags
            Stored with every record, to filter on in :meth:`read_logs`.
        """
        logger = RunLogger(self.publisher, run_id, job_id=job_id, tags=tags or None)
        self._loggers.add(logger)
        return logger

    def read_logs(self, run_id: str | None = None, **filters: Any) -> Any:
        """Stored log records as a pandas DataFrame, one row per (run, phase, step).

        Parameters
        ----------
        run_id : str or iterable of str, optional
            The run(s); default: all.
        **filters
            ``job_id``, ``phase``, ``steps``, ``metrics``, ``as_numpy`` and tag equalities: see
            :func:`tensordb.runs.queries.read_logs`.
        """
        return read_logs(self.store, run_id, **filters)

    def delete_logs(self, run_id: str | None = None, **filters: Any) -> int:
        """Delete the log records matching the filters (as :meth:`read_logs`; none: all); returns how many."""
        return delete_logs(self.store, run_id, **filters)

    # -- models -------------------------------------------------------------------------------------
    def save_model(self, model: Any, name: str = "model", **metrics_and_tags: Any) -> dict[str, Any]:
        """Register ``model`` as the next version of ``name`` (Keras JSON + ``.npz`` parameters); returns its document.

        Parameters
        ----------
        model : keras.Model
            The model; it is never pickled.
        name : str
            The model's name in the registry; versions count 1, 2, 3... per name.
        **metrics_and_tags
            Numbers are metrics (``accuracy=0.8``), anything else tags; both can be filtered and sorted on.
            Also ``epoch``, ``job_id``, ``lineage``, ``builder``: see :meth:`ModelRegistry.save`.
        """
        return self.models.save(model, name, **metrics_and_tags)

    def find_model(self, sort: list[tuple[str, int]] | None = None, **filters: Any) -> Any:
        """The best (by ``sort``) or newest matching model, ready to predict; None if none matches.

        Parameters
        ----------
        sort : list of (field, direction), optional
            E.g. ``[("accuracy", -1)]``; default: the newest.
        **filters
            ``name``, ``version``, ``alias`` (``"production"``, with ``name``) and field equalities.

        The model's document is ``model.tensordb_info``.
        """
        return self.models.find(sort, **filters)

    def delete_model(self, **filters: Any) -> int:
        """Delete the matching versions (``name=``, field equalities; none: all) and their parameters; returns how many."""
        return self.models.delete(**filters)

    # -- jobs ---------------------------------------------------------------------------------------
    def submit_job(self, kind: str = JobKind.TRAIN, **spec: Any) -> str:
        """Queue a job for the workers; returns its id.

        Parameters
        ----------
        kind : {"train", "evaluate", "task"}
            What to run.
        **spec
            ``name``, ``model``, ``data``, ``hyperparameters``, ``epochs``, ``priority``,
            ``max_attempts``, ``script``, ``slots``, ``gpus``...: see :meth:`tensordb.jobs.queue.Jobs.submit`.
        """
        return self.jobs.submit(kind, **spec)

    def cancel_job(self, job_id: str) -> JobDocument:
        """Cancel a pending job now, or ask a running one to stop at its next step; returns its document."""
        return self.jobs.cancel(job_id)

    def wait_for_jobs(self, job_ids: Iterable[str], timeout: float = 600.0) -> list[JobDocument]:
        """Block until every job has ended (``JobError`` after ``timeout`` seconds); returns their documents."""
        return self.jobs.wait(job_ids, timeout)

    def list_jobs(self, status: str | Iterable[str] | None = None, name: str | None = None, **filters: Any) -> list[JobDocument]:
        """Jobs newest first, by status (one or several), name and field equalities."""
        return self.jobs.list(status, name, **filters)

    def workers(self) -> list[WorkerDocument]:
        """The running workers (seen in the last 15 s), oldest first: their slots and GPUs, what is busy, the jobs they run."""
        return Workers(self.store).list()

    # -- studies ------------------------------------------------------------------------------------
    @property
    def studies(self) -> Studies:
        if self._studies is None:
            self._studies = Studies(self.store, self.publisher)
        return self._studies

    def create_study(self, spec: Mapping[str, Any] | None = None, **fields: Any) -> Study:
        """Create a hyper-parameter study (or k-fold experiment) and submit its first trials.

        Parameters
        ----------
        spec : mapping, optional
            The study as JSON (see :mod:`tensordb.studies.spec`); ``fields`` are merged over it.
        **fields
            ``name``, ``model``, ``data``, ``validation`` or ``folds``, ``space``, ``searcher``,
            ``objective``, ``epochs``, ``max_trials``, ``max_concurrent``, ``seed``...

        Raises ``StudySpecError`` (what to fix), ``UntrustedCodeError`` and ``StudyError`` (name taken).
        The scheduler runs in ``tensordb processors``; trials run on ``tensordb worker``.
        """
        created = self.studies.create({**(spec or {}), **fields})
        return Study(self.studies, created.name)

    def study(self, name: str) -> Study:
        """A handle on an existing study (``StudyNotFoundError`` if there is none)."""
        return Study(self.studies, name)

    def list_studies(self) -> list[dict[str, Any]]:
        """Every study of the project, newest first, with its status and trial counts."""
        return self.studies.list()

    # -- transform stages -----------------------------------------------------------------------------
    @property
    def stages(self) -> Stages:
        """The project's transform stages (pause, resume, delete, counters, backfill state)."""
        return Stages(self.store)

    def register_stage(self, spec: Mapping[str, Any] | None = None, **fields: Any) -> StageSpec:
        """Register a transform stage, or a new version of one; the processors run it on new samples.

        Parameters
        ----------
        spec : mapping, optional
            The stage as JSON (see :mod:`tensordb.stages.spec`); ``fields`` are merged over it.
        **fields
            ``name``, ``version``, ``input`` (``{"filter": {...}}``), ``function`` (``"pkg.mod:fn"``,
            trusted), ``output`` (``{"dataset": ...}``), ``description``.
        """
        return self.stages.register({**(spec or {}), **fields})

    def backfill_stage(self, name: str) -> dict[str, Any]:
        """Ask the processors to apply the stage's current version to the samples stored before it;
        returns the stage with its ``backfill`` state (``done`` of ``total``)."""
        return self.stages.request_backfill(name)

    def evaluate_study_best(self, study: str, policy: str) -> str | None:
        """Submit the evaluation of a finished study's best version against the policy's production
        model; the policy's promotion rule then decides, as for any candidate. Returns the job id.

        The study must have been created with ``model_name`` = the policy's name.
        """
        return evaluate_study_best(self.jobs, self.models, self.studies, Policies(self.store).get(policy), study)

    def close(self) -> None:
        """Close the run loggers this client made (what they hold is published), wait for model
        uploads, flush what is queued, close the connections."""
        try:
            for logger in list(self._loggers):
                logger.close()
            if self._models is not None:
                self._models.close()
            if self._publisher is not None:
                self._publisher.close(FLUSH_SECONDS)
        finally:
            self.store.close()

    def __enter__(self) -> TensorDB:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
