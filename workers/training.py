"""Train jobs: build the model, stream the cohort, log every step, save a version every epoch.

A re-run of a job (after a crash or a lost lease) resumes after its last saved epoch: the cohort is
pinned at the first attempt and shuffled with a seed derived from the job, so each epoch reads the
same samples in the same order and step numbers match; re-logged steps are stored once.
"""

from __future__ import annotations

import inspect
import json
import zlib
from datetime import datetime
from typing import Any

import keras

from tensordb.data.cohorts import Cohort, cohort_from_spec
from tensordb.errors import JobSpecError
from tensordb.infra.trusted import bind_arguments, call_entry_point, check_model_spec, load_entry_point
from tensordb.jobs.queue import JobEvent
from tensordb.runs.keras_callback import TensorDBCallback
from workers.context import JobContext


def build_model(spec: dict[str, Any], hyperparameters: dict[str, Any], registry: Any) -> keras.Model:
    """A compiled Keras model from a job's ``model`` spec.

    ``architecture`` (Keras JSON) with ``compile`` options; ``entry_point`` "package.module:function"
    in a module this worker trusts, called with the hyper-parameters its signature declares; or
    ``name``/``version`` of a registered model to continue from. The spec is checked against this
    worker's trusted modules before anything is imported: a job document may have been written by
    anyone with access to MongoDB. Never unpickles, never executes stored code.
    """
    settings = registry.store.settings
    check_model_spec(spec, settings)
    if "entry_point" in spec:
        model = call_entry_point(spec["entry_point"], hyperparameters, settings)
    elif "architecture" in spec:
        model = keras.models.model_from_json(json.dumps(spec["architecture"]))
    elif "name" in spec:
        model = registry.find(name=spec["name"], version=spec.get("version"))
        if model is None:
            raise JobSpecError(f"no registered model {spec['name']!r} version {spec.get('version', 'latest')}")
    else:
        raise JobSpecError("a train job's model needs 'architecture', 'entry_point' or 'name'")
    if not model.compiled or "compile" in spec:
        options = spec.get("compile") or {"optimizer": "adam", "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]}
        model.compile(**options)
    return model


def _pinned_cohorts(context: JobContext) -> tuple[Cohort, Cohort | None]:
    """Train (and validation) cohorts frozen at the job's first attempt, for reproducible re-runs."""
    job = context.job
    as_of = job["progress"].get("cohort_as_of")
    if as_of is None:
        as_of = datetime.now().astimezone()
        context.jobs.record_progress(context.job_id, context.worker, cohort_as_of=as_of)
    data = job["spec"]["data"]
    train = cohort_from_spec(context.store, data).pinned(as_of)
    validation = None
    if "validation" in data:
        validation = cohort_from_spec(context.store, data["validation"]).pinned(as_of)
    elif "validation_fraction" in data:
        train, validation = train.train_validation(data["validation_fraction"])
    elif "folds" in data:  # a k-fold study's trial: fold ``fold`` of the cohort validates, the rest trains
        train, validation = train.folds(int(data["folds"]))[int(data["fold"])]
    return train, validation


def run_training(context: JobContext) -> dict[str, Any]:
    """The ``train`` job runner (see the module docstring)."""
    job, spec = context.job, context.job["spec"]
    if "epoch_function" in spec["model"]:
        return run_epoch_function(context)
    hyperparameters = dict(spec.get("hyperparameters", {}))
    batch_size = int(hyperparameters.pop("batch_size", 32))
    shuffle_buffer = int(hyperparameters.pop("shuffle_buffer", 1024))
    model_builder_params = {k: v for k, v in hyperparameters.items() if k not in ("learning_rate",)}
    model = build_model(spec["model"], model_builder_params, context.registry)
    if "learning_rate" in hyperparameters:
        model.optimizer.learning_rate = float(hyperparameters["learning_rate"])

    initial_epoch = 0
    checkpoint = job.get("checkpoint")
    if checkpoint:  # resume: the parameters of the last saved epoch
        saved = context.registry.find(name=job["name"], version=checkpoint["model_version"])
        if saved is None:
            raise JobSpecError(
                f"the checkpoint of job {context.job_id}, model {job['name']!r} version {checkpoint['model_version']}, was deleted"
            )
        model.set_weights(saved.get_weights())
        initial_epoch = checkpoint["epoch"] + 1

    train, validation = _pinned_cohorts(context)
    seed = zlib.crc32(context.job_id.encode())
    train_data = train.to_tf_dataset(batch_size, shuffle_buffer=shuffle_buffer, seed=seed)
    validation_data = validation.to_tf_dataset(batch_size) if validation is not None else None
    steps_per_epoch = -(-train.count() // batch_size)
    lineage = {"job": context.job_id, "cohort": train.describe(), "attempt": job["attempts"], **job.get("labels", {})}

    def save_epoch(model: keras.Model, epoch: int, logs: dict[str, Any]) -> None:
        future = context.registry.save_async(
            model, job["name"], epoch=epoch, job_id=context.job_id, lineage={**lineage, "epoch": epoch}, **logs
        )

        def remember(done: Any) -> None:
            if done.exception() is None:
                context.logger.flush()  # every step up to this epoch is durable before the checkpoint counts
                context.jobs.record_checkpoint(context.job_id, context.worker, epoch, done.result()["version"])

        future.add_done_callback(remember)
        if context.jobs.record_progress(context.job_id, context.worker, epoch=epoch, metrics=logs):
            context.request_stop("cancelled")  # e.g. stopped early by a study: StopOnRequest ends fit now
        context.jobs.event(
            context.job_id, JobEvent.EPOCH, attempt=job["attempts"], worker=context.worker, detail={"epoch": epoch, **logs}
        )

    callback = TensorDBCallback(context.logger, on_epoch_saved=save_epoch)
    callback.global_step = initial_epoch * steps_per_epoch  # a resumed run numbers its steps as the first did
    history = model.fit(
        train_data,
        validation_data=validation_data,
        epochs=spec["epochs"],
        initial_epoch=initial_epoch,
        callbacks=[callback, StopOnRequest(context)],
        verbose=0,
    )
    context.check_stop()
    final = {key: float(values[-1]) for key, values in history.history.items() if values}
    return {"epochs": spec["epochs"], "resumed_from_epoch": initial_epoch or None, "metrics": final}


def run_epoch_function(context: JobContext) -> dict[str, Any]:
    """A train job without a Keras model: a trusted function called once per epoch.

    The function gets ``epoch`` and the hyper-parameters it declares, and returns the epoch's
    validation metrics, which are logged (phase ``validation``, step ``epoch + 1``) exactly as a
    Keras job logs them, so studies judge both alike. Synthetic objectives (benchmarks, tests) and
    trainers outside Keras use it. A re-run resumes after the last epoch recorded in the job's
    progress; there are no parameters to save.
    """
    job, spec = context.job, context.job["spec"]
    path = spec["model"]["epoch_function"]
    function = load_entry_point(path, context.settings)
    hyperparameters = dict(spec.get("hyperparameters", {}))
    fold = spec["data"].get("fold")
    if fold is not None and "fold" in inspect.signature(function).parameters:
        hyperparameters["fold"] = fold  # a k-fold study's trial: the function may vary by fold
    first = int(job["progress"].get("epoch", -1)) + 1
    metrics: dict[str, float] = dict(job["progress"].get("metrics", {}))
    for epoch in range(first, spec["epochs"]):
        context.check_stop()
        returned = function(**bind_arguments(function, path, {"epoch": epoch, **hyperparameters}))
        if not isinstance(returned, dict) or not returned:
            raise JobSpecError(
                f"{path} returned {returned!r} for epoch {epoch}; it must return validation metrics, e.g. {{'loss': 0.3}}"
            )
        metrics = {f"val_{name}": float(value) for name, value in returned.items()}
        context.logger.log(epoch + 1, phase="validation", epoch=epoch, **returned)
        context.logger.flush()  # the epoch's metrics are out before the progress says the epoch is done
        if context.jobs.record_progress(context.job_id, context.worker, epoch=epoch, metrics=metrics):
            context.request_stop("cancelled")  # e.g. stopped early by a study: not one epoch more
        context.jobs.event(
            context.job_id, JobEvent.EPOCH, attempt=job["attempts"], worker=context.worker, detail={"epoch": epoch, **metrics}
        )
    context.check_stop()
    return {"epochs": spec["epochs"], "resumed_from_epoch": first or None, "metrics": metrics}


class StopOnRequest(keras.callbacks.Callback):
    """Ends ``fit`` at the next batch once the job is cancelled, released or has lost its lease."""

    def __init__(self, context: JobContext) -> None:
        super().__init__()
        self.context = context

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.context.stop.is_set():
            self.model.stop_training = True

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.on_train_batch_end(-1)  # a cancel seen when the epoch was recorded: no epoch more
