"""readmission.heap: freed heap pages go back to the operating system (glibc)."""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from pathlib import Path

import pytest

from readmission import heap


def _rss_kb() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


@pytest.mark.skipif(heap._MALLOC_TRIM is None, reason="not glibc: nothing to trim")
def test_pages_freed_in_the_middle_of_the_heap_are_returned() -> None:
    """What a parsed 1000-row batch leaves: many small blocks freed below one still in use,
    so glibc cannot shrink the heap from its top by itself."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    heap.release_freed_memory()
    blocks = [libc.malloc(2048) for _ in range(20_000)]  # ~40 MB
    for block in blocks:
        ctypes.memset(block, 1, 2048)  # resident
    kept = libc.malloc(2048)  # above them: the heap's top stays in use
    for block in blocks:
        libc.free(block)
    before = _rss_kb()
    try:
        assert heap.release_freed_memory()
        assert before - _rss_kb() > 30_000  # most of the 40 MB went back
    finally:
        libc.free(kept)
