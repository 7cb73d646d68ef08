"""Drift reports (readmission.drift) on the real file: the acceptance of issue #18, item 1.

The reference is the profile of one random half of the real CSV; the drop is the other half,
as it is or with `age` moved two bands up and a new `admission_type_id` value.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pytest
from support.seaweed_server import real_csv_bytes

from readmission import contract, drift
from readmission.config import Settings
from readmission.drift_reports import thresholds
from readmission.storage import json_bytes

AGE_BANDS = tuple(f"[{low}-{low + 10})" for low in range(0, 100, 10))
NEW_ADMISSION_TYPE = "99"
NEW_ADMISSION_ROWS = 1_234


@functools.cache
def halves() -> tuple[pa.Table, pa.Table]:
    try:
        table = contract.parse_csv_table(real_csv_bytes())
    except Exception as error:  # the dataset is not on this machine
        pytest.skip(f"the real CSV is not available: {error}")
    mask = np.random.default_rng(18).random(table.num_rows) < 0.5
    return table.filter(pa.array(mask)), table.filter(pa.array(~mask))


@functools.cache
def reference() -> dict:
    return drift.build_profile(halves()[0], source={"corpus_version": "half"})


def shifted(table: pa.Table) -> pa.Table:
    """`age` two bands up (the top band stays) and NEW_ADMISSION_ROWS rows of a new
    admission type."""
    ages = table.column("age").to_pylist()
    moved = [AGE_BANDS[min(AGE_BANDS.index(a) + 2, len(AGE_BANDS) - 1)] for a in ages]
    types = table.column("admission_type_id").to_pylist()
    types[:NEW_ADMISSION_ROWS] = [NEW_ADMISSION_TYPE] * NEW_ADMISSION_ROWS
    table = table.set_column(table.schema.get_field_index("age"), "age", pa.array(moved))
    index = table.schema.get_field_index("admission_type_id")
    return table.set_column(index, "admission_type_id", pa.array(types))


def test_a_random_half_of_the_real_file_does_not_drift_from_the_other_half() -> None:
    report = drift.compare(reference(), halves()[1], drift.Thresholds(), drop_id="half")
    assert report["status"] == drift.STABLE, report["message"]
    assert set(report["columns"]) == set(contract.FEATURES)
    psi = {column: entry["psi"] for column, entry in report["columns"].items()}
    assert max(psi.values()) < 0.1, psi
    assert report["target"]["psi"] < 0.1
    assert report["drifted"] == report["watch"] == []
    assert report["rows"] == halves()[1].num_rows
    assert report["reference"]["rows"] == halves()[0].num_rows


def test_age_moved_two_bands_up_drifts_and_a_new_admission_type_is_listed_with_its_count() -> None:
    report = drift.compare(reference(), shifted(halves()[1]), drift.Thresholds(), drop_id="shift")
    age = report["columns"]["age"]
    assert age["psi"] > 0.2 and age["status"] == drift.DRIFTED
    assert age["test"]["p_value"] < 1e-6
    assert report["status"] == drift.DRIFTED and "age" in report["drifted"]
    unseen = report["columns"]["admission_type_id"]["unseen"]
    assert {"value": NEW_ADMISSION_TYPE, "rows": NEW_ADMISSION_ROWS} in unseen["top"]
    assert unseen["rows"] == NEW_ADMISSION_ROWS and unseen["values"] == 1
    untouched = [c for c in contract.FEATURES if c not in ("age", "admission_type_id")]
    assert all(report["columns"][c]["psi"] < 0.1 for c in untouched)
    markdown = drift.render_markdown(report)
    assert "| age | categorical |" in markdown and f"`{NEW_ADMISSION_TYPE}` (1,234)" in markdown


def test_thresholds_are_settings_and_a_report_is_deterministic() -> None:
    drop = shifted(halves()[1])
    strict = drift.compare(reference(), drop, drift.Thresholds(0.001, 0.002), drop_id="d")
    default = drift.compare(reference(), drop, drift.Thresholds(), drop_id="d")
    assert len(strict["drifted"]) > len(default["drifted"])
    assert strict["thresholds"] == {"watch": 0.001, "drifted": 0.002}
    again = drift.compare(reference(), drop, drift.Thresholds(), drop_id="d")
    assert json_bytes(again) == json_bytes(default)


def test_a_changed_missing_rate_and_target_share_are_reported() -> None:
    drop = halves()[1]
    n = drop.num_rows
    weights = pa.array([None] * n, pa.float64())
    index = drop.schema.get_field_index("num_medications")
    report = drift.compare(
        reference(),
        drop.set_column(index, "num_medications", weights),
        drift.Thresholds(),
        drop_id="m",
    )
    entry = report["columns"]["num_medications"]
    assert entry["missing"]["drop"] == 1.0 and entry["missing"]["change"] > 0.99
    assert entry["status"] == drift.DRIFTED
    only_no = drop.filter(pa.compute.equal(drop.column(contract.TARGET), "NO"))
    target = drift.compare(reference(), only_no, drift.Thresholds(), drop_id="t")["target"]
    assert target["drop"]["NO"] == 1.0 and target["change"]["<30"] < -0.1
    assert target["status"] == drift.DRIFTED


def test_the_reference_profile_is_compact_json_of_every_feature() -> None:
    profile = reference()
    assert set(profile["numeric"]) == set(contract.NUMERIC_FEATURES)
    assert set(profile["categorical"]) == set(contract.CATEGORICAL_FEATURES)
    for spec in profile["numeric"].values():
        assert len(spec["shares"]) == len(spec["edges"]) + 1
        assert abs(sum(spec["shares"]) + spec["missing"] - 1) < 1e-4
    for spec in profile["categorical"].values():
        assert abs(sum(spec["shares"].values()) + spec["other"] + spec["missing"] - 1) < 1e-4
    assert len(json_bytes(profile)) < 64_000


def test_drift_thresholds_come_from_the_environment_and_must_be_ordered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DRIFT_PSI_WATCH", raising=False)
    monkeypatch.delenv("DRIFT_PSI_DRIFTED", raising=False)
    assert thresholds(Settings.from_env()) == drift.Thresholds(0.1, 0.2)
    monkeypatch.setenv("DRIFT_PSI_WATCH", "0.05")
    monkeypatch.setenv("DRIFT_PSI_DRIFTED", "0.3")
    assert thresholds(Settings.from_env()) == drift.Thresholds(0.05, 0.3)
    monkeypatch.setenv("DRIFT_PSI_WATCH", "0.5")
    with pytest.raises(ValueError, match="DRIFT_PSI_WATCH <= DRIFT_PSI_DRIFTED"):
        Settings.from_env()
