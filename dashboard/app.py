"""The dashboard's web app (``tensordb dashboard``): JSON and Server-Sent Events over FastAPI, and
the front end built from ``dashboard/web`` into ``dashboard/static`` (uPlot, from npm; no CDN).

Routes that read (GET):

- ``/``: the single-page front end; ``/static/...`` its assets;
- ``/api/status``: project, addresses, the live consumer's counters;
- ``/api/runs``: every run with its points per phase, joined with its job (status, policy,
  worker, attempts, progress);
- ``/api/run?id=RUN[&lo=&hi=]``: a run's job and its curves, one chart per metric with one
  series per phase: every point up to ``FULL_POINTS`` per phase, else the min/max overview; a
  step range (``lo``/``hi``, a zoom) is read at full resolution;
- ``/api/job?id=RUN``: the job of a run (or null);
- ``/api/compare?run=A&run=B&metric=&phase=&x=step|time|relative[&lo=&hi=]``: one metric of
  several runs on one axis (overview envelopes, or raw points when zoomed in);
- ``/api/live?run=A[&run=B]`` (or ``?all=1``): Server-Sent Events with each run's new points, first
  the points MongoDB may not have yet, then ``ready``, then live (see :mod:`dashboard.live`);
- ``/api/models``, ``/api/data``, ``/api/dead-letters``;
- ``/api/studies``: every study with its status, searcher, trials per status and best objective;
- ``/api/study?name=STUDY[&since=VERSION]``: one study whole (spec in brief, best so far,
  configurations, trials with their curves and objectives per rung, ASHA's verdicts), or only what
  changed after an earlier answer's ``version`` (see :mod:`dashboard.studies`); 404 for no such study;
- ``/api/csrf``: the page's CSRF token (answered by the guard, which sets the session cookie if needed).

Routes that act (POST, JSON bodies, the CSRF token in ``X-CSRF-Token``; see :mod:`dashboard.actions`):
``/api/jobs/cancel`` and ``/api/jobs/retry`` (``job_id``), ``/api/policies/pause|resume``,
``/api/stages/pause|resume`` and ``/api/studies/stop`` (``name``), ``/api/models/promote`` (``model``,
``version``, ``reason``), ``/api/models/rollback`` (``model``, ``reason``) and ``/api/try`` (a model's
versions side by side on a cohort's samples or pasted instances).

Bound to 127.0.0.1 by default. Bound to any other address it needs a token (``TENSORDB_DASHBOARD_TOKEN``
or ``--token-file``; never on the command line, which every local user can read), which every request then carries (``Authorization: Bearer``,
``X-TensorDB-Token``, or the session cookie set when a page is opened with ``?token=``); without one
it refuses to start. Host names, body size and headers are checked by :mod:`tensordb.infra.http_guard`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from dashboard import actions, catalog, curves, run_index, studies
from dashboard.live import RESET, LiveHub
from tensordb.config import Settings
from tensordb.errors import StudyNotFoundError
from tensordb.infra import metrics
from tensordb.infra.bus import create_topics
from tensordb.infra.http_guard import Guard, check_binding, server
from tensordb.infra.store import Store
from tensordb.runs.logger import LOGS, PHASES

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
KEEPALIVE_SECONDS = 15.0
#: A zoomed range is read raw when the overview has fewer buckets than this in it.
ZOOM_BUCKETS = curves.OVERVIEW_POINTS // 4
#: ...and at most this many raw points per run (beyond, the overview is used).
ZOOM_MAX_RAW = 200_000
#: Overviews of this many most recent runs are built when the dashboard starts.
WARM_RUNS = 200
#: Where a page gets the CSRF token its actions carry (answered by the guard).
CSRF_PATH = "/api/csrf"


# -- JSON --------------------------------------------------------------------------------------------


def _default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)  # ObjectId, Decimal128, anything else BSON may hold


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_default, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


# -- the app -------------------------------------------------------------------------------------------


class Dashboard:
    """What the routes share: settings, the store, the live hub, the caches."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store(settings)
        self.hub = LiveHub(settings)
        self.cache = curves.OverviewCache(self.store)
        self.cache.buffered = self.hub.buffered
        self.hub.listeners.append(self.cache.on_points)
        self.runs = run_index.RunIndex(self.store)
        self.rates = catalog.ProgressRates()
        self.studies = studies.StudyFeed()
        self.fan_out = ThreadPoolExecutor(8, thread_name_prefix="tensordb-dashboard-compare")
        self.actions = actions.Actions(settings, self.store)
        self.started_at = time.time()

    def start(self) -> None:
        # both idempotent (and no-ops where the processors ran): the dashboard also works on a
        # project nothing else touched yet, and its reads rely on the logs index
        create_topics(self.settings)
        self.store.ensure_indexes()
        self.hub.start()
        threading.Thread(target=self._warm, name="tensordb-dashboard-warm", daemon=True).start()

    def _warm(self) -> None:
        """Build the overviews of the most recent runs in the background (sampled first, then
        exact), so the first comparison is served from memory."""
        try:
            runs = self.runs.runs()
            self.cache.prefetch((run["run_id"], phase) for run in runs[:WARM_RUNS] for phase in run["phases"])
        except Exception:  # noqa: BLE001 - only a head start; pages build what they need anyway
            log.exception("could not warm the overview cache")

    def close(self) -> None:
        self.actions.close()
        self.hub.stop()
        self.cache.close()
        self.runs.close()
        self.fan_out.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    # -- one run's charts ----------------------------------------------------------------------------

    def run_series(self, run_id: str, lo: int | None, hi: int | None) -> dict[str, Any]:
        store = self.store
        phases = sorted(store[LOGS].distinct("phase", {"project": store.project, "run_id": run_id}), key=PHASES.index)
        zoomed = lo is not None or hi is not None
        per_metric: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        info: dict[str, Any] = {}
        full = True
        for phase in phases:
            count = curves.count_points(store, run_id, phase, lo, hi)
            view = None
            if count <= curves.FULL_POINTS or (zoomed and count <= ZOOM_MAX_RAW):
                columns = curves.read_columns(store, run_id, phase, lo, hi)
                full = full and count <= curves.FULL_POINTS
                for name, values in columns.metrics.items():
                    per_metric.setdefault(name, {})[phase] = (columns.steps, values)
                last_step = int(columns.steps[-1]) if len(columns) else None
            else:
                full = False
                view = self.cache.get(run_id, phase, lo, hi)
                for name, (steps, _, values) in (view.metrics if view else {}).items():
                    per_metric.setdefault(name, {})[phase] = (steps, values)
                last_step = view.last_step if view else None
            info[phase] = {
                "count": count, "full": view is None and count <= curves.FULL_POINTS, "last_step": last_step,
                "exact": view.exact if view else True,
            }  # fmt: skip
        limit = 4 * curves.FULL_POINTS if full else curves.OVERVIEW_POINTS
        charts = {
            name: curves.align({phase: series[phase] for phase in phases if phase in series}, limit)
            for name, series in sorted(per_metric.items())
        }
        return {
            "run_id": run_id, "phases": info, "full": full, "lo": lo, "hi": hi, "charts": charts, "full_points": curves.FULL_POINTS,
            "job": run_index.job_of(store, run_id),
        }  # fmt: skip

    # -- several runs on one chart ---------------------------------------------------------------------

    def compare(
        self, runs: list[str], phase: str, metric: str, x: str, lo: float | None, hi: float | None, points: int
    ) -> dict[str, Any]:
        zoomed = lo is not None or hi is not None

        def one(run_id: str) -> tuple[str, np.ndarray, np.ndarray, bool, bool]:
            view = self.cache.get(run_id, phase)
            if view is None or metric not in view.metrics:
                return run_id, np.zeros(0), np.zeros(0), True, False
            steps, walls, values = view.metrics[metric]
            origin = float(walls.min()) if len(walls) else 0.0
            xs = steps if x == "step" else walls if x == "time" else walls - origin
            if not zoomed:
                return run_id, xs, values, view.exact, False
            keep = (xs >= (lo if lo is not None else -np.inf)) & (xs <= (hi if hi is not None else np.inf))
            # the steps this range covers, widened by a bucket on each side (for time axes too)
            covered = steps[keep]
            if len(covered):
                first, last = int(covered.min()) - view.width, int(covered.max()) + view.width
            elif x == "step":
                first, last = int(lo if lo is not None else 0), int(hi if hi is not None else view.last_step)
            else:
                return run_id, xs[keep], values[keep], view.exact, False
            if (last - first) / view.width < ZOOM_BUCKETS and curves.count_points(
                self.store, run_id, phase, first, last
            ) <= ZOOM_MAX_RAW:
                columns = curves.read_columns(self.store, run_id, phase, max(first, 0), last)
                raw = columns.metrics.get(metric, np.full(len(columns), np.nan))
                raw_x = (
                    columns.steps.astype(np.float64) if x == "step" else columns.walls if x == "time" else columns.walls - origin
                )
                inside = (raw_x >= (lo if lo is not None else -np.inf)) & (raw_x <= (hi if hi is not None else np.inf))
                return run_id, raw_x[inside], raw[inside], True, True
            return run_id, xs[keep], values[keep], view.exact, False

        results = list(self.fan_out.map(one, runs))
        aligned = curves.align({run_id: (xs, ys) for run_id, xs, ys, _, _ in results}, points)
        return {
            **aligned, "metric": metric, "phase": phase, "axis": x, "exact": all(r[3] for r in results),
            "raw": [r[0] for r in results if r[4]], "empty": [r[0] for r in results if not len(r[1])],
        }  # fmt: skip


def create_app(settings: Settings, token: str | None = None, host: str = "127.0.0.1", port: int = 0) -> Guard:
    """The ASGI app: FastAPI routes behind the :class:`~tensordb.infra.http_guard.Guard` (``.app`` is the FastAPI app).

    Parameters:
        settings: the project to show, and the HTTP settings the guard applies.
        token: the token every request must carry, or ``None`` (bound to loopback only).
        host, port: the bound address (an allowed ``Host``; the port names the session cookie).
    """
    dashboard = Dashboard(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(dashboard.start)
        try:
            yield
        finally:
            await asyncio.to_thread(dashboard.close)

    app = FastAPI(
        title=f"TensorDB dashboard: {settings.project}",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.dashboard = dashboard
    actions.install_error_answers(app)
    app.include_router(actions.router(dashboard.actions, JSON))

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        page = STATIC / "index.html"
        if not page.is_file():
            return PlainTextResponse(
                "the dashboard's front end is not built: run `make dashboard` (npm ci and the build in dashboard/web)\n",
                status_code=503,
            )
        return FileResponse(page, headers={"Cache-Control": "no-store"})

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/status")
    def status() -> JSON:
        return JSON({
            "project": settings.project, "kafka": settings.kafka_bootstrap, "database": settings.mongo_database,
            "live": dashboard.hub.status(), "overview_builds": dashboard.cache.builds, "started_at": dashboard.started_at,
            "now": time.time(), "full_points": curves.FULL_POINTS, "overview_points": curves.OVERVIEW_POINTS,
        })  # fmt: skip

    @app.get("/api/runs")
    def runs() -> JSON:
        return JSON({"runs": dashboard.runs.runs(), "now": time.time()})

    @app.get("/api/run")
    def run(id: str = Query(..., min_length=1, max_length=256), lo: int | None = None, hi: int | None = None) -> JSON:
        if lo is not None and hi is not None and hi < lo:
            raise HTTPException(422, "hi must be >= lo")
        return JSON(dashboard.run_series(id, lo, hi))

    @app.get("/api/job")
    def job(id: str = Query(..., min_length=1, max_length=256)) -> JSON:
        return JSON(run_index.job_of(dashboard.store, id))

    @app.get("/api/compare")
    def compare(
        run: list[str] = Query(..., min_length=1, max_length=500),
        metric: str = Query(..., min_length=1, max_length=128),
        phase: str = "train",
        x: str = "step",
        lo: float | None = None,
        hi: float | None = None,
        points: int = Query(curves.OVERVIEW_POINTS, ge=10, le=10_000),
    ) -> JSON:
        if phase not in PHASES:
            raise HTTPException(422, f"phase must be one of {', '.join(PHASES)}")
        if x not in ("step", "time", "relative"):
            raise HTTPException(422, "x must be step, time or relative")
        return JSON(dashboard.compare(list(dict.fromkeys(run)), phase, metric, x, lo, hi, points))

    @app.get("/api/models")
    def models() -> JSON:
        return JSON({"models": catalog.models(dashboard.store)})

    @app.get("/api/data")
    def data() -> JSON:
        return JSON(catalog.data(dashboard.store, dashboard.rates))

    @app.get("/api/dead-letters")
    def dead_letters(limit: int = Query(200, ge=1, le=1000)) -> JSON:
        return JSON(catalog.dead_letters(dashboard.store, limit))

    @app.get("/api/studies")
    def studies_list() -> JSON:
        return JSON({"studies": studies.list_studies(dashboard.store), "now": time.time()})

    @app.get("/api/study")
    def study(name: str = Query(..., min_length=1, max_length=64), since: str | None = Query(None, max_length=64)) -> JSON:
        try:
            return JSON(dashboard.studies.answer(studies.read_study(dashboard.store, name), since))
        except StudyNotFoundError as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get("/api/live")
    async def live(request: Request, run: list[str] = Query([], max_length=500), all: bool = False) -> StreamingResponse:
        if not run and not all:
            raise HTTPException(422, "name the runs to follow (?run=A&run=B) or ask for all=1")
        subscription, replay = dashboard.hub.subscribe(None if all else set(run), asyncio.get_running_loop())

        async def events() -> Any:
            try:
                yield b"retry: 1000\n\n"
                if replay:
                    yield b"event: points\ndata: " + dumps(replay) + b"\n\n"
                yield b"event: ready\ndata: " + dumps({"at": time.time()}) + b"\n\n"
                while True:
                    items = await subscription.next(KEEPALIVE_SECONDS)
                    if items == RESET:
                        yield b"event: reset\ndata: {}\n\n"
                        return
                    if items is None:
                        if subscription.closed:
                            return
                        yield b": keep-alive\n\n"
                        continue
                    yield b"event: points\ndata: " + dumps(items) + b"\n\n"
            finally:
                dashboard.hub.unsubscribe(subscription)

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )

    hint = (
        "open the address `tensordb dashboard` printed with ?token=TOKEN added, or send the header 'Authorization: Bearer TOKEN'"
    )
    return Guard(app, settings, token=token, host=host, cookie=f"tensordb_dashboard_{port}", hint=hint, csrf_path=CSRF_PATH)


def run(settings: Settings, host: str = "127.0.0.1", port: int = 8050, token: str | None = None) -> None:
    """``tensordb dashboard``: serve the dashboard of ``settings.project`` until interrupted.

    Parameters:
        settings: the project, and ``dashboard_token`` when ``token`` is not given.
        host, port: the address to bind; beyond loopback a token is required.
        token: the token every request must carry.
    """
    if token is None and settings.dashboard_token is not None:
        token = settings.dashboard_token.get_secret_value()
    check_binding(host, token, "tensordb dashboard", "TENSORDB_DASHBOARD_TOKEN")
    if not (STATIC / "index.html").is_file():
        log.warning("the front end is not built (%s is missing): run `make dashboard`", STATIC / "index.html")
    shown = f"[{host}]" if ":" in host else host
    address = f"http://{shown}:{port}/"
    log.info("dashboard of project %r at %s", settings.project, address)
    # never the token itself: this line lands in terminals and log files
    signing_in = "  (open it once with ?token=TOKEN added, TOKEN being the one it was started with)" if token else ""
    print(f"dashboard of project {settings.project!r}: {address}{signing_in}", flush=True)
    app = metrics.instrument(create_app(settings, token, host, port), "dashboard")
    # log_config=None: uvicorn logs through tensordb.infra.logging
    server(app, host, port, settings=settings, what="the dashboard", timeout_graceful_shutdown=2, log_config=None).run()
