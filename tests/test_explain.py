"""Explanations (readmission.serving.explain): occlusion on the ONNX model against the same
occlusion computed by scikit-learn on the original Pipeline, for a few real rows.

The reference replaces one input at a time by its baseline in the model frame and calls the
Pipeline's predict_proba; the ONNX graph computes in float32, so the two agree to the
export's parity tolerance, not exactly.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import numpy as np
import pytest
from support.predict_support import patient_rows, sample_frame

from readmission.features import build_pipeline, target_values, to_model_frame
from readmission.model_artifacts import explain_baseline
from readmission.onnx_export import export_onnx
from readmission.serving.errors import InputError
from readmission.serving.explain import Explainer, explain_requested
from readmission.serving.model import LoadedModel

TOLERANCE = 2e-4  # float32 ONNX against float64 scikit-learn, as the export's parity check


@functools.cache
def fitted(algorithm: str, with_baseline: bool) -> tuple[Any, LoadedModel]:
    frame = sample_frame(20)
    model_frame = to_model_frame(frame)
    pipeline = build_pipeline(algorithm)
    pipeline.fit(model_frame, target_values(frame))
    exported = export_onnx(pipeline, frame.head(200))
    metadata: dict[str, Any] = {
        "version": "1",
        "classes": list(exported.classes),
        "inputs": exported.inputs,
        "outputs": dict(exported.outputs),
        "model_sha256": hashlib.sha256(exported.onnx_bytes).hexdigest(),
    }
    if with_baseline:
        metadata["explain_baseline"] = explain_baseline(model_frame)
    return pipeline, LoadedModel(exported.onnx_bytes, metadata, micro_batching=False)


def reference_contributions(pipeline: Any, row: Any, baseline: dict[str, Any]) -> np.ndarray:
    """(n inputs, classes): p(row) - p(row with input j set to its baseline), by sklearn."""
    frame = to_model_frame(row)
    copies = frame.loc[frame.index.repeat(len(frame.columns) + 1)].reset_index(drop=True)
    for j, column in enumerate(frame.columns):
        value = baseline[column]
        copies.loc[j + 1, column] = np.nan if value is None and column in baseline else value
    probabilities = pipeline.predict_proba(copies)
    return probabilities[:1] - probabilities[1:]


@pytest.mark.parametrize("algorithm", ["logistic_regression", "random_forest"])
@pytest.mark.parametrize("with_baseline", [True, False])
def test_occlusion_on_onnx_matches_scikit_learn_on_the_pipeline(
    algorithm: str, with_baseline: bool
) -> None:
    pipeline, model = fitted(algorithm, with_baseline)
    explainer = Explainer(model)
    baseline = {
        column: ("?" if value is None and not spec.numeric else value)
        for column, value, spec in zip(
            explainer.columns, explainer.baseline, model.inputs, strict=True
        )
    }
    frame = sample_frame(20)
    for offset in (0, 7, 31):
        row = frame.iloc[offset : offset + 1]
        arrays = model.columns_one(patient_rows(1, offset=offset)[0], None)
        probabilities, contributions = explainer.contributions(arrays)
        expected = reference_contributions(pipeline, row, baseline)
        np.testing.assert_allclose(contributions[0], expected, atol=TOLERANCE)
        np.testing.assert_allclose(
            probabilities[0], pipeline.predict_proba(to_model_frame(row))[0], atol=TOLERANCE
        )
        assert np.abs(expected).max() > 1e-3, "an occlusion that changes nothing tests nothing"


def test_top_factors_rank_by_the_predicted_class_and_report_the_30_day_class() -> None:
    _, model = fitted("logistic_regression", True)
    answer = Explainer(model).explain_one(patient_rows(1, offset=3)[0], k=4)
    assert answer["method"] == "occlusion" and answer["baseline"] == "training reference"
    factors = answer["top_factors"]
    assert len(factors) == 4
    label = model.predict([patient_rows(1, offset=3)[0]])[0].label
    sizes = [abs(f["contribution"][label]) for f in factors]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 0
    assert all(set(f["contribution"]) == {"<30", label} for f in factors)


def test_an_explanation_refuses_what_predict_refuses() -> None:
    _, model = fitted("logistic_regression", True)
    row = {**patient_rows(1)[0], "time_in_hospital": "three"}
    with pytest.raises(InputError) as predicted:
        model.predict([row])
    with pytest.raises(InputError) as explained:
        Explainer(model).explain_one(row)
    assert str(explained.value) == str(predicted.value)


@pytest.mark.parametrize(
    "value, wanted", [(None, False), ("false", False), ("0", False), ("true", True), ("1", True)]
)
def test_the_explain_parameter(value: str | None, wanted: bool) -> None:
    assert explain_requested(value) is wanted


def test_an_unclear_explain_parameter_is_a_400() -> None:
    with pytest.raises(InputError) as error:
        explain_requested("maybe")
    assert error.value.status == 400


def test_the_baseline_is_the_median_and_the_most_frequent_category() -> None:
    import pandas as pd

    frame = pd.DataFrame(
        {
            "time_in_hospital": np.array([1, 2, np.nan, 9], dtype=np.float32),
            "race": ["Caucasian", "?", "AfricanAmerican", "AfricanAmerican"],
            "weight": np.array([np.nan] * 4, dtype=np.float32),
        }
    )
    assert explain_baseline(frame) == {
        "time_in_hospital": 2.0,
        "race": "AfricanAmerican",
        "weight": None,
    }
