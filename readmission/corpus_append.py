"""A drop's way into the corpus: the append under the corpus lease, its crash recovery, the
drop record, the job specs (readmission.jobs) and the receipt.

readmission.ingest routes an event here once it has read and parsed the drop (and holds the
corpus lease for `append_drop`); readmission.corpus decides what a drop adds, this module
writes it. Reads the corpus head, the head's manifest and encounter index, and the manifests
of older versions; writes in the datasets bucket (Parquet parts, encounter index, manifest,
`corpus/head.json`, `drops/<id>.json`, receipts) and the jobs bucket (job specs).

Invariants (the retry and crash rules of readmission.ingest rest on them):

* every object but the head and a receipt has a deterministic key and bytes and is written
  with `put_if_absent`, so a redelivery rewrites nothing;
* a version's manifest is written after its Parquet parts and encounter index, the head moves
  after the manifest, and the drop record, the job specs and the receipt come after the head:
  a crash before the head moves leaves an unreferenced version that the redelivery completes
  (same parent, same bytes: the same version id), and a crash after it is found by
  `_version_with_drop` and finished as the append would have (`_finish_append`);
* a drop that is already decided (`known_drop`) restores its missing job specs and writes its
  receipt, nothing else;
* `append_drop` raises DropRejected before it writes anything;
* a receipt is canonical JSON without timestamps (`write_receipt`): the same outcome writes
  the same bytes, which are not written again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from readmission import contract, corpus, keys
from readmission.config import Settings
from readmission.drop_file import ParsedDrop
from readmission.jobs import job_order, write_jobs
from readmission.storage import ObjectInfo, ObjectStore, json_bytes

log = logging.getLogger(__name__)

PARQUET_TYPE = "application/vnd.apache.parquet"
JSON_TYPE = "application/json"
UPLOAD_THREADS = 4

INGESTED, ALREADY_INGESTED, REJECTED, GONE = "ingested", "already_ingested", "rejected", "gone"
NOTHING_NEW = "nothing_new"
# The event's object version was overwritten before it could be read: nothing of it is ingested.
SUPERSEDED = "superseded"


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


class Timer:
    """Wall seconds of an ingest's phases (IngestOutcome.seconds), summed per phase name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._start
        self._start = now


class DropRejected(Exception):
    """The drop cannot join the corpus (its rows mostly conflict with it, or the corpus would
    not be trainable with it): `append_drop` raises this before writing anything, and the
    caller moves the file to the rejected bucket, still under the corpus lease."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


# --------------------------------------------------------------------------- a known drop


def known_drop(
    store: ObjectStore, settings: Settings, info: ObjectInfo, record: dict[str, Any]
) -> IngestOutcome:
    """A drop with these bytes was decided before: restore its job specs, write the receipt."""
    version = record.get("version")
    written: list[str] = []
    jobs = 0
    if version:
        manifest = store.get_json(settings.buckets.datasets, keys.manifest_key(version))
        written = write_jobs(store, settings, manifest)
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


# --------------------------------------------------------------------------- the append


def _read_head(store: ObjectStore, settings: Settings) -> tuple[dict | None, pa.Table | None]:
    """(manifest, encounter index) of the corpus's newest version, (None, None) if empty."""
    datasets = settings.buckets.datasets
    head = store.get_json_if_exists(datasets, keys.CORPUS_HEAD_KEY)
    if head is None:
        return None, None
    manifest = store.get_json(datasets, keys.manifest_key(head["version"]))
    index = pq.read_table(pa.BufferReader(store.get_bytes(datasets, manifest["encounters_key"])))
    return manifest, index


def append_drop(
    store: ObjectStore,
    settings: Settings,
    info: ObjectInfo,
    sha256: str,
    drop: ParsedDrop,
    timer: Timer,
    scratch: Path,
) -> IngestOutcome:
    """Append the drop's new rows to the corpus as a new version (under the corpus lease).

    DropRejected, before anything is written, if the drop cannot join the corpus. The parts
    are written by streaming the drop's rows through local files under `scratch`
    (`_write_parts`), so memory holds one part at a time per upload thread, not the drop."""
    datasets = settings.buckets.datasets
    parent, parent_index = _read_head(store, settings)
    appended = _version_with_drop(store, settings, parent, sha256[:16])
    if appended is not None:  # appended before a crash that came before the drop's record
        return _finish_append(store, settings, info, appended, drop, timer)
    plan = corpus.plan_drop(drop.encounter_ids, drop.row_hashes, parent_index)
    timer.lap("deduplicate")
    source = {"bucket": info.bucket, "key": info.key, "size": info.size, "sha256": sha256}
    warnings = []
    if drop.missing_columns:
        warnings.append(contract.missing_columns_warning(drop.missing_columns))
    if plan.conflicts and plan.status != corpus.REJECT:
        warnings.append(_conflicts_warning(len(plan.conflicts)))
    if plan.status == corpus.REJECT:
        raise DropRejected(list(plan.problems))
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
    # ... and its schedule of cumulative sets (a corpus made before schedules: 15,000-row steps
    # up to the settings' number of sets, as a new one)
    schedule = (parent or {}).get("schedule") or {
        "linear_sets": settings.cumulative_linear_sets,
        "growth": settings.cumulative_growth,
    }
    if (split_seed, batch_rows) != (settings.split_seed, settings.batch_rows):
        warnings.append(
            f"the corpus was created with SPLIT_SEED={split_seed} and BATCH_ROWS={batch_rows}; "
            f"they stay (the settings say {settings.split_seed} and {settings.batch_rows})"
        )
    try:
        version = corpus.build_version(
            parent=parent,
            parent_index=parent_index,
            rows=drop,
            plan=plan,
            source=source,
            split_seed=split_seed,
            batch_rows=batch_rows,
            algorithms=settings.algorithms,
            job_order=job_order,
            linear_sets=int(schedule["linear_sets"]),
            growth=float(schedule["growth"]),
        )
    except ValueError as error:  # the corpus would not be trainable yet
        raise DropRejected([str(error)]) from error
    timer.lap("split")
    written = _write_parts(store, datasets, drop, version.parts, scratch)
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
    drop: ParsedDrop,
    timer: Timer,
) -> IngestOutcome:
    """Record a drop whose version is in the corpus already, as the append would have."""
    source = manifest["source"]
    warnings = []
    # the same bytes as the append parsed (those read, not the key's newer version if any):
    # the same columns are missing
    if drop.missing_columns:
        warnings.append(contract.missing_columns_warning(drop.missing_columns))
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
        written += write_jobs(store, settings, manifest)
    write_receipt(store, settings, info, record)
    return written


# --------------------------------------------------------------------------- parts


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


def _write_parts(
    store: ObjectStore,
    bucket: str,
    drop: ParsedDrop,
    parts: Sequence[tuple[str, np.ndarray]],
    scratch: Path,
) -> list[str]:
    """put_if_absent each part (key, the drop's row numbers in the part's order).

    The parts missing from the store are filled in one pass over the drop's rows: each block's
    rows go to a local Arrow file per part (with their place in the part); then each part is
    read back, put in order and written as Parquet, UPLOAD_THREADS at a time. The bytes are
    those of `parquet_bytes(rows of the whole drop, taken in the part's order)`."""
    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        present = list(pool.map(lambda part: store.exists(bucket, part[0]), parts))
    missing = [part for part, there in zip(parts, present, strict=True) if not there]
    if not missing:
        return []
    destination = np.full(drop.rows, -1, dtype=np.int32)
    place = np.zeros(drop.rows, dtype=np.int64)
    for number, (_, rows) in enumerate(missing):
        destination[rows] = number
        place[rows] = np.arange(len(rows))
    files = [scratch / f"part-{number:05d}.arrow" for number in range(len(missing))]
    writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
    places: dict[int, list[np.ndarray]] = {number: [] for number in range(len(missing))}
    offset = 0
    try:
        for block in drop.blocks():
            where = destination[offset : offset + block.num_rows]
            order = np.argsort(where, kind="stable")
            numbers, starts = np.unique(where[order], return_index=True)
            for number, chunk in zip(numbers, np.split(order, starts[1:]), strict=True):
                if number < 0:  # rows no part takes (duplicates, conflicts)
                    continue
                if number not in writers:
                    writers[number] = pa.ipc.new_file(str(files[number]), block.schema)
                writers[number].write_table(block.take(pa.array(chunk, pa.int64())))
                places[number].append(place[offset + chunk])
            offset += block.num_rows
    finally:
        for writer in writers.values():
            writer.close()

    def write(number: int) -> str | None:
        key = missing[number][0]
        table = pa.ipc.open_file(pa.memory_map(str(files[number]))).read_all()
        order = np.argsort(np.concatenate(places[number]), kind="stable")
        data = parquet_bytes(table.take(pa.array(order, pa.int64())).combine_chunks())
        del table
        files[number].unlink()
        return f"{bucket}/{key}" if store.put_if_absent(bucket, key, data, PARQUET_TYPE) else None

    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        return [name for name in pool.map(write, range(len(missing))) if name]


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
