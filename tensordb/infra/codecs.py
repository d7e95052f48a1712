"""Arrays to bytes and back without pickle: NumPy's ``.npy`` format with ``allow_pickle=False``."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import xxhash

from tensordb.errors import ArrayCodecError


def array_to_npy(array: np.ndarray) -> bytes:
    """Serialise an array as ``.npy`` bytes; object arrays are refused because they need pickle."""
    array = np.asarray(array)
    if array.dtype.hasobject:
        raise ArrayCodecError(
            "arrays of Python objects need pickle, which TensorDB never uses: "
            "convert to a numeric, boolean or fixed-width string dtype first"
        )
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_to_array(data: bytes | memoryview) -> np.ndarray:
    """Read ``.npy`` bytes written by :func:`array_to_npy` (never unpickles)."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise ArrayCodecError(f"stored bytes are not a pickle-free .npy array: {exc}") from exc


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def xxh3_hex(data: bytes | memoryview) -> str:
    """A fast (~40 GB/s) 128-bit checksum, stored beside the sha256 so that every read can be
    checked at no visible cost; the sha256 stays the identity that references are checked against."""
    return xxhash.xxh3_128_hexdigest(data)
