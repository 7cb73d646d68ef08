"""Prometheus metrics of the predict function (names are part of the contract: docs/predict.md).

One worker process (functions-framework's default `WORKERS=1`) keeps its metrics in memory.
With several gunicorn workers (`WORKERS=2` on a 2-core machine: each worker is a process with
its own interpreter lock), a scrape reaches one worker at random, so the counters, the
latency histogram and the in-progress gauge are kept in prometheus-client's multiprocess files
instead and every scrape sums all workers: `PROMETHEUS_MULTIPROC_DIR` when set (it must be an
empty folder at start; the container's is), else a fresh temporary folder created here, at
import, before prometheus-client reads the variable. `process_*` metrics are left out then
(they would describe whichever worker answered). `predict_model_info` always describes the
model of the worker that answered the scrape (workers swap within one poll interval).
"""

from __future__ import annotations

import atexit
import collections
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _worker_processes() -> int:
    try:
        return int(os.environ.get("WORKERS", "1"))  # functions-framework's gunicorn workers
    except ValueError:
        return 1


def _multiprocess_dir() -> str | None:
    """The multiprocess folder: PROMETHEUS_MULTIPROC_DIR, or a new one when WORKERS > 1."""
    configured = os.environ.get(MULTIPROCESS_ENV, "").strip()
    if configured:
        os.makedirs(configured, exist_ok=True)
        return configured
    if _worker_processes() <= 1:
        return None
    folder = tempfile.mkdtemp(prefix="predict-metrics-")
    os.environ[MULTIPROCESS_ENV] = folder  # inherited by the forked workers
    creator = os.getpid()

    def remove() -> None:  # in the process that made it (gunicorn's master), not in a worker
        if os.getpid() == creator:
            shutil.rmtree(folder, ignore_errors=True)

    atexit.register(remove)
    return folder


MULTIPROCESS_DIR = _multiprocess_dir()

# prometheus-client picks its value storage from the environment when first imported.
from prometheus_client import (  # noqa: E402
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client import (  # noqa: E402
    PROCESS_COLLECTOR as _PROCESS,
)
from prometheus_client.core import InfoMetricFamily  # noqa: E402
from prometheus_client.registry import Collector  # noqa: E402

from readmission.serving.model import LoadedModel  # noqa: E402

if MULTIPROCESS_DIR is not None and values.ValueClass is values.MutexValue:
    values.ValueClass = values.get_value_class()  # imported before the variable was set

disable_created_metrics()  # no *_created series: smaller, steadier /metrics
# Where the metrics are defined (and, in one process, read from).
REGISTRY = CollectorRegistry(auto_describe=True)

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
    multiprocess_mode="livesum",
)
MODEL_SWAPS = Counter(
    "predict_model_loads", "Models loaded (first load and hot swaps).", registry=REGISTRY
)


class ModelInfoCollector(Collector):
    """`predict_model_info{name, version, algorithm, sha256} 1`: the model this process serves
    (read at scrape time, so it is right in every worker without shared state)."""

    def __init__(self) -> None:
        self.labels: dict[str, str] | None = None

    def collect(self) -> Iterator[InfoMetricFamily]:
        family = InfoMetricFamily("predict_model", "The model being served.")
        if self.labels is not None:
            family.add_metric([], self.labels)
        yield family


MODEL_INFO = ModelInfoCollector()
REGISTRY.register(MODEL_INFO)


def _scrape_registry() -> CollectorRegistry:
    """What /metrics renders: this process's registry, or every worker's files summed."""
    if MULTIPROCESS_DIR is None:
        REGISTRY.register(_PROCESS)
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=MULTIPROCESS_DIR)
    registry.register(MODEL_INFO)
    return registry


SCRAPE_REGISTRY = _scrape_registry()
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


def count_predictions(labels: Sequence[str]) -> None:
    """Count predicted rows by predicted class."""
    if len(labels) == 1:
        prediction_counter(labels[0]).inc()
        return
    for label, n in collections.Counter(labels).items():
        prediction_counter(label).inc(n)


def record_model(model: LoadedModel) -> None:
    MODEL_INFO.labels = {
        "name": model.name,
        "version": model.version,
        "algorithm": str(model.metadata.get("algorithm", "")),
        "sha256": str(model.metadata.get("model_sha256", "")),
    }
    MODEL_SWAPS.inc()


def forget_dead_workers() -> None:
    """Drop the live-gauge files of worker processes that no longer run (a worker gunicorn
    replaced after a crash would otherwise keep its last in-progress count). Called in each
    new worker."""
    if MULTIPROCESS_DIR is None:
        return
    for name in os.listdir(MULTIPROCESS_DIR):
        stem = name.rsplit(".", 1)[0]
        if not stem.startswith("gauge_live"):
            continue
        pid_text = stem.rsplit("_", 1)[-1]
        if pid_text.isdigit() and not _running(int(pid_text)):
            multiprocess.mark_process_dead(int(pid_text), MULTIPROCESS_DIR)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def register_collector(collector: Collector) -> None:
    """Export a collector read at scrape time (like `predict_model_info`) in every worker."""
    REGISTRY.register(collector)
    if SCRAPE_REGISTRY is not REGISTRY:
        SCRAPE_REGISTRY.register(collector)


def render() -> bytes:
    return generate_latest(SCRAPE_REGISTRY)
