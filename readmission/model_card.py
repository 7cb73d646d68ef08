"""The model card of a version's selected model (issue #17, item 5): `model_card.json` and
`model_card.md` beside its ONNX file in the models bucket, and on its MLflow run.

Pure computation (reads and writes nothing): `build_card` gathers, from what the aggregator
already holds, the intended use and its limits, the data's citation, the training rows, every
validation and test metric, the `<30` recall, the calibration (Brier, ECE), the selection rule
with the selected model's interval, and the flagged groups; `to_json` and `to_markdown` render
it with deterministic bytes (no timestamps), so a redelivered aggregation rewrites the same
objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from readmission import quality
from readmission.storage import json_bytes

INTENDED_USE = (
    "Research and teaching: a demonstration of a serverless MLOps pipeline that predicts "
    "whether a diabetic inpatient encounter is followed by a readmission within 30 days "
    "(`<30`), after 30 days (`>30`) or not at all (`NO`)."
)
LIMITS = (
    "Not for clinical decisions, triage or any use about real patients.",
    "Trained on research data from 130 US hospitals, 1999-2008: practice, coding (ICD-9) and "
    "populations have changed since; the figures say nothing about other hospitals or years.",
    "Discrimination is modest (ROC-AUC about 0.69 on this data): most `<30` readmissions are "
    "missed, and most `<30` predictions are wrong.",
    "Calibration and per-group quality are measured on held-out rows of the same data only.",
)
DATA_CITATION = (
    "Strack B, DeShazo JP, Gennings C, Olmo JL, Ventura S, Cios KJ, Clore JN. Impact of HbA1c "
    "measurement on hospital readmission rates: analysis of 70,000 clinical database patient "
    "records. BioMed Research International 2014:781670. Data: UCI Machine Learning "
    "Repository, 'Diabetes 130-US Hospitals for Years 1999-2008' (CC BY 4.0)."
)


def _recall(report: Mapping[str, Any], split: str) -> float | None:
    return report["splits"].get(split, {}).get("overall", {}).get("recall")


def build_card(
    *,
    dataset_id: str,
    best: Mapping[str, Any],
    test_metrics: Mapping[str, Any],
    quality_report: Mapping[str, Any],
    selection: Mapping[str, Any],
    classifier: Mapping[str, Any],
) -> dict[str, Any]:
    """The card of the model `best` (a result document) selected for `dataset_id`.
    `selection`: readmission.selection.Selection.as_dict(); `classifier`: its
    hyperparameters (readmission.features.classifier_params, JSON-able)."""
    selected = next(c for c in selection["comparisons"] if c["job"] == selection["selected"])
    positive = quality_report.get("positive_class", quality.POSITIVE_CLASS)
    return {
        "model": {
            "algorithm": str(best["algorithm"]),
            "classifier": dict(classifier),
            "dataset_id": dataset_id,
            "cumulative_index": int(best["cumulative_index"]),
            "training_rows": int(best["training_rows"]),
            "run_id": str(best["run_id"]),
            "classes": list(quality_report["classes"]),
            "label_rule": "the class of highest probability (argmax), in the ONNX graph",
        },
        "intended_use": INTENDED_USE,
        "limits": list(LIMITS),
        "data_citation": DATA_CITATION,
        "metrics": {
            "validation": dict(best["metrics"]["validation"]),
            "test": dict(test_metrics),
        },
        "positive_class": positive,
        "positive_class_recall": {
            split: _recall(quality_report, split) for split in ("validation", "test")
        },
        "calibration": {
            split: {k: quality_report["splits"][split][k] for k in ("brier", "brier_mean", "ece")}
            for split in ("validation", "test")
            if split in quality_report["splits"]
        },
        "selection": {
            "rule": selection["rule"],
            "leader": selection["leader"],
            "selected": selection["selected"],
            "tied": list(selection["tied"]),
            "selected_difference": selected["difference"],
            "selected_interval": list(selected["interval"]),
        },
        "flag_rule": dict(quality_report["flag_rule"]),
        "flagged_groups": list(quality_report["splits"].get("test", {}).get("flagged", [])),
    }


def to_json(card: Mapping[str, Any]) -> bytes:
    """Canonical JSON: equal cards give equal bytes."""
    return json_bytes(card)


def _f(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"


def to_markdown(card: Mapping[str, Any]) -> str:
    """The card as Markdown."""
    model, selection = card["model"], card["selection"]
    lines = [
        f"# Model card: {model['algorithm']} for corpus version {model['dataset_id']}",
        "",
        "## Intended use",
        "",
        card["intended_use"],
        "",
        "## Limits",
        "",
        *(f"* {limit}" for limit in card["limits"]),
        "",
        "## Data",
        "",
        card["data_citation"],
        "",
        f"Trained on {model['training_rows']:,} rows (cumulative set "
        f"{model['cumulative_index']}), MLflow run `{model['run_id']}`. Label: "
        f"{model['label_rule']}.",
        "",
        "## Metrics",
        "",
        "| metric | validation | test |",
        "| --- | ---: | ---: |",
    ]
    validation, test = card["metrics"]["validation"], card["metrics"]["test"]
    for name in sorted(set(validation) | set(test)):
        lines.append(f"| {name} | {_f(validation.get(name))} | {_f(test.get(name))} |")
    recall = card["positive_class_recall"]
    lines.append(
        f"| recall of `{card['positive_class']}` | {_f(recall.get('validation'))} | "
        f"{_f(recall.get('test'))} |"
    )
    brier = {name: split["brier_mean"] for name, split in card["calibration"].items()}
    lines.append(
        f"| Brier (mean of classes) | {_f(brier.get('validation'))} | {_f(brier.get('test'))} |"
    )
    lines += ["", "## Calibration (test, one-vs-rest)", ""]
    test_calibration = card["calibration"].get("test", {})
    lines += ["| class | Brier | ECE |", "| --- | ---: | ---: |"]
    for label in model["classes"]:
        brier = test_calibration.get("brier", {}).get(label)
        ece = test_calibration.get("ece", {}).get(label)
        lines.append(f"| `{label}` | {_f(brier)} | {_f(ece)} |")
    low, high = selection["selected_interval"]
    lines += [
        "",
        "## Selection",
        "",
        f"Rule: {selection['rule']}.",
        "",
        f"Leader: {selection['leader']}; tied with it: {', '.join(selection['tied'])}; "
        f"selected: {selection['selected']} (validation difference from the leader "
        f"{selection['selected_difference']:+.4f}, interval [{low:+.4f}, {high:+.4f}]).",
        "",
        "## Groups flagged (test)",
        "",
        f"Rule: a group of at least {card['flag_rule']['min_rows']} rows whose "
        f"`{card['positive_class']}` recall is more than {card['flag_rule']['max_recall_gap']} "
        "below the whole split's.",
        "",
    ]
    flagged = card["flagged_groups"]
    if flagged:
        lines += [
            f"* {g['column']} = {g['group']}: {g['rows']:,} rows, recall {_f(g['recall'])} "
            f"(overall {_f(g['overall_recall'])})"
            for g in flagged
        ]
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"
