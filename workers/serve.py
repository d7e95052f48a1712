"""The model server (``tensordb serve``): predictions from a policy's production model, swapped live.

It loads the version the ``production`` alias points to, follows ``model-events`` (and checks the
alias every few seconds in case an event was missed), loads a newly promoted version in the
background and swaps it in with one reference assignment. A request takes the current model once
when it starts, so requests in flight finish on the version they started with: none is dropped.

Bound to 127.0.0.1 by default; beyond it every request must carry a token (``TENSORDB_SERVE_TOKEN``
or ``--token-file``; never on the command line, which every local user can read). Host names, body size and headers are checked by
:mod:`tensordb.infra.http_guard`; a request's instances are checked against the model's input shape
before any array is built.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from tensordb.config import Settings, Topic
from tensordb.errors import InputShapeError, TensorDBError
from tensordb.infra import metrics
from tensordb.infra.bus import Publisher, close_consumer, make_consumer, receive
from tensordb.infra.http_guard import CSP, Guard, check_binding, server
from tensordb.infra.supervision import Supervisor
from tensordb.loop.promotion import PRODUCTION
from tensordb.models.registry import ModelRegistry
from tensordb.models.serving import instances_batch, load_version, predictions
from tensordb.records import Schema
from tensordb.runtime import Runtime

log = logging.getLogger(__name__)
MAX_INSTANCES = 1024
ALIAS_CHECK_SECONDS = 5.0
#: With ``http_docs`` on, /docs loads Swagger UI from its CDN and starts it from an inline script.
DOCS_CSP = (
    CSP.replace("script-src 'self'", "script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net")
    .replace("style-src 'self'", "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net")
    .replace("img-src 'self' data:", "img-src 'self' data: https://fastapi.tiangolo.com")
)


@dataclass(frozen=True)
class Serving:
    """One loaded version: replaced as a whole, never mutated."""

    model: Any
    info: dict[str, Any]
    loaded_at: datetime

    @property
    def version(self) -> int:
        return int(self.info["version"])


class PredictRequest(BaseModel):
    instances: list[Any] = Field(..., min_length=1, max_length=MAX_INSTANCES, description="inputs, one per prediction")


class ModelHolder:
    """The version being served, and the machinery that swaps in newly promoted ones.

    ``pinned`` serves that version for good instead of following the alias.
    """

    def __init__(self, registry: ModelRegistry, name: str, alias: str = PRODUCTION, pinned: int | None = None) -> None:
        self.registry = registry
        self.name = name
        self.alias = alias
        self.pinned = pinned
        self.current: Serving | None = None
        self.swaps = 0
        #: the promotion follower, once started (:func:`start_follower`): its state is the server's
        self.following: Supervisor | None = None
        self._lock = threading.Lock()  # one load at a time; readers never take it

    def refresh(self) -> bool:
        """Load the alias's version if it is not the one served; returns whether it swapped."""
        version = self.pinned or self.registry.alias(self.name, self.alias)
        if version is None or (self.current is not None and self.current.version == version):
            return False
        with self._lock:
            if self.current is not None and self.current.version == version:
                return False
            model = load_version(self.registry, self.name, version)  # warmed up off the request path
            self.current = Serving(model, model.tensordb_info, datetime.now(UTC))
            self.swaps += 1
        metrics.model_served(self.name, version)
        log.info("serving %s version %s", self.name, version)
        return True


def _as_input(instances: list[Any], model: Any) -> np.ndarray:
    """The request's instances as one float32 batch, or a 422 naming the first misfit."""
    try:
        return instances_batch(instances, model)
    except InputShapeError as exc:
        raise HTTPException(422, str(exc)) from None


def create_app(
    holder: ModelHolder,
    settings: Settings,
    token: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    publisher: Publisher | None = None,
) -> Guard:
    """The model server's ASGI app: FastAPI routes behind the :class:`~tensordb.infra.http_guard.Guard`.

    Parameters:
        holder: the served model.
        settings: the HTTP settings (allowed hosts, body limit, docs, forwarded TLS).
        token: the token every request must carry, or ``None`` (bound to loopback only).
        host, port: the bound address (an allowed ``Host``; the port names the session cookie).
        publisher: publishes a share (``predictions_sample_rate``) of the answers on the predictions
            topic, beside the streaming predictor's; None publishes none.
    """
    docs = settings.http_docs
    app = FastAPI(
        title=f"TensorDB model server: {holder.name}", version="1",
        docs_url="/docs" if docs else None, redoc_url=None, openapi_url="/openapi.json" if docs else None,
    )  # fmt: skip

    def serving() -> Serving:
        current = holder.current  # read once: a swap during this request does not affect it
        if current is None:
            raise HTTPException(503, f"no {holder.alias!r} version of {holder.name!r} yet: promote one first")
        return current

    @app.get("/health")
    def health() -> dict[str, Any]:
        current = serving()
        following = holder.following.status if holder.following is not None else "ok"
        # a follower that waits or was restarted serves on, but may miss a promotion meanwhile
        return {"status": "ok" if following == "ok" else "degraded", "model": holder.name, "version": current.version,
                "following": following}  # fmt: skip

    @app.get("/model")
    def model_info() -> dict[str, Any]:
        current = serving()
        metrics = {key: value for key, value in current.info.get("metrics", {}).items()}
        return {
            "model": holder.name, "alias": holder.alias, "version": current.version, "metrics": metrics,
            "trained_by_job": current.info.get("job_id"), "loaded_at": current.loaded_at.isoformat(), "swaps": holder.swaps,
        }  # fmt: skip

    @app.post("/predict")
    def predict(request: PredictRequest) -> dict[str, Any]:
        started = time.monotonic()
        current = serving()
        batch = _as_input(request.instances, current.model)
        response: dict[str, Any] = {"model": holder.name, "version": current.version, **predictions(current.model, batch)}
        if publisher is not None and random.random() < settings.predictions_sample_rate:
            publish_answer(publisher, holder.name, response, started)
        metrics.observe_predictions(holder.name, "http", len(request.instances), time.monotonic() - started)
        return response

    hint = "send the header 'Authorization: Bearer TOKEN' (the token `tensordb serve` was started with)"
    return Guard(app, settings, token=token, host=host, cookie=f"tensordb_serve_{port}", hint=hint, csp=DOCS_CSP if docs else CSP)


def publish_answer(publisher: Publisher, model: str, response: dict[str, Any], started: float) -> None:
    """Publish one POST /predict answer as a ``prediction`` record (``via: http``), without waiting."""
    record: dict[str, Any] = {
        "schema": Schema.PREDICTION, "request_id": f"http-{uuid.uuid4().hex}", "model": model, "version": response["version"],
        "outputs": response["predictions"], "latency_ms": (time.monotonic() - started) * 1000,
        "answered_at": datetime.now(UTC).isoformat(), "via": "http",
    }  # fmt: skip
    if "classes" in response:
        record["classes"] = response["classes"]
    try:
        publisher.publish(Topic.PREDICTIONS, record, key=record["request_id"])
    except TensorDBError as exc:  # monitoring must never fail a prediction
        log.warning("could not publish an answer on the predictions topic: %s", exc)


def start_follower(settings: Settings, holder: ModelHolder, stop: threading.Event) -> threading.Thread:
    """Follow promotions of ``holder``'s model on a supervised thread, started again if it dies
    (its state: ``holder.following``, ``/health``, ``/ready`` and ``tensordb_loop_ok``), until ``stop``."""
    supervisor = Supervisor(f"follower-{holder.name}", stop)
    holder.following = supervisor
    return supervisor.start_thread(lambda: follow_promotions(settings, holder, supervisor), "tensordb-follow")


def follow_promotions(settings: Settings, holder: ModelHolder, supervisor: Supervisor) -> None:
    """Swap on each ``promoted`` event for the served model; check the alias now and then too.
    Returns when ``supervisor`` stops; raises when the consumer fails (the supervisor restarts it)."""
    consumer = make_consumer(
        settings,
        settings.consumer_group(f"serve-{uuid.uuid4().hex[:8]}"),
        [Topic.MODEL_EVENTS],
    )
    last_check = time.monotonic()
    try:
        while not supervisor.stopping.is_set():
            promoted = any(
                r.record and r.record["event"] == "promoted" and r.record["model_name"] == holder.name
                for r in receive(consumer, Schema.MODEL_EVENT, timeout=0.5)
            )
            supervisor.working()
            if promoted or time.monotonic() - last_check > ALIAS_CHECK_SECONDS:
                last_check = time.monotonic()
                try:
                    holder.refresh()
                except Exception:  # noqa: BLE001 - keep serving the current version; retry at the next check
                    log.exception("could not load the new version of %s", holder.name)
    finally:
        close_consumer(consumer)


def run(settings: Settings, model_name: str, host: str, port: int, token: str | None = None) -> None:
    """``tensordb serve``: serve ``model_name``'s production version until interrupted.

    Parameters:
        settings: where the models are, ``serve_token`` when ``token`` is not given, the HTTP settings.
        model_name: the policy (model) whose production version is served.
        host, port: the address to bind; beyond loopback a token is required.
        token: the token every request must carry.
    """
    if token is None and settings.serve_token is not None:
        token = settings.serve_token.get_secret_value()
    check_binding(host, token, "tensordb serve", "TENSORDB_SERVE_TOKEN")
    runtime = Runtime.open(settings)
    holder = ModelHolder(runtime.registry, model_name)
    holder.refresh()
    stop = threading.Event()
    follower = start_follower(settings, holder, stop)
    try:
        app = metrics.instrument(create_app(holder, settings, token, host, port, runtime.publisher), "serve")
        # log_config=None: uvicorn logs through tensordb.infra.logging
        server(app, host, port, settings=settings, what="the model server", log_config=None).run()
    finally:
        stop.set()
        follower.join(timeout=5)
        runtime.close()
