"""train_job and the train function against a real SeaweedFS S3 server and a real MLflow server."""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.artifacts
import numpy as np
import pandas as pd
import pytest
import skops.io
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent
from mlflow import MlflowClient
from mlflow.entities import ViewType
from sklearn.metrics import f1_score
from support.mlflow_server import MlflowServer, logged_model_dir, rewritten
from support.seaweed_server import SeaweedServer
from test_features import generated_frame, real_sample
from threadpoolctl import threadpool_limits

from readmission import jobs, keys, model_files, tracking
from readmission.config import Buckets, Settings
from readmission.features import ALGORITHMS, build_pipeline, target_values, to_model_frame
from readmission.job_spec import InvalidJobSpec, JobSpec
from readmission.scoring import METRIC_NAMES
from readmission.storage import ObjectStore, json_bytes
from readmission.training import ModelDataCache, read_model_data, train_job

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[1]
DATASET_ID = "0123456789abcdef"
BATCH_ROWS, VALIDATION_ROWS = 1500, 1000


@dataclass
class Env:
    store: ObjectStore
    settings: Settings
    client: MlflowClient
    server_env: dict[str, str]


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    seaweed = SeaweedServer().start()
    server = MlflowServer()
    try:
        server.start()
        settings = Settings(
            s3_endpoint_url=seaweed.endpoint_url,
            buckets=Buckets(),
            mlflow_tracking_uri=server.uri,
            mlflow_experiment="training-test",
        )
        store = ObjectStore(seaweed.client())
        store.ensure_buckets(settings.buckets.all())
        train, validation = real_sample(2 * BATCH_ROWS, VALIDATION_ROWS)
        for index in range(2):
            batch = train.iloc[index * BATCH_ROWS : (index + 1) * BATCH_ROWS]
            store.put_bytes(
                settings.buckets.datasets, keys.batch_key(DATASET_ID, index), parquet(batch)
            )
        store.put_bytes(
            settings.buckets.datasets, keys.validation_key(DATASET_ID), parquet(validation)
        )
        for manifest in (MANIFEST, LATER_MANIFEST):
            store.put_json(
                settings.buckets.datasets, keys.manifest_key(manifest["dataset_id"]), manifest
            )
        server_env = {**seaweed.env(), "MLFLOW_TRACKING_URI": server.uri}
        yield Env(store, settings, MlflowClient(server.uri), server_env)
    finally:
        server.stop()
        seaweed.stop()


def parquet(frame: Any) -> bytes:
    buffer = io.BytesIO()
    frame.reset_index(drop=True).to_parquet(buffer, index=False)
    return buffer.getvalue()


def job_spec(cumulative_index: int, algorithm: str) -> dict[str, Any]:
    return {
        "dataset_id": DATASET_ID,
        "cumulative_index": cumulative_index,
        "algorithm": algorithm,
        "training_rows": BATCH_ROWS * (cumulative_index + 1),
        "batch_keys": [keys.batch_key(DATASET_ID, i) for i in range(cumulative_index + 1)],
        "validation_keys": [keys.validation_key(DATASET_ID)],
        "test_keys": [keys.test_key(DATASET_ID)],
        "datasets_bucket": "datasets",
        "manifest_key": keys.manifest_key(DATASET_ID),
    }


LATER_VERSION = "fedcba9876543210"


def manifest_of(
    dataset_id: str,
    batch_keys: list[str],
    parts: list[str],
    algorithms: list[str],
    jobs: list[tuple[int, str]],
) -> dict[str, Any]:
    """The fields of a manifest (docs/design.md) that a job spec is checked against: batch i
    holds BATCH_ROWS rows, cumulative set i is batches 0..i; `parts`: the versions whose
    validation and test parts the version holds."""
    return {
        "dataset_id": dataset_id,
        "version": dataset_id,
        "batch_rows": BATCH_ROWS,
        "cumulative_sets": [
            {"index": i, "rows": BATCH_ROWS * (i + 1), "batch_keys": batch_keys[: i + 1]}
            for i in range(len(batch_keys))
        ],
        "validation": {"keys": [keys.validation_key(v) for v in parts]},
        "test": {"keys": [keys.test_key(v) for v in parts]},
        "algorithms": algorithms,
        "jobs": [keys.job_key(dataset_id, i, a) for i, a in jobs],
    }


# Two batches, every algorithm; a later version re-using set 0 with a second validation part.
MANIFEST = manifest_of(
    DATASET_ID,
    [keys.batch_key(DATASET_ID, i) for i in range(2)],
    [DATASET_ID],
    list(ALGORITHMS),
    [(i, a) for i in (1, 0) for a in ALGORITHMS],
)
LATER_MANIFEST = manifest_of(
    LATER_VERSION,
    [keys.batch_key(DATASET_ID, 0)],
    [DATASET_ID, LATER_VERSION],
    ["decision_tree", "random_forest"],
    [(0, "decision_tree")],
)
# A spec of set 0 of the later version, as ingest writes it (for any algorithm).
LATER_MANIFEST_SPEC_FIELDS = {
    "dataset_id": LATER_VERSION,
    "cumulative_index": 0,
    "training_rows": BATCH_ROWS,
    "batch_keys": [keys.batch_key(DATASET_ID, 0)],
    "validation_keys": LATER_MANIFEST["validation"]["keys"],
    "test_keys": LATER_MANIFEST["test"]["keys"],
    "manifest_key": keys.manifest_key(LATER_VERSION),
}


def runs_of(env: Env, job: dict[str, Any], view: int = ViewType.ACTIVE_ONLY) -> list[Any]:
    key = keys.job_key(DATASET_ID, job["cumulative_index"], job["algorithm"])
    return runs_of_job(env, key, view)


def runs_of_job(env: Env, key: str, view: int = ViewType.ALL) -> list[Any]:
    experiment = env.client.get_experiment_by_name(env.settings.mlflow_experiment)
    assert experiment is not None
    return env.client.search_runs(
        [experiment.experiment_id], f"tags.job_key = '{key}'", run_view_type=view
    )


def result_bytes(env: Env, job: dict[str, Any]) -> bytes | None:
    key = keys.result_key(DATASET_ID, job["cumulative_index"], job["algorithm"])
    return env.store.get_bytes_if_exists(env.settings.buckets.results, key)


def test_train_job_logs_one_run_and_writes_the_result(env: Env) -> None:
    job = job_spec(1, "random_forest")
    result = train_job(env.store, env.settings, job)

    assert json.loads(result_bytes(env, job) or b"null") == result
    assert result["dataset_id"] == DATASET_ID and result["cumulative_index"] == 1
    assert result["algorithm"] == "random_forest"
    assert result["training_rows"] == 2 * BATCH_ROWS
    assert result["n_features"] == 47
    assert result["model_uri"] == f"runs:/{result['run_id']}/model"
    assert result["fit_seconds"] > 0
    for split in ("train", "validation"):
        assert set(result["metrics"][split]) == set(METRIC_NAMES)
        assert all(0.0 <= v <= 1.0 for v in result["metrics"][split].values())
    assert (
        result["metrics"]["train"]["f1_weighted"] > result["metrics"]["validation"]["f1_weighted"]
    )

    [run] = runs_of(env, job)
    assert run.info.run_id == result["run_id"]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"{DATASET_ID}-01-random_forest"
    assert run.data.tags["dataset_id"] == DATASET_ID
    assert run.data.tags["job_key"] == f"{DATASET_ID}/01-random_forest.json"
    params = run.data.params
    assert params["model_type"] == "random_forest"
    assert params["cumulative_idx"] == "1"
    assert params["n_samples"] == str(2 * BATCH_ROWS)
    assert params["n_features"] == "47"
    assert params["dataset_id"] == DATASET_ID
    assert params["code_version"]
    assert params["model__n_estimators"] == "100" and params["model__max_depth"] == "10"
    metrics = run.data.metrics
    assert metrics["val_f1_weighted"] == result["metrics"]["validation"]["f1_weighted"]
    assert metrics["train_roc_auc_ovr"] == result["metrics"]["train"]["roc_auc_ovr"]
    assert metrics["fit_seconds"] == result["fit_seconds"]
    # The metrics are also the logged model's (logged after it, linked by its id).
    [output] = run.outputs.model_outputs
    model_metrics = {m.key: m.value for m in env.client.get_logged_model(output.model_id).metrics}
    assert model_metrics["val_f1_weighted"] == metrics["val_f1_weighted"]
    assert model_metrics["train_accuracy"] == metrics["train_accuracy"]
    # skops' schema was written without indentation (see tracking.compact_skops_schema).
    skops_file = mlflow.artifacts.download_artifacts(f"{result['model_uri']}/model.skops")
    with zipfile.ZipFile(skops_file) as archive:
        assert archive.read("schema.json").startswith(b'{"__class__": "Pipeline"')

    # Every file of the logged model is pinned by its sha256, on the run and in the result.
    local = Path(mlflow.artifacts.download_artifacts(result["model_uri"]))
    assert result["model_files"] == model_files.digests_of(local)
    assert {"MLmodel", "model.skops"} <= set(result["model_files"])
    assert model_files.from_tag(run.data.tags) == result["model_files"]

    # The logged model loads (skops, trusted types recorded) and reproduces the metric.
    pipeline = tracking.load_pipeline(result["model_uri"])
    _, validation = real_sample(2 * BATCH_ROWS, VALIDATION_ROWS)
    predicted = pipeline.predict(to_model_frame(validation))
    f1 = f1_score(target_values(validation), predicted, average="weighted", zero_division=0)
    assert np.isclose(f1, result["metrics"]["validation"]["f1_weighted"])

    # Its validation probabilities lie beside the result (float32, pinned by their sha256).
    entry = result["validation_probabilities"]
    stored = env.store.get_bytes(env.settings.buckets.results, entry["key"])
    assert entry["key"] == f"{DATASET_ID}/01-random_forest.validation.npy"
    assert entry["sha256"] == hashlib.sha256(stored).hexdigest()
    assert entry["classes"] == list(pipeline.classes_) and entry["rows"] == VALIDATION_ROWS
    expected = pipeline.predict_proba(to_model_frame(validation)).astype(np.float32)
    assert np.array_equal(np.load(io.BytesIO(stored)), expected)


def test_model_data_is_read_once_per_process_and_again_when_rewritten(env: Env) -> None:
    store, bucket = env.store, env.settings.buckets.datasets
    cache = ModelDataCache()
    job = JobSpec.parse(job_spec(1, "decision_tree"), bucket)
    train, validation = read_model_data(store, job, cache)
    # the same as converting the concatenated rows of the objects
    rows = pd.concat(
        [pd.read_parquet(io.BytesIO(store.get_bytes(bucket, k))) for k in job.batch_keys],
        ignore_index=True,
    )
    pd.testing.assert_frame_equal(train.frame, to_model_frame(rows))
    assert np.array_equal(train.target, target_values(rows)) and len(rows) == 2 * BATCH_ROWS
    rows = pd.read_parquet(io.BytesIO(store.get_bytes(bucket, job.validation_keys[0])))
    pd.testing.assert_frame_equal(validation.frame, to_model_frame(rows))

    # the next job of the same dataset gets the very objects converted before
    first = JobSpec.parse(job_spec(0, "random_forest"), bucket)
    batch_0, validation_again = read_model_data(store, first, cache)
    assert validation_again is validation
    assert batch_0 is cache.get(store, bucket, first.batch_keys[0], DATASET_ID)

    # an object rewritten under its key is read again
    key, original = first.batch_keys[0], store.get_bytes(bucket, first.batch_keys[0])
    try:
        store.put_bytes(bucket, key, parquet(pd.read_parquet(io.BytesIO(original)).head(10)))
        assert len(cache.get(store, bucket, key, DATASET_ID).frame) == 10
    finally:
        store.put_bytes(bucket, key, original)
    restored = cache.get(store, bucket, key, DATASET_ID)
    assert len(restored.frame) == BATCH_ROWS
    assert cache.get(store, bucket, key, DATASET_ID) is restored
    # another dataset's objects replace this one's
    cache.get(store, bucket, key, "fedcba9876543210")
    assert cache.get(store, bucket, key, DATASET_ID) is not restored


def test_second_call_returns_the_result_without_a_new_run(env: Env) -> None:
    job = job_spec(0, "decision_tree")
    first = train_job(env.store, env.settings, job)
    stored = result_bytes(env, job)
    second = train_job(env.store, env.settings, job)
    assert second == first
    assert result_bytes(env, job) == stored
    assert len(runs_of(env, job, ViewType.ALL)) == 1


def test_finished_run_is_reused_when_the_result_is_missing(env: Env) -> None:
    job = job_spec(0, "logistic_regression")
    first = train_job(env.store, env.settings, job)
    before = result_bytes(env, job)
    env.store.delete(env.settings.buckets.results, keys.result_key(DATASET_ID, 0, job["algorithm"]))

    probabilities_key = first["validation_probabilities"]["key"]
    env.store.delete(env.settings.buckets.results, probabilities_key)

    again = train_job(env.store, env.settings, job)

    assert again["run_id"] == first["run_id"]
    assert result_bytes(env, job) == before  # byte-identical redelivery
    stored = env.store.get_bytes(env.settings.buckets.results, probabilities_key)
    assert hashlib.sha256(stored).hexdigest() == first["validation_probabilities"]["sha256"]
    assert len(runs_of(env, job, ViewType.ALL)) == 1


def test_a_later_version_reuses_the_fit_and_only_rescores_it_on_its_validation_rows(
    env: Env,
) -> None:
    # Version 1 fitted set 0; version 2 holds the same batch 0 (immutable, same key) and a
    # second validation part: its set-0 job must not fit again, only predict.
    first = train_job(env.store, env.settings, job_spec(0, "decision_tree"))
    extra = real_sample(2 * BATCH_ROWS, 2 * VALIDATION_ROWS)[1].iloc[VALIDATION_ROWS:]
    extra_key = keys.validation_key(LATER_VERSION)
    env.store.put_bytes(env.settings.buckets.datasets, extra_key, parquet(extra))
    later = jobs.job_spec(
        LATER_MANIFEST, keys.job_key(LATER_VERSION, 0, "decision_tree"), "datasets"
    )
    assert later["validation_keys"] == [keys.validation_key(DATASET_ID), extra_key]
    assert JobSpec.parse(later, "datasets").fit_id == first["fit_id"]
    result = train_job(env.store, env.settings, later)
    assert result["reused"] and not first["reused"]
    assert result["run_id"] == first["run_id"] and result["fitted_for"] == DATASET_ID
    assert result["fit_seconds"] == first["fit_seconds"] and result["rescore_seconds"] > 0
    assert result["metrics"]["train"] == first["metrics"]["train"]
    assert result["model_files"] == first["model_files"]  # the same files, carried forward
    # scored on the later version's whole validation split
    validation = pd.concat(
        [real_sample(2 * BATCH_ROWS, VALIDATION_ROWS)[1], extra], ignore_index=True
    )
    pipeline = tracking.load_pipeline(first["model_uri"])
    predicted = pipeline.predict(to_model_frame(validation))
    f1 = f1_score(target_values(validation), predicted, average="weighted", zero_division=0)
    assert np.isclose(result["metrics"]["validation"]["f1_weighted"], f1)
    experiment = env.client.get_experiment_by_name(env.settings.mlflow_experiment)
    assert experiment is not None
    fitted = env.client.search_runs(
        [experiment.experiment_id], f"tags.fit_id = '{first['fit_id']}'", run_view_type=ViewType.ALL
    )
    assert [run.info.run_id for run in fitted] == [first["run_id"]]  # fitted once
    # other parameters or other rows are another fit
    assert JobSpec.parse(job_spec(1, "decision_tree"), "datasets").fit_id != first["fit_id"]
    assert JobSpec.parse(job_spec(0, "random_forest"), "datasets").fit_id != first["fit_id"]


REUSING_VERSION = "0a0a0a0a0a0a0a0a"


def reusing_job(env: Env) -> tuple[str, dict[str, Any]]:
    """(key, spec) of the logistic regression job of a later version holding batch 0 only:
    the fit of set 0 reused (its manifest and spec written, its result removed)."""
    manifest = manifest_of(
        REUSING_VERSION,
        [keys.batch_key(DATASET_ID, 0)],
        [DATASET_ID],
        ["logistic_regression"],
        [(0, "logistic_regression")],
    )
    datasets = env.settings.buckets.datasets
    env.store.put_json(datasets, keys.manifest_key(REUSING_VERSION), manifest)
    key = keys.job_key(REUSING_VERSION, 0, "logistic_regression")
    spec = jobs.job_spec(manifest, key, datasets)
    env.store.put_json(env.settings.buckets.jobs, key, spec)
    env.store.delete(env.settings.buckets.results, key)
    return key, spec


def test_a_reused_fit_whose_model_files_were_rewritten_is_refused_with_400(
    env: Env, function_client: Any
) -> None:
    """A later version reuses a fit only if its model files are the ones the fitting run
    logged: a skops file rewritten in MLflow's artifact store, or the run's digest tag
    rewritten to match it, is refused before skops reads anything, by the train function with
    a 400 (a retry would download the same files), and no result is written."""
    first = train_job(env.store, env.settings, job_spec(0, "logistic_regression"))
    results = env.settings.buckets.results
    key, later = reusing_job(env)
    skops_file = logged_model_dir(env.client, first["run_id"]) / "model.skops"

    with rewritten(skops_file, skops_file.read_bytes() + b"\0"):
        with pytest.raises(model_files.ModelFilesMismatch, match=r"changed: model\.skops"):
            train_job(env.store, env.settings, later)
        response = post_event(function_client, env.settings.buckets.jobs, key)
        assert response.status_code == 400
        assert b"not the ones its training run logged" in response.get_data()
        # the run's tag rewritten to the new files: the first version's result still pins them
        forged = model_files.digests_of(skops_file.parent)
        env.client.set_tag(first["run_id"], model_files.DIGESTS_TAG, model_files.to_tag(forged))
        try:
            with pytest.raises(model_files.ModelFilesMismatch, match="differs from the digests"):
                train_job(env.store, env.settings, later)
        finally:
            env.client.set_tag(
                first["run_id"], model_files.DIGESTS_TAG, model_files.to_tag(first["model_files"])
            )
    assert env.store.get_bytes_if_exists(results, key) is None

    result = train_job(env.store, env.settings, later)  # the files as logged: reused
    assert result["reused"] and result["run_id"] == first["run_id"]
    assert result["model_files"] == first["model_files"]


def test_a_fit_logged_before_model_files_were_pinned_is_pinned_as_it_is_when_reused(
    env: Env,
) -> None:
    """Runs and results written before this change carry no digests: a later version reusing
    such a fit pins its files as they are then (with a warning), instead of refusing it."""
    first = train_job(env.store, env.settings, job_spec(0, "logistic_regression"))
    results, first_key = (
        env.settings.buckets.results,
        keys.result_key(DATASET_ID, 0, "logistic_regression"),
    )
    key, later = reusing_job(env)
    env.client.delete_tag(first["run_id"], model_files.DIGESTS_TAG)
    env.store.put_json(results, first_key, {k: v for k, v in first.items() if k != "model_files"})
    try:
        result = train_job(env.store, env.settings, later)
    finally:
        env.client.set_tag(
            first["run_id"], model_files.DIGESTS_TAG, model_files.to_tag(first["model_files"])
        )
        env.store.put_json(results, first_key, first)
    assert result["reused"] and result["model_files"] == first["model_files"]
    env.store.delete(results, key)


def test_stale_runs_of_a_killed_attempt_are_removed(env: Env) -> None:
    job = job_spec(0, "hist_gradient_boosting")
    experiment_id = tracking.experiment_id(env.client, env.settings.mlflow_experiment)
    key = keys.job_key(DATASET_ID, 0, job["algorithm"])
    tags = {"job_key": key, "fit_id": JobSpec.parse(job, "datasets").fit_id}
    stale_running = env.client.create_run(experiment_id, tags=tags)
    stale_failed = env.client.create_run(experiment_id, tags=tags)
    env.client.set_terminated(stale_failed.info.run_id, status="FAILED")

    result = train_job(env.store, env.settings, job)

    [run] = runs_of(env, job)
    assert run.info.run_id == result["run_id"] and run.info.status == "FINISHED"
    for stale in (stale_running, stale_failed):
        info = env.client.get_run(stale.info.run_id).info
        assert info.lifecycle_stage == "deleted" and info.status == "FAILED"


def test_invalid_job_specs_are_refused_before_any_work() -> None:
    with pytest.raises(InvalidJobSpec, match="algorithm 'xgboost'"):
        JobSpec.parse({**job_spec(0, "xgboost")}, "datasets")
    with pytest.raises(InvalidJobSpec, match="batch_keys"):
        JobSpec.parse({**job_spec(0, "decision_tree"), "batch_keys": []}, "datasets")
    with pytest.raises(InvalidJobSpec, match="cumulative_index"):
        JobSpec.parse({**job_spec(0, "decision_tree"), "cumulative_index": "0"}, "datasets")
    with pytest.raises(InvalidJobSpec, match="JSON object"):
        JobSpec.parse([1, 2], "datasets")


# --- a spec is trusted only as far as its manifest -------------------------------------------


def test_the_specs_built_here_are_the_ones_ingest_derives_from_the_manifest() -> None:
    for key in MANIFEST["jobs"]:
        _, index, algorithm = keys.parse_job_key(key)
        assert jobs.job_spec(MANIFEST, key, "datasets") == job_spec(index, algorithm)


def no_trace_of(env: Env, spec: dict[str, Any]) -> bool:
    """Neither a result nor an MLflow run (of any state) for the job the spec names."""
    key = keys.job_key(spec["dataset_id"], spec["cumulative_index"], spec["algorithm"])
    results = env.settings.buckets.results
    return not env.store.exists(results, key) and runs_of_job(env, key) == []


# Set 1 of DATASET_ID with an algorithm no other test trains there: nothing of it exists.
UNTRAINED = "hist_gradient_boosting"
MISVERSION = "00000000deadbeef"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(
            {"batch_keys": [keys.batch_key(DATASET_ID, 0)] * 40, "training_rows": 40 * BATCH_ROWS},
            r"batch_keys \(40 keys\) are not the 2 batches of cumulative set 1",
            id="the-same-batch-40-times",
        ),
        pytest.param(
            {"datasets_bucket": "elsewhere"},
            "datasets_bucket 'elsewhere' is not the datasets bucket 'datasets'",
            id="another-bucket",
        ),
        pytest.param(
            {"cumulative_index": 7, "training_rows": 8 * BATCH_ROWS},
            f"cumulative_index 7 is out of range: version {DATASET_ID} has 2 cumulative sets",
            id="index-out-of-range",
        ),
        pytest.param(
            {"training_rows": 1},
            "training_rows 1 is not the 3000 rows of cumulative set 1",
            id="other-rows",
        ),
        pytest.param(
            {"validation_keys": [keys.batch_key(DATASET_ID, 1)]},
            "validation_keys are not the version's validation parts",
            id="validation-on-training-rows",
        ),
        pytest.param(
            {"test_keys": [keys.batch_key(DATASET_ID, 1)]},
            "test_keys are not the version's test parts",
            id="other-test-parts",
        ),
        pytest.param(
            {"manifest_key": keys.manifest_key(LATER_VERSION)},
            f"manifest_key '{LATER_VERSION}/manifest.json' is not '{DATASET_ID}/manifest.json'",
            id="another-manifest",
        ),
        pytest.param(
            {**LATER_MANIFEST_SPEC_FIELDS, "algorithm": "logistic_regression"},
            "algorithm 'logistic_regression' is not one of the version's",
            id="algorithm-the-version-does-not-train",
        ),
        pytest.param(
            {**LATER_MANIFEST_SPEC_FIELDS, "algorithm": "random_forest"},
            f"{LATER_VERSION}/00-random_forest.json is not one of the version's jobs",
            id="job-the-version-does-not-list",
        ),
    ],
)
def test_a_job_spec_that_is_not_a_job_of_its_manifest_is_refused_before_any_work(
    env: Env, change: dict[str, Any], message: str
) -> None:
    spec = {**job_spec(1, UNTRAINED), **change}
    with pytest.raises(InvalidJobSpec, match=message) as refused:
        train_job(env.store, env.settings, spec)
    assert "is not a job of its manifest s3://datasets/" in str(refused.value)
    assert no_trace_of(env, spec)


def test_a_job_spec_stored_under_another_jobs_key_is_refused(env: Env) -> None:
    spec = job_spec(1, UNTRAINED)
    other = keys.job_key(DATASET_ID, 0, UNTRAINED)
    with pytest.raises(InvalidJobSpec, match=f"stored as {other} describes job {DATASET_ID}/01-"):
        train_job(env.store, env.settings, spec, key=other)
    assert no_trace_of(env, spec)


def test_batches_holding_other_rows_than_the_manifest_says_are_refused(env: Env) -> None:
    version = "ba7c4e5000000000"
    batch = keys.batch_key(version, 0)
    datasets = env.settings.buckets.datasets
    env.store.put_bytes(datasets, batch, parquet(real_sample(10, 10)[0].head(10)))
    env.store.put_json(
        datasets,
        keys.manifest_key(version),
        manifest_of(version, [batch], [DATASET_ID], ["decision_tree"], [(0, "decision_tree")]),
    )
    spec = jobs.job_spec(
        env.store.get_json(datasets, keys.manifest_key(version)),
        keys.job_key(version, 0, "decision_tree"),
        "datasets",
    )
    with pytest.raises(InvalidJobSpec, match="its batches hold 10 rows, its manifest says 1500"):
        train_job(env.store, env.settings, spec)
    assert no_trace_of(env, spec)


# --- the functions-framework entry point ----------------------------------------------------


@pytest.fixture
def function_client(env: Env, monkeypatch: pytest.MonkeyPatch) -> Any:
    from functions_framework import create_app

    for name, value in env.server_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_EXPERIMENT", env.settings.mlflow_experiment)
    app = create_app("train", str(ROOT / "functions" / "train" / "main.py"), "cloudevent")
    return app.test_client()


def post_event(client: Any, bucket: str, key: str, event_type: str = "io.readmission.job.created"):  # type: ignore[no-untyped-def]
    event = CloudEvent(
        {"type": event_type, "source": f"s3://{bucket}", "subject": key, "id": key},
        {"bucket": bucket, "key": key, "size": 1, "etag": "x", "origin": "seaweedfs"},
    )
    headers, body = to_binary(event)
    return client.post("/", headers=headers, data=body)


def test_function_trains_a_job_and_replies_204(env: Env, function_client: Any) -> None:
    job = job_spec(1, "decision_tree")
    key = keys.job_key(DATASET_ID, 1, "decision_tree")
    env.store.put_bytes(env.settings.buckets.jobs, key, json_bytes(job))

    response = post_event(function_client, env.settings.buckets.jobs, key)

    assert response.status_code == 204 and response.get_data() == b""
    assert (
        json.loads(result_bytes(env, job) or b"null")["run_id"] == runs_of(env, job)[0].info.run_id
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, b"does not exist"),
        (b"{not json", b"is not JSON"),
        (json_bytes({"dataset_id": DATASET_ID}), b"invalid job spec"),
        (json_bytes(job_spec(0, "random_forest")), b"describes job"),  # under another key
    ],
)
def test_function_answers_400_to_a_malformed_job(
    env: Env, function_client: Any, content: bytes | None, message: bytes
) -> None:
    key = keys.job_key(DATASET_ID, 3, "decision_tree")
    if content is None:
        env.store.delete(env.settings.buckets.jobs, key)
    else:
        env.store.put_bytes(env.settings.buckets.jobs, key, content)
    response = post_event(function_client, env.settings.buckets.jobs, key)
    assert response.status_code == 400
    assert message in response.get_data()
    assert result_bytes(env, job_spec(3, "decision_tree")) is None


def test_a_job_spec_naming_no_version_is_refused_with_400_not_retried(
    env: Env, function_client: Any
) -> None:
    """A spec of a corpus version that does not exist (written by hand): its batches cannot
    be read either, which was a 500, retried by the broker and re-emitted by the reconciler
    every 5 minutes forever. It is malformed: 400, dead-lettered once, never trained."""
    spec = {
        **job_spec(0, "decision_tree"),
        "dataset_id": MISVERSION,
        "batch_keys": [keys.batch_key(MISVERSION, 0)],
        "validation_keys": [keys.validation_key(MISVERSION)],
        "test_keys": [keys.test_key(MISVERSION)],
        "manifest_key": keys.manifest_key(MISVERSION),
    }
    message = (
        f"no corpus version {MISVERSION}: the spec names a version that does not exist "
        f"(no s3://datasets/{MISVERSION}/manifest.json)"
    )
    with pytest.raises(InvalidJobSpec, match=re.escape(message)):
        train_job(env.store, env.settings, spec)
    key = keys.job_key(MISVERSION, 0, "decision_tree")
    env.store.put_bytes(env.settings.buckets.jobs, key, json_bytes(spec))

    response = post_event(function_client, env.settings.buckets.jobs, key)

    assert response.status_code == 400
    assert message.encode() in response.get_data()
    assert no_trace_of(env, spec)


def test_a_job_spec_with_batches_other_than_its_manifests_is_refused(
    env: Env, function_client: Any
) -> None:
    """The same batch 40 times (600,000 rows on the real file) under a real job's key."""
    spec = {
        **job_spec(1, UNTRAINED),
        "batch_keys": [keys.batch_key(DATASET_ID, 0)] * 40,
        "training_rows": 40 * BATCH_ROWS,
    }
    key = keys.job_key(DATASET_ID, 1, UNTRAINED)
    env.store.put_bytes(env.settings.buckets.jobs, key, json_bytes(spec))

    response = post_event(function_client, env.settings.buckets.jobs, key)

    assert response.status_code == 400
    assert b"batch_keys (40 keys) are not the 2 batches of cumulative set 1" in response.get_data()
    assert no_trace_of(env, spec)
    env.store.delete(env.settings.buckets.jobs, key)


def test_function_answers_400_for_a_job_key_that_can_never_be_read(function_client: Any) -> None:
    response = post_event(function_client, "jobs", "../00-decision_tree.json")
    assert response.status_code == 400
    assert b"can never be read" in response.get_data()


def test_function_answers_400_to_an_event_of_another_bucket(function_client: Any) -> None:
    response = post_event(function_client, "raw", "x/00-decision_tree.json")
    assert response.status_code == 400


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_recorded_trusted_types_cover_every_pipeline(algorithm: str) -> None:
    train = generated_frame(400)
    with threadpool_limits(limits=1):
        pipeline = build_pipeline(algorithm).fit(to_model_frame(train), target_values(train))
    assert set(tracking.untrusted_types(pipeline)) <= set(tracking.TRUSTED_TYPES)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_logged_model_serves_its_input_example_through_pyfunc(
    env: Env, algorithm: str
) -> None:
    """What MLflow's own input-example check on log_model does (tracking.log_pipeline skips
    it: there a failure is only a warning): load the logged model through pyfunc and answer
    its serving_input_example.json on the scoring server's /invocations path."""
    import mlflow.pyfunc
    from mlflow.pyfunc import scoring_server

    train = generated_frame(400)
    frame = to_model_frame(train)
    with threadpool_limits(limits=1):
        pipeline = build_pipeline(algorithm).fit(frame, target_values(train))
    client = tracking.client_for(env.settings.mlflow_tracking_uri)  # and the fluent API
    run_id = client.create_run(tracking.experiment_id(client, "serving-input-test")).info.run_id
    tracking.log_pipeline(run_id, pipeline, frame)
    model_uri = f"runs:/{run_id}/{tracking.MODEL_NAME}"
    with tracking.deserialization_allowed():
        model = mlflow.pyfunc.load_model(model_uri)
    serving_input = Path(
        mlflow.artifacts.download_artifacts(f"{model_uri}/serving_input_example.json")
    ).read_text()
    answer = scoring_server.invocations(
        serving_input, "application/json", model, model.metadata.get_input_schema()
    )
    assert answer.status == 200, answer.response
    predictions = json.loads(answer.response)["predictions"]
    rows = json.loads(serving_input)["dataframe_split"]["data"]
    assert predictions == list(pipeline.predict(frame.head(len(rows))))


def test_no_serving_input_recheck_restores_mlflow() -> None:
    import mlflow.models.utils

    original = mlflow.models.utils._validate_serving_input
    with tracking.no_serving_input_recheck(), tracking.no_serving_input_recheck():  # nests
        assert mlflow.models.utils._validate_serving_input is not original
        assert mlflow.models.utils._validate_serving_input(model_uri="x", serving_input="") is None
    assert mlflow.models.utils._validate_serving_input is original
    with pytest.raises(RuntimeError), tracking.no_serving_input_recheck():
        raise RuntimeError("a failed log_model")
    assert mlflow.models.utils._validate_serving_input is original


def test_no_skops_reload_check_skips_mlflows_reload_in_this_thread_only(tmp_path: Path) -> None:
    """MLflow's sklearn flavour loads a model it saved in skops format back, and fails on types
    outside skops_trusted_types: with no trusted types a tree model fails, unless the reload
    is skipped. Other threads keep loading; nesting and errors restore skops."""
    import mlflow.sklearn
    from mlflow.exceptions import MlflowException

    train = generated_frame(200)
    with threadpool_limits(limits=1):
        pipeline = build_pipeline("decision_tree").fit(to_model_frame(train), target_values(train))

    def save(name: str) -> None:
        mlflow.sklearn.save_model(
            pipeline, tmp_path / name, serialization_format="skops", skops_trusted_types=[]
        )

    with pytest.raises(MlflowException, match="untrusted types"):
        save("checked")
    original = skops.io.load
    saved = skops.io.dumps(pipeline)
    (tmp_path / "model.skops").write_bytes(saved)
    with tracking.no_skops_reload_check(), tracking.no_skops_reload_check():  # nests
        save("unchecked")
        assert skops.io.load(tmp_path / "model.skops") is None
        loaded: list[Any] = []
        worker = threading.Thread(
            target=lambda: loaded.append(
                skops.io.load(tmp_path / "model.skops", trusted=list(tracking.TRUSTED_TYPES))
            )
        )
        worker.start()
        worker.join()
        assert type(loaded[0]) is type(pipeline)
    assert skops.io.load is original
    reloaded = skops.io.load(
        tmp_path / "unchecked" / "model.skops", trusted=list(tracking.TRUSTED_TYPES)
    )
    frame = to_model_frame(train)
    assert np.array_equal(reloaded.predict_proba(frame), pipeline.predict_proba(frame))
    with pytest.raises(RuntimeError), tracking.no_skops_reload_check():
        raise RuntimeError("a failed log_model")
    assert skops.io.load is original


def test_compact_skops_schema_writes_the_same_model_and_restores_skops() -> None:
    from skops.io import _persist

    train = generated_frame(300)
    with threadpool_limits(limits=1):
        pipeline = build_pipeline("gradient_boosting").fit(
            to_model_frame(train), target_values(train)
        )
    indented = skops.io.dumps(pipeline)
    with tracking.compact_skops_schema(), tracking.compact_skops_schema():  # nests
        compact = skops.io.dumps(pipeline)
    assert _persist.json is json
    assert len(compact) < len(indented)

    def schema(data: bytes) -> Any:
        """The schema without what differs between any two dumps (object ids, file names)."""

        def strip(node: Any) -> Any:
            if isinstance(node, dict):
                return {k: strip(v) for k, v in node.items() if k not in ("__id__", "file")}
            return [strip(v) for v in node] if isinstance(node, list) else node

        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return strip(json.loads(archive.read("schema.json")))

    assert schema(compact) == schema(indented)
    loaded = skops.io.loads(compact, trusted=list(tracking.TRUSTED_TYPES))
    frame = to_model_frame(train)
    assert np.array_equal(loaded.predict_proba(frame), pipeline.predict_proba(frame))
    with pytest.raises(RuntimeError), tracking.compact_skops_schema():
        raise RuntimeError("a failed save")
    assert _persist.json is json


def test_metrics_equal_sklearn_on_the_labels_themselves() -> None:
    """compute_metrics scores class indices for speed: the figures must be the labels' own."""
    from sklearn.metrics import roc_auc_score

    from readmission.scoring import compute_metrics

    frame = generated_frame(900)
    train, validation = frame.iloc[:600], frame.iloc[600:]
    pipeline = build_pipeline("decision_tree").fit(to_model_frame(train), target_values(train))
    x_val, y_val = to_model_frame(validation), target_values(validation)
    proba = pipeline.predict_proba(x_val)
    predicted = pipeline.classes_[proba.argmax(axis=1)]
    expected = label_metrics(y_val, predicted) | {
        "roc_auc_ovr": roc_auc_score(
            y_val, proba, multi_class="ovr", average="weighted", labels=pipeline.classes_
        ),
    }
    metrics = compute_metrics(pipeline, x_val, y_val)
    assert metrics == pytest.approx(expected, abs=1e-12)
    # a label the model never saw: scored on the labels as they are, no crash
    unknown = y_val.copy()
    unknown[0] = "never-seen"
    metrics = compute_metrics(pipeline, x_val, unknown)
    assert {n: metrics[n] for n in LABEL_METRICS} == pytest.approx(
        label_metrics(unknown, predicted), abs=1e-12
    )


LABEL_METRICS = ("accuracy", "precision_weighted", "recall_weighted", "f1_weighted", "f1_macro")


def label_metrics(y_true: Any, predicted: Any) -> dict[str, float]:
    """The label metrics as sklearn's own functions compute them, one call each."""
    from sklearn.metrics import accuracy_score, precision_score, recall_score

    return {
        "accuracy": accuracy_score(y_true, predicted),
        "precision_weighted": precision_score(
            y_true, predicted, average="weighted", zero_division=0
        ),
        "recall_weighted": recall_score(y_true, predicted, average="weighted", zero_division=0),
        "f1_weighted": f1_score(y_true, predicted, average="weighted", zero_division=0),
        "f1_macro": f1_score(y_true, predicted, average="macro", zero_division=0),
    }


def test_label_metrics_average_over_the_labels_present_as_sklearn_does() -> None:
    from readmission.scoring import score

    classes = np.array(["<30", ">30", "NO"])
    rng = np.random.default_rng(3)
    probabilities = rng.random((200, 3))
    probabilities[:, 0] = 0.0  # "<30" is never predicted ...
    y_true = rng.choice(classes[1:], 200)  # ... nor present: macro F1 is over two labels
    metrics = score(probabilities, classes, y_true)
    predicted = classes[probabilities.argmax(axis=1)]
    assert {n: metrics[n] for n in LABEL_METRICS} == pytest.approx(
        label_metrics(y_true, predicted), abs=1e-12
    )
    assert metrics["roc_auc_ovr"] is None  # undefined without a "<30" row


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fit_with_features_is_pipeline_fit(algorithm: str) -> None:
    """Fitting step by step (to keep the training features) gives the model `fit` gives, and
    the kept features give the training split's own predictions."""
    from readmission.training import fit_with_features

    frame = generated_frame(700)
    train, validation = frame.iloc[:500], frame.iloc[500:]
    x_train, y_train = to_model_frame(train), target_values(train)
    x_val = to_model_frame(validation)
    with threadpool_limits(limits=1):
        reference = build_pipeline(algorithm).fit(x_train, y_train)
        pipeline = build_pipeline(algorithm)
        _, features = fit_with_features(pipeline, x_train, y_train)
        np.testing.assert_array_equal(pipeline.predict_proba(x_val), reference.predict_proba(x_val))
        np.testing.assert_array_equal(
            pipeline[-1].predict_proba(features), reference.predict_proba(x_train)
        )
