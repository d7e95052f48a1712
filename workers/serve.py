"""The model server (``tensordb serve``): predictions from a policy's production model, swapped live.

It loads the version the ``production`` alias points to, follows ``model-events`` (and checks the
alias every few seconds in case an event was missed), loads a newly promoted version in the
background and swaps it in with one reference assignment. A request takes the current model once
when it starts, so requests in flight finish on the version they started with: none is dropped.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from tensordb.bus import Publisher, make_consumer, receive
from tensordb.config import Settings, Topic
from tensordb.mining import PRODUCTION
from tensordb.models import ModelRegistry
from tensordb.store import Store

log = logging.getLogger(__name__)
MAX_INSTANCES = 1024
ALIAS_CHECK_SECONDS = 5.0


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
    """The version being served, and the machinery that swaps in newly promoted ones."""

    def __init__(self, registry: ModelRegistry, name: str, alias: str = PRODUCTION) -> None:
        self.registry = registry
        self.name = name
        self.alias = alias
        self.current: Serving | None = None
        self.swaps = 0
        self._lock = threading.Lock()  # one load at a time; readers never take it

    def refresh(self) -> bool:
        """Load the alias's version if it is not the one served; returns whether it swapped."""
        version = self.registry.alias(self.name, self.alias)
        if version is None or (self.current is not None and self.current.version == version):
            return False
        with self._lock:
            if self.current is not None and self.current.version == version:
                return False
            model = self.registry.find(name=self.name, version=version)
            model.predict_on_batch(np.zeros((1, *model.input_shape[1:]), dtype="float32"))  # warm up off the request path
            self.current = Serving(model, model.tensordb_info, datetime.now(UTC))
            self.swaps += 1
        log.info("serving %s version %s", self.name, version)
        return True


def _as_input(instances: list[Any], model: Any) -> np.ndarray:
    try:
        batch = np.asarray(instances, dtype="float32")
    except (ValueError, TypeError) as exc:
        raise HTTPException(422, f"instances must be numbers in nested lists of one shape: {exc}") from None
    expected = tuple(model.input_shape[1:])
    if batch.ndim != len(expected) + 1 or any(want is not None and got != want for got, want in zip(batch.shape[1:], expected, strict=True)):
        raise HTTPException(422, f"each instance must have shape {list(expected)}; got {list(batch.shape[1:])}")
    if not np.isfinite(batch).all():
        raise HTTPException(422, "instances contain NaN or infinity")
    return batch


def create_app(holder: ModelHolder) -> FastAPI:
    app = FastAPI(title=f"TensorDB model server: {holder.name}", version="1")

    def serving() -> Serving:
        current = holder.current  # read once: a swap during this request does not affect it
        if current is None:
            raise HTTPException(503, f"no {holder.alias!r} version of {holder.name!r} yet: promote one first")
        return current

    @app.get("/health")
    def health() -> dict[str, Any]:
        current = serving()
        return {"status": "ok", "model": holder.name, "version": current.version}

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
        current = serving()
        batch = _as_input(request.instances, current.model)
        outputs = np.asarray(current.model.predict_on_batch(batch))
        response: dict[str, Any] = {"model": holder.name, "version": current.version, "predictions": outputs.tolist()}
        if outputs.ndim == 2 and outputs.shape[1] > 1:
            response["classes"] = outputs.argmax(axis=1).tolist()
        return response

    return app


def follow_promotions(settings: Settings, holder: ModelHolder, stop: threading.Event) -> None:
    """Swap on each ``promoted`` event for the served model; check the alias now and then too."""
    consumer = make_consumer(settings, f"{settings.topic_prefix}-{settings.project}-serve-{uuid.uuid4().hex[:8]}", [Topic.MODEL_EVENTS])
    last_check = time.monotonic()
    try:
        while not stop.is_set():
            promoted = any(
                r.record and r.record["event"] == "promoted" and r.record["model_name"] == holder.name
                for r in receive(consumer, "model-event/1", timeout=0.5)
            )
            if promoted or time.monotonic() - last_check > ALIAS_CHECK_SECONDS:
                last_check = time.monotonic()
                try:
                    holder.refresh()
                except Exception:  # noqa: BLE001 - keep serving the current version; retry at the next check
                    log.exception("could not load the new version of %s", holder.name)
    finally:
        consumer.close()


def run(settings: Settings, model_name: str, host: str, port: int) -> None:
    """``tensordb serve``: serve ``model_name``'s production version until interrupted."""
    import uvicorn

    store = Store(settings)
    publisher = Publisher(settings)
    holder = ModelHolder(ModelRegistry(store, publisher), model_name)
    holder.refresh()
    stop = threading.Event()
    follower = threading.Thread(target=follow_promotions, args=(settings, holder, stop), name="tensordb-follow", daemon=True)
    follower.start()
    try:
        uvicorn.run(create_app(holder), host=host, port=port, log_level="info")
    finally:
        stop.set()
        follower.join(timeout=5)
        publisher.close()
        store.close()
