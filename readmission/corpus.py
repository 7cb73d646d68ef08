"""The corpus: every accepted drop appended to one growing, versioned set of rows.

Pure functions over pyarrow tables and plain documents (no I/O; readmission.ingest stores what
they return). A corpus version is the ordered list of drops it holds. Its id is content-
addressed: ``version_id(parent, drop_sha256, ...)`` hashes the parent version's id with the new
drop's bytes and the settings that shape the batches, so the same drops in the same order give
the same version, and a version never changes once written.

A drop is deduplicated against the corpus by ``encounter_id``:

* a row identical to one already in the corpus (or earlier in the same drop) is skipped and
  counted as a duplicate;
* a row whose ``encounter_id`` is in the corpus (or the drop) with different content is a
  conflict: it is left out and reported by line in the drop's receipt. The corpus keeps the row
  it already had, and an encounter that appears twice in one drop with different content is
  left out entirely (there is no telling which copy is right);
* if conflicts are more than CONFLICT_REJECT_SHARE of the drop's rows the drop is rejected as a
  whole: it is a different data set, or the same one with rewritten values, not new encounters.

A version's training rows are its parent's batches followed by new batches of the drop's new
training rows (readmission.split gives the split and the order). The cumulative sets follow a
schedule (`set_sizes`): the parent's sets, then sets of 1, 2, 3, ... batches up to
`linear_sets` sets, then each set `growth` times the batches of the one before, and always a
last set of every batch. So cumulative set i of a version is cumulative set i of every later
version, the real file keeps its five 15,000-row steps, and the number of sets (and the total
rows fitted) grows about logarithmically (linearly) with the corpus, not linearly
(quadratically). Validation and test are the union of every drop's new validation and test
rows.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from readmission import contract, keys
from readmission.split import RULE as SPLIT_RULE
from readmission.split import (
    SPLIT_NAMES,
    TEST,
    TRAIN,
    VALIDATION,
    patient_split_codes,
    training_order,
)

# A drop with more conflicting rows than this share is rejected, not appended without them.
CONFLICT_REJECT_SHARE = 0.5
# The receipt lists at most this many conflicting rows by line (the count is always whole).
CONFLICTS_LISTED = 100
INDEX_COLUMNS = ("encounter_id", "patient_nbr", "split", "label", "row_hash")
_NULL_HASH = np.uint64(0x9E3779B97F4A7C15)
_FNV_PRIME = np.uint64(0x100000001B3)

APPEND, NOTHING_NEW, REJECT = "append", "nothing_new", "reject"


# The schedule of cumulative sets (`set_sizes`) unless the settings or the parent say otherwise.
LINEAR_SETS = 6
SET_GROWTH = 2.0


def version_id(
    parent: str | None,
    drop_sha256: str,
    split_seed: int,
    batch_rows: int,
    linear_sets: int = LINEAR_SETS,
    growth: float = SET_GROWTH,
) -> str:
    """Content address of the version that appends this drop to `parent` (None: the first)."""
    text = json.dumps(
        {
            "parent": parent,
            "drop": drop_sha256,
            "split_seed": split_seed,
            "batch_rows": batch_rows,
            "schedule": [linear_sets, growth],
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def set_sizes(batches: int, previous: Sequence[int], linear_sets: int, growth: float) -> list[int]:
    """The number of batches in each cumulative set of a version with `batches` batches whose
    parent's sets had `previous` batches each (kept as they are): then 1, 2, ... batches while
    there are fewer than `linear_sets` sets, then `ceil(growth x` the last`)` batches (at least
    one more), and last every batch."""
    sizes = list(previous)
    while True:
        last = sizes[-1] if sizes else 0
        grown = last + 1 if len(sizes) < linear_sets else max(last + 1, math.ceil(last * growth))
        if grown >= batches:
            break
        sizes.append(grown)
    if batches and (not sizes or sizes[-1] != batches):
        sizes.append(batches)
    return sizes


# --------------------------------------------------------------------------- row identity


def _string_hashes(column: pa.ChunkedArray) -> np.ndarray:
    encoded = column.combine_chunks().dictionary_encode()
    table = np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=8).digest(), "big")
            for v in encoded.dictionary.to_pylist()
        ),
        dtype=np.uint64,
        count=len(encoded.dictionary),
    )
    indices = encoded.indices.to_numpy(zero_copy_only=False)
    nulls = encoded.indices.is_null().to_numpy(zero_copy_only=False)
    if len(table):
        values = table[np.where(nulls, 0, indices).astype(np.int64)]
    else:  # every value null: no float detour, which would round _NULL_HASH
        values = np.zeros(len(indices), dtype=np.uint64)
    return np.where(nulls, _NULL_HASH, values).astype(np.uint64)


def _number_hashes(column: pa.ChunkedArray) -> np.ndarray:
    array = column.combine_chunks()
    nulls = array.is_null().to_numpy(zero_copy_only=False)
    values = array.cast(pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False)
    bits = (values + 0.0).view(np.uint64)  # + 0.0 folds -0.0 into 0.0
    return np.where(nulls, _NULL_HASH, bits).astype(np.uint64)


def row_hashes(table: pa.Table) -> np.ndarray:
    """A 64-bit fingerprint of every row's content over the contract's columns, independent of
    how the file was written (quoting, column types inferred, chunking)."""
    combined = np.full(table.num_rows, np.uint64(0xCBF29CE484222325), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for name in contract.COLUMNS:
            column = table.column(name)
            is_number = pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
            values = _number_hashes(column) if is_number else _string_hashes(column)
            combined = (combined ^ values) * _FNV_PRIME
    return combined


def label_codes(table: pa.Table) -> np.ndarray:
    """Target codes 0..2 in the order of contract.TARGET_CLASSES."""
    import pyarrow.compute as pc

    codes = pc.index_in(table.column(contract.TARGET), value_set=pa.array(contract.TARGET_CLASSES))
    return codes.to_numpy(zero_copy_only=False).astype(np.int8)


def empty_index() -> pa.Table:
    return pa.table(
        {
            "encounter_id": pa.array([], pa.int64()),
            "patient_nbr": pa.array([], pa.int64()),
            "split": pa.array([], pa.int8()),
            "label": pa.array([], pa.int8()),
            "row_hash": pa.array([], pa.uint64()),
        }
    )


# --------------------------------------------------------------------------- deduplication


@dataclass(frozen=True)
class Conflict:
    line: int  # line in the drop's file (the header is line 1)
    encounter_id: int
    reason: str


@dataclass(frozen=True)
class DropPlan:
    """What appending one drop does: which of its rows are new, and what was skipped."""

    status: str  # APPEND | NOTHING_NEW | REJECT
    rows: int
    new_rows: np.ndarray  # indices into the drop's table, in file order
    duplicates: int
    conflicts: tuple[Conflict, ...]
    problems: tuple[str, ...] = ()

    def report(self) -> dict[str, Any]:
        """The receipt's account of the rows."""
        return {
            "rows": self.rows,
            "new": len(self.new_rows),
            "duplicates": self.duplicates,
            "conflicts": len(self.conflicts),
            "conflicting_rows": [
                {"line": c.line, "encounter_id": c.encounter_id, "reason": c.reason}
                for c in self.conflicts[:CONFLICTS_LISTED]
            ],
        }


def plan_drop(
    encounter_ids: np.ndarray, hashes: np.ndarray, index: pa.Table | None = None
) -> DropPlan:
    """Classify every row of a drop against the corpus `index` (see the module docstring)."""
    encounter_ids = np.asarray(encounter_ids, dtype=np.int64)
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(encounter_ids)
    known_ids = np.empty(0, np.int64) if index is None else index["encounter_id"].to_numpy()
    known_hashes = np.empty(0, np.uint64) if index is None else index["row_hash"].to_numpy()
    # the corpus: is the encounter known, and with which content?
    in_corpus = np.zeros(n, dtype=bool)
    same_in_corpus = np.zeros(n, dtype=bool)
    if len(known_ids):
        order = np.argsort(known_ids, kind="stable")
        sorted_ids, sorted_hashes = known_ids[order], known_hashes[order]
        at = np.minimum(np.searchsorted(sorted_ids, encounter_ids), len(sorted_ids) - 1)
        in_corpus = sorted_ids[at] == encounter_ids
        same_in_corpus = in_corpus & (sorted_hashes[at] == hashes)
    # within the drop: the first occurrence of each encounter, and whether its copies differ
    _, first, inverse, counts = np.unique(
        encounter_ids, return_index=True, return_inverse=True, return_counts=True
    )
    distinct_contents = np.ones(len(first), dtype=np.int64)
    if np.any(counts > 1):
        pairs = np.unique(np.stack([inverse, hashes.view(np.int64)], axis=1), axis=0)
        distinct_contents = np.bincount(pairs[:, 0], minlength=len(first))
    differing_in_drop = distinct_contents[inverse] > 1
    is_first = np.zeros(n, dtype=bool)
    is_first[first] = True

    # every row is exactly one of: a conflict, a duplicate, or new (vectorised: a drop can
    # have millions of rows)
    corpus_conflict = in_corpus & ~same_in_corpus
    drop_conflict = differing_in_drop & ~in_corpus
    conflicting = corpus_conflict | drop_conflict
    new = ~conflicting & ~in_corpus & is_first
    duplicates = int(np.sum(~conflicting & ~new))
    in_corpus_reason = "the corpus holds this encounter_id with different values"
    in_drop_reason = "this encounter_id appears more than once in the file with different values"
    conflicts = [
        Conflict(
            int(row) + 2,
            int(encounter_ids[row]),
            in_corpus_reason if corpus_conflict[row] else in_drop_reason,
        )
        for row in np.flatnonzero(conflicting)
    ]
    new_rows = np.flatnonzero(new)
    if len(conflicts) > CONFLICT_REJECT_SHARE * n:
        problem = (
            f"{len(conflicts):,} of the file's {n:,} rows conflict with the corpus or with each "
            f"other (same encounter_id, different values; more than "
            f"{CONFLICT_REJECT_SHARE:.0%} of the file): it rewrites known encounters rather "
            f"than adding new ones. The first conflicting lines: "
            + ", ".join(f"line {c.line} (encounter_id {c.encounter_id})" for c in conflicts[:5])
        )
        return DropPlan(REJECT, n, new_rows, duplicates, tuple(conflicts), (problem,))
    status = APPEND if len(new_rows) else NOTHING_NEW
    return DropPlan(status, n, new_rows, duplicates, tuple(conflicts))


# --------------------------------------------------------------------------- the new version


class DropRows(Protocol):
    """What the new version needs of every row of a drop (readmission.drop_file.ParsedDrop),
    in file order."""

    encounter_ids: np.ndarray  # int64
    patient_nbrs: np.ndarray  # int64
    labels: np.ndarray  # int8, label_codes
    row_hashes: np.ndarray  # uint64, row_hashes


@dataclass(frozen=True)
class NewVersion:
    """Everything ingest writes for one appended drop: Parquet parts, the index, the manifest."""

    version: str
    # (key, the drop's row numbers in the part's order): new batches, new validation, new test
    parts: list[tuple[str, np.ndarray]]
    index: pa.Table  # the whole corpus's encounter index (parent's + the new rows)
    manifest: dict[str, Any]


def _class_counts(labels: np.ndarray) -> dict[str, int]:
    counts = np.bincount(labels.astype(np.int64), minlength=len(contract.TARGET_CLASSES))
    return {name: int(counts[i]) for i, name in enumerate(contract.TARGET_CLASSES)}


def _shares(counts: Mapping[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: round(v / total, 4) if total else 0.0 for k, v in counts.items()}


def check_trainable(index: pa.Table) -> list[str]:
    """Why a corpus with this index cannot be trained and tested yet (empty if it can)."""
    splits = index["split"].to_numpy()
    labels = index["label"].to_numpy()
    patients = len(np.unique(index["patient_nbr"].to_numpy()))
    if not all(np.any(splits == code) for code in (TRAIN, VALIDATION, TEST)):
        return [
            f"the corpus would have {index.num_rows} rows from {patients} patients: too few to "
            f"give the training, validation and test splits (70/15/15 by patient) a row each; "
            f"upload a file with more patients"
        ]
    missing = [
        name
        for code, name in enumerate(contract.TARGET_CLASSES)
        if not np.any(labels[splits == TRAIN] == code)
    ]
    if missing:
        return [
            f"the training split would have no row with {contract.TARGET} = "
            f"{', '.join(missing)}: every class ({', '.join(contract.TARGET_CLASSES)}) needs "
            f"rows from several patients; upload a file with more patients"
        ]
    return []


def build_version(
    *,
    parent: Mapping[str, Any] | None,
    parent_index: pa.Table | None,
    rows: DropRows,
    plan: DropPlan,
    source: Mapping[str, Any],
    split_seed: int,
    batch_rows: int,
    algorithms: Sequence[str],
    job_order: Any,
    linear_sets: int = LINEAR_SETS,
    growth: float = SET_GROWTH,
) -> NewVersion:
    """The version that appends `plan.new_rows` of the drop (`rows`) to `parent` (None: the
    first), its cumulative sets on the schedule (`linear_sets`, `growth`; see `set_sizes`).

    `job_order(set_rows, algorithms, reused_sets, fitted_algorithms)` orders the version's jobs
    (ingest's cost model). Raises ValueError with the reasons if the resulting corpus cannot
    be trained. The parts are named, not built: each is the drop's row numbers it holds, in
    its order (the caller streams the drop's rows into them).
    """
    version = version_id(
        parent["version"] if parent else None,
        str(source["sha256"]),
        split_seed,
        batch_rows,
        linear_sets,
        growth,
    )
    new_rows = np.asarray(plan.new_rows, dtype=np.int64)
    patients = rows.patient_nbrs[new_rows]
    encounters = rows.encounter_ids[new_rows]
    codes = patient_split_codes(patients, split_seed)
    labels = rows.labels[new_rows]
    new_index = pa.table(
        {
            "encounter_id": pa.array(encounters, pa.int64()),
            "patient_nbr": pa.array(patients, pa.int64()),
            "split": pa.array(codes, pa.int8()),
            "label": pa.array(labels, pa.int8()),
            "row_hash": pa.array(rows.row_hashes[new_rows], pa.uint64()),
        }
    )
    index = pa.concat_tables([parent_index or empty_index(), new_index])
    problems = check_trainable(index)
    if problems:
        raise ValueError(" ".join(problems))

    train = np.flatnonzero(codes == TRAIN)
    train = train[training_order(encounters[train], split_seed)]
    first_batch = len(parent["batches"]) if parent else 0
    parts: list[tuple[str, np.ndarray]] = []
    batches = list(parent["batches"]) if parent else []
    for offset in range(0, len(train), batch_rows):
        batch = train[offset : offset + batch_rows]
        key = keys.batch_key(version, first_batch + offset // batch_rows)
        parts.append((key, new_rows[batch]))
        batches.append({"index": len(batches), "key": key, "rows": len(batch), "version": version})
    held_out = {}
    for name, code, key in (
        ("validation", VALIDATION, keys.validation_key(version)),
        ("test", TEST, keys.test_key(version)),
    ):
        held = np.flatnonzero(codes == code)
        previous = dict(parent[name]) if parent else {"keys": [], "rows": 0}
        if len(held):
            parts.append((key, new_rows[held]))
            previous = {"keys": [*previous["keys"], key], "rows": previous["rows"] + len(held)}
        held_out[name] = previous

    previous = [len(c["batch_keys"]) for c in parent["cumulative_sets"]] if parent else []
    ends = np.cumsum([b["rows"] for b in batches])
    cumulative = [
        {"index": i, "rows": int(ends[size - 1]), "batch_keys": [b["key"] for b in batches[:size]]}
        for i, size in enumerate(set_sizes(len(batches), previous, linear_sets, growth))
    ]
    reused_sets = len(parent["cumulative_sets"]) if parent else 0
    all_splits = index["split"].to_numpy()
    all_labels = index["label"].to_numpy()
    all_patients = index["patient_nbr"].to_numpy()
    class_counts = {
        name: _class_counts(all_labels[all_splits == code]) for code, name in enumerate(SPLIT_NAMES)
    }
    drops = [*(parent["drops"] if parent else []), str(source["sha256"])[:16]]
    manifest = {
        "dataset_id": version,
        "version": version,
        "parent": parent["version"] if parent else None,
        "number": len(drops),
        "drops": drops,
        "source": dict(source),
        "split_seed": split_seed,
        "split_rule": SPLIT_RULE,
        "batch_rows": batch_rows,
        "schedule": {"linear_sets": linear_sets, "growth": growth},
        "rows": {
            "total": index.num_rows,
            **{name: int(np.sum(all_splits == c)) for c, name in enumerate(SPLIT_NAMES)},
        },
        "patients": {
            "total": len(np.unique(all_patients)),
            **{
                name: len(np.unique(all_patients[all_splits == c]))
                for c, name in enumerate(SPLIT_NAMES)
            },
        },
        "class_counts": class_counts,
        "class_shares": {name: _shares(counts) for name, counts in class_counts.items()},
        "added": {
            **plan.report(),
            **{f"new_{n}": int(np.sum(codes == c)) for c, n in enumerate(SPLIT_NAMES)},
        },
        "encounters_key": keys.encounters_key(version),
        "batches": batches,
        "cumulative_sets": cumulative,
        "reused_sets": reused_sets,
        "validation": held_out["validation"],
        "test": held_out["test"],
        "algorithms": list(dict.fromkeys(algorithms)),
        "jobs": [
            keys.job_key(version, i, a)
            for i, a in job_order(
                [c["rows"] for c in cumulative],
                algorithms,
                reused_sets,
                parent["algorithms"] if parent else (),
            )
        ],
    }
    return NewVersion(version, parts, index, manifest)
