"""The ingest step: a raw CSV in, appended to the corpus as a new version with its job specs.

Plain Python, no server: `ingest_object(store, settings, bucket, key, etag=...)` does everything
the ingest function does for one `io.readmission.raw.created` event (see docs/ingest.md).
readmission.corpus decides what a drop adds (deduplication by encounter_id, the stable split, the
new batches); readmission.corpus_append writes it (the append, its crash recovery, the drop
record, the receipt) and readmission.jobs the job specs. This module reads the event's object
version (streamed to a local copy and validated block by block by readmission.drop_file, so
memory does not grow with the file) and routes it: gone, superseded, rejected (the rejection is
written here), a known drop, or an append under the corpus lease.

An event names one object version by its ETag. Ingest reads that version and no other (a GET
with If-Match): if the key was overwritten before the event was handled, the event's version is
`superseded` (a receipt says so, nothing is appended) and the newer version is ingested by its
own event. Without an ETag (older callers) it reads whatever the key holds.

Idempotent and crash-safe:

* a drop is known by its content (sha256): `drops/<id>.json` records what became of it, so the
  same bytes under any name, or a redelivered event, append nothing twice;
* appends are serialised by a lease on the corpus (`corpus/append.lease`): each reads the head
  version, writes the new version's Parquet parts, its encounter index and LAST its manifest
  (every object with a deterministic key and bytes, `put_if_absent`), then moves the head and
  records the drop. A crash before the head moves leaves an unreferenced version that the
  redelivery completes (same parent, same bytes: the same version id);
* job specs are written after the head moved, and the receipt (by object version, for the
  reconciler) last;
* after the receipt and outside the lease, the drop's drift report (readmission.drift_reports,
  on a bounded systematic sample of its rows: `ParsedDrop.sample`), `drift.json` last; a known
  drop whose report is missing gets it from the redelivery.

A file that breaks the data contract, or whose rows mostly conflict with the corpus, is moved to
the rejected bucket with an error report (copy, report, then delete the original).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from readmission import contract, corpus, drift_reports, drop_file, keys, lease
from readmission.config import Settings
from readmission.corpus_append import (
    ALREADY_INGESTED,
    GONE,
    INGESTED,
    JSON_TYPE,
    NOTHING_NEW,
    REJECTED,
    SUPERSEDED,
    DropRejected,
    IngestOutcome,
    Timer,
    append_drop,
    known_drop,
    write_receipt,
)
from readmission.storage import ObjectInfo, ObjectStore, PreconditionFailed, json_bytes

# The entry points, and the outcome of `ingest_object`: its type and the statuses it reports.
__all__ = [
    "ALREADY_INGESTED",
    "GONE",
    "INGESTED",
    "NOTHING_NEW",
    "REJECTED",
    "SUPERSEDED",
    "IngestOutcome",
    "contract_summary",
    "ingest_object",
    "labels_of",
    "rejection_report",
]

log = logging.getLogger(__name__)

# Appends of concurrent drops wait for each other this long (an append of the whole UCI file
# holds the lease for a few seconds).
CORPUS_LEASE_TTL_SECONDS = 60.0
CORPUS_LEASE_WAIT_SECONDS = 300.0


# --------------------------------------------------------------------------- entry point


def ingest_object(
    store: ObjectStore, settings: Settings, bucket: str, key: str, etag: str | None = None
) -> IngestOutcome:
    """Ingest one raw CSV (see the module docstring). Raises only on transient failures.

    `etag` is the ETag of the object version the event names: only that version is read, and
    if another version has replaced it the outcome is SUPERSEDED. None (or "") reads whatever
    the key holds now.
    """
    expected = (etag or "").strip('"') or None
    timer = Timer()
    info = store.head(bucket, key)
    if info is None:  # already moved to rejected, or deleted: a redelivery has nothing to do
        return IngestOutcome(GONE, bucket, key)
    if expected is not None and info.etag != expected:  # overwritten before this event
        return _superseded(store, settings, bucket, key, expected, info.etag)
    if info.size > settings.max_upload_bytes:
        problem = (
            f"the file is {info.size:,} bytes, more than the limit of "
            f"{settings.max_upload_bytes:,} bytes (MAX_UPLOAD_BYTES)"
        )
        return _reject(
            store, settings, info, [problem], _unread_id(info), sha256=None, etag=expected
        )
    with tempfile.TemporaryDirectory(prefix="ingest-") as scratch:
        return _ingest_version(store, settings, info, expected, timer, Path(scratch))


def _ingest_version(
    store: ObjectStore,
    settings: Settings,
    info: ObjectInfo,
    expected: str | None,
    timer: Timer,
    scratch: Path,
) -> IngestOutcome:
    """`ingest_object` once HEAD found the version: download it to `scratch` (streaming, hashed
    on the way), check it, and route it. The local copy lives until this returns."""
    bucket, key = info.bucket, info.key
    try:  # If-Match: overwritten between HEAD and GET is superseded too
        body = store.open_version(bucket, key, expected)
    except PreconditionFailed:
        current = store.head(bucket, key)
        return _superseded(store, settings, bucket, key, str(expected), current and current.etag)
    if body is None:  # deleted between HEAD and GET
        return IngestOutcome(GONE, bucket, key)
    local = scratch / "drop.csv"
    size, sha256 = drop_file.download(drop_file.stream_chunks(body), local)
    info = replace(info, size=size)  # describe the bytes read, even if replaced since HEAD
    timer.lap("download")
    if not key.lower().endswith(".csv"):
        problem = f"the file name {key!r} does not end in .csv; only CSV files are ingested"
        return _reject(store, settings, info, [problem], sha256[:16], sha256, etag=expected)
    drop_id = sha256[:16]  # keys.content_id of the bytes
    record = store.get_json_if_exists(settings.buckets.datasets, keys.drop_key(drop_id))
    if record is not None:
        outcome = known_drop(store, settings, info, record)
        return _with_drift_report(store, settings, outcome, drop_id, lambda: _read(local, size))
    try:  # the whole file is checked before anything is appended
        drop = drop_file.read_drop(local, size)
    except contract.ContractViolation as violation:
        return _reject(
            store, settings, info, violation.problems, sha256[:16], sha256, etag=expected
        )
    timer.lap("parse")
    # the drift report's sample is taken while the Parquet parts pass reads the rows
    drop.keep_sample(settings.drift_sample_rows)
    with lease.acquire(
        store,
        settings.buckets.datasets,
        keys.CORPUS_LEASE_KEY,
        ttl_seconds=CORPUS_LEASE_TTL_SECONDS,
        wait_seconds=CORPUS_LEASE_WAIT_SECONDS,
        purpose=f"append drop {drop_id}",
        renew_every=CORPUS_LEASE_TTL_SECONDS / 4,
    ):
        record = store.get_json_if_exists(settings.buckets.datasets, keys.drop_key(drop_id))
        if record is not None:  # a concurrent delivery of the same bytes appended it
            outcome = known_drop(store, settings, info, record)
        else:
            try:
                outcome = append_drop(store, settings, info, sha256, drop, timer, scratch)
            except DropRejected as rejected:  # nothing was appended: reject it under the lease
                return _reject(
                    store, settings, info, rejected.problems, sha256[:16], sha256, etag=expected
                )
    # After the append (or a concurrent delivery's), outside the lease: the drift report.
    outcome = _with_drift_report(store, settings, outcome, drop_id, lambda: drop)
    timer.lap("drift")
    return outcome


def _read(local: Path, size: int) -> drop_file.ParsedDrop:
    """The known drop's local copy, validated again (only when its drift report is missing)."""
    return drop_file.read_drop(local, size)


def _with_drift_report(
    store: ObjectStore,
    settings: Settings,
    outcome: IngestOutcome,
    drop_id: str,
    parsed: Callable[[], drop_file.ParsedDrop],
) -> IngestOutcome:
    """The accepted drop's drift report against the champion (readmission.drift_reports),
    written after its receipt and outside the corpus lease: a failure to write it loses
    nothing of the drop, and the redelivered event (a known drop) writes what is missing.

    `parsed` gives the drop, called only if the report is missing. The report compares a
    bounded, deterministic sample of the drop's rows (`ParsedDrop.sample`: a systematic sample
    of at most DRIFT_SAMPLE_ROWS rows, taken while the blocks stream by, so memory does not
    grow with the file: by the append's Parquet parts pass when it made one, `keep_sample`,
    else by a pass of its own); a drop no larger than that is compared whole."""
    if outcome.status not in (INGESTED, NOTHING_NEW, ALREADY_INGESTED):
        return outcome

    def rows() -> tuple[pa.Table, int]:
        drop = parsed()
        return drop.sample(settings.drift_sample_rows), drop.rows

    written = drift_reports.write_drop_report(store, settings, drop_id, rows)
    return replace(outcome, written=outcome.written + tuple(written)) if written else outcome


def _superseded(
    store: ObjectStore,
    settings: Settings,
    bucket: str,
    key: str,
    etag: str,
    current: str | None,
) -> IngestOutcome:
    """The event's version (`etag`) was replaced before it could be read: write its receipt
    saying so and ingest nothing; the newer version (`current`) has an event of its own.

    A version that was read before it was replaced keeps its receipt (and a redelivery restores
    its job specs, as for any known drop). The receipt names no newer version, so a redelivery
    after yet another overwrite writes the same bytes: nothing.
    """
    datasets = settings.buckets.datasets
    info = ObjectInfo(bucket, key, 0, etag)
    receipt = store.get_json_if_exists(datasets, keys.receipt_key(bucket, key, etag))
    if receipt is not None and receipt.get("status") != SUPERSEDED:
        record = store.get_json_if_exists(datasets, keys.drop_key(str(receipt.get("drop_id"))))
        if record is not None:
            return known_drop(store, settings, info, record)
        return IngestOutcome(ALREADY_INGESTED, bucket, key, receipt.get("version"))
    message = (
        f"s3://{bucket}/{key} was overwritten by a newer version before this version (ETag "
        f"{etag}) could be read: nothing of it is ingested; the newer version is ingested by its "
        f"own event"
    )
    newer = f"the key now holds ETag {current}" if current else "the key is now empty"
    log.warning("ingest superseded: %s (%s)", message, newer)
    write_receipt(
        store, settings, info, {"status": SUPERSEDED, "message": message, "version": None}
    )
    return IngestOutcome(SUPERSEDED, bucket, key, warnings=(f"{message} ({newer})",))


# --------------------------------------------------------------------------- parts


def labels_of(table: pa.Table) -> np.ndarray:
    """Target codes 0..2 in the order of contract.TARGET_CLASSES."""
    return corpus.label_codes(table)


# --------------------------------------------------------------------------- rejection


def _unread_id(info: ObjectInfo) -> str:
    """Stand-in for the content hash of a file rejected unread (too large): from its ETag."""
    return hashlib.sha256(f"etag:{info.etag}:size:{info.size}".encode()).hexdigest()[:16]


HOW_TO_FIX = (
    "Fix the problems listed above in the original file (keep the UCI 'Diabetes 130-US "
    "hospitals 1999-2008' layout: the 50 columns named in 'contract.columns', comma-separated, "
    "UTF-8 or ASCII text, one header line, '?' for a missing value), save it as CSV with a name "
    "ending in .csv, and upload it to the raw bucket again. The rejected file itself is kept "
    "next to this report."
)


def contract_summary(settings: Settings) -> dict[str, Any]:
    """What the data contract expects, for the error report."""
    return {
        "format": "CSV text, UTF-8 or ASCII, comma-separated, one header line",
        "file_name": "ends in .csv",
        "max_bytes": settings.max_upload_bytes,
        "columns": list(contract.COLUMNS),
        "id_columns": list(contract.ID_COLUMNS),
        "numeric_columns": list(contract.NUMERIC_FEATURES),
        "missing_marker": contract.MISSING_MARKER,
        "target": {"column": contract.TARGET, "classes": list(contract.TARGET_CLASSES)},
        "rules": [
            "every line has the same 50 fields as the header (any column order)",
            "encounter_id and patient_nbr are whole numbers on every row",
            "numeric columns hold finite numbers or '?'",
            "a feature column that is '?' on every row is accepted with a warning",
            f"{contract.TARGET} is one of {', '.join(contract.TARGET_CLASSES)} on every row",
            "at least one data row; enough patients for a 70/15/15 split",
            "rows whose encounter_id the corpus holds with other values are left out; more "
            "than half such rows reject the file",
        ],
    }


def rejection_report(
    settings: Settings,
    info: ObjectInfo,
    problems: list[str],
    rejected_key: str,
    sha256: str | None,
) -> dict[str, Any]:
    return {
        "status": "rejected",
        "problems": list(problems),
        "original": {
            "bucket": info.bucket,
            "key": info.key,
            "size": info.size,
            "etag": info.etag,
            "sha256": sha256,
        },
        "rejected_copy": {"bucket": settings.buckets.rejected, "key": rejected_key},
        "contract": contract_summary(settings),
        "how_to_fix": HOW_TO_FIX,
    }


def _reject(
    store: ObjectStore,
    settings: Settings,
    info: ObjectInfo,
    problems: list[str],
    content_hash: str,
    sha256: str | None,
    etag: str | None = None,
) -> IngestOutcome:
    """Move the file to the rejected bucket with a report: copy, report, then delete.

    With the event's `etag`, only that version is copied and deleted: a newer version written
    meanwhile stays in the raw bucket for its own event (a copy that finds it makes the outcome
    SUPERSEDED; MinIO ignores If-Match on DELETE, SeaweedFS honours it).
    """
    rejected = settings.buckets.rejected
    copy_key = keys.rejected_key(content_hash, info.key)
    report_key = keys.rejected_report_key(content_hash, info.key)
    written = []
    if not store.exists(rejected, copy_key):
        if etag is None:
            store.copy(info.bucket, info.key, rejected, copy_key)
        else:
            try:
                store.copy(info.bucket, info.key, rejected, copy_key, if_match=etag)
            except PreconditionFailed:
                current = store.head(info.bucket, info.key)
                return _superseded(
                    store, settings, info.bucket, info.key, etag, current and current.etag
                )
        written.append(f"{rejected}/{copy_key}")
    report = rejection_report(settings, info, problems, copy_key, sha256)
    if store.put_if_absent(rejected, report_key, json_bytes(report), JSON_TYPE):
        written.append(f"{rejected}/{report_key}")
    if etag is None:
        store.delete(info.bucket, info.key)
    else:
        try:
            store.delete(info.bucket, info.key, if_match=etag)
        except PreconditionFailed:  # a newer version landed after the copy: it stays
            log.warning(
                "ingest: s3://%s/%s was overwritten while version %s was rejected; the newer "
                "version stays for its own event",
                info.bucket,
                info.key,
                etag,
            )
    return IngestOutcome(REJECTED, info.bucket, info.key, None, tuple(written), 0, tuple(problems))
