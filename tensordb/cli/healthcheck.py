"""``tensordb healthcheck PART``: exit 0 when the part running on this host works, 1 (with the reason)
when not. Made for container healthchecks (docker-compose.yml); each check takes a few seconds at most.

- ``processors``: Kafka answers a metadata request and MongoDB a ping (what the processors need);
- ``worker``: a worker on this host advertised itself in the last ``LIVE_SECONDS`` (it does every 5 s);
- ``serve``: the model server on ``TENSORDB_SERVE_PORT`` answers ``/health``: 200 when it serves a
  version, 503 while the policy has no production version yet (running, nothing to serve);
- ``dashboard``: the dashboard on ``TENSORDB_DASHBOARD_PORT`` answers ``/api/status`` (with its token).
"""

from __future__ import annotations

import argparse
import socket
import sys

from tensordb.config import Settings, load_settings

TIMEOUT_SECONDS = 5.0


def _processors(settings: Settings) -> str | None:
    from tensordb.infra.metrics import connectivity

    return connectivity(settings, TIMEOUT_SECONDS)()  # what the processors' /ready answers


def _worker(settings: Settings) -> str | None:
    from tensordb.infra.store import Store
    from tensordb.jobs.workers import LIVE_SECONDS, Workers

    host = socket.gethostname()
    with Store(settings, server_wait_ms=int(TIMEOUT_SECONDS * 1000)) as store:
        if any(worker["host"] == host for worker in Workers(store).list()):
            return None
    return f"no worker on {host} advertised itself in the last {LIVE_SECONDS:.0f} s"


def _http(port: int, path: str, token: str | None, accept: tuple[int, ...]) -> str | None:
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(f"http://127.0.0.1:{port}{path}", headers=headers, timeout=TIMEOUT_SECONDS)
    except httpx.HTTPError as exc:
        return f"127.0.0.1:{port}{path} did not answer: {type(exc).__name__}"
    return None if response.status_code in accept else f"127.0.0.1:{port}{path} answered {response.status_code}"


def _serve(settings: Settings) -> str | None:
    token = settings.serve_token.get_secret_value() if settings.serve_token else None
    return _http(settings.serve_port, "/health", token, (200, 503))


def _dashboard(settings: Settings) -> str | None:
    token = settings.dashboard_token.get_secret_value() if settings.dashboard_token else None
    return _http(settings.dashboard_port, "/api/status", token, (200,))


CHECKS = {"processors": _processors, "worker": _worker, "serve": _serve, "dashboard": _dashboard}


def _healthcheck(args: argparse.Namespace) -> int:
    problem = CHECKS[args.part](load_settings())
    if problem:
        print(f"tensordb healthcheck {args.part}: {problem}", file=sys.stderr)
        return 1
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    check = subparsers.add_parser("healthcheck", help="exit 0 if a part running on this host works (container healthchecks)")
    check.add_argument("part", choices=sorted(CHECKS))
    check.set_defaults(handler=_healthcheck)
