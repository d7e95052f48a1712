"""The guard's cross-site request check without servers: an app behind :class:`Guard` with a CSRF
path, driven by Starlette's test client, on loopback (no token) and with a token (cookie sessions,
header tokens); CSRF tokens and origins on their own."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
from fastapi import FastAPI

with warnings.catch_warnings():  # Starlette would rather have httpx2; httpx is what this project pins
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from tensordb.config import Settings
from tensordb.infra.http_guard import CSRF_HEADER, CsrfTokens, Guard, same_origin

BASE = "http://127.0.0.1:8050"
TOKEN = "t0ken; odd=chars"
ALLOWED = ("localhost", "127.0.0.1", "::1")


def guarded(token: str | None = None) -> tuple[TestClient, list[str]]:
    """A client of an app whose POST /act records a call, behind a guard with CSRF on."""
    calls: list[str] = []
    app = FastAPI()

    @app.post("/act")
    def act() -> dict[str, Any]:
        calls.append("act")
        return {"done": True}

    @app.get("/read")
    def read() -> dict[str, Any]:
        return {"calls": len(calls)}

    guard = Guard(app, Settings(), token=token, host="127.0.0.1", cookie="session_8050", hint="h", csrf_path="/csrf")
    return TestClient(guard, base_url=BASE), calls


def csrf(client: TestClient, **headers: str) -> str:
    answer = client.get("/csrf", headers=headers)
    assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
    return str(answer.json()["csrf_token"])


def test_tokens_are_bound_to_the_session_and_the_process() -> None:
    tokens = CsrfTokens()
    token = tokens.token("session-a")
    assert tokens.valid("session-a", token.encode())
    assert not tokens.valid("session-b", token.encode())
    assert not tokens.valid("session-a", b"")
    assert not CsrfTokens().valid("session-a", token.encode())  # another process (a restart): another key


@pytest.mark.parametrize(
    ("origin", "host", "same"),
    [
        ("http://127.0.0.1:8050", "127.0.0.1:8050", True),
        ("http://localhost:8050", "localhost:8050", True),
        ("http://[::1]:8050", "[::1]:8050", True),
        ("https://localhost", "localhost", True),  # behind a proxy that keeps the Host
        ("http://127.0.0.1:8050/#/models", "127.0.0.1:8050", True),  # a Referer
        ("http://127.0.0.1:9999", "127.0.0.1:8050", False),  # another program on this machine
        ("http://127.0.0.1", "127.0.0.1:8050", False),
        ("http://evil.example:8050", "127.0.0.1:8050", False),
        ("http://127.0.0.1.evil.example:8050", "127.0.0.1:8050", False),
        ("null", "127.0.0.1:8050", False),
        ("file:///tmp/x.html", "127.0.0.1:8050", False),
        ("http://127.0.0.1:notaport", "127.0.0.1:8050", False),
    ],
)
def test_same_origin(origin: str, host: str, same: bool) -> None:
    assert same_origin(origin, host, ALLOWED) is same


def test_on_loopback_an_action_needs_the_session_s_csrf_token_and_an_origin_of_this_server() -> None:
    client, calls = guarded()
    refused = client.post("/act")
    assert refused.status_code == 403 and refused.json()["error"] == "csrf" and CSRF_HEADER in refused.json()["detail"]
    token = csrf(client)
    cookie = client.cookies.get("session_8050")
    assert cookie and token not in cookie
    assert client.post("/act", headers={CSRF_HEADER: token, "Origin": BASE}).json() == {"done": True}
    assert client.post("/act", headers={CSRF_HEADER: token}).status_code == 200  # a program: no Origin, the token suffices
    assert csrf(client) == token  # the same session keeps its token
    for origin in ("http://evil.example", "http://127.0.0.1:9999", "null"):
        refused = client.post("/act", headers={CSRF_HEADER: token, "Origin": origin})
        assert refused.status_code == 403 and "cross-site request refused" in refused.json()["detail"], origin
    refused = client.post("/act", headers={CSRF_HEADER: token, "Referer": "http://evil.example/page"})
    assert refused.status_code == 403 and "Referer" in refused.json()["detail"]
    forged = client.post("/act", headers={CSRF_HEADER: "0" * 64, "Origin": BASE})
    assert forged.status_code == 403 and "wrong" in forged.json()["detail"]
    assert len(calls) == 2
    assert client.get("/read").status_code == 200  # reads need nothing


def test_a_planted_cookie_does_not_help_a_forger() -> None:
    """A page of another port on this host can overwrite the cookie (cookies ignore ports), but not
    compute the token of the value it planted, and the victim's token does not fit that value."""
    client, calls = guarded()
    victim_token = csrf(client)
    client.cookies.clear()
    client.cookies.set("session_8050", "planted-by-another-port")
    refused = client.post("/act", headers={CSRF_HEADER: victim_token, "Origin": BASE})
    assert refused.status_code == 403 and not calls


def test_with_a_token_the_session_cookie_must_be_a_signed_in_one_and_header_tokens_need_no_csrf_token() -> None:
    client, calls = guarded(TOKEN)
    assert client.post("/act").status_code == 401  # the token rule first
    assert client.get("/csrf").status_code == 401
    client.get("/", params={"token": TOKEN}, follow_redirects=False)  # signs in: the session cookie
    token = csrf(client)
    assert client.post("/act").status_code == 403
    assert client.post("/act", headers={CSRF_HEADER: token, "Origin": BASE}).status_code == 200
    stranger = TestClient(client.app, base_url=BASE)
    stranger.cookies.set("session_8050", "made-up")
    assert stranger.post("/act", headers={CSRF_HEADER: CsrfTokens().token("made-up")}).status_code == 401
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert stranger.post("/act", headers=bearer).status_code == 200  # a program with the token
    refused = stranger.post("/act", headers={**bearer, "Origin": "http://evil.example"})
    assert refused.status_code == 403 and refused.json()["error"] == "csrf"
    assert len(calls) == 2


def test_only_gets_are_answered_at_the_csrf_path_and_safe_methods_are_never_checked() -> None:
    client, _ = guarded()
    assert client.post("/csrf").status_code == 403
    assert client.get("/read", headers={"Origin": "http://evil.example"}).status_code == 200
