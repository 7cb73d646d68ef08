"""Promotion decisions: the only way a model reaches production, each one a recorded document.

A decision is a JSON document in the models bucket: ``decisions/<version>.json`` for the gate's
verdict on a corpus version's challenger, ``decisions/manual-<sequence>.json`` for an operator's
promote or rollback. Writing it fires ``io.readmission.decision.made`` (the bucket
notification, events/notifications.py). Every decision carries a ``sequence`` number, one more
than the last applied decision's, and is *applied* right after it is written:

* ``promoted``: the MLflow alias ``champion`` moves to the model version and
  ``champion/metadata.json`` (the key the predict function polls) gets its metadata; the
  pending challenger, if any, is cleared (it lost to the champion this one replaces);
* ``kept``: the champion stays; a newly registered model gets the alias ``challenger`` and
  ``challenger/metadata.json``;
* either way ``champion/last-decision.json`` becomes the decision (for the predict page).

Decisions are taken and applied under one lease (``decisions.lease``), so concurrent
aggregations and operator commands are serialised. A decision is applied only if no later one
(by sequence, then time) has been: a redelivered event or a retried aggregation re-applies the
decision it already wrote (idempotent) and never undoes a newer one.

Command line (S3 and MLflow settings from the environment, as every function):

    python -m readmission.decisions list
    python -m readmission.decisions promote VERSION [--reason TEXT]
    python -m readmission.decisions rollback [--reason TEXT]

VERSION is a corpus version id (16 hex) or a registered model version number.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from mlflow import MlflowClient

from readmission import keys, lease, registry
from readmission.config import Settings
from readmission.storage import ObjectStore, json_bytes

PROMOTED, KEPT = "promoted", "kept"
GATE, MANUAL = "gate", "manual"
LEASE_TTL_SECONDS = 60.0
LEASE_WAIT_SECONDS = 120.0
JSON_TYPE = "application/json"


class OperatorError(RuntimeError):
    """An operator command that cannot be carried out (says why)."""


def now_iso() -> str:
    moment = datetime.now(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def decision_lease(store: ObjectStore, settings: Settings, purpose: str) -> lease.Lease:
    return lease.acquire(
        store,
        settings.buckets.models,
        keys.DECISION_LEASE_KEY,
        ttl_seconds=LEASE_TTL_SECONDS,
        wait_seconds=LEASE_WAIT_SECONDS,
        purpose=purpose,
        renew_every=LEASE_TTL_SECONDS / 4,
    )


def last_decision(store: ObjectStore, settings: Settings) -> dict[str, Any] | None:
    return store.get_json_if_exists(settings.buckets.models, keys.LAST_DECISION_KEY)


def next_sequence(store: ObjectStore, settings: Settings) -> int:
    last = last_decision(store, settings)
    return int(last["sequence"]) + 1 if last else 1


def model_summary(metadata: Mapping[str, Any], score: float | None = None) -> dict[str, Any]:
    """A model as a decision names it (from its models/<version>/metadata.json document)."""
    summary = {
        "model_version": str(metadata["version"]),
        "corpus_version": metadata["dataset_id"],
        "algorithm": metadata["algorithm"],
        "training_rows": int(metadata["training_rows"]),
        "run_id": metadata["run_id"],
    }
    if score is not None:
        summary["score"] = score
    return summary


def _order(decision: Mapping[str, Any]) -> tuple[int, str]:
    return int(decision["sequence"]), str(decision["decided_at"])


def record(store: ObjectStore, settings: Settings, decision: dict[str, Any]) -> dict[str, Any]:
    """Write the decision document once; returns the one stored (an earlier twin's, if any)."""
    models = settings.buckets.models
    if store.put_if_absent(models, decision["key"], json_bytes(decision), JSON_TYPE):
        return decision
    return store.get_json(models, decision["key"])


def apply(
    store: ObjectStore,
    client: MlflowClient,
    settings: Settings,
    decision: Mapping[str, Any],
    metadata_bytes: bytes,
) -> bool:
    """Carry out a recorded decision (see the module docstring); False if a later decision
    was applied already (then nothing changes). `metadata_bytes`: the decided model's
    models/<corpus version>/metadata.json document."""
    models, name = settings.buckets.models, settings.registered_model
    last = last_decision(store, settings)
    if last is not None and _order(last) > _order(decision):
        return False
    model_version = str(json.loads(metadata_bytes)["version"])
    if decision["verdict"] == PROMOTED:
        registry.set_champion(client, name, model_version)
        store.put_if_changed(models, keys.CHAMPION_METADATA_KEY, metadata_bytes, JSON_TYPE)
        # a pending challenger lost to the champion this promotion replaces: none is pending
        registry.clear_alias(client, name, registry.CHALLENGER_ALIAS)
        if store.exists(models, keys.CHALLENGER_METADATA_KEY):
            store.delete(models, keys.CHALLENGER_METADATA_KEY)
    elif decision.get("new_model"):
        registry.set_alias(client, name, registry.CHALLENGER_ALIAS, model_version)
        store.put_if_changed(models, keys.CHALLENGER_METADATA_KEY, metadata_bytes, JSON_TYPE)
    store.put_if_changed(models, keys.LAST_DECISION_KEY, json_bytes(dict(decision)), JSON_TYPE)
    return True


# --------------------------------------------------------------------------- operator commands


def list_decisions(store: ObjectStore, settings: Settings) -> list[dict[str, Any]]:
    """Every recorded decision, in decision order."""
    models = settings.buckets.models
    found = [
        store.get_json(models, key)
        for key in store.list_keys(models, keys.DECISIONS_PREFIX)
        if key.endswith(".json")
    ]
    return sorted(found, key=_order)


def list_versions(store: ObjectStore, settings: Settings) -> list[dict[str, Any]]:
    """Every aggregated corpus version's model metadata, oldest version number first."""
    models = settings.buckets.models
    found = []
    for key in store.list_keys(models):
        parts = key.split("/")
        if len(parts) == 2 and parts[1] == "metadata.json" and len(parts[0]) == 16:
            found.append(store.get_json(models, key))
    return sorted(found, key=lambda m: (int(m["version"]), m["dataset_id"]))


def _find_metadata(store: ObjectStore, settings: Settings, version: str) -> dict[str, Any]:
    """The metadata of a corpus version id or a registered model version number."""
    models = settings.buckets.models
    if len(version) == 16:
        metadata = store.get_json_if_exists(models, keys.model_metadata_key(version))
        if metadata is not None:
            return metadata
    matches = [m for m in list_versions(store, settings) if str(m["version"]) == version]
    if not matches:
        raise OperatorError(
            f"no aggregated model for {version!r}: give a corpus version id (16 hex) or a "
            f"model version number from `python -m readmission.decisions list`"
        )
    return matches[-1]


def manual_decision(
    store: ObjectStore,
    client: MlflowClient,
    settings: Settings,
    metadata: Mapping[str, Any],
    reason: str,
) -> dict[str, Any]:
    """Record and apply an operator's promotion of `metadata`'s model (under the lease)."""
    models = settings.buckets.models
    metadata_bytes = store.get_bytes(models, keys.model_metadata_key(metadata["dataset_id"]))
    current = store.get_json_if_exists(models, keys.CHAMPION_METADATA_KEY)
    sequence = next_sequence(store, settings)
    while store.exists(models, keys.manual_decision_key(sequence)):
        sequence += 1
    decision = {
        "kind": MANUAL,
        "sequence": sequence,
        "key": keys.manual_decision_key(sequence),
        "corpus_version": metadata["dataset_id"],
        "verdict": PROMOTED,
        "reason": f"manual: {reason}",
        "decided_at": now_iso(),
        "rule": None,
        "challenger": model_summary(metadata),
        "champion": model_summary(current) if current else None,
        "difference": None,
        "interval": None,
        "rows": None,
        "champion_after": {
            "model_version": str(metadata["version"]),
            "corpus_version": metadata["dataset_id"],
        },
        "new_model": False,
    }
    decision = record(store, settings, decision)
    apply(store, client, settings, decision, metadata_bytes)
    return decision


def promote(
    store: ObjectStore, client: MlflowClient, settings: Settings, version: str, reason: str
) -> dict[str, Any]:
    """Serve `version` (corpus version id or model version number) from now on."""
    with decision_lease(store, settings, f"promote {version}"):
        metadata = _find_metadata(store, settings, version)
        return manual_decision(store, client, settings, metadata, reason or f"promote {version}")


def rollback(
    store: ObjectStore, client: MlflowClient, settings: Settings, reason: str
) -> dict[str, Any]:
    """Serve the champion before the current one again (the last decision that changed the
    champion names it)."""
    with decision_lease(store, settings, "rollback"):
        current = store.get_json_if_exists(settings.buckets.models, keys.CHAMPION_METADATA_KEY)
        if current is None:
            raise OperatorError("there is no champion to roll back")
        previous = None
        for decision in reversed(list_decisions(store, settings)):
            after = decision.get("champion_after") or {}
            before = decision.get("champion")
            if (
                decision["verdict"] == PROMOTED
                and after.get("model_version") == str(current["version"])
                and before
                and before["model_version"] != str(current["version"])
            ):
                previous = before
                break
        if previous is None:
            raise OperatorError(
                f"no decision records a champion before version {current['version']}: "
                f"nothing to roll back to (promote a version by name instead)"
            )
        metadata = _find_metadata(store, settings, previous["corpus_version"])
        text = reason or (
            f"rollback from version {current['version']} to version {metadata['version']}"
        )
        return manual_decision(store, client, settings, metadata, text)


def _print_table(store: ObjectStore, settings: Settings) -> None:
    champion = store.get_json_if_exists(settings.buckets.models, keys.CHAMPION_METADATA_KEY)
    challenger = store.get_json_if_exists(settings.buckets.models, keys.CHALLENGER_METADATA_KEY)
    metric = settings.selection_metric
    print("versions (models/<corpus version>/metadata.json):")
    for m in list_versions(store, settings):
        role = ""
        if champion and champion["dataset_id"] == m["dataset_id"]:
            role = "champion"
        elif challenger and challenger["dataset_id"] == m["dataset_id"]:
            role = "challenger"
        test = m.get("metrics", {}).get("test", {}).get(metric)
        print(
            f"  model {m['version']:>3}  corpus {m['dataset_id']}  {m['algorithm']:<22} "
            f"{int(m['training_rows']):>7,} rows  test {metric} "
            f"{test if test is None else f'{test:.4f}'}  {role}"
        )
    print("decisions:")
    for d in list_decisions(store, settings):
        print(
            f"  #{d['sequence']:<3} {d['decided_at']}  {d['kind']:<6} {d['verdict']:<8} "
            f"corpus {d['corpus_version']}: {d['reason']}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m readmission.decisions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="versions, their roles and every decision")
    promote_parser = commands.add_parser("promote", help="serve a given version")
    promote_parser.add_argument("version")
    promote_parser.add_argument("--reason", default="")
    rollback_parser = commands.add_parser("rollback", help="serve the previous champion again")
    rollback_parser.add_argument("--reason", default="")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    store = ObjectStore.from_settings(settings)
    if args.command == "list":
        _print_table(store, settings)
        return 0
    client = registry.client_for(settings.mlflow_tracking_uri)
    try:
        if args.command == "promote":
            decision = promote(store, client, settings, args.version, args.reason)
        else:
            decision = rollback(store, client, settings, args.reason)
    except OperatorError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    after = decision["champion_after"]
    print(
        f"decision #{decision['sequence']} ({decision['key']}): champion is model version "
        f"{after['model_version']} (corpus {after['corpus_version']}); {decision['reason']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
