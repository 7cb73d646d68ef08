"""Calibration and per-group quality of a model's predicted probabilities (issue #17, items 3
and 4): reporting only, it selects and changes nothing.

Pure computation over numpy arrays and pandas frames (reads and writes nothing):

* `calibration`: per class (one-vs-rest) the Brier score, the mean of those over the classes
  (`brier_mean`), the expected calibration error and the reliability bins. Bins are ECE_BINS
  equal-width intervals of the predicted probability: bin i holds [i/B, (i+1)/B), the last
  one also holds 1.0. ECE = sum over non-empty bins of (bin rows / rows) * |mean predicted
  probability in the bin - observed rate of the class in the bin|.
* `group_metrics`: per value of each GROUP_COLUMNS column (a missing value is its own group,
  MISSING_GROUP, as the raw file writes it): rows, prevalence of POSITIVE_CLASS, its recall
  and precision (the predicted label is the argmax of the probabilities, as served; None when
  undefined: no actual or no predicted positive), ROC-AUC (one-vs-rest, weighted, as
  scoring's roc_auc_ovr; None when a class is absent from the group's rows) and `brier_mean`.
* flag rule: a group with at least MIN_GROUP_ROWS rows whose POSITIVE_CLASS recall is more
  than MAX_RECALL_GAP below the whole split's is flagged.
* `quality_report` gathers both for the splits given; `summary` is its compact form for
  metadata.json; `to_json` and `to_png` render it with deterministic bytes (sorted keys,
  floats rounded to FLOAT_DIGITS; a PNG without timestamps).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from readmission.storage import json_bytes

ECE_BINS = 10
POSITIVE_CLASS = "<30"
GROUP_COLUMNS = ("age", "gender", "race")
MISSING_GROUP = "?"  # the contract reads "?" as missing; a group keeps the raw file's name
MIN_GROUP_ROWS = 500  # a smaller group is reported but never flagged
MAX_RECALL_GAP = 0.10  # flagged: group recall < overall recall - MAX_RECALL_GAP
FLOAT_DIGITS = 6


def _round(value: float | None) -> float | None:
    if value is None or math.isnan(value):
        return None
    return round(float(value), FLOAT_DIGITS)


def _onehot(y_true: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    labels = np.asarray(y_true).astype(str)
    return np.stack([labels == c for c in classes], axis=1).astype(np.float64)


def brier_per_class(
    probabilities: np.ndarray, classes: Sequence[str], y_true: np.ndarray
) -> dict[str, float]:
    """One-vs-rest Brier score of each class: mean over rows of (p_class - [y == class])^2."""
    errors = (np.asarray(probabilities, dtype=np.float64) - _onehot(y_true, classes)) ** 2
    return {str(c): float(errors[:, i].mean()) for i, c in enumerate(classes)}


def reliability_bins(
    predicted: np.ndarray, outcome: np.ndarray, bins: int = ECE_BINS
) -> list[dict[str, Any]]:
    """The ECE bins of one class: lower and upper edge, rows, mean predicted probability and
    observed rate (both None for an empty bin)."""
    predicted = np.asarray(predicted, dtype=np.float64)
    outcome = np.asarray(outcome, dtype=np.float64)
    index = np.clip(np.floor(predicted * bins).astype(int), 0, bins - 1)
    out = []
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        out.append(
            {
                "lower": b / bins,
                "upper": (b + 1) / bins,
                "rows": count,
                "mean_predicted": float(predicted[inside].mean()) if count else None,
                "observed_rate": float(outcome[inside].mean()) if count else None,
            }
        )
    return out


def expected_calibration_error(bins: Sequence[Mapping[str, Any]]) -> float:
    """ECE of one class from its `reliability_bins`: the rows-weighted mean of
    |mean predicted - observed rate| (NaN when there are no rows)."""
    total = sum(int(b["rows"]) for b in bins)
    if total == 0:
        return math.nan
    return float(
        sum(
            b["rows"] / total * abs(b["mean_predicted"] - b["observed_rate"])
            for b in bins
            if b["rows"]
        )
    )


def calibration(
    probabilities: np.ndarray, classes: Sequence[str], y_true: np.ndarray, bins: int = ECE_BINS
) -> dict[str, Any]:
    """Brier per class and their mean, ECE per class and the reliability bins per class."""
    brier = brier_per_class(probabilities, classes, y_true)
    onehot = _onehot(y_true, classes)
    reliability = {
        str(c): reliability_bins(probabilities[:, i], onehot[:, i], bins)
        for i, c in enumerate(classes)
    }
    return {
        "rows": len(y_true),
        "brier": brier,
        "brier_mean": float(np.mean(list(brier.values()))),
        "ece": {c: expected_calibration_error(b) for c, b in reliability.items()},
        "reliability": reliability,
    }


def group_values(frame: pd.DataFrame, column: str) -> np.ndarray:
    """The group of each row: the column's text, MISSING_GROUP for a missing or empty value."""
    values = frame[column].reset_index(drop=True)
    text = values.astype("string").fillna(MISSING_GROUP)
    return text.mask(text == "", MISSING_GROUP).to_numpy(dtype=object)


def _rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


def subset_metrics(
    probabilities: np.ndarray, classes: Sequence[str], y_true: np.ndarray
) -> dict[str, Any]:
    """rows, POSITIVE_CLASS prevalence, recall and precision, ROC-AUC and Brier of some rows."""
    labels = np.asarray(y_true).astype(str)
    predicted = np.asarray(classes, dtype=object)[np.argmax(probabilities, axis=1)]
    actual_positive = labels == POSITIVE_CLASS
    predicted_positive = predicted == POSITIVE_CLASS
    hits = int(np.sum(actual_positive & predicted_positive))
    # Class indices instead of the labels: the same score, without sorting strings.
    codes = pd.Index([str(c) for c in classes]).get_indexer(labels)
    auc: float | None = None  # undefined when a class (or a label) is absent from these rows
    if len(np.unique(codes)) == len(classes) and (codes >= 0).all():
        auc = float(
            roc_auc_score(
                codes,
                probabilities,
                multi_class="ovr",
                average="weighted",
                labels=np.arange(len(classes)),
            )
        )
    return {
        "rows": len(labels),
        "prevalence": _rate(int(actual_positive.sum()), len(labels)),
        "recall": _rate(hits, int(actual_positive.sum())),
        "precision": _rate(hits, int(predicted_positive.sum())),
        "roc_auc_ovr": auc,
        "brier_mean": float(np.mean(list(brier_per_class(probabilities, classes, labels).values())))
        if len(labels)
        else None,
    }


def is_flagged(group: Mapping[str, Any], overall_recall: float | None) -> bool:
    """The flag rule: at least MIN_GROUP_ROWS rows and POSITIVE_CLASS recall more than
    MAX_RECALL_GAP below the overall recall (never when either recall is undefined)."""
    recall = group.get("recall")
    if recall is None or overall_recall is None or group["rows"] < MIN_GROUP_ROWS:
        return False
    return overall_recall - recall > MAX_RECALL_GAP


def group_metrics(
    frame: pd.DataFrame,
    probabilities: np.ndarray,
    classes: Sequence[str],
    y_true: np.ndarray,
    columns: Sequence[str] = GROUP_COLUMNS,
) -> dict[str, Any]:
    """The metrics of all rows (`overall`), of each group of each column (sorted by group
    name) and the flagged groups (by column, then group)."""
    labels = np.asarray(y_true).astype(str)
    overall = subset_metrics(probabilities, classes, labels)
    groups: dict[str, list[dict[str, Any]]] = {}
    flagged = []
    for column in columns:
        values = group_values(frame, column)
        groups[column] = []
        for name in sorted(set(values)):
            rows = values == name
            subset = subset_metrics(probabilities[rows], classes, labels[rows])
            metrics = {"group": str(name), **subset}
            metrics["flagged"] = is_flagged(metrics, overall["recall"])
            groups[column].append(metrics)
            if metrics["flagged"]:
                flagged.append(
                    {
                        "column": column,
                        "group": str(name),
                        "rows": metrics["rows"],
                        "recall": metrics["recall"],
                        "overall_recall": overall["recall"],
                    }
                )
    return {"overall": overall, "groups": groups, "flagged": flagged}


def split_quality(
    frame: pd.DataFrame, probabilities: np.ndarray, classes: Sequence[str], y_true: np.ndarray
) -> dict[str, Any]:
    """Calibration and group metrics of one split."""
    return {
        **calibration(probabilities, classes, y_true),
        **group_metrics(frame, probabilities, classes, y_true),
    }


def _rounded(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float | np.floating):
        return _round(float(value))
    if isinstance(value, np.integer):
        return int(value)
    return value


def quality_report(
    classes: Sequence[str],
    splits: Mapping[str, tuple[pd.DataFrame, np.ndarray, np.ndarray]],
) -> dict[str, Any]:
    """The quality document: the rules used and, per split name, `split_quality` of its
    (frame, target, probabilities). Floats rounded to FLOAT_DIGITS, NaN as None."""
    return _rounded(
        {
            "classes": [str(c) for c in classes],
            "positive_class": POSITIVE_CLASS,
            "ece_bins": ECE_BINS,
            "group_columns": list(GROUP_COLUMNS),
            "flag_rule": {"min_rows": MIN_GROUP_ROWS, "max_recall_gap": MAX_RECALL_GAP},
            "splits": {
                name: split_quality(frame, probabilities, classes, target)
                for name, (frame, target, probabilities) in splits.items()
            },
        }
    )


def summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The compact form for metadata.json: per split Brier (per class and mean), ECE per
    class and the POSITIVE_CLASS recall of all its rows, and the test split's flagged groups."""
    splits = report["splits"]
    return {
        "ece_bins": report["ece_bins"],
        "positive_class": report.get("positive_class", POSITIVE_CLASS),
        **{
            name: {
                **{k: split[k] for k in ("brier", "brier_mean", "ece")},
                "positive_recall": split.get("overall", {}).get("recall"),
            }
            for name, split in splits.items()
        },
        "flagged_groups": list(splits.get("test", {}).get("flagged", [])),
    }


def to_json(report: Mapping[str, Any]) -> bytes:
    """Canonical JSON (sorted keys): equal reports give equal bytes."""
    return json_bytes(report)


def _figure(**kwargs: Any) -> Any:
    """A matplotlib Figure on the Agg backend (no display; matplotlib imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def to_png(report: Mapping[str, Any], title: str = "") -> bytes:
    """The reliability diagram: one panel per class, mean predicted probability against the
    observed rate per bin for each split (the test split's bin rows written beside its
    points), and the diagonal of perfect calibration."""
    classes = report["classes"]
    figure = _figure(figsize=(4.2 * len(classes), 4.4), dpi=100, layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(classes)))
    for ax, label in zip(axes, classes, strict=True):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        for name in sorted(report["splits"]):
            split = report["splits"][name]
            bins = [b for b in split["reliability"][label] if b["rows"]]
            xs = [b["mean_predicted"] for b in bins]
            ys = [b["observed_rate"] for b in bins]
            ece = split["ece"][label]
            ax.plot(xs, ys, marker="o", label=f"{name} (ECE {ece:.3f})")
            if name == "test":
                for b, x, y in zip(bins, xs, ys, strict=True):
                    ax.annotate(
                        str(b["rows"]),
                        (x, y),
                        textcoords="offset points",
                        xytext=(4, -10),
                        fontsize="x-small",
                    )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"class {label}")
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel("observed rate")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
    figure.suptitle(title or f"Reliability ({report['ece_bins']} equal-width bins)")
    buffer = io.BytesIO()
    # No timestamps in the PNG: the same report gives the same bytes (idempotent rewrites).
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
