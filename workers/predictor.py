"""The streaming predictor (``tensordb predictor --policy NAME``): predictions on the bus.

It consumes ``predict-request`` records for one model (its production version, following
promotions like the model server, or a pinned ``--version``), groups them into micro-batches (as
many as have arrived, up to ``max_batch`` instances, waiting at most ``max_wait`` for more), runs
each batch through one loaded version and publishes one ``prediction`` record per request on the
predictions topic (and on the request's reply topic, which must be one of the project's
``PREFIX.PROJECT.replies.*`` topics).

Exactly one answer per request id: each answer is stored in the ``predictions`` collection
(``_id`` = request id) before it is published, and offsets are committed only after that, so a
request redelivered after a crash (or sent twice) is answered from the record of its first answer
(same outputs, same version): it is computed again, but the stored answer wins. The stored answer
is marked published once it is (off the batch's path, asynchronously), so a redelivery publishes
it again only if the first publication may not have happened; where a crash lost that mark, the
same answer is published twice, never a different one. A batch is answered by the version that was current when it started: a promotion
swaps the model between batches, after the new version is loaded and warmed up.

It runs under the contract of every loop (:mod:`tensordb.infra.supervision`): a request that
cannot be answered (instances of the wrong shape, a sample that is missing or whose stored bytes
fail their checksum, inputs the model fails on) gets an answer with ``error`` instead of outputs,
never fails the batch, and is never read again as a poison pill; outages of MongoDB and of the
broker (a restart that forgets the producer's id included) are waited out with bounded back-off,
the batch answered and its offsets committed afterwards; a consumer that fails is replaced; the
promotion follower is restarted if it dies. Its state is on ``/ready`` and ``tensordb_loop_ok``.

Several predictors of one model share the requests' partitions (one consumer group per model and
version); requests for other models are left to their predictors.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import numpy as np
from confluent_kafka import Consumer, KafkaException, TopicPartition

from tensordb import records
from tensordb.config import Settings, Topic
from tensordb.data.loader import sample_arrays
from tensordb.data.samples import SAMPLES, to_array
from tensordb.errors import BadInputError, TensorDBError, describe_error
from tensordb.infra import metrics
from tensordb.infra.bus import Received, close_consumer, make_consumer, receive
from tensordb.infra.codecs import from_base64
from tensordb.infra.store import insert_new
from tensordb.infra.supervision import FLUSH_SECONDS, SERVER_WAIT_MS, Stopping, Supervisor, is_transient
from tensordb.models.predictions import PREDICTIONS
from tensordb.models.serving import array_batch, instances_batch
from tensordb.records import Schema
from tensordb.runtime import Runtime
from workers.serve import ModelHolder, Serving, start_follower

log = logging.getLogger(__name__)

READY_LINE = "predictor ready"


def reply_topics(settings: Settings) -> str:
    """The prefix every reply topic must have: the project's own ``replies`` topics."""
    return f"{settings.acl_prefix()}replies."


class Predictor:
    """Answers the predict requests of one model (see the module docstring).

    Parameters
    ----------
    settings : Settings
        The project and servers.
    model : str
        The model (policy) name.
    version : int, optional
        Serve this version for good; default: the production version, following promotions.
    max_batch : int
        Most instances predicted at once.
    max_wait : float
        Seconds to wait for more requests once one has arrived (the micro-batch's latency budget).
    """

    def __init__(
        self, settings: Settings, model: str, version: int | None = None, max_batch: int = 64, max_wait: float = 0.005
    ) -> None:
        if max_batch < 1 or max_wait < 0:
            raise BadInputError(f"max_batch must be >= 1 and max_wait >= 0, got {max_batch} and {max_wait}")
        self.settings = settings
        self.model = model
        self.version = version
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._stop = threading.Event()
        self.supervisor = Supervisor(f"predictor-{model}", self._stop)
        # MongoDB calls and flushes give up within seconds, so that an outage is waited out (and a
        # stop noticed) by the supervisor rather than inside one call
        self.runtime = self.supervisor.wait_out(
            lambda: Runtime.open(settings, server_wait_ms=SERVER_WAIT_MS, flush_timeout=FLUSH_SECONDS), "connecting to MongoDB"
        )
        self.store, self.publisher = self.runtime.store, self.runtime.publisher
        self.supervisor.wait_out(lambda: self.store.ensure_indexes(PREDICTIONS), "preparing MongoDB collections")
        self.answers = self.store[PREDICTIONS]
        self.holder = ModelHolder(self.runtime.registry, model, pinned=version)
        self.answered = 0  # requests answered (stored and published) by this process
        self._marker = ThreadPoolExecutor(1, thread_name_prefix="tensordb-published")  # marks answers published
        self._consumer: Consumer | None = None  # while run() runs

    @property
    def group(self) -> str:
        """The consumer group shared by the predictors of this model (and version)."""
        return self.settings.processor_group(f"predictor-{self.model}" + (f"-v{self.version}" if self.version else ""))

    def stop(self) -> None:
        self._stop.set()

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Answer requests until :meth:`stop` (SIGTERM or SIGINT through the CLI)."""
        self._consumer = make_consumer(self.settings, self.group, [Topic.PREDICT_REQUESTS])
        follower = start_follower(self.settings, self.holder, self._stop) if self.version is None else None
        try:
            self._load_first(wait=False)  # ready with the version there is, if any
            if on_ready is not None:
                on_ready()
            self._load_first(wait=True)  # none yet: requests sent meanwhile wait in Kafka
            while not self._stop.is_set():
                batch = self.supervisor.wait_out(self._read, "reading predict requests", retry_failures=True)
                if not batch:
                    continue
                mine = [received for received in batch if self._mine(received)]
                # a bug stalls the predictor visibly (and /ready says so) rather than skipping requests
                self.supervisor.wait_out(lambda: self.answer(mine), f"answering {len(mine)} requests", retry_failures=True)
                self._commit(batch)
        except Stopping:
            pass  # the batch in hand is not committed: read again, and answered from the store
        finally:
            self._stop.set()
            if self._consumer is not None:
                close_consumer(self._consumer)
            if follower is not None:
                follower.join(timeout=5)
            self._marker.shutdown(wait=True)
            self.supervisor.close()
            try:
                self.runtime.close(timeout=5.0)
            except TensorDBError as exc:  # answers not delivered are published again when their requests are read again
                log.warning("predictor closed with undelivered answers: %s", exc)

    def _read(self) -> list[Received]:
        """The next batch of requests; a consumer that failed is replaced (it resumes from the
        committed offsets, so no request polled by the old one is skipped)."""
        assert self._consumer is not None, "run() reads"
        try:
            return self._next_batch(self._consumer)
        except Exception:
            close_consumer(self._consumer)
            self._consumer = make_consumer(self.settings, self.group, [Topic.PREDICT_REQUESTS])
            raise

    def _commit(self, batch: list[Received]) -> None:
        """Commit a batch that is answered (asynchronously: every answer is stored first, so a
        request read again is answered from the store)."""
        assert self._consumer is not None, "run() commits"
        try:
            self._consumer.commit(
                offsets=[TopicPartition(r.topic, r.partition, r.offset + 1) for r in _last_per_partition(batch)],
                asynchronous=True,
            )
        except KafkaException as exc:  # read again later and answered from the store
            log.warning("could not commit the offsets of answered requests (%s); they will be answered again", exc)

    def _load_first(self, wait: bool) -> None:
        """Load the version to serve; with ``wait``, until there is one (a policy may not have
        promoted one yet)."""
        waiting = False
        while not self._stop.is_set() and self.holder.current is None:
            try:
                self.holder.refresh()
            except Exception as exc:  # noqa: BLE001 - none stored yet, or MongoDB unreachable: tried again
                log.warning("cannot load a version of %s yet: %s", self.model, describe_error(exc))
            if self.holder.current is not None or not wait:
                return
            if not waiting:
                log.info("waiting for a %s version of %s", f"v{self.version}" if self.version else "production", self.model)
                waiting = True
            self._stop.wait(1.0)

    def _next_batch(self, consumer: Any) -> list[Received]:
        """The requests that have arrived, up to ``max_batch`` instances, waiting at most
        ``max_wait`` for more once one has (adaptive: a lone request goes at once when idle)."""
        batch = list(receive(consumer, Schema.PREDICT_REQUEST, timeout=0.5, max_messages=self.max_batch))
        deadline = time.monotonic() + self.max_wait
        while batch and _instances_in(batch) < self.max_batch and (left := deadline - time.monotonic()) > 0:
            batch.extend(receive(consumer, Schema.PREDICT_REQUEST, timeout=left, max_messages=self.max_batch - len(batch)))
        return batch

    def _mine(self, received: Received) -> bool:
        """A valid request for this model and version (invalid ones are the processors' dead letters)."""
        record = received.record
        return record is not None and record["model"] == self.model and record.get("version") == self.version

    # -- answering -------------------------------------------------------------------------------
    def answer(self, batch: list[Received]) -> list[dict[str, Any]]:
        """Answer each request of ``batch`` once (see the module docstring); returns the answers."""
        requests: dict[str, Received] = {}
        for received in batch:
            requests.setdefault(received.valid_record["request_id"], received)  # a request sent twice in one batch
        if not requests:
            return []
        serving = self.holder.current  # one version answers the whole batch
        assert serving is not None  # run() waits for one
        started = time.monotonic()
        now = datetime.now(UTC)
        documents = [{**answer, "_id": answer["request_id"], "project": self.store.project, "published": False, "stored_at": now}
                     for answer in self._compute(serving, list(requests.values()))]  # fmt: skip
        # first answer wins: a request answered before (redelivered after a crash, sent twice, raced by
        # another predictor) keeps its stored answer, and this one is dropped
        duplicates, _ = insert_new(self.answers, documents)
        stored = {document["_id"]: document for index, document in enumerate(documents) if index not in duplicates}
        if duplicates:
            earlier = self.answers.find({"_id": {"$in": [documents[index]["_id"] for index in duplicates]}})
            stored |= {document["_id"]: document for document in earlier}
        answers = [stored[request_id] for request_id in requests]
        unpublished = [(answer, requests[answer["_id"]]) for answer in answers if not answer.get("published")]
        for answer, received in unpublished:
            record = _record(answer)
            self.publisher.publish(Topic.PREDICTIONS, record, key=answer["_id"])
            reply = received.valid_record.get("reply_topic")
            if reply and reply.startswith(reply_topics(self.settings)):
                self.publisher.publish_bytes(reply, records.encode(record, Schema.PREDICTION), key=answer["_id"])
        self.publisher.flush()
        if unpublished:  # off the batch's path: if it is lost, a redelivery publishes the same answer again
            ids = [answer["_id"] for answer, _ in unpublished]
            self._marker.submit(self.answers.update_many, {"_id": {"$in": ids}}, {"$set": {"published": True}})
        self.answered += len(unpublished)
        metrics.observe_predictions(self.model, "kafka", _instances_in(batch), time.monotonic() - started)
        return [_record(answer) for answer in answers]

    def _compute(self, serving: Serving, requests: list[Received]) -> list[dict[str, Any]]:
        """Predict every request's instances in one call per ``max_batch`` instances."""
        inputs: list[np.ndarray | None] = []
        errors: list[str | None] = []
        for received in requests:
            try:
                inputs.append(self._instances(received.valid_record, serving))
                errors.append(None)
            except Exception as exc:
                if is_transient(exc):  # an outage: the supervisor waits it out and answers the batch again
                    raise
                inputs.append(None)  # bad input, a sample whose bytes fail their checksum...: answered with the error
                errors.append(describe_error(exc))
        results = self._predict(serving, inputs, errors)
        now = datetime.now(UTC)
        answers = []
        for received, result, error in zip(requests, results, errors, strict=True):
            request = received.valid_record
            answer: dict[str, Any] = {
                "schema": Schema.PREDICTION, "request_id": request["request_id"], "model": self.model, "version": serving.version,
                "answered_at": now.isoformat(), "via": "stream",
                "latency_ms": max(0.0, now.timestamp() * 1000 - received.timestamp) if received.timestamp > 0 else 0.0,
            }  # fmt: skip
            if "sample" in request:
                answer["sample_id"] = request["sample"]["id"]
            if result is None:
                answer["error"] = error
            else:
                answer["outputs"] = result.tolist()
                if result.ndim == 2 and result.shape[1] > 1:
                    answer["classes"] = result.argmax(axis=1).tolist()
            answers.append(answer)
        return answers

    def _predict(self, serving: Serving, inputs: list[np.ndarray | None], errors: list[str | None]) -> list[np.ndarray | None]:
        """Each request's outputs (None where it has no inputs), predicted in one call per
        ``max_batch`` instances; if the model fails on the batch, request by request, so that only
        the requests it fails on alone get an error (set in ``errors``)."""
        valid = [batch for batch in inputs if batch is not None]
        if not valid:
            return [None] * len(inputs)
        try:
            outputs = self._run_model(serving, np.concatenate(valid))
        except Exception as exc:  # noqa: BLE001 - isolated below
            log.warning("the model failed on a batch of %d requests (%s: %s); predicting them one by one",
                        len(valid), type(exc).__name__, exc)  # fmt: skip
            return [self._predict_alone(serving, batch, errors, index) for index, batch in enumerate(inputs)]
        results: list[np.ndarray | None] = []
        offset = 0
        for batch in inputs:
            results.append(None if batch is None else outputs[offset : offset + len(batch)])
            offset += 0 if batch is None else len(batch)
        return results

    def _predict_alone(
        self, serving: Serving, batch: np.ndarray | None, errors: list[str | None], index: int
    ) -> np.ndarray | None:
        if batch is None:
            return None
        try:
            return self._run_model(serving, batch)
        except Exception as exc:  # noqa: BLE001 - this request's answer says so
            errors[index] = f"the model {self.model} v{serving.version} failed on these inputs: {describe_error(exc)}"
            return None

    def _run_model(self, serving: Serving, stacked: np.ndarray) -> np.ndarray:
        """The model's outputs for ``stacked`` instances, in calls of ``max_batch`` at most."""
        return np.concatenate([
            np.asarray(serving.model.predict_on_batch(stacked[start : start + self.max_batch]))
            for start in range(0, len(stacked), self.max_batch)
        ])  # fmt: skip

    def _instances(self, request: dict[str, Any], serving: Serving) -> np.ndarray:
        """A request's inputs as a float32 batch that fits the model, or :class:`BadInputError`."""
        if "instances" in request:
            return instances_batch(request["instances"], serving.model)
        if "array" in request:
            spec = request["array"]
            try:
                array = to_array(from_base64(spec["data"]), spec)
            except ValueError as exc:
                raise BadInputError(f"array: its bytes do not hold {spec['dtype']}{spec['shape']} ({exc})") from None
            return array_batch(array, serving.model)
        sample = request["sample"]
        document = self.store[SAMPLES].find_one({"_id": sample["id"]})
        if document is None or sample["x"] not in document["arrays"]:
            raise BadInputError(
                f"sample {sample['id']!r} with an array {sample['x']!r} is not stored in project {self.store.project!r}"
            )
        only_x = {**document, "arrays": {sample["x"]: document["arrays"][sample["x"]]}}
        return array_batch(sample_arrays(self.store, [only_x])[0][sample["x"]][np.newaxis], serving.model)


def _instances_in(batch: list[Received]) -> int:
    """How many instances the valid requests of ``batch`` hold."""
    count = 0
    for received in batch:
        request = received.record or {}
        count += (
            len(request["instances"]) if "instances" in request else request["array"]["shape"][0] if "array" in request else 1
        )
    return count


def _record(answer: dict[str, Any]) -> dict[str, Any]:
    """The ``prediction/1`` record of a stored answer."""
    return {key: value for key, value in answer.items() if key not in ("_id", "project", "published", "stored_at")}


def _last_per_partition(batch: list[Received]) -> list[Received]:
    last: dict[tuple[str, int], Received] = {}
    for received in batch:
        key = (received.topic, received.partition)
        if key not in last or received.offset > last[key].offset:
            last[key] = received
    return list(last.values())


def run(settings: Settings, model: str, version: int | None = None, max_batch: int = 64, max_wait_ms: float = 5.0) -> None:
    """``tensordb predictor``: answer predict requests until SIGINT or SIGTERM."""
    import signal

    predictor = Predictor(settings, model, version, max_batch, max_wait_ms / 1000)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: predictor.stop())
    predictor.run(
        on_ready=lambda: log.info(
            "%s: %s %s (group %s)", READY_LINE, model, f"v{version}" if version else "production", predictor.group
        )
    )
