"""predict: the scale-to-zero prediction function (functions-framework, HTTP signature).

    functions-framework --target predict --source functions/predict/main.py --port 8080

One entry point `predict(request)` routes every path (see readmission.serving_openapi.ROUTES
and docs/predict.md): the original JSON API (/predict, /predict/batch), health and readiness,
the model card, Prometheus /metrics, the KServe V2 protocol under /v2, the OpenAPI document and
the web page. The model lifecycle lives in readmission.serving (transport-free); this module
only maps HTTP onto it. Bad input always answers 4xx with {"error", "field", "kind"}.
"""

from __future__ import annotations

import collections
import csv
import gc
import io
import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flask

try:  # a C JSON codec (base dependency): 3-5x faster on 1000-row batches
    import orjson
except ImportError:  # pragma: no cover - the stdlib then does it all
    orjson = None

try:  # functions-framework serves with gunicorn (see _read_body)
    from gunicorn.http.body import LengthReader as _LengthReader
except ImportError:  # pragma: no cover
    _LengthReader = None

from readmission.glue import heap, http_close
from readmission import serving_metrics as metrics
from readmission import serving_v2 as v2
from readmission.serving import (
    InputError,
    LoadedModel,
    ModelNotReady,
    ModelServer,
    ServingSettings,
)
from readmission.serving_decisions import GateDocuments
from readmission.serving_openapi import EXAMPLE_PATIENT, ROUTES, build_openapi
from readmission.serving_sources import source_from_settings

log = logging.getLogger("predict")
logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper())

SETTINGS = ServingSettings.from_env()
SERVER = ModelServer(source_from_settings(SETTINGS), SETTINGS)
SERVER.on_swap.append(metrics.record_model)
GATE = GateDocuments.for_source(SERVER.source)  # challenger, last decision: informational
SERVER.on_poll.append(GATE.refresh)  # read by the poll thread, never on a request

_STATIC_DIR = Path(__file__).resolve().parent / "static"
_STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
STATIC = {
    path.name: (path.read_bytes(), _STATIC_TYPES.get(path.suffix, "application/octet-stream"))
    for path in _STATIC_DIR.iterdir()
    if path.is_file()
}
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_JSON = "application/json"
HEAP_TRIM = heap.IdleHeapTrim()  # freed heap pages go back once a worker is quiet for 0.2 s
DRAIN_BYTES = 16 * 1024 * 1024  # oversized bodies up to this are read and dropped before 413

if SETTINGS.load_mode == "eager":
    SERVER.try_load()  # before gunicorn binds: fetched and checked; each worker builds its session
else:
    SERVER.start_background_load()  # overlaps the model fetch with the server start


def _before_fork() -> None:
    """gunicorn imports this module in its master, then forks the worker(s). Finish any model
    fetch first (no lock held across the fork; the master builds no onnxruntime session, each
    worker does: see readmission.serving.ModelServer), then freeze every object made so far
    (gc.freeze, as Python's gc documentation advises before forking workers): a worker's
    collections then never write to them, so their pages stay shared with the master (PSS
    of master + 2 workers after the benchmark ~137 instead of ~153 MB, docs/predict.md) and
    a collection scans only what the worker made itself. A model holds no reference cycle, so
    a swapped-out frozen one is still freed (tests/test_serving.py)."""
    SERVER.wait_for_loader()
    gc.freeze()


http_close.install()  # the sync worker lingers after a reply only when that protects it
os.register_at_fork(before=_before_fork, after_in_child=SERVER.after_fork_in_child)
os.register_at_fork(after_in_child=metrics.forget_dead_workers)


# ---- responses ------------------------------------------------------------------------------
def _dumps(body: Any) -> bytes:
    """Compact JSON: orjson when installed, else the stdlib (same document)."""
    if orjson is not None:
        try:
            return orjson.dumps(body)
        except TypeError:  # e.g. an integer beyond 64 bits: the stdlib handles it
            pass
    return json.dumps(body, separators=(",", ":")).encode()


def _loads(data: bytes) -> Any:
    """Parse JSON. orjson first; on its refusal the stdlib decides, so what is accepted and
    how it is read is exactly the stdlib's (NaN/Infinity literals, integers beyond 64 bits,
    lone surrogates are accepted there, then refused or handled by validation). Nesting is
    the exception: beyond orjson's 1,024 levels the stdlib recurses too, so RecursionError
    (raised by either) means "nested too deeply"."""
    if orjson is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            reason = str(exc).lower()
            if "depth" in reason or "recursion" in reason:
                raise RecursionError(str(exc)) from None
    return json.loads(data)


def _json(body: Any, status: int = 200) -> flask.Response:
    return flask.Response(_dumps(body), status, mimetype=_JSON)


def _error(error: InputError) -> flask.Response:
    if not getattr(error, "unread", False):
        return _json(error.to_dict(), error.status)
    # functions-framework reads the whole request body into memory after every non-streamed
    # response (`read_request`); a streamed reply skips that (for an unreadable body that
    # read would fail again, and answer 500). Its connection is marked so that gunicorn's
    # close lingers and drops what the client still sends (readmission.http_close): arriving
    # at a closed socket, it would make the kernel reset the connection and the client could
    # lose the reply. A worker that keeps connections open (THREADS > 1) is told to close
    # this one: its next request could not be found in the unread body.
    body = _dumps(error.to_dict())
    environ = flask.request.environ
    http_close.linger_after_reply(environ)
    message = getattr(getattr(environ.get("wsgi.input"), "reader", None), "req", None)
    if message is not None and hasattr(message, "must_close"):
        message.must_close = True
    return flask.Response(
        iter([body]), error.status, mimetype=_JSON, headers={"Content-Length": str(len(body))}
    )


def _not_ready() -> flask.Response:
    return _json(
        {
            "error": "no model is loaded",
            "field": None,
            "kind": "model_not_ready",
            "detail": SERVER.last_error,
        },
        503,
    )


class BodyTooLarge(InputError):
    """413 for a body above PREDICT_MAX_BODY_BYTES; `unread` if the body is still unread."""

    def __init__(self, limit: int, unread: bool) -> None:
        super().__init__(
            f"the body is larger than {limit} bytes (PREDICT_MAX_BODY_BYTES)",
            None,
            kind="body_too_large",
            status=413,
        )
        self.unread = unread


class UnreadableBody(InputError):
    """400 for a body that cannot be read to its end: a malformed chunked encoding (an invalid
    size line, data longer than its size, a bad extension) or one cut off. gunicorn's reader
    raises an IOError for each; the rest of the connection cannot be framed, so nothing more
    is read from it (`unread`: the reply is streamed and the connection closed after it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"the body cannot be read: {reason}"[:200], None, kind="unreadable_body", status=400
        )
        self.unread = True


def _drain(request: flask.Request, budget: int) -> bool:
    """Read and drop up to `budget` bytes of the body; True if the body is then exhausted."""
    while budget > 0:
        chunk = request.stream.read(min(65536, budget))
        if not chunk:
            return True
        budget -= len(chunk)
    return not request.stream.read(1)


def _read_body(request: flask.Request, most: int) -> bytes:
    """Up to `most` bytes of the request body.

    gunicorn's `wsgi.input` reads its length-delimited reader 1 KiB at a time and copies the
    rest of each 8 KiB socket chunk back on every call (~4 ms of a 1 MB batch). A body with a
    Content-Length that nobody has started reading is read from that reader directly (8 KiB
    socket reads, one copy); anything else (chunked, another server) goes through werkzeug.
    """
    length = request.content_length
    body = request.environ.get("wsgi.input")
    reader = getattr(body, "reader", None)
    buffered = getattr(body, "buf", None)
    if (
        length is not None
        and _LengthReader is not None
        and isinstance(reader, _LengthReader)
        and buffered is not None
        and buffered.tell() == 0
    ):
        return reader.read(min(length, most))
    return request.stream.read(most)


def _read_json(request: flask.Request) -> Any:
    """The JSON body, after checking its size (Content-Length first) and its content type.

    An oversized body up to DRAIN_BYTES is read and dropped before the 413, so the client
    reliably receives the answer (closing a socket with unread data resets the connection);
    a larger one is refused unread.
    """
    limit = SETTINGS.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge(
            limit, unread=length > limit + DRAIN_BYTES or not _drain(request, length)
        )
    # the exact header first: werkzeug's parse of it (for parameters, case) costs ~2 µs
    if request.environ.get("CONTENT_TYPE") != _JSON and request.mimetype != _JSON:
        raise InputError(
            "Content-Type must be application/json", None, kind="unsupported_media_type", status=415
        )
    try:
        data = _read_body(request, limit + 1)
        if len(data) > limit:
            raise BodyTooLarge(limit, unread=not _drain(request, DRAIN_BYTES))
    except OSError as exc:  # gunicorn's chunked-body errors are IOErrors, as a reset is
        raise UnreadableBody(str(exc) or type(exc).__name__) from exc
    try:
        return _loads(data)
    except RecursionError:
        raise InputError(
            "the body is not valid JSON: nested too deeply (at most 1024 levels)",
            None,
            kind="invalid_json",
            status=400,
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(
            f"the body is not valid JSON: {exc}"[:200], None, kind="invalid_json", status=400
        ) from exc


def _check_rows(count: int, field: str) -> None:
    """413 for more rows than PREDICT_BATCH_LIMIT (/predict/batch and V2 infer alike)."""
    if count > SETTINGS.batch_limit:
        raise InputError(
            f"at most {SETTINGS.batch_limit} instances per request (PREDICT_BATCH_LIMIT)",
            field,
            kind="batch_too_large",
            status=413,
        )


def _count(labels: list[str]) -> None:
    if len(labels) == 1:
        metrics.prediction_counter(labels[0]).inc()
        return
    for label, n in collections.Counter(labels).items():
        metrics.prediction_counter(label).inc(n)


# ---- prediction endpoints -------------------------------------------------------------------
def _predict_one(request: flask.Request, params: dict[str, str]) -> flask.Response:
    body = _read_json(request)
    features = body.get("features") if isinstance(body, dict) else None
    if not isinstance(features, dict):
        raise InputError(
            'the body must be a JSON object {"features": {column: value, ...}}',
            "features",
            kind="invalid_body",
        )
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
    return _json(result)


def _predict_batch(request: flask.Request, params: dict[str, str]) -> flask.Response:
    body = _read_json(request)
    instances = body.get("instances") if isinstance(body, dict) else body
    if not isinstance(instances, list):
        raise InputError(
            'the body must be {"instances": [...]} or a JSON list of instances',
            "instances",
            kind="invalid_body",
        )
    _check_rows(len(instances), "instances")
    model = SERVER.require_model()
    labels, probabilities, warnings = model.predict_lists(instances)
    _count(labels)
    classes = model.classes
    rows: list[dict[str, Any]] = [
        {"readmission_prediction": label, "probabilities": dict(zip(classes, probs, strict=True))}
        for label, probs in zip(labels, probabilities, strict=True)
    ]
    for row, warn in zip(rows, warnings, strict=True):
        if warn:
            row["warnings"] = warn
    return _json({"predictions": rows, "model_version": model.version, "count": len(rows)})


def _model_named(params: dict[str, str]) -> LoadedModel:
    model = SERVER.require_model()
    if params["model_name"] != model.name:
        raise InputError(
            f"unknown model {params['model_name']!r}; this server serves {model.name!r}",
            "model_name",
            kind="unknown_model",
            status=404,
        )
    return model


def _v2_infer(request: flask.Request, params: dict[str, str]) -> flask.Response:
    model = _model_named(params)
    body = _read_json(request)
    rows, requested = v2.request_rows(model, body)
    _check_rows(len(rows), "inputs")
    predictions = model.predict(rows)
    _count([p.label for p in predictions])
    request_id = body.get("id") if isinstance(body.get("id"), str) else None
    return _json(v2.response(model, predictions, request_id, requested))


# ---- everything else ------------------------------------------------------------------------
def _health(request: flask.Request, params: dict[str, str]) -> flask.Response:
    return _json({"status": "ok"})


def _ready(request: flask.Request, params: dict[str, str]) -> flask.Response:
    model = SERVER.model
    if model is None:
        return _not_ready()
    return _json({"ready": True, "model_name": model.name, "model_version": model.version})


_learning_curves: dict[str, Any] = {}


def _learning_curve_table(model: LoadedModel) -> list[dict[str, Any]] | None:
    """The learning-curve table: inline in the metadata, or the CSV it names (cached)."""
    curve = model.metadata.get("learning_curve")
    if not isinstance(curve, dict):
        return None
    for key in ("table", "rows"):
        if isinstance(curve.get(key), list):
            return curve[key]
    cache_key = f"csv:{model.token}"
    if cache_key not in _learning_curves:
        table = None
        if isinstance(curve.get("csv"), str):
            try:
                data = SERVER.source.asset(curve["csv"])
            except Exception as exc:
                log.warning("learning-curve CSV unavailable: %s", exc)
                data = None
            if data is not None:
                table = list(csv.DictReader(io.StringIO(data.decode("utf-8", "replace"))))
        _learning_curves[cache_key] = table
    return _learning_curves[cache_key]


def _example(model: LoadedModel) -> dict[str, Any]:
    """The example patient, with any category this model does not know left missing."""
    example = {}
    for spec in model.inputs:
        value = EXAMPLE_PATIENT.get(spec.column)
        if spec.accepted is not None and value not in spec.accepted:
            value = None
        example[spec.column] = value
    return example


def _model_info(request: flask.Request, params: dict[str, str]) -> flask.Response:
    model = SERVER.require_model()
    info = model.info()
    info["learning_curve"] = _learning_curve_table(model)
    curve = model.metadata.get("learning_curve")
    info["learning_curve_png"] = (
        "/model/learning-curve.png" if isinstance(curve, dict) and curve.get("png") else None
    )
    info["example"] = _example(model)
    info["batch_limit"] = SETTINGS.batch_limit
    info["loaded_at"] = model.loaded_at
    info["swaps"] = SERVER.swaps
    info.update(GATE.info())  # "challenger", "last_decision": objects or null
    return _json(info)


def _learning_curve_png(request: flask.Request, params: dict[str, str]) -> flask.Response:
    model = SERVER.require_model()
    curve = model.metadata.get("learning_curve")
    key = curve.get("png") if isinstance(curve, dict) else None
    cache_key = f"png:{model.token}"
    if cache_key not in _learning_curves:
        data = None
        if isinstance(key, str):
            try:
                data = SERVER.source.asset(key)
            except Exception as exc:
                log.warning("learning-curve PNG unavailable: %s", exc)
        _learning_curves[cache_key] = data
    data = _learning_curves[cache_key]
    if data is None:
        raise InputError("the model has no learning-curve plot", None, kind="not_found", status=404)
    return flask.Response(data, 200, mimetype="image/png", headers={"Cache-Control": "max-age=60"})


def _metrics(request: flask.Request, params: dict[str, str]) -> flask.Response:
    return flask.Response(metrics.render(), 200, content_type=metrics.CONTENT_TYPE)


_openapi_cache: dict[str, bytes] = {}


def _openapi(request: flask.Request, params: dict[str, str]) -> flask.Response:
    model = SERVER.model
    key = model.token if model is not None else ""
    if key not in _openapi_cache:
        document = build_openapi(
            model,
            SETTINGS.batch_limit,
            SETTINGS.max_body_bytes,
            [name for name in STATIC if name != "index.html"],
        )
        _openapi_cache.clear()
        _openapi_cache[key] = json.dumps(document, indent=1).encode()
    return flask.Response(_openapi_cache[key], 200, mimetype=_JSON)


def _page(request: flask.Request, params: dict[str, str]) -> flask.Response:
    data, mimetype = STATIC["index.html"]
    return flask.Response(data, 200, mimetype=mimetype, headers=_PAGE_HEADERS)


def _static(request: flask.Request, params: dict[str, str]) -> flask.Response:
    found = STATIC.get(params["filename"]) if params["filename"] != "index.html" else None
    if found is None:
        raise InputError("no such file", "filename", kind="not_found", status=404)
    return flask.Response(found[0], 200, mimetype=found[1], headers=_PAGE_HEADERS)


def _v2_server(request: flask.Request, params: dict[str, str]) -> flask.Response:
    model = SERVER.model
    return _json(v2.server_metadata(model.version if model is not None else ""))


def _v2_live(request: flask.Request, params: dict[str, str]) -> flask.Response:
    return _json({"live": True})


def _v2_ready(request: flask.Request, params: dict[str, str]) -> flask.Response:
    return _json({"ready": True}) if SERVER.ready else _not_ready()


def _v2_model(request: flask.Request, params: dict[str, str]) -> flask.Response:
    return _json(v2.model_metadata(_model_named(params)))


def _v2_model_ready(request: flask.Request, params: dict[str, str]) -> flask.Response:
    model = _model_named(params)
    return _json({"name": model.name, "ready": True})


Handler = Callable[[flask.Request, dict[str, str]], flask.Response]
# (method, template) -> (handler, metrics endpoint label or None)
DISPATCH: dict[tuple[str, str], tuple[Handler, str | None]] = {
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
if set(DISPATCH) != set(ROUTES):  # the OpenAPI document is generated from ROUTES
    raise RuntimeError("DISPATCH and serving_openapi.ROUTES disagree")

_EXACT = {key: value for key, value in DISPATCH.items() if "{" not in key[1]}
_PATTERNS = [
    (method, re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template) + "$"), value)
    for (method, template), value in DISPATCH.items()
    if "{" in template
]


def _route(method: str, path: str) -> tuple[Handler, str | None, dict[str, str]] | int:
    """The handler for a request, or 404/405."""
    method = "GET" if method == "HEAD" else method
    found = _EXACT.get((method, path))
    if found is not None:
        return found[0], found[1], {}
    known_path = any(p == path for _, p in _EXACT)
    for pattern_method, pattern, value in _PATTERNS:
        match = pattern.match(path)
        if match:
            if pattern_method == method:
                return value[0], value[1], match.groupdict()
            known_path = True
    return 405 if known_path else 404


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
        return _error(error)
    except ModelNotReady:
        if endpoint is not None:
            metrics.ERRORS.labels("model_not_ready").inc()
        return _not_ready()
    except Exception:
        log.exception("unexpected error answering %s %s", request.method, request.path)
        if endpoint is not None:
            metrics.ERRORS.labels("internal").inc()
        return _json({"error": "internal error", "field": None, "kind": "internal"}, 500)


def predict(request: flask.Request) -> flask.Response:
    """functions-framework entry point: routes every path of the predict function."""
    SERVER.ensure_serving()
    path = request.path if request.path == "/" else request.path.rstrip("/")
    routed = _route(request.method, path)
    if isinstance(routed, int):
        kind = "not_found" if routed == 404 else "method_not_allowed"
        return _json(
            {
                "error": f"{request.method} {path}: {kind.replace('_', ' ')}",
                "field": None,
                "kind": kind,
            },
            routed,
        )
    handler, endpoint, params = routed
    if endpoint is None:
        return _answer(handler, request, params, None)
    return _observed(handler, endpoint, request, params)
