"""PyTorch: a cohort stream as an ``IterableDataset`` of ``(x, y)`` tensor batches.

Optional: ``pip install 'tensordb[torch]'``; importing :mod:`tensordb` never imports torch. The
dataset yields whole batches (give the ``DataLoader`` ``batch_size=None``). It reads a member
snapshot, taken once when the dataset is made, so the ``DataLoader``'s workers split this rank's
share of the global order by batch, in turns, without duplicates: with the loader's in-order
delivery, the batches arrive in the order one process would read them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from tensordb.data.loader import CohortStream
from tensordb.data.sources import SampleSource
from tensordb.errors import ConfigurationError
from tensordb.infra.store import Store

try:
    import torch
    from torch.utils.data import IterableDataset, get_worker_info
except ImportError as exc:  # the optional extra is not installed
    raise ConfigurationError("the PyTorch adapter needs torch: pip install 'tensordb[torch]' (it pins torch 2.13.0)") from exc

TensorBatch = tuple[torch.Tensor, torch.Tensor | None]


class CohortDataset(IterableDataset[TensorBatch]):
    """A cohort's batches for ``torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=N)``.

    Call :meth:`set_epoch` before each epoch (as with ``DistributedSampler``): workers are copies
    of the dataset, so it cannot count epochs itself. Each worker opens its own MongoDB client.
    """

    def __init__(
        self,
        cohort: SampleSource,
        batch_size: int = 32,
        *,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        state: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        """
        Parameters
        ----------
        cohort : SampleSource
            The cohort to read; pinned now when it is not (``world_size > 1`` needs it pinned, or ``state``).
        batch_size : int
            Samples per batch.
        shuffle, seed : bool, int
            A global shuffle per epoch, seeded by ``(seed, epoch)``.
        rank, world_size : int
            This process's share of the global order (e.g. ``torch.distributed``'s rank and world size).
        state : dict
            A :meth:`tensordb.data.loader.CohortStream.state` to resume from.
        **options
            Other :class:`tensordb.data.loader.CohortStream` options (``prefetch``, ``fetch_threads``, ``drop_remainder``).
        """
        super().__init__()
        arguments = {"shuffle": shuffle, "seed": seed, "rank": rank, "world_size": world_size, **options}
        stream = CohortStream(cohort, batch_size, state=state, **arguments)
        stream.members()  # taken here, once, rather than raced for by every worker
        self.cohort, self.batch_size, self._arguments, self._state = stream.cohort, batch_size, arguments, stream.state()

    def set_epoch(self, epoch: int) -> None:
        """Read epoch ``epoch`` next (from its start, unless the dataset was resumed inside it)."""
        if epoch != self._state["epoch"]:
            self._state = {**self._state, "epoch": epoch, "position": 0}

    def __iter__(self) -> Iterator[TensorBatch]:
        worker = get_worker_info()
        if worker is None:
            yield from self._batches(self.cohort, 0, 1)
            return
        with Store(self.cohort.store.settings) as store:  # a forked worker must not use its parent's client
            yield from self._batches(self.cohort.with_store(store), worker.id, worker.num_workers)

    def _batches(self, cohort: SampleSource, worker: int, workers: int) -> Iterator[TensorBatch]:
        stream = CohortStream(cohort, self.batch_size, state=self._state, **self._arguments)
        for x, y in stream.batches(worker, workers):
            yield torch.from_numpy(x), None if y is None else torch.from_numpy(y)
