"""Cohort filters checked before any query runs: no server-side JavaScript, no unknown operators
or bad field names. Cohorts against the real mongod are tests/integration/test_cohorts.py."""

from __future__ import annotations

import pytest

from tensordb.data.cohorts import validate_filter
from tensordb.errors import QueryError


@pytest.mark.parametrize("operator", ["$where", "$function", "$accumulator"])
def test_server_side_javascript_is_refused(operator: str) -> None:
    with pytest.raises(QueryError, match="server-side JavaScript"):
        validate_filter({"$or": [{"dataset": "a"}, {operator: "function() { return true }"}]})


@pytest.mark.parametrize("bad", [{"$expr": {"$eq": [1, 1]}}, {"a": {"$lookup": 1}}, {"a b": 1}, [1]])
def test_unknown_operators_and_bad_fields_are_refused(bad: object) -> None:
    with pytest.raises(QueryError):
        validate_filter(bad)
