"""Undoing TensorFlow's allocator setting: glibc takes it, and large arrays come from the heap again.

Checked in a fresh interpreter: malloc serves an allocation from memory it already holds before
the threshold matters, and a long-lived test process holds too much of it to tell."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

SCRIPT = """
import ctypes
from tensordb.infra import allocator
ctypes.CDLL(None).mallopt(allocator.M_MMAP_THRESHOLD, 128 * 1024)  # what TensorFlow's from_generator sets
print(allocator.large_allocations_are_mapped())
print(allocator.restore_large_allocations(), allocator.large_allocations_are_mapped())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_after_the_restore_a_large_allocation_no_longer_gets_its_own_mmap() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.split() == ["True", "True", "False"]
