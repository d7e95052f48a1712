"""Bounded resources for every listener (the HTTP endpoints, the metrics endpoint, the TLS terminator).

A connection that sends nothing costs the server a file descriptor (and, before this, a thread or an
upstream connection) for as long as the client likes: about a thousand of them exhausted a process's
open-file limit, and a real request was then refused ("Too many open files"). So each listener

- counts its connections (:class:`Connections`) and, at its cap, closes the one that has waited
  longest for its client (a connection still waiting for a request, or a relay that moved nothing
  lately) to make room for the new one: an attacker who opens connections faster than the timeouts
  close them only pushes out its own, and a request that arrives is served;
- closes a connection whose client does not send a complete request head within a deadline (the
  listener's own timer: uvicorn's keep-alive timer is reset by every byte, and starts only after
  the first answer), or, for a relay, that moved no byte for a while;
- fits its cap to the process's open-file limit (:func:`fit_to_file_limit`), raising the soft limit
  towards the hard one when it is too low, and lowering the cap (with a warning) when even that
  does not fit.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Hashable
from typing import Protocol

log = logging.getLogger(__name__)

#: File descriptors kept free beyond the listeners' caps: the process's own files, Kafka and MongoDB
#: clients, and the sockets one accept burst takes before the caps can close anything.
RESERVED_FILES = 256
#: The listen backlog of every listener: also the most sockets one accept burst can open.
ACCEPT_BACKLOG = 128
#: A cap is never fitted below this, whatever the open-file limit says.
MIN_CONNECTIONS = 16
#: Seconds between two warnings that a listener is full (an attack would otherwise flood the log).
FULL_WARNING_SECONDS = 60.0

_live: set[Connections] = set()  # the caps of this process's listeners, until they are retired


class Closable(Hashable, Protocol):
    """A connection as :class:`Connections` sees it: something it can close."""

    def close(self) -> None: ...


def _open_files() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: count nothing; the reserve covers the process's own files
        return 0


def fit_to_file_limit(connections: int, what: str, files_each: int = 1) -> int:
    """How many connections ``what`` may hold at once, at most ``connections``.

    Raises the process's soft ``RLIMIT_NOFILE`` (up to its hard limit) so that the caps of every
    listener of this process, the files open now and :data:`RESERVED_FILES` fit; when even the hard
    limit is too low, the cap is lowered to half of what is left (the process may open more
    listeners) and a warning says how to raise the limit.

    Parameters:
        connections: the configured cap.
        what: the listener, for the warning (``the dashboard``).
        files_each: descriptors one connection holds (2 for a relay: client and upstream).
    """
    try:
        import resource
    except ImportError:  # not Unix: no limit to read or raise
        return connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    others = _open_files() + sum(live.limit * live.files_each for live in _live) + RESERVED_FILES
    needed = others + connections * files_each
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError) as exc:
            log.debug("could not raise the open-file limit to %d: %s", raised, exc)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return connections
    fitted = max(MIN_CONNECTIONS, (soft - others) // (2 * files_each))  # half: leave room for the next listener
    log.warning(
        "%s holds at most %d connections, not %d: the open-file limit (ulimit -n) is %d; raise it (hard limit %s) "
        "or lower the cap", what, fitted, connections, soft, "unlimited" if hard == resource.RLIM_INFINITY else hard,
    )  # fmt: skip
    return min(fitted, connections)


class Connections:
    """The open connections of one listener, at most ``limit``.

    A connection is either *waiting* (for its client: a request head, or any byte for a relay) or
    *busy* (the server works for it). :meth:`admit` makes room for a new connection by closing the
    one waiting longest; when every connection is busy, the new one is refused.

    Parameters:
        limit: the configured cap, fitted to the open-file limit (:func:`fit_to_file_limit`).
        what: the listener, for the warnings.
        files_each: descriptors one connection holds.

    :meth:`retire` it when the listener stops, so that its descriptors count no more.
    """

    def __init__(self, limit: int, what: str, files_each: int = 1) -> None:
        self.limit = fit_to_file_limit(limit, what, files_each)
        self.what = what
        self.files_each = files_each
        _live.add(self)
        self.open: set[Closable] = set()
        self.waiting: OrderedDict[Closable, float] = OrderedDict()  # oldest first
        self._warned = float("-inf")

    def admit(self, connection: Closable) -> bool:
        """Count a new connection (waiting); False when it must be closed: the cap is reached and
        every open connection is busy."""
        while len(self.open) >= self.limit:
            if not self.waiting:
                self._warn_full("every connection is busy: a new one was refused")
                return False
            oldest, since = self.waiting.popitem(last=False)
            self.open.discard(oldest)
            self._warn_full(f"the connection waiting longest ({time.monotonic() - since:.1f} s) was closed to admit a new one")
            oldest.close()
        self.open.add(connection)
        self.waiting[connection] = time.monotonic()
        return True

    def wait(self, connection: Closable) -> None:
        """``connection`` waits for its client from now on (the newest to wait)."""
        if connection in self.open:
            self.waiting.pop(connection, None)
            self.waiting[connection] = time.monotonic()

    def busy(self, connection: Closable) -> None:
        """The server works for ``connection``: it is not closed to make room."""
        self.waiting.pop(connection, None)

    def closed(self, connection: Closable) -> None:
        """``connection`` is gone."""
        self.open.discard(connection)
        self.waiting.pop(connection, None)

    def retire(self) -> None:
        """The listener stopped: its cap no longer counts against the open-file limit."""
        _live.discard(self)

    def _warn_full(self, what_happened: str) -> None:
        if time.monotonic() - self._warned >= FULL_WARNING_SECONDS:
            self._warned = time.monotonic()
            log.warning("%s is at its cap of %d connections: %s (said once a minute)", self.what, self.limit, what_happened)
