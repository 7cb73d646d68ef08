"""The prediction log: every answered prediction, as Parquet batches in the object store.

Contract. `PredictionLog.record(...)` is the request path's only call: it appends a reference
to what was answered (no copying, no encoding) to an in-memory list and returns. A background
thread of the process that records (started by the first `record` in each process, so after
gunicorn's fork, one per worker) cuts that list into batches when it holds `rows` rows or
`seconds` after the last flush, whichever comes first, encodes each batch as one Parquet file
(readmission.serving.parquet) and PUTs it to

    <predictions-log bucket>/<model version>/<UTC date>/<writer id>-<sequence:06d>.parquet

`writer id` is unique per process (host name, pid and a random token), `sequence` counts the
process's batches, so a key is written by exactly one process, once; a batch that fails to
PUT keeps its key and bytes and is tried again at the next flush (at most MAX_RETAINED
batches are kept; older ones are dropped and counted). At a normal exit (gunicorn's graceful
stop: SIGTERM, then `sys.exit`) an `atexit` hook flushes what is left, so a normal stop loses
nothing; a crash (SIGKILL, OOM kill) loses the rows recorded since the last flush: at most one
batch (`rows` rows, or `seconds` of traffic), plus any batch whose PUT was still failing.

One row per predicted row: request_id, row (index in the request), time (UTC, ms),
model_version, endpoint, prediction (the label), encounter_id (when the row carried one),
features (the row as the request carried it, one JSON object: a schema that never changes
with the model's inputs; only keys the input rules accept, i.e. the model's inputs and the
data file's id and target columns) and probability_<class> per class (as answered, rounded to
6 digits). docs/predict.md describes the format.
"""

from __future__ import annotations

import atexit
import datetime as dt
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from readmission.config import Settings
from readmission.serving.parquet import Column, write_table
from readmission.serving.s3 import S3Reader
from readmission.serving.settings import ServingSettings

log = logging.getLogger(__name__)

PARQUET_CONTENT_TYPE = "application/vnd.apache.parquet"
MAX_RETAINED = 20  # batches kept for another PUT while the store refuses them
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")

# (key, Parquet bytes) -> None; raises when the store did not take it
Put = Callable[[str, bytes], None]


def request_id(carried: str | None) -> str:
    """The request's id: the one it carried (X-Request-Id, V2 `id`) when it is a plausible
    id (1-128 characters of [A-Za-z0-9._:@/+=-]), else a new random one."""
    if carried and _REQUEST_ID.fullmatch(carried):
        return carried
    return uuid.uuid4().hex


class _Entry:
    """One answered request, by reference (encoded later, off the request path)."""

    __slots__ = ("classes", "endpoint", "labels", "probs", "request_id", "rows", "time", "version")

    def __init__(
        self,
        request_id: str,
        when: float,
        version: str,
        classes: Sequence[str],
        endpoint: str,
        rows: Sequence[Any],
        labels: Sequence[str],
        probs: Sequence[Sequence[float]],
    ) -> None:
        self.request_id = request_id
        self.time = when
        self.version = version
        self.classes = classes
        self.endpoint = endpoint
        self.rows = rows
        self.labels = labels
        self.probs = probs


# the row as the request carried it: one JSON object (keys in the request's order)
_FEATURES_JSON = json.JSONEncoder(separators=(",", ":"), default=str).encode


def _writer_id() -> str:
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:63] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def _encounter(row: Any) -> str | None:
    value = row.get("encounter_id") if isinstance(row, dict) else None
    return None if value is None else str(value)


def encode_batch(entries: Sequence[_Entry]) -> bytes:
    """The Parquet file of entries of one model version (same classes)."""
    classes = entries[0].classes
    columns: dict[str, list[Any]] = {
        name: []
        for name in ("request_id", "row", "time", "model_version", "endpoint", "prediction")
    }
    probabilities: list[list[float]] = [[] for _ in classes]
    rows: list[Any] = []
    for entry in entries:
        count = len(entry.rows)
        rows.extend(entry.rows)
        columns["request_id"] += [entry.request_id] * count
        columns["row"] += range(count)
        columns["time"] += [int(entry.time * 1000)] * count
        columns["model_version"] += [entry.version] * count
        columns["endpoint"] += [entry.endpoint] * count
        columns["prediction"] += entry.labels
        for values, column in zip(probabilities, zip(*entry.probs, strict=True), strict=True):
            values += column
    kinds = {"row": "int64", "time": "timestamp_ms"}
    table = [Column(name, kinds.get(name, "string"), values) for name, values in columns.items()]
    table.append(Column("encounter_id", "string", [_encounter(row) for row in rows], True))
    table.append(Column("features", "string", list(map(_FEATURES_JSON, rows))))
    table += [
        Column(f"probability_{name}", "double", [float(v) for v in values])
        for name, values in zip(classes, probabilities, strict=True)
    ]
    return write_table(table, len(rows), "readmission predict")


class PredictionLog:
    """Batches answered predictions and PUTs them from a background thread (see module)."""

    def __init__(
        self,
        put: Put | None,
        rows: int,
        seconds: float,
        after_write: Callable[[], None] | None = None,
    ) -> None:
        self.put = put  # None: the log is off, `record` does nothing
        self.rows = rows
        self.seconds = seconds
        # called after each write (the function's idle heap trim: encoding a batch leaves
        # freed heap pages behind, like parsing a large request does)
        self.after_write = after_write
        self.dropped_rows = 0  # rows of batches given up on (store refusing too long)
        self.written_rows = 0
        self._pid = 0
        self._start_lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()  # guards _pending and _count
        self._flush_lock = threading.Lock()  # one flush at a time (thread or exit hook)
        self._pending: list[_Entry] = []
        self._count = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._retained: list[tuple[str, bytes, int]] = []
        self._sequence = 0
        self.writer_id = _writer_id()

    @property
    def enabled(self) -> bool:
        return self.put is not None

    def record(
        self,
        request_id: str,
        version: str,
        classes: Sequence[str],
        endpoint: str,
        rows: Sequence[Any],
        labels: Sequence[str],
        probabilities: Sequence[Sequence[float]],
    ) -> None:
        """Remember one answered request (the request path: an append under a lock)."""
        if self.put is None:
            return
        if self._pid != os.getpid():
            self._start()
        entry = _Entry(
            request_id, time.time(), version, classes, endpoint, rows, labels, probabilities
        )
        with self._lock:
            self._pending.append(entry)
            self._count += len(rows)
            full = self._count >= self.rows
        if full:
            self._wake.set()

    def _start(self) -> None:
        """In each process that records: fresh state and the flushing thread."""
        with self._start_lock:
            if self._pid == os.getpid():
                return
            self._reset()  # a forked child must not reuse its parent's locks, id or rows
            self._pid = os.getpid()
            threading.Thread(target=self._run, name="prediction-log", daemon=True).start()
            atexit.register(self.close)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.seconds)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.flush()
            except Exception:  # never let the thread die: the next flush tries again
                log.exception("prediction log flush failed")

    def flush(self) -> int:
        """Write every recorded row now (and retry batches the store refused); the number of
        rows written."""
        if self.put is None:
            return 0
        with self._flush_lock:
            with self._lock:
                pending, self._pending, self._count = self._pending, [], 0
            batches = self._retained
            self._retained = []
            for key, data, count in self._cut(pending):
                batches.append((key, data, count))
            written = 0
            for key, data, count in batches:
                try:
                    self.put(key, data)
                    written += count
                except Exception as exc:
                    log.warning("prediction log: PUT %s failed (kept for retry): %s", key, exc)
                    self._retained.append((key, data, count))
            while len(self._retained) > MAX_RETAINED:
                key, _, count = self._retained.pop(0)
                self.dropped_rows += count
                log.error("prediction log: gave up on %s (%d rows)", key, count)
            self.written_rows += written
        if batches and self.after_write is not None:
            self.after_write()
        return written

    def _cut(self, pending: list[_Entry]) -> list[tuple[str, bytes, int]]:
        """Batches of `pending` by (model version, UTC date), each with its key."""
        groups: dict[tuple[str, str], list[_Entry]] = {}
        for entry in pending:
            day = dt.datetime.fromtimestamp(entry.time, dt.UTC).strftime("%Y-%m-%d")
            groups.setdefault((entry.version, day), []).append(entry)
        batches = []
        for (version, day), entries in groups.items():
            self._sequence += 1
            key = f"{version}/{day}/{self.writer_id}-{self._sequence:06d}.parquet"
            count = sum(len(e.rows) for e in entries)
            batches.append((key, encode_batch(entries), count))
        return batches

    def close(self) -> None:
        """Stop the thread and write what is left (the exit hook of a serving process)."""
        if self._pid != os.getpid():
            return  # not the process that recorded (gunicorn's master)
        self._stop.set()
        self._wake.set()
        try:
            self.flush()
        except Exception:
            log.exception("prediction log: the final flush failed")


def log_from_settings(
    settings: ServingSettings, after_write: Callable[[], None] | None = None
) -> PredictionLog:
    """The log the settings ask for: off with PREDICTION_LOG=off, and when the model comes
    from local files (MODEL_PATH: no object store to write to)."""
    rows, seconds = settings.prediction_log_rows, settings.prediction_log_seconds
    if not settings.prediction_log or settings.model_path:
        return PredictionLog(None, rows, seconds)
    store = Settings.from_env()
    reader = S3Reader.from_env(store)
    bucket = store.buckets.predictions_log

    def put(key: str, data: bytes) -> None:
        reader.put(bucket, key, data, PARQUET_CONTENT_TYPE)

    return PredictionLog(put, rows, seconds, after_write)
