"""Hardened HTTP for TensorDB's endpoints (the model server and the dashboard): one ASGI middleware.

Every request passes, in order:

1. the ``Host`` check: only the names in ``http_allowed_hosts`` and the bound address are answered,
   so a web page whose name was re-pointed at this machine (DNS rebinding) is refused (421);
2. the token, when one is set (it must be whenever the endpoint is bound beyond loopback): from
   ``Authorization: Bearer``, ``X-TensorDB-Token`` or the session cookie. A token in the URL
   (``?token=``, the address a person opens) is traded by a 303 redirect for a cookie holding a
   random session value, so the token leaves the address bar, the history and the logs;
3. the body limit (``http_max_body_bytes``): a larger ``Content-Length`` is answered 413 before any
   of the body is read; a body without one is counted as it streams in;
4. with ``csrf_path`` set (the dashboard), the cross-site request check on every request that may
   change something (any method but GET, HEAD and OPTIONS): an ``Origin`` (else a ``Referer``) must
   name an allowed host and this port, and the ``X-CSRF-Token`` header must hold the token bound to
   the request's session cookie (:class:`CsrfTokens`), which ``GET csrf_path`` hands out (setting the
   cookie when there is none yet). A request that proved the token in a header (``Authorization`` or
   ``X-TensorDB-Token``) needs no CSRF token: a browser cannot add those to a cross-site request.
   Refusals are 403 with a JSON ``{"detail", "error": "csrf"}``.

Every response carries the security headers (CSP and friends). :func:`server` runs an app under
uvicorn with the token masked in its access log, a header timer and a connection cap.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus, urlsplit

from tensordb.config import MASK, Settings
from tensordb.errors import ConfigurationError
from tensordb.infra.listeners import ACCEPT_BACKLOG, Connections

if TYPE_CHECKING:
    import uvicorn

# the ASGI specification's types (as Starlette spells them), so any ASGI app fits
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

log = logging.getLogger(__name__)

TOKEN_PARAM = "token"
#: The header that carries the CSRF token of a state-changing request.
CSRF_HEADER = "X-CSRF-Token"
#: Methods that change nothing (the apps behind a guard keep it so): no CSRF check.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Sessions (one per ``?token=`` login) kept at once; the oldest is forgotten first.
MAX_SESSIONS = 1024
#: A session cookie is honoured this long after the login that created it.
SESSION_SECONDS = 12 * 3600
#: The largest request head (request line and headers) read (h11's default); a larger one is answered 400.
MAX_HEAD_BYTES = 16 * 1024
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
)
SECURITY_HEADERS: Headers = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


# -- binding: loopback by default, a token otherwise ------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) stays on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_binding(host: str, token: str | None, what: str, variable: str) -> None:
    """Refuse to expose an endpoint beyond this machine without a token.

    Parameters:
        host: the address it is about to bind.
        token: its token, if any.
        what: the command, for the message (``tensordb serve``).
        variable: the environment variable that holds the token (``--token-file`` names a file instead).
    """
    if not is_loopback(host) and not token:
        raise ConfigurationError(
            f"`{what}` bound to {host} would be open to the network: set {variable} to a token (e.g. "
            f"{secrets.token_urlsafe(16)}) or pass --token-file PATH, a file only you can read that holds it"
        )


# -- the token in URLs: traded for a cookie, masked in logs ------------------------------------------


def _is_token_param(part: str) -> bool:
    return unquote_plus(part.partition("=")[0]) == TOKEN_PARAM


def redact_token(target: str) -> str:
    """``target`` (a path with its query) with the value of every ``token`` parameter masked."""
    path, separator, query = target.partition("?")
    if not separator:
        return target
    return f"{path}?" + "&".join(f"{TOKEN_PARAM}={MASK}" if _is_token_param(part) else part for part in query.split("&"))


class _RedactTokenInAccessLog(logging.Filter):
    """uvicorn's access log line is ``'%s - "%s %s HTTP/%s" %d'`` (client, method, target, ...)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_token(args[2]), *args[3:])
        return True


class Sessions:
    """Random session values handed out for a token presented in a URL.

    Only their digests are kept, looked up by digest, so neither the lookup's timing nor a memory
    dump gives a usable value away. Bounded: beyond ``limit`` the oldest login is forgotten.
    """

    def __init__(self, limit: int = MAX_SESSIONS, lifetime: float = SESSION_SECONDS) -> None:
        self.limit = limit
        self.lifetime = lifetime
        self._created: OrderedDict[bytes, float] = OrderedDict()

    @staticmethod
    def _digest(value: str) -> bytes:
        return hashlib.sha256(value.encode("utf-8", "replace")).digest()

    def new(self) -> str:
        """A fresh session value (256 random bits), valid from now on."""
        value = secrets.token_urlsafe(32)
        self._created[self._digest(value)] = time.monotonic()
        while len(self._created) > self.limit:
            self._created.popitem(last=False)
        return value

    def valid(self, value: str) -> bool:
        created = self._created.get(self._digest(value))
        return created is not None and time.monotonic() - created < self.lifetime


class CsrfTokens:
    """CSRF tokens bound to a session cookie: the HMAC-SHA256 of the cookie's value under a key that
    lives only in this process, so a page of another origin that knows (or planted) a cookie value
    still cannot compute its token, and a restart invalidates every token (pages fetch a new one).

    Parameters:
        key: the HMAC key; default a fresh random one.
    """

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def token(self, session: str) -> str:
        """The token of the session cookie value ``session``."""
        return hmac.new(self._key, session.encode("utf-8", "replace"), hashlib.sha256).hexdigest()

    def valid(self, session: str, token: bytes) -> bool:
        """Whether ``token`` (a header's bytes) is the token of ``session``, compared in constant time."""
        return hmac.compare_digest(self.token(session).encode(), token)


def _origin_netloc(value: str) -> tuple[str, int | None] | None:
    """(host name, port) of an ``Origin`` or ``Referer`` value (port: explicit, else the scheme's),
    or None for ``null``, an opaque or a non-HTTP origin."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return _host_name(parts.hostname), port if port is not None else (443 if parts.scheme == "https" else 80)


def same_origin(origin: str, host: str, allowed_hosts: Iterable[str]) -> bool:
    """Whether a request's ``Origin`` (or ``Referer``) is this endpoint: its host name is allowed and,
    when the ``Host`` header names a port, its port is that one (another program on the same machine
    is another origin).

    Parameters:
        origin: the header's value.
        host: the request's ``Host`` header.
        allowed_hosts: the names this endpoint answers for (as :class:`Guard` compares them).
    """
    parsed = _origin_netloc(origin)
    if parsed is None or parsed[0] not in set(allowed_hosts):
        return False
    host = host.strip()
    named_port = host.rsplit(":", 1)[1] if (host.count(":") == 1 or host.startswith("[")) and not host.endswith("]") else None
    return named_port is None or (named_port.isdigit() and int(named_port) == parsed[1])


# -- the middleware --------------------------------------------------------------------------------


def _host_name(value: str) -> str:
    """A Host header or a configured name, as compared: lower case, no port, brackets or final dot."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        value = value.partition(":")[0]
    return value.rstrip(".")


class Guard:
    """ASGI middleware in front of a TensorDB endpoint: Host check, token, body limit, security headers.

    Parameters:
        app: the ASGI app behind it (FastAPI's).
        settings: ``http_allowed_hosts``, ``http_max_body_bytes`` and ``http_forwarded_tls`` are read.
        token: the token every request must carry; ``None`` for none (loopback only, see
            :func:`check_binding`).
        host: the bound address, always an allowed ``Host``.
        cookie: the session cookie's name (cookies ignore ports: name it after the port).
        hint: what a request without the token is told, e.g. where the token comes from.
        csp: the Content-Security-Policy of every response.
        csrf_path: where ``GET`` hands out a page's CSRF token; set, every request but GET, HEAD and
            OPTIONS must pass the cross-site request check (see the module docstring). ``None`` for
            endpoints whose POSTs change nothing and whose clients are programs (the model server).
    """

    def __init__(
        self,
        app: ASGIApp,
        settings: Settings,
        *,
        token: str | None,
        host: str,
        cookie: str,
        hint: str,
        csp: str = CSP,
        csrf_path: str | None = None,
    ) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.allowed_hosts = frozenset(_host_name(name) for name in (*settings.http_allowed_hosts, host))
        self.max_body = settings.http_max_body_bytes
        self.forwarded_tls = settings.http_forwarded_tls
        self.cookie = cookie
        self.hint = hint
        self.sessions = Sessions()
        self.headers = [(b"content-security-policy", csp.encode()), *SECURITY_HEADERS]
        self.csrf_path = csrf_path
        self.csrf = CsrfTokens()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # neither endpoint speaks WebSocket
            await send({"type": "websocket.close", "code": 1008})
            return
        headers: dict[bytes, bytes] = {}
        for name, value in scope.get("headers") or ():
            headers.setdefault(name, value)
        host = headers.get(b"host")
        if host is None:
            await self.respond(send, 400, "a Host header is required\n")
            return
        if _host_name(host.decode("latin-1")) not in self.allowed_hosts:
            await self.respond(
                send, 421,
                f"this server does not answer for the host {_host_name(host.decode('latin-1'))!r}: if you reach it by that name, "
                "add it to TENSORDB_HTTP_ALLOWED_HOSTS (comma separated) and restart it\n",
            )  # fmt: skip
            return
        by_header = False
        if self.token is not None:
            authorized = await self._authorized(self.token, scope, headers, send)
            if authorized is None:
                return
            by_header = authorized == "header"
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            await self.too_large(send)
            return
        if self.csrf_path is not None:
            if scope["path"] == self.csrf_path and scope["method"] == "GET":
                await self._hand_out_csrf(scope, headers, send)
                return
            if scope["method"] not in SAFE_METHODS and not await self._cross_site_checked(headers, by_header, send):
                return
        exchange = _Exchange(self, receive, send)
        await self.app(scope, exchange.receive, exchange.send)

    # -- the token ---------------------------------------------------------------------------------

    async def _authorized(self, token: bytes, scope: Scope, headers: dict[bytes, bytes], send: Send) -> str | None:
        """How the request proved ``token``: ``"header"`` or ``"cookie"`` (a session); None when it did
        not, and the answer (401, or the login redirect) is sent."""
        parts = scope.get("query_string", b"").decode("latin-1").split("&")
        in_url = [unquote_plus(part.partition("=")[2]) for part in parts if _is_token_param(part)]
        if in_url:
            if scope["method"] not in ("GET", "HEAD"):
                await self.respond(send, 400, "send the token in an 'Authorization: Bearer' header, not in the URL\n")
            elif not hmac.compare_digest(in_url[-1].encode(), token):
                await self.respond(send, 401, f"wrong token: {self.hint}\n")
            else:
                await self._login(scope, headers, [part for part in parts if part and not _is_token_param(part)], send)
            return None
        authorization = headers.get(b"authorization", b"")
        if b"x-tensordb-token" in headers:
            way, allowed = "header", hmac.compare_digest(headers[b"x-tensordb-token"], token)
        elif authorization[:7].lower() == b"bearer ":
            way, allowed = "header", hmac.compare_digest(authorization[7:].strip(), token)
        else:
            way, allowed = "cookie", bool(self._sessions_of(headers))
        if not allowed:
            await self.respond(send, 401, f"this endpoint needs its token: {self.hint}\n")
            return None
        return way

    def _cookie_values(self, headers: dict[bytes, bytes]) -> list[str]:
        """Every value of the session cookie (another page of this host may have set one more)."""
        pairs = (pair.strip().partition("=") for pair in headers.get(b"cookie", b"").decode("latin-1").split(";"))
        return [value for name, _, value in pairs if name == self.cookie and value]

    def _sessions_of(self, headers: dict[bytes, bytes]) -> list[str]:
        """The request's session cookie values that count: signed-in sessions when a token is set,
        any value otherwise (then the cookie only binds the CSRF token)."""
        values = self._cookie_values(headers)
        return [value for value in values if self.sessions.valid(value)] if self.token is not None else values

    def _session_cookie(self, scope: Scope, headers: dict[bytes, bytes], value: str) -> bytes:
        secure = scope.get("scheme") == "https" or (
            self.forwarded_tls and headers.get(b"x-forwarded-proto", b"").split(b",")[0].strip().lower() == b"https"
        )
        cookie = f"{self.cookie}={value}; Path=/; Max-Age={int(self.sessions.lifetime)}; HttpOnly; SameSite=Strict"
        return (cookie + ("; Secure" if secure else "")).encode()

    # -- cross-site requests -----------------------------------------------------------------------

    async def _hand_out_csrf(self, scope: Scope, headers: dict[bytes, bytes], send: Send) -> None:
        """The CSRF token of the request's session, a new session (cookie) first when it has none."""
        sessions = self._sessions_of(headers)
        extra: list[tuple[bytes, bytes]] = [(b"cache-control", b"no-store")]
        if sessions:
            session = sessions[0]
        else:
            session = self.sessions.new()
            extra.append((b"set-cookie", self._session_cookie(scope, headers, session)))
        await self.respond_json(send, 200, {"csrf_token": self.csrf.token(session), "header": CSRF_HEADER}, extra)

    async def _cross_site_checked(self, headers: dict[bytes, bytes], by_header: bool, send: Send) -> bool:
        """Whether a state-changing request passes the cross-site request check; when not, the 403 is sent."""
        host = headers[b"host"].decode("latin-1")
        for name in (b"origin", b"referer"):  # a browser sends Origin with every POST; Referer is the fallback
            if name in headers:
                value = headers[name].decode("latin-1")
                if not same_origin(value, host, self.allowed_hosts):
                    await self.refuse_cross_site(
                        send, f"cross-site request refused: its {name.decode().title()} {value[:200]!r} is not this server"
                    )
                    return False
                break
        if by_header:
            return True
        token = headers.get(CSRF_HEADER.lower().encode())
        if token is None:
            await self.refuse_cross_site(
                send,
                f"the {CSRF_HEADER} header is missing: GET {self.csrf_path} (with this session's cookie) and send its csrf_token",
            )
            return False
        sessions = self._sessions_of(headers)
        if not sessions:
            await self.refuse_cross_site(
                send, f"no session cookie: GET {self.csrf_path} first, then send its csrf_token in {CSRF_HEADER}"
            )
            return False
        if not any(self.csrf.valid(session, token) for session in sessions):
            await self.refuse_cross_site(
                send,
                f"wrong {CSRF_HEADER} for this session (forged, or from before a restart): GET {self.csrf_path} for a new one",
            )
            return False
        return True

    async def refuse_cross_site(self, send: Send, detail: str) -> None:
        await self.respond_json(send, 403, {"detail": detail, "error": "csrf"})

    async def _login(self, scope: Scope, headers: dict[bytes, bytes], kept: list[str], send: Send) -> None:
        """303 to the same address without the token, setting a fresh session cookie.

        The location is relative to the page (``./LAST-SEGMENT?rest``): right behind a proxy that
        mounts the endpoint under a prefix, and never read as another host or a scheme.
        """
        segment = scope.get("raw_path", scope["path"].encode()).rsplit(b"/", 1)[-1]
        location = b"./" + segment + (b"?" + "&".join(kept).encode("latin-1") if kept else b"")
        cookie = self._session_cookie(scope, headers, self.sessions.new())
        await self.respond(
            send, 303, "signed in\n", [(b"location", location), (b"set-cookie", cookie), (b"cache-control", b"no-store")]
        )

    # -- answers ---------------------------------------------------------------------------------------

    async def too_large(self, send: Send) -> None:
        await self.respond(
            send, 413, f"the request body is larger than the limit of {self.max_body} bytes (TENSORDB_HTTP_MAX_BODY_BYTES)\n"
        )

    async def respond_json(self, send: Send, status: int, content: Any, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """A JSON answer of the guard's own (see :meth:`respond`)."""
        await self.respond(send, status, json.dumps(content), headers, b"application/json")

    async def respond(
        self,
        send: Send,
        status: int,
        text: str,
        headers: Iterable[tuple[bytes, bytes]] = (),
        media: bytes = b"text/plain; charset=utf-8",
    ) -> None:
        """An answer of the guard's own; the connection is closed (an unread body may follow)."""
        body = text.encode()
        start = [
            (b"content-type", media),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": [*start, *headers, *self.headers]})
        await send({"type": "http.response.body", "body": body})


class _Exchange:
    """One request seen by the app: its body counted as it streams in, the security headers added to
    its response. Past the body limit the client gets 413 and the app a disconnect, and whatever the
    app answers then is dropped."""

    def __init__(self, guard: Guard, receive: Receive, send: Send) -> None:
        self.guard = guard
        self._receive = receive
        self._send = send
        self.received = 0
        self.started = False
        self.refused = False

    async def receive(self) -> Message:
        if self.refused:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.guard.max_body:
                self.refused = True
                if not self.started:
                    await self.guard.too_large(self._send)
                return {"type": "http.disconnect"}
        return message

    async def send(self, message: Message) -> None:
        if self.refused:
            return
        if message["type"] == "http.response.start":
            self.started = True
            message = {**message, "headers": [*message.get("headers", ()), *self.guard.headers]}
        await self._send(message)


def _bounded_protocol(connections: Connections, header_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with timers and a connection cap (:mod:`tensordb.infra.listeners`).

    A connection waits for a request head from its opening, and again from the end of each answer:
    when the head is not complete within ``header_timeout``, the connection is closed (uvicorn's own
    keep-alive timer is reset by every byte, so a client sending one byte now and then would be kept
    forever). Then, while the body comes, at most ``header_timeout`` may pass between two of its
    chunks. Until the whole request is in, ``connections`` may close it to admit a new one (so a
    client dripping its body holds no place a new client needs); once it is, the app works for it.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11Protocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if connections.admit(self):
                self._wait_for_request()
            else:
                transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            connections.closed(self)
            self._stop_timer()
            super().connection_lost(exc)

        def close(self) -> None:
            """Closed to make room for a new connection."""
            self._stop_timer()
            if not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            cycle = self.cycle
            if cycle is None or cycle.response_complete or self.transport.is_closing():
                return  # still waiting for a request head: its timer runs
            if cycle.more_body:
                self._start_timer("no chunk of its request body")  # re-armed by each chunk
            else:
                self._stop_timer()  # the whole request is in: the app works for it
                connections.busy(self)

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self._wait_for_request()  # before super(): it handles a pipelined request at once
            super().on_response_complete()

        def _wait_for_request(self) -> None:
            self._start_timer("no complete request head")
            connections.wait(self)

        def _start_timer(self, missing: str) -> None:
            self._stop_timer()
            self._timer = self.loop.call_later(header_timeout, self._timed_out, missing)

        def _stop_timer(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _timed_out(self, missing: str) -> None:
            self._timer = None
            if not self.transport.is_closing():
                log.debug("closed a connection that sent %s within %s s", missing, header_timeout)
                self.transport.close()

    return BoundedH11Protocol


def server(app: ASGIApp, host: str, port: int, *, settings: Settings, what: str, **options: Any) -> uvicorn.Server:
    """A uvicorn server for a guarded app: the token masked in the access log, no proxy headers
    trusted by uvicorn (the guard reads ``X-Forwarded-Proto`` only when ``http_forwarded_tls``), and
    bounded resources.

    Parameters:
        app: the guarded app.
        host, port: the address to bind.
        settings: ``http_max_connections``, ``http_header_timeout_seconds`` and
            ``http_keep_alive_seconds`` are read (see :mod:`tensordb.infra.listeners`).
        what: the endpoint, for the warnings (``the dashboard``).
        options: more :class:`uvicorn.Config` options.

    At most ``http_max_connections`` connections are open (fitted to the open-file limit); at the
    cap, the one waiting longest for (the rest of) a request is closed for a new one. uvicorn's
    ``limit_concurrency`` is one above the cap (it counts the connections too): beyond it, requests
    still running for clients that left are answered 503. Neither endpoint speaks WebSocket, so
    upgrades are off.
    """
    import uvicorn

    connections = Connections(settings.http_max_connections, what)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="info", proxy_headers=False, server_header=False,
        http=_bounded_protocol(connections, settings.http_header_timeout_seconds), ws="none",
        timeout_keep_alive=settings.http_keep_alive_seconds, limit_concurrency=connections.limit + 1,
        backlog=ACCEPT_BACKLOG, h11_max_incomplete_event_size=MAX_HEAD_BYTES, **options,
    )  # fmt: skip
    access = logging.getLogger("uvicorn.access")  # configured (by Config) before the filter goes on
    if not any(isinstance(existing, _RedactTokenInAccessLog) for existing in access.filters):
        access.addFilter(_RedactTokenInAccessLog())

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            try:
                await super().shutdown(sockets)
            finally:
                connections.retire()

    return Server(config)
