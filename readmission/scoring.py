"""Scores of predicted probabilities: the METRIC_NAMES of one split.

Pure computation (reads and writes nothing): `score(probabilities, classes, y_true)` gives the
same figures as scikit-learn's accuracy_score, precision/recall/f1 (weighted and macro) and
roc_auc_score (one-vs-rest, weighted), computed in fewer passes; roc_auc_ovr is None when a
class is absent from the split. Predictions run on FIT_THREADS BLAS/OpenMP threads, so a
prediction never competes with the fits of other processes on the same cores. Used by the
train step (validation and training splits) and the aggregator (the one look at the test split,
and the gate's scoring of the sitting champion).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score
from sklearn.pipeline import Pipeline
from threadpoolctl import threadpool_limits

log = logging.getLogger(__name__)

METRIC_NAMES = (
    "accuracy",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
    "f1_macro",
    "roc_auc_ovr",
)
# BLAS/OpenMP threads of one fit or prediction: parallelism comes from one fit per process.
FIT_THREADS = 1


def compute_metrics(
    pipeline: Pipeline, frame: pd.DataFrame, y_true: np.ndarray
) -> dict[str, float | None]:
    """The METRIC_NAMES on one split; roc_auc_ovr is None when a class is absent from it."""
    return score(predict_probabilities(pipeline, frame), np.asarray(pipeline.classes_), y_true)


def predict_probabilities(pipeline: Pipeline, frame: pd.DataFrame) -> np.ndarray:
    """pipeline.predict_proba on FIT_THREADS threads (columns in pipeline.classes_ order)."""
    with threadpool_limits(limits=FIT_THREADS):
        return pipeline.predict_proba(frame)


def score(
    probabilities: np.ndarray, classes: np.ndarray, y_true: np.ndarray
) -> dict[str, float | None]:
    """The METRIC_NAMES of predicted probabilities (columns in `classes` order)."""
    predicted: np.ndarray = np.argmax(probabilities, axis=1)
    codes = pd.Index(classes).get_indexer(y_true)  # -1: a label not in classes
    if (codes >= 0).all():
        # Class indices instead of the labels: the same scores (labels map one to one onto
        # indices), without sklearn sorting ~70k Python strings per metric (~1.5 s a job).
        y_true, classes = codes, np.arange(len(classes))
    else:  # a label the model does not know: score the labels as they are
        predicted = classes[predicted]
    # One pass for the per-class figures (over the labels present in either array, as
    # precision_score & co. do), averaged here exactly as sklearn averages them: a quarter of
    # the cost of four separate calls.
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, predicted, average=None, zero_division=0
    )
    metrics: dict[str, float | None] = {
        "accuracy": float(accuracy_score(y_true, predicted)),
        "precision_weighted": float(np.average(precision, weights=support)),
        "recall_weighted": float(np.average(recall, weights=support)),
        "f1_weighted": float(np.average(f1, weights=support)),
        "f1_macro": float(np.average(f1)),
    }
    try:
        metrics["roc_auc_ovr"] = float(
            roc_auc_score(
                y_true, probabilities, multi_class="ovr", average="weighted", labels=classes
            )
        )
    except ValueError as error:
        log.warning("ROC-AUC undefined on this split: %s", error)
        metrics["roc_auc_ovr"] = None
    return metrics
