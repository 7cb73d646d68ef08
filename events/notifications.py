"""Bucket notifications -> pipeline CloudEvents (pure functions, no I/O).

Two notification bodies are understood (see events/README.md for real examples):

* MinIO / S3 webhook: ``{"EventName": ..., "Key": ..., "Records": [{"eventName":
  "s3:ObjectCreated:Put", "s3": {"bucket": {"name": ...}, "object": {"key": <URL-encoded>,
  "size", "eTag", "sequencer"}}, "eventTime": ...}]}``
* SeaweedFS filer webhook: ``{"event_type": "create"|"update"|"delete"|"rename", "key":
  "/buckets/<bucket>/<key>", "message": {"old_entry", "new_entry", "new_parent_path", ...}}``

The event type follows from bucket and key alone (docs/design.md); every other object,
directory, delete or multipart temporary produces no event. Ids are deterministic: the same
object version (bucket, key, etag or sequencer) always gets the same id.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_plus

from readmission.config import Buckets
from readmission.keys import (
    CHAMPION_METADATA_KEY,
    DECISIONS_PREFIX,
    DRIFT_ALERT_NAME,
    PREDICTIONS_PREFIX,
    REPORTS_PREFIX,
)

RAW_CREATED = "io.readmission.raw.created"
JOB_CREATED = "io.readmission.job.created"
RESULT_CREATED = "io.readmission.result.created"
MODEL_CREATED = "io.readmission.model.created"
DECISION_MADE = "io.readmission.decision.made"
SCORING_CREATED = "io.readmission.scoring.created"
OUTCOMES_CREATED = "io.readmission.outcomes.created"
DRIFT_DETECTED = "io.readmission.drift.detected"
EVENT_TYPES = (
    RAW_CREATED,
    JOB_CREATED,
    RESULT_CREATED,
    MODEL_CREATED,
    DECISION_MADE,
    SCORING_CREATED,
    OUTCOMES_CREATED,
    DRIFT_DETECTED,
)

SEAWEEDFS_BUCKETS_ROOT = "/buckets"
SEAWEEDFS_ETAG_ATTRIBUTE = "Seaweed-X-Amz-ETag"
_SEAWEEDFS_OBJECT_EVENTS = {"create", "update", "rename"}
# Folders SeaweedFS's S3 gateway keeps inside a bucket: multipart parts and object versions.
_SEAWEEDFS_TEMPORARY_FOLDERS = (".uploads", ".versions")


class UnknownNotification(ValueError):
    """The body is neither a MinIO/S3 nor a SeaweedFS filer notification."""


@dataclass(frozen=True)
class ObjectVersion:
    """What a notification says about one object version, whatever the notifier."""

    bucket: str
    key: str
    size: int
    etag: str
    sequencer: str
    origin: str
    time: str | None = None


@dataclass(frozen=True)
class PipelineEvent:
    """A CloudEvent as plain data: ``attributes`` (context attributes) and JSON ``data``."""

    attributes: dict[str, str]
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.attributes["id"]

    @property
    def type(self) -> str:
        return self.attributes["type"]


def event_type_for(bucket: str, key: str, buckets: Buckets) -> str | None:
    """The pipeline event type of an object, or None if the object fires no event."""
    if bucket == buckets.raw and key.lower().endswith(".csv"):
        return RAW_CREATED
    if bucket == buckets.jobs and key.endswith(".json"):
        return JOB_CREATED
    if bucket == buckets.results and key.endswith(".json"):
        return RESULT_CREATED
    if bucket == buckets.models and key == CHAMPION_METADATA_KEY:
        return MODEL_CREATED
    if bucket == buckets.models and key.startswith(DECISIONS_PREFIX) and key.endswith(".json"):
        return DECISION_MADE
    if (
        bucket == buckets.models
        and key.startswith(REPORTS_PREFIX)
        and key.endswith("/" + DRIFT_ALERT_NAME)
    ):
        return DRIFT_DETECTED
    if bucket == buckets.scoring and not key.startswith(PREDICTIONS_PREFIX):
        return SCORING_CREATED  # any file: one that is not a table is rejected with a report
    if bucket == buckets.outcomes and key.lower().endswith(".csv"):
        return OUTCOMES_CREATED
    return None


def event_id(bucket: str, key: str, version: str) -> str:
    """First 32 hex chars of sha256("<bucket>/<key>/<etag or sequencer>")."""
    return hashlib.sha256(f"{bucket}/{key}/{version}".encode()).hexdigest()[:32]


def to_event(obj: ObjectVersion, buckets: Buckets) -> PipelineEvent | None:
    event_type = event_type_for(obj.bucket, obj.key, buckets)
    if event_type is None:
        return None
    attributes = {
        "specversion": "1.0",
        "id": event_id(obj.bucket, obj.key, obj.etag or obj.sequencer),
        "type": event_type,
        "source": f"s3://{obj.bucket}",
        "subject": obj.key,
        "datacontenttype": "application/json",
        "bucket": obj.bucket,
        "etag": obj.etag,
    }
    if obj.time:
        attributes["time"] = obj.time
    data = {
        "bucket": obj.bucket,
        "key": obj.key,
        "size": obj.size,
        "etag": obj.etag,
        "origin": obj.origin,
    }
    return PipelineEvent(attributes, data)


def to_events(objects: list[ObjectVersion], buckets: Buckets) -> list[PipelineEvent]:
    events = [to_event(obj, buckets) for obj in objects]
    return [event for event in events if event is not None]


# --- MinIO / S3 -------------------------------------------------------------------------------


def is_minio(body: Any) -> bool:
    return isinstance(body, Mapping) and isinstance(body.get("Records"), list)


def is_s3_test_event(body: Any) -> bool:
    """S3's ``s3:TestEvent`` sent when a notification is configured (answer 200, no event)."""
    return isinstance(body, Mapping) and body.get("Event") == "s3:TestEvent"


def minio_objects(body: Mapping[str, Any]) -> list[ObjectVersion]:
    """The created objects of a MinIO/S3 notification (other event names are skipped)."""
    objects = []
    for record in body.get("Records") or []:
        if not isinstance(record, Mapping):
            raise UnknownNotification("a Records[] entry is not an object")
        if not str(record.get("eventName", "")).startswith("s3:ObjectCreated:"):
            continue
        s3 = record.get("s3")
        if not isinstance(s3, Mapping):
            raise UnknownNotification("a Records[] entry has no s3 object")
        bucket = (s3.get("bucket") or {}).get("name")
        obj = s3.get("object") or {}
        key = obj.get("key")
        if not isinstance(bucket, str) or not isinstance(key, str) or not key:
            raise UnknownNotification("a Records[] entry names no bucket or key")
        objects.append(
            ObjectVersion(
                bucket=bucket,
                key=unquote_plus(key),  # S3 and MinIO form-encode keys (space -> "+")
                size=_int(obj.get("size")),
                etag=str(obj.get("eTag") or obj.get("etag") or "").strip('"'),
                sequencer=str(obj.get("sequencer") or ""),
                origin="minio",
                time=record.get("eventTime") or None,
            )
        )
    return objects


# --- SeaweedFS filer ----------------------------------------------------------------------------


def is_seaweedfs(body: Any) -> bool:
    return (
        isinstance(body, Mapping)
        and isinstance(body.get("event_type"), str)
        and isinstance(body.get("key"), str)
        and isinstance(body.get("message"), Mapping)
    )


def seaweedfs_objects(
    body: Mapping[str, Any], buckets_root: str = SEAWEEDFS_BUCKETS_ROOT
) -> list[ObjectVersion]:
    """The object a filer notification created or overwrote, if it is an S3 object."""
    if body.get("event_type") not in _SEAWEEDFS_OBJECT_EVENTS:
        return []
    message = body["message"]
    entry = message.get("new_entry")
    if not isinstance(entry, Mapping) or entry.get("is_directory"):
        return []
    parent = message.get("new_parent_path")
    path = f"{parent.rstrip('/')}/{entry.get('name', '')}" if parent else body["key"]
    located = _bucket_and_key(path, buckets_root)
    if located is None:
        return []
    bucket, key = located
    attributes = entry.get("attributes") or {}
    return [
        ObjectVersion(
            bucket=bucket,
            key=key,
            size=_int(attributes.get("file_size")),
            etag=_seaweedfs_etag(entry),
            sequencer=_seaweedfs_sequencer(entry),
            origin="seaweedfs",
            time=_unix_time(attributes.get("mtime")),
        )
    ]


def _bucket_and_key(path: str, buckets_root: str) -> tuple[str, str] | None:
    prefix = buckets_root.rstrip("/") + "/"
    if not path.startswith(prefix):
        return None
    bucket, _, key = path[len(prefix) :].partition("/")
    if not bucket or not key or bucket.startswith(".") or key.endswith("/"):
        return None
    segments = key.split("/")
    if segments[0] in _SEAWEEDFS_TEMPORARY_FOLDERS or any(
        segment.endswith(".versions") for segment in segments[:-1]
    ):
        return None
    return bucket, key


def _seaweedfs_etag(entry: Mapping[str, Any]) -> str:
    """The S3 ETag: the gateway's extended attribute, else the content MD5 in hex."""
    extended = entry.get("extended") or {}
    stored = extended.get(SEAWEEDFS_ETAG_ATTRIBUTE)
    if isinstance(stored, str) and stored:
        try:
            return base64.b64decode(stored, validate=True).decode().strip('"')
        except (binascii.Error, UnicodeDecodeError):
            pass
    md5 = (entry.get("attributes") or {}).get("md5")
    if isinstance(md5, str) and md5:
        try:
            return base64.b64decode(md5, validate=True).hex()
        except binascii.Error:
            pass
    return ""


def _seaweedfs_sequencer(entry: Mapping[str, Any]) -> str:
    """A version marker for entries without an ETag: the newest chunk time and the inode."""
    chunks = entry.get("chunks") or []
    newest = max((_int(chunk.get("modified_ts_ns")) for chunk in chunks), default=0)
    attributes = entry.get("attributes") or {}
    return f"{newest or _int(attributes.get('mtime'))}-{attributes.get('inode', '')}"


# --- either ---------------------------------------------------------------------------------


def notification_events(body: Any, buckets: Buckets) -> list[PipelineEvent]:
    """CloudEvents for any accepted notification body; UnknownNotification otherwise.

    An S3 test event gives an empty list.
    """
    if is_s3_test_event(body):
        return []
    if is_minio(body):
        return to_events(minio_objects(body), buckets)
    if is_seaweedfs(body):
        return to_events(seaweedfs_objects(body), buckets)
    raise UnknownNotification(
        "expected a MinIO/S3 notification (Records[]) or a SeaweedFS filer notification "
        "(event_type, key, message)"
    )


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _unix_time(seconds: Any) -> str | None:
    value = _int(seconds)
    if value <= 0:
        return None
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
