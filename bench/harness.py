"""What every benchmark in bench/ shares: servers, throwaway projects, CPU accounting and timing.

The benchmarks are scripts (``python bench/X.py``), so this is imported as a sibling module
(``import harness``): Python puts the script's folder, bench/, first on ``sys.path``. Importing it
moves bench/ behind the standard library and puts the repository root first, so a benchmark file
named like a standard module can never shadow it, and ``streams``, ``tensordb``, ``workers`` and
``dashboard`` import from this checkout. What it shares with the tests comes from the shipped test
kit, :mod:`tensordb.testing` (never from tests/).

- :func:`servers`: the servers named by ``TENSORDB_KAFKA_BOOTSTRAP`` and ``TENSORDB_MONGO_URI``,
  else our own Tansu and mongod on free ports (``tensordb.testing.servers``), removed after.
- :func:`project`: a fresh project (own topics) and database per measurement, dropped after
  (``tensordb.testing.fresh_project``).
- :func:`free_port`, :func:`wait_for`: the test kit's (``tensordb.testing``).
- :func:`children_cwd`: run child processes (processors, workers) in a scratch folder, with the
  repository root on PYTHONPATH.
- :func:`cpu_snapshot`, :class:`CpuMeter`, :class:`Timing`, :func:`interleaved`: wall times, and
  the CPU each process used meanwhile, which is what shows the limit on a 2-core machine.
- :class:`GoalRow`, :func:`print_goal_rows`, :func:`pct`, :func:`ms`, :func:`us`,
  :func:`cpu_shares`: a table of measurements against their goals, with what limits each.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:] = [str(REPO)] + [entry for entry in sys.path if Path(entry or ".").resolve() not in (BENCH, REPO)] + [str(BENCH)]

import math  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Mapping  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, TypeVar  # noqa: E402

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from tensordb.config import Settings  # noqa: E402
from tensordb.testing import Servers, free_port, fresh_project, wait_for  # noqa: E402 - the test kit, shared with tests/
from tensordb.testing import servers as kit_servers  # noqa: E402

__all__ = [
    "BENCH", "REPO", "MACHINE", "Pids", "Servers", "CpuMeter", "Timing",
    "make_console", "free_port", "wait_for", "servers", "project", "children_cwd",
    "process_cpu_seconds", "machine_busy_seconds", "cpu_snapshot", "cpu_used", "describe_cores", "interleaved",
    "GoalRow", "print_goal_rows", "pct", "ms", "us", "cpu_shares",
]  # fmt: skip

#: CPU seconds per process, by name; None where a process is elsewhere or unknown.
Pids = dict[str, int | None]
T = TypeVar("T")

MACHINE = "machine"  # busy CPU seconds of the whole machine, to show what other processes took
BENCH_PROCESS = "bench"  # this Python process, all its threads


def make_console(width: int = 180) -> Console:
    """A console that does not wrap at 80 columns when the output goes to a log file."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else width)


# -- servers and projects ---------------------------------------------------------------------------


@contextmanager
def servers(name: str = "services") -> Iterator[Servers]:
    """Existing servers named by TENSORDB_KAFKA_BOOTSTRAP and TENSORDB_MONGO_URI, else our own
    Tansu and mongod on free ports with a throwaway run directory (``tensordb-bench-NAME-*``),
    stopped and removed at the end."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"tensordb-bench-{name}-"))
    try:
        with kit_servers(run_dir, services_dir=REPO / ".tensordb", project=f"bench-{name}") as found:
            yield found
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


@contextmanager
def project(base: Settings, tag: str) -> Iterator[Settings]:
    """A fresh project (own topics) and database, removed afterwards, so runs never mix data."""
    with fresh_project(base, prefix=f"bench-{tag}-") as settings:
        yield settings


@contextmanager
def children_cwd(folder: Path) -> Iterator[Path]:
    """Work in ``folder`` while child processes start, with the repository root on PYTHONPATH.

    Why: ``tensordb.testing.children`` starts children in our working directory, where anything they write
    would land in the repository; and a child run with ``-m`` imports ``tensordb``, ``streams`` and
    ``workers`` from its working directory (else from the installed package), which PYTHONPATH replaces.
    """
    before, path_before = os.getcwd(), os.environ.get("PYTHONPATH")
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *([path_before] if path_before else [])])
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(before)
        if path_before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = path_before


# -- CPU accounting ---------------------------------------------------------------------------------


def process_cpu_seconds(pid: int | None) -> float | None:
    """user+system CPU seconds of a process (all its threads), from /proc; None if unreadable."""
    if not pid:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float | None:
    """Busy CPU seconds of all cores since boot (``/proc/stat``: everything but idle and iowait)."""
    try:
        ticks = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(pids: Mapping[str, int | None]) -> dict[str, float | None]:
    """CPU seconds (user + system, all threads) of this process, of the named processes and of
    the whole machine.

    Why: on a 2-core machine a throughput figure means little without knowing which process was
    saturated, or whether something else was running. Processes are read from /proc; where
    unreadable (remote servers) they are left out.
    """
    snapshot: dict[str, float | None] = {BENCH_PROCESS: time.process_time(), MACHINE: machine_busy_seconds()}
    for name, pid in pids.items():
        snapshot[name] = process_cpu_seconds(pid)
    return snapshot


def cpu_used(before: Mapping[str, float | None], after: Mapping[str, float | None]) -> dict[str, float]:
    """CPU seconds used between two snapshots, for the processes readable at both."""
    return {name: used - before[name] for name, used in after.items() if used is not None and before.get(name) is not None}


def describe_cores(cores: dict[str, float]) -> str:
    """e.g. 'bench 1.00 + mongod 0.45 cores: bench CPU-bound'; names other processes' share when
    it is large enough to have disturbed the figure."""
    cores = dict(cores)
    machine = cores.pop(MACHINE, None)
    if not cores:
        return "CPU not measured"
    shares = " + ".join(f"{name} {used:.2f}" for name, used in cores.items() if used >= 0.005)
    busiest, top = max(cores.items(), key=lambda item: item[1])
    if (machine or sum(cores.values())) >= 0.85 * (os.cpu_count() or 1):
        verdict = f"all {os.cpu_count()} cores busy"
    elif top >= 0.85:
        verdict = f"{busiest} CPU-bound"
    else:
        verdict = "waiting (no process at a full core)"
    others = (machine or 0.0) - sum(cores.values())
    disturbed = f"; (others {others:.2f} cores: figure disturbed)" if others >= 0.25 else ""
    return f"{shares} cores: {verdict}{disturbed}"


@dataclass
class CpuMeter:
    """Cores used by this process and by each named process over a ``with`` block."""

    pids: Pids
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0

    def __enter__(self) -> CpuMeter:
        self._start = cpu_snapshot(self.pids)
        self._began = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.wall = time.perf_counter() - self._began
        self.cpu_seconds = cpu_used(self._start, cpu_snapshot(self.pids))

    @property
    def cores(self) -> dict[str, float]:
        """Cores per process (the machine left out)."""
        return {name: used / self.wall for name, used in self.cpu_seconds.items() if name != MACHINE}

    def describe(self) -> str:
        """e.g. 'cores: bench 0.98 + log-sink 0.61 = 1.59 of 2'."""
        cores = self.cores
        if not cores:
            return "CPU not measured"
        shares = " + ".join(f"{name} {used:.2f}" for name, used in cores.items() if used >= 0.005)
        return f"cores: {shares} = {sum(cores.values()):.2f} of {os.cpu_count()}"


# -- timing ---------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Wall times of the runs of one measured thing, and the CPU used during them, per process.

    ``run(work)`` times one call; when ``work`` returns an int (how many items it produced),
    :attr:`rate` and :attr:`best` are items per second.
    """

    pids: Pids = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    produced: int = 0

    def run(self, work: Callable[[], T]) -> T:
        """Time one call of ``work``; returns what it returned."""
        before = cpu_snapshot(self.pids)
        start = time.perf_counter()
        result = work()
        self.seconds.append(time.perf_counter() - start)
        for name, used in cpu_used(before, cpu_snapshot(self.pids)).items():
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + used
        if isinstance(result, int) and not isinstance(result, bool):
            self.produced = result
        return result

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rate(self) -> float:
        """Items/s of the median run."""
        return self.produced / self.median

    @property
    def best(self) -> float:
        return self.produced / min(self.seconds)

    def spread(self, scale: float = 1.0, unit: str = "s", digits: int = 2) -> str:
        """'0.55 s (0.51–0.70)': the median and the range over the runs."""
        low, mid, high = (value * scale for value in (min(self.seconds), self.median, max(self.seconds)))
        return f"{mid:.{digits}f} {unit} ({low:.{digits}f}–{high:.{digits}f})"

    @property
    def cores(self) -> dict[str, float]:
        """Cores used on average over all runs, per process (the machine included)."""
        wall = sum(self.seconds)
        return {name: used / wall for name, used in self.cpu_seconds.items()}

    def cpu(self) -> str:
        """e.g. 'bench 0.97 + mongod 0.41 cores' (the machine left out)."""
        return " + ".join(f"{name} {used:.2f}" for name, used in self.cores.items() if name != MACHINE) + " cores"

    def describe(self) -> str:
        """The cores per process with a verdict (see :func:`describe_cores`)."""
        return describe_cores(self.cores)


def interleaved(
    runs: Mapping[str, Callable[[], Any]],
    repeat: int,
    pids: Pids | None = None,
    setups: Mapping[str, Callable[[], Any]] | None = None,
    timings: Mapping[str, Timing] | None = None,
) -> dict[str, Timing]:
    """Time ``repeat`` runs of each of ``runs``, taken in turn (a, b, a, b, ...), so that drift in
    machine load and slow phases of a server (WiredTiger checkpoints, eviction, a database that
    grows) fall on each of them alike. ``setups[name]`` runs untimed before each run of ``name``;
    ``timings[name]`` accumulates into an existing :class:`Timing` (with its own processes),
    otherwise each gets a new one watching ``pids``."""
    result = {name: (timings or {}).get(name) or Timing(dict(pids or {})) for name in runs}
    for _ in range(repeat):
        for name, work in runs.items():
            if setups and name in setups:
                setups[name]()
            result[name].run(work)
    return result


# -- tables of goals --------------------------------------------------------------------------------


@dataclass
class GoalRow:
    """One measurement of a table against its goal, and what limits the figure."""

    measurement: str
    value: str
    baseline: str = ""
    ratio: str = ""
    goal: str = ""
    met: bool | None = None
    limits: str = ""


def print_goal_rows(console: Console, rows: list[GoalRow], title: str, baseline: str = "baseline") -> None:
    """The rows as a table, then one ``RESULT`` line each (easy to grep from a log)."""
    table = Table(title=f"{title} ({os.cpu_count()} cores)", show_lines=True)
    for name in ("measurement", "value", baseline, "ratio", "goal", "met?", "what limits it"):
        table.add_column(name, overflow="fold")
    for row in rows:
        met = "" if row.met is None else ("yes" if row.met else "NO")
        table.add_row(row.measurement, row.value, row.baseline, row.ratio, row.goal, met, row.limits)
    console.print(table)
    for row in rows:
        met = "" if row.met is None else ("met" if row.met else "MISSED")
        print(f"RESULT {row.measurement} | {row.value} | {row.baseline} | {row.ratio} | {row.goal} {met}")


def pct(values: list[float], q: float) -> float:
    """The ``q``-th percentile, NaN for no values."""
    return float(np.percentile(values, q)) if values else math.nan


def ms(seconds: float, digits: int = 0) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1e3:,.{digits}f} ms"


def us(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1e6:,.0f} µs"


def cpu_shares(meter: CpuMeter) -> str:
    """The cores each of our processes used, and what the rest of the machine took meanwhile."""
    ours = sum(used for name, used in meter.cpu_seconds.items() if name != MACHINE)
    others = (meter.cpu_seconds.get(MACHINE, math.nan) - ours) / meter.wall
    return f"{meter.describe()}; other processes {others:.2f}"
