"""Total fit work of a corpus at 1x, 2x, 5x, 10x the real file: the schedule of cumulative sets
(readmission.corpus.set_sizes) against the old one-set-per-batch schedule.

For each scale k, the k-x file of scripts/bench/make_corpus.py (written first if missing) is split
as ingest splits one drop of it (seed, 15,000-row batches), its cumulative sets are laid out by
the schedule of the settings (CUMULATIVE_LINEAR_SETS, CUMULATIVE_GROWTH), and every algorithm is
fitted on every set, one after another on one thread (as the train function does); the table
prints the sum of fit CPU seconds per scale and its ratio to the first scale. An algorithm named
in --extrapolate (e.g. `gradient_boosting@10`: at scale 10) is not fitted at that scale: its
cost there is its CPU seconds per training row, measured on the largest set it was fitted on in
this run, times the rows of the sets; the output says which figures are extrapolated.
Also printed: rows fitted (the algorithm-independent work) under both schedules.

    .venv/bin/python scripts/bench/bench_schedule.py --scales 1,2,5,10 \\
        [--algorithms a,b] [--extrapolate gradient_boosting@10]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts" / "bench")]

import make_corpus  # noqa: E402

from readmission import contract, corpus  # noqa: E402
from readmission.config import Settings  # noqa: E402
from readmission.dataset import ensure_dataset, read_dataset_bytes  # noqa: E402
from readmission.features import build_pipeline, target_values, to_model_frame  # noqa: E402
from readmission.split import split_rows  # noqa: E402
from readmission.training import fit_timed  # noqa: E402


def set_rows(batch_sizes: list[int], sizes: list[int]) -> list[int]:
    ends = np.cumsum(batch_sizes)
    return [int(ends[size - 1]) for size in sizes]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="1,2,5,10")
    parser.add_argument("--algorithms", default=",".join(Settings().algorithms))
    parser.add_argument("--extrapolate", default="", help="algorithm@scale,... not fitted")
    args = parser.parse_args()
    settings = Settings.from_env()
    scales = [int(s) for s in args.scales.split(",") if s.strip()]
    algorithms = [a for a in args.algorithms.split(",") if a]
    skipped = {tuple(item.split("@")) for item in args.extrapolate.split(",") if item}
    data = read_dataset_bytes(ensure_dataset())
    out = make_corpus.default_out()
    print(
        f"schedule: {settings.cumulative_linear_sets} single-batch sets, then x"
        f"{settings.cumulative_growth:g}; batch {settings.batch_rows:,} rows; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared: CPU seconds, not wall)"
    )
    per_row: dict[str, float] = {}  # CPU seconds per training row, largest set fitted so far
    report = []
    for scale in scales:
        path = out / f"diabetic_data_{scale}x.csv"
        if not path.exists():
            make_corpus.write_scaled(data, scale, out, seed=7)
        whole = contract.parse_csv(path.read_bytes())
        split = split_rows(
            whole[contract.GROUP_COLUMN].to_numpy(),
            whole["encounter_id"].to_numpy(),
            settings.split_seed,
        )
        batches = split.batches(settings.batch_rows)
        lengths = [len(b) for b in batches]
        sizes = corpus.set_sizes(
            len(batches), [], settings.cumulative_linear_sets, settings.cumulative_growth
        )
        rows = set_rows(lengths, sizes)
        linear_rows = set_rows(lengths, list(range(1, len(batches) + 1)))
        seconds: dict[str, float] = {}
        extrapolated = []
        for algorithm in algorithms:
            if (algorithm, str(scale)) in skipped:
                seconds[algorithm] = per_row[algorithm] * sum(rows)
                extrapolated.append(algorithm)
                continue
            seconds[algorithm] = 0.0
            for size, n in zip(sizes, rows, strict=True):
                train = whole.iloc[np.concatenate(batches[:size])].reset_index(drop=True)
                timing = fit_timed(
                    build_pipeline(algorithm), to_model_frame(train), target_values(train)
                )
                seconds[algorithm] += timing.cpu_seconds
                per_row[algorithm] = timing.cpu_seconds / n
                print(
                    f"  {scale}x {algorithm} {n:,} rows: {timing.cpu_seconds:.1f} CPU s", flush=True
                )
        report.append((scale, len(whole), sizes, rows, linear_rows, seconds, extrapolated))
        del whole

    first = report[0]
    print()
    print(
        "| scale | rows | sets (batches each) | rows fitted (ratio) | old schedule: sets, rows "
        "fitted (ratio) | fit CPU s (ratio) | per algorithm (CPU s) |"
    )
    print("| ---: " * 7 + "|")
    for scale, n, sizes, rows, linear, seconds, extrapolated in report:
        total = sum(seconds.values())
        cells = ", ".join(
            f"{a} {s:.0f}" + (" (extrapolated)" if a in extrapolated else "")
            for a, s in seconds.items()
        )
        print(
            f"| {scale}x | {n:,} | {len(sizes)} ({','.join(map(str, sizes))}) | "
            f"{sum(rows):,} ({sum(rows) / sum(first[3]):.2f}) | {len(linear)}, {sum(linear):,} "
            f"({sum(linear) / sum(first[4]):.2f}) | {total:.0f} "
            f"({total / sum(first[5].values()):.2f}) | {cells} |"
        )
    for scale, *_, extrapolated in report:
        for algorithm in extrapolated:
            print(
                f"{scale}x {algorithm}: extrapolated, not fitted: {per_row[algorithm] * 1e3:.3f} "
                f"CPU s per 1,000 rows (its largest fitted set) x the rows of the sets"
            )
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
