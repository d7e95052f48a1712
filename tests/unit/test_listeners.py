"""tensordb.infra.listeners without servers: which connection makes room at the cap, and the cap
fitted to the open-file limit (in child processes, whose limits this process must not lower)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

from tensordb.infra.listeners import Connections


class Connection:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_at_the_cap_the_connection_waiting_longest_makes_room_and_busy_ones_are_kept() -> None:
    cap = Connections(3, "a test listener")
    first, second, third, fourth, fifth = (Connection(name) for name in ("1", "2", "3", "4", "5"))
    for connection in (first, second, third):
        assert cap.admit(connection)
    cap.busy(first)  # its request is being answered
    cap.wait(second)  # answered, waits for the next request: now the newest to wait
    assert cap.admit(fourth)
    assert third.closed and not first.closed and not second.closed
    cap.busy(second)
    cap.busy(fourth)
    assert not cap.admit(fifth), "every connection is busy: the new one is refused"
    cap.closed(first)
    assert cap.admit(fifth) and cap.open == {second, fourth, fifth}
    cap.retire()


FIT = """
import json, logging, resource
from tensordb.infra.listeners import Connections
logging.basicConfig(level=logging.WARNING)
first, second = Connections(1000, "the first"), Connections(1000, "the second", files_each=2)
print(json.dumps({"limits": [first.limit, second.limit], "soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}))
"""


def fitted(soft: int, hard: int) -> tuple[dict, str]:
    """Two listeners' caps (1,000 connections each, the second a relay) in a process started with
    these open-file limits: what it printed, and its log."""

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    done = subprocess.run([sys.executable, "-c", FIT], capture_output=True, text=True, preexec_fn=limits, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


def test_the_soft_open_file_limit_is_raised_for_the_caps() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 4096:
        return  # this machine's hard limit leaves nothing to raise; the next test covers the lowering
    printed, log = fitted(1024, hard)
    assert printed["limits"] == [1000, 1000] and printed["soft"] >= 3000 + 256, printed
    assert "WARNING" not in log


def test_a_hard_limit_too_low_lowers_the_caps_and_says_how_to_raise_it() -> None:
    printed, log = fitted(1024, 1024)
    first, second = printed["limits"]
    assert printed["soft"] == 1024
    assert 16 <= first < 1000 and 16 <= second < 1000 and first + 2 * second < 1024 - 256, printed
    assert "open-file limit (ulimit -n) is 1024" in log and "the second holds at most" in log
