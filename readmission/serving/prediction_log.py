"""The prediction log: every answered prediction, as Parquet batches in the object store.

Contract. `PredictionLog.record(...)` (a body as received) or `record_rows(...)` (rows the
handler has parsed) is the request path's only call: it appends one record (ids, labels,
probabilities and the rows: the single-row body as received, or each row's JSON) to the
recording process's spool file (readmission.serving.log_spool). The process that made the log
(the server's master: gunicorn imports the function there and forks the workers) runs the
shipper thread (`start()`): every SCAN_SECONDS it reads the records the workers appended, and
when it holds `rows` rows, or `seconds` after its last write, it encodes them as Parquet
(readmission.serving.parquet), one file per (model version, UTC date), and PUTs each to

    <predictions-log bucket>/<model version>/<UTC date>/<shipper id>-<sequence:06d>.parquet

`shipper id` is unique per process (host name, pid and a random token), `sequence` counts the
process's batches, so a key is written by exactly one process, once; a batch that fails to
PUT keeps its key and bytes and is tried again at the next write (at most MAX_RETAINED
batches are kept; older ones are dropped and counted). So the encoding never holds a worker's
interpreter lock, and the shipper thread runs on idle CPU only (`_run_when_idle`); the spool's
bound gives the workers back pressure when it falls behind a sustained load.

What a stop loses. A normal stop loses nothing: a worker finishes its spool file at exit,
and the master, which exits last (gunicorn's graceful stop: SIGTERM, then `sys.exit`), writes
everything left in an `atexit` hook. A killed worker (SIGKILL, OOM kill) loses nothing either:
its records are in its spool file (all but a record torn mid-write), which the master reads.
A killed master loses the rows it has read but not yet written (at most one batch: `rows`
rows, or `seconds` of traffic) plus any batch whose PUT was still failing; with
PREDICTION_LOG_DIR on a volume that outlives the process (a pod's emptyDir), a restarted
master also ships the spool files the killed one had not read.

One row per predicted row: request_id, row (index in the request), time (UTC, ms),
model_version, endpoint, prediction (the label), encounter_id (when the row carried one),
features (the row as the request carried it, one JSON object: a schema that never changes
with the model's inputs; only keys the input rules accept, i.e. the model's inputs and the
data file's id and target columns) and probability_<class> per class (as answered, rounded to
6 digits). docs/predict.md describes the format.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import functools
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from readmission.config import Settings
from readmission.serving.log_spool import (
    ROW_JSON,
    Record,
    SpoolReader,
    SpoolWriter,
    encode_record,
    rows_payload,
    writer_id,
)
from readmission.serving.parquet import Column, write_table
from readmission.serving.s3 import S3Reader
from readmission.serving.settings import ServingSettings

log = logging.getLogger(__name__)

PARQUET_CONTENT_TYPE = "application/vnd.apache.parquet"
MAX_RETAINED = 20  # batches kept for another PUT while the store refuses them
SCAN_SECONDS = 0.5  # the shipper reads the spool this often (or every `seconds`, if shorter)
# The shipper thread's nice value where SCHED_IDLE is not available (Linux sets both per
# thread): the workers' requests come first.
SHIPPER_NICENESS = 19
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")

# (key, Parquet bytes) -> None; raises when the store did not take it
Put = Callable[[str, bytes], None]


def request_id(carried: str | None) -> str:
    """The request's id: the one it carried (X-Request-Id, V2 `id`) when it is a plausible
    id (1-128 characters of [A-Za-z0-9._:@/+=-]), else a new random one."""
    if carried and _REQUEST_ID.fullmatch(carried):
        return carried
    return os.urandom(16).hex()  # as uuid4().hex: 32 hex digits, 128 random bits


@functools.lru_cache(maxsize=4)
def _utc_date(day_number: int) -> str:
    """YYYY-MM-DD of a day counted from the Unix epoch (UTC)."""
    return (dt.date(1970, 1, 1) + dt.timedelta(days=day_number)).isoformat()


# (a record, its rows' JSON, their encounter ids): Record.logged_rows
LoggedRecord = tuple[Record, list[bytes], list[str | None]]


def encode_batch(records: Sequence[LoggedRecord]) -> bytes:
    """The Parquet file of records (each with its rows) of one model version (same classes)."""
    classes = records[0][0].classes
    columns: dict[str, list[Any]] = {
        name: []
        for name in ("request_id", "row", "time", "model_version", "endpoint", "prediction")
    }
    probabilities: list[list[float]] = [[] for _ in classes]
    features: list[bytes] = []
    encounters: list[str | None] = []
    for record, record_features, record_encounters in records:
        count = len(record_features)
        features += record_features
        encounters += record_encounters
        columns["request_id"] += [record.request_id] * count
        columns["row"] += range(count)
        columns["time"] += [int(record.time * 1000)] * count
        columns["model_version"] += [record.version] * count
        columns["endpoint"] += [record.endpoint] * count
        columns["prediction"] += record.labels
        for values, column in zip(
            probabilities, zip(*record.probabilities, strict=True), strict=True
        ):
            values += column
    kinds = {"row": "int64", "time": "timestamp_ms"}
    table = [Column(name, kinds.get(name, "string"), values) for name, values in columns.items()]
    table.append(Column("encounter_id", "string", encounters, True))
    table.append(Column("features", "string", features))  # compact JSON, UTF-8 already
    table += [
        Column(f"probability_{name}", "double", [float(v) for v in values])
        for name, values in zip(classes, probabilities, strict=True)
    ]
    return write_table(table, len(features), "readmission predict")


class PredictionLog:
    """Spools answered predictions and ships them as Parquet batches (see module)."""

    def __init__(
        self,
        put: Put | None,
        rows: int,
        seconds: float,
        after_write: Callable[[], None] | None = None,
        directory: Path | None = None,
        spool_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.put = put  # None: the log is off, `record` does nothing
        self.rows = rows
        self.seconds = seconds
        # called after each write (the master's heap trim: encoding a batch leaves freed
        # heap pages behind)
        self.after_write = after_write
        self.dropped_rows = 0  # rows of batches given up on (store refusing too long)
        self.written_rows = 0
        self._owned_directory = directory is None and put is not None
        if directory is None and put is not None:
            directory = Path(tempfile.mkdtemp(prefix="prediction-log-"))
        elif directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._writer = (
            SpoolWriter(directory, max_bytes=spool_bytes) if directory is not None else None
        )
        self._reader = SpoolReader(directory) if directory is not None else None
        self._pid = os.getpid()  # the process that ships: the one that made the log
        self.writer_id = writer_id()  # names this process's batches
        self._lock = threading.Lock()  # one shipping pass at a time (thread, exit hook, tests)
        self._pending: list[Record] = []
        self._pending_rows = 0
        self._retained: list[tuple[str, bytes, int]] = []
        self._sequence = 0
        self._last_write = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.put is not None

    def record(
        self,
        request_id: str,
        version: str,
        classes: Sequence[str],
        endpoint: str,
        labels: Sequence[str],
        probabilities: Any,
        payload: bytes | bytearray,
        payload_kind: str,
        encounters: Sequence[str | None] | None = None,
    ) -> None:
        """Spool one answered request (the request path: one append to a local file).

        `payload` holds the rows: a /predict body as received (`payload_kind`
        log_spool.FEATURES), or log_spool.ROW_JSON with the rows' `encounters`
        (`record_rows` makes both)."""
        if self._writer is None:
            return
        self._writer.append(
            encode_record(
                request_id,
                time.time(),
                version,
                classes,
                endpoint,
                labels,
                probabilities,
                payload,
                payload_kind,
                encounters,
            )
        )

    def record_rows(
        self,
        request_id: str,
        version: str,
        classes: Sequence[str],
        endpoint: str,
        labels: Sequence[str],
        probabilities: Any,
        rows: Sequence[Any],
    ) -> None:
        """Spool one answered request whose rows the handler has parsed (a batch, V2): each
        row's JSON is written (log_spool.ROW_JSON), so the master need not parse the body."""
        if self._writer is None:
            return
        payload, encounters = rows_payload(rows)
        self.record(
            request_id,
            version,
            classes,
            endpoint,
            labels,
            probabilities,
            payload,
            ROW_JSON,
            encounters,
        )

    def start(self) -> PredictionLog:
        """Start the shipper thread in this process, and its final write at exit."""
        if self.put is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
            self._thread.start()
            atexit.register(self.close)
        return self

    def _run(self) -> None:
        _run_when_idle()
        while not self._stop.wait(min(self.seconds, SCAN_SECONDS)):
            try:
                self._ship(final=False)
            except Exception:  # never let the thread die: the next pass tries again
                log.exception("prediction log: shipping failed")

    def flush(self) -> int:
        """Read the spool and write every row now (and retry batches the store refused);
        the number of rows written."""
        return self._ship(final=True)

    def _ship(self, final: bool) -> int:
        """Read the spool in bounded steps, writing a batch whenever `rows` rows are in hand;
        then what is left if `final` or `seconds` have passed since the last write."""
        if self.put is None or self._reader is None or os.getpid() != self._pid:
            return 0
        written, attempted = 0, False
        with self._lock:
            while True:
                records = self._reader.read()
                for record in records:
                    self._pending.append(record)
                    self._pending_rows += len(record.labels)
                if self._pending_rows >= self.rows:
                    written += self._write()
                    attempted = True
                if not records:
                    break
            due = time.monotonic() - self._last_write >= self.seconds
            if (final or due) and (self._pending or self._retained):
                written += self._write()
                attempted = True
            elif due:  # nothing to write: the next rows wait `seconds` for company
                self._last_write = time.monotonic()
        if attempted and self.after_write is not None:
            self.after_write()
        return written

    def _write(self) -> int:
        """PUT the pending rows (and the batches kept for retry); the rows written."""
        assert self.put is not None
        pending, self._pending, self._pending_rows = self._pending, [], 0
        self._last_write = time.monotonic()
        batches = self._retained + self._cut(pending)
        self._retained = []
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
        return written

    def _cut(self, pending: list[Record]) -> list[tuple[str, bytes, int]]:
        """Batches of `pending` by (model version, UTC date), each with its key."""
        groups: dict[tuple[str, str], list[LoggedRecord]] = {}
        for record in pending:
            try:
                features, encounters = record.logged_rows()
            except (ValueError, KeyError, TypeError) as exc:  # never written by `record`
                self.dropped_rows += len(record.labels)
                log.error("prediction log: request %s dropped: %s", record.request_id, exc)
                continue
            day = _utc_date(int(record.time // 86400))
            groups.setdefault((record.version, day), []).append((record, features, encounters))
        batches = []
        for (version, day), records in groups.items():
            self._sequence += 1
            key = f"{version}/{day}/{self.writer_id}-{self._sequence:06d}.parquet"
            count = sum(len(features) for _, features, _ in records)
            batches.append((key, encode_batch(records), count))
        return batches

    def close(self) -> None:
        """In a process that records: finish its spool file. In the process that ships (the
        exit hook of the server's master): stop the thread and write what is left."""
        if self._writer is not None:
            self._writer.close()
        if os.getpid() != self._pid or self.put is None or self._stop.is_set():
            return  # a worker (the master ships its spool), or closed already
        self._stop.set()
        try:
            self.flush()
        except Exception:
            log.exception("prediction log: the final write failed")
        if self._owned_directory and self.directory is not None and not self._retained:
            shutil.rmtree(self.directory, ignore_errors=True)


def _run_when_idle() -> None:
    """This thread runs only on CPU time nothing else wants (Linux SCHED_IDLE, per thread), or
    else at the lowest priority: the workers' requests come first, and under a sustained
    saturating load the spool's bound (readmission.serving.log_spool) makes room for it."""
    thread = threading.get_native_id()
    try:
        os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, thread, SHIPPER_NICENESS)


def log_from_settings(
    settings: ServingSettings, after_write: Callable[[], None] | None = None
) -> PredictionLog:
    """The log the settings ask for, its shipper started in this process: off with
    PREDICTION_LOG=off, and when the model comes from local files (MODEL_PATH: no object
    store to write to)."""
    rows, seconds = settings.prediction_log_rows, settings.prediction_log_seconds
    if not settings.prediction_log or settings.model_path:
        return PredictionLog(None, rows, seconds)
    store = Settings.from_env()
    reader = S3Reader.from_env(store)
    bucket = store.buckets.predictions_log

    def put(key: str, data: bytes) -> None:
        reader.put(bucket, key, data, PARQUET_CONTENT_TYPE)

    directory = Path(settings.prediction_log_dir) if settings.prediction_log_dir else None
    spool_bytes = int(settings.prediction_log_spool_mb * 1024 * 1024)
    return PredictionLog(put, rows, seconds, after_write, directory, spool_bytes).start()
