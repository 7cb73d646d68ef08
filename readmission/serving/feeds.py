"""Rows of client values -> validated ONNX feeds, in the layout of the model's graph.

Contract: `Feeds.feeds(rows)` (many rows, column-wise) and `Feeds.values_one(row)` +
`Feeds.feeds_rows(...)` (one row, the latency path) accept and refuse exactly the same input
with the same InputError, because both apply the rules of `readmission.serving.inputs`; the
column-wise path only adds vectorised shortcuts for values those rules pass through unchanged.
Unknown categories add a warning per row to `warnings` when it is given (policy unseen), else
raise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from readmission.contract import MISSING_MARKER
from readmission.serving.errors import InputError
from readmission.serving.inputs import (
    FLOAT32_MAX,
    InputLayout,
    InputSpec,
    RowKeys,
    category_value,
    check_categories,
    number_value,
)

_NUMERIC_FAST_TYPES = frozenset({int, float, type(None)})  # numpy converts these itself


class Feeds:
    """Builds the feeds of one model (its inputs, layout and unknown-category policy)."""

    def __init__(self, inputs: Sequence[InputSpec], layout: InputLayout, policy: str) -> None:
        self.inputs = tuple(inputs)
        self.layout = layout
        self.policy = policy
        self.keys = RowKeys(self.inputs)
        self._numeric_specs = [(self.inputs[i], i) for i in layout.numeric_order]
        self._categorical_specs = [(self.inputs[i], i) for i in layout.categorical_order]
        self._numeric_names = [s.onnx_name for s, _ in self._numeric_specs]
        self._categorical_names = [s.onnx_name for s, _ in self._categorical_specs]

    # ---- many rows, column by column ------------------------------------------------------
    def feeds(
        self, rows: Sequence[Any], warnings: list[list[str]] | None = None
    ) -> dict[str, np.ndarray]:
        """ONNX feeds for rows (mappings column -> value), or InputError naming the field."""
        if not rows:
            raise InputError("no instances to predict", None, kind="empty_batch")
        if len(rows) == 1:
            numbers, texts = self.values_one(rows[0], warnings)
            return self.feeds_rows([numbers], [texts])
        columns = zip(*self.keys.table(rows), strict=True)
        arrays: list[np.ndarray] = []
        for spec, values in zip(self.inputs, columns, strict=True):
            if spec.numeric:
                arrays.append(self._numeric(spec, values))
            else:
                arrays.append(self._categorical(spec, values, warnings))
        return self.feeds_columns(arrays)

    def feeds_columns(self, arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Feeds from validated (k, 1) columns in input order (float32 numeric, object text):
        packed into the layout's two tensors, or one tensor per input."""
        layout = self.layout
        if not layout.packed:
            return {spec.onnx_name: array for spec, array in zip(self.inputs, arrays, strict=True)}
        feeds: dict[str, np.ndarray] = {}
        for name, order in (
            (layout.numeric_tensor, layout.numeric_order),
            (layout.categorical_tensor, layout.categorical_order),
        ):
            if order:
                feeds[name] = np.hstack([arrays[i] for i in order])
        return feeds

    @staticmethod
    def _numeric(spec: InputSpec, values: Sequence[Any]) -> np.ndarray:
        """`number_value` over a column: numpy converts plain numbers and nulls at once, and
        any value it cannot take, or that is NaN, infinite or beyond float32, goes to the rule
        (which raises for it)."""
        array = None
        if set(map(type, values)) <= _NUMERIC_FAST_TYPES:
            try:
                array = np.array(values, dtype=np.float64)  # None -> NaN (missing)
            except OverflowError:  # an integer beyond float64: the rule names it
                array = None
        if array is not None:
            bad = ~(np.abs(array) <= FLOAT32_MAX)  # NaN, infinite or beyond float32
            if bad.any():
                for index in np.flatnonzero(bad).tolist():
                    if values[index] is not None:
                        number_value(spec, values[index], index)
        else:
            array = np.empty(len(values), dtype=np.float64)
            for index, value in enumerate(values):
                array[index] = number_value(spec, value, index)
        return array.astype(np.float32).reshape(-1, 1)

    def _categorical(
        self, spec: InputSpec, values: Sequence[Any], warnings: list[list[str]] | None
    ) -> np.ndarray:
        """`category_value` over a column: columns of strings (and nulls) are taken whole,
        anything else goes value by value through the rule; then `check_categories`."""
        try:
            distinct = set(values)
        except TypeError:  # an unhashable value (list, object): the rule names it
            distinct = {None, 0}
        if all(type(v) is str for v in distinct):
            text = values
        elif all(v is None or type(v) is str for v in distinct):
            text = [MISSING_MARKER if v is None else v for v in values]
            distinct.discard(None)
            distinct.add(MISSING_MARKER)
        else:
            text = [category_value(spec, value, index) for index, value in enumerate(values)]
            distinct = set(text)
        if "" in distinct:
            text = [MISSING_MARKER if v == "" else v for v in text]
            distinct.discard("")
        if spec.accepted is not None and not distinct <= spec.accepted:
            check_categories(spec, text, distinct - spec.accepted, self.policy, warnings)
        return np.array(text, dtype=object).reshape(-1, 1)

    # ---- one row --------------------------------------------------------------------------
    def values_one(
        self, row: Any, warnings: list[list[str]] | None
    ) -> tuple[list[float], list[str]]:
        """One row validated in one pass: (numeric values, categorical strings), feed order."""
        values = self.keys.table([row])[0]
        numbers = [number_value(spec, values[index], 0) for spec, index in self._numeric_specs]
        texts = []
        for spec, index in self._categorical_specs:
            value = category_value(spec, values[index], 0)
            if spec.accepted is not None and value not in spec.accepted:
                check_categories(spec, (value,), {value}, self.policy, warnings)
            texts.append(value)
        return numbers, texts

    def feeds_rows(
        self, numbers: list[list[float]], texts: list[list[str]]
    ) -> dict[str, np.ndarray]:
        """Feeds of k validated rows: packed, the two (k, n) arrays; per column, one
        contiguous (k, 1) view per input."""
        k = len(numbers)
        numeric = np.array(numbers, dtype=np.float32)
        layout = self.layout
        if layout.packed:
            feeds = {}
            if layout.numeric_order:
                feeds[layout.numeric_tensor] = numeric
            if layout.categorical_order:
                feeds[layout.categorical_tensor] = np.array(texts, dtype=object)
            return feeds
        text = np.array(texts, dtype=np.str_)
        if k > 1:  # column-major, so that each input's (k, 1) view is contiguous
            numeric = np.ascontiguousarray(numeric.T)
            text = np.ascontiguousarray(text.T)
        feeds = dict(zip(self._numeric_names, numeric.reshape(-1, k, 1), strict=True))
        feeds.update(zip(self._categorical_names, text.reshape(-1, k, 1), strict=True))
        return feeds
