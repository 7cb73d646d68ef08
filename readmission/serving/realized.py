"""Realized metrics as Prometheus gauges of the predict function.

The outcomes function (readmission.outcomes) writes the realized metrics of each outcomes file
to the models bucket and copies the newest to `monitoring/realized/latest.json`. The predict
function is the endpoint Prometheus scrapes, so it exports that document: the model server's
poll thread re-reads it (a conditional GET, 304 while unchanged; `ModelServer.on_poll`), and
each scrape renders, per model version and period of the document,

    readmission_realized_<metric>{model_version, period}                 (REALIZED_METRICS)
    readmission_realized_minus_offline_<metric>{model_version, period}   (realized - offline test)
    readmission_realized_matched{model_version, period}, readmission_realized_unmatched

Informational like the gate's documents, and polled by the same rule
(`decisions.refresh_document`): a missing document exports nothing, a failed read keeps what
was last read (with a warning), one that is not a JSON object exports nothing, and reading
never touches a request.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from readmission.keys import REALIZED_LATEST_KEY
from readmission.serving.decisions import DocumentSource, PolledDocument, refresh_document

REALIZED_METRICS = ("f1_weighted", "f1_macro", "roc_auc_ovr", "accuracy", "brier", "recall_lt30")
_LABELS = ("model_version", "period")


class RealizedGauges(Collector):
    """`refresh()` in the poll thread; `collect()` at scrape time (reads one reference)."""

    def __init__(self, source: DocumentSource, key: str = REALIZED_LATEST_KEY) -> None:
        self.source = source
        self._latest = PolledDocument(key)

    @property
    def document(self) -> dict[str, Any] | None:
        return self._latest.value

    def refresh(self) -> None:
        """Re-read the document if it changed. Never raises (readmission.serving.decisions'
        rule for every polled document)."""
        refresh_document(self.source, self._latest)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        document = self.document
        if document is None:
            return
        families = {
            name: GaugeMetricFamily(
                f"readmission_realized_{name}", f"Realized {name} on outcomes.", labels=_LABELS
            )
            for name in (*REALIZED_METRICS, "matched")
        }
        deltas = {
            name: GaugeMetricFamily(
                f"readmission_realized_minus_offline_{name}",
                f"Realized minus offline test {name}.",
                labels=_LABELS,
            )
            for name in REALIZED_METRICS
        }
        groups = document.get("groups")
        for group in groups if isinstance(groups, list) else []:
            if not isinstance(group, dict):
                continue
            labels = [str(group.get("model_version")), str(group.get("period"))]
            metrics = group.get("metrics") or {}
            differences = group.get("realized_minus_offline") or {}
            for name, family in families.items():
                value = metrics.get(name)
                if isinstance(value, int | float):
                    family.add_metric(labels, float(value))
            for name, family in deltas.items():
                value = differences.get(name)
                if isinstance(value, int | float):
                    family.add_metric(labels, float(value))
        yield from families.values()
        yield from deltas.values()
        unmatched = document.get("unmatched")
        if isinstance(unmatched, int):
            family = GaugeMetricFamily(
                "readmission_realized_unmatched",
                "Outcome rows of the latest outcomes file that matched no logged prediction.",
            )
            family.add_metric([], float(unmatched))
            yield family
