"""The training step: one job spec in, one result document out (and at most one new fit).

A job is (corpus version, cumulative set, algorithm). Its fit is content-addressed: `fit_id`
hashes the set's batch keys (immutable, content-addressed objects), the algorithm, the
classifier's parameters and the code version, and MLflow runs carry it as the tag `fit_id`. So
the same rows, algorithm, parameters and code are never fitted twice: a later corpus version
whose set 0..k is unchanged reuses the run and only re-scores it on its own validation rows.

A job spec is trusted only as far as the manifest it claims to come from: before anything else
`train_job` reads `datasets/<dataset_id>/manifest.json` and checks that the spec is one of its
jobs, word for word (`check_against_manifest`): the version exists, the key, the datasets
bucket, the cumulative index, the batch, validation and test keys, the training rows and the
algorithm are the manifest's. A spec that is not is an InvalidJobSpec (the train function
answers 400: dead-lettered once, never retried), before any object is read or run made.

`train_job` is idempotent and safe under redelivery:

1. if the result object exists, it is returned and nothing else happens;
2. if a complete MLflow run of the fit exists, it is reused: fitted for this same version (a
   previous attempt died before writing the result), its logged metrics are the result; fitted
   for an earlier version, its model is loaded and scored on this version's validation rows
   (prediction only). Incomplete runs of killed attempts are marked FAILED and deleted, so
   exactly one finished run per fit remains;
3. otherwise the batches 0..i and the validation rows are read (each once per process:
   `ModelDataCache`), the pipeline is fitted (one thread), evaluated on both, and logged to
   MLflow (params, metrics, model);
4. the result document is written LAST: its arrival fires the aggregator.

The result is built from the finished run (and, for a reused fit, a deterministic re-scoring),
so a redelivered job writes a byte-identical document.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score
from sklearn.pipeline import Pipeline
from threadpoolctl import threadpool_limits

from readmission import contract as contract_module
from readmission import features as features_module
from readmission import keys, tracking
from readmission.config import Settings
from readmission.features import (
    ALGORITHMS,
    build_pipeline,
    classifier_params,
    n_model_features,
    target_values,
    to_model_frame,
)
from readmission.storage import ObjectStore

log = logging.getLogger(__name__)

METRIC_NAMES = (
    "accuracy",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
    "f1_macro",
    "roc_auc_ovr",
)
# MLflow metric prefixes of the two splits, and the result document's names for them.
SPLIT_PREFIXES = {"train": "train_", "validation": "val_"}
# BLAS/OpenMP threads of one fit: parallelism comes from one fit per process.
FIT_THREADS = 1


@functools.cache
def pipeline_source_digest() -> str:
    """sha256 of the source of the modules that define what a fit is (the data contract and
    the pipeline), part of every fit id."""
    digest = hashlib.sha256()
    for module in (contract_module, features_module):
        digest.update(Path(str(module.__file__)).read_bytes())
    return digest.hexdigest()[:16]


class InvalidJobSpec(ValueError):
    """The job spec is not a job this step can run (no retry can fix it)."""


@dataclass(frozen=True)
class JobSpec:
    dataset_id: str
    cumulative_index: int
    algorithm: str
    training_rows: int
    batch_keys: tuple[str, ...]
    validation_keys: tuple[str, ...]
    datasets_bucket: str

    @functools.cached_property
    def fit_id(self) -> str:
        """Content address of this job's fit: same rows, algorithm, parameters and code ->
        same id (batch keys name immutable objects whose bytes never change). The code is the
        code version and the digest of the modules that define the pipeline, so a change to
        the preprocessing is a new fit even where the code version is not known."""
        params = classifier_params(build_pipeline(self.algorithm))
        text = json.dumps(
            {
                "algorithm": self.algorithm,
                "batch_keys": list(self.batch_keys),
                "params": {name: repr(value) for name, value in sorted(params.items())},
                "code_version": tracking.code_version(),
                "pipeline_source": pipeline_source_digest(),
            },
            sort_keys=True,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    @property
    def key(self) -> str:
        return keys.job_key(self.dataset_id, self.cumulative_index, self.algorithm)

    @property
    def result_key(self) -> str:
        return keys.result_key(self.dataset_id, self.cumulative_index, self.algorithm)

    @property
    def run_name(self) -> str:
        return tracking.run_name(self.dataset_id, self.cumulative_index, self.algorithm)

    @classmethod
    def parse(cls, document: Any, default_bucket: str) -> JobSpec:
        """Validate a job spec document (docs/design.md); InvalidJobSpec says what is wrong."""
        if not isinstance(document, Mapping):
            raise InvalidJobSpec("the job spec must be a JSON object")
        problems = []

        def text(name: str, required: bool = True) -> str:
            value = document.get(name)
            if isinstance(value, str) and value:
                return value
            if required or value is not None:
                problems.append(f"{name} must be a non-empty string")
            return ""

        def integer(name: str) -> int:
            value = document.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
            problems.append(f"{name} must be a non-negative integer")
            return 0

        dataset_id = text("dataset_id")
        cumulative_index = integer("cumulative_index")
        algorithm = text("algorithm")
        if algorithm and algorithm not in ALGORITHMS:
            problems.append(f"algorithm {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
        training_rows = integer("training_rows")
        batch_keys = document.get("batch_keys")
        if (
            not isinstance(batch_keys, list)
            or not batch_keys
            or not all(isinstance(k, str) and k for k in batch_keys)
        ):
            problems.append("batch_keys must be a non-empty list of object keys")
            batch_keys = []
        validation_keys = document.get("validation_keys")
        if validation_keys is None and isinstance(document.get("validation_key"), str):
            validation_keys = [document["validation_key"]]  # a spec of the older layout
        if (
            not isinstance(validation_keys, list)
            or not validation_keys
            or not all(isinstance(k, str) and k for k in validation_keys)
        ):
            problems.append("validation_keys must be a non-empty list of object keys")
            validation_keys = []
        bucket = text("datasets_bucket", required=False) or default_bucket
        if problems:
            raise InvalidJobSpec("invalid job spec: " + "; ".join(problems))
        return cls(
            dataset_id,
            cumulative_index,
            algorithm,
            training_rows,
            tuple(batch_keys),
            tuple(validation_keys),
            bucket,
        )


class ManifestCache:
    """The manifests this process read last, by bucket, key and ETag: a job's check costs one
    HEAD, and a GET only for a manifest not seen before (or rewritten under its key)."""

    MAX_ENTRIES = 8

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], tuple[str, Any]] = {}

    def get(self, store: ObjectStore, bucket: str, key: str) -> Any | None:
        """The manifest's document (shared: not to be changed; its bytes if it is not JSON),
        None if there is none."""
        info = store.head(bucket, key)
        if info is None:
            return None
        with self._lock:
            cached = self._entries.get((bucket, key))
        if cached is not None and cached[0] == info.etag:
            return cached[1]
        data, etag = store.get_with_etag(bucket, key)  # raises if deleted since: a retry
        try:
            document: Any = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            document = data  # not JSON: the caller refuses it as no manifest
        with self._lock:
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()
            self._entries[(bucket, key)] = (etag, document)
        return document


MANIFESTS = ManifestCache()


def read_manifest(
    store: ObjectStore, settings: Settings, dataset_id: str, cache: ManifestCache = MANIFESTS
) -> Mapping[str, Any]:
    """The manifest of the corpus version a job names, or InvalidJobSpec: ingest writes a
    version's manifest before its job specs, so a spec without one names no version at all."""
    bucket, key = settings.buckets.datasets, keys.manifest_key(dataset_id)
    manifest = cache.get(store, bucket, key)
    if manifest is None:
        raise InvalidJobSpec(
            f"no corpus version {dataset_id}: the spec names a version that does not exist "
            f"(no s3://{bucket}/{key})"
        )
    if not isinstance(manifest, Mapping):
        raise InvalidJobSpec(f"s3://{bucket}/{key} is not a manifest (not a JSON object)")
    return manifest


def check_against_manifest(
    job: JobSpec,
    document: Mapping[str, Any],
    manifest: Mapping[str, Any],
    settings: Settings,
    key: str | None = None,
) -> None:
    """InvalidJobSpec naming every field in which the spec (`document`, parsed as `job`, read
    from `key` when the caller knows it) is not the job its manifest lists, as
    readmission.ingest.job_spec writes it."""
    datasets = settings.buckets.datasets
    where = f"s3://{datasets}/{keys.manifest_key(job.dataset_id)}"
    problems = []
    if key is not None and key != job.key:
        problems.append(f"the spec stored as {key} describes job {job.key}")
    if job.datasets_bucket != datasets:
        problems.append(
            f"datasets_bucket {job.datasets_bucket!r} is not the datasets bucket {datasets!r}"
        )
    named = document.get("manifest_key")
    if named is not None and named != keys.manifest_key(job.dataset_id):
        problems.append(f"manifest_key {named!r} is not {keys.manifest_key(job.dataset_id)!r}")
    try:
        if manifest.get("dataset_id") != job.dataset_id:
            problems.append(f"the manifest is version {manifest.get('dataset_id')!r}'s")
        sets = manifest["cumulative_sets"]
        if job.cumulative_index >= len(sets):
            problems.append(
                f"cumulative_index {job.cumulative_index} is out of range: version "
                f"{job.dataset_id} has {len(sets)} cumulative sets"
            )
        else:
            cumulative = sets[job.cumulative_index]
            if list(job.batch_keys) != list(cumulative["batch_keys"]):
                problems.append(
                    f"batch_keys ({len(job.batch_keys)} keys) are not the "
                    f"{len(cumulative['batch_keys'])} batches of cumulative set "
                    f"{job.cumulative_index}"
                )
            if job.training_rows != cumulative["rows"]:
                problems.append(
                    f"training_rows {job.training_rows} is not the {cumulative['rows']} rows "
                    f"of cumulative set {job.cumulative_index}"
                )
        if list(job.validation_keys) != list(manifest["validation"]["keys"]):
            problems.append("validation_keys are not the version's validation parts")
        test_keys = document.get("test_keys")
        if test_keys is not None and test_keys != list(manifest["test"]["keys"]):
            problems.append("test_keys are not the version's test parts")
        if job.algorithm not in manifest["algorithms"]:
            problems.append(f"algorithm {job.algorithm!r} is not one of the version's")
        if job.key not in manifest["jobs"]:
            problems.append(f"{job.key} is not one of the version's jobs")
    except (KeyError, TypeError, IndexError) as error:
        raise InvalidJobSpec(f"{where} is not a manifest: {error!r}") from error
    if problems:
        raise InvalidJobSpec(
            f"job spec {key or job.key} is not a job of its manifest {where}: "
            + "; ".join(problems)
        )


@dataclass(frozen=True)
class FitTiming:
    cpu_seconds: float
    wall_seconds: float


@dataclass(frozen=True)
class ModelData:
    """One dataset object as the pipeline consumes it (read-only: it may be shared)."""

    frame: pd.DataFrame  # to_model_frame of the object's rows
    target: np.ndarray  # target_values of the same rows


class ModelDataCache:
    """The ModelData of the dataset objects this process read last (one dataset at a time).

    A train replica fits batches 0..i of the same dataset job after job: with this it reads,
    decodes and converts each batch and the validation split once, not once per job (on the
    real file ~60 batch reads in all become ~12; the frames hold ~40 MB). Entries are keyed
    by object key and ETag, so every cached use costs one HEAD request and an object rewritten
    under its key is read again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dataset_id: str | None = None
        self._entries: dict[tuple[str, str], tuple[str, ModelData]] = {}

    def get(self, store: ObjectStore, bucket: str, key: str, dataset_id: str) -> ModelData:
        with self._lock:
            if dataset_id != self._dataset_id:
                self._dataset_id, self._entries = dataset_id, {}
            cached = self._entries.get((bucket, key))
        if cached is not None:
            info = store.head(bucket, key)
            if info is not None and cached[0] == info.etag:
                return cached[1]
        data, etag = store.get_with_etag(bucket, key)  # raises if the object is gone
        rows = pd.read_parquet(io.BytesIO(data))
        entry = ModelData(to_model_frame(rows), target_values(rows))
        with self._lock:
            if dataset_id == self._dataset_id:
                self._entries[(bucket, key)] = (etag, entry)
        return entry


MODEL_DATA = ModelDataCache()


def read_model_data(
    store: ObjectStore, job: JobSpec, cache: ModelDataCache = MODEL_DATA
) -> tuple[ModelData, ModelData]:
    """(training rows = batches 0..i concatenated, validation rows) as model frames and
    targets, read through this process's cache."""
    train = _concatenated(
        [cache.get(store, job.datasets_bucket, k, job.dataset_id) for k in job.batch_keys]
    )
    validation = read_validation(store, job, cache)
    if len(train.frame) != job.training_rows:  # the manifest's count (check_against_manifest)
        raise InvalidJobSpec(
            f"job {job.key}: its batches hold {len(train.frame)} rows, its manifest says "
            f"{job.training_rows}"
        )
    return train, validation


def _concatenated(parts: list[ModelData]) -> ModelData:
    if len(parts) == 1:
        return parts[0]
    return ModelData(
        pd.concat([part.frame for part in parts], ignore_index=True),
        np.concatenate([part.target for part in parts]),
    )


def read_validation(
    store: ObjectStore, job: JobSpec, cache: ModelDataCache = MODEL_DATA
) -> ModelData:
    """The version's validation rows (every drop's part, in manifest order)."""
    return _concatenated(
        [cache.get(store, job.datasets_bucket, k, job.dataset_id) for k in job.validation_keys]
    )


def fit_with_features(
    pipeline: Pipeline, frame: pd.DataFrame, y: np.ndarray
) -> tuple[FitTiming, Any]:
    """Fit on one thread, as `pipeline.fit` does it (each step's fit_transform, then the
    classifier's fit), keeping the classifier's input: the training split's metrics then need
    no second pass through the encoders (~0.8 s on 71k rows). Returns (timing: CPU seconds of
    this process and wall seconds, the transformed training features)."""
    with threadpool_limits(limits=FIT_THREADS):
        cpu, wall = time.process_time(), time.perf_counter()
        features = pipeline[:-1].fit_transform(frame, y)
        pipeline[-1].fit(features, y)
        return FitTiming(time.process_time() - cpu, time.perf_counter() - wall), features


def fit_timed(pipeline: Pipeline, frame: pd.DataFrame, y: np.ndarray) -> FitTiming:
    """Fit on one thread; CPU seconds of this process and wall seconds of the fit."""
    return fit_with_features(pipeline, frame, y)[0]


def compute_metrics(
    pipeline: Pipeline, frame: pd.DataFrame, y_true: np.ndarray
) -> dict[str, float | None]:
    """The METRIC_NAMES on one split; roc_auc_ovr is None when a class is absent from it."""
    return score(predict_probabilities(pipeline, frame), np.asarray(pipeline.classes_), y_true)


def predict_probabilities(pipeline: Pipeline, frame: pd.DataFrame) -> np.ndarray:
    """pipeline.predict_proba on FIT_THREADS threads (columns in pipeline.classes_ order)."""
    with threadpool_limits(limits=FIT_THREADS):
        return pipeline.predict_proba(frame)


def score(
    probabilities: np.ndarray, classes: np.ndarray, y_true: np.ndarray
) -> dict[str, float | None]:
    """The METRIC_NAMES of predicted probabilities (columns in `classes` order)."""
    predicted: np.ndarray = np.argmax(probabilities, axis=1)
    codes = pd.Index(classes).get_indexer(y_true)  # -1: a label not in classes
    if (codes >= 0).all():
        # Class indices instead of the labels: the same scores (labels map one to one onto
        # indices), without sklearn sorting ~70k Python strings per metric (~1.5 s a job).
        y_true, classes = codes, np.arange(len(classes))
    else:  # a label the model does not know: score the labels as they are
        predicted = classes[predicted]
    # One pass for the per-class figures (over the labels present in either array, as
    # precision_score & co. do), averaged here exactly as sklearn averages them: a quarter of
    # the cost of four separate calls.
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, predicted, average=None, zero_division=0
    )
    metrics: dict[str, float | None] = {
        "accuracy": float(accuracy_score(y_true, predicted)),
        "precision_weighted": float(np.average(precision, weights=support)),
        "recall_weighted": float(np.average(recall, weights=support)),
        "f1_weighted": float(np.average(f1, weights=support)),
        "f1_macro": float(np.average(f1)),
    }
    try:
        metrics["roc_auc_ovr"] = float(
            roc_auc_score(
                y_true, probabilities, multi_class="ovr", average="weighted", labels=classes
            )
        )
    except ValueError as error:
        log.warning("ROC-AUC undefined on this split: %s", error)
        metrics["roc_auc_ovr"] = None
    return metrics


def _run_params(job: JobSpec, pipeline: Pipeline, n_samples: int) -> dict[str, Any]:
    params: dict[str, Any] = {
        "model_type": job.algorithm,
        "cumulative_idx": job.cumulative_index,
        "n_samples": n_samples,
        "n_features": n_model_features(pipeline),
        "n_input_columns": len(pipeline.feature_names_in_),
        "dataset_id": job.dataset_id,
        "code_version": tracking.code_version(),
    }
    params.update({f"model__{name}": value for name, value in classifier_params(pipeline).items()})
    return params


def _run_metrics(
    timing: FitTiming, train: Mapping[str, float | None], validation: Mapping[str, float | None]
) -> dict[str, float | None]:
    metrics: dict[str, float | None] = {
        "fit_seconds": timing.wall_seconds,
        "fit_cpu_seconds": timing.cpu_seconds,
    }
    for split, values in (("train", train), ("validation", validation)):
        prefix = SPLIT_PREFIXES[split]
        metrics.update({f"{prefix}{name}": value for name, value in values.items()})
    return metrics


class _Phases:
    """Wall seconds of a job's phases, for its log line: `read 0.21 fit 3.40 ...`."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = now - self._last
        self._last = now

    def __str__(self) -> str:
        return " ".join(f"{phase} {seconds:.2f}" for phase, seconds in self.seconds.items())


def fit_and_log(
    store: ObjectStore, client: MlflowClient, exp_id: str, job: JobSpec
) -> tracking.RunRecord:
    """Fit, evaluate and log one job as a new complete MLflow run."""
    phases = _Phases()
    train, validation = read_model_data(store, job)
    x_train, y_train = train.frame, train.target
    x_val, y_val = validation.frame, validation.target
    phases.mark("read")
    pipeline = build_pipeline(job.algorithm)
    timing, features = fit_with_features(pipeline, x_train, y_train)
    phases.mark("fit")
    with threadpool_limits(limits=FIT_THREADS):
        train_probabilities = pipeline[-1].predict_proba(features)
    train_metrics = score(train_probabilities, np.asarray(pipeline.classes_), y_train)
    val_metrics = compute_metrics(pipeline, x_val, y_val)
    phases.mark("metrics")
    log.info(
        "job %s: fitted %s on %d rows in %.1fs (cpu %.1fs); validation f1_weighted %.4f",
        job.key,
        job.algorithm,
        len(x_train),
        timing.wall_seconds,
        timing.cpu_seconds,
        val_metrics["f1_weighted"],
    )

    started = time.perf_counter()
    run = client.create_run(
        exp_id,
        run_name=job.run_name,
        tags={
            tracking.JOB_KEY_TAG: job.key,
            tracking.FIT_ID_TAG: job.fit_id,
            tracking.DATASET_TAG: job.dataset_id,
            "algorithm": job.algorithm,
            "cumulative_index": str(job.cumulative_index),
        },
    )
    run_id = run.info.run_id
    try:
        tracking.log_params(client, run_id, _run_params(job, pipeline, len(x_train)))
        model = tracking.log_pipeline(run_id, pipeline, x_train)
        # MLflow's cost for this job (create, params, model), logged for the budget.
        mlflow_seconds = time.perf_counter() - started
        tracking.complete_run(
            client,
            run_id,
            _run_metrics(timing, train_metrics, val_metrics),
            model.model_id,
            {"mlflow_seconds": mlflow_seconds},
        )
    except BaseException:
        try:
            client.set_terminated(run_id, status="FAILED")
        except Exception:  # the original error matters more
            log.exception("could not mark run %s FAILED", run_id)
        raise
    phases.mark("mlflow")
    log.info("job %s: MLflow run %s; seconds %s", job.key, run_id, phases)
    return tracking.run_record(client.get_run(run_id))


def result_document(
    job: JobSpec,
    record: tracking.RunRecord,
    validation: Mapping[str, float | None] | None = None,
    rescore_seconds: float | None = None,
) -> dict[str, Any]:
    """The result document (docs/design.md) of a complete run; `validation` replaces the run's
    logged validation metrics when the run was fitted for another corpus version."""
    metrics: dict[str, dict[str, float | None]] = {}
    for split, prefix in SPLIT_PREFIXES.items():
        metrics[split] = {name: record.metrics.get(f"{prefix}{name}") for name in METRIC_NAMES}
    if validation is not None:
        metrics["validation"] = {name: validation.get(name) for name in METRIC_NAMES}
    fitted_for = record.tags.get(tracking.DATASET_TAG, job.dataset_id)
    document = {
        "dataset_id": job.dataset_id,
        "cumulative_index": job.cumulative_index,
        "algorithm": job.algorithm,
        "training_rows": int(record.params["n_samples"]),
        "n_features": int(record.params["n_features"]),
        "run_id": record.run_id,
        "model_uri": f"runs:/{record.run_id}/{tracking.MODEL_NAME}",
        "fit_id": job.fit_id,
        "fitted_for": fitted_for,
        "reused": fitted_for != job.dataset_id,
        "fit_seconds": record.metrics["fit_seconds"],
        "fit_cpu_seconds": record.metrics.get("fit_cpu_seconds"),
        "metrics": metrics,
    }
    if rescore_seconds is not None:
        document["rescore_seconds"] = rescore_seconds
    return document


def rescore(
    store: ObjectStore, job: JobSpec, record: tracking.RunRecord
) -> tuple[dict[str, float | None], float]:
    """(metrics on this version's validation rows, wall seconds) of a fit made for an earlier
    version: prediction only."""
    started = time.perf_counter()
    validation = read_validation(store, job)
    pipeline = tracking.load_pipeline(f"runs:/{record.run_id}/{tracking.MODEL_NAME}")
    metrics = compute_metrics(pipeline, validation.frame, validation.target)
    return metrics, time.perf_counter() - started


def train_job(
    store: ObjectStore,
    settings: Settings,
    job_spec: Mapping[str, Any],
    client: MlflowClient | None = None,
    *,
    key: str | None = None,
) -> dict[str, Any]:
    """Run one training job (see the module docstring); returns the result document.

    `key`: the job spec's object key, when the caller read it from one (it must be the spec's
    own). InvalidJobSpec for a malformed spec or one that is not a job of the manifest it
    names, before any work; anything else that fails (object store, MLflow) raises as it is,
    so the event is retried.
    """
    job = JobSpec.parse(job_spec, settings.buckets.datasets)
    manifest = read_manifest(store, settings, job.dataset_id)
    check_against_manifest(job, job_spec, manifest, settings, key)
    results_bucket = settings.buckets.results
    existing = store.get_json_if_exists(results_bucket, job.result_key)
    if existing is not None:
        log.info("job %s: result exists, nothing to do", job.key)
        return existing

    client = client or tracking.client_for(settings.mlflow_tracking_uri)
    exp_id = tracking.experiment_id(client, settings.mlflow_experiment)
    fit_id = job.fit_id
    complete = tracking.discard_incomplete(client, tracking.fit_runs(client, exp_id, fit_id))
    reused = tracking.keep_first_complete(client, complete)
    if reused is not None:
        record = tracking.run_record(reused)
        log.info("job %s: reusing fit %s (run %s)", job.key, fit_id, record.run_id)
    else:
        record = fit_and_log(store, client, exp_id, job)
        # A concurrent twin may have finished too: converge on the oldest complete run.
        kept = tracking.keep_first_complete(client, tracking.fit_runs(client, exp_id, fit_id))
        if kept is not None and kept.info.run_id != record.run_id:
            record = tracking.run_record(kept)

    if record.tags.get(tracking.DATASET_TAG, job.dataset_id) != job.dataset_id:
        validation, seconds = rescore(store, job, record)
        log.info(
            "job %s: fit %s of version %s re-scored on this version's validation rows in %.2fs",
            job.key,
            fit_id,
            record.tags.get(tracking.DATASET_TAG),
            seconds,
        )
        result = result_document(job, record, validation, seconds)
    else:
        result = result_document(job, record)
    store.put_json(results_bucket, job.result_key, result)
    return result
