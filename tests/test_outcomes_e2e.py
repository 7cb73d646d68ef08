"""Acceptance of issue #18 items 2-3 on the real local stack: 1,000 test-split rows posted to
/predict one by one, their true outcomes dropped into the outcomes bucket, and the realized
metrics (written by the outcomes function, exported by predict's /metrics) equal those
computed directly by readmission.scoring on the answered probabilities, to 1e-9.

Lean: its own stack with a champion published the way the aggregator publishes one (ONNX
first, `champion/metadata.json` last) instead of a pipeline run; the log flushes every second.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.log_parts import ship_parts
from support.predict_support import build_model, http, sample_frame
from support.stack import RunningStack, running_stack

from readmission import keys, log_compaction
from readmission.contract import FEATURES, NUMERIC_FEATURES, TARGET
from readmission.outcomes import realized_key
from readmission.scoring import score
from readmission.split import TEST, patient_split_codes

pytestmark = pytest.mark.stack
ROWS = 1000


@pytest.fixture(scope="module")
def outcomes_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    env = {
        "PREDICTION_LOG_SECONDS": "1",
        "MODEL_POLL_SECONDS": "1",
        "TRAIN_WORKERS": "1",
        # the sample-fitted champion has not seen every rare category of the test rows
        "UNKNOWN_CATEGORY_POLICY": "unseen",
    }
    with running_stack(tmp_path_factory.mktemp("outcomes") / "state", env) as running:
        yield running


def _json_row(record: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for column in FEATURES:
        value = record[column]
        if column in NUMERIC_FEATURES:
            row[column] = None if value is None or math.isnan(value) else int(value)
        else:
            row[column] = None if value is None or value != value else str(value)
    return row


def _logged_rows(stack: RunningStack) -> int:
    bucket = stack.settings.buckets.predictions_log
    return sum(
        pq.read_metadata(io.BytesIO(stack.store.get_bytes(bucket, key))).num_rows
        for key in stack.store.list_keys(bucket)
    )


def test_realized_metrics_of_answered_test_rows_equal_the_direct_computation(
    outcomes_stack: RunningStack,
) -> None:
    stack = outcomes_stack
    buckets = stack.settings.buckets
    assert stack.predict_url and stack.has_function("outcomes")
    onnx_bytes, metadata = build_model("decision_tree", "5")
    stack.store.put_bytes(buckets.models, metadata["model_key"], onnx_bytes)
    stack.store.put_json(buckets.models, keys.CHAMPION_METADATA_KEY, metadata)

    def serving_it() -> bool:  # every worker: each polls the champion on its own
        for _ in range(6):
            status, _, body = http(stack.predict_url + "/ready")
            if status != 200 or json.loads(body).get("model_version") != "5":
                return False
        return True

    assert stack.wait_for(serving_it, timeout=60)

    frame = sample_frame(every=1)
    codes = patient_split_codes(frame["patient_nbr"].to_numpy(), stack.settings.split_seed)
    test = frame[codes == TEST].head(ROWS)
    assert len(test) == ROWS
    answered: list[list[float]] = []
    lines = ["request_id,encounter_id,readmitted"]
    for index, record in enumerate(test.to_dict("records")):
        features = _json_row(record)
        headers = {}
        if index % 2:  # joined by the encounter id the row carries
            features["encounter_id"] = int(record["encounter_id"])
            lines.append(f",{int(record['encounter_id'])},{record[TARGET]}")
        else:  # joined by the request id the request carries
            headers["X-Request-Id"] = f"acceptance-{index}"
            lines.append(f"acceptance-{index},,{record[TARGET]}")
        status, _, body = http(
            stack.predict_url + "/predict", {"features": features}, headers=headers
        )
        assert status == 200, body[:300]
        answer = json.loads(body)
        answered.append([answer["probabilities"][c] for c in metadata["classes"]])
    lines.append("never-predicted,,NO")
    assert stack.wait_for(lambda: _logged_rows(stack) >= ROWS, timeout=60), _logged_rows(stack)

    csv = ("\n".join(lines) + "\n").encode()
    stack.store.put_bytes(buckets.outcomes, "acceptance/outcomes.csv", csv, "text/csv")
    document = stack.wait_for(
        lambda: stack.store.get_json_if_exists(buckets.models, realized_key(csv)), timeout=180
    )
    assert document is not None, stack.log("outcomes")
    assert (document["matched"], document["unmatched"]) == (ROWS, 1)
    (group,) = document["groups"]
    probabilities = np.array(answered)
    labels = test[TARGET].astype(str).to_numpy()
    expected = score(probabilities, np.array(metadata["classes"]), labels)
    realized = group["metrics"]
    assert group["model_version"] == "5" and realized["matched"] == ROWS
    for name, value in expected.items():
        assert realized[name] == pytest.approx(value, abs=1e-9, rel=0), name
    onehot = (np.array(metadata["classes"])[None, :] == labels[:, None]).astype(float)
    brier = float(np.mean(np.sum((probabilities - onehot) ** 2, axis=1)))
    assert realized["brier"] == pytest.approx(brier, abs=1e-9, rel=0)
    late = labels == "<30"
    predicted = np.array(metadata["classes"])[probabilities.argmax(axis=1)]
    assert realized["recall_lt30"] == pytest.approx(np.mean(predicted[late] == "<30"), abs=1e-9)
    assert group["offline_test"] == metadata["metrics"]["test"]

    # the predict function exports them (its poll thread reads monitoring/realized/latest.json)
    def exported() -> float | None:
        text = http(stack.predict_url + "/metrics")[2].decode()
        for line in text.splitlines():
            if line.startswith("readmission_realized_f1_weighted{") and 'model_version="5"' in line:
                return float(line.rsplit(" ", 1)[1])
        return None

    value = stack.wait_for(exported, timeout=30)
    assert value is not None and value == pytest.approx(expected["f1_weighted"], abs=1e-9)
    table = pa.concat_tables(
        pq.read_table(io.BytesIO(stack.store.get_bytes(buckets.predictions_log, key)))
        for key in stack.store.list_keys(buckets.predictions_log)
    )
    assert table.num_rows == ROWS and set(table.column("model_version").to_pylist()) == {"5"}


def test_the_daily_pingsource_compacts_the_logs_finished_days_through_the_outcomes_function(
    outcomes_stack: RunningStack,
) -> None:
    """infra/knative/log-compaction.yaml's PingSource, fired through the broker, reaches the
    outcomes function, which merges a finished day's parts into one object."""
    stack = outcomes_stack
    bucket = stack.settings.buckets.predictions_log
    ship_parts(stack.store, bucket, "9/2026-01-01", 3)
    before = sorted(stack.store.list_keys(bucket, "9/2026-01-01/"))
    assert stack.fire_pingsource("log-compaction-daily") == 202
    document_key = f"9/2026-01-01/{log_compaction.DOCUMENT_NAME}"
    document = stack.wait_for(lambda: stack.store.get_json_if_exists(bucket, document_key), 60)
    assert document is not None, stack.log("outcomes")
    assert (document["parts"], document["rows"]) == (before, 6)
    assert stack.wait_for(
        lambda: (
            stack.store.list_keys(bucket, "9/2026-01-01/")
            == sorted([document["parquet"], document_key])
        ),
        30,
    )
