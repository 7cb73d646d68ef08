"""The latest drift report as the predict function shows it: `/model-info`'s `drift`, the web
page's drift panel and the gauge `readmission_drift_psi{column}` (readmission.serving.metrics).

Ingest writes each drop's report and a copy of the last one, `reports/latest-drift.json`, in
the models bucket (readmission.drift_reports, docs/monitoring.md). The model server's poll
thread re-reads the copy with a conditional GET after each champion poll, like the gate's
documents (readmission.serving.decisions): informational, it never blocks or fails serving; a
missing or unreadable report is null, a failing read keeps the last one read. With local files
(MODEL_PATH) it is `latest-drift.json` next to the metadata file.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from readmission.keys import LATEST_DRIFT_KEY
from readmission.serving.decisions import DocumentSource, PolledDocument, refresh_document
from readmission.serving.sources import LocalModelSource

LOCAL_DRIFT_FILE = "latest-drift.json"
# the report's fields /model-info shows as they are (null when absent)
SUMMARY_FIELDS = (
    "drop_id",
    "status",
    "message",
    "rows",
    "drop_rows",
    "reference",
    "thresholds",
    "max_psi",
)
TOP_COLUMNS = 10  # columns /model-info lists, by PSI (every column has its gauge)


def _number(value: Any) -> float | None:
    return float(value) if type(value) in (int, float) else None


def column_psi(report: Mapping[str, Any]) -> dict[str, float]:
    """column -> PSI of a report's features and its target (numbers only)."""
    columns = report.get("columns")
    found = {}
    if isinstance(columns, dict):
        for column, entry in columns.items():
            value = _number(entry.get("psi")) if isinstance(entry, dict) else None
            if value is not None:
                found[str(column)] = value
    target = report.get("target")
    if isinstance(target, dict) and _number(target.get("psi")) is not None:
        found[str(target.get("column") or "target")] = float(target["psi"])
    return found


def drift_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """What /model-info shows of a drift report: SUMMARY_FIELDS, the drifted and watched
    columns, and the TOP_COLUMNS columns by PSI with their status."""
    columns = report.get("columns") if isinstance(report.get("columns"), dict) else {}
    ranked = sorted(column_psi(report).items(), key=lambda item: (-item[1], item[0]))
    top = []
    for column, psi in ranked[:TOP_COLUMNS]:
        entry = columns.get(column) if isinstance(columns.get(column), dict) else {}
        unseen = entry.get("unseen") if isinstance(entry.get("unseen"), dict) else {}
        status = entry.get("status")
        if column not in columns and isinstance(report.get("target"), dict):
            status = report["target"].get("status")
        top.append({"column": column, "psi": psi, "status": status, "unseen": unseen.get("rows")})
    return {
        **{name: report.get(name) for name in SUMMARY_FIELDS},
        "drifted": list(report.get("drifted") or []),
        "watch": list(report.get("watch") or []),
        "top": top,
    }


class DriftDocument(Collector):
    """The latest drift report as last read; `refresh()` runs in the poll thread only,
    `info()`, `psi()` and `collect()` (the gauge, at scrape time: register it with
    readmission.serving.metrics.register_collector) in any thread (they read one reference)."""

    def __init__(self, source: DocumentSource, key: str) -> None:
        self.source = source
        self._report = PolledDocument(key)

    @classmethod
    def for_source(cls, source: Any) -> DriftDocument:
        if isinstance(source, LocalModelSource):
            return cls(source, LOCAL_DRIFT_FILE)
        return cls(source, LATEST_DRIFT_KEY)

    def refresh(self) -> None:
        """Re-read the report if it changed (one conditional read). Never raises."""
        refresh_document(self.source, self._report)

    def info(self) -> dict[str, Any]:
        """`drift` for /model-info: the summary of the latest report, or None."""
        report = self._report.value
        return {"drift": None if report is None else drift_summary(report)}

    def psi(self) -> dict[str, float]:
        """column -> PSI of the latest report ({} without one), for the gauge."""
        report = self._report.value
        return {} if report is None else column_psi(report)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """`readmission_drift_psi{column}` of the latest report (no series before one)."""
        family = GaugeMetricFamily(
            "readmission_drift_psi",
            "PSI of each column of the latest drop against the champion's training reference.",
            labels=["column"],
        )
        for column, value in sorted(self.psi().items()):
            family.add_metric([column], value)
        yield family
