"""The learning curve: table, renderings, plot and the computed verdict (pure, no servers)."""

from __future__ import annotations

import csv
import io
import math

import pytest

from readmission.learning_curve import (
    build_learning_curve,
    render_text,
    to_csv,
    to_markdown,
    to_png,
    verdict,
)

SIZES = [1000, 2000, 3000, 4000]
# validation F1 per algorithm and size: gb plateaus from 3000 (within 0.005 of 0.600),
# lr keeps rising but stays below gb.
F1 = {
    "gradient_boosting": [0.550, 0.580, 0.597, 0.600],
    "logistic_regression": [0.540, 0.560, 0.570, 0.580],
}
AUC = {
    "gradient_boosting": [0.60, 0.62, 0.64, 0.65],
    "logistic_regression": [0.59, 0.61, 0.62, 0.63],
}


def result(index: int, algorithm: str, f1: float, auc: float) -> dict:
    return {
        "dataset_id": "d" * 16,
        "cumulative_index": index,
        "algorithm": algorithm,
        "training_rows": SIZES[index],
        "run_id": f"run-{index}-{algorithm}",
        "metrics": {
            "train": {"f1_weighted": 0.9, "roc_auc_ovr": 0.9},
            "validation": {"f1_weighted": f1, "roc_auc_ovr": auc},
        },
    }


def results(f1: dict[str, list[float]] = F1) -> list[dict]:
    return [
        result(i, algorithm, f1[algorithm][i], AUC[algorithm][i])
        for algorithm in reversed(sorted(f1))  # order of input must not matter
        for i in range(len(SIZES))
    ]


def test_csv_has_one_row_per_size_and_two_columns_per_algorithm() -> None:
    curve = build_learning_curve("d" * 16, results())
    rows = list(csv.DictReader(io.StringIO(to_csv(curve).decode())))
    assert [int(r["training_rows"]) for r in rows] == SIZES
    assert [int(r["cumulative_index"]) for r in rows] == [0, 1, 2, 3]
    assert float(rows[3]["gradient_boosting_f1_weighted"]) == pytest.approx(0.600)
    assert float(rows[0]["logistic_regression_roc_auc_ovr"]) == pytest.approx(0.59)
    assert list(rows[0]) == [
        "cumulative_index",
        "training_rows",
        "gradient_boosting_f1_weighted",
        "gradient_boosting_roc_auc_ovr",
        "logistic_regression_f1_weighted",
        "logistic_regression_roc_auc_ovr",
    ]


def test_verdict_is_the_smallest_size_within_tolerance_of_the_best() -> None:
    curve = build_learning_curve("d" * 16, results())
    found = verdict(curve, tolerance=0.005)
    assert found.algorithm == "gradient_boosting"
    assert found.best_f1 == pytest.approx(0.600)
    assert (found.enough_rows, found.dips) == (3000, ())
    assert "3,000" in found.text and "gradient_boosting" in found.text
    assert "adds little" in found.text
    # A tighter tolerance moves the answer to the largest size ("still rising").
    tight = verdict(curve, tolerance=0.001)
    assert tight.enough_rows == 4000
    assert "still rising" in tight.text


def test_verdict_flags_a_curve_that_leaves_the_band_again() -> None:
    # An early lucky point (1000 rows), a dip at 2000, then back up: the answer is 1000, and
    # the dip is reported rather than hidden.
    bumpy = {
        "gradient_boosting": [0.598, 0.570, 0.597, 0.600],
        "logistic_regression": F1["logistic_regression"],
    }
    found = verdict(build_learning_curve("d" * 16, results(bumpy)), tolerance=0.005)
    assert (found.enough_rows, found.dips) == (1000, (2000,))
    assert "2,000" in found.text and "not monotonic" in found.text
    # Best at the smallest size, then lower (seen on small samples of the real data).
    falling = {"gradient_boosting": [0.60, 0.58, 0.58, 0.58], "logistic_regression": [0.5] * 4}
    found = verdict(build_learning_curve("d" * 16, results(falling)))
    assert (found.algorithm, found.enough_rows, found.dips) == (
        "gradient_boosting",
        1000,
        (2000, 3000, 4000),
    )
    assert "still rising" not in found.text


def test_markdown_and_text_show_every_cell_and_the_verdict() -> None:
    curve = build_learning_curve("d" * 16, results())
    markdown = to_markdown(curve)
    text = render_text(curve)
    for rendering in (markdown, text):
        assert "0.6000" in rendering and "0.5400" in rendering and "0.6500" in rendering
        assert verdict(curve).text in rendering
        assert "4,000" in rendering
    assert "| **0.6000** | 0.5800 |" in markdown  # best of the size in bold


def test_missing_results_leave_empty_cells() -> None:
    partial = [
        r
        for r in results()
        if not (r["algorithm"] == "logistic_regression" and r["cumulative_index"] == 3)
    ]
    curve = build_learning_curve("d" * 16, partial)
    assert math.isnan(curve.value(4000, "logistic_regression", "f1_weighted"))
    last = to_csv(curve).decode().splitlines()[-1]
    assert last.endswith(",,")


def test_png_is_a_deterministic_image() -> None:
    curve = build_learning_curve("d" * 16, results())
    first, second = to_png(curve), to_png(curve)
    assert first.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(first) > 10_000
    assert first == second


def test_rows_are_on_a_log_axis_only_when_the_sizes_grow_geometrically() -> None:
    from dataclasses import replace

    from readmission.learning_curve import geometric

    linear = build_learning_curve("d" * 16, results())
    assert not geometric(linear)
    doubling = replace(linear, sizes=((0, 1000), (1, 2000), (2, 4000), (3, 8000), (4, 9000)))
    assert geometric(doubling)
    assert not geometric(replace(linear, sizes=((0, 1000), (1, 2000), (2, 3000), (3, 3500))))
    assert to_png(doubling) != to_png(linear)
