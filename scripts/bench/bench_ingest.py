"""Benchmark (not a test): the real UCI CSV from upload to job specs written, on a real SeaweedFS.

Starts its own SeaweedFS S3 server on free loopback ports (the test helper in
tests/support/seaweed_server.py), then for each round: fresh buckets, PUT the CSV into the raw
bucket, run the ingest core (`readmission.ingest.ingest_object`), and print the figures.

    .venv/bin/python scripts/bench/bench_ingest.py [--rounds 3] [--compare]

--compare also times the pandas reference parser and scikit-learn's StratifiedGroupKFold.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.seaweed_server import SeaweedServer  # noqa: E402

from readmission import contract, ingest  # noqa: E402
from readmission.config import Buckets, Settings  # noqa: E402
from readmission.dataset import ensure_dataset, read_dataset_bytes  # noqa: E402
from readmission.storage import ObjectStore  # noqa: E402


def one_round(store: ObjectStore, data: bytes, n: int) -> dict[str, float]:
    buckets = Buckets(
        **{f: f"{getattr(Buckets, f)}-bench{n}" for f in Buckets.__dataclass_fields__}
    )
    store.ensure_buckets(buckets.all())
    settings = replace(Settings.from_env(), buckets=buckets)
    start = time.perf_counter()
    store.put_bytes(buckets.raw, "diabetic_data.csv", data, "text/csv")
    uploaded = time.perf_counter()
    outcome = ingest.ingest_object(store, settings, buckets.raw, "diabetic_data.csv")
    done = time.perf_counter()
    assert outcome.status == ingest.INGESTED, outcome.summary()
    print(f"  round {n}: {outcome.summary()}")
    return {
        "upload": uploaded - start,
        **outcome.seconds,
        "ingest": done - uploaded,
        "total": done - start,
        "jobs": outcome.jobs,
    }


def compare(data: bytes) -> None:
    import numpy as np
    from sklearn.model_selection import StratifiedGroupKFold

    from readmission.split import split_rows

    start = time.perf_counter()
    contract._detailed_frame(data, contract._header(data))
    print(f"pandas reference parser (the old parse_csv): {time.perf_counter() - start:.2f}s")
    start = time.perf_counter()
    table = contract.parse_csv_table(data)
    print(f"parse_csv_table (Arrow fast path):          {time.perf_counter() - start:.2f}s")
    patients = table.column(contract.GROUP_COLUMN).to_numpy()
    labels = ingest.labels_of(table)
    start = time.perf_counter()
    split_rows(patients, table.column("encounter_id").to_numpy(), 42)
    print(f"split_rows (keyed hash of patient_nbr):     {time.perf_counter() - start:.3f}s")
    start = time.perf_counter()
    folds = StratifiedGroupKFold(n_splits=7, shuffle=True, random_state=42)
    next(folds.split(np.zeros(len(labels)), labels, patients))
    print(f"StratifiedGroupKFold, first of 7 folds:     {time.perf_counter() - start:.2f}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare", action="store_true")
    args = parser.parse_args()
    path = ensure_dataset()
    data = read_dataset_bytes(path)
    print(f"data: {path} ({len(data):,} bytes)")
    contract.arrow_schema()  # the function warms its imports at process start; so does this
    if args.compare:
        compare(data)
    server = SeaweedServer()
    start = time.perf_counter()
    server.start()
    print(f"SeaweedFS S3 up at {server.endpoint_url} in {time.perf_counter() - start:.1f}s")
    try:
        store = ObjectStore(server.client())
        rounds = [one_round(store, data, n) for n in range(args.rounds)]
    finally:
        server.stop()
    print(f"median of {len(rounds)} rounds (seconds):")
    for name in rounds[0]:
        values = [r[name] for r in rounds]
        print(
            f"  {name:22s} {statistics.median(values):7.2f}   (all: "
            f"{', '.join(f'{v:.2f}' for v in values)})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
