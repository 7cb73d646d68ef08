"""Fit time of every algorithm on every cumulative training set of the real file, plus ONNX
export parity on the validation split: the numbers behind docs/training.md.

Runs the fits one after another on one thread each (as the train function does) and prints a
Markdown table: CPU and wall seconds of each fit, validation F1 (weighted) and ROC-AUC, and for
the largest set the ONNX size, export seconds and parity (max |dp|, argmax mismatches).

    .venv/bin/python scripts/bench/bench_training.py [--algorithms a,b] [--sets 0,4] [--no-onnx]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from real_data import real_split

from readmission.config import Settings
from readmission.features import (
    ALGORITHMS,
    build_pipeline,
    n_model_features,
    target_values,
    to_model_frame,
)
from readmission.onnx_export import export_onnx
from readmission.onnx_parity import check_parity
from readmission.scoring import compute_metrics
from readmission.training import fit_timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--sets", help="cumulative set indices, e.g. 0,4 (default: all)")
    parser.add_argument("--no-onnx", action="store_true", help="skip export and parity")
    args = parser.parse_args()
    settings = Settings.from_env()

    whole, split = real_split(settings.split_seed)
    batches = split.batches(settings.batch_rows)
    sets = [int(i) for i in args.sets.split(",")] if args.sets else list(range(len(batches)))
    validation = whole.iloc[split.validation].reset_index(drop=True)
    x_val, y_val = to_model_frame(validation), target_values(validation)
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(
        "| algorithm | set | rows | features | fit CPU s | fit wall s | val F1w | val AUC | "
        "ONNX KB | export s | parity max abs dp | argmax mismatches |"
    )
    print("|" + " --- |" * 12)
    totals: dict[str, float] = {}
    for algorithm in args.algorithms.split(","):
        for index in sets:
            rows = np.concatenate(batches[: index + 1])
            train = whole.iloc[rows].reset_index(drop=True)
            pipeline = build_pipeline(algorithm)
            timing = fit_timed(pipeline, to_model_frame(train), target_values(train))
            totals[algorithm] = totals.get(algorithm, 0.0) + timing.cpu_seconds
            metrics = compute_metrics(pipeline, x_val, y_val)
            onnx_cells = ["", "", "", ""]
            if not args.no_onnx and index == max(sets):
                started = time.perf_counter()
                exported = export_onnx(pipeline)
                export_seconds = time.perf_counter() - started
                report = check_parity(pipeline, exported.onnx_bytes, validation)
                onnx_cells = [
                    f"{len(exported.onnx_bytes) / 1024:.0f}",
                    f"{export_seconds:.2f}",
                    f"{report.max_abs_diff:.1e}",
                    f"{report.argmax_mismatches} / {report.rows}",
                ]
            print(
                f"| {algorithm} | {index} | {len(train):,} | {n_model_features(pipeline)} | "
                f"{timing.cpu_seconds:.1f} | {timing.wall_seconds:.1f} | "
                f"{metrics['f1_weighted']:.4f} | {metrics['roc_auc_ovr']:.4f} | "
                + " | ".join(onnx_cells)
                + " |",
                flush=True,
            )
    print()
    for algorithm, seconds in totals.items():
        print(f"sum of fit CPU seconds over the sets, {algorithm}: {seconds:.1f}")
    print(f"all: {sum(totals.values()):.1f}; load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
