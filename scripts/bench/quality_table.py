"""The pipeline's own selection on the real file, next to the original project's recipe.

Does what a first drop of the whole file does, without the servers: the patient-grouped split
(readmission.split, SPLIT_SEED), cumulative training sets of BATCH_ROWS rows in training
order, every algorithm of ALGORITHMS fitted on every set (one thread), each scored on the
validation rows, the noise-aware selection (readmission.selection, GATE_RESAMPLES,
GATE_SEED), then the ONE look at the test rows: the served model's and the original recipe's
(scripts/bench/compare_original.py) F1 weighted, F1 macro, ROC-AUC and `<30` recall.

Prints the learning curve with its intervals, the verdict, and the quality table of
docs/training.md (Markdown), and the one-line figures of the README.

    .venv/bin/python scripts/bench/quality_table.py [--skip-original] [--cache DIR]
        [--only ALGORITHM]

`--cache DIR` keeps each fit's validation and test probabilities (`<job>.npz`) and reuses
them; `--only ALGORITHM` fits that algorithm's sets into the cache and stops (run one per
algorithm in parallel, then once without `--only`).
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
from sklearn.metrics import f1_score, recall_score, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_original import OriginalRecipe
from real_data import real_split

from readmission.config import Settings
from readmission.features import build_pipeline, target_values, to_model_frame
from readmission.learning_curve import build_learning_curve, to_markdown
from readmission.scoring import score
from readmission.selection import job_of, select


def test_scores(probabilities: np.ndarray, classes: np.ndarray, y: np.ndarray) -> dict[str, float]:
    predicted = classes[probabilities.argmax(axis=1)]
    return {
        "f1_weighted": float(f1_score(y, predicted, average="weighted")),
        "f1_macro": float(f1_score(y, predicted, average="macro")),
        "roc_auc_ovr": float(
            roc_auc_score(y, probabilities, multi_class="ovr", average="weighted", labels=classes)
        ),
        "recall_lt30": float(recall_score(y, predicted, labels=["<30"], average=None)[0]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-original", action="store_true")
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--only")
    args = parser.parse_args()
    settings = Settings.from_env()

    whole, split = real_split(settings.split_seed)
    train = whole.iloc[split.train].reset_index(drop=True)  # in training order
    validation = whole.iloc[split.validation].reset_index(drop=True)
    test = whole.iloc[split.test].reset_index(drop=True)
    x_train, y_train = to_model_frame(train), target_values(train)
    x_val, y_val = to_model_frame(validation), target_values(validation)
    x_test, y_test = to_model_frame(test), target_values(test)
    sizes = [*range(settings.batch_rows, len(train), settings.batch_rows), len(train)]
    print(
        f"split: {len(train):,} train / {len(validation):,} validation / {len(test):,} test; "
        f"sets {sizes}; algorithms {', '.join(settings.algorithms)}",
        flush=True,
    )

    results, probabilities, test_probabilities = [], {}, {}
    classes = np.asarray(sorted(set(y_train)))
    for index, rows in enumerate(sizes):
        for algorithm in [args.only] if args.only else settings.algorithms:
            job = f"{index:02d}-{algorithm}"
            cached = args.cache / f"{job}.npz" if args.cache else None
            if cached is not None and cached.exists():
                saved = np.load(cached)
                p_val, p_test, cpu = saved["val"], saved["test"], float(saved["cpu"])
            else:
                pipeline = build_pipeline(algorithm)
                started = time.process_time()
                pipeline.fit(x_train.head(rows), y_train[:rows])
                cpu = time.process_time() - started
                assert list(pipeline.classes_) == list(classes)
                p_val, p_test = pipeline.predict_proba(x_val), pipeline.predict_proba(x_test)
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    np.savez(cached, val=p_val, test=p_test, cpu=cpu)
                print(f"fitted {job} on {rows:,} rows ({cpu:.1f}s CPU)", flush=True)
            result = {
                "cumulative_index": index,
                "algorithm": algorithm,
                "training_rows": rows,
                "fit_cpu_seconds": cpu,
                "metrics": {"validation": score(p_val, classes, y_val)},
            }
            results.append(result)
            probabilities[job], test_probabilities[job] = p_val, p_test
    if args.only:
        return
    codes = pd.Index(classes).get_indexer(y_val)
    started = time.perf_counter()
    chosen = select(
        results,
        probabilities,
        codes,
        settings.selection_metric,
        settings.gate_resamples,
        settings.gate_seed,
    )
    selection_seconds = time.perf_counter() - started
    print()
    print(to_markdown(build_learning_curve("real file", results, chosen)))
    print(f"selection: {len(results)} candidates compared in {selection_seconds:.1f}s wall")

    rows = []
    for label, job in (
        (f"served: {job_of(chosen.best)} (noise-aware selection)", job_of(chosen.best)),
        (f"leader by validation F1 alone: {job_of(chosen.leader)}", job_of(chosen.leader)),
    ):
        val = chosen.comparison(job)
        rows.append(
            {
                "model": label,
                "validation_f1_weighted": val.score if val else float("nan"),
                **{
                    f"test_{k}": v
                    for k, v in test_scores(test_probabilities[job], classes, y_test).items()
                },
            }
        )
    if not args.skip_original:
        recipe = OriginalRecipe(whole).fit(train, y_train)
        p_val = recipe.predict_proba(validation)
        rows.append(
            {
                "model": "original recipe (LabelEncoder + StandardScaler + GB), all rows",
                "validation_f1_weighted": score(p_val, classes, y_val)["f1_weighted"],
                **{
                    f"test_{k}": v
                    for k, v in test_scores(recipe.predict_proba(test), classes, y_test).items()
                },
            }
        )
    table = pd.DataFrame(rows).set_index("model").round(4)
    print()
    print(table.to_string())
    served = rows[0]
    print()
    print(
        f"README: served {job_of(chosen.best)}: test ROC-AUC {served['test_roc_auc_ovr']:.4f}, "
        f"F1 weighted {served['test_f1_weighted']:.4f}, F1 macro {served['test_f1_macro']:.4f}, "
        f"<30 recall {served['test_recall_lt30']:.3f}"
        + (
            ""
            if args.skip_original
            else f" (original recipe {rows[-1]['test_roc_auc_ovr']:.4f} / "
            f"{rows[-1]['test_f1_weighted']:.4f} / {rows[-1]['test_f1_macro']:.4f} / "
            f"{rows[-1]['test_recall_lt30']:.3f})"
        )
    )


if __name__ == "__main__":
    main()
