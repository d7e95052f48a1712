"""The dashboard's server side without servers: the min/max envelope, alignment, the live stream's
parsing, and the refusal to bind beyond this machine without a token. The HTTP API against the real
services is tests/integration/test_dashboard.py; the browser, tests/e2e/test_dashboard_browser.py."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import orjson
import pytest

from dashboard.curves import OVERVIEW_POINTS, Columns, Envelope, align
from dashboard.live import parse
from tensordb.testing import free_port
from tests import REPO


def _brute_force(steps: np.ndarray, values: np.ndarray, width: int) -> dict[int, tuple[float, float]]:
    buckets: dict[int, list[float]] = {}
    for step, value in zip(steps.tolist(), values.tolist(), strict=True):
        buckets.setdefault(step // width, []).append(value)
    return {bucket: (min(vs), max(vs)) for bucket, vs in buckets.items()}


def test_the_envelope_keeps_every_bucket_s_minimum_and_maximum_in_any_order() -> None:
    rng = np.random.default_rng(7)
    steps = np.arange(100_000)
    values = np.cumsum(rng.normal(size=steps.size))
    values[31_337] = 1e6  # a spike must survive downsampling
    one_shot = Envelope()
    one_shot.extend(Columns(steps, 1.7e9 + steps * 0.01, {"loss": values}))
    # the same points in shuffled chunks, some twice (the live stream and MongoDB overlap)
    incremental = Envelope()
    order = rng.permutation(steps.size)
    for chunk in np.array_split(np.concatenate([order, order[:5000]]), 37):
        incremental.extend(Columns(steps[chunk], 1.7e9 + steps[chunk] * 0.01, {"loss": values[chunk]}))
    expected = _brute_force(steps, values, one_shot.width)
    for envelope in (one_shot, incremental):
        got_steps, got_walls, got_values = envelope.points("loss")
        assert len(got_values) <= OVERVIEW_POINTS and envelope.width == one_shot.width
        assert 1e6 in got_values and values.min() in got_values
        assert np.array_equal(got_values, values[got_steps.astype(np.int64)])  # each point is a real one, at its own step
        assert np.allclose(got_walls, 1.7e9 + got_steps * 0.01)
        per_bucket = _brute_force(got_steps.astype(np.int64), got_values, envelope.width)
        assert per_bucket == expected


def test_align_keeps_exact_points_when_few_and_a_min_max_grid_when_many() -> None:
    few = align({"a": (np.array([0, 1, 2]), np.array([1.0, 2.0, 3.0])), "b": (np.array([1, 3]), np.array([5.0, np.nan]))})
    assert few["x"] == [0, 1, 2, 3]
    assert few["y"] == {"a": [1.0, 2.0, 3.0, None], "b": [None, 5.0, None, None]}
    x = np.arange(50_000, dtype=np.float64)
    many = align({"a": (x, np.sin(x / 1000)), "b": (x[::7] + 0.5, np.cos(x[::7] / 1000))}, max_points=1000)
    assert len(many["x"]) == 1000 and all(len(ys) == 1000 for ys in many["y"].values())
    assert max(v for v in many["y"]["a"] if v is not None) == pytest.approx(np.sin(x / 1000).max())
    assert min(v for v in many["y"]["b"] if v is not None) == pytest.approx(np.cos(x[::7] / 1000).min())


def test_the_live_stream_skips_malformed_records() -> None:
    good = {
        "schema": "log/1",
        "run_id": "r",
        "phase": "train",
        "step": 3,
        "wall_time": 1.5,
        "metrics": {"loss": 0.1, "acc": None},
    }
    assert parse(orjson.dumps(good)) == ("r", ("train", 3, 1.5, {"loss": 0.1, "acc": None}))
    for bad in ({**good, "step": -1}, {**good, "step": 1.5}, {**good, "phase": "dev"}, {**good, "metrics": {"loss": "x"}},
                {**good, "metrics": {"<b>": 1}}, {**good, "wall_time": "now"}, {"run_id": "r"}):  # fmt: skip
        assert parse(orjson.dumps(bad)) is None
    assert parse(b"not json") is None and parse(None) is None


def test_binding_beyond_this_machine_without_a_token_is_refused_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tensordb.cli", "dashboard", "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True, text=True, timeout=60, cwd=REPO, env={"PATH": "/usr/bin:/bin", "TENSORDB_PROJECT": "nothing"},
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "0.0.0.0" in result.stderr, result.stderr
    # issue 24, finding 11: the way out it names keeps the token off the command line
    assert (
        "set TENSORDB_DASHBOARD_TOKEN" in result.stderr
        and "--token-file PATH" in result.stderr
        and "--token " not in result.stderr
    )


def test_a_token_on_the_command_line_is_refused_with_where_it_goes_instead() -> None:
    """Issue 24, finding 11: every user of the machine reads a process's command line (``ps``)."""
    result = subprocess.run(
        [sys.executable, "-m", "tensordb.cli", "dashboard", "--host", "0.0.0.0", "--token", "s3cret-in-argv"],
        capture_output=True, text=True, timeout=60, cwd=REPO, env={"PATH": "/usr/bin:/bin", "TENSORDB_PROJECT": "nothing"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--token is no longer accepted" in result.stderr and "TENSORDB_DASHBOARD_TOKEN" in result.stderr, result.stderr
    assert "--token-file PATH" in result.stderr
