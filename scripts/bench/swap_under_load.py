#!/usr/bin/env python3
"""Load during a champion swap: zero failed requests required.

    .venv/bin/python scripts/bench/swap_under_load.py [--concurrency 64] [--duration 60]
        [--swap-at 20]

Starts its own SeaweedFS (tests/support/seaweed_server.SeaweedServer, keys required) and the predict
function (scripts/bench/bench_predict.Function, serving the store; MODEL_POLL_SECONDS=1), publishes
champion version 1, runs scripts/loadtest.sh (hey) against /predict at the given concurrency
for the given time, and --swap-at seconds in publishes a second, different model (version 2:
the same pipeline trained on other rows) as the aggregator does: the ONNX object first, then
champion/metadata.json. A sampler sends one /predict every 20 ms during the run and records
the model_version of each answer (hey does not keep bodies). Prints the load-test summary, the
versions seen (counts, first v2 answer, any v1 answer after it) and the function's model-load
count; exit status 1 on any failed request or if version 2 never answered.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "scripts" / "bench")]

from bench_predict import (  # noqa: E402  (bench_predict puts ROOT and tests/ on sys.path)
    Function,
    SeaweedServer,
    log,
    publish_champion,
    realistic_model,
)

from readmission.serving.examples import EXAMPLE_PATIENT  # noqa: E402


class Sampler(threading.Thread):
    """One /predict every `interval` s: the model version of each answer, and failures."""

    def __init__(self, url: str, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.url = url + "/predict"
        self.interval = interval
        self.body = json.dumps({"features": EXAMPLE_PATIENT}).encode()
        self.seen: list[tuple[float, str]] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            request = urllib.request.Request(
                self.url, data=self.body, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    version = json.loads(response.read())["model_version"]
                self.seen.append((time.monotonic(), str(version)))
            except Exception as exc:  # any failure counts
                self.failures.append(f"{type(exc).__name__}: {exc}"[:200])


def metric(url: str, name: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return " ".join(line for line in text.splitlines() if line.startswith(name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=int, default=60, help="seconds of load")
    parser.add_argument("--swap-at", type=float, default=20.0, help="seconds into the load")
    parser.add_argument("--algorithm", default="gradient_boosting")
    parser.add_argument("--threads", default="4", help="gunicorn THREADS of the function")
    parser.add_argument("--cache", type=Path, default=ROOT / ".state" / "bench_predict")
    args = parser.parse_args(argv)

    first_bytes, first = realistic_model(args.algorithm, 20_000, args.cache)
    second_bytes, trained = realistic_model(args.algorithm, 10_000, args.cache)
    second = copy.deepcopy(trained)
    second.update(version="2", run_id="swap-v2", model_key="swap-v2/model.onnx")
    if second_bytes == first_bytes:
        raise RuntimeError("the two champions must differ")

    seaweed = SeaweedServer().start()
    function = None
    try:
        store: Any = seaweed.client()
        store.create_bucket(Bucket="models")
        publish_champion(store, first_bytes, first)
        env = {
            **seaweed.env(),
            "THREADS": args.threads,
            "WORKERS": "1",
            "LOG_LEVEL": "WARNING",
            "MODEL_POLL_SECONDS": "1",
        }
        function = Function(env, ROOT / "functions" / "predict" / "main.py")
        function.first_success("/predict", json.dumps({"features": EXAMPLE_PATIENT}).encode())
        sampler = Sampler(function.url)
        load = subprocess.Popen(
            [
                str(ROOT / "scripts" / "loadtest.sh"),
                function.url,
                "-c",
                str(args.concurrency),
                "-z",
                f"{args.duration}s",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        started = time.monotonic()
        sampler.start()
        time.sleep(args.swap_at)
        publish_champion(store, second_bytes, second)
        swapped_at = time.monotonic()
        log(f"published version 2 at {swapped_at - started:.1f} s into the load")
        summary, _ = load.communicate(timeout=args.duration + 120)
        sampler.stop.set()
        sampler.join(timeout=15)
        loads = metric(function.url, "predict_model_loads_total")
        info = metric(function.url, "predict_model_info")
    finally:
        if function is not None:
            function.stop()
        seaweed.stop()

    counts = Counter(version for _, version in sampler.seen)
    first_v2 = next((t for t, v in sampler.seen if v == "2"), None)
    v1_after = sum(1 for t, v in sampler.seen if first_v2 is not None and t > first_v2 and v == "1")
    print(summary.rstrip())
    print("== champion swap ==")
    print(f"swap published at:  {swapped_at - started:.1f} s (ONNX, then champion/metadata.json)")
    if first_v2 is not None:
        after = first_v2 - swapped_at
        print(f"first v2 answer:    {first_v2 - started:.1f} s ({after:.2f} s after publishing)")
    versions = dict(sorted(counts.items()))
    print(f"versions seen:      {versions} (sampler, {len(sampler.seen)} answers)")
    print(f"v1 after first v2:  {v1_after}")
    print(f"sampler failures:   {len(sampler.failures)} {sampler.failures[:3]}")
    print(f"model loads:        {loads}")
    print(f"model info:         {info}")
    ok = load.returncode == 0 and not sampler.failures and counts.get("2") and not v1_after
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
