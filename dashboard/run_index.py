"""The dashboard's index of runs and their jobs: which runs exist, their phases and metrics, and
the job behind each (small, index-backed reads returned as JSON-ready dictionaries)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING

from tensordb.infra.store import Store
from tensordb.jobs.queue import JOBS
from tensordb.runs.logger import LOGS, PHASES

# -- runs, jobs ---------------------------------------------------------------------------------------


_JOB_FIELDS = {
    "_id": 1, "kind": 1, "name": 1, "description": 1, "policy": 1, "status": 1, "attempts": 1, "max_attempts": 1,
    "worker": 1, "host": 1, "progress": 1, "checkpoint": 1, "error.message": 1, "submitted_at": 1, "started_at": 1,
    "finished_at": 1, "lease_until": 1, "priority": 1, "spec.epochs": 1, "cancel_requested": 1, "result": 1,
}  # fmt: skip


@dataclass
class _PhaseSummary:
    count: int
    first_step: int
    last_step: int
    first_wall: float
    last_wall: float
    last_metrics: dict[str, Any]
    checked: float


class RunIndex:
    """Every run of the project with its points per phase, joined with its job (a job's run id is
    its job id). Per (run, phase) it remembers the count and last step, so a refresh costs two
    index look-ups per run and counts only the steps added since (full recount every minute)."""

    def __init__(self, store: Store, workers: int = 4) -> None:
        self.store = store
        self._phases: dict[tuple[str, str], _PhaseSummary] = {}
        self._first: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="tensordb-dashboard-runs")
        self._cached: tuple[float, list[dict[str, Any]]] | None = None
        self._refresh_lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def runs(self, max_age: float = 1.0) -> list[dict[str, Any]]:
        """Runs newest first (cached for ``max_age`` seconds, shared by every browser)."""
        with self._refresh_lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < max_age:
                return self._cached[1]
            runs = self._refresh()
            self._cached = (time.monotonic(), runs)
            return runs

    def _refresh(self) -> list[dict[str, Any]]:
        logs = self.store[LOGS]
        run_ids = logs.distinct("run_id", {"project": self.store.project})
        summaries = dict(zip(run_ids, self._pool.map(self._summary, run_ids), strict=True))
        jobs = {
            job["_id"]: job
            for job in self.store[JOBS].find({"project": self.store.project, "_id": {"$in": run_ids}}, _JOB_FIELDS)
        }
        for job in self.store[JOBS].find(
            {"project": self.store.project}, _JOB_FIELDS, sort=[("submitted_at", DESCENDING)], limit=500
        ):
            jobs.setdefault(job["_id"], job)
        runs = []
        for run_id in set(summaries) | set(jobs):
            summary = summaries.get(run_id) or {
                "run_id": run_id,
                "job_id": run_id,
                "tags": {},
                "phases": {},
                "metrics": [],
                "points": 0,
            }
            run_job = jobs.get(run_id) or (jobs.get(summary.get("job_id")) if summary.get("job_id") else None)
            summary["job"] = _job(run_job) if run_job else None
            times = [phase["last_wall_time"] for phase in summary["phases"].values()]
            if run_job:
                times += [
                    run_job[key].timestamp()
                    for key in ("submitted_at", "started_at", "finished_at")
                    if isinstance(run_job.get(key), datetime)
                ]
            summary["updated_at"] = max(times, default=0.0)
            runs.append(summary)
        runs.sort(key=lambda run: run["updated_at"], reverse=True)
        return runs

    def _summary(self, run_id: str) -> dict[str, Any]:
        logs, project = self.store[LOGS], self.store.project
        phases: dict[str, dict[str, Any]] = {}
        for phase in sorted(logs.distinct("phase", {"project": project, "run_id": run_id}), key=_phase_order):
            query = {"project": project, "run_id": run_id, "phase": phase}
            last = logs.find_one(query, {"_id": 0, "step": 1, "wall_time": 1, "metrics": 1}, sort=[("step", DESCENDING)])
            if last is None:
                continue
            key = (run_id, phase)
            with self._lock:
                known = self._phases.get(key)
            now = time.monotonic()
            if known is not None and known.last_step == last["step"] and now - known.checked < 60:
                summary = known
            else:
                if known is not None and now - known.checked < 60 and last["step"] > known.last_step:
                    count = known.count + logs.count_documents({**query, "step": {"$gt": known.last_step}})
                    first_step, first_wall = known.first_step, known.first_wall
                else:
                    count = logs.count_documents(query)
                    earliest = logs.find_one(query, {"_id": 0, "step": 1, "wall_time": 1}, sort=[("step", ASCENDING)]) or last
                    first_step, first_wall = earliest["step"], earliest["wall_time"]
                summary = _PhaseSummary(count, first_step, last["step"], first_wall, last["wall_time"], last["metrics"], now)
                with self._lock:
                    self._phases[key] = summary
            phases[phase] = {
                "count": summary.count, "first_step": summary.first_step, "last_step": summary.last_step,
                "first_wall_time": summary.first_wall, "last_wall_time": summary.last_wall, "last_metrics": summary.last_metrics,
            }  # fmt: skip
        first = self._first.get(run_id)
        if first is None:
            first = logs.find_one({"project": project, "run_id": run_id}, {"_id": 0, "job_id": 1, "tags": 1}) or {}
            self._first[run_id] = first
        metrics = sorted({name for phase in phases.values() for name in phase["last_metrics"]})
        return {
            "run_id": run_id, "job_id": first.get("job_id"), "tags": first.get("tags") or {}, "phases": phases,
            "metrics": metrics, "points": sum(phase["count"] for phase in phases.values()),
        }  # fmt: skip


def _phase_order(phase: str) -> int:
    return PHASES.index(phase) if phase in PHASES else len(PHASES)


def _job(job: dict[str, Any]) -> dict[str, Any]:
    return {
        "job_id": job["_id"], "kind": job.get("kind"), "name": job.get("name"), "description": job.get("description"),
        "policy": job.get("policy"), "status": job.get("status"), "attempts": job.get("attempts"),
        "max_attempts": job.get("max_attempts"), "worker": job.get("worker"), "host": job.get("host"),
        "progress": job.get("progress") or {}, "checkpoint": job.get("checkpoint"), "epochs": (job.get("spec") or {}).get("epochs"),
        "error": (job.get("error") or {}).get("message"), "submitted_at": job.get("submitted_at"),
        "started_at": job.get("started_at"), "finished_at": job.get("finished_at"), "priority": job.get("priority"),
        "cancel_requested": job.get("cancel_requested"), "result": job.get("result"),
    }  # fmt: skip


def job_of(store: Store, run_id: str) -> dict[str, Any] | None:
    job = store[JOBS].find_one({"project": store.project, "_id": run_id}, _JOB_FIELDS)
    if job is None:
        first = store[LOGS].find_one({"project": store.project, "run_id": run_id}, {"job_id": 1})
        if first and first.get("job_id"):
            job = store[JOBS].find_one({"project": store.project, "_id": first["job_id"]}, _JOB_FIELDS)
    return _job(job) if job else None
