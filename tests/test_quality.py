"""readmission.quality: calibration and per-group metrics, checked against direct computations
(scikit-learn, a hand-written ECE loop) on small generated data and on the real file's rows."""

from __future__ import annotations

import gzip
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import brier_score_loss, precision_score, recall_score, roc_auc_score

from readmission import quality
from readmission.contract import parse_csv
from readmission.features import target_values, to_model_frame

CLASSES = ("<30", ">30", "NO")
ROOT = Path(__file__).resolve().parents[1]
CSV = Path(os.environ.get("DIABETES_CSV") or ROOT / "../shared/data/diabetic_data.csv.gz")


def generated(rows: int, seed: int = 7) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Demographics, labels and probabilities loosely tied to the labels (so metrics vary)."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(CLASSES, size=rows, p=[0.15, 0.35, 0.5]).astype(object)
    logits = rng.normal(size=(rows, 3)) + 1.5 * (labels[:, None] == np.array(CLASSES))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    frame = pd.DataFrame(
        {
            "age": rng.choice(["[40-50)", "[50-60)", "[60-70)"], size=rows),
            "gender": rng.choice(["Female", "Male"], size=rows),
            "race": rng.choice(["Caucasian", "AfricanAmerican", "?"], size=rows),
        }
    )
    return frame, labels, probabilities


def hand_ece(predicted: np.ndarray, outcome: np.ndarray, bins: int) -> float:
    total = 0.0
    for b in range(bins):
        lower, upper = b / bins, (b + 1) / bins
        inside = [
            i for i, p in enumerate(predicted) if lower <= p < upper or (b == bins - 1 and p == 1.0)
        ]
        if inside:
            mean_p = sum(predicted[i] for i in inside) / len(inside)
            rate = sum(outcome[i] for i in inside) / len(inside)
            total += len(inside) / len(predicted) * abs(mean_p - rate)
    return total


def test_brier_per_class_is_sklearns_one_vs_rest_brier_and_the_mean_is_their_mean() -> None:
    _, labels, probabilities = generated(2_000)
    report = quality.calibration(probabilities, CLASSES, labels)
    for i, label in enumerate(CLASSES):
        expected = brier_score_loss(labels == label, probabilities[:, i])
        assert report["brier"][label] == pytest.approx(expected, abs=1e-12)
    assert report["brier_mean"] == pytest.approx(np.mean(list(report["brier"].values())))


def test_ece_is_the_row_weighted_gap_of_ten_equal_width_bins() -> None:
    _, labels, probabilities = generated(1_500)
    # the edges: exactly 0, exactly 1 and a bin boundary
    probabilities[:3, 0] = [0.0, 1.0, 0.3]
    report = quality.calibration(probabilities, CLASSES, labels)
    assert quality.ECE_BINS == 10
    for i, label in enumerate(CLASSES):
        outcome = (labels == label).astype(float)
        expected = hand_ece(list(probabilities[:, i]), list(outcome), 10)
        assert report["ece"][label] == pytest.approx(expected, abs=1e-12)
        bins = report["reliability"][label]
        assert len(bins) == 10 and sum(b["rows"] for b in bins) == len(labels)
    assert report["reliability"]["<30"][9]["rows"] >= 1  # 1.0 is in the last bin


def test_a_perfectly_calibrated_class_has_no_calibration_error() -> None:
    predicted = np.array([0.25] * 4 + [0.75] * 4)
    outcome = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    bins = quality.reliability_bins(predicted, outcome)
    assert quality.expected_calibration_error(bins) == pytest.approx(0.0)


def test_group_metrics_are_sklearns_on_the_groups_rows() -> None:
    frame, labels, probabilities = generated(3_000)
    metrics = quality.group_metrics(frame, probabilities, CLASSES, labels)
    predicted = np.array(CLASSES, dtype=object)[probabilities.argmax(axis=1)]
    for column in quality.GROUP_COLUMNS:
        names = [g["group"] for g in metrics["groups"][column]]
        assert names == sorted(set(frame[column]))
        for group in metrics["groups"][column]:
            rows = (frame[column] == group["group"]).to_numpy()
            y, p, hat = labels[rows], probabilities[rows], predicted[rows]
            assert group["rows"] == rows.sum()
            assert group["prevalence"] == pytest.approx(np.mean(y == "<30"))
            assert group["recall"] == pytest.approx(
                recall_score(y, hat, labels=["<30"], average=None)[0]
            )
            assert group["precision"] == pytest.approx(
                precision_score(y, hat, labels=["<30"], average=None)[0]
            )
            auc = roc_auc_score(y, p, multi_class="ovr", average="weighted", labels=list(CLASSES))
            assert group["roc_auc_ovr"] == pytest.approx(auc)
            briers = [brier_score_loss(y == c, p[:, i]) for i, c in enumerate(CLASSES)]
            assert group["brier_mean"] == pytest.approx(np.mean(briers))
    overall = metrics["overall"]
    assert overall["recall"] == pytest.approx(
        recall_score(labels, predicted, labels=["<30"], average=None)[0]
    )


def test_undefined_group_figures_are_none_not_zero_or_nan() -> None:
    labels = np.array([">30", "NO", "NO"], dtype=object)  # no "<30" at all
    probabilities = np.array([[0.1, 0.6, 0.3], [0.2, 0.3, 0.5], [0.1, 0.2, 0.7]])
    figures = quality.subset_metrics(probabilities, CLASSES, labels)
    assert figures["recall"] is None and figures["precision"] is None
    assert figures["roc_auc_ovr"] is None
    assert figures["prevalence"] == 0.0 and figures["rows"] == 3


def flag_case() -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Group A (600 rows): every "<30" found. Group B (600 rows): half of them found. Group C
    (100 rows): none found. Overall "<30" recall is well above B's and C's."""
    blocks = []
    for name, rows, found in (("A", 600, 1.0), ("B", 600, 0.5), ("C", 100, 0.0)):
        labels = np.array(["<30"] * (rows // 2) + ["NO"] * (rows // 2), dtype=object)
        probabilities = np.tile([0.1, 0.1, 0.8], (rows, 1))
        hits = int(rows // 2 * found)
        probabilities[:hits] = [0.8, 0.1, 0.1]
        probabilities[rows // 2 : rows // 2 + 5] = [0.1, 0.8, 0.1]  # every class predicted
        labels[rows // 2 : rows // 2 + 5] = ">30"
        blocks.append((pd.DataFrame({"race": [name] * rows}), labels, probabilities))
    frame = pd.concat([b[0] for b in blocks], ignore_index=True)
    return frame, np.concatenate([b[1] for b in blocks]), np.vstack([b[2] for b in blocks])


def test_a_large_group_with_low_recall_is_flagged_and_a_small_one_is_not() -> None:
    frame, labels, probabilities = flag_case()
    metrics = quality.group_metrics(frame, probabilities, CLASSES, labels, columns=("race",))
    by_name = {g["group"]: g for g in metrics["groups"]["race"]}
    overall = metrics["overall"]["recall"]
    assert by_name["B"]["rows"] >= quality.MIN_GROUP_ROWS
    assert overall - by_name["B"]["recall"] > quality.MAX_RECALL_GAP
    assert by_name["C"]["rows"] < quality.MIN_GROUP_ROWS and by_name["C"]["recall"] == 0.0
    assert [(g["group"], g["flagged"]) for g in metrics["groups"]["race"]] == [
        ("A", False),
        ("B", True),
        ("C", False),
    ]
    assert metrics["flagged"] == [
        {
            "column": "race",
            "group": "B",
            "rows": 600,
            "recall": pytest.approx(0.5),
            "overall_recall": pytest.approx(overall),
        }
    ]


def test_missing_race_is_its_own_question_mark_group() -> None:
    frame = pd.DataFrame({"race": ["Caucasian", None, np.nan, "", "?", "Asian"]})
    assert list(quality.group_values(frame, "race")) == ["Caucasian", "?", "?", "?", "?", "Asian"]


def report_of(rows: int) -> dict:
    frame, labels, probabilities = generated(rows)
    half = rows // 2
    return quality.quality_report(
        CLASSES,
        {
            "validation": (frame[:half], labels[:half], probabilities[:half]),
            "test": (frame[half:], labels[half:], probabilities[half:]),
        },
    )


def test_the_report_and_its_renderings_are_deterministic_bytes() -> None:
    first, second = report_of(1_000), report_of(1_000)
    assert quality.to_json(first) == quality.to_json(second)
    document = json.loads(quality.to_json(first))
    assert document == first  # rounded floats survive JSON unchanged
    brier = document["splits"]["test"]["brier_mean"]
    assert brier == round(brier, quality.FLOAT_DIGITS)
    png = quality.to_png(first, "title")
    assert png.startswith(b"\x89PNG") and png == quality.to_png(second, "title")
    assert b"Software" not in png and b"Creation" not in png


def test_the_summary_names_brier_ece_and_the_test_splits_flagged_groups() -> None:
    report = report_of(1_000)
    summary = quality.summary(report)
    assert summary["test"]["brier"] == report["splits"]["test"]["brier"]
    assert summary["test"]["ece"] == report["splits"]["test"]["ece"]
    assert summary["validation"]["brier_mean"] == report["splits"]["validation"]["brier_mean"]
    assert summary["flagged_groups"] == report["splits"]["test"]["flagged"]
    assert summary["test"]["positive_recall"] == report["splits"]["test"]["overall"]["recall"]
    assert summary["positive_class"] == "<30"
    assert summary["ece_bins"] == 10


def test_on_the_real_files_rows_missing_race_is_kept_and_figures_are_sklearns() -> None:
    if not CSV.exists():
        pytest.fail(f"the diabetes CSV is missing: {CSV} (set DIABETES_CSV)")
    raw = parse_csv(gzip.decompress(CSV.read_bytes()))
    assert raw["race"].isna().any()  # the contract parses "?" as missing
    frame, labels = to_model_frame(raw), target_values(raw)
    # a simple "model": each age band's class shares (no fit needed)
    shares = pd.crosstab(frame["age"], labels, normalize="index")[list(CLASSES)]
    probabilities = shares.loc[frame["age"]].to_numpy()
    report = quality.quality_report(CLASSES, {"test": (frame, labels, probabilities)})
    test = report["splits"]["test"]
    race = {g["group"]: g for g in test["groups"]["race"]}
    assert race["?"]["rows"] == raw["race"].isna().sum() > 0
    assert sum(g["rows"] for g in test["groups"]["race"]) == len(raw)
    for i, label in enumerate(CLASSES):
        expected = brier_score_loss(labels == label, probabilities[:, i])
        assert test["brier"][label] == pytest.approx(expected, abs=1e-6)
    assert not math.isnan(test["ece"]["<30"])
    # age-band shares are calibrated within each band by construction
    assert all(value < 1e-6 for value in test["ece"].values())
