"""KServe V2 (Open Inference Protocol) mapping onto `LoadedModel`, transport-free.

Convention: one input tensor per feature, named by its contract column (a per-column graph's
`onnx_name` is accepted too), shape `[N, 1]` (or `[N]`), datatype `FP32` (numeric) or `BYTES`
(categorical), `data` flat or nested row-major. The server packs the columns into the graph's
own input tensors. Outputs: `label` (BYTES `[N]`) and
`probabilities` (FP32 `[N, C]`, columns in the order of `parameters.classes`). Validation is the
same as for /predict (the tensors are turned into rows), and so is the input rule: a tensor
named after one of the data file's other columns (the ids, the target) is ignored, any other
unknown name is refused.
"""

from __future__ import annotations

import math
from typing import Any

from readmission.serving.errors import InputError, shown
from readmission.serving.model import LoadedModel, Prediction

MAX_DATA_NESTING = 32  # `data` is flat or row-major nested: as deep as its shape, never more


def named_model(model: LoadedModel, name: str) -> LoadedModel:
    """The model a V2 path names: the served one, or 404 unknown_model."""
    if name != model.name:
        raise InputError(
            f"unknown model {name!r}; this server serves {model.name!r}",
            "model_name",
            kind="unknown_model",
            status=404,
        )
    return model


# An extra output a request may ask for by name (never sent unasked): each row's top factors
# (readmission.serving.explain) as JSON text, BYTES [N].
EXPLANATION_OUTPUT = "explanation"


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "readmission-predict", "version": version, "extensions": []}


def model_metadata(model: LoadedModel) -> dict[str, Any]:
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {
                "name": spec.column,
                "datatype": "FP32" if spec.numeric else "BYTES",
                "shape": [-1, 1],
                "parameters": {"column": spec.column},
            }
            for spec in model.inputs
        ],
        "outputs": [
            {"name": model.label_output, "datatype": "BYTES", "shape": [-1]},
            {
                "name": model.probabilities_output,
                "datatype": "FP32",
                "shape": [-1, len(model.classes)],
                "parameters": {"classes": model.classes},
            },
        ],
    }


def _flatten(data: Any, name: str, depth: int = 0) -> list[Any]:
    if not isinstance(data, list):
        raise InputError(f"input {name}: data must be a list", name, kind="invalid_tensor")
    if data and all(isinstance(item, list) for item in data):
        if depth >= MAX_DATA_NESTING:
            raise InputError(
                f"input {name}: data nested more than {MAX_DATA_NESTING} levels deep",
                name,
                kind="invalid_tensor",
            )
        flat: list[Any] = []
        for item in data:
            flat.extend(_flatten(item, name, depth + 1))
        return flat
    return data


def request_rows(model: LoadedModel, body: Any) -> tuple[list[dict[str, Any]], list[str] | None]:
    """Rows (column -> value) from a V2 infer request, and the requested output names."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise InputError(
            "the body must be a JSON object with an 'inputs' list",
            "inputs",
            kind="invalid_body",
            status=400,
        )
    by_name = {spec.column: spec for spec in model.inputs}
    if not model.layout.packed:  # each column has its own graph input: its name is accepted
        for spec in model.inputs:
            by_name.setdefault(spec.onnx_name, spec)
    columns: dict[str, list[Any]] = {}
    count: int | None = None
    for tensor in body["inputs"]:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise InputError("each input tensor needs a name", "inputs", kind="invalid_tensor")
        name = tensor["name"]
        spec = by_name.get(name)
        if spec is None:
            if name in model.ignored_columns:  # an id or the target, as /predict ignores them
                continue
            raise InputError(
                f"unknown input tensor {name!r}: not an input of the model (only the data "
                "file's ids and target are ignored)"[:300],
                name,
                kind="unknown_input",
            )
        datatype = tensor.get("datatype")
        wanted = "FP32" if spec.numeric else "BYTES"
        if datatype not in (wanted, "FP64", "INT64", "INT32") or (
            not spec.numeric and datatype != "BYTES"
        ):
            raise InputError(
                f"input {name}: datatype must be {wanted}", name, kind="invalid_tensor"
            )
        data = _flatten(tensor.get("data"), name)
        shape = tensor.get("shape")
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not shape
            or math.prod(shape) != len(data)
            or any(d != 1 for d in shape[1:])
        ):
            raise InputError(
                f"input {name}: shape must be [N, 1] matching the data", name, kind="invalid_tensor"
            )
        if count is None:
            count = len(data)
        elif count != len(data):
            raise InputError(
                f"input {name}: every input needs the same number of rows",
                name,
                kind="invalid_tensor",
            )
        columns[spec.column] = data
    for spec in model.inputs:
        if spec.column not in columns:
            raise InputError(
                f"missing input tensor {spec.column!r}", spec.column, kind="missing_feature"
            )
    names = list(columns)
    rows = [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    outputs = body.get("outputs")
    requested = None
    if isinstance(outputs, list):
        requested = [o.get("name") for o in outputs if isinstance(o, dict)]
        for name in requested:
            if name not in (model.label_output, model.probabilities_output, EXPLANATION_OUTPUT):
                raise InputError(
                    f"unknown output {shown(name)}"[:300], "outputs", kind="unknown_output"
                )
    return rows, requested


def response(
    model: LoadedModel,
    predictions: list[Prediction],
    request_id: str | None,
    requested: list[str] | None,
) -> dict[str, Any]:
    n = len(predictions)
    outputs = []
    if requested is None or model.label_output in requested:
        outputs.append(
            {
                "name": model.label_output,
                "datatype": "BYTES",
                "shape": [n],
                "data": [p.label for p in predictions],
            }
        )
    if requested is None or model.probabilities_output in requested:
        outputs.append(
            {
                "name": model.probabilities_output,
                "datatype": "FP32",
                "shape": [n, len(model.classes)],
                "data": [p.probabilities[c] for p in predictions for c in model.classes],
                "parameters": {"classes": model.classes},
            }
        )
    body: dict[str, Any] = {
        "model_name": model.name,
        "model_version": model.version,
        "outputs": outputs,
    }
    if request_id is not None:
        body["id"] = request_id
    warnings = [w for p in predictions for w in p.warnings]
    if warnings:
        body["parameters"] = {"warnings": warnings}
    return body
