"""What the aggregator publishes about a version: the metadata document, the version's objects
in the models bucket, and its artifacts on the winning MLflow run.

`build_metadata` is the document docs/design.md fixes for `models/<id>/metadata.json` and
`champion/metadata.json` (pure). `write_artifacts` writes `models/<id>/model.onnx`,
`learning_curve.{csv,md,png}`, `quality.json`, `reliability.png` and `model_card.{json,md}`
(the models bucket fires no event); `log_to_run` logs the test metrics (with the test Brier and
ECE), the ONNX file, the learning curve, the quality report, the model card and the metadata to
the winning run.

Idempotent: `ObjectStore.put_if_changed` writes an object only if its bytes differ, and
`log_to_run` logs nothing on a run whose `aggregate/metadata.json` exists (written last, so
its presence means the run has all of them).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric

from readmission import keys, quality, registry
from readmission.candidate import Candidate
from readmission.config import Settings
from readmission.onnx_export import ExportedModel
from readmission.storage import ObjectStore

ARTIFACT_DIR = "aggregate"  # where the winning run gets the aggregator's artifacts


def _plain(value: Any) -> Any:
    """Dataclasses and tuples as plain JSON-able values."""
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def build_metadata(
    *,
    settings: Settings,
    dataset_id: str,
    version: Any,
    best: Mapping[str, Any],
    exported: ExportedModel,
    onnx_sha256: str,
    test_metrics: Mapping[str, Any],
    quality_report: Mapping[str, Any],
    explain_baseline: Mapping[str, Any] | None = None,
    input_ranges: Mapping[str, Mapping[str, float]] | None = None,
    selection: Mapping[str, Any] | None = None,
    reference: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The document design.md fixes for models/<id>/metadata.json and champion/metadata.json;
    `quality` is the compact summary of `quality_report` and the keys of its files;
    `explain_baseline` the reference row of the explanations (readmission.serving.explain);
    `input_ranges` the numeric inputs' observed ranges (the web form's min/max hints);
    `selection` the noise-aware selection's rule, leader, tied jobs and the selected job's
    interval (readmission.selection.Selection.as_dict); `reference` names the training
    reference profile (readmission.drift_reports), if any."""
    outputs = _plain(exported.outputs)
    extra: dict[str, Any] = {}
    if explain_baseline is not None:
        extra["explain_baseline"] = dict(explain_baseline)
    if input_ranges is not None:
        extra["input_ranges"] = {c: dict(r) for c, r in input_ranges.items()}
    if reference is not None:
        extra["reference"] = dict(reference)
    return {
        **extra,
        "model_name": settings.registered_model,
        "version": str(version.version),
        "run_id": best["run_id"],
        "dataset_id": dataset_id,
        "algorithm": best["algorithm"],
        "training_rows": int(best["training_rows"]),
        "cumulative_index": int(best["cumulative_index"]),
        "registered_at": registry.registered_at(version),
        "model_bucket": settings.buckets.models,
        "model_key": keys.model_key(dataset_id),
        "model_sha256": onnx_sha256,
        "classes": [str(c) for c in exported.classes],
        "inputs": _plain(exported.inputs),
        "outputs": outputs,
        "metrics": {
            "validation": dict(best["metrics"]["validation"]),
            "test": dict(test_metrics),
        },
        "selection_metric": settings.selection_metric,
        **({"selection": _selection_summary(selection)} if selection is not None else {}),
        "learning_curve": {
            "csv": keys.learning_curve_key(dataset_id, "csv"),
            "md": keys.learning_curve_key(dataset_id, "md"),
            "png": keys.learning_curve_key(dataset_id, "png"),
        },
        "model_card": {
            "json": keys.model_card_key(dataset_id, "json"),
            "md": keys.model_card_key(dataset_id, "md"),
        },
        "quality": {
            **quality.summary(quality_report),
            "report": keys.quality_key(dataset_id),
            "reliability": keys.reliability_key(dataset_id),
        },
    }


def explain_baseline(frame: Any) -> dict[str, Any]:
    """The reference row of the explanations, from a model frame (features.to_model_frame):
    the median of each numeric input (NaN ignored; null if it has no value) and the most
    frequent category of each categorical one (ties: the first in sorted order; the missing
    marker counts as a category). Deterministic for the same rows."""
    baseline: dict[str, Any] = {}
    for column in frame.columns:
        values = frame[column]
        if values.dtype.kind == "f":
            finite = values.to_numpy(dtype=np.float64)
            finite = finite[~np.isnan(finite)]
            baseline[column] = float(np.median(finite)) if len(finite) else None
        else:
            counts = values.astype(str).value_counts()
            top = counts[counts == counts.max()].index
            baseline[column] = sorted(top)[0] if len(top) else None
    return baseline


def input_ranges(frame: Any) -> dict[str, dict[str, float]]:
    """{column: {"min", "max"}} of each numeric input of a model frame
    (features.to_model_frame), NaN ignored; a column without a value is left out. The web form
    shows them as the inputs' min/max; the service does not reject values outside them."""
    ranges: dict[str, dict[str, float]] = {}
    for column in frame.columns:
        values = frame[column]
        if values.dtype.kind != "f":
            continue
        finite = values.to_numpy(dtype=np.float64)
        finite = finite[np.isfinite(finite)]
        if len(finite):
            ranges[column] = {"min": float(finite.min()), "max": float(finite.max())}
    return ranges


def _selection_summary(selection: Mapping[str, Any]) -> dict[str, Any]:
    """The selection without the comparisons of the candidates not tied (the learning curve
    has them all)."""
    selected = next(c for c in selection["comparisons"] if c["job"] == selection["selected"])
    summary = {k: v for k, v in selection.items() if k != "comparisons"}
    return {**summary, "selected_interval": selected["interval"]}


def write_artifacts(store: ObjectStore, settings: Settings, dataset_id: str, c: Candidate) -> None:
    """The version's ONNX model and learning curve in the models bucket (fire no event)."""
    models = settings.buckets.models
    onnx_type = "application/octet-stream"
    store.put_if_changed(models, keys.model_key(dataset_id), c.exported.onnx_bytes, onnx_type)
    for extension, (data, content_type) in c.curve_files.items():
        key = keys.learning_curve_key(dataset_id, extension)
        store.put_if_changed(models, key, data, content_type)
    for key, (data, content_type) in quality_objects(dataset_id, c).items():
        store.put_if_changed(models, key, data, content_type)


def quality_objects(dataset_id: str, c: Candidate) -> dict[str, tuple[bytes, str]]:
    """key -> (bytes, content type) of the quality report, the reliability diagram and the
    model card."""
    return {
        keys.quality_key(dataset_id): c.quality_files["json"],
        keys.reliability_key(dataset_id): c.quality_files["png"],
        keys.model_card_key(dataset_id, "json"): c.card_files["json"],
        keys.model_card_key(dataset_id, "md"): c.card_files["md"],
    }


def _metric_name(label: str) -> str:
    """A class label as MLflow accepts it in a metric name ("<30" -> "lt30", ">30" -> "gt30")."""
    return label.replace("<", "lt").replace(">", "gt")


def quality_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The test split's Brier (mean of the classes) and ECE per class, as run metrics."""
    test = report["splits"]["test"]
    metrics = {"test_brier_mean": test["brier_mean"]}
    for label, value in test["ece"].items():
        metrics[f"test_ece_{_metric_name(label)}"] = value
    return {name: float(value) for name, value in metrics.items() if value is not None}


def log_to_run(
    client: MlflowClient,
    run_id: str,
    candidate: Candidate,
    metadata_bytes: bytes,
    drift_files: Mapping[str, bytes] | None = None,
) -> None:
    """The aggregator's artifacts and the test metrics on the winning run (once).

    `drift_files`: the drift report of the drop that made the version (file name -> bytes,
    readmission.drift_reports), logged beside the model when ingest wrote it."""
    present = {Path(f.path).name for f in client.list_artifacts(run_id, ARTIFACT_DIR)}
    if "metadata.json" in present:
        return
    timestamp = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[
            Metric(f"test_{name}", float(value), timestamp, 0)
            for name, value in sorted(candidate.test_metrics.items())
            if value is not None
        ]
        + [
            Metric(name, value, timestamp, 0)
            for name, value in sorted(quality_metrics(candidate.quality).items())
        ],
    )
    client.set_tag(run_id, "aggregate.champion", "true")
    with tempfile.TemporaryDirectory(prefix="aggregate-") as tmp:
        folder = Path(tmp)
        (folder / "model.onnx").write_bytes(candidate.exported.onnx_bytes)
        for extension, (data, _) in candidate.curve_files.items():
            (folder / f"learning_curve.{extension}").write_bytes(data)
        for key, (data, _) in quality_objects(str(candidate.best["dataset_id"]), candidate).items():
            (folder / Path(key).name).write_bytes(data)
        for name, data in (drift_files or {}).items():
            (folder / name).write_bytes(data)
        # metadata.json last: its presence means the run has all of them.
        client.log_artifacts(run_id, str(folder), ARTIFACT_DIR)
        (folder / "metadata.json").write_bytes(metadata_bytes)
        client.log_artifact(run_id, str(folder / "metadata.json"), ARTIFACT_DIR)
