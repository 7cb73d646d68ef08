"""Continuous training on the whole local stack: two drops grow one corpus, only the new sets
are fitted, every promotion is a recorded decision, and the operator commands work.

One stack of its own with small settings (1,000-row batches, two fast algorithms) and two
halves of a 10% sample of the real file, so the whole module stays around two minutes.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cloudevents.http import CloudEvent
from mlflow import MlflowClient
from mlflow.entities import ViewType
from support.seaweed_server import sample_csv
from support.stack import RunningStack, running_stack

from events.delivery import Verdict, post_binary
from events.notifications import DECISION_MADE, RESULT_CREATED, ObjectVersion, to_event
from readmission import keys, tracking
from readmission.storage import ObjectStore

pytestmark = pytest.mark.stack

ENV = {
    "BATCH_ROWS": "1000",
    "ALGORITHMS": "logistic_regression,decision_tree",
    "TRAIN_WORKERS": "2",
    # Pinned so a fit's id cannot change if the checkout changes while the test runs.
    "CODE_VERSION": "continuous-e2e",
}
TIMEOUT = 600.0
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    with running_stack(tmp_path_factory.mktemp("continuous") / "state", ENV) as running:
        yield running


def halves() -> tuple[bytes, bytes]:
    header, *rows = [line for line in sample_csv(every=10).split(b"\r\n") if line]
    half = len(rows) // 2

    def csv(part: list[bytes]) -> bytes:
        return b"\r\n".join([header, *part]) + b"\r\n"

    return csv(rows[:half]), csv(rows[half:])


def drop_and_wait(stack: RunningStack, key: str, data: bytes) -> dict[str, Any]:
    """Upload a drop; wait until its version is aggregated and decided; its drop record."""
    buckets = stack.settings.buckets
    stack.store.put_bytes(buckets.raw, key, data, "text/csv")
    record = stack.wait_for(
        lambda: stack.store.get_json_if_exists(
            buckets.datasets, keys.drop_key(keys.content_id(data))
        ),
        TIMEOUT,
    )
    assert record, f"{key} was not ingested\n{stack.log('ingest', 30)}"
    if record["version"]:
        done = stack.wait_for(
            lambda: stack.store.exists(buckets.models, keys.model_metadata_key(record["version"])),
            TIMEOUT,
            1.0,
        )
        assert done, f"version {record['version']} not decided\n{stack.log('aggregate', 40)}"
    return record


def wait_idle(stack: RunningStack, quiet: float = 3.0) -> None:
    deadline, idle_since = time.monotonic() + TIMEOUT, None
    while time.monotonic() < deadline:
        totals = stack.broker_status()["totals"]
        if totals["queued"] == 0 and totals["inflight"] == 0:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since >= quiet:
                return
        else:
            idle_since = None
        time.sleep(0.5)
    raise AssertionError(f"broker not idle: {stack.broker_status()}")


def operator(stack: RunningStack, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m readmission.decisions ...` as an operator runs it, with the stack's env."""
    return subprocess.run(
        [sys.executable, "-m", "readmission.decisions", *args],
        cwd=ROOT,
        env={**os.environ, **stack.env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def models_state(store: ObjectStore, stack: RunningStack) -> dict[str, str]:
    models = stack.settings.buckets.models
    return {info.key: info.etag for info in store.list(models) if not info.key.endswith(".lease")}


def test_a_second_drop_fits_only_its_new_sets_and_every_promotion_is_recorded(
    own_stack: RunningStack,
) -> None:
    stack, store, buckets = own_stack, own_stack.store, own_stack.settings.buckets
    first_half, second_half = halves()

    first = drop_and_wait(stack, "drops/first.csv", first_half)
    v1 = first["version"]
    decision = store.get_json(buckets.models, keys.decision_key(v1))
    assert decision["verdict"] == "promoted" and decision["reason"].startswith("first model")
    assert store.get_json(buckets.models, keys.CHAMPION_METADATA_KEY)["dataset_id"] == v1

    second = drop_and_wait(stack, "drops/second.csv", second_half)
    v2 = second["version"]
    manifest = store.get_json(buckets.datasets, keys.manifest_key(v2))
    assert manifest["parent"] == v1 and manifest["number"] == 2
    assert manifest["rows"]["total"] == len(sample_csv(every=10).split(b"\r\n")) - 2
    reused_sets = manifest["reused_sets"]
    assert 0 < reused_sets < len(manifest["cumulative_sets"])

    # only the new sets were fitted: the old ones reuse version 1's runs, re-scored
    results = {k: store.get_json(buckets.results, k) for k in manifest["jobs"]}
    first_results = {
        (r["cumulative_index"], r["algorithm"]): r
        for r in (
            store.get_json(buckets.results, k)
            for k in store.list_keys(buckets.results, f"{v1}/")
            if k.endswith(".json")
        )
    }
    for result in results.values():
        old = first_results.get((result["cumulative_index"], result["algorithm"]))
        if result["cumulative_index"] < reused_sets:
            assert result["reused"] and old is not None and result["run_id"] == old["run_id"]
        else:
            assert not result["reused"] and result["fitted_for"] == v2
    client = MlflowClient(stack.mlflow_uri)
    experiment = client.get_experiment_by_name(stack.settings.mlflow_experiment)
    assert experiment is not None
    fitted_for_v2 = client.search_runs(
        [experiment.experiment_id],
        f"tags.{tracking.DATASET_TAG} = '{v2}'",
        run_view_type=ViewType.ALL,
    )
    new_sets = len(manifest["cumulative_sets"]) - reused_sets
    assert len(fitted_for_v2) == new_sets * len(manifest["algorithms"])

    # the gate decided, on version 2's test rows, and said so as a CloudEvent
    decision = store.get_json(buckets.models, keys.decision_key(v2))
    assert decision["verdict"] in ("promoted", "kept") and decision["sequence"] == 2
    assert decision["rows"] == manifest["test"]["rows"]
    assert decision["rule"]["resamples"] >= 1000
    assert stack.wait_for(
        lambda: stack.broker_status()["received_by_type"].get(DECISION_MADE, 0) >= 2, 60
    )
    champion = store.get_json(buckets.models, keys.CHAMPION_METADATA_KEY)
    assert champion["version"] == decision["champion_after"]["model_version"]

    # each drop's drift report: the first had nothing to compare with, the second was compared
    # with version 1's training reference, and is logged with version 2 in MLflow
    first_report = store.get_json(buckets.models, keys.drift_report_key(first["drop_id"]))
    assert first_report["status"] == "no_reference"
    report = store.get_json(buckets.models, keys.drift_report_key(second["drop_id"]))
    assert report["reference"]["model_version"] == "1"
    assert report["rows"] == second["rows"]["rows"]
    assert report["status"] in ("stable", "watch", "drifted") and len(report["columns"]) == 47
    if decision["new_model"]:
        registered = client.get_model_version(stack.settings.registered_model, "2")
        assert registered.tags["drift.drop"] == second["drop_id"]
        assert registered.tags["drift.status"] == report["status"]

    # the same bytes again under another name: nothing appended, nothing trained
    jobs_before = store.list_keys(buckets.jobs)
    again = drop_and_wait(stack, "drops/first-again.csv", first_half)
    assert again == first
    info = store.head(buckets.raw, "drops/first-again.csv")
    assert info is not None
    receipt_key = keys.receipt_key(buckets.raw, info.key, info.etag)
    receipt = stack.wait_for(
        lambda: store.get_json_if_exists(buckets.datasets, receipt_key), TIMEOUT
    )
    assert receipt and receipt["status"] == "already_ingested"
    wait_idle(stack)
    assert store.list_keys(buckets.jobs) == jobs_before

    # a random sample of rows the corpus already holds: nothing new, nothing trained, and the
    # champion does not change
    header, *rows = [line for line in first_half.split(b"\r\n") if line]
    sample = b"\r\n".join([header, *random.Random(7).sample(rows, 300)]) + b"\r\n"
    champion_before = store.get_json(buckets.models, keys.CHAMPION_METADATA_KEY)
    sampled = drop_and_wait(stack, "drops/sample.csv", sample)
    assert sampled["status"] == "nothing_new" and sampled["version"] is None
    wait_idle(stack)
    assert store.list_keys(buckets.jobs) == jobs_before
    assert store.get_json(buckets.models, keys.CHAMPION_METADATA_KEY) == champion_before

    # the operator promotes version 1 by name, then rolls back: two recorded decisions
    served_before = champion["dataset_id"]
    promoted = operator(stack, "promote", v1, "--reason", "e2e check")
    assert promoted.returncode == 0, promoted.stderr
    assert store.get_json(buckets.models, keys.CHAMPION_METADATA_KEY)["dataset_id"] == v1
    last = store.get_json(buckets.models, keys.LAST_DECISION_KEY)
    assert last["kind"] == "manual" and last["reason"] == "manual: e2e check"
    if served_before != v1:
        rolled = operator(stack, "rollback")
        assert rolled.returncode == 0, rolled.stderr
        served = store.get_json(buckets.models, keys.CHAMPION_METADATA_KEY)
        assert served["dataset_id"] == served_before
    listed = operator(stack, "list")
    assert listed.returncode == 0 and "manual" in listed.stdout and v2 in listed.stdout

    # predict shows the champion and the last decision
    if stack.predict_url:
        expected = store.get_json(buckets.models, keys.LAST_DECISION_KEY)["sequence"]

        def shown() -> bool:
            with urllib.request.urlopen(f"{stack.predict_url}/model-info", timeout=5) as reply:
                info = json.loads(reply.read())
            drift = info.get("drift") or {}
            return (info.get("last_decision") or {}).get("sequence") == expected and (
                drift.get("drop_id") == sampled["drop_id"]  # the latest drop's drift report
            )

        assert stack.wait_for(shown, 60, 1.0)

    # a redelivered decision event and a redelivered last result change nothing
    wait_idle(stack)
    before = models_state(store, stack)
    redelivered = []
    for bucket, key, kind in (
        (buckets.models, keys.decision_key(v2), DECISION_MADE),
        (buckets.results, manifest["jobs"][-1], RESULT_CREATED),
    ):
        info = store.head(bucket, key)
        assert info is not None
        event = to_event(
            ObjectVersion(bucket, key, info.size, info.etag, "", "test"), stack.settings.buckets
        )
        assert event is not None and event.type == kind
        attempt = post_binary(stack.broker_url, CloudEvent(event.attributes, event.data), 10.0)
        assert attempt.verdict == Verdict.DELIVERED, attempt
        redelivered.append(kind)
    wait_idle(stack)
    assert models_state(store, stack) == before
