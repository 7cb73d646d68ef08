"""Give the heap memory freed after a large request back to the operating system.

A 1000-row batch parses ~1.5 MB of JSON into ~1000 dicts and builds arrays from them. Once
the reply is built they are freed, but glibc keeps most of the freed pages (fragmented in the
middle of its heap, not at the top, where it trims by itself): each worker stayed ~14 MB
larger after the benchmark's batch load (docs/predict.md, Benchmark). `malloc_trim(0)` hands
those pages back (~0.7 ms after a 1000-row batch that takes ~20 ms). Elsewhere than glibc
(musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

TRIM_AFTER_BYTES = 256 * 1024  # a request body at least this large is followed by a trim


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def release_freed_memory() -> bool:
    """Return freed heap pages to the OS; True if any were (False also where unsupported)."""
    return bool(_MALLOC_TRIM(0)) if _MALLOC_TRIM is not None else False
