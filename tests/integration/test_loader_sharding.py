"""The loader's global order against the real mongod/GridFS: one seeded permutation per epoch,
shared by any number of ranks, resumable from a small JSON state, over a project-scoped member
snapshot."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tensordb.client import TensorDB
from tensordb.config import Settings
from tensordb.data.cohorts import Cohort
from tensordb.data.snapshots import load_snapshot, snapshot_id
from tensordb.errors import QueryError, StreamStateError
from tensordb.infra.store import Store
from tests.integration.test_loader import images

COHORT_SIZE = 103  # not a multiple of any world size or batch size below


def labels(cohort: Cohort, batch_size: int = 8, **options) -> list[int]:
    """The labels (= sample numbers) one epoch of a stream yields, in order."""
    return [int(label) for _, y in cohort.stream(batch_size, **options) for label in y]


@pytest.fixture
def cohort(settings: Settings, ingest) -> Iterator[Cohort]:
    ingest(images(0, COHORT_SIZE))
    with TensorDB(settings) as db:
        yield db.cohort({"dataset": "images"}).pinned()


def test_global_order_is_the_same_for_world_sizes_1_2_and_4(cohort: Cohort) -> None:
    whole = labels(cohort, shuffle=True, seed=3, world_size=1)
    assert sorted(whole) == list(range(COHORT_SIZE))
    assert whole != sorted(whole) and whole != sorted(whole, reverse=True)
    for world_size in (2, 4):
        shares = [labels(cohort, shuffle=True, seed=3, rank=rank, world_size=world_size) for rank in range(world_size)]
        assert sum(len(share) for share in shares) == COHORT_SIZE
        assert len({label for share in shares for label in share}) == COHORT_SIZE  # disjoint and complete
        interleaved = [share[i] for i in range(len(shares[0])) for share in shares if i < len(share)]
        assert interleaved == whole


def test_each_epoch_is_another_permutation_and_the_same_seed_and_epoch_the_same(cohort: Cohort) -> None:
    stream = cohort.stream(16, shuffle=True, seed=5, world_size=1)
    epoch0 = [int(label) for _, y in stream for label in y]
    epoch1 = [int(label) for _, y in stream for label in y]  # iterating again reads the next epoch
    assert stream.epoch == 2 and stream.position == 0
    assert sorted(epoch0) == sorted(epoch1) == list(range(COHORT_SIZE))
    assert epoch0 != epoch1
    assert labels(cohort, shuffle=True, seed=5, epoch=1) == epoch1
    assert labels(cohort, shuffle=True, seed=6) != epoch0


def test_a_state_saved_mid_epoch_resumes_with_exactly_the_rest(cohort: Cohort) -> None:
    full = labels(cohort, shuffle=True, seed=1, rank=1, world_size=2, epoch=1)
    stream = cohort.stream(8, shuffle=True, seed=1, rank=1, world_size=2, epoch=1)
    seen = []
    for _, y in stream:
        seen += y.tolist()
        if len(seen) >= 24:
            break
    state = json.loads(json.dumps(stream.state()))  # what a checkpoint stores
    assert state["position"] == 24 and state["epoch"] == 1
    unpinned = Cohort(cohort.store, filter={"dataset": "images"})  # the state carries the pin
    assert seen + labels(unpinned, shuffle=True, seed=1, rank=1, world_size=2, state=state) == full


def test_an_unpinned_cohort_is_pinned_and_later_arrivals_are_not_members(settings: Settings, ingest) -> None:
    ingest(images(0, 40))
    with TensorDB(settings) as db:
        cohort = db.cohort({"dataset": "images"})
        stream = cohort.stream(8, shuffle=True, seed=2, world_size=1)
        state = stream.state()
        ingest(images(40, 10))
        resumed = cohort.stream(8, shuffle=True, seed=2, world_size=1, state=state)
        assert sorted(int(label) for _, y in resumed for label in y) == list(range(40))
        with pytest.raises(QueryError, match="pin the cohort"):
            cohort.stream(8, rank=0, world_size=2)


def test_a_state_that_does_not_fit_is_refused(cohort: Cohort) -> None:
    stream = cohort.stream(8, shuffle=True, rank=0, world_size=2)
    next(iter(stream))
    state = stream.state()
    with pytest.raises(StreamStateError, match="world_size=2 but the stream has world_size=4"):
        cohort.stream(8, shuffle=True, rank=0, world_size=4, state=state)
    other = Cohort(cohort.store, filter={"dataset": "images", "labels.y": {"$lt": 50}}).pinned(cohort.as_of)
    with pytest.raises(StreamStateError, match="another cohort"):
        other.stream(8, shuffle=True, rank=0, world_size=2, state=state)
    with pytest.raises(StreamStateError, match="keys"):
        cohort.stream(8, shuffle=True, rank=0, world_size=2, state={"position": 8})


def test_the_snapshot_belongs_to_its_project(settings: Settings, cohort: Cohort) -> None:
    cohort.stream(8, world_size=1).members()
    sid = snapshot_id(cohort)
    assert load_snapshot(cohort.store, sid) is not None
    with Store(settings.with_changes(project="another")) as other:
        assert load_snapshot(other, sid) is None
        theirs = Cohort(other, filter={"dataset": "images"}).pinned(cohort.as_of)
        assert snapshot_id(theirs) == sid  # the same definition ...
        assert theirs.stream(8, world_size=1).members().ids == []  # ... but their own members
