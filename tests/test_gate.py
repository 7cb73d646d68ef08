"""The champion/challenger promotion gate (readmission.gate), on small generated data."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from readmission import gate
from readmission.gate import GateResult, GateRule, compare, metric_value, paired_bootstrap

CONFUSION_METRICS = [metric for metric in gate.METRICS if metric != "roc_auc_ovr"]


def sklearn_metric(metric: str, y: np.ndarray, probabilities: np.ndarray) -> float:
    """The reference: scikit-learn's own function for each metric name."""
    predicted = np.argmax(probabilities, axis=1)
    k = probabilities.shape[1]
    if metric == "accuracy":
        return float(accuracy_score(y, predicted))
    if metric == "precision_weighted":
        return float(precision_score(y, predicted, average="weighted", zero_division=0))
    if metric == "recall_weighted":
        return float(recall_score(y, predicted, average="weighted", zero_division=0))
    if metric == "f1_weighted":
        return float(f1_score(y, predicted, average="weighted", zero_division=0))
    if metric == "f1_macro":
        return float(f1_score(y, predicted, average="macro", zero_division=0))
    assert metric == "roc_auc_ovr"
    return float(
        roc_auc_score(y, probabilities, multi_class="ovr", average="weighted", labels=range(k))
    )


def true_codes(rng: np.random.Generator, n: int, weights: list[float]) -> np.ndarray:
    return rng.choice(len(weights), size=n, p=np.asarray(weights) / sum(weights))


def probabilities_for(rng: np.random.Generator, y: np.ndarray, k: int, skill: float) -> np.ndarray:
    """Rows that sum to 1; `skill` > 0 raises the true class's probability."""
    logits = rng.normal(size=(y.size, k))
    logits[np.arange(y.size), y] += skill
    exponentials = np.exp(logits)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def one_hot(predicted: np.ndarray, k: int) -> np.ndarray:
    """Probabilities whose argmax is `predicted` (0.8 on it, the rest shared)."""
    probabilities = np.full((predicted.size, k), 0.2 / (k - 1))
    probabilities[np.arange(predicted.size), predicted] = 0.8
    return probabilities


def reference_interval(
    metric: str,
    y: np.ndarray,
    challenger: np.ndarray,
    champion: np.ndarray,
    resamples: int,
    seed: int,
    confidence: float,
    scorer: Callable[[str, np.ndarray, np.ndarray], float] = metric_value,
) -> tuple[float, float]:
    """The paired bootstrap resample by resample, drawing the same indices (one rng.integers
    call yields the same stream as the module's chunks of 100), each resample scored by
    `scorer`: metric_value (itself checked against scikit-learn above) or scikit-learn."""
    n, k = challenger.shape
    indices = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    differences = []
    for rows in indices:
        if metric == "roc_auc_ovr" and np.unique(y[rows]).size < k:
            continue  # undefined: a class is absent from the resample
        differences.append(
            scorer(metric, y[rows], challenger[rows]) - scorer(metric, y[rows], champion[rows])
        )
    lower, upper = np.quantile(differences, [1 - confidence, confidence])
    return float(lower), float(upper)


# --- metric definitions ---------------------------------------------------------------------


@pytest.mark.parametrize("metric", gate.METRICS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metric_value_equals_scikit_learn_for_every_metric(metric: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = 3 + seed  # 3, 4 and 5 classes
    y = true_codes(rng, 400, [8, 5, 2, 1, 1][:k])
    probabilities = probabilities_for(rng, y, k, skill=0.7)
    assert metric_value(metric, y, probabilities) == pytest.approx(
        sklearn_metric(metric, y, probabilities), abs=1e-12
    )


@pytest.mark.parametrize("metric", CONFUSION_METRICS)
def test_confusion_metrics_match_scikit_learn_when_classes_are_absent_or_never_predicted(
    metric: str,
) -> None:
    # Class 3 never occurs in y_true but is predicted; class 2 occurs but is never predicted:
    # both zero-division paths and the "labels present in y_true or y_pred" rule of macro F1.
    rng = np.random.default_rng(7)
    y = true_codes(rng, 300, [5, 3, 2])
    predicted = rng.choice([0, 1, 3], size=300)
    probabilities = one_hot(predicted, 5)  # class 4: neither true nor predicted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = sklearn_metric(metric, y, probabilities)
    assert metric_value(metric, y, probabilities) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_of_two_classes_is_the_auc_of_the_second_column() -> None:
    rng = np.random.default_rng(3)
    y = true_codes(rng, 200, [3, 1])
    probabilities = probabilities_for(rng, y, 2, skill=1.0)
    expected = roc_auc_score(y, probabilities[:, 1])
    assert metric_value("roc_auc_ovr", y, probabilities) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_is_undefined_when_a_class_is_absent_from_the_true_codes() -> None:
    rng = np.random.default_rng(4)
    y = true_codes(rng, 100, [1, 1])  # codes 0 and 1 only
    probabilities = probabilities_for(rng, y, 3, skill=1.0)
    with pytest.raises(ValueError, match=r"roc_auc_ovr is undefined.*\[2\]"):
        metric_value("roc_auc_ovr", y, probabilities)


# --- the bootstrap --------------------------------------------------------------------------


@pytest.mark.parametrize("metric", gate.METRICS)
def test_the_bootstrap_equals_a_resample_by_resample_reference(metric: str) -> None:
    rng = np.random.default_rng(11)
    # One row of class 2: ROC-AUC is undefined on about a third of the resamples (skipped).
    y = np.concatenate([true_codes(rng, 119, [3, 2]), [2]])
    challenger = probabilities_for(rng, y, 3, skill=1.0)
    champion = probabilities_for(rng, y, 3, skill=0.5)
    # 250 resamples: two full chunks of 100 and a partial one (fewer for the slow ROC-AUC).
    resamples = 20 if metric == "roc_auc_ovr" else 250
    expected = reference_interval(metric, y, challenger, champion, resamples, 5, 0.9)
    got = paired_bootstrap(metric, y, challenger, champion, resamples, 5, 0.9)
    assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("metric", gate.METRICS)
def test_the_bootstrap_equals_scikit_learn_scoring_each_resample(metric: str) -> None:
    rng = np.random.default_rng(15)
    y = true_codes(rng, 150, [4, 3, 2])
    challenger = probabilities_for(rng, y, 3, skill=1.0)
    champion = probabilities_for(rng, y, 3, skill=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's zero-division warnings
        expected = reference_interval(
            metric, y, challenger, champion, 15, 6, 0.8, scorer=sklearn_metric
        )
    got = paired_bootstrap(metric, y, challenger, champion, 15, 6, 0.8)
    assert got == pytest.approx(expected, abs=1e-12)


def test_many_classes_take_the_per_model_bincount_path_with_the_same_result() -> None:
    k = 16  # k**4 bins per resample exceed the joint table's limit
    assert gate.CHUNK * k**4 > gate.JOINT_BINS_LIMIT
    rng = np.random.default_rng(12)
    y = rng.integers(0, k, size=200)
    challenger = probabilities_for(rng, y, k, skill=2.0)
    champion = probabilities_for(rng, y, k, skill=1.5)
    expected = reference_interval("f1_macro", y, challenger, champion, 120, 9, 0.95)
    got = paired_bootstrap("f1_macro", y, challenger, champion, 120, 9, 0.95)
    assert got == pytest.approx(expected, abs=1e-12)


def test_the_number_of_resamples_is_honoured() -> None:
    rng = np.random.default_rng(13)
    y = true_codes(rng, 300, [5, 3, 2])
    challenger = probabilities_for(rng, y, 3, skill=1.0)
    champion = probabilities_for(rng, y, 3, skill=0.8)
    # One resample: a single difference, so both ends of the interval are it.
    lower, upper = paired_bootstrap("accuracy", y, challenger, champion, 1, 42, 0.95)
    assert lower == upper
    # Each count yields the quantiles of exactly that many paired differences, every time.
    for resamples in (1, 99, 100, 101, 300):
        expected = reference_interval("accuracy", y, challenger, champion, resamples, 42, 0.95)
        for _ in range(2):
            got = paired_bootstrap("accuracy", y, challenger, champion, resamples, 42, 0.95)
            assert got == pytest.approx(expected, abs=1e-12)
    first = paired_bootstrap("accuracy", y, challenger, champion, 100, 42, 0.95)
    assert first != paired_bootstrap("accuracy", y, challenger, champion, 300, 42, 0.95)


def test_a_metric_undefined_on_more_than_half_of_the_resamples_raises() -> None:
    rng = np.random.default_rng(14)
    y = true_codes(rng, 100, [1, 1])  # class 2 never occurs: ROC-AUC undefined everywhere
    challenger = probabilities_for(rng, y, 3, skill=1.0)
    champion = probabilities_for(rng, y, 3, skill=0.5)
    with pytest.raises(ValueError, match="undefined on 20 of 20 bootstrap resamples"):
        paired_bootstrap("roc_auc_ovr", y, challenger, champion, 20, 42, 0.95)


# --- the decision ---------------------------------------------------------------------------


def test_identical_models_are_not_promoted() -> None:
    rng = np.random.default_rng(20)
    y = true_codes(rng, 500, [5, 3, 2])
    probabilities = probabilities_for(rng, y, 3, skill=1.0)
    result = compare(GateRule(resamples=200), y, probabilities, probabilities.copy())
    assert result.difference == 0.0
    assert result.interval == (0.0, 0.0)
    assert result.interval[0] <= 0
    assert not result.promote
    assert "champion kept" in result.reason


def test_a_clearly_better_challenger_is_promoted() -> None:
    rng = np.random.default_rng(21)
    y = true_codes(rng, 1000, [5, 3, 2])
    champion = probabilities_for(rng, y, 3, skill=0.0)  # random
    challenger = probabilities_for(rng, y, 3, skill=3.0)  # mostly right
    result = compare(GateRule(), y, challenger, champion)
    assert result.promote
    assert result.difference > 0.3
    assert result.interval[0] > 0
    assert result.rows == 1000
    assert result.reason == (
        f"challenger f1_weighted {result.challenger_score:.4f} vs champion "
        f"{result.champion_score:.4f} on 1,000 test rows: {result.difference:+.4f} >= margin "
        f"0.0020 and the 95% lower bound {result.interval[0]:+.4f} > 0: challenger promoted"
    )


def test_a_slightly_better_challenger_below_the_margin_is_kept() -> None:
    rng = np.random.default_rng(22)
    y = true_codes(rng, 2000, [5, 3, 2])
    champion_predicted = np.where(rng.random(2000) < 0.6, y, (y + 1) % 3)
    wrong = np.flatnonzero(champion_predicted != y)
    challenger_predicted = champion_predicted.copy()
    challenger_predicted[wrong[:6]] = y[wrong[:6]]  # right on 6 more rows: +0.003 accuracy
    rule = GateRule(metric="accuracy", margin=0.005)
    result = compare(rule, y, one_hot(challenger_predicted, 3), one_hot(champion_predicted, 3))
    assert result.difference == pytest.approx(0.003, abs=1e-12)
    assert result.interval[0] > 0  # reliably better, just not by enough
    assert not result.promote
    assert "+0.0030 < margin 0.0050" in result.reason
    assert result.reason.endswith("champion kept")


def test_a_difference_equal_to_the_margin_reaches_it_despite_float_rounding() -> None:
    rng = np.random.default_rng(23)
    y = true_codes(rng, 1500, [5, 3, 2])
    champion_predicted = np.where(rng.random(1500) < 0.6, y, (y + 1) % 3)
    wrong = np.flatnonzero(champion_predicted != y)
    challenger_predicted = champion_predicted.copy()
    challenger_predicted[wrong[:3]] = y[wrong[:3]]  # 3 / 1500 = 0.002, the default margin
    rule = GateRule(metric="accuracy")
    result = compare(rule, y, one_hot(challenger_predicted, 3), one_hot(champion_predicted, 3))
    assert result.difference == pytest.approx(0.002, abs=1e-12)
    assert ">= margin 0.0020" in result.reason


def test_a_better_challenger_whose_lower_bound_is_not_above_zero_is_kept() -> None:
    rng = np.random.default_rng(24)
    y = true_codes(rng, 1000, [5, 3, 2])
    champion_predicted = np.where(rng.random(1000) < 0.6, y, (y + 1) % 3)
    right = np.flatnonzero(champion_predicted == y)
    wrong = np.flatnonzero(champion_predicted != y)
    challenger_predicted = champion_predicted.copy()
    challenger_predicted[wrong[:40]] = y[wrong[:40]]  # 40 rows fixed ...
    challenger_predicted[right[:30]] = (y[right[:30]] + 1) % 3  # ... 30 broken: net +0.010
    rule = GateRule(metric="accuracy")
    result = compare(rule, y, one_hot(challenger_predicted, 3), one_hot(champion_predicted, 3))
    assert result.difference == pytest.approx(0.010, abs=1e-12)
    assert result.difference >= rule.margin
    assert result.interval[0] <= 0
    assert not result.promote
    assert "+0.0100 >= margin 0.0020 but the 95% lower bound" in result.reason
    assert "<= 0 (the gain is within bootstrap noise): champion kept" in result.reason


def test_the_same_seed_gives_identical_results_and_another_seed_another_interval() -> None:
    rng = np.random.default_rng(25)
    y = true_codes(rng, 600, [5, 3, 2])
    challenger = probabilities_for(rng, y, 3, skill=1.0)
    champion = probabilities_for(rng, y, 3, skill=0.8)
    first = compare(GateRule(seed=7), y, challenger, champion)
    again = compare(GateRule(seed=7), y, challenger.copy(), champion.copy())
    other = compare(GateRule(seed=8), y, challenger, champion)
    assert first == again
    assert other.difference == first.difference
    assert other.interval != first.interval


# --- contract: descriptions, dictionaries, validation ---------------------------------------


def test_the_rule_describes_itself_in_words() -> None:
    assert GateRule().describe() == (
        "promote if f1_weighted(challenger) - f1_weighted(champion) >= 0.002 on the test split "
        "and the 95% paired-bootstrap lower bound (1000 resamples, seed 42) of the difference "
        "is > 0"
    )
    assert GateRule().as_dict() == {
        "metric": "f1_weighted",
        "margin": 0.002,
        "resamples": 1000,
        "seed": 42,
        "confidence": 0.95,
        "description": GateRule().describe(),
    }


def test_the_result_as_a_dictionary_is_json_ready() -> None:
    rng = np.random.default_rng(26)
    y = true_codes(rng, 300, [5, 3, 2])
    challenger = probabilities_for(rng, y, 3, skill=2.0)
    champion = probabilities_for(rng, y, 3, skill=0.0)
    result = compare(GateRule(resamples=100), y, challenger, champion)
    document = json.loads(json.dumps(result.as_dict()))
    assert document["interval"] == list(result.interval)
    assert document["promote"] is True
    assert set(document) == set(GateResult.__dataclass_fields__)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"metric": "auc"}, "unknown metric 'auc'"),
        ({"resamples": 0}, "resamples must be >= 1"),
        ({"resamples": 10.0}, "resamples must be an integer"),
        ({"confidence": 0.0}, "strictly between 0 and 1"),
        ({"confidence": 1.0}, "strictly between 0 and 1"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"margin": float("nan")}, "margin must be finite"),
    ],
)
def test_an_invalid_rule_raises_value_error(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GateRule(**changes)


def _valid_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(27)
    y = true_codes(rng, 50, [5, 3, 2])
    return y, probabilities_for(rng, y, 3, 1.0), probabilities_for(rng, y, 3, 0.5)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("champion_columns", "champion probabilities .* must have the same shape"),
        ("champion_rows", "champion probabilities have 49 rows"),
        ("codes_out_of_range", r"must lie in 0\.\.2"),
        ("negative_codes", r"must lie in 0\.\.2"),
        ("float_codes", "must be integer class codes"),
        ("two_dimensional_codes", "must be one-dimensional"),
        ("empty", "is empty"),
        ("one_dimensional_probabilities", r"must be an n x K matrix"),
        ("one_column", "at least 2 class columns"),
        ("nan", "NaN or infinite"),
    ],
)
def test_invalid_inputs_raise_value_error(case: str, message: str) -> None:
    y, challenger, champion = _valid_inputs()
    if case == "champion_columns":
        champion = np.hstack([champion, np.zeros((50, 1))])
    elif case == "champion_rows":
        champion = champion[:49]
    elif case == "codes_out_of_range":
        y = y.copy()
        y[0] = 3
    elif case == "negative_codes":
        y = y.copy()
        y[0] = -1
    elif case == "float_codes":
        y = y.astype(float)
    elif case == "two_dimensional_codes":
        y = y.reshape(-1, 1)
    elif case == "empty":
        y, challenger, champion = y[:0], challenger[:0], champion[:0]
    elif case == "one_dimensional_probabilities":
        challenger = challenger[:, 0]
    elif case == "one_column":
        challenger = challenger[:, :1]
    elif case == "nan":
        challenger = challenger.copy()
        challenger[3, 1] = np.nan
    with pytest.raises(ValueError, match=message):
        compare(GateRule(resamples=10), y, challenger, champion)
    with pytest.raises(ValueError, match=message):
        paired_bootstrap("f1_weighted", y, challenger, champion, 10, 42, 0.95)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"metric": "f2"}, "unknown metric 'f2'"),
        ({"resamples": 0}, "resamples must be >= 1"),
        ({"confidence": 1.5}, "strictly between 0 and 1"),
        ({"confidence": -0.1}, "strictly between 0 and 1"),
    ],
)
def test_invalid_bootstrap_settings_raise_value_error(arguments: dict, message: str) -> None:
    y, challenger, champion = _valid_inputs()
    settings = {"metric": "accuracy", "resamples": 10, "seed": 42, "confidence": 0.95}
    settings.update(arguments)
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(
            settings["metric"],
            y,
            challenger,
            champion,
            settings["resamples"],
            settings["seed"],
            settings["confidence"],
        )


def test_metric_value_rejects_an_unknown_metric() -> None:
    y, challenger, _ = _valid_inputs()
    with pytest.raises(ValueError, match="unknown metric 'f2'; known: accuracy, "):
        metric_value("f2", y, challenger)
