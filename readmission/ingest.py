"""The ingest step: a raw CSV in, Parquet batches, a manifest and training job specs out.

Plain Python, no server: `ingest_object(store, settings, bucket, key)` does everything the ingest
function does for one `io.readmission.raw.created` event (see docs/ingest.md).

Idempotent and crash-safe: every output has a deterministic key and deterministic bytes and is
written with `put_if_absent`; the manifest is written after every batch it names and before the
job specs, so its presence means the dataset is complete. A file that breaks the data contract is
moved to the rejected bucket with an error report (copy, report, then delete the original).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from readmission import contract, keys
from readmission.config import Settings
from readmission.split import Split, split_rows
from readmission.storage import ObjectInfo, ObjectStore, json_bytes

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

INGESTED, ALREADY_INGESTED, REJECTED, GONE = "ingested", "already_ingested", "rejected", "gone"


@dataclass(frozen=True)
class IngestOutcome:
    """What one call did; `written` names every object ("bucket/key") this call wrote."""

    status: str
    bucket: str
    key: str
    dataset_id: str | None = None
    written: tuple[str, ...] = ()
    jobs: int = 0
    problems: tuple[str, ...] = ()
    seconds: dict[str, float] = field(default_factory=dict, compare=False)

    def summary(self) -> str:
        text = f"ingest {self.status}: s3://{self.bucket}/{self.key}"
        if self.dataset_id:
            text += f" dataset={self.dataset_id}"
        text += f" jobs={self.jobs} written={len(self.written)}"
        if self.problems:
            text += " problems=" + " | ".join(self.problems)
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


def ingest_object(store: ObjectStore, settings: Settings, bucket: str, key: str) -> IngestOutcome:
    """Ingest one raw CSV (see the module docstring). Raises only on transient failures."""
    timer = _Timer()
    info = store.head(bucket, key)
    if info is None:  # already moved to rejected, or deleted: a redelivery has nothing to do
        return IngestOutcome(GONE, bucket, key)
    if info.size > settings.max_upload_bytes:
        problem = (
            f"the file is {info.size:,} bytes, more than the limit of "
            f"{settings.max_upload_bytes:,} bytes (MAX_UPLOAD_BYTES)"
        )
        return _reject(store, settings, info, [problem], _unread_id(info), sha256=None)
    data = store.get_bytes_if_exists(bucket, key)
    if data is None:  # deleted between HEAD and GET
        return IngestOutcome(GONE, bucket, key)
    info = replace(info, size=len(data))  # describe the bytes read, even if replaced since HEAD
    timer.lap("download")
    sha256 = hashlib.sha256(data).hexdigest()
    if not key.lower().endswith(".csv"):
        problem = f"the file name {key!r} does not end in .csv; only CSV files are ingested"
        return _reject(store, settings, info, [problem], sha256[:16], sha256)
    dataset_id = keys.content_id(data)
    manifest = store.get_json_if_exists(settings.buckets.datasets, keys.manifest_key(dataset_id))
    if manifest is not None:
        written = _write_jobs(store, settings, manifest)
        write_receipt(store, settings, bucket, key, info.etag, dataset_id)
        return IngestOutcome(
            ALREADY_INGESTED, bucket, key, dataset_id, tuple(written), len(manifest["jobs"])
        )
    try:
        table = contract.parse_csv_table(data)
        timer.lap("parse")
        split = _split(table, settings.split_seed)
        timer.lap("split")
    except contract.ContractViolation as violation:
        return _reject(store, settings, info, violation.problems, sha256[:16], sha256)
    return _ingest_table(store, settings, info, sha256, table, split, timer)


def _ingest_table(
    store: ObjectStore,
    settings: Settings,
    info: ObjectInfo,
    sha256: str,
    table: pa.Table,
    split: Split,
    timer: _Timer,
) -> IngestOutcome:
    dataset_id = sha256[:16]
    datasets = settings.buckets.datasets
    parts = _parts(dataset_id, table, split, settings.batch_rows)
    written = _write_parallel(
        store, datasets, [(k, lambda t=t: parquet_bytes(t)) for k, t in parts]
    )
    timer.lap("write_parquet")
    manifest = build_manifest(dataset_id, info, sha256, table, split, settings)
    if store.put_if_absent(
        datasets, keys.manifest_key(dataset_id), json_bytes(manifest), JSON_TYPE
    ):
        written.append(f"{datasets}/{keys.manifest_key(dataset_id)}")
    written += _write_jobs(store, settings, manifest)
    write_receipt(store, settings, info.bucket, info.key, info.etag, dataset_id)
    timer.lap("write_manifest_jobs")
    return IngestOutcome(
        INGESTED,
        info.bucket,
        info.key,
        dataset_id,
        tuple(written),
        len(manifest["jobs"]),
        seconds=timer.seconds,
    )


# --------------------------------------------------------------------------- split and parts


def labels_of(table: pa.Table) -> np.ndarray:
    """Target codes 0..2 in the order of contract.TARGET_CLASSES."""
    codes = pc.index_in(table.column(contract.TARGET), value_set=pa.array(contract.TARGET_CLASSES))
    return codes.to_numpy()


def _split(table: pa.Table, seed: int) -> Split:
    patients = table.column(contract.GROUP_COLUMN).to_numpy()
    labels = labels_of(table)
    split = split_rows(patients, labels, seed, len(contract.TARGET_CLASSES))
    n_patients = len(np.unique(patients))
    if not (len(split.train) and len(split.validation) and len(split.test)):
        raise contract.ContractViolation(
            [
                f"the file has {table.num_rows} rows from {n_patients} patients: too few to split "
                f"them 70/15/15 into non-empty training, validation and test sets; upload a file "
                f"with more patients"
            ]
        )
    missing = [
        name
        for code, name in enumerate(contract.TARGET_CLASSES)
        if not np.any(labels[split.train] == code)
    ]
    if missing:
        raise contract.ContractViolation(
            [
                f"the training split has no row with {contract.TARGET} = "
                f"{', '.join(missing)}: every class ({', '.join(contract.TARGET_CLASSES)}) needs "
                f"rows from several patients; upload a file with more patients"
            ]
        )
    return split


def _parts(
    dataset_id: str, table: pa.Table, split: Split, batch_rows: int
) -> list[tuple[str, pa.Table]]:
    """(key, rows) of every Parquet object: the batches, validation and test."""
    parts = [
        (keys.batch_key(dataset_id, i), table.take(rows))
        for i, rows in enumerate(split.batches(batch_rows))
    ]
    parts.append((keys.validation_key(dataset_id), table.take(split.validation)))
    parts.append((keys.test_key(dataset_id), table.take(split.test)))
    return parts


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


# --------------------------------------------------------------------------- documents


def _class_counts(labels: np.ndarray) -> dict[str, int]:
    counts = np.bincount(labels, minlength=len(contract.TARGET_CLASSES))
    return {name: int(counts[i]) for i, name in enumerate(contract.TARGET_CLASSES)}


def job_order(set_rows: Sequence[int], algorithms: Iterable[str]) -> list[tuple[int, str]]:
    """(cumulative index, algorithm) pairs, costliest job first. `set_rows[i]` is the number of
    training rows of cumulative set i; estimated cost = rows x ALGORITHM_COST_PER_1000_ROWS
    (an unlisted algorithm counts as the costliest); ties keep the bigger index, then the
    order of `algorithms`."""
    algorithms = list(dict.fromkeys(algorithms))
    costliest = max(ALGORITHM_COST_PER_1000_ROWS.values())

    def cost(pair: tuple[int, str]) -> float:
        index, algorithm = pair
        return set_rows[index] * ALGORITHM_COST_PER_1000_ROWS.get(algorithm, costliest)

    pairs = [(i, a) for i in range(len(set_rows)) for a in algorithms]
    return sorted(pairs, key=lambda pair: (-cost(pair), -pair[0], algorithms.index(pair[1])))


def build_manifest(
    dataset_id: str,
    info: ObjectInfo,
    sha256: str,
    table: pa.Table,
    split: Split,
    settings: Settings,
) -> dict[str, Any]:
    """The manifest document of docs/design.md (canonical JSON, no timestamps)."""
    labels = labels_of(table)
    patients = table.column(contract.GROUP_COLUMN).to_numpy()
    batches = split.batches(settings.batch_rows)
    batch_docs = [
        {"index": i, "key": keys.batch_key(dataset_id, i), "rows": len(rows)}
        for i, rows in enumerate(batches)
    ]
    cumulative = [
        {
            "index": i,
            "rows": sum(b["rows"] for b in batch_docs[: i + 1]),
            "batch_keys": [b["key"] for b in batch_docs[: i + 1]],
        }
        for i in range(len(batch_docs))
    ]
    parts = {"train": split.train, "validation": split.validation, "test": split.test}
    return {
        "dataset_id": dataset_id,
        "source": {"bucket": info.bucket, "key": info.key, "size": info.size, "sha256": sha256},
        "split_seed": settings.split_seed,
        "batch_rows": settings.batch_rows,
        "rows": {"total": table.num_rows, **{name: len(rows) for name, rows in parts.items()}},
        "patients": {
            "total": len(np.unique(patients)),
            **{name: len(np.unique(patients[rows])) for name, rows in parts.items()},
        },
        "class_counts": {name: _class_counts(labels[rows]) for name, rows in parts.items()},
        "batches": batch_docs,
        "cumulative_sets": cumulative,
        "validation": {"key": keys.validation_key(dataset_id), "rows": len(split.validation)},
        "test": {"key": keys.test_key(dataset_id), "rows": len(split.test)},
        "algorithms": list(dict.fromkeys(settings.algorithms)),
        "jobs": [
            keys.job_key(dataset_id, i, a)
            for i, a in job_order([c["rows"] for c in cumulative], settings.algorithms)
        ],
    }


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
        "validation_key": manifest["validation"]["key"],
        "test_key": manifest["test"]["key"],
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
            "no feature column is '?' on every row",
            f"{contract.TARGET} is one of {', '.join(contract.TARGET_CLASSES)} on every row",
            "at least one data row; enough patients for a 70/15/15 split",
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
) -> IngestOutcome:
    """Move the file to the rejected bucket with a report: copy, report, then delete."""
    rejected = settings.buckets.rejected
    copy_key = keys.rejected_key(content_hash, info.key)
    report_key = keys.rejected_report_key(content_hash, info.key)
    written = []
    if not store.exists(rejected, copy_key):
        store.copy(info.bucket, info.key, rejected, copy_key)
        written.append(f"{rejected}/{copy_key}")
    report = rejection_report(settings, info, problems, copy_key, sha256)
    if store.put_if_absent(rejected, report_key, json_bytes(report), JSON_TYPE):
        written.append(f"{rejected}/{report_key}")
    store.delete(info.bucket, info.key)
    return IngestOutcome(REJECTED, info.bucket, info.key, None, tuple(written), 0, tuple(problems))


# --------------------------------------------------------------------------- receipts


def receipt_document(bucket: str, key: str, etag: str, dataset_id: str) -> dict[str, Any]:
    """What an ingest receipt says: this raw object version is (part of) that dataset."""
    return {"bucket": bucket, "key": key, "etag": etag.strip('"'), "dataset_id": dataset_id}


def write_receipt(
    store: ObjectStore, settings: Settings, bucket: str, key: str, etag: str, dataset_id: str
) -> str:
    """Record that this raw object version was ingested; returns the receipt's key.

    Written once the dataset's manifest and job specs exist (keys.receipt_key names it by
    bucket, key and ETag), so the reconciler knows the object needs no event. Canonical JSON
    without timestamps: a redelivery writes nothing. The datasets bucket fires no event.
    """
    datasets = settings.buckets.datasets
    receipt = keys.receipt_key(bucket, key, etag)
    data = json_bytes(receipt_document(bucket, key, etag, dataset_id))
    if store.get_bytes_if_exists(datasets, receipt) != data:
        store.put_bytes(datasets, receipt, data, JSON_TYPE)
    return receipt
