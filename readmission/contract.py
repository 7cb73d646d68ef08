"""The data contract of the UCI "Diabetes 130-US hospitals 1999-2008" file.

One module owns the columns, their kinds and the target, for ingest, training and serving.
The constants are plain Python (the predict function imports them without pandas);
`parse_csv` imports pandas when called.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

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


def parse_csv(data: bytes) -> pd.DataFrame:
    """Parse and validate raw CSV bytes against the contract.

    Returns a frame with the 50 columns: ids as int64, numeric features as float64 (NaN where
    missing), every other column as pandas strings with missing values (`?`) as NA; `None` in the
    lab columns stays the category "None". Raises ContractViolation listing every problem found.
    """
    import pandas as pd

    if not data.strip():
        raise ContractViolation(["the file is empty"])
    if b"\x00" in data[:65536]:
        raise ContractViolation(["the file is binary, not a CSV text file"])
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ContractViolation(
                [f"the file is not UTF-8/ASCII text (undecodable byte at offset {exc.start})"]
            ) from exc
        text = data.decode("utf-8")

    header_line = text.splitlines()[0] if text else ""
    header = [h.strip() for h in header_line.split(",")]
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
    extra = [h for h in header if h not in COLUMNS]
    if missing:
        problems.append(f"missing columns: {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected columns: {', '.join(extra)}")
    if problems:
        raise ContractViolation(problems)

    try:
        frame = pd.read_csv(
            io.StringIO(text),
            dtype=str,
            keep_default_na=False,
            na_values=[MISSING_MARKER],
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
        bad = values.isna() & frame[column].notna()
        if bad.any():
            problems.append(
                f"column {column} must be numeric; it is not on rows {_first_rows(bad)}"
            )
        else:
            frame[column] = values.astype("float64")
    all_missing = [c for c in FEATURES if frame[c].isna().all()]
    if all_missing:
        problems.append(f"columns with no value on any row: {', '.join(all_missing)}")

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
