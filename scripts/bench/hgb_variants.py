"""hist_gradient_boosting variants on the VALIDATION split only: the table behind
docs/training.md "The regularisation of hist_gradient_boosting".

Every variant is fitted on the whole training split of the real file (readmission.split,
SPLIT_SEED) on one thread, after the pipeline's own ordinal preprocessing (fitted once), and
scored on the validation rows as readmission.scoring does. Each is compared with B, the
unregularised definition (`<30` weight 2, defaults otherwise), by the gate's paired bootstrap
(1,000 resamples, seed 42, the 5 % and 95 % quantiles of variant - B), and the original recipe
(scripts/bench/compare_original.py) is scored on the same validation rows. The selection rule
(docs/training.md) marks the eligible variants and names the chosen one. The test split is
never read.

    .venv/bin/python scripts/bench/hgb_variants.py [--variants B,mf0.5_l2_30,...] [--skip-original]
        [--reference B] [--sets]

`--reference` names the variant the others are compared with (default B); `--sets` also fits
the reference and each variant on every cumulative set of the learning curve (the first 1, 2, …
training batches of `BATCH_ROWS`) and prints their validation ROC-AUC and its paired interval.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import pandas as pd
from sklearn.ensemble import (
    GradientBoostingClassifier,
    HistGradientBoostingClassifier,
    VotingClassifier,
)
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_original import OriginalRecipe
from real_data import paired_interval, real_split

from readmission.config import Settings
from readmission.features import (
    PREPROCESS_STEP,
    RANDOM_STATE,
    READMIT_EARLY_CODE,
    build_pipeline,
    target_values,
    to_model_frame,
)
from readmission.scoring import score

METRICS = ("f1_weighted", "f1_macro", "roc_auc_ovr")
# the rule's cost bound (fit CPU of a variant <= this x B's) and its ROC-AUC tie for cost
MAX_COST_RATIO = 3.0
AUC_TIE = 0.0005


def hgb(weight: float = 2.0, seed: int = RANDOM_STATE, **params: Any) -> Any:
    return HistGradientBoostingClassifier(
        class_weight={READMIT_EARLY_CODE: weight}, random_state=seed, **params
    )


def vote(*estimators: Any) -> VotingClassifier:
    # flatten_transform=False: skl2onnx 1.20 converts no other soft VotingClassifier
    return VotingClassifier(
        [(f"m{i}", e) for i, e in enumerate(estimators)], voting="soft", flatten_transform=False
    )


def gradient_boosting() -> GradientBoostingClassifier:
    return GradientBoostingClassifier(n_estimators=100, max_depth=5, random_state=RANDOM_STATE)


def seeds(count: int) -> range:
    return range(RANDOM_STATE, RANDOM_STATE + count)


VARIANTS: dict[str, Callable[[], Any]] = {
    "B": lambda: hgb(),
    "w1.5": lambda: hgb(1.5),
    "l2_1": lambda: hgb(l2_regularization=1.0),
    "l2_10": lambda: hgb(l2_regularization=10.0),
    "msl50": lambda: hgb(min_samples_leaf=50),
    "msl100": lambda: hgb(min_samples_leaf=100),
    "msl200": lambda: hgb(min_samples_leaf=200),
    "mf0.5": lambda: hgb(max_features=0.5),
    "mf0.7": lambda: hgb(max_features=0.7),
    "mln15": lambda: hgb(max_leaf_nodes=15),
    "mln15_it300": lambda: hgb(max_leaf_nodes=15, max_iter=300),
    "vf0.2_nic20": lambda: hgb(validation_fraction=0.2, n_iter_no_change=20),
    "es_auc": lambda: hgb(scoring="roc_auc_ovr_weighted"),
    "es_auc_nic20": lambda: hgb(scoring="roc_auc_ovr_weighted", n_iter_no_change=20),
    "msl100_l2_1_mf0.7": lambda: hgb(min_samples_leaf=100, l2_regularization=1.0, max_features=0.7),
    "mf0.5_l2_1": lambda: hgb(max_features=0.5, l2_regularization=1.0),
    "mf0.5_l2_10": lambda: hgb(max_features=0.5, l2_regularization=10.0),
    "mf0.3_l2_10": lambda: hgb(max_features=0.3, l2_regularization=10.0),
    "mf0.5_l2_30": lambda: hgb(max_features=0.5, l2_regularization=30.0),
    "mf0.5_l2_100": lambda: hgb(max_features=0.5, l2_regularization=100.0),
    # the chosen definition without early stopping: every training row in the fit
    "mf0.5_l2_30_noes": lambda: hgb(max_features=0.5, l2_regularization=30.0, early_stopping=False),
    "lr0.05_mf0.5_l2_10": lambda: hgb(
        learning_rate=0.05, max_iter=400, max_features=0.5, l2_regularization=10.0
    ),
    "lr0.05_mf0.5_l2_30": lambda: hgb(
        learning_rate=0.05, max_iter=400, max_features=0.5, l2_regularization=30.0
    ),
    "vote2_mf0.7": lambda: vote(*(hgb(max_features=0.7, seed=s) for s in seeds(2))),
    "vote3_mf0.7": lambda: vote(*(hgb(max_features=0.7, seed=s) for s in seeds(3))),
    "vote3_mf0.5": lambda: vote(*(hgb(max_features=0.5, seed=s) for s in seeds(3))),
    "vote3_mf0.5_l2_10": lambda: vote(
        *(hgb(max_features=0.5, l2_regularization=10.0, seed=s) for s in seeds(3))
    ),
    "vote5_mf0.5": lambda: vote(*(hgb(max_features=0.5, seed=s) for s in seeds(5))),
    "vote_w2_w1": lambda: vote(hgb(2.0), hgb(1.0)),
    "vote_hgb_gb": lambda: vote(hgb(), gradient_boosting()),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--skip-original", action="store_true")
    parser.add_argument("--reference", default="B", choices=list(VARIANTS))
    parser.add_argument("--sets", action="store_true")
    args = parser.parse_args()
    reference = args.reference
    names = list(dict.fromkeys([reference, *args.variants.split(",")]))

    whole, split = real_split(Settings.from_env().split_seed)
    train = whole.iloc[split.train].reset_index(drop=True)
    validation = whole.iloc[split.validation].reset_index(drop=True)
    y_train, y_val = target_values(train), target_values(validation)
    classes = np.asarray(sorted(set(y_train)))
    codes = pd.Index(classes).get_indexer(y_val)
    preprocess = build_pipeline("hist_gradient_boosting").named_steps[PREPROCESS_STEP]
    with threadpool_limits(1):
        x_train = preprocess.fit_transform(to_model_frame(train))
        x_val = preprocess.transform(to_model_frame(validation))

    rows: dict[str, dict[str, Any]] = {}
    probabilities: dict[str, np.ndarray] = {}
    for name in names:
        model = VARIANTS[name]()
        with threadpool_limits(1):
            started = time.process_time()
            model.fit(x_train, y_train)
            cpu = time.process_time() - started
            probabilities[name] = model.predict_proba(x_val)
        assert list(model.classes_) == list(classes)
        rows[name] = {"fit_cpu_s": round(cpu, 1), **score(probabilities[name], classes, y_val)}
        print(f"fitted {name} ({cpu:.1f}s CPU)", flush=True)
    recipe: dict[str, Any] | None = None
    if not args.skip_original:
        model = OriginalRecipe(whole)
        started = time.process_time()
        model.fit(train, y_train)
        cpu = time.process_time() - started
        recipe = {
            "fit_cpu_s": round(cpu, 1),
            **score(model.predict_proba(validation), classes, y_val),
        }
        print(f"fitted the original recipe ({cpu:.1f}s CPU)", flush=True)

    for name in names:
        row = rows[name]
        for metric in METRICS:
            lower, upper = paired_interval(
                metric, codes, probabilities[name], probabilities[reference]
            )
            row[f"d_{metric}"] = f"{lower:+.4f}, {upper:+.4f}"
            row[f"up_{metric}"] = upper
        row["eligible"] = (
            row["up_f1_weighted"] >= 0
            and row["up_f1_macro"] >= 0
            and row["fit_cpu_s"] <= MAX_COST_RATIO * rows[reference]["fit_cpu_s"]
            and (recipe is None or all(row[m] >= recipe[m] for m in ("f1_weighted", "f1_macro")))
        )
    table = pd.DataFrame(rows).T
    if recipe is not None:
        table.loc["original recipe"] = pd.Series(recipe)
    for metric in METRICS:
        table[metric] = table[metric].astype(float).round(4)
    columns = ["fit_cpu_s", *METRICS, *(f"d_{m}" for m in METRICS), "eligible"]
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print(table[columns].to_string())
    eligible = [name for name in names if rows[name]["eligible"]]
    best = max(rows[name]["roc_auc_ovr"] for name in eligible)
    near = [name for name in eligible if rows[name]["roc_auc_ovr"] >= best - AUC_TIE]
    chosen = min(near, key=lambda name: rows[name]["fit_cpu_s"])
    print(f"chosen by the rule: {chosen} (validation ROC-AUC {rows[chosen]['roc_auc_ovr']:.4f})")
    if args.sets:
        compare_on_sets(names, train, y_train, validation, y_val, split_rows=len(train))


def compare_on_sets(
    names: list[str],
    train: pd.DataFrame,
    y_train: np.ndarray,
    validation: pd.DataFrame,
    y_val: np.ndarray,
    split_rows: int,
) -> None:
    """Validation ROC-AUC of each variant fitted on each cumulative set, with the paired
    interval of variant - reference (names[0])."""
    batch_rows = Settings.from_env().batch_rows
    classes = np.asarray(sorted(set(y_train)))
    codes = pd.Index(classes).get_indexer(y_val)
    for rows in [*range(batch_rows, split_rows, batch_rows), split_rows]:
        preprocess = build_pipeline("hist_gradient_boosting").named_steps[PREPROCESS_STEP]
        with threadpool_limits(1):
            x_set = preprocess.fit_transform(to_model_frame(train.iloc[:rows]))
            x_val = preprocess.transform(to_model_frame(validation))
        probabilities: dict[str, np.ndarray] = {}
        for name in names:
            model = VARIANTS[name]()
            with threadpool_limits(1):
                started = time.process_time()
                model.fit(x_set, y_train[:rows])
                cpu = time.process_time() - started
                probabilities[name] = model.predict_proba(x_val)
            auc = score(probabilities[name], classes, y_val)["roc_auc_ovr"]
            line = f"set of {rows:>6} rows  {name:<20} fit CPU {cpu:5.1f}s  val ROC-AUC {auc:.4f}"
            iterations = getattr(model, "n_iter_", None)
            if iterations is not None:
                line += f"  iterations {iterations}"
            if name != names[0]:
                lower, upper = paired_interval(
                    "roc_auc_ovr", codes, probabilities[name], probabilities[names[0]]
                )
                line += f"  delta {lower:+.4f}, {upper:+.4f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
