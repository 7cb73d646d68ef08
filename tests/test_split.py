"""The patient-grouped, stratified 70/15/15 split and the training batches."""

from __future__ import annotations

import functools
import time

import numpy as np
import pytest
from conftest_seaweed import real_csv_bytes

from readmission import contract
from readmission.config import Settings
from readmission.ingest import labels_of
from readmission.split import Split, cumulative_sets, split_rows

SEED = Settings().split_seed
BATCH_ROWS = Settings().batch_rows


@functools.cache
def real_arrays() -> tuple[np.ndarray, np.ndarray]:
    table = contract.parse_csv_table(real_csv_bytes())
    return table.column(contract.GROUP_COLUMN).to_numpy(), labels_of(table)


@functools.cache
def real_split(seed: int = SEED) -> Split:
    patients, labels = real_arrays()
    return split_rows(patients, labels, seed)


def _parts(split: Split) -> dict[str, np.ndarray]:
    return {"train": split.train, "validation": split.validation, "test": split.test}


def test_every_row_is_in_exactly_one_split() -> None:
    patients, _ = real_arrays()
    rows = np.concatenate(list(_parts(real_split()).values()))
    assert np.array_equal(np.sort(rows), np.arange(len(patients)))


def test_no_patient_is_in_two_splits() -> None:
    patients, _ = real_arrays()
    sets = {name: set(patients[rows].tolist()) for name, rows in _parts(real_split()).items()}
    assert not sets["train"] & sets["validation"]
    assert not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    assert sum(len(s) for s in sets.values()) == 71_518


@pytest.mark.parametrize("seed", [SEED, 0, 1, 2024])
def test_class_shares_within_one_point_and_sizes_near_70_15_15(seed: int) -> None:
    _, labels = real_arrays()
    split = real_split(seed)
    whole = np.bincount(labels, minlength=3) / len(labels)
    for name, rows in _parts(split).items():
        shares = np.bincount(labels[rows], minlength=3) / len(rows)
        assert np.abs(shares - whole).max() < 0.01, (name, shares, whole)
    for rows, fraction in zip(_parts(split).values(), (0.70, 0.15, 0.15), strict=True):
        assert abs(len(rows) / len(labels) - fraction) < 0.01


def test_deterministic_and_seed_dependent() -> None:
    patients, labels = real_arrays()
    again = split_rows(patients, labels, SEED)
    first = real_split()
    for name, rows in _parts(first).items():
        assert np.array_equal(rows, _parts(again)[name]), name
    other = split_rows(patients, labels, SEED + 1)
    assert not np.array_equal(np.sort(other.validation), np.sort(first.validation))


def test_assignment_does_not_depend_on_row_order() -> None:
    patients, labels = real_arrays()
    order = np.random.default_rng(7).permutation(len(patients))
    shuffled = split_rows(patients[order], labels[order], SEED)
    original = real_split()
    assert set(patients[order][shuffled.test].tolist()) == set(patients[original.test].tolist())


def test_training_rows_are_shuffled_and_batched() -> None:
    split = real_split()
    batches = split.batches(BATCH_ROWS)
    assert len(batches) == 5 == len(cumulative_sets(len(batches)))
    assert [len(b) for b in batches[:-1]] == [BATCH_ROWS] * 4
    assert 0 < len(batches[-1]) <= BATCH_ROWS
    assert np.array_equal(np.concatenate(batches), split.train)
    assert not np.all(np.diff(split.train) > 0), "training rows must be shuffled"
    assert np.all(np.diff(split.validation) > 0) and np.all(np.diff(split.test) > 0)


def test_split_is_fast_on_the_real_file() -> None:
    patients, labels = real_arrays()
    start = time.perf_counter()
    split_rows(patients, labels, SEED)
    assert time.perf_counter() - start < 1.0


def test_small_inputs() -> None:
    patients = np.array([5, 5, 6, 7, 8, 9, 10, 11, 12, 13])
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    split = split_rows(patients, labels, SEED)
    assert sorted(np.concatenate([split.train, split.validation, split.test]).tolist()) == list(
        range(10)
    )
    sides = [set(patients[r].tolist()) for r in (split.train, split.validation, split.test)]
    assert sum(5 in side for side in sides) == 1
    assert [len(b) for b in split.batches(3)] == [3 for _ in range(len(split.train) // 3)] + (
        [len(split.train) % 3] if len(split.train) % 3 else []
    )
    with pytest.raises(ValueError):
        split.batches(0)
    with pytest.raises(ValueError):
        split_rows(np.array([]), np.array([]), SEED)


def test_cumulative_sets() -> None:
    assert cumulative_sets(3) == [[0], [0, 1], [0, 1, 2]]
    assert cumulative_sets(0) == []
