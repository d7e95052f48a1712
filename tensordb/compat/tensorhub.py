"""``TensorHub``: TensorLayer's ``tl.db.TensorHub`` API on TensorDB, so existing scripts run unchanged.

TensorLayer's signatures are kept: argument names, order, defaults and return values (``True``
from a save, ``False`` when nothing is found). Both spellings TensorLayer users have in their
scripts work (the documented ``find_all_datasets``, ``find_model``, ``run_task`` and the 2.x code's
``find_datasets``, ``find_top_model``, ``run_top_task``...). TensorFlow 1's ``sess`` is accepted and
ignored: models are Keras models. What changes underneath: credentials are used (TensorLayer ignored
them), a failed save raises instead of returning ``False``, models load from Keras JSON and ``.npz``
(never unpickled), logs are sent without blocking, and tasks run as subprocesses on the worker,
claimed atomically, so a crashed runner's task is requeued instead of lost.

``TensorHub`` wraps the SDK rather than extending it: the two APIs give the same method names
different signatures (``find_model(sess, sort, model_name)`` here, ``find_model(sort, **filters)``
there). The SDK underneath is ``hub.tensordb``, for what TensorLayer's API lacks (cohorts, policies).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote_plus

from tensordb.client import TensorDB
from tensordb.config import Settings
from tensordb.data import datasets
from tensordb.data.datasets import Dataset, Datasets
from tensordb.errors import JobError, QueryError
from tensordb.infra.bus import create_topics
from tensordb.jobs.queue import UNFINISHED, Jobs
from tensordb.models import registry
from tensordb.models.registry import ModelRegistry
from tensordb.runs.logger import RunLogger

if TYPE_CHECKING:
    import keras

    from workers.trainer import Worker

#: Logs saved through TensorHub belong to this run unless a ``run_id=`` is given.
DEFAULT_RUN = "tensorhub"
#: Where TensorLayer metadata whose name TensorDB uses for something else is kept (see ``_Vocabulary``).
TENSORLAYER = "tensorlayer"
#: ``create_task`` keyword arguments a TensorDB job has a place for.
TASK_OPTIONS = frozenset({"description", "priority", "max_attempts", "job_id"})


def uri_from_parts(ip: str, port: int, username: str | None, password: str | None) -> str:
    """A MongoDB URI from TensorLayer's connection arguments (credentials escaped, never dropped)."""
    credentials = f"{quote_plus(username)}:{quote_plus(password or '')}@" if username else ""
    return f"mongodb://{credentials}{ip}:{int(port)}/"


@dataclass(frozen=True)
class _Vocabulary:
    """TensorLayer's field names for models or datasets, translated to TensorDB's documents.

    TensorLayer keys a model by ``model_name`` (a dataset by ``dataset_name``) and stores every other
    keyword argument as given, so ``save_model(net, name='second_model')`` is free-form metadata.
    TensorDB's documents use ``name`` for the key and reserve a few more fields; such metadata is
    kept under ``tensorlayer.`` and filters and sorts on it are redirected there, so a script's
    ``find_model(name='second_model')`` finds what it saved. ``_id`` and ``time`` mean the same in both.
    """

    key: str
    reserved: frozenset[str]

    def field(self, name: str) -> str:
        if name == self.key:
            return "name"
        if name in self.reserved and name not in ("_id", "time"):
            return f"{TENSORLAYER}.{name}"
        return name

    def stored(self, metadata: dict[str, Any]) -> dict[str, Any]:
        moved = {name: value for name, value in metadata.items() if self.field(name) != name}
        kept = {name: value for name, value in metadata.items() if name not in moved}
        return {**kept, TENSORLAYER: moved} if moved else kept

    def filters(self, filters: dict[str, Any]) -> dict[str, Any]:
        return {self.field(name): value for name, value in filters.items()}

    def sort(self, sort: list[tuple[str, int]] | None) -> list[tuple[str, int]] | None:
        return None if sort is None else [(self.field(name), direction) for name, direction in sort]


_MODELS = _Vocabulary("model_name", registry.RESERVED)
_DATASETS = _Vocabulary("dataset_name", datasets.RESERVED)


def _required(value: str | None, argument: str) -> str:
    if value is None:
        raise QueryError(f"{argument} is required, e.g. {argument}='mnist' (TensorLayer refuses None too)")
    return value


class TensorHub:
    """TensorLayer's database API for one project.

    Parameters
    ----------
    ip, port : str, int, optional
        MongoDB's address. Left out (with ``username`` and ``mongo_uri``), the settings' URI is used
        (``TENSORDB_MONGO_URI``, default ``mongodb://127.0.0.1:27017/``).
    dbname : str, optional
        The MongoDB database; default ``TENSORDB_MONGO_DATABASE``.
    username, password : str, optional
        MongoDB credentials, checked by the server (a wrong pair raises ``ConfigurationError``).
        No ``username``: no credentials, whatever ``password`` says (as in TensorLayer).
    project_name : str, optional
        The project: its data, models, logs and tasks are invisible to every other project.
        Default ``TENSORDB_PROJECT`` (TensorLayer defaulted to the script's name).
    mongo_uri : str, optional
        A whole MongoDB URI instead of ``ip``, ``port``, ``username`` and ``password``.
    settings : Settings, optional
        Base settings; default from the ``TENSORDB_*`` variables. Kafka's address always comes from
        them (``TENSORDB_KAFKA_BOOTSTRAP``, default 127.0.0.1:9092, which ``tensordb services up`` serves).
    **overrides
        Any other setting, e.g. ``task_script_dirs=(...)`` for a task runner.

    The project's topics are created if missing (TensorLayer scripts never ran ``tensordb topics create``).
    """

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
        #: The SDK underneath, for what TensorLayer's API lacks (cohorts, policies, samples).
        self.tensordb = TensorDB(settings, **changes)
        self.settings: Settings = self.tensordb.settings
        self.store = self.tensordb.store
        self.datasets: Datasets = self.tensordb.datasets
        self.project_name = self.settings.project
        create_topics(self.settings)
        self._loggers: dict[tuple[str, str], RunLogger] = {}
        self._task_worker: Worker | None = None

    @property
    def models(self) -> ModelRegistry:
        return self.tensordb.models

    @property
    def jobs(self) -> Jobs:
        return self.tensordb.jobs

    # -- datasets --------------------------------------------------------------------------------
    def save_dataset(self, dataset: Dataset | None = None, dataset_name: str | None = None, **kwargs: Any) -> Literal[True]:
        """Save a dataset (an array, or a tuple, list or dict of arrays) under a name; returns True.

        Parameters
        ----------
        dataset : array or tuple, list or dict of arrays
            What to save; it comes back in the same structure.
        dataset_name : str
            Its name; several saves of one name are kept, the newest found first.
        **kwargs
            Metadata to filter and sort on later, e.g. ``description='...'``; ``version='1.0'`` is the
            version (default: 1, 2, 3... per name).

        Raises ``QueryError`` (no name, a bad field) or ``CodecError`` (object arrays, which need pickle).
        """
        if dataset is None:
            raise QueryError("save_dataset needs the dataset: an array, or a tuple, list or dict of arrays")
        self.datasets.save(dataset, _required(dataset_name, "dataset_name"), **_DATASETS.stored(kwargs))
        return True

    def find_top_dataset(
        self, dataset_name: str | None = None, sort: list[tuple[str, int]] | None = None, **kwargs: Any
    ) -> Dataset | Literal[False]:
        """The newest dataset of that name matching ``kwargs`` (or the first by ``sort``), else False.

        Parameters
        ----------
        dataset_name : str
            The name it was saved under.
        sort : list of (field, direction), optional
            PyMongo's sort, e.g. ``[("time", 1)]`` for the oldest.
        **kwargs
            Equality filters on its metadata, e.g. ``version='1.0'``, ``description='...'``.
        """
        filters = _DATASETS.filters(kwargs)
        found = self.datasets.find(_required(dataset_name, "dataset_name"), sort=_DATASETS.sort(sort), **filters)
        return False if found is None else found

    find_dataset = find_top_dataset

    def find_datasets(self, dataset_name: str | None = None, **kwargs: Any) -> list[Dataset]:
        """Every dataset of that name matching ``kwargs`` (equality filters), oldest first; [] if none."""
        return self.datasets.find_all(_required(dataset_name, "dataset_name"), **_DATASETS.filters(kwargs))

    find_all_datasets = find_datasets

    def delete_datasets(self, **kwargs: Any) -> int:
        """Delete the datasets matching ``kwargs`` (``dataset_name=``, metadata); none given: all of
        the project's. Returns how many were deleted."""
        name = kwargs.pop("dataset_name", None)
        return self.datasets.delete(name, **_DATASETS.filters(kwargs))

    # -- models ------------------------------------------------------------------------------------
    def save_model(self, network: keras.Model | None = None, model_name: str = "model", **kwargs: Any) -> Literal[True]:
        """Save a Keras model's architecture and parameters as the next version of ``model_name``; returns True.

        Parameters
        ----------
        network : keras.Model
            The model (in place of TensorLayer's network).
        model_name : str
            The model's key; ``find_model`` looks for ``'model'`` unless told otherwise.
        **kwargs
            Metadata to filter and sort on, e.g. ``accuracy=0.8, loss=2.3, name='second_model'``.
        """
        if network is None:
            raise QueryError("save_model needs the network: a Keras model")
        self.models.save(network, model_name, **_MODELS.stored(kwargs))
        return True

    def find_top_model(
        self, sess: object = None, sort: list[tuple[str, int]] | None = None, model_name: str | None = "model", **kwargs: Any
    ) -> keras.Model | Literal[False]:
        """The first model matching ``kwargs`` by ``sort`` (default: the newest) as a Keras model, else False.

        Parameters
        ----------
        sess : object, optional
            TensorFlow 1's session; ignored (a Keras model needs none).
        sort : list of (field, direction), optional
            PyMongo's sort, e.g. ``[("test_accuracy", -1)]`` for the best, ``[("time", 1)]`` for the oldest.
        model_name : str or None
            The key it was saved under (TensorLayer's default ``'model'``); None: any.
        **kwargs
            Equality filters on its metadata, e.g. ``accuracy=0.8``.

        The model's whole document (metadata, version, time) is ``model.tensordb_info``.
        """
        found = self.models.find(_MODELS.sort(sort), name=model_name, **_MODELS.filters(kwargs))
        return False if found is None else found

    find_model = find_top_model

    def find_models(
        self, sess: object = None, sort: list[tuple[str, int]] | None = None, model_name: str | None = "model", **kwargs: Any
    ) -> list[keras.Model]:
        """Every matching model (arguments as :meth:`find_top_model`), in ``sort`` order (newest first by default)."""
        infos = self.models.find_infos(_MODELS.sort(sort), name=model_name, **_MODELS.filters(kwargs))
        return [self.models.load(info) for info in infos]

    def delete_model(self, **kwargs: Any) -> int:
        """Delete the models matching ``kwargs`` (``model_name=``, metadata); none given: all of the
        project's. Returns how many versions were deleted."""
        name = kwargs.pop("model_name", None)
        return self.models.delete(name, **_MODELS.filters(kwargs))

    # -- logs --------------------------------------------------------------------------------------
    def _log(self, phase: str, kwargs: dict[str, Any]) -> None:
        run_id = str(kwargs.pop("run_id", DEFAULT_RUN))
        logger = self._loggers.get((run_id, phase))
        if logger is None:
            logger = self._loggers[(run_id, phase)] = self.tensordb.logger(run_id)
        logger.log(kwargs.pop("step", None), phase=phase, epoch=kwargs.pop("epoch", None), **kwargs)

    def save_training_log(self, **kwargs: Any) -> None:
        """Log metrics, e.g. ``accuracy=0.33``, without waiting for the network.

        ``step=`` and ``epoch=`` place the record (default: the next step); ``run_id=`` names the run
        (default ``'tensorhub'``). Records reach MongoDB through the log sink (``tensordb processors``).
        """
        self._log("train", kwargs)

    def save_validation_log(self, **kwargs: Any) -> None:
        """As :meth:`save_training_log`, in the validation phase."""
        self._log("validation", kwargs)

    def save_testing_log(self, **kwargs: Any) -> None:
        """As :meth:`save_training_log`, in the test phase."""
        self._log("test", kwargs)

    def _delete_logs(self, phase: str, kwargs: dict[str, Any]) -> int:
        for logger in self._loggers.values():
            logger.wait_persisted(self.store)  # what this process logged is stored before it is deleted
        run_id = kwargs.pop("run_id", None)
        return self.tensordb.delete_logs(run_id, phase=phase, metrics=kwargs or None)

    def delete_training_log(self, **kwargs: Any) -> int:
        """Delete the training records whose metrics equal ``kwargs`` (``run_id=`` narrows to a run);
        none given: all. Returns how many were deleted."""
        return self._delete_logs("train", kwargs)

    def delete_validation_log(self, **kwargs: Any) -> int:
        """As :meth:`delete_training_log`, in the validation phase."""
        return self._delete_logs("validation", kwargs)

    def delete_testing_log(self, **kwargs: Any) -> int:
        """As :meth:`delete_training_log`, in the test phase."""
        return self._delete_logs("test", kwargs)

    # -- tasks -------------------------------------------------------------------------------------
    def create_task(
        self,
        task_name: str | None = None,
        script: str | None = None,
        hyper_parameters: dict[str, Any] | None = None,
        saved_result_keys: Iterable[str] | None = None,
        **kwargs: Any,
    ) -> str:
        """Queue a task for the runners; returns its job id.

        Parameters
        ----------
        task_name : str
            The name runners select tasks by.
        script : str
            The path of a Python file on the runners, inside their ``task_script_dirs`` (a relative
            path is resolved in the runner's working directory). TensorLayer stored the file's
            content; TensorDB runs only files its operators installed.
        hyper_parameters : dict, optional
            Become the script's globals.
        saved_result_keys : list of str, optional
            Globals of the finished script kept as the task's ``result``.
        **kwargs
            ``description``, ``priority``, ``max_attempts`` (default 1: a failing script is not
            retried) and ``job_id``.
        """
        unknown = sorted(set(kwargs) - TASK_OPTIONS)
        if unknown:
            raise JobError(
                f"create_task keeps {', '.join(sorted(TASK_OPTIONS))} with a task, not {', '.join(unknown)}: "
                "pass values the script needs in hyper_parameters"
            )
        return self.jobs.submit(
            "task", name=task_name, script=script, hyperparameters=hyper_parameters or {},
            save_keys=list(saved_result_keys or []), **{"max_attempts": 1, **kwargs},
        )  # fmt: skip

    def check_unfinished_task(self, task_name: str | None = None, **kwargs: Any) -> bool:
        """Whether any task of ``task_name`` matching ``kwargs`` (e.g. ``description=``) is pending or running."""
        return bool(self.jobs.list(UNFINISHED, task_name, **kwargs))

    def run_top_task(
        self, task_name: str | None = None, sort: list[tuple[str, int]] | None = None, *, sess: object = None, **kwargs: Any
    ) -> bool:
        """Claim and run one pending task in this process (a runner's loop calls this); returns whether
        one ran. Failures are recorded on the task, not raised.

        Parameters
        ----------
        task_name : str, optional
            Run only tasks of this name.
        sort : list of (field, direction), optional
            Which pending task first, e.g. ``[("time", -1)]`` for the newest (default: priority, then oldest).
        sess : object, optional
            TensorFlow 1's session; ignored.
        """
        if kwargs:
            raise JobError(
                f"run_top_task selects tasks by task_name and sort only, not {', '.join(sorted(kwargs))}: "
                "give such tasks their own task_name"
            )
        if self._task_worker is None:
            from workers.trainer import Worker  # only runners pay for importing Keras and the job runners

            self._task_worker = Worker(self.settings)
        return self._task_worker.run_one(name=task_name, sort=sort)

    run_task = run_top_task

    def delete_tasks(self, **kwargs: Any) -> int:
        """Delete the ended tasks matching ``kwargs`` (``task_name=``, e.g. ``status='failed'``); returns
        how many. Pending and running tasks are kept."""
        name = kwargs.pop("task_name", None)
        return self.jobs.delete(name, **kwargs)

    def close(self) -> None:
        """Flush what is queued (logs, model events) and close the connections."""
        for logger in self._loggers.values():
            logger.close()
        if self._task_worker is not None:
            self._task_worker.close()
        self.tensordb.close()

    def __enter__(self) -> TensorHub:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
