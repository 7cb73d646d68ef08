"""The aggregator: fan-in of a dataset's training results into one served champion.

Fired by every result object. While a dataset's manifest lists jobs without a result it does
nothing ("waiting k of n"). When all are in, it

1. selects the best result by validation `Settings.selection_metric` (ROC-AUC breaks ties,
   then the job key, i.e. fewer training rows and then the algorithm name);
2. loads that run's model from MLflow and evaluates it ONCE on the held-out test split;
3. exports it to ONNX and checks parity on the WHOLE test split (same argmax, max |Δp| <=
   1e-4): a failure raises, so the event is retried and finally dead-lettered, and nothing is
   registered or written;
4. the gate (readmission.gate, under the decision lease): the selected model (the challenger)
   and the sitting champion are scored on the same rows, this version's test split; the
   challenger is promoted only if it beats the champion by `Settings.gate_margin` and the 95%
   paired-bootstrap lower bound of the difference is above zero. The first model ever is
   promoted without a gate; a challenger that is the champion's own fit (an unchanged
   cumulative set won again) is kept without registering it twice;
5. registers a new model (once per corpus version, see readmission.registry) as
   `Settings.registered_model`, and records the decision (readmission.decisions:
   `decisions/<version>.json`, which fires `io.readmission.decision.made`, and MLflow tags on
   the registered version);
6. logs the learning curve, the ONNX file, the metadata and the test metrics to the winning run;
7. writes `models/<id>/model.onnx` and `learning_curve.{csv,md,png}`, applies the decision
   (promoted: alias `champion` and `champion/metadata.json`, the key predict polls; kept:
   alias `challenger` and `challenger/metadata.json`), and LAST `<id>/metadata.json`.

Idempotent and race-safe: an S3 lease (conditional PUT) serialises invocations per version and
another one every decision, registration converges on one version per corpus version, a
decision is written once (a retry reads and re-applies it, and never undoes a later one),
every object is written only if its bytes differ, and a version whose `<id>/metadata.json`
exists is done.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric

from readmission import contract, decisions, gate, keys, lease, registry, tracking
from readmission.config import Settings
from readmission.features import target_values, to_model_frame
from readmission.learning_curve import (
    build_learning_curve,
    to_csv,
    to_markdown,
    to_png,
    warm_up_png,
)
from readmission.onnx_export import ExportedModel, export_onnx
from readmission.onnx_parity import PARITY_TOLERANCE, ParityReport, check_parity
from readmission.scoring import predict_probabilities, score
from readmission.storage import ObjectStore, json_bytes

log = logging.getLogger(__name__)

TIE_BREAK_METRIC = "roc_auc_ovr"
# The lease is renewed every LEASE_RENEW_SECONDS while the aggregator works, so a killed
# aggregator's lease expires within LEASE_TTL_SECONDS, well inside the LEASE_WAIT_SECONDS its
# redelivered event waits (a 900 s TTL without renewal blocked the dataset for 15 minutes and
# dead-lettered the event: every redelivery waited 120 s and gave up).
LEASE_TTL_SECONDS = 60.0
LEASE_RENEW_SECONDS = 15.0
LEASE_WAIT_SECONDS = 120.0
ARTIFACT_DIR = "aggregate"  # where the winning run gets the aggregator's artifacts
ONNX_SAMPLE_ROWS = 100
MODEL_DESCRIPTION = (
    "Hospital readmission (<30, >30, NO) classifier of the Diabetes 130-US hospitals pipeline. "
    "One version per corpus version (tag dataset_id) whose best run is not the champion's: the "
    "best of its training runs by validation selection metric. Alias `champion` = the version "
    "the predict function serves (as ONNX), moved only by a recorded decision (the gate or an "
    "operator); alias `challenger` = the last version the gate did not promote."
)

Exporter = Callable[[Any, pd.DataFrame], ExportedModel]


class InconsistentRegistry(RuntimeError):
    """The registry holds a version for this dataset that the selection does not explain."""


class InvalidResult(ValueError):
    """A result document that is not the result of the job its key and its manifest name (a
    result written by hand, or an orphan): no retry can fix it, a person must look."""


def read_result(
    store: ObjectStore, settings: Settings, manifest: Mapping[str, Any], key: str
) -> Any:
    """The result document under `key`, checked against its key and its manifest: one of the
    manifest's jobs, naming that job (dataset, cumulative index, algorithm) and the rows of
    that cumulative set. InvalidResult if it is not."""
    where = f"s3://{settings.buckets.results}/{key}"
    if key not in manifest["jobs"]:
        raise InvalidResult(f"{where} is not a job of version {manifest['dataset_id']}")
    try:
        result = json.loads(store.get_bytes(settings.buckets.results, key))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidResult(f"{where} is not JSON: {error}") from error
    dataset_id, index, algorithm = keys.parse_job_key(key)
    rows = manifest["cumulative_sets"][index]["rows"]
    if not isinstance(result, dict):
        raise InvalidResult(f"{where} is not a JSON object")
    named = tuple(result.get(name) for name in ("dataset_id", "cumulative_index", "algorithm"))
    if named != (dataset_id, index, algorithm):
        raise InvalidResult(f"{where} is the result of {named}, not of its key's job")
    if result.get("training_rows") != rows:
        raise InvalidResult(
            f"{where} was trained on {result.get('training_rows')} rows, cumulative set "
            f"{index} holds {rows}"
        )
    return result


@dataclass(frozen=True)
class AggregateOutcome:
    dataset_id: str
    status: str  # no_manifest | waiting | aggregated | already_aggregated
    message: str
    results_found: int = 0
    results_expected: int = 0
    version: str | None = None
    champion_written: bool = False
    decision: str | None = None  # the gate's verdict on this version (promoted | kept)

    def __str__(self) -> str:
        return f"dataset {self.dataset_id}: {self.message}"


# --- pure helpers -------------------------------------------------------------------------


def warm_up() -> None:
    """Pay at process start what the first aggregation would pay on the pipeline's critical
    path (~1.5 s with `warm_up_onnxruntime`): the imports of model loading and ONNX export,
    and matplotlib's first figure (font cache)."""
    tracking.warm_up()
    warm_up_png()


def warm_up_onnxruntime() -> None:
    """Import onnxruntime (~0.4 s), which the parity check uses. Only in the process that
    aggregates, i.e. in gunicorn's worker after the fork, never in its master: importing
    onnxruntime starts a thread, and a forked worker that exits joins its copy of that thread
    and aborts (std::system_error; see readmission.serving.ModelServer)."""
    import onnxruntime  # noqa: F401


def start_onnxruntime_warm_up() -> threading.Thread:
    """`warm_up_onnxruntime` in a thread, for gunicorn's at-fork hook: the hook runs before
    the worker installs its signal handlers, so ~0.4 s of work there loses a SIGTERM sent
    meanwhile. Not a daemon: a worker told to stop lets the import finish before exiting."""
    thread = threading.Thread(target=warm_up_onnxruntime, name="onnxruntime-warm-up")
    thread.start()
    return thread


def lease_key(dataset_id: str) -> str:
    """The aggregator's lease object in the models bucket (fires no event: not in the table)."""
    return f"{dataset_id}/aggregate.lease"


def _score(result: Mapping[str, Any], metric: str) -> float:
    value = result.get("metrics", {}).get("validation", {}).get(metric)
    if not isinstance(value, int | float) or math.isnan(value):
        return -math.inf
    return float(value)


def select_best(results: Sequence[Mapping[str, Any]], metric: str) -> Mapping[str, Any]:
    """Highest validation `metric`; ties: higher validation ROC-AUC, then the smaller job key
    (fewer training rows, then algorithm name). Deterministic for any input order."""
    if not results:
        raise ValueError("no results to select from")
    if all(_score(r, metric) == -math.inf for r in results):
        raise ValueError(f"no result has the validation metric {metric!r} (SELECTION_METRIC)")

    def order(result: Mapping[str, Any]) -> tuple[float, float, str]:
        job = keys.job_name(int(result["cumulative_index"]), str(result["algorithm"]))
        return (-_score(result, metric), -_score(result, TIE_BREAK_METRIC), job)

    return min(results, key=order)


def _plain(value: Any) -> Any:
    """Dataclasses and tuples as plain JSON-able values."""
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def build_metadata(
    *,
    settings: Settings,
    dataset_id: str,
    version: Any,
    best: Mapping[str, Any],
    exported: ExportedModel,
    onnx_sha256: str,
    test_metrics: Mapping[str, Any],
) -> dict[str, Any]:
    """The document design.md fixes for models/<id>/metadata.json and champion/metadata.json."""
    outputs = _plain(exported.outputs)
    return {
        "model_name": settings.registered_model,
        "version": str(version.version),
        "run_id": best["run_id"],
        "dataset_id": dataset_id,
        "algorithm": best["algorithm"],
        "training_rows": int(best["training_rows"]),
        "cumulative_index": int(best["cumulative_index"]),
        "registered_at": registry.registered_at(version),
        "model_bucket": settings.buckets.models,
        "model_key": keys.model_key(dataset_id),
        "model_sha256": onnx_sha256,
        "classes": [str(c) for c in exported.classes],
        "inputs": _plain(exported.inputs),
        "outputs": outputs,
        "metrics": {
            "validation": dict(best["metrics"]["validation"]),
            "test": dict(test_metrics),
        },
        "selection_metric": settings.selection_metric,
        "learning_curve": {
            "csv": keys.learning_curve_key(dataset_id, "csv"),
            "md": keys.learning_curve_key(dataset_id, "md"),
            "png": keys.learning_curve_key(dataset_id, "png"),
        },
    }


def describe(best: Mapping[str, Any], test: Mapping[str, Any], metric: str, dataset_id: str) -> str:
    """The registered version's description: algorithm, rows, validation and test scores, date."""
    validation = best["metrics"]["validation"]

    def fmt(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, int | float) else "n/a"

    return (
        f"{best['algorithm']} trained on {int(best['training_rows']):,} rows "
        f"(dataset {dataset_id}, cumulative set {best['cumulative_index']}, run "
        f"{best['run_id']}). Validation {metric} {fmt(validation.get(metric))}, ROC-AUC "
        f"{fmt(validation.get('roc_auc_ovr'))}; test {metric} {fmt(test.get(metric))}, "
        f"ROC-AUC {fmt(test.get('roc_auc_ovr'))}, accuracy {fmt(test.get('accuracy'))}. "
        f"Selected by validation {metric} on {datetime.now(UTC):%Y-%m-%d}."
    )


# --- object-store helpers -----------------------------------------------------------------


def write_if_changed(
    store: ObjectStore, bucket: str, key: str, data: bytes, content_type: str
) -> bool:
    """PUT unless the object already holds exactly these bytes. True if this call wrote."""
    if store.get_bytes_if_exists(bucket, key) == data:
        return False
    store.put_bytes(bucket, key, data, content_type)
    return True


def read_parquet(store: ObjectStore, bucket: str, key: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(store.get_bytes(bucket, key)))


# --- the step -----------------------------------------------------------------------------


def aggregate_dataset(
    store: ObjectStore,
    settings: Settings,
    dataset_id: str,
    *,
    parity_tolerance: float = PARITY_TOLERANCE,
    exporter: Exporter | None = None,
    lease_ttl: float = LEASE_TTL_SECONDS,
    lease_wait: float = LEASE_WAIT_SECONDS,
    result_key: str | None = None,
) -> AggregateOutcome:
    """Aggregate one dataset if all its results are in (see the module docstring).

    `result_key`: the result whose arrival calls (InvalidResult if the manifest does not list
    it); every result is checked against its key and the manifest before it is used
    (`read_result`)."""
    buckets = settings.buckets
    manifest = store.get_json_if_exists(buckets.datasets, keys.manifest_key(dataset_id))
    if manifest is None:
        # Ingest writes the manifest before the job specs, so results exist only after their
        # manifest: this event is stale (the dataset was removed). Nothing to retry.
        log.warning("no manifest for dataset %s: ignoring the result event", dataset_id)
        return AggregateOutcome(dataset_id, "no_manifest", "no manifest: nothing to aggregate")
    if result_key is not None and result_key not in manifest["jobs"]:
        raise InvalidResult(
            f"s3://{buckets.results}/{result_key} is not a job of version {dataset_id}: an "
            "orphan result"
        )
    expected = list(manifest["jobs"])
    present = set(store.list_keys(buckets.results, f"{dataset_id}/"))
    found = [key for key in expected if key in present]
    if len(found) < len(expected):
        message = f"waiting ({len(found)} of {len(expected)} results)"
        if (
            found
            and len(expected) - len(found) <= settings.prepare_ahead_missing
            and exporter is None
            and PREPARED_AHEAD.prepare(store, settings, manifest, found, parity_tolerance)
        ):
            message += "; the best so far is tested and exported ahead"
        return AggregateOutcome(dataset_id, "waiting", message, len(found), len(expected))
    client = registry.client_for(settings.mlflow_tracking_uri)
    done = _already_aggregated(store, settings, client, dataset_id, len(expected))
    if done is not None:
        return done
    with lease.acquire(
        store,
        buckets.models,
        lease_key(dataset_id),
        ttl_seconds=lease_ttl,
        wait_seconds=lease_wait,
        purpose=f"aggregate {dataset_id}",
        renew_every=min(LEASE_RENEW_SECONDS, lease_ttl / 4),
    ):
        done = _already_aggregated(store, settings, client, dataset_id, len(expected))
        if done is not None:
            return done
        results = [read_result(store, settings, manifest, key) for key in expected]
        return _aggregate(store, settings, client, manifest, results, parity_tolerance, exporter)


def _already_aggregated(
    store: ObjectStore, settings: Settings, client: MlflowClient, dataset_id: str, n: int
) -> AggregateOutcome | None:
    """The outcome if the version is done (its metadata.json, written last, exists), else None."""
    data = store.get_bytes_if_exists(settings.buckets.models, keys.model_metadata_key(dataset_id))
    if data is None:
        return None
    version = str(json.loads(data)["version"])
    message = f"already aggregated (version {version})"
    return AggregateOutcome(dataset_id, "already_aggregated", message, n, n, version)


@dataclass(frozen=True)
class TestedModel:
    """The selected run's model, tested once, exported and its ONNX parity proven."""

    best: Mapping[str, Any]
    test_metrics: dict[str, float | None]
    exported: ExportedModel
    parity: ParityReport
    test_frame: pd.DataFrame  # the version's test rows as the pipeline consumes them
    test_target: np.ndarray
    test_probabilities: np.ndarray  # columns in `classes` order
    classes: tuple[str, ...]


@dataclass(frozen=True)
class Candidate(TestedModel):
    """A TestedModel with the dataset's learning curve: ready to register and publish."""

    curve_files: dict[str, tuple[bytes, str]]  # extension -> (bytes, content type)
    prepared_ahead: bool = False  # the TestedModel came from PreparedAhead

    @property
    def onnx_sha256(self) -> str:
        return hashlib.sha256(self.exported.onnx_bytes).hexdigest()


def test_and_export(
    store: ObjectStore,
    settings: Settings,
    manifest: Mapping[str, Any],
    best: Mapping[str, Any],
    parity_tolerance: float,
    exporter: Exporter | None,
) -> TestedModel:
    """Load `best`'s model, score it once on the held-out test split, export it to ONNX and
    check parity on the WHOLE test split (ParityError: loud, retried, then dead-lettered,
    before anything is registered or written)."""
    test = read_test(store, settings, manifest)
    frame, y_test = to_model_frame(test), target_values(test)
    pipeline = tracking.load_pipeline(best["model_uri"])
    probabilities = predict_probabilities(pipeline, frame)
    # the only look at the test split
    test_metrics = score(probabilities, np.asarray(pipeline.classes_), y_test)
    exported = (exporter or export_onnx)(pipeline, frame.head(ONNX_SAMPLE_ROWS))
    parity = check_parity(
        pipeline, exported.onnx_bytes, frame, tolerance=parity_tolerance, expected=probabilities
    )
    classes = tuple(str(c) for c in pipeline.classes_)
    return TestedModel(best, test_metrics, exported, parity, frame, y_test, probabilities, classes)


def read_test(store: ObjectStore, settings: Settings, manifest: Mapping[str, Any]) -> pd.DataFrame:
    """The version's test rows: every drop's test part, in manifest order."""
    bucket = settings.buckets.datasets
    parts = [read_parquet(store, bucket, key) for key in manifest["test"]["keys"]]
    return parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)


class PreparedAhead:
    """The TestedModel of the best result so far, made while a dataset's last results are
    still being trained (Settings.prepare_ahead_missing; this process only, one at a time, at
    most one kept).

    The last jobs are the smallest (the manifest orders them costliest first) and never fill
    every core: loading, testing and exporting the best model so far (~2 s) then runs beside
    them, and if they do not beat it, the fan-in after the last result only has to register
    and publish. Purely an optimisation: the fan-in re-selects from all results and uses the
    prepared model only if it is the same run, tested on the same split with the same
    tolerance; a lost or wrong guess changes nothing else.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # held while preparing: `take` waits for a preparation
        self._key: tuple[Any, ...] | None = None
        self._tested: TestedModel | None = None

    @staticmethod
    def key(
        manifest: Mapping[str, Any], best: Mapping[str, Any], parity_tolerance: float
    ) -> tuple[Any, ...]:
        return (
            str(manifest["dataset_id"]),
            str(best["run_id"]),
            str(best["model_uri"]),
            tuple(manifest["test"]["keys"]),
            parity_tolerance,
        )

    def prepare(
        self,
        store: ObjectStore,
        settings: Settings,
        manifest: Mapping[str, Any],
        result_keys: Sequence[str],
        parity_tolerance: float,
    ) -> bool:
        """Prepare the best of the results so far (`result_keys`); True if it is prepared.
        Never raises: a failure is logged, and the fan-in will meet it again and report it."""
        with self._lock:
            try:
                results = [read_result(store, settings, manifest, key) for key in result_keys]
                best = select_best(results, settings.selection_metric)
                key = self.key(manifest, best, parity_tolerance)
                if key != self._key:
                    self._key, self._tested = None, None
                    self._tested = test_and_export(
                        store, settings, manifest, best, parity_tolerance, None
                    )
                    self._key = key
                return True
            except Exception:
                log.warning(
                    "dataset %s: could not prepare the best model so far ahead of the last "
                    "result (the fan-in will do it)",
                    manifest.get("dataset_id"),
                    exc_info=True,
                )
                return False

    def take(
        self, manifest: Mapping[str, Any], best: Mapping[str, Any], parity_tolerance: float
    ) -> TestedModel | None:
        """The prepared TestedModel of exactly this selection (then forgotten), else None."""
        with self._lock:
            if self._key != self.key(manifest, best, parity_tolerance):
                return None
            tested, self._key, self._tested = self._tested, None, None
            return tested


PREPARED_AHEAD = PreparedAhead()


def prepare_candidate(
    store: ObjectStore,
    settings: Settings,
    manifest: Mapping[str, Any],
    results: list[dict[str, Any]],
    parity_tolerance: float,
    exporter: Exporter | None,
) -> Candidate:
    """Select, test once, export and check parity (see `test_and_export`), and draw the
    learning curve of all results."""
    dataset_id = str(manifest["dataset_id"])
    best = select_best(results, settings.selection_metric)
    log.info(
        "dataset %s: best of %d results by validation %s is %s (run %s)",
        dataset_id,
        len(results),
        settings.selection_metric,
        keys.job_name(int(best["cumulative_index"]), best["algorithm"]),
        best["run_id"],
    )
    tested = None if exporter is not None else PREPARED_AHEAD.take(manifest, best, parity_tolerance)
    prepared_ahead = tested is not None
    if tested is None:
        tested = test_and_export(store, settings, manifest, best, parity_tolerance, exporter)
    curve = build_learning_curve(dataset_id, results)
    curve_files = {
        "csv": (to_csv(curve), "text/csv"),
        "md": (to_markdown(curve).encode(), "text/markdown"),
        "png": (to_png(curve), "image/png"),
    }
    return Candidate(
        best=tested.best,
        test_metrics=tested.test_metrics,
        exported=tested.exported,
        parity=tested.parity,
        test_frame=tested.test_frame,
        test_target=tested.test_target,
        test_probabilities=tested.test_probabilities,
        classes=tested.classes,
        curve_files=curve_files,
        prepared_ahead=prepared_ahead,
    )


def register(
    client: MlflowClient, settings: Settings, dataset_id: str, candidate: Candidate
) -> tuple[Any, bool]:
    """The dataset's one registered version (created by this call or not)."""
    best, name, metric = candidate.best, settings.registered_model, settings.selection_metric
    version, created = registry.register_once(
        client,
        name,
        best["model_uri"],
        dataset_id,
        tags={
            "selection_metric": metric,
            "algorithm": str(best["algorithm"]),
            "training_rows": str(best["training_rows"]),
            "run_id": str(best["run_id"]),
        },
        description=describe(best, candidate.test_metrics, metric, dataset_id),
    )
    registry.ensure_model_description(client, name, MODEL_DESCRIPTION)
    registered_run = version.tags.get("run_id") or version.run_id
    if registered_run and registered_run != best["run_id"]:
        raise InconsistentRegistry(
            f"version {version.version} of {name} is registered for dataset {dataset_id} from "
            f"run {registered_run}, but the selection picks run {best['run_id']}"
        )
    return version, created


def write_artifacts(store: ObjectStore, settings: Settings, dataset_id: str, c: Candidate) -> None:
    """The version's ONNX model and learning curve in the models bucket (fire no event)."""
    models = settings.buckets.models
    onnx_type = "application/octet-stream"
    write_if_changed(store, models, keys.model_key(dataset_id), c.exported.onnx_bytes, onnx_type)
    for extension, (data, content_type) in c.curve_files.items():
        key = keys.learning_curve_key(dataset_id, extension)
        write_if_changed(store, models, key, data, content_type)


def _aligned(probabilities: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Probability columns in contract.TARGET_CLASSES order (a class a model lacks: 0)."""
    out = np.zeros((len(probabilities), len(contract.TARGET_CLASSES)))
    for column, name in enumerate(classes):
        out[:, contract.TARGET_CLASSES.index(str(name))] = probabilities[:, column]
    return out


def gate_rule(settings: Settings) -> gate.GateRule:
    return gate.GateRule(
        metric=settings.selection_metric,
        margin=settings.gate_margin,
        resamples=settings.gate_resamples,
        seed=settings.gate_seed,
    )


def run_gate(candidate: Candidate, champion_run_id: str, rule: gate.GateRule) -> gate.GateResult:
    """Challenger and champion scored on the same rows: the candidate's test split."""
    champion = tracking.load_pipeline(f"runs:/{champion_run_id}/{tracking.MODEL_NAME}")
    champion_probabilities = predict_probabilities(champion, candidate.test_frame)
    codes = np.array([contract.TARGET_CLASSES.index(str(y)) for y in candidate.test_target])
    return gate.compare(
        rule,
        codes,
        _aligned(candidate.test_probabilities, candidate.classes),
        _aligned(champion_probabilities, [str(c) for c in champion.classes_]),
    )


def _decide(
    store: ObjectStore,
    client: MlflowClient,
    settings: Settings,
    dataset_id: str,
    candidate: Candidate,
) -> tuple[dict[str, Any], Any, bool]:
    """(the decision on this version's challenger, the model version it is about, True if
    this call registered it). Under the decision lease; reads a recorded decision back."""
    best, name = candidate.best, settings.registered_model
    recorded = store.get_json_if_exists(settings.buckets.models, keys.decision_key(dataset_id))
    if recorded is not None:
        version = client.get_model_version(name, recorded["challenger"]["model_version"])
        return recorded, version, False
    current = registry.champion(client, name)
    current_metadata = store.get_json_if_exists(settings.buckets.models, keys.CHAMPION_METADATA_KEY)
    rule = gate_rule(settings)
    result: gate.GateResult | None = None
    gate_seconds = 0.0  # loading the champion, scoring it, the bootstrap
    same_fit = current is not None and registry.run_of(current) == best["run_id"]
    if same_fit:
        version, created = current, False
        verdict = decisions.KEPT
        reason = (
            f"the best model of this version is the champion's own fit (run {best['run_id']}, "
            f"{best['algorithm']} on {int(best['training_rows']):,} rows): nothing to promote"
        )
    else:
        if current is not None:
            gate_started = time.perf_counter()
            result = run_gate(candidate, registry.run_of(current), rule)
            gate_seconds = time.perf_counter() - gate_started
        version, created = register(client, settings, dataset_id, candidate)
        if current is None:
            verdict, reason = decisions.PROMOTED, "first model: there is no champion to beat"
        else:
            verdict = decisions.PROMOTED if result and result.promote else decisions.KEPT
            reason = result.reason if result else ""
    challenger = {
        "model_version": str(version.version),
        "corpus_version": dataset_id,
        "algorithm": str(best["algorithm"]),
        "training_rows": int(best["training_rows"]),
        "run_id": str(best["run_id"]),
        "score": result.challenger_score if result else candidate.test_metrics.get(rule.metric),
    }
    champion = None
    if current is not None:
        champion = {
            "model_version": str(current.version),
            "corpus_version": str(current.tags.get(registry.DATASET_TAG, "")),
            "algorithm": str(current.tags.get("algorithm", "")),
            "training_rows": int(current.tags.get("training_rows") or 0),
            "run_id": registry.run_of(current),
            "score": result.champion_score if result else challenger["score"],
        }
        if current_metadata and str(current_metadata.get("version")) == str(current.version):
            champion = {**decisions.model_summary(current_metadata), "score": champion["score"]}
    promoted = verdict == decisions.PROMOTED
    after = challenger if promoted or champion is None else champion
    decision = {
        "kind": decisions.GATE,
        "sequence": decisions.next_sequence(store, settings),
        "key": keys.decision_key(dataset_id),
        "corpus_version": dataset_id,
        "verdict": verdict,
        "reason": reason,
        "decided_at": decisions.now_iso(),
        "rule": {**rule.as_dict(), "description": rule.describe()},
        "challenger": challenger,
        "champion": champion,
        "difference": result.difference if result else None,
        "interval": list(result.interval) if result else None,
        "rows": result.rows if result else len(candidate.test_target),
        "champion_after": {
            "model_version": after["model_version"],
            "corpus_version": after["corpus_version"],
        },
        "new_model": not same_fit,
        "gate_seconds": round(gate_seconds, 3),
    }
    decision = decisions.record(store, settings, decision)
    _tag_decision(client, name, str(version.version), decision)
    return decision, version, created


def _tag_decision(
    client: MlflowClient, name: str, model_version: str, decision: Mapping[str, Any]
) -> None:
    """The decision on the registered version's MLflow tags (the registry's own record)."""
    tags = {
        f"decision.{decision['corpus_version']}": decision["verdict"],
        "decision.key": decision["key"],
        "decision.verdict": decision["verdict"],
        "decision.reason": str(decision["reason"])[:4000],
        "decision.champion": str((decision.get("champion") or {}).get("model_version", "")),
        "decision.interval": json.dumps(decision.get("interval")),
        "decision.difference": json.dumps(decision.get("difference")),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, model_version, key, value)


def _aggregate(
    store: ObjectStore,
    settings: Settings,
    client: MlflowClient,
    manifest: Mapping[str, Any],
    results: list[dict[str, Any]],
    parity_tolerance: float,
    exporter: Exporter | None,
) -> AggregateOutcome:
    started = time.monotonic()
    dataset_id = str(manifest["dataset_id"])
    candidate = prepare_candidate(store, settings, manifest, results, parity_tolerance, exporter)
    write_artifacts(store, settings, dataset_id, candidate)
    with decisions.decision_lease(store, settings, f"decide {dataset_id}"):
        decision, version, created = _decide(store, client, settings, dataset_id, candidate)
        best, metric = candidate.best, settings.selection_metric
        metadata = build_metadata(
            settings=settings,
            dataset_id=dataset_id,
            version=version,
            best=best,
            exported=candidate.exported,
            onnx_sha256=candidate.onnx_sha256,
            test_metrics=candidate.test_metrics,
        )
        metadata_bytes = json_bytes(metadata)
        if decision["new_model"]:
            _log_to_run(client, best["run_id"], candidate, metadata_bytes)
        applied = decisions.apply(store, client, settings, decision, metadata_bytes)
    write_if_changed(
        store,
        settings.buckets.models,
        keys.model_metadata_key(dataset_id),
        metadata_bytes,
        "application/json",
    )
    promoted = decision["verdict"] == decisions.PROMOTED
    message = (
        f"aggregated: {best['algorithm']} on {int(best['training_rows']):,} rows "
        f"{'registered' if created else 'found registered'} as {settings.registered_model} "
        f"version {version.version}; decision #{decision['sequence']} {decision['verdict']}"
        f"{'' if applied else ' (superseded by a later decision)'}: {decision['reason']}; "
        f"validation {metric} {best['metrics']['validation'].get(metric):.4f}, test {metric} "
        f"{candidate.test_metrics[metric]:.4f}; ONNX parity on {candidate.parity.rows:,} test "
        f"rows (max |dp| {candidate.parity.max_abs_diff:.2g})"
        f"{', tested and exported ahead' if candidate.prepared_ahead else ''}; "
        f"{time.monotonic() - started:.1f}s"
    )
    n = len(results)
    return AggregateOutcome(
        dataset_id,
        "aggregated",
        message,
        n,
        n,
        str(version.version),
        champion_written=promoted and applied,
        decision=str(decision["verdict"]),
    )


def _log_to_run(
    client: MlflowClient, run_id: str, candidate: Candidate, metadata_bytes: bytes
) -> None:
    """The aggregator's artifacts and the test metrics on the winning run (once)."""
    present = {Path(f.path).name for f in client.list_artifacts(run_id, ARTIFACT_DIR)}
    if "metadata.json" in present:
        return
    timestamp = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[
            Metric(f"test_{name}", float(value), timestamp, 0)
            for name, value in sorted(candidate.test_metrics.items())
            if value is not None
        ],
    )
    client.set_tag(run_id, "aggregate.champion", "true")
    with tempfile.TemporaryDirectory(prefix="aggregate-") as tmp:
        folder = Path(tmp)
        (folder / "model.onnx").write_bytes(candidate.exported.onnx_bytes)
        for extension, (data, _) in candidate.curve_files.items():
            (folder / f"learning_curve.{extension}").write_bytes(data)
        # metadata.json last: its presence means the run has all of them.
        client.log_artifacts(run_id, str(folder), ARTIFACT_DIR)
        (folder / "metadata.json").write_bytes(metadata_bytes)
        client.log_artifact(run_id, str(folder / "metadata.json"), ARTIFACT_DIR)
