"""Batch scoring on the REAL local stack: a drop in the scoring bucket → notification → adapter
→ broker → the `score` function → predictions and a summary; a file that is not a table →
rejected with a report. Lean: a stack of its own (no training: the champion is a small model
written straight into the models bucket), one CSV and one non-table file.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pyarrow.parquet as pq
import pytest
from support.predict_support import build_model
from support.seaweed_server import sample_csv
from support.stack import RunningStack, running_stack

from readmission.keys import CHAMPION_METADATA_KEY

pytestmark = pytest.mark.stack

TIMEOUT = 180.0  # a slow, shared 2-core machine


@pytest.fixture(scope="module")
def scoring_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    with running_stack(tmp_path_factory.mktemp("score") / "state", {"TRAIN_WORKERS": "1"}) as s:
        onnx_bytes, metadata = build_model("decision_tree", version="7")
        models = s.settings.buckets.models
        s.store.put_bytes(models, metadata["model_key"], onnx_bytes)
        s.store.put_bytes(models, CHAMPION_METADATA_KEY, json.dumps(metadata).encode())
        yield s


def test_a_drop_in_the_scoring_bucket_is_scored_and_a_non_table_is_rejected(
    scoring_stack: RunningStack,
) -> None:
    stack, scoring = scoring_stack, scoring_stack.settings.buckets.scoring
    lines = sample_csv(every=300).split(b"\r\n")
    lines.insert(3, b"1,2,3")  # one malformed line: listed, the file is still scored
    stack.store.put_bytes(scoring, "ward-2/today.csv", b"\r\n".join(lines), "text/csv")
    stack.store.put_bytes(scoring, "notes.txt", b"\x00\x01 not a table \xff", "text/plain")

    summary_key = "predictions/v7/ward-2/today.csv.summary.json"
    summary = stack.wait_for(lambda: stack.store.get_json_if_exists(scoring, summary_key), TIMEOUT)
    assert summary is not None, stack.log("score")
    assert summary["rows"]["malformed_lines"] == 1
    assert summary["rows"]["scored"] + summary["rows"]["rejected"] == summary["rows"]["read"]
    parquet = stack.store.get_bytes(scoring, "predictions/v7/ward-2/today.csv.parquet")
    assert pq.read_table(io.BytesIO(parquet)).num_rows == summary["rows"]["scored"] > 0

    rejected = stack.settings.buckets.rejected

    def report() -> Any:
        keys = [k for k in stack.store.list_keys(rejected) if k.endswith("notes.txt.error.json")]
        return keys and stack.store.get_json(rejected, keys[0])

    found = stack.wait_for(report, TIMEOUT)
    assert found and found["function"] == "score", stack.log("score")
    assert not stack.store.exists(scoring, "notes.txt")
    # the outputs fired no scoring of their own
    assert sorted(stack.store.list_keys(scoring, "predictions/")) == [
        "predictions/v7/ward-2/today.csv.csv",
        "predictions/v7/ward-2/today.csv.parquet",
        summary_key,
    ]
