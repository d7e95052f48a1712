"""Every listener under a flood of idle connections (issue 24, findings 6 and 12): the model server,
the dashboard, the metrics endpoint and the TLS terminator.

The thousand-connection tests start the server as a child process with a soft open-file limit of
1024 (a common ``ulimit -n``), as the finding was reproduced: before, 1,000 idle connections used
the process's descriptors up and a real request then waited in vain. The timeout and cap tests run
the servers in this process with short timeouts and small caps.
"""

from __future__ import annotations

import json
import resource
import socket
import ssl
import struct
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import httpx
import numpy as np
import pytest

from tensordb.config import Settings
from tensordb.infra.bus import Publisher
from tensordb.infra.metrics import MetricsServer
from tensordb.infra.store import Store
from tensordb.models.registry import ModelRegistry
from tensordb.services.process import ManagedProcess, log_since
from tensordb.services.tls import READY_LINE, TlsFiles, make_certificates
from tensordb.testing import dashboard_process, free_port, server_process
from tensordb.testing.models import small_classifier
from tests.security.test_http import ModelServer

#: Idle connections each flood test holds open.
IDLE = 1000
#: The soft open-file limit the servers under test start with.
CHILD_FILE_LIMIT = 1024
#: How long a real request may take while the flood is held.
ANSWER_SECONDS = 10.0
MODEL = "listeners"


@pytest.fixture(autouse=True)
def room_for_clients() -> Iterator[None]:
    """This process holds a few thousand client sockets: its soft open-file limit raised for the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 3 * IDLE + 1024
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the hard open-file limit ({hard}) is below the {wanted} this test holds")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextmanager
def children_file_limit(soft: int = CHILD_FILE_LIMIT) -> Iterator[None]:
    """Processes started inside inherit a soft open-file limit of ``soft`` (the hard one unchanged)."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


@contextmanager
def idle_connections(port: int, count: int = IDLE, wrap: ssl.SSLContext | None = None) -> Iterator[list[socket.socket]]:
    """``count`` connections to ``port`` that send nothing (TLS ones finish their handshake first), closed afterwards."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            held.append(wrap.wrap_socket(sock, server_hostname="127.0.0.1") if wrap is not None else sock)
        yield held
    finally:
        for sock in held:
            sock.close()


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` within ``within`` seconds (it sends nothing before)."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except (TimeoutError, ssl.SSLWantReadError):
        return False
    except (ConnectionError, ssl.SSLError):
        return True


def closed_now(sock: socket.socket) -> bool:
    return closed_by_server(sock, 0.01)


def read_to_end(sock: socket.socket, within: float) -> bytes:
    """Everything the server sends until it closes ``sock``, which must be within ``within`` seconds."""
    sock.settimeout(within)
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except TimeoutError:
        pytest.fail(f"the server kept the connection open more than {within} s (after {answer[:40]!r})")
    return answer


def predict_head(port: int, length: int) -> bytes:
    return (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


# -- a thousand idle connections, a real request ------------------------------------------------------


@pytest.fixture
def promoted(settings: Settings) -> Settings:
    """A production version of ``MODEL`` (8×8 inputs, 2 classes) for the model server."""
    with Store(settings) as store, ModelRegistry(store, Publisher(settings)) as registry:
        registry.promote(MODEL, int(registry.save(small_classifier(units=4), MODEL)["version"]))
    return settings


def test_a_thousand_idle_connections_each_leave_the_model_server_and_its_metrics_answering(
    promoted: Settings, tmp_path: Path
) -> None:
    port, metrics_port = free_port(), free_port()
    with children_file_limit():
        process = server_process(promoted, tmp_path / "serve.log", MODEL, port, metrics_port=metrics_port)
        process.start()
    try:
        with idle_connections(port), idle_connections(metrics_port):
            started = time.monotonic()
            answer = httpx.post(
                f"http://127.0.0.1:{port}/predict", json={"instances": np.zeros((2, 8, 8)).tolist()}, timeout=ANSWER_SECONDS
            )
            assert answer.status_code == 200 and len(answer.json()["predictions"]) == 2, answer.text
            health = httpx.get(f"http://127.0.0.1:{metrics_port}/health", timeout=ANSWER_SECONDS)
            assert health.status_code == 200 and health.json() == {"status": "ok"}
            print(f"model server and metrics: answered in {time.monotonic() - started:.2f} s beside 2 × {IDLE} idle connections")
    finally:
        process.stop()
    assert "Too many open files" not in process.log()


def test_a_thousand_idle_connections_each_leave_the_dashboard_and_its_metrics_answering(
    settings: Settings, tmp_path: Path
) -> None:
    port, metrics_port = free_port(), free_port()
    with children_file_limit():
        process = dashboard_process(settings, tmp_path / "dashboard.log", port, metrics_port=metrics_port)
        process.start()
    try:
        with idle_connections(port), idle_connections(metrics_port):
            started = time.monotonic()
            status = httpx.get(f"http://127.0.0.1:{port}/api/status", timeout=ANSWER_SECONDS)
            assert status.status_code == 200, status.text
            health = httpx.get(f"http://127.0.0.1:{metrics_port}/health", timeout=ANSWER_SECONDS)
            assert health.status_code == 200 and health.json() == {"status": "ok"}
            print(f"dashboard and metrics: answered in {time.monotonic() - started:.2f} s beside 2 × {IDLE} idle connections")
    finally:
        process.stop()
    assert "Too many open files" not in process.log()


# -- silent and slow clients are closed; at the cap the oldest waiting one makes room -----------------


@pytest.fixture
def metrics_server() -> Iterator[MetricsServer]:
    running = MetricsServer(
        Settings(http_header_timeout_seconds=1.0, http_max_connections=16), "127.0.0.1", 0, lambda: None, token=None
    )
    yield running
    running.close()


def test_the_http_endpoints_close_a_silent_or_slow_client_after_the_header_timeout(metrics_server: MetricsServer) -> None:
    model = ModelServer(Settings(http_header_timeout_seconds=1.0, http_keep_alive_seconds=1), None)
    try:
        for port in (model.port, metrics_server.port):
            silent = socket.create_connection(("127.0.0.1", port))
            slow = socket.create_connection(("127.0.0.1", port))
            started = time.monotonic()
            slow.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())
            dripped = 0
            while not closed_by_server(slow, 0.2) and time.monotonic() - started < 5:
                slow.sendall(b"X-Drip: %d\r\n" % dripped)  # a header line every 0.2 s: never the blank line
                dripped += 1
            slow_closed = time.monotonic() - started
            assert closed_by_server(silent, 5 - slow_closed), f"port {port}: a silent client is still connected after 5 s"
            assert slow_closed < 3, f"port {port}: a client dripping its headers was kept {slow_closed:.1f} s"
            silent.close()
            slow.close()
        # after an answer, a keep-alive connection that sends nothing more is closed too
        with socket.create_connection(("127.0.0.1", model.port)) as kept:
            kept.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{model.port}\r\n\r\n".encode())
            assert read_to_end(kept, 3).startswith(b"HTTP/1.1 200")
        # a body that stops coming is given up; one that keeps coming, however slowly, is answered
        body = json.dumps({"instances": [[1, 2, 3, 4]] * 4}).encode()
        head = predict_head(model.port, len(body))
        with socket.create_connection(("127.0.0.1", model.port)) as stalled:
            stalled.sendall(head + body[:10])
            assert closed_by_server(stalled, 3), "a request whose body stopped coming is still open after 3 s"
        with socket.create_connection(("127.0.0.1", model.port)) as slow_body:
            slow_body.sendall(head)
            for start in range(0, len(body), len(body) // 4 + 1):  # 2 s in all, 0.5 s between chunks
                time.sleep(0.5)
                slow_body.sendall(body[start : start + len(body) // 4 + 1])
            assert read_to_end(slow_body, 3).startswith(b"HTTP/1.1 200")
    finally:
        model.stop()


def test_at_the_cap_the_connections_waiting_longest_are_closed_and_a_request_is_answered(
    metrics_server: MetricsServer,
) -> None:
    model = ModelServer(Settings(http_max_connections=16), None)
    try:
        for port in (model.port, metrics_server.port):
            with idle_connections(port, 100) as held:
                answer = httpx.get(f"http://127.0.0.1:{port}/health", timeout=ANSWER_SECONDS)
                assert answer.status_code == 200
                time.sleep(0.2)
                closed = [closed_now(sock) for sock in held]
            assert 100 - 16 <= sum(closed) <= 100, f"port {port}: {sum(closed)} of 100 idle connections closed"
            assert closed == sorted(closed, reverse=True), f"port {port}: not the oldest ones were closed"
        # a request whose body has not all come holds no place a new client needs
        with socket.create_connection(("127.0.0.1", model.port)) as uploading:
            uploading.sendall(predict_head(model.port, 1000) + b"{")
            time.sleep(0.2)
            with idle_connections(model.port, 16):
                assert closed_by_server(uploading, 1), "a request still receiving its body was kept at the cap"
    finally:
        model.stop()


# -- the TLS terminator ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@contextmanager
def terminator(tls: TlsFiles, upstream: str, run_dir: Path, *options: str, file_limit: int | None = None) -> Iterator[int]:
    """``python -m tensordb.services.tls`` in front of ``upstream`` with ``options`` (started with a soft
    open-file limit of ``file_limit`` when given); its port."""
    port = free_port()
    process = ManagedProcess("tls", Path(sys.executable), run_dir)
    arguments = ["-m", "tensordb.services.tls", "--listen", f"127.0.0.1:{port}", "--upstream", upstream,
                 "--cert", str(tls.certificate), "--key", str(tls.key), *options]  # fmt: skip
    with children_file_limit(file_limit) if file_limit else nullcontext():
        process.start(arguments)
    try:
        process.wait_ready(lambda: READY_LINE in log_since(process.log_path, 0), timeout=30)
        yield port
    finally:
        process.stop()


def api_versions(port: int, tls: TlsFiles) -> int:
    """Send a Kafka ApiVersions (v0) request over TLS; the error code of the broker's answer."""
    context = ssl.create_default_context(cafile=str(tls.ca))
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_SECONDS) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            client = b"tensordb-test"
            body = struct.pack(">hhih", 18, 0, 42, len(client)) + client
            sock.sendall(struct.pack(">i", len(body)) + body)
            answer = b""
            while len(answer) < 10:
                chunk = sock.recv(65536)
                assert chunk, "the terminator closed the connection without an answer"
                answer += chunk
    size, correlation, error = struct.unpack(">iih", answer[:10])
    assert correlation == 42 and size > 6
    return error


def test_a_thousand_idle_tls_clients_leave_the_terminator_relaying(
    servers: Settings, tls_files: TlsFiles, tmp_path: Path
) -> None:
    context = ssl.create_default_context(cafile=str(tls_files.ca))
    with terminator(tls_files, servers.kafka_bootstrap, tmp_path, file_limit=CHILD_FILE_LIMIT) as port:
        with idle_connections(port, wrap=context):
            started = time.monotonic()
            assert api_versions(port, tls_files) == 0
            print(f"TLS terminator: relayed in {time.monotonic() - started:.2f} s beside {IDLE} idle TLS clients")


def test_the_terminator_closes_idle_relays_makes_room_and_gives_up_on_a_silent_upstream(
    servers: Settings, tls_files: TlsFiles, tmp_path: Path
) -> None:
    context = ssl.create_default_context(cafile=str(tls_files.ca))
    options = ("--idle-timeout", "1", "--max-connections", "16", "--connect-timeout", "1")
    with terminator(tls_files, servers.kafka_bootstrap, tmp_path, *options) as port:
        with idle_connections(port, 1, wrap=context) as (idle,):
            assert closed_by_server(idle, 5), "an idle relay is still open after 5 s"
        with idle_connections(port, 40, wrap=context) as held:
            assert api_versions(port, tls_files) == 0
            time.sleep(0.2)
            closed = [closed_now(sock) for sock in held]
        assert sum(closed) >= 40 - 16 and closed == sorted(closed, reverse=True), closed

    # an upstream that never accepts: its listen queue is full, so connecting to it hangs
    with socket.create_server(("127.0.0.1", 0), backlog=0) as upstream:
        fillers = []
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(upstream.getsockname())
            fillers.append(filler)
        try:
            with terminator(tls_files, f"127.0.0.1:{upstream.getsockname()[1]}", tmp_path / "silent", *options) as port:
                started = time.monotonic()
                with idle_connections(port, 1, wrap=context) as (client,):
                    assert closed_by_server(client, 10)
                assert time.monotonic() - started < 5, "the terminator waited more than its connect timeout"
        finally:
            for filler in fillers:
                filler.close()
