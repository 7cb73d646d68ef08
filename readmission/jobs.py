"""The training jobs of a corpus version: which, in which order, and their spec documents.

Pure derivations from a version's manifest (`job_order`, `job_spec`), and `write_jobs`, which
writes the missing specs into the jobs bucket (each spec's arrival fires the train function).
Contract: a spec is a function of the manifest alone (the same manifest gives byte-identical
specs), written with `put_if_absent`, so a redelivered or crashed ingest writes each job once
and never changes one; specs are written in the manifest's order, costliest job first.
readmission.job_spec checks, word for word, that a spec the train step receives is one of
these.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from readmission import keys
from readmission.config import Settings
from readmission.storage import ObjectStore, json_bytes

JSON_TYPE = "application/json"
# Fit seconds per 1,000 training rows of each algorithm on one core (measured with
# scripts/bench/bench_pipeline.py on the real CSV; hist_gradient_boosting's scaled by the
# measured cost ratio of its regularised definition, docs/training.md). Job specs are written
# in decreasing estimated cost: the broker dispatches FIFO, and longest-processing-time-first
# keeps the parallel training makespan near its lower bound. An algorithm not listed counts as
# the costliest.
ALGORITHM_COST_PER_1000_ROWS = {
    "gradient_boosting": 0.69,
    "logistic_regression": 0.15,
    "random_forest": 0.076,
    "hist_gradient_boosting": 0.15,
    "decision_tree": 0.017,
}


def estimated_fit_seconds(training_rows: int, algorithm: str) -> float:
    """One-core fit seconds of a job, from its algorithm's measured cost (an algorithm not
    listed counts as the costliest)."""
    per_1000 = ALGORITHM_COST_PER_1000_ROWS.get(
        algorithm, max(ALGORITHM_COST_PER_1000_ROWS.values())
    )
    return training_rows / 1000 * per_1000


def job_order(
    set_rows: Sequence[int],
    algorithms: Iterable[str],
    reused_sets: int = 0,
    fitted_algorithms: Iterable[str] | None = None,
) -> list[tuple[int, str]]:
    """(cumulative index, algorithm) pairs, costliest job first. `set_rows[i]` is the number of
    training rows of cumulative set i; its cost is `estimated_fit_seconds`. Sets below
    `reused_sets` were fitted for an earlier version with `fitted_algorithms` (default: all)
    and are only re-scored: they cost next to nothing and come last. Ties keep the bigger
    index, then the order of `algorithms`."""
    algorithms = list(dict.fromkeys(algorithms))
    fitted = set(algorithms if fitted_algorithms is None else fitted_algorithms)

    def cost(pair: tuple[int, str]) -> float:
        index, algorithm = pair
        if index < reused_sets and algorithm in fitted:
            return 0.0
        return estimated_fit_seconds(set_rows[index], algorithm)

    pairs = [(i, a) for i in range(len(set_rows)) for a in algorithms]
    return sorted(pairs, key=lambda pair: (-cost(pair), -pair[0], algorithms.index(pair[1])))


def job_spec(manifest: dict[str, Any], job_key: str, datasets_bucket: str) -> dict[str, Any]:
    """The job spec named `job_key`, derived from the manifest alone."""
    dataset_id, index, algorithm = keys.parse_job_key(job_key)
    cumulative = manifest["cumulative_sets"][index]
    return {
        "dataset_id": dataset_id,
        "cumulative_index": index,
        "algorithm": algorithm,
        "training_rows": cumulative["rows"],
        "batch_keys": cumulative["batch_keys"],
        "validation_keys": manifest["validation"]["keys"],
        "test_keys": manifest["test"]["keys"],
        "datasets_bucket": datasets_bucket,
        "manifest_key": keys.manifest_key(dataset_id),
    }


def write_jobs(store: ObjectStore, settings: Settings, manifest: dict[str, Any]) -> list[str]:
    """Write the missing job specs one by one, in the manifest's (costliest first) order."""
    written = []
    jobs_bucket = settings.buckets.jobs
    for job_key in manifest["jobs"]:
        spec = job_spec(manifest, job_key, settings.buckets.datasets)
        if store.put_if_absent(jobs_bucket, job_key, json_bytes(spec), JSON_TYPE):
            written.append(f"{jobs_bucket}/{job_key}")
    return written
