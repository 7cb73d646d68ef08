"""Outcomes close the loop: an outcomes CSV joined with a prediction log written by the predict
function's writer, in a real SeaweedFS; realized metrics equal those computed directly."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from support.seaweed_server import SeaweedServer

from readmission.config import Buckets, Settings
from readmission.keys import REALIZED_LATEST_KEY
from readmission.outcomes import (
    LOG_COLUMNS,
    OutcomesError,
    group_metrics,
    process_outcomes,
    read_log,
    realized_key,
)
from readmission.scoring import score
from readmission.serving.prediction_log import PredictionLog
from readmission.serving.realized import RealizedGauges
from readmission.serving.s3 import S3Reader
from readmission.serving.sources import StoreModelSource
from readmission.storage import ObjectStore

CLASSES = ("<30", ">30", "NO")


@pytest.fixture(scope="module")
def seaweed() -> Iterator[SeaweedServer]:
    server = SeaweedServer().start()
    try:
        yield server
    finally:
        server.stop()


def _settings(seaweed: SeaweedServer, name: str) -> tuple[Settings, ObjectStore]:
    buckets = Buckets(
        models=f"{name}-models", predictions_log=f"{name}-log", outcomes=f"{name}-out"
    )
    settings = Settings(s3_endpoint_url=seaweed.endpoint_url, buckets=buckets)
    store = ObjectStore.connect(
        seaweed.endpoint_url, "us-east-1", seaweed.access_key, seaweed.secret_key
    )
    store.ensure_buckets([buckets.models, buckets.predictions_log, buckets.outcomes])
    return settings, store


_LOGS: list[PredictionLog] = []


@pytest.fixture(autouse=True)
def _close_logs() -> Iterator[None]:
    """Each test's prediction logs are closed after it (their spool directories removed)."""
    yield
    while _LOGS:
        _LOGS.pop().close()


def _log(store: ObjectStore, settings: Settings) -> PredictionLog:
    def put(key: str, data: bytes) -> None:
        store.put_bytes(settings.buckets.predictions_log, key, data)

    _LOGS.append(PredictionLog(put, rows=10**6, seconds=3600))
    return _LOGS[-1]


def _probabilities(rng: np.random.Generator, n: int) -> list[list[float]]:
    raw = rng.random((n, 3)) + 0.05
    return np.round(raw / raw.sum(axis=1, keepdims=True), 6).tolist()


def test_realized_metrics_equal_the_direct_computation_per_version(
    seaweed: SeaweedServer,
) -> None:
    settings, store = _settings(seaweed, "exact")
    rng = np.random.default_rng(7)
    log = _log(store, settings)
    truth: dict[str, list[tuple[list[float], str]]] = {"1": [], "2": []}
    lines = ["request_id,encounter_id,readmitted"]
    for i in range(300):  # single-row requests, joined by request id
        version = "1" if i < 200 else "2"
        probs = _probabilities(rng, 1)
        label = str(rng.choice(CLASSES))
        log.record_rows(f"r{i}", version, CLASSES, "predict", ["NO"], probs, [{"age": "x"}])
        truth[version].append((probs[0], label))
        lines.append(f"r{i},,{label}")
    batch_probs = _probabilities(rng, 50)  # one batch request, joined by encounter id
    rows = [{"encounter_id": 5000 + i} for i in range(50)]
    log.record_rows("batch-1", "2", CLASSES, "batch", ["NO"] * 50, batch_probs, rows)
    for i, probs in enumerate(batch_probs):
        label = str(rng.choice(CLASSES))
        truth["2"].append((probs, label))
        lines.append(f",{5000 + i},{label}")
    lines += ["never-seen,,NO", ",999999,<30", "batch-1,,NO"]  # unmatched: 3
    time.sleep(0.01)
    again = _probabilities(rng, 1)  # r5 asked again (a client retry): its latest answer counts
    log.record_rows("r5", "1", CLASSES, "predict", ["NO"], again, [{"age": "x"}])
    truth["1"][5] = (again[0], truth["1"][5][1])
    log.flush()
    csv = ("\n".join(lines) + "\n").encode()
    store.put_bytes(settings.buckets.outcomes, "week-1.csv", csv)
    store.put_json(
        settings.buckets.models,
        "0123456789abcdef/metadata.json",
        {"version": "1", "metrics": {"test": {"f1_weighted": 0.5, "roc_auc_ovr": 0.6}}},
    )

    realized = process_outcomes(store, settings, settings.buckets.outcomes, "week-1.csv")

    document = realized.document
    assert realized.written and realized.key == realized_key(csv)
    assert (document["outcome_rows"], document["matched"], document["unmatched"]) == (353, 350, 3)
    by_version = {g["model_version"]: g for g in document["groups"]}
    assert sorted(by_version) == ["1", "2"]
    for version, pairs in truth.items():
        probabilities = np.array([p for p, _ in pairs])
        labels = np.array([label for _, label in pairs])
        expected = score(probabilities, np.array(CLASSES), labels)
        got = by_version[version]["metrics"]
        assert got["matched"] == len(pairs)
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, abs=1e-9), name
        onehot = (np.array(CLASSES)[None, :] == labels[:, None]).astype(float)
        brier = np.mean(np.sum((probabilities - onehot) ** 2, axis=1))
        assert got["brier"] == pytest.approx(brier, abs=1e-9)
        late = labels == "<30"
        predicted = np.array(CLASSES)[probabilities.argmax(axis=1)]
        assert got["recall_lt30"] == pytest.approx(np.mean(predicted[late] == "<30"), abs=1e-9)
    one = by_version["1"]
    assert one["offline_test"] == {"f1_weighted": 0.5, "roc_auc_ovr": 0.6}
    assert one["realized_minus_offline"]["f1_weighted"] == pytest.approx(
        one["metrics"]["f1_weighted"] - 0.5, abs=1e-12
    )
    assert by_version["2"]["offline_test"] is None
    # the join reads the log's ids, times, versions and probabilities, never the rows' features
    logged = read_log(store, settings.buckets.predictions_log)
    assert set(logged.columns) == {*LOG_COLUMNS, *(f"probability_{c}" for c in CLASSES)}
    stored = store.get_json(settings.buckets.models, realized.key)
    assert stored == json.loads(json.dumps(document))
    assert store.get_json(settings.buckets.models, REALIZED_LATEST_KEY) == stored

    # the predict function's gauges: the latest document, as its poll thread reads it
    reader = S3Reader(seaweed.endpoint_url, seaweed.access_key, seaweed.secret_key)
    gauges = RealizedGauges(StoreModelSource(reader, settings.buckets.models))
    registry = CollectorRegistry()
    registry.register(gauges)
    assert (
        registry.get_sample_value(
            "readmission_realized_f1_weighted", {"model_version": "1", "period": one["period"]}
        )
        is None
    )
    gauges.refresh()
    for version, group in by_version.items():
        labels = {"model_version": version, "period": group["period"]}
        for name in ("f1_weighted", "f1_macro", "roc_auc_ovr", "brier", "recall_lt30", "matched"):
            sample = registry.get_sample_value(f"readmission_realized_{name}", labels)
            assert sample == group["metrics"][name], (version, name)
    delta = registry.get_sample_value(
        "readmission_realized_minus_offline_f1_weighted",
        {"model_version": "1", "period": one["period"]},
    )
    assert delta == one["realized_minus_offline"]["f1_weighted"]
    assert registry.get_sample_value("readmission_realized_unmatched") == 3


def test_a_redelivered_outcomes_file_writes_nothing_new(seaweed: SeaweedServer) -> None:
    settings, store = _settings(seaweed, "again")
    log = _log(store, settings)
    log.record_rows("a", "1", CLASSES, "predict", ["NO"], [[0.2, 0.3, 0.5]], [{}])
    log.flush()
    store.put_bytes(settings.buckets.outcomes, "o.csv", b"request_id,readmitted\na,NO\n")
    first = process_outcomes(store, settings, settings.buckets.outcomes, "o.csv")
    etag = store.head(settings.buckets.models, first.key)
    store.delete(settings.buckets.models, REALIZED_LATEST_KEY)  # a crash between the PUTs
    log.record_rows("b", "1", CLASSES, "predict", ["NO"], [[0.2, 0.3, 0.5]], [{}])
    log.flush()
    again = process_outcomes(store, settings, settings.buckets.outcomes, "o.csv")
    assert first.written and not again.written
    assert again.document == json.loads(json.dumps(first.document))
    assert store.head(settings.buckets.models, first.key) == etag
    assert store.get_json(settings.buckets.models, REALIZED_LATEST_KEY) == again.document


@pytest.mark.parametrize(
    ("csv", "problem"),
    [
        (b"request_id,label\na,NO\n", "readmitted"),
        (b"patient,readmitted\n1,NO\n", "request_id"),
        (b"request_id,readmitted\na,maybe\n", "one of"),
        (b"request_id,encounter_id,readmitted\n,,NO\n", "neither"),
    ],
)
def test_an_outcomes_file_breaking_the_rules_is_refused(
    seaweed: SeaweedServer, csv: bytes, problem: str
) -> None:
    settings, store = _settings(seaweed, "bad")
    store.put_bytes(settings.buckets.outcomes, "bad.csv", csv)
    with pytest.raises(OutcomesError, match=problem):
        process_outcomes(store, settings, settings.buckets.outcomes, "bad.csv")
    assert not store.exists(settings.buckets.models, realized_key(csv))


def test_a_refused_file_names_its_bad_lines_and_leaves_earlier_metrics_intact(
    seaweed: SeaweedServer,
) -> None:
    settings, store = _settings(seaweed, "intact")
    log = _log(store, settings)
    log.record_rows("a", "1", CLASSES, "predict", ["NO"], [[0.2, 0.3, 0.5]], [{}])
    log.flush()
    store.put_bytes(settings.buckets.outcomes, "good.csv", b"request_id,readmitted\na,NO\n")
    good = process_outcomes(store, settings, settings.buckets.outcomes, "good.csv")
    latest = store.get_bytes(settings.buckets.models, REALIZED_LATEST_KEY)
    bad = b"request_id,readmitted\na,<30\nb,yes\nc,NO\nd,30\n"
    store.put_bytes(settings.buckets.outcomes, "bad.csv", bad)
    with pytest.raises(OutcomesError, match=r"2 rows are not \(line 3: 'yes', line 5: '30'\)"):
        process_outcomes(store, settings, settings.buckets.outcomes, "bad.csv")
    assert store.get_bytes(settings.buckets.models, REALIZED_LATEST_KEY) == latest
    assert store.get_json(settings.buckets.models, good.key) == json.loads(latest)
    assert not store.exists(settings.buckets.models, realized_key(bad))


def test_unknown_ids_are_counted_and_named_without_replacing_the_latest_metrics(
    seaweed: SeaweedServer,
) -> None:
    settings, store = _settings(seaweed, "unknown")
    log = _log(store, settings)
    log.record_rows("a", "1", CLASSES, "predict", ["NO"], [[0.2, 0.3, 0.5]], [{}])
    log.flush()
    store.put_bytes(settings.buckets.outcomes, "1.csv", b"request_id,readmitted\na,NO\nx,<30\n")
    first = process_outcomes(store, settings, settings.buckets.outcomes, "1.csv")
    assert (first.document["matched"], first.document["unmatched"]) == (1, 1)
    assert first.document["problems"]["unmatched_ids"] == ["x"]
    assert first.document["problems"]["unmatched_lines"] == [3]
    latest = store.get_bytes(settings.buckets.models, REALIZED_LATEST_KEY)
    only_unknown = b"encounter_id,readmitted\n77,NO\n78,>30\n"
    store.put_bytes(settings.buckets.outcomes, "2.csv", only_unknown)
    second = process_outcomes(store, settings, settings.buckets.outcomes, "2.csv")
    assert second.written and second.document["groups"] == []
    assert second.document["unmatched"] == 2
    assert second.document["problems"]["unmatched_ids"] == ["encounter:77", "encounter:78"]
    assert store.get_json(settings.buckets.models, second.key) == json.loads(
        json.dumps(second.document)
    )
    assert store.get_bytes(settings.buckets.models, REALIZED_LATEST_KEY) == latest


def test_a_repeated_id_counts_once_and_an_id_with_two_outcomes_is_left_out(
    seaweed: SeaweedServer,
) -> None:
    settings, store = _settings(seaweed, "dupes")
    log = _log(store, settings)
    for request in ("a", "b", "c"):
        log.record_rows(request, "1", CLASSES, "predict", ["NO"], [[0.2, 0.3, 0.5]], [{}])
    log.flush()
    csv = b"request_id,readmitted\na,NO\na,NO\nb,<30\nb,NO\nc,>30\na,NO\n"
    store.put_bytes(settings.buckets.outcomes, "d.csv", csv)
    realized = process_outcomes(store, settings, settings.buckets.outcomes, "d.csv")
    document = realized.document
    assert document["outcome_rows"] == 6 and document["matched"] == 2
    assert document["problems"]["duplicate_rows"] == 2
    assert document["problems"]["duplicate_ids"] == ["a"]
    assert document["problems"]["conflicting_rows"] == 2
    assert document["problems"]["conflicting_ids"] == ["b"]
    (group,) = document["groups"]
    expected = group_metrics(
        np.array([[0.2, 0.3, 0.5]] * 2), list(CLASSES), np.array(["NO", ">30"])
    )
    assert group["metrics"] == expected


def test_group_metrics_leave_late_recall_undefined_without_a_late_outcome() -> None:
    probabilities = np.array([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    metrics: dict[str, Any] = group_metrics(probabilities, list(CLASSES), np.array(["NO", ">30"]))
    assert metrics["recall_lt30"] is None and metrics["matched"] == 2
    assert metrics["brier"] == pytest.approx(((0.01 + 0.04 + 0.09) + (0.36 + 0.49 + 0.01)) / 2)
