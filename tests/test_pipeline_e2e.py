"""End-to-end and crash tests of the whole pipeline on the REAL local stack (no mocks).

A sample of the real UCI file goes into the raw bucket through S3; the filer webhook, the
events adapter, the broker (routing by infra/knative) and the functions-framework processes
do the rest. Two stacks (module-scoped, started on first use):

* ``e2e_stack``: 2 train workers, BATCH_ROWS=1000, two cheap algorithms, predict polling every
  second: the happy path and the re-upload of the same bytes under another key.
* ``crash_stack``: ONE train worker, BATCH_ROWS=4000, gradient_boosting only (slow enough to
  be killed mid-fit): the train process (inside a fit; while its MLflow run is RUNNING) and
  the aggregator (during test/export/parity; right after registering) are SIGKILLed with
  their process group and restarted with the argv, env and working directory the supervisor
  gave them (read from /proc before the kill; the supervisor cannot restart one process).
  The broker's redelivery must finish the pipeline with exact counts; each dataset is its own
  sample of the real file, so counts are per dataset.

Run: ``.venv/bin/pytest tests/test_pipeline_e2e.py -m stack`` (about 6-7 minutes on 2 cores;
the aggregator tests wait for the killed holder's lease to expire, LEASE_TTL_SECONDS = 60).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
from conftest_seaweed import sample_csv
from mlflow import MlflowClient
from mlflow.entities import ViewType
from stack import RunningStack, running_stack

from readmission import keys, processes, tracking
from readmission.features import to_model_frame

pytestmark = pytest.mark.stack

EXPERIMENT = "diabetes_readmission_prediction"
MODEL = "diabetes_readmission_model"
E2E_ALGORITHMS = ("logistic_regression", "decision_tree")
VAL_METRICS = (
    "val_accuracy",
    "val_precision_weighted",
    "val_recall_weighted",
    "val_f1_weighted",
    "val_f1_macro",
    "val_roc_auc_ovr",
)
PIPELINE_TIMEOUT = 900.0  # generous: a slow, shared 2-core machine


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def e2e_stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    env = {
        "TRAIN_WORKERS": "2",
        "BATCH_ROWS": "1000",
        "ALGORITHMS": ",".join(E2E_ALGORITHMS),
        "MODEL_POLL_SECONDS": "1",
    }
    with running_stack(tmp_path_factory.mktemp("e2e") / "state", env) as running:
        yield running


@pytest.fixture(scope="module")
def crash_stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    env = {
        "TRAIN_WORKERS": "1",
        "BATCH_ROWS": "4000",
        "ALGORITHMS": "gradient_boosting",
        "MODEL_POLL_SECONDS": "1",
    }
    with running_stack(tmp_path_factory.mktemp("crash") / "state", env) as running:
        yield running


# --------------------------------------------------------------------------- helpers


def mlflow_client(stack: RunningStack) -> MlflowClient:
    """A client of this stack's MLflow; also points mlflow's process-wide tracking URI at it, which
    earlier tests in the same session (with servers of their own) may have set elsewhere."""
    mlflow.set_tracking_uri(stack.mlflow_uri)
    return MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)


def dataset_runs(client: MlflowClient, dataset_id: str, view: int = ViewType.ACTIVE_ONLY) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, f"no MLflow experiment {EXPERIMENT}"
    return client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.{tracking.DATASET_TAG} = '{dataset_id}'",
        run_view_type=view,
        max_results=1000,
    )


def dataset_versions(client: MlflowClient, dataset_id: str) -> list:
    return client.search_model_versions(f"name = '{MODEL}' and tags.dataset_id = '{dataset_id}'")


def upload(stack: RunningStack, key: str, data: bytes) -> str:
    stack.store.put_bytes(stack.settings.buckets.raw, key, data, "text/csv")
    return keys.content_id(data)


def champion_of(stack: RunningStack, dataset_id: str) -> dict[str, Any] | None:
    document = stack.store.get_json_if_exists(
        stack.settings.buckets.models, keys.CHAMPION_METADATA_KEY
    )
    if document is not None and document.get("dataset_id") == dataset_id:
        return document
    return None


def wait_champion(stack: RunningStack, dataset_id: str, what: str) -> dict[str, Any]:
    metadata = stack.wait_for(lambda: champion_of(stack, dataset_id), PIPELINE_TIMEOUT, 1.0)
    if metadata is None:
        pytest.fail(
            f"{what}: no champion for dataset {dataset_id} after {PIPELINE_TIMEOUT:.0f}s; "
            f"broker {stack.broker_status()}\n--- broker log\n{stack.log('broker', 40)}"
            f"\n--- aggregate log\n{stack.log('aggregate', 40)}"
        )
    return metadata


def broker_idle(stack: RunningStack) -> bool:
    totals = stack.broker_status()["totals"]
    return totals["queued"] == 0 and totals["inflight"] == 0


def subscriber_inflight(stack: RunningStack, service: str) -> int:
    subscribers = stack.broker_status()["subscribers"]
    return sum(s["inflight"] for name, s in subscribers.items() if service in name)


def etags(stack: RunningStack) -> dict[tuple[str, str], str]:
    """ETag of every pipeline output (ingest receipts and the transient lease excluded)."""
    buckets = stack.settings.buckets
    found = {}
    for bucket in (buckets.datasets, buckets.jobs, buckets.results, buckets.models):
        for info in stack.store.list(bucket):
            if bucket == buckets.datasets and info.key.startswith(keys.RECEIPTS_PREFIX):
                continue
            if info.key.endswith("aggregate.lease"):
                continue
            found[(bucket, info.key)] = info.etag
    return found


def http_json(url: str, body: Any | None = None, timeout: float = 10.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url,
        data=data,
        method="GET" if body is None else "POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        payload = error.read()
        try:
            return error.code, json.loads(payload)
        except ValueError:
            return error.code, payload.decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return 0, None


def onnx_predict(onnx_bytes: bytes, metadata: dict[str, Any], frame: pd.DataFrame) -> tuple:
    """(labels, probabilities) of the ONNX file, fed per the metadata's input contract."""
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    columns: dict[str, dict[int, np.ndarray]] = {}
    for spec in metadata["inputs"]:  # each column at its index of its tensor
        values = frame[spec["column"]]
        if spec["kind"] == "numeric":
            array = values.to_numpy(dtype=np.float32, na_value=np.nan)
        else:
            array = values.astype(object).to_numpy()
        columns.setdefault(spec["onnx_name"], {})[spec["index"]] = array
    feeds = {
        name: np.column_stack([by_index[i] for i in range(len(by_index))])
        for name, by_index in columns.items()
    }
    outputs = metadata["outputs"]
    labels, probabilities = session.run([outputs["label"], outputs["probabilities"]], feeds)
    return np.asarray(labels), np.asarray(probabilities)


# --- killing and restarting a process of the stack (same argv, env, cwd as the supervisor's)


@dataclass(frozen=True)
class ProcessSnapshot:
    name: str
    pid: int
    cmd: list[str]
    env: dict[str, str]
    cwd: Path


def snapshot(stack: RunningStack, name: str) -> ProcessSnapshot:
    process = next((p for p in processes.recorded(stack.state_dir / "run") if p.name == name), None)
    assert process is not None and processes.is_running(process), f"{name} is not running"
    raw = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
    env = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
    cwd = Path(os.readlink(f"/proc/{process.pid}/cwd"))
    return ProcessSnapshot(name, process.pid, process.cmd, env, cwd)


def kill_group(snap: ProcessSnapshot) -> None:
    """SIGKILL the process and everything it started (its own session: pgid == pid)."""
    os.killpg(snap.pid, signal.SIGKILL)
    gone = processes.wait_until(
        lambda: (
            not processes.is_running(
                processes.Process(snap.name, snap.pid, snap.cmd, Path("/dev/null"))
            )
        ),
        timeout=10,
    )
    assert gone, f"{snap.name} (pid {snap.pid}) survived SIGKILL"


def restart(stack: RunningStack, snap: ProcessSnapshot, url: str) -> None:
    processes.start(
        snap.name,
        snap.cmd,
        run_dir=stack.state_dir / "run",
        log_dir=stack.state_dir / "logs",
        env=snap.env,
        cwd=snap.cwd,
    )
    answered = processes.wait_until(lambda: processes.http_status(url) is not None, 120, 0.2)
    assert answered, f"restarted {snap.name} does not answer at {url}:\n{stack.log(snap.name)}"


def assert_one_finished_run_per_job(client: MlflowClient, dataset_id: str, jobs: list[str]) -> list:
    active = dataset_runs(client, dataset_id)
    by_job: dict[str, list] = {}
    for run in active:
        by_job.setdefault(run.data.tags.get(tracking.JOB_KEY_TAG, "?"), []).append(run)
    assert sorted(by_job) == sorted(jobs), (
        f"runs per job: { {k: len(v) for k, v in by_job.items()} }"
    )
    for job, runs in by_job.items():
        assert len(runs) == 1, f"{job}: {len(runs)} active runs {[r.info.run_id for r in runs]}"
        assert runs[0].info.status == "FINISHED", f"{job}: run {runs[0].info.status}"
        assert runs[0].data.tags.get(tracking.COMPLETE_TAG) == "true"
    # a killed attempt's run, if it got as far as creating one, is not left active
    for run in dataset_runs(client, dataset_id, ViewType.ALL):
        if run.info.lifecycle_stage == "active":
            assert run.info.status == "FINISHED"
    return active


def assert_published_model_consistent(stack: RunningStack, metadata: dict[str, Any]) -> bytes:
    """champion/metadata.json == <id>/metadata.json, and it names an ONNX matching its sha256."""
    models = stack.settings.buckets.models
    dataset_id = metadata["dataset_id"]
    champion_bytes = stack.store.get_bytes(models, keys.CHAMPION_METADATA_KEY)
    assert stack.store.get_bytes(models, keys.model_metadata_key(dataset_id)) == champion_bytes
    assert metadata["model_bucket"] == models
    assert metadata["model_key"] == keys.model_key(dataset_id)
    onnx_bytes = stack.store.get_bytes_if_exists(models, metadata["model_key"])
    assert onnx_bytes, f"champion names {metadata['model_key']}, which does not exist"
    assert hashlib.sha256(onnx_bytes).hexdigest() == metadata["model_sha256"]
    ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])  # a loadable model
    return onnx_bytes


# --------------------------------------------------------------------------- 1. end to end


def test_end_to_end_then_same_bytes_again(e2e_stack: RunningStack) -> None:
    stack = e2e_stack
    buckets = stack.settings.buckets
    data = sample_csv(every=25)  # ~4,070 rows of the real file -> ~2,850 train rows
    dataset_id = upload(stack, "e2e/first-upload.csv", data)

    metadata = wait_champion(stack, dataset_id, "first upload")
    manifest = stack.store.get_json(buckets.datasets, keys.manifest_key(dataset_id))
    n_sets = len(manifest["cumulative_sets"])
    assert 3 <= n_sets <= 5, f"sample gave {n_sets} cumulative sets"
    assert manifest["algorithms"] == list(E2E_ALGORITHMS)
    assert len(manifest["jobs"]) == n_sets * len(E2E_ALGORITHMS)
    results = stack.store.list_keys(buckets.results, f"{dataset_id}/")
    assert sorted(results) == sorted(manifest["jobs"])

    # MLflow: one FINISHED run per job, with validation metrics and a logged model
    client = mlflow_client(stack)
    runs = assert_one_finished_run_per_job(client, dataset_id, manifest["jobs"])
    assert len(runs) == n_sets * len(E2E_ALGORITHMS)
    with stack.environ():
        for run in runs:
            missing = [m for m in VAL_METRICS if m not in run.data.metrics]
            assert not missing, f"run {run.info.run_id} lacks {missing}"
            assert 0.0 <= run.data.metrics["val_f1_weighted"] <= 1.0
            import mlflow.models

            info = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/model")
            assert "sklearn" in info.flavors, f"run {run.info.run_id}: no sklearn model"

    # the registry: exactly one version (a fresh stack), alias champion on it
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert len(versions) == 1, [(v.version, v.tags) for v in versions]
    version = versions[0]
    assert version.tags.get("dataset_id") == dataset_id
    assert client.get_model_version_by_alias(MODEL, "champion").version == version.version
    assert metadata["version"] == str(version.version)
    assert metadata["run_id"] == version.run_id
    assert metadata["run_id"] in {r.info.run_id for r in runs}

    # ONNX in the bucket == metadata sha256, and == the registered MLflow model on the test split
    onnx_bytes = assert_published_model_consistent(stack, metadata)
    test = pd.read_parquet(
        io.BytesIO(stack.store.get_bytes(buckets.datasets, manifest["test"]["key"]))
    )
    assert len(test) == manifest["test"]["rows"] > 0
    frame = to_model_frame(test)
    labels, onnx_proba = onnx_predict(onnx_bytes, metadata, frame)
    with stack.environ():
        pipeline = tracking.load_pipeline(f"models:/{MODEL}/{version.version}")
    sk_proba = pipeline.predict_proba(frame)
    assert [str(c) for c in pipeline.classes_] == metadata["classes"]
    assert onnx_proba.shape == sk_proba.shape == (len(test), len(metadata["classes"]))
    assert np.array_equal(onnx_proba.argmax(axis=1), sk_proba.argmax(axis=1))
    assert float(np.max(np.abs(onnx_proba.astype(np.float64) - sk_proba))) <= 1e-4
    classes = np.asarray(metadata["classes"], dtype=object)
    assert list(labels.astype(str)) == list(classes[sk_proba.argmax(axis=1)])

    # learning curve: in the models bucket and as artifacts of the winning run
    curve_keys = metadata["learning_curve"]
    for extension in ("csv", "md", "png"):
        assert curve_keys[extension] == keys.learning_curve_key(dataset_id, extension)
    csv_lines = stack.store.get_bytes(buckets.models, curve_keys["csv"]).decode().splitlines()
    assert len(csv_lines) == 1 + n_sets
    for algorithm in E2E_ALGORITHMS:
        assert f"{algorithm}_f1_weighted" in csv_lines[0]
    assert stack.store.get_bytes(buckets.models, curve_keys["png"]).startswith(b"\x89PNG")
    assert stack.store.get_bytes(buckets.models, curve_keys["md"]).strip()
    artifacts = {Path(a.path).name for a in client.list_artifacts(metadata["run_id"], "aggregate")}
    assert {
        "learning_curve.csv",
        "learning_curve.md",
        "learning_curve.png",
        "model.onnx",
        "metadata.json",
    } <= artifacts

    # predict: becomes ready with that version and answers POST /predict like the ONNX file
    predict_url = stack.predict_url
    assert predict_url, "the stack has no predict function"

    def ready() -> Any:
        status, body = http_json(f"{predict_url}/ready")
        return status == 200 and body.get("model_version") == metadata["version"] and body

    assert stack.wait_for(ready, 120, 0.5), (
        f"predict not ready: {http_json(predict_url + '/ready')}"
    )
    row = test.iloc[0]
    features = {}
    for spec in metadata["inputs"]:
        value = row[spec["column"]]
        features[spec["column"]] = (
            None if pd.isna(value) else (float(value) if spec["kind"] == "numeric" else str(value))
        )
    status, body = http_json(f"{predict_url}/predict", {"features": features})
    assert status == 200, body
    assert body["model_version"] == metadata["version"]
    assert body["readmission_prediction"] == str(labels[0])
    for index, name in enumerate(metadata["classes"]):
        assert abs(body["probabilities"][name] - float(onnx_proba[0, index])) <= 1e-3

    # the same bytes again under another key: one dataset, nothing retrained or rewritten
    assert stack.wait_for(lambda: broker_idle(stack), 120, 0.5)
    before = etags(stack)
    runs_before = len(dataset_runs(client, dataset_id, ViewType.ALL))
    totals_before = stack.broker_status()["totals"]
    assert upload(stack, "e2e/again/same-bytes.csv", data) == dataset_id
    head = stack.store.head(buckets.raw, "e2e/again/same-bytes.csv")
    assert head is not None
    receipt = keys.receipt_key(buckets.raw, "e2e/again/same-bytes.csv", head.etag)
    assert stack.wait_for(lambda: stack.store.exists(buckets.datasets, receipt), 180, 0.5), (
        f"no ingest receipt for the second upload\n{stack.log('ingest', 30)}"
    )

    def settled() -> bool:
        totals = stack.broker_status()["totals"]
        return totals["delivered"] > totals_before["delivered"] and broker_idle(stack)

    assert stack.wait_for(settled, 120, 0.5)
    time.sleep(3)  # anything the second ingest might have fanned out would be queued by now
    assert broker_idle(stack)
    assert etags(stack) == before
    assert len(dataset_runs(client, dataset_id, ViewType.ALL)) == runs_before
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 1
    totals = stack.broker_status()["totals"]
    assert totals["dead_lettered"] == totals["dead_letter_file"] == 0
    assert stack.store.list_keys(buckets.dead_letter) == []


# --------------------------------------------------------------------------- 2. kill train


@pytest.mark.parametrize(
    ("kill_point", "every"),
    [
        ("fit", 10),  # ~10,200 rows -> ~7,100 train rows -> 2 jobs; killed inside the first fit
        ("run_created", 31),  # ~3,300 rows -> 1 job; killed while its MLflow run is RUNNING
    ],
)
def test_train_killed_mid_fit_is_redelivered(
    crash_stack: RunningStack, kill_point: str, every: int
) -> None:
    stack = crash_stack
    buckets = stack.settings.buckets
    client = mlflow_client(stack)
    data = sample_csv(every=every)
    dataset_id = upload(stack, f"crash/train-kill-{kill_point}.csv", data)

    killed_run = None
    if kill_point == "fit":
        assert stack.wait_for(lambda: subscriber_inflight(stack, "train") >= 1, 300, 0.2), (
            f"no training delivery in flight: {stack.broker_status()}"
        )
        snap = snapshot(stack, "train-1")
        time.sleep(3.0)  # inside the fit: gradient_boosting on 4,000+ rows takes well over 3 s
        assert stack.store.list_keys(buckets.results, f"{dataset_id}/") == [], "fit already over"
        assert dataset_runs(client, dataset_id) == [], "the run exists: the fit is over"
    else:
        snap = snapshot(stack, "train-1")

        def running_run() -> Any:
            runs = [r for r in dataset_runs(client, dataset_id) if r.info.status == "RUNNING"]
            return runs[0] if runs else None

        killed_run = stack.wait_for(running_run, 300, 0.1)
        assert killed_run is not None, f"never saw a RUNNING run\n{stack.log('train-1', 20)}"
        assert stack.store.list_keys(buckets.results, f"{dataset_id}/") == []
    assert subscriber_inflight(stack, "train") == 1
    retries_before = stack.broker_status()["totals"]["retries"]
    kill_group(snap)
    restart(stack, snap, stack.function_urls["train"][0])

    metadata = wait_champion(stack, dataset_id, "after killing train-1")
    status = stack.broker_status()
    assert status["totals"]["retries"] > retries_before, status
    assert status["dead_lettered_by_type"] == {}, status
    broker_log = stack.log("broker", 400)
    assert "type=io.readmission.job.created" in broker_log and "outcome=retry" in broker_log

    manifest = stack.store.get_json(buckets.datasets, keys.manifest_key(dataset_id))
    assert len(manifest["jobs"]) == (2 if kill_point == "fit" else 1), manifest["jobs"]
    assert sorted(stack.store.list_keys(buckets.results, f"{dataset_id}/")) == sorted(
        manifest["jobs"]
    )
    runs = assert_one_finished_run_per_job(client, dataset_id, manifest["jobs"])
    if killed_run is not None:  # the killed attempt's run was cleaned up by the redelivery
        stale = client.get_run(killed_run.info.run_id)
        assert stale.info.lifecycle_stage == "deleted", stale.info
        assert stale.info.status == "FAILED", stale.info
        assert killed_run.info.run_id not in {r.info.run_id for r in runs}
    versions = dataset_versions(client, dataset_id)
    assert len(versions) == 1, [v.version for v in versions]
    assert metadata["version"] == str(versions[0].version)
    assert_published_model_consistent(stack, metadata)


# --------------------------------------------------------------------------- 3. kill aggregate


@pytest.mark.parametrize(
    ("kill_point", "every"),
    [
        ("export", 30),  # in prepare_candidate: model loaded, tested, exported, parity checked
        ("registered", 29),  # the version exists, the artifacts/objects/alias are not all there
    ],
)
def test_aggregate_killed_mid_export_recovers(
    crash_stack: RunningStack, kill_point: str, every: int
) -> None:
    stack = crash_stack
    buckets = stack.settings.buckets
    data = sample_csv(every=every)  # ~3,400-3,500 rows -> one gradient_boosting job
    dataset_id = upload(stack, f"crash/aggregate-kill-{kill_point}.csv", data)
    lease = f"{dataset_id}/aggregate.lease"
    client = mlflow_client(stack)

    # the aggregator holds its lease from the moment all results are in until it has published
    assert stack.wait_for(lambda: stack.store.exists(buckets.models, lease), 600, 0.05), (
        f"the aggregator never started on {dataset_id}\n{stack.log('aggregate', 30)}"
    )
    snap = snapshot(stack, "aggregate")
    if kill_point == "export":
        time.sleep(0.5)  # into the load/test/export/parity work
        assert dataset_versions(client, dataset_id) == [], "registered before the kill"
    else:
        assert stack.wait_for(lambda: dataset_versions(client, dataset_id), 300, 0.1), (
            f"never registered\n{stack.log('aggregate', 30)}"
        )
    assert champion_of(stack, dataset_id) is None, "aggregation finished before the kill"
    retries_before = stack.broker_status()["totals"]["retries"]
    kill_group(snap)
    killed_at = time.monotonic()
    assert stack.store.exists(buckets.models, lease), "the killed aggregator left no lease?"
    restart(stack, snap, stack.function_urls["aggregate"][0])

    metadata = wait_champion(stack, dataset_id, "after killing aggregate")
    recovery = time.monotonic() - killed_at
    status = stack.broker_status()
    assert status["totals"]["retries"] > retries_before, status
    assert status["dead_lettered_by_type"] == {}, status

    versions = dataset_versions(client, dataset_id)
    assert len(versions) == 1, [v.version for v in versions]
    assert metadata["version"] == str(versions[0].version)
    assert client.get_model_version_by_alias(MODEL, "champion").version == metadata["version"]
    assert_published_model_consistent(stack, metadata)
    assert stack.wait_for(lambda: not stack.store.exists(buckets.models, lease), 30, 0.5)
    manifest = stack.store.get_json(buckets.datasets, keys.manifest_key(dataset_id))
    assert_one_finished_run_per_job(client, dataset_id, manifest["jobs"])
    print(f"aggregate killed; champion published {recovery:.1f}s after the kill")
