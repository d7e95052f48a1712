"""glibc's allocator thresholds, which TensorFlow's ``from_generator`` lowers for the whole process.

The first time a ``from_generator`` dataset is iterated, TensorFlow (2.21, as pinned) calls
``mallopt(M_MMAP_THRESHOLD, 128 KiB)`` once per process (``ApplyPython311MemoryPatch`` in
``GeneratorDatasetOp``; its log line says ``M_TRIM_THRESHOLD``, the call seen in gdb sets
``M_MMAP_THRESHOLD``), presumably against the memory growth with Python 3.11 reported in
tensorflow/tensorflow#65675. From then on glibc no longer adapts: every allocation of 128 KiB or
more is a fresh ``mmap``, page-faulted in and unmapped again. A 256×256×3 sample is 196 KiB, a
batch of them 12 MiB: reading them through :func:`tensordb.data.loader.to_tf_dataset` took ~100
page faults a sample and ran at less than half the speed (``bench/README.md``), and so did every
other large array in the process.

:func:`restore_large_allocations` sets the thresholds glibc's adaptive mode reaches by itself for
arrays of up to 32 MiB (its ceiling on 64-bit systems): 32 MiB for ``mmap``, and twice that before
the heap's free top is given back. Over 20 passes of 3,000 such samples, the process held about
85 MiB more than under TensorFlow's setting, flat from the second pass on.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc's ceiling for its adaptive mmap threshold on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``).
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20

_logged = False


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


@functools.cache
def _glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``, or None where the C library is another (musl's ``mallopt`` does nothing)."""
    try:
        process = ctypes.CDLL(None)  # the symbols loaded in this process, the C library's among them
        mallopt, _ = process.mallopt, process.gnu_get_libc_version  # only glibc has the second
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt


def restore_large_allocations(mmap_threshold: int = GLIBC_MMAP_THRESHOLD_MAX) -> bool:
    """Let allocations below ``mmap_threshold`` come from the heap again (see the module docstring);
    returns whether glibc took the setting. Logged once per process, at INFO.

    Parameters
    ----------
    mmap_threshold : int
        Allocations of at least this many bytes get their own ``mmap``; the heap keeps up to twice
        this much free memory before giving it back to the system.
    """
    global _logged
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    done = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, 2 * mmap_threshold))
    if done and not _logged:
        _logged = True
        log.info(
            "set glibc's M_MMAP_THRESHOLD to %d bytes and M_TRIM_THRESHOLD to twice that: TensorFlow's from_generator "
            "had set the first to 128 KiB, making every large array a fresh mmap (reads of large samples ran at half "
            "speed); to keep TensorFlow's setting, pass mmap_threshold=None to to_tf_dataset",
            mmap_threshold,
        )
    return done


def large_allocations_are_mapped() -> bool | None:
    """Whether an allocation too large for the heap's free memory, and under 32 MiB, gets its own
    ``mmap`` now: True under TensorFlow's setting, False after :func:`restore_large_allocations`.
    None without glibc 2.33+ (``mallinfo2``), or when the heap holds 31 MiB free or more (then no
    such allocation is sure to need new memory). Only the threshold decides it: malloc takes
    memory it already holds first."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    size = int(mallinfo2().fordblks) + 2**20
    if size >= GLIBC_MMAP_THRESHOLD_MAX:
        return None
    mapped_before = int(mallinfo2().hblkhd)
    block = b"\x01" * size
    mapped = int(mallinfo2().hblkhd) - mapped_before >= len(block)
    del block
    return mapped
