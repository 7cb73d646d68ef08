"""The serving core (readmission.serving) without a server: feeds, validation, errors,
metadata checks, hot swap, and the import rule of the predict image."""

from __future__ import annotations

import gc
import json
import logging
import math
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.predict_support import (
    ROOT,
    build_model,
    challenger_metadata,
    decision_document,
    patient_rows,
    sample_frame,
    write_local_model,
)
from support.python_snippet import run_python

from readmission.contract import FEATURES
from readmission.serving.decisions import GateDocuments
from readmission.serving.errors import InputError, ModelLoadError, ModelNotReady
from readmission.serving.examples import EXAMPLE_PATIENT
from readmission.serving.model import LoadedModel, rounded_probabilities
from readmission.serving.server import ModelServer
from readmission.serving.settings import ServingSettings
from readmission.serving.sources import LocalModelSource


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    onnx_bytes, metadata = build_model()
    return LoadedModel(onnx_bytes, metadata)


@pytest.fixture(scope="module")
def unseen_model() -> LoadedModel:
    onnx_bytes, metadata = build_model()
    return LoadedModel(onnx_bytes, metadata, policy="unseen")


def _error(model: LoadedModel, rows: list[Any]) -> InputError:
    with pytest.raises(InputError) as info:
        model.predict(rows)
    return info.value


# ---- feeds ----------------------------------------------------------------------------------
def test_feeds_follow_the_onnx_contract(model: LoadedModel) -> None:
    rows = patient_rows(5)
    rows[0]["time_in_hospital"] = None
    rows[1]["num_medications"] = "?"
    rows[2]["num_lab_procedures"] = "41"
    rows[3]["race"] = None
    rows[4]["payer_code"] = ""
    feeds = model.feeds(rows)
    assert set(feeds) == {"numeric", "categorical"}
    assert feeds["numeric"].dtype == np.float32 and feeds["numeric"].shape == (5, 8)
    assert feeds["categorical"].shape == (5, 39)
    assert all(isinstance(v, str) for v in feeds["categorical"].ravel())
    spec = {s.column: s for s in model.inputs}

    def cell(row: int, column: str) -> Any:
        return feeds[spec[column].onnx_name][row, spec[column].index]

    assert [s.column for s in model.inputs] == list(FEATURES)
    assert math.isnan(cell(0, "time_in_hospital"))
    assert math.isnan(cell(1, "num_medications"))
    assert cell(2, "num_lab_procedures") == 41.0
    assert cell(3, "race") == "?"
    assert cell(4, "payer_code") == "?"
    assert cell(0, "race") == rows[0]["race"]
    # the single-row path builds the same tensors
    one = model._feeds_one(rows[2], None)
    np.testing.assert_array_equal(one["numeric"], feeds["numeric"][2:3])
    assert one["categorical"].tolist() == feeds["categorical"][2:3].tolist()


def test_a_per_column_export_is_still_served_the_same() -> None:
    """Champions exported before the packed graph (one [N, 1] input per column) still load,
    and give the packed graph's predictions."""
    from support.predict_support import build_per_column_model

    packed_bytes, metadata = build_model()
    per_column_bytes, per_column_metadata = build_per_column_model()
    packed = LoadedModel(packed_bytes, metadata)
    per_column = LoadedModel(per_column_bytes, per_column_metadata)
    assert not per_column.layout.packed and packed.layout.packed
    assert len(per_column.session.get_inputs()) == 47
    rows = patient_rows(50)
    assert per_column.predict(rows) == packed.predict(rows)
    assert per_column.predict([rows[0]]) == packed.predict([rows[0]])
    assert per_column.predict_one(rows[1]) == packed.predict_one(rows[1])


def test_predictions_match_the_exporters_own_feeds(model: LoadedModel) -> None:
    """Our numpy feeds give exactly what onnx_parity.run_onnx gives from the pandas frame."""
    from readmission.onnx_parity import run_onnx

    frame = sample_frame().iloc[:200]
    labels, probabilities = run_onnx(model.model_bytes, frame)
    predictions = model.predict(patient_rows(200))
    assert [p.label for p in predictions] == [str(label) for label in labels]
    ours = np.array([[p.probabilities[c] for c in model.classes] for p in predictions])
    assert np.abs(ours - probabilities).max() < 1e-5


def test_single_row_path_equals_batch_path(model: LoadedModel) -> None:
    rows = patient_rows(20)
    rows[3]["weight"] = None
    rows[4]["number_inpatient"] = "2"
    batch = model.predict(rows)
    for row, expected in zip(rows, batch, strict=True):
        assert model.predict([row]) == [expected]


def test_prediction_shape(model: LoadedModel) -> None:
    [prediction] = model.predict([EXAMPLE_PATIENT])
    assert model.classes == sorted(["NO", ">30", "<30"])
    assert list(prediction.probabilities) == model.classes
    assert abs(sum(prediction.probabilities.values()) - 1) < 1e-4
    assert prediction.label == max(prediction.probabilities, key=prediction.probabilities.get)
    assert prediction.warnings == []


def test_extra_keys_are_ignored_and_integers_read_as_codes(model: LoadedModel) -> None:
    row = dict(EXAMPLE_PATIENT, encounter_id=1, readmitted="NO")
    row["admission_type_id"] = 1  # the JSON number for the code "1"
    assert model.predict([row]) == model.predict([EXAMPLE_PATIENT])


# ---- validation errors ----------------------------------------------------------------------
def test_missing_feature_names_the_field(model: LoadedModel) -> None:
    row = dict(EXAMPLE_PATIENT)
    del row["A1Cresult"]
    error = _error(model, [EXAMPLE_PATIENT, row])
    assert (error.field, error.row, error.kind, error.status) == (
        "A1Cresult",
        1,
        "missing_feature",
        422,
    )
    assert _error(model, [row]).field == "A1Cresult"


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("time_in_hospital", "five"),
        ("time_in_hospital", True),
        ("time_in_hospital", [3]),
        ("time_in_hospital", {"v": 3}),
        ("time_in_hospital", float("nan")),
        ("num_medications", float("inf")),
        ("num_medications", 1e39),
        ("num_medications", 10**400),
        ("num_medications", "1e999"),
        ("num_medications", "NaN"),
        ("race", 1.5),
        ("race", False),
        ("race", ["Caucasian"]),
        ("gender", {"x": 1}),
    ],
)
def test_wrong_type_names_the_field(model: LoadedModel, column: str, value: Any) -> None:
    for rows in (
        [dict(EXAMPLE_PATIENT, **{column: value})],
        [EXAMPLE_PATIENT, dict(EXAMPLE_PATIENT, **{column: value})],
    ):
        error = _error(model, rows)
        assert (error.field, error.kind, error.status) == (column, "invalid_type", 422)
        assert error.row == len(rows) - 1


def test_unknown_category_is_rejected_with_the_allowed_values(model: LoadedModel) -> None:
    for rows in (
        [dict(EXAMPLE_PATIENT, race="Martian")],
        [EXAMPLE_PATIENT, dict(EXAMPLE_PATIENT, race="Martian")],
    ):
        error = _error(model, rows)
        assert (error.field, error.kind) == ("race", "unknown_category")
        assert error.allowed is not None and "Caucasian" in error.allowed
        assert "Martian" in error.message
        assert error.to_dict()["allowed"] == error.allowed


def test_unknown_category_policy_unseen_warns(unseen_model: LoadedModel) -> None:
    rows = [EXAMPLE_PATIENT, dict(EXAMPLE_PATIENT, diag_1="V99.99")]
    first, second = unseen_model.predict(rows)
    assert first.warnings == []
    assert len(second.warnings) == 1 and "diag_1" in second.warnings[0]
    [single] = unseen_model.predict([rows[1]])
    assert single == second


def test_rows_must_be_objects_and_batches_non_empty(model: LoadedModel) -> None:
    error = _error(model, [EXAMPLE_PATIENT, ["not", "a", "row"]])
    assert (error.kind, error.row) == ("invalid_row", 1)
    assert _error(model, []).kind == "empty_batch"


def test_an_unknown_key_is_refused_and_named_on_every_path(model: LoadedModel) -> None:
    """One input rule (docs/predict.md): the data file's ids and target are ignored, any
    other key that is not an input is refused: a typo must not become a missing value."""
    typo = dict(EXAMPLE_PATIENT, num_medication=12)
    calls = (
        lambda: model.predict([typo]),
        lambda: model.predict([EXAMPLE_PATIENT, typo]),
        lambda: model.predict_one(typo),
        lambda: model.predict_lists([EXAMPLE_PATIENT, typo]),
    )
    for call in calls:
        with pytest.raises(InputError) as info:
            call()
        error = info.value
        assert (error.field, error.kind, error.status) == ("num_medication", "unknown_feature", 422)
        assert "num_medication" in error.message
    assert _error(model, [EXAMPLE_PATIENT, typo]).row == 1
    several = dict(typo, zzz=1, aaa=2)
    assert _error(model, [several]).field == "aaa"  # the first in sorted order
    assert "num_medication" in _error(model, [several]).message
    ids = dict(EXAMPLE_PATIENT, encounter_id=1, patient_nbr=2, readmitted="<30")
    assert model.predict([ids, ids]) == model.predict([EXAMPLE_PATIENT] * 2)
    assert model.predict_one(ids) == model.predict_one(EXAMPLE_PATIENT)


def test_v2_tensors_follow_the_same_input_rule(model: LoadedModel) -> None:
    from readmission.serving import v2

    def tensor(name: str, datatype: str, data: list[Any]) -> dict[str, Any]:
        return {"name": name, "datatype": datatype, "shape": [len(data), 1], "data": data}

    inputs = [
        tensor(spec.column, "FP32" if spec.numeric else "BYTES", [EXAMPLE_PATIENT[spec.column]])
        for spec in model.inputs
    ]
    rows, _ = v2.request_rows(
        model,
        {
            "inputs": [
                *inputs,
                tensor("encounter_id", "INT64", [1]),
                tensor("readmitted", "BYTES", ["NO"]),
            ]
        },
    )
    assert rows == [EXAMPLE_PATIENT]
    with pytest.raises(InputError) as info:
        v2.request_rows(model, {"inputs": [*inputs, tensor("num_medication", "FP32", [1])]})
    assert (info.value.field, info.value.kind, info.value.status) == (
        "num_medication",
        "unknown_input",
        422,
    )


def test_v2_data_nested_too_deeply_is_an_input_error(model: LoadedModel) -> None:
    from readmission.serving import v2

    deep: Any = ["Caucasian"]
    for _ in range(5000):
        deep = [deep]
    body = {"inputs": [{"name": "race", "datatype": "BYTES", "shape": [1, 1], "data": deep}]}
    with pytest.raises(InputError) as info:
        v2.request_rows(model, body)
    assert (info.value.field, info.value.kind) == ("race", "invalid_tensor")
    name = {"inputs": [], "outputs": [{"name": deep}]}
    with pytest.raises(InputError):
        v2.request_rows(model, name)


@pytest.mark.parametrize("column", ["race", "num_medications"])
def test_a_deeply_nested_value_is_an_input_error(model: LoadedModel, column: str) -> None:
    deep: Any = [1]
    for _ in range(5000):
        deep = [deep]
    row = dict(EXAMPLE_PATIENT, **{column: deep})
    for call in (lambda: model.predict([row]), lambda: model.predict([EXAMPLE_PATIENT, row])):
        with pytest.raises(InputError) as info:
            call()
        assert (info.value.field, info.value.kind) == (column, "invalid_type")
        assert len(info.value.message) <= 300


# ---- metadata and model checks --------------------------------------------------------------
def test_sha256_mismatch_refuses_the_model() -> None:
    onnx_bytes, metadata = build_model()
    with pytest.raises(ModelLoadError, match="sha256"):
        LoadedModel(onnx_bytes, dict(metadata, model_sha256="0" * 64))


def test_metadata_must_describe_the_onnx_inputs() -> None:
    onnx_bytes, metadata = build_model()

    def changed(column: str, **change: Any) -> dict[str, Any]:
        inputs = [dict(i, **change) if i["column"] == column else i for i in metadata["inputs"]]
        return dict(metadata, inputs=inputs)

    with pytest.raises(ModelLoadError, match="span several tensors"):
        LoadedModel(onnx_bytes, changed("race", onnx_name="other"))
    with pytest.raises(ModelLoadError, match="span several tensors"):
        LoadedModel(onnx_bytes, changed("race", kind="numeric"))
    with pytest.raises(ModelLoadError, match=r"indexes must be 0\.\.38"):
        LoadedModel(onnx_bytes, changed("race", index=99))
    renamed = dict(
        metadata,
        inputs=[
            dict(i, onnx_name="numbers") if i["kind"] == "numeric" else i
            for i in metadata["inputs"]
        ],
    )
    with pytest.raises(ModelLoadError, match="not the metadata's"):
        LoadedModel(onnx_bytes, renamed)
    with pytest.raises(ModelLoadError, match="classes"):
        LoadedModel(onnx_bytes, {k: v for k, v in metadata.items() if k != "classes"})


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("THREADS", raising=False)
    assert ServingSettings.from_env() == ServingSettings()
    monkeypatch.setenv("THREADS", "1")  # gunicorn's threads per worker
    assert ServingSettings.from_env().request_threads == 1
    monkeypatch.setenv("UNKNOWN_CATEGORY_POLICY", "bogus")
    with pytest.raises(ValueError, match="UNKNOWN_CATEGORY_POLICY"):
        ServingSettings.from_env()
    monkeypatch.setenv("UNKNOWN_CATEGORY_POLICY", "unseen")
    monkeypatch.setenv("MODEL_PATH", "/x.onnx")
    with pytest.raises(ValueError, match="MODEL_METADATA_PATH"):
        ServingSettings.from_env()


def test_settings_name_a_bad_number_and_its_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREDICT_BATCH_LIMIT", "1.5")
    with pytest.raises(ValueError, match=r"^PREDICT_BATCH_LIMIT must be an integer, got '1\.5'$"):
        ServingSettings.from_env()
    monkeypatch.setenv("PREDICT_BATCH_LIMIT", "0")
    with pytest.raises(ValueError, match=r"^PREDICT_BATCH_LIMIT must be >= 1, got '0'$"):
        ServingSettings.from_env()
    monkeypatch.delenv("PREDICT_BATCH_LIMIT")
    monkeypatch.setenv("PREDICTION_LOG_SECONDS", "0")
    with pytest.raises(ValueError, match=r"^PREDICTION_LOG_SECONDS must be >= 0\.01, got '0'$"):
        ServingSettings.from_env()


def test_probabilities_are_rounded_as_numpy_rounds_them_for_any_number_of_rows() -> None:
    """Single rows are rounded in Python (faster than numpy's call), batches with numpy: the
    same answer either way, ties and NaN included."""
    rng = np.random.default_rng(7)
    ties = ((rng.integers(0, 10**6, (8, 3)) + 0.5) / 1e6).astype(np.float32)
    cases = [
        rng.random((8, 3), dtype=np.float32),
        ties,
        np.nextafter(ties, np.float32(1)),
        np.nextafter(ties, np.float32(0)),
        np.float32([[0.0, 1.0, 0.5], [5e-7, 4.9999997e-07, 1e-7]]),
        np.float32([[np.nan, np.inf, 0.25]]),
    ]
    for probabilities in cases:
        for rows in (probabilities[:1], probabilities, np.tile(probabilities, (4, 1))):
            expected = np.round(rows.astype(np.float64), 6).tolist()
            got = rounded_probabilities(rows)
            assert str(got) == str(expected)  # NaN == NaN as text
            assert all(type(value) is float for row in got for value in row)


# ---- lifecycle and hot swap -----------------------------------------------------------------
def test_server_lifecycle_with_local_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = LocalModelSource(str(tmp_path / "model.onnx"), str(tmp_path / "metadata.json"))
    server = ModelServer(source, ServingSettings(poll_seconds=0))
    assert not server.ready
    with pytest.raises(ModelNotReady):
        server.require_model()
    with caplog.at_level(logging.WARNING, logger="readmission.serving"):
        assert server.try_load() is False and "missing" in (server.last_error or "")
    # no model yet is a state, not a crash: one line with the reason, no traceback
    assert [(r.levelno, r.exc_info) for r in caplog.records] == [(logging.WARNING, None)]
    assert "missing" in caplog.records[0].getMessage()
    assert server.poll_once() is False  # no metadata yet: nothing to load
    write_local_model(tmp_path)
    assert server.poll_once() is True and server.ready
    assert server.poll_once() is False  # same token: no reload
    assert source.asset("v1/learning_curve.png").startswith(b"\x89PNG")


def test_hot_swap_under_load_drops_nothing(tmp_path: Path) -> None:
    """Readers predict continuously while the metadata changes twice: zero failures, and
    every answer comes from a complete model (version 1 or 2, never a mix)."""
    write_local_model(tmp_path, "decision_tree", "1")
    source = LocalModelSource(str(tmp_path / "model.onnx"), str(tmp_path / "metadata.json"))
    server = ModelServer(source, ServingSettings(poll_seconds=0.05))
    server.load()
    server.ensure_serving()
    rows = patient_rows(8)
    failures: list[BaseException] = []
    versions: set[str] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                model = server.require_model()
                predictions = model.predict(rows)
                assert len(predictions) == len(rows)
                versions.add(model.version)
            except BaseException as exc:
                failures.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        write_local_model(tmp_path / "v2", "logistic_regression", "2")
        # Swap the files the way a deploy would: model first, then the metadata naming it.
        (tmp_path / "model.onnx").write_bytes((tmp_path / "v2" / "model.onnx").read_bytes())
        (tmp_path / "v2" / "metadata.json").replace(tmp_path / "metadata.json")
        deadline = time.monotonic() + 20
        while server.require_model().version != "2" and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        stop.set()
        server.stop()
        for thread in threads:
            thread.join()
    assert failures == []
    assert server.require_model().version == "2"
    assert server.require_model().metadata["algorithm"] == "logistic_regression"
    assert versions == {"1", "2"} and server.swaps == 1


def test_a_swapped_out_model_is_freed_without_the_garbage_collector(tmp_path: Path) -> None:
    """The predict function freezes its objects before gunicorn forks (gc.freeze), so the
    collector never frees the model loaded then: a model must hold no reference cycle. After
    a swap the old model, session included, is gone at once, with the collector off."""
    write_local_model(tmp_path, "decision_tree", "1")
    source = LocalModelSource(str(tmp_path / "model.onnx"), str(tmp_path / "metadata.json"))
    server = ModelServer(source, ServingSettings(poll_seconds=0))
    server.ensure_serving()  # this process serves: loads build their session
    first = server.load()
    assert first is not None
    first.predict_one(patient_rows(1)[0])  # the single-row path (micro-batcher) has run
    first.predict(patient_rows(3))
    old = weakref.ref(first)
    del first
    was_enabled = gc.isenabled()
    gc.disable()
    gc.freeze()
    try:
        write_local_model(tmp_path, "decision_tree", "2")
        assert server.poll_once() is True and server.require_model().version == "2"
        assert old() is None
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()


def test_a_model_onnxruntime_refuses_in_the_worker_is_not_served_and_is_reloaded(
    tmp_path: Path,
) -> None:
    """The master checks bytes and metadata only; a model whose session cannot be built fails
    in ensure_serving (not ready, with the reason), and the next poll loads a good one."""
    model_path, metadata_path = write_local_model(tmp_path)
    good = model_path.read_bytes()
    metadata = json.loads(metadata_path.read_text())
    metadata.pop("model_sha256", None)  # so that only onnxruntime can notice
    metadata_path.write_text(json.dumps(metadata))
    model_path.write_bytes(b"not an onnx model")
    server = ModelServer(
        LocalModelSource(str(model_path), str(metadata_path)), ServingSettings(poll_seconds=0)
    )
    assert server.try_load() and server.model is not None and server.model.session is None
    server.ensure_serving()
    assert not server.ready and "onnxruntime cannot load" in (server.last_error or "")
    with pytest.raises(ModelNotReady):
        server.require_model()
    model_path.write_bytes(good)
    assert server.poll_once() is True
    assert server.require_model().predict_one(patient_rows(1)[0])[0] in server.model.classes


def test_failed_reload_keeps_the_old_model(tmp_path: Path) -> None:
    write_local_model(tmp_path)
    source = LocalModelSource(str(tmp_path / "model.onnx"), str(tmp_path / "metadata.json"))
    server = ModelServer(source, ServingSettings(poll_seconds=0))
    server.load()
    server.ensure_serving()
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    metadata.update(version="2", model_sha256="f" * 64)
    (tmp_path / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelLoadError):
        server.poll_once()
    assert server.require_model().version == "1"


# ---- the gate's documents (challenger, last decision) ----------------------------------------
def test_gate_documents_are_read_by_the_poll_thread_and_never_touch_the_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Local files next to the metadata: null while absent, shown once written, re-read only
    when changed, null (with one warning) when unreadable, while the champion serves on."""
    model_path, metadata_path = write_local_model(tmp_path)
    source = LocalModelSource(str(model_path), str(metadata_path))
    gate = GateDocuments.for_source(source)
    server = ModelServer(source, ServingSettings(poll_seconds=0.05))
    refreshed = threading.Event()
    server.on_poll.append(gate.refresh)
    server.on_poll.append(refreshed.set)
    server.load()

    def next_poll() -> None:
        refreshed.clear()
        assert refreshed.wait(5)
        refreshed.clear()
        assert refreshed.wait(5)  # a whole poll after the change

    server.ensure_serving()  # starts the poll thread: it reads the documents at once
    try:
        next_poll()
        assert gate.info() == {"challenger": None, "last_decision": None}
        (tmp_path / "challenger.json").write_text(json.dumps(challenger_metadata("2")))
        (tmp_path / "last-decision.json").write_text(json.dumps(decision_document("kept")))
        next_poll()
        info = gate.info()
        assert info["challenger"] == {
            "name": "diabetes_readmission_model",
            "version": "2",
            "algorithm": "logistic_regression",
            "training_rows": 2103,
            "dataset_id": "0000000000000002",
            "corpus_version": "0000000000000002",
            "run_id": "run-2",
            "registered_at": "2026-12-04T05:00:00Z",
            "selection_metric": "f1_weighted",
            "test_score": 0.5712,
            "metrics": challenger_metadata("2")["metrics"],
        }
        assert info["last_decision"] == decision_document("kept")
        with caplog.at_level(logging.WARNING, logger="readmission.serving.decisions"):
            (tmp_path / "last-decision.json").write_text('{"verdict": "promo')
            next_poll()
            assert gate.info()["last_decision"] is None
            assert gate.info()["challenger"]["version"] == "2"
            next_poll()  # unchanged: not read (nor warned about) again
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "last-decision.json is not valid JSON" in warnings[0]
        assert server.ready and server.last_error is None
        assert server.require_model().predict_one(patient_rows(1)[0])[0] in {"NO", ">30", "<30"}
        (tmp_path / "challenger.json").write_text(json.dumps(challenger_metadata("3", "svm")))
        (tmp_path / "last-decision.json").write_text(json.dumps(decision_document("promoted")))
        next_poll()
        info = gate.info()
        assert (info["challenger"]["version"], info["challenger"]["algorithm"]) == ("3", "svm")
        assert info["last_decision"]["verdict"] == "promoted"
        (tmp_path / "challenger.json").unlink()
        next_poll()
        assert gate.info()["challenger"] is None
    finally:
        server.stop()


def test_a_decision_without_optional_fields_and_a_broken_source_keep_serving() -> None:
    """A manual decision (no rule, interval, difference) shows nulls for them; a source that
    fails keeps what was read last; a document that is not an object is null."""

    class Flaky:
        description = "flaky"

        def __init__(self) -> None:
            self.fail = False
            self.documents = {
                "challenger/metadata.json": b"[1, 2]",
                "champion/last-decision.json": json.dumps(
                    {"kind": "manual", "verdict": "rolled_back", "reason": "manual rollback to 1"}
                ).encode(),
            }

        def document(self, key: str, token: str | None = None) -> Any:
            if self.fail:
                raise OSError("store down")
            from readmission.serving.s3 import S3Object

            return S3Object(self.documents[key], "etag-" + key)

    source = Flaky()
    gate = GateDocuments.for_source(source)
    gate.refresh()
    decision = gate.info()["last_decision"]
    assert decision["kind"] == "manual" and decision["verdict"] == "rolled_back"
    assert decision["rule"] is None and decision["interval"] is None
    assert decision["difference"] is None
    assert gate.info()["challenger"] is None  # a JSON list is not a model's metadata
    source.fail = True
    gate.refresh()  # warns, never raises
    assert gate.info()["last_decision"] == decision


# a new interpreter imports the predict function as gunicorn's master does
_IMPORT_PREDICT_MAIN = f"""
import gc, importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location(
    "predict_main", {str(ROOT / "functions" / "predict" / "main.py")!r}
)
main = importlib.util.module_from_spec(spec)
spec.loader.exec_module(main)
main.SERVER.wait_for_loader()
"""


def _python_with_local_model(script: str, model_path: Path, metadata_path: Path, **env: str) -> str:
    """Run `script` in a new interpreter serving the local model files; its last output line."""
    result = run_python(
        script,
        env={
            "MODEL_PATH": str(model_path),
            "MODEL_METADATA_PATH": str(metadata_path),
            "MODEL_POLL_SECONDS": "0",
            **env,
        },
    )
    return result.stdout.strip().splitlines()[-1]


def test_the_master_has_no_onnxruntime_and_a_forked_worker_is_frozen_serves_and_exits(
    tmp_path: Path,
) -> None:
    """gunicorn forks its workers after importing the function: the master fetched and checked
    the model without importing onnxruntime (its thread would be copied into the worker, which
    then aborts on exit); the objects made until the fork are frozen in the worker
    (gc.freeze); the worker builds its session, serves, and exits cleanly."""
    model_path, metadata_path = write_local_model(tmp_path)
    script = (
        _IMPORT_PREDICT_MAIN
        + """
assert main.SERVER.model is not None and main.SERVER.model.session is None
assert "onnxruntime" not in sys.modules
before = gc.get_freeze_count()
pid = os.fork()
if pid == 0:
    from readmission.serving.examples import EXAMPLE_PATIENT
    main.SERVER.ensure_serving()  # as every request does: waits for the session's thread
    label = main.SERVER.require_model().predict_one(EXAMPLE_PATIENT)[0]
    sys.stdout.write(json.dumps([before, gc.get_freeze_count(), label]) + "\\n")
    sys.stdout.flush()
    sys.exit(0)  # as a gunicorn worker ends: with the interpreter's and C++'s exit handlers
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
"""
    )
    # MODEL_LOAD=background: the fork waits for the load
    last_line = _python_with_local_model(script, model_path, metadata_path, MODEL_LOAD="background")
    before, in_child, label = json.loads(last_line)
    assert before == 0 and in_child > 1000
    assert label in {"NO", ">30", "<30"}


# ---- import rule ----------------------------------------------------------------------------
def test_serving_path_imports_no_training_libraries(tmp_path: Path) -> None:
    """The predict image has no scikit-learn, pandas, pyarrow or mlflow (and skips boto3)."""
    model_path, metadata_path = write_local_model(tmp_path)
    script = (
        _IMPORT_PREDICT_MAIN
        + """
assert main.SERVER.ready, main.SERVER.last_error
main.SERVER.ensure_serving()
from readmission.serving.examples import EXAMPLE_PATIENT
main.SERVER.require_model().predict([EXAMPLE_PATIENT])
import readmission.serving.sources, readmission.serving.v2
print(json.dumps(sorted(sys.modules)))
"""
    )
    modules = set(json.loads(_python_with_local_model(script, model_path, metadata_path)))
    assert "onnxruntime" in modules and "readmission.serving" in modules
    for banned in ("sklearn", "pandas", "pyarrow", "mlflow", "skl2onnx", "boto3", "botocore"):
        assert not any(m == banned or m.startswith(banned + ".") for m in modules), banned


def test_example_patient_covers_the_contract() -> None:
    assert set(EXAMPLE_PATIENT) == set(FEATURES)


@pytest.mark.parametrize("policy", ["reject", "unseen"])
def test_single_rows_without_micro_batching_answer_as_a_batch_does(policy: str) -> None:
    """A server answering one request at a time (THREADS=1) skips the micro-batcher: the
    single-row path then gives exactly what predict([row]) gives, warnings and errors too."""
    onnx_bytes, metadata = build_model()
    plain = LoadedModel(onnx_bytes, metadata, policy=policy, micro_batching=False)
    rows = patient_rows(12)
    rows[3] = {**rows[3], "medical_specialty": "Astrology"}  # unseen: warning or 422
    for row in rows:
        try:
            want = plain.predict([row])[0]
        except InputError as error:
            with pytest.raises(InputError) as info:
                plain.predict_one(row)
            assert info.value.field == error.field == "medical_specialty"
            continue
        label, probabilities, warnings = plain.predict_one(row)
        assert label == want.label and warnings == want.warnings
        assert dict(zip(plain.classes, probabilities, strict=True)) == want.probabilities
    assert policy == "reject" or plain.predict_one(rows[3])[2]


def test_the_server_micro_batches_only_with_several_request_threads(tmp_path: Path) -> None:
    write_local_model(tmp_path)
    source = LocalModelSource(str(tmp_path / "model.onnx"), str(tmp_path / "metadata.json"))
    for threads, batching in ((1, False), (4, True)):
        server = ModelServer(source, ServingSettings(poll_seconds=0, request_threads=threads))
        model = server.load()
        assert model is not None and (model._batcher is not None) is batching
        assert model.session is None  # built where the server serves (ensure_serving)
        server.ensure_serving()
        served = server.require_model()
        assert served.session is not None and (served._batcher is not None) is batching


def test_concurrent_single_rows_are_micro_batched_and_answer_their_own_row(
    model: LoadedModel,
) -> None:
    """16 threads call predict_one at once: the batcher groups rows into shared session runs,
    and every thread gets exactly what predict([its row]) gives; bad rows fail alone."""
    rows = patient_rows(16)
    expected = [model.predict([row])[0] for row in rows]
    runs: list[int] = []
    batcher = model._batcher
    original = model._run_rows

    def counted(numbers: list[list[float]], texts: list[list[str]]) -> Any:
        runs.append(len(numbers))
        time.sleep(0.002)  # a slow session run, so that rows queue behind it
        return original(numbers, texts)

    failures: list[BaseException] = []
    start = threading.Barrier(17)

    def worker(index: int) -> None:
        start.wait()
        try:
            for _ in range(20):
                if index == 0:
                    with pytest.raises(InputError):
                        model.predict_one({**rows[0], "race": 3.5})
                label, probabilities, warnings = model.predict_one(rows[index])
                want = expected[index]
                assert label == want.label and warnings == want.warnings
                assert dict(zip(model.classes, probabilities, strict=True)) == want.probabilities
        except BaseException as exc:
            failures.append(exc)

    model._run_rows = counted  # type: ignore[method-assign]
    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        start.wait()
        for thread in threads:
            thread.join()
    finally:
        del model._run_rows  # the class's method again
    assert not failures, failures[:3]
    assert sum(runs) == 16 * 20 and max(runs) > 1 and len(runs) < 16 * 20
    assert not batcher._busy and not batcher._queue


def test_input_ranges_are_each_numeric_columns_min_and_max_without_missing_values() -> None:
    import pandas as pd

    from readmission.model_artifacts import input_ranges

    frame = pd.DataFrame(
        {
            "time_in_hospital": np.array([3, 1, np.nan, 14], dtype=np.float32),
            "race": ["Caucasian", "?", "AfricanAmerican", "Other"],
            "weight": np.array([np.nan] * 4, dtype=np.float32),
        }
    )
    assert input_ranges(frame) == {"time_in_hospital": {"min": 1.0, "max": 14.0}}


def test_model_info_gives_numeric_inputs_the_ranges_of_the_metadata(model: LoadedModel) -> None:
    frame = sample_frame(20)  # the rows build_model fitted on
    inputs = {spec["column"]: spec for spec in model.info()["inputs"]}
    for column, spec in inputs.items():
        if spec["kind"] == "numeric":
            values = frame[column].astype(float)
            assert (spec["min"], spec["max"]) == (values.min(), values.max())
        else:
            assert "min" not in spec and spec["categories"]
    # older metadata without ranges, and a malformed entry: plain number inputs
    onnx_bytes, metadata = build_model()
    older = {k: v for k, v in metadata.items() if k != "input_ranges"}
    bad = dict(metadata, input_ranges={"time_in_hospital": {"min": 9, "max": 1}})
    for variant in (older, bad):
        info = LoadedModel(onnx_bytes, variant, session=False).info()
        assert not any("min" in spec or "max" in spec for spec in info["inputs"])
