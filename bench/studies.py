#!/usr/bin/env python
"""Studies benchmark: what the study scheduler costs, how well ASHA searches, how fast it decides.

Measured in one run, on one machine, against servers this script starts (or those named by
TENSORDB_KAFKA_BOOTSTRAP and TENSORDB_MONGO_URI). Trials run the synthetic epoch function
``tensordb.testing.synthetic:learning_curve`` (known optimum, seeded noise) on real
``tensordb processors`` (the scheduler) and two ``tensordb worker --slots 2`` child processes:

1. Scheduling overhead: a random search of N trials (1,000; ``--quick`` 100), one epoch of
   ``--trial-seconds`` (0.2 s) each, ``max_concurrent`` 4 on 2 workers × 2 slots. Wall time from
   the study's ``created_at`` to its ``finished_at`` against the ideal: the sum of the trials' run
   times (job ``started_at`` → ``finished_at``) / 4, and N × 0.2 s / 4. Goal: overhead ≤ 10 %
   (Ray Tune's ~14 % is the anchor). Where the rest of each slot's cycle goes is printed apart.
2. Search efficiency: a grid search and an ASHA search over the same grid points (``x``, ``y``:
   7 points each, and the learning speed, 0.25 or 1.0: curves that differ by configuration; ASHA's
   sampler ``shuffled-grid`` visits them in a seeded order; ``--sampler``), ``noise`` 0.01,
   27 epochs, reduction factor 3. Goal: ASHA's best within 1 % of the grid's, with ≤ 1/3 of the
   grid's epochs (the sum of the trials' epochs run). The grid runs with 0 s epochs (its epochs and
   objectives do not depend on the epoch time); ASHA's epochs take ``--epoch-seconds`` (0.2 s): a
   stopped trial runs on until its runner sees the cancel (when it records an epoch's progress, or
   at a heartbeat), so ASHA's epochs depend on how long an epoch is against the verdict's delay.
3. Decision latency: a trial's validation record logged (its ``wall_time``, ``time.time()`` in
   ``RunLogger.log``) → the rung verdict stored (its ``at``, ``datetime.now`` in the processors):
   both clocks are this machine's; the verdict's time has MongoDB's millisecond resolution. From
   the ASHA run of 2. (under load), and from validation records published here one at a time after
   random pauses for the trials of a study with no worker (quiet). Goal: p99 ≤ 200 ms. Apart: the
   scheduler's ``on_validation`` called here for a twin study's trials (same values), timed up to
   its verdict's ``at``: the handler's share; the rest is the Kafka hop to the processors.
4. Suggestion cost flat in the number of trials, in this process (no processors, no workers, a
   project of its own): ``tensordb.studies.searchers.configuration(spec, n)`` for n near 10 and
   near 1,000, and the scheduler's ``on_trial_ended`` (a trial's job ended: record it, ``fill`` the
   freed slot: find the last trial through the index, choose, insert, submit the job) per trial
   submitted, early in a 1,000-trial study against late in another, interleaved step by step; jobs
   are claimed and finished here with ``Jobs``. Goal: p99 late / early ≤ 2× (Optuna: ~70 → 8-9
   trials/s after 1,000 trials).

Every client and worker runs with TensorDB's defaults; nothing is patched.

    .venv/bin/python bench/studies.py [--quick] [--trials N] [--sampler random|grid|shuffled-grid]
                                      [--skip overhead|search|latency|suggest]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from harness import (
    CpuMeter,
    GoalRow,
    Pids,
    children_cwd,
    cpu_shares,
    make_console,
    ms,
    pct,
    print_goal_rows,
    project,
    servers,
    us,
)

from tensordb.config import Settings
from tensordb.infra.bus import Publisher
from tensordb.infra.store import Store
from tensordb.jobs.queue import JOBS, JobStatus
from tensordb.runs.logger import LOGS, RunLogger
from tensordb.studies.scheduler import DECISIONS, LAST_TRIAL, STUDIES, TRIALS, StudyScheduler, StudyStatus, trial_id
from tensordb.studies.searchers import configuration
from tensordb.studies.spec import parse_study
from tensordb.studies.studies import Studies
from tensordb.testing import ChildProcess, processors_process, raw_database, worker_process
from tensordb.testing.synthetic import ceiling, learning_curve

console = make_console(200)

SYNTHETIC = "tensordb.testing.synthetic"
CURVE = {"epoch_function": f"{SYNTHETIC}:learning_curve"}
OBJECTIVE = {"metric": "accuracy", "direction": "max"}
WORKERS, SLOTS = 2, 2
CONCURRENT = WORKERS * SLOTS  # the studies' max_concurrent: every slot busy, none more
XY = {"x": {"uniform": [0.0, 1.0]}, "y": {"uniform": [0.0, 1.0]}}

# -- 1. overhead
OVERHEAD_GOAL = 0.10
RAY_TUNE_OVERHEAD = 0.14
FAST_CLAIM = 0.1  # s: a claim this soon after its job's submit did not wait for a worker's poll to run out
# -- 2. search
MAX_EPOCHS, REDUCTION, NOISE = 27, 3, 0.01
SPEEDS = [0.25, 1.0]
BEST_GOAL, EPOCHS_GOAL = 0.99, 1 / 3
# -- 3. decisions
DECISION_GOAL = 0.200
MAX_PAUSE = 0.3  # before each record published by hand: records fall at random phases of any poll
# -- 4. suggestions
FLAT_GOAL = 2.0
OPTUNA_EARLY, OPTUNA_LATE = 70.0, 8.5  # trials/s, at the start and after 1,000 trials


@dataclass
class Cluster:
    """The processors and workers of the end-to-end parts, and every process whose CPU is read."""

    processors: ChildProcess
    workers: list[ChildProcess]
    pids: Pids = field(default_factory=dict)

    def check(self) -> None:
        for child in [self.processors, *self.workers]:
            if child.process is not None and child.process.poll() is not None:
                raise RuntimeError(f"{child.name} exited (code {child.process.returncode}); see {child.log_path}")


# -- helpers -------------------------------------------------------------------------------------


def seconds_between(later: datetime, earlier: datetime) -> float:
    return (later - earlier).total_seconds()


def create_study(store: Store, publisher: Publisher, spec: dict[str, Any]) -> Studies:
    studies = Studies(store, publisher)
    studies.create(spec)
    return studies


def wait_study(store: Store, name: str, timeout: float, cluster: Cluster | None = None) -> dict[str, Any]:
    """Poll the study's document until it has ended; raises after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        study = store[STUDIES].find_one({"_id": name})
        assert study is not None
        if study["status"] != StudyStatus.RUNNING:
            return study
        if cluster is not None:
            cluster.check()
        if time.monotonic() > deadline:
            trials = store[TRIALS].count_documents({"study": name})
            raise RuntimeError(f"study {name} still running after {timeout:.0f} s ({trials} trials submitted)")
        time.sleep(0.1)


@contextmanager
def cluster_of(settings: Settings, pids: Pids, log_dir: Path) -> Iterator[Cluster]:
    """Processors and 2 workers × 2 slots for ``settings``' project, all stopped at the end."""
    with ExitStack() as stack:
        log_dir.mkdir(parents=True, exist_ok=True)
        processors = processors_process(settings, log_dir / "processors.log")
        stack.callback(processors.stop)
        workers = [worker_process(settings, log_dir / f"worker-{n}.log", slots=SLOTS) for n in range(WORKERS)]
        for worker in workers:
            stack.callback(worker.stop)
        started = time.perf_counter()
        for child in [processors, *workers]:
            child.start(timeout=120)
        console.print(f"  processors and {WORKERS} workers × {SLOTS} slots ready in {time.perf_counter() - started:.1f} s")
        child_pids = {"processors": processors.process.pid if processors.process else None}
        for number, worker in enumerate(workers):
            child_pids[f"worker-{number}"] = worker.process.pid if worker.process else None
        yield Cluster(processors, workers, {**pids, **child_pids})


def warm_up(store: Store, publisher: Publisher, cluster: Cluster) -> None:
    """A small study first: consumer groups joined, code paths and connections warm."""
    name = "warm-up"
    create_study(store, publisher, {
        "name": name, "model": CURVE, "objective": OBJECTIVE, "space": XY, "searcher": {"name": "random"},
        "max_trials": 2 * CONCURRENT, "max_concurrent": CONCURRENT, "epochs": 2, "hyperparameters": {"seconds": 0.05},
    })  # fmt: skip
    started = time.perf_counter()
    wait_study(store, name, 180, cluster)
    console.print(f"  warm-up study ({2 * CONCURRENT} trials) finished in {time.perf_counter() - started:.1f} s")


# -- 1. scheduling overhead -------------------------------------------------------------------------


def dispatch_split(jobs: list[dict[str, Any]]) -> tuple[str, str, float]:
    """Submitted → claimed, told apart: claims within ``FAST_CLAIM`` and later ones; of the later
    ones, how many were submitted while another worker had a free slot (and did not claim), and how
    many were claimed by a worker just after one of its own jobs ended (it was full when the job
    came). A job request rings one worker of the group (its partition's reader), maybe a full one.
    Also what the later claims add to the mean (seconds)."""
    delays = {job["_id"]: seconds_between(job["started_at"], job["submitted_at"]) for job in jobs}
    fast = [delay for delay in delays.values() if delay <= FAST_CLAIM]
    slow_jobs = [job for job in jobs if delays[job["_id"]] > FAST_CLAIM]
    slow = [delays[job["_id"]] for job in slow_jobs]
    by_worker: dict[str, list[dict[str, Any]]] = {}
    for job in jobs:
        by_worker.setdefault(job["worker"], []).append(job)

    def running(worker: str, at: datetime) -> int:
        return sum(job["started_at"] <= at < job["finished_at"] for job in by_worker[worker])

    free_elsewhere = own_end = 0
    after_own_end: list[float] = []
    for job in slow_jobs:
        at, claimer = job["submitted_at"], job["worker"]
        free_elsewhere += any(running(worker, at) < SLOTS for worker in by_worker if worker != claimer)
        ended = [other["finished_at"] for other in by_worker[claimer] if other["finished_at"] <= job["started_at"]]
        if ended and max(ended) > at:  # one of its jobs ended after this job was submitted: it was full till then
            own_end += 1
            after_own_end.append(seconds_between(job["started_at"], max(ended)))
    summary = (
        f"{len(fast) / max(1, len(jobs)):.0%} claimed within {ms(FAST_CLAIM)} (p50 {ms(pct(fast, 50))}), the other "
        f"{len(slow)} p50 {ms(pct(slow, 50))}, p90 {ms(pct(slow, 90))}, max {ms(max(slow, default=math.nan))}"
    )
    detail = (
        f"of those {len(slow)}: {free_elsewhere} submitted while another worker had a free slot; {own_end} claimed by a "
        f"worker that was full at the submit, {ms(pct(after_own_end, 50))} (p50) after one of its own jobs ended"
    )
    return summary, detail, sum(slow) / max(1, len(jobs))


def bench_overhead(store: Store, publisher: Publisher, cluster: Cluster, trials: int, seconds: float) -> list[GoalRow]:
    name = f"overhead-{trials}"
    console.print(
        f"\n[bold]1. scheduling overhead[/]: random search, {trials} trials of one {seconds} s epoch, "
        f"max_concurrent {CONCURRENT} on {WORKERS} workers × {SLOTS} slots"
    )
    spec = {
        "name": name, "model": CURVE, "objective": OBJECTIVE, "space": XY, "searcher": {"name": "random"},
        "max_trials": trials, "max_concurrent": CONCURRENT, "epochs": 1, "hyperparameters": {"seconds": seconds}, "seed": 7,
    }  # fmt: skip
    with CpuMeter(cluster.pids) as meter:
        create_study(store, publisher, spec)
        study = wait_study(store, name, timeout=trials * seconds / CONCURRENT * 8 + 300, cluster=cluster)
    jobs = {job["_id"]: job for job in store[JOBS].find({"labels.study": name})}
    trial_docs = list(store[TRIALS].find({"study": name}))
    finished = [job for job in jobs.values() if job["status"] == JobStatus.FINISHED]
    if len(finished) != trials or any(job["attempts"] != 1 for job in finished):
        raise RuntimeError(f"{len(finished)} of {trials} trials finished, or some ran twice")

    wall = seconds_between(study["finished_at"], study["created_at"])
    runs = [seconds_between(job["finished_at"], job["started_at"]) for job in finished]
    dispatch = [seconds_between(job["started_at"], job["submitted_at"]) for job in finished]
    hops = [seconds_between(trial["ended_at"], jobs[trial["_id"]]["finished_at"]) for trial in trial_docs]
    # the k-th job to end frees the slot that the (k + 4)-th trial document takes (it cannot come earlier)
    ends = sorted(job["finished_at"] for job in finished)
    starts = sorted(trial["submitted_at"] for trial in trial_docs)
    reactions = [seconds_between(starts[k + CONCURRENT], ends[k]) for k in range(trials - CONCURRENT)]
    to_job = [seconds_between(jobs[t["_id"]]["submitted_at"], t["submitted_at"]) for t in trial_docs]
    ideal, nominal = sum(runs) / CONCURRENT, trials * seconds / CONCURRENT
    cycle = CONCURRENT * wall / trials  # each slot's time per trial
    mean_run, mean_reaction, mean_dispatch = statistics.fmean(runs), statistics.fmean(reactions), statistics.fmean(dispatch)
    parts = {
        "trial's run (claimed → finished)": mean_run,
        "slot freed (job finished) → next trial document (negative: its worker submitted it before the end)": mean_reaction,
        "trial document → job submitted": statistics.fmean(to_job),
        "job submitted → claimed (a slot freeing, the doorbell's hop or a worker's wait running out, the claim)": (mean_dispatch),
    }
    rest = cycle - sum(parts.values())
    tail = seconds_between(study["finished_at"], max(ends))
    console.print(
        f"  wall {wall:.1f} s; ideal {ideal:.1f} s (Σ run / {CONCURRENT}), nominal {nominal:.1f} s; {cpu_shares(meter)}"
    )
    console.print(f"  per slot and trial: {ms(cycle)} in all, of which (means):")
    for what, value in parts.items():
        console.print(f"    {ms(value):>8}  {what}")
    console.print(f"    {ms(rest):>8}  the rest (pairing error, the start and the end: last job → study finished {ms(tail)})")
    console.print(
        f"  run − {seconds} s sleep (the worker's own per-job work) p50 {ms(pct(runs, 50) - seconds)}; slot freed → next trial "
        f"p50 {ms(pct(reactions, 50))} p99 {ms(pct(reactions, 99))}, of which the job's end reached the scheduler (its "
        f"trial's ended_at) p50 {ms(pct(hops, 50))} p99 {ms(pct(hops, 99))}; submitted → claimed p50 {ms(pct(dispatch, 50))} "
        f"p99 {ms(pct(dispatch, 99))}"
    )
    split, late_claims, late_share = dispatch_split(finished)
    console.print(f"  submitted → claimed: {split}; the later claims make {ms(late_share)} of its mean")
    console.print(f"    {late_claims}")
    window = min(50, len(reactions) // 2)
    early, late = reactions[:window], reactions[-window:]
    console.print(
        f"  slot freed → next trial in this run, first {window} vs last {window} trials: p50 {ms(pct(early, 50), 1)} vs "
        f"{ms(pct(late, 50), 1)}, p99 {ms(pct(early, 99), 1)} vs {ms(pct(late, 99), 1)}"
    )
    overhead, overhead_nominal = wall / ideal - 1, wall / nominal - 1
    limits = (
        f"a slot idles {ms(cycle - mean_run)} per trial (its job finished → the next claimed), and a trial's run holds "
        f"{ms(pct(runs, 50) - seconds)} (p50) of the worker's own work (below); the next trial's document comes "
        f"{ms(-mean_reaction)} before the slot frees (its worker submits it; the job-event hop to study-trials, p50 "
        f"{ms(pct(hops, 50))}, is off the path), submitted → claimed {ms(mean_dispatch)} (p50 {ms(pct(dispatch, 50))}, "
        f"p99 {ms(pct(dispatch, 99))}; {split}: {ms(late_share)} of the mean; {late_claims}); {cpu_shares(meter)}"
    )
    return [
        GoalRow(
            f"1. overhead: {trials} trials × {seconds} s, {WORKERS}×{SLOTS} slots; wall vs Σ run / {CONCURRENT}",
            f"{wall:.1f} s (+{overhead:.0%})",
            f"ideal {ideal:.1f} s; Ray Tune +{RAY_TUNE_OVERHEAD:.0%}",
            f"{wall / ideal:.2f}×",
            f"≤ +{OVERHEAD_GOAL:.0%}",
            overhead <= OVERHEAD_GOAL,
            limits,
        ),
        GoalRow(
            f"1. overhead: wall vs nominal N × {seconds} s / {CONCURRENT}",
            f"{wall:.1f} s (+{overhead_nominal:.0%})",
            f"nominal {nominal:.1f} s",
            f"{wall / nominal:.2f}×",
            f"≤ +{OVERHEAD_GOAL:.0%}",
            overhead_nominal <= OVERHEAD_GOAL,
            f"as above, and a trial's run is {ms(mean_run)} for {ms(seconds)} of work: the worker's per-job writes and "
            "flushes (job events, the validation record, progress, the next trial's documents, finish)",
        ),
    ]


# -- 2. search efficiency, 3a. decision latency under load -------------------------------------------


def search_space(points: int) -> dict[str, Any]:
    return {
        "x": {"uniform": [0.0, 1.0], "grid": points},
        "y": {"uniform": [0.0, 1.0], "grid": points},
        "speed": {"choice": SPEEDS},
    }


def epochs_of(trials: list[dict[str, Any]], rungs: list[int]) -> tuple[int, int]:
    """Epochs the trials ran (``epochs_done``), and those ASHA's verdicts asked for (a trial
    stopped at rung r: rungs[r] epochs, as if the stop had taken effect at once)."""
    run = asked = 0
    for trial in trials:
        done = int(trial.get("epochs_done") or 0)
        run += done
        stopped = trial.get("stopped_at_rung")
        asked += min(done, rungs[stopped]) if stopped is not None else done
    return run, asked


def final_accuracy(hyperparameters: dict[str, Any]) -> float:
    """What a configuration reaches after every epoch (the known function, computed here)."""
    return learning_curve(MAX_EPOCHS - 1, noise=NOISE, **hyperparameters)["accuracy"]


def decision_latencies(store: Store, name: str, timeout: float = 30.0) -> list[float]:
    """Validation record logged (its ``wall_time``) → verdict stored (``at``), per verdict of ``name``."""
    decisions = list(store[DECISIONS].find({"study": name}))
    wanted = {(max(d["trials"]), d["epochs"] - 1): d for d in decisions}  # no folds: the one trial
    deadline = time.monotonic() + timeout
    while True:  # the log sink may still be storing the last records
        found = {
            (record["run_id"], record["epoch"]): record["wall_time"]
            for record in store[LOGS].find(
                {"run_id": {"$in": sorted({run for run, _ in wanted})}, "phase": "validation"},
                {"run_id": 1, "epoch": 1, "wall_time": 1},
            )
        }
        if all(key in found for key in wanted) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    ordered = sorted((found[key], d["at"].timestamp()) for key, d in wanted.items() if key in found)
    return [decided - logged for logged, decided in ordered]


def latency_row(what: str, latencies: list[float], q: float, goal: float | None, limits: str) -> GoalRow:
    value = pct(latencies, q)
    return GoalRow(
        f"{what} (n={len(latencies)})",
        ms(value),
        goal=f"≤ {ms(goal)}" if goal else "",
        met=(value <= goal) if goal else None,
        limits=f"p50 {ms(pct(latencies, 50))}, p90 {ms(pct(latencies, 90))}, max {ms(max(latencies, default=math.nan))}; "
        + limits,
    )


def bench_search(
    store: Store, publisher: Publisher, cluster: Cluster, points: int, epoch_seconds: float, sampler: str
) -> tuple[list[GoalRow], list[float], str]:
    """The search rows, and the ASHA run's decision latencies with the CPU used meanwhile (for 3.)."""
    space = search_space(points)
    configurations = points * points * len(SPEEDS)
    console.print(
        f"\n[bold]2. search efficiency[/]: grid vs ASHA ({sampler} sampler) over x, y ({points} points each) and "
        f"speed {SPEEDS}: {configurations} configurations, {MAX_EPOCHS} epochs, η {REDUCTION}, noise {NOISE}"
    )
    common = {"model": CURVE, "objective": OBJECTIVE, "space": space, "max_concurrent": CONCURRENT}
    searcher = {"name": "asha", "sampler": sampler, "min_epochs": 1, "max_epochs": MAX_EPOCHS, "reduction_factor": REDUCTION}
    specs: dict[str, dict[str, Any]] = {
        "grid": {**common, "name": "search-grid", "searcher": {"name": "grid"}, "epochs": MAX_EPOCHS,
                 "hyperparameters": {"noise": NOISE, "seconds": 0.0}},
        "asha": {**common, "name": "search-asha", "searcher": searcher, "max_trials": configurations, "seed": 11,
                 "hyperparameters": {"noise": NOISE, "seconds": epoch_seconds}},
    }  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    for kind, spec in specs.items():
        with CpuMeter(cluster.pids) as meter:
            studies = create_study(store, publisher, spec)
            study = wait_study(store, spec["name"], timeout=900, cluster=cluster)
        trials = list(store[TRIALS].find({"study": spec["name"]}))
        run, asked = epochs_of(trials, studies.spec(spec["name"]).searcher.rungs())
        best = study.get("best") or {}
        hp = best.get("hyperparameters") or {}
        results[kind] = {
            "best": best.get("objective") or math.nan, "hp": hp, "ceiling": ceiling(hp["x"], hp["y"]) if hp else math.nan,
            "run": run, "asked": asked, "trials": trials, "wall": seconds_between(study["finished_at"], study["created_at"]),
            "rungs": studies.spec(spec["name"]).searcher.rungs(), "meter": meter,
        }  # fmt: skip
        console.print(
            f"  {kind}: best {results[kind]['best']:.4f} (its ceiling {results[kind]['ceiling']:.4f}) at "
            f"{ {k: round(v, 3) for k, v in hp.items()} }; epochs run {run}, asked {asked}; wall {results[kind]['wall']:.1f} s; "
            f"{cpu_shares(meter)}"
        )
    grid, asha = results["grid"], results["asha"]
    # the best ASHA's own configurations reach if all are trained to the end (the known function):
    # what early stopping lost, apart from which configurations were drawn
    full = max((final_accuracy(trial["hyperparameters"]), trial["configuration"]) for trial in asha["trials"])
    console.print(
        f"  ASHA's {len(asha['trials'])} configurations all trained {MAX_EPOCHS} epochs would reach {full[0]:.4f} at best "
        f"(configuration {full[1]}); the best ceiling among them is "
        f"{max(ceiling(t['hyperparameters']['x'], t['hyperparameters']['y']) for t in asha['trials']):.4f}"
    )
    # ASHA's stops: how many epochs a stopped trial ran past its rung, and how late its job ended
    rungs = asha["rungs"]
    decisions = list(store[DECISIONS].find({"study": "search-asha"}))
    stops = [d for d in decisions if d["action"] == "stop"]
    jobs = {job["_id"]: job for job in store[JOBS].find({"labels.study": "search-asha"})}
    cancelled = [(jobs[d["trials"][0]], d) for d in stops if jobs[d["trials"][0]]["status"] == JobStatus.CANCELLED]
    stop_delays = [seconds_between(job["finished_at"], d["at"]) for job, d in cancelled]
    overrun = (asha["run"] - asha["asked"]) / max(1, len(stops))
    past = Counter(
        int(t.get("epochs_done") or 0) - rungs[t["stopped_at_rung"]]
        for t in asha["trials"]
        if t.get("stopped_at_rung") is not None
    )
    past_text = ", ".join(f"{count} ran {epochs} past" for epochs, count in sorted(past.items()))
    ran = [(job, int((job.get("progress") or {}).get("epoch", -1)) + 1) for job in jobs.values() if job.get("started_at")]
    epoch_time = sum(seconds_between(job["finished_at"], job["started_at"]) for job, _ in ran) / max(1, sum(n for _, n in ran))
    latencies = decision_latencies(store, "search-asha")
    console.print(
        f"  ASHA: {len(decisions)} verdicts, {len(stops)} stops; of the stopped trials {past_text} their rung's epoch; "
        f"{overrun:.1f} epochs run past the rung per stop; verdict → stopped job ended p50 {ms(pct(stop_delays, 50))}, "
        f"max {ms(max(stop_delays, default=math.nan))}; an epoch takes {ms(epoch_time)} (Σ job run / Σ epochs), "
        f"a verdict comes p50 {ms(pct(latencies, 50))} after its record"
    )
    ratio_best = asha["best"] / grid["best"]
    share, share_asked = asha["run"] / grid["run"], asha["asked"] / grid["run"]
    drawn = (
        f"{configurations} random draws vs the grid's {configurations} points"
        if sampler == "random"
        else f"the same {configurations} grid points"
    )
    search = [
        GoalRow(
            f"2. search: best accuracy, ASHA ({sampler} sampler) vs grid, {drawn}",
            f"{asha['best']:.4f}",
            f"grid {grid['best']:.4f} (true optimum 1.0)",
            f"{ratio_best:.4f}",
            f"≥ {BEST_GOAL}",
            ratio_best >= BEST_GOAL,
            f"noise σ {NOISE} on each final value: the grid's best is {grid['best'] - grid['ceiling']:+.4f} off its "
            f"configuration's ceiling {grid['ceiling']:.4f}, ASHA's {asha['best'] - asha['ceiling']:+.4f} off "
            f"{asha['ceiling']:.4f} (ceilings' ratio {asha['ceiling'] / grid['ceiling']:.4f})",
        ),
        GoalRow(
            "2. search: ASHA's best vs its own configurations all trained to the end",
            f"{asha['best']:.4f}",
            f"{full[0]:.4f} (computed)",
            f"{asha['best'] / full[0]:.4f}",
            "(context)",
            None,
            f"1.0: early stopping lost nothing; ASHA's configurations trained to the end would reach "
            f"{full[0] / grid['best']:.4f} of the grid's best (which configurations were drawn)",
        ),
        GoalRow(
            f"2. search: epochs run, ASHA ({epoch_seconds} s epochs) vs grid",
            f"{asha['run']:,}",
            f"grid {grid['run']:,}",
            f"{share:.3f}",
            f"≤ {EPOCHS_GOAL:.3f}",
            share <= EPOCHS_GOAL,
            f"{asha['run'] - asha['asked']:,} epochs run past the rungs, {overrun:.1f} per stop ({len(stops)} stops: "
            f"{past_text} their rung's epoch): a verdict comes p50 {ms(pct(latencies, 50))} after its record, an epoch "
            f"takes {ms(epoch_time)}; verdict → stopped job ended p50 {ms(pct(stop_delays, 50))}",
        ),
        GoalRow(
            "2. search: epochs ASHA's verdicts asked for (stops taking effect at once)",
            f"{asha['asked']:,}",
            f"grid {grid['run']:,}",
            f"{share_asked:.3f}",
            "(context)",
            None,
            f"the algorithm's share, without the stop delay; ASHA's wall time {asha['wall']:.0f} s",
        ),
    ]
    return search, latencies, cpu_shares(asha["meter"])


# -- 3b. decision latency, records published by hand ---------------------------------------------------


def latency_study(store: Store, publisher: Publisher, name: str, records: int) -> Studies:
    """An ASHA study of ``records`` trials, all submitted at once (no worker runs them)."""
    searcher = {"name": "asha", "sampler": "random", "min_epochs": 1, "max_epochs": 3, "reduction_factor": REDUCTION}
    return create_study(store, publisher, {
        "name": name, "model": CURVE, "objective": OBJECTIVE, "space": XY, "searcher": searcher,
        "max_trials": records, "max_concurrent": records,
    })  # fmt: skip


def bench_latency(
    store: Store, publisher: Publisher, cluster: Cluster, records: int, seed: int
) -> tuple[list[float], list[float], str]:
    """Decision latencies of records published here, the handler's time for the same values run
    here (a twin study), and the CPU used while the records were published."""
    name, twin = "latency", "latency-here"
    console.print(
        f"\n[bold]3. decision latency[/]: {records} validation records published here, one per trial of an ASHA study "
        f"with no worker, after a random 0–{MAX_PAUSE} s pause each; then on_validation called here for a twin study"
    )
    studies = latency_study(store, publisher, name, records)
    rng = random.Random(seed)
    with CpuMeter(cluster.pids) as meter:
        for number in range(records):
            time.sleep(rng.uniform(0, MAX_PAUSE))
            run_id = trial_id(name, number, None)
            logger = RunLogger(publisher, run_id=run_id, job_id=run_id)
            logger.log(1, phase="validation", epoch=0, accuracy=rng.random())
            logger.close()  # flush: as the worker's epoch loop does after each validation record
        deadline = time.monotonic() + 30
        while store[DECISIONS].count_documents({"study": name}) < records and time.monotonic() < deadline:
            time.sleep(0.1)
    studies.stop(name)
    latencies = decision_latencies(store, name)
    # the same values, judged in this process: the handler's share of a decision (its verdict's `at`
    # has microseconds here, as it was before MongoDB stored it)
    latency_study(store, publisher, twin, records)
    scheduler = StudyScheduler(store, publisher)
    rng = random.Random(seed)
    handler = []
    for number in range(records):
        time.sleep(rng.uniform(0, MAX_PAUSE) / 3)  # time for the processors' work on the last verdict (a cancelled job's event)
        value = rng.random()
        started = time.time()
        verdict = scheduler.on_validation(trial_id(twin, number, None), 0, {"accuracy": value})
        assert verdict is not None
        handler.append(verdict["at"].timestamp() - started)
    studies.stop(twin)
    halves = len(latencies) // 2
    console.print(
        f"  {len(latencies)} verdicts, in the order of their records: p50 {ms(pct(latencies[:halves], 50))} in the first "
        f"half, {ms(pct(latencies[halves:], 50))} in the second; {cpu_shares(meter)}"
    )
    console.print(
        f"  on_validation here up to its verdict: p50 {ms(pct(handler, 50), 1)}, p99 {ms(pct(handler, 99), 1)}; the rest "
        f"(record → the processors' handler: the Kafka hop, their batch) p50 ≈ {ms(pct(latencies, 50) - pct(handler, 50))}"
    )
    return latencies, handler, cpu_shares(meter)


def decision_limits(latencies: list[float], handler: list[float] | None, cpu_text: str) -> str:
    """What a decision's latency is made of, from the measured handler time (3b's twin) if any."""
    if not handler:
        return (
            f"the Kafka hop to study-rungs + on_validation's reads and writes (not measured apart: latency skipped); {cpu_text}"
        )
    return (
        f"on_validation up to its verdict (run here, quiet) p50 {ms(pct(handler, 50), 1)}, p99 {ms(pct(handler, 99), 1)}; "
        f"the rest, record → handler (the Kafka hop to study-rungs, the processors' batch), p50 ≈ "
        f"{ms(pct(latencies, 50) - pct(handler, 50))}; {cpu_text}"
    )


# -- 4. suggestion cost ---------------------------------------------------------------------------------


class Stepper:
    """One study driven in this process: its jobs claimed and finished here, the scheduler called here."""

    def __init__(self, store: Store, publisher: Publisher, name: str, trials: int) -> None:
        self.name = name
        self.scheduler = StudyScheduler(store, publisher)
        self.fills: dict[int, float] = {}  # trial number submitted → seconds of the fill that submitted it
        self.ended: dict[int, float] = {}  # trial number submitted → seconds of the on_trial_ended around that fill
        self._submitted: list[str] = []
        self._original_fill = self.scheduler.fill
        self.scheduler.fill = self._timed_fill  # type: ignore[method-assign]
        studies = Studies(store, publisher)
        studies.scheduler = self.scheduler
        studies.create({
            "name": name, "model": CURVE, "objective": OBJECTIVE, "space": XY, "searcher": {"name": "random"},
            "max_trials": trials, "max_concurrent": CONCURRENT, "epochs": 1, "seed": 3,
        })  # fmt: skip

    def _timed_fill(self, name: str) -> list[str]:
        started = time.perf_counter()
        submitted = self._original_fill(name)
        elapsed = time.perf_counter() - started
        for job_id in submitted:
            self.fills[int(job_id.rsplit("-", 1)[1])] = elapsed / len(submitted)
        self._submitted = submitted
        return submitted

    @property
    def next_number(self) -> int:
        return max(self.fills, default=-1) + 1

    def step(self) -> bool:
        """A worker's part (claim, finish) untimed, then the scheduler's, timed; False when none was pending."""
        jobs = self.scheduler.jobs
        job = jobs.claim("bench-worker", 60, name=self.name)
        if job is None:
            return False
        jobs.finish(job["_id"], "bench-worker", {"metrics": {"val_accuracy": 0.5}})
        self._submitted = []
        started = time.perf_counter()
        self.scheduler.on_trial_ended(job["_id"])
        elapsed = time.perf_counter() - started
        for job_id in self._submitted:
            self.ended[int(job_id.rsplit("-", 1)[1])] = elapsed
        return True


def bench_suggest(base: Settings, trials: int, pairs: int, window: int, reps: int) -> list[GoalRow]:
    console.print(
        f"\n[bold]4. suggestion cost[/]: in this process; {pairs} pair(s) of {trials}-trial random studies, the "
        f"first {window} trials of one interleaved step by step with the last {window} of the other"
    )
    early_fill: list[float] = []
    late_fill: list[float] = []
    early_ended: list[float] = []
    late_ended: list[float] = []
    tenths: dict[int, list[float]] = {}
    with project(base, "suggest") as settings, Store(settings) as store, Publisher(settings) as publisher:
        store.ensure_indexes()
        Stepper(store, publisher, "warm-up", 2 * CONCURRENT)  # connections, indexes, code paths
        with CpuMeter({}) as meter:
            for pair in range(pairs):
                late = Stepper(store, publisher, f"late-{pair}", trials)
                while late.next_number < trials - window:
                    late.step()
                early = Stepper(store, publisher, f"early-{pair}", trials)
                for _ in range(window):
                    early.step()
                    late.step()
                first, last = range(CONCURRENT, CONCURRENT + window), range(trials - window, trials)
                early_fill += [early.fills[n] for n in first]
                late_fill += [late.fills[n] for n in last]
                early_ended += [early.ended[n] for n in first]
                late_ended += [late.ended[n] for n in last]
                for number, seconds in late.fills.items():
                    tenths.setdefault(number * 10 // trials, []).append(seconds)
        # the step of fill that once grew with the study (a count of its trials): the next trial's
        # number, now read from the last trial document through the index
        with raw_database(settings) as raw:
            plan = raw.command(
                "explain",
                {
                    "find": TRIALS, "filter": {"project": settings.project, "study": late.name},
                    "projection": {"configuration": 1, "fold": 1}, "sort": dict(LAST_TRIAL), "limit": 1,
                },
                verbosity="executionStats",
            )  # fmt: skip
        keys = plan["executionStats"]["totalKeysExamined"]
    console.print(
        "  fill p50 by tenth of the late studies (not interleaved: drift in the machine's load shows here too): "
        + ", ".join(f"{pct(values, 50) * 1e3:.1f}" for _, values in sorted(tenths.items()))
        + f" ms; {cpu_shares(meter)}"
    )
    console.print(
        f"  fill's next trial number (the study's last trial, through the index) reads {keys:,} index key(s) at trial {trials:,}"
    )
    # configuration(spec, n) alone, n near 10 and near 1,000, interleaved
    spec = parse_study({
        "name": "configurations", "model": CURVE, "objective": OBJECTIVE, "space": XY, "searcher": {"name": "random"},
        "max_trials": trials, "seed": 3,
    })  # fmt: skip
    samples: dict[str, list[float]] = {"early": [], "late": []}
    numbers = {"early": range(5, 15), "late": range(trials - 10, trials)}
    clock = time.perf_counter_ns
    for _ in range(reps):
        for where, window_numbers in numbers.items():
            for number in window_numbers:
                started = clock()
                configuration(spec, number)
                samples[where].append((clock() - started) / 1e9)
    rows = []
    for what, before, after, unit, limits in (
        (
            f"configuration(spec, n), random: n 5–14 vs {trials - 10}–{trials - 1}", samples["early"], samples["late"], us,
            "pure CPU: parse the space, seed a generator with (seed, n), draw; its p99 is this machine's scheduling noise",
        ),
        (
            f"fill per trial submitted: trials {CONCURRENT}–{CONCURRENT + window - 1} vs {trials - window}–{trials - 1}",
            early_fill, late_fill, ms,
            f"MongoDB round trips (the study's status, 2 counts of unfinished jobs, the last trial: {keys:,} index key(s) "
            f"read at trial {trials:,}; 2 inserts) and the broker's ack of the job request (submit flushes)",
        ),
        (
            "on_trial_ended (record the end + fill), per trial", early_ended, late_ended, ms,
            "fill, and reading the job and trial, 2 updates, maybe_finish's 2 counts",
        ),
    ):  # fmt: skip
        ratio = pct(after, 99) / pct(before, 99)
        digits = {} if unit is us else {"digits": 1}
        rate = f"; {1 / pct(after, 50):,.0f} trials/s late (1 / p50)" if unit is ms else ""
        rows.append(
            GoalRow(
                f"4. suggestion p99, {what}",
                f"{unit(pct(after, 99), **digits)} late",
                f"{unit(pct(before, 99), **digits)} early; Optuna {OPTUNA_EARLY:.0f} → {OPTUNA_LATE} trials/s",
                f"{ratio:.2f}×",
                f"≤ {FLAT_GOAL:.0f}×",
                ratio <= FLAT_GOAL,
                f"p50 {unit(pct(before, 50), **digits)} early, {unit(pct(after, 50), **digits)} late; n={len(before)} each{rate}; "
                + limits,
            )
        )
    return rows


# -- the end-to-end parts -------------------------------------------------------------------------------


def bench_end_to_end(base: Settings, pids: Pids, log_dir: Path, args: argparse.Namespace) -> dict[str, list[GoalRow]]:
    """1., 2. and 3. on one project with processors and two workers."""
    sections: dict[str, list[GoalRow]] = {}
    loaded: tuple[list[float], str] | None = None  # 3. under load: the ASHA run's latencies, its CPU
    quiet: tuple[list[float], list[float], str] | None = None  # 3. quiet: latencies, the handler's times, CPU
    with (
        project(base, "studies") as settings,
        Store(settings) as store,
        Publisher(settings) as publisher,
        cluster_of(settings, pids, log_dir) as cluster,
    ):
        store.ensure_indexes()
        warm_up(store, publisher, cluster)
        if "overhead" not in args.skip:
            sections["1"] = bench_overhead(store, publisher, cluster, args.trials, args.trial_seconds)
        if "search" not in args.skip:
            rows, latencies, cpu_text = bench_search(store, publisher, cluster, args.points, args.epoch_seconds, args.sampler)
            sections["2"], loaded = rows, (latencies, cpu_text)
        if "latency" not in args.skip:
            for worker in cluster.workers:
                worker.stop()  # the study's trials stay pending: only the records published here count
            quiet = bench_latency(store, publisher, cluster, args.records, args.seed)
    handler = quiet[1] if quiet else None
    for key, label, measured in (
        ("3a", "3. decision latency, ASHA run of 2. (4 trials running)", loaded),
        ("3b", "3. decision latency, records published here (no trial running)", quiet and (quiet[0], quiet[2])),
    ):
        if measured:
            latencies, cpu_text = measured
            limits = decision_limits(latencies, handler, cpu_text)
            sections[key] = [
                latency_row(f"{label}, p50", latencies, 50, None, limits),
                latency_row(f"{label}, p99", latencies, 99, DECISION_GOAL, limits),
            ]
    return sections


# -- output -------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller figures, for a smoke test")
    parser.add_argument("--trials", type=int, help="trials of the overhead study and of the suggestion studies (1000)")
    parser.add_argument("--trial-seconds", type=float, default=0.2, help="a trial's one epoch in 1. (0.2)")
    parser.add_argument("--points", type=int, help="grid points of x and of y in 2. (7)")
    parser.add_argument("--epoch-seconds", type=float, default=0.2, help="an ASHA trial's epoch in 2. (0.2)")
    parser.add_argument(
        "--sampler", choices=["random", "grid", "shuffled-grid"], default="shuffled-grid",
        help="ASHA's sampler in 2. (shuffled-grid: the grid's points in a seeded order; random: as many random draws)",
    )  # fmt: skip
    parser.add_argument("--records", type=int, help="validation records published by hand in 3. (150)")
    parser.add_argument("--seed", type=int, default=5, help="the pauses of 3.")
    parser.add_argument(
        "--skip", choices=["overhead", "search", "latency", "suggest"], action="append", default=[],
        help="leave a part out (repeatable)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.trials = args.trials or (100 if args.quick else 1000)
    args.points = args.points or (4 if args.quick else 7)
    args.records = args.records or (40 if args.quick else 150)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    console.print(f"TensorDB studies benchmark; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    sections: dict[str, list[GoalRow]] = {}
    log_dir = Path(tempfile.mkdtemp(prefix="tensordb-bench-studies-"))
    with servers("studies") as found, children_cwd(log_dir):
        console.print(f"servers: {found.description}; child logs in {log_dir}")
        base = found.settings.with_changes(trusted_modules=(SYNTHETIC,))
        if {"overhead", "search", "latency"} - set(args.skip):
            sections |= bench_end_to_end(base, found.pids, log_dir, args)
        if "suggest" not in args.skip:
            sections["4"] = bench_suggest(
                base, args.trials, pairs=1 if args.quick else 3, window=20 if args.quick else 40, reps=100 if args.quick else 500
            )
        gc.collect()  # Kafka clients left in reference cycles go now, not after the servers (reconnect noise)
    shutil.rmtree(log_dir, ignore_errors=True)  # kept when a part fails: the children's logs are there
    console.print()
    print_goal_rows(
        console,
        [row for key in ("1", "2", "3a", "3b", "4") for row in sections.get(key, [])],
        f"TensorDB studies ({found.description})",
        "baseline / anchor",
    )
    print(f"wall time {time.perf_counter() - began:.0f} s; load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
