"""Run an exported ONNX model and prove it reproduces its pipeline (the parity check).

Reads nothing from storage: `check_parity(pipeline, onnx_bytes, frame)` scores `frame` with
onnxruntime and with the pipeline's predict_proba and compares them row by row. Contract: on
every row the same argmax class and the same label, and max |p_onnx - p_sklearn| <= the
tolerance (PARITY_TOLERANCE unless the caller says otherwise); anything else raises
ParityError naming how far off the export is, so a caller that publishes models publishes
none that fails it.

The tensor names of the ONNX model contract (docs/design.md) live here, because running a
model is where they are read: the inputs `numeric` and `categorical` (`frame_feeds` builds
them from a contract or model frame) and the outputs `label` and `probabilities`.
readmission.onnx_export builds graphs with these names. onnxruntime is imported only when a
model is run (it starts a thread on import; see readmission.aggregate.warm_up_onnxruntime).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.pipeline import Pipeline

from readmission.contract import CATEGORICAL_FEATURES, NUMERIC_FEATURES
from readmission.features import MODEL_STEP, to_model_frame

NUMERIC_INPUT = "numeric"
CATEGORICAL_INPUT = "categorical"
LABEL_OUTPUT = "label"
PROBABILITIES_OUTPUT = "probabilities"
PARITY_TOLERANCE = 1e-4


class ParityError(AssertionError):
    """The ONNX graph does not reproduce the pipeline's predictions."""


@dataclass(frozen=True)
class ParityReport:
    rows: int
    max_abs_diff: float
    argmax_mismatches: int
    label_mismatches: int


def frame_feeds(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """onnxruntime feeds for a (contract or model) frame, following the documented feed rules."""
    model_frame = to_model_frame(frame)
    return {
        NUMERIC_INPUT: model_frame[list(NUMERIC_FEATURES)].to_numpy(dtype=np.float32),
        CATEGORICAL_INPUT: model_frame[list(CATEGORICAL_FEATURES)].to_numpy(dtype=object),
    }


def run_onnx(onnx_bytes: bytes, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) from onnxruntime for every row of the frame."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        onnx_bytes, sess_options=options, providers=["CPUExecutionProvider"]
    )
    labels, probabilities = session.run([LABEL_OUTPUT, PROBABILITIES_OUTPUT], frame_feeds(frame))
    return np.asarray(labels), np.asarray(probabilities)


def check_parity(
    pipeline: Pipeline,
    onnx_bytes: bytes,
    frame: pd.DataFrame,
    tolerance: float = PARITY_TOLERANCE,
    expected: np.ndarray | None = None,
) -> ParityReport:
    """Compare onnxruntime with pipeline.predict_proba on every row of the frame.

    Requires the same argmax class on every row and max |p_onnx - p_sklearn| <= tolerance;
    raises ParityError saying how far off it is otherwise. `expected`: the pipeline's
    probabilities on this frame when the caller has them already (computed here otherwise).
    """
    model_frame = to_model_frame(frame)
    if expected is None:
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
