"""What a person can do from the dashboard: cancel or retry a job, pause or resume a policy or a
stage, promote a version or roll production back, stop a study, and try a model on samples.

Every action is a ``POST`` with a JSON body (validated by pydantic) behind the guard's token rule and
its cross-site request check (:mod:`tensordb.infra.http_guard`: the page sends the CSRF token it
got from ``GET /api/csrf``). Each calls the domain operation where it lives (``Jobs.retry``,
``promotion.promote_by_person``...); a refusal of the domain is a 4xx with its message: 404 for
what does not exist, 422 for a bad input, 409 for a state that does not allow it.

Trying a model loads versions in FastAPI's thread pool (never on the event loop), keeps the last
few loaded (:class:`~tensordb.models.serving.LoadedVersions`) and checks inputs against each
version's input shape as the model server does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tensordb.config import Settings
from tensordb.data.cohorts import cohort_from_spec
from tensordb.errors import BadInputError, ConfigurationError, NotFoundError, TensorDBError
from tensordb.infra.bus import Publisher
from tensordb.infra.store import Store
from tensordb.jobs.queue import Jobs
from tensordb.loop import promotion
from tensordb.loop.policies import Policies
from tensordb.models.registry import ModelRegistry
from tensordb.models.serving import LoadedVersions, array_batch, instances_batch, predictions
from tensordb.stages.stages import Stages
from tensordb.studies.studies import Studies

#: Who the dashboard's actions are recorded as (a decision's ``who``, a retried job's ``retried_by``).
WHO = "dashboard"
#: At most this many samples or pasted instances per try, and versions side by side.
MAX_TRY_SAMPLES, MAX_TRY_VERSIONS = 64, 8
#: Loaded versions kept for trying (each holds a model's weights in memory).
LOADED_VERSIONS = 4

_NAME = Field(..., min_length=1, max_length=128)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobAction(_Body):
    job_id: str = Field(..., min_length=1, max_length=256)


class NamedAction(_Body):
    name: str = _NAME


class Promote(_Body):
    model: str = _NAME
    version: int = Field(..., ge=1)
    reason: str | None = Field(None, max_length=2000)


class RollBack(_Body):
    model: str = _NAME
    reason: str | None = Field(None, max_length=2000)


class CohortChoice(_Body):
    """A saved cohort (``name``), or a query: ``filter`` with ``x`` (the array) and ``y`` (the label)."""

    name: str | None = Field(None, min_length=1, max_length=128)
    filter: dict[str, Any] | None = None
    sort: list[tuple[str, int]] | None = None
    x: str = Field("x", min_length=1, max_length=128)
    y: str | None = Field("y", max_length=128)

    @model_validator(mode="after")
    def _one_source(self) -> CohortChoice:
        if (self.name is None) == (self.filter is None):
            raise ValueError("name a saved cohort (name) or give a query (filter), not both")
        return self


class TryRequest(_Body):
    """Versions of one model on the same inputs: production (unless ``production`` is false) and
    ``versions``; inputs from a cohort (its first ``samples`` members) or pasted ``instances``."""

    model: str = _NAME
    versions: list[int] = Field(default_factory=list, max_length=MAX_TRY_VERSIONS)
    production: bool = True
    cohort: CohortChoice | None = None
    samples: int = Field(8, ge=1, le=MAX_TRY_SAMPLES)
    instances: list[Any] | None = Field(None, min_length=1, max_length=MAX_TRY_SAMPLES)

    @model_validator(mode="after")
    def _one_input(self) -> TryRequest:
        if (self.cohort is None) == (self.instances is None):
            raise ValueError("give either a cohort to take samples from or instances (a JSON array), not both")
        return self


class Actions:
    """The domain objects the actions use, over the dashboard's store and a publisher of its own
    (job events, job requests and model events must reach the workers and model servers).

    Parameters
    ----------
    settings : Settings
        The project.
    store : Store
        The dashboard's store.
    """

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._publisher: Publisher | None = None
        self._registry: ModelRegistry | None = None
        self._loaded: LoadedVersions | None = None
        self._lock = threading.Lock()

    @property
    def publisher(self) -> Publisher:
        """Opened on the first action: a dashboard nobody acts from never connects a producer."""
        with self._lock:
            if self._publisher is None:
                self._publisher = Publisher(self.settings)
            return self._publisher

    @property
    def registry(self) -> ModelRegistry:
        publisher = self.publisher
        with self._lock:
            if self._registry is None:
                self._registry = ModelRegistry(self.store, publisher)
                self._loaded = LoadedVersions(self._registry, LOADED_VERSIONS)
            return self._registry

    @property
    def loaded(self) -> LoadedVersions:
        self.registry  # noqa: B018 - opens the registry and the loaded versions with it
        assert self._loaded is not None
        return self._loaded

    def close(self) -> None:
        with self._lock:
            if self._publisher is not None:
                self._publisher.close(5.0)

    # -- trying a model ------------------------------------------------------------------------------

    def try_model(self, request: TryRequest) -> dict[str, Any]:
        """Each chosen version's predictions for the same inputs, side by side (see :class:`TryRequest`)."""
        registry = self.registry
        production = registry.alias(request.model, promotion.PRODUCTION)
        versions = list(
            dict.fromkeys([*([production] if request.production and production is not None else []), *request.versions])
        )
        if not versions:
            raise BadInputError(
                f"{request.model!r} has no production version yet: choose the versions to try"
                if request.production
                else "choose at least one version to try"
            )
        samples: list[dict[str, Any]] | None = None
        if request.cohort is not None:
            samples, arrays = self._cohort_samples(request.cohort, request.samples)
        models = {version: self.loaded.get(request.model, version) for version in versions}  # an unknown version: 404 first
        answers = []
        for version, model in models.items():
            batch = instances_batch(request.instances or [], model) if samples is None else array_batch(arrays, model)
            answers.append({"version": version, "production": version == production, **predictions(model, batch)})
        return {"model": request.model, "production": production, "samples": samples, "versions": answers}

    def _cohort_samples(self, choice: CohortChoice, count: int) -> tuple[list[dict[str, Any]], np.ndarray]:
        """The first ``count`` members of the cohort (pinned, so ids and arrays are the same samples):
        their ids and labels, and their ``x`` arrays stacked."""
        spec: dict[str, Any] = {"cohort": choice.name} if choice.name else {"filter": choice.filter, "x": choice.x, "y": choice.y}
        if choice.sort:
            spec["sort"] = choice.sort
        chosen = cohort_from_spec(self.store, spec)
        cohort = replace(chosen.pinned(), limit=min(chosen.limit or count, count))
        ids = cohort.ids()
        if not ids:
            raise BadInputError("this cohort has no samples: choose another one or widen its filter")
        ((x, y),) = list(cohort.stream(len(ids), prefetch=1))  # one batch: the same samples, in the same order
        labels = [None] * len(ids) if y is None else y.tolist()
        return [{"id": sample, "label": label} for sample, label in zip(ids, labels, strict=True)], x


def _status(error: TensorDBError) -> int:
    if isinstance(error, NotFoundError):
        return 404
    if isinstance(error, BadInputError | ConfigurationError):
        return 422
    return 409  # the object's state does not allow it now (a running job, a production version...)


def install_error_answers(app: FastAPI) -> None:
    """Answer TensorDB's refusals as JSON 4xx with their message (``detail``) and kind (``error``)."""

    @app.exception_handler(TensorDBError)
    async def refused(request: Request, error: TensorDBError) -> JSONResponse:
        return JSONResponse({"detail": str(error), "error": type(error).__name__}, status_code=_status(error))


def router(actions: Actions, answer: Callable[[Any], Any]) -> APIRouter:
    """The action routes (all ``POST``; FastAPI runs these plain functions in its thread pool).

    Parameters
    ----------
    actions : Actions
        The dashboard's actions.
    answer : callable
        Wraps a JSON-ready value as the dashboard's JSON response.
    """
    routes = APIRouter(prefix="/api")
    store = actions.store

    @routes.post("/jobs/cancel")
    def cancel_job(body: JobAction) -> Any:
        return answer({"job": _job_view(Jobs(store, actions.publisher).cancel(body.job_id))})  # an unknown id: 404

    @routes.post("/jobs/retry")
    def retry_job(body: JobAction) -> Any:
        return answer({"job": _job_view(Jobs(store, actions.publisher).retry(body.job_id, by=WHO))})

    @routes.post("/policies/pause")
    def pause_policy(body: NamedAction) -> Any:
        Policies(store).pause(body.name)
        return answer({"policy": body.name, "paused": True})

    @routes.post("/policies/resume")
    def resume_policy(body: NamedAction) -> Any:
        Policies(store).resume(body.name)
        return answer({"policy": body.name, "paused": False})

    @routes.post("/stages/pause")
    def pause_stage(body: NamedAction) -> Any:
        return answer({"stage": body.name, "paused": Stages(store).pause(body.name)["paused"]})

    @routes.post("/stages/resume")
    def resume_stage(body: NamedAction) -> Any:
        return answer({"stage": body.name, "paused": Stages(store).resume(body.name)["paused"]})

    @routes.post("/models/promote")
    def promote(body: Promote) -> Any:
        decision = promotion.promote_by_person(store, actions.registry, body.model, body.version, body.reason, WHO)
        return answer({"decision": decision})

    @routes.post("/models/rollback")
    def roll_back(body: RollBack) -> Any:
        return answer({"decision": promotion.roll_back(store, actions.registry, body.model, body.reason, WHO)})

    @routes.post("/studies/stop")
    def stop_study(body: NamedAction) -> Any:
        study = Studies(store, actions.publisher).stop(body.name)
        return answer({"study": body.name, "status": study["status"]})

    @routes.post("/try")
    def try_model(body: TryRequest) -> Any:
        return answer(actions.try_model(body))

    return routes


def _job_view(job: Any) -> dict[str, Any]:
    return {key: job.get(key) for key in ("_id", "status", "attempts", "max_attempts", "cancel_requested", "retries")}
