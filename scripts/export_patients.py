#!/usr/bin/env python3
"""Export N realistic patients as JSON (feature -> value) for the Locust load test.

    .venv/bin/python scripts/export_patients.py [-n 500] [--csv PATH | --dataset ID]
        [-o .state/loadtest/patients.json]

Source, in order: --csv (a UCI-format CSV or .csv.gz); --dataset (the test split
`datasets/<id>/test.parquet` in the object store); default: the test split of the current
champion's dataset (models/champion/metadata.json), or the UCI file when there is no champion.
Runs once, with pandas; Locust then only reads the JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from readmission.contract import FEATURES, NUMERIC_FEATURES  # noqa: E402


def _records(frame: Any, n: int) -> list[dict[str, Any]]:
    sample = frame.sample(n=min(n, len(frame)), random_state=42) if len(frame) > n else frame
    patients = []
    for record in sample.to_dict("records"):
        row: dict[str, Any] = {}
        for column in FEATURES:
            value = record[column]
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            if column in NUMERIC_FEATURES:
                row[column] = None if missing else float(value)
                if row[column] is not None and row[column].is_integer():
                    row[column] = int(row[column])
            else:
                row[column] = None if missing or str(value) in ("<NA>", "nan") else str(value)
        patients.append(row)
    return patients


def _from_csv(path: Path) -> Any:
    from readmission.contract import parse_csv
    from readmission.dataset import read_dataset_bytes

    return parse_csv(read_dataset_bytes(path))


def _from_store(dataset_id: str | None) -> Any:
    import pandas as pd

    from readmission import keys
    from readmission.config import Settings
    from readmission.storage import ObjectStore

    settings = Settings.from_env()
    store = ObjectStore.from_settings(settings)
    if dataset_id is None:
        champion = store.get_json_if_exists(settings.buckets.models, keys.CHAMPION_METADATA_KEY)
        if champion is None:
            return None
        dataset_id = champion["dataset_id"]
    data = store.get_bytes(settings.buckets.datasets, keys.test_key(dataset_id))
    return pd.read_parquet(io.BytesIO(data))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=500)
    parser.add_argument("--csv", type=Path)
    parser.add_argument("--dataset")
    parser.add_argument(
        "-o", "--output", type=Path, default=ROOT / ".state" / "loadtest" / "patients.json"
    )
    args = parser.parse_args(argv)
    frame = None
    if args.csv:
        frame = _from_csv(args.csv)
    else:
        try:
            frame = _from_store(args.dataset)
        except Exception as exc:  # no store running: fall back to the UCI file
            if args.dataset:
                raise
            print(f"object store unavailable ({exc}); using the UCI file", file=sys.stderr)
        if frame is None:
            from readmission.dataset import ensure_dataset

            frame = _from_csv(ensure_dataset())
    patients = _records(frame, args.n)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(patients))
    print(f"wrote {len(patients)} patients to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
