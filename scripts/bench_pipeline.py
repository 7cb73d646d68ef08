"""Benchmark: the whole pipeline on the real CSV, upload to champion ready (not a test).

Starts a local stack of its own (free loopback ports, temporary state folder), uploads the
dataset to the raw bucket and follows the objects the pipeline writes until the champion's
metadata exists. Prints the wall time of each stage, the sum of the fits' CPU seconds and the
ratio of the wall time to the compute lower bound:

    lower bound = max(sum of fit seconds / cores, longest single fit)

    .venv/bin/python scripts/bench_pipeline.py [--csv PATH] [--workers N] [--keep]

Env: DIABETES_CSV (default ../shared/data/diabetic_data.csv.gz), plus any pipeline setting
(BATCH_ROWS, ALGORITHMS, ...), which is passed to the stack.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from readmission import keys, processes  # noqa: E402
from readmission.localstack.config import StackConfig, StackInfo, settings_for, store_for  # noqa: E402
from readmission.localstack.progress import rejection_problems, upload  # noqa: E402
from readmission.localstack.supervisor import Supervisor  # noqa: E402

DEFAULT_CSV = ROOT.parent / "shared" / "data" / "diabetic_data.csv.gz"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--csv", type=Path, default=Path(os.environ.get("DIABETES_CSV", DEFAULT_CSV))
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="train processes")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--keep", action="store_true", help="leave the stack running")
    args = parser.parse_args()
    cores = os.cpu_count() or 1

    state_dir = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    env = {"LOCAL_PORTS": "free", "STATE_DIR": str(state_dir), "TRAIN_WORKERS": str(args.workers)}
    config = StackConfig.from_env(state_dir=state_dir, extra_env=env)
    supervisor = Supervisor(config)
    started = time.monotonic()
    info = supervisor.up(log=lambda _line: None)
    print(f"stack up in {time.monotonic() - started:.1f} s ({args.workers} train workers)")
    try:
        return _run(info, args, cores, supervisor)
    finally:
        if args.keep:
            print(f"stack left running: source {state_dir}/env")
        else:
            supervisor.down(log=lambda _line: None)
            shutil.rmtree(state_dir, ignore_errors=True)


def _group_cpu_seconds() -> dict[int, float]:
    """Process group id -> CPU seconds (user + system) of its live members, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    totals: dict[int, float] = {}
    for _, fields in processes.proc_stats():
        pgid = int(fields[2])
        # utime, stime, and the reaped children's cutime, cstime
        totals[pgid] = totals.get(pgid, 0.0) + sum(int(v) for v in fields[11:15]) / ticks
    return totals


def _cpu_by_process(supervisor: Supervisor) -> dict[str, float]:
    """Stack process name (train-1, mlflow, ...) -> CPU seconds of its process group."""
    groups = _group_cpu_seconds()
    return {p.name: groups.get(p.pid, 0.0) for p in supervisor.running()}


def _note_stages(
    info: StackInfo, store: Any, buckets: Any, dataset_id: str, stages: dict[str, float], now: float
) -> tuple[list[str], int | None]:
    """Record the time of the listing-based stages first seen now. Returns the problems the
    ingest named if it rejected the upload (else []) and the number of results still missing
    (None before the manifest exists)."""
    manifest = store.get_json_if_exists(buckets.datasets, keys.manifest_key(dataset_id))
    if not manifest:
        return rejection_problems(info, dataset_id), None
    stages.setdefault("manifest", now)
    n_jobs = len(manifest["jobs"])
    if "job specs" not in stages and len(store.list_keys(buckets.jobs, f"{dataset_id}/")) == n_jobs:
        stages["job specs"] = now
    results = len(store.list_keys(buckets.results, f"{dataset_id}/"))
    if results:
        stages.setdefault("first result", now)
    if results == n_jobs:
        stages["last result"] = now
    return [], n_jobs - results


def _run(info: StackInfo, args: argparse.Namespace, cores: int, supervisor: Supervisor) -> int:
    settings = settings_for(info.env)
    store = store_for(info.env)
    buckets = settings.buckets
    cpu_before = _cpu_by_process(supervisor)
    t0 = time.monotonic()
    record = upload(info, args.csv)
    dataset_id = record["dataset_id"]
    uploaded = time.monotonic() - t0
    stages: dict[str, float] = {}
    deadline = t0 + args.timeout
    own_cpu = time.process_time()
    next_listing = 0.0
    missing: int | None = None
    # Polling costs CPU on the cores the pipeline uses, so it is sparse: the stages that need
    # listings every 1 s; the champion's metadata (one HEAD request every 0.2 s) only once at
    # most one result is missing, as the aggregator publishes only after the last one.
    while time.monotonic() < deadline:
        now = time.monotonic() - t0
        if now >= next_listing and "last result" not in stages:
            next_listing = now + 1.0
            problems, missing = _note_stages(info, store, buckets, dataset_id, stages, now)
            if problems:
                print(f"the ingest rejected the upload: {problems}")
                return 1
        if (
            missing is not None
            and missing <= 1
            and store.exists(buckets.models, keys.model_metadata_key(dataset_id))
        ):
            stages["champion ready"] = time.monotonic() - t0
            cpu_after = _cpu_by_process(supervisor)
            polling_cpu = time.process_time() - own_cpu
            break
        time.sleep(0.2)
    else:
        print(f"timed out after {args.timeout:.0f} s; stages so far: {stages}")
        return 1

    results = [
        store.get_json(buckets.results, key)
        for key in store.list_keys(buckets.results, f"{dataset_id}/")
    ]
    fit_wall = [r["fit_seconds"] for r in results]
    fit_cpu = [r.get("fit_cpu_seconds") or r["fit_seconds"] for r in results]
    wall = stages["champion ready"]
    lower_bound = max(sum(fit_wall) / cores, max(fit_wall))
    champion = store.get_json(buckets.models, keys.model_metadata_key(dataset_id))

    print(f"dataset {dataset_id}: {record['size']:,} bytes uploaded in {uploaded:.2f} s")
    print("stage                 seconds after upload (champion: +-0.2 s, the others +-1 s)")
    for name, seconds in stages.items():
        print(f"  {name:<20}{seconds:8.1f}")
    print(
        f"fits: {len(results)}; sum of fit wall seconds {sum(fit_wall):.1f}; "
        f"sum of fit CPU seconds {sum(fit_cpu):.1f}; longest fit {max(fit_wall):.1f}"
    )
    print("slowest fits:")
    for r in sorted(results, key=lambda r: -r["fit_seconds"])[:5]:
        print(
            f"  {r['cumulative_index']:02d}-{r['algorithm']:<24}{r['training_rows']:>7} rows "
            f"{r['fit_seconds']:7.1f} s"
        )
    cpu_used = {name: cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after}
    print(
        f"CPU seconds upload -> champion ready: {sum(cpu_used.values()):.1f} of "
        f"{cores} cores x {wall:.1f} s = {cores * wall:.1f}; by process:"
    )
    for name, seconds in sorted(cpu_used.items(), key=lambda item: -item[1]):
        if seconds >= 0.05:
            print(f"  {name:<20}{seconds:8.1f}")
    print(f"  (this benchmark's own polling: {polling_cpu:.1f} CPU s)")
    print(f"wall time upload -> champion ready: {wall:.1f} s (target < 120 s)")
    print(f"compute lower bound max(sum fit / {cores} cores, longest fit): {lower_bound:.1f} s")
    print(f"ratio wall / lower bound: {wall / lower_bound:.2f} (target <= 1.3)")
    print(
        f"champion: {champion['algorithm']} on {champion['training_rows']} rows, "
        f"version {champion['version']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
