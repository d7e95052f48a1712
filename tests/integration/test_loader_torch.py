"""The PyTorch adapter against the real mongod/GridFS: DataLoader workers and ranks split a cohort
without duplicates, and a tiny model trains from it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tensordb.client import TensorDB
from tensordb.config import Settings
from tests.integration.test_loader import images

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader  # noqa: E402


def epoch_labels(dataset, num_workers: int) -> list[int]:
    return [int(label) for _, y in DataLoader(dataset, batch_size=None, num_workers=num_workers) for label in y]


def test_two_workers_and_two_ranks_yield_each_sample_once_per_epoch_in_the_global_order(settings: Settings, ingest) -> None:
    ingest(images(0, 90))
    with TensorDB(settings) as db:
        cohort = db.cohort({"dataset": "images"}).pinned()
        whole = [int(label) for _, y in cohort.stream(8, shuffle=True, seed=4, epoch=1) for label in y]
        shares = []
        for rank in range(2):
            dataset = cohort.to_torch_dataset(8, shuffle=True, seed=4, rank=rank, world_size=2)
            dataset.set_epoch(1)
            shares.append(epoch_labels(dataset, num_workers=2))
            dataset.set_epoch(2)
            next_epoch = cohort.stream(8, shuffle=True, seed=4, epoch=2, rank=rank, world_size=2)
            assert epoch_labels(dataset, num_workers=2) == [int(label) for _, y in next_epoch for label in y] != shares[-1]
    assert sorted(shares[0] + shares[1]) == list(range(90))
    assert [share[i] for i in range(len(shares[0])) for share in shares if i < len(share)] == whole


def test_a_tiny_model_trains_a_few_steps(settings: Settings, ingest) -> None:
    records = images(0, 128)
    for record in records:
        record["labels"]["y"] = int(record["labels"]["y"] % 2)
    ingest(records)
    with TensorDB(settings) as db:
        dataset = db.cohort({"dataset": "images"}).to_torch_dataset(16, shuffle=True)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
        optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for x, y in DataLoader(dataset, batch_size=None, num_workers=2):
            loss = torch.nn.functional.cross_entropy(model(x.float() / 255), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
    assert len(losses) == 8 and np.isfinite(losses).all()


def test_importing_tensordb_does_not_import_torch() -> None:
    code = "import sys, tensordb, tensordb.data.cohorts, tensordb.data.loader; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_without_torch_the_adapter_says_how_to_install_it() -> None:
    code = "import sys; sys.modules['torch'] = None\ntry:\n    import tensordb.data.pytorch\nexcept Exception as e:\n    print(e)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'tensordb[torch]'" in output
