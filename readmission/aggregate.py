"""The aggregator: fan-in of a dataset's training results into one served champion.

Fired by every result object. While a dataset's manifest lists jobs without a result it does
nothing ("waiting k of n"). When all are in, it

1. selects the best result by validation `Settings.selection_metric` (ROC-AUC breaks ties,
   then the job key, i.e. fewer training rows and then the algorithm name);
2. loads that run's model from MLflow, only from a download whose every file matches the
   sha256 its result pins (readmission.model_files; else InvalidResult, before skops reads
   anything), and evaluates it ONCE on the held-out test split;
3. exports it to ONNX and checks parity on the WHOLE test split (same argmax, max |Δp| <=
   1e-4): a failure raises, so the event is retried and finally dead-lettered, and nothing is
   registered or written;
4. the gate (readmission.gate, under the decision lease): the selected model (the challenger)
   and the sitting champion are scored on the same rows, this version's test split; the
   challenger is promoted only if it beats the champion by `Settings.gate_margin` and the
   paired-bootstrap lower bound of the difference (one-sided, at `gate.GateRule.confidence`)
   is above zero. The first model ever is promoted without a gate; a challenger that is the
   champion's own fit (an unchanged cumulative set won again) is kept without registering it
   twice;
5. registers a new model (once per corpus version, see readmission.registry) as
   `Settings.registered_model`, and records the decision (readmission.decisions:
   `decisions/<version>.json`, which fires `io.readmission.decision.made`, and MLflow tags on
   the registered version);
6. logs the learning curve, the ONNX file, the quality report, the metadata, the test
   metrics and the drift report of the version's drop (readmission.drift_reports: also tags on
   the registered version) to the winning run;
7. writes `models/<id>/model.onnx`, `learning_curve.{csv,md,png}`, `quality.json` and
   `reliability.png` (readmission.quality: calibration and per-group metrics), `reference.json`
   (the training reference profile of the drift reports), applies the decision
   (promoted: alias `champion` and `champion/metadata.json`, the key predict polls; kept:
   alias `challenger` and `challenger/metadata.json`), and LAST `<id>/metadata.json`.

This module is the fan-in and the order of the steps; steps 1-3 are readmission.candidate,
4-5 readmission.champion, 6-7 readmission.model_artifacts and readmission.decisions.apply.

Idempotent and race-safe: an S3 lease (conditional PUT) serialises invocations per version and
another one every decision, registration converges on one version per corpus version, a
decision is written once (a retry reads and re-applies it, and never undoes a later one),
every object is written only if its bytes differ, and a version whose `<id>/metadata.json`
exists is done.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mlflow import MlflowClient

from readmission import decisions, drift_reports, keys, lease, registry, tracking
from readmission.candidate import (
    PREPARED_AHEAD,
    Exporter,
    InvalidResult,
    prepare_candidate,
    read_result,
)
from readmission.champion import decide
from readmission.config import Settings
from readmission.learning_curve import warm_up_png
from readmission.model_artifacts import (
    build_metadata,
    explain_baseline,
    input_ranges,
    log_to_run,
    write_artifacts,
)
from readmission.onnx_parity import PARITY_TOLERANCE
from readmission.storage import ObjectStore, json_bytes

log = logging.getLogger(__name__)

# The lease is renewed every LEASE_RENEW_SECONDS while the aggregator works, so a killed
# aggregator's lease expires within LEASE_TTL_SECONDS, well inside the LEASE_WAIT_SECONDS its
# redelivered event waits (a 900 s TTL without renewal blocked the dataset for 15 minutes and
# dead-lettered the event: every redelivery waited 120 s and gave up).
LEASE_TTL_SECONDS = 60.0
LEASE_RENEW_SECONDS = 15.0
LEASE_WAIT_SECONDS = 120.0


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


# --- process warm-up ----------------------------------------------------------------------


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
    and aborts (std::system_error; see readmission.serving.server.ModelServer)."""
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
    reference = drift_reports.write_reference(store, settings, manifest, candidate.best)
    with decisions.decision_lease(store, settings, f"decide {dataset_id}"):
        decision, version, created = decide(store, client, settings, dataset_id, candidate)
        best, metric = candidate.best, settings.selection_metric
        metadata = build_metadata(
            settings=settings,
            dataset_id=dataset_id,
            version=version,
            best=best,
            exported=candidate.exported,
            onnx_sha256=candidate.onnx_sha256,
            test_metrics=candidate.test_metrics,
            quality_report=candidate.quality,
            explain_baseline=explain_baseline(candidate.validation_frame),
            input_ranges=input_ranges(candidate.validation_frame),
            selection=candidate.selection.as_dict(),
            reference=reference,
        )
        metadata_bytes = json_bytes(metadata)
        if decision["new_model"]:
            drift_files = drift_reports.report_files(store, settings, manifest)
            log_to_run(client, best["run_id"], candidate, metadata_bytes, drift_files)
            drift_reports.tag_version(client, settings, str(version.version), drift_files)
        applied = decisions.apply(store, client, settings, decision, metadata_bytes)
    store.put_if_changed(
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
