"""The learning curve: how much training data is enough?

From every training result of a dataset (one per cumulative set and algorithm) this module
builds a table (rows = training rows, one column per algorithm) of the validation F1 (weighted)
and ROC-AUC, renders it as CSV, Markdown and plain text, draws it as a PNG, and states a
computed verdict. With the aggregator's noise-aware selection (readmission.selection) each cell
also carries the paired-bootstrap interval of its difference from the best, and the verdict is
"within noise of the best from N rows": the smallest size from which every larger size has a
candidate tied with the best. Without it (the command line, which has no probabilities) the
verdict is the smallest size from which the best algorithm stays within a tolerance (default
0.005 F1) of its best score.

Command line (prints the table and the verdict, e.g. at the end of scripts/run-local.sh):

    python -m readmission.learning_curve [DATASET_ID]

without DATASET_ID it uses the dataset of the current champion (models/champion/metadata.json).
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from readmission.selection import Selection

F1 = "f1_weighted"
AUC = "roc_auc_ovr"
DEFAULT_TOLERANCE = 0.005
METRIC_LABELS = {F1: "validation F1 (weighted)", AUC: "validation ROC-AUC (OvR, weighted)"}


@dataclass(frozen=True)
class CurvePoint:
    cumulative_index: int
    training_rows: int
    algorithm: str
    f1: float
    auc: float
    # paired-bootstrap interval of f1 - the best's f1 on validation, and whether it is tied
    # with the best (readmission.selection); None without a selection
    interval: tuple[float, float] | None = None
    tied: bool | None = None


@dataclass(frozen=True)
class LearningCurve:
    dataset_id: str
    points: tuple[CurvePoint, ...]
    algorithms: tuple[str, ...] = field(default=())
    sizes: tuple[tuple[int, int], ...] = field(default=())  # (cumulative_index, training_rows)
    selection: Selection | None = None

    def points_best_f1(self) -> float:
        """The highest validation F1 of any cell."""
        return max((p.f1 for p in self.points if not math.isnan(p.f1)), default=math.nan)

    def value(self, training_rows: int, algorithm: str, metric: str) -> float:
        """The metric of one cell, NaN where that result is missing."""
        for point in self.points:
            if point.training_rows == training_rows and point.algorithm == algorithm:
                return point.f1 if metric == F1 else point.auc
        return math.nan


def _metric(result: Mapping[str, Any], name: str) -> float:
    value = result.get("metrics", {}).get("validation", {}).get(name)
    return float(value) if isinstance(value, int | float) else math.nan


def build_learning_curve(
    dataset_id: str,
    results: Iterable[Mapping[str, Any]],
    selection: Selection | None = None,
) -> LearningCurve:
    """The curve of one dataset from its result documents (design.md's result schema), with
    each cell's interval from `selection` when given (its metric must be F1 weighted)."""

    def point(result: Mapping[str, Any]) -> CurvePoint:
        index, algorithm = int(result["cumulative_index"]), str(result["algorithm"])
        compared = None
        if selection is not None and selection.metric == F1:
            compared = selection.comparison(f"{index:02d}-{algorithm}")
        return CurvePoint(
            cumulative_index=index,
            training_rows=int(result["training_rows"]),
            algorithm=algorithm,
            f1=_metric(result, F1),
            auc=_metric(result, AUC),
            interval=None if compared is None else compared.interval,
            tied=None if compared is None else compared.tied,
        )

    points = sorted((point(r) for r in results), key=lambda p: (p.training_rows, p.algorithm))
    algorithms = tuple(sorted({p.algorithm for p in points}))
    sizes = tuple(sorted({(p.cumulative_index, p.training_rows) for p in points}))
    return LearningCurve(dataset_id, tuple(points), algorithms, sizes, selection)


# --- the verdict -------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    algorithm: str
    best_f1: float
    best_rows: int
    enough_rows: int  # the smallest size within `tolerance` of best_f1
    max_rows: int
    tolerance: float
    dips: tuple[int, ...]  # larger sizes that fall out of the band again (a noisy curve)
    text: str


def best_algorithm(curve: LearningCurve) -> str:
    """The algorithm with the highest validation F1 at any size (ROC-AUC, then name, break ties)."""
    scored = [p for p in curve.points if not math.isnan(p.f1)]
    if not scored:
        raise ValueError(f"dataset {curve.dataset_id} has no validation F1 to compare")
    best = min(scored, key=lambda p: (-p.f1, -_or_minus_inf(p.auc), p.algorithm))
    return best.algorithm


def _or_minus_inf(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def noise_verdict(curve: LearningCurve) -> str | None:
    """ "Within noise of the best from N rows": N is the smallest training size with a
    candidate tied with the best (readmission.selection), and the larger sizes without one are
    named; None without intervals."""
    selection = curve.selection
    if selection is None or all(p.tied is None for p in curve.points):
        return None
    tied_sizes = {p.training_rows for p in curve.points if p.tied}
    sizes = [rows for _, rows in curve.sizes]
    enough = min(tied_sizes)
    dips = [rows for rows in sizes if rows > enough and rows not in tied_sizes]
    top = selection.leader
    leader = next(
        p
        for p in curve.points
        if (p.cumulative_index, p.algorithm) == (int(top["cumulative_index"]), top["algorithm"])
    )
    chosen = selection.best
    tied = [p for p in curve.points if p.tied]
    text = (
        f"{leader.algorithm} on {leader.training_rows:,} rows has the best validation F1 "
        f"weighted ({leader.f1:.4f}); {len(tied)} of {len(curve.points)} candidates are within "
        f"noise of it ({selection.confidence:.0%} paired bootstrap, {selection.resamples} "
        f"resamples, {selection.rows:,} validation rows): within noise of the best from "
        f"{enough:,} rows ({enough / sizes[-1]:.0%} of the {sizes[-1]:,} available)"
    )
    if dips:
        text += f", though no candidate at {', '.join(f'{d:,}' for d in dips)} rows is"
    return text + (
        f". Selected among the tied (ROC-AUC, then more rows, then the cheaper fit): "
        f"{chosen['algorithm']} on {int(chosen['training_rows']):,} rows."
    )


def verdict(curve: LearningCurve, tolerance: float = DEFAULT_TOLERANCE) -> Verdict:
    """The smallest training size at which the best algorithm gets within `tolerance` F1 of
    its own best score, and the larger sizes (if any) where it falls out of that band again.
    With intervals (`noise_verdict`) the text is the noise-aware verdict."""
    algorithm = best_algorithm(curve)
    own = [p for p in curve.points if p.algorithm == algorithm and not math.isnan(p.f1)]
    best = max(own, key=lambda p: (p.f1, -p.training_rows))
    floor = best.f1 - tolerance
    enough = next(p for p in own if p.f1 >= floor)  # own is sorted by training rows
    dips = tuple(
        p.training_rows for p in own if p.training_rows > enough.training_rows and p.f1 < floor
    )
    max_rows = max(p.training_rows for p in curve.points)
    text = (
        f"{algorithm} is the best algorithm (validation F1 weighted {best.f1:.4f} at "
        f"{best.training_rows:,} rows). It first gets within {tolerance:g} F1 of that at "
        f"{enough.training_rows:,} training rows ({enough.training_rows / max_rows:.0%} of the "
        f"{max_rows:,} available)"
    )
    if enough.training_rows == max_rows and len(own) > 1:
        text += ": the curve is still rising at the largest size, more data would likely help."
    elif dips:
        text += (
            f", but falls below that band again at {', '.join(f'{d:,}' for d in dips)} rows: "
            "the curve is not monotonic (validation noise or overfitting), so read it with "
            "care: more data does not reliably help here."
        )
    else:
        text += ": more data beyond that adds little."
    noise = noise_verdict(curve)
    if noise is not None:
        text = noise
    return Verdict(
        algorithm,
        best.f1,
        best.training_rows,
        enough.training_rows,
        max_rows,
        tolerance,
        dips,
        text,
    )


# --- renderings ---------------------------------------------------------------------------


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.4f}"


def to_csv(curve: LearningCurve) -> bytes:
    """One row per training size: index, rows, then `<algorithm>_f1_weighted` and
    `<algorithm>_roc_auc_ovr` per algorithm (empty where a result is missing)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["cumulative_index", "training_rows"]
    for algorithm in curve.algorithms:
        header += [f"{algorithm}_{F1}", f"{algorithm}_{AUC}"]
    writer.writerow(header)
    for index, rows in curve.sizes:
        line = [str(index), str(rows)]
        for algorithm in curve.algorithms:
            line += [_fmt(curve.value(rows, algorithm, m)) for m in (F1, AUC)]
        writer.writerow(line)
    return buffer.getvalue().encode()


def _table_rows(curve: LearningCurve, metric: str) -> list[list[str]]:
    rows = []
    for _, size in curve.sizes:
        values = [curve.value(size, a, metric) for a in curve.algorithms]
        rows.append([f"{size:,}", *(_fmt(v) for v in values)])
    return rows


def to_markdown(curve: LearningCurve, tolerance: float = DEFAULT_TOLERANCE) -> str:
    """Two Markdown tables (F1, ROC-AUC) and the verdict; each size's best value in bold."""
    lines = [f"# Learning curve of dataset {curve.dataset_id}", ""]
    for metric in (F1, AUC):
        label = METRIC_LABELS[metric]
        lines += [f"## {label[0].upper()}{label[1:]}", ""]
        lines.append("| training rows | " + " | ".join(curve.algorithms) + " |")
        lines.append("| ---: |" + " ---: |" * len(curve.algorithms))
        for _, size in curve.sizes:
            values = [curve.value(size, a, metric) for a in curve.algorithms]
            known = [v for v in values if not math.isnan(v)]
            top = max(known) if known else math.nan
            cells = [f"**{_fmt(v)}**" if known and v == top else _fmt(v) for v in values]
            lines.append(f"| {size:,} | " + " | ".join(cells) + " |")
        lines.append("")
    if any(p.interval is not None for p in curve.points):
        lines += [
            "## Validation F1 (weighted) minus the best's, with its paired-bootstrap interval",
            "",
            "`=` marks the candidates tied with the best (upper bound >= 0).",
            "",
            "| training rows | " + " | ".join(curve.algorithms) + " |",
            "| ---: |" + " ---: |" * len(curve.algorithms),
        ]
        for _, size in curve.sizes:
            cells = [_interval_cell(curve, size, a) for a in curve.algorithms]
            lines.append(f"| {size:,} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Verdict", "", verdict(curve, tolerance).text, ""]
    return "\n".join(lines)


def _interval_cell(curve: LearningCurve, size: int, algorithm: str) -> str:
    point = next(
        (p for p in curve.points if p.training_rows == size and p.algorithm == algorithm), None
    )
    if point is None or point.interval is None or math.isnan(point.f1):
        return ""
    low, high = point.interval
    mark = "= " if point.tied else ""
    return f"{mark}{point.f1 - curve.points_best_f1():+.4f} [{low:+.4f}, {high:+.4f}]"


def render_text(
    curve: LearningCurve, tolerance: float = DEFAULT_TOLERANCE, verdict_text: str | None = None
) -> str:
    """The curve as fixed-width text for a terminal: one table per metric and the verdict
    (`verdict_text` if given, e.g. the aggregator's noise-aware one, else computed here)."""
    out = [f"Learning curve of dataset {curve.dataset_id}"]
    for metric in (F1, AUC):
        header = ["training rows", *curve.algorithms]
        body = _table_rows(curve, metric)
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        out += ["", METRIC_LABELS[metric]]
        out.append("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
        out.append("  ".join("-" * w for w in widths))
        out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    out += ["", verdict_text or verdict(curve, tolerance).text]
    return "\n".join(out) + "\n"


def _figure(**kwargs: Any) -> Any:
    """A matplotlib Figure on the Agg backend (no display; matplotlib imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def warm_up_png() -> None:
    """Import matplotlib and draw one small figure (loads the font cache): ~0.5 s once."""
    figure = _figure(figsize=(1, 1), dpi=10)
    figure.subplots().plot([0, 1], [0, 1], marker="o", label="x")
    figure.savefig(io.BytesIO(), format="png")


def geometric(curve: LearningCurve) -> bool:
    """Whether the curve's sizes grow geometrically (readmission.corpus.set_sizes beyond its
    single-batch steps): a step between sizes, the last (a partial batch) aside, at least
    twice another."""
    rows = sorted({size for _, size in curve.sizes})
    steps = [b - a for a, b in itertools.pairwise(rows)][:-1]
    return len(steps) >= 2 and max(steps) >= 2 * min(steps)


def to_png(curve: LearningCurve) -> bytes:
    """Validation F1 (left) and ROC-AUC (right) against training rows, one line per algorithm;
    rows on a log axis when the sizes grow geometrically (`geometric`)."""
    figure = _figure(figsize=(11, 4.5), dpi=110, layout="constrained")
    axes = figure.subplots(1, 2)
    for ax, metric in zip(axes, (F1, AUC), strict=True):
        for algorithm in curve.algorithms:
            own = [p for p in curve.points if p.algorithm == algorithm]
            ys = [p.f1 if metric == F1 else p.auc for p in own]
            ax.plot([p.training_rows for p in own], ys, marker="o", label=algorithm)
        if geometric(curve):
            ax.set_xscale("log")
        ax.set_xlabel("training rows (log scale)" if geometric(curve) else "training rows")
        ax.set_ylabel(METRIC_LABELS[metric])
        ax.grid(True, alpha=0.3)
    axes[0].legend(loc="best", fontsize="small")
    figure.suptitle(f"Learning curve of dataset {curve.dataset_id}")
    buffer = io.BytesIO()
    # No timestamps in the PNG: the same curve gives the same bytes (idempotent rewrites).
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


# --- command line -------------------------------------------------------------------------


def load_results(store: Any, results_bucket: str, dataset_id: str) -> list[dict[str, Any]]:
    """Every result document of a dataset in the results bucket."""
    return [
        store.get_json(results_bucket, key)
        for key in sorted(store.list_keys(results_bucket, f"{dataset_id}/"))
        if key.endswith(".json")
    ]


def main(argv: list[str] | None = None) -> int:
    from readmission.config import Settings
    from readmission.keys import CHAMPION_METADATA_KEY
    from readmission.storage import ObjectStore

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset_id", nargs="?", help="default: the champion's dataset")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    store = ObjectStore.from_settings(settings)
    dataset_id = args.dataset_id
    if not dataset_id:
        champion = store.get_json_if_exists(settings.buckets.models, CHAMPION_METADATA_KEY)
        if champion is None:
            print("no champion yet and no dataset id given", file=sys.stderr)
            return 1
        dataset_id = champion["dataset_id"]
    results = load_results(store, settings.buckets.results, dataset_id)
    if not results:
        print(f"no training results for dataset {dataset_id}", file=sys.stderr)
        return 1
    print(render_text(build_learning_curve(dataset_id, results), args.tolerance), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
