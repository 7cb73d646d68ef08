"""hist_gradient_boosting with other input features, on the VALIDATION split only: the probes
behind docs/training.md "After the one look".

The served definition (C: the pipeline's median-imputed numerics and ordinal codes for every
categorical) is compared with the same classifier on other inputs:

* T: the five categoricals of most categories (diag_1/2/3 with ~700 codes each,
  medical_specialty, payer_code) encoded by scikit-learn's TargetEncoder (multiclass,
  cross-fitted in fit on 5 shuffled stratified folds, seed 42) instead of ordinal codes;
* T+ord: both encodings of those five side by side;
* D: three derived numerics added (computable from one row): total visits (outpatient +
  emergency + inpatient), how many of the 23 medication columns are not "No", how many are
  "Up" or "Down".

Whole training split of the real file, one thread, the gate's paired bootstrap (1,000
resamples, seed 42, 5 %-95 % quantiles of variant - C). The test split is never read.

    .venv/bin/python scripts/bench/feature_variants.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OrdinalEncoder, TargetEncoder
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_data import paired_interval, real_split

from readmission import contract
from readmission.config import Settings
from readmission.features import (
    RANDOM_STATE,
    build_pipeline,
    make_classifier,
    target_values,
    to_model_frame,
)
from readmission.scoring import score

ALGORITHM = "hist_gradient_boosting"
MANY_CATEGORIES = ("diag_1", "diag_2", "diag_3", "medical_specialty", "payer_code")
METRICS = ("f1_weighted", "f1_macro", "roc_auc_ovr")


def ordinal() -> OrdinalEncoder:
    return OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1)


DERIVED = ("total_visits", "medications_used", "medications_changed")


def with_derived(frame: pd.DataFrame) -> pd.DataFrame:
    """The model frame plus the DERIVED numerics (float32, as the other numerics)."""
    visits = frame[["number_outpatient", "number_emergency", "number_inpatient"]].fillna(0)
    medications = frame[list(contract.MEDICATION_FEATURES)]
    return frame.assign(
        total_visits=visits.sum(axis=1).astype("float32"),
        medications_used=(medications != "No").sum(axis=1).astype("float32"),
        medications_changed=medications.isin(["Up", "Down"]).sum(axis=1).astype("float32"),
    )


def derived_inputs() -> Pipeline:
    parts = [
        ("numeric", SimpleImputer(strategy="median"), [*contract.NUMERIC_FEATURES, *DERIVED]),
        ("categorical", ordinal(), list(contract.CATEGORICAL_FEATURES)),
    ]
    return make_pipeline(ColumnTransformer(parts), make_classifier(ALGORITHM))


def target_encoded(keep_ordinal: bool) -> Pipeline:
    others = [c for c in contract.CATEGORICAL_FEATURES if c not in MANY_CATEGORIES]
    parts = [
        ("numeric", SimpleImputer(strategy="median"), list(contract.NUMERIC_FEATURES)),
        ("categorical", ordinal(), others),
        (
            "target",
            TargetEncoder(
                target_type="multiclass",
                cv=StratifiedKFold(5, shuffle=True, random_state=RANDOM_STATE),
            ),
            list(MANY_CATEGORIES),
        ),
    ]
    if keep_ordinal:
        parts.append(("ordinal", ordinal(), list(MANY_CATEGORIES)))
    return make_pipeline(ColumnTransformer(parts), make_classifier(ALGORITHM))


def main() -> None:
    whole, split = real_split(Settings.from_env().split_seed)
    train = whole.iloc[split.train].reset_index(drop=True)
    validation = whole.iloc[split.validation].reset_index(drop=True)
    x_train, x_val = to_model_frame(train), to_model_frame(validation)
    y_train, y_val = target_values(train), target_values(validation)
    classes = np.asarray(sorted(set(y_train)))
    codes = pd.Index(classes).get_indexer(y_val)
    probabilities = {}
    for name, model, prepare in (
        ("C (served)", build_pipeline(ALGORITHM), None),
        ("T", target_encoded(keep_ordinal=False), None),
        ("T+ord", target_encoded(keep_ordinal=True), None),
        ("D", derived_inputs(), with_derived),
    ):
        fit_frame, val_frame = (prepare(x_train), prepare(x_val)) if prepare else (x_train, x_val)
        with threadpool_limits(1):
            started = time.process_time()
            model.fit(fit_frame, y_train)
            cpu = time.process_time() - started
            probabilities[name] = model.predict_proba(val_frame)
        figures = score(probabilities[name], classes, y_val)
        line = f"{name:<11} fit CPU {cpu:4.1f}s " + " ".join(
            f"{metric} {figures[metric]:.4f}" for metric in METRICS
        )
        if name != "C (served)":
            for metric in METRICS:
                lower, upper = paired_interval(
                    metric, codes, probabilities[name], probabilities["C (served)"]
                )
                line += f" | d {metric} {lower:+.4f}, {upper:+.4f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
