"""Clients of a running stack: upload, follow the pipeline (`wait`), report, dead letters."""

from __future__ import annotations

import gzip
import json
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from readmission.keys import (
    CHALLENGER_METADATA_KEY,
    CHAMPION_METADATA_KEY,
    LAST_DECISION_KEY,
    content_id,
    decision_key,
    drop_key,
    learning_curve_key,
    manifest_key,
    model_metadata_key,
)
from readmission.localstack.config import StackConfig, StackInfo, settings_for, store_for


def broker_status(info: StackInfo) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"{info.broker_url}/status", timeout=5) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def read_csv_bytes(path: Path) -> tuple[str, bytes]:
    """(object key, CSV bytes) of a local file; a ``.gz`` file is decompressed."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".gz"):
        data, name = gzip.decompress(data), name[: -len(".gz")]
    if not name.lower().endswith(".csv"):
        name += ".csv"
    return name, data


def upload(info: StackInfo, path: Path, key: str | None = None) -> dict[str, Any]:
    name, data = read_csv_bytes(path)
    settings = settings_for(info.env)
    record = {
        "bucket": settings.buckets.raw,
        "key": key or name,
        "size": len(data),
        "drop_id": content_id(data),
    }
    store_for(info.env).put_bytes(record["bucket"], record["key"], data, "text/csv")
    Path(info.state_dir, "last-upload.json").write_text(json.dumps(record, indent=2))
    return record


# wait: a pluggable "done" condition --------------------------------------------------------------


@dataclass
class Snapshot:
    """What the pipeline has done with one drop (by content id) so far."""

    drop: dict[str, Any] | None  # the drop record: which corpus version it made, if any
    manifest: dict[str, Any] | None  # that version's manifest
    jobs: int
    results: int
    model_metadata: bool  # models/<version>/metadata.json: the version is done
    decision: dict[str, Any] | None  # the gate's decision on the version
    rejected: bool
    broker: dict[str, Any] | None

    @property
    def version(self) -> str | None:
        return (self.drop or {}).get("version")

    @property
    def nothing_new(self) -> bool:
        """The drop is recorded and made no version: nothing to train."""
        return self.drop is not None and not self.version


DoneCondition = Callable[[Snapshot], bool]


def snapshot(info: StackInfo, drop_id: str) -> Snapshot:
    settings = settings_for(info.env)
    buckets = settings.buckets
    store = store_for(info.env)
    drop = store.get_json_if_exists(buckets.datasets, drop_key(drop_id))
    version = (drop or {}).get("version")
    return Snapshot(
        drop=drop,
        manifest=store.get_json_if_exists(buckets.datasets, manifest_key(version))
        if version
        else None,
        # job specs and result documents only (a long fit's `.handoff` record sits beside its
        # spec, each result's `.validation.npy` beside it)
        jobs=sum(k.endswith(".json") for k in store.list_keys(buckets.jobs, f"{version}/"))
        if version
        else 0,
        results=sum(k.endswith(".json") for k in store.list_keys(buckets.results, f"{version}/"))
        if version
        else 0,
        model_metadata=bool(version) and store.exists(buckets.models, model_metadata_key(version)),
        decision=store.get_json_if_exists(buckets.models, decision_key(version))
        if version
        else None,
        rejected=any(
            key.endswith(".error.json") for key in store.list_keys(buckets.rejected, f"{drop_id}/")
        ),
        broker=broker_status(info),
    )


def rejection_problems(info: StackInfo, dataset_id: str) -> list[str]:
    """The problems named in the rejected file's error report, and where the report is."""
    settings = settings_for(info.env)
    store = store_for(info.env)
    lines = []
    for key in store.list_keys(settings.buckets.rejected, f"{dataset_id}/"):
        if key.endswith(".error.json"):
            lines += store.get_json(settings.buckets.rejected, key).get("problems", [])
            lines.append(f"report: s3://{settings.buckets.rejected}/{key}")
    return lines


def decided(s: Snapshot) -> bool:
    """The drop's version is aggregated and its challenger judged (or there is nothing new)."""
    return s.model_metadata or s.nothing_new


def jobs_ready(s: Snapshot) -> bool:
    return s.nothing_new or (s.manifest is not None and s.jobs >= len(s.manifest.get("jobs", [])))


def raw_event_handled(s: Snapshot) -> bool:
    """Without an ingest function: the raw event was delivered or dead-lettered."""
    if not s.broker:
        return False
    raw = "io.readmission.raw.created"
    return bool(
        s.broker["delivered_by_type"].get(raw) or s.broker["dead_lettered_by_type"].get(raw)
    )


def done_condition(config: StackConfig) -> tuple[str, DoneCondition]:
    present = {spec.service for spec in config.present_functions()}
    if {"train", "aggregate"} <= present:
        return "its corpus version aggregated and the promotion decided", decided
    if "ingest" in present:
        return "manifest and every job spec written", jobs_ready
    return "raw event delivered or dead-lettered", raw_event_handled


def describe(s: Snapshot) -> str:
    parts = []
    if s.broker:
        t = s.broker["totals"]
        parts.append(
            f"events: received {t['received']} delivered {t['delivered']} queued {t['queued']} "
            f"in-flight {t['inflight']} retries {t['retries']} "
            f"dead-lettered {t['dead_lettered'] + t['dead_letter_file']}"
        )
    else:
        parts.append("broker: not answering")
    if s.nothing_new:
        parts.append("drop: nothing new (every row already in the corpus)")
        return " | ".join(parts)
    expected_jobs = len(s.manifest.get("jobs", [])) if s.manifest else "?"
    if s.manifest:
        parts.append(
            f"corpus version {s.version} (#{s.manifest.get('number')}, "
            f"{s.manifest['rows']['total']:,} rows)"
        )
    parts.append(
        f"manifest {'yes' if s.manifest else 'no'} | jobs {s.jobs}/{expected_jobs} | "
        f"results {s.results}/{expected_jobs} | model {'yes' if s.model_metadata else 'no'}"
    )
    return " | ".join(parts)


def wait(
    info: StackInfo,
    config: StackConfig,
    drop_id: str,
    timeout: float,
    condition: tuple[str, DoneCondition] | None = None,
    log: Callable[[str], None] = print,
    interval: float = 2.0,
) -> bool:
    what, done = condition or done_condition(config)
    log(f"waiting up to {timeout:.0f}s for drop {drop_id}: {what}")
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    last = ""
    while True:
        try:
            snap = snapshot(info, drop_id)
        except Exception as exc:  # the stack may be busy; report and keep polling
            log(f"  ... cannot read progress: {exc}")
            snap = None
        if snap is not None:
            line = describe(snap)
            if line != last:
                log(f"  [{time.monotonic() - started:6.0f}s] {line}")
                last = line
            if snap.rejected:
                log(f"drop {drop_id} was rejected:")
                for line in rejection_problems(info, drop_id):
                    log(f"  - {line}")
                return False
            if done(snap):
                log(f"done: {what}")
                for warning in (snap.drop or {}).get("warnings", []):
                    log(f"  warning: {warning}")
                if snap.decision:
                    log(f"  decision: {snap.decision['verdict']}: {snap.decision['reason']}")
                return True
        if time.monotonic() > deadline:
            log(f"timed out after {timeout:.0f}s")
            return False
        time.sleep(interval)


# reports -----------------------------------------------------------------------------------------


def report(info: StackInfo) -> str:
    settings = settings_for(info.env)
    store = store_for(info.env)
    lines = ["objects per bucket:"]
    for bucket in settings.buckets.all():
        objects = list(store.list(bucket))
        size = sum(o.size for o in objects)
        lines.append(f"  {bucket:<12} {len(objects):>5} objects {size / 1e6:10.2f} MB")
    champion = store.get_json_if_exists(settings.buckets.models, CHAMPION_METADATA_KEY)
    dataset_id = _last_dataset(info) or (champion or {}).get("dataset_id")
    manifest = (
        store.get_json_if_exists(settings.buckets.datasets, manifest_key(dataset_id))
        if dataset_id
        else None
    )
    if manifest:
        lines += ["", *describe_manifest(manifest)]
    if dataset_id:
        curve = learning_curve_text(store, settings, dataset_id)
        if curve:
            lines += ["", curve.rstrip()]
    lines.append("")
    if champion:
        lines += describe_champion(champion, settings.selection_metric)
    else:
        lines.append("champion: none yet")
    challenger = store.get_json_if_exists(settings.buckets.models, CHALLENGER_METADATA_KEY)
    if challenger:
        lines.append(
            f"challenger (not promoted): {challenger.get('algorithm')} on "
            f"{challenger.get('training_rows'):,} rows (corpus version "
            f"{challenger.get('dataset_id')}, model version {challenger.get('version')})"
        )
    decision = store.get_json_if_exists(settings.buckets.models, LAST_DECISION_KEY)
    if decision:
        lines.append(
            f"last decision #{decision['sequence']} ({decision['kind']}, corpus version "
            f"{decision['corpus_version']}): {decision['verdict']}: {decision['reason']}"
        )
        lines.append("  all decisions: python -m readmission.decisions list")
    lines.append(f"MLflow UI: {info.mlflow_uri}")
    if "PREDICT_URL" in info.env:
        lines.append(f"predict:   {info.env['PREDICT_URL']}")
    return "\n".join(lines)


def _last_dataset(info: StackInfo) -> str | None:
    """The corpus version the last upload made (None before it is ingested, or if it added
    nothing)."""
    path = Path(info.state_dir, "last-upload.json")
    if not path.exists():
        return None
    drop_id = json.loads(path.read_text()).get("drop_id")
    if not drop_id:
        return None
    settings = settings_for(info.env)
    record = store_for(info.env).get_json_if_exists(settings.buckets.datasets, drop_key(drop_id))
    return (record or {}).get("version")


def describe_manifest(manifest: dict[str, Any]) -> list[str]:
    rows = manifest["rows"]
    sets = manifest["cumulative_sets"]
    return [
        f"corpus version {manifest['dataset_id']} (#{manifest.get('number', 1)}, last drop "
        f"s3://{manifest['source']['bucket']}/{manifest['source']['key']}): "
        f"{rows['total']:,} rows -> train {rows['train']:,}, validation {rows['validation']:,}, "
        f"test {rows['test']:,} (split by a keyed hash of patient_nbr)",
        *(
            [
                f"  this drop: {manifest['added']['rows']:,} rows, {manifest['added']['new']:,} "
                f"new, {manifest['added']['duplicates']:,} duplicates, "
                f"{manifest['added']['conflicts']:,} conflicts"
            ]
            if "added" in manifest
            else []
        ),
        f"  {len(manifest['batches'])} training batches of up to {manifest['batch_rows']:,} rows: "
        + ", ".join(f"{b['rows']:,}" for b in manifest["batches"]),
        f"  {len(sets)} cumulative sets: " + ", ".join(f"{s['rows']:,}" for s in sets),
        f"  {len(manifest['jobs'])} training jobs = {len(sets)} sets x "
        f"{len(manifest['algorithms'])} algorithms ({', '.join(manifest['algorithms'])})"
        + _reused_sets_note(manifest.get("reused_sets", 0)),
    ]


def _reused_sets_note(reused_sets: int) -> str:
    if not reused_sets:
        return ""
    return (
        f"; the first {reused_sets} sets were fitted for an earlier version and are only re-scored"
    )


def learning_curve_text(store: Any, settings: Any, dataset_id: str) -> str | None:
    """The learning-curve table and verdict, once the dataset has training results."""
    try:  # pipeline-only modules (pandas is not needed, but matplotlib is imported lazily)
        from readmission.learning_curve import build_learning_curve, load_results, render_text
    except ImportError:
        return None
    results = load_results(store, settings.buckets.results, dataset_id)
    if not results:
        return None
    # The aggregator's verdict respects the noise (readmission.selection, which needs the
    # candidates' validation probabilities): once the version is aggregated, say that one.
    stored = stored_verdict(store, settings, dataset_id)
    return render_text(build_learning_curve(dataset_id, results), verdict_text=stored)


def stored_verdict(store: Any, settings: Any, dataset_id: str) -> str | None:
    """The verdict of the learning curve the aggregator stored beside the version's model."""
    data = store.get_bytes_if_exists(settings.buckets.models, learning_curve_key(dataset_id, "md"))
    if data is None:
        return None
    _, found, verdict_text = data.decode("utf-8", "replace").partition("## Verdict\n")
    return verdict_text.strip() or None if found else None


def describe_champion(champion: dict[str, Any], selection_metric: str) -> list[str]:
    metrics = champion.get("metrics") or {}
    names = ("f1_weighted", "f1_macro", "roc_auc_ovr", "accuracy")
    lines = [
        f"champion: {champion.get('algorithm')} on {champion.get('training_rows'):,} rows "
        f"(corpus version {champion.get('dataset_id')}, registered model "
        f"{champion.get('model_name')} version {champion.get('version')}, alias champion; "
        f"selected by validation {selection_metric})",
    ]
    for split in ("validation", "test"):
        scores = metrics.get(split) or {}
        lines.append(
            f"  {split:<10} "
            + "  ".join(f"{n} {scores[n]:.4f}" for n in names if isinstance(scores.get(n), float))
        )
    lines.append(f"  model: s3://{champion.get('model_bucket')}/{champion.get('model_key')}")
    return lines


def dead_letters(info: StackInfo) -> list[dict[str, Any]]:
    settings = settings_for(info.env)
    store = store_for(info.env)
    letters = []
    for key in store.list_keys(settings.buckets.dead_letter):
        document = store.get_json(settings.buckets.dead_letter, key)
        letters.append({"where": f"s3://{settings.buckets.dead_letter}/{key}", **document})
    fallback = Path(info.state_dir, "dead-letters.jsonl")
    if fallback.exists():
        for line in fallback.read_text().splitlines():
            if line.strip():
                letters.append({"where": str(fallback), **json.loads(line)})
    return letters


# an example prediction over HTTP ------------------------------------------------------------------


def example_prediction(info: StackInfo, timeout: float = 60.0) -> str:
    """POST one patient of the champion's test split to the predict function, as a user would.

    Waits (up to ``timeout``) until predict has loaded the champion (it polls the metadata).
    """
    import io

    import pandas as pd

    from readmission.contract import FEATURES, TARGET

    url = info.env.get("PREDICT_URL")
    if not url:
        return "predict is not running"
    settings = settings_for(info.env)
    store = store_for(info.env)
    champion = store.get_json_if_exists(settings.buckets.models, CHAMPION_METADATA_KEY)
    if champion is None:
        return "no champion yet"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/model-info", timeout=5) as response:
                if str(json.loads(response.read()).get("version")) == str(champion["version"]):
                    break
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            return f"predict at {url} did not load version {champion['version']} in {timeout}s"
        time.sleep(1)
    manifest = store.get_json(settings.buckets.datasets, manifest_key(champion["dataset_id"]))
    test = pd.read_parquet(
        io.BytesIO(store.get_bytes(settings.buckets.datasets, manifest["test"]["keys"][0]))
    )
    row = test.iloc[0]
    features = {c: (None if pd.isna(row[c]) else row[c]) for c in FEATURES}
    features = {c: (v.item() if hasattr(v, "item") else v) for c, v in features.items()}
    body = json.dumps({"features": features}).encode()
    request = urllib.request.Request(
        f"{url}/predict", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = json.loads(response.read())
    shown = {c: features[c] for c in ("age", "gender", "time_in_hospital", "number_inpatient")}
    return (
        f"POST {url}/predict  (encounter {row['encounter_id']} of the test split; "
        f"{json.dumps(shown)} ...; actual {TARGET}={row[TARGET]})\n"
        f"  -> {json.dumps(answer)}"
    )
