#!/usr/bin/env python3
"""Retrieve models from the local stack: MLflow runs, the registered champion, its ONNX file.

    .venv/bin/python scripts/retrieve_models.py list [--dataset ID] [--limit N]
    .venv/bin/python scripts/retrieve_models.py champion
    .venv/bin/python scripts/retrieve_models.py run RUN_ID
    .venv/bin/python scripts/retrieve_models.py onnx [--out DIR]

Settings come from the environment (readmission.config); the local stack's `.state/env`
(or `--env-file`, or `$STATE_DIR/env`) is read first and its values win, so the script
works without sourcing it. See docs/aggregate.md.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VALIDATION_COLUMNS = ("val_f1_weighted", "val_roc_auc_ovr", "val_accuracy")
TEST_COLUMNS = ("test_f1_weighted", "test_roc_auc_ovr")


def load_env_file(path: Path) -> int:
    """Apply `export K='v'` lines (the stack's STATE_DIR/env) to os.environ; count applied."""
    applied = 0
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, _, value = words[1].partition("=")
            os.environ[name] = value
            applied += 1
    return applied


def default_env_file() -> Path:
    state = os.environ.get("STATE_DIR", "").strip()
    return Path(state) / "env" if state else ROOT / ".state" / "env"


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))


# --- commands -----------------------------------------------------------------------------


def cmd_list(settings: Any, args: argparse.Namespace) -> int:
    from readmission import tracking

    client = tracking.client_for(settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(settings.mlflow_experiment)
    if experiment is None:
        print(f"no experiment {settings.mlflow_experiment!r} yet", file=sys.stderr)
        return 1
    filters = f"tags.dataset_id = '{args.dataset}'" if args.dataset else ""
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=filters,
        order_by=["metrics.val_f1_weighted DESC"],
        max_results=args.limit,
    )
    header = ["run_id", "dataset", "set", "algorithm", "rows", *VALIDATION_COLUMNS, *TEST_COLUMNS]
    rows = [
        [
            run.info.run_id,
            run.data.tags.get("dataset_id", ""),
            run.data.tags.get("cumulative_index", ""),
            run.data.tags.get("algorithm") or run.data.params.get("model_type", ""),
            run.data.params.get("n_samples", ""),
            *(fmt(run.data.metrics.get(m)) for m in (*VALIDATION_COLUMNS, *TEST_COLUMNS)),
        ]
        for run in runs
    ]
    print(f"experiment {settings.mlflow_experiment}: {len(rows)} runs (best validation F1 first)")
    print(table(rows, header))
    return 0


def _test_row(settings: Any, store: Any, dataset_id: str) -> Any:
    import pandas as pd

    from readmission import keys

    manifest = store.get_json(settings.buckets.datasets, keys.manifest_key(dataset_id))
    data = store.get_bytes(settings.buckets.datasets, manifest["test"]["keys"][0])
    return pd.read_parquet(io.BytesIO(data)).head(1)


def cmd_champion(settings: Any, args: argparse.Namespace) -> int:
    from readmission import registry, tracking
    from readmission.features import to_model_frame
    from readmission.storage import ObjectStore

    client = registry.client_for(settings.mlflow_tracking_uri)
    name = settings.registered_model
    version = registry.champion(client, name)
    if version is None:
        print(f"{name} has no champion yet", file=sys.stderr)
        return 1
    uri = f"models:/{name}@{registry.CHAMPION_ALIAS}"
    print(f"{uri} -> version {version.version} (run {version.run_id})")
    print(f"registered at {registry.registered_at(version)}")
    print(f"tags: {dict(sorted(version.tags.items()))}")
    print(f"description: {version.description}")
    metrics = client.get_run(version.run_id).data.metrics if version.run_id else {}
    for prefix in ("val_", "test_"):
        shown = {k: round(v, 4) for k, v in sorted(metrics.items()) if k.startswith(prefix)}
        print(f"{prefix.rstrip('_')} metrics: {shown}")
    model = tracking.load_pipeline(uri)
    dataset_id = version.tags.get("dataset_id")
    if dataset_id:
        row = _test_row(settings, ObjectStore.from_settings(settings), dataset_id)
        probabilities = model.predict_proba(to_model_frame(row))[0]
        shown = {
            str(c): round(float(p), 4) for c, p in zip(model.classes_, probabilities, strict=True)
        }
        print(
            f"prediction on test row encounter_id={int(row['encounter_id'].iloc[0])}: "
            f"{model.classes_[probabilities.argmax()]} {shown} "
            f"(actual {row['readmitted'].iloc[0]})"
        )
    return 0


def cmd_run(settings: Any, args: argparse.Namespace) -> int:
    from readmission import tracking

    client = tracking.client_for(settings.mlflow_tracking_uri)
    run = client.get_run(args.run_id)
    print(f"run {run.info.run_id} ({run.info.run_name}), status {run.info.status}")
    print("params:")
    for key, value in sorted(run.data.params.items()):
        print(f"  {key} = {value}")
    print("metrics:")
    for key, value in sorted(run.data.metrics.items()):
        print(f"  {key} = {value:.4f}")
    model = tracking.load_pipeline(f"runs:/{args.run_id}/{tracking.MODEL_NAME}")
    steps = " -> ".join(f"{name}: {type(step).__name__}" for name, step in model.steps)
    print(
        f"model runs:/{args.run_id}/{tracking.MODEL_NAME}: {steps}; classes {list(model.classes_)}"
    )
    return 0


def cmd_onnx(settings: Any, args: argparse.Namespace) -> int:
    import json

    from readmission.keys import CHAMPION_METADATA_KEY
    from readmission.storage import ObjectStore

    store = ObjectStore.from_settings(settings)
    raw = store.get_bytes_if_exists(settings.buckets.models, CHAMPION_METADATA_KEY)
    if raw is None:
        print("no champion/metadata.json yet", file=sys.stderr)
        return 1
    metadata = json.loads(raw)
    onnx_bytes = store.get_bytes(metadata["model_bucket"], metadata["model_key"])
    digest = hashlib.sha256(onnx_bytes).hexdigest()
    if digest != metadata["model_sha256"]:
        print(f"sha256 mismatch: {digest} != {metadata['model_sha256']}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(onnx_bytes)
    (out / "metadata.json").write_bytes(raw)
    print(
        f"version {metadata['version']} ({metadata['algorithm']}, dataset "
        f"{metadata['dataset_id']}): {out / 'model.onnx'} ({len(onnx_bytes):,} bytes, sha256 "
        f"verified) and {out / 'metadata.json'}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env-file", type=Path, help="default: $STATE_DIR/env or .state/env")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="every run of the experiment with its metrics")
    listing.add_argument("--dataset", help="only the runs of this dataset id")
    listing.add_argument("--limit", type=int, default=1000)
    commands.add_parser("champion", help="the registered champion, its metrics, a prediction")
    run = commands.add_parser("run", help="one run's params, metrics and model")
    run.add_argument("run_id")
    onnx = commands.add_parser("onnx", help="download the champion ONNX + metadata")
    onnx.add_argument("--out", default="champion-model", help="folder (default champion-model)")
    args = parser.parse_args(argv)

    env_file = args.env_file or default_env_file()
    if env_file.exists():
        load_env_file(env_file)
    elif args.env_file:
        parser.error(f"{env_file} does not exist")

    from readmission.config import Settings

    settings = Settings.from_env()
    handlers = {"list": cmd_list, "champion": cmd_champion, "run": cmd_run, "onnx": cmd_onnx}
    return handlers[args.command](settings, args)


if __name__ == "__main__":
    sys.exit(main())
