"""Benchmark: the whole pipeline on the real CSV, upload to decision (not a test).

Starts a local stack of its own (free loopback ports, temporary state folder), uploads the
dataset to the raw bucket and follows the objects the pipeline writes until the corpus version
it made is aggregated and its promotion decided. Prints the wall time of each stage, the sum of
the fits' CPU seconds and the ratio of the wall time to the compute lower bound:

    lower bound = max(sum of fit seconds / cores, longest single fit)

With --second-drop SHARE (e.g. 0.1) it measures continuous training: a random SHARE of the
encounters is held out of the first drop and dropped second, once the first is decided. For
the second drop it prints how many fits ran (an unchanged set must not be fitted again), the
same lower bound over those fits, the re-scoring of the reused fits (sum of their seconds /
cores) and the gate, and compares the wall time with the first drop's in the same run.

    .venv/bin/python scripts/bench/bench_pipeline.py [--csv PATH] [--workers N] [--keep]
    .venv/bin/python scripts/bench/bench_pipeline.py --second-drop 0.1

Env: DIABETES_CSV (default ../shared/data/diabetic_data.csv.gz), plus any pipeline setting
(BATCH_ROWS, ALGORITHMS, ...), which is passed to the stack.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from readmission import keys  # noqa: E402
from readmission.dataset import read_dataset_bytes  # noqa: E402
from readmission.localstack import processes  # noqa: E402
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
    parser.add_argument(
        "--second-drop",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="hold this share of the encounters out of the first drop and drop it second",
    )
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
    info: StackInfo, store: Any, buckets: Any, drop_id: str, stages: dict[str, float], now: float
) -> tuple[list[str], str | None, int | None]:
    """Record the time of the listing-based stages first seen now. Returns the problems the
    ingest named if it rejected the upload (else []), the corpus version the drop made (None
    before it is ingested) and the number of results still missing (None before then)."""
    record = store.get_json_if_exists(buckets.datasets, keys.drop_key(drop_id))
    if not record:
        return rejection_problems(info, drop_id), None, None
    version = record["version"]
    if not version:
        return [f"the drop added nothing to the corpus: {record.get('message')}"], None, None
    manifest = store.get_json(buckets.datasets, keys.manifest_key(version))
    stages.setdefault("manifest", now)
    n_jobs = len(manifest["jobs"])
    if "job specs" not in stages and len(store.list_keys(buckets.jobs, f"{version}/")) == n_jobs:
        stages["job specs"] = now
    results = sum(k.endswith(".json") for k in store.list_keys(buckets.results, f"{version}/"))
    if results:
        stages.setdefault("first result", now)
    if results == n_jobs:
        stages["last result"] = now
    return [], version, n_jobs - results


@dataclass
class DropRun:
    """What following one drop measured."""

    key: str
    size: int
    uploaded: float  # seconds to upload
    stages: dict[str, float]
    version: str
    results: list[dict[str, Any]]
    cpu_used: dict[str, float]
    polling_cpu: float

    @property
    def wall(self) -> float:
        return self.stages["decided"]

    @property
    def fitted(self) -> list[dict[str, Any]]:
        """The results whose fit ran for this version (not reused from an earlier one)."""
        return [r for r in self.results if not r.get("reused")]


def _follow(
    info: StackInfo, supervisor: Supervisor, path: Path, key: str, timeout: float
) -> DropRun | None:
    """Upload `path` as `key` and follow it until its version is decided."""
    settings = settings_for(info.env)
    store = store_for(info.env)
    buckets = settings.buckets
    cpu_before = _cpu_by_process(supervisor)
    t0 = time.monotonic()
    record = upload(info, path, key)
    drop_id = record["drop_id"]
    uploaded = time.monotonic() - t0
    stages: dict[str, float] = {}
    deadline = t0 + timeout
    own_cpu = time.process_time()
    next_listing = 0.0
    missing: int | None = None
    version: str | None = None
    # Polling costs CPU on the cores the pipeline uses, so it is sparse: the stages that need
    # listings every 1 s; the version's metadata (one HEAD request every 0.2 s, written last,
    # after the decision) only once at most one result is missing.
    while time.monotonic() < deadline:
        now = time.monotonic() - t0
        if now >= next_listing and "last result" not in stages:
            next_listing = now + 1.0
            problems, version, missing = _note_stages(info, store, buckets, drop_id, stages, now)
            if problems:
                print(f"{key}: {problems}")
                return None
        if (
            version
            and missing is not None
            and missing <= 1
            and store.exists(buckets.models, keys.model_metadata_key(version))
        ):
            stages["decided"] = time.monotonic() - t0
            cpu_after = _cpu_by_process(supervisor)
            polling_cpu = time.process_time() - own_cpu
            break
        time.sleep(0.2)
    else:
        print(f"timed out after {timeout:.0f} s; stages so far: {stages}")
        return None
    assert version is not None
    results = [
        store.get_json(buckets.results, k)
        for k in store.list_keys(buckets.results, f"{version}/")
        if k.endswith(".json")  # not the validation probabilities beside each
    ]
    cpu_used = {name: cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after}
    return DropRun(key, record["size"], uploaded, stages, version, results, cpu_used, polling_cpu)


def _print_run(run: DropRun, cores: int, store: Any, buckets: Any) -> float:
    """Print one drop's figures; returns its fit lower bound."""
    fitted = run.fitted
    fit_wall = [r["fit_seconds"] for r in fitted] or [0.0]
    fit_cpu = [r.get("fit_cpu_seconds") or r["fit_seconds"] for r in fitted] or [0.0]
    lower_bound = max(sum(fit_wall) / cores, max(fit_wall))
    print(
        f"{run.key}: {run.size:,} bytes uploaded in {run.uploaded:.2f} s -> version {run.version}"
    )
    print("stage                 seconds after upload (decided: +-0.2 s, the others +-1 s)")
    for name, seconds in run.stages.items():
        print(f"  {name:<20}{seconds:8.1f}")
    print(
        f"jobs: {len(run.results)}; fits that ran: {len(fitted)}; reused fits re-scored: "
        f"{len(run.results) - len(fitted)}"
    )
    print(
        f"sum of fit wall seconds {sum(fit_wall):.1f}; sum of fit CPU seconds {sum(fit_cpu):.1f}; "
        f"longest fit {max(fit_wall):.1f}"
    )
    print("slowest fits:")
    for r in sorted(fitted, key=lambda r: -r["fit_seconds"])[:5]:
        print(
            f"  {r['cumulative_index']:02d}-{r['algorithm']:<24}{r['training_rows']:>7} rows "
            f"{r['fit_seconds']:7.1f} s"
        )
    print(
        f"CPU seconds upload -> decided: {sum(run.cpu_used.values()):.1f} of "
        f"{cores} cores x {run.wall:.1f} s = {cores * run.wall:.1f}; by process:"
    )
    for name, seconds in sorted(run.cpu_used.items(), key=lambda item: -item[1]):
        if seconds >= 0.05:
            print(f"  {name:<20}{seconds:8.1f}")
    print(f"  (this benchmark's own polling: {run.polling_cpu:.1f} CPU s)")
    decision = store.get_json(buckets.models, keys.decision_key(run.version))
    print(f"decision #{decision['sequence']}: {decision['verdict']}: {decision['reason']}")
    print(f"wall time upload -> decided: {run.wall:.1f} s")
    print(f"compute lower bound max(sum fit / {cores} cores, longest fit): {lower_bound:.1f} s")
    return lower_bound


def _run(info: StackInfo, args: argparse.Namespace, cores: int, supervisor: Supervisor) -> int:
    settings = settings_for(info.env)
    store = store_for(info.env)
    buckets = settings.buckets
    with tempfile.TemporaryDirectory(prefix="bench-drops-") as tmp:
        drops = _drops(args.csv, args.second_drop, Path(tmp))
        first = _follow(info, supervisor, drops[0][1], drops[0][0], args.timeout)
        if first is None:
            return 1
        lower_bound = _print_run(first, cores, store, buckets)
        print(f"ratio wall / lower bound: {first.wall / lower_bound:.2f} (target <= 1.3)")
        if len(drops) == 1:
            return 0
        print()
        second = _follow(info, supervisor, drops[1][1], drops[1][0], args.timeout)
        if second is None:
            return 1
        lower_bound = _print_run(second, cores, store, buckets)
    reused = [r for r in second.results if r.get("reused")]
    rescoring = sum(r.get("rescore_seconds") or 0.0 for r in reused) / cores
    decision = store.get_json(buckets.models, keys.decision_key(second.version))
    gate_seconds = float(decision.get("gate_seconds") or 0.0)
    manifest = store.get_json(buckets.datasets, keys.manifest_key(second.version))
    unchanged_fitted = [r for r in second.fitted if r["cumulative_index"] < manifest["reused_sets"]]
    budget = 1.3 * lower_bound + rescoring + gate_seconds
    print(
        f"re-scoring of {len(reused)} reused fits: {rescoring:.1f} s (sum / {cores} cores); "
        f"gate: {gate_seconds:.1f} s"
    )
    print(f"fits of an unchanged set: {len(unchanged_fitted)} (target 0)")
    print(
        f"wall {second.wall:.1f} s vs 1.3 x lower bound + re-scoring + gate = {budget:.1f} s: "
        f"ratio {second.wall / budget:.2f} (target <= 1.0)"
    )
    print(
        f"second drop / first drop wall time, same run: {second.wall / first.wall:.2f} "
        f"({second.wall:.1f} s / {first.wall:.1f} s)"
    )
    return 0


def _drops(csv: Path, second_share: float, folder: Path) -> list[tuple[str, Path]]:
    """(object key, file) of each drop: the whole file, or the file without a random
    `second_share` of its encounters and then those encounters."""
    if not second_share:
        return [(csv.name.removesuffix(".gz"), csv)]
    header, *rows = [line for line in read_dataset_bytes(csv).split(b"\r\n") if line]
    held = set(random.Random(42).sample(range(len(rows)), round(len(rows) * second_share)))
    parts = {
        "first-drop.csv": [r for i, r in enumerate(rows) if i not in held],
        "second-drop.csv": [r for i, r in enumerate(rows) if i in held],
    }
    out = []
    for name, part in parts.items():
        path = folder / name
        path.write_bytes(b"\r\n".join([header, *part]) + b"\r\n")
        out.append((name, path))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
