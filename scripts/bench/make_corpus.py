"""Write deterministic 2x, 5x, 10x (any factor) versions of the real UCI CSV, for measurement.

Never committed and generated on demand (the data are CC BY 4.0 and stay outside the repository):
the default output directory is `$XDG_CACHE_HOME/readmission-corpus` (`~/.cache/...`).

Contract: `diabetic_data_<k>x.csv` holds the real file unchanged (copy 0, its ids included),
followed by k - 1 resampled copies. Copy c draws the real file's patients with replacement
(numpy PCG64 seeded with `--seed` and c) until it has at least as many rows as the real file,
and writes every encounter of each drawn patient with a new, unique `patient_nbr` (one per draw)
and a new, unique `encounter_id`: a drawn patient keeps all of its encounters together, so
grouping by patient stays meaningful (the split still puts all of a patient's rows in one
split). New ids are `c * 10**9 + n` (the real ids are below 10**9). The same `--seed` and factor
write byte-identical files; the k-x file's first rows are the (k-1)-x file's copies 0..k-2.

    .venv/bin/python scripts/bench/make_corpus.py --scales 2,5,10 [--out DIR] [--seed 7]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]

from readmission import contract  # noqa: E402
from readmission.dataset import ensure_dataset, read_dataset_bytes  # noqa: E402

ID_STRIDE = 10**9


def default_out() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "readmission-corpus"


def resampled_copy(table: pa.Table, copy: int, seed: int) -> pa.Table:
    """Copy number `copy` (>= 1): patients drawn with replacement, with new unique ids."""
    rng = np.random.default_rng([seed, copy])
    patients = table.column("patient_nbr").to_numpy()
    order = np.argsort(patients, kind="stable")
    unique, starts, counts = np.unique(patients[order], return_index=True, return_counts=True)
    # enough draws for the real file's number of rows on average, then trimmed to it
    draws = rng.integers(0, len(unique), size=len(unique) + len(unique) // 4)
    ends = np.cumsum(counts[draws])
    draws = draws[: int(np.searchsorted(ends, table.num_rows)) + 1]
    rows = np.concatenate([order[starts[d] : starts[d] + counts[d]] for d in draws])
    new_patients = np.repeat(np.arange(len(draws), dtype=np.int64), counts[draws])
    base = np.int64(copy) * ID_STRIDE
    resampled = table.take(pa.array(rows, pa.int64()))
    for name, values in (
        ("encounter_id", base + np.arange(len(rows), dtype=np.int64)),
        ("patient_nbr", base + new_patients),
    ):
        at = resampled.schema.get_field_index(name)
        resampled = resampled.set_column(at, name, pa.array(values, pa.int64()))
    return resampled


def write_scaled(data: bytes, factor: int, out: Path, seed: int) -> Path:
    """Write `diabetic_data_<factor>x.csv` into `out` (atomically: a temp name, then rename)."""
    table = pacsv.read_csv(
        pa.BufferReader(data),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in contract.COLUMNS}
            | {c: pa.int64() for c in contract.ID_COLUMNS}
        ),
    )
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"diabetic_data_{factor}x.csv"
    partial = path.with_suffix(".csv.partial")
    with partial.open("wb") as sink:
        sink.write(data)  # copy 0: the real file, byte for byte
        if not data.endswith(b"\n"):
            sink.write(b"\n")
        options = pacsv.WriteOptions(include_header=False, quoting_style="none")
        for copy in range(1, factor):
            pacsv.write_csv(resampled_copy(table, copy, seed), sink, write_options=options)
    partial.replace(path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="2,5,10", help="comma-separated whole factors")
    parser.add_argument("--out", type=Path, default=default_out())
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    data = read_dataset_bytes(ensure_dataset())
    for factor in (int(s) for s in args.scales.split(",") if s.strip()):
        if factor < 1:
            raise SystemExit(f"a scale must be a whole number >= 1, got {factor}")
        path = write_scaled(data, factor, args.out, args.seed)
        print(f"{factor:>3}x  {path}  {path.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
