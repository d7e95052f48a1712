"""What a person's actions rely on, without servers: where a roll-back returns to, the input checks
shared by the model server and "try a model", and the small cache of loaded versions."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from tensordb.errors import InputShapeError, ModelNotFoundError
from tensordb.loop.promotion import rollback_target
from tensordb.models.serving import LoadedVersions, array_batch, instances_batch, predictions


def promoted(version: int) -> dict[str, Any]:
    return {"version": version, "reason": {"decision": "eval-x", "reason": "better"}}


def rolled_back(version: int) -> dict[str, Any]:
    return {"version": version, "reason": {"action": "roll back", "by": "person"}}


@pytest.mark.parametrize(
    ("history", "target"),
    [
        ([], None),
        ([promoted(1)], None),
        ([promoted(1), promoted(2)], 1),
        ([promoted(1), promoted(2), promoted(3), rolled_back(2)], 1),  # a second roll-back goes further back
        ([promoted(1), promoted(2), rolled_back(1)], None),
        ([promoted(1), promoted(2), rolled_back(1), promoted(4)], 1),
        ([promoted(1), promoted(2), promoted(3), rolled_back(2), promoted(2)], 1),  # promoting the same again: no new step
        ([rolled_back(5), promoted(6)], 5),  # history cut at its limit: a roll-back first still names a version
    ],
)
def test_a_roll_back_returns_to_the_version_under_the_current_one(history: list[dict[str, Any]], target: int | None) -> None:
    assert rollback_target(history) == target


class Stub:
    """Enough of a Keras model: 2×2 inputs, two class scores out."""

    input_shape = (None, 2, 2)

    def __init__(self, version: int = 1) -> None:
        self.version = version

    def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
        total = batch.reshape(len(batch), -1).sum(axis=1)
        return np.stack([total, -total], axis=1)


def test_instances_and_arrays_are_checked_against_the_input_shape() -> None:
    model = Stub()
    assert instances_batch([[[1, 2], [3, 4]]], model).shape == (1, 2, 2)
    for instances, problem in (
        ([[1, 2]], "instances[0][0] is int, not a list"),
        ([[[1, 2], [3]]], "instances[0][1] has 1 items, not 2"),
        ([[[1, 2], [3, "4"]]], "instances[0][1][1] is str, not a number"),
    ):
        with pytest.raises(InputShapeError, match=r"shape \[2, 2\]") as refused:
            instances_batch(instances, model)
        assert problem in str(refused.value)
    with pytest.raises(InputShapeError, match="float32"):
        instances_batch([[[10**400, 0], [0, 0]]], model)
    assert array_batch(np.ones((3, 2, 2), dtype=np.uint8), model).dtype == np.float32
    with pytest.raises(InputShapeError, match=r"the samples' arrays have shape \[4\]"):
        array_batch(np.ones((3, 4)), model)
    answer = predictions(model, np.ones((2, 2, 2), dtype=np.float32))
    assert answer == {"predictions": [[4.0, -4.0], [4.0, -4.0]], "classes": [0, 0]}


class Registry:
    """Loads take a while and are counted; version 99 does not exist."""

    project = "p"

    def __init__(self) -> None:
        self.loads: list[tuple[str, int]] = []

    def find(self, name: str, version: int) -> Stub | None:
        self.loads.append((name, version))
        time.sleep(0.05)
        return None if version == 99 else Stub(version)


def test_loaded_versions_load_each_version_once_and_keep_the_most_recent() -> None:
    registry = Registry()
    loaded = LoadedVersions(registry, capacity=2)  # type: ignore[arg-type] - a stand-in registry
    threads = [threading.Thread(target=loaded.get, args=("m", 1)) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert registry.loads == [("m", 1)]
    loaded.get("m", 2)
    loaded.get("m", 1)  # the most recent again
    loaded.get("m", 3)  # drops 2, the least recently used
    loaded.get("m", 1)
    assert registry.loads == [("m", 1), ("m", 2), ("m", 3)]
    loaded.get("m", 2)
    assert registry.loads[-1] == ("m", 2)
    with pytest.raises(ModelNotFoundError, match="no version 99"):
        loaded.get("m", 99)
