"""Prometheus metrics of the predict function (names are part of the contract: docs/predict.md)."""

from __future__ import annotations

import functools
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import (
    PROCESS_COLLECTOR as _PROCESS,
)

from readmission.serving import LoadedModel

disable_created_metrics()  # no *_created series: smaller, steadier /metrics
REGISTRY = CollectorRegistry(auto_describe=True)
REGISTRY.register(_PROCESS)

# Buckets for a sub-millisecond model behind a few-ms HTTP stack.
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)

REQUESTS = Counter(
    "predict_requests",
    "Prediction requests by endpoint and HTTP status code.",
    ["endpoint", "code"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "predict_latency_seconds",
    "Time to answer a prediction request (validation, inference, serialisation).",
    ["endpoint"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
PREDICTIONS = Counter(
    "predictions",
    "Predicted rows by predicted class.",
    ["prediction_class"],
    registry=REGISTRY,
)
ERRORS = Counter(
    "predict_errors",
    "Failed prediction requests by error kind.",
    ["kind"],
    registry=REGISTRY,
)
IN_PROGRESS = Gauge(
    "predict_requests_in_progress",
    "Prediction requests being answered now.",
    registry=REGISTRY,
)
MODEL_INFO = Info("predict_model", "The model being served.", registry=REGISTRY)
MODEL_SWAPS = Counter(
    "predict_model_loads", "Models loaded (first load and hot swaps).", registry=REGISTRY
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


# Labelled children, cached: `labels()` costs a lock and a dict lookup per call.
@functools.cache
def request_counter(endpoint: str, code: int) -> Any:
    return REQUESTS.labels(endpoint, str(code))


@functools.cache
def latency(endpoint: str) -> Any:
    return LATENCY.labels(endpoint)


@functools.cache
def prediction_counter(prediction_class: str) -> Any:
    return PREDICTIONS.labels(prediction_class)


def record_model(model: LoadedModel) -> None:
    MODEL_INFO.info(
        {
            "name": model.name,
            "version": model.version,
            "algorithm": str(model.metadata.get("algorithm", "")),
            "sha256": str(model.metadata.get("model_sha256", "")),
        }
    )
    MODEL_SWAPS.inc()


def render() -> bytes:
    return generate_latest(REGISTRY)
