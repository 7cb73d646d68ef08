"""The aggregator against a REAL SeaweedFS S3 server and a REAL MLflow server.

Scenario: a few thousand rows sampled from the real CSV (env DIABETES_CSV), ingested by
readmission.ingest into manifest + Parquet batches + job specs, every job trained by
readmission.training.train_job (a real MLflow run, skops model), its result document
parked in a staging bucket and copied to the results bucket when a test wants it to arrive.
Then the aggregator is exercised: waiting, a tampered ONNX, the aggregation itself,
redelivery, concurrency, a second dataset taking over the champion.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnx
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow import MlflowClient
from sklearn.metrics import brier_score_loss
from support.mlflow_server import MlflowServer, logged_model_dir, rewritten
from support.python_snippet import run_python
from support.seaweed_server import SeaweedServer

from readmission import contract, decisions, drift_reports, keys, lease, registry, tracking
from readmission.aggregate import AggregateOutcome, InvalidResult, aggregate_dataset, lease_key
from readmission.candidate import select_candidate
from readmission.config import Buckets, Settings
from readmission.corpus_append import parquet_bytes
from readmission.features import target_values, to_model_frame
from readmission.gate import paired_bootstrap
from readmission.ingest import ingest_object
from readmission.jobs import job_spec
from readmission.onnx_export import ExportedModel, export_onnx
from readmission.onnx_parity import ParityError, run_onnx
from readmission.scoring import compute_metrics
from readmission.selection import job_of, leader
from readmission.storage import ObjectStore, json_bytes
from readmission.training import VALIDATION_PROBABILITIES, train_job

ROOT = Path(__file__).resolve().parents[1]
CSV = Path(os.environ.get("DIABETES_CSV") or ROOT / "../shared/data/diabetic_data.csv.gz")
SAMPLE_ROWS = 4000
BATCH_ROWS = 1000
ALGORITHMS = ("logistic_regression", "decision_tree", "random_forest")
MODEL_NAME = "diabetes_readmission_model"

pytestmark = pytest.mark.stack


# --- servers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[SeaweedServer, MlflowServer]]:
    seaweed = SeaweedServer().start()
    mlflow_server = MlflowServer()
    try:
        mlflow_server.start()
        yield seaweed, mlflow_server
    finally:
        mlflow_server.stop()
        seaweed.stop()


@pytest.fixture(scope="module")
def settings(servers: tuple[SeaweedServer, MlflowServer]) -> Iterator[Settings]:
    seaweed, mlflow_server = servers
    env = {**seaweed.env(), "MLFLOW_TRACKING_URI": mlflow_server.uri}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield Settings(
            s3_endpoint_url=seaweed.endpoint_url,
            buckets=Buckets(),
            batch_rows=BATCH_ROWS,
            algorithms=ALGORITHMS,
            mlflow_tracking_uri=mlflow_server.uri,
            mlflow_experiment="aggregate-test",
            registered_model=MODEL_NAME,
        )
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def store(settings: Settings) -> ObjectStore:
    object_store = ObjectStore.from_settings(settings)
    object_store.ensure_buckets(settings.buckets.all())
    return object_store


@pytest.fixture(scope="module")
def client(settings: Settings) -> MlflowClient:
    return registry.client_for(settings.mlflow_tracking_uri)


# --- the scenario: ingest, train, results -------------------------------------------------


def sample_csv(rows: int, seed: int) -> bytes:
    """Header + `rows` lines drawn at random from the real file."""
    if not CSV.exists():
        pytest.fail(f"the diabetes CSV is missing: {CSV} (set DIABETES_CSV)")
    with gzip.open(CSV, "rt") if CSV.suffix == ".gz" else CSV.open() as handle:
        header, *lines = handle.read().splitlines()
    picked = random.Random(seed).sample(lines, rows)
    return ("\n".join([header, *picked]) + "\n").encode()


def read_split(store: ObjectStore, key: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(store.get_bytes("datasets", key)))


@dataclass
class Scenario:
    dataset_id: str
    manifest: dict[str, Any]
    results: dict[str, dict[str, Any]]  # result key -> document (not all written yet)


@pytest.fixture(scope="module")
def scenario(store: ObjectStore, settings: Settings, client: MlflowClient) -> Scenario:
    data = sample_csv(SAMPLE_ROWS, seed=7)
    store.put_bytes("raw", "sample.csv", data, "text/csv")
    outcome = ingest_object(store, settings, "raw", "sample.csv")
    dataset_id = outcome.dataset_id
    assert outcome.status == "ingested" and dataset_id
    manifest = store.get_json("datasets", keys.manifest_key(dataset_id))
    assert len(manifest["jobs"]) == len(ALGORITHMS) * len(manifest["cumulative_sets"]) >= 6
    # The training step itself, with its results parked in a staging bucket: each test
    # decides when a result "arrives" in the results bucket.
    staging = replace(settings, buckets=replace(settings.buckets, results="results-staging"))
    store.ensure_buckets(["results-staging"])
    results = {
        key: train_job(store, staging, store.get_json("jobs", key), client)
        for key in manifest["jobs"]
    }
    return Scenario(dataset_id, manifest, results)


def validation_probabilities(
    store: ObjectStore, scenario: Scenario
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(the validation rows' class codes, job -> its stored validation probabilities)."""
    probabilities, classes = {}, None
    for result in scenario.results.values():
        entry = result[VALIDATION_PROBABILITIES]
        data = store.get_bytes("results-staging", entry["key"])
        probabilities[job_of(result)] = np.load(io.BytesIO(data))
        classes = entry["classes"]
    validation = pd.concat(
        [read_split(store, key) for key in scenario.manifest["validation"]["keys"]]
    )
    codes = pd.Index(classes).get_indexer(target_values(validation))
    return codes, probabilities


def selected(store: ObjectStore, settings: Settings, scenario: Scenario) -> dict[str, Any]:
    """The result the aggregator serves (readmission.candidate.select_candidate)."""
    staging = replace(settings, buckets=replace(settings.buckets, results="results-staging"))
    validation = pd.concat(
        [read_split(store, key) for key in scenario.manifest["validation"]["keys"]],
        ignore_index=True,
    )
    results = list(scenario.results.values())
    return dict(select_candidate(store, staging, results, validation).best)


def write_results(store: ObjectStore, scenario: Scenario, keys_: list[str]) -> None:
    """The results `keys_` arrive, each after the validation probabilities it names."""
    for key in keys_:
        named = scenario.results[key][VALIDATION_PROBABILITIES]["key"]
        if not store.exists("results", named):  # trained into the staging bucket
            store.copy("results-staging", named, "results", named)
        store.put_json("results", key, scenario.results[key])


def versions(client: MlflowClient, dataset_id: str | None = None) -> list[Any]:
    found = client.search_model_versions(f"name = '{MODEL_NAME}'")
    return sorted(
        (v for v in found if dataset_id is None or v.tags.get("dataset_id") == dataset_id),
        key=lambda v: int(v.version),
    )


def aggregator_keys(store: ObjectStore) -> list[str]:
    """The keys of the models bucket but ingest's drift reports."""
    return [k for k in store.list_keys("models") if not k.startswith(keys.REPORTS_PREFIX)]


def model_objects(store: ObjectStore) -> dict[str, tuple[str, Any]]:
    """key -> (etag, last modified) of every object in the models bucket."""
    out = {}
    for key in store.list_keys("models"):
        head = store.client.head_object(Bucket="models", Key=key)
        out[key] = (head["ETag"], head["LastModified"])
    return out


def tampered_exporter(pipeline: Any, sample: pd.DataFrame) -> ExportedModel:
    """A real export whose `probabilities` output is then scaled by 0.98 inside the graph:
    an ONNX file that no longer reproduces the pipeline (argmax unchanged)."""
    exported = export_onnx(pipeline)
    model = onnx.load_from_string(exported.onnx_bytes)
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["probabilities_raw" if o == "probabilities" else o for o in node.output]
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.98, np.float32), "scale"))
    graph.node.append(
        onnx.helper.make_node("Mul", ["probabilities_raw", "scale"], ["probabilities"])
    )
    onnx.checker.check_model(model)
    return replace(exported, onnx_bytes=model.SerializeToString())


# --- selection (pure) ----------------------------------------------------------------------


def _result(index: int, algorithm: str, f1: float | None, auc: float | None) -> dict[str, Any]:
    validation = {"f1_weighted": f1, "roc_auc_ovr": auc}
    return {
        "cumulative_index": index,
        "algorithm": algorithm,
        "metrics": {"validation": validation},
    }


def test_selection_by_metric_then_auc_then_job_key_in_any_order() -> None:
    results = [
        _result(2, "random_forest", 0.55, 0.60),
        _result(1, "gradient_boosting", 0.56, 0.61),
        _result(0, "logistic_regression", 0.56, 0.65),  # ties on F1, wins on AUC
        _result(3, "decision_tree", None, 0.99),  # no F1: never selected
    ]
    for ordering in (results, results[::-1], results[1:] + results[:1]):
        assert leader(ordering, "f1_weighted")["algorithm"] == "logistic_regression"
    twins = [_result(3, "decision_tree", 0.5, 0.6), _result(1, "random_forest", 0.5, 0.6)]
    assert leader(twins, "f1_weighted")["cumulative_index"] == 1  # smaller job key
    assert leader(twins[::-1], "f1_weighted")["cumulative_index"] == 1
    assert leader(results, "roc_auc_ovr")["algorithm"] == "decision_tree"
    with pytest.raises(ValueError, match="f1_wieghted"):
        leader(results, "f1_wieghted")


def test_prepare_ahead_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREPARE_AHEAD_MISSING", raising=False)
    assert Settings.from_env().prepare_ahead_missing == 4
    monkeypatch.setenv("PREPARE_AHEAD_MISSING", "0")  # never
    assert Settings.from_env().prepare_ahead_missing == 0
    monkeypatch.setenv("PREPARE_AHEAD_MISSING", "-1")
    with pytest.raises(ValueError, match="PREPARE_AHEAD_MISSING"):
        Settings.from_env()


# --- tests, in order: the module's state builds up ----------------------------------------


def test_waits_until_every_listed_job_has_a_result(
    store: ObjectStore, settings: Settings, client: MlflowClient, scenario: Scenario
) -> None:
    jobs = scenario.manifest["jobs"]
    outcome = aggregate_dataset(store, settings, scenario.dataset_id)
    assert (outcome.status, outcome.results_found, outcome.results_expected) == (
        "waiting",
        0,
        len(jobs),
    )
    write_results(store, scenario, jobs[:-1])
    outcome = aggregate_dataset(store, settings, scenario.dataset_id)
    assert outcome.status == "waiting"
    assert outcome.message == (
        f"waiting ({len(jobs) - 1} of {len(jobs)} results); "
        "the best so far is tested and exported ahead"
    )
    assert aggregator_keys(store) == []  # preparing ahead writes nothing
    assert client.search_registered_models() == []


def test_a_result_without_manifest_is_logged_and_ignored(
    store: ObjectStore, settings: Settings
) -> None:
    outcome = aggregate_dataset(store, settings, "0123456789abcdef")
    assert outcome.status == "no_manifest"
    assert aggregator_keys(store) == []


def test_tampered_onnx_fails_parity_and_registers_nothing(
    store: ObjectStore, settings: Settings, client: MlflowClient, scenario: Scenario
) -> None:
    write_results(store, scenario, scenario.manifest["jobs"][-1:])
    with pytest.raises(ParityError, match="tolerance"):
        aggregate_dataset(store, settings, scenario.dataset_id, exporter=tampered_exporter)
    assert versions(client) == []
    assert aggregator_keys(store) == []  # nothing written, and the lease was released


def test_aggregates_all_results_into_one_champion(
    store: ObjectStore, settings: Settings, client: MlflowClient, scenario: Scenario
) -> None:
    dataset_id = scenario.dataset_id
    outcome = aggregate_dataset(store, settings, dataset_id)
    assert outcome.status == "aggregated", outcome
    assert outcome.champion_written and outcome.version == "1"

    # the selection: the leader has the best validation F1; the served model is tied with it
    # (paired bootstrap of the stored validation probabilities, computed here independently)
    # and has the highest validation ROC-AUC of the tied
    results = list(scenario.results.values())
    top = max(r["metrics"]["validation"]["f1_weighted"] for r in results)
    leading = leader(results, "f1_weighted")
    assert leading["metrics"]["validation"]["f1_weighted"] == top
    codes, probabilities = validation_probabilities(store, scenario)
    tied = [
        r
        for r in results
        if paired_bootstrap(
            "f1_weighted",
            codes,
            probabilities[job_of(r)],
            probabilities[job_of(leading)],
            settings.gate_resamples,
            settings.gate_seed,
            0.95,
        )[1]
        >= 0
    ]
    best = max(tied, key=lambda r: r["metrics"]["validation"]["roc_auc_ovr"])
    assert best == selected(store, settings, scenario)

    # the registry: exactly one version, alias champion, tags and description
    [version] = versions(client)
    assert version.tags["dataset_id"] == dataset_id
    assert version.tags["selection_metric"] == "f1_weighted"
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == "1"
    assert best["algorithm"] in version.description
    assert (
        f"{best['training_rows']:,} rows" in version.description and "test" in version.description
    )

    # the models bucket
    prefix = f"{dataset_id}/"
    assert sorted(aggregator_keys(store)) == sorted(
        [
            "champion/metadata.json",
            "champion/last-decision.json",
            keys.decision_key(dataset_id),
            prefix + "learning_curve.csv",
            prefix + "learning_curve.md",
            prefix + "learning_curve.png",
            prefix + "metadata.json",
            prefix + "model.onnx",
            prefix + "quality.json",
            prefix + "reference.json",
            prefix + "reliability.png",
            prefix + "model_card.json",
            prefix + "model_card.md",
        ]
    )
    metadata = store.get_json("models", prefix + "metadata.json")
    # the training reference of the drift reports: the selected set's training rows
    profile = store.get_json("models", metadata["reference"]["key"])
    assert profile["rows"] == metadata["reference"]["rows"] == best["training_rows"]
    assert profile["source"]["cumulative_index"] == best["cumulative_index"]
    # the first drop's drift report (nothing to compare with) is logged with the version (the
    # run's artifacts: below)
    assert version.tags["drift.status"] == "no_reference"
    assert version.tags["drift.drop"] == scenario.manifest["drops"][-1]
    assert store.get_bytes("models", "champion/metadata.json") == json_bytes(metadata)
    # the first model ever is promoted without a gate, and that is a recorded decision
    decision = store.get_json("models", keys.decision_key(dataset_id))
    assert decision["verdict"] == "promoted" and decision["sequence"] == 1
    assert decision["reason"].startswith("first model") and decision["champion"] is None
    assert decision["champion_after"] == {"model_version": "1", "corpus_version": dataset_id}
    assert store.get_json("models", keys.LAST_DECISION_KEY) == decision
    assert version.tags["decision.verdict"] == "promoted"
    onnx_bytes = store.get_bytes("models", metadata["model_key"])
    assert metadata["model_sha256"] == hashlib.sha256(onnx_bytes).hexdigest()
    assert metadata["version"] == "1" and metadata["run_id"] == best["run_id"]
    assert metadata["algorithm"] == best["algorithm"]
    assert metadata["classes"] == sorted(["<30", ">30", "NO"])
    assert len(metadata["inputs"]) == 47
    assert metadata["outputs"] == {"label": "label", "probabilities": "probabilities"}
    assert set(metadata["explain_baseline"]) == {i["column"] for i in metadata["inputs"]}
    numeric = {i["column"] for i in metadata["inputs"] if i["kind"] == "numeric"}
    assert set(metadata["input_ranges"]) == numeric
    assert all(r["min"] <= r["max"] for r in metadata["input_ranges"].values())
    assert metadata["registered_at"].endswith("Z")
    assert set(metadata["metrics"]["test"]) == {
        "accuracy",
        "precision_weighted",
        "recall_weighted",
        "f1_weighted",
        "f1_macro",
        "roc_auc_ovr",
    }

    # the served ONNX reproduces the registered model on the whole test split
    [test_key] = scenario.manifest["test"]["keys"]
    test = read_split(store, test_key)
    model = tracking.load_pipeline(f"models:/{MODEL_NAME}@champion")
    labels, probabilities = run_onnx(onnx_bytes, test)
    assert (labels == model.classes_[probabilities.argmax(axis=1)]).all()
    expected = model.predict_proba(to_model_frame(test))
    assert np.max(np.abs(probabilities - expected)) <= 1e-4
    assert (probabilities.argmax(axis=1) == expected.argmax(axis=1)).all()
    test_metrics = compute_metrics(model, to_model_frame(test), target_values(test))
    assert metadata["metrics"]["test"] == pytest.approx(test_metrics)

    # the learning curve covers every result
    curve = store.get_bytes("models", prefix + "learning_curve.csv").decode().splitlines()
    assert len(curve) == 1 + len(scenario.manifest["cumulative_sets"])
    assert store.get_bytes("models", prefix + "learning_curve.png").startswith(b"\x89PNG")
    curve_md = store.get_bytes("models", prefix + "learning_curve.md").decode()
    assert "Verdict" in curve_md and "within noise of the best from" in curve_md
    assert metadata["selection"]["selected"] == job_of(best)
    assert metadata["selection"]["leader"] == job_of(leading)

    # the quality report: the test Brier is sklearn's on the test rows, the summary is in the
    # metadata and the reliability diagram is beside the model
    report = store.get_json("models", prefix + "quality.json")
    y_test = target_values(test)
    briers = {
        str(c): brier_score_loss(y_test == c, expected[:, i]) for i, c in enumerate(model.classes_)
    }
    assert report["splits"]["test"]["brier"] == pytest.approx(briers, abs=1e-6)
    assert report["splits"]["test"]["brier_mean"] == pytest.approx(
        np.mean(list(briers.values())), abs=1e-6
    )
    assert report["splits"]["test"]["rows"] == len(test)
    assert set(report["splits"]) == {"validation", "test"}
    assert metadata["quality"]["test"]["brier"] == report["splits"]["test"]["brier"]
    assert metadata["quality"]["test"]["ece"] == report["splits"]["test"]["ece"]
    assert metadata["quality"]["flagged_groups"] == report["splits"]["test"]["flagged"]
    assert metadata["quality"]["report"] == prefix + "quality.json"
    assert store.get_bytes("models", prefix + "reliability.png").startswith(b"\x89PNG")

    # ... the model card: use and limits, data, every metric, the selection and its interval
    card = store.get_json("models", metadata["model_card"]["json"])
    assert card["model"]["training_rows"] == best["training_rows"]
    assert card["metrics"] == metadata["metrics"]
    assert card["positive_class_recall"]["test"] == report["splits"]["test"]["overall"]["recall"]
    assert card["calibration"]["test"]["ece"] == report["splits"]["test"]["ece"]
    assert card["selection"]["selected"] == job_of(best)
    low, high = card["selection"]["selected_interval"]
    assert high >= 0 and low <= card["selection"]["selected_difference"] <= high
    assert card["flagged_groups"] == report["splits"]["test"]["flagged"]
    card_md = store.get_bytes("models", metadata["model_card"]["md"]).decode()
    assert "Not for clinical decisions" in card_md and "Strack" in card_md

    # ... and the winning run got the artifacts and the test metrics
    artifacts = {Path(f.path).name for f in client.list_artifacts(best["run_id"], "aggregate")}
    assert artifacts == {
        "learning_curve.csv",
        "learning_curve.md",
        "learning_curve.png",
        "metadata.json",
        "model.onnx",
        "quality.json",
        "reliability.png",
        "model_card.json",
        "model_card.md",
        "drift.json",
        "drift.md",
    }
    run = client.get_run(best["run_id"])
    assert run.data.metrics["test_f1_weighted"] == pytest.approx(test_metrics["f1_weighted"])
    assert run.data.metrics["test_brier_mean"] == pytest.approx(
        np.mean(list(briers.values())), abs=1e-6
    )
    assert run.data.metrics["test_ece_lt30"] == pytest.approx(
        report["splits"]["test"]["ece"]["<30"]
    )


def test_redelivery_and_concurrent_calls_change_nothing(
    store: ObjectStore, settings: Settings, client: MlflowClient, scenario: Scenario
) -> None:
    before = model_objects(store)
    time.sleep(1.1)  # LastModified has a resolution of one second: a rewrite would show
    outcome = aggregate_dataset(store, settings, scenario.dataset_id)
    assert outcome.status == "already_aggregated" and not outcome.champion_written

    outcomes: list[AggregateOutcome] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            outcomes.append(aggregate_dataset(store, settings, scenario.dataset_id))
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert errors == [] and [o.status for o in outcomes] == ["already_aggregated"] * 2
    assert len(versions(client)) == 1
    assert model_objects(store) == before  # no object rewritten (same ETag, same time)


def test_a_crash_before_the_version_is_done_reapplies_its_recorded_decision(
    store: ObjectStore, settings: Settings, client: MlflowClient, scenario: Scenario
) -> None:
    # The previous invocation died after recording the decision, before applying it fully
    # and writing <id>/metadata.json (the version's "done" mark, written last).
    expected = store.get_bytes("models", f"{scenario.dataset_id}/metadata.json")
    decision = store.get_bytes("models", keys.decision_key(scenario.dataset_id))
    store.delete("models", "champion/metadata.json")
    store.delete("models", f"{scenario.dataset_id}/metadata.json")
    outcome = aggregate_dataset(store, settings, scenario.dataset_id)
    assert outcome.status == "aggregated" and outcome.champion_written
    assert store.get_bytes("models", "champion/metadata.json") == expected
    assert store.get_bytes("models", f"{scenario.dataset_id}/metadata.json") == expected
    # the same decision, not a second one
    assert store.get_bytes("models", keys.decision_key(scenario.dataset_id)) == decision
    assert len(versions(client)) == 1


def copy_dataset(store: ObjectStore, scenario: Scenario, new_id: str) -> Scenario:
    """The same data under another dataset id (manifest, splits and results rewritten)."""
    old = scenario.dataset_id
    text = json.dumps(scenario.manifest).replace(old, new_id)
    manifest = json.loads(text)
    for key in store.list_keys("datasets", f"{old}/"):
        store.copy("datasets", key, "datasets", key.replace(old, new_id, 1))
    store.put_json("datasets", keys.manifest_key(new_id), manifest)
    results = {
        key.replace(old, new_id, 1): {**doc, "dataset_id": new_id}
        for key, doc in scenario.results.items()
    }
    return Scenario(new_id, manifest, results)


def test_a_version_whose_best_is_the_champions_own_fit_registers_nothing_and_keeps_it(
    store: ObjectStore, settings: Settings, client: MlflowClient, scenario: Scenario
) -> None:
    # The same rows again (as a later corpus version whose sets are all reused): concurrent
    # aggregations record one decision, "kept", and register no second model.
    second = copy_dataset(store, scenario, "feedfacecafebeef")
    write_results(store, second, list(second.results))
    outcomes: list[AggregateOutcome] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            outcomes.append(aggregate_dataset(store, settings, second.dataset_id))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert errors == []
    assert sorted(o.status for o in outcomes) == ["aggregated", "already_aggregated"]
    assert versions(client, second.dataset_id) == [] and len(versions(client)) == 1
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == "1"
    champion = store.get_json("models", "champion/metadata.json")
    assert champion["dataset_id"] == scenario.dataset_id
    decision = store.get_json("models", keys.decision_key(second.dataset_id))
    assert decision["verdict"] == "kept" and "own fit" in decision["reason"]
    assert decision["sequence"] == 2 and not decision["new_model"]
    assert not store.exists("models", "challenger/metadata.json")
    assert store.get_json("models", f"{second.dataset_id}/metadata.json")["version"] == "1"
    assert not store.exists("models", lease_key(second.dataset_id))

    # A late redelivery for the FIRST dataset must not take the champion back.
    before = model_objects(store)
    time.sleep(1.1)
    outcome = aggregate_dataset(store, settings, scenario.dataset_id)
    assert outcome.status == "already_aggregated" and not outcome.champion_written
    assert model_objects(store) == before


SHUFFLED_ID = "5ca1ab1e5ca1ab1e"
GOOD_AGAIN_ID = "600dbeef600dbeef"


def shuffled_labels_copy(
    store: ObjectStore,
    settings: Settings,
    client: MlflowClient,
    scenario: Scenario,
    new_id: str = SHUFFLED_ID,
) -> Scenario:
    """The scenario's rows under another version id, with the training labels shuffled, and
    one job (logistic regression on every batch) trained on them for real."""
    copy = copy_dataset(store, scenario, new_id)
    rng = np.random.default_rng(3)
    for batch in copy.manifest["batches"]:
        frame = read_split(store, batch["key"])
        frame[contract.TARGET] = rng.permutation(frame[contract.TARGET].to_numpy())
        store.put_bytes("datasets", batch["key"], parquet_bytes(pa.Table.from_pandas(frame)))
    last = len(copy.manifest["cumulative_sets"]) - 1
    job = keys.job_key(new_id, last, "logistic_regression")
    copy.manifest["jobs"] = [job]
    store.put_json("datasets", keys.manifest_key(new_id), copy.manifest)
    result = train_job(store, settings, job_spec(copy.manifest, job, "datasets"), client)
    return Scenario(new_id, copy.manifest, {job: result})


def test_a_challenger_trained_on_shuffled_labels_is_kept_and_the_decision_recorded(
    store: ObjectStore, settings: Settings, client: MlflowClient, scenario: Scenario
) -> None:
    champion_before = store.get_bytes("models", "champion/metadata.json")
    shuffled = shuffled_labels_copy(store, settings, client, scenario)
    outcome = aggregate_dataset(store, settings, shuffled.dataset_id)
    assert outcome.status == "aggregated" and outcome.decision == "kept", outcome
    assert not outcome.champion_written
    # the champion stays: alias, served metadata
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == "1"
    assert store.get_bytes("models", "champion/metadata.json") == champion_before
    # the challenger is registered, aliased and published for the page
    [version] = versions(client, SHUFFLED_ID)
    assert client.get_model_version_by_alias(MODEL_NAME, "challenger").version == version.version
    challenger = store.get_json("models", "challenger/metadata.json")
    assert challenger["dataset_id"] == SHUFFLED_ID and challenger["version"] == version.version
    # the decision: both models, both scores on the same rows, the interval, the rule, why
    decision = store.get_json("models", keys.decision_key(SHUFFLED_ID))
    assert decision["kind"] == "gate" and decision["verdict"] == "kept"
    assert decision["challenger"]["model_version"] == version.version
    assert decision["champion"]["model_version"] == "1"
    assert decision["champion_after"]["model_version"] == "1"
    assert decision["rows"] == scenario.manifest["test"]["rows"]
    assert decision["difference"] == pytest.approx(
        decision["challenger"]["score"] - decision["champion"]["score"]
    )
    low, high = decision["interval"]
    assert low <= decision["difference"] <= high and low < 0
    assert decision["rule"]["resamples"] >= 1000 and decision["rule"]["metric"] == "f1_weighted"
    assert "champion kept" in decision["reason"]
    assert store.get_json("models", keys.LAST_DECISION_KEY) == decision
    assert version.tags["decision.verdict"] == "kept"
    assert version.tags["decision.key"] == keys.decision_key(SHUFFLED_ID)


def test_operator_promote_and_rollback_are_recorded_decisions(
    store: ObjectStore, settings: Settings, client: MlflowClient, scenario: Scenario
) -> None:
    challenger = store.get_json("models", "challenger/metadata.json")
    promoted = decisions.promote(store, client, settings, SHUFFLED_ID, "try the challenger")
    assert promoted["kind"] == "manual" and promoted["reason"] == "manual: try the challenger"
    assert promoted["key"] == keys.manual_decision_key(promoted["sequence"])
    assert (
        client.get_model_version_by_alias(MODEL_NAME, "champion").version == (challenger["version"])
    )
    assert store.get_json("models", "champion/metadata.json") == challenger
    assert not store.exists("models", "challenger/metadata.json")  # no longer pending
    assert store.get_json("models", keys.LAST_DECISION_KEY) == promoted

    rolled = decisions.rollback(store, client, settings, "")
    assert rolled["sequence"] == promoted["sequence"] + 1
    assert rolled["reason"].startswith("manual: rollback from version")
    assert rolled["champion_after"]["model_version"] == "1"
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == "1"
    first = store.get_json("models", f"{scenario.dataset_id}/metadata.json")
    assert store.get_json("models", "champion/metadata.json") == first
    # a model version number works as well as a corpus version id
    again = decisions.promote(store, client, settings, challenger["version"], "")
    assert again["champion_after"]["corpus_version"] == SHUFFLED_ID
    listed = decisions.list_decisions(store, settings)
    assert [d["sequence"] for d in listed] == list(range(1, again["sequence"] + 1))
    with pytest.raises(decisions.OperatorError, match="no aggregated model"):
        decisions.promote(store, client, settings, "999", "")


def test_a_better_challenger_is_promoted_and_an_old_decision_never_comes_back(
    store: ObjectStore, settings: Settings, client: MlflowClient, scenario: Scenario
) -> None:
    # The champion is now the shuffled-labels model (the previous test); a version whose one
    # job is the real model of best validation F1 beats it on the same rows, by far. (With
    # all jobs, the few sample rows tie every candidate and ROC-AUC picks among them.)
    good = copy_dataset(store, scenario, GOOD_AGAIN_ID)
    leading = leader(list(good.results.values()), settings.selection_metric)
    [job] = [key for key, doc in good.results.items() if doc is leading]
    good.manifest["jobs"], good.results = [job], {job: leading}
    store.put_json("datasets", keys.manifest_key(GOOD_AGAIN_ID), good.manifest)
    write_results(store, good, list(good.results))
    outcome = aggregate_dataset(store, settings, GOOD_AGAIN_ID)
    assert outcome.decision == "promoted" and outcome.champion_written, outcome
    decision = store.get_json("models", keys.decision_key(GOOD_AGAIN_ID))
    assert decision["champion"]["corpus_version"] == SHUFFLED_ID
    low, _ = decision["interval"]
    assert decision["difference"] >= settings.gate_margin and low > 0
    assert "challenger promoted" in decision["reason"]
    [version] = versions(client, GOOD_AGAIN_ID)
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == version.version
    served = store.get_bytes("models", "champion/metadata.json")

    # The shuffled version's aggregation again, as if its first try died before it was done:
    # its recorded decision (kept) is read back, superseded, and changes nothing.
    store.delete("models", f"{SHUFFLED_ID}/metadata.json")
    again = aggregate_dataset(store, settings, SHUFFLED_ID)
    assert again.decision == "kept" and "superseded" in again.message
    assert store.get_bytes("models", "champion/metadata.json") == served
    assert store.get_json("models", keys.LAST_DECISION_KEY) == decision


def test_registration_converges_on_the_lowest_version(
    settings: Settings, client: MlflowClient, scenario: Scenario
) -> None:
    # A twin registration (two callers racing past the lease): both converge on the lowest.
    run_uri = next(iter(scenario.results.values()))["model_uri"]
    dataset_id = "0000000000000042"
    first = mlflow.register_model(run_uri, MODEL_NAME, tags={"dataset_id": dataset_id})
    twin = mlflow.register_model(run_uri, MODEL_NAME, tags={"dataset_id": dataset_id})
    assert int(twin.version) > int(first.version)
    kept, created = registry.register_once(
        client, MODEL_NAME, run_uri, dataset_id, tags={}, description="x"
    )
    assert (kept.version, created) == (first.version, False)
    assert [v.version for v in versions(client, dataset_id)] == [first.version]


def test_the_best_so_far_is_prepared_ahead_and_used_only_if_still_the_best(
    store: ObjectStore, settings: Settings, client: MlflowClient, scenario: Scenario
) -> None:
    best = selected(store, settings, scenario)
    best_job = keys.job_name(int(best["cumulative_index"]), str(best["algorithm"]))

    def last_result_arrives(dataset: Scenario, last: str) -> AggregateOutcome:
        write_results(store, dataset, [key for key in dataset.results if key != last])
        waiting = aggregate_dataset(store, settings, dataset.dataset_id)
        assert waiting.status == "waiting" and waiting.message.endswith("exported ahead")
        assert store.list_keys("models", f"{dataset.dataset_id}/") == []
        assert versions(client, dataset.dataset_id) == []
        write_results(store, dataset, [last])
        outcome = aggregate_dataset(store, settings, dataset.dataset_id)
        assert outcome.status == "aggregated", outcome
        metadata = store.get_json("models", f"{dataset.dataset_id}/metadata.json")
        assert metadata["run_id"] == best["run_id"]  # the selection of all results
        return outcome

    # The last result is not the best: the model prepared ahead is the one published.
    first = copy_dataset(store, scenario, "00000000000a4ead")
    other = next(key for key in first.results if not key.endswith(f"/{best_job}.json"))
    assert "tested and exported ahead" in last_result_arrives(first, other).message
    # The last result is the best: the guess (the runner-up) is not used.
    second = copy_dataset(store, scenario, "00000000000b4ead")
    last = next(key for key in second.results if key.endswith(f"/{best_job}.json"))
    assert "ahead" not in last_result_arrives(second, last).message


def test_a_failed_preparation_ahead_only_leaves_the_work_to_the_fan_in(
    store: ObjectStore, settings: Settings, scenario: Scenario
) -> None:
    broken = copy_dataset(store, scenario, "00000000000c4ead")
    store.delete("datasets", broken.manifest["test"]["keys"][0])  # nothing to test on
    jobs = list(broken.results)
    write_results(store, broken, jobs[:-1])
    outcome = aggregate_dataset(store, settings, broken.dataset_id)
    assert (outcome.status, outcome.message) == (
        "waiting",
        f"waiting ({len(jobs) - 1} of {len(jobs)} results)",
    )
    assert store.list_keys("models", f"{broken.dataset_id}/") == []


def more_trusted_types(mlmodel: bytes) -> bytes:
    """The MLmodel file with `builtins.eval` among the types skops is told to trust."""
    document = yaml.safe_load(mlmodel)
    document["flavors"]["sklearn"]["skops_trusted_types"].append("builtins.eval")
    return yaml.safe_dump(document).encode()


def nothing_of(store: ObjectStore, client: MlflowClient, dataset_id: str) -> bool:
    """No model object, decision or registered version of the version (and no lease left)."""
    return (
        store.list_keys("models", f"{dataset_id}/") == []
        and not store.exists("models", keys.decision_key(dataset_id))
        and versions(client, dataset_id) == []
    )


def test_a_model_rewritten_in_mlflows_artifact_store_is_refused_and_nothing_registered(
    store: ObjectStore, settings: Settings, client: MlflowClient, scenario: Scenario
) -> None:
    """MLflow's artifact store takes writes without a key, and the MLmodel file decides what
    skops trusts, the skops file what it builds: the selected model, with either rewritten
    after its training run, is refused before skops reads it (InvalidResult; the function
    answers 400, dead-lettered: a retry downloads the same files) and nothing is registered
    or written. The files as logged are aggregated as usual."""
    from functions_framework import create_app

    copy = copy_dataset(store, scenario, "0000000000ad0de1")
    write_results(store, copy, list(copy.results))
    best = selected(store, settings, copy)
    directory = logged_model_dir(client, best["run_id"])
    mlmodel, skops_file = directory / "MLmodel", directory / "model.skops"
    app = create_app("aggregate", str(ROOT / "functions/aggregate/main.py"), "cloudevent")
    for path, content in (
        (mlmodel, more_trusted_types(mlmodel.read_bytes())),
        (skops_file, skops_file.read_bytes() + b"\0"),
    ):
        with rewritten(path, content):
            with pytest.raises(InvalidResult, match=f"changed: {re.escape(path.name)}"):
                aggregate_dataset(store, settings, copy.dataset_id)
            reply = post_result_event(app, next(iter(copy.results)))
            assert reply.status_code == 400
            assert b"not the ones its training run logged" in reply.data
        assert nothing_of(store, client, copy.dataset_id)
    outcome = aggregate_dataset(store, settings, copy.dataset_id)
    assert outcome.status == "aggregated", outcome
    assert store.get_json("models", f"{copy.dataset_id}/metadata.json")["run_id"] == best["run_id"]


def test_a_champion_rewritten_in_mlflows_artifact_store_is_never_loaded_for_the_gate(
    store: ObjectStore, settings: Settings, client: MlflowClient, scenario: Scenario
) -> None:
    """The gate loads the sitting champion's pipeline too: its files are checked against the
    result (results bucket) naming its run, and a rewritten MLmodel stops the decision before
    skops reads it: no registration, no decision, the version not done (its own, verified
    model.onnx is written before the decision, as always, and served by nothing)."""
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    mlmodel = logged_model_dir(client, registry.run_of(champion)) / "MLmodel"
    with rewritten(mlmodel, more_trusted_types(mlmodel.read_bytes())):
        challenger = shuffled_labels_copy(store, settings, client, scenario, "5ca1ab1e0000beef")
        with pytest.raises(InvalidResult, match=f"champion version {champion.version}: .*MLmodel"):
            aggregate_dataset(store, settings, challenger.dataset_id)
    dataset_id = challenger.dataset_id
    assert not store.exists("models", f"{dataset_id}/metadata.json")
    assert not store.exists("models", keys.decision_key(dataset_id))
    assert not store.exists("models", lease_key(dataset_id))
    assert versions(client, dataset_id) == []
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == champion.version


def test_the_reference_profiles_a_systematic_sample_of_a_set_larger_than_drift_sample_rows(
    store: ObjectStore, settings: Settings, scenario: Scenario
) -> None:
    index = len(scenario.manifest["cumulative_sets"]) - 1
    batch_keys = scenario.manifest["cumulative_sets"][index]["batch_keys"]
    whole = pa.concat_tables(
        pq.read_table(io.BytesIO(store.get_bytes(settings.buckets.datasets, key)))
        for key in batch_keys
    )
    sampled = drift_reports.training_rows(
        store, replace(settings, drift_sample_rows=101), scenario.manifest, index
    )
    positions = [k * whole.num_rows // 101 for k in range(101)]
    assert whole.num_rows > 101 and len(batch_keys) > 1
    assert sampled.combine_chunks().equals(whole.take(positions).combine_chunks())
    every = drift_reports.training_rows(store, settings, scenario.manifest, index)
    assert every.combine_chunks().equals(whole.combine_chunks())


def test_lease_admits_one_holder_and_expires(store: ObjectStore) -> None:
    held = lease.try_acquire(store, "models", "lease-test/aggregate.lease", ttl_seconds=60)
    assert held is not None
    assert lease.try_acquire(store, "models", "lease-test/aggregate.lease", ttl_seconds=60) is None
    with pytest.raises(lease.LeaseBusy):
        lease.acquire(store, "models", "lease-test/aggregate.lease", 60, wait_seconds=0.6)
    held.release()
    short = lease.try_acquire(store, "models", "lease-test/aggregate.lease", ttl_seconds=0.5)
    assert short is not None
    time.sleep(1.0)
    taker = lease.try_acquire(store, "models", "lease-test/aggregate.lease", ttl_seconds=60)
    assert taker is not None  # the expired lease was taken over
    short.release()  # no longer ours: must not delete the taker's lease
    assert store.exists("models", "lease-test/aggregate.lease")
    taker.release()
    assert not store.exists("models", "lease-test/aggregate.lease")


def test_concurrent_lease_attempts_have_one_winner(store: ObjectStore) -> None:
    for trial in range(3):
        key = f"lease-race/{trial}.lease"
        winners: list[lease.Lease] = []

        def attempt(key: str = key, winners: list[lease.Lease] = winners) -> None:
            held = lease.try_acquire(store, "models", key, ttl_seconds=60)
            if held is not None:
                winners.append(held)

        threads = [threading.Thread(target=attempt) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(winners) == 1
        winners[0].release()


def post_result_event(app: Any, key: str, bucket: str = "results") -> Any:
    headers = {
        "ce-specversion": "1.0",
        "ce-type": "io.readmission.result.created",
        "ce-source": f"s3://{bucket}",
        "ce-id": hashlib.sha256(key.encode()).hexdigest()[:32],
        "ce-subject": key,
        "Content-Type": "application/json",
    }
    body = json.dumps({"bucket": bucket, "key": key, "size": 1, "etag": "x", "origin": "seaweedfs"})
    return app.test_client().post("/", headers=headers, data=body)


def test_function_entry_point(store: ObjectStore, settings: Settings, scenario: Scenario) -> None:
    from functions_framework import create_app

    app = create_app("aggregate", str(ROOT / "functions/aggregate/main.py"), "cloudevent")
    before = model_objects(store)
    reply = post_result_event(app, scenario.manifest["jobs"][0])
    assert (reply.status_code, reply.data) == (204, b"")
    assert model_objects(store) == before
    assert post_result_event(app, "not-a-result-key.txt").status_code == 400
    assert post_result_event(app, scenario.manifest["jobs"][0], bucket="jobs").status_code == 400


def test_a_result_that_is_not_its_keys_job_is_refused_with_400(
    store: ObjectStore, settings: Settings, client: MlflowClient, scenario: Scenario
) -> None:
    """A result written by hand under another job's key, or under a key its manifest does not
    list, is not trusted: no retry fixes it, so the aggregator answers 400 (dead-lettered, a
    person looks) and selects, registers and writes nothing."""
    from functions_framework import create_app

    forged = copy_dataset(store, scenario, "00000000000bad01")
    first, second = list(forged.results)[:2]
    write_results(store, forged, list(forged.results))
    store.put_json("results", first, forged.results[second])  # another job's document
    with pytest.raises(InvalidResult, match=f"results/{first} is the result of"):
        aggregate_dataset(store, settings, forged.dataset_id)
    app = create_app("aggregate", str(ROOT / "functions/aggregate/main.py"), "cloudevent")
    reply = post_result_event(app, second)
    assert reply.status_code == 400 and b"is the result of" in reply.data

    store.put_json("results", first, forged.results[first])  # set right: no longer refused
    orphan = keys.result_key(forged.dataset_id, 9, "random_forest")
    store.put_json("results", orphan, {**forged.results[first], "cumulative_index": 9})
    reply = post_result_event(app, orphan)
    assert reply.status_code == 400 and b"an orphan result" in reply.data
    with pytest.raises(InvalidResult, match="an orphan result"):
        aggregate_dataset(store, settings, forged.dataset_id, result_key=orphan)

    key = forged.manifest["jobs"][0]
    rows = forged.results[key]["training_rows"]
    store.put_json("results", key, {**forged.results[key], "training_rows": rows + 1})
    with pytest.raises(InvalidResult, match=f"trained on {rows + 1} rows"):
        aggregate_dataset(store, settings, forged.dataset_id)
    store.put_bytes("results", key, b"{not json")
    with pytest.raises(InvalidResult, match="is not JSON"):
        aggregate_dataset(store, settings, forged.dataset_id)
    assert store.list_keys("models", f"{forged.dataset_id}/") == []
    assert versions(client, forged.dataset_id) == []
    for name in forged.results:  # out of the way of the tests after this one
        store.delete("results", name)
    store.delete("results", orphan)


def test_the_aggregate_function_imports_onnxruntime_only_after_the_fork() -> None:
    """gunicorn imports the function in its master and forks the worker: onnxruntime (whose
    import starts a thread) is imported in the worker only, which then exits cleanly (a
    worker that inherited the thread aborted on exit: std::system_error)."""
    main_path = str(ROOT / "functions" / "aggregate" / "main.py")
    script = f"""
import os, sys
import functions_framework as ff
ff.create_app(target="aggregate", source={main_path!r}, signature_type="cloudevent")
assert "onnxruntime" not in sys.modules, "imported in the master"
pid = os.fork()
if pid == 0:
    import threading
    warm_up = [t for t in threading.enumerate() if t.name == "onnxruntime-warm-up"]
    assert warm_up, "no warm-up in the worker"
    warm_up[0].join(60)
    assert "onnxruntime" in sys.modules, "not warmed up in the worker"
    sys.exit(0)  # as a gunicorn worker ends: with the interpreter's and C++'s exit handlers
_, status = os.waitpid(pid, 0)
print("worker exit", os.waitstatus_to_exitcode(status))
"""
    result = run_python(script, timeout=180)
    assert result.stdout.strip().splitlines()[-1] == "worker exit 0", result.stderr
    assert "terminate called" not in result.stderr
