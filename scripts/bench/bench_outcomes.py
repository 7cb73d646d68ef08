#!/usr/bin/env python3
"""Benchmark of the outcomes join as the prediction log grows (not a test): one run prints,
for each --days count, the seconds the outcomes join takes to read a prediction log of that
many days of trickle traffic (`read_log`), before and after the log's finished days are
compacted (readmission.log_compaction), what the compaction itself took, and the whole join of
one outcomes CSV (`process_outcomes`) afterwards.

The log is what a server under a trickle of traffic leaves: the predict function's writer
ships an object every PREDICTION_LOG_SECONDS (30 s) in which it answered a request, so a day
of steady single requests is up to 2,880 objects per server process, whatever the row count.
Here each day has --objects-per-day objects of --rows-per-object single-row predictions
(written by the predict function's own `PredictionLog`: tests/support/log_parts.py), all days
finished; the outcomes CSV names --outcomes of their encounter ids. The object store is a
real SeaweedFS with keys (tests/support/seaweed_server.py).

    .venv/bin/python scripts/bench/bench_outcomes.py [--days 1,3] [--objects-per-day 2880]
        [--rows-per-object 2] [--outcomes 1000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.log_parts import ship_parts  # noqa: E402
from support.seaweed_server import SeaweedServer  # noqa: E402

from readmission import outcomes  # noqa: E402
from readmission.config import Buckets, Settings  # noqa: E402
from readmission.log_compaction import compact_log  # noqa: E402
from readmission.storage import ObjectStore  # noqa: E402

FIRST_DAY = dt.date(2026, 1, 1)


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def measure(store: ObjectStore, settings: Settings, days: int, args: argparse.Namespace) -> str:
    """One line of the table: a log of `days` finished days, read, compacted, read, joined."""
    buckets = settings.buckets
    store.ensure_buckets([buckets.models, buckets.predictions_log, buckets.outcomes])
    encounters: list[int] = []
    for day in range(days):
        date = (FIRST_DAY + dt.timedelta(days=day)).isoformat()
        encounters += ship_parts(
            store,
            buckets.predictions_log,
            f"1/{date}",
            args.objects_per_day,
            "bench",
            args.rows_per_object,
        )
    rows = len(encounters)
    step = max(1, rows // args.outcomes)
    lines = ["request_id,encounter_id,readmitted"]
    lines += [f",{n},NO" for n in encounters[::step]][: args.outcomes]
    store.put_bytes(buckets.outcomes, "outcomes.csv", ("\n".join(lines) + "\n").encode())
    objects = len(store.list_keys(buckets.predictions_log))
    read_before = timed(lambda: outcomes.read_log(store, buckets.predictions_log))
    today = FIRST_DAY + dt.timedelta(days=days + 2)
    started = time.perf_counter()
    report = compact_log(store, buckets.predictions_log, today, budget_seconds=3600)
    compaction = time.perf_counter() - started
    read_after = timed(lambda: outcomes.read_log(store, buckets.predictions_log))
    join = timed(
        lambda: outcomes.process_outcomes(store, settings, buckets.outcomes, "outcomes.csv")
    )
    return (
        f"{days:4d}  {objects:7,d}  {rows:7,d}  {read_before:10.1f}  {compaction:12.1f}"
        f"  {read_after:12.2f}  {read_before / read_after:14.0f}  {join:6.2f}"
        f"   ({report.summary()})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", default="1,3")
    parser.add_argument("--objects-per-day", type=int, default=2880)
    parser.add_argument("--rows-per-object", type=int, default=2)
    parser.add_argument("--outcomes", type=int, default=1000)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # one class of outcome: ROC-AUC undefined, as expected
    server = SeaweedServer().start()
    try:
        store = ObjectStore.connect(
            server.endpoint_url, "us-east-1", server.access_key, server.secret_key
        )
        print(
            "days  objects  rows     read log s  compaction s  read after s  before ÷ after  join s"
        )
        for n, days in enumerate(int(d) for d in args.days.split(",")):
            buckets = Buckets(
                models=f"b{n}-models", predictions_log=f"b{n}-log", outcomes=f"b{n}-out"
            )
            settings = Settings(s3_endpoint_url=server.endpoint_url, buckets=buckets)
            print(measure(store, settings, days, args), flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
