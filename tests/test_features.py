"""The model pipelines (readmission.features) on generated data and on a real-data sample."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score
from sklearn.preprocessing import OneHotEncoder
from threadpoolctl import threadpool_limits

from readmission import contract
from readmission.contract import (
    CATEGORICAL_FEATURES,
    FEATURES,
    MISSING_MARKER,
    NUMERIC_FEATURES,
    TARGET,
    TARGET_CLASSES,
)
from readmission.features import (
    ALGORITHMS,
    GB_MAX_FEATURES,
    MODEL_STEP,
    ONE_HOT_STEP,
    UnknownAlgorithm,
    build_pipeline,
    classifier_params,
    learned_categories,
    n_model_features,
    target_values,
    to_model_frame,
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Fit on one OpenMP/BLAS thread as the train function does: on a busy 2-core machine
    HistGradientBoosting's OpenMP threads otherwise spin for minutes."""
    with threadpool_limits(limits=1):
        yield


def generated_frame(rows: int, seed: int = 0) -> pd.DataFrame:
    """A contract-shaped frame whose target is a function of number_inpatient and insulin."""
    rng = np.random.default_rng(seed)
    data: dict[str, object] = {
        "encounter_id": np.arange(rows),
        "patient_nbr": rng.integers(0, rows // 2, rows),
    }
    for column in NUMERIC_FEATURES:
        values = rng.integers(0, 20, rows).astype("float64")
        values[rng.random(rows) < 0.05] = np.nan
        data[column] = values
    for column in CATEGORICAL_FEATURES:
        values = rng.choice(["a", "b", "c", None], rows, p=[0.5, 0.3, 0.15, 0.05])
        data[column] = pd.array(values, dtype="string")
    inpatient = np.nan_to_num(np.asarray(data["number_inpatient"]), nan=0.0)
    target = np.where(inpatient >= 14, "<30", np.where(inpatient >= 7, ">30", "NO"))
    data[TARGET] = pd.array(target, dtype="string")
    return pd.DataFrame(data)[list(contract.COLUMNS)]


@functools.cache
def real_frame() -> pd.DataFrame:
    from readmission.dataset import ensure_dataset, read_dataset_bytes

    return contract.parse_csv(read_dataset_bytes(ensure_dataset()))


@functools.cache
def real_sample(train_rows: int, validation_rows: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Patient-grouped training and validation rows of the real file (readmission.split)."""
    from readmission.split import split_rows

    frame = real_frame()
    split = split_rows(frame["patient_nbr"].to_numpy(), frame["encounter_id"].to_numpy(), seed=42)
    train = frame.iloc[split.train[:train_rows]].reset_index(drop=True)
    validation = frame.iloc[split.validation[:validation_rows]].reset_index(drop=True)
    return train, validation


def test_model_frame_has_the_contract_features_and_types() -> None:
    frame = generated_frame(50)
    frame.loc[0, "race"] = pd.NA
    frame.loc[1, "race"] = ""
    frame.loc[2, "time_in_hospital"] = np.nan

    model = to_model_frame(frame)

    assert list(model.columns) == list(FEATURES)
    for column in NUMERIC_FEATURES:
        assert model[column].dtype == np.float32
    for column in CATEGORICAL_FEATURES:
        assert pd.api.types.is_string_dtype(model[column])
        assert all(isinstance(v, str) for v in model[column])
    assert model.loc[0, "race"] == MISSING_MARKER
    assert model.loc[1, "race"] == MISSING_MARKER
    assert np.isnan(model.loc[2, "time_in_hospital"])
    assert "?" not in set(model["gender"]) - {MISSING_MARKER}
    # one str object per distinct value, shared by its rows (what sklearn's encoders hash)
    for column in CATEGORICAL_FEATURES:
        assert model[column].dtype == object
        assert len({id(v) for v in model[column]}) == model[column].nunique()


def test_model_frame_is_idempotent_and_rejects_missing_columns() -> None:
    model = to_model_frame(generated_frame(30))
    pd.testing.assert_frame_equal(to_model_frame(model), model)
    with pytest.raises(KeyError, match="diag_1"):
        to_model_frame(model.drop(columns=["diag_1"]))


def test_unknown_algorithm_is_refused() -> None:
    with pytest.raises(UnknownAlgorithm, match="xgboost"):
        build_pipeline("xgboost")


def test_classifiers_keep_the_original_hyperparameters() -> None:
    expected = {
        "logistic_regression": {"max_iter": 1000},
        "decision_tree": {"max_depth": 10},
        "random_forest": {"n_estimators": 100, "max_depth": 10, "n_jobs": 1},
        "gradient_boosting": {"n_estimators": 100, "max_depth": 5},
        # regularised on the validation split (docs/training.md): not the original defaults
        "hist_gradient_boosting": {"max_features": 0.5, "l2_regularization": 30.0},
    }
    for algorithm in ALGORITHMS:
        params = classifier_params(build_pipeline(algorithm))
        assert params["random_state"] == 42, algorithm
        for name, value in expected[algorithm].items():
            assert params[name] == value, (algorithm, name)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_pipeline_learns_generated_signal_and_tolerates_unknown_categories(
    algorithm: str,
) -> None:
    train, test = generated_frame(1500, seed=1), generated_frame(300, seed=2)
    pipeline = build_pipeline(algorithm).fit(to_model_frame(train), target_values(train))

    test.loc[:20, "medical_specialty"] = "never-seen"
    test.loc[:20, "diag_1"] = "V99.9"
    probabilities = pipeline.predict_proba(to_model_frame(test))

    assert list(pipeline.classes_) == sorted(TARGET_CLASSES)
    assert probabilities.shape == (300, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    predicted = pipeline.classes_[probabilities.argmax(axis=1)]
    # The target is a step function of one numeric feature: every model must find it.
    assert f1_score(target_values(test), predicted, average="macro") > 0.8


def test_encoders_keep_the_features_few_for_trees() -> None:
    train = generated_frame(500)
    x, y = to_model_frame(train), target_values(train)
    assert n_model_features(build_pipeline("decision_tree").fit(x, y)) == len(FEATURES)
    assert n_model_features(build_pipeline("gradient_boosting").fit(x, y)) == GB_MAX_FEATURES
    one_hot = n_model_features(build_pipeline("logistic_regression").fit(x, y))
    assert one_hot > len(FEATURES)


@pytest.mark.parametrize("algorithm", ["decision_tree", "logistic_regression"])
def test_learned_categories_include_the_missing_marker(algorithm: str) -> None:
    train = generated_frame(500)
    pipeline = build_pipeline(algorithm).fit(to_model_frame(train), target_values(train))
    categories = learned_categories(pipeline)
    assert set(categories) == set(CATEGORICAL_FEATURES)
    assert categories["race"] == ["?", "a", "b", "c"]


def test_logistic_one_hot_of_codes_equals_a_one_hot_of_the_strings() -> None:
    """The logistic pipeline one-hot encodes ordinal codes (fast); that one-hot must be, column
    for column, scikit-learn's one-hot of the strings with the same settings: infrequent
    categories sharing a column, unseen values all zeros. (Its columns are then scaled.)"""
    train, validation = real_sample(6000, 3000)
    x_train, x_validation = to_model_frame(train), to_model_frame(validation)
    x_validation.loc[:30, "diag_1"] = "V99.9"  # unseen
    x_validation.loc[:10, "race"] = "never-seen"
    preprocess = build_pipeline("logistic_regression")[0].fit(x_train, target_values(train))
    codes_then_one_hot = preprocess.named_transformers_["categorical"]
    settings = codes_then_one_hot.named_steps[ONE_HOT_STEP].get_params()
    of_strings = OneHotEncoder(**settings).fit(x_train[list(CATEGORICAL_FEATURES)])
    assert any(c is not None for c in of_strings.infrequent_categories_)
    step_names = [name for name, _ in codes_then_one_hot.steps]
    one_hot_of_codes = codes_then_one_hot[: step_names.index(ONE_HOT_STEP) + 1]
    for frame in (x_train, x_validation):
        expected = of_strings.transform(frame[list(CATEGORICAL_FEATURES)])
        actual = one_hot_of_codes.transform(frame[list(CATEGORICAL_FEATURES)])
        assert actual.shape == expected.shape
        assert (actual != expected).nnz == 0


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_pipeline_on_a_real_data_sample(algorithm: str) -> None:
    train, validation = real_sample(6000, 3000)
    pipeline = build_pipeline(algorithm).fit(to_model_frame(train), target_values(train))
    model = pipeline.named_steps[MODEL_STEP]
    probabilities = pipeline.predict_proba(to_model_frame(validation))
    predicted = model.classes_[probabilities.argmax(axis=1)]
    y = target_values(validation)
    # Always predicting the majority class ("NO", ~54%) scores about 0.38 weighted F1.
    majority = np.full(len(y), "NO", dtype=object)
    baseline = f1_score(y, majority, average="weighted")
    assert f1_score(y, predicted, average="weighted") > baseline + 0.05
