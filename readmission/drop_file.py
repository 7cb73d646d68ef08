"""A raw drop read in bounded memory: a local copy of the object, checked in a streaming pass.

`download(body, path)` copies an object's byte stream to a local file in fixed-size chunks and
returns the sha256 of exactly those bytes (the drop's identity). `read_drop(path, size)` then
validates the local copy against the data contract block by block (Arrow's streaming CSV
reader, the checks of `contract.parse_csv_table`'s fast path on each block) and keeps only what
deduplication and the split need for every row: `encounter_id`, `patient_nbr`, the label code
and the row fingerprint (25 bytes a row). `ParsedDrop.blocks()` streams the validated rows again
(a second pass over the local copy), in file order, for the writer of the new version's parts;
`ParsedDrop.sample(max_rows)` takes a bounded systematic sample of them (the drift report's):
during the `blocks()` pass if `keep_sample` asked for it (ingest's Parquet parts pass), else in a
pass of its own.

Contract:

* peak memory is bounded by the block (BLOCK_BYTES of CSV, a few times that in Arrow) and the
  25 bytes a row above, not by the file: the file itself is on local disk (TMPDIR; in a
  container an `emptyDir` on disk, not tmpfs, or it counts as memory);
* a drop is accepted only if every block passes (all-or-nothing: nothing is appended before the
  whole file has been read and checked); a file the streaming pass refuses is re-read whole by
  the detailed parser (`contract.parse_csv_table`), which lists every problem or accepts what
  Arrow is merely stricter about, exactly as before, but only up to DETAILED_PARSE_MAX_BYTES:
  a larger file is rejected with the first problem the streaming pass found;
* `blocks()` yields the same rows as `contract.parse_csv_table` of the whole file (same
  columns, types and schema metadata), so the Parquet parts are the same bytes either way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from readmission import contract, corpus, drift

# Download chunk and CSV block sizes: the memory the streaming pass holds at a time.
DOWNLOAD_CHUNK_BYTES = 8 * 1024 * 1024
BLOCK_BYTES = 16 * 1024 * 1024
# A file the streaming pass refuses is re-read whole (to list every problem) up to this size.
DETAILED_PARSE_MAX_BYTES = 256 * 1024 * 1024
_HEAD_BYTES = 65536
# Rows a block of a drop held in memory (the detailed parser's) is streamed in.
TABLE_BLOCK_ROWS = 100_000


def download(chunks: Iterable[bytes], path: Path) -> tuple[int, str]:
    """Write `chunks` to `path`; (bytes written, sha256 hex of them)."""
    digest = hashlib.sha256()
    size = 0
    with path.open("wb") as sink:
        for chunk in chunks:
            digest.update(chunk)
            sink.write(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


@dataclass
class ParsedDrop:
    """A validated drop: per-row columns for deduplication and the split, and its rows on demand.

    Exactly one of `path` (the local copy, re-read by `blocks()`) and `table` (a file only the
    detailed parser accepts, held in memory) is set."""

    header: list[str]
    rows: int
    encounter_ids: np.ndarray  # int64, file order
    patient_nbrs: np.ndarray  # int64
    labels: np.ndarray  # int8 codes in the order of contract.TARGET_CLASSES
    row_hashes: np.ndarray  # uint64, corpus.row_hashes
    missing_columns: list[str]  # contract.missing_feature_columns of the whole file
    path: Path | None = None
    table: pa.Table | None = None
    # `keep_sample`: the sample's size the next complete pass of `blocks()` takes, and the
    # sample it took, until `sample` hands it over
    _kept_rows: int = field(default=0, init=False, repr=False)
    _kept: pa.Table | None = field(default=None, init=False, repr=False)

    def blocks(self) -> Iterator[pa.Table]:
        """The drop's rows in file order, a block at a time (same rows on every call)."""
        sample = None
        if self._kept_rows and self._kept is None:
            sample = drift.SystematicSample(self.rows, self._kept_rows)
        for block in self._stream():
            if sample is not None:
                sample.add(block)
            yield block
        if sample is not None:  # only a complete pass: a pass left halfway keeps nothing
            self._kept = sample.table()

    def _stream(self) -> Iterator[pa.Table]:
        if self.table is not None:
            for batch in self.table.to_batches(max_chunksize=TABLE_BLOCK_ROWS):
                yield pa.Table.from_batches([batch], schema=self.table.schema)
            return
        assert self.path is not None
        seen = 0
        for block in _csv_blocks(self.path, self.header):
            seen += block.num_rows
            yield block
        if seen != self.rows:  # the local copy changed under us: never write a partial version
            raise RuntimeError(f"{self.path} gave {seen} rows on re-reading, {self.rows} before")

    def keep_sample(self, max_rows: int) -> None:
        """Have the next complete pass of `blocks()` (ingest's: the Parquet parts) also take
        `sample(max_rows)` and keep it for the `sample` call that follows, which then reads
        nothing. The memory held from that pass on is the sample (at most `max_rows` rows)."""
        if max_rows < 1:
            raise ValueError(f"a sample needs at least one row, got {max_rows}")
        self._kept_rows, self._kept = max_rows, None

    def sample(self, max_rows: int) -> pa.Table:
        """A systematic sample (drift.SystematicSample) of at most `max_rows` of the drop's
        rows, in file order; every row when the drop has no more than `max_rows`. The one a
        pass of `blocks()` kept (`keep_sample`), handed over once; else taken while the rows
        stream by: the memory held is the sample and one block, whatever the file's size.
        Deterministic."""
        if self._kept is not None and self._kept_rows == max_rows:
            kept, self._kept, self._kept_rows = self._kept, None, 0
            return kept
        sample = drift.SystematicSample(self.rows, max_rows)
        for block in self._stream():
            sample.add(block)
        return sample.table()


def _csv_blocks(path: Path, header: list[str]) -> Iterator[pa.Table]:
    """Validated blocks of the CSV at `path` (the contract's typed read and checks,
    `contract.arrow_csv_options` and `contract.checked_table`); ContractViolation from the
    first block that breaks them."""
    import pyarrow.csv as pacsv

    read_options, convert_options = contract.arrow_csv_options(header, BLOCK_BYTES)
    reader = pacsv.open_csv(str(path), read_options=read_options, convert_options=convert_options)
    start = 2  # the header is line 1
    for batch in reader:
        table = pa.Table.from_batches([batch])
        yield contract.checked_table(table, f"in the rows from line {start:,} on")
        start += table.num_rows


def read_drop(path: Path, size: int) -> ParsedDrop:
    """Validate the local copy at `path` (`size` bytes) in a streaming pass; ContractViolation
    listing the problems if it breaks the contract (see the module docstring)."""
    with path.open("rb") as source:
        head = source.read(_HEAD_BYTES)
    try:
        return _streamed(path, head)
    except (contract.ContractViolation, pa.ArrowInvalid, pa.ArrowTypeError) as error:
        if size > DETAILED_PARSE_MAX_BYTES:
            problems = (
                error.problems
                if isinstance(error, contract.ContractViolation)
                else [f"the file is not well-formed CSV under the contract: {error}"]
            )
            raise contract.ContractViolation(
                [
                    *problems,
                    f"(a file over {DETAILED_PARSE_MAX_BYTES:,} bytes is checked in one "
                    f"streaming pass that stops at the first problem; fix it and upload again)",
                ]
            ) from error
        return _in_memory(path.read_bytes())


def _streamed(path: Path, head: bytes) -> ParsedDrop:
    if not head.strip():
        raise contract.ContractViolation(["the file is empty"])
    head = contract._check_bytes(head[: head.rfind(b"\n") + 1] or head)
    header = contract._header(head)
    ids, patients, labels, hashes = [], [], [], []
    valued: set[str] = set()
    for block in _csv_blocks(path, header):
        ids.append(block.column("encounter_id").to_numpy())
        patients.append(block.column(contract.GROUP_COLUMN).to_numpy())
        labels.append(corpus.label_codes(block))
        hashes.append(corpus.row_hashes(block))
        empty = set(contract.missing_feature_columns(block))
        valued.update(c for c in contract.FEATURES if c not in empty)
    rows = sum(len(a) for a in ids)
    if rows == 0:
        raise contract.ContractViolation(["the file has a header but no data rows"])
    return ParsedDrop(
        header=header,
        rows=rows,
        encounter_ids=np.concatenate(ids).astype(np.int64, copy=False),
        patient_nbrs=np.concatenate(patients).astype(np.int64, copy=False),
        labels=np.concatenate(labels).astype(np.int8, copy=False),
        row_hashes=np.concatenate(hashes).astype(np.uint64, copy=False),
        missing_columns=[c for c in contract.FEATURES if c not in valued],
        path=path,
    )


def _in_memory(data: bytes) -> ParsedDrop:
    table = contract.parse_csv_table(data)  # ContractViolation with every problem
    return table_drop(table)


def table_drop(table: pa.Table) -> ParsedDrop:
    """A ParsedDrop of a table `contract.parse_csv_table` returned."""
    return ParsedDrop(
        header=list(contract.COLUMNS),
        rows=table.num_rows,
        encounter_ids=table.column("encounter_id").to_numpy().astype(np.int64, copy=False),
        patient_nbrs=table.column(contract.GROUP_COLUMN).to_numpy().astype(np.int64, copy=False),
        labels=corpus.label_codes(table),
        row_hashes=corpus.row_hashes(table),
        missing_columns=contract.missing_feature_columns(table),
        table=table,
    )


def stream_chunks(body: Any, chunk_bytes: int = DOWNLOAD_CHUNK_BYTES) -> Iterator[bytes]:
    """The chunks of a botocore StreamingBody (closed afterwards)."""
    try:
        yield from body.iter_chunks(chunk_bytes)
    finally:
        body.close()
