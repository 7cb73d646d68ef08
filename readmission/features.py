"""Model definitions: one scikit-learn Pipeline owns preprocessing AND the classifier.

Training, the MLflow model and the exported ONNX graph are the same object, so the encoders
can never drift apart between training and serving. The pipeline's input is the frame that
`to_model_frame` builds: the 47 contract FEATURES, numeric ones as float32 with NaN for
missing, categorical ones as str with the contract's MISSING_MARKER ("?") for missing, exactly
what the predict function feeds the ONNX graph.

Encoders, per algorithm (all convertible by skl2onnx, all tolerant of unseen categories):

* logistic_regression: median imputation + standard scaling of the numeric features; sparse
  one-hot of the categoricals, where categories seen fewer than `MIN_FREQUENCY` times in the
  training data (most of the ~700 ICD-9 codes per diagnosis column) share one "infrequent"
  column; a category never seen in training encodes as all zeros (handle_unknown="ignore");
  each one-hot column scaled to unit variance (not centred: it stays sparse).
* trees (decision_tree, random_forest, gradient_boosting, hist_gradient_boosting): median
  imputation of numerics and ordinal codes for categoricals (unknown -> -1): 47 float32
  columns. gradient_boosting (3 classes x 100 trees) then keeps the GB_MAX_FEATURES columns
  a shallow decision tree ranks highest (SelectFromModel, learned at fit, in the ONNX graph).

A feature column with no value in the training rows (the contract accepts such a file) keeps
its place: numeric ones are imputed 0, categorical ones have the one category "?". The columns
the classifier sees never depend on which features a training set happens to lack.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import (
    GradientBoostingClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.feature_selection import SelectFromModel
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler
from sklearn.tree import DecisionTreeClassifier

from readmission.contract import (
    CATEGORICAL_FEATURES,
    FEATURES,
    MISSING_MARKER,
    NUMERIC_FEATURES,
    TARGET,
)

RANDOM_STATE = 42
# One-hot (logistic regression): categories rarer than this share the "infrequent" column.
MIN_FREQUENCY = 100
# Ordinal code of a category the encoder did not see in training (trees).
UNKNOWN_CODE = -1
# gradient_boosting fits 3 x 100 trees on the columns a depth-6 decision tree ranks highest:
# 20 of 47 keep its validation F1 and ROC-AUC (16 lose 0.009 F1) at ~3/4 of the fit time.
GB_MAX_FEATURES = 20
GB_SELECTOR_DEPTH = 6
# hist_gradient_boosting weighs `<30` rows by this in its fit, so its argmax (the served label,
# the ONNX graph's `label`) predicts `<30` more often; chosen on the validation split only
# (the weight of highest validation F1 weighted, docs/training.md). HistGradientBoosting
# applies class_weight after encoding the labels, so its key is the class's code: the index
# of `<30` in the sorted labels, 0 ("<30" < ">30" < "NO").
READMIT_EARLY_WEIGHT = 2.0
READMIT_EARLY_CODE = 0
# hist_gradient_boosting's regularisation: each split considers a random half of the 47
# columns and leaf values are shrunk by an L2 penalty of 30. Chosen on the validation split
# only, by a rule written down before any variant was measured (highest validation ROC-AUC
# among variants whose F1s are not below the unregularised model's by more than bootstrap
# noise, at most 3x its fit time: docs/training.md).
HGB_MAX_FEATURES = 0.5
HGB_L2_REGULARIZATION = 30.0

ALGORITHMS: tuple[str, ...] = (
    "logistic_regression",
    "decision_tree",
    "random_forest",
    "gradient_boosting",
    "hist_gradient_boosting",
)

PREPROCESS_STEP = "preprocess"
SELECT_STEP = "select"
MODEL_STEP = "model"
# the steps of logistic_regression's categorical encoding: ordinal codes, one-hot, scaling
CODES_STEP = "codes"
ONE_HOT_STEP = "one_hot"
SCALE_STEP = "scale"


class UnknownAlgorithm(ValueError):
    """The algorithm name is not one of ALGORITHMS."""


def make_classifier(algorithm: str) -> Any:
    """The classifier with the original project's hyperparameters, random_state fixed."""
    if algorithm == "logistic_regression":
        return LogisticRegression(max_iter=1000, random_state=RANDOM_STATE)
    if algorithm == "decision_tree":
        return DecisionTreeClassifier(max_depth=10, random_state=RANDOM_STATE)
    if algorithm == "random_forest":
        # n_jobs=1: the pipeline's parallelism is one fit per process.
        return RandomForestClassifier(
            n_estimators=100, max_depth=10, n_jobs=1, random_state=RANDOM_STATE
        )
    if algorithm == "gradient_boosting":
        return GradientBoostingClassifier(n_estimators=100, max_depth=5, random_state=RANDOM_STATE)
    if algorithm == "hist_gradient_boosting":
        return HistGradientBoostingClassifier(
            class_weight={READMIT_EARLY_CODE: READMIT_EARLY_WEIGHT},
            max_features=HGB_MAX_FEATURES,
            l2_regularization=HGB_L2_REGULARIZATION,
            random_state=RANDOM_STATE,
        )
    raise UnknownAlgorithm(
        f"unknown algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}"
    )


def _ordinal_encoder() -> OrdinalEncoder:
    return OrdinalEncoder(
        handle_unknown="use_encoded_value", unknown_value=UNKNOWN_CODE, dtype=np.float32
    )


def _median_imputer() -> SimpleImputer:
    """Median imputation that keeps a numeric column with no value in the training rows.

    By default SimpleImputer drops such a column, so the classifier would see 7 numeric
    columns instead of 8 and the ONNX graph (8 inputs, imputed in place) would not match.
    keep_empty_features=True keeps it and imputes 0 (its `statistics_` entry): the column is
    constant in training, so the model cannot use it, and the feature count never depends on
    which columns a training set happens to lack. Columns with any value are unchanged."""
    return SimpleImputer(strategy="median", keep_empty_features=True)


def _one_hot_preprocessor() -> ColumnTransformer:
    numeric = Pipeline([("impute", _median_imputer()), ("scale", StandardScaler())])
    # One-hot of the ordinal codes, not of the strings: the same output, column for column
    # (codes follow the sorted categories; an unseen value's code, -1, is unknown to the
    # one-hot step too), but min_frequency counts numbers with numpy instead of strings with
    # a Python Counter: fit and transform of 71k rows take ~0.9 s instead of ~2.4 s.
    # Then each one-hot column is divided by its standard deviation (sparse, not centred):
    # lbfgs converges in fewer iterations (71k rows: 116 instead of 326; the five sets'
    # fits 14.7 instead of 26.5 CPU s) at the same validation scores (docs/training.md).
    categorical = Pipeline(
        [
            (CODES_STEP, _ordinal_encoder()),
            (
                ONE_HOT_STEP,
                OneHotEncoder(
                    handle_unknown="ignore",
                    min_frequency=MIN_FREQUENCY,
                    sparse_output=True,
                    dtype=np.float32,
                ),
            ),
            (SCALE_STEP, StandardScaler(with_mean=False)),
        ]
    )
    return ColumnTransformer(
        [
            ("numeric", numeric, list(NUMERIC_FEATURES)),
            ("categorical", categorical, list(CATEGORICAL_FEATURES)),
        ],
        sparse_threshold=1.0,
        verbose_feature_names_out=False,
    )


def _ordinal_preprocessor() -> ColumnTransformer:
    numeric = _median_imputer()
    return ColumnTransformer(
        [
            ("numeric", numeric, list(NUMERIC_FEATURES)),
            ("categorical", _ordinal_encoder(), list(CATEGORICAL_FEATURES)),
        ],
        sparse_threshold=0.0,
        verbose_feature_names_out=False,
    )


def build_pipeline(algorithm: str) -> Pipeline:
    """An unfitted Pipeline (preprocess [-> select] -> model) for one of ALGORITHMS."""
    classifier = make_classifier(algorithm)
    if algorithm == "logistic_regression":
        return Pipeline([(PREPROCESS_STEP, _one_hot_preprocessor()), (MODEL_STEP, classifier)])
    steps: list[tuple[str, Any]] = [(PREPROCESS_STEP, _ordinal_preprocessor())]
    if algorithm == "gradient_boosting":
        ranker = DecisionTreeClassifier(max_depth=GB_SELECTOR_DEPTH, random_state=RANDOM_STATE)
        steps.append(
            (
                SELECT_STEP,
                SelectFromModel(ranker, max_features=GB_MAX_FEATURES, threshold=-np.inf),
            )
        )
    steps.append((MODEL_STEP, classifier))
    return Pipeline(steps)


def to_model_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The model input for a contract frame: the 47 FEATURES in contract order.

    Numeric features become float32 with NaN for missing; categorical ones become Python
    strings (`object` dtype) with MISSING_MARKER for missing (NA, None or an empty string);
    non-string values (e.g. the integer 1) become their text ("1"). Extra columns (ids, the
    target) are dropped; a missing feature column raises KeyError. Vectorised (Arrow strings):
    ~0.15 s for 71k rows.

    Each distinct value of a column is one str object that its rows share. scikit-learn's
    encoders work on object arrays: Arrow-backed `str` columns would be converted on every
    fit and transform, into a new str object per cell whose hash is computed again. Shared
    objects halve the ordinal encoding's time (~0.4 instead of ~0.8 s for 71k rows) and
    hold ~8 bytes per cell.
    """
    missing = [c for c in FEATURES if c not in df.columns]
    if missing:
        raise KeyError(f"the frame lacks feature columns: {', '.join(missing)}")
    columns: dict[str, Any] = {}
    for column in FEATURES:
        values = df[column].reset_index(drop=True)
        if column in NUMERIC_FEATURES:
            numbers = pd.to_numeric(values, errors="coerce")
            columns[column] = pd.Series(numbers.to_numpy(dtype=np.float32, na_value=np.nan))
        else:
            text = values.astype("string[pyarrow]").fillna(MISSING_MARKER)
            text = text.mask(text == "", MISSING_MARKER)
            codes, uniques = pd.factorize(text)  # no NA left: every code >= 0
            shared = np.asarray(uniques, dtype=object)[codes]
            columns[column] = pd.Series(shared, dtype=object)
    return pd.DataFrame(columns, index=pd.RangeIndex(len(df)))


def target_values(df: pd.DataFrame) -> np.ndarray:
    """The target column as a numpy array of str (the class labels)."""
    return df[TARGET].astype(str).to_numpy(dtype=object)


def classifier_params(pipeline: Pipeline) -> dict[str, Any]:
    """The classifier's hyperparameters (for MLflow params)."""
    return dict(pipeline.named_steps[MODEL_STEP].get_params(deep=False))


def n_model_features(pipeline: Pipeline) -> int:
    """Number of columns the fitted preprocessing (and selection) hands the classifier."""
    return len(pipeline[:-1].get_feature_names_out())


def learned_categories(pipeline: Pipeline) -> dict[str, list[str]]:
    """column -> the categories the fitted encoder learned for it (sorted as the encoder keeps
    them). Other values encode as unknown: -1 (trees) or all-zero one-hot (logistic)."""
    preprocess = pipeline.named_steps[PREPROCESS_STEP]
    result: dict[str, list[str]] = {}
    for _name, transformer, columns in preprocess.transformers_:
        # the step that sees the strings: the first (one-hot follows ordinal codes)
        encoder = transformer[0] if isinstance(transformer, Pipeline) else transformer
        categories = getattr(encoder, "categories_", None)
        if categories is None:
            continue
        for column, values in zip(columns, categories, strict=True):
            result[column] = [str(v) for v in values]
    return result
