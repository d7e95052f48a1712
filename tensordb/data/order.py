"""One global order per epoch, shared by every rank, and the resume contract of a stream over it.

Epoch ``e``'s order is a permutation of the member snapshot's positions seeded by ``(seed, e)``
(or the cohort order, unshuffled). Rank ``r`` of ``W`` takes positions ``r, r + W, r + 2W, ...`` of
it: the ranks' shares are disjoint, their union is the cohort, and interleaving them gives back
the order of one rank alone, for any ``W``. Nothing but ``(snapshot, seed, epoch)`` is needed to
rebuild an order, so ranks agree without talking and a resume jumps straight to its position.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from tensordb.errors import StreamStateError

STATE_VERSION = 1


def epoch_order(members: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """The positions (in cohort order) of epoch ``epoch``'s global order: a permutation seeded by
    ``(seed, epoch)``, so every epoch differs and the same seed and epoch give the same order."""
    if not shuffle:
        return np.arange(members)
    return np.random.default_rng([seed, epoch]).permutation(members)


def rank_share(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s positions: every ``world_size``-th of the global order, from ``rank``."""
    return order[rank::world_size]


@dataclass(frozen=True)
class StreamState:
    """Where a stream over a member snapshot is: a small JSON object a job saves with its
    checkpoint and passes back as ``cohort.stream(..., state=...)``.

    ``{"version": 1, "snapshot": "<id>", "as_of": "<ISO time of the pin>", "members": N,
    "shuffle": true, "seed": 0, "epoch": 2, "position": 4096, "rank": 0, "world_size": 4,
    "batch_size": 64}``; ``position`` counts the samples of this rank's share already yielded in
    ``epoch``.
    """

    snapshot: str
    as_of: str
    members: int
    shuffle: bool
    seed: int
    epoch: int
    position: int
    rank: int
    world_size: int
    batch_size: int
    version: int = STATE_VERSION

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> StreamState:
        """The state saved by :meth:`as_dict`; raises :class:`StreamStateError` for anything else."""
        if not isinstance(state, Mapping):
            raise StreamStateError(f"a stream state is the dict stream.state() returned, got {type(state).__name__}")
        expected = {field.name: field.type for field in fields(cls)}
        if set(state) != set(expected):
            raise StreamStateError(
                f"a stream state has the keys {sorted(expected)}, got {sorted(state)}: pass the dict stream.state() returned"
            )
        for name, kind in expected.items():
            if type(state[name]).__name__ != kind:
                raise StreamStateError(f"stream state field {name!r} must be {kind}, got {state[name]!r}")
        if state["version"] != STATE_VERSION:
            raise StreamStateError(
                f"stream state version {state['version']} is not {STATE_VERSION}: it was saved by another release"
            )
        return cls(**state)

    def check_fits(self, **wanted: Any) -> None:
        """Refuse to resume into a stream that differs from the one saved (another cohort, another
        world size...): its position would name other samples."""
        for name, value in wanted.items():
            saved = getattr(self, name)
            if saved != value:
                raise StreamStateError(
                    f"this stream state was saved with {name}={saved!r} but the stream has {name}={value!r}: resume "
                    "with the cohort and the arguments (batch_size, shuffle, seed, rank, world_size) it was saved with"
                )
