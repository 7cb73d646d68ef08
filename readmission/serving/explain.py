"""Per-row feature contributions of the served model, from its ONNX graph alone (occlusion).

Contract: the contribution of input j to class c for a row x is
`p_c(x) - p_c(x with input j set to its baseline)`, where the baseline of every input is the
training reference in the model's metadata (`explain_baseline`: the median of a numeric input,
the most frequent category of a categorical one, written by the aggregator) or, for a model
exported without one, the missing value (NaN, `"?"`: what the model answers when it does not
know the input). Works for every algorithm, since it only runs the model: each row becomes a
block of n+1 rows (itself, then each input replaced in turn) and a whole block (several
blocks in batch scoring) goes through one onnxruntime call. Rows are validated by the rules
of readmission.serving.inputs before (the caller's feeds or `LoadedModel.columns_one`).

`top_factors` lists the k inputs with the largest contribution (by absolute value) to the
predicted class, each with its contribution to `<30` and to the predicted class, rounded to 6
digits. numpy only.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from readmission.contract import MISSING_MARKER
from readmission.serving.errors import InputError
from readmission.serving.model import LoadedModel

METHOD = "occlusion"
FOCUS_CLASS = "<30"  # the class every answer reports a contribution to, beside the predicted one
ROWS_PER_CALL = 64  # rows (blocks of n+1) per onnxruntime call in batch scoring (peak RSS)
DEFAULT_TOP_K = 5


def explain_requested(value: str | None) -> bool:
    """The `explain` query parameter: true/1 or false/0 (absent: false); else a 400."""
    if value is None or value.strip().lower() in ("", "false", "0"):
        return False
    if value.strip().lower() in ("true", "1"):
        return True
    raise InputError(
        f"explain must be true or false, got {value[:40]!r}",
        "explain",
        kind="invalid_parameter",
        status=400,
    )


class Explainer:
    """Occlusion contributions of one LoadedModel (immutable, like the model)."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        reference = model.metadata.get("explain_baseline")
        reference = reference if isinstance(reference, dict) else {}
        self.baseline_source = "training reference" if reference else "missing values"
        self.baseline: list[Any] = []
        self.baseline_arrays: list[np.ndarray] = []
        for spec in model.inputs:
            value = reference.get(spec.column)
            if spec.numeric:
                number = float(value) if type(value) in (int, float) else math.nan
                self.baseline.append(None if math.isnan(number) else number)
                self.baseline_arrays.append(np.array([[number]], dtype=np.float32))
            else:
                known = isinstance(value, str) and (spec.accepted is None or value in spec.accepted)
                text = value if known else MISSING_MARKER
                self.baseline.append(None if text == MISSING_MARKER else text)
                self.baseline_arrays.append(np.array([[text]], dtype=object))
        self.columns = [spec.column for spec in model.inputs]
        self.focus = model.classes.index(FOCUS_CLASS) if FOCUS_CLASS in model.classes else 0

    def contributions(self, arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (k, C), contributions (k, n, C)) of k validated rows given as (k, 1)
        columns in input order; float64, unrounded."""
        n, block = len(arrays), len(arrays) + 1
        classes = len(self.model.classes)
        probabilities, contributions = [], []
        for start in range(0, len(arrays[0]), ROWS_PER_CALL):
            part = [column[start : start + ROWS_PER_CALL] for column in arrays]
            rows = len(part[0])
            perturbed = []
            for j, column in enumerate(part):
                repeated = np.repeat(column, block, axis=0)
                repeated[1 + j :: block] = self.baseline_arrays[j]  # copy j+1 lacks input j
                perturbed.append(repeated)
            _, p = self.model.run_feeds(self.model.feeds_columns(perturbed))
            p = np.asarray(p, dtype=np.float64).reshape(rows, block, classes)
            probabilities.append(p[:, 0, :])
            contributions.append(p[:, :1, :] - p[:, 1:, :])
        assert all(c.shape[1] == n for c in contributions)
        return np.concatenate(probabilities), np.concatenate(contributions)

    def top_factors(
        self, row: Sequence[Any], probabilities: np.ndarray, contributions: np.ndarray, k: int
    ) -> list[dict[str, Any]]:
        """The k inputs contributing most to the predicted class of one row (`row`: its
        values in input order, as the model saw them)."""
        predicted = int(np.argmax(probabilities))
        predicted_class = self.model.classes[predicted]
        order = np.argsort(-np.abs(contributions[:, predicted]), kind="stable")[:k]
        factors = []
        for j in order.tolist():
            factors.append(
                {
                    "feature": self.columns[j],
                    "value": _shown(row[j]),
                    "baseline": self.baseline[j],
                    "contribution": {
                        FOCUS_CLASS: round(float(contributions[j, self.focus]), 6),
                        predicted_class: round(float(contributions[j, predicted]), 6),
                    },
                }
            )
        return factors

    def top_features_json(self, arrays: Sequence[np.ndarray], k: int) -> list[str]:
        """Batch scoring: each row's `top_factors` as compact JSON text."""
        probabilities, contributions = self.contributions(arrays)
        texts = []
        for i in range(len(probabilities)):
            row = [column[i, 0] for column in arrays]
            factors = self.top_factors(row, probabilities[i], contributions[i], k)
            texts.append(json.dumps(factors, separators=(",", ":"), ensure_ascii=False))
        return texts

    def explain_one(self, features: Any, k: int = DEFAULT_TOP_K) -> dict[str, Any]:
        """`/predict?explain=true`: the explanation of one client row (InputError as predict)."""
        warnings: list[list[str]] = [[]]
        arrays = self.model.columns_one(features, warnings)
        probabilities, contributions = self.contributions(arrays)
        row = [column[0, 0] for column in arrays]
        return {
            "method": METHOD,
            "baseline": self.baseline_source,
            "top_factors": self.top_factors(row, probabilities[0], contributions[0], k),
        }


@functools.lru_cache(maxsize=2)  # the model being served, and the one it replaces
def explainer_for(model: LoadedModel) -> Explainer:
    """The Explainer of a served model, built once per model (models are immutable)."""
    return Explainer(model)


def with_explanation(
    answer: dict[str, Any], model: LoadedModel, features: Any, k: int = DEFAULT_TOP_K
) -> dict[str, Any]:
    """`POST /predict?explain=true`: the plain answer with an `explanation` added last."""
    return {**answer, "explanation": explainer_for(model).explain_one(features, k)}


def explanation_output(model: LoadedModel, rows: Sequence[Any], name: str) -> dict[str, Any]:
    """The V2 `explanation` output: each row's top factors as JSON text, BYTES [N]."""
    per_row = [model.columns_one(row, None) for row in rows]  # rows predict has accepted
    arrays = [np.concatenate(column) for column in zip(*per_row, strict=True)]
    data = explainer_for(model).top_features_json(arrays, DEFAULT_TOP_K) if rows else []
    return {"name": name, "datatype": "BYTES", "shape": [len(data)], "data": data}


def _shown(value: Any) -> Any:
    """A value as the answer shows it: numbers as float, missing as null."""
    if isinstance(value, str):
        return None if value == MISSING_MARKER else value
    number = float(value)
    return None if math.isnan(number) else round(number, 6)
