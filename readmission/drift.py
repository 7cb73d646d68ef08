"""Data drift: a drop compared with the champion's training reference (docs/monitoring.md).

Pure functions over plain data, no I/O:

* `build_profile(rows)` is the compact reference profile of a model's training rows (canonical
  JSON; its size is in docs/monitoring.md): per numeric feature the reference's decile edges
  and the share of rows in each bin, per categorical feature the share of each frequent
  category, the rare ones pooled, and the list of every category seen; the missing rate of
  every feature; the target
  shares. The aggregator writes it beside the model (`models/<v>/reference.json`).
* `compare(profile, rows, thresholds, ...)` is the drift report of a drop against a profile:
  PSI per feature (numeric binned on the reference's edges, categorical by category, with a
  bucket for missing values and one for values the reference never saw), a chi-square test of
  homogeneity on the same bins (reference rows against drop rows), the unseen categories with
  their counts, the change of each missing rate, and the change of the target shares.
* `render_markdown(report)` is the same report for a person.
* `SystematicSample(rows, max_rows)` is the bounded sample both are built from (a drop's rows,
  a version's training rows), taken as the rows stream by in blocks.

Invariants: the same profile and rows give the same report, byte for byte once serialised with
`storage.json_bytes` (floats are rounded to `DIGITS` significant digits; categories, columns and
unseen values are sorted); a column's status is `drifted` when its PSI is above
`Thresholds.drifted`, `watch` above `Thresholds.watch`, else `stable`; the report's status is
the worst status of its features and the target, or `no_reference` when there is no profile.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from readmission import contract

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

PROFILE_SCHEMA = 1
REPORT_SCHEMA = 1
# Deciles: numeric features are binned on the reference's 10 %, 20 %, ..., 90 % quantiles
# (ties merge bins: a column that is mostly 0 keeps fewer edges).
QUANTILES = tuple(i / 10 for i in range(1, 10))
# A category with at least this share of the reference rows has a bin of its own; rarer ones
# share the pooled bin (they are still "seen": not counted as unseen).
MIN_CATEGORY_SHARE = 0.005
MAX_CATEGORY_BINS = 40
# A share of zero (a bin one side never fills, e.g. unseen values in the reference) is taken
# as this in the PSI's logarithm, as usual for PSI.
PSI_EPSILON = 1e-4
DIGITS = 6  # significant digits of every float in profiles and reports
UNSEEN_LISTED = 20  # unseen values listed per column (the most frequent; the count covers all)

MISSING_BIN, OTHER_BIN, UNSEEN_BIN = "(missing)", "(other)", "(unseen)"
STABLE, WATCH, DRIFTED, NO_REFERENCE = "stable", "watch", "drifted", "no_reference"
_SEVERITY = {STABLE: 0, WATCH: 1, DRIFTED: 2}


@dataclass(frozen=True)
class Thresholds:
    """PSI above `drifted` flags a column as drifted, above `watch` as one to watch."""

    watch: float = 0.1
    drifted: float = 0.2

    def status(self, psi: float) -> str:
        if psi > self.drifted:
            return DRIFTED
        if psi > self.watch:
            return WATCH
        return STABLE


class SystematicSample:
    """A systematic sample of at most `max_rows` of `rows` rows that arrive in blocks, in order
    (`add`, or `skip` for a block `wanted` says holds no picked row): the rows at positions
    floor(k * rows / m), k = 0 .. m - 1, m = min(rows, max_rows); every row when there are no
    more than `max_rows`. Memory holds the sample, not the blocks. Deterministic."""

    def __init__(self, rows: int, max_rows: int) -> None:
        if max_rows < 1:
            raise ValueError(f"a sample needs at least one row, got {max_rows}")
        m = min(rows, max_rows)
        self._picks = (np.arange(m, dtype=np.int64) * rows) // max(m, 1)
        self._start = 0
        self._parts: list[pa.Table] = []

    def _span(self, num_rows: int) -> tuple[int, int]:
        lo, hi = np.searchsorted(self._picks, [self._start, self._start + num_rows])
        return int(lo), int(hi)

    def wanted(self, num_rows: int) -> bool:
        """Whether the next `num_rows` rows hold a picked row."""
        lo, hi = self._span(num_rows)
        return hi > lo

    def add(self, block: pa.Table) -> None:
        """The next rows: their picked rows join the sample."""
        import pyarrow as pa

        lo, hi = self._span(block.num_rows)
        if hi - lo == block.num_rows:
            self._parts.append(block)
        elif hi > lo:
            self._parts.append(block.take(pa.array(self._picks[lo:hi] - self._start)))
        self._start += block.num_rows

    def skip(self, num_rows: int) -> None:
        """The next `num_rows` rows, which hold no picked row (`wanted` is False)."""
        if self.wanted(num_rows):
            raise ValueError(f"rows {self._start:,} + {num_rows:,} hold picked rows")
        self._start += num_rows

    def table(self) -> pa.Table:
        """The sample, in row order."""
        import pyarrow as pa

        return pa.concat_tables(self._parts)


def warm_up() -> None:
    """Import what `compare` imports when first called (scipy's test: seconds on a cold
    process), for a function's start-up."""
    import scipy.stats  # noqa: F401


def _round(value: float) -> float:
    return float(f"{value:.{DIGITS}g}") if math.isfinite(value) else value


def _table(rows: pa.Table | pd.DataFrame) -> pa.Table:
    import pyarrow as pa

    if isinstance(rows, pa.Table):
        return rows
    return pa.Table.from_pandas(rows, preserve_index=False)


def _numeric(table: pa.Table, column: str) -> np.ndarray:
    values = table.column(column).to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float64)


def _category_counts(table: pa.Table, column: str) -> tuple[dict[str, int], int]:
    """({category: rows}, rows missing) of a string column (null or "?" is missing)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    array = table.column(column)
    if not pa.types.is_string(array.type) and not pa.types.is_large_string(array.type):
        array = pc.cast(array, pa.string())
    counts: dict[str, int] = {}
    missing = 0
    for item in pc.value_counts(array).to_pylist():
        value, n = item["values"], int(item["counts"])
        if value is None or value == contract.MISSING_MARKER:
            missing += n
        else:
            counts[str(value)] = counts.get(str(value), 0) + n
    return counts, missing


# --------------------------------------------------------------------------- the profile


def build_profile(rows: pa.Table | pd.DataFrame, source: Mapping[str, Any] | None = None) -> dict:
    """The reference profile of training rows (the 50 contract columns, as ingest parses them).

    `source` says where the rows come from (corpus version, cumulative set); it is copied."""
    table = _table(rows)
    n = table.num_rows
    if n == 0:
        raise ValueError("a reference profile needs at least one row")
    numeric: dict[str, Any] = {}
    for column in contract.NUMERIC_FEATURES:
        values = _numeric(table, column)
        present = values[~np.isnan(values)]
        edges = (
            sorted({_round(float(q)) for q in np.quantile(present, QUANTILES)})
            if present.size
            else []
        )
        counts = np.bincount(
            np.searchsorted(np.asarray(edges), present, side="left"), minlength=len(edges) + 1
        )
        numeric[column] = {
            "edges": edges,
            "shares": [_round(c / n) for c in counts],
            "missing": _round((n - present.size) / n),
        }
    categorical: dict[str, Any] = {}
    for column in contract.CATEGORICAL_FEATURES:
        counts_by, missing = _category_counts(table, column)
        ranked = sorted(counts_by.items(), key=lambda item: (-item[1], item[0]))
        binned = [(v, c) for v, c in ranked if c / n >= MIN_CATEGORY_SHARE][:MAX_CATEGORY_BINS]
        kept = {v for v, _ in binned}
        categorical[column] = {
            "shares": {v: _round(c / n) for v, c in sorted(binned)},
            "other": _round(sum(c for v, c in ranked if v not in kept) / n),
            "rare": sorted(v for v in counts_by if v not in kept),
            "missing": _round(missing / n),
        }
    target_counts, _ = _category_counts(table, contract.TARGET)
    return {
        "schema": PROFILE_SCHEMA,
        "rows": n,
        "source": dict(source or {}),
        "quantiles": list(QUANTILES),
        "min_category_share": MIN_CATEGORY_SHARE,
        "numeric": numeric,
        "categorical": categorical,
        "target": {
            "column": contract.TARGET,
            "shares": {c: _round(target_counts.get(c, 0) / n) for c in contract.TARGET_CLASSES},
        },
    }


# --------------------------------------------------------------------------- the comparison


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    """Population stability index of two share vectors over the same bins (zeros floored)."""
    expected = np.maximum(np.asarray(reference, dtype=np.float64), PSI_EPSILON)
    actual = np.maximum(np.asarray(current, dtype=np.float64), PSI_EPSILON)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def homogeneity_test(reference_counts: np.ndarray, current_counts: np.ndarray) -> dict[str, Any]:
    """Chi-square test of homogeneity of two samples over the same bins (bins empty in both
    are dropped); None values when fewer than two bins are filled."""
    from scipy.stats import chi2_contingency

    table = np.vstack([reference_counts, current_counts]).astype(np.float64)
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return {"name": "chi2_homogeneity", "statistic": None, "p_value": None, "dof": 0}
    result = chi2_contingency(table, correction=False)
    return {
        "name": "chi2_homogeneity",
        "statistic": _round(float(result.statistic)),
        "p_value": _round(float(result.pvalue)),
        "dof": int(result.dof),
    }


def _missing_change(reference: float, current: float) -> dict[str, float]:
    return {
        "reference": _round(reference),
        "drop": _round(current),
        "change": _round(current - reference),
    }


def _numeric_column(spec: Mapping[str, Any], values: np.ndarray, n: int, ref_rows: int) -> dict:
    present = values[~np.isnan(values)]
    edges = np.asarray(spec["edges"], dtype=np.float64)
    counts = np.bincount(np.searchsorted(edges, present, side="left"), minlength=len(edges) + 1)
    current = np.append(counts, n - present.size) / n
    reference = np.append(np.asarray(spec["shares"], dtype=np.float64), spec["missing"])
    return {
        "kind": "numeric",
        "psi": psi(reference, current),
        "test": homogeneity_test(np.rint(reference * ref_rows), current * n),
        "missing": _missing_change(float(spec["missing"]), (n - present.size) / n),
    }


def _categorical_column(
    spec: Mapping[str, Any], counts: Mapping[str, int], missing: int, n: int, ref_rows: int
) -> dict:
    binned = list(spec["shares"])
    rare = set(spec["rare"])
    unseen = {v: c for v, c in counts.items() if v not in spec["shares"] and v not in rare}
    other = sum(c for v, c in counts.items() if v in rare)
    current = np.array(
        [counts.get(v, 0) for v in binned] + [other, sum(unseen.values()), missing], np.float64
    )
    reference = np.array(
        [spec["shares"][v] for v in binned] + [spec["other"], 0.0, spec["missing"]], np.float64
    )
    listed = sorted(unseen.items(), key=lambda item: (-item[1], item[0]))[:UNSEEN_LISTED]
    # The test pools unseen values with the rare ones (the reference's pooled bin also holds
    # categories the drop lacks); the PSI keeps them apart.
    pooled = np.delete(current, -2)
    pooled[-2] += current[-2]
    return {
        "kind": "categorical",
        "psi": psi(reference, current / n),
        "test": homogeneity_test(np.rint(np.delete(reference, -2) * ref_rows), pooled),
        "missing": _missing_change(float(spec["missing"]), missing / n),
        "unseen": {
            "rows": int(sum(unseen.values())),
            "values": len(unseen),
            "top": [{"value": v, "rows": c} for v, c in listed],
        },
    }


def _worst(statuses: list[str]) -> str:
    return max(statuses, key=_SEVERITY.__getitem__, default=STABLE)


def no_reference_report(
    drop_id: str, rows: int, thresholds: Thresholds, why: str, *, drop_rows: int | None = None
) -> dict:
    """The report of a drop with nothing to compare it with (no champion, or one without a
    profile): its status says so and it has no columns."""
    return {
        "schema": REPORT_SCHEMA,
        "drop_id": drop_id,
        "status": NO_REFERENCE,
        "message": why,
        "rows": rows,
        "drop_rows": rows if drop_rows is None else drop_rows,
        "reference": None,
        "thresholds": {"watch": thresholds.watch, "drifted": thresholds.drifted},
        "drifted": [],
        "watch": [],
        "max_psi": None,
        "columns": {},
        "target": None,
    }


def compare(
    profile: Mapping[str, Any],
    rows: pa.Table | pd.DataFrame,
    thresholds: Thresholds,
    *,
    drop_id: str,
    reference: Mapping[str, Any] | None = None,
    drop_rows: int | None = None,
) -> dict[str, Any]:
    """The drift report of a drop's rows against a reference profile (see the module docstring).

    `reference` names the model the profile belongs to (version, corpus version, key); it is
    copied into the report with the profile's row count. `rows` may be a sample of the drop:
    `drop_rows` is then the drop's row count (`rows` counts the compared rows)."""
    table = _table(rows)
    n = table.num_rows
    if n == 0:
        return no_reference_report(
            drop_id, 0, thresholds, "the drop has no rows", drop_rows=drop_rows
        )
    ref_rows = int(profile["rows"])
    columns: dict[str, Any] = {}
    for column in contract.FEATURES:
        if column in profile["numeric"]:
            entry = _numeric_column(
                profile["numeric"][column], _numeric(table, column), n, ref_rows
            )
        else:
            counts, missing = _category_counts(table, column)
            entry = _categorical_column(
                profile["categorical"][column], counts, missing, n, ref_rows
            )
        entry["psi"] = _round(entry["psi"])
        entry["status"] = thresholds.status(entry["psi"])
        columns[column] = entry
    target_counts, _ = _category_counts(table, contract.TARGET)
    ref_shares = profile["target"]["shares"]
    drop_shares = {c: target_counts.get(c, 0) / n for c in contract.TARGET_CLASSES}
    target_psi = _round(
        psi(
            np.array([ref_shares[c] for c in contract.TARGET_CLASSES]),
            np.array([drop_shares[c] for c in contract.TARGET_CLASSES]),
        )
    )
    target = {
        "column": contract.TARGET,
        "reference": dict(ref_shares),
        "drop": {c: _round(v) for c, v in drop_shares.items()},
        "change": {c: _round(drop_shares[c] - ref_shares[c]) for c in contract.TARGET_CLASSES},
        "psi": target_psi,
        "status": thresholds.status(target_psi),
    }
    drifted = [c for c, e in columns.items() if e["status"] == DRIFTED]
    watch = [c for c, e in columns.items() if e["status"] == WATCH]
    status = _worst([e["status"] for e in columns.values()] + [target["status"]])
    flagged = drifted + ([contract.TARGET] if target["status"] == DRIFTED else [])
    message = (
        f"{len(flagged)} drifted ({', '.join(flagged)})" if flagged else "no column drifted"
    ) + (f"; {len(watch)} to watch ({', '.join(watch)})" if watch else "")
    return {
        "schema": REPORT_SCHEMA,
        "drop_id": drop_id,
        "status": status,
        "message": message,
        "rows": n,
        "drop_rows": n if drop_rows is None else drop_rows,
        "reference": {**dict(reference or {}), "rows": ref_rows},
        "thresholds": {"watch": thresholds.watch, "drifted": thresholds.drifted},
        "drifted": drifted,
        "watch": watch,
        "max_psi": max(e["psi"] for e in columns.values()),
        "columns": columns,
        "target": target,
    }


def summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The short form of a report (the alert object, and what /model-info shows)."""
    return {
        "drop_id": report.get("drop_id"),
        "status": report.get("status"),
        "message": report.get("message"),
        "rows": report.get("rows"),
        "drop_rows": report.get("drop_rows"),
        "reference": report.get("reference"),
        "drifted": list(report.get("drifted") or []),
        "watch": list(report.get("watch") or []),
        "max_psi": report.get("max_psi"),
        "psi": {c: e.get("psi") for c, e in (report.get("columns") or {}).items()},
    }


# --------------------------------------------------------------------------- for a person


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: the verdict, then a table of the features by PSI, the unseen
    categories and the target shares."""
    lines = [f"# Drift report of drop {report['drop_id']}", ""]
    thresholds = report["thresholds"]
    if report["status"] == NO_REFERENCE:
        lines += [f"**No comparison**: {report['message']}.", ""]
        return "\n".join(lines)
    ref = report["reference"] or {}
    drop_rows = report.get("drop_rows") or report["rows"]
    compared = (
        f"A systematic sample of {report['rows']:,} of the drop's {drop_rows:,} rows"
        if drop_rows > report["rows"]
        else f"{report['rows']:,} rows of the drop"
    )
    lines += [
        f"**{report['status']}**: {report['message']}.",
        "",
        f"{compared} against the training rows ({ref.get('rows', 0):,})"
        f" of model version {ref.get('model_version', '?')} (corpus version "
        f"{ref.get('corpus_version', '?')}). PSI above {thresholds['drifted']} is drifted, "
        f"above {thresholds['watch']} to watch.",
        "",
        "| column | kind | PSI | status | chi² p-value | missing (ref → drop) | unseen rows |",
        "| --- | --- | ---: | --- | ---: | --- | ---: |",
    ]
    columns = sorted(report["columns"].items(), key=lambda item: (-item[1]["psi"], item[0]))
    for column, entry in columns:
        p_value = entry["test"]["p_value"]
        unseen = entry.get("unseen", {}).get("rows")
        lines.append(
            f"| {column} | {entry['kind']} | {entry['psi']:.4f} | {entry['status']} | "
            f"{'–' if p_value is None else f'{p_value:.3g}'} | "
            f"{entry['missing']['reference']:.3f} → {entry['missing']['drop']:.3f} | "
            f"{'–' if unseen is None else f'{unseen:,}'} |"
        )
    unseen_lines = [
        f"* {column}: "
        + ", ".join(f"`{item['value']}` ({item['rows']:,})" for item in entry["unseen"]["top"])
        + (
            f" and {entry['unseen']['values'] - len(entry['unseen']['top'])} more"
            if entry["unseen"]["values"] > len(entry["unseen"]["top"])
            else ""
        )
        for column, entry in sorted(report["columns"].items())
        if entry.get("unseen", {}).get("rows")
    ]
    lines += ["", "## Values the reference never saw", ""]
    lines += unseen_lines or ["None."]
    target = report["target"]
    lines += [
        "",
        f"## Target shares ({target['column']}; PSI {target['psi']:.4f}, {target['status']})",
        "",
        "| class | reference | drop | change |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label in contract.TARGET_CLASSES:
        lines.append(
            f"| {label} | {_fmt(target['reference'][label])} | {_fmt(target['drop'][label])} | "
            f"{target['change'][label]:+.3f} |"
        )
    return "\n".join(lines) + "\n"
