"""``TensorHub``: TensorLayer's ``tl.db.TensorHub`` API on TensorDB, so existing scripts run unchanged.

Both spellings TensorLayer users have in their scripts work (the documented ``find_all_datasets``
and the 2.x code's ``find_datasets``, ``find_top_model``, ``run_top_task``...). What changes
underneath: credentials are used (TensorLayer ignored them), models load from Keras JSON and
``.npz`` (never unpickled), logs are sent without blocking, and tasks run as subprocesses on the
worker, claimed atomically, so a crashed runner's task is requeued instead of lost.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import quote_plus

from tensordb.client import TensorDB
from tensordb.config import Settings
from tensordb.infra import versioning
from tensordb.infra.bus import create_topics
from tensordb.runs.runlog import RunLogger
from workers.trainer import Worker

#: Logs saved through TensorHub belong to this run unless a ``run_id=`` is given.
DEFAULT_RUN = "tensorhub"
_PHASES = {"training": "train", "validation": "validation", "testing": "test"}


def uri_from_parts(ip: str, port: int, username: str | None, password: str | None) -> str:
    """A MongoDB URI from TensorLayer's connection arguments (credentials escaped, never dropped)."""
    credentials = f"{quote_plus(username)}:{quote_plus(password or '')}@" if username else ""
    return f"mongodb://{credentials}{ip}:{int(port)}/"


def _dataset_name(name: str | None) -> str:
    """TensorLayer's ``dataset_name`` defaults to None, but a dataset needs a name (QueryError)."""
    return versioning.check_name(name, "dataset")


class TensorHub(TensorDB):
    """``TensorHub(ip='localhost', port=27017, dbname='temp', username=None, password=None,
    project_name='tutorial')``, or ``TensorHub(mongo_uri=...)``. Arguments left out come from the
    settings (``TENSORDB_MONGO_URI``, ``TENSORDB_MONGO_DATABASE``, ``TENSORDB_PROJECT``); Kafka
    always does (``TENSORDB_KAFKA_BOOTSTRAP``, default 127.0.0.1:9092, which ``tensordb services up``
    serves). The project's topics are created if missing."""

    def __init__(
        self,
        ip: str | None = None,
        port: int | None = None,
        dbname: str | None = None,
        username: str | None = None,
        password: str | None = None,
        project_name: str | None = None,
        *,
        mongo_uri: str | None = None,
        settings: Settings | None = None,
        **overrides: Any,
    ) -> None:
        changes: dict[str, Any] = dict(overrides)
        if mongo_uri or ip or port or username:
            changes["mongo_uri"] = mongo_uri or uri_from_parts(ip or "localhost", port or 27017, username, password)
        if dbname:
            changes["mongo_database"] = dbname
        if project_name:
            changes["project"] = project_name
        super().__init__(settings, **changes)
        create_topics(self.settings)  # TensorLayer scripts never ran `tensordb topics create`
        self.project_name = self.settings.project
        self._loggers: dict[tuple[str, str], RunLogger] = {}
        self._task_worker: Any = None

    # -- datasets --------------------------------------------------------------------------------
    def save_dataset(self, dataset: Any = None, dataset_name: str | None = None, **kwargs: Any) -> dict[str, Any]:
        return super().save_dataset(dataset, _dataset_name(dataset_name), **kwargs)

    def find_top_dataset(self, dataset_name: str | None = None, sort: list | None = None, **kwargs: Any) -> Any:
        return self.datasets.find(_dataset_name(dataset_name), sort=sort, **kwargs)

    def find_dataset(self, dataset_name: str | None = None, sort: list | None = None, **kwargs: Any) -> Any:
        return self.find_top_dataset(dataset_name, sort, **kwargs)

    def find_datasets(self, dataset_name: str | None = None, **kwargs: Any) -> list[Any]:
        return self.datasets.find_all(_dataset_name(dataset_name), **kwargs)

    find_all_datasets = find_datasets

    # -- models ------------------------------------------------------------------------------------
    def save_model(self, network: Any = None, model_name: str = "model", /, **kwargs: Any) -> dict[str, Any]:
        """TensorLayer's ``save_model(network=None, model_name="model", **kwargs)``, each argument by
        position or keyword (``model=``, TensorDB's word for the network, too). The parameters are
        positional-only so that this override accepts every call of :meth:`TensorDB.save_model`."""
        network = kwargs.pop("network", kwargs.pop("model", network))
        model_name = kwargs.pop("model_name", model_name)
        return super().save_model(network, model_name, **kwargs)

    def find_top_model(self, sort: list | None = None, model_name: str | None = None, **kwargs: Any) -> Any:
        """The best model by ``sort`` (e.g. ``[("test_accuracy", -1)]``) as a Keras model; its
        document is ``model.tensordb_info``. TensorLayer's ``sess`` argument is accepted and unused."""
        kwargs.pop("sess", None)
        return self.models.find(sort, name=model_name, **kwargs)

    find_model = find_top_model

    def find_models(self, sort: list | None = None, model_name: str | None = None, **kwargs: Any) -> list[Any]:
        """Every matching model (Keras models, best first by ``sort``)."""
        kwargs.pop("sess", None)
        infos = self.models.find_infos(sort, name=model_name, **kwargs)
        return [self.models.load(info) for info in infos]

    def delete_model(self, **kwargs: Any) -> int:
        if "model_name" in kwargs:
            kwargs["name"] = kwargs.pop("model_name")
        return self.models.delete(**kwargs)

    # -- logs --------------------------------------------------------------------------------------
    def _log(self, phase: str, kwargs: dict[str, Any]) -> None:
        run_id = str(kwargs.pop("run_id", DEFAULT_RUN))
        logger = self._loggers.get((run_id, phase))
        if logger is None:
            logger = self._loggers[(run_id, phase)] = self.logger(run_id)
        logger.log(kwargs.pop("step", None), phase=phase, epoch=kwargs.pop("epoch", None), **kwargs)

    def save_training_log(self, **kwargs: Any) -> None:
        self._log("train", kwargs)

    def save_validation_log(self, **kwargs: Any) -> None:
        self._log("validation", kwargs)

    def save_testing_log(self, **kwargs: Any) -> None:
        self._log("test", kwargs)

    def _delete_logs(self, phase: str, kwargs: dict[str, Any]) -> int:
        for logger in self._loggers.values():
            logger.wait_persisted(self.store)  # what this process logged is stored before it is deleted
        run_id = kwargs.pop("run_id", None)
        return self.delete_logs(run_id, phase=phase, metrics=kwargs or None)

    def delete_training_log(self, **kwargs: Any) -> int:
        return self._delete_logs("train", kwargs)

    def delete_validation_log(self, **kwargs: Any) -> int:
        return self._delete_logs("validation", kwargs)

    def delete_testing_log(self, **kwargs: Any) -> int:
        return self._delete_logs("test", kwargs)

    # -- tasks -------------------------------------------------------------------------------------
    def create_task(
        self,
        task_name: str | None = None,
        script: str | None = None,
        hyper_parameters: dict[str, Any] | None = None,
        saved_result_keys: Iterable[str] | None = None,
        description: str = "",
        **kwargs: Any,
    ) -> str:
        """Queue ``script`` (a path on the runners) with its hyper-parameters; returns the job id."""
        return self.jobs.submit(
            "task", name=task_name, script=script, hyperparameters=hyper_parameters or {},
            save_keys=list(saved_result_keys or []), description=description, max_attempts=kwargs.pop("max_attempts", 1), **kwargs,
        )  # fmt: skip

    def check_unfinished_task(self, task_name: str | None = None, **kwargs: Any) -> bool:
        return self.jobs.unfinished(task_name)

    def run_top_task(self, task_name: str | None = None, sort: list | None = None, **kwargs: Any) -> bool:
        """Claim and run one pending task in this process (TensorLayer's runner loop calls this);
        returns whether a task ran. Failures are recorded on the task, not raised."""
        if self._task_worker is None:
            self._task_worker = Worker(self.settings)
        return self._task_worker.run_one(name=task_name, sort=sort)

    run_task = run_top_task

    def delete_tasks(self, **kwargs: Any) -> int:
        name = kwargs.pop("task_name", None)
        return self.jobs.delete(name, **kwargs)

    def close(self) -> None:
        for logger in self._loggers.values():
            logger.close()
        if self._task_worker is not None:
            self._task_worker.close()
        super().close()

