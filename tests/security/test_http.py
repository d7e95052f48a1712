"""The HTTP endpoints as an attacker meets them: the model server (a real uvicorn in a thread, serving
a stub model, or ``tensordb serve`` itself) and ``tensordb dashboard`` against the real services.

Tried: DNS rebinding (a foreign ``Host``), bodies too large (declared, and chunked), the model server
open beyond loopback, OpenAPI and /docs, a token in the URL (redirected to a random session cookie,
never logged), shapes that do not fit the model, and passwords shown by the dashboard.
"""

from __future__ import annotations

import hashlib
import logging
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import numpy as np
import pytest

from tensordb.config import Settings
from tensordb.infra.http_guard import redact_token, server
from tensordb.services.apps import READY_LINES
from tensordb.testing import ChildProcess, Dashboard, dashboard_process, free_port, server_process
from tests import REPO
from workers import serve

TOKEN = "s3cret-t0ken; with=odd chars&more"
LIMIT = 64 * 1024


class StubModel:
    """Enough of a Keras model for the server: four inputs, their sum out."""

    input_shape = (None, 4)

    def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
        return batch.sum(axis=1, keepdims=True)


class AccessLog(logging.Handler):
    """uvicorn's access log lines, as its own handler would write them."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class ModelServer:
    """The model server's app under uvicorn (as ``tensordb serve`` runs it) on a free port, in a thread."""

    def __init__(self, settings: Settings, token: str | None) -> None:
        self.port = free_port()
        holder = serve.ModelHolder(registry=None, name="stub")  # type: ignore[arg-type] - never refreshed
        holder.current = serve.Serving(StubModel(), {"version": 1}, datetime.now(UTC))
        self.server = server(
            serve.create_app(holder, settings, token, "127.0.0.1", self.port),
            "127.0.0.1",
            self.port,
            settings=settings,
            what="the model server",
        )
        self.log = AccessLog()
        logging.getLogger("uvicorn.access").addHandler(self.log)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the model server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def stop(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(10)
        logging.getLogger("uvicorn.access").removeHandler(self.log)


@pytest.fixture
def model_server() -> Iterator[Callable[..., ModelServer]]:
    """Start model servers with some settings changed (and a token); all stopped afterwards."""
    started: list[ModelServer] = []

    def start(token: str | None = None, **changes: Any) -> ModelServer:
        started.append(ModelServer(Settings(**changes), token))
        return started[-1]

    yield start
    for running in started:
        running.stop()


def raw_exchange(port: int, head: bytes, chunks: Iterable[bytes] = (), timeout: float = 5.0) -> bytes:
    """Send ``head``, then ``chunks`` until an answer arrives; the answer's bytes (b"" if none came
    within ``timeout``: a server waiting for the rest of the body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        for chunk in chunks:
            if select.select([sock], [], [], 0.05)[0]:
                break
            sock.sendall(chunk)
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
        except TimeoutError:
            pass
        return answer


def cookie_of(response: httpx.Response) -> tuple[str, str, set[str]]:
    """The name, value and attributes of the response's one Set-Cookie."""
    pair, *attributes = (part.strip() for part in response.headers["set-cookie"].split(";"))
    name, _, value = pair.partition("=")
    return name, value, {attribute.split("=")[0] for attribute in attributes}


# -- DNS rebinding --------------------------------------------------------------------------------------


def test_a_foreign_host_name_is_refused_and_the_allowed_ones_are_answered(model_server) -> None:
    running = model_server()
    for host in ("evil.example", "evil.example:%d" % running.port, "127.0.0.1.evil.example", "localhost.evil.example"):
        refused = running.http.get("/health", headers={"Host": host})
        assert refused.status_code == 421 and "TENSORDB_HTTP_ALLOWED_HOSTS" in refused.text, host
    for host in (f"127.0.0.1:{running.port}", f"localhost:{running.port}", "LOCALHOST", f"[::1]:{running.port}"):
        assert running.http.get("/health", headers={"Host": host}).status_code == 200, host
    named = model_server(http_allowed_hosts="tensordb.internal")
    assert named.http.get("/health", headers={"Host": f"tensordb.internal:{named.port}"}).status_code == 200
    assert named.http.get("/health", headers={"Host": f"127.0.0.1:{named.port}"}).status_code == 200  # the bound address
    assert named.http.get("/health", headers={"Host": "localhost"}).status_code == 421  # no longer listed


# -- body limits ----------------------------------------------------------------------------------------


def test_a_declared_body_over_the_limit_is_refused_before_it_is_read(model_server) -> None:
    running = model_server(http_max_body_bytes=LIMIT)
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{running.port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {40 * 1024 * 1024}\r\n\r\n"
    ).encode() + b'{"instances": [[1, 2'
    started = time.monotonic()
    answer = raw_exchange(running.port, head)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert time.monotonic() - started < 2 and b"TENSORDB_HTTP_MAX_BODY_BYTES" in answer
    assert running.http.post("/predict", json={"instances": [[1, 2, 3, 4]]}).json()["predictions"] == [[10.0]]


def test_a_chunked_body_is_counted_and_refused_past_the_limit(model_server) -> None:
    running = model_server(http_max_body_bytes=LIMIT)
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{running.port}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    piece = b"1, " * 2730 + b"1"  # 8 KiB of a JSON list that never ends
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(4 * LIMIT // len(piece))]
    answer = raw_exchange(running.port, head + b'10\r\n{"instances": [[\r\n', chunks)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    small = running.http.post(
        "/predict", content=iter([b'{"instances": ', b"[[1, 2, 3, 4]]}"]), headers={"Content-Type": "application/json"}
    )
    assert small.status_code == 200 and small.json()["predictions"] == [[10.0]]  # chunked, under the limit


# -- the model server's token, docs and input ----------------------------------------------------------


def test_the_model_server_refuses_to_start_beyond_loopback_without_a_token() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tensordb.cli", "serve", "--policy", "digits", "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True, text=True, timeout=60, cwd=REPO, env={"PATH": "/usr/bin:/bin", "TENSORDB_PROJECT": "nothing"},
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "0.0.0.0" in result.stderr, result.stderr
    assert (
        "set TENSORDB_SERVE_TOKEN" in result.stderr and "--token-file PATH" in result.stderr and "--token " not in result.stderr
    )


def test_with_a_token_every_model_server_request_needs_it(model_server) -> None:
    running = model_server(token=TOKEN)
    for path in ("/health", "/model"):
        refused = running.http.get(path)
        assert refused.status_code == 401 and "Authorization: Bearer" in refused.text
    assert running.http.post("/predict", json={"instances": [[1, 2, 3, 4]]}).status_code == 401
    assert running.http.get("/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert running.http.get("/health", headers={"X-TensorDB-Token": TOKEN[:-1]}).status_code == 401
    assert running.http.get("/health", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    posted = running.http.post("/predict", json={"instances": [[1, 2, 3, 4]]}, headers={"X-TensorDB-Token": TOKEN})
    assert posted.json()["predictions"] == [[10.0]]
    in_url = running.http.post("/predict", params={"token": TOKEN}, json={"instances": [[1, 2, 3, 4]]})
    assert in_url.status_code == 400 and "Authorization" in in_url.text  # a POST is not redirected (its body would be lost)


def test_tensordb_serve_beyond_loopback_takes_its_token_and_never_prints_it(settings, tmp_path) -> None:
    port = free_port()
    process = server_process(settings, tmp_path / "serve.log", "nothing-promoted", port, host="0.0.0.0", token=TOKEN)
    process.start()
    try:
        url = f"http://127.0.0.1:{port}/health"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 503  # in, but no model yet
        assert httpx.get(url, params={"token": TOKEN}).status_code == 303
    finally:
        process.stop()
    assert "token=***" in process.log() and TOKEN not in process.log() and "s3cret" not in process.log()


def test_tensordb_serve_takes_its_token_from_a_file_and_never_from_the_command_line(settings, tmp_path) -> None:
    """Issue 24, finding 11: every user of the machine reads a process's command line (``ps``), so
    the token comes from a file (or the environment), and the old ``--token`` is refused."""
    token_file = tmp_path / "serve-token"
    token_file.write_text(f"{TOKEN}\n")
    token_file.chmod(0o600)
    port = free_port()
    arguments = [
        "serve",
        "--policy",
        "nothing-promoted",
        "--host",
        "0.0.0.0",
        "--port",
        str(port),
        "--token-file",
        str(token_file),
    ]
    process = ChildProcess([*arguments, "--metrics-port", "0"], READY_LINES["serve"], settings, tmp_path / "serve.log")
    process.start()
    try:
        assert process.process is not None
        assert TOKEN.encode() not in Path(f"/proc/{process.process.pid}/cmdline").read_bytes()
        url = f"http://127.0.0.1:{port}/health"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 503  # in, but no model yet
    finally:
        process.stop()
    assert TOKEN not in process.log()
    refused = subprocess.run(
        [sys.executable, "-m", "tensordb.cli", "serve", "--policy", "digits", "--token", TOKEN],
        capture_output=True, text=True, timeout=60, cwd=REPO, env={"PATH": "/usr/bin:/bin", "TENSORDB_PROJECT": "nothing"},
    )  # fmt: skip
    assert refused.returncode == 2 and "--token is no longer accepted" in refused.stderr, refused.stderr
    assert "TENSORDB_SERVE_TOKEN" in refused.stderr and "--token-file PATH" in refused.stderr
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    refused = subprocess.run(
        [sys.executable, "-m", "tensordb.cli", "serve", "--policy", "digits", "--token-file", str(empty)],
        capture_output=True, text=True, timeout=60, cwd=REPO, env={"PATH": "/usr/bin:/bin", "TENSORDB_PROJECT": "nothing"},
    )  # fmt: skip
    assert refused.returncode == 1 and f"the token file {empty} is empty" in refused.stderr, refused.stderr


def test_openapi_and_docs_are_off_unless_asked_for(model_server) -> None:
    running = model_server()
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert running.http.get(path).status_code == 404, path
    documented = model_server(http_docs=True)
    assert documented.http.get("/openapi.json").json()["paths"].keys() >= {"/predict", "/health"}
    docs = documented.http.get("/docs")
    assert docs.status_code == 200 and "https://cdn.jsdelivr.net" in docs.headers["content-security-policy"]


class NumpySpy:
    """numpy for the model server, recording every array it is asked to build from the request."""

    def __init__(self) -> None:
        self.built: list[Any] = []

    def asarray(self, value: Any, *args: Any, **kwargs: Any) -> np.ndarray:
        self.built.append(value)
        return np.asarray(value, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


def test_instances_are_checked_against_the_model_s_shape_before_any_array_is_built(model_server, monkeypatch) -> None:
    from tensordb.models import serving

    spy = NumpySpy()
    monkeypatch.setattr(serving, "np", spy)  # where the model server builds its arrays
    running = model_server()
    wrong = {
        "instances[1] has 3 items, not 4": [[1, 2, 3, 4], [1, 2, 3]],
        "instances[0] has 100000 items, not 4": [[0] * 100_000],
        "instances[0][2] is list, not a number": [[1, 2, [3], 4]],
        "instances[0][1] is str, not a number": [[1, "2", 3, 4]],
        "instances[0][0] is bool, not a number": [[True, 2, 3, 4]],
        "instances[0] is int, not a list": [1],
    }
    for problem, instances in wrong.items():
        refused = running.http.post("/predict", json={"instances": instances})
        assert refused.status_code == 422 and "shape [4]" in refused.text and problem in refused.text, refused.text
    too_many = running.http.post("/predict", json={"instances": [[1, 2, 3, 4]] * (serve.MAX_INSTANCES + 1)})
    assert too_many.status_code == 422 and str(serve.MAX_INSTANCES) in too_many.text
    assert spy.built == []  # none of the above reached numpy
    huge = running.http.post("/predict", json={"instances": [[10**400, 0, 0, 0]]})
    assert huge.status_code == 422 and "float32" in huge.text
    fits = running.http.post("/predict", json={"instances": [[1, 2, 3, 4], [0.5, 0, 0, 0]]})
    assert fits.json()["predictions"] == [[10.0], [0.5]]


# -- the token in a URL ---------------------------------------------------------------------------------


def test_a_token_in_the_url_is_traded_for_a_random_session_cookie(model_server) -> None:
    running = model_server(token=TOKEN)
    signed_in = running.http.get("/model", params={"token": TOKEN, "pretty": "1"})
    assert signed_in.status_code == 303 and signed_in.headers["cache-control"] == "no-store"
    assert urljoin(str(signed_in.url), signed_in.headers["location"]) == f"{running.url}/model?pretty=1"
    name, value, attributes = cookie_of(signed_in)
    assert attributes >= {"HttpOnly", "SameSite", "Path"} and "SameSite=Strict" in signed_in.headers["set-cookie"]
    assert "Secure" not in attributes  # plain HTTP, no proxy trusted
    assert len(value) >= 32 and "s3cret" not in value and value != hashlib.sha256(TOKEN.encode()).hexdigest()
    assert cookie_of(running.http.get("/", params={"token": TOKEN}))[1] != value  # every login its own value
    plain = httpx.Client(base_url=running.url, timeout=10)
    assert plain.get("/model", headers={"Cookie": f"{name}={value}"}).status_code == 200
    assert plain.get("/model", headers={"Cookie": f"{name}={hashlib.sha256(TOKEN.encode()).hexdigest()}"}).status_code == 401
    assert plain.get("/model", headers={"Cookie": f"{name}=made-up"}).status_code == 401
    assert plain.get("/model", params={"token": "wrong"}).status_code == 401
    root = plain.get("/", params={"token": TOKEN})
    assert urljoin(str(root.url), root.headers["location"]) == f"{running.url}/"
    plain.close()


def test_the_session_cookie_is_secure_behind_a_trusted_tls_proxy_only(model_server) -> None:
    forwarded = {"X-Forwarded-Proto": "https"}
    untrusted = model_server(token=TOKEN)
    assert "Secure" not in cookie_of(untrusted.http.get("/", params={"token": TOKEN}, headers=forwarded))[2]
    behind_proxy = model_server(token=TOKEN, http_forwarded_tls=True)
    assert "Secure" in cookie_of(behind_proxy.http.get("/", params={"token": TOKEN}, headers=forwarded))[2]
    assert (
        "Secure" not in cookie_of(behind_proxy.http.get("/", params={"token": TOKEN}, headers={"X-Forwarded-Proto": "http"}))[2]
    )


def test_the_access_log_never_holds_the_token(model_server) -> None:
    running = model_server(token=TOKEN)
    running.http.get("/health", params={"token": TOKEN})
    running.http.get("/model", params={"a": "1", "token": "a-wrong-guess"})
    running.http.get(f"/health?%74oken={TOKEN.replace('&', '%26')}")
    time.sleep(0.2)
    lines = "\n".join(running.log.lines)
    assert lines.count("token=***") == 3, lines  # the encoded name too
    assert "s3cret" not in lines and "a-wrong-guess" not in lines and "a=1" in lines


def test_redact_token_keeps_everything_else() -> None:
    assert redact_token("/a?x=1&token=abc&y=token%3D2") == "/a?x=1&token=***&y=token%3D2"
    assert redact_token("/a?token") == "/a?token=***" and redact_token("/token=1") == "/token=1"


# -- the dashboard --------------------------------------------------------------------------------------


@pytest.fixture
def dashboard_with_token(settings: Settings, tmp_path: Path) -> Iterator[Dashboard]:
    """``tensordb dashboard`` beyond loopback, its token from the settings (TENSORDB_DASHBOARD_TOKEN)."""
    port = free_port()
    with_token = settings.with_changes(dashboard_token=TOKEN)
    process = ChildProcess(
        ["dashboard", "--host", "0.0.0.0", "--port", str(port)], "Uvicorn running on", with_token, tmp_path / "dash.log"
    )
    process.start(timeout=60)
    dashboard = Dashboard(process, port)
    try:
        yield dashboard
    finally:
        dashboard.http.close()
        process.stop()


def test_the_dashboard_checks_hosts_trades_a_url_token_for_a_cookie_and_never_logs_it(dashboard_with_token) -> None:
    dashboard = dashboard_with_token
    assert dashboard.http.get("/api/status", headers={"Host": "evil.example"}).status_code == 421
    assert dashboard.http.get("/api/status").status_code == 401
    assert dashboard.http.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404
    opened = dashboard.http.get("/", params={"token": TOKEN})
    assert opened.status_code == 303 and "script-src 'self'" in opened.headers["content-security-policy"]
    name, value, attributes = cookie_of(opened)
    assert name.startswith("tensordb_dashboard_") and {"HttpOnly", "SameSite"} <= attributes and "Secure" not in attributes
    page = dashboard.http.get(urljoin(str(opened.url), opened.headers["location"]))
    assert page.status_code == 200 and page.url.query == b""
    assert dashboard.http.get("/api/status").status_code == 200  # the cookie came along
    log = dashboard.process.log()
    assert "token=***" in log and "s3cret" not in log


def test_a_too_large_request_to_the_dashboard_is_refused(settings, tmp_path) -> None:
    port = free_port()
    process = dashboard_process(settings, tmp_path / "dash.log", port)
    process.start(timeout=60)
    try:
        head = f"POST /api/runs HTTP/1.1\r\nHost: localhost:{port}\r\nContent-Length: {10**9}\r\n\r\nxx".encode()
        assert raw_exchange(port, head).startswith(b"HTTP/1.1 413 ")
        assert httpx.get(f"http://127.0.0.1:{port}/api/status", headers={"Host": "attacker.example"}).status_code == 421
    finally:
        process.stop()
