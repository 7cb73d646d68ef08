"""Drift reports in the object store: the champion's training reference written by the
aggregator, and each drop's report written by ingest (docs/monitoring.md).

`write_reference(store, settings, manifest, best)` profiles the training rows of the selected
result's cumulative set (readmission.drift.build_profile; a systematic sample of at most
DRIFT_SAMPLE_ROWS of them) and writes `models/<v>/reference.json`
(the metadata of the version names it under `reference`). `write_drop_report(store, settings,
drop_id, rows)` compares a drop's rows (ingest passes a systematic sample of at most
DRIFT_SAMPLE_ROWS of them) with the profile that `champion/metadata.json` names and
writes, in the models bucket:

* `reports/<drop>/drift.md` (the report for a person);
* `reports/<drop>/drift-detected.json` (the report's summary), only when something drifted: its
  bucket notification is the CloudEvent `io.readmission.drift.detected`;
* `reports/latest-drift.json` (a copy of the report; the predict function polls it);
* LAST `reports/<drop>/drift.json` (the report): its presence means the drop's report is done,
  and a redelivery writes nothing.

Idempotent: every object has a deterministic key and, for the same champion, the same bytes;
before `drift.json` exists the others are written only if their bytes differ. A drop with no
champion to compare with gets a report saying so (status `no_reference`).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from readmission import drift, keys
from readmission.config import Settings
from readmission.storage import ObjectStore, json_bytes

log = logging.getLogger(__name__)

JSON_TYPE = "application/json"
MARKDOWN_TYPE = "text/markdown; charset=utf-8"


def thresholds(settings: Settings) -> drift.Thresholds:
    return drift.Thresholds(watch=settings.drift_psi_watch, drifted=settings.drift_psi_drifted)


# --------------------------------------------------------------------------- the reference


def training_rows(
    store: ObjectStore, settings: Settings, manifest: Mapping[str, Any], index: int
) -> pa.Table:
    """A systematic sample (drift.SystematicSample) of at most `settings.drift_sample_rows` of
    the training rows of cumulative set `index` of a version (all of them when the set is no
    larger), the set's batches read in order one at a time (a batch with no picked row is not
    read), so memory holds the sample and one batch whatever the set's size."""
    batch_keys = manifest["cumulative_sets"][index]["batch_keys"]
    batch_rows = {b["key"]: int(b["rows"]) for b in manifest["batches"]}
    total = sum(batch_rows[key] for key in batch_keys)
    sample = drift.SystematicSample(total, settings.drift_sample_rows)
    bucket = settings.buckets.datasets
    for key in batch_keys:
        if sample.wanted(batch_rows[key]):
            sample.add(pq.read_table(io.BytesIO(store.get_bytes(bucket, key))))
        else:
            sample.skip(batch_rows[key])
    return sample.table()


def write_reference(
    store: ObjectStore, settings: Settings, manifest: Mapping[str, Any], best: Mapping[str, Any]
) -> dict[str, Any]:
    """Profile the selected model's training rows and write `models/<v>/reference.json`;
    returns what the metadata says of it: {"key", "rows"}."""
    dataset_id = str(manifest["dataset_id"])
    index = int(best["cumulative_index"])
    rows = training_rows(store, settings, manifest, index)
    source = {
        "corpus_version": dataset_id,
        "cumulative_index": index,
        "training_rows": int(manifest["cumulative_sets"][index]["rows"]),
    }
    profile = drift.build_profile(rows, source=source)
    key = keys.reference_key(dataset_id)
    store.put_if_changed(settings.buckets.models, key, json_bytes(profile), JSON_TYPE)
    return {"key": key, "rows": int(profile["rows"])}


# --------------------------------------------------------------------------- a drop's report


def champion_reference(
    store: ObjectStore, settings: Settings
) -> tuple[dict[str, Any] | None, dict[str, Any], str]:
    """(the champion's profile or None, what the report says of the model, why None)."""
    models = settings.buckets.models
    metadata = store.get_json_if_exists(models, keys.CHAMPION_METADATA_KEY)
    if metadata is None:
        return None, {}, "there is no champion yet: nothing to compare the drop with"
    named = {
        "model_version": str(metadata.get("version")),
        "corpus_version": metadata.get("dataset_id"),
        "algorithm": metadata.get("algorithm"),
    }
    reference = metadata.get("reference")
    key = reference.get("key") if isinstance(reference, dict) else None
    if not isinstance(key, str):
        why = f"the champion (version {named['model_version']}) has no training reference"
        return None, named, why
    profile = store.get_json_if_exists(models, key)
    if profile is None:
        return None, named, f"the champion's training reference s3://{models}/{key} is missing"
    return profile, {**named, "key": key}, ""


def build_report(
    store: ObjectStore, settings: Settings, drop_id: str, rows: pa.Table, drop_rows: int
) -> dict[str, Any]:
    """The drop's report against the champion's reference (or one saying there is none);
    `rows` are the compared rows, a sample of the drop's `drop_rows` or all of them."""
    profile, named, why = champion_reference(store, settings)
    if profile is None:
        report = drift.no_reference_report(
            drop_id, rows.num_rows, thresholds(settings), why, drop_rows=drop_rows
        )
        report["reference"] = named or None
        return report
    return drift.compare(
        profile,
        rows,
        thresholds(settings),
        drop_id=drop_id,
        reference=named,
        drop_rows=drop_rows,
    )


def write_drop_report(
    store: ObjectStore,
    settings: Settings,
    drop_id: str,
    rows: pa.Table | Callable[[], tuple[pa.Table, int]],
) -> list[str]:
    """Write the drop's report unless it is done (see the module docstring); returns the
    objects ("bucket/key") this call wrote. `rows` are the drop's rows, or a function giving
    (the rows to compare, the drop's row count): a bounded sample of a large drop (ingest's
    `ParsedDrop.sample`), called only when the report is missing."""
    models = settings.buckets.models
    report_key = keys.drift_report_key(drop_id)
    if store.exists(models, report_key):
        return []
    table, drop_rows = rows() if callable(rows) else (rows, rows.num_rows)
    report = build_report(store, settings, drop_id, table, drop_rows)
    written = []
    markdown = drift.render_markdown(report).encode()
    objects = [(keys.drift_report_key(drop_id, "md"), markdown, MARKDOWN_TYPE)]
    if report["status"] == drift.DRIFTED:
        summary = {
            **drift.summary(report),
            "report": {"bucket": models, "json": report_key, "md": objects[0][0]},
        }
        objects.append((keys.drift_alert_key(drop_id), json_bytes(summary), JSON_TYPE))
    objects.append((keys.LATEST_DRIFT_KEY, json_bytes(report), JSON_TYPE))
    for key, data, kind in objects:
        if store.put_if_changed(models, key, data, kind):
            written.append(f"{models}/{key}")
    if store.put_if_absent(models, report_key, json_bytes(report), JSON_TYPE):
        written.append(f"{models}/{report_key}")
    log.info("drift report of drop %s: %s (%s)", drop_id, report["status"], report["message"])
    return written


# --------------------------------------------------------------------------- MLflow


def report_files(
    store: ObjectStore, settings: Settings, manifest: Mapping[str, Any]
) -> dict[str, bytes]:
    """The drift report of the drop that made a corpus version ({"drift.json", "drift.md"}), or
    {} if ingest has not written it (the aggregator then logs none)."""
    drop_id = str(manifest["drops"][-1])
    models = settings.buckets.models
    report = store.get_bytes_if_exists(models, keys.drift_report_key(drop_id))
    if report is None:
        log.warning("no drift report for drop %s: none is logged to MLflow", drop_id)
        return {}
    files = {"drift.json": report}
    markdown = store.get_bytes_if_exists(models, keys.drift_report_key(drop_id, "md"))
    if markdown is not None:
        files["drift.md"] = markdown
    return files


def tag_version(client: Any, settings: Settings, version: str, files: Mapping[str, bytes]) -> None:
    """The drift report's verdict on the registered model version's tags (`drift.status`,
    `drift.drop`, `drift.max_psi`, `drift.drifted`); nothing without a report. `client` is an
    mlflow.MlflowClient (not imported here: ingest imports this module)."""
    if "drift.json" not in files:
        return
    report = json.loads(files["drift.json"])
    tags = {
        "drift.drop": str(report.get("drop_id")),
        "drift.status": str(report.get("status")),
        "drift.max_psi": json.dumps(report.get("max_psi")),
        "drift.drifted": ",".join(report.get("drifted") or []),
    }
    for key, value in tags.items():
        client.set_model_version_tag(settings.registered_model, version, key, value)
