"""events/notifications.py on real SeaweedFS filer webhook bodies and MinIO/S3 bodies."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from events.notifications import (
    DECISION_MADE,
    DRIFT_DETECTED,
    JOB_CREATED,
    MODEL_CREATED,
    RAW_CREATED,
    RESULT_CREATED,
    UnknownNotification,
    event_type_for,
    notification_events,
)
from readmission.config import Buckets

EXAMPLES = Path(__file__).resolve().parents[1] / "events" / "examples"
BUCKETS = Buckets()


def example(name: str) -> dict[str, Any]:
    return json.loads((EXAMPLES / name).read_text())


def seaweedfs_body(bucket: str, key: str, etag: str = "d41d8cd98f00b204e9800998ecf8427e") -> dict:
    """A filer 'create' body like example seaweedfs-create.json, for another object."""
    body = example("seaweedfs-create.json")
    parent, _, name = f"/buckets/{bucket}/{key}".rpartition("/")
    body["key"] = f"{parent}/{name}"
    body["message"]["new_parent_path"] = parent
    body["message"]["new_entry"]["name"] = name
    body["message"]["new_entry"]["extended"]["Seaweed-X-Amz-ETag"] = base64.b64encode(
        etag.encode()
    ).decode()
    return body


def minio_body(bucket: str, key_encoded: str, event_name: str = "s3:ObjectCreated:Put") -> dict:
    body = example("minio-put.json")
    record = body["Records"][0]
    record["eventName"] = event_name
    record["s3"]["bucket"]["name"] = bucket
    record["s3"]["object"]["key"] = key_encoded
    return body


def test_seaweedfs_create_gives_one_raw_event_with_the_s3_etag() -> None:
    [event] = notification_events(example("seaweedfs-create.json"), BUCKETS)
    etag = "e5ebd4c02cefbe7955977c67ada242b7"  # what S3 HEAD answered for that object
    assert event.attributes == {
        "specversion": "1.0",
        "id": hashlib.sha256(f"raw/dir one/a+b%.csv/{etag}".encode()).hexdigest()[:32],
        "type": RAW_CREATED,
        "source": "s3://raw",
        "subject": "dir one/a+b%.csv",
        "datacontenttype": "application/json",
        "bucket": "raw",
        "etag": etag,
        "time": "2026-11-26T05:41:32Z",
    }
    assert event.data == {
        "bucket": "raw",
        "key": "dir one/a+b%.csv",
        "size": 8,
        "etag": etag,
        "origin": "seaweedfs",
    }


def test_seaweedfs_overwrite_is_a_new_version_with_a_new_id() -> None:
    [created] = notification_events(example("seaweedfs-create.json"), BUCKETS)
    [overwritten] = notification_events(example("seaweedfs-overwrite.json"), BUCKETS)
    assert overwritten.attributes["etag"] == "1919efab7e3f5c4cc7e9e96f26663db9"
    assert overwritten.id != created.id
    assert overwritten.attributes["subject"] == created.attributes["subject"]


def test_seaweedfs_multipart_upload_fires_once_on_completion() -> None:
    assert notification_events(example("seaweedfs-multipart-part.json"), BUCKETS) == []
    [event] = notification_events(example("seaweedfs-multipart-complete.json"), BUCKETS)
    assert event.attributes["etag"] == "a45f1422f2dbe3d2890829dd76adba1b-2"
    assert event.data["size"] == 5242884
    assert event.attributes["subject"] == "big.csv"


@pytest.mark.parametrize(
    "name",
    [
        "seaweedfs-delete.json",
        "seaweedfs-directory.json",
        "seaweedfs-bucket.json",
        "seaweedfs-system.json",
        "seaweedfs-multipart-part.json",
    ],
)
def test_seaweedfs_entries_that_are_not_new_objects_give_no_event(name: str) -> None:
    assert notification_events(example(name), BUCKETS) == []


def test_seaweedfs_without_etag_attribute_falls_back_to_the_content_md5() -> None:
    body = example("seaweedfs-create.json")
    del body["message"]["new_entry"]["extended"]["Seaweed-X-Amz-ETag"]
    [event] = notification_events(body, BUCKETS)
    assert event.attributes["etag"] == "e5ebd4c02cefbe7955977c67ada242b7"


def test_seaweedfs_without_any_checksum_uses_a_sequencer_and_stays_deterministic() -> None:
    body = example("seaweedfs-create.json")
    del body["message"]["new_entry"]["extended"]
    del body["message"]["new_entry"]["attributes"]["md5"]
    first = notification_events(body, BUCKETS)
    again = notification_events(copy.deepcopy(body), BUCKETS)
    assert first[0].attributes["etag"] == ""
    assert first[0].id == again[0].id
    body["message"]["new_entry"]["chunks"][0]["modified_ts_ns"] += 1
    assert notification_events(body, BUCKETS)[0].id != first[0].id


@pytest.mark.parametrize(
    ("bucket", "key", "expected"),
    [
        ("raw", "data.csv", RAW_CREATED),
        ("raw", "folder/DATA.CSV", RAW_CREATED),
        ("raw", "data.csv.gz", None),
        ("raw", "notes.txt", None),
        ("jobs", "abc/00-logistic_regression.json", JOB_CREATED),
        ("jobs", "abc/00-logistic_regression.txt", None),
        ("results", "abc/00-logistic_regression.json", RESULT_CREATED),
        ("models", "champion/metadata.json", MODEL_CREATED),
        ("models", "decisions/0123456789abcdef.json", DECISION_MADE),
        ("models", "decisions/manual-000003.json", DECISION_MADE),
        ("models", "champion/last-decision.json", None),
        ("models", "challenger/metadata.json", None),
        ("models", "abc/metadata.json", None),
        ("models", "champion/model.onnx", None),
        ("models", "reports/0123456789abcdef/drift-detected.json", DRIFT_DETECTED),
        ("models", "reports/0123456789abcdef/drift.json", None),
        ("models", "reports/latest-drift.json", None),
        ("datasets", "reports/0123456789abcdef/drift-detected.json", None),
        ("datasets", "abc/manifest.json", None),
        ("dead-letter", "x/y.json", None),
        ("rejected", "abc/data.csv", None),
    ],
)
def test_event_type_by_bucket_and_key(bucket: str, key: str, expected: str | None) -> None:
    assert event_type_for(bucket, key, BUCKETS) == expected
    events = notification_events(seaweedfs_body(bucket, key), BUCKETS)
    assert [e.type for e in events] == ([expected] if expected else [])


def test_bucket_names_come_from_settings() -> None:
    buckets = Buckets(raw="uploads-x", jobs="jobs-x")
    assert event_type_for("uploads-x", "a.csv", buckets) == RAW_CREATED
    assert event_type_for("raw", "a.csv", buckets) is None
    assert notification_events(seaweedfs_body("raw", "a.csv"), buckets) == []


def test_minio_put_with_url_encoded_key() -> None:
    [event] = notification_events(example("minio-put.json"), BUCKETS)
    key = "uploads/diabetic data (2).csv"
    assert event.attributes["subject"] == key
    assert event.attributes["source"] == "s3://raw"
    assert event.attributes["time"] == "2026-11-26T05:00:00.123Z"
    assert event.data == {
        "bucket": "raw",
        "key": key,
        "size": 19159383,
        "etag": "0a1b2c3d4e5f60718293a4b5c6d7e8f9",
        "origin": "minio",
    }
    expected = f"raw/{key}/0a1b2c3d4e5f60718293a4b5c6d7e8f9"
    assert event.id == hashlib.sha256(expected.encode()).hexdigest()[:32]


def test_minio_and_seaweedfs_give_the_same_id_for_the_same_object_version() -> None:
    etag = "0123456789abcdef0123456789abcdef"
    from_seaweedfs = notification_events(seaweedfs_body("jobs", "d/01-x.json", etag), BUCKETS)
    body = minio_body("jobs", "d%2F01-x.json")
    body["Records"][0]["s3"]["object"]["eTag"] = etag
    from_minio = notification_events(body, BUCKETS)
    assert from_minio[0].id == from_seaweedfs[0].id


def test_minio_ignores_other_event_names_and_keeps_several_records() -> None:
    body = minio_body("raw", "a.csv")
    deleted = copy.deepcopy(body["Records"][0])
    deleted["eventName"] = "s3:ObjectRemoved:Delete"
    second = copy.deepcopy(body["Records"][0])
    second["eventName"] = "s3:ObjectCreated:CompleteMultipartUpload"
    second["s3"]["object"]["key"] = "b%2Bc.csv"  # "+" itself arrives as %2B
    body["Records"] += [deleted, second]
    events = notification_events(body, BUCKETS)
    assert [e.attributes["subject"] for e in events] == ["a.csv", "b+c.csv"]


def test_s3_test_event_and_empty_records_give_no_event() -> None:
    assert notification_events(example("s3-test-event.json"), BUCKETS) == []
    assert notification_events({"Records": []}, BUCKETS) == []


@pytest.mark.parametrize(
    "body",
    [
        {},
        [],
        "text",
        {"event_type": "create"},
        {"Records": [{"eventName": "s3:ObjectCreated:Put"}]},
        {"Records": ["nope"]},
    ],
)
def test_bodies_that_are_no_notification_raise(body: Any) -> None:
    with pytest.raises(UnknownNotification):
        notification_events(body, BUCKETS)
