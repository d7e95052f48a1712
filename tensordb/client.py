"""``TensorDB``: the user-facing SDK for one project — publish samples, manage datasets, define and
stream cohorts, log runs, register models and submit jobs.

    with TensorDB(project="radiology") as db:
        db.publish_sample(image, dataset="scans", labels={"tumour": 1}, tags=["grade-3"])
        recent = db.cohort({"labels.tumour": 1}, limit=1000, x="x", y="tumour")
        model.fit(recent.to_tf_dataset(batch_size=64), epochs=3)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pymongo.errors import OperationFailure

from tensordb.config import Settings, Topic, load_settings
from tensordb.data import cohorts
from tensordb.data.cohorts import Cohort
from tensordb.data.datasets import Datasets
from tensordb.data.samples import ArrayLike, build_sample, publish_samples
from tensordb.errors import ConfigurationError
from tensordb.infra.bus import Publisher
from tensordb.infra.store import Store
from tensordb.jobs.queue import JobDocument, Jobs
from tensordb.models.registry import ModelRegistry
from tensordb.runs.runlog import RunLogger, delete_logs, read_logs

AUTHENTICATION_FAILED = 18  # MongoDB's error code


class TensorDB:
    """One project's connection to Kafka and MongoDB. Close it (or use ``with``) to flush."""

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        self.settings = settings.with_changes(**overrides) if settings else load_settings(**overrides)
        self.store = Store(self.settings)
        try:
            self.store.ensure_indexes()
        except OperationFailure as exc:
            self.store.close()
            if exc.code == AUTHENTICATION_FAILED:
                raise ConfigurationError(
                    "MongoDB rejected the username or password: check them (and the authSource in the URI)"
                ) from exc
            raise
        self._publisher: Publisher | None = None
        self._models: ModelRegistry | None = None
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

        ``fields``: ``labels``, ``metadata``, ``tags``, ``version``, ``sample_id``, ``source``.
        Call :meth:`flush` (or close) to wait until every queued sample is acknowledged.
        """
        record = build_sample(self.store, arrays, dataset=dataset, **fields)
        self.publisher.publish(Topic.INGEST, record, key=record["sample_id"])
        return record["sample_id"]

    def publish_samples(self, samples: Iterable[Mapping[str, Any]]) -> list[str]:
        """Publish many samples (dicts with ``arrays``, ``dataset`` and optional fields) and flush."""
        return publish_samples(self.publisher, self.store, samples)

    def flush(self, timeout: float = 60.0) -> None:
        if self._publisher is not None:
            self._publisher.flush(timeout)

    # -- cohorts --------------------------------------------------------------------------------
    def cohort(self, filter: Mapping[str, Any] | None = None, **options: Any) -> Cohort:
        """A cohort over this project's samples: ``filter`` plus ``sort``, ``limit``, ``x``, ``y``."""
        return Cohort(self.store, filter=dict(filter or {}), **options)

    def save_cohort(self, name: str, cohort: Cohort, description: str = "") -> Cohort:
        return cohorts.save_cohort(cohort, name, description)

    def find_cohort(self, name: str) -> Cohort:
        return cohorts.load_cohort(self.store, name)

    def list_cohorts(self) -> list[dict[str, Any]]:
        return cohorts.list_cohorts(self.store)

    def delete_cohort(self, name: str) -> bool:
        return cohorts.delete_cohort(self.store, name)

    # -- whole datasets (TensorLayer's API) --------------------------------------------------------
    def save_dataset(self, dataset: Any, dataset_name: str, **meta: Any) -> dict[str, Any]:
        return self.datasets.save(dataset, dataset_name, **meta)

    def find_dataset(self, dataset_name: str, **filters: Any) -> Any:
        return self.datasets.find(dataset_name, **filters)

    def find_all_datasets(self, dataset_name: str, **filters: Any) -> list[Any]:
        return self.datasets.find_all(dataset_name, **filters)

    def delete_datasets(self, dataset_name: str | None = None, **filters: Any) -> int:
        return self.datasets.delete(dataset_name, **filters)

    delete_dataset = delete_datasets

    # -- runs: non-blocking logging ---------------------------------------------------------------
    def logger(self, run_id: str, job_id: str | None = None, **tags: Any) -> RunLogger:
        """A logger whose ``log(step=..., **metrics)`` returns without waiting on the network."""
        return RunLogger(self.publisher, run_id, job_id=job_id, tags=tags or None)

    def read_logs(self, run_id: str | None = None, **filters: Any) -> Any:
        """Persisted log records as a pandas DataFrame (see :func:`tensordb.runs.runlog.read_logs`)."""
        return read_logs(self.store, run_id, **filters)

    def delete_logs(self, run_id: str | None = None, **filters: Any) -> int:
        return delete_logs(self.store, run_id, **filters)

    # -- models -------------------------------------------------------------------------------------
    def save_model(self, model: Any, name: str = "model", **metrics_and_tags: Any) -> dict[str, Any]:
        """Register ``model`` as the next version of ``name`` (architecture JSON + .npz parameters)."""
        return self.models.save(model, name, **metrics_and_tags)

    def find_model(self, sort: list[tuple[str, int]] | None = None, **filters: Any) -> Any:
        """The best (by ``sort``) or newest matching model, ready to predict; None if none matches."""
        return self.models.find(sort, **filters)

    def delete_model(self, **filters: Any) -> int:
        return self.models.delete(**filters)

    # -- jobs ---------------------------------------------------------------------------------------
    def submit_job(self, kind: str = "train", **spec: Any) -> str:
        """Queue a train/evaluate/task job for the workers; see :meth:`tensordb.jobs.queue.Jobs.submit`."""
        return self.jobs.submit(kind, **spec)

    def cancel_job(self, job_id: str) -> JobDocument:
        return self.jobs.cancel(job_id)

    def wait_for_jobs(self, job_ids: Iterable[str], timeout: float = 600.0) -> list[JobDocument]:
        return self.jobs.wait(job_ids, timeout)

    def list_jobs(self, status: str | Iterable[str] | None = None, name: str | None = None, **filters: Any) -> list[JobDocument]:
        return self.jobs.list(status, name, **filters)

    def close(self) -> None:
        try:
            if self._models is not None:
                self._models.close()
            self.flush()
        finally:
            self.store.close()

    def __enter__(self) -> TensorDB:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
