"""Prometheus metrics, ``/health`` and ``/ready`` of every long-running TensorDB process, on one port.

Each process (``tensordb processors``, ``worker``, ``serve``, ``predictor``, ``dashboard``) calls
:func:`start_metrics` once: a small HTTP server on ``TENSORDB_METRICS_HOST`` (127.0.0.1) and a port
(``--metrics-port``, ``TENSORDB_METRICS_PORT``, or the kind's own default so that the processes of
one machine do not collide; 0 turns it off) answers

- ``GET /metrics``: every metric below, plus the client library's ``process_*`` and ``python_*``;
- ``GET /health``: 200 while the process runs (liveness);
- ``GET /ready``: 200 when Kafka answers a metadata request, MongoDB a ping and every supervised
  loop of the process works (:mod:`tensordb.infra.supervision`), 503 with the reason otherwise
  (checked at most every few seconds, however often it is asked).

Bound beyond loopback it needs ``TENSORDB_METRICS_TOKEN`` (``Authorization: Bearer TOKEN``) and
refuses to start without one; on loopback without a token, a request naming a Host other than
``TENSORDB_HTTP_ALLOWED_HOSTS`` is refused (DNS rebinding).

The metrics are module globals, updated by one-line hooks where the work happens (a batch made
durable, a record dead-lettered, a job claimed, a prediction answered); MongoDB write latency comes
from a pymongo command listener, consumer lag from librdkafka's statistics, and the jobs by status
from one aggregation, run when scraped (cached a few seconds).
"""

from __future__ import annotations

import collections
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from pymongo import monitoring

from tensordb.config import Settings
from tensordb.errors import ConfigurationError
from tensordb.infra.http_guard import is_loopback

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from tensordb.infra.bus import Received
    from tensordb.infra.project_scope import ProjectCollection

log = logging.getLogger(__name__)

#: The metrics port of each kind of process when neither --metrics-port nor TENSORDB_METRICS_PORT says.
DEFAULT_PORTS = {"processors": 9470, "worker": 9471, "serve": 9472, "predictor": 9473, "dashboard": 9474}
#: How long a /ready answer and the jobs-by-status counts are reused.
CACHE_SECONDS = 5.0
#: How often librdkafka reports a consumer's lag (statistics.interval.ms).
LAG_INTERVAL_MS = 5000
#: The MongoDB commands timed as writes.
WRITE_COMMANDS = frozenset({"insert", "update", "delete", "findAndModify"})
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)

# -- the metrics (README, "Operating": keep the list there in step) ----------------------------------
BUILD = Info("tensordb", "The TensorDB version and the kind of process")
RECORDS_PROCESSED = Counter(
    "tensordb_records_processed", "Records a processor made durable (stored or dead-lettered), per topic", ["processor", "topic"]
)
RECORDS_DEAD_LETTERED = Counter(
    "tensordb_records_dead_lettered", "Records set aside as dead letters, per topic", ["processor", "topic"]
)
HANDLER_SECONDS = Histogram(
    "tensordb_handler_seconds",
    "Seconds a processor took to make one batch durable (validation's dead letters, the handler, flush, progress)",
    ["processor"], buckets=_FAST,
)  # fmt: skip
CONSUMER_LAG = Gauge(
    "tensordb_consumer_lag", "Records behind the end of the partition, per consumer group (librdkafka's statistics)",
    ["group", "topic", "partition"],
)  # fmt: skip
MONGO_WRITE_SECONDS = Histogram(
    "tensordb_mongo_write_seconds", "Seconds MongoDB took per write command (insert, update, delete, findAndModify)",
    ["command"], buckets=_FAST,
)  # fmt: skip
JOB_CLAIM_SECONDS = Histogram(
    "tensordb_job_claim_seconds", "Seconds one claim of the next pending job took", ["outcome"], buckets=_FAST
)
JOB_QUEUE_SECONDS = Histogram(
    "tensordb_job_queue_seconds", "Seconds from a job's submission to its claim (trials: jobs of a study)",
    ["kind", "trial"], buckets=_SLOW,
)  # fmt: skip
PREDICTIONS = Counter("tensordb_predictions", "Instances predicted", ["model", "via"])
PREDICTION_SECONDS = Histogram(
    "tensordb_prediction_seconds", "Seconds to answer one request (http) or one micro-batch (kafka)", ["model", "via"],
    buckets=_FAST,
)  # fmt: skip
MODEL_VERSION = Gauge("tensordb_model_version_served", "The version of the model being served", ["model"])
HTTP_REQUESTS = Counter("tensordb_http_requests", "HTTP requests answered, by status code", ["app", "code"])
HTTP_SECONDS = Histogram("tensordb_http_request_seconds", "Seconds to answer an HTTP request", ["app"], buckets=_FAST)
LOOP_OK = Gauge(
    "tensordb_loop_ok", "1 while a supervised loop works, 0 while it waits out an outage or retries a failure", ["loop"]
)
#: What each supervised loop of this process waits for now (absent: it works); ``/ready`` names them.
_loop_problems: dict[str, str] = {}


# -- hooks -------------------------------------------------------------------------------------------
def _count_per_topic(counter: Counter, processor: str, records: Iterable[Received]) -> None:
    for topic, count in collections.Counter(received.topic for received in records).items():
        counter.labels(processor, topic).inc(count)


def observe_batch(processor: str, batch: Sequence[Received], seconds: float) -> None:
    """A processor made ``batch`` durable in ``seconds``."""
    HANDLER_SECONDS.labels(processor).observe(seconds)
    _count_per_topic(RECORDS_PROCESSED, processor, batch)


def count_dead_letters(processor: str, letters: Iterable[tuple[Received, BaseException]]) -> None:
    """``letters`` were dead-lettered durably (a redelivered record counts again)."""
    _count_per_topic(RECORDS_DEAD_LETTERED, processor, (received for received, _ in letters))


def observe_claim(seconds: float, job: Mapping[str, Any] | None) -> None:
    """One claim took ``seconds``; for a claimed ``job``, how long it waited in the queue."""
    JOB_CLAIM_SECONDS.labels("claimed" if job is not None else "none").observe(seconds)
    if job is None:
        return
    submitted = job.get("submitted_at")
    if isinstance(submitted, str):
        submitted = datetime.fromisoformat(submitted)
    if isinstance(submitted, datetime):
        if submitted.tzinfo is None:  # pymongo returns naive UTC datetimes
            submitted = submitted.replace(tzinfo=UTC)
        trial = "true" if "study" in (job.get("labels") or {}) else "false"
        JOB_QUEUE_SECONDS.labels(str(job.get("kind")), trial).observe(max(0.0, (datetime.now(UTC) - submitted).total_seconds()))


def observe_predictions(model: str, via: str, instances: int, seconds: float) -> None:
    """``instances`` were predicted for one request (``via`` http) or micro-batch (``via`` kafka) in ``seconds``."""
    PREDICTIONS.labels(model, via).inc(instances)
    PREDICTION_SECONDS.labels(model, via).observe(seconds)


def model_served(model: str, version: int) -> None:
    MODEL_VERSION.labels(model).set(version)


def loop_state(loop: str, problem: str | None) -> None:
    """Record whether supervised loop ``loop`` works (``problem`` None) or what it waits for."""
    LOOP_OK.labels(loop).set(0 if problem else 1)
    if problem:
        _loop_problems[loop] = problem
    else:
        _loop_problems.pop(loop, None)


def forget_loop(loop: str) -> None:
    """Drop the state of a loop that ended (a stopped stage's consumer is no problem of the process)."""
    _loop_problems.pop(loop, None)
    try:
        LOOP_OK.remove(loop)
    except KeyError:  # never reported
        pass


def loop_problems() -> str | None:
    """The loops of this process that do not work now and why, or None when every one does."""
    problems = dict(_loop_problems)  # a copy: loops change it from their own threads
    return "; ".join(f"{loop}: {problem}" for loop, problem in sorted(problems.items())) or None


def lag_statistics(group: str) -> dict[str, Any]:
    """librdkafka options that report the consumer's lag per partition into ``tensordb_consumer_lag``:
    pass them to the consumer of ``group``."""
    reported: set[tuple[str, str]] = set()

    def on_statistics(text: str) -> None:
        try:
            topics = json.loads(text).get("topics", {})
        except ValueError:
            return
        now: set[tuple[str, str]] = set()
        for topic, details in topics.items():
            for partition, stats in details.get("partitions", {}).items():
                lag = stats.get("consumer_lag", -1)
                if partition == "-1" or lag is None or lag < 0:
                    continue  # the internal partition, or one this consumer does not fetch
                CONSUMER_LAG.labels(group, topic, partition).set(lag)
                now.add((topic, partition))
        for topic, partition in reported - now:  # revoked: another instance reports it now
            try:
                CONSUMER_LAG.remove(group, topic, partition)
            except KeyError:
                pass
        reported.clear()
        reported.update(now)

    return {"statistics.interval.ms": LAG_INTERVAL_MS, "stats_cb": on_statistics}


class JobsByStatus(Collector):
    """``tensordb_jobs{status}``: the project's jobs by status, counted by MongoDB when scraped
    (one aggregation on the indexed ``status``, reused for ``CACHE_SECONDS``)."""

    def __init__(self, jobs: ProjectCollection, statuses: Iterable[str]) -> None:
        self.jobs = jobs
        self.statuses = tuple(statuses)
        self._counts: dict[str, int] = {}
        self._at = float("-inf")
        self._lock = threading.Lock()

    def counts(self) -> dict[str, int]:
        with self._lock:
            if time.monotonic() - self._at >= CACHE_SECONDS:
                found = {
                    row["_id"]: row["count"]
                    for row in self.jobs.aggregate([{"$group": {"_id": "$status", "count": {"$sum": 1}}}])
                }
                self._counts = {status: int(found.get(status, 0)) for status in {*self.statuses, *found}}
                self._at = time.monotonic()
            return self._counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "tensordb_jobs", "Jobs of the project by status (counted in MongoDB when scraped)", labels=["status"]
        )
        try:
            for status, count in sorted(self.counts().items()):
                family.add_metric([str(status)], count)
        except Exception as exc:  # noqa: BLE001 - MongoDB away: the other metrics still answer
            log.warning("could not count jobs by status: %s", exc)
        yield family


_jobs_collector: JobsByStatus | None = None


def watch_jobs(jobs: ProjectCollection, statuses: Iterable[str]) -> None:
    """Export ``tensordb_jobs{status}`` from ``jobs`` (the project's jobs collection); once per process."""
    global _jobs_collector
    if _jobs_collector is None:
        _jobs_collector = JobsByStatus(jobs, statuses)
        REGISTRY.register(_jobs_collector)


class MongoWrites(monitoring.CommandListener):
    """Times every MongoDB write command of the process's clients (created after it is registered)."""

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        pass

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        if event.command_name in WRITE_COMMANDS:
            MONGO_WRITE_SECONDS.labels(event.command_name).observe(event.duration_micros / 1e6)

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self.succeeded(event)  # type: ignore[arg-type]  # same fields; a failed write took that long too


_listening = False


def listen_to_mongo_writes() -> None:
    """Register :class:`MongoWrites` (once): MongoDB clients created from now on report their writes."""
    global _listening
    if not _listening:
        monitoring.register(MongoWrites())
        _listening = True


class instrument:  # noqa: N801 - used like a function: instrument(app, "dashboard")
    """An ASGI app counting the responses of ``app`` (``tensordb_http_requests``) and timing them."""

    def __init__(self, app: ASGIApp, name: str) -> None:
        self.app = app
        self.name = name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        code = 500

        async def sending(message: Any) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            HTTP_REQUESTS.labels(self.name, str(code)).inc()
            HTTP_SECONDS.labels(self.name).observe(time.monotonic() - started)


# -- the endpoint ------------------------------------------------------------------------------------
def connectivity(settings: Settings, timeout: float = 3.0) -> Callable[[], str | None]:
    """A readiness probe: None when Kafka answers a metadata request and MongoDB a ping, else why not."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient
    from pymongo.errors import PyMongoError

    from tensordb.infra.store import Store

    clients: dict[str, Any] = {}

    def probe() -> str | None:
        try:
            if "kafka" not in clients:
                clients["kafka"] = AdminClient(settings.kafka_config(log_level=0))
            clients["kafka"].list_topics(timeout=timeout)
        except KafkaException as exc:
            return f"Kafka at {settings.kafka_bootstrap} does not answer: {exc}"
        try:
            if "mongo" not in clients:
                clients["mongo"] = Store(settings, server_wait_ms=int(timeout * 1000))
            clients["mongo"].client.admin.command("ping")
        except PyMongoError as exc:
            return f"MongoDB does not answer: {type(exc).__name__}"
        return None

    return probe


def refuse_open_binding(host: str, token: str | None) -> None:
    """Raise :class:`~tensordb.errors.ConfigurationError` for a binding beyond loopback without a token."""
    if not is_loopback(host) and not token:
        raise ConfigurationError(
            f"the metrics endpoint bound to {host} (TENSORDB_METRICS_HOST) would be open to the network: set "
            f"TENSORDB_METRICS_TOKEN (e.g. {secrets.token_urlsafe(16)}), which scrapers send as 'Authorization: Bearer "
            "TOKEN', or bind it to 127.0.0.1"
        )


class MetricsServer:
    """The HTTP endpoint of :func:`start_metrics` (see the module docstring); ``close`` stops it."""

    def __init__(self, settings: Settings, host: str, port: int, ready: Callable[[], str | None], token: str | None) -> None:
        refuse_open_binding(host, token)
        self.ready = ready
        self.token = token
        self.allowed_hosts = {*settings.http_allowed_hosts, host.strip("[]")}
        self._ready_at, self._ready_answer = float("-inf"), None  # type: tuple[float, str | None]
        self._ready_lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="tensordb-metrics", daemon=True)
        self._thread.start()

    def readiness(self) -> str | None:
        with self._ready_lock:
            if time.monotonic() - self._ready_at >= CACHE_SECONDS:
                try:
                    self._ready_answer = self.ready() or loop_problems()
                except Exception as exc:  # noqa: BLE001 - a failing probe means not ready, with the reason
                    self._ready_answer = f"{type(exc).__name__}: {exc}"
                self._ready_at = time.monotonic()
            return self._ready_answer

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                log.debug("metrics endpoint: " + format, *args)

            def _answer(self, code: int, body: bytes, content_type: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.end_headers()
                self.wfile.write(body)

            def _refused(self) -> str | None:
                if server.token is not None:
                    given = self.headers.get("Authorization", "")
                    if not hmac.compare_digest(given.encode(), f"Bearer {server.token}".encode()):
                        return "send the header 'Authorization: Bearer TOKEN' (TENSORDB_METRICS_TOKEN)"
                    return None
                host = self.headers.get("Host", "")
                name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
                if name.strip("[]") not in server.allowed_hosts:
                    return f"unknown Host {host!r}: add it to TENSORDB_HTTP_ALLOWED_HOSTS"
                return None

            def do_GET(self) -> None:  # noqa: N802 - the base class's name
                refused = self._refused()
                path = self.path.split("?", 1)[0]
                if refused:
                    self._answer(401 if server.token is not None else 421, json.dumps({"detail": refused}).encode())
                elif path == "/metrics":
                    encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                    self._answer(200, encoder(REGISTRY), content_type)
                elif path == "/health":
                    self._answer(200, b'{"status": "ok"}')
                elif path == "/ready":
                    problem = server.readiness()
                    body = {"status": "ready"} if problem is None else {"status": "not ready", "reason": problem}
                    self._answer(200 if problem is None else 503, json.dumps(body).encode())
                else:
                    self._answer(404, b'{"detail": "not found: /metrics, /health and /ready are"}')

        return Handler

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def start_metrics(
    settings: Settings, kind: str, port: int | None = None, ready: Callable[[], str | None] | None = None
) -> MetricsServer | None:
    """Serve this process's metrics, ``/health`` and ``/ready`` (see the module docstring).

    Parameters:
        settings: ``metrics_host``, ``metrics_port``, ``metrics_token``, the allowed Host names, and
            the servers the readiness probe asks.
        kind: ``processors``, ``worker``, ``serve``, ``predictor`` or ``dashboard`` (names the default port).
        port: ``--metrics-port``; wins over ``settings.metrics_port``. 0 (either): no endpoint.
        ready: the readiness probe; default :func:`connectivity`.

    Call it before the process opens its MongoDB clients, so that their writes are timed. Returns
    None when turned off, or when the kind's default port is taken (another process of the kind on
    this machine: logged); a port asked for explicitly that is taken, or a binding beyond loopback
    without a token, raises :class:`~tensordb.errors.ConfigurationError`.
    """
    from tensordb.version import __version__

    explicit = port if port is not None else settings.metrics_port
    chosen = explicit if explicit is not None else DEFAULT_PORTS.get(kind, 0)
    token = settings.metrics_token.get_secret_value() if settings.metrics_token is not None else None
    host = settings.metrics_host
    refuse_open_binding(host, token)  # before anything else: refuse to start, clearly
    listen_to_mongo_writes()
    BUILD.info({"version": __version__, "kind": kind})
    if chosen == 0:
        return None
    try:
        metrics = MetricsServer(settings, host, chosen, ready or connectivity(settings), token)
    except OSError as exc:
        if explicit is not None:
            raise ConfigurationError(
                f"cannot serve metrics on {host}:{chosen} ({exc.strerror}): pick another --metrics-port or TENSORDB_METRICS_PORT"
            ) from exc
        log.warning("metrics endpoint not started: %s:%s is taken (another %s on this machine?); pass --metrics-port PORT",
                    host, chosen, kind)  # fmt: skip
        return None
    shown = f"[{host}]" if ":" in host else host
    log.info("metrics at http://%s:%d/metrics (/health, /ready)", shown, metrics.port)
    return metrics
