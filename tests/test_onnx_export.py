"""ONNX export of every algorithm's pipeline, and parity with scikit-learn on real data."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
from support.seaweed_server import real_csv_bytes
from test_features import generated_frame, real_sample
from threadpoolctl import threadpool_limits

from readmission import contract
from readmission.contract import (
    CATEGORICAL_FEATURES,
    FEATURES,
    MISSING_MARKER,
    NUMERIC_FEATURES,
)
from readmission.features import (
    ALGORITHMS,
    PREPROCESS_STEP,
    build_pipeline,
    learned_categories,
    target_values,
    to_model_frame,
)
from readmission.onnx_export import ExportedModel, export_onnx
from readmission.onnx_parity import PARITY_TOLERANCE, ParityError, check_parity

TRAIN_ROWS, PARITY_ROWS = 4000, 3000


@functools.cache
def fitted(algorithm: str):  # type: ignore[no-untyped-def]
    train, _ = real_sample(TRAIN_ROWS, PARITY_ROWS)
    return build_pipeline(algorithm).fit(to_model_frame(train), target_values(train))


@functools.cache
def exported(algorithm: str) -> ExportedModel:
    return export_onnx(fitted(algorithm))


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Fit on one OpenMP/BLAS thread as the train function does: on a busy 2-core machine
    HistGradientBoosting's OpenMP threads otherwise spin for minutes."""
    with threadpool_limits(limits=1):
        yield


def parity_frame() -> pd.DataFrame:
    """Real validation rows plus unseen categories and missing values of every kind."""
    _, validation = real_sample(TRAIN_ROWS, PARITY_ROWS)
    frame = validation.copy()
    frame.loc[0:39, "diag_1"] = "999.99"  # an ICD-9 code no training row has
    frame.loc[40:79, "medical_specialty"] = "Astrology"
    frame.loc[80:99, "admission_source_id"] = "42"
    frame.loc[100:139, "num_medications"] = np.nan
    frame.loc[140:179, "time_in_hospital"] = np.nan
    frame.loc[180:219, "race"] = pd.NA
    frame.loc[220:259, "payer_code"] = ""
    frame.loc[260:299, "glyburide-metformin"] = "Up-and-down"  # unseen, in a renamed input
    return frame


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_export_passes_parity_on_real_rows_with_unknowns_and_missing(algorithm: str) -> None:
    report = check_parity(fitted(algorithm), exported(algorithm).onnx_bytes, parity_frame())
    assert report.rows == PARITY_ROWS
    assert report.argmax_mismatches == 0 and report.label_mismatches == 0
    assert report.max_abs_diff <= PARITY_TOLERANCE


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_graph_follows_the_onnx_contract(algorithm: str) -> None:
    model = exported(algorithm)
    graph = onnx.load_from_string(model.onnx_bytes).graph

    assert [spec["column"] for spec in model.inputs] == list(FEATURES)
    inputs = {graph_input.name: graph_input.type.tensor_type for graph_input in graph.input}
    assert list(inputs) == ["numeric", "categorical"]
    for name, elem_type, width in (
        ("numeric", onnx.TensorProto.FLOAT, len(NUMERIC_FEATURES)),
        ("categorical", onnx.TensorProto.STRING, len(CATEGORICAL_FEATURES)),
    ):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[name].shape.dim]
        assert dims == [None, width] and inputs[name].elem_type == elem_type
    for spec in model.inputs:
        if spec["column"] in NUMERIC_FEATURES:
            assert spec["kind"] == "numeric" and "categories" not in spec
            assert spec["onnx_name"] == "numeric"
            assert spec["index"] == NUMERIC_FEATURES.index(spec["column"])
        else:
            assert spec["kind"] == "categorical" and spec["onnx_name"] == "categorical"
            assert spec["index"] == CATEGORICAL_FEATURES.index(spec["column"])
            assert spec["categories"] and all(isinstance(c, str) for c in spec["categories"])

    assert model.classes == ["<30", ">30", "NO"]
    assert model.outputs == {"label": "label", "probabilities": "probabilities"}
    outputs = {o.name: o.type.tensor_type for o in graph.output}
    assert list(outputs) == ["label", "probabilities"]
    assert outputs["label"].elem_type == onnx.TensorProto.STRING
    assert outputs["probabilities"].elem_type == onnx.TensorProto.FLOAT
    assert outputs["probabilities"].shape.dim[1].dim_value == 3
    op_types = [node.op_type for node in graph.node]
    assert "ZipMap" not in op_types
    # one encoder for all 39 columns, not one per column
    assert op_types.count("LabelEncoder") == 1


def hand_built_feeds(rows: list[dict[str, object]], inputs: list[dict]) -> dict[str, np.ndarray]:
    """The feed rules of docs/training.md, without pandas, as the predict function applies them:
    each column's values at its `index` of its `onnx_name` tensor."""
    widths: dict[str, int] = {}
    for spec in inputs:
        widths[spec["onnx_name"]] = max(widths.get(spec["onnx_name"], 0), spec["index"] + 1)
    feeds = {
        name: np.empty((len(rows), width), dtype=np.float32 if name == "numeric" else object)
        for name, width in widths.items()
    }
    for spec in inputs:
        values = [row.get(spec["column"]) for row in rows]
        if spec["kind"] == "numeric":
            column = [
                math.nan if v is None or v == "" or v == MISSING_MARKER else float(v)  # type: ignore[arg-type]
                for v in values
            ]
        else:
            column = [MISSING_MARKER if v is None or v == "" else str(v) for v in values]
        feeds[spec["onnx_name"]][:, spec["index"]] = column
    return feeds


def test_feed_rules_reproduce_the_pipeline_from_plain_json_rows() -> None:
    algorithm = "gradient_boosting"
    frame = parity_frame().head(200)
    rows = []
    for record in frame[list(FEATURES)].to_dict(orient="records"):
        row: dict[str, object] = {}
        for column, value in record.items():
            missing = (
                value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))
            )
            row[column] = None if missing else value
        rows.append(row)
    model = exported(algorithm)
    session = ort.InferenceSession(model.onnx_bytes, providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(
        ["label", "probabilities"], hand_built_feeds(rows, model.inputs)
    )
    expected = fitted(algorithm).predict_proba(to_model_frame(frame))
    assert np.max(np.abs(probabilities - expected)) <= PARITY_TOLERANCE
    assert list(labels) == list(np.asarray(model.classes)[expected.argmax(axis=1)])
    # Categorical values the frame had as NA arrive as "?", the contract's missing marker.
    assert set(CATEGORICAL_FEATURES) <= {s["column"] for s in model.inputs}


def test_parity_check_catches_a_different_model() -> None:
    frame = parity_frame()
    wrong = exported("decision_tree").onnx_bytes
    with pytest.raises(ParityError, match="differs from the pipeline"):
        check_parity(fitted("gradient_boosting"), wrong, frame)


def test_parity_check_is_strict_about_the_tolerance() -> None:
    model = exported("logistic_regression").onnx_bytes
    report = check_parity(fitted("logistic_regression"), model, parity_frame())
    assert report.max_abs_diff > 0  # float32 graph vs float64 sklearn: never bit-identical
    with pytest.raises(ParityError, match="tolerance"):
        check_parity(
            fitted("logistic_regression"), model, parity_frame(), tolerance=report.max_abs_diff / 2
        )


def test_export_with_sample_frame_checks_parity() -> None:
    pipeline = fitted("decision_tree")
    model = export_onnx(pipeline, parity_frame().head(500))
    assert model.onnx_bytes == exported("decision_tree").onnx_bytes


# A feature column with no value in the training rows (the contract accepts such a file: e.g.
# the real file's first 2,000 encounters have no payer_code) must train and export like any
# other: same columns for the classifier, same ONNX inputs, parity on rows with and without it.
EMPTY_COLUMNS = ("payer_code", "num_lab_procedures")  # one categorical, one numeric


def without(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """The frame with `column` missing on every row, as the contract parses a '?' column."""
    frame = frame.copy()
    if column in NUMERIC_FEATURES:
        frame[column] = np.nan
    else:
        frame[column] = pd.array([pd.NA] * len(frame), dtype="string")
    return frame


@pytest.mark.parametrize("column", EMPTY_COLUMNS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_model_trained_without_a_feature_column_exports_with_parity(
    algorithm: str, column: str
) -> None:
    train = without(generated_frame(300), column)
    pipeline = build_pipeline(algorithm).fit(to_model_frame(train), target_values(train))

    # the column keeps its place: the classifier's inputs do not depend on what is missing
    names = list(pipeline.named_steps[PREPROCESS_STEP].get_feature_names_out())
    assert names[: len(NUMERIC_FEATURES)] == list(NUMERIC_FEATURES)
    if algorithm != "logistic_regression":  # one-hot width follows the categories seen
        assert names == [*NUMERIC_FEATURES, *CATEGORICAL_FEATURES]
    if column in CATEGORICAL_FEATURES:
        assert learned_categories(pipeline)[column] == [MISSING_MARKER]

    model = export_onnx(pipeline)
    assert [spec["column"] for spec in model.inputs] == list(FEATURES)
    # the training rows (column missing) and new rows on which the column has values
    for frame in (train, generated_frame(200, seed=1)):
        report = check_parity(pipeline, model.onnx_bytes, frame)
        assert report.argmax_mismatches == 0 and report.label_mismatches == 0
        assert report.max_abs_diff <= PARITY_TOLERANCE


def test_export_refuses_an_imputer_that_dropped_an_empty_column() -> None:
    """scikit-learn's default SimpleImputer drops a column with no value (7 numeric columns
    reach the classifier); the graph imputes in place (8): refuse instead of mis-exporting."""
    train = without(generated_frame(300), "num_lab_procedures")
    pipeline = build_pipeline("decision_tree").set_params(
        **{f"{PREPROCESS_STEP}__numeric__keep_empty_features": False}
    )
    with pytest.warns(UserWarning, match="without any observed values"):
        pipeline.fit(to_model_frame(train), target_values(train))
    with pytest.raises(ValueError, match="keep_empty_features=True"):
        export_onnx(pipeline)


@pytest.mark.parametrize("algorithm", ["logistic_regression", "gradient_boosting"])
def test_a_model_trained_on_the_real_files_first_2000_rows_exports_with_parity(
    algorithm: str,
) -> None:
    """The real file's first 2,000 encounters have no payer_code (its first one is on the
    20,447th); parity on 1,000 later rows, where most have one, and on the training rows."""
    lines = real_csv_bytes().split(b"\r\n")
    train = contract.parse_csv(b"\r\n".join(lines[:2001]) + b"\r\n")
    later = contract.parse_csv(b"\r\n".join([lines[0], *lines[30_001:31_001]]) + b"\r\n")
    assert train["payer_code"].isna().all() and later["payer_code"].notna().mean() > 0.5
    pipeline = build_pipeline(algorithm).fit(to_model_frame(train), target_values(train))
    model = export_onnx(pipeline, later)  # raises ParityError on a mismatch
    report = check_parity(pipeline, model.onnx_bytes, train)
    assert report.argmax_mismatches == 0 and report.max_abs_diff <= PARITY_TOLERANCE
