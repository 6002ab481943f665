"""This process's memory as the system sees it: what is resident now, and freed heap memory handed back."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable


def _glibc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None on another C library."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _glibc_trim()


def trim() -> bool:
    """Hand freed memory back to the system; False where the C library cannot. glibc keeps freed blocks under its
    mmap threshold (which grows to 32 MB as large tensors are freed), so without this a process stays at its peak."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


def resident_bytes() -> int:
    """This process's resident memory right now, in bytes (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
