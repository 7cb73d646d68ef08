"""Patient-grouped, target-stratified 70/15/15 split and the training batches.

Every encounter of a patient lands in the same split (no patient in two splits), and each split
keeps the class shares of the whole file (within one percentage point on the UCI file).

How: each patient gets a label signature, the number of their encounters in each class (capped,
so that rare heavy patients share a stratum). Within each signature stratum the patients are put
in a seeded random order and dealt out by position: a patient at position r of n goes to train if
(r + u) / n < 0.70, to validation if < 0.85, else to test, where u is one seeded random offset per
stratum (so even strata of one patient are dealt 70/15/15 in expectation). Strata hold patients
with the same encounter counts per class, so the rows follow the patients' shares.

The assignment depends only on the set of (patient, target) pairs and the seed, not on row order.
The training rows are then shuffled with the seed and cut into batches of `batch_rows`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TRAIN, VALIDATION, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "validation", "test")
FRACTIONS = (0.70, 0.15, 0.15)
SIGNATURE_CAP = 4  # encounters per class beyond this count as this many in the signature


@dataclass(frozen=True)
class Split:
    """Row indices (into the parsed file) of each split; training rows already shuffled."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray

    def batches(self, batch_rows: int) -> list[np.ndarray]:
        """The shuffled training rows cut into batches of `batch_rows` (the last one smaller)."""
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be positive, got {batch_rows}")
        return [self.train[i : i + batch_rows] for i in range(0, len(self.train), batch_rows)]


def _patient_signatures(
    patients: np.ndarray, labels: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(patient index of every row, signature of every patient)."""
    _, row_patient = np.unique(patients, return_inverse=True)
    n_patients = int(row_patient.max()) + 1
    counts = np.bincount(row_patient * n_classes + labels, minlength=n_patients * n_classes)
    capped = np.minimum(counts.reshape(n_patients, n_classes), SIGNATURE_CAP)
    weights = (SIGNATURE_CAP + 1) ** np.arange(n_classes)
    return row_patient, capped @ weights


def assign_patients(signatures: np.ndarray, seed: int) -> np.ndarray:
    """Split code (TRAIN/VALIDATION/TEST) of every patient, stratified by signature."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(signatures))
    order = order[np.argsort(signatures[order], kind="stable")]  # strata, random inside each
    sorted_sig = signatures[order]
    starts = np.flatnonzero(np.r_[True, sorted_sig[1:] != sorted_sig[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    offsets = rng.random(len(starts))
    stratum = np.repeat(np.arange(len(starts)), sizes)
    rank = np.arange(len(order)) - starts[stratum]
    position = (rank + offsets[stratum]) / sizes[stratum]
    cut_train, cut_validation = FRACTIONS[0], FRACTIONS[0] + FRACTIONS[1]
    codes = np.where(
        position < cut_train, TRAIN, np.where(position < cut_validation, VALIDATION, TEST)
    )
    assignment = np.empty(len(signatures), dtype=np.int8)
    assignment[order] = codes
    return assignment


def split_rows(patients: np.ndarray, labels: np.ndarray, seed: int, n_classes: int = 3) -> Split:
    """Split rows grouped by patient and stratified by label; `labels` are codes 0..n_classes-1.

    Validation and test rows keep file order; training rows are shuffled with the seed.
    """
    patients = np.asarray(patients)
    labels = np.asarray(labels, dtype=np.int64)
    if len(patients) != len(labels):
        raise ValueError("patients and labels must have the same length")
    if len(patients) == 0:
        raise ValueError("cannot split zero rows")
    row_patient, signatures = _patient_signatures(patients, labels, n_classes)
    row_split = assign_patients(signatures, seed)[row_patient]
    train = np.flatnonzero(row_split == TRAIN)
    shuffle = np.random.default_rng([seed, 1])  # independent stream for the batch order
    return Split(
        train=train[shuffle.permutation(len(train))],
        validation=np.flatnonzero(row_split == VALIDATION),
        test=np.flatnonzero(row_split == TEST),
    )


def cumulative_sets(n_batches: int) -> list[list[int]]:
    """Cumulative set i = batches 0..i."""
    return [list(range(i + 1)) for i in range(n_batches)]
