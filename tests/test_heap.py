"""readmission.glue.heap: freed heap pages go back to the operating system (glibc)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from readmission.glue import heap


def _rss_kb() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
_LIBC.malloc.restype = ctypes.c_void_p
_LIBC.free.argtypes = [ctypes.c_void_p]
glibc_only = pytest.mark.skipif(heap._MALLOC_TRIM is None, reason="not glibc: nothing to trim")


@contextlib.contextmanager
def _fragmented_heap() -> Iterator[None]:
    """What a parsed 1000-row batch leaves: ~40 MB of small blocks freed below one still in
    use, so glibc cannot shrink the heap from its top by itself."""
    heap.release_freed_memory()
    blocks = [_LIBC.malloc(2048) for _ in range(20_000)]
    for block in blocks:
        ctypes.memset(block, 1, 2048)  # resident
    kept = _LIBC.malloc(2048)  # above them: the heap's top stays in use
    for block in blocks:
        _LIBC.free(block)
    try:
        yield
    finally:
        _LIBC.free(kept)


@glibc_only
def test_pages_freed_in_the_middle_of_the_heap_are_returned() -> None:
    with _fragmented_heap():
        before = _rss_kb()
        assert heap.release_freed_memory()
        assert before - _rss_kb() > 30_000  # most of the 40 MB went back


@glibc_only
def test_the_idle_trim_waits_for_a_quiet_moment_then_returns_the_pages() -> None:
    trim = heap.IdleHeapTrim(idle_seconds=1.0)
    with _fragmented_heap():
        before = _rss_kb()
        trim.large_request_done()
        assert trim.trims == 0  # not while requests may still come: the next would refault
        deadline = time.monotonic() + 30
        while trim.trims == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert trim.trims == 1
        assert before - _rss_kb() > 30_000
