"""The split that never moves: a patient's split is a pure function of `patient_nbr` and the seed.

Every patient gets a position in [0, 1): the first 8 bytes of BLAKE2b(str(patient_nbr)) keyed
with the seed, read as an unsigned integer over 2**64. Position < 0.70 is training, < 0.85
validation, else test. Because the position depends on nothing else (not on the other rows,
their order, or which drop brought them), adding data never moves a patient between splits, the
test split only grows, and no patient is ever in two splits across corpus versions.

The split is not stratified by label (a stratified assignment depends on the other patients, so
it would move as the corpus grows); each corpus version's manifest reports every split's class
shares instead, and on the UCI file they agree within about one percentage point.

Training rows are put in the order of the same keyed hash of their `encounter_id`: a shuffle
that depends only on the rows themselves, never on file order, so the same rows always make the
same batches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

TRAIN, VALIDATION, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "validation", "test")
FRACTIONS = (0.70, 0.15, 0.15)
RULE = (
    "split by keyed hash: position = BLAKE2b-64(str(patient_nbr), key=seed) / 2**64; "
    "train < 0.70 <= validation < 0.85 <= test"
)
_PATIENT, _ENCOUNTER = b"patient", b"encounter"


def _positions(values: np.ndarray, seed: int, purpose: bytes) -> np.ndarray:
    """Keyed-hash position in [0, 1) of every value (computed once per distinct value)."""
    values = np.asarray(values)
    if len(values) == 0:
        return np.empty(0, dtype=np.float64)
    distinct, inverse = np.unique(values, return_inverse=True)
    key = seed.to_bytes(16, "big", signed=True)
    hashes = np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(str(v).encode(), key=key, person=purpose, digest_size=8).digest(),
                "big",
            )
            for v in distinct.tolist()
        ),
        dtype=np.uint64,
        count=len(distinct),
    )
    return (hashes / float(2**64))[inverse]


def patient_split_codes(patients: np.ndarray, seed: int) -> np.ndarray:
    """TRAIN / VALIDATION / TEST code of every row, from its patient_nbr alone."""
    position = _positions(patients, seed, _PATIENT)
    cut_train, cut_validation = FRACTIONS[0], FRACTIONS[0] + FRACTIONS[1]
    codes = np.where(
        position < cut_train, TRAIN, np.where(position < cut_validation, VALIDATION, TEST)
    )
    return codes.astype(np.int8)


def training_order(encounter_ids: np.ndarray, seed: int) -> np.ndarray:
    """Indices that put rows in the keyed-hash order of their encounter_id (ties: index)."""
    return np.argsort(_positions(encounter_ids, seed, _ENCOUNTER), kind="stable")


@dataclass(frozen=True)
class Split:
    """Row indices (into the parsed rows) of each split; training rows in training order."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray

    def batches(self, batch_rows: int) -> list[np.ndarray]:
        """The training rows cut into batches of `batch_rows` (the last one smaller)."""
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be positive, got {batch_rows}")
        return [self.train[i : i + batch_rows] for i in range(0, len(self.train), batch_rows)]


def split_rows(patients: np.ndarray, encounter_ids: np.ndarray, seed: int) -> Split:
    """Split rows by patient (`patient_split_codes`); validation and test keep row order,
    training rows are put in `training_order` of their encounter ids."""
    patients = np.asarray(patients)
    encounter_ids = np.asarray(encounter_ids)
    if len(patients) != len(encounter_ids):
        raise ValueError("patients and encounter_ids must have the same length")
    codes = patient_split_codes(patients, seed)
    train = np.flatnonzero(codes == TRAIN)
    return Split(
        train=train[training_order(encounter_ids[train], seed)],
        validation=np.flatnonzero(codes == VALIDATION),
        test=np.flatnonzero(codes == TEST),
    )
