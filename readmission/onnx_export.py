"""Export a fitted pipeline (features.build_pipeline) to ONNX.

The ONNX model contract (docs/design.md): two inputs, `numeric` (float32 [N, 8], the
NUMERIC_FEATURES in contract order, NaN for missing) and `categorical` (string [N, 39], the
CATEGORICAL_FEATURES in contract order, "?" for missing); outputs `label` (string [N]) and
`probabilities` (float32 [N, n_classes], columns in the order of `classes`, no ZipMap).

The graph is built from the one fitted Pipeline: its encoders become a handful of ONNX nodes
written here (one LabelEncoder over all 39 columns, a Gather of per-column codes), and its
classifier is converted by skl2onnx. skl2onnx converting the whole pipeline would give one
input per column and ~80 per-column encoder nodes, whose fixed per-node cost would dominate a
single-row prediction. `export_onnx` is deterministic (fixed graph name
and opsets: the same fitted pipeline gives the same bytes) and reads and writes no storage;
readmission.onnx_parity runs the result and proves it equals the pipeline's predict_proba.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import pandas as pd
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType, StringTensorType
from sklearn.compose import ColumnTransformer
from sklearn.feature_selection import SelectorMixin
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

from readmission.contract import CATEGORICAL_FEATURES, FEATURES, NUMERIC_FEATURES
from readmission.features import (
    MODEL_STEP,
    PREPROCESS_STEP,
    learned_categories,
    n_model_features,
)
from readmission.glue.skl2onnx_patch import patch_hist_gradient_boosting
from readmission.onnx_parity import (
    CATEGORICAL_INPUT,
    LABEL_OUTPUT,
    NUMERIC_INPUT,
    PROBABILITIES_OUTPUT,
    check_parity,
)

# Default opsets of skl2onnx 1.20 that onnxruntime >= 1.18 runs; fixed so exports are stable.
TARGET_OPSET: dict[str, int] = {"": 17, "ai.onnx.ml": 3}
GRAPH_NAME = "readmission"


patch_hist_gradient_boosting()  # skl2onnx 1.20's tree converter (readmission.glue)


@dataclass(frozen=True)
class ExportedModel:
    onnx_bytes: bytes
    # [{"column", "onnx_name", "kind": "numeric"|"categorical", "categories": [...]}]
    inputs: list[dict[str, Any]]
    classes: list[str]
    outputs: dict[str, str] = field(
        default_factory=lambda: {"label": LABEL_OUTPUT, "probabilities": PROBABILITIES_OUTPUT}
    )


_FEATURES_NAME = "features"  # the classifier's input inside the graph


class _GraphBuilder:
    """Nodes and initializers of the preprocessing part of the graph."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"pre_{hint}_{self._count}"

    def constant(self, hint: str, array: np.ndarray) -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], hint: str, domain: str = "", **attrs: Any) -> str:
        output = self.name(hint)
        self.nodes.append(
            helper.make_node(
                op, inputs, [output], name=self.name(op), domain=domain or None, **attrs
            )
        )
        return output


def _column_lookup(
    builder: _GraphBuilder,
    categorical: str,
    codes: Sequence[Mapping[str, float]],
    default: float,
    dtype: type,
) -> str:
    """[N, 39] of `dtype`: codes[j][value] for every cell of column j, `default` for a value
    column j does not know. One LabelEncoder over the sorted vocabulary of all columns (V
    strings; absent -> V) and one Gather of table[j * (V + 1) + u] serve all 39 columns."""
    vocabulary = sorted({value for column in codes for value in column})
    size = len(vocabulary)
    position = {value: u for u, value in enumerate(vocabulary)}
    table = np.full((len(codes), size + 1), default, dtype=dtype)
    for j, column in enumerate(codes):
        for value, code in column.items():
            table[j, position[value]] = code
    index = builder.node(
        "LabelEncoder",
        [categorical],
        "vocab_index",
        domain="ai.onnx.ml",
        keys_strings=vocabulary,
        values_int64s=list(range(size)),
        default_int64=size,
    )
    offsets = np.arange(len(CATEGORICAL_FEATURES), dtype=np.int64).reshape(1, -1) * (size + 1)
    flat = builder.node("Add", [index, builder.constant("column_offsets", offsets)], "flat")
    return builder.node(
        "Gather", [builder.constant("table", table.reshape(-1)), flat], "looked_up", axis=0
    )


def _ordinal_codes(builder: _GraphBuilder, categorical: str, encoder: OrdinalEncoder) -> str:
    """float32 [N, 39]: each column's OrdinalEncoder code, unknown_value for unseen values."""
    codes = [
        {str(value): float(code) for code, value in enumerate(column)}
        for column in encoder.categories_
    ]
    return _column_lookup(builder, categorical, codes, float(encoder.unknown_value), np.float32)


def _category_names(codes: OrdinalEncoder, one_hot: OneHotEncoder) -> list[list[str]]:
    """Per input column, the one-hot encoder's categories (ordinal codes) as the strings
    that those codes encode."""
    names: list[list[str]] = []
    for strings, column in zip(codes.categories_, one_hot.categories_, strict=True):
        positions = np.asarray(column, dtype=np.float64)
        if not np.all((positions == np.round(positions)) & (positions >= 0)):
            raise ValueError("the one-hot step after ordinal codes saw a code that is not one")
        names.append([str(strings[int(p)]) for p in positions])
    return names


def _one_hot_block_columns(codes: OrdinalEncoder, one_hot: OneHotEncoder) -> list[dict[str, int]]:
    """Per input column: category -> its output column in the encoder's (dense) output.

    Columns are laid out feature by feature; within a feature the frequent categories in
    `categories_` order, then one column shared by the infrequent ones (scikit-learn's layout
    with min_frequency and no `drop`), keyed by the strings the codes stand for. Verified
    against the pipeline by the caller's parity check."""
    if one_hot.drop is not None:
        raise ValueError("OneHotEncoder(drop=...) is not supported by the ONNX export")
    names = _category_names(codes, one_hot)
    infrequent = getattr(one_hot, "infrequent_categories_", None) or [None] * len(names)
    offset = 0
    blocks: list[dict[str, int]] = []
    for j, (column, rare) in enumerate(zip(names, infrequent, strict=True)):
        rare_values = (
            {column[i] for i in np.flatnonzero(np.isin(one_hot.categories_[j], rare))}
            if rare is not None
            else set()
        )
        block: dict[str, int] = {}
        for value in column:
            if value not in rare_values:
                block[value] = offset + len(block)
        width = len(block)
        if rare_values:
            for value in rare_values:
                block[value] = offset + width
            width += 1
        blocks.append(block)
        offset += width
    return blocks


def _one_hot(
    builder: _GraphBuilder, categorical: str, codes: OrdinalEncoder, one_hot: OneHotEncoder
) -> str:
    """float32 [N, D]: the one-hot of the OrdinalEncoder's codes (unseen values have the
    code -1, which the one-hot step ignores (handle_unknown='ignore'): all zeros)."""
    if one_hot.handle_unknown != "ignore":
        raise ValueError("the ONNX export needs OneHotEncoder(handle_unknown='ignore')")
    blocks = _one_hot_block_columns(codes, one_hot)
    width = 1 + max((max(block.values()) for block in blocks if block), default=-1)
    # unseen values go to an extra column `width`, dropped after the scatter
    columns = _column_lookup(builder, categorical, blocks, width, np.int64)
    rows = builder.node(
        "Slice",
        [
            builder.node("Shape", [categorical], "shape"),
            builder.constant("zero", np.array([0], dtype=np.int64)),
            builder.constant("one", np.array([1], dtype=np.int64)),
        ],
        "rows",
    )
    zeros_shape = builder.node(
        "Concat",
        [rows, builder.constant("width", np.array([width + 1], dtype=np.int64))],
        "zeros_shape",
        axis=0,
    )
    zeros = builder.node(
        "ConstantOfShape",
        [zeros_shape],
        "zeros",
        value=numpy_helper.from_array(np.array([0.0], dtype=np.float32)),
    )
    ones = builder.node(
        "ConstantOfShape",
        [builder.node("Shape", [columns], "cells")],
        "ones",
        value=numpy_helper.from_array(np.array([1.0], dtype=np.float32)),
    )
    hot = builder.node("ScatterElements", [zeros, columns, ones], "hot", axis=1)
    return builder.node(
        "Slice",
        [
            hot,
            builder.constant("start", np.array([0], dtype=np.int64)),
            builder.constant("end", np.array([width], dtype=np.int64)),
            builder.constant("axis", np.array([1], dtype=np.int64)),
        ],
        "one_hot",
    )


def _numeric_part(builder: _GraphBuilder, numeric: str, transformer: Any) -> str:
    """float32 [N, 8]: median imputation, then standard scaling if the pipeline scales."""
    steps = transformer.steps if isinstance(transformer, Pipeline) else [("", transformer)]
    current = numeric
    for _, step in steps:
        if isinstance(step, SimpleImputer) and step.strategy in ("median", "mean"):
            if not step.keep_empty_features and np.isnan(step.statistics_).any():
                # scikit-learn drops such a column; the graph imputes in place and keeps it
                raise ValueError(
                    "the numeric imputer dropped a column with no value in the training rows; "
                    "the ONNX export needs SimpleImputer(keep_empty_features=True)"
                )
            current = builder.node(
                "Imputer",
                [current],
                "imputed",
                domain="ai.onnx.ml",
                imputed_value_floats=[float(v) for v in step.statistics_],
                replaced_value_float=float("nan"),
            )
        elif isinstance(step, StandardScaler):
            if step.with_mean:
                mean = builder.constant("mean", step.mean_.astype(np.float32).reshape(1, -1))
                current = builder.node("Sub", [current, mean], "centred")
            if step.with_std:
                scale = builder.constant("scale", step.scale_.astype(np.float32).reshape(1, -1))
                current = builder.node("Div", [current, scale], "scaled")
        else:
            raise ValueError(f"no ONNX export for the numeric step {step!r}")
    return current


def _is_codes_then_one_hot(transformer: Any) -> bool:
    """Whether the transformer is Pipeline([OrdinalEncoder, OneHotEncoder]), optionally with a
    StandardScaler(with_mean=False) after the one-hot step."""
    steps = [step for _, step in transformer.steps] if isinstance(transformer, Pipeline) else []
    return (
        len(steps) in (2, 3)
        and isinstance(steps[0], OrdinalEncoder)
        and isinstance(steps[1], OneHotEncoder)
        and all(isinstance(step, StandardScaler) and not step.with_mean for step in steps[2:])
    )


def _scaled_one_hot(builder: _GraphBuilder, categorical: str, transformer: Pipeline) -> str:
    """float32 [N, D]: the one-hot of the ordinal codes, times 1 / scale_ of the scaler after
    it (scikit-learn scales sparse columns by multiplying with the reciprocal)."""
    codes, one_hot, *scalers = (step for _, step in transformer.steps)
    current = _one_hot(builder, categorical, codes, one_hot)
    for scaler in scalers:
        if scaler.with_std:
            factors = (1.0 / scaler.scale_).astype(np.float32).reshape(1, -1)
            current = builder.node(
                "Mul", [current, builder.constant("one_hot_factors", factors)], "one_hot_scaled"
            )
    return current


def _preprocessing(builder: _GraphBuilder, pipeline: Pipeline) -> str:
    """The graph from the two inputs to the classifier's input (preprocess, then select)."""
    preprocess = pipeline.named_steps[PREPROCESS_STEP]
    if not isinstance(preprocess, ColumnTransformer):
        raise ValueError("the pipeline's preprocess step must be a ColumnTransformer")
    parts = []
    for name, transformer, columns in preprocess.transformers_:
        if transformer == "drop" or len(columns) == 0:
            continue
        if tuple(columns) == NUMERIC_FEATURES:
            parts.append(_numeric_part(builder, NUMERIC_INPUT, transformer))
        elif tuple(columns) == CATEGORICAL_FEATURES and isinstance(transformer, OrdinalEncoder):
            parts.append(_ordinal_codes(builder, CATEGORICAL_INPUT, transformer))
        elif tuple(columns) == CATEGORICAL_FEATURES and _is_codes_then_one_hot(transformer):
            parts.append(_scaled_one_hot(builder, CATEGORICAL_INPUT, transformer))
        else:
            raise ValueError(f"no ONNX export for the {name!r} transformer {transformer!r}")
    current = builder.node("Concat", parts, "preprocessed", axis=1)
    for step in pipeline.steps[1:-1]:  # feature selection between preprocess and model
        selector = step[1]
        if not isinstance(selector, SelectorMixin):
            raise ValueError(f"no ONNX export for the pipeline step {step[0]!r}")
        kept = np.flatnonzero(selector.get_support()).astype(np.int64)
        current = builder.node(
            "Gather", [current, builder.constant("selected", kept)], "selected", axis=1
        )
    return current


def _classifier_model(classifier: Any, n_features: int, n_classes: int) -> onnx.ModelProto:
    return convert_sklearn(
        classifier,
        initial_types=[(_FEATURES_NAME, FloatTensorType([None, n_features]))],
        name=GRAPH_NAME,  # skl2onnx's default is a random uuid: exports would differ
        options={id(classifier): {"zipmap": False}},
        target_opset=TARGET_OPSET,
        final_types=[
            (LABEL_OUTPUT, StringTensorType([None])),
            (PROBABILITIES_OUTPUT, FloatTensorType([None, n_classes])),
        ],
    )


def build_graph(pipeline: Pipeline) -> onnx.ModelProto:
    """The ONNX model of a fitted pipeline (the contract in the module docstring)."""
    classifier = pipeline.named_steps[MODEL_STEP]
    n_classes = len(classifier.classes_)
    classifier_model = _classifier_model(classifier, n_model_features(pipeline), n_classes)
    builder = _GraphBuilder()
    features = _preprocessing(builder, pipeline)
    classifier_graph = classifier_model.graph
    nodes = list(builder.nodes)
    for node in classifier_graph.node:
        renamed = onnx.NodeProto()
        renamed.CopyFrom(node)
        for i, name in enumerate(renamed.input):
            if name == _FEATURES_NAME:
                renamed.input[i] = features
        nodes.append(renamed)
    graph = helper.make_graph(
        nodes,
        GRAPH_NAME,
        [
            helper.make_tensor_value_info(
                NUMERIC_INPUT, TensorProto.FLOAT, [None, len(NUMERIC_FEATURES)]
            ),
            helper.make_tensor_value_info(
                CATEGORICAL_INPUT, TensorProto.STRING, [None, len(CATEGORICAL_FEATURES)]
            ),
        ],
        list(classifier_graph.output),
        initializer=list(builder.initializers) + list(classifier_graph.initializer),
    )
    opsets = {op.domain: op.version for op in classifier_model.opset_import}
    opsets[""] = max(opsets.get("", 0), TARGET_OPSET[""])
    opsets["ai.onnx.ml"] = max(opsets.get("ai.onnx.ml", 0), TARGET_OPSET["ai.onnx.ml"])
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(domain, version) for domain, version in opsets.items()],
        producer_name="readmission.onnx_export",
    )
    model.ir_version = classifier_model.ir_version
    onnx.checker.check_model(model)
    return model


def input_specs(pipeline: Pipeline) -> list[dict[str, Any]]:
    """The metadata's `inputs`: per contract column, its tensor, position and (categorical)
    the categories the model learned."""
    categories = learned_categories(pipeline)
    inputs: list[dict[str, Any]] = []
    for column in FEATURES:
        numeric = column in NUMERIC_FEATURES
        spec: dict[str, Any] = {
            "column": column,
            "onnx_name": NUMERIC_INPUT if numeric else CATEGORICAL_INPUT,
            "index": (NUMERIC_FEATURES if numeric else CATEGORICAL_FEATURES).index(column),
            "kind": "numeric" if numeric else "categorical",
        }
        if not numeric and column in categories:
            spec["categories"] = categories[column]
        inputs.append(spec)
    return inputs


def export_onnx(pipeline: Pipeline, sample_frame: pd.DataFrame | None = None) -> ExportedModel:
    """Convert a fitted pipeline to ONNX bytes plus the metadata the predict function needs.

    If `sample_frame` is given, the export is checked with `check_parity` on it (ParityError if
    it does not match).
    """
    classifier = pipeline.named_steps[MODEL_STEP]
    classes = [str(c) for c in classifier.classes_]
    model = build_graph(pipeline)
    output_names = [graph_output.name for graph_output in model.graph.output]
    if output_names != [LABEL_OUTPUT, PROBABILITIES_OUTPUT]:
        raise ValueError(f"unexpected ONNX outputs {output_names}")
    exported = ExportedModel(model.SerializeToString(), input_specs(pipeline), classes)
    if sample_frame is not None:
        check_parity(pipeline, exported.onnx_bytes, sample_frame)
    return exported
