"""The training step: one job spec in, one result document out (and at most one new fit).

A job is (corpus version, cumulative set, algorithm). Its fit is content-addressed
(readmission.job_spec): `fit_id` hashes the set's batch keys (immutable, content-addressed
objects), the algorithm, the classifier's parameters and the code version, and MLflow runs
carry it as the tag `fit_id`. So the same rows, algorithm, parameters and code are never fitted
twice: a later corpus version whose set 0..k is unchanged reuses the run and only re-scores it
on its own validation rows.

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
4. the model's probabilities on this version's validation rows are written beside the result
   (`validation_probabilities_key`: float32 .npy, n x classes, no notification fires for it):
   the aggregator's noise-aware selection compares candidates row by row (a paired
   bootstrap, readmission.candidate). Deterministic bytes, so a redelivery rewrites the same
   object;
5. the result document is written LAST: its arrival fires the aggregator. It names the
   probabilities object and pins its sha256.

The result is built from the finished run (and, for a reused fit, a deterministic re-scoring),
so a redelivered job writes a byte-identical document. It pins the sha256 of every file of the
logged model directory (`model_files`, readmission.model_files): recorded on the run with its
completion, carried forward unchanged by every reuse of the fit, and checked before a reused
fit is re-scored (a mismatch is a ModelFilesMismatch: the train function answers 400). The
metrics are those of readmission.scoring.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from sklearn.pipeline import Pipeline
from threadpoolctl import threadpool_limits

from readmission import keys, model_files, tracking
from readmission.config import Settings
from readmission.features import (
    build_pipeline,
    classifier_params,
    n_model_features,
    target_values,
    to_model_frame,
)
from readmission.job_spec import InvalidJobSpec, JobSpec, check_against_manifest, read_manifest
from readmission.scoring import FIT_THREADS, METRIC_NAMES, predict_probabilities, score
from readmission.storage import ObjectStore

log = logging.getLogger(__name__)

# MLflow metric prefixes of the two splits, and the result document's names for them.
SPLIT_PREFIXES = {"train": "train_", "validation": "val_"}
# The result document's entry naming the validation probabilities object.
VALIDATION_PROBABILITIES = "validation_probabilities"


def validation_probabilities_key(result_key: str) -> str:
    """Key (results bucket) of a job's validation probabilities: its result key with
    `.validation.npy` for `.json` (not a `.json`: no event fires for it)."""
    return result_key.removesuffix(".json") + ".validation.npy"


def probabilities_bytes(probabilities: np.ndarray) -> bytes:
    """float32 .npy bytes of an n x classes matrix: the same values give the same bytes."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(probabilities, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def read_probabilities(data: bytes) -> np.ndarray:
    """The matrix `probabilities_bytes` wrote."""
    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclass(frozen=True)
class Probabilities:
    """A model's probabilities on a split's rows, columns in `classes` order."""

    values: np.ndarray
    classes: tuple[str, ...]


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
    decodes and converts each batch and the validation split once per process, not once per
    job, and holds the frames of one dataset only. Entries are keyed by object key and ETag, so
    every cached use costs one HEAD request and an object rewritten under its key is read
    again.
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
) -> tuple[tracking.RunRecord, Probabilities]:
    """Fit, evaluate and log one job as a new complete MLflow run; returns the run and the
    model's probabilities on the validation rows."""
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
    val_probabilities = predict_probabilities(pipeline, x_val)
    val_metrics = score(val_probabilities, np.asarray(pipeline.classes_), y_val)
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
        # The digests of the model directory as the store holds it right after logging; they
        # go on the run with its completion and into every result made from it.
        files = model_files.logged_digests(model.model_uri)
        # MLflow's cost for this job (create, params, model), logged for the budget.
        mlflow_seconds = time.perf_counter() - started
        tracking.complete_run(
            client,
            run_id,
            _run_metrics(timing, train_metrics, val_metrics),
            model.model_id,
            {"mlflow_seconds": mlflow_seconds},
            {model_files.DIGESTS_TAG: model_files.to_tag(files)},
        )
    except BaseException:
        try:
            client.set_terminated(run_id, status="FAILED")
        except Exception:  # the original error matters more
            log.exception("could not mark run %s FAILED", run_id)
        raise
    phases.mark("mlflow")
    log.info("job %s: MLflow run %s; seconds %s", job.key, run_id, phases)
    classes = tuple(str(c) for c in pipeline.classes_)
    return tracking.run_record(client.get_run(run_id)), Probabilities(val_probabilities, classes)


def result_document(
    job: JobSpec,
    record: tracking.RunRecord,
    files: Mapping[str, str],
    validation: Mapping[str, float | None] | None = None,
    rescore_seconds: float | None = None,
    probabilities: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The result document (docs/design.md) of a complete run; `files` are its model files'
    digests (`fit_digests`); `validation` replaces the run's logged validation metrics when
    the run was fitted for another corpus version; `probabilities` names the validation
    probabilities object ({"key", "sha256", "classes", "rows"})."""
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
        "model_uri": model_uri(record),
        "fit_id": job.fit_id,
        "fitted_for": fitted_for,
        "reused": fitted_for != job.dataset_id,
        "fit_seconds": record.metrics["fit_seconds"],
        "fit_cpu_seconds": record.metrics.get("fit_cpu_seconds"),
        "metrics": metrics,
        model_files.RESULT_KEY: dict(files),
    }
    if rescore_seconds is not None:
        document["rescore_seconds"] = rescore_seconds
    if probabilities is not None:
        document[VALIDATION_PROBABILITIES] = dict(probabilities)
    return document


def model_uri(record: tracking.RunRecord) -> str:
    return f"runs:/{record.run_id}/{tracking.MODEL_NAME}"


def fit_digests(
    store: ObjectStore, settings: Settings, job: JobSpec, record: tracking.RunRecord
) -> dict[str, str]:
    """The digests of the model files of the fit behind `record`, as they were when it was
    logged. A fit made for an earlier version whose result names the same run and pins its
    files: that result's digests (in the object store, which needs keys), and the run's tag
    must agree with them (ModelFilesMismatch otherwise). Else the run's tag; a run logged
    before digests were recorded is pinned as its files are now (logged)."""
    recorded = model_files.from_tag(record.tags)
    fitted_for = record.tags.get(tracking.DATASET_TAG, job.dataset_id)
    if fitted_for != job.dataset_id:
        first_key = keys.result_key(fitted_for, job.cumulative_index, job.algorithm)
        first = store.get_json_if_exists(settings.buckets.results, first_key)
        if (
            isinstance(first, dict)
            and model_files.RESULT_KEY in first
            and first.get("run_id") == record.run_id
        ):
            try:
                pinned = model_files.parse_digests(first.get(model_files.RESULT_KEY))
            except ValueError as error:
                raise model_files.ModelFilesMismatch(
                    f"results/{first_key} of run {record.run_id}: {error}"
                ) from error
            if recorded is not None and recorded != pinned:
                raise model_files.ModelFilesMismatch(
                    f"run {record.run_id}'s tag {model_files.DIGESTS_TAG} differs from the "
                    f"digests in results/{first_key}: refusing to reuse the fit"
                )
            return pinned
    if recorded is None:
        log.warning(
            "job %s: run %s has no %s (logged before model files were pinned): pinning its "
            "files as they are now",
            job.key,
            record.run_id,
            model_files.DIGESTS_TAG,
        )
        return model_files.logged_digests(model_uri(record))
    return recorded


def rescore(
    store: ObjectStore, job: JobSpec, record: tracking.RunRecord, files: Mapping[str, str]
) -> tuple[dict[str, float | None], float, Probabilities]:
    """(metrics on this version's validation rows, wall seconds, the probabilities on them)
    of a logged fit: prediction only, by the model whose files match `files`
    (ModelFilesMismatch before loading otherwise)."""
    started = time.perf_counter()
    validation = read_validation(store, job)
    pipeline = model_files.load_verified(model_uri(record), files)
    probabilities = predict_probabilities(pipeline, validation.frame)
    metrics = score(probabilities, np.asarray(pipeline.classes_), validation.target)
    classes = tuple(str(c) for c in pipeline.classes_)
    return metrics, time.perf_counter() - started, Probabilities(probabilities, classes)


def write_probabilities(
    store: ObjectStore, bucket: str, job: JobSpec, probabilities: Probabilities
) -> dict[str, Any]:
    """Write a job's validation probabilities (before its result: the result is the done
    marker) and return the result's entry naming them."""
    data = probabilities_bytes(probabilities.values)
    key = validation_probabilities_key(job.result_key)
    store.put_bytes(bucket, key, data)
    return {
        "key": key,
        "sha256": hashlib.sha256(data).hexdigest(),
        "rows": int(probabilities.values.shape[0]),
        "classes": list(probabilities.classes),
    }


def checked_job(
    store: ObjectStore, settings: Settings, job_spec: Mapping[str, Any], *, key: str | None = None
) -> JobSpec:
    """The job of a spec that is one of the manifest it names (InvalidJobSpec otherwise)."""
    job = JobSpec.parse(job_spec, settings.buckets.datasets)
    manifest = read_manifest(store, settings, job.dataset_id)
    check_against_manifest(job, job_spec, manifest, settings, key)
    return job


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
    job = checked_job(store, settings, job_spec, key=key)
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
    probabilities: Probabilities | None = None
    if reused is not None:
        record = tracking.run_record(reused)
        log.info("job %s: reusing fit %s (run %s)", job.key, fit_id, record.run_id)
    else:
        record, probabilities = fit_and_log(store, client, exp_id, job)
        # A concurrent twin may have finished too: converge on the oldest complete run.
        kept = tracking.keep_first_complete(client, tracking.fit_runs(client, exp_id, fit_id))
        if kept is not None and kept.info.run_id != record.run_id:
            record, probabilities = tracking.run_record(kept), None

    files = fit_digests(store, settings, job, record)
    if record.tags.get(tracking.DATASET_TAG, job.dataset_id) != job.dataset_id:
        validation, seconds, probabilities = rescore(store, job, record, files)
        log.info(
            "job %s: fit %s of version %s re-scored on this version's validation rows in %.2fs",
            job.key,
            fit_id,
            record.tags.get(tracking.DATASET_TAG),
            seconds,
        )
        entry = write_probabilities(store, results_bucket, job, probabilities)
        result = result_document(job, record, files, validation, seconds, entry)
    else:
        if probabilities is None:  # a run of this version logged by an earlier attempt
            probabilities = rescore(store, job, record, files)[2]
        entry = write_probabilities(store, results_bucket, job, probabilities)
        result = result_document(job, record, files, probabilities=entry)
    store.put_json(results_bucket, job.result_key, result)
    return result
