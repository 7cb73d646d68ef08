"""Peak memory of one fit against its training rows: the figures that size the train Service and
the JobSink's Jobs (docs/kubernetes.md).

Each (algorithm, rows) runs in a child process, as a train replica or a Job does: it reads the
real file, keeps `rows` training rows of the patient-grouped split (beyond the 71,268 the file
has, real training rows drawn again with a fixed seed: the memory of a fit depends on the
number of rows, not on their being new), drops the rest, fits on one thread and reports its
RSS before the fit (the training frame held, the whole file released) and its peak RSS during
the fit (VmHWM, reset before it). The parent prints a table, then per algorithm
the least-squares line peak = a + b x rows and its value at 710,000 rows (an extrapolation,
said so).

    .venv/bin/python scripts/bench/bench_fit_memory.py [--algorithms a,b] [--rows 15000,71268]
        [--max-rows-slow 71268]   # gradient_boosting only up to this (its fits are long)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SLOW = {"gradient_boosting"}
EXTRAPOLATE_ROWS = 710_000


def _status_mb(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]


def _reset_peak() -> None:
    """From now on VmHWM (the peak RSS) counts from the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def child(algorithm: str, rows: int) -> None:
    import numpy as np
    from real_data import real_split

    from readmission.config import Settings
    from readmission.features import build_pipeline, target_values, to_model_frame
    from readmission.training import fit_timed

    settings = Settings.from_env()
    whole, split = real_split(settings.split_seed)
    train_rows = np.concatenate(split.batches(settings.batch_rows))
    if rows <= len(train_rows):
        chosen = train_rows[:rows]
    else:
        extra = np.random.default_rng(0).choice(train_rows, rows - len(train_rows))
        chosen = np.concatenate([train_rows, extra])
    train = whole.iloc[chosen].reset_index(drop=True)
    del whole, split
    x, y = to_model_frame(train), target_values(train)
    del train
    gc.collect()
    _reset_peak()  # the peak of reading the whole file is not the fit's
    before = _status_mb("VmRSS")
    timing = fit_timed(build_pipeline(algorithm), x, y)
    peak = _status_mb("VmHWM")
    print(
        json.dumps(
            {"before_mb": before, "peak_mb": peak, "cpu_s": timing.cpu_seconds, "rows": len(x)}
        )
    )


def main() -> None:
    from readmission.features import ALGORITHMS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--rows", default="15000,71268,142536,285072")
    parser.add_argument("--max-rows-slow", type=int, default=71_268)
    parser.add_argument("--child", nargs=2, metavar=("ALGORITHM", "ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return

    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| algorithm | training rows | RSS before fit MB | peak RSS MB | fit CPU s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    started = time.monotonic()
    measured: dict[str, list[tuple[int, float]]] = {}
    for algorithm in args.algorithms.split(","):
        for rows in (int(r) for r in args.rows.split(",")):
            if algorithm in SLOW and rows > args.max_rows_slow:
                continue
            output = subprocess.run(
                [sys.executable, __file__, "--child", algorithm, str(rows)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            result = json.loads(output.strip().splitlines()[-1])
            measured.setdefault(algorithm, []).append((rows, result["peak_mb"]))
            print(
                f"| {algorithm} | {rows:,} | {result['before_mb']:.0f} | "
                f"{result['peak_mb']:.0f} | {result['cpu_s']:.1f} |",
                flush=True,
            )
    print()
    print(f"peak RSS = a + b x rows (least squares); at {EXTRAPOLATE_ROWS:,} rows extrapolated:")
    for algorithm, points in measured.items():
        if len(points) < 2:
            continue
        n = len(points)
        mean_x = sum(r for r, _ in points) / n
        mean_y = sum(m for _, m in points) / n
        slope = sum((r - mean_x) * (m - mean_y) for r, m in points) / sum(
            (r - mean_x) ** 2 for r, _ in points
        )
        intercept = mean_y - slope * mean_x
        print(
            f"  {algorithm}: {intercept:.0f} MB + {slope * 100_000:.0f} MB per 100k rows -> "
            f"{intercept + slope * EXTRAPOLATE_ROWS:,.0f} MB at {EXTRAPOLATE_ROWS:,} "
            f"(measured up to {max(r for r, _ in points):,})"
        )
    print(f"took {time.monotonic() - started:.0f} s; load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
