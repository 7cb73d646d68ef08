"""The champion/challenger decision on a corpus version's candidate (step 4 and 5 of
readmission.aggregate): the gate, the registration, the decision document and its MLflow tags.

Runs under the decision lease (readmission.decisions.decision_lease, taken by the caller).
Reads the recorded decision of the version if there is one, the registry's champion and
`champion/metadata.json`, and the champion's model (MLflow) to score it; writes a registered
model version (readmission.registry: at most one per corpus version), the decision document
(readmission.decisions.record: `decisions/<version>.json`, which fires
`io.readmission.decision.made`) and the decision's tags on the registered version.

Contract: a version is decided once. `decide` reads a recorded decision back and returns it
unchanged (a retry re-applies it, and readmission.decisions never lets it undo a later one).
The first model ever is promoted without a gate; a challenger that is the champion's own fit is
kept without registering it twice; otherwise challenger and champion are scored on the same
rows (the candidate's test split) and readmission.gate decides with `gate_rule(settings)`. The
champion's pipeline is loaded only if its MLflow model files match the digests pinned by the
result naming its run (`load_champion`; InvalidResult otherwise, nothing decided).
Applying the decision (aliases, champion/challenger metadata) is readmission.decisions.apply,
called by the aggregator.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
from mlflow import MlflowClient

from readmission import contract, decisions, gate, keys, model_files, registry, tracking
from readmission.candidate import Candidate, InvalidResult
from readmission.config import Settings
from readmission.scoring import predict_probabilities
from readmission.storage import ObjectStore

log = logging.getLogger(__name__)

MODEL_DESCRIPTION = (
    "Hospital readmission (<30, >30, NO) classifier of the Diabetes 130-US hospitals pipeline. "
    "One version per corpus version (tag dataset_id) whose best run is not the champion's: the "
    "best of its training runs by validation selection metric. Alias `champion` = the version "
    "the predict function serves (as ONNX), moved only by a recorded decision (the gate or an "
    "operator); alias `challenger` = the last version the gate did not promote."
)


class InconsistentRegistry(RuntimeError):
    """The registry holds a version for this dataset that the selection does not explain."""


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


def champion_model_files(
    store: ObjectStore, settings: Settings, version: Any
) -> dict[str, str] | None:
    """The model files pinned by the result (results bucket) that names the champion's run:
    the result of its corpus version (the version's tag) and algorithm. InvalidResult if no
    result names the run; None (logged) if that result predates pinned model files."""
    run_id = registry.run_of(version)
    dataset_id = str(version.tags.get(registry.DATASET_TAG, ""))
    suffix = f"-{version.tags.get('algorithm', '')}.json"
    bucket = settings.buckets.results
    for key in store.list_keys(bucket, f"{dataset_id}/") if dataset_id else []:
        if not key.endswith(suffix):
            continue
        result = store.get_json_if_exists(bucket, key)
        if not isinstance(result, dict) or result.get("run_id") != run_id:
            continue
        if model_files.RESULT_KEY not in result:
            log.warning(
                "champion run %s: s3://%s/%s predates pinned model files; its model is loaded "
                "unverified",
                run_id,
                bucket,
                key,
            )
            return None
        try:
            return model_files.parse_digests(result[model_files.RESULT_KEY])
        except ValueError as error:
            raise InvalidResult(f"s3://{bucket}/{key}: {error}") from error
    raise InvalidResult(
        f"no result in s3://{bucket}/{dataset_id}/ names the champion's run {run_id}: its model "
        "files cannot be verified"
    )


def load_champion(store: ObjectStore, settings: Settings, version: Any) -> Any:
    """The champion's pipeline, loaded only if its MLflow model files are the ones its training
    run logged (InvalidResult otherwise, before any deserialisation)."""
    uri = f"runs:/{registry.run_of(version)}/{tracking.MODEL_NAME}"
    files = champion_model_files(store, settings, version)
    if files is None:
        return tracking.load_pipeline(uri)
    try:
        return model_files.load_verified(uri, files)
    except model_files.ModelFilesMismatch as error:
        raise InvalidResult(f"champion version {version.version}: {error}") from error


def run_gate(candidate: Candidate, champion: Any, rule: gate.GateRule) -> gate.GateResult:
    """Challenger and champion (its pipeline) scored on the same rows: the candidate's test
    split."""
    champion_probabilities = predict_probabilities(champion, candidate.test_frame)
    codes = np.array([contract.TARGET_CLASSES.index(str(y)) for y in candidate.test_target])
    return gate.compare(
        rule,
        codes,
        _aligned(candidate.test_probabilities, candidate.classes),
        _aligned(champion_probabilities, [str(c) for c in champion.classes_]),
    )


def decide(
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
            champion_pipeline = load_champion(store, settings, current)
            result = run_gate(candidate, champion_pipeline, rule)
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
