"""The data contract of the UCI "Diabetes 130-US hospitals 1999-2008" file.

One module owns the columns, their kinds and the target, for ingest, training and serving.
The constants are plain Python (the predict function imports them without pandas);
`parse_csv` imports pandas and pyarrow when called.
"""

from __future__ import annotations

import csv
import functools
import io
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.csv as pacsv

TARGET = "readmitted"
TARGET_CLASSES = ("NO", ">30", "<30")
MISSING_MARKER = "?"

ID_COLUMNS = ("encounter_id", "patient_nbr")
GROUP_COLUMN = "patient_nbr"

NUMERIC_FEATURES = (
    "time_in_hospital",
    "num_lab_procedures",
    "num_procedures",
    "num_medications",
    "number_outpatient",
    "number_emergency",
    "number_inpatient",
    "number_diagnoses",
)

# Integer codes that name categories (see IDs_mapping.csv); kept as strings.
CODED_FEATURES = ("admission_type_id", "discharge_disposition_id", "admission_source_id")

DIAGNOSIS_FEATURES = ("diag_1", "diag_2", "diag_3")

# "None" means "test not performed": a category of its own, not a missing value.
LAB_FEATURES = ("max_glu_serum", "A1Cresult")

MEDICATION_FEATURES = (
    "metformin",
    "repaglinide",
    "nateglinide",
    "chlorpropamide",
    "glimepiride",
    "acetohexamide",
    "glipizide",
    "glyburide",
    "tolbutamide",
    "pioglitazone",
    "rosiglitazone",
    "acarbose",
    "miglitol",
    "troglitazone",
    "tolazamide",
    "examide",
    "citoglipton",
    "insulin",
    "glyburide-metformin",
    "glipizide-metformin",
    "glimepiride-pioglitazone",
    "metformin-rosiglitazone",
    "metformin-pioglitazone",
)

DEMOGRAPHIC_FEATURES = ("race", "gender", "age", "weight", "payer_code", "medical_specialty")

# The 50 columns in the order of the UCI file.
COLUMNS: tuple[str, ...] = (
    "encounter_id",
    "patient_nbr",
    "race",
    "gender",
    "age",
    "weight",
    "admission_type_id",
    "discharge_disposition_id",
    "admission_source_id",
    "time_in_hospital",
    "payer_code",
    "medical_specialty",
    "num_lab_procedures",
    "num_procedures",
    "num_medications",
    "number_outpatient",
    "number_emergency",
    "number_inpatient",
    "diag_1",
    "diag_2",
    "diag_3",
    "number_diagnoses",
    "max_glu_serum",
    "A1Cresult",
    *MEDICATION_FEATURES,
    "change",
    "diabetesMed",
    TARGET,
)

CATEGORICAL_FEATURES: tuple[str, ...] = tuple(
    c for c in COLUMNS if c not in ID_COLUMNS and c != TARGET and c not in NUMERIC_FEATURES
)
# Model inputs: every column except the ids and the target, in file order.
FEATURES: tuple[str, ...] = tuple(c for c in COLUMNS if c not in ID_COLUMNS and c != TARGET)

assert len(COLUMNS) == 50 and len(set(COLUMNS)) == 50
assert len(FEATURES) == len(NUMERIC_FEATURES) + len(CATEGORICAL_FEATURES) == 47


@dataclass
class ContractViolation(Exception):
    """The file breaks the contract; `problems` says how, in words a person can act on."""

    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "; ".join(self.problems)


def _first_rows(mask: pd.Series, limit: int = 5) -> str:
    # Row numbers as a person sees them in an editor: header is line 1.
    rows = [str(int(i) + 2) for i in mask[mask].index[:limit]]
    more = int(mask.sum()) - len(rows)
    return ", ".join(rows) + (f" and {more} more" if more > 0 else "")


_UTF8_BOM = b"\xef\xbb\xbf"
_SIGNATURES = (
    (
        b"PK\x03\x04",
        "a ZIP archive or an Excel workbook (.xlsx), not a CSV text file: open it "
        "and save it as 'CSV (comma delimited)', or unzip it first",
    ),
    (b"\x1f\x8b", "gzip-compressed, not a plain CSV text file: decompress it (gunzip) first"),
    (
        b"\xd0\xcf\x11\xe0",
        "an old Excel workbook (.xls), not a CSV text file: save it as 'CSV (comma delimited)'",
    ),
    (b"%PDF", "a PDF document, not a CSV text file"),
    (
        b"\xff\xfe",
        "UTF-16 text (Excel's 'Unicode Text'); save it as 'CSV UTF-8' or 'CSV (comma delimited)'",
    ),
    (b"\xfe\xff", "UTF-16 text; save it as 'CSV UTF-8' or 'CSV (comma delimited)'"),
)


def _check_bytes(data: bytes) -> bytes:
    """Reject what is not CSV text at all; return the bytes without a UTF-8 byte-order mark."""
    if not data.strip():
        raise ContractViolation(["the file is empty"])
    for signature, what in _SIGNATURES:
        if data.startswith(signature):
            raise ContractViolation([f"the file is {what}"])
    if b"\x00" in data[:65536]:
        raise ContractViolation(["the file is binary, not a CSV text file"])
    data = data.removeprefix(_UTF8_BOM)
    if not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise ContractViolation(
                [
                    f"the file is not UTF-8/ASCII text: byte 0x{data[exc.start]:02x} on line "
                    f"{line} cannot be decoded (probably saved as Latin-1/Windows-1252); save it "
                    f"as 'CSV UTF-8'"
                ]
            ) from exc
    return data


def _header(data: bytes) -> list[str]:
    """Column names of the first line, whitespace-trimmed; ContractViolation if they are wrong."""
    header_line = re.split(rb"\r\n|\r|\n", data[:65536], maxsplit=1)[0].decode("utf-8", "replace")
    try:
        header = [h.strip() for h in next(csv.reader([header_line]), [])]
    except csv.Error as error:
        raise ContractViolation([f"the header line is not well-formed CSV: {error}"]) from error
    if len(header) == 1 and (";" in header_line or "\t" in header_line):
        delimiter = ";" if ";" in header_line else "tab"
        raise ContractViolation(
            [f"the header is separated by {delimiter!r}, but the contract requires commas"]
        )
    problems: list[str] = []
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        problems.append(f"duplicated column names in the header: {', '.join(duplicated)}")
    missing = [c for c in COLUMNS if c not in header]
    extra = [
        h if h else "(a column without a name: a trailing comma?)"
        for h in header
        if h not in COLUMNS
    ]
    if len(extra) > 10:
        extra = [*extra[:10], f"and {len(extra) - 10} more"]
    if len(missing) == len(COLUMNS):
        found = ", ".join(repr(h) for h in header[:5]) + (" …" if len(header) > 5 else "")
        raise ContractViolation(
            [
                f"the first line names none of the {len(COLUMNS)} contract columns (found "
                f"{found}); the first line must be the header: {COLUMNS[0]},{COLUMNS[1]},…,"
                f"{COLUMNS[-1]}"
            ]
        )
    if missing:
        problems.append(f"missing columns: {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected columns: {', '.join(extra)}")
    if problems:
        raise ContractViolation(problems)
    return header


def parse_csv(data: bytes) -> pd.DataFrame:
    """Parse and validate raw CSV bytes against the contract.

    Returns a frame with the 50 columns: ids as int64, numeric features as float64 (NaN where
    missing), every other column as pandas strings with missing values (`?`) as NA; `None` in the
    lab columns stays the category "None". Raises ContractViolation listing every problem found.
    A feature column with no value on any row is not a problem (a column a hospital did not
    collect); `missing_feature_columns` names such columns so the caller can warn about them.
    """
    import pandas as pd
    import pyarrow as pa

    table = parse_csv_table(data)
    return table.to_pandas(types_mapper={pa.string(): pd.StringDtype("pyarrow")}.get)


def parse_csv_table(data: bytes) -> pa.Table:
    """`parse_csv` as an Arrow table (same columns, types and checks), without pandas' copy.

    Clean files take the fast path (Arrow's multi-threaded typed CSV reader plus vectorised
    checks); anything the fast path does not accept is re-read by the detailed path, which lists
    every problem (or accepts what Arrow is merely stricter about, e.g. ids written `12.0`).
    """
    data = _check_bytes(data)
    header = _header(data)
    table = _fast_table(data, header)
    if table is not None:
        return table
    return _frame_to_table(_detailed_frame(data, header))


def missing_feature_columns(table: pa.Table) -> list[str]:
    """The FEATURES columns of a parsed table that have no value on any row, in contract order.

    Such a file is valid (e.g. an extract whose hospital did not collect `payer_code`): the
    model sees the column as missing on every row. A NaN counts as missing like a null; a table
    without rows has no such column.
    """
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return []
    return [
        column
        for column in FEATURES
        if pc.all(pc.is_null(table.column(column), nan_is_null=True)).as_py()
    ]


def missing_columns_warning(columns: list[str]) -> str | None:
    """A sentence for the drop's receipt naming the `missing_feature_columns`, or None."""
    if not columns:
        return None
    return (
        "feature columns with no value on any row (accepted; the model treats them as "
        f"missing on every row): {', '.join(columns)}"
    )


@functools.cache
def arrow_schema() -> pa.Schema:
    """The Arrow schema of a parsed file, with pandas metadata so pandas reads it back as
    `parse_csv` returns it (StringDtype with NA, float64, int64)."""
    import pandas as pd
    import pyarrow as pa

    fields = [pa.field(c, _arrow_type(c)) for c in COLUMNS]
    empty = pd.DataFrame(
        {
            c: pd.Series(
                [],
                dtype="int64"
                if c in ID_COLUMNS
                else "float64"
                if c in NUMERIC_FEATURES
                else pd.StringDtype("pyarrow"),
            )
            for c in COLUMNS
        }
    )
    metadata = pa.Schema.from_pandas(empty, preserve_index=False).metadata
    return pa.schema(fields, metadata=metadata)


def _arrow_type(column: str) -> pa.DataType:
    import pyarrow as pa

    if column in ID_COLUMNS:
        return pa.int64()
    if column in NUMERIC_FEATURES:
        return pa.float64()
    return pa.string()


def arrow_csv_options(
    header: list[str], block_size: int | None = None
) -> tuple[pacsv.ReadOptions, pacsv.ConvertOptions]:
    """pyarrow.csv's (read, convert) options of the contract's typed read: the columns named
    by the file's `header` (its first line, skipped), each contract column of its Arrow type,
    `MISSING_MARKER` and quoted or unquoted empty strings null. `block_size`: CSV bytes per
    block of a streaming read (pyarrow's default when None)."""
    import pyarrow.csv as pacsv

    read = pacsv.ReadOptions(column_names=header, skip_rows=1)
    if block_size is not None:
        read.block_size = block_size
    convert = pacsv.ConvertOptions(
        column_types={c: _arrow_type(c) for c in COLUMNS},
        null_values=[MISSING_MARKER],
        strings_can_be_null=True,
        quoted_strings_can_be_null=True,
    )
    return read, convert


def checked_table(table: pa.Table, where: str) -> pa.Table:
    """A table (or block) of the typed read (`arrow_csv_options`) as the contract's columns,
    with `arrow_schema`'s metadata, once checked for what that read lets through: an empty id,
    "nan" or "inf" in a numeric column (the contract writes missing as `?`), a target outside
    TARGET_CLASSES. ContractViolation naming the first such problem, `where` in the file."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = table.select(list(COLUMNS))
    for column in ID_COLUMNS:
        if table.column(column).null_count:
            raise ContractViolation([f"column {column} has empty values {where}"])
    # a feature column with no value on any row is accepted (missing_feature_columns)
    for column in NUMERIC_FEATURES:
        values = table.column(column)
        if pc.any(pc.or_(pc.is_inf(values), pc.is_nan(values))).as_py():
            raise ContractViolation(
                [f"column {column} holds nan or inf {where}; missing must be written '?'"]
            )
    target = table.column(TARGET)
    if (
        target.null_count
        or not pc.all(pc.is_in(target, value_set=pa.array(TARGET_CLASSES))).as_py()
    ):
        raise ContractViolation(
            [f"target {TARGET} is not one of {', '.join(TARGET_CLASSES)} {where}"]
        )
    return table.replace_schema_metadata(arrow_schema().metadata)


def _fast_table(data: bytes, header: list[str]) -> pa.Table | None:
    """Arrow's typed read of a clean file, or None when anything looks off."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    read_options, convert_options = arrow_csv_options(header)
    try:
        table = pacsv.read_csv(
            io.BytesIO(data), read_options=read_options, convert_options=convert_options
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None
    if table.num_rows == 0:
        return None
    try:
        return checked_table(table, "in the file").combine_chunks()
    except ContractViolation:
        return None


def _frame_to_table(frame: pd.DataFrame) -> pa.Table:
    import pyarrow as pa

    schema = arrow_schema()
    arrays = [
        pa.array(
            frame[c].to_numpy(na_value=None)
            if schema.field(c).type == pa.string()
            else frame[c].to_numpy(),
            type=schema.field(c).type,
            from_pandas=True,
        )
        for c in COLUMNS
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def _ragged_lines(text: str, expected: int, limit: int = 5) -> list[str]:
    """Lines whose number of fields differs from the header's, as problems a person can fix."""
    reader = csv.reader(io.StringIO(text, newline=""))
    bad: list[tuple[int, int]] = []
    last_line = 0
    try:
        for row in reader:
            if row and len(row) != expected:
                bad.append((reader.line_num, len(row)))
            last_line = reader.line_num
    except csv.Error as error:  # e.g. a quote that is never closed
        return [
            f"the file is not well-formed CSV: reading stopped at line {reader.line_num} ({error});"
            f' look before that line for a double quote (") that is opened and never closed'
        ]
    if not bad:
        return []
    shown = ", ".join(f"line {line} has {n}" for line, n in bad[:limit])
    more = f" and {len(bad) - limit} more lines" if len(bad) > limit else ""
    problems = [
        f"every line must have {expected} comma-separated fields like the header; {shown}{more}"
    ]
    if bad[-1][0] == last_line and len(bad) == 1 and bad[0][1] < expected:
        problems.append(
            "only the last line is short: the file looks truncated (cut off before "
            "its end); upload the complete file again"
        )
    return problems


def _detailed_frame(data: bytes, header: list[str]) -> pd.DataFrame:
    """The reference parser: pandas over strings, listing every problem it finds."""
    import numpy as np
    import pandas as pd

    text = data.decode("utf-8")
    problems = _ragged_lines(text, len(header))
    if problems:
        raise ContractViolation(problems)
    try:
        frame = pd.read_csv(
            io.StringIO(text),
            dtype=str,
            keep_default_na=False,
            na_values=[MISSING_MARKER],
            header=0,
            names=header,
        )
    except (pd.errors.ParserError, ValueError) as exc:
        raise ContractViolation([f"the file is not a well-formed CSV: {exc}"]) from exc
    if len(frame) == 0:
        raise ContractViolation(["the file has a header but no data rows"])
    frame = frame[list(COLUMNS)]

    for column in ID_COLUMNS:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna() | (values % 1 != 0)
        if bad.any():
            problems.append(
                f"column {column} must be a whole number on every row; it is not on rows "
                f"{_first_rows(bad)}"
            )
        else:
            frame[column] = values.astype("int64")
    for column in NUMERIC_FEATURES:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = (values.isna() & frame[column].notna()) | np.isinf(values.fillna(0))
        if bad.any():
            problems.append(
                f"column {column} must be a finite number or {MISSING_MARKER!r} for missing; "
                f"it is not on rows {_first_rows(bad)}"
            )
        else:
            frame[column] = values.astype("float64")
    # A feature column with no value on any row is accepted: a column a hospital did not
    # collect in one extract is ordinary data (missing_feature_columns reports it).

    target = frame[TARGET]
    bad_target = ~target.isin(TARGET_CLASSES)
    if bad_target.any():
        seen = sorted(set(target[bad_target].fillna(MISSING_MARKER)))[:5]
        problems.append(
            f"target {TARGET} must be one of {', '.join(TARGET_CLASSES)}; found "
            f"{', '.join(repr(v) for v in seen)} on rows {_first_rows(bad_target)}"
        )
    if problems:
        raise ContractViolation(problems)
    for column in CATEGORICAL_FEATURES:
        frame[column] = frame[column].astype("string")
    frame[TARGET] = frame[TARGET].astype("string")
    return frame.reset_index(drop=True)
