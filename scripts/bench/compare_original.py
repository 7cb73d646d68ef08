"""An honest quality report: the ORIGINAL project's recipe next to this pipeline's models.

Original recipe: a LabelEncoder per categorical column, StandardScaler over every column, then
GradientBoostingClassifier(n_estimators=100, max_depth=5). A LabelEncoder cannot encode a value
it did not see, so (as the original did to get going) the encoders are fitted on the WHOLE file
before the split: a mild leak in its favour. Everything else is fitted on the training split only.

Both are trained on the same patient-grouped, stratified 70/15/15 split (readmission.split, seed
SPLIT_SEED) using the whole training split (all cumulative batches), and scored on the
validation and test splits with weighted F1, macro F1 and weighted one-vs-rest ROC-AUC.

    .venv/bin/python scripts/bench/compare_original.py [--algorithms gradient_boosting,...]
        [--csv PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import pandas as pd
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.preprocessing import LabelEncoder, StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from real_data import real_split

from readmission import contract
from readmission.config import Settings
from readmission.features import (
    ALGORITHMS,
    build_pipeline,
    target_values,
    to_model_frame,
)


class OriginalRecipe:
    """LabelEncoder per categorical (fitted on the whole file), StandardScaler, GB(100, 5)."""

    def __init__(self, whole_file: pd.DataFrame) -> None:
        self.encoders = {
            column: LabelEncoder().fit(whole_file[column].fillna(contract.MISSING_MARKER))
            for column in contract.CATEGORICAL_FEATURES
        }
        self.scaler = StandardScaler()
        self.model = GradientBoostingClassifier(n_estimators=100, max_depth=5, random_state=42)

    def _matrix(self, frame: pd.DataFrame) -> np.ndarray:
        columns = []
        for column in contract.FEATURES:
            if column in self.encoders:
                values = frame[column].fillna(contract.MISSING_MARKER)
                columns.append(self.encoders[column].transform(values).astype(float))
            else:
                columns.append(frame[column].to_numpy(dtype=float))
        matrix = np.column_stack(columns)
        return np.where(np.isnan(matrix), 0.0, matrix)

    def fit(self, frame: pd.DataFrame, y: np.ndarray) -> OriginalRecipe:
        self.model.fit(self.scaler.fit_transform(self._matrix(frame)), y)
        return self

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        return self.model.predict_proba(self.scaler.transform(self._matrix(frame)))

    @property
    def classes_(self) -> np.ndarray:
        return self.model.classes_


def scores(model: object, frame: pd.DataFrame, y: np.ndarray) -> dict[str, float]:
    probabilities = model.predict_proba(frame)  # type: ignore[attr-defined]
    classes = np.asarray(model.classes_)  # type: ignore[attr-defined]
    predicted = classes[probabilities.argmax(axis=1)]
    return {
        "f1_weighted": f1_score(y, predicted, average="weighted"),
        "f1_macro": f1_score(y, predicted, average="macro"),
        "roc_auc_ovr": roc_auc_score(
            y, probabilities, multi_class="ovr", average="weighted", labels=classes
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--csv", type=Path, help="also write the table as CSV here")
    args = parser.parse_args()

    whole, split = real_split(Settings.from_env().split_seed)
    parts = {
        name: whole.iloc[rows].reset_index(drop=True)
        for name, rows in (
            ("train", split.train),
            ("validation", split.validation),
            ("test", split.test),
        )
    }
    print(
        f"split: {len(parts['train']):,} train / {len(parts['validation']):,} validation / "
        f"{len(parts['test']):,} test rows (patient-grouped, seed {Settings.from_env().split_seed})"
    )

    candidates: list[tuple[str, object, pd.DataFrame, dict[str, pd.DataFrame]]] = []
    candidates.append(
        ("original: LabelEncoder+StandardScaler+GB", OriginalRecipe(whole), parts["train"], parts)
    )
    model_parts = {name: to_model_frame(frame) for name, frame in parts.items()}
    for algorithm in args.algorithms.split(","):
        candidates.append(
            (f"pipeline: {algorithm}", build_pipeline(algorithm), model_parts["train"], model_parts)
        )

    rows = []
    for label, model, train_frame, frames in candidates:
        started = time.process_time()
        model.fit(train_frame, target_values(parts["train"]))  # type: ignore[attr-defined]
        fit_cpu = time.process_time() - started
        row: dict[str, object] = {"model": label, "fit_cpu_s": round(fit_cpu, 1)}
        for split_name in ("validation", "test"):
            for metric, value in scores(
                model, frames[split_name], target_values(parts[split_name])
            ).items():
                row[f"{split_name}_{metric}"] = round(value, 4)
        rows.append(row)
        print(f"done: {label} ({fit_cpu:.1f}s CPU)", flush=True)

    table = pd.DataFrame(rows).set_index("model")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string())
    if args.csv:
        table.to_csv(args.csv)


if __name__ == "__main__":
    main()
