"""The data contract: the real file parses; every kind of bad input is refused in words."""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Callable

import pandas as pd
import pyarrow as pa
import pytest
from support.seaweed_server import real_csv_bytes, sample_csv

from readmission import contract

Rows = list[list[str]]


def _rows(data: bytes) -> Rows:
    return list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))


def _csv(rows: Rows) -> bytes:
    out = io.StringIO(newline="")
    csv.writer(out, lineterminator="\r\n").writerows(rows)
    return out.getvalue().encode("utf-8")


def _edit(change: Callable[[Rows], Rows]) -> bytes:
    return _csv(change(_rows(sample_csv())))


def _column(rows: Rows, name: str) -> int:
    return rows[0].index(name)


def _drop(name: str) -> Callable[[Rows], Rows]:
    def change(rows: Rows) -> Rows:
        i = _column(rows, name)
        return [row[:i] + row[i + 1 :] for row in rows]

    return change


def _set(name: str, value: str, row_numbers: slice = slice(1, None)) -> Callable[[Rows], Rows]:
    def change(rows: Rows) -> Rows:
        i = _column(rows, name)
        for row in rows[row_numbers]:
            row[i] = value
        return rows

    return change


def _add_column(rows: Rows) -> Rows:
    return [[*rows[0], "comment"]] + [[*row, "x"] for row in rows[1:]]


def _duplicate_column(rows: Rows) -> Rows:
    return [[*row, row[2]] for row in rows]


def test_real_file_parses_with_documented_counts() -> None:
    frame = contract.parse_csv(real_csv_bytes())
    assert len(frame) == 101_766
    assert list(frame.columns) == list(contract.COLUMNS)
    assert frame[contract.TARGET].value_counts().to_dict() == {
        "NO": 54_864,
        ">30": 35_545,
        "<30": 11_357,
    }
    assert frame["encounter_id"].nunique() == 101_766
    assert frame["patient_nbr"].nunique() == 71_518
    assert frame["encounter_id"].dtype == "int64"
    assert all(frame[c].dtype == "float64" for c in contract.NUMERIC_FEATURES)
    assert all(isinstance(frame[c].dtype, pd.StringDtype) for c in contract.CATEGORICAL_FEATURES)
    # "None" in the lab columns is a category, "?" is missing
    assert (frame["max_glu_serum"] == "None").sum() == 96_420
    assert frame["race"].isna().sum() == 2_273
    assert frame["weight"].notna().sum() == 3_197


def test_fast_and_detailed_paths_agree_on_the_real_file() -> None:
    data = real_csv_bytes()
    fast = contract.parse_csv_table(data)
    detailed = contract._frame_to_table(contract._detailed_frame(data, contract._header(data)))
    assert fast.equals(detailed)
    assert fast.schema.equals(detailed.schema, check_metadata=True)


@pytest.mark.parametrize(
    ("label", "transform"),
    [
        ("reordered columns", lambda rows: [row[::-1] for row in rows]),
        ("spaces around names", lambda rows: [[f" {h} " for h in rows[0]], *rows[1:]]),
    ],
)
def test_harmless_layout_differences_parse_to_the_same_frame(
    label: str, transform: Callable[[Rows], Rows]
) -> None:
    expected = contract.parse_csv(sample_csv())
    assert contract.parse_csv(_edit(transform)).equals(expected), label


def test_utf8_byte_order_mark_and_lf_line_endings_are_accepted() -> None:
    expected = contract.parse_csv(sample_csv())
    data = b"\xef\xbb\xbf" + sample_csv().replace(b"\r\n", b"\n")
    assert contract.parse_csv(data).equals(expected)


def test_old_mac_line_endings_and_quoted_values_are_accepted() -> None:
    expected = contract.parse_csv(sample_csv())
    assert contract.parse_csv(sample_csv().replace(b"\r\n", b"\r")).equals(expected)
    quoted = _edit(lambda rows: rows)
    assert contract.parse_csv(quoted.replace(b",Caucasian,", b',"Caucasian",')).equals(expected)


def test_ids_written_as_whole_floats_take_the_detailed_path_and_pass() -> None:
    data = _edit(_set("encounter_id", "12.0", slice(1, 2)))
    frame = contract.parse_csv(data)
    assert frame["encounter_id"].iloc[0] == 12
    assert frame["encounter_id"].dtype == "int64"


def _truncated() -> bytes:
    data = sample_csv()
    return data[: data.rindex(b"\r\n", 0, len(data) - 2) + 40]


BAD_INPUTS: dict[str, tuple[Callable[[], bytes], str]] = {
    "empty": (lambda: b"", "the file is empty"),
    "whitespace only": (lambda: b"  \r\n\r\n", "the file is empty"),
    "missing column": (lambda: _edit(_drop("race")), "missing columns: race"),
    "extra column": (lambda: _edit(_add_column), "unexpected columns: comment"),
    "duplicated column": (lambda: _edit(_duplicate_column), "duplicated column names"),
    "trailing comma": (
        lambda: _edit(lambda rows: [[*row, ""] for row in rows]),
        "a column without a name",
    ),
    "wrong target values": (
        lambda: _edit(_set(contract.TARGET, "YES", slice(3, 5))),
        "target readmitted must be one of NO, >30, <30; found 'YES' on rows 4, 5",
    ),
    "missing target": (lambda: _edit(_set(contract.TARGET, "?", slice(1, 2))), "found '?'"),
    "zero rows": (lambda: sample_csv().split(b"\r\n")[0] + b"\r\n", "no data rows"),
    "binary": (lambda: b"\x00\x01\x02garbage" * 100, "binary"),
    "zip or xlsx": (lambda: b"PK\x03\x04" + b"\x00" * 100, "Excel workbook"),
    "gzip": (lambda: gzip.compress(sample_csv()), "gzip-compressed"),
    "semicolon delimiter": (
        lambda: sample_csv().replace(b",", b";"),
        "separated by ';', but the contract requires commas",
    ),
    "tab delimiter": (lambda: sample_csv().replace(b",", b"\t"), "separated by 'tab'"),
    "latin-1 encoding": (
        lambda: sample_csv().replace(b"Caucasian", b"Cauc\xe1sian", 1),
        "not UTF-8/ASCII text: byte 0xe1 on line",
    ),
    "utf-16 encoding": (lambda: sample_csv().decode().encode("utf-16"), "UTF-16"),
    "truncated file": (lambda: _truncated(), "the file looks truncated"),
    "ragged line": (
        lambda: _edit(lambda rows: [*rows[:3], rows[3][:-2], *rows[4:]]),
        "line 4 has 48",
    ),
    "unclosed quote": (
        lambda: sample_csv().replace(b",Caucasian,", b',"Caucasian,', 1),
        'a double quote (") that is opened and never closed',
    ),
    "no header line": (
        lambda: b"\r\n".join(sample_csv().split(b"\r\n")[1:]),
        "the first line names none of the 50 contract columns",
    ),
    "target missing on every row": (
        lambda: _edit(_set(contract.TARGET, "?")),
        "target readmitted must be one of NO, >30, <30; found '?' on rows 2, 3, 4, 5, 6 and",
    ),
    "non-numeric numeric": (
        lambda: _edit(_set("num_medications", "many", slice(2, 3))),
        "column num_medications must be a finite number or '?' for missing; it is not on rows 3",
    ),
    "empty numeric field": (
        lambda: _edit(_set("num_procedures", "", slice(1, 2))),
        "column num_procedures must be a finite number",
    ),
    "nan and inf": (
        lambda: _edit(_set("time_in_hospital", "inf", slice(1, 2))),
        "column time_in_hospital must be a finite number",
    ),
    "non-integer id": (
        lambda: _edit(_set("patient_nbr", "P-17", slice(1, 2))),
        "column patient_nbr must be a whole number on every row; it is not on rows 2",
    ),
    "missing id": (
        lambda: _edit(_set("encounter_id", "?", slice(5, 6))),
        "column encounter_id must be a whole number on every row; it is not on rows 6",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_is_refused_with_a_message_naming_the_problem(kind: str) -> None:
    make, expected = BAD_INPUTS[kind]
    with pytest.raises(contract.ContractViolation) as raised:
        contract.parse_csv(make())
    assert expected in str(raised.value), raised.value.problems
    assert raised.value.problems, "a violation must list its problems"


def _both_paths(data: bytes) -> tuple[pa.Table | None, pa.Table]:
    """(fast path's table or None if it hands the file on, detailed path's table)."""
    header = contract._header(data)
    fast = contract._fast_table(data, header)
    detailed = contract._frame_to_table(contract._detailed_frame(data, header))
    return fast, detailed


@pytest.mark.parametrize("column", ["payer_code", "num_procedures"])
def test_a_feature_column_with_no_value_is_accepted_and_reported(column: str) -> None:
    data = _edit(_set(column, "?"))
    table = contract.parse_csv_table(data)
    assert table.num_rows == len(_rows(data)) - 1
    assert table.column(column).null_count == table.num_rows
    assert contract.missing_feature_columns(table) == [column]
    # both parse paths accept it and agree
    fast, detailed = _both_paths(data)
    assert fast is not None and fast.equals(detailed) and fast.equals(table)
    frame = contract.parse_csv(data)
    assert frame[column].isna().all()
    warning = contract.missing_columns_warning(contract.missing_feature_columns(table))
    assert warning == (
        "feature columns with no value on any row (accepted; the model treats them as missing "
        f"on every row): {column}"
    )


def test_several_missing_feature_columns_are_reported_in_contract_order() -> None:
    data = _edit(lambda rows: _set("weight", "?")(_set("num_procedures", "?")(rows)))
    table = contract.parse_csv_table(data)
    missing = contract.missing_feature_columns(table)
    assert missing == ["weight", "num_procedures"]
    assert (contract.missing_columns_warning(missing) or "").endswith(": weight, num_procedures")


def test_a_file_with_every_feature_present_reports_nothing() -> None:
    table = contract.parse_csv_table(sample_csv())
    assert contract.missing_feature_columns(table) == []
    assert contract.missing_columns_warning([]) is None


def test_missing_feature_columns_counts_nan_as_missing() -> None:
    table = pa.table(
        {c: pa.array([None, None], type=contract._arrow_type(c)) for c in contract.COLUMNS}
    ).set_column(
        contract.COLUMNS.index("num_medications"),
        "num_medications",
        pa.array([float("nan"), None], type=pa.float64()),
    )
    assert "num_medications" in contract.missing_feature_columns(table)
    assert contract.missing_feature_columns(table.slice(0, 0)) == []


def test_a_feature_column_with_no_value_does_not_hide_other_problems() -> None:
    data = _edit(
        lambda rows: _set("payer_code", "?")(_set(contract.TARGET, "YES", slice(2, 3))(rows))
    )
    with pytest.raises(contract.ContractViolation) as raised:
        contract.parse_csv(data)
    assert raised.value.problems == [
        "target readmitted must be one of NO, >30, <30; found 'YES' on rows 3"
    ]


@pytest.mark.parametrize(
    ("label", "rows"), [("one row", slice(4, 5)), ("every row", slice(1, None))]
)
def test_a_target_column_with_missing_values_is_still_rejected(label: str, rows: slice) -> None:
    data = _edit(_set(contract.TARGET, "?", rows))
    header = contract._header(data)
    assert contract._fast_table(data, header) is None, label
    with pytest.raises(contract.ContractViolation) as raised:
        contract.parse_csv(data)
    assert "target readmitted must be one of NO, >30, <30; found '?'" in str(raised.value)


def test_an_id_column_with_no_value_is_still_rejected() -> None:
    data = _edit(_set("patient_nbr", "?"))
    with pytest.raises(contract.ContractViolation) as raised:
        contract.parse_csv(data)
    assert "column patient_nbr must be a whole number on every row" in str(raised.value)


def test_the_real_files_first_2000_rows_parse_without_payer_code() -> None:
    """The first 2,000 encounters of the UCI file have no payer_code: ordinary data."""
    lines = real_csv_bytes().split(b"\r\n")
    data = b"\r\n".join(lines[:2001]) + b"\r\n"
    table = contract.parse_csv_table(data)
    assert table.num_rows == 2_000
    assert contract.missing_feature_columns(table) == ["payer_code"]
    fast, detailed = _both_paths(data)
    assert fast is not None and fast.equals(detailed)
    assert contract.missing_columns_warning(["payer_code"]) == (
        "feature columns with no value on any row (accepted; the model treats them as missing "
        "on every row): payer_code"
    )


def test_every_problem_is_listed_not_just_the_first() -> None:
    data = _edit(
        lambda rows: _set(contract.TARGET, "maybe", slice(1, 2))(
            _set("num_medications", "x", slice(2, 3))(rows)
        )
    )
    with pytest.raises(contract.ContractViolation) as raised:
        contract.parse_csv(data)
    problems = " ".join(raised.value.problems)
    assert "num_medications" in problems and "'maybe'" in problems
