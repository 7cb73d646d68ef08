"""predict: the scale-to-zero prediction function (functions-framework, HTTP signature).

    functions-framework --target predict --source functions/predict/main.py --port 8080

One entry point `predict(request)` routes every path (see readmission.serving.routes.ROUTES
and docs/predict.md): the original JSON API (/predict, /predict/batch), health and readiness,
the model card, Prometheus /metrics, the KServe V2 protocol under /v2, the OpenAPI document and
the web page. The model lifecycle lives in readmission.serving (transport-free), the flask and
gunicorn glue in readmission.glue; this module only maps requests onto them. Bad input always
answers 4xx with {"error", "field", "kind"}.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flask

from readmission.glue import heap, http_close, slow_clients
from readmission.glue.responses import error_response, json_response, raw_response
from readmission.serving import metrics, v2
from readmission.serving.assets import ModelAssets
from readmission.serving.decisions import GateDocuments
from readmission.serving.drift import DriftDocument
from readmission.serving.errors import InputError, ModelNotReady
from readmission.serving.examples import example_for
from readmission.serving.explain import (
    explain_requested,
    explanation_output,
    with_explanation,
)
from readmission.serving.forking import register_fork_hooks
from readmission.serving.inputs import check_batch_size
from readmission.serving.log_spool import FEATURES
from readmission.serving.model import LoadedModel
from readmission.serving.openapi import build_openapi
from readmission.serving.prediction_log import log_from_settings, request_id
from readmission.serving.realized import RealizedGauges
from readmission.serving.request_json import read_json, read_json_bytes
from readmission.serving.routes import Router
from readmission.serving.server import ModelServer
from readmission.serving.settings import ServingSettings
from readmission.serving.sources import source_from_settings
from readmission.serving.static_files import PAGE_HEADERS, load_static

log = logging.getLogger("predict")
logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper())

SETTINGS = ServingSettings.from_env()
SERVER = ModelServer(source_from_settings(SETTINGS), SETTINGS)
SERVER.on_swap.append(metrics.record_model)
GATE = GateDocuments.for_source(SERVER.source)  # challenger, last decision: informational
SERVER.on_poll.append(GATE.refresh)  # read by the poll thread, never on a request
DRIFT = DriftDocument.for_source(SERVER.source)  # the latest drop's drift report
SERVER.on_poll.append(DRIFT.refresh)
metrics.register_collector(DRIFT)
ASSETS = ModelAssets(SERVER.source)
REALIZED = RealizedGauges(SERVER.source)  # the outcomes function's latest realized metrics
SERVER.on_poll.append(REALIZED.refresh)
metrics.register_collector(REALIZED)

STATIC = load_static(Path(__file__).resolve().parent / "static")
HEAP_TRIM = heap.IdleHeapTrim()  # freed heap pages go back once a worker is quiet for 0.2 s
# Every answered prediction: spooled by the workers, shipped to the predictions-log bucket
# as Parquet by a thread of this process (gunicorn's master), which then trims its heap.
PREDICTION_LOG = log_from_settings(SETTINGS, after_write=heap.release_freed_memory)
REQUEST_ID_HEADER = "X-Request-Id"  # carried by the request, or made here; always answered

if SETTINGS.load_mode == "eager":
    SERVER.try_load()  # before gunicorn binds: fetched and checked; each worker builds its session
else:
    SERVER.start_background_load()  # overlaps the model fetch with the server start

http_close.install()  # the sync worker lingers after a reply only when that protects it
slow_clients.install()  # header and body read timeouts: docs/reliability.md
register_fork_hooks(SERVER, metrics.forget_dead_workers)


def _not_ready() -> flask.Response:
    body = {"error": "no model is loaded", "field": None, "kind": "model_not_ready"}
    return json_response({**body, "detail": SERVER.last_error}, 503)


# ---- prediction endpoints -------------------------------------------------------------------
def _predict_one(request: flask.Request, params: dict[str, str]) -> flask.Response:
    body, raw = read_json_bytes(request, SETTINGS.max_body_bytes)
    features = body.get("features") if isinstance(body, dict) else None
    if not isinstance(features, dict):
        raise InputError(
            'the body must be a JSON object {"features": {column: value, ...}}',
            "features",
            kind="invalid_body",
        )
    explain = explain_requested(request.args.get("explain"))  # 400 unless true/false/absent
    model = SERVER.require_model()
    try:
        label, probabilities, warnings = model.predict_one(features)
    except InputError as error:
        error.row = None
        raise
    metrics.prediction_counter(label).inc()
    result: dict[str, Any] = {
        "readmission_prediction": label,
        "probabilities": dict(zip(model.classes, probabilities, strict=True)),
        "model_version": model.version,
    }
    if warnings:
        result["warnings"] = warnings
    if explain:
        result = with_explanation(result, model, features)
    rid = request_id(request.headers.get(REQUEST_ID_HEADER))
    PREDICTION_LOG.record(
        rid, model.version, model.classes, "predict", (label,), (probabilities,), raw, FEATURES
    )
    return _with_request_id(json_response(result), rid)


def _with_request_id(response: flask.Response, rid: str) -> flask.Response:
    response.headers[REQUEST_ID_HEADER] = rid
    return response


def _predict_batch(request: flask.Request, params: dict[str, str]) -> flask.Response:
    body = read_json(request, SETTINGS.max_body_bytes)
    instances = body.get("instances") if isinstance(body, dict) else body
    if not isinstance(instances, list):
        raise InputError(
            'the body must be {"instances": [...]} or a JSON list of instances',
            "instances",
            kind="invalid_body",
        )
    check_batch_size(len(instances), SETTINGS.batch_limit, "instances")
    model = SERVER.require_model()
    labels, probabilities, warnings = model.predict_lists(instances)
    metrics.count_predictions(labels)
    classes = model.classes
    rows: list[dict[str, Any]] = [
        {"readmission_prediction": label, "probabilities": dict(zip(classes, probs, strict=True))}
        for label, probs in zip(labels, probabilities, strict=True)
    ]
    for row, warn in zip(rows, warnings, strict=True):
        if warn:
            row["warnings"] = warn
    rid = request_id(request.headers.get(REQUEST_ID_HEADER))
    PREDICTION_LOG.record_rows(
        rid, model.version, classes, "batch", labels, probabilities, instances
    )
    answer = {"predictions": rows, "model_version": model.version, "count": len(rows)}
    return _with_request_id(json_response(answer), rid)


def _v2_infer(request: flask.Request, params: dict[str, str]) -> flask.Response:
    model = v2.named_model(SERVER.require_model(), params["model_name"])
    body = read_json(request, SETTINGS.max_body_bytes)
    rows, requested = v2.request_rows(model, body)
    check_batch_size(len(rows), SETTINGS.batch_limit, "inputs")
    predictions = model.predict(rows)
    labels = [p.label for p in predictions]
    metrics.count_predictions(labels)
    carried = body.get("id") if isinstance(body.get("id"), str) else None
    rid = request_id(carried or request.headers.get(REQUEST_ID_HEADER))
    if PREDICTION_LOG.enabled:
        probabilities = [[p.probabilities[c] for c in model.classes] for p in predictions]
        PREDICTION_LOG.record_rows(
            rid, model.version, model.classes, "v2", labels, probabilities, rows
        )
    answer = v2.response(model, predictions, carried, requested)
    if requested and v2.EXPLANATION_OUTPUT in requested:  # only when asked for by name
        answer["outputs"].append(explanation_output(model, rows, v2.EXPLANATION_OUTPUT))
    return _with_request_id(json_response(answer), rid)


# ---- everything else ------------------------------------------------------------------------
def _health(request: flask.Request, params: dict[str, str]) -> flask.Response:
    return json_response({"status": "ok"})


def _ready(request: flask.Request, params: dict[str, str]) -> flask.Response:
    model = SERVER.model
    if model is None:
        return _not_ready()
    return json_response({"ready": True, "model_name": model.name, "model_version": model.version})


def _model_info(request: flask.Request, params: dict[str, str]) -> flask.Response:
    model = SERVER.require_model()
    info = model.info()
    info["learning_curve"] = ASSETS.learning_curve_table(model)
    curve = model.metadata.get("learning_curve")
    info["learning_curve_png"] = (
        "/model/learning-curve.png" if isinstance(curve, dict) and curve.get("png") else None
    )
    info["example"] = example_for(model)
    info["batch_limit"] = SETTINGS.batch_limit
    info["loaded_at"] = model.loaded_at
    info["swaps"] = SERVER.swaps
    info.update(GATE.info())  # "challenger", "last_decision": objects or null
    info.update(DRIFT.info())  # "drift": the latest drop's drift report summary, or null
    return json_response(info)


def _learning_curve_png(request: flask.Request, params: dict[str, str]) -> flask.Response:
    data = ASSETS.learning_curve_png(SERVER.require_model())
    if data is None:
        raise InputError("the model has no learning-curve plot", None, kind="not_found", status=404)
    return raw_response(data, "image/png", {"Cache-Control": "max-age=60"})


def _metrics(request: flask.Request, params: dict[str, str]) -> flask.Response:
    return raw_response(metrics.render(), content_type=metrics.CONTENT_TYPE)


def _openapi_document(model: LoadedModel | None) -> dict[str, Any]:
    static = [name for name in STATIC if name != "index.html"]
    return build_openapi(model, SETTINGS.batch_limit, SETTINGS.max_body_bytes, static)


def _openapi(request: flask.Request, params: dict[str, str]) -> flask.Response:
    return raw_response(ASSETS.openapi(SERVER.model, _openapi_document), "application/json")


def _page(request: flask.Request, params: dict[str, str]) -> flask.Response:
    data, mimetype = STATIC["index.html"]
    return raw_response(data, mimetype, PAGE_HEADERS)


def _static(request: flask.Request, params: dict[str, str]) -> flask.Response:
    found = STATIC.get(params["filename"]) if params["filename"] != "index.html" else None
    if found is None:
        raise InputError("no such file", "filename", kind="not_found", status=404)
    return raw_response(found[0], found[1], PAGE_HEADERS)


def _v2_server(request: flask.Request, params: dict[str, str]) -> flask.Response:
    model = SERVER.model
    return json_response(v2.server_metadata(model.version if model is not None else ""))


def _v2_live(request: flask.Request, params: dict[str, str]) -> flask.Response:
    return json_response({"live": True})


def _v2_ready(request: flask.Request, params: dict[str, str]) -> flask.Response:
    return json_response({"ready": True}) if SERVER.ready else _not_ready()


def _v2_model(request: flask.Request, params: dict[str, str]) -> flask.Response:
    model = v2.named_model(SERVER.require_model(), params["model_name"])
    return json_response(v2.model_metadata(model))


def _v2_model_ready(request: flask.Request, params: dict[str, str]) -> flask.Response:
    model = v2.named_model(SERVER.require_model(), params["model_name"])
    return json_response({"name": model.name, "ready": True})


Handler = Callable[[flask.Request, dict[str, str]], flask.Response]
# (method, template) -> (handler, metrics endpoint label or None); must equal ROUTES
ROUTER: Router[tuple[Handler, str | None]] = Router(
    {
        ("GET", "/"): (_page, None),
        ("GET", "/assets/{filename}"): (_static, None),
        ("POST", "/predict"): (_predict_one, "predict"),
        ("POST", "/predict/batch"): (_predict_batch, "batch"),
        ("GET", "/health"): (_health, None),
        ("GET", "/ready"): (_ready, None),
        ("GET", "/model-info"): (_model_info, None),
        ("GET", "/model/learning-curve.png"): (_learning_curve_png, None),
        ("GET", "/metrics"): (_metrics, None),
        ("GET", "/openapi.json"): (_openapi, None),
        ("GET", "/v2"): (_v2_server, None),
        ("GET", "/v2/health/live"): (_v2_live, None),
        ("GET", "/v2/health/ready"): (_v2_ready, None),
        ("GET", "/v2/models/{model_name}"): (_v2_model, None),
        ("GET", "/v2/models/{model_name}/ready"): (_v2_model_ready, None),
        ("POST", "/v2/models/{model_name}/infer"): (_v2_infer, "v2_infer"),
    }
)


def _observed(
    handler: Handler, endpoint: str, request: flask.Request, params: dict[str, str]
) -> flask.Response:
    """Run a prediction handler with the request metrics."""
    metrics.IN_PROGRESS.inc()
    started = time.perf_counter()
    try:
        response = _answer(handler, request, params, endpoint)
    finally:
        metrics.IN_PROGRESS.dec()
    metrics.latency(endpoint).observe(time.perf_counter() - started)
    metrics.request_counter(endpoint, response.status_code).inc()
    if (request.content_length or 0) >= heap.TRIM_AFTER_BYTES:
        HEAP_TRIM.large_request_done()  # what parsing a large batch left in the heap
    return response


def _answer(
    handler: Handler, request: flask.Request, params: dict[str, str], endpoint: str | None
) -> flask.Response:
    try:
        return handler(request, params)
    except InputError as error:
        if endpoint is not None:
            metrics.ERRORS.labels(error.kind).inc()
        return error_response(error)
    except ModelNotReady:
        if endpoint is not None:
            metrics.ERRORS.labels("model_not_ready").inc()
        return _not_ready()
    except Exception:
        log.exception("unexpected error answering %s %s", request.method, request.path)
        if endpoint is not None:
            metrics.ERRORS.labels("internal").inc()
        return json_response({"error": "internal error", "field": None, "kind": "internal"}, 500)


def predict(request: flask.Request) -> flask.Response:
    """functions-framework entry point: routes every path of the predict function."""
    SERVER.ensure_serving()
    path = request.path if request.path == "/" else request.path.rstrip("/")
    routed = ROUTER.route(request.method, path)
    if isinstance(routed, int):
        kind = "not_found" if routed == 404 else "method_not_allowed"
        message = f"{request.method} {path}: {kind.replace('_', ' ')}"
        return json_response({"error": message, "field": None, "kind": kind}, routed)
    (handler, endpoint), params = routed
    if endpoint is None:
        return _answer(handler, request, params, None)
    return _observed(handler, endpoint, request, params)
