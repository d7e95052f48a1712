"""The inline array codec of sample records: the SDK's base64 of an array's buffer and ingest's strict
decoding, against the standard library calls they replace (same bytes, same refusals)."""

from __future__ import annotations

import base64
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from schemas import load_schema
from tensordb.config import Settings
from tensordb.data.samples import build_sample, dtype_name, inline_bytes, record_dtype
from tensordb.errors import SampleError

DTYPES = load_schema("sample", 1)["$defs"]["dtype"]["enum"]


@pytest.mark.parametrize("name", DTYPES)
def test_every_schema_dtype_names_itself_little_endian(name: str) -> None:
    assert record_dtype(name).name == dtype_name(record_dtype(name)) == np.dtype(name).name == name
    assert record_dtype(name).byteorder in ("<", "|", "=")


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.array([True, False, True]),
        np.arange(20, dtype=np.float16).reshape(4, 5)[:, 1:3],  # not contiguous
        np.arange(6, dtype=">u2"),  # big-endian: stored little-endian
        np.zeros((0, 3), dtype=np.uint8),  # empty
    ],
)
def test_published_data_is_the_base64_of_the_little_endian_bytes(array: np.ndarray) -> None:
    store = SimpleNamespace(settings=Settings())
    record = build_sample(store, array, dataset="d", sample_id="s1")  # type: ignore[arg-type]
    spec = record["arrays"]["x"]
    expected = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    assert spec["data"] == base64.b64encode(expected.tobytes()).decode()
    assert spec["dtype"] == expected.dtype.name and spec["shape"] == list(array.shape)
    data, shape = inline_bytes("x", spec)
    assert np.array_equal(np.frombuffer(data, record_dtype(spec["dtype"])).reshape(shape), array)


def _standard_decode(text: str) -> bytes | None:
    """What ingest decoded with before: the standard library's strict base64; None if refused."""
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        return None


# base64 text, and near misses: missing, extra or misplaced padding, whitespace, URL-safe and non-ASCII characters
BASE64_LIKE = st.one_of(
    st.binary(max_size=40).map(lambda raw: base64.b64encode(raw).decode()),
    st.text(alphabet="ABCDab01+/=", max_size=24),
    st.tuples(st.binary(max_size=12).map(lambda raw: base64.b64encode(raw).decode()), st.text(" \n=-_é\0A", max_size=3)).map(
        lambda parts: parts[0] + parts[1]
    ),
)


@given(BASE64_LIKE)
@example("abcd====")  # padding past a complete quantum: pybase64 refuses it, the standard library accepts it
@example("ab==")
def test_inline_data_refuses_exactly_what_strict_base64_refuses(text: str) -> None:
    expected = _standard_decode(text)
    spec = {"dtype": "uint8", "shape": [len(expected) if expected is not None else 0], "data": text}
    if expected is None:
        with pytest.raises(SampleError, match="'data' is not valid base64"):
            inline_bytes("x", spec)
    else:
        assert inline_bytes("x", spec) == (expected, [len(expected)])


def test_inline_data_of_the_wrong_length_names_shape_and_dtype() -> None:
    spec = {"dtype": "float32", "shape": [2], "data": base64.b64encode(bytes(12)).decode()}
    with pytest.raises(SampleError, match=r"12 bytes do not fit shape \[2\] of float32 \(8 bytes expected\)"):
        inline_bytes("x", spec)
