"""One servable model: its ONNX bytes, metadata, onnxruntime session and predictions.

Contract: `LoadedModel(bytes, metadata)` checks the bytes against `model_sha256`, parses the
metadata (classes, inputs, outputs) and, unless `session=False`, builds and checks the
onnxruntime session; any failure is ModelLoadError. A LoadedModel is immutable once built:
`predict`, `predict_lists` and `predict_one` validate the rows (InputError naming the field)
and give labels and probabilities rounded to 6 digits in `classes` order. With
`session=False` (the gunicorn master, before forking) only the bytes and metadata are checked
and onnxruntime is not imported: `with_session()` makes the servable copy.

Only numpy and onnxruntime are imported by the serving core: never scikit-learn, pandas or
mlflow (the predict image has none of them; a test checks `sys.modules`).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from readmission.serving.batching import MicroBatcher
from readmission.serving.errors import ModelLoadError
from readmission.serving.feeds import Feeds
from readmission.serving.inputs import InputSpec, input_layout, parse_inputs
from readmission.serving.session import check_session, new_session, session_runner

if TYPE_CHECKING:
    import onnxruntime as ort


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict[str, float]
    warnings: list[str] = field(default_factory=list)


_FEW_ROWS = 8  # up to this many rows, rounding in Python is faster than numpy's call


def rounded_probabilities(probabilities: np.ndarray) -> list[list[float]]:
    """Rows of probabilities rounded to 6 digits, exactly as `np.round(p.astype(float64), 6)`
    rounds them: p·10⁶ to the nearest integer (ties to even), ÷10⁶, in float64. A few rows
    are rounded in Python (cheaper than numpy's per-call overhead), more with numpy."""
    if len(probabilities) <= _FEW_ROWS:
        try:
            return [[round(p * 1e6) / 1e6 for p in row] for row in probabilities.tolist()]
        except (ValueError, OverflowError):  # NaN or infinity: numpy keeps them as they are
            pass
    return np.round(probabilities.astype(np.float64), 6).tolist()


class LoadedModel:
    """One ONNX model and its metadata: validation, feeds and inference. Immutable.

    With `session=False` only the bytes and the metadata are checked and no onnxruntime
    session is built (no onnxruntime import either): `with_session()` makes the servable copy.
    """

    def __init__(
        self,
        model_bytes: bytes,
        metadata: Mapping[str, Any],
        *,
        token: str = "",
        policy: str = "reject",
        intra_op_threads: int = 1,
        micro_batching: bool = True,
        session: bool = True,
    ) -> None:
        expected = metadata.get("model_sha256")
        if expected and hashlib.sha256(model_bytes).hexdigest() != expected:
            raise ModelLoadError("model_sha256 in the metadata does not match the ONNX bytes")
        self.metadata = dict(metadata)
        self.token = token
        self.policy = policy
        self.version = str(metadata.get("version", ""))
        self.name = str(metadata.get("model_name", "model"))
        classes = metadata.get("classes")
        if not isinstance(classes, list) or not classes:
            raise ModelLoadError("metadata has no 'classes' list")
        self.classes = [str(c) for c in classes]
        self.inputs = parse_inputs(metadata)
        self.layout = input_layout(self.inputs)
        outputs = metadata.get("outputs") or {}
        self.label_output = str(outputs.get("label", "label"))
        self.probabilities_output = str(outputs.get("probabilities", "probabilities"))
        self.model_bytes = model_bytes
        self.intra_op_threads = intra_op_threads
        self.session: ort.InferenceSession | None = None
        self._run: Any = None
        if session:
            self.session = new_session(model_bytes, intra_op_threads)
            check_session(
                self.session,
                self.inputs,
                self.layout,
                (self.label_output, self.probabilities_output),
            )
            self._run = session_runner(self.session)
        self._feeds = Feeds(self.inputs, self.layout, policy)
        # the data file's columns that are not inputs (ids, target): accepted and ignored
        self.ignored_columns = self._feeds.keys.ignored_columns
        self._batcher = MicroBatcher() if micro_batching else None
        self.loaded_at = time.time()

    def with_session(self) -> LoadedModel:
        """The same model with its own onnxruntime session (ModelLoadError if onnxruntime
        refuses the model)."""
        return LoadedModel(
            self.model_bytes,
            self.metadata,
            token=self.token,
            policy=self.policy,
            intra_op_threads=self.intra_op_threads,
            micro_batching=self._batcher is not None,
        )

    # ---- validation and feeds (readmission.serving.feeds) ---------------------------------
    def feeds(
        self, rows: Sequence[Any], warnings: list[list[str]] | None = None
    ) -> dict[str, np.ndarray]:
        """ONNX feeds for rows (mappings column -> value), or InputError naming the field."""
        return self._feeds.feeds(rows, warnings)

    def feeds_columns(self, arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """ONNX feeds from (k, 1) columns in input order already checked by the rules of
        readmission.serving.inputs (the batch scorer checks each distinct value once)."""
        return self._feeds.feeds_columns(arrays)

    def columns_one(self, row: Any, warnings: list[list[str]] | None) -> list[np.ndarray]:
        """One row validated by the rules (as `predict_one` validates it) as (1, 1) columns in
        input order: float32 for numeric inputs, object for categorical ones."""
        numbers, texts = self._feeds.values_one(row, warnings if self.policy == "unseen" else None)
        columns: list[np.ndarray] = [np.empty((1, 1))] * len(self.inputs)
        for value, index in zip(numbers, self.layout.numeric_order, strict=True):
            columns[index] = np.array([[value]], dtype=np.float32)
        for text, index in zip(texts, self.layout.categorical_order, strict=True):
            columns[index] = np.array([[text]], dtype=object)
        return columns

    def _feeds_one(self, row: Any, warnings: list[list[str]] | None) -> dict[str, np.ndarray]:
        """The single-row path (latency matters): two numpy arrays, one (1, 1) view per input."""
        numbers, texts = self._feeds.values_one(row, warnings)
        return self._feeds.feeds_rows([numbers], [texts])

    # ---- predictions ----------------------------------------------------------------------
    def predict_lists(
        self, rows: Sequence[Any]
    ) -> tuple[list[str], list[list[float]], list[list[str]]]:
        """(labels, probabilities rounded to 6 digits in `classes` order, warnings per row):
        the batch path without a Prediction object per row."""
        warnings: list[list[str]] = [[] for _ in rows]
        feeds = self.feeds(rows, warnings if self.policy == "unseen" else None)
        labels, probabilities = self._run([self.label_output, self.probabilities_output], feeds)
        rounded = rounded_probabilities(probabilities)
        return [str(label) for label in labels.tolist()], rounded, warnings

    def run_feeds(self, feeds: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(labels, float32 probabilities in `classes` order) of feeds already validated by
        this model's rules (`self.feeds`, or `Feeds.feeds_columns` over checked columns)."""
        return self._run([self.label_output, self.probabilities_output], dict(feeds))

    def predict(self, rows: Sequence[Any]) -> list[Prediction]:
        labels, rounded, warnings = self.predict_lists(rows)
        classes = self.classes
        return [
            Prediction(label, dict(zip(classes, probs, strict=True)), warn)
            for label, probs, warn in zip(labels, rounded, warnings, strict=True)
        ]

    def predict_one(self, row: Any) -> tuple[str, list[float], list[str]]:
        """One row: (label, probabilities rounded to 6 digits in `classes` order, warnings).

        Same validation and answer as `predict([row])`, but concurrent single-row calls share
        one session run (see `MicroBatcher`), unless the model was made without micro-batching
        (a server answering one request at a time).
        """
        warnings: list[list[str]] = [[]]
        numbers, texts = self._feeds.values_one(row, warnings if self.policy == "unseen" else None)
        if self._batcher is None:
            labels, rows = self._run_rows([numbers], [texts])
            return str(labels[0]), rows[0], warnings[0]
        label, probabilities = self._batcher.run(self._run_rows, numbers, texts)
        return label, probabilities, warnings[0]

    def _run_rows(
        self, numbers: list[list[float]], texts: list[list[str]]
    ) -> tuple[list[Any], list[list[float]]]:
        labels, probabilities = self._run(
            [self.label_output, self.probabilities_output], self._feeds.feeds_rows(numbers, texts)
        )
        return labels.tolist(), rounded_probabilities(probabilities)

    def _input_schema(self, spec: InputSpec) -> dict[str, Any]:
        """An input's schema with, for a numeric input, the "min" and "max" of the metadata's
        `input_ranges` (written by the aggregator; older metadata has none, and a malformed
        entry is left out: the ranges are hints for the web form, never a validation rule)."""
        entry = spec.schema()
        ranges = self.metadata.get("input_ranges")
        found = ranges.get(spec.column) if spec.numeric and isinstance(ranges, dict) else None
        if isinstance(found, dict):
            low, high = found.get("min"), found.get("max")
            if (
                type(low) in (int, float)
                and type(high) in (int, float)
                and math.isfinite(low)
                and math.isfinite(high)
                and low <= high
            ):
                entry["min"], entry["max"] = low, high
        return entry

    def info(self) -> dict[str, Any]:
        meta = self.metadata
        return {
            "name": self.name,
            "version": self.version,
            "algorithm": meta.get("algorithm"),
            "run_id": meta.get("run_id"),
            "dataset_id": meta.get("dataset_id"),
            "training_rows": meta.get("training_rows"),
            "cumulative_index": meta.get("cumulative_index"),
            "registered_at": meta.get("registered_at"),
            "selection_metric": meta.get("selection_metric"),
            "metrics": meta.get("metrics", {}),
            # calibration, `<30` recall, flagged groups; the noise-aware selection; the card
            "quality": meta.get("quality"),
            "selection": meta.get("selection"),
            "model_card": meta.get("model_card"),
            "classes": self.classes,
            "inputs": [self._input_schema(spec) for spec in self.inputs],
            "outputs": {"label": self.label_output, "probabilities": self.probabilities_output},
            "model_sha256": meta.get("model_sha256"),
            "unknown_category_policy": self.policy,
        }
