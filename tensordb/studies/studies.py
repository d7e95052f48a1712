"""The studies of a project, as users see them: create, list, read trials and results, stop.

Creating a study stores its validated specification and submits its first trials; the
scheduler (:mod:`tensordb.studies.scheduler`, run by the stream processors) does the rest.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING
from pymongo.errors import DuplicateKeyError

from tensordb.errors import StudyError
from tensordb.infra.bus import Publisher
from tensordb.infra.store import Store
from tensordb.infra.trusted import check_model_spec
from tensordb.jobs.queue import UNFINISHED
from tensordb.studies.results import best_row, configuration_rows
from tensordb.studies.scheduler import DECISIONS, STUDIES, StudyScheduler, StudyStatus
from tensordb.studies.spec import StudySpec, parse_study


class Studies:
    """A project's studies (see the module docstring).

    Parameters
    ----------
    store : Store
        The project's database.
    publisher : Publisher
        Publishes the trials' job requests (and cancellations when a study stops).
    """

    def __init__(self, store: Store, publisher: Publisher) -> None:
        self.store = store
        self.scheduler = StudyScheduler(store, publisher)
        self.collection = store[STUDIES]

    def create(self, spec: Mapping[str, Any] | StudySpec) -> StudySpec:
        """Validate and store a study, then submit its first trials; returns the validated spec.

        Raises :class:`~tensordb.errors.StudySpecError` (a malformed spec),
        :class:`~tensordb.errors.UntrustedCodeError` (a model this process does not trust) and
        :class:`~tensordb.errors.StudyError` (the name is taken in this project).
        """
        study = spec if isinstance(spec, StudySpec) else parse_study(dict(spec))
        check_model_spec(study.model, self.store.settings)
        now = datetime.now(UTC)
        try:
            self.collection.insert_one(
                {
                    "_id": study.name, "project": self.store.project, "name": study.name, "spec": study.as_json(),
                    "status": StudyStatus.RUNNING, "created_at": now, "finished_at": None, "best": None,
                }
            )  # fmt: skip
        except DuplicateKeyError:
            raise StudyError(
                f"a study named {study.name!r} exists in project {self.store.project!r}: choose another name, "
                f"or look at it with `tensordb study show {study.name}`"
            ) from None
        self.scheduler.fill(study.name)
        return study

    def get(self, name: str) -> dict[str, Any]:
        """The study's document (spec, status, best once finished); raises ``StudyNotFoundError``."""
        self.scheduler.spec(name)  # the clear error for an unknown name
        study = self.collection.find_one({"_id": name}, {"filling": 0})
        assert study is not None
        return study

    def list(self) -> builtins.list[dict[str, Any]]:
        """Every study of the project, newest first, with how many trials each has run and holds."""
        studies = list(self.collection.find({}, {"spec": 0, "filling": 0}).sort("created_at", DESCENDING))
        for study in studies:
            study["trials"] = self.scheduler.trials.count_documents({"study": study["_id"]})
            study["unfinished"] = self.scheduler.unfinished_trials(study["_id"])
        return studies

    def spec(self, name: str) -> StudySpec:
        return self.scheduler.spec(name)

    def trials(self, name: str) -> builtins.list[dict[str, Any]]:
        """The study's trials in order, each with its job's status (pending, running...) as ``job_status``."""
        self.scheduler.spec(name)
        trials = list(self.scheduler.trials.find({"study": name}).sort([("configuration", ASCENDING), ("fold", ASCENDING)]))
        statuses = {
            job["_id"]: job["status"]
            for job in self.scheduler.jobs.collection.find({"_id": {"$in": [trial["_id"] for trial in trials]}}, {"status": 1})
        }
        for trial in trials:
            trial["job_status"] = statuses.get(trial["_id"])
        return trials

    def configurations(self, name: str) -> builtins.list[dict[str, Any]]:
        """One row per configuration: status, mean objective over folds and its spread (see
        :func:`tensordb.studies.results.configuration_rows`)."""
        return configuration_rows(self.spec(name), self.scheduler.trials.find({"study": name}))

    def best(self, name: str) -> dict[str, Any] | None:
        """The best finished configuration so far (and, once the study finished, its best trial's
        model version under ``model``), or None while none has finished."""
        study = self.get(name)
        if study["status"] == StudyStatus.FINISHED and study.get("best"):
            return dict(study["best"])
        return best_row(self.spec(name), self.configurations(name))

    def decisions(self, name: str) -> builtins.list[dict[str, Any]]:
        """ASHA's verdicts, in the order they were made, each with its rung, value, cut-off and reason."""
        self.scheduler.spec(name)
        return list(self.store[DECISIONS].find({"study": name}).sort("at", ASCENDING))

    def stop(self, name: str) -> dict[str, Any]:
        """Stop the study: no new trials; its pending and running trials are cancelled (their workers
        stop within a second). Stopping a study that has ended changes nothing. Returns the study."""
        self.scheduler.spec(name)
        self.collection.update_one(
            {"_id": name, "status": StudyStatus.RUNNING},
            {"$set": {"status": StudyStatus.STOPPED, "finished_at": datetime.now(UTC)}},
        )
        for job in self.scheduler.jobs.collection.find({"labels.study": name, "status": {"$in": list(UNFINISHED)}}, {"_id": 1}):
            self.scheduler.jobs.cancel(job["_id"])
        return self.get(name)

    def delete(self, name: str) -> None:
        """Delete an ended study with its trials and verdicts (its jobs, logs and models stay)."""
        study = self.get(name)
        if study["status"] == StudyStatus.RUNNING:
            raise StudyError(f"study {name!r} is running: stop it first (`tensordb study stop {name}`)")
        self.scheduler.trials.delete_many({"study": name})
        self.store[DECISIONS].delete_many({"study": name})
        self.collection.delete_one({"_id": name})
        self.scheduler.forget(name)


class Study:
    """A handle on one study, as ``db.create_study(...)`` and ``db.study(name)`` return it.

    Parameters
    ----------
    studies : Studies
        The project's studies.
    name : str
        The study's name.
    """

    def __init__(self, studies: Studies, name: str) -> None:
        self.studies = studies
        self.name = name
        self.spec = studies.spec(name)  # raises StudyNotFoundError for an unknown name

    @property
    def status(self) -> str:
        """``running``, ``stopped`` or ``finished``."""
        return str(self.studies.get(self.name)["status"])

    def trials(self) -> builtins.list[dict[str, Any]]:
        """Every trial (one per train job) with its configuration, fold, curve, rung and outcome."""
        return self.studies.trials(self.name)

    def configurations(self) -> builtins.list[dict[str, Any]]:
        """One row per configuration: status, mean objective over folds, spread, rung reached."""
        return self.studies.configurations(self.name)

    def best(self) -> dict[str, Any] | None:
        """The best finished configuration so far (with its model version once the study finished)."""
        return self.studies.best(self.name)

    def decisions(self) -> builtins.list[dict[str, Any]]:
        """ASHA's verdicts with their reasons, oldest first."""
        return self.studies.decisions(self.name)

    def stop(self) -> dict[str, Any]:
        """Stop the study and cancel its unfinished trials; returns the study's document."""
        return self.studies.stop(self.name)

    def wait(self, timeout: float = 600.0, interval: float = 0.5) -> dict[str, Any]:
        """Block until the study has ended (finished or stopped); returns its document.

        Raises :class:`~tensordb.errors.StudyError` after ``timeout`` seconds: the scheduler runs in
        ``tensordb processors`` and the trials in ``tensordb worker``; both must be running.
        """
        deadline = time.monotonic() + timeout
        while True:
            study = self.studies.get(self.name)
            if study["status"] != StudyStatus.RUNNING:
                return study
            if time.monotonic() > deadline:
                raise StudyError(
                    f"study {self.name!r} still running after {timeout:.0f} s: are `tensordb processors` and a `tensordb worker` running?"
                )
            time.sleep(interval)

    def __repr__(self) -> str:
        return f"Study({self.name!r}, searcher={self.spec.searcher.name!r})"
