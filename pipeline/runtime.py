"""Process-wide settings of the pipeline's own processes (its command line and benchmarks)."""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit systems
TRIM_THRESHOLD = 1 << 30
USER_MALLOC_SETTINGS = ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep the memory tensors free for the next allocation.

    By default glibc maps blocks above a moving threshold (128 KiB at first) fresh from the
    kernel and gives the top of its heap back once more than twice that is free. A training
    loop on the CPU frees and allocates the same activations every step, so it pays their
    page faults again and again, more or less each step depending on where the heap's top
    lands: most of what feeding computed weights to the encoder seemed to cost in an
    AdaMerging step (docs/benchmarks.md). This keeps blocks up to 32 MiB on the heap and
    gives memory back only past 1 GiB free, as the caching allocators that PyTorch's CPU
    tuning guide recommends (jemalloc, tcmalloc) do.

    Returns whether the settings were applied: not outside glibc, nor when the environment
    sets glibc's malloc tunables itself (``USER_MALLOC_SETTINGS``), which then stay in force.
    """
    if not sys.platform.startswith("linux") or any(k in os.environ for k in USER_MALLOC_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt, version = libc.mallopt, libc.gnu_get_libc_version
    except (OSError, AttributeError):  # not glibc (musl, for instance)
        return False
    version.restype = ctypes.c_char_p
    applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("glibc %s malloc: mmap threshold %d, trim threshold %d: %s", version().decode(),
              MMAP_THRESHOLD, TRIM_THRESHOLD, "applied" if applied else "refused")
    return applied
