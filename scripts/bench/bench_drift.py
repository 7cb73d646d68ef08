"""Benchmark (not a test): the cost of a drift report on the real UCI CSV (docs/monitoring.md).

Parses the real file, splits it into two random halves, and times (median of the rounds) the
reference profile of one half (`drift.build_profile`), the report of the other half against
it (`drift.compare`, scipy imported before timing; its first import is printed apart) and its
Markdown; beside them, in the same run, the parse of the whole file (`contract.parse_csv_table`,
what ingest pays anyway), as the ratio the report adds to it.

    .venv/bin/python scripts/bench/bench_drift.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from readmission import contract, drift  # noqa: E402
from readmission.dataset import ensure_dataset, read_dataset_bytes  # noqa: E402
from readmission.storage import json_bytes  # noqa: E402


def median_seconds(rounds: int, work: Callable[[], Any]) -> tuple[float, Any]:
    times, value = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        value = work()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    data = read_dataset_bytes(ensure_dataset())
    parse, table = median_seconds(args.rounds, lambda: contract.parse_csv_table(data))
    mask = np.random.default_rng(18).random(table.num_rows) < 0.5
    reference_rows, drop = table.filter(pa.array(mask)), table.filter(pa.array(~mask))
    start = time.perf_counter()
    import scipy.stats  # noqa: F401

    scipy_import = time.perf_counter() - start
    profile_s, profile = median_seconds(args.rounds, lambda: drift.build_profile(reference_rows))
    thresholds = drift.Thresholds()
    compare_s, report = median_seconds(
        args.rounds, lambda: drift.compare(profile, drop, thresholds, drop_id="bench")
    )
    markdown_s, _ = median_seconds(args.rounds, lambda: drift.render_markdown(report))
    print(f"real file: {table.num_rows:,} rows; halves {reference_rows.num_rows:,} (reference)")
    print(f"  and {drop.num_rows:,} (drop); median of {args.rounds} rounds")
    print(f"parse the whole file (ingest pays it anyway): {parse:.3f} s")
    print(f"first import of scipy.stats in this process:  {scipy_import:.3f} s")
    print(f"build_profile (reference half):                {profile_s:.3f} s")
    print(f"  profile size: {len(json_bytes(profile)):,} bytes of canonical JSON")
    print(f"compare (drop half):                           {compare_s:.3f} s")
    print(f"render_markdown:                               {markdown_s:.4f} s")
    print(f"report ÷ parse, same run: {(compare_s + markdown_s) / parse:.2f}")
    print(f"report status: {report['status']}; max PSI {report['max_psi']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
