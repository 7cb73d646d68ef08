"""The split that never moves: a keyed hash of patient_nbr, and the training order."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from support.seaweed_server import real_csv_bytes

from readmission import contract
from readmission.config import Settings
from readmission.ingest import labels_of
from readmission.split import (
    TEST,
    TRAIN,
    VALIDATION,
    Split,
    patient_split_codes,
    split_rows,
    training_order,
)

SEED = Settings().split_seed
BATCH_ROWS = Settings().batch_rows


@functools.cache
def real_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    table = contract.parse_csv_table(real_csv_bytes())
    return (
        table.column(contract.GROUP_COLUMN).to_numpy(),
        table.column("encounter_id").to_numpy(),
        labels_of(table),
    )


@functools.cache
def real_split(seed: int = SEED) -> Split:
    patients, encounters, _ = real_arrays()
    return split_rows(patients, encounters, seed)


def _parts(split: Split) -> dict[str, np.ndarray]:
    return {"train": split.train, "validation": split.validation, "test": split.test}


def test_every_row_is_in_exactly_one_split() -> None:
    split = real_split()
    rows = np.concatenate(list(_parts(split).values()))
    assert np.array_equal(np.sort(rows), np.arange(len(real_arrays()[0])))


def test_no_patient_is_in_two_splits() -> None:
    patients = real_arrays()[0]
    seen = [set(patients[rows].tolist()) for rows in _parts(real_split()).values()]
    assert not seen[0] & seen[1] and not seen[0] & seen[2] and not seen[1] & seen[2]


@pytest.mark.parametrize("seed", [SEED, 7])
def test_class_shares_within_one_point_and_sizes_near_70_15_15(seed: int) -> None:
    _, _, labels = real_arrays()
    overall = np.bincount(labels) / len(labels)
    for (name, rows), fraction in zip(
        _parts(real_split(seed)).items(), (0.70, 0.15, 0.15), strict=True
    ):
        assert abs(len(rows) / len(labels) - fraction) < 0.01, name
        shares = np.bincount(labels[rows], minlength=3) / len(rows)
        assert np.max(np.abs(shares - overall)) < 0.01, name


def test_a_patient_split_depends_on_the_patient_and_the_seed_only() -> None:
    patients = real_arrays()[0]
    codes = patient_split_codes(patients, SEED)
    # any subset, in any order, gives each patient the same split
    rng = np.random.default_rng(0)
    subset = rng.choice(len(patients), size=5_000, replace=False)
    assert np.array_equal(patient_split_codes(patients[subset], SEED), codes[subset])
    assert np.array_equal(patient_split_codes(patients, SEED), codes)
    assert not np.array_equal(patient_split_codes(patients, SEED + 1), codes)


def test_adding_rows_never_moves_a_patient_and_the_test_split_only_grows() -> None:
    patients, encounters, _ = real_arrays()
    half = len(patients) // 2
    first = split_rows(patients[:half], encounters[:half], SEED)
    whole = real_split()
    for name in ("validation", "test"):
        assert set(getattr(first, name).tolist()) <= set(getattr(whole, name).tolist())
    assert set(first.train.tolist()) <= set(whole.train.tolist())


def test_codes_are_the_three_splits() -> None:
    codes = patient_split_codes(np.arange(10_000), SEED)
    shares = np.bincount(codes, minlength=3) / len(codes)
    assert set(np.unique(codes)) == {TRAIN, VALIDATION, TEST}
    assert np.allclose(shares, (0.70, 0.15, 0.15), atol=0.02)


def test_training_order_ignores_file_order_and_batches_are_cut_in_it() -> None:
    patients, encounters, _ = real_arrays()
    split = real_split()
    order = np.random.default_rng(1).permutation(len(patients))
    shuffled = split_rows(patients[order], encounters[order], SEED)
    assert np.array_equal(encounters[order][shuffled.train], encounters[split.train])
    batches = split.batches(BATCH_ROWS)
    assert [len(b) for b in batches[:-1]] == [BATCH_ROWS] * (len(batches) - 1)
    assert np.array_equal(np.concatenate(batches), split.train)
    assert not np.all(np.diff(split.train) > 0), "training rows must be shuffled"
    assert np.all(np.diff(split.validation) > 0) and np.all(np.diff(split.test) > 0)


def test_training_order_is_a_permutation_and_empty_inputs_are_fine() -> None:
    order = training_order(np.array([30, 10, 20]), SEED)
    assert sorted(order.tolist()) == [0, 1, 2]
    empty = split_rows(np.array([], dtype=np.int64), np.array([], dtype=np.int64), SEED)
    assert len(empty.train) == len(empty.validation) == len(empty.test) == 0
    with pytest.raises(ValueError, match="same length"):
        split_rows(np.array([1, 2]), np.array([1]), SEED)
    with pytest.raises(ValueError, match="positive"):
        empty.batches(0)
