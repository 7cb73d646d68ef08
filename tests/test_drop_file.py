"""The streaming read of a drop: the same rows as the whole-file parser, block by block."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from support.seaweed_server import real_csv_bytes, sample_csv

from readmission import contract, corpus, drop_file


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "drop.csv"
    path.write_bytes(data)
    return path


def _with_last_target(data: bytes, value: bytes) -> bytes:
    lines = data.rstrip(b"\r\n").split(b"\r\n")
    lines[-1] = lines[-1].rsplit(b",", 1)[0] + b"," + value
    return b"\r\n".join(lines) + b"\r\n"


def test_download_hashes_exactly_the_bytes_written(tmp_path: Path) -> None:
    data = sample_csv()
    chunks = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    size, sha256 = drop_file.download(chunks, tmp_path / "copy.csv")
    assert (size, sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert (tmp_path / "copy.csv").read_bytes() == data


def test_streamed_blocks_are_the_rows_the_whole_file_parser_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(drop_file, "BLOCK_BYTES", 1 << 20)  # the real file in ~19 blocks
    data = real_csv_bytes()
    drop = drop_file.read_drop(_write(tmp_path, data), len(data))
    blocks = list(drop.blocks())
    whole = contract.parse_csv_table(data)
    assert drop.table is None and len(blocks) > 10
    streamed = pa.concat_tables(blocks).combine_chunks()
    assert streamed.equals(whole) and streamed.schema.metadata == whole.schema.metadata
    assert drop.rows == whole.num_rows
    assert np.array_equal(drop.encounter_ids, whole.column("encounter_id").to_numpy())
    assert np.array_equal(drop.patient_nbrs, whole.column("patient_nbr").to_numpy())
    assert np.array_equal(drop.labels, corpus.label_codes(whole))
    assert np.array_equal(drop.row_hashes, corpus.row_hashes(whole))
    assert drop.missing_columns == contract.missing_feature_columns(whole) == []


def test_a_sample_is_the_systematic_rows_of_the_file_across_blocks_and_every_row_when_small(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(drop_file, "BLOCK_BYTES", 1 << 20)  # the real file in ~19 blocks
    data = real_csv_bytes()
    drop = drop_file.read_drop(_write(tmp_path, data), len(data))
    whole = contract.parse_csv_table(data)
    sample = drop.sample(7_000)
    positions = [k * whole.num_rows // 7_000 for k in range(7_000)]
    assert sample.num_rows == 7_000
    assert sample.combine_chunks().equals(whole.take(positions).combine_chunks())
    assert sample.schema.metadata == whole.schema.metadata
    assert drop.sample(7_000).equals(sample)  # deterministic
    assert drop.sample(whole.num_rows + 1).combine_chunks().equals(whole)
    in_memory = drop_file.table_drop(whole)  # a drop only the detailed parser accepts
    assert in_memory.sample(7_000).combine_chunks().equals(sample.combine_chunks())
    with pytest.raises(ValueError, match="at least one row"):
        drop.sample(0)


def test_a_kept_sample_is_taken_by_the_blocks_pass_and_handed_over_without_reading_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(drop_file, "BLOCK_BYTES", 1 << 20)
    data = real_csv_bytes()
    path = _write(tmp_path, data)
    drop = drop_file.read_drop(path, len(data))
    expected = drop.sample(7_000)
    drop.keep_sample(7_000)
    next(drop.blocks())  # a pass left halfway keeps nothing
    streamed = pa.concat_tables(drop.blocks())  # the parts pass
    path.unlink()  # what follows cannot read the local copy
    assert drop.sample(7_000).equals(expected)
    with pytest.raises(FileNotFoundError):  # handed over once, not held
        drop.sample(7_000)
    assert streamed.num_rows == drop.rows


def test_a_column_empty_in_one_block_only_is_not_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(drop_file, "BLOCK_BYTES", 1 << 16)
    data = real_csv_bytes()[: 4 << 20]  # the first ~20,000 rows have no payer_code, later do
    data = data[: data.rindex(b"\r\n") + 2]
    drop = drop_file.read_drop(_write(tmp_path, data), len(data))
    assert drop.missing_columns == []
    head = data[: 1 << 20]
    head = head[: head.rindex(b"\r\n") + 2]
    assert drop_file.read_drop(_write(tmp_path, head), len(head)).missing_columns == ["payer_code"]


def test_a_file_the_stream_refuses_is_read_whole_by_the_detailed_parser(tmp_path: Path) -> None:
    data = sample_csv()
    bad = _with_last_target(data, b"YES")
    with pytest.raises(contract.ContractViolation) as refused:
        drop_file.read_drop(_write(tmp_path, bad), len(bad))
    # the whole-file parser's words, every bad row named
    assert refused.value.problems == _problems_of(bad)
    lines = data.split(b"\r\n")
    cells = lines[1].split(b",")
    lines[1] = b",".join([cells[0] + b".0", *cells[1:]])  # an id written 12.0: accepted
    accepted = b"\r\n".join(lines)
    drop = drop_file.read_drop(_write(tmp_path, accepted), len(accepted))
    assert drop.table is not None and drop.rows == len(lines) - 2
    assert pa.concat_tables(drop.blocks()).equals(contract.parse_csv_table(accepted))


def _problems_of(data: bytes) -> list[str]:
    with pytest.raises(contract.ContractViolation) as violation:
        contract.parse_csv_table(data)
    return violation.value.problems


def test_a_file_too_large_to_read_whole_is_refused_at_its_first_bad_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(drop_file, "BLOCK_BYTES", 1 << 16)
    monkeypatch.setattr(drop_file, "DETAILED_PARSE_MAX_BYTES", 0)
    bad = _with_last_target(sample_csv(), b"YES")
    with pytest.raises(contract.ContractViolation) as refused:
        drop_file.read_drop(_write(tmp_path, bad), len(bad))
    first, note = refused.value.problems
    assert first.startswith("target readmitted is not one of NO, >30, <30 in the rows from line")
    assert "one streaming pass" in note
