"""The study scheduler: submits trials as slots free, judges them at ASHA's rungs, ends the study.

It is driven by the stream processors (``streams.studies``): validation log records call
:meth:`StudyScheduler.on_validation`, job events of trials call :meth:`StudyScheduler.on_trial_ended`,
and a timer calls :meth:`StudyScheduler.reconcile`. All of its state is in MongoDB, and every step
is idempotent, so a redelivered record or a scheduler killed at any point changes nothing:

- trial ``n`` of a study has a deterministic job id and configuration (:func:`trial_id`,
  :func:`tensordb.studies.searchers.configuration`); submitting it twice stores it once;
- a rung verdict is one document per (configuration, rung), inserted once; a redelivered record
  finds it and re-applies it (cancelling a stopped trial again is harmless);
- the study ends once no trial job is unfinished and no configuration is left, atomically.

Collections: ``studies`` (spec, status, best), ``study_trials`` (one per train job: configuration,
fold, validation curve, rung, outcome) and ``study_decisions`` (ASHA's verdicts with their reasons).
"""

from __future__ import annotations

import logging
import statistics
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from pymongo.errors import DuplicateKeyError

from tensordb.errors import BadInputError, StudyNotFoundError, UntrustedCodeError
from tensordb.infra.bus import Publisher
from tensordb.infra.store import Store
from tensordb.jobs.queue import UNFINISHED, JobKind, Jobs, JobStatus
from tensordb.models.registry import ModelRegistry
from tensordb.studies.results import TrialStatus, best_row, configuration_rows
from tensordb.studies.searchers import configuration, judge_at_rung
from tensordb.studies.spec import StudySpec, parse_study

log = logging.getLogger(__name__)

STUDIES = "studies"
TRIALS = "study_trials"
DECISIONS = "study_decisions"
#: The order of ``study_trials``' index: the study's last trial first.
LAST_TRIAL = [("configuration", -1), ("fold", -1)]
#: The alias that points at the best trial's final version once a study finishes.
BEST_ALIAS = "best"
#: How long one :meth:`StudyScheduler.fill` may hold a study's fill lock: another filler takes it
#: over after this if the holder died mid-fill (a fill submits a few trials in milliseconds).
FILL_LEASE = timedelta(seconds=10)
#: How often a filler waiting for the lock looks again.
FILL_WAIT_SECONDS = 0.002


class StudyStatus(StrEnum):
    """A study's ``status``."""

    RUNNING = "running"  #: trials are submitted as slots free
    STOPPED = "stopped"  #: stopped by a person; its unfinished trials were cancelled
    FINISHED = "finished"  #: every configuration was tried (or stopped early)
    FAILED = "failed"  #: its trials cannot be submitted here (``error`` says why: e.g. untrusted code)


def trial_id(study: str, configuration: int, fold: int | None) -> str:
    """The job id of a trial: the same trial always gets the same id (no duplicate jobs)."""
    return f"trial-{study}-{configuration:04d}" + (f"-f{fold}" if fold is not None else "")


def _now() -> datetime:
    return datetime.now(UTC)


class StudyScheduler:
    """Scheduling decisions for the studies of one project (see the module docstring).

    Parameters
    ----------
    store : Store
        The project's database.
    publisher : Publisher
        Publishes the trials' job requests and events.
    registry : ModelRegistry, optional
        Where the best trial's version gets its alias (default: one on ``store`` and ``publisher``).
    """

    def __init__(self, store: Store, publisher: Publisher, registry: ModelRegistry | None = None) -> None:
        self.store = store
        self.jobs = Jobs(store, publisher)
        self.publisher = publisher
        self._registry = registry
        self.studies, self.trials, self.decisions = store[STUDIES], store[TRIALS], store[DECISIONS]
        self._specs: dict[str, StudySpec] = {}  # a study's spec never changes once stored

    def spec(self, name: str) -> StudySpec:
        """The study's validated specification; raises :class:`StudyNotFoundError`."""
        if name not in self._specs:
            study = self.studies.find_one({"_id": name}, {"spec": 1})
            if study is None:
                raise StudyNotFoundError(f"no study {name!r} in project {self.store.project!r}: `tensordb study list` shows them")
            self._specs[name] = parse_study(study["spec"])
        return self._specs[name]

    @property
    def registry(self) -> ModelRegistry:
        """The model registry, opened when first needed (only when a study finishes)."""
        if self._registry is None:
            self._registry = ModelRegistry(self.store, self.publisher)
        return self._registry

    def forget(self, name: str) -> None:
        """Drop the cached spec of a deleted study (a new study may take the name)."""
        self._specs.pop(name, None)

    # -- submitting trials -----------------------------------------------------------------------
    def unfinished_trials(self, name: str, ending: str | None = None) -> int:
        """How many of the study's trial jobs are pending or running (the slots it holds), not
        counting the job ``ending`` (one whose work is done while its end is being recorded)."""
        query: dict[str, Any] = {"labels.study": name, "status": {"$in": list(UNFINISHED)}}
        if ending is not None:
            query["_id"] = {"$ne": ending}
        return self.jobs.collection.count_documents(query)

    def next_trial(self, spec: StudySpec) -> int:
        """The index of the study's next trial (configuration × folds + fold): one after its last
        trial document, read through an index, so it costs the same at trial 10 and at trial 10,000."""
        last = self.trials.find_one({"study": spec.name}, {"configuration": 1, "fold": 1}, sort=LAST_TRIAL)
        return 0 if last is None else last["configuration"] * spec.folds_or_one + (last["fold"] or 0) + 1

    def fill(self, name: str, ending: str | None = None) -> list[str]:
        """Submit trials until the study holds ``max_concurrent`` unfinished ones or has none left;
        returns the ids submitted. Safe to run anywhere, any number of times, concurrently: fills
        of one study take turns (:meth:`_filling`), so two of them never both count a free slot
        and the study never holds more than ``max_concurrent`` unfinished trials.

        Parameters
        ----------
        name : str
            The study.
        ending : str, optional
            A trial job of the study whose work is done and whose end its worker is recording
            now: its slot is counted as free already, so that the next trial is waiting when the
            slot frees. If its end is not recorded after all (its worker killed in those
            milliseconds, or a model upload failing), the study holds one trial over
            ``max_concurrent`` until that trial, re-queued, ends.
        """
        with self._filling(name) as running:
            return self._fill(name, ending) if running else []

    @contextmanager
    def _filling(self, name: str) -> Iterator[bool]:
        """Hold the study's fill lock (a lease on its document) while the body runs; yields whether
        the study takes trials (if not, no lock is needed). The worker that ended a trial and the
        scheduler both fill; a fill that counted before the other's trial ended would leave its
        slot empty, so a filler waits for its turn instead of skipping."""
        token = uuid.uuid4().hex
        while True:
            now = _now()
            taken = self.studies.update_one(
                {"_id": name, "status": StudyStatus.RUNNING, "$or": [{"filling": None}, {"filling.until": {"$lt": now}}]},
                {"$set": {"filling": {"by": token, "until": now + FILL_LEASE}}},
            )
            if taken.modified_count:
                break
            if not self._running(name):
                yield False
                return
            time.sleep(FILL_WAIT_SECONDS)
        try:
            yield True
        finally:
            self.studies.update_one({"_id": name, "filling.by": token}, {"$set": {"filling": None}})

    def _fill(self, name: str, ending: str | None) -> list[str]:
        """Submit the trials that fit (counted once: no other fill runs meanwhile, and a trial
        ending meanwhile makes its own fill, which waits for this one)."""
        spec = self.spec(name)
        free = spec.max_concurrent - self.unfinished_trials(name, ending)
        first = self.next_trial(spec)
        submitted: list[str] = []
        for index in range(first, first + max(free, 0)):
            number, fold = divmod(index, spec.folds_or_one)
            hyperparameters = configuration(spec, number)
            if hyperparameters is None:
                break
            trial_fold = fold if spec.folds else None
            try:
                # a worker recording the end of `ending` flushes the producer right after
                running = self._submit(spec, number, trial_fold, hyperparameters, flush=ending is None)
            except (BadInputError, UntrustedCodeError) as exc:  # refused for good here: say so on the study
                self._fail(name, f"trial {number} was refused: {exc}")
                break
            submitted.append(trial_id(name, number, trial_fold))
            if not running:
                break
        return submitted

    def _fail(self, name: str, error: str) -> None:
        """End the study ``failed`` with ``error`` and cancel its unfinished trials."""
        self.studies.update_one(
            {"_id": name, "status": StudyStatus.RUNNING},
            {"$set": {"status": StudyStatus.FAILED, "error": error, "finished_at": _now()}},
        )
        log.error("study %s failed: %s", name, error)
        for job in self.jobs.collection.find({"labels.study": name, "status": {"$in": list(UNFINISHED)}}, {"_id": 1}):
            self.jobs.cancel(job["_id"])

    def _running(self, name: str) -> bool:
        """Whether the study still takes trials (another process may have stopped or failed it)."""
        return self.studies.find_one({"_id": name, "status": StudyStatus.RUNNING}, {"_id": 1}) is not None

    def _submit(
        self, spec: StudySpec, number: int, fold: int | None, hyperparameters: dict[str, Any], flush: bool = True
    ) -> bool:
        """The trial document first, then its job: the document is there before the job's first
        validation record can arrive, and a crash between the two leaves a trial without a job,
        which :meth:`reconcile` submits (the same id: never twice). Returns whether the study
        still takes trials (if another process stopped or failed it meanwhile, the job is
        cancelled at once); ``flush`` as for :meth:`~tensordb.jobs.queue.Jobs.submit`."""
        job_id = trial_id(spec.name, number, fold)
        self._add_trial(spec.name, job_id, number, fold, hyperparameters)
        data: dict[str, Any] = dict(spec.data or {})
        if fold is not None:
            data |= {"folds": spec.folds, "fold": fold}
        elif spec.validation is not None:
            data["validation"] = spec.validation
        try:
            self.jobs.submit(
                JobKind.TRAIN,
                name=spec.registered_name,
                model=spec.model,
                data=data,
                hyperparameters={**spec.hyperparameters, **hyperparameters},
                epochs=spec.trial_epochs,
                priority=spec.priority,
                job_id=job_id,
                labels={"study": spec.name, "configuration": number, "fold": fold},
                description=f"study {spec.name}: configuration {number}" + (f", fold {fold}" if fold is not None else ""),
                flush=flush,
            )
        except DuplicateKeyError:
            pass  # submitted before a crash, or by another scheduler: the job is there
        if self._running(spec.name):
            return True
        self.jobs.cancel(job_id)  # the study was stopped or failed meanwhile (by another process)
        return False

    def _add_trial(self, study: str, job_id: str, number: int, fold: int | None, hyperparameters: dict[str, Any]) -> None:
        try:
            self.trials.insert_one(
                {
                    "_id": job_id, "project": self.store.project, "study": study, "configuration": number, "fold": fold,
                    "hyperparameters": hyperparameters, "status": TrialStatus.ACTIVE, "curve": {}, "rung": None,
                    "stopped_at_rung": None, "objective": None, "epochs_done": None, "submitted_at": _now(), "ended_at": None,
                }
            )  # fmt: skip
        except DuplicateKeyError:
            pass

    # -- judging at rungs ------------------------------------------------------------------------
    def on_validation(self, job_id: str, epoch: int, metrics: dict[str, Any]) -> dict[str, Any] | None:
        """Record a trial's validation metrics of ``epoch``; at an ASHA rung, judge its configuration.

        Returns the rung verdict (a ``study_decisions`` document) when one was made or found, else
        None (not a trial, not a rung, or other folds of the configuration have not reached it).
        """
        trial = self.trials.find_one({"_id": job_id}, {"study": 1, "configuration": 1, "stopped_at_rung": 1, "status": 1})
        if trial is None:
            return None
        spec = self.spec(trial["study"])
        value = metrics.get(spec.objective.metric)
        self.trials.update_one({"_id": job_id}, {"$set": {f"curve.{epoch}": value}})
        rungs = spec.searcher.rungs()
        verdict = None
        stopped_at = trial.get("stopped_at_rung")
        if epoch + 1 in rungs and (stopped_at is None or stopped_at >= rungs.index(epoch + 1)):
            # judged even if the trial has ended meanwhile (its records may arrive after its job
            # event), so the verdicts are the same whenever the scheduler reads them; epochs a
            # stopped trial ran before it saw the cancel are not
            verdict = self._judge(spec, int(trial["configuration"]), rungs.index(epoch + 1))
        if trial["status"] != TrialStatus.ACTIVE:
            self.maybe_finish(spec.name)  # it waited for this trial's records
        return verdict

    def _judge(self, spec: StudySpec, number: int, rung: int) -> dict[str, Any] | None:
        decision_id = f"{spec.name}:{number}:{rung}"
        decision = self.decisions.find_one({"_id": decision_id})
        if decision is None:
            epochs = spec.searcher.rungs()[rung]
            folds = list(self.trials.find({"study": spec.name, "configuration": number}, {"curve": 1}))
            key = str(epochs - 1)
            if len(folds) < spec.folds_or_one or any(key not in trial["curve"] for trial in folds):
                return None  # judged when the last of its folds reaches the rung
            values = [trial["curve"][key] for trial in folds]
            value = statistics.fmean(values) if all(isinstance(v, int | float) for v in values) else None
            earlier = [d["value"] for d in self.decisions.find({"study": spec.name, "rung": rung}, {"value": 1})]
            verdict = judge_at_rung(value, earlier, spec.searcher.reduction_factor, spec.objective)
            decision = {
                "_id": decision_id, "project": self.store.project, "study": spec.name, "configuration": number,
                "rung": rung, "epochs": epochs, "metric": spec.objective.metric, "value": value,
                "fold_values": values, "cutoff": verdict.cutoff, "compared_with": verdict.compared_with,
                "action": "continue" if verdict.proceed else "stop", "reason": f"rung {rung} ({epochs} epochs): {verdict.reason}",
                "trials": sorted(trial["_id"] for trial in folds), "at": _now(),
            }  # fmt: skip
            try:
                self.decisions.insert_one(decision)
            except DuplicateKeyError:  # judged meanwhile by another scheduler: its verdict stands
                decision = self.decisions.find_one({"_id": decision_id})
                assert decision is not None
        self._apply(decision)
        return decision

    def _apply(self, decision: dict[str, Any]) -> None:
        """Carry out a verdict (again, after a crash: every step is idempotent)."""
        trials = {"study": decision["study"], "configuration": decision["configuration"]}
        if decision["action"] == "continue":
            self.trials.update_many(
                {**trials, "rung": {"$not": {"$gte": decision["rung"]}}}, {"$set": {"rung": decision["rung"]}}
            )
            return
        # a trial that ended before the verdict was carried out (a scheduler restarted late) keeps
        # its outcome, but is not judged at later rungs either
        self.trials.update_many({**trials, "stopped_at_rung": None}, {"$set": {"stopped_at_rung": decision["rung"]}})
        self.trials.update_many({**trials, "status": TrialStatus.ACTIVE}, {"$set": {"status": TrialStatus.STOPPED}})
        for job_id in decision["trials"]:
            self.jobs.cancel(job_id)  # the worker sees it within a second and frees the slot

    # -- trials ending, the study ending ------------------------------------------------------------
    def on_trial_ended(self, job_id: str) -> None:
        """Record the outcome of a trial whose job ended, submit the next trials, end the study if done."""
        job = self.jobs.collection.find_one({"_id": job_id}, {"labels": 1, "status": 1, "result": 1, "progress": 1})
        if job is None or not (job.get("labels") or {}).get("study") or job["status"] in UNFINISHED:
            return
        name = job["labels"]["study"]
        spec = self.spec(name)
        trial = self.trials.find_one({"_id": job_id}, {"curve": 1})
        if trial is None:
            return  # a job labelled by hand, not one of the scheduler's trials (their documents come first)
        curve = trial.get("curve") or {}
        last = curve[max(curve, key=int)] if curve else None
        status, objective = {
            JobStatus.FINISHED: (
                TrialStatus.FINISHED,
                ((job.get("result") or {}).get("metrics") or {}).get(f"val_{spec.objective.metric}", last),
            ),
            JobStatus.FAILED: (TrialStatus.FAILED, last),
        }.get(job["status"], (TrialStatus.CANCELLED, last))
        epochs_done = int((job.get("progress") or {}).get("epoch", -1)) + 1  # each logged its validation record
        ended = {"objective": objective, "epochs_done": epochs_done, "ended_at": _now()}
        # a trial that trained every epoch is finished even if a stop verdict came too late to stop it
        # (its stopped_at_rung says so); a stopped trial's cancelled job leaves it stopped
        ending = [TrialStatus.ACTIVE, TrialStatus.STOPPED] if status == TrialStatus.FINISHED else [TrialStatus.ACTIVE]
        self.trials.update_one({"_id": job_id, "status": {"$in": ending}}, {"$set": {"status": status, **ended}})
        self.trials.update_one({"_id": job_id, "status": TrialStatus.STOPPED}, {"$set": ended})
        self.fill(name)
        self.maybe_finish(name)

    def maybe_finish(self, name: str) -> bool:
        """Mark the study finished if no trial is unfinished, no configuration is left and every
        validation record of its trials has been read (so that no verdict is skipped: a restarted
        scheduler may read them after the jobs' ends); then the best trial's final version (if it
        saved one) gets the ``best`` alias. Returns whether it ended now."""
        spec = self.spec(name)
        if self.unfinished_trials(name) or self.trials.count_documents({"study": name, "status": TrialStatus.ACTIVE}):
            return False
        if configuration(spec, self.next_trial(spec) // spec.folds_or_one) is not None:
            return False
        trials = list(self.trials.find({"study": name}))
        if any(len(trial["curve"]) < (trial.get("epochs_done") or 0) for trial in trials):
            return False  # validation records still to be read: the processor that reads them finishes the study
        best = best_row(spec, configuration_rows(spec, trials))
        ended = self.studies.find_one_and_update(
            {"_id": name, "status": StudyStatus.RUNNING},
            {"$set": {"status": StudyStatus.FINISHED, "finished_at": _now(), "best": best}},
        )
        if ended is None:
            return False
        log.info("study %s finished; best: %s", name, best)
        if best is not None:
            self._register_best(spec, best)
        return True

    def _register_best(self, spec: StudySpec, best: dict[str, Any]) -> None:
        """Point the ``best`` alias of the study's model at its best trial's final version."""
        objectives = dict(zip(best["trials"], best["fold_objectives"], strict=False))
        trial = (
            max(objectives, key=objectives.__getitem__)
            if spec.objective.direction == "max"
            else min(objectives, key=objectives.__getitem__)
        )
        version = self.registry.find_info(name=spec.registered_name, job_id=trial, sort=[("version", -1)])
        if version is None:
            return  # an epoch-function study: nothing was saved
        self.registry.promote(
            spec.registered_name,
            version["version"],
            alias=BEST_ALIAS,
            reason={"study": spec.name, "trial": trial, "configuration": best["configuration"], "objective": best["objective"]},
        )
        self.studies.update_one(
            {"_id": spec.name},
            {"$set": {"best.model": {"name": spec.registered_name, "version": version["version"], "trial": trial}}},
        )

    def reconcile(self) -> None:
        """For every running study: record trials whose job ended without an event seen, fill
        free slots, end the study if done (the timer's pass; repairs what a crash left)."""
        for study in self.studies.find({"status": StudyStatus.RUNNING}, {"_id": 1}):
            name = study["_id"]
            active = {trial["_id"]: trial for trial in self.trials.find({"study": name, "status": TrialStatus.ACTIVE})}
            jobs = {job["_id"]: job["status"] for job in self.jobs.collection.find({"_id": {"$in": list(active)}}, {"status": 1})}
            for job_id, trial in active.items():
                if job_id not in jobs:  # a crash between the trial's document and its job
                    self._submit(self.spec(name), trial["configuration"], trial["fold"], trial["hyperparameters"])
                elif jobs[job_id] not in UNFINISHED:
                    self.on_trial_ended(job_id)
            self.fill(name)
            self.maybe_finish(name)
