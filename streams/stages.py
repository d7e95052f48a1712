"""Transform stages on the stream: each stage derives samples from the samples it reads, as they
arrive (one consumer group per stage on ``data-imported``, or on ``predictions`` for a stage of a
model's answers, so processor instances share the work by partition) and, on request, from those stored before (a backfill, advanced in batches under a
lease, so a killed processor's backfill resumes where it stopped).

Derived samples are stored by the ingest processor's own code, in process (no second Kafka hop),
straight from their bytes (no base64 record in between): checked, stored once under their
deterministic ids, and announced on ``data-imported``, so stages chain and retrain triggers count
derived samples like any others. A source sample whose
function raises or returns something that is not samples is dead-lettered with the stage's error
(topic ``stage:NAME``), and the others go on. A function the processors do not trust pauses the
stage with the reason, and its events wait, unread, for ``tensordb stage resume``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from streams.consumer import TopicProcessor
from streams.ingest import ArrayBytes, Prepared, announce, sample_document, store_samples, stored_arrays
from streams.processing import Handler, ProcessorContext
from tensordb.config import Settings, Topic
from tensordb.data.loader import sample_arrays
from tensordb.data.samples import SAMPLES, SampleOrigin, array_nbytes, dtype_name
from tensordb.errors import (
    EntryPointError,
    IntegrityError,
    SampleError,
    StageFunctionError,
    StageNotFoundError,
    UntrustedCodeError,
)
from tensordb.infra.bus import Received
from tensordb.infra.supervision import Stopping
from tensordb.infra.trusted import load_entry_point
from tensordb.stages.derive import DerivedSample, derive
from tensordb.stages.spec import parse_stage
from tensordb.stages.stages import Stages, live_query, source_collection, source_query

log = logging.getLogger(__name__)

#: Source samples whose arrays are read at a time.
CHUNK = 200
#: Source samples a backfill derives, stores and records as one step (its writes and its progress
#: are journaled once per step, so larger steps wait less per sample).
BACKFILL_STEP = 500
#: How often an idle backfill runner looks for a backfill to do (a query that finds nothing, when none is asked for).
BACKFILL_POLL_SECONDS = 0.2
#: How long a backfill stays a processor's without progress before another one takes it over.
BACKFILL_LEASE = timedelta(seconds=30)


def stage_kind(name: str) -> str:
    """The processor kind, and so the consumer group, of a stage."""
    return f"stage-{name}"


def _stage_topic(name: str) -> str:
    return f"stage:{name}"


#: A source: a stored sample, and the model's answer about it for stages of predictions.
Source = tuple[dict[str, Any], dict[str, Any] | None]


def apply_stage(context: ProcessorContext, stage: dict[str, Any], sources: list[Source]) -> tuple[int, int]:
    """Derive from ``sources``, store what was derived, dead-letter the sources that failed;
    returns (derived, failed). Idempotent: derived ids are deterministic."""
    spec = parse_stage(stage["spec"])
    function = load_entry_point(spec.function, context.settings)
    prepared: list[Prepared] = []
    failures: list[tuple[dict[str, Any], Exception]] = []
    now = datetime.now(UTC)
    for start in range(0, len(sources), CHUNK):
        chunk = sources[start : start + CHUNK]
        arrays = _read(context, [document for document, _ in chunk], failures)
        for document, prediction in chunk:
            if document["_id"] not in arrays:
                continue
            try:
                derived = derive(spec, function, document, arrays[document["_id"]], prediction)
                prepared.extend([_prepared(context, spec.name, spec.version, sample, now) for sample in derived])
            except (StageFunctionError, SampleError) as exc:
                failures.append((document, exc))
    if prepared:  # stored once each, announced: the next stages and triggers see them
        stored, _ = store_samples(context, prepared)
        announce(context, stored, now)
    if failures:
        context.dead_letters.divert_many(
            [(_source_letter(spec.name, spec.version, document), error) for document, error in failures]
        )
    return len(prepared), len(failures)


def _prepared(context: ProcessorContext, stage: str, version: int, sample: DerivedSample, now: datetime) -> Prepared:
    """A derived sample's document and blobs, built from its bytes as ingest builds a record's,
    with the dead letter that would report it if MongoDB refused it."""
    store, fields = context.store, sample.fields
    in_hand: dict[str, ArrayBytes] = {}
    for name, array in sample.arrays.items():
        shape = list(array.shape)
        kind = dtype_name(array.dtype)
        array_nbytes(name, kind, shape, store.settings.max_sample_bytes)
        in_hand[name] = (kind, shape, array.tobytes())
    arrays, blobs = stored_arrays(store, fields["dataset"], sample.sample_id, in_hand)
    origin: SampleOrigin = {"topic": _stage_topic(stage), "partition": version, "offset": 0}  # lineage says the rest
    document = sample_document(store, fields, sample.sample_id, arrays, now, origin, announced=True)  # announced below
    letter = orjson.dumps({"stage": stage, "stage_version": version, "sample_id": sample.sample_id, **fields})
    return Received(_stage_topic(stage), version, 0, sample.sample_id.encode(), letter, None, None), document, blobs


def _read(
    context: ProcessorContext, documents: list[dict[str, Any]], failures: list[tuple[dict[str, Any], Exception]]
) -> dict[str, dict[str, Any]]:
    """The arrays of each sample, by id; a sample whose bytes are damaged is a failure of its own."""
    unique = list({document["_id"]: document for document in documents}.values())
    try:
        return {document["_id"]: arrays for document, arrays in zip(unique, sample_arrays(context.store, unique), strict=True)}
    except IntegrityError:
        read = {}
        for document in unique:
            try:
                read[document["_id"]] = sample_arrays(context.store, [document])[0]
            except IntegrityError as exc:
                failures.append((document, exc))
        return read


def _source_letter(stage: str, version: int, document: dict[str, Any]) -> Received:
    """What a failed source sample's dead letter records: the stage, its version and the sample id
    (the same letter for the same failure, however often it is retried)."""
    value = orjson.dumps({"stage": stage, "stage_version": version, "sample_id": document["_id"]})
    return Received(_stage_topic(stage), version, 0, document["_id"].encode(), value, None, None)


def stage_handler(name: str) -> Handler:
    """The handler of one stage's events: ``data-imported`` events, or a model's ``prediction`` records."""

    def handle(context: ProcessorContext, batch: list[Received]) -> None:
        stages = Stages(context.store)
        stage = _runnable(context, stages, name)
        sources: list[Source]
        if "predictions" in stage["spec"]["input"]:
            sources = _answered_sources(context, stage, [received.valid_record for received in batch], since=stage["since"])
        else:
            ids = sorted({sample_id for received in batch for sample_id in received.valid_record["sample_ids"]})
            sources = [(document, None) for document in _samples(context, live_query(stage), ids)]
        if sources:
            derived, failed = apply_stage(context, stage, sources)
            stages.count(name, stage["version"], len(sources), derived, failed)

    return handle


def _samples(context: ProcessorContext, query: dict[str, Any], ids: list[str]) -> list[dict[str, Any]]:
    """The stored samples among ``ids`` that match ``query``."""
    documents: list[dict[str, Any]] = []
    for start in range(0, len(ids), CHUNK * 10):
        documents.extend(context.store[SAMPLES].find({"$and": [query, {"_id": {"$in": ids[start : start + CHUNK * 10]}}]}))
    return documents


def _answered_sources(
    context: ProcessorContext, stage: dict[str, Any], answers: list[dict[str, Any]], since: datetime | None
) -> list[Source]:
    """The stage model's answers (given since ``since``, if not None) about stored samples, each with its sample."""
    model = stage["spec"]["input"]["predictions"]["model"]
    wanted = [answer for answer in answers if answer["model"] == model and "sample_id" in answer and "error" not in answer
              and (since is None or datetime.fromisoformat(answer["answered_at"]) >= since)]  # fmt: skip
    documents = {
        document["_id"]: document for document in _samples(context, {}, sorted({answer["sample_id"] for answer in wanted}))
    }
    return [(documents[answer["sample_id"]], answer) for answer in wanted if answer["sample_id"] in documents]


def _runnable(context: ProcessorContext, stages: Stages, name: str) -> dict[str, Any]:
    """The stage, once it is neither paused nor untrusted here; meanwhile the batch waits (uncommitted)
    until the processors stop this stage's consumer."""
    while True:
        try:
            stage = stages.get(name)
        except StageNotFoundError:
            stage = None
        if stage is not None and not stage["paused"]:
            try:
                load_entry_point(stage["spec"]["function"], context.settings)
                return stage
            except (UntrustedCodeError, EntryPointError) as exc:
                log.error("stage %s paused: %s", name, exc)
                stages.collection.update_one({"_id": name}, {"$set": {"paused": True, "error": str(exc)}})
        if context.stopping.wait(1.0):
            raise Stopping(f"stage {name} is paused or deleted")


class StageProcessors:
    """One consumer per active stage, started and stopped as stages are registered, paused,
    resumed and deleted (:meth:`reconcile` runs on the processors' timer), and the backfill runner."""

    def __init__(self, settings: Settings, holder: str) -> None:
        self.settings = settings
        self.holder = holder
        self.running: dict[str, tuple[TopicProcessor, threading.Thread]] = {}
        self.stopping: dict[str, threading.Thread] = {}
        self._stop = threading.Event()
        self._backfills = threading.Thread(target=self._run_backfills, name="tensordb-backfills", daemon=True)

    def start(self) -> None:
        self._backfills.start()

    def reconcile(self, stages: Stages) -> None:
        """Start the consumers of active stages, stop those of paused or deleted ones."""
        self.stopping = {name: thread for name, thread in self.stopping.items() if thread.is_alive()}
        active = {stage["_id"]: stage for stage in stages.collection.find({"paused": False}, {"spec.input": 1})}
        wanted = set(active)
        for name in sorted(set(self.running) - wanted):
            processor, thread = self.running.pop(name)
            processor.stop()
            self.stopping[name] = thread
            log.info("stage %s stopped", name)
        for name in sorted(wanted - set(self.running) - set(self.stopping)):
            topic = Topic.PREDICTIONS if "predictions" in active[name]["spec"]["input"] else Topic.DATA_IMPORTED
            processor = TopicProcessor(self.settings, stage_kind(name), topic, stage_handler(name), 50, counts_progress=False)
            thread = threading.Thread(target=processor.run, name=f"tensordb-{stage_kind(name)}", daemon=True)
            thread.start()
            self.running[name] = (processor, thread)
            log.info("stage %s running (consumer group %s)", name, processor.group)

    def stop(self, wait: Callable[[threading.Thread], None] = lambda thread: thread.join(15.0)) -> None:
        self._stop.set()
        for processor, _ in self.running.values():
            processor.stop()
        for thread in [thread for _, thread in self.running.values()] + list(self.stopping.values()) + [self._backfills]:
            if thread.is_alive():
                wait(thread)

    # -- backfills ---------------------------------------------------------------------------------
    def _run_backfills(self) -> None:
        try:
            context = ProcessorContext(self.settings, processor="backfill", stopping=self._stop)
        except Stopping:
            return
        try:
            while not self._stop.is_set():
                try:
                    claimed = context.wait_out(
                        lambda: Stages(context.store).claim_backfill(self.holder, BACKFILL_LEASE), "claiming backfills"
                    )
                    if claimed is None:
                        self._stop.wait(BACKFILL_POLL_SECONDS)
                        continue
                    context.wait_out(
                        lambda: backfill(context, claimed, self.holder, self._stop), f"backfilling stage {claimed['_id']}"
                    )
                except Stopping:
                    return
                except Exception:  # noqa: BLE001 - a bug or a bad stage must not end the backfills of others
                    log.exception("backfill failed; its lease expires and it is taken up again")
                    self._stop.wait(5.0)
        finally:
            context.close()


def backfill(context: ProcessorContext, stage: dict[str, Any], holder: str, stop: threading.Event) -> None:
    """Apply the stage to stored input samples in ``_id`` order from where its backfill stopped,
    recording each batch (and renewing the lease) as it is stored; returns when done, stopped or
    no longer this holder's."""
    stages, name = Stages(context.store), stage["_id"]
    state = stage["backfill"]
    if state["version"] != stage["version"]:  # a newer version was registered since it was asked for
        stages.finish_backfill(name, holder)
        return
    after = state["after"]
    collection = context.store[source_collection(stage)]
    while not stop.is_set():
        query = source_query(stage) if after is None else {"$and": [source_query(stage), {"_id": {"$gt": after}}]}
        found = list(collection.find(query).sort("_id", 1).limit(BACKFILL_STEP))
        if not found:
            stages.finish_backfill(name, holder)
            log.info("backfill of stage %s v%s done", name, stage["version"])
            return
        sources: list[Source]
        if "predictions" in stage["spec"]["input"]:  # every stored answer, whenever it was given
            sources = _answered_sources(context, stage, found, since=None)
        else:
            sources = [(document, None) for document in found]
        derived, failed = apply_stage(context, stage, sources)
        context.publisher.flush()
        after = found[-1]["_id"]
        if not stages.advance_backfill(name, holder, BACKFILL_LEASE, after, len(found), derived, failed):
            return  # taken over by another processor after this one stalled
