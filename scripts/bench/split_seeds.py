"""Is hist_gradient_boosting better than the original recipe, or only on one split? The same
comparison as compare_original.py, repeated on several patient-grouped splits.

For each split seed (readmission.split; the project's own SPLIT_SEED is one row, marked), the
original recipe (compare_original.OriginalRecipe) and the pipeline's hist_gradient_boosting are
fitted on that split's whole training split and scored on its validation and test rows; the
paired bootstrap of the gate (1,000 resamples, seed 42, 5 %-95 % quantiles) gives the test
interval of hist_gradient_boosting - recipe per metric. Nothing is chosen from these figures:
they describe how much the comparison on one test split of ~15,000 rows moves with the split.

    .venv/bin/python scripts/bench/split_seeds.py [--seeds 42,1,2,3,4,5] [--algorithm NAME]
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
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_original import OriginalRecipe
from real_data import paired_interval

from readmission import contract
from readmission.config import Settings
from readmission.dataset import ensure_dataset, read_dataset_bytes
from readmission.features import build_pipeline, target_values, to_model_frame
from readmission.scoring import score
from readmission.split import split_rows

METRICS = ("f1_weighted", "f1_macro", "roc_auc_ovr")


def one_split(whole: pd.DataFrame, seed: int, algorithm: str) -> dict[str, object]:
    split = split_rows(
        whole[contract.GROUP_COLUMN].to_numpy(), whole["encounter_id"].to_numpy(), seed
    )
    train, validation, test = (
        whole.iloc[rows].reset_index(drop=True)
        for rows in (split.train, split.validation, split.test)
    )
    y_train = target_values(train)
    classes = np.asarray(sorted(set(y_train)))
    row: dict[str, object] = {"seed": seed, "test_rows": len(test)}
    probabilities: dict[str, dict[str, np.ndarray]] = {}
    for name, model, frames in (
        ("recipe", OriginalRecipe(whole), (train, validation, test)),
        (
            algorithm,
            build_pipeline(algorithm),
            tuple(to_model_frame(frame) for frame in (train, validation, test)),
        ),
    ):
        with threadpool_limits(1):
            started = time.process_time()
            model.fit(frames[0], y_train)
            cpu = time.process_time() - started
            assert list(model.classes_) == list(classes)
            probabilities[name] = {
                "validation": model.predict_proba(frames[1]),
                "test": model.predict_proba(frames[2]),
            }
        for part, y in (("validation", target_values(validation)), ("test", target_values(test))):
            figures = score(probabilities[name][part], classes, y)
            for metric in METRICS:
                row[f"{name} {part} {metric}"] = figures[metric]
        print(f"seed {seed}: fitted {name} ({cpu:.1f}s CPU)", flush=True)
    codes = pd.Index(classes).get_indexer(target_values(test))
    for metric in METRICS:
        row[f"test d {metric}"] = paired_interval(
            metric, codes, probabilities[algorithm]["test"], probabilities["recipe"]["test"]
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="42,1,2,3,4,5")
    parser.add_argument("--algorithm", default="hist_gradient_boosting")
    args = parser.parse_args()
    project_seed = Settings.from_env().split_seed
    whole = contract.parse_csv(read_dataset_bytes(ensure_dataset()))
    rows = [one_split(whole, int(seed), args.algorithm) for seed in args.seeds.split(",")]

    name = args.algorithm
    print(f"\n{name} - original recipe, per split seed (* = the project's SPLIT_SEED)")
    print(
        "| seed | test rows | metric | recipe val | model val | recipe test | model test "
        "| test difference | paired 5 %-95 % |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        mark = "*" if row["seed"] == project_seed else ""
        for metric in METRICS:
            lower, upper = row[f"test d {metric}"]  # type: ignore[misc]
            recipe_test = row[f"recipe test {metric}"]
            model_test = row[f"{name} test {metric}"]
            print(
                f"| {row['seed']}{mark} | {row['test_rows']:,} | {metric} "
                f"| {row[f'recipe validation {metric}']:.4f} "
                f"| {row[f'{name} validation {metric}']:.4f} "
                f"| {recipe_test:.4f} | {model_test:.4f} "
                f"| {model_test - recipe_test:+.4f} | {lower:+.4f}, {upper:+.4f} |"  # type: ignore[operator]
            )
    for metric in METRICS:
        differences = np.array(
            [row[f"{name} test {metric}"] - row[f"recipe test {metric}"] for row in rows]  # type: ignore[operator]
        )
        print(
            f"{metric}: test difference mean {differences.mean():+.4f}, "
            f"sd {differences.std(ddof=1):.4f}, "
            f"min {differences.min():+.4f}, max {differences.max():+.4f}, "
            f"model >= recipe on {(differences >= 0).sum()} of {len(differences)} splits"
        )


if __name__ == "__main__":
    main()
