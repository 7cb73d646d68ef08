"""The noise-aware selection (readmission.selection): pure, on synthetic validation rows."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from readmission.gate import paired_bootstrap
from readmission.learning_curve import build_learning_curve, to_markdown, verdict
from readmission.scoring import score
from readmission.selection import scores_key, select

CLASSES = np.array(["<30", ">30", "NO"])
ROWS = 3000


def _rows() -> tuple[np.ndarray, np.ndarray]:
    """True codes and an informative model's probabilities (about 60% argmax accuracy)."""
    rng = np.random.default_rng(0)
    y = rng.choice(3, size=ROWS, p=[0.15, 0.35, 0.5])
    logits = rng.normal(size=(ROWS, 3))
    logits[np.arange(ROWS), y] += 1.0
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def _result(index: int, algorithm: str, y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    return {
        "cumulative_index": index,
        "algorithm": algorithm,
        "training_rows": 1000 * (index + 1),
        "fit_cpu_seconds": 1.0,
        "metrics": {"validation": score(p, CLASSES, CLASSES[y])},
    }


def _candidates() -> tuple[np.ndarray, list[dict[str, Any]], dict[str, np.ndarray]]:
    y, p = _rows()
    rng = np.random.default_rng(1)
    # the leader: p's argmax with 20 wrong rows made right and 18 right rows made wrong (F1 a
    # little higher, within noise), as flat probabilities (a poor ranking: lower ROC-AUC)
    predicted = p.argmax(axis=1)
    wrong, right = np.flatnonzero(predicted != y), np.flatnonzero(predicted == y)
    fixed = rng.choice(wrong, size=20, replace=False)
    predicted[fixed] = y[fixed]
    broken = rng.choice(right, size=18, replace=False)
    predicted[broken] = (y[broken] + 1) % 3
    flat = np.full((ROWS, 3), 0.2)
    flat[np.arange(ROWS), predicted] = 0.6
    # clearly worse: a third of the rows with random probabilities
    worse = p.copy()
    noisy = rng.choice(ROWS, size=ROWS // 3, replace=False)
    worse[noisy] = rng.dirichlet([1, 1, 1], size=noisy.size)
    probabilities = {"00-leader": flat, "01-close": p, "02-worse": worse}
    results = [
        _result(0, "leader", y, flat),
        _result(1, "close", y, p),
        _result(2, "worse", y, worse),
    ]
    return y, results, probabilities


def test_a_candidate_within_noise_of_the_best_is_tied_and_roc_auc_breaks_the_tie() -> None:
    y, results, probabilities = _candidates()
    f1 = {r["algorithm"]: r["metrics"]["validation"]["f1_weighted"] for r in results}
    auc = {r["algorithm"]: r["metrics"]["validation"]["roc_auc_ovr"] for r in results}
    assert f1["leader"] > f1["close"] and auc["close"] > auc["leader"]  # the premise
    for ordering in (results, results[::-1], results[1:] + results[:1]):
        chosen = select(ordering, probabilities, y, "f1_weighted", 1000, 42)
        assert chosen.leader["algorithm"] == "leader"
        assert chosen.tied == ("00-leader", "01-close")
        assert chosen.best["algorithm"] == "close"
    worse = chosen.comparison("02-worse")
    assert worse is not None and worse.interval[1] < 0 and not worse.tied
    close = chosen.comparison("01-close")
    assert close is not None and close.interval[0] < close.difference < close.interval[1]


def test_each_interval_is_the_gates_paired_bootstrap_against_the_leader() -> None:
    y, results, probabilities = _candidates()
    chosen = select(results, probabilities, y, "f1_weighted", 300, 7, confidence=0.9)
    for job in ("01-close", "02-worse"):
        comparison = chosen.comparison(job)
        expected = paired_bootstrap(
            "f1_weighted", y, probabilities[job], probabilities["00-leader"], 300, 7, 0.9
        )
        assert comparison is not None and comparison.interval == pytest.approx(expected, abs=1e-12)


def test_a_memo_of_earlier_scores_scores_only_new_candidates_and_selects_the_same() -> None:
    y, results, probabilities = _candidates()
    memo: dict[str, np.ndarray] = {}
    first = select(results[:2], probabilities, y, "f1_weighted", 200, 3, memo=memo)
    assert len(memo) == 2  # the leader and the close candidate, scored once each
    key = scores_key("f1_weighted", y, probabilities["01-close"], 200, 3)
    kept = memo[key]
    again = select(results, probabilities, y, "f1_weighted", 200, 3, memo=memo)
    assert len(memo) == 3 and memo[key] is kept  # only the new candidate was scored
    assert again == select(results, probabilities, y, "f1_weighted", 200, 3)
    assert again.comparison("01-close") == first.comparison("01-close")
    # another seed is another key: the memo never answers for other resamples
    assert scores_key("f1_weighted", y, probabilities["01-close"], 200, 4) not in memo


def test_a_clearly_worse_candidate_is_never_selected_whatever_its_roc_auc() -> None:
    y, results, probabilities = _candidates()
    results[2]["metrics"]["validation"]["roc_auc_ovr"] = 0.99  # claims the best ranking
    chosen = select(results, probabilities, y, "f1_weighted", 1000, 42)
    assert chosen.best["algorithm"] == "close"


def test_among_equal_roc_auc_more_training_rows_then_the_cheaper_fit_win() -> None:
    y, p = _rows()
    results = [_result(i, name, y, p) for i, name in ((0, "small"), (2, "large"), (3, "slow"))]
    results[2]["training_rows"] = results[1]["training_rows"]
    results[2]["fit_cpu_seconds"] = 5.0
    probabilities = {"00-small": p, "02-large": p, "03-slow": p}
    chosen = select(results, probabilities, y, "f1_weighted", 1000, 42)
    assert chosen.best["algorithm"] == "large"


def test_missing_probabilities_are_refused() -> None:
    y, results, probabilities = _candidates()
    del probabilities["01-close"]
    with pytest.raises(ValueError, match="01-close"):
        select(results, probabilities, y, "f1_weighted", 1000, 42)


def test_the_learning_curve_shows_each_interval_and_a_verdict_within_noise() -> None:
    y, results, probabilities = _candidates()
    chosen = select(results, probabilities, y, "f1_weighted", 1000, 42)
    curve = build_learning_curve("d", results, chosen)
    markdown = to_markdown(curve)
    close = chosen.comparison("01-close")
    assert close is not None
    assert f"= {close.difference:+.4f} [{close.interval[0]:+.4f}, {close.interval[1]:+.4f}]" in (
        markdown
    )
    # sizes 1,000 and 2,000 hold tied candidates, 3,000 does not
    text = verdict(curve).text
    assert "within noise of the best from 1,000 rows" in text
    assert "no candidate at 3,000 rows is" in text
    assert "Selected among the tied" in text and "close on 2,000 rows" in text
