"""Export a fitted pipeline (features.build_pipeline) to ONNX and prove the export is faithful.

The ONNX model contract (docs/design.md): one input per feature column, shape [None, 1]
(float32 for numeric columns with NaN for missing, string for categorical columns with "?" for
missing); outputs `label` (string [N]) and `probabilities` (float32 [N, n_classes], columns in
the order of `classes`, no ZipMap).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import pandas as pd
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType, StringTensorType
from sklearn.pipeline import Pipeline

from readmission.contract import FEATURES, NUMERIC_FEATURES
from readmission.features import MODEL_STEP, learned_categories, to_model_frame

LABEL_OUTPUT = "label"
PROBABILITIES_OUTPUT = "probabilities"
# Default opsets of skl2onnx 1.20 that onnxruntime >= 1.18 runs; fixed so exports are stable.
TARGET_OPSET: dict[str, int] = {"": 17, "ai.onnx.ml": 3}
PARITY_TOLERANCE = 1e-4
GRAPH_NAME = "readmission"


def _patch_skl2onnx_hist_gradient_boosting() -> None:
    """skl2onnx 1.20 passes a Python bool (False, for leaves) as the ONNX int attribute
    nodes_missing_value_tracks_true when converting HistGradientBoosting trees, which onnx
    refuses ("Expected an int, got a boolean"). Coerce the flag to int; idempotent."""
    from skl2onnx.common import tree_ensemble

    original = tree_ensemble.add_node
    if getattr(original, "_readmission_patched", False):
        return

    def add_node(*args: Any, **kwargs: Any) -> Any:
        if "nodes_missing_value_tracks_true" in kwargs:
            kwargs["nodes_missing_value_tracks_true"] = int(
                kwargs["nodes_missing_value_tracks_true"]
            )
        return original(*args, **kwargs)

    add_node._readmission_patched = True  # type: ignore[attr-defined]
    tree_ensemble.add_node = add_node


_patch_skl2onnx_hist_gradient_boosting()


class ParityError(AssertionError):
    """The ONNX graph does not reproduce the pipeline's predictions."""


@dataclass(frozen=True)
class ExportedModel:
    onnx_bytes: bytes
    # [{"column", "onnx_name", "kind": "numeric"|"categorical", "categories": [...]}]
    inputs: list[dict[str, Any]]
    classes: list[str]
    outputs: dict[str, str] = field(
        default_factory=lambda: {"label": LABEL_OUTPUT, "probabilities": PROBABILITIES_OUTPUT}
    )


@dataclass(frozen=True)
class ParityReport:
    rows: int
    max_abs_diff: float
    argmax_mismatches: int
    label_mismatches: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "rows": self.rows,
            "max_abs_diff": self.max_abs_diff,
            "argmax_mismatches": self.argmax_mismatches,
            "label_mismatches": self.label_mismatches,
        }


def _initial_types() -> list[tuple[str, Any]]:
    return [
        (
            column,
            FloatTensorType([None, 1])
            if column in NUMERIC_FEATURES
            else StringTensorType([None, 1]),
        )
        for column in FEATURES
    ]


def _input_names(model: onnx.ModelProto) -> dict[str, str]:
    """column -> ONNX input name. skl2onnx keeps the initial_types order (it may rename)."""
    names = [graph_input.name for graph_input in model.graph.input]
    if len(names) != len(FEATURES):
        raise ValueError(f"the ONNX graph has {len(names)} inputs, expected {len(FEATURES)}")
    return dict(zip(FEATURES, names, strict=True))


def export_onnx(pipeline: Pipeline, sample_frame: pd.DataFrame | None = None) -> ExportedModel:
    """Convert a fitted pipeline to ONNX bytes plus the metadata the predict function needs.

    If `sample_frame` is given, the export is checked with `check_parity` on it (ParityError if
    it does not match).
    """
    classifier = pipeline.named_steps[MODEL_STEP]
    classes = [str(c) for c in classifier.classes_]
    model = convert_sklearn(
        pipeline,
        initial_types=_initial_types(),
        name=GRAPH_NAME,  # skl2onnx's default is a random uuid: exports would differ
        options={id(classifier): {"zipmap": False}},
        target_opset=TARGET_OPSET,
        final_types=[
            (LABEL_OUTPUT, StringTensorType([None])),
            (PROBABILITIES_OUTPUT, FloatTensorType([None, len(classes)])),
        ],
    )
    output_names = [graph_output.name for graph_output in model.graph.output]
    if output_names != [LABEL_OUTPUT, PROBABILITIES_OUTPUT]:
        raise ValueError(f"unexpected ONNX outputs {output_names}")
    onnx_names = _input_names(model)
    categories = learned_categories(pipeline)
    inputs: list[dict[str, Any]] = []
    for column in FEATURES:
        if column in NUMERIC_FEATURES:
            inputs.append({"column": column, "onnx_name": onnx_names[column], "kind": "numeric"})
        else:
            inputs.append(
                {
                    "column": column,
                    "onnx_name": onnx_names[column],
                    "kind": "categorical",
                    "categories": categories[column],
                }
            )
    exported = ExportedModel(model.SerializeToString(), inputs, classes)
    if sample_frame is not None:
        check_parity(pipeline, exported.onnx_bytes, sample_frame)
    return exported


def frame_feeds(frame: pd.DataFrame, inputs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """onnxruntime feeds for a (contract or model) frame, following the documented feed rules."""
    model_frame = to_model_frame(frame)
    feeds: dict[str, np.ndarray] = {}
    for spec in inputs:
        values = model_frame[spec["column"]]
        if spec["kind"] == "numeric":
            feeds[spec["onnx_name"]] = values.to_numpy(dtype=np.float32).reshape(-1, 1)
        else:
            feeds[spec["onnx_name"]] = values.to_numpy(dtype=object).reshape(-1, 1)
    return feeds


def onnx_input_specs(onnx_bytes: bytes) -> list[dict[str, Any]]:
    """The inputs of an exported graph as column/onnx_name/kind (no categories)."""
    model = onnx.load_from_string(onnx_bytes)
    specs = []
    for column, name in _input_names(model).items():
        kind = "numeric" if column in NUMERIC_FEATURES else "categorical"
        specs.append({"column": column, "onnx_name": name, "kind": kind})
    return specs


def run_onnx(onnx_bytes: bytes, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) from onnxruntime for every row of the frame."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        onnx_bytes, sess_options=options, providers=["CPUExecutionProvider"]
    )
    labels, probabilities = session.run(
        [LABEL_OUTPUT, PROBABILITIES_OUTPUT], frame_feeds(frame, onnx_input_specs(onnx_bytes))
    )
    return np.asarray(labels), np.asarray(probabilities)


def check_parity(
    pipeline: Pipeline,
    onnx_bytes: bytes,
    frame: pd.DataFrame,
    tolerance: float = PARITY_TOLERANCE,
) -> ParityReport:
    """Compare onnxruntime with pipeline.predict_proba on every row of the frame.

    Requires the same argmax class on every row and max |p_onnx - p_sklearn| <= tolerance;
    raises ParityError saying how far off it is otherwise.
    """
    model_frame = to_model_frame(frame)
    expected = pipeline.predict_proba(model_frame)
    classes = np.asarray([str(c) for c in pipeline.named_steps[MODEL_STEP].classes_], dtype=object)
    labels, probabilities = run_onnx(onnx_bytes, model_frame)
    if probabilities.shape != expected.shape:
        raise ParityError(
            f"ONNX probabilities have shape {probabilities.shape}, sklearn {expected.shape}"
        )
    diff = float(np.max(np.abs(probabilities.astype(np.float64) - expected))) if len(frame) else 0.0
    argmax_mismatches = int(np.sum(probabilities.argmax(axis=1) != expected.argmax(axis=1)))
    label_mismatches = int(np.sum(labels.astype(str) != classes[expected.argmax(axis=1)]))
    report = ParityReport(len(model_frame), diff, argmax_mismatches, label_mismatches)
    if argmax_mismatches or label_mismatches or not diff <= tolerance:
        raise ParityError(
            f"ONNX export differs from the pipeline on {report.rows} rows: "
            f"max |dp| = {diff:.3g} (tolerance {tolerance:g}), {argmax_mismatches} rows with a "
            f"different argmax, {label_mismatches} rows with a different label"
        )
    return report
