"""Give the heap memory freed after large requests back to the operating system.

A large batch parses its JSON body into one dict per row and builds arrays from them. Once
the reply is built they are freed, but glibc keeps most of the freed pages (fragmented in the
middle of its heap, not at the top, where it trims by itself), so a worker stayed larger after
a batch load than before it (docs/predict.md, Benchmark). `malloc_trim(0)` hands those pages
back. Elsewhere than glibc (musl, macOS) it does nothing.

Trimming after every batch costs batch throughput: the next batch faults the same pages back
in. `IdleHeapTrim` trims once the worker has had no large request for a moment, so a
sustained batch load keeps its working set and an idle worker returns to its idle size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time
from collections.abc import Callable

TRIM_AFTER_BYTES = 256 * 1024  # a request body at least this large leaves the heap to trim


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


class IdleHeapTrim:
    """Release freed heap memory once no large request has ended for `idle_seconds`.

    `large_request_done()` is all a request pays (a clock read and an event set). A daemon
    thread, started in the first process that calls it (a gunicorn worker, not the master
    that forks it), waits for the quiet moment and trims.
    """

    def __init__(self, idle_seconds: float = 0.2) -> None:
        self.idle_seconds = idle_seconds
        self.trims = 0
        self._last = 0.0
        self._pending = threading.Event()
        self._pid = 0
        self._start_lock = threading.Lock()

    def large_request_done(self) -> None:
        self._last = time.monotonic()
        if self._pid != os.getpid():
            self._start()
        self._pending.set()

    def _start(self) -> None:
        with self._start_lock:
            if self._pid == os.getpid():
                return
            self._pending = threading.Event()  # a forked copy's state means nothing here
            threading.Thread(target=self._run, name="heap-trim", daemon=True).start()
            self._pid = os.getpid()

    def _run(self) -> None:
        while True:
            self._pending.wait()
            self._pending.clear()
            while (quiet_in := self._last + self.idle_seconds - time.monotonic()) > 0:
                time.sleep(quiet_in)
            release_freed_memory()
            self.trims += 1
