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
``TENSORDB_HTTP_ALLOWED_HOSTS`` is refused (DNS rebinding). Like the other HTTP endpoints it holds at
most ``TENSORDB_HTTP_MAX_CONNECTIONS`` connections and closes a client that sends no complete
request head within ``TENSORDB_HTTP_HEADER_TIMEOUT_SECONDS`` (:mod:`tensordb.infra.listeners`).

The metrics are module globals, updated by one-line hooks where the work happens (a batch made
durable, a record dead-lettered, a job claimed, a prediction answered); MongoDB write latency comes
from a pymongo command listener, consumer lag from librdkafka's statistics, and the jobs by status
from one aggregation, run when scraped (cached a few seconds).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import http.client
import io
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from email.message import Message
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from pymongo import monitoring

from tensordb.config import Settings
from tensordb.errors import ConfigurationError
from tensordb.infra.http_guard import MAX_HEAD_BYTES, is_loopback
from tensordb.infra.listeners import ACCEPT_BACKLOG, Connections

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from tensordb.infra.bus import Received
    from tensordb.infra.project_scope import ProjectCollection

log = logging.getLogger(__name__)

#: The metrics port of each kind of process when neither --metrics-port nor TENSORDB_METRICS_PORT says.
DEFAULT_PORTS = {"processors": 9470, "worker": 9471, "serve": 9472, "predictor": 9473, "dashboard": 9474}
#: Threads answering metrics requests (collecting the metrics and the readiness probe block).
ANSWER_THREADS = 4
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
            clients["mongo"].ping()
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
    """The HTTP endpoint of :func:`start_metrics` (see the module docstring); ``close`` stops it.

    Connections are read by an event loop in one thread, so a client that sends nothing costs a
    file descriptor, not a thread: its request head must arrive within ``http_header_timeout_seconds``,
    at most ``http_max_connections`` are open (at the cap, the one waiting longest is closed), and
    requests are answered by :data:`ANSWER_THREADS` threads (collecting the metrics and the readiness
    probe block). One request per connection.
    """

    def __init__(self, settings: Settings, host: str, port: int, ready: Callable[[], str | None], token: str | None) -> None:
        refuse_open_binding(host, token)
        self.ready = ready
        self.token = token
        self.allowed_hosts = {*settings.http_allowed_hosts, host.strip("[]")}
        self.header_timeout = settings.http_header_timeout_seconds
        self._ready_at, self._ready_answer = float("-inf"), None  # type: tuple[float, str | None]
        self._ready_lock = threading.Lock()
        self.connections = Connections(settings.http_max_connections, "the metrics endpoint")
        self._answering = ThreadPoolExecutor(ANSWER_THREADS, thread_name_prefix="tensordb-metrics-answer")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tensordb-metrics", daemon=True)
        self._thread.start()
        try:
            self._server = asyncio.run_coroutine_threadsafe(self._listen(host, port), self._loop).result()
        except BaseException:
            self._stop_loop()
            raise
        self.port: int = self._server.sockets[0].getsockname()[1]

    async def _listen(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._serve, host, port, backlog=ACCEPT_BACKLOG, limit=MAX_HEAD_BYTES)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.connections.admit(writer):
            writer.close()
            return
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.header_timeout)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return  # silent, too slow, too large or gone: nothing worth an answer
            self.connections.busy(writer)
            answer = await asyncio.get_running_loop().run_in_executor(self._answering, self.answer, head)
            writer.write(answer)
            await asyncio.wait_for(writer.drain(), self.header_timeout)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self.connections.closed(writer)
            writer.close()

    def readiness(self) -> str | None:
        with self._ready_lock:
            if time.monotonic() - self._ready_at >= CACHE_SECONDS:
                try:
                    self._ready_answer = self.ready() or loop_problems()
                except Exception as exc:  # noqa: BLE001 - a failing probe means not ready, with the reason
                    self._ready_answer = f"{type(exc).__name__}: {exc}"
                self._ready_at = time.monotonic()
            return self._ready_answer

    def answer(self, head: bytes) -> bytes:
        """The whole response (status line, headers, body) to one request ``head``."""
        line, _, fields = head.partition(b"\r\n")
        parts = line.decode("latin-1").split()
        try:
            headers = http.client.parse_headers(io.BytesIO(fields))
        except http.client.HTTPException:
            headers = None
        if len(parts) != 3 or not parts[2].startswith("HTTP/") or headers is None:
            return _response(400, b'{"detail": "not an HTTP request"}')
        method, target = parts[0], parts[1]
        refused = self._refused(headers)
        path = target.split("?", 1)[0]
        if refused:
            return _response(401 if self.token is not None else 421, json.dumps({"detail": refused}).encode())
        if method != "GET":
            return _response(405, b'{"detail": "only GET is answered"}', extra=[("Allow", "GET")])
        if path == "/metrics":
            encoder, content_type = choose_encoder(headers.get("Accept", ""))
            return _response(200, encoder(REGISTRY), content_type)
        if path == "/health":
            return _response(200, b'{"status": "ok"}')
        if path == "/ready":
            problem = self.readiness()
            body = {"status": "ready"} if problem is None else {"status": "not ready", "reason": problem}
            return _response(200 if problem is None else 503, json.dumps(body).encode())
        return _response(404, b'{"detail": "not found: /metrics, /health and /ready are"}')

    def _refused(self, headers: Message) -> str | None:
        if self.token is not None:
            given = headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode("latin-1", "replace"), f"Bearer {self.token}".encode()):
                return "send the header 'Authorization: Bearer TOKEN' (TENSORDB_METRICS_TOKEN)"
            return None
        host = headers.get("Host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name.strip("[]") not in self.allowed_hosts:
            return f"unknown Host {host!r}: add it to TENSORDB_HTTP_ALLOWED_HOSTS"
        return None

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            for connection in list(self.connections.open):
                connection.close()
            current = asyncio.current_task()
            tasks = [task for task in asyncio.all_tasks() if task is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._answering.shutdown(wait=False)
        self.connections.retire()


def _response(code: int, body: bytes, content_type: str = "application/json", extra: Iterable[tuple[str, str]] = ()) -> bytes:
    """An HTTP/1.1 response that closes its connection."""
    headers = [
        ("Content-Type", content_type), ("Content-Length", str(len(body))), ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"), ("Connection", "close"), *extra,
    ]  # fmt: skip
    lines = [f"HTTP/1.1 {code} {HTTPStatus(code).phrase}", *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


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
