"""The champion/challenger gate as the predict function shows it: the pending challenger and
the last promotion decision.

The aggregator (and the operator's promote/rollback) writes, beside `champion/metadata.json`
in the models bucket, `challenger/metadata.json` (the latest registered model that was not
promoted, same schema as the champion's metadata; absent when none is pending) and
`champion/last-decision.json` (the last decision document). `/model-info` and the web page
show both. They are informational: reading them never blocks or fails serving, and never
touches the champion's readiness. The model server's poll thread refreshes them
(`ModelServer.on_poll`: once when the thread starts, then after each champion poll) with a
conditional GET each (304 while the ETag is unchanged), so a request costs no store read.

A missing object is null; one that is not a JSON object is null with a warning (once per
version of the object); a failing read (store down) keeps what was last read, with a warning.
With local files (MODEL_PATH) they are `challenger.json` and `last-decision.json` next to the
metadata file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from readmission.keys import CHALLENGER_METADATA_KEY, LAST_DECISION_KEY
from readmission.serving.s3 import S3Object
from readmission.serving.sources import LocalModelSource

log = logging.getLogger(__name__)

LOCAL_CHALLENGER_FILE = "challenger.json"
LOCAL_DECISION_FILE = "last-decision.json"

# the decision document's fields shown by /model-info (null when the document lacks one)
DECISION_FIELDS = (
    "kind",
    "sequence",
    "verdict",
    "reason",
    "decided_at",
    "key",
    "corpus_version",
    "rule",
    "challenger",
    "champion",
    "difference",
    "interval",
    "rows",
    "champion_after",
)


class DocumentSource(Protocol):
    description: str

    def document(self, key: str, token: str | None = None) -> S3Object | None:
        """The object (None if missing); `not_modified` while its version is still `token`."""


def challenger_summary(metadata: Mapping[str, Any], metric: str | None = None) -> dict[str, Any]:
    """What /model-info shows of a challenger's metadata. `test_score` is its test score of
    its `selection_metric` (else of `metric`, the gate's rule metric)."""
    metric = metadata.get("selection_metric") or metric
    metrics = metadata.get("metrics")
    test = metrics.get("test") if isinstance(metrics, dict) else None
    score = test.get(metric) if isinstance(test, dict) and isinstance(metric, str) else None
    return {
        "name": metadata.get("model_name"),
        "version": metadata.get("version"),
        "algorithm": metadata.get("algorithm"),
        "training_rows": metadata.get("training_rows"),
        "dataset_id": metadata.get("dataset_id"),
        "corpus_version": metadata.get("corpus_version") or metadata.get("dataset_id"),
        "run_id": metadata.get("run_id"),
        "registered_at": metadata.get("registered_at"),
        "selection_metric": metric,
        "test_score": score if type(score) in (int, float) else None,
        "metrics": metrics if isinstance(metrics, dict) else {},
    }


def decision_summary(document: Mapping[str, Any]) -> dict[str, Any]:
    """What /model-info shows of a decision document: DECISION_FIELDS, null when absent."""
    return {name: document.get(name) for name in DECISION_FIELDS}


@dataclass
class PolledDocument:
    """A JSON object of the models bucket as the poll thread last read it."""

    key: str
    token: str | None = None  # the version last read (ETag, or mtime-size locally)
    value: dict[str, Any] | None = None  # the parsed object; None: missing or unreadable


class GateDocuments:
    """The challenger and the last decision as last read; `refresh()` runs in the poll thread
    only, `info()` in any request thread (it reads two references)."""

    def __init__(self, source: DocumentSource, challenger_key: str, decision_key: str) -> None:
        self.source = source
        self._challenger = PolledDocument(challenger_key)
        self._decision = PolledDocument(decision_key)

    @classmethod
    def for_source(cls, source: Any) -> GateDocuments:
        if isinstance(source, LocalModelSource):
            return cls(source, LOCAL_CHALLENGER_FILE, LOCAL_DECISION_FILE)
        return cls(source, CHALLENGER_METADATA_KEY, LAST_DECISION_KEY)

    def refresh(self) -> None:
        """Re-read both documents if they changed (one conditional read each). Never raises."""
        for document in (self._challenger, self._decision):
            self._refresh(document)

    def _refresh(self, document: PolledDocument) -> None:
        refresh_document(self.source, document)

    def info(self) -> dict[str, Any]:
        """`challenger` and `last_decision` for /model-info: objects, or None."""
        decision = self._decision.value
        challenger = self._challenger.value
        rule = decision.get("rule") if decision is not None else None
        metric = rule.get("metric") if isinstance(rule, dict) else None
        return {
            "challenger": None if challenger is None else challenger_summary(challenger, metric),
            "last_decision": None if decision is None else decision_summary(decision),
        }


def refresh_document(source: DocumentSource, document: PolledDocument) -> None:
    """Re-read `document` if it changed (one conditional read); never raises: a failing read
    keeps what was last read (with a warning), a missing object is None."""
    try:
        found = source.document(document.key, document.token)
    except Exception as exc:
        log.warning("cannot read %s (keeping the last one read): %s", document.key, exc)
        return
    if found is None:
        document.token, document.value = None, None
        return
    if found.not_modified:
        return
    document.value = _parse_object(found.data, document.key)
    document.token = found.etag


def _parse_object(data: bytes, key: str) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except ValueError as exc:  # UnicodeDecodeError included
        log.warning("%s is not valid JSON, shown as null: %s", key, exc)
        return None
    if not isinstance(value, dict):
        log.warning("%s is not a JSON object, shown as null", key)
        return None
    return value
