"""Batch scoring (readmission.batch_scoring) against a real SeaweedFS and a real ONNX model.

The reference for every scored row is the predict function's own path (`LoadedModel.predict`
on the row as a client would send it): the scorer must give the same label and probabilities,
and reject exactly the rows predict refuses, with predict's reason.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from support.predict_support import build_model, tiny_png
from support.seaweed_server import SeaweedServer, sample_csv, seaweed_s3

from events.notifications import SCORING_CREATED, event_type_for
from readmission.batch_scoring import (
    ALREADY_SCORED,
    IGNORED,
    REJECTED,
    SCORED,
    ScoreOptions,
    output_keys,
    score_object,
)
from readmission.config import Buckets, Settings
from readmission.contract import TARGET
from readmission.serving.errors import InputError
from readmission.serving.model import LoadedModel
from readmission.storage import ObjectStore, json_bytes

__all__ = ["seaweed_s3"]  # the module-scoped server fixture

SETTINGS = Settings()
BUCKET = SETTINGS.buckets.scoring
OPTIONS = ScoreOptions(chunk_bytes=64 * 1024)  # several chunks even for a small file


@pytest.fixture(scope="module")
def store(seaweed_s3: SeaweedServer) -> ObjectStore:
    store = ObjectStore(seaweed_s3.client())
    store.ensure_buckets([BUCKET, SETTINGS.buckets.rejected])
    return store


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    onnx_bytes, metadata = build_model("decision_tree", version="3")
    return LoadedModel(onnx_bytes, metadata, micro_batching=False)


def test_score_options_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SCORE_EXPLAIN", "SCORE_CHUNK_BYTES", "SCORE_EXPLAIN_TOP_K", "SCORE_ORT_THREADS"):
        monkeypatch.delenv(name, raising=False)
    assert ScoreOptions.from_env() == ScoreOptions()
    monkeypatch.setenv("SCORE_EXPLAIN", "yes")
    monkeypatch.setenv("SCORE_CHUNK_BYTES", "65536")
    assert ScoreOptions.from_env().explain is True
    assert ScoreOptions.from_env().chunk_bytes == 64 * 1024
    monkeypatch.setenv("SCORE_CHUNK_BYTES", "10")
    with pytest.raises(ValueError, match=r"^SCORE_CHUNK_BYTES must be >= 65536, got '10'$"):
        ScoreOptions.from_env()
    monkeypatch.delenv("SCORE_CHUNK_BYTES")
    monkeypatch.setenv("SCORE_EXPLAIN", "maybe")
    with pytest.raises(ValueError, match=r"^SCORE_EXPLAIN must be one of .*, got 'maybe'$"):
        ScoreOptions.from_env()


def _put(store: ObjectStore, key: str, data: bytes) -> str:
    store.put_bytes(BUCKET, key, data)
    info = store.head(BUCKET, key)
    assert info is not None
    return info.etag


def _with_bad_rows(data: bytes) -> tuple[bytes, int]:
    """The CSV with row 3's time_in_hospital spelt out, and one line cut short after row 5."""
    lines = data.split(b"\r\n")
    header = lines[0].split(b",")
    cells = lines[3].split(b",")
    cells[header.index(b"time_in_hospital")] = b"three"
    lines[3] = b",".join(cells)
    lines.insert(6, b"123,456,Caucasian")
    return b"\r\n".join(lines), len([line for line in lines[1:] if line]) - 1


def _client_rows(data: bytes) -> list[dict[str, Any]]:
    """The CSV's well-formed rows as a client would send them to POST /predict."""
    reader = csv.DictReader(io.StringIO(data.decode()))
    return [row for row in reader if None not in row.values() and None not in row]


def test_predictions_match_the_predict_path_and_bad_rows_are_listed_not_fatal(
    store: ObjectStore, model: LoadedModel
) -> None:
    data, well_formed = _with_bad_rows(sample_csv(every=40))
    etag = _put(store, "ward-7/extract.csv", data)
    outcome = score_object(store, SETTINGS, OPTIONS, BUCKET, "ward-7/extract.csv", etag, model)
    assert outcome.status == SCORED
    keys = output_keys("3", "ward-7/extract.csv")
    assert keys["summary"] == "predictions/v3/ward-7/extract.csv.summary.json"
    summary = store.get_json(BUCKET, keys["summary"])
    table = pq.read_table(io.BytesIO(store.get_bytes(BUCKET, keys["parquet"])))
    text_columns = pacsv.ConvertOptions(column_types={"model_version": pa.string()})
    from_csv = pacsv.read_csv(
        io.BytesIO(store.get_bytes(BUCKET, keys["csv"])), convert_options=text_columns
    )
    assert table.to_pylist() == from_csv.to_pylist()
    assert TARGET not in table.column_names
    assert set(table.column("model_version").to_pylist()) == {"3"}

    expected: dict[int, tuple[str, list[float]]] = {}
    refused: dict[int, str] = {}
    for number, row in enumerate(_client_rows(data), start=1):
        try:
            prediction = model.predict([row])[0]
            expected[int(row["encounter_id"])] = (
                prediction.label,
                [prediction.probabilities[c] for c in model.classes],
            )
        except InputError as error:
            refused[number] = str(error)
    assert refused, "the sample must hold rows predict refuses"
    got = {
        r["encounter_id"]: (r["prediction"], [r[f"probability_{c}"] for c in model.classes])
        for r in table.to_pylist()
    }
    assert got == expected
    listed = {r["row"]: r["reasons"] for r in summary["rejected_rows"]}
    assert listed == {row: [reason] for row, reason in refused.items()}
    assert any("time_in_hospital" in reason for reason in refused.values())
    assert summary["malformed_lines"] == [{"line": 7, "reason": "3 fields where the header has 50"}]
    assert summary["rows"] == {
        "read": well_formed,
        "scored": len(expected),
        "rejected": len(refused),
        "malformed_lines": 1,
    }
    assert sum(summary["rows_per_class"].values()) == len(expected)
    assert summary["source"] == {"bucket": BUCKET, "key": "ward-7/extract.csv", "etag": etag}


def test_same_input_and_model_give_the_same_keys_and_bytes_and_a_redelivery_writes_nothing(
    store: ObjectStore, model: LoadedModel
) -> None:
    etag = _put(store, "again.csv", sample_csv(every=60))
    keys = output_keys(model.version, "again.csv")
    assert score_object(store, SETTINGS, OPTIONS, BUCKET, "again.csv", etag, model).status == SCORED
    first = {kind: store.get_bytes(BUCKET, keys[kind]) for kind in ("parquet", "csv")}
    tags = {kind: store.head(BUCKET, keys[kind]) for kind in keys}
    again = score_object(store, SETTINGS, OPTIONS, BUCKET, "again.csv", etag, model)
    assert again.status == ALREADY_SCORED
    assert {kind: store.head(BUCKET, keys[kind]) for kind in keys} == tags
    # a crash after the predictions but before the summary: the retry redoes the same bytes
    store.delete(BUCKET, keys["summary"])
    assert score_object(store, SETTINGS, OPTIONS, BUCKET, "again.csv", etag, model).status == SCORED
    assert {kind: store.get_bytes(BUCKET, keys[kind]) for kind in ("parquet", "csv")} == first


def test_a_parquet_input_gives_the_predictions_of_the_same_rows_as_csv(
    store: ObjectStore, model: LoadedModel
) -> None:
    data = sample_csv(every=80)
    sink = io.BytesIO()
    pq.write_table(pacsv.read_csv(io.BytesIO(data)), sink)
    csv_etag = _put(store, "same.csv", data)
    parquet_etag = _put(store, "same.parquet", sink.getvalue())
    score_object(store, SETTINGS, OPTIONS, BUCKET, "same.csv", csv_etag, model)
    score_object(store, SETTINGS, OPTIONS, BUCKET, "same.parquet", parquet_etag, model)

    def rows(key: str) -> list[dict[str, Any]]:
        parquet = store.get_bytes(BUCKET, output_keys(model.version, key)["parquet"])
        return pq.read_table(io.BytesIO(parquet)).to_pylist()

    assert rows("same.csv") and rows("same.parquet") == rows("same.csv")


@pytest.mark.parametrize(
    "name, data, problem",
    [
        ("photo.png", tiny_png(), "not a CSV"),
        ("empty.csv", b"", "not a CSV"),
        ("ids-only.csv", b"encounter_id,patient_nbr\r\n1,2\r\n", "required column"),
    ],
)
def test_a_file_that_is_not_a_table_of_encounters_goes_to_rejected_with_a_report(
    store: ObjectStore, model: LoadedModel, name: str, data: bytes, problem: str
) -> None:
    etag = _put(store, name, data)
    outcome = score_object(store, SETTINGS, OPTIONS, BUCKET, name, etag, model)
    assert outcome.status == REJECTED
    assert problem in " ".join(outcome.problems)
    report_key = next(k for k in outcome.written if k.endswith(".error.json"))
    rejected, key = report_key.split("/", 1)
    report = store.get_json(rejected, key)
    assert report["original"] == {"bucket": BUCKET, "key": name, "etag": etag}
    assert store.get_bytes(rejected, report["rejected_copy"]["key"]) == data
    assert not store.exists(BUCKET, name)
    assert not store.list_keys(BUCKET, f"predictions/v{model.version}/{name}")


def test_the_scorers_own_outputs_fire_no_event_and_are_ignored(
    store: ObjectStore, model: LoadedModel
) -> None:
    buckets = Buckets()
    assert event_type_for("scoring", "ward-7/extract.csv", buckets) == SCORING_CREATED
    assert event_type_for("scoring", "notes.txt", buckets) == SCORING_CREATED
    assert event_type_for("scoring", "predictions/v3/ward-7/extract.csv", buckets) is None
    key = "predictions/v3/x.csv"
    etag = _put(store, key, json_bytes({"not": "scored"}))
    assert score_object(store, SETTINGS, OPTIONS, BUCKET, key, etag, model).status == IGNORED
    assert not store.list_keys(BUCKET, "predictions/v3/predictions/")


def test_rows_without_a_whole_encounter_id_are_rejected_by_row(
    store: ObjectStore, model: LoadedModel
) -> None:
    lines = sample_csv(every=200).split(b"\r\n")
    lines[1] = b"E-17" + lines[1][lines[1].index(b",") :]
    etag = _put(store, "ids.csv", b"\r\n".join(lines))
    score_object(store, SETTINGS, OPTIONS, BUCKET, "ids.csv", etag, model)
    summary = store.get_json(BUCKET, output_keys(model.version, "ids.csv")["summary"])
    first = summary["rejected_rows"][0]
    assert first["row"] == 1 and first["encounter_id"] is None
    assert "encounter_id must be a whole number, got 'E-17'" in first["reasons"]
    parquet = store.get_bytes(BUCKET, output_keys(model.version, "ids.csv")["parquet"])
    assert pq.read_table(io.BytesIO(parquet)).schema.field("encounter_id").type == pa.int64()


def test_files_under_explain_get_the_top_factors_of_each_row(
    store: ObjectStore, model: LoadedModel
) -> None:
    from readmission.serving.explain import Explainer

    data = sample_csv(every=400)
    etag = _put(store, "explain/ward-1.csv", data)
    outcome = score_object(store, SETTINGS, OPTIONS, BUCKET, "explain/ward-1.csv", etag, model)
    assert outcome.status == SCORED
    keys = output_keys(model.version, "explain/ward-1.csv")
    rows = pq.read_table(io.BytesIO(store.get_bytes(BUCKET, keys["parquet"]))).to_pylist()
    by_id = {r["encounter_id"]: r for r in rows}
    explainer = Explainer(model)
    checked = 0
    for row in _client_rows(data):
        if int(row["encounter_id"]) in by_id:
            wanted = explainer.explain_one(row, k=OPTIONS.top_k)["top_factors"]
            assert json.loads(by_id[int(row["encounter_id"])]["top_features"]) == wanted
            checked += 1
    assert checked == len(rows) > 0
    summary = store.get_json(BUCKET, keys["summary"])
    assert summary["explanations"] is True
    assert summary["timing"]["explain_ms_per_row"] > 0
