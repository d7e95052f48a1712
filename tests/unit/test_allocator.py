"""Undoing TensorFlow's allocator setting: glibc takes it, and large arrays come from the heap again."""

from __future__ import annotations

import ctypes

import pytest

from tensordb.infra import allocator

pytestmark = pytest.mark.skipif(allocator.mmapped_bytes() is None, reason="needs glibc 2.33+ (mallinfo2)")


def test_after_the_restore_a_large_array_no_longer_gets_its_own_mmap() -> None:
    ctypes.CDLL(None).mallopt(allocator.M_MMAP_THRESHOLD, 128 * 1024)  # what TensorFlow's from_generator sets
    before = allocator.mmapped_bytes()
    mapped = b"\x01" * 2**20
    assert allocator.mmapped_bytes() - before >= len(mapped)

    assert allocator.restore_large_allocations()
    before = allocator.mmapped_bytes()
    from_heap = b"\x01" * 2**20
    assert allocator.mmapped_bytes() == before
    assert len(mapped) == len(from_heap)
