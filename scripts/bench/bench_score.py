#!/usr/bin/env python3
"""Benchmark of batch scoring and explanations (not a test): one run on this machine prints

* for the test split of the real file (~15,000 rows) and a --rows file (default 100,000 rows
  resampled from the real file with a fixed seed, written to a temp dir, never kept), with and
  without explanations (`explain/` prefix): seconds from the notification (the CloudEvent
  POSTed to the real `score` function, as the broker does) to the summary written, rows/s,
  the summary's own per-row costs, and the function's peak RSS (VmHWM of its worker);
* the cost of parsing the --rows file with the stdlib csv module and with pyarrow's streaming
  reader (the reader the scorer uses), in this process;
* `POST /predict` against `POST /predict?explain=true` with `hey` at concurrency 4: req/s and
  p50/p99, alternating rounds, the best round of each kept.

    .venv/bin/python scripts/bench/bench_score.py [--rows 100000] [--explain-large]
        [--concurrency 4] [--duration 10] [--rounds 3] [--only all|score|explain]

The model is bench_predict's (gradient boosting on 20,000 rows, cached in .state/bench_predict/);
the object store is a real SeaweedFS with keys (tests/support/seaweed_server.py).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "scripts" / "bench")]

from bench_predict import Function, hey, log, publish_champion, realistic_model  # noqa: E402
from support.seaweed_server import SeaweedServer, real_csv_bytes  # noqa: E402

from readmission.localstack.processes import child_pids, free_port, stop_popen_group  # noqa: E402
from readmission.serving.examples import EXAMPLE_PATIENT  # noqa: E402

FUNCTIONS_FRAMEWORK = Path(sys.executable).with_name("functions-framework")


def test_split_csv() -> bytes:
    """The real file's test split (split by the keyed hash of patient_nbr, SPLIT_SEED 42)."""
    from readmission.split import split_rows

    data = real_csv_bytes()
    lines = data.split(b"\r\n")
    rows = [line for line in lines[1:] if line]
    header = lines[0].split(b",")
    ids = np.array([int(r.split(b",", 2)[header.index(b"encounter_id")]) for r in rows])
    patients = np.array([int(r.split(b",", 2)[header.index(b"patient_nbr")]) for r in rows])
    test = split_rows(patients, ids, 42).test
    return b"\r\n".join([lines[0], *(rows[i] for i in np.sort(test))]) + b"\r\n"


def resampled_csv(rows: int, seed: int = 7) -> bytes:
    """`rows` rows drawn with replacement from the real file (header kept)."""
    lines = real_csv_bytes().split(b"\r\n")
    data = [line for line in lines[1:] if line]
    chosen = np.random.default_rng(seed).integers(0, len(data), rows)
    return b"\r\n".join([lines[0], *(data[i] for i in chosen)]) + b"\r\n"


def parse_costs(data: bytes) -> dict[str, float]:
    """Seconds to parse the file with csv.reader and with pyarrow's streaming reader."""
    import pyarrow.csv as pacsv

    started = time.perf_counter()
    count = sum(1 for _ in csv.reader(io.StringIO(data.decode())))
    stdlib = time.perf_counter() - started
    started = time.perf_counter()
    reader = pacsv.open_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(block_size=4 << 20, use_threads=False),
        convert_options=pacsv.ConvertOptions(strings_can_be_null=False),
    )
    arrow_rows = sum(batch.num_rows for batch in reader)
    arrow = time.perf_counter() - started
    assert arrow_rows == count - 1
    return {"stdlib_csv_s": round(stdlib, 3), "pyarrow_stream_s": round(arrow, 3)}


class ScoreFunction:
    """The real `score` function (functions-framework, gunicorn) on a free loopback port."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.process = subprocess.Popen(
            [
                str(FUNCTIONS_FRAMEWORK),
                "--target=score",
                f"--source={ROOT / 'functions' / 'score' / 'main.py'}",
                "--signature-type=cloudevent",
                "--host=127.0.0.1",
                f"--port={self.port}",
            ],
            env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            process_group=0,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the score function did not open its port")

    def notify(self, bucket: str, key: str, etag: str, size: int) -> float:
        """POST the scoring CloudEvent as the broker does; seconds until its 204."""
        body = json.dumps({"bucket": bucket, "key": key, "etag": etag, "size": size}).encode()
        headers = {
            "ce-specversion": "1.0",
            "ce-id": f"bench-{key}-{etag}",
            "ce-type": "io.readmission.scoring.created",
            "ce-source": f"s3://{bucket}",
            "ce-subject": key,
            "content-type": "application/json",
        }
        started = time.perf_counter()
        request = urllib.request.Request(self.url, data=body, headers=headers)
        with urllib.request.urlopen(request, timeout=900) as response:
            assert response.status in (200, 204), response.status
        return time.perf_counter() - started

    def peak_rss_mb(self) -> float:
        """The largest VmHWM among master and workers (the worker does the scoring)."""
        peaks = []
        for pid in [self.process.pid, *child_pids(self.process.pid)]:
            status = Path(f"/proc/{pid}/status").read_text()
            peaks.append(int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024)
        return max(peaks)

    def cpu_seconds(self) -> float:
        """User + system CPU time of master and workers so far (steadier than wall time when
        other work shares the machine)."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in [self.process.pid, *child_pids(self.process.pid)]:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / ticks

    def stop(self) -> None:
        stop_popen_group(self.process)


def score_case(
    function: ScoreFunction, store: Any, key: str, data: bytes, version: str
) -> dict[str, Any]:
    store.put_object(Bucket="scoring", Key=key, Body=data)
    etag = store.head_object(Bucket="scoring", Key=key)["ETag"].strip('"')
    cpu = function.cpu_seconds()
    seconds = function.notify("scoring", key, etag, len(data))
    cpu = function.cpu_seconds() - cpu
    summary_key = f"predictions/v{version}/{key}.summary.json"
    summary = json.loads(store.get_object(Bucket="scoring", Key=summary_key)["Body"].read())
    rows = summary["rows"]
    return {
        "key": key,
        "rows_read": rows["read"],
        "rows_scored": rows["scored"],
        "rows_rejected": rows["rejected"],
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows["scored"] / seconds, 1),
        "cpu_s": round(cpu, 2),
        "rows_per_cpu_s": round(rows["scored"] / cpu, 1) if cpu else None,
        "summary_timing": summary["timing"],
        "peak_rss_mb": round(function.peak_rss_mb(), 1),
    }


def explain_latency(
    onnx_bytes: bytes, metadata: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-explain-"))
    (workdir / "model.onnx").write_bytes(onnx_bytes)
    (workdir / "metadata.json").write_text(json.dumps(metadata))
    body = workdir / "single.json"
    body.write_text(json.dumps({"features": EXAMPLE_PATIENT}))
    env = {
        "MODEL_PATH": str(workdir / "model.onnx"),
        "MODEL_METADATA_PATH": str(workdir / "metadata.json"),
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
    }
    function = Function(env, ROOT / "functions" / "predict" / "main.py")
    results: dict[str, Any] = {}
    try:
        function.first_success("/predict?explain=true", body.read_bytes())
        urls = {"plain": "/predict", "explain": "/predict?explain=true"}
        for path in urls.values():
            hey(function.url + path, body, args.concurrency, 2)  # warm-up
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in urls}
        for _ in range(args.rounds):
            for name, path in urls.items():
                run = hey(function.url + path, body, args.concurrency, args.duration)
                runs[name].append(run)
                log(f"{name}: {run}")
        for name, found in runs.items():
            results[name] = max(found, key=lambda r: r["rps"])
        results["explain_over_plain_p99"] = round(
            results["explain"]["p99_ms"] / results["plain"]["p99_ms"], 2
        )
    finally:
        function.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the large file")
    parser.add_argument(
        "--explain-large", action="store_true", help="also score the large file with explanations"
    )
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=("all", "score", "explain"), default="all")
    parser.add_argument("--cache", type=Path, default=ROOT / ".state" / "bench_predict")
    args = parser.parse_args(argv)
    os.environ.setdefault("DIABETES_CSV", str(ROOT.parent / "shared/data/diabetic_data.csv.gz"))
    onnx_bytes, metadata = realistic_model("gradient_boosting", 20_000, args.cache)
    results: dict[str, Any] = {"cores": os.cpu_count(), "load_average": os.getloadavg()}

    if args.only in ("all", "score"):
        test_split, large = test_split_csv(), resampled_csv(args.rows)
        results["parse"] = parse_costs(large)
        log(f"parse {args.rows} rows: {results['parse']}")
        seaweed = SeaweedServer().start()
        try:
            store: Any = seaweed.client()
            for bucket in ("models", "scoring", "rejected"):
                store.create_bucket(Bucket=bucket)
            publish_champion(store, onnx_bytes, metadata)
            function = ScoreFunction({**seaweed.env(), "LOG_LEVEL": "WARNING"})
            try:
                version = str(metadata["version"])
                first = score_case(function, store, "warm-up.csv", test_split[:20_000], version)
                results["cold_first_file"] = first
                log(f"first file (model load included): {first}")
                cases = [
                    ("test-split.csv", test_split),
                    (f"resampled-{args.rows}.csv", large),
                    ("explain/test-split.csv", test_split),
                ]
                if args.explain_large:
                    cases.append((f"explain/resampled-{args.rows}.csv", large))
                for key, data in cases:
                    results[key] = score_case(function, store, key, data, version)
                    log(f"{key}: {results[key]}")
                plain = results["test-split.csv"]["rows_per_s"]
                results["explain_over_plain_rows_per_s"] = round(
                    results["explain/test-split.csv"]["rows_per_s"] / plain, 4
                )
            finally:
                function.stop()
        finally:
            seaweed.stop()

    if args.only in ("all", "explain"):
        results["explain_latency"] = explain_latency(onnx_bytes, metadata, args)
    results["load_average_after"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
