"""The model's inputs and the one rule set that validates a client's values for them.

Contract (docs/predict.md): every input named in the metadata is a required key; the data
file's other columns (the ids, the target) are ignored and any other key is refused (a
misspelt feature must not pass as a missing value); `null`, `"?"` and `""` mean missing;
numeric inputs take a JSON number or a numeric string within the float32 range; categorical
inputs take a string (integers are accepted and turned into their decimal string); a category
the model never saw is rejected (policy `reject`) or passed to the model as unseen with a
warning (policy `unseen`).

Each rule is written once here: `RowKeys.table` (keys), `number_value` and `category_value`
(values), `check_categories` (unknown categories). The single-row and the column-wise paths of
`readmission.serving.feeds` both call them; the column-wise path only adds vectorised
shortcuts for values the rules pass through unchanged, and hands every other value to the
rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np

from readmission.contract import COLUMNS, MISSING_MARKER
from readmission.serving.errors import InputError, ModelLoadError, shown

MISSING_VALUES = frozenset({MISSING_MARKER, ""})  # a string meaning "missing"
NUMBER_TYPES = frozenset({int, float})  # JSON numbers as the parsers give them
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class InputSpec:
    column: str
    onnx_name: str  # the ONNX input tensor holding this column
    numeric: bool
    categories: tuple[str, ...] | None  # None: any string is accepted
    accepted: frozenset[str] | None  # categories plus the missing marker
    index: int | None = None  # position in a packed [N, k] tensor; None: its own [N, 1] input

    def schema(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "column": self.column,
            "onnx_name": self.onnx_name,
            "kind": "numeric" if self.numeric else "categorical",
        }
        if self.index is not None:
            entry["index"] = self.index
        if self.categories is not None:
            entry["categories"] = list(self.categories)
        return entry


def parse_inputs(metadata: Mapping[str, Any]) -> tuple[InputSpec, ...]:
    raw = metadata.get("inputs")
    if not isinstance(raw, list) or not raw:
        raise ModelLoadError("metadata has no 'inputs' list")
    specs = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("column"), str):
            raise ModelLoadError(f"metadata input without a column name: {item!r}")
        kind = item.get("kind")
        if kind not in ("numeric", "categorical"):
            raise ModelLoadError(f"input {item['column']}: kind must be numeric or categorical")
        categories = item.get("categories")
        cats = None
        if kind == "categorical" and isinstance(categories, list):
            cats = tuple(str(c) for c in categories)
        index = item.get("index")
        if index is not None and (type(index) is not int or index < 0):
            raise ModelLoadError(f"input {item['column']}: index must be a non-negative integer")
        specs.append(
            InputSpec(
                column=item["column"],
                onnx_name=str(item.get("onnx_name") or item["column"]),
                numeric=kind == "numeric",
                categories=cats,
                accepted=None if cats is None else frozenset(cats) | {MISSING_MARKER},
                index=index,
            )
        )
    return tuple(specs)


@dataclass(frozen=True)
class InputLayout:
    """How the metadata's columns map onto the graph's input tensors.

    packed (this project's exports): one float tensor [N, n_numeric] and one string tensor
    [N, n_categorical], each column at its `index`; per_column (older exports, or a graph
    converted feature by feature): one [N, 1] tensor per column.
    """

    packed: bool
    numeric_tensor: str  # packed only
    categorical_tensor: str  # packed only
    # positions (in the metadata's input order) of the numeric / categorical columns, in the
    # order their values are fed: by index when packed, else as listed
    numeric_order: tuple[int, ...]
    categorical_order: tuple[int, ...]


def input_layout(inputs: Sequence[InputSpec]) -> InputLayout:
    """The layout of the inputs, or ModelLoadError if they are neither packed nor per column."""
    numeric = [i for i, spec in enumerate(inputs) if spec.numeric]
    categorical = [i for i, spec in enumerate(inputs) if not spec.numeric]
    names = [spec.onnx_name for spec in inputs]
    if len(set(names)) == len(names) and all(spec.index is None for spec in inputs):
        return InputLayout(False, "", "", tuple(numeric), tuple(categorical))
    tensors = []
    orders = []
    for group, kind in ((numeric, "numeric"), (categorical, "categorical")):
        group_names = {inputs[i].onnx_name for i in group}
        if len(group_names) > 1:
            raise ModelLoadError(f"the {kind} inputs span several tensors: {sorted(group_names)}")
        indexes = sorted(inputs[i].index for i in group if inputs[i].index is not None)
        if indexes != list(range(len(group))):
            raise ModelLoadError(f"the {kind} inputs' indexes must be 0..{len(group) - 1}")
        tensors.append(group_names.pop() if group_names else "")
        orders.append(tuple(sorted(group, key=lambda i: inputs[i].index or 0)))
    if tensors[0] and tensors[0] == tensors[1]:
        raise ModelLoadError("numeric and categorical inputs share one tensor")
    return InputLayout(True, tensors[0], tensors[1], orders[0], orders[1])


def check_batch_size(count: int, limit: int, field: str) -> None:
    """413 for more rows than PREDICT_BATCH_LIMIT (/predict/batch and V2 infer alike)."""
    if count > limit:
        raise InputError(
            f"at most {limit} instances per request (PREDICT_BATCH_LIMIT)",
            field,
            kind="batch_too_large",
            status=413,
        )


# ---- the value rules ------------------------------------------------------------------------
def number_value(spec: InputSpec, value: Any, row: int) -> float:
    """A numeric input's value: a JSON number or numeric string within the float32 range, or
    NaN for missing (`null`, `"?"`, `""`); InputError(kind=invalid_type) otherwise."""
    if type(value) in NUMBER_TYPES and -FLOAT32_MAX <= value <= FLOAT32_MAX:
        return value  # the common case, unchanged (float32 conversion happens in the feed)
    if value is None or (isinstance(value, str) and value.strip() in MISSING_VALUES):
        return math.nan
    number: float | None = None
    try:
        if type(value) in NUMBER_TYPES:
            number = float(value)
        elif isinstance(value, str):
            number = float(value.strip())
    except (ValueError, OverflowError):
        number = None
    if number is None or not -FLOAT32_MAX <= number <= FLOAT32_MAX:
        raise InputError(
            f"{spec.column} must be a number within the float32 range (or null for "
            f"missing), got {shown(value)}"[:300],
            spec.column,
            row=row,
            kind="invalid_type",
        )
    return number


def category_value(spec: InputSpec, value: Any, row: int) -> str:
    """A categorical input's value: a string, an integer as its decimal string, or the
    missing marker for `null` and `""`; InputError(kind=invalid_type) otherwise."""
    if type(value) is str and value:
        return value  # the common case, unchanged
    if value is None:
        return MISSING_MARKER
    if isinstance(value, str):
        return value or MISSING_MARKER
    if type(value) is int:
        return str(value)
    raise InputError(
        f"{spec.column} must be a string (or null for missing), got {shown(value)}"[:300],
        spec.column,
        row=row,
        kind="invalid_type",
    )


def check_categories(
    spec: InputSpec,
    text: Sequence[str],
    unknown: set[str],
    policy: str,
    warnings: list[list[str]] | None,
) -> None:
    """The unknown-category rule for the values `text` of one input (`unknown`: those not in
    `spec.accepted`): InputError(kind=unknown_category) naming the first, or (policy unseen,
    with `warnings` given) one warning per row holding one."""
    if policy == "reject" or warnings is None:
        row = next(i for i, v in enumerate(text) if v in unknown)
        raise InputError(
            f"{spec.column}: unknown category {text[row]!r}"[:300],
            spec.column,
            row=row,
            allowed=spec.categories,
            kind="unknown_category",
        )
    for index, value in enumerate(text):
        if value in unknown:
            warnings[index].append(
                f"{spec.column}: category {value!r} was not seen in training; "
                "the model treats it as unseen"
            )


# ---- the key rule ---------------------------------------------------------------------------
class RowKeys:
    """The key rule: each row is a mapping holding every input; the data file's other columns
    (`ignored_columns`) may be present; any other key is refused."""

    def __init__(self, inputs: Sequence[InputSpec]) -> None:
        self.inputs = tuple(inputs)
        self._getter = itemgetter(*(spec.column for spec in self.inputs))
        columns = {spec.column for spec in self.inputs}
        # the data file's columns that are not inputs (ids, target): accepted and ignored
        self.ignored_columns = tuple(c for c in COLUMNS if c not in columns)
        self._known_keys = frozenset(columns) | frozenset(self.ignored_columns)

    def table(self, rows: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Each row's values in input order, or InputError naming the first bad row."""
        getter = self._getter
        try:
            table = [getter(row) for row in rows]
        except (KeyError, TypeError, IndexError):
            self._diagnose_rows(rows)
            raise
        # every row holds every input (or the getter failed): more keys than inputs means
        # other keys, checked only then (one C loop over the rows on the usual path)
        if max(map(len, rows)) > len(self.inputs):
            self._unknown_keys(rows)
        if len(self.inputs) == 1:  # itemgetter of one key returns the value, not a tuple
            table = [(value,) for value in table]
        return table

    def _unknown_keys(self, rows: Sequence[Any]) -> None:
        """InputError naming the first row's keys that are neither an input nor ignored."""
        for index, row in enumerate(rows):
            unknown = sorted(map(str, row.keys() - self._known_keys))
            if unknown:
                names = ", ".join(repr(name) for name in unknown)
                raise InputError(
                    f"unknown feature{'s' if len(unknown) > 1 else ''} {names}: not an input "
                    "of the model (only the data file's ids and target are ignored)"[:300],
                    unknown[0],
                    row=index,
                    kind="unknown_feature",
                )

    def _diagnose_rows(self, rows: Sequence[Any]) -> None:
        for index, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise InputError(
                    "each instance must be a JSON object of feature values",
                    None,
                    row=index,
                    kind="invalid_row",
                )
            for spec in self.inputs:
                if spec.column not in row:
                    raise InputError(
                        f"missing feature {spec.column!r}",
                        spec.column,
                        row=index,
                        kind="missing_feature",
                    )
