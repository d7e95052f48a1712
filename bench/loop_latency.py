#!/usr/bin/env python
"""Loop latency benchmark: how soon a worker starts a job, and how soon the continuous loop reacts.

Measured in one run, on one machine, against servers this script starts (or those named by
TENSORDB_KAFKA_BOOTSTRAP and TENSORDB_MONGO_URI), each part in its own throwaway project:

1. Job dispatch (issue 4, goal p50 ≤ 200 ms). One idle ``tensordb worker``; N trivial ``task`` jobs
   (bench/task_noop.py), each submitted once the previous one has finished and after a random
   pause of 0–2 s, so that submissions fall at random phases of any polling cycle. Latency:
   ``started_at − submitted_at`` of the job document (both set by the code: at submission and at
   the claim), and until the worker's ``started`` job event (its ``at``, and when a consumer here
   received it). Baseline, in the same run and interleaved job by job: the same claim
   (``Jobs.claim``) made by a loop that polls every second, as TensorLayer's runner did
   (``while True: find a pending task, else sleep(1)``), on a second project.
2. Continuous loop (issue 5). Processors, one worker and the model server of a policy (digits,
   ``every_samples`` trigger, promotion margin 0). Each round publishes a wave that crosses the
   threshold, and waits for train → evaluate → decision → swap. Per round: (a) data published (when
   ``publish_samples`` returned, i.e. after the flush) → retrain job submitted / started (the job's
   ``submitted_at`` / ``started_at``); (b) promotion (the ``production`` alias document's ``time``,
   written by ``ModelRegistry.promote``) → first ``POST /predict`` answered by the new version,
   polled from here. Each round trains on more data for more epochs, so the candidate usually beats
   production; a round that is not promoted counts for (a) only.
3. The broker hop alone: records produced one at a time, received by TensorDB consumers
   (``make_consumer`` + ``receive``, as a ``TopicProcessor`` reads) with the processors' fetch wait
   (``tensordb.infra.bus.FETCH_WAIT_MS``), a middle value and librdkafka's default 500 ms: what each
   hop costs; and the broker's CPU per idle consumer at each wait (goal: hop p50 ≤ 100 ms).

The table's last column says what dominates each figure; the notes under it say why.

    .venv/bin/python bench/loop_latency.py [--jobs 30] [--rounds 8] [--hops 20] [--quick] [--skip dispatch|loop|hop]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from confluent_kafka import Producer
from harness import BENCH, CpuMeter, Pids, children_cwd, free_port, make_console, project, servers, wait_for
from rich.table import Table
from sklearn.datasets import load_digits

from tensordb import records
from tensordb.client import TensorDB
from tensordb.config import Settings, Topic
from tensordb.data.samples import SAMPLES
from tensordb.infra.bus import FETCH_WAIT_MS, Publisher, make_consumer, receive
from tensordb.infra.store import Store
from tensordb.jobs.queue import UNFINISHED, Jobs, JobStatus
from tensordb.loop.policies import Policies, Policy
from tensordb.loop.promotion import DECISIONS, PRODUCTION
from tensordb.records import Schema
from tensordb.testing import ChildProcess, processors_process, server_process, worker_process

console = make_console(200)

# -- 1. dispatch
NOOP = BENCH / "task_noop.py"
GOAL_SECONDS = 0.200  # issue 4: publish → training started, p50
MAX_PAUSE = 2.0  # random pause before each submission: covers the worker's 2 s scan and the 1 s poll
POLL_PERIOD = 1.0  # TensorLayer's runner: sleep(1) when no task is pending
WARMUP_JOBS = 2  # per side: consumer-group join, first task subprocess
IDLE_SCAN = 2.0  # the worker's idle_scan_seconds: how long its loop waits for a doorbell

# -- 3. the broker hop
LIBRDKAFKA_FETCH_WAIT_MS = 500  # librdkafka's default fetch.wait.max.ms
HOP_GOAL_SECONDS = 0.100  # issue 14: every hop p50 ≤ 100 ms
LOOP_GOAL_SECONDS = 0.300  # issue 14: data published → retrain job started p50 ≤ 300 ms
IDLE_CONSUMERS = 10  # idle consumers whose empty fetches the broker serves, per fetch wait
IDLE_SECONDS = 5.0

# -- 2. the loop
POLICY = "digits"
WAVE = 100  # samples per wave = the policy's threshold: every wave is one crossing
DIGITS_X, DIGITS_Y = load_digits(return_X_y=True)
VALIDATION = [i for i in range(len(DIGITS_Y)) if i % 6 == 5]  # 300, spread over all writers
TRAINING = [i for i in range(len(DIGITS_Y)) if i % 6 != 5]  # 1497: up to 14 waves
HYPERPARAMETERS = {"units": 64, "classes": 10, "scale": 1 / 16, "learning_rate": 0.003}
EPOCHS = [1, 1, 2, 3, 5, 8, 12, 16, 20, 24, 28, 32, 36, 40]  # per round: more data and more epochs
PREDICT_PAUSE = 0.002  # between two requests of the poller: keeps the server from hogging a core


# -- measuring --------------------------------------------------------------------------------------


def since(later: datetime | float, earlier: datetime) -> float:
    """Seconds from ``earlier`` to ``later`` (a datetime or a time.time() value)."""
    if isinstance(later, float):
        later = datetime.fromtimestamp(later, UTC)
    return (later - earlier).total_seconds()


@dataclass
class Stats:
    """Latencies in seconds: p50, p95 (linear interpolation) and max."""

    values: list[float]

    def __bool__(self) -> bool:
        return bool(self.values)

    @property
    def p50(self) -> float:
        return float(np.percentile(self.values, 50)) if self.values else math.nan

    @property
    def p95(self) -> float:
        return float(np.percentile(self.values, 95)) if self.values else math.nan

    @property
    def max(self) -> float:
        return max(self.values) if self.values else math.nan

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan


def ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1e3:,.0f} ms"


@dataclass
class Row:
    measure: str
    ours: Stats
    baseline: Stats | None = None
    baseline_label: str = ""
    goal: str = ""
    met: bool | None = None
    dominant: str = ""  # one line in the table
    notes: str = ""  # the explanation, printed under the table


class Watcher(threading.Thread):
    """Records when each record of one topic arrives here (wall clock), decoded.

    An eager consumer (``poll``, ``fetch.wait.max.ms`` 10), so the arrival is close to the moment
    the record was produced: what a dashboard following the topic could see at best.
    """

    def __init__(self, settings: Settings, topic: Topic, schema: str) -> None:
        super().__init__(name=f"watch-{topic.value}", daemon=True)
        group = f"bench-watch-{topic.value}-{uuid.uuid4().hex[:8]}"
        self.consumer = make_consumer(settings, group, [topic], **{"fetch.wait.max.ms": 10})
        self.schema = schema
        self.seen: list[tuple[float, dict[str, Any]]] = []
        self.joined = threading.Event()
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                message = self.consumer.poll(0.1)
                if not self.joined.is_set() and self.consumer.assignment():
                    self.joined.set()
                if message is None or message.error():
                    continue
                self.seen.append((time.time(), records.decode(message.value(), self.schema)))
        finally:
            self.consumer.close()

    def first(self, **fields: Any) -> tuple[float, dict[str, Any]] | None:
        """The first record whose fields equal ``fields``: (arrival time.time(), record)."""
        return next(((at, r) for at, r in list(self.seen) if all(r.get(k) == v for k, v in fields.items())), None)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)


# -- 1. job dispatch ----------------------------------------------------------------------------------


class Runner(threading.Thread):
    """A claiming loop in this process, for comparison with the worker: it claims with the same
    atomic ``Jobs.claim`` and finishes each job at once (the task does nothing), so it differs from
    the worker only in how it learns that a job is waiting.

    ``doorbell=None``: TensorLayer's runner, ``while True: claim a pending job, else sleep(1)``.
    Otherwise the worker's own loop on a bare ``Consumer.poll`` with a 10 ms fetch wait: the
    lower bound the Kafka doorbell allows.
    """

    def __init__(self, jobs: Jobs, doorbell: Settings | None = None, period: float = POLL_PERIOD) -> None:
        super().__init__(name="runner", daemon=True)
        self.jobs = jobs
        self.period = period
        self.worker_id = f"bench-runner-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.consumer = None
        if doorbell is not None:
            group = doorbell.consumer_group("workers")  # the worker's own group name
            self.consumer = make_consumer(doorbell, group, [Topic.JOB_REQUESTS])
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                if self.consumer is not None:
                    message = self.consumer.poll(IDLE_SCAN)
                    if message is not None:
                        while self.consumer.poll(0) is not None:  # drain: requests are doorbells only
                            pass
                        self.consumer.commit(asynchronous=True)
                job = self.jobs.claim(self.worker_id, lease_seconds=30)
                if job is not None:
                    self.jobs.finish(job["_id"], self.worker_id, {})
                elif self.consumer is None:
                    self.stopping.wait(self.period)
        finally:
            if self.consumer is not None:
                self.consumer.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)


def run_job(jobs: Jobs, rng: random.Random) -> dict[str, Any]:
    """After a random pause, submit one no-op task job and wait until it has ended."""
    time.sleep(rng.uniform(0, MAX_PAUSE))
    began = time.perf_counter()
    job_id = jobs.submit("task", name="noop", script=str(NOOP), max_attempts=1)
    call = time.perf_counter() - began

    def ended() -> dict[str, Any] | None:
        job = jobs.collection.find_one({"_id": job_id})
        return job if job is not None and job["status"] not in UNFINISHED else None

    job = wait_for(ended, timeout=120, what=f"job {job_id} to end", interval=0.01)
    if job["status"] != JobStatus.FINISHED:
        raise RuntimeError(f"job {job_id} ended {job['status']}: {job['error']}")
    return {**job, "call_seconds": call}


def bench_dispatch(base: Settings, pids: Pids, count: int, log_dir: Path, seed: int) -> list[Row]:
    rng = random.Random(seed)
    console.print(
        f"\n[bold]1. job dispatch[/]: {count} no-op task jobs per side, the sides interleaved job by job, "
        f"a random 0–{MAX_PAUSE:.0f} s pause before each submission"
    )
    sides = ("worker", "polling", "doorbell")
    with ExitStack() as stack:
        settings = {side: stack.enter_context(project(base, side)) for side in sides}
        stores = {side: stack.enter_context(Store(settings[side])) for side in sides}
        publishers = {side: stack.enter_context(Publisher(settings[side])) for side in sides}
        jobs = {side: Jobs(stores[side], publishers[side]) for side in sides}
        worker = worker_process(settings["worker"], log_dir / "worker-dispatch.log")
        stack.callback(worker.stop)
        events = Watcher(settings["worker"], Topic.JOB_EVENTS, Schema.JOB_EVENT)
        events.start()
        stack.callback(events.stop)
        worker.start()
        for runner in (Runner(jobs["polling"]), Runner(jobs["doorbell"], doorbell=settings["doorbell"])):
            runner.start()
            stack.callback(runner.stop)
        if not events.joined.wait(60):
            raise RuntimeError("the job-events watcher did not join its group in 60 s")
        for side in sides:  # warm-up: consumer groups joined, the worker's first task subprocess
            for _ in range(WARMUP_JOBS):
                run_job(jobs[side], rng)
        done: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        with CpuMeter({**pids, "worker": worker.process.pid if worker.process else None}) as meter:
            for number in range(count):
                for side in sides[number % 3 :] + sides[: number % 3]:  # rotate who goes first
                    done[side].append(run_job(jobs[side], rng))
        time.sleep(0.5)  # the last started events reach the watcher
    return dispatch_rows(done, events, meter)


def latencies(jobs: list[dict[str, Any]]) -> Stats:
    return Stats([since(job["started_at"], job["submitted_at"]) for job in jobs])


def dispatch_rows(done: dict[str, list[dict[str, Any]]], events: Watcher, meter: CpuMeter) -> list[Row]:
    claim, polled, doorbell = latencies(done["worker"]), latencies(done["polling"]), latencies(done["doorbell"])
    stamped, received = [], []
    for job in done["worker"]:
        found = events.first(job_id=job["_id"], event="started")
        if found is not None:
            stamped.append(since(datetime.fromisoformat(found[1]["at"]), job["submitted_at"]))
            received.append(since(found[0], job["submitted_at"]))
    calls = Stats([job["call_seconds"] for job in done["worker"]])
    slow = sum(value > 1.0 for value in claim.values)
    console.print(
        f"  worker p50 {ms(claim.p50)}, mean {ms(claim.mean)}, {slow} of {len(claim.values)} over 1 s; 1 s poller p50 "
        f"{ms(polled.p50)}, mean {ms(polled.mean)}; poll() doorbell p50 {ms(doorbell.p50)}; submit() call p50 "
        f"{ms(calls.p50)}; {meter.describe()}"
    )
    baseline = f"loop polling Jobs.claim every {POLL_PERIOD:.0f} s (TensorLayer's runner)"
    return [
        Row(
            "dispatch: submitted → claimed (started_at − submitted_at); 1 idle `tensordb worker`",
            claim,
            polled,
            baseline,
            f"p50 ≤ {ms(GOAL_SECONDS)}",
            claim.p50 <= GOAL_SECONDS,
            dominant="the broker hop of the job request (librdkafka's fetch wait against Tansu)",
            notes="Worker.run waits for a job request with receive(), which returns on the first message (poll), then "
            f"claims; measured mean {ms(claim.mean)}, {slow} of {len(claim.values)} over 1 s. The claim itself "
            f"(find_one_and_update) and submit() ({ms(calls.p50)} p50: insert, publish, broker ack) take milliseconds. "
            f"CPU while timing: {meter.describe()}",
        ),  # fmt: skip
        Row(
            "dispatch: submitted → worker's `started` job event (its `at`)",
            Stats(stamped),
            dominant="as above; + a few ms (RunLogger, heartbeat thread)",
        ),  # fmt: skip
        Row(
            "dispatch: submitted → `started` event received by a consumer",
            Stats(received),
            dominant="as above; + the broker hop (eager consumer: ms)",
            notes="a consumer in this process using poll() with fetch.wait.max.ms 10; with TensorDB's make_consumer defaults "
            "(librdkafka's fetch.wait.max.ms 500) Tansu answers later (the what-if row's consumer has them)",
        ),  # fmt: skip
        Row(
            "what-if (bench code, not TensorDB's): the worker's loop waking on the first request (Consumer.poll)",
            doorbell,
            polled,
            baseline,
            dominant="the broker hop of the job request (librdkafka fetch wait against Tansu)",
            notes="a thread here runs the worker's loop (doorbell consumer in the workers' group, then Jobs.claim) with "
            "a bare consumer.poll(2 s) and fetch.wait.max.ms 10: the latency the Kafka doorbell allows",
        ),  # fmt: skip
    ]


# -- 2. the continuous loop ----------------------------------------------------------------------------


class PredictPoller(threading.Thread):
    """Posts ``/predict`` in a loop while armed; remembers when each version first answered."""

    def __init__(self, base_url: str, pause: float = PREDICT_PAUSE) -> None:
        super().__init__(name="predict-poller", daemon=True)
        self.base_url = base_url
        self.pause = pause
        self.instances = DIGITS_X[VALIDATION[:1]].reshape(1, 8, 8).tolist()
        self.first: dict[int, tuple[float, float]] = {}  # version → (sent, received) of its first answer
        self.last_sent: dict[int, float] = {}  # version → when the latest request it answered was sent
        self.window: dict[int, float] = {}  # version → received(first answer) − sent(last answer by another version)
        self.requests = 0
        self.failures: list[str] = []
        self.armed = threading.Event()
        self.stopping = threading.Event()

    def run(self) -> None:
        latest: int | None = None
        with httpx.Client(base_url=self.base_url, timeout=10) as client:
            while not self.stopping.is_set():
                if not self.armed.wait(0.1):
                    continue
                sent = time.time()
                try:
                    response = client.post("/predict", json={"instances": self.instances})
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                received = time.time()
                self.requests += 1
                if response.status_code == 200:
                    version = response.json()["version"]
                    if version not in self.first:
                        self.first[version] = (sent, received)
                        if latest is not None and latest in self.last_sent:
                            self.window[version] = received - self.last_sent[latest]
                    latest = version
                    self.last_sent[version] = sent
                elif response.status_code != 503:  # 503: nothing promoted yet (round 1)
                    self.failures.append(f"{response.status_code} {response.text[:200]}")
                if self.pause:
                    time.sleep(self.pause)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)


@dataclass
class Round:
    number: int
    epochs: int
    published: datetime  # publish_samples returned: every sample of the wave acknowledged by the broker
    persisted: datetime  # the wave's last sample written by the ingest processor (its imported_at)
    submitted: datetime  # the retrain job's submitted_at
    started: datetime  # the retrain job's started_at (claimed by the worker)
    decision: dict[str, Any]
    promotion: datetime | None = None  # the production alias document's time
    event_seen: float | None = None  # the `promoted` model event received by a consumer here
    loaded: datetime | None = None  # the server's loaded_at for the new version (after load + warm-up)
    served: float | None = None  # first /predict answer by the new version received
    window: float | None = None  # the poller's resolution at the swap
    seconds: float = 0.0  # the whole round
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def promoted(self) -> bool:
        return bool(self.decision["promoted"])


def publish(db: TensorDB, dataset: str, indexes: list[int]) -> list[str]:
    return db.publish_samples(
        {
            "arrays": DIGITS_X[i].reshape(8, 8).astype(np.uint8),
            "labels": int(DIGITS_Y[i]),
            "dataset": dataset,
            "sample_id": f"{dataset}-{i}",
        }
        for i in indexes
    )


def one_round(db: TensorDB, policies: Policies, poller: PredictPoller, models: Watcher, number: int, base_url: str) -> Round:
    began = time.monotonic()
    epochs = EPOCHS[min(number, len(EPOCHS)) - 1]
    policies.change(POLICY, epochs=epochs)
    jobs, samples = db.jobs, db.store[SAMPLES]
    earlier = {job["_id"] for job in jobs.list(kind="train", policy=POLICY)}
    wave = TRAINING[(number - 1) * WAVE : number * WAVE]
    ids = publish(db, "digits", wave)
    published = datetime.now(UTC)

    def started_job() -> dict[str, Any] | None:
        fresh = [job for job in jobs.list(kind="train", policy=POLICY) if job["_id"] not in earlier]
        return fresh[0] if fresh and fresh[0]["started_at"] is not None else None

    job = wait_for(started_job, timeout=120, what=f"round {number}'s train job to start", interval=0.02)
    wait_for(lambda: samples.count_documents({"_id": {"$in": ids}}) == len(ids), timeout=60, what="the wave persisted")
    persisted = max(document["imported_at"] for document in samples.find({"_id": {"$in": ids}}, {"imported_at": 1}))
    evaluation = f"eval-{job['_id']}"
    evaluating = {"_id": evaluation, "started_at": {"$ne": None}}
    wait_for(lambda: jobs.collection.find_one(evaluating), timeout=300, what="the evaluation to start")
    poller.armed.set()  # poll the server only from here: while it polls, the server takes CPU from the worker
    armed = datetime.now(UTC)
    try:
        decision = wait_for(lambda: db.store[DECISIONS].find_one({"_id": evaluation}), timeout=300, what="the decision")
        result = Round(number, epochs, published, persisted, job["submitted_at"], job["started_at"], decision)
        ended = {document["_id"]: document for document in jobs.collection.find({"_id": {"$in": [job["_id"], evaluation]}})}
        trained, evaluated = ended[job["_id"]].get("finished_at"), ended[evaluation].get("finished_at")
        if trained is not None:  # the `finished` job event → the lifecycle processor submits the evaluation
            result.extra["evaluation_hop"] = since(ended[evaluation]["submitted_at"], trained)
        if evaluated is not None:  # the evaluation's `finished` event → the lifecycle processor decides
            result.extra["decision_hop"] = since(decision["at"], evaluated)
        if result.promoted:
            candidate = decision["candidate"]["version"]
            alias = db.models.alias_info(POLICY, PRODUCTION)
            if alias is None or alias["version"] != candidate:
                raise RuntimeError(f"round {number}: promoted v{candidate} but the alias says {alias and alias['version']}")
            result.promotion = alias["time"]
            if result.promotion < armed:
                result.extra["late"] = f"the poller was armed {ms(since(armed, result.promotion))} after the promotion"
            wait_for(lambda: candidate in poller.first, timeout=60, what=f"the server to answer with v{candidate}", interval=0.01)
            result.served = poller.first[candidate][1]
            result.window = poller.window.get(candidate)
            info = httpx.get(f"{base_url}/model", timeout=10).json()
            if info["version"] == candidate:
                result.loaded = datetime.fromisoformat(info["loaded_at"])
            seen = wait_for(lambda: models.first(event="promoted", version=candidate), timeout=10, what="the promoted event")
            result.event_seen = seen[0]
    finally:
        poller.armed.clear()
    result.seconds = time.monotonic() - began
    return result


def describe_round(result: Round) -> str:
    decision = result.decision
    line = (
        f"  round {result.number}: {WAVE} samples, epochs {result.epochs}; published → submitted "
        f"{ms(since(result.submitted, result.published))}, → started {ms(since(result.started, result.published))}; "
        f"v{decision['candidate']['version']} accuracy {decision['candidate']['accuracy']:.3f} vs production "
        + (f"{decision['production']['accuracy']:.3f}" if decision["production"]["accuracy"] is not None else "none")
    )
    if result.promoted and result.promotion is not None and result.served is not None:
        line += f"; promoted → served {ms(since(result.served, result.promotion))}"
    elif not result.promoted:
        line += "; not promoted"
    if "late" in result.extra:
        line += f" [red]({result.extra['late']}: the figure is too high)[/]"
    return line + f"; round {result.seconds:.1f} s"


def model_load_seconds(settings: Settings, versions: list[int]) -> Stats:
    """What the server does before a swap, here: ``registry.find`` of the version + one warm-up predict."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tensordb.models.registry import ModelRegistry

    seconds = []
    with Store(settings) as store:
        registry = ModelRegistry(store)
        try:
            for number, version in enumerate([versions[0], *versions]):  # the first load warms TensorFlow up: untimed
                began = time.perf_counter()
                model = registry.find(name=POLICY, version=version)
                model.predict_on_batch(np.zeros((1, *model.input_shape[1:]), dtype="float32"))
                if number:
                    seconds.append(time.perf_counter() - began)
        finally:
            registry.close()
    return Stats(seconds)


def bench_loop(base: Settings, pids: Pids, rounds: int, budget: float, log_dir: Path) -> list[Row]:
    console.print(
        f"\n[bold]2. continuous loop[/]: up to {rounds} rounds of {WAVE} new samples (the threshold), "
        f"no new round after {budget:.0f} s"
    )
    results: list[Round] = []
    with project(base, "loop") as settings:
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        children: list[ChildProcess] = []
        models = Watcher(settings, Topic.MODEL_EVENTS, Schema.MODEL_EVENT)
        poller = PredictPoller(base_url)
        try:
            for child in (
                processors_process(settings, log_dir / "processors.log"),
                worker_process(settings, log_dir / "worker-loop.log"),
            ):
                children.append(child)
                child.start()
            with TensorDB(settings) as db:
                policies = Policies(db.store)
                policies.register(Policy(
                    name=POLICY, model={"entry_point": "tensordb.testing.models:small_classifier"},
                    training={"filter": {"dataset": "digits"}}, validation={"filter": {"dataset": "digits-validation"}},
                    trigger={"every_samples": WAVE}, objective={"metric": "accuracy", "direction": "max"},
                    promotion={"margin": 0.0}, epochs=EPOCHS[0], hyperparameters=HYPERPARAMETERS,
                ))  # fmt: skip
                publish(db, "digits-validation", VALIDATION)  # another dataset: never counts towards the trigger
                wait_for(
                    lambda: db.store[SAMPLES].count_documents({"dataset": "digits-validation"}) == len(VALIDATION),
                    timeout=120, what="the validation samples persisted",
                )  # fmt: skip
                server = server_process(settings, log_dir / "server.log", POLICY, port)
                children.append(server)
                server.start()
                models.start()
                poller.start()
                if not models.joined.wait(60):
                    raise RuntimeError("the model-events watcher did not join its group in 60 s")
                processes = {**pids, **{child.args[0]: child.process.pid if child.process else None for child in children}}
                deadline = time.monotonic() + budget
                with CpuMeter(processes) as meter:
                    for number in range(1, rounds + 1):
                        if number > 2 and time.monotonic() > deadline:
                            console.print(f"  time budget of {budget:.0f} s spent: stopping after {number - 1} rounds")
                            break
                        results.append(one_round(db, policies, poller, models, number, base_url))
                        console.print(describe_round(results[-1]))
                promoted = [r.decision["candidate"]["version"] for r in results if r.promoted]
                load = model_load_seconds(settings, promoted[-3:]) if promoted else Stats([])
        finally:
            poller.stop()
            models.stop()
            for child in reversed(children):
                child.stop()
    if poller.failures:
        console.print(f"  [red]{len(poller.failures)} failed /predict requests[/], e.g. {poller.failures[:2]}")
    console.print(f"  {poller.requests} /predict requests; {meter.describe()} over {meter.wall:.0f} s")
    return loop_rows(results, load, meter, poller)


def hop_row(measure: str, stats: Stats, dominant: str) -> Row:
    """A row for one hop of the loop, against the issue's goal for every hop."""
    goal = f"p50 ≤ {ms(HOP_GOAL_SECONDS)}"
    return Row(measure, stats, goal=goal, met=stats.p50 <= HOP_GOAL_SECONDS if stats else None, dominant=dominant)


def loop_rows(results: list[Round], load: Stats, meter: CpuMeter, poller: PredictPoller) -> list[Row]:
    def stats(values: list[float | None]) -> Stats:
        return Stats([value for value in values if value is not None])

    promoted = sum(r.promoted for r in results)
    swaps = [r for r in results if r.promoted and r.promotion is not None and r.served is not None][1:]  # 1st: warm-up
    swaps = [r for r in swaps if "late" not in r.extra]  # armed after the promotion: no valid figure
    to_submitted = stats([since(r.submitted, r.published) for r in results])
    to_started = stats([since(r.started, r.published) for r in results])
    ingest_hop = stats([since(r.persisted, r.published) for r in results])
    trigger_hop = stats([since(r.submitted, r.persisted) for r in results])
    doorbell = stats([since(r.started, r.submitted) for r in results])
    served = stats([since(r.served, r.promotion) for r in swaps])
    seen = stats([since(r.event_seen, r.promotion) for r in swaps if r.event_seen is not None])
    loaded = stats([since(r.loaded, r.promotion) for r in swaps if r.loaded is not None])
    after_load = stats([since(r.served, r.loaded) for r in swaps if r.loaded is not None])
    windows = stats([r.window for r in swaps])
    first = next((r for r in results if r.promoted and r.served is not None and r.promotion is not None), None)
    evaluation_hop = stats([r.extra.get("evaluation_hop") for r in results])
    decision_hop = stats([r.extra.get("decision_hop") for r in results])
    hop = (
        f"the processors are TensorDB's batched librdkafka consumers (streams.consumer.TopicProcessor) with "
        f"fetch.wait.max.ms {FETCH_WAIT_MS}: Tansu answers a pending fetch late, up to its whole wait (part 3, the broker hop rows); "
        "then the handler's batch: the ingest handler stores the wave and publishes data-imported, the retrain handler "
        "counts the samples and submits the job"
    )
    rows = [
        Row(
            f"loop (a): data published → retrain job submitted ({len(results)} rounds)",
            to_submitted,
            goal=f"p50 ≤ {ms(HOP_GOAL_SECONDS * 2)}",
            met=to_submitted.p50 <= HOP_GOAL_SECONDS * 2,
            dominant="two processor hops (ingest, then data-imported)",
            notes=f"published → wave persisted {ms(ingest_hop.p50)} p50, persisted → job submitted {ms(trigger_hop.p50)} "
            f"p50. Each hop: {hop}.",
        ),
        Row(
            f"loop (a): data published → retrain job started ({len(results)} rounds)",
            to_started,
            goal=f"p50 ≤ {ms(LOOP_GOAL_SECONDS)}",
            met=to_started.p50 <= LOOP_GOAL_SECONDS,
            dominant="the processor hops + the worker's doorbell",
            notes=f"the hops above, then submitted → started {ms(doorbell.p50)} p50 (max {ms(doorbell.max)}): "
            "the worker's doorbell, as in dispatch",
        ),
        hop_row("  part: published → wave persisted (ingest hop)", ingest_hop, "fetch wait + the ingest batch's writes"),
        hop_row("  part: persisted → job submitted (data-imported hop)", trigger_hop, "fetch wait + counting + submit"),
        hop_row("  part: submitted → started (worker doorbell)", doorbell, "the job request's broker hop + the claim"),
        hop_row("job events: train job finished → evaluation submitted", evaluation_hop, "fetch wait + the lifecycle handler"),
        hop_row("job events: evaluation finished → decision", decision_hop, "fetch wait + deciding (model load, promote)"),
    ]
    if seen:
        rows.append(hop_row("model events: promoted → event received (eager consumer here)", seen, "the model-events hop"))
    if served:
        rows.append(Row(
            f"loop (b): promotion → first prediction by the new version ({len(served.values)} swaps)", served,
            dominant="the model-event hop, then the model load",
            notes=f"the 'promoted' model event reaches an eager consumer {ms(seen.p50)} p50 after the alias document's time; "
            "the server's follower wakes on the event (receive returns on the first message), then loads the version (registry.find: query, GridFS read, sha256, "
            "model_from_json, set_weights, compile) and warms it up with one predict "
            f"({ms(load.p50)} p50 when done in this process, warm), then swaps: the server's loaded_at is {ms(loaded.p50)} "
            f"p50 after the promotion, and the first answer by the new version {ms(after_load.p50)} p50 after loaded_at "
            f"(poller resolution {ms(windows.p50)} p50: one request + {PREDICT_PAUSE * 1e3:.0f} ms pause). The first swap of "
            "the run is left out (the server's first model: TensorFlow's first predict traces the graph)"
            + (f"; it took {ms(since(first.served, first.promotion))}" if first else ""),
        ))  # fmt: skip
    rows.append(Row(
        "loop: whole rounds (publish → train → evaluate → decide → swap)", Stats([r.seconds for r in results]),
        dominant=f"{promoted} of {len(results)} candidates promoted",
        notes=f"for scale; {poller.requests} /predict requests, {len(poller.failures)} failed; CPU over the rounds: "
        f"{meter.describe()}",
    ))  # fmt: skip
    return rows


# -- 3. the broker hop alone --------------------------------------------------------------------------


def _hop_latencies(settings: Settings, waits: tuple[int, ...], count: int, rng: random.Random) -> dict[int, list[float]]:
    """Produce ``count`` records one at a time (random pauses) to one topic, read by one consumer
    per ``fetch.wait.max.ms`` in ``waits``, each a TensorDB consumer (``make_consumer``) read with
    ``receive`` as a :class:`~streams.consumer.TopicProcessor` reads; returns arrival − produce per wait."""
    topic = settings.topic(Topic.JOB_REQUESTS)
    sent: dict[bytes, float] = {}
    arrived: dict[int, dict[bytes, float]] = {wait: {} for wait in waits}
    stopping = threading.Event()
    consumers = {
        wait: make_consumer(settings, f"bench-hop-{wait}-{uuid.uuid4().hex[:6]}", [Topic.JOB_REQUESTS], **{"fetch.wait.max.ms": wait})
        for wait in waits
    }  # fmt: skip

    joined = {wait: threading.Event() for wait in waits}

    def consume(wait: int) -> None:  # each consumer is used by its own thread only
        consumer = consumers[wait]
        while not stopping.is_set():
            for received in receive(consumer, Schema.JOB_REQUEST, timeout=0.1, max_messages=500):
                arrived[wait].setdefault(received.value or b"", time.time())
            if not joined[wait].is_set() and consumer.assignment():
                joined[wait].set()

    threads = [threading.Thread(target=consume, args=(wait,), daemon=True) for wait in waits]
    for thread in threads:
        thread.start()
    producer = Producer(settings.kafka_config(**{"linger.ms": 0}))
    try:
        wait_for(lambda: all(event.is_set() for event in joined.values()), timeout=60, what="the hop consumers to join")
        time.sleep(1.0)
        for number in range(-2, count):  # two untimed records first: every connection open
            time.sleep(rng.uniform(0.2, 1.2))
            value = str(number).encode()
            sent[value] = time.time()
            producer.produce(topic, value)
            producer.poll(0)
            deadline = time.monotonic() + 10
            while not all(value in arrived[wait] for wait in waits) and time.monotonic() < deadline:
                time.sleep(0.002)
    finally:
        producer.flush(10)
        stopping.set()
        for thread in threads:
            thread.join(5)
        for consumer in consumers.values():
            consumer.close()
    timed = [str(number).encode() for number in range(count)]
    return {wait: [arrived[wait][v] - sent[v] for v in timed if v in arrived[wait]] for wait in waits}


def _idle_broker_cpu(settings: Settings, pids: Pids, wait: int, consumers: int, seconds: float) -> float:
    """Cores the broker uses per idle consumer polling an empty topic with ``fetch.wait.max.ms`` ``wait``
    (the broker's CPU with ``consumers`` of them, less its CPU with none, over ``seconds`` each)."""
    stopping = threading.Event()
    members = [
        make_consumer(settings, f"bench-idle-{wait}-{n}-{uuid.uuid4().hex[:6]}", [Topic.JOB_REQUESTS], **{"fetch.wait.max.ms": wait})
        for n in range(consumers)
    ]  # fmt: skip

    joined = [threading.Event() for _ in members]

    def poll(number: int) -> None:  # each consumer is used by its own thread only
        while not stopping.is_set():
            members[number].poll(0.1)
            if not joined[number].is_set() and members[number].assignment():
                joined[number].set()

    threads = [threading.Thread(target=poll, args=(number,), daemon=True) for number in range(len(members))]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: all(event.is_set() for event in joined), timeout=60, what="the idle consumers to join")
        time.sleep(1.0)
        with CpuMeter({"tansu": pids.get("tansu")}) as busy:
            time.sleep(seconds)
    finally:
        stopping.set()
        for thread in threads:
            thread.join(5)
        for consumer in members:
            consumer.close()
    time.sleep(1.0)
    with CpuMeter({"tansu": pids.get("tansu")}) as quiet:
        time.sleep(seconds)
    return (busy.cores.get("tansu", math.nan) - quiet.cores.get("tansu", math.nan)) / consumers


def bench_broker_hop(base: Settings, pids: Pids, count: int, seed: int) -> list[Row]:
    waits = (FETCH_WAIT_MS, 50, LIBRDKAFKA_FETCH_WAIT_MS)
    console.print(
        f"\n[bold]3. the broker hop alone[/]: {count} records, one at a time, to TensorDB consumers (librdkafka) "
        f"with fetch.wait.max.ms {', '.join(map(str, waits))}"
    )
    with project(base, "hop") as settings:
        hops = _hop_latencies(settings, waits, count, random.Random(seed))
        idle = {wait: _idle_broker_cpu(settings, pids, wait, IDLE_CONSUMERS, IDLE_SECONDS) for wait in waits}
    stats = {wait: Stats(hops[wait]) for wait in waits}
    console.print(
        "  " + "; ".join(f"{wait} ms: p50 {ms(stats[wait].p50)}, max {ms(stats[wait].max)}, broker "
                         f"{idle[wait] * 1e3:.1f} milli-cores per idle consumer" for wait in waits)
    )  # fmt: skip

    def row(wait: int, label: str, dominant: str, notes: str = "") -> Row:
        return Row(
            f"broker hop: produced → received, fetch.wait.max.ms={wait} ({label})", stats[wait],
            goal=f"p50 ≤ {ms(HOP_GOAL_SECONDS)}" if wait == FETCH_WAIT_MS else "",
            met=stats[wait].p50 <= HOP_GOAL_SECONDS if wait == FETCH_WAIT_MS else None,
            dominant=f"{dominant}; idle, the broker spends {idle[wait] * 1e3:.1f} milli-cores per consumer", notes=notes,
        )  # fmt: skip

    return [
        row(
            FETCH_WAIT_MS,
            "TensorDB's processors, workers, predictor, model server",
            "the broker's short hold",
            notes="A TensorDB consumer (make_consumer, read with receive() as a TopicProcessor reads) per fetch wait, all "
            "reading the same records. Tansu does not answer a pending fetch when a record arrives: it answers at a "
            "later check, whose delay grows with fetch.wait.max.ms (up to the whole wait), so the wait bounds the hop's "
            "latency (Apache Kafka answers as soon as a record is there). A short wait costs the broker CPU for the empty fetches of idle consumers (the last column: measured "
            f"with {IDLE_CONSUMERS} consumers polling an empty topic for {IDLE_SECONDS:.0f} s, less the broker's CPU with none): "
            "the processors that only validate a topic keep librdkafka's 500 ms",
        ),
        row(50, "a middle value", "the broker's hold"),
        row(LIBRDKAFKA_FETCH_WAIT_MS, "librdkafka's default", "the broker answers late, up to the whole wait"),
    ]


# -- output -----------------------------------------------------------------------------------------


def print_table(rows: list[Row], description: str) -> None:
    table = Table(title=f"TensorDB loop latency ({description}, {os.cpu_count()} cores)", show_lines=True)
    for name, justify in (
        ("measure", "left"), ("n", "right"), ("p50", "right"), ("p95", "right"), ("max", "right"),
        ("baseline p50 / p95", "right"), ("ratio", "right"), ("goal", "center"), ("met", "center"), ("what dominates", "left"),
    ):  # fmt: skip
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    notes = []
    for row in rows:
        baseline = f"{ms(row.baseline.p50)} / {ms(row.baseline.p95)}\n[dim]{row.baseline_label}[/]" if row.baseline else ""
        ratio = f"{row.baseline.p50 / row.ours.p50:.2f}×\n[dim]baseline / TensorDB p50[/]" if row.baseline else ""
        met = "" if row.met is None else ("[green]yes[/]" if row.met else "[red]NO[/]")
        dominant = row.dominant
        if row.notes:
            notes.append(row.notes)
            dominant += f" [{len(notes)}]"
        table.add_row(
            row.measure, str(len(row.ours.values)), ms(row.ours.p50), ms(row.ours.p95), ms(row.ours.max),
            baseline, ratio, row.goal, met, dominant,
        )  # fmt: skip
    console.print(table)
    for number, note in enumerate(notes, start=1):
        console.print(f"[{number}] {note}", markup=False)


def print_summary(rows: list[Row]) -> None:
    """One plain line per row, for logs where the table's box drawing is awkward to read."""
    for row in rows:
        line = f"RESULT {row.measure.strip()} | n={len(row.ours.values)} | p50 {ms(row.ours.p50)} p95 {ms(row.ours.p95)}"
        line += f" max {ms(row.ours.max)}"
        if row.baseline:
            line += f" | baseline ({row.baseline_label}) p50 {ms(row.baseline.p50)} p95 {ms(row.baseline.p95)}"
            line += f" | ratio {row.baseline.p50 / row.ours.p50:.2f}x (baseline / TensorDB p50)"
        if row.goal:
            line += f" | goal {row.goal} {'met' if row.met else 'MISSED'}"
        print(line)


#: The numeric options: name → (type, default, help).
OPTIONS: dict[str, tuple[type, float, str]] = {
    "--jobs": (int, 30, "timed task jobs per side in part 1"),
    "--rounds": (int, 8, "rounds of the loop in part 2 (the first swap is a warm-up)"),
    "--budget": (float, 240.0, "seconds after which part 2 starts no new round"),
    "--hops": (int, 20, "records timed in part 3 (the broker hop alone)"),
    "--seed": (int, 1, "seed of the random pauses"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, (kind, default, text) in OPTIONS.items():
        parser.add_argument(name, type=kind, default=default, help=f"{text} (default {default})")
    parser.add_argument("--quick", action="store_true", help="8 jobs per side, 3 rounds, 8 hops: a smoke run")
    parser.add_argument("--skip", choices=["dispatch", "loop", "hop"], action="append", default=[], help="leave a part out")
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs, args.rounds, args.hops = 8, 3, 8
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    console.print(f"TensorDB loop latency benchmark; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    rows: list[Row] = []
    log_dir = Path(tempfile.mkdtemp(prefix="tensordb-bench-loop-"))
    with servers("loop") as found, children_cwd(log_dir):
        console.print(f"servers: {found.description}; child logs in {log_dir}")
        # the code the benchmark's jobs name: the tests' model builder and the no-op task script
        base = found.settings.with_changes(trusted_modules=("tensordb.testing.models",), task_script_dirs=(BENCH,))
        if "dispatch" not in args.skip:
            rows += bench_dispatch(base, found.pids, args.jobs, log_dir, args.seed)
        if "loop" not in args.skip:
            rows += bench_loop(base, found.pids, args.rounds, args.budget, log_dir)
        if "hop" not in args.skip:
            rows += bench_broker_hop(base, found.pids, args.hops, args.seed)
    shutil.rmtree(log_dir, ignore_errors=True)  # kept when a step fails: the children's logs are there
    console.print()
    print_table(rows, found.description)
    print_summary(rows)
    print(f"wall time {time.perf_counter() - began:.0f} s; load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
