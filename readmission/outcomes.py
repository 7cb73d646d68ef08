"""Outcomes close the loop: realized metrics of the served models from true outcomes.

Contract. `process_outcomes(store, settings, bucket, key)` reads one outcomes CSV dropped into
the outcomes bucket (a header with `readmitted` and `request_id` and/or `encounter_id`; one
row per encounter whose outcome is now known), joins it with the prediction log (every row
of the predictions-log bucket, readmission.serving.prediction_log, read once each as
readmission.log_compaction says; finished days are compacted first, within
COMPACTION_BUDGET_SECONDS) and writes
the realized metrics document to

    <models bucket>/monitoring/realized/<content id of the CSV>.json   (written once)
    <models bucket>/monitoring/realized/latest.json                    (then: the newest)

The first key is deterministic (the CSV's bytes), so a redelivered event finds it and writes
nothing new (only `latest.json` if a crash came between the two PUTs). A CSV that breaks these
rules raises OutcomesError (the handler answers 400: no retry can fix it) and writes nothing.

Bad input is reported, never silently dropped, and never touches what earlier files wrote:
a label outside NO/>30/<30, or a row without any id, refuses the whole file (OutcomesError
naming the CSV lines); rows whose id matches no logged prediction are counted (`unmatched`)
and named (`problems.unmatched_ids`, `problems.unmatched_lines`); a row repeating an id with
the same outcome counts once, and every row of an id given two different outcomes is left out
(`problems.duplicate_*`, `problems.conflicting_*`). Each list names at most REPORTED ids or
lines; the counts are complete. A file that matches no prediction at all gets its document
but leaves `latest.json` (the exported gauges) as it was.

Join. An outcome row with a `request_id` matches the logged row of that request when the
request predicted one row (a batch request is matched by `encounter_id`); otherwise its
`encounter_id` matches the logged rows that carried it. A key predicted more than once by one
model version counts once (its latest prediction). Outcome rows that match nothing are counted
as unmatched (not yet logged, or never predicted).

Metrics, per model version and period (the UTC month of the prediction, "YYYY-MM"): the
figures of readmission.scoring.score (F1 weighted and macro, ROC-AUC one-vs-rest weighted,
accuracy, ...) on the logged probabilities, the multi-class Brier score (mean over rows of the
squared distance between the probability vector and the one-hot outcome), the recall of `<30`
(None without a `<30` outcome) and the matched count; beside them, the version's offline test
metrics (from its metadata in the models bucket) and realized minus offline.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from readmission.config import Settings
from readmission.keys import (
    CHAMPION_METADATA_KEY,
    REALIZED_LATEST_KEY,
    REALIZED_PREFIX,
    content_id,
)
from readmission.log_compaction import LogDay, compact_log, list_days, objects_to_read
from readmission.scoring import score
from readmission.storage import ObjectStore, json_bytes

log = logging.getLogger(__name__)

LATE_CLASS = "<30"
LABELS = ("<30", ">30", "NO")
PROBABILITY_PREFIX = "probability_"
# the prediction log's columns the join and the metrics read, beside the PROBABILITY_PREFIX ones
LOG_COLUMNS = ("request_id", "row", "time", "model_version", "encounter_id")
REPORTED = 20  # offending ids or lines named in a report (the counts are always complete)
DAY_READ_ATTEMPTS = 3  # listings of one log day while compactions delete its parts
# seconds the join may spend compacting finished days of the log first (readmission.log_compaction)
COMPACTION_BUDGET_SECONDS = 120.0
_VERSION_METADATA = re.compile(r"^[0-9a-f]{16}/metadata\.json$")


class OutcomesError(ValueError):
    """An outcomes file no retry can fix."""


def realized_key(csv_bytes: bytes) -> str:
    return f"{REALIZED_PREFIX}{content_id(csv_bytes)}.json"


def parse_outcomes(data: bytes) -> pd.DataFrame:
    """(request_id, encounter_id, readmitted) as strings (None where absent), or OutcomesError."""
    try:
        frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OutcomesError(f"not a CSV: {exc}") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    if "readmitted" not in frame.columns:
        raise OutcomesError("the CSV has no 'readmitted' column")
    if not {"request_id", "encounter_id"} & set(frame.columns):
        raise OutcomesError("the CSV needs a 'request_id' or an 'encounter_id' column")
    out = pd.DataFrame(index=frame.index)
    for column in ("request_id", "encounter_id"):
        values = frame[column].str.strip() if column in frame.columns else None
        out[column] = None if values is None else values.where(values != "", None)
    out["readmitted"] = frame["readmitted"].str.strip()
    out["line"] = out.index + 2  # the CSV line (the header is line 1)
    bad = out[~out["readmitted"].isin(LABELS)]
    if len(bad):
        shown = ", ".join(
            f"line {line}: {value!r}"
            for line, value in zip(
                bad["line"][:REPORTED], bad["readmitted"][:REPORTED], strict=True
            )
        )
        raise OutcomesError(
            f"readmitted must be one of {LABELS}: {len(bad)} rows are not ({shown})"
        )
    neither = out.loc[out["request_id"].isna() & out["encounter_id"].isna(), "line"]
    if len(neither):
        lines = ", ".join(str(line) for line in neither[:REPORTED])
        raise OutcomesError(
            f"{len(neither)} rows have neither a request_id nor an encounter_id (lines {lines})"
        )
    return out


def outcome_key(outcomes: pd.DataFrame) -> pd.Series:
    """The id an outcome row is about: its request_id, else its encounter_id."""
    return outcomes["request_id"].fillna("encounter:" + outcomes["encounter_id"].fillna(""))


def drop_duplicates(outcomes: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The outcome rows with one row per id, and the report of the rows left out.

    A row repeating an earlier row's id and outcome is left out (the id counts once); every row
    of an id given two different outcomes is left out (neither can be trusted)."""
    keys = outcome_key(outcomes)
    repeated = keys.duplicated(keep="first")
    labels_per_key = outcomes.groupby(keys)["readmitted"].nunique()
    conflicting = keys.isin(labels_per_key.index[labels_per_key > 1])
    left_out = repeated | conflicting
    report = {
        "duplicate_rows": int((repeated & ~conflicting).sum()),
        "duplicate_ids": _sample(keys[repeated & ~conflicting].drop_duplicates()),
        "conflicting_rows": int(conflicting.sum()),
        "conflicting_ids": _sample(keys[conflicting].drop_duplicates()),
    }
    return outcomes[~left_out], report


def _sample(values: pd.Series) -> list[str]:
    return [str(v) for v in values[:REPORTED]]


def _joined_columns(data: bytes) -> pa.Table:
    """The columns of one log batch the join and the metrics use (LOG_COLUMNS and the
    `probability_*` ones): never the rows' `features`, the bulk of a batch."""
    batch = pq.ParquetFile(io.BytesIO(data))
    names = batch.schema_arrow.names
    return batch.read(
        columns=[n for n in names if n in LOG_COLUMNS or n.startswith(PROBABILITY_PREFIX)]
    )


def _read_day(store: ObjectStore, bucket: str, day: LogDay) -> list[pa.Table]:
    """The tables of one (version, day) of the log, each row once (log_compaction's contract).
    A part deleted after the listing was compacted meanwhile: the day is listed again."""
    for _ in range(DAY_READ_ATTEMPTS):
        found = store.get_many(bucket, objects_to_read(store, bucket, day))
        if all(data is not None for data in found):
            return [_joined_columns(data) for data in found if data is not None]
        relisted = list_days(store.list(bucket, day.prefix + "/"))
        if not relisted:
            return []
        day = relisted[0]
    raise RuntimeError(f"the prediction log's {day.prefix}/ kept changing while it was read")


def read_log(store: ObjectStore, bucket: str) -> pd.DataFrame:
    """Every logged prediction (one row per predicted row) with the columns the join uses
    (`_joined_columns`), or an empty frame."""
    tables = [
        table for day in list_days(store.list(bucket)) for table in _read_day(store, bucket, day)
    ]
    if not tables:
        return pd.DataFrame(columns=list(LOG_COLUMNS))
    return pa.concat_tables(tables, promote_options="default").to_pandas()


def _matched(log_frame: pd.DataFrame, outcomes: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Logged rows joined with their outcome (column `readmitted`), and the unmatched rows."""
    batches = set(log_frame.loc[log_frame["row"] > 0, "request_id"])
    single = log_frame[~log_frame["request_id"].isin(batches)]  # single-row requests
    outcomes = outcomes.reset_index(drop=True).rename_axis("outcome").reset_index()
    by_request = outcomes.dropna(subset=["request_id"]).merge(
        single.drop(columns=["encounter_id"]), on="request_id"
    )
    rest = outcomes[~outcomes["outcome"].isin(by_request["outcome"])]
    by_encounter = rest.dropna(subset=["encounter_id"]).merge(
        log_frame.dropna(subset=["encounter_id"]).drop(columns=["request_id"]), on="encounter_id"
    )
    joined = pd.concat([by_request, by_encounter], ignore_index=True)
    # a key predicted more than once by one version: its latest prediction
    joined = joined.sort_values("time", kind="stable").drop_duplicates(
        ["outcome", "model_version"], keep="last"
    )
    unmatched = outcomes[~outcomes["outcome"].isin(joined["outcome"])]
    return joined, unmatched


def group_metrics(probabilities: np.ndarray, classes: list[str], y_true: np.ndarray) -> dict:
    """The realized figures of one group (see the module docstring)."""
    metrics: dict[str, Any] = dict(score(probabilities, np.asarray(classes), y_true))
    onehot = (np.asarray(classes)[None, :] == y_true[:, None]).astype(float)
    metrics["brier"] = float(np.mean(np.sum((probabilities - onehot) ** 2, axis=1)))
    late = y_true == LATE_CLASS
    predicted = np.asarray(classes)[np.argmax(probabilities, axis=1)]
    metrics["recall_lt30"] = float(np.mean(predicted[late] == LATE_CLASS)) if late.any() else None
    metrics["matched"] = len(y_true)
    return metrics


def _period(millis: pd.Series) -> pd.Series:
    times = pd.to_datetime(millis, utc=True)
    return times.dt.strftime("%Y-%m")


@dataclass(frozen=True)
class Realized:
    key: str
    document: dict[str, Any]
    written: bool


def realized_document(
    log_frame: pd.DataFrame, outcomes: pd.DataFrame, offline: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    outcome_rows = len(outcomes)
    outcomes, duplicates = drop_duplicates(outcomes)
    joined, unmatched = _matched(log_frame, outcomes)
    groups = []
    if len(joined):
        joined["period"] = _period(joined["time"])
        for (version, period), group in joined.groupby(["model_version", "period"], sort=True):
            columns = [c for c in group.columns if c.startswith(PROBABILITY_PREFIX)]
            columns = [c for c in columns if group[c].notna().all()]
            classes = [c[len(PROBABILITY_PREFIX) :] for c in columns]
            metrics = group_metrics(
                group[columns].to_numpy(dtype=float), classes, group["readmitted"].to_numpy()
            )
            test = offline.get(str(version), {})
            groups.append(
                {
                    "model_version": str(version),
                    "period": period,
                    "metrics": metrics,
                    "offline_test": test or None,
                    "realized_minus_offline": {
                        name: metrics[name] - test[name]
                        for name in metrics
                        if isinstance(test.get(name), int | float)
                        and isinstance(metrics[name], float)
                    },
                }
            )
    return {
        "outcome_rows": outcome_rows,
        "matched": int(joined["outcome"].nunique()) if len(joined) else 0,
        "unmatched": len(unmatched),
        "groups": groups,
        "problems": {
            "unmatched_ids": _sample(outcome_key(unmatched)),
            "unmatched_lines": [int(line) for line in unmatched["line"][:REPORTED]],
            **duplicates,
        },
    }


def offline_test_metrics(store: ObjectStore, models_bucket: str) -> dict[str, dict[str, Any]]:
    """Model version -> its metrics on the test split, from every version's metadata."""
    found: dict[str, dict[str, Any]] = {}
    keys = [k for k in store.list_keys(models_bucket) if _VERSION_METADATA.match(k)]
    for key in [*keys, CHAMPION_METADATA_KEY]:
        metadata = store.get_json_if_exists(models_bucket, key)
        if isinstance(metadata, dict) and metadata.get("version") is not None:
            test = (metadata.get("metrics") or {}).get("test")
            if isinstance(test, dict):
                found[str(metadata["version"])] = test
    return found


def process_outcomes(store: ObjectStore, settings: Settings, bucket: str, key: str) -> Realized:
    """The realized metrics of one outcomes CSV, written once (see the module docstring)."""
    data = store.get_bytes_if_exists(bucket, key)
    if data is None:
        raise OutcomesError("the outcomes object no longer exists")
    target = realized_key(data)
    models = settings.buckets.models
    existing = store.get_json_if_exists(models, target)
    if existing is not None:  # a redelivery: done before; make sure `latest` was written too
        if existing.get("groups") and not store.exists(models, REALIZED_LATEST_KEY):
            store.put_bytes(models, REALIZED_LATEST_KEY, json_bytes(existing), "application/json")
        return Realized(target, existing, written=False)
    outcomes = parse_outcomes(data)
    compact_log(store, settings.buckets.predictions_log, budget_seconds=COMPACTION_BUDGET_SECONDS)
    log_frame = read_log(store, settings.buckets.predictions_log)
    document = {
        "source": f"s3://{bucket}/{key}",
        "computed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **realized_document(log_frame, outcomes, offline_test_metrics(store, models)),
    }
    body = json_bytes(document)
    written = store.put_if_absent(models, target, body, "application/json")
    if document["groups"]:  # last; a file that matched nothing leaves the gauges as they were
        store.put_bytes(models, REALIZED_LATEST_KEY, body, "application/json")
    return Realized(target, document, written)
