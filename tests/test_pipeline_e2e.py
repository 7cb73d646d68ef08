"""End-to-end and crash tests of the whole pipeline on the REAL local stack (no mocks).

A sample of the real UCI file goes into the raw bucket through S3; the filer webhook, the
events adapter, the broker (routing by infra/knative) and the functions-framework processes
do the rest. Two stacks (module-scoped, started on first use):

* ``e2e_stack``: 2 train workers, BATCH_ROWS=1000, two cheap algorithms, predict polling every
  second: the happy path and the re-upload of the same bytes under another key.
* ``crash_stack``: ONE train worker, BATCH_ROWS=4000, gradient_boosting only (slow enough to
  be killed mid-fit), no preparing ahead (the aggregator tests and exports under its lease):
  the aggregator (right after registering; during test/export/parity) and the train process
  (inside a fit; while its MLflow run is RUNNING) are SIGKILLed with their process group and
  restarted with the argv, env and working directory the supervisor gave them (read from
  /proc before the kill; the supervisor cannot restart one process). The broker's redelivery
  must finish the pipeline with exact counts. Each test drops its own sample of the real file,
  which grows the stack's one corpus by a version (its new rows; the sets of the versions
  before are reused, only re-scored): the first drop's version is the first model ever, so
  the kill after registering comes first; later versions are gated against the champion, so
  the tests check the decision the gate recorded rather than assume a promotion.

Run: ``.venv/bin/pytest tests/test_pipeline_e2e.py -m stack`` (about 5 minutes on 2 cores;
the aggregator tests wait for the killed holder's leases to expire, LEASE_TTL_SECONDS = 60).
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
from mlflow import MlflowClient
from mlflow.entities import ViewType
from support.seaweed_server import sample_csv
from support.stack import (
    RunningStack,
    decision_of,
    drop_record,
    running_stack,
    version_of,
    wait_version_done,
)

from readmission import keys, tracking
from readmission.features import to_model_frame
from readmission.localstack import processes
from readmission.training import validation_probabilities_key

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
        # the fan-in tests and exports the best model under its lease (not ahead of the last
        # result), so the aggregator can be killed there
        "PREPARE_AHEAD_MISSING": "0",
        # a fit's id includes the code version (`git describe --dirty` by default): pinned, so
        # a commit or an edit in the checkout while the module runs cannot stop the later
        # versions from reusing the fits of the earlier ones
        "CODE_VERSION": "crash-stack",
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
    """Put a drop into the raw bucket; its content id (the name of its drop record)."""
    stack.store.put_bytes(stack.settings.buckets.raw, key, data, "text/csv")
    return keys.content_id(data)


def new_version(stack: RunningStack, data: bytes) -> str:
    """The corpus version an uploaded drop made (it must add rows)."""
    version = version_of(stack, data, PIPELINE_TIMEOUT)
    assert version, f"drop {keys.content_id(data)} added nothing: {drop_record(stack, data)}"
    return version


def version_done(stack: RunningStack, dataset_id: str) -> bool:
    return stack.store.exists(stack.settings.buckets.models, keys.model_metadata_key(dataset_id))


def fitted_jobs(stack: RunningStack, manifest: dict[str, Any]) -> list[str]:
    """The version's jobs whose fit is new: its own cumulative sets. The sets of the versions
    before are reused: their results name the earlier version's run, re-scored."""
    results = stack.settings.buckets.results
    fitted = []
    for job in manifest["jobs"]:
        result = stack.store.get_json(results, job)
        own_set = result["cumulative_index"] >= manifest["reused_sets"]
        assert result["reused"] is (not own_set), (job, result["reused"], result["fitted_for"])
        if own_set:
            fitted.append(job)
    assert fitted, f"version {manifest['version']} fitted nothing: {manifest['jobs']}"
    return fitted


def broker_idle(stack: RunningStack) -> bool:
    totals = stack.broker_status()["totals"]
    return totals["queued"] == 0 and totals["inflight"] == 0


def subscriber_inflight(stack: RunningStack, service: str) -> int:
    subscribers = stack.broker_status()["subscribers"]
    return sum(s["inflight"] for name, s in subscribers.items() if service in name)


def etags(stack: RunningStack) -> dict[tuple[str, str], str]:
    """ETag of every pipeline output (ingest receipts and the transient leases excluded)."""
    buckets = stack.settings.buckets
    found = {}
    for bucket in (buckets.datasets, buckets.jobs, buckets.results, buckets.models):
        for info in stack.store.list(bucket):
            if bucket == buckets.datasets and info.key.startswith(keys.RECEIPTS_PREFIX):
                continue
            if info.key.endswith(".lease"):  # aggregate, decisions, corpus/append
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


def assert_published_model_consistent(
    stack: RunningStack, client: MlflowClient, metadata: dict[str, Any]
) -> tuple[bytes, dict[str, Any]]:
    """<id>/metadata.json is the version's model, as its decision says: registered once if
    it is a new model (else it is the champion's own fit and names the champion's version);
    promoted: champion/metadata.json and the alias champion; kept: challenger/metadata.json
    and the alias challenger. It names an ONNX matching its sha256. (ONNX bytes, decision)"""
    models = stack.settings.buckets.models
    dataset_id = metadata["dataset_id"]
    own_bytes = stack.store.get_bytes(models, keys.model_metadata_key(dataset_id))
    assert json.loads(own_bytes) == metadata
    decision = decision_of(stack, dataset_id)
    assert decision["corpus_version"] == dataset_id
    versions = [v.version for v in dataset_versions(client, dataset_id)]
    if decision["new_model"]:
        assert versions == [metadata["version"]], versions
        assert decision["challenger"]["model_version"] == metadata["version"]
    else:  # the champion's own fit won again: nothing registered
        assert versions == [], versions
        assert metadata["version"] == decision["champion"]["model_version"], decision
    if decision["verdict"] == "promoted":
        assert stack.store.get_bytes(models, keys.CHAMPION_METADATA_KEY) == own_bytes
        assert client.get_model_version_by_alias(MODEL, "champion").version == metadata["version"]
    else:
        assert decision["verdict"] == "kept", decision
        champion = stack.store.get_json(models, keys.CHAMPION_METADATA_KEY)
        assert champion["version"] == decision["champion_after"]["model_version"]
        if decision["new_model"]:
            assert stack.store.get_bytes(models, keys.CHALLENGER_METADATA_KEY) == own_bytes
            alias = client.get_model_version_by_alias(MODEL, "challenger")
            assert alias.version == metadata["version"]
    assert metadata["model_bucket"] == models
    assert metadata["model_key"] == keys.model_key(dataset_id)
    onnx_bytes = stack.store.get_bytes_if_exists(models, metadata["model_key"])
    assert onnx_bytes, f"metadata names {metadata['model_key']}, which does not exist"
    assert hashlib.sha256(onnx_bytes).hexdigest() == metadata["model_sha256"]
    ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])  # a loadable model
    return onnx_bytes, decision


# --------------------------------------------------------------------------- 1. end to end


def test_end_to_end_then_same_bytes_again(e2e_stack: RunningStack) -> None:
    stack = e2e_stack
    buckets = stack.settings.buckets
    data = sample_csv(every=25)  # ~4,070 rows of the real file -> ~2,800 train rows
    drop_id = upload(stack, "e2e/first-upload.csv", data)
    dataset_id = new_version(stack, data)

    metadata = wait_version_done(stack, dataset_id, PIPELINE_TIMEOUT)
    manifest = stack.store.get_json(buckets.datasets, keys.manifest_key(dataset_id))
    # the first drop of a fresh stack: the corpus's first version, all of its rows
    assert (manifest["number"], manifest["parent"], manifest["drops"]) == (1, None, [drop_id])
    assert manifest["reused_sets"] == 0 and manifest["added"]["duplicates"] == 0
    assert stack.store.get_json(buckets.datasets, keys.CORPUS_HEAD_KEY)["version"] == dataset_id
    n_sets = len(manifest["cumulative_sets"])
    assert 3 <= n_sets <= 5, f"sample gave {n_sets} cumulative sets"
    assert manifest["algorithms"] == list(E2E_ALGORITHMS)
    assert len(manifest["jobs"]) == n_sets * len(E2E_ALGORITHMS)
    results = stack.store.list_keys(buckets.results, f"{dataset_id}/")
    # each result document, and the validation probabilities written just before it
    assert sorted(results) == sorted(
        [*manifest["jobs"], *(validation_probabilities_key(job) for job in manifest["jobs"])]
    )

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

    # the first model ever is promoted; ONNX in the bucket == metadata sha256, and == the
    # registered MLflow model on the test split
    onnx_bytes, decision = assert_published_model_consistent(stack, client, metadata)
    assert (decision["verdict"], decision["sequence"]) == ("promoted", 1)
    assert decision["champion"] is None  # there was none to beat
    assert stack.store.get_json(buckets.models, keys.LAST_DECISION_KEY) == decision
    test = pd.concat(
        [
            pd.read_parquet(io.BytesIO(stack.store.get_bytes(buckets.datasets, key)))
            for key in manifest["test"]["keys"]
        ],
        ignore_index=True,
    )
    assert manifest["test"]["keys"] == [keys.test_key(dataset_id)]
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

    # the same bytes again under another key: one drop, nothing appended, retrained or rewritten
    assert stack.wait_for(lambda: broker_idle(stack), 120, 0.5)
    before = etags(stack)
    runs_before = len(dataset_runs(client, dataset_id, ViewType.ALL))
    totals_before = stack.broker_status()["totals"]
    assert upload(stack, "e2e/again/same-bytes.csv", data) == drop_id
    head = stack.store.head(buckets.raw, "e2e/again/same-bytes.csv")
    assert head is not None
    receipt_key = keys.receipt_key(buckets.raw, "e2e/again/same-bytes.csv", head.etag)
    receipt = stack.wait_for(
        lambda: stack.store.get_json_if_exists(buckets.datasets, receipt_key), 180, 0.5
    )
    assert receipt, f"no ingest receipt for the second upload\n{stack.log('ingest', 30)}"
    assert (receipt["status"], receipt["version"]) == ("already_ingested", dataset_id), receipt

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


# --------------------------------------------------------------------------- 2. kill aggregate


@pytest.mark.parametrize(
    ("kill_point", "every"),
    [
        # first (the crash stack's first drop, ~3,500 rows -> one gradient_boosting job): the
        # first model ever is registered and promoted, whatever it scores. Killed once the
        # version exists, before the artifacts/objects/alias are all there
        ("registered", 29),
        # ~3,400 rows, ~3,300 of them new: the version adds one set (one fit, one reuse).
        # Killed in prepare_candidate: model loaded, tested, exported, parity checked
        ("export", 30),
    ],
)
def test_aggregate_killed_mid_export_recovers(
    crash_stack: RunningStack, kill_point: str, every: int
) -> None:
    stack = crash_stack
    buckets = stack.settings.buckets
    data = sample_csv(every=every)
    upload(stack, f"crash/aggregate-kill-{kill_point}.csv", data)
    dataset_id = new_version(stack, data)
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
    assert not version_done(stack, dataset_id), "aggregation finished before the kill"
    retries_before = stack.broker_status()["totals"]["retries"]
    kill_group(snap)
    killed_at = time.monotonic()
    assert stack.store.exists(buckets.models, lease), "the killed aggregator left no lease?"
    restart(stack, snap, stack.function_urls["aggregate"][0])

    metadata = wait_version_done(stack, dataset_id, PIPELINE_TIMEOUT)
    recovery = time.monotonic() - killed_at
    status = stack.broker_status()
    assert status["totals"]["retries"] > retries_before, status
    assert status["dead_lettered_by_type"] == {}, status

    _, decision = assert_published_model_consistent(stack, client, metadata)
    if kill_point == "registered":
        assert decision["new_model"], decision  # the kill came after its registration
    for held in (lease, keys.DECISION_LEASE_KEY):
        assert stack.wait_for(lambda h=held: not stack.store.exists(buckets.models, h), 30, 0.5)
    manifest = stack.store.get_json(buckets.datasets, keys.manifest_key(dataset_id))
    assert_one_finished_run_per_job(client, dataset_id, fitted_jobs(stack, manifest))
    print(
        f"aggregate killed; version {dataset_id} decided ({decision['verdict']}) "
        f"{recovery:.1f}s after the kill"
    )


# --------------------------------------------------------------------------- 3. kill train


@pytest.mark.parametrize(
    ("kill_point", "every"),
    [
        # ~10,200 rows, ~6,500 of them new -> 2 new sets (~8,700 and ~9,300 training rows) on
        # top of the versions before; killed inside the first (biggest) fit
        ("fit", 10),
        # ~3,300 rows, ~2,850 new -> 1 new set; killed while its MLflow run is RUNNING
        ("run_created", 31),
    ],
)
def test_train_killed_mid_fit_is_redelivered(
    crash_stack: RunningStack, kill_point: str, every: int
) -> None:
    stack = crash_stack
    buckets = stack.settings.buckets
    client = mlflow_client(stack)
    data = sample_csv(every=every)
    upload(stack, f"crash/train-kill-{kill_point}.csv", data)
    dataset_id = new_version(stack, data)  # recorded before its job specs are written

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

    metadata = wait_version_done(stack, dataset_id, PIPELINE_TIMEOUT)
    status = stack.broker_status()
    assert status["totals"]["retries"] > retries_before, status
    assert status["dead_lettered_by_type"] == {}, status
    broker_log = stack.log("broker", 400)
    assert "type=io.readmission.job.created" in broker_log and "outcome=retry" in broker_log

    manifest = stack.store.get_json(buckets.datasets, keys.manifest_key(dataset_id))
    documents = [
        k for k in stack.store.list_keys(buckets.results, f"{dataset_id}/") if k.endswith(".json")
    ]
    assert sorted(documents) == sorted(manifest["jobs"])
    # one job per cumulative set (one algorithm); the sets of the versions before are reused
    sets = len(manifest["cumulative_sets"])
    assert len(manifest["jobs"]) == sets, manifest["jobs"]
    fitted = fitted_jobs(stack, manifest)
    assert len(fitted) == sets - manifest["reused_sets"], (fitted, manifest["reused_sets"])
    runs = assert_one_finished_run_per_job(client, dataset_id, fitted)
    if killed_run is not None:  # the killed attempt's run was cleaned up by the redelivery
        stale = client.get_run(killed_run.info.run_id)
        assert stale.info.lifecycle_stage == "deleted", stale.info
        assert stale.info.status == "FAILED", stale.info
        assert killed_run.info.run_id not in {r.info.run_id for r in runs}
    assert_published_model_consistent(stack, client, metadata)
