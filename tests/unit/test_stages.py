"""Transform stages' pure logic: specs and their errors, derived ids, what a function may return."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tensordb.cli import main
from tensordb.errors import StageFunctionError, StageSpecError
from tensordb.stages.derive import derive, derived_id
from tensordb.stages.spec import parse_stage
from tensordb.testing import stages as functions

SPEC = {
    "name": "halve",
    "input": {"filter": {"dataset": "raw"}},
    "function": "tensordb.testing.stages:halve",
    "output": {"dataset": "small"},
}
SOURCE = {"_id": "raw-1", "dataset": "raw", "labels": {"y": 3}, "metadata": {"site": "a"}, "tags": ["t"]}
ARRAYS = {"x": np.arange(64, dtype=np.uint8).reshape(8, 8)}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "has space"}, "name: Value error, use 1-64|name: use 1-64"),
        ({"version": 0}, "version: Input should be greater than or equal to 1"),
        ({"function": "resize"}, "function: a function is named 'package.module:function'"),
        ({"input": {"filter": {"$where": "1"}}}, "server-side JavaScript"),
        ({"input": {"query": {}}}, "input.query: unknown field"),
        ({"output": {"dataset": "no spaces allowed"}}, "output.dataset: a dataset name"),
    ],
)
def test_a_bad_stage_gets_an_error_naming_the_field(change, message) -> None:
    with pytest.raises(StageSpecError, match=message):
        parse_stage({**SPEC, **change})


def test_derived_ids_are_deterministic_readable_and_bounded() -> None:
    assert derived_id("halve", 2, "raw-1", 0) == "halve.v2:raw-1:0"
    long = derived_id("halve", 1, "x" * 128, 3)
    assert long == derived_id("halve", 1, "x" * 128, 3) and len(long) <= 128 and long.startswith("halve.v1:h")
    assert long != derived_id("halve", 1, "x" * 128, 4)


def test_a_derived_sample_has_its_id_lineage_dataset_and_the_function_s_arrays() -> None:
    (sample,) = derive(parse_stage(SPEC), functions.halve, SOURCE, ARRAYS)
    fields = sample.fields
    assert sample.sample_id == "halve.v1:raw-1:0" and fields["dataset"] == "small" and fields["labels"] == {"y": 3}
    assert fields["lineage"] == {"derived_from": "raw-1", "stage": "halve", "stage_version": 1}
    assert sample.arrays["x"].shape == (4, 4) and fields["source"] == "stage:halve"
    assert [s.sample_id for s in derive(parse_stage(SPEC), functions.mirror_pair, SOURCE, ARRAYS)] == [
        "halve.v1:raw-1:0", "halve.v1:raw-1:1",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("function", "message"),
    [
        (lambda sample: 1 / 0, "raised ZeroDivisionError"),
        (lambda sample: "text", "returned str"),
        (lambda sample: [{"x": 1}], "derived sample 0 is dict without 'arrays'"),
        (lambda sample: {"arrays": sample["arrays"], "weights": 1}, r"unknown fields \['weights'\]"),
        (lambda sample: {"arrays": {"x": np.array(["a", "b"])}}, "derived sample 0 cannot be stored"),
        (lambda sample: {"arrays": {"x": np.array([object()])}}, "derived sample 0 cannot be stored: arrays of Python objects"),
        (lambda sample: {"arrays": {"bad name": np.zeros(2)}}, "derived sample 0 cannot be stored"),
        (lambda sample: {"arrays": sample["arrays"], "tags": [""]}, "derived sample 0 cannot be stored"),
        (lambda sample: [{"arrays": sample["arrays"]}] * 1001, "at most 1000"),
    ],
)
def test_a_function_that_raises_or_returns_garbage_is_a_stage_function_error_naming_the_sample(function, message) -> None:
    with pytest.raises(StageFunctionError, match=message) as raised:
        derive(parse_stage(SPEC), function, SOURCE, ARRAYS)
    assert "stage 'halve' v1" in str(raised.value) and "'raw-1'" in str(raised.value)


def test_nothing_derived_is_an_empty_list() -> None:
    assert derive(parse_stage(SPEC), lambda sample: None, SOURCE, ARRAYS) == []
    assert derive(parse_stage(SPEC), lambda sample: [], SOURCE, ARRAYS) == []


def test_the_cli_refuses_a_bad_stage_file_before_connecting(tmp_path, capsys) -> None:
    (tmp_path / "stage.json").write_text(json.dumps({**SPEC, "output": {}}))
    assert main(["stage", "register", str(tmp_path / "stage.json")]) == 1
    assert "output.dataset: Field required" in capsys.readouterr().err
    assert main(["stage", "register", str(tmp_path / "missing.json")]) == 1
    assert "cannot read stage file" in capsys.readouterr().err
