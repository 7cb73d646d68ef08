"""The benchmarks' common start: the real file parsed by the data contract, and its rows split
as ingest splits them (a keyed hash of `patient_nbr`: readmission.split); and the paired
interval the model-quality benchmarks report (the gate's bootstrap, one protocol for all).

    from real_data import real_split   # scripts/bench/ is on sys.path when a script runs
    whole, split = real_split(Settings.from_env().split_seed)
"""

from __future__ import annotations

from typing import Any

from readmission import contract
from readmission.dataset import ensure_dataset, read_dataset_bytes
from readmission.gate import paired_bootstrap
from readmission.split import Split, split_rows


def real_split(seed: int) -> tuple[Any, Split]:
    """(the real file as a contract DataFrame, its split by `seed`)."""
    whole = contract.parse_csv(read_dataset_bytes(ensure_dataset()))
    split = split_rows(
        whole[contract.GROUP_COLUMN].to_numpy(), whole["encounter_id"].to_numpy(), seed
    )
    return whole, split


# the paired bootstrap as the quality benchmarks report it: 1,000 resamples, seed 42, and the
# 5 % and 95 % quantiles of the difference
RESAMPLES, SEED, CONFIDENCE = 1000, 42, 0.95


def paired_interval(
    metric: str, codes: Any, probabilities: Any, reference: Any
) -> tuple[float, float]:
    """(5 %, 95 %) quantiles of metric(probabilities) - metric(reference) on the same rows."""
    return paired_bootstrap(metric, codes, probabilities, reference, RESAMPLES, SEED, CONFIDENCE)
