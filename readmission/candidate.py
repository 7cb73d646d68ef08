"""The challenger candidate of a corpus version: its results read and checked, the best one
selected, tested once on the held-out test split, exported to ONNX with its parity proven, and
the learning curve of all results drawn.

Reads the version's result documents (results bucket), its test and validation parts (datasets
bucket) and the selected run's model (MLflow); writes nothing. Contract:

* every result is checked against its key and its manifest before it is used (`read_result`):
  one that is not its key's job, or that does not pin its model files, is an InvalidResult,
  which no retry can fix;
* the selected model is loaded only from a local copy whose every file matches the digests its
  result pins (`load_selected`, readmission.model_files): a model changed in MLflow's artifact
  store after its run is an InvalidResult, before skops reads anything;
* the selection is deterministic for any order of the results and respects noise
  (`select_candidate`, readmission.selection): the candidates within the paired-bootstrap
  noise of the best validation `Settings.selection_metric` (GATE_RESAMPLES, GATE_SEED) are
  tied, and the tie goes to validation ROC-AUC, then more training rows, then the cheaper
  fit. The bootstrap compares the per-row validation probabilities each training job wrote
  beside its result (their sha256 pinned by the result: InvalidResult if they differ); a
  result written before they existed is re-predicted from its verified model;
* the test split is looked at by the selected model only, once (`test_and_export`), and parity
  is checked on the WHOLE test split: a ParityError raises before anything is registered or
  written, so the event is retried and finally dead-lettered;
* PreparedAhead is an optimisation only: a prepared model is used only for exactly the same
  selection, test split and tolerance, so a lost or wrong guess changes no outcome.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from readmission import keys, model_card, model_files, quality, selection, training
from readmission.config import Settings
from readmission.features import build_pipeline, classifier_params, target_values, to_model_frame
from readmission.learning_curve import build_learning_curve, to_csv, to_markdown, to_png
from readmission.onnx_export import ExportedModel, export_onnx
from readmission.onnx_parity import ParityReport, check_parity
from readmission.scoring import predict_probabilities, score
from readmission.storage import ObjectStore

log = logging.getLogger(__name__)

ONNX_SAMPLE_ROWS = 100

Exporter = Callable[[Any, pd.DataFrame], ExportedModel]


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
    try:
        pinned = model_files.parse_digests(result.get(model_files.RESULT_KEY))
    except ValueError as error:
        raise InvalidResult(f"{where}: {error}") from error
    result[model_files.RESULT_KEY] = pinned
    if result.get("training_rows") != rows:
        raise InvalidResult(
            f"{where} was trained on {result.get('training_rows')} rows, cumulative set "
            f"{index} holds {rows}"
        )
    return result


def validation_probabilities(
    store: ObjectStore,
    settings: Settings,
    result: Mapping[str, Any],
    validation_frame: pd.DataFrame,
) -> tuple[np.ndarray, tuple[str, ...]]:
    """(probabilities on the version's validation rows, their class columns) of one result:
    the object its training job wrote, checked against the sha256 the result pins
    (InvalidResult otherwise); for a result without one, its verified model's prediction."""
    entry = result.get(training.VALIDATION_PROBABILITIES)
    job = selection.job_of(result)
    data, classes, pinned = None, (), ""
    if entry is not None:
        try:
            data = store.get_bytes_if_exists(settings.buckets.results, str(entry["key"]))
            classes = tuple(str(c) for c in entry["classes"])
            pinned = str(entry["sha256"])
        except (KeyError, TypeError) as error:
            message = f"result {job}: malformed validation probabilities {entry!r}"
            raise InvalidResult(message) from error
    if data is None:  # a result written before they existed, or the object is gone
        log.warning("result %s: no validation probabilities stored, predicting them", job)
        pipeline = load_selected(result)
        values = predict_probabilities(pipeline, validation_frame)
        return values, tuple(str(c) for c in pipeline.classes_)
    if hashlib.sha256(data).hexdigest() != pinned:
        raise InvalidResult(f"result {job}: validation probabilities differ from their sha256")
    values = training.read_probabilities(data)
    if values.shape != (len(validation_frame), len(classes)):
        raise InvalidResult(
            f"result {job}: validation probabilities of shape {values.shape}, expected "
            f"({len(validation_frame)}, {len(classes)})"
        )
    return values, classes


def select_candidate(
    store: ObjectStore,
    settings: Settings,
    results: Sequence[Mapping[str, Any]],
    validation: pd.DataFrame,
    memo: MutableMapping[str, np.ndarray] | None = None,
) -> selection.Selection:
    """The noise-aware selection (readmission.selection) of `results` on the version's
    validation rows (`read_validation`), with the gate's resamples and seed; `memo`: see
    readmission.selection.select."""
    frame, target = to_model_frame(validation), target_values(validation)
    probabilities: dict[str, np.ndarray] = {}
    columns: set[tuple[str, ...]] = set()
    for result in results:
        values, classes = validation_probabilities(store, settings, result, frame)
        probabilities[selection.job_of(result)] = values
        columns.add(classes)
    if len(columns) != 1:
        raise InvalidResult(f"the results' probabilities have different classes: {columns}")
    codes = pd.Index(next(iter(columns))).get_indexer(target)
    if (codes < 0).any():
        raise InvalidResult("a validation label is not a class of the models")
    return selection.select(
        results,
        probabilities,
        codes,
        settings.selection_metric,
        settings.gate_resamples,
        settings.gate_seed,
        memo=memo,
    )


def load_selected(result: Mapping[str, Any]) -> Any:
    """The pipeline of a result read by `read_result`, loaded only if every file of its MLflow
    model directory is the one its training run logged: InvalidResult (no retry can fix it)
    before any deserialisation otherwise."""
    try:
        return model_files.load_verified(str(result["model_uri"]), result[model_files.RESULT_KEY])
    except model_files.ModelFilesMismatch as error:
        raise InvalidResult(f"result of run {result.get('run_id')}: {error}") from error


def read_parquet(store: ObjectStore, bucket: str, key: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(store.get_bytes(bucket, key)))


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
    validation_frame: pd.DataFrame  # the version's validation rows (for the quality report)
    validation_target: np.ndarray
    validation_probabilities: np.ndarray  # columns in `classes` order


@dataclass(frozen=True)
class Candidate(TestedModel):
    """A TestedModel with the dataset's learning curve: ready to register and publish."""

    curve_files: dict[str, tuple[bytes, str]]  # extension -> (bytes, content type)
    selection: selection.Selection
    quality: dict[str, Any]  # readmission.quality.quality_report (validation and test)
    quality_files: dict[str, tuple[bytes, str]]  # extension -> (bytes, content type)
    card_files: dict[str, tuple[bytes, str]]  # extension -> (bytes, content type)
    prepared_ahead: bool = False  # the TestedModel came from PreparedAhead

    @property
    def onnx_sha256(self) -> str:
        return hashlib.sha256(self.exported.onnx_bytes).hexdigest()


def test_and_export(
    store: ObjectStore,
    settings: Settings,
    manifest: Mapping[str, Any],
    best: Mapping[str, Any],
    validation: pd.DataFrame,
    parity_tolerance: float,
    exporter: Exporter | None,
) -> TestedModel:
    """Load `best`'s model, score it once on the held-out test split, export it to ONNX and
    check parity on the WHOLE test split (ParityError: loud, retried, then dead-lettered,
    before anything is registered or written). Its probabilities on `validation` (the
    version's validation rows the selection read, `read_validation`) are kept for the quality
    report (one more prediction, of a split the size of the test split)."""
    test = read_test(store, settings, manifest)
    frame, y_test = to_model_frame(test), target_values(test)
    val_frame, y_val = to_model_frame(validation), target_values(validation)
    pipeline = load_selected(best)
    probabilities = predict_probabilities(pipeline, frame)
    val_probabilities = predict_probabilities(pipeline, val_frame)
    # the only look at the test split
    test_metrics = score(probabilities, np.asarray(pipeline.classes_), y_test)
    exported = (exporter or export_onnx)(pipeline, frame.head(ONNX_SAMPLE_ROWS))
    parity = check_parity(
        pipeline, exported.onnx_bytes, frame, tolerance=parity_tolerance, expected=probabilities
    )
    classes = tuple(str(c) for c in pipeline.classes_)
    return TestedModel(
        best,
        test_metrics,
        exported,
        parity,
        frame,
        y_test,
        probabilities,
        classes,
        val_frame,
        y_val,
        val_probabilities,
    )


def read_split(
    store: ObjectStore, settings: Settings, manifest: Mapping[str, Any], split: str
) -> pd.DataFrame:
    """The version's rows of a held-out split ("validation" or "test"): every drop's part, in
    manifest order."""
    bucket = settings.buckets.datasets
    parts = [read_parquet(store, bucket, key) for key in manifest[split]["keys"]]
    return parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)


def read_test(store: ObjectStore, settings: Settings, manifest: Mapping[str, Any]) -> pd.DataFrame:
    """The version's test rows: every drop's test part, in manifest order."""
    return read_split(store, settings, manifest, "test")


def read_validation(
    store: ObjectStore, settings: Settings, manifest: Mapping[str, Any]
) -> pd.DataFrame:
    """The version's validation rows: every drop's validation part, in manifest order."""
    return read_split(store, settings, manifest, "validation")


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

    Each preparation and the fan-in select from a growing set of the same results: `scores`
    keeps each result's per-resample bootstrap scores (keyed by
    readmission.selection.scores_key, a digest of all they depend on, so a kept entry is
    never wrong), so a selection scores only the results no earlier one scored. At most
    MEMO_ENTRIES are kept (then all are dropped).
    """

    MEMO_ENTRIES = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()  # held while preparing: `take` waits for a preparation
        self._key: tuple[Any, ...] | None = None
        self._tested: TestedModel | None = None
        self._scores: dict[str, np.ndarray] = {}

    @property
    def scores(self) -> dict[str, np.ndarray]:
        """The memo of per-resample scores for readmission.selection.select."""
        if len(self._scores) > self.MEMO_ENTRIES:
            self._scores = {}
        return self._scores

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
                validation = read_validation(store, settings, manifest)
                chosen = select_candidate(store, settings, results, validation, self.scores)
                best = chosen.best
                key = self.key(manifest, best, parity_tolerance)
                if key != self._key:
                    self._key, self._tested = None, None
                    self._tested = test_and_export(
                        store, settings, manifest, best, validation, parity_tolerance, None
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
    """Select, test once, export and check parity (see `test_and_export`), draw the learning
    curve of all results, and report the selected model's calibration and per-group quality
    on validation and test (readmission.quality)."""
    dataset_id = str(manifest["dataset_id"])
    validation = read_validation(store, settings, manifest)
    memo = PREPARED_AHEAD.scores if exporter is None else None
    chosen = select_candidate(store, settings, results, validation, memo)
    best = chosen.best
    log.info(
        "dataset %s: of %d results, %s leads by validation %s; tied within noise: %s; "
        "selected %s (run %s)",
        dataset_id,
        len(results),
        selection.job_of(chosen.leader),
        settings.selection_metric,
        ", ".join(chosen.tied),
        selection.job_of(best),
        best["run_id"],
    )
    tested = None if exporter is not None else PREPARED_AHEAD.take(manifest, best, parity_tolerance)
    prepared_ahead = tested is not None
    if tested is None:
        tested = test_and_export(
            store, settings, manifest, best, validation, parity_tolerance, exporter
        )
    curve = build_learning_curve(dataset_id, results, chosen)
    curve_files = {
        "csv": (to_csv(curve), "text/csv"),
        "md": (to_markdown(curve).encode(), "text/markdown"),
        "png": (to_png(curve), "image/png"),
    }
    report = quality.quality_report(
        tested.classes,
        {
            "validation": (
                tested.validation_frame,
                tested.validation_target,
                tested.validation_probabilities,
            ),
            "test": (tested.test_frame, tested.test_target, tested.test_probabilities),
        },
    )
    quality_files = {
        "json": (quality.to_json(report), "application/json"),
        "png": (quality.to_png(report, f"Reliability of {dataset_id}"), "image/png"),
    }
    card = model_card.build_card(
        dataset_id=dataset_id,
        best=tested.best,
        test_metrics=tested.test_metrics,
        quality_report=report,
        selection=chosen.as_dict(),
        # the fit's parameters: fit_id hashes them, so a result's are this code's
        classifier=_json_ready(classifier_params(build_pipeline(str(best["algorithm"])))),
    )
    card_files = {
        "json": (model_card.to_json(card), "application/json"),
        "md": (model_card.to_markdown(card).encode(), "text/markdown"),
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
        validation_frame=tested.validation_frame,
        validation_target=tested.validation_target,
        validation_probabilities=tested.validation_probabilities,
        curve_files=curve_files,
        selection=chosen,
        quality=report,
        quality_files=quality_files,
        card_files=card_files,
        prepared_ahead=prepared_ahead,
    )


def _json_ready(params: Mapping[str, Any]) -> dict[str, Any]:
    """Hyperparameters as JSON values (dict keys as text, other objects as their repr)."""

    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if value is None or isinstance(value, bool | int | float | str):
            return value
        return repr(value)

    return {str(k): plain(v) for k, v in params.items()}
