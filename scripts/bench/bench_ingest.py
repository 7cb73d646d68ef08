"""Benchmark (not a test): the real UCI CSV from upload to job specs written, on a real SeaweedFS.

Starts its own SeaweedFS S3 server on free loopback ports (the test helper in
tests/support/seaweed_server.py), then for each round: fresh buckets, PUT the CSV into the raw
bucket, run the ingest core (`readmission.ingest.ingest_object`), and print the figures.

    .venv/bin/python scripts/bench/bench_ingest.py [--rounds 3] [--compare]
    .venv/bin/python scripts/bench/bench_ingest.py --scale 1,5,10

--compare also times the pandas reference parser and scikit-learn's StratifiedGroupKFold.

--scale runs the growth benchmark instead: for each factor k, the k-x file of
scripts/bench/make_corpus.py (written first if missing, into its default cache directory) is
uploaded in 8 MiB multipart parts into fresh buckets (an empty corpus), then the ingest core
runs in a child process (imports warmed first) that reports its wall seconds per phase, CPU
seconds and peak RSS (`ru_maxrss` of the child, after its imports and at its end). The table
gives each scale's figures and their ratios to the first scale's, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
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


def child(key: str) -> int:
    """Ingest s3://$BUCKET_RAW/key with the settings of the environment; print the figures."""
    contract.arrow_schema()  # the function warms its imports at process start
    base = resource.getrusage(resource.RUSAGE_SELF)
    settings = Settings.from_env()
    store = ObjectStore.from_settings(settings)
    start = time.perf_counter()
    outcome = ingest.ingest_object(store, settings, settings.buckets.raw, key)
    seconds = time.perf_counter() - start
    end = resource.getrusage(resource.RUSAGE_SELF)
    figures = {
        "status": outcome.status,
        "jobs": outcome.jobs,
        "phases": outcome.seconds,
        "seconds": seconds,
        "cpu_seconds": end.ru_utime + end.ru_stime - base.ru_utime - base.ru_stime,
        "rss_after_imports_mib": base.ru_maxrss / 1024,
        "rss_peak_mib": end.ru_maxrss / 1024,
    }
    print(json.dumps(figures))
    return 0


def scale_run(server: SeaweedServer, factor: int, path: Path) -> dict[str, object]:
    from boto3.s3.transfer import TransferConfig

    buckets = Buckets(
        **{f: f"{getattr(Buckets, f)}-scale{factor}" for f in Buckets.__dataclass_fields__}
    )
    store = ObjectStore(server.client())
    store.ensure_buckets(buckets.all())
    parts = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20)
    start = time.perf_counter()
    store.client.upload_file(str(path), buckets.raw, path.name, Config=parts)
    upload = time.perf_counter() - start
    env = {**os.environ, **server.env(), "PYTHONPATH": str(ROOT)}
    env |= {f"BUCKET_{f.upper()}": getattr(buckets, f) for f in Buckets.__dataclass_fields__}
    done = subprocess.run(
        [sys.executable, __file__, "--child", path.name],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["status"] == ingest.INGESTED, figures
    return {"factor": factor, "bytes": path.stat().st_size, "upload": upload, **figures}


def scale_table(factors: list[int]) -> None:
    sys.path.insert(0, str(ROOT / "scripts" / "bench"))
    import make_corpus

    data = read_dataset_bytes(ensure_dataset())
    out = make_corpus.default_out()
    paths = {}
    for factor in factors:
        path = out / f"diabetic_data_{factor}x.csv"
        if not path.exists():
            make_corpus.write_scaled(data, factor, out, seed=7)
        paths[factor] = path
    print(f"load average before: {os.getloadavg()[0]:.2f} (2 cores, shared)")
    server = SeaweedServer()
    server.start()
    try:
        rows = [scale_run(server, f, paths[f]) for f in factors]
    finally:
        server.stop()
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    first = rows[0]
    header = (
        "| scale | bytes | upload s | ingest s (ratio) | ingest CPU s (ratio) | "
        "peak RSS MiB (ratio) | RSS after imports MiB | jobs |"
    )
    print(header)
    print("| ---: " * 8 + "|")
    for r in rows:
        print(
            f"| {r['factor']}x | {r['bytes']:,} | {r['upload']:.1f} | "
            f"{r['seconds']:.1f} ({r['seconds'] / first['seconds']:.2f}) | "
            f"{r['cpu_seconds']:.1f} ({r['cpu_seconds'] / first['cpu_seconds']:.2f}) | "
            f"{r['rss_peak_mib']:.0f} ({r['rss_peak_mib'] / first['rss_peak_mib']:.2f}) | "
            f"{r['rss_after_imports_mib']:.0f} | {r['jobs']} |"
        )
    for r in rows:
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items())
        print(f"  {r['factor']}x phases (s): {phases}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--scale", help="comma-separated factors, e.g. 1,5,10")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    if args.scale:
        scale_table([int(f) for f in args.scale.split(",") if f.strip()])
        return 0
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
