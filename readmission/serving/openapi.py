"""The predict function's OpenAPI 3.1 document, generated from the model it serves.

Contract: `build_openapi(model, ...)` documents one operation per entry of
`readmission.serving.routes.ROUTES` (the list the function's dispatch table must equal, checked
at import), so the document cannot drift from the server; with no model loaded yet it
documents the contract's features.
"""

from __future__ import annotations

from typing import Any

from readmission.contract import COLUMNS, FEATURES, NUMERIC_FEATURES, TARGET_CLASSES
from readmission.serving.examples import EXAMPLE_PATIENT, example_for
from readmission.serving.model import LoadedModel

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Body is not valid JSON (or nested more than 1024 levels), or cannot be read "
        "(a malformed chunked encoding)",
        404: "Unknown model or file",
        413: "Body larger than PREDICT_MAX_BODY_BYTES, or more rows than PREDICT_BATCH_LIMIT",
        415: "Content-Type is not application/json",
        422: "Input fails validation (a missing or unknown feature, a wrong value); `field` "
        "names the feature",
        503: "No model loaded yet",
    }
    return {str(code): _json(_ERROR, text[code]) for code in codes}


_NUMERIC_STRING = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
_NUMERIC = {
    "anyOf": [
        {"type": "number"},
        {"type": "string", "pattern": _NUMERIC_STRING},
        {"type": "string", "enum": ["?", ""]},
        {"type": "null"},
    ],
    "description": "A number (a numeric string is accepted); null, '?' or '' for missing.",
}


def _categorical_schema(categories: tuple[str, ...] | None, policy: str) -> dict[str, Any]:
    if categories is None or policy != "reject":
        return {
            "type": ["string", "integer", "null"],
            "description": "A category; unseen categories are accepted with a warning.",
        }
    options: list[dict[str, Any]] = [{"type": "string", "enum": [*categories, "?", ""]}]
    codes = sorted({int(c) for c in categories if c.isdigit() and str(int(c)) == c})
    if codes:
        options.append({"type": "integer", "enum": codes})
    options.append({"type": "null"})
    return {
        "anyOf": options,
        "description": "One of the categories seen in training; null, '?' or '' for missing. "
        "Integers are read as their decimal string.",
    }


_IGNORED = {
    "description": "Ignored: a column of the data file that is not an input (an id, "
    "the target). Any other key that is not an input is refused (422 unknown_feature)."
}


def _feature_schema(model: LoadedModel | None) -> dict[str, Any]:
    if model is None:
        properties = {
            column: _NUMERIC if column in NUMERIC_FEATURES else _categorical_schema(None, "")
            for column in FEATURES
        }
        properties.update((column, _IGNORED) for column in COLUMNS if column not in properties)
        return {
            "type": "object",
            "required": list(FEATURES),
            "properties": properties,
            "additionalProperties": False,
            "example": EXAMPLE_PATIENT,
        }
    properties = {
        spec.column: _NUMERIC
        if spec.numeric
        else _categorical_schema(spec.categories, model.policy)
        for spec in model.inputs
    }
    properties.update((column, _IGNORED) for column in model.ignored_columns)
    return {
        "type": "object",
        "required": [spec.column for spec in model.inputs],
        "properties": properties,
        "additionalProperties": False,
        "example": example_for(model),
    }


def build_openapi(
    model: LoadedModel | None, batch_limit: int, max_body: int, static_files: list[str]
) -> dict[str, Any]:
    classes = model.classes if model is not None else list(TARGET_CLASSES)
    probabilities = {
        "type": "object",
        "properties": {c: {"type": "number"} for c in classes},
        "required": list(classes),
    }
    result = {
        "type": "object",
        "required": ["readmission_prediction", "probabilities"],
        "properties": {
            "readmission_prediction": {"type": "string", "enum": list(classes)},
            "probabilities": probabilities,
            "warnings": {"type": "array", "items": {"type": "string"}},
        },
    }
    explanation = {  # readmission.serving.explain, with ?explain=true only
        "type": "object",
        "properties": {
            "method": {"type": "string", "enum": ["occlusion"]},
            "baseline": {"type": "string"},
            "top_factors": {"type": "array", "items": {"type": "object"}},
        },
    }
    single = {
        **result,
        "required": [*result["required"], "model_version"],
        "properties": {
            **result["properties"],
            "model_version": {"type": "string"},
            "explanation": explanation,
        },
    }
    tensor = {
        "type": "object",
        "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string", "enum": ["FP32", "FP64", "INT64", "INT32", "BYTES"]},
            "data": {"type": "array"},
            "parameters": {"type": "object"},
        },
    }
    ok_json = {"type": "object"}
    text = {"content": {"text/plain": {"schema": {"type": "string"}}}}
    name_schema: dict[str, Any] = {"type": "string"}
    if model is not None:
        name_schema = {"type": "string", "enum": [model.name]}
    name_param = [{"name": "model_name", "in": "path", "required": True, "schema": name_schema}]
    paths: dict[str, Any] = {
        "/": {
            "get": {
                "summary": "The web page: a patient form and the model card",
                "responses": {"200": {"description": "HTML page", "content": {"text/html": {}}}},
            }
        },
        "/assets/{filename}": {
            "get": {
                "summary": "Static files of the web page (app.js, style.css)",
                "parameters": [
                    {
                        "name": "filename",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "enum": sorted(static_files)},
                    }
                ],
                "responses": {"200": {"description": "The file"}, **_errors(404)},
            }
        },
        "/predict": {
            "post": {
                "summary": "Predict the readmission class of one patient",
                "parameters": [
                    {
                        "name": "explain",
                        "in": "query",
                        "required": False,
                        "description": "true: add the top contributing inputs (occlusion)",
                        "schema": {"type": "string", "enum": ["true", "false", "1", "0"]},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["features"],
                                "properties": {
                                    "features": {"$ref": "#/components/schemas/Features"}
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(single, "The prediction"),
                    **_errors(400, 413, 415, 422, 503),
                },
            }
        },
        "/predict/batch": {
            "post": {
                "summary": f"Predict up to {batch_limit} patients (PREDICT_BATCH_LIMIT)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "oneOf": [
                                    {
                                        "type": "object",
                                        "required": ["instances"],
                                        "properties": {
                                            "instances": {
                                                "type": "array",
                                                "minItems": 1,
                                                "maxItems": batch_limit,
                                                "items": {"$ref": "#/components/schemas/Features"},
                                            }
                                        },
                                    },
                                    {
                                        "type": "array",
                                        "minItems": 1,
                                        "maxItems": batch_limit,
                                        "items": {"$ref": "#/components/schemas/Features"},
                                    },
                                ]
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "predictions": {"type": "array", "items": result},
                                "model_version": {"type": "string"},
                                "count": {"type": "integer"},
                            },
                        },
                        "One result per row, in order",
                    ),
                    **_errors(400, 413, 415, 422, 503),
                },
            }
        },
        "/health": {"get": {"summary": "Liveness", "responses": {"200": _json(ok_json, "Alive")}}},
        "/ready": {
            "get": {
                "summary": "Readiness: 200 once a model is loaded",
                "responses": {"200": _json(ok_json, "Ready"), **_errors(503)},
            }
        },
        "/model-info": {
            "get": {
                "summary": "Name, version, metrics, classes, input schema; the pending "
                "challenger, the last promotion decision and the latest drift report (or null)",
                "responses": {"200": _json(ok_json, "Model card"), **_errors(503)},
            }
        },
        "/model/learning-curve.png": {
            "get": {
                "summary": "The learning-curve plot named in the metadata",
                "responses": {
                    "200": {"description": "PNG", "content": {"image/png": {}}},
                    **_errors(404, 503),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "Prometheus text", **text}},
            }
        },
        "/openapi.json": {
            "get": {"summary": "This document", "responses": {"200": _json(ok_json, "OpenAPI 3.1")}}
        },
        "/v2": {
            "get": {
                "summary": "KServe V2 server metadata",
                "responses": {"200": _json(ok_json, "Server metadata")},
            }
        },
        "/v2/health/live": {
            "get": {"summary": "KServe V2 liveness", "responses": {"200": _json(ok_json, "Live")}}
        },
        "/v2/health/ready": {
            "get": {
                "summary": "KServe V2 readiness",
                "responses": {"200": _json(ok_json, "Ready"), **_errors(503)},
            }
        },
        "/v2/models/{model_name}": {
            "get": {
                "summary": "KServe V2 model metadata (inputs, outputs)",
                "parameters": name_param,
                "responses": {"200": _json(ok_json, "Model metadata"), **_errors(404, 503)},
            }
        },
        "/v2/models/{model_name}/ready": {
            "get": {
                "summary": "KServe V2 model readiness",
                "parameters": name_param,
                "responses": {"200": _json(ok_json, "Ready"), **_errors(404, 503)},
            }
        },
        "/v2/models/{model_name}/infer": {
            "post": {
                "summary": "KServe V2 inference: one [N,1] tensor per feature (FP32 or BYTES)",
                "parameters": name_param,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["inputs"],
                                "properties": {
                                    "id": {"type": "string"},
                                    "inputs": {"type": "array", "items": tensor},
                                    "outputs": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "properties": {"name": {"type": "string"}},
                                        },
                                    },
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "model_name": {"type": "string"},
                                "model_version": {"type": "string"},
                                "id": {"type": "string"},
                                "outputs": {"type": "array", "items": tensor},
                            },
                        },
                        "Label and probabilities",
                    ),
                    **_errors(400, 404, 413, 415, 422, 503),
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Hospital readmission predict function",
            "version": model.version if model is not None else "no-model",
            "description": "Predicts whether a diabetic patient is readmitted (NO, >30 days, "
            "<30 days). Errors are JSON objects {error, field, kind}.",
        },
        "paths": paths,
        "components": {
            "schemas": {
                "Features": _feature_schema(model),
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {"type": "string"},
                        "field": {"type": ["string", "null"]},
                        "kind": {"type": "string"},
                        "row": {"type": "integer"},
                        "allowed": {"type": "array", "items": {"type": "string"}},
                    },
                },
            }
        },
        "x-max-body-bytes": max_body,
    }
