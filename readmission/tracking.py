"""MLflow helpers for the training step: one run per training job, found again by its tags.

A job's run carries the tags `job_key` (the job spec's key) and `dataset_id`, and the
deterministic name `<dataset_id>-<ii>-<algorithm>`. A run is *complete* when it is FINISHED and
carries the tag `readmission.complete=true`, which is set after the model was logged, as the
last write before the run is terminated.

The sklearn model is logged in MLflow's default skops format. skops refuses to load types it
does not trust (e.g. `sklearn.tree._tree.Tree`), so `log_pipeline` records TRUSTED_TYPES in the
MLmodel file (`skops_trusted_types`); `mlflow.sklearn.load_model(uri)` then needs nothing else
than `MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true` (see `load_pipeline`).
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import mlflow.sklearn
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.models.model import ModelInfo
from sklearn.pipeline import Pipeline

log = logging.getLogger(__name__)

JOB_KEY_TAG = "job_key"
# The content address of a fit (readmission.job_spec.JobSpec.fit_id): runs are found and reused
# by it, so the same rows, algorithm, parameters and code are never fitted twice.
FIT_ID_TAG = "fit_id"
DATASET_TAG = "dataset_id"
COMPLETE_TAG = "readmission.complete"
MODEL_NAME = "model"
ALLOW_DESERIALIZATION = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
# Rows of the training frame stored as the model's input example.
INPUT_EXAMPLE_ROWS = 3
_PACKAGE = "readmission-pipeline"
_REPO_ROOT = Path(__file__).resolve().parent.parent


def client_for(tracking_uri: str) -> MlflowClient:
    """A client for one tracking server; also points the fluent API (log_model) at it.

    Unless the environment says otherwise, MLflow does not print "View run ... at <url>" when a
    run ends (`MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT`, default here "true"): a function's log
    has no use for it, and MLflow reads the run once more to build it."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(client: MlflowClient, name: str) -> str:
    """Id of the experiment `name`, created if missing (safe when workers race to create it)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    try:
        return str(client.create_experiment(name))
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return str(experiment.experiment_id)


def run_name(dataset_id: str, cumulative_index: int, algorithm: str) -> str:
    return f"{dataset_id}-{cumulative_index:02d}-{algorithm}"


def job_runs(client: MlflowClient, exp_id: str, job_key: str) -> list[Run]:
    """Every active (not deleted) run of the job, oldest first (then by run id)."""
    runs = client.search_runs(
        [exp_id],
        filter_string=f"tags.{JOB_KEY_TAG} = '{job_key}'",
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=1000,
    )
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def fit_runs(client: MlflowClient, exp_id: str, fit_id: str) -> list[Run]:
    """Every active (not deleted) run of the fit, oldest first (then by run id)."""
    runs = client.search_runs(
        [exp_id],
        filter_string=f"tags.{FIT_ID_TAG} = '{fit_id}'",
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=1000,
    )
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def is_complete(run: Run) -> bool:
    return run.info.status == "FINISHED" and run.data.tags.get(COMPLETE_TAG) == "true"


def discard_incomplete(client: MlflowClient, runs: list[Run]) -> list[Run]:
    """Mark every incomplete run (RUNNING/FAILED/KILLED, or FINISHED without its model) of a
    killed attempt FAILED and delete it; return the complete runs.

    The broker redelivers a job only after the previous attempt failed or timed out, so an
    incomplete run is stale. Should its attempt still be alive, its next MLflow write fails on
    the deleted run and it raises (the redelivery then reuses whichever run completed).
    """
    complete = []
    for run in runs:
        if is_complete(run):
            complete.append(run)
            continue
        run_id = run.info.run_id
        log.warning("deleting stale run %s (status %s) of job", run_id, run.info.status)
        if run.info.status == "RUNNING":
            client.set_terminated(run_id, status="FAILED")
        client.delete_run(run_id)
    return complete


def keep_first_complete(client: MlflowClient, runs: list[Run]) -> Run | None:
    """The oldest complete run; other complete runs (concurrent twins) are deleted so exactly
    one finished run per job remains, whichever attempt converges first."""
    complete = [run for run in runs if is_complete(run)]
    if not complete:
        return None
    keep, *twins = complete
    for twin in twins:
        log.warning("deleting duplicate run %s (keeping %s)", twin.info.run_id, keep.info.run_id)
        client.delete_run(twin.info.run_id)
    return keep


@functools.cache
def code_version() -> str:
    """CODE_VERSION if set, else `git describe` of the checkout, else the package version."""
    explicit = os.environ.get("CODE_VERSION", "").strip()
    if explicit:
        return explicit
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=_REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        if described:
            return described
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return metadata.version(_PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown"


def warm_up() -> None:
    """Import what the first model log would import lazily (skops, pyfunc: seconds), so a
    function process pays it at start-up instead of in its first job."""
    import mlflow.models.utils
    import mlflow.pyfunc  # noqa: F401
    import skops.io  # noqa: F401


def _param_value(value: Any) -> str:
    return "None" if value is None else str(value)[:500]


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """A run's params in one request (before its model: MLflow copies them to it)."""
    client.log_batch(
        run_id,
        params=[Param(name, _param_value(value)) for name, value in sorted(params.items())],
    )


def _metrics(values: Mapping[str, float | None], now: int, model_id: str | None) -> list[Metric]:
    return [
        Metric(name, float(value), now, 0, model_id=model_id)
        for name, value in sorted(values.items())
        if value is not None
    ]


def complete_run(
    client: MlflowClient,
    run_id: str,
    model_metrics: Mapping[str, float | None],
    model_id: str,
    run_metrics: Mapping[str, float] | None = None,
    tags: Mapping[str, str] | None = None,
) -> None:
    """End a run whose params and model are logged: its metrics and the COMPLETE_TAG in one
    request (None metrics are skipped), then status FINISHED.

    `model_metrics` are also the logged model's (MLflow 3 links them to it by `model_id`);
    `run_metrics` are the run's alone; `tags` are set in the same request as COMPLETE_TAG (a
    complete run always has them). Metrics are logged after the model on purpose: metrics
    already on the run when a model is logged make MLflow re-read each one's history to link
    it (one request per metric: ~28 more requests per run here)."""
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=_metrics(model_metrics, now, model_id) + _metrics(run_metrics or {}, now, None),
        tags=[RunTag(name, value) for name, value in sorted((tags or {}).items())]
        + [RunTag(COMPLETE_TAG, "true")],
    )
    client.set_terminated(run_id, status="FINISHED")


# The types skops does not trust by default that our five pipelines contain (checked for
# every algorithm by tests/test_training.py). Recorded in each MLmodel so loading needs nothing
# more; a static list, because computing it per model costs a full skops dump and load
# (~2 s for a random forest).
TRUSTED_TYPES = (
    "numpy.dtype",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.tree._tree.Tree",
)


def untrusted_types(pipeline: Pipeline) -> list[str]:
    """The types skops will not load without being told to trust them (dumps the model)."""
    import skops.io

    return sorted(skops.io.get_untrusted_types(data=skops.io.dumps(pipeline)))


def pip_requirements() -> list[str]:
    """Pinned requirements of the logged model (given explicitly: MLflow's inference of them
    loads the model in a subprocess, seconds per run)."""
    names = ("scikit-learn", "pandas", "numpy", "scipy", "skops", "cloudpickle")
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


SKLEARN_FORMAT_ENV = "MLFLOW_SKLEARN_FORMAT"
SKLEARN_FORMATS = ("skops", "cloudpickle")


def sklearn_model_format() -> str:
    """MLFLOW_SKLEARN_FORMAT: `skops` (default: loading runs no arbitrary code) or `cloudpickle`
    (about 4x faster to log a 300-tree model, but loading it can run code: only for a tracking
    server and bucket that nobody else can write)."""
    value = os.environ.get(SKLEARN_FORMAT_ENV, "").strip() or "skops"
    if value not in SKLEARN_FORMATS:
        raise ValueError(f"{SKLEARN_FORMAT_ENV} must be one of {', '.join(SKLEARN_FORMATS)}")
    return value


def log_pipeline(run_id: str, pipeline: Pipeline, frame: pd.DataFrame) -> ModelInfo:
    """Log the fitted pipeline as the run's model `model` with signature and input example;
    returns MLflow's ModelInfo (`model_id`: the logged model, which `complete_run` links the
    run's metrics to). The model is also `runs:/<run_id>/model`."""
    example = frame.head(INPUT_EXAMPLE_ROWS)
    signature = infer_signature(example, pipeline.predict(example))
    model_format = sklearn_model_format()
    with (
        mlflow.start_run(run_id=run_id),
        compact_skops_schema(),
        no_serving_input_recheck(),
        no_skops_reload_check(),
    ):
        return mlflow.sklearn.log_model(
            pipeline,
            name=MODEL_NAME,
            signature=signature,
            input_example=example,
            pip_requirements=pip_requirements(),
            serialization_format=model_format,
            skops_trusted_types=list(TRUSTED_TYPES) if model_format == "skops" else None,
        )


class _CompactJson:
    """What skops' writer uses of the json module, with `dumps` ignoring `indent`."""

    loads = staticmethod(json.loads)

    @staticmethod
    def dumps(obj: Any, indent: int | None = None, **kwargs: Any) -> str:
        return json.dumps(obj, **kwargs)


class _SharedPatch:
    """`module.attribute = replacement` while at least one caller is inside `active()`; the
    original is restored when the last one leaves (nested and concurrent use is counted, so
    it is safe from several threads). It patches only if `applies(current value)`: if the
    library has changed what it calls, nothing is changed."""

    def __init__(
        self, module: str, attribute: str, replacement: Any, applies: Callable[[Any], bool]
    ) -> None:
        self._module, self._attribute = module, attribute
        self._replacement, self._applies = replacement, applies
        self._lock = threading.Lock()
        self._users = 0
        self._original: Any = None

    @property
    def original(self) -> Any:
        """What the attribute was before the patch (while it is patched)."""
        return self._original

    @contextmanager
    def active(self) -> Iterator[bool]:
        """Yields whether the patch is in place."""
        try:
            module = importlib.import_module(self._module)
        except ImportError:  # pragma: no cover - both patched libraries are dependencies
            yield False
            return
        with self._lock:
            patched = self._users > 0 or self._applies(getattr(module, self._attribute, None))
            if patched:
                if self._users == 0:
                    self._original = getattr(module, self._attribute)
                    setattr(module, self._attribute, self._replacement)
                self._users += 1
        try:
            yield patched
        finally:
            if patched:
                with self._lock:
                    self._users -= 1
                    if self._users == 0:
                        setattr(module, self._attribute, self._original)


_COMPACT_SKOPS = _SharedPatch("skops.io._persist", "json", _CompactJson, lambda now: now is json)


@contextmanager
def compact_skops_schema() -> Iterator[None]:
    """While inside, skops writes its `schema.json` without indentation.

    skops dumps that schema with `json.dumps(state, indent=2)`, which Python runs in its
    pure-Python encoder (the C one only serves indent=None): ~2/3 of the save time of a
    300-tree model, and the indentation inflates the file uploaded to MLflow for every run.
    skops reads the schema with `json.loads`, so the saved model is the same document. Safe
    to nest and to use from several threads; if skops no longer writes through its module's
    `json`, nothing is changed."""
    with _COMPACT_SKOPS.active():
        yield


def _no_serving_input_recheck(model_uri: str, serving_input: Any) -> None:
    return None


_NO_SERVING_INPUT_RECHECK = _SharedPatch(
    "mlflow.models.utils", "_validate_serving_input", _no_serving_input_recheck, callable
)


@contextmanager
def no_serving_input_recheck() -> Iterator[None]:
    """While inside, MLflow's log_model does not load the saved model a second time to
    predict its input example (`mlflow.models.utils._validate_serving_input`, which
    `mlflow.sklearn.log_model` offers no switch for).

    That check costs a third of log_model's CPU (~0.2 s per run: another skops load of the
    whole model) and its failure is only a logged warning. What it would find is covered
    otherwise: `log_pipeline` predicts the example with the pipeline for the signature, and
    tests/test_training.py serves every algorithm's logged model its serving input example
    through pyfunc, where a failure fails. Safe to nest and to use from several threads; if
    MLflow no longer has that function, nothing is changed."""
    with _NO_SERVING_INPUT_RECHECK.active():
        yield


_RELOAD_CHECK = threading.local()  # depth: this thread is inside no_skops_reload_check


def _skops_load_unless_reload_check(*args: Any, **kwargs: Any) -> Any:
    if getattr(_RELOAD_CHECK, "depth", 0):
        return None
    return _NO_SKOPS_RELOAD_CHECK.original(*args, **kwargs)


_NO_SKOPS_RELOAD_CHECK = _SharedPatch("skops.io", "load", _skops_load_unless_reload_check, callable)


@contextmanager
def no_skops_reload_check() -> Iterator[None]:
    """While inside, in this thread, `skops.io.load` returns None without reading anything:
    MLflow's sklearn flavour loads every model it has just saved in skops format back
    (`mlflow.sklearn._save_model`, no switch), to fail early on types outside
    `skops_trusted_types`. Other threads load as usual.

    That load is ~0.2 CPU s per run (~0.25 s for 300 trees). What it checks is covered: the
    trusted types are the static TRUSTED_TYPES, which tests/test_training.py checks against
    every algorithm's pipeline, and the same tests load every algorithm's logged model
    through pyfunc with them. A model that did not load would fail the aggregator's test
    step loudly (retried, then dead-lettered), not pass unnoticed. Safe to nest and to use
    from several threads; if skops no longer has `skops.io.load`, nothing is changed."""
    _RELOAD_CHECK.depth = getattr(_RELOAD_CHECK, "depth", 0) + 1
    try:
        with _NO_SKOPS_RELOAD_CHECK.active():
            yield
    finally:
        _RELOAD_CHECK.depth -= 1


@contextmanager
def deserialization_allowed() -> Iterator[None]:
    """MLflow refuses to deserialize a model unless MLFLOW_ALLOW_PICKLE_DESERIALIZATION is
    true; our models come from our own tracking server, so allow it for one load."""
    previous = os.environ.get(ALLOW_DESERIALIZATION)
    os.environ[ALLOW_DESERIALIZATION] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ALLOW_DESERIALIZATION, None)
        else:
            os.environ[ALLOW_DESERIALIZATION] = previous


def load_pipeline(model_uri: str) -> Pipeline:
    """The fitted pipeline behind `runs:/<run_id>/model` (or any MLflow model URI)."""
    with deserialization_allowed():
        return mlflow.sklearn.load_model(model_uri)


@dataclass(frozen=True)
class RunRecord:
    """What a result document needs from a complete run."""

    run_id: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)


def run_record(run: Run) -> RunRecord:
    return RunRecord(
        run.info.run_id, dict(run.data.params), dict(run.data.metrics), dict(run.data.tags)
    )
