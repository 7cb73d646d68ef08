"""Compaction of the prediction log: a finished day's many small Parquet objects become one.

Why. A predict server ships a log object every PREDICTION_LOG_SECONDS in which it answered a
request, so a trickle of traffic leaves up to 2,880 objects a day per server process, and the
outcomes join reads them all (docs/monitoring.md, Limits). Compacting each finished day keeps
what a join reads to about one object per (model version, day).

Layout. The log's objects are `<version>/<day>/<writer>-<n>.parquet` (the parts,
readmission.serving.prediction_log). Compacting one (version, day) writes

    <version>/<day>/compacted-<digest>.parquet   every row of the parts, as they were
    <version>/<day>/compacted.json               {"parquet", "parts", "rows"}: written last,
                                                 only if absent (the first compaction wins)

and then deletes the parts it lists. `<digest>` is sha256 of the sorted part keys [:16], so a
repeated compaction of the same parts writes the same object.

Contract for readers (`objects_to_read`): a day with `compacted.json` is its named Parquet
plus any part it does not list (a part shipped after the compaction: a restarted server's
leftover spool); a day without it is its parts; a `compacted-*.parquet` no document names (a
compaction that crashed before its document, or lost the race) is never read. So a crash at
any point leaves every row readable exactly once, and a re-run finishes the work: it deletes
listed parts still present and unnamed compacted objects.

Which days. Only days that ended at least `settle_days` (1) before `today` (UTC): a server
ships within PREDICTION_LOG_SECONDS, so a finished day gets no more parts but in rare cases.
A day whose parts exceed MAX_DAY_BYTES is left as it is (its parts are large already), and so
is a day with a part that cannot be merged (no Parquet, other columns): it is logged and
counted, the other days go on, and readers read its parts as before. The merge holds at most
FETCH_PARTS parts and ROW_GROUP_ROWS rows decoded at a time.
`compact_log` compacts one day at least and starts no other once `budget_seconds` have passed:
the next call continues (the outcomes function compacts before each join).

Plain Python over ObjectStore and pyarrow.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from readmission.storage import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

DOCUMENT_NAME = "compacted.json"
_COMPACTED_PREFIX = "compacted-"
# A day whose parts hold more is left as it is: its merged object is held in memory before its
# PUT, and a day that busy ships parts of PREDICTION_LOG_ROWS rows, not a trickle of small ones.
MAX_DAY_BYTES = 256 * 1024 * 1024
# The merge reads parts FETCH_PARTS at a time and writes a row group per ROW_GROUP_ROWS rows, so
# the rows it holds decoded are bounded whatever the day's size.
FETCH_PARTS = 64
ROW_GROUP_ROWS = 50_000
_DAY = re.compile(r"^(?P<group>[^/]+/(?P<day>\d{4}-\d{2}-\d{2}))/(?P<name>[^/]+)$")


@dataclass
class LogDay:
    """The objects of one (version, day) of the log, as listed."""

    prefix: str  # "<version>/<day>"
    day: dt.date
    parts: list[str] = field(default_factory=list)  # shipped by servers, sorted
    compacted: list[str] = field(default_factory=list)  # compacted-*.parquet objects
    has_document: bool = False
    part_bytes: int = 0  # the parts' sizes

    @property
    def document_key(self) -> str:
        return f"{self.prefix}/{DOCUMENT_NAME}"


def list_days(objects: Iterable[ObjectInfo]) -> list[LogDay]:
    """The log's listed objects grouped by (version, day); keys of another shape are left
    out."""
    days: dict[str, LogDay] = {}
    for info in sorted(objects, key=lambda info: info.key):
        key = info.key
        match = _DAY.match(key)
        if match is None:
            continue
        try:
            day = dt.date.fromisoformat(match["day"])
        except ValueError:
            continue
        entry = days.setdefault(match["group"], LogDay(match["group"], day))
        name = match["name"]
        if name == DOCUMENT_NAME:
            entry.has_document = True
        elif name.startswith(_COMPACTED_PREFIX) and name.endswith(".parquet"):
            entry.compacted.append(key)
        elif name.endswith(".parquet"):
            entry.parts.append(key)
            entry.part_bytes += info.size
    return list(days.values())


def _document(store: ObjectStore, bucket: str, day: LogDay) -> dict | None:
    return store.get_json_if_exists(bucket, day.document_key) if day.has_document else None


def objects_to_read(store: ObjectStore, bucket: str, day: LogDay) -> list[str]:
    """The keys holding every row of the day exactly once (the module docstring's contract)."""
    document = _document(store, bucket, day)
    if document is None:
        return list(day.parts)
    listed = set(document["parts"])
    return [document["parquet"], *(part for part in day.parts if part not in listed)]


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()[:16]


def _merged(store: ObjectStore, bucket: str, parts: list[str]) -> tuple[bytes, int] | None:
    """One Parquet of the parts' rows, in part order; None if a part has gone. ValueError (or
    an Arrow error) if a part is no Parquet or its columns differ from the first part's."""
    sink = io.BytesIO()
    writer: pq.ParquetWriter | None = None
    pending: list[pa.Table] = []
    pending_rows = rows = 0

    def write(tables: list[pa.Table]) -> None:
        nonlocal writer
        table = pa.concat_tables(tables, promote_options="default")
        if writer is None:
            writer = pq.ParquetWriter(sink, table.schema, compression="zstd")
        writer.write_table(table.cast(writer.schema), row_group_size=ROW_GROUP_ROWS)

    for start in range(0, len(parts), FETCH_PARTS):
        found = store.get_many(bucket, parts[start : start + FETCH_PARTS])
        if any(data is None for data in found):
            return None
        tables = [pq.read_table(io.BytesIO(data)) for data in found if data is not None]
        pending += tables
        pending_rows += sum(table.num_rows for table in tables)
        rows += sum(table.num_rows for table in tables)
        if pending_rows >= ROW_GROUP_ROWS:
            write(pending)
            pending, pending_rows = [], 0
    if pending:
        write(pending)
    if writer is not None:
        writer.close()
    return sink.getvalue(), rows


@dataclass
class CompactionReport:
    days: int = 0  # days compacted by this call
    parts: int = 0  # parts merged into them
    deleted: int = 0  # deletes sent (merged parts, unnamed compacted objects; maybe gone)
    left: int = 0  # finished days left uncompacted (budget spent)
    refused: list[str] = field(default_factory=list)  # days whose parts could not be merged

    def summary(self) -> str:
        return (
            f"{self.days} day(s) compacted from {self.parts} part(s), {self.deleted} object(s)"
            f" deleted, {self.left} day(s) left"
            + (f", {len(self.refused)} refused: {self.refused[0]}" if self.refused else "")
        )


def compact_day(store: ObjectStore, bucket: str, day: LogDay, report: CompactionReport) -> None:
    """Compact one listed (version, day), or finish a compaction a crash cut short."""
    document = _document(store, bucket, day)
    if document is None and len(day.parts) > 1:
        try:
            merged = _merged(store, bucket, day.parts)
        except (ValueError, pa.ArrowException) as exc:  # a part no reader can merge: left as is
            log.error("prediction log %s/%s/ not compacted: %s", bucket, day.prefix, exc)
            report.refused.append(f"{day.prefix}: {exc}")
            return
        if merged is None:  # another compaction deleted a part: it has written its document
            document = store.get_json_if_exists(bucket, day.document_key)
        else:
            data, rows = merged
            parquet = f"{day.prefix}/{_COMPACTED_PREFIX}{_digest(day.parts)}.parquet"
            store.put_bytes(bucket, parquet, data)
            mine = {"parquet": parquet, "parts": day.parts, "rows": rows}
            body = json.dumps(mine, indent=1).encode()
            if store.put_if_absent(bucket, day.document_key, body, "application/json"):
                document = mine
                report.days += 1
                report.parts += len(day.parts)
            else:  # another compaction won: its document decides
                document = store.get_json_if_exists(bucket, day.document_key)
    if document is None:
        return
    listed = set(document["parts"])
    stale = [key for key in day.parts if key in listed]
    stale += [key for key in day.compacted if key != document["parquet"]]
    store.delete_keys(bucket, stale)
    report.deleted += len(stale)


def _needs_work(day: LogDay) -> bool:
    if not day.has_document:
        return len(day.parts) > 1 and day.part_bytes <= MAX_DAY_BYTES
    return bool(day.parts) or len(day.compacted) > 1  # listed parts or orphans may be left


def compact_log(
    store: ObjectStore,
    bucket: str,
    today: dt.date | None = None,
    *,
    settle_days: int = 1,
    budget_seconds: float = 120.0,
) -> CompactionReport:
    """Compact every finished (version, day) of the log that needs it, oldest first, until
    `budget_seconds` have passed (see the module docstring)."""
    today = today or dt.datetime.now(dt.UTC).date()
    last = today - dt.timedelta(days=settle_days + 1)
    report = CompactionReport()
    started = time.monotonic()
    todo = sorted(
        (d for d in list_days(store.list(bucket)) if d.day <= last and _needs_work(d)),
        key=lambda d: (d.day, d.prefix),
    )
    for index, day in enumerate(todo):
        if index and time.monotonic() - started > budget_seconds:  # one day at least
            report.left = len(todo) - index
            break
        compact_day(store, bucket, day, report)
    if report.days or report.deleted:
        log.info("prediction log %s: %s", bucket, report.summary())
    return report
