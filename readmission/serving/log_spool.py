"""The prediction log's spool: answered requests as framed records in local files.

The request path of a serving worker only appends one record to its own spool file (one
`os.write`; its only encoding is a small header and, for a batch, each row's JSON: a few µs
a row); another process, the server's master, reads the spool and turns it into Parquet
(readmission.serving.prediction_log). So the Parquet encoding never competes with requests
for a worker's interpreter lock, and a worker holds no pending rows in memory.

Contract.

* Files. A writer (one per process that records) appends to `<dir>/<writer id>-<n:06d>.spool`
  and holds an exclusive `flock` on it while it is open; it renames the file to `.done` when
  it has written SPOOL_FILE_BYTES to it (and opens the next `n`) and when the process exits
  normally. A `.spool` file whose lock can be taken has lost its writer (a killed worker): it
  is complete up to its last whole record.
* Records. `<u32 length of the rest><u32 header length><header JSON><probabilities><payload>`,
  little endian. The header holds request_id, time (UTC seconds), version, endpoint, classes,
  labels, `payload` (how to find the rows in the payload) and, for ROW_JSON, `encounters`
  (each row's encounter_id as text, or null); the probabilities are float64, row by row,
  class by class. The payload is either ROW_JSON, each row's compact JSON prefixed by its u32
  length (what a worker that has parsed a batch writes: the master then parses nothing), or
  FEATURES, a single-row /predict body as received (its one row is parsed by the master).
* Reading. `SpoolReader.read()` returns records appended since the last call, whole records
  only and about READ_BYTES of them at most (the rest at later calls): a record still being
  written is read at a later call; a torn record at the end of a file whose writer is gone (a
  worker killed mid-write) is dropped and counted. A file is deleted once it is finished and
  read to its end.
* Bound. A writer keeps at most `max_bytes` of finished files unread: at a rotation beyond
  that it waits (up to SPOOL_WAIT_SECONDS) for the reader to catch up. That is the log's back
  pressure: when the reader (another process, at a lower priority) falls behind a sustained
  load, requests slow down to what serving and logging together sustain, instead of the spool
  filling the disk.
* A writer never raises into the request: a failed write drops that record, counts it and
  ends the file (a record written in part is always a file's last, where the reader drops it).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from readmission.glue.json_codec import dumps, loads

log = logging.getLogger(__name__)

SPOOL_FILE_BYTES = 1024 * 1024  # a writer starts a new file past this size
READ_BYTES = 1024 * 1024  # what one SpoolReader.read takes at most (one longer record aside)
# How long a writer whose finished files exceed its bound waits for the reader at a rotation
# before it writes on regardless (a reader that is stuck must not stop the server).
SPOOL_WAIT_SECONDS = 5.0
OPEN_SUFFIX, DONE_SUFFIX = ".spool", ".done"
_LENGTH = struct.Struct("<I")
_SPOOL_NAME = re.compile(r"(?P<stem>.+-(?P<number>\d{6}))(?P<suffix>\.spool|\.done)")


FEATURES = "features"  # the payload kind of a /predict body, {"features": {...}}, as received
ROW_JSON = "row_json"  # the payload kind of `rows_payload`


def encounter_of(row: Any) -> str | None:
    """The row's encounter_id as text; None when it carries none."""
    value = row.get("encounter_id") if isinstance(row, dict) else None
    return None if value is None else str(value)


def rows_payload(rows: Sequence[Any]) -> tuple[bytearray, list[str | None]]:
    """The ROW_JSON payload of parsed rows (each row's compact JSON, prefixed by its u32
    length) and the rows' encounter ids."""
    # one growing buffer: each row's JSON is freed before the next is made, so a batch leaves
    # no thousand small blocks scattered over the worker's heap (docs/predict.md, memory)
    payload = bytearray()
    for row in rows:
        data = dumps(row)
        payload += _LENGTH.pack(len(data))
        payload += data
    return payload, [encounter_of(row) for row in rows]  # the record copies it once


def _split_row_json(payload: bytes) -> list[bytes]:
    rows, position, end = [], 0, len(payload)
    while position < end:
        (length,) = _LENGTH.unpack_from(payload, position)
        position += _LENGTH.size
        if position + length > end:
            raise ValueError("a row runs past the end of the payload")
        rows.append(payload[position : position + length])
        position += length
    return rows


def writer_id() -> str:
    """Unique per process: host name, pid and a random token."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:63] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def encode_record(
    request_id: str,
    when: float,
    version: str,
    classes: Sequence[str],
    endpoint: str,
    labels: Sequence[str],
    probabilities: Any,
    payload: bytes | bytearray,
    payload_kind: str,
    encounters: Sequence[str | None] | None = None,
) -> bytes:
    """One record (module docstring); `encounters` only with a ROW_JSON payload."""
    fields = {
        "request_id": request_id,
        "time": when,
        "version": version,
        "endpoint": endpoint,
        "classes": list(classes),
        "labels": list(labels),
        "payload": payload_kind,
    }
    if encounters is not None:
        fields["encounters"] = list(encounters)
    header = dumps(fields)
    if len(probabilities) == 1:  # a single row: struct is ~4x faster than numpy here
        values = struct.pack(f"<{len(probabilities[0])}d", *probabilities[0])
    else:
        values = np.asarray(probabilities, dtype="<f8").tobytes()
    rest = len(header) + len(values) + len(payload) + _LENGTH.size
    return b"".join((_LENGTH.pack(rest), _LENGTH.pack(len(header)), header, values, payload))


@dataclass(frozen=True)
class Record:
    """One answered request, as read back from the spool."""

    request_id: str
    time: float
    version: str
    classes: tuple[str, ...]
    endpoint: str
    labels: list[str]
    probabilities: list[list[float]]
    payload: bytes
    payload_kind: str
    encounters: list[str | None] | None = None  # with a ROW_JSON payload

    def logged_rows(self) -> tuple[list[bytes], list[str | None]]:
        """Each predicted row as the request carried it (compact JSON) and its encounter id;
        ValueError, KeyError or TypeError if the payload does not hold one row per label."""
        if self.payload_kind == ROW_JSON:
            features = _split_row_json(self.payload)
            encounters = self.encounters
            if encounters is None or len(encounters) != len(features):
                raise ValueError("the record's encounters do not match its rows")
        elif self.payload_kind == FEATURES:
            row = loads(self.payload)["features"]
            features, encounters = [dumps(row)], [encounter_of(row)]
        else:
            raise ValueError(f"unknown payload kind {self.payload_kind!r}")
        if len(features) != len(self.labels):
            raise ValueError(f"{len(self.labels)} labels for {len(features)} rows")
        return features, encounters


def decode_record(data: bytes | memoryview) -> Record:
    (header_length,) = _LENGTH.unpack_from(data, 0)
    start = _LENGTH.size
    header = loads(bytes(data[start : start + header_length]))
    classes, labels = tuple(header["classes"]), header["labels"]
    values_start = start + header_length
    rows, width = len(labels), len(classes)
    values_end = values_start + 8 * rows * width
    if rows == 1:
        probabilities = [list(struct.unpack_from(f"<{width}d", data, values_start))]
    else:
        values = np.frombuffer(data[values_start:values_end], dtype="<f8")
        probabilities = values.reshape(rows, width).tolist()
    return Record(
        header["request_id"],
        header["time"],
        header["version"],
        classes,
        header["endpoint"],
        labels,
        probabilities,
        bytes(data[values_end:]),
        header["payload"],
        header.get("encounters"),
    )


class SpoolWriter:
    """Appends records to this process's spool file (see module). Thread-safe."""

    def __init__(
        self,
        directory: Path,
        file_bytes: int = SPOOL_FILE_BYTES,
        max_bytes: int = 64 * SPOOL_FILE_BYTES,
        wait_seconds: float = SPOOL_WAIT_SECONDS,
    ) -> None:
        self.directory = directory
        self.file_bytes = file_bytes
        self.max_files = max(1, max_bytes // file_bytes)  # finished files left unread, at most
        self.wait_seconds = wait_seconds
        self.dropped_records = 0
        self.waited_seconds = 0.0  # time spent waiting for the reader (back pressure)
        self._pid = 0
        self._lock = threading.Lock()
        self._fd = -1
        self._path: Path | None = None
        self._size = 0
        self._number = 0
        self._id = ""

    def append(self, record: bytes) -> None:
        with self._lock:
            if self._pid != os.getpid():  # first record of this process (e.g. a worker)
                self._pid, self._fd, self._number, self._id = os.getpid(), -1, 0, writer_id()
            try:
                if self._fd < 0 or self._size >= self.file_bytes:
                    self._next_file()
                view = memoryview(record)
                while view:  # a regular file takes it whole unless the disk is full
                    view = view[os.write(self._fd, view) :]
                self._size += len(record)
            except OSError as exc:
                self.dropped_records += 1
                log.error("prediction log: a record could not be spooled (dropped): %s", exc)
                # a record written in part must end its file, where the reader drops it
                with contextlib.suppress(OSError):
                    self._finish()

    def _next_file(self) -> None:
        self._finish()
        self._wait_for_reader()
        self._number += 1
        path = self.directory / f"{self._id}-{self._number:06d}{OPEN_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held while this process writes it
        self._fd, self._path, self._size = fd, path, 0

    def _wait_for_reader(self) -> None:
        started = time.monotonic()
        prefix = self._id + "-"
        while time.monotonic() - started < self.wait_seconds:
            with os.scandir(self.directory) as entries:
                unread = sum(
                    e.name.startswith(prefix) and e.name.endswith(DONE_SUFFIX) for e in entries
                )
            if unread < self.max_files:
                break
            time.sleep(0.02)
        else:
            log.warning("prediction log: the spool reader is behind; writing on past the bound")
        self.waited_seconds += time.monotonic() - started

    def _finish(self) -> None:
        fd, path = self._fd, self._path
        self._fd, self._path = -1, None
        if fd >= 0 and path is not None:
            try:
                os.rename(path, path.with_suffix(DONE_SUFFIX))
            finally:
                os.close(fd)  # releases the lock: unrenamed, the reader finds it finished

    def close(self) -> None:
        """Finish this process's file (the exit hook of a process that records)."""
        with self._lock:
            if self._pid == os.getpid():
                try:
                    self._finish()
                except OSError as exc:  # its reader then finds it unlocked: the same end
                    log.warning("prediction log: could not finish the spool file: %s", exc)


class SpoolReader:
    """Reads the records of every spool file in a directory, once each (see module)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.torn_records = 0  # torn or unreadable records dropped
        self._offsets: dict[str, int] = {}  # file stem -> bytes read so far

    def read(self, budget: int = READ_BYTES) -> list[Record]:
        """The records appended since the last call, oldest files first, about `budget`
        bytes of them at most (at least one record, when there is one): a reader that has
        fallen behind catches up in bounded steps, never holding the whole backlog."""
        records: list[Record] = []
        files = [
            (int(match["number"]), match["stem"], match["suffix"] == DONE_SUFFIX, path)
            for path in self.directory.iterdir()
            if (match := _SPOOL_NAME.fullmatch(path.name)) is not None
        ]
        # by file number, then writer: the writers' oldest files first, taken in turns, so
        # none of them waits for the reader to get through another's whole backlog (Bound)
        for _, stem, finished, path in sorted(files):
            found, used = self._read_file(path, stem, finished, budget)
            records += found
            budget -= used
            if budget <= 0:
                break
        return records

    def _read_file(
        self, path: Path, stem: str, finished: bool, budget: int
    ) -> tuple[list[Record], int]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # renamed to .done since the listing: read at the next call
            return [], 0
        try:
            if not finished:  # a lock we can take: its writer is gone, it will not grow
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    finished = True
                except BlockingIOError:
                    pass
            offset = self._offsets.get(stem, 0)
            size = os.fstat(fd).st_size
            data = os.pread(fd, min(size - offset, budget), offset)
            if len(data) >= _LENGTH.size:
                first = _LENGTH.size + _LENGTH.unpack_from(data)[0]
                if first > len(data):  # its next record is longer than the budget: read it
                    data = os.pread(fd, min(first, size - offset), offset)  # (or all there is)
        finally:
            os.close(fd)
        records, used = self._whole_records(data, path.name)
        if not finished or offset + len(data) < size:
            self._offsets[stem] = offset + used
            return records, used
        if used < len(data):
            self.torn_records += 1
            log.warning("prediction log: %s ends in a torn record (dropped)", path.name)
        for name in (stem + OPEN_SUFFIX, stem + DONE_SUFFIX):  # renamed since the listing?
            (self.directory / name).unlink(missing_ok=True)
        self._offsets.pop(stem, None)
        return records, max(used, 1)

    def _whole_records(self, data: bytes, name: str) -> tuple[list[Record], int]:
        """The whole records at the start of `data` and the bytes they take; a record that
        cannot be decoded is dropped and counted (it must not stop the ones after it)."""
        records, position, view = [], 0, memoryview(data)
        while position + _LENGTH.size <= len(data):
            (length,) = _LENGTH.unpack_from(data, position)
            end = position + _LENGTH.size + length
            if end > len(data):
                break
            try:
                records.append(decode_record(view[position + _LENGTH.size : end]))
            except (ValueError, KeyError, TypeError, struct.error) as exc:
                self.torn_records += 1
                log.error("prediction log: an unreadable record in %s (dropped): %s", name, exc)
            position = end
        return records, position
