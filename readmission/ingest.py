"""The ingest step: a raw CSV in, appended to the corpus as a new version with its job specs.

Plain Python, no server: `ingest_object(store, settings, bucket, key, etag=...)` does everything
the ingest function does for one `io.readmission.raw.created` event (see docs/ingest.md).
readmission.corpus decides what a drop adds (deduplication by encounter_id, the stable split, the
new batches); this module reads and writes the objects.

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
  reconciler) last.

A file that breaks the data contract, or whose rows mostly conflict with the corpus, is moved to
the rejected bucket with an error report (copy, report, then delete the original).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from readmission import contract, corpus, keys, lease
from readmission.config import Settings
from readmission.storage import ObjectInfo, ObjectStore, PreconditionFailed, json_bytes

log = logging.getLogger(__name__)

PARQUET_TYPE = "application/vnd.apache.parquet"
JSON_TYPE = "application/json"
# Fit seconds per 1,000 training rows of each algorithm on one core (measured with
# scripts/bench_pipeline.py on the real CSV). Job specs are written in decreasing estimated
# cost: the broker dispatches FIFO, and longest-processing-time-first keeps the parallel
# training makespan near its lower bound. An algorithm not listed counts as the costliest.
ALGORITHM_COST_PER_1000_ROWS = {
    "gradient_boosting": 0.69,
    "logistic_regression": 0.15,
    "random_forest": 0.076,
    "hist_gradient_boosting": 0.1,
    "decision_tree": 0.017,
}
UPLOAD_THREADS = 4
# Appends of concurrent drops wait for each other this long (an append of the whole UCI file
# holds the lease for a few seconds).
CORPUS_LEASE_TTL_SECONDS = 60.0
CORPUS_LEASE_WAIT_SECONDS = 300.0

INGESTED, ALREADY_INGESTED, REJECTED, GONE = "ingested", "already_ingested", "rejected", "gone"
NOTHING_NEW = "nothing_new"
# The event's object version was overwritten before it could be read: nothing of it is ingested.
SUPERSEDED = "superseded"
# S3 object keys are at most 1,024 bytes of UTF-8.
MAX_KEY_BYTES = 1024


def unreadable_key_problem(key: str) -> str | None:
    """Why no object store can ever serve an object under `key`, or None if one may.

    SeaweedFS and MinIO answer 400 InvalidRequest to a key with a `.` or `..` path segment
    (MinIO trims blanks around a segment; SeaweedFS also splits on backslashes) or a NUL, a
    key with no UTF-8 spelling cannot be sent at all, and S3 keys are at most 1,024 bytes: an
    event naming such a key is malformed (400), since no retry can ever read it.
    """
    try:
        size = len(key.encode())
    except UnicodeEncodeError:
        return f"the key {key!r} has no UTF-8 spelling"
    if "\x00" in key:
        return f"the key {key!r} contains a NUL character"
    if size > MAX_KEY_BYTES:
        return f"the key is {size:,} bytes long, more than the {MAX_KEY_BYTES:,} S3 allows"
    segments = key.replace("\\", "/").split("/")
    if any(segment.strip() in (".", "..") for segment in segments):
        return f"the key {key!r} has a '.' or '..' path segment"
    return None


@dataclass(frozen=True)
class IngestOutcome:
    """What one call did; `written` names every object ("bucket/key") this call wrote.
    `dataset_id` is the corpus version the drop made (or is in), None if it made none."""

    status: str
    bucket: str
    key: str
    dataset_id: str | None = None
    written: tuple[str, ...] = ()
    jobs: int = 0
    problems: tuple[str, ...] = ()
    seconds: dict[str, float] = field(default_factory=dict, compare=False)
    warnings: tuple[str, ...] = ()

    def summary(self) -> str:
        text = f"ingest {self.status}: s3://{self.bucket}/{self.key}"
        if self.dataset_id:
            text += f" version={self.dataset_id}"
        text += f" jobs={self.jobs} written={len(self.written)}"
        if self.problems:
            text += " problems=" + " | ".join(self.problems)
        if self.warnings:
            text += " warnings=" + " | ".join(self.warnings)
        if self.seconds:
            text += " " + " ".join(f"{k}={v:.2f}s" for k, v in self.seconds.items())
        return text


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._start
        self._start = now


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
    timer = _Timer()
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
    if expected is None:
        data = store.get_bytes_if_exists(bucket, key)
    else:
        try:  # If-Match: overwritten between HEAD and GET is superseded too
            data = store.get_version(bucket, key, expected)
        except PreconditionFailed:
            current = store.head(bucket, key)
            return _superseded(store, settings, bucket, key, expected, current and current.etag)
    if data is None:  # deleted between HEAD and GET
        return IngestOutcome(GONE, bucket, key)
    info = replace(info, size=len(data))  # describe the bytes read, even if replaced since HEAD
    timer.lap("download")
    sha256 = hashlib.sha256(data).hexdigest()
    if not key.lower().endswith(".csv"):
        problem = f"the file name {key!r} does not end in .csv; only CSV files are ingested"
        return _reject(store, settings, info, [problem], sha256[:16], sha256, etag=expected)
    drop_id = keys.content_id(data)
    record = store.get_json_if_exists(settings.buckets.datasets, keys.drop_key(drop_id))
    if record is not None:
        return _known_drop(store, settings, info, record)
    try:
        table = contract.parse_csv_table(data)
    except contract.ContractViolation as violation:
        return _reject(
            store, settings, info, violation.problems, sha256[:16], sha256, etag=expected
        )
    timer.lap("parse")
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
            return _known_drop(store, settings, info, record)
        return _append(store, settings, info, sha256, table, timer, expected)


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
            return _known_drop(store, settings, info, record)
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


def _known_drop(
    store: ObjectStore, settings: Settings, info: ObjectInfo, record: dict[str, Any]
) -> IngestOutcome:
    """A drop with these bytes was decided before: restore its job specs, write the receipt."""
    version = record.get("version")
    written: list[str] = []
    jobs = 0
    if version:
        manifest = store.get_json(settings.buckets.datasets, keys.manifest_key(version))
        written = _write_jobs(store, settings, manifest)
        jobs = len(manifest["jobs"])
    same_object = (record.get("source") or {}).get("key") == info.key and (
        record.get("source") or {}
    ).get("bucket") == info.bucket
    receipt = dict(record)
    if not same_object:
        receipt["status"] = ALREADY_INGESTED
        receipt["message"] = (
            f"the same bytes were ingested before as s3://{record['source']['bucket']}/"
            f"{record['source']['key']}: nothing is appended or trained again"
        )
    write_receipt(store, settings, info, receipt)
    return IngestOutcome(ALREADY_INGESTED, info.bucket, info.key, version, tuple(written), jobs)


def _read_head(store: ObjectStore, settings: Settings) -> tuple[dict | None, pa.Table | None]:
    """(manifest, encounter index) of the corpus's newest version, (None, None) if empty."""
    datasets = settings.buckets.datasets
    head = store.get_json_if_exists(datasets, keys.CORPUS_HEAD_KEY)
    if head is None:
        return None, None
    manifest = store.get_json(datasets, keys.manifest_key(head["version"]))
    index = pq.read_table(pa.BufferReader(store.get_bytes(datasets, manifest["encounters_key"])))
    return manifest, index


def _append(
    store: ObjectStore,
    settings: Settings,
    info: ObjectInfo,
    sha256: str,
    table: pa.Table,
    timer: _Timer,
    etag: str | None = None,
) -> IngestOutcome:
    """Append the drop's new rows to the corpus as a new version (under the corpus lease)."""
    datasets = settings.buckets.datasets
    parent, parent_index = _read_head(store, settings)
    appended = _version_with_drop(store, settings, parent, sha256[:16])
    if appended is not None:  # appended before a crash that came before the drop's record
        return _finish_append(store, settings, info, appended, table, timer)
    plan = corpus.plan_drop(
        table.column("encounter_id").to_numpy(zero_copy_only=False),
        corpus.row_hashes(table),
        parent_index,
    )
    timer.lap("deduplicate")
    source = {"bucket": info.bucket, "key": info.key, "size": info.size, "sha256": sha256}
    warnings = []
    missing = contract.missing_feature_columns(table)
    if missing:
        warnings.append(contract.missing_columns_warning(missing))
    if plan.conflicts and plan.status != corpus.REJECT:
        warnings.append(_conflicts_warning(len(plan.conflicts)))
    if plan.status == corpus.REJECT:
        return _reject(store, settings, info, list(plan.problems), sha256[:16], sha256, etag=etag)
    record: dict[str, Any] = {
        "status": INGESTED,
        "drop_id": sha256[:16],
        "source": source,
        "rows": plan.report(),
        "warnings": [w for w in warnings if w],
        "parent": parent["version"] if parent else None,
        "version": None,
    }
    if plan.status == corpus.NOTHING_NEW:
        record["status"] = NOTHING_NEW
        record["message"] = (
            f"every row of the file is already in the corpus (version "
            f"{record['parent']}): no new version, nothing trained"
        )
        written = _record_drop(store, settings, info, record)
        return IngestOutcome(
            NOTHING_NEW, info.bucket, info.key, None, tuple(written), warnings=tuple(warnings)
        )
    # The corpus keeps the split seed and batch size it was created with: another SPLIT_SEED
    # would move patients between splits, another BATCH_ROWS would cut other batches.
    split_seed = int(parent["split_seed"]) if parent else settings.split_seed
    batch_rows = int(parent["batch_rows"]) if parent else settings.batch_rows
    if (split_seed, batch_rows) != (settings.split_seed, settings.batch_rows):
        warnings.append(
            f"the corpus was created with SPLIT_SEED={split_seed} and BATCH_ROWS={batch_rows}; "
            f"they stay (the settings say {settings.split_seed} and {settings.batch_rows})"
        )
    try:
        version = corpus.build_version(
            parent=parent,
            parent_index=parent_index,
            table=table,
            plan=plan,
            source=source,
            split_seed=split_seed,
            batch_rows=batch_rows,
            algorithms=settings.algorithms,
            job_order=job_order,
        )
    except ValueError as error:  # the corpus would not be trainable yet
        return _reject(store, settings, info, [str(error)], sha256[:16], sha256, etag=etag)
    timer.lap("split")
    written = _write_parallel(
        store, datasets, [(k, lambda t=t: parquet_bytes(t)) for k, t in version.parts]
    )
    index_key = keys.encounters_key(version.version)
    if store.put_if_absent(datasets, index_key, parquet_bytes(version.index), PARQUET_TYPE):
        written.append(f"{datasets}/{index_key}")
    timer.lap("write_parquet")
    manifest_key = keys.manifest_key(version.version)
    if store.put_if_absent(datasets, manifest_key, json_bytes(version.manifest), JSON_TYPE):
        written.append(f"{datasets}/{manifest_key}")
    head = {"version": version.version, "number": version.manifest["number"]}
    store.put_bytes(datasets, keys.CORPUS_HEAD_KEY, json_bytes(head), JSON_TYPE)
    written.append(f"{datasets}/{keys.CORPUS_HEAD_KEY}")
    record["version"] = version.version
    record["added"] = version.manifest["added"]
    written += _record_drop(store, settings, info, record, version.manifest)
    timer.lap("write_manifest_jobs")
    return IngestOutcome(
        INGESTED,
        info.bucket,
        info.key,
        version.version,
        tuple(written),
        len(version.manifest["jobs"]),
        seconds=timer.seconds,
        warnings=tuple(warnings),
    )


def _version_with_drop(
    store: ObjectStore, settings: Settings, head: dict[str, Any] | None, drop_id: str
) -> dict[str, Any] | None:
    """The manifest of the version that appended `drop_id`, if the corpus holds it."""
    manifest = head
    while manifest is not None and drop_id in manifest["drops"]:
        if manifest["drops"][-1] == drop_id:
            return manifest
        manifest = store.get_json(settings.buckets.datasets, keys.manifest_key(manifest["parent"]))
    return None


def _finish_append(
    store: ObjectStore,
    settings: Settings,
    info: ObjectInfo,
    manifest: dict[str, Any],
    table: pa.Table,
    timer: _Timer,
) -> IngestOutcome:
    """Record a drop whose version is in the corpus already, as the append would have."""
    source = manifest["source"]
    warnings = []
    # the same bytes as the append parsed (those read, not the key's newer version if any):
    # the same columns are missing
    missing = contract.missing_feature_columns(table)
    if missing:
        warnings.append(contract.missing_columns_warning(missing))
    added = manifest["added"]
    if added["conflicts"]:
        warnings.append(_conflicts_warning(added["conflicts"]))
    record = {
        "status": INGESTED,
        "drop_id": manifest["drops"][-1],
        "source": source,
        "rows": {k: added[k] for k in ("rows", "new", "duplicates", "conflicts")}
        | {"conflicting_rows": added["conflicting_rows"]},
        "warnings": [w for w in warnings if w],
        "parent": manifest["parent"],
        "version": manifest["version"],
        "added": added,
    }
    written = _record_drop(store, settings, info, record, manifest)
    timer.lap("write_manifest_jobs")
    return IngestOutcome(
        INGESTED,
        info.bucket,
        info.key,
        manifest["version"],
        tuple(written),
        len(manifest["jobs"]),
        seconds=timer.seconds,
        warnings=tuple(w for w in warnings if w),
    )


def _conflicts_warning(count: int) -> str:
    return (
        f"{count:,} rows conflict with the corpus or each other (same encounter_id, different "
        f"values) and were left out; see conflicting_rows"
    )


def _record_drop(
    store: ObjectStore,
    settings: Settings,
    info: ObjectInfo,
    record: dict[str, Any],
    manifest: dict[str, Any] | None = None,
) -> list[str]:
    """Record what became of the drop, then write its job specs and its receipt."""
    datasets = settings.buckets.datasets
    written = []
    drop_key = keys.drop_key(record["drop_id"])
    if store.put_if_absent(datasets, drop_key, json_bytes(record), JSON_TYPE):
        written.append(f"{datasets}/{drop_key}")
    if manifest is not None:
        written += _write_jobs(store, settings, manifest)
    write_receipt(store, settings, info, record)
    return written


# --------------------------------------------------------------------------- parts


def labels_of(table: pa.Table) -> np.ndarray:
    """Target codes 0..2 in the order of contract.TARGET_CLASSES."""
    return corpus.label_codes(table)


def parquet_bytes(table: pa.Table) -> bytes:
    """Deterministic Parquet: same rows in, byte-identical file out (no timestamps inside)."""
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        compression="zstd",
        compression_level=3,
        use_dictionary=True,
        write_statistics=True,
        row_group_size=max(1, table.num_rows),
        data_page_version="2.0",
        version="2.6",
    )
    return sink.getvalue().to_pybytes()


def _write_parallel(
    store: ObjectStore, bucket: str, items: Iterable[tuple[str, Callable[[], bytes]]]
) -> list[str]:
    """put_if_absent each (key, make bytes) concurrently; the bytes are built only if needed."""

    def write(item: tuple[str, Callable[[], bytes]]) -> str | None:
        key, make = item
        if store.exists(bucket, key):
            return None
        return f"{bucket}/{key}" if store.put_if_absent(bucket, key, make(), PARQUET_TYPE) else None

    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        return [name for name in pool.map(write, items) if name]


# --------------------------------------------------------------------------- job specs


def job_order(
    set_rows: Sequence[int],
    algorithms: Iterable[str],
    reused_sets: int = 0,
    fitted_algorithms: Iterable[str] | None = None,
) -> list[tuple[int, str]]:
    """(cumulative index, algorithm) pairs, costliest job first. `set_rows[i]` is the number of
    training rows of cumulative set i; estimated cost = rows x ALGORITHM_COST_PER_1000_ROWS
    (an unlisted algorithm counts as the costliest). Sets below `reused_sets` were fitted for
    an earlier version with `fitted_algorithms` (default: all) and are only re-scored: they
    cost next to nothing and come last. Ties keep the bigger index, then the order of
    `algorithms`."""
    algorithms = list(dict.fromkeys(algorithms))
    fitted = set(algorithms if fitted_algorithms is None else fitted_algorithms)
    costliest = max(ALGORITHM_COST_PER_1000_ROWS.values())

    def cost(pair: tuple[int, str]) -> float:
        index, algorithm = pair
        if index < reused_sets and algorithm in fitted:
            return 0.0
        return set_rows[index] * ALGORITHM_COST_PER_1000_ROWS.get(algorithm, costliest)

    pairs = [(i, a) for i in range(len(set_rows)) for a in algorithms]
    return sorted(pairs, key=lambda pair: (-cost(pair), -pair[0], algorithms.index(pair[1])))


def job_spec(manifest: dict[str, Any], job_key: str, datasets_bucket: str) -> dict[str, Any]:
    """The job spec named `job_key`, derived from the manifest alone."""
    dataset_id, index, algorithm = keys.parse_job_key(job_key)
    cumulative = manifest["cumulative_sets"][index]
    return {
        "dataset_id": dataset_id,
        "cumulative_index": index,
        "algorithm": algorithm,
        "training_rows": cumulative["rows"],
        "batch_keys": cumulative["batch_keys"],
        "validation_keys": manifest["validation"]["keys"],
        "test_keys": manifest["test"]["keys"],
        "datasets_bucket": datasets_bucket,
        "manifest_key": keys.manifest_key(dataset_id),
    }


def _write_jobs(store: ObjectStore, settings: Settings, manifest: dict[str, Any]) -> list[str]:
    """Write the missing job specs one by one, in the manifest's (costliest first) order."""
    written = []
    jobs_bucket = settings.buckets.jobs
    for job_key in manifest["jobs"]:
        spec = job_spec(manifest, job_key, settings.buckets.datasets)
        if store.put_if_absent(jobs_bucket, job_key, json_bytes(spec), JSON_TYPE):
            written.append(f"{jobs_bucket}/{job_key}")
    return written


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


# --------------------------------------------------------------------------- receipts


def write_receipt(
    store: ObjectStore, settings: Settings, info: ObjectInfo, document: dict[str, Any]
) -> str:
    """Record what ingesting this raw object version did; returns the receipt's key.

    Written last (keys.receipt_key names it by bucket, key and ETag), so the reconciler knows
    the object needs no event. It says which version the drop made (or that it added nothing),
    the row counts, the conflicting rows and the warnings. Canonical JSON without timestamps:
    a redelivery writes nothing. The datasets bucket fires no event.
    """
    datasets = settings.buckets.datasets
    receipt = keys.receipt_key(info.bucket, info.key, info.etag)
    body = {
        **document,
        "object": {"bucket": info.bucket, "key": info.key, "etag": info.etag.strip('"')},
    }
    data = json_bytes(body)
    if store.get_bytes_if_exists(datasets, receipt) != data:
        store.put_bytes(datasets, receipt, data, JSON_TYPE)
    return receipt
