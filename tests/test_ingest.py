"""The ingest core and its function against a real SeaweedFS S3 server (started here)."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
from support.python_snippet import run_python
from support.seaweed_server import SeaweedServer, real_csv_bytes, sample_csv, seaweed_s3

from events.delivery import encode_attribute_headers
from readmission import contract, corpus, drift, drift_reports, drop_file, ingest, jobs, keys
from readmission.config import Buckets, Settings
from readmission.corpus_append import parquet_bytes
from readmission.storage import ObjectStore, PreconditionFailed, json_bytes

__all__ = ["seaweed_s3"]  # the module-scoped server fixture, used by the tests below

ROOT = Path(__file__).resolve().parents[1]
_bucket_sets = itertools.count()


class RecordingStore(ObjectStore):
    """The real store, recording every call that writes or deletes (before making it)."""

    def __init__(self, client: object) -> None:
        super().__init__(client)
        self.writes: list[str] = []

    def _record(self, what: str) -> None:
        self.writes.append(what)

    def put_bytes(
        self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        self._record(f"put {bucket}/{key}")
        super().put_bytes(bucket, key, data, content_type)

    def copy(
        self,
        source_bucket: str,
        source_key: str,
        bucket: str,
        key: str,
        *,
        if_match: str | None = None,
    ) -> None:
        self._record(f"copy {bucket}/{key}")
        super().copy(source_bucket, source_key, bucket, key, if_match=if_match)

    def delete(self, bucket: str, key: str, *, if_match: str | None = None) -> None:
        self._record(f"delete {bucket}/{key}")
        super().delete(bucket, key, if_match=if_match)


class Crash(RuntimeError):
    """Simulated process death."""


class CrashingStore(RecordingStore):
    """Dies instead of making its write number `crash_at` (0-based); before letting a manifest
    through, checks that every object it names exists."""

    def __init__(self, client: object, crash_at: int, settings: Settings) -> None:
        super().__init__(client)
        self.crash_at = crash_at
        self.settings = settings
        self.lock = threading.Lock()  # ingest writes Parquet from several threads

    def _record(self, what: str) -> None:
        with self.lock:
            if len(self.writes) >= self.crash_at:
                raise Crash(f"crash instead of write #{self.crash_at}: {what}")
            super()._record(what)

    def put_bytes(
        self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        if key.endswith("manifest.json"):
            assert_manifest_complete(self, self.settings, json.loads(data))
        super().put_bytes(bucket, key, data, content_type)


def assert_manifest_complete(store: ObjectStore, settings: Settings, manifest: dict) -> None:
    datasets = settings.buckets.datasets
    for key in [b["key"] for b in manifest["batches"]]:
        assert store.exists(datasets, key), f"manifest names missing batch {key}"
    for key in manifest["validation"]["keys"] + manifest["test"]["keys"]:
        assert store.exists(datasets, key), f"manifest names missing part {key}"
    assert store.exists(datasets, manifest["encounters_key"])


# --------------------------------------------------------------------------- fixtures


def fresh_settings(store: ObjectStore, **overrides: object) -> Settings:
    """Settings naming buckets no other test uses, created on the server."""
    n = next(_bucket_sets)
    stamp = f"{int(time.time() * 1000) % 10**8}-{n}"
    buckets = Buckets(**{f: f"{getattr(Buckets, f)}-{stamp}" for f in Buckets.__dataclass_fields__})
    store.ensure_buckets(buckets.all())
    return replace(Settings(), buckets=buckets, **overrides)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def store(seaweed_s3: SeaweedServer) -> ObjectStore:
    return RecordingStore(seaweed_s3.client())


def snapshot(store: ObjectStore, settings: Settings) -> dict[str, str]:
    """bucket/key -> ETag of every object in the test's buckets."""
    return {f"{b}/{info.key}": info.etag for b in settings.buckets.all() for info in store.list(b)}


def first_version(settings: Settings, data: bytes) -> str:
    """The corpus version id of `data` appended to an empty corpus."""
    sha256 = hashlib.sha256(data).hexdigest()
    return corpus.version_id(None, sha256, settings.split_seed, settings.batch_rows)


def version_of(store: ObjectStore, settings: Settings, data: bytes) -> str:
    """The corpus version that appended `data` (from its drop record)."""
    record = store.get_json(settings.buckets.datasets, keys.drop_key(keys.content_id(data)))
    return record["version"]


def upload(store: ObjectStore, settings: Settings, key: str, data: bytes) -> None:
    store.put_bytes(settings.buckets.raw, key, data, "text/csv")


@pytest.fixture(scope="module")
def real(store: ObjectStore) -> Iterator[tuple[Settings, ingest.IngestOutcome]]:
    """The real CSV uploaded and ingested once for the module (its speed is measured by
    scripts/bench/bench_ingest.py, not here)."""
    settings = fresh_settings(store)
    data = real_csv_bytes()
    upload(store, settings, "uploads/diabetic_data.csv", data)
    outcome = ingest.ingest_object(
        store, settings, settings.buckets.raw, "uploads/diabetic_data.csv"
    )
    yield settings, outcome


# --------------------------------------------------------------------------- real file


def test_real_csv_gives_manifest_batches_and_jobs(
    store: ObjectStore, real: tuple[Settings, ingest.IngestOutcome]
) -> None:
    settings, outcome = real
    data = real_csv_bytes()
    dataset_id = first_version(settings, data)
    assert outcome.status == ingest.INGESTED and outcome.dataset_id == dataset_id
    manifest = store.get_json(settings.buckets.datasets, keys.manifest_key(dataset_id))
    assert manifest["source"] == {
        "bucket": settings.buckets.raw,
        "key": "uploads/diabetic_data.csv",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    rows = manifest["rows"]
    assert rows["total"] == 101_766 == rows["train"] + rows["validation"] + rows["test"]
    assert len(manifest["batches"]) == 5 == len(manifest["cumulative_sets"])
    assert [b["rows"] for b in manifest["batches"][:4]] == [15_000] * 4
    assert manifest["cumulative_sets"][-1]["rows"] == rows["train"]
    assert manifest["cumulative_sets"][1]["batch_keys"] == [
        keys.batch_key(dataset_id, 0),
        keys.batch_key(dataset_id, 1),
    ]
    totals = {
        c: sum(manifest["class_counts"][s][c] for s in ("train", "validation", "test"))
        for c in contract.TARGET_CLASSES
    }
    assert totals == {"NO": 54_864, ">30": 35_545, "<30": 11_357}
    assert manifest["patients"]["total"] == 71_518
    assert len(manifest["jobs"]) == 25 == outcome.jobs  # 5 sets x 5 default algorithms
    # costliest first (jobs.job_order): the five gradient boosting jobs, then by rows x cost
    assert manifest["jobs"][:7] == [
        keys.job_key(dataset_id, 4, "gradient_boosting"),
        keys.job_key(dataset_id, 3, "gradient_boosting"),
        keys.job_key(dataset_id, 2, "gradient_boosting"),
        keys.job_key(dataset_id, 1, "gradient_boosting"),
        keys.job_key(dataset_id, 4, "logistic_regression"),
        keys.job_key(dataset_id, 4, "hist_gradient_boosting"),  # the same cost: ALGORITHMS order
        keys.job_key(dataset_id, 0, "gradient_boosting"),
    ]
    assert manifest["jobs"][-1] == keys.job_key(dataset_id, 0, "decision_tree")
    assert sorted(store.list_keys(settings.buckets.jobs)) == sorted(manifest["jobs"])
    # 5 batches, validation, test, the encounter index, the manifest, the corpus head, the drop
    # record, 25 jobs, the drift report (.md, the latest copy, .json)
    assert len(outcome.written) == 5 + 2 + 1 + 1 + 1 + 1 + 25 + 3
    report = store.get_json(settings.buckets.models, keys.drift_report_key(keys.content_id(data)))
    assert report["status"] == "no_reference" and "no champion" in report["message"]
    assert manifest["drops"] == [keys.content_id(data)] and manifest["parent"] is None
    for name in ("train", "validation", "test"):
        assert abs(manifest["class_shares"][name]["NO"] - 0.539) < 0.01, name
    head = store.get_json(settings.buckets.datasets, keys.CORPUS_HEAD_KEY)
    assert head == {"version": dataset_id, "number": 1}


def test_real_parquet_reads_back_as_parse_csv_returns_it(
    store: ObjectStore, real: tuple[Settings, ingest.IngestOutcome]
) -> None:
    settings, outcome = real
    manifest = store.get_json(settings.buckets.datasets, keys.manifest_key(outcome.dataset_id))
    frames = {
        key: pd.read_parquet(io.BytesIO(store.get_bytes(settings.buckets.datasets, key)))
        for key in [b["key"] for b in manifest["batches"]]
        + manifest["validation"]["keys"]
        + manifest["test"]["keys"]
    }
    whole = pd.concat(frames.values()).sort_values("encounter_id").reset_index(drop=True)
    expected = contract.parse_csv(real_csv_bytes()).sort_values("encounter_id")
    pd.testing.assert_frame_equal(whole, expected.reset_index(drop=True))
    patients = [set(f["patient_nbr"]) for f in frames.values()]
    train = set().union(*patients[:-2])
    assert not train & patients[-2] and not train & patients[-1] and not patients[-2] & patients[-1]


def test_job_spec_names_its_cumulative_set(
    store: ObjectStore, real: tuple[Settings, ingest.IngestOutcome]
) -> None:
    settings, outcome = real
    dataset_id = outcome.dataset_id
    spec = store.get_json(settings.buckets.jobs, keys.job_key(dataset_id, 2, "random_forest"))
    assert spec == {
        "dataset_id": dataset_id,
        "cumulative_index": 2,
        "algorithm": "random_forest",
        "training_rows": 45_000,
        "batch_keys": [keys.batch_key(dataset_id, i) for i in range(3)],
        "validation_keys": [keys.validation_key(dataset_id)],
        "test_keys": [keys.test_key(dataset_id)],
        "datasets_bucket": settings.buckets.datasets,
        "manifest_key": keys.manifest_key(dataset_id),
    }


def test_same_bytes_under_another_name_is_the_same_dataset(
    store: RecordingStore, real: tuple[Settings, ingest.IngestOutcome]
) -> None:
    settings, first = real
    upload(store, settings, "again/copy-of-diabetic.csv", real_csv_bytes())
    before = snapshot(store, settings)
    store.writes.clear()
    outcome = ingest.ingest_object(
        store, settings, settings.buckets.raw, "again/copy-of-diabetic.csv"
    )
    assert outcome.status == ingest.ALREADY_INGESTED
    assert outcome.dataset_id == first.dataset_id and outcome.written == ()
    # The one write is this object version's receipt (it fires no event): the reconciler
    # then knows the copy was handled and does not re-emit it.
    info = store.head(settings.buckets.raw, "again/copy-of-diabetic.csv")
    assert info is not None
    receipt = keys.receipt_key(info.bucket, info.key, info.etag)
    assert store.writes == [f"put {settings.buckets.datasets}/{receipt}"]
    document = store.get_json(settings.buckets.datasets, receipt)
    assert document["version"] == first.dataset_id and document["status"] == "already_ingested"
    assert "nothing is appended or trained again" in document["message"]
    after = snapshot(store, settings)
    assert {k: v for k, v in after.items() if not k.endswith(receipt)} == before
    store.writes.clear()
    again = ingest.ingest_object(
        store, settings, settings.buckets.raw, "again/copy-of-diabetic.csv"
    )
    assert again.status == ingest.ALREADY_INGESTED and store.writes == []
    # Leave the module's shared state as it was for the tests that follow.
    store.delete(settings.buckets.raw, "again/copy-of-diabetic.csv")
    store.delete(settings.buckets.datasets, receipt)


def test_redelivered_event_changes_nothing(
    store: RecordingStore, real: tuple[Settings, ingest.IngestOutcome]
) -> None:
    settings, first = real
    before = snapshot(store, settings)
    store.writes.clear()
    for _ in range(3):
        outcome = ingest.ingest_object(
            store, settings, settings.buckets.raw, "uploads/diabetic_data.csv"
        )
        assert outcome.status == ingest.ALREADY_INGESTED and outcome.written == ()
        assert outcome.dataset_id == first.dataset_id
    assert store.writes == [] and snapshot(store, settings) == before


def test_missing_job_specs_are_restored_and_nothing_else(
    store: RecordingStore, real: tuple[Settings, ingest.IngestOutcome]
) -> None:
    settings, first = real
    before = snapshot(store, settings)
    lost = [
        keys.job_key(first.dataset_id, 0, "decision_tree"),
        keys.job_key(first.dataset_id, 4, "gradient_boosting"),
    ]
    for key in lost:
        store.delete(settings.buckets.jobs, key)
    store.writes.clear()
    outcome = ingest.ingest_object(
        store, settings, settings.buckets.raw, "uploads/diabetic_data.csv"
    )
    assert sorted(outcome.written) == sorted(f"{settings.buckets.jobs}/{k}" for k in lost)
    assert store.writes == [f"put {settings.buckets.jobs}/{k}" for k in reversed(lost)]
    assert snapshot(store, settings) == before  # same bytes, so the same ETags


def test_outputs_are_byte_identical_when_rebuilt_from_scratch(
    store: ObjectStore, real: tuple[Settings, ingest.IngestOutcome]
) -> None:
    settings, _ = real
    before = snapshot(store, settings)
    outputs = [settings.buckets.datasets, settings.buckets.jobs, settings.buckets.models]
    for bucket in outputs:
        for key in store.list_keys(bucket):
            store.delete(bucket, key)
    assert all(store.list_keys(b) == [] for b in outputs)
    outcome = ingest.ingest_object(
        store, settings, settings.buckets.raw, "uploads/diabetic_data.csv"
    )
    assert outcome.status == ingest.INGESTED and len(outcome.written) == 39  # 11 + 25 jobs + 3
    assert snapshot(store, settings) == before


# --------------------------------------------------------------------------- bad input


def _report_key(data: bytes, key: str) -> tuple[str, str]:
    digest = hashlib.sha256(data).hexdigest()[:16]
    return keys.rejected_key(digest, key), keys.rejected_report_key(digest, key)


def _two_complete_rows() -> bytes:
    """A valid file of two rows (weight and payer_code given), too small to split."""
    lines = sample_csv().split(b"\r\n")
    full = [line for line in lines[1:] if line and b"?" not in line.split(b",")[5:11]]
    return b"\r\n".join([lines[0], *full[:2]]) + b"\r\n"


BAD_UPLOADS = {
    "missing column": (
        "bad/missing.csv",
        lambda: sample_csv().replace(b"encounter_id,", b"", 1),
        "missing columns: encounter_id",
    ),
    "wrong target": (
        "bad/target.csv",
        lambda: sample_csv().replace(b",NO\r\n", b",No\r\n"),
        "target readmitted must be one of NO, >30, <30",
    ),
    "zero rows": ("bad/header-only.csv", lambda: sample_csv().split(b"\r\n")[0], "no data rows"),
    "empty": ("bad/empty.csv", lambda: b"", "the file is empty"),
    "binary": ("bad/binary.csv", lambda: bytes(range(256)) * 10, "binary"),
    "semicolons": ("bad/semi.csv", lambda: sample_csv().replace(b",", b";"), "requires commas"),
    "latin-1": (
        "bad/latin.csv",
        lambda: sample_csv().replace(b"Caucasian", b"Cauc\xe1sian", 1),
        "not UTF-8/ASCII",
    ),
    "truncated": ("bad/cut.csv", lambda: sample_csv()[:-60], "truncated"),
    "not a csv name": ("bad/data.xlsx", lambda: sample_csv(), "does not end in .csv"),
    "too few patients": (
        "bad/tiny.csv",
        lambda: _two_complete_rows(),
        "too few to give the training, validation and test splits",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_UPLOADS))
def test_bad_upload_is_moved_to_rejected_with_a_report(store: RecordingStore, kind: str) -> None:
    key, make, expected = BAD_UPLOADS[kind]
    data = make()
    settings = fresh_settings(store)
    upload(store, settings, key, data)
    outcome = ingest.ingest_object(store, settings, settings.buckets.raw, key)
    assert outcome.status == ingest.REJECTED
    assert any(expected in p for p in outcome.problems), outcome.problems
    copy_key, report_key = _report_key(data, key)
    rejected = settings.buckets.rejected
    assert store.get_bytes(rejected, copy_key) == data
    report = store.get_json(rejected, report_key)
    assert report["problems"] == list(outcome.problems)
    assert report["original"]["key"] == key and report["original"]["size"] == len(data)
    assert report["rejected_copy"] == {"bucket": rejected, "key": copy_key}
    assert report["contract"]["columns"] == list(contract.COLUMNS)
    assert "upload it to the raw bucket again" in report["how_to_fix"]
    assert snapshot(store, settings) == {
        f"{rejected}/{copy_key}": store.head(rejected, copy_key).etag,
        f"{rejected}/{report_key}": store.head(rejected, report_key).etag,
    }, "nothing but the rejected copy and its report may exist"
    # the redelivered event finds the raw object gone and does nothing
    store.writes.clear()
    again = ingest.ingest_object(store, settings, settings.buckets.raw, key)
    assert again.status == ingest.GONE and store.writes == []


def test_too_large_upload_is_rejected_without_reading_it(store: RecordingStore) -> None:
    settings = fresh_settings(store, max_upload_bytes=1000)
    data = sample_csv()
    upload(store, settings, "big.csv", data)
    outcome = ingest.ingest_object(store, settings, settings.buckets.raw, "big.csv")
    assert outcome.status == ingest.REJECTED
    assert "more than the limit of 1,000 bytes" in outcome.problems[0]
    [report_key] = [k for k in store.list_keys(settings.buckets.rejected) if k.endswith(".json")]
    report = store.get_json(settings.buckets.rejected, report_key)
    assert report["original"]["sha256"] is None  # never downloaded
    assert (
        store.get_bytes(settings.buckets.rejected, report_key.removesuffix(".error.json")) == data
    )
    assert store.list_keys(settings.buckets.raw) == []


def _multipart_upload(store: ObjectStore, settings: Settings, key: str, data: bytes) -> str:
    """Upload `data` in 5 MiB parts (as clients send large files); the object's ETag."""
    from boto3.s3.transfer import TransferConfig

    parts = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    store.client.upload_fileobj(io.BytesIO(data), settings.buckets.raw, key, Config=parts)
    etag = store.head(settings.buckets.raw, key).etag
    assert "-" in etag  # a multipart ETag: <md5 of the parts' md5s>-<parts>
    return etag


def test_a_multipart_upload_is_read_by_its_etag_and_named_by_its_content(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(drop_file, "BLOCK_BYTES", 1 << 20)
    settings = fresh_settings(store, batch_rows=10_000)
    data = sample_csv(every=2)
    etag = _multipart_upload(store, settings, "big.csv", data)
    outcome = ingest.ingest_object(store, settings, settings.buckets.raw, "big.csv", etag=etag)
    assert outcome.status == ingest.INGESTED, outcome.summary()
    assert outcome.dataset_id == first_version(settings, data)
    record = store.get_json(settings.buckets.datasets, keys.drop_key(keys.content_id(data)))
    assert record["source"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["rows"]["new"] == len(data.split(b"\r\n")) - 2


def test_a_file_too_large_to_read_whole_that_breaks_the_contract_on_its_last_line_appends_nothing(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(drop_file, "BLOCK_BYTES", 1 << 20)
    monkeypatch.setattr(drop_file, "DETAILED_PARSE_MAX_BYTES", 0)  # only the streaming pass
    settings = fresh_settings(store)
    data = sample_csv(every=2)
    data = data[: data.rstrip(b"\r\n").rindex(b",") + 1] + b"YES\r\n"
    etag = _multipart_upload(store, settings, "late.csv", data)
    outcome = ingest.ingest_object(store, settings, settings.buckets.raw, "late.csv", etag=etag)
    assert outcome.status == ingest.REJECTED
    assert outcome.problems[0].startswith("target readmitted is not one of NO, >30, <30")
    copy_key, report_key = _report_key(data, "late.csv")
    rejected = settings.buckets.rejected
    assert set(snapshot(store, settings)) == {f"{rejected}/{copy_key}", f"{rejected}/{report_key}"}


@pytest.mark.parametrize("crash_at", [1, 2], ids=["after-copy", "after-report"])
def test_crash_while_rejecting_loses_nothing_and_the_redelivery_finishes(
    store: ObjectStore, seaweed_s3: SeaweedServer, crash_at: int
) -> None:
    settings = fresh_settings(store)
    data = b"not,a,contract,file\r\n1,2,3,4\r\n"
    upload(store, settings, "bad.csv", data)
    crashing = CrashingStore(seaweed_s3.client(), crash_at=crash_at, settings=settings)
    with pytest.raises(Crash):
        ingest.ingest_object(crashing, settings, settings.buckets.raw, "bad.csv")
    assert store.get_bytes(settings.buckets.raw, "bad.csv") == data, "nothing may be lost"
    outcome = ingest.ingest_object(store, settings, settings.buckets.raw, "bad.csv")
    assert outcome.status == ingest.REJECTED
    assert sorted(store.list_keys(settings.buckets.rejected)) == sorted(
        _report_key(data, "bad.csv")
    )
    assert store.list_keys(settings.buckets.raw) == []


# --------------------------------------------------------------------------- overwrites


def _two_versions(store: ObjectStore, settings: Settings, key: str) -> tuple[str, bytes, str]:
    """Version A of `key` uploaded, then overwritten by B before A's event is handled:
    (A's etag, B's bytes, B's etag)."""
    upload(store, settings, key, sample_csv(every=20))
    etag_a = store.head(settings.buckets.raw, key).etag
    data_b = sample_csv(every=30)
    upload(store, settings, key, data_b)
    etag_b = store.head(settings.buckets.raw, key).etag
    assert etag_a != etag_b
    return etag_a, data_b, etag_b


def test_an_overwritten_version_is_superseded_and_the_newer_one_ingested(
    store: RecordingStore,
) -> None:
    settings = fresh_settings(store, batch_rows=1000)
    raw, datasets = settings.buckets.raw, settings.buckets.datasets
    etag_a, data_b, etag_b = _two_versions(store, settings, "clinic/x.csv")
    receipt_a = keys.receipt_key(raw, "clinic/x.csv", etag_a)
    store.writes.clear()

    outcome = ingest.ingest_object(store, settings, raw, "clinic/x.csv", etag=etag_a)
    assert outcome.status == ingest.SUPERSEDED
    assert (outcome.dataset_id, outcome.written, outcome.jobs) == (None, (), 0)
    assert f"the key now holds ETag {etag_b}" in outcome.summary()
    assert store.writes == [f"put {datasets}/{receipt_a}"], "only A's receipt"
    document = store.get_json(datasets, receipt_a)
    assert document["status"] == "superseded" and document["version"] is None
    assert document["object"] == {"bucket": raw, "key": "clinic/x.csv", "etag": etag_a}
    assert "overwritten by a newer version before this version" in document["message"]
    assert store.list_keys(datasets) == [receipt_a], "nothing appended"
    assert store.list_keys(settings.buckets.jobs) == []
    assert store.list_keys(raw) == ["clinic/x.csv"], "B stays for its own event"

    store.writes.clear()  # A's redelivery: the same outcome, nothing written
    again = ingest.ingest_object(store, settings, raw, "clinic/x.csv", etag=f'"{etag_a}"')
    assert again.status == ingest.SUPERSEDED and store.writes == []

    newer = ingest.ingest_object(store, settings, raw, "clinic/x.csv", etag=etag_b)
    assert newer.status == ingest.INGESTED
    assert (
        newer.dataset_id == first_version(settings, data_b) == version_of(store, settings, data_b)
    )
    manifest = store.get_json(datasets, keys.manifest_key(newer.dataset_id))
    assert manifest["source"]["sha256"] == hashlib.sha256(data_b).hexdigest()
    receipt_b = store.get_json(datasets, keys.receipt_key(raw, "clinic/x.csv", etag_b))
    assert receipt_b["status"] == "ingested" and receipt_b["version"] == newer.dataset_id
    assert receipt_b["object"]["etag"] == etag_b

    before = snapshot(store, settings)
    store.writes.clear()  # A's event once more, after B was ingested: still nothing
    late = ingest.ingest_object(store, settings, raw, "clinic/x.csv", etag=etag_a)
    assert late.status == ingest.SUPERSEDED and store.writes == []
    assert snapshot(store, settings) == before
    assert store.get_json(datasets, receipt_a) == document
    # an event without an etag (an older caller) reads whatever the key holds, as before
    old = ingest.ingest_object(store, settings, raw, "clinic/x.csv")
    assert (old.status, old.dataset_id) == (ingest.ALREADY_INGESTED, newer.dataset_id)


def test_a_version_ingested_before_it_was_overwritten_keeps_its_receipt(
    store: RecordingStore,
) -> None:
    settings = fresh_settings(store, batch_rows=1000)
    raw, datasets = settings.buckets.raw, settings.buckets.datasets
    data_a = sample_csv(every=20)
    upload(store, settings, "y.csv", data_a)
    etag_a = store.head(raw, "y.csv").etag
    first = ingest.ingest_object(store, settings, raw, "y.csv", etag=etag_a)
    assert first.status == ingest.INGESTED
    receipt_a = keys.receipt_key(raw, "y.csv", etag_a)
    document = store.get_json(datasets, receipt_a)
    upload(store, settings, "y.csv", sample_csv(every=30))
    lost = keys.job_key(first.dataset_id, 0, "decision_tree")
    store.delete(settings.buckets.jobs, lost)
    store.writes.clear()
    # A's event redelivered after the overwrite: A was read, its receipt stands, and its job
    # specs are restored as for any redelivery
    again = ingest.ingest_object(store, settings, raw, "y.csv", etag=etag_a)
    assert (again.status, again.dataset_id) == (ingest.ALREADY_INGESTED, first.dataset_id)
    assert store.writes == [f"put {settings.buckets.jobs}/{lost}"]
    assert store.get_json(datasets, receipt_a) == document


class OverwritingStore(RecordingStore):
    """Writes `data` over `key` of the raw bucket right before the first call named `when`."""

    def __init__(self, client: object, key: str, data: bytes, when: str) -> None:
        super().__init__(client)
        self.overwrite: tuple[str, bytes] | None = (key, data)
        self.when = when

    def _maybe_overwrite(self, call: str, bucket: str) -> None:
        if call == self.when and self.overwrite is not None:
            key, data = self.overwrite
            self.overwrite = None
            ObjectStore.put_bytes(self, bucket, key, data, "text/csv")

    def open_version(self, bucket: str, key: str, etag: str | None = None) -> Any | None:
        self._maybe_overwrite("get", bucket)
        return super().open_version(bucket, key, etag)

    def copy(
        self,
        source_bucket: str,
        source_key: str,
        bucket: str,
        key: str,
        *,
        if_match: str | None = None,
    ) -> None:
        self._maybe_overwrite("copy", source_bucket)
        super().copy(source_bucket, source_key, bucket, key, if_match=if_match)

    def delete(self, bucket: str, key: str, *, if_match: str | None = None) -> None:
        self._maybe_overwrite("delete", bucket)
        super().delete(bucket, key, if_match=if_match)


def test_an_overwrite_between_head_and_get_is_caught_by_if_match(
    store: ObjectStore, seaweed_s3: SeaweedServer
) -> None:
    settings = fresh_settings(store, batch_rows=1000)
    raw = settings.buckets.raw
    upload(store, settings, "z.csv", sample_csv(every=20))
    etag_a = store.head(raw, "z.csv").etag
    racing = OverwritingStore(seaweed_s3.client(), "z.csv", sample_csv(every=30), "get")
    outcome = ingest.ingest_object(racing, settings, raw, "z.csv", etag=etag_a)
    assert outcome.status == ingest.SUPERSEDED  # SeaweedFS answered the If-Match GET with 412
    assert store.list_keys(settings.buckets.datasets) == [keys.receipt_key(raw, "z.csv", etag_a)]
    with pytest.raises(PreconditionFailed):
        store.open_version(raw, "z.csv", etag_a)
    assert store.open_version(raw, "gone.csv", etag_a) is None


@pytest.mark.parametrize("when", ["copy", "delete"])
def test_rejecting_a_version_never_moves_or_deletes_the_newer_one(
    store: ObjectStore, seaweed_s3: SeaweedServer, when: str
) -> None:
    settings = fresh_settings(store)
    raw, rejected = settings.buckets.raw, settings.buckets.rejected
    bad = b"not,a,contract,file\r\n1,2,3,4\r\n"
    upload(store, settings, "fix.csv", bad)
    etag_a = store.head(raw, "fix.csv").etag
    fixed = sample_csv(every=30)
    racing = OverwritingStore(seaweed_s3.client(), "fix.csv", fixed, when)
    outcome = ingest.ingest_object(racing, settings, raw, "fix.csv", etag=etag_a)
    assert store.get_bytes(raw, "fix.csv") == fixed, "the analyst's fix stays for its event"
    copy_key, report_key = _report_key(bad, "fix.csv")
    if when == "copy":  # B landed before A was copied out: A can no longer be moved
        assert outcome.status == ingest.SUPERSEDED
        assert store.list_keys(rejected) == []
    else:  # B landed after A was copied: A is rejected, the If-Match DELETE spares B
        assert outcome.status == ingest.REJECTED
        assert store.get_bytes(rejected, copy_key) == bad
        assert sorted(store.list_keys(rejected)) == sorted([copy_key, report_key])


# --------------------------------------------------------------------------- drift


def test_a_drop_gets_a_drift_report_against_the_champions_reference_and_an_alert(
    store: ObjectStore,
) -> None:
    settings = fresh_settings(store, batch_rows=1000, algorithms=("logistic_regression",))
    models = settings.buckets.models
    first = sample_csv(every=20)
    reference = drift.build_profile(contract.parse_csv_table(first))
    store.put_bytes(models, "v1/reference.json", json_bytes(reference))
    champion = {"version": "1", "dataset_id": "v1", "reference": {"key": "v1/reference.json"}}
    store.put_bytes(models, keys.CHAMPION_METADATA_KEY, json_bytes(champion))
    lines = sample_csv(every=21).split(b"\r\n")  # other rows, every age band moved to [90-100)
    header = lines[0].split(b",")
    age = header.index(b"age")
    moved = [lines[0]] + [
        b",".join([*f[:age], b"[90-100)", *f[age + 1 :]])
        for f in (x.split(b",") for x in lines[1:] if x)
    ]
    drop = b"\r\n".join(moved) + b"\r\n"
    upload(store, settings, "drifted.csv", drop)
    outcome = ingest.ingest_object(store, settings, settings.buckets.raw, "drifted.csv")
    drop_id = keys.content_id(drop)
    report = store.get_json(models, keys.drift_report_key(drop_id))
    assert outcome.status == ingest.INGESTED
    assert report["status"] == drift.DRIFTED and "age" in report["drifted"]
    assert report["reference"]["model_version"] == "1"
    alert = store.get_json(models, keys.drift_alert_key(drop_id))
    assert alert["drifted"] == report["drifted"] and alert["psi"]["age"] > 0.2
    assert store.get_json(models, keys.LATEST_DRIFT_KEY) == report
    assert b"| age | categorical |" in store.get_bytes(models, keys.drift_report_key(drop_id, "md"))
    # the report is lost to a crash after the receipt: the redelivery writes it, once
    store.delete(models, keys.drift_report_key(drop_id))
    again = ingest.ingest_object(store, settings, settings.buckets.raw, "drifted.csv")
    assert f"{models}/{keys.drift_report_key(drop_id)}" in again.written
    assert store.get_json(models, keys.drift_report_key(drop_id)) == report
    third = ingest.ingest_object(store, settings, settings.buckets.raw, "drifted.csv")
    assert third.written == ()


def test_a_drop_larger_than_the_drift_sample_is_compared_on_its_systematic_sample(
    store: ObjectStore,
) -> None:
    settings = fresh_settings(
        store, batch_rows=1000, algorithms=("logistic_regression",), drift_sample_rows=700
    )
    models = settings.buckets.models
    reference = drift.build_profile(contract.parse_csv_table(sample_csv(every=20)))
    store.put_bytes(models, "v1/reference.json", json_bytes(reference))
    champion = {"version": "1", "dataset_id": "v1", "reference": {"key": "v1/reference.json"}}
    store.put_bytes(models, keys.CHAMPION_METADATA_KEY, json_bytes(champion))
    data = sample_csv(every=21)
    upload(store, settings, "sampled.csv", data)
    ingest.ingest_object(store, settings, settings.buckets.raw, "sampled.csv")
    drop_id = keys.content_id(data)
    rows = contract.parse_csv_table(data)
    positions = [k * rows.num_rows // 700 for k in range(700)]
    expected = drift.compare(
        reference,
        rows.take(positions),
        drift_reports.thresholds(settings),
        drop_id=drop_id,
        reference={
            "model_version": "1",
            "corpus_version": "v1",
            "algorithm": None,
            "key": "v1/reference.json",
        },
        drop_rows=rows.num_rows,
    )
    report_bytes = store.get_bytes(models, keys.drift_report_key(drop_id))
    assert report_bytes == json_bytes(expected)
    assert (expected["rows"], expected["drop_rows"]) == (700, rows.num_rows)
    markdown = store.get_bytes(models, keys.drift_report_key(drop_id, "md")).decode()
    assert f"A systematic sample of 700 of the drop's {rows.num_rows:,} rows" in markdown
    # a redelivery after the report was lost samples the known drop's local copy again: the
    # same bytes
    store.delete(models, keys.drift_report_key(drop_id))
    ingest.ingest_object(store, settings, settings.buckets.raw, "sampled.csv")
    assert store.get_bytes(models, keys.drift_report_key(drop_id)) == report_bytes


# --------------------------------------------------------------------------- crashes


def test_crash_at_every_write_then_rerun_gives_the_clean_result(
    store: ObjectStore, seaweed_s3: SeaweedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A crash also kills the release of the corpus lease: the rerun waits for it to expire.
    monkeypatch.setattr(ingest, "CORPUS_LEASE_TTL_SECONDS", 1.0)
    small = {"batch_rows": 1000, "algorithms": ("logistic_regression", "gradient_boosting")}
    settings = fresh_settings(store, **small)
    upload(store, settings, "x.csv", sample_csv(every=20))
    clean = ingest.ingest_object(store, settings, settings.buckets.raw, "x.csv")
    expected = snapshot(store, settings)
    # 4 batches, validation, test, encounter index, manifest, head, drop record, 4 x 2 jobs,
    # the drift report (.md, the latest copy, .json)
    assert len(clean.written) == 4 + 2 + 1 + 1 + 1 + 1 + 8 + 3
    outputs = [settings.buckets.datasets, settings.buckets.jobs, settings.buckets.models]

    # two writes that are not outputs come before the drift report's three objects: the
    # receipt (about the raw object) and the release of the corpus lease
    receipt_at = len(clean.written) - 3
    for crash_at in range(len(clean.written) + 2):
        for bucket in outputs:
            for key in store.list_keys(bucket):
                store.delete(bucket, key)
        crashing = CrashingStore(seaweed_s3.client(), crash_at=crash_at, settings=settings)
        with pytest.raises(Crash):
            ingest.ingest_object(crashing, settings, settings.buckets.raw, "x.csv")
        manifest = store.get_json_if_exists(
            settings.buckets.datasets, keys.manifest_key(clean.dataset_id)
        )
        if manifest is not None:
            assert_manifest_complete(store, settings, manifest)
        rerun = ingest.ingest_object(store, settings, settings.buckets.raw, "x.csv")
        assert rerun.status in (ingest.INGESTED, ingest.ALREADY_INGESTED)
        missing = len(clean.written) - crash_at + min(max(crash_at - receipt_at, 0), 2)
        assert len(rerun.written) == missing, crash_at
        # a crash leaves the corpus lease it could not release (expired, taken over by the
        # next append): no output
        after = {k: v for k, v in snapshot(store, settings).items() if not k.endswith(".lease")}
        assert after == expected, f"crash at write {crash_at}"


def test_job_order_is_costliest_first() -> None:
    # three cumulative sets of 15,000 / 30,000 / 40,000 rows
    order = jobs.job_order(
        [15_000, 30_000, 40_000],
        [
            "logistic_regression",
            "hist_gradient_boosting",
            "decision_tree",
            "random_forest",
            "gradient_boosting",
        ],
    )
    assert len(order) == 15 and len(set(order)) == 15
    # every gradient boosting job (0.69 s per 1,000 rows) before anything else, biggest first
    assert order[:3] == [
        (2, "gradient_boosting"),
        (1, "gradient_boosting"),
        (0, "gradient_boosting"),
    ]
    # then by rows x cost: 40k logistic regression and hist gradient boosting (6.0 each: a tie
    # keeps the order of the algorithms), 30k of each (4.5), 40k forest (3.04)
    assert order[3:8] == [
        (2, "logistic_regression"),
        (2, "hist_gradient_boosting"),
        (1, "logistic_regression"),
        (1, "hist_gradient_boosting"),
        (2, "random_forest"),
    ]
    assert order[-1] == (0, "decision_tree")


def test_job_order_puts_an_unknown_algorithm_with_the_costliest() -> None:
    order = jobs.job_order([10, 20], ["decision_tree", "new_algorithm", "gradient_boosting"])
    assert order == [
        (1, "new_algorithm"),
        (1, "gradient_boosting"),
        (0, "new_algorithm"),
        (0, "gradient_boosting"),
        (1, "decision_tree"),
        (0, "decision_tree"),
    ]


def test_parquet_bytes_are_the_same_in_another_process() -> None:
    table = contract.parse_csv_table(sample_csv())
    here = hashlib.sha256(parquet_bytes(table)).hexdigest()
    code = (
        "import hashlib, sys; sys.path.insert(0, 'tests');"
        "from support.seaweed_server import sample_csv;"
        "from readmission import contract, corpus_append;"
        "t = contract.parse_csv_table(sample_csv());"
        "print(hashlib.sha256(corpus_append.parquet_bytes(t)).hexdigest())"
    )
    assert run_python(code).stdout.strip() == here
    assert pq.ParquetFile(io.BytesIO(parquet_bytes(table))).metadata.num_rows == len(table)


# --------------------------------------------------------------------------- the function


def _event(
    bucket: str, key: str, event_type: str = "io.readmission.raw.created", etag: str = ""
) -> dict:
    headers = {
        "ce-specversion": "1.0",
        "ce-type": event_type,
        "ce-source": f"s3://{bucket}",
        "ce-id": hashlib.sha256(f"{bucket}/{key}/{etag}".encode()).hexdigest()[:32],
        "ce-subject": key,
        "content-type": "application/json",
    }
    body = {"bucket": bucket, "key": key, "size": 1, "etag": etag, "origin": "seaweedfs"}
    return {"headers": headers, "data": json.dumps(body)}


def _ingest_app(
    store: ObjectStore, seaweed_s3: SeaweedServer, monkeypatch: pytest.MonkeyPatch
) -> tuple[Settings, Any]:
    """Fresh buckets and the real ingest function's app, configured through its env."""
    from functions_framework import create_app

    settings = fresh_settings(store)
    for name, value in seaweed_s3.env().items():
        monkeypatch.setenv(name, value)
    for field_name in Buckets.__dataclass_fields__:
        monkeypatch.setenv(f"BUCKET_{field_name.upper()}", getattr(settings.buckets, field_name))
    monkeypatch.setenv("BATCH_ROWS", "1000")
    app = create_app("ingest", str(ROOT / "functions" / "ingest" / "main.py"), "cloudevent")
    return settings, app


def test_function_answers_204_and_ingests_or_400_for_a_malformed_event(
    store: ObjectStore, seaweed_s3: SeaweedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, app = _ingest_app(store, seaweed_s3, monkeypatch)
    client = app.test_client()
    raw = settings.buckets.raw
    data = sample_csv()
    upload(store, settings, "clinic/a.csv", data)
    etag = store.head(raw, "clinic/a.csv").etag

    reply = client.post("/", **_event(raw, "clinic/a.csv", etag=etag))
    assert (reply.status_code, reply.data) == (204, b"")
    manifest = store.get_json(
        settings.buckets.datasets, keys.manifest_key(version_of(store, settings, data))
    )
    assert manifest["batch_rows"] == 1000 and len(manifest["jobs"]) == 5 * len(manifest["batches"])

    reply = client.post("/", **_event(raw, "clinic/a.csv", etag=etag))  # redelivery
    assert reply.status_code == 204
    reply = client.post("/", **_event(raw, "clinic/a.csv"))  # an event without an etag
    assert reply.status_code == 204

    upload(store, settings, "clinic/bad.csv", b"hello\r\n")
    reply = client.post("/", **_event(raw, "clinic/bad.csv"))
    assert reply.status_code == 204, "a bad CSV is handled (moved to rejected), not retried"
    assert store.list_keys(raw) == ["clinic/a.csv"]

    assert client.post("/", **_event("elsewhere", "clinic/a.csv")).status_code == 400
    assert client.post("/", **_event(raw, "a.csv", "io.readmission.job.created")).status_code == 400


def test_function_answers_204_for_an_overwritten_version_and_ingests_the_newer_one(
    store: ObjectStore, seaweed_s3: SeaweedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, app = _ingest_app(store, seaweed_s3, monkeypatch)
    client = app.test_client()
    raw, datasets = settings.buckets.raw, settings.buckets.datasets
    etag_a, data_b, etag_b = _two_versions(store, settings, "clinic/x.csv")

    reply = client.post("/", **_event(raw, "clinic/x.csv", etag=etag_a))
    assert (reply.status_code, reply.data) == (204, b"")
    receipt_a = keys.receipt_key(raw, "clinic/x.csv", etag_a)
    assert store.get_json(datasets, receipt_a)["status"] == "superseded"
    assert store.list_keys(datasets) == [receipt_a], "nothing of A or B is ingested by A's event"

    reply = client.post("/", **_event(raw, "clinic/x.csv", etag=etag_b))
    assert (reply.status_code, reply.data) == (204, b"")
    version = version_of(store, settings, data_b)
    receipt_b = store.get_json(datasets, keys.receipt_key(raw, "clinic/x.csv", etag_b))
    assert receipt_b["status"] == "ingested" and receipt_b["version"] == version
    assert store.get_json(datasets, receipt_a)["status"] == "superseded"


@pytest.mark.parametrize("key", ["adv/p8/данные.csv", "emoji/\U0001f3e5 ward.csv"])
def test_function_ingests_a_key_outside_latin1_from_an_encoded_event(
    store: ObjectStore, seaweed_s3: SeaweedServer, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    settings, app = _ingest_app(store, seaweed_s3, monkeypatch)
    data = sample_csv()
    upload(store, settings, key, data)
    event = _event(settings.buckets.raw, key)
    event["headers"] = encode_attribute_headers(event["headers"])
    reply = app.test_client().post("/", **event)
    assert (reply.status_code, reply.data) == (204, b"")
    manifest = store.get_json(
        settings.buckets.datasets, keys.manifest_key(version_of(store, settings, data))
    )
    assert manifest["source"]["key"] == key


@pytest.mark.parametrize(
    "key",
    [
        "../a.csv",
        "clinic/../a.csv",
        "clinic/./a.csv",
        "clinic\\..\\a.csv",
        "clinic/a\x00.csv",
        "clinic/a\ud800.csv",  # no UTF-8 spelling: no request can name it
        "clinic/" + "a" * 1100 + ".csv",  # longer than the 1,024 bytes S3 allows
    ],
)
def test_ingest_answers_400_for_a_key_with_dot_dot_or_nul(
    store: ObjectStore, seaweed_s3: SeaweedServer, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    """The object store can never serve such a key (SeaweedFS and MinIO refuse `.` and `..`
    segments and NUL with 400 InvalidRequest): a retry cannot help, so the event is malformed
    (400, dead-lettered once), not a failure (500, retried and re-emitted forever)."""
    settings, app = _ingest_app(store, seaweed_s3, monkeypatch)
    event = _event(settings.buckets.raw, "placeholder.csv")  # the data names the key:
    event["data"] = json.dumps({**json.loads(event["data"]), "key": key})  # JSON escapes all
    reply = app.test_client().post("/", **event)
    assert reply.status_code == 400, reply.data
    assert b"can never be read" in reply.data
    assert store.list_keys(settings.buckets.datasets) == []
    assert store.list_keys(settings.buckets.rejected) == []


def test_keys_a_store_can_serve_are_not_refused() -> None:
    for key in ["a.csv", "clinic/v1..2.csv", "..a.csv", "a../b.csv", "/a.csv", "данные.csv"]:
        assert keys.unreadable_key_problem(key) is None, key
    assert keys.unreadable_key_problem("a" * 1020 + ".csv") is None  # 1,024 bytes
