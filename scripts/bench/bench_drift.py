"""Benchmark (not a test): the cost of a drift report on the real UCI CSV (docs/monitoring.md).

Parses the real file, splits it into two random halves, and times (median of the rounds) the
reference profile of one half (`drift.build_profile`), the report of the other half against
it (`drift.compare`, scipy imported before timing; its first import is printed apart) and its
Markdown; beside them, in the same run, the parse of the whole file (`contract.parse_csv_table`,
what ingest pays anyway), as the ratio the report adds to it.

With `--scales 1,10` it times instead, per corpus of scripts/bench/make_corpus.py (written
first if missing), in a child process each: ingest's streaming validation of the file
(`drop_file.read_drop`, which ingest pays anyway), then the drift report's sample
(`ParsedDrop.sample(DRIFT_SAMPLE_ROWS)`, a second streaming pass) and `drift.compare` of it
against the profile of the real file's first half; CPU seconds, and the child's peak RSS
(`ru_maxrss`) after the validation and at the end.

    .venv/bin/python scripts/bench/bench_drift.py [--rounds 5] [--scales 1,10]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from readmission import contract, drift  # noqa: E402
from readmission.config import Settings  # noqa: E402
from readmission.dataset import ensure_dataset, read_dataset_bytes  # noqa: E402
from readmission.storage import json_bytes  # noqa: E402


def median_seconds(rounds: int, work: Callable[[], Any]) -> tuple[float, Any]:
    times, value = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        value = work()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(path: str, sample_rows: int, profile_path: str) -> int:
    """One corpus file: validation, sample, compare; prints the figures as JSON."""
    from readmission import drop_file

    drift.warm_up()
    profile = json.loads(Path(profile_path).read_text())
    size = Path(path).stat().st_size
    start, cpu = time.perf_counter(), _cpu()
    drop = drop_file.read_drop(Path(path), size)
    validate = (time.perf_counter() - start, _cpu() - cpu)
    rss_validated = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start, cpu = time.perf_counter(), _cpu()
    sample = drop.sample(sample_rows)
    sampled = (time.perf_counter() - start, _cpu() - cpu)
    start, cpu = time.perf_counter(), _cpu()
    report = drift.compare(
        profile, sample, drift.Thresholds(), drop_id="bench", drop_rows=drop.rows
    )
    compared = (time.perf_counter() - start, _cpu() - cpu)
    figures = {
        "rows": drop.rows,
        "sampled": sample.num_rows,
        "validate": validate,
        "sample": sampled,
        "compare": compared,
        "rss_validated_mib": rss_validated,
        "rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "status": report["status"],
        "max_psi": report["max_psi"],
    }
    print(json.dumps(figures))
    return 0


def scales(factors: list[int], sample_rows: int) -> int:
    sys.path.insert(0, str(ROOT / "scripts" / "bench"))
    import make_corpus

    out = make_corpus.default_out()
    table = contract.parse_csv_table(read_dataset_bytes(ensure_dataset()))
    mask = np.random.default_rng(18).random(table.num_rows) < 0.5
    profile = json_bytes(drift.build_profile(table.filter(pa.array(mask))))
    del table
    print(f"DRIFT_SAMPLE_ROWS {sample_rows:,}; wall s / CPU s; child peak RSS MiB")
    print(
        "| scale | rows | validate (ingest) | sample | compare | report CPU ÷ validate CPU |"
        " RSS validated → peak |"
    )
    print("| --- | ---: | --- | --- | --- | ---: | --- |")
    with tempfile.TemporaryDirectory() as scratch:
        profile_path = Path(scratch) / "profile.json"
        profile_path.write_bytes(profile)
        for factor in factors:
            path = out / f"diabetic_data_{factor}x.csv"
            if not path.exists():
                make = [sys.executable, str(ROOT / "scripts/bench/make_corpus.py")]
                subprocess.run([*make, "--scales", str(factor)], check=True)
            command = [sys.executable, __file__, "--child", str(path)]
            command += ["--sample-rows", str(sample_rows), "--profile", str(profile_path)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            f = json.loads(done.stdout.strip().splitlines()[-1])
            ratio = (f["sample"][1] + f["compare"][1]) / f["validate"][1]
            print(
                f"| {factor}× | {f['rows']:,} ({f['sampled']:,} sampled) | "
                f"{f['validate'][0]:.1f} / {f['validate'][1]:.1f} | "
                f"{f['sample'][0]:.1f} / {f['sample'][1]:.1f} | "
                f"{f['compare'][0]:.2f} / {f['compare'][1]:.2f} | {ratio:.2f} | "
                f"{f['rss_validated_mib']:.0f} → {f['rss_peak_mib']:.0f} |"
            )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scales", help="comma-separated corpus scales, e.g. 1,10")
    parser.add_argument("--sample-rows", type=int, default=Settings().drift_sample_rows)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--profile", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.sample_rows, args.profile)
    if args.scales:
        return scales([int(x) for x in args.scales.split(",")], args.sample_rows)
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
