"""Batch arrays start where TensorFlow can take them without a copy."""

from __future__ import annotations

import numpy as np
import pytest

from tensordb.data.loader import BATCH_ALIGNMENT, aligned_empty


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((64, 28, 28), "uint8"), ((3, 5), "<f4"), ((1,), "float64"), ((1, 7), "int16"), ((2, 256, 256, 3), "uint8")],
)
def test_aligned_empty_is_a_writable_c_array_starting_at_the_alignment(shape: tuple[int, ...], dtype: str) -> None:
    arrays = [aligned_empty(shape, np.dtype(dtype)) for _ in range(8)]  # malloc's 16-byte alignment would miss some
    for array in arrays:
        assert array.shape == shape and array.dtype == np.dtype(dtype)
        assert array.flags.c_contiguous and array.flags.writeable
        assert array.ctypes.data % BATCH_ALIGNMENT == 0
        array[...] = 1
        assert array.sum() == array.size
