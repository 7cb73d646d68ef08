"""Champion/challenger promotion gate: promote a new model only if it is reliably better.

After a training fan-in the best new model (the challenger) and the sitting production model
(the champion) are scored on the SAME rows, the test split of the new corpus version. The
challenger is promoted iff

* its score on the selection metric beats the champion's by at least ``GateRule.margin``
  (``challenger - champion >= margin``, to within 1e-12 so that float rounding of a difference
  that equals the margin does not decide), and
* a paired percentile bootstrap of that difference puts the one-sided lower bound above zero.

The bootstrap draws ``resamples`` sets of n row indices with replacement from
``np.random.default_rng(seed)`` (in chunks of ``CHUNK`` resamples, each chunk one
``rng.integers(0, n, size=(chunk, n))`` call) and scores BOTH models on the same indices of each
resample (paired), so their shared sampling noise cancels out of the difference. The interval
reported is ``(q(1 - confidence), q(confidence))`` of the bootstrap differences (numpy's default
linear quantiles): its lower end is the one-sided ``confidence`` lower bound that decides; its
upper end is the matching one-sided upper bound. A resample on which the metric is undefined is
skipped; if more than half are, a ValueError is raised.

Contract (pure: numpy and scikit-learn only, no I/O, deterministic for given inputs and seed):

* ``y_true_codes``: integer class codes 0..K-1, shape (n,).
* ``*_probabilities``: n x K matrices, columns in the same class order for both models (the
  caller aligns them); the predicted class is the argmax of a row.
* Metrics (``METRICS``) equal scikit-learn's: ``accuracy_score``; precision/recall/F1 with
  ``average="weighted"`` and F1 with ``average="macro"`` over the labels present in y_true or
  y_pred, ``zero_division=0``; ``roc_auc_score(multi_class="ovr", average="weighted",
  labels=range(K))``. ROC-AUC is taken as undefined (ValueError from ``metric_value``, a skipped
  resample in the bootstrap) when a class is absent from y_true, where scikit-learn only warns
  and scores that class 0 weight; with K = 2 it is the AUC of column 1, which equals the
  one-vs-rest weighted average (scikit-learn rejects a 2-column score for two classes).
* The confusion-matrix metrics (all but ``roc_auc_ovr``) are bootstrapped vectorised: one
  ``np.bincount`` per chunk builds every resample's confusion matrices for both models at once
  (about 0.15 s for 15,000 rows x 1,000 resamples on 2 cores). ``roc_auc_ovr`` has no confusion
  matrix and falls back to one scikit-learn call per resample and model, which is much slower
  (about 30 s for the same size).
* Many models against one (the selection, readmission.selection): ``resample_scores`` scores
  every model on the same resamples in one pass (each chunk's indices drawn once, each model
  scored once), and ``difference_interval`` gives the interval of any two models' row
  difference, so the reference model is scored once, not once per comparison.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from readmission.scoring import METRIC_NAMES

METRICS = METRIC_NAMES  # the gate scores with the same metrics as training and selection
ROC_AUC = "roc_auc_ovr"
# Resamples drawn and scored at a time: the index block is CHUNK x n int64 values, so memory
# grows with the test split's rows, never with GATE_RESAMPLES.
CHUNK = 100
# Bins of one chunk's joint bincount above which each model gets its own bincount instead.
JOINT_BINS_LIMIT = 1 << 22
# Slack of the margin test: a difference equal to the margin but for float rounding reaches it.
MARGIN_TOLERANCE = 1e-12


@dataclass(frozen=True)
class GateRule:
    """When a challenger replaces the champion (see the module docstring)."""

    metric: str = "f1_weighted"
    margin: float = 0.002
    resamples: int = 1000
    seed: int = 42
    confidence: float = 0.95

    def __post_init__(self) -> None:
        _check_metric(self.metric)
        if isinstance(self.margin, bool) or not isinstance(self.margin, int | float):
            raise ValueError(f"margin must be a number, got {self.margin!r}")
        if not math.isfinite(self.margin):
            raise ValueError(f"margin must be finite, got {self.margin!r}")
        _check_bootstrap_settings(self.resamples, self.seed, self.confidence)

    def describe(self) -> str:
        """The rule in words."""
        return (
            f"promote if {self.metric}(challenger) - {self.metric}(champion) >= {self.margin:g} "
            f"on the test split and the {_percent(self.confidence)} paired-bootstrap lower bound "
            f"({self.resamples} resamples, seed {self.seed}) of the difference is > 0"
        )

    def as_dict(self) -> dict[str, Any]:
        """The rule's fields and its description, JSON-ready."""
        return {**asdict(self), "description": self.describe()}


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict on one challenger, with the figures behind it."""

    metric: str
    rows: int
    challenger_score: float
    champion_score: float
    difference: float  # challenger - champion on all rows
    interval: tuple[float, float]  # (q(1 - confidence), q(confidence)) of bootstrap differences
    promote: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """The result's fields, JSON-ready (the interval as a two-item list)."""
        return {**asdict(self), "interval": list(self.interval)}


def metric_value(metric: str, y_true_codes: np.ndarray, probabilities: np.ndarray) -> float:
    """``metric`` of one model's probabilities against the true class codes (scikit-learn's
    definition, see the module docstring). ValueError when it is undefined on these rows."""
    _check_metric(metric)
    y, probabilities = _check_arrays(y_true_codes, probabilities)
    k = probabilities.shape[1]
    if metric == ROC_AUC:
        value = _roc_auc(y, probabilities, k)
        if value is None:
            missing = np.flatnonzero(np.bincount(y, minlength=k) == 0).tolist()
            raise ValueError(
                f"{ROC_AUC} is undefined on these rows: class code(s) {missing} absent from "
                "y_true_codes"
            )
        return value
    cells = y * k + np.argmax(probabilities, axis=1)
    confusion = np.bincount(cells, minlength=k * k).reshape(1, k, k)
    return float(_from_confusion(metric, confusion)[0])


def paired_bootstrap(
    metric: str,
    y_true_codes: np.ndarray,
    challenger_probabilities: np.ndarray,
    champion_probabilities: np.ndarray,
    resamples: int,
    seed: int,
    confidence: float,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric(challenger) - metric(champion)``.

    Both models are scored on the same resampled rows (paired). Returns
    ``(lower, upper)`` = the ``1 - confidence`` and ``confidence`` quantiles of the defined
    resamples' differences: ``lower`` is the one-sided ``confidence`` lower bound. ValueError on
    invalid input, or when the metric is undefined on more than half of the resamples.
    """
    _check_metric(metric)
    _check_bootstrap_settings(resamples, seed, confidence)
    y, challenger, champion = _check_pair(
        y_true_codes, challenger_probabilities, champion_probabilities
    )
    kk = challenger.shape[1] ** 2
    if metric != ROC_AUC and CHUNK * kk * kk <= JOINT_BINS_LIMIT:
        differences = _joint_confusion_differences(metric, y, challenger, champion, resamples, seed)
    else:
        scores = _resample_scores(metric, y, (challenger, champion), resamples, seed)
        differences = scores[0] - scores[1]
    return difference_interval(metric, differences, confidence)


def resample_scores(
    metric: str,
    y_true_codes: np.ndarray,
    probabilities: Sequence[np.ndarray],
    resamples: int,
    seed: int,
) -> np.ndarray:
    """``metric`` of each model on each bootstrap resample: a models x resamples array, NaN
    where the metric is undefined on a resample (the same resamples for every model).

    The resamples depend only on the rows' count, ``resamples`` and ``seed``, so the row
    difference of two models' scores is the paired bootstrap of ``paired_bootstrap`` (to
    float rounding), and a model's scores, computed once, pair with any other model's:
    `difference_interval` turns such a difference into the interval."""
    _check_metric(metric)
    _check_bootstrap_settings(resamples, seed, 0.5)
    if not probabilities:
        raise ValueError("no model to score")
    checked = [_check_arrays(y_true_codes, p, f"model {i}") for i, p in enumerate(probabilities)]
    y = checked[0][0]
    models = [p for _, p in checked]
    if len({p.shape for p in models}) != 1:
        raise ValueError(
            "the models' probabilities must have the same shape (same rows, same class "
            f"columns), got {sorted({p.shape for p in models})}"
        )
    return _resample_scores(metric, y, models, resamples, seed)


def difference_interval(
    metric: str, differences: np.ndarray, confidence: float
) -> tuple[float, float]:
    """``(q(1 - confidence), q(confidence))`` of the defined (not NaN) bootstrap differences of
    ``metric``. ValueError when it is undefined on more than half of the resamples."""
    _check_bootstrap_settings(1, 0, confidence)
    resamples = int(np.size(differences))
    defined = differences[~np.isnan(differences)]
    skipped = resamples - defined.size
    if skipped * 2 > resamples:
        raise ValueError(
            f"{metric} is undefined on {skipped} of {resamples} bootstrap resamples (more than "
            "half; typically a class too rare for the resample to contain it): no interval"
        )
    lower, upper = np.quantile(defined, [1.0 - confidence, confidence])
    return float(lower), float(upper)


def compare(
    rule: GateRule,
    y_true_codes: np.ndarray,
    challenger_probabilities: np.ndarray,
    champion_probabilities: np.ndarray,
) -> GateResult:
    """Apply ``rule`` to a challenger and the champion scored on the same rows."""
    _check_pair(y_true_codes, challenger_probabilities, champion_probabilities)
    challenger_score = metric_value(rule.metric, y_true_codes, challenger_probabilities)
    champion_score = metric_value(rule.metric, y_true_codes, champion_probabilities)
    interval = paired_bootstrap(
        rule.metric,
        y_true_codes,
        challenger_probabilities,
        champion_probabilities,
        rule.resamples,
        rule.seed,
        rule.confidence,
    )
    difference = challenger_score - champion_score
    rows = int(np.shape(y_true_codes)[0])
    reaches_margin = difference >= rule.margin - MARGIN_TOLERANCE
    significant = interval[0] > 0
    promote = reaches_margin and significant

    bound = f"the {_percent(rule.confidence)} lower bound {interval[0]:+.4f}"
    margin_text = f"{difference:+.4f} {'>=' if reaches_margin else '<'} margin {rule.margin:.4f}"
    if promote:
        verdict = f"{margin_text} and {bound} > 0: challenger promoted"
    elif reaches_margin:
        verdict = (
            f"{margin_text} but {bound} <= 0 (the gain is within bootstrap noise): champion kept"
        )
    elif significant:
        verdict = f"{margin_text} ({bound} > 0): champion kept"
    else:
        verdict = f"{margin_text} and {bound} <= 0: champion kept"
    reason = (
        f"challenger {rule.metric} {challenger_score:.4f} vs champion {champion_score:.4f} "
        f"on {rows:,} test rows: {verdict}"
    )
    return GateResult(
        metric=rule.metric,
        rows=rows,
        challenger_score=challenger_score,
        champion_score=champion_score,
        difference=difference,
        interval=interval,
        promote=promote,
        reason=reason,
    )


# --- scoring --------------------------------------------------------------------------------


def _from_confusion(metric: str, confusion: np.ndarray) -> np.ndarray:
    """``metric`` of each of m confusion matrices (m x K x K, rows true, columns predicted),
    as scikit-learn computes it from the same counts."""
    confusion = confusion.astype(np.float64, copy=False)
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    true_sum = confusion.sum(axis=2)
    if metric == "accuracy":
        return tp.sum(axis=1) / true_sum.sum(axis=1)
    pred_sum = confusion.sum(axis=1)
    if metric == "precision_weighted":
        per_class = _divide(tp, pred_sum)
    elif metric == "recall_weighted":
        per_class = _divide(tp, true_sum)
    else:  # f1_weighted, f1_macro: 2 tp / (2 tp + fp + fn)
        per_class = _divide(2.0 * tp, true_sum + pred_sum)
    if metric == "f1_macro":  # mean over the labels present in y_true or y_pred
        present = (true_sum + pred_sum) > 0
        return (per_class * present).sum(axis=1) / present.sum(axis=1)
    return (per_class * true_sum).sum(axis=1) / true_sum.sum(axis=1)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (zero_division=0)."""
    out = np.zeros_like(numerator)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _roc_auc(y: np.ndarray, probabilities: np.ndarray, k: int) -> float | None:
    """scikit-learn's one-vs-rest weighted ROC-AUC; None when a class is absent from y."""
    if np.bincount(y, minlength=k).min() == 0:
        return None
    if k == 2:  # both one-vs-rest AUCs equal the AUC of column 1
        return float(roc_auc_score(y, probabilities[:, 1]))
    return float(
        roc_auc_score(y, probabilities, multi_class="ovr", average="weighted", labels=range(k))
    )


# --- bootstrap ------------------------------------------------------------------------------


def _index_chunks(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """The bootstrap's row indices, CHUNK resamples (rows of the array) at a time."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, CHUNK):
        yield rng.integers(0, n, size=(min(CHUNK, resamples - start), n))


def _joint_confusion_differences(
    metric: str,
    y: np.ndarray,
    challenger: np.ndarray,
    champion: np.ndarray,
    resamples: int,
    seed: int,
) -> np.ndarray:
    """Differences of a confusion-matrix metric on every resample for a pair of models with
    few classes: one code per row for the pair of cells, so one gather and one bincount per
    chunk build both models' confusion matrices (`CHUNK` * K**4 <= JOINT_BINS_LIMIT)."""
    n, k = challenger.shape
    kk = k * k
    cells_challenger = y * k + np.argmax(challenger, axis=1)
    cells_champion = y * k + np.argmax(champion, axis=1)
    pair_cells = cells_challenger * kk + cells_champion
    differences = np.empty(resamples)
    done = 0
    for indices in _index_chunks(n, resamples, seed):
        m = indices.shape[0]
        offsets = np.arange(m)[:, None] * (kk * kk)
        counts = np.bincount((pair_cells[indices] + offsets).ravel(), minlength=m * kk * kk)
        table = counts.reshape(m, kk, kk)  # [resample, challenger cell, champion cell]
        confusion_challenger = table.sum(axis=2).reshape(m, k, k)
        confusion_champion = table.sum(axis=1).reshape(m, k, k)
        scores = _from_confusion(metric, np.concatenate([confusion_challenger, confusion_champion]))
        differences[done : done + m] = scores[:m] - scores[m:]
        done += m
    return differences


def _resample_scores(
    metric: str,
    y: np.ndarray,
    models: Sequence[np.ndarray],
    resamples: int,
    seed: int,
) -> np.ndarray:
    """`resample_scores` of checked inputs: each chunk's indices are drawn once and every model
    is scored on them; a confusion-matrix metric by one bincount per model and chunk, ROC-AUC
    by one scikit-learn call per resample and model (slow: it has no confusion-matrix
    shortcut)."""
    n, k = models[0].shape
    kk = k * k
    cells = [y * k + np.argmax(p, axis=1) for p in models] if metric != ROC_AUC else []
    scores = np.full((len(models), resamples), np.nan)
    done = 0
    for indices in _index_chunks(n, resamples, seed):
        m = indices.shape[0]
        if metric == ROC_AUC:
            for j, rows in enumerate(indices, start=done):
                y_resample = y[rows]
                if np.bincount(y_resample, minlength=k).min() == 0:
                    continue  # undefined for every model on this resample
                for i, model in enumerate(models):
                    scores[i, j] = _roc_auc(y_resample, model[rows], k)
        else:
            offsets = np.arange(m)[:, None] * kk
            for i, model_cells in enumerate(cells):
                counts = np.bincount((model_cells[indices] + offsets).ravel(), minlength=m * kk)
                scores[i, done : done + m] = _from_confusion(metric, counts.reshape(m, k, k))
        done += m
    return scores


# --- validation -----------------------------------------------------------------------------


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")


def _check_bootstrap_settings(resamples: int, seed: int, confidence: float) -> None:
    if isinstance(resamples, bool) or not isinstance(resamples, int | np.integer):
        raise ValueError(f"resamples must be an integer, got {resamples!r}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float):
        raise ValueError(f"confidence must be a number, got {confidence!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence!r}")


def _check_pair(
    y_true_codes: np.ndarray,
    challenger_probabilities: np.ndarray,
    champion_probabilities: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The codes and both models' probabilities, checked, with the same n x K shape."""
    y, challenger = _check_arrays(y_true_codes, challenger_probabilities, "challenger")
    _, champion = _check_arrays(y_true_codes, champion_probabilities, "champion")
    if challenger.shape != champion.shape:
        raise ValueError(
            f"challenger probabilities {challenger.shape} and champion probabilities "
            f"{champion.shape} must have the same shape (same rows, same class columns)"
        )
    return y, challenger, champion


def _check_arrays(
    y_true_codes: np.ndarray, probabilities: np.ndarray, name: str = "model"
) -> tuple[np.ndarray, np.ndarray]:
    """The codes as int64 (n,) and the probabilities as float64 (n, K), checked."""
    y = np.asarray(y_true_codes)
    p = np.asarray(probabilities)
    if y.ndim != 1:
        raise ValueError(f"y_true_codes must be one-dimensional, got shape {y.shape}")
    if y.size == 0:
        raise ValueError("y_true_codes is empty: nothing to score")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y_true_codes must be integer class codes, got dtype {y.dtype}")
    if p.ndim != 2:
        raise ValueError(f"{name} probabilities must be an n x K matrix, got shape {p.shape}")
    n, k = p.shape
    if n != y.size:
        raise ValueError(f"{name} probabilities have {n} rows but y_true_codes has {y.size}")
    if k < 2:
        raise ValueError(f"{name} probabilities need at least 2 class columns, got {k}")
    if not np.issubdtype(p.dtype, np.number) or np.issubdtype(p.dtype, np.complexfloating):
        raise ValueError(f"{name} probabilities must be real numbers, got dtype {p.dtype}")
    if not np.isfinite(p).all():
        raise ValueError(f"{name} probabilities contain NaN or infinite values")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= k:
        raise ValueError(
            f"y_true_codes must lie in 0..{k - 1} (the {name} probability columns), "
            f"got {low}..{high}"
        )
    return y.astype(np.int64, copy=False), p.astype(np.float64, copy=False)


def _percent(confidence: float) -> str:
    return f"{confidence * 100:g}%"
