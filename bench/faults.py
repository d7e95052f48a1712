"""Reliability under faults: what the processors store, dead-letter, lose or duplicate, and how fast
they recover, when producers are careless and machines fail.

Every scenario runs on its own project with the real processors (``tensordb processors`` child
processes) against Tansu and mongod that this script starts on free ports (it kills them, so it
never uses servers named by TENSORDB_* variables). Producers are 4 threads publishing samples;
a record counts as acknowledged when the broker confirmed its delivery.

- acknowledged = records the broker confirmed; stored = sample (or log) documents; dead-lettered =
  dead letters; lost = acknowledged valid records not stored + acknowledged bad records not
  dead-lettered; duplicated = sample documents under an id no producer sent (a copy of a sample
  under another id: ids are unique, so a redelivery cannot make two documents of one id) + sample
  blobs beyond one per array stored in GridFS + policy counts beyond the samples stored. Samples
  this small keep their bytes in their document, so the ids, not blobs, are what a copy shows in.
- recovery = from the fault until the records stored (or dead-lettered) are again within one second
  of the records acknowledged, after having fallen behind (0 if they never fell behind).
- The two "no fault" rows measure the throughput cost of durable writes (journaled, majority) in
  this run: the same stream with ``w=1&journal=false`` in the MongoDB URI.
- The "predictor" and "worker" rows put the other supervised loops through the same faults (a
  ``tensordb predictor`` or ``tensordb worker`` child process, never restarted): records are predict
  requests or jobs; stored = requests answered with outputs (their answer stored and published) or
  jobs finished; dead-lettered = requests answered with an error (the poisoned ones: a sample whose
  stored bytes fail their checksum); lost = acknowledged requests without an answer, or jobs not
  finished; duplicated = requests with two different answers, or job scripts run twice.

    .venv/bin/python bench/faults.py           # full scale (~4 minutes on 2 cores)
    .venv/bin/python bench/faults.py --quick   # every scenario at a small scale, under 5 minutes

Ends with one ``RESULT <scenario> | acknowledged=N stored=N dead_lettered=N lost=N duplicated=N |
recovery=Ns`` line per scenario.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import json
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from harness import REPO, children_cwd, free_port, make_console, wait_for
from pymongo import MongoClient
from pymongo.database import Database
from rich.table import Table

from tensordb.config import Settings, Topic
from tensordb.infra.bus import Publisher, create_topics
from tensordb.infra.store import Store
from tensordb.loop.policies import Policies, Policy
from tensordb.records import Schema
from tensordb.runs.logger import RunLogger
from tensordb.services import LocalServices
from tensordb.testing import ChildProcess, processors_process

PRODUCERS = 4
#: The scenario whose throughput is compared with the clean stream's ("at most 1.5x slower").
UNSTORABLE = "unstorable integers (0.1 %)"
console = make_console()


@dataclass
class Row:
    scenario: str
    records: int
    acknowledged: int
    stored: int
    dead_lettered: int
    lost: int
    duplicated: int
    recovery: float | None
    rate: float  # records stored or dead-lettered per second, start to end
    note: str = ""


@dataclass
class Flow:
    """Records published by concurrent producers, with what the broker acknowledged."""

    valid: set[str] = field(default_factory=set)
    bad: int = 0
    sent: set[str] = field(default_factory=set)  # every sample id published, acknowledged or not, valid or not
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: float = 0.0
    times: list[float] = field(default_factory=list)  # when each record was acknowledged

    def acknowledge(self, sample_id: str | None) -> None:
        with self.lock:
            self.times.append(time.monotonic())
            if sample_id is None:
                self.bad += 1
            else:
                self.valid.add(sample_id)


def poison(i: int) -> bytes:
    """A bad record of one of many kinds (dumped with json: any client may send such bytes)."""
    sample = {"schema": Schema.SAMPLE, "sample_id": f"bad-{i}", "dataset": "flow",
              "arrays": {"x": {"dtype": "uint8", "shape": [4], "data": "AAECAw=="}}}  # fmt: skip
    kinds: list[Callable[[], object]] = [
        lambda: b"\xff\xfe not json",
        lambda: {**sample, "arrays": {"x": {"dtype": "uint8", "shape": [5], "data": "AAECAw=="}}},
        lambda: {**sample, "arrays": {"x": {"dtype": "float64", "shape": [2**32, 2**32], "values": []}}},
        lambda: {**sample, "arrays": {"x": {"dtype": "int64", "values": [2**70]}}},
        lambda: {**sample, "metadata": {"$where": 1}},
        lambda: {**sample, "metadata": {"a\u0000b": 1}},
        lambda: {**sample, "metadata": _nested(120)},
        lambda: {**sample, "schema": "sample/9"},
    ]
    if i % 200 == 0:  # now and then an oversized one (~700 KB)
        return json.dumps(
            {**sample, "metadata": {"blob": "x" * 700_000}, "arrays": {"x": {"dtype": "uint8", "shape": [9], "data": "AAAA"}}}
        ).encode()
    value = kinds[i % len(kinds)]()
    return value if isinstance(value, bytes) else json.dumps(value).encode()


def overflowing(i: int) -> bytes:
    """A sample whose ``version`` is an integer past 64 bits: valid JSON, refused by the schema's bound
    (before it, valid, and MongoDB refused the whole batch, which was then redone record by record)."""
    return json.dumps({"schema": Schema.SAMPLE, "sample_id": f"bad-{i}", "dataset": "flow", "version": 2**63,
                       "arrays": {"x": {"dtype": "uint8", "shape": [4], "data": "AAECAw=="}}}).encode()  # fmt: skip


def _nested(levels: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(levels):
        value = {"n": value}
    return value


def publish(
    settings: Settings,
    flow: Flow,
    count: int,
    bad_every: int = 0,
    per_second: float | None = None,
    first: int = 0,
    bad: Callable[[int], bytes] = poison,
) -> list[threading.Thread]:
    """Start PRODUCERS threads publishing ``count`` samples numbered from ``first`` (and a bad record,
    ``bad(i)``, every ``bad_every``), at most ``per_second`` in all."""
    data = base64.b64encode(np.arange(784, dtype=np.uint8).tobytes()).decode()
    flow.started = time.monotonic()

    def produce(worker: int) -> None:
        with Publisher(settings) as publisher:
            for n, i in enumerate(range(first + worker, first + count, PRODUCERS)):
                sample_id = f"s{i:07d}"
                with flow.lock:
                    flow.sent.update((sample_id, f"bad-{i}"))  # a poison record sent after it uses bad-{i}
                record = {"schema": Schema.SAMPLE, "sample_id": sample_id, "dataset": "flow",
                          "arrays": {"x": {"dtype": "uint8", "shape": [28, 28], "data": data}}, "labels": {"y": i % 10}}  # fmt: skip
                on_delivery = lambda error, message, sid=sample_id: error is None and flow.acknowledge(sid)  # noqa: E731
                _retrying(lambda: publisher.publish(Topic.INGEST, record, key=sample_id, on_delivery=on_delivery))
                if bad_every and i % bad_every == 0:
                    on_bad = lambda error, message: error is None and flow.acknowledge(None)  # noqa: E731
                    _retrying(
                        lambda: publisher.publish_bytes(settings.topic(Topic.INGEST), bad(i), key=sample_id, on_delivery=on_bad)
                    )
                if per_second and n % 20 == 19:
                    time.sleep(20 * PRODUCERS / per_second)
            _retrying(lambda: publisher.flush(30))

    threads = [threading.Thread(target=produce, args=(worker,), daemon=True) for worker in range(PRODUCERS)]
    for thread in threads:
        thread.start()
    return threads


def _retrying(call: Callable[[], object]) -> None:
    """Producers keep going through a broker outage: what is not acknowledged simply is not counted."""
    for _ in range(60):
        try:
            call()
            return
        except Exception:  # noqa: BLE001 - the broker is down: try again shortly
            time.sleep(0.5)


class Progress:
    """Samples the number of records processed (stored + dead-lettered) every 100 ms."""

    def __init__(self, settings: Settings, collection: str = "samples") -> None:
        self.settings, self.collection = settings, collection
        self.points: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with MongoClient(self.settings.mongo_uri, serverSelectionTimeoutMS=500) as client:
            db = client[self.settings.mongo_database]
            while not self._stop.wait(0.1):
                try:
                    done = db[self.collection].estimated_document_count() + db["dead_letters"].estimated_document_count()
                except Exception:  # noqa: BLE001 - mongod is down in some scenarios
                    continue
                self.points.append((time.monotonic(), done))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def recovery(self, fault_at: float, inputs: list[float]) -> float | None:
        """Seconds from ``fault_at`` until the records processed are again within one second of
        the input (``inputs``: when each record was acknowledged), after having fallen behind it;
        0.0 if they never fell behind; None if they never caught up."""
        inputs = sorted(inputs)
        fell_behind = False
        for t, done in self.points:
            if t <= fault_at:
                continue
            behind = done < bisect.bisect_right(inputs, t - 1.0)
            if behind:
                fell_behind = True
            elif fell_behind or done >= len(inputs):
                return t - fault_at if fell_behind else 0.0
        return None


class Lab:
    """Our own Tansu and mongod, which the scenarios kill and restart."""

    def __init__(self) -> None:
        self.run_dir = Path(tempfile.mkdtemp(prefix="tensordb-bench-faults-"))
        self.base = Settings(
            kafka_bootstrap=f"127.0.0.1:{free_port()}",
            mongo_uri=f"mongodb://127.0.0.1:{free_port()}/?replicaSet=rs0",
            services_dir=REPO / ".tensordb",
        )
        self.services = LocalServices(self.base, run_dir=self.run_dir)
        self.services.install()
        self.services.up()

    def close(self) -> None:
        for service in (self.services.tansu, self.services.mongod):  # no drain: the scenarios stopped their processors
            service.stop()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    @contextmanager
    def project(self, tag: str, mongo_options: str = "") -> Iterator[Settings]:
        name = f"faults-{tag}-{uuid.uuid4().hex[:6]}"
        settings = self.base.with_changes(
            project=name, mongo_database=f"faults_{name.replace('-', '_')}", mongo_uri=self.base.mongo_uri + mongo_options
        )
        create_topics(settings)
        with Store(settings) as store:
            store.ensure_indexes()
            Policies(store).register(
                Policy(
                    "count-all",
                    model={"name": "m"},
                    training={"filter": {"dataset": "flow"}},
                    validation={"filter": {}},
                    trigger={"every_samples": 10**9},
                )
            )
        try:
            yield settings
        finally:
            with MongoClient(self.base.mongo_uri) as client:
                client.drop_database(settings.mongo_database)

    def processors(self, settings: Settings, name: str) -> ChildProcess:
        process = processors_process(settings, self.run_dir / "logs" / f"{settings.project}-{name}.log")
        with children_cwd(self.run_dir / "cwd"):
            process.start()
        return process

    def kill(self, service: str) -> None:
        managed = getattr(self.services, service).process
        pid = managed.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            managed.wait_exit(timeout=10)

    def restart(self, service: str) -> None:
        getattr(self.services, service).start()
        create_topics(self.base)


def outcome(
    settings: Settings, flow: Flow, scenario: str, records: int, progress: Progress, recovery: float | None, note: str = ""
) -> Row:
    with Store(settings) as store:
        stored = store["samples"].count_documents({"_id": {"$in": sorted(flow.valid)}})
        extra = store["samples"].count_documents({}) - stored  # stored without an acknowledgement (kept)
        letters = store["dead_letters"].count_documents({})
        foreign = len(set(store["samples"].distinct("_id")) - flow.sent)
        extra_blobs = store["blobs.files"].count_documents({"metadata.kind": "sample-array"}) - blob_arrays(store)
        counted = Policies(store).document("count-all")["samples_counted"]
    total_stored = stored + extra
    duplicated = foreign + max(0, extra_blobs) + max(0, counted - total_stored)
    lost = (len(flow.valid) - stored) + max(0, flow.bad - letters)
    elapsed = (progress.points[-1][0] - flow.started) if progress.points else 0.0
    return Row(scenario, records, len(flow.valid) + flow.bad, total_stored, letters, lost, duplicated, recovery,
               (total_stored + letters) / max(elapsed, 1e-6), note)  # fmt: skip


def blob_arrays(store: Store) -> int:
    """How many arrays of the stored samples are GridFS blobs (the others are inline)."""
    counted = store["samples"].aggregate([
        {"$project": {"blobs": {"$size": {"$filter": {"input": {"$objectToArray": "$arrays"}, "cond": {"$ifNull": ["$$this.v.blob_id", False]}}}}}},
        {"$group": {"_id": None, "blobs": {"$sum": "$blobs"}}},
    ])  # fmt: skip
    return next(iter(counted), {"blobs": 0})["blobs"]


def settle(settings: Settings, flow: Flow, timeout: float = 120.0) -> None:
    """Wait until every acknowledged record is stored or dead-lettered (or ``timeout``)."""
    with MongoClient(settings.mongo_uri, serverSelectionTimeoutMS=30_000) as client:
        db = client[settings.mongo_database]
        try:
            wait_for(lambda: db["samples"].count_documents({}) + db["dead_letters"].count_documents({}) >= len(flow.valid) + flow.bad,
                     timeout=timeout, interval=0.2, what="every acknowledged record")  # fmt: skip
            wait_for(
                lambda: counted_samples(db, settings) >= db["samples"].count_documents({}),
                timeout=30,
                interval=0.2,
                what="the policy counter",
            )
        except AssertionError as exc:
            console.print(f"[red]{exc}[/]")


def counted_samples(db: Database, settings: Settings) -> int:
    """The policy counter of the scenario's project (read directly: mongod may just have restarted)."""
    document = db["policies"].find_one({"_id": f"{settings.project}:count-all"}) or {}
    return int(document.get("samples_counted", 0))


def run_flow(lab: Lab, scenario: str, count: int, fault: Callable[[Settings, list[ChildProcess]], None] | None = None,
             fault_after: float = 0.33, bad_every: int = 0, instances: int = 1, mongo_options: str = "",
             per_second: float | None = None, note: str = "", bad: Callable[[int], bytes] = poison) -> Row:  # fmt: skip
    with lab.project(scenario.split()[0], mongo_options) as settings:
        processes = [lab.processors(settings, f"p{i}") for i in range(instances)]
        try:
            flow = Flow()
            progress = Progress(settings)
            producers = publish(settings, flow, count, bad_every, per_second, bad=bad)
            fault_at = None
            if fault is not None:
                with MongoClient(settings.mongo_uri) as client:
                    wait_for(
                        lambda: client[settings.mongo_database]["samples"].estimated_document_count() >= count * fault_after,
                        timeout=120,
                        interval=0.05,
                        what="the fault point",
                    )
                fault_at = time.monotonic()
                fault(settings, processes)
            for producer in producers:
                producer.join()
            settle(settings, flow)
            progress.stop()
            recovery = progress.recovery(fault_at, flow.times) if fault_at else None
            return outcome(settings, flow, scenario, count + (count // bad_every if bad_every else 0), progress, recovery, note)
        finally:
            for process in processes:
                process.stop()


def log_sink_kill(lab: Lab, steps: int, per_second: float) -> Row:
    """A logger writes ``steps`` records at ``per_second``; the processors (and their log sink) are
    SIGKILLed a third of the way in and a new instance takes over."""
    with lab.project("logsink") as settings:
        first = lab.processors(settings, "first")
        second: ChildProcess | None = None
        try:
            progress = Progress(settings, "logs")
            started = time.monotonic()
            logged: list[float] = []
            with Publisher(settings) as publisher, RunLogger(publisher, run_id="faults") as logger:
                for step in range(steps):
                    logger.log(step, loss=1.0 / (step + 1))
                    logged.append(time.monotonic())
                    if step % 100 == 99:
                        time.sleep(100 / per_second)
                    if step == steps // 3:
                        logger.flush()
                        fault_at = time.monotonic()
                        first.kill()
                        second = lab.processors(settings, "second")
                logger.flush()
            with Store(settings) as store:
                wait_for(lambda: store["logs"].count_documents({}) >= steps, timeout=120, interval=0.2, what="every log record")
                stored = store["logs"].count_documents({})
                letters = store["dead_letters"].count_documents({})
            progress.stop()
            elapsed = progress.points[-1][0] - started if progress.points else 0.0
            return Row("log sink SIGKILL", steps, steps, stored, letters, steps - stored, 0, progress.recovery(fault_at, logged),
                       stored / max(elapsed, 1e-6), "log records; duplicates impossible (one _id per run/phase/step)")  # fmt: skip
        finally:
            first.stop()
            if second is not None:
                second.stop()


def broker_kill(lab: Lab, count: int) -> Row:
    """Samples stored, then Tansu SIGKILLed and restarted (empty: memory broker), then more
    samples: the processors reconnect and store those too."""
    with lab.project("broker") as settings:
        processes = [lab.processors(settings, "p0")]
        try:
            flow = Flow()
            progress = Progress(settings)
            for producer in publish(settings, flow, count // 2):
                producer.join()
            settle(settings, flow)
            fault_at = time.monotonic()
            lab.kill("tansu")
            lab.restart("tansu")
            create_topics(settings)
            second = Flow()
            for producer in publish(settings, second, count // 2, first=count // 2):
                producer.join()
            flow.valid |= second.valid
            flow.sent |= second.sent
            flow.times += second.times
            settle(settings, flow)
            progress.stop()
            return outcome(settings, flow, "broker SIGKILL + restart", count, progress, progress.recovery(fault_at, flow.times),
                           "memory broker: records stored before the kill, then a new stream")  # fmt: skip
        finally:
            for process in processes:
                process.stop()


MODEL = "faults-model"


def predictor_faults(lab: Lab, fault: str, count: int, per_second: float = 20.0) -> Row:
    """A ``tensordb predictor`` answers ``count`` requests sent at ``per_second`` while ``fault``
    happens: ``poison`` (every 10th request names a sample whose stored bytes fail their checksum),
    ``mongod outage`` (35 s) or ``broker restart`` (before the second half: a memory broker forgets
    the records it held, so the halves are sent on each side of the restart)."""
    import keras

    from streams.ingest import handle_samples
    from streams.processing import ProcessorContext, process_batch
    from tensordb import records
    from tensordb.infra.bus import Received
    from tensordb.models.registry import ModelRegistry
    from tensordb.testing import image_samples, predictor_process
    from tensordb.testing.models import small_classifier

    with lab.project(f"predictor-{fault.split()[0]}") as settings:
        settings = settings.with_changes(trusted_modules=("tensordb.testing.models",))
        keras.utils.set_random_seed(0)
        with Store(settings) as store, Publisher(settings) as publisher, ModelRegistry(store, publisher) as registry:
            registry.promote(MODEL, registry.save(small_classifier(units=4), MODEL)["version"])
        context = ProcessorContext(settings, processor="bench")
        samples = [records.validate(record, Schema.SAMPLE) for record in image_samples(2, dataset="flow")]
        process_batch(context, [Received("bench", 0, i, None, None, r, None) for i, r in enumerate(samples)], handle_samples)
        context.close()
        with MongoClient(settings.mongo_uri) as client:  # img00001's bytes no longer match their checksum
            samples_collection = client[settings.mongo_database]["samples"]
            poisoned = samples_collection.find_one({"_id": {"$regex": "img00001$"}})
            data = poisoned["arrays"]["x"]["data"]
            samples_collection.update_one({"_id": poisoned["_id"]}, {"$set": {"arrays.x.data": bytes(255 - b for b in data)}})
        predictor = predictor_process(settings, lab.run_dir / "logs" / f"{settings.project}-predictor.log", MODEL)
        with children_cwd(lab.run_dir / "cwd"):
            predictor.start()
        acknowledged: set[str] = set()
        rng = np.random.default_rng(0)
        started = time.monotonic()

        def send(first: int, last: int) -> None:
            with Publisher(settings) as publisher:
                for number in range(first, last):
                    request_id = f"r{number:05d}"
                    inputs = ({"sample": {"id": "img00001" if fault == "poison" else "img00000", "x": "x"}} if number % 10 == 5
                              else {"instances": rng.integers(0, 255, (1, 8, 8)).tolist()})  # fmt: skip
                    record = {"schema": Schema.PREDICT_REQUEST, "request_id": request_id, "model": MODEL, **inputs}
                    publisher.publish(Topic.PREDICT_REQUESTS, record, key=request_id,
                                      on_delivery=lambda error, _, i=request_id: error is None and acknowledged.add(i))  # fmt: skip
                    publisher.flush()
                    time.sleep(1 / per_second)

        store = Store(settings)
        answers = store["predictions"]  # an answer is stored before it is published, and its request committed after
        try:
            if fault == "broker restart":
                send(0, count // 2)
                wait_for(lambda: answers.count_documents({}) >= len(acknowledged), timeout=120, what="the first half")
                lab.kill("tansu")
                lab.restart("tansu")
                create_topics(settings)
                send(count // 2, count)
            else:
                sender = threading.Thread(target=send, args=(0, count))
                sender.start()
                if fault == "mongod outage":
                    time.sleep(count / per_second / 4)
                    lab.kill("mongod")
                    time.sleep(35)
                    lab.restart("mongod")
                sender.join()
            try:
                wait_for(lambda: answers.count_documents({}) >= len(acknowledged), timeout=120, interval=0.5,
                         what="every acknowledged request answered")  # fmt: skip
            except AssertionError as exc:
                console.print(f"[red]{exc}[/]")
            answered = {answer["request_id"]: answer for answer in answers.find()}
        finally:
            predictor.stop()
            store.close()
        errors = sum(1 for answer in answered.values() if "error" in answer)
        alive = (
            ""
            if predictor.process is None or predictor.process.returncode in (0, -15)
            else f"; exited {predictor.process.returncode}"
        )
        return Row(f"predictor: {fault}", count, len(acknowledged), len(answered) - errors, errors,
                   len(acknowledged - set(answered)), 0, None, len(answered) / (time.monotonic() - started),
                   "requests; one stored answer per id, so never two different ones" + alive)  # fmt: skip


def worker_faults(lab: Lab, fault: str, count: int) -> Row:
    """A ``tensordb worker`` runs ``count`` task jobs, submitted one a second, while ``fault``
    happens: ``mongod outage`` (35 s) or ``broker restart`` (Tansu SIGKILLed and started again)."""
    from tensordb.jobs.queue import Jobs, JobStatus
    from tensordb.testing import worker_process

    with lab.project(f"worker-{fault.split()[0]}") as settings:
        settings = settings.with_changes(task_script_dirs=(REPO / "tests" / "task_scripts",))
        marker = lab.run_dir / f"{settings.project}-runs.txt"
        worker = worker_process(settings, lab.run_dir / "logs" / f"{settings.project}-worker.log")
        with children_cwd(lab.run_dir / "cwd"):
            worker.start()
        started = time.monotonic()
        submitted: list[str] = []
        try:
            for number in range(count):
                if number == count // 3:
                    lab.kill("mongod" if fault == "mongod outage" else "tansu")
                    if fault == "mongod outage":
                        time.sleep(35)
                    lab.restart("mongod" if fault == "mongod outage" else "tansu")
                    create_topics(settings)
                with Store(settings) as store, Publisher(settings) as publisher:  # new clients: the servers may have restarted
                    submitted.append(Jobs(store, publisher).submit(
                        "task", name="faults", script=str(REPO / "tests" / "task_scripts" / "record_run.py"),
                        hyperparameters={"marker_file": str(marker), "value": number}, save_keys=["doubled"]))  # fmt: skip
                time.sleep(1.0)
            with Store(settings) as store, Publisher(settings) as publisher:
                jobs = Jobs(store, publisher)
                try:
                    jobs.wait(submitted, timeout=180)
                except Exception as exc:  # noqa: BLE001 - reported as lost
                    console.print(f"[red]{exc}[/]")
                finished = [job_id for job_id in submitted if jobs.get(job_id)["status"] == JobStatus.FINISHED]
        finally:
            worker.stop()
        runs = marker.read_text().split() if marker.exists() else []
        return Row(f"worker: {fault}", count, len(submitted), len(finished), 0, len(submitted) - len(finished),
                   len(runs) - len(set(runs)), None, len(finished) / (time.monotonic() - started),
                   "task jobs; duplicated = scripts run twice (an attempt failed and was retried)")  # fmt: skip


def scenarios(lab: Lab, quick: bool) -> dict[str, Callable[[], Row]]:
    """Each scenario by name, to run in this order."""
    n = 4000 if quick else 20_000
    rate = 400.0  # a steady stream for the outages, so that records arrive during them too
    outage = 35 if quick else 60

    def kill_one(settings: Settings, processes: list[ChildProcess]) -> None:
        processes[0].kill()

    def mongod_down(seconds: float) -> Callable[[Settings, list[ChildProcess]], None]:
        def fault(settings: Settings, processes: list[ChildProcess]) -> None:
            lab.kill("mongod")
            time.sleep(seconds)
            lab.restart("mongod")

        return fault

    return {
        "no fault (durable writes)": lambda: run_flow(lab, "no fault (durable writes)", n),
        "no fault (w=1, no journal)": lambda: run_flow(lab, "no fault (w=1, no journal)", n, mongo_options="&w=1&journal=false",
                                                       note="baseline of the durability cost"),
        "poison flood": lambda: run_flow(lab, "poison flood", n, bad_every=5,
                                         note="1 bad record per 5 good: garbage, mismatched, overflowing, deep, $/NUL keys, oversized"),
        UNSTORABLE: lambda: run_flow(lab, UNSTORABLE, n, bad_every=1000, bad=overflowing,
                                     note="1 record in 1,000 with an integer past 64 bits (a sample's version)"),
        "processor SIGKILL": lambda: run_flow(lab, "processor SIGKILL", int(rate * 20), fault=kill_one, fault_after=0.3, instances=2,
                                              per_second=rate, note="2 instances, one killed mid-stream"),
        "log sink SIGKILL": lambda: log_sink_kill(lab, 30_000 if quick else 100_000, per_second=2000),
        "mongod SIGKILL, down 5 s": lambda: run_flow(lab, "mongod SIGKILL, down 5 s", int(rate * 20), fault=mongod_down(5), fault_after=0.2,
                                                     per_second=rate),
        f"mongod outage {outage} s": lambda: run_flow(lab, f"mongod outage {outage} s", int(rate * (outage + 20)), fault=mongod_down(outage),
                                                      fault_after=0.1, per_second=rate, note="longer than pymongo's 30 s server selection timeout"),
        "broker SIGKILL + restart": lambda: broker_kill(lab, n),
        "predictor: poison": lambda: predictor_faults(lab, "poison", 200),
        "predictor: mongod outage": lambda: predictor_faults(lab, "mongod outage", 1200),
        "predictor: broker restart": lambda: predictor_faults(lab, "broker restart", 200),
        "worker: mongod outage": lambda: worker_faults(lab, "mongod outage", 6),
        "worker: broker restart": lambda: worker_faults(lab, "broker restart", 6),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every scenario at a small scale (under 5 minutes)")
    parser.add_argument(
        "--only", metavar="TEXT", action="append", help="only the scenarios whose name contains TEXT (repeatable)"
    )
    args = parser.parse_args()
    started = time.monotonic()
    lab = Lab()
    rows: list[Row] = []
    try:
        for name, scenario in scenarios(lab, args.quick).items():
            if args.only and not any(text in name for text in args.only):
                continue
            row = scenario()
            console.print(f"{row.scenario}: acknowledged {row.acknowledged}, stored {row.stored}, dead-lettered {row.dead_lettered}, "
                          f"lost {row.lost}, duplicated {row.duplicated}, recovery {_seconds(row.recovery)}, {row.rate:,.0f} records/s")  # fmt: skip
            rows.append(row)
    finally:
        lab.close()
    table = Table(
        "scenario", "records", "acknowledged", "stored", "dead-lettered", "lost", "duplicated", "recovery", "records/s", "note"
    )
    for row in rows:
        table.add_row(row.scenario, str(row.records), str(row.acknowledged), str(row.stored), str(row.dead_lettered), str(row.lost),
                      str(row.duplicated), _seconds(row.recovery), f"{row.rate:,.0f}", row.note)  # fmt: skip
    console.print(table)
    durable = next((row for row in rows if row.scenario == "no fault (durable writes)"), None)
    fast = next((row for row in rows if row.scenario.startswith("no fault (w=1")), None)
    if durable and fast:
        console.print(
            f"durable writes cost: {durable.rate:,.0f} vs {fast.rate:,.0f} records/s = {durable.rate / fast.rate:.2f}× the throughput"
        )
    unstorable = next((row for row in rows if row.scenario == UNSTORABLE), None)
    if durable and unstorable:
        console.print(f"0.1 % unstorable integers cost: {durable.rate:,.0f} vs {unstorable.rate:,.0f} records/s = "
                      f"{durable.rate / unstorable.rate:.2f}× slower (goal: at most 1.5×)")  # fmt: skip
    for row in rows:
        print(f"RESULT {row.scenario} | acknowledged={row.acknowledged} stored={row.stored} dead_lettered={row.dead_lettered} "
              f"lost={row.lost} duplicated={row.duplicated} | recovery={_seconds(row.recovery)}")  # fmt: skip
    console.print(f"wall time {time.monotonic() - started:.0f} s")
    return 0


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


if __name__ == "__main__":
    raise SystemExit(main())
