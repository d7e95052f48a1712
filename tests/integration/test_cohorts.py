"""Cohorts against the real mongod: saved queries that move with the data, validated filters,
deterministic splits. Filter validation alone is tests/unit/test_cohorts.py."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tensordb.client import TensorDB
from tensordb.config import Settings
from tensordb.errors import QueryError


def sample(i: int, dataset: str = "scans", **extra: object) -> dict:
    data = base64.b64encode(np.full(4, i % 256, np.uint8).tobytes()).decode()
    return {
        "schema": "sample/1",
        "sample_id": f"s{i:05d}",
        "dataset": dataset,
        "arrays": {"x": {"dtype": "uint8", "shape": [4], "data": data}},
        "labels": {"y": i % 2},
        **extra,
    }


def test_last_n_cohort_moves_as_new_samples_arrive(settings: Settings, ingest) -> None:
    ingest([sample(i) for i in range(5)])
    with TensorDB(settings) as db:
        last3 = db.save_cohort("last-3", db.cohort({"dataset": "scans"}, limit=3))
        assert db.find_cohort("last-3").ids() == ["s00004", "s00003", "s00002"]
        ingest([sample(i) for i in range(5, 7)])
        assert db.find_cohort("last-3").ids() == ["s00006", "s00005", "s00004"]
        assert last3.count() == 3 and db.cohort({"dataset": "scans"}).count() == 7
        assert [c["name"] for c in db.list_cohorts()] == ["last-3"]
        assert db.delete_cohort("last-3") and not db.delete_cohort("last-3")


def test_cohort_filters_on_labels_tags_and_metadata(settings: Settings, ingest) -> None:
    ingest([sample(i, tags=["tumour"] if i % 3 == 0 else [], metadata={"grade": i % 4}) for i in range(12)])
    with TensorDB(settings) as db:
        tumours = db.cohort({"tags": "tumour", "metadata.grade": {"$gte": 1}, "labels.y": 1}, sort=[("_id", 1)])
        assert tumours.ids() == ["s00003", "s00009"]


def test_where_is_refused_when_building_a_cohort(settings: Settings) -> None:
    with TensorDB(settings) as db, pytest.raises(QueryError, match=r"\$where"):
        db.cohort({"$where": "sleep(1000)"})


def test_splits_are_deterministic_disjoint_and_cover_the_cohort(settings: Settings, ingest) -> None:
    ingest([sample(i) for i in range(300)])
    with TensorDB(settings) as db:
        everything = db.cohort({"dataset": "scans"})
        train, validation = everything.train_validation(0.2)
        train_ids, validation_ids = set(train.ids()), set(validation.ids())
        assert not train_ids & validation_ids and len(train_ids | validation_ids) == 300
        assert 30 < len(validation_ids) < 90  # ~20 % by hash
        assert set(everything.train_validation(0.2)[1].ids()) == validation_ids  # deterministic

        folds = everything.folds(5)
        validation_folds = [set(v.ids()) for _, v in folds]
        assert sum(len(f) for f in validation_folds) == 300 and set().union(*validation_folds) == set(everything.ids())
        for (fold_train, _), fold_validation in zip(folds, validation_folds, strict=True):
            assert set(fold_train.ids()) == set(everything.ids()) - fold_validation

        # a limited cohort is split after the limit: its folds partition exactly its members
        last100 = db.cohort({"dataset": "scans"}, limit=100)
        parts = [set(v.ids()) for _, v in last100.folds(5)]
        assert set().union(*parts) == set(last100.ids()) and sum(map(len, parts)) == 100
        assert sum(v.count() for _, v in last100.folds(5)) == 100
